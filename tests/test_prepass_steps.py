"""The pre-pass's throughput paths: batched losses, steps merged from batches, the throttled bar."""

from __future__ import annotations

import itertools

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flowjax
from flowjax import _engine
from tests import _data


def _table(batches, fn=_data.loss_fn, **kw):
    return flowjax.per_example_losses(fn, _data.params(), batches, progress=False, **kw)


batch_loss = _data.batch_loss


def _mixed_batches(data, sizes):
    """Consecutive batches of the given sizes (cycled) over all examples."""
    out, start, k = [], 0, 0
    while start < len(data["id"]):
        stop = start + sizes[k % len(sizes)]
        out.append({key: v[start:stop] for key, v in data.items()})
        start, k = stop, k + 1
    return out


def test_batched_loss_matches_the_reference_and_the_per_example_form():
    data = _data.dataset()  # 203 examples: the last step of 16 has 11 real rows
    batched = _table(_data.batches(data, 16), fn=batch_loss, batched=True, step_size=16)
    per_example = _table(_data.batches(data, 16), step_size=16)
    order = np.argsort(data["id"])
    np.testing.assert_array_equal(batched.ids, data["id"][order])
    ref = _data.reference_losses(_data.params(), data)[order]
    np.testing.assert_allclose(batched.losses, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batched.losses, per_example.losses, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("batched", [False, True])
def test_merged_and_split_steps_equal_unmerged_exactly_and_trace_once(batched):
    data = _data.dataset()
    fn = batch_loss if batched else _data.loss_fn
    kw = {"fn": fn, "batched": batched, "step_size": 16}
    unmerged = _table(_data.batches(data, 16), **kw)  # a step per batch
    counted = chex.assert_max_traces(fn, n=1)
    kw["fn"] = counted
    # Batches of 5, 3 and 40 rows: merged across batches, split inside them, padded once.
    merged = _table(_mixed_batches(data, [5, 3, 40]), **kw)
    np.testing.assert_array_equal(merged.ids, unmerged.ids)
    np.testing.assert_array_equal(merged.losses, unmerged.losses)  # bit for bit
    again = _table(
        _mixed_batches(data, [1, 30]), **kw
    )  # same fn and step: no new trace
    np.testing.assert_array_equal(again.losses, unmerged.losses)


def test_rows_waiting_in_a_merged_step_survive_a_loader_that_refills_its_arrays():
    data = _data.dataset()
    expected = _table(_data.batches(data, 16), step_size=16)

    def refilling():  # one set of arrays, overwritten for every batch
        buf = {k: np.empty((5, *v.shape[1:]), v.dtype) for k, v in data.items()}
        for start in range(0, len(data["id"]), 5):
            n = min(5, len(data["id"]) - start)
            view = {k: b[:n] for k, b in buf.items()}
            for k in buf:
                view[k][...] = data[k][start : start + n]
            yield view

    assert _table(refilling(), step_size=16) == expected


class _BatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(_data.DIM, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.lin(x))))[..., 0]


def _bn_loss(graphdef):
    def loss(state, batch):
        return (nnx.merge(graphdef, state)(batch["x"]) - batch["y"]) ** 2

    return loss


def test_a_batched_loss_that_couples_rows_is_refused():
    model = _BatchNormNet(
        nnx.Rngs(0)
    )  # train mode: normalised by the batch's statistics
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=r"couples the rows of a batch.*eval mode"):
        flowjax.per_example_losses(
            _bn_loss(graphdef),
            state,
            _data.batches(_data.dataset(), 16),
            batched=True,
            progress=False,
        )

    with pytest.raises(ValueError, match="couples the rows"):  # a mean over the batch
        _table(
            _data.batches(_data.dataset(), 16),
            fn=_data.coupled_batch_loss,
            batched=True,
        )


def test_batchnorm_in_eval_mode_is_exact_per_example():
    model = _BatchNormNet(nnx.Rngs(0))
    # Running statistics away from their init, so that eval mode is not the identity.
    model.bn.mean[...] = jnp.linspace(-1.0, 1.0, 8)
    model.bn.var[...] = jnp.linspace(0.5, 2.0, 8)
    model.eval()
    graphdef, state = nnx.split(model)
    data = _data.dataset()
    table = flowjax.per_example_losses(
        _bn_loss(graphdef), state, _data.batches(data, 7), batched=True, progress=False
    )
    # Reference: numpy float64 with the running statistics.
    a = {  # every array of the model, float64
        name: np.asarray(v[...], np.float64)
        for name, v in [
            ("k1", model.lin.kernel),
            ("b1", model.lin.bias),
            ("mean", model.bn.mean),
            ("var", model.bn.var),
            ("scale", model.bn.scale),
            ("shift", model.bn.bias),
            ("k2", model.head.kernel),
            ("b2", model.head.bias),
        ]
    }
    h = data["x"].astype(np.float64) @ a["k1"] + a["b1"]
    h = (h - a["mean"]) / np.sqrt(a["var"] + model.bn.epsilon)
    h = np.maximum(h * a["scale"] + a["shift"], 0)
    ref = ((h @ a["k2"] + a["b2"])[:, 0] - data["y"]) ** 2
    order = np.argsort(data["id"])
    np.testing.assert_allclose(table.losses, ref[order], rtol=1e-5, atol=1e-6)


def test_default_step_merges_small_batches_of_small_examples_only():
    def spec(rows, shape, dtype=np.float32):
        return _engine._Spec.from_batch(
            {"id": np.arange(rows), "x": np.zeros((rows, *shape), dtype)}
        )

    assert _engine.auto_step_rows(spec(256, (28, 28, 1))) == 1024  # 3 KiB per example
    assert _engine.auto_step_rows(spec(16, (6,))) == 64  # at most 4 times the batch
    assert _engine.auto_step_rows(spec(5000, (6,))) == 5000  # never smaller than it
    assert _engine.auto_step_rows(spec(32, (224, 224, 3))) == 32  # large examples
    assert _engine.auto_step_rows(spec(2048, (2,))) == 4096  # at most 4096 rows


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("sizes", [[16], [5, 3, 40]])
def test_default_steps_on_a_cpu_run_merged_batches_as_sub_batches_exactly_and_trace_once(
    batched, sizes
):
    # On one CPU device the default rule merges batches of 16 into steps of 64 rows,
    # computed as 4 sub-batches of 16 in one program: bit for bit the unmerged steps of 16.
    data = _data.dataset()
    fn = batch_loss if batched else _data.loss_fn
    unmerged = _table(_data.batches(data, 16), fn=fn, batched=batched, step_size=16)
    chex.clear_trace_counter()  # parametrized: the same fn in every case
    counted = chex.assert_max_traces(fn, n=1)
    got = _table(_mixed_batches(data, [16] * 3 + sizes), fn=counted, batched=batched)
    np.testing.assert_array_equal(got.ids, unmerged.ids)
    np.testing.assert_array_equal(got.losses, unmerged.losses)
    # The step that ran: 64 rows (global batch, the key's first entry) in 4 sub-batches.
    assert [(k[0], k[8]) for k in _engine._STEPS[counted]] == [(64, 4)]
    again = _table(_mixed_batches(data, [16, 7]), fn=counted, batched=batched)
    np.testing.assert_array_equal(again.losses, unmerged.losses)  # no new trace


def test_sub_batches_only_for_the_default_rule_on_one_cpu_device():
    import types

    spec = _engine._Spec.from_batch({"id": np.arange(300), "x": np.zeros((300, 4))})

    def mesh(n, platform="cpu"):
        devices = np.array([types.SimpleNamespace(platform=platform)] * n)
        return types.SimpleNamespace(devices=devices)

    assert _engine._sub_batches(spec, 1024, "auto", mesh(1)) == 3  # 3 x 300 rows
    assert _engine._sub_batches(spec, 300, "auto", mesh(1)) == 1  # nothing merged
    assert _engine._sub_batches(spec, 1024, 1024, mesh(1)) == 1  # an explicit step_size
    assert _engine._sub_batches(spec, 1024, "auto", mesh(2)) == 1  # several devices
    assert _engine._sub_batches(spec, 1024, "auto", mesh(1, "gpu")) == 1
    # Batches of 300 rows (of small examples) merge into steps of 4 x 300 rows.
    data = _data.dataset(1000)
    table = _table(_data.batches(data, 300), fn=batch_loss, batched=True)
    ref = _table(_data.batches(data, 300), fn=batch_loss, batched=True, step_size=300)
    np.testing.assert_array_equal(table.losses, ref.losses)


def test_a_sub_batch_whose_rows_are_coupled_is_refused():
    # The rows check changes half of every sub-batch, not half of the step: a loss that
    # couples the rows of its batch of 16 is caught in steps of 4 sub-batches too.
    with pytest.raises(ValueError, match="couples the rows"):
        _table(
            _data.batches(_data.dataset(), 16),
            fn=_data.coupled_batch_loss,
            batched=True,
        )
    x = np.arange(12.0).reshape(12, 1)
    probe = _engine._probe_rows(x, 4)[:, 0]  # blocks of 4: rows 2, 3 become rows 1, 0
    np.testing.assert_array_equal(probe, [0, 1, 1, 0, 4, 5, 5, 4, 8, 9, 9, 8])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "big"])
def test_step_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="step_size"):
        _table(_data.batches(_data.dataset(), 16), step_size=bad)


def test_progress_bar_redraws_at_most_a_few_times_a_second():
    class Bar:
        def __init__(self):
            self.calls, self.n, self.closed = 0, 0, False

        def update(self, n):
            self.calls, self.n = self.calls + 1, self.n + n

        def close(self):
            self.closed = True

    bar = Bar()
    progress = _engine._Progress(bar)
    for _ in range(10_000):  # well under a second
        progress.update(3)
    assert bar.calls <= 2
    progress.close()
    assert bar.n == 30_000 and bar.closed


@pytest.mark.parametrize("dense", [True, False])
def test_repeated_ids_are_caught_for_dense_and_sparse_ids(dense):
    """Ids 0..n-1 take the stamp path, spread-out ids the sorted one; both catch repeats."""
    data = _data.dataset()
    if dense:
        data["id"] = np.arange(len(data["id"]), dtype=np.int64)[::-1].copy()
    within = [{k: v[:4] for k, v in data.items()}]
    within[0]["id"] = within[0]["id"][[0, 1, 0, 2]]
    with pytest.raises(ValueError, match="within one batch"):
        _table(within)
    again = [*_data.batches(data, 16), {k: v[50:52] for k, v in data.items()}]
    with pytest.raises(ValueError, match=r"arrived again.*repeats examples"):
        _table(again)


def test_ids_that_turn_sparse_midway_still_catch_a_repeat_of_an_early_id():
    seen = _engine._SeenIds()
    assert [len(x) for x in seen.add(np.arange(100, 200))] == [0, 0]
    seen.add(np.array([10**12]))  # the range would be too sparse: sorted from here on
    for start in range(300, 400, 10):
        seen.add(np.arange(start, start + 10))
    seen.add(np.array([150, 7]))
    twice, again = seen.merge()
    assert twice.tolist() == [] and again.tolist() == [150]


def test_ids_checked_in_groups_give_the_batch_by_batch_messages():
    """Past the first batches ids are checked a group at a time; the errors still say which kind."""
    n, size = 20_000, 250  # a quarter of the ids seen: groups of up to 20 batches
    x = np.zeros((size, 1), np.float32)

    def feed(last):
        for s in range(0, n, size):
            yield {"id": np.arange(s, s + size, dtype=np.int64), "x": x}
        yield {"id": last, "x": x}

    loss = lambda p, ex: jnp.sum(ex["x"]) * p  # noqa: E731
    run = lambda last: flowjax.per_example_losses(  # noqa: E731
        loss, jnp.float32(1.0), feed(last), progress=False
    )
    fresh = np.arange(n, n + size, dtype=np.int64)
    twice = fresh.copy()
    twice[7] = twice[3]
    with pytest.raises(ValueError, match=rf"within one batch: \[{n + 3}\]"):
        run(twice)
    again = fresh.copy()
    again[5] = 123
    with pytest.raises(
        ValueError, match=r"duplicate example ids: \[123\] arrived again"
    ):
        run(again)
    assert len(run(fresh).ids) == n + size


def test_ids_fed_in_order_take_the_run_path_and_a_run_over_seen_ids_is_still_caught():
    seen = _engine._SeenIds()
    assert [len(x) for x in seen.add(np.arange(0, 300))] == [0, 0]
    assert [
        len(x) for x in seen.add_batches([np.arange(300, 400), np.arange(400, 500)])
    ] == [0, 0]
    assert seen.count == 500
    # A run that overlaps ids seen: the general path names exactly the repeats.
    twice, again = seen.add(np.arange(480, 520))
    assert twice.tolist() == [] and again.tolist() == list(range(480, 500))
    # Ascending by one except one step: not a run; a repeat within the batch is found.
    twice, again = seen.add(np.array([600, 601, 601, 603]))
    assert twice.tolist() == [601] and again.tolist() == []
    # Its ends say "run" (603 - 600 == 3), its middle does not.
    twice, again = seen.add(np.array([700, 702, 701, 703]))
    assert twice.tolist() == [] and again.tolist() == []
    assert seen.count == 500 + 40 + 4 + 4


@pytest.mark.parametrize("dense", [True, False])
def test_add_batches_is_adding_them_one_by_one(dense):
    rng = np.random.default_rng(0)
    scale = 1 if dense else 10**9
    batches = [
        rng.permutation(64).astype(np.int64) * scale + 64 * k * scale for k in range(6)
    ]
    batches[2][5] = batches[2][9]  # within batch 2
    batches[4][0] = batches[1][3]  # batch 4 repeats an id of batch 1
    one, group = _engine._SeenIds(), _engine._SeenIds()
    one.add(batches[0]), group.add(batches[0])
    out = [one.add(b) for b in batches[1:]] + [one.merge()]
    twice = np.unique(np.concatenate([t for t, _ in out]))
    again = np.setdiff1d(np.concatenate([a for _, a in out]), twice)
    got = [group.add_batches(batches[1:]), group.merge()]
    got_twice = np.unique(np.concatenate([t for t, _ in got]))
    got_again = np.setdiff1d(np.concatenate([a for _, a in got]), got_twice)
    np.testing.assert_array_equal(got_twice, [batches[2][9]])
    np.testing.assert_array_equal(got_twice, twice)
    np.testing.assert_array_equal(got_again, [batches[1][3]])
    np.testing.assert_array_equal(got_again, again)


def test_a_nan_in_a_group_of_read_steps_names_its_example():
    """Finished steps are read in groups; a NaN anywhere in one still names its id."""
    n = 40_000
    x = np.ones((n, 1), np.float32)
    x[31_234] = np.nan
    batches = [
        {"id": np.arange(s, s + 1000, dtype=np.int64), "x": x[s : s + 1000]}
        for s in range(0, n, 1000)
    ]
    loss = lambda p, b: b["x"][:, 0] * p  # noqa: E731
    with pytest.raises(ValueError, match=r"NaN or infinite losses for example.*31234"):
        flowjax.per_example_losses(
            loss, jnp.float32(1.0), batches, batched=True, progress=False
        )
    x[31_234] = 2.0
    table = flowjax.per_example_losses(
        loss, jnp.float32(1.0), batches, batched=True, progress=False
    )
    np.testing.assert_array_equal(table.ids, np.arange(n))
    np.testing.assert_array_equal(table.losses, x[:, 0])


def test_steps_viewing_adjacent_batches_of_a_list_equal_copied_ones():
    """A list of slices of one array fills merged steps with views; other layouts are copied."""
    rng = np.random.default_rng(0)
    n, width = 100, 8192  # 32 KiB per example: batches of 4 are chunks of 128 KiB
    x = rng.normal(size=(n, width)).astype(np.float32)
    y = rng.normal(size=(n,)).astype(np.float32)
    ids = rng.permutation(n).astype(np.int64)
    loss = lambda p, b: b["x"] @ p - b["y"]  # noqa: E731
    p = jnp.asarray(rng.normal(size=(width,)).astype(np.float32))
    ref = np.asarray(x @ np.asarray(p) - y)[np.argsort(ids)]

    def run(batches, **kw):
        t = flowjax.per_example_losses(
            loss, p, batches, batched=True, progress=False, **kw
        )
        np.testing.assert_array_equal(t.ids, np.sort(ids))
        return t.losses

    sizes = [4, 3, 9, 4, 16]
    starts = np.cumsum([0, *sizes * 10])
    starts = [*starts[starts < n].tolist(), n]
    adjacent = [
        {"id": ids[a:b], "x": x[a:b], "y": y[a:b]}
        for a, b in itertools.pairwise(starts)
    ]
    copied = [{k: np.array(v) for k, v in b.items()} for b in adjacent]  # own arrays
    copied_steps = run(copied, step_size=16)  # the same steps, copied into buffers
    np.testing.assert_allclose(copied_steps, ref, rtol=1e-4, atol=1e-3)
    for batches in (adjacent, tuple(adjacent), adjacent[::-1], iter(adjacent)):
        np.testing.assert_array_equal(run(batches, step_size=16), copied_steps)
    np.testing.assert_allclose(run(adjacent, step_size=32), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("id_dtype", [np.int64, np.int32])
@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
def test_a_list_of_step_sized_batches_is_fed_as_is_and_the_table_owns_its_ids(
    cache, id_dtype, tmp_path
):
    """Batches of exactly one step go to the device as they are (no slicing, no copy of a
    list's ids); the result equals merged and split steps, the caller's arrays are left as
    they were, and changing them afterwards changes nothing in the table."""
    data = _data.dataset()
    data["id"] = np.random.default_rng(1).permutation(len(data["id"])).astype(id_dtype)
    batches = list(_data.batches(data, 16))
    kw = {"cache_dir": str(tmp_path / "c")} if cache else {}
    given = [{k: v.copy() for k, v in b.items()} for b in batches]
    table = _table(batches, step_size=16, **kw)
    assert table == _table(_data.batches(data, 5), step_size=16)
    for b, g in zip(batches, given, strict=True):  # the pass never writes into them
        for k in g:
            np.testing.assert_array_equal(b[k], g[k], err_msg=k)
    ids, losses = table.ids.copy(), table.losses.copy()
    for b in batches:
        b["id"][...] = -1
        b["x"][...] = np.nan
    np.testing.assert_array_equal(table.ids, ids)
    np.testing.assert_array_equal(table.losses, losses)


def test_steps_in_bursts_equal_steps_one_by_one_and_bad_input_deep_in_a_list_still_raises(
    monkeypatch,
):
    """A list (and flowjax.batches) is prepared, dispatched and read a burst of steps at a
    time: the table equals the one-by-one pass of a generator exactly, over many bursts
    with a short last one, and a bad batch or a NaN far into the list names its ids."""
    monkeypatch.setattr(_engine, "_BURST", 4)  # 203 rows in steps of 4: 13 bursts
    data = _data.dataset()
    batches = list(_data.batches(data, 4))
    assert _engine._burst_steps(_engine._Spec.from_batch(batches[0]), 4) == 4
    one_by_one = _table(iter(batches), step_size=4)
    assert _table(batches, step_size=4) == one_by_one
    keyed = flowjax.batches(flowjax.ArraySource(data), 4, shard=(0, 1), id_key="id")
    assert _table(keyed, step_size=4) == one_by_one
    bad = [dict(b) for b in batches]
    bad[37]["x"] = bad[37]["x"].astype(np.int32)  # a wrong dtype in the 10th burst
    with pytest.raises(ValueError, match=rf"{bad[37]['id'][0]}"):
        _table(bad, step_size=4)
    nan = [dict(b) for b in batches]
    nan[45] = {**nan[45], "x": nan[45]["x"].copy()}
    nan[45]["x"][2] = np.nan
    with pytest.raises(ValueError, match=rf"{nan[45]['id'][2]}"):
        _table(nan, step_size=4)


def test_a_burst_holds_at_most_its_byte_budget_of_input():
    small = _engine._Spec.from_batch(
        {"id": np.arange(2), "x": np.zeros((2, 4), np.float32)}
    )
    assert _engine._burst_steps(small, 256) == _engine._BURST
    image = {"id": np.arange(2), "x": np.zeros((2, 224, 224, 3), np.float32)}
    big = _engine._Spec.from_batch(image)  # 588 KiB an example
    assert _engine._burst_steps(big, 256) == 1  # 147 MiB a step: one at a time
    assert _engine._burst_steps(big, 8) * 8 * 224 * 224 * 3 * 4 <= _engine._BURST_BYTES
