"""The mechanics of the task sequence: tasks from the digits dataset, the network, one stage, evaluation.

* Data: the TFDS ``flowjax_digits`` dataset of :mod:`experiments.digits.dataset`, read
  through :func:`experiments.digits.protocol.load_splits` (built once into
  ``$FLOWJAX_DATA_DIR`` or ``.cache/tfds``). Task ``t`` holds digits ``2t`` and ``2t + 1``
  of the dataset's ``train`` split (training) and ``test`` split (the accuracy matrix).
  Batches come from ``flowjax.batches`` (seeded shuffling; pixels / 16) and carry
  ``{"id", "image", "label" (the digit), "task"}``.
* Settings: ``"task"`` (task-incremental): the head's 10 outputs are 5 two-way heads,
  ``2t, 2t + 1`` being task t's, and a row is scored by its own task's head (the task id is
  known at test time); ``"class"`` (class-incremental): one 10-way head, every row scored
  over all 10 digits, no task id at test time.
* Network (:class:`Net`): 3×3 convolutions with ``channels`` (the second with stride 2),
  a dense layer ``fc`` of ``hidden`` units, the head ``head`` (10 outputs); ReLU between.
  No BatchNorm (so that every method sees the same function of its parameters).
* A stage (:func:`train`) is ``flowjax.make_train_step`` + ``flowjax.fit`` with
  PyTorch-style SGD (momentum, constant LR, :mod:`experiments.training`), frozen leaves
  through ``flowjax.train_only``, an optional regulariser first in the chain and an
  optional transform last (PackNet's ownership mask). Each stage checkpoints into its own
  directory named by a digest of everything that determines it, so a rerun restores
  finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flowjax
from experiments.digits import protocol as digits_protocol
from experiments.training import stage_tx, torch_sgd

NUM_CLASSES = 10


# -- data ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Task ``index``: digits ``2 index, 2 index + 1``; one ``flowjax.ArraySource`` per split."""

    index: int
    sources: dict[str, flowjax.ArraySource]

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """The whole split as arrays (images in [0, 1]), in id order."""
        c = self.sources[split].columns
        return {
            "id": c["id"],
            "image": c["image"].astype(np.float32) / 16.0,
            "label": c["label"],
            "task": c["task"],
        }

    def batches(self, split: str, batch_size: int, **kw):
        return flowjax.batches(
            self.sources[split], batch_size, shard=(0, 1), map_fn=_normalise, **kw
        )


def _normalise(example: dict, rng: np.random.Generator) -> dict:
    del rng
    return {
        "image": example["image"].astype(np.float32) / 16.0,
        "label": example["label"],
        "task": example["task"],
    }


def make_tasks(num_tasks: int, directory: str | None = None) -> list[Task]:
    """Tasks ``0..num_tasks-1`` of two digits each, from the digits dataset's splits."""
    if not 2 <= num_tasks <= NUM_CLASSES // 2:
        raise ValueError(f"num_tasks must be in [2, 5]; got {num_tasks}.")
    splits = digits_protocol.load_splits(directory)
    tasks = []
    for t in range(num_tasks):
        sources = {}
        for split, src in splits.items():
            c = src.columns
            rows = np.flatnonzero(np.isin(c["label"], (2 * t, 2 * t + 1)))
            sources[split] = flowjax.ArraySource(
                {
                    "id": c["id"][rows],
                    "image": c["image"][rows],
                    "label": c["label"][rows].astype(np.int32),
                    "task": np.full(len(rows), t, np.int32),
                }
            )
        tasks.append(Task(t, sources))
    return tasks


def train_stream(task: Task, seed: int, epochs: int, batch_size: int) -> list[dict]:
    """``epochs`` shuffled epochs of ``task``'s training split (last partial batch dropped)."""
    return list(
        task.batches(
            "train",
            batch_size,
            shuffle=True,
            seed=zlib.crc32(f"task{task.index}:{seed}".encode()),
            epochs=epochs,
            drop_remainder=True,
        )
    )


# -- the network ---------------------------------------------------------------------


class Net(nnx.Module):
    """conv(3×3, c₁) → ReLU → conv(3×3, c₂, stride 2) → ReLU → fc → ReLU → head (10)."""

    def __init__(self, channels: tuple[int, int], hidden: int, *, rngs: nnx.Rngs):
        c1, c2 = channels
        self.conv1 = nnx.Conv(1, c1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), (2, 2), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * c2, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array, task: int | None = None) -> jax.Array:
        del task  # one network for every task; the head's columns are selected outside
        h = nnx.relu(self.conv1(x))
        h = nnx.relu(self.conv2(h))
        return self.head(nnx.relu(self.fc(h.reshape(h.shape[0], -1))))


class Model(NamedTuple):
    """A network split for ``jax.jit``: its graph definition and its parameters (a plain dict)."""

    graphdef: Any
    params: dict

    @classmethod
    def init(cls, channels: tuple[int, int], hidden: int, seed: int) -> Model:
        """A fresh :class:`Net` from ``seed`` (one compiled initialiser for every seed)."""
        graphdef, init = _initializer(tuple(channels), hidden)
        return cls(graphdef, init(jax.random.key(seed)))

    @classmethod
    def of(cls, module: nnx.Module) -> Model:
        graphdef, params = nnx.split(module, nnx.Param)
        return cls(graphdef, nnx.to_pure_dict(params))

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


@functools.cache
def _initializer(channels: tuple[int, int], hidden: int):
    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: Net(channels, hidden, rngs=nnx.Rngs(0)))
    )

    @jax.jit
    def init(key):
        net = Net(channels, hidden, rngs=nnx.Rngs(key))
        return nnx.to_pure_dict(nnx.state(net, nnx.Param))

    return graphdef, init


def task_logits(logits: jax.Array, task: jax.Array, setting: str, step: int = 2):
    """The logits a row is scored with, and the offset of its labels.

    ``"task"``: the row's own task's ``step`` outputs (labels ``digit - 2t``); ``"class"``:
    all outputs (labels = digits). A progressive column has only its task's outputs
    (``logits.shape[-1] == step``) and is returned as it is.
    """
    if setting == "class" or logits.shape[-1] == step:
        offset = 0 if setting == "class" else step * task
        return logits, offset
    cols = step * task[:, None] + jnp.arange(step)[None]
    return jnp.take_along_axis(logits, cols, axis=1), step * task


# -- one stage -----------------------------------------------------------------------

Objective = Callable[..., tuple[jax.Array, dict]]
"""``objective(module, batch, frozen, task, setting) -> (loss, metrics)``; ``task`` and
``setting`` are trace-time constants."""


def cross_entropy(logits: jax.Array, batch: dict, setting: str) -> jax.Array:
    """Per-example CE of every row of ``batch`` under ``setting``'s scoring."""
    z, offset = task_logits(logits, batch["task"], setting)
    return optax.softmax_cross_entropy_with_integer_labels(z, batch["label"] - offset)


def digest(info: dict) -> str:
    """A short content address of JSON data (a stage's inputs)."""
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def step_objective(graphdef: Any, objective: Objective, task: int, setting: str):
    """``objective(module, batch, frozen, task, setting)`` as ``make_train_step``'s ``fn(params, batch, frozen)``."""

    def fn(params, batch, frozen):
        module = nnx.merge(graphdef, params)
        return objective(module, batch, frozen, task, setting)

    return fn


def train(
    model: Model,
    stream: list[dict],
    *,
    objective: Objective,
    task: int | None,
    setting: str,
    trainable: Any,
    lr: float,
    momentum: float,
    epochs: int,
    checkpoint_dir: Path,
    run_info: dict,
    extra: optax.GradientTransformation | None = None,
    last: optax.GradientTransformation | None = None,
    frozen: Any = None,
    weights: flowjax.WeightTable | None = None,
    opt_state: Callable[[Any], Any] | None = None,
    checkpoint_every: int = 0,
) -> tuple[Model, flowjax.FitResult]:
    """One stage on ``stream`` through ``flowjax.fit``; returns the trained model and the fit result.

    The optimiser is ``torch_sgd`` (momentum, no decay; ``extra`` first) frozen where
    ``trainable`` is False, scaled by ``-lr``, then ``last``. ``opt_state(fresh)`` may
    replace the fresh optimiser state (SI carries its importance across tasks).
    Batches get ``"weight"`` from ``weights`` (FLOW) where they have no weight yet.
    """
    direction = torch_sgd(trainable, momentum, 0.0, extra)
    tx = stage_tx(direction, lr, epochs, max(len(stream) // epochs, 1), "constant")
    if last is not None:
        tx = optax.chain(tx, last)
    step = flowjax.make_train_step(
        step_objective(model.graphdef, objective, task, setting),
        tx,
        anchor=model.params,
        frozen={} if frozen is None else frozen,
    )
    state = flowjax.init_train_state(model.params, tx, rng=run_info.get("seed", 0))
    if opt_state is not None:
        state = state._replace(opt_state=opt_state(state.opt_state))

    def data(start: int):
        for batch in stream[start:]:
            if "weight" in batch:
                yield batch
            elif weights is None:
                yield {**batch, "weight": np.ones(len(batch["id"]), np.float32)}
            else:
                yield dict(flowjax.attach_weights(batch, weights))

    result = flowjax.fit(
        step,
        state,
        data,
        num_steps=len(stream),
        log_every=len(stream),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep=1,
        run_info=run_info,
        progress=False,
        log=lambda _msg: None,
    )
    STAGES["restored" if result.resumed_from == len(stream) else "trained"] += 1
    return model._replace(params=result.state.params), result


STAGES = collections.Counter()  # stages trained / restored from a finished checkpoint


# -- evaluation ----------------------------------------------------------------------


@functools.cache
def _logits_fn(graphdef: Any, column: int | None):
    def logits(params, images):
        return nnx.merge(graphdef, params)(images, column)

    return jax.jit(logits)


def logits(
    model: Model, images: np.ndarray, column: int | None, pad_to: int = 512
) -> np.ndarray:
    """Eval logits of ``images`` in padded batches of one shape (``column``: a progressive column)."""
    fn = _logits_fn(model.graphdef, column)
    out = []
    for start in range(0, len(images), pad_to):
        chunk = images[start : start + pad_to]
        padded = np.zeros((pad_to, *images.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(fn(model.params, padded))[: len(chunk)])
    return np.concatenate(out)


def accuracy(model: Model, data: dict, column: int | None, setting: str) -> float:
    """Accuracy on ``data`` (one task's test split) under ``setting``'s scoring.

    ``column``: the progressive network's column to read (``None`` for a plain network).
    """
    z, offset = task_logits(
        jnp.asarray(logits(model, data["image"], column)),
        jnp.asarray(data["task"]),
        setting,
    )
    pred = np.asarray(z).argmax(-1) + np.asarray(offset)
    return float(np.mean(pred == data["label"]))
