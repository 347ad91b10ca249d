"""PackNet (Mallya & Lazebnik, 2018): pack several tasks into one network by iterative pruning.

Per task :math:`k = 1, 2, \\dots`: train the weights free for task :math:`k`,
prune the smallest-magnitude ones among them, retrain the survivors, freeze
them; the pruned weights are free for task :math:`k+1` (Mallya & Lazebnik,
"PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning",
CVPR 2018; reference ``arunmallya/packnet``, ``src/prune.py``). Ownership is a
pytree of int32 arrays with the parameters' structure, one task id per weight
(0 = free):

.. code-block:: python

    owner = flowjax.packnet_init(params)                  # every weight: task 1
    tx = optax.chain(optax.sgd(lr), flowjax.packnet_updates(owner, task=1))
    ...train task 1...
    params, owner = flowjax.packnet_prune(params, owner, task=1, keep=0.5)
    ...retrain task 1 with the same tx masked by the new owner...
    owner = flowjax.packnet_start_task(owner, task=2)     # freed weights -> task 2
    tx2 = optax.chain(optax.sgd(lr), flowjax.packnet_updates(owner, task=2))
    ...
    eval_params = flowjax.packnet_task_params(params, owner, task=1)

Leaves that are not pruned (by default those with fewer than 2 axes: biases,
BatchNorm scales and offsets) belong to task 1 and are frozen afterwards, as
in the reference, which also keeps BatchNorm running statistics fixed after
the first task (its ``train_nobn``: BatchNorm layers in eval mode while the
rest trains): call :func:`packnet_freeze_batchnorm` on the model before task
2; every later task then normalises with task 1's statistics and leaves them
bitwise unchanged, so task 1's network is restored exactly by
:func:`packnet_task_params`. With FLOW, train each task on
:func:`flowjax.weighted_objective` as usual.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flowjax import _select
from flowjax._types import Params, PyTree, Selection

__all__ = [
    "packnet_freeze_batchnorm",
    "packnet_init",
    "packnet_prune",
    "packnet_start_task",
    "packnet_task_params",
    "packnet_updates",
]


def _check_task(task) -> int:
    if isinstance(task, bool) or not isinstance(task, numbers.Integral) or task < 1:
        raise ValueError(f"task must be an integer >= 1; got {task!r}.")
    return int(task)


def _prunable(params, select) -> list[bool]:
    if select is None:
        return [np.ndim(x) >= 2 for x in jax.tree.leaves(params)]
    return _select.mask_leaves(select, params, what="prunable")


def packnet_init(params: Params, *, prunable: Selection = None) -> PyTree:
    """The ownership pytree before task 1: every weight owned by task 1.

    Args:
      params: the parameters (a pytree of arrays or an ``nnx.State``).
      prunable: which leaves :func:`packnet_prune` may prune (an NNX filter
        or a bool mask pytree, as for :func:`flowjax.train_only`); ``None``
        (default): every leaf with at least 2 axes (kernels, not biases or
        normalisation scales).

    Returns:
      int32 arrays of ones with ``params``' structure and shapes.

    Raises:
      TypeError: ``prunable`` is not a selection (or a type filter on a
        plain pytree of arrays).
      ValueError: a mask ``prunable`` does not match ``params``' structure.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> flowjax.packnet_init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})["b"]
      Array([1, 1], dtype=int32)
    """
    _prunable(params, prunable)  # validates the selection
    return jax.tree.map(lambda x: jnp.ones(np.shape(x), jnp.int32), params)


def packnet_prune(
    params: Params,
    owner: PyTree,
    task: int,
    keep: float,
    *,
    prunable: Selection = None,
) -> tuple[Params, PyTree]:
    """Prunes task ``task``'s smallest-magnitude weights in each prunable leaf.

    In every prunable leaf, among the :math:`n` weights with
    :math:`\\text{owner} = k`, the :math:`\\operatorname{round}(\\text{keep}
    \\cdot n)` of largest :math:`|w|` stay owned by :math:`k`; the others are
    set to 0 and freed (:math:`\\text{owner} = 0`). Ties in :math:`|w|` are
    broken by position (a stable sort), so exactly that many survive. The
    reference prunes each layer separately by the same rule (its cutoff is the
    magnitude of rank :math:`(1-\\text{keep})\\,n`).

    Args:
      params: the parameters after training task ``task``.
      owner: the ownership pytree (from :func:`packnet_init` /
        :func:`packnet_start_task`).
      task: :math:`k \\ge 1`.
      keep: the fraction of task :math:`k`'s weights to keep, in
        :math:`(0, 1]`.
      prunable: as for :func:`packnet_init` (use the same selection).

    Returns:
      ``(params, owner)`` with the pruned weights zeroed and freed.

    Raises:
      ValueError: ``task`` is not an integer >= 1, ``keep`` not in (0, 1], or
        ``owner``'s structure or shapes differ from ``params``' (the leaf is named).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> params = {"w": jnp.array([[0.1, -3.0], [2.0, 0.5]])}
      >>> owner = flowjax.packnet_init(params)
      >>> params, owner = flowjax.packnet_prune(params, owner, task=1, keep=0.5)
      >>> params["w"], owner["w"]
      (Array([[ 0., -3.],
             [ 2.,  0.]], dtype=float32), Array([[0, 1],
             [1, 0]], dtype=int32))
    """
    task = _check_task(task)
    if (
        isinstance(keep, bool)
        or not isinstance(keep, numbers.Real)
        or not (0.0 < keep <= 1.0)
    ):
        raise ValueError(f"keep must be a number in (0, 1]; got {keep!r}.")
    _check_owner(params, owner)
    flags = _prunable(params, prunable)
    p_flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    o_flat = jax.tree.leaves(owner)
    new_p, new_o = [], []
    for (_path, w), o, flag in zip(p_flat, o_flat, flags, strict=True):
        if not flag:
            new_p.append(w)
            new_o.append(o)
            continue
        w_np, o_np = np.asarray(w), np.asarray(o)
        mine = np.flatnonzero(o_np.ravel() == task)
        n_keep = round(keep * mine.size) if mine.size else 0
        order = np.argsort(
            -np.abs(w_np.ravel()[mine].astype(np.float64)), kind="stable"
        )
        drop = mine[order[n_keep:]]
        o_new = o_np.ravel().copy()
        o_new[drop] = 0
        zero = np.zeros(w_np.size, bool)
        zero[drop] = True
        new_p.append(jnp.where(zero.reshape(w_np.shape), jnp.zeros((), w.dtype), w))
        new_o.append(jnp.asarray(o_new.reshape(o_np.shape), jnp.int32))
    return (
        jax.tree_util.tree_unflatten(treedef, new_p),
        jax.tree.unflatten(jax.tree.structure(owner), new_o),
    )


def _check_owner(params, owner) -> None:
    p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
    o_flat = jax.tree_util.tree_flatten_with_path(owner)[0]
    if [k for k, _ in p_flat] != [k for k, _ in o_flat]:
        raise ValueError(
            "owner does not have params' structure; build it with flowjax.packnet_init(params)."
        )
    for (k, p), (_, o) in zip(p_flat, o_flat, strict=True):
        if np.shape(p) != np.shape(o):
            raise ValueError(
                f"owner{jax.tree_util.keystr(k)} has shape {np.shape(o)}, the parameter "
                f"{np.shape(p)}."
            )


def packnet_start_task(owner: PyTree, task: int) -> PyTree:
    """Gives every free weight (owner 0) to task ``task``.

    Args:
      owner: the ownership pytree after pruning task ``task - 1``.
      task: :math:`k \\ge 2`.

    Returns:
      ``owner`` with 0 replaced by ``task``.

    Raises:
      ValueError: ``task`` is not an integer >= 1.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> flowjax.packnet_start_task({"w": jnp.array([0, 1, 0])}, 2)["w"]
      Array([2, 1, 2], dtype=int32)
    """
    task = _check_task(task)
    return jax.tree.map(lambda o: jnp.where(o == 0, task, o).astype(jnp.int32), owner)


def packnet_updates(owner: PyTree, task: int) -> optax.GradientTransformation:
    """An optax transform zeroing the updates of every weight not owned by ``task``.

    .. math:: u_i \\leftarrow u_i \\cdot \\mathbb{1}[\\text{owner}_i = k]

    Put it **last** in the chain (``optax.chain(tx, packnet_updates(owner,
    k))``) so that nothing after it (weight decay, momentum) moves a frozen
    weight: earlier tasks' weights then stay bitwise unchanged. Free weights
    (owner 0, pruned and not yet given to a task) are not updated either.

    Args:
      owner: the ownership pytree, with the structure of the updates.
      task: the task being trained, :math:`k \\ge 1`.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      ValueError: ``task`` is invalid; at ``update``, ``owner`` does not
        match the updates' structure or shapes.

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> owner = {"w": jnp.array([1, 2, 2])}
      >>> tx = flowjax.packnet_updates(owner, task=2)
      >>> tx.update({"w": jnp.ones(3)}, tx.init(None))[0]["w"]
      Array([0., 1., 1.], dtype=float32)
    """
    task = _check_task(task)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        _check_owner(updates, owner)
        out = jax.tree.map(
            lambda u, o: jnp.where(o == task, u, jnp.zeros((), u.dtype)), updates, owner
        )
        return out, state

    return optax.GradientTransformation(init, update)


def packnet_task_params(params: Params, owner: PyTree, task: int) -> Params:
    """The network task ``task`` is evaluated with: weights owned by later tasks set to 0.

    .. math:: \\theta^{(k)}_i = \\theta_i \\cdot \\mathbb{1}[\\text{owner}_i \\le k]

    (free weights, owner 0, are zero already after pruning and stay zero).

    Args:
      params: the packed parameters.
      owner: the ownership pytree.
      task: :math:`k \\ge 1`.

    Returns:
      ``params`` with the weights of tasks :math:`> k` zeroed.

    Raises:
      ValueError: ``task`` is invalid or ``owner`` does not match ``params``.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> flowjax.packnet_task_params({"w": jnp.ones(3)}, {"w": jnp.array([1, 2, 3])}, 2)["w"]
      Array([1., 1., 0.], dtype=float32)
    """
    task = _check_task(task)
    _check_owner(params, owner)
    return jax.tree.map(
        lambda w, o: jnp.where(o <= task, w, jnp.zeros((), w.dtype)), params, owner
    )


def packnet_freeze_batchnorm(model: nnx.Module) -> nnx.Module:
    """Freezes every BatchNorm layer's statistics for the tasks after the first (in place).

    .. math:: \\hat h = \\gamma \\frac{h - \\mu_1}{\\sqrt{\\sigma_1^2 + \\epsilon}} + \\beta
        \\quad\\text{for every task } k \\ge 2

    with :math:`\\mu_1, \\sigma_1^2` the running statistics at the end of
    task 1: each ``nnx.BatchNorm`` gets ``use_running_average=True``, so it
    normalises with its running statistics and no longer updates them, in
    train mode too (the reference's ``train_nobn``, Mallya & Lazebnik's
    section 3). Its scale :math:`\\gamma` and offset :math:`\\beta` have one
    axis, so :func:`packnet_init` gives them to task 1 and
    :func:`packnet_updates` keeps them frozen. Call it after task 1 (its
    pruning and retraining), before the step of task 2 is built (the flag is
    part of the graph definition ``nnx.split`` returns); afterwards do not
    call ``model.train()``, which would unfreeze them.

    Args:
      model: an NNX module containing at least one ``nnx.BatchNorm``.

    Returns:
      ``model`` itself, its BatchNorm layers frozen.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``.
      ValueError: ``model`` has no ``nnx.BatchNorm`` layer.

    Example:
      >>> import flowjax
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> flowjax.packnet_freeze_batchnorm(model).layers[1].use_running_average
      True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}.")
    if not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(model)):
        raise ValueError(
            "model has no nnx.BatchNorm layer: packnet_freeze_batchnorm freezes BatchNorm "
            "statistics and has nothing to do here."
        )
    model.set_attributes(nnx.BatchNorm, use_running_average=True)
    return model
