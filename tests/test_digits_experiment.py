"""The digits experiment: a --quick smoke run, the split, and the task-part swap."""

import json
import math

import jax
import numpy as np
import pytest

from experiments.digits import model as M
from experiments.digits import protocol as P
from experiments.digits import run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    results = run.main(["--quick", "--out", str(out)])
    return out, results


@pytest.fixture(scope="module")
def seed_run():
    """A quick-config seed: pre-trained model, LP model at LR 0.1."""
    r = run.SeedRun(run.Config.quick(), P.make_tasks(), seed=3, lrs={"LP": 0.1})
    return r


def test_writes_every_output(quick_run):
    out, results = quick_run
    assert json.loads((out / "results.json").read_text()) == results
    for name in ("pareto.png", "weights.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
    md = (out / "results.md").read_text()
    for name in run.Config.quick().methods:
        assert f"\n| {name} | " in md
    assert "Hard examples" in md and "FLOW minus" in md


def test_results_are_well_formed(quick_run):
    _, res = quick_run
    cfg = run.Config.quick()
    assert res["config"]["seeds"] == 1 and len(res["per_seed"]) == 1
    assert set(res["selected_lr"]) == set(cfg.methods)
    for name, lr in res["selected_lr"].items():
        assert lr in cfg.lr_grid
        grid = res["lr_selection"][name]
        assert lr == grid["lr"][int(np.argmax(grid["val_target_acc"]))]
    row = res["per_seed"][0]
    n_hard = math.ceil(0.1 * res["split"]["finetune_test"])
    assert row["flow"]["num_hard"] == n_hard
    assert set(row["methods"]) == set(cfg.methods)
    for name, m in row["methods"].items():
        for k in (
            "target_acc",
            "pretrain_acc",
            "average",
            "val_target_acc",
            "hard_acc",
        ):
            assert 0.0 <= m[k] <= 1.0, (name, k)
        assert m["average"] == (m["target_acc"] + m["pretrain_acc"]) / 2
        # accuracies are counts over the split sizes
        n_test = res["split"]["finetune_test"]
        assert abs(m["target_acc"] * n_test - round(m["target_acc"] * n_test)) < 1e-6
        assert res["summary"][name]["average"]["mean"] == pytest.approx(m["average"])
    # LP changes only the head and BN running statistics, which the swap restores:
    # its pre-training accuracy is exactly the pre-trained model's, its body unchanged.
    lp = row["methods"]["LP"]
    assert lp["pretrain_acc"] == row["pretrained"]["pretrain_test_acc"]
    assert lp["body_distance"] == 0.0
    assert row["methods"]["FT"]["body_distance"] > 0.1
    assert 0 < row["flow"]["weight_min"] <= math.exp(-1) + 1e-6
    # split sizes: 20 % test, 20 % of the rest validation, of 1,797 records
    sizes = res["split"]
    assert sum(sizes.values()) == 1797
    assert sizes["pretrain_test"] + sizes["finetune_test"] == 360


def test_split_is_disjoint_stratified_and_deterministic():
    t = P.make_tasks()
    again = P.make_tasks()
    all_ids = []
    for task, digits in (
        (t.pretrain, P.PRETRAIN_DIGITS),
        (t.finetune, P.FINETUNE_DIGITS),
    ):
        for split in ("train", "val", "test"):
            ids = getattr(task, split)
            np.testing.assert_array_equal(
                ids, getattr(getattr(again, task.name), split)
            )
            labels = np.concatenate([b["label"] for b in P.batches(ids, 512)])
            assert set(labels.tolist()) == set(digits)
            all_ids.append(ids)
    ids = np.concatenate(all_ids)
    assert len(np.unique(ids)) == len(ids) == 1797
    # stratified: every digit has 20 % ± 1 of its records in test
    test = np.concatenate([t.pretrain.test, t.finetune.test])
    digits = np.concatenate([b["label"] for b in P.batches(None, 4096)])
    for d in range(10):
        n = np.sum(digits == d)
        assert abs(np.sum(digits[test] == d) - 0.2 * n) <= 1


def test_batches_shuffle_and_drop_remainder():
    ids = np.arange(100, 171)
    plain = list(P.batches(ids, 32))
    assert [len(b["id"]) for b in plain] == [32, 32, 7]
    shuffled = list(
        P.batches(ids, 32, rng=np.random.default_rng(0), drop_remainder=True)
    )
    assert [len(b["id"]) for b in shuffled] == [32, 32]
    got = np.concatenate([b["id"] for b in shuffled])
    assert len(np.unique(got)) == 64 and set(got) <= set(ids)
    assert not np.array_equal(got, ids[:64])
    images, labels = P._load_digits()
    b = shuffled[1]
    np.testing.assert_array_equal(b["image"], images[b["id"]])
    np.testing.assert_array_equal(b["label"], labels[b["id"]])


def test_shift_augment_is_a_translation():
    images = np.random.default_rng(0).random((20, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        P.shift_augment(images, np.random.default_rng(1), 0), images
    )
    out = P.shift_augment(images, np.random.default_rng(1), 1)
    dy, dx = np.random.default_rng(1).integers(0, 3, size=(2, 20))
    for i in range(20):
        padded = np.pad(images[i], ((1, 1), (1, 1), (0, 0)))
        np.testing.assert_array_equal(
            out[i], padded[dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        )
    assert len({(a, b) for a, b in zip(dy, dx, strict=True)}) > 1


def test_cosine_schedule_is_per_epoch():
    assert P.lr_at(0.2, 0, 10, "cosine") == 0.2
    assert P.lr_at(0.2, 5, 10, "cosine") == pytest.approx(0.1)
    assert P.lr_at(0.2, 9, 10, "cosine") == pytest.approx(
        0.1 * (1 + math.cos(0.9 * math.pi))
    )
    assert P.lr_at(0.2, 7, 10, "constant") == 0.2
    with pytest.raises(ValueError, match="schedule"):
        P.lr_at(0.2, 0, 10, "linear")


def _leaves_equal(a, b):
    return all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _logits(net, task):
    fn = P._logits_fn(net.graphdef)
    images = np.concatenate([b["image"] for b in task.batches(task.test, 512)])
    return np.asarray(fn(*net.arrays, images))


def test_swap_restores_pretrained_head_and_batchnorm(seed_run):
    r = seed_run
    pre, pretrain = r.pretrained, r.tasks.pretrain
    assert M.task_specific_modules(pre) == {"head", "bn1", "bn2"}
    # An unchanged pre-trained body with everything task-specific changed: the LP
    # model (new head, BN running stats adapted to 5-9), with its BN scale and bias
    # moved too.
    lp = r.lp()
    assert _leaves_equal(lp.params["conv1"], pre.params["conv1"])
    assert not _leaves_equal(lp.stats, pre.stats)
    bn = {
        k: {"scale": v["scale"] * 1.5, "bias": v["bias"] + 0.3}
        for k, v in lp.params.items()
        if k.startswith("bn")
    }
    ft = lp._replace(params={**lp.params, **bn})

    restored = P.swap_task_parts(ft, pre, M.task_specific_mask(pre))
    assert _leaves_equal(restored.params, pre.params) and _leaves_equal(
        restored.stats, pre.stats
    )
    pre_acc = P.accuracy(pre, pretrain, pretrain.test)
    assert P.pretraining_accuracy(ft, pre, pretrain) == pre_acc
    np.testing.assert_array_equal(_logits(restored, pretrain), _logits(pre, pretrain))

    # Wrong swaps give different predictions: the test above would catch them.
    def wrong(modules, stats_too=True):
        m = M.mask(pre, modules)
        if not stats_too:
            m = m._replace(stats=jax.tree.map(lambda _: False, m.stats))
        return P.swap_task_parts(ft, pre, m)

    ref = _logits(pre, pretrain)
    for bad in (
        wrong({"head"}),  # BN not restored
        wrong(
            {"head", "bn1", "bn2"}, stats_too=False
        ),  # running statistics not restored
        wrong({"bn1", "bn2"}),  # fine-tuned head kept
    ):
        assert np.max(np.abs(_logits(bad, pretrain) - ref)) > 1e-2
    # a 5-9 head on 0-4 images cannot match the pre-trained accuracy
    assert P.accuracy(wrong({"bn1", "bn2"}), pretrain, pretrain.test) < pre_acc - 0.3
    # the running statistics alone matter: only they differ here
    stats_only = pre._replace(stats=lp.stats)
    assert np.max(np.abs(_logits(stats_only, pretrain) - ref)) > 1e-2


def test_swap_keeps_the_finetuned_body(seed_run):
    pre = seed_run.pretrained
    moved = jax.tree.map(lambda x: x + 1.0, pre.params)
    ft = seed_run.lp()._replace(
        params={**seed_run.lp().params, "conv1": moved["conv1"], "fc": moved["fc"]}
    )
    out = P.swap_task_parts(ft, pre, M.task_specific_mask(pre))
    assert _leaves_equal(out.params["conv1"], moved["conv1"])
    assert _leaves_equal(out.params["fc"], moved["fc"])
    assert _leaves_equal(out.params["conv2"], pre.params["conv2"])
    for k in ("head", "bn1", "bn2"):
        assert _leaves_equal(out.params[k], pre.params[k])
    assert _leaves_equal(out.stats, pre.stats)
    assert M.body_distance(out, pre) == pytest.approx(
        math.sqrt(
            sum(
                x.size for x in jax.tree.leaves((pre.params["conv1"], pre.params["fc"]))
            )
        ),
        rel=1e-5,
    )


def test_flow_weights_follow_the_lp_losses(seed_run):
    table = seed_run.lp_losses("train")
    np.testing.assert_array_equal(table.ids, seed_run.tasks.finetune.train)
    # the pre-pass equals a direct eval-mode forward of the LP model
    lp, ft = seed_run.lp(), seed_run.tasks.finetune
    images = np.concatenate([b["image"] for b in ft.batches(ft.train, 4096)])
    labels = np.concatenate([b["label"] for b in ft.batches(ft.train, 4096)])
    logits = np.asarray(P._logits_fn(lp.graphdef)(*lp.arrays, images), np.float64)
    logz = np.log(
        np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)
    ) + logits.max(1)
    np.testing.assert_allclose(
        table.losses,
        logz - logits[np.arange(len(labels)), labels],
        rtol=1e-4,
        atol=1e-5,
    )
    w = seed_run.flow_weights()
    tau = float(np.median(table.losses))
    assert w.temperature == pytest.approx(tau)
    np.testing.assert_allclose(
        w.weights, np.exp(-table.losses / tau), rtol=1e-5, atol=1e-12
    )
    hard = seed_run.hard_ids()
    test_losses = seed_run.lp_losses("test")
    assert len(hard) == math.ceil(0.1 * len(test_losses))
    assert test_losses.lookup(hard).min() >= np.max(
        np.delete(test_losses.losses, np.searchsorted(test_losses.ids, hard))
    )
