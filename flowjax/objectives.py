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
        Under ``jax.jit`` a negative counted weight makes the result NaN.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> losses, w = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 0.5, 0.0])
      >>> float(flowjax.weighted_loss(losses, w)), float(flowjax.weighted_loss(losses, w, reduction="normalized"))
      (0.6666666..., 1.3333333...)
    """
    _check_reduction(reduction)
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

    # Under jit the check above cannot run: a negative counted weight gives NaN.
    wl = _checks.nan_if_negative_weights(weights * losses, weights, where)
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
    loss_fn: PerExampleLoss | Callable[..., Any],
    *,
    batched: bool = False,
    has_aux: bool = False,
    reduction: Reduction = "mean",
    weight_key: str = "weight",
    valid_key: str | None = None,
    return_metrics: bool = False,
) -> Callable[..., Any]:
    """Turns a loss function into a weighted batch objective for optax.

    .. math:: L(\\theta; \\text{batch}) = \\mathrm{reduce}_i\\, w_i\\, \\ell_i(\\theta)

    Two ways to get the per-example losses :math:`\\ell_i`:

    * ``batched=False`` (default): ``loss_fn(params, example, *args) ->
      scalar`` for ONE example, vmapped over the batch (every field except
      ``"id"``, ``weight_key`` and ``valid_key``). Right for models without
      batch-coupled layers.
    * ``batched=True``: ``loss_fn(params, batch, *args) -> losses [B]`` sees the
      WHOLE batch (every field except ``"id"`` and ``weight_key``; the valid
      field stays, so the model can keep padding out of its batch statistics,
      e.g. ``nnx.BatchNorm``'s ``mask=``). This is how a BatchNorm model
      trains with FLOW weights: in train mode its normalisation couples the
      examples, so it cannot be vmapped one example at a time, and with
      ``has_aux=True`` it returns its updated running statistics. It is also
      the fast form for any model written for a batch (a Flax model called
      as ``model(batch["x"])``): vmapping such a model over single examples
      (``model(ex["x"][None])[0]``) adds transposes and copies to the
      backward pass (a weighted step 1.07-1.18x the plain one on a CPU,
      against about 1.0 in the batched form; ``make bench`` measures it).

    ``objective(params, batch, *args)`` passes ``args`` (e.g. the
    ``nnx.BatchStat`` state, a frozen part of the model) to ``loss_fn``
    unchanged, so ``jax.value_and_grad(objective, has_aux=...)`` differentiates
    ``params`` only. The losses are reduced with :func:`weighted_loss` using
    ``batch[weight_key]``. The objective returns
    ``loss``; ``(loss, metrics)`` with ``return_metrics``; ``(loss, aux)``
    with ``has_aux``; ``(loss, (aux, metrics))`` with both,
    with ``aux`` what ``loss_fn`` returned beside the losses (stacked over
    examples when ``batched=False``) and ``metrics`` holding
    ``loss_unweighted`` (mean over counted rows) and ``weight_mean``.

    FLOW's weights come from the frozen pre-trained model run in **eval
    mode**: ``model.eval()`` (in place: every ``use_running_average`` and
    ``deterministic`` it finds becomes True) or ``nnx.view(model,
    use_running_average=True)`` (a copy sharing the arrays; add
    ``deterministic=True`` when the model has Dropout), before ``nnx.split``.
    A BatchNorm model in train mode normalises each example by its own
    statistics inside the pre-pass's vmap: with BatchNorm on features every
    example gets the same loss (log C for a zero-bias head). Fine-tuning
    itself runs in train mode, through ``batched=True``.

    Args:
      loss_fn: the per-example loss (``batched=False``) or the batch loss
        returning one loss per example (``batched=True``); with
        ``has_aux=True`` it returns ``(losses, aux)``.
      batched: whether ``loss_fn`` takes the whole batch (see above).
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      reduction: see :func:`weighted_loss`.
      weight_key: the batch field holding per-example weights (attach them by
        id with :func:`attach_weights`).
      valid_key: optional boolean batch field marking real (non-padding) rows.
      return_metrics: also return the metrics (see the table).

    Returns:
      ``objective(params, batch, *args)``.

    Raises:
      ValueError: an unknown ``reduction``; when called, a batch without the
        weight field, a ``loss_fn`` that does not return one scalar per
        example (``[B]`` for the batch's B rows when batched), or weights
        whose length differs from the batch's.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, flowjax
      >>> loss = lambda p, ex: (p * ex["x"] - ex["y"]) ** 2
      >>> objective = flowjax.weighted_objective(loss)
      >>> batch = {"id": np.arange(2), "x": jnp.array([1.0, 2.0]), "y": jnp.array([0.0, 0.0]),
      ...          "weight": jnp.array([1.0, 0.5])}
      >>> value, grad = jax.value_and_grad(objective)(3.0, batch)
      >>> float(value), float(grad)  # (9 + 0.5*36) / 2, (6 + 0.5*24) / 2
      (13.5, 9.0)
      >>> batch_loss = lambda p, b, shift: ((p * b["x"] - b["y"]) ** 2 + shift, shift + 1)
      >>> batched = flowjax.weighted_objective(batch_loss, batched=True, has_aux=True)
      >>> (value, aux), grad = jax.value_and_grad(batched, has_aux=True)(3.0, batch, 0.0)
      >>> float(value), float(grad), float(aux)
      (13.5, 9.0, 1.0)
    """
    _check_reduction(reduction)
    skip = {"id", weight_key}
    if valid_key and not batched:
        skip.add(valid_key)

    def objective(params: Params, batch: Mapping[str, Any], *args):
        weights = _batch_weights(batch, weight_key)
        fields = {k: v for k, v in batch.items() if k not in skip}
        if batched:
            out = loss_fn(params, fields, *args)
        else:
            in_axes = (None, 0) + (None,) * len(args)
            out = jax.vmap(loss_fn, in_axes=in_axes)(params, fields, *args)
        losses, aux = out if has_aux else (out, None)
        losses = jnp.asarray(losses)
        n = np.shape(weights)[0] if np.ndim(weights) else None
        if losses.ndim != 1 or (batched and n is not None and losses.shape[0] != n):
            what = (
                "one loss per example of the batch, shape [B]"
                if batched
                else ("a scalar per example")
            )
            raise ValueError(
                f"loss_fn must return {what}; got losses of shape {losses.shape} for a "
                f"batch of {n} examples."
            )
        where = None if valid_key is None else batch[valid_key]
        value, metrics = _reduce(losses, weights, where, reduction)
        if has_aux:
            return value, ((aux, metrics) if return_metrics else aux)
        return (value, metrics) if return_metrics else value

    return objective


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")


def _batch_weights(batch: Mapping[str, Any], weight_key: str | None, hint: str = ""):
    """``batch[weight_key]``; a ValueError that says how to attach them if absent."""
    if weight_key not in batch:
        raise ValueError(
            f"the batch has no {weight_key!r} field (fields: {sorted(batch)}): attach "
            "weights by example id with flowjax.attach_weights(batch, "
            f"table.flow_weights()){hint}."
        )
    return batch[weight_key]


def _reduce(losses, weights, where, reduction: Reduction, *, weighted: bool = True):
    """The one reduction of every weighted objective: the value and its metrics.

    ``value`` is :func:`weighted_loss`; ``metrics`` holds ``loss_unweighted``
    (the mean loss over counted rows) and, when ``weighted``, ``weight_mean``.
    """
    value = weighted_loss(losses, weights, where=where, reduction=reduction)
    m = jnp.ones(losses.shape, bool) if where is None else jnp.asarray(where, bool)
    n = jnp.maximum(jnp.sum(m), 1)
    metrics = {"loss_unweighted": jnp.sum(jnp.where(m, losses, 0)) / n}
    if weighted:
        w = jnp.broadcast_to(jnp.asarray(weights), losses.shape)
        metrics["weight_mean"] = jnp.sum(jnp.where(m, w, 0)) / n
    return value, metrics


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
