"""Prompt and prefix tuning on flowjax.models.CausalLM: the embed / from_embeddings contract.

Tiny random Llama 3 (grouped-query: 4 query heads on 2 key/value heads) and Gemma 2
(sliding window 3 shorter than the sequence, both soft-caps, query_pre_attn_scalar,
sandwich norms with random scales); the prefix path is checked against a float64
numpy forward of the whole model written here from the architecture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax
from flowjax.models import CausalLM, LMConfig, generate

HF = {
    "llama": {
        "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 500.0,
    },
    "gemma2": {
        "model_type": "gemma2", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 3,
        "query_pre_attn_scalar": 6, "attn_logit_softcapping": 1.5,
        "final_logit_softcapping": 4.0,
    },
}  # fmt: skip
NAMES = tuple(HF)


def _lm(name, seed=0):
    """A CausalLM with every parameter random (Gemma's (1 + w) norm scales included)."""
    lm = CausalLM(LMConfig.from_hf(HF[name]), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(lm)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    state = jax.tree.map(
        lambda x: 0.4 * jax.random.normal(next(keys), x.shape, x.dtype), state
    )
    return nnx.merge(graphdef, state)


def _prefix(lm, length, seed=2):
    c = lm.config
    shape = (c.num_hidden_layers, 2, length, c.num_key_value_heads, c.head_dim)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_forward(lm, tokens, prefixes, mask):
    """Logits of the whole model in float64 numpy, prefix keys/values before the tokens'."""
    c = lm.config
    gemma = c.model_type == "gemma2"
    a = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    b, t = tokens.shape
    hd, kvh, g = (
        c.head_dim,
        c.num_key_value_heads,
        c.num_attention_heads // c.num_key_value_heads,
    )
    length = prefixes.shape[2]

    def norm(m, x):
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_norm_eps)
        return y * (1 + a(m.scale)) if gemma else y * a(m.scale)

    def rope(x):  # [B, T, H, hd], positions 0 .. T-1
        inv = 1.0 / c.rope_theta ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(t)[:, None] * inv[None]
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = a(lm.embed_tokens.embedding)[tokens] * (np.sqrt(c.hidden_size) if gemma else 1)
    for i, layer in enumerate(lm.layers):
        att, h = layer.self_attn, norm(layer.input_layernorm, x)
        q = rope((h @ a(att.q_proj.kernel)).reshape(b, t, kvh * g, hd))
        k = rope((h @ a(att.k_proj.kernel)).reshape(b, t, kvh, hd))
        v = (h @ a(att.v_proj.kernel)).reshape(b, t, kvh, hd)
        pk = np.broadcast_to(prefixes[i, 0], (b, length, kvh, hd))
        pv = np.broadcast_to(prefixes[i, 1], (b, length, kvh, hd))
        keys, values = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
        out = np.zeros((b, t, kvh * g, hd))
        window = c.sliding_window if c.sliding_layers[i] else None
        for head in range(kvh * g):  # query head h reads key/value head h // g
            s = np.einsum("btd,bsd->bts", q[:, :, head], keys[:, :, head // g])
            s = s * (c.query_pre_attn_scalar or hd) ** -0.5
            if c.attn_logit_softcapping:
                s = c.attn_logit_softcapping * np.tanh(s / c.attn_logit_softcapping)
            tq, tk = np.arange(t)[:, None], np.arange(t)[None, :]
            ok = (tk <= tq) & mask[:, None, :].astype(bool)
            if window is not None:
                ok = ok & (tk > tq - window)
            ok = np.concatenate([np.ones((b, t, length), bool), ok], -1)
            s = np.where(ok, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, :, head] = np.einsum("bts,bsd->btd", p, values[:, :, head // g])
        o = out.reshape(b, t, -1) @ a(att.o_proj.kernel)
        mlp = layer.mlp

        def ff(y, mlp=mlp):
            gate = y @ a(mlp.gate_proj.kernel)
            if gemma:
                act = (
                    0.5
                    * gate
                    * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
                )
            else:
                act = gate / (1 + np.exp(-gate))
            return (act * (y @ a(mlp.up_proj.kernel))) @ a(mlp.down_proj.kernel)

        if gemma:
            x = x + norm(layer.post_attention_layernorm, o)
            x = x + norm(
                layer.post_feedforward_layernorm,
                ff(norm(layer.pre_feedforward_layernorm, x)),
            )
        else:
            x = x + o
            x = x + ff(norm(layer.post_attention_layernorm, x))
    z = norm(lm.norm, x) @ np.asarray(lm.unembedding, np.float64).T
    cap = c.final_logit_softcapping
    return cap * np.tanh(z / cap) if cap else z


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 7)), jnp.int32)


def _jit(model, method="__call__"):
    """``model.method(*args, **kw)`` jitted, the model an argument (split/merge)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, *a, **k: getattr(nnx.merge(graphdef, s), method)(*a, **k))
    return lambda *a, **k: f(state, *a, **k)


@pytest.mark.parametrize("name", NAMES)
def test_zero_length_prompt_and_prefix_are_the_base_model_bitwise(name):
    lm = _lm(name)
    c = lm.config
    mask = jnp.asarray([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    prompt = flowjax.PromptTuning(lm, 0, 16, rngs=nnx.Rngs(1))
    prefix = flowjax.PrefixTuning(
        lm, 0, num_layers=c.num_hidden_layers, num_heads=c.num_key_value_heads,
        head_dim=c.head_dim, rngs=nnx.Rngs(1),
    )  # fmt: skip
    want = np.asarray(_jit(lm)(TOKENS, mask, pos))
    np.testing.assert_array_equal(np.asarray(_jit(prompt)(TOKENS, mask, pos)), want)
    np.testing.assert_array_equal(np.asarray(_jit(prefix)(TOKENS, mask, pos)), want)


@pytest.mark.parametrize("name", NAMES)
def test_prefix_through_the_model_equals_a_numpy_forward(name):
    """GQA prefix heads, no rope on them, never masked (causal, padding, window), soft-capped."""
    lm = _lm(name)
    prefixes = _prefix(lm, 3)
    mask = np.array([[1] * 7, [1, 1, 0, 1, 1, 0, 1]])
    f = _jit(lm, "from_embeddings")
    got = f(lm.embed(TOKENS), prefixes=jnp.asarray(prefixes), attention_mask=mask)
    want = _np_forward(lm, np.asarray(TOKENS), prefixes.astype(np.float64), mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # The reference is sharp: without the prefix it is far from this.
    empty = _np_forward(lm, np.asarray(TOKENS), prefixes[:, :, :0], mask)
    assert np.abs(empty - want).max() > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_is_the_model_on_the_concatenation(name):
    """P = embed(y) gives lm([y; x]) at x's slots; the mask extends over P, positions shift by L."""
    lm = _lm(name)
    y = jnp.asarray([[5, 9, 2, 30]] * 2)
    pt = flowjax.PromptTuning(lm, 4, 16, rngs=nnx.Rngs(0), init=lm.embed(y)[0])
    mask = jnp.asarray([[1] * 7, [1, 0, 1, 1, 0, 1, 1]])
    pos = jnp.broadcast_to(jnp.arange(3, 10), (2, 7))  # counted from 3, say
    got = np.asarray(_jit(pt)(TOKENS, mask, pos))
    lm_mask = jnp.concatenate([jnp.ones((2, 4), mask.dtype), mask], 1)
    lm_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(4), (2, 4)), pos + 4], 1)
    f = _jit(lm)
    whole = np.asarray(f(jnp.concatenate([y, TOKENS], 1), lm_mask, lm_pos))
    np.testing.assert_allclose(got, whole[:, 4:], atol=1e-5)
    unmasked = np.asarray(f(jnp.concatenate([y, TOKENS], 1), None, lm_pos))
    assert np.abs(got[1] - unmasked[1, 4:]).max() > 1e-3  # the mask took effect


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        (flowjax.PromptParam, lambda lm: flowjax.PromptTuning(lm, 3, 16, rngs=nnx.Rngs(0))),
        (flowjax.PrefixParam, lambda lm: flowjax.PrefixTuning(
            lm, 3, num_layers=2, num_heads=2, head_dim=4, rngs=nnx.Rngs(0))),
    ],
)  # fmt: skip
def test_train_only_moves_the_prompt_or_prefix_alone(kind, make):
    model = make(_lm("llama"))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = flowjax.train_only(optax.sgd(0.1), kind)

    @jax.jit
    def grads_and_updates(p):
        def loss(p):
            logits = nnx.merge(graphdef, p)(TOKENS)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        g = jax.grad(loss)(p)
        return g, tx.update(g, tx.init(p), p)[0]

    grads, updates = grads_and_updates(params)
    flat_g = dict(nnx.to_flat_state(grads))
    for path, u in nnx.to_flat_state(updates):
        moved = bool(np.any(np.asarray(u.get_value()) != 0))
        assert moved == isinstance(u, kind), path
        if isinstance(u, kind):  # the gradient reaches it at every layer / position
            g = np.abs(np.asarray(flat_g[path].get_value()))
            assert np.all(g.sum(-1) > 0)


def test_kv_cache_decode_with_a_prefix_equals_the_full_forward():
    lm = _lm("gemma2")  # a window (3) shorter than the sequence, soft-capped scores
    prefixes = jnp.asarray(_prefix(lm, 2))
    full = np.asarray(_jit(lm, "from_embeddings")(lm.embed(TOKENS), prefixes=prefixes))
    decode = _jit(lm, "decode")
    z, cache = decode(TOKENS[:, :3], lm.init_cache(2, 7), prefixes=prefixes)
    steps = [np.asarray(z)]
    for i in range(3, 7):  # past Gemma's window of 3: the prefix stays visible
        z, cache = decode(TOKENS[:, i : i + 1], cache, prefixes=prefixes)
        steps.append(np.asarray(z))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5)
    assert cache.k[0].shape[1] == 7  # the prefix is never written into the cache


@pytest.mark.parametrize("name", NAMES)
def test_generate_with_prompt_or_prefix_equals_argmax_of_the_full_forward(name):
    """Cached greedy decode of left-padded rows == argmax of the wrapper's forward, row alone.

    Gemma's window counts slots: the soft prompt must sit after each row's padding."""
    lm = _lm(name)
    c = lm.config
    pre = flowjax.PrefixTuning(
        lm, 2, num_layers=2, num_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    pre.prefix[...] = jnp.asarray(_prefix(lm, 2))
    pt = flowjax.PromptTuning(lm, 3, 16, rngs=nnx.Rngs(0))
    pt.prompt[...] = 4 * jax.random.normal(jax.random.key(5), (3, 16))
    prompts, new = [[3, 1, 4, 1, 5, 9], [9, 2]], 8
    outs = []
    for model in (pre, pt):
        got = generate(model, prompts, max_new_tokens=new, eos_id=99)
        # No cache: right-padded rows (causal, so row alone), one program.
        f, buf = _jit(model), np.zeros((2, 6 + new), np.int32)
        for i, p in enumerate(prompts):
            buf[i, : len(p)] = p
        for s in range(new):
            logits = np.asarray(f(jnp.asarray(buf)))
            for i, p in enumerate(prompts):
                buf[i, len(p) + s] = logits[i, len(p) + s - 1].argmax()
        want = [buf[i, len(p) : len(p) + new].tolist() for i, p in enumerate(prompts)]
        assert got == want, type(model).__name__
        outs.append(got)
    base = generate(lm, prompts, max_new_tokens=new, eos_id=99)
    assert outs[0] != base and outs[1] != base


class _Bag(nnx.Module):  # meets the contract, but is no CausalLM
    def embed(self, tokens):
        return jnp.zeros((*tokens.shape, 16))

    def from_embeddings(self, h, *, prefixes=None):
        return h


def test_a_prefix_of_the_wrong_shape_or_model_is_named():
    lm = _lm("llama")
    h = lm.embed(TOKENS)
    with pytest.raises(ValueError, match=r"num_key_value_heads=2, head_dim=4\)"):
        lm.from_embeddings(h, prefixes=jnp.zeros((2, 2, 3, 4, 4)))  # query heads
    wrong = flowjax.PrefixTuning(
        lm, 3, num_layers=1, num_heads=2, head_dim=4, rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match=r"num_layers=2.*got \(1, 2, 3, 2, 4\)"):
        wrong(TOKENS)
    other = flowjax.PromptTuning(_Bag(), 2, 16, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="PromptTuning of one; got _Bag"):
        generate(other, [[1, 2]], max_new_tokens=2, eos_id=0)
    with pytest.raises(ValueError, match="prefixes must be"):
        lm.decode(TOKENS, lm.init_cache(2, 8), prefixes=jnp.zeros((2, 3, 2, 4)))
