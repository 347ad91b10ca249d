"""On-disk cache of a pre-pass in progress: a killed pre-pass resumes, and never serves a stale row.

Layout: ``cache_dir/process-<i>-of-<n>/`` holds ``manifest.json`` (everything
the results depend on) and ``chunk-<k>.npz`` files of finished rows of the
examples *this process fed*: ``ids`` int64 ``[n]``, ``values`` float32
``[n, *shape]``, ``digests`` uint8 ``[n, 16]`` (each example's data digest),
``source`` (the batches' source key, see below) and ``checksum`` (SHA-256 of
the rest). Chunks are written to a temporary file and renamed into place, so a
kill mid-write leaves no half chunk; a chunk that fails its checksum (a disk
or machine crash) is reported with a warning naming the file and its rows are
computed again. A row is durable once its chunk is written: every
``flush_seconds`` and when the pass ends or fails. When an id is in several
chunks, the newest chunk's row is the current one.

**What a cached row depends on** (the manifest; any difference raises
:class:`CacheMismatchError` before anything is computed):

* the program: SHA-256 of the lowered StableHLO text of the jitted batched
  step (:func:`program_digest`). It contains the per-example function's body,
  the model code, every closed-over constant and ``functools.partial``
  argument (as literal constants), the batch shapes and dtypes, the output
  shape, the batch size, the mesh and the shardings (jax 0.10 embeds
  closed-over numpy and jax arrays in the text, however large; should a
  version hoist them out as ``const_args`` of the lowering, they are hashed
  byte by byte too). Not in it: the Python code behind a host callback
  (``jax.pure_callback``), which the module names by index only;
* the parameters' exact bytes: BLAKE2b of every leaf's bytes with its path,
  shape and dtype (:func:`params_digest`); a leaf spread over several hosts is
  hashed shard by shard (with each shard's index) on every process and the
  digests are combined across processes, so every process sees the same
  fingerprint;
* the example spec, output shape, mesh axes, backend and device kind, and the
  jax/jaxlib versions (also readable in the manifest, for the error message);
* the input data itself: each row is stored with the key of the batches
  that fed it (below) and, unless that key hashes every byte of the data,
  with its example's digest (XXH3-128 of the bytes of all its fields,
  :func:`row_digests`). A cached id whose example is not vouched for by the
  current key or by an equal digest is **recomputed** (and the new row
  written), never served.

The cache is opened before the first batch is read: a directory that cannot
be written (a read-only cache, even a complete one), a truncated or corrupted
``manifest.json`` (a ValueError naming the file) and a manifest of another
pre-pass all raise before anything is computed.

A cache belongs to one topology: process ``i`` of ``n`` reads only its own
sub-directory, so a resume with a different number of processes finds no
cache and recomputes (correctly, just without the saving).

**Skipping at the source.** Rows that reach the pre-pass are digested and
checked, but reading them may be the expensive part (decoding records, a
``map_fn``). A batches object may therefore offer two methods, which the
pre-pass uses before it iterates:

* ``cache_key() -> str | None``: a key that is equal for two objects only if
  they yield the same data under every id, computed without reading any
  record into a batch (``flowjax.batches`` over an :class:`~flowjax.ArraySource`
  hashes the columns it reads, its field selection and its ``map_fn``'s code
  and closure, see :func:`fn_fingerprint`); ``None`` when it cannot vouch.
* ``skip(ids) -> batches``: the same batches without the examples of
  ``ids``, with a ``skipped`` attribute (the ids it will not yield).

* optionally ``key_hashes_data() -> bool``: True when ``cache_key()`` is a
  hash of every byte the batches are built from (``flowjax.batches`` over
  columns in memory).

Every chunk records the key of the batches that fed its rows. On resume, a
cached row is skipped at the source (or served, in the first batch, which is
always read) only when its chunk's key equals the current ``cache_key()``
(same program and parameters: the manifest), so the row's data is known to
be unchanged without reading it; every other cached row is read, digested and
served only if it has a digest and the digest matches.

**Which rows get digests.** Digesting costs about 0.3 µs per example (one
XXH3 call each; 5–8 % of a 64k-example MLP pass on 2 CPUs), so a run whose
key hashes every byte of its data (``key_hashes_data()``) stores no digests: its
key vouches for its rows, and a change of any example changes the key, after
which those rows are recomputed (not served by digest). Every other run
digests what it feeds: batches without a key (a list, a generator), records
on disk with a declared key (whose reading costs far more), and a keyed run
whose cache holds digested rows of another key (to serve them). A chunk
marks its rows without a digest in a ``digested`` field, written only when
some row has none.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import math
import numbers
import os
import re
import tempfile
import threading
import time
import types
import warnings
import weakref

import jax
import numpy as np
import xxhash

# /3: rows digested with XXH3-128 (/2 used BLAKE2b-128, 10-30x slower: on a CPU its hashing
# of the inputs cost more than an MLP's forward pass).
_FORMAT = "flowjax.prepass-cache/3"
FLUSH_SECONDS = 5.0  # the default of per_example_losses(flush_seconds=...)
_DIGEST = 16  # bytes of an example's digest
_log = logging.getLogger("flowjax")


class CacheMismatchError(ValueError):
    """The cache directory holds results of a different program, parameters or layout."""


# --- fingerprints ------------------------------------------------------------------------


def program_digest(step, *args) -> str:
    """SHA-256 of the program ``step(*args)`` runs: its lowered StableHLO and hoisted constants.

    ``step`` is the jitted batched step and ``args`` its arguments (arrays or
    ``jax.ShapeDtypeStruct``; static arguments as the step takes them). Only
    lowering runs (no compilation); jit's trace cache makes it cheap for the
    step that runs right after.
    """
    key = _abstract(args)
    try:
        known = _PROGRAMS.setdefault(step, {})
    except TypeError:  # not weak-referenceable: no memo
        known = {}
    if key is not None and key in known:
        return known[key]
    lowered = step.lower(*args)
    h = hashlib.sha256(lowered.as_text().encode())
    for c in getattr(getattr(lowered, "_lowering", None), "const_args", None) or ():
        hash_array(h, c)  # constants hoisted out of the module text
    if key is not None:
        known[key] = h.hexdigest()
    return h.hexdigest()


# program_digest per jitted step and abstract arguments: the same jitted function lowers the
# same arguments' shapes, dtypes and shardings to the same program (jit reuses its trace for
# them too), so a later pass with the same step skips the lowering (tens of ms).
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _abstract(args) -> tuple | None:
    """A hashable key of the arguments' pytree structure, shapes, dtypes, shardings; None if not."""
    leaves, treedef = jax.tree.flatten(args)
    key = [treedef]
    for x in leaves:
        if isinstance(x, jax.Array | jax.ShapeDtypeStruct):
            key.append((x.shape, str(x.dtype), getattr(x, "sharding", None)))
        elif isinstance(x, np.ndarray):
            key.append((x.shape, x.dtype.str))
        else:  # a static argument (the batch's treedef) or a Python constant: by value
            key.append(("value", type(x).__qualname__, x))
    try:
        hash(tuple(key))
    except TypeError:
        return None
    return tuple(key)


def params_digest(params) -> list[list]:
    """``[[path, shape, dtype, blake2b hex], ...]`` of every leaf's exact bytes.

    A leaf that is not fully addressable (spread over hosts) is hashed from
    this process's distinct shards with their indices; the per-process
    digests are then gathered (one ``process_allgather``, entered by every
    process since addressability is a property of the global array) and
    hashed together in process order.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out, spread = [], []
    for i, (path, x) in enumerate(flat):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            spread.append(i)
            h = hashlib.blake2b(digest_size=_DIGEST)
            shards = {}
            for s in x.addressable_shards:
                index = tuple(
                    sl.indices(n)[:2] for sl, n in zip(s.index, x.shape, strict=True)
                )
                shards.setdefault(index, s)
            for index in sorted(shards):
                h.update(repr(index).encode())
                hash_array(h, shards[index].data)
        else:
            h = _leaf_digest(x)
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        shape, dtype = np.shape(x), str(dtype)
        out.append([jax.tree_util.keystr(path), list(shape), dtype, h])
    if spread and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mine = np.stack([np.frombuffer(out[i][3].digest(), np.uint8) for i in spread])
        everyone = np.asarray(multihost_utils.process_allgather(mine))  # [P, k, 16]
        for j, i in enumerate(spread):
            out[i][3] = hashlib.blake2b(everyone[:, j].tobytes(), digest_size=_DIGEST)
    for i in spread:
        out[i][3] = out[i][3].hexdigest()
    return out


def _leaf_digest(x) -> str:
    """The hex BLAKE2b digest of one whole leaf's bytes.

    A ``jax.Array`` cannot change its bytes, so its hex digest is remembered
    for as long as the array lives (a later pass with the same parameters
    does not hash them again: about 1.6 ms a MB); any other leaf (a numpy
    array can be written in place) is hashed every time.
    """
    live = isinstance(x, jax.Array) and not x.is_deleted()
    if live:
        memo = _LEAVES.get(id(x))
        if memo is not None and memo[0]() is x:
            return memo[1]
    h = hashlib.blake2b(digest_size=_DIGEST)
    hash_array(h, x)
    if not live:
        return h.hexdigest()
    key, digest = id(x), h.hexdigest()
    _LEAVES[key] = (weakref.ref(x, lambda _, key=key: _LEAVES.pop(key, None)), digest)
    return digest


# id(leaf) -> (weak reference to the jax.Array, hex digest of its bytes); an entry goes with
# its array. (jax arrays compare elementwise and do not hash: not a WeakKeyDictionary.)
_LEAVES: dict[int, tuple] = {}


def row_digests(leaves: list[np.ndarray], n: int) -> np.ndarray:
    """XXH3-128 of each example's bytes over all fields: uint8 ``[n, 16]``.

    ``leaves`` are the batch's fields, each with a leading axis of ``n``; the
    fields' layout (shapes and dtypes) is in the manifest, so the bytes alone
    identify the example. No field is copied: one field is hashed row by
    row in place; a large field (256 bytes or more per example) is hashed in
    place, and the small fields' bytes, when they fit in 16, are XORed into
    its digest (an injective change of a 128-bit digest: a change of the
    small fields alone always changes it); otherwise the digest of
    ``[large digests | small bytes]``.
    """
    parts = [
        np.ascontiguousarray(x).reshape(n, math.prod(x.shape[1:])).view(np.uint8)
        for x in leaves
    ]
    large = [p for p in parts if p.shape[1] >= _LARGE]
    small = [p for p in parts if p.shape[1] < _LARGE]
    if len(small) > 1:
        small = np.concatenate(small, axis=1)
    else:
        small = small[0] if small else np.zeros((n, 0), np.uint8)
    if len(large) == 1 and small.shape[1] <= _DIGEST:
        out = _digest_rows(large[0])
        out[:, : small.shape[1]] ^= small
        return out
    if len(parts) == 1:
        rows = parts[0]
    else:
        rows = np.concatenate([*(_digest_rows(p) for p in large), small], axis=1)
    if rows.shape[1] == 0:
        rows = np.zeros((n, 1), np.uint8)
    return _digest_rows(rows)


_LARGE = 256  # bytes per example from which a field is digested on its own


def _digest_rows(rows: np.ndarray) -> np.ndarray:
    """XXH3-128 of each row of a contiguous uint8 ``[n, m]``: about 20 GB/s, a few µs per 1k rows.

    Not a cryptographic hash (nor is any guarantee against a crafted
    collision needed here): a changed example matches its stored digest
    with probability about 2^-128.
    """
    rows = np.ascontiguousarray(rows)
    # map over the rows (views) runs the loop in C: about 1.5x faster than a Python loop
    out = b"".join(map(xxhash.xxh3_128_digest, rows))
    return np.frombuffer(out, np.uint8).reshape(len(rows), _DIGEST).copy()


def hash_array(h, x) -> None:
    """Feeds an array's dtype, shape and bytes to the hash ``h``."""
    a = np.asarray(x)
    h.update(repr((a.dtype.str, a.shape)).encode())
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


class _Unhashable(Exception):
    pass


def fn_fingerprint(fn, *, by_identity: bool = False) -> str | None:
    """A digest of what a Python function computes, or None when it cannot be pinned down.

    Hashes the bytecode and constants of ``fn`` and of every function it
    reaches through its closure, defaults, ``functools.partial`` arguments,
    weak references and the module globals its code names (arrays by their
    bytes, plain values by their repr, modules, classes and builtins by their
    qualified name). An object of any other kind (an instance with state, such
    as a tokenizer or an NNX graphdef, or an array of Python objects) makes it
    return None: the caller then cannot vouch for the function. With
    ``by_identity`` the key only has to be right within one process (never on
    disk): an ``nnx.Module`` counts by its graphdef and its current arrays, an
    immutable object with a value hash (an NNX graphdef, a frozen dataclass)
    by ``hash(obj)``, another callable object by its identity (as ``jax.jit``
    treats a callable), and any other object hashed by identity (plain state
    that may change in place unseen) still gives None.
    Not covered: the behaviour of imported modules and classes beyond their
    name.
    """
    h = hashlib.blake2b(digest_size=_DIGEST)
    try:
        _hash_object(h, fn, set(), 0, by_identity)
    except _Unhashable:
        return None
    return h.hexdigest()


def _hash_object(h, obj, seen: set, depth: int, by_identity: bool = False) -> None:
    if depth > 50:
        raise _Unhashable
    if obj is None or isinstance(obj, bool | numbers.Number | str | bytes):
        h.update(repr((type(obj).__name__, obj)).encode())
    elif isinstance(obj, np.ndarray | np.generic | jax.Array):
        if np.dtype(obj.dtype).hasobject:  # Python objects: no bytes to hash
            raise _Unhashable
        hash_array(h, obj)
    elif isinstance(obj, tuple | list | dict | set | frozenset):
        items = obj.items() if isinstance(obj, dict) else obj
        if isinstance(obj, set | frozenset):
            items = sorted(obj, key=repr)
        h.update(f"<{type(obj).__name__} {len(obj)}>".encode())
        for item in items:
            _hash_object(h, item, seen, depth + 1, by_identity)
    elif isinstance(obj, types.ModuleType):
        h.update(f"<module {obj.__name__}>".encode())
    elif isinstance(obj, functools.partial):
        h.update(b"<partial>")
        for part in (obj.func, obj.args, obj.keywords):
            _hash_object(h, part, seen, depth + 1, by_identity)
    elif isinstance(obj, types.FunctionType):
        if id(obj) in seen:
            h.update(b"<recursion>")
            return
        seen.add(id(obj))
        _hash_code(h, obj.__code__)
        cells = [c.cell_contents for c in obj.__closure__ or ()]
        for part in (obj.__defaults__, obj.__kwdefaults__, cells):
            _hash_object(h, part, seen, depth + 1, by_identity)
        for name in sorted(_global_names(obj.__code__)):
            if name in obj.__globals__:
                h.update(f"<global {name}>".encode())
                _hash_object(h, obj.__globals__[name], seen, depth + 1, by_identity)
    elif isinstance(obj, type | types.BuiltinFunctionType | np.ufunc):
        h.update(f"<{getattr(obj, '__module__', '?')}.{obj.__qualname__}>".encode())
    elif isinstance(obj, weakref.ref):  # e.g. the LM passes' wrappers of logits_fn
        h.update(b"<weakref>")
        _hash_object(h, obj(), seen, depth + 1, by_identity)
    elif by_identity:
        _hash_in_process(h, obj, seen, depth)
    else:
        raise _Unhashable


def _hash_in_process(h, obj, seen: set, depth: int) -> None:
    """``fn_fingerprint(by_identity=True)`` of an object no digest on disk could pin down."""
    from flax import nnx

    if isinstance(obj, nnx.Module):  # its structure and its current arrays
        graphdef, state = nnx.split(obj)
        h.update(f"<nnx {type(obj).__qualname__} {hash(graphdef)}>".encode())
        _hash_object(h, jax.tree.leaves(state), seen, depth + 1, True)
    elif type(obj).__hash__ not in (None, object.__hash__):
        try:  # a value hash (immutable objects): equal within this process
            h.update(f"<{type(obj).__qualname__} hash {hash(obj)}>".encode())
        except TypeError:
            raise _Unhashable from None
    elif callable(obj):  # a callable object stands for itself, as it does for jax.jit
        h.update(f"<{type(obj).__qualname__} at {id(obj)}>".encode())
    else:  # plain state that can change in place unseen
        raise _Unhashable


def _hash_code(h, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _hash_code(h, c)
        else:
            h.update(repr(c).encode())


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def manifest(*, name: str, params, spec: str, mesh, shape: tuple[int, ...]) -> dict:
    """What every row of a pre-pass depends on, but the program (see the module docstring).

    :meth:`PrepassCache.check` adds the program's digest, lowering the step
    only when everything here matches.

    Args:
      name: a readable name of the per-example function (for the messages).
      params: the placed parameters.
      spec: the batches' structure, shapes and dtypes as text.
      mesh: the mesh; ``shape`` the per-example output shape.
    """
    import jaxlib

    device = mesh.devices.flat[0]
    return {
        "format": _FORMAT,
        "loss_fn": name,
        "example_spec": spec,
        "output_shape": list(shape),
        "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
        "backend": f"{device.platform} {getattr(device, 'device_kind', '')}",
        "versions": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}",
        "params": params_digest(params),
    }


def _manifest_difference(old: dict, new: dict) -> str:
    """Empty when the two manifests describe the same pre-pass, else what differs."""
    for key in ("format", "loss_fn", "example_spec", "output_shape", "mesh"):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} != {new.get(key)!r}"
    for key in ("backend", "versions"):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} != {new.get(key)!r}; results may differ"
    a, b = old.get("params"), new.get("params")
    if not isinstance(a, list) or [x[:3] for x in a] != [x[:3] for x in b]:
        return "the parameters have a different structure, shapes or dtypes"
    for x, y in zip(a, b, strict=True):
        if x[3] != y[3]:
            return f"the parameter values differ (first at {x[0] or 'the root'})"
    if "program" in new and old.get("program") != new["program"]:
        return (
            "the program differs: the per-example function's code, a value it closes over "
            "or a partial argument, the model code, the batch size or the batch layout changed"
        )
    return ""


def _checksum(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _read_manifest(path: str) -> dict:
    """The manifest at ``path``; a ValueError naming the file if it is unreadable or corrupted."""
    fix = f"Delete {os.path.dirname(path)!r} to start this process's cache over."
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the pre-pass cache manifest {path}: {e}.") from e
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        what = "empty" if not raw.strip() else f"not valid JSON ({e})"
        raise ValueError(
            f"the pre-pass cache manifest {path} is truncated or corrupted: it is {what}. {fix}"
        ) from None
    if not isinstance(data, dict) or "checksum" not in data:
        raise ValueError(
            f"{path} is not a flowjax pre-pass cache manifest (no checksum; written by an "
            f"older flowjax, or not by flowjax). {fix}"
        )
    content = {k: v for k, v in data.items() if k != "checksum"}
    if data["checksum"] != _checksum(content):
        raise ValueError(
            f"the pre-pass cache manifest {path} is corrupted: its checksum does not match "
            f"its contents. {fix}"
        )
    return content


# --- the cache -----------------------------------------------------------------------------


class PrepassCache:
    """Finished rows of one process, on disk.

    Opened before the pre-pass reads its first batch: :meth:`skip_at_source`
    may then hand the batches object the ids it need not read, and
    :meth:`check` compares the manifest once the step exists. Raises (before
    any compute) when the directory is not writable or the manifest is
    unreadable.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        process_index: int,
        process_count: int,
        shape: tuple[int, ...] = (),
        flush_seconds: float = FLUSH_SECONDS,
    ):
        if (
            isinstance(flush_seconds, bool)
            or not isinstance(flush_seconds, numbers.Real)
            or not flush_seconds >= 0
            or math.isinf(flush_seconds)
        ):
            raise ValueError(
                f"flush_seconds must be a finite number of seconds >= 0; got {flush_seconds!r}."
            )
        self.shape, self.flush_seconds = tuple(shape), float(flush_seconds)
        self.root = os.fspath(cache_dir)
        self.dir = os.path.join(
            self.root, f"process-{process_index:05d}-of-{process_count:05d}"
        )
        self._manifest_path = os.path.join(self.dir, "manifest.json")
        try:
            os.makedirs(self.dir, exist_ok=True)
            _atomic_write(os.path.join(self.dir, ".write-test"), b"")
            os.remove(os.path.join(self.dir, ".write-test"))
        except OSError as e:
            raise ValueError(
                f"cache_dir {self.root!r} is not writable ({e}): the pre-pass could not save "
                "its rows. Pass a writable cache_dir (a read-only cache cannot be resumed "
                "into), or cache_dir=None."
            ) from e
        self._old = None
        if os.path.exists(self._manifest_path):
            self._old = _read_manifest(self._manifest_path)
        elif self._chunk_paths():
            raise ValueError(
                f"the pre-pass cache {self.dir} has chunks but no manifest.json: it is "
                f"corrupted. Delete {self.dir!r} to start this process's cache over."
            )
        same_layout = self._old is not None and (
            self._old.get("format"),
            self._old.get("output_shape"),
        ) == (_FORMAT, list(self.shape))
        self.served = Served(*self._load() if same_layout else _no_rows(self.shape))
        self.source_key = ""  # the key of the batches feeding this run's rows
        self._key_thread: _Background | None = None  # or the thread computing it
        self._pending_ids: list[np.ndarray] = []
        self._pending_values: list[np.ndarray] = []
        self._pending_digests: list[np.ndarray | None] = []
        self._last_flush = time.monotonic()
        self._next_chunk = 1 + max(
            (_chunk_number(p) for p in self._chunk_paths()), default=-1
        )

    def check(self, manifest: dict, step, *args) -> None:
        """Raises CacheMismatchError unless this pass is the cache's; writes a new cache's manifest.

        ``manifest`` is :func:`manifest`'s; ``step(*args)`` the jitted batched
        step and its arguments, for :func:`program_digest` (lowered only when
        the rest of the manifest matches).
        """
        problem = "" if self._old is None else _manifest_difference(self._old, manifest)
        if not problem:
            manifest = {**manifest, "program": program_digest(step, *args)}
        if self._old is None:
            content = dict(manifest)
            data = {**content, "checksum": _checksum(content)}
            _atomic_write(self._manifest_path, json.dumps(data, indent=1).encode())
            self._old = content
            return
        problem = problem or _manifest_difference(self._old, manifest)
        if problem:
            raise CacheMismatchError(
                f"cache_dir {self.root!r} was written by a different pre-pass ({problem}). "
                "Use a new cache_dir for a new model, loss or data layout, or delete this one."
            )

    def skip_at_source(self, batches):
        """``batches`` without the cached examples it can vouch for (see the module docstring)."""
        key_of, skip = (
            getattr(batches, "cache_key", None),
            getattr(batches, "skip", None),
        )
        if not (callable(key_of) and callable(skip)):
            return batches
        hashes = getattr(batches, "key_hashes_data", None)
        # The key will be a hash of the very bytes fed (flowjax.batches of columns in
        # memory): it vouches for every row, and the rows need no digests of their own.
        hashes = bool(callable(hashes) and hashes())
        served = self.served
        if not len(served.ids):
            # Nothing to skip: the key is only written with the rows.
            served.digest_fed = not hashes
            self._key_thread = _Background(key_of)
            return batches
        key = key_of()
        if not key:
            return batches
        self.source_key = key
        trusted = served.trust(key)
        # Digested rows of other keys can still be served by their digests: digest the
        # fed examples too, to compare them.
        served.digest_fed = not hashes or bool((served.digested & ~trusted).any())
        if not trusted.any():
            return batches
        rest = skip(served.ids[trusted])
        served.mark(np.asarray(rest.skipped, np.int64))
        return rest

    def _chunk_paths(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.dir, "chunk-*.npz")))

    def _load(self):
        """The current cached row of every id: ``(ids, values, digests, digested, keys)``, by id."""
        ids, values, digests, digested, sources = [], [], [], [], []
        for path in self._chunk_paths():
            try:
                chunk = _read_chunk(path, self.shape)
            except Exception as e:  # a truncated or corrupted file: recompute its rows
                warnings.warn(
                    f"ignoring unreadable pre-pass cache chunk {path}: {e}; its rows are "
                    "computed again (delete the file to silence this warning).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            ids.append(chunk[0])
            values.append(chunk[1])
            digests.append(chunk[2])
            digested.append(chunk[3])
            sources.append(chunk[4])
        if not ids:
            return _no_rows(self.shape)
        # Each row's source key, as the index of its chunk's key among the distinct keys.
        names = sorted(set(sources))
        which = np.repeat(
            np.asarray([names.index(k) for k in sources], np.int32),
            [len(i) for i in ids],
        )
        ids, values = np.concatenate(ids), np.concatenate(values)
        digests, digested = np.concatenate(digests), np.concatenate(digested)
        keys = _Keys(names, which)
        # Sorted and unique: the usual chunks.
        if len(ids) < 2 or (ids[1:] > ids[:-1]).all():
            return ids, values, digests, digested, keys
        # The newest row of each id: unique ids of the reversed rows keep the last one.
        _, last = np.unique(ids[::-1], return_index=True)
        keep = len(ids) - 1 - last  # sorted by id
        return ids[keep], values[keep], digests[keep], digested[keep], keys[keep]

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Queues computed rows (their digests come from :meth:`Served.take`); flushes when due."""
        if len(ids):
            self._pending_ids.append(ids)
            self._pending_values.append(values)
            self._pending_digests.append(self.served.digests_of(ids))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Writes the queued rows as one chunk: from now on they are durable."""
        self._last_flush = time.monotonic()
        if not self._pending_ids:
            return
        if self._key_thread is not None:
            self.source_key = self._key_thread.result() or ""
            self._key_thread = None
        ids = np.concatenate(self._pending_ids).astype(np.int64)
        digests, digested = _digests_and_mask(self._pending_ids, self._pending_digests)
        chunk = _chunk_bytes(
            ids,
            np.concatenate(self._pending_values).astype(np.float32),
            digests,
            digested,
            self.source_key,
        )
        _atomic_write(
            os.path.join(self.dir, f"chunk-{self._next_chunk:08d}.npz"), chunk
        )
        self._next_chunk += 1
        self._pending_ids, self._pending_values, self._pending_digests = [], [], []


def _digests_and_mask(ids: list[np.ndarray], digests: list[np.ndarray | None]):
    """The digests of the rows that have one, in order, and the mask of those rows."""
    have = [np.zeros((0, _DIGEST), np.uint8), *(d for d in digests if d is not None)]
    mask = [np.full(len(i), d is not None) for i, d in zip(ids, digests, strict=True)]
    return np.concatenate(have), np.concatenate(mask)


class _Background:
    """``fn()`` on a daemon thread (xxhash releases the GIL while it hashes); ``result()`` joins."""

    def __init__(self, fn):
        self._out, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._out = fn()
        except BaseException as e:  # re-raised by result(), on the caller's thread
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


def _no_rows(shape):
    return (
        np.zeros(0, np.int64),
        np.zeros((0, *shape), np.float32),
        np.zeros((0, _DIGEST), np.uint8),
        np.zeros(0, bool),
        _Keys([], np.zeros(0, np.int32)),
    )


class _Keys:
    """The source key of every cached row: distinct keys and each row's index among them."""

    def __init__(self, names: list[str], which: np.ndarray):
        self.names, self.which = names, which

    def __getitem__(self, rows) -> _Keys:
        return _Keys(self.names, self.which[rows])

    def rows_with(self, key: str) -> np.ndarray:
        """The mask of the rows fed by batches of key ``key``."""
        if key not in self.names:
            return np.zeros(len(self.which), bool)
        return self.which == self.names.index(key)


class Served:
    """Cached rows of this process, and which of them this run's input asked for.

    :meth:`take` checks each example of a batch against the cache: an id is
    served only if its stored digest equals the digest of the example fed now.
    """

    def __init__(self, ids, values, digests, digested, keys):
        self.ids, self.values, self.keys = ids, values, keys
        self.digests, self.digested = digests, digested
        # Rows whose source key is this run's: their data is vouched for without a digest.
        self.trusted = np.zeros(len(ids), bool)
        # Whether the fed examples are digested (see PrepassCache.skip_at_source).
        self.digest_fed = True
        self._used: list[np.ndarray] = []
        self._todo_ids: list[np.ndarray] = []
        self._todo_digests: list[np.ndarray] = []

    def trust(self, key: str) -> np.ndarray:
        """Trusts the rows fed by batches of source key ``key``; returns their mask."""
        self.trusted = self.keys.rows_with(key)
        return self.trusted

    def take(self, ids: np.ndarray, leaves: list[np.ndarray]) -> np.ndarray | None:
        """Marks the cached, unchanged examples as used; returns the mask of those to compute.

        None when every row is computed (nothing is cached and nothing digested).

        A cached row is unchanged if its source key is this run's (``trusted``)
        or if it has a digest and the example fed now has the same one.
        """
        if not self.digest_fed and not len(self.ids):
            return None  # nothing cached, nothing to digest: every row is computed
        digests = row_digests(leaves, len(ids)) if self.digest_fed else None
        hit = np.zeros(len(ids), bool)
        if len(self.ids):
            pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
            same = self.trusted[pos]
            if digests is not None:
                same = same | (
                    self.digested[pos] & (self.digests[pos] == digests).all(axis=1)
                )
            hit = (self.ids[pos] == ids) & same
            self._used.append(pos[hit])
        if digests is not None:  # (kept until the computed rows come back: digests_of)
            self._todo_ids.append(ids[~hit])
            self._todo_digests.append(digests[~hit])
        return ~hit

    def mark(self, ids: np.ndarray) -> None:
        """Marks cached ids as used without looking at their data (skipped at the source)."""
        pos = np.searchsorted(self.ids, ids)
        if len(ids) and not (
            (pos < len(self.ids)).all()
            and (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids).all()
        ):
            raise RuntimeError("the batches skipped ids that are not cached")
        self._used.append(pos)

    def digests_of(self, ids: np.ndarray) -> np.ndarray | None:
        """The digests :meth:`take` computed for these (computed, not served) ids.

        None when this run does not digest the fed examples.
        """
        if not self.digest_fed:
            return None
        todo_ids = np.concatenate(self._todo_ids)
        todo_digests = np.concatenate(self._todo_digests)
        k = len(ids)
        if k <= len(todo_ids) and np.array_equal(todo_ids[:k], ids):
            # The usual case: rows come back in the order they were fed.
            self._todo_ids, self._todo_digests = [todo_ids[k:]], [todo_digests[k:]]
            return todo_digests[:k]
        order = np.argsort(todo_ids, kind="stable")
        pos = np.searchsorted(todo_ids[order], ids)
        if len(ids) and (
            (pos >= len(todo_ids)).any()
            or (todo_ids[order][np.minimum(pos, len(todo_ids) - 1)] != ids).any()
        ):
            raise RuntimeError("a computed row has no data digest: it was never fed")
        found = order[pos]
        rest = np.ones(len(todo_ids), bool)
        rest[found] = False  # each row is added once: forget it
        self._todo_ids, self._todo_digests = [todo_ids[rest]], [todo_digests[rest]]
        return todo_digests[found]

    @property
    def count(self) -> int:
        """How many cached rows this run used (on this process)."""
        return sum(len(u) for u in self._used)

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, values)`` of the cached rows this run used."""
        pos = np.concatenate([np.zeros(0, np.int64), *self._used])
        _log.info("pre-pass: %d rows served from the cache", len(pos))
        return self.ids[pos], self.values[pos]


def _chunk_checksum(ids, values, digests, source: bytes, digested=None) -> np.ndarray:
    h = hashlib.sha256()
    for a in (ids, values, digests, *([] if digested is None else [digested])):
        hash_array(h, a)
    h.update(source)
    return np.frombuffer(h.digest(), np.uint8)


def _chunk_bytes(ids, values, digests, digested, source_key: str) -> bytes:
    """A chunk file's bytes: ``digests`` of the rows that have one (``digested``), in order.

    ``digested`` is written only when some row has no digest, so a chunk whose
    rows all have digests is the same file as before the field existed, and a
    reader that does not know the field refuses a chunk with undigested rows
    (its checksum does not match).
    """
    import io

    source = source_key.encode()
    extra = {} if digested.all() else {"digested": digested}
    f = io.BytesIO()
    np.savez(
        f,
        ids=ids,
        values=values,
        digests=digests,
        source=np.frombuffer(source, np.uint8),
        checksum=_chunk_checksum(ids, values, digests, source, extra.get("digested")),
        **extra,
    )
    return f.getvalue()


def _read_chunk(path: str, shape: tuple[int, ...]):
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
        ids, values = data["ids"], data["values"]
        digests, source = data["digests"], data["source"].tobytes()
        checksum = data["checksum"]
        digested = data["digested"] if "digested" in data.files else None
    if not np.array_equal(
        checksum, _chunk_checksum(ids, values, digests, source, digested)
    ):
        raise ValueError("its checksum does not match its contents")
    if (
        ids.dtype != np.int64
        or ids.ndim != 1
        or values.dtype != np.float32
        or values.shape != (len(ids), *shape)
        or (
            digested is not None
            and (digested.dtype != bool or digested.shape != ids.shape)
        )
        or digests.shape
        != (len(ids) if digested is None else int(digested.sum()), _DIGEST)
    ):
        raise ValueError(
            f"rows of shape {values.shape} for {ids.shape} ids; expected {(len(ids), *shape)}"
        )
    if digested is None:
        digested = np.ones(len(ids), bool)
    else:  # the digests of the rows that have one: zeros for the others
        full = np.zeros((len(ids), _DIGEST), np.uint8)
        full[digested] = digests
        digests = full
    return ids, values, digests, digested, source.decode()


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
