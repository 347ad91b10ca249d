"""Two JAX processes on loopback (CPU, gloo collectives) give every process the whole table."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

import flowjax

from . import _data, _subprocess

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
