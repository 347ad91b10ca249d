"""The digits experiment's ``pareto.png``: target accuracy against pre-training accuracy.

Drawn from ``results.json`` alone (``python -m experiments.digits.run --replot``
redraws it without training). Left: a panel zoomed on the methods, one marker
per method at its mean over seeds with ± std error bars and a label; methods
whose mean lies far outside the others (:func:`zoom_box`) are drawn at the
panel's edge with their mean values and an arrow toward them; the WiSE-FT α
sweeps (means over seeds) are clipped to the view with a few α values marked.
Right: the full range, every method and both sweeps, with the zoom box.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

OUTLIER_MADS = 10.0  # a mean this many robust stds from the median is outside the zoom
MIN_SPREAD = 1.0  # floor of that robust std (percentage points), for tied means
MARGIN = 0.12  # zoom margin as a fraction of the box size
MIN_MARGIN = 0.6  # ... and at least this many percentage points
HIGHLIGHT = "FLOW"
# distinct, dark enough on white; red is kept for FLOW
PALETTE = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
    "black",
    "darkgoldenrod",
    "navy",
)
ALPHA_GAP = 45  # px: α labels at least this far from each other and from the methods


def zoom_box(x, y, *, k: float = OUTLIER_MADS):
    """Axis limits around the bulk of the points, and which points lie inside them.

    A point is an outlier when, on either axis, its distance to the median is
    more than ``k`` robust standard deviations (1.4826 × median absolute
    deviation, at least ``MIN_SPREAD``). The box spans the other points with a
    margin of ``MARGIN`` × its size (at least ``MIN_MARGIN``) on each side.

    Args:
      x, y: 1-D arrays of the same length (percentages).
      k: the outlier threshold in robust standard deviations.

    Returns:
      ``(xlim, ylim, inside)``: two ``(low, high)`` tuples and a boolean array,
      True for the points drawn in the box (all points if fewer than 3).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"x and y must be equal-length 1-D arrays, got {x.shape}, {y.shape}."
        )
    inside = np.ones(x.size, bool)
    if x.size >= 3:
        for v in (x, y):
            med = np.median(v)
            sigma = max(1.4826 * np.median(np.abs(v - med)), MIN_SPREAD)
            inside &= np.abs(v - med) <= k * sigma

    def lim(v):
        lo, hi = v[inside].min(), v[inside].max()
        m = max(MARGIN * (hi - lo), MIN_MARGIN)
        return (float(lo - m), float(hi + m))

    return lim(x), lim(y), inside


def _colors(names: list[str]) -> dict:
    others = iter(PALETTE * (1 + len(names) // len(PALETTE)))
    return {n: "tab:red" if n == HIGHLIGHT else next(others) for n in names}


def _arrow(dx: int, dy: int) -> str:
    return {
        (0, -1): "↓",
        (0, 1): "↑",
        (-1, 0): "←",
        (1, 0): "→",
        (-1, -1): "↙",
        (1, -1): "↘",
        (-1, 1): "↖",
        (1, 1): "↗",
    }[(dx, dy)]


class _Labeller:
    """Places text labels next to points, avoiding labels already placed and the markers."""

    OFFSETS = (
        (7, 5),
        (7, -12),
        (-7, 5),
        (-7, -12),
        (0, 11),
        (0, -17),
        (12, -3),
        (-12, -3),
    )

    def __init__(self, ax, points, lines=()):
        self.ax, self.boxes = ax, []
        self.fig = ax.figure
        self.renderer = self.fig.canvas.get_renderer()
        trans = ax.transData
        self.markers = [trans.transform(p) for p in points]
        # error bars and curves, as points every ~3 px
        dots = []
        for line in lines:
            d = trans.transform(np.asarray(line, float))
            for a, b in itertools.pairwise(d):
                k = max(2, int(np.hypot(*(b - a)) / 3) + 1)
                dots.append(a + np.linspace(0, 1, k)[:, None] * (b - a))
        self.dots = np.concatenate(dots) if dots else np.zeros((0, 2))
        self.frame = ax.get_window_extent(self.renderer)

    def _cost(self, bb) -> float:
        cost = sum(
            max(0, min(bb.x1, o.x1) - max(bb.x0, o.x0))
            * max(0, min(bb.y1, o.y1) - max(bb.y0, o.y0))
            for o in self.boxes
        )
        cost += sum(
            400
            for (mx, my) in self.markers
            if bb.x0 - 4 < mx < bb.x1 + 4 and bb.y0 - 4 < my < bb.y1 + 4
        )
        d = self.dots
        cost += 30 * np.sum(
            (d[:, 0] > bb.x0)
            & (d[:, 0] < bb.x1)
            & (d[:, 1] > bb.y0)
            & (d[:, 1] < bb.y1)
        )
        f = self.frame
        outside = (bb.x0 < f.x0) + (bb.x1 > f.x1) + (bb.y0 < f.y0) + (bb.y1 > f.y1)
        return cost + 10_000 * outside

    def add(self, text: str, xy, offsets=None, **kw):
        best = None
        for dx, dy in offsets or self.OFFSETS:
            t = self.ax.annotate(
                text,
                xy,
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                annotation_clip=False,
                **kw,
            )
            bb = t.get_window_extent(self.renderer)
            cost = self._cost(bb)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, bb)
            else:
                t.remove()
            if cost == 0:
                break
        self.boxes.append(best[2])
        return best[1]


def _curves(s: dict):
    for base, curve in s["wise_ft_curve"].items():
        wise = "WiSE-FT" if base == "FT" else f"{base} + WiSE-FT"
        x, y = (
            100 * np.asarray(curve[k]["mean"]) for k in ("target_acc", "pretrain_acc")
        )
        yield base, wise, np.asarray(curve["alpha"]), x, y


def plot_pareto(
    results: dict, names: list[str], markers: dict[str, str], path: Path
) -> None:
    """Draws ``pareto.png`` from the results dictionary (see the module docstring)."""
    s = results["summary"]
    n = len(results["per_seed"])
    colors = _colors(names)
    mx = np.array([100 * s[k]["target_acc"]["mean"] for k in names])
    my = np.array([100 * s[k]["pretrain_acc"]["mean"] for k in names])
    sx = np.array([100 * s[k]["target_acc"]["std"] for k in names])
    sy = np.array([100 * s[k]["pretrain_acc"]["std"] for k in names])
    pre = 100 * s["pretrained"]["pretrain_test_acc"]["mean"]
    xlim, ylim, inside = zoom_box(mx, my)

    fig = plt.figure(figsize=(13, 6.6))
    # a fixed layout: label placement below measures text in the final transforms
    gs = fig.add_gridspec(
        2,
        2,
        width_ratios=(2.1, 1),
        height_ratios=(1.15, 1),
        left=0.055,
        right=0.99,
        bottom=0.08,
        top=0.9,
        wspace=0.14,
        hspace=0.3,
    )
    ax, full, leg = (
        fig.add_subplot(gs[:, 0]),
        fig.add_subplot(gs[0, 1]),
        fig.add_subplot(gs[1, 1]),
    )
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    fig.canvas.draw()  # fixes the transforms for label placement

    # main panel: sweeps (clipped by the axes), then methods
    for _, wise, _, x, y in _curves(s):
        c = colors.get(wise, "k")
        ax.plot(x, y, ls="--", lw=1.1, color=c, alpha=0.8, marker=".", ms=4, zorder=1)
    ax.axhline(pre, color="k", ls=":", lw=1, zorder=0)
    px = np.clip(mx, *xlim)
    py = np.clip(my, *ylim)
    lines = [np.stack([x, y], 1) for *_, x, y in _curves(s)]
    for i in np.flatnonzero(inside):
        lines.append([(mx[i] - sx[i], my[i]), (mx[i] + sx[i], my[i])])
        lines.append([(mx[i], my[i] - sy[i]), (mx[i], my[i] + sy[i])])
    lab = _Labeller(ax, list(zip(px, py, strict=True)), lines)
    for i, name in enumerate(names):
        c, big = colors[name], name == HIGHLIGHT
        style = dict(
            color=c,
            ms=15 if big else 9,
            mec="k" if big else c,
            mew=1.2 if big else 1,
            zorder=5 if big else 3,
        )
        if inside[i]:
            ax.errorbar(
                mx[i],
                my[i],
                xerr=sx[i],
                yerr=sy[i],
                fmt=markers[name],
                capsize=3,
                elinewidth=2 if big else 1,
                **style,
            )
            lab.add(
                name,
                (mx[i], my[i]),
                color=c,
                fontsize=11 if big else 9,
                fontweight="bold" if big else "normal",
                zorder=6,
            )
        else:
            # clamp to the edge, a little inside so the marker is whole
            pad_x, pad_y = 0.02 * (xlim[1] - xlim[0]), 0.02 * (ylim[1] - ylim[0])
            ex = np.clip(mx[i], xlim[0] + pad_x, xlim[1] - pad_x)
            ey = np.clip(my[i], ylim[0] + pad_y, ylim[1] - pad_y)
            dx, dy = int(np.sign(mx[i] - ex)), int(np.sign(my[i] - ey))
            ax.plot(ex, ey, markers[name], mfc="none", **style)
            lab.add(
                f"{name} ({mx[i]:.1f}, {my[i]:.1f}) {_arrow(dx, dy)}",
                (ex, ey),
                offsets=((8, -4), (-8, -4), (8, 6), (-8, 6), (0, 9)),
                color=c,
                fontsize=9,
                fontweight="bold" if big else "normal",
                zorder=6,
            )
    # α labels on the sweeps: only points in view, spaced apart and away from
    # the method markers (α = 0 and the WiSE-FT α coincide with methods)
    taken = [ax.transData.transform(p) for p in zip(px, py, strict=True)]
    for _, wise, alpha, x, y in _curves(s):
        c = colors.get(wise, "k")
        for a, xi, yi in zip(alpha, x, y, strict=True):
            if not (xlim[0] <= xi <= xlim[1] and ylim[0] <= yi <= ylim[1]):
                continue
            d = ax.transData.transform((xi, yi))
            if min((np.hypot(*(d - q)) for q in taken), default=np.inf) < ALPHA_GAP:
                continue
            taken.append(d)
            lab.add(
                f"α={a:g}",
                (xi, yi),
                offsets=((-4, 4), (4, -9), (4, 4), (-4, -9)),
                color=c,
                fontsize=7,
                alpha=0.9,
            )
    ax.set_xlabel("target accuracy, digits 5-9 test (%)")
    ax.set_ylabel("pre-training accuracy, digits 0-4 test (%)")
    ax.grid(alpha=0.3)
    out = [k for k, ok in zip(names, inside, strict=True) if not ok]
    ax.set_title(
        f"zoom on the methods: mean ± std over {n} seed(s)"
        + (
            f"; outside the zoom (hollow, at the edge, with their means): {', '.join(out)}"
            if out
            else ""
        ),
        fontsize=9,
    )

    # full range
    for _, wise, alpha, x, y in _curves(s):
        c = colors.get(wise, "k")
        full.plot(x, y, ls="--", lw=1, color=c, marker=".", ms=3, zorder=1)
        if len(alpha):  # α = 0 is the base method's marker
            full.annotate(
                f"α={alpha[-1]:g}",
                (x[-1], y[-1]),
                xytext=(3, -9),
                textcoords="offset points",
                fontsize=6,
                color=c,
            )
    for i, name in enumerate(names):
        big = name == HIGHLIGHT
        full.errorbar(
            mx[i],
            my[i],
            xerr=sx[i],
            yerr=sy[i],
            fmt=markers[name],
            color=colors[name],
            mec="k" if big else colors[name],
            ms=10 if big else 6,
            elinewidth=0.7,
            capsize=1.5,
            zorder=5 if big else 3,
        )
    full.axhline(pre, color="k", ls=":", lw=1, zorder=0)
    full.add_patch(
        Rectangle(
            (xlim[0], ylim[0]),
            xlim[1] - xlim[0],
            ylim[1] - ylim[0],
            fill=False,
            ec="0.3",
            lw=1,
            ls="-.",
        )
    )
    full.set_title("full range (box: the zoom)", fontsize=9)
    full.set_xlabel("target acc (%)", fontsize=8)
    full.set_ylabel("pre-training acc (%)", fontsize=8)
    full.tick_params(labelsize=7)
    full.grid(alpha=0.3)

    # legend: markers, selected LR, mean values
    handles = [
        plt.Line2D(
            [],
            [],
            ls="none",
            marker=markers[k],
            color=colors[k],
            mec="k" if k == HIGHLIGHT else colors[k],
            ms=8,
            label=f"{k} (LR {lr_label(results['selected_lr'][k])}): {mx[i]:.1f}, {my[i]:.1f}",
        )
        for i, k in enumerate(names)
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            ls="--",
            color=colors.get(wise, "k"),
            marker=".",
            label=f"{wise} sweep α=0…1 (α=0: {base}, 1: θ₀)",
        )
        for base, wise, *_ in _curves(s)
    ]
    handles.append(
        plt.Line2D([], [], ls=":", color="k", label=f"pre-trained model ({pre:.1f})")
    )
    leg.axis("off")
    leg.legend(
        handles=handles,
        loc="center",
        fontsize=7.5,
        ncol=1,
        title="method (selected LR): target, pre-training mean %",
        title_fontsize=7.5,
        frameon=False,
    )
    fig.suptitle(
        "Forgetting vs learning: pre-train on digits 0-4, fine-tune on 5-9 "
        "(pre-training accuracy with the pre-trained head and BatchNorm swapped back)",
        fontsize=10.5,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_label(lr) -> str:
    """A learning rate for a table or legend; "—" for a method without one."""
    return "—" if lr is None else f"{lr:g}"
