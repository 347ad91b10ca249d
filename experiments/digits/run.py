"""FLOW's forgetting result on real data, with the baselines side by side: pre-train on digits 0-4, fine-tune on 5-9.

Command (from the repository root; ``make digits``, or ``make demo`` for this
and the theory experiment)::

    python -m experiments.digits.run            # 10 seeds, writes results/digits/
    python -m experiments.digits.run --out DIR  # elsewhere
    python -m experiments.digits.run --quick    # 1 seed, tiny budget (smoke test)
    python -m experiments.digits.run --set lora_rank=8 --set seeds=3  # any config field
    python -m experiments.digits.run --replot   # redraw pareto.png and retention.png from results.json

Outputs: ``results.json`` (config, selected learning rates with their
validation grid, per-seed per-method numbers and retention curves, WiSE-FT
sweeps), ``timing.json`` (wall and CPU time, stages restored from checkpoints),
``retention.png`` (the curves), ``checkpoints/`` (every stage's),
``results.md`` (the tables), ``pareto.png`` (target accuracy against
pre-training accuracy, mean ± std per method plus the WiSE-FT α sweeps, like
the paper's Figure 2: a panel zoomed on the methods and a full-range one; see
:mod:`experiments.digits.pareto`), ``weights.png`` (the FLOW pre-pass losses and weights
with τ marked).

The paper's vision protocol (FLOW_PAPER.md §2.1, steps V1-V5) on
scikit-learn's digits (1,797 8×8 images) with the small BatchNorm CNN of
:mod:`experiments.digits.model`. Data: the TFDS ``flowjax_digits`` dataset
(``array_record``, no TensorFlow), built once into ``$FLOWJAX_DATA_DIR`` or
the git-ignored ``.cache/tfds``, read once with
``flowjax.ArraySource.from_source`` and fed by ``flowjax.batches`` (seeded
shuffling; ``map_fn``: pixels / 16 and a random ±1-pixel shift from each
example's own generator); see :mod:`experiments.digits.protocol`.

* Split (fixed for every seed): test = the dataset's stratified 20 % test
  split; validation = a stratified 20 % of its train split. Pre-training task:
  digits 0-4; fine-tuning task: digits 5-9, labels 0-4, a NEW head.
* Pre-training: 0-4 train split, all parameters, SGD momentum 0.9, weight
  decay 5e-4, per-epoch cosine, shift augmentation.
* Every fine-tuning stage runs E = 20 epochs of SGD (momentum 0.9, decay
  5e-4) on the same per-seed data stream (same batches, same augmentation for
  every method of a seed). Frozen parts go through ``flowjax.train_only`` /
  ``flowjax.trainable_mask``; BatchNorm runs in train mode, so its running
  statistics adapt even where its scale and bias are frozen.
Layout: every hyper-parameter, the methods' settings included, is a field of
:class:`experiments.digits.config.Config` (``get_config(quick=False)``;
``results.json`` records it under ``"config"``); the methods are defined in
:mod:`experiments.digits.methods`; this module is the driver (learning-rate
selection, seeds, evaluation; the tables are built in :mod:`experiments.digits.summary`
through :mod:`experiments.report`).

* Methods (``methods.METHODS``; settings from the config):

  - LP (V1): body frozen, fresh head, constant LR.
  - FT (V5): fresh head, everything trainable, cosine ``lr (1 + cos(π e/E))/2``.
  - LP-FT: from the LP model, everything trainable, cosine, unweighted.
  - L2-SP: FT plus ``flowjax.l2sp`` (first in the optax chain):
    ``g += λ (θ − θ₀)`` on every pre-trained parameter (not the new head),
    λ = 0.1, fixed a priori; weight decay kept as in FT.
  - EWC: FT plus ``flowjax.ewc`` with the diagonal EMPIRICAL Fisher
    (``flowjax.diagonal_fisher``, true labels) at θ₀ on the 5-9 TRAIN split
    (FLOW's setting has no pre-training data), measured through the LP model
    (θ₀'s body and BatchNorm with the LP head; a head is needed for labels
    5-9), normalised to mean 1 over the regularised entries and used with
    the same λ = 0.1 as L2-SP: the same average pull, redistributed by
    importance.
  - LoRA: ``flowjax.add_lora`` rank 4 (α = r, scale 1, as in the paper) on
    the dense layer ``fc`` (512 → 64; 2,304 adapter parameters vs 32,832),
    the new head trained fully, convolutions and BatchNorm frozen, cosine;
    ``flowjax.merge_lora`` before evaluation.
  - WiSE-FT: ``flowjax.wise_ft(θ₀, θ_FT, α = 0.5)`` (α = weight on the
    PRE-TRAINED model, the paper's value) over every parameter and BatchNorm
    statistic except the new head, which has no pre-trained counterpart and
    is kept from FT. No LR of its own (FT's). The full sweep α = 0, 0.1, …, 1
    (``flowjax.wise_ft_sweep``) is the dashed curve in ``pareto.png``.
  - LwF: FT plus ``flowjax.lwf_loss`` (λ = 1, T = 2, Li & Hoiem's values):
    the student's train-mode features through the FROZEN pre-trained head
    (the head that evaluation swaps back) distilled toward the pre-trained
    model (eval mode) on the same augmented images.
  - DRO: FLOW's two rounds with the static easy-example weights replaced by
    the dynamic KL-DRO tilt ``flowjax.dro_loss`` (p ∝ exp(+ℓ_i/τ) within each
    batch), τ = FLOW's τ: the paper's contrast, at the same temperature.
  - FLOW (V2-V4): τ = median of the LP model's eval-mode per-example CE over
    the 5-9 TRAIN split, from one ``flowjax.per_example_losses`` pre-pass;
    ``w_i = exp(-ℓ_i / τ)``, attached to each batch by example id. Round 1:
    from the LP model, everything trainable, ``Σ w_i CE_i / B``, cosine.
    Round 2: head only, unweighted CE, constant LR (LP's). The weights are
    computed ONCE on un-augmented images (Algorithm 1), not per batch.
  - FLOW + LoRA: FLOW with round 1's trainable set = LoRA (fc) + head;
    merged, then round 2. FLOW + WiSE-FT: the FLOW model averaged with θ₀ at
    α = 0.5 (head kept).

* Evaluation (eval mode, final epoch; no checkpoint selection): target
  accuracy on the 5-9 test split; pre-training accuracy on the 0-4 test split
  after ``flowjax.swap_task_parts`` puts the pre-trained head and BatchNorm
  (scale, bias, running mean and variance) back into the fine-tuned body;
  average = their mean. Hard examples (the paper's Table 5): the 10 % of 5-9
  test examples with the highest loss under the LP model.
* Learning rates: the SAME rule for every method: ``Config.lr_grid`` is run
  on the first seed and the LR with the best VALIDATION accuracy on digits
  5-9 is used for every seed (ties: the smallest LR). The test split is never
  used for selection. FLOW's round 2 and every use of the LP model reuse LP's
  choice.
* Seeds (default 10) change the pre-training init, the head init, the LoRA
  init, shuffling and augmentation; the split is fixed.

Every training stage (pre-training included) runs on ``flowjax.fit`` and
checkpoints into ``--out/checkpoints`` (one directory per stage, named by a
digest of its inputs; see :class:`experiments.digits.methods.SeedRun`): the
same command started again after a kill restores the finished stages, resumes
the interrupted one (``resumed from step N``) and writes the same
``results.json`` byte for byte (wall-clock times go to ``timing.json``).
Every fine-tuning stage is evaluated every ``curve_every`` epochs;
``retention.png`` draws those curves (target and pre-training accuracy against
steps, per method, mean over seeds).

Numbers the default command produced (10 seeds; 213 s wall, 255 s CPU on the
2-core CPU shared with three other jobs; jax 0.10.2 / flax 0.12.8 / optax
0.2.8; ``results.json`` repeats byte for byte from run to run on one machine
and package set). Accuracies in %, mean ± std over seeds; the pre-trained
model scores 99.8 ± 0.3 on the 0-4 test split::

    method          LR     pre-training (0-4)  target (5-9)  average      hard 10 %
    LP              0.1    99.8 ± 0.3          88.1 ± 3.5    94.0 ± 1.7    5.6 ± 5.9
    FT              0.03   77.7 ± 19.4         98.9 ± 0.6    88.3 ± 9.7   93.3 ± 4.4
    LP-FT           0.003  98.6 ± 1.0          98.5 ± 0.8    98.6 ± 0.7   87.8 ± 9.7
    L2-SP           0.03   92.2 ± 7.2          97.8 ± 0.8    95.0 ± 3.6   81.1 ± 7.5
    EWC             0.1    27.9 ± 24.7         28.0 ± 24.9   28.0 ± 24.8  32.8 ± 31.5  (9 seeds diverged)
    LoRA            0.03   99.4 ± 0.8          97.8 ± 0.8    98.6 ± 0.7   86.1 ± 8.8
    WiSE-FT         —      96.6 ± 3.5          94.6 ± 1.9    95.6 ± 1.9   75.0 ± 9.2
    LwF             0.03   98.8 ± 1.3          99.2 ± 0.3    99.0 ± 0.7   94.4 ± 3.7
    DRO             0.003  26.4 ± 5.8          92.1 ± 8.1    59.3 ± 6.0   80.0 ± 11.2
    FLOW            0.01   99.1 ± 0.7          95.6 ± 1.4    97.3 ± 0.8   72.2 ± 10.5
    FLOW + LoRA     0.1    91.9 ± 25.3         87.2 ± 23.7   89.5 ± 24.4  58.9 ± 15.1
    FLOW + WiSE-FT  —      99.4 ± 0.6          92.8 ± 3.7    96.1 ± 2.1   72.2 ± 11.1

What this shows, paired by seed: FLOW − FT = +21.4 ± 19.5 pre-training,
−3.3 ± 1.8 target, +9.0 ± 9.5 average, −21.1 ± 10.7 on the hard examples:
the paper's effect (much less forgetting, paid for on the hard examples).
But FLOW does NOT beat the stronger baselines here: FLOW − LP-FT = −1.2 ±
1.1 average (its own control, same start, no weights), and LwF (99.0), LoRA
(98.6) and LP-FT (98.6) have a higher mean average than FLOW (97.3); FLOW
keeps 99.1 % pre-training accuracy (LoRA 99.4, FLOW + WiSE-FT 99.4) but gives
up 2-3 points of target accuracy against them. FLOW on top of LoRA does not
help (−9.1 ± 24.1 average, one seed drifting at LR 0.1); on top of WiSE-FT it
trades target for pre-training accuracy (+0.5 ± 2.1 average). DRO at FLOW's
τ (0.030 ± 0.013, so the tilt puts almost all of a batch's weight on its
hardest examples) forgets catastrophically (26.4 % pre-training). EWC's LR,
chosen on seed 0 (validation 98.6 % at 0.1), diverges on the nine other
seeds: the run records them as diverged (``diverged_seeds``) rather than
dropping them. An earlier package set picked 0.03 for EWC (98.4 ± 0.5
average): the one-seed LR rule sits on a knife's edge for stiff
regularisers. (The 0.1 driver of this experiment, with its own hand-written
step, gave numbers within a seed's noise of these: the LR is now applied in
float32 inside the optimiser. The pre-pass's batched form gives the same
``results.json``, byte for byte, as the per-example form.)

Adding a method is one function ``fit(run, lr) -> Net`` in
:mod:`experiments.digits.methods` plus one ``Method`` entry in ``METHODS``, its
settings as config fields (``needs`` names the methods it builds
on). Hooks: ``run.train(...)`` takes ``extra`` (``(kind, optax
transformation)`` on the gradients, e.g. L2-SP, EWC), ``objective`` (the loss
from the train-mode module, batch and ``reference`` arrays: LwF, DRO),
``weights`` (a ``flowjax.WeightTable``) and ``trainable`` ("all", "head",
"lora"). ``run.fit(name, lr)`` returns another method's model, memoised per
seed; a method with ``lr_grid=()`` has no LR to select.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

import flowjax
from experiments import cli, report
from experiments.digits import model as M
from experiments.digits import pareto, summary
from experiments.digits import protocol as P
from experiments.digits.config import Config, get_config
from experiments.digits.methods import METHODS, SeedRun, ordered


def evaluate(run: SeedRun, net: M.Net) -> dict:
    """Target, pre-training, average, validation and hard-example accuracy; body drift."""
    ft = run.tasks.finetune
    target = P.accuracy(net, ft, "test")
    pre = P.pretraining_accuracy(net, run.pretrained, run.tasks.pretrain)
    p = P.predict(net, ft, "test", run.hard_ids())
    distance = M.body_distance(net, run.pretrained)
    # A run that diverged (non-finite parameters) predicts one class: its accuracies are
    # what they are, but it has no distance; it is recorded as diverged, never dropped.
    diverged = not math.isfinite(distance)
    return {
        "target_acc": target,
        "pretrain_acc": pre,
        "average": (target + pre) / 2,
        "val_target_acc": P.accuracy(net, ft, "val"),
        "hard_acc": float(np.mean(p["pred"] == p["label"])),
        "body_distance": None if diverged else distance,
        "diverged": diverged,
    }


def select_lrs(cfg: Config, run: SeedRun, bar) -> dict:
    """Fills ``run.lrs`` method by method (LP first); returns the grids.

    Selection uses ``val_target_acc`` only. The test accuracies of every grid
    point (``target_acc``, ``pretrain_acc``) are recorded to show how the
    forgetting trade-off moves with the LR; they play no part in the choice.
    """
    grids = {}
    ft, pre = run.tasks.finetune, run.tasks.pretrain
    for name in ordered(cfg.methods):
        method = METHODS[name]
        grid = method.grid(cfg)
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
            g["val_target_acc"].append(P.accuracy(net, ft, "val"))
            g["target_acc"].append(P.accuracy(net, ft, "test"))
            g["pretrain_acc"].append(P.pretraining_accuracy(net, run.pretrained, pre))
            bar.update()
        best = int(np.argmax(g["val_target_acc"]))  # first maximum: smallest LR on ties
        run.lrs[name] = float(grid[best])
        grids[name] = g
    return grids


def run(cfg: Config, out: Path, command: str | None = None) -> dict:
    """Runs the whole protocol, writes every output into ``out``, returns the results."""
    t0, c0 = time.perf_counter(), time.process_time()
    out.mkdir(parents=True, exist_ok=True)
    tasks = P.make_tasks(cfg.split_seed)
    names = ordered(cfg.methods)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    lrs: dict[str, float] = {}

    n_grid = sum(len(METHODS[n].grid(cfg)) for n in names)
    checkpoints = out / "checkpoints"
    resume_log = report.ResumeLog(tqdm.write)

    def seed_run(seed: int) -> SeedRun:
        return SeedRun(cfg, tasks, seed, lrs, checkpoints, resume_log)

    with tqdm(
        total=n_grid, desc=f"LR selection (seed {seeds[0]})", dynamic_ncols=True
    ) as bar:
        first = seed_run(seeds[0])
        grids = select_lrs(cfg, first, bar)
    t_select = time.perf_counter() - t0

    per_seed = []
    weights_seed0 = None
    with tqdm(
        total=len(seeds) * len(names), desc="seeds × methods", dynamic_ncols=True
    ) as bar:
        for seed in seeds:
            r = first if seed == seeds[0] else seed_run(seed)
            pre = r.pretrained
            row = {
                "seed": seed,
                "pretrained": {
                    "pretrain_test_acc": P.accuracy(pre, tasks.pretrain, "test"),
                    "pretrain_val_acc": P.accuracy(pre, tasks.pretrain, "val"),
                },
                "methods": {},
            }
            for name in names:
                bar.set_postfix_str(f"seed {seed} {name}")
                row["methods"][name] = {
                    "lr": lrs[name],
                    **evaluate(r, r.fit(name, lrs[name])),
                    "curve": r.curve(name, lrs[name]),
                }
                bar.update()
            if "FLOW" in names:
                table, w = r.lp_losses("train"), r.flow_weights()
                diagnostics, text = flowjax.diagnostics.weight_summary(w, table)
                row["flow"] = {
                    "tau": w.temperature,
                    "weight_mean": float(w.weights.mean()),
                    "weight_min": float(w.weights.min()),
                    "frac_weight_below_0.1": float(np.mean(w.weights < 0.1)),
                    "num_hard": len(r.hard_ids()),
                    "diagnostics": diagnostics,  # ESS, the most down-weighted examples
                }
                bar.write(f"seed {seed}: {text}")
                if weights_seed0 is None:
                    weights_seed0 = (table, w)
            row["wise_ft_curve"] = {
                base: r.wise_curve(base)
                for base, wise in (("FT", "WiSE-FT"), ("FLOW", "FLOW + WiSE-FT"))
                if wise in names
            }
            per_seed.append(row)
            P.clear_streams()

    results = {
        "config": report.config_dict(cfg),
        "split": {
            f"{t.name}_{s}": len(getattr(t, s))
            for t in (tasks.pretrain, tasks.finetune)
            for s in ("train", "val", "test")
        },
        "selected_lr": lrs,
        "lr_selection": grids,
        "per_seed": per_seed,
        "summary": summary.summarize(per_seed, names),
        "command": command,
    }
    plot_pareto(results, names, out / "pareto.png")
    plot_retention(results, names, out / "retention.png")
    if weights_seed0 is not None:
        plot_weights(*weights_seed0, seeds[0], out / "weights.png")
    results = report.write_json(out / "results.json", results)
    md = summary.markdown(results, names)
    report.write_text(out / "results.md", md)
    timing = {
        "lr_selection_s": t_select,
        "total_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "stages_restored_from_checkpoints": len(resume_log.restored),
        "stages_resumed_part_way": len(resume_log.resumed),
    }
    report.write_json(out / "timing.json", timing)
    print(md)
    line = resume_log.summary(checkpoints)
    if line:
        print(line)
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}, "
        f"{out / 'retention.png'}, {out / 'weights.png'}; "
        f"{timing['total_s']:.0f} s wall ({out / 'timing.json'})"
    )
    return results


def plot_pareto(results: dict, names: list[str], path: Path) -> None:
    """Draws ``pareto.png`` (:mod:`experiments.digits.pareto`) from the results alone."""
    pareto.plot_pareto(results, names, {n: METHODS[n].marker for n in names}, path)


def plot_retention(results: dict, names: list[str], path: Path) -> None:
    """Draws ``retention.png``: target and pre-training accuracy against training steps, per method.

    Mean over seeds of each method's own stages (:meth:`SeedRun.curve`):
    step 0 is the model the method starts from (a fresh head, or the LP
    model), later rounds continue the step count. Methods that train
    nothing themselves (WiSE-FT) are drawn as their final point at their
    base method's last step.
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    keys = (
        ("target_acc", "target accuracy, digits 5-9 (test)"),
        (
            "pretrain_acc",
            "pre-training accuracy, digits 0-4 (test, head + BN swapped back)",
        ),
    )
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        rows = [row["methods"][name] for row in results["per_seed"]]
        curves = [r["curve"] for r in rows]
        style = {"color": cmap(i % 20), "marker": METHODS[name].marker, "ms": 4}
        for ax, (key, _) in zip(axes, keys, strict=True):
            if curves[0] is None:
                base = METHODS[name].needs[0]
                last = results["per_seed"][0]["methods"][base]["curve"]["step"][-1]
                value = 100 * np.mean([r[key] for r in rows])
                ax.plot([last], [value], ls="none", label=name, **{**style, "ms": 9})
                continue
            steps = curves[0]["step"]
            values = 100 * np.array([c[key] for c in curves])
            ax.plot(steps, values.mean(0), label=name, lw=1.4, **style)
    for ax, (_, title) in zip(axes, keys, strict=True):
        ax.set_xlabel("training steps of the method's own stages")
        ax.set_ylabel("accuracy (%), mean over seeds")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    seeds = len(results["per_seed"])
    fig.suptitle(
        f"Retention during fine-tuning ({seeds} seed{'s' if seeds > 1 else ''}): "
        "target metric and pre-training accuracy against steps"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out: Path) -> dict:
    """Redraws ``out/pareto.png`` from ``out/results.json`` without training.

    ``weights.png`` needs the per-example losses, which ``results.json`` does
    not hold, so it is left as it is.
    """
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--replot reads {path}, which does not exist; run without --replot first."
        )
    results = json.loads(path.read_text())
    names = list(results["per_seed"][0]["methods"])
    ordered(names)  # unknown names -> ValueError
    plot_pareto(results, names, out / "pareto.png")
    plot_retention(results, names, out / "retention.png")
    print(
        f"redrew {out / 'pareto.png'} and {out / 'retention.png'} from {path} (weights.png not "
        "redrawn: needs the per-example losses)"
    )
    return results


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
    cli.add_config_args(parser, "1 seed, tiny budget (smoke test)")
    parser.add_argument(
        "--seed", type=int, default=0, help="first seed (LR selection runs on it)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw pareto.png and retention.png from --out/results.json (no training)",
    )
    args = parser.parse_args(argv)
    if args.replot:
        if args.quick or args.seeds is not None or args.overrides:
            parser.error("--replot takes only --out")
        return replot(args.out)
    cfg = cli.override(get_config(quick=args.quick), [f"seed={args.seed}"])
    if args.seeds is not None:
        cfg = cli.override(cfg, [f"seeds={args.seeds}"])
    try:
        cfg = cli.override(cfg, args.overrides)
    except ValueError as e:
        parser.error(str(e))
    argv = sys.argv[1:] if argv is None else argv
    return run(cfg, args.out, " ".join(["python -m experiments.digits.run", *argv]))


if __name__ == "__main__":
    main()
