"""Benchmark: memory and speed of ``flowjax.chunked_token_nll`` against plain full-logits cross-entropy.

Command::

    python -m experiments.benchmarks.chunked_ce     # writes results/benchmarks/chunked_ce.json

What it measures: for N tokens with hidden size D (default N=1024, D=256)
and vocabularies of 32k, 64k, 128k and 256k, the summed per-token NLL

* ``plain``: ``log_softmax(h @ W)`` gathered at the targets (builds ``[N, V]``),
* ``chunked``: ``flowjax.chunked_token_nll(h, W, y, chunk_size=8192)``,

each forward only (``fwd``) and forward + gradient w.r.t. ``h`` and ``W``
(``fwd+bwd``). Memory is what XLA plans for the compiled executable
(``jax.jit(f).lower(...).compile().memory_analysis()``): ``temp`` is
``temp_size_in_bytes`` (the scratch buffers: logits, softmax, ...) and
``total`` is argument + output + temp - alias bytes. (On CPU,
``peak_memory_in_bytes`` of jax 0.10 reports only argument + output, so it is
not used.) Time is the median wall time of ``--repeats`` calls after one
warm-up (compilation excluded). Values and gradients of both paths are checked
to agree before timing.

Measured: TO BE FILLED FROM THE RUN::
MiB, ms)::

    | V      | pass    | plain temp | chunked temp | plain total | chunked total | plain ms | chunked ms |
    |--------|---------|-----------:|-------------:|------------:|--------------:|---------:|-----------:|
    | 32768  | fwd     |      128.0 |         64.1 |       161.0 |          97.1 |     62.7 |       94.0 |
    | 32768  | fwd+bwd |      160.3 |        104.3 |       194.3 |         138.3 |    227.5 |      291.3 |
    | 65536  | fwd     |      256.0 |         64.1 |       321.0 |         129.1 |    123.5 |      193.1 |
    | 65536  | fwd+bwd |      320.3 |        168.3 |       386.3 |         234.3 |    476.3 |      555.1 |
    | 131072 | fwd     |      512.0 |         64.1 |       641.0 |         193.1 |    245.4 |      376.8 |
    | 131072 | fwd+bwd |      640.3 |        296.3 |       770.3 |         426.3 |   1006.2 |     1065.6 |
    | 262144 | fwd     |     1024.0 |         64.1 |      1281.0 |         321.1 |    493.7 |      760.0 |
    | 262144 | fwd+bwd |     1280.3 |        552.3 |      1538.3 |         810.3 |   2026.8 |     2110.3 |

The chunked forward's scratch memory is constant in V (one ``[N, chunk]``
block); the backward's grows only with the ``[D, V]`` float32 gradient of
``W`` it must return. The plain version's grows with ``[N, V]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import flowjax

_MIB = 2**20


def _plain(h, w, y):
    z = jnp.einsum("nd,dv->nv", h, w, preferred_element_type=jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1)[:, 0]
    return jnp.sum(nll)


def _make(kind: str, chunk: int):
    if kind == "plain":
        f = _plain
    else:

        def f(h, w, y):
            return jnp.sum(flowjax.chunked_token_nll(h, w, y, chunk_size=chunk))

    fwd = jax.jit(f)
    fwd_bwd = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return fwd, fwd_bwd


def _memory(fn, *args) -> dict:
    m = fn.lower(*args).compile().memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {"temp_mib": m.temp_size_in_bytes / _MIB, "total_mib": total / _MIB}


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(n: int, d: int, vocabs: list[int], chunk: int, repeats: int) -> list[dict]:
    rows = []
    for v in vocabs:
        k1, k2, k3 = jax.random.split(jax.random.key(v), 3)
        h = jax.random.normal(k1, (n, d), jnp.float32)
        w = jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)
        y = jax.random.randint(k3, (n,), 0, v)
        plain, chunked = _make("plain", chunk), _make("chunked", chunk)
        # The two paths must agree before their speed means anything.
        (vp, gp), (vc, gc) = plain[1](h, w, y), chunked[1](h, w, y)
        np.testing.assert_allclose(vc, vp, rtol=1e-5)
        for a, b in zip(gc, gp, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        for p, name in enumerate(("fwd", "fwd+bwd")):
            row = {"V": v, "pass": name}
            for kind, fns in (("plain", plain), ("chunked", chunked)):
                mem = _memory(fns[p], h, w, y)
                row[f"{kind}_temp_mib"] = round(mem["temp_mib"], 1)
                row[f"{kind}_total_mib"] = round(mem["total_mib"], 1)
                row[f"{kind}_ms"] = round(_time(fns[p], (h, w, y), repeats), 1)
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [
        "plain_temp_mib",
        "chunked_temp_mib",
        "plain_total_mib",
        "chunked_total_mib",
        "plain_ms",
        "chunked_ms",
    ]
    head = "| V | pass | plain temp | chunked temp | plain total | chunked total | plain ms | chunked ms |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['V']} | {r['pass']} | "
            + " | ".join(f"{r[c]:.1f}" for c in cols)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/benchmarks/chunked_ce.json")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--vocabs", type=int, nargs="+", default=[32768, 65536, 131072, 262144]
    )
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.tokens, args.hidden, args.vocabs, args.chunk, args.repeats)
    result = {
        "config": {
            "tokens": args.tokens,
            "hidden": args.hidden,
            "chunk": args.chunk,
            "repeats": args.repeats,
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(rows))
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
