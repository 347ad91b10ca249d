"""Runs every battery method on 8 fake CPU devices with sharded parameters; own process.

python tests/_methods_worker.py OUT.npz [--steps K]

For each method: θ₀ with w1's columns sharded over 'data' and the rest
replicated, the batch sharded over 'data', K jitted steps. Saves the final
parameters (``<method>/<leaf>``) and, per method, whether every parameter kept
its input sharding and every state array lives on all 8 devices.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _methods
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import flowjax

    assert len(jax.devices()) == 8, jax.devices()
    mesh = flowjax.default_mesh()
    specs = {"w1": PartitionSpec(None, "data")}

    def place(p):
        return {
            k: jax.device_put(v, NamedSharding(mesh, specs.get(k, PartitionSpec())))
            for k, v in p.items()
        }

    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    rep = NamedSharding(mesh, PartitionSpec())
    out = {}
    for method in _methods.METHODS:
        theta0 = place(_methods.params())
        objective, tx, frozen, start = method.build(method.strength, theta0)
        # New arrays (LoRA factors) are replicated; θ₀'s leaves keep their sharding.
        start = jax.tree.map(
            lambda a: a if len(a.sharding.device_set) == 8 else jax.device_put(a, rep),
            start,
        )
        step = jax.jit(_methods.make_step(objective, tx))
        b = _methods.batch()
        if method.data is not None:
            b = method.data(method.strength, b)
        b = {k: jax.device_put(v, data_sharding) for k, v in b.items()}
        p, state = start, tx.init(start)
        for _ in range(args.steps):
            p, state, _ = step(p, state, frozen, b)
        kept = all(
            jax.tree.leaves(
                jax.tree.map(
                    lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim),
                    p,
                    start,
                )
            )
        )
        on_all = all(
            len(leaf.sharding.device_set) == 8
            for leaf in jax.tree.leaves(state)
            if isinstance(leaf, jax.Array)
        )
        out[f"{method.name}/sharding_kept"] = np.array(kept)
        out[f"{method.name}/state_on_all_devices"] = np.array(on_all)
        for k, v in _methods.leaves(p).items():
            out[f"{method.name}/{k}"] = np.asarray(v)
    np.savez(args.out, **out)
