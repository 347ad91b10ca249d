"""The vision protocol's settings as data: one :class:`Config` per run, the paper's datasets in :data:`DATASETS`.

A config file (``experiments/vision/configs/<name>.py``, big_vision style) defines
``get_config() -> Config``; ``python -m experiments.vision.run --config FILE --set
field=value`` overrides single fields. :func:`paper` builds the paper's configs from the
official code's settings (FLOW_PAPER.md §2.1):

* SGD with momentum 0.9 and weight decay 5e-4 on every trainable tensor (PyTorch's
  order: decay added to the gradient, then momentum), batch 128, per-epoch cosine for
  standard FT, LP-FT, L2-SP and FLOW round 1, a constant rate for the linear probe and
  FLOW round 2; the epochs of ``EPOCH_CONFIGS`` (CIFAR-10 20, CIFAR-100 25, Flowers102
  25, Caltech101 30, Cars 30, Dogs 30); the transforms of ``DATASET_CONFIGS`` (224 px).
* Learning rates: the official ResNet-18 rates ("best grid searched lrs" of the shell
  scripts) are the centre of each method's grid, ``lr_factors`` times them; the rate
  with the best VALIDATION accuracy (a seeded stratified split of the training set)
  is kept. The official code selects checkpoints on test; we never look at test to
  choose. ResNet-50 rates are not in the official repository: its configs start from
  the ResNet-18 rates and let the grid choose.
* τ: the median of the linear-probe model's per-example loss on one ordered pass of
  the training set with the training augmentations, as the official ``compute_temp.py``
  does; the weights are then computed ONCE (Algorithm 1), not on every step.
* Retention: ImageNet-1K validation top-1 with the pre-trained head and every
  BatchNorm (scale, bias, running statistics) swapped back into the fine-tuned body.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from experiments import cli

METHODS = ("LP", "FT", "LP-FT", "L2-SP", "WiSE-FT", "FLOW", "FLOW + WiSE-FT")

# The official code's per-dataset settings (FLOW_PAPER.md §2.1): the reader in
# flowjax.datasets, classes, epochs, the flowjax.datasets.image_transform options of
# its transforms, and the ResNet-18 learning rates of the shell scripts.
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "reader": "cifar10",
        "classes": 10,
        "epochs": 20,
        "transform": {
            "resize": "square",
            "resize_size": 224,
            "train_crop": "random",
            "mean": (0.4914, 0.4822, 0.4465),
            "std": (0.2023, 0.1994, 0.2010),
        },
        "lr": {"FT": 0.005, "LP": 0.005, "FLOW": 0.001, "FLOW round 2": 0.005},
        "tau_resnet18": 0.1041,
    },
    "cifar100": {
        "reader": "cifar100",
        "classes": 100,
        "epochs": 25,
        "transform": {
            "resize": "square",
            "resize_size": 224,
            "train_crop": "random",
            "mean": (0.5071, 0.4867, 0.4408),
            "std": (0.2675, 0.2565, 0.2761),
        },
        "lr": {"FT": 0.01, "LP": 0.005, "FLOW": 0.005, "FLOW round 2": 0.005},
        "tau_resnet18": 0.6626,
    },
    "flowers102": {
        "reader": "flowers102",
        "classes": 102,
        "epochs": 25,
        "transform": {"resize": "square", "resize_size": 224, "train_crop": "random"},
        "lr": {"FT": 0.05, "LP": 0.05, "FLOW": 0.05, "FLOW round 2": 0.05},
        "tau_resnet18": 0.0181,
    },
    "caltech101": {
        "reader": "caltech101",
        "classes": 102,
        "epochs": 30,
        "transform": {"color_jitter": 0.2},
        "lr": {"FT": 0.005, "LP": 0.01, "FLOW": 0.01, "FLOW round 2": 0.01},
        "tau_resnet18": 0.0543,
    },
    "stanford_cars": {
        "reader": "stanford_cars",
        "classes": 196,
        "epochs": 30,
        "transform": {"resize": "square", "train_crop": "random", "color_jitter": 0.2},
        "lr": {"FT": 0.05, "LP": 0.05, "FLOW": 0.01, "FLOW round 2": 0.05},
        "tau_resnet18": 0.3832,
    },
    "stanford_dogs": {
        "reader": "stanford_dogs",
        "classes": 120,
        "epochs": 30,
        "transform": {"resize": "square", "train_crop": "random", "color_jitter": 0.2},
        "lr": {"FT": 0.001, "LP": 0.005, "FLOW": 0.005, "FLOW round 2": 0.005},
        "tau_resnet18": 0.2123,
    },
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run of :mod:`experiments.vision.run` depends on."""

    # Model: flowjax.models.load_resnet(arch, weights); width 64 for the published models.
    arch: str = "resnet18"
    weights: str = ""  # a timm/torchvision .safetensors file (resnet18.tv_in1k, ...)
    width: int = 64
    dtype: str = "float32"  # compute dtype: "bfloat16" on accelerators
    # Data: a reader of flowjax.datasets and the directory of its original files.
    dataset: str = "cifar10"
    data_dir: str = ""
    imagenet_dir: str = (
        ""  # ImageNet-1K validation images (flowjax.datasets.imagenet_val)
    )
    imagenet_limit: int | None = (
        None  # evaluate on the first N ImageNet images (None: all)
    )
    val_fraction: float = 0.1  # of the training set, for choosing learning rates
    image_size: int = 224
    eval_resize: int = 256  # ImageNet evaluation: Resize(256), CenterCrop(224)
    transform: tuple[tuple[str, Any], ...] = ()  # the dataset's image_transform options
    # Training (every stage).
    epochs: int = 20
    batch_size: int = 128
    eval_batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Learning rates: the base rate of each method times each factor; best on validation.
    lrs: tuple[tuple[str, float], ...] = (
        ("FT", 0.005),
        ("LP", 0.005),
        ("FLOW", 0.001),
        ("FLOW round 2", 0.005),
    )
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    # Methods and their settings.
    methods: tuple[str, ...] = METHODS
    l2sp_strength: float = 0.01  # g += λ (θ − θ₀) on the body
    wise_alpha: float = 0.5  # WiSE-FT: weight on the PRE-TRAINED model
    prepass_augment: bool = True  # τ from one ordered pass with training augmentations
    hard_fraction: float = 0.1  # Table 5: hardest 10 % of test examples by LP loss
    # Runs.
    seed: int = 0
    curve_every: int = 1  # epochs between the retention evaluations of a stage
    checkpoint_every: int = 1  # epochs between checkpoints of a stage (and at the end)
    num_threads: int | None = None  # image decoding threads (None: min(8, CPUs))

    def lr(self, method: str) -> float:
        """The base learning rate of ``method`` (FT's for L2-SP, LP's for none given)."""
        table = dict(self.lrs)
        key = {"L2-SP": "FT", "LP-FT": "FT"}.get(method, method)
        if key not in table:
            raise ValueError(f"no learning rate for {method!r} in lrs={table}.")
        return table[key]


def paper(arch: str, dataset: str, **overrides: Any) -> Config:
    """The paper's protocol for ``arch`` on ``dataset`` with the official settings (module doc)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}.")
    d = DATASETS[dataset]
    cfg = Config(
        arch=arch,
        dataset=dataset,
        epochs=d["epochs"],
        transform=tuple(sorted(d["transform"].items())),
        lrs=tuple(d["lr"].items()),
    )
    return dataclasses.replace(cfg, **overrides)


def load(path: str | Path) -> Config:
    """``get_config()`` of a config file."""
    return cli.load_config(path, Config)
