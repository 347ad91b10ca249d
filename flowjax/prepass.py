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
   ``B`` by repeating a real row, with a validity bit. So the program is traced
   and compiled once.
2. Every row carries ``(id as two int32 halves, owning process, valid)``
   through the computation. Ids stay exact int64 without ``jax_enable_x64``.
3. The batch is placed with ``jax.make_array_from_process_local_data``:
   each process feeds only its own examples. The outputs are
   replicated (``out_shardings=P()``), so XLA all-gathers the step's losses and
   every process sees every row: the complete table everywhere, with no
   duplicates and no hand-written collectives.
4. Results are read one step behind dispatch, so the device never waits for
   the host. A process that runs out of data feeds padding until a step reports
   no valid row on any process; then all processes stop together.
5. With ``cache_dir``, each process appends the rows it fed to its own cache
   every few seconds. On a restart, examples whose ids are cached are skipped
   (not recomputed), and the cached rows of all processes are shared with one
   ``process_allgather`` at the end.
"""

from __future__ import annotations

import functools
import itertools
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
) -> LossTable:
    """Computes ``f_i(θ*)`` for every example: FLOW's one inference pass.

    .. math:: \\ell_i = \\mathrm{loss\\_fn}(\\theta^*, x_i) \\quad\\text{for every example } i

    ``loss_fn`` is written for ONE example and batched with ``jax.vmap``; the
    batched function is jitted once and traced once for the whole data set.

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
        part-way and started again with the same arguments skips the examples
        already done and returns the same table as an uninterrupted run. Use a
        new directory for a new model, loss or data layout (a mismatch is
        detected from the parameters' fingerprint and raises).
      param_shardings: optional shardings for ``params`` (a ``Sharding`` or a
        matching pytree). Default: replicated over ``mesh``.
      total: the number of examples, if known, for the progress bar's ETA.

    Returns:
      A :class:`flowjax.LossTable` of every example fed by every process, on
      every process.

    Raises:
      ValueError: no batches; a batch without integer ids; fields whose lengths
        differ from the ids'; a batch whose structure, shapes or dtypes differ
        from the first; duplicate ids (within a batch at once, across batches
        at the end); a ``loss_fn`` that does not return one scalar per example;
        NaN or infinite losses (naming the example ids); a mesh without a
        ``'data'`` axis; a ``cache_dir`` written by a different pre-pass.

    Example:
      >>> import numpy as np, jax.numpy as jnp, flowjax
      >>> loss_fn = lambda w, ex: jnp.sum((ex["x"] @ w - ex["y"]) ** 2)
      >>> batches = [{"id": np.array([4, 2]), "x": np.ones((2, 3), np.float32), "y": np.zeros((2,), np.float32)},
      ...            {"id": np.array([9]), "x": 2 * np.ones((1, 3), np.float32), "y": np.zeros((1,), np.float32)}]
      >>> table = flowjax.per_example_losses(loss_fn, jnp.ones(3), batches, progress=False)
      >>> table.ids.tolist(), table.losses.tolist()
      ([2, 4, 9], [9.0, 9.0, 36.0])
    """
    mesh = default_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; its axes are {mesh.axis_names}."
        )
    nproc, me = jax.process_count(), jax.process_index()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError(
            "batches is empty: there is nothing to compute"
            + (
                f" on process {me} (every process needs at least one batch)."
                if nproc > 1
                else "."
            )
        )
    spec = _Spec.from_batch(first)
    batch_size = _agree_batch_size(spec, mesh.shape["data"], nproc)

    params = _place_params(
        params, replicated if param_shardings is None else param_shardings
    )
    step = _make_step(loss_fn, batch_size * nproc, replicated)

    cache = served = None
    if cache_dir is not None:
        manifest = {
            "loss_fn": _describe_fn(loss_fn),
            "example_spec": spec.describe(),
            "params": _fingerprint(params, replicated),
        }
        cache = _cache.PrepassCache(cache_dir, me, nproc, manifest)
        served = _Served(*cache.load())

    bar = tqdm(
        total=total,
        unit="ex",
        unit_scale=True,
        desc="pre-pass",
        disable=not progress or me != 0,
        dynamic_ncols=True,
    )
    computed_ids: list[np.ndarray] = []
    computed_losses: list[np.ndarray] = []

    def handle(out) -> int:
        """Reads one finished step: checks, records, caches. Returns its global count of valid rows."""
        meta, losses, n_valid = (np.asarray(x) for x in out)
        valid = meta[:, 3] == 1
        ids = np.ascontiguousarray(meta[valid, :2]).view(np.int64).reshape(-1)
        losses = losses[valid]
        if not np.isfinite(losses).all():
            if cache is not None:
                cache.flush()
            raise ValueError(
                f"loss_fn returned NaN or infinite losses for example {_checks.describe(~np.isfinite(losses), ids, losses)}. "
                "flowjax never sets them to 0: fix the loss (a sequence with no target tokens gives 0/0) "
                "or leave those examples out of the fine-tuning set."
            )
        computed_ids.append(ids)
        computed_losses.append(losses)
        if cache is not None:
            mine = meta[valid, 2] == me
            cache.add(ids[mine], losses[mine])
        bar.update(int(n_valid))
        return int(n_valid)

    steps = _local_steps(
        itertools.chain([first], it), spec, batch_size, me, served, bar
    )
    padding = None
    pending = None
    try:
        while True:
            item = next(steps, None)
            if item is None:
                if nproc == 1:
                    break
                if padding is None:
                    padding = _padding_step(spec, batch_size, me)
                item = padding
            out = step(params, *_put(item, data_sharding, batch_size * nproc))
            if pending is not None and handle(pending) == 0:
                break  # Every process is out of data; `out` is padding everywhere.
            pending = out
        if nproc == 1 and pending is not None:
            handle(pending)
    finally:
        if cache is not None:
            cache.flush()
        bar.close()

    ids = np.concatenate([np.zeros(0, np.int64), *computed_ids])
    losses = np.concatenate([np.zeros(0, np.float32), *computed_losses])
    if served is not None:
        s_ids, s_losses = served.used()
        if nproc > 1:
            s_ids, s_losses = _allgather_rows(s_ids, s_losses)
        ids, losses = np.concatenate([ids, s_ids]), np.concatenate([losses, s_losses])
    return LossTable(ids, losses)


class _Spec(NamedTuple):
    """The structure, per-example shapes and dtypes every batch must have."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    size: int  # rows in the first batch

    @classmethod
    def from_batch(cls, batch) -> _Spec:
        ids, leaves, treedef = _split(batch)
        dtypes = tuple(np.dtype(jax.dtypes.canonicalize_dtype(x.dtype)) for x in leaves)
        return cls(treedef, tuple(x.shape[1:] for x in leaves), dtypes, len(ids))

    def describe(self) -> str:
        return f"{self.treedef}; shapes {list(self.shapes)}; dtypes {[d.str for d in self.dtypes]}"

    def check(self, batch) -> tuple[np.ndarray, list[np.ndarray]]:
        """Validated ``(ids, leaves)`` of a batch, leaves cast to the canonical dtypes."""
        ids, leaves, treedef = _split(batch)
        if treedef != self.treedef:
            raise ValueError(
                f"a batch has structure {treedef}; the first batch had {self.treedef}."
            )
        out = []
        for i, (x, shape, dtype) in enumerate(
            zip(leaves, self.shapes, self.dtypes, strict=True)
        ):
            if x.shape[1:] != shape:
                raise ValueError(
                    f"field {_leaf_name(self.treedef, i)} has per-example shape {x.shape[1:]}; the first batch "
                    f"had {shape}. Pad sequences to one fixed length so the pre-pass compiles once."
                )
            out.append(_to_dtype(x, dtype, _leaf_name(self.treedef, i)))
        return ids, out


def _split(batch) -> tuple[np.ndarray, list[np.ndarray], Any]:
    if not isinstance(batch, dict) or _ID not in batch:
        fields = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f'every batch must be a dict with an integer "id" array of example ids; got {fields}.'
        )
    ids = _checks.as_ids(batch[_ID], 'batch["id"]')
    rest = {k: v for k, v in batch.items() if k != _ID}
    leaves, treedef = jax.tree.flatten(rest)
    leaves = [np.asarray(x) for x in leaves]
    for i, x in enumerate(leaves):
        if x.ndim == 0 or x.shape[0] != len(ids):
            raise ValueError(
                f"field {_leaf_name(treedef, i)} has {x.shape[0] if x.ndim else 'no'} rows but the batch has "
                f"{len(ids)} ids: every field needs a leading batch axis of the same length."
            )
    return ids, leaves, treedef


def _leaf_name(treedef, i: int) -> str:
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(
            jax.tree.unflatten(treedef, range(treedef.num_leaves))
        )[0]
    ]
    return paths[i] if i < len(paths) else str(i)


def _to_dtype(x: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if x.dtype == dtype:
        return x
    if (
        np.issubdtype(x.dtype, np.integer)
        and np.issubdtype(dtype, np.integer)
        and x.size
    ):
        info = np.iinfo(dtype)
        if x.min() < info.min or x.max() > info.max:
            raise ValueError(
                f"field {name} has values outside {dtype}; enable jax_enable_x64 or use smaller values."
            )
    elif x.dtype.kind != dtype.kind and not (
        x.dtype.kind in "iu" and dtype.kind in "iu"
    ):
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
        if isinstance(x, jax.Array) and (x.sharding == s or not x.is_fully_addressable):
            return x if x.sharding == s else jax.device_put(x, s)
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        x = np.asarray(x)  # multi-host: every process holds the same host value
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), params)
    return jax.tree.map(put, params, shardings)


def _make_step(loss_fn: PerExampleLoss, global_batch: int, replicated: NamedSharding):
    def step(params, leaves, meta, treedef):
        example = jax.tree.unflatten(treedef, leaves)
        losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, example)
        if not isinstance(losses, jax.Array) or losses.shape != (global_batch,):
            raise ValueError(
                "loss_fn must return ONE scalar per example; vmapped over the batch it returned "
                f"{getattr(losses, 'shape', type(losses))} instead of ({global_batch},)."
            )
        return meta, losses.astype(jnp.float32), jnp.sum(meta[:, 3])

    jitted = jax.jit(
        step, static_argnums=3, out_shardings=(replicated, replicated, replicated)
    )
    return lambda params, leaves, meta, treedef: jitted(params, leaves, meta, treedef)


class _Step(NamedTuple):
    leaves: list[np.ndarray]
    meta: np.ndarray  # [B, 4] int32: id low, id high, owning process, valid
    treedef: Any


def _put(item: _Step, sharding: NamedSharding, global_batch: int):
    def put(x):
        return jax.make_array_from_process_local_data(
            sharding, x, (global_batch, *x.shape[1:])
        )

    return [put(x) for x in item.leaves], put(item.meta), item.treedef


def _meta(ids: np.ndarray, batch_size: int, owner: int) -> np.ndarray:
    meta = np.zeros((batch_size, 4), np.int32)
    meta[: len(ids), :2] = (
        np.ascontiguousarray(ids, np.int64).view(np.int32).reshape(-1, 2)
    )
    meta[:, 2] = owner
    meta[: len(ids), 3] = 1
    return meta


def _local_steps(
    batches, spec: _Spec, batch_size: int, me: int, served, bar
) -> Iterator[_Step]:
    """This process's fixed-shape steps, skipping cached examples."""
    for batch in batches:
        ids, leaves = spec.check(batch)
        if len(ids) > 1:
            _checks.check_unique(np.sort(ids), "ids within one batch")
        if served is not None:
            keep = served.take(ids)
            if not keep.all():
                bar.update(int((~keep).sum()))
                ids, leaves = ids[keep], [x[keep] for x in leaves]
        for start in range(0, len(ids), batch_size):
            stop = min(start + batch_size, len(ids))
            n = stop - start
            if n == batch_size:
                chunk = [x[start:stop] for x in leaves]
            else:  # pad by repeating the chunk's last real row: valid inputs, masked out
                index = np.minimum(np.arange(start, start + batch_size), stop - 1)
                chunk = [x[index] for x in leaves]
            yield _Step(chunk, _meta(ids[start:stop], batch_size, me), spec.treedef)


def _padding_step(spec: _Spec, batch_size: int, me: int) -> _Step:
    leaves = [
        np.zeros((batch_size, *s), d)
        for s, d in zip(spec.shapes, spec.dtypes, strict=True)
    ]
    return _Step(leaves, _meta(np.zeros(0, np.int64), batch_size, me), spec.treedef)


class _Served:
    """Cached rows of this process; remembers which ones this run's input asked for."""

    def __init__(self, ids: np.ndarray, losses: np.ndarray):
        self.ids, self.losses = ids, losses
        self._used: list[np.ndarray] = []

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Marks cached ids as used; returns the mask of ids still to compute."""
        if not len(self.ids):
            return np.ones(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        hit = self.ids[pos] == ids
        self._used.append(pos[hit])
        return ~hit

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        pos = np.concatenate([np.zeros(0, np.int64), *self._used])
        return self.ids[pos], self.losses[pos]


def _allgather_rows(
    ids: np.ndarray, losses: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every process's rows on every process (ids travel as int32 pairs: exact without x64)."""
    counts = np.asarray(
        multihost_utils.process_allgather(np.array([len(ids)], np.int32))
    ).reshape(-1)
    width = max(int(counts.max()), 1)
    pairs = np.zeros((width, 2), np.int32)
    pairs[: len(ids)] = (
        np.ascontiguousarray(ids, np.int64).view(np.int32).reshape(-1, 2)
    )
    vals = np.zeros(width, np.float32)
    vals[: len(ids)] = losses
    all_pairs = np.asarray(multihost_utils.process_allgather(pairs))
    all_vals = np.asarray(multihost_utils.process_allgather(vals))
    out_ids = [
        np.ascontiguousarray(all_pairs[p, :c]).view(np.int64).reshape(-1)
        for p, c in enumerate(counts)
    ]
    out_vals = [all_vals[p, :c] for p, c in enumerate(counts)]
    return np.concatenate(out_ids), np.concatenate(out_vals)


def _fingerprint(params, replicated: NamedSharding) -> list:
    """Per-leaf (path, shape, dtype, Σx, Σx², size): tells a cache which parameters wrote it."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [jnp.asarray(x) for _, x in flat]

    @functools.partial(jax.jit, out_shardings=replicated)
    def stats(leaves):
        return [
            jnp.stack(
                [
                    jnp.sum(x.astype(jnp.float32)),
                    jnp.sum(jnp.square(x.astype(jnp.float32))),
                ]
            )
            for x in leaves
        ]

    values = [np.asarray(s, np.float64) for s in stats(leaves)]
    return [
        [
            jax.tree_util.keystr(path),
            list(x.shape),
            str(x.dtype),
            float(s[0]),
            float(s[1]),
            int(x.size),
        ]
        for (path, _), x, s in zip(flat, leaves, values, strict=True)
    ]


def _describe_fn(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
