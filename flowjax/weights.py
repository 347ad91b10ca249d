"""FLOW's per-example weights, the median temperature, and the DRO contrast.

FLOW (Sanyal et al., ICML 2025, Algorithm 1) weights fine-tuning example ``i`` by

.. math:: w_i = \\exp(-f_i(\\theta^*) / \\tau), \\qquad \\tau = \\mathrm{median}_i\\, f_i(\\theta^*),

where :math:`f_i(\\theta^*) \\ge 0` is the example's loss under the frozen
pre-trained model. Easy examples (low loss) get weight near 1, the median
example gets :math:`e^{-1}`, hard ones decay towards 0. Proposition 4.3 of the
paper: :math:`\\pi^* = w / \\sum_j w_j` minimises
:math:`\\sum_i \\pi_i f_i(\\theta^*) + \\tau \\sum_i \\pi_i \\log \\pi_i` over the simplex.

DRO (Qi et al., 2021) is the opposite: :math:`\\pi_i \\propto \\exp(+f_i/\\tau)`
upweights *hard* examples. :func:`dro_weights` computes it stably, as the
baseline FLOW is contrasted with.

Both functions accept numpy or jax arrays. Numpy input is computed in float64
and returned in the input's float dtype; jax input stays in jax and the whole
computation is jittable. Concrete input is validated (NaN/inf, negative
losses, empty input, bad temperature, a median of 0) with a ``ValueError``;
under ``jax.jit`` values cannot be inspected, so invalid input yields NaN
weights there: never a silent 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import _checks
from flowjax._types import ArrayLike, Normalize, Temperature

__all__ = ["dro_weights", "flow_weights", "median_temperature"]

_NORMALIZE = (None, "mean", "sum")


def median_temperature(losses: ArrayLike) -> float:
    """The paper's parameter-free temperature: the exact median of the losses.

    .. math:: \\tau = \\mathrm{median}_i\\, f_i(\\theta^*)

    numpy's definition: the middle value for an odd count, the mean of the two
    middle values for an even count. Computed in float64 on the host.

    Args:
      losses: per-example losses under the pre-trained model, any shape (all
        entries count), numpy or concrete jax array.

    Returns:
      The median as a Python float.

    Raises:
      ValueError: if ``losses`` is empty, holds NaN/inf or negative values, or
        its median is 0 (the pre-trained model fits at least half of the data
        exactly, so ``exp(-f/τ)`` is undefined: pass an explicit temperature).

    Example:
      >>> import flowjax
      >>> flowjax.median_temperature([0.5, 2.0, 1.0, 4.0])
      1.5
    """
    x = _host_losses(losses)
    tau = float(np.median(x))
    _check_median(tau)
    return tau


def flow_weights(
    losses: ArrayLike,
    temperature: Temperature | ArrayLike = "median",
    *,
    normalize: Normalize = None,
) -> tuple[ArrayLike, float | jax.Array]:
    """FLOW weights ``w_i = exp(-f_i(θ*) / τ)`` (Sanyal et al., 2025, Algorithm 1).

    .. math::
        w_i = \\exp(-f_i/\\tau), \\quad
        \\text{"mean"}: w_i \\leftarrow n\\,w_i/\\textstyle\\sum_j w_j, \\quad
        \\text{"sum"}: w_i \\leftarrow w_i/\\textstyle\\sum_j w_j = \\pi^*_i

    With ``normalize=None`` the weights are exactly the paper's and lie in
    (0, 1]; training on ``Σ w_i f_i / n`` then runs at an effective learning
    rate scaled by the mean weight (about e^-1 at the median). ``"mean"``
    rescales them to mean 1, so the weighted loss keeps the learning rate of
    unweighted fine-tuning; ``"sum"`` gives the distribution π* of the
    paper's Proposition 4.3. Normalised weights are computed in log space
    (``log w - logsumexp(log w)``), so they neither overflow nor all underflow
    to 0 when an explicit small τ is given.

    Args:
      losses: per-example pre-trained losses ``f_i(θ*) >= 0`` (numpy or jax).
      temperature: ``"median"`` (the paper's default) or a number > 0.
      normalize: ``None``, ``"mean"`` or ``"sum"``.

    Returns:
      ``(weights, tau)``: weights with the shape of ``losses`` (numpy input:
      numpy in the input's float dtype; jax input: jax array), and the τ used
      (a float for numpy input, a jax scalar for jax input).

    Raises:
      ValueError: empty input, NaN/inf or negative losses, ``temperature <= 0``
        or not finite, a median loss of 0, or an unknown ``normalize``. Under
        ``jax.jit`` these cannot be detected and give NaN weights instead.

    Example:
      >>> import numpy as np, flowjax
      >>> w, tau = flowjax.flow_weights(np.array([0.0, 1.0, 2.0]))
      >>> tau, np.round(w, 4)
      (1.0, array([1.    , 0.3679, 0.1353]))
      >>> np.round(flowjax.flow_weights(np.array([0.0, 1.0, 2.0]), normalize="mean")[0].mean(), 6)
      np.float64(1.0)
    """
    return _exp_weights(losses, temperature, normalize, sign=-1.0)


def dro_weights(
    losses: ArrayLike,
    temperature: Temperature | ArrayLike,
    *,
    normalize: Normalize = None,
) -> tuple[ArrayLike, float | jax.Array]:
    """DRO weights ``exp(+f_i / τ)``: the hard-sample contrast to FLOW (Qi et al., 2021).

    .. math:: \\pi_i \\propto \\exp(+f_i/\\tau)

    This is the inner maximiser of
    :math:`\\max_{\\pi\\in\\Delta_n} \\sum_i \\pi_i f_i - \\tau\\sum_i \\pi_i\\log\\pi_i`.
    In DRO the losses are those of the *current* model (the weights are
    dynamic); FLOW's are static, from the pre-trained model. Use
    ``normalize="sum"`` (the distribution π) or ``"mean"`` for training: they
    are computed in log space and never overflow. With ``normalize=None`` the
    raw ``exp(f/τ)`` is returned and an overflow raises (concrete input).
    For DRO *training*, where the weights follow the current model every
    step, use :func:`flowjax.dro_loss` on the batch's current losses.

    Args:
      losses: per-example losses (numpy or jax); any finite values.
      temperature: ``"median"`` or a number > 0.
      normalize: ``None``, ``"mean"`` or ``"sum"``.

    Returns:
      ``(weights, tau)`` as in :func:`flow_weights`.

    Raises:
      ValueError: empty input, NaN/inf losses, a bad temperature, or
        ``exp(f/τ)`` overflowing with ``normalize=None``.

    Example:
      >>> import numpy as np, flowjax
      >>> w, _ = flowjax.dro_weights(np.array([0.0, 1.0, 2.0]), 1.0, normalize="sum")
      >>> np.round(w, 4)
      array([0.09  , 0.2447, 0.6652])
    """
    return _exp_weights(losses, temperature, normalize, sign=+1.0)


def _host_losses(losses, *, non_negative: bool = True, ids=None) -> np.ndarray:
    """Validated float64 host copy of concrete losses."""
    if not _checks.is_concrete(losses):
        raise ValueError(
            "median_temperature needs concrete losses (it returns a Python float); "
            'inside jax.jit use flowjax.flow_weights(losses, "median"), which is jittable.'
        )
    x = np.asarray(losses)
    _checks.check_not_empty(x, "losses")
    x = x.astype(np.float64)
    _checks.check_finite(x, "losses", ids)
    if non_negative:
        _checks.check_non_negative(x, "losses", ids)
    return x


def _check_median(tau: float) -> None:
    if tau == 0.0:
        raise ValueError(
            "the median pre-trained loss is 0: the pre-trained model fits at least half of the "
            "fine-tuning examples exactly, so τ = median gives exp(-f/0). Pass an explicit "
            "temperature > 0 (e.g. the mean loss, or a small quantile of the non-zero losses)."
        )


def _exp_weights(losses, temperature, normalize, *, sign: float, ids=None):
    if normalize not in _NORMALIZE:
        raise ValueError(f'normalize must be None, "mean" or "sum"; got {normalize!r}.')
    if not (isinstance(temperature, str) and temperature == "median"):
        _checks.check_temperature(temperature)
    flow = sign < 0
    if isinstance(losses, jax.Array):  # jax arrays and tracers: stay in jax (jittable)
        return _exp_weights_jax(
            losses, temperature, normalize, sign=sign, flow=flow, ids=ids
        )

    x = _host_losses(losses, non_negative=flow, ids=ids)
    in_dtype = np.asarray(losses).dtype
    out_dtype = in_dtype if np.issubdtype(in_dtype, np.floating) else np.float64
    if isinstance(temperature, str):
        tau = float(np.median(x))
        _check_median(tau)
    else:
        tau = float(np.asarray(temperature))
    log_w = sign * x / tau
    with np.errstate(over="ignore"):
        w = _normalized_exp(np, log_w, normalize)
    _check_overflow(w, normalize)
    return w.astype(out_dtype), tau


def _exp_weights_jax(losses, temperature, normalize, *, sign, flow, ids):
    x = (
        losses
        if jnp.issubdtype(losses.dtype, jnp.floating)
        else losses.astype(jnp.float32)
    )
    if x.size == 0:
        raise ValueError("losses is empty: FLOW needs at least one example.")
    concrete = _checks.is_concrete(x)
    if concrete:
        _host_losses(x, non_negative=flow, ids=ids)
    if isinstance(temperature, str):
        tau = jnp.median(x)
        if concrete:
            _check_median(float(tau))
    else:
        tau = jnp.asarray(temperature, dtype=x.dtype)
    # Under jit a bad τ cannot raise: make every weight NaN rather than 0 or inf. The
    # guard goes on the final weights: XLA:CPU may turn exp(NaN) into 0 inside jit.
    tau_ok = jnp.isfinite(tau) & (tau > 0)
    log_w = sign * x / jnp.where(tau_ok, tau, 1)
    w = jnp.where(tau_ok, _normalized_exp(jnp, log_w, normalize), jnp.nan)
    if concrete:
        _check_overflow(np.asarray(w), normalize)
    return w, tau


def _normalized_exp(xp, log_w, normalize):
    if normalize is None:
        return xp.exp(log_w)
    m = xp.max(log_w)
    lse = m + xp.log(xp.sum(xp.exp(log_w - m)))
    if normalize == "mean":
        lse = lse - np.log(log_w.size)
    return xp.exp(log_w - lse)


def _check_overflow(w: np.ndarray, normalize) -> None:
    if normalize is None and not np.all(np.isfinite(w)):
        raise ValueError(
            f"exp(f/τ) overflows for {int((~np.isfinite(w)).sum())} examples; use "
            'normalize="sum" or "mean", which are computed in log space.'
        )
