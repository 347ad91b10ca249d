"""chunked_token_nll equals the plain full-logits cross-entropy in value and gradient, and stays lean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax
from flowjax import chunked_ce


def _plain(h, w, y, mask, cap, layout):
    z = h @ w if layout == "dv" else h @ w.T
    if cap is not None:
        z = cap * jnp.tanh(z / cap)
    nll = (
        jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    )
    return jnp.where(mask, nll, 0.0)


def _data(n=29, d=6, v=103, seed=0):
    r = np.random.default_rng(seed)
    h = jnp.asarray(r.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(2 * r.normal(size=(d, v)), jnp.float32)
    y = jnp.asarray(r.integers(0, v, size=n), jnp.int32)
    mask = jnp.asarray(r.random(n) < 0.7)
    cotangent = jnp.asarray(r.normal(size=n), jnp.float32)
    return h, w, y, mask, cotangent


# 103 % 16 != 0 (the last chunk overlaps); a chunk > V is clipped to V.
@pytest.mark.parametrize(
    ("chunk", "layout", "cap"),
    [(16, "dv", None), (16, "vd", 2.5), (103, "dv", 2.5), (1000, "vd", None)],
)
def test_values_and_gradients_match_plain(chunk, layout, cap):
    h, w, y, mask, ct = _data()
    w = w if layout == "dv" else w.T
    kw = {"chunk_size": chunk, "mask": mask, "logit_softcap": cap, "layout": layout}

    def chunked_obj(h, w):
        return jnp.sum(ct * flowjax.chunked_token_nll(h, w, y, **kw))

    def plain_obj(h, w):
        return jnp.sum(ct * _plain(h, w, y, mask, cap, layout))

    value = jax.jit(lambda h, w: flowjax.chunked_token_nll(h, w, y, **kw))(h, w)
    np.testing.assert_allclose(
        value,
        _plain(h, w, y, mask, cap, layout),
        rtol=1e-5,
        atol=1e-5,
    )
    got = jax.jit(jax.grad(chunked_obj, argnums=(0, 1)))(h, w)
    want = jax.jit(jax.grad(plain_obj, argnums=(0, 1)))(h, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5)
    # masked positions: NLL exactly 0 and no gradient through their hidden state
    assert np.all(np.asarray(value)[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(got[0])[~np.asarray(mask)] == 0)


def test_softcap_changes_the_value():
    h, w, y, _, _ = _data()
    a = flowjax.chunked_token_nll(10 * h, w, y, chunk_size=16)
    b = flowjax.chunked_token_nll(10 * h, w, y, chunk_size=16, logit_softcap=5.0)
    assert not np.allclose(a, b, rtol=1e-2)


def test_bfloat16_inputs_keep_dtypes_and_match_float32():
    h, w, y, _, _ = _data()
    hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = flowjax.chunked_token_nll(hb, wb, y, chunk_size=32)
    assert out.dtype == jnp.float32
    ref = _plain(
        hb.astype(jnp.float32),
        wb.astype(jnp.float32),
        y,
        jnp.ones(y.shape, bool),
        None,
        "dv",
    )
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    gh, gw = jax.grad(
        lambda a, b: flowjax.chunked_token_nll(a, b, y, chunk_size=32).sum(), (0, 1)
    )(hb, wb)
    assert gh.dtype == gw.dtype == jnp.bfloat16


def test_no_full_logits_in_compiled_program():
    """XLA's planned scratch memory stays far below one [N, V] float32 buffer, forward and backward."""
    n, d, v, chunk = 256, 16, 16384, 1024
    h, w = jnp.ones((n, d)), jnp.ones((d, v))
    y = jnp.zeros((n,), jnp.int32)
    full = n * v * 4

    def f(h, w):
        return flowjax.chunked_token_nll(h, w, y, chunk_size=chunk).sum()

    fwd = jax.jit(f).lower(h, w).compile().memory_analysis().temp_size_in_bytes
    bwd = (
        jax.jit(jax.grad(f, (0, 1)))
        .lower(h, w)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
    )
    plain = (
        jax.jit(lambda h, w: _plain(h, w, y, True, None, "dv").sum())
        .lower(h, w)
        .compile()
    )
    assert (
        plain.memory_analysis().temp_size_in_bytes >= full
    )  # the reference does build [N, V]
    assert fwd < full / 4 and bwd < full / 2, (fwd, bwd, full)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("v", [131072, 262144])
def test_default_chunk_scratch_is_at_most_a_sixteenth_of_the_plain_logits(v):
    """4 x 512 tokens: the default chunk's scratch, forward and backward, against plain logits."""
    n, d = 2048, 128
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def f(h, w, y):
        return flowjax.chunked_token_nll(h, w, y).sum()

    def plain(h, w, y):
        return _plain(h, w, y, True, None, "dv").sum()

    plain_fwd = _temp_bytes(plain, h, w, y)
    assert plain_fwd >= n * v * 4  # the reference builds [N, V] float32
    assert _temp_bytes(f, h, w, y) <= plain_fwd / 16
    grad = jax.grad(f, (0, 1))
    assert (
        _temp_bytes(grad, h, w, y) <= _temp_bytes(jax.grad(plain, (0, 1)), h, w, y) / 16
    )


def test_one_logits_block_is_live_per_chunk_also_in_the_shifted_last_chunk():
    """V not a multiple of the chunk: the masked last chunk adds no second [N, chunk] block."""
    n, d, chunk = 1024, 64, 2048
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    block = n * chunk * 4
    for v in (8 * chunk, 8 * chunk - 100):  # whole chunks only; a shifted last chunk

        def f(h, w, y):
            return flowjax.chunked_token_nll(h, w, y, chunk_size=chunk).sum()

        w = jax.ShapeDtypeStruct((d, v), jnp.float32)
        fwd, bwd = _temp_bytes(f, h, w, y), _temp_bytes(jax.grad(f, (0, 1)), h, w, y)
        # One block, plus the W chunk and [N]-sized vectors: well under two blocks.
        assert block <= fwd < 1.5 * block, (v, fwd / block)
        assert bwd < 1.5 * block, (v, bwd / block)


def test_default_chunk_size_follows_the_byte_budget():
    assert chunked_ce._default_chunk_size(512, 128) == 4096
    assert chunked_ce._default_chunk_size(2048, 128) == 1024
    assert chunked_ce._default_chunk_size(1 << 20, 128) == 512  # never below 512
    n, d = 300, 100  # a budget that is not a power of two: the power of two below it
    c = chunked_ce._default_chunk_size(n, d)
    assert (n + d) * c * 4 <= chunked_ce.CHUNK_BYTES < (n + d) * 2 * c * 4


def _avals(jaxpr):
    """Every intermediate's abstract value in a jaxpr, sub-jaxprs (scan, jit, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_frozen_unembedding_gets_no_dw_buffer(layout):
    """Grad w.r.t. h only (frozen lm_head / tied embeddings, as with LoRA): no [D, V] f32 dW.

    The program is checked at the jaxpr level (no float32 array of W's shape is ever
    built), which holds on every backend: XLA on CPU already drops a dead dW by
    itself, but a review measured that XLA on GPU did not (before this fix: 144.5 MB
    scratch for grad w.r.t. h vs 265.5 MB for both at N=256, D=512, V=65536 bf16).
    """
    n, d, v, chunk = 8, 16, 4096, 256
    h = jnp.ones((n, d), jnp.bfloat16)
    w = jnp.ones((d, v) if layout == "dv" else (v, d), jnp.bfloat16)
    y = jnp.zeros((n,), jnp.int32)
    dw_f32 = jax.ShapeDtypeStruct(w.shape, jnp.float32)

    def f(h, w):
        return flowjax.chunked_token_nll(h, w, y, chunk_size=chunk, layout=layout).sum()

    def has_dw(fn):
        avals = _avals(jax.make_jaxpr(fn)(h, w).jaxpr)
        return any((a.shape, a.dtype) == (dw_f32.shape, dw_f32.dtype) for a in avals)

    assert has_dw(jax.grad(f, (0, 1)))  # the full gradient does build dW
    assert not has_dw(jax.grad(f, 0))
    assert not has_dw(jax.grad(lambda h, w: f(h, jax.lax.stop_gradient(w))))
    # and the compiled backward's scratch stays far below one [D, V] float32 buffer
    # (float32 inputs: with bf16, XLA on CPU upcasts all of W, which is not dW)
    n, d, v = 64, 128, 32768
    hf = jnp.ones((n, d))
    wf = jnp.ones((d, v) if layout == "dv" else (v, d))
    yf = jnp.zeros((n,), jnp.int32)
    grad_h = jax.jit(
        jax.grad(
            lambda h, w: flowjax.chunked_token_nll(
                h, w, yf, chunk_size=1024, layout=layout
            ).sum()
        )
    )
    temp = grad_h.lower(hf, wf).compile().memory_analysis().temp_size_in_bytes
    assert temp < d * v * 4 / 8, (temp, d * v * 4)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_gradient_for_one_argument_equals_the_full_gradient(layout):
    h, w, y, mask, ct = _data()
    w = w if layout == "dv" else w.T
    kw = {"chunk_size": 16, "mask": mask, "logit_softcap": 2.5, "layout": layout}

    def obj(h, w):
        return jnp.sum(ct * flowjax.chunked_token_nll(h, w, y, **kw))

    gh, gw = jax.jit(jax.grad(obj, (0, 1)))(h, w)
    # Different compiled programs may round differently: equal to float32 rounding.
    tol = {"rtol": 1e-5, "atol": 1e-7}
    np.testing.assert_allclose(jax.jit(jax.grad(obj, 0))(h, w), gh, **tol)
    np.testing.assert_allclose(jax.jit(jax.grad(obj, 1))(h, w), gw, **tol)
    # eager, and under vmap over a batch of hidden states
    np.testing.assert_allclose(jax.grad(obj, 0)(h, w), gh, **tol)
    gv = jax.vmap(jax.grad(obj, 0), in_axes=(0, None))(jnp.stack([h, h]), w)
    np.testing.assert_allclose(gv[1], gh, **tol)
    val, vjp = jax.vjp(lambda w: obj(h, w), w)
    np.testing.assert_allclose(vjp(jnp.float32(1.0))[0], gw, **tol)
    np.testing.assert_allclose(val, obj(h, w), rtol=1e-6)


def test_validation():
    h, w, y, _, _ = _data()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        flowjax.chunked_token_nll(h, w, y.at[3].set(103))
    # an ignore index is fine where masked
    yy = y.at[3].set(-100)
    out = flowjax.chunked_token_nll(h, w, yy, mask=jnp.arange(29) != 3)
    assert out[3] == 0
    with pytest.raises(ValueError, match='layout="vd"'):
        flowjax.chunked_token_nll(h, w.T, y)
    with pytest.raises(ValueError, match="chunk_size"):
        flowjax.chunked_token_nll(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="logit_softcap"):
        flowjax.chunked_token_nll(h, w, y, logit_softcap=0.0)
    for bad in (np.inf, -np.inf, np.nan, -1.0):
        with pytest.raises(
            ValueError, match="logit_softcap must be a finite number > 0"
        ):
            flowjax.chunked_token_nll(h, w, y, logit_softcap=bad)
    with pytest.raises(ValueError, match="integer"):
        flowjax.chunked_token_nll(h, w, y.astype(jnp.float32))


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("bad_target", [103, -100])
def test_out_of_vocabulary_targets_under_jit_give_nan_never_a_clamped_loss(
    layout, bad_target
):
    """Under jit the check cannot raise: main clamped 103 to token 102 and returned its loss."""
    h, w, y, _, _ = _data()
    w = w if layout == "dv" else w.T
    yy = y.at[3].set(bad_target)
    kw = {"chunk_size": 16, "layout": layout}
    out = np.asarray(
        jax.jit(lambda h, w, y: flowjax.chunked_token_nll(h, w, y, **kw))(h, w, yy)
    )
    assert np.isnan(out[3])
    ref = np.asarray(_plain(h, w, y, True, None, layout))
    others = np.arange(29) != 3
    np.testing.assert_allclose(out[others], ref[others], rtol=1e-5, atol=1e-5)
    # Backward: NaN reaches the bad row of dh and all of dW, nothing else.
    dh, dw = jax.jit(
        jax.grad(lambda h, w: flowjax.chunked_token_nll(h, w, yy, **kw).sum(), (0, 1))
    )(h, w)
    dh_ref = jax.grad(lambda h: _plain(h, w, y, others, None, layout).sum())(h)
    assert np.isnan(np.asarray(dh)[3]).all() and np.isnan(np.asarray(dw)).all()
    np.testing.assert_allclose(
        np.asarray(dh)[others], np.asarray(dh_ref)[others], rtol=1e-4, atol=1e-5
    )
    # Masked, the same target is never read: finite loss 0 and finite gradients.
    masked = jax.jit(
        jax.grad(
            lambda h, w: flowjax.chunked_token_nll(h, w, yy, mask=others, **kw).sum(),
            (0, 1),
        )
    )(h, w)
    assert all(np.isfinite(np.asarray(g)).all() for g in masked)
    # Concretely it raises, naming the position.
    with pytest.raises(
        ValueError,
        match=r"outside the vocabulary \[0, 103\) at unmasked positions \[3\]",
    ):
        flowjax.chunked_token_nll(h, w, yy, **kw)


def test_benchmark_script_runs_and_checks_agreement(tmp_path, capsys):
    from experiments.benchmarks import chunked_ce

    out = tmp_path / "ce.json"
    chunked_ce.main(
        [
            "--out",
            str(out),
            "--tokens",
            "8",
            "--hidden",
            "4",
            "--vocabs",
            "40",
            "--chunk",
            "16",
            "--repeats",
            "1",
        ]
    )
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    assert rows[0]["plain_temp_mib"] >= 0 and "| 40 | fwd |" in capsys.readouterr().out
