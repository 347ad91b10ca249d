"""Bottleneck adapters: exact start, the maths against numpy, frozen base, removal, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax


class Block(nnx.Module):
    def __init__(self, d, rngs, dtype=jnp.float32):
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": dtype}
        self.o_proj = nnx.Linear(d, d, **kw)
        self.up_proj = nnx.Linear(d, 2 * d, **kw)
        self.down_proj = nnx.Linear(2 * d, d, **kw)

    def __call__(self, x):
        x = x + self.o_proj(x)
        return x + self.down_proj(nnx.relu(self.up_proj(x)))


class Net(nnx.Module):
    def __init__(self, rngs, d=4, classes=3):
        self.layers = nnx.List([Block(d, rngs), Block(d, rngs)])
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


HOULSBY = nnx.Any(nnx.PathContains("o_proj"), nnx.PathContains("down_proj"))


def _x(n=6, d=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), jnp.float32)


def _adapted_paths(model):
    return {
        p for p, m in nnx.iter_modules(model) if isinstance(m, flowjax.AdaptedLayer)
    }


def test_init_equals_the_base_bit_for_bit_and_the_base_is_untouched():
    base = Net(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(base))
    model = flowjax.add_adapters(base, 2, rngs=nnx.Rngs(1), select=HOULSBY)
    assert _adapted_paths(model) == {
        ("layers", i, n) for i in (0, 1) for n in ("o_proj", "down_proj")
    }
    x = _x()
    np.testing.assert_array_equal(model(x), base(x))
    after = jax.tree.map(np.asarray, nnx.state(base))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert not _adapted_paths(base)


def test_default_selects_every_linear():
    model = flowjax.add_adapters(Net(nnx.Rngs(0)), 3, rngs=nnx.Rngs(1))
    assert len(_adapted_paths(model)) == 7


def test_adapter_matches_numpy_after_setting_its_weights():
    lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    model = flowjax.add_adapters(lin, 3, rngs=nnx.Rngs(1), activation=nnx.relu)
    rng = np.random.default_rng(5)
    a = model.adapter
    vals = {
        "down_kernel": rng.normal(size=(4, 3)),
        "down_bias": rng.normal(size=3),
        "up_kernel": rng.normal(size=(3, 4)),
        "up_bias": rng.normal(size=4),
    }
    for k, v in vals.items():
        getattr(a, k)[...] = jnp.asarray(v, jnp.float32)
    x = np.asarray(_x())
    w, b = (
        np.asarray(lin.kernel[...], np.float64),
        np.asarray(lin.bias[...], np.float64),
    )
    h = x @ w + b
    want = (
        h
        + np.maximum(h @ vals["down_kernel"] + vals["down_bias"], 0) @ vals["up_kernel"]
        + vals["up_bias"]
    )
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)


def test_training_only_adapters_leaves_every_base_parameter_bitwise_unchanged():
    base = Net(nnx.Rngs(0))
    model = flowjax.add_adapters(base, 2, rngs=nnx.Rngs(1), select=HOULSBY)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = flowjax.train_only(optax.adam(1e-2), flowjax.AdapterParam)
    state = tx.init(params)
    x, y = _x(16), jnp.asarray(np.arange(16) % 3)
    weights = jnp.linspace(0.5, 1.5, 16)  # FLOW-style per-example weights

    @jax.jit
    def step(params, state):
        def loss(p):
            z = nnx.merge(graphdef, p)(x)
            ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
            return flowjax.weighted_loss(ce, weights)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    start = jax.tree.map(np.asarray, params)
    losses = []
    for _ in range(10):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    trained = nnx.merge(graphdef, params)
    moved = 0
    for (path, v0), (path1, v1) in zip(
        nnx.to_flat_state(start), nnx.to_flat_state(params), strict=True
    ):
        assert path == path1
        if isinstance(v1, flowjax.AdapterParam):
            moved += int(not np.array_equal(v0.get_value(), v1.get_value()))
        else:
            np.testing.assert_array_equal(
                v0.get_value(), v1.get_value(), err_msg=str(path)
            )
    assert moved > 0
    # Removing the adapters gives back the base model exactly.
    removed = flowjax.remove_adapters(trained)
    assert type(removed.layers[0].o_proj) is nnx.Linear
    assert len(nnx.state(removed, flowjax.AdapterParam)) == 0
    np.testing.assert_array_equal(removed(_x()), base(_x()))
    assert not np.array_equal(trained(_x()), base(_x()))


def test_param_dtype_follows_the_kernel_or_is_given():
    model = flowjax.add_adapters(
        Block(4, nnx.Rngs(0), dtype=jnp.bfloat16), 2, rngs=nnx.Rngs(1)
    )
    assert model.o_proj.adapter.up_kernel.get_value().dtype == jnp.bfloat16
    model = flowjax.add_adapters(
        Block(4, nnx.Rngs(0), dtype=jnp.bfloat16),
        2,
        rngs=nnx.Rngs(1),
        param_dtype=jnp.float32,
    )
    assert model.o_proj.adapter.up_kernel.get_value().dtype == jnp.float32
    out = model(_x().astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


def test_errors():
    net = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="bottleneck"):
        flowjax.add_adapters(net, 0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="matches no layer"):
        flowjax.add_adapters(net, 2, rngs=nnx.Rngs(1), select=nnx.PathContains("nope"))
    with pytest.raises(TypeError, match=r"\('layers', 0\).*out_features"):
        flowjax.add_adapters(
            net,
            2,
            rngs=nnx.Rngs(1),
            select=lambda p, m: p == ("layers", 0),
        )
    with pytest.raises(ValueError, match="inside it"):
        flowjax.add_adapters(
            nnx.Sequential(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))),
            2,
            rngs=nnx.Rngs(1),
            select=lambda p, m: isinstance(m, (nnx.Linear, nnx.Sequential)) and p != (),
        )
    with pytest.raises(ValueError, match=r"no flowjax\.AdaptedLayer"):
        flowjax.remove_adapters(net)
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        flowjax.add_adapters({"w": jnp.ones(2)}, 2, rngs=nnx.Rngs(1))


def test_tied_layers_are_refused():
    class Tied(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
            self.b = self.a

    with pytest.raises(ValueError, match="tied"):
        flowjax.add_adapters(Tied(), 2, rngs=nnx.Rngs(1), select=nnx.PathContains("a"))


def test_remove_adapters_refuses_a_standalone_adapter():
    class Mixed(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
            self.extra = flowjax.Adapter(3, 2, rngs=nnx.Rngs(1))

    model = flowjax.add_adapters(
        Mixed(), 2, rngs=nnx.Rngs(2), select=nnx.PathContains("lin")
    )
    with pytest.raises(ValueError, match=r"standalone flowjax\.Adapter.*\('extra',\)"):
        flowjax.remove_adapters(model)
