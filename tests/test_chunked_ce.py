"""chunked_token_nll equals the plain full-logits cross-entropy in value and gradient, and stays lean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax


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
    with pytest.raises(ValueError, match="integer"):
        flowjax.chunked_token_nll(h, w, y.astype(jnp.float32))


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
