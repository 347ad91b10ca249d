"""The diagonal Fisher information at θ₀, for EWC: per-example gradients, sharded like the pre-pass."""

from __future__ import annotations

import itertools
import numbers
import weakref
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from flowjax import _checks, prepass
from flowjax._types import Batches, Params

__all__ = ["diagonal_fisher"]

_KINDS = ("empirical", "sampled")


def diagonal_fisher(
    fn,
    params: Params,
    batches: Batches,
    *,
    kind: Literal["empirical", "sampled"] = "empirical",
    rng: jax.Array | int | None = None,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    param_shardings: Any = None,
    progress: bool = True,
    total: int | None = None,
) -> Params:
    """The diagonal Fisher information of the model at θ₀, averaged over a data set.

    .. math::
        F_k = \\frac{1}{n}\\sum_{i=1}^{n}
        \\Big(\\frac{\\partial \\log p_\\theta(y_i \\mid x_i)}{\\partial \\theta_k}\\Big|_{\\theta_0}\\Big)^2,
        \\qquad
        y_i = \\text{the true label (empirical)} \\;\\text{or}\\;
        y_i \\sim p_{\\theta_0}(\\cdot \\mid x_i) \\;\\text{(sampled)}

    from per-example gradients (``jax.vmap(jax.grad(...))``), for
    :func:`flowjax.ewc`. The sampled-label Fisher is an unbiased Monte-Carlo
    estimate of the true Fisher :math:`\\frac1n\\sum_i \\mathbb{E}_{y\\sim p_{\\theta_0}(\\cdot|x_i)} g_i(y)^2`;
    the empirical Fisher (true labels) is the common, cheaper-to-explain
    variant and is biased away from it when the model is wrong.

    Data-oblivious choice: EWC wants the Fisher of the PRE-TRAINING task, but
    in FLOW's setting the pre-training data is unavailable. This function
    computes the Fisher at θ₀ on the fine-tuning data, so it measures how
    sensitive the pre-trained model's predictions are on the NEW task's
    inputs, not on the old task's. Both the empirical and the sampled-label
    versions are offered; the sampled one does not use the new task's labels
    and so is the closer stand-in for the model's own predictive Fisher.

    Input and sharding follow :func:`flowjax.per_example_losses`: dict
    batches of numpy arrays with an integer ``"id"``; the first batch (or
    ``batch_size``) fixes the rows per step, rounded up to a multiple of the
    mesh's ``'data'`` axis; larger batches are split and smaller ones padded
    by repeating a real row, so the step is traced and compiled once; padding
    rows do not count. The batch is sharded over ``'data'``; the running sum
    of squared gradients has the parameters' sharding and is summed across
    devices by XLA. Per-example gradients of one step are materialised
    (rows × parameters floats): lower ``batch_size`` if memory is short.

    Sampled labels: every example draws its label with its own key,
    ``fold_in(fold_in(rng, id_low32), id_high32)``, from its logits with
    ``jax.random.categorical``, so the result does not depend on batching,
    order or the number of devices.

    Args:
      fn: for ``kind="empirical"``, ``fn(params, example) -> scalar``, the
        negative log-likelihood -log p(y_i | x_i) of ONE example with its true
        label (the example holds the label; any per-example NLL works,
        including a sequence's summed token NLL). For ``kind="sampled"``,
        ``fn(params, example) -> logits`` of shape ``[num_classes]`` for ONE
        example. ``example`` is the batch pytree without ``"id"`` and without
        the batch axis.
      params: θ₀ (any pytree of arrays, e.g. an ``nnx.State``).
      batches: an iterable of dict batches of host arrays with an integer
        ``"id"`` array of unique example ids.
      kind: ``"empirical"`` or ``"sampled"``.
      rng: a ``jax.random`` key (or an integer seed: Python or numpy) for
        ``kind="sampled"``.
      mesh: a ``Mesh`` with a ``'data'`` axis; default
        :func:`flowjax.default_mesh`.
      batch_size: rows per step (default: the first batch's size).
      param_shardings: shardings for ``params`` (a ``Sharding`` or a matching
        pytree); default replicated over ``mesh``. The result has them too.
      progress: show a progress bar.
      total: the number of examples, for the progress bar's ETA.

    Returns:
      A pytree like ``params`` of float32 arrays: F, the mean over examples.

    Raises:
      ValueError: no examples; an unknown ``kind``; ``rng`` missing for
        ``"sampled"`` or given for ``"empirical"``; a mesh without ``'data'``;
        malformed batches (as in :func:`flowjax.per_example_losses`);
        duplicate ids; ``fn`` returning a non-scalar loss or non-vector
        logits; non-finite gradients (naming the example ids).
      NotImplementedError: more than one JAX process (multi-host input is
        not supported yet; compute it on one process and broadcast).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, flowjax
      >>> def nll(w, ex):  # logistic regression, label in {0, 1}
      ...     p1 = jax.nn.sigmoid(ex["x"] @ w)
      ...     return -jnp.log(jnp.where(ex["label"] == 1, p1, 1 - p1))
      >>> batches = [{"id": np.array([0, 1]), "x": np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
      ...             "label": np.array([1, 0])}]
      >>> f = flowjax.diagonal_fisher(nll, jnp.zeros(2), batches, progress=False)
      >>> f.tolist()  # ((1 - ½)·x)² averaged over the two examples
      [0.125, 0.5]
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}.")
    if kind == "sampled":
        if rng is None:
            raise ValueError(
                'kind="sampled" draws labels from the model: pass rng= (a jax.random key).'
            )
        key = jax.random.key(int(rng)) if isinstance(rng, numbers.Integral) else rng
    else:
        if rng is not None:
            raise ValueError(
                'rng= is only used by kind="sampled"; the empirical Fisher uses the true labels.'
            )
        key = jax.random.key(0)  # unused; keeps one step signature
    if jax.process_count() > 1:
        raise NotImplementedError(
            "diagonal_fisher supports one JAX process (any number of local devices); "
            f"this run has {jax.process_count()} processes."
        )
    mesh = prepass.default_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; its axes are {mesh.axis_names}."
        )
    it = iter(batches)
    first = next((b for b in it if prepass._rows(b) != 0), None)
    if first is None:
        raise ValueError(
            "batches is empty: the Fisher is a mean over examples and there are none."
        )
    spec = prepass._Spec.from_batch(first)
    size = spec.size if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    while size % mesh.shape["data"]:
        size += 1

    replicated = NamedSharding(mesh, P())
    params = prepass._place_params(
        params, replicated if param_shardings is None else param_shardings
    )
    acc_shardings = jax.tree.map(lambda x: x.sharding, params)
    acc = jax.jit(
        lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
        out_shardings=acc_shardings,
    )(params)
    step = _make_step(fn, kind, mesh, acc_shardings)
    key = jax.device_put(key, replicated)

    bar = tqdm(
        total=total,
        unit="ex",
        unit_scale=True,
        desc="fisher",
        disable=not progress,
        dynamic_ncols=True,
    )
    seen: list[np.ndarray] = []
    flags: list[tuple[jax.Array, np.ndarray]] = []
    try:
        for item in prepass._local_steps(
            itertools.chain([first], it), spec, size, None, bar
        ):
            n = len(item.ids)
            valid = np.arange(size) < n
            pairs = np.zeros((size, 2), np.int32)
            pairs[:n] = prepass._ids_to_pairs(item.ids)
            acc, bad = step(acc, params, item.leaves, pairs, valid, key, spec.treedef)
            seen.append(item.ids)
            flags.append((bad, item.ids))
            bar.update(n)
    finally:
        bar.close()

    ids = np.sort(np.concatenate(seen))
    _checks.check_unique(ids, "ids")
    bad_ids = np.concatenate(
        [i[np.asarray(b)[: len(i)]] for b, i in flags] + [np.zeros(0, np.int64)]
    )
    if len(bad_ids):
        raise ValueError(
            f"fn has NaN or infinite gradients at θ₀ for example {_checks.describe(np.ones(len(bad_ids), bool), bad_ids)}. "
            "flowjax never sets them to 0: fix the loss or leave those examples out."
        )
    count = len(ids)
    return jax.tree.map(lambda a: a / count, acc)


# Jitted steps per fn, so later calls with the same fn reuse the compiled program (jit
# retraces by itself for new shapes). Weakly keyed: a step dies with its fn.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_step(fn, kind: str, mesh: Mesh, acc_shardings):
    """``step(acc, params, leaves, id_pairs, valid, key, treedef) -> (acc + Σ valid·g², bad)``."""
    flat, structure = jax.tree.flatten(acc_shardings)
    cache_key = (kind, mesh, structure, tuple(flat))
    try:
        per_fn = _STEPS.setdefault(fn, {})
    except TypeError:  # not weak-referenceable: compile for this call only
        per_fn = {}
    if cache_key in per_fn:
        return per_fn[cache_key]
    fn_ref = prepass._ref(fn)  # the cached step must not keep its own key alive
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def grad_one(params, example, pair, key):
        if kind == "empirical":

            def objective(p):
                loss = jnp.asarray(fn_ref()(p, example))
                if loss.shape != ():
                    raise ValueError(
                        'kind="empirical": fn must return ONE scalar (the negative log-likelihood) '
                        f"per example; it returned shape {loss.shape}."
                    )
                return loss.astype(jnp.float32)

        else:
            k = jax.random.fold_in(jax.random.fold_in(key, pair[0]), pair[1])

            def objective(p):
                logits = jnp.asarray(fn_ref()(p, example))
                if logits.ndim != 1:
                    raise ValueError(
                        'kind="sampled": fn must return the logits [num_classes] of ONE example; '
                        f"it returned shape {logits.shape}."
                    )
                logits = logits.astype(jnp.float32)
                y = jax.random.categorical(k, jax.lax.stop_gradient(logits))
                return -jax.nn.log_softmax(logits)[y]

        return jax.grad(objective)(params)

    def step(acc, params, leaves, pairs, valid, key, treedef):
        example = jax.tree.unflatten(treedef, leaves)
        grads = jax.vmap(grad_one, in_axes=(None, 0, 0, None))(
            params, example, pairs, key
        )

        def rows(x):  # valid as [B, 1, ..., 1] against a [B, ...] leaf
            return jnp.reshape(valid, valid.shape + (1,) * (x.ndim - 1))

        squares = jax.tree.map(
            lambda g: jnp.sum(
                jnp.where(rows(g), jnp.square(g.astype(jnp.float32)), 0), axis=0
            ),
            grads,
        )
        bad = jnp.zeros(valid.shape, bool)
        for g in jax.tree.leaves(grads):
            bad = bad | ~jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
        return jax.tree.map(jnp.add, acc, squares), bad & valid

    per_fn[cache_key] = jax.jit(
        step,
        static_argnames="treedef",
        donate_argnums=0,
        in_shardings=(acc_shardings, None, data, data, data, replicated),
        out_shardings=(acc_shardings, replicated),
    )
    return per_fn[cache_key]
