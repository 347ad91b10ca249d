"""freeze / trainable_mask / swap_task_parts: linear probing, LP-FT, round 2, retained accuracy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax


class Net(nnx.Module):
    """body -> BatchNorm -> relu -> head: the layout of the vision pipeline, in miniature."""

    def __init__(self, rngs, classes=3, width=5):
        self.body = nnx.Linear(4, width, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.body(x))))


def _x(n=8, seed=0, shift=0.0):
    return jnp.asarray(
        np.random.default_rng(seed).normal(size=(n, 4)) + shift, jnp.float32
    )


def _tree(rng, dtype=np.float32):
    return {
        "body": {
            "w": jnp.asarray(rng.normal(size=(3, 2)), dtype),
            "b": jnp.asarray(rng.normal(size=2), dtype),
        },
        "head": {"w": jnp.asarray(rng.normal(size=(2, 2)), dtype)},
    }


HEAD, BN = nnx.PathContains("head"), nnx.PathContains("bn")
HEAD_ONLY = {"body": {"w": False, "b": False}, "head": {"w": True}}
WD_MOMENTUM = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))


def _run(tx, params, grads_seq, variant):
    @variant
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def test_frozen_leaves_stay_bitwise_and_trainable_ones_follow_tx(rng, variant):
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(3)]
    out, state = _run(
        flowjax.train_only(WD_MOMENTUM, HEAD_ONLY), params, grads, variant
    )
    # Frozen: weight decay and momentum never touch them.
    chex.assert_trees_all_equal(out["body"], params["body"])
    # Trainable: exactly tx run on the head alone.
    ref, _ = _run(WD_MOMENTUM, params["head"], [g["head"] for g in grads], variant)
    chex.assert_trees_all_equal(out["head"], ref)
    assert np.abs(np.asarray(out["head"]["w"] - params["head"]["w"])).max() > 0.01
    # Optimiser state (the momentum trace) is allocated for the head only.
    assert [x.shape for x in jax.tree.leaves(state)] == [(2, 2)]
    # init can be planned on abstract params, before memory is allocated.
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    planned = jax.eval_shape(flowjax.train_only(WD_MOMENTUM, HEAD_ONLY).init, abstract)
    assert [x.shape for x in jax.tree.leaves(planned)] == [(2, 2)]


def test_all_trainable_is_plain_tx_and_none_trainable_is_identity(rng, variant):
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(3)]
    tx = optax.adamw(0.05, weight_decay=0.1)
    everything = jax.tree.map(lambda _: True, params)
    got, _ = _run(flowjax.train_only(tx, everything), params, grads, variant)
    ref, _ = _run(tx, params, grads, variant)
    chex.assert_trees_all_equal(got, ref)
    nothing = jax.tree.map(lambda _: False, params)
    got, state = _run(flowjax.train_only(tx, nothing), params, grads, variant)
    chex.assert_trees_all_equal(got, params)
    assert all(
        np.ndim(x) == 0 for x in jax.tree.leaves(state)
    )  # only Adam's step count


def test_callable_mask_prefix_mask_and_dtype(rng):
    params = _tree(rng, np.float16)
    grads = [_tree(rng, np.float16) for _ in range(2)]
    by_fn = flowjax.train_only(WD_MOMENTUM, lambda p: {"body": False, "head": True})
    by_prefix = flowjax.train_only(WD_MOMENTUM, {"body": False, "head": True})
    by_leaf = flowjax.train_only(WD_MOMENTUM, HEAD_ONLY)
    outs = [_run(tx, params, grads, jax.jit)[0] for tx in (by_fn, by_prefix, by_leaf)]
    chex.assert_trees_all_equal(outs[0], outs[1], outs[2])
    assert {x.dtype for x in jax.tree.leaves(outs[0])} == {jnp.dtype(jnp.float16)}
    updates, _ = by_leaf.update(grads[0], by_leaf.init(params), params)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float16)}


def test_freeze_rejects_bad_masks(rng):
    params = _tree(rng)
    with pytest.raises(TypeError, match=r"trainable leaves must be bools.*float32"):
        flowjax.train_only(optax.sgd(0.1), params)  # params passed instead of a mask
    with pytest.raises(ValueError, match="does not match the params"):
        flowjax.train_only(optax.sgd(0.1), {"body": True}).init(params)
    with pytest.raises(TypeError, match="GradientTransformation"):
        flowjax.train_only(lambda g: g, HEAD_ONLY)


def test_trainable_mask_selectors_on_nnx_state():
    model = Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)

    def selected(select):
        mask = flowjax.trainable_mask(params, select)
        return {p for p, m in nnx.to_flat_state(mask) if m}

    head = {("head", "kernel"), ("head", "bias")}
    bn = {("bn", "scale"), ("bn", "bias")}
    assert selected(nnx.PathContains("head")) == head
    assert selected([nnx.PathContains("head"), nnx.PathContains("bn")]) == head | bn
    assert selected(nnx.Any(HEAD, BN)) == head | bn
    assert selected(nnx.PathContains("kernel")) == {
        ("head", "kernel"),
        ("body", "kernel"),
    }
    bn_paths = [p for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert selected(lambda p, v: not any(p[: len(b)] == b for b in bn_paths)) == (
        head | {("body", "kernel"), ("body", "bias")}
    )
    with pytest.raises(ValueError, match="matches no leaf"):
        flowjax.trainable_mask(nnx.state(model), nnx.PathContains("fc"))
    with pytest.raises(TypeError, match="module type"):
        flowjax.trainable_mask(params, nnx.BatchNorm)
    with pytest.raises(TypeError, match=r"not an nnx\.Module"):
        flowjax.trainable_mask(model, HEAD)


def _ce(logits, y):
    return -jax.nn.log_softmax(logits)[y]


def _make_step(graphdef, tx):
    """The NNX functional train step: params differentiated, BatchStat carried as aux."""

    @jax.jit
    def step(params, stats, opt_state, x, y, w):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, stats, copy=True)
            model.train()
            losses = jax.vmap(_ce)(model(x), y)  # the batch forward updates BN stats
            return flowjax.weighted_loss(losses, w), nnx.state(model, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def test_linear_probe_updates_bn_stats_but_not_frozen_params():
    """Step V1/V4: head-only training in train mode; BN running stats keep adapting."""
    model = Net(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = flowjax.train_only(WD_MOMENTUM, HEAD)
    step = _make_step(graphdef, tx)
    x, y, w = _x(shift=1.0), jnp.arange(8) % 3, jnp.ones(8)
    new_params, new_stats, _, _ = step(params, stats, tx.init(params), x, y, w)
    # Frozen params (body and BN scale/bias) bitwise unchanged; the head moved.
    for part in ("body", "bn"):
        chex.assert_trees_all_equal(new_params[part], params[part])
    assert (
        np.abs(
            np.asarray(
                new_params["head"]["kernel"][...] - params["head"]["kernel"][...]
            )
        ).max()
        > 0
    )
    # BN running stats: momentum * old + (1 - momentum) * batch statistics (numpy reference).
    h = np.asarray(x, np.float64) @ np.asarray(
        params["body"]["kernel"][...], np.float64
    ) + np.asarray(params["body"]["bias"][...], np.float64)
    mom = model.bn.momentum
    np.testing.assert_allclose(
        new_stats["bn"]["mean"][...], (1 - mom) * h.mean(0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        new_stats["bn"]["var"][...], mom + (1 - mom) * h.var(0), rtol=1e-5
    )


def test_lp_ft_recipe_and_flow_weights_in_one_jitted_step():
    """LP-FT: phase 1 head-only, phase 2 everything from the LP parameters; FLOW weights in both."""
    model = Net(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x, y = _x(n=16, seed=1), jnp.arange(16) % 3
    pre_losses = jax.jit(lambda m: jax.vmap(_ce)(m(x), y))(
        nnx.merge(graphdef, params, stats)
    )
    w = flowjax.LossTable(np.arange(16), pre_losses).flow_weights().weights

    lp_tx = flowjax.train_only(optax.sgd(0.1, momentum=0.9), HEAD)
    step = _make_step(graphdef, lp_tx)
    p, s, o = params, stats, lp_tx.init(params)
    lp_losses = []
    for _ in range(4):
        p, s, o, loss = step(p, s, o, x, y, w)
        lp_losses.append(float(loss))
    assert lp_losses[-1] < lp_losses[0]
    chex.assert_trees_all_equal(p["body"], params["body"])
    lp_params = p

    ft_tx = optax.sgd(0.1, momentum=0.9)  # phase 2: all params, starting at the LP head
    ft_step = _make_step(graphdef, ft_tx)
    p2, _, _, loss2 = ft_step(lp_params, s, ft_tx.init(lp_params), x, y, w)
    assert float(loss2) < lp_losses[0]
    assert (
        np.abs(
            np.asarray(p2["body"]["kernel"][...] - lp_params["body"]["kernel"][...])
        ).max()
        > 0
    )
    # freeze(tx, everything) in the same step is plain fine-tuning, bitwise.
    all_tx = flowjax.train_only(ft_tx, jax.tree.map(lambda _: True, lp_params))
    p3, _, _, loss3 = _make_step(graphdef, all_tx)(
        lp_params, s, all_tx.init(lp_params), x, y, w
    )
    chex.assert_trees_all_equal(p3, p2)
    assert float(loss3) == float(loss2)


def _finetune_parts(pre, *, change_body):
    """A 'fine-tuned' model: new 5-class head, BN params and stats adapted, body optionally changed."""
    ft = Net(nnx.Rngs(7), classes=5)
    nnx.update(ft, nnx.state(pre, nnx.Not(nnx.PathContains("head"))))
    ft.bn.scale[...] = ft.bn.scale[...] * 1.5
    ft.bn.bias[...] = ft.bn.bias[...] + 0.3
    ft.train()
    ft(_x(seed=3, shift=2.0))  # updates the running statistics on "target" data
    ft.eval()
    if change_body:
        ft.body.kernel[...] = ft.body.kernel[...] + 0.5
    return ft


def _pre_model():
    pre = Net(nnx.Rngs(0))
    pre.train()
    pre(_x(seed=4))  # non-trivial pre-trained statistics
    pre.eval()
    return pre


def test_swap_restores_pretrained_outputs_exactly_when_body_unchanged():
    pre = _pre_model()
    ft = _finetune_parts(pre, change_body=False)
    pre_graphdef, pre_state = nnx.split(pre)
    bn = [p for p, m in nnx.iter_modules(pre) if isinstance(m, nnx.BatchNorm)]
    in_bn = lambda path, _: any(path[: len(b)] == b for b in bn)  # noqa: E731
    swapped = flowjax.swap_task_parts(nnx.state(ft), pre_state, [HEAD, in_bn])
    restored = nnx.merge(pre_graphdef, swapped)
    assert restored.head.kernel.shape == (5, 3)  # the pre-trained head shape
    x = _x(seed=5)
    forward = jax.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(forward(restored, x), forward(pre, x))
    # A mask pytree works as well as a selector.
    mask = jax.tree.map(lambda _: False, pre_state)
    for part in ("head", "bn"):
        mask[part] = True
    again = nnx.merge(
        pre_graphdef, flowjax.swap_task_parts(nnx.state(ft), pre_state, mask)
    )
    np.testing.assert_array_equal(forward(again, x), forward(pre, x))
    # Forgetting the BN running statistics (or all of BN) is detected: outputs differ.
    for wrong in (HEAD, nnx.Any(HEAD, nnx.All(BN, nnx.Param))):
        bad = nnx.merge(
            pre_graphdef, flowjax.swap_task_parts(nnx.state(ft), pre_state, wrong)
        )
        assert np.abs(np.asarray(forward(bad, x) - forward(pre, x))).max() > 1e-3
    # The result aliases neither input.
    restored.body.kernel[...] = restored.body.kernel[...] + 1.0
    np.testing.assert_array_equal(
        forward(pre, x), forward(nnx.merge(pre_graphdef, pre_state), x)
    )
    assert not np.array_equal(ft.body.kernel[...], restored.body.kernel[...])


def test_swap_keeps_the_finetuned_body():
    pre = _pre_model()
    ft = _finetune_parts(pre, change_body=True)
    pre_graphdef, pre_state = nnx.split(pre)
    swapped = nnx.merge(
        pre_graphdef, flowjax.swap_task_parts(nnx.state(ft), pre_state, [HEAD, BN])
    )
    expected = nnx.clone(pre)
    expected.body.kernel[...] = ft.body.kernel[...]
    x = _x(seed=6)
    forward = jax.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(forward(swapped, x), forward(expected, x))
    assert np.abs(np.asarray(forward(swapped, x) - forward(pre, x))).max() > 1e-3


def test_swap_rejects_mismatched_shared_parts():
    pre = _pre_model()
    pre_state = nnx.state(pre)
    wider = nnx.state(Net(nnx.Rngs(1), width=6))
    with pytest.raises(
        ValueError, match=r"\('body', 'bias'\) is not task-specific but differs"
    ):
        flowjax.swap_task_parts(wider, pre_state, [HEAD, BN])
    ft = _finetune_parts(pre, change_body=False)
    with pytest.raises(ValueError, match="missing from the fine-tuned state"):
        flowjax.swap_task_parts(
            nnx.state(ft, nnx.Not(nnx.PathContains("body"))), pre_state, [HEAD, BN]
        )
    lora_ft = flowjax.add_lora(ft, 2, rngs=nnx.Rngs(2), select=nnx.PathContains("body"))
    with pytest.raises(ValueError, match="merge_lora"):
        flowjax.swap_task_parts(nnx.state(lora_ft), pre_state, [HEAD, BN])
    with pytest.raises(ValueError, match="selects no leaf"):
        flowjax.swap_task_parts(nnx.state(ft), pre_state, nnx.PathContains("fc"))
    with pytest.raises(TypeError, match=r"not an nnx\.Module"):
        flowjax.swap_task_parts(ft, pre_state, HEAD)
    # After merging the adapters the swap works.
    merged = flowjax.merge_lora(lora_ft)
    out = flowjax.swap_task_parts(nnx.state(merged), pre_state, [HEAD, BN])
    np.testing.assert_array_equal(out["body"]["kernel"][...], merged.body.kernel[...])


# ----------------------------------------------------------------------------- one mask helper


def _state_net():
    class TwoPart(nnx.Module):
        def __init__(self, rngs):
            self.body = nnx.Linear(2, 3, rngs=rngs)
            self.head = nnx.Linear(3, 2, rngs=rngs)

    return nnx.state(TwoPart(nnx.Rngs(0)), nnx.Param)


@pytest.mark.parametrize(
    "head", [True, np.bool_(True), jnp.array(True), np.array(True)], ids=repr
)
def test_freeze_accepts_numpy_and_zero_d_bool_array_leaves(head, rng):
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(2)]
    want = _run(flowjax.train_only(WD_MOMENTUM, HEAD_ONLY), params, grads, jax.jit)[0]
    mask = {"body": jnp.array(False), "head": head}
    got = _run(flowjax.train_only(WD_MOMENTUM, mask), params, grads, jax.jit)[0]
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(got["body"], params["body"])
    assert not np.array_equal(got["head"]["w"], params["head"]["w"])


@pytest.mark.parametrize("bad", [1, 1.0, jnp.ones(2, bool), "yes", None], ids=repr)
def test_bad_mask_leaves_are_the_same_type_error_everywhere(bad, rng):
    params = _tree(rng)
    mask = {"body": bad, "head": True}
    match = r"leaves must be bools \(Python, numpy or 0-d bool arrays\)"
    with pytest.raises(TypeError, match=match):
        flowjax.train_only(optax.sgd(0.1), mask).init(params)
    with pytest.raises(TypeError, match=match):
        flowjax.l2sp(0.1, mask=mask).init(params)
    with pytest.raises(TypeError, match=match):
        flowjax.wise_ft(params, params, 0.5, mask=mask)
    with pytest.raises(TypeError, match=match):
        flowjax.swap_task_parts(params, params, mask)


def test_plain_dict_prefix_masks_on_an_nnx_state():
    params = _state_net()
    moved = jax.tree.map(lambda x: x + 1.0, params)
    prefix = {"body": False, "head": True}
    tx = flowjax.train_only(optax.sgd(1.0), prefix)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["body"]["kernel"][...], 0.0)
    np.testing.assert_array_equal(updates["head"]["kernel"][...], -1.0)
    # swap_task_parts: True = taken from the pre-trained state.
    out = flowjax.swap_task_parts(moved, params, prefix)
    chex.assert_trees_all_equal(out["head"], params["head"])
    chex.assert_trees_all_equal(out["body"], moved["body"])
    # wise_ft: True = averaged.
    avg = flowjax.wise_ft(params, moved, 0.5, mask=prefix)
    chex.assert_trees_all_equal(avg["body"], moved["body"])
    np.testing.assert_allclose(
        avg["head"]["kernel"][...], params["head"]["kernel"][...] + 0.5, rtol=1e-6
    )
    # A key the state lacks: a clear error naming it and pointing to trainable_mask.
    bad = {"body": False, "tail": True}
    for call in (
        lambda: flowjax.train_only(optax.sgd(1.0), bad).init(params),
        lambda: flowjax.wise_ft(params, moved, 0.5, mask=bad),
        lambda: flowjax.swap_task_parts(moved, params, bad),
    ):
        with pytest.raises(ValueError, match=r"'tail'.*flowjax\.trainable_mask"):
            call()


# ----------------------------------------------------------------------------- optax polarity, NNX filters


def test_train_only_has_optax_polarity_and_freeze_is_gone(rng):
    """train_only(tx, trainable) is optax.selective_transform with the mask negated."""
    assert not hasattr(flowjax, "freeze")
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(3)]
    trainable = {"body": False, "head": True}
    got, _ = _run(flowjax.train_only(WD_MOMENTUM, trainable), params, grads, jax.jit)
    frozen = jax.tree.map(lambda t: not t, trainable)  # optax: True = frozen
    want, _ = _run(
        optax.selective_transform(WD_MOMENTUM, freeze_mask=frozen),
        params,
        grads,
        jax.jit,
    )
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(got["body"], params["body"])
    assert not np.array_equal(got["head"]["w"], params["head"]["w"])
    with pytest.raises(TypeError, match="trainable=None is ambiguous"):
        flowjax.train_only(WD_MOMENTUM, None)
    # optax.freeze(mask) with the same mask would do the opposite: body moves.
    opposite, _ = _run(
        optax.chain(WD_MOMENTUM, optax.freeze(trainable)), params, grads, jax.jit
    )
    chex.assert_trees_all_equal(opposite["head"], params["head"])
    assert not np.array_equal(opposite["body"]["w"], params["body"]["w"])


class _LoRANet(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List(
            [nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)]
        )
        self.head = nnx.LoRALinear(4, 2, lora_rank=2, rngs=rngs)


def _moved(before, after) -> set:
    return {
        path
        for (path, a), (_, b) in zip(
            nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True
        )
        if not np.array_equal(a[...], b[...])
    }


@pytest.mark.parametrize(
    "trainable",
    [
        nnx.LoRAParam,
        nnx.PathContains("head"),
        nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.PathContains("head")),
        nnx.Not(nnx.PathContains("layers")),
        nnx.All(nnx.PathContains("layers"), nnx.PathContains(0)),
        [nnx.PathContains("kernel"), nnx.LoRAParam],
        ...,
    ],
    ids=repr,
)
def test_train_only_takes_nnx_filters_unchanged_and_trains_what_nnx_state_selects(
    trainable,
):
    model = _LoRANet(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = flowjax.train_only(optax.sgd(0.1), trainable)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    after = optax.apply_updates(params, updates)
    # Exactly the leaves NNX itself selects with the same filter move.
    want = {p for p, _ in nnx.to_flat_state(nnx.state(model, trainable))}
    assert want and _moved(params, after) == want
    mask = flowjax.trainable_mask(params, trainable)
    assert {p for p, m in nnx.to_flat_state(mask) if m} == want


def test_type_filters_need_variables_and_path_filters_work_on_plain_dicts(rng):
    params = _tree(rng)
    grads = [_tree(rng)]
    by_path, _ = _run(
        flowjax.train_only(optax.sgd(0.1), nnx.PathContains("head")),
        params,
        grads,
        jax.jit,
    )
    want, _ = _run(
        flowjax.train_only(optax.sgd(0.1), HEAD_ONLY), params, grads, jax.jit
    )
    chex.assert_trees_all_equal(by_path, want)
    for type_filter in (
        nnx.Param,
        nnx.All(nnx.Param, nnx.PathContains("head")),
        "head",
    ):
        with pytest.raises(TypeError, match=r"no nnx\.Variable leaves.*nnx\.State"):
            flowjax.train_only(optax.sgd(0.1), type_filter).init(params)
        with pytest.raises(TypeError, match=r"no nnx\.Variable leaves"):
            flowjax.trainable_mask(params, type_filter)


def test_path_prefix_tuples_are_not_a_second_dialect():
    """NNX reads a tuple as 'any of these filters': ("layers", 0) and [("layers", 0)] are
    one TypeError (main accepted the list form as a path prefix and rejected the tuple)."""
    params = nnx.state(_LoRANet(nnx.Rngs(0)), nnx.Param)
    for select in (("layers", 0), [("layers", 0)]):
        with pytest.raises(TypeError, match=r"not a path prefix.*path\[:2\] =="):
            flowjax.trainable_mask(params, select)
        with pytest.raises(TypeError, match="not a path prefix"):
            flowjax.train_only(optax.sgd(0.1), select)
    # A string is an NNX tag, not a path key: it matches nothing here, and says so.
    with pytest.raises(ValueError, match=r"NNX tag.*nnx\.PathContains\('head'\)"):
        flowjax.trainable_mask(params, "head")
    prefix = lambda path, _: path[:2] == ("layers", 0)  # noqa: E731
    assert {
        p for p, m in nnx.to_flat_state(flowjax.trainable_mask(params, prefix)) if m
    } == {("layers", 0, "kernel"), ("layers", 0, "bias")}
