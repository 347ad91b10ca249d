"""FLOW's forgetting result on real data, with the baselines side by side: pre-train on digits 0-4, fine-tune on 5-9.

Command (from the repository root; ``make digits``, or ``make demo`` for this
and the theory experiment)::

    python -m experiments.digits.run            # 10 seeds, writes results/digits/
    python -m experiments.digits.run --out DIR  # elsewhere
    python -m experiments.digits.run --quick    # 1 seed, tiny budget (smoke test)
    python -m experiments.digits.run --replot   # redraw pareto.png from results.json

Outputs: ``results.json`` (config, selected learning rates with their
validation grid, per-seed per-method numbers, WiSE-FT sweeps, runtime),
``results.md`` (the tables), ``pareto.png`` (target accuracy against
pre-training accuracy, mean ± std per method plus the WiSE-FT α sweeps, like
the paper's Figure 2: a panel zoomed on the methods and a full-range one; see
:mod:`experiments.digits.pareto`), ``weights.png`` (the FLOW pre-pass losses and weights
with τ marked).

The paper's vision protocol (FLOW_PAPER.md §2.1, steps V1-V5) on
scikit-learn's digits (1,797 8×8 images) with the small BatchNorm CNN of
:mod:`experiments.digits.model`. Data: the TFDS ``flowjax_digits`` dataset
(``array_record``, no TensorFlow), built once into ``$FLOWJAX_DATA_DIR`` or
the git-ignored ``.cache/tfds``, read once with
``flowjax.ArraySource.from_source`` and fed by ``flowjax.batches`` (seeded
shuffling; ``map_fn``: pixels / 16 and a random ±1-pixel shift from each
example's own generator); see :mod:`experiments.digits.protocol`.

* Split (fixed for every seed): test = the dataset's stratified 20 % test
  split; validation = a stratified 20 % of its train split. Pre-training task:
  digits 0-4; fine-tuning task: digits 5-9, labels 0-4, a NEW head.
* Pre-training: 0-4 train split, all parameters, SGD momentum 0.9, weight
  decay 5e-4, per-epoch cosine, shift augmentation.
* Every fine-tuning stage runs E = 20 epochs of SGD (momentum 0.9, decay
  5e-4) on the same per-seed data stream (same batches, same augmentation for
  every method of a seed). Frozen parts go through ``flowjax.freeze`` /
  ``flowjax.trainable_mask``; BatchNorm runs in train mode, so its running
  statistics adapt even where its scale and bias are frozen.
* Methods (``METHODS``):

  - LP (V1): body frozen, fresh head, constant LR.
  - FT (V5): fresh head, everything trainable, cosine ``lr (1 + cos(π e/E))/2``.
  - LP-FT: from the LP model, everything trainable, cosine, unweighted.
  - L2-SP: FT plus ``flowjax.l2sp`` (first in the optax chain):
    ``g += λ (θ − θ₀)`` on every pre-trained parameter (not the new head),
    λ = 0.1, fixed a priori; weight decay kept as in FT.
  - EWC: FT plus ``flowjax.ewc`` with the diagonal EMPIRICAL Fisher
    (``flowjax.diagonal_fisher``, true labels) at θ₀ on the 5-9 TRAIN split
    (FLOW's setting has no pre-training data), measured through the LP model
    (θ₀'s body and BatchNorm with the LP head; a head is needed for labels
    5-9), normalised to mean 1 over the regularised entries and used with
    the same λ = 0.1 as L2-SP: the same average pull, redistributed by
    importance.
  - LoRA: ``flowjax.add_lora`` rank 4 (α = r, scale 1, as in the paper) on
    the dense layer ``fc`` (512 → 64; 2,304 adapter parameters vs 32,832),
    the new head trained fully, convolutions and BatchNorm frozen, cosine;
    ``flowjax.merge_lora`` before evaluation.
  - WiSE-FT: ``flowjax.wise_ft(θ₀, θ_FT, α = 0.5)`` (α = weight on the
    PRE-TRAINED model, the paper's value) over every parameter and BatchNorm
    statistic except the new head, which has no pre-trained counterpart and
    is kept from FT. No LR of its own (FT's). The full sweep α = 0, 0.1, …, 1
    (``flowjax.wise_ft_sweep``) is the dashed curve in ``pareto.png``.
  - LwF: FT plus ``flowjax.lwf_loss`` (λ = 1, T = 2, Li & Hoiem's values):
    the student's train-mode features through the FROZEN pre-trained head
    (the head that evaluation swaps back) distilled toward the pre-trained
    model (eval mode) on the same augmented images.
  - DRO: FLOW's two rounds with the static easy-example weights replaced by
    the dynamic KL-DRO tilt ``flowjax.dro_loss`` (p ∝ exp(+ℓ_i/τ) within each
    batch), τ = FLOW's τ: the paper's contrast, at the same temperature.
  - FLOW (V2-V4): τ = median of the LP model's eval-mode per-example CE over
    the 5-9 TRAIN split, from one ``flowjax.per_example_losses`` pre-pass;
    ``w_i = exp(-ℓ_i / τ)``, attached to each batch by example id. Round 1:
    from the LP model, everything trainable, ``Σ w_i CE_i / B``, cosine.
    Round 2: head only, unweighted CE, constant LR (LP's). The weights are
    computed ONCE on un-augmented images (Algorithm 1), not per batch.
  - FLOW + LoRA: FLOW with round 1's trainable set = LoRA (fc) + head;
    merged, then round 2. FLOW + WiSE-FT: the FLOW model averaged with θ₀ at
    α = 0.5 (head kept).

* Evaluation (eval mode, final epoch; no checkpoint selection): target
  accuracy on the 5-9 test split; pre-training accuracy on the 0-4 test split
  after ``flowjax.swap_task_parts`` puts the pre-trained head and BatchNorm
  (scale, bias, running mean and variance) back into the fine-tuned body;
  average = their mean. Hard examples (the paper's Table 5): the 10 % of 5-9
  test examples with the highest loss under the LP model.
* Learning rates: the SAME rule for every method: ``Config.lr_grid`` is run
  on the first seed and the LR with the best VALIDATION accuracy on digits
  5-9 is used for every seed (ties: the smallest LR). The test split is never
  used for selection. FLOW's round 2 and every use of the LP model reuse LP's
  choice.
* Seeds (default 10) change the pre-training init, the head init, the LoRA
  init, shuffling and augmentation; the split is fixed.

Numbers the default command produced (10 seeds; 3 min 40 s wall, 3 min 27 s
user CPU, on the shared 2-core CPU at load average ~5.8; the numbers repeat
exactly from run to run). Accuracies in %, mean ± std over seeds; the
pre-trained model scores 99.8 ± 0.3 on the 0-4 test split::

    method          LR     pre-training (0-4)  target (5-9)  average      hard 10 %
    LP              0.1    99.8 ± 0.3          87.8 ± 3.4    93.8 ± 1.7    3.9 ± 7.4
    FT              0.03   77.9 ± 16.7         98.8 ± 0.5    88.3 ± 8.3   92.8 ± 3.7
    LP-FT           0.003  98.7 ± 1.0          98.5 ± 0.6    98.6 ± 0.7   88.9 ± 6.4
    L2-SP           0.03   92.5 ± 6.9          97.8 ± 0.8    95.2 ± 3.4   82.2 ± 7.3
    EWC             0.03   98.4 ± 0.8          98.4 ± 0.7    98.4 ± 0.5   86.7 ± 7.5
    LoRA            0.03   99.3 ± 0.9          97.9 ± 0.8    98.6 ± 0.8   88.3 ± 6.7
    WiSE-FT         —      96.7 ± 3.0          94.5 ± 2.1    95.6 ± 2.0   75.0 ± 10.6
    LwF             0.03   98.7 ± 1.4          99.1 ± 0.3    98.9 ± 0.7   93.3 ± 4.4
    DRO             0.003  30.7 ± 9.9          89.4 ± 9.8    60.1 ± 7.8   71.7 ± 13.7
    FLOW            0.01   99.1 ± 0.6          95.4 ± 1.5    97.2 ± 0.9   71.1 ± 12.8
    FLOW + LoRA     0.1    98.5 ± 4.4          94.4 ± 2.2    96.4 ± 2.7   65.0 ± 10.8
    FLOW + WiSE-FT  —      99.4 ± 0.6          92.5 ± 3.9    95.9 ± 2.1   69.4 ± 11.2

What this shows, paired by seed: FLOW − FT = +21.2 ± 16.6 pre-training,
−3.4 ± 1.9 target, +8.9 ± 8.1 average, −21.7 ± 13.5 on the hard examples:
the paper's effect (much less forgetting, paid for on the hard examples).
But FLOW does NOT beat the stronger baselines here: FLOW − LP-FT = −1.4 ±
1.1 average (its own control, same start, no weights), and LwF (98.9), LP-FT
(98.6), LoRA (98.6) and EWC (98.4) all have a higher mean average than FLOW
(97.2); FLOW keeps 99.1 % pre-training accuracy (LoRA 99.3, FLOW + WiSE-FT
99.4) but gives up 3-4 points of target accuracy against them. FLOW on top
of LoRA does not help (−2.2 ± 2.4 average); on top of WiSE-FT it trades
target for pre-training accuracy (+0.3 ± 2.0 average). DRO at FLOW's τ
(0.03 ± 0.01, so the tilt puts almost all of a batch's weight on its hardest
examples) forgets catastrophically (30.7 % pre-training). FT's forgetting
comes with its selected LR (0.03): at LR 0.003 FT keeps 87.8 % on seed 0.
The WiSE-FT sweep of FT passes (96.9 % target, 94.5 % pre-training) at
α = 0.4, below LP-FT, EWC, LoRA and LwF on both axes.

Adding a method is one function ``fit(run, lr) -> Net`` plus one
:class:`Method` entry in ``METHODS`` (``needs`` names the methods it builds
on). Hooks: ``run.train(...)`` takes ``extra`` (``(kind, optax
transformation)`` on the gradients, e.g. L2-SP, EWC), ``objective`` (the loss
from the train-mode module, batch and ``reference`` arrays: LwF, DRO),
``weights`` (a ``flowjax.WeightTable``) and ``trainable`` ("all", "head",
"lora"). ``run.fit(name, lr)`` returns another method's model, memoised per
seed; a method with ``lr_grid=()`` has no LR to select.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
from tqdm.auto import tqdm

import flowjax
from experiments.digits import model as M
from experiments.digits import pareto
from experiments.digits import protocol as P

# Hyper-parameters of the added methods, fixed a priori (not tuned on this data).
L2SP_STRENGTH = 0.1  # λ of L2-SP: g += λ (θ − θ₀) on every pre-trained parameter
EWC_STRENGTH = 0.1  # λ of EWC with the Fisher normalised to mean 1 (see ewc())
LORA_RANK = 4  # on the dense layer fc (512 → 64); α = r (scale 1), as in the paper
LWF_STRENGTH = 1.0  # Li & Hoiem's λ_o
LWF_TEMPERATURE = 2.0  # Li & Hoiem's T
WISE_ALPHA = 0.5  # weight on the PRE-TRAINED model, as in the paper
WISE_ALPHAS = tuple(i / 10 for i in range(11))  # the sweep in the pareto plot


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters of a run; :meth:`quick` is the smoke-test setting."""

    seeds: int = 10
    seed: int = 0  # first seed; LR selection runs on it
    split_seed: int = 0
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.05
    epochs: int = 20  # every fine-tuning stage
    lr_grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 1
    hard_fraction: float = 0.1
    methods: tuple[str, ...] = (
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

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=1, pretrain_epochs=4, epochs=2, lr_grid=(0.01, 0.1))

    @property
    def optim(self) -> P.Optim:
        return P.Optim(
            self.batch_size, self.momentum, self.weight_decay, self.max_shift
        )


class SeedRun:
    """Everything one seed needs: the pre-trained model, memoised fits, FLOW weights."""

    def __init__(self, cfg: Config, tasks: P.Tasks, seed: int, lrs: dict[str, float]):
        self.cfg, self.tasks, self.seed, self.lrs = cfg, tasks, seed, lrs
        self._fits: dict[tuple[str, float | None], M.Net] = {}
        self._memo: dict[str, object] = {}
        self.key = jax.random.key(seed)
        init = M.init(jax.random.fold_in(self.key, 0))
        self.pretrained, _ = P.train(
            init,
            tasks.pretrain,
            trainable=M.trainable(init, "all"),
            lr=cfg.pretrain_lr,
            epochs=cfg.pretrain_epochs,
            schedule="cosine",
            seed=seed,
            optim=cfg.optim,
        )

    # ---- building blocks for methods ------------------------------------

    def new_head(self) -> M.Net:
        """The pre-trained model with a fresh head for digits 5-9 (same init for every method)."""
        return M.fresh_head(self.pretrained, jax.random.fold_in(self.key, 1))

    def train(
        self,
        net: M.Net,
        *,
        lr: float,
        trainable: str,
        schedule: P.Schedule,
        **hooks,
    ) -> M.Net:
        """One stage on the 5-9 train split, ``cfg.epochs`` epochs.

        ``trainable`` is "all", "head" or "lora" (:func:`model.trainable`);
        ``hooks`` go to :func:`experiments.digits.protocol.train` (weights,
        objective, extra, reference).
        """
        out, _ = P.train(
            net,
            self.tasks.finetune,
            trainable=M.trainable(net, trainable),
            lr=lr,
            epochs=self.cfg.epochs,
            schedule=schedule,
            seed=self.seed,
            optim=self.cfg.optim,
            **hooks,
        )
        return out

    def fit(self, name: str, lr: float | None) -> M.Net:
        """Method ``name`` at learning rate ``lr`` (memoised per seed)."""
        if (name, lr) not in self._fits:
            self._fits[name, lr] = METHODS[name].fit(self, lr)
        return self._fits[name, lr]

    def lp(self) -> M.Net:
        """The LP model at LP's selected learning rate."""
        return self.fit("LP", self.lrs["LP"])

    def lp_losses(self, split: str) -> flowjax.LossTable:
        """The LP model's eval-mode per-example CE on a 5-9 split (one pre-pass)."""
        if split not in self._memo:
            self._memo[split] = P.example_losses(self.lp(), self.tasks.finetune, split)
        return self._memo[split]

    def flow_weights(self) -> flowjax.WeightTable:
        """FLOW's weights: ``exp(-ℓ_i / τ)``, τ = median LP loss on the 5-9 train split."""
        return self.lp_losses("train").flow_weights()

    def fisher(self) -> dict:
        """EWC's Fisher: empirical, diagonal, of the LP model on the 5-9 train split (see :func:`ewc`)."""
        if "fisher" not in self._memo:
            self._memo["fisher"] = P.fisher(self.lp(), self.tasks.finetune)
        return self._memo["fisher"]

    def hard_ids(self) -> np.ndarray:
        """The ``hard_fraction`` of 5-9 test examples with the highest LP loss."""
        table = self.lp_losses("test")
        k = math.ceil(self.cfg.hard_fraction * len(table))
        order = np.argsort(-table.losses, kind="stable")
        return np.sort(table.ids[order[:k]])

    def shared(self, net: M.Net) -> dict:
        """True for every parameter with a pre-trained value (all but the new head)."""
        return flowjax.trainable_mask(net.params, lambda path, _: M.HEAD not in path)

    def wise(self, finetuned: M.Net, alpha: float) -> M.Net:
        """WiSE-FT: ``alpha`` θ_pre + (1 − alpha) θ_ft (``flowjax.wise_ft``), the new head kept."""
        state = flowjax.wise_ft(
            M.state(self.pretrained),
            M.state(finetuned),
            alpha,
            mask=wise_mask(finetuned),
        )
        return M.from_state(finetuned.graphdef, state)

    def wise_curve(self, name: str) -> dict:
        """The WiSE-FT sweep (``flowjax.wise_ft_sweep``) over :data:`WISE_ALPHAS` of method ``name``'s model."""
        key = f"wise:{name}"
        if key not in self._memo:
            ft, pre = self.tasks.finetune, self.tasks.pretrain
            net = self.fit(name, self.lrs[name])

            def metrics(state):
                mixed = M.from_state(net.graphdef, state)
                return {
                    "target_acc": P.accuracy(mixed, ft, "test"),
                    "pretrain_acc": P.pretraining_accuracy(mixed, self.pretrained, pre),
                }

            curve = flowjax.wise_ft_sweep(
                M.state(self.pretrained),
                M.state(net),
                metrics,
                WISE_ALPHAS,
                mask=wise_mask(net),
                progress=False,
            )
            self._memo[key] = {
                "alpha": curve.alphas.tolist(),
                **{k: v.tolist() for k, v in curve.metrics.items()},
            }
        return self._memo[key]


def wise_mask(net: M.Net) -> dict:
    """WiSE-FT's mask: everything is averaged (BatchNorm statistics too) but the new head."""
    return {
        "params": {k: k != M.HEAD for k in net.params},
        "stats": True,
    }


# --------------------------------------------------------------------------
# Methods: fit(run, lr) -> the model for digits 5-9
# --------------------------------------------------------------------------


def standard_ft(run: SeedRun, lr: float) -> M.Net:
    return run.train(run.new_head(), lr=lr, trainable="all", schedule="cosine")


def linear_probe(run: SeedRun, lr: float) -> M.Net:
    return run.train(run.new_head(), lr=lr, trainable="head", schedule="constant")


def lp_ft(run: SeedRun, lr: float) -> M.Net:
    return run.train(run.lp(), lr=lr, trainable="all", schedule="cosine")


def head_round(run: SeedRun, net: M.Net) -> M.Net:
    """FLOW's round 2: head only, unweighted CE, constant LR (LP's)."""
    return run.train(net, lr=run.lrs["LP"], trainable="head", schedule="constant")


def flow(run: SeedRun, lr: float) -> M.Net:
    net = run.train(
        run.lp(), lr=lr, trainable="all", schedule="cosine", weights=run.flow_weights()
    )
    return head_round(run, net)


def l2sp(run: SeedRun, lr: float) -> M.Net:
    """FT plus L2-SP: ``g += λ (θ − θ₀)`` on every pre-trained parameter (not the new head)."""
    net = run.new_head()
    tx = flowjax.l2sp(None, L2SP_STRENGTH, mask=run.shared(net))
    return run.train(net, lr=lr, trainable="all", schedule="cosine", extra=("l2sp", tx))


def ewc(run: SeedRun, lr: float) -> M.Net:
    """FT plus EWC: ``g += λ F̂ ⊙ (θ − θ₀)`` on every pre-trained parameter.

    F is the empirical diagonal Fisher (``flowjax.diagonal_fisher``, true
    labels) at θ₀ on the 5-9 TRAIN split: FLOW's setting has no pre-training
    data, so the Fisher is measured on the fine-tuning inputs, through the LP
    model (θ₀'s body and BatchNorm with the LP head: a head is needed for
    labels 5-9). F̂ = F / mean(F) over the regularised entries, so the average
    pull equals L2-SP's (same λ) and EWC only redistributes it by importance.
    """
    net = run.new_head()
    mask = run.shared(net)
    f = run.fisher()
    kept = [
        x for x, m in zip(jax.tree.leaves(f), jax.tree.leaves(mask), strict=True) if m
    ]
    mean = float(sum(np.sum(x) for x in kept) / sum(x.size for x in kept))
    f_hat = jax.tree.map(lambda x: x / mean, f)
    tx = flowjax.ewc(None, f_hat, EWC_STRENGTH, mask=mask)
    return run.train(net, lr=lr, trainable="all", schedule="cosine", extra=("ewc", tx))


def lora(run: SeedRun, lr: float) -> M.Net:
    """LoRA (rank 4) on the dense layer, the new head trained fully, convolutions and BN frozen; merged."""
    net = M.add_lora(run.new_head(), LORA_RANK, jax.random.fold_in(run.key, 2))
    net = run.train(net, lr=lr, trainable="lora", schedule="cosine")
    return M.merge_lora(net, run.pretrained)


def flow_lora(run: SeedRun, lr: float) -> M.Net:
    """FLOW with LoRA as round 1's trainable set (from LP, weighted), merged, then round 2."""
    net = M.add_lora(run.lp(), LORA_RANK, jax.random.fold_in(run.key, 2))
    net = run.train(
        net, lr=lr, trainable="lora", schedule="cosine", weights=run.flow_weights()
    )
    return head_round(run, M.merge_lora(net, run.pretrained))


def wise_ft(run: SeedRun, lr: None) -> M.Net:
    del lr
    return run.wise(run.fit("FT", run.lrs["FT"]), WISE_ALPHA)


def flow_wise_ft(run: SeedRun, lr: None) -> M.Net:
    del lr
    return run.wise(run.fit("FLOW", run.lrs["FLOW"]), WISE_ALPHA)


@functools.cache
def lwf_objective(graphdef) -> P.Objective:
    """CE on the new head + λ · LwF distillation (``flowjax.lwf_loss``, T = 2) on the old head.

    ``reference = (old_head, teacher_params, teacher_stats)``. The student's
    old-task logits are its own (train-mode) features through the FROZEN
    pre-trained head, the head that the evaluation swaps back; the teacher is
    the pre-trained model in eval mode on the same augmented images.
    """

    def objective(model, batch, reference):
        old_head, t_params, t_stats = reference
        feats = model.features(batch["image"])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            model.head(feats), batch["label"]
        )
        old = feats @ old_head["kernel"] + old_head["bias"][None, :]
        teacher = M.merge(graphdef, t_params, t_stats, train=False)(batch["image"])
        distill = flowjax.lwf_loss(old, teacher, temperature=LWF_TEMPERATURE)
        task = flowjax.weighted_loss(ce, batch["weight"], reduction="mean")
        loss = task + LWF_STRENGTH * jnp.mean(distill)
        return loss, {"loss": loss, "loss_unweighted": jnp.mean(ce)}

    return objective


def lwf(run: SeedRun, lr: float) -> M.Net:
    pre = run.pretrained
    return run.train(
        run.new_head(),
        lr=lr,
        trainable="all",
        schedule="cosine",
        objective=lwf_objective(pre.graphdef),
        reference=(pre.params[M.HEAD], pre.params, pre.stats),
    )


def dro_objective(model, batch, reference):
    """KL-DRO (``flowjax.dro_loss``): the batch's CE tilted by ``exp(+ℓ_i / τ)``; ``reference = τ``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(
        model(batch["image"]), batch["label"]
    )
    loss = flowjax.dro_loss(ce, reference)
    return loss, {"loss": loss, "loss_unweighted": jnp.mean(ce)}


def dro(run: SeedRun, lr: float) -> M.Net:
    """FLOW's two rounds with the static easy-example weights replaced by dynamic KL-DRO (τ = FLOW's τ)."""
    tau = np.float32(run.flow_weights().temperature)
    net = run.train(
        run.lp(),
        lr=lr,
        trainable="all",
        schedule="cosine",
        objective=dro_objective,
        reference=tau,
    )
    return head_round(run, net)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fit: Callable[[SeedRun, float | None], M.Net]
    description: str
    needs: tuple[str, ...] = ()  # methods whose selected LR / model it uses
    lr_grid: tuple[float, ...] | None = None  # None: Config.lr_grid; (): no LR
    marker: str = "o"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # Order = selection order: a method comes after the methods it needs.
        Method("LP", linear_probe, "head only, body frozen, constant LR", marker="s"),
        Method("FT", standard_ft, "fresh head, all params, cosine", marker="o"),
        Method("LP-FT", lp_ft, "from LP, all params, cosine", ("LP",), marker="^"),
        Method(
            "L2-SP", l2sp, f"FT + λ/2‖θ−θ₀‖² on the body, λ={L2SP_STRENGTH}", marker="v"
        ),
        Method(
            "EWC",
            ewc,
            f"FT + λ/2 Σ F̂(θ−θ₀)², λ={EWC_STRENGTH}, empirical Fisher on 5-9",
            ("LP",),
            marker="<",
        ),
        Method(
            "LoRA",
            lora,
            f"rank-{LORA_RANK} LoRA on fc + new head, rest frozen, merged",
            marker="D",
        ),
        Method(
            "WiSE-FT",
            wise_ft,
            f"FT averaged with θ₀, α={WISE_ALPHA} on θ₀ (head kept)",
            ("FT",),
            lr_grid=(),
            marker="P",
        ),
        Method(
            "LwF",
            lwf,
            f"FT + {LWF_STRENGTH}·LwF (T={LWF_TEMPERATURE}) via the old head",
            marker="h",
        ),
        Method(
            "DRO",
            dro,
            "FLOW's rounds with dynamic KL-DRO (τ = FLOW's τ)",
            ("LP",),
            marker="x",
        ),
        Method(
            "FLOW",
            flow,
            "from LP, weighted all params (cosine), then head (constant)",
            ("LP",),
            marker="*",
        ),
        Method(
            "FLOW + LoRA",
            flow_lora,
            "FLOW with LoRA (fc) + head as round 1's trainable set",
            ("LP",),
            marker="d",
        ),
        Method(
            "FLOW + WiSE-FT",
            flow_wise_ft,
            f"FLOW averaged with θ₀, α={WISE_ALPHA}",
            ("FLOW",),
            lr_grid=(),
            marker="X",
        ),
    )
}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def evaluate(run: SeedRun, net: M.Net) -> dict:
    """Target, pre-training, average, validation and hard-example accuracy; body drift."""
    ft = run.tasks.finetune
    target = P.accuracy(net, ft, "test")
    pre = P.pretraining_accuracy(net, run.pretrained, run.tasks.pretrain)
    p = P.predict(net, ft, "test", run.hard_ids())
    return {
        "target_acc": target,
        "pretrain_acc": pre,
        "average": (target + pre) / 2,
        "val_target_acc": P.accuracy(net, ft, "val"),
        "hard_acc": float(np.mean(p["pred"] == p["label"])),
        "body_distance": M.body_distance(net, run.pretrained),
    }


def select_lrs(cfg: Config, run: SeedRun, bar) -> dict:
    """Fills ``run.lrs`` method by method (LP first); returns the grids.

    Selection uses ``val_target_acc`` only. The test accuracies of every grid
    point (``target_acc``, ``pretrain_acc``) are recorded to show how the
    forgetting trade-off moves with the LR; they play no part in the choice.
    """
    grids = {}
    ft, pre = run.tasks.finetune, run.tasks.pretrain
    for name in _ordered(cfg.methods):
        method = METHODS[name]
        grid = cfg.lr_grid if method.lr_grid is None else method.lr_grid
        if not grid:
            run.lrs[name] = None
            continue
        g = {
            "lr": list(grid),
            "val_target_acc": [],
            "target_acc": [],
            "pretrain_acc": [],
        }
        for lr in grid:
            bar.set_postfix_str(f"{name} lr={lr:g}")
            net = run.fit(name, lr)
            g["val_target_acc"].append(P.accuracy(net, ft, "val"))
            g["target_acc"].append(P.accuracy(net, ft, "test"))
            g["pretrain_acc"].append(P.pretraining_accuracy(net, run.pretrained, pre))
            bar.update()
        best = int(np.argmax(g["val_target_acc"]))  # first maximum: smallest LR on ties
        run.lrs[name] = float(grid[best])
        grids[name] = g
    return grids


def _ordered(names) -> list[str]:
    unknown = set(names) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}.")
    need, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(METHODS[n].needs)
    return [n for n in METHODS if n in need]


def run(cfg: Config, out: Path, command: str | None = None) -> dict:
    """Runs the whole protocol, writes every output into ``out``, returns the results."""
    t0, c0 = time.perf_counter(), time.process_time()
    out.mkdir(parents=True, exist_ok=True)
    tasks = P.make_tasks(cfg.split_seed)
    names = _ordered(cfg.methods)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    lrs: dict[str, float] = {}

    n_grid = sum(
        len(cfg.lr_grid if METHODS[n].lr_grid is None else METHODS[n].lr_grid)
        for n in names
    )
    with tqdm(
        total=n_grid, desc=f"LR selection (seed {seeds[0]})", dynamic_ncols=True
    ) as bar:
        first = SeedRun(cfg, tasks, seeds[0], lrs)
        grids = select_lrs(cfg, first, bar)
    t_select = time.perf_counter() - t0

    per_seed = []
    weights_seed0 = None
    with tqdm(
        total=len(seeds) * len(names), desc="seeds × methods", dynamic_ncols=True
    ) as bar:
        for seed in seeds:
            r = first if seed == seeds[0] else SeedRun(cfg, tasks, seed, lrs)
            pre = r.pretrained
            row = {
                "seed": seed,
                "pretrained": {
                    "pretrain_test_acc": P.accuracy(pre, tasks.pretrain, "test"),
                    "pretrain_val_acc": P.accuracy(pre, tasks.pretrain, "val"),
                },
                "methods": {},
            }
            for name in names:
                bar.set_postfix_str(f"seed {seed} {name}")
                row["methods"][name] = {
                    "lr": lrs[name],
                    **evaluate(r, r.fit(name, lrs[name])),
                }
                bar.update()
            if "FLOW" in names:
                table, w = r.lp_losses("train"), r.flow_weights()
                row["flow"] = {
                    "tau": w.temperature,
                    "weight_mean": float(w.weights.mean()),
                    "weight_min": float(w.weights.min()),
                    "frac_weight_below_0.1": float(np.mean(w.weights < 0.1)),
                    "num_hard": len(r.hard_ids()),
                }
                if weights_seed0 is None:
                    weights_seed0 = (table, w)
            row["wise_ft_curve"] = {
                base: r.wise_curve(base)
                for base, wise in (("FT", "WiSE-FT"), ("FLOW", "FLOW + WiSE-FT"))
                if wise in names
            }
            per_seed.append(row)
            P.clear_streams()

    results = {
        "config": dataclasses.asdict(cfg),
        "split": {
            f"{t.name}_{s}": len(getattr(t, s))
            for t in (tasks.pretrain, tasks.finetune)
            for s in ("train", "val", "test")
        },
        "selected_lr": lrs,
        "lr_selection": grids,
        "per_seed": per_seed,
        "summary": summarize(per_seed, names),
        "runtime_s": {
            "lr_selection": t_select,
            "total": time.perf_counter() - t0,
            "cpu": time.process_time() - c0,
        },
        "command": command,
    }
    plot_pareto(results, names, out / "pareto.png")
    if weights_seed0 is not None:
        plot_weights(*weights_seed0, seeds[0], out / "weights.png")
    results["runtime_s"]["total"] = time.perf_counter() - t0
    results["runtime_s"]["cpu"] = time.process_time() - c0
    results = json.loads(json.dumps(results))  # plain JSON types (tuples -> lists)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = markdown(results, names)
    (out / "results.md").write_text(md)
    print(md)
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}, {out / 'weights.png'}"
    )
    return results


METRICS = (
    "pretrain_acc",
    "target_acc",
    "average",
    "hard_acc",
    "val_target_acc",
    "body_distance",
)


def _stats(x) -> dict:
    x = np.asarray(x, float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0}


PAIRS = (("FLOW + LoRA", "LoRA"), ("FLOW + WiSE-FT", "WiSE-FT"))
DIFF_METRICS = ("pretrain_acc", "target_acc", "average", "hard_acc")


def summarize(per_seed: list[dict], names: list[str]) -> dict:
    """Mean and std (ddof 1; 0 for one seed) over seeds, per method and metric.

    Also: FLOW minus every other method and FLOW + X minus X, paired by seed;
    τ; the WiSE-FT curves averaged over seeds.
    """

    def diff(a, b):
        return {
            k: _stats([r["methods"][a][k] - r["methods"][b][k] for r in per_seed])
            for k in DIFF_METRICS
        }

    out = {
        name: {k: _stats([r["methods"][name][k] for r in per_seed]) for k in METRICS}
        for name in names
    }
    out["pretrained"] = {
        "pretrain_test_acc": _stats(
            [r["pretrained"]["pretrain_test_acc"] for r in per_seed]
        )
    }
    if "FLOW" in names:
        out["FLOW_minus"] = {o: diff("FLOW", o) for o in names if o != "FLOW"}
        out["tau"] = _stats([r["flow"]["tau"] for r in per_seed])
    out["pairs"] = {
        f"{a} − {b}": diff(a, b) for a, b in PAIRS if a in names and b in names
    }
    curves = {}
    for base in per_seed[0].get("wise_ft_curve", {}):
        c = [r["wise_ft_curve"][base] for r in per_seed]
        curves[base] = {
            "alpha": c[0]["alpha"],
            **{
                k: {
                    "mean": np.mean([x[k] for x in c], 0).tolist(),
                    "std": (
                        np.std([x[k] for x in c], 0, ddof=1)
                        if len(c) > 1
                        else np.zeros(len(c[0][k]))
                    ).tolist(),
                }
                for k in ("target_acc", "pretrain_acc")
            },
        }
    out["wise_ft_curve"] = curves
    return out


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def _lr(lr) -> str:
    return "—" if lr is None else f"{lr:g}"


def markdown(results: dict, names: list[str]) -> str:
    s, cfg = results["summary"], results["config"]
    n = len(results["per_seed"])
    lines = [
        "# FLOW on digits: pre-train 0-4, fine-tune 5-9",
        "",
        f"{n} seed(s) ({cfg['seed']}..{cfg['seed'] + n - 1}); accuracies in %, mean ± std over seeds; "
        f"pre-trained model on 0-4 test: {_pm(s['pretrained']['pretrain_test_acc'])}. "
        f"Every fine-tuning stage: {cfg['epochs']} epochs, batch {cfg['batch_size']}; "
        f"LR grid {list(cfg['lr_grid'])}, selected by 5-9 validation accuracy on seed {cfg['seed']} "
        "(the same rule for every method; WiSE-FT has no LR of its own). Pre-training "
        "accuracy: 0-4 test split after swapping the pre-trained head and BatchNorm back in.",
        "",
        "| method | LR | pre-training acc (0-4) | target acc (5-9) | average | hard 10 % | ‖θ−θ₀‖ body | recipe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        m = s[name]
        lines.append(
            f"| {name} | {_lr(results['selected_lr'][name])} | {_pm(m['pretrain_acc'])} | "
            f"{_pm(m['target_acc'])} | {_pm(m['average'])} | {_pm(m['hard_acc'])} | "
            f"{_pm(m['body_distance'], 1, 2)} | {METHODS[name].description} |"
        )
    best = max(names, key=lambda k: s[k]["average"]["mean"])
    lines += ["", f"Best mean average: **{best}** ({_pm(s[best]['average'])})."]
    if "FLOW" in names:
        k = results["per_seed"][0]["flow"]["num_hard"]
        lines += [
            "",
            f"Hard examples (the paper's Table 5; column 'hard 10 %' above): accuracy on the {k} "
            "5-9 test examples (10 %) with the highest loss under the LP model (per seed).",
            "",
            "| method | hard-example acc | target acc |",
            "|---|---|---|",
            *[
                f"| {name} | {_pm(s[name]['hard_acc'])} | {_pm(s[name]['target_acc'])} |"
                for name in ("FT", "LP-FT", "FLOW")
                if name in names
            ],
            "",
            "FLOW minus each method, paired by seed (percentage points):",
            "",
            "| FLOW − | pre-training acc | target acc | average | hard-example acc |",
            "|---|---|---|---|---|",
            *[
                f"| {o} | {_pm(d['pretrain_acc'])} | {_pm(d['target_acc'])} | "
                f"{_pm(d['average'])} | {_pm(d['hard_acc'])} |"
                for o, d in s["FLOW_minus"].items()
            ],
        ]
        if s["pairs"]:
            lines += [
                "",
                "FLOW on top of another method, paired by seed (percentage points):",
                "",
                "| | pre-training acc | target acc | average | hard-example acc |",
                "|---|---|---|---|---|",
                *[
                    f"| {o} | {_pm(d['pretrain_acc'])} | {_pm(d['target_acc'])} | "
                    f"{_pm(d['average'])} | {_pm(d['hard_acc'])} |"
                    for o, d in s["pairs"].items()
                ],
            ]
        lines += [
            "",
            f"τ (median LP loss, 5-9 train): {_pm(s['tau'], 1, 4)}; mean weight "
            f"{np.mean([r['flow']['weight_mean'] for r in results['per_seed']]):.3f}.",
        ]
        flow_lpft = s["FLOW_minus"].get("LP-FT")
        if flow_lpft is not None:
            d = flow_lpft["average"]
            verdict = (
                "FLOW beats its LP-FT control on the average"
                if d["mean"] - d["std"] > 0
                else "FLOW does NOT beat its LP-FT control on the average (the difference is within one std or negative)"
            )
            lines += ["", f"Note: {verdict}: {_pm(d)} points."]
    for base, c in s["wise_ft_curve"].items():
        lines += [
            "",
            f"WiSE-FT sweep of the {base} model (α = weight on θ₀; mean over seeds): "
            "target / pre-training acc in %:",
            "",
            "| α | " + " | ".join(f"{a:g}" for a in c["alpha"]) + " |",
            "|---|" + "---|" * len(c["alpha"]),
            "| target | "
            + " | ".join(f"{100 * v:.1f}" for v in c["target_acc"]["mean"])
            + " |",
            "| pre-training | "
            + " | ".join(f"{100 * v:.1f}" for v in c["pretrain_acc"]["mean"])
            + " |",
        ]
    lines += [
        "",
        f"LR grid on seed {cfg['seed']}: 5-9 validation accuracy (the selection criterion) / "
        "5-9 test / 0-4 test after the swap, in % (test numbers shown for context only):",
        "",
        "| method | " + " | ".join(f"LR {lr:g}" for lr in cfg["lr_grid"]) + " |",
        "|---|" + "---|" * len(cfg["lr_grid"]),
    ]
    for name, g in results["lr_selection"].items():
        cells = {
            lr: f"{100 * v:.1f} / {100 * t:.1f} / {100 * p:.1f}"
            + (" *" if lr == results["selected_lr"][name] else "")
            for lr, v, t, p in zip(
                g["lr"],
                g["val_target_acc"],
                g["target_acc"],
                g["pretrain_acc"],
                strict=True,
            )
        }
        lines.append(
            f"| {name} | "
            + " | ".join(cells.get(lr, "") for lr in cfg["lr_grid"])
            + " |"
        )
    lines.append("\n\\* selected.")
    rt = results["runtime_s"]
    lines += [
        "",
        f"Runtime: {rt['total']:.0f} s wall, {rt['cpu']:.0f} s CPU (LR selection {rt['lr_selection']:.0f} s). "
        f"Command: `{results['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def plot_pareto(results: dict, names: list[str], path: Path) -> None:
    """Draws ``pareto.png`` (:mod:`experiments.digits.pareto`) from the results alone."""
    pareto.plot_pareto(results, names, {n: METHODS[n].marker for n in names}, path)


def replot(out: Path) -> dict:
    """Redraws ``out/pareto.png`` from ``out/results.json`` without training.

    ``weights.png`` needs the per-example losses, which ``results.json`` does
    not hold, so it is left as it is.
    """
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--replot reads {path}, which does not exist; run without --replot first."
        )
    results = json.loads(path.read_text())
    names = list(results["per_seed"][0]["methods"])
    _ordered(names)  # unknown names -> ValueError
    plot_pareto(results, names, out / "pareto.png")
    print(
        f"redrew {out / 'pareto.png'} from {path} (weights.png not redrawn: needs the per-example losses)"
    )
    return results


def plot_weights(
    table: flowjax.LossTable, w: flowjax.WeightTable, seed: int, path: Path
) -> None:
    tau = w.temperature
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    losses = np.maximum(table.losses, 1e-6)
    bins = np.logspace(np.log10(losses.min()), np.log10(losses.max()), 40)
    axes[0].hist(losses, bins=bins, color="tab:blue", alpha=0.8)
    axes[0].axvline(tau, color="k", ls="--", label=f"τ = median = {tau:.4f}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("LP-model loss ℓ_i on 5-9 train (eval mode)")
    axes[0].set_ylabel("examples")
    axes[0].legend()
    axes[1].hist(w.weights, bins=40, range=(0, 1), color="tab:orange", alpha=0.8)
    axes[1].axvline(math.exp(-1), color="k", ls="--", label="w = e⁻¹ (loss = τ)")
    axes[1].set_xlabel("FLOW weight w_i = exp(-ℓ_i / τ)")
    axes[1].set_ylabel("examples")
    axes[1].legend()
    fig.suptitle(f"FLOW weights of the {len(w)} fine-tuning examples, seed {seed}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/digits"))
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, tiny budget (smoke test)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="first seed (LR selection runs on it)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw pareto.png from --out/results.json (no training)",
    )
    args = parser.parse_args(argv)
    if args.replot:
        if args.quick or args.seeds is not None:
            parser.error("--replot takes only --out")
        return replot(args.out)
    cfg = Config.quick() if args.quick else Config()
    cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    argv = sys.argv[1:] if argv is None else argv
    return run(cfg, args.out, " ".join(["python -m experiments.digits.run", *argv]))


if __name__ == "__main__":
    main()
