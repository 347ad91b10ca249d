"""`make bench`'s suite runs end to end on tiny sizes and writes every figure with its spread."""

from __future__ import annotations

import json

import numpy as np

from experiments.benchmarks import suite


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
    table = (tmp_path / "suite.md").read_text()
    assert table.count("\n|") >= len(found)  # a row per figure (and the memory rows)
    assert "FLOW end to end / plain fine-tuning, mlp, 10 epochs, batched loss" in table
