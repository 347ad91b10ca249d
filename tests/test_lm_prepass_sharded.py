"""The token- and sequence-level pre-passes sharded like the core one: 8 devices and 2
processes give the 1-device tables; one trace per bucket; NaN handling; resume from a cache,
refused for another model. Multi-device runs are own processes."""

from __future__ import annotations

import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

import flowjax

from . import _lm_data, _subprocess

WORKER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "_lm_prepass_worker.py"
)


def _single(batch_size: int = 3, prepass=flowjax.lm_token_losses):
    """One in-process pass (token level by default) and its number of traces."""
    lm = _lm_data.LM()
    result = prepass(
        lm,
        _lm_data.params(),
        _lm_data.examples(),
        bucket_lengths=_lm_data.BUCKETS,
        batch_size=batch_size,
        progress=False,
    )
    return result, lm.traces


def _single_seq(batch_size: int = 3):
    return _single(batch_size, prepass=flowjax.lm_sequence_losses)


def _seq_reference(examples) -> dict[int, float]:
    """float64 numpy sequence losses: the mean NLL of each example's target tokens."""
    out = {}
    for e in examples:
        nll, m = _lm_data.reference(_lm_data.params(), e)
        out[e["id"]] = nll[m].mean()
    return out


def _load_seq(path: str, prefix: str = "seq_") -> tuple[flowjax.LossTable, int]:
    with np.load(path) as f:
        traces = int(f["seq_traces"])
        return flowjax.LossTable(f[f"{prefix}ids"], f[f"{prefix}losses"]), traces


def _assert_same_seq(table: flowjax.LossTable, ref: flowjax.LossTable) -> None:
    np.testing.assert_array_equal(table.ids, ref.ids)  # exact: nothing lost or doubled
    np.testing.assert_allclose(table.losses, ref.losses, rtol=1e-5, atol=1e-6)


def _load(path: str) -> tuple[flowjax.TokenLosses, int]:
    with np.load(path) as f:
        return flowjax.TokenLosses(f["ids"], f["losses"], f["mask"]), int(f["traces"])


def _assert_same(tl: flowjax.TokenLosses, ref: flowjax.TokenLosses) -> None:
    np.testing.assert_array_equal(tl.ids, ref.ids)  # exact: nothing lost or doubled
    np.testing.assert_array_equal(tl.mask, ref.mask)
    np.testing.assert_allclose(tl.losses, ref.losses, rtol=1e-5, atol=1e-6)


def test_single_device_matches_the_numpy_reference():
    tl, traces = _single()
    assert traces == len(
        _lm_data.BUCKETS
    )  # once per bucket, ragged last batches included
    ex = _lm_data.examples()
    assert tl.ids.tolist() == sorted(e["id"] for e in ex)
    assert tl.losses.shape == tl.mask.shape == (len(ex), _lm_data.BUCKETS[-1] - 1)
    for e in ex:
        nll, m = _lm_data.reference(_lm_data.params(), e)
        row = np.searchsorted(tl.ids, e["id"])
        n = len(m)
        np.testing.assert_array_equal(tl.mask[row, :n], m)
        assert not tl.mask[row, n:].any() and (tl.losses[row][~tl.mask[row]] == 0).all()
        np.testing.assert_allclose(tl.losses[row, :n][m], nll[m], rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_eight_devices_and_two_processes_equal_one_device(tmp_path):
    # Started together (the machine is small; they run in parallel).
    eight = _subprocess.start(
        str(tmp_path / "eight.npz"),
        "--devices",
        "8",
        "--batch-size",
        "5",
        worker=WORKER,
    )
    two = _subprocess.start_two(
        [str(tmp_path / f"mp-{i}.npz") for i in range(2)],
        *("--devices", "2", "--batch-size", "3", "--cache", str(tmp_path / "cache")),
        worker=WORKER,
    )
    one, _ = _single(batch_size=5)
    one_seq, one_seq_traces = _single_seq(batch_size=5)
    expect = _seq_reference(_lm_data.examples())
    np.testing.assert_allclose(
        one_seq.losses, [expect[i] for i in one_seq.ids], rtol=2e-5
    )
    assert one_seq_traces == len(_lm_data.BUCKETS)
    for p in [eight, *two]:
        _subprocess.finish(p)
    # 8 devices, 5 rows per step padded to 8 (one per device)
    tl, traces = _load(str(tmp_path / "eight.npz"))
    _assert_same(tl, one)
    assert traces == len(_lm_data.BUCKETS)
    seq, seq_traces = _load_seq(str(tmp_path / "eight.npz"))
    _assert_same_seq(seq, one_seq)
    assert seq_traces == len(_lm_data.BUCKETS)
    # 2 processes x 2 devices; process 1 has no example of the longest bucket
    assert (
        max(len(e["tokens"]) for e in _lm_data.split(_lm_data.examples(), 1, 2)) <= 12
    )
    (first, t0), (second, t1) = (_load(str(tmp_path / f"mp-{i}.npz")) for i in range(2))
    for a, b in [(first.ids, second.ids), (first.losses, second.losses)]:
        np.testing.assert_array_equal(a, b)  # identical on every process
    _assert_same(first, one)
    assert t0 == t1 == len(_lm_data.BUCKETS)
    (s0, st0), (s1, st1) = (_load_seq(str(tmp_path / f"mp-{i}.npz")) for i in range(2))
    assert s0 == s1  # identical on every process
    _assert_same_seq(s0, one_seq)
    # process 1 traced (and fed padding to) the bucket it holds no example of
    assert st0 == st1 == len(_lm_data.BUCKETS)
    # Resumed from per-process caches with different progress: the same complete table.
    for i in range(2):
        with np.load(tmp_path / f"mp-{i}.npz") as f:
            for k in ("ids", "losses", "mask"):
                np.testing.assert_array_equal(f[f"resumed_{k}"], f[k])
            for k in ("ids", "losses"):
                np.testing.assert_array_equal(f[f"resumed_seq_{k}"], f[f"seq_{k}"])


SPECIAL = 3  # the token whose logits are NaN in _nan_model


def _nan_model(table, tokens):
    """A bigram model whose logits after token SPECIAL are NaN."""
    return jnp.where((tokens == SPECIAL)[:, None], jnp.nan, table[tokens])


def _nan_params():
    return jnp.log(jnp.full((5, 5), 0.2)).at[:, 4].set(jnp.log(0.2 / 3))  # not uniform


def test_nan_at_a_target_position_raises_naming_the_id_elsewhere_it_does_not_matter():
    table = _nan_params()
    ok = [
        # SPECIAL at position 1 predicts position 2, a prompt token: not a target.
        {
            "id": 11,
            "tokens": np.array([1, SPECIAL, 2, 4]),
            "mask": np.array([0, 0, 0, 1], bool),
        },
        # Padding is SPECIAL (pad_id): its NaN logits are never targets either.
        {"id": 12, "tokens": np.array([0, 4, 1]), "mask": np.array([0, 1, 1], bool)},
    ]
    bad = {
        "id": 13,
        "tokens": np.array([0, SPECIAL, 1]),
        "mask": np.array([0, 1, 1], bool),
    }
    kw = {"bucket_lengths": [6], "batch_size": 2, "pad_id": SPECIAL, "progress": False}
    tl = flowjax.lm_token_losses(_nan_model, table, ok, **kw)
    p = np.exp(np.asarray(table, np.float64))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(tl.losses[0], [0, 0, -np.log(p[2, 4]), 0, 0], rtol=1e-5)
    np.testing.assert_allclose(
        tl.losses[1], [-np.log(p[0, 4]), -np.log(p[4, 1]), 0, 0, 0], rtol=1e-5
    )
    assert np.isfinite(tl.losses).all()
    with pytest.raises(ValueError, match=r"NaN or infinite token losses .*ids \[13\]"):
        flowjax.lm_token_losses(_nan_model, table, [*ok, bad], **kw)


def _chunk_ids(pattern: str) -> list[int]:
    return [i for c in glob.glob(pattern) for i in np.load(c)["ids"].tolist()]


def test_killed_token_prepass_resumes_from_its_cache(tmp_path):
    cache = str(tmp_path / "cache")
    kw = {"bucket_lengths": _lm_data.BUCKETS, "batch_size": 3, "progress": False}
    kw["flush_seconds"] = 0.0  # a chunk per finished step
    ex = _lm_data.examples()
    full = flowjax.lm_token_losses(
        _lm_data.LM(), _lm_data.params(), ex, cache_dir=cache, **kw
    )
    _assert_same(full, _single()[0])
    # Lose the last chunk of each bucket (as if killed): only those rows are recomputed.
    lost = []
    for b in _lm_data.BUCKETS:
        chunks = sorted(
            glob.glob(os.path.join(cache, f"bucket_{b}", "*", "chunk-*.npz"))
        )
        assert len(chunks) > 1
        lost += np.load(chunks[-1])["ids"].tolist()
        os.remove(chunks[-1])
    lm = _lm_data.LM()
    with pytest.raises(ValueError, match="written by a different pre-pass"):
        flowjax.lm_token_losses(
            lambda p, t: lm(p, t), _lm_data.params(), ex, cache_dir=cache, **kw
        )
    resumed = flowjax.lm_token_losses(lm, _lm_data.params(), ex, cache_dir=cache, **kw)
    for a, b in [
        (resumed.ids, full.ids),
        (resumed.mask, full.mask),
        (resumed.losses, full.losses),
    ]:
        np.testing.assert_array_equal(a, b)
    assert lm.traces == len(
        _lm_data.BUCKETS
    )  # the lost rows were recomputed, per bucket
    # Only the lost rows were recomputed: the cache now holds every row exactly once.
    written = _chunk_ids(os.path.join(cache, "bucket_*", "*", "chunk-*.npz"))
    assert sorted(written) == full.ids.tolist()
    assert (full.cached, resumed.cached) == (0, len(full.ids) - len(lost))


def _bucket_sizes(examples) -> list[int]:
    return [
        sum(
            min(b for b in _lm_data.BUCKETS if b >= len(e["tokens"])) == n
            for e in examples
        )
        for n in _lm_data.BUCKETS
    ]


def test_sequence_prepass_traces_once_per_bucket_even_with_a_bucket_below_batch_size():
    ex = _lm_data.examples()
    # Keep one example of the middle bucket: its only batch is shorter than batch_size.
    middle = [e for e in ex if 6 < len(e["tokens"]) <= 12]
    ex = [e for e in ex if not 6 < len(e["tokens"]) <= 12] + middle[:1]
    sizes = _bucket_sizes(ex)
    assert sizes[1] == 1 and all(n > 5 and n % 5 for n in (sizes[0], sizes[2]))
    lm = _lm_data.LM()
    kw = {"bucket_lengths": _lm_data.BUCKETS, "batch_size": 5, "progress": False}
    table = flowjax.lm_sequence_losses(lm, _lm_data.params(), ex, **kw)
    assert lm.traces == len(_lm_data.BUCKETS)  # not one more for the short bucket
    expect = _seq_reference(ex)
    assert table.ids.tolist() == sorted(expect)
    np.testing.assert_allclose(table.losses, [expect[i] for i in table.ids], rtol=2e-5)
    # Only the middle bucket: still one trace (the step is per batch_size, not per bucket size).
    again = flowjax.lm_sequence_losses(lm, _lm_data.params(), middle[1:3], **kw)
    assert lm.traces == len(_lm_data.BUCKETS)
    np.testing.assert_allclose(
        again.losses, [_seq_reference(middle[1:3])[i] for i in again.ids], rtol=2e-5
    )
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['total'\]"):
        flowjax.lm_sequence_losses(lm, _lm_data.params(), ex, total=3, **kw)


def _other_lm(p, tokens):
    """Another causal model with the same parameters: mean instead of sum of embeddings."""
    h = jnp.cumsum(p["E"][tokens], axis=0) / jnp.arange(1, len(tokens) + 1)[:, None]
    return h @ p["W"]


def test_sequence_cache_resumes_for_its_model_and_refuses_another(tmp_path):
    cache = str(tmp_path / "cache")
    kw = {"bucket_lengths": _lm_data.BUCKETS, "batch_size": 3, "progress": False}
    kw["flush_seconds"] = 0.0  # a chunk per finished step
    ex, params = _lm_data.examples(), _lm_data.params()
    full = flowjax.lm_sequence_losses(_lm_data.LM(), params, ex, cache_dir=cache, **kw)
    _assert_same_seq(full, _single_seq()[0])
    # Another logits_fn, same parameters: its losses differ, so its cache must not be served.
    other = flowjax.lm_sequence_losses(_other_lm, params, ex, **kw)
    assert not np.allclose(other.losses, full.losses, rtol=1e-3)
    with pytest.raises(
        ValueError,
        match=r"written by a different pre-pass \(loss_fn: .*sequence_nll of .*LM",
    ):
        flowjax.lm_sequence_losses(_other_lm, params, ex, cache_dir=cache, **kw)
    # The token pass in the same cache_dir is refused too (another loss and output shape).
    with pytest.raises(ValueError, match="written by a different pre-pass"):
        flowjax.lm_token_losses(_lm_data.LM(), params, ex, cache_dir=cache, **kw)
    # The same model (a new instance) resumes: every example served from the cache,
    # nothing recomputed (no row written again).
    pattern = os.path.join(cache, "bucket_*", "*", "chunk-*.npz")
    before = _chunk_ids(pattern)
    resumed = flowjax.lm_sequence_losses(
        _lm_data.LM(), params, ex, cache_dir=cache, **kw
    )
    assert resumed == full
    assert (full.cached, resumed.cached) == (0, len(full.ids))
    assert sorted(_chunk_ids(pattern)) == sorted(before) == full.ids.tolist()
