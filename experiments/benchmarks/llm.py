"""Benchmark: FLOW's language-model workload on whatever accelerator is present (random weights).

Command::

    make bench-llm    # python -m experiments.benchmarks.llm --out results/benchmarks
                      # writes results/benchmarks/llm.json and llm.md

A :class:`flowjax.models.CausalLM` of Gemma 2 2B's shape (``--size 2b``: 26
layers, D = 2304, 8 query / 4 KV heads of 256, V = 256,000, sliding window
4096, both soft-caps; the default on a GPU/TPU, in bfloat16) or a reduced
Gemma 2 (``--size tiny``, the default on CPU, float32; ``--size smoke`` for
the test suite) is built abstractly
(``nnx.eval_shape``) and initialised by one jitted program whose outputs carry
the FSDP / tensor-parallel shardings of :func:`flowjax.models.default_partition_spec`
over a ``('data', 'model')`` mesh of all devices (``('data',)`` only: ``model`` = 1), so
no full copy is ever made on one device or on the host. Synthetic examples have
MetaMathQA-like lengths (prompt + response, log-normal) and a response mask.
Four measurements:

* **sequence pre-pass**: :func:`flowjax.lm_sequence_losses` (batched, the
  model's full logits) over the length-bucketed examples: real and padded
  token/s, FLOP/s from XLA's cost analysis of each bucket's forward (the
  lowered HLO), and the
  fraction of the device's dense bfloat16 peak (:data:`PEAK_BF16`; ``null``
  for an unknown device or CPU);
* **padding waste**: the share of padded token slots of the bucketing, alone
  (``1 - Σ len / Σ bucket(len)``) and with the rows that fill each bucket's
  last batch;
* **train step**: FLOW's weighted step (:func:`flowjax.weighted_lm_loss` of
  :func:`flowjax.chunked_token_nll` token NLLs, the sequence weights of the
  pre-pass) against the unweighted step (the same NLLs, their plain mean over
  target tokens), AdamW, donated buffers, alternated rounds; the ratio is the
  median of per-round time ratios weighted / unweighted (goal: about 1);
* **KV-cache decoding**: :func:`flowjax.models.generate` (one jitted prefill +
  while-loop program) of ``B`` prompts, never stopping at EOS: tokens/s of
  the whole call, and decode tokens/s from the time of ``N`` new tokens minus
  that of 1 (the prefill).

Runs under 4 minutes on CPU (tiny) and is meant to on one GPU/TPU (2b); no
CPU-only assumptions (dtype, device kind and mesh come from the devices).
Memory at 2b (2.61e9 parameters, bfloat16): about 5 GB of weights, 8 x 512 x
256k float32 logits (4 GB, twice in the pre-pass loss) and AdamW's two moments
for the train step, about 30 GB in all: one 40/80 GB GPU, or FSDP over the
chips of a TPU slice (the mesh takes every device).

Measured (2026-12-01, ``--size tiny`` float32 on this project's shared
2-core CPU at load average about 9, so noisy; ``results/benchmarks/llm.md``):
pre-pass 4,506 real tokens/s (6,401 padded slots/s, 2.1e10 FLOP/s), bucketing
waste 25.7% (29.6% with the last batches' fill), weighted / unweighted step
time 1.03 (range 0.86-1.50 over 5 rounds), KV-cache decoding 4,104 tokens/s
(2,912 for the whole call with its prefill); 82 s in all. No GPU/TPU run yet:
run ``make bench-llm`` there and quote its JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import flowjax
import flowjax.models as fm
from experiments.benchmarks.suite import _ratio, _rounds
from experiments.benchmarks.vision import PEAK_FLOPS, _flops
from experiments.report import write_json
from flowjax.models.llm import _hf_name

# Dense bfloat16 peak FLOP/s per chip by jax's device_kind (the vendors' data sheets):
# the table of experiments/benchmarks/vision.py and the TPU names jax reports for them.
PEAK_BF16 = {k: v[0] for k, v in PEAK_FLOPS.items()} | {
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,
    "TPU v6 lite": 918e12,
}

GEMMA2_2B = {
    "model_type": "gemma2",
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
}
TINY = {
    **GEMMA2_2B,
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 64,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The workload of one ``--size``."""

    config: dict
    examples: int  # pre-pass examples
    buckets: tuple[int, ...]
    prompt_median: int  # log-normal lengths (tokens)
    response_median: int
    prepass_batch: int
    train_batch: int
    train_length: int
    decode_batch: int
    decode_prompt: int
    decode_new: int


SMOKE = {**TINY, "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "head_dim": 8, "query_pre_attn_scalar": 8,
         "sliding_window": 16}  # fmt: skip

SIZES = {
    "2b": Sizes(GEMMA2_2B, 512, (256, 512), 120, 200, 8, 8, 512, 32, 128, 128),
    "tiny": Sizes(TINY, 256, (32, 64, 128), 24, 40, 16, 8, 128, 8, 32, 32),
    "smoke": Sizes(SMOKE, 24, (64,), 12, 16, 8, 4, 64, 4, 16, 16),  # the test's
}


def peak_bf16() -> float | None:
    """The dense bfloat16 peak FLOP/s of device 0, or None (CPU, an unknown kind)."""
    return PEAK_BF16.get(jax.devices()[0].device_kind)


def make_mesh() -> jax.sharding.Mesh:
    """All devices on ``'data'`` (FSDP), ``'model'`` = 1."""
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((jax.device_count(), 1), ("data", "model"), axis_types=auto)


def random_model(config: dict, dtype, mesh, seed: int = 0) -> fm.CausalLM:
    """A random CausalLM initialised by one jitted program straight into its shardings."""
    cfg = fm.LMConfig.from_hf(config)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: fm.CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    )
    shardings = nnx.from_flat_state(
        [
            (
                p,
                v.replace(
                    NamedSharding(
                        mesh,
                        fm.default_partition_spec(
                            _hf_name(p), v.get_value().shape, mesh
                        ),
                    )
                ),
            )
            for p, v in nnx.to_flat_state(abstract)
        ]
    )
    init = jax.jit(
        lambda: nnx.split(fm.CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))[1],
        out_shardings=shardings,
    )
    return nnx.merge(graphdef, init())


def synthetic_examples(sizes: Sizes, vocab: int, seed: int = 0) -> list[dict]:
    """Token ids with log-normal prompt / response lengths, the response (and EOS) as targets."""
    rng = np.random.default_rng(seed)
    longest = max(sizes.buckets)
    out = []
    for i in range(sizes.examples):
        p = int(
            np.clip(rng.lognormal(np.log(sizes.prompt_median), 0.5), 4, longest // 2)
        )
        r = int(
            np.clip(rng.lognormal(np.log(sizes.response_median), 0.6), 2, longest - p)
        )
        tokens = rng.integers(3, vocab, size=p + r).astype(np.int32)
        out.append({"id": i, "tokens": tokens, "mask": np.arange(p + r) >= p})
    return out


def bench_prepass(lm, examples, sizes: Sizes, mesh, rounds: int) -> dict:
    graphdef, params = nnx.split(lm)

    def logits_fn(p, tokens):
        return nnx.merge(graphdef, p)(tokens)

    shardings = jax.tree.map(lambda x: x.sharding, params)
    kw = {
        "bucket_lengths": sizes.buckets,
        "batch_size": sizes.prepass_batch,
        "batched": True,
        "progress": False,
        "mesh": mesh,
        "param_shardings": shardings,
    }

    last = {}

    def run():
        last["table"] = flowjax.lm_sequence_losses(logits_fn, params, examples, **kw)
        return last["table"].losses

    t = _rounds({"prepass": run}, rounds)["prepass"]
    table = last["table"]
    lengths = np.asarray([len(e["tokens"]) for e in examples])
    bucket_of = np.asarray([min(b for b in sizes.buckets if b >= n) for n in lengths])
    batches = {
        b: -(-int((bucket_of == b).sum()) // sizes.prepass_batch) for b in sizes.buckets
    }
    slots = sum(n * b * sizes.prepass_batch for b, n in batches.items())
    flops = 0.0
    for b, n in batches.items():
        if n:
            tokens = jax.ShapeDtypeStruct((sizes.prepass_batch, b), jnp.int32)
            f = _flops(jax.jit(logits_fn).lower(params, tokens))  # HLO cost analysis
            flops = None if f is None or flops is None else flops + n * f
    seconds = float(np.median(t))
    peak = peak_bf16()
    achieved = flops / seconds if flops else None
    return {
        "examples": len(examples),
        "buckets": list(sizes.buckets),
        "batch_size": sizes.prepass_batch,
        "batches_per_bucket": {str(b): n for b, n in batches.items()},
        "seconds_median": seconds,
        "seconds_range": [float(t.min()), float(t.max())],
        "real_tokens_per_s": float(lengths.sum()) / seconds,
        "padded_tokens_per_s": slots / seconds,
        "flops_per_pass": flops,
        "flops_per_s": achieved,
        "peak_bf16_flops_per_s": peak,
        "fraction_of_bf16_peak": achieved / peak if achieved and peak else None,
        "padding_waste_bucketing": 1 - float(lengths.sum()) / float(bucket_of.sum()),
        "padding_waste_with_batch_fill": 1 - float(lengths.sum()) / slots,
        "tau_median_loss": float(np.median(table.losses)),
        "weights": table.flow_weights(),
    }


def bench_train_step(lm, examples, weights, sizes: Sizes, mesh, rounds: int) -> dict:
    graphdef, params = nnx.split(lm)
    cap = lm.config.final_logit_softcapping
    tx = optax.adamw(1e-5)
    b, t = sizes.train_batch, sizes.train_length
    rows = [e for e in examples if len(e["tokens"]) <= t][:b]
    tokens = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    for i, e in enumerate(rows):
        tokens[i, : len(e["tokens"])] = e["tokens"]
        mask[i, : len(e["mask"])] = e["mask"]
    batch = {
        "tokens": tokens,
        "mask": mask,
        "weight": np.asarray(weights.lookup([e["id"] for e in rows]), np.float32),
    }

    def nll(p, batch):
        model = nnx.merge(graphdef, p)
        h = model.hidden(batch["tokens"])[:, :-1]
        return flowjax.chunked_token_nll(
            h.reshape(-1, h.shape[-1]),
            model.unembedding,
            batch["tokens"][:, 1:].reshape(-1),
            layout="vd",
            logit_softcap=cap,
        ).reshape(b, t - 1)

    def plain(p, batch):  # the unweighted SFT loss: mean NLL over target tokens
        m = batch["mask"][:, 1:]
        return jnp.sum(jnp.where(m, nll(p, batch), 0.0)) / jnp.sum(m)

    def weighted(p, batch):  # FLOW: the official Σ w·nll / N_tok
        return flowjax.weighted_lm_loss(
            nll(p, batch), batch["mask"][:, 1:], batch["weight"]
        )

    def make_step(loss_fn):
        def step(p, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(p, batch)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1), out_shardings=shardings)

    opt = jax.jit(tx.init)(params)
    # committed inputs, and outputs with the inputs' shardings: every call is one program
    opt = jax.device_put(opt, jax.tree.map(lambda x: x.sharding, opt))
    state = {"p": params, "opt": opt}
    shardings = (
        *jax.tree.map(lambda x: x.sharding, (params, opt)),
        NamedSharding(mesh, PartitionSpec()),
    )
    steps = {"plain": make_step(plain), "weighted": make_step(weighted)}

    def run(kind):
        def go():
            state["p"], state["opt"], loss = steps[kind](
                state["p"], state["opt"], batch
            )
            return loss

        return go

    times = _rounds({k: run(k) for k in steps}, rounds)
    targets = int(mask[:, 1:].sum())
    return {
        "batch": [b, t],
        "target_tokens": targets,
        "plain_tokens_per_s": b * t / float(np.median(times["plain"])),
        "weighted_tokens_per_s": b * t / float(np.median(times["weighted"])),
        "weighted_over_plain": _ratio(times["weighted"] / times["plain"]),
    }


def bench_decode(lm, sizes: Sizes, rounds: int) -> dict:
    rng = np.random.default_rng(1)
    v = lm.config.vocab_size
    prompts = [
        rng.integers(3, v, size=sizes.decode_prompt - (i % 4)).tolist()
        for i in range(sizes.decode_batch)
    ]
    n = sizes.decode_new

    def gen(k):
        return lambda: fm.generate(lm, prompts, max_new_tokens=k, eos_id=-1, bucket=16)

    t = _rounds({"prefill": gen(1), "generate": gen(n)}, rounds)
    out = gen(n)()
    if any(len(r) != n for r in out):
        raise AssertionError("generate stopped early with eos_id=-1")
    decode = float(np.median(t["generate"] - t["prefill"]))  # the N - 1 decode steps
    b = sizes.decode_batch
    return {
        "batch": b,
        "prompt_tokens": sizes.decode_prompt,
        "new_tokens": n,
        "prefill_s_median": float(np.median(t["prefill"])),
        "generate_s_median": float(np.median(t["generate"])),
        "generate_tokens_per_s": b * n / float(np.median(t["generate"])),
        # None when the difference drowns in timing noise (tiny sizes on a busy CPU)
        "decode_tokens_per_s": b * (n - 1) / decode if decode > 0 else None,
    }


def markdown(r: dict) -> str:
    c, p, s, d = r["config"], r["prepass"], r["train_step"], r["decode"]

    def num(x, fmt=",.0f"):
        return "n/a" if x is None else format(x, fmt)

    frac = p["fraction_of_bf16_peak"]
    rows = [
        ("pre-pass, real tokens/s", num(p["real_tokens_per_s"])),
        ("pre-pass, padded token slots/s", num(p["padded_tokens_per_s"])),
        ("pre-pass FLOP/s (XLA cost analysis)", num(p["flops_per_s"], ".3g")),
        ("fraction of the bf16 peak", "n/a (no known peak)" if frac is None else f"{frac:.1%}"),
        ("padding waste, bucketing", f"{p['padding_waste_bucketing']:.1%}"),
        ("padding waste, with the last batches' fill", f"{p['padding_waste_with_batch_fill']:.1%}"),
        ("train step, unweighted, tokens/s", num(s["plain_tokens_per_s"])),
        ("train step, FLOW-weighted, tokens/s", num(s["weighted_tokens_per_s"])),
        (
            "weighted / unweighted step time",
            f"**{s['weighted_over_plain']['median']:.3f}** "
            f"({s['weighted_over_plain']['min']:.2f}-{s['weighted_over_plain']['max']:.2f})",
        ),
        ("KV-cache generate tokens/s (prefill included)", num(d["generate_tokens_per_s"])),
        ("KV-cache decode tokens/s (prefill subtracted)", num(d["decode_tokens_per_s"])),
    ]  # fmt: skip
    table = "\n".join(
        ["| measurement | value |", "|---|---:|", *(f"| {a} | {b} |" for a, b in rows)]
    )
    head = (
        f"# LLM benchmark ({c['size']}: Gemma 2 shape, {c['parameters']:,} parameters, "
        f"{c['dtype']})\n\n"
        f"Device {c['device_kind']} x {c['devices']} (backend {c['backend']}), jax "
        f"{c['jax']}, {c['cpus']} CPUs, load average {c['load_average_1min_at_start']} "
        f"at the start and {c['load_average_1min_at_end']} at the end; {c['seconds']} s "
        f"in all. Pre-pass: {p['examples']} examples in buckets {p['buckets']}, batch "
        f"{p['batch_size']}, median of {c['rounds']} passes. Train step: batch "
        f"{s['batch'][0]} x {s['batch'][1]}, AdamW, {c['rounds']} alternated rounds "
        f"(median and range of the per-round ratio). Decode: {d['batch']} prompts of "
        f"about {d['prompt_tokens']} tokens, {d['new_tokens']} new tokens each."
    )
    return f"{head}\n\n{table}\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cpu = jax.default_backend() == "cpu"
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="tiny" if cpu else "2b"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="float32" if cpu else "bfloat16",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--examples", type=int, default=None, help="pre-pass examples")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    load0 = round(os.getloadavg()[0], 2)
    sizes = SIZES[args.size]
    if args.examples:
        sizes = dataclasses.replace(sizes, examples=args.examples)
    dtype = jnp.dtype(args.dtype)
    mesh = make_mesh()
    lm = random_model(sizes.config, dtype, mesh)
    examples = synthetic_examples(sizes, sizes.config["vocab_size"])
    prepass = bench_prepass(lm, examples, sizes, mesh, args.rounds)
    print("prepass", {k: v for k, v in prepass.items() if k != "weights"}, flush=True)
    weights = prepass.pop("weights")
    decode = bench_decode(lm, sizes, args.rounds)
    print("decode", decode, flush=True)
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(lm)))
    train = bench_train_step(lm, examples, weights, sizes, mesh, args.rounds)  # donates
    print("train_step", train, flush=True)
    result = {
        "prepass": prepass,
        "train_step": train,
        "decode": decode,
        "config": {
            "size": args.size,
            "dtype": args.dtype,
            "model": sizes.config,
            "parameters": parameters,
            "rounds": args.rounds,
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min_at_start": load0,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }
    os.makedirs(args.out, exist_ok=True)
    result = write_json(os.path.join(args.out, "llm.json"), result)
    md = markdown(result)
    with open(os.path.join(args.out, "llm.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.out}/llm.json and llm.md")
    return result


if __name__ == "__main__":
    main()
