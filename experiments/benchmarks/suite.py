"""Benchmark suite: what FLOW costs over plain fine-tuning, every figure a ratio measured side by side.

Command::

    make bench     # python -m experiments.benchmarks.suite --out results/benchmarks
                   # writes results/benchmarks/suite.json and suite.md

Every figure is a ratio of two things timed in the same run by one method
(:mod:`experiments.benchmarks.timing`), each ratio in its own rounds of
just its two (or three) functions: compilation excluded by two
warm-ups of each; in each round every function runs three times,
interleaved in mirrored order (A B, B A, A B), and the round keeps each
one's fastest call; the starting order rotates from round to round. A
figure is the median over rounds of the per-round ratio with its range
(min-max), so the slow drift of a shared machine cancels, and each group
of figures has a control: one function timed under two labels (about 1
when the method is unbiased; its range is the method's own noise).
``--quick`` runs the same code on tiny sizes (the test suite runs it). The
figures:

* ``prepass``: ``per_example_losses`` (batched loss, default step size)
  against a plain ``jax.jit`` batched forward + loss on the same batches of
  256, for the MLP and the CNN of :mod:`experiments.benchmarks.prepass` and
  (not with ``--quick``) ``flowjax.models``' ResNet-18 at width 16 on
  32x32x3 images in eval mode: plain time / pre-pass time (>= 1 is a
  pre-pass as fast as the forward).
* ``train_step``: the FLOW-weighted train step (``weighted_objective``)
  against the plain step of the same model and optimizer, in both loss
  forms: ``batched`` (``model(batch["image"])``, ``batched=True``) and
  ``per_example`` (the slow form, ``model(ex["image"][None])[0]`` under
  ``jax.vmap``): weighted time / plain time. The weights are a field of the
  batches, looked up by id once after the pre-pass (as
  :func:`flowjax.train.fit` takes them: they do not change between epochs);
  ``attach`` looks them up every step instead (``attach_weights``). The
  plain time is the faster (by its median over the rounds) of two forms of
  the same mean loss (see :func:`bench_training`).
* ``end_to_end``: FLOW (pre-pass, the weights attached to the batches, E
  epochs of weighted steps) against E epochs of plain steps, E = 3 and 10:
  the time of FLOW / the time of plain fine-tuning, ``prepass / plain epoch
  / E + weighted / plain``, each of the two ratios from its own rounds,
  combined round by round.
* ``host``: the pre-pass's host time per step (µs) around a trivial
  program, over the bare jitted loop (see :func:`bench_host`).
* ``cache``: ``per_example_losses`` over ``flowjax.batches`` of an
  ``ArraySource`` (MLP, 64k examples) with a fresh ``cache_dir`` and resumed
  from the complete cache, against no cache: cached time / uncached time.
* ``chunked_ce``: ``chunked_token_nll`` (default chunk size) against the plain
  ``[N, V]`` logits for V = 32k ... 256k: XLA's planned scratch memory
  (exact, N = 4 x 512 tokens, D = 128) and time (N = 512), forward and
  forward + backward: chunked / plain.
* ``lm_prepass``: ``lm_sequence_losses`` of a small causal LM over
  length-bucketed examples, the batched ``logits_fn`` against the
  per-sequence one: target tokens/s of each, their ratio, and the share of
  padded token slots (bucketing's waste).

With ``results/benchmarks/torch.json`` present (``make bench-torch``,
:mod:`experiments.benchmarks.torch_flow`, optional), the table adds
PyTorch's official-style FLOW loop / its fine-tuning beside flowjax's.

Spread: shared CPUs give noisy times; the memory figures are exact. The
README quotes one run of this table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flowjax
from experiments import report
from experiments.benchmarks import timing
from experiments.benchmarks.prepass import CNN, MLP

_MIB = 2**20


# --- timing ----------------------------------------------------------------------------------


_WARMUPS = 2  # calls of each function before timing (--quick: 1)
_REPEATS = 3  # timed calls of each function per round, the round keeping the fastest (--quick: 1)


def _rounds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, np.ndarray]:
    """Seconds of each function per round (:func:`timing.alternated_rounds`: every figure's method)."""
    return timing.alternated_rounds(
        fns, rounds, repeats=_REPEATS, warmups=_WARMUPS, sync=jax.block_until_ready
    )


def _over(fn, base: dict, rounds: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per round, ``fn``'s time over the fastest of ``base`` (:func:`timing.ratio_over`)."""
    return timing.ratio_over(
        fn, base, rounds, repeats=_REPEATS, warmups=_WARMUPS, sync=jax.block_until_ready
    )


_ratio = timing.summary


# --- data and models -------------------------------------------------------------------------


def _data(n: int, seed: int = 0, image=(28, 28, 1)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, *image)).astype(np.float32),
        "label": rng.integers(0, 10, size=n).astype(np.int32),
    }


def _batches(data, batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(data.values())))
    return [
        {
            "id": np.arange(s, min(s + batch_size, n), dtype=np.int64),
            **{k: v[s : s + batch_size] for k, v in data.items()},
        }
        for s in range(0, n, batch_size)
    ]


def _resnet18(rngs: nnx.Rngs) -> nnx.Module:
    """flowjax.models' ResNet-18 at width 16 (a quarter of the published one), on 32x32x3.

    In eval mode (BatchNorm on its running statistics), as the pre-pass runs
    the frozen pre-trained model.
    """
    from flowjax.models import resnet

    model = resnet("resnet18", num_classes=10, rngs=rngs, width=16)
    model.eval()
    return model


_MODELS = {"mlp": MLP, "cnn": CNN, "resnet18": _resnet18}
_IMAGES = {"resnet18": (32, 32, 3)}  # the others: (28, 28, 1)


def _losses(graphdef):
    """The two forms of one model's per-example cross-entropy."""

    def batched(params, batch):  # [B]: the fast form
        logits = nnx.merge(graphdef, params)(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    def per_example(params, ex):  # a batched model called on one example: the slow form
        logits = nnx.merge(graphdef, params)(ex["image"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["label"])

    return batched, per_example


# --- figures ---------------------------------------------------------------------------------


def bench_prepass(name: str, n: int, rounds: int) -> dict:
    graphdef, params = nnx.split(_MODELS[name](nnx.Rngs(0)))
    batched, _ = _losses(graphdef)
    batches = _batches(_data(n, image=_IMAGES.get(name, (28, 28, 1))), 256)
    plain_step = jax.jit(batched)

    def plain():
        outs = [plain_step(params, b) for b in batches]
        return np.concatenate([np.asarray(o) for o in outs])

    def prepass():
        return flowjax.per_example_losses(
            batched, params, batches, batched=True, progress=False
        ).losses

    diff = float(np.max(np.abs(plain() - prepass())))  # ids are 0..n-1: same order
    if diff > 1e-4:
        raise AssertionError(f"{name}: pre-pass and plain losses differ by {diff}")
    ratio, t = _over(prepass, {"plain": plain}, rounds)
    control, _ = _over(plain, {"plain": plain}, rounds)
    return {
        "model": name,
        "examples": n,
        "plain_examples_per_s": round(n / float(np.median(t["plain"]))),
        "prepass_examples_per_s": round(n / float(np.median(t["timed"]))),
        "plain_over_prepass": _ratio(1 / ratio),
        "control_same_program_two_labels": _ratio(control),
        "max_abs_loss_diff": diff,
    }


def bench_host(steps: int, rounds: int, rows: int = 256) -> dict:
    """The pre-pass's host time per step: the engine's Python around a trivial program.

    A model that costs nearly nothing (``x.sum(1) * p`` on 4 features), one
    step per input batch of ``rows`` rows (``step_size=rows``: no merging),
    against the bare loop of the same jitted function over the same arrays
    with the outputs read back: (pre-pass time - bare time) / steps, in µs,
    per round. What remains is validation, the id checks, step assembly and
    the reading of results, which the goal bounds by 10 µs a step.
    """
    rng = np.random.default_rng(0)
    n = steps * rows
    data = {
        "x": rng.normal(size=(n, 4)).astype(np.float32),
        "y": rng.integers(0, 3, size=n).astype(np.int32),
    }
    batches = _batches(data, rows)

    def loss(p, b):
        return jnp.sum(b["x"], axis=1) * p

    p = jnp.float32(1.0)
    bare_step = jax.jit(lambda p, leaves: loss(p, {"x": leaves[0]}))

    def bare():
        outs = [bare_step(p, [b["x"], b["y"]]) for b in batches]
        return np.concatenate([np.asarray(o) for o in outs])

    def prepass():
        return flowjax.per_example_losses(
            loss, p, batches, batched=True, step_size=rows, progress=False
        ).losses

    np.testing.assert_allclose(bare(), prepass(), rtol=1e-6)
    t = _rounds({"bare": bare, "prepass": prepass}, rounds)
    per_step = (t["prepass"] - t["bare"]) / steps * 1e6
    return {
        "steps": steps,
        "rows_per_step": rows,
        "bare_us_per_step": round(float(np.median(t["bare"])) / steps * 1e6, 1),
        "host_us_per_step": {
            k: (round(v, 1) if isinstance(v, float) else v)
            for k, v in _ratio(per_step).items()
        },
    }


def _train_parts(name: str, n: int, tx=None):
    """Jitted plain and weighted steps (both loss forms) and the epochs that run them."""
    graphdef, params = nnx.split(_MODELS[name](nnx.Rngs(0)))
    batched, per_example = _losses(graphdef)
    tx = optax.sgd(1e-2, momentum=0.9) if tx is None else tx
    batches = _batches(_data(n), 256)

    def mean_loss(p, batch):
        return jnp.mean(batched(p, batch))

    def make_step(objective):
        @jax.jit
        def step(p, opt_state, batch):
            loss, grads = jax.value_and_grad(objective)(p, batch)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        return step

    weighted = flowjax.weighted_objective(batched, batched=True)
    steps = {
        "plain": make_step(mean_loss),
        "plain_unit": make_step(weighted),  # the same mean, through unit weights
        "batched": make_step(weighted),
        "per_example": make_step(flowjax.weighted_objective(per_example)),
        "attach": make_step(weighted),
    }

    def with_weights(weights):
        """The batches with their FLOW weights as a field, looked up by id once."""
        return [flowjax.attach_weights(b, weights) for b in batches]

    weights = flowjax.per_example_losses(
        batched, params, batches, batched=True, progress=False
    ).flow_weights()
    weighted_batches = with_weights(weights)
    units = {len(b["id"]): np.ones(len(b["id"]), np.float32) for b in batches}

    def epoch(kind: str):
        def run():
            p, opt_state, loss = params, tx.init(params), None
            for b in (
                weighted_batches if kind in ("batched", "per_example") else batches
            ):
                if kind == "plain_unit":
                    b = {**b, "weight": units[len(b["id"])]}
                elif kind == "attach":  # looked up again every step
                    b = flowjax.attach_weights(b, weights)
                b = {k: v for k, v in b.items() if k != "id"}
                p, opt_state, loss = steps[kind](p, opt_state, b)
            return loss

        return run

    def prepass():  # FLOW's part before fine-tuning: the losses, weights, weighted batches
        return with_weights(
            flowjax.per_example_losses(
                batched, params, batches, batched=True, progress=False
            ).flow_weights()
        )

    return {k: epoch(k) for k in steps}, prepass


def bench_training(name: str, n: int, rounds: int, epochs=(3, 10)) -> dict:
    """Weighted vs plain epochs and FLOW end to end vs plain fine-tuning.

    The plain step is timed in two forms of the same mean loss: ``jnp.mean``
    of the losses, and the weighted objective fed unit weights (the very
    program of the weighted step, so only the weights' values differ, and in
    ``attach`` their lookup). XLA compiles the two to programs of slightly different
    speed (on 2 CPUs the ``jnp.mean`` one was the slower: a constant ``1/B``
    where the weighted one divides by a sum), and a plain baseline slower
    than it needs to be flatters FLOW: the plain baseline is the faster of
    the two by its median over the rounds (not the faster one round by round,
    which is biased low: see :func:`timing.ratio_over`). Every ratio (weighted / plain, pre-pass / plain, the
    control: the same plain epoch under two labels) is timed in its own
    rounds of its two or three functions (:func:`timing.ratio_over`).
    """
    epoch, prepass = _train_parts(name, n)
    plains = {"plain": epoch["plain"], "plain_unit": epoch["plain_unit"]}
    step, times = {}, {}
    for form in ("batched", "per_example", "attach"):
        step[form], times[form] = _over(epoch[form], plains, rounds)
    pre, _ = _over(prepass, plains, rounds)
    control, _ = _over(epoch["plain"], {"plain": epoch["plain"]}, rounds)
    t = times["batched"]
    out = {
        "model": name,
        "examples": n,
        "train_step": {form: _ratio(r) for form, r in step.items()},
        "plain_forms": {
            "mean_over_unit_weights": _ratio(t["plain"] / t["plain_unit"]),
            "same_program_two_labels": _ratio(control),
        },
        "end_to_end": {},
    }
    for e in epochs:
        for form in ("batched", "per_example"):
            # (pre-pass + e weighted epochs) / (e plain epochs), round by round
            out["end_to_end"][f"{form}_{e}_epochs"] = _ratio(pre / e + step[form])
    out["prepass_over_plain_epoch"] = _ratio(pre)
    return out


def bench_cache(n: int, rounds: int) -> dict:
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)))
    batched, _ = _losses(graphdef)
    source = flowjax.ArraySource(_data(n))
    root = tempfile.mkdtemp(prefix="flowjax-bench-cache-")
    complete = os.path.join(root, "complete")

    def run(cache_dir=None):
        return flowjax.per_example_losses(
            batched,
            params,
            flowjax.batches(source, 256),
            batched=True,
            progress=False,
            cache_dir=cache_dir,
        )

    # Empty directories made before the timing (making and deleting a directory is not the
    # cache's cost): one per timed or warm-up call; all deleted with root.
    empty = [tempfile.mkdtemp(dir=root) for _ in range(_WARMUPS + rounds * _REPEATS)]

    def fresh():
        return run(empty.pop() if empty else tempfile.mkdtemp(dir=root)).losses

    reference = run(complete)  # fills the complete cache
    try:
        resumed = run(complete)
        if resumed.cached != n or resumed != reference:
            raise AssertionError("the complete cache did not serve every row exactly")
        none = {"none": lambda: run().losses}
        ratios = {
            "fresh": _over(fresh, none, rounds)[0],
            "resume": _over(lambda: run(complete).losses, none, rounds)[0],
            "control": _over(none["none"], none, rounds)[0],
        }
    finally:
        shutil.rmtree(root)
    return {
        "model": "mlp",
        "examples": n,
        "fresh_over_none": _ratio(ratios["fresh"]),
        "resume_over_none": _ratio(ratios["resume"]),
        "control_same_program_two_labels": _ratio(ratios["control"]),
    }


def _plain_ce(h, w, y):
    z = jnp.einsum("nd,dv->nv", h, w, preferred_element_type=jnp.float32)
    return jnp.sum(
        -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1)[:, 0]
    )


def _chunked_ce(h, w, y):
    return jnp.sum(flowjax.chunked_token_nll(h, w, y))


def _temp(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def bench_chunked_ce(
    vocabs: list[int], time_vocabs: list[int], n_mem: int, n_time: int, rounds: int
) -> list[dict]:
    d, rows = 128, []
    for v in vocabs:
        h = jax.ShapeDtypeStruct((n_mem, d), jnp.float32)
        w = jax.ShapeDtypeStruct((d, v), jnp.float32)
        y = jax.ShapeDtypeStruct((n_mem,), jnp.int32)
        row = {"V": v, "tokens_memory": n_mem}
        for name, wrap in (
            ("fwd", lambda f: f),
            ("fwd+bwd", lambda f: jax.value_and_grad(f, argnums=(0, 1))),
        ):
            plain, chunked = (
                _temp(wrap(_plain_ce), h, w, y),
                _temp(wrap(_chunked_ce), h, w, y),
            )
            row[f"{name}_plain_temp_mib"] = round(plain / _MIB, 1)
            row[f"{name}_chunked_temp_mib"] = round(chunked / _MIB, 1)
            row[f"{name}_temp_ratio"] = round(chunked / plain, 4)
        if v in time_vocabs:
            k1, k2, k3 = jax.random.split(jax.random.key(v), 3)
            hh = jax.random.normal(k1, (n_time, d), jnp.float32)
            ww = jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)
            yy = jax.random.randint(k3, (n_time,), 0, v)
            row["tokens_time"] = n_time
            for name, wrap in (
                ("fwd", lambda f: f),
                ("fwd+bwd", lambda f: jax.value_and_grad(f, argnums=(0, 1))),
            ):
                plain, chunked = jax.jit(wrap(_plain_ce)), jax.jit(wrap(_chunked_ce))
                for a, b in zip(
                    jax.tree.leaves(plain(hh, ww, yy)),
                    jax.tree.leaves(chunked(hh, ww, yy)),
                    strict=True,
                ):
                    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
                t = _rounds(
                    {
                        "plain": lambda p=plain, a=(hh, ww, yy): p(*a),
                        "chunked": lambda c=chunked, a=(hh, ww, yy): c(*a),
                    },
                    rounds,
                )
                row[f"{name}_time_ratio"] = _ratio(t["chunked"] / t["plain"])
        rows.append(row)
        print("chunked_ce", row, flush=True)
    return rows


def bench_lm(n: int, rounds: int, vocab: int = 512, width: int = 64) -> dict:
    rng = np.random.default_rng(0)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "E": jax.random.normal(k1, (vocab, width), jnp.float32) / 4,
        "W": jax.random.normal(k2, (width, vocab), jnp.float32) / np.sqrt(width),
    }

    def per_sequence(p, tokens):  # [T] -> [T, V], causal: running mean of embeddings
        h = jnp.cumsum(p["E"][tokens], axis=0) / jnp.arange(1, len(tokens) + 1)[:, None]
        return jnp.tanh(h) @ p["W"]

    def batched(p, tokens):  # [B, T] -> [B, T, V]
        t = tokens.shape[1]
        h = jnp.cumsum(p["E"][tokens], axis=1) / jnp.arange(1, t + 1)[None, :, None]
        return jnp.tanh(h) @ p["W"]

    lengths = rng.integers(8, 129, size=n)
    examples = [
        {
            "id": i,
            "tokens": rng.integers(0, vocab, size=int(m)),
            "mask": np.arange(int(m)) >= int(m) // 2,
        }
        for i, m in enumerate(lengths)
    ]
    buckets = (32, 64, 128)
    kw = {"bucket_lengths": buckets, "batch_size": 64, "progress": False}
    a = flowjax.lm_sequence_losses(per_sequence, params, examples, **kw)
    b = flowjax.lm_sequence_losses(batched, params, examples, batched=True, **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)
    t = _rounds(
        {
            "per_sequence": lambda: (
                flowjax.lm_sequence_losses(per_sequence, params, examples, **kw).losses
            ),
            "batched": lambda: (
                flowjax.lm_sequence_losses(
                    batched, params, examples, batched=True, **kw
                ).losses
            ),
        },
        rounds,
    )
    targets = int(sum(int(m) - int(m) // 2 for m in lengths))
    padded = sum(min(x for x in buckets if x >= m) for m in lengths)
    return {
        "examples": n,
        "target_tokens": targets,
        "per_sequence_tokens_per_s": round(
            targets / float(np.median(t["per_sequence"]))
        ),
        "batched_tokens_per_s": round(targets / float(np.median(t["batched"]))),
        "batched_speedup": _ratio(t["per_sequence"] / t["batched"]),
        "padding_waste": round(1 - float(lengths.sum()) / padded, 4),
    }


# --- the table -------------------------------------------------------------------------------


def _fmt(r: dict) -> str:
    return f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"


def markdown(result: dict) -> str:
    rows = []
    for p in result["prepass"]:
        if "control_same_program_two_labels" in p:
            rows.append(
                [
                    f"control: plain / plain forward, {p['model']}, the same program under two labels",
                    _fmt(p["control_same_program_two_labels"]),
                    "about 1",
                ]
            )
        rows.append(
            [
                f"pre-pass / plain forward throughput, {p['model']}",
                _fmt(p["plain_over_prepass"]),
                ">= 0.98",
            ]
        )
    h = result.get("host")
    if h:
        r = h["host_us_per_step"]
        rows.append(
            [
                f"pre-pass host time per step, µs (trivial model, {h['rows_per_step']} rows a step)",
                f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})",
                "<= 10",
            ]
        )
    for tr in result["training"]:
        m = tr["model"]
        forms = tr.get("plain_forms")
        if forms:
            rows.append(
                [
                    f"control: plain / plain step, {m}, the same program timed under two labels",
                    _fmt(forms["same_program_two_labels"]),
                    "about 1",
                ]
            )
            rows.append(
                [
                    f"plain step, {m}: `jnp.mean` / unit-weighted objective (the faster is the baseline)",
                    _fmt(forms["mean_over_unit_weights"]),
                    "",
                ]
            )
        rows.append(
            [
                f"weighted / plain step, {m}, batched loss",
                _fmt(tr["train_step"]["batched"]),
                "<= 1.02",
            ]
        )
        if "attach" in tr["train_step"]:
            rows.append(
                [
                    f"weighted / plain step, {m}, batched loss, weights looked up every step (`attach_weights`)",
                    _fmt(tr["train_step"]["attach"]),
                    "",
                ]
            )
        rows.append(
            [
                f"weighted / plain step, {m}, per-example loss (`[None]` form)",
                _fmt(tr["train_step"]["per_example"]),
                "",
            ]
        )
        for key, r in tr["end_to_end"].items():
            form, e = key.split("_")[0], key.split("_")[-2]
            goal = "<= 1.05" if (form == "batched" and e == "10") else ""
            form = "batched" if form == "batched" else "per-example"
            rows.append(
                [
                    f"FLOW end to end / plain fine-tuning, {m}, {e} epochs, {form} loss",
                    _fmt(r),
                    goal,
                ]
            )
    c = result["cache"]
    if "control_same_program_two_labels" in c:
        rows.append(
            [
                "control: no cache / no cache (MLP), the same pass under two labels",
                _fmt(c["control_same_program_two_labels"]),
                "about 1",
            ]
        )
    rows.append(
        [
            "pre-pass with a fresh cache / no cache (MLP)",
            _fmt(c["fresh_over_none"]),
            "<= 1.05",
        ]
    )
    rows.append(
        [
            "pre-pass resumed from a complete cache / no cache (MLP)",
            _fmt(c["resume_over_none"]),
            "<= 0.10",
        ]
    )
    for r in result["chunked_ce"]:
        v = f"{r['V'] // 1024}k"
        rows.append(
            [
                f"chunked CE scratch / plain, V={v}, forward",
                f"{r['fwd_temp_ratio']:.4f}",
                "<= 0.0625",
            ]
        )
        rows.append(
            [
                f"chunked CE scratch / plain, V={v}, forward+backward",
                f"{r['fwd+bwd_temp_ratio']:.4f}",
                "<= 0.0625",
            ]
        )
        for name in ("fwd", "fwd+bwd"):
            if f"{name}_time_ratio" in r:
                what = "forward" if name == "fwd" else "forward+backward"
                rows.append(
                    [
                        f"chunked CE time / plain, V={v}, {what}",
                        _fmt(r[f"{name}_time_ratio"]),
                        "<= 1",
                    ]
                )
    for t in result.get("torch", {}).get("rows", []):  # make bench-torch's torch.json
        ours = {tr["model"]: tr for tr in result["training"]}.get(t["model"])
        if "control_same_program_two_labels" in t:
            rows.append(
                [
                    f"control (PyTorch): its fine-tuning / itself, {t['model']}, the same "
                    "epoch under two labels",
                    _fmt(t["control_same_program_two_labels"]),
                    "about 1",
                ]
            )
        for e in ("3", "10"):
            rows.append(
                [
                    f"PyTorch {result['torch']['torch']}: official-style FLOW loop / its "
                    f"fine-tuning, {t['model']}, {e} epochs",
                    _fmt(t["flow_over_ft"][f"{e}_epochs"]),
                    "",
                ]
            )
            if ours is not None:
                rows.append(
                    [
                        f"flowjax: FLOW / fine-tuning, {t['model']}, {e} epochs (batched, as above)",
                        _fmt(ours["end_to_end"][f"batched_{e}_epochs"]),
                        "<= PyTorch's" if e == "3" else "",
                    ]
                )
    lm = result["lm_prepass"]
    rows.append(
        [
            "LM pre-pass, batched / per-sequence logits_fn throughput",
            _fmt(lm["batched_speedup"]),
            "",
        ]
    )
    table = report.markdown_table(
        ["figure", "median (range over rounds)", "goal"], rows, align="lrr"
    )
    lm_line = (
        f"LM pre-pass: {lm['batched_tokens_per_s']:,} target tokens/s batched, "
        f"{lm['per_sequence_tokens_per_s']:,} per sequence; bucketing pads "
        f"{100 * lm['padding_waste']:.1f} % of the token slots."
    )
    cfg = result["config"]
    head = (
        f"`make bench` on {cfg['cpus']} CPUs ({cfg['backend']}, jax {cfg['jax']}), "
        f"{cfg['seconds']} s, load average {cfg['load_average_1min_at_end']} at the end"
        f"{' (quick sizes)' if cfg['quick'] else ''}. Each ratio is the median over "
        f"{cfg['rounds']} alternated rounds of a side-by-side measurement (each its own "
        f"rounds; a round keeps each side's fastest of {cfg.get('repeats', 1)} calls), with "
        "its range; a control times one program under two labels."
    )
    return f"{head}\n\n{table}\n\n{lm_line}\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per function per round"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (for the tests)"
    )
    args = parser.parse_args(argv)
    q = args.quick
    global _WARMUPS, _REPEATS
    _WARMUPS, _REPEATS = (1, 1) if q else (2, args.repeats)
    t0 = time.perf_counter()
    models = (
        (("mlp", 65536, 20480),) if q else (("mlp", 65536, 20480), ("cnn", 8192, 4096))
    )
    result = {
        "prepass": [
            bench_prepass(m, 256 if q else n, args.rounds)
            for m, n, _ in (models if q else (*models, ("resnet18", 2048, 0)))
        ],
        "training": [
            bench_training(m, 256 if q else n, args.rounds) for m, _, n in models
        ],
        "host": bench_host(16 if q else 1024, args.rounds),
        "cache": bench_cache(512 if q else 65536, args.rounds),
        "chunked_ce": bench_chunked_ce(
            [4096] if q else [32768, 65536, 131072, 262144],
            [4096] if q else [32768, 131072, 262144],
            n_mem=64 if q else 2048,
            n_time=64 if q else 512,
            rounds=min(args.rounds, 3),
        ),
        "lm_prepass": bench_lm(32 if q else 2048, args.rounds),
    }
    torch_json = os.path.join(args.out, "torch.json")
    if os.path.exists(torch_json) and not q:  # from make bench-torch (optional)
        with open(torch_json) as f:
            result["torch"] = json.load(f)
    result["config"] = {
        "quick": q,
        "rounds": args.rounds,
        "repeats": _REPEATS,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.out}/suite.json and suite.md")
    return result


if __name__ == "__main__":
    main()
