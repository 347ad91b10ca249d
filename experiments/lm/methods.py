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
import numpy as np
from flax import nnx

import flowjax
from experiments import report
from experiments.lm import data as lm_data
from experiments.lm import train as lm_train
from experiments.lm.config import Config
from experiments.lm.model import EOS, PAD, make_logits_fn


@dataclasses.dataclass(frozen=True)
class Method:
    """A fine-tuning method as a difference from standard fine-tuning.

    ``weights`` names the FLOW weights of :func:`flow_weights` that multiply each
    example's (``"sequence"``, ``"sequence_mean1"``) or each token's (``"token"``) loss; None
    is weight 1. ``lora``: train rank-``cfg.lora_rank`` adapters on ``cfg.lora_targets``
    instead of every parameter. ``l2sp``: chain ``flowjax.l2sp(cfg.l2sp_strength)`` first.
    """

    name: str
    weights: str | None = None
    lora: bool = False
    l2sp: bool = False


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
    ):
        self.params, self.graphdef, self.task = params, graphdef, task
        self.weights, self.cfg, self.progress = weights, cfg, progress
        self.windows, self.checkpoints = windows, checkpoints
        self.resume_log = report.ResumeLog() if resume_log is None else resume_log
        self.evaluators: dict[str, lm_train.Evaluator] = {}
        self.curves: dict[tuple[str, float, int], list[dict]] = {}
        self._baseline: dict[str, float] | None = None
        self._inputs = {
            "config": report.digest(report.config_dict(cfg)),
            "pretrained": report.digest(jax.tree.map(np.asarray, params)),
            "weights": report.digest(
                {k: v for k, v in weights.items() if isinstance(v, np.ndarray)}
            ),
        }

    def _model(self, method: str, seed: int):
        base = nnx.merge(self.graphdef, self.params)
        if METHODS[method].lora:
            model = flowjax.add_lora(
                base,
                self.cfg.lora_rank,
                rngs=nnx.Rngs(seed),
                select=lm_train.lora_filter(self.cfg.lora_targets),
            )
            return "lora", nnx.split(model, nnx.LoRAParam, ...)
        return "full", nnx.split(base, nnx.Param, ...)

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
        return kind, (trainable, frozen)

    def _monitor(self, kind: str, frozen) -> flowjax.RetentionMonitor:
        """Held-out perplexity as the retention probe, validation exact match as the target."""
        ev = self.evaluators[kind]
        if self._baseline is None:
            k, pre = self.state("standard", 0)
            self._baseline = {
                "heldout_ppl": self.evaluators[k].perplexity(pre, self.windows)
            }
        val = self.task["val"]
        return flowjax.RetentionMonitor(
            {"heldout_ppl": lambda s: ev.perplexity((s.params, frozen), self.windows)},
            baseline=self._baseline,
            higher_is_better=False,
            target=lambda s: {
                "target/val_exact_match": ev.exact_match((s.params, frozen), val)[
                    "answer"
                ]
            },
            target_key="target/val_exact_match",
        )

    def run(self, method: str, lr: float, seed: int):
        """Fine-tunes and returns ``(kind, state)``; ``state`` = ``(trainable, frozen)``."""
        cfg, train = self.cfg, self.task["train"]
        kind, (graphdef, trainable, frozen) = self._model(method, seed)
        level = "token" if METHODS[method].weights == "token" else "sequence"
        l2sp = cfg.l2sp_strength if METHODS[method].l2sp else None
        tx = lm_train.make_tx(
            cfg.ft_steps,
            lr,
            regularizer=None if l2sp is None else flowjax.l2sp(l2sp),
            warmup_frac=cfg.warmup_frac,
            clip_norm=cfg.clip_norm,
        )
        if kind not in self.evaluators:
            self.evaluators[kind] = lm_train.Evaluator(
                graphdef, max_new=cfg.max_new_tokens
            )
        step = flowjax.make_train_step(
            lm_train.step_objective(graphdef, functools.partial(sft_loss, level=level)),
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

        def data(start: int):
            for rows in order[start:]:
                yield {
                    "tokens": train["tokens"][rows],
                    "mask": train["mask"][rows],
                    "weight": self._weights(method, rows),
                }

        label = f"{method} lr={lr:g} seed={seed}"
        options = {}
        if self.windows is not None:
            monitor = self._monitor(kind, frozen)
            options = {"eval_fn": monitor, "eval_every": cfg.curve_every}
        if self.checkpoints is not None:
            info = {**self._inputs, "method": method, "lr": lr, "seed": seed}
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
        return kind, (result.state.params, frozen)

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
