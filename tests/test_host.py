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


def _big(fill=None) -> np.ndarray:
    x = _host.empty((512, 256), np.float32)  # 512 KiB: from the pool
    if fill is not None:
        x[...] = fill
    return x


def test_a_large_buffer_is_reused_only_once_nothing_uses_it():
    _host._POOL.clear()
    a = _big(1.0)
    address = a.ctypes.data
    view = a[10:20]
    del a
    assert _big().ctypes.data != address  # the view still uses it
    assert view.sum() == 10 * 256
    del view
    b = _big(2.0)  # now it is free: the same memory again
    assert b.ctypes.data == address
    np.testing.assert_array_equal(b, 2.0)
    # Small arrays are plain numpy memory, not pooled.
    assert type(_host.empty((10, 10), np.float32).base) is not _host._Lease
    assert type(b.base) is _host._Lease


def test_memory_jax_reads_is_not_reused_while_a_jax_array_holds_it():
    import jax
    import jax.numpy as jnp

    _host._POOL.clear()
    x = _big(1.0)
    y = jnp.asarray(x)  # on a CPU: may read x's memory in place
    z = jax.jit(lambda v: v * 1.0)(x)
    del x
    for _ in range(4):  # memory handed out now is not x's while y and z live
        _big(7.0)
    np.testing.assert_array_equal(np.asarray(y), 1.0)
    np.testing.assert_array_equal(np.asarray(z), 1.0)


def test_the_pool_keeps_at_most_pool_bytes(monkeypatch):
    size = 512 * 256 * 4 + _host.ALIGN
    monkeypatch.setattr(_host, "POOL_BYTES", 3 * size)
    _host._POOL.clear()
    arrays = [_big() for _ in range(5)]
    addresses = {x.ctypes.data for x in arrays}
    del arrays  # five buffers come back; three are kept
    assert _host._POOL._bytes == 3 * size
    again = [_big() for _ in range(4)]
    assert _host._POOL._bytes == 0
    reused = {x.ctypes.data for x in again[:3]}
    assert reused <= addresses and len(reused) == 3  # the three kept, then a new one
    _host._POOL.clear()


@pytest.mark.parametrize(
    "dtype",
    [
        np.bool_,
        np.int8,
        np.float16,
        np.complex64,
        np.dtype(">f4"),
        "<M8[s]",
        np.dtype([("a", "<i4"), ("b", "<f8")]),
    ],
)
def test_pooled_arrays_of_every_dtype(dtype):
    x = _host.empty((40000, 2), dtype)
    assert x.dtype == np.dtype(dtype) and x.shape == (40000, 2)
    assert (
        x.ctypes.data % _host.ALIGN == 0 and x.flags.c_contiguous and x.flags.writeable
    )
    assert type(x.base) is _host._Lease
    x[...] = np.zeros((), dtype)
    assert (x == np.zeros((), dtype)).all()


def test_a_cpu_step_views_adjacent_batches_only_from_an_aligned_start():
    """views="aligned" (a CPU): a step is a view of the caller's adjacent rows only if it
    starts aligned (then XLA reads it in place); otherwise the rows are copied into an
    aligned buffer (XLA would copy them at every dispatch)."""
    shapes = [
        ((1024,), np.dtype(np.float32))
    ]  # 4 KiB rows: chunks of 16 rows are 64 KiB
    raw = _host.empty((65 * 1024 * 4,), np.uint8)
    aligned = raw[: 64 * 4096].view(np.float32).reshape(64, 1024)
    shifted = raw[8 : 8 + 64 * 4096].view(np.float32).reshape(64, 1024)  # 8 bytes off
    for source, is_aligned in ((aligned, True), (shifted, False)):
        source[...] = np.arange(64, dtype=np.float32)[:, None]
        for views in ("aligned", True):
            step = _engine._Filling(shapes, 32, views=views)
            for start in (0, 16):
                step.add(
                    [source[start : start + 16]], np.arange(start, 16 + start), 0, 16
                )
            (leaf,) = step.leaves()
            np.testing.assert_array_equal(leaf, source[:32])
            assert np.shares_memory(leaf, source) is (is_aligned or views is True)
            if views == "aligned":
                assert leaf.ctypes.data % _host.ALIGN == 0
