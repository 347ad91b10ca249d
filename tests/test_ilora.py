"""I-LoRA (flowjax/ilora.py): the slow update by hand, the consistency loss by hand, plain LoRA at γ = 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flowjax

from . import _methods


def _trees(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    slow = {"a": rng.normal(size=(3, 2)), "b": [rng.normal(size=(4,))]}
    fast = {"a": rng.normal(size=(3, 2)), "b": [rng.normal(size=(4,))]}
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    return cast(slow), cast(fast)


@pytest.mark.parametrize("step", [None, 1, 5])
def test_slow_update_is_the_hand_formula_and_jit_agrees(step):
    slow, fast = _trees()
    lam = 0.6 if step is None else min(1 - 1 / (step + 1), 0.6)
    got = flowjax.ilora_slow_update(slow, fast, 0.6, step=step)
    jitted = jax.jit(lambda s, f, t: flowjax.ilora_slow_update(s, f, 0.6, step=t))(
        slow, fast, step
    )
    for g, j, s, f in zip(
        jax.tree.leaves(got),
        jax.tree.leaves(jitted),
        jax.tree.leaves(slow),
        jax.tree.leaves(fast),
        strict=True,
    ):
        want = lam * np.asarray(s, np.float64) + (1 - lam) * np.asarray(f, np.float64)
        np.testing.assert_allclose(g, want, rtol=1e-6)
        np.testing.assert_allclose(j, g, rtol=1e-6, atol=1e-7)


def test_slow_update_edges_dtypes_and_errors():
    slow, fast = _trees(jnp.bfloat16)
    assert flowjax.ilora_slow_update(slow, fast, 1.0) is slow  # never moves
    copied = flowjax.ilora_slow_update(slow, fast, 0.0)
    jax.tree.map(np.testing.assert_array_equal, copied, fast)
    assert {x.dtype for x in jax.tree.leaves(copied)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\]"):
        flowjax.ilora_slow_update(slow, fast, 1.5)
    bad = jax.jit(lambda d: flowjax.ilora_slow_update(slow, fast, d))(jnp.float32(-1))
    assert all(bool(jnp.isnan(x).all()) for x in jax.tree.leaves(bad))
    with pytest.raises(ValueError, match=r"slow\['a'\] has shape \(3, 2\)"):
        flowjax.ilora_slow_update(slow, {"a": jnp.ones((2, 2)), "b": fast["b"]}, 0.5)


def test_consistency_loss_by_hand_with_a_mask_and_its_gradient():
    rng = np.random.default_rng(1)
    fast = [rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))]
    slow = [rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))]
    where = np.array([[1, 1, 0], [1, 0, 0]], bool)
    want = []
    for i in range(2):
        sq = [
            np.maximum(s[i] - f[i], 0) ** 2 * where[i][:, None]
            for f, s in zip(fast, slow, strict=True)
        ]
        want.append(sum(x.sum() for x in sq) / (2 * where[i].sum() * 4))
    f32 = lambda t: [jnp.asarray(x, jnp.float32) for x in t]  # noqa: E731
    got = flowjax.ilora_consistency_loss(f32(fast), f32(slow), where=where)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # No mask: the reference's MSE over every entry, relu'd.
    whole = np.mean(
        np.concatenate(
            [np.maximum(s - f, 0) ** 2 for f, s in zip(fast, slow, strict=True)]
        )
    )
    np.testing.assert_allclose(
        flowjax.ilora_consistency_loss(f32(fast), f32(slow)).mean(), whole, rtol=1e-5
    )
    # The gradient reaches the fast states only, where they are below the slow ones.
    g_fast, g_slow = jax.grad(
        lambda f, s: flowjax.ilora_consistency_loss(f, s).sum(), argnums=(0, 1)
    )(f32(fast), f32(slow))
    n = 2 * 3 * 4
    for gf, gs, f, s in zip(g_fast, g_slow, fast, slow, strict=True):
        np.testing.assert_allclose(
            gf, -2 * np.maximum(s - f, 0) / n, rtol=1e-5, atol=1e-7
        )
        assert not np.any(gs)
    with pytest.raises(ValueError, match=r"fast_hidden\[1\] has batch size 3"):
        flowjax.ilora_consistency_loss(
            [jnp.ones((2, 1)), jnp.ones((3, 1))], [jnp.ones((2, 1)), jnp.ones((3, 1))]
        )


def test_zero_consistency_is_plain_lora_bitwise_and_the_slow_adapter_is_the_ema():
    ilora, lora = _methods.BY_NAME["ilora"], _methods.BY_NAME["lora"]
    plain, _, plain_losses = _methods.train(lora, 0.0)
    # γ = 0 through the battery's I-LoRA step: the slow adapter is the warm-started
    # EMA (λ = 0.25) of the fast iterates, and the fast ones are plain LoRA's, bit for bit.
    objective, tx, frozen, start = ilora.build(0.0, _methods.params())
    step = jax.jit(_methods.make_step(objective, tx))
    p, state, slow, losses = start, tx.init(start), start["slow"], []
    for t in range(1, 4):
        p, state, loss = step(p, state, frozen, _methods.batch())
        losses.append(float(loss))
        lam = min(1 - 1 / (t + 1), 0.25)
        slow = jax.tree.map(
            lambda s, f, lam=lam: lam * s + (1 - lam) * f, slow, p["fast"]
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            p["slow"],
            slow,
        )
    assert losses == plain_losses
    jax.tree.map(np.testing.assert_array_equal, p["fast"], plain)


def test_ilora_optimiser_with_a_frozen_slow_adapter_and_bad_params():
    tx = flowjax.ilora(optax.sgd(0.1), 1.0, warmup=False)
    params = {"fast": {"w": jnp.ones(2)}, "slow": {"w": jnp.zeros(2)}}
    grads = {
        "fast": {"w": jnp.ones(2)},
        "slow": {"w": jnp.ones(2)},
    }  # slow's is ignored
    u, state = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, u)
    np.testing.assert_array_equal(new["slow"]["w"], params["slow"]["w"])
    np.testing.assert_allclose(new["fast"]["w"], [0.9, 0.9])
    assert int(state.count) == 1
    with pytest.raises(ValueError, match="'fast'"):
        tx.init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, tx.init(params))
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\]"):
        flowjax.ilora(optax.sgd(0.1), -0.1)
