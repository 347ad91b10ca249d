"""FLOW diagnostics: how concentrated a weight table is, and which examples it gives up on.

FLOW's weights :math:`w_i = \\exp(-f_i(\\theta^*)/\\tau)` can put most of the
training signal on few examples. These host-side functions show it at once
from a :class:`flowjax.WeightTable` (and, for the losses, its
:class:`flowjax.LossTable`):

* :func:`effective_sample_size`: :math:`(\\sum w)^2 / \\sum w^2`, the number
  of equally weighted examples the weighted objective is worth;
* :func:`weight_histogram` (counts and bin edges) and
  :func:`plot_weight_histogram` (a saved matplotlib figure; matplotlib is
  imported only there, from the ``test`` / ``experiments`` extras);
* :func:`most_down_weighted`: the ids, weights and losses of the examples
  with the smallest weights;
* :func:`weight_summary`: a small dict and a one-paragraph text for experiments to
  print.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from flowjax import _checks
from flowjax._types import ArrayLike
from flowjax.tables import LossTable, WeightTable

__all__ = [
    "DownWeighted",
    "WeightHistogram",
    "effective_sample_size",
    "most_down_weighted",
    "plot_weight_histogram",
    "weight_histogram",
    "weight_summary",
]


class WeightHistogram(NamedTuple):
    """A histogram of weights: ``counts[b]`` weights lie in ``[edges[b], edges[b + 1])`` (the last bin closed), as :func:`numpy.histogram`."""

    counts: np.ndarray
    edges: np.ndarray


class DownWeighted(NamedTuple):
    """The most down-weighted examples, smallest weight first: their ``ids``, ``weights`` and pre-trained ``losses`` (``None`` without a loss table)."""

    ids: np.ndarray
    weights: np.ndarray
    losses: np.ndarray | None


def _weights(weights: WeightTable | ArrayLike) -> np.ndarray:
    """The weights as float64, checked: 1-D, non-empty, finite, >= 0, not all 0."""
    if isinstance(weights, WeightTable):
        w = weights.weights.astype(np.float64)
    else:
        w = np.asarray(weights)
        if w.dtype == np.bool_ or not (
            np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)
        ):
            raise ValueError(f"weights must be numbers; got dtype {w.dtype}.")
        if w.ndim != 1:
            raise ValueError(f"weights must be 1-D [n]; got shape {w.shape}.")
        w = w.astype(np.float64)
        _checks.check_finite(w, "weights")
        if (w < 0).any():
            raise ValueError(
                f"weights must be >= 0; negative at {_checks.describe(w < 0, values=w)}."
            )
    if not len(w):
        raise ValueError("weights is empty: no examples.")
    return w


def _table(weights) -> WeightTable:
    if not isinstance(weights, WeightTable):
        raise ValueError(
            f"weights must be a flowjax.WeightTable (ids are needed); got "
            f"{type(weights).__name__}."
        )
    if not len(weights.ids):
        raise ValueError("the weight table is empty: no examples.")
    return weights


def effective_sample_size(
    weights: WeightTable | ArrayLike, *, fraction: bool = False
) -> float:
    """Kish's effective sample size of the weights: how many equally weighted examples they are worth.

    .. math:: \\mathrm{ESS} = \\frac{(\\sum_i w_i)^2}{\\sum_i w_i^2} \\in [1, n]

    ``n`` for uniform weights, 1 when a single weight is non-zero; invariant
    to rescaling the weights (so ``normalize=`` does not change it). With
    ``fraction=True`` it is divided by ``n``, in ``(0, 1]``.

    Args:
      weights: a :class:`flowjax.WeightTable` or a 1-D array of weights
        (finite, >= 0, not all 0).
      fraction: return ``ESS / n`` instead of ``ESS``.

    Returns:
      A float.

    Raises:
      ValueError: no weights, weights that are not 1-D numbers, NaN/inf or
        negative (naming the positions), or all weights 0.

    Example:
      >>> import flowjax
      >>> flowjax.effective_sample_size([1.0, 1.0, 0.0, 0.0])
      2.0
      >>> flowjax.effective_sample_size([1.0, 1.0, 0.0, 0.0], fraction=True)
      0.5
    """
    w = _weights(weights)
    scale = w.max()
    if scale == 0:
        raise ValueError("every weight is 0: the effective sample size is undefined.")
    w = w / scale  # no overflow of the squares
    ess = float(w.sum() ** 2 / (w**2).sum())
    return ess / len(w) if fraction else ess


def weight_histogram(
    weights: WeightTable | ArrayLike,
    bins: int | ArrayLike = 20,
    *,
    value_range: tuple[float, float] | None = None,
) -> WeightHistogram:
    """The histogram of the weights: counts per bin and the bin edges, as :func:`numpy.histogram`.

    .. math:: c_b = \\#\\{i : e_b \\le w_i < e_{b+1}\\} \\quad (\\text{the last bin also counts } w_i = e_B)

    Args:
      weights: a :class:`flowjax.WeightTable` or a 1-D array of weights.
      bins: the number of equal-width bins, or the edges (increasing).
      value_range: ``(low, high)`` of the bins; default: the weights' min
        and max (``numpy.histogram``'s ``range``).

    Returns:
      A :class:`WeightHistogram` ``(counts, edges)``: int64 ``[B]`` and
      float64 ``[B + 1]`` (computed in the weights' dtype, float32 for a
      table, then widened, so they equal ``numpy.histogram``'s).

    Raises:
      ValueError: what :func:`effective_sample_size` raises for the weights
        (all-zero weights are allowed here), or bins/range
        :func:`numpy.histogram` rejects.

    Example:
      >>> import flowjax
      >>> h = flowjax.weight_histogram([0.1, 0.2, 0.9, 1.0], bins=2, value_range=(0.0, 1.0))
      >>> h.counts.tolist(), h.edges.tolist()
      ([2, 2], [0.0, 0.5, 1.0])
    """
    _weights(weights)  # checked; binned in their own dtype, exactly as numpy.histogram
    w = weights.weights if isinstance(weights, WeightTable) else np.asarray(weights)
    counts, edges = np.histogram(w, bins=bins, range=value_range)
    return WeightHistogram(counts.astype(np.int64), edges.astype(np.float64))


def most_down_weighted(
    weights: WeightTable, k: int = 10, losses: LossTable | None = None
) -> DownWeighted:
    """The k examples FLOW down-weights most: smallest weights first, ties by smaller id.

    .. math:: \\text{the first } k \\text{ ids in the order of } (w_i, \\text{id}_i)

    With FLOW's weights these are the examples of largest pre-trained loss
    (:math:`w_i = \\exp(-f_i/\\tau)` decreases in :math:`f_i`): the ones the
    fine-tuning almost ignores.

    Args:
      weights: the :class:`flowjax.WeightTable`.
      k: how many examples, an int >= 1 (fewer if the table is smaller).
      losses: the :class:`flowjax.LossTable` the weights came from, to report
        each example's pre-trained loss; ``None`` for no losses.

    Returns:
      A :class:`DownWeighted` ``(ids, weights, losses)`` of ``min(k, n)``
      entries (``losses`` is ``None`` without a loss table).

    Raises:
      ValueError: ``weights`` is not a non-empty WeightTable, ``k`` is not an
        int >= 1, or ids of the weight table are missing from ``losses``
        (naming them).

    Example:
      >>> import flowjax
      >>> lt = flowjax.LossTable([5, 6, 7, 8], [0.2, 3.0, 1.0, 3.0])
      >>> d = flowjax.most_down_weighted(lt.flow_weights(), k=2, losses=lt)
      >>> d.ids.tolist(), d.losses.tolist()
      ([6, 8], [3.0, 3.0])
    """
    table = _table(weights)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}.")
    order = np.lexsort((table.ids, table.weights))[: int(k)]
    ids = table.ids[order]
    found_losses = None
    if losses is not None:
        if not isinstance(losses, LossTable):
            raise ValueError(
                f"losses must be a flowjax.LossTable or None; got {type(losses).__name__}."
            )
        pos, found = _checks.find_sorted(losses.ids, ids)
        if not found.all():
            raise ValueError(
                f"the loss table lacks the weight table's {_checks.describe(~found, ids)}."
            )
        found_losses = losses.losses[pos]
    return DownWeighted(ids, table.weights[order], found_losses)


def plot_weight_histogram(
    weights: WeightTable | ArrayLike,
    path: str | os.PathLike,
    bins: int | ArrayLike = 30,
    *,
    log: bool = False,
    title: str | None = None,
) -> str:
    """Saves a bar plot of :func:`weight_histogram` to ``path`` (the format from its extension, e.g. ``.png``).

    .. math:: \\text{bars } c_b \\text{ over } [e_b, e_{b+1}), \\text{ titled with } n,\\ \\tau,\\ \\mathrm{ESS}/n

    matplotlib is imported here, not when flowjax is: it comes with the
    ``test`` and ``experiments`` extras. The figure is drawn on its own
    (``matplotlib.figure.Figure``, no pyplot state), so it works headless
    and in threads.

    Args:
      weights: a :class:`flowjax.WeightTable` or a 1-D array of weights.
      path: the file to write; its folder must exist.
      bins: as for :func:`weight_histogram`.
      log: a logarithmic count axis (to see the few examples in the low bins).
      title: the title; default: ``n``, τ (for a table that knows it) and
        ESS/n.

    Returns:
      ``path`` as a string.

    Raises:
      ImportError: matplotlib is not installed (install ``flowjax-ft[experiments]``).
      ValueError: what :func:`weight_histogram` raises.

    Example:
      >>> import os, tempfile, flowjax
      >>> path = os.path.join(tempfile.mkdtemp(), "weights.png")
      >>> w = flowjax.LossTable([1, 2, 3], [0.1, 1.0, 4.0]).flow_weights()
      >>> os.path.getsize(flowjax.plot_weight_histogram(w, path, bins=5)) > 0
      True
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_weight_histogram needs matplotlib: pip install 'flowjax-ft[experiments]'."
        ) from e
    hist = weight_histogram(weights, bins)
    if title is None:
        w = _weights(weights)
        tau = getattr(weights, "temperature", None)
        parts = [f"n = {len(w)}"]
        if tau is not None:
            parts.append(f"τ = {tau:.4g}")
        if w.max() > 0:
            parts.append(f"ESS/n = {effective_sample_size(w, fraction=True):.3f}")
        title = "FLOW weights: " + ", ".join(parts)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.stairs(hist.counts, hist.edges, fill=True)
    ax.set_xlabel("weight")
    ax.set_ylabel("examples")
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    return path


def weight_summary(
    weights: WeightTable,
    losses: LossTable | None = None,
    *,
    threshold: float = 0.1,
    k: int = 5,
) -> tuple[dict, str]:
    """A small dict and a short text describing a weight table, for experiments to print.

    .. math:: n,\\ \\tau,\\ \\bar w,\\ \\mathrm{ESS} = \\frac{(\\sum w)^2}{\\sum w^2},\\
        \\frac{\\mathrm{ESS}}{n},\\ \\frac{\\#\\{w_i < 0.1\\}}{n}

    plus the ``k`` most down-weighted ids (:func:`most_down_weighted`). The
    threshold compares raw weights: for FLOW's unnormalised weights,
    ``w < 0.1`` means ``f_i > τ ln 10 ≈ 2.3 τ``.

    Args:
      weights: the :class:`flowjax.WeightTable`.
      losses: its :class:`flowjax.LossTable`, to report the down-weighted
        examples' losses; optional.
      threshold: the weight below which an example counts as down-weighted.
      k: how many down-weighted ids to list.

    Returns:
      ``(info, text)``: ``info`` is a JSON-serialisable dict with keys
      ``n``, ``temperature`` (``None`` when unknown), ``mean_weight``,
      ``ess``, ``ess_fraction``, ``threshold``, ``fraction_below``,
      ``down_weighted_ids`` and ``down_weighted_weights`` (and
      ``down_weighted_losses`` with a loss table); ``text`` says the same in
      two lines.

    Raises:
      ValueError: what :func:`effective_sample_size` and
        :func:`most_down_weighted` raise.

    Example:
      >>> import flowjax
      >>> lt = flowjax.LossTable([1, 2, 3, 4], [0.5, 1.0, 1.0, 5.0])
      >>> info, text = flowjax.weight_summary(lt.flow_weights(), lt, k=2)
      >>> info["n"], info["temperature"], info["down_weighted_ids"], info["fraction_below"]
      (4, 1.0, [4, 2], 0.25)
      >>> print(text)
      FLOW weights: n = 4, τ = 1, mean weight = 0.337, ESS = 2.85 (0.712 of n), 25.0% below 0.1
      most down-weighted ids: 4 (w = 0.00674, loss = 5), 2 (w = 0.368, loss = 1)
    """
    table = _table(weights)
    w = table.weights.astype(np.float64)
    ess = effective_sample_size(table)
    down = most_down_weighted(table, k, losses)
    info = {
        "n": len(w),
        "temperature": table.temperature,
        "mean_weight": float(w.mean()),
        "ess": ess,
        "ess_fraction": ess / len(w),
        "threshold": float(threshold),
        "fraction_below": float((w < threshold).mean()),
        "down_weighted_ids": down.ids.tolist(),
        "down_weighted_weights": down.weights.astype(np.float64).tolist(),
    }
    if down.losses is not None:
        info["down_weighted_losses"] = down.losses.astype(np.float64).tolist()
    tau = "unknown" if table.temperature is None else f"{table.temperature:.4g}"
    head = (
        f"FLOW weights: n = {info['n']}, τ = {tau}, mean weight = "
        f"{info['mean_weight']:.3g}, ESS = {ess:.3g} ({info['ess_fraction']:.3g} of n), "
        f"{100 * info['fraction_below']:.1f}% below {threshold:g}"
    )
    items = []
    for i, (id_, wi) in enumerate(zip(down.ids, down.weights, strict=True)):
        extra = "" if down.losses is None else f", loss = {down.losses[i]:.3g}"
        items.append(f"{id_} (w = {wi:.3g}{extra})")
    return info, head + "\nmost down-weighted ids: " + ", ".join(items)
