"""The mechanics of the digits protocol: data, one training stage, evaluation, the swap.

The methods (:mod:`experiments.digits.methods`) compose these; nothing here knows about a
particular method.

* Data: the TFDS ``flowjax_digits`` dataset (:mod:`experiments.digits.dataset`,
  ``array_record``, read without TensorFlow) is built once into a data
  directory (:func:`data_dir`: ``$FLOWJAX_DATA_DIR`` or the git-ignored
  ``.cache/tfds`` under the repository root). Each split is read once into
  memory with ``flowjax.ArraySource.from_source`` and every stage is fed by
  ``flowjax.batches``: training batches are shuffled with a seed and pass
  through a ``map_fn`` that divides the pixels by 16 and shifts the image by
  up to ±1 pixel with the example's own generator (a function of ``(seed,
  epoch, id)`` only); evaluation and the pre-pass use the same path with the
  normalisation alone, in order. Batches are dicts ``{"id", "image",
  "label"}`` keyed by the dataset's example id (the row of
  ``load_digits()``), labels of the task (``digit - offset``).
* Tasks: the pre-training task is digits 0-4, the fine-tuning task digits 5-9
  with labels 0-4 (a new head). Test = the dataset's fixed stratified
  ``test`` split (20 %); validation = a stratified 20 % of its ``train``
  split (:func:`make_tasks`), for learning-rate selection only.
* Training: :func:`train` runs one stage through ``flowjax.fit`` with a
  ``flowjax.make_train_step`` step (SGD with momentum and weight decay,
  PyTorch-style, built by the caller's ``make_tx``; per-epoch cosine or
  constant LR, :func:`stage_tx`), with a per-example weight on every example
  (1 unless a ``WeightTable`` is given) and the official vision reduction
  ``Σ w_i ℓ_i / B``. The learning rate lives in the optimiser state, so every
  LR of a grid, every seed and every stage of one kind share one compiled
  program. A :class:`Stage` gives the stage a checkpoint directory (it then
  resumes bit for bit after a kill) and an evaluation every N steps (its
  curve). The last partial training batch of an epoch is dropped (one
  shape). A seed's
  training stream of a task (:func:`train_stream`) is drawn once and shared
  by every stage and method of that seed: the methods of one seed see the
  same batches in the same order with the same augmentation (common random
  numbers; paired differences between methods then carry no data noise).
* Evaluation: :func:`accuracy` in eval mode (running statistics), padded to
  one batch shape. :func:`pretraining_accuracy` puts the pre-trained head and
  the pre-trained BatchNorm (scale, bias, running mean and variance) back
  into the fine-tuned body with ``flowjax.swap_task_parts`` before measuring
  the pre-training task, as the paper and the official code do.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flowjax
from experiments.digits import model as M
from experiments.training import lr_factor, stage_tx  # noqa: F401 (part of this module's API)

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
FINETUNE_DIGITS = (5, 6, 7, 8, 9)
REPO_ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def data_dir() -> Path:
    """The TFDS data directory: ``$FLOWJAX_DATA_DIR``, else ``<repo>/.cache/tfds`` (git-ignored)."""
    env = os.environ.get("FLOWJAX_DATA_DIR")
    return Path(env) if env else REPO_ROOT / ".cache" / "tfds"


@functools.cache
def load_splits(directory: str | None = None) -> dict[str, flowjax.ArraySource]:
    """The dataset's ``train`` and ``test`` splits, built once (offline) and read once into memory."""
    from experiments.digits import dataset

    sources = dataset.build(str(data_dir() if directory is None else directory))
    return {
        split: flowjax.ArraySource.from_source(src) for split, src in sources.items()
    }


def normalise(example: dict, rng: np.random.Generator) -> dict:
    """``map_fn`` for evaluation: pixels 0..16 (uint8) to float32 in [0, 1]."""
    del rng
    return {
        "image": example["image"].astype(np.float32) / 16.0,
        "label": example["label"],
    }


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` [H, W, C] translated by ``(dy, dx)`` pixels, zero fill."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def augment(max_shift: int) -> Callable[[dict, np.random.Generator], dict]:
    """``map_fn`` for training: :func:`normalise`, then a random shift in ``[-max_shift, max_shift]²``."""

    def fn(example: dict, rng: np.random.Generator) -> dict:
        out = normalise(example, rng)
        if max_shift:
            dy, dx = rng.integers(-max_shift, max_shift + 1, size=2).tolist()
            out["image"] = shift(out["image"], dy, dx)
        return out

    return fn


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One task: an in-memory ``flowjax.ArraySource`` per split, task labels ``digit - offset``."""

    name: str
    offset: int
    sources: dict[str, flowjax.ArraySource]
    _arrays: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def train(self) -> np.ndarray:
        return self.ids("train")

    @property
    def val(self) -> np.ndarray:
        return self.ids("val")

    @property
    def test(self) -> np.ndarray:
        return self.ids("test")

    def ids(self, split: str) -> np.ndarray:
        """The split's example ids (ascending)."""
        return self.sources[split].columns["id"]

    def batches(self, split: str, batch_size: int, **kw) -> Any:
        """``flowjax.batches`` over the split (normalised, in order unless ``shuffle``)."""
        kw.setdefault("map_fn", normalise)
        return flowjax.batches(self.sources[split], batch_size, shard=(0, 1), **kw)

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """The whole split, normalised, in id order (read through :meth:`batches` once, then kept)."""
        if split not in self._arrays:
            rows = list(self.batches(split, 4096))
            self._arrays[split] = {
                k: np.concatenate([b[k] for b in rows]) for k in rows[0]
            }
        return self._arrays[split]


@dataclasses.dataclass(frozen=True)
class Tasks:
    pretrain: Task
    finetune: Task


def make_tasks(
    split_seed: int = 0, val_fraction: float = 0.2, directory: str | None = None
) -> Tasks:
    """The two tasks with train / validation / test sources.

    Test is the dataset's fixed stratified ``test`` split. Validation is a
    stratified (by digit) ``val_fraction`` of its ``train`` split, seed
    ``split_seed``; the split is the same for every seed of the experiment.
    """
    from sklearn.model_selection import train_test_split

    splits = load_splits(directory)
    cols = splits["train"].columns
    rows = np.arange(len(cols["id"]))
    train_rows, val_rows = train_test_split(
        rows, test_size=val_fraction, stratify=cols["label"], random_state=split_seed
    )
    parts = {
        "train": (cols, np.sort(train_rows)),
        "val": (cols, np.sort(val_rows)),
        "test": (splits["test"].columns, np.arange(len(splits["test"]))),
    }

    def task(name: str, group: tuple[int, ...]) -> Task:
        sources = {}
        for split, (c, r) in parts.items():
            r = r[np.isin(c["label"][r], group)]
            sources[split] = flowjax.ArraySource(
                {
                    "id": c["id"][r],
                    "image": c["image"][r],
                    "label": (c["label"][r] - group[0]).astype(np.int32),
                }
            )
        return Task(name, group[0], sources)

    return Tasks(task("pretrain", PRETRAIN_DIGITS), task("finetune", FINETUNE_DIGITS))


_STREAMS: dict[tuple, list[dict]] = {}


def train_stream(task: Task, seed: int, epochs: int, optim: Optim) -> list[dict]:
    """The shuffled, augmented training batches of ``task`` for one seed (drawn once, kept).

    ``flowjax.batches`` over ``task``'s train split: ``epochs`` epochs,
    ``optim.batch_size`` per batch, last partial batch dropped, shuffled and
    augmented (:func:`augment`) from a seed derived from ``(seed, task)``.
    """
    key = (task, seed, epochs, optim.batch_size, optim.max_shift)
    if key not in _STREAMS:
        stream = flowjax.batches(
            task.sources["train"],
            optim.batch_size,
            shuffle=True,
            seed=zlib.crc32(f"{task.name}:{seed}".encode()),
            epochs=epochs,
            drop_remainder=True,
            map_fn=augment(optim.max_shift),
            shard=(0, 1),
        )
        _STREAMS[key] = list(stream)
    return _STREAMS[key]


def clear_streams() -> None:
    """Forgets the kept training streams (call when a seed is done)."""
    _STREAMS.clear()


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


MakeTx = Callable[..., optax.GradientTransformation]
"""``make_tx(trainable, momentum, weight_decay, extra) -> tx``: the stage's optimizer
direction (:func:`experiments.digits.methods.optimizer`), frozen where ``trainable`` is
False, with ``extra`` (a regulariser or None) first in the chain."""


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


@functools.cache
def step_objective(graphdef: Any, objective: Objective):
    """``objective`` in ``flowjax.make_train_step``'s form, for one model structure.

    ``fn(params, batch, stats, frozen) -> (loss, (new_stats, metrics))``: the
    module is merged in train mode (BatchNorm normalises with the batch and
    updates its running statistics, returned as the aux output);
    ``frozen = (reference,)``.
    """

    def fn(params, batch, stats, frozen):
        model = M.merge(graphdef, params, stats, train=True)
        loss, metrics = objective(model, batch, frozen[0])
        return loss, (M.batch_stats(model), metrics)

    return fn


@dataclasses.dataclass(frozen=True)
class Stage:
    """Where a stage checkpoints and what it evaluates while it trains (both optional).

    ``checkpoint_dir``: the stage's own directory (``flowjax.fit`` saves
    there every ``checkpoint_every`` steps and at the end, and resumes from
    it); ``run_info``: JSON data naming the stage's inputs (compared on
    resume). ``eval_fn(net) -> {name: float}`` is called every ``eval_every``
    steps and at the end; its records are the stage's curve.
    """

    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    run_info: dict | None = None
    eval_fn: Callable[[Any], dict] | None = None
    eval_every: int = 0
    log: Callable[[str], None] = print


def train(
    net: M.Net,
    task: Task,
    *,
    trainable: Any,
    lr: float,
    epochs: int,
    schedule: Schedule,
    seed: int,
    optim: Optim,
    make_tx: MakeTx,
    weights: flowjax.WeightTable | None = None,
    objective: Objective = cross_entropy,
    extra: optax.GradientTransformation | None = None,
    reference: Any = None,
    stage: Stage = Stage(),
) -> tuple[M.Net, flowjax.FitResult]:
    """One training stage on ``task``'s train split, through ``flowjax.fit``.

    Every stage starts a fresh optimizer (as the official code does per
    phase). BatchNorm runs in train mode throughout, so running statistics
    update even where every parameter is frozen (linear probing). The step
    is ``flowjax.make_train_step`` over :func:`step_objective` with ‖θ−θ₀‖
    measured from the stage's starting parameters; programs are shared
    between stages, seeds and learning rates (the LR lives in the optimiser
    state, the regularisers' θ₀ and Fisher too).

    Args:
      net: the starting model.
      task: the task whose training split is used.
      trainable: a pytree of bools over ``net.params``
        (``flowjax.trainable_mask``).
      lr: base learning rate; ``schedule`` makes it per-epoch.
      epochs: passes over the training split.
      schedule: "cosine" (per epoch, eta_min 0) or "constant".
      seed: the run's seed: it fixes the data stream (:func:`train_stream`).
      optim: batch size, momentum, weight decay, augmentation.
      make_tx: builds the optimizer direction from the mask, momentum, decay and
        ``extra`` (:data:`MakeTx`).
      weights: per-example weights by id (FLOW); None means weight 1.
      objective: the loss (see :func:`cross_entropy`).
      extra: an optax transformation chained before weight decay (L2-SP, EWC).
      reference: arrays passed to ``objective`` (jit arguments, never closed over).
      stage: checkpointing and evaluation (:class:`Stage`).

    Returns:
      ``(net, fit_result)``: the trained model and ``flowjax.fit``'s result
      (its ``history`` is the stage's curve when ``stage.eval_fn`` is set).
    """
    stream = train_stream(task, seed, epochs, optim)
    per_epoch = len(stream) // epochs
    tx = stage_tx(
        make_tx(trainable, optim.momentum, optim.weight_decay, extra),
        lr,
        epochs,
        per_epoch,
        schedule,
    )
    step = flowjax.make_train_step(
        step_objective(net.graphdef, objective),
        tx,
        anchor=net.params,
        frozen=(reference,),
        has_aux=True,
    )
    state = flowjax.init_train_state(net.params, tx, rng=seed, model_state=net.stats)

    def data(start: int):
        for batch in stream[start:]:
            if weights is None:
                w = np.ones(len(batch["id"]), np.float32)
            else:
                w = flowjax.attach_weights(batch, weights)["weight"]
            yield {"image": batch["image"], "label": batch["label"], "weight": w}

    def as_net(s: flowjax.TrainState) -> M.Net:
        return net._replace(params=s.params, stats=s.model_state)

    eval_fn = None if stage.eval_fn is None else (lambda s: stage.eval_fn(as_net(s)))
    every = stage.eval_every if eval_fn is not None else 0
    result = flowjax.fit(
        step,
        state,
        data,
        num_steps=len(stream),
        eval_fn=eval_fn,
        eval_every=every,
        log_every=every or len(stream),
        checkpoint_dir=stage.checkpoint_dir,
        checkpoint_every=stage.checkpoint_every,
        keep=1,
        run_info=stage.run_info,
        progress=False,
        log=stage.log,
    )
    return as_net(result.state), result


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


@functools.cache
def _logits_fn(graphdef: Any):
    def logits(params, stats, images):
        return M.merge(graphdef, params, stats, train=False)(images)

    return jax.jit(logits)


def logits(net: M.Net, images: np.ndarray, eval_batch: int = 256) -> np.ndarray:
    """Eval-mode logits of ``images``, in padded batches of one shape."""
    fn = _logits_fn(net.graphdef)
    out = []
    for start in range(0, len(images), eval_batch):
        chunk = images[start : start + eval_batch]
        padded = np.zeros((eval_batch, *images.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(fn(*net.arrays, padded))[: len(chunk)])
    return np.concatenate(out)


def predict(net: M.Net, task: Task, split: str, ids: np.ndarray | None = None) -> dict:
    """Eval-mode predictions on a split (or the given ids of it): ``{"id", "label", "pred"}``."""
    data = task.arrays(split)
    if ids is not None:
        rows = np.searchsorted(data["id"], ids)
        if not np.array_equal(data["id"][np.minimum(rows, len(data["id"]) - 1)], ids):
            raise ValueError(f"some ids are not in the {task.name} {split} split.")
        data = {k: v[rows] for k, v in data.items()}
    pred = logits(net, data["image"]).argmax(-1)
    return {"id": data["id"], "label": data["label"], "pred": pred}


def accuracy(net: M.Net, task: Task, split: str) -> float:
    """Eval-mode top-1 accuracy on a split of ``task``."""
    p = predict(net, task, split)
    return float(np.mean(p["pred"] == p["label"]))


def restore_task_parts(finetuned: M.Net, pretrained: M.Net) -> M.Net:
    """``flowjax.swap_task_parts``: the pre-trained head and BatchNorm put back into the fine-tuned body.

    Head, BatchNorm scale / bias and running statistics come from
    ``pretrained``, the shared body (convolutions, dense layer) from
    ``finetuned``. Returns a model with the pre-trained structure.
    """
    state = flowjax.swap_task_parts(
        M.state(finetuned), M.state(pretrained), M.modules(*M.task_specific(pretrained))
    )
    return M.from_state(pretrained.graphdef, state)


def pretraining_accuracy(finetuned: M.Net, pretrained: M.Net, task: Task) -> float:
    """Accuracy on ``task``'s test split (digits 0-4) after :func:`restore_task_parts`."""
    return accuracy(restore_task_parts(finetuned, pretrained), task, "test")


@functools.cache
def _example_loss(graphdef: Any):
    """``loss(arrays, example)``: eval-mode CE of ONE example (the per-example Fisher)."""

    def loss(arrays, example):
        params, stats = arrays
        model = M.merge(graphdef, params, stats, train=False)
        logits = model(example["image"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])

    return loss


@functools.cache
def _batch_losses(graphdef: Any):
    """``losses(arrays, batch) -> [B]``: eval-mode CE of a batch (the pre-pass's fast form)."""

    def losses(arrays, batch):
        params, stats = arrays
        model = M.merge(graphdef, params, stats, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(
            model(batch["image"]), batch["label"]
        )

    return losses


def example_losses(net: M.Net, task: Task, split: str) -> flowjax.LossTable:
    """Eval-mode per-example CE of ``net`` on a split: ``flowjax.per_example_losses``.

    The batched form (``batched=True``): the model runs on the batch as it is written,
    not vmapped over single examples; eval-mode BatchNorm keeps rows independent.
    """
    return flowjax.per_example_losses(
        _batch_losses(net.graphdef),
        net.arrays,
        task.batches(split, 128),
        batched=True,
        progress=False,
    )


def fisher(net: M.Net, task: Task, split: str = "train") -> dict:
    """Empirical diagonal Fisher of ``net.params`` (eval mode) on a split: ``flowjax.diagonal_fisher``."""
    f = flowjax.diagonal_fisher(
        _example_loss(net.graphdef),
        net.arrays,
        task.batches(split, 128),
        kind="empirical",
        progress=False,
    )
    # Plain host arrays: the optimizer state then has the parameters' (default)
    # placement and the compiled steps are reused.
    return jax.tree.map(np.asarray, f[0])
