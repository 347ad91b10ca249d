"""QLoRA (flowjax/qlora.py): NF4 against an independent numpy NF4, a frozen base, exact B = 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.stats import norm

import flowjax
from flowjax.models import CausalLM, LMConfig


def _np_code_book() -> np.ndarray:
    """The NormalFloat construction of Dettmers et al. (bitsandbytes' create_normal_map)."""
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.abs(v).max()


def _np_nf4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy blockwise absmax NF4 along axis 0, by nearest code (argmin): (dequantised, absmax rows)."""
    code = flowjax.qlora.NF4_CODE  # checked against _np_code_book separately
    w = np.asarray(w, np.float32)
    out = np.empty_like(w)
    scale = np.empty_like(w)
    for start in range(0, w.shape[0], block):
        blk = w[start : start + block]
        c = np.abs(blk).max(axis=0, keepdims=True).astype(np.float32)
        x = blk / np.where(c == 0, np.float32(1), c)
        idx = np.argmin(np.abs(x[..., None] - code), axis=-1)
        out[start : start + block] = code[idx] * c
        scale[start : start + block] = c
    return out, scale


class MLP(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.up = nnx.Linear(128, 96, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.down = nnx.Linear(96, 5, rngs=rngs, param_dtype=dtype, dtype=dtype)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def _x(n=8, d=128):
    return jnp.asarray(np.random.default_rng(3).normal(size=(n, d)), jnp.float32)


@pytest.fixture(scope="module")
def base():
    return MLP(nnx.Rngs(0))


@pytest.fixture(scope="module")
def qlora(base):
    return flowjax.add_qlora(base, 4, rngs=nnx.Rngs(1))  # 96 rows: a short last block


_apply = nnx.jit(lambda m, x: m(x))


def test_code_book_is_the_normal_float_construction():
    np.testing.assert_allclose(flowjax.qlora.NF4_CODE, _np_code_book(), atol=1e-6)
    assert flowjax.qlora.NF4_CODE[7] == 0.0 and len(set(flowjax.qlora.NF4_CODE)) == 16


def test_dequantised_base_is_numpy_nf4_of_the_original_within_its_error(base, qlora):
    model = qlora
    gap = np.max(np.diff(flowjax.qlora.NF4_CODE)) / 2
    for name in ("up", "down"):
        w = np.asarray(getattr(base, name).kernel[...])
        want, scale = _np_nf4(w, 64)
        got = np.asarray(getattr(model, name).kernel)
        np.testing.assert_array_equal(got, want, err_msg=name)
        err = np.abs(got - w)
        assert np.all(err <= gap * scale + 1e-7), name  # half the widest code gap
        assert err.mean() > 0, name
    codes, absmax = flowjax.nf4_quantize(base.up.kernel[...], 64)
    assert codes.dtype == jnp.uint4 and absmax.shape == (2, 96)
    # The layer stores them two per byte: row 2k in the low nibble, 2k + 1 in the high.
    packed = np.asarray(model.up.codes[...])
    assert packed.dtype == np.uint8 and packed.shape == (64, 96)
    np.testing.assert_array_equal(packed & 15, np.asarray(codes[0::2], np.uint8))
    np.testing.assert_array_equal(packed >> 4, np.asarray(codes[1::2], np.uint8))
    np.testing.assert_array_equal(
        flowjax.nf4_dequantize(codes, absmax, 64), model.up.kernel
    )


def test_nf4_state_is_not_a_param_and_bias_and_factors_are(qlora):
    model = qlora
    params = {
        jax.tree_util.keystr(k)
        for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert not any("codes" in k or "absmax" in k for k in params), params
    nf4 = nnx.state(model, flowjax.NF4)
    assert {type(v.get_value()).__name__ for _, v in nnx.to_flat_state(nf4)} == {
        "ArrayImpl"
    }
    assert len(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))) == 4


def test_zero_b_is_exactly_the_numpy_dequantised_model_and_jit_agrees(base):
    model = flowjax.add_qlora(base, 3, rngs=nnx.Rngs(1), alpha=6.0)
    ref = nnx.clone(base)
    for name in ("up", "down"):
        getattr(ref, name).kernel[...] = jnp.asarray(
            _np_nf4(np.asarray(getattr(base, name).kernel[...]), 64)[0]
        )
    x = _x()
    np.testing.assert_array_equal(_apply(model, x), _apply(ref, x))
    np.testing.assert_array_equal(
        _apply(model, x), _apply(flowjax.dequantize_qlora(model), x)
    )
    # Trained factors: jit == no jit, and the float model computes the same.
    model.up.lora.lora_b[...] = jnp.asarray(
        np.random.default_rng(5).normal(size=(3, 96)) * 0.1, jnp.float32
    )
    y = _apply(model, x)
    np.testing.assert_allclose(y, model(x), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(y - ref(x)).max()) > 1e-3
    merged = flowjax.merge_lora(flowjax.dequantize_qlora(model))
    assert type(merged.up) is nnx.Linear
    np.testing.assert_allclose(_apply(merged, x), y, rtol=1e-5, atol=1e-5)


def _mse_objective(graphdef):
    def objective(lora, batch, rest):
        m = nnx.merge(graphdef, lora, rest)
        return jnp.mean(jnp.square(m(batch["x"]) - batch["y"]))

    return objective


def test_base_never_changes_under_make_train_step_and_an_optax_loop(qlora):
    model = qlora
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    before = jax.tree.map(np.asarray, rest)
    batch = {
        "id": np.arange(8),
        "x": np.asarray(_x()),
        "y": np.ones((8, 5), np.float32),
    }
    tx = optax.adam(1e-2)
    step = flowjax.make_train_step(
        _mse_objective(graphdef), tx, anchor=lora, frozen=rest, return_metrics=False
    )
    state = flowjax.init_train_state(lora, tx)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert float(metrics["param_distance"]) > 0

    # An optax loop over the whole nnx.Param state through train_only: the bias is
    # frozen by the mask and the NF4 state is not a Param at all.
    graphdef2, params, nf4 = nnx.split(model, nnx.Param, ...)
    tx2 = flowjax.train_only(optax.sgd(0.1), nnx.LoRAParam)
    opt = tx2.init(params)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef2, p, nf4)(batch["x"]) - 1.0))

    @jax.jit
    def sgd_step(p, opt):
        updates, opt = tx2.update(jax.grad(loss)(p), opt, p)
        return optax.apply_updates(p, updates), opt

    p = params
    for _ in range(3):
        p, opt = sgd_step(p, opt)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rest), before)
    after = nnx.merge(graphdef2, p, nf4)
    for name in ("up", "down"):
        np.testing.assert_array_equal(
            getattr(after, name).codes[...], getattr(model, name).codes[...]
        )
        np.testing.assert_array_equal(
            getattr(after, name).bias[...], getattr(model, name).bias[...]
        )
        assert float(jnp.abs(after.up.lora.lora_b[...]).max()) > 0


def test_bf16_base_odd_rows_and_float32_factors_keep_their_dtypes():
    lin = nnx.Linear(
        9, 3, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16
    )
    model = flowjax.add_qlora(
        lin, 2, rngs=nnx.Rngs(1), lora_param_dtype=jnp.float32, block_size=4
    )
    assert model.codes[...].shape == (5, 3)  # 9 rows, two a byte
    want = _np_nf4(np.asarray(lin.kernel[...], np.float32), 4)[0]
    np.testing.assert_array_equal(
        np.asarray(model.kernel, np.float32),
        np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32),
    )
    assert model.kernel.dtype == jnp.bfloat16 and model.absmax[...].dtype == jnp.float32
    assert model.lora.lora_a[...].dtype == jnp.float32
    assert _apply(model, _x(2, 9)).dtype == jnp.bfloat16


def test_tiny_causal_lm_projections():
    cfg = LMConfig.from_hf(
        {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    lm = CausalLM(cfg, rngs=nnx.Rngs(0))
    proj = nnx.Any(nnx.PathContains("q_proj"), nnx.PathContains("o_proj"))  # one shape
    model = flowjax.add_qlora(lm, 4, rngs=nnx.Rngs(1), select=proj, block_size=16)
    assert isinstance(model.layers[0].self_attn.o_proj, flowjax.QLoRALinear)
    assert type(model.layers[0].self_attn.k_proj) is nnx.Linear
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
    lm_apply = nnx.jit(lambda m, t: m(t))
    logits = lm_apply(model, tokens)
    np.testing.assert_array_equal(
        logits, lm_apply(flowjax.dequantize_qlora(model), tokens)
    )
    assert 0 < float(jnp.abs(logits - lm_apply(lm, tokens)).max()) < 0.5

    # The factors get gradients through the whole LM (B = 0: only B's are non-zero).
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora):
        logits = nnx.merge(graphdef, lora, rest)(tokens)
        nll = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]
        )
        return nll.mean()

    grads = nnx.to_flat_state(jax.jit(jax.grad(loss))(lora))
    got = {
        "/".join(map(str, k)): float(jnp.abs(v.get_value()).max())
        for k, v in grads
        if k[-1] == "lora_b"
    }
    assert len(got) == 2 and all(g > 0 for g in got.values()), got


def test_bad_arguments_are_named(base):
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        flowjax.add_qlora(base, 2, rngs=nnx.Rngs(1), block_size=0)
    with pytest.raises(ValueError, match=r"matches no plain nnx\.Linear"):
        flowjax.add_qlora(base, 2, rngs=nnx.Rngs(1), select=nnx.PathContains("x"))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        flowjax.add_qlora(base, 0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="no QLoRALinear"):
        flowjax.dequantize_qlora(base)
    with pytest.raises(TypeError, match="floating array"):
        flowjax.nf4_quantize(jnp.ones((4, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"absmax has shape \(1, 2\)"):
        flowjax.nf4_dequantize(jnp.zeros((8, 2), jnp.uint4), jnp.ones((1, 2)), 4)
