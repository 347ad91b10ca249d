"""Reporting shared by every experiment: JSON, Markdown tables, mean ± std, paired differences.

Each experiment's driver (``experiments/digits/run.py``, ``experiments/lm/run.py``,
``experiments/theory/linear_theory.py``) builds a results dict that records its config
(:func:`config_dict`), summarises repeated runs with :func:`mean_std` and
:func:`paired_differences`, prints them with :func:`pm` into :func:`markdown_table` rows and
writes everything with :func:`write_json` / :func:`write_text`.

Conventions (the same in every experiment):

* Standard deviations are SAMPLE standard deviations, ``ddof = 1``, over seeds; a single value
  has std 0 (not NaN), so a one-seed smoke run still gives a table.
* Paired differences are taken seed by seed (``a[s] − b[s]``) and then summarised, so the
  seed-to-seed variation that two methods share cancels: the std of the differences, not the
  two stds combined.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def mean_std(values: Iterable[float], *, keep_values: bool = False) -> dict:
    """Mean and sample standard deviation of repeated measurements.

    .. math:: \\bar x = \\frac1n \\sum_i x_i, \\qquad
              s = \\sqrt{\\frac{1}{n-1} \\sum_i (x_i - \\bar x)^2} \\quad (s = 0 \\text{ for } n = 1).

    Args:
      values: one number per seed (or run); at least one, all finite.
      keep_values: also return the values themselves under ``"values"``.

    Returns:
      ``{"mean": float, "std": float}`` (plus ``"values": list`` when ``keep_values``).

    Raises:
      ValueError: ``values`` is empty or holds a NaN or an infinity (the offending positions
        are named).

    Example:
      >>> mean_std([1.0, 2.0, 6.0])
      {'mean': 3.0, 'std': 2.6457513110645907}
      >>> mean_std([0.5])
      {'mean': 0.5, 'std': 0.0}
    """
    x = np.asarray(list(values), float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"mean_std needs a non-empty list of numbers, got shape {x.shape}."
        )
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(
            f"mean_std: values at positions {bad.tolist()} are not finite: {x[bad].tolist()}."
        )
    out = {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
    }
    if keep_values:
        out["values"] = x.tolist()
    return out


def paired_differences(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict:
    """Mean ± std over seeds of the per-seed difference ``a[s] − b[s]``.

    .. math:: d_s = a_s - b_s, \\qquad \\text{result} = \\text{mean\\_std}(\\{d_s\\}_s)

    Args:
      a: one number per seed, keyed by seed.
      b: the same seeds, keyed by seed.

    Returns:
      :func:`mean_std` of the differences, in the order of ``a``'s seeds.

    Raises:
      ValueError: the two sides do not have the same seeds (the unpaired seeds are named), or
        a difference is not finite.

    Example:
      >>> paired_differences({0: 3.0, 1: 5.0}, {1: 2.0, 0: 1.0})
      {'mean': 2.5, 'std': 0.7071067811865476}
    """
    if set(a) != set(b):
        only_a = sorted(set(a) - set(b), key=str)
        only_b = sorted(set(b) - set(a), key=str)
        raise ValueError(
            f"paired_differences needs the same seeds on both sides: only in the first "
            f"{only_a}, only in the second {only_b}."
        )
    return mean_std([a[s] - b[s] for s in a])


def pm(stats: Mapping[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """``"mean ± std"`` of a :func:`mean_std` dict, scaled (100 for %) and rounded.

    Example:
      >>> pm({"mean": 0.9876, "std": 0.0123}, scale=100)
      '98.8 ± 1.2'
    """
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _row(cells: Sequence[Any]) -> str:
    return "|" + "".join(f" {c} |" if str(c) != "" else " |" for c in cells)


def markdown_table(
    header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | None = None
) -> str:
    """A GitHub Markdown table: a header row, a ``|---|`` separator, one line per row.

    Cells are written with ``str``; an empty cell is ``| |``.

    Args:
      header: the column titles.
      rows: the rows, each with as many cells as ``header``.
      align: one letter per column, ``l`` (default, ``---``) or ``r`` (``---:``);
        None: every column ``---``.

    Returns:
      The table's lines joined by newlines (no trailing newline).

    Raises:
      ValueError: a row has a different number of cells than the header (its index is named),
        or ``align`` does not have one ``l``/``r`` per column.

    Example:
      >>> print(markdown_table(["method", "acc"], [["FT", "98.8 ± 0.5"], ["LP", ""]]))
      | method | acc |
      |---|---|
      | FT | 98.8 ± 0.5 |
      | LP | |
    """
    header = list(header)
    align = "l" * len(header) if align is None else align
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(
            f"markdown_table: align={align!r} needs one of 'l'/'r' per column ({len(header)})."
        )
    sep = {"l": "---|", "r": "---:|"}
    lines = [_row(header), "|" + "".join(sep[a] for a in align)]
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(header):
            raise ValueError(
                f"markdown_table: row {i} has {len(row)} cells, the header has {len(header)}."
            )
        lines.append(_row(row))
    return "\n".join(lines)


def to_jsonable(x: Any) -> Any:
    """``x`` with numpy arrays and scalars, tuples and dataclasses turned into plain JSON types.

    Dict keys become strings (as :func:`json.dumps` would write them).

    Example:
      >>> to_jsonable({"a": np.arange(2), 1: (np.float32(0.5),)})
      {'a': [0, 1], '1': [0.5]}
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def config_dict(cfg: Any) -> dict:
    """The config of a run as plain JSON data (what ``results.json`` records under ``"config"``)."""
    return to_jsonable(cfg)


def write_json(path: Path, obj: Any) -> Any:
    """Writes ``obj`` as JSON (indent 1, UTF-8, trailing newline) and returns what was written.

    The return value is ``obj`` as it reads back from the file (plain dicts, lists, floats), so
    a driver can return exactly what a later ``json.loads`` of the file gives.

    Raises:
      ValueError: ``obj`` holds a NaN or an infinity (JSON has none; the key path is named).
    """
    data = to_jsonable(obj)
    _check_finite(data, "")
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return json.loads(Path(path).read_text())


def _check_finite(x: Any, where: str) -> None:
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(
            f"write_json: {where or 'the value'} is {x}; JSON has no NaN or inf."
        )
    if isinstance(x, dict):
        for k, v in x.items():
            _check_finite(v, f"{where}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _check_finite(v, f"{where}[{i}]")


def write_text(path: Path, text: str) -> None:
    """Writes a Markdown (or any text) report, UTF-8."""
    Path(path).write_text(text, encoding="utf-8")


def digest(value: Any) -> str:
    """SHA-256 (hex) of JSON data, or of the paths, dtypes, shapes and bytes of a tree of arrays.

    Names what a checkpointed training stage depends on (its config, its starting
    parameters, its weights): a stage's checkpoint directory carries it, so changed inputs
    get a new directory and a stale checkpoint is never restored.
    """
    import hashlib

    import jax

    h = hashlib.sha256()
    leaves = jax.tree.leaves(value)
    if leaves and all(isinstance(x, np.ndarray | jax.Array) for x in leaves):
        for path, x in jax.tree_util.tree_leaves_with_path(value):
            x = np.asarray(x)
            h.update(f"{jax.tree_util.keystr(path)}{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
    else:
        h.update(json.dumps(to_jsonable(value), sort_keys=True).encode())
    return h.hexdigest()


class ResumeLog:
    """What a rerun took from its checkpoints, from ``flowjax.fit``'s ``resumed from step N`` lines.

    Give :meth:`stage` as ``fit``'s ``log``: a stage resumed part-way prints
    ``<label>: resumed from step N``; finished stages restored whole are counted
    (:attr:`restored`) and the first one is announced, so a rerun of a hundred finished
    stages says so in one line.
    """

    def __init__(self, write=print):
        self.write = write
        self.restored: list[str] = []
        self.resumed: list[tuple[str, int]] = []

    def stage(self, label: str, num_steps: int):
        """``log(message)`` for the stage ``label`` of ``num_steps`` steps."""

        def log(message: str) -> None:
            if message.startswith("resumed from step"):
                step = int(message.split()[-1])
                if step == num_steps:
                    self.restored.append(label)
                    if len(self.restored) == 1:
                        self.write(
                            f"restored finished stage {label} from its checkpoint "
                            "(further finished stages are restored without a line each)"
                        )
                    return
                self.resumed.append((label, step))
                message = f"{label}: {message}"
            self.write(message)

        return log

    def summary(self, where: Any) -> str | None:
        """One line on what came from the checkpoints in ``where``, or None when nothing did."""
        if not self.restored and not self.resumed:
            return None
        parts = [f"restored {len(self.restored)} finished training stages"]
        if self.resumed:
            parts.append(
                "resumed "
                + ", ".join(f"{lab} from step {s}" for lab, s in self.resumed)
            )
        return f"{'; '.join(parts)} from {where} (bit-identical to a run without interruption)"
