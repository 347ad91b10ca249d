"""The methods of the task sequence: one class per strategy, with FLOW as a switch on any of them.

A method trains task ``t`` (:meth:`Method.train_task`) and says which network evaluates
task ``j`` (:meth:`Method.eval_model`). The base class is plain fine-tuning (FT): every
parameter trained on the new task with CE. ``flow=True`` turns any method into "FLOW + it":
before task ``t >= 1`` the head alone is trained for ``lp_epochs`` (the paper's LP model,
its step V1), the LP model's per-example CE on the task's training split gives
``τ = median`` and ``w_i = exp(-ℓ_i/τ)`` (``flowjax.per_example_losses`` →
``LossTable.flow_weights``), and the method's own stage(s) train on ``Σ w_i ℓ_i / B``
starting from the LP model. Task 0 has no pre-trained model: FLOW trains it as FT.
FLOW alone is ``FLOW + FT``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flowjax
from experiments.continual import protocol as P
from experiments.continual.config import Config


@dataclasses.dataclass
class Run:
    """One sequence: a setting, a method, a seed; the tasks and where stages checkpoint."""

    cfg: Config
    setting: str
    seed: int
    tasks: list[P.Task]
    directory: Path  # checkpoints of this sequence
    name: str
    static_task: bool = False  # the method's objective depends on the task index

    def stream(self, t: int, epochs: int) -> list[dict]:
        return P.train_stream(self.tasks[t], self.seed, epochs, self.cfg.batch_size)

    def stage_result(
        self, model: P.Model, t: int, kind: str, stream=None, epochs=None, **kw
    ) -> tuple[P.Model, flowjax.FitResult]:
        """Trains one stage of task ``t`` (:func:`experiments.continual.protocol.train`)."""
        epochs = self.cfg.epochs if epochs is None else epochs
        info = {
            "config": dataclasses.asdict(self.cfg),
            "setting": self.setting,
            "method": self.name,
            "seed": self.seed,
            "task": t,
            "stage": kind,
        }
        return P.train(
            model,
            self.stream(t, epochs) if stream is None else stream,
            task=t if self.static_task else None,
            setting=self.setting,
            lr=self.cfg.lr,
            momentum=self.cfg.momentum,
            epochs=epochs,
            checkpoint_dir=self.directory / f"t{t}-{kind}-{P.digest(info)}",
            checkpoint_every=self.cfg.checkpoint_every,
            run_info=info,
            **kw,
        )

    def stage(self, *args, **kw) -> P.Model:
        """:meth:`stage_result` without the fit result."""
        return self.stage_result(*args, **kw)[0]


def ce_objective(module, batch, frozen, task, setting):
    """``Σ w_i CE_i / B`` under the setting's scoring (``w_i`` = 1, or FLOW's)."""
    del frozen
    losses = P.cross_entropy(module(batch["image"], task), batch, setting)
    loss = flowjax.weighted_loss(losses, batch["weight"], reduction="mean")
    return loss, {"ce": jnp.mean(losses)}


def _mask(params: dict, select) -> Any:
    return flowjax.trainable_mask(params, select)


def finite(params) -> bool:
    """Whether every parameter is finite (a diverged run is not)."""
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(params))


def _head(path, _x) -> bool:
    return "head" in path


def _all(_path, _x) -> bool:
    return True


class Method:
    """Plain fine-tuning: every parameter, CE on the new task (with ``flow``: FLOW's weights)."""

    needs_task_id = False  # at test time (PackNet, progressive)
    static_task = False  # the objective depends on the task index (LwF, progressive)

    def __init__(self, run: Run, flow: bool = False):
        self.run, self.cfg, self.flow = run, run.cfg, flow
        self.taus: list[float] = []  # FLOW's τ before each task t >= 1
        run.static_task = self.static_task

    # -- the network -----------------------------------------------------------------

    def init_model(self) -> P.Model:
        return P.Model.init(self.cfg.channels, self.cfg.hidden, self.run.seed)

    def head_filter(self, t: int):
        """What FLOW's LP stage trains before task ``t``."""
        del t
        return _head

    def trainable(self, model: P.Model, t: int):
        del t
        return _mask(model.params, _all)

    # -- training ----------------------------------------------------------------------

    def weights(self, model: P.Model, t: int):
        """FLOW: (LP model, weight table) before task ``t``; without FLOW, ``(model, None)``."""
        if not self.flow or t == 0:
            return model, None
        lp = self.run.stage(
            model,
            t,
            "lp",
            epochs=self.cfg.lp_epochs,
            objective=ce_objective,
            trainable=_mask(model.params, self.head_filter(t)),
            last=self.lp_last(model, t),
        )
        if not finite(lp.params):  # a diverged run has no losses to weight by
            self.taus.append(None)
            return lp, None
        table = flowjax.per_example_losses(
            _batch_losses(
                lp.graphdef, t if self.static_task else None, self.run.setting
            ),
            lp.params,
            self.run.tasks[t].batches("train", 512),
            batched=True,
            progress=False,
        )
        tau = float(np.median(table.losses))
        if tau == 0.0:
            # The LP model fits at least half of the task exactly (float32 CE of 0): the
            # median τ is 0 and exp(-ℓ/0) undefined. Use the mean loss instead (and no
            # weights at all if every loss is 0).
            tau = float(np.mean(table.losses))
        self.taus.append(tau)
        if tau == 0.0:
            return lp, None
        return lp, table.flow_weights(temperature=tau)

    def last(self, t: int):
        """A transform chained after the optimiser (PackNet's ownership mask)."""
        del t
        return None

    def lp_last(self, model: P.Model, t: int):
        """:meth:`last`, and in the class-incremental setting a mask keeping the LP stage on
        the new task's two head outputs: a NEW head, as FLOW's LP step fits, leaving the old
        classes' outputs as they were (with one shared head, CE on the new task alone would
        otherwise push them down before the weights are even computed)."""
        last = self.last(t)
        if self.run.setting != "class" or "head" not in model.params:
            return last
        cols = np.zeros(P.NUM_CLASSES, np.int32)
        cols[2 * t : 2 * t + 2] = 1
        owner = jax.tree.map(lambda x: np.zeros(np.shape(x), np.int32), model.params)
        owner["head"] = {
            "kernel": np.broadcast_to(
                cols, model.params["head"]["kernel"].shape
            ).copy(),
            "bias": cols,
        }
        mask = flowjax.packnet_updates(owner, 1)  # zero every update not owned by "1"
        return mask if last is None else optax.chain(last, mask)

    def train_task(self, model: P.Model, t: int) -> P.Model:
        start, weights = self.weights(model, t)
        return self.fit(start, t, weights)

    def fit(self, model: P.Model, t: int, weights) -> P.Model:
        """The method's own training of task ``t`` (FT: one stage, everything trainable)."""
        return self.run.stage(
            model,
            t,
            "train",
            objective=ce_objective,
            trainable=self.trainable(model, t),
            weights=weights,
            extra=self.extra(t),
            last=self.last(t),
        )

    def extra(self, t: int):
        """A gradient transform chained before the optimiser (a regulariser: L2-SP, EWC)."""
        del t
        return None

    def end_task(self, model: P.Model, t: int) -> P.Model:
        """After task ``t``'s training (before its row of the accuracy matrix)."""
        del t
        return model

    def eval_model(self, model: P.Model, j: int) -> P.Model:
        """The network that evaluates task ``j``."""
        del j
        return model

    def accuracy(self, model: P.Model, data: dict, j: int) -> float:
        """Accuracy on task ``j``'s ``data`` (its test split)."""
        return P.accuracy(self.eval_model(model, j), data, None, self.run.setting)


@functools.cache
def _batch_losses(graphdef, t: int, setting: str):
    """``losses(params, batch) -> [B]``: per-example CE (FLOW's pre-pass)."""

    def losses(params, batch):
        logits = nnx.merge(graphdef, params)(batch["image"], t)
        return P.cross_entropy(logits, batch, setting)

    return losses


@functools.cache
def _example_loss(graphdef, t: int, setting: str):
    """``loss(params, example)``: CE of ONE example (EWC's empirical Fisher)."""

    def loss(params, example):
        batch = {k: example[k][None] for k in ("image", "label", "task")}
        logits = nnx.merge(graphdef, params)(batch["image"], t)
        return P.cross_entropy(logits, batch, setting)[0]

    return loss


# -- regularisers --------------------------------------------------------------------


class L2SP(Method):
    """FT plus ``flowjax.l2sp``: ``g += λ (θ − θ_{t-1})``, anchored at the previous task's end."""

    def extra(self, t):
        return None if t == 0 else flowjax.l2sp(self.cfg.l2sp_strength, self.anchor)

    def end_task(self, model, t):
        self.anchor = model.params
        return model


class EWC(L2SP):
    """FT plus ``flowjax.ewc`` with the summed, max-normalised empirical Fishers of past tasks."""

    fisher = None

    def extra(self, t):
        return (
            None
            if t == 0
            else flowjax.ewc(self.cfg.ewc_strength, self.fisher, self.anchor)
        )

    def end_task(self, model, t):
        self.anchor = model.params
        if not all(
            np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model.params)
        ):
            # Diverged (with FLOW's weights in the class-incremental setting): no Fisher
            # exists; the run continues and is recorded as it is (``finite: false``).
            if self.fisher is None:
                self.fisher = jax.tree.map(
                    np.zeros_like, jax.tree.map(np.asarray, model.params)
                )
            return model
        f = flowjax.diagonal_fisher(
            _example_loss(model.graphdef, None, self.run.setting),
            model.params,
            self.run.tasks[t].batches("train", 256),
            kind="empirical",
            progress=False,
        )
        f = _max_normalised(jax.tree.map(np.asarray, f))
        total = f if self.fisher is None else jax.tree.map(np.add, self.fisher, f)
        self.fisher = _max_normalised(total)
        return model


def _max_normalised(tree):
    top = max(float(np.max(x)) for x in jax.tree.leaves(tree))
    return jax.tree.map(lambda x: (x / top).astype(np.float32), tree)


class SI(Method):
    """FT plus ``flowjax.synaptic_intelligence`` (consolidated Ω only), ``si_consolidate`` between tasks."""

    si_state = None

    def fit(self, model, t, weights):
        extra = flowjax.synaptic_intelligence(
            self.cfg.si_strength, damping=self.cfg.si_damping, online=False
        )
        carried = self.si_state

        def opt_state(fresh):
            if carried is None:
                return fresh
            return jax.tree.map(
                lambda s: carried if isinstance(s, flowjax.SIState) else s,
                fresh,
                is_leaf=lambda s: isinstance(s, flowjax.SIState),
            )

        model, result = self.run.stage_result(
            model,
            t,
            "train",
            objective=ce_objective,
            trainable=self.trainable(model, t),
            extra=extra,
            weights=weights,
            opt_state=opt_state,
        )
        state = flowjax.si_consolidate(result.state.opt_state, model.params)
        self.si_state = next(
            s
            for s in jax.tree.leaves(
                state, is_leaf=lambda s: isinstance(s, flowjax.SIState)
            )
            if isinstance(s, flowjax.SIState)
        )
        return model


# -- replay ----------------------------------------------------------------------------


class Replay(Method):
    """Experience replay: a reservoir buffer of past examples, half of every batch replayed."""

    def __init__(self, run, flow=False):
        super().__init__(run, flow)
        self.buffer = flowjax.ReplayBuffer(self.cfg.buffer_size, seed=run.seed)

    def mixed_stream(self, t, weights):
        stream = self.run.stream(t, self.cfg.epochs)
        if weights is not None:
            stream = [dict(flowjax.attach_weights(b, weights)) for b in stream]
        else:
            stream = [
                {**b, "weight": np.ones(len(b["id"]), np.float32)} for b in stream
            ]
        fill = {"weight": 1.0}
        if "logits" in self.buffer.data:
            fill["logits"] = 0.0
        return list(
            flowjax.replay_batches(
                stream,
                self.buffer,
                self.cfg.replay_ratio,
                seed=self.run.seed + t,
                fill=fill,
            )
        )

    def fit(self, model, t, weights):
        if t == 0:
            return super().fit(model, t, weights)
        stream = self.mixed_stream(t, weights)
        return self.run.stage(
            model,
            t,
            "train",
            stream=stream,
            objective=ce_objective,
            trainable=self.trainable(model, t),
        )

    def stored(self, model, t) -> dict:
        data = self.run.tasks[t].arrays("train")
        return {k: data[k] for k in ("id", "image", "label", "task")}

    def end_task(self, model, t):
        self.buffer.add(self.stored(model, t))
        return model


def der_objective(module, batch, frozen, task, setting):
    """DER: CE on the new rows + α · MSE between replayed rows' logits and their stored ones."""
    logits = module(batch["image"], task)
    new = jnp.logical_not(batch["replay"])
    ce = P.cross_entropy(logits, batch, setting)
    d = flowjax.der_loss(logits, batch["logits"], where=batch["replay"])
    n = batch["replay"].shape[0]
    loss = (
        jnp.sum(jnp.where(new, batch["weight"] * ce, 0.0))
        + frozen["alpha"] * jnp.sum(d)
    ) / n
    return loss, {"ce": jnp.mean(ce)}


class DER(Replay):
    """Dark Experience Replay: the buffer stores the logits of the network that finished each task."""

    def fit(self, model, t, weights):
        if t == 0:
            return Method.fit(self, model, t, weights)
        stream = self.mixed_stream(t, weights)
        return self.run.stage(
            model,
            t,
            "train",
            stream=stream,
            objective=der_objective,
            trainable=self.trainable(model, t),
            frozen={"alpha": jnp.float32(self.cfg.der_alpha)},
        )

    def stored(self, model, t):
        rows = super().stored(model, t)
        rows["logits"] = P.logits(model, rows["image"], None).astype(np.float32)
        return rows


# -- distillation ----------------------------------------------------------------------


def _old_outputs(t: int, setting: str) -> list[tuple[int, int]]:
    """The output ranges of the previous tasks LwF distils: one per old head, or all old classes."""
    if setting == "task":
        return [(2 * j, 2 * j + 2) for j in range(t)]
    return [(0, 2 * t)]


def lwf_objective(module, batch, frozen, task, setting):
    """CE on the new task + λ_o · T² KL on the previous tasks' outputs (teacher: the model after t-1)."""
    logits = module(batch["image"], task)
    ce = P.cross_entropy(logits, batch, setting)
    teacher = nnx.merge(nnx.graphdef(module), frozen["teacher"])(batch["image"], task)
    teacher = jax.lax.stop_gradient(teacher)
    dist = 0.0
    for a, b in _old_outputs(task, setting):
        dist = dist + flowjax.lwf_loss(
            logits[:, a:b], teacher[:, a:b], temperature=frozen["temperature"]
        )
    loss = flowjax.weighted_loss(ce, batch["weight"], reduction="mean") + frozen[
        "strength"
    ] * jnp.mean(dist)
    return loss, {"ce": jnp.mean(ce)}


class LwF(Method):
    """Learning without Forgetting: distil the previous model's old outputs on the new task's images."""

    static_task = True

    def fit(self, model, t, weights):
        if t == 0:
            return super().fit(model, t, weights)
        frozen = {
            "teacher": self.teacher.params,
            "temperature": jnp.float32(self.cfg.lwf_temperature),
            "strength": jnp.float32(self.cfg.lwf_strength),
        }
        return self.run.stage(
            model,
            t,
            "train",
            objective=lwf_objective,
            weights=weights,
            frozen=frozen,
            trainable=self.trainable(model, t),
        )

    def end_task(self, model, t):
        self.teacher = model
        return model


# -- parameter-efficient -----------------------------------------------------------------


class LoRA(Method):
    """Task 0 trained fully; each later task trains rank-r LoRA on ``fc`` and the head, then merges."""

    def fit(self, model, t, weights):
        if t == 0:
            return super().fit(model, t, weights)
        module = flowjax.add_lora(
            model.module(),
            self.cfg.lora_rank,
            rngs=nnx.Rngs(1000 * self.run.seed + t),
            select=nnx.PathContains("fc"),
        )
        lora = P.Model.of(module)
        trainable = _mask(lora.params, lambda p, x: "lora" in p or "head" in p)
        lora = self.run.stage(
            lora,
            t,
            "train",
            objective=ce_objective,
            weights=weights,
            trainable=trainable,
        )
        return P.Model.of(flowjax.merge_lora(lora.module()))


class Adapters(Method):
    """Task 0 trained fully (adapter at identity); later tasks train a bottleneck adapter after ``fc`` and the head.

    Task-incremental: a fresh adapter per task, kept, and task ``j`` is evaluated with its
    own (task 0 with the identity one), so the shared body never changes after task 0.
    Class-incremental (no task id at test time): one adapter trained on every later task.
    """

    def init_model(self):
        base = super().init_model().module()
        module = flowjax.add_adapters(
            base,
            self.cfg.adapter_bottleneck,
            rngs=nnx.Rngs(1000 * self.run.seed),
            select=nnx.PathContains("fc"),
        )
        self.per_task = {}
        model = P.Model.of(module)
        self.per_task[0] = _adapter(model.params)
        return model

    def trainable(self, model, t):
        if t == 0:
            return _mask(model.params, lambda p, x: "adapter" not in p)
        return _mask(model.params, lambda p, x: "adapter" in p or "head" in p)

    def train_task(self, model, t):
        if t > 0 and self.run.setting == "task":
            fresh = flowjax.add_adapters(
                P.Net(tuple(self.cfg.channels), self.cfg.hidden, rngs=nnx.Rngs(0)),
                self.cfg.adapter_bottleneck,
                rngs=nnx.Rngs(1000 * self.run.seed + t),
                select=nnx.PathContains("fc"),
            )
            model = model._replace(
                params=_with_adapter(model.params, _adapter(P.Model.of(fresh).params))
            )
        return super().train_task(model, t)

    def end_task(self, model, t):
        self.per_task[t] = _adapter(model.params)
        return model

    def eval_model(self, model, j):
        if self.run.setting != "task":
            return model
        if j not in self.per_task:  # not trained yet: the adapter as it is
            return model
        return model._replace(params=_with_adapter(model.params, self.per_task[j]))


def _adapter(params: dict) -> dict:
    return jax.tree.map(np.asarray, params["fc"]["adapter"])


def _with_adapter(params: dict, adapter: dict) -> dict:
    return {**params, "fc": {**params["fc"], "adapter": adapter}}


# -- architecture ------------------------------------------------------------------------


class PackNet(Method):
    """PackNet: per task, train the free weights, prune to 1/(T − t) of them, retrain, freeze.

    The body's kernels are pruned per layer (``flowjax.packnet_prune``); the biases belong to
    task 0 (frozen afterwards, as in the reference). Head output columns ``2t, 2t + 1``
    are owned by task ``t`` from the start. Task ``j`` is evaluated with
    ``flowjax.packnet_task_params`` (later tasks' weights zeroed).
    """

    needs_task_id = True

    def init_model(self):
        model = super().init_model()
        body = _mask(model.params, lambda p, x: "head" not in p and np.ndim(x) >= 2)
        self.prunable = body
        owner = flowjax.packnet_init(model.params, prunable=body)
        col = np.repeat(np.arange(1, self.cfg.num_tasks + 1), 2)
        col = np.concatenate([col, np.zeros(P.NUM_CLASSES - len(col), col.dtype)])
        owner["head"] = {
            "kernel": jnp.asarray(
                np.broadcast_to(col, owner["head"]["kernel"].shape), jnp.int32
            ),
            "bias": jnp.asarray(col, jnp.int32),
        }
        self.owner = owner
        return model

    def last(self, t):
        return flowjax.packnet_updates(self.owner, t + 1)

    def fit(self, model, t, weights):
        model = super().fit(model, t, weights)
        keep = 1.0 / (self.cfg.num_tasks - t)
        if keep < 1.0:
            params, self.owner = flowjax.packnet_prune(
                model.params, self.owner, t + 1, keep, prunable=self.prunable
            )
            model = self.run.stage(
                model._replace(params=params),
                t,
                "retrain",
                epochs=self.cfg.packnet_retrain_epochs,
                objective=ce_objective,
                trainable=self.trainable(model, t),
                weights=weights,
                last=self.last(t),
            )
        return model

    def end_task(self, model, t):
        if t + 1 < self.cfg.num_tasks:
            self.owner = flowjax.packnet_start_task(self.owner, t + 2)
        return model

    def eval_model(self, model, j):
        return model._replace(
            params=flowjax.packnet_task_params(model.params, self.owner, j + 1)
        )


class Progressive(Method):
    """A progressive network: a ``flowjax.ProgressiveCNN`` column (two outputs) per task, earlier ones frozen."""

    needs_task_id = True
    static_task = True

    def init_model(self):
        net = flowjax.ProgressiveCNN(
            (8, 8, 1),
            self.cfg.channels,
            (self.cfg.hidden, 2),
            strides=(1, 2),
            rngs=nnx.Rngs(self.run.seed),
        )
        return P.Model.of(net)

    def head_filter(self, t):
        last = 1 + len(self.cfg.channels)  # index of the column's output layer

        def head(path, _x):
            return tuple(path[:4]) in {
                ("columns", t, "layers", last),
                ("columns", t, "laterals", last - 1),
            }

        return head

    def trainable(self, model, t):
        return _mask(model.params, lambda p, x: tuple(p[:2]) == ("columns", t))

    def accuracy(self, model, data, j):
        # A task not trained yet (the upper triangle, for FWT) is read from the newest column.
        column = min(j, model.module().num_columns - 1)
        return P.accuracy(model, data, column, self.run.setting)

    def train_task(self, model, t):
        if t > 0:
            module = model.module()
            module.add_column(nnx.Rngs(1000 * self.run.seed + t))
            model = P.Model.of(module)
        return super().train_task(model, t)


METHODS: dict[str, type[Method]] = {
    "FT": Method,
    "FLOW": Method,  # with flow=True
    "L2-SP": L2SP,
    "EWC": EWC,
    "SI": SI,
    "Replay": Replay,
    "DER": DER,
    "LwF": LwF,
    "LoRA": LoRA,
    "Adapters": Adapters,
    "PackNet": PackNet,
    "Progressive": Progressive,
}


def build(name: str, run: Run) -> Method:
    """The method called ``name`` (``"FLOW"``, ``"FLOW + X"``, or a base name) for ``run``."""
    flow = name == "FLOW" or name.startswith("FLOW + ")
    base = name.removeprefix("FLOW + ") if name.startswith("FLOW + ") else name
    if base not in METHODS:
        raise ValueError(
            f"unknown method {name!r}; known: {sorted(METHODS)} and 'FLOW + X'."
        )
    return METHODS[base](run, flow=flow)


def applies(name: str, setting: str) -> bool:
    """Whether the method can run in the setting (PackNet, progressive need the task id)."""
    base = name.removeprefix("FLOW + ")
    return setting == "task" or not METHODS[base].needs_task_id
