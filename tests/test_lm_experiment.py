"""Smoke test of experiments/lm/run.py (--quick) and of its orbax pre-training cache."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flowjax
from experiments import report as rep
from experiments.lm import data as lm_data
from experiments.lm import methods as lm_methods
from experiments.lm import run as lm_run
from experiments.lm import train as lm_train
from experiments.lm.config import FIRST_METHODS, get_config
from experiments.lm.model import (
    BOS,
    EOS,
    LORA_TARGETS,
    PAD,
    build,
    decode,
    make_greedy_decode,
)
from experiments.lm.pretrain import cache_path, pretrained_params


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    lm_run.main(
        [
            "--quick",
            "--out",
            str(root / "out"),
            "--cache_dir",
            str(root / "cache"),
            "--no_progress",
        ]
    )
    return root


def test_outputs_well_formed(quick):
    out = quick / "out"
    report = json.loads((out / "results.json").read_text())
    quick_cfg = get_config(quick=True)
    assert report["config"] == rep.config_dict(quick_cfg)
    assert (
        report["config"]["lora_rank"] == 2 and report["config"]["l2sp_strength"] == 0.1
    )
    assert set(report["methods"]) == set(FIRST_METHODS) == set(quick_cfg.methods)
    for m in report["methods"].values():
        ppl, em = m["perplexity"], m["exact_match"]
        assert len(ppl["values"]) == len(em["values"]) == len(quick_cfg.seeds)
        assert all(math.isfinite(p) and p > 1 for p in ppl["values"])
        assert all(0 <= e <= 1 for e in em["values"])
        # A completion equal to the reference also has the right number.
        assert all(
            x <= e + 1e-12
            for x, e in zip(m["exact_response"]["values"], em["values"], strict=True)
        )
        assert ppl["mean"] == pytest.approx(np.mean(ppl["values"]))
        assert m["lr"] in quick_cfg.lr_grid
    # LoRA starts at the pre-trained model and moves little in 12 steps; full FT moves more.
    pre = report["pretrained"]["perplexity"]
    assert abs(report["methods"]["lora"]["perplexity"]["mean"] - pre) < abs(
        report["methods"]["standard"]["perplexity"]["mean"] - pre
    )
    w = report["weights"]
    assert 0 < w["tau_seq"] and 0 < w["tau_tok"]
    assert w["sequence"]["n"] == quick_cfg.n_train
    assert w["sequence_mean1"]["mean"] == pytest.approx(1.0, rel=1e-5)
    # Every target token is classified: 14 scaffold bytes, the digits, "." and EOS.
    kinds = w["token_by_kind"]
    assert sum(k["n"] for k in kinds.values()) == w["token"]["n"]
    assert kinds["scaffold"]["n"] == 14 * w["sequence"]["n"]
    assert kinds["EOS"]["n"] == kinds["'.'"]["n"] == w["sequence"]["n"]
    timing = json.loads((out / "timing.json").read_text())
    assert timing["pretrain"]["cache_hit"] is False
    assert timing["pretrain"]["steps_run"] == quick_cfg.pretrain.steps
    assert "cache_hit" not in report["pretrain"]
    md = (out / "results.md").read_text()
    assert all(f"| {lm_methods.METHODS[m].name} | " in md for m in quick_cfg.methods)
    for png in ("tradeoff.png", "weights.png", "retention.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timing = json.loads((out / "timing.json").read_text())
    assert timing["wall_s"] > 0 and timing["runs_restored_from_checkpoints"] == 0
    assert "wall_s" not in json.dumps(report) and "time" not in report


def test_retention_curves_end_at_the_final_evaluation(quick):
    """Each seed's curve: the pre-trained model at step 0, then every curve_every steps to the end."""
    report = json.loads((quick / "out" / "results.json").read_text())
    cfg = get_config(quick=True)
    pre = report["pretrained"]
    for m in report["methods"].values():
        assert len(m["curves"]) == len(cfg.seeds)
        for curve, ppl in zip(m["curves"], m["perplexity"]["values"], strict=True):
            assert curve["step"] == list(range(0, cfg.ft_steps + 1, cfg.curve_every))
            assert curve["heldout_ppl"][0] == pytest.approx(pre["perplexity"], rel=1e-6)
            assert curve["retention"][0] == 1.0
            # the last point is the final model: the test-time perplexity on the same windows
            assert curve["heldout_ppl"][-1] == pytest.approx(ppl, rel=1e-6)
            for p, r in zip(curve["heldout_ppl"], curve["retention"], strict=True):
                assert r == pytest.approx(pre["perplexity"] / p, rel=1e-6)
            assert all(0 <= e <= 1 for e in curve["val_exact_match"])


def test_a_rerun_restores_every_run_and_gives_the_same_results(quick, capsys):
    """Run again into the same --out: every fine-tuning run comes from its checkpoint, same bytes."""
    out = quick / "out"
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    lm_run.main(
        [
            "--quick",
            "--out",
            str(out),
            "--cache_dir",
            str(quick / "cache"),
            "--no_progress",
        ]
    )
    printed = capsys.readouterr()
    assert "restored finished stage" in printed.out + printed.err
    assert (out / "results.json").read_bytes() == before
    timing = json.loads((out / "timing.json").read_text())
    cfg = get_config(quick=True)
    runs = len(cfg.methods) * (len(cfg.lr_grid) + len(cfg.seeds) - 1)
    assert timing["runs_restored_from_checkpoints"] == runs
    assert len(list((out / "checkpoints").iterdir())) == runs


def test_pretraining_cache_is_reused(quick, capsys, tmp_path):
    report = json.loads((quick / "out" / "results.json").read_text())
    stream, _, sha = lm_data.pydoc_streams()
    cfg = get_config(quick=True)
    params, info = pretrained_params(
        cfg.pretrain, quick / "cache", stream, sha, progress=False
    )
    assert info["cache_hit"] is True and info["steps_run"] == 0
    assert info["cache_dir"] == report["pretrain"]["cache_dir"]
    assert "pre-training skipped" in capsys.readouterr().out
    # The restored model is the one that was evaluated: same held-out perplexity.
    graphdef = nnx.split(
        nnx.eval_shape(lambda: build(cfg.pretrain.model)),
        nnx.Param,
    )[0]
    ev = lm_train.Evaluator(graphdef)
    windows = lm_data.heldout_windows(
        lm_data.pydoc_streams()[1],
        cfg.pretrain.model.max_len,
        cfg.ppl_windows,
    )
    assert ev.perplexity((params,), windows) == pytest.approx(
        report["pretrained"]["perplexity"], rel=1e-5
    )
    # A changed architecture is another directory, never the cached model.
    other = dataclasses.replace(cfg.pretrain.model, rope_theta=5e5)
    changed = dataclasses.replace(cfg.pretrain, model=other)
    assert cache_path(changed, quick / "cache", sha) != cache_path(
        cfg.pretrain, quick / "cache", sha
    )
    # A cache whose checkpoint is not the config's (edited by hand) is refused.
    tampered = tmp_path / cache_path(cfg.pretrain, quick / "cache", sha).name
    shutil.copytree(cache_path(cfg.pretrain, quick / "cache", sha), tampered)
    hf = json.loads((tampered / "model" / "config.json").read_text())
    (tampered / "model" / "config.json").write_text(
        json.dumps(hf | {"rope_theta": 5e5})
    )
    with pytest.raises(ValueError, match="not the configured"):
        pretrained_params(cfg.pretrain, tmp_path, stream, sha, progress=False)


def test_methods_and_settings_come_from_the_config(tmp_path):
    """Each method is a difference from standard FT; unknown names or fields fail before any work."""
    m = lm_methods.METHODS
    assert m["standard"] == lm_methods.Method("Standard FT")
    assert m["flow_tok"].weights == "token" and not m["flow_tok"].lora
    assert m["flow_lora"].weights == "sequence" and m["flow_lora"].lora
    assert m["l2sp"].l2sp and m["l2sp"].weights is None
    with pytest.raises(ValueError, match=r"unknown methods \['flow_x'\]"):
        lm_methods.check_methods(["standard", "flow_x"])
    for bad in (["--set", "lora_rnak=2"], ["--set", "methods=('flow_x',)"]):
        with pytest.raises(SystemExit):
            lm_run.main(["--quick", *bad, "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    cfg = lm_run.cli.override(
        get_config(quick=True), ["pretrain.steps=5", "lora_rank=3"]
    )
    assert cfg.pretrain.steps == 5 and cfg.lora_rank == 3
    assert cfg.pretrain.model == get_config(quick=True).pretrain.model


def test_sft_loss_is_the_official_token_normalisation():
    """Σ_i w_i Σ_t ℓ_it / #target tokens (sequence weights), by hand."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 5)), jnp.float32)
    tokens = jnp.asarray([[1, 2, 3, 4], [0, 1, 1, 2]])
    mask = jnp.asarray([[False, True, True, True], [False, False, True, True]])
    w = jnp.asarray([0.5, 2.0])
    got = lm_methods.sft_loss(logits, tokens, mask, w, level="sequence")
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], -1))
    nll = -np.take_along_axis(logp, np.asarray(tokens[:, 1:, None]), -1)[..., 0]
    m = np.asarray(mask[:, 1:])
    want = np.sum(np.asarray(w)[:, None] * nll * m) / m.sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_task_and_split():
    task = lm_data.addition_task()
    assert [len(task[s]["id"]) for s in ("train", "val", "test")] == [2200, 300, 500]
    ids = np.concatenate([task[s]["id"] for s in task])
    assert len(np.unique(ids)) == 3000  # disjoint and complete
    assert set(ids.tolist()) == {10 * a + b for a in range(1000) for b in (1, 2, 3)}
    tr = task["train"]
    for r in (0, 1, len(tr["id"]) - 1):
        a, b = divmod(int(tr["id"][r]), 10)
        assert tr["answer"][r] == a + b
        p = tr["prompt_len"][r]
        assert tr["tokens"][r, 0] == BOS
        assert decode(tr["tokens"][r, :p]) == f"What is {a} plus {b}?\n"
        target = tr["tokens"][r][tr["mask"][r]]
        assert decode(target) == f"The result is {a + b}." and target[-1] == EOS
        assert not tr["mask"][r, :p].any() and tr["mask"][r, p]
        assert (tr["tokens"][r][~tr["mask"][r]][p:] == PAD).all()  # only padding after
    # The longest example is 41 tokens (SEQ_LEN - 1); the shortest, "0 plus 1", 19 + 17.
    full = np.concatenate(
        [task[s]["mask"].sum(1) + task[s]["prompt_len"] for s in task]
    )
    assert full.max() == lm_data.SEQ_LEN - 1 == 41 and full.min() == 36
    train, held, _ = lm_data.pydoc_streams()
    assert len(train) + len(held) > 460_000 and 0.15 < len(held) / len(train) < 0.35
    assert train.dtype == np.int32 and train.max() <= EOS


def test_parse_answer():
    assert lm_data.parse_answer("The result is 445.") == 445
    assert lm_data.parse_answer("The result is 1008") == 1008
    assert lm_data.parse_answer("xx The result is 12.The result is 3") == 12
    assert lm_data.parse_answer("The result is .") is None
    assert lm_data.parse_answer("The answer is 445.") is None
    assert lm_data.parse_answer("") is None


def test_cached_greedy_decode_equals_full_recompute():
    """The key/value-cache decoder equals re-running the whole model at every step (LoRA,
    adapters, prompt and prefix tuning included)."""
    # The smoke test's tiny Llama (2 query heads sharing 1 key/value head), with 2 layers.
    cfg = dataclasses.replace(
        get_config(quick=True).pretrain.model, num_hidden_layers=2
    )
    model = build(cfg, seed=3)
    split = {k: v[:24] for k, v in lm_data.addition_task()["val"].items()}
    plen, n, t, max_new = split["prompt_len"], 24, lm_data.SEQ_LEN, 20
    prompt = np.where(np.arange(t) < plen[:, None], split["tokens"], PAD)
    prompt = prompt.astype(np.int32)

    def reference(lm=model):
        # The whole model at every step (one compiled forward: eager calls would compile
        # every op on its own).
        graphdef, state = nnx.split(lm)
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        ref, done = prompt.copy(), np.zeros(n, bool)
        for s in range(max_new):
            pos = plen + s - 1
            nxt = np.asarray(forward(state, jnp.asarray(ref)))[
                np.arange(n), pos
            ].argmax(-1)
            nxt = np.where(done, PAD, nxt)
            ref[np.arange(n), pos + 1] = nxt
            done |= nxt == EOS
        return ref, done

    # A random model never says EOS: make EOS beat the most frequent later token, so
    # that rows stop at different steps (the done/PAD path is exercised).
    ref, _ = reference()
    later = ref[np.arange(n)[:, None], plen[:, None] + np.arange(1, max_new)]
    common = np.bincount(later.ravel()).argmax()
    head = model.lm_head.embedding  # the untied unembedding [V, D]
    head[...] = head[...].at[EOS].set(head[...][common] * 1.5)
    ref, done = reference()
    graphdef, params = nnx.split(model, nnx.Param)
    got = np.asarray(make_greedy_decode(graphdef, max_new)((params,), prompt, plen))
    np.testing.assert_array_equal(got, ref)
    stop = [np.flatnonzero(r == EOS) for r in ref]
    assert done.any() and len({int(x[0]) for x in stop if len(x)}) > 1
    assert len({tuple(r) for r in ref}) > 1
    # LoRA-wrapped projections decode through the same path.
    lora = flowjax.add_lora(
        model, 2, rngs=nnx.Rngs(0), select=lm_train.lora_filter(LORA_TARGETS)
    )
    lg, lora_p, rest = nnx.split(lora, nnx.LoRAParam, ...)
    got_lora = np.asarray(make_greedy_decode(lg, max_new)((lora_p, rest), prompt, plen))
    np.testing.assert_array_equal(got_lora, ref)  # B = 0: the same function
    # Trained-looking adapters (a nonzero up-projection) also decode through it.
    adapted = flowjax.add_adapters(
        model, 4, rngs=nnx.Rngs(1), select=lm_train.lora_filter(("o_proj", "down_proj"))
    )
    for layer in adapted.layers:
        for part in (layer.self_attn.o_proj, layer.mlp.down_proj):
            up = part.adapter.up_kernel
            up[...] = jax.random.normal(jax.random.key(2), up[...].shape)
    ref_a, _ = reference(adapted)
    assert not np.array_equal(ref_a, ref)
    ag, ad_p, rest = nnx.split(adapted, flowjax.AdapterParam, ...)
    got_a = np.asarray(make_greedy_decode(ag, max_new)((ad_p, rest), prompt, plen))
    np.testing.assert_array_equal(got_a, ref_a)
    # A soft prompt (cache positions 0 .. L-1) and a prefix (before the cache, each layer).
    c = model.config
    soft = flowjax.PromptTuning(model, 4, c.hidden_size, rngs=nnx.Rngs(0))
    soft.prompt[...] = jax.random.normal(jax.random.key(3), soft.prompt[...].shape)
    prefix = flowjax.PrefixTuning(
        model, 3, num_layers=2, num_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    prefix.prefix[...] = 3 * jax.random.normal(
        jax.random.key(4), prefix.prefix[...].shape
    )
    for wrapped, kind in ((soft, flowjax.PromptParam), (prefix, flowjax.PrefixParam)):
        ref_w, _ = reference(wrapped)
        assert not np.array_equal(ref_w, ref), kind.__name__
        wg, w_p, rest = nnx.split(wrapped, kind, ...)
        got_w = np.asarray(make_greedy_decode(wg, max_new)((w_p, rest), prompt, plen))
        np.testing.assert_array_equal(got_w, ref_w)


def _tuner(quick, cfg, tmp_path=None):
    """A FineTuner over the smoke test's pre-trained model (its cache), as run.py builds it."""
    stream, _, sha = lm_data.pydoc_streams()
    params, _ = pretrained_params(cfg.pretrain, quick / "cache", stream, sha, False)
    graphdef = nnx.split(nnx.eval_shape(lambda: build(cfg.pretrain.model)), nnx.Param)[
        0
    ]
    task = lm_data.addition_task()
    task = {s: {k: v[: cfg.n_train] for k, v in d.items()} for s, d in task.items()}
    # Sequence weights in (0, 1) standing in for the pre-pass's (FLOW + QLoRA reads them).
    weights = {"sequence": np.linspace(0.2, 1.0, cfg.n_train, dtype=np.float32)}
    ckpt = None if tmp_path is None else tmp_path / "checkpoints"
    return lm_methods.FineTuner(
        params, graphdef, task, weights, cfg, False, checkpoints=ckpt, replay=stream
    )


@pytest.fixture(scope="module")
def added_tuner(quick, tmp_path_factory):
    cfg = dataclasses.replace(
        get_config(quick=True), ft_steps=2, curve_every=2, n_train=32
    )
    return _tuner(quick, cfg, tmp_path_factory.mktemp("added"))


def test_added_methods_train_their_parts_only(added_tuner):
    """Adapters, QLoRA, FLOW + QLoRA, I-LoRA, prompt and prefix tuning: a short fit each; the base
    never moves; I-LoRA restores."""
    tuner = added_tuner
    ckpt = tuner.checkpoints
    tokens = jnp.asarray(tuner.task["train"]["tokens"][:4])
    forward = jax.jit(lambda g, *state: nnx.merge(g, *state)(tokens), static_argnums=0)
    base_logits = np.asarray(forward(tuner.graphdef, tuner.params))
    trainable = {
        "adapters": flowjax.AdapterParam,
        "qlora": nnx.LoRAParam,
        "prompt": flowjax.PromptParam,
        "prefix": flowjax.PrefixParam,
    }
    for method in ("adapters", "qlora", "flow_qlora", "prompt", "prefix", "ilora"):
        _, (graphdef, before, frozen0) = tuner._model(method, 0)
        if method in trainable:  # only the method's own Variables train
            kind = trainable[method]
            leaves = jax.tree.leaves(
                before, is_leaf=lambda x: isinstance(x, nnx.Variable)
            )
            assert leaves and all(isinstance(v, kind) for v in leaves)
        view = tuner._evaluated(method, before)
        logits0 = np.asarray(forward(graphdef, view, frozen0))
        if method in ("adapters", "ilora"):  # W_up = 0 / B = 0: the base model exactly
            np.testing.assert_array_equal(logits0, base_logits)
        elif method in ("prompt", "prefix"):  # random prompt / prefix: another model
            assert np.isfinite(logits0).all() and (logits0 != base_logits).any()
        else:  # the NF4 base: close to the float model, not equal
            assert 0 < np.abs(logits0 - base_logits).max() < 0.5
        # A finite loss, or it raises; only I-LoRA checkpoints (the restore below).
        tuner.checkpoints = ckpt if method == "ilora" else None
        _, (after, frozen) = tuner.run(method, 3e-3, 0)
        moved = jax.tree.map(lambda a, b: bool((a != b).any()), after, view)
        assert any(jax.tree.leaves(moved)), method
        assert jax.tree.all(
            jax.tree.map(lambda a, b: bool((a == b).all()), frozen, frozen0)
        ), f"{method}: the frozen base changed"
    # I-LoRA's {"fast", "slow"} train state comes back from its checkpoint.
    again = tuner.run("ilora", 3e-3, 0)[1][0]
    assert tuner.resume_log.restored == ["ilora lr=0.003 seed=0"]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), again, after))


def test_ilora_objective_by_hand(added_tuner):
    """(SFT + replay LM loss) / 2 + γ mean relu(h_s - h_f)^2, from the model's own forward."""
    tuner = added_tuner
    _, (graphdef, lora, rest) = tuner._model("ilora", 0)
    rng = np.random.default_rng(0)
    noisy = lambda t: jax.tree.map(  # noqa: E731
        lambda x: x + 0.3 * rng.normal(size=x.shape).astype(x.dtype), t
    )
    params = {"fast": noisy(lora["fast"]), "slow": noisy(lora["slow"])}
    train = tuner.task["train"]
    stream = tuner.replay
    replay = np.stack([stream[i : i + 64] for i in (0, 1000, 5000)])
    batch = {
        "tokens": train["tokens"][:3],
        "mask": train["mask"][:3],
        "weight": np.ones(3, np.float32),
        "replay": replay,
    }
    gamma = 2.5
    objective = lm_methods.ilora_objective(graphdef, gamma)

    @jax.jit  # one program: the objective, and the model's own logits and hidden states
    def parts(params):
        fast = nnx.merge(graphdef, params["fast"], rest)
        slow = nnx.merge(graphdef, params["slow"], rest)
        return (
            objective(params, batch, rest),
            fast(batch["tokens"]),
            fast(replay),
            fast.hidden(replay),
            slow.hidden(replay),
        )

    got, task_logits, replay_logits, hf, hs = (np.asarray(x) for x in parts(params))
    tok, m = batch["tokens"], batch["mask"]
    sft = lm_methods.sft_loss(task_logits, tok, m, batch["weight"], level="sequence")
    logp = np.asarray(jax.nn.log_softmax(replay_logits[:, :-1], -1), np.float64)
    lm = -np.take_along_axis(logp, replay[:, 1:, None], -1).mean()
    cons = np.mean(np.maximum(hs - hf, 0.0) ** 2)
    assert cons > 0
    np.testing.assert_allclose(
        float(got), (float(sft) + lm) / 2 + gamma * cons, rtol=1e-5
    )


def test_run_digests_ignore_other_methods_settings():
    """The first seven methods' digests are those of their checkpoints; settings reach their own methods only."""
    cfg = get_config()
    tuner = lm_methods.FineTuner(
        {"w": np.zeros(2)}, None, None, {"sequence": np.ones(3)}, cfg, False,
        replay=np.arange(10),
    )  # fmt: skip
    # The config digest the first seven methods' checkpoints were named with (main, before
    # the added methods): report.digest(report.config_dict(get_config())) of that code.
    first = "dd0681c46bd1de6014908a42c4725f161f4df742d3bc0660e74810f8e88a2ffa"
    assert tuner.run_info("standard", 1e-3, 0)["config"] == first
    other = dataclasses.replace(
        cfg, methods=("standard",), adapter_bottleneck=7, ilora_decay=0.5
    )
    t2 = lm_methods.FineTuner(
        {"w": np.zeros(2)}, None, None, {"sequence": np.ones(3)}, other, False,
        replay=np.arange(10),
    )  # fmt: skip
    for method in ("standard", "lora", "qlora"):
        assert t2.run_info(method, 1e-3, 0) == tuner.run_info(method, 1e-3, 0)
    for method in ("adapters", "ilora"):
        assert t2.run_info(method, 1e-3, 0) != tuner.run_info(method, 1e-3, 0)
    assert tuner.run_info("ilora", 1e-3, 0)["settings"] == {
        "ilora_decay": 0.25, "ilora_consistency": 1.0,
    }  # fmt: skip
    assert "settings" not in tuner.run_info("lora", 1e-3, 0)
    assert tuner.run_info("prefix", 1e-3, 0)["settings"] == {"prefix_length": 8}
    known = set(lm_methods.PEFT_FIELDS)
    assert set().union(*(m.settings for m in lm_methods.METHODS.values())) == known
