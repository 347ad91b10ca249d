"""Selecting parts of an NNX model or state by path, shared by lora.py and freezing.py.

A *selector* picks layers (in :func:`flowjax.add_lora`) or state leaves (in
:func:`flowjax.trainable_mask`, :func:`flowjax.swap_task_parts`). It is evaluated
once, outside the training loop, on ``(path, x)`` pairs, where ``path`` is the
NNX path tuple (``("layers", 0, "attn", "q_proj")``) and ``x`` is the module or
the :class:`flax.nnx.Variable` (an array for plain pytrees). Accepted forms:

* ``str``: the path contains that key, e.g. ``"head"`` (as ``nnx.PathContains``;
  note that a bare string filter in ``nnx.split`` means a *tag* instead);
* ``tuple`` *inside* a list/tuple of selectors: a path prefix, e.g.
  ``[("layers", 0)]`` (everything under ``layers[0]``);
* a type: ``isinstance(x, type)``, e.g. ``nnx.BatchStat``, ``nnx.LoRAParam``;
* a callable ``(path, x) -> bool``: any NNX filter predicate (``nnx.PathContains``,
  ``nnx.OfType``, ``nnx.All``, ``nnx.Not`` ...) or your own function;
* a list or tuple of the above: any of them matches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from flowjax import _checks

Path = tuple
Predicate = Callable[[Path, Any], bool]


def _prefix(prefix: tuple) -> Predicate:
    n = len(prefix)
    return lambda path, _x: tuple(path[:n]) == prefix


def to_predicate(select, *, on: str) -> Predicate:
    """Turns a selector (see module doc) into ``(path, x) -> bool``.

    ``on`` is ``"module"`` (selecting layers) or ``"leaf"`` (selecting state
    leaves); module types cannot match state leaves, so they are rejected there.
    """
    if isinstance(select, str):
        return lambda path, _x: select in path
    if isinstance(select, type):
        if on == "leaf" and issubclass(select, nnx.Module):
            raise TypeError(
                f"{select.__name__} is a module type, but this selector is matched against "
                "state leaves (Variables), which never are modules. Select the module's "
                "paths instead, computed once from the model: "
                f"[p for p, m in nnx.iter_modules(model) if isinstance(m, nnx.{select.__name__})]."
            )
        return lambda _path, x: isinstance(x, select)
    if isinstance(select, (list, tuple)):
        if not select:
            raise ValueError("an empty list of selectors selects nothing.")
        preds = []
        for s in select:
            if isinstance(s, tuple):
                preds.append(_prefix(s))
            elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                raise TypeError(
                    f"a bare integer {s!r} in a list of selectors is ambiguous; to select a "
                    f"path prefix, nest it in a tuple, e.g. [('layers', {s})]."
                )
            else:
                preds.append(to_predicate(s, on=on))
        return lambda path, x: any(p(path, x) for p in preds)
    if callable(select):
        return select
    raise TypeError(
        "a selector must be a str (path key), a type, a callable (path, x) -> bool, or a "
        f"list/tuple of those (a nested tuple is a path prefix); got {type(select).__name__}."
    )


def _key(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    raise TypeError(f"unsupported pytree key {entry!r}.")  # pragma: no cover


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def leaves_with_paths(tree) -> tuple[list[tuple[Path, Any]], Any]:
    """Flattens a pytree with NNX Variables kept whole; paths are plain key tuples."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
    return [(tuple(_key(k) for k in kp), leaf) for kp, leaf in flat], treedef


def value_of(leaf):
    """The array inside a Variable (or the leaf itself)."""
    return leaf.get_value() if is_variable(leaf) else leaf


def check_not_module(tree, what: str, hint: str) -> None:
    if isinstance(tree, nnx.Module):
        raise TypeError(f"{what} must be a state or pytree, not an nnx.Module; {hint}")


# ----------------------------------------------------------------------------- boolean masks
#
# One mask convention for freeze, l2sp / ewc / synaptic_intelligence, wise_ft and
# swap_task_parts: a pytree with the structure of the params or a prefix of it, whose
# leaves are bools (Python, numpy, or concrete 0-d bool arrays), or a callable
# ``params -> such a pytree``. A plain Mapping is matched key by key against any
# Mapping node of the params (so ``{"body": False, "head": True}`` works on an
# ``nnx.State``). Params may hold ``optax.MaskedNode`` (inside ``optax.masked``):
# those positions count as one leaf each and are always False.

_MASK_TYPE_HINT = (
    "leaves must be bools (Python, numpy or 0-d bool arrays), one per parameter leaf "
    "or subtree"
)


def is_masked_node(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def resolve_mask(mask, params):
    """Calls a callable mask on ``params``; returns anything else unchanged."""
    if callable(mask) and not isinstance(mask, Mapping):
        return mask(params)
    return mask


def as_bool(m, what: str, where: str = "") -> bool:
    """A mask leaf as a Python bool; a TypeError naming its type otherwise."""
    if isinstance(m, (bool, np.bool_)):
        return bool(m)
    dtype = getattr(m, "dtype", None)
    if (
        isinstance(m, (np.ndarray, jax.Array))
        and np.ndim(m) == 0
        and dtype == np.bool_
        and _checks.is_concrete(m)
    ):
        return bool(m)
    kind = type(m).__name__
    if dtype is not None:
        kind = f"{kind} {np.shape(m)} {dtype}"
    at = f" at {what}{where}" if where else ""
    raise TypeError(f"{what} {_MASK_TYPE_HINT}; got {kind}{at}.")


def check_mask_leaves(mask, what: str) -> None:
    """Eagerly checks the leaves of a static (non-callable) mask."""
    if mask is None or (callable(mask) and not isinstance(mask, Mapping)):
        return
    flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=lambda x: x is None)[0]
    for path, m in flat:
        as_bool(m, what, jax.tree_util.keystr(path))


def _children(node):
    """Immediate children of a pytree node, with their keys, and the one-level treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda y: y is not node
    )
    return [(kp[0], c) for kp, c in flat], treedef


def _is_tree_leaf(x) -> bool:
    return x is not None and jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def _mismatch(what: str, where: str, why: str, params) -> ValueError:
    hint = ""
    if isinstance(params, nnx.State):
        hint = (
            " Build masks for an nnx.State with flowjax.trainable_mask(params, select)."
        )
    return ValueError(
        f"{what} does not match the params (it must have their structure or a prefix "
        f"of it): {why} at {what}{where or ' (root)'}.{hint}"
    )


def mask_leaves(mask, params, *, what: str = "mask") -> list[bool]:
    """One Python bool per leaf of ``params`` (``optax.MaskedNode`` counted as a leaf).

    ``mask`` is None (every leaf), a bool pytree with the
    structure of ``params`` or a prefix of it, or a callable ``params -> mask``.
    Raises TypeError for a non-bool mask leaf and ValueError (naming the path)
    for a structure that is not a prefix of the params.
    """
    if mask is None:
        flat = jax.tree.leaves(params, is_leaf=is_masked_node)
        return [not is_masked_node(x) for x in flat]
    out: list[bool] = []
    _walk(resolve_mask(mask, params), params, what, "", out, params)
    return out


def _walk(m, p, what, where, out, root) -> None:
    if is_masked_node(p):  # hidden by an enclosing optax.masked: never selected
        out.append(False)
        return
    if m is None or _is_tree_leaf(m):
        keep = as_bool(m, what, where)
        for x in jax.tree.leaves(p, is_leaf=is_masked_node):
            out.append(keep and not is_masked_node(x))
        return
    if _is_tree_leaf(p) or p is None:
        raise _mismatch(
            what, where, f"a subtree ({type(m).__name__}) where params has a leaf", root
        )
    m_kids, m_def = _children(m)
    p_kids, p_def = _children(p)
    if m_def != p_def:
        if isinstance(m, Mapping) and isinstance(p, Mapping):
            p_keys = [_key(k) for k, _ in p_kids]
            missing = [k for k in p_keys if k not in m]
            extra = [k for k in m if k not in set(p_keys)]
            if missing or extra:
                why = (
                    f"keys {sorted(extra, key=str)} are not in the params"
                    if extra
                    else ""
                )
                if missing:
                    why += (
                        "; " if why else ""
                    ) + f"keys {sorted(missing, key=str)} are missing"
                raise _mismatch(what, where, why, root)
            m_kids = [(k, m[_key(k)]) for k, _ in p_kids]
        else:
            raise _mismatch(
                what,
                where,
                f"a {type(m).__name__} where params has a {type(p).__name__} "
                f"({m_def} vs {p_def})",
                root,
            )
    for (k, mc), (_, pc) in zip(m_kids, p_kids, strict=True):
        _walk(mc, pc, what, where + jax.tree_util.keystr((k,)), out, root)


def mask_tree(mask, params, *, what: str = "mask"):
    """The mask broadcast to the full structure of ``params`` (a bool per leaf)."""
    treedef = jax.tree.structure(params, is_leaf=is_masked_node)
    return jax.tree.unflatten(treedef, mask_leaves(mask, params, what=what))
