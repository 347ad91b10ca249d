"""FLOW in the linear model of the paper's section 7, as tested code.

Setting (Sanyal et al., ICML 2025, §7.1). Pre-training: :math:`x \\sim \\mathcal P`
on :math:`\\mathbb R^d` with :math:`\\Sigma = \\mathbb E[xx^\\top] \\succeq I`,
noiseless :math:`y = \\langle\\theta^*, x\\rangle`; θ* is the pre-trained model.
Fine-tuning: :math:`\\tilde x \\sim \\mathcal N(0, \\tilde\\Sigma)`,
:math:`\\tilde y = \\langle\\tilde\\theta^*, \\tilde x\\rangle`, with

.. math::
    e = \\theta^* - \\tilde\\theta^*, \\quad \\hat e = e/\\|e\\|, \\quad
    \\hat e_\\perp \\perp \\hat e, \\quad
    \\tilde\\Sigma = I + \\rho(\\hat e\\hat e_\\perp^\\top + \\hat e_\\perp\\hat e^\\top),
    \\ \\rho\\in[0, 1).

Errors: :math:`\\mathrm{err}_1(\\theta) = (\\theta-\\theta^*)^\\top\\Sigma(\\theta-\\theta^*)`
(forgetting), :math:`\\mathrm{err}_2(\\theta) =
(\\theta-\\tilde\\theta^*)^\\top\\tilde\\Sigma(\\theta-\\tilde\\theta^*)` (target).
Gradient descent on a quadratic :math:`(\\theta - t)^\\top C (\\theta - t)` with step η
(gradient :math:`2C(\\theta - t)`, no ½) from θ* gives
:math:`\\theta_K = t + (I - 2\\eta C)^K(\\theta^* - t)`: vanilla fine-tuning has
:math:`C = \\tilde\\Sigma` (Eq. 6), FLOW has the weighted covariance
:math:`C = \\Sigma' = \\mathbb E[w\\tilde x\\tilde x^\\top]`,
:math:`w = \\exp(-(e^\\top\\tilde x)^2/\\tau)` (Theorem 7.2).

Contents, in the paper's order:

* setting: :class:`LinearSetting`, :func:`make_setting`;
* Theorem 7.2: :func:`flow_mu`, :func:`flow_q`, :func:`flow_covariance`, and
  its Monte-Carlo check :func:`flow_covariance_mc`;
* Lemma F.3 / footnote 5: :func:`mu_from_beta`, :func:`temperature_from_beta`,
  :func:`beta_from_temperature`, :func:`q_eigenvalues`, :func:`q_eigen`;
* trajectories: :func:`gd_closed_form`, :func:`gd_iterate`,
  :func:`gd_trajectory` (Eq. 6 / Theorem 7.2 for any τ, η),
  :func:`vanilla_trajectory` (Eq. 12), :func:`flow_trajectory` (Eq. 14),
  :func:`flow_trajectory_stalled` (Remark 7.4);
* :func:`errors`; model averaging :func:`model_average` and its optimum
  :func:`best_model_average` (Lemma F.4);
* the median temperature: :func:`median_chi2_1`, :func:`median_heuristic_temperature`,
  :func:`median_heuristic_temperature_mc`;
* :func:`finite_sample_flow`: n samples weighted by :func:`flowjax.flow_weights`
  and trained on :func:`flowjax.weighted_objective`, the code users run.

Precision and purity. Every function computes in float64 inside
``jax.enable_x64(True)``, a context manager: the caller's global
``jax_enable_x64`` is left as it was. Results come back as numpy float64 arrays
(Python floats for scalars), so they keep their precision whatever that global
setting is. The functions run on the host and are not meant to be called under
``jax.jit``. Invalid input raises ``ValueError`` (``TypeError`` for a wrong
object type) before any computation.

Reparametrisation note: the paper's parse of Lemma F.3 writes μ where μ² is
meant; this module uses the corrected
:math:`\\mu^2 = \\beta(1-\\rho^2)/((1+\\beta)(1-\\beta\\rho^2))`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp_special
import numpy as np

from flowjax.objectives import weighted_objective
from flowjax.weights import flow_weights, median_temperature

__all__ = [
    "Errors",
    "FiniteSampleFlow",
    "LinearSetting",
    "MonteCarloEstimate",
    "QEigen",
    "best_model_average",
    "beta_from_temperature",
    "errors",
    "finite_sample_flow",
    "flow_covariance",
    "flow_covariance_mc",
    "flow_mu",
    "flow_q",
    "flow_trajectory",
    "flow_trajectory_stalled",
    "gd_closed_form",
    "gd_iterate",
    "gd_trajectory",
    "make_setting",
    "median_chi2_1",
    "median_heuristic_temperature",
    "median_heuristic_temperature_mc",
    "model_average",
    "mu_from_beta",
    "q_eigen",
    "q_eigenvalues",
    "temperature_from_beta",
    "vanilla_trajectory",
]

_SYM_TOL = 1e-10  # relative tolerance for "Σ is symmetric" and "Σ ⪰ I"


# --------------------------------------------------------------------------
# Result containers
# --------------------------------------------------------------------------


class LinearSetting(NamedTuple):
    """The section-7 model: both optima, the shift e and both covariances.

    Build it with :func:`make_setting`, which validates the input. All arrays
    are numpy float64; vectors have shape ``[d]``, matrices ``[d, d]``.

    Attributes:
      theta_star: θ*, the pre-trained model (pre-training optimum).
      theta_ft: θ̃*, the fine-tuning optimum.
      e: e = θ* − θ̃*.
      e_hat: ê = e / ‖e‖.
      e_perp: ê⊥, a unit vector orthogonal to ê.
      sigma: Σ, the pre-training covariance (Σ ⪰ I).
      sigma_ft: Σ̃ = I + ρ(êê⊥ᵀ + ê⊥êᵀ), the fine-tuning covariance.
      rho: ρ ∈ [0, 1).
      e_norm: ‖e‖ > 0.
    """

    theta_star: np.ndarray
    theta_ft: np.ndarray
    e: np.ndarray
    e_hat: np.ndarray
    e_perp: np.ndarray
    sigma: np.ndarray
    sigma_ft: np.ndarray
    rho: float
    e_norm: float

    @property
    def d(self) -> int:
        """The dimension d."""
        return int(self.e.shape[0])


class Errors(NamedTuple):
    """err₁ (pre-training, forgetting), err₂ (fine-tuning) and their sum."""

    err1: np.ndarray
    err2: np.ndarray
    err_tot: np.ndarray


class MonteCarloEstimate(NamedTuple):
    """An elementwise Monte-Carlo mean with its standard error."""

    mean: np.ndarray
    stderr: np.ndarray
    num_samples: int


class QEigen(NamedTuple):
    """The two non-zero eigenpairs of Q (Lemma F.3); eigenvectors have unit norm."""

    lambda1: float
    lambda2: float
    v1: np.ndarray
    v2: np.ndarray


class FiniteSampleFlow(NamedTuple):
    """FLOW run on n samples through :func:`flowjax.flow_weights`.

    Attributes:
      thetas: the GD iterates at the requested steps, ``[len(steps), d]``.
      temperature: the temperature τ used (the empirical median loss by default).
      eta: the step size used.
      weights: the per-example FLOW weights ``[n]``.
      covariance: the weighted empirical covariance ``Xᵀ diag(w) X / n``, the
        finite-sample counterpart of Σ′.
    """

    thetas: np.ndarray
    temperature: float
    eta: float
    weights: np.ndarray
    covariance: np.ndarray


# --------------------------------------------------------------------------
# float64 plumbing and validation
# --------------------------------------------------------------------------


def _to_host(x):
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        a = np.asarray(x)
        if a.dtype.kind == "f":
            a = a.astype(np.float64)
        return float(a) if a.ndim == 0 and a.dtype.kind == "f" else a
    return x


def _float64(fn):
    """Runs ``fn`` under ``jax.enable_x64(True)`` and returns numpy/float results."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            out = fn(*args, **kwargs)
            return jax.tree.map(_to_host, out)

    return wrapper


def _f64(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float64)


def _scalar(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real | np.ndarray | jax.Array):
        raise ValueError(f"{name} must be a real number; got {x!r}.")
    a = np.asarray(x)
    if a.ndim != 0 or a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a real scalar; got {x!r}.")
    v = float(a)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v}.")
    return v


def _real_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be real numbers; got dtype {a.dtype}.")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite; got {a}.")
    return a


def _check_rho(rho) -> float:
    r = _scalar(rho, "rho")
    if not 0.0 <= r < 1.0:
        raise ValueError(
            f"rho must lie in [0, 1) (Σ̃ = I + ρ(êê⊥ᵀ + ê⊥êᵀ) has eigenvalues 1 ± ρ); got {r}."
        )
    return r


def _check_e_norm(e_norm) -> float:
    v = _scalar(e_norm, "e_norm")
    if v <= 0.0:
        raise ValueError(f"e_norm = ‖e‖ must be > 0; got {v}.")
    return v


def _check_temperature(temperature) -> np.ndarray:
    t = _real_array(temperature, "temperature")
    if np.any(t <= 0):
        raise ValueError(
            f"temperature must be > 0 (w = exp(-(eᵀx̃)²/τ)); got {temperature!r}."
        )
    return t


def _check_beta(beta) -> np.ndarray:
    b = _real_array(beta, "beta")
    if np.any((b <= 0) | (b > 1)):
        raise ValueError(
            f"beta must lie in (0, 1] (Lemma F.3; β = 1 is τ = 2‖e‖²); got {beta!r}."
        )
    return b


def _check_eta(eta) -> float:
    v = _scalar(eta, "eta")
    if v <= 0:
        raise ValueError(f"eta (the step size) must be > 0; got {v}.")
    return v


def _check_steps(steps) -> np.ndarray:
    s = np.asarray(steps)
    if s.ndim == 0:
        s = s.reshape(1)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(
            f"steps must be a non-empty 1-D sequence of integers; got {steps!r}."
        )
    if s.dtype.kind == "f" and np.all(np.isfinite(s)) and np.all(s == np.round(s)):
        s = s.astype(np.int64)
    if s.dtype.kind not in "iu" or np.any(s < 0):
        raise ValueError(f"steps must be integers >= 0; got {steps!r}.")
    return s.astype(np.int64)


def _check_count(n, name: str, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {n!r}.")
    return int(n)


def _check_setting(setting) -> LinearSetting:
    if not isinstance(setting, LinearSetting):
        raise TypeError(
            f"expected a LinearSetting (build one with make_setting); got {type(setting).__name__}."
        )
    return setting


def _check_key(key) -> None:
    ok = isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    )
    if not ok:
        raise TypeError(
            f"key must be a JAX PRNG key (jax.random.key(seed)); got {key!r}."
        )


def _check_matrix(c, d: int, name: str) -> np.ndarray:
    a = _real_array(c, name)
    if a.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}); got {a.shape}.")
    scale = max(1.0, float(np.max(np.abs(a))))
    if np.max(np.abs(a - a.T)) > _SYM_TOL * scale:
        raise ValueError(
            f"{name} must be symmetric; max |C - Cᵀ| = {np.max(np.abs(a - a.T)):.3g}."
        )
    return 0.5 * (a + a.T)


def _check_quadratic(cov, target, theta0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validated float64 (C, t, θ₀) of a quadratic GD problem."""
    t = _real_array(target, "target")
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"target must be a vector [d]; got shape {t.shape}.")
    d = t.shape[0]
    th0 = _real_array(theta0, "theta0")
    if th0.shape != (d,):
        raise ValueError(f"theta0 must have shape ({d},) like target; got {th0.shape}.")
    c = _check_matrix(cov, d, "cov")
    return _f64(c), _f64(t), _f64(th0)


# --------------------------------------------------------------------------
# Gaussian draws
# --------------------------------------------------------------------------

# Every random draw comes from fixed-size chunks, so XLA compiles the (slow to
# compile) Threefry normal sampler once per dimension d, whatever n is.
_CHUNK = 8192


@functools.partial(jax.jit, static_argnames=("d",))
def _normal_chunk(key, i, *, d):
    return jax.random.normal(jax.random.fold_in(key, i), (_CHUNK, d), jnp.float64)


def _standard_normal_chunks(key: jax.Array, n: int, d: int):
    """Yields ``(z, m)``: ceil(n / _CHUNK) chunks of N(0, I_d) rows, the first m valid."""
    for i in range(-(-n // _CHUNK)):
        yield _normal_chunk(key, i, d=d), min(_CHUNK, n - i * _CHUNK)


def _subkey(key: jax.Array, purpose: int) -> jax.Array:
    """Independent streams from one user key: 0 for the setting, 1 for samples."""
    return jax.random.fold_in(key, purpose)


# --------------------------------------------------------------------------
# The setting
# --------------------------------------------------------------------------


@jax.jit
def _build_setting(z, rho, e_norm):
    theta_ft, e_hat, u = z[0], z[1], z[2]
    d = z.shape[1]
    e_hat = e_hat / jnp.linalg.norm(e_hat)
    u = u - (u @ e_hat) * e_hat
    u = u - (u @ e_hat) * e_hat  # second Gram-Schmidt pass: exact to rounding
    e_perp = u / jnp.linalg.norm(u)
    sigma_ft = jnp.eye(d) + rho * (jnp.outer(e_hat, e_perp) + jnp.outer(e_perp, e_hat))
    return theta_ft, e_norm * e_hat, e_hat, e_perp, sigma_ft


@_float64
def make_setting(
    key: jax.Array,
    d: int,
    rho: float,
    e_norm: float,
    sigma: np.typing.ArrayLike | None = None,
) -> LinearSetting:
    """Draws the section-7 setting: θ̃*, the shift e, ê⊥ and Σ̃.

    .. math::
        \\tilde\\theta^* \\sim \\mathcal N(0, I_d),\\quad
        \\hat e, \\hat e_\\perp \\text{ uniform orthonormal pair},\\quad
        \\theta^* = \\tilde\\theta^* + \\|e\\|\\hat e,\\quad
        \\tilde\\Sigma = I + \\rho(\\hat e\\hat e_\\perp^\\top + \\hat e_\\perp\\hat e^\\top).

    This is the paper's §7.1 (the sign e = θ* − θ̃* is the one forced by
    Eqs. 6, 12 and 16). The random draws only place ê, ê⊥ and θ̃*; with Σ = I
    nothing depends on them, otherwise err₁ sees them through Σ restricted to
    span{ê, ê⊥} (e.g. eᵀΣe).

    Args:
      key: a JAX PRNG key.
      d: the dimension, at least 2 (ê⊥ must exist).
      rho: ρ ∈ [0, 1), the correlation of Σ̃ between ê and ê⊥.
      e_norm: ‖e‖ > 0.
      sigma: the pre-training covariance Σ, symmetric ``[d, d]`` with Σ ⪰ I
        (the paper's WLOG normalisation). Defaults to I.

    Returns:
      A :class:`LinearSetting`.

    Raises:
      ValueError: d < 2, ρ outside [0, 1), ‖e‖ <= 0, or Σ of the wrong shape,
        not finite, not symmetric, or not ⪰ I.
      TypeError: ``key`` is not a PRNG key.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting
      >>> s = make_setting(jax.random.key(0), d=4, rho=0.5, e_norm=2.0)
      >>> float(np.linalg.norm(s.e)), round(float(s.e_hat @ s.e_perp), 12)
      (2.0, 0.0)
      >>> np.round(np.linalg.eigvalsh(s.sigma_ft), 6)
      array([0.5, 1. , 1. , 1.5])
    """
    _check_key(key)
    d = _check_count(d, "d", 2)
    rho = _check_rho(rho)
    e_norm = _check_e_norm(e_norm)
    if sigma is None:
        sigma = np.eye(d)
    else:
        sigma = _check_matrix(sigma, d, "sigma")
        min_eig = float(np.linalg.eigvalsh(sigma)[0])
        if min_eig < 1.0 - _SYM_TOL * max(1.0, float(np.max(np.abs(sigma)))):
            raise ValueError(
                f"sigma must satisfy Σ ⪰ I (the paper's normalisation); its smallest "
                f"eigenvalue is {min_eig:.6g} < 1."
            )
    z = _normal_chunk(_subkey(key, 0), 0, d=d)
    theta_ft, e, e_hat, e_perp, sigma_ft = _build_setting(z, rho, e_norm)
    return LinearSetting(
        theta_star=theta_ft + e,
        theta_ft=theta_ft,
        e=e,
        e_hat=e_hat,
        e_perp=e_perp,
        sigma=_f64(sigma),
        sigma_ft=sigma_ft,
        rho=rho,
        e_norm=e_norm,
    )


def _arrays(setting: LinearSetting):
    s = _check_setting(setting)
    return (
        _f64(s.theta_star),
        _f64(s.theta_ft),
        _f64(s.e),
        _f64(s.e_hat),
        _f64(s.e_perp),
        _f64(s.sigma),
        _f64(s.sigma_ft),
    )


# --------------------------------------------------------------------------
# Theorem 7.2: the weighted covariance
# --------------------------------------------------------------------------


@jax.jit
def _mu_from_temperature(tau, e_norm):
    return jnp.sqrt(tau / (tau + 2.0 * e_norm**2))


@jax.jit
def _q_matrix(e_hat, e_perp, rho, mu):
    mu2 = mu**2
    return (
        (1.0 - mu2) * jnp.outer(e_hat, e_hat)
        + rho**2 * (1.0 - mu2) * jnp.outer(e_perp, e_perp)
        - rho * mu2 * (jnp.outer(e_hat, e_perp) + jnp.outer(e_perp, e_hat))
    )


@jax.jit
def _flow_cov(e_hat, e_perp, rho, mu):
    return mu * (jnp.eye(e_hat.shape[0]) - _q_matrix(e_hat, e_perp, rho, mu))


@_float64
def flow_mu(temperature, e_norm: float):
    """μ of Theorem 7.2: the Gaussian normalising factor of the FLOW weights.

    .. math:: \\mu = \\Big(\\frac{\\tau}{\\tau + 2\\|e\\|^2}\\Big)^{1/2}

    It is :math:`\\det(I + \\tilde\\Sigma A)^{-1/2}` with :math:`A = (2/\\tau)ee^\\top`,
    and :math:`\\mathbb E[w] = \\mu`. μ → 1 as τ → ∞ (uniform weights) and μ → 0
    as τ → 0.

    Args:
      temperature: the temperature τ > 0 (scalar or array).
      e_norm: ‖e‖ > 0.

    Returns:
      μ, a float or an array shaped like ``temperature``.

    Raises:
      ValueError: τ <= 0 or not finite, ‖e‖ <= 0.

    Example:
      >>> from flowjax.theory import flow_mu
      >>> flow_mu(2.0, 1.0) ** 2  # τ = 2‖e‖² is β = 1, μ² = 1/2
      0.5
    """
    t = _f64(_check_temperature(temperature))
    e_norm = _check_e_norm(e_norm)
    return _mu_from_temperature(t, e_norm)


@_float64
def flow_q(setting: LinearSetting, temperature: float) -> np.ndarray:
    """The matrix Q of Theorem 7.2, with Σ′ = μ(I − Q).

    .. math::
        Q = (1-\\mu^2)\\hat e\\hat e^\\top + \\rho^2(1-\\mu^2)\\hat e_\\perp\\hat e_\\perp^\\top
            - \\rho\\mu^2(\\hat e\\hat e_\\perp^\\top + \\hat e_\\perp\\hat e^\\top)

    With the comparable step η = 1/(2μ) (§7, "comparable step sizes"), Q is
    FLOW's GD iteration matrix: I − 2ηΣ′ = Q.

    Args:
      setting: a :class:`LinearSetting`.
      temperature: the temperature τ > 0.

    Returns:
      Q, ``[d, d]``.

    Raises:
      ValueError: τ <= 0 or not finite.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, flow_q
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.0, e_norm=1.0)
      >>> q = flow_q(s, temperature=2.0)  # ρ = 0: Q = (1 - μ²) êêᵀ = êêᵀ / 2
      >>> bool(np.allclose(q, 0.5 * np.outer(s.e_hat, s.e_hat)))
      True
    """
    _, _, _, e_hat, e_perp, _, _ = _arrays(setting)
    tau = _scalar(temperature, "temperature")
    _check_temperature(tau)
    return _q_matrix(
        e_hat, e_perp, setting.rho, _mu_from_temperature(tau, setting.e_norm)
    )


@_float64
def flow_covariance(setting: LinearSetting, temperature: float) -> np.ndarray:
    """FLOW's weighted covariance Σ′ = E[w x̃x̃ᵀ] in closed form (Theorem 7.2).

    .. math::
        \\Sigma' = \\mathbb E\\big[e^{-(e^\\top\\tilde x)^2/\\tau}\\,\\tilde x\\tilde x^\\top\\big]
                 = \\mu\\,(I_d - Q),\\qquad
        \\mu = \\Big(\\frac{\\tau}{\\tau+2\\|e\\|^2}\\Big)^{1/2}

    (Gaussian identity :math:`\\mathbb E[e^{-x^\\top Ax/2}xx^\\top] =
    \\det(I+\\tilde\\Sigma A)^{-1/2}(\\tilde\\Sigma^{-1}+A)^{-1}` with
    :math:`A = (2/\\tau)ee^\\top`, then Sherman-Morrison.) FLOW's population
    objective is :math:`(\\theta-\\tilde\\theta^*)^\\top\\Sigma'(\\theta-\\tilde\\theta^*)`.

    Args:
      setting: a :class:`LinearSetting`.
      temperature: the temperature τ > 0.

    Returns:
      Σ′, ``[d, d]``, symmetric positive definite.

    Raises:
      ValueError: τ <= 0 or not finite.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, flow_covariance, flow_mu
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> c = flow_covariance(s, temperature=1e6)  # τ → ∞: w → 1, Σ′ → Σ̃
      >>> bool(np.allclose(c, s.sigma_ft, atol=1e-5))
      True
    """
    _, _, _, e_hat, e_perp, _, _ = _arrays(setting)
    tau = _scalar(temperature, "temperature")
    _check_temperature(tau)
    return _flow_cov(
        e_hat, e_perp, setting.rho, _mu_from_temperature(tau, setting.e_norm)
    )


@jax.jit
def _problem_chunk(z, sigma_ft, theta_ft, theta_star):
    x = z @ jnp.linalg.cholesky(sigma_ft).T
    y = x @ theta_ft
    return x, y, (y - x @ theta_star) ** 2


_median = jax.jit(jnp.median)


def _sample_ft(setting: LinearSetting, key: jax.Array, n: int):
    """``(x, y, losses)`` for n draws x̃ ~ N(0, Σ̃), ỹ = ⟨θ̃*, x̃⟩ (call under enable_x64).

    ``losses`` are the pre-trained squared residuals (ỹ − ⟨θ*, x̃⟩)². The chunks
    are trimmed and joined on the host (numpy float64), which costs no XLA
    compilation for a new n.
    """
    args = (_f64(setting.sigma_ft), _f64(setting.theta_ft), _f64(setting.theta_star))
    parts = [
        [np.asarray(a)[:m] for a in _problem_chunk(z, *args)]
        for z, m in _standard_normal_chunks(_subkey(key, 1), n, setting.d)
    ]
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


@jax.jit
def _moment_chunk(z, num_valid, sigma_ft, e, tau):
    """Σ w x xᵀ and Σ (w x xᵀ)² over the first ``num_valid`` rows of a chunk."""
    x = z @ jnp.linalg.cholesky(sigma_ft).T
    valid = jnp.arange(z.shape[0]) < num_valid
    w = jnp.where(valid, jnp.exp(-((x @ e) ** 2) / tau), 0.0)
    x2 = x * x
    return x.T @ (w[:, None] * x), x2.T @ ((w * w)[:, None] * x2)


@jax.jit
def _mean_and_stderr(s1, s2, n):
    mean = s1 / n
    var = jnp.maximum(s2 / n - mean**2, 0.0) * n / (n - 1)
    return mean, jnp.sqrt(var / n)


@_float64
def flow_covariance_mc(
    setting: LinearSetting,
    temperature: float,
    key: jax.Array,
    num_samples: int,
) -> MonteCarloEstimate:
    """Monte-Carlo estimate of Σ′ = E[w x̃x̃ᵀ], with elementwise standard errors.

    .. math::
        \\hat\\Sigma'_{jk} = \\frac1n\\sum_{i=1}^n w_i\\,\\tilde x_{ij}\\tilde x_{ik},\\quad
        w_i = e^{-(e^\\top\\tilde x_i)^2/\\tau},\\quad \\tilde x_i\\sim\\mathcal N(0,\\tilde\\Sigma),\\quad
        \\mathrm{se}_{jk} = \\sqrt{\\widehat{\\mathrm{Var}}(w\\tilde x_j\\tilde x_k)/n}

    The independent check of Theorem 7.2 (:func:`flow_covariance`). Samples are
    drawn in chunks of 8192, so memory stays ``O(8192 · d)`` for any n.

    Args:
      setting: a :class:`LinearSetting`.
      temperature: the temperature τ > 0.
      key: a JAX PRNG key.
      num_samples: n >= 2.

    Returns:
      A :class:`MonteCarloEstimate` with ``mean`` and ``stderr`` of shape ``[d, d]``.

    Raises:
      ValueError: τ <= 0 or n < 2.
      TypeError: ``setting`` or ``key`` of the wrong type.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, flow_covariance, flow_covariance_mc
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> mc = flow_covariance_mc(s, 0.5, jax.random.key(1), 200_000)
      >>> z = (mc.mean - flow_covariance(s, 0.5)) / mc.stderr
      >>> bool(np.all(np.abs(z) < 5))
      True
    """
    _check_setting(setting)
    tau = _scalar(temperature, "temperature")
    _check_temperature(tau)
    _check_key(key)
    n = _check_count(num_samples, "num_samples", 2)
    args = (_f64(setting.sigma_ft), _f64(setting.e), _f64(tau))
    s1 = s2 = np.zeros((setting.d, setting.d))
    for z, m in _standard_normal_chunks(_subkey(key, 1), n, setting.d):
        c1, c2 = _moment_chunk(z, m, *args)
        s1, s2 = s1 + np.asarray(c1), s2 + np.asarray(c2)
    mean, stderr = _mean_and_stderr(s1, s2, n)
    return MonteCarloEstimate(mean=mean, stderr=stderr, num_samples=n)


# --------------------------------------------------------------------------
# The β ↔ τ reparametrisation and the eigen-analysis (Lemma F.3)
# --------------------------------------------------------------------------


@jax.jit
def _mu_from_beta(b, rho):
    return jnp.sqrt(b * (1 - rho**2) / ((1 + b) * (1 - b * rho**2)))


@jax.jit
def _temperature_from_beta(b, rho, e_norm):
    return 2.0 * b * (1 - rho**2) * e_norm**2 / (1 - b**2 * rho**2)


@jax.jit
def _beta_from_temperature(t, rho, e_norm):
    b = 2.0 * (1 - rho**2) * e_norm**2
    return jnp.minimum(2.0 * t / (b + jnp.sqrt(b**2 + 4.0 * t**2 * rho**2)), 1.0)


@jax.jit
def _q_eigvals(b, rho):
    return (1 + b * rho**2) / (1 + b), rho**2 * (1 - b) / (1 - b * rho**2)


@jax.jit
def _q_eigvecs(e_hat, e_perp, br):
    norm = jnp.sqrt(1 + br**2)
    return (e_hat - br * e_perp) / norm, (br * e_hat + e_perp) / norm


@_float64
def mu_from_beta(beta, rho: float):
    """μ as a function of β (Lemma F.3, with the square restored).

    .. math:: \\mu^2 = \\frac{\\beta(1-\\rho^2)}{(1+\\beta)(1-\\beta\\rho^2)},\\qquad \\beta\\in(0, 1]

    β ∈ (0, 1] covers μ² ∈ (0, ½], i.e. τ ∈ (0, 2‖e‖²]. (The paper's parse
    writes μ for μ²; only μ² is consistent with Theorem 7.2.)

    Args:
      beta: β ∈ (0, 1] (scalar or array).
      rho: ρ ∈ [0, 1).

    Returns:
      μ, a float or an array shaped like ``beta``.

    Raises:
      ValueError: β outside (0, 1] or ρ outside [0, 1).

    Example:
      >>> from flowjax.theory import mu_from_beta
      >>> round(mu_from_beta(1.0, 0.7) ** 2, 12)
      0.5
    """
    b = _f64(_check_beta(beta))
    rho = _check_rho(rho)
    return _mu_from_beta(b, rho)


@_float64
def temperature_from_beta(beta, rho: float, e_norm: float):
    """The temperature τ for a given β (the paper's footnote 5).

    .. math:: \\tau = \\frac{2\\beta(1-\\rho^2)\\|e\\|^2}{1-\\beta^2\\rho^2}

    Equivalent to :func:`mu_from_beta` through μ² = τ/(τ + 2‖e‖²). β = 1 gives
    τ = 2‖e‖²; β → 0 gives τ → 0.

    Args:
      beta: β ∈ (0, 1] (scalar or array).
      rho: ρ ∈ [0, 1).
      e_norm: ‖e‖ > 0.

    Returns:
      τ, a float or an array shaped like ``beta``.

    Raises:
      ValueError: β outside (0, 1], ρ outside [0, 1) or ‖e‖ <= 0.

    Example:
      >>> from flowjax.theory import temperature_from_beta
      >>> temperature_from_beta(1.0, 0.9, 1.5)  # β = 1: τ = 2‖e‖² for every ρ
      4.5
    """
    b = _f64(_check_beta(beta))
    rho = _check_rho(rho)
    e_norm = _check_e_norm(e_norm)
    return _temperature_from_beta(b, rho, e_norm)


@_float64
def beta_from_temperature(temperature, rho: float, e_norm: float):
    """β for a given temperature: the inverse of :func:`temperature_from_beta`.

    Solving :math:`\\tau\\rho^2\\beta^2 + 2(1-\\rho^2)\\|e\\|^2\\beta - \\tau = 0` for its
    positive root, written without cancellation (and valid at ρ = 0):

    .. math:: \\beta = \\frac{2\\tau}{b + \\sqrt{b^2 + 4\\tau^2\\rho^2}},\\qquad b = 2(1-\\rho^2)\\|e\\|^2

    Args:
      temperature: τ ∈ (0, 2‖e‖²] (scalar or array); larger τ has β > 1, outside the
        range of Lemma F.3.
      rho: ρ ∈ [0, 1).
      e_norm: ‖e‖ > 0.

    Returns:
      β ∈ (0, 1], a float or an array shaped like ``temperature``.

    Raises:
      ValueError: τ <= 0, τ > 2‖e‖² (β > 1), ρ outside [0, 1) or ‖e‖ <= 0.

    Example:
      >>> from flowjax.theory import beta_from_temperature, temperature_from_beta
      >>> round(beta_from_temperature(temperature_from_beta(0.3, 0.8, 2.0), 0.8, 2.0), 12)
      0.3
    """
    t = _check_temperature(temperature)
    rho = _check_rho(rho)
    e_norm = _check_e_norm(e_norm)
    if np.any(t > 2.0 * e_norm**2 * (1 + 1e-12)):
        raise ValueError(
            f"temperature must be <= 2‖e‖² = {2.0 * e_norm**2} for β ∈ (0, 1] "
            f"(Lemma F.3); got {temperature!r}."
        )
    return _beta_from_temperature(_f64(t), rho, e_norm)


@_float64
def q_eigenvalues(beta, rho: float):
    """The two non-zero eigenvalues of Q as functions of β (Lemma F.3).

    .. math::
        \\lambda_1 = \\frac{1+\\beta\\rho^2}{1+\\beta},\\qquad
        \\lambda_2 = \\rho^2\\frac{1-\\beta}{1-\\beta\\rho^2}

    0 <= λ₂ < ρ²λ₁ < λ₁ < 1, and λ₁ → 1 as β → 0 (τ → 0): the stall of
    Remark 7.4. The other d − 2 eigenvalues of Q are 0.

    Args:
      beta: β ∈ (0, 1] (scalar or array).
      rho: ρ ∈ [0, 1).

    Returns:
      ``(lambda1, lambda2)``, floats or arrays shaped like ``beta``.

    Raises:
      ValueError: β outside (0, 1] or ρ outside [0, 1).

    Example:
      >>> from flowjax.theory import q_eigenvalues
      >>> q_eigenvalues(1.0, 0.5)  # β = 1: λ₁ = (1 + ρ²)/2, λ₂ = 0
      (0.625, 0.0)
    """
    b = _f64(_check_beta(beta))
    rho = _check_rho(rho)
    return _q_eigvals(b, rho)


@_float64
def q_eigen(setting: LinearSetting, beta: float) -> QEigen:
    """The two non-zero eigenpairs of Q at τ = τ(β) (Lemma F.3, Remark 7.4).

    .. math::
        \\lambda_1 = \\frac{1+\\beta\\rho^2}{1+\\beta},\\ v_1 \\propto \\hat e - \\beta\\rho\\,\\hat e_\\perp;
        \\qquad
        \\lambda_2 = \\rho^2\\frac{1-\\beta}{1-\\beta\\rho^2},\\ v_2 \\propto \\beta\\rho\\,\\hat e + \\hat e_\\perp

    v₁ is the top eigenvector of Q, hence the smallest-eigenvalue eigenvector
    of Σ′ (eigenvalue μ(1 − λ₁) = μβ(1−ρ²)/(1+β)): the direction along which
    FLOW's gradient descent stalls as τ → 0.

    Args:
      setting: a :class:`LinearSetting`.
      beta: β ∈ (0, 1].

    Returns:
      A :class:`QEigen` with unit eigenvectors ``v1``, ``v2`` of shape ``[d]``.

    Raises:
      ValueError: β outside (0, 1].
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, q_eigen, flow_q, temperature_from_beta
      >>> s = make_setting(jax.random.key(0), d=4, rho=0.6, e_norm=1.0)
      >>> eig = q_eigen(s, 0.5)
      >>> q = flow_q(s, temperature_from_beta(0.5, s.rho, s.e_norm))
      >>> bool(np.allclose(q @ eig.v1, eig.lambda1 * eig.v1))
      True
    """
    _, _, _, e_hat, e_perp, _, _ = _arrays(setting)
    b = _scalar(beta, "beta")
    _check_beta(b)
    lambda1, lambda2 = q_eigenvalues(b, setting.rho)
    v1, v2 = _q_eigvecs(e_hat, e_perp, b * setting.rho)
    return QEigen(lambda1=lambda1, lambda2=lambda2, v1=v1, v2=v2)


# --------------------------------------------------------------------------
# Gradient-descent trajectories
# --------------------------------------------------------------------------


@jax.jit
def _gd_closed(c, t, th0, eta, k):
    evals, vecs = jnp.linalg.eigh(c)
    coeffs = vecs.T @ (th0 - t)  # [d]
    # Integer exponents: jnp.power is exact for negative bases (1 − 2ηc < 0).
    factors = jnp.power((1.0 - 2.0 * eta * evals)[None, :], k[:, None])  # [K, d]
    return t[None, :] + (factors * coeffs[None, :]) @ vecs.T


@_float64
def gd_closed_form(cov, target, theta0, eta: float, steps) -> np.ndarray:
    """Gradient descent on a quadratic, in closed form (Eqs. 6 and 12's general form).

    For :math:`L(\\theta) = (\\theta - t)^\\top C(\\theta - t)` (gradient
    :math:`2C(\\theta - t)`) and step η:

    .. math::
        \\theta_K = t + (I - 2\\eta C)^K(\\theta_0 - t)
                  = t + V\\,\\mathrm{diag}\\big((1-2\\eta c_i)^K\\big)V^\\top(\\theta_0 - t)

    with :math:`C = V\\mathrm{diag}(c)V^\\top`. Vanilla fine-tuning is
    C = Σ̃, t = θ̃*, θ₀ = θ*; FLOW is C = Σ′.

    Args:
      cov: symmetric C, ``[d, d]``.
      target: t, ``[d]``.
      theta0: θ₀, ``[d]``.
      eta: step η > 0.
      steps: the K at which to evaluate, integers >= 0.

    Returns:
      θ_K for each K, ``[len(steps), d]``.

    Raises:
      ValueError: bad shapes, an asymmetric C, η <= 0 or negative steps.

    Example:
      >>> import numpy as np
      >>> from flowjax.theory import gd_closed_form
      >>> gd_closed_form(np.diag([1.0, 0.25]), np.zeros(2), np.ones(2), 0.5, [0, 1, 2])
      array([[1.    , 1.    ],
             [0.    , 0.75  ],
             [0.    , 0.5625]])
    """
    c, t, th0 = _check_quadratic(cov, target, theta0)
    eta = _check_eta(eta)
    return _gd_closed(c, t, th0, eta, jnp.asarray(_check_steps(steps)))


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _gd_scan(cov, target, theta0, eta, *, num_steps):
    def step(theta, _):
        theta = theta - eta * 2.0 * cov @ (theta - target)
        return theta, theta

    _, thetas = jax.lax.scan(step, theta0, None, length=num_steps)
    return jnp.concatenate([theta0[None, :], thetas], axis=0)


@_float64
def gd_iterate(cov, target, theta0, eta: float, num_steps: int) -> np.ndarray:
    """Gradient descent on a quadratic, by iterating the update.

    .. math:: \\theta_{k+1} = \\theta_k - \\eta\\,\\nabla L(\\theta_k) = \\theta_k - 2\\eta C(\\theta_k - t)

    The iterative twin of :func:`gd_closed_form` (same objective and step).

    Args:
      cov: symmetric C, ``[d, d]``.
      target: t, ``[d]``.
      theta0: θ₀, ``[d]``.
      eta: step η > 0.
      num_steps: K >= 0.

    Returns:
      θ₀, …, θ_K, ``[num_steps + 1, d]``.

    Raises:
      ValueError: bad shapes, an asymmetric C, η <= 0 or num_steps < 0.

    Example:
      >>> import numpy as np
      >>> from flowjax.theory import gd_iterate
      >>> gd_iterate(np.diag([1.0, 0.25]), np.zeros(2), np.ones(2), 0.5, 2)
      array([[1.    , 1.    ],
             [0.    , 0.75  ],
             [0.    , 0.5625]])
    """
    c, t, th0 = _check_quadratic(cov, target, theta0)
    eta = _check_eta(eta)
    k = _check_count(num_steps, "num_steps", 0)
    return _gd_scan(c, t, th0, _f64(eta), num_steps=k)


@_float64
def gd_trajectory(
    setting: LinearSetting,
    steps,
    *,
    temperature: float | None = None,
    eta: float | None = None,
    method: str = "closed_form",
) -> np.ndarray:
    """Vanilla fine-tuning (Eq. 6) or FLOW (Theorem 7.2) from θ*, for any τ and η.

    .. math::
        \\text{vanilla: } \\theta_K = \\tilde\\theta^* + (I - 2\\eta\\tilde\\Sigma)^K e,\\qquad
        \\text{FLOW: } \\tilde\\theta_K = \\tilde\\theta^* + (I - 2\\eta\\Sigma')^K e

    Defaults are the paper's comparable step sizes: η = ½ for vanilla and
    η = 1/(2μ) for FLOW (then the iteration matrices are I − Σ̃ and Q).

    Args:
      setting: a :class:`LinearSetting`.
      steps: the K at which to evaluate, integers >= 0.
      temperature: None for vanilla fine-tuning, else FLOW's temperature τ > 0 (any
        τ > 0, not only the β-range of Lemma F.3).
      eta: the step size; see above for the default.
      method: ``"closed_form"`` (:func:`gd_closed_form`) or ``"iterate"``
        (:func:`gd_iterate`).

    Returns:
      θ_K for each K, ``[len(steps), d]``.

    Raises:
      ValueError: τ <= 0, η <= 0, bad steps or an unknown method.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, gd_trajectory
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> th = gd_trajectory(s, [0, 200])  # vanilla FT goes from θ* to θ̃*
      >>> bool(np.allclose(th[0], s.theta_star)), bool(np.allclose(th[1], s.theta_ft))
      (True, True)
    """
    _check_setting(setting)
    if method not in ("closed_form", "iterate"):
        raise ValueError(f'method must be "closed_form" or "iterate"; got {method!r}.')
    if temperature is None:
        cov = setting.sigma_ft
        eta = 0.5 if eta is None else eta
    else:
        cov = flow_covariance(setting, temperature)
        eta = 0.5 / flow_mu(temperature, setting.e_norm) if eta is None else eta
    k = _check_steps(steps)
    if method == "closed_form":
        return gd_closed_form(cov, setting.theta_ft, setting.theta_star, eta, k)
    path = gd_iterate(cov, setting.theta_ft, setting.theta_star, eta, int(k.max()))
    return path[k]


@jax.jit
def _eq12(theta_ft, e, e_perp, rho, e_norm, k):
    scale = jnp.power(rho, k)[:, None]
    even = (k % 2 == 0)[:, None]
    direction = jnp.where(even, e[None, :], -e_norm * e_perp[None, :])
    return theta_ft[None, :] + scale * direction


@_float64
def vanilla_trajectory(setting: LinearSetting, steps) -> np.ndarray:
    """Vanilla fine-tuning at η = ½ in closed form (Eq. 12).

    With η = ½ the iteration matrix is :math:`P = I - \\tilde\\Sigma =
    -\\rho(\\hat e\\hat e_\\perp^\\top + \\hat e_\\perp\\hat e^\\top)`, so

    .. math::
        \\theta_K = \\tilde\\theta^* + \\rho^K\\big(\\mathbb 1[K\\text{ even}]\\,e
                    - \\mathbb 1[K\\text{ odd}]\\,\\|e\\|\\hat e_\\perp\\big)

    It converges geometrically to θ̃* (Remark 7.3), where
    err_tot = err₁ = eᵀΣe >= ‖e‖² (Eq. 13).

    Args:
      setting: a :class:`LinearSetting`.
      steps: integers K >= 0.

    Returns:
      θ_K for each K, ``[len(steps), d]``.

    Raises:
      ValueError: bad steps.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, vanilla_trajectory
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> th = vanilla_trajectory(s, [1])
      >>> bool(np.allclose(th[0] - s.theta_ft, -0.5 * s.e_perp))
      True
    """
    _, theta_ft, e, _, e_perp, _, _ = _arrays(setting)
    k = jnp.asarray(_check_steps(steps))
    return _eq12(theta_ft, e, e_perp, setting.rho, setting.e_norm, k)


@jax.jit
def _eq14(theta_ft, e, e_perp, b, rho, e_norm, k):
    lambda1, lambda2 = _q_eigvals(b, rho)
    br2 = (b * rho) ** 2
    p1 = jnp.power(lambda1, k)[:, None]
    p2 = jnp.power(lambda2, k)[:, None]
    along_e = (p1 + p2 * br2) / (1 + br2)
    along_perp = -b * rho * (p1 - p2) / (1 + br2) * e_norm
    return theta_ft[None, :] + along_e * e[None, :] + along_perp * e_perp[None, :]


@jax.jit
def _stalled(theta_ft, e, e_perp, b, rho, e_norm, k):
    lambda1, _ = _q_eigvals(b, rho)
    br = b * rho
    gamma = jnp.power(lambda1, k)[:, None] / (1 + br**2)
    return theta_ft[None, :] + gamma * (e - br * e_norm * e_perp)[None, :]


@_float64
def flow_trajectory(setting: LinearSetting, beta: float, steps) -> np.ndarray:
    """FLOW at τ = τ(β) and η = 1/(2μ) in closed form (Eq. 14).

    .. math::
        \\tilde\\theta_K = \\tilde\\theta^*
        + \\frac{\\lambda_1^K + \\lambda_2^K\\beta^2\\rho^2}{1+\\beta^2\\rho^2}\\,e
        - \\beta\\rho\\,\\frac{\\lambda_1^K - \\lambda_2^K}{1+\\beta^2\\rho^2}\\,\\|e\\|\\,\\hat e_\\perp

    with λ₁, λ₂ from :func:`q_eigenvalues`. This is :math:`\\tilde\\theta^* + Q^K e`
    written in Q's eigenbasis.

    Args:
      setting: a :class:`LinearSetting`.
      beta: β ∈ (0, 1] (τ from :func:`temperature_from_beta`).
      steps: integers K >= 0.

    Returns:
      θ̃_K for each K, ``[len(steps), d]``.

    Raises:
      ValueError: β outside (0, 1] or bad steps.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, flow_trajectory
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> bool(np.allclose(flow_trajectory(s, 0.5, [0])[0], s.theta_star))
      True
    """
    _, theta_ft, e, _, e_perp, _, _ = _arrays(setting)
    b = _scalar(beta, "beta")
    _check_beta(b)
    k = jnp.asarray(_check_steps(steps))
    return _eq14(theta_ft, e, e_perp, b, setting.rho, setting.e_norm, k)


@_float64
def flow_trajectory_stalled(setting: LinearSetting, beta: float, steps) -> np.ndarray:
    """Remark 7.4's large-K approximation of FLOW: the stalled direction.

    .. math::
        \\bar\\theta_K = \\tilde\\theta^* + \\gamma(K,\\beta)\\big(e - \\beta\\rho\\|e\\|\\hat e_\\perp\\big),
        \\qquad \\gamma(K,\\beta) = \\frac{\\lambda_1^K}{1+\\beta^2\\rho^2}

    Eq. 14 without its λ₂ terms (λ₂ < ρ²λ₁ dies out first). As β → 0, λ₁ → 1
    and θ̄_K → θ̃* + γe, model averaging with ω = γ (Remarks 7.5-7.6).

    Args:
      setting: a :class:`LinearSetting`.
      beta: β ∈ (0, 1].
      steps: integers K >= 0.

    Returns:
      θ̄_K for each K, ``[len(steps), d]``.

    Raises:
      ValueError: β outside (0, 1] or bad steps.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, flow_trajectory, flow_trajectory_stalled
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> gap = flow_trajectory(s, 0.1, [30]) - flow_trajectory_stalled(s, 0.1, [30])
      >>> bool(np.max(np.abs(gap)) < 1e-10)
      True
    """
    _, theta_ft, e, _, e_perp, _, _ = _arrays(setting)
    b = _scalar(beta, "beta")
    _check_beta(b)
    k = jnp.asarray(_check_steps(steps))
    return _stalled(theta_ft, e, e_perp, b, setting.rho, setting.e_norm, k)


# --------------------------------------------------------------------------
# Errors and model averaging
# --------------------------------------------------------------------------


@jax.jit
def _errors(th, theta_star, theta_ft, sigma, sigma_ft):
    d1 = th - jnp.broadcast_to(theta_star, th.shape)
    d2 = th - jnp.broadcast_to(theta_ft, th.shape)
    err1 = jnp.einsum("...i,ij,...j->...", d1, sigma, d1)
    err2 = jnp.einsum("...i,ij,...j->...", d2, sigma_ft, d2)
    return err1, err2, err1 + err2


@_float64
def errors(setting: LinearSetting, thetas) -> Errors:
    """err₁, err₂ and err_tot of one or many models (§7.1).

    .. math::
        \\mathrm{err}_1(\\theta) = (\\theta-\\theta^*)^\\top\\Sigma(\\theta-\\theta^*),\\quad
        \\mathrm{err}_2(\\theta) = (\\theta-\\tilde\\theta^*)^\\top\\tilde\\Sigma(\\theta-\\tilde\\theta^*),\\quad
        \\mathrm{err}_{tot} = \\mathrm{err}_1 + \\mathrm{err}_2

    err₂(θ*) = eᵀΣ̃e = ‖e‖² and err₁(θ̃*) = eᵀΣe (Eqs. 5 and 13).

    Args:
      setting: a :class:`LinearSetting`.
      thetas: one model ``[d]`` or a stack ``[..., d]`` (e.g. a trajectory).

    Returns:
      :class:`Errors`, each shaped like ``thetas`` without its last axis.

    Raises:
      ValueError: the last axis is not d, or values are not finite.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax
      >>> from flowjax.theory import make_setting, errors
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=2.0)
      >>> errors(s, s.theta_star)  # err₂(θ*) = ‖e‖² = 4
      Errors(err1=0.0, err2=4.0, err_tot=4.0)
    """
    theta_star, theta_ft, _, _, _, sigma, sigma_ft = _arrays(setting)
    th = _real_array(thetas, "thetas")
    if th.ndim == 0 or th.shape[-1] != setting.d:
        raise ValueError(f"thetas must have shape [..., {setting.d}]; got {th.shape}.")
    return Errors(*_errors(_f64(th), theta_star, theta_ft, sigma, sigma_ft))


@jax.jit
def _average(theta_ft, e, w):
    return theta_ft[None, :] + w[:, None] * e[None, :]


@jax.jit
def _best_average(e, sigma, sigma_ft):
    a = e @ sigma @ e
    b = e @ sigma_ft @ e
    return a / (a + b), a * b / (a + b)


@_float64
def model_average(setting: LinearSetting, omega) -> np.ndarray:
    """Model averaging (WiSE-FT style) between θ* and θ̃* (Remarks 7.5-7.6).

    .. math:: \\theta_{avg}(\\omega) = \\omega\\theta^* + (1-\\omega)\\tilde\\theta^* = \\tilde\\theta^* + \\omega e

    Args:
      setting: a :class:`LinearSetting`.
      omega: ω ∈ [0, 1], scalar or 1-D.

    Returns:
      ``[d]`` for scalar ω, else ``[len(omega), d]``.

    Raises:
      ValueError: ω outside [0, 1], not finite, or more than 1-D.
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, model_average
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> bool(np.allclose(model_average(s, 1.0), s.theta_star))
      True
    """
    _, theta_ft, e, _, _, _, _ = _arrays(setting)
    w = _real_array(omega, "omega")
    if w.ndim > 1 or np.any((w < 0) | (w > 1)):
        raise ValueError(
            f"omega must be a scalar or 1-D array in [0, 1]; got {omega!r}."
        )
    avg = _average(theta_ft, e, _f64(w.reshape(-1)))
    return avg[0] if w.ndim == 0 else avg


@_float64
def best_model_average(setting: LinearSetting) -> tuple[float, float]:
    """The optimally tuned model average (Lemma F.4).

    .. math::
        \\omega^* = \\frac{e^\\top\\Sigma e}{e^\\top\\Sigma e + \\|e\\|^2},\\qquad
        \\min_{\\omega\\in[0,1]}\\mathrm{err}_{tot}(\\theta_{avg}(\\omega))
        = \\frac{e^\\top\\Sigma e}{e^\\top\\Sigma e/\\|e\\|^2 + 1} < \\|e\\|^2

    from :math:`\\mathrm{err}_{tot}(\\theta_{avg}(\\omega)) = (1-\\omega)^2 e^\\top\\Sigma e
    + \\omega^2 e^\\top\\tilde\\Sigma e` and :math:`e^\\top\\tilde\\Sigma e = \\|e\\|^2`.
    Both endpoints have err_tot >= ‖e‖², so tuned averaging beats them.

    Args:
      setting: a :class:`LinearSetting`.

    Returns:
      ``(omega_star, err_tot_min)``.

    Raises:
      TypeError: ``setting`` is not a :class:`LinearSetting`.

    Example:
      >>> import jax
      >>> from flowjax.theory import make_setting, best_model_average
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)  # Σ = I
      >>> best_model_average(s)
      (0.5, 0.5)
    """
    _, _, e, _, _, sigma, sigma_ft = _arrays(setting)
    return _best_average(e, sigma, sigma_ft)


# --------------------------------------------------------------------------
# The median-temperature heuristic in this model
# --------------------------------------------------------------------------


@jax.jit
def _median_chi2_1():
    return jsp_special.ndtri(jnp.float64(0.75)) ** 2


@_float64
def median_chi2_1() -> float:
    """The median of χ²₁: (Φ⁻¹(3/4))² = 0.454936423119572...

    The pre-trained residual is :math:`\\tilde y - \\langle\\theta^*,\\tilde x\\rangle
    = -e^\\top\\tilde x \\sim \\mathcal N(0, e^\\top\\tilde\\Sigma e) = \\mathcal N(0, \\|e\\|^2)`,
    so the squared residual is :math:`\\|e\\|^2\\chi^2_1` and the paper's
    τ = median loss is this constant times ‖e‖².

    Returns:
      The constant, a float.

    Example:
      >>> from flowjax.theory import median_chi2_1
      >>> round(median_chi2_1(), 12)
      0.45493642312
    """
    return _median_chi2_1()


@_float64
def median_heuristic_temperature(e_norm: float) -> float:
    """Population value of FLOW's median temperature in this model: τ ≈ 0.455‖e‖².

    .. math:: \\tau_{med} = \\mathrm{median}\\big((e^\\top\\tilde x)^2\\big) = \\big(\\Phi^{-1}(3/4)\\big)^2\\,\\|e\\|^2

    It is independent of ρ and Σ. Then μ² = τ/(τ + 2‖e‖²) ≈ 0.185, inside the
    β-range of Lemma F.3.

    Args:
      e_norm: ‖e‖ > 0.

    Returns:
      τ_med, a float.

    Raises:
      ValueError: ‖e‖ <= 0.

    Example:
      >>> from flowjax.theory import median_heuristic_temperature
      >>> round(median_heuristic_temperature(2.0), 6)
      1.819746
    """
    e_norm = _check_e_norm(e_norm)
    return _median_chi2_1() * e_norm**2


@_float64
def median_heuristic_temperature_mc(
    setting: LinearSetting, key: jax.Array, num_samples: int
) -> float:
    """The median temperature computed from sampled pre-trained losses.

    .. math:: \\hat\\tau = \\mathrm{median}_{i\\le n}\\,(\\tilde y_i - \\langle\\theta^*, \\tilde x_i\\rangle)^2,
              \\quad \\tilde x_i \\sim \\mathcal N(0, \\tilde\\Sigma)

    Converges to :func:`median_heuristic_temperature` at rate n^{-1/2}.

    Args:
      setting: a :class:`LinearSetting`.
      key: a JAX PRNG key.
      num_samples: n >= 1.

    Returns:
      The sample median, a float.

    Raises:
      ValueError: n < 1.
      TypeError: ``setting`` or ``key`` of the wrong type.

    Example:
      >>> import jax
      >>> from flowjax.theory import make_setting, median_heuristic_temperature_mc
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> abs(median_heuristic_temperature_mc(s, jax.random.key(1), 100_000) - 0.4549) < 0.01
      True
    """
    _check_setting(setting)
    _check_key(key)
    n = _check_count(num_samples, "num_samples", 1)
    _, _, losses = _sample_ft(setting, key, n)
    return _median(losses)


# --------------------------------------------------------------------------
# Finite-sample FLOW through the library pipeline
# --------------------------------------------------------------------------


def _squared_error(theta, example):
    return (example["y"] - theta @ example["x"]) ** 2


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _weighted_gd(theta0, batch, eta, *, num_steps):
    """GD from θ₀ on ``weighted_objective(squared error)`` (the library's FLOW loss).

    Also returns the weighted empirical covariance Xᵀ diag(w) X / n.
    """
    grad = jax.grad(weighted_objective(_squared_error, reduction="mean"))

    def step(theta, _):
        theta = theta - eta * grad(theta, batch)
        return theta, theta

    _, path = jax.lax.scan(step, theta0, None, length=num_steps)
    x, w = batch["x"], batch["weight"]
    covariance = x.T @ (w[:, None] * x) / x.shape[0]
    return jnp.concatenate([theta0[None, :], path], axis=0), covariance


@_float64
def finite_sample_flow(
    setting: LinearSetting,
    key: jax.Array,
    num_samples: int,
    steps: Sequence[int],
    *,
    eta: float | None = None,
    temperature: float | None = None,
) -> FiniteSampleFlow:
    """FLOW on n fine-tuning samples with the library's own weights and objective.

    1. Draw :math:`\\tilde x_i \\sim \\mathcal N(0,\\tilde\\Sigma)`,
       :math:`\\tilde y_i = \\langle\\tilde\\theta^*, \\tilde x_i\\rangle`.
    2. Pre-trained losses :math:`f_i(\\theta^*) = (\\tilde y_i - \\langle\\theta^*, \\tilde x_i\\rangle)^2`;
       weights and τ from :func:`flowjax.flow_weights` (median τ by default).
    3. Gradient descent from θ* on the objective of
       :func:`flowjax.weighted_objective` with ``reduction="mean"``:

    .. math::
        \\hat L(\\theta) = \\frac1n\\sum_i w_i(\\tilde y_i - \\langle\\theta, \\tilde x_i\\rangle)^2
        = (\\theta-\\tilde\\theta^*)^\\top\\hat\\Sigma'(\\theta-\\tilde\\theta^*),\\qquad
        \\theta_{k+1} = \\theta_k - \\eta\\nabla\\hat L(\\theta_k)

    As n → ∞, τ̂ → τ_med (:func:`median_heuristic_temperature`) and Σ̂′ → Σ′(τ_med), so
    the iterates approach :func:`gd_trajectory` at τ_med with the same η.

    Args:
      setting: a :class:`LinearSetting`.
      key: a JAX PRNG key.
      num_samples: n >= 1. Keep n well above d: with η = 1/(2μ) the step is
        only stable while the largest eigenvalue of Σ̂′ stays below 2μ.
      steps: the K at which to return iterates, integers >= 0.
      eta: the step size; default 1/(2μ(τ̂)), the comparable step for the τ used.
      temperature: ``None`` (the default) for the median of the pre-trained losses
        (:func:`flowjax.median_temperature`), or a number > 0; passed on to
        ``flow_weights``, as in :func:`flowjax.flow_weights`.

    Returns:
      A :class:`FiniteSampleFlow`.

    Raises:
      ValueError: n < 1, bad steps, η <= 0, or whatever ``flow_weights``
        rejects (e.g. τ <= 0, or a string such as ``"median"``).
      TypeError: ``setting`` or ``key`` of the wrong type.

    Example:
      >>> import jax, numpy as np
      >>> from flowjax.theory import make_setting, finite_sample_flow
      >>> s = make_setting(jax.random.key(0), d=3, rho=0.5, e_norm=1.0)
      >>> run = finite_sample_flow(s, jax.random.key(1), 8_001, [0, 10])
      >>> round(run.temperature, 1), bool(np.allclose(run.thetas[0], s.theta_star))
      (0.5, True)
    """
    _check_setting(setting)
    _check_key(key)
    n = _check_count(num_samples, "num_samples", 1)
    k = _check_steps(steps)
    x, y, losses = _sample_ft(setting, key, n)
    # The library's weights on the host copy of the losses (numpy in, float64 out).
    host = np.asarray(losses)
    tau = median_temperature(host) if temperature is None else temperature
    weights = flow_weights(host, tau)
    tau = float(tau)
    if eta is None:
        eta = 0.5 / math.sqrt(tau / (tau + 2.0 * setting.e_norm**2))
    eta = _check_eta(eta)
    batch = {"x": x, "y": y, "weight": _f64(weights)}
    path, covariance = _weighted_gd(
        _f64(setting.theta_star), batch, _f64(eta), num_steps=int(k.max())
    )
    return FiniteSampleFlow(
        thetas=np.asarray(path)[k],
        temperature=tau,
        eta=eta,
        weights=np.asarray(weights, dtype=np.float64),
        covariance=covariance,
    )
