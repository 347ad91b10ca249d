"""The diagonal Fisher information at θ₀, for EWC: per-example gradients, sharded like the pre-pass."""

from __future__ import annotations

import collections
import itertools
import numbers
import weakref
import zlib
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
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
    process (a malformed batch, or the iterator itself raising) raises there
    and stops the others with a ``RuntimeError`` instead of leaving them
    waiting in a collective.

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
        differently structured batches; duplicate ids (also across
        processes); ``fn`` returning a non-scalar loss or non-vector logits;
        non-finite gradients (naming the example ids).
      TypeError: ``rng`` neither a ``jax.random`` key nor an integer.
      RuntimeError: multi-host only, on the other processes when one process
        fails on its own input (that process raises its own error).

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
    mesh = prepass.default_mesh() if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"the mesh needs a 'data' axis to shard the batch over; its axes are {mesh.axis_names}."
        )
    nproc, me = jax.process_count(), jax.process_index()
    it = iter(batches)
    first, spec, size = _agree(it, batch_size, mesh.shape["data"], nproc)

    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    params = prepass._place_params(
        params, replicated if param_shardings is None else param_shardings
    )
    acc_shardings = jax.tree.map(lambda x: x.sharding, params)
    acc = jax.jit(
        lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
        out_shardings=acc_shardings,
    )(params)
    step = _make_step(fn, kind, mesh, acc_shardings)
    # The key travels as raw data (a host value every process holds), re-wrapped in the step.
    impl = None
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl, key = jax.random.key_impl(key), jax.random.key_data(key)
    key = prepass._place_params(np.asarray(key), replicated)

    bar = tqdm(
        total=total,
        unit="ex",
        unit_scale=True,
        desc="fisher",
        disable=not progress or me != 0,
        dynamic_ncols=True,
    )
    seen: list[np.ndarray] = []
    bad_ids: list[np.ndarray] = []
    failed: Exception | None = None  # multi-process: this process's own input error

    def read(bad, meta) -> int:
        """Reads one finished step (the same on every process); returns its real rows."""
        bad, meta = np.asarray(bad), np.asarray(meta)
        broken = meta[:, 3] == _FAILED
        if broken.any():
            if failed is not None:
                raise failed
            who = np.unique(meta[broken, 2]).tolist()
            raise RuntimeError(
                f"diagonal_fisher stopped on every process: process(es) {who} failed while "
                "reading their batches (their own error says why)."
            )
        real = meta[:, 3] == _REAL
        ids = prepass._ids_from_pairs(meta[real, :2])
        seen.append(ids)
        bad_ids.append(ids[bad[real]])
        bar.update(len(ids))
        return len(ids)

    steps = prepass._local_steps(itertools.chain([first], it), spec, size, None, bar)
    in_flight: collections.deque = collections.deque()  # dispatched, not yet read
    try:
        while True:
            item, state = None, _REAL
            if failed is None:
                try:
                    item = next(steps, None)
                except Exception as e:
                    if nproc == 1:
                        raise
                    failed, state = e, _FAILED  # tell the others through the next step
            elif nproc > 1:
                state = _FAILED
            if item is None:
                if nproc == 1:
                    break
                # Out of data (or failed): keep in step with the processes that still have data.
                item = prepass._padding_step(spec, size)
            meta = _meta(item.ids, size, me, state)
            if nproc == 1:
                # numpy straight into jit: its C++ path places the batch fastest
                leaves = item.leaves
            else:
                leaves = [_global(x, size, data_sharding) for x in item.leaves]
                meta = _global(meta, size, data_sharding)
            acc, bad, meta = step(acc, params, leaves, meta, key, spec.treedef, impl)
            in_flight.append((bad, meta))
            # Once a step is all padding everywhere, every later one is too: stop together.
            if len(in_flight) > _IN_FLIGHT and read(*in_flight.popleft()) == 0:
                break
        while nproc == 1 and in_flight:
            read(*in_flight.popleft())
    finally:
        bar.close()

    # Every process read the same steps, so every process checks the same ids and raises alike.
    ids = np.sort(np.concatenate([np.zeros(0, np.int64), *seen]))
    _checks.check_unique(ids, "ids")
    bad = np.concatenate([np.zeros(0, np.int64), *bad_ids])
    if len(bad):
        raise ValueError(
            f"fn has NaN or infinite gradients at θ₀ for example {_checks.describe(np.ones(len(bad), bool), bad)}. "
            "flowjax never sets them to 0: fix the loss or leave those examples out."
        )
    count = len(ids)
    return jax.tree.map(lambda a: a / count, acc)


_REAL, _PADDING, _FAILED = 1, 0, 2  # a row's state (meta column 3)
# Steps dispatched ahead of the one being read, so the device never waits for the host.
_IN_FLIGHT = 3


def _agree(it, batch_size, data_size: int, nproc: int):
    """The first non-empty batch, its spec and the per-process rows per step, agreed by all processes.

    Multi-process: one ``process_allgather`` of (status, rows, structure checksum), so
    that an empty or malformed input on one process raises on every process (none
    waits forever in a collective).
    """
    first = spec = error = None
    size = 0
    try:
        first = next((b for b in it if prepass._rows(b) != 0), None)
        if first is not None:
            spec = prepass._Spec.from_batch(first)
            size = spec.size if batch_size is None else int(batch_size)
            if size < 1:
                raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    except Exception as e:
        if nproc == 1:
            raise
        error = e
    if nproc == 1:
        if first is None:
            raise ValueError(
                "batches is empty: the Fisher is a mean over examples and there are none."
            )
    else:
        status = 2 if error is not None else 0 if first is None else 1
        crc = 0 if spec is None else zlib.crc32(spec.describe().encode()) & 0x7FFFFFFF
        agreed = np.asarray(
            multihost_utils.process_allgather(np.array([status, size, crc], np.int32))
        ).reshape(nproc, 3)
        if error is not None:
            raise error
        broken = np.flatnonzero(agreed[:, 0] == 2).tolist()
        if broken:
            raise RuntimeError(
                f"diagonal_fisher stopped on every process: process(es) {broken} failed on "
                "their first batch (their own error says why)."
            )
        empty = np.flatnonzero(agreed[:, 0] == 0).tolist()
        if len(empty) == nproc:
            raise ValueError(
                "batches is empty on every process: the Fisher is a mean over examples and there are none."
            )
        if empty:
            raise ValueError(
                f"batches is empty on process(es) {empty}: every process needs at least one "
                "example (the counts may differ)."
            )
        if len(set(agreed[:, 2].tolist())) != 1:
            raise ValueError(
                "processes feed batches of different structure, shapes or dtypes; they must agree."
            )
        size = int(agreed[:, 1].max())
    while (size * nproc) % data_size:
        size += 1
    return first, spec, size


def _meta(ids: np.ndarray, size: int, me: int, state: int) -> np.ndarray:
    """Per row: id low and high int32 halves, owning process, state (real rows first)."""
    meta = np.zeros((size, 4), np.int32)
    meta[: len(ids), :2] = prepass._ids_to_pairs(ids)
    meta[:, 2] = me
    meta[: len(ids), 3] = state
    if state == _FAILED:
        meta[:, 3] = _FAILED
    return meta


def _global(x: np.ndarray, size: int, sharding: NamedSharding) -> jax.Array:
    """Multi-process: this process's rows of the global batch."""
    return jax.make_array_from_process_local_data(
        sharding, x, (size * jax.process_count(), *x.shape[1:])
    )


# Jitted steps per fn, so later calls with the same fn reuse the compiled program (jit
# retraces by itself for new shapes). Weakly keyed: a step dies with its fn.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_step(fn, kind: str, mesh: Mesh, acc_shardings):
    """``step(acc, params, leaves, meta, key_data, treedef, impl) -> (acc + Σ_real g², bad, meta)``.

    ``meta`` is :func:`_meta`'s per-row (id low, id high, process, state), sharded
    like the batch; ``bad`` (rows with non-finite gradients) and ``meta`` come back
    replicated, so every process learns every row's id and state.
    """
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

    def step(acc, params, leaves, meta, key, treedef, impl):
        example = jax.tree.unflatten(treedef, leaves)
        if impl is not None:
            key = jax.random.wrap_key_data(key, impl=impl)
        pairs, valid = meta[:, :2], meta[:, 3] == _REAL
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
        return jax.tree.map(jnp.add, acc, squares), bad & valid, meta

    per_fn[cache_key] = jax.jit(
        step,
        static_argnames=("treedef", "impl"),
        donate_argnums=0,
        in_shardings=(acc_shardings, None, data, data, replicated),
        out_shardings=(acc_shardings, replicated, replicated),
    )
    return per_fn[cache_key]
