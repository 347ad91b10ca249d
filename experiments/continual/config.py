"""Every hyper-parameter of the task-sequence experiment, as plain data (``results.json`` records it).

``get_config()`` is the full run (5 seeds, ``make continual``); ``get_config(quick=True)``
the smoke-test variant (1 seed, 2 epochs per task, 3 tasks: ``--quick``). Single fields
change from the command line: ``python -m experiments.continual.run --set seeds=3``.

The settings were fixed a priori, not tuned on this data (no validation split is used):

* every stage: SGD, momentum 0.9, no weight decay, constant learning rate 0.05, batches of 32,
  ``epochs`` passes over the task's training split (no augmentation);
* L2-SP: λ = 1, anchored at the parameters after the previous task;
* EWC: the empirical diagonal Fisher of every finished task at its end, each scaled to
  maximum 1 and summed, the sum scaled to maximum 1, λ = 50 (the stiffest direction then
  has λ·lr = 2.5, inside heavy-ball SGD's stability limit 2(1 + β) = 3.8), anchored at the
  previous task's parameters;
* SI: Zenke et al.'s consolidated form (``online=False``), λ = 1 (their c = λ/2 = 0.5), ξ = 0.1;
* replay (ER) and DER: a reservoir buffer of 200 examples over all tasks so far, half of
  every batch replayed; DER matches the stored logits with α = 0.5 (Buzzega et al.'s range)
  besides the CE of the new rows;
* LwF: λ_o = 1, T = 2 (Li & Hoiem), on the previous tasks' outputs;
* LoRA: rank 4 on the dense layer ``fc`` (α = r), with the head, merged after every task;
  adapters: a bottleneck of 8 after ``fc``, with the head;
* PackNet: task t of T keeps 1/(T - t) of its free weights (equal shares of every layer),
  then retrains ``packnet_retrain_epochs`` epochs;
* FLOW: per task, ``lp_epochs`` of head-only training (the paper's LP model), τ = the
  median of its per-example CE on the task's training split, w_i = exp(-ℓ_i / τ); where
  the LP model fits more than half of the task exactly (float32 CE = 0, so the median is
  0), τ = the mean CE instead (``results.json`` records every τ as ``flow_tau``).
"""

from __future__ import annotations

import dataclasses

BASE_METHODS = (
    "FT",
    "FLOW",
    "L2-SP",
    "EWC",
    "SI",
    "Replay",
    "DER",
    "LwF",
    "LoRA",
    "Adapters",
    "PackNet",
    "Progressive",
)
SETTINGS = ("task", "class")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters of a run (see the module docstring for where they come from)."""

    seeds: int = 5
    seed: int = 0  # first seed
    num_tasks: int = 5  # digits {2t, 2t + 1}, t < num_tasks
    settings: tuple[str, ...] = SETTINGS
    methods: tuple[str, ...] = BASE_METHODS
    flow_combinations: int = 2  # FLOW + the best this many methods of each setting
    # Network: two 3x3 convolutions (the second with stride 2), a dense layer, the head.
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    # Every stage.
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    checkpoint_every: int = 0  # 0: at the end of every stage only
    # Methods.
    l2sp_strength: float = 1.0
    ewc_strength: float = 50.0
    si_strength: float = 1.0
    si_damping: float = 0.1
    buffer_size: int = 200
    replay_ratio: float = 0.5
    der_alpha: float = 0.5
    lwf_strength: float = 1.0
    lwf_temperature: float = 2.0
    lora_rank: int = 4
    adapter_bottleneck: int = 8
    packnet_retrain_epochs: int = 5
    lp_epochs: int = 5


def get_config(quick: bool = False) -> Config:
    """The default config, or with ``quick`` the smoke-test one (1 seed, 3 tasks, 2 epochs)."""
    if quick:
        return Config(
            seeds=1, num_tasks=3, epochs=2, packnet_retrain_epochs=1, lp_epochs=1
        )
    return Config()
