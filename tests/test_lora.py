"""add_lora / merge_lora: Flax NNX's own LoRA layers, exact start, exact merge, FLOW + LoRA."""

from __future__ import annotations

import chex
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
        self.q_proj = nnx.Linear(d, d, **kw)
        self.up_proj = nnx.Linear(d, 2 * d, use_bias=False, **kw)
        self.down_proj = nnx.Linear(2 * d, d, **kw)

    def __call__(self, x):
        x = x + self.q_proj(x)
        return x + self.down_proj(nnx.relu(self.up_proj(x)))


class Net(nnx.Module):
    def __init__(self, rngs, d=4, classes=3, dtype=jnp.float32):
        self.layers = nnx.List([Block(d, rngs, dtype), Block(d, rngs, dtype)])
        self.head = nnx.Linear(d, classes, rngs=rngs, dtype=dtype, param_dtype=dtype)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


ALL_LINEARS = {
    ("head",),
    *((("layers", i, n)) for i in (0, 1) for n in ("q_proj", "up_proj", "down_proj")),
}


def _lora_paths(model):
    return {p for p, m in nnx.iter_modules(model) if isinstance(m, nnx.LoRALinear)}


def _x(n=6, d=4, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), dtype)


def _bf16_net():
    """A Net computing and storing in bf16 (built in f32 and cast: eager bf16 init is slow)."""
    net = Net(nnx.Rngs(0))
    for _, m in nnx.iter_modules(net):
        if isinstance(m, nnx.Linear):
            m.dtype = m.param_dtype = jnp.bfloat16
    nnx.update(
        net, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(net, nnx.Param))
    )
    return net


def _forward(model, x, variant):
    graphdef, state = nnx.split(model)
    return variant(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def test_add_lora_starts_exactly_at_the_base_model(variant):
    base = Net(nnx.Rngs(0))
    x = _x()
    model = flowjax.add_lora(base, 3, rngs=nnx.Rngs(1))
    assert _lora_paths(model) == ALL_LINEARS
    # nnx.LoRA initialises B = 0 and A randomly (he_uniform): the adapter adds an exact 0.
    lora = model.layers[0].q_proj.lora
    assert lora.lora_a.shape == (4, 3) and lora.lora_b.shape == (3, 4)
    assert np.all(np.asarray(lora.lora_b[...]) == 0) and np.any(
        np.asarray(lora.lora_a[...]) != 0
    )
    np.testing.assert_array_equal(
        _forward(model, x, variant), _forward(base, x, variant)
    )
    # Base kernels and biases are copied exactly; the input model is left untouched.
    for path in ALL_LINEARS:
        old, new = base, model
        for k in path:
            old, new = (
                (getattr(old, k), getattr(new, k))
                if isinstance(k, str)
                else (old[k], new[k])
            )
        np.testing.assert_array_equal(new.kernel[...], old.kernel[...])
        assert (new.bias is None) == (old.bias is None)
        if old.bias is not None:
            np.testing.assert_array_equal(new.bias[...], old.bias[...])
        assert type(old) is nnx.Linear
    assert len(nnx.state(base, nnx.LoRAParam)) == 0


def test_lora_forward_is_base_plus_scaled_xAB_numpy_reference(rng):
    lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x = rng.normal(size=(5, 4)).astype(np.float32)
    for alpha, scale in ((None, 1.0), (2.0, 1.0), (8.0, 4.0), (0.5, 0.25)):
        model = flowjax.add_lora(lin, 2, rngs=nnx.Rngs(1), alpha=alpha)
        assert isinstance(model, nnx.LoRALinear)
        assert (type(model) is nnx.LoRALinear) == (scale == 1.0)
        a = rng.normal(size=(4, 2)).astype(np.float32)
        b = rng.normal(size=(2, 3)).astype(np.float32)
        model.lora.lora_a[...] = a
        model.lora.lora_b[...] = b
        w, bias = (
            np.asarray(lin.kernel[...], np.float64),
            np.asarray(lin.bias[...], np.float64),
        )
        x64 = x.astype(np.float64)
        expected = x64 @ w + bias + scale * (x64 @ a @ b)
        np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_select_forms_choose_exactly_the_named_layers():
    base = Net(nnx.Rngs(0))

    def lora_paths(select):
        return _lora_paths(flowjax.add_lora(base, 2, rngs=nnx.Rngs(1), select=select))

    attn_mlp = {
        ("layers", i, n) for i in (0, 1) for n in ("q_proj", "up_proj", "down_proj")
    }
    keys = ("q_proj", "up_proj", "down_proj")
    assert lora_paths(nnx.Any(*map(nnx.PathContains, keys))) == attn_mlp
    assert lora_paths(tuple(map(nnx.PathContains, keys))) == attn_mlp
    assert lora_paths(nnx.PathContains("q_proj")) == {
        ("layers", 0, "q_proj"),
        ("layers", 1, "q_proj"),
    }
    layer_1 = nnx.All(nnx.PathContains("layers"), nnx.PathContains(1))
    assert lora_paths(layer_1) == {p for p in attn_mlp if p[1] == 1}
    assert lora_paths(nnx.All(layer_1, nnx.Not(nnx.PathContains("q_proj")))) == {
        ("layers", 1, "up_proj"),
        ("layers", 1, "down_proj"),
    }
    assert lora_paths(nnx.PathContains("head")) == {("head",)}
    assert lora_paths(lambda path, m: m.out_features == 8) == {
        ("layers", 0, "up_proj"),
        ("layers", 1, "up_proj"),
    }


def test_add_lora_rejects_bad_input():
    base = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        flowjax.add_lora(base, 0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        flowjax.add_lora(base, 2.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        flowjax.add_lora(base, 2, rngs=nnx.Rngs(1), alpha=-1.0)
    with pytest.raises(ValueError, match=r"matches no plain nnx.Linear"):
        flowjax.add_lora(base, 2, rngs=nnx.Rngs(1), select=nnx.PathContains("k_proj"))
    # A string is an NNX tag, as in nnx.split: layers have none, and the error says so.
    with pytest.raises(ValueError, match=r"NNX tag.*nnx\.PathContains"):
        flowjax.add_lora(base, 2, rngs=nnx.Rngs(1), select="q_proj")
    with pytest.raises(TypeError, match="unknown keyword arguments"):
        flowjax.add_lora(base, 2, rngs=nnx.Rngs(1), lora_alpha=2)
    with pytest.raises(TypeError, match=r"must be an nnx.Module"):
        flowjax.add_lora({"w": jnp.ones(2)}, 2, rngs=nnx.Rngs(1))
    # NNX has no path-prefix tuples: ("layers", 0) and [("layers", 0)] are the same
    # TypeError, which shows the predicate to write.
    for prefix in (("layers", 0), [("layers", 0)]):
        with pytest.raises(TypeError, match=r"not a path prefix.*path\[:2\]"):
            flowjax.add_lora(base, 2, rngs=nnx.Rngs(1), select=prefix)

    class MyLinear(nnx.Linear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    class WithSubclass(nnx.Module):
        def __init__(self, rngs):
            self.proj = MyLinear(2, 2, rngs=rngs)

    with pytest.raises(TypeError, match=r"subclass of nnx.Linear"):
        flowjax.add_lora(WithSubclass(nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(2, 2, rngs=rngs)
            self.b = self.a

    with pytest.raises(ValueError, match="tied or shared"):
        flowjax.add_lora(Tied(nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))


def _randomize_lora(model, seed):
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(
        model,
        jax.tree.map(
            lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), state
        ),
    )


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_merge_lora_gives_plain_linears_with_w_plus_scaled_ab(alpha):
    _check_merge(alpha, jax.jit)


def test_merge_lora_jit_and_no_jit_agree(variant):
    _check_merge(6.0, variant)


def _check_merge(alpha, variant):
    base = Net(nnx.Rngs(0))
    model = flowjax.add_lora(base, 3, rngs=nnx.Rngs(1), alpha=alpha)
    _randomize_lora(model, 2)
    merged = flowjax.merge_lora(model)
    assert len(nnx.state(merged, nnx.LoRAParam)) == 0
    assert {
        p for p, m in nnx.iter_modules(merged) if type(m) is nnx.Linear
    } == ALL_LINEARS
    assert _lora_paths(model) == ALL_LINEARS  # the input is not modified
    scale = 1.0 if alpha is None else alpha / 3
    q, mq = model.layers[1].q_proj, merged.layers[1].q_proj
    expected = np.asarray(q.kernel[...], np.float64) + scale * (
        np.asarray(q.lora.lora_a[...], np.float64)
        @ np.asarray(q.lora.lora_b[...], np.float64)
    )
    np.testing.assert_allclose(mq.kernel[...], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mq.bias[...], q.bias[...])
    assert merged.layers[0].up_proj.bias is None
    x = _x(seed=3)
    out_lora, out_merged = _forward(model, x, variant), _forward(merged, x, variant)
    assert (
        np.abs(np.asarray(out_lora) - np.asarray(_forward(base, x, variant))).max()
        > 1.0
    )
    np.testing.assert_allclose(out_merged, out_lora, rtol=1e-5, atol=1e-4)


def test_merge_lora_rejects_models_without_mergeable_adapters():
    with pytest.raises(ValueError, match=r"no nnx.LoRALinear"):
        flowjax.merge_lora(Net(nnx.Rngs(0)))

    class Standalone(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.LoRALinear(2, 2, lora_rank=1, rngs=rngs)
            self.extra = nnx.LoRA(2, 1, 2, rngs=rngs)

    with pytest.raises(ValueError, match=r"remain outside nnx.LoRALinear"):
        flowjax.merge_lora(Standalone(nnx.Rngs(0)))


def test_dtype_is_kept_bf16():
    base = _bf16_net()
    assert base.head.kernel[...].dtype == jnp.bfloat16
    model = flowjax.add_lora(
        base, 2, rngs=nnx.Rngs(1), select=nnx.PathContains("q_proj")
    )
    assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))} == {
        jnp.dtype(jnp.bfloat16)
    }
    x = _x(dtype=jnp.bfloat16)
    out = _forward(model, x, jax.jit)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, _forward(base, x, jax.jit))
    _randomize_lora(model, 1)
    merged = flowjax.merge_lora(model)
    q, mq = model.layers[1].q_proj, merged.layers[1].q_proj
    assert mq.kernel[...].dtype == jnp.bfloat16
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    np.testing.assert_allclose(
        f64(mq.kernel),
        f64(q.kernel) + f64(q.lora.lora_a) @ f64(q.lora.lora_b),
        rtol=8e-3,
        atol=1e-3,
    )
    out_lora, out_merged = _forward(model, x, jax.jit), _forward(merged, x, jax.jit)
    assert out_merged.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out_merged, np.float32),
        np.asarray(out_lora, np.float32),
        rtol=0.05,
        atol=0.1,
    )


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_fp32_adapters_on_a_bf16_base(alpha):
    """lora_param_dtype=jnp.float32: f32 factors (and f32 gradients) on a bf16 base model."""
    base = _bf16_net()
    model = flowjax.add_lora(
        base,
        2,
        rngs=nnx.Rngs(1),
        select=nnx.PathContains("q_proj"),
        alpha=alpha,
        lora_param_dtype=jnp.float32,
    )
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert {a.dtype for a in jax.tree.leaves(lora_state)} == {jnp.dtype(jnp.float32)}
    base_leaves = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    assert {a.dtype for a in base_leaves} == {jnp.dtype(jnp.bfloat16)}
    x = _x(dtype=jnp.bfloat16)
    out = _forward(model, x, jax.jit)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, _forward(base, x, jax.jit))  # B = 0: exact
    # The gradient w.r.t. the adapters is float32 and not zero for A's partner B.
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    grads = jax.grad(
        lambda lo: jnp.sum(nnx.merge(graphdef, lo, rest)(x).astype(jnp.float32) ** 2)
    )(lora)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert float(jnp.abs(grads["layers"][0]["q_proj"]["lora"]["lora_b"][...]).max()) > 0


def _ce(logits, label):
    return -jax.nn.log_softmax(logits)[label]


def test_flow_plus_lora_one_jitted_step_matches_weighted_per_example_gradients():
    base = Net(nnx.Rngs(0))
    xs = _x(n=16, seed=5)
    ys = jax.random.randint(jax.random.key(6), (16,), 0, 3)

    def per_example_losses(model, xs, ys):
        return jax.vmap(lambda x, y: _ce(model(x), y))(xs, ys)

    pre_losses = jax.jit(per_example_losses)(base, xs, ys)
    ids = np.arange(len(pre_losses))
    weights = flowjax.LossTable(ids, pre_losses).flow_weights().weights  # τ = median
    np.testing.assert_allclose(
        weights, jnp.exp(-pre_losses / jnp.median(pre_losses)), rtol=1e-6
    )
    model = flowjax.add_lora(base, 2, rngs=nnx.Rngs(1))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.sgd(0.1)
    opt_state = tx.init(lora)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(lora, rest, opt_state, xs, ys, w):
        def loss_fn(lora):
            m = nnx.merge(graphdef, lora, rest)
            return flowjax.weighted_loss(per_example_losses(m, xs, ys), w)

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss, grads

    lora0 = lora
    losses = []
    for _ in range(5):
        lora, opt_state, loss, grads = step(lora, rest, opt_state, xs, ys, weights)
        losses.append(float(loss))
        if len(losses) == 1:
            grads0 = grads
    assert losses[-1] < losses[0] - 1e-3

    # Reference: Σ_i w_i ∇ℓ_i / B from per-example gradients at the start.
    def one_loss(lora, x, y):
        return _ce(nnx.merge(graphdef, lora, rest)(x), y)

    per_ex = jax.jit(jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0)))(lora0, xs, ys)
    expected = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1) / 16, per_ex)
    chex.assert_trees_all_close(grads0, expected, rtol=1e-5, atol=1e-7)
    # Only B has a gradient at the start (B = 0 kills dA); after training both moved.
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads0))
    trained = nnx.merge(graphdef, lora, rest)
    assert np.abs(np.asarray(trained.head.lora.lora_b[...])).max() > 0
    # The base weights are bitwise those of the pre-trained model.
    chex.assert_trees_all_equal(
        nnx.state(trained, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))),
        nnx.state(base, nnx.Param),
    )


def test_lora_with_freeze_keeps_base_bitwise_and_zero_strength_is_base():
    """All params to the optimiser, freeze(tx, LoRAParam mask): base kernels never move."""
    base = Net(nnx.Rngs(0))
    model = flowjax.add_lora(base, 2, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)  # nnx.LoRAParam is an nnx.Param
    mask = flowjax.trainable_mask(params, nnx.LoRAParam)
    tx = flowjax.train_only(
        optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)), mask
    )
    opt_state = tx.init(params)
    xs, ys = _x(n=8, seed=7), jnp.arange(8) % 3

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            return jnp.mean(jax.vmap(lambda x, y: _ce(m(x), y))(xs, ys))

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
        params, opt_state = step(params, opt_state)
    trained = nnx.merge(graphdef, params)
    chex.assert_trees_all_equal(
        nnx.state(trained, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))),
        nnx.state(base, nnx.Param),
    )
    assert np.abs(np.asarray(trained.layers[0].q_proj.lora.lora_b[...])).max() > 0
    # Optimiser state exists only for the LoRA factors.
    n_lora = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert len(jax.tree.leaves(opt_state)) == n_lora
