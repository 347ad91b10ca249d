"""On-disk cache of a pre-pass in progress, so a killed pre-pass resumes instead of restarting.

Layout: ``cache_dir/process-<i>-of-<n>/`` holds ``manifest.json`` (what the
results depend on) and ``chunk-<k>.npz`` files of finished ``(ids, losses)``
rows of the examples *this process fed*: ``ids`` int64 ``[n]`` and ``losses``
float32 ``[n, *shape]`` (``shape`` is ``()`` for scalar losses; other shapes
are recorded in the manifest as ``output_shape``). Chunks are written to a temporary
file and renamed into place, so a kill mid-write leaves no half chunk; an
unreadable chunk (e.g. after a machine crash) is reported and its examples are
simply computed again.

A cache belongs to one topology: process ``i`` of ``n`` reads only its own
sub-directory, so a resume with a different number of processes finds no
cache and recomputes (correctly, just without the saving).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import time
import warnings

import numpy as np

_FORMAT = "flowjax.prepass-cache/1"
# Seconds between chunk writes: a kill loses at most this much work. Tests set 0.
FLUSH_SECONDS = 10.0


class CacheMismatchError(ValueError):
    """The cache directory holds results of a different model, loss or data layout."""


class PrepassCache:
    """Finished rows of one process, on disk."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        process_index: int,
        process_count: int,
        manifest: dict,
        shape: tuple[int, ...] = (),
    ):
        self.shape = tuple(shape)
        self.dir = os.path.join(
            os.fspath(cache_dir), f"process-{process_index:05d}-of-{process_count:05d}"
        )
        os.makedirs(self.dir, exist_ok=True)
        manifest = {"format": _FORMAT, **manifest}
        path = os.path.join(self.dir, "manifest.json")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            problem = _manifest_difference(old, manifest)
            if problem:
                raise CacheMismatchError(
                    f"cache_dir {os.fspath(cache_dir)!r} was written by a different pre-pass ({problem}). "
                    "Use a new cache_dir for a new model, loss or data layout, or delete this one."
                )
        else:
            _atomic_write(path, json.dumps(manifest, indent=1).encode())
        self._pending_ids: list[np.ndarray] = []
        self._pending_losses: list[np.ndarray] = []
        self._last_flush = time.monotonic()
        self._next_chunk = 1 + max(
            (_chunk_number(p) for p in self._chunk_paths()), default=-1
        )

    def _chunk_paths(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.dir, "chunk-*.npz")))

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """All cached rows, sorted by id: ``(ids int64 [n], losses float32 [n, *shape])``."""
        ids, losses = [np.zeros(0, np.int64)], [np.zeros((0, *self.shape), np.float32)]
        for path in self._chunk_paths():
            try:
                with np.load(path, allow_pickle=False) as data:
                    chunk_ids = np.asarray(data["ids"], np.int64)
                    chunk_losses = np.asarray(data["losses"], np.float32)
                if chunk_losses.shape != (len(chunk_ids), *self.shape):
                    raise ValueError(
                        f"rows of shape {chunk_losses.shape} for {len(chunk_ids)} ids; "
                        f"expected {(len(chunk_ids), *self.shape)}"
                    )
                ids.append(chunk_ids)
                losses.append(chunk_losses)
            except Exception as e:  # a truncated file after a crash: recompute its rows
                warnings.warn(
                    f"ignoring unreadable pre-pass cache chunk {path}: {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        ids, losses = np.concatenate(ids), np.concatenate(losses)
        order = np.argsort(ids, kind="stable")
        return ids[order], losses[order]

    def add(self, ids: np.ndarray, losses: np.ndarray) -> None:
        if len(ids):
            self._pending_ids.append(ids)
            self._pending_losses.append(losses)
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending_ids:
            return
        ids = np.concatenate(self._pending_ids)
        losses = np.concatenate(self._pending_losses)
        buf = _npz_bytes(ids=ids, losses=losses)
        _atomic_write(os.path.join(self.dir, f"chunk-{self._next_chunk:08d}.npz"), buf)
        self._next_chunk += 1
        self._pending_ids, self._pending_losses = [], []


def _npz_bytes(**arrays) -> bytes:
    import io

    f = io.BytesIO()
    np.savez(f, **arrays)
    return f.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _chunk_number(path: str) -> int:
    m = re.search(r"chunk-(\d+)\.npz$", path)
    return int(m.group(1)) if m else -1


def _manifest_difference(old: dict, new: dict) -> str:
    """Empty when the two manifests describe the same pre-pass, else what differs."""
    for key in ("format", "loss_fn", "example_spec", "output_shape"):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} != {new.get(key)!r}"
    a, b = old.get("params", []), new.get("params", [])
    if [x[:3] for x in a] != [x[:3] for x in b]:
        return "the parameters have a different structure, shapes or dtypes"
    for (path, _, _, s1a, s2a, n), (_, _, _, s1b, s2b, _) in zip(a, b, strict=True):
        scale = np.sqrt(max(s2a, s2b) * max(n, 1))
        if (
            abs(s2a - s2b) > 1e-5 * max(s2a, s2b) + 1e-12
            or abs(s1a - s1b) > 1e-5 * scale + 1e-12
        ):
            return f"the parameter values differ (first at {path or 'the root'})"
    return ""
