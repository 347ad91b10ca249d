"""Weighted training objectives for optax, and attaching weights to batches by id.

FLOW fine-tunes on :math:`\\sum_i w_i f_i(\\theta)`. How that sum is divided is a
choice with a real effect on the effective learning rate, so it is an explicit,
named ``reduction``:

* ``"mean"``: :math:`\\sum_i w_i f_i / B`, with B the number of counted entries
  (examples, or target tokens for token-level losses). This is the official
  vision loss (and, with token losses, the official LLM loss). With FLOW's raw
  weights in (0, 1] the step is scaled down by the mean weight (about e^-1 at
  the median); use ``flow_weights(..., normalize="mean")`` to keep the
  unweighted learning rate.
* ``"sum"``: :math:`\\sum_i w_i f_i`. The step grows with the batch size.
* ``"normalized"``: :math:`\\sum_i w_i f_i / \\sum_i w_i`. A weighted mean: the
  step size does not depend on the overall scale of the weights, but a batch of
  only hard examples gets the same step as a batch of easy ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import _checks
from flowjax._types import Array, ArrayLike, Params, PerExampleLoss, Reduction
from flowjax.tables import TokenWeights, WeightTable

__all__ = ["attach_weights", "weighted_loss", "weighted_objective"]

_REDUCTIONS = ("mean", "sum", "normalized")


def weighted_loss(
    losses: ArrayLike,
    weights: ArrayLike,
    *,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> Array:
    """Reduces per-example (or per-token) losses with weights: FLOW's objective.

    .. math::
        \\text{mean}: \\frac{\\sum_i m_i w_i \\ell_i}{\\sum_i m_i}, \\quad
        \\text{sum}: \\sum_i m_i w_i \\ell_i, \\quad
        \\text{normalized}: \\frac{\\sum_i m_i w_i \\ell_i}{\\sum_i m_i w_i}

    with :math:`m` the ``where`` mask (all ones by default). Masked entries are
    removed with ``jnp.where``, so NaN in padding cannot leak into the value.
    An empty selection (no counted entry) gives 0, the sum over no examples.
    ``"normalized"`` with counted entries whose weights sum to 0 gives NaN.

    Args:
      losses: per-example losses ``[B]`` or per-token losses ``[B, T]``.
      weights: same shape as ``losses``, or broadcastable to it with the same
        rank (e.g. sequence weights ``[B, 1]`` against token losses ``[B, T]``).
      where: optional boolean mask with the shape of ``losses``.
      reduction: ``"mean"``, ``"sum"`` or ``"normalized"`` (see module doc for
        what each does to the effective learning rate).

    Returns:
      A scalar.

    Raises:
      ValueError: shapes that do not match, an unknown reduction, or (for
        concrete weights) NaN/inf or negative weights among counted entries.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> losses, w = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 0.5, 0.0])
      >>> float(flowjax.weighted_loss(losses, w)), float(flowjax.weighted_loss(losses, w, reduction="normalized"))
      (0.6666666..., 1.3333333...)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
    losses = jnp.asarray(losses)
    weights = jnp.asarray(
        weights,
        dtype=losses.dtype if jnp.issubdtype(losses.dtype, jnp.floating) else None,
    )
    if weights.ndim != losses.ndim or not _broadcastable(weights.shape, losses.shape):
        raise ValueError(
            f"weights of shape {weights.shape} do not match losses of shape {losses.shape} "
            "(the batch and its weights must have the same length)."
        )
    weights = jnp.broadcast_to(weights, losses.shape)
    where = _checks.as_where(where, losses.shape)
    _checks.check_counted_weights(weights, where)

    wl = weights * losses
    if where is None:
        total, count, w_sum = jnp.sum(wl), losses.size, jnp.sum(weights)
    else:
        total = jnp.sum(jnp.where(where, wl, 0))
        count = jnp.sum(where)
        w_sum = jnp.sum(jnp.where(where, weights, 0))
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / jnp.maximum(count, 1)
    return total / jnp.where(count > 0, w_sum, 1)


def weighted_objective(
    loss_fn: PerExampleLoss,
    *,
    reduction: Reduction = "mean",
    weight_key: str = "weight",
    valid_key: str | None = None,
    return_metrics: bool = False,
) -> Callable[[Params, Mapping[str, Any]], Any]:
    """Turns a per-example ``loss_fn`` into a weighted batch objective for optax.

    .. math:: L(\\theta; \\text{batch}) = \\mathrm{reduce}_i\\, w_i\\, \\mathrm{loss\\_fn}(\\theta, x_i)

    The objective vmaps ``loss_fn(params, example)`` over the batch (every
    field except ``"id"``, ``weight_key`` and ``valid_key``) and reduces with
    :func:`weighted_loss` using ``batch[weight_key]``. Use it with
    ``jax.value_and_grad(objective)(params, batch)``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
      reduction: see :func:`weighted_loss`.
      weight_key: the batch field holding per-example weights (attach them by
        id with :func:`attach_weights`).
      valid_key: optional boolean batch field marking real (non-padding) rows.
      return_metrics: if True the objective returns ``(loss, metrics)`` (use
        ``has_aux=True``) with ``loss_unweighted`` (mean over counted rows) and
        ``weight_mean``.

    Returns:
      ``objective(params, batch)``.

    Raises:
      ValueError: an unknown ``reduction``; when called, a batch without the
        weight field, a ``loss_fn`` that does not return one scalar per
        example, or weights whose length differs from the batch's.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, flowjax
      >>> loss = lambda p, ex: (p * ex["x"] - ex["y"]) ** 2
      >>> objective = flowjax.weighted_objective(loss)
      >>> batch = {"id": np.arange(2), "x": jnp.array([1.0, 2.0]), "y": jnp.array([0.0, 0.0]),
      ...          "weight": jnp.array([1.0, 0.5])}
      >>> value, grad = jax.value_and_grad(objective)(3.0, batch)
      >>> float(value), float(grad)  # (9 + 0.5*36) / 2, (6 + 0.5*24) / 2
      (13.5, 9.0)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
    skip = {"id", weight_key} | ({valid_key} if valid_key else set())

    def objective(params: Params, batch: Mapping[str, Any]):
        if weight_key not in batch:
            raise ValueError(
                f"the batch has no {weight_key!r} field (fields: {sorted(batch)}): attach weights by "
                "example id with flowjax.attach_weights(batch, table.flow_weights())."
            )
        fields = {k: v for k, v in batch.items() if k not in skip}
        losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, fields)
        if losses.ndim != 1:
            raise ValueError(
                f"loss_fn must return a scalar per example; got shape {losses.shape[1:]}."
            )
        where = None if valid_key is None else batch[valid_key]
        value = weighted_loss(
            losses, batch[weight_key], where=where, reduction=reduction
        )
        if not return_metrics:
            return value
        m = jnp.ones(losses.shape, bool) if where is None else jnp.asarray(where, bool)
        n = jnp.maximum(jnp.sum(m), 1)
        metrics = {
            "loss_unweighted": jnp.sum(jnp.where(m, losses, 0)) / n,
            "weight_mean": jnp.sum(jnp.where(m, jnp.asarray(batch[weight_key]), 0)) / n,
        }
        return value, metrics

    return objective


def attach_weights(
    batch: Mapping[str, Any],
    weights: WeightTable | TokenWeights | ArrayLike,
    *,
    ids: ArrayLike | None = None,
    key: str = "weight",
    length: int | None = None,
) -> dict[str, Any]:
    """Returns a copy of ``batch`` with ``batch[key]`` looked up by ``batch["id"]``.

    Weights are attached by example id, never by position, so shuffled,
    sharded or resumed loaders get the right weight for each example.
    Sequence-level weights (a :class:`WeightTable`) give ``[B]``; token-level
    weights (a :class:`TokenWeights`) give ``[B, T - 1]``, aligned with the
    shifted token losses of :func:`flowjax.token_nll`, for
    ``flowjax.weighted_lm_loss(..., level="token")``.

    Args:
      batch: a mapping with an integer ``"id"`` array (and, for token
        weights, ``"tokens"`` ``[B, T]`` unless ``length`` is given).
      weights: a :class:`WeightTable` (e.g. ``loss_table.flow_weights()``), a
        :class:`TokenWeights` (e.g. ``token_losses.flow_weights()``), or an
        array of per-example weights aligned with ``ids``. For training loops
        build the table once: an array is re-indexed on every call.
      ids: the example ids ``weights`` is aligned with (required for an array).
      key: the field to write (float32 numpy array).
      length: token weights only: the batch's padded token length ``T``
        (default: ``batch["tokens"].shape[-1]``).

    Returns:
      A new dict; the input batch is not modified.

    Raises:
      ValueError: a batch without ``"id"``, an array without ``ids``, ids and
        weights of different lengths, duplicate ids, or batch ids missing from
        the table; for token weights: no ``length`` and no ``"tokens"`` field,
        a length that cuts off target tokens, or a batch ``"mask"`` whose
        targets differ from the table's (naming the ids).

    Example:
      >>> import numpy as np, flowjax
      >>> table = flowjax.LossTable(ids=[10, 11, 12], losses=[0.0, 1.0, 2.0])
      >>> batch = flowjax.attach_weights({"id": np.array([12, 10])}, table.flow_weights())
      >>> batch["weight"].round(4).tolist()
      [0.1353, 1.0]
      >>> tw = flowjax.TokenLosses([4], np.float32([[1.0, 2.0]]), [[True, True]]).flow_weights(1.0)
      >>> batch = {"id": np.array([4]), "tokens": np.array([[5, 6, 7, 0]])}
      >>> flowjax.attach_weights(batch, tw)["weight"].round(4).tolist()  # [B, T - 1]
      [[0.3679, 0.1353, 0.0]]
    """
    if "id" not in batch:
        raise ValueError(
            f'the batch has no "id" field (fields: {sorted(batch)}); weights are attached by example id.'
        )
    if not isinstance(weights, WeightTable | TokenWeights):
        if ids is None:
            raise ValueError(
                "weights are attached by example id, never by position: pass ids= (the ids the "
                "weights array is aligned with, e.g. loss_table.ids) or a flowjax.WeightTable."
            )
        weights = WeightTable(ids, np.asarray(weights))
    elif ids is not None:
        raise ValueError(
            f"ids= is only for a weights array; a {type(weights).__name__} carries its own ids."
        )
    batch_ids = np.asarray(batch["id"])
    out = dict(batch)
    if isinstance(weights, WeightTable):
        if length is not None:
            raise ValueError(
                "length= is only for token weights (a flowjax.TokenWeights)."
            )
        out[key] = weights.lookup(batch_ids)
        return out
    if length is None:
        if "tokens" not in batch or np.ndim(batch["tokens"]) != 2:
            raise ValueError(
                "token weights need the batch's padded token length T: pass length= or a "
                f'batch with "tokens" [B, T] (fields: {sorted(batch)}).'
            )
        length = int(np.shape(batch["tokens"])[-1])
    out[key] = weights.lookup(batch_ids, length=length)
    if "mask" in batch and np.shape(batch["mask"]) == (len(batch_ids), length):
        differ = np.any(
            weights.lookup_mask(batch_ids, length=length)
            != np.asarray(batch["mask"], bool)[:, 1:],
            axis=1,
        )
        if differ.any():
            raise ValueError(
                f"the token weights' target tokens differ from the batch's mask at "
                f"{_checks.describe(differ, batch_ids)}: the weights were computed for other "
                "tokens (another tokenisation or response mask) of these examples."
            )
    return out


def _broadcastable(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    return all(s in (1, d) for s, d in zip(src, dst, strict=True))
