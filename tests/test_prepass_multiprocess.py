"""Two JAX processes on loopback (CPU, gloo collectives) give every process the whole table."""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest

import flowjax

from . import _data, _lm_data, _subprocess

pytestmark = pytest.mark.slow


def _two_processes(tmp_path, tag: str, *extra: str):
    outs = [str(tmp_path / f"{tag}-{i}.npz") for i in range(2)]
    procs = _subprocess.start_two(outs, "--devices", "2", *extra)
    for p in procs:
        _subprocess.finish(p)
    return [flowjax.LossTable.load(o) for o in outs]


def test_two_processes_each_get_the_complete_single_process_table(tmp_path):
    single = _subprocess.run(str(tmp_path / "single.npz"), "--devices", "1")
    first, second = _two_processes(tmp_path, "mp")
    assert first == second  # identical on every process
    np.testing.assert_array_equal(
        first.ids, single.ids
    )  # exact: nothing lost, nothing doubled
    np.testing.assert_allclose(first.losses, single.losses, rtol=1e-5, atol=1e-8)
    reference = _data.reference_losses(_data.params(), _data.dataset())[
        np.argsort(_data.dataset()["id"])
    ]
    np.testing.assert_allclose(first.losses, reference, rtol=2e-5)


def test_two_processes_with_a_batched_loss_get_the_single_process_table(tmp_path):
    single = _subprocess.run(str(tmp_path / "single.npz"), "--devices", "1")
    first, second = _two_processes(tmp_path, "batched", "--batched")
    assert first == second
    np.testing.assert_array_equal(first.ids, single.ids)
    np.testing.assert_allclose(first.losses, single.losses, rtol=1e-5, atol=1e-8)


def test_two_processes_resume_from_caches_with_different_progress(tmp_path):
    cache = str(tmp_path / "cache")
    full = _two_processes(tmp_path, "full", "--cache", cache)
    # Process 1 lost its last cache chunks (killed earlier than process 0): it recomputes
    # those rows, process 0 serves all of its rows from its cache, and both still agree.
    chunks = sorted(
        glob.glob(os.path.join(cache, "process-00001-of-00002", "chunk-*.npz"))
    )
    assert len(chunks) > 2
    for c in chunks[-2:]:
        os.remove(c)
    resumed = _two_processes(tmp_path, "resumed", "--cache", cache)
    assert resumed[0] == resumed[1] == full[0]


def _scenario_results(output: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {r["scenario"]: r for r in lines}


def test_bad_input_on_one_process_raises_the_same_error_on_every_process_promptly(
    tmp_path,
):
    """Every bad-input case, each in its turn in one two-process run (1 device each).

    One process gets the bad input; both must raise the same ValueError naming the
    process and the ids, within seconds (a process left in a collective would wait
    for the 30 s runtime timeout, or forever), and then both go on to the next case.
    """
    outs = [str(tmp_path / f"s-{i}.npz") for i in range(2)]
    procs = _subprocess.start_two(outs, "--scenarios")
    results = [_scenario_results(_subprocess.finish(p)) for p in procs]
    data = _data.dataset()
    cut = len(data["id"]) * 3 // 5
    ids0, ids1 = data["id"][:cut], data["id"][cut:]
    lm_ids = {e["id"] for e in _lm_data.examples()}
    stopped = r"{fn} stopped on every process because process\(es\) \[{p}\] failed on their own input: process {p}: "
    expected = {
        "empty": r"batches is empty on process\(es\) \[1\]",
        "first batch without id": stopped.format(fn="per_example_losses", p=1)
        + r'every batch must be a dict with an integer "id"',
        "later batch with wrong shape": stopped.format(fn="per_example_losses", p=1)
        + rf"field \['x'\] has per-example shape \(7,\); .*the batch of ids \[{ids1[48]}, ",
        "later batch with wrong dtype": stopped.format(fn="per_example_losses", p=0)
        + rf"field \['x'\] has dtype int32; .*the batch of ids \[{ids0[32]}, ",
        "nan loss": rf"NaN or infinite losses for example ids \[{ids1[40]}\].*\(fed by process\(es\) \[1\]\)",
        "batched loss couples rows": r"per_example_losses: the batched loss_fn couples the "
        "rows of a batch",
        "id on both processes": rf"duplicate example ids: \[{ids0[10]}\] were fed by more than one process",
        "endless loader": stopped.format(fn="per_example_losses", p=0)
        + r"duplicate example ids: \[[\d, ]+\].* arrived again after an earlier batch: "
        "this loader repeats examples: pass a single-epoch iterator",
        "loader raises": stopped.format(fn="per_example_losses", p=1)
        + "OSError: disk on fire",
        "lm malformed example": stopped.format(fn="lm_token_losses", p=1)
        + r"example \d+: tokens and mask must be 1-D of one length",
        "lm id on both processes": r"duplicate example ids: \[\d+\] were fed by more than one process",
        "cache_dir not writable": stopped.format(fn="per_example_losses", p=1)
        + r"cache_dir '.*a-file/cache' is not writable",
        "cache_dir of another pre-pass": stopped.format(fn="per_example_losses", p=1)
        + r"cache_dir '.*' was written by a different pre-pass \(loss_fn: ",
        "fisher empty": r"batches is empty on process\(es\) \[1\]",
        "fisher later batch with missing rows": stopped.format(
            fn="diagonal_fisher", p=1
        )
        + r"field \['x'\] has 15 rows but the batch has 16 ids \(the batch of ids \[",
    }
    assert results[0].keys() == results[1].keys() == expected.keys()
    for name, pattern in expected.items():
        first, second = results[0][name], results[1][name]
        assert first["error"] is not None, f"{name}: no error"
        assert first["error"] == second["error"], name  # the same error everywhere
        assert re.search(pattern, first["error"]), (name, first["error"])
        assert max(first["seconds"], second["seconds"]) < 10, (name, first, second)
    lm_dup = re.search(r"\[(\d+)\]", results[0]["lm id on both processes"]["error"])
    assert int(lm_dup.group(1)) in lm_ids
    # The repeated ids it names are process 0's own.
    repeated = re.search(r"ids: \[([\d, ]+)\]", results[0]["endless loader"]["error"])
    assert set(map(int, repeated.group(1).split(", "))) <= set(ids0.tolist())
