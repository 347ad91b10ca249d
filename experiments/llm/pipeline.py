"""The mechanics of the LLM pipeline: data, the pre-pass, batches with accumulation, one training stage, evaluation.

* Data (:func:`tokenised`): ``flowjax.datasets.metamathqa`` + ``sft_example`` with the
  model's tokenizer (``tokenizers``, no transformers), BOS/EOS ids from ``config.json``.
* Pre-pass (:func:`prepass`): the frozen pre-trained model over every example,
  bucketed, sharded over ``'data'`` (``flowjax.lm_sequence_losses``, or
  ``flowjax.lm_token_losses`` for the token-level ablation), cached in its stage
  directory so a killed pre-pass resumes.
* Batches (:class:`TrainData`): every epoch a seeded permutation of the examples is
  bucketed (``flowjax.bucket_batches``) into micro-batches of ``micro_batch_size``
  rows (a bucket's last one padded with empty rows), the micro-batches are shuffled
  (same seed) and taken ``accumulation`` at a time; an incomplete last group is dropped
  (HF Trainer steps on it instead). Every micro-batch carries the number of target
  tokens of its WHOLE group: ``optax.MultiSteps`` averages the micro-batch gradients,
  so each micro-batch divides by ``N_group / accumulation``, and the optimiser step
  gets the gradient of ``Σ_group w_i Σ_t nll_it / N_group`` exactly: the official
  normalisation (``num_items_in_batch``), the same as one un-accumulated batch.
* Training (:func:`train`): ``flowjax.make_train_step`` + ``flowjax.fit`` (checkpoints,
  resume, ``flowjax.RetentionMonitor`` on held-out text perplexity), parameters kept in
  their FSDP shardings; AdamW, clipping, 3 % warm-up + cosine (:func:`make_tx`).
* Evaluation (:func:`evaluate`): ``lm_eval.simple_evaluate`` on
  ``flowjax.evaluation.harness_lm`` around the model, one call per few-shot count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flowjax
from experiments.llm.config import Config


def make_mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    """A ``('data', 'model')`` mesh over every device (``-1``: the devices left)."""
    n = jax.device_count()
    data, model = shape
    if data == -1:
        data = n // model if model > 0 and n % model == 0 else 0
    if model == -1:
        model = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or model < 1 or data * model != n:
        raise ValueError(f"mesh {shape} does not fit the {n} devices.")
    return jax.make_mesh(
        (data, model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )


def file_digest(paths: list[Path], memo: Path | None = None) -> str:
    """SHA-256 over the names and bytes of ``paths`` (in order), read in 16 MiB pieces.

    ``memo``: a JSON file remembering each file's hash by (absolute path, size, mtime), so
    a rerun does not read a multi-GB checkpoint again (as ``make`` trusts mtimes).
    """
    known = json.loads(memo.read_text()) if memo is not None and memo.is_file() else {}
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in known:
            one = hashlib.sha256()
            with open(p, "rb") as f:
                for piece in iter(lambda: f.read(1 << 24), b""):
                    one.update(piece)
            known[key] = one.hexdigest()
        h.update(p.name.encode())
        h.update(known[key].encode())
    if memo is not None:
        tmp = memo.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        tmp.replace(memo)
    return h.hexdigest()


def checkpoint_files(checkpoint: str, tokenizer: str) -> list[Path]:
    """The files that define the pre-trained model: config, weights, tokenizer."""
    d = Path(checkpoint)
    weights = sorted(d.glob("*.safetensors"))
    if not (d / "config.json").is_file() or not weights:
        raise FileNotFoundError(
            f"checkpoint={checkpoint!r} needs config.json and *.safetensors (an HF directory)."
        )
    tok = Path(tokenizer or checkpoint)
    tok = tok if tok.suffix == ".json" else tok / "tokenizer.json"
    if not tok.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {tok}.")
    return [d / "config.json", *weights, tok]


def special_ids(cfg: Config) -> tuple[int | None, int]:
    """``(bos, eos)``: the config's, else ``config.json``'s ``bos_token_id`` / ``eos_token_id``."""
    hf = json.loads((Path(cfg.checkpoint) / "config.json").read_text())

    def pick(own: int, key: str):
        if own >= 0:
            return own
        v = hf.get(key)
        if isinstance(v, list):  # Llama 3 instruct lists several EOS ids: the first
            v = v[0]
        return v

    bos, eos = pick(cfg.bos_id, "bos_token_id"), pick(cfg.eos_id, "eos_token_id")
    if eos is None:
        raise ValueError(
            f"{cfg.checkpoint}/config.json has no eos_token_id: set eos_id=..."
        )
    return bos, int(eos)


def tokenised(cfg: Config, tok, bos: int | None, eos: int) -> list[dict]:
    """Every MetaMathQA record as ``sft_example`` tokens and target mask (the official recipe)."""
    from flowjax import datasets

    if cfg.max_length > max(cfg.bucket_lengths):
        raise ValueError(
            f"max_length {cfg.max_length} exceeds the longest bucket {max(cfg.bucket_lengths)}."
        )
    records = datasets.metamathqa(cfg.data)
    if cfg.data_limit is not None:
        records = records[: cfg.data_limit]
    prompts = [cfg.template.format(query=r["query"]) for r in records]
    wholes = [p + r["response"] for p, r in zip(prompts, records, strict=True)]
    # One batched encode of every text (the tokenizers package runs it in parallel);
    # sft_example then looks the two encodings of each record up.
    enc = dict(
        zip(
            prompts + wholes,
            tok.encode_batch(prompts + wholes, add_special_tokens=False),
            strict=True,
        )
    )
    return [
        datasets.sft_example(
            r,
            lambda s: enc[s].ids,
            bos_id=bos,
            eos_id=eos,
            max_length=cfg.max_length,
            template=cfg.template,
        )
        for r in records
    ]


@functools.cache
def logits_fn(graphdef):
    """``(state, tokens [B, T]) -> logits``: the batched form the pre-passes take.

    One function per architecture, so later pre-passes reuse the compiled steps.
    """
    return functools.partial(_logits, graphdef)


def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def prepass(model, examples, cfg: Config, mesh, cache_dir: Path, pad_id: int):
    """The pre-trained losses: a ``LossTable`` (sequence) or ``TokenLosses`` (token level)."""
    graphdef, state = nnx.split(model)
    kw = {
        "bucket_lengths": cfg.bucket_lengths,
        "batch_size": cfg.prepass_batch_size,
        "pad_id": pad_id,
        "on_empty": "skip",
        "cache_dir": str(cache_dir),
        "batched": True,
        "mesh": mesh,
        "progress": False,
        "param_shardings": jax.tree.map(lambda x: x.sharding, state),
    }
    fn = logits_fn(graphdef)
    n, p = jax.process_count(), jax.process_index()
    examples = examples[p::n]  # each process feeds its share; every one gets the table
    if cfg.weighting == "sequence":
        return flowjax.lm_sequence_losses(fn, state, examples, **kw)
    return flowjax.lm_token_losses(fn, state, examples, **kw)


# ---- batches -------------------------------------------------------------------------------


class TrainData:
    """Micro-batches of the training stage, a pure function of ``(seed, epoch, position)``.

    ``data(start)`` yields micro-batch ``start`` on (what ``flowjax.fit`` resumes from):
    ``{"tokens" int32 [B, T], "mask" bool [B, T], "weight" [B] or [B, T-1],
    "denominator" float32 [B]}``, ``B = micro_batch_size``, ``T`` a bucket length (with
    several processes, each yields its ``B / process_count`` rows of the same plan).
    ``weights`` is a ``WeightTable`` / ``TokenWeights`` keyed by id, or None (all 1).
    """

    def __init__(self, examples: list[dict], weights, cfg: Config, pad_id: int):
        self.by_id = {int(ex["id"]): ex for ex in examples}
        if len(self.by_id) != len(examples):
            raise ValueError("training examples with duplicate ids.")
        self.ids = np.array(sorted(self.by_id), np.int64)
        self.targets = {i: int(ex["mask"].sum()) for i, ex in self.by_id.items()}
        self.weights, self.cfg, self.pad_id = weights, cfg, pad_id
        self.k = cfg.accumulation
        n = len(self.plan(0))
        self.groups_per_epoch = n // self.k
        if self.groups_per_epoch == 0:
            raise ValueError(
                f"{len(examples)} examples make {n} micro-batches of {cfg.micro_batch_size}: "
                f"fewer than the {self.k} of one optimiser step (batch_size {cfg.batch_size})."
            )
        self.per_epoch = self.groups_per_epoch * self.k
        self.num_steps = cfg.epochs * self.per_epoch  # micro-steps
        self.optimizer_steps = cfg.epochs * self.groups_per_epoch

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one object per stage, two epochs held
    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """Epoch ``epoch``'s micro-batches as ``(bucket length, ids)``, in training order."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        order = self.ids[rng.permutation(len(self.ids))]
        micro = [
            (b["tokens"].shape[1], b["id"])
            for b in flowjax.bucket_batches(
                [self.by_id[int(i)] for i in order],
                cfg.bucket_lengths,
                cfg.micro_batch_size,
                pad_id=self.pad_id,
            )
        ]
        return [micro[j] for j in rng.permutation(len(micro))]

    def batch(self, t: int) -> dict[str, np.ndarray]:
        """Micro-batch ``t`` (counted from the start of training)."""
        epoch, j = divmod(t, self.per_epoch)
        plan = self.plan(epoch)
        length, ids = plan[j]
        group = plan[j - j % self.k : j - j % self.k + self.k]
        n_group = sum(self.targets[int(i)] for _, g in group for i in g)
        b = self.cfg.micro_batch_size
        tokens = np.full((b, length), self.pad_id, np.int32)
        mask = np.zeros((b, length), bool)
        for r, i in enumerate(ids):
            ex = self.by_id[int(i)]
            tokens[r, : len(ex["tokens"])] = ex["tokens"]
            mask[r, : len(ex["mask"])] = ex["mask"]
        if self.cfg.weighting == "token" and self.weights is not None:
            w = np.zeros((b, length - 1), np.float32)
            w[: len(ids)] = self.weights.lookup(ids, length=length)
        else:
            w = np.zeros(b, np.float32)
            w[: len(ids)] = 1.0 if self.weights is None else self.weights.lookup(ids)
        out = {
            "tokens": tokens,
            "mask": mask,
            "weight": w,
            "denominator": np.full(b, n_group / self.k, np.float32),
        }
        n, p = jax.process_count(), jax.process_index()
        if n > 1:  # every process plans the same global batch and feeds its own rows
            rows = slice(p * b // n, (p + 1) * b // n)
            out = {k: v[rows] for k, v in out.items()}
        return out

    def __call__(self, start: int):
        for t in range(start, self.num_steps):
            yield self.batch(t)


# ---- the objective and the optimiser -------------------------------------------------------


def token_nll(model, tokens, mask, chunk: int):
    """``(nll [B, T-1], mask [B, T-1])`` of a batch: full logits, or chunked (``chunk > 0``)."""
    if not chunk:
        return flowjax.token_nll(model(tokens), tokens, mask)
    h = model.hidden(tokens)[:, :-1]
    b, t, d = h.shape
    m = mask[:, 1:]
    nll = flowjax.chunked_token_nll(
        h.reshape(b * t, d),
        model.unembedding,
        tokens[:, 1:].reshape(-1),
        mask=m.reshape(-1),
        chunk_size=chunk,
        layout="vd",
        logit_softcap=model.config.final_logit_softcapping,
    )
    return nll.reshape(b, t), m


def make_objective(graphdef, cfg: Config) -> Callable:
    """``objective(trainable, batch, frozen) -> (loss, metrics)``: the official weighted LM loss.

    ``loss = Σ_i w_i Σ_t nll_it / denominator``; the metric ``token_nll`` is the
    micro-batch's unweighted mean target-token NLL (comparable across steps and methods).
    """
    level = "token" if cfg.weighting == "token" and cfg.flow else "sequence"

    def objective(trainable, batch, frozen):
        model = nnx.merge(graphdef, trainable, frozen)
        nll, m = token_nll(model, batch["tokens"], batch["mask"], cfg.chunked_ce)
        loss = flowjax.weighted_lm_loss(
            nll,
            m,
            batch["weight"],
            level=level,
            reduction="tokens",
            denominator=jnp.max(batch["denominator"]),
        )
        mean = jnp.sum(jnp.where(m, nll, 0.0)) / jnp.maximum(jnp.sum(m), 1)
        return loss, {"token_nll": mean}

    return objective


def warmup_steps(cfg: Config, optimizer_steps: int) -> int:
    """HF Trainer's ``ceil(warmup_ratio · max_steps)``."""
    return math.ceil(cfg.warmup_ratio * optimizer_steps)


def lr_schedule(cfg: Config, optimizer_steps: int) -> optax.Schedule:
    """HF's ``get_cosine_schedule_with_warmup``, by optimiser step ``s`` of ``S``.

    ``lr · s / W`` for the first ``W`` steps (the first step has rate 0), then
    ``lr · (1 + cos(π (s − W) / (S − W))) / 2``.
    """
    w = warmup_steps(cfg, optimizer_steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, w, max(optimizer_steps, w + 1), 0.0
    )


@functools.cache
def make_tx(cfg: Config, optimizer_steps: int) -> optax.GradientTransformation:
    """(ℓ2 →) clip → AdamW on :func:`lr_schedule`, inside ``optax.MultiSteps`` when accumulating.

    Memoised: ``flowjax.make_train_step`` shares compiled steps between equal objectives
    and the same ``tx.update`` (``MultiSteps`` counts by identity), so a stage built again
    in this process (a rerun, the next config) compiles nothing new.
    """
    schedule = lr_schedule(cfg, optimizer_steps)
    parts = []
    if cfg.method == "l2":
        parts.append(flowjax.l2sp(cfg.l2_strength, scale="num_params"))
    parts += [
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(
            schedule,
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        ),
    ]
    tx = optax.chain(*parts)
    if cfg.accumulation > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulation)
        tx = tx.gradient_transformation()
    return tx


# ---- retention probe -----------------------------------------------------------------------


def retention_windows(cfg: Config, tok, bos: int | None) -> np.ndarray:
    """Held-out text as ``[n, W]`` token windows (each starting with BOS when there is one)."""
    if cfg.retention_text:
        text = Path(cfg.retention_text).read_text(encoding="utf-8")
    else:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    head = [] if bos is None else [bos]
    body = cfg.retention_window - len(head)
    ids = tok.encode(
        text[: 8 * cfg.retention_windows * cfg.retention_window],
        add_special_tokens=False,
    ).ids
    n = min(cfg.retention_windows, len(ids) // body)
    if n == 0:
        raise ValueError(
            f"the retention text has {len(ids)} tokens: not one window of {cfg.retention_window}."
        )
    rows = [head + ids[i * body : (i + 1) * body] for i in range(n)]
    return np.asarray(rows, np.int32)


@functools.cache
def _window_nll(graphdef, chunk: int):
    def fn(trainable, frozen, windows):
        model = nnx.merge(graphdef, trainable, frozen)
        mask = jnp.ones(windows.shape, bool).at[:, 0].set(False)
        nll, m = token_nll(model, windows, mask, chunk)
        return jnp.sum(jnp.where(m, nll, 0.0)), jnp.sum(m)

    return jax.jit(fn)


def perplexity(graphdef, trainable, frozen, windows: np.ndarray, cfg: Config) -> float:
    """``exp(mean NLL)`` of the windows, ``micro_batch_size`` rows at a time."""
    fn = _window_nll(graphdef, cfg.chunked_ce)
    total, count = 0.0, 0
    for i in range(0, len(windows), cfg.micro_batch_size):
        s, c = fn(trainable, frozen, windows[i : i + cfg.micro_batch_size])
        total, count = total + float(s), count + int(c)
    return math.exp(total / count)


# ---- one training stage --------------------------------------------------------------------


def _on_mesh(tree, mesh):
    """Each leaf's own sharding if it spans the mesh, else replicated (new LoRA factors)."""
    devices = set(mesh.devices.flat)
    return jax.tree.map(
        lambda x: (
            x.sharding
            if set(x.sharding.device_set) == devices
            else NamedSharding(mesh, P())
        ),
        tree,
    )


def split_trainable(model, cfg: Config):
    """``(graphdef, trainable, frozen)``: the LoRA factors or every ``nnx.Param``."""
    return nnx.split(model, nnx.LoRAParam if cfg.lora else nnx.Param, ...)


def with_lora(model, cfg: Config):
    """``model`` with LoRA on ``cfg.lora_targets`` (r, α; B = 0 so it starts at the base).

    With ``cfg.qlora`` the targeted kernels become NF4 codes under the factors
    (``flowjax.add_qlora``): the model starts at the dequantised base.
    """
    select = nnx.Any(*(nnx.PathContains(t) for t in cfg.lora_targets))
    kwargs = dict(
        alpha=cfg.lora_alpha,
        rngs=nnx.Rngs(cfg.seed),
        select=select,
        lora_param_dtype=jnp.float32,
    )
    if cfg.qlora:
        return flowjax.add_qlora(
            model, cfg.lora_rank, block_size=cfg.qlora_block_size, **kwargs
        )
    return flowjax.add_lora(model, cfg.lora_rank, **kwargs)


def merged(model, cfg: Config):
    """The trained LoRA / QLoRA model as a plain ``CausalLM`` (factors merged in)."""
    if cfg.qlora:
        model = flowjax.dequantize_qlora(model)
    return flowjax.merge_lora(model) if cfg.lora else model


def train(
    model,
    data: TrainData,
    cfg: Config,
    *,
    mesh,
    stage_dir: Path,
    run_info: dict,
    windows: np.ndarray,
    baseline_ppl: float,
    log: Callable[[str], None],
):
    """Fine-tunes ``model`` (LoRA added here when ``cfg.lora``); returns ``(model, FitResult)``."""
    if cfg.lora:
        model = with_lora(model, cfg)
    graphdef, trainable, frozen = split_trainable(model, cfg)
    tx = make_tx(cfg, data.optimizer_steps)
    step = flowjax.make_train_step(
        make_objective(graphdef, cfg),
        tx,
        anchor=trainable,
        frozen=frozen,
        mesh=mesh,
    )
    state = flowjax.init_train_state(
        trainable,
        tx,
        rng=cfg.seed,
        mesh=mesh,
        param_shardings=_on_mesh(trainable, mesh),
    )
    monitor = flowjax.RetentionMonitor(
        {"heldout_ppl": lambda s: perplexity(graphdef, s.params, frozen, windows, cfg)},
        baseline={"heldout_ppl": baseline_ppl},
        budget=cfg.retention_budget or 1.0,
        higher_is_better=False,
    )
    result = flowjax.fit(
        step,
        state,
        data,
        num_steps=data.num_steps,
        eval_fn=monitor,
        eval_every=cfg.retention_every,
        stop_fn=monitor.should_stop if cfg.retention_budget else None,
        log_every=max(1, min(cfg.accumulation, data.num_steps)),
        metrics_path=stage_dir / "metrics.jsonl",
        checkpoint_dir=stage_dir / "checkpoints",
        checkpoint_every=cfg.checkpoint_every,
        keep=1,
        run_info=run_info,
        progress=jax.process_index() == 0 and os.isatty(2),
        log=log,
    )
    model = merged(nnx.merge(graphdef, result.state.params, frozen), cfg)
    return model, result


# ---- evaluation ----------------------------------------------------------------------------


@functools.cache
def _harness(
    graphdef, bos: int | None, eos: int, max_length: int, batch_size: int, bucket: int
):
    """One lm-eval adapter per architecture and settings, and the holder of its inputs.

    ``harness_lm`` compiles its forward once per padded length; the parameters are an
    argument of that program, so every model of the run (pre-trained, fine-tuned,
    averaged: one architecture) is scored by the same compiled programs: set
    ``holder["jit"]["params"]`` (the jit argument) and ``holder["tok"]`` before each evaluation.
    """
    from flowjax.evaluation import harness_lm

    holder: dict[str, Any] = {}
    params = {}  # what the jitted forward gets: {"params": the model's state}
    holder["jit"] = params
    lm = harness_lm(
        lambda p, tokens: _logits(graphdef, p["params"], tokens),
        params,
        encode=lambda s: holder["tok"].encode(s, add_special_tokens=False).ids,
        decode=lambda ids: holder["tok"].decode(list(ids), skip_special_tokens=True),
        eos_id=eos,
        bos_id=bos,
        pad_id=eos,
        max_length=max_length,
        batch_size=batch_size,
        bucket=bucket,
    )
    return lm, holder


@functools.cache
def _task_manager(include_path: str, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=include_path or None, include_defaults=include_defaults
    )


def evaluate(model, tok, bos: int | None, eos: int, cfg: Config) -> dict:
    """lm-eval on ``cfg.tasks``: ``{"tasks": {task: {key: value}}, "columns": {column: mean}}``."""
    import lm_eval

    graphdef, state = nnx.split(model)
    lm, holder = _harness(
        graphdef, bos, eos, cfg.eval_max_length, cfg.eval_batch_size, cfg.eval_bucket
    )
    holder["jit"]["params"], holder["tok"] = state, tok
    manager = _task_manager(cfg.eval_include_path, cfg.eval_include_defaults)
    by_shots: dict[int, list[str]] = {}
    for _, task, _, shots in cfg.tasks:
        if task not in by_shots.setdefault(shots, []):
            by_shots[shots].append(task)
    raw = {}
    try:
        for shots, names in sorted(by_shots.items()):
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
                task_manager=manager,
                limit=cfg.eval_limit,
                bootstrap_iters=cfg.eval_bootstrap_iters,
                log_samples=False,
                confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
                verbosity="WARNING",
            )
            raw.update({n: out["results"][n] for n in names})
    finally:
        holder["jit"].clear()  # the adapter outlives the model: hold no parameters
        holder["tok"] = None
    tasks = {}
    columns: dict[str, list[float]] = {}
    for column, task, key, _ in cfg.tasks:
        if key not in raw[task]:
            raise ValueError(
                f"lm-eval's result for {task!r} has no {key!r}; it has {sorted(raw[task])}."
            )
        value = float(raw[task][key])
        tasks.setdefault(task, {})[key] = value
        columns.setdefault(column, []).append(value)
    return {
        "tasks": tasks,
        "columns": {c: float(np.mean(v)) for c, v in columns.items()},
    }
