"""PackNet: exact per-layer pruning fractions, frozen earlier tasks, task-k evaluation, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
