"""Progressive neural networks (Rusu et al., 2016): a new column per task, lateral connections.

Column :math:`k` is a network whose layer :math:`i` also reads the previous
layer of every earlier column through lateral weights :math:`U`:

.. math::
    h^{(k)}_i = f\\Big(W^{(k)}_i h^{(k)}_{i-1} + b^{(k)}_i
    + \\sum_{j<k} U^{(k:j)}_i h^{(j)}_{i-1}\\Big), \\qquad h^{(k)}_0 = x,

with no :math:`f` after the last layer (Rusu et al., "Progressive Neural
Networks", arXiv 1606.04671, eq. 1; Avalanche's ``avalanche/models/pnn.py``
builds the same columns, with MLP adapters in place of the linear
:math:`U`). :class:`ProgressiveMLP` has dense columns; :class:`ProgressiveCNN`
convolutional ones (then dense layers on the flattened features), whose
laterals into a convolution are 1×1 convolutions with that layer's stride, so
that they meet its output grid (the paper's convolutional laterals, its
section 3, reduce channels with 1×1 convolutions too). Earlier columns are
frozen: train task :math:`k` with ``flowjax.train_only(tx,
model.column_filter(k))``, and the earlier columns' activations enter column
:math:`k` through ``jax.lax.stop_gradient``, so they are neither updated nor
differentiated. With FLOW, train on :func:`flowjax.weighted_objective` as
usual.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ProgressiveCNN", "ProgressiveMLP"]


class _Column(nnx.Module):
    """``layers[i]`` (W_i, b_i) and ``laterals[i - 1][j]`` (U_i^(k:j), from column j's h_{i-1})."""

    def __init__(self, layers, laterals):
        self.layers = nnx.List(layers)
        self.laterals = nnx.List([nnx.List(row) for row in laterals])


def _positive_ints(values, what: str, at_least: int) -> tuple[int, ...]:
    values = list(values)
    if len(values) < at_least or any(
        isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 1
        for f in values
    ):
        raise ValueError(
            f"{what} must be at least {at_least} positive integer"
            f"{'s' if at_least > 1 else ''}; got {values!r}."
        )
    return tuple(int(f) for f in values)


class _Progressive(nnx.Module):
    """Columns, laterals, freezing and the forward pass shared by the two kinds."""

    def __init__(self, activation, dtype, param_dtype, rngs: nnx.Rngs):
        self.activation = activation
        self.dtype, self.param_dtype = dtype, param_dtype
        self.columns = nnx.List([self._column(0, rngs)])

    def _column(self, earlier: int, rngs: nnx.Rngs) -> _Column:
        raise NotImplementedError

    def _kw(self, rngs: nnx.Rngs) -> dict:
        return {"rngs": rngs, "dtype": self.dtype, "param_dtype": self.param_dtype}

    def _input(self, i: int, h: jax.Array) -> jax.Array:
        """Layer ``i``'s view of ``h_{i-1}`` (a dense layer after convolutions flattens it)."""
        del i
        return h

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
                z = layer(self._input(i, hs[-1]))
                if i > 0:
                    for j, lateral in enumerate(col.laterals[i - 1]):
                        h = jax.lax.stop_gradient(acts[j][i])
                        z = z + lateral(self._input(i, h))
                if i < len(col.layers) - 1:
                    z = self.activation(z)
                hs.append(z)
            acts.append(hs)
            out = hs[-1]
        return out


class ProgressiveMLP(_Progressive):
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
        self.features = _positive_ints(features, "features", 2)
        super().__init__(activation, dtype, param_dtype, rngs)

    def _column(self, earlier: int, rngs: nnx.Rngs) -> _Column:
        kw = self._kw(rngs)
        pairs = list(itertools.pairwise(self.features))
        return _Column(
            [nnx.Linear(a, b, **kw) for a, b in pairs],
            [
                [nnx.Linear(a, b, use_bias=False, **kw) for _ in range(earlier)]
                for a, b in pairs[1:]
            ],
        )


def _same_size(n: int, stride: int) -> int:
    return -(-n // stride)  # 'SAME' padding: ceil(n / stride)


class ProgressiveCNN(_Progressive):
    """A progressive network of convolutional columns, one per task (Rusu et al., 2016).

    Each column is ``len(channels)`` convolutions (``'SAME'`` padding, then
    :math:`f`) on an NHWC image, its features flattened, then the dense
    layers ``dense`` (:math:`f` between them, none after the last: the head).
    Lateral :math:`U^{(k:j)}_i` into a convolution is a bias-free 1×1
    convolution with that convolution's stride, from column :math:`j`'s
    :math:`h_{i-1}`; into a dense layer, a bias-free linear map of column
    :math:`j`'s (flattened) :math:`h_{i-1}`. ``model(x, task)`` is column
    ``task``'s output, computing columns ``0..task``; column 0 alone is the
    plain CNN.

    Args:
      input_shape: ``(H, W, C)`` of one image (the flattened size follows
        from it).
      channels: output channels of the convolutions (at least one).
      dense: widths of the dense layers after flattening, the last being the
        output (at least one).
      rngs: random streams for the first column.
      kernel_size: the convolutions' kernel size (an int or a pair).
      strides: one stride per convolution (default 1 each).
      activation: :math:`f` (default ``nnx.relu``).
      dtype: the layers' computation dtype.
      param_dtype: the dtype of every weight.

    Raises:
      ValueError: ``input_shape`` not three positive integers, empty or
        non-positive ``channels`` / ``dense``, ``strides`` not one positive
        integer per convolution, or a ``kernel_size`` that is not a positive
        int or pair.

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> from flax import nnx
      >>> model = flowjax.ProgressiveCNN((8, 8, 1), channels=[4, 8], dense=[16, 2],
      ...                                strides=[1, 2], rngs=nnx.Rngs(0))
      >>> model.add_column(nnx.Rngs(1))
      >>> model(jnp.ones((3, 8, 8, 1)), task=1).shape
      (3, 2)
      >>> tx = flowjax.train_only(optax.adam(1e-3), model.column_filter(1))
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int],
        dense: Sequence[int],
        *,
        rngs: nnx.Rngs,
        kernel_size: int | Sequence[int] = 3,
        strides: Sequence[int] | None = None,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.input_shape = _positive_ints(input_shape, "input_shape", 3)
        if len(self.input_shape) != 3:
            raise ValueError(
                f"input_shape must be (H, W, C); got {tuple(input_shape)!r}."
            )
        self.channels = _positive_ints(channels, "channels", 1)
        self.dense = _positive_ints(dense, "dense", 1)
        strides = (1,) * len(self.channels) if strides is None else strides
        self.strides = _positive_ints(strides, "strides", 1)
        if len(self.strides) != len(self.channels):
            raise ValueError(
                f"strides must give one stride per convolution ({len(self.channels)}); "
                f"got {tuple(strides)!r}."
            )
        ks = (
            (kernel_size,) * 2
            if isinstance(kernel_size, numbers.Integral)
            else kernel_size
        )
        self.kernel_size = _positive_ints(ks, "kernel_size", 2)
        if len(self.kernel_size) != 2:
            raise ValueError(
                f"kernel_size must be an int or a pair; got {kernel_size!r}."
            )
        h, w, _ = self.input_shape
        for s in self.strides:
            h, w = _same_size(h, s), _same_size(w, s)
        self.flat = h * w * self.channels[-1]
        super().__init__(activation, dtype, param_dtype, rngs)

    def _input(self, i: int, h: jax.Array) -> jax.Array:
        if i < len(self.channels):
            return h
        return h.reshape(*h.shape[:-3], -1) if i == len(self.channels) else h

    def _column(self, earlier: int, rngs: nnx.Rngs) -> _Column:
        kw = self._kw(rngs)
        ins = (self.input_shape[-1], *self.channels[:-1])
        convs = [
            nnx.Conv(a, b, self.kernel_size, (s, s), padding="SAME", **kw)
            for a, b, s in zip(ins, self.channels, self.strides, strict=True)
        ]
        dense_in = (self.flat, *self.dense[:-1])
        linears = [
            nnx.Linear(a, b, **kw) for a, b in zip(dense_in, self.dense, strict=True)
        ]
        laterals = [
            [
                nnx.Conv(a, b, (1, 1), (s, s), padding="SAME", use_bias=False, **kw)
                for _ in range(earlier)
            ]
            for a, b, s in zip(
                ins[1:], self.channels[1:], self.strides[1:], strict=True
            )
        ]
        laterals += [
            [nnx.Linear(a, b, use_bias=False, **kw) for _ in range(earlier)]
            for a, b in zip(dense_in, self.dense, strict=True)
        ]
        return _Column(convs + linears, laterals)
