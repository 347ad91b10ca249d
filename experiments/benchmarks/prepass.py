"""Benchmark: the pre-pass against a plain jitted batched forward + loss of the same model.

Command::

    python -m experiments.benchmarks.prepass            # writes results/benchmarks/prepass.json

What it measures, side by side in one run: for an MLP (784-256-256-10) and a
small CNN (two 3x3 conv layers on 28x28x1, then a dense head), the examples/s of

* ``plain``: ``jax.jit`` of the batched forward + per-example cross-entropy,
  called on every batch of host numpy arrays, results fetched to numpy at
  the end: the fastest way to get the numbers with no bookkeeping;
* ``prepass``: ``flowjax.per_example_losses`` on the same batches (with
  ``"id"`` arrays) and the same batched loss (``batched=True``, default step
  size: batches merged into steps of up to 1024 rows), which adds ids,
  padding, sharding, validation and the id-keyed table.

The two runs alternate (plain, prepass, plain, ...) for ``--repeats`` rounds
after one warm-up each (compilation excluded; the first-call time is reported
separately). The reported ratio is the median over rounds of
``time(plain) / time(prepass)`` within a round, which cancels the slow drift of a
shared machine; the ratio of median throughputs is in the JSON too. Goal:
ratio >= 0.95. The losses of both paths are checked to agree (1e-4).

Expected output (2-core CPU, 2026-11-21, batch 256; docs/experiments/benchmarks.md quotes one run):
a ratio of about 0.95-1.0 for the MLP and 1.0-1.07 for the CNN.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import optax
from flax import nnx

import flowjax


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(784, 256, rngs=rngs)
        self.l2 = nnx.Linear(256, 256, rngs=rngs)
        self.l3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(*x.shape[:-3], 784)
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, 16, (3, 3), strides=2, rngs=rngs)
        self.c2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(7 * 7 * 32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c2(nnx.relu(self.c1(x))))
        return self.head(x.reshape(*x.shape[:-3], 7 * 7 * 32))


def make_batches(n: int, batch_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    return [
        {
            "id": np.arange(s, s + batch_size, dtype=np.int64),
            "image": x[s : s + batch_size],
            "label": y[s : s + batch_size],
        }
        for s in range(0, n, batch_size)
    ]


def bench_model(
    name: str, model: nnx.Module, n: int, batch_size: int, repeats: int
) -> dict:
    graphdef, state = nnx.split(model)
    batches = make_batches(n, batch_size)

    def loss_fn(state, batch):  # the batched form: [B] losses, rows independent
        logits = nnx.merge(graphdef, state)(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    @jax.jit
    def plain_step(state, images, labels):  # the batched baseline
        logits = nnx.merge(graphdef, state)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def run_plain():
        outs = [plain_step(state, b["image"], b["label"]) for b in batches]
        return np.concatenate([np.asarray(o) for o in outs])

    def run_prepass():
        return flowjax.per_example_losses(
            loss_fn, state, batches, batched=True, progress=False
        ).losses

    t0 = time.perf_counter()
    ref = run_plain()
    cold_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = run_prepass()
    cold_prepass = time.perf_counter() - t0
    max_diff = float(np.max(np.abs(ref - got)))
    if max_diff > 1e-4:
        raise AssertionError(f"{name}: pre-pass and plain losses differ by {max_diff}")

    times = {"plain": [], "prepass": []}
    for _ in range(repeats):
        for label, fn in (("plain", run_plain), ("prepass", run_prepass)):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    plain_eps = n / float(np.median(times["plain"]))
    prepass_eps = n / float(np.median(times["prepass"]))
    # Each round runs plain and pre-pass back to back: their ratio cancels the slow drift
    # of a shared machine, and the median over rounds drops the outliers.
    pair_ratios = np.asarray(times["plain"]) / np.asarray(times["prepass"])
    return {
        "model": name,
        "examples": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "plain_examples_per_s": plain_eps,
        "prepass_examples_per_s": prepass_eps,
        "ratio": float(np.median(pair_ratios)),
        "ratio_range": [float(pair_ratios.min()), float(pair_ratios.max())],
        "ratio_of_median_throughputs": prepass_eps / plain_eps,
        "plain_first_call_s": cold_plain,
        "prepass_first_call_s": cold_prepass,
        "max_abs_loss_diff": max_diff,
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/benchmarks/prepass.json")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--mlp-examples", type=int, default=65536)
    parser.add_argument("--cnn-examples", type=int, default=8192)
    args = parser.parse_args(argv)

    rngs = nnx.Rngs(0)
    rows = [
        bench_model(
            "mlp_784_256_256_10",
            MLP(rngs),
            args.mlp_examples,
            args.batch_size,
            args.repeats,
        ),
        bench_model(
            "cnn_2conv", CNN(rngs), args.cnn_examples, args.batch_size, args.repeats
        ),
    ]
    result = {
        "benchmark": "prepass_vs_plain_jit",
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "goal_ratio": 0.95,
        "rows": rows,
    }
    print(
        f"{'model':<22}{'plain ex/s':>12}{'pre-pass ex/s':>15}{'ratio':>8}  range over rounds"
    )
    for r in rows:
        lo, hi = r["ratio_range"]
        print(
            f"{r['model']:<22}{r['plain_examples_per_s']:>12,.0f}"
            f"{r['prepass_examples_per_s']:>15,.0f}{r['ratio']:>8.3f}  {lo:.3f}-{hi:.3f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
