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
    chunks = glob.glob(os.path.join(cache, "process-00000-of-00001", "chunk-*.npz"))
    cached = np.concatenate([np.load(c)["ids"] for c in chunks])
    assert 0 < len(cached) < len(uninterrupted)
    # Examples already cached get NaN inputs: recomputing any of them would raise.
    np.save(tmp_path / "poison.npy", cached)
    resumed = _subprocess.run(
        str(tmp_path / "resumed.npz"),
        "--cache",
        cache,
        "--poison",
        str(tmp_path / "poison.npy"),
    )
    assert resumed == uninterrupted
