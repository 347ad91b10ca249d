"""L2-SP, EWC and Synaptic Intelligence as optax transforms: one battery for all, then each one's maths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax

METHODS = ["l2sp", "l2sp_num_params", "ewc", "si"]
TARGET = {
    "w": np.array([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0]]),
    "b": np.array([4.0, -3.0, 1.0]),
}


def _tree(rng, dtype=np.float32, scale=1.0):
    return {
        "w": jnp.asarray(scale * rng.normal(size=(2, 3)), dtype),
        "b": jnp.asarray(scale * rng.normal(size=(3,)), dtype),
    }


def _fisher(rng):
    return {
        k: jnp.asarray(rng.uniform(0.1, 1.5, size=s), jnp.float32)
        for k, s in (("w", (2, 3)), ("b", (3,)))
    }


def _make(method, anchor, strength, *, fisher=None, mask=None):
    if method == "l2sp":
        return flowjax.l2sp(strength, anchor, mask=mask)
    if method == "l2sp_num_params":
        return flowjax.l2sp(strength, anchor, mask=mask, scale="num_params")
    if method == "ewc":
        return flowjax.ewc(strength, fisher, anchor, mask=mask)
    return flowjax.synaptic_intelligence(strength, anchor, mask=mask)


def _quadratic_grad(p):
    """Gradient of ½‖θ − TARGET‖² (works on jax and numpy trees)."""
    return {k: p[k] - TARGET[k].astype(p[k].dtype) for k in p}


def _numpy_run(
    method, theta0, fisher, strength, lr, steps, keep=("w", "b"), damping=0.1
):
    """SGD on ½‖θ − TARGET‖² plus the method's gradient, in float64 numpy: the reference."""
    th = {k: np.asarray(v, np.float64) for k, v in theta0.items()}
    a = {k: v.copy() for k, v in th.items()}
    n = sum(th[k].size for k in keep)
    prev_th = {k: v.copy() for k, v in th.items()}
    prev_g = {k: np.zeros_like(v) for k, v in th.items()}
    om = {k: np.zeros_like(v) for k, v in th.items()}
    for _ in range(steps):
        g = _quadratic_grad(th)
        new = {}
        for k in th:
            d = th[k] - a[k]
            om[k] = om[k] - prev_g[k] * (th[k] - prev_th[k])
            if k not in keep:
                extra = 0.0
            elif method == "l2sp":
                extra = strength * d
            elif method == "l2sp_num_params":
                extra = 2 * strength / n * d
            elif method == "ewc":
                extra = strength * np.asarray(fisher[k], np.float64) * d
            else:
                extra = strength * np.maximum(om[k], 0) / (d**2 + damping) * d
            new[k] = th[k] - lr * (g[k] + extra)
        prev_th, prev_g, th = th, g, new
    return th, om


def _run(tx, params, steps, lr, step_wrapper=lambda f: f):
    opt = optax.chain(tx, optax.sgd(lr))

    def step(params, state):
        updates, state = opt.update(_quadratic_grad(params), state, params)
        return optax.apply_updates(params, updates), state

    step = step_wrapper(step)
    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


# ----------------------------------------------------------------------------- the shared battery


@pytest.mark.parametrize("method", METHODS)
def test_sgd_trajectory_matches_numpy_with_and_without_jit(method, variant, rng):
    theta0, fisher = _tree(rng), _fisher(rng)
    got, state = _run(
        _make(method, theta0, 0.7, fisher=fisher), theta0, 6, 0.3, variant
    )
    want, om = _numpy_run(method, theta0, fisher, 0.7, 0.3, 6)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6)
    plain, _ = _numpy_run(method, theta0, fisher, 0.0, 0.3, 6)
    assert (
        max(np.abs(want[k] - plain[k]).max() for k in want) > 1e-2
    )  # the penalty mattered
    if method == "si":  # the path integral ω, leafwise
        for k in om:
            np.testing.assert_allclose(state[0].omega[k], om[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_zero_strength_returns_exactly_the_input_updates(method, variant, rng):
    theta0, fisher = _tree(rng), _fisher(rng)
    tx = _make(method, theta0, 0.0, fisher=fisher)
    params = _tree(rng, scale=3.0)
    update = variant(tx.update)
    state = tx.init(theta0)
    for _ in range(3):  # SI: ω is non-zero after the first step, and still ignored
        grads = _tree(rng)
        updates, state = update(grads, state, params)
        for k in grads:
            np.testing.assert_array_equal(updates[k], grads[k])
            assert updates[k].dtype == grads[k].dtype
        params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)
    if method == "si":
        assert np.abs(np.asarray(state.omega["w"])).max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_dtype_preserved_for_float32_and_bfloat16_leaves(method, variant, rng):
    f32, bf16 = _tree(rng), _tree(rng, jnp.bfloat16)
    theta0 = {"f": f32, "h": bf16}
    params = jax.tree.map(lambda x: (x + 1).astype(x.dtype), theta0)
    grads = jax.tree.map(lambda x: (0.5 * x).astype(x.dtype), theta0)
    fisher = {"f": _fisher(rng), "h": _fisher(rng)}
    tx = _make(method, theta0, 0.25, fisher=fisher)
    updates, _ = variant(tx.update)(grads, tx.init(theta0), params)
    jax.tree.map(
        lambda u, g: (u.dtype == g.dtype) or pytest.fail(f"{u.dtype} != {g.dtype}"),
        updates,
        grads,
    )
    if method in ("l2sp", "ewc"):  # one rounding of g + λ·F·(θ-θ₀) computed in float32
        for k in ("w", "b"):
            f = np.asarray(fisher["h"][k]) if method == "ewc" else 1.0
            exact = np.asarray(grads["h"][k], np.float32) + 0.25 * (
                f
                * (
                    np.asarray(params["h"][k], np.float32)
                    - np.asarray(theta0["h"][k], np.float32)
                )
            )
            np.testing.assert_array_equal(
                updates["h"][k], jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16)
            )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "mask",
    [{"w": True, "b": False}, lambda p: {k: v.ndim == 2 for k, v in p.items()}],
    ids=["tree", "callable"],
)
def test_mask_leaves_masked_out_leaves_untouched(method, mask, rng):
    theta0, fisher = _tree(rng), _fisher(rng)
    got, state = _run(
        _make(method, theta0, 0.7, fisher=fisher, mask=mask), theta0, 5, 0.3, jax.jit
    )
    want, _ = _numpy_run(method, theta0, fisher, 0.7, 0.3, 5, keep=("w",))
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6)
    assert isinstance(
        state[0].inner_state.anchor["b"], optax.MaskedNode
    )  # no memory for masked-out leaves


def test_prefix_mask_covers_a_subtree(rng):
    theta0 = {"enc": _tree(rng), "head": _tree(rng)}
    params = jax.tree.map(lambda x: x + 1, theta0)
    tx = flowjax.l2sp(0.5, theta0, mask={"enc": True, "head": False})
    grads = jax.tree.map(jnp.zeros_like, theta0)
    updates, _ = tx.update(grads, tx.init(theta0), params)
    np.testing.assert_allclose(updates["enc"]["w"], 0.5 * np.ones((2, 3)))
    np.testing.assert_array_equal(updates["head"]["w"], np.zeros((2, 3)))


@pytest.mark.parametrize("method", ["l2sp", "ewc"])
def test_chain_with_sgd_and_adam_reaches_the_regularised_minimum(method, rng):
    """min ½‖θ-t‖² + (λ/2)Σ F(θ-θ₀)² has θ* = (t + λFθ₀)/(1 + λF): both optimisers must find it."""
    theta0 = _tree(rng)
    fisher = _fisher(rng) if method == "ewc" else jax.tree.map(jnp.ones_like, theta0)
    lam = 2.0
    optimum = {
        k: (TARGET[k] + lam * np.asarray(fisher[k]) * theta0[k])
        / (1 + lam * np.asarray(fisher[k]))
        for k in theta0
    }
    for inner, steps, tol in (
        (optax.sgd(0.2), 200, 1e-5),
        (optax.adam(0.05), 600, 2e-2),
    ):
        opt = optax.chain(_make(method, theta0, lam, fisher=fisher), inner)

        @jax.jit
        def step(p, s, opt=opt):
            u, s = opt.update(_quadratic_grad(p), s, p)
            return optax.apply_updates(p, u), s

        p, s = theta0, opt.init(theta0)
        for _ in range(steps):
            p, s = step(p, s)
        for k in p:
            np.testing.assert_allclose(p[k], optimum[k], atol=tol)
            assert (
                np.abs(optimum[k] - TARGET[k]).max() > 0.3
            )  # the penalty moved the optimum


def test_si_omega_is_the_path_integral_under_adam(rng):
    """ω = Σ -g_{t-1}(θ_t - θ_{t-1}) whatever the optimiser: recomputed from the recorded path."""
    theta0 = _tree(rng)
    opt = optax.chain(flowjax.synaptic_intelligence(0.3), optax.adam(0.1))
    update = jax.jit(opt.update)
    p, s = theta0, opt.init(theta0)
    path, grads = [p], []
    for _ in range(5):
        g = _quadratic_grad(p)
        u, s = update(g, s, p)
        p = optax.apply_updates(p, u)
        path.append(p)
        grads.append(g)
    # After 5 updates, ω holds the 4 completed steps (the 5th is closed by the next update).
    for k in p:
        want = -sum(
            np.asarray(grads[t][k], np.float64)
            * (np.asarray(path[t + 1][k]) - path[t][k])
            for t in range(4)
        )
        np.testing.assert_allclose(s[0].omega[k], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(s[0].prev_grads[k], grads[4][k])
        np.testing.assert_array_equal(s[0].prev_params[k], path[4][k])


@pytest.mark.parametrize("method", METHODS)
def test_nnx_state_of_params(method):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)), jnp.float32)

    def loss(params):
        return jnp.mean((nnx.merge(graphdef, params, rest)(x) - 1.0) ** 2)

    fisher = jax.tree.map(lambda v: jnp.full(v.shape, 2.0), params)
    theta0 = jax.tree.map(jnp.copy, params)
    kernel_only = lambda p: jax.tree.map(lambda v: v.ndim == 2, p)  # noqa: E731
    tx = _make(method, theta0, 0.5, fisher=fisher, mask=kernel_only)
    opt = optax.chain(tx, optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads, updates

    state = opt.init(params)
    for _ in range(3):
        prev = params
        params, state, grads, updates = step(params, state)
    assert type(params) is type(theta0)
    np.testing.assert_allclose(
        updates["bias"][...], -0.1 * grads["bias"][...], rtol=1e-6
    )  # masked out
    if method in ("l2sp", "ewc"):
        c = 0.5 * (2.0 if method == "ewc" else 1.0)
        extra = c * (prev["kernel"][...] - theta0["kernel"][...])
        np.testing.assert_allclose(
            updates["kernel"][...], -0.1 * (grads["kernel"][...] + extra), rtol=1e-5
        )
        assert np.abs(extra).max() > 1e-4


@pytest.fixture(scope="module")
def flow_problem():
    """Regression data, FLOW weights from a pre-pass, and a jitted weighted train loop."""
    rng = np.random.default_rng(0)
    n, dim = 64, 4
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ rng.normal(size=dim) + 0.3 * rng.normal(size=n)).astype(np.float32)
    theta0 = {
        "w": jnp.asarray(rng.normal(size=dim), jnp.float32),
        "b": jnp.zeros((), jnp.float32),
    }
    loss_fn = lambda p, ex: (ex["x"] @ p["w"] + p["b"] - ex["y"]) ** 2  # noqa: E731
    table = flowjax.per_example_losses(
        loss_fn, theta0, [{"id": np.arange(n), "x": x, "y": y}], progress=False
    )
    weights = table.flow_weights().lookup(np.arange(n))

    def train(tx):
        opt = optax.chain(tx, optax.sgd(0.1))

        @jax.jit
        def step(params, state, batch, w):
            def objective(p):
                losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
                return flowjax.weighted_loss(losses, w)

            value, grads = jax.value_and_grad(objective)(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        params, state = theta0, opt.init(theta0)
        values = []
        for _ in range(60):
            params, state, value = step(params, state, {"x": x, "y": y}, weights)
            values.append(float(value))
        dist = np.sqrt(
            sum(float(jnp.sum((params[k] - theta0[k]) ** 2)) for k in params)
        )
        return values, dist

    plain_values, plain_dist = train(optax.identity())
    assert plain_values[-1] < 0.1 * plain_values[0]  # 2.16 -> 0.06
    return theta0, train, plain_dist


@pytest.mark.parametrize("method", METHODS)
def test_with_flow_weights_in_one_jitted_step(method, flow_problem):
    """FLOW's weighted loss + a regulariser: the loss falls and θ stays closer to θ₀ than without it."""
    theta0, train, plain_dist = flow_problem
    fisher = {"w": jnp.full(4, 3.0), "b": jnp.ones(())}
    values, dist = train(_make(method, theta0, 0.3, fisher=fisher))
    assert values[-1] < 0.6 * values[0]
    assert dist < 0.9 * plain_dist


# ----------------------------------------------------------------------------- anchor storage


@pytest.mark.parametrize("method", METHODS)
def test_init_accepts_abstract_params(method, rng):
    theta0, fisher = _tree(rng), _fisher(rng)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), theta0)
    shapes = jax.eval_shape(_make(method, None, 0.5, fisher=fisher).init, abstract)
    assert (
        shapes.anchor["w"].shape == (2, 3) and shapes.anchor["w"].dtype == jnp.float32
    )
    # A given anchor works too (init copies the concrete anchor).
    shapes = jax.eval_shape(_make(method, theta0, 0.5, fisher=fisher).init, abstract)
    assert shapes.anchor["b"].shape == (3,)


def test_anchor_is_a_copy_and_a_donated_state_keeps_its_buffer(rng):
    """init copies θ₀ (so params and opt_state can both be donated), and a donated unchanged
    anchor is aliased from input to output: the same device buffer every step, no copy."""
    theta0 = _tree(rng)
    saved = np.asarray(theta0["w"])
    opt = optax.chain(flowjax.l2sp(0.1, theta0), optax.sgd(0.1))
    state = opt.init(theta0)
    assert (
        state[0].anchor["w"].unsafe_buffer_pointer()
        != theta0["w"].unsafe_buffer_pointer()
    )

    def step(p, s):
        u, s = opt.update(_quadratic_grad(p), s, p)
        return optax.apply_updates(p, u), s

    donated = jax.jit(step, donate_argnums=(0, 1))
    pointer = state[0].anchor["w"].unsafe_buffer_pointer()
    params = (
        theta0  # the same arrays the anchor was made from: donating them must be fine
    )
    for _ in range(3):
        params, state = donated(params, state)
        assert state[0].anchor["w"].unsafe_buffer_pointer() == pointer
    np.testing.assert_array_equal(state[0].anchor["w"], saved)


# ----------------------------------------------------------------------------- L2-SP and EWC maths


@pytest.mark.parametrize("scale", ["none", "num_params"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grad_of_l2sp_penalty_is_exactly_what_the_transform_adds(scale, dtype, rng):
    theta0, params = _tree(rng, dtype), _tree(rng, dtype, scale=2.0)
    mask = {"w": True, "b": False}
    tx = flowjax.l2sp(0.3, theta0, mask=mask, scale=scale)
    zeros = jax.tree.map(jnp.zeros_like, params)
    added, _ = tx.update(zeros, tx.init(params), params)
    grad = jax.grad(
        lambda p: flowjax.l2sp_penalty(0.3, theta0, p, mask=mask, scale=scale)
    )(params)
    for k in params:
        np.testing.assert_array_equal(
            np.asarray(added[k], np.float32), np.asarray(grad[k], np.float32)
        )
    assert np.abs(np.asarray(added["w"], np.float32)).max() > 0


def test_num_params_scale_is_the_official_llm_regulariser(rng):
    """FLOW_PAPER.md §2.2: loss += λ Σ_trainable (θ-θ₀)² / #trainable."""
    theta0, params = _tree(rng), _tree(rng)
    d = np.asarray(params["w"], np.float64) - np.asarray(theta0["w"], np.float64)
    got = flowjax.l2sp_penalty(
        1e-3, theta0, params, mask={"w": True, "b": False}, scale="num_params"
    )
    np.testing.assert_allclose(float(got), 1e-3 * np.sum(d**2) / d.size, rtol=1e-6)
    got = flowjax.l2sp_penalty(1e-3, theta0, params)
    full = sum(
        np.sum((np.asarray(params[k], np.float64) - np.asarray(theta0[k])) ** 2)
        for k in params
    )
    np.testing.assert_allclose(float(got), 1e-3 / 2 * full, rtol=1e-6)


def test_ewc_with_unit_fisher_is_exactly_l2sp(rng):
    theta0, params, grads = _tree(rng), _tree(rng, scale=2.0), _tree(rng)
    ones = jax.tree.map(jnp.ones_like, theta0)
    a, _ = flowjax.ewc(0.37, ones, theta0).update(
        grads, flowjax.ewc(0.37, ones, theta0).init(params), params
    )
    b, _ = flowjax.l2sp(0.37, theta0).update(
        grads, flowjax.l2sp(0.37, theta0).init(params), params
    )
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert float(flowjax.ewc_penalty(0.37, ones, theta0, params)) == float(
        flowjax.l2sp_penalty(0.37, theta0, params)
    )


def test_grad_of_ewc_penalty_matches_the_transform(rng):
    theta0, params, fisher = _tree(rng), _tree(rng, scale=2.0), _fisher(rng)
    tx = flowjax.ewc(0.8, fisher, theta0)
    added, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    grad = jax.grad(lambda p: flowjax.ewc_penalty(0.8, fisher, theta0, p))(params)
    for k in params:
        np.testing.assert_allclose(added[k], grad[k], rtol=1e-6)
        want = (
            0.8
            * np.asarray(fisher[k], np.float64)
            * (np.asarray(params[k], np.float64) - np.asarray(theta0[k]))
        )
        np.testing.assert_allclose(added[k], want, rtol=1e-6)
    want = 0.4 * sum(
        np.sum(
            np.asarray(fisher[k], np.float64)
            * (np.asarray(params[k], np.float64) - np.asarray(theta0[k])) ** 2
        )
        for k in params
    )
    np.testing.assert_allclose(
        float(flowjax.ewc_penalty(0.8, fisher, theta0, params)), want, rtol=1e-6
    )


def test_anchor_none_anchors_at_init_params(rng):
    theta0, params = _tree(rng), _tree(rng, scale=2.0)
    tx = flowjax.l2sp(0.5)
    state = tx.init(theta0)
    added, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    np.testing.assert_allclose(added["w"], 0.5 * (params["w"] - theta0["w"]), rtol=1e-6)


# ----------------------------------------------------------------------------- SI maths


def test_si_consolidate_matches_zenke_and_then_only_consolidated_importance_counts(rng):
    theta0 = _tree(rng)
    xi = 0.2
    opt = optax.chain(
        flowjax.synaptic_intelligence(0.0, damping=xi, online=False), optax.sgd(0.3)
    )
    p, s = theta0, opt.init(theta0)
    path, grads = [p], []
    for _ in range(4):  # task 1: plain SGD (strength 0), ω accumulates
        g = _quadratic_grad(p)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        path.append(p)
        grads.append(g)
    s = flowjax.si_consolidate(s, p)  # finds the SIState inside the chain's tuple state
    for k in p:
        om = -sum(
            np.asarray(grads[t][k], np.float64)
            * (np.asarray(path[t + 1][k]) - path[t][k])
            for t in range(4)
        )
        big = np.maximum(om, 0) / (
            (np.asarray(p[k], np.float64) - np.asarray(theta0[k])) ** 2 + xi
        )
        np.testing.assert_allclose(s[0].importance[k], big, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(s[0].anchor[k], p[k])
        np.testing.assert_array_equal(s[0].omega[k], np.zeros_like(om))
    assert float(jnp.max(s[0].importance["w"])) > 0
    # Task 2 with online=False: the added gradient is λ Ω (θ - θ₀') with Ω, θ₀' from the boundary.
    si = flowjax.synaptic_intelligence(1.5, damping=xi, online=False)
    q = jax.tree.map(lambda x: x + 0.5, p)
    zeros = jax.tree.map(jnp.zeros_like, q)
    added, _ = si.update(zeros, s[0], q)
    for k in q:
        np.testing.assert_allclose(
            added[k], 1.5 * np.asarray(s[0].importance[k]) * 0.5, rtol=1e-5
        )


def test_si_offline_without_consolidation_is_plain_fine_tuning(rng):
    theta0 = _tree(rng)
    got, _ = _run(flowjax.synaptic_intelligence(3.0, online=False), theta0, 4, 0.3)
    want, _ = _numpy_run("l2sp", theta0, None, 0.0, 0.3, 4)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", METHODS)
def test_update_without_params_raises(method, rng):
    theta0 = _tree(rng)
    for mask in (None, nnx.PathContains("w")):  # also through optax.masked
        tx = _make(method, theta0, 0.5, fisher=_fisher(rng), mask=mask)
        with pytest.raises(
            ValueError, match=r"needs params: call tx.update\(grads, state, params\)"
        ):
            tx.update(theta0, tx.init(theta0))


@pytest.mark.parametrize("method", METHODS)
def test_tree_mismatch_names_the_path(method, rng):
    theta0 = _tree(rng)
    tx = _make(method, theta0, 0.5, fisher=_fisher(rng))
    with pytest.raises(ValueError, match=r"anchor has no entry at params\['c'\]"):
        tx.init({**theta0, "c": jnp.ones(2)})
    with pytest.raises(
        ValueError,
        match=r"anchor\['w'\] has shape \(2, 3\); params\['w'\] has shape \(3, 2\)",
    ):
        tx.init({**theta0, "w": jnp.ones((3, 2))})
    state = tx.init(theta0)
    with pytest.raises(
        ValueError, match=r"params has no entry at params\['b'\]|params"
    ):
        tx.update(theta0, state, {"w": theta0["w"]})


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_bad_strength_raises(method, bad, rng):
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        _make(method, _tree(rng), bad, fisher=_fisher(rng))


def test_other_bad_inputs_raise(rng):
    theta0 = _tree(rng)
    fisher = _fisher(rng)
    with pytest.raises(ValueError, match=r"fisher\['b'\] must be >= 0"):
        flowjax.ewc(1.0, {**fisher, "b": -fisher["b"]}, theta0)
    with pytest.raises(ValueError, match=r"fisher\['w'\] has NaN or infinite entries"):
        flowjax.ewc(1.0, {**fisher, "w": fisher["w"].at[0, 1].set(jnp.nan)}, theta0)
    with pytest.raises(ValueError, match=r"fisher has no entry at params\['b'\]"):
        flowjax.ewc(1.0, {"w": fisher["w"]}, theta0)
    with pytest.raises(ValueError, match="scale must be one of"):
        flowjax.l2sp(1.0, theta0, scale="mean")
    with pytest.raises(ValueError, match="the mask selects none"):
        flowjax.l2sp(
            1.0, theta0, mask={"w": False, "b": False}, scale="num_params"
        ).init(theta0)
    with pytest.raises(
        TypeError, match=r"mask leaves must be bools.*bool.*at mask\['w'\]"
    ):
        flowjax.l2sp(1.0, theta0, mask={"w": jnp.ones((2, 3), bool), "b": True}).init(
            theta0
        )
    with pytest.raises(
        ValueError, match=r"mask does not match the params.*\['b'\] are missing"
    ):
        flowjax.l2sp(1.0, theta0, mask={"w": True}).init(theta0)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        flowjax.synaptic_intelligence(1.0, damping=0.0)
    with pytest.raises(ValueError, match="found no SIState"):
        flowjax.si_consolidate(flowjax.l2sp(1.0, theta0).init(theta0), theta0)
    other = flowjax.l2sp(1.0).init({"w": theta0["w"]})
    with pytest.raises(ValueError, match="initialised for a different parameter tree"):
        flowjax.l2sp(1.0, theta0).update(theta0, other, theta0)


# ----------------------------------------------------------------------------- inside train_only / optax.masked


def _two_part(rng):
    return {"body": _tree(rng), "head": _tree(rng)}


def _head_fisher(rng):
    return {"body": _fisher(rng), "head": _fisher(rng)}


@pytest.mark.parametrize("wrap", ["train_only", "masked", "partition"])
@pytest.mark.parametrize("method", METHODS)
def test_inside_train_only_masked_and_partition_equals_the_method_on_the_selected_part(
    method, wrap, variant, rng
):
    """Only the head is handed to the regulariser; it must act as on the head alone."""
    params, fisher = _two_part(rng), _head_fisher(rng)
    head_only = {"body": False, "head": True}
    # anchor=None (the usual case) and an explicit full-tree anchor.
    for anchor in (None, jax.tree.map(lambda x: x + 0.5, params)):
        inner = _make(method, anchor, 0.7, fisher=fisher)
        sgd = optax.sgd(0.3)
        if wrap == "train_only":
            tx = flowjax.train_only(optax.chain(inner, sgd), head_only)
        elif wrap == "masked":
            tx = optax.chain(optax.masked(inner, head_only), sgd)
        else:
            tx = optax.partition(
                {"reg": optax.chain(inner, sgd), "plain": sgd},
                {"body": "plain", "head": "reg"},
            )
        ref_anchor = None if anchor is None else anchor["head"]
        ref = optax.chain(
            _make(method, ref_anchor, 0.7, fisher=fisher["head"]), optax.sgd(0.3)
        )
        got, state = _run_tx(tx, params, 4, variant)
        want, ref_state = _run_tx(ref, params["head"], 4, variant)
        for k in ("w", "b"):
            np.testing.assert_allclose(
                got["head"][k], want[k], rtol=1e-6, atol=1e-7, err_msg=k
            )
        if method == "si":  # consolidation sees only the head, as SI did
            imp = _si_states(flowjax.si_consolidate(state, got))[0].importance
            ref_imp = flowjax.si_consolidate(ref_state, want)[0].importance
            for k in ("w", "b"):
                np.testing.assert_allclose(imp["head"][k], ref_imp[k], rtol=1e-5)
            hidden = jax.tree.leaves(
                imp["body"], is_leaf=lambda x: isinstance(x, optax.MaskedNode)
            )
            assert hidden and all(isinstance(x, optax.MaskedNode) for x in hidden)
        if wrap == "train_only":
            for k in ("w", "b"):
                np.testing.assert_array_equal(got["body"][k], params["body"][k])
        plain, _ = _run_tx(optax.sgd(0.3), params["head"], 4, variant)
        assert max(np.abs(want[k] - plain[k]).max() for k in want) > 1e-3


def _run_tx(tx, params, steps, variant):
    @variant
    def step(params, state):
        updates, state = tx.update(_quadratic_grad_nested(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _quadratic_grad_nested(p):
    if "w" in p:
        return _quadratic_grad(p)
    return {k: _quadratic_grad(v) for k, v in p.items()}


def test_num_params_inside_train_only_is_the_mean_over_trainable_params(rng):
    """train_only(chain(l2sp(λ, scale="num_params"), sgd), head) uses N = #trainable entries."""
    params = _two_part(rng)
    tx = flowjax.train_only(
        optax.chain(flowjax.l2sp(0.1, scale="num_params"), optax.sgd(1.0)),
        {"body": False, "head": True},
    )
    state = tx.init(params)
    p2 = jax.tree.map(lambda x: x + 1.0, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, p2)
    n = 9  # the head's w (2x3) and b (3)
    for k in ("w", "b"):  # -lr · 2λ/N · (θ - θ₀), θ - θ₀ = 1
        np.testing.assert_allclose(updates["head"][k], -2 * 0.1 / n, rtol=1e-6)
        np.testing.assert_array_equal(updates["body"][k], 0.0)
    # The same N as the penalty over the head only (jax.grad of it).
    g = jax.grad(
        lambda h: flowjax.l2sp_penalty(0.1, params["head"], h, scale="num_params")
    )(p2["head"])
    for k in ("w", "b"):
        np.testing.assert_allclose(updates["head"][k], -g[k], rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_explicit_anchor_shape_is_checked_only_on_selected_leaves(method, rng):
    """An old head of another shape in θ₀ is fine when the mask leaves the head out."""
    body = _tree(rng)
    theta0 = {"body": body, "head": jnp.zeros((4, 10))}  # old head: 10 classes
    params = {"body": jax.tree.map(lambda x: x + 1.0, body), "head": jnp.ones((4, 3))}
    fisher = {"body": _fisher(rng), "head": jnp.ones((4, 10))}
    tx = _make(method, theta0, 0.5, fisher=fisher, mask={"body": True, "head": False})
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(updates["head"], 0.0)
    if method == "l2sp":
        for k in ("w", "b"):
            np.testing.assert_allclose(updates["body"][k], 0.5, rtol=1e-6)
    if method == "ewc":
        for k in ("w", "b"):
            np.testing.assert_allclose(
                updates["body"][k], 0.5 * fisher["body"][k], rtol=1e-6
            )
    # A selected leaf of the wrong shape still raises, naming it.
    with pytest.raises(ValueError, match=r"\['head'\] has shape \(4, 10\)"):
        _make(method, theta0, 0.5, fisher=fisher).init(params)


@pytest.mark.parametrize(
    "leaf", [np.bool_(False), jnp.array(False), np.array(False)], ids=type
)
def test_mask_accepts_numpy_and_zero_d_bool_array_leaves(leaf, rng):
    theta0 = _tree(rng)
    params = jax.tree.map(lambda x: x + 1.0, theta0)
    tx = flowjax.l2sp(0.5, theta0, mask={"w": True, "b": leaf})
    updates, _ = tx.update(
        jax.tree.map(jnp.zeros_like, params), tx.init(params), params
    )
    np.testing.assert_allclose(updates["w"], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_plain_dict_prefix_mask_on_an_nnx_state(method):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.body = nnx.Linear(2, 3, rngs=rngs)
            self.head = nnx.Linear(3, 2, rngs=rngs)

    params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    theta0 = jax.tree.map(lambda x: x - 1.0, params)
    fisher = jax.tree.map(jnp.ones_like, params)
    tx = _make(method, theta0, 0.5, fisher=fisher, mask={"body": True, "head": False})
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["head"]["kernel"][...], 0.0)
    if method in ("l2sp", "ewc"):
        np.testing.assert_allclose(updates["body"]["kernel"][...], 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match=r"mask does not match.*'tail'"):
        _make(
            method, theta0, 0.5, fisher=fisher, mask={"body": True, "tail": False}
        ).init(params)


def test_full_nnx_state_with_rng_keys_names_the_leaf():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 3, rngs=rngs)
            self.rngs = rngs

    state = nnx.state(Net(nnx.Rngs(0, dropout=1)))
    with pytest.raises(
        TypeError, match=r"rngs.*key<fry>.*nnx\.state\(model, nnx\.Param\)"
    ):
        flowjax.l2sp(0.1).init(state)
    with pytest.raises(TypeError, match=r"rngs.*nnx\.state\(model, nnx\.Param\)"):
        flowjax.l2sp_penalty(0.1, state, state)
    # Masking the RNG streams out works.
    tx = flowjax.l2sp(0.1, mask={"lin": True, "rngs": False})
    s = tx.init(state)
    moved = jax.tree.map(
        lambda x: x + 1.0 if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )
    updates, _ = tx.update(state, s, moved)  # updates: any tree like params
    k = state["lin"]["kernel"][...]
    np.testing.assert_allclose(updates["lin"]["kernel"][...], k + 0.1, rtol=1e-6)
    assert (
        updates["rngs"]["dropout"]["key"][...] is state["rngs"]["dropout"]["key"][...]
    )


def test_si_keeps_float64_state_under_x64_in_lax_scan():
    with jax.enable_x64(True):
        params = {"w": jnp.array([0.0, 0.0], jnp.float64)}
        tx = optax.chain(flowjax.synaptic_intelligence(1.0), optax.sgd(0.5))
        state = tx.init(params)
        assert state[0].omega["w"].dtype == jnp.float64
        assert state[0].importance["w"].dtype == jnp.float64
        target = jnp.array([1.0, -2.0], jnp.float64)

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.tree.map(lambda x: x - target, p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, s), _ = jax.lax.scan(step, (params, state), length=3)
        # Same as three eager steps (the doctest's numbers for float32).
        np.testing.assert_allclose(s[0].omega["w"], [0.446, 1.591], atol=1e-3)
        assert s[0].omega["w"].dtype == jnp.float64
        consolidated = flowjax.si_consolidate(s, p)
        assert consolidated[0].importance["w"].dtype == jnp.float64
        assert consolidated[0].omega["w"].dtype == jnp.float64


def test_ewc_checks_the_fisher_on_device_once(rng, monkeypatch):
    """The Fisher check fetches two scalars per leaf, never the Fisher itself."""
    theta0, fisher = _tree(rng), _fisher(rng)
    bad = {**fisher, "b": -fisher["b"]}
    to_host = type(fisher["w"]).__array__

    def no_big_copies(self, *args, **kwargs):
        assert self.size <= 1, f"copied a {self.shape} array to the host"
        return to_host(self, *args, **kwargs)

    monkeypatch.setattr(type(fisher["w"]), "__array__", no_big_copies)
    flowjax.ewc(1.0, fisher, theta0)
    with pytest.raises(ValueError, match=r"fisher\['b'\] must be >= 0 .*min -"):
        flowjax.ewc(1.0, bad, theta0)
    with pytest.raises(ValueError, match=r"fisher\['w'\] has NaN or infinite"):
        flowjax.ewc(1.0, {**fisher, "w": fisher["w"].at[0, 1].set(jnp.inf)}, theta0)
    # Checked once, in ewc(); a penalty call does not re-check (or copy) it.
    v = flowjax.ewc_penalty(2.0, bad, theta0, jax.tree.map(lambda x: x + 1.0, theta0))
    want = sum(float(jnp.sum(f)) for f in bad.values())
    np.testing.assert_allclose(float(v), want, rtol=1e-6)


def _si_states(state):
    return [
        s
        for s in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, flowjax.SIState)
        )
        if isinstance(s, flowjax.SIState)
    ]


# ----------------------------------------------------------------------------- NNX filters as masks


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)


KERNELS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("bias")))


@pytest.mark.parametrize("method", ["l2sp", "l2sp_num_params", "ewc"])
@pytest.mark.parametrize(
    "mask",
    [KERNELS, nnx.PathContains("head"), nnx.Not(nnx.PathContains("head"))],
    ids=repr,
)
def test_nnx_filter_mask_adds_exactly_the_gradient_of_the_hand_written_penalty(
    method, mask
):
    """mask=<NNX filter> regularises what nnx.state(model, filter) selects, through
    optax.masked, and adds the gradient of the penalty written out by hand."""
    model = _Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    theta0 = jax.tree.map(lambda x: x - 0.25, params)
    fisher = jax.tree.map(lambda x: jnp.full(x.shape, 3.0), params)
    selected = {p for p, _ in nnx.to_flat_state(nnx.state(model, mask))}
    flat_p, flat_a = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(theta0))
    n = sum(flat_p[k][...].size for k in selected)

    def penalty(p):  # written out: ½λ Σ_sel c (θ-θ₀)², c = 1, 2/N, or F
        flat = dict(nnx.to_flat_state(p))
        c = {"l2sp": 1.0, "l2sp_num_params": 2.0 / n, "ewc": 3.0}[method]
        return sum(
            0.5 * 0.7 * c * jnp.sum((flat[k][...] - flat_a[k][...]) ** 2)
            for k in selected
        )

    tx = _make(method, theta0, 0.7, fisher=fisher, mask=mask)
    state = tx.init(params)
    assert isinstance(state, optax.MaskedState)  # optax.masked does the plumbing
    zeros = jax.tree.map(jnp.zeros_like, params)
    added, _ = jax.jit(tx.update)(zeros, state, params)
    want = jax.grad(penalty)(params)
    for (path, a), (_, w) in zip(
        nnx.to_flat_state(added), nnx.to_flat_state(want), strict=True
    ):
        np.testing.assert_allclose(a[...], w[...], rtol=1e-6, err_msg=str(path))
        assert (np.abs(np.asarray(a[...])).max() > 0) == (path in selected)
    # The same as optax.masked around the unmasked transform with NNX's own mask.
    bool_mask = flowjax.trainable_mask(params, mask)
    ref = optax.masked(_make(method, theta0, 0.7, fisher=fisher), bool_mask)
    again, _ = ref.update(zeros, ref.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, again, added)
    # The scalar penalties take the same filter.
    if method != "ewc":
        scale = "num_params" if method == "l2sp_num_params" else "none"
        got = flowjax.l2sp_penalty(0.7, theta0, params, mask=mask, scale=scale)
    else:
        got = flowjax.ewc_penalty(0.7, fisher, theta0, params, mask=mask)
    np.testing.assert_allclose(float(got), float(penalty(params)), rtol=1e-6)


def test_si_with_an_nnx_filter_mask_is_si_on_the_selected_leaves(rng):
    model = _Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        for _ in range(3)
    ]

    def run(tx, p, gs):
        s = tx.init(p)
        for g in gs:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, jax.tree.map(lambda x: -0.1 * x, u))
        return p

    got = run(
        flowjax.synaptic_intelligence(2.0, mask=nnx.PathContains("head")), params, grads
    )
    head = run(
        flowjax.synaptic_intelligence(2.0), params["head"], [g["head"] for g in grads]
    )
    body = run(optax.identity(), params["body"], [g["body"] for g in grads])
    jax.tree.map(np.testing.assert_array_equal, got["head"], head)
    jax.tree.map(np.testing.assert_array_equal, got["body"], body)


def test_type_filter_mask_on_a_plain_dict_is_a_clear_error(rng):
    theta0 = _tree(rng)
    for method in METHODS:
        with pytest.raises(
            TypeError, match=r"no nnx\.Variable leaves.*nnx\.PathContains"
        ):
            _make(method, None, 0.5, fisher=_fisher(rng), mask=nnx.Param).init(theta0)
    # A path filter on the same dict works: only w is pulled.
    tx = flowjax.l2sp(0.5, theta0, mask=nnx.PathContains("w"))
    params = jax.tree.map(lambda x: x + 1.0, theta0)
    updates, _ = tx.update(
        jax.tree.map(jnp.zeros_like, params), tx.init(params), params
    )
    np.testing.assert_allclose(updates["w"], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_init_on_shape_dtype_structs_directly(method, rng):
    theta0, fisher = _tree(rng), _fisher(rng)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), theta0)
    state = _make(method, None, 0.5, fisher=fisher).init(abstract)
    for leaf in jax.tree.leaves(state.anchor):
        assert isinstance(leaf, jax.ShapeDtypeStruct)
    assert state.anchor["w"].shape == (2, 3)
    if method == "si":
        assert state.omega["w"].dtype == jnp.float32
