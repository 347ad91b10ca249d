"""Experience replay and Dark Experience Replay (Buzzega et al., 2020), host-side.

For users who *do* keep some old data: a :class:`ReplayBuffer` holds a uniform
reservoir sample of a stream of examples (any fields, e.g. the model's logits
at the time, for DER), :func:`replay_batches` appends a fixed fraction of
buffered rows to every fine-tuning batch with a boolean ``"replay"`` field, and
:func:`der_loss` is DER's logit-matching term. DER++ is DER plus the task
loss on the replayed labels; see :func:`der_loss` for the recipe with FLOW
weights. Everything here is numpy on the host, outside ``jax.jit``: the mixed
batches have static shapes, so the training step is compiled once per
fine-tuning batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import _checks
from flowjax._types import Array, ArrayLike

__all__ = ["ReplayBuffer", "der_loss", "replay_batches"]


class ReplayBuffer:
    """A fixed-size uniform sample of a stream of examples (reservoir sampling).

    .. math:: P(\\text{example } i \\text{ is in the buffer after } n \\text{ added}) = \\min(1, K/n)

    Algorithm R (Vitter, 1985), as in DER's buffer: the first ``capacity`` (K)
    rows are stored in order; the t-th row after that (0-based stream index
    t >= K) replaces a uniformly chosen slot with probability K/(t+1). A batch
    is processed exactly as if its rows were added one by one. Rows keep every
    field given to :meth:`add` (``"id"`` is required; e.g. also ``"x"``,
    ``"label"``, and the model's ``"logits"`` for DER), with their dtypes and
    per-row shapes, which are fixed by the first :meth:`add`.

    Args:
      capacity: the number of rows kept, K >= 1.
      seed: seed of the buffer's own numpy generator (reservoir decisions and
        :meth:`sample` without ``rng``).

    Raises:
      ValueError: a capacity that is not a positive integer.

    Example:
      >>> import numpy as np, flowjax
      >>> buffer = flowjax.ReplayBuffer(capacity=3, seed=0)
      >>> buffer.add({"id": np.arange(10), "x": np.arange(10.0)})
      >>> len(buffer), buffer.seen
      (3, 10)
      >>> sorted(buffer.sample(3)["id"].tolist()) == sorted(buffer.data["id"].tolist())
      True
    """

    def __init__(self, capacity: int, seed: int = 0):
        if (
            isinstance(capacity, bool)
            or not isinstance(capacity, (int, np.integer))
            or capacity < 1
        ):
            raise ValueError(f"capacity must be a positive integer; got {capacity!r}.")
        self.capacity = int(capacity)
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._store: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def __repr__(self) -> str:
        fields = sorted(self._store) if self._store is not None else []
        return f"ReplayBuffer(size={len(self)}/{self.capacity}, seen={self.seen}, fields={fields})"

    @property
    def data(self) -> dict[str, np.ndarray]:
        """The stored rows (read-only views), in slot order."""
        if self._store is None:
            return {}
        out = {}
        for k, v in self._store.items():
            view = v[: len(self)]
            view.setflags(write=False)
            out[k] = view
        return out

    def add(self, batch: Mapping[str, Any]) -> None:
        """Offers every row of ``batch`` to the reservoir.

        Args:
          batch: a mapping with an integer ``"id"`` array ``[B]`` and any other
            fields with leading dimension B (numpy or jax arrays).

        Raises:
          ValueError: no ``"id"``, non-integer ids, fields of different
            lengths, a field named ``"replay"``, or fields, per-row shapes or
            dtypes that differ from the first batch added.
        """
        rows = _host_batch(batch, "the batch given to ReplayBuffer.add")
        if "replay" in rows:
            raise ValueError(
                'a buffered field may not be named "replay": replay_batches adds that field.'
            )
        n = len(rows["id"])
        if self._store is None:
            self._store = {
                k: np.empty((self.capacity, *v.shape[1:]), v.dtype)
                for k, v in rows.items()
            }
        else:
            _check_same_fields(self._store, rows, "the buffer", "the batch")
        t = self.seen + np.arange(n)
        slots = np.where(t < self.capacity, t, -1)
        late = t >= self.capacity
        if late.any():
            j = self._rng.integers(0, t[late] + 1)
            slots[late] = np.where(j < self.capacity, j, -1)
        keep = np.flatnonzero(slots >= 0)
        # A slot written twice within the batch holds the later row (as one-by-one adds would).
        rev_slots = slots[keep][::-1]
        _, first = np.unique(rev_slots, return_index=True)
        src = keep[::-1][first]
        for k, v in rows.items():
            self._store[k][slots[src]] = v[src]
        self.seen += n

    def sample(
        self, n: int, *, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """``n`` distinct stored rows, drawn uniformly without replacement.

        Args:
          n: how many rows, 0 <= n <= len(buffer).
          rng: a numpy Generator; defaults to the buffer's own.

        Returns:
          A dict of numpy arrays with leading dimension ``n`` (copies).

        Raises:
          ValueError: an empty buffer, or ``n`` negative or larger than the
            number of stored rows.
        """
        if self._store is None or len(self) == 0:
            raise ValueError(
                "the replay buffer is empty: add old examples before sampling."
            )
        if n < 0 or n > len(self):
            raise ValueError(
                f"cannot sample {n} distinct rows from a buffer holding {len(self)}: use a "
                "larger buffer, a smaller replay ratio or smaller batches."
            )
        gen = self._rng if rng is None else rng
        idx = gen.choice(len(self), size=n, replace=False)
        return {k: v[idx] for k, v in self._store.items()}


def replay_batches(
    batches: Iterable[Mapping[str, Any]],
    buffer: ReplayBuffer,
    ratio: float,
    *,
    seed: int = 0,
    fill: Mapping[str, Any] | None = None,
    key: str = "replay",
) -> Iterator[dict[str, np.ndarray]]:
    """Appends buffered rows to each fine-tuning batch, so that a fraction ``ratio`` is replay.

    .. math:: k = \\mathrm{round}\\Big(\\frac{r\\,B}{1-r}\\Big), \\qquad
        \\frac{k}{B + k} \\approx r

    Each batch of ``B`` new-task rows is followed by ``k`` rows drawn
    uniformly without replacement from ``buffer``: no new-task row is ever
    dropped, so an epoch still visits every new example once and FLOW weights
    stay attached to them. The fraction is exact when ``r B / (1-r)`` is an
    integer (e.g. r = 1/4 with B divisible by 3; r = 1/2 appends B rows, as DER
    does). A batch so small that ``k`` rounds to 0 while ``r > 0`` (e.g.
    r = 1/4 with B = 1, or a small ragged last batch) is an error rather than a
    batch silently without replay: use larger batches or drop the remainder. ``batch[key]`` (bool ``[B + k]``) is False for new rows, True for
    replayed ones. Ids are kept as they are: a replayed row carries its
    original id and ``replay=True``, so ``(replay, id)`` identifies a row even
    where the old and new id ranges overlap; look up per-example values of
    the new task (:func:`flowjax.attach_weights`) *before* mixing, and give the
    replayed rows their value through ``fill`` or by storing it in the buffer::

        batches = (flowjax.attach_weights(b, table) for b in loader)
        mixed = flowjax.replay_batches(batches, buffer, 0.25, fill={"weight": 1.0})

    Fields present on one side only (``"weight"`` in the batches, ``"logits"``
    in the buffer) are filled on the other side with the constant given in
    ``fill`` (never silently); fields on both sides must have the same per-row
    shape and dtype. With ``ratio=0`` the batches pass through unchanged
    except for the added ``key`` field (all False). The buffer is sampled
    lazily, batch by batch, with a generator seeded by ``seed`` (deterministic,
    independent of the buffer's own generator); rows added to the buffer while
    iterating can be replayed.

    Args:
      batches: an iterable of mappings with an integer ``"id"`` and per-row fields.
      buffer: the :class:`ReplayBuffer` to draw from.
      ratio: the fraction of each output batch that is replay, in [0, 1).
      seed: seed of the sampling generator.
      fill: field -> constant for fields missing on one side.
      key: the name of the boolean replay field.

    Returns:
      An iterator of dicts of numpy arrays (new rows first, then replayed rows).

    Raises:
      ValueError: ``ratio`` outside [0, 1), an empty buffer with ``ratio > 0``
        (raised at the call), and, while iterating, a batch that already has
        ``key``, a field missing on one side without ``fill``, mismatched
        per-row shapes or dtypes, a buffer too small for ``k`` rows, or a batch
        too small to get any replayed row (``k = 0`` with ``ratio > 0``; the
        message gives the smallest batch size that works).

    Example:
      >>> import numpy as np, flowjax
      >>> buffer = flowjax.ReplayBuffer(100, seed=0)
      >>> buffer.add({"id": np.arange(100), "x": np.zeros((100, 2), np.float32)})
      >>> new = [{"id": np.arange(6), "x": np.ones((6, 2), np.float32), "weight": np.full(6, 0.5, np.float32)}]
      >>> batch = next(flowjax.replay_batches(new, buffer, 0.25, seed=0, fill={"weight": 1.0}))
      >>> batch["x"].shape, batch["replay"].sum(), batch["weight"].tolist()
      ((8, 2), np.int64(2), [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    """
    r = float(ratio)
    if not (0 <= r < 1):
        raise ValueError(
            f"ratio must be in [0, 1) (the fraction of each batch that is replay); got {ratio!r}."
        )
    if r > 0 and len(buffer) == 0:
        raise ValueError(
            f"ratio={r} but the replay buffer is empty: add old examples to it first "
            "(or use ratio=0 for plain fine-tuning)."
        )
    fill = dict(fill or {})
    rng = np.random.default_rng(seed)

    def generate():
        for batch in batches:
            rows = _host_batch(batch, "a fine-tuning batch")
            if key in rows:
                raise ValueError(
                    f"the batch already has a {key!r} field; pass key=... another name."
                )
            b = len(rows["id"])
            k = _n_replayed(r, b)
            if k == 0 and r > 0:
                smallest = b + 1
                while _n_replayed(r, smallest) == 0:
                    smallest += 1
                raise ValueError(
                    f"a batch of {b} rows at ratio={r} gets no replayed row "
                    f"(round({r} * {b} / (1 - {r})) = 0), so replay would be silently "
                    f"dropped for it: use batches of at least {smallest} rows (drop or "
                    "merge a small ragged last batch) or a larger ratio."
                )
            if k == 0:
                out = dict(rows)
                out[key] = np.zeros(b, bool)
                yield out
                continue
            old = buffer.sample(k, rng=rng)
            out = {}
            for name in sorted(set(rows) | set(old)):
                new_part = rows.get(name)
                old_part = old.get(name)
                if new_part is None:
                    new_part = _filled(
                        name, fill, b, old_part, "fine-tuning batches", "buffer"
                    )
                elif old_part is None:
                    old_part = _filled(
                        name, fill, k, new_part, "buffer", "fine-tuning batches"
                    )
                elif (
                    new_part.shape[1:] != old_part.shape[1:]
                    or new_part.dtype != old_part.dtype
                ):
                    raise ValueError(
                        f"field {name!r} has per-row shape {new_part.shape[1:]} and dtype "
                        f"{new_part.dtype} in the batch but {old_part.shape[1:]} and "
                        f"{old_part.dtype} in the buffer."
                    )
                out[name] = np.concatenate([new_part, old_part])
            out[key] = np.concatenate([np.zeros(b, bool), np.ones(k, bool)])
            yield out

    return generate()


def der_loss(
    logits: ArrayLike, stored_logits: ArrayLike, *, where: ArrayLike | None = None
) -> Array:
    """Per-example DER loss: the mean squared error between current and stored logits.

    .. math:: d_i = \\frac{1}{C} \\sum_c \\big(z_{ic}(\\theta) - z^{\\text{stored}}_{ic}\\big)^2

    Dark Experience Replay (Buzzega et al., 2020) matches the logits a
    replayed example had when it was stored (here typically the pre-trained
    model's). The paper writes the squared norm; the reference code uses the
    mean over classes, as here (a factor C, absorbed in the strength α).
    ``stored_logits`` gets no gradient; masked rows give exactly 0 and NaN in
    them does not leak. DER++ adds the task loss on the replayed labels
    (β); with FLOW weights on the new rows:

    .. math:: L = \\frac{\\sum_{i \\notin R} w_i \\ell_i}{|\\bar R|}
        + \\alpha \\frac{\\sum_{i \\in R} d_i}{|R|}
        + \\beta \\frac{\\sum_{i \\in R} \\ell_i}{|R|}

    (DER++ draws separate buffer samples for the two replay terms; using the
    same replayed rows, as here, is the usual simplification.)

    Args:
      logits: ``[..., C]`` current logits.
      stored_logits: ``[..., C]`` logits stored with the examples.
      where: optional boolean mask of shape ``[...]`` (e.g. ``batch["replay"]``).

    Returns:
      Per-row losses of shape ``[...]``, in the logits' dtype.

    Raises:
      ValueError: shapes that differ or lack a class axis, or a ``where`` of
        the wrong shape.

    Example:
      DER++ on a mixed batch (new rows carry FLOW weights, replayed rows
      carry their stored logits and labels):

      >>> import jax.numpy as jnp, numpy as np, optax, flowjax
      >>> buffer = flowjax.ReplayBuffer(10, seed=0)
      >>> buffer.add({"id": np.arange(10), "label": np.zeros(10, np.int32),
      ...             "logits": np.tile(np.float32([2.0, 0.0]), (10, 1))})
      >>> new = [{"id": np.arange(2), "label": np.ones(2, np.int32),
      ...         "weight": np.float32([1.0, 0.5])}]
      >>> batch = next(flowjax.replay_batches(new, buffer, 0.5, fill={"weight": 1.0, "logits": 0.0}))
      >>> logits = jnp.zeros((4, 2))  # the model's current outputs
      >>> ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      >>> old = jnp.asarray(batch["replay"])
      >>> der = flowjax.der_loss(logits, batch["logits"], where=old)
      >>> der.tolist()
      [0.0, 0.0, 2.0, 2.0]
      >>> loss = (flowjax.weighted_loss(ce, batch["weight"], where=~old)
      ...         + 0.3 * flowjax.weighted_loss(der, jnp.ones(4), where=old)
      ...         + 0.5 * flowjax.weighted_loss(ce, jnp.ones(4), where=old))
      >>> round(float(loss), 4)  # 0.75 ln 2 + 0.3 * 2 + 0.5 ln 2
      1.4664
    """
    z = jnp.asarray(logits)
    stored = jnp.asarray(stored_logits)
    if z.ndim == 0 or z.shape != stored.shape:
        raise ValueError(
            f"logits and stored_logits must have the same shape [..., C]; got {z.shape} "
            f"and {stored.shape}."
        )
    out_dtype = jnp.result_type(z, stored)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = jnp.float32
    stored = jax.lax.stop_gradient(stored)
    where, (z, stored) = _checks.zero_masked_rows(where, z, stored)
    dtype = jnp.promote_types(out_dtype, jnp.float32)
    d = jnp.mean(jnp.square(z.astype(dtype) - stored.astype(dtype)), axis=-1)
    if where is not None:
        d = jnp.where(where, d, 0)
    return d.astype(out_dtype)


def _n_replayed(r: float, b: int) -> int:
    """k = round(r b / (1 - r)), halves rounded up: replayed rows for a batch of b new rows."""
    return int(np.floor(r * b / (1 - r) + 0.5))


def _host_batch(batch: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    if "id" not in batch:
        raise ValueError(f'{what} has no "id" field (fields: {sorted(batch)}).')
    rows = {k: np.asarray(v) for k, v in batch.items()}
    _checks.as_ids(rows["id"], "the batch's ids")
    n = len(rows["id"])
    for k, v in rows.items():
        if v.ndim == 0 or len(v) != n:
            raise ValueError(
                f"field {k!r} of {what} has shape {v.shape}; every field needs leading "
                f"dimension {n} (the number of ids)."
            )
    return rows


def _check_same_fields(store, rows, a: str, b: str) -> None:
    if set(store) != set(rows):
        raise ValueError(
            f"{b} has fields {sorted(rows)} but {a} has {sorted(store)}: every added batch "
            "must carry the same fields."
        )
    for k, v in rows.items():
        if v.shape[1:] != store[k].shape[1:] or v.dtype != store[k].dtype:
            raise ValueError(
                f"field {k!r}: {b} has per-row shape {v.shape[1:]} and dtype {v.dtype}; "
                f"{a} has {store[k].shape[1:]} and {store[k].dtype}."
            )


def _filled(name, fill, n, other, missing_in: str, present_in: str) -> np.ndarray:
    if name not in fill:
        raise ValueError(
            f"field {name!r} is in the {present_in} but not in the {missing_in}: pass "
            f"fill={{{name!r}: value}} (the value for rows that lack it) or store it on both sides."
        )
    value = np.asarray(fill[name])
    cast = value.astype(other.dtype)
    if not np.array_equal(cast, value, equal_nan=value.dtype.kind in "fc"):
        raise ValueError(
            f"fill[{name!r}] = {fill[name]!r} is not representable in the field's dtype {other.dtype}."
        )
    return np.broadcast_to(cast, (n, *other.shape[1:])).copy()
