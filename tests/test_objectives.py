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
    w_arr = table.flow_weights().weights  # an array aligned with table.ids
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


# ----------------------------------------------------------------------------- BatchNorm: batched objective

from flax import nnx  # noqa: E402


class _BNCNN(nnx.Module):
    """conv -> BatchNorm -> relu -> global mean pool -> head: a ResNet stem in miniature."""

    def __init__(self, rngs, classes=3):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(4, classes, rngs=rngs)

    def features(self, x):
        return self.conv(x)

    def __call__(self, x):
        return self.head(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2)))


def _images(rng, n=8):
    return {
        "id": np.arange(100, 100 + n),
        "x": rng.normal(size=(n, 6, 6, 1)).astype(np.float32) + 0.5,
        "y": rng.integers(0, 3, size=n).astype(np.int32),
        "weight": rng.uniform(0.05, 1.0, size=n).astype(np.float32),
    }


def test_batched_objective_trains_a_batchnorm_cnn_like_a_hand_written_step(rng):
    """Whole-batch loss with FLOW weights: same loss, gradients and running statistics as
    the hand-written NNX step, for several optax steps."""
    model = _BNCNN(nnx.Rngs(0))
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    stats0 = jax.tree.map(jnp.copy, stats)

    def batch_loss(params, batch, stats):
        m = nnx.merge(graphdef, params, stats, copy=True)
        logits = m(batch["x"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return losses, nnx.state(m, nnx.BatchStat)

    objective = flowjax.weighted_objective(
        batch_loss, batched=True, has_aux=True, return_metrics=True
    )

    def hand(params, stats, x, y, w):
        m = nnx.merge(graphdef, params, stats, copy=True)
        logp = jax.nn.log_softmax(m(x))
        ce = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
        return jnp.sum(w * ce) / x.shape[0], nnx.state(m, nnx.BatchStat)

    tx = optax.sgd(0.5, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state, batch):
        (loss, (stats, metrics)), g = jax.value_and_grad(objective, has_aux=True)(
            params, batch, stats
        )
        updates, opt_state = tx.update(g, opt_state, params)
        assert set(metrics) == {"loss_unweighted", "weight_mean"}
        return optax.apply_updates(params, updates), stats, opt_state, loss, g

    @jax.jit
    def hand_step(params, stats, opt_state, batch):
        (loss, stats), g = jax.value_and_grad(hand, has_aux=True)(
            params, stats, batch["x"], batch["y"], batch["weight"]
        )
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss, g

    a = (params, stats, tx.init(params))
    b = (params, stats, tx.init(params))
    for t in range(3):
        batch = _images(rng)
        *a, loss_a, g_a = step(*a, batch)
        *b, loss_b, g_b = hand_step(*b, batch)
        np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
        jax.tree.map(
            lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
            g_a,
            g_b,
        )
        jax.tree.map(
            lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
            (a[0], a[1]),
            (b[0], b[1]),
        )
        if t == 0:  # the running mean moved by (1 - momentum) · the batch mean
            h = np.asarray(model.features(jnp.asarray(batch["x"])), np.float64)
            np.testing.assert_allclose(
                a[1]["bn"]["mean"][...], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4
            )
    assert (
        np.abs(np.asarray(a[1]["bn"]["var"][...] - stats0["bn"]["var"][...])).max()
        > 1e-3
    )
    # The weights matter: unit weights give another gradient.
    unit = {**batch, "weight": np.ones_like(batch["weight"])}
    g_unit = jax.grad(lambda p: objective(p, unit, a[1])[0])(a[0])
    g_w = jax.grad(lambda p: objective(p, batch, a[1])[0])(a[0])
    diff = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), g_unit, g_w)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_batched_objective_checks_the_loss_shape_and_keeps_the_valid_field(rng):
    batch = {**_images(rng), "valid": np.array([True] * 6 + [False] * 2)}
    seen = {}

    def batch_loss(p, b):
        seen.update(b)
        return jnp.sum(b["x"], axis=(1, 2, 3)) * p

    objective = flowjax.weighted_objective(
        batch_loss, batched=True, valid_key="valid", return_metrics=True
    )
    value, metrics = objective(2.0, batch)
    assert set(seen) == {
        "x",
        "y",
        "valid",
    }  # the model may mask padding out of BN stats
    per = 2.0 * batch["x"].astype(np.float64).sum(axis=(1, 2, 3))
    m = batch["valid"]
    np.testing.assert_allclose(
        float(value), np.sum(batch["weight"][m] * per[m]) / m.sum(), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(metrics["loss_unweighted"]), per[m].mean(), rtol=1e-5
    )
    scalar = flowjax.weighted_objective(lambda p, b: jnp.sum(b["x"]) * p, batched=True)
    with pytest.raises(
        ValueError, match=r"one loss per example of the batch, shape \[B\]"
    ):
        scalar(2.0, batch)
    short = flowjax.weighted_objective(lambda p, b: b["y"][:3] * p, batched=True)
    with pytest.raises(ValueError, match="a batch of 8 examples"):
        short(2.0, batch)


class _BNMLP(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.body(x))))


def test_prepass_of_a_batchnorm_model_needs_eval_mode_then_flow_trains_it(rng):
    """In train mode each example is normalised by itself inside the pre-pass's vmap: every
    loss is log C. In eval mode (nnx.view) the losses differ per example and are the
    batched eval losses; their FLOW weights then drive a batched train-mode step."""
    model = _BNMLP(nnx.Rngs(0))
    # Pre-trained running statistics that are not the identity.
    model.bn.mean[...] = jnp.linspace(-0.5, 0.5, 8)
    model.bn.var[...] = jnp.linspace(0.5, 2.0, 8)
    data = {
        "id": np.arange(32),
        "x": rng.normal(size=(32, 5)).astype(np.float32),
        "y": rng.integers(0, 4, size=32).astype(np.int32),
    }

    def loss_fn(state, ex, graphdef):
        logits = nnx.merge(graphdef, state)(ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    def prepass(m):
        graphdef, state = nnx.split(m)
        fn = lambda s, ex: loss_fn(s, ex, graphdef)  # noqa: E731
        batches = [{k: v[i : i + 8] for k, v in data.items()} for i in range(0, 32, 8)]
        return flowjax.per_example_losses(fn, state, batches, progress=False)

    train_mode = prepass(model)
    np.testing.assert_allclose(train_mode.losses, np.log(4.0), rtol=1e-5)
    eval_model = nnx.view(model, use_running_average=True)
    table = prepass(eval_model)
    direct = optax.softmax_cross_entropy_with_integer_labels(
        eval_model(jnp.asarray(data["x"])), data["y"]
    )
    np.testing.assert_allclose(table.lookup(data["id"]), direct, rtol=1e-5)
    assert np.std(table.losses) > 0.05
    # FLOW: weights from the eval-mode pre-pass, one batched train-mode step.
    weights = table.flow_weights()
    batch = flowjax.attach_weights(data, weights)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def batch_loss(params, b, stats):
        m = nnx.merge(graphdef, params, stats, copy=True)
        m.train()
        losses = optax.softmax_cross_entropy_with_integer_labels(m(b["x"]), b["y"])
        return losses, nnx.state(m, nnx.BatchStat)

    objective = flowjax.weighted_objective(batch_loss, batched=True, has_aux=True)
    (loss, new_stats), _ = jax.value_and_grad(objective, has_aux=True)(
        params, batch, stats
    )
    assert np.isfinite(float(loss))
    h = np.asarray(model.body(jnp.asarray(data["x"])), np.float64)
    np.testing.assert_allclose(
        new_stats["bn"]["mean"][...],
        0.99 * np.asarray(stats["bn"]["mean"][...]) + 0.01 * h.mean(0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_per_example_objective_passes_extra_args_and_stacks_aux():
    batch = {
        "id": np.arange(3),
        "x": jnp.array([1.0, 2.0, 3.0]),
        "y": jnp.zeros(3),
        "weight": jnp.array([1.0, 0.5, 0.0]),
    }

    def loss(p, ex, shift):  # one example; shift is shared by all (in_axes None)
        err = p * ex["x"] - ex["y"] + shift
        return err**2, err

    objective = flowjax.weighted_objective(loss, has_aux=True, return_metrics=True)
    (value, (aux, metrics)), grad = jax.value_and_grad(objective, has_aux=True)(
        2.0, batch, 1.0
    )
    err = 2.0 * np.array([1.0, 2.0, 3.0]) + 1.0
    w = np.array([1.0, 0.5, 0.0])
    np.testing.assert_allclose(float(value), np.sum(w * err**2) / 3, rtol=1e-6)
    np.testing.assert_allclose(
        float(grad), np.sum(w * 2 * err * [1, 2, 3]) / 3, rtol=1e-6
    )
    np.testing.assert_allclose(aux, err, rtol=1e-6)  # stacked over examples
    np.testing.assert_allclose(float(metrics["weight_mean"]), 0.5, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "normalized"])
def test_negative_weight_under_jit_gives_nan_not_a_number(reduction):
    # Concretely this raises (above); under jit it cannot, so the loss must not look
    # plausible. A negative weight on a masked-out entry is not counted and stays harmless.
    losses = jnp.array([1.0, 2.0, 3.0])
    reduce = jax.jit(
        lambda x, w, m: flowjax.weighted_loss(x, w, where=m, reduction=reduction)
    )
    every = jnp.ones(3, bool)
    bad = reduce(losses, jnp.array([1.0, -0.5, 1.0]), every)
    assert np.isnan(bad)
    masked = reduce(losses, jnp.array([1.0, -0.5, 1.0]), jnp.array([True, False, True]))
    expected = flowjax.weighted_loss(
        np.array([1.0, 3.0]), np.array([1.0, 1.0]), reduction=reduction
    )
    np.testing.assert_allclose(masked, expected, rtol=1e-6)
