"""Type aliases shared across flowjax (in the manner of ``chex/_src/pytypes.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
# Any pytree of arrays: model parameters, an NNX state, an optax state.
Params = Any
PyTree = Any
# One example: a pytree of arrays *without* a batch axis.
Example = Any
# A batch: a mapping with an integer ``"id"`` array plus per-example fields.
Batch = Mapping[str, Any]
Batches = Iterable[Batch]
# ``loss_fn(params, example) -> scalar``: the loss of one example.
PerExampleLoss = Callable[[Params, Example], ArrayLike]
# ``loss_fn(params, batch) -> [B]``: the losses of a batch's examples, each from its own row.
BatchedLoss = Callable[[Params, Any], ArrayLike]
# A FLOW temperature τ > 0, or None for the median loss.
Temperature = float | ArrayLike | None
Normalize = Literal["mean", "sum"] | None
Reduction = Literal["mean", "sum", "normalized"]
IdArray = np.ndarray
# A Flax NNX filter, taken unchanged by flax.nnx.filterlib.to_predicate: a Variable
# type (nnx.LoRAParam), nnx.PathContains, nnx.All/Any/Not, a predicate
# (path, x) -> bool, an NNX tag string, ..., True/False, or a list/tuple of filters.
Filter = Any
# A parameter subset: a Filter, a bool mask pytree with the params' structure or a
# prefix of it (as for optax.masked), or a function params -> such a pytree.
Selection = Any
