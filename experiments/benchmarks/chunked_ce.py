"""Benchmark: memory and speed of ``flowjax.chunked_token_nll`` against plain full-logits cross-entropy.

Command::

    python -m experiments.benchmarks.chunked_ce     # writes results/benchmarks/chunked_ce.json

What it measures: for N tokens with hidden size D (default N=512, D=128)
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
warm-up (compilation excluded). The warm-up outputs of both paths (values, and
gradients w.r.t. ``h`` and ``W``) are checked to agree.

Measured (2-core CPU shared with other jobs, load average 6-9, jax 0.10.2,
2026-11; N=512, D=128, chunk 8192, 3 repeats; memory in MiB, time in ms;
122 s in all; the times are noisy on a loaded machine, the memory is exact)::

    | V      | pass    | plain temp | chunked temp | plain total | chunked total | plain ms | chunked ms |
    |--------|---------|-----------:|-------------:|------------:|--------------:|---------:|-----------:|
    | 32768  | fwd     |       64.0 |         20.0 |        80.3 |          36.3 |    389.8 |      243.0 |
    | 32768  | fwd+bwd |      192.0 |         20.8 |       224.5 |          53.3 |   1017.1 |      644.7 |
    | 65536  | fwd     |      128.0 |         20.0 |       160.3 |          52.3 |    899.3 |      327.4 |
    | 65536  | fwd+bwd |      384.0 |         20.8 |       448.5 |          85.3 |   1836.4 |     1149.0 |
    | 131072 | fwd     |      256.0 |         20.0 |       320.3 |          84.3 |   1211.0 |      432.2 |
    | 131072 | fwd+bwd |      768.0 |         20.8 |       896.5 |         149.3 |   2869.1 |     1425.0 |
    | 262144 | fwd     |      512.0 |         20.0 |       640.3 |         148.3 |   1747.4 |      495.6 |
    | 262144 | fwd+bwd |     1536.0 |         20.8 |      1792.5 |         277.3 |   5533.4 |     4857.5 |

The chunked scratch memory is constant in V, forward and backward (a few
``[N, chunk]`` blocks: 20 MiB here); its total grows only with the inputs and
the ``[D, V]`` gradient of ``W`` that must be returned anyway. The plain
version's scratch is ``[N, V]`` float32 forward (512 MiB at 256k) and three
times that with the backward. On this CPU the chunked version was also
faster (it never writes the ``[N, V]`` logits to memory).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import flowjax
from experiments import report

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


def _compile(fn, *args):
    compiled = fn.lower(*args).compile()
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return compiled, {
        "temp_mib": m.temp_size_in_bytes / _MIB,
        "total_mib": total / _MIB,
    }


def _time(fn, args, repeats: int):
    """Median ms of ``repeats`` calls after one warm-up call, and the warm-up's output."""
    out = jax.block_until_ready(fn(*args))  # warm-up run (already compiled)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), out


def run(n: int, d: int, vocabs: list[int], chunk: int, repeats: int) -> list[dict]:
    rows = []
    for v in vocabs:
        k1, k2, k3 = jax.random.split(jax.random.key(v), 3)
        h = jax.random.normal(k1, (n, d), jnp.float32)
        w = jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)
        y = jax.random.randint(k3, (n,), 0, v)
        fns = {"plain": _make("plain", chunk), "chunked": _make("chunked", chunk)}
        for p, name in enumerate(("fwd", "fwd+bwd")):
            row, outs = {"V": v, "pass": name}, {}
            for kind in ("plain", "chunked"):
                compiled, mem = _compile(fns[kind][p], h, w, y)
                row[f"{kind}_temp_mib"] = round(mem["temp_mib"], 1)
                row[f"{kind}_total_mib"] = round(mem["total_mib"], 1)
                ms, outs[kind] = _time(compiled, (h, w, y), repeats)
                row[f"{kind}_ms"] = round(ms, 1)
            # The two paths must agree (values, and gradients w.r.t. h and W).
            for a, b in zip(
                jax.tree.leaves(outs["chunked"]),
                jax.tree.leaves(outs["plain"]),
                strict=True,
            ):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
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
    return report.markdown_table(
        [
            "V",
            "pass",
            "plain temp",
            "chunked temp",
            "plain total",
            "chunked total",
            "plain ms",
            "chunked ms",
        ],
        [[r["V"], r["pass"], *(f"{r[c]:.1f}" for c in cols)] for r in rows],
        align="llrrrrrr",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/benchmarks/chunked_ce.json")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument(
        "--vocabs", type=int, nargs="+", default=[32768, 65536, 131072, 262144]
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="columns per chunk (default: chunked_token_nll's byte budget; the table "
        "in this docstring used 8192)",
    )
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
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report.write_json(args.out, result)
    print(markdown(rows))
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
