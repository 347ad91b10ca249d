"""Every hyper-parameter of the digits experiment, as plain data (``results.json`` records it).

``get_config()`` is the paper-protocol run (10 seeds, ``make digits``);
``get_config(quick=True)`` the smoke-test variant (1 seed, tiny budget: ``--quick``). The
driver (:mod:`experiments.digits.run`) builds everything from a :class:`Config`; the methods
(:mod:`experiments.digits.methods`) read their settings from it. Single fields can be changed
from the command line: ``python -m experiments.digits.run --set lora_rank=8 --set seeds=3``.

The methods' own settings were fixed a priori, from the papers, not tuned on this data:

* L2-SP and EWC: λ = 0.1 (``g += λ (θ − θ₀)``; EWC's Fisher normalised to mean 1 over the
  regularised entries, so the average pull equals L2-SP's).
* LoRA: rank 4 on the dense layer ``fc`` (512 → 64), α = r (scale 1), as in the paper.
* LwF: λ_o = 1, T = 2 (Li & Hoiem).
* WiSE-FT: α = 0.5 on the PRE-TRAINED model (the paper's value); the α sweep drawn in
  ``pareto.png`` is 0, 0.1, …, 1.
* FLOW: τ = median of the LP model's loss (Algorithm 1); the hard examples are the 10 % of
  5-9 test examples with the highest LP loss.
"""

from __future__ import annotations

import dataclasses

from experiments.digits import protocol as P

ALL_METHODS = (
    "LP",
    "FT",
    "LP-FT",
    "L2-SP",
    "EWC",
    "LoRA",
    "WiSE-FT",
    "LwF",
    "DRO",
    "FLOW",
    "FLOW + LoRA",
    "FLOW + WiSE-FT",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters of a run (see the module docstring for where they come from)."""

    # Seeds and split.
    seeds: int = 10
    seed: int = 0  # first seed; LR selection runs on it
    split_seed: int = 0
    # Pre-training (digits 0-4, all parameters, cosine).
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.05
    # Every fine-tuning stage.
    epochs: int = 20
    lr_grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 1  # training augmentation: random translation, pixels
    # Evaluation.
    hard_fraction: float = 0.1
    curve_every: int = 2  # epochs between the evaluations of the retention curves
    # Checkpoints (flowjax.fit, under --out/checkpoints): every this many epochs and at
    # the end of every stage.
    checkpoint_every: int = 10
    # Methods and their settings.
    methods: tuple[str, ...] = ALL_METHODS
    l2sp_strength: float = (
        0.1  # λ of L2-SP: g += λ (θ − θ₀) on every pre-trained parameter
    )
    ewc_strength: float = 0.1  # λ of EWC with the Fisher normalised to mean 1
    lora_rank: int = 4  # on the dense layer fc (512 → 64); α = r (scale 1)
    lwf_strength: float = 1.0  # Li & Hoiem's λ_o
    lwf_temperature: float = 2.0  # Li & Hoiem's T
    wise_alpha: float = 0.5  # weight on the PRE-TRAINED model
    wise_alphas: tuple[float, ...] = tuple(
        i / 10 for i in range(11)
    )  # the plotted sweep

    @property
    def optim(self) -> P.Optim:
        """The optimizer settings every fine-tuning stage shares."""
        return P.Optim(
            self.batch_size, self.momentum, self.weight_decay, self.max_shift
        )


def get_config(quick: bool = False) -> Config:
    """The default config, or with ``quick`` the smoke-test one (1 seed, 4 + 2 epochs, 2 LRs, every epoch evaluated and checkpointed)."""
    if quick:
        return Config(
            seeds=1,
            pretrain_epochs=4,
            epochs=2,
            lr_grid=(0.01, 0.1),
            curve_every=1,
            checkpoint_every=1,
        )
    return Config()
