"""The computations of the linear-theory experiment (paper §7), one function per figure.

Each function takes the setting (:func:`make_setting`) and the
:class:`~experiments.theory.config.Config` and returns plain numbers and arrays; the driver
(:mod:`experiments.theory.linear_theory`) draws and summarises them. The theory itself is
the library's :mod:`flowjax.theory`.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from experiments import report
from experiments.theory.config import Config
from flowjax import theory


def make_setting(cfg: Config) -> theory.LinearSetting:
    a = np.random.default_rng(cfg.seed).normal(size=(cfg.d, cfg.d))
    sigma = np.eye(cfg.d) + a @ a.T / cfg.d
    return theory.make_setting(
        jax.random.key(cfg.seed), cfg.d, cfg.rho, cfg.e_norm, sigma
    )


def _steps_grid(max_steps: int, num: int = 220) -> np.ndarray:
    grid = np.unique(np.round(np.logspace(0, np.log10(max_steps), num)).astype(int))
    return np.concatenate([[0], grid[grid > 0]])


def trajectories(s: theory.LinearSetting, cfg: Config) -> dict:
    """Figure (a): err₁, err₂, err_tot along vanilla FT and FLOW at several τ."""
    e2 = s.e_norm**2
    steps = _steps_grid(cfg.traj_max_steps)
    tau_med = theory.median_heuristic_temperature(s.e_norm)
    beta_med = theory.beta_from_temperature(tau_med, s.rho, s.e_norm)
    runs = {"vanilla (η=½)": theory.errors(s, theory.vanilla_trajectory(s, steps))}
    betas = {"β=1 (τ=2‖e‖²)": 1.0, f"median τ (β={beta_med:.2f})": beta_med}
    betas |= {"β=0.1": 0.1, "β=0.01": 0.01}
    for label, beta in betas.items():
        runs[label] = theory.errors(s, theory.flow_trajectory(s, beta, steps))
    omegas = np.linspace(0, 1, 201)
    ma = theory.errors(s, theory.model_average(s, omegas))
    omega_star, ma_best = theory.best_model_average(s)
    out = {"steps": steps, "runs": runs, "omegas": omegas, "ma": ma}
    out["ma_best"] = {"omega": omega_star, "err_tot": ma_best / e2}
    out["best"] = {
        label: {
            "err_tot": float(err.err_tot.min() / e2),
            "K": int(steps[np.argmin(err.err_tot)]),
            "temperature_over_e2": (
                None
                if label.startswith("vanilla")
                else float(
                    theory.temperature_from_beta(betas[label], s.rho, s.e_norm) / e2
                )
            ),
        }
        for label, err in runs.items()
    }
    out["vanilla_limit"] = float(runs["vanilla (η=½)"].err_tot[-1] / e2)
    return out


def stall(s: theory.LinearSetting, cfg: Config) -> dict:
    """Figure (b): λ₁ (and λ₂) against β and τ; steps to halve the stalled residual."""
    betas = np.logspace(-4, 0, cfg.stall_betas)
    by_rho = {r: theory.q_eigenvalues(betas, r) for r in (0.0, 0.5, 0.8, 0.95)}
    lambda1, _ = theory.q_eigenvalues(betas, s.rho)
    tau = theory.temperature_from_beta(betas, s.rho, s.e_norm)
    half_life = np.log(2) / -np.log(lambda1)
    table = []
    for b in (1.0, 0.1, 0.01, 0.001):
        l1, l2 = theory.q_eigenvalues(b, s.rho)
        table.append(
            {
                "beta": b,
                "temperature_over_e2": (
                    theory.temperature_from_beta(b, s.rho, s.e_norm) / s.e_norm**2
                ),
                "lambda1": l1,
                "lambda2": l2,
                "steps_to_halve": math.log(2) / -math.log(l1),
            }
        )
    return {
        "betas": betas,
        "by_rho": by_rho,
        "temperature": tau,
        "half_life": half_life,
        "table": table,
    }


def covariance_check(s: theory.LinearSetting, cfg: Config) -> dict:
    """Figure (c): closed-form Σ′ (Theorem 7.2) against Monte-Carlo."""
    iu = np.triu_indices(s.d)
    rows = []
    for i, ratio in enumerate(cfg.mc_temperature_over_e2):
        tau = ratio * s.e_norm**2
        closed = theory.flow_covariance(s, tau)
        mc = theory.flow_covariance_mc(s, tau, jax.random.key(100 + i), cfg.mc_samples)
        z = (mc.mean - closed) / mc.stderr
        rows.append(
            {
                "temperature_over_e2": ratio,
                "closed": closed[iu],
                "mc": mc.mean[iu],
                "stderr": mc.stderr[iu],
                "z": z[iu],
                "max_abs_z": float(np.max(np.abs(z[iu]))),
                "max_abs_diff": float(np.max(np.abs(mc.mean - closed))),
            }
        )
    return {"rows": rows, "num_samples": cfg.mc_samples}


def finite_sample(s: theory.LinearSetting, cfg: Config) -> dict:
    """Figure (d): FLOW on n samples via flowjax.flow_weights vs the population."""
    e2 = s.e_norm**2
    tau_med = theory.median_heuristic_temperature(s.e_norm)
    eta = 0.5 / theory.flow_mu(tau_med, s.e_norm)
    steps = np.arange(cfg.fs_max_steps + 1)
    population = theory.gd_trajectory(s, steps, temperature=tau_med, eta=eta)
    pop_err = theory.errors(s, population)
    k_star = int(
        np.argmin(pop_err.err_tot)
    )  # early-stopping point of the population run
    rows, curves = [], {}
    for n in cfg.fs_sizes:
        devs, taus, errs = [], [], []
        for seed in range(cfg.fs_seeds):
            key = jax.random.key(1000 * seed + n)
            run = theory.finite_sample_flow(s, key, n, steps, eta=eta)
            devs.append(np.max(np.linalg.norm(run.thetas - population, axis=1)))
            taus.append(run.temperature / e2)
            errs.append(theory.errors(s, run.thetas))
        curves[n] = errs[0]
        dev = report.mean_std(devs)  # over seeds; sample std (ddof 1)
        rows.append(
            {
                "n": n,
                "deviation_mean": dev["mean"] / s.e_norm,
                "deviation_sd": dev["std"] / s.e_norm,
                "temperature_over_e2_mean": float(np.mean(taus)),
                "temperature_rel_err_mean": float(
                    np.mean(np.abs(np.array(taus) * e2 / tau_med - 1))
                ),
                "err_tot_at_k_star_mean": float(
                    np.mean([er.err_tot[k_star] for er in errs]) / e2
                ),
            }
        )
    logn = np.log([r["n"] for r in rows])
    slope = float(np.polyfit(logn, np.log([r["deviation_mean"] for r in rows]), 1)[0])
    return {
        "steps": steps,
        "population": pop_err,
        "curves": curves,
        "rows": rows,
        "slope": slope,
        "eta": eta,
        "median_temperature_over_e2": tau_med / e2,
        "k_star": k_star,
        "pop_err_tot_at_k_star": float(pop_err.err_tot[k_star] / e2),
    }


def pareto_front(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower-left Pareto front of points (x, y): minimise both."""
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    keep = y < np.minimum.accumulate(np.concatenate([[np.inf], y[:-1]]))
    return x[keep], y[keep]


def fronts(s: theory.LinearSetting, cfg: Config) -> dict:
    """Figure (e): err₁-err₂ fronts of FLOW (over τ and K) and model averaging (over ω)."""
    e2 = s.e_norm**2
    a = float(s.e @ s.sigma @ s.e)  # err₁(θ̃*) = eᵀΣe
    steps = _steps_grid(int(10**cfg.front_log10_max_steps), cfg.front_steps)
    betas = np.logspace(-4, 0, cfg.front_betas)
    err1, err2 = [], []
    for beta in betas:
        err = theory.errors(s, theory.flow_trajectory(s, beta, steps))
        err1.append(err.err1)
        err2.append(err.err2)
    err1, err2 = np.array(err1) / e2, np.array(err2) / e2  # [β, K]
    fx, fy = pareto_front(err1.ravel(), err2.ravel())

    # Model averaging: err₁ = (1-ω)² eᵀΣe, err₂ = ω²‖e‖², i.e. err₂(err₁) below.
    omegas = np.linspace(0, 1, 401)
    ma = theory.errors(s, theory.model_average(s, omegas))
    ma1, ma2 = ma.err1 / e2, ma.err2 / e2

    # FLOW's best err₂ at err₁ <= each MA point's err₁, minus MA's err₂.
    flow_at = np.array([fy[fx <= x].min() if np.any(fx <= x) else np.inf for x in ma1])
    gap = flow_at - ma2
    interior = (omegas > 0.02) & (omegas < 0.98)
    i_min = int(np.argmin(gap))
    tot = err1 + err2
    ib, ik = np.unravel_index(np.argmin(tot), tot.shape)
    omega_star, ma_best = theory.best_model_average(s)
    vanilla = theory.errors(s, theory.vanilla_trajectory(s, np.arange(0, 41)))
    beta_med = theory.beta_from_temperature(
        theory.median_heuristic_temperature(s.e_norm), s.rho, s.e_norm
    )
    med = theory.errors(s, theory.flow_trajectory(s, beta_med, np.arange(0, 41)))
    return {
        "err1": err1,
        "err2": err2,
        "betas": betas,
        "front": (fx, fy),
        "ma": (ma1, ma2),
        "omegas": omegas,
        "gap": gap,
        "vanilla": (vanilla.err1 / e2, vanilla.err2 / e2),
        "median_path": (med.err1 / e2, med.err2 / e2),
        "summary": {
            "num_flow_points": int(err1.size),
            "max_gap": float(np.max(gap)),
            "max_gap_omega": float(omegas[int(np.argmax(gap))]),
            "min_gap": float(gap[i_min]),
            "min_gap_omega": float(omegas[i_min]),
            "min_gap_err1": float(ma1[i_min]),
            "frac_below_1e-3": float(np.mean(gap[interior] < -1e-3)),
            "frac_on_or_below_1e-3": float(np.mean(gap <= 1e-3)),
            "flow_best_err_tot": float(tot[ib, ik]),
            "flow_best_beta": float(betas[ib]),
            "flow_best_temperature_over_e2": float(
                theory.temperature_from_beta(betas[ib], s.rho, s.e_norm) / e2
            ),
            "flow_best_K": int(steps[ik]),
            "ma_best_err_tot": ma_best / e2,
            "ma_best_omega": omega_star,
            "err1_ft_optimum": a / e2,
        },
    }
