"""The mechanics of the vision protocol: models as arrays, one training stage on ``flowjax.fit``, evaluation, the swap.

* Models: a :class:`Net` is ``(graphdef, params, stats)`` of a
  ``flowjax.models.ResNet`` (``nnx.Param`` / ``nnx.BatchStat`` as plain dicts).
* Training (:func:`train`): ``flowjax.make_train_step`` over the train-mode model (BatchNorm
  on batch statistics, its running statistics updated and carried as the state's
  ``model_state``), the official vision reduction ``Σ w_i ℓ_i / B``, PyTorch-style SGD with
  a per-epoch schedule (:mod:`experiments.training`), data parallel over every device of
  every host (``flowjax.default_mesh()``), checkpointed and resumable through
  ``flowjax.fit``. Batches come from ``flowjax.datasets.image_batches`` (sharded over
  processes, seeded by ``(seed, epoch, id)``), so a resumed stage sees the same batches.
* Evaluation (:func:`accuracy`): eval mode, padded to one batch shape, counts summed over
  processes. :func:`restore_task_parts` puts the pre-trained head and every BatchNorm
  back into a fine-tuned body (``flowjax.swap_task_parts`` with
  ``flowjax.models.task_parts``) for the ImageNet-1K retention metric.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flowjax
from experiments.training import Schedule, stage_tx, torch_sgd
from flowjax import datasets


class Net(NamedTuple):
    """A model as data: static structure plus two dicts of arrays."""

    graphdef: Any
    params: dict
    stats: dict


def split(model: nnx.Module) -> Net:
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return Net(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats))


def merge(graphdef: Any, params: dict, stats: dict, *, train: bool) -> nnx.Module:
    model = nnx.merge(graphdef, params, stats)
    model.train() if train else model.eval()
    return model


def state(net: Net) -> dict:
    return {"params": net.params, "stats": net.stats}


def from_state(graphdef: Any, s: dict) -> Net:
    return Net(graphdef, s["params"], s["stats"])


def head_mask(params: dict, trainable_head_only: bool) -> Any:
    """Trainable: the head ``fc`` only, or everything."""
    if trainable_head_only:
        return flowjax.trainable_mask(params, lambda path, _: path[0] == "fc")
    return flowjax.trainable_mask(params, lambda path, _: True)


@functools.cache
def step_objective(graphdef: Any):
    """``fn(params, batch, stats) -> (Σ w_i CE_i / B, (new_stats, metrics))`` in train mode."""

    def fn(params, batch, stats):
        model = merge(graphdef, params, stats, train=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            model(batch["image"]).astype(jnp.float32), batch["label"]
        )
        loss = flowjax.weighted_loss(losses, batch["weight"], reduction="mean")
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return loss, (new_stats, {"loss_unweighted": jnp.mean(losses)})

    return fn


@dataclasses.dataclass(frozen=True)
class Stage:
    """Where a stage checkpoints and what it evaluates while it trains (see digits' Stage)."""

    checkpoint_dir: Any = None
    checkpoint_every: int = 0
    run_info: dict | None = None
    eval_fn: Callable[[Net], dict] | None = None
    eval_every: int = 0
    log: Callable[[str], None] = print


def image_data(source: Any, cfg: Any, batch_size: int, *, train: bool, **options):
    """``flowjax.datasets.image_batches`` of ``source`` with the run's image settings.

    ``batch_size`` is global: each process takes ``batch_size // process_count`` rows of
    its share. ``options`` override the dataset's transform (``cfg.transform``) or set
    the order (``shuffle``, ``epochs``, ``seed``, ...).
    """
    return datasets.image_batches(
        source,
        batch_size // jax.process_count(),
        train=train,
        image_size=cfg.image_size,
        num_threads=cfg.num_threads,
        dtype=cfg.dtype,
        **{**dict(cfg.transform), **options},
    )


def train(
    net: Net,
    source: Any,
    *,
    head_only: bool,
    lr: float,
    epochs: int,
    schedule: Schedule,
    seed: int,
    cfg: Any,
    weights: flowjax.WeightTable | None = None,
    extra: optax.GradientTransformation | None = None,
    stage: Stage = Stage(),
    mesh: Any = None,
) -> tuple[Net, flowjax.FitResult]:
    """One stage on ``source`` (every stage starts a fresh optimiser, as the official code)."""
    data = image_data(source, cfg, cfg.batch_size, train=True, seed=seed, epochs=epochs)
    steps = len(data)
    if steps == 0:
        raise ValueError(
            f"{len(source)} training examples give no batch of {cfg.batch_size}: lower batch_size."
        )
    per_epoch = steps // epochs
    trainable = head_mask(net.params, head_only)
    tx = stage_tx(
        torch_sgd(trainable, cfg.momentum, cfg.weight_decay, extra),
        lr,
        epochs,
        per_epoch,
        schedule,
    )
    step = flowjax.make_train_step(
        step_objective(net.graphdef), tx, anchor=net.params, has_aux=True, mesh=mesh
    )
    train_state = flowjax.init_train_state(
        net.params, tx, rng=seed, model_state=net.stats, mesh=mesh
    )

    def batches(start: int):
        for batch in data.from_batch(start):
            if weights is None:
                w = np.ones(len(batch["id"]), np.float32)
            else:
                w = flowjax.attach_weights(batch, weights)["weight"]
            yield {"image": batch["image"], "label": batch["label"], "weight": w}

    def as_net(s: flowjax.TrainState) -> Net:
        return net._replace(params=s.params, stats=s.model_state)

    eval_fn = None if stage.eval_fn is None else (lambda s: stage.eval_fn(as_net(s)))
    every = stage.eval_every * per_epoch if eval_fn is not None else 0
    result = flowjax.fit(
        step,
        train_state,
        batches,
        num_steps=steps,
        eval_fn=eval_fn,
        eval_every=every,
        log_every=every or steps,
        checkpoint_dir=stage.checkpoint_dir,
        checkpoint_every=stage.checkpoint_every * per_epoch,
        keep=1,
        run_info=stage.run_info,
        progress=jax.process_index() == 0,
        log=stage.log,
    )
    return as_net(result.state), result


@functools.cache
def _logits_fn(graphdef: Any):
    return jax.jit(
        lambda params, stats, images: merge(graphdef, params, stats, train=False)(
            images
        )
    )


def predictions(net: Net, source: Any, cfg: Any, imagenet: bool = False) -> dict:
    """Eval-mode predictions on ``source`` (this process's share): ``{"id", "label", "pred"}``.

    The evaluation transform: the dataset's (target) or ImageNet's ``Resize(eval_resize)``
    + ``CenterCrop(image_size)`` with ImageNet normalisation; batches padded to one shape.
    """
    if imagenet:  # ImageNet's own evaluation transform, not the target dataset's
        data = datasets.image_batches(
            source,
            cfg.eval_batch_size // jax.process_count(),
            train=False,
            image_size=cfg.image_size,
            resize_size=cfg.eval_resize,
            num_threads=cfg.num_threads,
            dtype=cfg.dtype,
        )
    else:
        data = image_data(source, cfg, cfg.eval_batch_size, train=False)
    fn = _logits_fn(net.graphdef)
    rows = cfg.eval_batch_size // jax.process_count()
    out = {"id": [], "label": [], "pred": []}
    for batch in data:
        n = len(batch["id"])
        images = batch["image"]
        if n < rows:
            pad = np.zeros((rows - n, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, pad])
        logits = np.asarray(fn(net.params, net.stats, images))[:n]
        out["id"].append(batch["id"])
        out["label"].append(batch["label"])
        out["pred"].append(logits.argmax(-1))
    return {
        k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()
    }


def accuracy(net: Net, source: Any, cfg: Any, imagenet: bool = False) -> float:
    """Top-1 accuracy over every process's share (counts summed across processes)."""
    p = predictions(net, source, cfg, imagenet)
    counts = np.array([np.sum(p["pred"] == p["label"]), len(p["id"])], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    if counts[1] == 0:
        raise ValueError(f"{source!r} has no examples to evaluate.")
    return float(counts[0] / counts[1])


def restore_task_parts(finetuned: Net, pretrained: Net, parts) -> Net:
    """The pre-trained head and every BatchNorm put back into the fine-tuned body.

    ``parts`` is ``flowjax.models.task_parts(model)``, a filter on the model's own paths;
    :func:`state` nests them under ``"params"`` / ``"stats"``.
    """
    swapped = flowjax.swap_task_parts(
        state(finetuned), state(pretrained), lambda path, leaf: parts(path[1:], leaf)
    )
    return from_state(pretrained.graphdef, swapped)


@functools.cache
def _batch_losses(graphdef: Any):
    """``losses(arrays, batch) -> [B]``: eval-mode CE of a batch (the pre-pass's fast form)."""

    def losses(arrays, batch):
        params, stats = arrays
        logits = merge(graphdef, params, stats, train=False)(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["label"]
        )

    return losses


def example_losses(
    net: Net, source: Any, cfg: Any, *, augment: bool, seed: int
) -> flowjax.LossTable:
    """Eval-mode per-example CE over ``source`` in one ordered pass (``flowjax.per_example_losses``).

    ``augment``: with the training augmentations (the official ``compute_temp.py``), else
    the evaluation transform.
    """
    data = image_data(
        source,
        cfg,
        cfg.eval_batch_size,
        train=augment,
        shuffle=False,
        drop_remainder=False,
        seed=seed,
    )
    return flowjax.per_example_losses(
        _batch_losses(net.graphdef),
        (net.params, net.stats),
        data,
        batched=True,
        progress=False,
    )
