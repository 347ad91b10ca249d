"""The README's quick start runs as written."""

from __future__ import annotations

import os
import re

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
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), README, "exec"), namespace)
    table = flowjax.LossTable.load(tmp_path / "losses.npz")
    assert len(table) == 1000 and namespace["table"] == table
    assert namespace["weights"].temperature == table.median_temperature()
    assert "tau = " in capsys.readouterr().out
    assert np.isfinite(float(namespace["loss"]))
    assert os.path.isdir(tmp_path / "prepass-cache")


def test_methods_snippet_runs_after_the_quick_start(tmp_path, monkeypatch):
    """The FLOW + L2-SP block continues the quick start's namespace and trains."""
    with open(README) as f:
        text = f.read()
    quick = text[text.index("## Quick start") : text.index("## Where flowjax")]
    methods = text[text.index("## Methods FLOW") : text.index("## Benchmark")]
    blocks = re.findall(r"```python\n(.*?)```", quick + methods, flags=re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), README, "exec"), namespace)
    import jax

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
