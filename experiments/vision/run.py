"""The paper's vision protocol as one command: LP → pre-pass → τ → FLOW's two rounds, and the baselines.

Command (big_vision style: a config file is data, single fields overridable)::

    python -m experiments.vision.run --config experiments/vision/configs/resnet50_flowers102.py \\
        --workdir /abs/runs/rn50_flowers --set weights=/abs/resnet50.ram_in1k.safetensors \\
        --set data_dir=/abs/flowers102 --set imagenet_dir=/abs/imagenet
    python -m experiments.vision.run --config experiments/vision/configs/tiny.py --workdir /tmp/v

The tiny config runs everything on CPU on fabricated files (``experiments.vision.fabricate``).

Steps (FLOW_PAPER.md §2.1; what differs from the official code is said in each step):

1. **Models**: ``flowjax.models.load_resnet(arch, weights)`` twice: the pre-trained model
   with its 1000-class head (for retention) and the same backbone with a fresh head for
   the target's classes (torch's default ``Linear`` init, seeded).
2. **Data**: ``flowjax.datasets.<dataset>(data_dir, split)``; training stages use
   ``train_minus_val``, the learning rates are chosen on ``val`` (a seeded stratified
   ``val_fraction`` of the training set), and ``test`` is reported, never used to choose
   (the official code keeps the best-on-test epoch; we report the last epoch).
3. **LP** (V1): head only, train mode (BatchNorm running statistics adapt, as the official
   code), constant LR.
4. **Pre-pass** (V2): the LP model in eval mode over the training split, one ordered pass
   with the training augmentations (``prepass_augment``), ``flowjax.per_example_losses``;
   τ = median, ``w_i = exp(-ℓ_i/τ)``, computed ONCE (Algorithm 1; the official code
   recomputes them on every augmented batch).
5. **FLOW round 1** (V3): from the LP model, every parameter, ``Σ w_i CE_i / B``, cosine;
   **round 2** (V4): head only, unweighted, constant, the official round-2 LR.
6. **Baselines**: standard FT (V5: fresh head, all parameters, cosine), LP-FT (from LP,
   unweighted: FLOW's control for the LP start it shares), L2-SP (FT plus
   ``flowjax.l2sp`` on the body), WiSE-FT (FT averaged with θ₀ at ``wise_alpha``, head
   kept) and FLOW + WiSE-FT.
7. **Evaluation**: target top-1 on ``test``; ImageNet-1K top-1 after
   ``flowjax.swap_task_parts`` puts the pre-trained head and every BatchNorm back
   (``flowjax.models.task_parts``); the average of the two (the paper's unified metric);
   accuracy on the ``hard_fraction`` of test examples with the highest LP loss (Table 5).

Every stage runs on ``flowjax.fit``, data parallel over all devices of all hosts, and
checkpoints into ``<workdir>/checkpoints/<stage>-<digest>`` (the digest names the config,
the stage, its starting parameters and its weights): the same command started again
restores finished stages and resumes the interrupted one. Outputs in ``--workdir``:
``results.json`` (no wall-clock values), ``timing.json``, ``results.md``, ``figure1.png``
(the paper's Figure 1: ImageNet, target and average accuracy per method) and
``retention.png`` (target and ImageNet accuracy during training).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import flowjax
from experiments import cli, report
from experiments.vision import config as C
from experiments.vision import protocol as P

PAPER_RESNET50 = {  # FLOW_PAPER.md §3.1 (paper text and Figure 1), ResNet-50, six datasets
    "pre-trained ImageNet top-1": 79.02,
    "standard FT: ImageNet drop / target average": (42.11, 91.78),
    "FLOW: ImageNet drop / target average": (2.93, 86.25),
    "Figure 1 averages (FT / l2 / WiSE-FT / LP / FLOW)": (
        64.34,
        68.18,
        71.52,
        77.73,
        81.17,
    ),
}


class Run:
    """One run of the protocol: models, data, memoised stages, evaluation."""

    def __init__(self, cfg: C.Config, workdir: Path):
        from flowjax import datasets, models

        self.cfg, self.workdir = cfg, workdir
        if cfg.dataset not in C.DATASETS:
            raise ValueError(
                f"unknown dataset {cfg.dataset!r}; known: {sorted(C.DATASETS)}."
            )
        if not cfg.weights:
            raise ValueError(
                "set weights=/abs/path/model.safetensors (timm/torchvision names)."
            )
        d = C.DATASETS[cfg.dataset]
        reader = getattr(datasets, d["reader"])
        kw = {"val_fraction": cfg.val_fraction} if cfg.dataset != "flowers102" else {}
        self.sources = {
            s: reader(cfg.data_dir, s, **kw) for s in ("train_minus_val", "val", "test")
        }
        self.num_classes = self.sources["test"].num_classes
        imagenet = datasets.imagenet_val(cfg.imagenet_dir)
        if cfg.imagenet_limit is not None:
            imagenet = imagenet.subset(
                np.arange(min(cfg.imagenet_limit, len(imagenet))), "imagenet_val"
            )
        self.imagenet = imagenet
        dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[cfg.dtype]
        pre_model = models.load_resnet(cfg.arch, cfg.weights, dtype=dtype)
        self.parts = models.task_parts(pre_model)
        self.pretrained = P.split(pre_model)
        new = models.load_resnet(
            cfg.arch,
            cfg.weights,
            num_classes=self.num_classes,
            rngs=nnx.Rngs(cfg.seed),
            dtype=dtype,
        )
        self.start = P.split(new)  # pre-trained body, fresh head
        self.mesh = flowjax.default_mesh() if jax.device_count() > 1 else None
        self.resume_log = report.ResumeLog()
        self.inputs = report.digest(report.config_dict(cfg))
        self._fits: dict = {}
        self.curves: dict = {}
        self._memo: dict = {}

    # ---- evaluation --------------------------------------------------------------------

    def imagenet_acc(self, net: P.Net) -> float:
        return P.accuracy(
            P.restore_task_parts(net, self.pretrained, self.parts),
            self.imagenet,
            self.cfg,
            imagenet=True,
        )

    def evaluate(self, net: P.Net) -> dict:
        target = P.accuracy(net, self.sources["test"], self.cfg)
        imagenet = self.imagenet_acc(net)
        hard = self.sources["test"].subset(self.hard_rows(), "hard")
        return {
            "target_acc": target,
            "val_acc": P.accuracy(net, self.sources["val"], self.cfg),
            "imagenet_acc": imagenet,
            "average": (target + imagenet) / 2,
            "hard_acc": P.accuracy(net, hard, self.cfg),
        }

    def hard_rows(self) -> np.ndarray:
        """Rows of the test source with the ``hard_fraction`` highest LP-model losses (Table 5)."""
        if "hard" not in self._memo:
            table = P.example_losses(
                self.lp(),
                self.sources["test"],
                self.cfg,
                augment=False,
                seed=self.cfg.seed,
            )
            k = math.ceil(self.cfg.hard_fraction * len(table))
            ids = table.ids[np.argsort(-table.losses, kind="stable")[:k]]
            self._memo["hard"] = np.flatnonzero(np.isin(self.sources["test"].ids, ids))
        return self._memo["hard"]

    # ---- stages -------------------------------------------------------------------------

    def train(
        self,
        label: str,
        net: P.Net,
        *,
        lr: float,
        head_only: bool,
        schedule: str,
        weights: flowjax.WeightTable | None = None,
        extra=None,
    ) -> P.Net:
        cfg = self.cfg
        info = {
            "config": self.inputs,
            "stage": label,
            "start": report.digest(jax.tree.map(np.asarray, P.state(net))),
            "weights": None if weights is None else report.digest(weights.weights),
        }
        slug = label.replace(" ", "").replace("/", "_").replace("+", "-")
        steps = cfg.epochs * (len(self.sources["train_minus_val"]) // cfg.batch_size)

        def eval_fn(n: P.Net) -> dict:
            return {
                "target_acc": P.accuracy(n, self.sources["test"], cfg),
                "imagenet_acc": self.imagenet_acc(n),
            }

        stage = P.Stage(
            checkpoint_dir=self.workdir
            / "checkpoints"
            / f"{slug}-{report.digest(info)[:12]}",
            checkpoint_every=cfg.checkpoint_every,
            run_info=info,
            eval_fn=eval_fn,
            eval_every=cfg.curve_every,
            log=self.resume_log.stage(label, steps),
        )
        out, result = P.train(
            net,
            self.sources["train_minus_val"],
            head_only=head_only,
            lr=lr,
            epochs=cfg.epochs,
            schedule=schedule,
            seed=cfg.seed,
            cfg=cfg,
            weights=weights,
            extra=extra,
            stage=stage,
            mesh=self.mesh,
        )
        start = {"step": 0, **eval_fn(net)}
        self.curves[label] = [
            start,
            *[{k: r[k] for k in start} for r in result.history],
        ]
        return out

    def fit(self, method: str, lr: float | None) -> P.Net:
        key = (method, lr)
        if key not in self._fits:
            self._fits[key] = getattr(
                self, "_" + method.lower().replace(" + ", "_").replace("-", "_")
            )(lr)
        return self._fits[key]

    def lp(self) -> P.Net:
        return self.fit("LP", self.lrs["LP"])

    def flow_weights(self) -> flowjax.WeightTable:
        if "weights" not in self._memo:
            table = P.example_losses(
                self.lp(),
                self.sources["train_minus_val"],
                self.cfg,
                augment=self.cfg.prepass_augment,
                seed=self.cfg.seed,
            )
            self._memo["losses"] = table
            self._memo["weights"] = table.flow_weights()
        return self._memo["weights"]

    def body_mask(self, net: P.Net):
        return flowjax.trainable_mask(net.params, lambda path, _: path[0] != "fc")

    def wise(self, net: P.Net) -> P.Net:
        mask = {"params": self.body_mask(net), "stats": True}
        mixed = flowjax.wise_ft(
            P.state(self.start), P.state(net), self.cfg.wise_alpha, mask=mask
        )
        return P.from_state(net.graphdef, mixed)

    # ---- methods (fit(lr) -> the model for the target) ----------------------------------

    def _lp(self, lr):
        return self.train(
            f"LP@{lr:g}", self.start, lr=lr, head_only=True, schedule="constant"
        )

    def _ft(self, lr):
        return self.train(
            f"FT@{lr:g}", self.start, lr=lr, head_only=False, schedule="cosine"
        )

    def _lp_ft(self, lr):
        return self.train(
            f"LP-FT@{lr:g}", self.lp(), lr=lr, head_only=False, schedule="cosine"
        )

    def _l2_sp(self, lr):
        extra = flowjax.l2sp(self.cfg.l2sp_strength, mask=self.body_mask(self.start))
        return self.train(
            f"L2-SP@{lr:g}",
            self.start,
            lr=lr,
            head_only=False,
            schedule="cosine",
            extra=extra,
        )

    def _flow(self, lr):
        net = self.train(
            f"FLOW@{lr:g}/round1",
            self.lp(),
            lr=lr,
            head_only=False,
            schedule="cosine",
            weights=self.flow_weights(),
        )
        lr2 = self.cfg.lr("FLOW round 2")
        return self.train(
            f"FLOW@{lr:g}/round2@{lr2:g}",
            net,
            lr=lr2,
            head_only=True,
            schedule="constant",
        )

    def _wise_ft(self, lr):
        return self.wise(self.fit("FT", self.lrs["FT"]))

    def _flow_wise_ft(self, lr):
        return self.wise(self.fit("FLOW", self.lrs["FLOW"]))


NEEDS = {
    "LP-FT": ("LP",),
    "FLOW": ("LP",),
    "WiSE-FT": ("FT",),
    "FLOW + WiSE-FT": ("FLOW",),
}
NO_LR = ("WiSE-FT", "FLOW + WiSE-FT")


def ordered(names) -> list[str]:
    """``names`` and the methods they build on, in :data:`~experiments.vision.config.METHODS` order."""
    return cli.with_dependencies(names, C.METHODS, NEEDS.get)


def run(cfg: C.Config, workdir: Path, command: str | None = None) -> dict:
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    r = Run(cfg, workdir)
    r.lrs = {}
    grids = {}
    names = ordered(cfg.methods)
    for name in names:
        if name in NO_LR:
            r.lrs[name] = None
            continue
        grid = [cfg.lr(name) * f for f in cfg.lr_factors]
        vals = [P.accuracy(r.fit(name, lr), r.sources["val"], cfg) for lr in grid]
        r.lrs[name] = grid[
            int(np.argmax(vals))
        ]  # first maximum: the smallest LR on ties
        grids[name] = {"lr": grid, "val_acc": vals}
        print(
            f"{name}: validation accuracy {dict(zip(grid, vals, strict=True))} -> lr {r.lrs[name]:g}",
            flush=True,
        )
    pre_imagenet = P.accuracy(r.pretrained, r.imagenet, cfg, imagenet=True)
    methods = {}
    for name in names:
        net = r.fit(name, r.lrs[name])
        methods[name] = {"lr": r.lrs[name], **r.evaluate(net)}
        own = [
            k
            for k in r.curves
            if k.split("@")[0] == name
            and (r.lrs[name] is None or f"@{r.lrs[name]:g}" in k)
        ]
        methods[name]["curves"] = {k: r.curves[k] for k in own}
        print(
            f"{name}: {methods[name]['target_acc']:.4f} target, {methods[name]['imagenet_acc']:.4f} ImageNet",
            flush=True,
        )
    w = r.flow_weights() if "FLOW" in names else None
    results = {
        "config": report.config_dict(cfg),
        "command": command,
        "data": {s: len(src) for s, src in r.sources.items()}
        | {"imagenet_val": len(r.imagenet)},
        "pretrained": {"imagenet_acc": pre_imagenet},
        "lr_selection": grids,
        "methods": methods,
        "flow": None
        if w is None
        else {
            "temperature": w.temperature,
            "official_tau_resnet18": C.DATASETS[cfg.dataset]["tau_resnet18"],
            "diagnostics": flowjax.diagnostics.weight_summary(w, r._memo["losses"])[0],
        },
        "paper_resnet50": PAPER_RESNET50,
    }
    results = report.write_json(workdir / "results.json", results)
    report.write_text(workdir / "results.md", markdown(results))
    figure1(results, workdir / "figure1.png")
    retention_plot(results, workdir / "retention.png")
    timing = {
        "total_s": time.perf_counter() - t0,
        "stages_restored": len(r.resume_log.restored),
        "stages_resumed_part_way": len(r.resume_log.resumed),
    }
    report.write_json(workdir / "timing.json", timing)
    line = r.resume_log.summary(workdir / "checkpoints")
    if line:
        print(line)
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    cfg = results["config"]
    pre = results["pretrained"]["imagenet_acc"]
    rows = [["pre-trained", "—", f"{100 * pre:.2f}", "—", "—", "—"]]
    for name, m in results["methods"].items():
        rows.append(
            [
                name,
                "—" if m["lr"] is None else f"{m['lr']:g}",
                f"{100 * m['imagenet_acc']:.2f}",
                f"{100 * m['target_acc']:.2f}",
                f"{100 * m['average']:.2f}",
                f"{100 * m['hard_acc']:.2f}",
            ]
        )
    lines = [
        f"# FLOW vision protocol: {cfg['arch']} on {cfg['dataset']}",
        "",
        f"Target accuracy on the test split; ImageNet-1K top-1 ({results['data']['imagenet_val']} "
        "validation images) with the pre-trained head and BatchNorm swapped back; learning rates "
        "chosen on the validation split.",
        "",
        report.markdown_table(
            [
                "method",
                "LR",
                "ImageNet (%)",
                "target (%)",
                "average (%)",
                "hard 10 % (%)",
            ],
            rows,
        ),
    ]
    if results["flow"]:
        f = results["flow"]
        lines += [
            "",
            f"τ = {f['temperature']:.4f} (the official ResNet-18 value: {f['official_tau_resnet18']}); "
            f"ESS {100 * f['diagnostics']['ess_fraction']:.1f} % of n.",
        ]
    lines += ["", f"Command: `{results['command']}` (times: `timing.json`)."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure1(results: dict, path: Path) -> None:
    """The paper's Figure 1 for this run: ImageNet, target and average accuracy per method."""
    plt = _pyplot()
    names = list(results["methods"])
    keys = (
        ("imagenet_acc", "ImageNet-1K (retention)"),
        ("target_acc", "target"),
        ("average", "average"),
    )
    fig, ax = plt.subplots(
        figsize=(max(6, 1.3 * len(names)), 4), constrained_layout=True
    )
    x = np.arange(len(names))
    for i, (k, label) in enumerate(keys):
        ax.bar(
            x + (i - 1) * 0.27,
            [100 * results["methods"][n][k] for n in names],
            0.27,
            label=label,
        )
    ax.axhline(
        100 * results["pretrained"]["imagenet_acc"],
        color="k",
        ls="--",
        lw=1,
        label="pre-trained ImageNet",
    )
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("accuracy (%)")
    cfg = results["config"]
    ax.set_title(
        f"{cfg['arch']} on {cfg['dataset']}: forgetting and learning per method",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retention_plot(results: dict, path: Path) -> None:
    """Target and ImageNet accuracy against steps for each method's own stages (at its chosen LR)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    for name, m in results["methods"].items():
        offset, xs, tgt, imn = 0, [], [], []
        for curve in m["curves"].values():
            for rec in curve:
                xs.append(offset + rec["step"])
                tgt.append(100 * rec["target_acc"])
                imn.append(100 * rec["imagenet_acc"])
            offset = xs[-1]
        if xs:
            axes[0].plot(xs, tgt, marker="o", ms=3, label=name)
            axes[1].plot(xs, imn, marker="o", ms=3, label=name)
    for ax, title in zip(
        axes,
        ("target accuracy (test)", "ImageNet-1K accuracy (head + BN swapped back)"),
        strict=True,
    ):
        ax.set_xlabel("training steps of the method's own stages")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    _, cfg, workdir = cli.config_command(__doc__.split("\n")[0], C.load, argv)
    if not cfg.data_dir:  # the tiny config: fabricated files in the workdir
        from experiments.vision import fabricate

        cfg = dataclasses.replace(
            cfg,
            **fabricate.make(workdir / "fabricated", arch=cfg.arch, width=cfg.width),
        )
    argv = sys.argv[1:] if argv is None else argv
    return run(cfg, workdir, " ".join(["python -m experiments.vision.run", *argv]))


if __name__ == "__main__":
    main()
