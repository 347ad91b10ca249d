"""Host arrays that XLA's CPU client can read in place, from reused memory.

jax hands a numpy array to the CPU backend without a copy when its data is
64-byte aligned (XLA's CPU alignment) and C-contiguous, and copies it
otherwise, at every dispatch. numpy's own allocations of a few hundred KB
and more are only 16-byte aligned, so a batch gathered or merged into a
plain ``np.empty`` is copied once more by every jitted call that reads it:
measured on 2 CPUs, a 3 MB step input cost about 10 µs aligned and 200-800
µs otherwise.

Large buffers are also reused. A pre-pass gathers every batch and fills
every step into new memory (400 MB a pass of a 64k-example MNIST-sized data
set); fresh from the allocator, such memory is often handed back to the
system when freed and faulted in page by page when allocated again: measured,
10,000-20,000 page faults and 30-65 ms of system time per 300 ms pass. So an
array of ``POOLED_BYTES`` or more is a view of a buffer that returns to a
small free list (at most ``POOL_BYTES`` held) when the last array using it
is gone (its ``base`` is a :class:`_Lease`, released by reference counting:
never while jax, a view or the caller still holds it).
"""

from __future__ import annotations

import math
import threading

import numpy as np

ALIGN = 64  # bytes
POOLED_BYTES = 64 * 2**10  # arrays from this size up come from reused buffers
POOL_BYTES = 64 * 2**20  # free buffers kept, at most


class _Pool:
    """Free raw buffers by size, at most ``POOL_BYTES`` in all."""

    def __init__(self) -> None:
        self._free: dict[int, list[tuple[np.ndarray, int]]] = {}  # (buffer, address)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> tuple[np.ndarray, int]:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._bytes -= nbytes
                return free.pop()
        raw = np.empty(nbytes, np.uint8)
        return raw, raw.__array_interface__["data"][0]

    def put(self, raw: np.ndarray, address: int) -> None:
        with self._lock:
            if self._bytes + raw.nbytes <= POOL_BYTES:
                self._free.setdefault(raw.nbytes, []).append((raw, address))
                self._bytes += raw.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


_POOL = _Pool()


class _Lease:
    """Exports an aligned region of a pooled buffer; gives the buffer back when collected."""

    __slots__ = ("__array_interface__", "_address", "_raw")

    def __init__(self, raw: np.ndarray, address: int, shape, dtype: np.dtype) -> None:
        self._raw, self._address = raw, address
        start = address + (-address % ALIGN)
        self.__array_interface__ = {
            "data": (start, False),
            "shape": tuple(shape),
            "typestr": dtype.str,
            "version": 3,
        }
        if dtype.fields is not None:  # a structured dtype is described field by field
            self.__array_interface__["descr"] = dtype.descr

    def __del__(self) -> None:
        pool = _POOL  # (None while the interpreter shuts down)
        if pool is not None:
            pool.put(self._raw, self._address)


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on an ``ALIGN``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if not nbytes:  # no data to align
        return np.empty(shape, dtype)
    if nbytes < POOLED_BYTES or dtype.hasobject:
        raw = np.empty(nbytes + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        return raw[start : start + nbytes].view(dtype).reshape(shape)
    return np.asarray(_Lease(*_POOL.get(nbytes + ALIGN), shape, dtype))


def take(column: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``column[rows]`` (rows along the first axis) gathered into an aligned array.

    ``rows`` must be valid indices (``0 <= rows < len(column)``): the
    callers compute them from the column's own length.
    """
    out = empty((len(rows), *column.shape[1:]), column.dtype)
    # mode="clip" is numpy's unbuffered path (mode="raise" with out= gathers into a
    # temporary and copies it: 30x slower here); the rows are in range, so no row clips.
    return np.take(column, rows, axis=0, out=out, mode="clip")
