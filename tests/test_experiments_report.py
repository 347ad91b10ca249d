"""experiments/report.py and experiments/cli.py: the reporting and config handling every experiment shares."""

import dataclasses
import json
import math

import numpy as np
import pytest

from experiments import cli, report


def test_mean_std_is_the_sample_std():
    x = [0.91, 0.28, 0.80, 0.55]
    s = report.mean_std(x)
    mean = sum(x) / 4
    assert s["mean"] == pytest.approx(mean, abs=1e-15)
    # ddof = 1, by hand
    assert s["std"] == pytest.approx(
        math.sqrt(sum((v - mean) ** 2 for v in x) / 3), abs=1e-15
    )
    assert s["std"] == pytest.approx(float(np.std(x, ddof=1)), abs=1e-15)
    assert s["std"] > float(np.std(x))  # not the population std
    assert set(s) == {"mean", "std"}
    assert report.mean_std(x, keep_values=True)["values"] == x
    # one seed: std 0, not NaN
    assert report.mean_std([0.7]) == {"mean": 0.7, "std": 0.0}
    # a generator works (the drivers pass dict views)
    assert report.mean_std(v for v in (1.0, 3.0)) == {
        "mean": 2.0,
        "std": math.sqrt(2.0),
    }


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf"), 2.0, 3.0]])
def test_mean_std_rejects_empty_and_non_finite(bad):
    with pytest.raises(ValueError, match="mean_std"):
        report.mean_std(bad)
    if bad:
        with pytest.raises(ValueError, match=r"positions \[[01]\]"):
            report.mean_std(bad)


def test_paired_differences_are_taken_seed_by_seed():
    a = {0: 0.90, 1: 0.70, 2: 0.95}
    b = {2: 0.85, 0: 0.80, 1: 0.66}  # another order: pairing is by seed, not position
    d = report.paired_differences(a, b)
    diffs = np.array([0.90 - 0.80, 0.70 - 0.66, 0.95 - 0.85])
    assert d["mean"] == pytest.approx(diffs.mean(), abs=1e-15)
    assert d["std"] == pytest.approx(diffs.std(ddof=1), abs=1e-15)
    # not the difference of the two means with the stds combined
    unpaired = np.std(list(a.values()), ddof=1)
    assert d["std"] < unpaired / 2
    with pytest.raises(
        ValueError, match=r"only in the first \[3\], only in the second \[\]"
    ):
        report.paired_differences({**a, 3: 0.5}, b)


def test_pm_scales_and_rounds():
    assert report.pm({"mean": 0.98765, "std": 0.01234}, scale=100) == "98.8 ± 1.2"
    assert report.pm({"mean": 0.0312, "std": 0.00456}, digits=4) == "0.0312 ± 0.0046"
    assert report.pm({"mean": -0.034, "std": 0.019}, 100) == "-3.4 ± 1.9"


def test_markdown_table_format():
    table = report.markdown_table(
        ["method", "LR", "acc"], [["FT", 0.03, "98.8 ± 0.5"], ["WiSE-FT", "", "95.6"]]
    )
    assert table == (
        "| method | LR | acc |\n"
        "|---|---|---|\n"
        "| FT | 0.03 | 98.8 ± 0.5 |\n"
        "| WiSE-FT | | 95.6 |"
    )
    assert report.markdown_table(["", "a"], []) == "| | a |\n|---|---|"
    assert report.markdown_table(["V", "ms"], [[1, "2.0"]], align="lr") == (
        "| V | ms |\n|---|---:|\n| 1 | 2.0 |"
    )
    with pytest.raises(ValueError, match="one of 'l'/'r' per column"):
        report.markdown_table(["V", "ms"], [], align="l")
    with pytest.raises(ValueError, match="row 1 has 2 cells, the header has 3"):
        report.markdown_table(["a", "b", "c"], [[1, 2, 3], [1, 2]])


def test_write_json_records_plain_data(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        grid: tuple = (0.1, 0.3)
        rank: int = 4

    obj = {
        "config": report.config_dict(Cfg()),
        "x": np.float32(0.5),
        "n": np.int64(3),
        "arr": np.arange(3),
        "by_lr": {0.1: 1.0},
    }
    back = report.write_json(tmp_path / "r.json", obj)
    assert back == json.loads((tmp_path / "r.json").read_text())
    assert back == {
        "config": {"grid": [0.1, 0.3], "rank": 4},
        "x": 0.5,
        "n": 3,
        "arr": [0, 1, 2],
        "by_lr": {"0.1": 1.0},
    }
    assert (tmp_path / "r.json").read_text().endswith("}\n")
    with pytest.raises(ValueError, match=r"/a/b\[1\] is nan"):
        report.write_json(tmp_path / "bad.json", {"a": {"b": [1.0, float("nan")]}})


@dataclasses.dataclass(frozen=True)
class _Inner:
    steps: int = 400


@dataclasses.dataclass(frozen=True)
class _Outer:
    seeds: tuple = (0, 1, 2)
    lr: float = 1e-3
    inner: _Inner = _Inner()


def test_override_sets_fields_and_nested_fields():
    cfg = cli.override(_Outer(), ["seeds=[0]", "lr=3e-3", "inner.steps=5"])
    assert cfg == _Outer(seeds=(0,), lr=3e-3, inner=_Inner(steps=5))
    assert cli.override(_Outer(), []) == _Outer()
    with pytest.raises(ValueError, match="has no field 'sedes'"):
        cli.override(_Outer(), ["sedes=1"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        cli.override(_Outer(), ["seeds"])
    with pytest.raises(ValueError, match="cannot parse"):
        cli.override(_Outer(), ["lr=fast"])
    with pytest.raises(ValueError, match="not a nested config"):
        cli.override(_Outer(), ["lr.x=1"])


@pytest.mark.parametrize("module", [report, cli])
def test_docstring_examples(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
