"""Input validation shared by the public functions.

Every check raises :class:`ValueError` with a message that names the problem and
the first offending example ids (or positions when there are no ids). Checks
look at concrete values only; inside ``jax.jit`` values are abstract, so the
callers document what happens there instead (NaN propagates, nothing is zeroed).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

_SHOW = 5  # How many offending ids an error message lists.


def is_concrete(x) -> bool:
    """True when ``x`` holds values we can inspect (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def describe(
    where: np.ndarray, ids: np.ndarray | None = None, values: np.ndarray | None = None
) -> str:
    """Names the first offending entries: ``"ids [3, 17] (losses [nan, inf])"``."""
    where = np.asarray(where).reshape(-1)
    positions = np.flatnonzero(where)
    first = positions[:_SHOW]
    if ids is not None:
        names = f"ids {np.asarray(ids).reshape(-1)[first].tolist()}"
    else:
        names = f"positions {first.tolist()}"
    if values is not None:
        names += f" (values {np.asarray(values).reshape(-1)[first].tolist()})"
    more = len(positions) - len(first)
    if more > 0:
        names += f" and {more} more"
    return names


def as_where(where, shape: tuple[int, ...]):
    """``where`` as a boolean jax array of exactly ``shape`` (None stays None)."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.shape != shape:
        raise ValueError(f"where has shape {where.shape}; losses have shape {shape}.")
    return where.astype(bool)


def zero_masked_rows(where, *logits):
    """Checks a row mask against logits ``[..., C]`` and zeroes the masked rows.

    Returns ``(where, logits)``: ``where`` as a boolean array of the logits' shape
    without the class axis (None stays None) and the logits with masked rows set
    to 0, so NaN or inf there cannot reach values or gradients.
    """
    if where is None:
        return None, logits
    where = jnp.asarray(where, bool)
    shape = logits[0].shape[:-1]
    if where.shape != shape:
        raise ValueError(
            f"where has shape {where.shape}; it must be the logits' shape without the "
            f"class axis, {shape}."
        )
    return where, tuple(jnp.where(where[..., None], z, 0) for z in logits)


def check_counted_weights(weights, where=None) -> None:
    """Concrete weights must be finite and >= 0 where ``where`` counts them (traced: no check)."""
    if not is_concrete(weights) or (where is not None and not is_concrete(where)):
        return
    w = np.asarray(weights)
    w = w.reshape(-1) if where is None else w[np.asarray(where)]
    check_finite(w, "weights")
    if (w < 0).any():
        raise ValueError(
            f"weights must be >= 0; negative at {describe(w < 0, values=w)}."
        )


def nan_if_negative_weights(value, weights, where=None):
    """``value``, or NaN where a counted weight is negative: the jit-side twin of :func:`check_counted_weights`.

    Under ``jax.jit`` the check cannot raise, so a negative weight must not give a
    plausible loss (NaN and inf weights already propagate).
    """
    import jax.numpy as jnp

    negative = weights < 0 if where is None else where & (weights < 0)
    return jnp.where(jnp.any(negative), jnp.nan, value)


def check_not_empty(x: np.ndarray, what: str) -> None:
    if np.size(x) == 0:
        raise ValueError(f"{what} is empty: FLOW needs at least one example.")


def check_finite(values: np.ndarray, what: str, ids: np.ndarray | None = None) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{what} contain NaN or infinite values at {describe(bad, ids, values)}. "
            "flowjax never sets them to 0: fix the loss (e.g. a sequence with no target "
            "tokens gives 0/0) or drop those examples explicitly."
        )


def check_non_negative(
    values: np.ndarray, what: str, ids: np.ndarray | None = None
) -> None:
    bad = values < 0
    if bad.any():
        raise ValueError(
            f"{what} must be non-negative (FLOW assumes f_i(θ*) >= 0, so that every weight "
            f"lies in (0, 1]); negative at {describe(bad, ids, values)}."
        )


def check_same_length(a_len: int, b_len: int, a: str, b: str) -> None:
    if a_len != b_len:
        raise ValueError(f"{a} and {b} have different lengths: {a_len} != {b_len}.")


_INT64 = np.dtype(np.int64)


def as_ids(ids, what: str = "ids") -> np.ndarray:
    """Converts example ids to a 1-D int64 numpy array, rejecting non-integers."""
    arr = np.asarray(ids)
    if arr.dtype == _INT64 and arr.ndim == 1:  # the usual ids: nothing to convert
        return arr
    if arr.ndim != 1:
        raise ValueError(
            f"{what} must be a 1-D array of integers; got shape {arr.shape}."
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float64.
            return arr.astype(np.int64)
        raise ValueError(f"{what} must be integers; got dtype {arr.dtype}.")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what} do not fit in int64: largest is {arr.max()}.")
    return arr.astype(np.int64, copy=False)


def find_sorted(
    sorted_ids: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where each ``query`` id sits in ``sorted_ids``: ``(positions, found)``.

    The one id lookup of flowjax (tables, cached pre-pass rows). ``positions``
    is valid only where ``found`` is True.
    """
    if not len(sorted_ids):
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == query


def check_unique(sorted_ids: np.ndarray, what: str = "ids") -> None:
    """Raises on duplicates in an already *sorted* id array."""
    dup = sorted_ids[1:] == sorted_ids[:-1]
    if dup.any():
        dups = np.unique(sorted_ids[1:][dup])
        shown = dups[:_SHOW].tolist()
        more = f" and {len(dups) - len(shown)} more" if len(dups) > len(shown) else ""
        raise ValueError(
            f"duplicate example {what}: {shown}{more}. Every example needs a stable, unique id; "
            "results are keyed by id, so a duplicate would silently overwrite a loss."
        )


def check_temperature(temperature) -> None:
    """A concrete temperature must be a finite number > 0 (None, the median, is checked by callers)."""
    if isinstance(temperature, str):
        raise ValueError(
            "temperature must be None (the median of the losses) or a finite number > 0; "
            f"got {temperature!r}."
        )
    if isinstance(temperature, numbers.Number) or (
        is_concrete(temperature) and np.ndim(temperature) == 0
    ):
        t = float(np.asarray(temperature))
        if not np.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0; got {t}.")
    elif np.ndim(temperature) != 0:
        raise ValueError(
            f"temperature must be a scalar; got shape {np.shape(temperature)}."
        )


def check_int(value, what: str, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``, else ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what} must be {kind}; got {value!r}.")
    return int(value)
