"""End-to-end test of experiments/lm/finetune_checkpoint.py on a tiny random Llama, saved with orbax and as HF."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments.lm import finetune_checkpoint as F
from experiments.lm import model as M
from flowjax.models import save_causal_lm

CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_len": 32,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = M.from_kwargs(seed=1, **CONFIG)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(root / "params", nnx.state(model, nnx.Param), force=True)
    checkpointer.wait_until_finished()
    save_causal_lm(model, root / "hf")  # the same weights as a Hugging Face directory
    data = root / "train.jsonl"
    lines = [
        json.dumps(
            {"prompt": f"Q: {a}+{b}=\nA: ", "response": str(a + b), "id": 10 * a + b}
        )
        for a in range(3)
        for b in range(4)
    ]
    data.write_text("\n".join(lines) + "\n")
    return root, model, data


def _run(root, data, out, *extra, hf=False):
    # orbax: the factory builds the module (seed 0: a *different* init) and the saved state
    # is restored into it; hf: load_causal_lm reads the Hugging Face directory alone.
    source = (
        ["--checkpoint", str(root / "hf")]
        if hf
        else [
            "--model",
            "experiments.lm.model:from_kwargs",
            "--model_kwargs",
            json.dumps({"seed": 0, **CONFIG}),
            "--checkpoint",
            str(root / "params"),
        ]
    )
    return F.main(
        [
            *source,
            "--data", str(data),
            "--out", str(out),
            "--buckets", "24",
            "--batch_size", "4",
            "--steps", "4",
            "--lr", "3e-3",
            *extra,
        ]
    )  # fmt: skip


def _reference_token_losses(model, data):
    """Per-example response-token NLLs, computed directly with the saved model."""
    out = {}
    for line in data.read_text().splitlines():
        rec = json.loads(line)
        prompt = [M.BOS, *rec["prompt"].encode()]
        tokens = jnp.asarray([*prompt, *rec["response"].encode(), M.EOS])
        logp = jax.nn.log_softmax(model(tokens[None])[0, :-1])
        nll = -logp[jnp.arange(len(tokens) - 1), tokens[1:]]
        out[rec["id"]] = np.asarray(nll[len(prompt) - 1 :])
    return out


def test_sequence_flow_full_finetune(saved, tmp_path):
    root, model, data = saved
    summary = _run(root, data, tmp_path)
    ref = {i: x.mean() for i, x in _reference_token_losses(model, data).items()}
    losses = np.load(tmp_path / "losses.npz")
    # The restored params are the saved ones (the factory's own init, seed 0, differs).
    np.testing.assert_allclose(
        losses["losses"], [ref[i] for i in losses["ids"]], rtol=1e-5
    )
    w = np.load(tmp_path / "weights.npz")
    tau = np.median(losses["losses"])
    np.testing.assert_allclose(float(w["temperature"]), tau, rtol=1e-6)
    np.testing.assert_allclose(w["weights"], np.exp(-losses["losses"] / tau), rtol=1e-5)
    assert summary["steps"] == 4 and summary["level"] == "sequence"
    # Full FT: the saved trainable state is the whole fine-tuned parameter set, moved off θ*.
    abstract = nnx.state(model, nnx.Param)
    restored = ocp.StandardCheckpointer().restore(tmp_path / "trainable", abstract)
    moved = [
        float(jnp.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True
        )
    ]
    assert max(moved) > 1e-4
    assert summary["trainable_params"] == sum(x.size for x in jax.tree.leaves(abstract))


def test_token_level_chunked_lora_from_a_hugging_face_directory(saved, tmp_path):
    root, model, data = saved
    summary = _run(
        root, data, tmp_path, "--level", "token", "--chunked_ce", "100",
        "--unembedding", "unembedding", "--unembedding_layout", "vd",
        "--lora_rank", "2", "--lora_targets", "q_proj,v_proj", hf=True,
    )  # fmt: skip
    ref = _reference_token_losses(model, data)
    tl = np.load(tmp_path / "losses.npz")
    assert tl["losses"].shape == (12, 23)  # longest bucket 24, shifted
    for i, losses, mask in zip(tl["ids"], tl["losses"], tl["mask"], strict=True):
        np.testing.assert_allclose(losses[mask], ref[i], rtol=1e-4, atol=1e-5)
        assert (losses[~mask] == 0).all()
    w = np.load(tmp_path / "weights.npz")
    tau = float(np.median(tl["losses"][tl["mask"]]))
    np.testing.assert_allclose(float(w["temperature"]), tau, rtol=1e-6)
    np.testing.assert_allclose(
        w["weights"], np.where(tl["mask"], np.exp(-tl["losses"] / tau), 0.0), rtol=1e-5
    )
    # rank 2 on q and v (32x32 each): A [32, 2] + B [2, 32] per layer; only they are saved.
    assert summary["trainable_params"] == 2 * (32 * 2 + 2 * 32)
    flat = jax.tree_util.tree_flatten_with_path(
        ocp.StandardCheckpointer().restore(tmp_path / "trainable")
    )[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    assert len(paths) == 4 and all("lora_a" in p or "lora_b" in p for p in paths), paths
    b = [x for p, x in flat if "lora_b" in jax.tree_util.keystr(p)]
    assert all(float(jnp.abs(x).max()) > 0 for x in b)  # B trained away from its 0 init


def test_bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        F.read_jsonl(str(bad), 256, 257)
    bad.write_text(json.dumps({"prompt_ids": [], "response_ids": [5]}) + "\n")
    with pytest.raises(ValueError, match="empty prompt"):
        F.read_jsonl(str(bad), 256, 257)
    with pytest.raises(ValueError, match="module:factory"):
        F.load_factory("no_colon")
    args = F.parser().parse_args(
        ["--checkpoint", str(tmp_path), "--data", str(bad), "--out", str(tmp_path)]
    )
    with pytest.raises(ValueError, match=r"no config.json .* needs --model"):
        F.finetune(args)
