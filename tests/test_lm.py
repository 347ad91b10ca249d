"""Causal-LM losses, token/sequence FLOW weights and the weighted LM objective against numpy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax


def _np_token_nll(logits, tokens, mask):
    """Reference: the official pipeline with labels -100 outside the mask, shifted CE."""
    labels = np.where(mask, tokens, -100)[..., 1:]
    z = logits[..., :-1, :].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    safe = np.where(labels == -100, 0, labels)
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    return np.where(labels == -100, 0.0, nll), labels != -100


def _random_batch(rng, b=5, t=9, v=11):
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    tokens = rng.integers(0, v, size=(b, t))
    lengths = rng.integers(4, t + 1, size=b)
    prompts = rng.integers(1, 3, size=b)
    return logits, tokens, flowjax.response_mask(lengths, prompts, t), lengths, prompts


def test_response_mask_keeps_response_and_eos_only(rng):
    lengths, prompts = np.array([5, 7, 3]), np.array([2, 1, 3])
    m = flowjax.response_mask(lengths, prompts, 7)
    for i in range(3):
        expect = [prompts[i] <= t < lengths[i] for t in range(7)]
        assert m[i].tolist() == expect
    assert not m[2].any()  # prompt == length: truncated response, no target
    with pytest.raises(ValueError, match="prompt_lengths must be >= 1"):
        flowjax.response_mask([3], [0], 4)
    with pytest.raises(ValueError, match="exceed max_len"):
        flowjax.response_mask([5], [1], 4)
    with pytest.raises(ValueError, match="exceed lengths"):
        flowjax.response_mask([2], [3], 4)


@pytest.mark.parametrize("bad", [-1, 2.5, "4", None, True, np.array([4, 5])])
def test_response_mask_rejects_a_bad_max_len(bad):
    with pytest.raises(ValueError, match=r"max_len must be an int >= 0"):
        flowjax.response_mask([1], [1], bad)
    # numpy integers are fine; 0 works for empty batches only
    assert flowjax.response_mask([3], [1], np.int64(4)).shape == (1, 4)
    assert flowjax.response_mask(np.zeros(0, int), np.zeros(0, int), 0).shape == (0, 0)


def test_sequence_nll_ids_of_the_wrong_shape_are_a_clear_error():
    nll = jnp.array([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0]])
    mask = jnp.array([[True, True], [False, False], [True, False]])
    for ids in (np.array([11, 12]), np.array([[11, 12, 13]]), np.arange(6)):
        with pytest.raises(ValueError, match=r"ids has shape .* must be .*\(3,\)"):
            flowjax.sequence_nll(nll, mask, ids=ids)
    # checked even when nothing is empty, so a wrong ids never waits for a bad batch
    with pytest.raises(ValueError, match="ids has shape"):
        flowjax.sequence_nll(nll[:1], mask[:1], ids=np.array([1, 2]))


def test_token_nll_matches_reference_shift_and_mask(rng, variant):
    logits, tokens, mask, *_ = _random_batch(rng)
    nll, m = variant(flowjax.token_nll)(logits, tokens, mask)
    ref, ref_m = _np_token_nll(logits, tokens, mask)
    assert nll.shape == m.shape == (5, 8) and nll.dtype == jnp.float32
    np.testing.assert_array_equal(m, ref_m)
    np.testing.assert_allclose(nll, ref, rtol=1e-5, atol=1e-5)
    # one example [T, V] gives the same row
    one, _ = flowjax.token_nll(logits[2], tokens[2], mask[2])
    np.testing.assert_allclose(one, nll[2], rtol=1e-6)


def test_token_nll_rejects_first_position_target_and_bad_tokens(rng):
    logits, tokens, mask, *_ = _random_batch(rng)
    bad = mask.copy()
    bad[1, 0] = True
    with pytest.raises(ValueError, match=r"position|first token"):
        flowjax.token_nll(logits, tokens, bad)
    out = tokens.copy()
    out[0, np.flatnonzero(mask[0])[0]] = 11
    with pytest.raises(ValueError, match="outside the vocabulary"):
        flowjax.token_nll(logits, out, mask)
    # an ignore index at a non-target position is fine (never read)
    ign = np.where(mask, tokens, -100)
    ign[:, 0] = tokens[:, 0]
    np.testing.assert_allclose(
        flowjax.token_nll(logits, ign, mask)[0],
        flowjax.token_nll(logits, tokens, mask)[0],
    )


def test_sequence_nll_is_mean_over_target_tokens(rng, variant):
    logits, tokens, mask, lengths, prompts = _random_batch(rng)
    nll, m = flowjax.token_nll(logits, tokens, mask)
    seq = variant(flowjax.sequence_nll)(nll, m)
    ref, ref_m = _np_token_nll(logits, tokens, mask)
    expect = np.array([ref[i][ref_m[i]].mean() for i in range(5)])
    np.testing.assert_allclose(seq, expect, rtol=1e-5)
    # the count is response + EOS = length - prompt (position 0 is never a target)
    np.testing.assert_array_equal(ref_m.sum(1), lengths - prompts)


def test_sequence_without_target_raises_or_gives_explicit_nan():
    nll = jnp.array([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0]])
    mask = jnp.array([[True, True], [False, False], [True, False]])
    with pytest.raises(ValueError, match=r"no target token at ids \[12\]"):
        flowjax.sequence_nll(nll, mask, ids=np.array([11, 12, 13]))
    out = flowjax.sequence_nll(nll, mask, on_empty="nan")
    assert out[0] == 2.0 and np.isnan(out[1]) and out[2] == 5.0
    # under jit it cannot raise: NaN, never 0
    assert np.isnan(jax.jit(flowjax.sequence_nll)(nll, mask)[1])
    with pytest.raises(ValueError, match="on_empty"):
        flowjax.sequence_nll(nll, mask, on_empty="zero")


def test_token_and_sequence_weights_match_numpy_reference(rng):
    losses = rng.exponential(size=(6, 10))
    mask = rng.random((6, 10)) < 0.6
    mask[:, 0] = True  # every sequence has a target
    w = flowjax.token_flow_weights(losses, mask)
    tau_ref = np.median(losses[mask])  # over all target tokens, not per sequence
    np.testing.assert_allclose(w, np.where(mask, np.exp(-losses / tau_ref), 0.0))
    # jax input, concrete and under jit
    wj = flowjax.token_flow_weights(jnp.asarray(losses, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(wj, w, rtol=1e-5)
    wt = jax.jit(flowjax.token_flow_weights)(
        jnp.asarray(losses, jnp.float32), jnp.asarray(mask)
    )
    np.testing.assert_allclose(wt, w, rtol=1e-5, atol=1e-7)
    # sequence level: τ_seq = median of per-sequence means (differs from τ_tok)
    seq = np.asarray(flowjax.sequence_nll(jnp.asarray(losses), jnp.asarray(mask)))
    ref_seq = np.array([losses[i][mask[i]].mean() for i in range(6)])
    np.testing.assert_allclose(seq, ref_seq, rtol=1e-6)
    sw = flowjax.flow_weights(seq)
    assert flowjax.median_temperature(seq) == pytest.approx(np.median(ref_seq))
    np.testing.assert_allclose(sw, np.exp(-ref_seq / np.median(ref_seq)), rtol=1e-6)
    with pytest.raises(ValueError, match="no target token"):
        flowjax.token_flow_weights(losses, mask & False)
    bad = losses.copy()
    bad[mask] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        flowjax.token_flow_weights(bad, mask)
    # NaN where the mask is False is never read.
    off = np.where(mask, losses, np.nan)
    np.testing.assert_array_equal(flowjax.token_flow_weights(off, mask), w)


@pytest.mark.parametrize("temperature", [None, 1.0])
@pytest.mark.parametrize("bad", [-3.0, np.nan])
def test_token_flow_weights_under_jit_give_nan_for_bad_target_losses(temperature, bad):
    losses = jnp.array([[0.5, bad, 7.0], [1.0, 2.0, 0.0]])
    mask = jnp.array([[True, True, False], [True, True, False]])
    w = np.asarray(jax.jit(flowjax.token_flow_weights)(losses, mask, temperature))
    assert np.isnan(w[0, 1])  # exp(+3) = 20 under main: a plausible weight
    assert (w[:, 2] == 0).all()  # not targets: 0, whatever the loss there
    if temperature is None:  # the median depends on every target token
        assert np.isnan(w[mask]).all()
    else:
        np.testing.assert_allclose(w[1, :2], np.exp([-1.0, -2.0]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        flowjax.token_flow_weights(np.asarray(losses), np.asarray(mask), temperature)


def _np_official_loss(nll, mask, w, level, n):
    wt = w[:, None] if level == "sequence" else w
    return float(np.sum(np.where(mask, wt * nll, 0.0)) / n)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_weighted_lm_loss_reductions(rng, level, variant):
    nll = rng.exponential(size=(4, 7)).astype(np.float32)
    mask = rng.random((4, 7)) < 0.5
    mask[3] = False  # a padding row: no target tokens
    mask[0, 0] = True
    w = rng.random(4) if level == "sequence" else rng.random((4, 7))

    def f(*a, reduction="tokens"):
        fn = functools.partial(
            flowjax.weighted_lm_loss, level=level, reduction=reduction
        )
        return variant(fn)(*a)

    ntok = mask.sum()
    got = f(nll, mask, w)
    assert float(got) == pytest.approx(
        _np_official_loss(nll, mask, w, level, ntok), rel=1e-5
    )
    wt = np.broadcast_to(w[:, None], nll.shape) if level == "sequence" else w
    per_seq = [np.sum((wt * nll)[i][mask[i]]) / mask[i].sum() for i in range(3)]
    assert float(f(nll, mask, w, reduction="sequences")) == pytest.approx(
        np.mean(per_seq), rel=1e-5
    )
    wsum = np.sum(wt[mask])
    assert float(f(nll, mask, w, reduction="weights")) == pytest.approx(
        np.sum((wt * nll)[mask]) / wsum, rel=1e-5
    )
    # weights None = plain token-mean SFT loss
    assert float(f(nll, mask, None)) == pytest.approx(nll[mask].mean(), rel=1e-5)


def test_weighted_lm_loss_validates():
    nll, mask = jnp.ones((2, 3)), jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match='level="token"'):
        flowjax.weighted_lm_loss(nll, mask, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="negative"):
        flowjax.weighted_lm_loss(nll, mask, jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="denominator"):
        flowjax.weighted_lm_loss(nll, mask, denominator=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        flowjax.weighted_lm_loss(nll, mask, reduction="mean")
    # NaN in masked-out positions does not leak
    nan_nll = jnp.array([[1.0, jnp.nan, 2.0]])
    assert (
        float(flowjax.weighted_lm_loss(nan_nll, jnp.array([[True, False, True]])))
        == 1.5
    )


@pytest.mark.parametrize("reduction", ["tokens", "sequences", "weights"])
def test_weighted_lm_loss_under_jit_gives_nan_for_negative_weights_or_denominator(
    reduction,
):
    nll = jnp.array([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0]])
    mask = jnp.array([[True, True, False], [True, True, False]])
    f = jax.jit(
        lambda w, d: flowjax.weighted_lm_loss(
            nll, mask, w, level="token", reduction=reduction, denominator=d
        )
    )
    w = jnp.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.0]])
    assert np.isfinite(float(f(w, 4.0)))
    assert np.isnan(float(f(w.at[1, 0].set(-1.0), 4.0)))
    assert np.isnan(float(f(w, -4.0)))
    assert np.isfinite(float(f(w.at[1, 2].set(-1.0), 4.0)))  # not counted: not read
    with pytest.raises(ValueError, match="negative"):
        flowjax.weighted_lm_loss(nll, mask, w.at[1, 0].set(-1.0), level="token")


@pytest.mark.parametrize(
    ("level", "reduction"),
    [
        ("sequence", "tokens"),
        ("token", "tokens"),
        ("sequence", "sequences"),
        ("token", "weights"),
    ],
)
def test_gradient_accumulation_with_global_denominator_equals_big_batch(
    rng, level, reduction
):
    """Σ over micro-batches of grad(loss(micro, denominator=global)) == grad(loss(big batch))."""
    b, t, v, d = 8, 6, 7, 3
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    tokens = rng.integers(0, v, size=(b, t))
    mask = flowjax.response_mask(
        rng.integers(3, t + 1, size=b), rng.integers(1, 3, size=b), t
    )
    mask[0] = False  # a row with no target token in one micro-batch
    shape = (b,) if level == "sequence" else (b, t - 1)
    w = rng.random(shape).astype(np.float32)
    theta = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)

    def loss(theta, x, tokens, mask, w, denominator):
        nll, m = flowjax.token_nll(x @ theta, tokens, mask)
        return flowjax.weighted_lm_loss(
            nll, m, w, level=level, reduction=reduction, denominator=denominator
        )

    grad = jax.jit(jax.grad(loss))  # compiled once per shape (big batch, micro-batch)

    def grad_of(sl, denominator=None):
        return grad(theta, x[sl], tokens[sl], mask[sl], w[sl], denominator)

    big = grad_of(slice(None))
    m1 = mask[:, 1:]
    wt = np.broadcast_to(w[:, None], m1.shape) if level == "sequence" else w
    global_n = {
        "tokens": m1.sum(),
        "sequences": (m1.sum(1) > 0).sum(),
        "weights": wt[m1].sum(),
    }[reduction]
    micro = [slice(0, 4), slice(4, 8)]
    acc = sum(grad_of(sl, global_n) for sl in micro)
    np.testing.assert_allclose(acc, big, rtol=1e-5, atol=1e-6)
    # each micro-batch's own count is NOT the big-batch gradient (counts differ)
    naive = sum(grad_of(sl) for sl in micro) / len(micro)
    assert not np.allclose(naive, big, rtol=1e-3)
