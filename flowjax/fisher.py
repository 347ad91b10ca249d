"""The diagonal Fisher information at θ₀, for EWC: per-example gradients, sharded like the pre-pass."""

from __future__ import annotations

import numbers
import weakref
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flowjax import _checks, _engine
from flowjax._engine import default_mesh
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

    Multi-host (``jax.process_count() > 1``): call it on every process with
    the same ``fn``, ``params``, ``kind``, ``rng``, ``mesh`` and
    ``param_shardings``; each process passes only ITS OWN batches (any number
    of examples, at least one; the counts may differ). Each process's rows go
    in through ``jax.make_array_from_process_local_data`` with their ids; the
    per-process step size is the largest first batch (or ``batch_size``) of
    any process, rounded up so the global step divides ``'data'``. A process
    that runs out of data feeds padding until a step has no real row on any
    process; then all stop together. Every process gets the same Fisher (the
    mean over the union of all processes' examples, equal to a one-process
    run on that union up to float32 summation order), and every process sees
    every id, so duplicate ids (also across processes) and non-finite
    gradients raise the same error on every process. An input error on one
    process (no batches, a malformed batch, an id fed twice, or the iterator
    itself raising) makes every process raise the same ``ValueError`` naming
    that process and its message, within a few steps, instead of leaving the
    others waiting in a collective. The loop is the engine of
    :func:`flowjax.per_example_losses`, with the per-example outputs
    (squared gradients) summed on the device instead of returned.

    Sampled labels: every example draws its label with its own key,
    ``fold_in(fold_in(rng, id_low32), id_high32)``, from its logits with
    ``jax.random.categorical``, so the result does not depend on batching,
    order, the number of devices, or which process holds an example.

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
        ``"id"`` array of unique example ids (multi-host: this process's own).
      kind: ``"empirical"`` or ``"sampled"``.
      rng: a ``jax.random`` key (or an integer seed: Python or numpy) for
        ``kind="sampled"``.
      mesh: a ``Mesh`` with a ``'data'`` axis; default
        :func:`flowjax.default_mesh`.
      batch_size: rows per step (default: the first batch's size).
      param_shardings: shardings for ``params`` (a ``Sharding`` or a matching
        pytree); default replicated over ``mesh``. The result has them too.
      progress: show a progress bar (on process 0).
      total: the number of examples, for the progress bar's ETA.

    Returns:
      A pytree like ``params`` of float32 arrays: F, the mean over examples.

    Raises:
      ValueError: no examples (multi-host: none on some process, raised on
        every process); an unknown ``kind``; ``rng`` missing for ``"sampled"``
        or given for ``"empirical"``; a mesh without ``'data'``; malformed
        batches (as in :func:`flowjax.per_example_losses`); processes feeding
        differently structured batches; duplicate ids, detected as they
        arrive (also across processes, and from a loader that repeats
        examples); ``fn`` returning a non-scalar loss or non-vector logits;
        non-finite gradients (naming the example ids); multi-host, any other
        process's input error (the same error on every process).
      TypeError: ``rng`` neither a ``jax.random`` key nor an integer.

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
        if not isinstance(key, jax.Array | np.ndarray) or not (
            jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            or (key.dtype == np.uint32 and key.shape == (2,))
        ):
            raise TypeError(
                "rng must be a jax.random key (jax.random.key(seed)) or an integer seed; "
                f"got {type(rng).__name__} {getattr(rng, 'dtype', '')}."
            )
    else:
        if rng is not None:
            raise ValueError(
                'rng= is only used by kind="sampled"; the empirical Fisher uses the true labels.'
            )
        key = jax.random.key(0)  # unused; keeps one step signature
    mesh = default_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; its axes are {mesh.axis_names}."
        )
    replicated = NamedSharding(mesh, P())
    params = _engine._place_params(
        params, replicated if param_shardings is None else param_shardings
    )
    acc_shardings = jax.tree.map(lambda x: x.sharding, params)
    acc = jax.jit(
        lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
        out_shardings=acc_shardings,
    )(params)
    # The key travels as raw data (a host value every process holds), re-wrapped in the step.
    impl = None
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl, key = jax.random.key_impl(key), jax.random.key_data(key)
    key = _engine._place_params(np.asarray(key), replicated)
    ids, total_squares, _ = _engine.map_examples(
        _squared_grads(fn, kind, impl),
        (params, key),
        batches,
        name="diagonal_fisher",
        sum_into=acc,
        with_ids=True,
        batch_size=batch_size,
        mesh=mesh,
        param_shardings=(acc_shardings, replicated),  # already placed: kept as they are
        progress=progress,
        total=total,
        desc="fisher",
        nonfinite=_nonfinite_gradients,
    )
    count = len(ids)
    return jax.tree.map(lambda a: a / count, total_squares)


def _nonfinite_gradients(bad: np.ndarray, ids: np.ndarray, values) -> str:
    return (
        f"fn has NaN or infinite gradients at θ₀ for example {_checks.describe(bad, ids)}. "
        "flowjax never sets them to 0: fix the loss or leave those examples out."
    )


# One per-example function per (fn, kind, key impl), so later calls with the same fn reuse
# the engine's compiled step. Weakly keyed: it dies with fn.
_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _squared_grads(fn, kind: str, impl):
    """``squares((params, key), example, id_pair)``: the example's squared gradient, a params pytree."""
    try:
        per_fn = _FNS.setdefault(fn, {})
    except TypeError:  # not weak-referenceable: build for this call only
        per_fn = {}
    if (kind, impl) not in per_fn:
        per_fn[(kind, impl)] = _make_squared_grads(_engine._ref(fn), kind, impl)
    return per_fn[(kind, impl)]


def _make_squared_grads(fn_ref, kind: str, impl):
    def squares(params_and_key, example, pair):
        params, key = params_and_key
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
            if impl is not None:
                key = jax.random.wrap_key_data(key, impl=impl)
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

        grads = jax.grad(objective)(params)
        return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)

    return squares
