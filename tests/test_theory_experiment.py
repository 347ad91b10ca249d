"""Smoke test of experiments.theory.linear_theory in its reduced (--quick) setting."""

import json

import numpy as np
import pytest

from experiments import report
from experiments.theory import analysis, linear_theory
from experiments.theory.config import get_config

FIGURES = (
    "fig_a_errors_vs_steps.png",
    "fig_b_stall.png",
    "fig_c_covariance_mc.png",
    "fig_d_finite_sample.png",
    "fig_e_fronts.png",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    summary = linear_theory.main(["--quick", "--out", str(out)])
    return out, summary


def test_writes_every_output(quick_run):
    out, summary = quick_run
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "summary.md").read_text()
    assert "FLOW strictly below MA" in md and "Lemma F.4" in md


def test_summary_numbers_are_sane(quick_run):
    _, s = quick_run
    st = s["setting"]
    assert s["config"] == report.config_dict(get_config(quick=True))
    assert s["config"]["d"] == 6 and st["rho"] == 0.8
    np.testing.assert_allclose(st["median_chi2_1"], 0.454936423119572, rtol=1e-12)
    assert abs(st["median_mc_over_e2"] - st["median_chi2_1"]) < 0.03
    np.testing.assert_allclose(st["mu2_median"], 0.45493642 / 2.45493642, rtol=1e-7)

    # (a) vanilla FT ends at θ̃*, err_tot = eᵀΣe (Eq. 13); Lemma F.4's optimum.
    a = st["eSe_over_e2"]
    traj = s["a_trajectories"]
    np.testing.assert_allclose(traj["vanilla_limit"], a, rtol=1e-6)
    np.testing.assert_allclose(traj["ma_best"]["err_tot"], a / (a + 1), rtol=1e-12)

    # (b) the stall: λ₁ grows to 1 and the halving time grows like 1/β.
    lam = [row["lambda1"] for row in s["b_stall"]]
    assert lam == sorted(lam) and lam[-1] > 0.999
    np.testing.assert_allclose(s["b_stall"][0]["lambda1"], (1 + 0.64) / 2)

    # (c) closed form within 4 standard errors of Monte-Carlo, entry by entry.
    assert all(row["max_abs_z"] < 4 for row in s["c_covariance"]["rows"])

    # (d) finite-sample FLOW approaches the population as n grows.
    rows = s["d_finite_sample"]["rows"]
    devs = [row["deviation_mean"] for row in rows]
    assert devs[-1] < devs[0] / 4 and devs[-1] < 0.03
    assert -0.8 < s["d_finite_sample"]["slope"] < -0.3

    # (e) FLOW's front is never above model averaging's, and strictly below inside.
    e = s["e_fronts"]
    assert e["max_gap"] <= 1e-3
    assert e["min_gap"] < -0.05
    assert e["frac_on_or_below_1e-3"] == 1.0
    assert e["flow_best_err_tot"] < e["ma_best_err_tot"]


def test_config_overrides_reach_the_computations(tmp_path):
    cfg = linear_theory.cli.override(get_config(quick=True), ["d=4", "rho=0.5"])
    s = analysis.make_setting(cfg)
    assert s.sigma.shape == (4, 4) and s.rho == 0.5
    with pytest.raises(
        SystemExit
    ):  # an unknown field is an argparse error, before any work
        linear_theory.main(["--quick", "--set", "dd=4", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
