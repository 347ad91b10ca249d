"""LwF: lwf_loss against a numpy KL, and lwf_objective (teacher as an argument, FLOW weights, NNX)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax


def _np_lwf(student, teacher, t):
    s, te = np.asarray(student, np.float64) / t, np.asarray(teacher, np.float64) / t
    log_q = s - s.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    log_p = te - te.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return t**2 * np.sum(np.exp(log_p) * (log_p - log_q), -1)


@pytest.mark.parametrize("temperature", [1.0, 3.5])
def test_lwf_loss_matches_a_numpy_kl(rng, variant, temperature):
    student = rng.normal(size=(3, 4, 7)).astype(np.float32) * 3
    teacher = rng.normal(size=(3, 4, 7)).astype(np.float32) * 3
    got = variant(lambda s, t: flowjax.lwf_loss(s, t, temperature=temperature))(
        student, teacher
    )
    assert got.shape == (3, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got), _np_lwf(student, teacher, temperature), rtol=2e-5, atol=1e-6
    )


def test_lwf_loss_is_exactly_zero_when_equal_and_finite_for_huge_logits(rng, variant):
    fn = variant(lambda s, t: flowjax.lwf_loss(s, t))
    big = rng.normal(size=(5, 6)).astype(np.float32) * 1e4
    np.testing.assert_array_equal(np.asarray(fn(big, big)), np.zeros(5))
    other = rng.normal(size=(5, 6)).astype(np.float32) * 1e4
    got = np.asarray(fn(big, other))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _np_lwf(big, other, 2.0), rtol=1e-5)


def test_lwf_gradient_flows_only_into_the_student(rng):
    s = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    temp = 2.0
    g_s, g_t = jax.grad(
        lambda s, t: jnp.sum(flowjax.lwf_loss(s, t, temperature=temp)), argnums=(0, 1)
    )(s, t)
    np.testing.assert_array_equal(np.asarray(g_t), np.zeros((4, 5)))
    # d/ds [T² KL(p || softmax(s/T))] = T (softmax(s/T) - p).
    expected = temp * (jax.nn.softmax(s / temp) - jax.nn.softmax(t / temp))
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(expected), atol=1e-6)


def test_lwf_where_masks_rows_to_zero_without_nan_leaking(variant):
    s = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf], [0.5, -0.5]])
    t = jnp.array([[0.0, 0.0], [jnp.nan, 1.0], [1.0, 1.0]])
    m = jnp.array([True, False, True])
    fn = variant(lambda s, t, m: flowjax.lwf_loss(s, t, where=m))
    got = np.asarray(fn(s, t, m))
    assert got[1] == 0.0
    np.testing.assert_allclose(
        got[[0, 2]], _np_lwf(s[jnp.array([0, 2])], t[jnp.array([0, 2])], 2.0), rtol=1e-6
    )
    g = jax.grad(lambda s: jnp.sum(fn(s, t, m)))(s)
    assert np.isfinite(np.asarray(g)).all() and np.all(np.asarray(g[1]) == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_lwf_loss_keeps_the_dtype(dtype):
    s = jnp.array([[0.0, 1.0, 2.0]], dtype)
    t = jnp.array([[2.0, 1.0, 0.0]], dtype)
    out = flowjax.lwf_loss(s, t)
    assert out.dtype == dtype
    np.testing.assert_allclose(
        float(out[0]),
        _np_lwf(np.float32(s), np.float32(t), 2.0)[0],
        rtol=1e-2,
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (
            {"student_logits": np.ones((2, 3)), "teacher_logits": np.ones((2, 4))},
            "same shape",
        ),
        ({"student_logits": np.ones(()), "teacher_logits": np.ones(())}, "same shape"),
        ({"where": np.ones(3, bool)}, "where has shape"),
        ({"temperature": 0.0}, "finite number > 0"),
        ({"temperature": -1.0}, "finite number > 0"),
        ({"temperature": np.inf}, "finite number > 0"),
        ({"temperature": "median"}, "finite number > 0"),
    ],
)
def test_lwf_loss_errors(kw, match):
    args = {"student_logits": np.ones((2, 3)), "teacher_logits": np.ones((2, 3))}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        flowjax.lwf_loss(args.pop("student_logits"), args.pop("teacher_logits"), **args)


def test_lwf_bad_temperature_under_jit_gives_nan_not_zero():
    out = jax.jit(
        lambda t: flowjax.lwf_loss(jnp.ones((1, 3)), jnp.zeros((1, 3)), temperature=t)
    )(0.0)
    assert np.isnan(np.asarray(out)).all()


# ------------------------------------------------------------------- objective
def _apply(p, ex):
    return ex["x"] @ p["w"] + p["b"]


def _ce(logits, ex):
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])


def _problem(rng, n=6, d=3, c=4):
    params = {
        "w": jnp.asarray(rng.normal(size=(d, c)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=c), jnp.float32),
    }
    teacher = jax.tree.map(lambda x: x + 0.5 * jnp.ones_like(x), params)
    teacher = {"w": teacher["w"] * -1.0, "b": teacher["b"]}
    batch = {
        "id": np.arange(n),
        "x": rng.normal(size=(n, d)).astype(np.float32),
        "y": rng.integers(0, c, n).astype(np.int32),
        "weight": rng.random(n).astype(np.float32),
        "valid": np.array([True] * (n - 1) + [False]),
    }
    return params, teacher, batch


@pytest.mark.parametrize(
    ("reduction", "weight_distillation"),
    [("mean", False), ("sum", True), ("normalized", True)],
)
def test_lwf_objective_matches_a_numpy_reference(rng, reduction, weight_distillation):
    params, teacher, batch = _problem(rng)
    objective = flowjax.lwf_objective(
        _apply,
        _ce,
        strength=0.7,
        temperature=2.0,
        reduction=reduction,
        valid_key="valid",
        weight_distillation=weight_distillation,
    )
    value, metrics = jax.jit(objective)(params, teacher, batch)
    if reduction == "mean":  # jit and no jit agree
        chex.assert_trees_all_close(
            (value, metrics), objective(params, teacher, batch), rtol=1e-6
        )
    x, y, w, m = (
        batch["x"],
        batch["y"],
        batch["weight"].astype(np.float64),
        batch["valid"],
    )
    z = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    zt = x @ np.asarray(teacher["w"]) + np.asarray(teacher["b"])
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[np.arange(len(y)), y]
    d = _np_lwf(z, zt, 2.0)
    red = {
        "mean": lambda v, w: np.sum(w * v * m) / m.sum(),
        "sum": lambda v, w: np.sum(w * v * m),
        "normalized": lambda v, w: np.sum(w * v * m) / np.sum(w * m),
    }[reduction]
    task = red(ce, w)
    distill = red(d, w if weight_distillation else np.ones_like(w))
    np.testing.assert_allclose(float(value), task + 0.7 * distill, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["task_loss"]), task, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["distill_loss"]), distill, rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["loss_unweighted"]), ce[m].mean(), rtol=1e-5
    )
    np.testing.assert_allclose(float(metrics["weight_mean"]), w[m].mean(), rtol=1e-6)
    dist = np.sqrt(
        sum(
            np.sum((np.asarray(params[k]) - np.asarray(teacher[k])) ** 2)
            for k in params
        )
    )
    np.testing.assert_allclose(float(metrics["param_distance"]), dist, rtol=1e-5)


def test_zero_strength_is_exactly_the_weighted_objective_and_teacher_gets_no_gradient(
    rng, variant
):
    params, teacher, batch = _problem(rng)
    lwf = flowjax.lwf_objective(_apply, _ce, strength=0.0, valid_key="valid")
    # The plain objective with the same metrics: under jit, XLA may fuse a program
    # with extra outputs differently, which can move a value by one ulp.
    plain = flowjax.weighted_objective(
        lambda p, ex: _ce(_apply(p, ex), ex), valid_key="valid", return_metrics=True
    )
    (v1, metrics), g1 = variant(jax.value_and_grad(lwf, has_aux=True))(
        params, teacher, batch
    )
    (v2, _), g2 = variant(jax.value_and_grad(plain, has_aux=True))(params, batch)
    assert float(v1) == float(v2)
    chex.assert_trees_all_equal(g1, g2)
    assert "distill_loss" not in metrics  # the teacher is not even run
    g_teacher, _ = jax.jit(jax.grad(lwf, argnums=1, has_aux=True))(
        params, teacher, batch
    )
    chex.assert_trees_all_equal(g_teacher, jax.tree.map(jnp.zeros_like, teacher))
    # With strength > 0 the student's gradient changes, the teacher's still does not move.
    strong = flowjax.lwf_objective(_apply, _ce, strength=3.0, valid_key="valid")
    (g3, g_teacher3), _ = jax.jit(jax.grad(strong, argnums=(0, 1), has_aux=True))(
        params, teacher, batch
    )
    assert not np.allclose(np.asarray(g3["w"]), np.asarray(g1["w"]))
    chex.assert_trees_all_equal(g_teacher3, jax.tree.map(jnp.zeros_like, teacher))


def _token_distillation(apply_fn=lambda p, ex: ex["x"] @ p):
    """LwF on per-example token logits [T, C] masked by batch["tokens"]; no task loss."""
    return flowjax.lwf_objective(
        apply_fn,
        lambda logits, ex: jnp.zeros((), logits.dtype),
        strength=1.0,
        weight_key=None,
        distill_mask_key="tokens",
    )


def test_lwf_objective_token_logits_mask_and_unit_weights(rng):
    # Per-example logits [T, C]; distillation is the mean over marked tokens.
    w = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[True, True, False, False], [True, True, True, True]])
    batch = {"id": np.arange(2), "x": x, "tokens": mask}
    objective = _token_distillation()
    value, metrics = objective(w, wt, batch)
    d = _np_lwf(x @ np.asarray(w), x @ np.asarray(wt), 2.0)  # [2, 4]
    expected = np.mean([d[0, :2].mean(), d[1].mean()])
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert "weight_mean" not in metrics


def test_lwf_objective_token_mask_keeps_nan_at_masked_tokens_out_of_gradients(rng):
    # A NaN/inf logit at a masked token must not reach the value or the gradient.
    w = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    # The logits are x @ w + offset: offset is NaN/inf at masked tokens only, so
    # the gradient w.r.t. w is finite iff the cotangent there is exactly 0.
    offset = np.zeros((2, 4, 5), np.float32)
    offset[0, 3] = np.nan
    offset[1, 2, 0] = np.inf
    offset[1, 2, 1] = -np.inf
    mask = np.array([[True, True, True, False], [True, True, False, True]])
    batch = {"id": np.arange(2), "x": x, "offset": offset, "tokens": mask}
    objective = _token_distillation(lambda p, ex: ex["x"] @ p + ex["offset"])
    (value, _), grad = jax.value_and_grad(objective, has_aux=True)(w, wt, batch)
    (ref_value, _), ref_grad = jax.value_and_grad(objective, has_aux=True)(
        w, wt, dict(batch, offset=np.zeros_like(offset))
    )
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5)


def test_lwf_objective_token_mask_of_the_wrong_shape_is_an_error(rng):
    w = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    objective = _token_distillation()
    # [B, C] = [2, 5] mask against per-example [T, C] = [4, 5] logits: would broadcast.
    bad = {"id": np.arange(2), "x": x, "tokens": np.ones((2, 5), bool)}
    with pytest.raises(ValueError, match=r"'tokens'.*\(5,\).*\(4,\)"):
        objective(w, w, bad)
    # [T] mask against per-example [C] logits (no token axis).
    flat = flowjax.lwf_objective(
        lambda p, ex: ex["x"] @ p,
        lambda logits, ex: jnp.zeros((), logits.dtype),
        strength=1.0,
        weight_key=None,
        distill_mask_key="tokens",
    )
    bad = {"id": np.arange(2), "x": x[:, 0], "tokens": np.ones((2, 5), bool)}
    with pytest.raises(ValueError, match=r"'tokens'.*\(5,\).*\(\)"):
        flat(w, w, bad)


def test_lwf_objective_errors(rng):
    params, teacher, batch = _problem(rng)
    with pytest.raises(ValueError, match="reduction must be one of"):
        flowjax.lwf_objective(_apply, _ce, strength=1.0, reduction="max")
    for bad in (-1.0, np.nan):
        with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
            flowjax.lwf_objective(_apply, _ce, strength=bad)
    with pytest.raises(ValueError, match="finite number > 0"):
        flowjax.lwf_objective(_apply, _ce, strength=1.0, temperature=0.0)
    objective = flowjax.lwf_objective(_apply, _ce, strength=1.0)
    no_weight = {k: v for k, v in batch.items() if k != "weight"}
    with pytest.raises(ValueError, match=r"no 'weight' field.*weight_key=None"):
        objective(params, teacher, no_weight)
    per_class = flowjax.lwf_objective(_apply, lambda z, ex: z, strength=1.0)
    with pytest.raises(ValueError, match="scalar per example"):
        per_class(params, teacher, batch)


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_teacher_is_an_argument_of_one_jitted_step_with_flow_weights(rng):
    model = _MLP(nnx.Rngs(0))
    graphdef, pretrained = nnx.split(model)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    ids = np.arange(100, 132)

    def apply_fn(params, ex):
        return nnx.merge(graphdef, params)(ex["x"])

    # FLOW: weights from the pre-trained model's per-example losses, attached by id.
    pre_losses = np.asarray(
        jax.vmap(lambda ex: _ce(apply_fn(pretrained, ex), ex))({"x": x, "y": y})
    )
    table = flowjax.LossTable(ids=ids, losses=pre_losses)
    batch = flowjax.attach_weights({"id": ids, "x": x, "y": y}, table.flow_weights())
    objective = flowjax.lwf_objective(apply_fn, _ce, strength=1.0)
    opt = optax.sgd(0.5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, teacher_params, batch):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
            params, teacher_params, batch
        )
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    params = jax.tree.map(jnp.array, pretrained)
    opt_state = opt.init(params)
    frozen = jax.tree.map(np.array, pretrained)
    history = []
    for _ in range(4):
        params, opt_state, _, metrics = step(params, opt_state, pretrained, batch)
        history.append(metrics)
    # Step 0 starts at the teacher: no distillation loss, distance 0; it then moves away.
    assert float(history[0]["distill_loss"]) == 0.0
    assert float(history[0]["param_distance"]) == 0.0
    assert float(history[-1]["distill_loss"]) > 0.0
    assert float(history[-1]["param_distance"]) > 0.0
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, pretrained), frozen)
    # A different teacher state reuses the compiled step (no retrace: it is an argument).
    other_teacher = jax.tree.map(lambda a: a * 0.5, pretrained)
    _, _, _, m = step(params, opt_state, other_teacher, batch)
    assert float(m["distill_loss"]) != float(history[-1]["distill_loss"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "normalized"])
def test_lwf_and_weighted_objective_share_one_reduction(rng, reduction, monkeypatch):
    """Both objectives reduce through the one private function: same task value and
    metrics for every reduction, and a change there reaches both."""
    params, teacher, batch = _problem(rng)
    lwf = flowjax.lwf_objective(
        _apply, _ce, strength=2.0, valid_key="valid", reduction=reduction
    )
    plain = flowjax.weighted_objective(
        lambda p, ex: _ce(_apply(p, ex), ex),
        valid_key="valid",
        reduction=reduction,
        return_metrics=True,
    )
    _, lwf_metrics = lwf(params, teacher, batch)
    value, metrics = plain(params, batch)
    assert float(lwf_metrics["task_loss"]) == float(value)
    for k in ("loss_unweighted", "weight_mean"):
        assert float(lwf_metrics[k]) == float(metrics[k])
    calls = []
    real = flowjax.objectives._reduce

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(flowjax.objectives, "_reduce", spy)  # one patch reaches both
    plain(params, batch)
    lwf(params, teacher, batch)
    assert calls == [reduction, reduction]
