"""Theory as code: the linear model of the FLOW paper's section 7.

``flowjax.theory.linear`` holds the setting, Theorem 7.2's weighted
covariance, the eigen-analysis of Lemma F.3, closed-form and iterated gradient
descent, the errors, model averaging (Lemma F.4), the median temperature, and
finite-sample FLOW run through :func:`flowjax.flow_weights`. Everything is
float64 internally and returns numpy values; the global ``jax_enable_x64`` is
never changed.

Example:
  >>> import jax
  >>> from flowjax import theory
  >>> s = theory.make_setting(jax.random.key(0), d=3, rho=0.8, e_norm=1.0)
  >>> theory.q_eigenvalues(1.0, s.rho)  # β = 1: λ₁ = (1 + ρ²)/2
  (0.82, 0.0)
"""

from flowjax.theory.linear import (
    Errors,
    FiniteSampleFlow,
    LinearSetting,
    MonteCarloEstimate,
    QEigen,
    best_model_average,
    beta_from_temperature,
    errors,
    finite_sample_flow,
    flow_covariance,
    flow_covariance_mc,
    flow_mu,
    flow_q,
    flow_trajectory,
    flow_trajectory_stalled,
    gd_closed_form,
    gd_iterate,
    gd_trajectory,
    make_setting,
    median_chi2_1,
    median_heuristic_temperature,
    median_heuristic_temperature_mc,
    model_average,
    mu_from_beta,
    q_eigen,
    q_eigenvalues,
    temperature_from_beta,
    vanilla_trajectory,
)

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
