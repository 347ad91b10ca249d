"""Progressive networks: eq. 1 against numpy (MLP and CNN columns), earlier columns bitwise frozen, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax


def _np_conv(x, kernel, stride):
    """'SAME' NHWC convolution in numpy (XLA's padding: the odd pixel goes after)."""
    kh, kw, _, cout = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph = max((oh - 1) * stride + kh - h, 0)
    pw = max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, cout))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a : a + stride * oh : stride, b : b + stride * ow : stride]
            out += patch @ kernel[a, b]
    return out


def _np_layer(layer, h, stride):
    k = np.asarray(layer.kernel[...], np.float64)
    if k.ndim == 4:
        z = _np_conv(h, k, stride)
    else:
        z = h.reshape(len(h), -1) @ k
    if layer.bias is not None:
        z = z + np.asarray(layer.bias[...])
    return z


def _np_forward(model, x, task):
    """Rusu et al. eq. 1 in numpy, from the model's weights."""
    strides = list(getattr(model, "strides", ()))
    acts = []
    for k in range(task + 1):
        col, hs = model.columns[k], [np.asarray(x, np.float64)]
        for i, layer in enumerate(col.layers):
            s = strides[i] if i < len(strides) else 1
            z = _np_layer(layer, hs[-1], s)
            if i > 0:
                for j, lat in enumerate(col.laterals[i - 1]):
                    z = z + _np_layer(lat, acts[j][i], s)
            hs.append(np.maximum(z, 0) if i < len(col.layers) - 1 else z)
        acts.append(hs)
    return acts[-1][-1]


def _mlp():
    return flowjax.ProgressiveMLP([4, 6, 5, 3], rngs=nnx.Rngs(0)), (8, 4)


def _cnn():
    model = flowjax.ProgressiveCNN(
        (7, 6, 2), channels=[3, 4], dense=[5, 3], strides=[1, 2], rngs=nnx.Rngs(0)
    )
    return model, (8, 7, 6, 2)


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_columns_match_numpy_and_training_a_new_column_freezes_the_old(make):
    model, shape = make()
    model.add_column(nnx.Rngs(1))
    model.add_column(nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
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


def test_cnn_column_zero_is_the_plain_cnn_and_laterals_are_1x1_convs():
    model = flowjax.ProgressiveCNN(
        (8, 8, 1), channels=[4, 8], dense=[16, 2], strides=[1, 2], rngs=nnx.Rngs(3)
    )
    c = model.columns[0]
    conv1 = nnx.Conv(1, 4, (3, 3), padding="SAME", rngs=nnx.Rngs(9))
    conv2 = nnx.Conv(4, 8, (3, 3), (2, 2), padding="SAME", rngs=nnx.Rngs(9))
    fc1, fc2 = (
        nnx.Linear(128, 16, rngs=nnx.Rngs(9)),
        nnx.Linear(16, 2, rngs=nnx.Rngs(9)),
    )
    for mine, plain in zip(c.layers, (conv1, conv2, fc1, fc2), strict=True):
        nnx.update(plain, nnx.state(mine))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8, 8, 1)), jnp.float32)

    @nnx.jit
    def plain_cnn(layers, x):
        c1, c2, f1, f2 = layers
        h = nnx.relu(c2(nnx.relu(c1(x))))
        return f2(nnx.relu(f1(h.reshape(5, -1))))

    column0 = nnx.jit(lambda m, x: m(x, 0))
    plain = plain_cnn((conv1, conv2, fc1, fc2), x)
    np.testing.assert_array_equal(column0(model, x), plain)
    model.add_column(nnx.Rngs(4))
    np.testing.assert_array_equal(
        column0(model, x), plain
    )  # a new column changes nothing
    lat = model.columns[1].laterals
    assert lat[0][0].kernel.shape == (1, 1, 4, 8) and lat[0][0].strides == (2, 2)
    assert lat[0][0].bias is None and lat[1][0].kernel.shape == (128, 16)
    assert len(model.columns[0].laterals[0]) == 0


def test_errors():
    with pytest.raises(ValueError, match="features"):
        flowjax.ProgressiveMLP([4], rngs=nnx.Rngs(0))
    model = flowjax.ProgressiveMLP([4, 2], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"task must be a column index in \[0, 1\)"):
        model(jnp.ones((1, 4)), 1)
    with pytest.raises(ValueError, match="column index"):
        model.column_filter(3)
    with pytest.raises(TypeError, match=r"nnx\.Rngs"):
        model.add_column(0)
    with pytest.raises(ValueError, match="input_shape"):
        flowjax.ProgressiveCNN((8, 8), [4], [2], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        flowjax.ProgressiveCNN((8, 8, 1), [], [2], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"one stride per convolution \(2\)"):
        flowjax.ProgressiveCNN((8, 8, 1), [4, 4], [2], strides=[2], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size"):
        flowjax.ProgressiveCNN((8, 8, 1), [4], [2], kernel_size=0, rngs=nnx.Rngs(0))
