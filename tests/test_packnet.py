"""PackNet: exact per-layer pruning fractions, frozen earlier tasks, task-k evaluation, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax

from . import _methods


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(4, 10)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=10), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32),
    }


def _logits(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_prune_keeps_exactly_the_fraction_with_the_largest_magnitudes(keep):
    params = _params()
    owner = flowjax.packnet_init(params)
    pruned, owner = flowjax.packnet_prune(params, owner, task=1, keep=keep)
    for k in ("w1", "w2"):
        w, o = np.asarray(params[k]).ravel(), np.asarray(owner[k]).ravel()
        n_keep = round(keep * w.size)
        assert (o == 1).sum() == n_keep and set(np.unique(o)) <= {0, 1}
        survivors = np.sort(np.argsort(-np.abs(w))[:n_keep])
        np.testing.assert_array_equal(np.flatnonzero(o == 1), survivors)
        np.testing.assert_array_equal(
            np.asarray(pruned[k]).ravel(), np.where(o == 1, w, 0.0)
        )
    # Biases are not pruned (fewer than 2 axes) and stay with task 1.
    np.testing.assert_array_equal(owner["b1"], np.ones(10, np.int32))
    np.testing.assert_array_equal(pruned["b1"], params["b1"])


def _train(params, owner, task, x, y, steps=5):
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), flowjax.packnet_updates(owner, task))
    state = tx.init(params)
    w = jnp.linspace(0.5, 1.5, x.shape[0])  # FLOW-style per-example weights

    @jax.jit
    def step(p, s):
        def loss(p):
            ce = optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y)
            return flowjax.weighted_loss(ce, w)

        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_two_tasks_earlier_weights_bitwise_frozen_and_task_evaluation():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y1, y2 = (jnp.asarray(rng.integers(0, 3, 16)) for _ in range(2))
    params = _params()
    owner = flowjax.packnet_init(params)
    params = _train(params, owner, 1, x, y1)
    params, owner = flowjax.packnet_prune(params, owner, 1, keep=0.5)
    params = _train(params, owner, 1, x, y1)  # retrain the survivors
    pruned_stay_zero = {
        k: np.asarray(params[k])[np.asarray(owner[k]) == 0] for k in params
    }
    assert all((v == 0).all() for v in pruned_stay_zero.values())
    after1 = jax.tree.map(np.asarray, params)
    owner = flowjax.packnet_start_task(owner, 2)
    assert {int(v) for o in owner.values() for v in np.unique(o)} == {1, 2}
    params = _train(params, owner, 2, x, y2)
    params, owner = flowjax.packnet_prune(params, owner, 2, keep=0.5)
    # Task-1 weights (and the biases, owned by task 1) are bitwise unchanged.
    moved = 0
    for k in params:
        o, now = np.asarray(owner[k]), np.asarray(params[k])
        np.testing.assert_array_equal(now[o == 1], after1[k][o == 1], err_msg=k)
        moved += int(not np.array_equal(now[o == 2], after1[k][o == 2]))
    assert moved > 0
    # Task-1 evaluation: task 2's weights zeroed; equals the task-1 network exactly.
    task1 = flowjax.packnet_task_params(params, owner, 1)
    ref = {
        k: np.where(np.asarray(owner[k]) == 1, np.asarray(params[k]), 0.0)
        for k in params
    }
    np.testing.assert_array_equal(_logits(task1, x), _logits(after1, x))
    np.testing.assert_allclose(_logits(task1, x), _logits(ref, x), rtol=1e-6)
    np.testing.assert_array_equal(
        _logits(flowjax.packnet_task_params(params, owner, 2), x), _logits(params, x)
    )


def test_battery_packnet_prunes_and_freezes():
    m = _methods.BY_NAME["packnet"]
    p, _, _ = _methods.train(m, m.strength)
    theta0 = _methods.params()
    owner = flowjax.packnet_init(theta0)
    _, owner = flowjax.packnet_prune(theta0, owner, 1, keep=1 - m.strength)
    for k in ("w1", "w2"):
        free = np.asarray(owner[k]) == 0
        assert free.sum() == round(m.strength * free.size)
        np.testing.assert_array_equal(np.asarray(p[k])[free], 0.0)


def test_errors():
    params = _params()
    owner = flowjax.packnet_init(params)
    with pytest.raises(ValueError, match="keep"):
        flowjax.packnet_prune(params, owner, 1, keep=0.0)
    with pytest.raises(ValueError, match="task"):
        flowjax.packnet_prune(params, owner, 0, keep=0.5)
    with pytest.raises(ValueError, match=r"owner\['w1'\] has shape \(2,\)"):
        flowjax.packnet_task_params(params, {**owner, "w1": jnp.ones(2, jnp.int32)}, 1)
    with pytest.raises(ValueError, match="structure"):
        flowjax.packnet_updates({"w1": owner["w1"]}, 1).update(
            params, optax.EmptyState()
        )


class _BNNet(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 10, rngs=rngs)
        self.bn = nnx.BatchNorm(10, momentum=0.5, rngs=rngs)
        self.fc2 = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def _bn_train(graphdef, params, stats, owner, task, x, y, steps=4):
    """PackNet steps on a BatchNorm net; returns params and the running statistics."""
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), flowjax.packnet_updates(owner, task))
    state = tx.init(params)

    @jax.jit
    def step(p, st, s):
        def loss(p, st):
            model = nnx.merge(graphdef, p, st)
            ce = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
            return ce.mean(), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        (_, st), g = jax.value_and_grad(loss, has_aux=True)(p, st)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), st, s

    for _ in range(steps):
        params, stats, state = step(params, stats, state)
    return params, stats


def _split(model):
    return [
        s if i == 0 else nnx.to_pure_dict(s)
        for i, s in enumerate(nnx.split(model, nnx.Param, nnx.BatchStat))
    ]


def _eval_logits(graphdef, params, stats, x):
    model = nnx.merge(graphdef, params, stats)
    model.eval()
    return np.asarray(model(x))


def test_batchnorm_frozen_after_the_first_task():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y1, y2 = (jnp.asarray(rng.integers(0, 3, 16)) for _ in range(2))
    model = _BNNet(nnx.Rngs(0))
    graphdef, params, stats0 = _split(model)
    owner = flowjax.packnet_init(params)
    params, stats = _bn_train(graphdef, params, stats0, owner, 1, x, y1)
    params, owner = flowjax.packnet_prune(params, owner, 1, keep=0.5)
    params, stats = _bn_train(graphdef, params, stats, owner, 1, x, y1)
    # Task 1 trains in train mode: its running statistics moved.
    assert not np.array_equal(stats["bn"]["mean"], stats0["bn"]["mean"])
    ref_logits = _eval_logits(graphdef, params, stats, x)
    after1 = jax.tree.map(np.asarray, (params, stats))

    model = nnx.merge(graphdef, params, stats)
    assert flowjax.packnet_freeze_batchnorm(model) is model
    assert model.bn.use_running_average
    graphdef2, params, stats = _split(model)
    owner = flowjax.packnet_start_task(owner, 2)
    params, stats = _bn_train(graphdef2, params, stats, owner, 2, x, y2)
    # The statistics and BatchNorm's scale and offset (owned by task 1) are bitwise unchanged.
    for a, b in zip(jax.tree.leaves(after1[1]), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(a, b)
    for k in ("scale", "bias"):
        np.testing.assert_array_equal(params["bn"][k], after1[0]["bn"][k])
    assert not np.array_equal(params["fc1"]["kernel"], after1[0]["fc1"]["kernel"])
    # Task-1 evaluation (task 2's weights zeroed) is task 1's network exactly.
    task1 = flowjax.packnet_task_params(params, owner, 1)
    np.testing.assert_array_equal(_eval_logits(graphdef2, task1, stats, x), ref_logits)
    # Control: without freezing, task 2 would move the statistics.
    _, moved = _bn_train(graphdef, params, stats, owner, 2, x, y2)
    assert not np.array_equal(moved["bn"]["mean"], stats["bn"]["mean"])


def test_freeze_batchnorm_errors():
    with pytest.raises(ValueError, match=r"no nnx\.BatchNorm"):
        flowjax.packnet_freeze_batchnorm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        flowjax.packnet_freeze_batchnorm({"w": jnp.ones(2)})
