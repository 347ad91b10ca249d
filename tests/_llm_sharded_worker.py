"""8 fake CPU devices: load the fixture checkpoints sharded and check logits and placements.

Run by tests/test_models_llm.py in a fresh process; exits non-zero on a mismatch.
"""

import os
import sys

if __name__ != "__main__":  # a subprocess worker, never imported by the test session
    raise ImportError("tests/_llm_sharded_worker.py runs as a script only")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import flowjax.models

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llm")

assert jax.device_count() == 8, jax.devices()
for name, shape in (("llama3", (4, 2)), ("gemma2", (2, 4))):
    mesh = jax.make_mesh(
        shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    lm = flowjax.models.load_causal_lm(os.path.join(FIX, name), mesh=mesh)
    e = np.load(os.path.join(FIX, f"{name}_expected.npz"))
    q = lm.layers[0].self_attn.q_proj.kernel[...]
    o = lm.layers[0].mlp.down_proj.kernel[...]
    emb = lm.embed_tokens.embedding[...]
    assert q.sharding.spec == P("data", "model"), q.sharding
    assert o.sharding.spec == P("model", "data"), o.sharding
    assert emb.sharding.spec == P("model", "data"), emb.sharding
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (
        q.shape[0] // shape[0],
        q.shape[1] // shape[1],
    )
    graphdef, state = nnx.split(lm)
    z = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))(state, e["ids"])
    scale = np.abs(e["logits"]).max()
    err = np.abs(np.asarray(z) - e["logits"]).max() / scale
    print(name, err)
    if not err < 1e-4:
        sys.exit(f"{name}: sharded logits differ by {err}")
    # the shardings survive the forward (params untouched by jit)
    assert nnx.split(lm)[1]["embed_tokens"]["embedding"][...].sharding.spec == P(
        "model", "data"
    )
print("ok")
