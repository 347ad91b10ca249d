"""The README's quick start runs as written."""

from __future__ import annotations

import os
import re

import jax
import numpy as np

import flowjax

README = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"
)


def test_quick_start_runs_and_trains(tmp_path, monkeypatch, capsys):
    with open(README) as f:
        text = f.read()
    quick = text[text.index("## Quick start") : text.index("## Where flowjax")]
    blocks = re.findall(r"```python\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), README, "exec"), namespace)
    table = flowjax.LossTable.load(tmp_path / "losses.npz")
    assert len(table) == 1000 and namespace["table"] == table
    assert namespace["weights"].temperature == table.median_temperature()
    out = capsys.readouterr().out
    assert "tau = " in out and "resumed from" not in out
    assert np.isfinite(float(namespace["loss"]))
    assert os.path.isdir(tmp_path / "prepass-cache")
    # Step 4: fit ran 100 steps, wrote 100 metrics lines and checkpoints ...
    first = namespace["result"]
    assert first.history[-1]["step"] == 100 and first.resumed_from is None
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert len(f.readlines()) == 100
    assert np.isfinite(first.history[-1]["param_distance"])
    # ... and run again as written it resumes from its last checkpoint: the same state.
    exec(compile(blocks[-1], README, "exec"), namespace)
    assert "resumed from step 100" in capsys.readouterr().out
    again = namespace["result"]
    assert again.history == first.history
    for a, b in zip(
        jax.tree.leaves(again.state.params),
        jax.tree.leaves(first.state.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_methods_snippet_runs_after_the_quick_start(tmp_path, monkeypatch):
    """The FLOW + L2-SP block continues the quick start's namespace and trains."""
    with open(README) as f:
        text = f.read()
    quick = text[text.index("## Quick start") : text.index("## Where flowjax")]
    methods = text[text.index("## Methods FLOW") : text.index("## Benchmark")]
    blocks = re.findall(r"```python\n(.*?)```", quick + methods, flags=re.S)
    assert len(blocks) == 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), README, "exec"), namespace)

    params, pretrained = namespace["params"], namespace["pretrained"]
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(abs(a - b).max()), params, pretrained)
    )
    assert max(moved) > 0
    assert np.isfinite(float(namespace["loss"]))
    # The state's anchor is θ₀ itself: the regulariser pulls toward the pre-trained model.
    anchor = namespace["opt_state"][0].anchor
    for a, b in zip(jax.tree.leaves(anchor), jax.tree.leaves(pretrained), strict=True):
        np.testing.assert_array_equal(a, b)
