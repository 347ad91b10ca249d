"""FLOW fine-tuning of a Hugging Face Llama / Gemma 2 checkpoint, or any NNX causal LM in orbax.

Run (see ``experiments/lm/README.md`` for a Gemma / Llama NNX port on TPU)::

    python -m experiments.lm.finetune_checkpoint \\
        --model my_pkg.models:build_gemma --model_kwargs '{"variant": "2b"}' \\
        --checkpoint /abs/path/to/orbax/params --data train.jsonl \\
        --out /abs/path/to/run --level sequence --lora_rank 64 --lr 2e-5 --epochs 2

Contract:

* ``--model module:factory``: ``factory(**model_kwargs)`` builds the NNX
  module (any ``nnx.Module`` with ``model(tokens [B, T]) -> logits [B, T, V]``,
  causal). It is called under ``nnx.eval_shape``: no memory is allocated
  before the restore.
* ``--checkpoint``: either a Hugging Face directory (``config.json`` +
  ``*.safetensors`` of Llama 3.x or Gemma 2, e.g. what
  :func:`flowjax.models.save_causal_lm` writes), read with
  :func:`flowjax.models.load_causal_lm` sharded over the mesh (``--model`` is
  then not needed; for ``--chunked_ce`` pass ``--unembedding unembedding
  --unembedding_layout vd``, and ``--logit_softcap`` only with
  ``--chunked_ce``: the model's own forward already caps); or an orbax
  directory holding ``nnx.state(model, nnx.Param)`` as saved by
  ``ocp.StandardCheckpointer().save(path, state)``, with ``--model``.
  Restoring is abstract-first: the abstract state gets ``NamedSharding``\\ s
  from the module's own partition metadata over the device mesh
  (``--model_axis`` devices for tensor parallelism, the rest on ``'data'``);
  unannotated parameters are replicated.
* ``--data``: JSONL, one example per line, either ``{"prompt": str,
  "response": str}`` (the byte tokenizer: ``BOS + utf-8(prompt)`` and
  ``utf-8(response) + EOS``, ids ``--bos/--eos``) or ``{"prompt_ids": [...],
  "response_ids": [...]}`` already tokenised (used as given: include your
  BOS in the prompt and EOS in the response). An optional integer ``"id"``
  (default: the line number) keys the weights. The prompt is masked; the
  response (EOS included) is the target.

Steps: the pre-pass on the restored (frozen) model
(:func:`flowjax.lm_sequence_losses`, sharded over ``'data'``, or
:func:`flowjax.lm_token_losses` for ``--level token``); FLOW weights with τ =
median; fine-tuning on :func:`flowjax.weighted_lm_loss` (official
``reduction="tokens"``) with AdamW (no decay), 3 % warm-up + cosine, clip 1,
through :func:`flowjax.make_train_step` (data parallel over the mesh's
``'data'`` axis, parameters kept in their restored shardings) and
:func:`flowjax.fit`;
full fine-tuning or LoRA (``--lora_rank``, :func:`flowjax.add_lora` on the
``--lora_targets`` layers). ``--chunked_ce C`` computes the NLL with
:func:`flowjax.chunked_token_nll` from ``model.hidden(tokens)`` and the
unembedding at ``--unembedding`` (attribute path; ``--unembedding_layout vd``
for a tied ``[V, D]`` embedding table), so ``[B, T, V]`` logits are never
built (vocabularies of 256k).

Outputs in ``--out`` (absolute or made absolute): ``losses.npz`` (the
pre-pass: ids and sequence losses, or ids / token losses / mask),
``weights.npz`` (ids and weights, τ), ``trainable/`` (orbax: the trainable
state only, i.e. the LoRA factors with ``--lora_rank``, never the frozen
base), ``metrics.jsonl`` (one line per step: loss, mean weight, gradient
norm, ‖θ−θ₀‖), ``checkpoints/`` (``flowjax.fit``'s train-state checkpoints
every ``--checkpoint_every`` steps: the same command started again after a
pre-emption prints ``resumed from step N`` and ends bit-identical to an
uninterrupted run) and ``summary.json``.

Measured here (shared 2-core CPU, load about 5; the 1-layer d_model 32 random
model of ``tests/test_lm_checkpoint.py``, 12 examples): restore + pre-pass +
4 steps + save takes 20-35 s per call, almost all of it compilation. The
test checks that the restored model gives the saved model's pre-pass losses
(sequence and token level, chunked and full-logits), that the weights are
``exp(-loss/median)``, and that LoRA saves only the adapters.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import flowjax
from experiments.lm import train as lm_train
from flowjax.models import load_causal_lm

BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258


def load_factory(spec: str):
    """``"package.module:function"`` -> the function."""
    if ":" not in spec:
        raise ValueError(f"--model must be 'module:factory'; got {spec!r}.")
    mod, name = spec.split(":", 1)
    return getattr(importlib.import_module(mod), name)


def make_mesh(model_axis: int = 1) -> jax.sharding.Mesh:
    """A ``('data', 'model')`` mesh over every device."""
    n = jax.device_count()
    if model_axis < 1 or n % model_axis:
        raise ValueError(f"--model_axis {model_axis} must divide the {n} devices.")
    return jax.make_mesh(
        (n // model_axis, model_axis),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )


def restore_model(factory, kwargs: dict, checkpoint: str, mesh) -> nnx.Module:
    """Builds the module abstractly and restores its ``nnx.Param`` state sharded over ``mesh``."""
    abstract = nnx.eval_shape(lambda: factory(**kwargs))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "the model has non-Param state (e.g. batch statistics or RNG state); this script "
            "restores nnx.Param only."
        )
    shardings = nnx.get_named_sharding(abs_params, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abs_params,
        shardings,
    )
    params = ocp.StandardCheckpointer().restore(Path(checkpoint).resolve(), target)
    return nnx.merge(graphdef, params, rest)


def read_jsonl(path: str, bos: int, eos: int) -> list[dict]:
    """Tokenised examples ``{"id", "tokens", "mask"}`` (mask: response + EOS)."""
    out = []
    for line_no, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        if {"prompt", "response"} <= set(rec):
            prompt = [bos, *rec["prompt"].encode("utf-8")]
            response = [*rec["response"].encode("utf-8"), eos]
        elif {"prompt_ids", "response_ids"} <= set(rec):
            prompt, response = list(rec["prompt_ids"]), list(rec["response_ids"])
        else:
            raise ValueError(
                f"{path}:{line_no + 1}: need 'prompt'/'response' or 'prompt_ids'/'response_ids'; "
                f"got keys {sorted(rec)}."
            )
        if not prompt or not response:
            raise ValueError(
                f"{path}:{line_no + 1}: empty prompt or response (the prompt needs a BOS)."
            )
        tokens = np.asarray(prompt + response, np.int32)
        mask = np.arange(len(tokens)) >= len(prompt)
        out.append({"id": int(rec.get("id", line_no)), "tokens": tokens, "mask": mask})
    if not out:
        raise ValueError(f"{path} holds no example.")
    return out


def _get_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def make_nll_fn(
    graphdef, chunked: int | None, unembedding: str, layout: str, softcap=None
):
    """``nll(state_tuple, tokens [B, T], mask [B, T]) -> (nll [B, T-1], mask [B, T-1])``."""

    def nll_fn(state, tokens, mask):
        model = nnx.merge(graphdef, *state)
        if chunked is None:
            logits = model(tokens)
            if softcap:
                logits = softcap * jnp.tanh(logits.astype(jnp.float32) / softcap)
            return flowjax.token_nll(logits, tokens, mask)
        h = model.hidden(tokens)[:, :-1]
        b, t, d = h.shape
        w = _get_path(model, unembedding)
        w = w.get_value() if isinstance(w, nnx.Variable) else w
        m = mask[:, 1:]
        nll = flowjax.chunked_token_nll(
            h.reshape(b * t, d),
            w,
            tokens[:, 1:].reshape(-1),
            mask=m.reshape(-1),
            chunk_size=chunked,
            layout=layout,
            logit_softcap=softcap or None,
        )
        return nll.reshape(b, t), m

    return nll_fn


def prepass(
    graphdef, nll_fn, state, examples, level, buckets, batch_size, pad_id, mesh, chunked
):
    """FLOW weights per example id: ``(weights dict, losses dict, tau)``.

    Without chunked cross-entropy this is the library pre-pass as it is:
    :func:`flowjax.lm_sequence_losses` (sharded over ``'data'``) or
    :func:`flowjax.lm_token_losses`. With it, the same losses from
    :func:`flowjax.chunked_token_nll` through :func:`flowjax.per_example_losses`.
    """
    kw = {"bucket_lengths": buckets, "batch_size": batch_size, "pad_id": pad_id}
    if chunked is None:

        def logits_fn(st, tokens):  # a batch [B, T] -> [B, T, V] (the fast form)
            return nnx.merge(graphdef, *st)(tokens)

        if level == "sequence":
            table = flowjax.lm_sequence_losses(
                logits_fn,
                state,
                examples,
                mesh=mesh,
                progress=False,
                batched=True,
                **kw,
            )
        else:
            tl = flowjax.lm_token_losses(logits_fn, state, examples, batched=True, **kw)
    elif level == "sequence":

        def seq_loss(
            st, batch
        ):  # a batch -> [B], flowjax.per_example_losses(batched=True)
            nll, m = nll_fn(st, batch["tokens"], batch["mask"])
            return jax.vmap(lambda n, k: flowjax.sequence_nll(n, k, on_empty="nan"))(
                nll, m
            )

        batches = list(flowjax.bucket_batches(examples, **kw))
        tables = [
            flowjax.per_example_losses(
                seq_loss,
                state,
                [b for b in batches if b["tokens"].shape[1] == n],
                batched=True,
                mesh=mesh,
                progress=False,
            )
            for n in sorted({b["tokens"].shape[1] for b in batches})
        ]
        table = flowjax.LossTable(
            np.concatenate([t.ids for t in tables]),
            np.concatenate([t.losses for t in tables]),
        )
    else:
        width, jitted = max(buckets) - 1, jax.jit(nll_fn)
        ids, losses, masks = [], [], []
        for b in flowjax.bucket_batches(examples, **kw):
            nll, m = jitted(state, b["tokens"], b["mask"])
            pad = ((0, 0), (0, width - nll.shape[1]))
            ids.append(b["id"])
            losses.append(np.pad(np.asarray(nll), pad))
            masks.append(np.pad(np.asarray(m), pad))
        ids = np.concatenate(ids)
        order = np.argsort(ids)
        tl = flowjax.TokenLosses(
            ids[order], np.concatenate(losses)[order], np.concatenate(masks)[order]
        )
    if level == "sequence":
        w = table.flow_weights()
        return (
            {"ids": w.ids, "weights": w.weights},
            {"ids": table.ids, "losses": table.losses},
            w.temperature,
        )
    w = tl.flow_weights()
    return (
        {"ids": w.ids, "weights": w.weights},
        {"ids": tl.ids, "losses": tl.losses, "mask": tl.mask},
        w.temperature,
    )


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job (see the module docstring); returns the summary dict."""
    start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(args.model_axis)
    if (Path(args.checkpoint) / "config.json").is_file():  # a Hugging Face directory
        model = load_causal_lm(Path(args.checkpoint).resolve(), mesh=mesh)
    elif args.model is None:
        raise ValueError(
            f"--checkpoint {args.checkpoint} has no config.json (not a Hugging Face "
            "directory): an orbax checkpoint needs --model module:factory."
        )
    else:
        factory = load_factory(args.model)
        kwargs = json.loads(args.model_kwargs)
        model = restore_model(factory, kwargs, args.checkpoint, mesh)
    examples = read_jsonl(args.data, args.bos, args.eos)
    buckets = sorted(int(b) for b in args.buckets.split(","))
    chunked = args.chunked_ce or None
    graphdef, params = nnx.split(model, nnx.Param)
    nll_fn = make_nll_fn(
        graphdef, chunked, args.unembedding, args.unembedding_layout, args.logit_softcap
    )
    weights, losses, tau = prepass(
        graphdef,
        nll_fn,
        (params,),
        examples,
        args.level,
        buckets,
        args.batch_size,
        args.pad,
        mesh,
        chunked,
    )
    np.savez(out / "losses.npz", **losses)
    np.savez(out / "weights.npz", **weights, temperature=np.float64(tau))
    if args.no_flow:
        weights = {**weights, "weights": np.ones_like(weights["weights"])}

    if args.lora_rank:
        select = lm_train.lora_filter(args.lora_targets.split(","))
        model = flowjax.add_lora(
            model, args.lora_rank, rngs=nnx.Rngs(args.seed), select=select
        )
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    nll_fn = make_nll_fn(
        graphdef, chunked, args.unembedding, args.unembedding_layout, args.logit_softcap
    )
    per_epoch = sum(
        1
        for _ in flowjax.bucket_batches(
            examples, buckets, args.batch_size, pad_id=args.pad
        )
    )
    total = args.steps or args.epochs * per_epoch
    tx = lm_train.make_tx(total, args.lr)
    lookup = {int(i): r for r, i in enumerate(weights["ids"])}

    def objective(trainable, batch, frozen):
        nll, m = nll_fn((trainable, frozen), batch["tokens"], batch["mask"])
        return flowjax.weighted_lm_loss(
            nll, m, batch["weight"], level=args.level, reduction="tokens"
        )

    step = flowjax.make_train_step(
        objective,
        tx,
        anchor=trainable,
        frozen=frozen,
        return_metrics=False,
        mesh=mesh,
    )
    state = flowjax.init_train_state(
        trainable,
        tx,
        rng=args.seed,
        mesh=mesh,
        param_shardings=jax.tree.map(lambda x: x.sharding, trainable),
    )

    def data(start: int):
        """Batch ``start`` on: epochs of seeded permutations, bucketed (a pure function of the seed)."""
        rng = np.random.default_rng(args.seed)
        t = 0
        while True:
            order = rng.permutation(len(examples))
            for b in flowjax.bucket_batches(
                [examples[i] for i in order], buckets, args.batch_size, pad_id=args.pad
            ):
                if t >= start:
                    rows = np.array([lookup[int(i)] for i in b["id"]])
                    w = weights["weights"][rows]
                    if args.level == "token":
                        w = w[:, : b["tokens"].shape[1] - 1]
                    tokens, mask, w = _pad_rows(
                        b["tokens"], b["mask"], w, args.batch_size, args.pad
                    )
                    yield {"tokens": tokens, "mask": mask, "weight": w}
                t += 1

    # Checkpoints of the whole train state in --out/checkpoints: the same command
    # started again after a pre-emption resumes where it stopped, bit for bit.
    result = flowjax.fit(
        step,
        state,
        data,
        num_steps=total,
        log_every=1,
        metrics_path=out / "metrics.jsonl",
        checkpoint_dir=out / "checkpoints",
        checkpoint_every=args.checkpoint_every,
        run_info={
            "checkpoint": str(args.checkpoint),
            "weights_sha256": hashlib.sha256(
                np.ascontiguousarray(weights["weights"]).tobytes()
            ).hexdigest(),
            "level": args.level,
            "lr": args.lr,
            "lora_rank": args.lora_rank,
            "seed": args.seed,
        },
    )
    trainable = result.state.params
    losses_seen = [r["loss"] for r in result.history]
    done = result.history[-1]["step"]
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "trainable", trainable, force=True)
    checkpointer.wait_until_finished()
    summary = {
        "examples": len(examples),
        "level": args.level,
        "temperature": float(tau),
        "lora_rank": args.lora_rank,
        "steps": done,
        "first_loss": losses_seen[0],
        "last_loss": losses_seen[-1],
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable))),
        "seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _pad_rows(tokens, mask, w, batch_size: int, pad: int):
    """Pads a ragged batch with all-masked rows (they add nothing to the token-normalised loss)."""
    n = len(tokens)
    if n == batch_size:
        return tokens, mask, w
    extra = batch_size - n
    tokens = np.concatenate(
        [tokens, np.full((extra, tokens.shape[1]), pad, tokens.dtype)]
    )
    mask = np.concatenate([mask, np.zeros((extra, mask.shape[1]), bool)])
    w = np.concatenate([w, np.zeros((extra, *w.shape[1:]), w.dtype)])
    return tokens, mask, w


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=None,
        help="module:factory building the NNX module (orbax checkpoints only)",
    )
    p.add_argument(
        "--model_kwargs", default="{}", help="JSON keyword arguments of the factory"
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="Hugging Face directory (config.json + safetensors) or orbax nnx.Param state",
    )
    p.add_argument("--data", required=True, help="JSONL of prompt/response examples")
    p.add_argument("--out", required=True)
    p.add_argument("--level", choices=("sequence", "token"), default="sequence")
    p.add_argument(
        "--no_flow", action="store_true", help="weights 1 (standard FT baseline)"
    )
    p.add_argument("--lora_rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument(
        "--lora_targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    )
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="overrides --epochs when > 0")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument(
        "--buckets", default="256,512,1024", help="padded lengths, comma-separated"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint_every",
        type=int,
        default=100,
        help="save the train state every this many steps (and at the end)",
    )
    p.add_argument("--bos", type=int, default=BYTE_BOS)
    p.add_argument("--eos", type=int, default=BYTE_EOS)
    p.add_argument("--pad", type=int, default=BYTE_PAD)
    p.add_argument(
        "--model_axis", type=int, default=1, help="devices on the 'model' axis"
    )
    p.add_argument(
        "--chunked_ce", type=int, default=0, help="vocab chunk size; 0: full logits"
    )
    p.add_argument("--unembedding", default="lm_head.kernel")
    p.add_argument(
        "--logit_softcap",
        type=float,
        default=0.0,
        help="Gemma 2 final soft-cap; 0: none",
    )
    p.add_argument("--unembedding_layout", choices=("dv", "vd"), default="dv")
    return p


def main(argv=None) -> dict:
    summary = finetune(parser().parse_args(argv))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
