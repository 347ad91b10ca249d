"""weighted_loss, weighted_objective and attach_weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flowjax


def _data(rng, n=12):
    return (
        rng.gamma(2.0, 1.0, n).astype(np.float32),
        rng.random(n).astype(np.float32),
        rng.random(n) < 0.7,
    )


def test_reductions_match_numpy_with_and_without_mask(rng, variant):
    losses, w, mask = _data(rng)
    l64, w64 = losses.astype(np.float64), w.astype(np.float64)
    for m in (None, mask):
        mm = np.ones_like(mask) if m is None else m
        expected = {
            "mean": np.sum(w64 * l64 * mm)
            / mm.sum(),  # the official vision loss: Σwℓ / B
            "sum": np.sum(w64 * l64 * mm),
            "normalized": np.sum(w64 * l64 * mm) / np.sum(w64 * mm),
        }
        for r, value in expected.items():
            fn = variant(
                lambda losses, w, m, r=r: flowjax.weighted_loss(
                    losses, w, where=m, reduction=r
                )
            )
            np.testing.assert_allclose(float(fn(losses, w, m)), value, rtol=1e-6)


def test_unit_weights_give_exactly_the_plain_mean(rng):
    losses, _, _ = _data(rng)
    assert flowjax.weighted_loss(losses, np.ones_like(losses)) == jnp.mean(losses)


def test_token_level_losses_with_sequence_weights_give_the_official_llm_loss(rng):
    nll = rng.gamma(1.0, 1.0, (4, 6)).astype(np.float32)
    targets = np.zeros((4, 6), bool)
    targets[:, 2:] = True  # prompt tokens are not targets
    targets[3, 4:] = False  # padding
    seq_w = rng.random((4, 1)).astype(np.float32)
    got = flowjax.weighted_loss(nll, seq_w, where=targets)
    # Σ_i w_i Σ_t nll_it / #target tokens (FLOW_PAPER.md §2.2, WeightedLossTrainer).
    expected = (
        sum(seq_w[i, 0] * nll[i][targets[i]].sum() for i in range(4)) / targets.sum()
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_masked_nan_does_not_leak_and_empty_selection_is_zero(rng):
    losses = jnp.array([1.0, jnp.nan, 3.0])
    w = jnp.array([1.0, 1.0, 0.5])
    m = jnp.array([True, False, True])
    assert float(flowjax.weighted_loss(losses, w, where=m)) == pytest.approx(1.25)
    none = jnp.zeros(3, bool)
    for r in ("mean", "sum", "normalized"):
        assert float(flowjax.weighted_loss(losses, w, where=none, reduction=r)) == 0.0
    assert np.isnan(
        float(flowjax.weighted_loss(jnp.ones(2), jnp.zeros(2), reduction="normalized"))
    )


@pytest.mark.parametrize(
    ("losses", "weights", "kw", "match"),
    [
        (
            np.ones(3),
            np.ones(4),
            {},
            r"weights of shape \(4,\) do not match losses of shape \(3,\)",
        ),
        (np.ones((2, 3)), np.ones(2), {}, "do not match"),
        (np.ones(3), np.ones(3), {"where": np.ones(2, bool)}, "where has shape"),
        (np.ones(3), np.ones(3), {"reduction": "max"}, "reduction must be one of"),
        (
            np.ones(3),
            np.array([1.0, -1.0, 1.0]),
            {},
            r"weights must be >= 0; negative at positions \[1\]",
        ),
        (
            np.ones(3),
            np.array([1.0, np.nan, 1.0]),
            {},
            r"NaN or infinite values at positions \[1\]",
        ),
    ],
)
def test_bad_weighted_loss_input_raises(losses, weights, kw, match):
    with pytest.raises(ValueError, match=match):
        flowjax.weighted_loss(losses, weights, **kw)


def _linreg(p, ex):
    return (ex["x"] @ p - ex["y"]) ** 2


def test_weighted_objective_trains_to_the_weighted_least_squares_solution(rng):
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.5 * rng.normal(size=64)).astype(np.float32)
    w = rng.random(64).astype(np.float32)
    batch = {"id": np.arange(64), "x": x, "y": y, "weight": w}
    objective = flowjax.weighted_objective(_linreg)
    opt = optax.sgd(0.1)
    params = jnp.zeros(3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        value, grad = jax.value_and_grad(objective)(params, batch)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(params, updates), state, value

    for _ in range(800):
        params, state, _ = step(params, state, batch)
    closed_form = np.linalg.solve((x.T * w) @ x, (x.T * w) @ y)
    np.testing.assert_allclose(np.asarray(params), closed_form, rtol=1e-4, atol=1e-5)


def test_weighted_objective_value_grad_metrics_and_valid_rows(rng):
    x = rng.normal(size=(5, 2)).astype(np.float32)
    y = rng.normal(size=5).astype(np.float32)
    w = np.array([1.0, 0.5, 0.25, 2.0, 9.0], np.float32)
    valid = np.array([True, True, True, True, False])
    p = jnp.array([0.3, -0.7])
    batch = {"id": np.arange(5), "x": x, "y": y, "weight": w, "valid": valid}
    objective = flowjax.weighted_objective(
        _linreg, valid_key="valid", return_metrics=True
    )
    (value, metrics), grad = jax.value_and_grad(objective, has_aux=True)(p, batch)
    r = x[:4] @ np.asarray(p) - y[:4]
    np.testing.assert_allclose(float(value), np.sum(w[:4] * r**2) / 4, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), 2 * (w[:4] * r) @ x[:4] / 4, rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["loss_unweighted"]), np.mean(r**2), rtol=1e-6
    )
    np.testing.assert_allclose(float(metrics["weight_mean"]), w[:4].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"no 'weight' field.*attach_weights"):
        flowjax.weighted_objective(_linreg)(p, {"id": np.arange(5), "x": x, "y": y})


def test_attach_weights_by_id_never_by_position():
    table = flowjax.LossTable(ids=[100, 200, 300, 400], losses=[0.0, 0.5, 1.0, 2.0])
    weights = table.flow_weights()  # τ = 0.75
    batch = {"id": np.array([300, 100, 400]), "x": np.zeros((3, 2))}
    out = flowjax.attach_weights(batch, weights)
    np.testing.assert_allclose(
        out["weight"], np.exp(-np.array([1.0, 0.0, 2.0]) / 0.75), rtol=1e-6
    )
    assert "weight" not in batch and out["x"] is batch["x"]
    w_arr, _ = flowjax.flow_weights(table.losses)
    out2 = flowjax.attach_weights(batch, w_arr, ids=table.ids, key="w")
    np.testing.assert_array_equal(out2["w"], out["weight"])


@pytest.mark.parametrize(
    ("batch", "weights", "kw", "match"),
    [
        (
            {"id": np.array([1, 5])},
            "table",
            {},
            r"ids \[5\] are not in this WeightTable",
        ),
        ({"x": np.ones(2)}, "table", {}, 'no "id" field'),
        ({"id": np.array([1])}, np.ones(3), {}, "never by position"),
        (
            {"id": np.array([1])},
            np.ones(3),
            {"ids": [1, 2]},
            "different lengths: 2 != 3",
        ),
        ({"id": np.array([1])}, np.ones(2), {"ids": [1, 1]}, "duplicate example ids"),
        (
            {"id": np.array([1])},
            "table",
            {"ids": [1, 2, 3]},
            "only for a weights array",
        ),
    ],
)
def test_attach_weights_errors(batch, weights, kw, match):
    if isinstance(weights, str):
        weights = flowjax.WeightTable([1, 2, 3], [1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match=match):
        flowjax.attach_weights(batch, weights, **kw)
