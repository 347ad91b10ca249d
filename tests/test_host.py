"""Host buffers for XLA's CPU client: 64-byte aligned, otherwise ordinary numpy arrays."""

from __future__ import annotations

import numpy as np
import pytest

import flowjax
from flowjax import _engine, _host


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (256, 28, 28, 1), (7, 0, 2)])
@pytest.mark.parametrize(
    "dtype", [np.float32, np.int64, np.uint8, np.bool_, np.float16]
)
def test_empty_is_aligned_and_shaped(shape, dtype):
    for _ in range(5):  # several allocations: numpy's own alignment varies
        x = _host.empty(shape, dtype)
        assert x.shape == shape and x.dtype == dtype
        assert x.size == 0 or x.ctypes.data % _host.ALIGN == 0  # data to align
        assert x.flags.c_contiguous
        assert x.flags.writeable
        x[...] = 1  # writable over its whole extent
        assert x.size == 0 or x.astype(np.float64).sum() == x.size


def test_take_is_fancy_indexing_into_an_aligned_array():
    rng = np.random.default_rng(0)
    column = rng.normal(size=(100, 3, 4)).astype(np.float32)
    for rows in (np.arange(10, 30), rng.permutation(100)[:17], np.array([5, 5, 0])):
        got = _host.take(column, rows)
        np.testing.assert_array_equal(got, column[rows])
        assert got.ctypes.data % _host.ALIGN == 0
    strings = np.array(["a", "bb", "ccc"])
    np.testing.assert_array_equal(_host.take(strings, np.array([2, 0])), ["ccc", "a"])


def test_batches_and_merged_steps_are_aligned():
    data = {
        "x": np.random.default_rng(0).normal(size=(1000, 28, 28, 1)).astype(np.float32),
        "y": np.arange(1000, dtype=np.int32),
    }
    for batch in flowjax.batches(flowjax.ArraySource(data), 96, shuffle=True, seed=1):
        for k, v in batch.items():
            assert v.ctypes.data % _host.ALIGN == 0 or k == "id", k
        np.testing.assert_array_equal(
            batch["x"][:, 0, 0, 0], data["x"][batch["y"], 0, 0, 0]
        )
    # A step filled from batches that are not adjacent in memory: an aligned buffer.
    step = _engine._Filling([((28, 28, 1), np.dtype(np.float32))], 64, views=True)
    for start in (0, 500):
        step.add(
            [data["x"][start : start + 32].copy()], np.arange(start, start + 32), 0, 32
        )
    (leaf,) = step.leaves()
    assert leaf.ctypes.data % _host.ALIGN == 0
    np.testing.assert_array_equal(
        leaf, np.concatenate([data["x"][:32], data["x"][500:532]])
    )
