"""CausalLM's KV cache and flowjax.models.generate against the full forward (and transformers' logits).

The fixtures are those of tests/test_models_llm.py: tiny Llama 3 with llama3 rope scaling
and tied embeddings; tiny Gemma 2 with a sliding window (4) shorter than the sequence (12),
both soft-caps and grouped-query attention; two rows, right- or left-padded.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flowjax.models as fm

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llm")
NAMES = ("llama3", "gemma2")


def _load(name):
    return fm.load_causal_lm(os.path.join(FIX, name)), np.load(
        os.path.join(FIX, f"{name}_expected.npz")
    )


def _forward(lm):
    """The full forward, jitted (the model an argument)."""
    graphdef, state = nnx.split(lm)
    f = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    return lambda *a: f(state, *a)


def _rel(a, b, where):
    a, b = np.asarray(a)[where], np.asarray(b)[where]
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_cached_steps_equal_the_full_forward(name):
    lm, e = _load(name)
    graphdef, state = nnx.split(lm)
    traces = []

    @jax.jit
    def decode(state, tokens, cache, mask, positions):
        traces.append(tokens.shape)
        return nnx.merge(graphdef, state).decode(tokens, cache, mask, positions)

    ids = e["ids"]
    b, t = ids.shape
    left = e["left_mask"]
    counted = np.maximum(
        np.cumsum(left, 1) - 1, 0
    )  # positions from the first real token
    cases = {
        "none": (np.ones_like(ids), None, e["logits"]),
        "right": (e["right_mask"], None, e["right_logits"]),
        "left": (left, None, e["left_logits"]),
        "left_counted": (left, counted, None),
    }
    forward = _forward(lm)
    for case, (mask, positions, hf) in cases.items():
        pos = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
        full = forward(ids, mask, pos)
        cache = lm.init_cache(
            b, 16
        )  # more slots than the sequence: unused ones are masked
        chunks, got = (2, 1, 1, 2, 1, 1, 2, 2), []  # prefill, steps, 2-token chunks
        start = 0
        for n in chunks:
            sl = slice(start, start + n)
            z, cache = decode(state, ids[:, sl], cache, mask[:, sl], pos[:, sl])
            got.append(z)
            start += n
        assert start == t and int(cache.index) == t
        got = np.concatenate(got, axis=1)
        real = mask.astype(bool)
        assert _rel(got, full, real) < 1e-5, case
        if hf is not None:  # and transformers' logits, as the full forward matches them
            assert _rel(got, hf, real) < 1e-4, case
    # one compilation per chunk length (1, 2), not per step
    assert sorted(traces) == [(2, 1), (2, 2)]
    # the cache is what makes the steps right: a step on a fresh cache is another number
    z1, _ = decode(state, ids[:, 5:6], lm.init_cache(b, 16), mask[:, 5:6], pos[:, 5:6])
    assert _rel(z1[:, 0], full[:, 5], slice(None)) > 1e-3 and len(traces) == 2


def test_decode_rejects_what_does_not_fit():
    lm, e = _load("llama3")
    cache = lm.init_cache(2, 4)._replace(index=jnp.int32(3))  # 3 of 4 slots written
    with pytest.raises(ValueError, match="4 slots, 3 filled: 2 more tokens do not fit"):
        lm.decode(e["ids"][:, 3:5], cache)
    with pytest.raises(ValueError, match=r"cache's B = 2; got shape \(1, 1\)"):
        lm.decode(e["ids"][:1, 3:4], cache)
    # under jit no check can run: the logits are NaN, never a plausible number
    graphdef, state = nnx.split(lm)
    step = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).decode(x, c)[0])
    assert np.isnan(np.asarray(step(state, e["ids"][:, 3:5], cache))).all()
    with pytest.raises(ValueError, match=r"prompts \[1\] \(row indices\) are empty"):
        fm.generate(lm, [[1], []], max_new_tokens=2, eos_id=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1; got 0"):
        fm.generate(lm, [[1]], max_new_tokens=0, eos_id=2)


def _greedy_full_forward(forward, prompt, n, eos_id, width=24):
    """No cache: the whole forward of the row (right-padded to ``width``) at every step."""
    x, out = list(prompt), []
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, : len(x)] = x
        token = int(jnp.argmax(forward(row)[0, len(x) - 1]))
        out.append(token)
        if token == eos_id:
            break
        x.append(token)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_generate_equals_greedy_decoding_without_cache(name):
    lm, e = _load(name)
    forward = _forward(lm)
    ids = e["ids"]
    prompts = [ids[0, :3].tolist(), ids[1, :9].tolist(), ids[0, 2:7].tolist()]
    n = 8
    free = [_greedy_full_forward(forward, p, n, eos_id=-1) for p in prompts]
    eos = free[1][2]  # a token the second row emits third: it must stop there
    want = [f[: f.index(eos) + 1] if eos in f else f for f in free]  # stopped at eos
    assert len(want[1]) == 3 and want[1][-1] == eos
    assert any(len(w) == n for w in want)  # and another row runs to the budget
    assert len({len(w) for w in want}) > 1 and len({len(p) for p in prompts}) == 3
    got = fm.generate(lm, prompts, max_new_tokens=n, eos_id=eos, bucket=16)
    assert got == want
    size = fm.llm._greedy._cache_size()
    assert fm.generate(lm, prompts, max_new_tokens=n, eos_id=eos, bucket=16) == want
    assert fm.llm._greedy._cache_size() == size  # the same program: no retrace
