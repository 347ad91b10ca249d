"""flowjax.models.save_causal_lm: the inverse of load_causal_lm, in transformers' layout.

The reference is the committed transformers-written fixtures (tests/fixtures/llm): a
fixture loaded and saved again must give back its tensors bit for bit under the same names
and shapes, and a config.json that reads back to the same LMConfig.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import flowjax
import flowjax.models as fm

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llm")


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="numpy") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
    return out


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_saving_a_transformers_checkpoint_gives_back_its_tensors_and_config(
    name, tmp_path
):
    src = os.path.join(FIX, name)
    lm = fm.load_causal_lm(src)
    files = fm.save_causal_lm(lm, tmp_path)
    assert files == ["config.json", "model.safetensors"]
    want, got = _tensors(src), _tensors(tmp_path)
    if lm.config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    with open(tmp_path / "config.json") as f:
        mine = json.load(f)
    assert fm.LMConfig.from_hf(mine) == fm.LMConfig.from_hf(hf) == lm.config
    for key in ("model_type", "vocab_size", "num_key_value_heads", "head_dim"):
        assert mine[key] == hf[key], key
    rope = hf.get("rope_scaling") or hf.get(
        "rope_parameters"
    )  # transformers 5 writes the latter
    assert mine["rope_theta"] == rope.get("rope_theta", hf.get("rope_theta"))
    if name == "llama3":
        assert mine["rope_scaling"]["rope_type"] == "llama3"
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            assert mine["rope_scaling"][k] == rope[k]
    else:
        assert mine["sliding_window"] == hf["sliding_window"]
        assert mine["final_logit_softcapping"] == hf["final_logit_softcapping"]


def _tiny(dtype=jnp.float32, tied=False):
    cfg = fm.LMConfig.from_hf(
        {
            "model_type": "llama",
            "vocab_size": 40,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": tied,
        }
    )
    return fm.CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(3))


def test_sharded_save_writes_an_index_and_reloads_bitwise(tmp_path):
    lm = _tiny()
    files = fm.save_causal_lm(
        lm, tmp_path, max_shard_bytes=4096, config_extra={"eos_token_id": 2}
    )
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and files[-1] == "model.safetensors.index.json"
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    assert index["metadata"]["total_size"] == sum(
        a.nbytes for a in _tensors(tmp_path).values()
    )
    for s in shards:  # every shard within the budget unless it holds one tensor
        size = os.path.getsize(tmp_path / s)
        with safe_open(str(tmp_path / s), framework="numpy") as h:
            assert size < 4096 + 1024 or len(list(h.keys())) == 1
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["eos_token_id"] == 2
    back = fm.load_causal_lm(tmp_path)
    for (p, a), (q, b) in zip(
        nnx.to_flat_state(nnx.state(lm)),
        nnx.to_flat_state(nnx.state(back)),
        strict=True,
    ):
        assert p == q
        np.testing.assert_array_equal(
            np.asarray(a.get_value()), np.asarray(b.get_value())
        )
    # a second, unsharded save into the same directory leaves no stale shard behind
    assert fm.save_causal_lm(lm, tmp_path) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_bf16_is_kept_and_tied_models_store_no_head(tmp_path):
    lm = _tiny(jnp.bfloat16, tied=True)
    fm.save_causal_lm(lm, tmp_path)
    t = _tensors(tmp_path)
    assert "lm_head.weight" not in t
    assert {a.dtype for a in t.values()} == {np.dtype(ml_dtypes.bfloat16)}
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back = fm.load_causal_lm(tmp_path, dtype=jnp.bfloat16)
    x = jnp.arange(10)[None] % 40
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(lm(x)))


def test_lora_models_are_refused_until_merged(tmp_path):
    lm = _tiny()
    lora = flowjax.add_lora(
        lm, 2, rngs=nnx.Rngs(0), select=lambda path, m: path[-1] == "q_proj"
    )
    with pytest.raises(ValueError, match=r"merge LoRA.*layers/0/self_attn/q_proj/lora"):
        fm.save_causal_lm(lora, tmp_path)
    assert not os.path.exists(tmp_path / "config.json")
    fm.save_causal_lm(flowjax.merge_lora(lora), tmp_path)
    x = jnp.arange(8)[None]
    np.testing.assert_allclose(
        fm.load_causal_lm(tmp_path)(x), lora(x), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(TypeError, match="CausalLM"):
        fm.save_causal_lm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path)
