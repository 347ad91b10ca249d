"""A small input pipeline: batches of example-id-keyed numpy dicts from any random-access source.

:func:`batches` turns a random-access source into the batches flowjax's
pre-pass (:func:`flowjax.per_example_losses`) and training loops
(:func:`flowjax.attach_weights`) consume: dicts of numpy arrays with a leading
batch axis and an integer ``"id"`` array of stable example ids.

A source is anything with ``len(source)`` and ``source[i]`` returning one
record (a dict of array-likes):

* a TFDS data source (``tfds.data_source(name, split=...)`` or
  ``builder.as_data_source(split)``), which reads ``array_record`` files
  without TensorFlow;
* a grain ``MapDataset`` or any grain-style random-access source;
* a dict of numpy arrays (columns with a common leading axis), or an
  :class:`ArraySource` around one, which is gathered with fancy indexing
  instead of record by record.

Records are read one index at a time (``source[i]``), as grain does, so any
object with ``__len__``/``__getitem__`` works. Shuffling, sharding and
per-example randomness are pure functions of ``(seed, epoch, record index or
id)``: every process, every restart and every batch size sees the same thing.
"""

from __future__ import annotations

import copy
import itertools
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import xxhash

from flowjax import _cache, _checks, _host
from flowjax._types import ArrayLike

__all__ = ["ArraySource", "batches"]

_ID = "id"  # the key every batch carries, as the pre-pass expects

MapFn = Callable[[dict[str, np.ndarray], np.random.Generator], Mapping[str, Any]]


class ArraySource:
    """An in-memory random-access source: record ``i`` is ``{k: columns[k][i]}``.

    Use it for data that fits in memory, and to read a slow source (a TFDS
    data source decodes every record) once with :meth:`from_source` so that
    later epochs gather whole batches with fancy indexing. It is a valid
    grain source (``len`` and ``[]``).

    Args:
      columns: a mapping from field name to an array whose leading axis
        indexes records; every array has the same (non-zero) length. An
        integer ``"id"`` column, if present, holds the example ids.

    Returns:
      The source; ``len(source)`` records, ``source[i]`` a dict of numpy views,
      ``source.columns`` the (read-only) numpy columns.

    Raises:
      TypeError: ``columns`` is not a mapping, or a value is not an array
        (for instance a TFDS data source: pass one split).
      ValueError: no columns, columns of different lengths, zero records, a
        0-d column, or an ``"id"`` column that is not unique 1-D integers.

    Example:
      >>> import numpy as np, flowjax
      >>> src = flowjax.ArraySource({"x": np.arange(6.0).reshape(3, 2), "y": np.array([0, 1, 0])})
      >>> len(src), src[1]["x"].tolist(), int(src[1]["y"])
      (3, [2.0, 3.0], 1)
    """

    def __init__(self, columns: Mapping[str, ArrayLike]):
        if isinstance(columns, ArraySource):
            columns = columns.columns
        if not isinstance(columns, Mapping):
            raise TypeError(
                f"ArraySource needs a mapping of field name -> array; got {type(columns).__name__}."
            )
        if not columns:
            raise ValueError("ArraySource needs at least one column; got none.")
        cols = {}
        for k, v in columns.items():
            if not isinstance(k, str):
                raise TypeError(f"column names must be strings; got {k!r}.")
            if not isinstance(v, np.ndarray | jax.Array | list | tuple):
                raise TypeError(
                    f"column {k!r} is a {type(v).__name__}, not an array. A dict of data sources "
                    "(e.g. tfds.data_source(name) without split=) is not a source: pass one split."
                )
            arr = np.asarray(
                v
            ).view()  # a view: read-only here, the caller's array untouched
            if arr.ndim == 0:
                raise ValueError(
                    f"column {k!r} is 0-d; columns need a leading record axis."
                )
            arr.setflags(write=False)
            cols[k] = arr
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"columns have different lengths: {lengths}; every column needs one row per record."
            )
        if next(iter(lengths.values())) == 0:
            raise ValueError("the source is empty: it has no records.")
        if _ID in cols:
            ids = _checks.as_ids(cols[_ID], 'the "id" column').view()
            _checks.check_unique(np.sort(ids))
            ids.setflags(write=False)
            cols[_ID] = ids
        self._columns = cols
        self._len = next(iter(lengths.values()))

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """The read-only numpy columns (a new dict; the arrays are shared)."""
        return dict(self._columns)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = _index(index, self._len)
        return {k: v[i] for k, v in self._columns.items()}

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}: {v.dtype}{list(v.shape[1:])}" for k, v in self._columns.items()
        )
        return f"ArraySource(n={self._len}, {fields})"

    @classmethod
    def from_source(
        cls, source: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None
    ) -> ArraySource:
        """Reads every record of ``source`` once, in index order, into memory.

        Args:
          source: a random-access source of dict records (``len`` and ``[]``),
            e.g. a TFDS data source.
          fields: the record fields to keep (default: all of the first
            record's fields).

        Returns:
          An :class:`ArraySource` whose record ``i`` equals ``source[i]``
          (restricted to ``fields``) as numpy arrays.

        Raises:
          TypeError: ``source`` has no ``len``/``[]``, or a record is not a dict.
          ValueError: an empty source, a missing field, or records whose
            fields differ in shape or dtype.

        Example:
          >>> import numpy as np, flowjax
          >>> records = [{"x": np.full(2, i), "label": i % 2} for i in range(3)]
          >>> flowjax.ArraySource.from_source(records).columns["x"].tolist()
          [[0, 0], [1, 1], [2, 2]]
        """
        n = _source_len(source)
        records = [_record(source, i) for i in range(n)]
        names = list(records[0]) if fields is None else _check_fields(fields)
        examples = [_select(r, names, i) for i, r in enumerate(records)]
        return cls(_stack(examples, np.arange(n)))


def batches(
    source: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epochs: int | None = 1,
    drop_remainder: bool = False,
    map_fn: MapFn | None = None,
    fields: Sequence[str] | None = None,
    id_key: str | None = "id",
    shard: tuple[int, int] | None = None,
) -> _Batches:
    """Batches of a random-access source as dicts of numpy arrays with example ids.

    Each epoch visits an order :math:`\\pi_e` of the ``n`` records:
    :math:`\\pi_e = (0, \\dots, n-1)` without shuffling, or a permutation drawn
    from ``(seed, e)`` with ``shuffle=True`` (a new one every epoch, the same
    on every process and every run). With ``P`` processes, process ``p``
    reads the contiguous slice
    :math:`\\pi_e[\\lfloor pn/P \\rfloor : \\lfloor (p+1)n/P \\rfloor]`, so the
    processes partition the epoch. The slice is cut into batches of
    ``batch_size``; the last, smaller batch is kept (the pre-pass pads it).
    With ``drop_remainder=True`` every slice has
    :math:`\\lfloor n/P \\rfloor` records and its last partial batch is
    dropped, so every process takes the same number of full steps (without
    shuffling, the same records are left out every epoch).

    Records are read one at a time (``source[i]``). A TFDS data source
    decodes every record (a few thousand small records per second on one
    core): for data that fits in memory, read it once with
    :meth:`ArraySource.from_source` and batch that.

    Example ids (the batch's ``"id"``, int64): the record's ``id_key`` field
    when records have one (it must hold unique integers), otherwise the record
    index ``i`` in ``source`` (the global index, before shuffling and
    sharding, so it is stable across runs and processes). Ids are what FLOW's
    tables are keyed by, so they must not change between the pre-pass and
    training: use the same source (and the same ``id_key``) for both.

    ``map_fn(example, rng) -> example`` runs on one example at a time (a dict
    of its selected fields, without the id) with its own generator
    ``numpy.random.Generator(Philox(key=seed·2**64 + id mod 2**64,
    counter=[0, 0, 0, epoch]))``: augmentation depends only on
    ``(seed, epoch, id)``, whatever the batch size, shard or process count.

    Args:
      source: a TFDS data source, a grain ``MapDataset``, any object with
        ``len`` and ``[]`` returning dict records, a dict of numpy columns, or
        an :class:`ArraySource`.
      batch_size: examples per batch on this process (an int >= 1).
      shuffle: draw a new record order every epoch from ``(seed, epoch)``.
      seed: a non-negative int for shuffling and for ``map_fn``'s generators.
      epochs: passes over the data (an int >= 1), or ``None`` to repeat
        forever (then ``len()`` raises ``TypeError``).
      drop_remainder: drop each epoch's last partial batch, and equalise the
        processes' slices. Default ``False``: every example exactly once.
      map_fn: an optional per-example transform ``(example, rng) -> dict``;
        it may change fields, shapes and dtypes, but must return the same
        structure for every example and may not set ``"id"``.
      fields: the record fields to keep (default: every field but
        ``id_key``). A field named ``"id"`` may only be the id itself.
      id_key: the record field holding example ids; records without it get
        their record index. A key other than ``"id"`` must exist. ``None``:
        always use record indices.
      shard: ``(process_index, process_count)``; default
        ``(jax.process_index(), jax.process_count())``, so in a multi-host run
        each process reads only its own slice (initialise ``jax.distributed``
        first). Pass ``(0, 1)`` to read everything on every process.

    Returns:
      A re-iterable of batches: each iteration yields ``{"id": int64 [b],
      field: array [b, ...]}`` dicts from epoch 0 on (``b = batch_size``
      except perhaps each epoch's last batch). ``len()`` is the number of
      batches this process yields over all epochs; ``steps_per_epoch`` and
      ``examples_per_epoch`` give the per-epoch counts on this process. No
      progress bar: progress belongs to the consumer.

      ``from_batch(k)`` iterates from batch index ``k`` on (counted over
      epochs), yielding exactly the batches ``k, k + 1, ...`` of a full
      iteration without reading or mapping the first ``k``: the data
      position a resumed training run starts from (:func:`flowjax.fit` uses
      it).

      Resuming a pre-pass (:func:`flowjax.per_example_losses` with
      ``cache_dir``) uses two more methods so that cached examples are never
      read: ``cache_key()`` is a digest of everything the batches' data
      depends on, taken without building a batch (for an
      :class:`ArraySource`: the bytes of the columns it reads, ``fields``,
      ``id_key``, ``seed`` and ``map_fn``'s code, defaults, closure and the
      globals it names), or ``None`` when it cannot vouch for the data (a
      ``map_fn`` reaching an object with state, such as a tokenizer, or a
      source that is not in memory and does not declare its content). A
      source not in memory declares its content with a ``cache_key``
      attribute (a string, or a method returning one) that changes whenever
      any record does, e.g. a TFDS dataset's name, version and split; it is
      trusted, and used only when ids are record indices.
      ``skip(ids)`` returns the same batches without those ids
      (never those of the first batch, which the pre-pass reads to learn
      the batch layout and size), with ``skipped`` the ids it leaves out. The
      pre-pass skips a cached example only if the key it was computed under
      equals ``cache_key()``; otherwise the example is read and recomputed
      unless it was cached with a digest that still matches.
      ``key_hashes_data()`` says whether the key hashes every byte (columns
      in memory): then the cache stores no per-example digests (they would
      cost 5–8 % of a cheap model's pre-pass), so after any change of
      the data or ``map_fn`` every row is recomputed; batches of records on
      disk, and batches without a key, keep a digest per example and
      recompute only the changed ones. A ``map_fn`` whose output changes
      through something the key cannot see (a module attribute, a file it
      reads) needs a new ``cache_dir``.

    Raises:
      TypeError: a source without ``len``/``[]``, non-dict records, a
        non-callable ``map_fn`` or one returning a non-dict.
      ValueError: an empty source; ``batch_size`` < 1, ``epochs`` < 1, a
        negative ``seed``, or a bad ``shard``; ``drop_remainder`` leaving no
        batch; fields missing from a record; records (or ``map_fn``
        outputs) whose fields differ in shape, dtype or keys; non-integer or
        duplicate ids (duplicates within this process's first epoch; the
        pre-pass catches duplicates across processes).

    Example:
      >>> import numpy as np, flowjax
      >>> data = {"x": np.arange(10.0)[:, None], "label": np.arange(10) % 3}
      >>> stream = flowjax.batches(data, 4, shuffle=True, seed=0, epochs=2)
      >>> len(stream), [len(b["id"]) for b in stream]
      (6, [4, 4, 2, 4, 4, 2])
      >>> first = next(iter(stream))
      >>> sorted(first), first["id"].dtype
      (['id', 'label', 'x'], dtype('int64'))
      >>> bool((first["x"][:, 0] == first["id"]).all())  # no id column: ids are record indices
      True
      >>> def scale(example, rng):  # per-example, e.g. normalise and add noise
      ...     return {"x": example["x"] / 10 + rng.normal(scale=0.01), "label": example["label"]}
      >>> noisy = flowjax.batches(data, 4, map_fn=scale, seed=1, shard=(0, 1))
      >>> [b["x"].shape for b in noisy]
      [(4, 1), (4, 1), (2, 1)]
      >>> [b["id"].tolist() for b in stream.from_batch(4)] == [b["id"].tolist() for b in stream][4:]
      True
    """
    return _Batches(
        source,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epochs=epochs,
        drop_remainder=drop_remainder,
        map_fn=map_fn,
        fields=fields,
        id_key=id_key,
        shard=shard,
    )


class _Batches:
    """The re-iterable :func:`batches` returns (see there)."""

    # Every batch is made of new arrays (never one refilled in place): the pre-pass may
    # hold a few batches before it uses them.
    new_arrays = True

    def __init__(
        self,
        source,
        batch_size,
        *,
        shuffle,
        seed,
        epochs,
        drop_remainder,
        map_fn,
        fields,
        id_key,
        shard,
    ):
        _check_int(batch_size, "batch_size", 1)
        _check_int(seed, "seed", 0)
        if epochs is not None:
            _check_int(epochs, "epochs", 1)
        if map_fn is not None and not callable(map_fn):
            raise TypeError(f"map_fn must be callable; got {type(map_fn).__name__}.")
        if id_key is not None and not isinstance(id_key, str):
            raise TypeError(f"id_key must be a string or None; got {id_key!r}.")
        if isinstance(source, Mapping):
            source = ArraySource(source)
        n = _source_len(source)
        self._columns = source._columns if isinstance(source, ArraySource) else None
        present = (
            list(self._columns)
            if self._columns is not None
            else list(_record(source, 0))
        )
        self._has_id = id_key is not None and id_key in present
        if id_key is not None and id_key != _ID and not self._has_id:
            raise ValueError(
                f"id_key={id_key!r} is not a field of the records (fields: {sorted(present)})."
            )
        if fields is None:
            names = [k for k in present if k != id_key]
        else:
            names = _check_fields(fields)
            missing = [k for k in names if k not in present]
            if missing:
                raise ValueError(
                    f"fields {missing} are not in the records (fields: {sorted(present)})."
                )
        if _ID in names and id_key != _ID:
            raise ValueError(
                f'the records have a field "id" but ids come from '
                f"{'record indices' if id_key is None else repr(id_key)}: drop it with "
                'fields=[...] or use id_key="id".'
            )
        if self._has_id and self._columns is not None and id_key != _ID:
            ids = _checks.as_ids(self._columns[id_key], f"the {id_key!r} column")
            _checks.check_unique(np.sort(ids), f"ids (column {id_key!r})")

        index, count = _shard(shard)
        if drop_remainder:
            per = n // count
            lo, hi = index * per, (index + 1) * per
        else:
            lo, hi = index * n // count, (index + 1) * n // count
        local = hi - lo
        steps = local // batch_size if drop_remainder else -(-local // batch_size)
        if drop_remainder and steps == 0:
            raise ValueError(
                f"drop_remainder=True leaves no batch: {local} examples per process "
                f"({n} records over {count} processes) < batch_size={batch_size}."
            )
        self._source, self._n, self._lo, self._hi = source, n, lo, hi
        self._batch_size, self._shuffle, self._seed = batch_size, shuffle, seed
        self._epochs = epochs
        self._map_fn, self._names, self._id_key = map_fn, names, id_key
        self._drop_remainder, self._full_steps = drop_remainder, steps
        self._skip: np.ndarray | None = None  # sorted ids not to yield (see skip)
        self.skipped = np.zeros(0, np.int64)
        self.steps_per_epoch = steps
        self.examples_per_epoch = steps * batch_size if drop_remainder else local

    def key_hashes_data(self) -> bool:
        """Whether :meth:`cache_key` is a hash of every byte these batches are built from.

        True for columns in memory (with a ``map_fn`` that can be fingerprinted):
        a pre-pass cache then stores no per-example digests (see :func:`batches`).
        """
        if self._columns is None:
            return False
        return self._map_fn is None or _cache.fn_fingerprint(self._map_fn) is not None

    def cache_key(self) -> str | None:
        """A digest of all the data these batches yield, or None (see :func:`batches`)."""
        cols = self._columns
        declared = None
        if cols is None:  # records on disk: only a source that declares its content
            declared = getattr(self._source, "cache_key", None)
            declared = declared() if callable(declared) else declared
            if not isinstance(declared, str) or not declared or self._has_id:
                return None  # (ids read from the records are unknown without reading)
        map_key = None if self._map_fn is None else _cache.fn_fingerprint(self._map_fn)
        if self._map_fn is not None and map_key is None:
            return None
        h = xxhash.xxh3_128()  # a pass over the columns at about 20 GB/s
        config = (self._names, self._id_key, self._has_id, map_key, declared)
        h.update(repr(("flowjax.batches/2", *config, len(self._source))).encode())
        if self._map_fn is not None:
            h.update(repr(("seed", self._seed)).encode())
        if cols is not None:
            for name in [*self._names, *([self._id_key] if self._has_id else [])]:
                h.update(repr(name).encode())
                _cache.hash_array(h, cols[name])
        return h.hexdigest()

    def skip(self, ids) -> _Batches:
        """The same batches without the examples of ``ids`` (see :func:`batches`)."""
        mine = self._rows_of_epoch(0)
        mine_ids = self._ids_of(mine)
        drop = np.isin(mine_ids, _checks.as_ids(ids, "ids"))
        drop[: self._batch_size] = (
            False  # the first batch is read: it fixes the batch layout
        )
        out = copy.copy(self)
        out._skip = np.sort(mine_ids[drop])
        out.skipped = out._skip
        out.examples_per_epoch = len(mine) - int(drop.sum())
        out.steps_per_epoch = -(-out.examples_per_epoch // self._batch_size)
        return out

    def __len__(self) -> int:
        if self._epochs is None:
            raise TypeError("the batches repeat forever (epochs=None): no len().")
        return self._epochs * self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.from_batch(0)

    def from_batch(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches from batch index ``start`` on (see :func:`batches`)."""
        _check_int(start, "start", 0)
        return self._iter(start)

    def _iter(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        spec: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        seen: set[int] | None = set() if self._has_id else None
        per = self.steps_per_epoch
        first = start // per
        if self._epochs is None:
            epochs = itertools.count(first)
        else:
            epochs = range(first, self._epochs)
        for epoch in epochs:
            order = self._rows_of_epoch(epoch)
            if self._skip is not None:
                order = order[~np.isin(self._ids_of(order), self._skip)]
            for step in range(start - epoch * per if epoch == first else 0, per):
                rows = order[step * self._batch_size : (step + 1) * self._batch_size]
                batch = self._batch(rows, epoch)
                _check_spec(spec, batch)
                if epoch == 0 and seen is not None:
                    _check_new_ids(seen, batch[_ID])
                yield batch
            seen = None  # every id was checked in the first epoch

    def _rows_of_epoch(self, epoch: int) -> np.ndarray:
        """The records this process yields in ``epoch``, in order."""
        order = self._order(epoch)[self._lo : self._hi]
        if self._drop_remainder:
            order = order[: self._full_steps * self._batch_size]
        return order

    def _ids_of(self, rows: np.ndarray) -> np.ndarray:
        """The example ids of records ``rows``; only when known without reading them."""
        if not self._has_id:
            return rows
        if self._columns is None:
            raise TypeError(
                "the ids of this source are only known by reading its records"
            )
        return _checks.as_ids(self._columns[self._id_key][rows], "ids")

    def _order(self, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(self._n, dtype=np.int64)
        return _order_rng(self._seed, epoch).permutation(self._n).astype(np.int64)

    def _batch(self, rows: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        cols = self._columns
        if cols is not None:
            ids = cols[self._id_key][rows] if self._has_id else rows
            ids = _checks.as_ids(ids, "ids")
            if self._map_fn is None:  # the fast path: gather whole columns (aligned)
                return {_ID: ids, **{k: _host.take(cols[k], rows) for k in self._names}}
            examples = [{k: cols[k][r] for k in self._names} for r in rows]
        else:
            records = [_record(self._source, int(r)) for r in rows]
            if self._has_id:
                ids = _record_ids(records, self._id_key, rows)
            else:
                ids = rows
            examples = [
                _select(rec, self._names, r)
                for rec, r in zip(records, rows, strict=True)
            ]
        if self._map_fn is not None:
            examples = [
                self._map(ex, epoch, int(i))
                for ex, i in zip(examples, ids, strict=True)
            ]
        return {_ID: np.asarray(ids, np.int64), **_stack(examples, ids)}

    def _map(self, example: dict, epoch: int, id_: int) -> dict:
        rng = _example_rng(self._seed, epoch, id_)
        out = self._map_fn(example, rng)
        if not isinstance(out, Mapping):
            raise TypeError(
                f"map_fn must return a dict of fields; for id {id_} it returned {type(out).__name__}."
            )
        if _ID in out:
            raise ValueError(
                'map_fn may not set "id": ids come from the source, so weights stay attached '
                "to the right example."
            )
        return dict(out)


def _order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch ``epoch``'s record order."""
    words = [seed & 0xFFFFFFFF, seed >> 32, epoch & 0xFFFFFFFF, epoch >> 32]
    return np.random.default_rng(np.random.SeedSequence(words))


def _example_rng(seed: int, epoch: int, id_: int) -> np.random.Generator:
    """One example's generator: counter-based Philox keyed by ``(seed, id)``, epoch in the counter.

    Distinct ``(seed, id)`` give distinct 128-bit keys (independent streams); the
    epoch sits in the counter's top word, so epochs would overlap only after
    2**192 draws. About twice as fast to build as ``default_rng(SeedSequence)``.
    """
    key = (seed << 64) | (id_ % 2**64)  # ids may be negative int64
    return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, 0, epoch]))


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}.")
    if value >= 2**64:
        raise ValueError(f"{name} must be < 2**64; got {value}.")


def _shard(shard) -> tuple[int, int]:
    if shard is None:
        return jax.process_index(), jax.process_count()
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(
            f"shard must be (process_index, process_count); got {shard!r}."
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"shard must satisfy 0 <= process_index < process_count; got {shard!r}."
        )
    return index, count


def _check_fields(fields) -> list[str]:
    if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
        raise ValueError(f"fields must be a list of field names; got {fields!r}.")
    names = list(fields)
    if not names:
        raise ValueError("fields is empty: select at least one field.")
    if len(set(names)) != len(names):
        raise ValueError(f"fields has repeats: {names}.")
    return names


def _source_len(source) -> int:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            f"a source needs len() and [] (random access); got {type(source).__name__}. "
            "Wrap an iterable with flowjax.ArraySource or build a TFDS/grain data source."
        )
    n = len(source)
    if n == 0:
        raise ValueError("the source is empty: it has no records.")
    return n


def _index(index, n: int) -> int:
    try:
        i = index.__index__()
    except AttributeError:
        raise TypeError(f"record indices must be ints; got {index!r}.") from None
    if not -n <= i < n:
        raise IndexError(f"record index {i} out of range for {n} records.")
    return i % n


def _record(source, i: int) -> Mapping[str, Any]:
    rec = source[i]
    if not isinstance(rec, Mapping):
        raise TypeError(
            f"records must be dicts of arrays; record {i} is a {type(rec).__name__}."
        )
    return rec


def _select(record: Mapping, names: list[str], index) -> dict[str, Any]:
    try:
        return {k: record[k] for k in names}
    except KeyError:
        missing = [k for k in names if k not in record]
        raise ValueError(
            f"record {int(index)} lacks fields {missing} (it has {sorted(record)})."
        ) from None


def _record_ids(records, key: str, rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(records), np.int64)
    for j, (rec, r) in enumerate(zip(records, rows, strict=True)):
        if key not in rec:
            raise ValueError(
                f"record {int(r)} has no {key!r} field but earlier records do: ids must not mix."
            )
        v = np.asarray(rec[key])
        if v.ndim != 0 or v.dtype.kind not in "iu":
            raise ValueError(
                f"record {int(r)} has {key!r} = {rec[key]!r} ({v.dtype}, shape {v.shape}); ids "
                "must be integer scalars. Use id_key=None (ids = record indices) and fields=[...] "
                f"without {key!r}."
            )
        out[j] = _checks.as_ids(v.reshape(1), f"the {key!r} field")[0]
    return out


def _stack(examples: list[Mapping], ids) -> dict[str, np.ndarray]:
    """Stacks examples field by field; names the first example that does not match the first."""
    ids = np.asarray(ids)
    names = list(examples[0])
    for j, ex in enumerate(examples):
        if set(ex) != set(names):
            raise ValueError(
                f"example id {int(ids[j])} has fields {sorted(ex)}; example id {int(ids[0])} "
                f"has {sorted(names)}: every example needs the same fields."
            )
    out = {}
    for name in names:
        values = [np.asarray(ex[name]) for ex in examples]
        first = values[0]
        if first.dtype == object:
            raise TypeError(
                f"field {name!r} of example id {int(ids[0])} is a {type(examples[0][name]).__name__}, "
                "not an array: flatten nested records in map_fn."
            )
        for j, v in enumerate(values):
            if v.shape != first.shape or v.dtype != first.dtype:
                raise ValueError(
                    f"field {name!r}: example id {int(ids[j])} has shape {v.shape} and dtype "
                    f"{v.dtype}, example id {int(ids[0])} has {first.shape} and {first.dtype}. "
                    "Batches need one shape and dtype per field: pad or cast in map_fn."
                )
        out[name] = np.stack(values)
    return out


def _check_spec(spec: dict, batch: dict[str, np.ndarray]) -> None:
    """Every batch has the first batch's fields, per-example shapes and dtypes."""
    now = {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
    if not spec:
        spec.update(now)
    elif now != spec:
        diff = {
            k: (spec.get(k), now.get(k))
            for k in set(spec) | set(now)
            if spec.get(k) != now.get(k)
        }
        raise ValueError(
            "a batch differs from the first in (per-example shape, dtype) of "
            f"{diff} (first, now) near ids {batch[_ID][:5].tolist()}. Every record needs "
            "the same fields, shapes and dtypes: pad or cast in map_fn."
        )


def _check_new_ids(seen: set[int], ids: np.ndarray) -> None:
    values = ids.tolist()
    fresh = set(values)
    if len(fresh) != len(values) or not seen.isdisjoint(fresh):
        dups = sorted(
            {v for v in values if v in seen} | {v for v in fresh if values.count(v) > 1}
        )
        raise ValueError(
            f"duplicate example ids {dups[:5]}: every example needs a unique id, since "
            "FLOW's losses and weights are keyed by id."
        )
    seen.update(fresh)
