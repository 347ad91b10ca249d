"""One FLOW fine-tuning run with flowjax.fit in a fresh process, checkpointing into OUT/ckpt.

Used by tests/test_train_kill.py:

    python tests/_train_worker.py OUT [--devices N] [--model plain|lora] [--steps S]
        [--kill-at K --kill-in data|step|eval] [--shard-params] [--compile-cache DIR]

``--kill-at K`` SIGKILLs the process itself when batch K (0-based) is fetched
(``data``), inside the K-th step (``step``: before its metrics are written)
or inside the evaluation after step K (``eval``). Started again with the same
OUT and the other arguments it resumes from the latest checkpoint in OUT/ckpt.
At the end it writes OUT/params.npz (the final state's leaves) beside
OUT/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runtime

BATCH = 16
CHECKPOINT_EVERY = 4
EVAL_EVERY = 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    _runtime.add_arguments(ap)
    ap.add_argument("--model", choices=["plain", "lora"], default="plain")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--kill-in", choices=["data", "step", "eval"], default="data")
    ap.add_argument(
        "--shard-params",
        action="store_true",
        help="shard up.kernel's columns over 'data'",
    )
    ap.add_argument("--compile-cache", default=None, help="JAX's persistent cache dir")
    args = ap.parse_args()
    _runtime.start(args)
    if args.compile_cache:  # the runs of one test share compiled programs
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    import _data
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import flowjax

    assert len(jax.devices()) == args.devices, jax.devices()

    def kill(where: str, k: int) -> None:
        if args.kill_in == where and k == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    data = _data.dataset()
    held_out = _data.dataset(64, seed=7)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(_data.DIM, 16, rngs=rngs)
            self.down = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.tanh(self.up(x)))[..., 0]

    pretrained = MLP(nnx.Rngs(0))
    if args.model == "lora":
        model = flowjax.add_lora(pretrained, 2, rngs=nnx.Rngs(1))
        tx = flowjax.train_only(optax.adam(2e-2), nnx.LoRAParam)
    else:
        model = pretrained
        tx = optax.chain(flowjax.l2sp(1e-2), optax.adam(1e-2))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p, ex, key):
        noise = 0.01 * jax.random.normal(key, ())  # the step's key: resumed exactly
        return (nnx.merge(graphdef, p)(ex["x"]) - ex["y"] + noise) ** 2

    # FLOW: weights from the pre-trained model's losses (the pre-pass), attached by id.
    pre_graph, pre_params = nnx.split(pretrained, nnx.Param)
    table = flowjax.per_example_losses(
        lambda p, ex: (nnx.merge(pre_graph, p)(ex["x"]) - ex["y"]) ** 2,
        pre_params,
        flowjax.batches(data, 64, shard=(0, 1)),
        progress=False,
    )
    weights = table.flow_weights()

    def jitter(example, rng):  # per-example randomness from (seed, epoch, id)
        return {**example, "x": example["x"] + rng.normal(scale=0.01, size=_data.DIM)}

    stream = flowjax.batches(
        data,
        BATCH,
        shuffle=True,
        seed=3,
        epochs=None,
        drop_remainder=True,
        map_fn=jitter,
        shard=(0, 1),
    )

    def batches_from(start):
        for k, batch in enumerate(stream.from_batch(start), start):
            kill("data", k)
            batch = flowjax.attach_weights(batch, weights)
            yield {**batch, "x": batch["x"].astype(np.float32)}

    objective = flowjax.weighted_objective(loss_fn, return_metrics=True)
    mesh = flowjax.default_mesh() if args.devices > 1 else None
    step = flowjax.make_train_step(
        objective, tx, anchor=params, pass_rng=True, mesh=mesh
    )

    def killing_step(state, batch):
        kill("step", int(state.step))
        return step(state, batch)

    @jax.jit
    def held_out_loss(p):
        pred = nnx.merge(graphdef, p)(held_out["x"])
        return jnp.mean((pred - held_out["y"]) ** 2)

    def eval_fn(state):
        kill("eval", int(state.step))
        return {"eval/loss": held_out_loss(state.params)}

    shardings = None
    if args.shard_params:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        columns = NamedSharding(mesh, P(None, "data"))
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
        shardings["up"]["kernel"] = columns
    state = flowjax.init_train_state(
        params, tx, rng=11, mesh=mesh, param_shardings=shardings
    )
    result = flowjax.fit(
        killing_step,
        state,
        batches_from,
        num_steps=args.steps,
        eval_fn=eval_fn,
        eval_every=EVAL_EVERY,
        metrics_path=os.path.join(args.out, "metrics.jsonl"),
        checkpoint_dir=os.path.join(args.out, "ckpt"),
        checkpoint_every=CHECKPOINT_EVERY,
        keep=2,
        progress=False,
    )
    if args.shard_params:  # the step kept the user's shardings
        kernel = result.state.params["up"]["kernel"][...]
        assert kernel.sharding == columns, kernel.sharding
        assert kernel.addressable_shards[0].data.shape == (_data.DIM, 16 // 8)
    leaves = jax.tree.leaves(result.state)
    np.savez(os.path.join(args.out, "params.npz"), *[np.asarray(x) for x in leaves])
    print(f"done: {int(result.state.step)} steps", flush=True)


if __name__ == "__main__":
    main()
