"""The one timing method of the benchmarks: alternated rounds, the fastest of a few calls.

Imports neither jax nor torch, so that :mod:`experiments.benchmarks.suite`
(jax) and :mod:`experiments.benchmarks.torch_flow` (PyTorch, its own venv)
time their figures the same way.

Within a round every function runs ``repeats`` times, interleaved in
mirrored order (A B C, C B A, A B C, ...), and the round keeps each
function's fastest call: load from another process slows calls, never
speeds one up, so the minimum of a few neighbouring calls is the steadiest
estimate of a function's own time, and A's and B's calls share the same
moments of the machine. The starting order rotates from round to round
(A B C, B C A, ...), so that no function always runs first or right after
the same other one. As :mod:`timeit` does, the garbage collector is off
during a timed call (a collection of a process holding jax's and the
model's objects takes tens of ms, and lands on whichever call allocates
when it is due); it runs between calls. A figure is the median over rounds
of the per-round ratio, with its range; a control (one function timed
under two labels) shows what the method itself gives for two equal things.

Example:
  >>> times = alternated_rounds({"a": lambda: 1, "b": lambda: 2}, rounds=3, repeats=2, warmups=1)
  >>> sorted(times), [len(v) for v in times.values()]
  (['a', 'b'], [3, 3])
  >>> ratios, _ = ratio_over(lambda: 1, {"base": lambda: 2}, rounds=2, warmups=0)
  >>> ratios.shape
  (2,)
  >>> summary([1.0, 2.0, 1.5])
  {'median': 1.5, 'min': 1.0, 'max': 2.0, 'rounds': 3}
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np


def alternated_rounds(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    repeats: int = 3,
    warmups: int = 2,
    sync: Callable[[object], object] = lambda x: x,
) -> dict[str, np.ndarray]:
    """Seconds of each function per round: the fastest of its ``repeats`` calls in the round.

    Args:
      fns: the functions to time, by label (the same function may appear
        under two labels: a control).
      rounds: rounds (one time per function each).
      repeats: timed calls of each function per round, interleaved.
      warmups: untimed calls of each function first (compilation, caches).
      sync: applied to each call's result inside the timing (e.g.
        ``jax.block_until_ready``: asynchronous work is waited for).

    Returns:
      ``{label: float64 [rounds]}``.
    """
    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds and repeats must be >= 1; got {rounds}, {repeats}.")
    for _ in range(warmups):
        for fn in fns.values():
            sync(fn())
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        best = dict.fromkeys(names, np.inf)
        for rep in range(repeats):
            for k in order if rep % 2 == 0 else order[::-1]:
                best[k] = min(best[k], _seconds(fns[k], sync))
        for k in names:
            times[k].append(best[k])
    return {k: np.asarray(v, np.float64) for k, v in times.items()}


def _seconds(fn: Callable[[], object], sync: Callable[[object], object]) -> float:
    """One timed call of ``fn`` (its result synced), with the garbage collector off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        sync(fn())
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def ratio_over(
    fn: Callable[[], object],
    base: dict[str, Callable[[], object]],
    rounds: int,
    **kw,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per round, ``fn``'s time over the fastest ``base`` function's, timed together and alone.

    Each ratio gets its own rounds (:func:`alternated_rounds` of ``fn`` and
    ``base`` only), so a round spans a few calls of two or three functions
    and the two sides of a ratio run moments apart: on a machine shared
    with another process, a control timed this way scattered about 4x
    less than one timed among six functions per round. ``base`` may hold
    ``fn`` itself (a control). ``kw`` goes to :func:`alternated_rounds`.

    With several ``base`` functions (two forms of one baseline), the
    baseline is the one whose median time over all rounds is the lowest,
    and every round's ratio is taken over that one. Not the fastest of them
    round by round: that minimum over two noisy times of equally fast
    functions is lower than either's time, so it would bias every ratio
    upwards by a share of the noise (with ``fn`` itself among two equal
    bases, the control came out above 1).

    Returns:
      ``(ratios [rounds], times)`` with ``times`` every label's seconds per
      round (``fn`` under ``"timed"``, the chosen baseline also under
      ``"base"``).
    """
    if "timed" in base or "base" in base:
        raise ValueError(
            '"timed" and "base" are the labels of fn and of the chosen baseline; name the '
            "base functions otherwise."
        )
    t = alternated_rounds({**base, "timed": fn}, rounds, **kw)
    t["base"] = t[min(base, key=lambda k: float(np.median(t[k])))]
    return t["timed"] / t["base"], t


def summary(per_round) -> dict:
    """The median over rounds and the range of per-round ratios."""
    per_round = np.asarray(per_round, np.float64)
    return {
        "median": round(float(np.median(per_round)), 4),
        "min": round(float(per_round.min()), 4),
        "max": round(float(per_round.max()), 4),
        "rounds": len(per_round),
    }
