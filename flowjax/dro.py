"""Dynamic KL-DRO (Qi et al., 2021): upweight the batch's *hard* examples, at the current θ.

KL-regularised distributionally robust optimisation solves

.. math::
    \\min_\\theta \\max_{\\pi \\in \\Delta_n} \\sum_i \\pi_i \\ell_i(\\theta)
    - \\tau \\sum_i \\pi_i \\log(\\pi_i / \\pi^0_i),

whose inner maximiser is :math:`\\pi_i \\propto \\pi^0_i \\exp(\\ell_i(\\theta)/\\tau)`
and whose value is the dual :math:`\\tau \\log \\sum_i \\pi^0_i \\exp(\\ell_i/\\tau)`.
FLOW is the opposite on both counts: it upweights *easy* examples, and its
weights are static (computed once at the pre-trained θ*). :func:`dro_loss` is
the dynamic stochastic version (per batch, recomputed every step), the baseline
the FLOW paper contrasts with; :func:`flowjax.dro_weights` computes the same
exponential weights *once*, as static numbers, from whatever losses it is given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowjax import _checks
from flowjax._types import Array, ArrayLike

__all__ = ["dro_loss"]


def dro_loss(
    losses: ArrayLike,
    temperature: float | ArrayLike,
    *,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
) -> Array:
    """The batch's loss under the worst-case (KL-DRO) reweighting ``p ∝ w·exp(ℓ/τ)``.

    .. math::
        L = \\sum_i p_i\\,\\ell_i, \\qquad
        p_i = \\mathrm{stop\\_gradient}\\Big(
          \\frac{m_i w_i e^{\\ell_i/\\tau}}{\\sum_j m_j w_j e^{\\ell_j/\\tau}}\\Big)

    over the counted entries (:math:`m` the ``where`` mask) of the batch. The
    weights :math:`p` are recomputed from the current losses at every call
    (dynamic), then held constant for differentiation, so

    .. math::
        \\nabla_\\theta L = \\sum_i p_i \\nabla_\\theta \\ell_i
        = \\nabla_\\theta\\, \\tau \\log \\sum_i m_i w_i e^{\\ell_i/\\tau}:

    the gradient is exactly that of the KL-DRO dual objective (for any
    constant shift of the dual, e.g. ``τ log mean exp(ℓ/τ)``), while the value
    stays on the scale of a mean loss. ``weights`` are optional static
    per-example weights (e.g. FLOW's, :func:`flowjax.flow_weights`): they act
    as the reference distribution :math:`\\pi^0`, so FLOW's easy-example
    weights and DRO's hard-example tilt multiply. As :math:`\\tau\\to\\infty`,
    :math:`p` becomes uniform (the plain mean, or the weighted mean
    :math:`\\sum w\\ell/\\sum w`); as :math:`\\tau\\to 0` it selects the worst
    example. :math:`p` is computed in log space (no overflow); masked entries
    and entries with weight 0 get :math:`p=0`; NaN in masked entries does
    not leak (NaN in a counted entry does, even with weight 0). No counted
    entry at all (a padding-only batch) gives 0; counted entries whose
    weights are all 0 give NaN (value and gradient), as
    ``flowjax.weighted_loss(..., reduction="normalized")`` does: there is no
    reference distribution to reweight, and 0 would hide that.

    Args:
      losses: per-example ``[B]`` (or per-token ``[B, T]``) losses at the
        current parameters; the softmax runs over all counted entries.
      temperature: ``τ``, a finite number > 0.
      weights: optional non-negative weights with the shape of ``losses``.
      where: optional boolean mask with the shape of ``losses``.

    Returns:
      A scalar in the losses' dtype: 0 with no counted entry, NaN when the
      counted entries' weights are all 0.

    Raises:
      ValueError: an empty batch (no entries at all; a batch whose entries
        are all masked is not empty and gives 0), a concrete ``temperature``
        that is not a finite number > 0 (under ``jax.jit`` a bad τ gives NaN),
        shapes that do not match, or concrete weights with NaN/inf or negative
        counted entries (under ``jax.jit``: NaN). NaN or inf in a counted loss
        gives NaN, with or without jit.

    Example:
      >>> import jax, jax.numpy as jnp, flowjax
      >>> losses = jnp.array([0.0, 1.0, 2.0])
      >>> round(float(flowjax.dro_loss(losses, 1.0)), 4)  # p = softmax(losses) = [0.09, 0.2447, 0.6652]
      1.5752
      >>> float(flowjax.dro_loss(losses, 1e30))  # τ → ∞: the plain mean
      1.0
      >>> jax.grad(lambda s: flowjax.dro_loss(s * losses, 1.0))(1.0)  # Σ p_i ℓ_i
      Array(1.5752..., dtype=float32, weak_type=True)
    """
    if temperature is None or isinstance(temperature, str):
        raise ValueError(
            f"temperature must be a finite number > 0; got {temperature!r}. "
            "(flowjax.dro_weights takes temperature=None for the median; the dynamic DRO "
            "loss needs a fixed τ.)"
        )
    _checks.check_temperature(temperature)
    losses = jnp.asarray(losses)
    if losses.size == 0:
        raise ValueError(
            f"dro_loss got an empty batch (losses of shape {losses.shape}): the worst-case "
            "reweighting of no examples is undefined. Skip empty batches, or pad them and "
            "mask the padding with where=."
        )
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        losses = losses.astype(jnp.float32)
    where = _checks.as_where(where, losses.shape)
    if where is None:
        where = jnp.ones(losses.shape, bool)
    if weights is not None:
        weights = jnp.asarray(weights, losses.dtype)
        if weights.shape != losses.shape:
            raise ValueError(
                f"weights of shape {weights.shape} do not match losses of shape {losses.shape}."
            )
        _checks.check_counted_weights(weights, where)
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    tau = jnp.asarray(temperature, dtype)
    tau_ok = jnp.isfinite(tau) & (tau > 0)
    safe = jnp.where(where, losses, 0)
    logits = jax.lax.stop_gradient(safe).astype(dtype) / jnp.where(tau_ok, tau, 1)
    counted = where
    if weights is not None:
        safe_w = jnp.where(where, weights, 0).astype(dtype)
        counted = where & (safe_w > 0)
        logits = logits + jnp.log(jnp.where(counted, safe_w, 1))
    logits = jnp.where(counted, logits, -jnp.inf)
    top = jnp.max(jnp.where(counted, logits, jnp.finfo(dtype).min))
    unnorm = jnp.where(counted, jnp.exp(logits - top), 0)
    p = unnorm / jnp.maximum(jnp.sum(unnorm), jnp.finfo(dtype).tiny)
    # Counted entries that all have weight 0 leave no distribution to reweight:
    # NaN, as weighted_loss(..., "normalized") gives, never a silent 0.
    no_mass = jnp.any(where) & ~jnp.any(counted)
    ok = tau_ok & ~no_mass
    if weights is not None:
        # Under jit a NaN, infinite or negative counted weight cannot raise: NaN, never
        # the loss with that example silently dropped.
        ok = ok & ~jnp.any(where & ~(jnp.isfinite(weights) & (weights >= 0)))
    p = jax.lax.stop_gradient(jnp.where(ok, p, jnp.nan))
    value = jnp.sum(jnp.where(where, p * safe.astype(dtype), 0))
    return value.astype(losses.dtype)
