"""Progressive networks: eq. 1 against numpy, earlier columns bitwise frozen, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax


def _np_forward(model, x, task):
    """Rusu et al. eq. 1 in numpy, from the model's weights."""
    acts = []
    for k in range(task + 1):
        col, hs = model.columns[k], [np.asarray(x, np.float64)]
        for i, layer in enumerate(col.layers):
            z = hs[-1] @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
            if i > 0:
                for j, lat in enumerate(col.laterals[i - 1]):
                    z = z + acts[j][i] @ np.asarray(lat.kernel[...])
            hs.append(np.maximum(z, 0) if i < len(col.layers) - 1 else z)
        acts.append(hs)
    return acts[-1][-1]


def test_columns_match_numpy_and_training_a_new_column_freezes_the_old():
    model = flowjax.ProgressiveMLP([4, 6, 5, 3], rngs=nnx.Rngs(0))
    model.add_column(nnx.Rngs(1))
    model.add_column(nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    for task in range(3):
        np.testing.assert_allclose(
            model(x, task), _np_forward(model, x, task), rtol=1e-5, atol=1e-5
        )
    graphdef, params = nnx.split(model, nnx.Param)
    before = {k: model(x, k) for k in range(3)}
    start = nnx.to_flat_state(jax.tree.map(np.asarray, params))
    tx = flowjax.train_only(optax.sgd(0.1, momentum=0.9), model.column_filter(2))
    state = tx.init(params)
    y, w = jnp.asarray(np.arange(8) % 3), jnp.linspace(0.5, 1.5, 8)

    @jax.jit
    def step(p, s):
        def loss(p):
            z = nnx.merge(graphdef, p)(x, 2)
            ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
            return flowjax.weighted_loss(ce, w)

        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(5):
        params, state = step(params, state)
    for (path, v0), (_, v1) in zip(start, nnx.to_flat_state(params), strict=True):
        same = np.array_equal(v0.get_value(), v1.get_value())
        assert same == (path[:2] != ("columns", 2)), path
    trained = nnx.merge(graphdef, params)
    for k in (0, 1):
        np.testing.assert_array_equal(trained(x, k), before[k])
    assert not np.allclose(trained(x, 2), before[2])


def test_errors():
    with pytest.raises(ValueError, match="features"):
        flowjax.ProgressiveMLP([4], rngs=nnx.Rngs(0))
    model = flowjax.ProgressiveMLP([4, 2], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"task must be a column index in \[0, 1\)"):
        model(jnp.ones((1, 4)), 1)
    with pytest.raises(ValueError, match="column index"):
        model.column_filter(3)
