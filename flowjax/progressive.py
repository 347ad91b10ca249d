"""Progressive neural networks (Rusu et al., 2016): a new column per task, lateral connections.

Column :math:`k` is an MLP whose layer :math:`i` also reads the previous
layer of every earlier column through lateral weights :math:`U`:

.. math::
    h^{(k)}_i = f\\Big(W^{(k)}_i h^{(k)}_{i-1} + b^{(k)}_i
    + \\sum_{j<k} U^{(k:j)}_i h^{(j)}_{i-1}\\Big), \\qquad h^{(k)}_0 = x,

with no :math:`f` after the last layer (Rusu et al., "Progressive Neural
Networks", arXiv 1606.04671, eq. 1; Avalanche's ``avalanche/models/pnn.py``
builds the same columns, with MLP adapters in place of the linear
:math:`U`). Earlier columns are frozen: train task :math:`k` with
``flowjax.train_only(tx, model.column_filter(k))``, and the earlier columns'
activations enter column :math:`k` through ``jax.lax.stop_gradient``, so
they are neither updated nor differentiated. With FLOW, train on
:func:`flowjax.weighted_objective` as usual.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ProgressiveMLP"]


class _Column(nnx.Module):
    def __init__(self, features, earlier: int, rngs, dtype, param_dtype):
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.layers = nnx.List(
            [nnx.Linear(a, b, **kw) for a, b in itertools.pairwise(features)]
        )
        # laterals[i - 1][j]: U_i^(k:j), from column j's h_{i-1} to this column's layer i.
        self.laterals = nnx.List(
            [
                nnx.List(
                    [nnx.Linear(a, b, use_bias=False, **kw) for _ in range(earlier)]
                )
                for a, b in itertools.pairwise(features[1:])
            ]
        )


class ProgressiveMLP(nnx.Module):
    """A progressive network of MLP columns, one per task (Rusu et al., 2016).

    Starts with one column; :meth:`add_column` adds the next, with lateral
    weights from every earlier column. ``model(x, task)`` is column ``task``'s
    output (its own head), computing columns ``0..task``.

    Args:
      features: layer widths ``[d_in, h_1, ..., d_out]`` (at least two), the
        same for every column.
      rngs: random streams for the first column.
      activation: :math:`f` (default ``nnx.relu``).
      dtype: the layers' computation dtype (``nnx.Linear``'s ``dtype``).
      param_dtype: the dtype of every weight.

    Raises:
      ValueError: fewer than two widths, or a width that is not a positive
        integer.

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> from flax import nnx
      >>> model = flowjax.ProgressiveMLP([4, 8, 3], rngs=nnx.Rngs(0))
      >>> model.add_column(nnx.Rngs(1))
      >>> model(jnp.ones((2, 4)), task=1).shape
      (2, 3)
      >>> tx = flowjax.train_only(optax.adam(1e-3), model.column_filter(1))
    """

    def __init__(
        self,
        features: Sequence[int],
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        features = list(features)
        if len(features) < 2 or any(
            isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 1
            for f in features
        ):
            raise ValueError(
                f"features must be at least two positive integers; got {features!r}."
            )
        self.features = tuple(int(f) for f in features)
        self.activation = activation
        self.dtype, self.param_dtype = dtype, param_dtype
        self.columns = nnx.List([self._column(0, rngs)])

    def _column(self, earlier: int, rngs: nnx.Rngs) -> _Column:
        return _Column(self.features, earlier, rngs, self.dtype, self.param_dtype)

    @property
    def num_columns(self) -> int:
        """The number of columns (tasks) so far."""
        return len(self.columns)

    def add_column(self, rngs: nnx.Rngs) -> None:
        """Adds a column for the next task, with laterals from every earlier column.

        Args:
          rngs: random streams for the new column's weights.

        Returns:
          None; the model gains column ``num_columns`` (in place). Earlier
          columns are untouched.

        Raises:
          TypeError: ``rngs`` is not an ``nnx.Rngs``.

        Example:
          >>> import flowjax
          >>> from flax import nnx
          >>> model = flowjax.ProgressiveMLP([2, 3, 1], rngs=nnx.Rngs(0))
          >>> model.add_column(nnx.Rngs(1)); model.num_columns
          2
        """
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs; got {type(rngs).__name__}.")
        self.columns.append(self._column(len(self.columns), rngs))

    def column_filter(self, task: int):
        """The NNX filter selecting column ``task``'s parameters (layers and laterals).

        Args:
          task: a column index, ``0 <= task < num_columns``.

        Returns:
          A predicate ``(path, x) -> bool`` for :func:`flowjax.train_only`
          or ``nnx.split``.

        Raises:
          ValueError: ``task`` is not a column index.

        Example:
          >>> import jax.numpy as jnp, flowjax
          >>> from flax import nnx
          >>> model = flowjax.ProgressiveMLP([2, 1], rngs=nnx.Rngs(0))
          >>> flowjax.trainable_mask(nnx.state(model, nnx.Param), model.column_filter(0))[
          ...     "columns"][0]["layers"][0]["kernel"]
          True
        """
        task = self._check_task(task)

        def in_column(path, _x) -> bool:
            return tuple(path[:2]) == ("columns", task)

        return in_column

    def _check_task(self, task) -> int:
        if (
            isinstance(task, bool)
            or not isinstance(task, numbers.Integral)
            or not 0 <= task < len(self.columns)
        ):
            raise ValueError(
                f"task must be a column index in [0, {len(self.columns)}); got {task!r}."
            )
        return int(task)

    def __call__(self, x: jax.Array, task: int) -> jax.Array:
        task = self._check_task(task)
        acts: list[list[jax.Array]] = []  # acts[j][i]: column j's h_i (h_0 = x)
        out = x
        for k in range(task + 1):
            col = self.columns[k]
            hs = [x]
            for i, layer in enumerate(col.layers):
                z = layer(hs[-1])
                if i > 0:
                    for j, lateral in enumerate(col.laterals[i - 1]):
                        z = z + lateral(jax.lax.stop_gradient(acts[j][i]))
                if i < len(col.layers) - 1:
                    z = self.activation(z)
                hs.append(z)
            acts.append(hs)
            out = hs[-1]
        return out
