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


def mask(net: Net, modules: frozenset[str] | set[str]) -> Net:
    """A :class:`Net` of booleans: True for every array of the named top-level modules."""

    def tree(d: dict) -> dict:
        return {k: jax.tree.map(lambda _, k=k: k in modules, v) for k, v in d.items()}

    return net._replace(params=tree(net.params), stats=tree(net.stats))


def task_specific_mask(net: Net) -> Net:
    """True for the head and for BatchNorm scale, bias, mean and variance."""
    return mask(net, task_specific_modules(net))


def all_mask(net: Net) -> Net:
    """True everywhere: full fine-tuning."""
    return mask(net, set(net.params) | set(net.stats))


def head_mask(net: Net) -> Net:
    """True for the head only: what linear probing trains."""
    return mask(net, {HEAD})


def body_distance(net: Net, reference: Net) -> float:
    """‖θ − θ₀‖ over the shared (not task-specific) parameters."""
    specific = task_specific_mask(net).params
    sq = jax.tree.map(
        lambda s, a, b: (
            0.0 if s else float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        ),
        specific,
        net.params,
        reference.params,
    )
    return math.sqrt(sum(jax.tree.leaves(sq)))
