"""The numbers of the digits experiment: per-method summaries over seeds and ``results.md``.

:func:`summarize` turns the per-seed rows of :func:`experiments.digits.run.run` into mean ±
std per method and metric, FLOW minus every other method and FLOW + X minus X paired by
seed (:func:`experiments.report.paired_differences`), τ and the WiSE-FT curves;
:func:`markdown` writes the tables of ``results.md`` from ``results.json`` alone.
"""

from __future__ import annotations

import numpy as np

from experiments import report
from experiments.digits import pareto
from experiments.digits.methods import METHODS

METRICS = (
    "pretrain_acc",
    "target_acc",
    "average",
    "hard_acc",
    "val_target_acc",
    "body_distance",
)


PAIRS = (("FLOW + LoRA", "LoRA"), ("FLOW + WiSE-FT", "WiSE-FT"))
DIFF_METRICS = ("pretrain_acc", "target_acc", "average", "hard_acc")


def summarize(per_seed: list[dict], names: list[str]) -> dict:
    """Mean and std (ddof 1; 0 for one seed) over seeds, per method and metric.

    Also: FLOW minus every other method and FLOW + X minus X, paired by seed;
    τ; the WiSE-FT curves averaged over seeds.
    """

    def by_seed(name, k):
        return {r["seed"]: r["methods"][name][k] for r in per_seed}

    def diff(a, b):
        return {
            k: report.paired_differences(by_seed(a, k), by_seed(b, k))
            for k in DIFF_METRICS
        }

    def stats(name, k):
        values = by_seed(name, k)
        if k == "body_distance":  # none for a diverged run
            values = {s: v for s, v in values.items() if v is not None}
            if not values:
                return None
        return report.mean_std(values.values())

    out = {name: {k: stats(name, k) for k in METRICS} for name in names}
    for name in names:
        out[name]["diverged_seeds"] = [
            r["seed"] for r in per_seed if r["methods"][name].get("diverged")
        ]
    out["pretrained"] = {
        "pretrain_test_acc": report.mean_std(
            [r["pretrained"]["pretrain_test_acc"] for r in per_seed]
        )
    }
    if "FLOW" in names:
        out["FLOW_minus"] = {o: diff("FLOW", o) for o in names if o != "FLOW"}
        out["tau"] = report.mean_std([r["flow"]["tau"] for r in per_seed])
    out["pairs"] = {
        f"{a} − {b}": diff(a, b) for a, b in PAIRS if a in names and b in names
    }
    curves = {}
    for base in per_seed[0].get("wise_ft_curve", {}):
        c = [r["wise_ft_curve"][base] for r in per_seed]
        curves[base] = {
            "alpha": c[0]["alpha"],
            **{
                k: {
                    "mean": np.mean([x[k] for x in c], 0).tolist(),
                    "std": (
                        np.std([x[k] for x in c], 0, ddof=1)
                        if len(c) > 1
                        else np.zeros(len(c[0][k]))
                    ).tolist(),
                }
                for k in ("target_acc", "pretrain_acc")
            },
        }
    out["wise_ft_curve"] = curves
    return out


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    """Accuracies in %: :func:`experiments.report.pm` scaled by 100 unless told otherwise."""
    return report.pm(s, scale, digits)


def _ess(per_seed: list[dict]) -> str:
    """The weights' effective sample size as a fraction of n, mean ± std over seeds."""
    fractions = [
        r["flow"]["diagnostics"]["ess_fraction"]
        for r in per_seed
        if "diagnostics" in r["flow"]
    ]
    if not fractions:
        return ""
    return (
        f"; effective sample size (Σw)²/Σw² = {_pm(report.mean_std(fractions))} % of n"
    )


def _distance(stats: dict) -> str:
    """‖θ−θ₀‖ of the runs that did not diverge, and how many did."""
    n = len(stats.get("diverged_seeds", []))
    text = "–" if stats["body_distance"] is None else _pm(stats["body_distance"], 1, 2)
    return text if not n else f"{text} ({n} diverged)"


def markdown(results: dict, names: list[str]) -> str:
    s, cfg = results["summary"], results["config"]
    n = len(results["per_seed"])
    lines = [
        "# FLOW on digits: pre-train 0-4, fine-tune 5-9",
        "",
        f"{n} seed(s) ({cfg['seed']}..{cfg['seed'] + n - 1}); accuracies in %, mean ± std over seeds; "
        f"pre-trained model on 0-4 test: {_pm(s['pretrained']['pretrain_test_acc'])}. "
        f"Every fine-tuning stage: {cfg['epochs']} epochs, batch {cfg['batch_size']}; "
        f"LR grid {list(cfg['lr_grid'])}, selected by 5-9 validation accuracy on seed {cfg['seed']} "
        "(the same rule for every method; WiSE-FT has no LR of its own). Pre-training "
        "accuracy: 0-4 test split after swapping the pre-trained head and BatchNorm back in.",
        "",
        report.markdown_table(
            [
                "method",
                "LR",
                "pre-training acc (0-4)",
                "target acc (5-9)",
                "average",
                "hard 10 %",
                "‖θ−θ₀‖ body",
                "recipe",
            ],
            [
                [
                    name,
                    pareto.lr_label(results["selected_lr"][name]),
                    *(_pm(s[name][k]) for k in DIFF_METRICS),
                    _distance(s[name]),
                    METHODS[name].describe(cfg),
                ]
                for name in names
            ],
        ),
    ]
    best = max(names, key=lambda k: s[k]["average"]["mean"])
    lines += ["", f"Best mean average: **{best}** ({_pm(s[best]['average'])})."]
    if "FLOW" in names:
        k = results["per_seed"][0]["flow"]["num_hard"]
        lines += [
            "",
            f"Hard examples (the paper's Table 5; column 'hard 10 %' above): accuracy on the {k} "
            "5-9 test examples (10 %) with the highest loss under the LP model (per seed).",
            "",
            report.markdown_table(
                ["method", "hard-example acc", "target acc"],
                [
                    [name, _pm(s[name]["hard_acc"]), _pm(s[name]["target_acc"])]
                    for name in ("FT", "LP-FT", "FLOW")
                    if name in names
                ],
            ),
            "",
            "FLOW minus each method, paired by seed (percentage points):",
            "",
            _diff_table("FLOW −", s["FLOW_minus"]),
        ]
        if s["pairs"]:
            lines += [
                "",
                "FLOW on top of another method, paired by seed (percentage points):",
                "",
                _diff_table("", s["pairs"]),
            ]
        lines += [
            "",
            f"τ (median LP loss, 5-9 train): {_pm(s['tau'], 1, 4)}; mean weight "
            f"{np.mean([r['flow']['weight_mean'] for r in results['per_seed']]):.3f}"
            + _ess(results["per_seed"])
            + ".",
        ]
        flow_lpft = s["FLOW_minus"].get("LP-FT")
        if flow_lpft is not None:
            d = flow_lpft["average"]
            verdict = (
                "FLOW beats its LP-FT control on the average"
                if d["mean"] - d["std"] > 0
                else "FLOW does NOT beat its LP-FT control on the average (the difference is within one std or negative)"
            )
            lines += ["", f"Note: {verdict}: {_pm(d)} points."]
    for base, c in s["wise_ft_curve"].items():
        lines += [
            "",
            f"WiSE-FT sweep of the {base} model (α = weight on θ₀; mean over seeds): "
            "target / pre-training acc in %:",
            "",
            report.markdown_table(
                ["α", *(f"{a:g}" for a in c["alpha"])],
                [
                    [label, *(f"{100 * v:.1f}" for v in c[k]["mean"])]
                    for label, k in (
                        ("target", "target_acc"),
                        ("pre-training", "pretrain_acc"),
                    )
                ],
            ),
        ]
    lines += [
        "",
        f"LR grid on seed {cfg['seed']}: 5-9 validation accuracy (the selection criterion) / "
        "5-9 test / 0-4 test after the swap, in % (test numbers shown for context only):",
    ]
    rows = []
    for name, g in results["lr_selection"].items():
        cells = {
            lr: f"{100 * v:.1f} / {100 * t:.1f} / {100 * p:.1f}"
            + (" *" if lr == results["selected_lr"][name] else "")
            for lr, v, t, p in zip(
                g["lr"],
                g["val_target_acc"],
                g["target_acc"],
                g["pretrain_acc"],
                strict=True,
            )
        }
        rows.append([name, *(cells.get(lr, "") for lr in cfg["lr_grid"])])
    lines += [
        "",
        report.markdown_table(
            ["method", *(f"LR {lr:g}" for lr in cfg["lr_grid"])], rows
        ),
        "\n\\* selected.",
    ]
    lines += [
        "",
        f"Command: `{results['command']}` (wall-clock times: `timing.json`).",
    ]
    return "\n".join(lines) + "\n"


def _diff_table(corner: str, diffs: dict) -> str:
    """Paired differences (one row per comparison) in percentage points."""
    return report.markdown_table(
        [corner, "pre-training acc", "target acc", "average", "hard-example acc"],
        [[o, *(_pm(d[k]) for k in DIFF_METRICS)] for o, d in diffs.items()],
    )
