"""A pre-pass SIGKILLed part-way and started again returns the uninterrupted table."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from . import _subprocess

pytestmark = pytest.mark.slow


def test_sigkilled_prepass_resumes_without_recomputing(tmp_path):
    cache = str(tmp_path / "cache")
    uninterrupted = _subprocess.run(str(tmp_path / "ref.npz"))
    _subprocess.run(
        str(tmp_path / "killed.npz"),
        "--cache",
        cache,
        "--kill-after",
        "7",
        expect_rc=-9,
    )
    cached = _chunk_ids(cache)
    assert 0 < len(cached) < len(uninterrupted)
    resumed = _subprocess.run(str(tmp_path / "resumed.npz"), "--cache", cache)
    assert resumed == uninterrupted
    # Nothing cached was computed again: the resumed run wrote only the missing rows.
    np.testing.assert_array_equal(np.sort(_chunk_ids(cache)), uninterrupted.ids)


def _chunk_ids(cache: str) -> np.ndarray:
    pattern = os.path.join(cache, "process-00000-of-00001", "chunk-*.npz")
    return np.concatenate([np.load(c)["ids"] for c in glob.glob(pattern)])
