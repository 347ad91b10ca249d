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
