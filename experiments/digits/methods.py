"""The methods of the digits experiment: how each one fits a model for digits 5-9.

A method is a function ``fit(run, lr) -> model`` of a :class:`SeedRun` (one seed's
pre-trained model, data and memoised fits) and a learning rate; :data:`METHODS` lists them
in selection order with their descriptions. Every hyper-parameter a method uses comes from
the run's :class:`~experiments.digits.config.Config` (``run.cfg``). Every call into the
flowjax library that the experiment makes for a method is in this module (the data, the
pre-pass and the evaluation plumbing are in :mod:`experiments.digits.protocol` and
:mod:`experiments.digits.model`); the driver (:mod:`experiments.digits.run`) only selects
learning rates, evaluates and reports. The recipes are described in the driver's docstring.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flowjax
from experiments import cli, report
from experiments.digits import model as M
from experiments.digits import protocol as P
from experiments.digits.config import Config
from experiments.training import torch_sgd

optimizer = torch_sgd  # the digits name of experiments.training.torch_sgd


class SeedRun:
    """Everything one seed needs: the pre-trained model, memoised fits, FLOW weights.

    With ``checkpoints`` (a directory) every training stage of the seed runs
    through ``flowjax.fit`` with its own checkpoint directory under
    ``checkpoints/seed<seed>/``, named by the stage's label (method, LR,
    round) and a digest of everything it depends on (the config, the seed,
    the label, the starting parameters and the FLOW weights): a rerun with
    the same inputs restores finished stages and resumes the interrupted one
    ("resumed from step N"), a changed input gets a new directory, and
    nothing stale is ever restored. Every fine-tuning stage is evaluated every
    ``cfg.curve_every`` epochs (target accuracy and pre-training accuracy
    after the swap, on the test splits); :meth:`curve` gives a method's own
    stages as one curve.
    """

    def __init__(
        self,
        cfg: Config,
        tasks: P.Tasks,
        seed: int,
        lrs: dict[str, float],
        checkpoints: Path | None = None,
        resume_log: report.ResumeLog | None = None,
    ):
        self.cfg, self.tasks, self.seed, self.lrs = cfg, tasks, seed, lrs
        self.checkpoints = checkpoints
        self.resume_log = report.ResumeLog() if resume_log is None else resume_log
        self._fits: dict[tuple[str, float | None], M.Net] = {}
        self._memo: dict[str, object] = {}
        self._stack: list[list] = []  # [name, lr, stages so far] of the fits running
        self._curves: dict[tuple[str, float | None], list[dict]] = {}
        self._config_digest = report.digest(report.config_dict(cfg))
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
            make_tx=optimizer,
            stage=self._stage("pretrain", init, None, evaluate=False),
        )

    def _stage(
        self,
        label: str,
        net: M.Net,
        weights: flowjax.WeightTable | None,
        evaluate: bool = True,
    ) -> P.Stage:
        """The :class:`~experiments.digits.protocol.Stage` of one training stage."""
        epochs = self.cfg.pretrain_epochs if label == "pretrain" else self.cfg.epochs
        steps_per_epoch = len(self.tasks.finetune.train) // self.cfg.batch_size
        if label == "pretrain":
            steps_per_epoch = len(self.tasks.pretrain.train) // self.cfg.batch_size
        eval_fn = None
        if evaluate:
            ft, pre = self.tasks.finetune, self.tasks.pretrain

            def eval_fn(net):
                net = self.plain(net)
                return {
                    "target_acc": P.accuracy(net, ft, "test"),
                    "pretrain_acc": P.pretraining_accuracy(net, self.pretrained, pre),
                }

        if self.checkpoints is None:
            return P.Stage(
                eval_fn=eval_fn, eval_every=self.cfg.curve_every * steps_per_epoch
            )
        info = {
            "config": self._config_digest,
            "seed": self.seed,
            "stage": label,
            "start": report.digest(jax.tree.map(np.asarray, M.state(net))),
            "weights": None if weights is None else report.digest(weights.weights),
        }
        slug = label.replace(" ", "").replace("/", "_").replace("+", "-")
        directory = (
            self.checkpoints / f"seed{self.seed}" / f"{slug}-{report.digest(info)[:12]}"
        )

        return P.Stage(
            checkpoint_dir=directory,
            checkpoint_every=self.cfg.checkpoint_every * steps_per_epoch,
            run_info=info,
            eval_fn=eval_fn,
            eval_every=self.cfg.curve_every * steps_per_epoch,
            log=self.resume_log.stage(
                f"seed {self.seed} {label}", epochs * steps_per_epoch
            ),
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
        if not self._stack:
            raise RuntimeError(
                "SeedRun.train runs inside a method's fit (SeedRun.fit)."
            )
        top = self._stack[-1]
        name, method_lr, round_ = top[0], top[1], len(top[2]) + 1
        label = f"{name}@{method_lr:g}/{round_}"
        if round_ > 1:
            label += (
                f"@{lr:g}"  # a later round may use another method's LR (FLOW's round 2)
            )
        start = net
        out, result = P.train(
            net,
            self.tasks.finetune,
            trainable=M.trainable(net, trainable),
            lr=lr,
            epochs=self.cfg.epochs,
            schedule=schedule,
            seed=self.seed,
            optim=self.cfg.optim,
            make_tx=optimizer,
            stage=self._stage(label, start, hooks.get("weights")),
            **hooks,
        )
        top[2].append((start, result.history))
        return out

    def fit(self, name: str, lr: float | None) -> M.Net:
        """Method ``name`` at learning rate ``lr`` (memoised per seed)."""
        if (name, lr) not in self._fits:
            self._stack.append([name, lr, []])
            try:
                net = METHODS[name].fit(self, lr)
            finally:
                _, _, stages = self._stack.pop()
            self._fits[name, lr] = net
            self._curves[name, lr] = self._join(stages)
        return self._fits[name, lr]

    def plain(self, net: M.Net) -> M.Net:
        """``net`` as a plain CNN: LoRA factors merged (``flowjax.merge_lora``) if it has any."""
        if jax.tree.structure(net.params) == jax.tree.structure(self.pretrained.params):
            return net
        return M.merge_lora(net, self.pretrained)

    def curve(self, name: str, lr: float | None) -> dict[str, list[float]] | None:
        """Method ``name``'s own training stages (not those of the methods it starts from) as one curve.

        ``{"step": [...], "target_acc": [...], "pretrain_acc": [...]}``: step 0
        is the model the method starts from, then every evaluation of its
        stages, later rounds' steps continuing the first's. None for a method
        that trains nothing itself (WiSE-FT).
        """
        self.fit(name, lr)
        return self._curves[name, lr]

    def _join(self, stages: list) -> dict[str, list[float]] | None:
        if not stages:
            return None
        ft, pre = self.tasks.finetune, self.tasks.pretrain
        start = self.plain(stages[0][0])
        curve = {
            "step": [0],
            "target_acc": [P.accuracy(start, ft, "test")],
            "pretrain_acc": [P.pretraining_accuracy(start, self.pretrained, pre)],
        }
        offset = 0
        for _, history in stages:
            for record in history:
                curve["step"].append(offset + record["step"])
                curve["target_acc"].append(record["target_acc"])
                curve["pretrain_acc"].append(record["pretrain_acc"])
            offset += history[-1]["step"]
        return curve

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
        """The WiSE-FT sweep (``flowjax.wise_ft_sweep``) over ``cfg.wise_alphas`` of method ``name``'s model."""
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
                self.cfg.wise_alphas,
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
    tx = flowjax.l2sp(run.cfg.l2sp_strength, mask=run.shared(net))
    return run.train(net, lr=lr, trainable="all", schedule="cosine", extra=tx)


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
    tx = flowjax.ewc(run.cfg.ewc_strength, f_hat, mask=mask)
    return run.train(net, lr=lr, trainable="all", schedule="cosine", extra=tx)


def lora(run: SeedRun, lr: float) -> M.Net:
    """LoRA (rank 4) on the dense layer, the new head trained fully, convolutions and BN frozen; merged."""
    net = M.add_lora(run.new_head(), run.cfg.lora_rank, jax.random.fold_in(run.key, 2))
    net = run.train(net, lr=lr, trainable="lora", schedule="cosine")
    return M.merge_lora(net, run.pretrained)


def flow_lora(run: SeedRun, lr: float) -> M.Net:
    """FLOW with LoRA as round 1's trainable set (from LP, weighted), merged, then round 2."""
    net = M.add_lora(run.lp(), run.cfg.lora_rank, jax.random.fold_in(run.key, 2))
    net = run.train(
        net, lr=lr, trainable="lora", schedule="cosine", weights=run.flow_weights()
    )
    return head_round(run, M.merge_lora(net, run.pretrained))


def wise_ft(run: SeedRun, lr: None) -> M.Net:
    del lr
    return run.wise(run.fit("FT", run.lrs["FT"]), run.cfg.wise_alpha)


def flow_wise_ft(run: SeedRun, lr: None) -> M.Net:
    del lr
    return run.wise(run.fit("FLOW", run.lrs["FLOW"]), run.cfg.wise_alpha)


@functools.cache
def lwf_objective(graphdef, strength: float, temperature: float) -> P.Objective:
    """CE on the new head + λ · LwF distillation (``flowjax.lwf_loss`` at ``temperature``) on the old head.

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
        distill = flowjax.lwf_loss(old, teacher, temperature=temperature)
        task = flowjax.weighted_loss(ce, batch["weight"], reduction="mean")
        loss = task + strength * jnp.mean(distill)
        return loss, {"loss": loss, "loss_unweighted": jnp.mean(ce)}

    return objective


def lwf(run: SeedRun, lr: float) -> M.Net:
    pre = run.pretrained
    return run.train(
        run.new_head(),
        lr=lr,
        trainable="all",
        schedule="cosine",
        objective=lwf_objective(
            pre.graphdef, run.cfg.lwf_strength, run.cfg.lwf_temperature
        ),
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
    """A method: how to fit it, what to call it, what it depends on.

    ``description`` is a format string over the config's fields (its settings, e.g.
    ``"λ={l2sp_strength}"``): :meth:`describe` fills it in.
    """

    name: str
    fit: Callable[[SeedRun, float | None], M.Net]
    description: str
    needs: tuple[str, ...] = ()  # methods whose selected LR / model it uses
    lr_grid: tuple[float, ...] | None = None  # None: Config.lr_grid; (): no LR
    marker: str = "o"

    def describe(self, cfg: Config | Mapping) -> str:
        """The one-line recipe with the settings of ``cfg`` (a config or its JSON record) filled in."""
        fields = cfg if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)
        return self.description.format(**fields)

    def grid(self, cfg: Config) -> tuple[float, ...]:
        """The learning rates this method is selected over (``()``: it has no LR of its own)."""
        return cfg.lr_grid if self.lr_grid is None else self.lr_grid


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # Order = selection order: a method comes after the methods it needs.
        Method("LP", linear_probe, "head only, body frozen, constant LR", marker="s"),
        Method("FT", standard_ft, "fresh head, all params, cosine", marker="o"),
        Method("LP-FT", lp_ft, "from LP, all params, cosine", ("LP",), marker="^"),
        Method(
            "L2-SP", l2sp, "FT + λ/2‖θ−θ₀‖² on the body, λ={l2sp_strength}", marker="v"
        ),
        Method(
            "EWC",
            ewc,
            "FT + λ/2 Σ F̂(θ−θ₀)², λ={ewc_strength}, empirical Fisher on 5-9",
            ("LP",),
            marker="<",
        ),
        Method(
            "LoRA",
            lora,
            "rank-{lora_rank} LoRA on fc + new head, rest frozen, merged",
            marker="D",
        ),
        Method(
            "WiSE-FT",
            wise_ft,
            "FT averaged with θ₀, α={wise_alpha} on θ₀ (head kept)",
            ("FT",),
            lr_grid=(),
            marker="P",
        ),
        Method(
            "LwF",
            lwf,
            "FT + {lwf_strength}·LwF (T={lwf_temperature}) via the old head",
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
            "FLOW averaged with θ₀, α={wise_alpha}",
            ("FLOW",),
            lr_grid=(),
            marker="X",
        ),
    )
}


def ordered(names) -> list[str]:
    """``names`` and the methods they need, in :data:`METHODS` (selection) order.

    Raises:
      ValueError: a name is not a method.
    """
    return cli.with_dependencies(names, METHODS, lambda n: METHODS[n].needs)
