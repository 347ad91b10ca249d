"""Replay: reservoir uniformity, batch mixing (exact ratio, determinism, fields), der_loss, DER++."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flowjax


def _old_data(n, offset=0):
    ids = np.arange(offset, offset + n)
    return {
        "id": ids,
        "x": np.stack([ids, -ids], 1).astype(np.float32),  # rows stay tied to their id
        "label": (ids % 3).astype(np.int32),
    }


def test_reservoir_sampling_is_uniform_within_binomial_error():
    n, k, trials = 50, 10, 2000
    counts = np.zeros(n)
    for seed in range(trials):
        buffer = flowjax.ReplayBuffer(k, seed=seed)
        start = 0
        for size in (7, 1, 30, 12):  # batches that straddle the fill phase and collide
            buffer.add({"id": np.arange(start, start + size)})
            start += size
        assert len(buffer) == k and buffer.seen == n
        ids = buffer.data["id"]
        assert len(np.unique(ids)) == k
        counts[ids] += 1
    p = k / n
    z = (counts - trials * p) / np.sqrt(trials * p * (1 - p))
    assert np.abs(z).max() < 4.5, (
        z
    )  # 50 items: P(any |z| > 4.5) ≈ 3e-4 under uniformity
    assert np.sum(z**2) < n + 5 * np.sqrt(2 * n)  # chi-square with n dof


def test_fill_phase_keeps_rows_in_order_with_their_fields():
    buffer = flowjax.ReplayBuffer(8, seed=0)
    buffer.add(_old_data(5))
    assert len(buffer) == 5 and buffer.data["id"].tolist() == [0, 1, 2, 3, 4]
    buffer.add(_old_data(20, offset=5))
    data = buffer.data
    np.testing.assert_array_equal(data["x"][:, 0], data["id"].astype(np.float32))
    np.testing.assert_array_equal(data["label"], data["id"] % 3)
    assert data["x"].dtype == np.float32 and data["label"].dtype == np.int32
    with pytest.raises(ValueError, match="read-only"):
        data["x"][0] = 1.0
    rows = buffer.sample(8)
    assert sorted(rows["id"].tolist()) == sorted(
        data["id"].tolist()
    )  # without replacement


def test_buffer_errors():
    with pytest.raises(ValueError, match="positive integer"):
        flowjax.ReplayBuffer(0)
    buffer = flowjax.ReplayBuffer(4)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1)
    with pytest.raises(ValueError, match='no "id"'):
        buffer.add({"x": np.ones(3)})
    with pytest.raises(ValueError, match="leading dimension 3"):
        buffer.add({"id": np.arange(3), "x": np.ones(2)})
    with pytest.raises(ValueError, match="must be integers"):
        buffer.add({"id": np.ones(3)})
    with pytest.raises(ValueError, match='"replay"'):
        buffer.add({"id": np.arange(3), "replay": np.ones(3, bool)})
    buffer.add(_old_data(3))
    with pytest.raises(ValueError, match="same fields"):
        buffer.add({"id": np.arange(3)})
    bad = _old_data(3)
    bad["x"] = bad["x"].astype(np.float64)
    with pytest.raises(ValueError, match=r"field 'x'.*float64"):
        buffer.add(bad)
    with pytest.raises(ValueError, match="cannot sample 4 distinct rows"):
        buffer.sample(4)


def _new_batches(sizes, offset=0):
    out, start = [], offset
    for b in sizes:
        ids = np.arange(start, start + b)
        out.append(
            {
                "id": ids,
                "x": np.stack([ids, ids], 1).astype(np.float32),
                "label": np.zeros(b, np.int32),
                "weight": np.linspace(0.1, 1.0, b).astype(np.float32),
            }
        )
        start += b
    return out


def _full_buffer():
    buffer = flowjax.ReplayBuffer(64, seed=1)
    old = _old_data(64)
    old["logits"] = np.tile(np.float32([1.0, 0.0, -1.0]), (64, 1))
    buffer.add(old)
    return buffer


@pytest.mark.parametrize(("ratio", "appended"), [(0.25, 8), (0.5, 24), (0.2, 6)])
def test_replay_fraction_is_exact_per_batch_and_fields_are_preserved(ratio, appended):
    buffer = _full_buffer()
    new = _new_batches([24, 24, 24])
    fill = {"weight": 1.0, "logits": 0.0}
    out = list(flowjax.replay_batches(new, buffer, ratio, seed=3, fill=fill))
    assert len(out) == 3
    for batch, src in zip(out, new, strict=True):
        assert set(batch) == {"id", "x", "label", "weight", "logits", "replay"}
        n = 24 + appended
        assert batch["replay"].dtype == np.bool_ and batch["replay"].sum() == appended
        assert batch["replay"].sum() / n == pytest.approx(ratio)
        assert not batch["replay"][:24].any()
        for key in ("id", "x", "label", "weight"):
            assert batch[key].shape == (n, *src[key].shape[1:])
            assert batch[key].dtype == src[key].dtype
            np.testing.assert_array_equal(
                batch[key][:24], src[key]
            )  # new rows untouched
        old = batch["replay"]
        np.testing.assert_array_equal(
            batch["x"][old, 0], batch["id"][old]
        )  # real buffer rows
        assert len(np.unique(batch["id"][old])) == appended  # without replacement
        np.testing.assert_array_equal(batch["weight"][old], 1.0)
        np.testing.assert_array_equal(batch["logits"][~old], 0.0)
        np.testing.assert_array_equal(
            batch["logits"][old], [[1.0, 0.0, -1.0]] * appended
        )
    # Deterministic given the seed, different with another seed.
    again = list(flowjax.replay_batches(new, _full_buffer(), ratio, seed=3, fill=fill))
    chex.assert_trees_all_equal(out, again)
    other = list(flowjax.replay_batches(new, _full_buffer(), ratio, seed=4, fill=fill))
    assert not np.array_equal(out[0]["id"], other[0]["id"])


def test_ratio_zero_passes_batches_through():
    new = _new_batches([5, 3])
    out = list(flowjax.replay_batches(new, flowjax.ReplayBuffer(4), 0.0))
    for batch, src in zip(out, new, strict=True):
        assert batch.pop("replay").tolist() == [False] * len(src["id"])
        chex.assert_trees_all_equal(batch, src)


def test_weights_attached_by_id_before_mixing_survive():
    table = flowjax.LossTable(ids=np.arange(24), losses=np.linspace(0.0, 2.0, 24))
    new = [
        flowjax.attach_weights(
            {"id": b["id"], "x": b["x"], "label": b["label"]}, table.flow_weights()
        )
        for b in _new_batches([12, 12])
    ]
    buffer = flowjax.ReplayBuffer(30, seed=0)
    buffer.add(
        _old_data(30)
    )  # the same id range as the new task: told apart by "replay"
    out = list(flowjax.replay_batches(new, buffer, 0.5, seed=0, fill={"weight": 0.0}))
    for batch in out:
        fresh = ~batch["replay"]
        np.testing.assert_array_equal(
            batch["weight"][fresh], table.flow_weights().lookup(batch["id"][fresh])
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
        ({"ratio": 0.5, "buffer": "empty"}, "buffer is empty"),
    ],
)
def test_replay_batches_errors_at_call(kwargs, match):
    buffer = flowjax.ReplayBuffer(4) if kwargs.pop("buffer", None) else _full_buffer()
    with pytest.raises(ValueError, match=match):
        flowjax.replay_batches(_new_batches([4]), buffer, **kwargs)


def test_replay_batches_errors_while_iterating():
    buffer = _full_buffer()
    with pytest.raises(ValueError, match=r"'logits' is in the buffer.*fill=\{'logits'"):
        next(
            flowjax.replay_batches(_new_batches([4]), buffer, 0.5, fill={"weight": 1.0})
        )
    with pytest.raises(ValueError, match=r"'weight' is in the fine-tuning batches"):
        next(
            flowjax.replay_batches(_new_batches([4]), buffer, 0.5, fill={"logits": 0.0})
        )
    bad = _new_batches([4])
    bad[0]["label"] = bad[0]["label"].astype(np.int64)
    with pytest.raises(ValueError, match=r"field 'label'.*int64"):
        next(
            flowjax.replay_batches(
                bad, buffer, 0.5, fill={"weight": 1.0, "logits": 0.0}
            )
        )
    no_label = [{k: v for k, v in b.items() if k != "label"} for b in _new_batches([4])]
    with pytest.raises(
        ValueError, match=r"fill\['label'\] = 0.5 is not representable.*int32"
    ):
        next(
            flowjax.replay_batches(
                no_label, buffer, 0.5, fill={"weight": 1.0, "logits": 0.0, "label": 0.5}
            )
        )
    with pytest.raises(ValueError, match="already has a 'replay' field"):
        next(
            flowjax.replay_batches(
                [{"id": np.arange(2), "replay": np.ones(2)}], buffer, 0.5
            )
        )
    with pytest.raises(ValueError, match="cannot sample 96 distinct rows"):
        next(
            flowjax.replay_batches(
                _new_batches([32]), buffer, 0.75, fill={"weight": 1.0, "logits": 0.0}
            )
        )


@pytest.mark.parametrize(
    ("ratio", "sizes", "smallest"), [(0.25, [1], 2), (0.1, [24, 4], 5)]
)
def test_a_batch_too_small_for_one_replayed_row_is_an_error(ratio, sizes, smallest):
    # k = round(r B / (1 - r)) = 0 would silently drop replay for that batch
    # (r = 0.25, B = 1; or a ragged last batch of 4 at r = 0.1).
    fill = {"weight": 1.0, "logits": 0.0}
    it = flowjax.replay_batches(_new_batches(sizes), _full_buffer(), ratio, fill=fill)
    for _ in sizes[:-1]:
        assert next(it)["replay"].sum() == round(ratio * sizes[0] / (1 - ratio))
    with pytest.raises(
        ValueError,
        match=rf"batch of {sizes[-1]} rows.*ratio={ratio}.*no replayed row.*at least "
        rf"{smallest} rows",
    ):
        next(it)
    # the smallest batch that gets a row does get exactly one
    one = flowjax.replay_batches(
        _new_batches([smallest]), _full_buffer(), ratio, fill=fill
    )
    assert next(one)["replay"].sum() == 1


# ------------------------------------------------------------------- der_loss
def test_der_loss_matches_numpy_masks_and_keeps_dtype(rng, variant):
    z = rng.normal(size=(2, 5, 4)).astype(np.float32)
    stored = rng.normal(size=(2, 5, 4)).astype(np.float32)
    out = variant(flowjax.der_loss)(z, stored)
    assert out.shape == (2, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), np.mean((z - stored) ** 2, -1), rtol=1e-6
    )
    z2 = jnp.asarray(z[0]).at[1].set(jnp.nan)
    m = np.array([True, False, True, True, False])
    fn = variant(lambda z, s, m: flowjax.der_loss(z, s, where=m))
    got = np.asarray(fn(z2, stored[0], m))
    np.testing.assert_allclose(
        got, np.where(m, np.mean((z[0] - stored[0]) ** 2, -1), 0), rtol=1e-6
    )
    g_z, g_s = jax.grad(lambda z, s: jnp.sum(fn(z, s, m)), argnums=(0, 1))(
        z2, stored[0]
    )
    np.testing.assert_allclose(
        np.asarray(g_z), np.where(m[:, None], 2 * (z[0] - stored[0]) / 4, 0), rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(g_s), 0.0)  # stored logits get no gradient
    half = flowjax.der_loss(
        jnp.ones((2, 3), jnp.bfloat16), jnp.zeros((2, 3), jnp.bfloat16)
    )
    assert half.dtype == jnp.bfloat16 and half.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="same shape"):
        flowjax.der_loss(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="where has shape"):
        flowjax.der_loss(np.ones((2, 3)), np.ones((2, 3)), where=np.ones(3, bool))


def _derpp(params, batch, alpha, beta):
    logits = batch["x"] @ params
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    old = batch["replay"]
    ones = jnp.ones(ce.shape, ce.dtype)
    der = flowjax.der_loss(logits, batch["logits"], where=old)
    return (
        flowjax.weighted_loss(ce, batch["weight"], where=~old)
        + alpha * flowjax.weighted_loss(der, ones, where=old)
        + beta * flowjax.weighted_loss(ce, ones, where=old)
    )


def test_derpp_with_flow_weights_in_one_jitted_step_and_ratio_zero_is_plain(rng):
    buffer = _full_buffer()
    table = flowjax.LossTable(ids=np.arange(1000, 1048), losses=rng.gamma(2.0, 1.0, 48))
    new = [
        flowjax.attach_weights(b, table.flow_weights())
        for b in _new_batches([12, 12, 12, 12], offset=1000)
    ]
    opt = optax.sgd(0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(_derpp)(params, batch, 0.3, 0.5)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value, grads

    params = jnp.asarray(rng.normal(size=(2, 3)) * 0.01, jnp.float32)
    opt_state = opt.init(params)
    mixed = flowjax.replay_batches(
        new, buffer, 0.25, seed=0, fill={"weight": 1.0, "logits": 0.0}
    )
    first = None
    for batch in mixed:
        if first is None:
            first = batch
        params, opt_state, value, _ = step(params, opt_state, batch)
        assert np.isfinite(float(value))
    # The value of the DER++ objective against a numpy reference on the first mixed batch.
    p0 = jnp.asarray(rng.normal(size=(2, 3)) * 1e-3, jnp.float32)
    z = first["x"] @ np.asarray(p0, np.float64)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    ce = -logp[np.arange(len(z)), first["label"]]
    old = first["replay"]
    der = np.mean((first["x"] @ np.asarray(p0, np.float64) - first["logits"]) ** 2, 1)
    expected = (
        np.sum(first["weight"][~old] * ce[~old]) / (~old).sum()
        + 0.3 * der[old].mean()
        + 0.5 * ce[old].mean()
    )
    np.testing.assert_allclose(
        float(jax.jit(_derpp)(p0, first, 0.3, 0.5)), expected, rtol=1e-5
    )
    # ratio 0: every replay term is empty, the loss and gradient are FLOW fine-tuning's.
    plain_batch = next(flowjax.replay_batches(new, flowjax.ReplayBuffer(4), 0.0))
    plain_batch["logits"] = np.zeros((12, 3), np.float32)
    v1, g1 = jax.jit(jax.value_and_grad(_derpp))(p0, plain_batch, 0.3, 0.5)
    objective = flowjax.weighted_objective(
        lambda p, ex: optax.softmax_cross_entropy_with_integer_labels(
            ex["x"] @ p, ex["label"]
        )
    )
    v2, g2 = jax.jit(jax.value_and_grad(objective))(p0, new[0])
    # (Two different jitted programs: XLA may round their sums differently by an ulp.
    # The batches themselves are bitwise plain ones: test_ratio_zero_passes_batches_through.)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-9)
