"""Per-example values keyed by stable example id: one table type for losses and weights.

Everything FLOW computes about an example (its pre-trained loss, its weight,
its target tokens' losses and weights) is keyed by the example's integer id,
never by its position in some loader order: shuffling, sharding across hosts
or resuming a pre-pass cannot attach a value to the wrong example.

One id-keyed table type holds them all: int64 ids, sorted and unique, and one
float32 row of values per id (a scalar, or a ``[W]`` token row with a target
mask). It is validated once, when it is built or loaded, and looked up with
one implementation:

============================  ===================  ==============================
class                         values per id        made by
============================  ===================  ==============================
:class:`LossTable`            a loss               :func:`flowjax.per_example_losses`
:class:`WeightTable`          a weight >= 0, τ     :meth:`LossTable.flow_weights`
:class:`TokenLosses`          ``[W]`` + mask       :func:`flowjax.lm_token_losses`
:class:`TokenWeights`         ``[W]`` >= 0 + mask  :meth:`TokenLosses.flow_weights`
============================  ===================  ==============================

Token rows follow the shifted convention of :func:`flowjax.token_nll`: column
``t`` belongs to the example's token ``t + 1``; rows are padded to the longest
bucket minus one, with value 0 and mask False in the padding. Tables are
host-side numpy objects with read-only arrays.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from typing import ClassVar

import numpy as np

from flowjax import _checks
from flowjax import weights as _weights
from flowjax._types import ArrayLike, Normalize

__all__ = ["LossTable", "TokenLosses", "TokenWeights", "WeightTable"]

_VERSION = "1"
_F32 = np.finfo(np.float32)


class _IdTable:
    """Sorted unique int64 ids with a float32 row of values (any trailing shape) each.

    Subclasses fix the trailing rank, whether a boolean target ``mask`` of the
    values' shape goes with them (token tables), whether values must be >= 0
    (weights) and whether the table records a temperature.
    """

    _values_name: ClassVar[str] = "values"
    _ndim: ClassVar[int | None] = None  # rank of ``values`` (None: any rank >= 1)
    _masked: ClassVar[bool] = False
    _non_negative: ClassVar[bool] = False
    _has_temperature: ClassVar[bool] = False

    ids: np.ndarray
    values: np.ndarray
    mask: np.ndarray | None
    temperature: float | None

    def __init__(
        self,
        ids: ArrayLike,
        values: ArrayLike,
        mask: ArrayLike | None = None,
        *,
        temperature: float | None = None,
    ):
        ids = _checks.as_ids(ids)
        values = np.asarray(values)
        name = self._values_name
        if values.dtype == np.bool_ or not (
            np.issubdtype(values.dtype, np.floating)
            or np.issubdtype(values.dtype, np.integer)
        ):
            raise ValueError(f"{name} must be numbers; got dtype {values.dtype}.")
        if self._ndim is not None and values.ndim != self._ndim:
            shape = "1-D [n]" if self._ndim == 1 else "2-D [n, W]"
            raise ValueError(f"{name} must be {shape}; got shape {values.shape}.")
        if values.ndim < 1:
            raise ValueError(f"{name} must have one row per id; got a scalar.")
        _checks.check_same_length(len(ids), len(values), "ids", name)
        counted = self._check_mask(mask, values.shape)
        values32 = self._check_values(ids, values, counted)
        if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
            # Already sorted and unique (a pre-pass of examples fed in id order): copies
            # of the table's own, without the sort.
            ids, values32 = ids.copy(), values32.copy()
            counted = None if counted is None else counted.copy()
        else:
            order = np.argsort(ids, kind="stable")
            ids, values32 = ids[order], values32[order]
            _checks.check_unique(ids)
            counted = None if counted is None else counted[order]
        if counted is not None:
            counted.setflags(write=False)
        ids.setflags(write=False)
        values32.setflags(write=False)
        self.ids, self.values = ids, values32
        self.mask = counted if self._masked else None
        if temperature is not None:
            _checks.check_temperature(temperature)
        self.temperature = None if temperature is None else float(temperature)

    # -- validation (once, here) ------------------------------------------------

    def _check_mask(self, mask, shape) -> np.ndarray | None:
        if not self._masked:
            if mask is not None:
                raise ValueError(f"a {type(self).__name__} has no mask.")
            return None
        if mask is None:
            raise ValueError(
                f"a {type(self).__name__} needs a boolean mask (True at target tokens) "
                f"of the {self._values_name}' shape {shape}."
            )
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(
                f"mask has shape {mask.shape}; {self._values_name} have shape {shape}."
            )
        if mask.dtype != np.bool_:
            if (
                not np.issubdtype(mask.dtype, np.integer)
                or not np.isin(mask, (0, 1)).all()
            ):
                raise ValueError(
                    f"mask must be boolean (or 0/1 integers); got dtype {mask.dtype}."
                )
            mask = mask.astype(bool)
        return mask

    def _check_values(self, ids, values, counted) -> np.ndarray:
        """The float32 values; every range check runs on the cast values."""
        name = self._values_name
        if counted is None and values.dtype == np.float32:
            # The usual table (float32, every cell counted: the pre-pass's): a float64 sum
            # is finite exactly when every value is, float32 cannot over- or underflow
            # float32, and the minimum decides the sign; the checks below name the rows.
            fine = np.isfinite(np.sum(values, dtype=np.float64))
            if fine and (
                not self._non_negative or not values.size or values.min() >= 0
            ):
                return values
        cells = np.ones(values.shape, bool) if counted is None else counted

        def fail(bad, problem, why=""):
            rows = bad.reshape(len(ids), -1).any(axis=1)
            shown = values if values.ndim == 1 else None
            raise ValueError(
                f"{name} {problem} at {_checks.describe(rows, ids, shown)}{why}."
            )

        # Checks compare the given values (any dtype, never widened: a token table can
        # be a gigabyte) with their float32 cast, the values the table stores.
        with np.errstate(over="ignore", invalid="ignore"):
            v32 = values.astype(np.float32, copy=False)
        finite = np.isfinite(values)
        if (cells & ~finite).any():
            fail(
                cells & ~finite,
                "contain NaN or infinite values",
                ": flowjax never sets them to 0; fix the loss or drop those examples "
                "explicitly",
            )
        if (cells & ~np.isfinite(v32)).any():
            fail(
                cells & ~np.isfinite(v32),
                "overflow float32",
                f" (|value| > {_F32.max:.3g}; a table stores float32)",
            )
        under = cells & (values != 0) & (v32 == 0)
        if under.any():
            fail(
                under,
                "underflow to 0 in float32",
                f" (0 < |value| < {_F32.smallest_subnormal:.3g}; a table stores float32, "
                "and flowjax never turns a value into 0 silently)",
            )
        if self._non_negative and (cells & (v32 < 0)).any():
            fail(cells & (v32 < 0), "must be >= 0; negative")
        if counted is not None and (~counted & (v32 != 0)).any():
            fail(
                ~counted & (v32 != 0),
                "must be 0 where the mask is False; non-zero",
                " (padding and non-target tokens carry no value)",
            )
        return v32

    # -- container protocol ------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        same_mask = (self.mask is None and other.mask is None) or (
            self.mask is not None
            and other.mask is not None
            and np.array_equal(self.mask, other.mask)
        )
        return (
            np.array_equal(self.ids, other.ids)
            and np.array_equal(self.values, other.values)
            and same_mask
            and self.temperature == other.temperature
        )

    __hash__ = None  # Mutable-looking container semantics: not hashable.

    def __repr__(self) -> str:
        name = type(self).__name__
        if len(self) == 0:
            return f"{name}(n=0)"
        v = self.values if self.mask is None else self.values[self.mask]
        stats = (
            f"min={v.min():.4g} median={np.median(v):.4g} max={v.max():.4g}"
            if v.size
            else "no counted values"
        )
        shape = "" if self.values.ndim == 1 else f", width={self.values.shape[1:]}"
        tau = (
            "" if self.temperature is None else f", temperature={self.temperature:.4g}"
        )
        return (
            f"{name}(n={len(self)}, ids=[{self.ids[0]}..{self.ids[-1]}]{shape}, "
            f"{self._values_name}: {stats}{tau})"
        )

    # -- lookup by id (the one implementation) -----------------------------------

    def _positions(self, ids: ArrayLike) -> np.ndarray:
        """Row of each queried id; raises naming the ids that are not in the table."""
        query = _checks.as_ids(ids)
        lo = self._dense_start()
        if lo is not None and len(query):  # ids lo, lo + 1, ...: the row is id - lo
            pos = query - lo if lo else query
            # 0 <= pos < n in one reduction: a negative row is a huge unsigned one (the
            # training loop looks weights up every step; two reductions cost twice as much)
            if int(np.maximum.reduce(pos.view(np.uint64))) < len(self.ids):
                return pos
        pos, found = _checks.find_sorted(self.ids, query)
        if not found.all():
            raise ValueError(
                f"{_checks.describe(~found, query)} are not in this {type(self).__name__} "
                f"({len(self)} examples): the table was built from a different data set, "
                "or those examples were added (or skipped) after the pre-pass."
            )
        return pos

    def _dense_start(self) -> int | None:
        """The first id when the ids are consecutive integers (the usual 0..n-1), else None.

        Sorted unique ids are consecutive exactly when ``ids[-1] - ids[0] == n - 1``;
        then an id's row is ``id - ids[0]``, a subtraction instead of a binary search
        (the training loop looks weights up every step). Memoised per ids array.
        """
        memo = self.__dict__.get("_dense")
        if memo is None or memo[0] is not self.ids:
            ids = self.ids
            dense = len(ids) > 0 and int(ids[-1]) - int(ids[0]) == len(ids) - 1
            memo = (ids, int(ids[0]) if dense else None)
            self.__dict__["_dense"] = memo
        return memo[1]

    def _rows(self, array: np.ndarray, ids: ArrayLike, length: int | None):
        pos = self._positions(ids)
        rows = array[pos]
        if length is None:
            return rows
        if self.mask is None or array.ndim != 2:
            raise ValueError(
                f"length= re-pads token rows; a {type(self).__name__} has one value per id."
            )
        if (
            isinstance(length, bool)
            or not isinstance(length, int | np.integer)
            or length < 2
        ):
            raise ValueError(
                f"length must be an int >= 2 (a batch's padded token length T, giving T - 1 "
                f"shifted columns); got {length!r}."
            )
        cols = int(length) - 1
        cut = self.mask[pos][:, cols:].any(axis=1)
        if cut.any():
            raise ValueError(
                f"length {length} cuts off target tokens of "
                f"{_checks.describe(cut, self.ids[pos])}."
            )
        pad = max(cols - rows.shape[1], 0)
        return np.pad(rows[:, :cols], ((0, 0), (0, pad)))

    def lookup(self, ids: ArrayLike, *, length: int | None = None) -> np.ndarray:
        """The values of the given example ids, in the order given.

        Args:
          ids: 1-D integer array of example ids (any order, repeats allowed).
          length: token tables only: a training batch's padded token length
            ``T``; the rows are cut or zero-padded to its ``T - 1`` shifted
            columns, so they multiply :func:`flowjax.token_nll` of the batch
            position by position.

        Returns:
          float32 ``[len(ids), ...]``, aligned with ``ids``.

        Raises:
          ValueError: an id that is not in the table (the message lists them),
            a ``length`` on a table without token rows or not an int >= 2, or
            a ``length`` that would cut off target tokens (naming the ids).

        Example:
          >>> import flowjax
          >>> flowjax.LossTable([1, 2], [0.5, 0.25]).lookup([2, 2, 1]).tolist()
          [0.25, 0.25, 0.5]
        """
        return self._rows(self.values, ids, length)

    # -- FLOW --------------------------------------------------------------------

    def median_temperature(self) -> float:
        """τ = the median of the counted values (see :func:`flowjax.median_temperature`).

        Token tables take the median over every target token of every row
        (``τ_tok``); errors name the example ids.

        Example:
          >>> import flowjax
          >>> flowjax.LossTable([1, 2, 3], [0.5, 2.0, 1.0]).median_temperature()
          1.0
        """
        sel, _ = _weights._host_selected(
            self.values, self.mask, non_negative=True, ids=self.ids
        )
        return _weights._median(sel)

    def _flow_weights(self, temperature, normalize, weight_cls):
        w, tau = _weights._exp_weights(
            self.values,
            temperature,
            normalize,
            sign=-1.0,
            where=self.mask,
            ids=self.ids,
        )
        # FLOW's weight of a very hard example (f/τ > 103 unnormalised) is below the
        # smallest float32 number: rounded to float32, as the official float32 code
        # computes it, it is 0. That is the weight's value, not a replaced bad value.
        extra = () if self.mask is None else (self.mask,)
        return weight_cls(self.ids, w.astype(np.float32), *extra, temperature=tau)

    # -- files ---------------------------------------------------------------------

    @classmethod
    def _format(cls) -> str:
        return f"flowjax.{cls.__name__}/{_VERSION}"

    @classmethod
    def _keys(cls) -> set[str]:
        keys = {"format", "ids", "values"}
        if cls._masked:
            keys.add("mask")
        if cls._has_temperature:
            keys.add("temperature")
        return keys

    def save(self, path: str | os.PathLike) -> None:
        """Writes the table to ``path`` (an ``.npz`` file), atomically.

        The file is written beside ``path`` and renamed into place, so a reader
        (or a job killed mid-write) never sees a half-written table. It holds
        plain arrays only (``format``, ``ids``, ``values``, plus ``mask`` and
        ``temperature`` where the table has them), no pickled objects.

        Example:
          >>> import os, tempfile, flowjax
          >>> path = os.path.join(tempfile.mkdtemp(), "losses.npz")
          >>> flowjax.LossTable([3, 1], [0.3, 0.1]).save(path)
          >>> flowjax.LossTable.load(path).ids.tolist()
          [1, 3]
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        arrays = {
            "format": np.array(self._format()),
            "ids": self.ids,
            "values": self.values,
        }
        if self._masked:
            arrays["mask"] = self.mask
        if self._has_temperature:
            arrays["temperature"] = np.array(
                np.nan if self.temperature is None else self.temperature
            )
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @staticmethod
    def _read(f, path: str, what: str) -> dict[str, np.ndarray]:
        """Every array of an open ``.npz`` file; ValueErrors naming ``path`` otherwise."""
        try:
            with np.load(f, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error, KeyError) as e:
            raise ValueError(
                f"{path} is truncated or corrupted, so it cannot be read as {what} "
                f"({type(e).__name__}: {e}); save() writes complete files atomically, so the "
                "file was damaged or cut short after it was written: write it again."
            ) from e
        except ValueError as e:
            problem = (
                "it holds pickled Python objects, which a flowjax table never contains "
                "and which are not loaded (loading them could run arbitrary code)"
                if "pickle" in str(e)
                else f"an array in it cannot be read ({e})"
            )
            raise ValueError(f"{path} is not {what}: {problem}.") from e

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Reads a table written by :meth:`save`, validating it as the constructor does.

        Raises:
          FileNotFoundError: there is no file at ``path``.
          ValueError: naming ``path`` and what is wrong: not an ``.npz`` file,
            a truncated or corrupted file, pickled objects, a table of another
            class or format version, missing or unexpected arrays, or values
            the constructor rejects.

        Example:
          >>> import os, tempfile, flowjax
          >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
          >>> with open(path, "wb") as f:
          ...     _ = f.write(b"not a table")
          >>> flowjax.WeightTable.load(path)
          Traceback (most recent call last):
          ...
          ValueError: .../w.npz is not a saved WeightTable: it is not an .npz (zip) file.
        """
        path = os.fspath(path)
        what = f"a saved {cls.__name__}"
        with open(path, "rb") as f:
            head = f.read(4)
            if head != b"PK\x03\x04":
                empty = " (the file is empty)" if not head else ""
                raise ValueError(
                    f"{path} is not {what}: it is not an .npz (zip) file{empty}."
                )
            f.seek(0)
            arrays = cls._read(f, path, what)
        fmt = arrays.get("format")
        fmt = (
            str(fmt)
            if fmt is not None and fmt.ndim == 0 and fmt.dtype.kind == "U"
            else ""
        )
        kind, _, version = fmt.partition("/")
        if kind != f"flowjax.{cls.__name__}":
            found = (
                f"it holds a {kind.removeprefix('flowjax.')}"
                if kind.startswith("flowjax.")
                else "it has no flowjax table format tag"
            )
            raise ValueError(f"{path} is not {what}: {found}.")
        if version != _VERSION:
            raise ValueError(
                f"{path} is {what} of format version {version!r}; this flowjax reads "
                f"version {_VERSION!r}."
            )
        keys, want = set(arrays), cls._keys()
        if keys != want:
            raise ValueError(
                f"{path} is not {what}: it has arrays {sorted(keys)}, expected "
                f"{sorted(want)} (missing {sorted(want - keys)}, unexpected "
                f"{sorted(keys - want)})."
            )
        kwargs = {}
        if cls._has_temperature:
            t = arrays["temperature"]
            if t.shape != () or t.dtype.kind != "f":
                raise ValueError(f"{path}: temperature must be a float scalar.")
            kwargs["temperature"] = None if np.isnan(t) else float(t)
        extra = (arrays["mask"],) if cls._masked else ()
        try:
            return cls(arrays["ids"], arrays["values"], *extra, **kwargs)
        except ValueError as e:
            raise ValueError(f"{path} holds an invalid {cls.__name__}: {e}") from e


class LossTable(_IdTable):
    """Pre-trained per-example losses keyed by example id.

    Attributes:
      ids: int64, sorted, unique example ids.
      losses: float32 losses aligned with ``ids`` (also ``values``).

    Raises (constructor):
      ValueError: ids that are not 1-D integers or repeat; losses that are not
        1-D numbers of the ids' length, hold NaN/inf, or overflow or underflow
        to 0 in float32 (messages name the ids).

    Example:
      >>> import flowjax
      >>> table = flowjax.LossTable(ids=[7, 3, 5], losses=[0.7, 0.3, 0.5])
      >>> table.ids.tolist(), table.lookup([5, 7]).round(2).tolist()
      ([3, 5, 7], [0.5, 0.7])
    """

    _values_name = "losses"
    _ndim = 1

    def __init__(self, ids: ArrayLike, losses: ArrayLike):
        super().__init__(ids, losses)

    @property
    def losses(self) -> np.ndarray:
        return self.values

    def flow_weights(
        self, temperature: float | None = None, *, normalize: Normalize = None
    ) -> WeightTable:
        """FLOW weights of every example, keyed by id (see :func:`flowjax.flow_weights`).

        .. math:: w_i = \\exp(-f_i/\\tau), \\qquad \\tau = \\mathrm{median}_i f_i \\text{ by default}

        Args:
          temperature: ``None`` (the median loss) or a number > 0.
          normalize: ``None``, ``"mean"`` or ``"sum"``.

        Returns:
          A :class:`WeightTable` with the same ids and ``.temperature`` = τ.
          The weights are float32: an example so hard that ``exp(-f/τ)`` is
          below float32's smallest number (``f/τ > 103``) gets weight 0, its
          value rounded to float32 (as in the official float32 code).

        Raises:
          ValueError: what :func:`flowjax.flow_weights` raises, naming the
            ids.

        Example:
          >>> import flowjax
          >>> w = flowjax.LossTable([1, 2, 3], [0.0, 1.0, 2.0]).flow_weights()
          >>> w.temperature, w.weights.round(4).tolist()
          (1.0, [1.0, 0.3679, 0.1353])
        """
        return self._flow_weights(temperature, normalize, WeightTable)


class WeightTable(_IdTable):
    """Per-example training weights keyed by example id.

    Attributes:
      ids: int64, sorted, unique example ids.
      weights: float32 weights (finite, >= 0) aligned with ``ids`` (also ``values``).
      temperature: the τ that produced them, when known.

    Example:
      >>> import flowjax
      >>> flowjax.WeightTable([4, 2], [0.5, 1.0]).lookup([4]).tolist()
      [0.5]
    """

    _values_name = "weights"
    _ndim = 1
    _non_negative = True
    _has_temperature = True

    def __init__(
        self, ids: ArrayLike, weights: ArrayLike, *, temperature: float | None = None
    ):
        super().__init__(ids, weights, temperature=temperature)

    @property
    def weights(self) -> np.ndarray:
        return self.values


class _TokenTable(_IdTable):
    """Token rows ``[n, W]`` with a target mask."""

    _ndim = 2
    _masked = True

    def lookup_mask(self, ids: ArrayLike, *, length: int | None = None) -> np.ndarray:
        """The target mask of the given ids' rows, cut or padded like :meth:`lookup`.

        Example:
          >>> import numpy as np, flowjax
          >>> tl = flowjax.TokenLosses([3], np.array([[0.5, 0.0]], np.float32), [[True, False]])
          >>> tl.lookup_mask([3], length=4).tolist()
          [[True, False, False]]
        """
        return self._rows(self.mask, ids, length)


class TokenLosses(_TokenTable):
    """Pre-trained target-token NLLs of every example, keyed by id (from :func:`flowjax.lm_token_losses`).

    Row ``r`` belongs to example ``ids[r]``; column ``t`` is the NLL of that
    example's token ``t + 1`` (the shifted convention of
    :func:`flowjax.token_nll`), padded to the longest bucket minus one.
    :meth:`flow_weights` turns the table into token-level FLOW weights
    (:class:`TokenWeights`) that a training step looks up by example id.

    Attributes:
      ids: int64 ``[n]``, sorted, unique.
      losses: float32 ``[n, W]``, 0 where ``mask`` is False (also ``values``).
      mask: bool ``[n, W]``, True at target tokens.

    Raises (constructor):
      ValueError: what :class:`LossTable` raises, for the target cells; a
        mask that is not boolean of the losses' shape; non-zero losses where
        the mask is False.

    Example:
      >>> import numpy as np, flowjax
      >>> tl = flowjax.TokenLosses(np.array([3, 5]), np.array([[0.5, 2.0], [1.0, 0.0]], np.float32),
      ...                          np.array([[True, True], [True, False]]))
      >>> tl.median_temperature(), tl.lookup_mask([5]).tolist()
      (1.0, [[True, False]])
      >>> tl.flow_weights().lookup([5], length=4).round(4).tolist()  # by id, padded to T - 1 = 3
      [[0.3679, 0.0, 0.0]]
    """

    _values_name = "losses"

    def __init__(self, ids: ArrayLike, losses: ArrayLike, mask: ArrayLike):
        super().__init__(ids, losses, mask)

    @property
    def losses(self) -> np.ndarray:
        return self.values

    def flow_weights(
        self, temperature: float | None = None, *, normalize: Normalize = None
    ) -> TokenWeights:
        """Token-level FLOW weights of this table, to look up by example id.

        .. math::
            \\tau_{tok} = \\mathrm{median}\\{\\ell_{it} : m_{it}\\}, \\qquad
            w_{it} = m_{it} \\exp(-\\ell_{it} / \\tau_{tok})

        computed over every target token of the whole table (not per batch),
        as :func:`flowjax.token_flow_weights` does. ``normalize`` rescales
        over the target tokens (``"mean"``: mean weight 1 per target token).

        Args:
          temperature: ``None`` (τ_tok, the paper's choice) or a number > 0.
          normalize: ``None``, ``"mean"`` or ``"sum"``.

        Returns:
          A :class:`TokenWeights` with the same ids and mask and
          ``.temperature`` = τ; fetch a training batch's weights with
          ``.lookup(batch["id"], length=T)`` or :func:`flowjax.attach_weights`.

        Raises:
          ValueError: no target token, negative losses, a bad temperature or
            a median of 0 (naming the ids). A weight below float32's range is
            0 (see :meth:`LossTable.flow_weights`).

        Example:
          >>> import numpy as np, flowjax
          >>> tl = flowjax.TokenLosses([3], np.array([[0.5, 2.0, 0.0]], np.float32),
          ...                          [[True, True, False]])
          >>> tw = tl.flow_weights(1.0)
          >>> tw.temperature, tw.weights.round(4).tolist()
          (1.0, [[0.6065, 0.1353, 0.0]])
        """
        return self._flow_weights(temperature, normalize, TokenWeights)


class TokenWeights(_TokenTable):
    """Token-level FLOW weights of every example, keyed by id (from :meth:`TokenLosses.flow_weights`).

    .. math:: w_{it} = m_{it} \\exp(-\\ell_{it} / \\tau_{tok})

    Row ``r`` belongs to example ``ids[r]``; column ``t`` is the weight of
    that example's token ``t + 1`` (the shifted convention of
    :func:`flowjax.token_nll`); 0 where ``mask`` is False. Look rows up by id
    with :meth:`lookup` (or :func:`flowjax.attach_weights`), so a shuffled
    training batch gets its own examples' weights.

    Attributes:
      ids: int64 ``[n]``, sorted, unique.
      weights: float32 ``[n, W]``, >= 0 (also ``values``).
      mask: bool ``[n, W]``, True at target tokens.
      temperature: the τ used (τ_tok for the median), when known.

    Example:
      >>> import numpy as np, flowjax
      >>> tl = flowjax.TokenLosses(np.array([3, 5]), np.array([[0.5, 2.0], [1.0, 0.0]], np.float32),
      ...                          np.array([[True, True], [True, False]]))
      >>> tw = tl.flow_weights()  # τ_tok = median(0.5, 2, 1) = 1
      >>> tw.temperature, tw.lookup([5, 3]).round(4).tolist()
      (1.0, [[0.3679, 0.0], [0.6065, 0.1353]])
    """

    _values_name = "weights"
    _non_negative = True
    _has_temperature = True

    def __init__(
        self,
        ids: ArrayLike,
        weights: ArrayLike,
        mask: ArrayLike,
        temperature: float | None = None,
    ):
        super().__init__(ids, weights, mask, temperature=temperature)

    @property
    def weights(self) -> np.ndarray:
        return self.values
