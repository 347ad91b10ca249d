"""The vision protocol command: the tiny config end to end, resume, and every paper config validated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from experiments import cli
from experiments.vision import config as C
from experiments.vision import run

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "vision" / "configs"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vision")
    results = run.main(
        ["--config", str(CONFIGS / "tiny.py"), "--workdir", str(workdir)]
    )
    return workdir, results


def test_tiny_config_runs_the_whole_protocol(tiny):
    workdir, res = tiny
    assert json.loads((workdir / "results.json").read_text()) == res
    for name in ("figure1.png", "retention.png"):
        assert (workdir / name).read_bytes()[:8] == PNG, name
    assert json.loads((workdir / "timing.json").read_text())["total_s"] > 0
    assert "_s" not in json.dumps(res["methods"]) and "total" not in res
    methods = res["methods"]
    assert list(methods) == list(C.METHODS)
    pre = res["pretrained"]["imagenet_acc"]
    assert pre > 0.5  # the fabricated weights were trained on the fabricated ImageNet
    # LP trains the head only; the swap restores the head and every BatchNorm (running
    # statistics included): ImageNet accuracy exactly the pre-trained model's.
    assert methods["LP"]["imagenet_acc"] == pre
    for name, m in methods.items():
        for k in ("target_acc", "imagenet_acc", "val_acc", "hard_acc"):
            assert 0.0 <= m[k] <= 1.0, (name, k)
        assert m["average"] == pytest.approx((m["target_acc"] + m["imagenet_acc"]) / 2)
    # Learning rates: each method's grid, chosen on validation (first maximum).
    cfg = res["config"]
    for name, g in res["lr_selection"].items():
        assert methods[name]["lr"] == g["lr"][int(np.argmax(g["val_acc"]))]
        assert methods[name]["val_acc"] == max(g["val_acc"])
    assert methods["WiSE-FT"]["lr"] is None
    # FLOW's weights from one pre-pass; its two rounds are its curves.
    assert res["flow"]["temperature"] > 0
    assert res["flow"]["diagnostics"]["n"] == res["data"]["train_minus_val"]
    flow_curves = list(methods["FLOW"]["curves"])
    assert (
        len(flow_curves) == 2
        and "round1" in flow_curves[0]
        and "round2" in flow_curves[1]
    )
    steps = cfg["epochs"] * (res["data"]["train_minus_val"] // cfg["batch_size"])
    ft_curve = next(iter(methods["FT"]["curves"].values()))
    assert [r["step"] for r in ft_curve] == list(
        range(0, steps + 1, steps // cfg["epochs"])
    )
    assert ft_curve[-1]["target_acc"] == methods["FT"]["target_acc"]
    assert ft_curve[-1]["imagenet_acc"] == methods["FT"]["imagenet_acc"]
    assert ft_curve[0]["imagenet_acc"] == pre  # a fresh head on the pre-trained body
    md = (workdir / "results.md").read_text()
    assert all(f"| {name} | " in md for name in methods)


@pytest.mark.slow
def test_a_rerun_restores_every_stage_and_writes_the_same_results(tiny, capsys):
    workdir, _ = tiny
    before = (workdir / "results.json").read_bytes()
    capsys.readouterr()
    run.main(["--config", str(CONFIGS / "tiny.py"), "--workdir", str(workdir)])
    assert "restored finished stage" in capsys.readouterr().out
    assert (workdir / "results.json").read_bytes() == before
    timing = json.loads((workdir / "timing.json").read_text())
    assert timing["stages_restored"] == len(list((workdir / "checkpoints").iterdir()))


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("resnet*.py")), ids=lambda p: p.stem
)
def test_paper_configs_parse_and_build_their_model_and_pipeline(path):
    from flowjax import datasets, models

    cfg = C.load(path)
    arch, dataset = path.stem.split("_", 1)
    d = C.DATASETS[dataset]
    assert (cfg.arch, cfg.dataset, cfg.epochs) == (arch, dataset, d["epochs"])
    assert (cfg.batch_size, cfg.momentum, cfg.weight_decay) == (128, 0.9, 5e-4)
    assert dict(cfg.lrs) == d["lr"] and cfg.image_size == 224
    assert cfg.lr("L2-SP") == cfg.lr("FT") == d["lr"]["FT"]
    model = nnx.eval_shape(
        lambda: models.resnet(cfg.arch, num_classes=d["classes"], rngs=nnx.Rngs(0))
    )
    assert model.fc.kernel.shape == (model.num_features, d["classes"])
    rng = np.random.default_rng(0)
    source = [
        {
            "id": i,
            "image": rng.integers(0, 256, (300, 260, 3), dtype=np.uint8),
            "label": i,
        }
        for i in range(2)
    ]
    for train in (True, False):
        batch = next(
            iter(
                datasets.image_batches(
                    source, 2, train=train, image_size=cfg.image_size, num_threads=0,
                    **dict(cfg.transform),
                )
            )
        )  # fmt: skip
        assert batch["image"].shape == (2, 224, 224, 3)
        assert np.isfinite(batch["image"]).all()


def test_command_line_overrides_and_errors(tmp_path):
    cfg = C.load(CONFIGS / "resnet50_flowers102.py")
    cfg = cli.override(cfg, ["data_dir=/abs/flowers", "epochs=3", "lr_factors=[1.0]"])
    assert (cfg.data_dir, cfg.epochs, cfg.lr_factors) == ("/abs/flowers", 3, (1.0,))
    with pytest.raises(ValueError, match="no field 'epoch'"):
        cli.override(cfg, ["epoch=3"])
    with pytest.raises(ValueError, match="cannot parse"):
        cli.override(cfg, ["epochs=three"])
    with pytest.raises(FileNotFoundError, match="no config file"):
        C.load(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="unknown dataset"):
        C.paper("resnet18", "mnist")
    with pytest.raises(ValueError, match="weights="):
        run.Run(C.paper("resnet18", "cifar10", data_dir=str(tmp_path)), tmp_path)
