"""Runs one pre-pass in a fresh process (own device count / jax.distributed) and saves its table.

Used by the multi-device, multi-process and kill-and-resume tests:

    python tests/_prepass_worker.py OUT.npz [--devices N] [--process-id I --num-processes P --port PORT]
        [--batch-size B] [--cache DIR] [--kill-after K] [--shard-params] [--nudge-w1-column C]
        [--scenarios]

``--scenarios`` (two processes) runs instead every bad-input case of :data:`SCENARIOS`
in one jax.distributed run, one after the other: one process gets the bad input, and
each case must raise a ValueError on every process, promptly. Each prints one JSON
line ``{"scenario", "error", "seconds"}``; the test compares the two processes' lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import tempfile
import time

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
    ap.add_argument(
        "--scenarios", action="store_true", help="run the bad-input cases instead"
    )
    ap.add_argument(
        "--batched", action="store_true", help="the batched loss (_data.batch_loss)"
    )
    args = ap.parse_args()

    _runtime.start(args)
    if args.scenarios:
        run_scenarios(args.process_id)
        return
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
        _data.batch_loss if args.batched else _data.loss_fn,
        params,
        feed(),
        batched=args.batched,
        progress=False,
        cache_dir=args.cache,
        flush_seconds=0.0,  # write every finished step: the kill test needs a cache
        step_size=args.batch_size,  # a step per batch: the kill lands between read steps
        mesh=mesh,
        param_shardings=shardings,
    )
    table.save(args.out)
    print(
        f"process {args.process_id}: {len(table)} examples on {len(jax.devices())} devices"
    )


# name -> which process gets the bad input (for the test's expectations).
SCENARIOS = {
    "empty": 1,  # process 1 passes no batches at all
    "first batch without id": 1,
    "later batch with wrong shape": 1,
    "later batch with wrong dtype": 0,
    "nan loss": 1,
    "batched loss couples rows": 1,  # the same error everywhere, from replicated data
    "id on both processes": 1,
    "endless loader": 0,  # itertools.cycle over its batches
    "loader raises": 1,  # an OSError after two batches
    "lm malformed example": 1,
    "lm id on both processes": 1,  # in different buckets
    "cache_dir not writable": 1,  # a path below a file
    "cache_dir of another pre-pass": 1,
    "fisher empty": 1,
    "fisher later batch with missing rows": 1,
}


def run_scenarios(process: int) -> None:
    import _data
    import _fisher_worker
    import _lm_data
    import numpy as np

    import flowjax

    data = _data.dataset()
    cut = len(data["id"]) * 3 // 5
    part = {k: v[:cut] if process == 0 else v[cut:] for k, v in data.items()}
    other = {k: v[cut:] if process == 0 else v[:cut] for k, v in data.items()}

    def feed(d=part):
        return list(_data.batches(d, 16))

    def prepass(batches):
        return flowjax.per_example_losses(  # a step per batch, as the scenarios count
            _data.loss_fn, _data.params(), batches, progress=False, step_size=16
        )

    def cached(cache_dir, loss_fn=_data.loss_fn):
        return flowjax.per_example_losses(
            loss_fn,
            _data.params(),
            feed(),
            progress=False,
            cache_dir=cache_dir,
            step_size=16,
        )

    def bad_batch(k, **fields):
        batches = feed()
        batches[k] = {**batches[k], **fields}
        return batches

    def lm(examples):
        return flowjax.lm_token_losses(
            _lm_data.LM(),
            _lm_data.params(),
            examples,
            bucket_lengths=_lm_data.BUCKETS,
            batch_size=3,
            progress=False,
        )

    lm_mine = _lm_data.split(_lm_data.examples(), process, 2)
    lm_theirs = _lm_data.split(_lm_data.examples(), 1 - process, 2)
    fisher_data = _fisher_worker.share(_fisher_worker.dataset(), process, 2)

    def fisher(batches):
        return flowjax.diagonal_fisher(
            _fisher_worker.nll, _fisher_worker.params(), batches, progress=False
        )

    def case(name):  # what this process passes in scenario `name`
        bad = SCENARIOS[name] == process
        if name == "empty":
            return prepass([] if bad else feed())
        if name == "first batch without id":
            batches = feed()
            batches[0] = {k: v for k, v in batches[0].items() if k != "id"}
            return prepass(batches if bad else feed())
        if name == "later batch with wrong shape":
            x = np.ones((16, _data.DIM + 1), np.float32)
            return prepass(bad_batch(3, x=x) if bad else feed())
        if name == "later batch with wrong dtype":
            return prepass(
                bad_batch(2, x=np.ones((16, _data.DIM), np.int32)) if bad else feed()
            )
        if name == "batched loss couples rows":
            return flowjax.per_example_losses(
                _data.coupled_batch_loss,
                _data.params(),
                feed(),
                batched=True,
                progress=False,
                step_size=16,
            )
        if name == "nan loss":
            x = part["x"].copy()
            x[40] = np.nan
            return prepass(feed({**part, "x": x}) if bad else feed())
        if name == "id on both processes":
            ids = part["id"].copy()
            ids[30] = other["id"][10]
            return prepass(feed({**part, "id": ids}) if bad else feed())
        if name == "endless loader":
            return prepass(itertools.cycle(feed()) if bad else feed())
        if name == "loader raises":

            def broken():
                yield from feed()[:2]
                raise OSError("disk on fire")

            return prepass(broken() if bad else feed())
        if name == "lm malformed example":
            broken = {**lm_mine[4], "mask": lm_mine[4]["mask"][:-1]}
            return lm([*lm_mine[:4], broken, *lm_mine[5:]] if bad else lm_mine)
        if name == "lm id on both processes":
            if not bad:
                return lm(lm_mine)
            # the id of a long example of process 0 on a short example of process 1
            long = next(e for e in lm_theirs if len(e["tokens"]) > 12)
            short = next(k for k, e in enumerate(lm_mine) if len(e["tokens"]) <= 6)
            mine = [dict(e) for e in lm_mine]
            mine[short]["id"] = long["id"]
            return lm(mine)
        if name == "cache_dir not writable":
            blocker = os.path.join(tempfile.mkdtemp(), "a-file")
            open(blocker, "w").close()
            return cached(os.path.join(blocker, "cache") if bad else tempfile.mkdtemp())
        if name == "cache_dir of another pre-pass":
            # Both processes first fill a cache with another loss; then process 1 resumes
            # into its cache with the real loss (a mismatch only it can see), process 0
            # starts a new one.
            old = tempfile.mkdtemp()
            cached(old, lambda p, ex: 2.0 * _data.loss_fn(p, ex))
            return cached(old if bad else tempfile.mkdtemp())
        if name == "fisher empty":
            return fisher([] if bad else _fisher_worker.batches(fisher_data, 16))
        if name == "fisher later batch with missing rows":
            batches = list(_fisher_worker.batches(fisher_data, 16))
            if bad:
                batches[2] = {
                    k: v[:-1] if k == "x" else v for k, v in batches[2].items()
                }
            return fisher(batches)
        raise AssertionError(name)

    for name in SCENARIOS:
        start = time.monotonic()
        try:
            case(name)
            error = None
        except ValueError as e:
            error = str(e)
        seconds = time.monotonic() - start
        print(
            json.dumps({"scenario": name, "error": error, "seconds": seconds}),
            flush=True,
        )


if __name__ == "__main__":
    main()
