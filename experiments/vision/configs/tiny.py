"""The whole protocol on CPU in a few minutes: fabricated CIFAR-10 / ImageNet files, a width-8 ResNet-18.

    python -m experiments.vision.run --config experiments/vision/configs/tiny.py --workdir /tmp/vision

The data and the "pre-trained" weights are fabricated by ``experiments.vision.fabricate``
into ``<workdir>/fabricated`` when ``data_dir`` is empty (the numbers mean nothing about
FLOW; every step of the command runs: LR selection on validation, LP, the pre-pass, τ,
FLOW's two rounds, FT, LP-FT, L2-SP, WiSE-FT, ImageNet retention with the head and
BatchNorm swapped back, hard examples, checkpoints, curves, tables and plots).
"""

from experiments.vision.config import paper


def get_config():
    return paper(
        "resnet18",
        "cifar10",
        width=8,
        image_size=32,
        eval_resize=32,
        transform=(("resize", "square"), ("resize_size", 32), ("train_crop", "random")),
        epochs=2,
        batch_size=16,
        eval_batch_size=64,
        val_fraction=0.2,
        lr_factors=(1.0,),
        lrs=(("FT", 0.05), ("LP", 0.05), ("FLOW", 0.05), ("FLOW round 2", 0.05)),
        num_threads=0,
    )
