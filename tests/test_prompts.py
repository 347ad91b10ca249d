"""Prompt and prefix tuning: a small NNX transformer honouring the contract, exact base at L = 0,
prefix attention against numpy, a vocabulary-initialised prompt equals real tokens, frozen base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax

VOCAB, D, HEADS, LAYERS = 11, 8, 2, 2
HD = D // HEADS


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
        self.o = nnx.Linear(D, D, rngs=rngs)
        self.ff = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x, prefix=None):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * HEADS, HD), 3, axis=2)
        att = flowjax.prefix_attention(q, k, v, prefix).reshape(b, t, D)
        x = x + self.o(att)
        return x + self.ff(jnp.tanh(x))


class TinyTransformer(nnx.Module):
    """A causal transformer with learned positions, following the prompts contract."""

    def __init__(self, rngs):
        self.tok = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (16, D)))
        self.layers = nnx.List([Layer(rngs) for _ in range(LAYERS)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def embed(self, tokens):
        return self.tok(tokens)

    def from_embeddings(self, h, *, prefixes=None):
        x = h + self.pos[: h.shape[1]][None]
        for i, layer in enumerate(self.layers):
            x = layer(x, None if prefixes is None else prefixes[i])
        return self.head(x)

    def __call__(self, tokens):
        return self.from_embeddings(self.embed(tokens))


def _tokens(b=3, t=5, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)))


def _prefix(model, length, seed=1):
    return flowjax.PrefixTuning(
        model,
        length,
        num_layers=LAYERS,
        num_heads=HEADS,
        head_dim=HD,
        rngs=nnx.Rngs(seed),
    )


@nnx.jit
def _apply(model, x):
    return model(x)


def test_zero_length_prompt_and_prefix_equal_the_base_bit_for_bit():
    base, x = TinyTransformer(nnx.Rngs(0)), _tokens()
    want = np.asarray(_apply(base, x))
    empty_prompt = flowjax.PromptTuning(base, 0, D, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_apply(empty_prompt, x), want)
    np.testing.assert_array_equal(_apply(_prefix(base, 0), x), want)
    got = np.asarray(_apply(_prefix(base, 3), x))
    assert got.shape == want.shape and not np.allclose(got, want)


def _np_attention(q, k, v, pk, pv):
    b, t, h, d = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            keys = np.concatenate([pk[:, hi], k[bi, :, hi]])
            vals = np.concatenate([pv[:, hi], v[bi, :, hi]])
            for ti in range(t):
                n = pk.shape[0] + ti + 1  # every prefix slot and tokens up to ti
                s = keys[:n] @ q[bi, ti, hi] / np.sqrt(d)
                w = np.exp(s - s.max())
                out[bi, ti, hi] = (w / w.sum()) @ vals[:n]
    return out


def test_prefix_attention_matches_numpy():
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, 4, 2, 3)) for _ in range(3))
    prefix = rng.normal(size=(2, 5, 2, 3))
    got = flowjax.prefix_attention(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
        jnp.asarray(prefix, jnp.float32),
    )
    np.testing.assert_allclose(
        got, _np_attention(q, k, v, prefix[0], prefix[1]), rtol=1e-5, atol=1e-6
    )
    none = flowjax.prefix_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    empty = np.zeros((0, 2, 3))
    np.testing.assert_allclose(
        none, _np_attention(q, k, v, empty, empty), rtol=1e-5, atol=1e-6
    )


def test_a_prompt_initialised_from_token_embeddings_equals_those_tokens():
    base, x = TinyTransformer(nnx.Rngs(0)), _tokens()
    lead = jnp.asarray([4, 7])
    tuned = flowjax.PromptTuning(base, 2, D, rngs=nnx.Rngs(1), init=base.embed(lead))
    full = jnp.concatenate([jnp.broadcast_to(lead, (x.shape[0], 2)), x], axis=1)
    np.testing.assert_allclose(tuned(x), base(full)[:, 2:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_training_only_the_prompt_or_prefix_leaves_the_base_bitwise_unchanged(kind):
    base, x = TinyTransformer(nnx.Rngs(0)), _tokens(4, 6)
    if kind == "prompt":
        model, vtype = (
            flowjax.PromptTuning(base, 3, D, rngs=nnx.Rngs(1)),
            flowjax.PromptParam,
        )
    else:
        model, vtype = _prefix(base, 3), flowjax.PrefixParam
    graphdef, params = nnx.split(model, nnx.Param)
    tx = flowjax.train_only(optax.adam(5e-2), vtype)
    state = tx.init(params)
    targets, weights = jnp.roll(x, -1, axis=1), jnp.linspace(0.5, 1.5, 4)  # FLOW-style

    @jax.jit
    def step(params, state):
        def loss(p):
            z = nnx.merge(graphdef, p)(x)
            nll = optax.softmax_cross_entropy_with_integer_labels(z, targets).mean(1)
            return flowjax.weighted_loss(nll, weights)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    start = nnx.to_flat_state(jax.tree.map(np.asarray, params))
    losses = []
    for _ in range(8):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    for (path, v0), (_, v1) in zip(start, nnx.to_flat_state(params), strict=True):
        same = np.array_equal(v0.get_value(), v1.get_value())
        assert same != isinstance(v1, vtype), path


def test_errors():
    base = TinyTransformer(nnx.Rngs(0))
    with pytest.raises(ValueError, match="length"):
        flowjax.PromptTuning(base, -1, D, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"init must have shape \(2, 8\)"):
        flowjax.PromptTuning(base, 2, D, rngs=nnx.Rngs(1), init=jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="embed"):
        flowjax.PromptTuning(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 2, 2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="num_heads"):
        flowjax.PrefixTuning(
            base, 2, num_layers=2, num_heads=0, head_dim=4, rngs=nnx.Rngs(1)
        )
    q = jnp.ones((1, 3, 2, 4))
    with pytest.raises(
        ValueError, match=r"prefix must be \(2, L, heads=2, head_dim=4\)"
    ):
        flowjax.prefix_attention(q, q, q, jnp.ones((2, 5, 1, 4)))
