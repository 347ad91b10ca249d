"""The pre-pass cache (``cache_dir``) never serves a stale row, and resumes cheaply.

Every test here fails on a cache whose fingerprint is the function's name and the
parameters' moments (flowjax before issue 10).
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax
from flowjax import _cache

from . import _data, _subprocess


def _table(batches, fn=_data.loss_fn, params=None, **kw):
    params = _data.params() if params is None else params
    kw.setdefault("step_size", 16)  # a step per batch: kills land between read steps
    return flowjax.per_example_losses(fn, params, batches, progress=False, **kw)


def _full_then(cache, fn=_data.loss_fn, **kw):
    """Fills ``cache`` with a complete pass of ``fn``; returns its table."""
    return _table(_data.batches(_data.dataset(), 16), fn=fn, cache_dir=cache, **kw)


class _Interrupted:
    """Batches that die after ``k`` batches, passing the skip protocol through."""

    def __init__(self, batches, k: int):
        self.batches, self.k = batches, k

    def cache_key(self):
        return getattr(self.batches, "cache_key", lambda: None)()

    def skip(self, ids):
        return _Interrupted(self.batches.skip(ids), self.k)

    def __iter__(self):
        for k, batch in enumerate(self.batches):
            if k == self.k:
                raise KeyboardInterrupt
            yield batch


def _interrupted(cache, stop_after: int):
    """A pre-pass that dies after ``stop_after`` batches, a chunk per finished step."""
    with pytest.raises(KeyboardInterrupt):
        batches = _Interrupted(_data.batches(_data.dataset(), 16), stop_after)
        _table(batches, cache_dir=cache, flush_seconds=0.0)


def _chunks(cache) -> list[str]:
    return sorted(glob.glob(os.path.join(cache, "*", "chunk-*.npz")))


def _cached_ids(cache) -> np.ndarray:
    return np.concatenate(
        [np.zeros(0, np.int64)] + [np.load(c)["ids"] for c in _chunks(cache)]
    )


# --- the six stale cases: another program, other parameters, other data ------------------


def _scaled_loss(p, example, scale):
    return scale * _data.loss_fn(p, example)


def test_partial_with_another_argument_is_refused(tmp_path):
    _full_then(str(tmp_path), fn=functools.partial(_scaled_loss, scale=1.0))
    with pytest.raises(_cache.CacheMismatchError, match="the program differs"):
        _full_then(str(tmp_path), fn=functools.partial(_scaled_loss, scale=2.0))
    # The same partial again resumes: everything served.
    again = _full_then(str(tmp_path), fn=functools.partial(_scaled_loss, scale=1.0))
    assert again.cached == _data.N_EXAMPLES


def test_another_lambda_is_refused(tmp_path):
    fns = [lambda p, ex: _data.loss_fn(p, ex), lambda p, ex: 2 * _data.loss_fn(p, ex)]
    assert fns[0].__qualname__ == fns[1].__qualname__
    _full_then(str(tmp_path), fn=fns[0])
    with pytest.raises(_cache.CacheMismatchError, match="the program differs"):
        _full_then(str(tmp_path), fn=fns[1])


def _module_function(source: str):
    """``loss`` defined by ``source`` in a module named ``user_losses`` (an edited file)."""
    namespace = {"__name__": "user_losses", "jnp": jnp, "base": _data.loss_fn}
    exec(source, namespace)
    return namespace["loss"]


def test_edited_function_body_with_the_same_name_is_refused(tmp_path):
    before = _module_function("def loss(p, ex):\n    return base(p, ex)\n")
    after = _module_function("def loss(p, ex):\n    return base(p, ex) + 1e-3\n")
    assert (before.__module__, before.__qualname__) == (
        after.__module__,
        after.__qualname__,
    )
    _full_then(str(tmp_path), fn=before)
    with pytest.raises(_cache.CacheMismatchError, match="the program differs"):
        _full_then(str(tmp_path), fn=after)


def test_another_closed_over_constant_is_refused(tmp_path):
    def loss_with(offset):
        return lambda p, ex: _data.loss_fn(p, ex) + jnp.sum(offset)

    big = np.zeros(50_000, np.float32)  # large constants are hashed too, byte for byte
    _full_then(str(tmp_path), fn=loss_with(big))
    changed = big.copy()
    changed[12_345] = 1e-7
    with pytest.raises(_cache.CacheMismatchError, match="the program differs"):
        _full_then(str(tmp_path), fn=loss_with(jnp.asarray(changed)))


def test_permuted_parameters_are_refused(tmp_path):
    _full_then(str(tmp_path))
    p = _data.params()
    permuted = {**p, "w1": p["w1"][::-1]}  # same sum and sum of squares
    with pytest.raises(
        _cache.CacheMismatchError,
        match=r"parameter values differ \(first at \['w1'\]\)",
    ):
        _full_then(str(tmp_path), params=permuted)


def test_parameters_nudged_by_1e_6_are_refused(tmp_path):
    _full_then(str(tmp_path))
    p = _data.params()
    nudged = {**p, "w2": p["w2"].at[3].add(1e-6)}
    assert not np.array_equal(nudged["w2"], p["w2"])
    with pytest.raises(
        _cache.CacheMismatchError,
        match=r"parameter values differ \(first at \['w2'\]\)",
    ):
        _full_then(str(tmp_path), params=nudged)


def test_new_data_under_cached_ids_is_recomputed_not_served(tmp_path):
    data = _data.dataset()
    _full_then(str(tmp_path))
    changed = {**data, "x": data["x"].copy(), "y": data["y"].copy()}
    changed["x"][[3, 50], 0] += 1.0
    changed["y"][100] = np.nextafter(changed["y"][100], np.float32(np.inf))  # one ulp
    fresh = _table(_data.batches(changed, 16))
    resumed = _table(_data.batches(changed, 16), cache_dir=str(tmp_path))
    assert resumed == fresh
    assert resumed.cached == _data.N_EXAMPLES - 3
    # The recomputed rows replaced the old ones: the new data is now served.
    again = _table(_data.batches(changed, 16), cache_dir=str(tmp_path))
    assert again == fresh and again.cached == _data.N_EXAMPLES


# --- fingerprints, unit by unit -----------------------------------------------------------


def test_row_digests_tell_apart_every_field_and_bit():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.arange(4, dtype=np.int32)
    base = _cache.row_digests([x, y], 4)
    assert base.shape == (4, 16) and base.dtype == np.uint8
    assert len({r.tobytes() for r in base}) == 4
    np.testing.assert_array_equal(_cache.row_digests([x.copy(), y.copy()], 4), base)
    flipped = x.copy()
    flipped.view(np.uint32)[2, 1] ^= 1  # one bit of one field of row 2
    changed = _cache.row_digests([flipped, y], 4)
    assert [bool((changed[i] != base[i]).any()) for i in range(4)] == [
        False,
        False,
        True,
        False,
    ]
    y2 = y.copy()
    y2[0] = 9
    assert (_cache.row_digests([x, y2], 4)[0] != base[0]).any()
    # Empty batches and empty fields have digests too.
    assert _cache.row_digests([x[:0], y[:0]], 0).shape == (0, 16)
    empty = _cache.row_digests([np.zeros((4, 0), np.float32)], 4)
    assert empty.shape == (4, 16) and len({r.tobytes() for r in empty}) == 1


def test_program_digest_sees_partial_arguments_bodies_and_constants():
    p, x = jnp.ones(3), np.ones(3, np.float32)

    def digest(f):
        return _cache.program_digest(jax.jit(f), p, x)

    def g(p, x, scale):
        return jnp.sum(x * p) * scale

    assert digest(functools.partial(g, scale=1.0)) != digest(
        functools.partial(g, scale=2.0)
    )
    assert digest(lambda p, x: jnp.sum(x * p)) != digest(lambda p, x: jnp.sum(x + p))
    for c in (np.arange(3.0), jnp.arange(3.0), jnp.arange(40_000.0)):
        nudged = c + 0 if isinstance(c, jax.Array) else c.copy()
        nudged = nudged.at[1].add(1e-3) if isinstance(c, jax.Array) else nudged
        if isinstance(c, np.ndarray):
            nudged[1] += 1e-3
        assert digest(lambda p, x, c=c: jnp.sum(x * p) + jnp.sum(c)) != digest(
            lambda p, x, c=nudged: jnp.sum(x * p) + jnp.sum(c)
        )
    # Deterministic: the same program twice gives the same digest.
    assert digest(functools.partial(g, scale=1.0)) == digest(
        functools.partial(g, scale=1.0)
    )


def test_params_digest_is_exact_and_names_each_leaf():
    p = _data.params()
    rows = _cache.params_digest(p)
    assert [r[:3] for r in rows] == [
        ["['b1']", [16], "float32"],
        ["['w1']", [6, 16], "float32"],
        ["['w2']", [16], "float32"],
    ]
    assert rows == _cache.params_digest(jax.tree.map(np.asarray, p))  # host or device
    perm = _cache.params_digest({**p, "w1": p["w1"][:, ::-1]})
    assert [a[3] == b[3] for a, b in zip(rows, perm, strict=True)] == [
        True,
        False,
        True,
    ]
    bf16 = _cache.params_digest({"w": p["w2"].astype(jnp.bfloat16)})
    assert bf16[0][2] == "bfloat16"


# --- corrupted files ----------------------------------------------------------------------


def test_chunk_with_a_wrong_checksum_is_recomputed_with_a_warning_naming_it(tmp_path):
    cache = str(tmp_path)
    expected = _table(_data.batches(_data.dataset(), 16))
    _interrupted(cache, stop_after=6)
    chunk, n_cached = _chunks(cache)[0], len(_cached_ids(cache))
    with np.load(chunk) as f:
        arrays = dict(f)
    key = (
        "values" if "values" in arrays else "losses"
    )  # (flowjax before issue 10: "losses")
    arrays[key] = arrays[key] + 1.0  # a well-formed file with wrong contents
    with open(chunk, "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(RuntimeWarning, match=f"{chunk}.*checksum does not match"):
        resumed = _table(_data.batches(_data.dataset(), 16), cache_dir=cache)
    assert resumed == expected
    assert resumed.cached == n_cached - len(
        arrays["ids"]
    )  # that chunk's rows recomputed


def test_truncated_chunk_is_recomputed_with_a_warning_naming_it(tmp_path):
    cache = str(tmp_path)
    expected = _table(_data.batches(_data.dataset(), 16))
    _interrupted(cache, stop_after=6)
    chunk = _chunks(cache)[-1]
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 2)
    with pytest.warns(RuntimeWarning, match=f"unreadable pre-pass cache chunk {chunk}"):
        assert _table(_data.batches(_data.dataset(), 16), cache_dir=cache) == expected


def _manifest(cache) -> str:
    (path,) = glob.glob(os.path.join(cache, "*", "manifest.json"))
    return path


def test_truncated_manifest_is_a_value_error_naming_it(tmp_path):
    cache = str(tmp_path)
    _interrupted(cache, stop_after=3)
    path = _manifest(cache)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=f"manifest {path} is truncated or corrupted"):
        _table(_data.batches(_data.dataset(), 16), cache_dir=cache)
    open(path, "w").close()
    with pytest.raises(ValueError, match=f"manifest {path} is truncated.*it is empty"):
        _table(_data.batches(_data.dataset(), 16), cache_dir=cache)


def test_corrupted_manifest_is_a_value_error_naming_it(tmp_path):
    cache = str(tmp_path)
    _interrupted(cache, stop_after=3)
    path = _manifest(cache)
    with open(path) as f:
        manifest = json.load(f)
    manifest["params"][0][3] = "0" * 32  # valid JSON, wrong contents
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=f"manifest {path} is corrupted: its checksum"):
        _table(_data.batches(_data.dataset(), 16), cache_dir=cache)


def test_read_only_partly_filled_cache_fails_before_reading_a_batch(
    tmp_path, monkeypatch
):
    cache = str(tmp_path / "cache")
    _interrupted(cache, stop_after=3)
    dirs = [cache, *glob.glob(os.path.join(cache, "*"))]
    for d in dirs:
        os.chmod(d, 0o555)
    try:
        probe = os.path.join(dirs[-1], "probe")
        try:  # root ignores permissions: then fail writes below cache like a read-only mount
            open(probe, "w").close()
            os.remove(probe)
            mkstemp = tempfile.mkstemp

            def read_only(*args, dir=None, **kw):
                if dir is not None and os.fspath(dir).startswith(cache):
                    raise OSError(errno.EROFS, "Read-only file system", dir)
                return mkstemp(*args, dir=dir, **kw)

            monkeypatch.setattr(tempfile, "mkstemp", read_only)
        except PermissionError:
            pass
        pulled = []

        def feed():
            for batch in _data.batches(_data.dataset(), 16):
                pulled.append(batch)
                yield batch

        with pytest.raises(ValueError, match=f"cache_dir '{cache}' is not writable"):
            _table(feed(), cache_dir=cache)
        assert not pulled  # nothing read, nothing computed
    finally:
        for d in dirs:
            os.chmod(d, 0o755)


# --- flush_seconds and the reported count ------------------------------------------------


def test_flush_seconds_sets_how_often_rows_become_durable(tmp_path):
    def batches():
        return _data.batches(_data.dataset(), 16)  # 13 steps

    _table(batches(), cache_dir=str(tmp_path / "each"), flush_seconds=0)
    assert len(_chunks(str(tmp_path / "each"))) == 13
    _table(batches(), cache_dir=str(tmp_path / "end"), flush_seconds=3600)
    assert len(_chunks(str(tmp_path / "end"))) == 1  # written when the pass ends
    for bad in (-1.0, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="flush_seconds must be a finite number"):
            _table(batches(), cache_dir=str(tmp_path / "bad"), flush_seconds=bad)


class _StableInterrupted(_Interrupted):
    """Dies after ``k`` batches; each batch has new arrays (fancy-indexed), as declared."""

    new_arrays = True


def test_bursts_with_a_cache_keep_every_step_dispatched_before_an_error(
    tmp_path, monkeypatch
):
    """Over batches nothing refills, a cached pass reads its steps in bursts that grow
    1, 2, 4, ... (within _BURST_SECONDS: made large here, so the sizes are exact). A pass
    that dies while preparing a burst still writes the burst in flight before it."""
    from flowjax import _engine

    monkeypatch.setattr(_engine, "_BURST_SECONDS", 1e9)
    data, cache = _data.dataset(), str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        # bursts of steps [0], [1, 2], [3 .. 6], then [7 .. 14] dies at batch 10
        _table(_StableInterrupted(_data.batches(data, 16), 10), cache_dir=cache)
    np.testing.assert_array_equal(
        np.sort(_cached_ids(cache)), np.sort(data["id"][:112])
    )
    resumed = _table(list(_data.batches(data, 16)), cache_dir=cache)
    assert resumed == _table(_data.batches(data, 16)) and resumed.cached == 112


def test_bursts_with_a_cache_keep_every_finite_step_around_a_nan_one(tmp_path):
    """A NaN loss is an error naming its ids; every other finished step (before it and
    after it in flight) is written, so only the bad batch is computed again."""
    data, cache = _data.dataset(), str(tmp_path)
    data["x"][8 * 16 + 3] = np.nan  # in batch 8 of 13
    with pytest.raises(
        ValueError,
        match=rf"NaN or infinite losses for example ids \[{data['id'][131]}\]",
    ):
        _table(list(_data.batches(data, 16)), cache_dir=cache)
    expected = np.sort(np.concatenate([data["id"][:128], data["id"][144:]]))
    np.testing.assert_array_equal(np.sort(_cached_ids(cache)), expected)
    # With the whole-pass flush (one chunk at the end) too.
    other = str(tmp_path / "end")
    with pytest.raises(ValueError, match="NaN or infinite"):
        _table(list(_data.batches(data, 16)), cache_dir=other, flush_seconds=3600)
    np.testing.assert_array_equal(np.sort(_cached_ids(other)), expected)
    assert len(_chunks(other)) == 1


def test_a_loss_that_couples_rows_leaves_no_row_in_the_cache(tmp_path):
    """The rows check fails on the first step: its rows (wrong per example) are not kept."""
    for batches in (
        list(_data.batches(_data.dataset(), 16)),
        _data.batches(_data.dataset(), 16),
    ):
        cache = tempfile.mkdtemp(dir=tmp_path)
        with pytest.raises(ValueError, match="couples the rows"):
            _table(batches, fn=_data.coupled_batch_loss, batched=True, cache_dir=cache)
        assert len(_cached_ids(cache)) == 0


@pytest.mark.parametrize("flush_seconds", [0.0, 5.0])
def test_a_repeated_id_with_a_cache_is_an_error_in_every_pass(tmp_path, flush_seconds):
    """Ids are checked in groups with a cache too: the rows of both examples may be written
    before the error, but a later pass over the same batches checks every id fed (served
    ones too) and fails again; nothing is served in its place."""
    data = _data.dataset()
    data["id"][150] = data["id"][3]  # batch 9 repeats an id of batch 0
    for _ in range(3):
        with pytest.raises(ValueError, match=rf"{data['id'][3]}"):
            _table(
                list(_data.batches(data, 16)),
                cache_dir=str(tmp_path),
                flush_seconds=flush_seconds,
            )


def test_empty_batches_pass_through_the_cache(tmp_path):
    data = _data.dataset()
    batches = list(_data.batches(data, 16))
    with_empty = [batches[0], {k: v[:0] for k, v in batches[0].items()}, *batches[1:]]
    expected = _table(batches)
    assert _table(with_empty, cache_dir=str(tmp_path)) == expected
    assert _table(with_empty, cache_dir=str(tmp_path)).cached == _data.N_EXAMPLES


def test_table_reports_how_many_rows_came_from_the_cache(tmp_path):
    cache = str(tmp_path)
    assert _table(_data.batches(_data.dataset(), 16)).cached == 0
    _interrupted(cache, stop_after=5)
    n_cached = len(_cached_ids(cache))
    assert 0 < n_cached < _data.N_EXAMPLES
    resumed = _table(_data.batches(_data.dataset(), 16), cache_dir=cache)
    assert resumed.cached == n_cached
    # Nothing recomputed: the resumed run wrote exactly the rows that were missing.
    np.testing.assert_array_equal(np.sort(_cached_ids(cache)), resumed.ids)


# --- skipping cached rows at the source ----------------------------------------------------


def _source(data=None):
    """The test data with a copy of the ids in field ``i``, so that map_fn sees them."""
    data = _data.dataset() if data is None else data
    return flowjax.ArraySource({**data, "i": data["id"]})


def _mapped(src, seen: list, extra=0.0):
    """Batches of ``src`` through a map_fn (the expensive part) that records the ids it reads.

    ``seen`` is part of map_fn's closure, so of the batches' cache key: pass an
    empty list each time.
    """

    def map_fn(example, rng):
        seen.append(int(example["i"]))
        return {"x": example["x"] + extra, "y": example["y"]}

    return flowjax.batches(src, 16, shard=(0, 1), fields=["x", "y", "i"], map_fn=map_fn)


def test_resume_over_an_array_source_does_not_read_cached_rows(tmp_path):
    cache, src = str(tmp_path), _source()
    expected = _table(_mapped(src, []))
    with pytest.raises(KeyboardInterrupt):
        _table(_Interrupted(_mapped(src, []), 7), cache_dir=cache, flush_seconds=0)
    cached = _cached_ids(cache)
    assert 0 < len(cached) < _data.N_EXAMPLES
    seen = []
    resumed = _table(_mapped(src, seen), cache_dir=cache)
    assert resumed == expected
    read_again = set(seen) & set(cached.tolist())
    first_batch = set(src.columns["id"][:16].tolist())
    assert read_again <= first_batch  # only the first batch, which fixes the layout
    assert len(seen) == _data.N_EXAMPLES - len(cached) + len(read_again)
    assert resumed.cached == len(cached)


def test_changed_source_data_or_map_fn_is_read_and_recomputed(tmp_path):
    cache, src = str(tmp_path), _source()
    seen = []
    full = _table(_mapped(src, seen), cache_dir=cache)
    assert len(seen) == _data.N_EXAMPLES
    seen = []
    again = _table(_mapped(src, seen), cache_dir=cache)
    assert len(seen) == 16  # only the first batch was read
    assert full.cached == 0 and again.cached == _data.N_EXAMPLES
    # New values under the same ids: the key differs, and the key was all that vouched
    # for the cached rows (columns in memory: no per-example digests), so every row is
    # read and recomputed.
    data = _data.dataset()
    data["x"] = data["x"].copy()
    data["x"][7] += 1.0
    changed = _source(data)
    seen = []
    table = _table(_mapped(changed, seen), cache_dir=cache)
    assert len(seen) == _data.N_EXAMPLES
    assert table == _table(_mapped(changed, []))
    assert table.cached == 0
    # ... and the rows written under the new key now serve it.
    again = _table(_mapped(changed, []), cache_dir=cache)
    assert again == table and again.cached == _data.N_EXAMPLES
    # Another map_fn (same code, another constant): read, and every row recomputed.
    seen = []
    table = _table(_mapped(changed, seen, extra=0.5), cache_dir=cache)
    assert len(seen) == _data.N_EXAMPLES and table.cached == 0
    assert table == _table(_mapped(changed, [], extra=0.5))


def _digested(cache) -> np.ndarray:
    """Each cached row's "has a digest" flag, chunk by chunk (True where a chunk has no field)."""
    out = []
    for c in _chunks(cache):
        with np.load(c) as f:
            out.append(
                f["digested"] if "digested" in f.files else np.ones(len(f["ids"]), bool)
            )
    return np.concatenate(out)


def _plain_batches(data, batch_size=16):
    """The batches of ``_keyed(data)`` as a list: no cache key."""
    return list(_data.batches(data, batch_size))


def _keyed(data=None):
    return flowjax.batches(_source(data), 16, shard=(0, 1), fields=["x", "y"])


def test_rows_vouched_for_by_the_key_have_no_digest_and_are_not_served_to_other_loaders(
    tmp_path,
):
    """Over columns in memory the key hashes every byte: no row digests (they cost more
    than a cheap model's forward); a loader without that key cannot use such rows."""
    cache, data = str(tmp_path), _data.dataset()
    keyed = _keyed(data)
    assert keyed.key_hashes_data()
    expected = _table(keyed, cache_dir=cache)
    assert not _digested(cache).any()
    for c in _chunks(cache):  # nothing is stored for the rows without a digest
        with np.load(c) as f:
            assert f["digests"].shape == (0, 16)
    # A list of the same batches has no key: nothing vouches for the cached rows.
    lists = _table(_plain_batches(data), cache_dir=cache)
    assert lists == expected and lists.cached == 0
    # Its rows were digested; the keyed batches are served by key (rows of their key,
    # even the first batch, which is read) without reading the rest.
    assert _digested(cache).sum() == _data.N_EXAMPLES
    assert _table(keyed, cache_dir=cache).cached == _data.N_EXAMPLES


def test_digested_rows_are_served_to_keyed_batches_whose_key_never_saw_them(tmp_path):
    """Rows from a loader without a key keep digests; batches with a key (new to the cache)
    digest what they read to serve them, and only a changed example is recomputed."""
    cache, data = str(tmp_path), _data.dataset()
    expected = _table(_plain_batches(data), cache_dir=cache)
    assert _digested(cache).all() and expected.cached == 0
    changed = {**data, "x": data["x"].copy()}
    changed["x"][7] += 1.0
    seen = []
    table = _table(_mapped(_source(changed), seen), cache_dir=cache)
    assert len(seen) == _data.N_EXAMPLES  # read: the key never saw these rows
    assert table == _table(_mapped(_source(changed), []))
    assert table.cached == _data.N_EXAMPLES - 1


def test_a_chunk_whose_digested_flags_are_edited_is_recomputed_with_a_warning(tmp_path):
    cache = str(tmp_path)
    keyed = _keyed()
    expected = _table(keyed, cache_dir=cache)
    (path,) = _chunks(cache)
    with np.load(path) as f:
        fields = {k: f[k] for k in f.files}
    fields["digested"] = fields["digested"].copy()
    fields["digested"][3] = True  # a digest of zeros would now be trusted
    np.savez(path, **fields)
    with pytest.warns(RuntimeWarning, match="ignoring unreadable.*checksum"):
        again = _table(keyed, cache_dir=cache)
    assert again == expected and again.cached == 0


class _Records:
    """A random-access source of records read one by one, counting the reads."""

    def __init__(self, data, cache_key=None):
        self.data, self.reads = data, []
        if cache_key is not None:
            self.cache_key = cache_key

    def __len__(self):
        return len(self.data["x"])

    def __getitem__(self, i):
        self.reads.append(int(i))
        return {"x": self.data["x"][i], "y": self.data["y"][i]}


def test_resume_over_a_declared_record_source_does_not_read_cached_records(tmp_path):
    data, cache = _data.dataset(), str(tmp_path)

    def run(source, **kw):
        return _table(flowjax.batches(source, 16, shard=(0, 1)), cache_dir=cache, **kw)

    full = run(_Records(data, cache_key="my-data v1"))
    src = _Records(data, cache_key="my-data v1")
    again = run(src)
    assert sorted(set(src.reads)) == list(range(16))  # the first batch only
    assert again == full and again.cached == _data.N_EXAMPLES
    # Undeclared: every record is read again (then served by its digest).
    src = _Records(data)
    assert run(src).cached == _data.N_EXAMPLES
    assert len(src.reads) == _data.N_EXAMPLES + 1  # (+1: batches reads record 0 first)
    # A new declared version: read and checked again.
    src = _Records(data, cache_key="my-data v2")
    assert (
        run(src).cached == _data.N_EXAMPLES and len(set(src.reads)) == _data.N_EXAMPLES
    )


def test_cache_key_and_skip_of_batches():
    src = _source()
    plain = flowjax.batches(src, 16, shard=(0, 1))
    assert plain.cache_key() == flowjax.batches(_source(), 32, shard=(0, 1)).cache_key()
    assert (
        plain.cache_key()
        != flowjax.batches(src, 16, fields=["x"], shard=(0, 1)).cache_key()
    )
    ids = src.columns["id"]
    rest = plain.skip(ids[10:100])
    assert set(rest.skipped.tolist()) == set(
        ids[16:100].tolist()
    )  # not the first batch
    got = np.concatenate([b["id"] for b in rest])
    assert sorted(got.tolist()) == sorted(set(ids.tolist()) - set(ids[16:100].tolist()))
    assert len(rest) == -(-len(got) // 16)
    # A source that is not in memory cannot vouch for its records.
    records = [{"x": np.float32(i)} for i in range(5)]
    assert flowjax.batches(records, 2, shard=(0, 1)).cache_key() is None
    # Declared, but its ids are in the records: unknown without reading them.
    declared = _Records({"x": np.zeros(5), "y": np.zeros(5)}, cache_key="v1")
    assert flowjax.batches(declared, 2, shard=(0, 1)).cache_key() is not None
    # ... a declared key does not hash the records: rows keep their digests.
    assert not flowjax.batches(declared, 2, shard=(0, 1)).key_hashes_data()
    assert plain.key_hashes_data()
    with_ids = _Records({"x": np.zeros(5), "y": np.arange(5)}, cache_key="v1")
    assert flowjax.batches(with_ids, 2, shard=(0, 1), id_key="y").cache_key() is None
    # A map_fn reaching an object with state cannot be fingerprinted.
    state = object()
    stateful = flowjax.batches(
        src, 4, shard=(0, 1), map_fn=lambda ex, rng: {"x": ex["x"], "s": state}
    )
    assert stateful.cache_key() is None and not stateful.key_hashes_data()


def test_fn_fingerprint_follows_code_closures_and_globals():
    def make(k):
        return lambda ex, rng: {"x": ex["x"] * k}

    assert _cache.fn_fingerprint(make(1)) == _cache.fn_fingerprint(make(1))
    assert _cache.fn_fingerprint(make(1)) != _cache.fn_fingerprint(make(2))
    a = _module_function("def loss(p, ex):\n    return base(p, ex)\n")
    b = _module_function("def loss(p, ex):\n    return base(p, ex) * 2\n")
    assert _cache.fn_fingerprint(a) != _cache.fn_fingerprint(b)
    assert _cache.fn_fingerprint(make(np.ones(3))) != _cache.fn_fingerprint(
        make(np.zeros(3))
    )
    assert _cache.fn_fingerprint(make(object())) is None


# --- parameters spread over hosts ---------------------------------------------------------


@pytest.mark.slow
def test_parameters_spread_over_two_processes_are_fingerprinted_on_both(tmp_path):
    cache = str(tmp_path / "cache")
    args = ("--devices", "2", "--shard-params", "--cache", cache)

    def run(tag, *extra, rc=0):
        outs = [str(tmp_path / f"{tag}-{i}.npz") for i in range(2)]
        procs = _subprocess.start_two(outs, *args, *extra)
        logs = [_subprocess.finish(p, expect_rc=rc) for p in procs]
        return logs if rc else [flowjax.LossTable.load(o) for o in outs]

    full = run("full")
    assert run("again") == full  # the same sharded parameters: the cache resumes
    # w1's columns are spread over the 4 devices; column 15 lives on process 1 only.
    for log in run("nudged", "--nudge-w1-column", "15", rc=1):
        assert "parameter values differ (first at ['w1'])" in log


_SCALE = 1.0  # a module global the loss below reads (changed by the test)


def _global_scaled_loss(w, ex):
    return _SCALE * jnp.sum(ex["x"] * w)


def test_a_global_the_loss_reads_changed_between_passes_is_never_stale(
    tmp_path, monkeypatch
):
    # jax.jit alone reuses its trace of the same function object after a global it
    # read has changed; the pre-pass must compute (and cache) the new program instead.
    batches = [{"id": np.arange(4), "x": np.ones((4, 2), np.float32)}]
    run = functools.partial(
        flowjax.per_example_losses,
        _global_scaled_loss,
        jnp.ones(2),
        batches,
        progress=False,
    )
    assert run().losses.tolist() == [2.0] * 4
    cache = str(tmp_path / "cache")
    assert run(cache_dir=cache).cached == 0
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 2.0)
    assert run().losses.tolist() == [4.0] * 4  # recomputed, not the old trace
    with pytest.raises(ValueError, match="the program differs"):
        run(cache_dir=cache)
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 1.0)
    again = run(cache_dir=cache)  # the original program: served from its cache
    assert again.cached == 4 and again.losses.tolist() == [2.0] * 4


def _refilling_loader(reuse: bool, n_batches: int = 8, size: int = 4):
    """Batches whose example i has loss 2i; with ``reuse`` the same arrays are refilled."""
    ids, x = np.zeros(size, np.int64), np.zeros((size, 2), np.float32)
    for b in range(n_batches):
        if not reuse:
            ids, x = np.zeros(size, np.int64), np.zeros((size, 2), np.float32)
        ids[:] = np.arange(b * size, (b + 1) * size)
        x[:] = ids[:, None]
        yield {"id": ids, "x": x}


def test_a_loader_that_refills_its_arrays_gets_right_rows_and_leaves_a_right_cache(
    tmp_path,
):
    # The ids are read steps after their batch was fed: a loader that refills its
    # buffers must not shift them (nor leave shifted rows for a later run to serve).
    def loss(w, ex):
        return jnp.sum(ex["x"] * w)

    cache = str(tmp_path / "cache")
    kw = {"progress": False, "cache_dir": cache, "flush_seconds": 0.0}
    first = flowjax.per_example_losses(loss, jnp.ones(2), _refilling_loader(True), **kw)
    assert first.ids.tolist() == list(range(32))
    np.testing.assert_array_equal(first.losses, 2 * first.ids)
    again = flowjax.per_example_losses(
        loss, jnp.ones(2), _refilling_loader(False), **kw
    )
    assert again.cached == 32 and again == first


def test_a_model_closed_over_and_changed_in_place_is_never_stale(tmp_path):
    # An nnx.Module read from a closure can change in place, unseen by jax.jit: its
    # arrays are part of the step's key, so the new weights give a new trace (and so a
    # new program hash: the cache of the old weights is refused).
    from flax import nnx

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))

    def loss(_, ex):
        return jnp.sum(model(ex["x"]) ** 2)

    batches = [{"id": np.arange(3), "x": np.ones((3, 2), np.float32)}]
    cache = str(tmp_path / "cache")
    before = flowjax.per_example_losses(
        loss, {}, batches, progress=False, cache_dir=cache
    )
    model.kernel[...] = model.kernel[...] * 10
    truth = float(jnp.sum(model(batches[0]["x"][0]) ** 2))
    after = flowjax.per_example_losses(loss, {}, batches, progress=False)
    np.testing.assert_allclose(after.losses, truth, rtol=1e-6)
    assert not np.allclose(after.losses, before.losses)
    with pytest.raises(ValueError, match="the program differs"):
        flowjax.per_example_losses(loss, {}, batches, progress=False, cache_dir=cache)


def test_fingerprints_of_functions_reading_object_arrays():
    vocabulary = np.array(["a", "b"], dtype=object)  # no bytes to hash

    def loss(w, ex):
        return jnp.sum(ex["x"] * w) * len(vocabulary)

    assert _cache.fn_fingerprint(loss) is None
    batches = [{"id": np.arange(3), "x": np.ones((3, 2), np.float32)}]
    table = flowjax.per_example_losses(loss, jnp.ones(2), batches, progress=False)
    assert table.losses.tolist() == [4.0] * 3


def test_row_digests_are_xxh3_of_each_row_and_see_every_field():
    import xxhash

    from flowjax import _cache

    rng = np.random.default_rng(3)
    big = rng.normal(size=(5, 70)).astype(np.float32)  # 280 bytes: digested on its own
    small = rng.integers(0, 9, size=(5, 3)).astype(np.int32)
    one = _cache.row_digests([big], 5)
    for i in range(5):  # one field: XXH3-128 of the row's bytes, as xxhash computes it
        assert one[i].tobytes() == xxhash.xxh3_128_digest(big[i].tobytes())
    both = _cache.row_digests([big, small], 5)
    for field, (r, c) in [(0, (2, 69)), (1, (4, 0))]:  # a change in either field
        changed = [big.copy(), small.copy()]
        changed[field][r, c] += 1
        again = _cache.row_digests(changed, 5)
        assert (again[r] != both[r]).any()
        np.testing.assert_array_equal(np.delete(again, r, 0), np.delete(both, r, 0))


def test_program_digest_is_remembered_per_step_and_argument_layout():
    """A second digest of the same jitted step and argument layout skips the lowering."""

    def f(p, x):
        return x @ p

    step = jax.jit(f)
    lowered = []
    real_lower = step.lower

    class Spy:  # counts lowerings; jit objects cannot be patched in place
        def lower(self, *a):
            lowered.append(1)
            return real_lower(*a)

    spy = Spy()
    p, x = jnp.ones(3), np.ones((4, 3), np.float32)
    first = _cache.program_digest(spy, p, x)
    assert _cache.program_digest(spy, p, x) == first and len(lowered) == 1
    # Another shape or dtype is another program: lowered again, another digest.
    assert _cache.program_digest(spy, p, np.ones((5, 3), np.float32)) != first
    assert _cache.program_digest(spy, p.astype(jnp.bfloat16), x) != first
    assert len(lowered) == 3
    # The same digest as an unremembered step's.
    assert _cache.program_digest(jax.jit(f), p, x) == first


def test_params_digest_remembers_jax_arrays_and_hashes_numpy_leaves_every_time():
    import gc

    x, n = jnp.arange(4.0), np.arange(4.0)
    first = _cache.params_digest({"a": x, "b": n})
    n[0] = 9.0  # a numpy leaf can change in place: hashed again
    second = _cache.params_digest({"a": x, "b": n})
    assert first[0] == second[0] and first[1] != second[1]
    ref, digest = _cache._LEAVES[id(x)]
    assert ref() is x and digest == first[0][3]
    # By bytes, not by identity: another array of the same bytes, the same digest.
    assert _cache.params_digest({"a": jnp.arange(4.0), "b": n}) == second
    assert _cache.params_digest({"a": jnp.arange(4.0) + 1, "b": n})[0] != second[0]
    key = id(x)
    del x
    gc.collect()
    assert ref() is None
    assert key not in _cache._LEAVES or _cache._LEAVES[key][0] is not ref
