"""Per-example values keyed by stable example id: :class:`LossTable` and :class:`WeightTable`.

Everything FLOW computes about an example (its pre-trained loss, its weight)
is keyed by the example's integer id, never by its position in some loader
order: shuffling, sharding across hosts or resuming a pre-pass cannot attach a
weight to the wrong example. Tables are host-side numpy objects; ids are
int64, sorted and unique.
"""

from __future__ import annotations

import os
import tempfile
from typing import ClassVar

import numpy as np

from flowjax import _checks
from flowjax import weights as _weights
from flowjax._types import ArrayLike, Normalize, Temperature

__all__ = ["LossTable", "WeightTable"]


class _IdTable:
    """Sorted unique int64 ids with one float32 value each."""

    _values_name: ClassVar[str] = "values"
    _format: ClassVar[str] = ""

    ids: np.ndarray
    values: np.ndarray

    def __init__(self, ids: ArrayLike, values: ArrayLike):
        ids = _checks.as_ids(ids)
        values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(
                f"{self._values_name} must be 1-D; got shape {values.shape}."
            )
        _checks.check_same_length(len(ids), len(values), "ids", self._values_name)
        _checks.check_finite(values, self._values_name, ids)
        self._check_values(values, ids)
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], values[order].astype(np.float32)
        _checks.check_unique(ids)
        ids.setflags(write=False)
        values.setflags(write=False)
        self.ids, self.values = ids, values

    def _check_values(self, values: np.ndarray, ids: np.ndarray) -> None:
        pass

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return np.array_equal(self.ids, other.ids) and np.array_equal(
            self.values, other.values
        )

    __hash__ = None  # Mutable-looking container semantics: not hashable.

    def __repr__(self) -> str:
        if len(self) == 0:
            return f"{type(self).__name__}(n=0)"
        v = self.values
        return (
            f"{type(self).__name__}(n={len(self)}, ids=[{self.ids[0]}..{self.ids[-1]}], "
            f"{self._values_name}: min={v.min():.4g} median={np.median(v):.4g} max={v.max():.4g})"
        )

    def lookup(self, ids: ArrayLike) -> np.ndarray:
        """The values of the given example ids, in the order given.

        Args:
          ids: 1-D integer array of example ids (any order, repeats allowed).

        Returns:
          float32 array aligned with ``ids``.

        Raises:
          ValueError: if any id is not in the table (the message lists them).
        """
        query = _checks.as_ids(ids)
        pos = np.searchsorted(self.ids, query)
        pos_c = np.minimum(pos, max(len(self.ids) - 1, 0))
        found = (
            (pos < len(self.ids)) & (self.ids[pos_c] == query)
            if len(self.ids)
            else np.zeros(len(query), bool)
        )
        if not found.all():
            raise ValueError(
                f"{_checks.describe(~found, query)} are not in this {type(self).__name__} "
                f"({len(self)} examples): the table was built from a different data set, or those "
                "examples were added after the pre-pass."
            )
        return self.values[pos_c]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the table to ``path`` (an ``.npz`` file), atomically.

        The file is written beside ``path`` and renamed into place, so a reader
        (or a job killed mid-write) never sees a half-written table.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format=np.array(self._format),
                    ids=self.ids,
                    values=self.values,
                    **self._extra(),
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Reads a table written by :meth:`save`.

        Raises:
          ValueError: if the file is not a saved table of this class.
        """
        with np.load(os.fspath(path), allow_pickle=False) as data:
            fmt = str(data["format"]) if "format" in data else ""
            if fmt != cls._format:
                raise ValueError(
                    f"{os.fspath(path)} is not a saved {cls.__name__} (format {fmt!r})."
                )
            return cls._from_saved(data)

    def _extra(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def _from_saved(cls, data):
        return cls(data["ids"], data["values"])


class LossTable(_IdTable):
    """Pre-trained per-example losses keyed by example id.

    Attributes:
      ids: int64, sorted, unique example ids.
      losses: float32 losses aligned with ``ids``.

    Example:
      >>> import flowjax
      >>> table = flowjax.LossTable(ids=[7, 3, 5], losses=[0.7, 0.3, 0.5])
      >>> table.ids.tolist(), table.lookup([5, 7]).round(2).tolist()
      ([3, 5, 7], [0.5, 0.7])
    """

    _values_name = "losses"
    _format = "flowjax.LossTable/1"

    def __init__(self, ids: ArrayLike, losses: ArrayLike):
        super().__init__(ids, losses)

    @property
    def losses(self) -> np.ndarray:
        return self.values

    def median_temperature(self) -> float:
        """τ = median loss (see :func:`flowjax.median_temperature`)."""
        x = _weights._host_losses(self.losses, ids=self.ids)
        tau = float(np.median(x))
        _weights._check_median(tau)
        return tau

    def flow_weights(
        self, temperature: Temperature = "median", *, normalize: Normalize = None
    ) -> WeightTable:
        """FLOW weights of every example, keyed by id (see :func:`flowjax.flow_weights`).

        Errors name the offending example ids.
        """
        w, tau = _weights._exp_weights(
            self.losses, temperature, normalize, sign=-1.0, ids=self.ids
        )
        return WeightTable(self.ids, w, temperature=tau)


class WeightTable(_IdTable):
    """Per-example training weights keyed by example id.

    Attributes:
      ids: int64, sorted, unique example ids.
      weights: float32 weights (finite, >= 0) aligned with ``ids``.
      temperature: the τ that produced them, when known.
    """

    _values_name = "weights"
    _format = "flowjax.WeightTable/1"

    def __init__(
        self, ids: ArrayLike, weights: ArrayLike, *, temperature: float | None = None
    ):
        super().__init__(ids, weights)
        self.temperature = None if temperature is None else float(temperature)

    def _check_values(self, values: np.ndarray, ids: np.ndarray) -> None:
        bad = values < 0
        if bad.any():
            raise ValueError(
                f"weights must be >= 0; negative at {_checks.describe(bad, ids, values)}."
            )

    @property
    def weights(self) -> np.ndarray:
        return self.values

    def _extra(self) -> dict[str, np.ndarray]:
        return {
            "temperature": np.array(
                np.nan if self.temperature is None else self.temperature
            )
        }

    @classmethod
    def _from_saved(cls, data):
        tau = float(data["temperature"])
        return cls(
            data["ids"], data["values"], temperature=None if np.isnan(tau) else tau
        )
