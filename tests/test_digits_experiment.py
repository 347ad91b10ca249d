"""The digits experiment: a --quick smoke run, the split, and the task-part swap."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import flowjax
from experiments import report
from experiments.digits import methods, run
from experiments.digits import model as M
from experiments.digits import protocol as P
from experiments.digits.config import get_config
from experiments.digits.dataset import split_ids

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick --out digits`` from a temporary directory (a relative --out: the command
    recorded in results.json is then the same for the kill test's run elsewhere)."""
    base = tmp_path_factory.mktemp("digits")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        results = run.main(["--quick", "--out", "digits"])
    finally:
        os.chdir(cwd)
    return base / "digits", results


@pytest.fixture(scope="module")
def seed_run():
    """A quick-config seed: pre-trained model, LP model at LR 0.1."""
    r = methods.SeedRun(get_config(quick=True), P.make_tasks(), seed=3, lrs={"LP": 0.1})
    return r


def test_writes_every_output(quick_run):
    out, results = quick_run
    assert json.loads((out / "results.json").read_text()) == results
    for name in ("pareto.png", "weights.png", "retention.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
    # Wall-clock values live in timing.json only: results.json compares byte for byte.
    timing = json.loads((out / "timing.json").read_text())
    assert timing["total_s"] > 0 and timing["stages_restored_from_checkpoints"] == 0
    assert "runtime" not in json.dumps(results) and '_s"' not in json.dumps(results)
    # Every stage checkpointed under --out/checkpoints (pre-training included).
    stages = list((out / "checkpoints" / "seed0").iterdir())
    assert any(p.name.startswith("pretrain-") for p in stages)
    assert all(any(c.name.isdigit() for c in p.iterdir()) for p in stages)
    md = (out / "results.md").read_text()
    for name in get_config(quick=True).methods:
        assert f"\n| {name} | " in md
    assert "Hard examples" in md and "FLOW minus" in md and "WiSE-FT sweep" in md


def test_results_are_well_formed(quick_run):
    _, res = quick_run
    cfg = get_config(quick=True)
    # the whole config, the methods' settings included, is recorded
    assert res["config"] == report.config_dict(cfg)
    assert res["config"]["lora_rank"] == 4 and res["config"]["wise_alpha"] == 0.5
    assert res["config"]["seeds"] == 1 and len(res["per_seed"]) == 1
    assert set(res["selected_lr"]) == set(cfg.methods) == set(methods.METHODS)
    for name, lr in res["selected_lr"].items():
        if methods.METHODS[name].lr_grid == ():  # WiSE-FT: no LR of its own
            assert lr is None and name not in res["lr_selection"]
            continue
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
    assert sizes["pretrain_test"] + sizes["finetune_test"] == 359


def test_wise_ft_rows_match_the_sweep(quick_run):
    """WiSE-FT (α = 0.5) is the sweep's α = 0.5 point; α = 0 is the fine-tuned model, α = 1 θ₀."""
    _, res = quick_run
    row = res["per_seed"][0]
    for base, wise in (("FT", "WiSE-FT"), ("FLOW", "FLOW + WiSE-FT")):
        curve = row["wise_ft_curve"][base]
        cfg = get_config(quick=True)
        assert curve["alpha"] == list(cfg.wise_alphas)
        i = curve["alpha"].index(cfg.wise_alpha)
        for k in ("target_acc", "pretrain_acc"):
            assert curve[k][i] == row["methods"][wise][k]
            assert curve[k][0] == row["methods"][base][k]
        assert curve["pretrain_acc"][-1] == row["pretrained"]["pretrain_test_acc"]
        summary = res["summary"]["wise_ft_curve"][base]
        assert summary["target_acc"]["mean"] == curve["target_acc"]
    # LoRA: the convolutions are frozen and fc moves only by the merged low-rank update
    assert 0 < row["methods"]["LoRA"]["body_distance"]
    pairs = res["summary"]["pairs"]
    assert set(pairs) == {"FLOW + LoRA − LoRA", "FLOW + WiSE-FT − WiSE-FT"}
    d = pairs["FLOW + LoRA − LoRA"]["average"]["mean"]
    m = row["methods"]
    assert d == pytest.approx(m["FLOW + LoRA"]["average"] - m["LoRA"]["average"])


def test_split_is_disjoint_stratified_and_deterministic():
    t = P.make_tasks()
    again = P.make_tasks()
    all_ids = []
    for task, digits in (
        (t.pretrain, P.PRETRAIN_DIGITS),
        (t.finetune, P.FINETUNE_DIGITS),
    ):
        for split in ("train", "val", "test"):
            ids = task.ids(split)
            np.testing.assert_array_equal(ids, getattr(again, task.name).ids(split))
            labels = task.arrays(split)["label"] + task.offset
            assert set(labels.tolist()) == set(digits)
            all_ids.append(ids)
    ids = np.concatenate(all_ids)
    assert len(np.unique(ids)) == len(ids) == 1797
    # test = the dataset's fixed stratified test split; validation: 20 % of train
    digits = load_digits().target
    test = np.concatenate([t.pretrain.test, t.finetune.test])
    np.testing.assert_array_equal(np.sort(test), split_ids(digits)["test"])
    val = np.concatenate([t.pretrain.val, t.finetune.val])
    for d in range(10):
        n_train = np.sum(digits == d) - np.sum(digits[test] == d)
        assert abs(np.sum(digits[val] == d) - 0.2 * n_train) <= 1


def test_data_goes_through_tfds_and_flowjax_batches():
    """Images and labels equal load_digits() row by id; shift augmentation is a translation."""
    d = load_digits()
    task = P.make_tasks().finetune
    data = task.arrays("val")  # read with flowjax.batches + normalise
    np.testing.assert_array_equal(
        data["image"][..., 0], (d.images[data["id"]] / 16).astype(np.float32)
    )
    np.testing.assert_array_equal(data["label"], d.target[data["id"]] - 5)
    stream = P.train_stream(task, 3, 2, P.Optim(batch_size=32, max_shift=1))
    assert P.train_stream(task, 3, 2, P.Optim(batch_size=32, max_shift=1)) is stream
    n = len(task.train)
    assert len(stream) == 2 * (n // 32) and {len(b["id"]) for b in stream} == {32}
    epoch0 = np.concatenate([b["id"] for b in stream[: n // 32]])
    assert len(np.unique(epoch0)) == len(epoch0)
    assert not np.array_equal(epoch0, np.sort(epoch0))  # shuffled
    shifts = set()
    for b in stream[:4]:
        for i, img in zip(b["id"], b["image"], strict=True):
            raw = (d.images[i] / 16).astype(np.float32)[..., None]
            found = [
                (dy, dx)
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if np.array_equal(img, P.shift(raw, dy, dx))
            ]
            assert found, i
            shifts.add(found[0])
    assert len(shifts) > 3


def test_shift_is_a_translation():
    img = np.arange(1, 65, dtype=np.float32).reshape(8, 8, 1)
    np.testing.assert_array_equal(P.shift(img, 0, 0), img)
    out = P.shift(img, 1, -1)
    np.testing.assert_array_equal(out[1:, :-1], img[:-1, 1:])
    assert (out[0] == 0).all() and (out[:, -1] == 0).all()


def test_cosine_schedule_is_per_epoch():
    assert P.lr_factor(0, 10, "cosine") == 1.0
    assert P.lr_factor(5, 10, "cosine") == pytest.approx(0.5)
    assert P.lr_factor(9, 10, "cosine") == pytest.approx(
        (1 + math.cos(0.9 * math.pi)) / 2
    )
    assert P.lr_factor(7, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        P.lr_factor(0, 10, "linear")
    # The stage's transformation: -lr × factor(step // steps_per_epoch) × direction.
    tx = P.stage_tx(optax.identity(), 0.2, 4, 3, "cosine")
    state = tx.init({"w": np.zeros(1, np.float32)})
    for step in range(12):
        u, state = tx.update({"w": np.ones(1, np.float32)}, state)
        want = -0.2 * (1 + math.cos(math.pi * (step // 3) / 4)) / 2
        np.testing.assert_allclose(u["w"], [want], rtol=1e-6)


def test_curves_end_at_each_methods_final_numbers(quick_run):
    """A method's retention curve: step 0 is its starting model, its last point its final model."""
    _, res = quick_run
    row = res["per_seed"][0]
    cfg = get_config(quick=True)
    steps = cfg.epochs * (res["split"]["finetune_train"] // cfg.batch_size)
    for name, m in row["methods"].items():
        curve = m["curve"]
        if methods.METHODS[name].lr_grid == ():  # WiSE-FT: trains nothing itself
            assert curve is None
            continue
        rounds = 2 if name in ("FLOW", "FLOW + LoRA", "DRO") else 1
        assert curve["step"][0] == 0 and curve["step"][-1] == rounds * steps, name
        assert curve["step"] == sorted(set(curve["step"]))
        assert len(curve["step"]) == 1 + rounds * cfg.epochs // cfg.curve_every
        assert curve["target_acc"][-1] == m["target_acc"], name
        assert curve["pretrain_acc"][-1] == m["pretrain_acc"], name
    # LP-FT and FLOW start from the LP model: the pre-trained accuracy at step 0.
    pre = row["pretrained"]["pretrain_test_acc"]
    assert row["methods"]["FLOW"]["curve"]["pretrain_acc"][0] == pre
    assert (
        row["methods"]["LP-FT"]["curve"]["target_acc"][0]
        == row["methods"]["LP"]["target_acc"]
    )


def _finished_stages(checkpoints: Path) -> int:
    """Stage directories holding at least one finished orbax checkpoint."""
    if not checkpoints.is_dir():
        return 0
    return sum(
        any(c.name.isdigit() for c in stage.iterdir())
        for seed in checkpoints.iterdir()
        for stage in seed.iterdir()
    )


# The kill test runs a subset of the methods (pre-training, LP, then FLOW's two weighted
# rounds and EWC with its Fisher state, at two LRs each): every kind of stage state in a third
# of the quick run's stages. Stages are content-addressed and deterministic, so each method's
# entries must equal, exactly, the uninterrupted full --quick run's.
KILL_SET = ["--set", "methods=('FLOW', 'EWC')"]


@pytest.mark.slow
def test_killed_twice_and_restarted_gives_the_same_results(quick_run, tmp_path, capsys):
    """``--quick --set methods=('FLOW', 'EWC')`` SIGKILLed twice, then finished, gives the uninterrupted run's numbers, exactly.

    The two killed runs are separate processes (SIGKILL at a random point of a random
    stage); the finishing run is ``run.main`` in this process, whose compiled programs
    the quick_run fixture already holds.
    """
    with open(quick_run[0] / "results.json") as f:
        full = json.load(f)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    # The runs load the programs the quick_run fixture compiled from the tests' persistent
    # compilation cache (tests/conftest.py): faster, the same numbers.
    args = ["--quick", *KILL_SET, "--out", "digits"]
    cmd = [sys.executable, "-m", "experiments.digits.run", *args]
    work = tmp_path / "killed"
    work.mkdir()
    checkpoints = work / "digits" / "checkpoints"
    stages = 9  # pre-training, then LP, FLOW round 1, FLOW round 2, EWC at two LRs each
    rng = np.random.default_rng(0)
    kill_at = sorted(rng.choice(np.arange(1, stages), size=2, replace=False).tolist())
    logs = []
    for i, target in enumerate(kill_at):
        log = tmp_path / f"run{i}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=f)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if _finished_stages(checkpoints) >= target:
                time.sleep(float(rng.uniform(0, 0.3)))  # anywhere in the next stage
                proc.kill()
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=300)
        logs.append(log.read_text())
        assert rc == -9, (
            f"run {i} ended (rc {rc}) before its kill point:\n{logs[-1][-3000:]}"
        )
    cwd = os.getcwd()
    os.chdir(work)
    try:
        capsys.readouterr()
        run.main(args)
        logs.append("".join(capsys.readouterr()))
    finally:
        os.chdir(cwd)
    for text in logs[1:]:  # every restart says what it took from the checkpoints
        assert "restored" in text or "resumed from step" in text, text[-3000:]
    assert _finished_stages(checkpoints) == stages
    with open(work / "digits" / "results.json") as f:
        killed = json.load(f)
    names = ["LP", "EWC", "FLOW"]
    assert killed["config"]["methods"] == ["FLOW", "EWC"]
    assert list(killed["selected_lr"]) == list(killed["lr_selection"]) == names
    for m in names:
        assert killed["selected_lr"][m] == full["selected_lr"][m], m
        assert killed["lr_selection"][m] == full["lr_selection"][m], m
    got, want = killed["per_seed"][0], full["per_seed"][0]
    assert got["pretrained"] == want["pretrained"] and got["flow"] == want["flow"]
    assert sorted(got["methods"]) == sorted(names)
    for (
        m
    ) in names:  # every number, curves included, bit for bit (JSON floats round-trip)
        assert got["methods"][m] == want["methods"][m], m


def _leaves_equal(a, b):
    return all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _logits(net, task):
    return P.logits(net, task.arrays("test")["image"])


def _swap(ft, pre, select):
    """flowjax.swap_task_parts on the whole model state, back to a Net."""
    return M.from_state(
        pre.graphdef, flowjax.swap_task_parts(M.state(ft), M.state(pre), select)
    )


def test_swap_restores_pretrained_head_and_batchnorm(seed_run):
    r = seed_run
    pre, pretrain = r.pretrained, r.tasks.pretrain
    assert M.task_specific(pre) == ["bn1", "bn2", "head"]
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

    restored = P.restore_task_parts(ft, pre)
    assert _leaves_equal(restored.params, pre.params) and _leaves_equal(
        restored.stats, pre.stats
    )
    pre_acc = P.accuracy(pre, pretrain, "test")
    assert P.pretraining_accuracy(ft, pre, pretrain) == pre_acc
    np.testing.assert_array_equal(_logits(restored, pretrain), _logits(pre, pretrain))

    # Wrong swaps give different predictions: the test above would catch them.
    ref = _logits(pre, pretrain)
    for bad in (
        _swap(ft, pre, M.modules("head")),  # BN not restored
        _swap(
            ft,
            pre,
            lambda path, _: (
                path[:2] in {("params", "head"), ("params", "bn1"), ("params", "bn2")}
            ),
        ),
        _swap(ft, pre, M.modules("bn1", "bn2")),  # fine-tuned head kept
    ):
        assert np.max(np.abs(_logits(bad, pretrain) - ref)) > 1e-2
    # (the second: BN scale and bias restored, running statistics not)
    # a 5-9 head on 0-4 images cannot match the pre-trained accuracy
    assert (
        P.accuracy(_swap(ft, pre, M.modules("bn1", "bn2")), pretrain, "test")
        < pre_acc - 0.3
    )
    # the running statistics alone matter: only they differ here
    stats_only = pre._replace(stats=lp.stats)
    assert np.max(np.abs(_logits(stats_only, pretrain) - ref)) > 1e-2


def test_swap_keeps_the_finetuned_body(seed_run):
    pre = seed_run.pretrained
    moved = jax.tree.map(lambda x: x + 1.0, pre.params)
    ft = seed_run.lp()._replace(
        params={**seed_run.lp().params, "conv1": moved["conv1"], "fc": moved["fc"]}
    )
    out = P.restore_task_parts(ft, pre)
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


def test_trainable_masks_match_the_methods(seed_run):
    net = seed_run.new_head()
    head = M.trainable(net, "head")
    assert head["head"] == {"kernel": True, "bias": True}
    assert not any(jax.tree.leaves({k: v for k, v in head.items() if k != "head"}))
    assert all(jax.tree.leaves(M.trainable(net, "all")))
    rank = seed_run.cfg.lora_rank
    lora = M.add_lora(net, rank, jax.random.key(0))
    assert lora.params["fc"]["lora"]["lora_a"].shape == (512, rank)
    np.testing.assert_allclose(
        _logits(lora, seed_run.tasks.finetune), _logits(net, seed_run.tasks.finetune)
    )
    mask = M.trainable(lora, "lora")
    assert mask["fc"] == {
        "kernel": False,
        "bias": False,
        "lora": {"lora_a": True, "lora_b": True},
    }
    assert mask["head"]["kernel"] and not mask["conv1"]["kernel"]
    # merge_lora folds B = 0 adapters back: the same model again
    merged = M.merge_lora(lora, seed_run.pretrained)
    assert _leaves_equal(merged.params, net.params)


def test_flow_weights_follow_the_lp_losses(seed_run):
    table = seed_run.lp_losses("train")
    np.testing.assert_array_equal(table.ids, seed_run.tasks.finetune.train)
    # the pre-pass equals a direct eval-mode forward of the LP model
    lp, ft = seed_run.lp(), seed_run.tasks.finetune
    data = ft.arrays("train")
    logits = np.asarray(P.logits(lp, data["image"]), np.float64)
    labels = data["label"]
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


def test_replot_redraws_pareto_from_results_json(quick_run):
    out, results = quick_run
    before = (out / "results.json").read_bytes()
    (out / "pareto.png").unlink()
    again = run.main(["--replot", "--out", str(out)])
    assert again == results
    data = (out / "pareto.png").read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    assert (out / "results.json").read_bytes() == before  # nothing else rewritten
    with pytest.raises(FileNotFoundError, match=r"results\.json"):
        run.main(["--replot", "--out", str(out / "missing")])
    with pytest.raises(SystemExit):
        run.main(["--replot", "--quick", "--out", str(out)])
    with pytest.raises(SystemExit):
        run.main(["--replot", "--set", "seeds=2", "--out", str(out)])


def test_method_settings_come_from_the_config(quick_run):
    """The recipe column and the methods read the config: a --set value shows up in both."""
    _, res = quick_run
    md_cfg = {**res["config"], "lora_rank": 8, "l2sp_strength": 0.5}
    assert methods.METHODS["LoRA"].describe(md_cfg).startswith("rank-8 LoRA")
    assert methods.METHODS["L2-SP"].describe(md_cfg).endswith("λ=0.5")
    cfg = run.cli.override(get_config(quick=True), ["lora_rank=8", "lr_grid=[0.1]"])
    assert cfg.lora_rank == 8 and cfg.lr_grid == (0.1,)
    assert methods.METHODS["LP"].grid(cfg) == (0.1,)
    assert methods.METHODS["WiSE-FT"].grid(cfg) == ()
    with pytest.raises(
        SystemExit
    ):  # unknown field: an argparse error, before any training
        run.main(["--quick", "--set", "lora_rnk=8", "--out", "/nonexistent/never"])
    with pytest.raises(ValueError, match="unknown methods"):
        methods.ordered(["FLOW", "FLOW++"])
    assert methods.ordered(["FLOW + WiSE-FT"]) == ["LP", "FLOW", "FLOW + WiSE-FT"]


def test_zoom_box_leaves_out_far_means():
    from experiments.digits.pareto import MIN_MARGIN, zoom_box

    # the fifth point is 99.5 - 30 = 69.5 points below the others' median on y
    x = [97.0, 98.0, 99.0, 98.5, 89.0]
    y = [99.0, 98.0, 99.5, 97.0, 30.0]
    xlim, ylim, inside = zoom_box(x, y)
    assert inside.tolist() == [True, True, True, True, False]
    # spans 97..99 and 97..99.5; 12 % of 2 or 2.5 is below the 0.6 floor
    np.testing.assert_allclose(xlim, (97 - MIN_MARGIN, 99 + MIN_MARGIN))
    np.testing.assert_allclose(ylim, (97 - MIN_MARGIN, 99.5 + MIN_MARGIN))
    # wide spread: the margin is 12 % of the span, nothing left out
    xlim, ylim, inside = zoom_box([80.0, 90.0, 100.0], [50.0, 60.0, 70.0])
    assert inside.all()
    np.testing.assert_allclose(xlim, (77.6, 102.4))
    np.testing.assert_allclose(ylim, (47.6, 72.4))
    # tied means (MAD 0): the spread floor keeps a point 5 points away in
    _, _, inside = zoom_box([95.0, 95.0, 95.0, 90.0], [99.0, 99.0, 99.0, 99.0])
    assert inside.all()
    # fewer than 3 points: nothing is an outlier
    assert zoom_box([1.0, 99.0], [1.0, 99.0])[2].all()
    with pytest.raises(ValueError, match="equal-length"):
        zoom_box([1.0, 2.0], [1.0])


def test_summary_records_diverged_runs_instead_of_failing_or_dropping_them():
    from experiments.digits import summary

    def row(seed, distance):
        metrics = {k: 0.5 + 0.1 * seed for k in summary.METRICS}
        metrics.update(body_distance=distance, diverged=distance is None)
        return {
            "seed": seed,
            "methods": {"EWC": metrics},
            "pretrained": {"pretrain_test_acc": 0.99},
        }

    per_seed = [row(0, 2.0), row(1, None), row(2, 4.0)]
    out = summary.summarize(per_seed, ["EWC"])["EWC"]
    assert out["diverged_seeds"] == [1]
    # Accuracies count every seed (a diverged run's accuracy is what it scored) ...
    assert out["target_acc"]["mean"] == pytest.approx(0.6)
    # ... the distance only the runs that have one.
    assert out["body_distance"] == {"mean": 3.0, "std": pytest.approx(2**0.5)}
    assert summary._distance(out) == "3.00 ± 1.41 (1 diverged)"
    every = summary.summarize([row(0, None)], ["EWC"])["EWC"]
    assert (
        every["body_distance"] is None and summary._distance(every) == "– (1 diverged)"
    )
