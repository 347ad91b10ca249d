"""The paper's LLM experiment as one command: MetaMathQA → pre-pass → FLOW weights → fine-tuning → export → lm-eval.

Command (big_vision style: a config file is data, single fields overridable)::

    python -m experiments.llm.run --config experiments/llm/configs/gemma2_2b_metamath_flow.py \\
        --workdir /abs/runs/gemma2_2b --set checkpoint=/abs/gemma-2-2b \\
        --set data=/abs/MetaMathQA-395K.json
    python -m experiments.llm.run --config experiments/llm/configs/tiny.py --workdir /tmp/llm

The tiny config fabricates its inputs in ``<workdir>/fabricated`` (``experiments.llm.fabricate``)
and runs everything on CPU (measured: 46 s wall, 18 s of CPU, on a shared 2-core machine).
Steps (FLOW_PAPER.md §2.2, L1-L6; :mod:`experiments.llm.config` lists the official settings):

1. **Model**: ``flowjax.models.load_causal_lm(checkpoint, dtype, mesh)``, sharded on load over
   the config's ``('data', 'model')`` mesh (FSDP over ``'data'``, tensor parallel over
   ``'model'``), and ``load_tokenizer``.
2. **Data**: ``flowjax.datasets.metamathqa`` + ``sft_example`` (Alpaca template, prompt
   masked, EOS a target, 1024 tokens), tokenised once into the workdir.
3. **Pre-pass** (FLOW methods): the pre-trained model, bucketed and sharded
   (``flowjax.lm_sequence_losses``; ``weighting="token"``: ``lm_token_losses``), τ = median,
   ``w = exp(-loss/τ)``. Examples whose response was truncated away (no target token: the
   official weight 0) are left out of training.
4. **Training**: full FT, LoRA (``flowjax.add_lora`` on the seven projections), ℓ2
   (``flowjax.l2sp(scale="num_params")``) through ``flowjax.make_train_step`` and
   ``flowjax.fit``, with gradient accumulation (``optax.MultiSteps``; every micro-batch
   divides by its group's token count, so the step is the official
   ``Σ w Σ nll / N_tokens`` of the effective batch), checkpoints and
   ``flowjax.RetentionMonitor`` on held-out text perplexity. WiSE-FT averages the FT model
   with θ₀ (``flowjax.wise_ft``); LoRA is merged (``flowjax.merge_lora``).
5. **Export**: ``flowjax.models.save_causal_lm`` + the tokenizer files, an HF directory
   (``lm_eval --model hf --model_args pretrained=<export>`` reads it too).
6. **Evaluation**: the exported model reloaded, lm-eval's tasks through
   ``flowjax.evaluation.harness_lm``; the pre-trained model the same way.

Every stage lives in ``<workdir>/stages/<name>-<digest>`` (the digest names what it depends
on: the checkpoint's and the data's bytes, the settings), so the same command started
again restores finished stages and says so, resumes a killed training stage from its last
checkpoint (bit-identical to an uninterrupted run) and a killed pre-pass from its cache.
Configs of one model share a workdir: each writes its row to ``<workdir>/rows/`` and
``results.md`` shows every row there in the paper's Table 2 layout, with the paper's
numbers beside. Outputs: ``results.json`` (no wall-clock values), ``results.md``,
``timing.json``, ``stages/``, ``rows/``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

import flowjax
from experiments import cli, report
from experiments.llm import config as C
from experiments.llm import pipeline as PL

ROW_NAMES = {
    "pretrained": "Pre-trained",
    "ft": "Standard FT",
    "l2": "ℓ2-Reg",
    "wise_ft": "WiSE-FT",
    "lora": "LoRA",
    "flow": "FLOW",
    "flow_lora": "FLOW + LoRA",
    "qlora": "QLoRA",
    "flow_qlora": "FLOW + QLoRA",
}
ROW_ORDER = (
    "pretrained",
    "ft",
    "l2",
    "wise_ft",
    "lora",
    "qlora",
    "flow",
    "flow_lora",
    "flow_qlora",
)
EVAL_FIELDS = (
    "tasks",
    "eval_include_path",
    "eval_include_defaults",
    "eval_limit",
    "eval_batch_size",
    "eval_max_length",
    "eval_bucket",
    "eval_bootstrap_iters",
    "confirm_run_unsafe_code",
)
NOT_TRAINING = (
    *EVAL_FIELDS,
    "model",
    "checkpoint",
    "tokenizer",
    "data",
    "mesh",
    "wise_alpha",
    "checkpoint_every",
)
TOKEN_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


def _atomic_json(path: Path, obj) -> dict:
    tmp = path.with_suffix(".tmp")
    out = report.write_json(tmp, obj)
    tmp.replace(path)
    return out


class Run:
    """One run: the inputs' digests, lazily loaded model and data, memoised stages."""

    def __init__(self, cfg: C.Config, workdir: Path, write=print):
        self.cfg, self.workdir, self.write = cfg, workdir, write
        self.stages = workdir / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.files = PL.checkpoint_files(cfg.checkpoint, cfg.tokenizer)
        self.hashes = self.stages / "file_hashes.json"
        self.base = PL.file_digest(self.files, self.hashes)
        self.bos, self.eos = PL.special_ids(cfg)
        self.resume_log = report.ResumeLog(write)
        self.restored: list[str] = []
        self._memo: dict = {}

    # ---- inputs ------------------------------------------------------------------------

    @property
    def mesh(self):
        if "mesh" not in self._memo:
            self._memo["mesh"] = PL.make_mesh(self.cfg.mesh)
        return self._memo["mesh"]

    @property
    def tok(self):
        from flowjax import models

        if "tok" not in self._memo:
            self._memo["tok"] = models.load_tokenizer(self.files[-1])
        return self._memo["tok"]

    def load(self, path):
        from flowjax import models

        dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[self.cfg.dtype]
        return models.load_causal_lm(path, dtype=dtype, mesh=self.mesh)

    @property
    def base_model(self):
        if "base" not in self._memo:
            self._memo["base"] = self.load(self.cfg.checkpoint)
        return self._memo["base"]

    def _stage(self, name: str, info: dict) -> tuple[Path, str]:
        d = report.digest(info)
        return self.stages / f"{name}-{d[:12]}", d

    def _restored(self, what: str, where: Path) -> None:
        self.restored.append(what)
        self.write(f"restored {what} from {where.relative_to(self.workdir)}")

    def data_digest(self) -> str:
        path = Path(self.cfg.data)
        files = (
            sorted(
                p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet")
            )
            if path.is_dir()
            else [path]
        )
        if not files or not all(p.is_file() for p in files):
            raise FileNotFoundError(f"no MetaMathQA file at data={self.cfg.data!r}.")
        cfg = self.cfg
        return report.digest(
            {
                "files": PL.file_digest(files, self.hashes),
                "tokenizer": PL.file_digest(self.files[-1:], self.hashes),
                "special": [self.bos, self.eos],
                "template": cfg.template,
                "max_length": cfg.max_length,
                "limit": cfg.data_limit,
            }
        )

    def examples(self) -> list[dict]:
        """The tokenised examples (stage ``tokens``: flat arrays in one ``.npz``)."""
        if "examples" in self._memo:
            return self._memo["examples"]
        d = self.data_digest()
        path = self.stages / f"tokens-{d[:12]}.npz"
        if path.is_file():
            with np.load(path) as z:
                ids, offsets = z["ids"], z["offsets"]
                tokens, mask = z["tokens"], z["mask"]
            self._restored("tokenised data", path)
            ex = [
                {"id": int(i), "tokens": tokens[a:b], "mask": mask[a:b]}
                for i, a, b in zip(ids, offsets[:-1], offsets[1:], strict=True)
            ]
        else:
            ex = PL.tokenised(self.cfg, self.tok, self.bos, self.eos)
            offsets = np.cumsum([0] + [len(e["tokens"]) for e in ex])
            tmp = path.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                ids=np.array([e["id"] for e in ex], np.int64),
                offsets=offsets,
                tokens=np.concatenate([e["tokens"] for e in ex]),
                mask=np.concatenate([e["mask"] for e in ex]),
            )
            tmp.replace(path)
        self._memo["examples"] = ex
        self._memo["data_digest"] = d
        return ex

    # ---- stages ------------------------------------------------------------------------

    def prepass(self):
        """``(losses table, weights table)`` of the pre-trained model (stage ``prepass``)."""
        if "prepass" in self._memo:
            return self._memo["prepass"]
        cfg = self.cfg
        examples = self.examples()
        stage, _ = self._stage(
            "prepass",
            {
                "base": self.base,
                "data": self._memo["data_digest"],
                "level": cfg.weighting,
                "buckets": cfg.bucket_lengths,
            },
        )
        table_cls = (
            flowjax.LossTable if cfg.weighting == "sequence" else flowjax.TokenLosses
        )
        path = stage / "losses.npz"
        if path.is_file():
            table = table_cls.load(path)
            self._restored("pre-pass", stage)
        else:
            stage.mkdir(parents=True, exist_ok=True)
            table = PL.prepass(
                self.base_model, examples, cfg, self.mesh, stage / "cache", self.eos
            )
            table.save(path)
        weights = table.flow_weights(cfg.temperature)
        self._memo["prepass"] = (table, weights)
        return table, weights

    def train_info(self, method: str) -> dict:
        cfg = self.cfg
        info = {
            k: v for k, v in report.config_dict(cfg).items() if k not in NOT_TRAINING
        }
        info["method"] = method
        kind = dataclasses.replace(cfg, method=method)
        if not kind.flow:
            for k in ("weighting", "temperature", "prepass_batch_size"):
                info.pop(k)
        if not kind.lora:
            for k in ("lora_rank", "lora_alpha", "lora_targets"):
                info.pop(k)
        if not kind.qlora:
            info.pop("qlora_block_size")
        if method != "l2":
            info.pop("l2_strength")
        self.examples()
        return {**info, "base": self.base, "data": self._memo["data_digest"]}

    def trained(self, method: str) -> tuple[Path, str, dict]:
        """Stage ``method``: ``(export directory, digest, summary)``, training if needed."""
        cfg = dataclasses.replace(self.cfg, method=method)
        info = self.train_info(method)
        stage, digest = self._stage(method, info)
        export, summary_file = stage / "export", stage / "summary.json"
        if summary_file.is_file():
            self._restored(f"finished stage {method}", stage)
            return export, digest, json.loads(summary_file.read_text())
        stage.mkdir(parents=True, exist_ok=True)
        examples = [e for e in self.examples() if e["mask"].any()]
        weights = self.prepass()[1] if cfg.flow else None
        data = PL.TrainData(examples, weights, cfg, self.eos)
        windows = PL.retention_windows(cfg, self.tok, self.bos)
        from flax import nnx

        graphdef, params, rest = nnx.split(self.base_model, nnx.Param, ...)
        ppl0 = PL.perplexity(graphdef, params, rest, windows, cfg)
        model, result = PL.train(
            self.base_model,
            data,
            cfg,
            mesh=self.mesh,
            stage_dir=stage,
            run_info={"stage": digest},
            windows=windows,
            baseline_ppl=ppl0,
            log=self.resume_log.stage(method, data.num_steps),
        )
        self.export(model, export)
        history = result.history
        summary = {
            "examples": len(examples),
            "micro_steps": data.num_steps,
            "optimizer_steps": data.optimizer_steps,
            "warmup_steps": PL.warmup_steps(cfg, data.optimizer_steps),
            "accumulation": cfg.accumulation,
            "stopped_at": result.stopped_at,
            "pretrained_heldout_ppl": ppl0,
            "first_token_nll": history[0]["token_nll"],
            "last_token_nll": history[-1]["token_nll"],
            "retention": [
                {
                    k: r[k]
                    for k in (
                        "step",
                        "probe/heldout_ppl",
                        "retention/heldout_ppl",
                        "param_distance",
                    )
                }
                for r in history
                if "probe/heldout_ppl" in r
            ],
        }
        _atomic_json(summary_file, summary)
        return export, digest, json.loads(summary_file.read_text())

    def export(self, model, path: Path) -> None:
        from flowjax import models

        models.save_causal_lm(
            model,
            path,
            config_extra={"bos_token_id": self.bos, "eos_token_id": self.eos},
        )
        src = self.files[-1].parent
        for name in TOKEN_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, path / name)

    def wise(self) -> tuple[Path, str, dict]:
        """Stage ``wise_ft``: ``wise_alpha · θ₀ + (1 − wise_alpha) · θ_FT`` over every parameter."""
        from flax import nnx

        ft_export, ft_digest, summary = self.trained("ft")
        stage, digest = self._stage(
            "wise_ft", {"ft": ft_digest, "alpha": self.cfg.wise_alpha}
        )
        export = stage / "export"
        if (export / "config.json").is_file():
            self._restored("WiSE-FT average", stage)
        else:
            ft = self.load(ft_export)
            graphdef, pre = nnx.split(self.base_model)
            mixed = flowjax.wise_ft(pre, nnx.state(ft), self.cfg.wise_alpha)
            self.export(nnx.merge(graphdef, mixed), export)
        return export, digest, summary

    def evaluation(self, label: str, model_digest: str, path) -> dict:
        """lm-eval scores of the model at ``path`` (stage ``eval-<label>``)."""
        cfg = self.cfg
        info = {
            "model": model_digest,
            "special": [self.bos, self.eos],
            **{k: getattr(cfg, k) for k in EVAL_FIELDS},
        }
        if cfg.eval_include_path:  # local task files by content, not by where they lie
            root = Path(cfg.eval_include_path)
            files = sorted(p for p in root.rglob("*") if p.is_file())
            info["eval_include_path"] = {
                "files": [str(p.relative_to(root)) for p in files],
                "sha256": PL.file_digest(files, self.hashes),
            }
        stage, _ = self._stage(f"eval-{label}", report.to_jsonable(info))
        out = stage / "scores.json"
        if out.is_file():
            self._restored(f"evaluation of {label}", stage)
            return json.loads(out.read_text())
        stage.mkdir(parents=True, exist_ok=True)
        model = self.base_model if path is None else self.load(path)
        scores = PL.evaluate(model, self.tok, self.bos, self.eos, cfg)
        return _atomic_json(out, scores)


def row_key(cfg: C.Config) -> str:
    return cfg.method + ("_token" if cfg.flow and cfg.weighting == "token" else "")


def run(cfg: C.Config, workdir: Path, command: str | None = None, write=print) -> dict:
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    r = Run(cfg, workdir, write)
    pretrained = r.evaluation("pretrained", r.base, None)
    if cfg.method == "wise_ft":
        export, digest, training = r.wise()
    else:
        export, digest, training = r.trained(cfg.method)
    scores = r.evaluation(row_key(cfg), digest, export)
    prepass = None
    if cfg.flow:
        table, w = r.prepass()
        prepass = {
            "level": cfg.weighting,
            "temperature": w.temperature,
            "examples": len(table),
        }
        if cfg.weighting == "sequence":
            prepass["diagnostics"] = flowjax.diagnostics.weight_summary(w, table)[0]
    examples = r.examples()
    rows_dir = workdir / "rows"
    rows_dir.mkdir(exist_ok=True)
    tasks = report.to_jsonable(cfg.tasks)
    for key, s, extra in (
        ("pretrained", pretrained, {}),
        (
            row_key(cfg),
            scores,
            {"lr": cfg.lr, "export": str(export.relative_to(workdir))},
        ),
    ):
        _atomic_json(
            rows_dir / f"{key}.json",
            {"key": key, "base": r.base, "task_spec": tasks, **extra, **s},
        )
    rows = collect_rows(rows_dir, r.base, tasks)
    results = {
        "config": report.config_dict(cfg),
        "command": command,
        "inputs": {"checkpoint_sha256": r.base, "data_sha256": r._memo["data_digest"]},
        "data": {
            "records": len(examples),
            "without_target": int(sum(not e["mask"].any() for e in examples)),
            "target_tokens": int(sum(int(e["mask"].sum()) for e in examples)),
        },
        "prepass": prepass,
        "training": training,
        "pretrained": pretrained,
        "method": scores,
        "table": rows,
        "paper": C.PAPER_NUMBERS.get(cfg.model, {}),
    }
    results = _atomic_json(workdir / "results.json", results)
    report.write_text(workdir / "results.md", markdown(results))
    timing = {
        "total_s": time.perf_counter() - t0,
        "restored": r.restored,
        "stages_resumed_part_way": r.resume_log.resumed,
    }
    report.write_json(workdir / "timing.json", timing)
    line = r.resume_log.summary(workdir / "stages")
    if line:
        write(line)
    write(markdown(results))
    return results


def collect_rows(rows_dir: Path, base: str, tasks) -> dict:
    """The rows in ``rows_dir`` of the same checkpoint and tasks, in Table 2's order."""
    rows = {}
    for p in sorted(rows_dir.glob("*.json")):
        row = json.loads(p.read_text())
        if row.get("base") == base and row.get("task_spec") == tasks:
            rows[row["key"]] = row
    order = {k: i for i, k in enumerate(ROW_ORDER)}
    return {
        k: rows[k]
        for k in sorted(
            rows, key=lambda k: (order.get(k.removesuffix("_token"), 99), k)
        )
    }


def _cell(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def summary_columns(columns: dict) -> dict:
    """Table 2's cells: the general columns, their mean, the target and the average."""
    general = [columns[c] for c in C.GENERAL_COLUMNS if c in columns]
    g = float(np.mean(general)) if general else None
    t = columns.get(C.TARGET_COLUMN)
    avg = None if g is None or t is None else (g + t) / 2
    return {
        **{c: columns.get(c) for c in C.GENERAL_COLUMNS},
        "general": g,
        C.TARGET_COLUMN: t,
        "average": avg,
    }


def markdown(results: dict) -> str:
    cfg = results["config"]
    header = [
        "method",
        "Commonsense",
        "MMLU",
        "MBPP",
        "General",
        "GSM8K (target)",
        "Average",
    ]
    keys = [*C.GENERAL_COLUMNS, "general", C.TARGET_COLUMN, "average"]
    rows = []
    cells = {}
    for key, row in results["table"].items():
        s = summary_columns(row["columns"])
        cells[key] = s
        name = ROW_NAMES.get(key.removesuffix("_token"), key)
        if key.endswith("_token"):
            name += " (token weights)"
        rows.append([name, *(_cell(s[k]) for k in keys)])
    lines = [
        f"# FLOW on MetaMathQA: {cfg['model']} (the paper's Table 2 layout)",
        "",
        "Accuracy (%) from lm-evaluation-harness; General = mean of the general-capability "
        "columns present, Average = (General + GSM8K) / 2. Tasks: "
        + ", ".join(f"{t} ({k}, {n}-shot) → {c}" for c, t, k, n in cfg["tasks"])
        + ".",
        "",
        report.markdown_table(header, rows, align="l" + "r" * (len(header) - 1)),
    ]
    paper = results["paper"]
    if paper:
        lines += [
            "",
            "Differences (points), measured here and in the paper (FLOW_PAPER.md §3.2):",
            "",
        ]
        drows = []
        for name, ref in paper.items():
            a, b = (k.strip() for k in name.split(" - "))
            measured = None
            if a in cells and b in cells:
                measured = {
                    k: None
                    if cells[a][k] is None or cells[b][k] is None
                    else 100 * (cells[a][k] - cells[b][k])
                    for k in keys
                }
            for col, v in ref.items():
                shown = (
                    f"{v[0]:+.2f} to {v[1]:+.2f}"
                    if isinstance(v, list)
                    else f"{v:+.2f}"
                )
                got = (
                    "—"
                    if measured is None or measured.get(col) is None
                    else f"{measured[col]:+.2f}"
                )
                drows.append([name, col, got, shown])
        lines.append(
            report.markdown_table(["difference", "column", "here", "paper"], drows)
        )
    t = results["training"]
    lines += [
        "",
        f"Training: {t['optimizer_steps']} optimiser steps of {cfg['batch_size']} sequences "
        f"({t['accumulation']} micro-batches of {cfg['micro_batch_size']}); mean target-token "
        f"NLL of the first and the last logged micro-batch {t['first_token_nll']:.4f} → "
        f"{t['last_token_nll']:.4f}; held-out text perplexity "
        f"{t['pretrained_heldout_ppl']:.3f} pre-trained"
        + (
            f", {t['retention'][-1]['probe/heldout_ppl']:.3f} at the end."
            if t["retention"]
            else "."
        ),
    ]
    if results["prepass"]:
        p = results["prepass"]
        lines.append(
            f"FLOW: {p['level']} weights, τ = {p['temperature']:.4f} over {p['examples']} examples."
        )
    lines += ["", f"Command: `{results['command']}` (times: `timing.json`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, write=print) -> dict:
    parser, cfg, workdir = cli.config_command(__doc__.split("\n")[0], C.load, argv)
    if cfg.model == "tiny" and not cfg.checkpoint:  # fabricated inputs in the workdir
        from experiments.llm import fabricate

        cfg = dataclasses.replace(cfg, **fabricate.make(workdir / "fabricated"))
    for field in ("checkpoint", "data"):
        if not getattr(cfg, field):
            parser.error(f"set {field}=/abs/path (see the config file's docstring).")
    argv = sys.argv[1:] if argv is None else argv
    return run(cfg, workdir, " ".join(["python -m experiments.llm.run", *argv]), write)


if __name__ == "__main__":
    main()
