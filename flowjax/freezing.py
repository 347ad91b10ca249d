"""Frozen parts (linear probing, LP-FT, head-only rounds) and swapping task parts back.

Freezing is an optax transformation, not a change to the training loop: name
the trainable part with an NNX filter (``nnx.PathContains("head")``,
``nnx.LoRAParam``, ``nnx.All`` / ``nnx.Not``), wrap the optimiser with
:func:`train_only`, and the other parameters get zero updates while the
optimiser keeps no state for them. The polarity is the name's: True /
matching = trained (``optax.freeze`` and ``optax.selective_transform`` take
True = frozen). In NNX, BatchNorm running statistics are ``nnx.BatchStat``,
not ``nnx.Param``: they are never given to the optimiser, so they keep
updating in train mode while the BatchNorm scale and bias stay frozen, as in
the official vision pipeline (FLOW_PAPER.md §2.1, steps V1 and V4).

:func:`swap_task_parts` puts the pre-trained task-specific parts (head,
BatchNorm) back into a fine-tuned state to measure retained pre-training
accuracy, as the paper does.

A jitted linear-probing step with FLOW weights on a BatchNorm model
(``nnx.split`` / ``nnx.merge`` with ``jax.jit``; the batched objective sees
the whole batch, so the running statistics update)::

    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = flowjax.train_only(optax.sgd(lr, momentum=0.9), nnx.PathContains("head"))

    def batch_loss(params, batch, stats):
        # copy=True: the BatchStat variables are mutated inside the grad trace.
        model = nnx.merge(graphdef, params, stats, copy=True)
        losses = per_example_loss(model(batch["x"]), batch["y"])  # train mode
        return losses, nnx.state(model, nnx.BatchStat)

    objective = flowjax.weighted_objective(batch_loss, batched=True, has_aux=True)

    @jax.jit
    def step(params, stats, opt_state, batch):
        (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(
            params, batch, stats
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from flowjax import _select
from flowjax._types import Filter, Params, PyTree, Selection

__all__ = ["swap_task_parts", "train_only", "trainable_mask"]

_STATE_HINT = "pass nnx.state(model, nnx.Param) (or the state you give the optimiser)."


def trainable_mask(params: Params, select: Filter) -> PyTree:
    """A boolean mask over ``params``: True where the NNX filter ``select`` matches.

    .. math::
        m_\\ell = \\mathbb{1}[\\text{select}(\\text{path}_\\ell, v_\\ell)]

    for every leaf :math:`\\ell` (an ``nnx.Variable`` in an ``nnx.State``, or an
    array in a plain pytree), with ``select`` turned into a predicate by
    ``flax.nnx.filterlib.to_predicate``, exactly as in ``nnx.split``. Every
    flowjax function that selects parameters takes the filter itself; build
    the mask when you want to inspect it, or to hand it to plain optax
    (``optax.masked``, ``optax.freeze`` after negation). The mask has the
    structure of ``params`` down to the Variables, with a ``bool`` in place of
    each Variable (a tree prefix of ``params``, which optax accepts).

    Recipes (``graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)``):

    * linear probing (V1), head-only round 2 (V4):
      ``train_only(tx, nnx.PathContains("head"))``; train in train mode so
      ``stats`` (BatchNorm running statistics) keep updating;
    * LP-FT: phase 1 as linear probing; phase 2 plain ``tx`` over all ``params``,
      starting from the phase-1 parameters (so from the LP head);
    * LoRA: ``train_only(tx, nnx.LoRAParam)``;
    * all but BatchNorm: ``bn = [p for p, m in nnx.iter_modules(model) if
      isinstance(m, nnx.BatchNorm)]`` then ``lambda p, v: not any(p[: len(b)] ==
      b for b in bn)``.

    Args:
      params: the parameters the optimiser sees: an ``nnx.State`` (e.g.
        ``nnx.state(model, nnx.Param)``; path and type filters work) or any
        pytree of arrays (path filters only).
      select: an NNX filter: ``nnx.PathContains("head")``, a Variable type
        (``nnx.LoRAParam``), ``nnx.All`` / ``nnx.Any`` / ``nnx.Not``, a predicate
        ``(path, leaf) -> bool``, or a list/tuple of filters (any matches). A
        string is an NNX tag, as in NNX.

    Returns:
      A pytree of Python bools, a prefix of ``params``. True = selected.

    Raises:
      TypeError: ``params`` is an nnx.Module, ``select`` is not an NNX filter
        (a tuple such as ``("layers", 0)`` is not a path prefix in NNX; the
        message shows the predicate to write), a module type such as
        ``nnx.BatchNorm`` (it cannot match state leaves; the message shows how
        to select its paths), or a type or tag filter on a plain pytree of
        arrays, which has no Variable types.
      ValueError: ``select`` matches no leaf (a typo would otherwise freeze
        everything silently).

    Example:
      >>> import flowjax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.body = nnx.Linear(4, 8, rngs=rngs)
      ...         self.head = nnx.Linear(8, 2, rngs=rngs)
      >>> params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
      >>> mask = flowjax.trainable_mask(params, nnx.PathContains("head"))
      >>> mask["head"]["kernel"], mask["body"]["kernel"]
      (True, False)
    """
    _select.check_not_module(params, "params", _STATE_HINT)
    if not _select.is_filter(select) or _select.is_mask_fn(select):
        raise TypeError(
            f"select must be an NNX filter; got {type(select).__name__} (a mask pytree "
            "already is a mask)."
        )
    keep, flat, treedef = _select.filter_units(select, params, what="select")
    if not any(keep):
        shown = [path for path, _ in flat[:5]]
        tag = (
            f" A string is an NNX tag; for a path key write nnx.PathContains({select!r})."
            if isinstance(select, str)
            else ""
        )
        raise ValueError(
            f"select={select!r} matches no leaf of params; paths look like {shown}.{tag}"
        )
    return jax.tree.unflatten(treedef, keep)


def train_only(
    tx: optax.GradientTransformation, trainable: Selection
) -> optax.GradientTransformationExtraArgs:
    """Applies ``tx`` to the ``trainable`` parameters; every other one gets a zero update.

    .. math::
        u_\\ell = \\begin{cases} \\text{tx}(g)_\\ell & \\ell \\in \\text{trainable} \\\\
        0 & \\text{otherwise} \\end{cases}

    ``optax.selective_transform(tx, freeze_mask=...)`` with the mask the other
    way round: ``optax.freeze`` and ``optax.selective_transform`` take **True
    = frozen**; here **True / matching = trained**, and the name says so. It
    is one ``optax.partition`` of ``tx`` and ``optax.set_to_zero()``: ``tx``
    sees only the trainable leaves (``optax.masked``), so its state (momentum,
    Adam moments) is allocated for them alone and nothing inside ``tx``
    (weight decay, momentum) can move a frozen leaf; ``optax.apply_updates``
    then adds an exact zero to each frozen leaf. Under ``jax.jit`` the frozen
    leaves' gradients are unused, so XLA does not compute them. With
    everything trainable this is ``tx`` exactly.

    Args:
      tx: the optimiser for the trainable parameters.
      trainable: an NNX filter, unchanged (``nnx.PathContains("head")``,
        ``nnx.LoRAParam``, ``nnx.All(...)``, ``nnx.Not(...)``, a predicate
        ``(path, leaf) -> bool``, ``...``), evaluated on the params given to
        ``init`` / ``update`` (type filters need an ``nnx.State``); or a
        boolean mask pytree with the structure of the params or a prefix of it
        (a plain dict prefix such as ``{"body": False, "head": True}`` also
        works on an ``nnx.State``), or a function ``params ->`` such a mask.
        True = trained.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      TypeError: ``tx`` is not a GradientTransformation, ``trainable`` is
        None (ambiguous: ``...`` trains everything, ``False`` nothing) or not a
        selection, a mask leaf is not a bool, or (at ``init``) a type filter
        meets a plain pytree of arrays.
      ValueError: at ``init``, the mask's structure does not match the params
        (the message names the path).

    Example:
      >>> import jax, jax.numpy as jnp, optax, flowjax
      >>> from flax import nnx
      >>> params = {"body": jnp.ones(3), "head": jnp.ones(2)}
      >>> tx = flowjax.train_only(optax.sgd(0.1, momentum=0.9), nnx.PathContains("head"))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)
      {'body': Array([1., 1., 1.], dtype=float32), 'head': Array([0.9, 0.9], dtype=float32)}
      >>> [x.shape for x in jax.tree.leaves(state)]  # momentum for the head only
      [(2,)]
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"tx must be an optax.GradientTransformation; got {type(tx).__name__}."
        )
    if trainable is None:
        raise TypeError(
            "trainable=None is ambiguous (NNX reads None as 'nothing', optax masks as "
            "'no mask'): pass ... to train everything or False to train nothing."
        )
    _select.check_selection(trainable, "trainable")
    return optax.partition(
        {True: tx, False: optax.set_to_zero()},
        lambda params: _select.mask_tree(trainable, params, what="trainable"),
    )


def _describe(leaf) -> str:
    value = _select.value_of(leaf)
    return f"{type(leaf).__name__} {np.shape(value)} {getattr(value, 'dtype', type(value).__name__)}"


def swap_task_parts(
    finetuned: PyTree, pretrained: PyTree, task_specific: Selection
) -> PyTree:
    """The fine-tuned state with its task-specific parts replaced by the pre-trained ones.

    .. math::
        \\theta^{\\text{swap}}_\\ell = \\begin{cases} \\theta^{\\text{pre}}_\\ell &
        \\ell \\text{ task-specific} \\\\ \\theta^{\\text{ft}}_\\ell & \\text{otherwise}
        \\end{cases}

    This is how the paper measures retained pre-training accuracy: "we replace
    the task-specific components of the fine-tuned model with their pre-trained
    counterparts" (the head, and every BatchNorm's scale, bias and running
    statistics; FLOW_PAPER.md §2.1). The result has the *pre-trained*
    structure, so the heads may differ in shape (new classes vs old); rebuild
    the model with the pre-trained graphdef: ``nnx.merge(pre_graphdef, swapped)``.
    The result's Variables are new objects sharing the (immutable) arrays.

    Args:
      finetuned: the fine-tuned state, e.g. ``nnx.state(finetuned_model)`` (all
        variables, including ``nnx.BatchStat``), or any pytree of arrays.
      pretrained: the pre-trained state, same kind.
      task_specific: **True / matching = taken from the pre-trained model**.
        An NNX filter on ``(path, leaf)``: ``nnx.PathContains("head")``, a type
        (``nnx.BatchStat``), ``nnx.Any(...)``, a predicate (BatchNorm layers:
        ``paths = [p for p, m in nnx.iter_modules(model) if isinstance(m,
        nnx.BatchNorm)]``, then ``lambda path, _: any(path[: len(b)] == b for b
        in paths)``). Or a mask of bools with the pre-trained structure (or a
        prefix of it; a plain dict works on an ``nnx.State``), with the same
        rules as :func:`train_only`.

    Returns:
      A pytree with ``pretrained``'s structure: pre-trained leaves where
      task-specific, fine-tuned leaves elsewhere.

    Raises:
      TypeError: an argument is an nnx.Module rather than a state; a mask
        leaf that is not a bool; a type filter on plain pytrees of arrays.
      ValueError: ``task_specific`` selects nothing; a shared (not
        task-specific) leaf is missing from ``finetuned``, or differs in shape,
        dtype or variable type; or ``finetuned`` has extra shared leaves (e.g.
        unmerged ``nnx.LoRAParam``: call :func:`merge_lora` first).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> pre = {"body": jnp.zeros(2), "head": jnp.zeros((2, 10))}
      >>> ft = {"body": jnp.ones(2), "head": jnp.ones((2, 5))}  # new task: 5 classes
      >>> out = flowjax.swap_task_parts(ft, pre, nnx.PathContains("head"))
      >>> out["body"], out["head"].shape
      (Array([1., 1.], dtype=float32), (2, 10))
    """
    hint = "pass nnx.state(model) for each model."
    _select.check_not_module(finetuned, "finetuned", hint)
    _select.check_not_module(pretrained, "pretrained", hint)
    pre_flat, treedef = _select.leaves_with_paths(pretrained)
    ft_flat, _ = _select.leaves_with_paths(finetuned)
    ft = dict(ft_flat)

    if _select.is_filter(task_specific):
        is_task, _, _ = _select.filter_units(
            task_specific, pretrained, what="task_specific"
        )
        pred = _select.predicate(task_specific)
        ft_pred = pred
    else:
        per_array = _select.mask_leaves(task_specific, pretrained, what="task_specific")
        is_task, i = [], 0
        for path, leaf in pre_flat:
            n = len(jax.tree.leaves(leaf))
            part = per_array[i : i + n]
            i += n
            if len(set(part)) > 1:
                raise ValueError(
                    f"task_specific selects only part of the variable at {path}."
                )
            is_task.append(bool(part) and part[0])
        ft_pred = None
    if not any(is_task):
        raise ValueError(
            f"task_specific={task_specific!r} selects no leaf of the pre-trained state."
        )

    out = []
    for (path, pre_leaf), task in zip(pre_flat, is_task, strict=True):
        if task:
            out.append(pre_leaf)
            continue
        if path not in ft:
            raise ValueError(
                f"{path} is not task-specific but is missing from the fine-tuned state; "
                "mark it task-specific or check that both states come from the same model."
            )
        ft_leaf = ft[path]
        a, b = _select.value_of(ft_leaf), _select.value_of(pre_leaf)
        if (
            type(ft_leaf) is not type(pre_leaf)
            or np.shape(a) != np.shape(b)
            or getattr(a, "dtype", None) != getattr(b, "dtype", None)
        ):
            raise ValueError(
                f"{path} is not task-specific but differs between the states: fine-tuned "
                f"{_describe(ft_leaf)} vs pre-trained {_describe(pre_leaf)}. Mark it "
                "task-specific if it belongs to the task."
            )
        out.append(ft_leaf)
    pre_paths = {p for p, _ in pre_flat}
    extra = [
        p
        for p, leaf in ft_flat
        if p not in pre_paths and not (ft_pred is not None and ft_pred(p, leaf))
    ]
    if extra:
        raise ValueError(
            f"the fine-tuned state has leaves the pre-trained one lacks: {extra[:5]}. If they "
            "are LoRA factors, merge them first (flowjax.merge_lora); if they belong to "
            "the task, mark them task-specific."
        )
    # Fresh Variable objects (sharing arrays), so the result aliases neither input.
    return jax.tree.map(lambda x: x, jax.tree_util.tree_unflatten(treedef, out))
