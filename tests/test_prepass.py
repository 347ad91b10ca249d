"""flowjax.per_example_losses in one process on one device (multi-device/-process: other files)."""

from __future__ import annotations

import glob
import itertools
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

import flowjax

from . import _data


def _table(batches, fn=_data.loss_fn, **kw):
    # One step size for every run a test compares (XLA's float32 rounding depends on the
    # step's shape), and a step per batch of 16, so that a kill lands between read steps.
    kw.setdefault("step_size", 16)
    return flowjax.per_example_losses(fn, _data.params(), batches, progress=False, **kw)


def test_matches_independent_reference_with_ragged_last_batch():
    data = _data.dataset()
    table = _table(_data.batches(data, 16))  # 203 = 12 * 16 + 11
    order = np.argsort(data["id"])
    np.testing.assert_array_equal(table.ids, data["id"][order])
    assert table.ids.dtype == np.int64 and table.losses.dtype == np.float32
    np.testing.assert_allclose(
        table.losses, _data.reference_losses(_data.params(), data)[order], rtol=2e-5
    )


def test_traced_once_for_ragged_and_oversized_batches_and_across_calls():
    data = _data.dataset()
    fn = chex.assert_max_traces(_data.loss_fn, n=1)
    sizes = [16, 16, 5, 40, 3, 16]  # 40 > 16 is split; 5 and 3 are padded
    cuts = np.cumsum([0, *sizes, len(data["id"]) - sum(sizes)])
    batches = [
        {k: v[a:b] for k, v in data.items()} for a, b in itertools.pairwise(cuts)
    ]
    first = flowjax.per_example_losses(fn, _data.params(), batches, progress=False)
    second = flowjax.per_example_losses(
        fn, _data.params(), _data.batches(data, 16), progress=False
    )
    assert len(first) == len(data["id"])
    np.testing.assert_allclose(first.losses, second.losses, rtol=1e-6)


def test_shuffled_input_gives_the_same_table():
    data = _data.dataset()
    a = _table(_data.batches(data, 16))
    b = _table(
        _data.batches(data, 16, np.random.default_rng(3).permutation(len(data["id"])))
    )
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)


def test_float64_input_is_cast_like_the_first_batch():
    data = _data.dataset()
    data64 = {**data, "x": data["x"].astype(np.float64)}
    a, b = _table(_data.batches(data, 32)), _table(_data.batches(data64, 32))
    assert a == b


class _TinyNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 12, rngs=rngs)
        self.l2 = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.gelu(self.l1(x)))


def test_flax_nnx_model_matches_directly_computed_batched_losses():
    model = _TinyNet(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=50).astype(np.int32)

    def loss_fn(state, ex):
        logits = nnx.merge(graphdef, state)(ex["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    batches = [
        {"id": np.arange(s, min(s + 16, 50)), "x": x[s : s + 16], "y": y[s : s + 16]}
        for s in range(0, 50, 16)
    ]
    table = flowjax.per_example_losses(loss_fn, state, batches, progress=False)
    direct = optax.softmax_cross_entropy_with_integer_labels(
        model(jnp.asarray(x)), jnp.asarray(y)
    )
    np.testing.assert_array_equal(table.ids, np.arange(50))
    np.testing.assert_allclose(table.losses, np.asarray(direct), rtol=1e-6, atol=1e-7)


def test_progress_bar_shows_examples_and_rate(capsys):
    flowjax.per_example_losses(
        _data.loss_fn, _data.params(), _data.batches(_data.dataset(), 16)
    )
    err = capsys.readouterr().err
    assert "pre-pass" in err and "ex/s" in err and "203" in err
    _table(_data.batches(_data.dataset(), 16))
    assert capsys.readouterr().err == ""


# --- resuming from cache_dir -------------------------------------------------------------


def _interrupted(data, cache_dir, stop_after: int):
    """Runs a pre-pass that dies after `stop_after` batches, caching every finished step."""

    def feed():
        for k, batch in enumerate(_data.batches(data, 16)):
            if k == stop_after:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        _table(feed(), cache_dir=cache_dir, flush_seconds=0.0)


def _cached_ids(cache_dir) -> np.ndarray:
    chunks = glob.glob(os.path.join(cache_dir, "*", "chunk-*.npz"))
    return (
        np.concatenate([np.load(c)["ids"] for c in chunks])
        if chunks
        else np.zeros(0, np.int64)
    )


def test_interrupted_then_resumed_equals_uninterrupted_and_skips_cached(tmp_path):
    data = _data.dataset()
    expected = _table(_data.batches(data, 16))
    _interrupted(data, str(tmp_path), stop_after=6)
    cached = _cached_ids(str(tmp_path))
    assert 0 < len(cached) < len(data["id"])
    resumed = _table(_data.batches(data, 16), cache_dir=str(tmp_path))
    assert resumed == expected and resumed.cached == len(cached)
    # A third run finds everything cached and computes nothing.
    third = _table(_data.batches(data, 16), cache_dir=str(tmp_path))
    assert third == expected and third.cached == len(data["id"])


def test_resume_with_reordered_input_skips_by_id(tmp_path):
    data = _data.dataset()
    expected = _table(_data.batches(data, 16))
    _interrupted(data, str(tmp_path), stop_after=4)
    cached = _cached_ids(str(tmp_path))
    order = np.random.default_rng(5).permutation(len(data["id"]))
    resumed = _table(_data.batches(data, 16, order), cache_dir=str(tmp_path))
    assert resumed.cached == len(cached)
    np.testing.assert_array_equal(resumed.ids, expected.ids)
    np.testing.assert_allclose(resumed.losses, expected.losses, rtol=1e-6)


def test_cache_returns_only_the_examples_fed_this_run(tmp_path):
    data = _data.dataset()
    _table(_data.batches(data, 16), cache_dir=str(tmp_path))
    half = {k: v[:100] for k, v in data.items()}
    table = _table(_data.batches(half, 16), cache_dir=str(tmp_path))
    np.testing.assert_array_equal(table.ids, np.sort(half["id"]))


def test_cache_written_by_other_params_is_refused(tmp_path):
    data = _data.dataset()
    _table(_data.batches(data, 16), cache_dir=str(tmp_path))
    other = jax.tree.map(lambda x: x * 1.01, _data.params())
    with pytest.raises(
        ValueError, match=r"different pre-pass.*parameter values differ"
    ):
        flowjax.per_example_losses(
            _data.loss_fn,
            other,
            _data.batches(data, 16),
            progress=False,
            cache_dir=str(tmp_path),
        )
    with pytest.raises(ValueError, match="loss_fn"):
        _table(
            _data.batches(data, 16),
            fn=lambda p, ex: _data.loss_fn(p, ex),
            cache_dir=str(tmp_path),
        )


def test_unreadable_cache_chunk_is_recomputed_with_a_warning(tmp_path):
    data = _data.dataset()
    expected = _table(_data.batches(data, 16))
    _interrupted(data, str(tmp_path), stop_after=6)
    chunk = sorted(glob.glob(os.path.join(str(tmp_path), "*", "chunk-*.npz")))[0]
    with open(chunk, "wb") as f:
        f.write(b"truncated")
    with pytest.warns(RuntimeWarning, match="unreadable pre-pass cache chunk"):
        assert _table(_data.batches(data, 16), cache_dir=str(tmp_path)) == expected


# --- bad input -----------------------------------------------------------------------------


def _batch(n=4, **over):
    b = {
        "id": np.arange(n),
        "x": np.ones((n, _data.DIM), np.float32),
        "y": np.zeros(n, np.float32),
    }
    b.update(over)
    return b


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        ([], "batches is empty"),
        (
            [{"x": np.ones((2, _data.DIM), np.float32), "y": np.zeros(2, np.float32)}],
            'integer "id"',
        ),
        ([_batch(id=np.array([0.0, 1.0, 2.0, 3.0]))], "must be integers"),
        (
            [_batch(y=np.zeros(3, np.float32))],
            r"\['y'\] has 3 rows but the batch has 4 ids",
        ),
        (
            [_batch(), _batch(x=np.ones((4, _data.DIM + 1), np.float32))],
            r"\['x'\] has per-example shape \(7,\)",
        ),
        (
            [_batch(), _batch(x=np.ones((4, _data.DIM), np.int32))],
            r"\['x'\] has dtype int32",
        ),
        (
            [_batch(id=np.array([3, 1, 3, 2]))],
            r"duplicate example ids within one batch: \[3\]",
        ),
        (
            [_batch(), _batch(id=np.array([7, 8, 2, 9]))],
            r"duplicate example ids: \[2\]",
        ),
        (
            [
                _batch(),
                {"id": np.arange(4, 8), "x": np.ones((4, _data.DIM), np.float32)},
            ],
            "structure",
        ),
    ],
)
def test_bad_batches_raise_a_clear_error(batches, match):
    with pytest.raises(ValueError, match=match):
        _table(batches)


def test_nan_loss_raises_naming_the_example_ids():
    data = _data.dataset(40)
    data["x"][[3, 9]] = np.nan  # both in the first batch of 16
    with pytest.raises(
        ValueError,
        match=rf"NaN or infinite losses for example ids \[{data['id'][3]}, {data['id'][9]}\]",
    ):
        _table(_data.batches(data, 16))


def test_sequence_without_target_tokens_raises_instead_of_being_zeroed():
    def token_mean_loss(p, ex):  # mean NLL over target tokens: 0/0 without targets
        nll = (ex["tokens"] * p) ** 2
        return jnp.sum(nll * ex["mask"]) / jnp.sum(ex["mask"])

    mask = np.ones((3, 5), np.float32)
    mask[1] = 0.0  # example 11 has no target tokens
    batch = {
        "id": np.array([10, 11, 12]),
        "tokens": np.ones((3, 5), np.float32),
        "mask": mask,
    }
    with pytest.raises(ValueError, match=r"ids \[11\].*no target tokens"):
        flowjax.per_example_losses(
            token_mean_loss, jnp.float32(1.0), [batch], progress=False
        )


def test_leading_and_middle_empty_batches_are_skipped():
    empty = _batch(0)
    table = _table([empty, _batch(3), empty, _batch(2, id=np.array([7, 8]))])
    np.testing.assert_array_equal(table.ids, [0, 1, 2, 7, 8])
    with pytest.raises(ValueError, match="batches is empty"):
        _table([empty, empty])


def test_loss_fn_must_return_a_scalar_per_example():
    with pytest.raises(ValueError, match="ONE scalar per example"):
        _table([_batch()], fn=lambda p, ex: ex["x"] * 2.0)


def test_mesh_needs_a_data_axis():
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    with pytest.raises(ValueError, match="'data' axis"):
        _table([_batch()], mesh=mesh)


# --- loaders that repeat examples ------------------------------------------------------------


def _at_most(batches, limit: int):
    """Yields at most `limit` batches, then fails the test: the pass should have stopped."""
    for k, batch in enumerate(batches):
        if k == limit:
            raise AssertionError(f"the pass pulled more than {limit} batches")
        yield batch


@pytest.mark.parametrize(
    "loader",
    [
        lambda data: flowjax.batches(flowjax.ArraySource(data), 16, epochs=None),
        lambda data: flowjax.batches(
            flowjax.ArraySource(data), 16, shuffle=True, epochs=3
        ),
        lambda data: itertools.cycle(list(_data.batches(data, 16))),
    ],
    ids=["epochs=None", "epochs=3", "itertools.cycle"],
)
def test_a_loader_that_repeats_examples_fails_within_one_pass(loader):
    data = (
        _data.dataset()
    )  # 203 examples: 13 batches of 16 per pass, then at most 1/4 more
    with pytest.raises(
        ValueError,
        match=r"duplicate example ids: \[\d+.* arrived again after an earlier batch: "
        "this loader repeats examples: pass a single-epoch iterator",
    ):
        _table(_at_most(loader(data), 13 + 5))


def test_repeated_ids_found_as_they_arrive_among_many_ids():
    """Two passes over 400k shuffled ids: the second fails within a quarter of a pass."""
    n, size = 400_000, 4096
    ids = np.random.default_rng(0).permutation(n).astype(np.int64) * 3 + 7
    pulled = []

    def feed():
        for rows in [*np.array_split(np.arange(n), n // size)] * 2:
            pulled.append(len(rows))
            assert sum(pulled) <= n + n // 4 + size, (
                "went on past one pass and a quarter"
            )
            yield {"id": ids[rows], "x": np.zeros((len(rows), 1), np.float32)}

    with pytest.raises(ValueError, match="arrived again after an earlier batch") as e:
        flowjax.per_example_losses(
            lambda p, ex: jnp.sum(ex["x"]) * p, jnp.float32(1.0), feed(), progress=False
        )
    shown, more = re.search(r"ids: \[([\d, ]+)\] and (\d+) more", str(e.value)).groups()
    repeated = ids[: sum(pulled) - n]  # the second pass so far
    assert set(map(int, shown.split(", "))) <= set(repeated.tolist())
    assert 5 + int(more) <= len(repeated)
    assert sum(pulled) > n


def test_a_later_float_batch_is_never_rounded_or_overflowed_silently():
    def loss(w, ex):
        return jnp.sum(ex["x"].astype(jnp.float32) * w)

    first = {"id": np.array([0]), "x": np.ones((1, 1), np.float16)}
    exact = {"id": np.array([1]), "x": np.array([[0.5]], np.float32)}  # a float16 value
    table = flowjax.per_example_losses(
        loss, jnp.ones(1), [first, exact], progress=False
    )
    assert table.losses.tolist() == [1.0, 0.5]
    for value in (1.0001, 70000.0):  # rounds, overflows in float16
        later = {"id": np.array([7]), "x": np.array([[value]], np.float32)}
        with pytest.raises(
            ValueError,
            match=r"dtype float32; the first batch had float16, and 1 of its values would change.*\[7\]",
        ):
            flowjax.per_example_losses(
                loss, jnp.ones(1), [first, later], progress=False
            )
