"""Forgetting regularisers that act on gradients: L2-SP, EWC and Synaptic Intelligence.

Each is an optax ``GradientTransformation`` that adds the gradient of a
quadratic pull toward an anchor θ₀ (the pre-trained parameters) to the
incoming updates. Put it FIRST in an ``optax.chain``, before the optimiser, so
that it sees the raw gradient of the task loss and the optimiser sees the
regularised gradient::

    tx = optax.chain(flowjax.l2sp(1e-2), optax.adam(1e-3))

Design, shared by all three (the pattern of ``optax.add_decayed_weights``):

* Each is written as an UNMASKED transform over whatever leaves it is given;
  ``mask=`` wraps it in ``optax.masked``. **True / matching = regularised**.
  The mask is any flowjax selection (see :func:`flowjax.trainable_mask`): an
  NNX filter, unchanged (``nnx.Not(nnx.PathContains("head"))``; type filters
  need an ``nnx.State``), a bool pytree with the structure of the params or a
  prefix of it (a plain dict prefix works on an ``nnx.State``), or a function
  ``params -> mask``, as for ``optax.masked``. With a mask the state is an
  ``optax.MaskedState`` whose ``inner_state`` is the NamedTuple below.
* Inside ``flowjax.train_only``, ``optax.masked`` or ``optax.partition`` (or
  with ``mask=``) the hidden leaves are ``optax.MaskedNode``: they are never
  regularised and hold no state, ``scale="num_params"`` counts only the
  leaves the regulariser sees, and an anchor or Fisher leaf is shape-checked
  only where it is seen, so θ₀ may hold an old head of another shape.
* The anchor (and EWC's Fisher, SI's accumulators) live in the transform's
  NamedTuple state. Inside a jitted train step they are therefore ARGUMENTS,
  placed and sharded like the parameters. In JAX 0.10 an array closed over by
  a jitted function is embedded in the program as an HLO constant (a second
  copy of the model in the executable, no sharding), which is why the anchor
  is not kept in a closure.
* ``init`` stores fresh copies, never the caller's buffers: a train step that
  donates both ``params`` and ``opt_state`` (``donate_argnums``) would
  otherwise donate the same buffer twice, which XLA rejects. Donate the
  optimiser state: a donated, unchanged anchor is aliased from input to
  output (the same device buffer every step).
* ``init`` accepts abstract parameters (``jax.ShapeDtypeStruct`` leaves,
  directly or through ``jax.eval_shape(tx.init, params)``), so the state can
  be planned and sharded before memory is allocated.
* Only floating-point leaves can be regularised; an integer or PRNG-key leaf
  it is given (a full ``nnx.state(model)`` with RNG streams) is a TypeError
  naming it: pass ``nnx.state(model, nnx.Param)`` or mask it out.
* Updates keep their dtype: the added term is computed in at least float32
  and the sum is rounded once to the update's dtype (bfloat16 stays bfloat16).
* ``strength == 0`` returns the incoming updates unchanged (the same arrays).
* ``update`` needs ``params``: calling it without them is a ValueError.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowjax import _checks, _select
from flowjax._types import Array, Params, Selection

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

_SCALES = ("none", "num_params")


class L2SPState(NamedTuple):
    """State of :func:`l2sp`: the anchor θ₀ (``optax.MaskedNode`` where hidden)."""

    anchor: Params


class EWCState(NamedTuple):
    """State of :func:`ewc`: the anchor θ₀ and the diagonal Fisher F."""

    anchor: Params
    fisher: Params


class SIState(NamedTuple):
    """State of :func:`synaptic_intelligence` (``optax.MaskedNode`` where hidden).

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


def _with_mask(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """``tx`` itself, or ``optax.masked(tx, mask)`` with the mask resolved by flowjax's rules."""
    if mask is None:
        return tx
    _select.check_selection(mask, "mask")
    return optax.masked(tx, lambda tree: _select.mask_tree(mask, tree, what="mask"))


# ----------------------------------------------------------------------------- L2-SP


def l2sp(
    strength: float,
    anchor: Params | None = None,
    *,
    mask: Selection | None = None,
    scale: Literal["none", "num_params"] = "none",
) -> optax.GradientTransformation:
    """L2-SP (Li et al., 2018): adds the gradient of a pull toward the pre-trained θ₀.

    .. math::
        \\text{scale="none"}: \\; g \\leftarrow g + \\lambda(\\theta-\\theta_0)
        = g + \\nabla_\\theta \\tfrac{\\lambda}{2}\\lVert\\theta-\\theta_0\\rVert^2,
        \\qquad
        \\text{scale="num_params"}: \\; g \\leftarrow g + \\tfrac{2\\lambda}{N}(\\theta-\\theta_0)
        = g + \\nabla_\\theta \\tfrac{\\lambda}{N}\\textstyle\\sum_k(\\theta_k-\\theta_{0,k})^2

    leafwise on the leaves it sees (all, or those selected by ``mask``).
    ``"num_params"``, with N the number of scalar entries it sees, is exactly
    the ℓ2 regulariser of FLOW's official LLM code (mean squared deviation
    from a copy of the initial model, λ = 1e-3 there). The same penalty as a
    scalar, for logging or for adding to the loss instead, is
    :func:`l2sp_penalty`.

    Args:
      strength: λ >= 0, a finite number (a traced scalar is accepted
        unchecked).
      anchor: θ₀, a pytree like the parameters, or None (default) to anchor at
        the parameters passed to ``init`` (the usual case: fine-tuning starts
        at θ₀; this also lets ``jax.jit(tx.init)`` take θ₀ as an argument).
      mask: **True / matching = regularised**; the rest pass through
        untouched. ``None`` (default): every leaf. Otherwise the transform is
        wrapped in ``optax.masked``; see the module doc for the accepted forms.
      scale: ``"none"`` (c = 1) or ``"num_params"`` (c = 2/N).

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`L2SPState`
      (inside an ``optax.MaskedState`` when ``mask`` is given).
      ``update(updates, state, params)`` needs ``params``.

    Raises:
      ValueError: a negative or non-finite strength; an unknown scale; on
        ``init``/``update``: missing ``params``, an anchor or mask whose tree
        does not match the parameters, or an anchor leaf of another shape on a
        regularised leaf (the message names the path), or
        ``scale="num_params"`` with nothing to regularise.
      TypeError: a mask whose leaves are not bools, a type filter on a plain
        pytree of arrays; a regularised leaf that is not floating point (e.g.
        the RNG keys and counters of a full ``nnx.state(model)``).

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> theta0 = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}
      >>> tx = flowjax.l2sp(0.1, theta0, mask={"w": True, "b": False})
      >>> params = {"w": jnp.array([3.0, 2.0]), "b": jnp.array([9.0])}
      >>> grads = {"w": jnp.zeros(2), "b": jnp.ones(1)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"].tolist(), updates["b"].tolist()  # 0.1·(θ-θ₀) on w; b untouched
      ([0.2..., 0.0], [1.0])
    """
    strength = _check_strength(strength)
    _check_scale(scale)

    def init_fn(params):
        _check_float(params, "l2sp")
        if scale == "num_params" and _size(params) == 0:
            raise ValueError(
                'l2sp(scale="num_params") divides by the number of regularised entries, '
                "and the mask selects none."
            )
        return L2SPState(anchor=_anchor(params, anchor))

    def update_fn(updates, state, params=None):
        _check_update(updates, state.anchor, params, "l2sp")
        if _is_zero(strength):
            return updates, state
        c = strength
        if scale == "num_params":
            c = strength * (2.0 / _size(state.anchor))
        out = jax.tree.map(
            lambda g, p, a: _add(g, c * _delta(p, a)), updates, params, state.anchor
        )
        return out, state

    return _with_mask(optax.GradientTransformation(init_fn, update_fn), mask)


def l2sp_penalty(
    strength: float,
    anchor: Params,
    params: Params,
    *,
    mask: Selection | None = None,
    scale: Literal["none", "num_params"] = "none",
) -> Array:
    """The L2-SP penalty whose gradient :func:`l2sp` adds, as a scalar.

    .. math::
        \\text{"none"}: \\tfrac{\\lambda}{2}\\textstyle\\sum_k(\\theta_k-\\theta_{0,k})^2,
        \\qquad
        \\text{"num_params"}: \\tfrac{\\lambda}{N}\\textstyle\\sum_k(\\theta_k-\\theta_{0,k})^2

    over the entries of the leaves selected by ``mask`` (N of them).
    ``jax.grad`` of it (in ``params``) equals what ``l2sp(strength, anchor,
    mask=mask, scale=scale).update`` adds to zero updates, bit for bit. Use it
    to log the penalty (e.g. with ‖θ−θ₀‖) or to add it to the loss instead of
    using the transform. The arguments come in the transform's order, then
    ``params``.

    Args:
      strength: λ >= 0.
      anchor: θ₀, a pytree like ``params``.
      params: θ.
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
      >>> float(flowjax.l2sp_penalty(0.1, p0, p)), float(flowjax.l2sp_penalty(0.1, p0, p, scale="num_params"))
      (0.2..., 0.2...)
    """
    strength = _check_strength(strength)
    _check_scale(scale)
    seen = _hide(params, mask)
    _check_float(seen, "l2sp_penalty")
    a = _match(seen, anchor, "anchor")
    c = strength
    if scale == "num_params":
        n = _size(seen)
        if n == 0:
            raise ValueError(
                'l2sp_penalty(scale="num_params") divides by the number of regularised '
                "entries, and the mask selects none."
            )
        c = strength * (2.0 / n)
    terms = jax.tree.map(lambda p, a: jnp.sum(jnp.square(_delta(p, a))), seen, a)
    return (c / 2) * _total(terms)


# ----------------------------------------------------------------------------- EWC


def ewc(
    strength: float,
    fisher: Params,
    anchor: Params | None = None,
    *,
    mask: Selection | None = None,
) -> optax.GradientTransformation:
    """Elastic weight consolidation (Kirkpatrick et al., 2017) with a diagonal Fisher.

    .. math::
        g \\leftarrow g + \\lambda\\, F \\odot (\\theta-\\theta_0)
        = g + \\nabla_\\theta \\tfrac{\\lambda}{2}\\textstyle\\sum_k F_k(\\theta_k-\\theta_{0,k})^2

    leafwise on the leaves it sees (all, or those selected by ``mask``). With
    F = 1 this is exactly :func:`l2sp` (``scale="none"``). Get F with
    :func:`flowjax.diagonal_fisher`.

    Args:
      strength: λ >= 0, a finite number.
      fisher: the diagonal Fisher F, a pytree like the parameters with
        finite entries >= 0 (stored in the state; used in float32). Checked
        once, here, on device (two scalars per leaf reach the host).
      anchor: θ₀, or None (default) to anchor at the parameters passed to
        ``init``.
      mask: as in :func:`l2sp`.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`EWCState`
      (inside an ``optax.MaskedState`` when ``mask`` is given).

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
      >>> tx = flowjax.ewc(0.5, fisher, theta0)
      >>> params = jnp.array([3.0, 3.0])
      >>> updates, _ = tx.update(jnp.zeros(2), tx.init(params), params)
      >>> updates.tolist()  # 0.5·F·(θ-θ₀)
      [0.0, 4.0]
    """
    strength = _check_strength(strength)
    _check_fisher(fisher)
    if anchor is not None:  # structure only: shapes are checked where seen
        _match(anchor, fisher, "fisher", shapes=False)

    def init_fn(params):
        _check_float(params, "ewc")
        a = _anchor(params, anchor)
        f = jax.tree.map(_copy, _match(params, fisher, "fisher"))
        return EWCState(anchor=a, fisher=f)

    def update_fn(updates, state, params=None):
        _check_update(updates, state.anchor, params, "ewc")
        if _is_zero(strength):
            return updates, state
        out = jax.tree.map(
            lambda g, p, a, f: _add(g, strength * (_f32(f) * _delta(p, a))),
            updates,
            params,
            state.anchor,
            state.fisher,
        )
        return out, state

    return _with_mask(optax.GradientTransformation(init_fn, update_fn), mask)


def ewc_penalty(
    strength: float,
    fisher: Params,
    anchor: Params,
    params: Params,
    *,
    mask: Selection | None = None,
) -> Array:
    """The EWC penalty whose gradient :func:`ewc` adds, as a scalar.

    .. math:: \\tfrac{\\lambda}{2}\\textstyle\\sum_k F_k(\\theta_k-\\theta_{0,k})^2

    over the leaves selected by ``mask``. ``jax.grad`` of it equals what
    ``ewc(strength, fisher, anchor, mask=mask).update`` adds, up to float32
    rounding (the products are grouped differently). The arguments come in
    the transform's order, then ``params``.

    Args:
      strength: λ >= 0.
      fisher: the diagonal Fisher F (entries >= 0; not re-checked here, on
        every call: :func:`ewc` checks it once).
      anchor: θ₀.
      params: θ.
      mask: as in :func:`l2sp`.

    Returns:
      A float32 (or wider) scalar.

    Raises:
      ValueError: as in :func:`ewc` (except the Fisher's values).
      TypeError: as in :func:`l2sp`.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> float(flowjax.ewc_penalty(0.5, jnp.array([0.0, 4.0]), jnp.ones(2), jnp.array([3.0, 3.0])))
      4.0
    """
    strength = _check_strength(strength)
    seen = _hide(params, mask)
    _check_float(seen, "ewc_penalty")
    a = _match(seen, anchor, "anchor")
    f = _match(seen, fisher, "fisher")
    terms = jax.tree.map(
        lambda p, a, f: jnp.sum(_f32(f) * jnp.square(_delta(p, a))), seen, a, f
    )
    return (strength / 2) * _total(terms)


# ----------------------------------------------------------------------------- SI


def synaptic_intelligence(
    strength: float,
    anchor: Params | None = None,
    *,
    damping: float = 0.1,
    mask: Selection | None = None,
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
      anchor: θ₀; None (default) anchors at the parameters passed to
        ``init``.
      damping: ξ > 0, keeps Ω finite for parameters that did not move.
      mask: **True / matching = regularised**, as in :func:`l2sp`.
      online: use the current path's importance (see above); False gives
        Zenke et al.'s penalty from consolidated Ω only.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`SIState`
      (inside an ``optax.MaskedState`` when ``mask`` is given).

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
        _check_float(params, "synaptic_intelligence")
        # ω and Ω are kept in the computation dtype (float32, or float64 for
        # float64 parameters), so the state's dtypes never change across updates
        # (jit, scan carries); zeros_like and copies keep the params' sharding.
        return SIState(
            anchor=_anchor(params, anchor),
            prev_params=jax.tree.map(_copy, params),
            prev_grads=jax.tree.map(_zeros, params),
            omega=jax.tree.map(lambda x: _zeros(x, _compute_dtype(x)), params),
            importance=jax.tree.map(lambda x: _zeros(x, _compute_dtype(x)), params),
            damping=jnp.asarray(damping, jnp.float32),
        )

    def update_fn(updates, state, params=None):
        _check_update(updates, state.anchor, params, "synaptic_intelligence")
        treedef = jax.tree.structure(params)
        fields = (state.anchor, state.prev_params, state.prev_grads, state.omega)
        trees = (updates, params, *fields, state.importance)
        rows = zip(*(jax.tree.leaves(t) for t in trees), strict=True)
        out, omegas = [], []
        for g, p, a, pp, pg, om, imp in rows:
            om = (om - _f32(pg) * (_f32(p) - _f32(pp))).astype(om.dtype)
            omegas.append(om)
            if _is_zero(strength):
                out.append(g)
                continue
            d = _delta(p, a)
            big = (
                imp + jax.nn.relu(om) / (jnp.square(d) + state.damping)
                if online
                else imp
            )
            out.append(_add(g, strength * (big * d)))
        new = state._replace(
            prev_params=params,
            prev_grads=updates,
            omega=jax.tree.unflatten(treedef, omegas),
        )
        return jax.tree.unflatten(treedef, out), new

    return _with_mask(optax.GradientTransformation(init_fn, update_fn), mask)


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
        # Inside optax.masked / train_only the state holds MaskedNode where the
        # parameters were hidden from SI: hide them here too.
        p = _match(s.anchor, params, "params")
        om = jax.tree.map(
            lambda o, g, x, pp: o - _f32(g) * (_f32(x) - _f32(pp)),
            s.omega,
            s.prev_grads,
            p,
            s.prev_params,
        )
        imp = jax.tree.map(
            lambda i, o, x, a: (
                i + jax.nn.relu(o) / (jnp.square(_delta(x, a)) + s.damping)
            ).astype(i.dtype),
            s.importance,
            om,
            p,
            s.anchor,
        )
        return s._replace(
            anchor=jax.tree.map(
                lambda x, a: jnp.array(x, a.dtype, copy=True), p, s.anchor
            ),
            prev_params=jax.tree.map(_copy, p),
            prev_grads=jax.tree.map(jnp.zeros_like, s.prev_grads),
            omega=jax.tree.map(jnp.zeros_like, s.omega),
            importance=imp,
        )

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


def _check_scale(scale) -> None:
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}; got {scale!r}.")


def _check_positive(x, what: str) -> float:
    v = float(x)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a finite number > 0; got {v}.")
    return v


def _is_zero(strength) -> bool:
    return isinstance(strength, float) and strength == 0.0


def _check_fisher(fisher) -> None:
    """Finite and >= 0, checked on device: two scalars per leaf come to the host."""
    for path, f in jax.tree_util.tree_flatten_with_path(fisher)[0]:
        if (
            isinstance(f, jax.ShapeDtypeStruct)
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


def _paths(tree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_select.is_masked_node)[0]
    return [jax.tree_util.keystr(k) for k, _ in flat]


def _match(params, other, what: str, *, shapes: bool = True):
    """``other`` cut to the leaves ``params`` shows (``MaskedNode`` where params hides one).

    A ValueError naming the first path where the trees differ, or where a
    visible leaf differs in shape (``shapes=True``).
    """
    hide = _select.is_masked_node
    try:
        other = jax.tree.map(
            lambda p, o: optax.MaskedNode() if hide(p) else o,
            params,
            other,
            is_leaf=hide,
        )
    except (ValueError, TypeError):
        pass  # named below
    if jax.tree.structure(params, is_leaf=hide) != jax.tree.structure(
        other, is_leaf=hide
    ):
        p_paths, o_paths = _paths(params), _paths(other)
        missing = [k for k in p_paths if k not in set(o_paths)]
        extra = [k for k in o_paths if k not in set(p_paths)]
        if missing:
            why = f"{what} has no entry at params{missing[0]}"
        elif extra:
            why = f"{what} has an entry at {what}{extra[0]} that params lacks"
        else:
            why = f"{what} and params have the same paths in different containers"
        raise ValueError(f"{why}: the trees must match.")
    if shapes:
        for (path, x), y in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(other),
            strict=True,
        ):
            if np.shape(x) != np.shape(y):
                k = jax.tree_util.keystr(path)
                raise ValueError(
                    f"{what}{k} has shape {np.shape(y)}; params{k} has shape {np.shape(x)}."
                )
    return other


def _hide(params, mask):
    """``params`` with ``MaskedNode`` where ``mask`` (any flowjax selection) is False."""
    if mask is None:
        return params
    _select.check_selection(mask, "mask")
    keep = _select.mask_leaves(mask, params, what="mask")
    leaves, treedef = jax.tree.flatten(params, is_leaf=_select.is_masked_node)
    hidden = [x if k else optax.MaskedNode() for x, k in zip(leaves, keep, strict=True)]
    return jax.tree.unflatten(treedef, hidden)


def _anchor(params, anchor):
    """θ₀ for the state: a fresh copy of the given anchor, or of ``params``."""
    source = params if anchor is None else _match(params, anchor, "anchor")
    return jax.tree.map(_copy, source)


def _check_update(updates, anchor, params, fn: str) -> None:
    if params is None:
        raise ValueError(f"{fn} needs params: call tx.update(grads, state, params).")
    hide = _select.is_masked_node
    treedef = jax.tree.structure(params, is_leaf=hide)
    if jax.tree.structure(updates, is_leaf=hide) != treedef:
        _match(updates, params, "params")  # raises, naming the path
        raise ValueError("params do not match the updates' tree.")
    if jax.tree.structure(anchor, is_leaf=hide) != treedef:
        raise ValueError(
            "the optimiser state was initialised for a different parameter tree: "
            f"{jax.tree.structure(anchor, is_leaf=hide)} vs the parameters' {treedef}."
        )


def _check_float(params, fn: str) -> None:
    """A TypeError naming the leaves that are not floating point."""
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
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


def _copy(x):
    """A fresh buffer (or the same abstract leaf for a ``jax.ShapeDtypeStruct``)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jnp.array(x, copy=True)


def _zeros(x, dtype=None):
    dtype = x.dtype if dtype is None else dtype
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return jnp.zeros_like(x, dtype=dtype)


def _size(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _total(terms) -> Array:
    return sum(jax.tree.leaves(terms), start=jnp.zeros((), jnp.float32))


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
