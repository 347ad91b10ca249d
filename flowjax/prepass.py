"""The pre-pass: every fine-tuning example's loss under the frozen pre-trained model.

FLOW needs ``f_i(θ*)`` for every fine-tuning example once, before training.
:func:`per_example_losses` computes it exactly, with one compiled program for
the whole data set, sharded over all devices and hosts, keyed by example id,
and resumable after a kill.

How it works (one process's view):

1. The first batch fixes the per-process batch size ``B`` (rounded up so that
   the global batch ``B × process_count`` divides the mesh's ``'data'`` axis)
   and the example structure. Larger batches are split; smaller ones (the
   ragged last batch, or a batch partly served from the cache) are padded to
   ``B`` by repeating a real row and dropped from the result. So the program
   is traced and compiled once.
2. The batch axis is sharded over ``'data'``; the losses come back replicated
   (``out_shardings=P()``), so every process can read every row.
3. Single process: numpy batches go straight into the jitted step, and the
   host keeps each step's ids. Multi-process: each process feeds only its own
   examples through ``jax.make_array_from_process_local_data``, and every row
   carries ``(id as two int32 halves, owning process, valid)`` through the
   step, so the replicated output tells every process every row's id: the
   complete table everywhere, exact, no duplicates, no hand-written
   collectives. Ids stay exact int64 without ``jax_enable_x64``.
4. Results are read a few steps behind dispatch, so the device never waits for
   the host. A process that runs out of data feeds padding until a step has no
   valid row on any process; then all processes stop together.
5. With ``cache_dir``, each process appends the rows it fed to its own cache
   every ``flush_seconds``. On a restart, examples whose ids are cached with
   the same data digest are skipped (not recomputed; see ``flowjax._cache``
   for what the cache checks), and the cached rows of all processes are
   shared with one ``process_allgather`` at the end.

The machinery (``_per_example_values``) handles per-example outputs of any
fixed shape, not only scalars, and takes the batch layout up front when the
caller knows it: :func:`flowjax.lm_sequence_losses` and
:func:`flowjax.lm_token_losses` run it once per bucket length ``T``, with
scalar outputs and outputs ``[2, T - 1]`` (token NLLs and target mask).
"""

from __future__ import annotations

import collections
import functools
import itertools
import weakref
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from flowjax import _cache, _checks
from flowjax._types import Batches, Params, PerExampleLoss
from flowjax.tables import LossTable

__all__ = ["default_mesh", "per_example_losses"]

_ID = "id"
# Steps dispatched ahead of the one being read, so the device never waits for the host.
_IN_FLIGHT = 3


def default_mesh() -> Mesh:
    """A 1-D mesh with axis ``'data'`` over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def per_example_losses(
    loss_fn: PerExampleLoss,
    params: Params,
    batches: Batches,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    param_shardings: Any = None,
    total: int | None = None,
    flush_seconds: float = _cache.FLUSH_SECONDS,
) -> LossTable:
    """Computes ``f_i(θ*)`` for every example: FLOW's one inference pass.

    .. math:: \\ell_i = \\mathrm{loss\\_fn}(\\theta^*, x_i) \\quad\\text{for every example } i

    ``loss_fn`` is written for ONE example and batched with ``jax.vmap``; the
    batched function is jitted once and traced once for the whole data set
    (later calls with the same ``loss_fn`` and shapes reuse the compiled step).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``. ``example`` is the
        batch's pytree without its ``"id"`` field and without the batch axis.
        A frozen model goes in through ``params`` (e.g. the state of
        ``nnx.split``), not as a closed-over constant.
      params: the frozen pre-trained parameters (any pytree of arrays).
      batches: an iterable of dict batches of host (numpy) arrays. Each has an
        integer ``"id"`` array of stable, unique example ids and fields with a
        leading batch axis of the same length. The first batch fixes the batch
        size and the per-example shapes; every batch must have the same
        structure, shapes and dtypes. In a multi-host run each process passes
        its own examples.
      mesh: a ``jax.sharding.Mesh`` with a ``'data'`` axis; the batch axis is
        sharded over it (other axes replicate the batch). Default: a 1-D mesh
        over all devices.
      progress: show a progress bar (examples done, examples/s) on process 0.
      cache_dir: a directory for incremental results. A pre-pass killed
        part-way and started again skips the examples already done and
        returns the same table as an uninterrupted run. A cached row is served
        only for the same program (a hash of the lowered batched step: the
        function's code, closed-over values, partial arguments, model code,
        shapes and mesh), the same parameter bytes and the same example data
        (each row stores a digest of its example; a changed example under an
        old id is recomputed); another program or other parameters raise
        before anything is computed. Resume with the same number of
        processes: each process reads its own cache. Over
        ``flowjax.batches`` of an :class:`flowjax.ArraySource`, cached examples
        are not even read (see :func:`flowjax.batches`).
      param_shardings: optional shardings for ``params`` (a ``Sharding`` or a
        matching pytree). Default: replicated over ``mesh``.
      total: the number of examples, if known, for the progress bar's ETA.
      flush_seconds: with ``cache_dir``, finished rows are written at most
        this many seconds apart (and when the pass ends or fails); a row is
        durable once written, so a kill loses at most this much work. ``0``
        writes after every step.

    Returns:
      A :class:`flowjax.LossTable` of every example fed by every process, on
      every process. Its attribute ``cached`` is the number of rows served
      from ``cache_dir`` instead of computed (``0`` without a cache).

    Raises:
      ValueError: no batches; a batch without integer ids; fields whose lengths
        differ from the ids'; a batch whose structure, shapes or dtypes differ
        from the first; duplicate ids (within a batch at once, across batches
        at the end); a ``loss_fn`` that does not return one scalar per example;
        NaN or infinite losses (naming the example ids); a mesh without a
        ``'data'`` axis; a ``cache_dir`` written by a different pre-pass, not
        writable, or with a truncated or corrupted manifest (naming the file);
        with ``cache_dir``, a negative or infinite ``flush_seconds``.

    Example:
      >>> import numpy as np, jax.numpy as jnp, flowjax
      >>> loss_fn = lambda w, ex: jnp.sum((ex["x"] @ w - ex["y"]) ** 2)
      >>> batches = [{"id": np.array([4, 2]), "x": np.ones((2, 3), np.float32), "y": np.zeros((2,), np.float32)},
      ...            {"id": np.array([9]), "x": 2 * np.ones((1, 3), np.float32), "y": np.zeros((1,), np.float32)}]
      >>> table = flowjax.per_example_losses(loss_fn, jnp.ones(3), batches, progress=False)
      >>> table.ids.tolist(), table.losses.tolist()
      ([2, 4, 9], [9.0, 9.0, 36.0])

      With a cache, a second run serves every row (``cached``) instead of computing it:

      >>> import tempfile
      >>> cache = tempfile.mkdtemp()
      >>> run = lambda: flowjax.per_example_losses(
      ...     loss_fn, jnp.ones(3), batches, progress=False, cache_dir=cache)
      >>> first, again = run(), run()
      >>> first.cached, again.cached, again == table
      (0, 3, True)
    """
    info: dict = {}
    ids, losses = _per_example_values(
        loss_fn,
        params,
        batches,
        mesh=mesh,
        progress=progress,
        cache_dir=cache_dir,
        param_shardings=param_shardings,
        total=total,
        flush_seconds=flush_seconds,
        info=info,
    )
    table = LossTable(ids, losses)
    table.cached = info["cached"]
    return table


def _nonfinite_losses(bad: np.ndarray, ids: np.ndarray, values: np.ndarray) -> str:
    return (
        f"loss_fn returned NaN or infinite losses for example {_checks.describe(bad, ids, values)}. "
        "flowjax never sets them to 0: fix the loss (a sequence with no target tokens gives 0/0) "
        "or leave those examples out of the fine-tuning set."
    )


def _per_example_values(
    fn,
    params: Params,
    batches: Batches,
    *,
    shape: tuple[int, ...] = (),
    spec: _Spec | None = None,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    param_shardings: Any = None,
    total: int | None = None,
    desc: str = "pre-pass",
    fn_name: str | None = None,
    nonfinite=_nonfinite_losses,
    flush_seconds: float = _cache.FLUSH_SECONDS,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The pre-pass machinery for per-example outputs of one fixed shape.

    ``fn(params, example)`` returns an array of ``shape`` for ONE example
    (``()`` for :func:`per_example_losses`); the result is ``(ids int64 [n],
    values float32 [n, *shape])`` of every example fed by every process, in no
    particular order (duplicates are the caller's to check).

    Args:
      spec: the batches' structure, when known without looking at a batch;
        then a process may feed no batch at all (it feeds padding in step
        with the others). Default: taken from the first non-empty batch.
      batch_size: per-process rows per step. Default: the first batch's.
      desc: the progress bar's label.
      fn_name: what the cache manifest records for ``fn`` (default: its name).
      nonfinite: ``nonfinite(bad_rows, ids, values) -> message`` for the
        ValueError raised when a row has a NaN or infinite value.
      info: a dict that receives ``"cached"``: the rows served from
        ``cache_dir`` (over all processes).
      (the rest as in :func:`per_example_losses`)
    """
    mesh = default_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; its axes are {mesh.axis_names}."
        )
    nproc, me = jax.process_count(), jax.process_index()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    cache = served = None
    # Opened before any batch is read: it may skip cached rows at the source.
    if cache_dir is not None:
        cache = _cache.PrepassCache(cache_dir, me, nproc, shape, flush_seconds)
        batches = cache.skip_at_source(batches)
    it = iter(batches)
    if spec is None:
        # The first non-empty batch fixes the batch size (an empty one cannot).
        first = next((b for b in it if _rows(b) != 0), None)
        if first is None:
            where = (
                f" on process {me} (every process needs at least one batch)"
                if nproc > 1
                else ""
            )
            raise ValueError(f"batches is empty{where}: there is nothing to compute.")
        spec = _Spec.from_batch(first)
        it = itertools.chain([first], it)
    if batch_size is not None:
        spec = spec._replace(size=batch_size)
    batch_size = _agree_batch_size(spec, mesh.shape["data"], nproc)
    global_batch = batch_size * nproc

    params = _place_params(
        params, replicated if param_shardings is None else param_shardings
    )
    step = _make_step(fn, global_batch, mesh, nproc > 1, shape)

    if cache is not None:
        # The step's arguments as it will be called (numpy batches carry no sharding),
        # so that lowering it for the manifest traces it for the first step too.
        where = {"sharding": data_sharding} if nproc > 1 else {}
        rows = [
            jax.ShapeDtypeStruct((global_batch, *s), d, **where)
            for s, d in zip(spec.shapes, spec.dtypes, strict=True)
        ]
        meta = jax.ShapeDtypeStruct((global_batch, 4), np.int32, **where)
        args = (params, rows, *([meta] if nproc > 1 else []), spec.treedef)
        manifest = _cache.manifest(
            name=_describe_fn(fn) if fn_name is None else fn_name,
            params=params,
            spec=spec.describe(),
            mesh=mesh,
            shape=shape,
        )
        cache.check(manifest, step, *args)
        served = cache.served

    bar = tqdm(
        total=total,
        unit="ex",
        unit_scale=True,
        desc=desc,
        disable=not progress or me != 0,
        dynamic_ncols=True,
    )
    if served is not None:
        bar.update(served.count)  # skipped at the source
    found_ids: list[np.ndarray] = []
    found_values: list[np.ndarray] = []

    def read(out, ids: np.ndarray) -> int:
        """Reads one finished step: checks, records, caches. Returns its global count of real rows."""
        if nproc == 1:
            values = np.asarray(out)[: len(ids)]
            mine = slice(None)
        else:
            meta, values, _ = (np.asarray(x) for x in out)
            real = meta[:, 3] == 1
            ids, values = _ids_from_pairs(meta[real, :2]), values[real]
            mine = meta[real, 2] == me
        bad = ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
        if bad.any():
            if cache is not None:
                cache.flush()
            raise ValueError(nonfinite(bad, ids, values))
        found_ids.append(ids)
        found_values.append(values)
        if cache is not None:
            cache.add(ids[mine], values[mine])
        bar.update(len(ids))
        return len(ids)

    steps = _local_steps(it, spec, batch_size, served, bar)
    padding = None  # multi-process only: what a process with no data left feeds
    in_flight: collections.deque = collections.deque()  # dispatched, not yet read
    try:
        while True:
            item = next(steps, None)
            if item is None:
                if nproc == 1:
                    break
                padding = padding or _padding_step(spec, batch_size)
                item = padding  # keep in step with the processes that still have data
            if nproc == 1:
                # numpy straight into jit: its C++ path places the batch fastest
                out = step(params, item.leaves, spec.treedef)
            else:
                out = step(
                    params, *_put(item, batch_size, me, data_sharding), spec.treedef
                )
            in_flight.append((out, item.ids))
            # Once a step is all padding everywhere, every later one is too: stop together.
            if len(in_flight) > _IN_FLIGHT and read(*in_flight.popleft()) == 0:
                break
        while nproc == 1 and in_flight:
            read(*in_flight.popleft())
    finally:
        if cache is not None:
            cache.flush()
        bar.close()

    ids, values = found_ids, found_values
    if served is not None:
        s_ids, s_values = served.used()
        if nproc > 1:
            s_ids, s_values = _allgather_rows(s_ids, s_values)
        ids, values = [*ids, s_ids], [*values, s_values]
    if info is not None:
        info["cached"] = 0 if served is None else len(s_ids)
    return (
        np.concatenate([np.zeros(0, np.int64), *ids]),
        np.concatenate([np.zeros((0, *shape), np.float32), *values]),
    )


# Jitted steps per loss_fn, so later passes with the same loss_fn and shapes reuse the
# compiled program. Weakly keyed: a step dies with its loss_fn.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_step(
    loss_fn: PerExampleLoss,
    global_batch: int,
    mesh: Mesh,
    multiprocess: bool,
    shape: tuple[int, ...] = (),
):
    """The jitted step: the vmapped outputs (each of ``shape``) of one fixed-shape global batch.

    Single process: ``step(params, leaves, treedef) -> losses``; the host keeps
    the ids. Multi-process: ``step(params, leaves, meta, treedef) -> (meta,
    losses, n_real)``, all replicated, so every process learns every row's id
    and sees when no process has data left.
    """
    try:
        per_fn = _STEPS.setdefault(loss_fn, {})
    except TypeError:  # not weak-referenceable: compile for this call only
        per_fn = {}
    key = (global_batch, mesh, multiprocess, shape)
    if key in per_fn:
        return per_fn[key]
    fn_ref = _ref(loss_fn)  # the cached step must not keep its own key alive
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def losses_of(params, leaves, treedef):
        example = jax.tree.unflatten(treedef, leaves)
        losses = jax.vmap(fn_ref(), in_axes=(None, 0))(params, example)
        if not isinstance(losses, jax.Array) or losses.shape != (global_batch, *shape):
            what = "ONE scalar" if not shape else f"an array of shape {shape}"
            raise ValueError(
                f"loss_fn must return {what} per example; vmapped over the batch it returned "
                f"{getattr(losses, 'shape', type(losses))} instead of {(global_batch, *shape)}."
            )
        return losses.astype(jnp.float32)

    if multiprocess:

        def step(params, leaves, meta, treedef):
            return meta, losses_of(params, leaves, treedef), jnp.sum(meta[:, 3])

        shardings = {
            "in_shardings": (None, data, data),
            "out_shardings": (replicated,) * 3,
        }
    else:
        step = losses_of
        shardings = {"in_shardings": (None, data), "out_shardings": replicated}
    # None: params keep the sharding they were placed with.
    per_fn[key] = jax.jit(step, static_argnames="treedef", **shardings)
    return per_fn[key]


def _ref(fn):
    try:
        return weakref.ref(fn)
    except TypeError:
        return lambda: fn


class _Spec(NamedTuple):
    """The structure, per-example shapes and dtypes every batch must have."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    size: int  # rows in the first batch
    flat_keys: tuple[str, ...] | None  # the leaves' keys when batches are flat dicts

    @classmethod
    def from_batch(cls, batch) -> _Spec:
        ids, leaves, treedef = _split(batch)
        dtypes = tuple(np.dtype(jax.dtypes.canonicalize_dtype(x.dtype)) for x in leaves)
        rest = {k: 0 for k in batch if k != _ID}
        flat = jax.tree.structure(rest) == treedef
        keys = tuple(jax.tree.unflatten(treedef, range(len(leaves)))) if flat else None
        return cls(treedef, tuple(x.shape[1:] for x in leaves), dtypes, len(ids), keys)

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
                f"a batch has structure {treedef}; the first batch had {self.treedef}."
            )
        for i, (x, shape, dtype) in enumerate(
            zip(leaves, self.shapes, self.dtypes, strict=True)
        ):
            if x.shape[1:] != shape:
                raise ValueError(
                    f"field {_leaf_name(treedef, i)} has per-example shape {x.shape[1:]}; the first "
                    f"batch had {shape}. Pad sequences to one fixed length so the pre-pass compiles once."
                )
            if x.dtype != dtype:
                leaves[i] = _to_dtype(x, dtype, _leaf_name(treedef, i))
        return ids, leaves

    def _check_flat(self, batch) -> tuple[np.ndarray, list[np.ndarray]] | None:
        """The hot path for the usual batch: a flat dict exactly like the first one.

        Returns None (so that ``check`` validates and explains) on anything else.
        """
        if (
            self.flat_keys is None
            or type(batch) is not dict
            or len(batch) != len(self.flat_keys) + 1
        ):
            return None
        try:
            ids = batch[_ID]
            leaves = [batch[k] for k in self.flat_keys]
        except KeyError:
            return None
        if not (type(ids) is np.ndarray and ids.dtype == np.int64 and ids.ndim == 1):
            return None
        n = len(ids)
        for x, shape, dtype in zip(leaves, self.shapes, self.dtypes, strict=True):
            if (
                type(x) is not np.ndarray
                or x.dtype != dtype
                or x.shape[1:] != shape
                or x.shape[0] != n
            ):
                return None
        return ids, leaves


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
                f"field {_leaf_name(treedef, i)} has {rows} rows but the batch has {len(ids)} ids: "
                "every field needs a leading batch axis of the same length."
            )
    return ids, leaves, treedef


def _leaf_name(treedef, i: int) -> str:
    skeleton = jax.tree.unflatten(treedef, range(treedef.num_leaves))
    return jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(skeleton)[0][i][0])


def _to_dtype(x: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """Casts to the first batch's (canonical) dtype; refuses lossy kind changes or overflow."""
    if x.dtype.kind in "iu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise ValueError(
                f"field {name} has values outside {dtype}; enable jax_enable_x64 or use smaller values."
            )
    elif x.dtype.kind != dtype.kind:
        raise ValueError(
            f"field {name} has dtype {x.dtype}; the first batch had {dtype}."
        )
    return x.astype(dtype)


def _agree_batch_size(spec: _Spec, data_size: int, nproc: int) -> int:
    """The per-process batch size: the first batch's, agreed across processes, divisible over 'data'."""
    size = spec.size
    if nproc > 1:
        crc = zlib.crc32(spec.describe().encode()) & 0x7FFFFFFF
        agreed = np.asarray(
            multihost_utils.process_allgather(np.array([size, crc], np.int32))
        )
        if len(set(agreed[:, 1].tolist())) != 1:
            raise ValueError(
                "processes feed batches of different structure, shapes or dtypes; they must agree."
            )
        size = int(agreed[:, 0].max())
    while (size * nproc) % data_size:
        size += 1
    return size


def _place_params(params, shardings):
    """Puts params on the mesh once (replicated by default) so each step reads them in place."""

    def put(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
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


def _local_steps(batches, spec: _Spec, batch_size: int, served, bar) -> Iterator[_Step]:
    """This process's fixed-shape steps, skipping cached examples."""
    for k, batch in enumerate(batches):
        ids, leaves = spec.check(batch)
        if (
            k == 0 and len(ids) > 1
        ):  # fail fast on the first batch; the table checks them all
            _checks.check_unique(np.sort(ids), "ids within one batch")
        if served is not None:
            keep = served.take(ids, leaves)
            if not keep.all():
                bar.update(int((~keep).sum()))
                ids, leaves = ids[keep], [x[keep] for x in leaves]
        for start in range(0, len(ids), batch_size):
            stop = min(start + batch_size, len(ids))
            if stop - start == batch_size:
                chunk = [x[start:stop] for x in leaves]
            else:  # pad by repeating the last real row: valid inputs, dropped from the result
                index = np.minimum(np.arange(start, start + batch_size), stop - 1)
                chunk = [x[index] for x in leaves]
            yield _Step(chunk, ids[start:stop])


def _padding_step(spec: _Spec, batch_size: int) -> _Step:
    shapes = zip(spec.shapes, spec.dtypes, strict=True)
    return _Step(
        [np.zeros((batch_size, *s), d) for s, d in shapes], np.zeros(0, np.int64)
    )


def _put(item: _Step, batch_size: int, me: int, sharding: NamedSharding):
    """Multi-process: this process's part of the global batch, and its rows' metadata."""
    meta = np.zeros((batch_size, 4), np.int32)  # id low, id high, owning process, real
    meta[: len(item.ids), :2] = _ids_to_pairs(item.ids)
    meta[:, 2] = me
    meta[: len(item.ids), 3] = 1
    nproc = jax.process_count()

    def put(x):
        return jax.make_array_from_process_local_data(
            sharding, x, (batch_size * nproc, *x.shape[1:])
        )

    return [put(x) for x in item.leaves], put(meta)


def _ids_to_pairs(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, np.int64).view(np.int32).reshape(-1, 2)


def _ids_from_pairs(pairs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pairs, np.int32).view(np.int64).reshape(-1)


def _allgather_rows(
    ids: np.ndarray, losses: np.ndarray
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
    values = np.zeros((width, *losses.shape[1:]), np.float32)
    values[: len(ids)] = losses
    all_pairs = np.asarray(multihost_utils.process_allgather(pairs))
    all_values = np.asarray(multihost_utils.process_allgather(values))
    return (
        np.concatenate(
            [_ids_from_pairs(all_pairs[p, :c]) for p, c in enumerate(counts)]
        ),
        np.concatenate([all_values[p, :c] for p, c in enumerate(counts)]),
    )


def _describe_fn(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
