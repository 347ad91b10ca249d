"""Smoke test of experiments/lm/run.py (--quick) and of its orbax pre-training cache."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flowjax
from experiments.lm import data as lm_data
from experiments.lm import run as lm_run
from experiments.lm.model import (
    BOS,
    EOS,
    LORA_TARGETS,
    PAD,
    LMConfig,
    build,
    decode,
    make_greedy_decode,
)


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
    assert set(report["methods"]) == set(lm_run.METHODS)
    for m in report["methods"].values():
        ppl, em = m["perplexity"], m["exact_match"]
        assert len(ppl["values"]) == len(em["values"]) == len(lm_run.QUICK.seeds)
        assert all(math.isfinite(p) and p > 1 for p in ppl["values"])
        assert all(0 <= e <= 1 for e in em["values"])
        # A completion equal to the reference also has the right number.
        assert all(
            x <= e + 1e-12
            for x, e in zip(m["exact_response"]["values"], em["values"], strict=True)
        )
        assert ppl["mean"] == pytest.approx(np.mean(ppl["values"]))
        assert m["lr"] in lm_run.QUICK.lr_grid
    # LoRA starts at the pre-trained model and moves little in 12 steps; full FT moves more.
    pre = report["pretrained"]["perplexity"]
    assert abs(report["methods"]["lora"]["perplexity"]["mean"] - pre) < abs(
        report["methods"]["standard"]["perplexity"]["mean"] - pre
    )
    w = report["weights"]
    assert 0 < w["tau_seq"] and 0 < w["tau_tok"]
    assert w["sequence"]["n"] == lm_run.QUICK.n_train
    assert w["sequence_mean1"]["mean"] == pytest.approx(1.0, rel=1e-5)
    # Every target token is classified: 14 scaffold bytes, the digits, "." and EOS.
    kinds = w["token_by_kind"]
    assert sum(k["n"] for k in kinds.values()) == w["token"]["n"]
    assert kinds["scaffold"]["n"] == 14 * w["sequence"]["n"]
    assert kinds["EOS"]["n"] == kinds["'.'"]["n"] == w["sequence"]["n"]
    assert report["pretrain"]["cache_hit"] is False
    assert report["pretrain"]["steps_run"] == lm_run.QUICK.pretrain.steps
    md = (out / "results.md").read_text()
    assert all(name in md for name in lm_run.METHODS.values())
    for png in ("tradeoff.png", "weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretraining_cache_is_reused(quick, capsys):
    report = json.loads((quick / "out" / "results.json").read_text())
    stream, _, sha = lm_data.pydoc_streams()
    params, info = lm_run.pretrained_params(
        lm_run.QUICK.pretrain, quick / "cache", stream, sha, progress=False
    )
    assert info["cache_hit"] is True and info["steps_run"] == 0
    assert info["cache_dir"] == report["pretrain"]["cache_dir"]
    assert "pre-training skipped" in capsys.readouterr().out
    # The restored model is the one that was evaluated: same held-out perplexity.
    graphdef = lm_run.nnx.split(
        lm_run.nnx.eval_shape(lambda: lm_run.build(lm_run.QUICK.pretrain.model)),
        lm_run.nnx.Param,
    )[0]
    ev = lm_run.lm_train.Evaluator(graphdef)
    windows = lm_data.heldout_windows(
        lm_data.pydoc_streams()[1],
        lm_run.QUICK.pretrain.model.max_len,
        lm_run.QUICK.ppl_windows,
    )
    assert ev.perplexity((params,), windows) == pytest.approx(
        report["pretrained"]["perplexity"], rel=1e-5
    )


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
    """The key/value-cache decoder equals re-running the whole model at every step."""
    cfg = LMConfig(d_model=32, num_heads=2, num_layers=2, d_ff=64)
    model = build(cfg, seed=3)
    split = {k: v[:24] for k, v in lm_data.addition_task()["val"].items()}
    plen, n, t, max_new = split["prompt_len"], 24, lm_data.SEQ_LEN, 20
    prompt = np.where(np.arange(t) < plen[:, None], split["tokens"], PAD)
    prompt = prompt.astype(np.int32)

    def reference():
        ref, done = prompt.copy(), np.zeros(n, bool)
        for s in range(max_new):
            pos = plen + s - 1
            nxt = np.asarray(model(jnp.asarray(ref)))[np.arange(n), pos].argmax(-1)
            nxt = np.where(done, PAD, nxt)
            ref[np.arange(n), pos + 1] = nxt
            done |= nxt == EOS
        return ref, done

    # A random model never says EOS: make EOS beat the most frequent later token, so
    # that rows stop at different steps (the done/PAD path is exercised).
    ref, _ = reference()
    later = ref[np.arange(n)[:, None], plen[:, None] + np.arange(1, max_new)]
    common = np.bincount(later.ravel()).argmax()
    kernel = model.lm_head.kernel
    kernel[...] = kernel[...].at[:, EOS].set(kernel[...][:, common] * 1.5)
    ref, done = reference()
    graphdef, params = nnx.split(model, nnx.Param)
    got = np.asarray(make_greedy_decode(graphdef, max_new)((params,), prompt, plen))
    np.testing.assert_array_equal(got, ref)
    stop = [np.flatnonzero(r == EOS) for r in ref]
    assert done.any() and len({int(x[0]) for x in stop if len(x)}) > 1
    assert len({tuple(r) for r in ref}) > 1
    # LoRA-wrapped projections decode through the same path.
    lora = flowjax.add_lora(model, 2, rngs=nnx.Rngs(0), select=LORA_TARGETS)
    lg, lora_p, rest = nnx.split(lora, nnx.LoRAParam, ...)
    got_lora = np.asarray(make_greedy_decode(lg, max_new)((lora_p, rest), prompt, plen))
    np.testing.assert_array_equal(got_lora, ref)  # B = 0: the same function
