"""`make bench`'s suite runs end to end on tiny sizes and writes every figure with its spread."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.benchmarks import suite, timing


def _ratios(tree, path=""):
    """Every ``{"median", "min", "max", "rounds"}`` in the result, with its path."""
    if isinstance(tree, dict):
        if {"median", "min", "max", "rounds"} <= set(tree):
            yield path, tree
            return
        for k, v in tree.items():
            yield from _ratios(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _ratios(v, f"{path}/{i}")


def test_quick_suite_writes_json_and_table_with_every_figure(tmp_path):
    result = suite.main(["--quick", "--rounds", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["config"]["quick"] and saved["prepass"] == result["prepass"]
    found = dict(_ratios(saved))
    for key in (
        "/prepass/0/plain_over_prepass",
        "/prepass/0/control_same_program_two_labels",
        "/training/0/plain_forms/same_program_two_labels",
        "/cache/control_same_program_two_labels",
        "/training/0/train_step/batched",
        "/training/0/train_step/per_example",
        "/training/0/end_to_end/batched_3_epochs",
        "/training/0/end_to_end/batched_10_epochs",
        "/cache/fresh_over_none",
        "/cache/resume_over_none",
        "/chunked_ce/0/fwd_time_ratio",
        "/lm_prepass/batched_speedup",
    ):
        r = found[key]
        assert np.isfinite(r["median"]) and 0 < r["min"] <= r["median"] <= r["max"], key
        assert r["rounds"] == 2, key
    # FLOW over more epochs costs relatively less: the pre-pass is paid once.
    e2e = saved["training"][0]["end_to_end"]
    assert e2e["batched_10_epochs"]["median"] < e2e["batched_3_epochs"]["median"]
    ce = saved["chunked_ce"][0]
    assert ce["fwd+bwd_chunked_temp_mib"] < ce["fwd+bwd_plain_temp_mib"]
    assert 0 < saved["lm_prepass"]["padding_waste"] < 1
    host = saved["host"]["host_us_per_step"]
    assert host["rounds"] == 2 and np.isfinite(host["median"])
    table = (tmp_path / "suite.md").read_text()
    assert table.count("\n|") >= len(found)  # a row per figure (and the memory rows)
    assert "FLOW end to end / plain fine-tuning, mlp, 10 epochs, batched loss" in table


def test_alternated_rounds_mirror_the_order_and_keep_each_round_s_fastest_call(
    monkeypatch,
):
    clock, calls = [0.0], []
    durations = {"a": iter([5, 3, 4, 9, 9, 2]), "b": iter([1, 7, 7, 6, 8, 6])}

    def fn(name):
        def run():
            calls.append(name)
            clock[0] += next(durations[name]) if len(calls) > 2 else 0.0  # 2 warm-ups

        return run

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    t = timing.alternated_rounds(
        {"a": fn("a"), "b": fn("b")}, rounds=2, repeats=3, warmups=1
    )
    # warm-up a b; round 0: a b | b a | a b; round 1 starts at b: b a | a b | b a
    assert "".join(calls) == "ab" + "abbaab" + "baabba"
    np.testing.assert_array_equal(t["a"], [3, 2])  # min of (5, 3, 4), of (9, 9, 2)
    np.testing.assert_array_equal(t["b"], [1, 6])  # min of (1, 7, 7), of (6, 8, 6)
    assert timing.summary(t["a"] / t["b"]) == {
        "median": 1.6667,
        "min": 0.3333,
        "max": 3.0,
        "rounds": 2,
    }


def test_timed_calls_run_with_the_garbage_collector_off_and_restore_it():
    import gc

    seen = []

    def fn():
        seen.append(gc.isenabled())

    assert gc.isenabled()
    timing.alternated_rounds({"a": fn}, rounds=2, repeats=2, warmups=0)
    assert seen == [False] * 4 and gc.isenabled()
    gc.disable()
    try:  # a caller's own setting is kept
        timing.alternated_rounds({"a": fn}, rounds=1, repeats=1, warmups=0)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError):  # restored when a call raises, too
        timing.alternated_rounds({"a": lambda: 1 / 0}, rounds=1, warmups=0)
    assert gc.isenabled()


def test_ratio_over_takes_the_baseline_with_the_lowest_median_not_each_round_s_minimum(
    monkeypatch,
):
    # Two baselines of the same speed with independent noise, and fn just as fast: the
    # per-round minimum of the two would be lower than either's time in most rounds (the
    # old method: ratios above 1); one baseline chosen by its median over the rounds is
    # not biased.
    rng = np.random.default_rng(0)
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def noisy():
        clock[0] += 1.0 + 0.05 * rng.standard_normal()

    def slow():
        clock[0] += 1.5

    ratios, t = timing.ratio_over(
        noisy, {"p": noisy, "q": noisy}, rounds=201, repeats=1, warmups=0
    )
    assert abs(float(np.median(ratios)) - 1.0) < 0.01
    old = t["timed"] / np.minimum(t["p"], t["q"])
    assert float(np.median(old)) > 1.02  # what the per-round minimum gave
    chosen = "p" if np.median(t["p"]) <= np.median(t["q"]) else "q"
    np.testing.assert_array_equal(t["base"], t[chosen])
    np.testing.assert_array_equal(ratios, t["timed"] / t[chosen])
    # A slower form of the baseline is never the one chosen.
    _, t = timing.ratio_over(noisy, {"slow": slow, "fast": noisy}, rounds=5, repeats=1)
    np.testing.assert_array_equal(t["base"], t["fast"])
    with pytest.raises(ValueError, match='"base"'):
        timing.ratio_over(noisy, {"base": noisy}, rounds=1)
