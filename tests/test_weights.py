"""flowjax.flow_weights, dro_weights and median_temperature against numpy and the paper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax


def _losses(rng, n=101):
    return rng.gamma(2.0, 0.7, size=n).astype(np.float32)


def _reference(losses, tau, normalize=None, sign=-1.0):
    w = np.exp(sign * np.asarray(losses, np.float64) / tau)
    if normalize == "sum":
        return w / w.sum()
    if normalize == "mean":
        return w / w.mean()
    return w


@pytest.mark.parametrize("normalize", [None, "mean", "sum"])
def test_numpy_path_matches_numpy_reference_and_keeps_dtype(rng, normalize):
    losses = _losses(rng)
    w = flowjax.flow_weights(losses, normalize=normalize)
    assert isinstance(w, np.ndarray) and w.dtype == np.float32
    tau = flowjax.median_temperature(losses)
    assert tau == float(np.median(losses.astype(np.float64)))
    np.testing.assert_allclose(w, _reference(losses, tau, normalize), rtol=1e-6)
    w64 = flowjax.flow_weights(losses.astype(np.float64), normalize=normalize)
    assert w64.dtype == np.float64
    np.testing.assert_allclose(w64, _reference(losses, tau, normalize), rtol=1e-12)


@pytest.mark.parametrize("normalize", [None, "mean", "sum"])
@pytest.mark.parametrize("temperature", [None, 0.8])
def test_jax_path_with_and_without_jit_matches_numpy(
    rng, normalize, temperature, variant
):
    losses = _losses(
        rng, 100
    )  # even count: median is the mean of the two middle values

    @variant
    def weights(x):
        return flowjax.flow_weights(x, temperature, normalize=normalize)

    w = weights(jnp.asarray(losses))
    assert isinstance(w, jax.Array) and w.dtype == jnp.float32
    tau_ref = (
        np.median(losses.astype(np.float64)) if temperature is None else temperature
    )
    np.testing.assert_allclose(
        np.asarray(w), _reference(losses, tau_ref, normalize), rtol=2e-6
    )


def test_median_example_gets_exactly_inverse_e(rng):
    losses = _losses(rng, 101).astype(np.float64)
    w = flowjax.flow_weights(losses)
    assert w[np.argsort(losses)[50]] == np.exp(-1.0)
    assert flowjax.median_temperature(losses) == np.sort(losses)[50]


def test_weights_fall_strictly_as_loss_rises_and_lie_in_0_1(rng):
    losses = np.sort(_losses(rng)).astype(np.float64)
    w = flowjax.flow_weights(losses)
    assert np.all(np.diff(w) < 0) and np.all(w > 0) and np.all(w <= 1)
    # a perfectly fit example gets 1
    assert flowjax.flow_weights(np.array([0.0, 1.0]))[0] == 1.0


def test_infinite_temperature_gives_uniform_weights(rng):
    losses = _losses(rng)
    w = flowjax.flow_weights(losses, 1e30)
    np.testing.assert_array_equal(w, np.ones_like(w))
    w_mean = flowjax.flow_weights(losses, 1e30, normalize="mean")
    np.testing.assert_allclose(w_mean, 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e4])
def test_scaling_losses_and_temperature_together_leaves_weights_unchanged(rng, scale):
    losses = _losses(rng).astype(np.float64)
    np.testing.assert_allclose(
        flowjax.flow_weights(scale * losses, 0.9 * scale),
        flowjax.flow_weights(losses, 0.9),
        rtol=1e-12,
    )
    # the median scales with the losses
    w_scaled = flowjax.flow_weights(scale * losses)
    np.testing.assert_allclose(w_scaled, flowjax.flow_weights(losses), rtol=1e-12)
    np.testing.assert_allclose(
        flowjax.median_temperature(scale * losses),
        scale * flowjax.median_temperature(losses),
        rtol=1e-12,
    )


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_normalised_weights_are_computed_in_log_space(normalize):
    losses = np.array([1000.0, 1001.0, 2000.0])  # raw exp(-f/1) underflows to 0 for all
    w = flowjax.flow_weights(losses, 1.0, normalize=normalize)
    total = 3.0 if normalize == "mean" else 1.0
    ref = total * np.array([1.0, np.exp(-1.0), 0.0]) / (1 + np.exp(-1.0))
    np.testing.assert_allclose(w, ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(w.sum(), total, rtol=1e-12)


def test_sum_normalised_weights_minimise_the_entropy_regularised_objective(rng):
    """Proposition 4.3: π* = softmax(-f/τ) minimises Σ π f + τ Σ π log π over the simplex."""
    losses = _losses(rng, 20).astype(np.float64)
    pi = flowjax.flow_weights(losses, normalize="sum")
    tau = flowjax.median_temperature(losses)

    def g(p):
        return p @ losses + tau * np.sum(p * np.log(p))

    others = rng.dirichlet(np.ones(20), size=2000)
    nearby = np.clip(pi + 1e-3 * rng.normal(size=(2000, 20)), 1e-12, None)
    nearby /= nearby.sum(1, keepdims=True)
    assert g(pi) < min(g(p) for p in others)
    assert g(pi) <= min(g(p) for p in nearby)


def test_dro_weights_are_the_opposite_softmax_and_never_overflow_when_normalised(rng):
    losses = np.sort(_losses(rng)).astype(np.float64)
    w = flowjax.dro_weights(losses, 0.5, normalize="sum")
    np.testing.assert_allclose(w, _reference(losses, 0.5, "sum", sign=+1.0), rtol=1e-12)
    assert np.all(np.diff(w) > 0)  # hard examples get more weight
    big = np.array([1e4, 2e4])
    w_big = flowjax.dro_weights(big, 1.0, normalize="mean")
    np.testing.assert_allclose(w_big, [0.0, 2.0], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="overflows"):
        flowjax.dro_weights(big, 1.0)
    jw = jax.jit(lambda x: flowjax.dro_weights(x, 0.5, normalize="sum"))(
        jnp.asarray(losses, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(jw), w, rtol=2e-5)


def test_median_temperature_uses_numpys_definition():
    assert flowjax.median_temperature([3.0, 1.0, 2.0]) == 2.0
    assert flowjax.median_temperature(np.array([4.0, 1.0, 2.0, 3.0], np.float32)) == 2.5
    assert flowjax.median_temperature(jnp.array([0.1, 0.2])) == pytest.approx(
        0.15, rel=1e-7
    )
    x = np.random.default_rng(1).random(1000)
    assert flowjax.median_temperature(x) == float(np.median(x))


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
@pytest.mark.parametrize(
    ("losses", "kwargs", "match"),
    [
        ([0.5, np.nan, 1.0], {}, r"NaN or infinite values at positions \[1\]"),
        (
            [0.5, 1.0, np.inf, np.inf],
            {},
            r"NaN or infinite values at positions \[2, 3\]",
        ),
        ([0.5, -0.1, 1.0], {}, r"non-negative.*positions \[1\]"),
        ([], {}, "empty"),
        ([0.0, 0.0, 1.0], {}, "median pre-trained loss is 0.*explicit temperature"),
        ([0.5, 1.0], {"temperature": 0.0}, "temperature must be a finite number > 0"),
        ([0.5, 1.0], {"temperature": -2.0}, "temperature must be a finite number > 0"),
        (
            [0.5, 1.0],
            {"temperature": float("nan")},
            "temperature must be a finite number > 0",
        ),
        (
            [0.5, 1.0],
            {"temperature": float("inf")},
            "temperature must be a finite number > 0",
        ),
        ([0.5, 1.0], {"temperature": "median"}, "temperature must be None"),
        ([0.5, 1.0], {"normalize": "max"}, "normalize must be"),
    ],
)
def test_bad_input_raises_a_clear_error(losses, kwargs, match, as_jax):
    x = jnp.asarray(losses, jnp.float32) if as_jax else np.asarray(losses, np.float64)
    with pytest.raises(ValueError, match=match):
        flowjax.flow_weights(x, **kwargs)


@pytest.mark.parametrize(
    ("losses", "match"),
    [
        ([], "empty"),
        ([1.0, np.nan], "NaN"),
        ([-1.0, 1.0], "non-negative"),
        ([0.0, 0.0, 3.0], "median pre-trained loss is 0"),
    ],
)
def test_median_temperature_rejects_bad_input(losses, match):
    with pytest.raises(ValueError, match=match):
        flowjax.median_temperature(losses)


def test_under_jit_bad_values_give_nan_weights_never_zero():
    w = jax.jit(flowjax.flow_weights)(jnp.array([0.5, jnp.nan, 1.0]))
    assert np.isnan(np.asarray(w)).all()
    w = jax.jit(lambda x: flowjax.flow_weights(x, 1.0))(jnp.array([0.5, jnp.nan, 1.0]))
    assert np.isnan(np.asarray(w)[1]) and np.isfinite(np.asarray(w)[[0, 2]]).all()
    for normalize in ("mean", "sum"):
        w = jax.jit(lambda x, n=normalize: flowjax.flow_weights(x, 1.0, normalize=n))(
            jnp.array([0.5, jnp.nan])
        )
        assert np.isnan(np.asarray(w)).all()
    w = jax.jit(flowjax.flow_weights)(jnp.array([0.0, 0.0, 1.0]))  # median 0
    assert np.isnan(np.asarray(w)).all()
    w = jax.jit(lambda x, t: flowjax.flow_weights(x, t))(jnp.array([0.5, 1.0]), -1.0)
    assert np.isnan(np.asarray(w)).all()
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(flowjax.median_temperature)(jnp.array([1.0, 2.0]))


@pytest.mark.parametrize("normalize", [None, "mean", "sum"])
@pytest.mark.parametrize("temperature", [None, 1.0])
@pytest.mark.parametrize("bad", [-5.0, np.nan, np.inf])
def test_under_jit_a_negative_nan_or_inf_loss_gives_nan_never_a_plausible_weight(
    normalize, temperature, bad
):
    """A negative loss used to give exp(5) = 148 under jit; inf gave a weight of 0."""
    x = jnp.array([bad, 1.0, 2.0, 0.5])
    w = np.asarray(
        jax.jit(lambda x: flowjax.flow_weights(x, temperature, normalize=normalize))(x)
    )
    if temperature is None or normalize is not None:
        assert np.isnan(w).all()  # every weight depends on every loss
    else:  # a fixed τ, no normalisation: only the bad example's weight is unknown
        assert np.isnan(w[0])
        np.testing.assert_allclose(w[1:], np.exp(-np.array([1.0, 2.0, 0.5])), rtol=1e-6)
    # Concretely, the same input raises, naming the position.
    with pytest.raises(ValueError, match=r"positions \[0\]"):
        flowjax.flow_weights(x, temperature, normalize=normalize)
    with pytest.raises(ValueError, match=r"positions \[0\]"):
        flowjax.flow_weights(np.asarray(x), temperature, normalize=normalize)


@pytest.mark.parametrize("normalize", [None, "mean", "sum"])
def test_under_jit_dro_weights_give_nan_for_nan_or_inf_but_accept_negative_losses(
    normalize,
):
    f = jax.jit(lambda x: flowjax.dro_weights(x, 1.0, normalize=normalize))
    for bad in (np.nan, np.inf, -np.inf):
        w = np.asarray(f(jnp.array([bad, 1.0, 2.0])))
        assert np.isnan(w[0]) and (normalize is None or np.isnan(w).all())
        with pytest.raises(
            ValueError, match=r"NaN or infinite values at positions \[0\]"
        ):
            flowjax.dro_weights(jnp.array([bad, 1.0, 2.0]), 1.0, normalize=normalize)
    # DRO's losses may be negative (current-model losses of any sign).
    w = np.asarray(f(jnp.array([-1.0, 1.0])))
    ref = np.exp([-1.0, 1.0])
    ref = {None: ref, "mean": 2 * ref / ref.sum(), "sum": ref / ref.sum()}[normalize]
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    w = np.asarray(jax.jit(flowjax.dro_weights)(jnp.array([0.0, 0.0, 1.0])))  # median 0
    assert np.isnan(w).all()
    # A negative median is no temperature either: NaN under jit, an error concretely.
    negative = jnp.array([-2.0, -1.0, 1.0])
    assert np.isnan(np.asarray(jax.jit(flowjax.dro_weights)(negative))).all()
    for x in (negative, np.asarray(negative)):
        with pytest.raises(ValueError, match=r"the median loss is -1 < 0"):
            flowjax.dro_weights(x)


def test_empty_losses_raise_with_and_without_jit():
    for fn in (flowjax.flow_weights, flowjax.dro_weights):
        for x in (np.zeros(0), jnp.zeros(0)):
            with pytest.raises(ValueError, match="empty"):
                fn(x, 1.0)
        with pytest.raises(ValueError, match="empty"):
            jax.jit(lambda x, fn=fn: fn(x, 1.0))(jnp.zeros(0))
