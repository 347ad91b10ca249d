"""Tests for flowjax.theory.linear: the FLOW paper's section-7 linear model.

References are independent of the module where possible: numpy float64 matrix
powers and iterations, numpy Monte-Carlo, scipy for χ²₁ and for minimising
over ω.
"""

import jax
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from flowjax import theory
from flowjax.theory import linear

D, RHO, E_NORM = 6, 0.7, 1.5


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _pretrain_cov(d: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return np.eye(d) + a @ a.T / d


@pytest.fixture(scope="module")
def setting():
    return theory.make_setting(jax.random.key(3), D, RHO, E_NORM, _pretrain_cov(D))


def _numpy_q(s, mu2: float) -> np.ndarray:
    """Q of Theorem 7.2, written out in numpy."""
    eh, ep, r = s.e_hat, s.e_perp, s.rho
    return (
        (1 - mu2) * np.outer(eh, eh)
        + r**2 * (1 - mu2) * np.outer(ep, ep)
        - r * mu2 * (np.outer(eh, ep) + np.outer(ep, eh))
    )


def _numpy_gd(cov, target, theta0, eta, num_steps):
    """Iterated GD on (θ - t)ᵀC(θ - t) in numpy: θ ← θ - 2ηC(θ - t)."""
    path = [np.array(theta0, dtype=np.float64)]
    for _ in range(num_steps):
        path.append(path[-1] - 2 * eta * cov @ (path[-1] - target))
    return np.stack(path)


# --------------------------------------------------------------------------
# The setting
# --------------------------------------------------------------------------


def test_setting_geometry(setting):
    s = setting
    np.testing.assert_allclose(s.theta_star - s.theta_ft, s.e, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(s.e), E_NORM, rtol=1e-14)
    np.testing.assert_allclose(s.e_hat, s.e / E_NORM, atol=1e-15)
    assert abs(s.e_hat @ s.e_perp) < 1e-14
    np.testing.assert_allclose(np.linalg.norm(s.e_perp), 1.0, rtol=1e-14)
    expected = np.eye(D) + RHO * (
        np.outer(s.e_hat, s.e_perp) + np.outer(s.e_perp, s.e_hat)
    )
    np.testing.assert_allclose(s.sigma_ft, expected, atol=1e-15)
    eig = np.linalg.eigvalsh(s.sigma_ft)
    np.testing.assert_allclose(eig[[0, -1]], [1 - RHO, 1 + RHO], atol=1e-14)
    assert s.d == D
    for v in (s.theta_star, s.theta_ft, s.e, s.sigma, s.sigma_ft):
        assert isinstance(v, np.ndarray) and v.dtype == np.float64


def test_float64_without_touching_the_global_flag(setting):
    before = jax.config.jax_enable_x64
    c = theory.flow_covariance(setting, 0.4)
    traj = theory.gd_trajectory(setting, [0, 5], temperature=0.4, method="iterate")
    assert jax.config.jax_enable_x64 == before
    assert jax.numpy.ones(1).dtype == (np.float64 if before else np.float32)
    assert c.dtype == np.float64 and traj.dtype == np.float64
    # float32 would lose this: Σ′(τ) - Σ′(τ(1 + 1e-12)) is far below float32 resolution.
    delta = theory.flow_covariance(setting, 0.4 * (1 + 1e-12)) - c
    assert 0 < np.max(np.abs(delta)) < 1e-10


# --------------------------------------------------------------------------
# Theorem 7.2: Σ′ = μ(I − Q)
# --------------------------------------------------------------------------


def test_flow_covariance_is_mu_times_identity_minus_q(setting):
    tau = 0.8
    mu2 = tau / (tau + 2 * E_NORM**2)
    expected = np.sqrt(mu2) * (np.eye(D) - _numpy_q(setting, mu2))
    np.testing.assert_allclose(
        theory.flow_covariance(setting, tau), expected, atol=1e-14
    )
    np.testing.assert_allclose(
        theory.flow_q(setting, tau), _numpy_q(setting, mu2), atol=1e-14
    )
    np.testing.assert_allclose(theory.flow_mu(tau, E_NORM), np.sqrt(mu2), rtol=1e-14)


@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_flow_covariance_within_4_stderr_of_numpy_monte_carlo(setting, tau):
    n = 400_000
    rng = np.random.default_rng(int(tau * 100))
    x = rng.normal(size=(n, D)) @ np.linalg.cholesky(setting.sigma_ft).T
    w = np.exp(-((x @ setting.e) ** 2) / tau)
    terms = w[:, None, None] * x[:, :, None] * x[:, None, :]
    mean = terms.mean(axis=0)
    stderr = terms.std(axis=0, ddof=1) / np.sqrt(n)
    z = (mean - theory.flow_covariance(setting, tau)) / stderr
    assert np.max(np.abs(z)) < 4, z
    # The same check fails for a wrong factor: μ² instead of μ in front of I − Q.
    mu = theory.flow_mu(tau, E_NORM)
    z_wrong = (mean - mu * theory.flow_covariance(setting, tau)) / stderr
    assert np.max(np.abs(z_wrong)) > 4


def test_flow_covariance_mc_agrees_with_closed_form(setting):
    tau = theory.median_heuristic_temperature(E_NORM)
    mc = theory.flow_covariance_mc(setting, tau, jax.random.key(7), 300_001)
    assert mc.num_samples == 300_001
    assert mc.mean.shape == mc.stderr.shape == (D, D)
    z = (mc.mean - theory.flow_covariance(setting, tau)) / mc.stderr
    assert np.max(np.abs(z)) < 4, z
    # Standard errors shrink like n^-1/2.
    small = theory.flow_covariance_mc(setting, tau, jax.random.key(8), 3_000)
    ratio = np.median(small.stderr / mc.stderr)
    assert 7 < ratio < 13  # sqrt(100) = 10


# --------------------------------------------------------------------------
# Lemma F.3: reparametrisation and eigenvalues
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9])
def test_beta_temperature_reparametrisation(rho):
    beta = np.array([1e-4, 0.05, 0.5, 0.999, 1.0])
    tau = theory.temperature_from_beta(beta, rho, E_NORM)
    np.testing.assert_allclose(
        2 * beta * (1 - rho**2) * E_NORM**2 / (1 - beta**2 * rho**2), tau, rtol=1e-14
    )
    # μ² from β (Lemma F.3, the corrected square) agrees with Theorem 7.2's μ² from τ.
    np.testing.assert_allclose(
        theory.mu_from_beta(beta, rho) ** 2, tau / (tau + 2 * E_NORM**2), rtol=1e-12
    )
    np.testing.assert_allclose(
        theory.beta_from_temperature(tau, rho, E_NORM), beta, rtol=1e-12
    )
    np.testing.assert_allclose(
        theory.temperature_from_beta(1.0, rho, E_NORM), 2 * E_NORM**2
    )


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("beta", [1e-3, 0.2, 0.6, 1.0])
def test_q_eigenvalues_equal_numpy_eigenvalues(rho, beta):
    s = theory.make_setting(jax.random.key(1), 5, rho, E_NORM)
    tau = theory.temperature_from_beta(beta, rho, E_NORM)
    q_np = _numpy_q(s, tau / (tau + 2 * E_NORM**2))
    numeric = np.sort(np.linalg.eigvalsh(q_np))
    lambda1, lambda2 = theory.q_eigenvalues(beta, rho)
    np.testing.assert_allclose(
        numeric, np.sort([lambda1, lambda2, 0, 0, 0]), atol=1e-10, rtol=0
    )
    eig = theory.q_eigen(s, beta)
    assert (eig.lambda1, eig.lambda2) == (lambda1, lambda2)
    np.testing.assert_allclose(q_np @ eig.v1, lambda1 * eig.v1, atol=1e-12)
    np.testing.assert_allclose(q_np @ eig.v2, lambda2 * eig.v2, atol=1e-12)
    np.testing.assert_allclose([eig.v1 @ eig.v1, eig.v2 @ eig.v2], 1.0, rtol=1e-14)
    # Ordering claimed in Remark 7.4: 0 <= λ₂ <= ρ²λ₁ < λ₁ < 1.
    assert 0 <= lambda2 <= rho**2 * lambda1 + 1e-15 and lambda1 < 1


def test_stall_as_temperature_goes_to_zero(setting):
    betas = np.logspace(-6, 0, 13)
    lambda1, _ = theory.q_eigenvalues(betas, RHO)
    assert np.all(np.diff(lambda1) < 0)  # λ₁ grows as β (τ) shrinks ...
    np.testing.assert_allclose(1 - lambda1[0], betas[0] * (1 - RHO**2), rtol=1e-5)
    # ... and v₁ = ê − βρê⊥ is the smallest-eigenvalue eigenvector of Σ′,
    # with eigenvalue μ(1 − λ₁) = μβ(1 − ρ²)/(1 + β).
    beta = 0.05
    tau = theory.temperature_from_beta(beta, RHO, E_NORM)
    evals, evecs = np.linalg.eigh(theory.flow_covariance(setting, tau))
    mu = theory.mu_from_beta(beta, RHO)
    np.testing.assert_allclose(
        evals[0], mu * beta * (1 - RHO**2) / (1 + beta), rtol=1e-10
    )
    v1 = theory.q_eigen(setting, beta).v1
    np.testing.assert_allclose(abs(evecs[:, 0] @ v1), 1.0, atol=1e-10)


# --------------------------------------------------------------------------
# Trajectories: Eq. 6 / 12 / 14 against iterated gradient descent
# --------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.3, 1.0])
def test_flow_trajectory_eq14_equals_iterated_gd(setting, beta):
    tau = theory.temperature_from_beta(beta, RHO, E_NORM)
    mu2 = tau / (tau + 2 * E_NORM**2)
    cov = np.sqrt(mu2) * (np.eye(D) - _numpy_q(setting, mu2))
    eta = 1 / (2 * np.sqrt(mu2))
    reference = _numpy_gd(cov, setting.theta_ft, setting.theta_star, eta, 300)
    steps = np.arange(301)
    np.testing.assert_allclose(
        theory.flow_trajectory(setting, beta, steps), reference, atol=1e-10, rtol=0
    )
    for method in ("closed_form", "iterate"):
        np.testing.assert_allclose(
            theory.gd_trajectory(setting, steps, temperature=tau, method=method),
            reference,
            atol=1e-10,
            rtol=0,
        )


def test_vanilla_trajectory_eq12(setting):
    steps = np.arange(41)
    reference = _numpy_gd(
        setting.sigma_ft, setting.theta_ft, setting.theta_star, 0.5, 40
    )
    eq12 = theory.vanilla_trajectory(setting, steps)
    np.testing.assert_allclose(eq12, reference, atol=1e-12, rtol=0)
    # Eq. 12 term by term: ρ^K e for even K, −ρ^K ‖e‖ ê⊥ for odd K.
    np.testing.assert_allclose(
        eq12[2] - setting.theta_ft, RHO**2 * setting.e, atol=1e-14
    )
    np.testing.assert_allclose(
        eq12[3] - setting.theta_ft, -(RHO**3) * E_NORM * setting.e_perp, atol=1e-14
    )
    np.testing.assert_allclose(
        theory.gd_trajectory(setting, steps), reference, atol=1e-12
    )
    # Eq. 13: vanilla FT converges to θ̃*, where err_tot = err₁ = eᵀΣe >= ‖e‖².
    err = theory.errors(setting, theory.vanilla_trajectory(setting, [400]))
    np.testing.assert_allclose(err.err_tot[0], setting.e @ setting.sigma @ setting.e)
    assert err.err_tot[0] >= E_NORM**2


def test_gd_closed_form_matches_numpy_matrix_power():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T / 4 + 0.1 * np.eye(4)
    target, theta0 = rng.normal(size=4), rng.normal(size=4)
    eta = 0.9 / np.linalg.eigvalsh(cov)[-1]  # some factors 1 − 2ηc are negative
    assert np.any(1 - 2 * eta * np.linalg.eigvalsh(cov) < 0)
    steps = [0, 1, 2, 7, 30]
    expected = np.stack(
        [
            target
            + np.linalg.matrix_power(np.eye(4) - 2 * eta * cov, k) @ (theta0 - target)
            for k in steps
        ]
    )
    np.testing.assert_allclose(
        theory.gd_closed_form(cov, target, theta0, eta, steps), expected, atol=1e-12
    )
    np.testing.assert_allclose(
        theory.gd_iterate(cov, target, theta0, eta, 30)[steps], expected, atol=1e-12
    )


def test_stalled_approximation_error_is_the_lambda2_terms(setting):
    beta, steps = 0.4, np.arange(0, 60, 5)
    full = theory.flow_trajectory(setting, beta, steps)
    approx = theory.flow_trajectory_stalled(setting, beta, steps)
    _, lambda2 = theory.q_eigenvalues(beta, RHO)
    gap = np.linalg.norm(full - approx, axis=1)
    # The dropped terms have norm λ₂^K βρ‖e‖ / sqrt(1 + β²ρ²).
    br = beta * RHO
    np.testing.assert_allclose(
        gap, lambda2**steps * br * E_NORM / np.sqrt(1 + br**2), atol=1e-14
    )


# --------------------------------------------------------------------------
# Errors, model averaging, Lemma F.4
# --------------------------------------------------------------------------


def test_errors_against_numpy(setting):
    thetas = np.random.default_rng(2).normal(size=(3, 4, D))
    err = theory.errors(setting, thetas)
    d1 = thetas - setting.theta_star
    d2 = thetas - setting.theta_ft
    np.testing.assert_allclose(
        err.err1, np.einsum("abi,ij,abj->ab", d1, setting.sigma, d1)
    )
    np.testing.assert_allclose(
        err.err2, np.einsum("abi,ij,abj->ab", d2, setting.sigma_ft, d2)
    )
    np.testing.assert_allclose(err.err_tot, err.err1 + err.err2)
    assert theory.errors(setting, setting.theta_star) == (
        0.0,
        pytest.approx(E_NORM**2),
        pytest.approx(E_NORM**2),
    )


def test_rho_zero_reduces_flow_to_model_averaging():
    s = theory.make_setting(jax.random.key(4), 5, 0.0, E_NORM, _pretrain_cov(5, 1))
    steps = np.arange(0, 50, 7)
    for beta in (0.02, 0.5, 1.0):
        lambda1, lambda2 = theory.q_eigenvalues(beta, 0.0)
        assert lambda2 == 0.0 and lambda1 == pytest.approx(1 / (1 + beta), rel=1e-15)
        flow = theory.flow_trajectory(s, beta, steps)
        np.testing.assert_allclose(
            flow, theory.model_average(s, lambda1**steps), atol=1e-13
        )
        # The iterated GD on Σ′ says the same (no ê⊥ component ever appears).
        tau = theory.temperature_from_beta(beta, 0.0, E_NORM)
        gd = theory.gd_trajectory(s, steps, temperature=tau, method="iterate")
        np.testing.assert_allclose(
            gd, theory.model_average(s, lambda1**steps), atol=1e-12
        )


def test_rho_positive_is_not_model_averaging(setting):
    # The −βρ‖e‖γ ê⊥ component: FLOW leaves the segment [θ̃*, θ*].
    th = theory.flow_trajectory(setting, 0.5, [20])[0] - setting.theta_ft
    assert abs(th @ setting.e_perp) > 1e-3


def test_best_model_average_equals_numerical_minimum(setting):
    omega_star, best = theory.best_model_average(setting)
    s = setting

    def err_tot(omega):
        th = s.theta_ft + omega * s.e
        return (th - s.theta_star) @ s.sigma @ (th - s.theta_star) + (
            th - s.theta_ft
        ) @ s.sigma_ft @ (th - s.theta_ft)

    res = scipy.optimize.minimize_scalar(
        err_tot, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}
    )
    np.testing.assert_allclose(omega_star, res.x, atol=1e-7)
    np.testing.assert_allclose(best, res.fun, rtol=1e-12)
    a = s.e @ s.sigma @ s.e
    np.testing.assert_allclose(best, a / (a / E_NORM**2 + 1), rtol=1e-13)
    assert best < min(E_NORM**2, a)  # beats both endpoints (Eqs. 5, 13)
    err = theory.errors(s, theory.model_average(s, np.linspace(0, 1, 101)))
    assert np.all(err.err_tot >= best - 1e-12)


# --------------------------------------------------------------------------
# Median temperature: τ ≈ 0.455‖e‖²
# --------------------------------------------------------------------------


def test_median_heuristic_constant():
    c = theory.median_chi2_1()
    np.testing.assert_allclose(c, scipy.stats.chi2.median(1), rtol=1e-14)
    assert round(c, 10) == 0.4549364231
    np.testing.assert_allclose(
        theory.median_heuristic_temperature(E_NORM), c * E_NORM**2, rtol=1e-15
    )


def test_median_heuristic_by_sampling(setting):
    n = 200_001
    c = theory.median_chi2_1()
    # Asymptotic s.e. of a sample median: 1 / (2 f(m) sqrt(n)), f the χ²₁ density.
    se = E_NORM**2 / (2 * scipy.stats.chi2.pdf(c, 1) * np.sqrt(n))
    tau_mc = theory.median_heuristic_temperature_mc(setting, jax.random.key(11), n)
    assert abs(tau_mc - c * E_NORM**2) < 4 * se
    # Independent numpy draw of the pre-trained squared residuals.
    x = (
        np.random.default_rng(3).normal(size=(n, D))
        @ np.linalg.cholesky(setting.sigma_ft).T
    )
    losses = (x @ setting.theta_ft - x @ setting.theta_star) ** 2
    assert abs(np.median(losses) - c * E_NORM**2) < 4 * se


# --------------------------------------------------------------------------
# Finite-sample FLOW through flowjax.flow_weights
# --------------------------------------------------------------------------


def test_finite_sample_flow_is_gd_on_the_weighted_covariance(setting):
    n = 2_001  # odd: the median loss is one of the losses, whose weight is e^-1
    run = theory.finite_sample_flow(setting, jax.random.key(0), n, [0, 1, 5, 25])
    assert run.weights.shape == (n,)
    np.testing.assert_allclose(np.median(run.weights), np.exp(-1), rtol=1e-14)
    assert np.all((run.weights > 0) & (run.weights <= 1))
    np.testing.assert_allclose(run.eta, 0.5 / theory.flow_mu(run.temperature, E_NORM))
    # The library's weighted objective Σ wᵢ(ỹᵢ − θᵀx̃ᵢ)²/n is (θ − θ̃*)ᵀΣ̂′(θ − θ̃*):
    # its GD equals numpy GD on the returned weighted covariance.
    reference = _numpy_gd(
        run.covariance, setting.theta_ft, setting.theta_star, run.eta, 25
    )
    np.testing.assert_allclose(run.thetas, reference[[0, 1, 5, 25]], atol=1e-10)


def test_finite_sample_flow_converges_to_population():
    s = theory.make_setting(jax.random.key(5), 4, 0.8, 1.0, _pretrain_cov(4, 2))
    tau = theory.median_heuristic_temperature(1.0)
    eta = 0.5 / theory.flow_mu(tau, 1.0)
    steps = np.arange(0, 61, 3)
    population = theory.gd_trajectory(s, steps, temperature=tau)

    def deviation(n):
        devs = []
        for seed in range(2):
            run = theory.finite_sample_flow(s, jax.random.key(seed), n, steps, eta=eta)
            devs.append(np.max(np.linalg.norm(run.thetas - population, axis=1)))
        return np.mean(devs)

    small, large = deviation(400), deviation(40_000)
    assert large < 0.03  # ‖e‖ = 1
    assert small / large > 4  # n^-1/2 predicts 10


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


_KEY = jax.random.key(0)
_EYE = np.eye(3)
BAD_CALLS = [
    (lambda s: theory.make_setting(_KEY, 1, 0.5, 1.0), "d must be"),
    (lambda s: theory.make_setting(_KEY, 3, 1.0, 1.0), "rho must lie"),
    (lambda s: theory.make_setting(_KEY, 3, -0.1, 1.0), "rho must lie"),
    (lambda s: theory.make_setting(_KEY, 3, 0.5, 0.0), "e_norm"),
    (lambda s: theory.make_setting(_KEY, 3, 0.5, 1.0, 0.5 * _EYE), "Σ ⪰ I"),
    (
        lambda s: theory.make_setting(
            _KEY, 3, 0.5, 1.0, _EYE + 0.1 * np.triu(np.ones((3, 3)), 1)
        ),
        "symmetric",
    ),
    (lambda s: theory.make_setting(_KEY, 3, 0.5, 1.0, np.eye(4)), "shape"),
    (
        lambda s: theory.make_setting(_KEY, 3, 0.5, 1.0, np.full((3, 3), np.nan)),
        "finite",
    ),
    (lambda s: theory.flow_covariance(s, 0.0), "temperature must be > 0"),
    (lambda s: theory.flow_covariance(s, -1.0), "temperature must be > 0"),
    (lambda s: theory.flow_covariance(s, float("inf")), "finite"),
    (lambda s: theory.flow_mu(np.array([1.0, -1.0]), 1.0), "temperature must be > 0"),
    (lambda s: theory.q_eigenvalues(0.0, 0.5), "beta must lie"),
    (lambda s: theory.q_eigenvalues(1.5, 0.5), "beta must lie"),
    (lambda s: theory.flow_trajectory(s, 1.01, [1]), "beta must lie"),
    (lambda s: theory.temperature_from_beta(0.5, 1.2, 1.0), "rho must lie"),
    (lambda s: theory.beta_from_temperature(2.1 * E_NORM**2, RHO, E_NORM), "2‖e‖²"),
    (lambda s: theory.flow_trajectory(s, 0.5, [-1]), "steps"),
    (lambda s: theory.flow_trajectory(s, 0.5, [1.5]), "steps"),
    (lambda s: theory.gd_trajectory(s, [1], method="newton"), "method"),
    (lambda s: theory.gd_trajectory(s, [1], eta=0.0), "eta"),
    (
        lambda s: theory.gd_closed_form(
            np.ones((2, 3)), np.zeros(2), np.zeros(2), 0.1, [1]
        ),
        "shape",
    ),
    (
        lambda s: theory.gd_iterate(np.eye(2), np.zeros(2), np.zeros(3), 0.1, 1),
        "theta0",
    ),
    (lambda s: theory.model_average(s, 1.5), "omega"),
    (lambda s: theory.errors(s, np.zeros(D + 1)), "thetas"),
    (lambda s: theory.flow_covariance_mc(s, 1.0, _KEY, 1), "num_samples"),
    (lambda s: theory.finite_sample_flow(s, _KEY, 0, [1]), "num_samples"),
    (
        lambda s: theory.finite_sample_flow(s, _KEY, 10, [1], temperature=0.0),
        "temperature",
    ),
    (  # None is the median, as in flowjax.flow_weights; the string is refused
        lambda s: theory.finite_sample_flow(s, _KEY, 10, [1], temperature="median"),
        "temperature must be None",
    ),
    (lambda s: theory.median_heuristic_temperature(-1.0), "e_norm"),
]


@pytest.mark.parametrize(("call", "match"), BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_invalid_input_raises_value_error(setting, call, match):
    with pytest.raises(ValueError, match=match):
        call(setting)


def test_wrong_types_raise_type_error(setting):
    with pytest.raises(TypeError, match="LinearSetting"):
        theory.flow_covariance((1, 2, 3), 1.0)
    with pytest.raises(TypeError, match="PRNG key"):
        theory.make_setting(0, 3, 0.5, 1.0)
    with pytest.raises(TypeError, match="PRNG key"):
        theory.flow_covariance_mc(setting, 1.0, 7, 100)


def test_public_surface():
    assert set(theory.__all__) == set(linear.__all__)
    for name in theory.__all__:
        assert getattr(theory, name) is getattr(linear, name)
        assert getattr(theory, name).__doc__
