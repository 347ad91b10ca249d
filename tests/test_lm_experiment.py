"""Smoke test of experiments/lm/run.py (--quick) and of its orbax pre-training cache."""

import json
import math

import numpy as np
import pytest

from experiments.lm import data as lm_data
from experiments.lm import run as lm_run
from experiments.lm.model import BOS, EOS, decode


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
    assert [len(task[s]["id"]) for s in ("train", "val", "test")] == [8500, 500, 1000]
    ids = np.concatenate([task[s]["id"] for s in task])
    assert len(np.unique(ids)) == 10000  # disjoint and complete
    tr = task["train"]
    r = 0
    a, b = divmod(int(tr["id"][r]), 10)
    p = tr["prompt_len"][r]
    assert (
        tr["tokens"][r, 0] == BOS and decode(tr["tokens"][r, :p]) == f"Q: {a}+{b}=\nA: "
    )
    target = tr["tokens"][r][tr["mask"][r]]
    assert decode(target) == str(a + b) and target[-1] == EOS
    assert not tr["mask"][r, :p].any()
    train, held, _ = lm_data.pydoc_streams()
    assert len(train) + len(held) > 460_000 and 0.15 < len(held) / len(train) < 0.35
    assert train.dtype == np.int32 and train.max() <= EOS
