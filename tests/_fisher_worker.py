"""Computes diagonal Fishers in a fresh process (own device count) and saves them; also the shared model.

python tests/_fisher_worker.py OUT.npz [--devices N] [--batch-size B] [--shard-params]
    [--num-processes P --process-id I --port PORT]

With two processes (jax.distributed on loopback, gloo collectives) each process feeds
its own, unevenly sized share of the data set. (The two-process bad-input cases of
diagonal_fisher run with the pre-pass's in tests/_prepass_worker.py --scenarios.)
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

N, DIM, CLASSES = 203, 3, 8  # 203 is prime: every batch size leaves a ragged last batch


def dataset(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "id": (np.arange(n, dtype=np.int64) * 7_919 + 5_000_000_000)[
            rng.permutation(n)
        ],
        "x": rng.normal(size=(n, DIM)).astype(np.float32),
        "label": rng.integers(0, CLASSES, size=n).astype(np.int32),
    }


def params(seed: int = 1) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        "W": jnp.asarray(rng.normal(size=(CLASSES, DIM)), jnp.float32),
        "b": jnp.asarray(0.5 * rng.normal(size=(CLASSES,)), jnp.float32),
    }


def logits(p, ex):
    """Softmax regression on ONE example."""
    return p["W"] @ ex["x"] + p["b"]


def nll(p, ex):
    return -jax.nn.log_softmax(logits(p, ex))[ex["label"]]


def batches(data, batch_size: int, order=None):
    order = np.arange(len(data["id"])) if order is None else np.asarray(order)
    for s in range(0, len(order), batch_size):
        j = order[s : s + batch_size]
        yield {k: v[j] for k, v in data.items()}


def share(data, process: int, nproc: int) -> dict[str, np.ndarray]:
    """This process's part of ``data``: 3/5 of it on process 0 and 2/5 on process 1."""
    n = len(data["id"])
    cut = [0, n * 3 // 5, n] if nproc == 2 else [0, n]
    return {k: v[cut[process] : cut[process + 1]] for k, v in data.items()}


def fishers(
    batch_size: int = 16, mesh=None, shardings=None, process: int = 0, nproc: int = 1
) -> dict[str, np.ndarray]:
    """Empirical and sampled Fishers of the shared model, each process feeding its share shuffled."""
    import flowjax

    data = share(dataset(), process, nproc)
    order = np.random.default_rng(7 + process).permutation(len(data["id"]))
    out = {}
    for kind, fn, rng in (
        ("empirical", nll, None),
        ("sampled", logits, jax.random.key(5)),
    ):
        f = flowjax.diagonal_fisher(
            fn,
            params(),
            batches(data, batch_size, order),
            kind=kind,
            rng=rng,
            mesh=mesh,
            param_shardings=shardings,
            progress=False,
        )
        if shardings is not None:
            assert f["W"].sharding == shardings["W"], f["W"].sharding
        out.update({f"{kind}/{k}": np.asarray(v) for k, v in f.items()})
    return out


def check_regularizer_shardings(flowjax, shardings) -> None:
    """Every regulariser's state, and a jitted update, keep the parameters' sharding."""
    p = jax.device_put(params(), shardings)
    fisher = jax.tree.map(jnp.ones_like, p)
    for tx in (
        flowjax.l2sp(0.1),
        flowjax.ewc(0.1, fisher),
        flowjax.synaptic_intelligence(0.1),
    ):
        state = tx.init(p)
        updates, state = jax.jit(tx.update)(p, state, p)
        for tree in (*(f for f in state if isinstance(f, dict)), updates):
            for k in p:
                leaf = tree[k]
                assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim), (
                    tx,
                    k,
                    leaf.sharding,
                )


def main() -> None:
    import _runtime  # run as a script: tests/ is on sys.path

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--shard-params", action="store_true", help="shard W's rows over 'data'"
    )
    _runtime.add_arguments(ap)
    args = ap.parse_args()
    _runtime.start(args)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import flowjax

    assert len(jax.devices()) == args.devices * args.num_processes, jax.devices()
    mesh = flowjax.default_mesh()
    shardings = None
    if args.shard_params:
        shardings = {
            "W": NamedSharding(mesh, P("data", None)),
            "b": NamedSharding(mesh, P("data")),
        }
    out = fishers(args.batch_size, mesh, shardings, args.process_id, args.num_processes)
    if shardings is not None:
        check_regularizer_shardings(flowjax, shardings)
    np.savez(args.out, **out)
    print(
        f"fisher on {len(jax.devices())} devices in {jax.process_count()} processes",
        flush=True,
    )


if __name__ == "__main__":
    main()
