"""Benchmark: FLOW's vision workload on whatever accelerator is present (synthetic data).

Command::

    python -m experiments.benchmarks.vision     # writes results/benchmarks/vision.json

Two measurements on a torchvision-layout ResNet (``flowjax.models``, random
weights, synthetic uint8 images normalised on the device as a real input
pipeline delivers them):

* **pre-pass**: :func:`flowjax.per_example_losses` (the frozen model in eval
  mode, one example's loss vmapped) against a plain ``jax.jit`` of the batched
  forward + cross-entropy on the same host batches: examples/s of each, their
  ratio, and the fraction of the device's peak FLOP/s the pre-pass reaches
  (FLOPs from XLA's cost analysis of the plain step; peaks for known devices
  in :data:`PEAK_FLOPS`, else ``null``);
* **train step**: FLOW's step (:func:`flowjax.weighted_objective` with
  ``batched=True`` for BatchNorm, through :func:`flowjax.make_train_step`:
  weights, metrics, ‖θ−θ₀‖) against a hand-written unweighted step (mean
  cross-entropy, ``value_and_grad``, SGD with momentum, donated buffers):
  examples/s and the ratio FLOW / unweighted (goal: close to 1).

Rounds alternate the two sides of each comparison and the ratio is the median
of per-round ratios (as in ``experiments/benchmarks/prepass.py``), so drift of a
shared machine cancels. Defaults: on a GPU/TPU ResNet-50 at 224×224, bfloat16
compute, batch 128; on CPU a reduced size (64×64, batch 16, float32). The run
takes under 4 minutes on either.

Measured (2026-12-01, the defaults for CPU: ResNet-50 at 64×64, batch 16,
float32, on this project's shared 2-core CPU at load ≈ 5, so noisy): pre-pass
12.8 ex/s against 15.5 for the plain forward (median per-round ratio 1.06,
range 0.71-1.15), 0.60 GFLOP per example; FLOW step 6.0 ex/s against 5.1 for
the unweighted step (ratio 1.17, range 0.71-1.32), 1.8 GFLOP per example;
141 s in all. No GPU/TPU number yet: run it there and quote the JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flowjax
import flowjax.models
from experiments.report import write_json

# Dense peak FLOP/s per chip by jax's device_kind, (bfloat16, float32), from the vendors'
# data sheets (GPU float32: plain FP32, not TF32). Unknown devices report no fraction.
PEAK_FLOPS = {
    "NVIDIA H200": (989e12, 67e12),
    "NVIDIA H100 80GB HBM3": (989e12, 67e12),
    "NVIDIA H100 PCIe": (756e12, 51e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 19.5e12),
    "NVIDIA L4": (121e12, 30e12),
    "TPU v4": (275e12, None),
    "TPU v5 lite": (197e12, None),
    "TPU v5": (459e12, None),
    "TPU v6 lite": (918e12, None),
}
MEAN = np.float32([0.485, 0.456, 0.406]) * 255
STD = np.float32([0.229, 0.224, 0.225]) * 255


def _peak(dtype) -> float | None:
    kind = jax.devices()[0].device_kind
    peaks = PEAK_FLOPS.get(kind)
    if peaks is None:
        return None
    return peaks[0] if dtype == jnp.bfloat16 else peaks[1]


def _random_model(arch, classes, dtype, seed=0) -> flowjax.models.ResNet:
    """Seeded numpy weights through load_resnet: no per-op compilation of random inits."""
    abstract = nnx.eval_shape(
        lambda: flowjax.models.resnet(arch, num_classes=classes, rngs=nnx.Rngs(0))
    )
    rng = np.random.default_rng(seed)
    weights = {}
    for name, s in flowjax.models.torch_state_dict(abstract).items():
        shape = s.shape
        if name.endswith("running_var") or (
            len(shape) == 1 and name.endswith("weight")
        ):
            weights[name] = np.ones(shape, np.float32)
        elif len(shape) == 1:
            weights[name] = np.zeros(shape, np.float32)
        else:  # conv (out, in, h, w) or fc (out, in): He / LeCun normal
            fan_in = math.prod(shape[1:])
            gain = 1.0 if len(shape) == 2 else 2.0
            weights[name] = (
                rng.standard_normal(shape) * math.sqrt(gain / fan_in)
            ).astype(np.float32)
    return flowjax.models.load_resnet(arch, weights, dtype=dtype)


def _images(n, size, classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return x, rng.integers(0, classes, size=n).astype(np.int32)


def _normalise(x, dtype):
    return ((x.astype(jnp.float32) - MEAN) / STD).astype(dtype)


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _compare(times: dict, n: int, flops_per_batch, batch_size: int, dtype) -> dict:
    """examples/s of both sides, the median per-round ratio base/other, FLOPs and peak."""
    (base, base_t), (other, other_t) = times.items()
    ratios = np.asarray(base_t) / np.asarray(other_t)
    eps = {k: n / float(np.median(v)) for k, v in times.items()}
    peak = _peak(dtype)
    per_example = flops_per_batch / batch_size if flops_per_batch else None
    achieved = per_example * eps[other] if per_example else None
    return {
        f"{base}_examples_per_s": eps[base],
        f"{other}_examples_per_s": eps[other],
        "ratio": float(np.median(ratios)),
        "ratio_range": [float(ratios.min()), float(ratios.max())],
        "flops_per_example": per_example,
        f"{other}_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        f"{other}_fraction_of_peak": achieved / peak if achieved and peak else None,
        "times_s": times,
    }


def _alternate(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def bench_prepass(model, args, dtype) -> dict:
    model.eval()
    graphdef, state = nnx.split(model)
    n = args.batch_size * args.prepass_batches
    x, y = _images(n, args.size, args.classes, seed=1)
    batches = [
        {"id": np.arange(s, s + args.batch_size), "image": x[s : s + args.batch_size],
         "label": y[s : s + args.batch_size]}
        for s in range(0, n, args.batch_size)
    ]  # fmt: skip

    def loss_fn(state, ex):  # ONE example: what the pre-pass vmaps
        logits = nnx.merge(graphdef, state)(_normalise(ex["image"][None], dtype))[0]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), ex["label"]
        )

    @jax.jit
    def plain_step(state, images, labels):
        logits = nnx.merge(graphdef, state)(_normalise(images, dtype))
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        )

    t0 = time.perf_counter()
    compiled = plain_step.lower(
        state, batches[0]["image"], batches[0]["label"]
    ).compile()
    cold_plain = time.perf_counter() - t0
    flops = _flops(compiled)

    def run_plain():
        outs = [compiled(state, b["image"], b["label"]) for b in batches]
        return np.concatenate([np.asarray(o) for o in outs])

    def run_prepass():
        return flowjax.per_example_losses(
            loss_fn, state, batches, progress=False
        ).losses

    ref = run_plain()
    t0 = time.perf_counter()
    got = run_prepass()
    cold_prepass = time.perf_counter() - t0
    diff = float(np.max(np.abs(ref - got)))
    tol = 1e-3 if dtype == jnp.float32 else 0.1  # bfloat16: batched vs one-by-one convs
    if not diff <= tol:
        raise AssertionError(f"pre-pass and plain losses differ by {diff} (> {tol})")
    times = _alternate({"plain": run_plain, "prepass": run_prepass}, args.rounds)
    return {
        "examples": n,
        **_compare(times, n, flops, args.batch_size, dtype),
        "plain_compile_s": cold_plain,
        "prepass_first_call_s": cold_prepass,
        "max_abs_loss_diff": diff,
    }


def bench_train(model, args, dtype) -> dict:
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.sgd(1e-3, momentum=0.9)
    data = [
        _images(args.batch_size, args.size, args.classes, seed=10 + i) for i in range(2)
    ]
    rng = np.random.default_rng(2)
    batches = [
        {"id": np.arange(args.batch_size) + i * args.batch_size, "image": x, "label": y,
         "weight": rng.uniform(0.05, 1.0, args.batch_size).astype(np.float32)}
        for i, (x, y) in enumerate(data)
    ]  # fmt: skip

    def batch_loss(params, batch, stats):
        m = nnx.merge(graphdef, params, stats, copy=True)
        logits = m(_normalise(batch["image"], dtype)).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return losses, nnx.state(m, nnx.BatchStat)

    objective = flowjax.weighted_objective(
        batch_loss, batched=True, has_aux=True, return_metrics=True
    )
    flow_step = flowjax.make_train_step(objective, tx, anchor=params, has_aux=True)
    flow_state = [flowjax.init_train_state(params, tx, model_state=stats)]

    def plain_loss(params, stats, images, labels):
        losses, stats = batch_loss(params, {"image": images, "label": labels}, stats)
        return jnp.mean(losses), stats

    def _plain(params, opt_state, stats, images, labels):
        (loss, stats), g = jax.value_and_grad(plain_loss, has_aux=True)(
            params, stats, images, labels
        )
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats, loss

    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    plain_state = [(copy(params), tx.init(params), copy(stats))]
    b0 = batches[0]
    t0 = time.perf_counter()
    plain_step = (
        jax.jit(_plain, donate_argnums=(0, 1, 2))
        .lower(*plain_state[0], b0["image"], b0["label"])
        .compile()
    )
    cold_plain = time.perf_counter() - t0
    flops = _flops(plain_step)

    def run_flow():
        for i in range(args.train_steps):
            flow_state[0], metrics = flow_step(flow_state[0], batches[i % 2])
        return float(metrics["loss"])

    def run_plain():
        for i in range(args.train_steps):
            b = batches[i % 2]
            *s, loss = plain_step(*plain_state[0], b["image"], b["label"])
            plain_state[0] = tuple(s)
        return float(loss)

    run_plain()
    t0 = time.perf_counter()
    loss = run_flow()
    cold_flow = time.perf_counter() - t0
    if not math.isfinite(loss):
        raise AssertionError(f"the FLOW step's loss is {loss}")
    times = _alternate({"unweighted": run_plain, "flow": run_flow}, args.rounds)
    n = args.batch_size * args.train_steps
    return {
        "steps_per_round": args.train_steps,
        **_compare(times, n, flops, args.batch_size, dtype),
        "unweighted_compile_s": cold_plain,
        "flow_first_call_s": cold_flow,
    }


def main(argv: list[str] | None = None) -> dict:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/benchmarks/vision.json")
    parser.add_argument(
        "--arch", default="resnet50", choices=sorted(flowjax.models.ARCHS)
    )
    parser.add_argument("--size", type=int, default=64 if on_cpu else 224)
    parser.add_argument("--batch-size", type=int, default=16 if on_cpu else 128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32" if on_cpu else "bfloat16",
    )
    parser.add_argument("--prepass-batches", type=int, default=4 if on_cpu else 20)
    parser.add_argument("--train-steps", type=int, default=3 if on_cpu else 10)
    parser.add_argument("--rounds", type=int, default=3 if on_cpu else 5)
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

    t0 = time.perf_counter()
    model = _random_model(args.arch, args.classes, dtype)
    prepass = bench_prepass(model, args, dtype)
    train = bench_train(model, args, dtype)
    result = {
        "benchmark": "vision_resnet",
        "config": vars(args),
        "device_kind": jax.devices()[0].device_kind,
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "prepass": prepass,
        "train": train,
        "wall_s": time.perf_counter() - t0,
    }
    frac = prepass["prepass_fraction_of_peak"]
    print(
        f"{args.arch} {args.size}x{args.size} batch {args.batch_size} {args.dtype} on "
        f"{result['device_kind']}:\n"
        f"  pre-pass  {prepass['prepass_examples_per_s']:>10,.1f} ex/s   plain forward "
        f"{prepass['plain_examples_per_s']:>10,.1f} ex/s   ratio {prepass['ratio']:.3f}"
        + (f"   {100 * frac:.1f} % of peak" if frac else "")
        + f"\n  FLOW step {train['flow_examples_per_s']:>10,.1f} ex/s   unweighted    "
        f"{train['unweighted_examples_per_s']:>10,.1f} ex/s   ratio {train['ratio']:.3f}\n"
        f"  {result['wall_s']:.0f} s in all"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
