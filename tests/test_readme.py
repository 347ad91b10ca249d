"""The README's quick start runs as written and fine-tunes with FLOW's weights.

The longer quick start, the baseline snippets and resuming are on the docs pages and
run in tests/test_docs.py.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np

README = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"
)


def test_quick_start_runs_and_trains(tmp_path, monkeypatch, capsys):
    with open(README) as f:
        text = f.read()
    quick = text[text.index("## Quick start") : text.index("## Documentation")]
    blocks = re.findall(r"```python\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), README, "exec"), namespace)
    # The fit snippet: one record per step's end, checkpoints written; the same snippet
    # again resumes from the last checkpoint and gives the same parameters.
    result = namespace["result"]
    assert result.history[-1]["step"] == 8 and result.resumed_from is None
    assert os.path.isdir(tmp_path / "checkpoints" / "8")
    again: dict = {}
    exec(compile("\n".join(blocks), README, "exec"), again)
    assert again["result"].resumed_from == 8
    printed = capsys.readouterr().out
    assert "resumed from step 8" in printed
    for a, b in zip(
        jax.tree.leaves(result.state.params),
        jax.tree.leaves(again["result"].state.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # The fit run is the hand loop's: same objective, same optimiser, same batches.
    for a, b in zip(
        jax.tree.leaves(result.state.params),
        jax.tree.leaves(namespace["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    table, weights = namespace["table"], namespace["weights"]
    assert len(table) == 1000 and os.path.isdir(tmp_path / "prepass-cache")
    np.testing.assert_array_equal(table.ids, np.arange(1000))
    # The weights are exp(-f/τ) at the median, looked up by id.
    tau = float(np.median(table.losses))
    assert weights.temperature == table.median_temperature()
    np.testing.assert_allclose(weights.weights, np.exp(-table.losses / tau), rtol=1e-6)
    assert f"tau = {weights.temperature:.3f}" in printed
    # The loop trained on the FLOW objective: Σ w_i f_i / n over all examples, in numpy,
    # is lower at the fine-tuned parameters than at θ*.
    data = namespace["data"]
    w = weights.lookup(data["id"])

    def objective_np(p):
        logits = data["x"].astype(np.float64) @ np.asarray(
            p["kernel"][...]
        ) + np.asarray(p["bias"][...])
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(np.mean(w * -logp[np.arange(1000), data["y"]]))

    before = objective_np(namespace["pretrained"])
    assert np.isclose(before, np.mean(w * table.losses), rtol=1e-5)
    assert objective_np(namespace["params"]) < before - 1e-4  # 8 Adam steps at 1e-3
    assert np.isfinite(float(namespace["loss"]))


def test_performance_table_quotes_the_committed_bench_run():
    # The README's table is rows of results/benchmarks/suite.md as `make bench` wrote them.
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Performance") :]
    section = section[: section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) > 10 and "make bench" in section
    with open(
        os.path.join(os.path.dirname(README), "results", "benchmarks", "suite.md")
    ) as f:
        suite = f.read().splitlines()
    missing = [row for row in rows if row not in suite]
    assert not missing, missing
