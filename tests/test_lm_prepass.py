"""The LM pre-pass: bucketing, one trace per bucket length, values against an unpadded numpy reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax

V, D = 13, 4


def _params(rng):
    return {
        "E": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
        "W": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
    }


class CountingLM:
    """A causal model, h_t = Σ_{s<=t} E[x_s], logits = h W, that counts its traces."""

    def __init__(self):
        self.calls = 0

    def __call__(self, params, tokens):
        self.calls += 1
        return jnp.cumsum(params["E"][tokens], axis=0) @ params["W"]


def _np_token_losses(params, tokens, mask):
    """Unpadded reference: shifted NLL of the target tokens of one example, float64."""
    e, w = np.asarray(params["E"], np.float64), np.asarray(params["W"], np.float64)
    z = np.cumsum(e[tokens], axis=0) @ w
    z = z[:-1] - z[:-1].max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    nll = -logp[np.arange(len(tokens) - 1), tokens[1:]]
    return nll, mask[1:]


def _examples(rng, lengths):
    out = []
    for i, n in enumerate(lengths):
        prompt = int(rng.integers(1, n))
        out.append(
            {
                "id": 100 + 7 * i,
                "tokens": rng.integers(0, V, size=n),
                "mask": flowjax.response_mask([n], [prompt], n)[0],
            }
        )
    return out


def test_bucket_batches_groups_pads_and_validates(rng):
    ex = _examples(rng, [3, 9, 5, 4, 16, 2, 8])
    batches = list(flowjax.bucket_batches(ex, [16, 4, 8], 2, pad_id=-1))
    assert [b["tokens"].shape for b in batches] == [
        (2, 4),
        (1, 4),
        (2, 8),
        (2, 16),
    ]
    by_id = {e["id"]: e for e in ex}
    for b in batches:
        for r, i in enumerate(b["id"]):
            n = len(by_id[i]["tokens"])
            assert b["tokens"].shape[1] == min(x for x in (4, 8, 16) if x >= n)
            np.testing.assert_array_equal(b["tokens"][r, :n], by_id[i]["tokens"])
            assert (b["tokens"][r, n:] == -1).all() and not b["mask"][r, n:].any()
            np.testing.assert_array_equal(b["mask"][r, :n], by_id[i]["mask"])
    with pytest.raises(
        ValueError,
        match=r"longer than the longest bucket 8: \(id, length\) \[\(107, 9\)",
    ):
        flowjax.bucket_batches(ex, [4, 8], 2)
    empty = [*ex, {"id": 1, "tokens": np.arange(3), "mask": np.zeros(3, bool)}]
    with pytest.raises(ValueError, match=r"no target token \(ids \[1\]"):
        flowjax.bucket_batches(empty, [16], 2)
    kept = [
        i
        for b in flowjax.bucket_batches(empty, [16], 2, on_empty="skip")
        for i in b["id"]
    ]
    assert sorted(kept) == sorted(e["id"] for e in ex)
    first = [{"id": 5, "tokens": np.arange(3), "mask": np.array([True, True, False])}]
    with pytest.raises(ValueError, match="position 0"):
        flowjax.bucket_batches(first, [4], 1)
    with pytest.raises(ValueError, match='"id", "tokens" and "mask"'):
        flowjax.bucket_batches([{"id": 1, "tokens": np.arange(3)}], [4], 1)


def test_sequence_prepass_traces_once_per_bucket_and_matches_reference(rng):
    lengths = [int(n) for n in rng.integers(2, 17, size=40)]
    lengths += [3, 7, 15]  # every bucket holds examples
    ex = _examples(rng, lengths)
    params, lm = _params(rng), CountingLM()
    table = flowjax.lm_sequence_losses(
        lm, params, ex, bucket_lengths=(4, 8, 16), batch_size=3, progress=False
    )
    assert lm.calls == 3  # one trace per bucket length, not per batch or example
    expect = {}
    for e in ex:
        nll, m = _np_token_losses(params, e["tokens"], e["mask"])
        expect[e["id"]] = nll[m].mean()
    assert table.ids.tolist() == sorted(expect)
    np.testing.assert_allclose(table.losses, [expect[i] for i in table.ids], rtol=2e-5)
    assert table.median_temperature() == pytest.approx(
        np.median(list(expect.values())), rel=2e-5
    )
    flowjax.lm_sequence_losses(
        lm, params, ex[::-1], bucket_lengths=(4, 8, 16), batch_size=3, progress=False
    )
    assert lm.calls == 3  # a second pass reuses the compiled steps


def test_token_prepass_traces_once_per_bucket_and_gives_token_weights(rng):
    ex = _examples(rng, [int(n) for n in rng.integers(2, 13, size=25)])
    params, lm = _params(rng), CountingLM()
    tl = flowjax.lm_token_losses(lm, params, ex, bucket_lengths=(6, 12), batch_size=4)
    assert lm.calls == 2
    assert tl.losses.shape == tl.mask.shape == (25, 11)
    all_targets = []
    for e in ex:
        nll, m = _np_token_losses(params, e["tokens"], e["mask"])
        row_l, row_m = tl.lookup([e["id"]]), tl.lookup_mask([e["id"]])
        n = len(e["tokens"]) - 1
        np.testing.assert_array_equal(row_m[0, :n], m)
        assert not row_m[0, n:].any()
        np.testing.assert_allclose(row_l[0, :n][m], nll[m], rtol=2e-5, atol=1e-6)
        all_targets.append(nll[m])
    w, tau = flowjax.token_flow_weights(tl.losses, tl.mask), tl.median_temperature()
    flat = np.concatenate(all_targets)
    assert tau == pytest.approx(np.median(flat), rel=2e-5)
    assert w[tl.mask].size == flat.size and (w[~tl.mask] == 0).all()
    np.testing.assert_allclose(
        np.sort(w[tl.mask]), np.sort(np.exp(-flat / np.median(flat))), rtol=1e-4
    )
    # lookup() re-pads to a training batch's length, and refuses to cut targets
    some = [e for e in ex if len(e["tokens"]) <= 6][:2]
    cut_l = tl.lookup([e["id"] for e in some], length=6)
    assert cut_l.shape == (len(some), 5)
    long = next(e for e in ex if e["mask"][7:].any())
    with pytest.raises(ValueError, match="cuts off"):
        tl.lookup([long["id"]], length=6)
    with pytest.raises(ValueError, match="not in this TokenLosses"):
        tl.lookup([99999])


def _token_table(rng):
    ex = _examples(rng, [int(n) for n in rng.integers(2, 13, size=17)])
    params = _params(rng)
    return ex, flowjax.lm_token_losses(
        CountingLM(), params, ex, bucket_lengths=(6, 12), batch_size=4
    )


@pytest.mark.parametrize("temperature", [None, 0.7])
def test_token_weights_rows_line_up_by_id_with_a_shuffled_batch(rng, temperature):
    ex, tl = _token_table(rng)
    tw = tl.flow_weights(temperature)
    assert isinstance(tw, flowjax.TokenWeights)
    # numpy reference: τ over every target token of every example, w = m exp(-nll/τ)
    flat = tl.losses[tl.mask]
    tau = np.median(flat) if temperature is None else temperature
    assert tw.temperature == pytest.approx(tau, rel=1e-6)
    ref = np.where(tl.mask, np.exp(-tl.losses.astype(np.float64) / tau), 0.0)
    np.testing.assert_allclose(tw.weights, ref, rtol=1e-6)
    np.testing.assert_array_equal(tw.ids, tl.ids)
    np.testing.assert_array_equal(tw.mask, tl.mask)
    # A training batch in shuffled order, padded to its own length T = 12.
    order = rng.permutation(len(ex))
    batch_ids = np.array([ex[i]["id"] for i in order])
    w, m = tw.lookup(batch_ids, length=12), tw.lookup_mask(batch_ids, length=12)
    assert w.shape == m.shape == (len(ex), 11)
    for r, i in enumerate(order):
        e = ex[i]
        n = len(e["tokens"]) - 1
        np.testing.assert_array_equal(m[r, :n], e["mask"][1:])  # its own target mask
        row = ref[np.searchsorted(tl.ids, e["id"])]
        np.testing.assert_allclose(w[r], row[:11], rtol=1e-6)
        assert (w[r, n:] == 0).all() and (w[r][~m[r]] == 0).all()
    # the same mask rows as TokenLosses.lookup_mask; temperature=None is the median
    lm = tl.lookup_mask(batch_ids, length=12)
    np.testing.assert_array_equal(lm, m)
    np.testing.assert_array_equal(
        tl.flow_weights().weights, tl.flow_weights(tl.median_temperature()).weights
    )
    with pytest.raises(ValueError, match="not in this TokenWeights"):
        tw.lookup([99999])
    with pytest.raises(ValueError, match="temperature"):
        tl.flow_weights(-1.0)


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_rows_rejects_a_length_below_two_or_not_an_int(rng, bad):
    _, tl = _token_table(rng)
    for table in (tl, tl.flow_weights()):
        with pytest.raises(ValueError, match=r"length must be an int >= 2"):
            table.lookup(tl.ids[:2], length=bad)


def test_token_prepass_puts_params_on_device_once_and_pipelines(rng, monkeypatch):
    """Params are placed on the device once (not sent from host numpy every step), and the
    host reads step k only after step k + _IN_FLIGHT is dispatched."""
    from flowjax import _engine

    ex = _examples(rng, [5] * 9)
    params = jax.tree.map(np.asarray, _params(rng))  # host numpy params
    events, seen = [], []
    make_step = _engine._make_step

    def spy_make_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def spy_step(p, *rest):
            seen.append([leaf for leaf in jax.tree.leaves(p)])
            out = step(p, *rest)
            events.append(("dispatch", len(events)))
            return _Fetch(out, events)

        return spy_step

    monkeypatch.setattr(_engine, "_make_step", spy_make_step)
    tl = flowjax.lm_token_losses(
        CountingLM(), params, ex, bucket_lengths=[8], batch_size=1, progress=False
    )
    # device arrays, and the very same ones every step (put on the device once)
    assert all(isinstance(leaf, jax.Array) for leaf in seen[0])
    assert all(a is b for leaves in seen for a, b in zip(leaves, seen[0], strict=True))
    kinds = [k for k, _ in events]
    assert kinds.count("dispatch") == kinds.count("read") == 9
    # the first read comes only after _IN_FLIGHT + 1 dispatches
    assert kinds[: _engine._IN_FLIGHT + 1] == ["dispatch"] * (_engine._IN_FLIGHT + 1)
    monkeypatch.undo()
    ref = flowjax.lm_token_losses(
        CountingLM(), params, ex, bucket_lengths=[8], batch_size=1, progress=False
    )
    np.testing.assert_array_equal(tl.losses, ref.losses)
    np.testing.assert_array_equal(tl.mask, ref.mask)


class _Fetch:
    """Wraps a step's output; records when the host reads it."""

    def __init__(self, out, events):
        self.out, self.events = out, events

    def __array__(self, dtype=None, copy=None):
        self.events.append(("read", len(self.events)))
        return np.asarray(self.out, dtype)


def test_prepass_names_examples_with_nan_losses(rng):
    ex = _examples(rng, [5, 6, 7])
    params = _params(rng)
    bad = {"E": params["E"].at[ex[1]["tokens"][0]].set(jnp.nan), "W": params["W"]}
    with pytest.raises(ValueError, match="NaN"):
        flowjax.lm_sequence_losses(
            CountingLM(), bad, ex, bucket_lengths=[8], batch_size=2, progress=False
        )
    with pytest.raises(ValueError, match="NaN"):
        flowjax.lm_token_losses(CountingLM(), bad, ex, bucket_lengths=[8], batch_size=2)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_an_example_stream_that_repeats_fails_within_one_pass(rng, level):
    ex = _examples(rng, [5, 6, 7, 3])
    pulled = []

    def endless():
        for e in itertools.cycle(ex):
            pulled.append(e["id"])
            assert len(pulled) <= 5, "the pass pulled more than one pass and an example"
            yield e

    fn = flowjax.lm_sequence_losses if level == "sequence" else flowjax.lm_token_losses
    with pytest.raises(
        ValueError,
        match=rf"duplicate example ids: \[{ex[0]['id']}\] .*this loader repeats examples",
    ):
        fn(
            CountingLM(),
            _params(rng),
            endless(),
            bucket_lengths=[8],
            batch_size=2,
            progress=False,
        )
    assert len(pulled) == 5


class BatchedCountingLM(CountingLM):
    """CountingLM written for a batch: tokens ``[B, T]`` -> logits ``[B, T, V]``."""

    def __call__(self, params, tokens):
        self.calls += 1
        return jnp.cumsum(params["E"][tokens], axis=1) @ params["W"]


def test_batched_logits_fn_gives_the_per_sequence_results_once_per_bucket(rng):
    ex = _examples(rng, [int(n) for n in rng.integers(2, 17, size=30)] + [3, 7, 15])
    params, kw = _params(rng), {"bucket_lengths": (4, 8, 16), "progress": False}
    lm = BatchedCountingLM()
    seq = flowjax.lm_sequence_losses(lm, params, ex, batch_size=3, batched=True, **kw)
    assert lm.calls == 3  # one trace per bucket (the first-step check reuses it)
    tok = flowjax.lm_token_losses(lm, params, ex, batch_size=3, batched=True, **kw)
    assert lm.calls == 6
    per_seq = flowjax.lm_sequence_losses(CountingLM(), params, ex, batch_size=3, **kw)
    per_tok = flowjax.lm_token_losses(CountingLM(), params, ex, batch_size=3, **kw)
    np.testing.assert_array_equal(seq.ids, per_seq.ids)
    np.testing.assert_allclose(seq.losses, per_seq.losses, rtol=1e-6)
    np.testing.assert_array_equal(tok.mask, per_tok.mask)
    np.testing.assert_allclose(tok.losses, per_tok.losses, rtol=1e-6, atol=1e-7)
    for e in ex:  # and the unpadded float64 reference
        nll, m = _np_token_losses(params, e["tokens"], e["mask"])
        assert seq.lookup([e["id"]])[0] == pytest.approx(nll[m].mean(), rel=2e-5)


def test_batched_logits_fn_that_mixes_sequences_is_refused(rng):
    ex = _examples(rng, [5, 6, 7, 8, 5, 6])

    def mixing(params, tokens):  # every sequence sees the batch's mean embedding
        h = jnp.cumsum(params["E"][tokens], axis=1)
        return (h + jnp.mean(h, axis=0, keepdims=True)) @ params["W"]

    with pytest.raises(ValueError, match="couples the rows"):
        flowjax.lm_sequence_losses(
            mixing,
            _params(rng),
            ex,
            bucket_lengths=(8,),
            batch_size=4,
            batched=True,
            progress=False,
        )
