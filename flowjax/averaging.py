"""WiSE-FT (Wortsman et al., 2022): average the pre-trained and fine-tuned weights.

.. math:: \\theta(\\alpha) = \\alpha\\,\\theta_{\\text{pre}} + (1 - \\alpha)\\,\\theta_{\\text{ft}}

``alpha`` is the weight on the *pre-trained* model, as in the FLOW authors'
averaging script (``language/average_model_weights.py``: model 1 is the
pre-trained baseline, model 2 the fine-tuned run): ``alpha=0`` is the
fine-tuned model, ``alpha=1`` the pre-trained one, and the paper reports
``alpha=0.5``. FLOW composes with it: fine-tune with FLOW weights, then average.
Both endpoints are exact (bitwise), and parts with no pre-trained counterpart
(a new classification head) are kept from the fine-tuned model with ``mask``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from flowjax import _checks, _select
from flowjax._types import ArrayLike, Params, Selection

__all__ = ["WiseFTCurve", "wise_ft", "wise_ft_sweep"]

Mask = Selection | None
_DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


class WiseFTCurve(NamedTuple):
    """The result of :func:`wise_ft_sweep`: a metric for each mixing weight.

    Attributes:
      alphas: float64 ``[K]``, the weights on the pre-trained model, in the
        order evaluated.
      metrics: name -> float64 ``[K]``; a metric function returning one
        number is stored under ``"metric"``.
    """

    alphas: np.ndarray
    metrics: dict[str, np.ndarray]


def wise_ft(
    pretrained: Params,
    finetuned: Params,
    alpha: float | ArrayLike,
    *,
    mask: Mask = None,
) -> Params:
    """Interpolates weights leafwise: ``alpha * pretrained + (1 - alpha) * finetuned``.

    .. math:: \\theta_\\ell(\\alpha) = \\begin{cases}
        \\alpha\\,\\theta^{\\text{pre}}_\\ell + (1-\\alpha)\\,\\theta^{\\text{ft}}_\\ell
          & m_\\ell = \\text{True} \\\\
        \\theta^{\\text{ft}}_\\ell & m_\\ell = \\text{False} \\end{cases}

    ``alpha=1`` returns the pre-trained values and ``alpha=0`` the fine-tuned
    values bitwise (a ``jnp.where`` on the endpoints; the formula alone is not
    exact there in floating point, e.g. for -0.0 or inf). In between the
    average is computed in at least float32 and cast back. Every result leaf
    has the fine-tuned leaf's dtype. Non-float leaves (step counters, integer
    buffers) are not averaged: they must be equal in both trees and the
    fine-tuned value is kept (the check needs concrete values; under
    ``jax.jit`` it cannot run). RNG state is never averaged nor compared:
    PRNG-key leaves and the leaves of ``nnx.RngState`` variables (``RngKey``,
    ``RngCount``, whose counts differ after training) keep the fine-tuned
    value, so a full ``nnx.state(model)`` with RNG streams works. Works with
    any pytree: plain dicts, an ``nnx.State`` from ``nnx.split``, Linen
    variables.

    Args:
      pretrained: the pre-trained parameters θ_pre.
      finetuned: the fine-tuned parameters θ_ft, with the same tree structure.
      alpha: the weight on the pre-trained model, in [0, 1]; may be traced.
      mask: **True / matching = averaged**; the rest keep the fine-tuned
        value (task-specific parts such as a new head, which may have a
        different shape from the pre-trained one). Not the filter given to
        :func:`flowjax.train_only`, which matches the head. An NNX filter,
        unchanged (``nnx.Not(nnx.PathContains("head"))``; type filters need an
        ``nnx.State``), a bool pytree (Python, numpy or 0-d bool arrays) with
        the structure of ``finetuned`` or a prefix of it, e.g. ``{"backbone":
        True, "head": False}`` (a plain dict works on an ``nnx.State``), or a
        function ``mask(finetuned) -> bool pytree``, as in ``optax.masked``.
        Default (None): every leaf.

    Returns:
      A pytree with the structure of ``finetuned``.

    Raises:
      ValueError: trees of different structure, an averaged leaf whose shapes
        differ (the message names its path), a float leaf paired with a
        non-float one, unequal non-float leaves (RNG state excepted), a mask
        whose structure does not match, or a concrete ``alpha`` outside [0, 1].
      TypeError: a mask leaf that is not a bool.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> pre = {"w": jnp.array([1.0, 2.0]), "head": jnp.zeros((3,))}
      >>> ft = {"w": jnp.array([3.0, 6.0]), "head": jnp.ones((5,))}  # a new head
      >>> out = flowjax.wise_ft(pre, ft, 0.5, mask={"w": True, "head": False})
      >>> out["w"].tolist(), out["head"].shape
      ([2.0, 4.0], (5,))
    """
    _check_alpha(alpha)
    pre_leaves, ft_leaves, treedef, plan = _plan(pretrained, finetuned, mask)
    return jax.tree.unflatten(treedef, _mix(pre_leaves, ft_leaves, alpha, plan))


def wise_ft_sweep(
    pretrained: Params,
    finetuned: Params,
    metric_fn: Callable[[Params], float | Mapping[str, float]],
    alphas: Sequence[float] | ArrayLike = _DEFAULT_ALPHAS,
    *,
    mask: Mask = None,
    progress: bool = True,
) -> WiseFTCurve:
    """Evaluates ``metric_fn(wise_ft(pretrained, finetuned, alpha))`` over a grid of alphas.

    .. math:: \\alpha \\mapsto M\\big(\\alpha\\,\\theta_{\\text{pre}} + (1-\\alpha)\\,\\theta_{\\text{ft}}\\big)

    The WiSE-FT curve: one end is the fine-tuned model (``alpha=0``), the
    other the pre-trained one (``alpha=1``); a metric on the fine-tuning task
    and one on the pre-training data trace the forgetting trade-off. The
    interpolation is jitted once (``alpha`` is traced; both models are
    arguments, not constants) and validated once.

    Args:
      pretrained: the pre-trained parameters.
      finetuned: the fine-tuned parameters (same structure).
      metric_fn: ``metric_fn(params) -> number`` or ``-> {name: number}``;
        every call must return the same names. It runs on the host, outside
        jit (jit it yourself if it is heavy).
      alphas: the weights on the pre-trained model, each in [0, 1]. Default
        0.0, 0.1, ..., 1.0.
      mask: as in :func:`wise_ft`.
      progress: show a tqdm progress bar.

    Returns:
      A :class:`WiseFTCurve` (numpy ``alphas`` and ``metrics``).

    Raises:
      TypeError: as in :func:`wise_ft`.
      ValueError: empty or out-of-range ``alphas``, the errors of
        :func:`wise_ft`, or a metric that is not one finite-or-NaN number or
        whose names change between calls.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> curve = flowjax.wise_ft_sweep(jnp.zeros(2), jnp.ones(2), lambda p: float(p.sum()),
      ...                               alphas=[0.0, 0.5, 1.0], progress=False)
      >>> curve.alphas.tolist(), curve.metrics["metric"].tolist()
      ([0.0, 0.5, 1.0], [2.0, 1.0, 0.0])
    """
    grid = np.asarray(alphas, np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(
            f"alphas must be a non-empty 1-D sequence; got shape {grid.shape}."
        )
    for a in grid:
        _check_alpha(float(a))
    pre_leaves, ft_leaves, treedef, plan = _plan(pretrained, finetuned, mask)
    mix = jax.jit(
        lambda pre, ft, a: jax.tree.unflatten(treedef, _mix(pre, ft, a, plan))
    )
    names: list[str] | None = None
    values: list[list[float]] = []
    for a in tqdm(grid, desc="WiSE-FT sweep", disable=not progress):
        result = metric_fn(mix(pre_leaves, ft_leaves, jnp.float32(a)))
        row = dict(result) if isinstance(result, Mapping) else {"metric": result}
        if names is None:
            names = list(row)
        elif list(row) != names:
            raise ValueError(
                f"metric_fn returned names {list(row)} at alpha={a}; earlier {names}."
            )
        values.append([_as_number(v, k) for k, v in row.items()])
    table = np.asarray(values, np.float64)
    return WiseFTCurve(grid, {k: table[:, j] for j, k in enumerate(names)})


def _check_alpha(alpha) -> None:
    if not _checks.is_concrete(alpha):
        return
    a = np.asarray(alpha)
    if a.ndim != 0:
        raise ValueError(f"alpha must be a scalar; got shape {a.shape}.")
    if not (np.isfinite(a) and 0 <= a <= 1):
        raise ValueError(
            f"alpha must be in [0, 1] (the weight on the pre-trained model); got {float(a)}."
        )


def _as_number(v, name: str) -> float:
    arr = np.asarray(v)
    if arr.ndim != 0 or not jnp.issubdtype(arr.dtype, jnp.number):
        raise ValueError(
            f"metric {name!r} must be one number; got {type(v).__name__} of shape {arr.shape}."
        )
    return float(arr)


def _plan(pretrained, finetuned, mask):
    """Validates the pair once; returns flat leaves, the treedef and per-leaf actions."""
    ft_flat, treedef = jax.tree_util.tree_flatten_with_path(finetuned)
    pre_flat, pre_treedef = jax.tree_util.tree_flatten_with_path(pretrained)
    if pre_treedef != treedef:
        ft_paths = {jax.tree_util.keystr(p) for p, _ in ft_flat}
        pre_paths = {jax.tree_util.keystr(p) for p, _ in pre_flat}
        only_ft, only_pre = sorted(ft_paths - pre_paths), sorted(pre_paths - ft_paths)
        raise ValueError(
            "pretrained and finetuned have different tree structures "
            f"(only in finetuned: {only_ft[:5]}; only in pretrained: {only_pre[:5]}). "
            "Give both the same structure; leaves with no pre-trained counterpart can be "
            "excluded with mask=..., but need a placeholder of any shape in pretrained."
        )
    masks = _select.mask_leaves(mask, finetuned, what="mask")
    rngs = _rng_leaves(finetuned)
    plan = []
    for (path, f), (_, p), m, rng in zip(ft_flat, pre_flat, masks, rngs, strict=True):
        name = jax.tree_util.keystr(path)
        if not m or rng:  # RNG state: the fine-tuned stream, never averaged or compared
            plan.append("keep")
            continue
        if jnp.shape(p) != jnp.shape(f):
            raise ValueError(
                f"leaf {name} has shape {jnp.shape(p)} in pretrained and {jnp.shape(f)} in "
                "finetuned: exclude task-specific parts (e.g. a new head) with mask=..."
            )
        p_float = jnp.issubdtype(jnp.result_type(p), jnp.inexact)
        f_float = jnp.issubdtype(jnp.result_type(f), jnp.inexact)
        if p_float != f_float:
            raise ValueError(
                f"leaf {name} is {jnp.result_type(p)} in pretrained and {jnp.result_type(f)} "
                "in finetuned: a float leaf cannot be averaged with a non-float one."
            )
        if not f_float:
            if (
                _checks.is_concrete(p)
                and _checks.is_concrete(f)
                and not np.array_equal(np.asarray(p), np.asarray(f))
            ):
                raise ValueError(
                    f"non-float leaf {name} differs between pretrained and finetuned; integer "
                    "leaves are not averaged (exclude it with mask=... to keep the fine-tuned one)."
                )
            plan.append("keep")
            continue
        plan.append("mix")
    return [p for _, p in pre_flat], [f for _, f in ft_flat], treedef, tuple(plan)


def _rng_leaves(finetuned) -> list[bool]:
    """Per array leaf: does it belong to an RNG stream (a PRNG key, or an nnx.RngState)?"""
    out = []
    for v in jax.tree.leaves(finetuned, is_leaf=_select.is_variable):
        is_rng = isinstance(v, nnx.RngState)
        for x in jax.tree.leaves(v):
            dtype = getattr(x, "dtype", None)
            out.append(
                is_rng
                or (
                    dtype is not None
                    and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                )
            )
    return out


def _mix(pre_leaves, ft_leaves, alpha, plan):
    out = []
    for p, f, action in zip(pre_leaves, ft_leaves, plan, strict=True):
        if action == "keep":
            out.append(f)
            continue
        f = jnp.asarray(f)
        dtype = jnp.promote_types(
            jnp.promote_types(f.dtype, jnp.result_type(p)), jnp.float32
        )
        a = jnp.asarray(alpha, dtype)
        pc, fc = jnp.asarray(p, dtype), f.astype(dtype)
        mixed = jnp.where(a == 1, pc, jnp.where(a == 0, fc, a * pc + (1 - a) * fc))
        out.append(mixed.astype(f.dtype))
    return out
