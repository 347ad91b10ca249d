"""Every forgetting defence on one task sequence: split digits, task- and class-incremental.

Command (from the repository root; ``make continual``)::

    python -m experiments.continual.run             # 5 seeds, writes results/continual/
    python -m experiments.continual.run --quick     # 1 seed, 3 tasks, 2 epochs (smoke test)
    python -m experiments.continual.run --out DIR --set seeds=3 --set "methods=('FT', 'PackNet')"

Outputs in ``--out``: ``results.json`` (the config; per setting, method and seed the
accuracy matrix ``R``, the accuracies at initialisation, each task's accuracy right after
training it, ACC / BWT / FWT / forgetting; means and standard deviations over seeds;
which methods FLOW was combined with), ``results.md`` (the tables), ``matrices_task.png``
and ``matrices_class.png`` (mean accuracy matrix per method), ``acc_vs_bwt.png`` (ACC
against BWT, mean ± std per method), ``timing.json`` and ``checkpoints/`` (every stage, named
by a digest of its inputs: a rerun restores the finished stages and resumes an
interrupted one, and writes the same ``results.json``).

Protocol (:mod:`experiments.continual.protocol`, :mod:`experiments.continual.methods`,
settings in :mod:`experiments.continual.config`): scikit-learn's digits through the TFDS
path of :mod:`experiments.digits.dataset`, split into 5 tasks of 2 digits ({0,1}, {2,3},
…, {8,9}), trained in that order; the accuracy matrix is measured on the dataset's test
split (359 images, about 72 per task). Task-incremental: a 2-way head per task, the task id
given at test time. Class-incremental: one 10-way head, no task id. Metrics from
``flowjax.sequence_metrics`` (Lopez-Paz & Ranzato's ACC, BWT, FWT against the accuracies
at initialisation; Chaudhry et al.'s forgetting). Every method runs from the same
initialisation and data order per seed. PackNet and the progressive network need the task
id at test time and run in the task-incremental setting only. "FLOW + X" are run for the
``flow_combinations`` best methods of each setting by mean ACC (FT and FLOW excluded).

Numbers the default command produced (5 seeds, mean ± std, %; jax 0.10.2 / flax 0.12.8 /
optax 0.2.8 on the shared 2-core CPU; every row and FWT in ``results/continual/results.md``)::

    task-incremental          ACC          BWT           class-incremental   ACC          BWT
    Replay                    99.0 ± 0.4   -0.1 ± 0.7    Replay              88.1 ± 1.2   -8.8 ± 1.8
    PackNet                   98.9 ± 0.3    0.0 ± 0.0    EWC                 22.7 ± 3.4  -94.0 ± 3.3
    DER                       98.5 ± 0.6   -0.3 ± 0.3    DER                 21.6 ± 14.4 -13.0 ± 2.6
    EWC                       98.1 ± 0.4   -0.2 ± 0.7    LoRA                13.6 ± 3.4  -76.3 ± 6.0
    Progressive               97.2 ± 2.5    0.0 ± 0.0    Adapters            12.5 ± 3.0  -76.2 ± 13.6
    FLOW + Replay             97.1 ± 0.8   +2.0 ± 1.0    FLOW + EWC          12.3 ± 2.8  -57.4 ± 28.1 (3 diverged)
    LwF                       96.2 ± 3.6   -3.3 ± 4.2    LwF                 11.3 ± 2.7  -74.6 ± 13.7
    FLOW + PackNet            93.6 ± 4.6    0.0 ± 0.0    FLOW                10.1 ± 0.0  -74.7 ± 7.9
    FLOW                      92.5 ± 5.2   -2.6 ± 6.2    L2-SP               10.1 ± 0.6  -63.9 ± 11.1
    Adapters                  91.8 ± 4.6    0.0 ± 0.0    FLOW + Replay       10.1 ± 0.1  -46.7 ± 22.8
    SI                        89.9 ± 7.8  -11.3 ± 9.5    SI                  10.0 ± 0.0  -51.7 ± 20.3 (5 diverged)
    L2-SP                     85.6 ± 7.2   -6.3 ± 5.5    FT                  10.0 ± 0.1  -76.9 ± 9.3
    FT                        83.5 ± 4.0  -19.4 ± 4.9
    LoRA                      74.7 ± 20.0 -12.5 ± 10.9

Task-incremental: stored data (replay, DER) and parameter isolation (PackNet, the
progressive network: BWT exactly 0) win; FLOW halves FT's forgetting but lowers the
diagonal (plasticity), and lowers ACC when added to replay or PackNet. Class-incremental:
only replay survives; FT does not even learn the last two tasks (50 % right after
training them: one class predicted). FLOW fine-tunes from a pre-trained model without its
data; in a task sequence each task's start plays that model, and FLOW's down-weighting of
the new task's hard examples protects the shared features but not a shared head's old
classes. See the README's continual-learning section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax
import matplotlib.pyplot as plt
import numpy as np

import flowjax
from experiments import cli
from experiments.continual import methods as MM
from experiments.continual import protocol as P
from experiments.continual.config import Config, get_config

METRICS = ("acc", "bwt", "fwt", "forgetting")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_sequence(
    cfg: Config, setting: str, name: str, seed: int, tasks, out: Path
) -> dict:
    """One method on the task sequence for one seed: its accuracy matrix and metrics."""
    run = MM.Run(
        cfg,
        setting,
        seed,
        tasks,
        out / "checkpoints" / setting / slug(name) / f"seed{seed}",
        name,
    )
    method = MM.build(name, run)
    model = method.init_model()
    test = [task.arrays("test") for task in tasks]
    T = len(tasks)
    baseline = [method.accuracy(model, test[j], j) for j in range(T)]
    R, after = [], []
    for t in range(T):
        model = method.train_task(model, t)
        after.append(method.accuracy(model, test[t], t))
        model = method.end_task(model, t)
        R.append([method.accuracy(model, test[j], j) for j in range(T)])
    finite = MM.finite(model.params)
    return {
        "seed": seed,
        "R": R,
        "baseline": baseline,
        "after_task": after,
        "metrics": flowjax.sequence_metrics(R, baseline),
        "flow_tau": method.taus,
        "finite": finite,  # False: the run diverged (kept, with what it measured)
    }


def summarise(runs: list[dict]) -> dict:
    """Means and standard deviations over seeds (``ddof=0``; one seed gives std 0)."""
    out: dict = {"seeds": runs, "mean": {}, "std": {}}
    for k in METRICS:
        v = np.array([r["metrics"][k] for r in runs])
        out["mean"][k], out["std"][k] = float(v.mean()), float(v.std())
    out["R_mean"] = np.mean([r["R"] for r in runs], axis=0).tolist()
    out["diverged_seeds"] = [r["seed"] for r in runs if not r["finite"]]
    return out


def run_setting(cfg: Config, setting: str, tasks, out: Path, log) -> dict:
    """Every applicable method of ``cfg.methods``, then FLOW with the best few."""
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    results = {}

    def one(name):
        runs = []
        for s in seeds:
            t0 = time.time()
            runs.append(run_sequence(cfg, setting, name, s, tasks, out))
            m = runs[-1]["metrics"]
            log(
                f"[{setting}] {name:<22} seed {s}: ACC {100 * m['acc']:.1f} "
                f"BWT {100 * m['bwt']:+.1f} ({time.time() - t0:.0f} s)"
            )
        results[name] = summarise(runs)

    base = [n for n in cfg.methods if MM.applies(n, setting)]
    for name in base:
        one(name)
    ranked = sorted(
        (n for n in base if n not in ("FT", "FLOW")),
        key=lambda n: -results[n]["mean"]["acc"],
    )
    best = ranked[: cfg.flow_combinations] if "FLOW" in cfg.methods else []
    for name in best:
        one(f"FLOW + {name}")
    return {"methods": results, "flow_combined_with": best}


def write_markdown(res: dict, path: Path) -> None:
    cfg = res["config"]
    lines = [
        "# Task sequence: split digits, every forgetting defence",
        "",
        f"{cfg['num_tasks']} tasks of 2 digits, {cfg['seeds']} seeds, {cfg['epochs']} epochs "
        "per task; mean ± std over seeds, in %. ACC: mean final accuracy; BWT: backward "
        "transfer (negative = forgetting); FWT: forward transfer against the accuracy at "
        "initialisation; forgetting: Chaudhry et al.'s (lower is better). Written by "
        "`python -m experiments.continual.run`.",
    ]
    titles = {
        "task": "Task-incremental (a head per task)",
        "class": "Class-incremental (one head)",
    }
    for setting, sres in res["settings"].items():
        lines += ["", f"## {titles[setting]}", ""]
        lines += ["| method | ACC | BWT | FWT | forgetting |", "|---|---|---|---|---|"]
        order = sorted(
            sres["methods"], key=lambda n: -sres["methods"][n]["mean"]["acc"]
        )
        for name in order:
            m = sres["methods"][name]
            cells = [
                f"{100 * m['mean'][k]:.1f} ± {100 * m['std'][k]:.1f}" for k in METRICS
            ]
            bad = len(m["diverged_seeds"])
            label = f"{name} ({bad} diverged)" if bad else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if sres["flow_combined_with"]:
            lines += [
                "",
                "FLOW combined with the best two by ACC: "
                + ", ".join(sres["flow_combined_with"])
                + ".",
            ]
    path.write_text("\n".join(lines) + "\n")


def plot_matrices(sres: dict, setting: str, path: Path) -> None:
    names = list(sres["methods"])
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False
    )
    for ax, name in zip(axes.flat, names, strict=False):
        R = np.array(sres["methods"][name]["R_mean"])
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(R)):
            for j in range(len(R)):
                ax.text(
                    j,
                    i,
                    f"{100 * R[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if R[i, j] < 0.6 else "k",
                )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("evaluated task", fontsize=8)
        ax.set_ylabel("after training task", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{setting}-incremental: mean accuracy matrix (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(res: dict, path: Path) -> None:
    settings = list(res["settings"])
    fig, axes = plt.subplots(
        1, len(settings), figsize=(6 * len(settings), 4.8), squeeze=False
    )
    for ax, setting in zip(axes[0], settings, strict=True):
        for name, m in res["settings"][setting]["methods"].items():
            x, y = 100 * m["mean"]["bwt"], 100 * m["mean"]["acc"]
            ax.errorbar(
                x,
                y,
                xerr=100 * m["std"]["bwt"],
                yerr=100 * m["std"]["acc"],
                fmt="o",
                capsize=2,
            )
            ax.annotate(
                name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel("BWT (%)")
        ax.set_ylabel("ACC (%)")
        ax.set_title(f"{setting}-incremental")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/continual", help="output directory")
    cli.add_config_args(parser, "1 seed, 3 tasks, 2 epochs per task (smoke test)")
    args = parser.parse_args(argv)
    cfg = cli.override(get_config(args.quick), args.overrides)
    unknown = [n for n in cfg.methods if n not in MM.METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(MM.METHODS)}.")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tasks = P.make_tasks(cfg.num_tasks)
    t0, c0 = time.time(), time.process_time()
    P.STAGES.clear()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    res = {"config": dataclasses.asdict(cfg), "settings": {}}
    for setting in cfg.settings:
        res["settings"][setting] = run_setting(cfg, setting, tasks, out, log)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out / "results.md")
    for setting, sres in res["settings"].items():
        plot_matrices(sres, setting, out / f"matrices_{setting}.png")
    plot_scatter(res, out / "acc_vs_bwt.png")
    timing = {
        "wall_s": time.time() - t0,
        "cpu_s": time.process_time() - c0,
        "stages_trained": P.STAGES["trained"],
        "stages_restored_from_checkpoints": P.STAGES["restored"],
    }
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    log(f"wrote {out} in {timing['wall_s']:.0f} s")
    return res


if __name__ == "__main__":
    # Many small programs: JAX's persistent cache makes reruns (and resumed runs) cheap.
    jax.config.update(
        "jax_compilation_cache_dir", str(P.digits_protocol.REPO_ROOT / ".cache" / "jax")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    main()
