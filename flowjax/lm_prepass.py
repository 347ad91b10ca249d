"""The LM pre-pass: sequence and token losses of tokenised examples, compiled once per bucket.

Tokenised examples have many lengths; padding each batch to its own longest
example would compile a new program for almost every batch. Here examples are
padded to one of a few **bucket lengths** (:func:`bucket_batches`), so the
pre-pass compiles once per bucket:

* :func:`lm_sequence_losses`: the sequence loss (mean target-token NLL) of
  every example; returns a :class:`flowjax.LossTable` whose median is
  ``τ_seq``.
* :func:`lm_token_losses`: every target token's NLL, as a padded
  :class:`TokenLosses` array keyed by example id, for token-level FLOW with
  :func:`flowjax.token_flow_weights`.

Both run each bucket of length ``T`` on the machinery of
:func:`flowjax.per_example_losses` (a scalar per example for the sequence
pass, ``[2, T - 1]`` for the token pass): sharded over ``'data'``,
multi-process (a process need not hold examples of every bucket), traced once
per bucket, resumable with ``cache_dir``.

An example is a dict ``{"id": int, "tokens": int [L], "mask": bool [L]}``:
``tokens`` unpadded (prompt, response, EOS), ``mask`` True at the target
positions (see :func:`flowjax.response_mask`). ``logits_fn(params, tokens)``
maps ONE padded token sequence ``[T]`` to logits ``[T, V]`` (or, with
``batched=True``, a batch ``[B, T]`` to ``[B, T, V]``); the model must be
causal, so the right padding cannot change the logits of real positions.
"""

from __future__ import annotations

import bisect
import os
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flowjax import _cache, _checks, _engine, prepass
from flowjax import lm as _lm
from flowjax.tables import LossTable, TokenLosses, TokenWeights

__all__ = [
    "TokenLosses",
    "TokenWeights",
    "bucket_batches",
    "lm_sequence_losses",
    "lm_token_losses",
]

LogitsFn = Callable[[Any, jax.Array], jax.Array]
Example = Mapping[str, Any]


def bucket_batches(
    examples: Iterable[Example],
    bucket_lengths: Iterable[int],
    batch_size: int,
    *,
    pad_id: int = 0,
    on_empty: Literal["raise", "skip"] = "raise",
) -> Iterator[dict[str, np.ndarray]]:
    """Pads tokenised examples to the smallest bucket length that holds them, batch by bucket.

    .. math:: T(x) = \\min\\{b \\in \\text{bucket\\_lengths} : b \\ge \\mathrm{len}(x)\\}

    All examples are checked first (one pass; only references are kept), then
    batches are yielded bucket by bucket, shortest bucket first: every batch
    of a bucket has ``batch_size`` rows except possibly its last. A jitted
    function of these batches therefore compiles once per bucket (twice if the
    bucket's last batch is ragged and not padded by the consumer; the pre-pass
    functions pad it).

    Args:
      examples: dicts with an integer ``"id"``, ``"tokens"`` (1-D integers,
        unpadded) and ``"mask"`` (1-D booleans of the same length, True at
        target positions, False at position 0).
      bucket_lengths: the padded lengths to use, e.g. ``(128, 256, 512, 1024)``.
      batch_size: rows per batch.
      pad_id: the token that fills padding (never a target).
      on_empty: ``"raise"`` (default) on examples with no target token, or
        ``"skip"`` to leave them out. Such an example adds nothing to any
        training loss whatever its weight; leave it out of training too (its
        weight lookup by id would fail, which names it).

    Returns:
      An iterator of batches ``{"id": int64 [B], "tokens": int32 [B, T],
      "mask": bool [B, T]}`` (padding has mask False).

    Raises:
      ValueError: empty or non-positive ``bucket_lengths``, ``batch_size < 1``,
        an unknown ``on_empty``, a malformed example, an id seen before (at
        once, so an endless example stream fails within one pass: this loader
        repeats examples), an example longer than
        the longest bucket, a target at position 0, or (``on_empty="raise"``)
        examples with no target token; the message names the example ids.

    Example:
      >>> import numpy as np, flowjax
      >>> ex = [{"id": i, "tokens": np.arange(1, n + 1), "mask": np.arange(n) >= 1} for i, n in
      ...       [(0, 3), (1, 6), (2, 4), (3, 2)]]
      >>> [(b["id"].tolist(), b["tokens"].shape) for b in flowjax.bucket_batches(ex, [4, 8], 2)]
      [([0, 2], (2, 4)), ([3], (1, 4)), ([1], (1, 8))]
    """
    return _batches(
        _bucket_groups(examples, bucket_lengths, batch_size, on_empty),
        batch_size,
        pad_id,
    )


def _bucket_groups(
    examples: Iterable[Example],
    bucket_lengths: Iterable[int],
    batch_size: int,
    on_empty: str,
) -> dict[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Validated examples ``(id, tokens, mask)`` by bucket length, every bucket present, shortest first."""
    buckets = sorted({int(b) for b in bucket_lengths})
    if not buckets or buckets[0] < 2:
        raise ValueError(f"bucket_lengths must be integers >= 2; got {buckets}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    if on_empty not in ("raise", "skip"):
        raise ValueError(f'on_empty must be "raise" or "skip"; got {on_empty!r}.')
    groups: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {
        b: [] for b in buckets
    }
    too_long, first_target, empty = [], [], []
    seen: set[int] = set()
    for ex in examples:
        i, tokens, mask = _check_example(ex)
        if i in seen:  # as it arrives: an endless example stream must not run forever
            raise ValueError(
                _engine._duplicates(np.zeros(0, np.int64), np.array([i], np.int64))
            )
        seen.add(i)
        if len(tokens) > buckets[-1]:
            too_long.append((i, len(tokens)))
        elif mask[0]:
            first_target.append(i)
        elif not mask.any():
            empty.append(i)
        else:
            groups[buckets[bisect.bisect_left(buckets, len(tokens))]].append(
                (i, tokens, mask)
            )
    if too_long:
        raise ValueError(
            f"examples longer than the longest bucket {buckets[-1]}: (id, length) "
            f"{too_long[:5]}{' ...' if len(too_long) > 5 else ''}. Truncate them or add a bucket."
        )
    if first_target:
        raise ValueError(
            f"examples {first_target[:5]} have mask True at position 0: nothing predicts the first "
            "token, so it cannot be a target (keep BOS in the prompt)."
        )
    if empty and on_empty == "raise":
        raise ValueError(
            f"examples with no target token (ids {empty[:5]}{' ...' if len(empty) > 5 else ''}): their "
            'sequence loss is 0/0. Drop them (also from training), or pass on_empty="skip".'
        )
    return groups


def _check_example(ex) -> tuple[int, np.ndarray, np.ndarray]:
    if not isinstance(ex, Mapping) or not {"id", "tokens", "mask"} <= set(ex):
        got = sorted(ex) if isinstance(ex, Mapping) else type(ex).__name__
        raise ValueError(
            f'every example must be a dict with "id", "tokens" and "mask"; got {got}.'
        )
    i = ex["id"]
    if isinstance(i, bool) or not isinstance(i, int | np.integer):
        raise ValueError(f'example "id" must be an integer; got {i!r}.')
    tokens, mask = np.asarray(ex["tokens"]), np.asarray(ex["mask"])
    if tokens.ndim != 1 or mask.shape != tokens.shape or len(tokens) < 2:
        raise ValueError(
            f"example {i}: tokens and mask must be 1-D of one length >= 2; got {tokens.shape}, {mask.shape}."
        )
    if not np.issubdtype(tokens.dtype, np.integer) or mask.dtype != np.bool_:
        raise ValueError(
            f"example {i}: tokens must be integers and mask booleans; got {tokens.dtype}, {mask.dtype}."
        )
    return int(i), tokens, mask


def _batches(groups, batch_size: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    for length, rows in groups.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            tokens = np.full((len(chunk), length), pad_id, np.int32)
            mask = np.zeros((len(chunk), length), bool)
            for r, (_, t, m) in enumerate(chunk):
                tokens[r, : len(t)], mask[r, : len(m)] = t, m
            yield {
                "id": np.array([c[0] for c in chunk], np.int64),
                "tokens": tokens,
                "mask": mask,
            }


_PREPASS_KWARGS = frozenset({"mesh", "progress", "param_shardings", "flush_seconds"})

# One loss function / jitted step per logits_fn and form (per sequence or batched), so
# every call and bucket reuses them.
_SEQ_FNS: dict[bool, weakref.WeakKeyDictionary] = {
    False: weakref.WeakKeyDictionary(),
    True: weakref.WeakKeyDictionary(),
}
_TOK_FNS: dict[bool, weakref.WeakKeyDictionary] = {
    False: weakref.WeakKeyDictionary(),
    True: weakref.WeakKeyDictionary(),
}


def _per_fn(cache, logits_fn, make):
    try:
        if logits_fn not in cache:
            cache[logits_fn] = make(weakref.ref(logits_fn))
        return cache[logits_fn]
    except TypeError:  # not weak-referenceable: build for this call only
        return make(lambda: logits_fn)


def _make_sequence_loss(fn_ref):
    """``example`` is one sequence, or (a batched ``logits_fn``) a batch: the maths is per row."""

    def sequence_loss(params, example):
        logits = fn_ref()(params, example["tokens"])
        nll, mask = _lm.token_nll(logits, example["tokens"], example["mask"])
        # Empty sequences were refused or skipped upstream; NaN here is caught by the pre-pass.
        return _lm.sequence_nll(nll, mask, on_empty="nan")

    return sequence_loss


def _bucket_spec(length: int) -> _engine._Spec:
    """The structure of every batch of bucket ``length`` (known without seeing one)."""
    return _engine._Spec.from_batch(
        {
            "id": np.zeros(0, np.int64),
            "tokens": np.zeros((0, length), np.int32),
            "mask": np.zeros((0, length), bool),
        }
    )


def _global_counts(
    name: str,
    buckets: list[int],
    counts: list[int],
    batch_size: int,
    error: Exception | None,
) -> list[int]:
    """Examples per bucket over all processes; checks that the processes agree on the buckets.

    Multi-process: one exchange, so that an example one process refuses (or an
    iterator that raises) makes every process raise the same error.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return counts
    key = zlib.crc32(repr((buckets, batch_size)).encode()) & 0x7FFFFFFF
    keys, _ = _engine._exchange(name, np.array([key], np.int32), error)
    if len(set(keys[:, 0].tolist())) != 1:
        raise ValueError(
            "processes passed different bucket_lengths or batch_size; they must agree."
        )
    # The same buckets everywhere, so the same shape on every process.
    every = np.asarray(multihost_utils.process_allgather(np.array(counts, np.int64)))
    return every.reshape(-1, len(buckets)).sum(axis=0).tolist()


def _bucket_passes(
    loss_fn,
    logits_fn: LogitsFn,
    params: Any,
    examples: Iterable[Example],
    *,
    bucket_lengths: Iterable[int],
    batch_size: int,
    pad_id: int,
    on_empty: str,
    mesh: Mesh | None,
    progress: bool,
    cache_dir: str | None,
    param_shardings: Any,
    shape: Callable[[int], tuple[int, ...]],
    level: str,
    nonfinite: Callable[[np.ndarray, np.ndarray, np.ndarray], str],
    flush_seconds: float = _cache.FLUSH_SECONDS,
    batched: bool = False,
) -> tuple[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    """The pre-pass of every bucket some process holds examples of: ``(T_max, [(T, ids, values)])``.

    ``loss_fn(params, example)`` gives an array of ``shape(T)`` for one example
    of bucket ``T``. One allgather checks that the processes agree on the
    buckets and counts each bucket's examples over all of them; buckets empty
    everywhere are skipped, the others run on
    :func:`flowjax._engine.map_examples` with the batch layout given up
    front (a process without examples of a bucket feeds padding in step) and
    ``batch_size`` rows per step (one trace per bucket). Bucket ``T`` caches
    in ``cache_dir/bucket_T``, its manifest naming ``level`` and ``logits_fn``.
    """
    name = f"lm_{level}_losses"
    groups, error = {}, None
    try:
        groups = _bucket_groups(examples, bucket_lengths, batch_size, on_empty)
    except Exception as e:
        error = e
    buckets = list(groups)
    counts = _global_counts(
        name, buckets, [len(groups[b]) for b in buckets], batch_size, error
    )
    if not sum(counts):
        raise ValueError(
            "examples is empty (or every example was skipped): nothing to compute."
        )
    mesh = _engine.default_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; its axes are {mesh.axis_names}."
        )
    # Placed once here, so each bucket's pass finds them in place.
    replicated = NamedSharding(mesh, P())
    params = _engine._place_params(
        params, replicated if param_shardings is None else param_shardings
    )
    fn_name = f"{level}_nll of {prepass._describe_fn(logits_fn)}"
    if batched:
        fn_name += " (batched)"
    out = []
    ledger = _engine.IdLedger()  # ids across buckets: one fed by two processes raises
    for length, count in zip(buckets, counts, strict=True):
        if not count:  # no process holds an example of this length
            continue
        cache = (
            None if cache_dir is None else os.path.join(cache_dir, f"bucket_{length}")
        )
        ids, values, cached = _engine.map_examples(
            loss_fn,
            params,
            _batches({length: groups[length]}, batch_size, pad_id),
            name=name,
            shape=shape(length),
            batched=batched,
            spec=_bucket_spec(length),
            batch_size=batch_size,
            mesh=mesh,
            param_shardings=param_shardings,
            cache=prepass._PassCache.of(
                cache,
                loss_fn,
                mesh,
                shape=shape(length),
                fn_name=fn_name,
                flush_seconds=flush_seconds,
            ),
            ledger=ledger,
            progress=progress,
            total=count,
            desc=f"{level} pre-pass T={length}",
            nonfinite=nonfinite,
        )
        out.append((length, ids, values, cached))
    return buckets[-1], out


def _nonfinite_sequences(bad, ids, values) -> str:
    return (
        f"logits_fn gave NaN or infinite sequence losses for example "
        f"{_checks.describe(bad, ids, values)}. flowjax never sets them to 0: fix the model or "
        "leave those examples out."
    )


def lm_sequence_losses(
    logits_fn: LogitsFn,
    params: Any,
    examples: Iterable[Example],
    *,
    bucket_lengths: Iterable[int],
    batch_size: int,
    pad_id: int = 0,
    on_empty: Literal["raise", "skip"] = "raise",
    cache_dir: str | None = None,
    batched: bool = False,
    **prepass_kwargs: Any,
) -> LossTable:
    """Sequence-level pre-pass: every example's mean target-token NLL, keyed by id.

    .. math:: f_i(\\theta^*) = \\frac{1}{|R_i|} \\sum_{t \\in R_i} -\\log p_{\\theta^*}(x_{i,t} \\mid x_{i,<t})

    with :math:`R_i` the example's target positions (response and EOS): the
    official sequence loss, whose median is ``τ_seq``. Examples are bucketed
    with :func:`bucket_batches`, and each bucket goes through the machinery of
    :func:`flowjax.per_example_losses`: the batch axis is sharded over the
    mesh's ``'data'`` axis, every process of a multi-process run feeds its own
    examples and gets the complete table, and the per-example loss is traced
    once per bucket length (every step of a bucket has ``batch_size`` rows per
    process; short batches, including a bucket smaller than ``batch_size``,
    are padded and the copies dropped). A process need not hold examples of
    every bucket. Later calls with the same ``logits_fn`` reuse the compiled
    steps.

    Args:
      logits_fn: ``logits_fn(params, tokens [T]) -> logits [T, V]`` for one
        sequence; causal (right padding must not change real positions).
      params: the frozen pre-trained parameters (a jit argument, not a
        closure constant).
      examples: tokenised examples (see :func:`bucket_batches`); in a
        multi-process run, this process's examples.
      bucket_lengths: padded lengths, e.g. ``(256, 512, 1024)`` (the same on
        every process).
      batch_size: rows per step per process (the same on every process).
      pad_id: padding token.
      on_empty: ``"raise"`` or ``"skip"`` for examples with no target token.
      cache_dir: optional; bucket ``T`` is cached in ``cache_dir/bucket_T``,
        so a pre-pass killed part-way and started again with the same
        arguments (and number of processes) skips the examples already done
        and returns the same table (see :func:`flowjax.per_example_losses`).
        The cache records a hash of the compiled program (``logits_fn``'s
        code and constants), the parameters' bytes and each example's
        tokens: another model in the same ``cache_dir`` raises, a changed
        example is recomputed.
      batched: ``logits_fn(params, tokens [B, T]) -> logits [B, T, V]``
        takes a batch of sequences (a Flax model called on a batch; faster
        than vmapping a model written for batches over single sequences).
        Its rows must be independent, as in
        :func:`flowjax.per_example_losses` (checked on each bucket's first
        step).
      **prepass_kwargs: ``mesh`` (with a ``'data'`` axis; default all
        devices), ``progress`` (a progress bar per bucket on process 0;
        default True), ``param_shardings`` (default: replicated) and
        ``flush_seconds`` (how often cached rows are written; default 5), as
        in :func:`flowjax.per_example_losses`.

    Returns:
      A :class:`flowjax.LossTable` of every (not skipped) example of every
      process, on every process. Its attribute ``cached`` is the number of
      rows served from ``cache_dir`` instead of computed.

    Raises:
      ValueError: from :func:`bucket_batches` (malformed, too long or empty
        examples); NaN/inf sequence losses (naming the ids); duplicate ids
        (as they arrive: an example stream that repeats fails within one
        pass; also an id on two processes); no examples on any process;
        processes that disagree on ``bucket_lengths`` or ``batch_size``;
        anything :func:`flowjax.per_example_losses` raises for its shared
        arguments (``mesh``, ``cache_dir``, e.g. a cache written by another
        model). Multi-process, one process's bad input raises the same
        error on every process, naming that process.
      TypeError: a keyword argument other than those above.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, flowjax
      >>> logits_fn = lambda table, tokens: table[tokens]  # a bigram "model": [V, V] logits table
      >>> table = jnp.log(jnp.full((3, 3), 1 / 3))
      >>> ex = [{"id": 7, "tokens": np.array([0, 1, 2]), "mask": np.array([False, True, True])}]
      >>> losses = flowjax.lm_sequence_losses(logits_fn, table, ex, bucket_lengths=[4], batch_size=2,
      ...                                     progress=False)
      >>> losses.ids.tolist(), losses.losses.round(4).tolist()  # log 3
      ([7], [1.0986])
      >>> batched = flowjax.lm_sequence_losses(logits_fn, table, ex, bucket_lengths=[4],
      ...                                      batch_size=2, batched=True, progress=False)
      >>> batched == losses  # the table lookup works on [B, T] too
      True
    """
    unknown = sorted(set(prepass_kwargs) - _PREPASS_KWARGS)
    if unknown:
        raise TypeError(
            f"lm_sequence_losses got unexpected keyword arguments {unknown}; the pre-pass "
            f"takes {sorted(_PREPASS_KWARGS)} (it counts each bucket's examples itself)."
        )
    _, passes = _bucket_passes(
        _per_fn(_SEQ_FNS[bool(batched)], logits_fn, _make_sequence_loss),
        logits_fn,
        params,
        examples,
        bucket_lengths=bucket_lengths,
        batch_size=batch_size,
        pad_id=pad_id,
        on_empty=on_empty,
        mesh=prepass_kwargs.get("mesh"),
        progress=prepass_kwargs.get("progress", True),
        cache_dir=cache_dir,
        param_shardings=prepass_kwargs.get("param_shardings"),
        shape=lambda length: (),
        level="sequence",
        nonfinite=_nonfinite_sequences,
        flush_seconds=prepass_kwargs.get("flush_seconds", _cache.FLUSH_SECONDS),
        batched=bool(batched),
    )
    table = LossTable(  # sorts by id, refuses duplicates
        np.concatenate([ids for _, ids, _, _ in passes]),
        np.concatenate([values for _, _, values, _ in passes]),
    )
    table.cached = sum(cached for *_, cached in passes)  # rows served from cache_dir
    return table


def _make_token_loss(fn_ref):
    def token_loss(params, example):
        """``[..., 2, T - 1]``: target-token NLLs (0 elsewhere) and the target mask.

        Of ONE example, or of each row of a batch (a batched ``logits_fn``).
        """
        logits = fn_ref()(params, example["tokens"])
        nll, mask = _lm.token_nll(logits, example["tokens"], example["mask"])
        # token_nll selects with where: NaN at a non-target position becomes 0, at a target stays.
        return jnp.stack([nll, mask.astype(jnp.float32)], axis=-2)

    return token_loss


def _nonfinite_tokens(bad, ids, values) -> str:
    return (
        f"logits_fn gave NaN or infinite token losses at target positions for example "
        f"{_checks.describe(bad, ids)}. flowjax never sets them to 0: fix the model or leave "
        "those examples out."
    )


def lm_token_losses(
    logits_fn: LogitsFn,
    params: Any,
    examples: Iterable[Example],
    *,
    bucket_lengths: Iterable[int],
    batch_size: int,
    pad_id: int = 0,
    on_empty: Literal["raise", "skip"] = "raise",
    mesh: Mesh | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    param_shardings: Any = None,
    flush_seconds: float = _cache.FLUSH_SECONDS,
    batched: bool = False,
) -> TokenLosses:
    """Token-level pre-pass: the NLL of every target token of every example, keyed by id.

    .. math:: \\ell_{it} = -\\log p_{\\theta^*}(x_{i,t+1} \\mid x_{i,\\le t}), \\qquad t + 1 \\in R_i

    Examples are bucketed with :func:`bucket_batches`, and each bucket of
    length ``T`` goes through the same machinery as
    :func:`flowjax.per_example_losses`, with a per-example output of shape
    ``[T - 1]`` instead of a scalar: the batch axis is sharded over the mesh's
    ``'data'`` axis, every process of a multi-process run feeds its own
    examples and gets the complete table, a few steps are kept in flight, and
    the per-example function is traced once per bucket length (every step of
    a bucket has ``batch_size`` rows per process; short batches are padded and
    the copies dropped). A process need not hold examples of every bucket.

    The result is dense: ``losses`` and ``mask`` are ``[n, T_max - 1]`` host
    arrays (``T_max`` the longest bucket), 5 bytes per cell, e.g. 100k
    examples at ``T_max = 2048`` take about 1 GB of host memory however short
    most examples are (on every process). Feed the result to
    :func:`flowjax.token_flow_weights` (``τ_tok`` = median over all target
    tokens), or use :meth:`TokenLosses.flow_weights`.

    Args:
      logits_fn: ``logits_fn(params, tokens [T]) -> logits [T, V]``, causal.
      params: the frozen pre-trained parameters (a jit argument, not a
        closure constant).
      examples: tokenised examples (see :func:`bucket_batches`); in a
        multi-process run, this process's examples.
      bucket_lengths: padded lengths (the same on every process).
      batch_size: rows per step per process (the same on every process).
      pad_id: padding token.
      on_empty: ``"raise"`` or ``"skip"`` for examples with no target token.
      mesh: a mesh with a ``'data'`` axis (default: all devices), as in
        :func:`flowjax.per_example_losses`.
      progress: show a progress bar per bucket on process 0.
      cache_dir: optional; bucket ``T`` is cached in ``cache_dir/bucket_T``,
        so a pre-pass killed part-way and started again with the same
        arguments (and number of processes) skips the examples already done
        and returns the same table (see :func:`flowjax.per_example_losses`).
        Caches ``2 (T - 1)`` floats per example.
      param_shardings: optional shardings for ``params`` (default:
        replicated over ``mesh``).
      flush_seconds: with ``cache_dir``, cached rows are written at most this
        many seconds apart, as in :func:`flowjax.per_example_losses`.
      batched: ``logits_fn`` takes a batch ``[B, T]`` and returns ``[B, T,
        V]`` (rows independent), as in :func:`lm_sequence_losses`.

    Returns:
      A :class:`TokenLosses` sorted by id, of every (not skipped) example of
      every process (``.flow_weights()`` gives the token FLOW weights, looked
      up by id with ``.lookup``). Its attribute ``cached`` is the number of
      rows served from ``cache_dir`` instead of computed.

    Raises:
      ValueError: from :func:`bucket_batches`; NaN/inf token losses at target
        positions (naming the example ids; non-target positions are never
        read); duplicate ids (as they arrive: an example stream that repeats
        fails within one pass; also an id on two processes); no examples on
        any process; processes that disagree on ``bucket_lengths`` or
        ``batch_size``; anything :func:`flowjax.per_example_losses` raises
        for its shared arguments (``mesh``, ``cache_dir``). Multi-process,
        one process's bad input raises the same error on every process,
        naming that process.

    Example:
      >>> import jax.numpy as jnp, numpy as np, flowjax
      >>> logits_fn = lambda table, tokens: table[tokens]
      >>> table = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75]]))
      >>> ex = [{"id": 1, "tokens": np.array([0, 1, 0]), "mask": np.array([False, True, True])}]
      >>> tl = flowjax.lm_token_losses(logits_fn, table, ex, bucket_lengths=[4], batch_size=1,
      ...                              progress=False)
      >>> tl.losses.round(4).tolist(), tl.mask.tolist()  # -log 0.5, -log 0.25, padding
      ([[0.6931, 1.3863, 0.0]], [[True, True, False]])
    """
    longest, passes = _bucket_passes(
        _per_fn(_TOK_FNS[bool(batched)], logits_fn, _make_token_loss),
        logits_fn,
        params,
        examples,
        bucket_lengths=bucket_lengths,
        batch_size=batch_size,
        pad_id=pad_id,
        on_empty=on_empty,
        mesh=mesh,
        progress=progress,
        cache_dir=cache_dir,
        param_shardings=param_shardings,
        shape=lambda length: (2, length - 1),
        level="token",
        nonfinite=_nonfinite_tokens,
        flush_seconds=flush_seconds,
        batched=bool(batched),
    )
    width = longest - 1
    ids, losses, masks = [], [], []
    for length, got, values, _ in passes:
        pad = ((0, 0), (0, width - (length - 1)))
        ids.append(got)
        losses.append(np.pad(values[:, 0], pad))
        masks.append(np.pad(values[:, 1] == 1, pad))
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    all_ids = all_ids[order]
    _checks.check_unique(all_ids)
    table = TokenLosses(
        all_ids, np.concatenate(losses)[order], np.concatenate(masks)[order]
    )
    table.cached = sum(cached for *_, cached in passes)  # rows served from cache_dir
    return table
