"""The digits experiment's model: a small Flax NNX CNN with BatchNorm, handled functionally.

Architecture (8×8×1 input)::

    conv3x3(16) - BN - relu - conv3x3(32) - BN - relu - avgpool2 - dense(64) - relu - head

BatchNorm follows PyTorch's defaults as the official code uses them (momentum
0.1, i.e. Flax ``momentum=0.9``; eps 1e-5). As in the paper, the head and every
BatchNorm (scale, bias, running mean and variance) are *task-specific*; the
convolutions and the dense layer are the shared body.

The training loop never calls a stateful module: a model is a :class:`Net`, the
static ``graphdef`` plus two plain dicts of arrays (``params``, the
``nnx.Param`` variables; ``stats``, the BatchNorm running statistics), so
jitted functions take the arrays as arguments and ``nnx.merge`` rebuilds the
module inside the trace.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

import flowjax

HEAD = "head"


class CNN(nnx.Module):
    """conv-BN-relu ×2, average pool, dense, head."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, width: int = 16):
        bn = {"momentum": 0.9, "epsilon": 1e-5, "rngs": rngs}
        self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, **bn)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, **bn)
        self.fc = nnx.Linear(4 * 4 * 2 * width, 64, rngs=rngs)
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The body: images ``[B, 8, 8, 1]`` to features ``[B, 64]``."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return nnx.relu(self.fc(x.reshape(*x.shape[:-3], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


class Net(NamedTuple):
    """A model as data: static structure plus two dicts of arrays."""

    graphdef: Any
    params: dict
    stats: dict

    @property
    def arrays(self) -> tuple[dict, dict]:
        """``(params, stats)``: what a jitted function takes."""
        return self.params, self.stats


def split(model: nnx.Module) -> Net:
    """Splits a module into a :class:`Net` (``nnx.Param`` / ``nnx.BatchStat``)."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return Net(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats))


def merge(graphdef: Any, params: dict, stats: dict, *, train: bool) -> nnx.Module:
    """Rebuilds the module (inside a trace); ``train`` selects BatchNorm's mode.

    In train mode BatchNorm normalises with the batch statistics and updates
    the running ones (read them back with :func:`batch_stats`); in eval mode
    it uses the running statistics.
    """
    model = nnx.merge(graphdef, params, stats)
    if train:
        model.train()
    else:
        model.eval()
    return model


def batch_stats(model: nnx.Module) -> dict:
    """The module's BatchNorm running statistics as a plain dict."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


@functools.cache
def _initializer(num_classes: int):
    """``(graphdef, jitted key -> (params, stats))``: one compiled initialiser."""
    graphdef = split(
        nnx.eval_shape(lambda: CNN(num_classes, rngs=nnx.Rngs(0)))
    ).graphdef
    return graphdef, jax.jit(
        lambda key: split(CNN(num_classes, rngs=nnx.Rngs(key))).arrays
    )


def init(key: jax.Array, num_classes: int = 5) -> Net:
    """A freshly initialised model (``CNN`` defaults), from ``key``."""
    graphdef, arrays = _initializer(num_classes)
    return Net(graphdef, *arrays(key))


@functools.cache
def _head_initializer(features: int, num_classes: int):
    return jax.jit(
        lambda key: split(nnx.Linear(features, num_classes, rngs=nnx.Rngs(key))).params
    )


def fresh_head(net: Net, key: jax.Array) -> Net:
    """``net`` with a newly initialised head (the fine-tuning task's new head).

    The head is initialised exactly as :class:`CNN` initialises its own
    (``nnx.Linear`` defaults), from ``key``.
    """
    head = _head_initializer(*net.params[HEAD]["kernel"].shape)(key)
    return net._replace(params={**net.params, HEAD: head})


def task_specific_modules(net: Net) -> frozenset[str]:
    """Names of the task-specific modules: the head and every BatchNorm (found by type)."""
    model = nnx.merge(net.graphdef, net.params, net.stats)
    names = {HEAD}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            names.add(path[0])
    return frozenset(names)


def task_specific(net: Net) -> list[str]:
    """The names of the task-specific modules, sorted."""
    return sorted(task_specific_modules(net))


def modules(*names: str) -> nnx.filterlib.Filter:
    """An NNX filter selecting the parameters of the named top-level modules."""
    return nnx.Any(*(nnx.PathContains(name) for name in names))


def state(net: Net) -> dict:
    """``{"params": ..., "stats": ...}``: the whole model state as one pytree."""
    return {"params": net.params, "stats": net.stats}


def from_state(graphdef: Any, state: dict) -> Net:
    """The inverse of :func:`state`."""
    return Net(graphdef, state["params"], state["stats"])


def trainable(net: Net, which: str) -> Any:
    """A ``flowjax.trainable_mask`` over ``net.params``.

    ``which``: "all" (full fine-tuning), "head" (linear probing, FLOW's round
    2) or "lora" (the LoRA factors and the head; everything else frozen).
    """
    select = {
        "all": lambda _path, _leaf: True,
        "head": modules(HEAD),
        "lora": modules(HEAD, "lora_a", "lora_b"),
    }
    if which not in select:
        raise ValueError(f"which must be one of {sorted(select)}; got {which!r}.")
    return flowjax.trainable_mask(net.params, select[which])


def body_distance(net: Net, reference: Net) -> float:
    """‖θ − θ₀‖ over the shared (not task-specific) parameters."""
    specific = flowjax.trainable_mask(net.params, modules(*task_specific(net)))
    sq = jax.tree.map(
        lambda s, a, b: (
            0.0 if s else float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        ),
        specific,
        net.params,
        reference.params,
    )
    return math.sqrt(sum(jax.tree.leaves(sq)))


# --------------------------------------------------------------------------
# LoRA on the dense layer (flowjax.add_lora / merge_lora)
# --------------------------------------------------------------------------

# The body's dense layer; the head is new and trained fully.
LORA_LAYERS = nnx.PathContains("fc")


@functools.cache
def _lora_graphdef(graphdef: Any, rank: int) -> Any:
    """One graphdef for every LoRA model of this rank (one compiled step for all seeds)."""
    model = nnx.eval_shape(
        lambda: flowjax.add_lora(
            CNN(5, rngs=nnx.Rngs(0)), rank, rngs=nnx.Rngs(0), select=LORA_LAYERS
        )
    )
    return split(model).graphdef


def add_lora(net: Net, rank: int, key: jax.Array) -> Net:
    """``net`` with rank-``rank`` LoRA factors on the dense layer ``fc`` (``flowjax.add_lora``).

    ``B = 0`` at the start, so the model computes exactly what ``net`` does.
    """
    model = nnx.merge(net.graphdef, net.params, net.stats)
    lora = split(flowjax.add_lora(model, rank, rngs=nnx.Rngs(key), select=LORA_LAYERS))
    return lora._replace(graphdef=_lora_graphdef(net.graphdef, rank))


def merge_lora(net: Net, base: Net) -> Net:
    """The LoRA model folded back into a plain CNN (``flowjax.merge_lora``), with ``base``'s graphdef.

    ``base`` is any model of the base architecture (e.g. the pre-trained one):
    the merged arrays must have its structure, and evaluation then reuses its
    compiled functions.
    """
    merged = split(flowjax.merge_lora(nnx.merge(net.graphdef, net.params, net.stats)))
    if jax.tree.structure(merged.arrays) != jax.tree.structure(base.arrays):
        raise ValueError("merge_lora did not give the base model's structure.")
    return merged._replace(graphdef=base.graphdef)
