"""flowjax.models.load_causal_lm against Hugging Face transformers' logits (committed fixtures).

The fixtures (tiny random Llama 3 with llama3 rope scaling and tied embeddings;
Gemma 2 with a sliding window shorter than the sequence, both soft-caps, two
safetensors shards) are written by tests/fixtures/make_llm_fixtures.py with
torch and transformers, which the tests never need.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import flowjax
import flowjax.models as fm

from . import _subprocess

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llm")
NAMES = ("llama3", "gemma2")


def _load(name):
    return fm.load_causal_lm(os.path.join(FIX, name)), np.load(
        os.path.join(FIX, f"{name}_expected.npz")
    )


def _rel(a, b, where=None):
    a, b = np.asarray(a), np.asarray(b)
    if where is not None:
        a, b = a[where], b[where]
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_with_and_without_padding(name):
    lm, e = _load(name)
    assert _rel(lm(e["ids"]), e["logits"]) < 1e-4
    for side in ("right", "left"):
        mask = e[f"{side}_mask"]
        z = lm(e["ids"], attention_mask=mask)
        assert np.isfinite(np.asarray(z)).all()
        assert _rel(z, e[f"{side}_logits"], mask.astype(bool)) < 1e-4, side
    # padding changes the logits of the real tokens after it (left) and the config is honoured
    left = e["left_mask"].astype(bool)
    assert _rel(lm(e["ids"]), e["left_logits"], left) > 1e-3


def test_configs_are_the_families_features():
    llama, _ = _load("llama3")
    gemma, _ = _load("gemma2")
    assert llama.config.rope_scaling == (8.0, 1.0, 4.0, 8)
    assert llama.config.rope_theta == 500000.0 and llama.config.tie_word_embeddings
    assert gemma.config.sliding_window == 4 and gemma.config.sliding_layers == (
        True,
        False,
        True,
    )
    assert gemma.config.final_logit_softcapping == 3.0
    # without the llama3 scaling the logits are wrong (what tunix's Llama gets)
    plain = fm.CausalLM(
        dataclasses.replace(llama.config, rope_scaling=None),
        rngs=nnx.Rngs(0),
    )
    nnx.update(plain, nnx.state(llama))
    _, e = _load("llama3")
    assert _rel(plain(e["ids"]), e["logits"]) > 1e-3
    # Gemma 2 without its sliding window, or without the attention soft-cap, is wrong too
    _, e = _load("gemma2")
    for change in ({"sliding_window": None}, {"attn_logit_softcapping": None}):
        other = fm.CausalLM(
            dataclasses.replace(gemma.config, **change), rngs=nnx.Rngs(0)
        )
        nnx.update(other, nnx.state(gemma))
        assert _rel(other(e["ids"]), e["logits"]) > 1e-3, change


@pytest.mark.parametrize("name", NAMES)
def test_hidden_and_unembedding_give_the_logits_and_chunked_nll(name):
    lm, e = _load(name)
    h = lm.hidden(e["ids"])
    cap = lm.config.final_logit_softcapping
    z = jnp.einsum("btd,vd->btv", h, lm.unembedding)
    z = cap * jnp.tanh(z / cap) if cap else z
    np.testing.assert_allclose(
        z, e["logits"], rtol=1e-4, atol=1e-4 * np.abs(e["logits"]).max()
    )
    targets = e["ids"][:, 1:].reshape(-1)
    nll = flowjax.chunked_token_nll(
        h[:, :-1].reshape(-1, h.shape[-1]),
        lm.unembedding,
        targets,
        chunk_size=16,
        layout="vd",
        logit_softcap=cap,
    )
    ref = -jax_log_softmax(e["logits"][:, :-1].reshape(-1, 64))[
        np.arange(targets.size), targets
    ]
    np.testing.assert_allclose(nll, ref, rtol=1e-4)


def jax_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def test_sharded_load_on_eight_fake_devices():
    env = _subprocess._env()
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "_llm_sharded_worker.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")


def _copy(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(os.path.join(FIX, name), d)
    return d


def test_bad_checkpoints_give_errors_naming_the_problem(tmp_path):
    d = _copy(tmp_path, "llama3")
    sd = safetensors.numpy.load_file(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())

    bad = dict(sd)
    bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    safetensors.numpy.save_file(bad, d / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.up_proj\.weight \(3, 3\) \(expected \(24, 16\)\)",
    ):
        fm.load_causal_lm(d)

    bad = dict(sd)
    del bad["model.norm.weight"]
    bad["model.layers.9.extra.weight"] = np.zeros(2, np.float32)
    safetensors.numpy.save_file(bad, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 tensors: model\.norm\.weight"):
        fm.load_causal_lm(d)
    bad["model.norm.weight"] = sd["model.norm.weight"]
    safetensors.numpy.save_file(bad, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not: model\.layers\.9\.extra\.weight"):
        fm.load_causal_lm(d)

    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="unknown model_type 'mistral'"):
        fm.load_causal_lm(d)
    rope = {**cfg["rope_parameters"], "rope_type": "yarn"}
    (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": rope}))
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        fm.load_causal_lm(d)
    (d / "config.json").write_text(json.dumps(cfg))
    os.remove(d / "model.safetensors")
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        fm.load_causal_lm(d)

    g = _copy(tmp_path, "gemma2")
    os.remove(g / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors"):
        fm.load_causal_lm(g)


def test_tokenizer_gives_transformers_ids_and_round_trips():
    tok = fm.load_tokenizer(os.path.join(FIX, "tokenizer"))
    with open(os.path.join(FIX, "tokenizer_expected.json")) as f:
        want = json.load(f)
    for text, ids in zip(want["texts"], want["ids"], strict=True):
        got = tok.encode(text).ids
        assert got == ids, text
        assert got[0] == tok.token_to_id("<bos>")
        assert tok.decode(got, skip_special_tokens=True) == text


def test_lm_config_checks_its_sizes_and_defaults_to_no_sliding_layers():
    base = dict(
        model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    LMConfig, CausalLM = fm.LMConfig, fm.CausalLM
    cfg = LMConfig(**base)
    assert cfg.sliding_layers == (False, False, False)
    assert CausalLM(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 4), jnp.int32)).shape == (
        1,
        4,
        50,
    )
    with pytest.raises(ValueError, match="model_type"):
        LMConfig(**{**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        LMConfig(**{**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="'head_dim': 0"):
        LMConfig(**{**base, "head_dim": 0})
    with pytest.raises(ValueError, match="2 entries for num_hidden_layers=3"):
        LMConfig(**{**base, "sliding_layers": (True, False)})
