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

Both functions take an array of losses and return an array of weights (for a
:class:`flowjax.LossTable`, ``table.flow_weights()`` returns a
:class:`flowjax.WeightTable` that also records τ; :func:`median_temperature`
gives τ of an array). Numpy input is computed in float64 and returned in the
input's float dtype; jax input stays in jax and the whole computation is
jittable. Concrete input is validated (NaN/inf, negative losses, empty input,
bad temperature, a median of 0) with a ``ValueError``; under ``jax.jit``
values cannot be inspected, so invalid input yields NaN weights there, never a
plausible number: a NaN, infinite or (for FLOW) negative loss makes its own
weight NaN, and every weight NaN whenever the result depends on all losses (a
median temperature or a normalisation).
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
        exactly, so ``exp(-f/τ)`` is undefined: pass an explicit temperature),
        or if it is traced (inside ``jax.jit``: ``flow_weights(losses)`` with
        ``temperature=None`` computes the median there).

    Example:
      >>> import flowjax
      >>> flowjax.median_temperature([0.5, 2.0, 1.0, 4.0])
      1.5
    """
    if not _checks.is_concrete(losses):
        raise ValueError(
            "median_temperature needs concrete losses (it returns a Python float); "
            "inside jax.jit use flowjax.flow_weights(losses), whose default "
            "temperature=None is the median and which is jittable."
        )
    x, _ = _host_selected(losses, None, non_negative=True)
    return _median(x)


def flow_weights(
    losses: ArrayLike,
    temperature: Temperature = None,
    *,
    normalize: Normalize = None,
) -> ArrayLike:
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
      temperature: ``None`` for the paper's median
        (:func:`median_temperature`), or a number > 0.
      normalize: ``None``, ``"mean"`` or ``"sum"``.

    Returns:
      The weights, with the shape of ``losses``: numpy input gives numpy in the
      input's float dtype, jax input a jax array. (For τ itself use
      :func:`median_temperature`; ``LossTable.flow_weights()`` returns a
      :class:`flowjax.WeightTable` that records it.)

    Raises:
      ValueError: empty input, NaN/inf or negative losses, ``temperature <= 0``
        or not finite, a median loss of 0, or an unknown ``normalize``. Under
        ``jax.jit`` the value checks cannot run: a bad loss gives a NaN
        weight (every weight NaN with a median τ or a normalisation), a bad
        τ or a median of 0 gives all NaN.

    Example:
      >>> import numpy as np, flowjax
      >>> np.round(flowjax.flow_weights(np.array([0.0, 1.0, 2.0])), 4)  # τ = median = 1
      array([1.    , 0.3679, 0.1353])
      >>> np.round(flowjax.flow_weights(np.array([0.0, 1.0, 2.0]), normalize="mean").mean(), 6)
      np.float64(1.0)
    """
    return _exp_weights(losses, temperature, normalize, sign=-1.0)[0]


def dro_weights(
    losses: ArrayLike,
    temperature: Temperature = None,
    *,
    normalize: Normalize = None,
) -> ArrayLike:
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
      temperature: ``None`` (the median of the losses) or a number > 0.
      normalize: ``None``, ``"mean"`` or ``"sum"``.

    Returns:
      The weights, as in :func:`flow_weights`.

    Raises:
      ValueError: empty input, NaN/inf losses, a bad temperature, or
        ``exp(f/τ)`` overflowing with ``normalize=None``. Under ``jax.jit``:
        NaN weights instead, as in :func:`flow_weights`.

    Example:
      >>> import numpy as np, flowjax
      >>> np.round(flowjax.dro_weights(np.array([0.0, 1.0, 2.0]), 1.0, normalize="sum"), 4)
      array([0.09  , 0.2447, 0.6652])
    """
    return _exp_weights(losses, temperature, normalize, sign=+1.0)[0]


def _host_selected(losses, where, *, non_negative: bool, ids=None):
    """Validated float64 host copy of the counted entries of concrete losses.

    Returns ``(selected, selected_ids)``: the entries where ``where`` is True
    (all entries when it is None), flattened, and the id of each (ids name the
    rows of ``losses``; None when there are no ids).
    """
    x = np.asarray(losses)
    if where is None:
        sel, sel_ids = x.reshape(-1), None if ids is None else np.asarray(ids)
        _checks.check_not_empty(sel, "losses")
    else:
        m = np.asarray(where, bool)
        sel = x[m]
        if ids is not None:
            sel_ids = np.broadcast_to(
                np.reshape(ids, (-1,) + (1,) * (x.ndim - 1)), x.shape
            )[m]
        else:
            sel_ids = None
        if sel.size == 0:
            raise ValueError(
                "the mask selects no entry (no target token): the median of nothing "
                "gives no temperature."
            )
    sel = sel.astype(np.float64)
    _checks.check_finite(sel, "losses", sel_ids)
    if non_negative:
        _checks.check_non_negative(sel, "losses", sel_ids)
    return sel, sel_ids


def _median(x: np.ndarray) -> float:
    tau = float(np.median(x))
    if tau < 0.0:  # only DRO's losses may be negative
        raise ValueError(
            f"the median loss is {tau:.4g} < 0, which is no temperature: pass an explicit "
            "temperature > 0."
        )
    if tau == 0.0:
        raise ValueError(
            "the median pre-trained loss is 0: the pre-trained model fits at least half of the "
            "fine-tuning examples exactly, so τ = median gives exp(-f/0). Pass an explicit "
            "temperature > 0 (e.g. the mean loss, or a small quantile of the non-zero losses)."
        )
    return tau


def _exp_weights(losses, temperature, normalize, *, sign: float, where=None, ids=None):
    """``(weights, τ)`` of ``exp(sign f / τ)``, normalised over the counted entries.

    ``where`` (optional, the shape of ``losses``) selects the entries that
    count: the others get weight 0 and take no part in τ or the normalisation
    (the token tables' padding). ``ids`` name the rows in error messages.
    """
    if normalize not in _NORMALIZE:
        raise ValueError(f'normalize must be None, "mean" or "sum"; got {normalize!r}.')
    if temperature is not None:
        _checks.check_temperature(temperature)
    flow = sign < 0
    if isinstance(losses, jax.Array):  # jax arrays and tracers: stay in jax (jittable)
        return _exp_weights_jax(losses, temperature, normalize, sign, flow, where, ids)

    x = np.asarray(losses)
    sel, _ = _host_selected(x, where, non_negative=flow, ids=ids)
    out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    tau = _median(sel) if temperature is None else float(np.asarray(temperature))
    with np.errstate(over="ignore"):
        w_sel = _normalized_exp(np, sign * sel / tau, normalize)
    _check_overflow(w_sel, normalize)
    if where is None:
        return w_sel.reshape(x.shape).astype(out_dtype), tau
    w = np.zeros(x.shape, out_dtype)
    w[np.asarray(where, bool)] = w_sel
    return w, tau


def _exp_weights_jax(losses, temperature, normalize, sign, flow, where, ids):
    x = (
        losses
        if jnp.issubdtype(losses.dtype, jnp.floating)
        else losses.astype(jnp.float32)
    )
    if x.size == 0:
        raise ValueError("losses is empty: FLOW needs at least one example.")
    m = None if where is None else jnp.asarray(where, bool)
    concrete = _checks.is_concrete(x) and (m is None or _checks.is_concrete(m))
    if concrete:
        sel, _ = _host_selected(x, m, non_negative=flow, ids=ids)
        if temperature is None:
            _median(sel)
    # Under jit nothing can raise. A bad loss (NaN, inf, or negative for FLOW) gets a
    # NaN weight; when every weight depends on every loss (median τ, normalisation),
    # all weights become NaN. A bad τ (<= 0, a median of 0) makes them all NaN too.
    bad = ~jnp.isfinite(x)
    if flow:
        bad = bad | (x < 0)
    if m is not None:
        bad = bad & m
    if temperature is None:
        tau = jnp.median(x) if m is None else jnp.nanmedian(jnp.where(m, x, jnp.nan))
    else:
        tau = jnp.asarray(temperature, dtype=x.dtype)
    tau_ok = jnp.isfinite(tau) & (tau > 0)
    if temperature is None or normalize is not None:
        bad = bad | jnp.any(bad)
    log_w = sign * jnp.where(bad, 0, x) / jnp.where(tau_ok, tau, 1)
    w = _normalized_exp(jnp, log_w, normalize, m)
    # The guard goes on the final weights: XLA:CPU may turn exp(NaN) into 0 inside jit.
    w = jnp.where(tau_ok & ~bad, w, jnp.nan)
    if m is not None:
        w = jnp.where(m, w, 0)
    if concrete:
        _check_overflow(np.asarray(w), normalize)
    return w, tau


def _normalized_exp(xp, log_w, normalize, where=None):
    """``exp(log_w)``, normalised to sum 1 (``"sum"``) or mean 1 (``"mean"``) over ``where``."""
    if normalize is None:
        return xp.exp(log_w)
    if where is not None:
        log_w = xp.where(where, log_w, -xp.inf)
    m = xp.max(log_w)
    lse = m + xp.log(xp.sum(xp.exp(log_w - m)))
    if normalize == "mean":
        count = log_w.size if where is None else xp.sum(where)
        lse = lse - xp.log(count)
    return xp.exp(log_w - lse)


def _check_overflow(w: np.ndarray, normalize) -> None:
    if normalize is None and not np.all(np.isfinite(w)):
        raise ValueError(
            f"exp(f/τ) overflows for {int((~np.isfinite(w)).sum())} examples; use "
            'normalize="sum" or "mean", which are computed in log space.'
        )
