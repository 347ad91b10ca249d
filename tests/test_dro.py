"""dro_loss: numpy reference, the KL-DRO dual's gradient, the τ limits, masks, FLOW weights."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax


def _np_dro(losses, tau, weights=None, mask=None):
    ls = np.asarray(losses, np.float64)
    w = np.ones_like(ls) if weights is None else np.asarray(weights, np.float64)
    m = np.ones(ls.shape, bool) if mask is None else np.asarray(mask)
    logits = np.where(m & (w > 0), ls / tau + np.log(np.where(w > 0, w, 1)), -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return np.sum(np.where(m, p * np.where(m, ls, 0), 0))


def test_dro_loss_matches_numpy_with_weights_and_mask(rng, variant):
    losses = rng.gamma(2.0, 1.0, 10).astype(np.float32)
    w = rng.random(10).astype(np.float32)
    w[3] = 0.0
    mask = rng.random(10) < 0.7
    fn = variant(lambda ls, w, m, t: flowjax.dro_loss(ls, t, weights=w, where=m))
    for tau in (0.3, 1.0, 5.0):
        np.testing.assert_allclose(
            float(fn(losses, w, mask, tau)), _np_dro(losses, tau, w, mask), rtol=1e-6
        )
    plain = variant(lambda ls: flowjax.dro_loss(ls, 0.7))
    np.testing.assert_allclose(float(plain(losses)), _np_dro(losses, 0.7), rtol=1e-6)


def test_dro_loss_reweights_by_the_static_dro_weights_of_the_current_losses(rng):
    losses = rng.gamma(2.0, 1.0, 8)
    p = flowjax.dro_weights(losses, 1.5, normalize="sum")
    np.testing.assert_allclose(
        float(flowjax.dro_loss(jnp.asarray(losses, jnp.float32), 1.5)),
        np.sum(p * losses),
        rtol=1e-6,
    )


def _model_losses(theta, x, y):
    return (x @ theta - y) ** 2


@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_equals_the_kl_dro_dual_gradient(rng, weighted):
    x = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=12), jnp.float32)
    theta = jnp.asarray(rng.normal(size=3), jnp.float32)
    w = jnp.asarray(rng.random(12), jnp.float32) if weighted else jnp.ones(12)
    tau = 0.8

    def dro(theta):
        return flowjax.dro_loss(_model_losses(theta, x, y), tau, weights=w)

    def dual(
        theta,
    ):  # τ log Σ_i w_i exp(ℓ_i/τ) (minus a constant: log mean exp for w = 1)
        ls = _model_losses(theta, x, y)
        return tau * jax.scipy.special.logsumexp(ls / tau, b=w) - tau * np.log(12)

    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.grad(dro))(theta)),
        np.asarray(jax.jit(jax.grad(dual))(theta)),
        rtol=2e-5,
    )
    # The value is the p-weighted mean loss, not the dual's value.
    ls = np.asarray(_model_losses(theta, x, y))
    np.testing.assert_allclose(
        float(dro(theta)), _np_dro(ls, tau, np.asarray(w)), rtol=1e-6
    )


def test_infinite_temperature_limit_is_the_plain_or_weighted_mean(rng, variant):
    losses = jnp.asarray(rng.gamma(2.0, 1.0, 8), jnp.float32)
    w = jnp.asarray(rng.random(8), jnp.float32)
    fn = variant(lambda ls, t: flowjax.dro_loss(ls, t))
    # exp(ℓ/τ - max) rounds to exactly 1: p is exactly 1/8 and the sum scales exactly.
    assert float(fn(losses, 1e30)) == float(jnp.mean(losses))
    got = variant(lambda ls, w: flowjax.dro_loss(ls, 1e30, weights=w))(losses, w)
    expected = flowjax.weighted_loss(losses, w, reduction="normalized")
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
    # ... and τ → 0 selects the worst example.
    assert float(fn(losses, 1e-6)) == float(jnp.max(losses))


def test_masked_entries_are_excluded_and_their_nan_does_not_leak(variant):
    losses = jnp.array([1.0, jnp.nan, 3.0, jnp.inf])
    mask = jnp.array([True, False, True, False])
    fn = variant(lambda ls, m: flowjax.dro_loss(ls, 1.0, where=m))
    np.testing.assert_allclose(
        float(fn(losses, mask)), _np_dro([1.0, 3.0], 1.0), rtol=1e-6
    )
    g = np.asarray(jax.grad(fn)(losses, mask))  # dL/dℓ = p: 0 on masked entries
    p = np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum()
    np.testing.assert_allclose(g, [p[0], 0.0, p[1], 0.0], rtol=1e-6)
    assert float(fn(losses, jnp.zeros(4, bool))) == 0.0  # no counted entry
    # NaN in a counted entry is not hidden, even with weight 0.
    assert np.isnan(
        float(flowjax.dro_loss(losses[:2], 1.0, weights=jnp.array([1.0, 0.0])))
    )


def test_counted_entries_with_all_weights_zero_give_nan_like_normalized(variant):
    # Like weighted_loss(..., reduction="normalized"): Σw = 0 over counted entries
    # has no distribution to reweight; NaN (value and gradient), never a silent 0.
    losses = jnp.array([1.0, 2.0, 3.0])
    weights = jnp.array([0.0, 0.0, 5.0])
    mask = jnp.array([True, True, False])  # the only positive weight is masked out
    fn = variant(lambda ls, w, m: flowjax.dro_loss(ls, 1.0, weights=w, where=m))
    assert np.isnan(float(fn(losses, weights, mask)))
    assert np.isnan(
        float(
            flowjax.weighted_loss(losses, weights, where=mask, reduction="normalized")
        )
    )
    assert np.isnan(np.asarray(jax.grad(fn)(losses, weights, mask))[:2]).all()
    assert np.isnan(float(fn(losses, jnp.zeros(3), jnp.ones(3, bool))))
    # With no counted entry at all (a padding-only batch) both give 0, as before.
    assert float(fn(losses, weights, jnp.zeros(3, bool))) == 0.0
    # One positive counted weight: p puts all mass on it.
    np.testing.assert_allclose(
        float(fn(losses, jnp.array([0.0, 2.0, 0.0]), mask)), 2.0, rtol=1e-6
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dro_loss_keeps_the_dtype(dtype):
    losses = jnp.array([0.5, 1.0, 2.0], dtype)
    out = flowjax.dro_loss(losses, 1.0)
    assert out.dtype == dtype
    np.testing.assert_allclose(float(out), _np_dro(np.float32(losses), 1.0), rtol=1e-2)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"temperature": 0.0}, "finite number > 0"),
        ({"temperature": -2.0}, "finite number > 0"),
        ({"temperature": np.inf}, "finite number > 0"),
        ({"temperature": np.nan}, "finite number > 0"),
        ({"temperature": "median"}, "needs a fixed τ"),
        ({"weights": np.ones(2)}, "do not match"),
        ({"where": np.ones(2, bool)}, "where has shape"),
        ({"weights": np.array([1.0, -1.0, 1.0])}, "weights must be >= 0"),
        ({"weights": np.array([1.0, np.nan, 1.0])}, "NaN or infinite"),
    ],
)
def test_dro_loss_errors(kw, match):
    args = {"temperature": 1.0, **kw}
    with pytest.raises(ValueError, match=match):
        flowjax.dro_loss(np.ones(3, np.float32), args.pop("temperature"), **args)


def test_bad_temperature_under_jit_gives_nan():
    out = jax.jit(lambda t: flowjax.dro_loss(jnp.ones(3), t))(-1.0)
    assert np.isnan(float(out))


def test_an_empty_batch_is_an_error_that_says_it_is_empty():
    for losses in (np.zeros(0, np.float32), jnp.zeros((0, 5))):
        with pytest.raises(
            ValueError, match=r"dro_loss got an empty batch \(losses of shape"
        ):
            flowjax.dro_loss(losses, 1.0)
        with pytest.raises(ValueError, match="empty batch"):
            jax.jit(lambda x: flowjax.dro_loss(x, 1.0))(jnp.asarray(losses))
    with pytest.raises(ValueError, match="temperature=None for the median"):
        flowjax.dro_loss(np.ones(3, np.float32), None)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_counted_weights_under_jit_give_nan_never_the_loss_without_them(bad):
    """A negative or NaN weight used to drop its example silently under jit (value 1.0 here)."""
    f = jax.jit(lambda ls, w: flowjax.dro_loss(ls, 1.0, weights=w))
    losses, w = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, bad, 0.0])
    assert np.isnan(float(f(losses, w)))
    assert np.isnan(np.asarray(jax.grad(lambda ls: f(ls, w))(losses))).all()
    # masked out, the same weight is never read
    g = jax.jit(
        lambda ls, w: flowjax.dro_loss(
            ls, 1.0, weights=w, where=jnp.array([1, 0, 1], bool)
        )
    )
    assert float(g(losses, w)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weights"):
        flowjax.dro_loss(losses, 1.0, weights=w)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_counted_losses_give_nan_with_and_without_jit(bad):
    losses = jnp.array([1.0, bad, 0.5])
    for fn in (flowjax.dro_loss, jax.jit(flowjax.dro_loss)):
        assert np.isnan(float(fn(losses, 1.0)))


def test_dro_with_flow_weights_in_one_jitted_step(rng):
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.normal(size=16).astype(np.float32)
    theta0 = np.zeros(3, np.float32)
    ids = np.arange(16) * 7
    table = flowjax.LossTable(ids=ids, losses=np.asarray(_model_losses(theta0, x, y)))
    batch = flowjax.attach_weights({"id": ids, "x": x, "y": y}, table.flow_weights())
    tau = 0.5

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(theta, batch):
        def objective(theta):
            losses = jax.vmap(lambda xi, yi: (xi @ theta - yi) ** 2)(
                batch["x"], batch["y"]
            )
            return flowjax.dro_loss(losses, tau, weights=batch["weight"])

        value, grad = jax.value_and_grad(objective)(theta)
        return theta - 0.05 * grad, value, grad

    theta = jnp.asarray(rng.normal(size=3), jnp.float32)
    _, value, grad = step(theta, batch)
    r = x @ np.asarray(theta, np.float64) - y
    p = batch["weight"] * np.exp(r**2 / tau - (r**2 / tau).max())
    p /= p.sum()
    np.testing.assert_allclose(float(value), np.sum(p * r**2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), (2 * p * r) @ x, rtol=1e-4, atol=1e-6)
    for _ in range(3):
        theta, _, _ = step(theta, batch)
