"""A functional train step and loop: optax in, metrics out, checkpoints that resume bit for bit.

Nothing here hides the step. :func:`init_train_state` builds a
:class:`TrainState` (step, trainable params, optimiser state, RNG key and the
mutable non-trainable model state such as BatchNorm statistics);
:func:`make_train_step` turns an objective (from
:func:`flowjax.weighted_objective`) and an optax transform (a chain with any
flowjax regulariser, :func:`flowjax.train_only` for LoRA or frozen parts)
into a jitted ``step(state, batch) -> (state, metrics)``; :func:`fit` runs it
over batches with a progress bar, evaluation callbacks, JSON-lines metrics and
orbax checkpoints. A hand-written loop is three lines::

    state = flowjax.init_train_state(params, tx, rng=0)
    step = flowjax.make_train_step(objective, tx, anchor=params)
    for batch in batches:
        state, metrics = step(state, batch)

Against forgetting, :class:`RetentionMonitor` measures retention probes
during training, logs them beside the target metric, stops early when
retention leaves a budget and keeps the best state within it;
:func:`low_lr_recipe` is the short low-learning-rate recipe as a ready
optimiser.

The pre-trained parameters θ₀ (``anchor``, for ‖θ−θ₀‖) and any frozen model
are ARGUMENTS of the compiled step, never part of the state: they are not
checkpointed (they are an input of the run, rebuilt the same way on
restart), and never closed over as constants (an array closed over by a
jitted function is embedded in the program).

**Resuming.** :func:`fit` with ``checkpoint_dir`` saves, every
``checkpoint_every`` steps and at the end (the last ``keep`` are kept), the
state's arrays, the number of batches consumed and every metrics record so
far. Started again with the same arguments it restores the latest
checkpoint, prints ``resumed from step N``, rewrites the metrics file from the
checkpoint (dropping lines written after it) and continues from batch ``N``.
The data position is the step: one step consumes one batch, so a resumed run
must see, from step ``N`` on, exactly the batches an uninterrupted run sees
there. ``data`` is therefore one of

* a function ``start -> iterable`` that yields the batches from batch index
  ``start`` on (cheap: nothing before ``start`` is read), or
* :func:`flowjax.batches` (its shuffles and ``map_fn`` randomness depend
  only on ``(seed, epoch, id)``): its ``from_batch(start)`` starts there
  without reading the batches before, or
* any other re-iterable whose iteration order is a pure function of its
  arguments, such as a list; the first ``start`` batches are read and
  dropped.

A one-shot iterator (a generator object) cannot be restarted and is rejected
when ``checkpoint_dir`` is set. The step's randomness is
``fold_in(state.rng, state.step)``, so it too depends only on the step.
Then a run killed at any point (SIGKILL included: orbax only lists
checkpoints whose write finished; saves are asynchronous, so a kill just
after a save, before its write is final, resumes from the one before) ends with the same parameter bytes and the
same metrics file as an uninterrupted run, on the same devices and mesh. On
another topology (device count, mesh shape) the restore still works (the
arrays are re-sharded as the given state's), but reductions over the batch
may round differently, so equality is only to float rounding. Multi-host:
every process calls :func:`fit` with its own share of each batch; orbax
saves every process's shards, and process 0 writes the metrics file.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flowjax import _cache
from flowjax._types import Array, Batch, Params, PyTree

__all__ = [
    "FitResult",
    "RetentionMonitor",
    "TrainState",
    "fit",
    "init_train_state",
    "low_lr_recipe",
    "make_train_step",
]

_CHECKPOINT_FORMAT = "flowjax.fit/1"


class TrainState(NamedTuple):
    """What a training step reads and returns: everything a resumed run needs, nothing frozen.

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: the trainable parameters (what ``tx`` sees and ``jax.grad``
        differentiates): a pytree of arrays or an ``nnx.State``.
      opt_state: ``tx.init(params)``.
      rng: a raw ``uint32[2]`` PRNG key; step ``t`` uses
        ``jax.random.fold_in(rng, t)``.
      model_state: mutable state that is not trained, e.g. the
        ``nnx.BatchStat`` running statistics, passed to the objective and
        replaced by its aux output; ``None`` if the model has none.
    """

    step: Array
    params: Params
    opt_state: optax.OptState
    rng: Array
    model_state: PyTree = None


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`TrainState`.
      history: every metrics record of the run (resumed parts included), as
        written to the metrics file: dicts with ``"step"`` and float values.
      resumed_from: the step the run restored from a checkpoint, or None.
      stopped_at: the step at which ``stop_fn`` stopped the run, or None.
      best: the state with the highest ``best_fn`` score, or None.
      best_step: its step, or None.
    """

    state: TrainState
    history: list[dict[str, Any]]
    resumed_from: int | None
    stopped_at: int | None = None
    best: TrainState | None = None
    best_step: int | None = None


def init_train_state(
    params: Params,
    tx: optax.GradientTransformation,
    *,
    rng: int | Array = 0,
    model_state: PyTree = None,
    mesh: Mesh | None = None,
    param_shardings: Any = None,
) -> TrainState:
    """The initial :class:`TrainState`: step 0, ``tx.init(params)``, a key, fresh buffers.

    The params (and ``model_state``) are copied into new device buffers, so the
    step may donate the state without deleting the caller's arrays (a LoRA
    model from :func:`flowjax.add_lora` shares its base kernels with the base
    model, often also the anchor).

    Args:
      params: the trainable parameters (e.g. ``nnx.state(model, nnx.Param)``
        or the ``params`` of ``nnx.split(model, nnx.Param, nnx.BatchStat)``).
      tx: the optax transform the step will use.
      rng: an int seed, a raw ``uint32[2]`` key or a typed key
        (``jax.random.key``).
      model_state: optional mutable non-trainable state (``nnx.BatchStat``).
      mesh: optional ``jax.sharding.Mesh``; the state is placed on it,
        replicated unless ``param_shardings`` says otherwise.
      param_shardings: optional pytree of ``jax.sharding.Sharding`` with the
        structure of ``params`` or a prefix of it (a sharding may stand for
        an ``nnx.Variable`` or a whole subtree; needs ``mesh``); the optimiser state follows
        the params' shardings, as XLA propagates them through ``tx.init``.

    Returns:
      A :class:`TrainState`.

    Raises:
      ValueError: ``param_shardings`` without ``mesh``, or whose structure
        does not match ``params``; a non-floating parameter leaf; ``rng``
        that is not a seed or key.
      TypeError: ``tx`` is not an optax transform.

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> state = flowjax.init_train_state({"w": jnp.ones(2)}, optax.sgd(0.1), rng=0)
      >>> int(state.step), state.params["w"].tolist(), state.rng.dtype
      (0, [1.0, 1.0], dtype('uint32'))
    """
    _check_tx(tx)
    _check_float_params(params)
    if param_shardings is not None and mesh is None:
        raise ValueError("param_shardings needs the mesh they live on: pass mesh=.")
    key = _as_key(rng)
    params = _copy(params)
    model_state = _copy(model_state)
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        if param_shardings is None:
            params = jax.device_put(params, replicated)
        else:
            params = jax.device_put(params, _match_shardings(params, param_shardings))
        model_state = jax.device_put(model_state, replicated)
        key = jax.device_put(key, replicated)
    # Without a mesh tx.init runs op by op: nothing to compile for each new tx (every
    # stage, seed and learning rate of a sweep builds one). With a mesh it is jitted, so
    # XLA gives the optimiser state the params' shardings.
    opt_state = tx.init(params) if mesh is None else jax.jit(tx.init)(params)
    step = jnp.zeros((), jnp.int32)
    if mesh is not None:
        step = jax.device_put(step, replicated)
        # Leaves tx.init makes from nothing (counts) land on one device: replicate them.
        devices = set(mesh.devices.flat)
        opt_state = jax.tree.map(
            lambda x: (
                x
                if set(x.sharding.device_set) == devices
                else jax.device_put(x, replicated)
            ),
            opt_state,
        )
    return TrainState(step, params, opt_state, key, model_state)


def make_train_step(
    objective: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    anchor: Params,
    frozen: PyTree = None,
    has_aux: bool = False,
    return_metrics: bool = True,
    pass_rng: bool = False,
    mesh: Mesh | None = None,
    weight_key: str = "weight",
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """A jitted train step ``(state, batch) -> (state, metrics)`` for an objective and optax.

    .. math::
        (L, g) = (\\mathrm{objective}, \\nabla_\\theta \\mathrm{objective})(\\theta, \\text{batch}),
        \\quad (u, s') = \\mathrm{tx.update}(g, s, \\theta),
        \\quad \\theta' = \\theta + u

    ``objective(params, batch, *args)`` is called as
    :func:`flowjax.weighted_objective` calls ``loss_fn``: ``args`` is, in
    this order, ``state.model_state`` when the state has one, ``frozen``
    when given, and the step key ``fold_in(state.rng, state.step)`` when
    ``pass_rng`` (the same key for every example of a per-example
    objective: fold in something per example for per-example noise). Its output is one of
    ``loss``, ``(loss, metrics)`` (``return_metrics``, the default, as from
    ``weighted_objective(..., return_metrics=True)``), ``(loss, aux)``
    (``has_aux``) or ``(loss, (aux, metrics))``; ``aux`` is the new
    ``model_state`` (a BatchNorm model's updated statistics through
    ``weighted_objective(..., batched=True, has_aux=True)``). ``tx.update``
    always gets ``params`` (the regularisers need them). The batch's ``"id"``
    field stays on the host (ids are for attaching weights, before the step).

    Metrics (float32 scalars): ``loss``; ``weight_mean`` (what the objective
    reports, else the mean of ``batch[weight_key]``, else 1.0);
    ``grad_norm`` (``optax.tree.norm`` (the global L2 norm, formerly ``optax.global_norm``) of the gradient of the objective,
    before ``tx``); ``param_distance`` (‖θ−θ₀‖, the global L2 norm of
    ``params - anchor``); then the objective's own metrics.

    ``anchor`` (θ₀) and ``frozen`` are arguments of the compiled step, not
    closed-over constants and not part of the state (so they are never
    checkpointed: a run rebuilds them the same way on restart). The
    step is traced once per batch shape; the state is donated (its buffers
    are reused for the new state) unless ``donate=False``. Steps that
    compute the same thing share one compiled program: building a step
    again, for another anchor, other ``frozen`` inputs of the same shapes, or
    a learning rate that ``optax.inject_hyperparams`` keeps in the optimiser
    state, compiles nothing new (the key is what the objective and
    ``tx.update`` compute, by value, as :func:`flowjax.per_example_losses`
    keys its step; a learning rate closed over by ``tx`` is part of it).

    With a ``mesh`` (axes ``('data', ...)``) the batch is sharded over
    ``'data'`` on its leading axis (one process: ``jax.device_put``; several:
    each process passes its own rows, joined with
    ``jax.make_array_from_process_local_data``), and the new state keeps the
    shardings of the state given (see :func:`init_train_state`); ``anchor``
    is placed once with the params' shardings, and ``frozen`` arrays already
    spread over the mesh's devices keep their shardings (a tensor-parallel
    base under LoRA) while any other frozen input is replicated.

    Args:
      objective: the batch objective (see above).
      tx: an optax transform, e.g. ``optax.chain(flowjax.l2sp(1e-2),
        optax.adam(1e-3))`` or ``flowjax.train_only(optax.adam(1e-3),
        nnx.LoRAParam)``.
      anchor: θ₀, a pytree with the structure of the params (usually the
        pre-trained params themselves).
      frozen: optional frozen inputs of the objective (an LwF teacher, the
        frozen base of a model split with ``nnx.split``), any pytree.
      has_aux: the objective returns the new ``model_state`` as aux.
      return_metrics: the objective returns a metrics dict (as
        ``weighted_objective(..., return_metrics=True)``).
      pass_rng: pass the step's key to the objective as its last argument
        (dropout, augmentation on device).
      mesh: optional mesh with a ``'data'`` axis for data parallelism.
      weight_key: the batch field of per-example weights.
      donate: donate the state's buffers to the step.

    Returns:
      ``step(state, batch) -> (state, metrics)``.

    Raises:
      ValueError: a mesh without a ``'data'`` axis; when called, a state
        that is not a :class:`TrainState` (or, with a mesh, not placed on
        it), params whose structure differs
        from the anchor's, an objective output that does not match
        ``has_aux`` / ``return_metrics``, a non-scalar loss, or a batch whose
        leading axis does not divide over ``'data'``.
      TypeError: ``tx`` is not an optax transform, or ``objective`` is not
        callable.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax, flowjax
      >>> loss = lambda p, ex: (p["w"] * ex["x"] - ex["y"]) ** 2
      >>> objective = flowjax.weighted_objective(loss, return_metrics=True)
      >>> params, tx = {"w": jnp.array(0.0)}, optax.sgd(0.1)
      >>> step = flowjax.make_train_step(objective, tx, anchor=params)
      >>> state = flowjax.init_train_state(params, tx)
      >>> batch = {"id": np.arange(2), "x": np.float32([1, 2]), "y": np.float32([2, 4]),
      ...          "weight": np.float32([1, 1])}
      >>> state, metrics = step(state, batch)
      >>> float(metrics["loss"]), float(metrics["grad_norm"]), float(state.params["w"])
      (10.0, 10.0, 1.0)
      >>> float(metrics["param_distance"]), float(metrics["weight_mean"])
      (1.0, 1.0)
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable; got {type(objective).__name__}.")
    _check_tx(tx)
    if mesh is not None and "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; it has {mesh.axis_names}."
        )
    anchor_treedef = jax.tree.structure(anchor)

    def inner(state: TrainState, batch, anchor, frozen):
        args = () if state.model_state is None else (state.model_state,)
        if frozen is not None:
            args = (*args, frozen)
        if pass_rng:
            args = (*args, jax.random.fold_in(state.rng, state.step))

        def loss_of(params):
            out = objective(params, batch, *args)
            return _split_output(out, has_aux, return_metrics)

        (loss, (aux, obj_metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model_state = aux if has_aux else state.model_state
        metrics = {
            "loss": loss,
            "weight_mean": _weight_mean(obj_metrics, batch, weight_key),
            "grad_norm": optax.tree.norm(grads),
            "param_distance": optax.tree.norm(
                jax.tree.map(lambda p, a: p - a, params, anchor)
            ),
        }
        for k, v in obj_metrics.items():
            if k not in metrics:
                metrics[k] = v
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        new = TrainState(state.step + 1, params, opt_state, state.rng, model_state)
        return new, metrics

    compiled: dict[Any, tuple[Callable, tuple[Any, Any]]] = {}
    # What the step computes: the objective and tx.update (tx.init never runs in the
    # step, so hyper-parameters that optax.inject_hyperparams keeps in the state are not
    # part of it) and the flags. Steps that compute the same thing share one program.
    computes = _step_fingerprint(
        objective, tx, (has_aux, return_metrics, pass_rng, weight_key)
    )

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        if not isinstance(state, TrainState):
            raise ValueError(
                f"state must be a flowjax.TrainState (from init_train_state); got "
                f"{type(state).__name__}."
            )
        if jax.tree.structure(state.params) != anchor_treedef:
            raise ValueError(
                "the state's params and the anchor have different structures: the anchor "
                "is θ₀ for every trainable leaf (pass the params the state was built from)."
            )
        batch = _device_batch(batch, mesh)
        treedef = jax.tree.structure(state)
        fn = compiled.get(treedef)
        if fn is None:
            shardings = None
            if mesh is not None:
                shardings = jax.tree.map(lambda x: x.sharding, state)
                devices = set(mesh.devices.flat)
                for path, sh in jax.tree_util.tree_leaves_with_path(shardings):
                    if set(sh.device_set) != devices:
                        raise ValueError(
                            f"state leaf {jax.tree_util.keystr(path)} lives on "
                            f"{len(sh.device_set)} device(s), not on the step's mesh of "
                            f"{len(devices)}: build the state with "
                            "init_train_state(..., mesh=mesh)."
                        )
            placed = (anchor, frozen)
            if mesh is not None:
                # θ₀ sharded as the params; a frozen array already spread over the mesh
                # (a tensor-parallel base under LoRA) keeps its sharding, any other
                # frozen input is replicated.
                replicated = NamedSharding(mesh, P())
                placed = (
                    jax.device_put(anchor, shardings.params),
                    jax.tree.map(
                        lambda x: (
                            x
                            if isinstance(x, jax.Array)
                            and set(x.sharding.device_set) == devices
                            else jax.device_put(x, replicated)
                        ),
                        frozen,
                    ),
                )
            jitted = _program(
                inner,
                computes,
                donate,
                None if shardings is None else (shardings, None),
            )
            fn = compiled[treedef] = (jitted, placed)
        jitted, (anchor_, frozen_) = fn
        return jitted(state, batch, anchor_, frozen_)

    return step


# Programs shared between steps that compute the same thing (same objective and tx.update
# by value, same flags): a step built again for another anchor, another seed's frozen
# inputs or another learning rate held in the optimiser state (optax.inject_hyperparams)
# reuses the compiled program instead of tracing and compiling again. Bounded: the oldest
# programs are dropped first.
_PROGRAMS: collections.OrderedDict[Any, Callable] = collections.OrderedDict()
_MAX_PROGRAMS = 32


def _step_fingerprint(objective, tx, flags) -> str | None:
    """A key for what a step computes, or None when the objective or ``tx.update`` cannot be pinned down."""
    parts = [_cache.fn_fingerprint(f, by_identity=True) for f in (objective, tx.update)]
    return None if None in parts else "/".join([*parts, repr(flags)])


def _program(inner, computes, donate: bool, out_shardings):
    """``jax.jit(inner, ...)``, shared with every earlier step whose ``computes`` and options match."""
    options = {
        "donate_argnums": (0,) if donate else (),
        "out_shardings": out_shardings,
    }
    if computes is None:
        return jax.jit(inner, **options)
    key = (computes, donate)
    if out_shardings is not None:
        leaves, treedef = jax.tree.flatten(out_shardings)
        key += (treedef, tuple(leaves))
    jitted = _PROGRAMS.get(key)
    if jitted is None:
        jitted = _PROGRAMS[key] = jax.jit(inner, **options)
        while len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    else:
        _PROGRAMS.move_to_end(key)
    return jitted


def fit(
    step: Callable[[TrainState, Batch], tuple[TrainState, Mapping[str, Any]]],
    state: TrainState,
    data: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    *,
    num_steps: int,
    eval_fn: Callable[[TrainState], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    log_every: int = 1,
    metrics_path: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    keep: int = 3,
    stop_fn: Callable[[Mapping[str, float]], bool] | None = None,
    best_fn: Callable[[Mapping[str, float]], float | None] | None = None,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Runs ``step`` for ``num_steps`` batches: progress bar, evaluation, metrics, checkpoints.

    Step ``t`` (1-based) consumes batch ``t - 1`` of ``data``. A metrics
    record ``{"step": t, **metrics}`` (floats) is kept every ``log_every``
    steps, at every evaluation and at the last step; every
    ``eval_every`` steps and at the last step ``eval_fn(state)`` is merged
    into it. Records go to ``metrics_path`` as JSON lines (no wall-clock
    values: two runs give the same bytes) and to the returned history. The
    progress bar shows steps, examples/s and the loss.

    With ``checkpoint_dir`` the run saves an orbax checkpoint (the state's
    arrays, the data position and the records so far) every
    ``checkpoint_every`` steps and at the end, keeping the last ``keep``;
    started again with the same arguments it resumes from the latest
    checkpoint and ends bit-identical to an uninterrupted run (see the module
    doc for how ``data`` must behave). A run that already finished (or was
    stopped) returns its final state without a step. The state given is the
    template the checkpoint is restored into (its structure, dtypes and
    shardings).

    After every evaluation, ``stop_fn(record)`` may stop the run (the record
    of that step is written, the state checkpointed, and ``stopped_at`` set);
    ``best_fn(record)`` scores the state (higher is better; ``None``: not
    eligible) and the best one is kept (``best``, ``best_step``) and saved in
    every checkpoint as its item ``"best"`` (a flat dict of the state's
    leaves, in ``jax.tree.leaves`` order). A :class:`RetentionMonitor` gives
    all three: ``eval_fn=monitor``, ``stop_fn=monitor.should_stop``,
    ``best_fn=monitor.best_score``.

    Args:
      step: from :func:`make_train_step`, or any function of that signature
        returning a :class:`TrainState`.
      state: the initial state (from :func:`init_train_state`).
      data: a function ``start -> iterable of batches from batch index
        start``, or a re-iterable of batches (see the module doc).
      num_steps: the number of steps (an int >= 1). The run stops earlier if
        ``data`` runs out (the last record is the last step taken).
      eval_fn: ``eval_fn(state) -> {name: scalar}``.
      eval_every: evaluate every this many steps (0: only at the end, if
        ``eval_fn`` is given).
      log_every: keep a metrics record every this many steps.
      metrics_path: a JSON-lines file of the records (rewritten from the
        checkpoint on resume; written by process 0).
      checkpoint_dir: a directory for orbax checkpoints (made absolute).
      checkpoint_every: save every this many steps (0: only at the end).
      keep: how many checkpoints to keep (>= 1).
      stop_fn: ``stop_fn(record) -> bool``, called on every evaluated record.
      best_fn: ``best_fn(record) -> float | None``, called on every evaluated
        record.
      run_info: JSON data naming the run's inputs that are not state, saved
        in every checkpoint and compared on resume: e.g. the FLOW weight
        table's path and a digest of it (``hashlib.sha256(
        table.weights.tobytes()).hexdigest()``), the config. A resumed run
        given other ``run_info`` raises instead of mixing two runs.
      progress: show a tqdm progress bar (process 0).
      log: where the ``resumed from step N`` line goes.

    Returns:
      A :class:`FitResult` ``(state, history, resumed_from, stopped_at,
      best, best_step)``.

    Raises:
      ValueError: a non-positive ``num_steps``, ``log_every`` or ``keep``; a
        negative ``eval_every`` or ``checkpoint_every``; ``eval_every``
        without ``eval_fn``; a one-shot iterator with ``checkpoint_dir``; an
        ``eval_fn`` returning a name the step's metrics already use, or a
        non-scalar; a checkpoint written for a state of another structure, for
        more than ``num_steps`` steps or with other ``run_info``; a
        ``run_info`` that is not JSON data.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax, flowjax
      >>> loss = lambda p, ex: (p["w"] * ex["x"] - ex["y"]) ** 2
      >>> objective = flowjax.weighted_objective(loss, return_metrics=True)
      >>> params, tx = {"w": jnp.array(0.0)}, optax.sgd(0.05)
      >>> data = {"x": np.linspace(-1, 1, 8, dtype=np.float32)}
      >>> data["y"], data["weight"] = 3 * data["x"], np.ones(8, np.float32)
      >>> result = flowjax.fit(
      ...     flowjax.make_train_step(objective, tx, anchor=params),
      ...     flowjax.init_train_state(params, tx),
      ...     flowjax.batches(data, 4, epochs=None, shard=(0, 1)),
      ...     num_steps=20, log_every=10, progress=False)
      >>> [r["step"] for r in result.history], round(float(result.state.params["w"]), 2)
      ([10, 20], 1.75)
    """
    _check_int(num_steps, "num_steps", 1)
    _check_int(log_every, "log_every", 1)
    _check_int(keep, "keep", 1)
    _check_int(eval_every, "eval_every", 0)
    _check_int(checkpoint_every, "checkpoint_every", 0)
    if eval_every and eval_fn is None:
        raise ValueError("eval_every needs an eval_fn(state) -> dict to call.")
    if (stop_fn is not None or best_fn is not None) and eval_fn is None:
        raise ValueError(
            "stop_fn and best_fn read evaluated records: pass an eval_fn (e.g. a "
            "flowjax.RetentionMonitor)."
        )
    restartable = callable(data) or not isinstance(data, Iterator)
    if checkpoint_dir is not None and not restartable:
        raise ValueError(
            "data is a one-shot iterator (e.g. a generator object): a resumed run cannot "
            "see the batches it would have seen. Pass a re-iterable (flowjax.batches(...), a "
            "list) or a function start -> batches from batch index start."
        )
    if run_info is not None:
        try:
            run_info = json.loads(json.dumps(dict(run_info)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"run_info must be JSON data (a dict): {e}") from None
    main = jax.process_index() == 0
    run = _Run(history=[], run_info=run_info)
    resumed_from = None
    manager = None
    if checkpoint_dir is not None:
        manager = _manager(checkpoint_dir, keep)
        latest = manager.latest_step()
        if latest is not None:
            state, run = _restore(manager, latest, state, num_steps, run_info)
            resumed_from = latest
            log(f"resumed from step {latest}")
    start = resumed_from or 0
    if metrics_path is not None and main:
        _write_records(metrics_path, run.history)
    out = open(metrics_path, "a") if metrics_path is not None and main else None
    bar = _bar(num_steps, start, progress and main)
    try:
        if start < num_steps and run.stopped_at is None:
            state, taken = _run(
                step,
                state,
                _batches_from(data, start),
                start,
                num_steps,
                run,
                out,
                bar,
                eval_fn=eval_fn,
                eval_every=eval_every,
                log_every=log_every,
                manager=manager,
                checkpoint_every=checkpoint_every,
                stop_fn=stop_fn,
                best_fn=best_fn,
            )
            if manager is not None and taken > start and manager.latest_step() != taken:
                _save(manager, taken, state, run)
    finally:
        bar.close()
        if out is not None:
            out.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return FitResult(
        state, run.history, resumed_from, run.stopped_at, run.best, run.best_step
    )


class _Run:
    """What :func:`fit` carries beside the state, and checkpoints with it."""

    def __init__(
        self,
        history,
        stopped_at=None,
        best=None,
        best_step=None,
        best_score=None,
        run_info=None,
    ):
        self.history = history
        self.run_info = run_info
        self.stopped_at = stopped_at
        self.best, self.best_step, self.best_score = best, best_step, best_score


def _run(
    step,
    state,
    batches,
    start,
    num_steps,
    run,
    out,
    bar,
    *,
    eval_fn,
    eval_every,
    log_every,
    manager,
    checkpoint_every,
    stop_fn,
    best_fn,
):
    """The loop of :func:`fit`; returns the state and the number of steps taken."""
    t = start
    last = time.perf_counter()
    examples = 0
    it = iter(batches)
    batch = next(it, _END) if t < num_steps else _END
    while batch is not _END:
        state, metrics = step(state, batch)
        t += 1
        examples += _batch_size(batch)
        # One batch ahead, so that the last step taken is known to be the last even when
        # the data runs out before num_steps: it gets the final record and evaluation.
        batch = next(it, _END) if t < num_steps else _END
        final = batch is _END
        evaluate = eval_fn is not None and (
            final or (eval_every and t % eval_every == 0)
        )
        if final or evaluate or t % log_every == 0:
            record = {"step": t, **_floats(metrics, "the step's metrics")}
            if evaluate:
                extra = _floats(eval_fn(state), "eval_fn's result")
                clash = sorted(set(extra) & set(record))
                if clash:
                    raise ValueError(
                        f"eval_fn returned {clash}, names the step's metrics already use; "
                        "prefix them (e.g. 'eval/loss')."
                    )
                record.update(extra)
            run.history.append(record)
            if out is not None:
                out.write(json.dumps(record) + "\n")
                out.flush()
            now = time.perf_counter()
            bar.set_postfix(
                loss=f"{record['loss']:.4g}" if "loss" in record else None,
                ex_per_s=f"{examples / max(now - last, 1e-9):.4g}",
            )
            last, examples = now, 0
        stop = False
        if evaluate:
            if best_fn is not None:
                score = best_fn(record)
                if score is not None and (
                    run.best_score is None or float(score) > run.best_score
                ):
                    run.best, run.best_step = _copy(state), t
                    run.best_score = float(score)
            if stop_fn is not None and stop_fn(record):
                run.stopped_at, stop = t, True
        bar.update(1)
        if manager is not None and checkpoint_every and t % checkpoint_every == 0:
            _save(manager, t, state, run)
        if final or stop:
            break
    return state, t


_END = object()  # no batch left


class RetentionMonitor:
    """Retention probes as an evaluation hook: log them, stop early, keep the best in budget.

    Seed 002's recipe against forgetting, built in: measure general ability on
    held-out "retention probes" during fine-tuning (a classification set with
    the pre-trained head swapped back in, held-out pre-training text, ...)
    and stop or back off when it drops. For probe :math:`k` with score
    :math:`s_k(\\theta_t)` and pre-trained score :math:`s_k(\\theta_0)`:

    .. math::
        r_k(t) = \\frac{s_k(\\theta_t)}{s_k(\\theta_0)} \\;(\\text{higher is better, e.g. accuracy}),
        \\qquad r_k(t) = \\frac{s_k(\\theta_0)}{s_k(\\theta_t)} \\;(\\text{lower is better,
        e.g. perplexity}),

    and the run is within budget while :math:`r_k(t) \\ge b` for every probe
    (``budget=0.95``: keep at least 95 % of pre-trained accuracy).

    Use it with :func:`fit`: ``eval_fn=monitor`` logs ``probe/<name>`` (the
    score), ``retention/<name>`` (:math:`r_k`) and the ``target`` metrics
    beside the step's metrics; ``stop_fn=monitor.should_stop`` stops at the
    first evaluation out of budget; ``best_fn=monitor.best_score`` keeps the
    state with the best ``target_key`` among the evaluations within budget.

    Args:
      probes: ``{name: probe(state) -> scalar}``; each reads the state's
        params (and ``model_state``) and returns a score.
      pretrained: the state before fine-tuning (e.g. the state from
        :func:`init_train_state`, before :func:`fit` donates it): the
        baseline scores are the probes on it, computed here. Or pass
        ``baseline``.
      baseline: ``{name: pre-trained score}`` instead of ``pretrained``.
      budget: the least retention allowed, in (0, 1]; a float for every probe
        or ``{name: budget}``.
      higher_is_better: per probe (a bool or ``{name: bool}``): True for
        accuracy-like scores, False for losses and perplexities.
      target: optional ``target(state) -> {name: scalar}``, the fine-tuning
        metrics to log beside retention (e.g. ``{"target/acc": ...}``).
      target_key: the record key :meth:`best_score` ranks by (e.g.
        ``"target/acc"``); ``None``: rank by the mean retention.
      target_higher_is_better: the sense of ``target_key``.

    Raises:
      ValueError: no probes; both or neither of ``pretrained`` and
        ``baseline``; a baseline missing a probe, non-finite or zero; a
        budget outside (0, 1]; per-probe options naming unknown probes.

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> state0 = flowjax.init_train_state({"w": jnp.array(0.0)}, optax.sgd(0.1))
      >>> acc = lambda s: 1.0 - jnp.abs(s.params["w"]) / 10   # a retention probe
      >>> monitor = flowjax.RetentionMonitor({"pretrain_acc": acc}, pretrained=state0)
      >>> monitor.baseline
      {'pretrain_acc': 1.0}
      >>> later = state0._replace(params={"w": jnp.array(1.0)})
      >>> record = {"step": 5, **{k: float(v) for k, v in monitor(later).items()}}
      >>> record["retention/pretrain_acc"], monitor.should_stop(record)
      (0.9, True)
    """

    def __init__(
        self,
        probes: Mapping[str, Callable[[TrainState], Any]],
        *,
        pretrained: TrainState | None = None,
        baseline: Mapping[str, float] | None = None,
        budget: float | Mapping[str, float] = 0.95,
        higher_is_better: bool | Mapping[str, bool] = True,
        target: Callable[[TrainState], Mapping[str, Any]] | None = None,
        target_key: str | None = None,
        target_higher_is_better: bool = True,
    ):
        if not isinstance(probes, Mapping) or not probes:
            raise ValueError("probes must be a non-empty dict {name: probe(state)}.")
        for name, fn in probes.items():
            if not callable(fn):
                raise ValueError(f"probe {name!r} is not callable.")
        self.probes = dict(probes)
        names = list(self.probes)
        if (pretrained is None) == (baseline is None):
            raise ValueError(
                "pass exactly one of pretrained= (the state before fine-tuning) and "
                "baseline= (the pre-trained scores)."
            )
        if pretrained is not None:
            baseline = {
                n: float(jax.device_get(fn(pretrained))) for n, fn in probes.items()
            }
        missing = sorted(set(names) - set(baseline))
        if missing:
            raise ValueError(f"baseline has no score for probes {missing}.")
        self.baseline = {n: float(baseline[n]) for n in names}
        for n, v in self.baseline.items():
            if not math.isfinite(v) or v == 0:
                raise ValueError(
                    f"the pre-trained score of probe {n!r} is {v}: retention is a ratio to "
                    "it, which needs a finite, non-zero score."
                )
        self.budget = _per_probe(budget, names, "budget")
        for n, b in self.budget.items():
            if not isinstance(b, int | float) or not 0 < b <= 1:
                raise ValueError(f"budget for {n!r} must be in (0, 1]; got {b!r}.")
        self.higher_is_better = _per_probe(higher_is_better, names, "higher_is_better")
        self.target = target
        self.target_key = target_key
        self.target_higher_is_better = target_higher_is_better

    def __call__(self, state: TrainState) -> dict[str, Any]:
        """The evaluation: ``probe/<name>``, ``retention/<name>`` and the target metrics."""
        out: dict[str, Any] = {}
        for name, fn in self.probes.items():
            score = float(jax.device_get(fn(state)))
            base = self.baseline[name]
            ratio = score / base if self.higher_is_better[name] else base / score
            out[f"probe/{name}"] = score
            out[f"retention/{name}"] = ratio
        if self.target is not None:
            out.update(self.target(state))
        return out

    def within_budget(self, record: Mapping[str, float]) -> bool:
        """Whether every probe's retention in ``record`` is at least its budget."""
        return all(record[f"retention/{n}"] >= self.budget[n] for n in self.probes)

    def should_stop(self, record: Mapping[str, float]) -> bool:
        """For ``fit(stop_fn=...)``: True once retention is below the budget."""
        return not self.within_budget(record)

    def best_score(self, record: Mapping[str, float]) -> float | None:
        """For ``fit(best_fn=...)``: the target score within budget, else None."""
        if not self.within_budget(record):
            return None
        if self.target_key is None:
            return float(np.mean([record[f"retention/{n}"] for n in self.probes]))
        if self.target_key not in record:
            raise ValueError(
                f"target_key={self.target_key!r} is not in the record ({sorted(record)})."
            )
        value = float(record[self.target_key])
        return value if self.target_higher_is_better else -value


def _per_probe(value, names, what):
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown or set(value) != set(names):
            raise ValueError(
                f"{what} must name every probe ({names}); got {sorted(value)}."
            )
        return dict(value)
    return dict.fromkeys(names, value)


def low_lr_recipe(
    steps_per_epoch: int,
    *,
    epochs: int = 2,
    learning_rate: float = 1e-5,
    warmup_fraction: float = 0.1,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
) -> tuple[optax.GradientTransformation, int]:
    """The short, low-learning-rate fine-tuning recipe that limits forgetting, ready to use.

    .. math::
        \\eta_t = \\eta \\cdot \\begin{cases} t / W & t < W \\\\
        \\tfrac12\\left(1 + \\cos\\pi\\frac{t - W}{T - W}\\right) & \\text{cosine} \\\\
        1 & \\text{constant} \\end{cases}, \\qquad T = \\text{epochs} \\cdot
        \\text{steps\\_per\\_epoch}, \\; W = \\lfloor \\text{warmup\\_fraction} \\cdot T \\rfloor

    with AdamW. The practice the seed documents name against forgetting: a
    low learning rate (default 1e-5, the usual full fine-tuning rate of
    pre-trained transformers; LoRA adapters take about 10x more), a short
    run (1-3 epochs, default 2), linear warm-up and cosine decay to 0 (or a
    constant rate after warm-up), with retention watched during training
    (:class:`RetentionMonitor`). Chain a regulariser before it:
    ``optax.chain(flowjax.l2sp(1e-2), tx)``.

    Args:
      steps_per_epoch: the steps of one pass over the data (e.g.
        ``flowjax.batches(...).steps_per_epoch``), an int >= 1.
      epochs: passes over the data, an int >= 1 (1-3 recommended).
      learning_rate: the peak rate, > 0.
      warmup_fraction: the fraction of the steps spent warming up, in [0, 1).
      schedule: ``"cosine"`` or ``"constant"`` after warm-up.
      weight_decay: AdamW's decoupled weight decay, >= 0.

    Returns:
      ``(tx, num_steps)``: the optax transform and the number of steps to
      pass to :func:`fit`.

    Raises:
      ValueError: a value out of range or an unknown schedule.

    Example:
      >>> import flowjax
      >>> tx, num_steps = flowjax.low_lr_recipe(50, epochs=2, learning_rate=1e-4)
      >>> num_steps
      100
    """
    _check_int(steps_per_epoch, "steps_per_epoch", 1)
    _check_int(epochs, "epochs", 1)
    if not (isinstance(learning_rate, int | float) and 0 < learning_rate < math.inf):
        raise ValueError(
            f"learning_rate must be a finite number > 0; got {learning_rate!r}."
        )
    if not (isinstance(warmup_fraction, int | float) and 0 <= warmup_fraction < 1):
        raise ValueError(f"warmup_fraction must be in [0, 1); got {warmup_fraction!r}.")
    if not (isinstance(weight_decay, int | float) and 0 <= weight_decay < math.inf):
        raise ValueError(
            f"weight_decay must be a finite number >= 0; got {weight_decay!r}."
        )
    total = steps_per_epoch * epochs
    warmup = int(warmup_fraction * total)
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup, total, end_value=0.0
        )
    elif schedule == "constant":
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
                optax.constant_schedule(learning_rate),
            ],
            [warmup],
        )
    else:
        raise ValueError(f'schedule must be "cosine" or "constant"; got {schedule!r}.')
    return optax.adamw(lr, weight_decay=weight_decay), total


# ----------------------------------------------------------------------------- checkpoints


def _manager(directory, keep: int):
    path = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(path, options=options)


def _state_fingerprint(state: TrainState) -> list[str]:
    leaves = jax.tree.leaves(state)
    return [f"{np.dtype(x.dtype).name}{list(np.shape(x))}" for x in leaves]


def _save(manager, t: int, state: TrainState, run: _Run) -> None:
    items = {"state": ocp.args.StandardSave(_flat(state))}
    if run.best is not None:
        items["best"] = ocp.args.StandardSave(_flat(run.best))
    meta = {
        "format": _CHECKPOINT_FORMAT,
        "step": t,
        "batches_consumed": t,
        "leaves": _state_fingerprint(state),
        "history": list(run.history),  # a copy: the save may be written later (async)
        "stopped_at": run.stopped_at,
        "best_step": run.best_step,
        "best_score": run.best_score,
        "run_info": run.run_info,
    }
    items["meta"] = ocp.args.JsonSave(meta)
    manager.save(t, args=ocp.args.Composite(**items), force=True)


def _flat(state) -> dict[str, Array]:
    return {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(state))}


def _restore(manager, t: int, template: TrainState, num_steps: int, run_info):
    meta = manager.restore(t, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"
    ]
    if meta.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(
            f"{manager.directory} step {t} is not a flowjax.fit checkpoint "
            f"(format {meta.get('format')!r})."
        )
    if meta["leaves"] != _state_fingerprint(template):
        raise ValueError(
            f"the checkpoint at {manager.directory} (step {t}) holds a state of another "
            f"structure ({len(meta['leaves'])} leaves {meta['leaves'][:4]}...) than the state "
            f"given ({_state_fingerprint(template)[:4]}...): another model, optimiser or "
            "method wrote it. Use a new checkpoint_dir."
        )
    if meta.get("run_info") != run_info:
        raise ValueError(
            f"the checkpoint at {manager.directory} (step {t}) was written with run_info="
            f"{meta.get('run_info')!r}, this run has run_info={run_info!r}: another run's "
            "inputs (weights, config). Use a new checkpoint_dir."
        )
    if t > num_steps:
        raise ValueError(
            f"the checkpoint at {manager.directory} is at step {t}, past num_steps="
            f"{num_steps}: it belongs to a longer run."
        )
    leaves, treedef = jax.tree.flatten(template)
    abstract = {
        f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding_of(x))
        for i, x in enumerate(leaves)
    }
    items = {"state": ocp.args.StandardRestore(abstract)}
    if meta.get("best_step") is not None:
        items["best"] = ocp.args.StandardRestore(abstract)
    restored = manager.restore(t, args=ocp.args.Composite(**items))

    def unflat(flat):
        return jax.tree.unflatten(treedef, [flat[k] for k in sorted(flat)])

    run = _Run(
        list(meta["history"]),
        meta.get("stopped_at"),
        unflat(restored["best"]) if "best" in items else None,
        meta.get("best_step"),
        meta.get("best_score"),
        run_info,
    )
    return unflat(restored["state"]), run


def _sharding_of(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharding


def _write_records(path, history) -> None:
    """Rewrites the metrics file atomically with ``history`` (the checkpoint's records)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- helpers


def _batches_from(data, start: int) -> Iterator[Batch]:
    if callable(data):
        return iter(data(start))
    if callable(
        getattr(data, "from_batch", None)
    ):  # flowjax.batches: no batch read twice
        return iter(data.from_batch(start))
    return itertools.islice(iter(data), start, None)


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, unit="step", desc="train"
    )


def _batch_size(batch) -> int:
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def _floats(values: Mapping[str, Any], what: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise ValueError(
            f"{what} must be a dict of scalars; got {type(values).__name__}."
        )
    host = jax.device_get(dict(values))
    out = {}
    for k, v in host.items():
        if np.ndim(v) != 0:
            raise ValueError(
                f"{what}: {k!r} has shape {np.shape(v)}; records hold scalars."
            )
        out[str(k)] = float(v)
    return out


def _split_output(out, has_aux: bool, return_metrics: bool):
    """``(loss, (aux, metrics))`` from the objective's output (see make_train_step)."""
    want = {
        (False, False): "loss",
        (False, True): "(loss, metrics)",
        (True, False): "(loss, aux)",
        (True, True): "(loss, (aux, metrics))",
    }[(has_aux, return_metrics)]
    try:
        if not has_aux and not return_metrics:
            loss, aux, metrics = out, None, {}
        elif has_aux and not return_metrics:
            loss, aux = out
            metrics = {}
        elif not has_aux:
            loss, metrics = out
            aux = None
        else:
            loss, (aux, metrics) = out
    except (TypeError, ValueError):
        raise ValueError(
            f"the objective must return {want} (has_aux={has_aux}, "
            f"return_metrics={return_metrics}); got {type(out).__name__}."
        ) from None
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"the objective must return {want}; its metrics are a {type(metrics).__name__}, "
            "not a dict (set return_metrics=False if it returns none)."
        )
    if np.shape(loss) != ():
        raise ValueError(
            f"the objective must return a scalar loss; got shape {np.shape(loss)} "
            f"(expected {want})."
        )
    return loss, (aux, dict(metrics))


def _weight_mean(obj_metrics, batch, weight_key):
    if "weight_mean" in obj_metrics:
        return obj_metrics["weight_mean"]
    if isinstance(batch, Mapping) and weight_key in batch:
        return jnp.mean(jnp.asarray(batch[weight_key], jnp.float32))
    return jnp.ones((), jnp.float32)


def _device_batch(batch, mesh):
    if isinstance(batch, Mapping):
        batch = {k: v for k, v in batch.items() if k != "id"}
    if mesh is None:
        return batch
    sharding = NamedSharding(mesh, P("data"))
    size = mesh.shape["data"]
    multi = jax.process_count() > 1

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if np.ndim(x) == 0:
            raise ValueError(
                "every batch field needs a leading batch axis; got a scalar."
            )
        rows = np.shape(x)[0] * (jax.process_count() if multi else 1)
        if rows % size:
            raise ValueError(
                f"a batch of {rows} rows does not divide over the mesh's 'data' axis of "
                f"size {size}: use batch sizes that are multiples of it (e.g. "
                "flowjax.batches(..., drop_remainder=True))."
            )
        if multi:
            return jax.make_array_from_process_local_data(
                sharding, np.asarray(x), (rows, *np.shape(x)[1:])
            )
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _as_key(rng) -> Array:
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return jax.random.PRNGKey(int(rng))
    if isinstance(rng, jax.Array) and jax.dtypes.issubdtype(
        rng.dtype, jax.dtypes.prng_key
    ):
        return jax.random.key_data(rng)
    shape, dtype = np.shape(rng), getattr(rng, "dtype", None)
    if shape != (2,) or dtype != np.uint32:
        raise ValueError(
            "rng must be an int seed, a raw uint32[2] key or a typed jax.random.key; "
            f"got {type(rng).__name__} {dtype} {list(shape)}."
        )
    return jnp.array(rng, copy=True)


def _check_tx(tx) -> None:
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"tx must be an optax.GradientTransformation; got {type(tx).__name__}."
        )


def _check_float_params(params) -> None:
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(
                f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(x)}: "
                "only floating-point leaves can be trained. Pass nnx.state(model, "
                "nnx.Param) (not the whole state with RNG counters)."
            )


def _match_shardings(params, shardings):
    """``shardings`` (a tree prefix of ``params``) broadcast to every leaf of ``params``."""
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    try:
        return jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: s, sub),
            shardings,
            params,
            is_leaf=is_sharding,
        )
    except ValueError as e:
        raise ValueError(
            f"param_shardings must have the structure of params (or a prefix of it): {e}"
        ) from None


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}.")
