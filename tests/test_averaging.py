"""WiSE-FT: leafwise interpolation, exact endpoints, masks, dtypes, NNX states, the sweep."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flowjax


def _bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _pair(rng):
    pre = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=4), jnp.bfloat16),
        "step": jnp.array(7, jnp.int32),
    }
    ft = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=4), jnp.bfloat16),
        "step": jnp.array(7, jnp.int32),
    }
    return pre, ft


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_wise_ft_matches_the_formula_and_keeps_dtypes(rng, variant, alpha):
    pre, ft = _pair(rng)
    out = variant(flowjax.wise_ft)(pre, ft, alpha)
    for k in ("w", "b"):
        assert out[k].dtype == ft[k].dtype
        ref = alpha * np.float64(pre[k]) + (1 - alpha) * np.float64(ft[k])
        tol = 1e-6 if k == "w" else 1e-2
        np.testing.assert_allclose(np.float64(out[k]), ref, rtol=tol, atol=tol)
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7


def test_endpoints_are_bitwise_where_the_plain_formula_is_not(variant):
    pre = {"w": jnp.array([-0.0, jnp.inf, 1e38, 3.3], jnp.float32)}
    ft = {"w": jnp.array([1.0, 2.0, -1e38, -0.0], jnp.float32)}
    fn = variant(flowjax.wise_ft)
    np.testing.assert_array_equal(_bits(fn(pre, ft, 1.0)["w"]), _bits(pre["w"]))
    np.testing.assert_array_equal(_bits(fn(pre, ft, 0.0)["w"]), _bits(ft["w"]))
    # The formula alone loses -0.0 and turns inf into NaN at the endpoints.
    naive1 = 1.0 * pre["w"] + 0.0 * ft["w"]
    naive0 = 0.0 * pre["w"] + 1.0 * ft["w"]
    assert not np.array_equal(_bits(naive1), _bits(pre["w"]))
    assert not np.array_equal(_bits(naive0), _bits(ft["w"]))


def test_mask_keeps_a_new_head_of_another_shape(rng, variant):
    pre = {"body": {"w": jnp.ones((2, 2))}, "head": jnp.zeros((2, 10))}
    ft = {"body": {"w": jnp.full((2, 2), 3.0)}, "head": jnp.full((2, 5), 9.0)}
    for mask in (
        {"body": True, "head": False},
        lambda p: {"body": True, "head": False},
    ):
        out = variant(lambda a, b, mask=mask: flowjax.wise_ft(a, b, 0.25, mask=mask))(
            pre, ft
        )
        np.testing.assert_array_equal(
            np.asarray(out["body"]["w"]), np.full((2, 2), 2.5)
        )
        np.testing.assert_array_equal(np.asarray(out["head"]), np.asarray(ft["head"]))
    with pytest.raises(ValueError, match=r"leaf \['head'\] has shape \(2, 10\).*mask="):
        flowjax.wise_ft(pre, ft, 0.5)


@pytest.mark.parametrize(
    ("pre", "ft", "kw", "match"),
    [
        (
            {"a": jnp.ones(2)},
            {"b": jnp.ones(2)},
            {},
            r"different tree structures.*\['b'\]",
        ),
        (
            {"n": jnp.array(1)},
            {"n": jnp.array(2)},
            {},
            r"non-float leaf \['n'\] differs",
        ),
        (
            {"n": jnp.array(1)},
            {"n": jnp.array(1.0)},
            {},
            "float leaf cannot be averaged",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": jnp.ones(2)},
            {"alpha": 1.5},
            r"alpha must be in \[0, 1\]",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": jnp.ones(2)},
            {"alpha": -0.1},
            r"alpha must be in \[0, 1\]",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": jnp.ones(2)},
            {"mask": {"b": True}},
            r"mask does not match the params.*\['b'\]",
        ),
    ],
)
def test_wise_ft_errors(pre, ft, kw, match):
    args = {"alpha": 0.5, **kw}
    with pytest.raises(ValueError, match=match):
        flowjax.wise_ft(pre, ft, args.pop("alpha"), **args)


def test_masked_out_integer_leaves_may_differ():
    out = flowjax.wise_ft(
        {"n": jnp.array(1), "w": jnp.zeros(2)},
        {"n": jnp.array(5), "w": jnp.ones(2)},
        0.5,
        mask={"n": False, "w": True},
    )
    assert int(out["n"]) == 5 and out["w"].tolist() == [0.5, 0.5]


class _Net(nnx.Module):
    def __init__(self, classes, rngs):
        self.body = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.body(x)))


def test_nnx_states_with_a_new_head(rng):
    _, pre = nnx.split(_Net(7, nnx.Rngs(0)))
    ft_graphdef, ft = nnx.split(_Net(2, nnx.Rngs(1)))

    def mask(state):
        m = jax.tree.map(lambda _: True, state)
        m["head"] = jax.tree.map(lambda _: False, state["head"])
        return m

    out = flowjax.wise_ft(pre, ft, 0.3, mask=mask)
    assert isinstance(out, nnx.State)
    np.testing.assert_allclose(
        np.asarray(out["body"]["kernel"][...]),
        0.3 * np.asarray(pre["body"]["kernel"][...])
        + 0.7 * np.asarray(ft["body"]["kernel"][...]),
        rtol=1e-6,
    )
    chex.assert_trees_all_equal(out["head"], ft["head"])
    model = nnx.merge(ft_graphdef, out)
    assert model(jnp.ones((1, 3))).shape == (1, 2)
    chex.assert_trees_all_equal(flowjax.wise_ft(pre, ft, 0.0, mask=mask), ft)


def test_sweep_over_dict_and_nnx_state_with_progress_bar(rng, capsys):
    pre, ft = _pair(rng)
    alphas = [0.0, 0.3, 1.0]

    def metric(p):
        return {"w_sum": float(jnp.sum(p["w"])), "b0": p["b"][0]}

    curve = flowjax.wise_ft_sweep(pre, ft, metric, alphas)
    assert "WiSE-FT sweep" in capsys.readouterr().err
    assert curve.alphas.dtype == np.float64 and curve.alphas.tolist() == alphas
    assert set(curve.metrics) == {"w_sum", "b0"}
    for i, a in enumerate(alphas):
        direct = flowjax.wise_ft(pre, ft, a)
        assert curve.metrics["w_sum"][i] == pytest.approx(
            float(jnp.sum(direct["w"])), rel=1e-6
        )
        assert curve.metrics["b0"][i] == float(direct["b"][0])
    assert curve.metrics["w_sum"][0] == float(jnp.sum(ft["w"]))
    assert curve.metrics["w_sum"][-1] == float(jnp.sum(pre["w"]))

    graphdef, s_pre = nnx.split(_Net(2, nnx.Rngs(0)))
    _, s_ft = nnx.split(_Net(2, nnx.Rngs(1)))
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    curve = flowjax.wise_ft_sweep(
        s_pre,
        s_ft,
        lambda s: float(jnp.sum(nnx.merge(graphdef, s)(x))),
        progress=False,
    )
    assert capsys.readouterr().err == ""
    assert len(curve.alphas) == 11 and curve.alphas[5] == 0.5
    assert curve.metrics["metric"][0] == float(jnp.sum(nnx.merge(graphdef, s_ft)(x)))
    assert curve.metrics["metric"][-1] == float(jnp.sum(nnx.merge(graphdef, s_pre)(x)))


def test_sweep_errors(rng):
    pre, ft = _pair(rng)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        flowjax.wise_ft_sweep(pre, ft, lambda p: 0.0, [], progress=False)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        flowjax.wise_ft_sweep(pre, ft, lambda p: 0.0, [0.0, 2.0], progress=False)
    names = iter([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="returned names"):
        flowjax.wise_ft_sweep(
            pre, ft, lambda p: next(names), [0.0, 1.0], progress=False
        )
    with pytest.raises(ValueError, match="must be one number"):
        flowjax.wise_ft_sweep(pre, ft, lambda p: p["w"], [0.0], progress=False)


def test_flow_fine_tuned_model_averaged_in_one_jitted_step(rng):
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=8).astype(np.float32)
    pre = {"w": jnp.zeros(3)}
    ft = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    loss = lambda p, ex: (ex["x"] @ p["w"] - ex["y"]) ** 2  # noqa: E731
    table = flowjax.LossTable(
        ids=np.arange(8), losses=np.asarray((x @ np.zeros(3) - y) ** 2)
    )
    batch = flowjax.attach_weights(
        {"id": np.arange(8), "x": x, "y": y}, table.flow_weights()
    )
    objective = flowjax.weighted_objective(loss)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def evaluate(pre, ft, alpha, batch):
        return objective(flowjax.wise_ft(pre, ft, alpha), batch)

    for a in (0.0, 0.5, 1.0):
        mixed = a * np.zeros(3) + (1 - a) * np.asarray(ft["w"])
        expected = np.mean(batch["weight"] * (x @ mixed - y) ** 2)
        np.testing.assert_allclose(
            float(evaluate(pre, ft, a, batch)), expected, rtol=1e-5
        )


def test_bad_mask_leaf_is_a_type_error():
    with pytest.raises(TypeError, match=r"mask leaves must be bools.*float"):
        flowjax.wise_ft({"a": jnp.ones(2)}, {"a": jnp.ones(2)}, 0.5, mask={"a": 1.0})


class _Dropout(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.lin(x))


def test_full_nnx_state_with_rng_streams_keeps_the_finetuned_rng():
    pre = _Dropout(nnx.Rngs(0, dropout=1))
    pre_state = jax.tree.map(jnp.copy, nnx.state(pre))
    ft = _Dropout(nnx.Rngs(0, dropout=1))
    ft.lin.kernel[...] = ft.lin.kernel[...] + 1.0
    for _ in range(3):  # each call advances the dropout stream's count
        ft(jnp.ones((1, 3)))
    ft_state = nnx.state(ft)

    def count(s):
        leaves = jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return [int(v[...]) for v in leaves if isinstance(v, nnx.RngCount)]

    assert count(ft_state) != count(pre_state)
    out = flowjax.wise_ft(pre_state, ft_state, 0.25)
    np.testing.assert_allclose(
        out["lin"]["kernel"][...], pre_state["lin"]["kernel"][...] + 0.75, rtol=1e-6
    )
    assert count(out) == count(ft_state)

    def keys(s):
        leaves = jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return [
            jax.random.key_data(v[...]) for v in leaves if isinstance(v, nnx.RngKey)
        ]

    for a, b in zip(keys(out), keys(ft_state), strict=True):
        np.testing.assert_array_equal(a, b)
    model = nnx.merge(nnx.graphdef(ft), out)
    assert model(jnp.ones((1, 3))).shape == (1, 2)
    # Other integer leaves are still checked.
    with pytest.raises(ValueError, match=r"non-float leaf \['n'\] differs"):
        flowjax.wise_ft({"n": jnp.array(1)}, {"n": jnp.array(2)}, 0.5)


def test_wise_ft_mask_takes_an_nnx_filter_unchanged():
    """mask=nnx.Not(nnx.PathContains("head")) averages what nnx.state(model, filter) selects."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs, classes):
            self.body = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, classes, rngs=rngs)

    pre_model, ft_model = Net(nnx.Rngs(0), 2), Net(nnx.Rngs(1), 2)
    pre, ft = nnx.state(pre_model, nnx.Param), nnx.state(ft_model, nnx.Param)
    shared = nnx.Not(nnx.PathContains("head"))
    out = flowjax.wise_ft(pre, ft, 0.5, mask=shared)
    averaged = {p for p, _ in nnx.to_flat_state(nnx.state(ft_model, shared))}
    assert averaged == {("body", "kernel"), ("body", "bias")}
    for (path, o), (_, p), (_, f) in zip(
        nnx.to_flat_state(out),
        nnx.to_flat_state(pre),
        nnx.to_flat_state(ft),
        strict=True,
    ):
        want = 0.5 * (p[...] + f[...]) if path in averaged else f[...]
        np.testing.assert_allclose(o[...], want, rtol=1e-6, err_msg=str(path))
    with pytest.raises(TypeError, match=r"no nnx\.Variable leaves"):
        flowjax.wise_ft(
            nnx.to_pure_dict(pre), nnx.to_pure_dict(ft), 0.5, mask=nnx.Param
        )
