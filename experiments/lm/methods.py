"""The methods of the LM experiment: the FLOW pre-pass, the weights, the losses, the fine-tunes.

:data:`METHODS` defines each method by what it changes from standard fine-tuning: which
per-example (or per-token) weights multiply the loss, whether LoRA replaces full
fine-tuning, whether L2-SP is chained before Adam. Their settings (LoRA rank and targets,
L2-SP strength, the optimizer) come from :class:`~experiments.lm.config.Config`. Every call
into the flowjax library that the experiment makes is in this module (the evaluation's
``token_nll`` in :mod:`experiments.lm.train` aside); the driver
(:mod:`experiments.lm.run`) selects learning rates, evaluates and reports.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flowjax
from experiments import report
from experiments.lm import data as lm_data
from experiments.lm import train as lm_train
from experiments.lm.config import FIRST_METHODS, PEFT_FIELDS, Config
from experiments.lm.model import EOS, PAD, make_logits_fn


@dataclasses.dataclass(frozen=True)
class Method:
    """A fine-tuning method as a difference from standard fine-tuning.

    ``weights`` names the FLOW weights of :func:`flow_weights` that multiply each
    example's (``"sequence"``, ``"sequence_mean1"``) or each token's (``"token"``) loss; None
    is weight 1. ``lora``: train rank-``cfg.lora_rank`` adapters on ``cfg.lora_targets``
    instead of every parameter. ``l2sp``: chain ``flowjax.l2sp(cfg.l2sp_strength)`` first.
    ``peft``: another parameter-efficient structure, the base frozen by construction:

    * ``"adapters"``: :func:`flowjax.add_adapters` (width ``cfg.adapter_bottleneck``)
      after the ``cfg.adapter_targets`` layers; only the ``flowjax.AdapterParam`` train;
    * ``"qlora"``: :func:`flowjax.add_qlora`, LoRA as ``lora`` on the NF4-quantised base
      (blocks of ``cfg.qlora_block_size``);
    * ``"ilora"``: I-LoRA, a fast and a slow LoRA as ``lora``
      (:func:`flowjax.ilora`, decay ``cfg.ilora_decay``), the fast one trained on
      :func:`ilora_objective` with replayed pre-training windows; evaluated with the
      slow one;
    * ``"prompt"``: :class:`flowjax.PromptTuning`, ``cfg.prompt_length`` soft-prompt
      embeddings before the input; only the ``flowjax.PromptParam`` train;
    * ``"prefix"``: :class:`flowjax.PrefixTuning`, ``cfg.prefix_length`` key/value
      vectors per key/value head in every layer; only the ``flowjax.PrefixParam``
      train.

    ``settings``: the config fields of :data:`~experiments.lm.config.PEFT_FIELDS`
    the method reads (they go into its runs' digests).
    """

    name: str
    weights: str | None = None
    lora: bool = False
    l2sp: bool = False
    peft: str | None = None
    settings: tuple[str, ...] = ()


_ADAPTERS = ("adapter_bottleneck", "adapter_targets")
METHODS: dict[str, Method] = {
    "standard": Method("Standard FT"),
    "flow_seq": Method("FLOW (sequence)", weights="sequence"),
    "flow_seq_mean1": Method(
        "FLOW (sequence, mean-1 weights)", weights="sequence_mean1"
    ),
    "flow_tok": Method("FLOW (token)", weights="token"),
    "lora": Method("LoRA", lora=True),
    "flow_lora": Method("FLOW + LoRA", weights="sequence", lora=True),
    "l2sp": Method("L2-SP", l2sp=True),
    "adapters": Method("Adapters", peft="adapters", settings=_ADAPTERS),
    "qlora": Method("QLoRA", peft="qlora", settings=("qlora_block_size",)),
    "flow_qlora": Method(
        "FLOW + QLoRA",
        weights="sequence",
        peft="qlora",
        settings=("qlora_block_size",),
    ),
    "ilora": Method(
        "I-LoRA", peft="ilora", settings=("ilora_decay", "ilora_consistency")
    ),
    "prompt": Method("Prompt tuning", peft="prompt", settings=("prompt_length",)),
    "prefix": Method("Prefix tuning", peft="prefix", settings=("prefix_length",)),
}


def check_methods(names) -> list[str]:
    """``names`` as a list, after checking that each is a method.

    Raises:
      ValueError: an unknown name (the unknown ones and the known ones are listed).
    """
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}.")
    return list(names)


def next_token_loss(logits, tokens, mask):
    """Pre-training loss: mean next-token NLL over the positions of ``mask``."""
    nll, m = flowjax.token_nll(logits, tokens, mask)
    return flowjax.weighted_lm_loss(nll, m)


def sft_loss(logits, tokens, mask, weights, *, level: str):
    """Fine-tuning loss: :func:`flowjax.weighted_lm_loss` with the official normaliser.

    ``reduction="tokens"``: the weighted token sum over the unweighted number of target
    tokens; ``weights`` is ``[B]`` for ``level="sequence"`` (all ones: plain SFT) or
    ``[B, T-1]`` for ``"token"``.
    """
    nll, m = flowjax.token_nll(logits, tokens, mask)
    return flowjax.weighted_lm_loss(nll, m, weights, level=level, reduction="tokens")


@functools.cache
def ilora_objective(graphdef, consistency: float):
    """I-LoRA's objective in ``flowjax.make_train_step``'s form, over ``{"fast", "slow"}`` LoRA states.

    .. math::
        \\mathcal{L} = \\tfrac12\\bigl(\\mathcal{L}_\\text{SFT}(\\theta_f; x)
        + \\mathcal{L}_\\text{LM}(\\theta_f; x_\\text{replay})\\bigr)
        + \\gamma\\,\\operatorname{mean}\\,\\ell_\\text{cons}\\bigl(h_f(x_\\text{replay}),
        h_s(x_\\text{replay})\\bigr)

    (the reference's total, :mod:`flowjax.ilora`): :func:`sft_loss` on the
    task batch (``batch["weight"]``, sequence level), :func:`next_token_loss`
    on the replayed pre-training windows ``batch["replay"]`` ``[B, T]``, and
    :func:`flowjax.ilora_consistency_loss` between the fast and the (stopped)
    slow adapter's final hidden states on them, :math:`\\gamma` =
    ``consistency``. The replay logits are the fast hidden states times the
    unembedding (a Llama: no soft-cap), so the replayed windows are run once.
    """

    def fn(trainable, batch, frozen):
        fast = nnx.merge(graphdef, trainable["fast"], frozen)
        slow = nnx.merge(graphdef, trainable["slow"], frozen)
        cur = sft_loss(
            fast(batch["tokens"]),
            batch["tokens"],
            batch["mask"],
            batch["weight"],
            level="sequence",
        )
        replay = batch["replay"]
        h_fast = fast.hidden(replay)
        logits = jnp.einsum(
            "btd,vd->btv", h_fast, fast.unembedding, preferred_element_type=jnp.float32
        )
        mask = jnp.ones(replay.shape, bool).at[:, 0].set(False)
        old = next_token_loss(logits, replay, mask)
        cons = flowjax.ilora_consistency_loss(h_fast, slow.hidden(replay))
        return (cur + old) / 2 + consistency * jnp.mean(cons)

    return fn


def flow_weights(params, graphdef, train: dict, cfg: Config) -> dict:
    """Sequence and token FLOW weights of the training rows, from the library pre-pass.

    The batched form (``batched=True``, the fast one): the model is called on
    each padded batch ``[B, T]`` of the bucket, as in training, instead of
    being vmapped over single sequences.
    """
    logits_fn = make_logits_fn(graphdef)
    examples = lm_data.examples(train)
    kw = {
        "bucket_lengths": [lm_data.SEQ_LEN],
        "batch_size": cfg.prepass_batch,
        "pad_id": PAD,
        "batched": True,
    }
    seq_table = flowjax.lm_sequence_losses(
        logits_fn, (params,), examples, progress=False, **kw
    )
    seq_w = seq_table.flow_weights()  # τ_seq = median
    seq_w1 = seq_table.flow_weights(normalize="mean")  # same, rescaled to mean 1
    tok = flowjax.lm_token_losses(logits_fn, (params,), examples, **kw)
    tok_table = tok.flow_weights()  # τ_tok = median over every target token
    tok_w, tau_tok = tok_table.weights, tok_table.temperature
    rows = np.searchsorted(tok.ids, train["id"])
    if not np.array_equal(tok.ids[rows], train["id"]) or not np.array_equal(
        tok.mask[rows], train["mask"][:, 1:]
    ):
        raise AssertionError("token pre-pass rows do not line up with the training set")
    tokens = train["tokens"][rows][:, 1:][tok.mask[rows]]  # the target tokens
    kind = np.where(
        (tokens >= ord("0")) & (tokens <= ord("9")),
        "digit",
        np.where(tokens == EOS, "EOS", np.where(tokens == ord("."), "'.'", "scaffold")),
    )
    return {
        "sequence": seq_w.lookup(train["id"]).astype(np.float32),
        "sequence_mean1": seq_w1.lookup(train["id"]).astype(np.float32),
        "token": tok_w[rows].astype(np.float32),
        "tau_seq": seq_w.temperature,
        "tau_tok": float(tau_tok),
        "seq_losses": seq_table.lookup(train["id"]),
        "tok_losses": tok.losses[rows][tok.mask[rows]],
        "tok_weights": tok_w[rows][tok.mask[rows]],
        "tok_kind": kind,
    }


class FineTuner:
    """Runs every method of :data:`METHODS` through ``flowjax.fit``.

    One program per (structure, level, regulariser): the learning rate lives
    in the optimiser state and ``flowjax.make_train_step`` shares programs
    between steps that compute the same thing. With ``checkpoints`` (a
    directory) each run (method, learning rate, seed) checkpoints into its
    own directory there, named by a digest of everything it depends on (the
    config, the method, the learning rate, the seed, the pre-trained
    parameters and the FLOW weights): a rerun restores finished runs and
    resumes an interrupted one bit for bit, and changed inputs never meet a
    stale checkpoint. Every ``cfg.curve_every`` steps a
    ``flowjax.RetentionMonitor`` measures retention (held-out pydoc
    perplexity against the pre-trained model's) beside the target metric
    (validation exact match): the run's curve.
    """

    def __init__(
        self,
        params,
        graphdef,
        task,
        weights,
        cfg: Config,
        progress: bool,
        *,
        windows: np.ndarray | None = None,
        checkpoints: Path | None = None,
        resume_log: report.ResumeLog | None = None,
        replay: np.ndarray | None = None,
    ):
        self.params, self.graphdef, self.task = params, graphdef, task
        self.weights, self.cfg, self.progress = weights, cfg, progress
        self.windows, self.checkpoints, self.replay = windows, checkpoints, replay
        self.resume_log = report.ResumeLog() if resume_log is None else resume_log
        self.evaluators: dict[str, lm_train.Evaluator] = {}
        self.curves: dict[tuple[str, float, int], list[dict]] = {}
        self._baseline: dict[str, float] | None = None
        self._inputs = {
            "pretrained": report.digest(jax.tree.map(np.asarray, params)),
            "weights": report.digest(
                {k: v for k, v in weights.items() if isinstance(v, np.ndarray)}
            ),
        }

    def _model(self, method: str, seed: int):
        """``(kind, (graphdef, trainable, frozen))``; I-LoRA's trainable is ``{"fast", "slow"}``."""
        cfg, m = self.cfg, METHODS[method]
        base = nnx.merge(self.graphdef, self.params)
        rngs, select = nnx.Rngs(seed), lm_train.lora_filter(cfg.lora_targets)
        if m.peft == "adapters":
            model = flowjax.add_adapters(
                base,
                cfg.adapter_bottleneck,
                rngs=rngs,
                select=lm_train.lora_filter(cfg.adapter_targets),
            )
            return "adapters", nnx.split(model, flowjax.AdapterParam, ...)
        if m.peft == "qlora":
            model = flowjax.add_qlora(
                base,
                cfg.lora_rank,
                rngs=rngs,
                select=select,
                block_size=cfg.qlora_block_size,
            )
            return "qlora", nnx.split(model, nnx.LoRAParam, ...)
        if m.peft == "prompt":
            width = base.config.hidden_size
            model = flowjax.PromptTuning(base, cfg.prompt_length, width, rngs=rngs)
            return "prompt", nnx.split(model, flowjax.PromptParam, ...)
        if m.peft == "prefix":  # one prefix head per key/value head (GQA)
            c = base.config
            model = flowjax.PrefixTuning(
                base,
                cfg.prefix_length,
                num_layers=c.num_hidden_layers,
                num_heads=c.num_key_value_heads,
                head_dim=c.head_dim,
                rngs=rngs,
            )
            return "prefix", nnx.split(model, flowjax.PrefixParam, ...)
        if m.lora or m.peft == "ilora":
            model = flowjax.add_lora(base, cfg.lora_rank, rngs=rngs, select=select)
            graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
            if m.peft == "ilora":  # the slow adapter starts as a copy of the fast one
                lora = {"fast": lora, "slow": jax.tree.map(jnp.copy, lora)}
            return "lora", (graphdef, lora, rest)
        if m.peft is not None:
            raise ValueError(f"{method}: unknown peft {m.peft!r}.")
        return "full", nnx.split(base, nnx.Param, ...)

    @staticmethod
    def _evaluated(method: str, trainable):
        """The trainable state the method is evaluated with (I-LoRA: the slow adapter)."""
        return trainable["slow"] if METHODS[method].peft == "ilora" else trainable

    def run_info(self, method: str, lr: float, seed: int) -> dict:
        """What the run depends on: its checkpoint's ``run_info``, digested into its name.

        The config enters as the digest of :func:`report.config_dict` without
        :data:`~experiments.lm.config.PEFT_FIELDS` and with ``methods`` =
        :data:`~experiments.lm.config.FIRST_METHODS` (no run depends on which
        other methods run; this is the view the first seven methods' digests
        were taken over, so their checkpoints keep restoring); the
        ``PEFT_FIELDS`` a method reads (``Method.settings``) are added as
        ``"settings"``, and I-LoRA's replay stream as ``"replay"``.
        """
        full = report.config_dict(self.cfg)
        shared = {k: v for k, v in full.items() if k not in PEFT_FIELDS}
        shared["methods"] = list(FIRST_METHODS)
        info = {
            **self._inputs,
            "config": report.digest(shared),
            "method": method,
            "lr": lr,
            "seed": seed,
        }
        m = METHODS[method]
        if m.settings:
            info["settings"] = {k: full[k] for k in m.settings}
        if m.peft == "ilora":
            info["replay"] = report.digest({"stream": self._replay(method)})
        return info

    def _replay(self, method: str) -> np.ndarray:
        if self.replay is None:
            raise ValueError(
                f"{method} replays pre-training text: FineTuner(replay=...) is needed."
            )
        return self.replay

    def _weights(self, method: str, rows: np.ndarray) -> np.ndarray:
        which = METHODS[method].weights
        if which is None:
            return np.ones(len(rows), np.float32)
        return self.weights[which][rows]

    def state(self, method: str, seed: int):
        """``(kind, (trainable, frozen))`` of the method's model before fine-tuning."""
        kind, (graphdef, trainable, frozen) = self._model(method, seed)
        if kind not in self.evaluators:
            self.evaluators[kind] = lm_train.Evaluator(
                graphdef, max_new=self.cfg.max_new_tokens
            )
        return kind, (self._evaluated(method, trainable), frozen)

    def _monitor(self, method: str, kind: str, frozen) -> flowjax.RetentionMonitor:
        """Held-out perplexity as the retention probe, validation exact match as the target."""
        ev = self.evaluators[kind]

        def state(s):
            return self._evaluated(method, s.params), frozen

        if self._baseline is None:
            k, pre = self.state("standard", 0)
            self._baseline = {
                "heldout_ppl": self.evaluators[k].perplexity(pre, self.windows)
            }
        val = self.task["val"]
        return flowjax.RetentionMonitor(
            {"heldout_ppl": lambda s: ev.perplexity(state(s), self.windows)},
            baseline=self._baseline,
            higher_is_better=False,
            target=lambda s: {
                "target/val_exact_match": ev.exact_match(state(s), val)["answer"]
            },
            target_key="target/val_exact_match",
        )

    def run(self, method: str, lr: float, seed: int):
        """Fine-tunes and returns ``(kind, state)``; ``state`` = ``(trainable, frozen)``."""
        cfg, train, m = self.cfg, self.task["train"], METHODS[method]
        kind, (graphdef, trainable, frozen) = self._model(method, seed)
        level = "token" if m.weights == "token" else "sequence"
        l2sp = cfg.l2sp_strength if m.l2sp else None
        tx = lm_train.make_tx(
            cfg.ft_steps,
            lr,
            regularizer=None if l2sp is None else flowjax.l2sp(l2sp),
            warmup_frac=cfg.warmup_frac,
            clip_norm=cfg.clip_norm,
        )
        if m.peft == "ilora":
            tx = flowjax.ilora(tx, cfg.ilora_decay)  # the slow update after each step
            objective = ilora_objective(graphdef, cfg.ilora_consistency)
        else:
            objective = lm_train.step_objective(
                graphdef, functools.partial(sft_loss, level=level)
            )
        if kind not in self.evaluators:
            self.evaluators[kind] = lm_train.Evaluator(
                graphdef, max_new=cfg.max_new_tokens
            )
        step = flowjax.make_train_step(
            objective,
            tx,
            anchor=trainable,
            frozen=frozen,
            return_metrics=False,
        )
        state = flowjax.init_train_state(trainable, tx, rng=seed)
        # The batch order: epochs of seeded permutations, cut into batches; batch t is
        # a pure function of (seed, t), so a resumed run sees the same batches.
        n, b = len(train["id"]), cfg.ft_batch
        rng = np.random.default_rng(seed)
        epochs = -(-cfg.ft_steps * b // n)
        order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
        order = order[: cfg.ft_steps * b].reshape(cfg.ft_steps, b)
        if m.peft == "ilora":  # b replayed pre-training windows per step, also seeded
            stream, length = self._replay(method), cfg.pretrain.model.max_len
            starts = np.random.default_rng([seed, 1]).integers(
                0, len(stream) - length + 1, size=(cfg.ft_steps, b)
            )

        def data(start: int):
            for t in range(start, cfg.ft_steps):
                rows = order[t]
                batch = {
                    "tokens": train["tokens"][rows],
                    "mask": train["mask"][rows],
                    "weight": self._weights(method, rows),
                }
                if m.peft == "ilora":
                    batch["replay"] = stream[starts[t][:, None] + np.arange(length)]
                yield batch

        label = f"{method} lr={lr:g} seed={seed}"
        options = {}
        if self.windows is not None:
            monitor = self._monitor(method, kind, frozen)
            options = {"eval_fn": monitor, "eval_every": cfg.curve_every}
        if self.checkpoints is not None:
            info = self.run_info(method, lr, seed)
            name = f"{method}-lr{lr:g}-seed{seed}-{report.digest(info)[:12]}"
            options |= {
                "checkpoint_dir": self.checkpoints / name,
                "checkpoint_every": cfg.curve_every,
                "keep": 1,
                "run_info": info,
            }
        result = flowjax.fit(
            step,
            state,
            data,
            num_steps=cfg.ft_steps,
            log_every=cfg.curve_every,
            progress=self.progress,
            log=self.resume_log.stage(label, cfg.ft_steps),
            **options,
        )
        loss = result.history[-1]["loss"]
        if not np.isfinite(loss):
            raise FloatingPointError(f"{label}: loss {loss}")
        self.curves[method, lr, seed] = result.history
        return kind, (self._evaluated(method, result.state.params), frozen)

    def curve(self, method: str, lr: float, seed: int) -> dict[str, list[float]]:
        """The run's retention curve: ``{"step", "heldout_ppl", "retention", "val_exact_match", "loss"}``.

        Step 0 is the pre-trained model (its perplexity, retention 1 and
        validation exact match); then every ``cfg.curve_every`` steps.
        """
        history = self.curves[method, lr, seed]
        if self._baseline is None:
            raise ValueError(
                "curves need the held-out windows (FineTuner(windows=...))."
            )
        kind, pre = self.state("standard", 0)
        em0 = self.evaluators[kind].exact_match(pre, self.task["val"])["answer"]
        rows = [r for r in history if "probe/heldout_ppl" in r]
        return {
            "step": [0] + [r["step"] for r in rows],
            "heldout_ppl": [self._baseline["heldout_ppl"]]
            + [r["probe/heldout_ppl"] for r in rows],
            "retention": [1.0] + [r["retention/heldout_ppl"] for r in rows],
            "val_exact_match": [em0] + [r["target/val_exact_match"] for r in rows],
            "loss": [None] + [r["loss"] for r in rows],
        }

    def evaluate(self, kind, state, split: str, windows=None) -> dict:
        ev = self.evaluators[kind]
        em = ev.exact_match(state, self.task[split])
        out = {"exact_match": em["answer"], "exact_response": em["response"]}
        if windows is not None:
            out["perplexity"] = ev.perplexity(state, windows)
        return out
