"""The one engine behind every pass over id-keyed batches: pre-pass, LM passes and the Fisher.

:func:`map_examples` maps a per-example function over dict batches that carry
an integer ``"id"`` field, and returns every example's output keyed by id (or
their sum over examples). One process's view:

1. The first batch (or a ``spec`` given up front) fixes the structure, the
   per-example shapes and dtypes, and the per-process rows per step ``B``
   (rounded up so that the global step ``B × process_count`` divides the
   mesh's ``'data'`` axis). Batches are split and merged into steps of
   ``B`` rows; only the last step is padded, by repeating a real row, and the
   copies are dropped. So the step is traced and compiled once. ``fn`` is
   per example (vmapped) or, ``batched``, takes the step's rows at once
   (checked row-independent once per compiled step).
2. The batch axis is sharded over ``'data'``; outputs come back replicated
   (``out_shardings=P()``), so every process reads every row. With
   ``sum_into``, the per-example outputs (a pytree) are instead summed over
   the real rows of each step into an accumulator that keeps its own
   sharding (the Fisher's running sum of squared gradients), and only a
   per-row "not finite" flag comes back.
3. Single process: numpy batches go straight into the jitted step; the host
   keeps each step's ids. Multi-process: each process feeds only its own rows
   through ``jax.make_array_from_process_local_data``, and every row carries
   ``meta = (id low, id high, owning process, state)`` through the step, so
   the replicated output tells every process every row's id, owner and state
   (real, padding, or "this process failed"). Ids stay exact int64 without
   ``jax_enable_x64``.
4. Results are read ``_IN_FLIGHT`` steps behind dispatch, so the device never
   waits for the host (a single process checks and keeps them a group of
   ``_READ_ROWS`` rows at a time: a few numpy calls per group, not per step).
   A single process over batches nothing refills (a list,
   ``flowjax.batches``) works in bursts of up to ``_BURST`` steps (at most
   ``_BURST_BYTES`` of input): it prepares a burst, dispatches it, then reads
   the previous one, because host work interleaved with jit dispatches costs
   about three times its own time on a busy CPU (measured: the pre-pass's
   host time per step fell from 28 to 12 µs, and to 9 µs with the loop's
   other trims). With a cache, bursts grow from one step up to what takes
   about ``_BURST_SECONDS``, and each burst's rows go to the cache once it is
   read, so a kill loses little more than the cache's flush interval (a cache
   written more often than every ``_BURSTS_FLUSH_SECONDS`` has its steps read
   one by one); after an error, the steps in flight are read into the cache
   before it is flushed. A process that
   runs out of data feeds padding until a step has no real row on any
   process; then all stop together.
5. Resumable: an optional ``cache`` serves rows finished by an earlier,
   killed run; their examples are skipped, and every process's served rows
   are shared with one allgather at the end. The engine talks to the cache at
   four marked call sites (``CACHE (k/4)``), through the small protocol
   :class:`Cache` describes.

Failure protocol (one for every caller). Single process: bad input raises at
once, naming the ids. Multi-process, no process may be left waiting in a
collective:

* Errors every process sees alike, because they come from replicated data
  (NaN/inf outputs, an id fed by two processes, a ``fn`` that returns the
  wrong shape), raise the same ``ValueError`` on every process at the same
  step.
* A process-local error (no batches, a malformed batch, a bad dtype or
  shape, an id this process fed twice, the loader itself raising) does not
  raise on the spot: the process keeps stepping in lockstep and marks all
  its rows "failed". When that step is read (a few steps later, the same
  step on every process), every process joins one fixed-size allgather of
  ``(status, message)`` and raises the same ``ValueError`` naming the
  failed process(es) and their messages. Errors before the first step (an
  empty or broken first batch, and the cache's setup: a directory one
  process cannot write, another pre-pass's manifest on one process) go
  through the same exchange, which also agrees the step size and checks that
  the processes' batch layouts match.

Duplicate ids are caught as they arrive (:class:`_SeenIds`: an int32 stamp per
id for dense ids, else one sorted numpy array that kept batches are merged
into once they reach a quarter of it; no per-id Python work), per process as
batches are fed (cached ones too; a single process without a cache checks a
group of batches at once, up to a quarter of the ids so far), and,
multi-process, across processes as each step's replicated ids are read; so an
endless or multi-epoch loader fails within a quarter of its second pass.
"""

from __future__ import annotations

import collections
import functools
import itertools
import operator
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from flowjax import _cache, _checks, _host
from flowjax._types import Batches, Params

_ID = "id"
_INT64 = np.dtype(np.int64)
# Steps dispatched ahead of the one being read, so the device never waits for the host.
_IN_FLIGHT = 3
# A row's state (meta column 3).
_REAL, _FAILED = 1, 2  # (0: padding)
# Bytes of text each process contributes to a status exchange.
_MESSAGE_BYTES = 2048
_SHOW = 5  # ids an error message lists


def default_mesh() -> Mesh:
    """A 1-D mesh with axis ``'data'`` over all devices of all processes.

    Returns:
      ``Mesh(jax.devices(), ("data",))``: the default mesh of
      :func:`flowjax.per_example_losses` and :func:`flowjax.diagonal_fisher`.

    Example:
      >>> import flowjax
      >>> flowjax.default_mesh().axis_names
      ('data',)
    """
    return Mesh(np.asarray(jax.devices()), ("data",))


class Mapped(NamedTuple):
    """What :func:`map_examples` returns (the same on every process)."""

    ids: np.ndarray  # int64 [n]: every example of every process, unsorted, unique
    values: Any  # float32 [n, *shape] rows in the order of ids, or the summed pytree
    cached: int = 0  # rows served from the cache (all processes)


class Served(Protocol):
    """The rows a cache holds for this process (see :class:`Cache`)."""

    count: int  # rows already skipped at the source

    def take(self, ids: np.ndarray, leaves: list[np.ndarray]) -> np.ndarray | None:
        """Marks the batch's cached rows as used; the mask of rows to compute (None: all)."""

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, values)`` of every cached row this run used (skipped at the source too)."""


class Cache(Protocol):
    """What the engine needs of a pass's cache (``flowjax.prepass._PassCache``)."""

    flush_seconds: float  # how often it writes: steps are read in bursts within it

    def skip_at_source(self, batches: Batches) -> Batches:
        """The batches, possibly without the examples already cached (before any is read)."""

    def open(self, example_spec: str, params: Any, step: Any, args: tuple) -> Served:
        """Checks that the cache belongs to this pass (``step(*args)`` is its program)."""

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        """This process's finished rows; written at the cache's own pace."""

    def flush(self) -> None:
        """Writes what is pending."""


class IdLedger:
    """The ids one pass has seen, kept across several engine calls (e.g. an LM pass's buckets).

    ``local``: the ids this process fed (checked before each batch goes in);
    ``everywhere``: multi-process, the ids of every process (checked as each
    step is read).
    """

    def __init__(self) -> None:
        self.local = _SeenIds()
        self.everywhere = _SeenIds()


def map_examples(
    fn: Callable,
    params: Params,
    batches: Batches,
    *,
    name: str,
    shape: tuple[int, ...] = (),
    sum_into: Any = None,
    with_ids: bool = False,
    batched: bool = False,
    spec: _Spec | None = None,
    batch_size: int | str | None = None,
    mesh: Mesh | None = None,
    param_shardings: Any = None,
    cache: Cache | None = None,
    ledger: IdLedger | None = None,
    progress: bool = True,
    total: int | None = None,
    desc: str = "pre-pass",
    nonfinite: Callable[[np.ndarray, np.ndarray, np.ndarray | None], str],
) -> Mapped:
    """Maps ``fn`` over every example of ``batches``: sharded, pipelined, multi-host, resumable.

    Args:
      fn: ``fn(params, example) -> array of shape``, for ONE example (the
        batch pytree without ``"id"`` and without the batch axis); with
        ``with_ids``, ``fn(params, example, id_pair)`` where ``id_pair`` is
        the example's id as int32 ``[low, high]``. With ``sum_into``, ``fn``
        returns a pytree like ``sum_into``.
      params: any pytree of arrays; placed once with ``param_shardings``
        (default: replicated over ``mesh``).
      batches: an iterable of dict batches of host arrays with an integer
        ``"id"``; multi-process: this process's own.
      name: the public function's name, for error messages.
      shape: the per-example output shape (per-example mode).
      sum_into: a zero pytree (placed with its sharding, donated): the
        per-example outputs are summed over real rows into it instead of
        returned per example.
      with_ids: pass each example's id pair to ``fn``.
      batched: ``fn(params, batch) -> [B, *shape]`` takes the whole step
        (the batch pytree without ``"id"``, with its batch axis) instead of
        one example; per-example mode only. Its rows must be independent
        (row i's output depends on row i alone): the first step of a new
        compiled step is run a second time with half its rows replaced, and
        a ``ValueError`` is raised if the other rows' outputs change (see
        :func:`_check_rows_independent`).
      spec: the batch layout when known without a batch (every process must
        pass the same one and the same ``batch_size``); then a process may
        feed no batch at all. Default: taken from the first non-empty batch,
        and (multi-process) agreed in one exchange.
      batch_size: per-process rows per step (default: the first batch's,
        or ``"auto"``: :func:`auto_step_rows` of the first batch;
        multi-process the largest first batch of any process).
      mesh: a mesh with a ``'data'`` axis (default :func:`default_mesh`).
      param_shardings: shardings for ``params``.
      cache: this pass's cache (:class:`Cache`), per-example mode only.
      ledger: the ids seen so far, shared with other calls of one pass.
      progress, total, desc: the progress bar (process 0 only).
      nonfinite: ``nonfinite(bad_rows, ids, values_or_None) -> message`` of
        the ValueError for NaN or infinite outputs.

    Returns:
      :class:`Mapped` ``(ids, values, cached)``: the ids of every example fed
      by every process (served from the cache too), their outputs ``float32
      [n, *shape]`` or, with ``sum_into``, the sum, and how many rows came
      from the cache.

    Raises:
      ValueError: see the module docstring; multi-process, the same error on
        every process.
    """
    mesh = default_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; its axes are {mesh.axis_names}."
        )
    if (
        batch_size is not None
        and batch_size != "auto"
        and (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int | np.integer)
            or batch_size < 1
        )
    ):
        arg = "step_size" if name == "per_example_losses" else "batch_size"
        raise ValueError(
            f"{arg} (rows per step) must be an int >= 1 or None; got {batch_size!r}."
        )
    if sum_into is not None and cache is not None:
        raise TypeError("a summed pass has no per-example rows to cache.")
    if batched and (sum_into is not None or with_ids):
        raise TypeError("batched=True is for per-example outputs without ids.")
    nproc, me = jax.process_count(), jax.process_index()
    if cache is not None:  # CACHE (1/4): before any batch is read
        batches = _agreed(name, nproc, lambda: cache.skip_at_source(batches))
    it = iter(batches)
    if spec is None:
        first, spec, size = _first_batch(it, batch_size, nproc, name)
        it = itertools.chain([first], it)
    else:
        size = _step_rows(spec, batch_size)
    while (size * nproc) % mesh.shape["data"]:
        size += 1
    split = _sub_batches(spec, size, batch_size, mesh)
    if split > 1:  # sub-batches of the first batch's rows
        size = split * spec.size
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    params = _place_params(
        params, replicated if param_shardings is None else param_shardings
    )
    reduce = sum_into is not None
    step = _make_step(
        fn,
        size * nproc,
        mesh,
        nproc > 1,
        tuple(shape),
        with_ids,
        None if not reduce else jax.tree.map(lambda x: x.sharding, sum_into),
        batched,
        split,
    )
    acc = sum_into
    ledger = IdLedger() if ledger is None else ledger

    served = None
    if cache is not None:  # CACHE (2/4): check the manifest, load the finished rows
        where = {"sharding": data_sharding} if nproc > 1 else {}
        rows = [
            jax.ShapeDtypeStruct((size * nproc, *s), d, **where)
            for s, d in zip(spec.shapes, spec.dtypes, strict=True)
        ]
        meta = jax.ShapeDtypeStruct((size * nproc, 4), np.int32, **where)
        args = (params, rows, *([meta] if nproc > 1 else []), spec.treedef)
        served = _agreed(
            name, nproc, lambda: cache.open(spec.describe(), params, step, args)
        )

    bar = _Progress(
        tqdm(
            total=total,
            unit="ex",
            unit_scale=True,
            desc=desc,
            disable=not progress or me != 0,
            dynamic_ncols=True,
        )
    )
    if served is not None:
        bar.update(served.count)  # rows the cache skipped at the source
    found_ids: list[np.ndarray] = []
    found_values: list[np.ndarray] = []
    failed: Exception | None = None  # multi-process: this process's own error

    def read(out, ids: np.ndarray) -> int:
        """Reads one finished step (alike on every process); returns its global count of real rows."""
        if reduce:
            bad, meta = (np.asarray(x) for x in out)
            values = None
        elif nproc == 1:
            values, meta = np.asarray(out), None
        else:
            meta, values = (np.asarray(x) for x in out)
        if meta is not None:
            state = meta[:, 3]
            if (state == _FAILED).any():
                raise _Stop
            real = state == _REAL
            ids, owners = _ids_from_pairs(meta[real, :2]), meta[real, 2]
            mine = owners == me
            if values is not None:
                values = values[real]
            if reduce:
                bad = bad[real]
        else:
            values, owners, mine = values[: len(ids)], None, slice(None)
        if not reduce:  # one float64 sum is finite exactly when every value is
            bad = (
                None
                if np.isfinite(np.sum(values, dtype=np.float64))
                else ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
            )
        if bad is not None and bad.any():
            message = nonfinite(bad, ids, values)
            if nproc > 1:
                message += f" (fed by process(es) {np.unique(owners[bad]).tolist()})"
            raise ValueError(message)
        if nproc > 1:  # every process's ids: catches an id fed by two processes
            twice, again = ledger.everywhere.add(ids)
            if len(twice) or len(again):
                dup = np.union1d(twice, again)
                who = np.unique(owners[np.isin(ids, dup)]).tolist()
                raise ValueError(_across_processes(dup, who))
        found_ids.append(ids)
        if not reduce:
            found_values.append(values)
            if cache is not None:  # CACHE (3/4): this process's finished rows
                cache.add(ids[mine], values[mine])
        bar.update(len(ids))
        return len(ids)

    # Single process, per example, no cache: finished steps are read in groups of about
    # _READ_ROWS rows (one finiteness check, one concatenation), not one by one.
    group: list[tuple[np.ndarray, np.ndarray]] = []
    group_rows = 0

    def read_group() -> None:
        nonlocal group_rows
        if not group:
            return
        if len(group) > 1:
            values = np.concatenate([v[: len(i)] for v, i in group])
            ids = np.concatenate([i for _, i in group])
            if np.isfinite(np.sum(values, dtype=np.float64)):
                group[:] = [(values, ids)]
        # Step by step when one is not finite: the error names its ids, and the steps
        # after it stay in the group (read by drain() for the cache).
        try:
            while group:
                read(*group.pop(0))
        finally:
            group_rows = sum(len(i) for _, i in group)

    def finish(out, ids: np.ndarray) -> int:
        """Reads a finished step, or (see ``group``) adds it to the group; its real rows."""
        nonlocal group_rows
        if not grouped:
            return read(out, ids)
        group.append((np.asarray(out), ids))
        group_rows += len(ids)
        if group_rows >= _READ_ROWS:
            read_group()
        return len(ids)

    # A list or tuple of batches holds all of them at once, and flowjax.batches builds new
    # arrays for each batch (``new_arrays``): none is refilled in place, so a step may view
    # the rows of several adjacent batches instead of copying them, and steps may be
    # prepared a burst ahead of their dispatch.
    stable = (
        isinstance(batches, list | tuple)
        or getattr(batches, "new_arrays", False) is True
    )
    # On a CPU, a step viewing the caller's arrays is read in place only if it is aligned.
    cpu = mesh.devices.flat[0].platform == "cpu"
    views = "aligned" if stable and cpu else stable
    steps = _local_steps(it, spec, size, served, bar, ledger.local, nproc > 1, views)
    # Single process, over batches nothing refills: steps are prepared, dispatched and
    # read in bursts (host work between jit dispatches costs about 3x its own time on a
    # busy CPU); the previous burst is read after the next one is dispatched. With a
    # cache, a burst takes at most about _BURST_SECONDS and its rows reach the cache as
    # soon as it is read, so a kill loses at most that much more than the cache's
    # flush interval; a cache that writes more often than every _BURSTS_FLUSH_SECONDS
    # (flush_seconds=0: after every step) has its steps read right behind, one by one.
    timed = cache is not None
    bursts_ok = nproc == 1 and stable
    if timed:
        bursts_ok = bursts_ok and cache.flush_seconds >= _BURSTS_FLUSH_SECONDS
    burst = _burst_steps(spec, size) if bursts_ok else 1
    grouped = nproc == 1 and not reduce and (cache is None or burst > 1)
    ahead = _IN_FLIGHT if burst == 1 else burst
    ready: collections.deque = collections.deque()  # prepared steps of this burst
    padding = None  # what a process with no data left (or a failed one) feeds
    in_flight: collections.deque = collections.deque()  # dispatched, not yet read
    probe_first = batched and step not in _CHECKED
    treedef, simple = spec.treedef, nproc == 1 and not reduce
    bursts = simple and burst > 1
    # Rows of one call of fn (a step, or a sub-batch): the rows check changes half of each.
    per_call = size // split

    def check_rows(out, leaves, meta=None) -> None:
        """Batched: the first step once more, half of every call's rows changed."""
        probe = [_probe_rows(x, per_call) for x in leaves]
        if nproc == 1:
            again = step(params, probe, treedef)
        else:
            probe = [_global(x, size, data_sharding) for x in probe]
            again = step(params, probe, meta, treedef)[1]
        _check_rows_independent(out if nproc == 1 else out[1], again, per_call, name)
        _CHECKED.add(step)  # once per compiled step: its later passes skip it

    def drain() -> None:
        """After an error: reads what is in flight and grouped, as far as it reads."""
        try:
            while in_flight:
                finish(*in_flight.popleft())
            read_group()
        except Exception:  # the error being raised already says what went wrong
            pass

    def run_bursts() -> None:
        """The loop below for one process in bursts: as little Python a step as can be.

        A burst of prepared steps is dispatched in one go, then the burst before
        it is read (so XLA works on one while the host reads the other).
        """
        nonlocal probe_first
        prev: collections.deque = collections.deque()  # dispatched, being read
        cur = prev  # dispatched last
        # With a cache the bursts grow 1, 2, 4, ... while a step takes less than
        # _BURST_SECONDS / the size (the first burst's time includes the compilation).
        limit = 1 if timed else burst
        last = time.perf_counter()
        try:
            while items := list(itertools.islice(steps, limit)):
                outs = [step(params, it.leaves, treedef) for it in items]
                cur = collections.deque(
                    zip(outs, [it.ids for it in items], strict=True)
                )
                if probe_first:
                    probe_first = False
                    try:
                        check_rows(outs[0], items[0].leaves)
                    except BaseException:
                        cur.clear()  # rows of a loss that mixes rows are not kept
                        raise
                while prev:
                    finish(*prev.popleft())
                prev = cur
                if timed:
                    read_group()  # the rows of the burst read go to the cache now
                    now = time.perf_counter()
                    per_step, last = (now - last) / len(items), now
                    fits = int(_BURST_SECONDS / max(per_step, 1e-9))
                    limit = max(1, min(burst, 2 * limit, fits))
        finally:  # read below (or, after an error, kept: see drain)
            in_flight.extend(prev)
            if cur is not prev:
                in_flight.extend(cur)

    try:
        if bursts:
            run_bursts()
        else:
            while True:
                item, state = None, _REAL
                if failed is None:
                    try:
                        if not ready:
                            ready.extend(itertools.islice(steps, burst))
                        item = ready.popleft() if ready else None
                    except Exception as e:
                        if nproc == 1:
                            raise
                        failed = e  # tell the others through this step
                if failed is not None:
                    state = _FAILED
                if item is None:
                    if nproc == 1:
                        break
                    # Keep in step with the processes that still have data.
                    padding = padding or _padding_step(spec, size)
                    item = padding
                if simple:
                    # numpy straight into jit: its C++ path places the batch fastest
                    out = step(params, item.leaves, treedef)
                elif nproc == 1:
                    meta = _meta(item.ids, size, me, state)
                    acc, *out = step(params, acc, item.leaves, meta, spec.treedef)
                else:
                    leaves = [_global(x, size, data_sharding) for x in item.leaves]
                    meta = _global(
                        _meta(item.ids, size, me, state), size, data_sharding
                    )
                    if reduce:
                        acc, *out = step(params, acc, leaves, meta, spec.treedef)
                    else:
                        out = step(params, leaves, meta, spec.treedef)
                if probe_first:
                    probe_first = False
                    check_rows(out, item.leaves, None if nproc == 1 else meta)
                in_flight.append((out, item.ids))
                # Once a step is all padding everywhere, every later one is too: stop together.
                stop = False
                while len(in_flight) > ahead and not ready and not stop:
                    try:
                        stop = finish(*in_flight.popleft()) == 0
                    except _Stop:
                        stop = True
                    except ValueError:
                        raise
                    except Exception as e:  # e.g. the cache's disk: this process's own
                        if nproc == 1:
                            raise
                        failed = failed or e
                if stop:
                    break
        while nproc == 1 and in_flight:
            finish(*in_flight.popleft())
        read_group()
    except BaseException:
        if cache is not None and nproc == 1:
            drain()  # the steps that finished before the error go to the cache too
        raise
    finally:
        if cache is not None:
            cache.flush()  # CACHE (4/4): what is pending (also when stopping on an error)
        bar.close()
    try:  # ids of the last batches that arrived twice (kept, not merged in yet)
        twice, again = ledger.local.merge()
        if len(twice) or len(again):
            raise ValueError(_duplicates(twice, again))
    except ValueError as e:
        if nproc == 1:
            raise
        failed = failed or e
    if nproc > 1:
        # Every process stops at the same step; one exchange tells all of them whether a
        # process failed (then each raises the same error) or all finished.
        _exchange(name, np.zeros(0, np.int32), failed)
        twice, again = ledger.everywhere.merge()  # alike on every process
        if len(twice) or len(again):
            raise ValueError(_across_processes(np.union1d(twice, again)))

    if reduce:
        return Mapped(np.concatenate([np.zeros(0, np.int64), *found_ids]), acc)
    cached = 0
    if served is not None:
        s_ids, s_values = served.used()
        if nproc > 1:
            s_ids, s_values = _allgather_rows(s_ids, s_values)
        found_ids, found_values = [*found_ids, s_ids], [*found_values, s_values]
        cached = len(s_ids)
    return Mapped(
        np.concatenate([np.zeros(0, np.int64), *found_ids]),
        np.concatenate([np.zeros((0, *shape), np.float32), *found_values]),
        cached,
    )


class _Progress:
    """A tqdm bar that redraws at most every ``_BAR_SECONDS`` (tqdm checks the clock per call)."""

    def __init__(self, bar) -> None:
        self._bar, self._pending = bar, 0
        self._next = time.monotonic() + _BAR_SECONDS

    def update(self, n: int) -> None:
        self._pending += n
        if self._pending and time.monotonic() >= self._next:
            self._bar.update(self._pending)
            self._pending, self._next = 0, time.monotonic() + _BAR_SECONDS

    def close(self) -> None:
        if self._pending:
            self._bar.update(self._pending)
            self._pending = 0
        self._bar.close()


_BAR_SECONDS = 0.25


# Compiled batched steps whose rows were found independent (the check costs one step).
_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _probe_rows(x: np.ndarray, period: int) -> np.ndarray:
    """``x`` with, in every block of ``period`` rows, rows ``[h, 2h)`` replaced by rows ``[0, h)`` reversed.

    ``h`` is half a block. A block is the rows ``fn`` is called on at once:
    the whole step, or one of its sub-batches (:func:`_sub_batches`).
    """
    half, y = period // 2, np.array(x)
    blocks = x.reshape(-1, period, *x.shape[1:])
    y.reshape(blocks.shape)[:, half : 2 * half] = blocks[:, :half][:, ::-1]
    return y


def _check_rows_independent(out, again, period: int, name: str) -> None:
    """Batched ``fn``: raises unless changing half of each call's rows left the other half alone.

    ``out`` and ``again`` are the first step's outputs for its rows and for
    :func:`_probe_rows` of them (on every process); ``period`` is the rows of
    one call of ``fn`` (a process's step, or a sub-batch of it). A function
    whose rows are coupled (BatchNorm in train mode, a mean over the batch)
    would give each example a loss that depends on the rest of its step: on
    the padding, on how batches were merged, on the order of the data.
    """
    out, again = np.asarray(out), np.asarray(again)
    kept = np.arange(len(out)) % period < period // 2  # each call's unchanged rows
    a, b = out[kept].astype(np.float64), again[kept].astype(np.float64)
    same = np.isclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    if not same.all():
        raise ValueError(
            f"{name}: the batched loss_fn couples the rows of a batch: replacing half of the "
            "first step's rows changed the losses of the other half (e.g. BatchNorm in train "
            "mode, which normalises by the batch's statistics, a mean over the batch, or "
            "Dropout left on, which draws new noise for every call). A "
            "batched loss must give each example's loss from that example alone, or the "
            "losses would depend on the padding, on how batches are merged into steps and on "
            "the order of the data: run the model in eval mode (model.eval(), or "
            "nnx.view(model, use_running_average=True)) before nnx.split."
        )


class _Stop(Exception):
    """A step read back with failed rows: every process leaves the loop at this step."""


def _agreed(name: str, nproc: int, fn):
    """``fn()``; multi-process, its failure on any process raises the same error on every one.

    For the cache's setup steps, which can fail on one process alone (its
    directory, its manifest): one exchange after the call, so that no process
    goes on to the first step while another has stopped.
    """
    if nproc == 1:
        return fn()
    try:
        out, error = fn(), None
    except Exception as e:
        out, error = None, e
    _exchange(name, np.zeros(0, np.int32), error)
    return out


def _first_batch(it, batch_size, nproc: int, name: str):
    """The first non-empty batch, its spec and rows per step; multi-process, agreed by all.

    Multi-process: one exchange of (status, rows, layout checksum) and each
    process's layout, so that an empty or malformed first batch on one process
    raises the same error on every process (none waits in a collective).
    """
    first = spec = error = None
    try:
        first = next((b for b in it if _rows(b) != 0), None)
        if first is not None:
            spec = _Spec.from_batch(first)
    except Exception as e:
        if nproc == 1:
            raise
        error = e
    size = 0 if spec is None else _step_rows(spec, batch_size)
    if nproc == 1:
        if first is None:
            raise ValueError("batches is empty: there is nothing to compute.")
        return first, spec, size
    layout = "" if spec is None else spec.describe()
    crc = zlib.crc32(layout.encode()) & 0x7FFFFFFF
    ints, notes = _exchange(
        name, np.array([first is not None, size, crc], np.int32), error, layout
    )
    empty = np.flatnonzero(ints[:, 0] == 0).tolist()
    if len(empty) == nproc:
        raise ValueError(
            "batches is empty on every process: there is nothing to compute."
        )
    if empty:
        raise ValueError(
            f"batches is empty on process(es) {empty}: every process needs at least one "
            "example (the counts may differ)."
        )
    if len(set(ints[:, 2].tolist())) != 1:
        each = "; ".join(f"process {p}: {n}" for p, n in enumerate(notes))
        raise ValueError(
            "processes feed batches of different structure, shapes or dtypes; they must "
            f"agree ({each})."
        )
    return first, spec, int(ints[:, 1].max())


def _exchange(
    name: str, ints: np.ndarray, error: Exception | None, note: str = ""
) -> tuple[np.ndarray, list[str]]:
    """Multi-process: every process's status ints and note, in one fixed-size allgather.

    If any process passes an ``error``, every process raises the same
    ``ValueError`` naming the failed processes and their messages (on a failed
    process it is chained to the original error).

    Returns:
      ``(ints [process_count, k], notes)``.
    """
    text = note if error is None else _describe_error(error)
    raw = text.encode()[:_MESSAGE_BYTES]
    row = np.zeros(2 + len(ints) + _MESSAGE_BYTES // 4, np.int32)
    row[0], row[1] = error is not None, len(raw)
    row[2 : 2 + len(ints)] = ints
    row[2 + len(ints) :].view(np.uint8)[: len(raw)] = np.frombuffer(raw, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(row)).reshape(
        jax.process_count(), -1
    )
    texts = [
        every[p, 2 + len(ints) :]
        .view(np.uint8)[: every[p, 1]]
        .tobytes()
        .decode(errors="replace")
        for p in range(len(every))
    ]
    failed = np.flatnonzero(every[:, 0]).tolist()
    if failed:
        each = " | ".join(f"process {p}: {texts[p]}" for p in failed)
        message = (
            f"{name} stopped on every process because process(es) {failed} failed on "
            f"their own input: {each}"
        )
        raise ValueError(message) from error
    return every[:, 2 : 2 + len(ints)], texts


def _describe_error(error: Exception) -> str:
    text = str(error)
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


# --- duplicate ids, as they arrive -----------------------------------------------------------


class _SeenIds:
    """Every id added so far, checked for repeats as batches arrive; no Python work per id.

    Dense ids (the usual ``0 .. n-1``, or any ids whose range stays within
    a few times their count, plus 1M): an int32 stamp per id of the range.
    ``add`` reads the batch's stamps (set: seen before), writes each row's
    position and reads them back (another position: repeated within the
    batch): a few microseconds per batch, every repeat found in its batch.

    Sparse ids (the first batch whose range would make the stamps too big
    switches over for good): one sorted, unique int64 array and the batches
    not yet merged in. Once the kept ids reach a quarter of the merged ones,
    they are sorted and merged in (a linear merge of two sorted runs), and
    one comparison of neighbours finds every id that arrived twice.
    Amortised, each id is copied a few times (millions of ids in well under
    a second); a repeated id is found at most ``n / 4`` ids after it arrives
    (``n`` the ids so far) or one batch later: within one pass.
    """

    _SLACK = 1 << 20  # stamps allowed beyond 4 per id seen

    def __init__(self) -> None:
        self._merged = np.zeros(0, np.int64)
        self._kept: list[np.ndarray] = []
        self._kept_count = 0
        self._stamp: np.ndarray | None = (
            None  # dense: int32 per id of [base, base + len)
        )
        self._base, self._seen, self._dense = 0, 0, True
        self._pos = np.zeros(0, np.int32)

    def add(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Adds ``ids``; returns (ids repeated within one batch, ids that arrived again), sorted."""
        # Callers pass arrays of their own (_local_steps copies each batch's ids as it takes
        # it; the cross-process ids are fresh from the step's output): kept as they are.
        ids = np.asarray(ids, np.int64)
        if self._dense and len(ids):
            if self._cover(int(ids.min()), int(ids.max()), len(ids)):
                return self._add_dense(ids)
            self._to_sorted()
        self._kept.append(ids)
        self._kept_count += len(ids)
        if self._kept_count > len(self._merged) // 4:
            return self.merge()
        return _NONE, _NONE

    def add_batches(self, batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`add` of several batches' ids at once (one vectorised check for them all).

        Returns the same pair as adding them one by one would, together: ids
        repeated within one of the batches, and ids that arrived again (seen
        in an earlier batch, of this call or before).
        """
        if len(batches) == 1:
            return self.add(batches[0])
        ids = np.concatenate(batches)
        if not len(ids):
            return _NONE, _NONE
        if not (
            self._dense and self._cover(int(ids.min()), int(ids.max()), len(ids))
        ):  # the sorted path keeps each batch, for its messages
            out = [self.add(b) for b in batches]
            twice = np.unique(np.concatenate([t for t, _ in out]))
            return twice, np.setdiff1d(np.concatenate([a for _, a in out]), twice)
        both, again = self._add_dense(ids)
        if not (len(both) or len(again)):
            return _NONE, _NONE
        # Only for the message: of the ids repeated within this call, which repeat inside one batch.
        within = [np.sort(b) for b in batches]
        within = np.unique(np.concatenate([b[1:][b[1:] == b[:-1]] for b in within]))
        return within, np.setdiff1d(np.union1d(again, both), within)

    @property
    def count(self) -> int:
        """How many ids were added (the dense stamps' count, or the sorted ids)."""
        return self._seen if self._dense else len(self._merged) + self._kept_count

    def _cover(self, lo: int, hi: int, n: int) -> bool:
        """Grows the stamps to cover ``[lo, hi]``; False when they would be too sparse."""
        stamp, base = self._stamp, self._base
        if stamp is not None and base <= lo and hi < base + len(stamp):
            return True
        new_lo = lo if stamp is None else min(lo, base)
        new_hi = hi if stamp is None else max(hi, base + len(stamp) - 1)
        span = new_hi - new_lo + 1
        if span > 4 * (self._seen + n) + self._SLACK:
            return False
        size = max(span, 2 * (0 if stamp is None else len(stamp)), 1 << 12)
        grown = np.full(size, -1, np.int32)
        if stamp is not None:
            grown[base - new_lo : base - new_lo + len(stamp)] = stamp
        self._stamp, self._base = grown, new_lo
        return True

    def _add_dense(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(ids)
        if len(self._pos) < n:
            self._pos = np.arange(n, dtype=np.int32)
        lo = int(ids[0]) - self._base
        if n > 1 and int(ids[-1]) - self._base - lo == n - 1:
            # Perhaps a run lo, lo + 1, ... (examples fed in id order, the usual pre-pass):
            # then the stamps are a slice, and no gather or scatter is needed.
            run = self._stamp[lo : lo + n]
            if bool((ids[1:] - ids[:-1] == 1).all()) and run.max() < 0:
                run[:] = self._pos[:n]
                self._seen += n
                return _NONE, _NONE
        pos, stamp = self._pos[:n], self._stamp
        # Ids from 0 (the usual) are their own positions in the stamps.
        idx = ids - self._base if self._base else ids
        before = stamp[idx]
        stamp[idx] = pos
        within, again = stamp[idx] != pos, before >= 0
        self._seen += n
        if not (within | again).any():
            return _NONE, _NONE
        twice = np.unique(ids[within])
        return twice, np.setdiff1d(np.unique(ids[again]), twice)

    def _to_sorted(self) -> None:
        if self._stamp is not None:
            self._merged = (
                np.flatnonzero(self._stamp >= 0).astype(np.int64) + self._base
            )
        self._stamp, self._dense = None, False

    def merge(self) -> tuple[np.ndarray, np.ndarray]:
        """Merges the kept batches in; returns :meth:`add`'s pair for everything kept."""
        if not self._kept:
            return _NONE, _NONE
        kept = np.concatenate(self._kept)
        kept.sort()
        merged = np.concatenate([self._merged, kept])
        merged.sort(kind="stable")  # two sorted runs: one linear merge
        again = merged[1:] == merged[:-1]
        if not again.any():
            self._merged, self._kept, self._kept_count = merged, [], 0
            return _NONE, _NONE
        dup = np.unique(merged[1:][again])
        # Only for the message: ids that repeat inside one batch, and all the others.
        within = [np.sort(b) for b in self._kept]
        within = np.unique(np.concatenate([b[1:][b[1:] == b[:-1]] for b in within]))
        return within, np.setdiff1d(dup, within)


_NONE = np.zeros(0, np.int64)


def _shown(ids: np.ndarray) -> str:
    more = f" and {len(ids) - _SHOW} more" if len(ids) > _SHOW else ""
    return f"{ids[:_SHOW].tolist()}{more}"


_UNIQUE = (
    "Every example needs a stable, unique id; results are keyed by id, so a duplicate "
    "would silently overwrite a result."
)
_REPEATS = (
    "this loader repeats examples: pass a single-epoch iterator (for example "
    "flowjax.batches(..., epochs=1)), or give every example its own id."
)


def _duplicates(twice: np.ndarray, again: np.ndarray) -> str:
    """The message for ids repeated within one batch (``twice``) or seen in an earlier one."""
    if len(again):
        return (
            f"duplicate example ids: {_shown(again)} arrived again after an earlier batch: "
            f"{_REPEATS}"
        )
    return f"duplicate example ids within one batch: {_shown(twice)}. {_UNIQUE}"


def _across_processes(dup: np.ndarray, who: list[int] | None = None) -> str:
    step = "" if who is None else f" (the last copies came from process(es) {who})"
    return (
        f"duplicate example ids: {_shown(dup)} were fed by more than one process, or twice"
        f"{step}: every process must feed its own examples, once; if {_REPEATS}"
    )


# --- the jitted step ----------------------------------------------------------------------


# Jitted steps per fn, so later passes with the same fn and shapes reuse the compiled
# program. Weakly keyed: a step dies with its fn.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_step(
    fn,
    global_batch: int,
    mesh: Mesh,
    multiprocess: bool,
    shape: tuple[int, ...],
    with_ids: bool,
    acc_shardings,
    batched: bool = False,
    split: int = 1,
):
    """The jitted step of one fixed-shape global batch.

    ``fn`` is vmapped over the rows, or, ``batched``, called on the whole
    batch; with ``split`` > 1, the batch is ``split`` sub-batches of equal
    rows, computed one after another in the program (``lax.scan``) and
    ``fn`` traced once, on one sub-batch (:func:`_sub_batches`).

    Per-example, single process: ``step(params, leaves, treedef) -> values``
    (the host keeps the ids). Per-example, multi-process: ``step(params,
    leaves, meta, treedef) -> (meta, values)``. Summed: ``step(params, acc,
    leaves, meta, treedef) -> (acc + Σ_real out, bad, meta)`` with ``acc``
    donated. Everything but ``acc`` comes back replicated, so every process
    learns every row's id and state.
    """
    flat, structure = jax.tree.flatten(acc_shardings)
    # What fn computes (code, closure, the globals it reads) is part of the key: a global
    # changed between two passes gives a new trace, never the old program (jax.jit alone
    # would reuse its trace of the same function object); an nnx.Module it reads counts
    # by its arrays. When fn reads plain state that can change in place unseen, no step
    # is reused.
    computes = _cache.fn_fingerprint(fn, by_identity=True)
    key = (global_batch, mesh, multiprocess, shape, with_ids, structure, tuple(flat))
    key += (batched, split, computes)
    try:
        per_fn = {} if computes is None else _STEPS.setdefault(fn, {})
    except TypeError:  # not weak-referenceable: compile for this call only
        per_fn = {}
    if key in per_fn:
        return per_fn[key]
    fn_ref = _ref(fn)  # the cached step must not keep its own key alive
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    rows = global_batch // split  # per call of fn

    def call(params, leaves, meta, treedef):
        example = jax.tree.unflatten(treedef, leaves)
        if batched:
            values = fn_ref()(params, example)
        elif with_ids:
            values = jax.vmap(fn_ref(), in_axes=(None, 0, 0))(
                params, example, meta[:, :2]
            )
        else:
            values = jax.vmap(fn_ref(), in_axes=(None, 0))(params, example)
        if acc_shardings is None and (
            not isinstance(values, jax.Array) or values.shape != (rows, *shape)
        ):
            what = "ONE scalar" if not shape else f"an array of shape {shape}"
            how = "called on a batch of" if batched else "vmapped over"
            raise ValueError(
                f"loss_fn must return {what} per example; {how} {rows} rows it "
                f"returned {getattr(values, 'shape', type(values))} instead of "
                f"{(rows, *shape)}."
            )
        return values

    def outputs(params, leaves, meta, treedef):
        if split == 1:
            return call(params, leaves, meta, treedef)

        # [B, ...] -> [split, rows, ...]: sub-batch k is rows k * rows ... (k + 1) * rows - 1.
        def blocks(x):
            return None if x is None else x.reshape(split, rows, *x.shape[1:])

        # The params ride in the carry, unchanged, rather than closed over: fn's own
        # values are then of the loop's trace (a model merged from them may set its state
        # there, e.g. BatchNorm in train mode, which the rows check then names). Unrolled
        # (fn is still traced once): no loop in the program, static slices; measured side
        # by side on 2 CPUs, a pre-pass over forward 0.97 -> 1.00 (CNN), 1.11 -> 1.15 (MLP).
        _, out = jax.lax.scan(
            lambda p, sub: (p, call(p, sub[0], sub[1], treedef)),
            params,
            ([blocks(x) for x in leaves], blocks(meta)),
            unroll=True,
        )
        return jax.tree.map(lambda o: o.reshape(global_batch, *o.shape[2:]), out)

    def values_of(params, leaves, meta, treedef):
        return outputs(params, leaves, meta, treedef).astype(jnp.float32)

    if acc_shardings is not None:

        def step(params, acc, leaves, meta, treedef):
            out = outputs(params, leaves, meta, treedef)
            valid = meta[:, 3] == _REAL

            def rows(x):  # valid as [B, 1, ..., 1] against a [B, ...] leaf
                return jnp.reshape(valid, valid.shape + (1,) * (x.ndim - 1))

            acc = jax.tree.map(
                lambda a, o: (
                    a + jnp.sum(jnp.where(rows(o), o.astype(jnp.float32), 0), axis=0)
                ),
                acc,
                out,
            )
            bad = jnp.zeros(valid.shape, bool)
            for o in jax.tree.leaves(out):
                bad = bad | ~jnp.all(jnp.isfinite(o.reshape(o.shape[0], -1)), axis=1)
            return acc, bad & valid, meta

        shardings = {
            "donate_argnums": 1,
            "in_shardings": (None, acc_shardings, data, data),
            "out_shardings": (acc_shardings, replicated, replicated),
        }
    elif multiprocess:

        def step(params, leaves, meta, treedef):
            return meta, values_of(params, leaves, meta, treedef)

        shardings = {
            "in_shardings": (None, data, data),
            "out_shardings": (replicated, replicated),
        }
    else:

        def step(params, leaves, treedef):
            return values_of(params, leaves, None, treedef)

        shardings = {"in_shardings": (None, data), "out_shardings": replicated}
    # None: params keep the sharding they were placed with.
    per_fn[key] = jax.jit(step, static_argnames="treedef", **shardings)
    return per_fn[key]


def _ref(fn):
    try:
        return weakref.ref(fn)
    except TypeError:
        return lambda: fn


# --- batches: layout, validation, steps -----------------------------------------------------


class _Spec(NamedTuple):
    """The structure, per-example shapes and dtypes every batch must have."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    size: int  # rows in the first batch
    flat_keys: tuple[str, ...] | None  # the leaves' keys when batches are flat dicts
    # The hot path's (getter of the id and the leaves, each leaf's [size, ...] shape, the
    # dict's length), for flat dicts with at least one field.
    fast: tuple | None = None

    @classmethod
    def from_batch(cls, batch) -> _Spec:
        ids, leaves, treedef = _split(batch)
        dtypes = tuple(np.dtype(jax.dtypes.canonicalize_dtype(x.dtype)) for x in leaves)
        rest = {k: 0 for k in batch if k != _ID}
        flat = jax.tree.structure(rest) == treedef
        keys = tuple(jax.tree.unflatten(treedef, range(len(leaves)))) if flat else None
        shapes = tuple(x.shape[1:] for x in leaves)
        fast = None
        if keys:
            full = tuple((len(ids), *s) for s in shapes)
            fast = (operator.itemgetter(_ID, *keys), full, len(keys) + 1)
        return cls(treedef, shapes, dtypes, len(ids), keys, fast)

    def describe(self) -> str:
        return f"{self.treedef}; shapes {list(self.shapes)}; dtypes {[d.str for d in self.dtypes]}"

    def check(self, batch) -> tuple[np.ndarray, list[np.ndarray]]:
        """Validated ``(ids, leaves)`` of a batch, leaves cast to the canonical dtypes."""
        fast = self._check_flat(batch)
        if fast is not None:
            return fast
        ids, leaves, treedef = _split(batch)
        if treedef != self.treedef:
            raise ValueError(
                f"a batch has structure {treedef}; the first batch had {self.treedef}"
                f"{_naming(ids)}."
            )
        for i, (x, shape, dtype) in enumerate(
            zip(leaves, self.shapes, self.dtypes, strict=True)
        ):
            if x.shape[1:] != shape:
                raise ValueError(
                    f"field {_leaf_name(treedef, i)} has per-example shape {x.shape[1:]}; the first "
                    f"batch had {shape}{_naming(ids)}. Pad sequences to one fixed length so the "
                    "pass compiles once."
                )
            if x.dtype != dtype:
                leaves[i] = _to_dtype(x, dtype, _leaf_name(treedef, i), ids)
        return ids, leaves

    def _check_flat(self, batch) -> tuple[np.ndarray, list[np.ndarray]] | None:
        """The hot path for the usual batch: a flat dict exactly like the first one.

        Returns None (so that ``check`` validates and explains) on anything else.
        """
        fast = self.fast
        if fast is None or type(batch) is not dict or len(batch) != fast[2]:
            return None
        try:
            ids, *leaves = fast[0](batch)
        except KeyError:
            return None
        if not (
            type(ids) is np.ndarray
            and (ids.dtype is _INT64 or ids.dtype == _INT64)
            and ids.ndim == 1
        ):
            return None
        n = len(ids)
        full = fast[1] if n == self.size else tuple((n, *s) for s in self.shapes)
        for x, shape, dtype in zip(leaves, full, self.dtypes, strict=True):
            if (
                type(x) is not np.ndarray
                or (x.dtype is not dtype and x.dtype != dtype)
                or x.shape != shape
            ):
                return None
        return ids, leaves


def _naming(ids: np.ndarray) -> str:
    """`` (batch of ids [...])``: which examples a batch-level error is about."""
    return f" (the batch of ids {_shown(ids)})" if len(ids) else ""


def _rows(batch) -> int:
    """Rows of a batch; -1 (never skipped, so that validation reports it) if it is malformed."""
    try:
        return len(batch[_ID])
    except Exception:
        return -1


def _split(batch) -> tuple[np.ndarray, list[np.ndarray], Any]:
    if not isinstance(batch, dict) or _ID not in batch:
        fields = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f'every batch must be a dict with an integer "id" array of example ids; got {fields}.'
        )
    ids = np.asarray(batch[_ID])
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        ids = _checks.as_ids(ids, 'batch["id"]')  # raises with the reason
    elif ids.dtype != np.int64:
        ids = _checks.as_ids(ids)
    leaves, treedef = jax.tree.flatten({k: v for k, v in batch.items() if k != _ID})
    leaves = [np.asarray(x) for x in leaves]
    for i, x in enumerate(leaves):
        if x.ndim == 0 or x.shape[0] != len(ids):
            rows = x.shape[0] if x.ndim else "no"
            raise ValueError(
                f"field {_leaf_name(treedef, i)} has {rows} rows but the batch has {len(ids)} ids"
                f"{_naming(ids)}: every field needs a leading batch axis of the same length."
            )
    return ids, leaves, treedef


def _leaf_name(treedef, i: int) -> str:
    skeleton = jax.tree.unflatten(treedef, range(treedef.num_leaves))
    return jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(skeleton)[0][i][0])


def _to_dtype(x: np.ndarray, dtype: np.dtype, name: str, ids: np.ndarray) -> np.ndarray:
    """Casts to the first batch's (canonical) dtype; refuses lossy kind changes, overflow or rounding."""
    if x.dtype.kind == "f" and dtype.kind == "f" and x.dtype.itemsize > dtype.itemsize:
        with np.errstate(
            over="ignore"
        ):  # an overflow is reported below, naming the ids
            cast = x.astype(dtype)
        lost = ~((cast.astype(x.dtype) == x) | (np.isnan(cast) & np.isnan(x)))
        if lost.any():
            raise ValueError(
                f"field {name} has dtype {x.dtype}; the first batch had {dtype}, and "
                f"{int(lost.sum())} of its values would change (overflow or rounding)"
                f"{_naming(ids)}: feed every batch in one dtype."
            )
        return cast
    if x.dtype.kind in "iu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise ValueError(
                f"field {name} has values outside {dtype}{_naming(ids)}; enable jax_enable_x64 "
                "or use smaller values."
            )
    elif x.dtype.kind != dtype.kind:
        raise ValueError(
            f"field {name} has dtype {x.dtype}; the first batch had {dtype}{_naming(ids)}."
        )
    return x.astype(dtype)


def _place_params(params, shardings):
    """Puts params on the mesh once (replicated by default) so each step reads them in place."""

    def put(x, s):
        if isinstance(x, jax.Array) and (
            x.sharding == s or x.sharding.is_equivalent_to(s, x.ndim)
        ):
            return x  # already in place (a device_put would still cost ~0.1 ms a leaf)
        if s.is_fully_addressable or (
            isinstance(x, jax.Array) and not x.is_fully_addressable
        ):
            return jax.device_put(x, s)
        x = np.asarray(x)  # multi-host, host value: every process holds the same one
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), params)
    return jax.tree.map(put, params, shardings)


class _Step(NamedTuple):
    leaves: list[np.ndarray]  # fixed shape [B, ...]
    ids: np.ndarray  # the first len(ids) rows are real, the rest padding


# _Step((leaves, ids)) without NamedTuple's Python-level __new__ (a step's hot path).
_new_step = functools.partial(tuple.__new__, _Step)


def _local_steps(
    batches,
    spec: _Spec,
    batch_size: int,
    served,
    bar,
    seen: _SeenIds,
    every_batch: bool = False,
    stable: bool | str = False,
) -> Iterator[_Step]:
    """This process's fixed-shape steps: validated, duplicate-free, cached examples skipped.

    Batches are split and merged into steps of ``batch_size`` rows: whole
    steps inside a batch go as views (consumed at dispatch), the rest is
    copied once into the next step's buffer, which fills across batches (so
    a loader that refills its arrays in place cannot change rows waiting
    there; ``stable`` batches, a list, which nothing refills, fill a step with
    views instead where their rows lie next to each other in one array, see
    :class:`_Filling`; ``"aligned"``: only where that array's rows start on an
    ``_host.ALIGN`` boundary). Only the last step is padded, by repeating its last real row
    (valid inputs; dropped from the result). Duplicate ids are checked for a
    group of batches at a time (:class:`_IdCheck`); with ``every_batch``
    (multi-process: an error within a few steps), batch by batch.
    """
    shapes = list(zip(spec.shapes, spec.dtypes, strict=True))
    step: _Filling | None = None  # the step being filled, across batches
    # (With a cache too: a repeated id found a group later may have had both of its rows
    # written, and the newest is kept; but it is an error again in any later pass over the
    # same batches, whose ids are all checked, served ones too, and a batch whose key skips
    # cached ids at the source has unique ids by construction.)
    check = _IdCheck(seen, every_batch=every_batch)
    for batch in batches:
        ids, leaves = spec.check(batch)
        # A copy: the ids are read (and cached) steps later, and a loader may refill its
        # arrays in place for the next batch (the fields are consumed at dispatch). A list
        # or tuple of batches holds them all at once, so nothing refills its arrays.
        ids = np.asarray(ids, np.int64) if stable else np.array(ids, np.int64)
        check.add(ids)
        if served is not None:  # skip the rows an earlier run finished
            keep = served.take(ids, leaves)
            if keep is not None and not keep.all():
                bar.update(int((~keep).sum()))
                ids, leaves = ids[keep], [x[keep] for x in leaves]
        n, start = len(ids), 0
        while start < n:
            if step is None and n - start >= batch_size:  # a whole step: views
                if start == 0 and n == batch_size:  # the batch is the step
                    yield _new_step((leaves, ids))
                    break
                stop = start + batch_size
                yield _new_step(([x[start:stop] for x in leaves], ids[start:stop]))
                start = stop
                continue
            if step is None:
                step = _Filling(shapes, batch_size, stable)
            take = min(batch_size - step.filled, n - start)
            step.add(leaves, ids, start, take)
            start += take
            if step.filled == batch_size:
                yield _Step(step.leaves(), step.ids)
                step = None
    check.flush()
    # The last step: padded by repeating its last real row (dropped from the result).
    if step is not None:
        yield _Step(step.leaves(), step.ids[: step.filled])


class _Filling:
    """The step being filled across batches: per field, a buffer the rows are copied into.

    With ``views`` (the batches are a list: nothing refills them), a field's
    rows stay views while each batch's rows follow the previous ones in one
    C-contiguous array (a list of slices of one array, as a notebook makes),
    and the step is one view of them: no copy of the step's input on the
    host (an accelerator's jit copies it to the device in any case). With
    ``views="aligned"`` (a CPU) only if the view starts on an ``_host.ALIGN``
    boundary: XLA's CPU client reads an aligned step in place but copies any
    other at dispatch, slower than the copy into a reused aligned buffer
    here (an MLP pre-pass over a list of slices of one array, side by side:
    0.485 of a training epoch with views, 0.433 with copies). Chunks under
    ``_VIEW_BYTES`` are copied (checking costs more than copying them).
    """

    def __init__(self, shapes, size: int, views: bool | str) -> None:
        self._shapes, self._size = shapes, size
        self._aligned = views == "aligned"
        self.ids = np.empty(size, np.int64)
        self.filled = 0
        self._parts: list[list[np.ndarray] | None] = [
            [] if views else None for _ in shapes
        ]
        self._buf: list[np.ndarray | None] = [None] * len(shapes)

    def add(self, leaves, ids: np.ndarray, start: int, take: int) -> None:
        at = self.filled
        for i, x in enumerate(leaves):
            chunk, parts = x[start : start + take], self._parts[i]
            if (
                parts is not None
                and chunk.nbytes >= _VIEW_BYTES
                and (_follows(parts[-1], chunk) if parts else self._starts(chunk))
            ):
                parts.append(chunk)
            else:
                self._buffer(i)[at : at + take] = chunk
        self.ids[at : at + take] = ids[start : start + take]
        self.filled += take

    def _starts(self, chunk: np.ndarray) -> bool:
        """Whether a step's view may start with ``chunk``."""
        return not self._aligned or (
            chunk.__array_interface__["data"][0] % _host.ALIGN == 0
        )

    def _buffer(self, i: int) -> np.ndarray:
        """Field ``i``'s buffer (from now on), holding the rows viewed so far."""
        if self._buf[i] is None:
            shape, dtype = self._shapes[i]
            buf, at = _host.empty((self._size, *shape), dtype), 0  # read in place
            for part in self._parts[i] or ():
                buf[at : at + len(part)] = part
                at += len(part)
            self._buf[i], self._parts[i] = buf, None
        return self._buf[i]

    def leaves(self) -> list[np.ndarray]:
        """The step's fields, ``size`` rows each (a short step padded with its last row)."""
        out = []
        for i, parts in enumerate(self._parts):
            if self.filled == self._size and parts:
                out.append(
                    np.lib.stride_tricks.as_strided(
                        parts[0],
                        shape=(self._size, *parts[0].shape[1:]),
                        strides=parts[0].strides,
                        writeable=False,
                    )
                )
                continue
            buf = self._buffer(i)
            buf[self.filled :] = buf[self.filled - 1]
            out.append(buf)
        return out


_VIEW_BYTES = 1 << 16


def _follows(prev: np.ndarray, x: np.ndarray) -> bool:
    """Whether ``x``'s rows start where ``prev``'s end, in one C-contiguous array."""
    return (
        x.base is not None
        and x.base is prev.base
        and x.dtype == prev.dtype
        and x.flags.c_contiguous
        and prev.flags.c_contiguous
        and x.__array_interface__["data"][0]
        == prev.__array_interface__["data"][0] + prev.nbytes
    )


class _IdCheck:
    """The duplicate-id check of one process's batches, a group of batches at a time.

    The batches' ids go to :meth:`_SeenIds.add_batches` together once they
    reach a quarter of the ids seen so far (at most ``_CHECK_ROWS``), so a
    repeated id is still found within a quarter of a pass (the first batches
    one by one), for a few numpy calls per group instead of per batch; the
    error names the ids as a batch-by-batch check would.
    """

    def __init__(self, seen: _SeenIds, every_batch: bool = False) -> None:
        self._seen, self._every = seen, every_batch
        self._batches: list[np.ndarray] = []
        self._rows = 0
        self._due = 0 if every_batch else min(_CHECK_ROWS, seen.count // 4)

    def add(self, ids: np.ndarray) -> None:
        self._batches.append(ids)
        self._rows += len(ids)
        if self._rows >= self._due:
            self.flush()

    def flush(self) -> None:
        if not self._batches:
            return
        batches, self._batches, self._rows = self._batches, [], 0
        twice, again = self._seen.add_batches(batches)
        if not self._every:  # rows to gather before the next check
            self._due = min(_CHECK_ROWS, self._seen.count // 4)
        if len(twice) or len(again):
            raise ValueError(_duplicates(twice, again))


_CHECK_ROWS = 16384  # ids checked together for duplicates, at most
# Steps prepared and dispatched together (single process, batches nothing refills). Host
# time per step around a trivial program on 2 CPUs (bench_host, 7 rounds): 9.4 µs in bursts
# of 32, 8.6 in bursts of 64, 8.3 in bursts of 128; the byte cap keeps big inputs in short ones.
_BURST = 64
_BURST_BYTES = 32 * 2**20  # ... at most this much input per burst


_BURST_SECONDS = 0.5  # with a cache: a burst's time, at most about
# ... and bursts only for a cache that writes its rows at most this often
_BURSTS_FLUSH_SECONDS = 1.0


def _burst_steps(spec: _Spec, size: int) -> int:
    """Steps per burst: up to ``_BURST``, as long as a burst's input fits ``_BURST_BYTES``.

    Two bursts are in flight at most, so a burst's input is bounded to keep the
    device memory they hold small (steps of large images go one by one).
    """
    return int(max(1, min(_BURST, _BURST_BYTES // max(1, _example_bytes(spec) * size))))


def _example_bytes(spec: _Spec) -> int:
    """Bytes of one example's input (every field)."""
    return sum(
        int(np.prod(s, dtype=np.int64)) * d.itemsize
        for s, d in zip(spec.shapes, spec.dtypes, strict=True)
    )


_READ_ROWS = 16384  # rows of finished steps read together (single process, no cache)


# The default step of per_example_losses: batches are merged up to this much input per step.
STEP_BYTES = 4 * 2**20
_MERGE_AT_MOST = 4  # ... and up to this many times the first batch's rows
_MAX_STEP_ROWS = 4096


def auto_step_rows(spec: _Spec) -> int:
    """Rows per step for throughput: the first batch's, merged up to about 4 MiB of input.

    .. math:: B = \\max\\bigl(b,\\ \\min(4b,\\ 4096,\\ 2^{\\lfloor \\log_2(
        \\text{4 MiB} / \\text{bytes per example}) \\rfloor})\\bigr)

    with ``b`` the first batch's rows. Each step has a fixed cost (dispatch,
    host bookkeeping, XLA's per-call work, about 20-50 µs on a CPU) that
    small steps of a cheap model pay often: an MLP pre-pass is about 15 %
    faster in steps of 1024 rows than of 256. The input's bytes stand in for
    the activations' (unknown before the one trace), so a step is never more
    than 4 times the batch the caller chose: a large model fed small batches
    for memory keeps steps close to them.
    """
    budget = STEP_BYTES // max(_example_bytes(spec), 1)
    rows = 1 << max(int(budget).bit_length() - 1, 0)  # a power of two <= the budget
    return max(spec.size, min(_MERGE_AT_MOST * spec.size, _MAX_STEP_ROWS, rows))


def _step_rows(spec: _Spec, batch_size) -> int:
    if batch_size is None:
        return spec.size
    if batch_size == "auto":
        return auto_step_rows(spec)
    return int(batch_size)


def _sub_batches(spec: _Spec, size: int, batch_size, mesh: Mesh) -> int:
    """How many sub-batches a step of ``size`` rows is computed in, one after another.

    On one CPU device, a step that the default rule (``"auto"``) merged from
    several batches of ``b`` rows runs them as ``size // b`` sub-batches of
    ``b`` rows inside its one program (``lax.scan``; the caller then rounds
    the step down to that many times ``b`` rows). The fixed cost of a step (dispatch, host
    bookkeeping, XLA's per-call work) is paid once for them, as for one big
    step, but each operation runs on ``b`` rows, as in the caller's batches:
    XLA's CPU kernels are no faster on more rows than that, and a conv net's
    activations of 4 times the rows fall out of the caches (measured side by
    side on 2 CPUs: a small CNN's forward is 1.5 % slower in steps of 1024 rows
    than of 256, and 0.3 % slower as 4 sub-batches of 256; an MLP's 12 %
    faster, and 11 % faster). With several devices or hosts, on an
    accelerator and with an explicit ``step_size``, a step is one batch of
    ``size`` rows (1, returned then).
    """
    if (
        batch_size != "auto"
        or mesh.devices.size != 1
        or mesh.devices.flat[0].platform != "cpu"
    ):
        return 1
    return max(1, size // spec.size)


def _padding_step(spec: _Spec, batch_size: int) -> _Step:
    shapes = zip(spec.shapes, spec.dtypes, strict=True)
    return _Step(
        [np.zeros((batch_size, *s), d) for s, d in shapes], np.zeros(0, np.int64)
    )


def _meta(ids: np.ndarray, size: int, me: int, state: int) -> np.ndarray:
    """Per row: id low and high int32 halves, owning process, state (real rows first)."""
    meta = np.zeros((size, 4), np.int32)
    meta[: len(ids), :2] = _ids_to_pairs(ids)
    meta[:, 2] = me
    meta[: len(ids), 3] = _REAL
    if state == _FAILED:
        meta[:, 3] = _FAILED
    return meta


def _global(x: np.ndarray, size: int, sharding: NamedSharding) -> jax.Array:
    """Multi-process: this process's rows of the global batch."""
    return jax.make_array_from_process_local_data(
        sharding, x, (size * jax.process_count(), *x.shape[1:])
    )


def _ids_to_pairs(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, np.int64).view(np.int32).reshape(-1, 2)


def _ids_from_pairs(pairs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pairs, np.int32).view(np.int64).reshape(-1)


def _allgather_rows(
    ids: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every process's rows ``(ids [n], values [n, ...])`` on every process.

    Ids travel as int32 pairs: exact without x64.
    """
    counts = np.asarray(
        multihost_utils.process_allgather(np.array([len(ids)], np.int32))
    ).reshape(-1)
    width = max(int(counts.max()), 1)
    pairs = np.zeros((width, 2), np.int32)
    pairs[: len(ids)] = _ids_to_pairs(ids)
    padded = np.zeros((width, *values.shape[1:]), np.float32)
    padded[: len(ids)] = values
    all_pairs = np.asarray(multihost_utils.process_allgather(pairs))
    all_values = np.asarray(multihost_utils.process_allgather(padded))
    return (
        np.concatenate(
            [_ids_from_pairs(all_pairs[p, :c]) for p, c in enumerate(counts)]
        ),
        np.concatenate([all_values[p, :c] for p, c in enumerate(counts)]),
    )
