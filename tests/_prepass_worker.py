"""Runs one pre-pass in a fresh process (own device count / jax.distributed) and saves its table.

Used by the multi-device, multi-process and kill-and-resume tests:

    python tests/_prepass_worker.py OUT.npz [--devices N] [--process-id I --num-processes P --port PORT]
        [--batch-size B] [--cache DIR] [--kill-after K] [--shard-params] [--nudge-w1-column C]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    _runtime.add_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", default=None)
    ap.add_argument(
        "--kill-after",
        type=int,
        default=-1,
        help="SIGKILL itself after yielding K batches",
    )
    ap.add_argument(
        "--model-axis",
        type=int,
        default=1,
        help="mesh ('data', 'model') with this many model devices",
    )
    ap.add_argument(
        "--shard-params", action="store_true", help="shard w1's columns over 'data'"
    )
    ap.add_argument(
        "--nudge-w1-column",
        type=int,
        default=None,
        help="add 1e-6 to w1[0, COLUMN] (cache fingerprint tests)",
    )
    args = ap.parse_args()

    _runtime.start(args)
    import _data
    import jax
    import numpy as np

    import flowjax

    assert len(jax.devices()) == args.devices * args.num_processes, jax.devices()

    data = _data.dataset()
    # Each process feeds its own, unevenly sized share, in its own shuffled order.
    n = len(data["id"])
    cut = [0, n * 3 // 5, n] if args.num_processes == 2 else [0, n]
    part = {
        k: v[cut[args.process_id] : cut[args.process_id + 1]] for k, v in data.items()
    }
    order = np.random.default_rng(10 + args.process_id).permutation(len(part["id"]))

    def feed():
        for k, batch in enumerate(_data.batches(part, args.batch_size, order)):
            if k == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    mesh = None
    if args.model_axis > 1:
        devices = np.asarray(jax.devices()).reshape(-1, args.model_axis)
        mesh = jax.sharding.Mesh(devices, ("data", "model"))
    shardings = None
    if args.shard_params:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = mesh or flowjax.default_mesh()
        shardings = {
            "w1": NamedSharding(mesh, P(None, "data")),
            "b1": NamedSharding(mesh, P("data")),
            "w2": NamedSharding(mesh, P()),
        }
    params = _data.params()
    if args.nudge_w1_column is not None:
        params["w1"] = params["w1"].at[0, args.nudge_w1_column].add(1e-6)
    table = flowjax.per_example_losses(
        _data.loss_fn,
        params,
        feed(),
        progress=False,
        cache_dir=args.cache,
        flush_seconds=0.0,  # write every finished step: the kill test needs a cache
        mesh=mesh,
        param_shardings=shardings,
    )
    table.save(args.out)
    print(
        f"process {args.process_id}: {len(table)} examples on {len(jax.devices())} devices"
    )


if __name__ == "__main__":
    main()
