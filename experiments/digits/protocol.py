"""The mechanics of the digits protocol: data, one training stage, evaluation, the swap.

The driver (:mod:`experiments.digits.run`) composes these into methods. Nothing
here knows about a particular method.

* Data: :func:`batches` is the ONLY function that reads examples. It yields
  dict batches ``{"id", "image", "label"}`` keyed by a stable example id (the
  record index in scikit-learn's ``load_digits``), raw digit labels 0-9.
  Everything else (the split, training, the pre-pass, evaluation) goes
  through it, so a different source (a TFDS ``array_record`` builder read
  with ``flowjax.batches``) replaces this one function.
* Tasks: the pre-training task is digits 0-4, the fine-tuning task digits 5-9
  with labels remapped to 0-4 (a new head). :func:`make_tasks` splits the
  records deterministically and stratified: test 20 % (seed 0), and
  validation 20 % of the rest (for learning-rate selection only).
* Training: :func:`train` runs one stage (SGD with momentum and weight decay,
  PyTorch-style, on a trainable mask; per-epoch cosine or constant LR), with a
  per-example weight on every example (1 unless a ``WeightTable`` is given) and
  the official vision reduction ``Σ w_i ℓ_i / B``. The step is a
  ``jax.jit``-compiled pure function of arrays, compiled once per model
  structure and trainable mask; the learning rate is an argument, so every
  LR of a grid and every epoch of a schedule reuse it. The last partial
  training batch of an epoch is dropped (one shape).
* Evaluation: :func:`accuracy` in eval mode (running statistics), padded to
  one batch shape. :func:`pretraining_accuracy` puts the pre-trained head and
  the pre-trained BatchNorm (scale, bias, running mean and variance) back
  into the fine-tuned body before measuring the pre-training task, as the
  paper and the official code do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flowjax
from experiments.digits import model as M

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
FINETUNE_DIGITS = (5, 6, 7, 8, 9)

# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1] in [0, 1]
    images.setflags(write=False)
    labels = d.target.astype(np.int32)
    labels.setflags(write=False)
    return images, labels


def batches(
    ids: np.ndarray | None,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """THE data access: batches of the examples ``ids`` (all records if None).

    Args:
      ids: int64 example ids (record indices of ``load_digits``), or None.
      batch_size: examples per batch.
      rng: shuffles the order when given; None keeps the order of ``ids``.
      drop_remainder: drop the last partial batch.

    Yields:
      ``{"id": int64 [b], "image": float32 [b, 8, 8, 1] (pixels / 16),
      "label": int32 [b] (the digit, 0-9)}``.
    """
    images, labels = _load_digits()
    ids = np.arange(len(labels), dtype=np.int64) if ids is None else np.asarray(ids)
    order = ids if rng is None else ids[rng.permutation(len(ids))]
    stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
    for start in range(0, stop, batch_size):
        chunk = order[start : start + batch_size]
        yield {"id": chunk, "image": images[chunk], "label": labels[chunk]}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's example ids per split; task labels are ``digit - offset``."""

    name: str
    offset: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def relabel(self, batch: dict) -> dict:
        """A batch with task labels (checked to belong to this task)."""
        label = batch["label"] - self.offset
        if label.size and (label.min() < 0 or label.max() >= 5):
            raise ValueError(f"batch has digits outside the {self.name} task.")
        return {**batch, "label": label.astype(np.int32)}

    def batches(self, ids: np.ndarray, batch_size: int, **kw) -> Iterator[dict]:
        """:func:`batches` over ``ids`` with task labels."""
        return (self.relabel(b) for b in batches(ids, batch_size, **kw))


@dataclasses.dataclass(frozen=True)
class Tasks:
    pretrain: Task
    finetune: Task


def make_tasks(
    split_seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.2
) -> Tasks:
    """Deterministic stratified train / validation / test split of all records.

    Test is ``test_fraction`` of all records; validation is ``val_fraction``
    of the remaining training records; both stratified by digit, seed
    ``split_seed``. The split is the same for every seed of the experiment.
    """
    from sklearn.model_selection import train_test_split

    rows = list(batches(None, 4096))
    ids = np.concatenate([b["id"] for b in rows])
    digits = np.concatenate([b["label"] for b in rows])
    train, test = train_test_split(
        ids, test_size=test_fraction, stratify=digits, random_state=split_seed
    )
    train, val = train_test_split(
        train,
        test_size=val_fraction,
        stratify=digits[train],
        random_state=split_seed,
    )
    by_id = dict(zip(ids.tolist(), digits.tolist(), strict=True))

    def task(name: str, group: tuple[int, ...]) -> Task:
        def pick(s):
            return np.sort(s[np.isin([by_id[i] for i in s.tolist()], group)])

        return Task(name, group[0], pick(train), pick(val), pick(test))

    return Tasks(task("pretrain", PRETRAIN_DIGITS), task("finetune", FINETUNE_DIGITS))


def shift_augment(
    images: np.ndarray, rng: np.random.Generator, max_shift: int
) -> np.ndarray:
    """Random translation of every image by up to ``max_shift`` pixels (zero fill)."""
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]  # [n, h]
    cols = dx[:, None] + np.arange(w)[None, :]  # [n, w]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

Schedule = Literal["cosine", "constant"]


@dataclasses.dataclass(frozen=True)
class Optim:
    """Everything about a training stage except its learning rate and length."""

    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 1  # training augmentation: random translation, pixels


def lr_at(lr: float, epoch: int, epochs: int, schedule: Schedule) -> float:
    """Per-epoch learning rate: ``lr (1 + cos(π e / T)) / 2`` (cosine) or ``lr``."""
    if schedule == "cosine":
        return lr * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
    if schedule == "constant":
        return lr
    raise ValueError(f"schedule must be 'cosine' or 'constant'; got {schedule!r}.")


def sgd(
    trainable: dict,
    momentum: float,
    weight_decay: float,
    extra: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """PyTorch SGD direction (decay added to the gradient, then momentum), masked.

    The caller multiplies the result by ``-lr``. Frozen parameters get a zero
    update (``optax.set_to_zero``) and no optimizer state. ``extra`` (e.g. an
    L2-SP or EWC pull toward θ₀) is applied to the trainable parameters'
    gradients first.
    """
    inner = optax.chain(
        *([extra] if extra is not None else []),
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum),
    )
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform(
        {"train": inner, "frozen": optax.set_to_zero()}, labels
    )


def cross_entropy(model, batch: dict, reference: Any) -> tuple[jax.Array, dict]:
    """The default objective: ``Σ w_i CE_i / B`` (``flowjax.weighted_loss``, "mean").

    Objectives get the merged module in train mode, the batch (with
    ``"weight"``) and the stage's ``reference`` arrays (e.g. the pre-trained
    model, for a distillation term), and return ``(loss, metrics)``.
    """
    del reference
    losses = optax.softmax_cross_entropy_with_integer_labels(
        model(batch["image"]), batch["label"]
    )
    loss = flowjax.weighted_loss(losses, batch["weight"], reduction="mean")
    return loss, {"loss": loss, "loss_unweighted": jnp.mean(losses)}


Objective = Callable[[Any, dict, Any], tuple[jax.Array, dict]]

_STEPS: dict[tuple, tuple[optax.GradientTransformation, Callable]] = {}


def _compiled_step(
    graphdef: Any,
    trainable: dict,
    optim: Optim,
    objective: Objective,
    extra_tx: optax.GradientTransformation | None,
):
    """``(jitted tx.init, jitted step)`` for this model structure, mask, objective and extra transform."""
    key = (
        graphdef,
        tuple(jax.tree.leaves(trainable)),
        jax.tree.structure(trainable),
        optim.momentum,
        optim.weight_decay,
        objective,
        extra_tx,
    )
    if key not in _STEPS:
        tx = sgd(trainable, optim.momentum, optim.weight_decay, extra_tx)

        def step(params, stats, opt_state, batch, lr, reference):
            def loss_fn(p):
                model = M.merge(graphdef, p, stats, train=True)
                loss, metrics = objective(model, batch, reference)
                return loss, (M.batch_stats(model), metrics)

            (_, (new_stats, metrics)), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(params)
            direction, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, d: p - lr * d, params, direction)
            return params, new_stats, opt_state, metrics

        _STEPS[key] = (jax.jit(tx.init), jax.jit(step))
    return _STEPS[key]


def stage_rng(seed: int, stage: str) -> np.random.Generator:
    """The host RNG (shuffling, augmentation) of one stage of one seed."""
    return np.random.default_rng([seed, zlib.crc32(stage.encode())])


def train(
    net: M.Net,
    task: Task,
    *,
    trainable: M.Net,
    lr: float,
    epochs: int,
    schedule: Schedule,
    seed: int,
    stage: str,
    optim: Optim,
    weights: flowjax.WeightTable | None = None,
    objective: Objective = cross_entropy,
    extra_tx: optax.GradientTransformation | None = None,
    reference: Any = None,
) -> tuple[M.Net, dict]:
    """One training stage on ``task.train``; returns the new model and metrics.

    Every stage starts a fresh optimizer (as the official code does per
    phase). BatchNorm runs in train mode throughout, so running statistics
    update even where every parameter is frozen (linear probing).

    Args:
      net: the starting model.
      task: the task whose training split is used.
      trainable: a :class:`Net` of booleans (see ``model.head_mask``); only
        ``trainable.params`` is used.
      lr: base learning rate; ``schedule`` makes it per-epoch.
      epochs: passes over the training split.
      schedule: "cosine" (per epoch, eta_min 0) or "constant".
      seed: the run's seed; with ``stage`` it fixes shuffling and augmentation.
      stage: a name unique within the seed ("ft", "lp", "flow1", ...).
      optim: batch size, momentum, weight decay, augmentation.
      weights: per-example weights by id (FLOW); None means weight 1.
      objective: the loss (see :func:`cross_entropy`).
      extra_tx: an optax transformation chained before weight decay.
      reference: arrays passed to ``objective`` (jit arguments, never closed over).

    Returns:
      ``(net, {"loss": last epoch's mean objective, "loss_unweighted": ...})``.
    """
    tx_init, step = _compiled_step(
        net.graphdef, trainable.params, optim, objective, extra_tx
    )
    rng = stage_rng(seed, stage)
    params, stats = net.arrays
    opt_state = tx_init(params)
    last: list[dict] = []
    for epoch in range(epochs):
        lr_e = lr_at(lr, epoch, epochs, schedule)
        last = []
        for batch in task.batches(
            task.train, optim.batch_size, rng=rng, drop_remainder=True
        ):
            if weights is None:
                w = np.ones(len(batch["id"]), np.float32)
            else:
                w = flowjax.attach_weights(batch, weights)["weight"]
            inputs = {
                "image": shift_augment(batch["image"], rng, optim.max_shift),
                "label": batch["label"],
                "weight": w,
            }
            params, stats, opt_state, metrics = step(
                params, stats, opt_state, inputs, np.float32(lr_e), reference
            )
            last.append(metrics)
    summary = {k: float(np.mean([m[k] for m in last])) for k in last[0]} if last else {}
    return net._replace(params=params, stats=stats), summary


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


@functools.cache
def _logits_fn(graphdef: Any):
    def logits(params, stats, images):
        return M.merge(graphdef, params, stats, train=False)(images)

    return jax.jit(logits)


def predict(net: M.Net, task: Task, ids: np.ndarray, eval_batch: int = 256) -> dict:
    """Eval-mode predictions on ``ids``: ``{"id", "label", "pred"}`` (numpy)."""
    fn = _logits_fn(net.graphdef)
    out: dict[str, list] = {"id": [], "label": [], "pred": []}
    for batch in task.batches(ids, eval_batch):
        n = len(batch["id"])
        images = np.zeros((eval_batch, *batch["image"].shape[1:]), np.float32)
        images[:n] = batch["image"]
        logits = np.asarray(fn(*net.arrays, images))[:n]
        out["id"].append(batch["id"])
        out["label"].append(batch["label"])
        out["pred"].append(logits.argmax(-1))
    return {k: np.concatenate(v) for k, v in out.items()}


def accuracy(net: M.Net, task: Task, ids: np.ndarray) -> float:
    """Eval-mode top-1 accuracy on ``ids`` of ``task``."""
    p = predict(net, task, ids)
    return float(np.mean(p["pred"] == p["label"]))


def swap_task_parts(finetuned: M.Net, pretrained: M.Net, task_specific: M.Net) -> M.Net:
    """The fine-tuned model with every task-specific array taken from ``pretrained``.

    ``task_specific`` is a :class:`Net` of booleans (``model.task_specific_mask``):
    True takes the pre-trained array (head, BatchNorm scale / bias / running
    statistics), False keeps the fine-tuned one (the shared body).
    """

    def pick(tree_mask, ft, pre):
        return jax.tree.map(lambda m, f, p: p if m else f, tree_mask, ft, pre)

    return finetuned._replace(
        params=pick(task_specific.params, finetuned.params, pretrained.params),
        stats=pick(task_specific.stats, finetuned.stats, pretrained.stats),
    )


def pretraining_accuracy(finetuned: M.Net, pretrained: M.Net, task: Task) -> float:
    """Accuracy on ``task.test`` (digits 0-4) after swapping back the task-specific parts."""
    restored = swap_task_parts(finetuned, pretrained, M.task_specific_mask(pretrained))
    return accuracy(restored, task, task.test)


@functools.cache
def _example_loss(graphdef: Any):
    """``loss(arrays, example)``: eval-mode CE of ONE example (for the pre-pass)."""

    def loss(arrays, example):
        params, stats = arrays
        model = M.merge(graphdef, params, stats, train=False)
        logits = model(example["image"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])

    return loss


def example_losses(net: M.Net, task: Task, ids: np.ndarray) -> flowjax.LossTable:
    """Eval-mode per-example CE of ``net`` on ``ids``: ``flowjax.per_example_losses``."""
    rows = (
        {"id": b["id"], "image": b["image"], "label": b["label"]}
        for b in task.batches(ids, 128)
    )
    return flowjax.per_example_losses(
        _example_loss(net.graphdef), net.arrays, rows, progress=False
    )
