"""FLOW's forgetting result on real data: pre-train on digits 0-4, fine-tune on 5-9.

Command (from the repository root)::

    python -m experiments.digits.run            # 10 seeds, writes results/digits/
    python -m experiments.digits.run --out DIR  # elsewhere
    python -m experiments.digits.run --quick    # 1 seed, tiny budget (smoke test)

Outputs: ``results.json`` (config, selected learning rates with their
validation grid, per-seed per-method numbers, runtime), ``results.md`` (the
tables), ``pareto.png`` (target accuracy against pre-training accuracy, mean ±
std per method, like the paper's Figure 2), ``weights.png`` (the FLOW
pre-pass losses and weights with τ marked).

The paper's vision protocol (FLOW_PAPER.md §2.1, steps V1-V5) on
scikit-learn's ``load_digits`` (1,797 8×8 images, pixels / 16) with the small
BatchNorm CNN of :mod:`experiments.digits.model`:

* Split (fixed for every seed): stratified test 20 % (seed 0); validation =
  20 % of the rest, stratified. Pre-training task: digits 0-4; fine-tuning
  task: digits 5-9, labels 0-4, a NEW head.
* Pre-training: 0-4 train split, all parameters, SGD momentum 0.9, weight
  decay 5e-4, per-epoch cosine, random ±1-pixel translations. One
  pre-trained model per seed, kept in memory.
* Standard FT (V5): pre-trained body + fresh head, everything trainable,
  mean CE, per-epoch cosine ``lr_e = lr (1 + cos(π e / E)) / 2``.
* LP (V1): body frozen, fresh head trained, constant LR. As in the official
  code, BatchNorm stays in train mode, so its running statistics adapt to
  digits 5-9 although every body parameter (BN scale and bias too) is frozen.
* LP-FT: from the LP model, everything trainable, cosine, unweighted: the
  control for FLOW, which starts from the same LP model.
* FLOW (V2-V4): τ = median of the LP model's eval-mode per-example CE over
  the 5-9 TRAIN split, from one ``flowjax.per_example_losses`` pre-pass;
  ``w_i = exp(-ℓ_i / τ)`` (``LossTable.flow_weights()``), attached to each
  batch by example id. Round 1: from the LP model, everything trainable,
  ``Σ w_i CE_i / B`` (``flowjax.weighted_loss``, reduction "mean"), cosine.
  Round 2: head only, unweighted CE, constant LR (the LP learning rate).
  Deliberate difference from the official code: the weights are computed ONCE
  on un-augmented images (Algorithm 1), not recomputed on every augmented
  batch.
* Every fine-tuning stage (FT, LP, LP-FT, FLOW round 1, FLOW round 2) runs
  the same number of epochs E; LP-FT and FLOW also inherit the LP stage, as in
  the official pipeline.
* Evaluation (eval mode, final epoch; no checkpoint selection): target
  accuracy on the 5-9 test split; pre-training accuracy on the 0-4 test split
  after putting the pre-trained head and the pre-trained BatchNorm (scale,
  bias, running mean and variance) back into the fine-tuned body; average =
  their mean. Hard examples (the paper's Table 5): accuracy on the 10 % of
  5-9 test examples with the highest loss under the LP model (the paper's
  "pre-trained loss" needs a head; the LP model supplies it, as in V2).
* Learning rates: the SAME rule for every method: the grid
  ``Config.lr_grid`` is run on the first seed, and the LR with the best
  VALIDATION accuracy on digits 5-9 is used for every seed (ties: the smallest
  LR). The test split is never used for selection (the official code selects
  on test). FLOW's round 2 and every use of the LP model reuse LP's choice.
* Seeds (default 10) change the pre-training init, the head init, shuffling
  and augmentation; the split is fixed. Tables report mean ± std over seeds.

Adding a method is one function ``fit(run, lr) -> Net`` plus one
:class:`Method` entry in ``METHODS``. Hooks: ``run.train(...)`` takes
``extra_tx`` (an optax transformation on the trainable gradients: L2-SP, EWC),
``objective`` (the loss from the train-mode module, batch and ``reference``
arrays: LwF, DRO), ``weights`` (a ``flowjax.WeightTable``) and ``trainable``
(a boolean :class:`~experiments.digits.model.Net`, e.g. LoRA parameters + head).
``run.fit(name, lr)`` returns another method's model, memoised per seed
(WiSE-FT interpolates ``run.fit("FT", run.lrs["FT"])`` with
``run.pretrained``; FLOW + X reuses ``run.flow_weights()``); a method with
``lr_grid=()`` has no LR to select.

Numbers the default command produced (10 seeds; 2 min 52 s wall, 1 min 37 s
user CPU, on the shared 2-core CPU at load average ~8; the numbers repeat
exactly from run to run). Accuracies in %, mean ± std over seeds; the
pre-trained model scores 99.7 ± 0.4 on the 0-4 test split::

    method  LR    pre-training (0-4)  target (5-9)  average     hard 10 %
    LP      0.01  99.7 ± 0.4          86.7 ± 3.6    93.2 ± 1.8    5.6 ± 7.4
    FT      0.1   53.0 ± 15.0         99.9 ± 0.2    76.4 ± 7.5  100.0 ± 0.0
    LP-FT   0.01  97.8 ± 2.1          99.8 ± 0.3    98.8 ± 1.0   97.8 ± 2.9
    FLOW    0.03  98.1 ± 2.5          98.4 ± 0.9    98.3 ± 1.4   90.0 ± 10.1

FLOW − FT, paired by seed: +45.1 ± 14.9 pre-training, −1.4 ± 1.0 target,
+21.8 ± 7.9 average, −10.0 ± 10.1 on the hard examples: the paper's effect
(much less forgetting for a little target accuracy, paid on the hard
examples). FLOW − LP-FT: +0.2 ± 2.2, −1.3 ± 0.9, −0.6 ± 1.2: no gain over
its own LP-FT control here. τ = 0.20 ± 0.07, mean weight 0.43. On the seed-0
grid, FT and LP-FT at LR 0.1 keep 44 % and 43 % pre-training accuracy, FLOW
98 %; at LR ≤ 0.01 all three keep ≥ 97.8 %: FT's forgetting in the table
comes with its selected LR (0.1, chosen on 2 more correct validation
examples out of 144).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

import flowjax
from experiments.digits import model as M
from experiments.digits import protocol as P


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters of a run; :meth:`quick` is the smoke-test setting."""

    seeds: int = 10
    seed: int = 0  # first seed; LR selection runs on it
    split_seed: int = 0
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.05
    epochs: int = 20  # every fine-tuning stage
    lr_grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 1
    hard_fraction: float = 0.1
    methods: tuple[str, ...] = ("FT", "LP", "LP-FT", "FLOW")

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=1, pretrain_epochs=4, epochs=2, lr_grid=(0.01, 0.1))

    @property
    def optim(self) -> P.Optim:
        return P.Optim(
            self.batch_size, self.momentum, self.weight_decay, self.max_shift
        )


class SeedRun:
    """Everything one seed needs: the pre-trained model, memoised fits, FLOW weights."""

    def __init__(self, cfg: Config, tasks: P.Tasks, seed: int, lrs: dict[str, float]):
        self.cfg, self.tasks, self.seed, self.lrs = cfg, tasks, seed, lrs
        self._fits: dict[tuple[str, float | None], M.Net] = {}
        self._memo: dict[str, object] = {}
        self.key = jax.random.key(seed)
        init = M.init(jax.random.fold_in(self.key, 0))
        self.pretrained, _ = P.train(
            init,
            tasks.pretrain,
            trainable=M.all_mask(init),
            lr=cfg.pretrain_lr,
            epochs=cfg.pretrain_epochs,
            schedule="cosine",
            seed=seed,
            stage="pretrain",
            optim=cfg.optim,
        )

    # ---- building blocks for methods ------------------------------------

    def new_head(self) -> M.Net:
        """The pre-trained model with a fresh head for digits 5-9 (same init for every method)."""
        return M.fresh_head(self.pretrained, jax.random.fold_in(self.key, 1))

    def train(
        self,
        net: M.Net,
        *,
        lr: float,
        trainable: str | M.Net,
        schedule: P.Schedule,
        stage: str,
        **hooks,
    ) -> M.Net:
        """One stage on the 5-9 train split, ``cfg.epochs`` epochs.

        ``trainable`` is "all", "head" or a boolean Net; ``hooks`` go to
        :func:`experiments.digits.protocol.train` (weights, objective,
        extra_tx, reference).
        """
        if trainable == "all":
            trainable = M.all_mask(net)
        elif trainable == "head":
            trainable = M.head_mask(net)
        out, _ = P.train(
            net,
            self.tasks.finetune,
            trainable=trainable,
            lr=lr,
            epochs=self.cfg.epochs,
            schedule=schedule,
            seed=self.seed,
            stage=stage,
            optim=self.cfg.optim,
            **hooks,
        )
        return out

    def fit(self, name: str, lr: float | None) -> M.Net:
        """Method ``name`` at learning rate ``lr`` (memoised per seed)."""
        if (name, lr) not in self._fits:
            self._fits[name, lr] = METHODS[name].fit(self, lr)
        return self._fits[name, lr]

    def lp(self) -> M.Net:
        """The LP model at LP's selected learning rate."""
        return self.fit("LP", self.lrs["LP"])

    def lp_losses(self, split: str) -> flowjax.LossTable:
        """The LP model's eval-mode per-example CE on a 5-9 split (one pre-pass)."""
        if split not in self._memo:
            ids = getattr(self.tasks.finetune, split)
            self._memo[split] = P.example_losses(self.lp(), self.tasks.finetune, ids)
        return self._memo[split]

    def flow_weights(self) -> flowjax.WeightTable:
        """FLOW's weights: ``exp(-ℓ_i / τ)``, τ = median LP loss on the 5-9 train split."""
        return self.lp_losses("train").flow_weights()

    def hard_ids(self) -> np.ndarray:
        """The ``hard_fraction`` of 5-9 test examples with the highest LP loss."""
        table = self.lp_losses("test")
        k = math.ceil(self.cfg.hard_fraction * len(table))
        order = np.argsort(-table.losses, kind="stable")
        return np.sort(table.ids[order[:k]])


# --------------------------------------------------------------------------
# Methods: fit(run, lr) -> the model for digits 5-9
# --------------------------------------------------------------------------


def standard_ft(run: SeedRun, lr: float) -> M.Net:
    return run.train(
        run.new_head(), lr=lr, trainable="all", schedule="cosine", stage="ft"
    )


def linear_probe(run: SeedRun, lr: float) -> M.Net:
    return run.train(
        run.new_head(), lr=lr, trainable="head", schedule="constant", stage="lp"
    )


def lp_ft(run: SeedRun, lr: float) -> M.Net:
    return run.train(run.lp(), lr=lr, trainable="all", schedule="cosine", stage="lpft")


def flow(run: SeedRun, lr: float) -> M.Net:
    net = run.train(
        run.lp(),
        lr=lr,
        trainable="all",
        schedule="cosine",
        stage="flow1",
        weights=run.flow_weights(),
    )
    return run.train(
        net, lr=run.lrs["LP"], trainable="head", schedule="constant", stage="flow2"
    )


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fit: Callable[[SeedRun, float | None], M.Net]
    description: str
    lr_grid: tuple[float, ...] | None = None  # None: Config.lr_grid; (): no LR
    marker: str = "o"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # LP first: LP-FT and FLOW start from the LP model at LP's selected LR.
        Method("LP", linear_probe, "head only, body frozen, constant LR", marker="s"),
        Method("FT", standard_ft, "fresh head, all params, cosine", marker="o"),
        Method("LP-FT", lp_ft, "from LP, all params, cosine", marker="^"),
        Method(
            "FLOW",
            flow,
            "from LP, weighted all params (cosine), then head (constant)",
            marker="*",
        ),
    )
}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def evaluate(run: SeedRun, net: M.Net) -> dict:
    """Target, pre-training, average, validation and hard-example accuracy; body drift."""
    ft = run.tasks.finetune
    target = P.accuracy(net, ft, ft.test)
    pre = P.pretraining_accuracy(net, run.pretrained, run.tasks.pretrain)
    p = P.predict(net, ft, run.hard_ids())
    return {
        "target_acc": target,
        "pretrain_acc": pre,
        "average": (target + pre) / 2,
        "val_target_acc": P.accuracy(net, ft, ft.val),
        "hard_acc": float(np.mean(p["pred"] == p["label"])),
        "body_distance": M.body_distance(net, run.pretrained),
    }


def select_lrs(cfg: Config, run: SeedRun, bar) -> dict:
    """Fills ``run.lrs`` method by method (LP first); returns the grids.

    Selection uses ``val_target_acc`` only. The test accuracies of every grid
    point (``target_acc``, ``pretrain_acc``) are recorded to show how the
    forgetting trade-off moves with the LR; they play no part in the choice.
    """
    grids = {}
    ft, pre = run.tasks.finetune, run.tasks.pretrain
    for name in _ordered(cfg.methods):
        method = METHODS[name]
        grid = cfg.lr_grid if method.lr_grid is None else method.lr_grid
        if not grid:
            run.lrs[name] = None
            continue
        g = {
            "lr": list(grid),
            "val_target_acc": [],
            "target_acc": [],
            "pretrain_acc": [],
        }
        for lr in grid:
            bar.set_postfix_str(f"{name} lr={lr:g}")
            net = run.fit(name, lr)
            g["val_target_acc"].append(P.accuracy(net, ft, ft.val))
            g["target_acc"].append(P.accuracy(net, ft, ft.test))
            g["pretrain_acc"].append(P.pretraining_accuracy(net, run.pretrained, pre))
            bar.update()
        best = int(np.argmax(g["val_target_acc"]))  # first maximum: smallest LR on ties
        run.lrs[name] = float(grid[best])
        grids[name] = g
    return grids


def _ordered(names) -> list[str]:
    unknown = set(names) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}.")
    need = set(names) | ({"LP"} if set(names) & {"LP-FT", "FLOW"} else set())
    return [n for n in METHODS if n in need]


def run(cfg: Config, out: Path, command: str | None = None) -> dict:
    """Runs the whole protocol, writes every output into ``out``, returns the results."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tasks = P.make_tasks(cfg.split_seed)
    names = _ordered(cfg.methods)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    lrs: dict[str, float] = {}

    n_grid = sum(
        len(cfg.lr_grid if METHODS[n].lr_grid is None else METHODS[n].lr_grid)
        for n in names
    )
    with tqdm(
        total=n_grid, desc=f"LR selection (seed {seeds[0]})", dynamic_ncols=True
    ) as bar:
        first = SeedRun(cfg, tasks, seeds[0], lrs)
        grids = select_lrs(cfg, first, bar)
    t_select = time.perf_counter() - t0

    per_seed = []
    weights_seed0 = None
    with tqdm(
        total=len(seeds) * len(names), desc="seeds × methods", dynamic_ncols=True
    ) as bar:
        for seed in seeds:
            r = first if seed == seeds[0] else SeedRun(cfg, tasks, seed, lrs)
            pre = r.pretrained
            row = {
                "seed": seed,
                "pretrained": {
                    "pretrain_test_acc": P.accuracy(
                        pre, tasks.pretrain, tasks.pretrain.test
                    ),
                    "pretrain_val_acc": P.accuracy(
                        pre, tasks.pretrain, tasks.pretrain.val
                    ),
                },
                "methods": {},
            }
            for name in names:
                bar.set_postfix_str(f"seed {seed} {name}")
                row["methods"][name] = {
                    "lr": lrs[name],
                    **evaluate(r, r.fit(name, lrs[name])),
                }
                bar.update()
            if "FLOW" in names:
                table, w = r.lp_losses("train"), r.flow_weights()
                row["flow"] = {
                    "tau": w.temperature,
                    "weight_mean": float(w.weights.mean()),
                    "weight_min": float(w.weights.min()),
                    "frac_weight_below_0.1": float(np.mean(w.weights < 0.1)),
                    "num_hard": len(r.hard_ids()),
                }
                if weights_seed0 is None:
                    weights_seed0 = (table, w)
            per_seed.append(row)

    results = {
        "config": dataclasses.asdict(cfg),
        "split": {
            f"{t.name}_{s}": len(getattr(t, s))
            for t in (tasks.pretrain, tasks.finetune)
            for s in ("train", "val", "test")
        },
        "selected_lr": lrs,
        "lr_selection": grids,
        "per_seed": per_seed,
        "summary": summarize(per_seed, names),
        "runtime_s": {"lr_selection": t_select, "total": time.perf_counter() - t0},
        "command": command,
    }
    plot_pareto(results, names, out / "pareto.png")
    if weights_seed0 is not None:
        plot_weights(*weights_seed0, seeds[0], out / "weights.png")
    results["runtime_s"]["total"] = time.perf_counter() - t0
    results = json.loads(json.dumps(results))  # plain JSON types (tuples -> lists)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = markdown(results, names)
    (out / "results.md").write_text(md)
    print(md)
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}, {out / 'weights.png'}"
    )
    return results


METRICS = (
    "pretrain_acc",
    "target_acc",
    "average",
    "hard_acc",
    "val_target_acc",
    "body_distance",
)


def summarize(per_seed: list[dict], names: list[str]) -> dict:
    """Mean and std (ddof 1; 0 for one seed) over seeds, per method and metric."""

    def stats(x):
        x = np.asarray(x, float)
        return {
            "mean": float(x.mean()),
            "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        }

    out = {
        name: {k: stats([r["methods"][name][k] for r in per_seed]) for k in METRICS}
        for name in names
    }
    out["pretrained"] = {
        "pretrain_test_acc": stats(
            [r["pretrained"]["pretrain_test_acc"] for r in per_seed]
        )
    }
    if "FLOW" in names:
        out["FLOW_minus"] = {
            other: {
                k: stats(
                    [r["methods"]["FLOW"][k] - r["methods"][other][k] for r in per_seed]
                )
                for k in ("pretrain_acc", "target_acc", "average", "hard_acc")
            }
            for other in names
            if other != "FLOW"
        }
        out["tau"] = stats([r["flow"]["tau"] for r in per_seed])
    return out


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def markdown(results: dict, names: list[str]) -> str:
    s, cfg = results["summary"], results["config"]
    n = len(results["per_seed"])
    lines = [
        "# FLOW on digits: pre-train 0-4, fine-tune 5-9",
        "",
        f"{n} seed(s) ({cfg['seed']}..{cfg['seed'] + n - 1}); accuracies in %, mean ± std over seeds; "
        f"pre-trained model on 0-4 test: {_pm(s['pretrained']['pretrain_test_acc'])}. "
        f"Every fine-tuning stage: {cfg['epochs']} epochs, batch {cfg['batch_size']}; "
        f"LR grid {list(cfg['lr_grid'])}, selected by 5-9 validation accuracy on seed {cfg['seed']}.",
        "",
        "| method | LR | pre-training acc (0-4) | target acc (5-9) | average | ‖θ−θ₀‖ body |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        m = s[name]
        lines.append(
            f"| {name} | {results['selected_lr'][name]} | {_pm(m['pretrain_acc'])} | "
            f"{_pm(m['target_acc'])} | {_pm(m['average'])} | {_pm(m['body_distance'], 1, 2)} |"
        )
    if "FLOW" in names:
        k = results["per_seed"][0]["flow"]["num_hard"]
        lines += [
            "",
            f"Hard examples (paper's Table 5): accuracy on the {k} 5-9 test examples "
            "(10 %) with the highest loss under the LP model (per seed).",
            "",
            "| method | hard-example acc |",
            "|---|---|",
            *[f"| {name} | {_pm(s[name]['hard_acc'])} |" for name in names],
            "",
            "FLOW minus each method, paired by seed (percentage points):",
            "",
            "| FLOW − | pre-training acc | target acc | average | hard-example acc |",
            "|---|---|---|---|---|",
            *[
                f"| {o} | {_pm(d['pretrain_acc'])} | {_pm(d['target_acc'])} | "
                f"{_pm(d['average'])} | {_pm(d['hard_acc'])} |"
                for o, d in s["FLOW_minus"].items()
            ],
            "",
            f"τ (median LP loss, 5-9 train): {_pm(s['tau'], 1, 4)}; mean weight "
            f"{np.mean([r['flow']['weight_mean'] for r in results['per_seed']]):.3f}.",
        ]
    lines += [
        "",
        f"LR grid on seed {cfg['seed']}: 5-9 validation accuracy (the selection criterion) / "
        "5-9 test / 0-4 test after the swap, in % (test numbers shown for context only):",
        "",
        "| method | " + " | ".join(f"LR {lr:g}" for lr in cfg["lr_grid"]) + " |",
        "|---|" + "---|" * len(cfg["lr_grid"]),
    ]
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
        lines.append(
            f"| {name} | "
            + " | ".join(cells.get(lr, "") for lr in cfg["lr_grid"])
            + " |"
        )
    lines.append("\n\\* selected.")
    rt = results["runtime_s"]
    lines += [
        "",
        f"Runtime: {rt['total']:.0f} s (LR selection {rt['lr_selection']:.0f} s). "
        f"Command: `{results['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def plot_pareto(results: dict, names: list[str], path: Path) -> None:
    """(a) mean ± std per method with per-seed points; (b) the first seed's LR grid."""
    s = results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    ax = axes[0]
    for i, name in enumerate(names):
        c, marker = plt.cm.tab10(i), METHODS[name].marker
        xs = [100 * r["methods"][name]["target_acc"] for r in results["per_seed"]]
        ys = [100 * r["methods"][name]["pretrain_acc"] for r in results["per_seed"]]
        ax.scatter(xs, ys, color=c, alpha=0.25, s=14, marker=marker)
        m = s[name]
        ax.errorbar(
            100 * m["target_acc"]["mean"],
            100 * m["pretrain_acc"]["mean"],
            xerr=100 * m["target_acc"]["std"],
            yerr=100 * m["pretrain_acc"]["std"],
            fmt=marker,
            ms=10,
            color=c,
            capsize=3,
            label=f"{name} (LR {results['selected_lr'][name]:g})",
        )
        g = results["lr_selection"].get(name)
        if g:
            gx, gy = (
                100 * np.asarray(g["target_acc"]),
                100 * np.asarray(g["pretrain_acc"]),
            )
            axes[1].plot(gx, gy, marker=marker, color=c, lw=1, ms=6, label=name)
            for lr, x, y in zip(g["lr"], gx, gy, strict=True):
                axes[1].annotate(
                    f"{lr:g}",
                    (x, y),
                    xytext=(4, -8),
                    textcoords="offset points",
                    fontsize=7,
                    color=c,
                )
    n = len(results["per_seed"])
    ax.set_title(f"mean ± std over {n} seed(s) (faint: single seeds)", fontsize=10)
    axes[1].set_title(
        f"LR grid on seed {results['config']['seed']} (labels: LR); "
        "selection used validation only",
        fontsize=10,
    )
    for a in axes:
        a.axhline(
            100 * s["pretrained"]["pretrain_test_acc"]["mean"],
            color="k",
            ls=":",
            lw=1,
            label="pre-trained model",
        )
        a.set_xlabel("target accuracy, digits 5-9 test (%)")
        a.set_ylabel("pre-training accuracy, digits 0-4 test (%)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "Forgetting vs learning: pre-train on digits 0-4, fine-tune on 5-9 "
        "(pre-training accuracy with the pre-trained head and BatchNorm swapped back)",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(
    table: flowjax.LossTable, w: flowjax.WeightTable, seed: int, path: Path
) -> None:
    tau = w.temperature
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    losses = np.maximum(table.losses, 1e-6)
    bins = np.logspace(np.log10(losses.min()), np.log10(losses.max()), 40)
    axes[0].hist(losses, bins=bins, color="tab:blue", alpha=0.8)
    axes[0].axvline(tau, color="k", ls="--", label=f"τ = median = {tau:.4f}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("LP-model loss ℓ_i on 5-9 train (eval mode)")
    axes[0].set_ylabel("examples")
    axes[0].legend()
    axes[1].hist(w.weights, bins=40, range=(0, 1), color="tab:orange", alpha=0.8)
    axes[1].axvline(math.exp(-1), color="k", ls="--", label="w = e⁻¹ (loss = τ)")
    axes[1].set_xlabel("FLOW weight w_i = exp(-ℓ_i / τ)")
    axes[1].set_ylabel("examples")
    axes[1].legend()
    fig.suptitle(f"FLOW weights of the {len(w)} fine-tuning examples, seed {seed}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/digits"))
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, tiny budget (smoke test)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="first seed (LR selection runs on it)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    argv = sys.argv[1:] if argv is None else argv
    return run(cfg, args.out, " ".join(["python -m experiments.digits.run", *argv]))


if __name__ == "__main__":
    main()
