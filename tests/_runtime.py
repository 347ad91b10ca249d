"""The JAX runtime of a test worker process: its CPU device count and, optionally, jax.distributed.

Every worker (tests/_prepass_worker.py, _fisher_worker.py, _lm_prepass_worker.py)
takes the same options and starts its runtime the same way, before any JAX
computation: ``--devices N`` fake CPU devices, and with ``--num-processes P > 1``
a ``jax.distributed`` run on loopback (gloo collectives) as process
``--process-id`` of P, coordinated on ``--port``.
"""

from __future__ import annotations

import argparse


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)


def start(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"localhost:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
