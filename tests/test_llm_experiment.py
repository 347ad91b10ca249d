"""experiments/llm: the tiny config end to end, restore, resume after a kill, gradient accumulation."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax
from experiments.llm import config as C
from experiments.llm import pipeline as PL
from experiments.llm import run as R

pytest.importorskip("lm_eval")
pytest.importorskip("tokenizers")

TINY = "experiments/llm/configs/tiny.py"


class _Killed(Exception):
    pass


def _run(workdir, lines, *extra):
    return R.main(
        ["--config", TINY, "--workdir", str(workdir), *extra], write=lines.append
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    lines: list[str] = []
    results = _run(root / "a", lines)
    return root, results, lines


def test_tiny_runs_every_stage_and_writes_table_2(tiny):
    root, results, _ = tiny
    work = root / "a"
    # The data: 48 fabricated records, tokenised with the official template; the
    # pre-pass covers every example with a target and τ is the median of its losses.
    assert results["data"]["records"] == 48
    losses = flowjax.LossTable.load(
        next((work / "stages").glob("prepass-*/losses.npz"))
    )
    assert len(losses) == 48
    assert results["prepass"]["temperature"] == pytest.approx(
        float(np.median(losses.losses))
    )
    # Training: 48 examples in micro-batches of 2 (two buckets), 4 per optimiser step.
    t = results["training"]
    assert (t["micro_steps"], t["optimizer_steps"], t["accumulation"]) == (24, 6, 4)
    assert t["retention"][-1]["step"] == 24 and t["retention"][-1]["param_distance"] > 0
    # The export is an HF directory that load_causal_lm reads back to the trained model,
    # and its evaluation is a local GSM8K-style task (strict #### match) and a multiple-
    # choice task, as rows of Table 2 beside the pre-trained model.
    from flowjax import models

    export = work / results["table"]["flow"]["export"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in export.iterdir()
    }
    trained = models.load_causal_lm(export)
    base = models.load_causal_lm(work / "fabricated" / "model")
    x = jnp.arange(1, 9)[None]
    assert not np.allclose(trained(x), base(x))
    assert set(results["table"]) == {"pretrained", "flow"}
    for row in results["table"].values():
        assert set(row["columns"]) == {"commonsense", "gsm8k"}
        assert all(0.0 <= v <= 1.0 for v in row["columns"].values())
    # 6 multiple-choice questions: accuracies are multiples of 1/6.
    acc = results["method"]["tasks"]["tiny_commonsense"]["acc,none"]
    assert acc * 6 == pytest.approx(round(acc * 6))
    md = (work / "results.md").read_text()
    assert "| Pre-trained |" in md and "| FLOW |" in md and "GSM8K (target)" in md


def test_rerun_restores_every_stage_and_rewrites_identical_results(tiny):
    root, _, _ = tiny
    work = root / "a"
    before = (work / "results.json").read_bytes()
    lines: list[str] = []
    _run(work, lines)
    assert (work / "results.json").read_bytes() == before
    restored = json.loads((work / "timing.json").read_text())["restored"]
    assert restored == [
        "evaluation of pretrained",
        "tokenised data",
        "finished stage flow",
        "evaluation of flow",
        "pre-pass",
    ]
    assert any(line.startswith("restored finished stage flow") for line in lines)


def test_killed_training_resumes_bit_identical(tiny, monkeypatch):
    root, _, _ = tiny
    work = root / "a"
    before = (work / "results.json").read_bytes()
    stage = next((work / "stages").glob("flow-*"))
    weights = (stage / "export" / "model.safetensors").read_bytes()
    # Forget the trained stage and its evaluation; the pre-pass, the data and the
    # pre-trained evaluation stay. Then kill the training after 10 micro-steps.
    shutil.rmtree(stage)
    shutil.rmtree(next((work / "stages").glob("eval-flow-*")))
    original = PL.TrainData.__call__

    def dies_after_ten(self, start):
        for i, batch in enumerate(original(self, start)):
            if (
                i == 10
            ):  # checkpoints every 8 micro-steps: the kill loses steps 9 and 10
                raise _Killed
            yield batch

    monkeypatch.setattr(PL.TrainData, "__call__", dies_after_ten)
    with pytest.raises(_Killed):
        _run(work, [])
    assert not (stage / "summary.json").exists()
    monkeypatch.setattr(PL.TrainData, "__call__", original)
    lines: list[str] = []
    _run(work, lines)
    assert "flow: resumed from step 8" in lines
    assert (stage / "export" / "model.safetensors").read_bytes() == weights
    assert (work / "results.json").read_bytes() == before


# ---- gradient accumulation -----------------------------------------------------------------


def _tiny_model():
    from flowjax import models

    cfg = models.LMConfig.from_hf(
        {"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
         "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1}
    )  # fmt: skip
    return models.CausalLM(cfg, rngs=nnx.Rngs(0))


def _examples():
    rng = np.random.default_rng(0)
    out = []
    for i, (n, p) in enumerate(
        [(5, 2), (7, 3), (11, 4), (14, 2), (6, 5), (13, 9), (12, 3), (9, 8)]
    ):
        tokens = rng.integers(2, 32, n).astype(np.int32)
        out.append({"id": i, "tokens": tokens, "mask": np.arange(n) >= p})
    return out


def test_accumulated_step_is_the_big_batch_step_with_the_official_normalisation():
    model = _tiny_model()
    examples = _examples()
    weights = flowjax.WeightTable(
        np.arange(8), np.linspace(0.2, 1.0, 8, dtype=np.float32)
    )
    cfg = C.Config(
        model="tiny", method="flow", bucket_lengths=(8, 16), max_length=16,
        batch_size=4, micro_batch_size=2, epochs=1, lr=1e-2, warmup_ratio=0.0, seed=5,
    )  # fmt: skip
    data = PL.TrainData(examples, weights, cfg, pad_id=0)
    micro = [
        data.batch(t) for t in range(2)
    ]  # the first optimiser step's two micro-batches
    # Seed 5: a ragged micro-batch (one example and an empty row) of bucket 16, then bucket 8.
    assert [b["tokens"].shape for b in micro] == [(2, 16), (2, 8)]
    assert micro[0]["mask"][1].sum() == 0 and micro[0]["weight"][1] == 0
    # Every micro-batch carries N_group / k: N_group counts the target tokens of the group.
    plan = data.plan(0)
    n_group = sum(int(examples[i]["mask"].sum()) for _, ids in plan[:2] for i in ids)
    for b in micro:
        np.testing.assert_array_equal(b["denominator"], n_group / 2)
    # One big batch of the same four sequences, right-padded to the longest bucket.
    width = max(b["tokens"].shape[1] for b in micro)
    pad = lambda a, v: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=v)  # noqa: E731
    big = {
        "tokens": np.concatenate([pad(b["tokens"], 0) for b in micro]),
        "mask": np.concatenate([pad(b["mask"], False) for b in micro]),
        "weight": np.concatenate([b["weight"] for b in micro]),
        "denominator": np.full(4, n_group, np.float32),
    }

    # The micro-batches as [4, 16] too (empty rows and right padding add nothing), so that
    # every program below has one shape: one compilation each.
    def four_rows(b):
        out = {"denominator": np.full(4, n_group / 2, np.float32)}
        for k in ("tokens", "mask", "weight"):
            v = pad(b[k], 0) if b[k].ndim == 2 else b[k]
            out[k] = np.concatenate([v, np.zeros_like(v)])
        return out

    micro = [four_rows(b) for b in micro]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    objective = PL.make_objective(graphdef, cfg)
    grad = jax.jit(lambda *a: jax.grad(objective, has_aux=True)(*a)[0])
    g_micro = jax.tree.map(
        lambda a, b: (a + b) / 2, *(grad(params, b, rest) for b in micro)
    )
    g_big = grad(params, big, rest)
    chex_close = lambda a, b: jax.tree.map(  # noqa: E731
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7), a, b
    )
    chex_close(g_micro, g_big)
    # The reference by hand: Σ_i w_i Σ_t nll_it / N over the whole batch.
    forward = jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t))
    nll, m = flowjax.token_nll(
        forward(params, rest, big["tokens"]), big["tokens"], big["mask"]
    )
    by_hand = float(jnp.sum(big["weight"][:, None] * jnp.where(m, nll, 0)) / n_group)
    assert float(objective(params, big, rest)[0]) == pytest.approx(by_hand, rel=1e-6)
    # Each micro-batch divided by its own token count instead: a different gradient.
    own = [
        dict(b, denominator=np.full(4, b["mask"][:, 1:].sum() / 2, np.float32))
        for b in micro
    ]
    g_own = jax.tree.map(
        lambda a, b: (a + b) / 2, *(grad(params, b, rest) for b in own)
    )
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, g_own, g_big)) / optax.tree.norm(
        g_big
    )
    assert diff > 1e-2
    # Through optax.MultiSteps and make_train_step: no update after the first micro-step,
    # then the parameters that one un-accumulated step (micro-batches of 4: no MultiSteps)
    # takes with the big batch's gradient.
    tx = PL.make_tx(cfg, 3)
    step = flowjax.make_train_step(objective, tx, anchor=params, frozen=rest)
    state = flowjax.init_train_state(params, tx)
    state, _ = step(state, micro[0])
    chex_close(state.params, params)
    state, _ = step(state, micro[1])
    plain = PL.make_tx(dataclasses.replace(cfg, micro_batch_size=4), 3)
    updates, _ = plain.update(g_big, plain.init(params), params)
    chex_close(state.params, optax.apply_updates(params, updates))
    assert optax.tree.norm(jax.tree.map(jnp.subtract, state.params, params)) > 0


def test_schedule_is_hf_cosine_with_warmup_and_the_plan_covers_each_example_once():
    cfg = C.Config(lr=2e-5, warmup_ratio=0.03, batch_size=4, micro_batch_size=4)
    total = 100
    w = PL.warmup_steps(cfg, total)
    assert w == 3  # HF: ceil(0.03 · 100)
    sched = PL.lr_schedule(cfg, total)
    for s in (0, 1, 2, 3, 10, 50, 99):
        hf = s / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))
        assert float(sched(s)) == pytest.approx(2e-5 * hf, rel=1e-5, abs=1e-12)
    cfg = C.Config(model="tiny", bucket_lengths=(8, 16), max_length=16, batch_size=4,
                   micro_batch_size=2, epochs=2)  # fmt: skip
    data = PL.TrainData(_examples(), None, cfg, pad_id=0)
    orders = []
    for epoch in (0, 1):
        ids = np.concatenate([ids for _, ids in data.plan(epoch)])
        assert sorted(ids.tolist()) == list(range(8))  # every example once per epoch
        orders.append(ids.tolist())
    assert orders[0] != orders[1]  # a new permutation each epoch
    assert (data.per_epoch, data.num_steps, data.optimizer_steps) == (4, 8, 4)
    with pytest.raises(ValueError, match="unknown method 'qlora4'"):
        C.Config(method="qlora4")


def test_flow_qlora_trains_only_factors_over_an_nf4_base(tiny, tmp_path):
    """``--set method=flow_qlora`` in a copy of the tiny workdir: shared stages restored, the
    base frozen as NF4, the export = dequantised base + merged factors."""
    from flowjax import models

    root, _, _ = tiny
    work = tmp_path / "w"
    shutil.copytree(root / "a", work)
    lines: list[str] = []
    results = _run(work, lines, "--set", "method=flow_qlora")
    restored = json.loads((work / "timing.json").read_text())["restored"]
    assert {"tokenised data", "pre-pass", "evaluation of pretrained"} <= set(restored)
    assert "finished stage flow_qlora" not in restored  # trained here
    assert set(results["table"]) == {"pretrained", "flow", "flow_qlora"}
    md = (work / "results.md").read_text()
    assert "| FLOW + QLoRA |" in md and "| FLOW |" in md
    export = models.load_causal_lm(work / results["table"]["flow_qlora"]["export"])
    base = models.load_causal_lm(work / "fabricated" / "model")
    ex, bs = nnx.state(export), nnx.state(base)
    flat_e = dict(nnx.to_flat_state(ex))
    cfg = C.load(TINY)
    moved = 0
    for path, v in nnx.to_flat_state(bs):
        a, b = np.asarray(flat_e[path].get_value()), np.asarray(v.get_value())
        if any(t in path for t in cfg.lora_targets):  # NF4 error + the merged factors
            moved += not np.array_equal(a, b)
        else:  # embeddings and norms: never trained, bit for bit
            np.testing.assert_array_equal(a, b, err_msg=str(path))
    assert moved == len(cfg.lora_targets)  # every targeted projection of the one layer
    # Each targeted kernel is NF4(base) + (α/r)·AB: minus the NF4 round trip of the base
    # kernel, what is left has rank at most r, and is not zero.
    flat_b = dict(nnx.to_flat_state(bs))
    for t in cfg.lora_targets:
        group = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        path = ("layers", 0, group, t, "kernel")
        w0 = flat_b[path].get_value()
        nf4 = flowjax.nf4_dequantize(
            *flowjax.nf4_quantize(w0, cfg.qlora_block_size), cfg.qlora_block_size
        )
        delta = np.asarray(flat_e[path].get_value()) - np.asarray(nf4)
        sv = np.linalg.svd(delta, compute_uv=False)
        assert sv[0] > 0 and sv[cfg.lora_rank] <= 1e-5 * sv[0], (
            t,
            sv[: cfg.lora_rank + 1],
        )


def test_the_paper_configs_carry_the_official_recipe():
    from pathlib import Path

    files = sorted(Path("experiments/llm/configs").glob("*_metamath_*.py"))
    assert len(files) == 16  # six methods of Table 2 / 4, and QLoRA, FLOW + QLoRA
    for path in files:
        cfg = C.load(path)
        model, method = path.stem.split("_metamath_")
        assert (cfg.model, cfg.method) == (model, method)
        assert cfg.checkpoint == cfg.data == ""  # set by the user
        assert (cfg.epochs, cfg.batch_size, cfg.micro_batch_size, cfg.accumulation) == (
            2,
            128,
            4,
            32,
        )
        assert (cfg.max_length, cfg.seed, cfg.lr, cfg.warmup_ratio) == (
            1024,
            42,
            1e-5,
            0.03,
        )
        assert (cfg.max_grad_norm, cfg.weight_decay, cfg.adam_eps) == (1.0, 0.0, 1e-8)
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.l2_strength, cfg.wise_alpha) == (
            64,
            64.0,
            1e-3,
            0.5,
        )
        assert cfg.lora_targets == C.LORA_TARGETS and len(C.LORA_TARGETS) == 7
        assert cfg.template.endswith("### Response:") and cfg.weighting == "sequence"
        assert ("gsm8k", "gsm8k", "exact_match,strict-match", 5) in cfg.tasks
        assert ("mmlu", "mmlu", "acc,none", 5) in cfg.tasks
        assert sum(col == "commonsense" for col, *_ in cfg.tasks) == 6
    # A value that does not parse, or a paper config without its checkpoint: usage errors.
    for extra in (["--set", "lr=fast"], []):
        with pytest.raises(SystemExit):
            R.main(["--config", str(files[0]), "--workdir", "/tmp/x", *extra])
