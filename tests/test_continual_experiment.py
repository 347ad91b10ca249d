"""The task-sequence experiment: a tiny run end to end, its outputs, invariants and resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.continual import run

PNG = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--quick",
    "--set", "num_tasks=2",
    "--set", "epochs=1",
    "--set", "packnet_retrain_epochs=1",
    "--set", "lp_epochs=1",
    "--set", "channels=(4, 8)",
    "--set", "hidden=16",
    "--set", "methods=('FT', 'PackNet', 'Progressive')",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    return out, run.main([*TINY, "--out", str(out)])


def _recomputed(R, b):
    """ACC, BWT, FWT and forgetting from the matrix, written out in numpy."""
    R, b = np.asarray(R), np.asarray(b)
    T = len(R)
    bwt = np.mean([R[-1, j] - R[j, j] for j in range(T - 1)])
    fwt = np.mean([R[j - 1, j] - b[j] for j in range(1, T)])
    forg = np.mean([R[: T - 1, j].max() - R[-1, j] for j in range(T - 1)])
    return {"acc": R[-1].mean(), "bwt": bwt, "fwt": fwt, "forgetting": forg}


def test_outputs_and_invariants(tiny):
    out, res = tiny
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert res["config"]["num_tasks"] == 2 and res["config"]["seeds"] == 1
    task, cls = res["settings"]["task"], res["settings"]["class"]
    # PackNet and the progressive network need the task id: task-incremental only.
    assert set(cls["methods"]) == {"FT"} and set(task["methods"]) == {
        "FT",
        "PackNet",
        "Progressive",
    }
    assert task["flow_combined_with"] == []  # FLOW is not among the methods run
    for setting, sres in res["settings"].items():
        for name, m in sres["methods"].items():
            (s,) = m["seeds"]
            R = np.asarray(s["R"])
            assert R.shape == (2, 2) and ((R >= 0) & (R <= 1)).all()
            # The diagonal is each task's accuracy right after training it.
            np.testing.assert_array_equal(np.diagonal(R), s["after_task"])
            for k, v in _recomputed(R, s["baseline"]).items():
                assert s["metrics"][k] == pytest.approx(v, abs=1e-12), (
                    setting,
                    name,
                    k,
                )
                assert m["mean"][k] == s["metrics"][k] and m["std"][k] == 0.0
            np.testing.assert_array_equal(m["R_mean"], R)
            assert s["finite"], (setting, name)
    # Methods that never change an earlier task's weights: its accuracy stays exactly.
    for name in ("PackNet", "Progressive"):
        (s,) = task["methods"][name]["seeds"]
        R = np.asarray(s["R"])
        assert R[1, 0] == R[0, 0] and s["metrics"]["bwt"] == 0.0, name
        assert R[0, 0] > 0.9, name  # task 0 ({0, 1}) is learnt in one epoch
    # Plain fine-tuning in the class-incremental setting forgets task 0 entirely.
    assert cls["methods"]["FT"]["seeds"][0]["R"][1][0] < 0.2
    md = (out / "results.md").read_text()
    for name in [*task["methods"], *cls["methods"]]:
        assert f"| {name} |" in md
    for name in ("matrices_task.png", "matrices_class.png", "acc_vs_bwt.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5_000, name


def test_rerun_restores_every_stage_and_repeats_the_results(tiny):
    out, _ = tiny
    before = (out / "results.json").read_bytes()
    first = json.loads((out / "timing.json").read_text())
    assert (
        first["stages_trained"] == 9 and first["stages_restored_from_checkpoints"] == 0
    )
    assert list(
        (out / "checkpoints" / "task" / "packnet" / "seed0").glob("t0-retrain-*")
    )
    run.main([*TINY, "--out", str(out)])
    assert (out / "results.json").read_bytes() == before
    again = json.loads((out / "timing.json").read_text())
    assert again["stages_trained"] == 0
    assert again["stages_restored_from_checkpoints"] == first["stages_trained"]
