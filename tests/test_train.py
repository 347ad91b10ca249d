"""The train step equals a hand-written optax step; fit logs, evaluates and checkpoints."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax

from . import _data, _methods


def _batches(n_steps: int, batch_size: int = 16, seed: int = 0):
    data = _data.dataset()
    rng = np.random.default_rng(seed)
    data["weight"] = rng.uniform(0.1, 1.0, size=len(data["id"])).astype(np.float32)
    out = []
    for _ in range(n_steps):
        j = rng.choice(len(data["id"]), batch_size, replace=False)
        out.append({key: v[j] for key, v in data.items()})
    return out


def _reference_step(params, opt_state, batch, tx):
    """Hand-written: weighted mean of the per-example losses, optax update."""

    def loss(p):
        losses = jax.vmap(_data.loss_fn, in_axes=(None, 0))(
            p, {"x": batch["x"], "y": batch["y"]}
        )
        return jnp.sum(batch["weight"] * losses) / len(losses)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value, grads


@pytest.mark.parametrize("method", ["adam", "l2sp+sgd"])
def test_step_equals_a_hand_written_optax_step(method):
    params = _data.params()
    theta0 = jax.tree.map(jnp.copy, params)
    if method == "adam":
        tx = optax.adam(1e-2)
    else:
        tx = optax.chain(flowjax.l2sp(0.5), optax.sgd(0.1, momentum=0.9))
    objective = flowjax.weighted_objective(_data.loss_fn, return_metrics=True)
    step = flowjax.make_train_step(objective, tx, anchor=theta0)
    state = flowjax.init_train_state(params, tx, rng=3)
    ref_params, ref_opt = params, tx.init(params)
    for k, batch in enumerate(_batches(4)):
        state, metrics = step(state, batch)
        ref_params, ref_opt, ref_loss, ref_grads = _reference_step(
            ref_params, ref_opt, batch, tx
        )
        np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
        # numpy references for the metrics
        g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref_grads)])
        np.testing.assert_allclose(
            metrics["grad_norm"], np.sqrt(np.sum(g.astype(np.float64) ** 2)), rtol=1e-5
        )
        d = np.concatenate(
            [
                np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                for a, b in zip(
                    jax.tree.leaves(ref_params), jax.tree.leaves(theta0), strict=True
                )
            ]
        )
        np.testing.assert_allclose(
            metrics["param_distance"], np.linalg.norm(d), rtol=1e-5
        )
        np.testing.assert_allclose(
            metrics["weight_mean"], batch["weight"].mean(), rtol=1e-6
        )
        assert int(state.step) == k + 1
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        state.params,
        ref_params,
    )
    assert float(metrics["param_distance"]) > 0
    assert {"loss_unweighted"} <= set(metrics)
    np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(3))


def test_donation_leaves_the_callers_params_and_anchor_alive():
    params = _data.params()
    tx = optax.sgd(0.1)
    step = flowjax.make_train_step(
        flowjax.weighted_objective(_data.loss_fn),
        tx,
        anchor=params,
        return_metrics=False,
    )
    state = flowjax.init_train_state(params, tx)
    for batch in _batches(2):
        state, metrics = step(state, batch)
    # params doubles as the anchor; the state's copies were donated, not these
    assert float(jnp.sum(params["w1"])) == float(jnp.sum(_data.params()["w1"]))
    assert float(metrics["weight_mean"]) == pytest.approx(
        float(_batches(2)[1]["weight"].mean())
    )


class _BNNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(_data.DIM, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.lin(x))))[:, 0]


def test_batchnorm_model_through_the_batched_objective_updates_running_stats():
    model = _BNNet(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def batch_loss(params, batch, stats):
        m = nnx.merge(graphdef, params, stats, copy=True)
        losses = (m(batch["x"]) - batch["y"]) ** 2
        return losses, nnx.state(m, nnx.BatchStat)

    objective = flowjax.weighted_objective(
        batch_loss, batched=True, has_aux=True, return_metrics=True
    )
    tx = optax.sgd(0.05)
    step = flowjax.make_train_step(objective, tx, anchor=params, has_aux=True)
    state = flowjax.init_train_state(params, tx, model_state=stats)
    batch = _batches(1)[0]
    new, metrics = step(state, batch)
    # The running mean moved toward the batch mean of the BN input (momentum 0.5).
    kernel, bias = (np.asarray(params["lin"][k][...]) for k in ("kernel", "bias"))
    pre = batch["x"] @ kernel + bias
    np.testing.assert_allclose(
        new.model_state["bn"]["mean"][...], 0.5 * pre.mean(0), rtol=1e-5, atol=1e-6
    )
    # The loss is the hand-computed weighted mean in train mode (batch statistics).
    m = nnx.merge(graphdef, params, stats, copy=True)
    ref = np.mean(batch["weight"] * (np.asarray(m(batch["x"])) - batch["y"]) ** 2)
    np.testing.assert_allclose(metrics["loss"], ref, rtol=1e-5)
    assert not np.allclose(
        new.params["head"]["kernel"][...], params["head"]["kernel"][...]
    )


def test_lora_trains_only_the_adapters_and_rng_passed_per_step():
    base = _MLP(nnx.Rngs(0))
    model = flowjax.add_lora(base, 2, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    seen = []

    def loss(p, ex, key):
        seen.append(key)
        return (nnx.merge(graphdef, p)(ex["x"]) - ex["y"]) ** 2

    tx = flowjax.train_only(optax.adam(1e-2), nnx.LoRAParam)
    step = flowjax.make_train_step(
        flowjax.weighted_objective(loss),
        tx,
        anchor=params,
        return_metrics=False,
        pass_rng=True,
    )
    state = flowjax.init_train_state(params, tx, rng=jax.random.key(5))
    for batch in _batches(3):
        state, metrics = step(state, batch)
    new = state.params
    np.testing.assert_array_equal(new["up"]["kernel"][...], params["up"]["kernel"][...])
    assert not np.allclose(new["up"]["lora"]["lora_b"][...], 0)
    assert float(metrics["param_distance"]) > 0
    assert len(seen) == 1  # traced once


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(_data.DIM, 8, rngs=rngs)
        self.down = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.tanh(self.up(x)))[..., 0]


def test_bad_inputs_are_clear_errors():
    params = _data.params()
    tx = optax.sgd(0.1)
    objective = flowjax.weighted_objective(_data.loss_fn)
    with pytest.raises(TypeError, match="GradientTransformation"):
        flowjax.make_train_step(objective, "sgd", anchor=params)
    with pytest.raises(ValueError, match="'data' axis"):
        flowjax.make_train_step(
            objective,
            tx,
            anchor=params,
            mesh=jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",)),
        )
    step = flowjax.make_train_step(objective, tx, anchor=params)  # return_metrics=True
    state = flowjax.init_train_state(params, tx)
    with pytest.raises(ValueError, match=r"\(loss, metrics\)"):
        step(state, _batches(1)[0])
    with pytest.raises(ValueError, match="TrainState"):
        step((state.params,), _batches(1)[0])
    other = flowjax.make_train_step(objective, tx, anchor={"w": jnp.ones(1)})
    with pytest.raises(ValueError, match="different structures"):
        other(state, _batches(1)[0])
    with pytest.raises(ValueError, match="floating-point"):
        flowjax.init_train_state({"n": jnp.zeros(2, jnp.int32)}, tx)
    with pytest.raises(ValueError, match="rng"):
        flowjax.init_train_state(params, tx, rng="seed")
    with pytest.raises(ValueError, match="mesh"):
        flowjax.init_train_state(params, tx, param_shardings={})
    good = flowjax.make_train_step(objective, tx, anchor=params, return_metrics=False)
    with pytest.raises(ValueError, match="num_steps"):
        flowjax.fit(good, state, _batches(2), num_steps=0)
    with pytest.raises(ValueError, match="eval_fn"):
        flowjax.fit(good, state, _batches(2), num_steps=2, eval_every=1)
    with pytest.raises(ValueError, match="one-shot iterator"):
        flowjax.fit(
            good, state, iter(_batches(2)), num_steps=2, checkpoint_dir="/tmp/x"
        )


def _setup(tx=None):
    params = _data.params()
    tx = tx or optax.adam(1e-2)
    objective = flowjax.weighted_objective(_data.loss_fn, return_metrics=True)
    step = flowjax.make_train_step(objective, tx, anchor=params)
    return step, flowjax.init_train_state(params, tx, rng=0)


def test_fit_logs_json_lines_evaluates_and_matches_the_hand_loop(tmp_path):
    batches = _batches(7)
    step, state = _setup()
    calls = []

    def eval_fn(s):
        calls.append(int(s.step))
        return {"eval/w2_sum": jnp.sum(s.params["w2"])}

    path = tmp_path / "m.jsonl"
    result = flowjax.fit(
        step,
        state,
        batches,
        num_steps=7,
        eval_fn=eval_fn,
        eval_every=3,
        log_every=2,
        metrics_path=path,
        progress=False,
    )
    assert calls == [3, 6, 7]
    steps = [r["step"] for r in result.history]
    assert steps == [2, 3, 4, 6, 7]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == result.history
    assert "eval/w2_sum" in lines[1] and "eval/w2_sum" not in lines[0]
    # the same as stepping by hand
    step2, s = _setup()
    hand = []
    for b in batches:
        s, m = step2(s, b)
        hand.append(float(m["loss"]))
    assert [r["loss"] for r in result.history] == [hand[t - 1] for t in steps]
    np.testing.assert_array_equal(result.state.params["w1"], s.params["w1"])
    assert result.resumed_from is None
    assert lines[-1]["eval/w2_sum"] == float(jnp.sum(s.params["w2"]))


def test_fit_stops_when_data_runs_out_and_eval_name_clash_is_an_error(tmp_path):
    step, state = _setup()
    result = flowjax.fit(step, state, _batches(3), num_steps=10, progress=False)
    assert int(result.state.step) == 3 and result.history[-1]["step"] == 3
    step, state = _setup()
    with pytest.raises(ValueError, match="loss"):
        flowjax.fit(
            step,
            state,
            _batches(3),
            num_steps=2,
            eval_fn=lambda s: {"loss": 0.0},
            progress=False,
        )


def test_fit_resumes_in_process_from_a_checkpoint(tmp_path, capsys):
    batches = _batches(6)
    ck, path = tmp_path / "ck", tmp_path / "m.jsonl"
    step, state = _setup()
    ref = flowjax.fit(step, state, batches, num_steps=6, progress=False)
    step, state = _setup()
    # A run stopped after 4 steps (data ran out), checkpointing every 2.
    flowjax.fit(
        step,
        state,
        batches[:4],
        num_steps=6,
        checkpoint_dir=ck,
        checkpoint_every=2,
        metrics_path=path,
        progress=False,
    )
    with open(path, "a") as f:  # a line written after the last checkpoint
        f.write('{"step": 99}\n')
    step, state = _setup()
    out = flowjax.fit(
        step,
        state,
        lambda start: batches[start:],
        num_steps=6,
        checkpoint_dir=ck,
        checkpoint_every=2,
        metrics_path=path,
        progress=False,
    )
    assert out.resumed_from == 4
    assert "resumed from step 4" in capsys.readouterr().out
    assert out.history == ref.history
    assert [json.loads(x) for x in path.read_text().splitlines()] == ref.history
    for a, b in zip(
        jax.tree.leaves(out.state), jax.tree.leaves(ref.state), strict=True
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # a finished run resumes to its end without a step
    step, state = _setup()
    again = flowjax.fit(
        step, state, batches, num_steps=6, checkpoint_dir=ck, progress=False
    )
    assert again.resumed_from == 6 and again.history == ref.history
    # another state structure cannot restore it
    step, state = _setup(optax.sgd(0.1))
    with pytest.raises(ValueError, match="another structure"):
        flowjax.fit(
            step, state, batches, num_steps=6, checkpoint_dir=ck, progress=False
        )


def _drift_run():
    """w starts at 0 and moves to 5: w_t = 5 (1 - 0.9^t) with SGD(0.05) on (w - 5)²."""
    params = {"w": jnp.array(0.0)}
    tx = optax.sgd(0.05)
    objective = flowjax.weighted_objective(
        lambda p, ex: (p["w"] - ex["y"]) ** 2, return_metrics=True
    )
    step = flowjax.make_train_step(objective, tx, anchor=params)
    state = flowjax.init_train_state(params, tx)
    batch = {"y": np.full(4, 5.0, np.float32), "weight": np.ones(4, np.float32)}
    return step, state, [batch] * 20


def _monitor(state0, budget=0.8):
    return flowjax.RetentionMonitor(
        {"acc": lambda s: 1.0 - jnp.abs(s.params["w"]) / 10},  # pre-trained acc 1.0
        pretrained=state0,
        budget=budget,
        target=lambda s: {"target/neg_mse": -((s.params["w"] - 5.0) ** 2)},
        target_key="target/neg_mse",
    )


def _first_step_out_of_budget(budget, eval_every):
    """numpy: the first evaluated step with retention 1 - w_t/10 < budget."""
    t = eval_every
    while 1 - 5 * (1 - 0.9**t) / 10 >= budget:
        t += eval_every
    return t


@pytest.mark.parametrize("eval_every", [1, 3])
def test_retention_monitor_stops_at_the_first_step_out_of_budget(eval_every):
    step, state, batches = _drift_run()
    monitor = _monitor(state)
    assert monitor.baseline == {"acc": 1.0}
    result = flowjax.fit(
        step,
        state,
        batches,
        num_steps=20,
        eval_fn=monitor,
        eval_every=eval_every,
        stop_fn=monitor.should_stop,
        best_fn=monitor.best_score,
        progress=False,
    )
    expected = _first_step_out_of_budget(0.8, eval_every)
    assert expected == (5 if eval_every == 1 else 6)
    assert result.stopped_at == expected == int(result.state.step)
    last = result.history[-1]
    assert last["step"] == expected and last["retention/acc"] < 0.8
    w = float(result.state.params["w"])
    assert last["probe/acc"] == pytest.approx(1 - w / 10)
    assert last["target/neg_mse"] == pytest.approx(-((w - 5) ** 2), rel=1e-6)
    # best: the last evaluation within budget (the target improves every step)
    assert result.best_step == expected - eval_every
    np.testing.assert_allclose(
        float(result.best.params["w"]), 5 * (1 - 0.9**result.best_step), rtol=1e-5
    )
    evaluated = [r for r in result.history if "retention/acc" in r]
    assert [r["step"] for r in evaluated] == list(
        range(eval_every, expected + 1, eval_every)
    )
    assert all(r["retention/acc"] >= 0.8 for r in evaluated[:-1])


def test_a_stopped_run_resumes_as_stopped_with_its_best(tmp_path, capsys):
    step, state, batches = _drift_run()
    monitor = _monitor(state)
    kwargs = dict(
        num_steps=20,
        eval_fn=monitor,
        eval_every=1,
        stop_fn=monitor.should_stop,
        best_fn=monitor.best_score,
        checkpoint_dir=tmp_path / "ck",
        checkpoint_every=2,
        progress=False,
    )
    first = flowjax.fit(step, state, batches, **kwargs)
    step, state, batches = _drift_run()
    again = flowjax.fit(step, state, batches, **kwargs)
    assert "resumed from step 5" in capsys.readouterr().out
    assert (again.stopped_at, again.best_step, again.resumed_from) == (5, 4, 5)
    assert again.history == first.history
    assert float(again.best.params["w"]) == float(first.best.params["w"])
    assert int(again.state.step) == 5


def test_retention_monitor_lower_is_better_and_bad_inputs():
    step, state, _ = _drift_run()
    ppl = lambda s: 2.0 + jnp.abs(s.params["w"])  # noqa: E731
    monitor = flowjax.RetentionMonitor(
        {"ppl": ppl}, baseline={"ppl": 2.0}, higher_is_better=False, budget=0.9
    )
    out = monitor(state._replace(params={"w": jnp.array(0.5)}))
    assert out["retention/ppl"] == pytest.approx(2.0 / 2.5)
    assert monitor.should_stop({"retention/ppl": 0.8})
    assert monitor.best_score({"retention/ppl": 0.95}) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="exactly one"):
        flowjax.RetentionMonitor({"ppl": ppl})
    with pytest.raises(ValueError, match="budget"):
        flowjax.RetentionMonitor({"ppl": ppl}, baseline={"ppl": 2.0}, budget=1.5)
    with pytest.raises(ValueError, match="no score"):
        flowjax.RetentionMonitor({"ppl": ppl}, baseline={"acc": 2.0})
    with pytest.raises(ValueError, match="non-zero"):
        flowjax.RetentionMonitor({"ppl": ppl}, baseline={"ppl": 0.0})
    with pytest.raises(ValueError, match="eval_fn"):
        flowjax.fit(step, state, [], num_steps=1, stop_fn=monitor.should_stop)


@pytest.mark.parametrize("epochs", [None, 3])
def test_batches_from_batch_is_the_tail_of_a_full_iteration(epochs):
    data = _data.dataset()
    noise = lambda ex, rng: {**ex, "x": ex["x"] + rng.normal(size=ex["x"].shape)}  # noqa: E731
    stream = flowjax.batches(
        data, 16, shuffle=True, seed=2, epochs=epochs, map_fn=noise, shard=(0, 1)
    )
    per = stream.steps_per_epoch  # 13, the last batch of each epoch ragged
    full = list(itertools.islice(iter(stream), 3 * per))
    for start in (0, 5, per - 1, per, 2 * per + 3):
        tail = list(itertools.islice(stream.from_batch(start), 3 * per - start))
        assert len(tail) == 3 * per - start
        for a, b in zip(tail, full[start:], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    if epochs is not None:
        assert list(stream.from_batch(3 * per)) == []
    with pytest.raises(ValueError, match="start"):
        stream.from_batch(-1)


def test_fit_resumes_a_flowjax_batches_stream_without_reading_the_skipped_batches(
    tmp_path, monkeypatch
):
    data = _data.dataset()
    data["weight"] = np.ones(len(data["id"]), np.float32)
    stream = flowjax.batches(data, 16, shuffle=True, epochs=None, shard=(0, 1))
    step, state = _setup()
    ref = flowjax.fit(step, state, stream, num_steps=8, progress=False)
    step, state = _setup()
    flowjax.fit(
        step,
        state,
        list(itertools.islice(stream, 5)),
        num_steps=8,
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        progress=False,
    )
    starts = []
    original = type(stream).from_batch

    def spy(self, start):
        starts.append(start)
        return original(self, start)

    monkeypatch.setattr(type(stream), "from_batch", spy)
    step, state = _setup()
    out = flowjax.fit(
        step, state, stream, num_steps=8, checkpoint_dir=tmp_path, progress=False
    )
    assert starts == [5] and out.resumed_from == 5
    assert out.history == ref.history
    np.testing.assert_array_equal(out.state.params["w1"], ref.state.params["w1"])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_low_lr_recipe_warms_up_then_decays_or_holds(schedule):
    tx, total = flowjax.low_lr_recipe(
        10, epochs=2, learning_rate=1e-3, warmup_fraction=0.25, schedule=schedule
    )
    assert total == 20
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    rates = []
    for _ in range(total):  # constant gradients: Adam's step is the learning rate
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        rates.append(-float(updates["w"]))
    t = np.arange(total)
    warm = t / 5 * 1e-3
    if schedule == "cosine":
        after = 0.5 * (1 + np.cos(np.pi * (t - 5) / 15)) * 1e-3
    else:
        after = np.full(total, 1e-3)
    np.testing.assert_allclose(
        rates, np.where(t < 5, warm, after), rtol=1e-5, atol=1e-12
    )
    with pytest.raises(ValueError, match="epochs"):
        flowjax.low_lr_recipe(10, epochs=0)
    with pytest.raises(ValueError, match="schedule"):
        flowjax.low_lr_recipe(10, schedule="linear")
    with pytest.raises(ValueError, match="warmup_fraction"):
        flowjax.low_lr_recipe(10, warmup_fraction=1.0)


@pytest.mark.parametrize("name", [m.name for m in _methods.METHODS])
def test_every_method_of_the_battery_trains_through_make_train_step(name):
    """The battery's own jitted step (tests/_methods.py) and the library's agree."""
    method = _methods.BY_NAME[name]
    ref, _, ref_losses = _methods.train(method, method.strength, steps=3)
    objective, tx, frozen, start = method.build(method.strength, _methods.params())
    step = flowjax.make_train_step(
        lambda p, b, *fr: objective(p, fr[0] if fr else None, b),
        tx,
        anchor=start,
        frozen=frozen,
        return_metrics=False,
    )
    state = flowjax.init_train_state(start, tx)
    b = _methods.batch()
    b = b if method.data is None else method.data(method.strength, b)
    losses = []
    for _ in range(3):
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    got, want = _methods.leaves(state.params), _methods.leaves(ref)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_run_info_must_match_on_resume_and_progress_bar_shows_loss(tmp_path, capsys):
    batches = _batches(4)
    step, state = _setup()
    info = {"weights_sha256": "abc", "lr": 0.01}
    flowjax.fit(
        step,
        state,
        batches[:2],
        num_steps=4,
        checkpoint_dir=tmp_path,
        run_info=info,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "ex_per_s" in err and "loss" in err and "2/4" in err
    step, state = _setup()
    with pytest.raises(ValueError, match="run_info"):
        flowjax.fit(
            step,
            state,
            batches,
            num_steps=4,
            checkpoint_dir=tmp_path,
            run_info={**info, "lr": 0.02},
            progress=False,
        )
    step, state = _setup()
    out = flowjax.fit(
        step,
        state,
        batches,
        num_steps=4,
        checkpoint_dir=tmp_path,
        run_info=info,
        progress=False,
    )
    assert out.resumed_from == 2 and int(out.state.step) == 4
    with pytest.raises(ValueError, match="JSON"):
        flowjax.fit(step, state, batches, num_steps=4, run_info={"f": object()})


def test_data_that_runs_out_before_num_steps_still_gets_the_final_record_and_evaluation():
    loss = lambda p, ex: (p["w"] * ex["x"] - ex["y"]) ** 2  # noqa: E731
    objective = flowjax.weighted_objective(loss, return_metrics=True)
    params, tx = {"w": jnp.array(0.0)}, optax.sgd(0.05)
    data = {"x": np.linspace(-1, 1, 20, dtype=np.float32)}
    data["y"], data["weight"] = 3 * data["x"], np.ones(20, np.float32)
    calls = []

    def evaluate(state):
        calls.append(int(state.step))
        return {"eval/w": float(state.params["w"])}

    result = flowjax.fit(
        flowjax.make_train_step(objective, tx, anchor=params),
        flowjax.init_train_state(params, tx),
        flowjax.batches(data, 4, epochs=1, shard=(0, 1)),  # 5 batches
        num_steps=10,
        log_every=3,
        eval_fn=evaluate,
        progress=False,
    )
    assert int(result.state.step) == 5
    assert [r["step"] for r in result.history] == [3, 5]
    assert calls == [5] and result.history[-1]["eval/w"] == float(
        result.state.params["w"]
    )


class _Traces:
    """Counts jaxpr traces (jax.monitoring events) while active."""

    def __init__(self):
        self.count, self.on = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.on and event == "/jax/core/compile/jaxpr_trace_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.on = 0, True
        return self

    def __exit__(self, *exc):
        self.on = False


_TRACES = _Traces()


def test_steps_that_compute_the_same_thing_share_one_program_and_others_do_not():
    """A rebuilt step (new anchor, new LR in inject_hyperparams) reuses the program; a changed closure never does."""
    params = _data.params()
    batch = _batches(1)[0]

    def build(lr, scale, anchor_shift=0.0):
        def loss(
            p, ex
        ):  # a fresh closure each time, computing the same thing if scale is
            return scale * _data.loss_fn(p, ex)

        objective = flowjax.weighted_objective(loss, return_metrics=True)
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
        anchor = jax.tree.map(lambda p: p + anchor_shift, params)
        return flowjax.make_train_step(objective, tx, anchor=anchor), tx

    def states(*builds):  # tx.init traces on its own: outside the counted part
        return [(step, flowjax.init_train_state(params, tx)) for step, tx in builds]

    (s1, i1), (s2, i2), (s3, i3) = states(
        build(0.1, 1.0), build(0.3, 1.0, anchor_shift=0.5), build(0.1, 2.0)
    )
    first = s1(i1, batch)
    with _TRACES as t:
        second = s2(i2, batch)
    assert t.count == 0  # same computation: no trace (so no compile)
    with _TRACES as t:
        third = s3(i3, batch)
    assert t.count >= 1  # the closure's constant changed: a new program

    # And each computed what its own arguments say (nothing stale served).
    ref_params, _, ref_loss, _ = _reference_step(
        params, optax.sgd(0.3).init(params), batch, optax.sgd(0.3)
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        second[0].params,
        ref_params,
    )
    distance = optax.tree.norm(
        jax.tree.map(lambda p, a: p - (a + 0.5), second[0].params, params)
    )
    np.testing.assert_allclose(second[1]["param_distance"], distance, rtol=1e-5)
    np.testing.assert_allclose(third[1]["loss"], 2 * first[1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(first[1]["loss"], ref_loss, rtol=1e-6)


_FROZEN_SHARDING_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, optax, flowjax
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = flowjax.default_mesh()
cols = NamedSharding(mesh, P(None, "data"))
base = jax.device_put(jnp.arange(32.0).reshape(4, 8), cols)  # a sharded frozen base
bias = np.ones(8, np.float32)                                  # a host frozen input
seen = {}
def objective(params, batch, frozen):
    base, bias = frozen
    jax.debug.inspect_array_sharding(base, callback=lambda s: seen.update(base=s))
    jax.debug.inspect_array_sharding(bias, callback=lambda s: seen.update(bias=s))
    out = batch["x"] @ (base * params["s"]) + bias
    return jnp.mean(out ** 2)
params = {"s": jnp.ones(())}
tx = optax.sgd(1e-3)
step = flowjax.make_train_step(objective, tx, anchor=params, frozen=(base, bias),
                               return_metrics=False, mesh=mesh)
state = flowjax.init_train_state(params, tx, mesh=mesh)
state, m = step(state, {"x": np.ones((8, 4), np.float32)})
want = np.mean((np.ones((8, 4)) @ np.arange(32.0).reshape(4, 8) + 1) ** 2)
assert abs(float(m["loss"]) - want) < 1e-3 * want, (float(m["loss"]), want)
print("base", seen["base"].spec, "bias", seen["bias"].spec)
"""


@pytest.mark.slow
def test_a_frozen_base_spread_over_the_mesh_keeps_its_sharding_other_inputs_are_replicated():
    """LoRA on a tensor-parallel base: the step must not gather the frozen base onto every device."""
    import subprocess
    import sys

    env = {
        **__import__("os").environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", _FROZEN_SHARDING_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "base P(None, 'data') bias P()" in out.stdout, out.stdout
