"""Runs flowjax.lm_token_losses and flowjax.lm_sequence_losses in a fresh process (own
device count / jax.distributed).

    python tests/_lm_prepass_worker.py OUT.npz [--devices N] [--batch-size B]
        [--process-id I --num-processes P --port PORT] [--cache DIR]

Saves the token table's ``ids``, ``losses``, ``mask`` and ``traces`` (how often the
model was traced), and the sequence table's ``seq_ids``, ``seq_losses``, ``seq_traces``.
With ``--cache`` (token pass in DIR/token, sequence pass in DIR/sequence), runs each
twice: the second run resumes from the first's cache after process 1 (if any) deleted
its last chunk of every bucket; it saves ``resumed_*`` and ``resumed_seq_*`` too.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    _runtime.add_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()

    _runtime.start(args)
    import _lm_data
    import jax
    import numpy as np

    import flowjax

    assert len(jax.devices()) == args.devices * args.num_processes, jax.devices()
    mine = _lm_data.split(_lm_data.examples(), args.process_id, args.num_processes)
    passes = {
        "token": (flowjax.lm_token_losses, _lm_data.LM()),
        "sequence": (flowjax.lm_sequence_losses, _lm_data.LM()),
    }

    def run(level, examples):
        fn, lm = passes[level]
        return fn(
            lm,
            _lm_data.params(),
            examples[::-1],  # another order than the reference's
            bucket_lengths=_lm_data.BUCKETS,
            batch_size=args.batch_size,
            progress=False,
            cache_dir=args.cache and os.path.join(args.cache, level),
            flush_seconds=0.0,  # a chunk per finished step
        )

    tl, seq = run("token", mine), run("sequence", mine)
    out = {"ids": tl.ids, "losses": tl.losses, "mask": tl.mask}
    out |= {"seq_ids": seq.ids, "seq_losses": seq.losses}
    out |= {"traces": passes["token"][1].traces}
    out |= {"seq_traces": passes["sequence"][1].traces}
    if args.cache:
        for level, prefix in [("token", "resumed_"), ("sequence", "resumed_seq_")]:
            # Process 1 loses its last chunk of every bucket; process 0 serves all from its cache.
            lost = []
            for b in _lm_data.BUCKETS if args.process_id == 1 else ():
                own = f"bucket_{b}/process-00001-of-{args.num_processes:05d}"
                pattern = os.path.join(args.cache, level, own, "chunk-*")
                for c in sorted(glob.glob(pattern))[-1:]:
                    lost += np.load(c)["ids"].tolist()
                    os.remove(c)
            assert bool(lost) == (args.process_id == 1)
            again = run(level, mine)
            out |= {f"{prefix}ids": again.ids, f"{prefix}losses": again.losses}
            if level == "token":
                out |= {"resumed_mask": again.mask}
    np.savez(args.out, **out)
    print(f"process {args.process_id}: {len(tl.ids)} examples, {out['traces']} traces")


if __name__ == "__main__":
    main()
