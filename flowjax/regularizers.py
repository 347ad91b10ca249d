"""Forgetting regularisers that act on gradients: L2-SP, EWC and Synaptic Intelligence.

Each is an optax ``GradientTransformation`` that adds the gradient of a
quadratic pull toward an anchor θ₀ (the pre-trained parameters) to the
incoming updates. Put it FIRST in an ``optax.chain``, before the optimiser, so
that it sees the raw gradient of the task loss and the optimiser sees the
regularised gradient::

    tx = optax.chain(flowjax.l2sp(None, 1e-2), optax.adam(1e-3))

Design, shared by all three:

* The anchor (and EWC's Fisher, SI's accumulators) live in the transform's
  NamedTuple state. Inside a jitted train step they are therefore ARGUMENTS,
  placed and sharded like the parameters. In JAX 0.10 an array closed over by
  a jitted function is embedded in the program as an HLO constant (a second
  copy of the model in the executable, no sharding), which is why the anchor
  is not kept in a closure.
* ``init`` stores fresh copies, never the caller's buffers: a train step that
  donates both ``params`` and ``opt_state`` (``donate_argnums``) would
  otherwise donate the same buffer twice, which XLA rejects. Donate the
  optimiser state: a donated, unchanged anchor is aliased from input to output
  (the same device buffer every step); without donation ``jax.jit`` writes a
  fresh copy of every unchanged state array on each call.
* ``init`` accepts abstract parameters (``jax.eval_shape(tx.init, params)``),
  so the state can be planned and sharded before memory is allocated.
* ``mask``: **True means regularised**; False leaves are passed through untouched and hold ``optax.MaskedNode()``
  in the state, no memory). A pytree of bools with the structure of, or a
  prefix of, the parameters, or a callable ``params -> mask``, as in
  ``optax.masked`` (the same mask rules as :func:`flowjax.freeze` and
  :func:`flowjax.wise_ft`). An anchor/Fisher leaf is shape-checked only where
  selected, so θ₀ may hold an old head of another shape if it is masked out.
* They compose with ``flowjax.freeze``, ``optax.masked`` and
  ``optax.partition``: leaves hidden by those (``optax.MaskedNode``) are
  never regularised, and ``scale="num_params"`` counts only the leaves the
  regulariser sees (the trainable ones).
* Only floating-point leaves can be regularised; a selected integer or
  PRNG-key leaf (a full ``nnx.state(model)`` with RNG streams) is a
  TypeError naming it: pass ``nnx.state(model, nnx.Param)`` or mask it out.
* Updates keep their dtype: the added term is computed in at least float32
  and the sum is rounded once to the update's dtype (bfloat16 stays bfloat16).
* ``strength == 0`` returns the incoming updates unchanged (the same arrays).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowjax import _checks, _select
from flowjax._types import Array, Params

__all__ = [
    "EWCState",
    "L2SPState",
    "SIState",
    "ewc",
    "ewc_penalty",
    "l2sp",
    "l2sp_penalty",
    "si_consolidate",
    "synaptic_intelligence",
]

Mask = (
    Any  # a pytree of bools (or a prefix of the params tree) or params -> such a pytree
)
_SCALES = ("none", "num_params")


class L2SPState(NamedTuple):
    """State of :func:`l2sp`: the anchor θ₀ (``optax.MaskedNode`` where masked out)."""

    anchor: Params


class EWCState(NamedTuple):
    """State of :func:`ewc`: the anchor θ₀ and the diagonal Fisher F."""

    anchor: Params
    fisher: Params


class SIState(NamedTuple):
    """State of :func:`synaptic_intelligence` (``optax.MaskedNode`` where masked out).

    Attributes:
      anchor: θ₀, the parameters the penalty pulls toward (moved to the
        current parameters by :func:`si_consolidate`).
      prev_params: θ_{t-1}, the parameters seen at the previous update.
      prev_grads: g_{t-1}, the incoming gradient at the previous update.
      omega: the path integral ω = Σ_t -g_{t-1} (θ_t - θ_{t-1}) since the
        last consolidation (float32, or float64 for float64 parameters).
      importance: Ω consolidated at task boundaries (dtype as ``omega``;
        zeros until :func:`si_consolidate` is called).
      damping: ξ (a float32 scalar).
    """

    anchor: Params
    prev_params: Params
    prev_grads: Params
    omega: Params
    importance: Params
    damping: Array


# ----------------------------------------------------------------------------- L2-SP


def l2sp(
    anchor_params: Params | None,
    strength: float,
    *,
    mask: Mask | Callable[[Params], Mask] | None = None,
    scale: Literal["none", "num_params"] = "none",
) -> optax.GradientTransformation:
    """L2-SP (Li et al., 2018): adds the gradient of a pull toward the pre-trained θ₀.

    .. math::
        \\text{scale="none"}: \\; g \\leftarrow g + \\lambda(\\theta-\\theta_0)
        = g + \\nabla_\\theta \\tfrac{\\lambda}{2}\\lVert\\theta-\\theta_0\\rVert^2,
        \\qquad
        \\text{scale="num_params"}: \\; g \\leftarrow g + \\tfrac{2\\lambda}{N}(\\theta-\\theta_0)
        = g + \\nabla_\\theta \\tfrac{\\lambda}{N}\\textstyle\\sum_k(\\theta_k-\\theta_{0,k})^2

    leafwise, only on the leaves selected by ``mask``. ``"num_params"``, with
    N the number of scalar entries where the mask is True, is exactly the
    ℓ2 regulariser of FLOW's official LLM code (mean squared deviation from a
    copy of the initial model, λ = 1e-3 there). The same penalty as a scalar,
    for logging or for adding to the loss instead, is :func:`l2sp_penalty`.

    Args:
      anchor_params: θ₀, a pytree like the parameters, or None to anchor at
        the parameters passed to ``init`` (the usual case: fine-tuning starts
        at θ₀; this also lets ``jax.jit(tx.init)`` take θ₀ as an argument).
      strength: λ >= 0, a finite number (a traced scalar is accepted
        unchecked).
      mask: **True = regularised** (pulled toward θ₀); False leaves pass
        through untouched. A pytree of bools (Python, numpy or 0-d bool
        arrays) with the structure of the parameters or a prefix of it (a
        plain dict prefix works on an ``nnx.State``), or a callable ``params
        -> mask``. Default: all leaves. Inside ``flowjax.freeze`` /
        ``optax.masked`` the frozen leaves are never regularised, and with
        ``scale="num_params"`` N counts the trainable entries only.
      scale: ``"none"`` (c = 1) or ``"num_params"`` (c = 2/N).

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`L2SPState`.
      ``update(updates, state, params)`` needs ``params``.

    Raises:
      ValueError: a negative or non-finite strength; an unknown scale; on
        ``init``/``update``: missing ``params``, an anchor or mask whose tree
        does not match the parameters, or an anchor leaf of another shape on a
        regularised leaf (the message names the path; masked-out leaves, e.g.
        an old head, may differ in shape), or ``scale="num_params"`` with a
        mask that selects nothing.
      TypeError: a mask whose leaves are not bools; a regularised leaf that
        is not floating point (e.g. the RNG keys and counters of a full
        ``nnx.state(model)``: pass ``nnx.state(model, nnx.Param)`` or mask
        them out).

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> theta0 = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}
      >>> tx = flowjax.l2sp(theta0, 0.1, mask={"w": True, "b": False})
      >>> params = {"w": jnp.array([3.0, 2.0]), "b": jnp.array([9.0])}
      >>> grads = {"w": jnp.zeros(2), "b": jnp.ones(1)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"].tolist(), updates["b"].tolist()  # 0.1·(θ-θ₀) on w; b untouched
      ([0.2..., 0.0], [1.0])
    """
    strength = _check_strength(strength)
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}; got {scale!r}.")

    def init_fn(params):
        keep = _select.mask_leaves(mask, params)
        _check_float(params, keep, "l2sp")
        anchor = params if anchor_params is None else anchor_params
        anchor = _check_tree(params, anchor, "anchor_params", keep)
        if scale == "num_params" and _count(params, keep) == 0:
            raise ValueError(
                'l2sp(scale="num_params") divides by the number of regularised entries, '
                "and the mask selects none."
            )
        return L2SPState(anchor=_masked_copy(anchor, keep))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("l2sp needs params: call tx.update(grads, state, params).")
        g, p, a, treedef = _align(updates, params, state.anchor)
        if _is_zero(strength):
            return updates, state
        c = strength
        if scale == "num_params":
            c = strength * (2.0 / _count_leaves(a))
        out = [
            gi if _skip(gi, pi, ai) else _add(gi, c * _delta(pi, ai))
            for gi, pi, ai in zip(g, p, a, strict=True)
        ]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


def l2sp_penalty(
    params: Params,
    anchor_params: Params,
    strength: float,
    *,
    mask: Mask | Callable[[Params], Mask] | None = None,
    scale: Literal["none", "num_params"] = "none",
) -> Array:
    """The L2-SP penalty whose gradient :func:`l2sp` adds, as a scalar.

    .. math::
        \\text{"none"}: \\tfrac{\\lambda}{2}\\textstyle\\sum_k(\\theta_k-\\theta_{0,k})^2,
        \\qquad
        \\text{"num_params"}: \\tfrac{\\lambda}{N}\\textstyle\\sum_k(\\theta_k-\\theta_{0,k})^2

    over the entries of the leaves selected by ``mask`` (N of them).
    ``jax.grad`` of it equals what ``l2sp(...).update`` adds to zero updates,
    bit for bit. Use it to log the penalty (e.g. with ‖θ−θ₀‖) or to add it to
    the loss instead of using the transform.

    Args:
      params: θ.
      anchor_params: θ₀, a pytree like ``params``.
      strength: λ >= 0.
      mask: as in :func:`l2sp`.
      scale: as in :func:`l2sp`.

    Returns:
      A float32 (or wider) scalar.

    Raises:
      ValueError: as in :func:`l2sp`.
      TypeError: as in :func:`l2sp`.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> p, p0 = {"w": jnp.array([3.0, 2.0])}, {"w": jnp.array([1.0, 2.0])}
      >>> float(flowjax.l2sp_penalty(p, p0, 0.1)), float(flowjax.l2sp_penalty(p, p0, 0.1, scale="num_params"))
      (0.2..., 0.2...)
    """
    strength = _check_strength(strength)
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}; got {scale!r}.")
    keep = _select.mask_leaves(mask, params)
    _check_float(params, keep, "l2sp_penalty")
    anchor_params = _check_tree(params, anchor_params, "anchor_params", keep)
    p, a = _leaves(params), _leaves(anchor_params)
    c = strength
    if scale == "num_params":
        n = _count(params, keep)
        if n == 0:
            raise ValueError(
                'l2sp_penalty(scale="num_params") divides by the number of regularised '
                "entries, and the mask selects none."
            )
        c = strength * (2.0 / n)
    total = sum(
        (
            jnp.sum(jnp.square(_delta(pi, ai)))
            for pi, ai, k in zip(p, a, keep, strict=True)
            if k
        ),
        start=jnp.zeros((), jnp.float32),
    )
    return (c / 2) * total


# ----------------------------------------------------------------------------- EWC


def ewc(
    anchor_params: Params | None,
    fisher: Params,
    strength: float,
    *,
    mask: Mask | Callable[[Params], Mask] | None = None,
) -> optax.GradientTransformation:
    """Elastic weight consolidation (Kirkpatrick et al., 2017) with a diagonal Fisher.

    .. math::
        g \\leftarrow g + \\lambda\\, F \\odot (\\theta-\\theta_0)
        = g + \\nabla_\\theta \\tfrac{\\lambda}{2}\\textstyle\\sum_k F_k(\\theta_k-\\theta_{0,k})^2

    leafwise on the leaves selected by ``mask``. With F = 1 this is exactly
    :func:`l2sp` (``scale="none"``). Get F with :func:`flowjax.diagonal_fisher`.

    Args:
      anchor_params: θ₀, or None to anchor at the parameters passed to ``init``.
      fisher: the diagonal Fisher F, a pytree like the parameters with
        finite entries >= 0 (stored in the state; computed in float32).
        Checked once, here, on device (two scalars per leaf reach the host).
      strength: λ >= 0, a finite number.
      mask: as in :func:`l2sp`.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`EWCState`.

    Raises:
      ValueError: a negative or non-finite strength; a Fisher with negative,
        NaN or infinite entries (naming the leaf); on ``init``/``update``:
        missing ``params``, or an anchor, Fisher or mask whose tree does not
        match the parameters, or a regularised leaf of another shape (naming
        the path).
      TypeError: as in :func:`l2sp`.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> theta0, fisher = jnp.array([1.0, 1.0]), jnp.array([0.0, 4.0])
      >>> tx = flowjax.ewc(theta0, fisher, 0.5)
      >>> params = jnp.array([3.0, 3.0])
      >>> updates, _ = tx.update(jnp.zeros(2), tx.init(params), params)
      >>> updates.tolist()  # 0.5·F·(θ-θ₀)
      [0.0, 4.0]
    """
    strength = _check_strength(strength)
    _check_fisher(fisher)
    if anchor_params is not None:  # structure only: shapes are checked where selected
        _check_tree(anchor_params, fisher, "fisher", keep=[])

    def init_fn(params):
        keep = _select.mask_leaves(mask, params)
        _check_float(params, keep, "ewc")
        anchor = params if anchor_params is None else anchor_params
        anchor = _check_tree(params, anchor, "anchor_params", keep)
        masked_fisher = _check_tree(params, fisher, "fisher", keep)
        return EWCState(
            anchor=_masked_copy(anchor, keep), fisher=_masked_copy(masked_fisher, keep)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("ewc needs params: call tx.update(grads, state, params).")
        g, p, a, treedef = _align(updates, params, state.anchor)
        if _is_zero(strength):
            return updates, state
        f = _state_leaves(state.fisher, treedef)
        out = [
            gi
            if _skip(gi, pi, ai)
            else _add(gi, strength * (_f32(fi) * _delta(pi, ai)))
            for gi, pi, ai, fi in zip(g, p, a, f, strict=True)
        ]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


def ewc_penalty(
    params: Params,
    anchor_params: Params,
    fisher: Params,
    strength: float,
    *,
    mask: Mask | Callable[[Params], Mask] | None = None,
) -> Array:
    """The EWC penalty whose gradient :func:`ewc` adds, as a scalar.

    .. math:: \\tfrac{\\lambda}{2}\\textstyle\\sum_k F_k(\\theta_k-\\theta_{0,k})^2

    ``jax.grad`` of it equals what ``ewc(...).update`` adds, up to float32
    rounding (the products are grouped differently).

    Args:
      params: θ.
      anchor_params: θ₀.
      fisher: the diagonal Fisher F (entries >= 0; not re-checked here, on
        every call: :func:`ewc` checks it once).
      strength: λ >= 0.
      mask: as in :func:`l2sp`.

    Returns:
      A float32 (or wider) scalar.

    Raises:
      ValueError: as in :func:`ewc` (except the Fisher's values).
      TypeError: as in :func:`l2sp`.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> float(flowjax.ewc_penalty(jnp.array([3.0, 3.0]), jnp.ones(2), jnp.array([0.0, 4.0]), 0.5))
      4.0
    """
    strength = _check_strength(strength)
    keep = _select.mask_leaves(mask, params)
    _check_float(params, keep, "ewc_penalty")
    anchor_params = _check_tree(params, anchor_params, "anchor_params", keep)
    fisher = _check_tree(params, fisher, "fisher", keep)
    leaves = zip(
        _leaves(params),
        _leaves(anchor_params),
        _leaves(fisher),
        keep,
        strict=True,
    )
    total = sum(
        (
            jnp.sum(_f32(fi) * jnp.square(_delta(pi, ai)))
            for pi, ai, fi, k in leaves
            if k
        ),
        start=jnp.zeros((), jnp.float32),
    )
    return (strength / 2) * total


# ----------------------------------------------------------------------------- SI


def synaptic_intelligence(
    strength: float,
    *,
    damping: float = 0.1,
    anchor_params: Params | None = None,
    mask: Mask | Callable[[Params], Mask] | None = None,
    online: bool = True,
) -> optax.GradientTransformation:
    """Synaptic Intelligence (Zenke, Poole & Ganguli, 2017) as an optax transform.

    SI measures each parameter's importance by its contribution to the fall
    of the loss along the training path. With g_t the incoming gradient (the
    gradient of the task loss: put this transform first in the chain) and θ_t
    the parameters at update t, the state accumulates the path integral

    .. math:: \\omega_k \\mathrel{+}= -g_{t-1,k}\\,(\\theta_{t,k}-\\theta_{t-1,k})

    (the step from θ_{t-1} to θ_t was taken with g_{t-1}), and the update adds

    .. math::
        g_t \\leftarrow g_t + \\lambda\\,\\Omega^{\\text{eff}}_t \\odot (\\theta_t-\\theta_0),
        \\qquad
        \\Omega^{\\text{eff}}_t = \\Omega + [\\text{online}]\\,
        \\frac{\\mathrm{relu}(\\omega_t)}{(\\theta_t-\\theta_0)^2+\\xi}

    i.e. the gradient of (λ/2) Σ_k Ω^eff_k (θ_k − θ_{0,k})², with Ω^eff held
    fixed (Zenke et al.'s c is λ/2). Ω is the consolidated importance:
    :func:`si_consolidate` at a task boundary adds relu(ω)/((θ−θ₀)²+ξ) to it,
    moves θ₀ to the current θ and restarts ω.

    Which variant: Zenke et al. protect what mattered for PREVIOUS tasks, so
    their penalty uses only Ω (``online=False``, with :func:`si_consolidate`
    between tasks); that is their algorithm exactly. Fine-tuning a pre-trained
    model has a single new task and no record of the pre-training path, so Ω
    would stay 0. The default ``online=True`` therefore also uses the current
    path's importance: a parameter that has moved Δ from θ₀ while buying a
    loss decrease ω is pulled back with force λ·relu(ω)·Δ/(Δ²+ξ) ≈ λ·relu(ω)/Δ,
    i.e. λ times its mean past gradient along the path. It is a data-driven
    drift limiter on the new task, not an estimate of pre-training
    importance; treat it as a baseline, and say which variant you report.

    Memory: five parameter-sized arrays (θ₀, θ_{t-1}, g_{t-1}, ω, Ω) per
    regularised leaf.

    Args:
      strength: λ >= 0, a finite number. 0 leaves the updates unchanged (the
        state still accumulates ω).
      damping: ξ > 0, keeps Ω finite for parameters that did not move.
      anchor_params: θ₀; None (default) anchors at the parameters passed to
        ``init``.
      mask: **True = regularised**, as in :func:`l2sp`.
      online: use the current path's importance (see above); False gives
        Zenke et al.'s penalty from consolidated Ω only.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`SIState`.

    Raises:
      ValueError: a negative or non-finite strength; ``damping <= 0``; on
        ``init``/``update``: missing ``params``, an anchor or mask whose tree
        does not match the parameters.
      TypeError: as in :func:`l2sp`.

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> tx = optax.chain(flowjax.synaptic_intelligence(1.0, damping=0.1), optax.sgd(0.5))
      >>> params = jnp.array([0.0, 0.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     grads = params - jnp.array([1.0, -2.0])  # loss ½‖θ - (1, -2)‖²
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> state[0].omega.round(3).tolist()  # ω: the loss decrease owed to each coordinate
      [0.446, 1.591]
    """
    strength = _check_strength(strength)
    damping = _check_positive(damping, "damping")

    def init_fn(params):
        keep = _select.mask_leaves(mask, params)
        _check_float(params, keep, "synaptic_intelligence")
        anchor = params if anchor_params is None else anchor_params
        anchor = _check_tree(params, anchor, "anchor_params", keep)
        leaves, treedef = _flatten(params)
        a = _leaves(anchor)

        def field(make):
            return jax.tree.unflatten(
                treedef,
                [
                    make(x, ai) if k else optax.MaskedNode()
                    for x, ai, k in zip(leaves, a, keep, strict=True)
                ],
            )

        # zeros_like and copies keep the parameters' sharding. ω and Ω are kept in
        # the computation dtype (float32, or float64 for float64 parameters), so
        # the state's dtypes do not change across updates (jit, scan carries).
        zeros32 = lambda x, _: jnp.zeros_like(x, dtype=_compute_dtype(x))  # noqa: E731
        return SIState(
            anchor=field(lambda _, ai: jnp.array(ai, copy=True)),
            prev_params=field(lambda x, _: jnp.array(x, copy=True)),
            prev_grads=field(lambda x, _: jnp.zeros_like(x)),
            omega=field(zeros32),
            importance=field(zeros32),
            damping=jnp.asarray(damping, jnp.float32),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "synaptic_intelligence needs params: call tx.update(grads, state, params)."
            )
        g, p, a, treedef = _align(updates, params, state.anchor)
        fields = [
            _state_leaves(x, treedef)
            for x in (
                state.prev_params,
                state.prev_grads,
                state.omega,
                state.importance,
            )
        ]
        out, new = [], {k: [] for k in SIState._fields[1:5]}
        for gi, pi, ai, pp, pg, om, imp in zip(g, p, a, *fields, strict=True):
            if _skip(gi, pi, ai):
                out.append(gi)
                for k in new:
                    new[k].append(optax.MaskedNode())
                continue
            om = (om - _f32(pg) * (_f32(pi) - _f32(pp))).astype(om.dtype)
            if _is_zero(strength):
                out.append(gi)
            else:
                d = _delta(pi, ai)
                big = imp
                if online:
                    big = imp + jax.nn.relu(om) / (jnp.square(d) + state.damping)
                out.append(_add(gi, strength * (big * d)))
            new["prev_params"].append(pi)
            new["prev_grads"].append(gi)
            new["omega"].append(om)
            new["importance"].append(imp)
        state = state._replace(
            **{k: jax.tree.unflatten(treedef, v) for k, v in new.items()}
        )
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


def si_consolidate(state: Any, params: Params) -> Any:
    """Closes an SI task: folds the path integral into the importance Ω (Zenke et al., eq. 5).

    .. math::
        \\omega \\mathrel{+}= -g_{t-1}(\\theta-\\theta_{t-1}), \\quad
        \\Omega \\mathrel{+}= \\frac{\\mathrm{relu}(\\omega)}{(\\theta-\\theta_0)^2+\\xi}, \\quad
        \\theta_0 \\leftarrow \\theta, \\quad \\omega \\leftarrow 0, \\quad
        \\theta_{t-1} \\leftarrow \\theta, \\quad g_{t-1} \\leftarrow 0

    with θ the parameters at the end of the task (after its last update).

    Args:
      state: an :class:`SIState`, or any optimiser state containing one or
        more (e.g. the tuple state of an ``optax.chain``); each is replaced.
      params: θ at the task boundary, a pytree like the parameters.

    Returns:
      ``state`` with every :class:`SIState` consolidated.

    Raises:
      ValueError: ``state`` holds no :class:`SIState`, or ``params`` does not
        match its tree.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> tx = flowjax.synaptic_intelligence(1.0, damping=1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> state = state._replace(prev_grads=jnp.array([-2.0, 1.0]))  # g at θ_{t-1} = 0
      >>> state = flowjax.si_consolidate(state, jnp.array([1.0, 1.0]))
      >>> state.importance.tolist(), state.anchor.tolist()  # relu(2, -1) / (1 + 1)
      ([1.0, 0.0], [1.0, 1.0])
    """
    found = []

    def one(s):
        if not isinstance(s, SIState):
            return s
        found.append(True)
        # Inside optax.masked / flowjax.freeze the state holds MaskedNode where
        # the parameters were hidden from SI: hide them here too.
        restricted = _restrict(s.anchor, params)
        p, treedef = _flatten(restricted)
        a, g, pps, oms, imps = (
            _state_leaves(x, treedef)
            for x in (s.anchor, s.prev_grads, s.prev_params, s.omega, s.importance)
        )
        new = {k: [] for k in SIState._fields[:5]}
        for gi, pi, ai, pp, om, imp in zip(g, p, a, pps, oms, imps, strict=True):
            if _masked(ai) or _masked(pi):
                for k in new:
                    new[k].append(optax.MaskedNode())
                continue
            om = om - _f32(gi) * (_f32(pi) - _f32(pp))
            imp = (
                imp + jax.nn.relu(om) / (jnp.square(_delta(pi, ai)) + s.damping)
            ).astype(imp.dtype)
            new["anchor"].append(jnp.array(pi, dtype=ai.dtype, copy=True))
            new["prev_params"].append(jnp.array(pi, copy=True))
            new["prev_grads"].append(jnp.zeros_like(gi))
            new["omega"].append(jnp.zeros_like(om))
            new["importance"].append(imp)
        return s._replace(**{k: jax.tree.unflatten(treedef, v) for k, v in new.items()})

    out = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, SIState))
    if not found:
        raise ValueError(
            "si_consolidate found no SIState in state: pass the state of "
            "flowjax.synaptic_intelligence (or an optax state that contains it)."
        )
    return out


# ----------------------------------------------------------------------------- helpers


def _check_strength(strength):
    if isinstance(strength, numbers.Number) or (
        _checks.is_concrete(strength) and np.ndim(strength) == 0
    ):
        s = float(np.asarray(strength))
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"strength must be a finite number >= 0; got {s}.")
        return s
    if np.ndim(strength) != 0:
        raise ValueError(f"strength must be a scalar; got shape {np.shape(strength)}.")
    return strength  # traced: unchecked


def _check_positive(x, what: str) -> float:
    v = float(x)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a finite number > 0; got {v}.")
    return v


def _is_zero(strength) -> bool:
    return isinstance(strength, float) and strength == 0.0


def _check_fisher(fisher) -> None:
    """Finite and >= 0, checked on device: two scalars per leaf come to the host."""
    for path, f in _with_path(fisher):
        if (
            _masked(f)
            or isinstance(f, jax.ShapeDtypeStruct)
            or not _checks.is_concrete(f)
            or np.size(f) == 0
        ):
            continue
        x = jnp.asarray(f)
        finite, low = jax.device_get((jnp.all(jnp.isfinite(x)), jnp.min(x)))
        where = jax.tree_util.keystr(path) or "(root)"
        if not finite:
            bad = ~jnp.isfinite(x)
            raise ValueError(
                f"fisher{where} has NaN or infinite entries: {int(jnp.sum(bad))} of "
                f"{x.size}, the first at index {_first(bad)}."
            )
        if low < 0:
            bad = x < 0
            raise ValueError(
                f"fisher{where} must be >= 0 (a diagonal Fisher is a mean of squares): "
                f"min {float(low)}, {int(jnp.sum(bad))} negative entries, the first at "
                f"index {_first(bad)}."
            )


def _first(bad) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(jnp.argmax(bad)), bad.shape))


def _flatten(tree):
    """Leaves and treedef, with ``optax.MaskedNode`` kept as a leaf."""
    return jax.tree.flatten(tree, is_leaf=_is_masked_node)


def _leaves(tree) -> list:
    return _flatten(tree)[0]


def _with_path(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked_node)[0]


def _restrict(params, other):
    """``other`` with ``MaskedNode`` wherever ``params`` holds one (inside ``optax.masked``,
    where a frozen subtree of the parameters is a single ``MaskedNode``)."""
    if not any(_masked(x) for x in _leaves(params)):
        return other
    try:
        return jax.tree.map(
            lambda p, o: optax.MaskedNode() if _masked(p) else o,
            params,
            other,
            is_leaf=_is_masked_node,
        )
    except (ValueError, TypeError):
        return other  # _check_tree names the mismatch


def _check_tree(params, other, what: str, keep: list[bool] | None = None):
    """``other`` restricted to ``params``' MaskedNodes; a ValueError naming the first
    path where its tree differs, or where a selected leaf (``keep``; default: all)
    differs in shape."""
    other = _restrict(params, other)
    p_leaves, p_def = _flatten(params)
    o_leaves, o_def = _flatten(other)
    if p_def != o_def:
        p_paths = [jax.tree_util.keystr(k) for k, _ in _with_path(params)]
        o_paths = [jax.tree_util.keystr(k) for k, _ in _with_path(other)]
        missing = [k for k in p_paths if k not in set(o_paths)]
        extra = [k for k in o_paths if k not in set(p_paths)]
        if missing:
            why = f"{what} has no entry at params{missing[0]}"
        elif extra:
            why = f"{what} has an entry at {what}{extra[0]} that params lacks"
        else:
            why = f"{what} and params have the same paths in different containers ({o_def} vs {p_def})"
        raise ValueError(f"{why}: the trees must match.")
    if keep is None:
        keep = [True] * len(p_leaves)
    for i, (x, y) in enumerate(zip(p_leaves, o_leaves, strict=True)):
        if i >= len(keep) or not keep[i] or _masked(x) or _masked(y):
            continue
        if np.shape(x) != np.shape(y):
            path = jax.tree_util.keystr(_with_path(params)[i][0])
            raise ValueError(
                f"{what}{path} has shape {np.shape(y)}; params{path} has shape {np.shape(x)}."
            )
    return other


def _check_float(params, keep: list[bool], fn: str) -> None:
    """A TypeError naming the selected leaves that are not floating point."""
    bad = []
    for (path, x), k in zip(_with_path(params), keep, strict=True):
        if not k or _masked(x):
            continue
        dtype = getattr(x, "dtype", None)
        dtype = np.result_type(x) if dtype is None else dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            bad.append(f"params{jax.tree_util.keystr(path)} ({dtype})")
    if bad:
        raise TypeError(
            f"{fn} regularises floating-point parameters, but {', '.join(bad[:5])} "
            f"{'is' if len(bad) == 1 else 'are'} not (RNG keys and counters of a full "
            "nnx.state(model), step counters, integer buffers). Pass the parameters only, "
            "e.g. nnx.state(model, nnx.Param), or leave such leaves out with mask=."
        )


def _masked_copy(tree, keep: list[bool]):
    leaves, treedef = _flatten(tree)
    return jax.tree.unflatten(
        treedef,
        [
            jnp.array(x, copy=True) if k and not _masked(x) else optax.MaskedNode()
            for x, k in zip(leaves, keep, strict=True)
        ],
    )


def _is_masked_node(x) -> bool:
    return isinstance(x, optax.MaskedNode)


_masked = _is_masked_node


def _skip(*leaves) -> bool:
    """A leaf position the regulariser does not touch (masked out here or by optax.masked)."""
    return any(_masked(x) for x in leaves)


def _align(updates, params, anchor):
    """Flat leaves of updates, params and the state's anchor, checked to match."""
    g, treedef = _flatten(updates)
    p, p_def = _flatten(params)
    if p_def != treedef or any(
        np.shape(x) != np.shape(y)
        for x, y in zip(g, p, strict=True)
        if not (_masked(x) or _masked(y))
    ):
        _check_tree(updates, params, "params")  # raises, naming the path
        raise ValueError("params do not match the updates' tree.")
    return g, p, _state_leaves(anchor, treedef), treedef


def _state_leaves(tree, treedef) -> list:
    """Leaves of a state field (``MaskedNode`` where masked out), checked against the params' tree."""
    leaves, state_def = _flatten(tree)
    if state_def != treedef:
        raise ValueError(
            "the optimiser state was initialised for a different parameter tree: "
            f"{state_def} vs the parameters' {treedef}."
        )
    return leaves


def _count(params, keep: list[bool]) -> int:
    return sum(
        int(np.prod(np.shape(x)))
        for x, k in zip(_leaves(params), keep, strict=True)
        if k and not _masked(x)
    )


def _count_leaves(anchor_leaves) -> int:
    return sum(int(np.prod(np.shape(x))) for x in anchor_leaves if not _masked(x))


def _compute_dtype(*xs):
    return jnp.result_type(jnp.float32, *(x.dtype for x in xs))


def _f32(x):
    x = jnp.asarray(x)
    return x.astype(_compute_dtype(x))


def _delta(p, a):
    """θ − θ₀ in at least float32."""
    p, a = jnp.asarray(p), jnp.asarray(a)
    dt = _compute_dtype(p, a)
    return p.astype(dt) - a.astype(dt)


def _add(g, term):
    """g + term, rounded once to g's dtype."""
    g = jnp.asarray(g)
    dt = _compute_dtype(g, term)
    return (g.astype(dt) + term).astype(g.dtype)
