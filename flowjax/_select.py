"""Selecting a subset of parameters: Flax NNX filters or boolean mask pytrees.

Every flowjax function that selects parameters (:func:`flowjax.train_only`,
:func:`flowjax.trainable_mask`, :func:`flowjax.swap_task_parts`, the ``mask=``
of :func:`flowjax.l2sp` / :func:`flowjax.ewc` /
:func:`flowjax.synaptic_intelligence` / :func:`flowjax.wise_ft`, and the
``select=`` of :func:`flowjax.add_lora`) takes one *selection*, in one of
three forms:

* **a Flax NNX filter, unchanged**, turned into a predicate ``(path, x) ->
  bool`` by ``flax.nnx.filterlib.to_predicate`` exactly as ``nnx.split`` does:
  a Variable type (``nnx.LoRAParam``, ``nnx.BatchStat``), ``nnx.PathContains``,
  ``nnx.PathIn``, ``nnx.OfType``, ``nnx.All`` / ``nnx.Any`` / ``nnx.Not``, your
  own ``(path, x) -> bool``, ``...`` or ``True`` (everything), ``False`` or
  ``None`` (nothing), a list or tuple of filters (any of them). A string is an
  NNX *tag*, as in NNX (select a path key with ``nnx.PathContains("head")``);
* **a boolean mask pytree** with the structure of the parameters or a prefix
  of it, as for ``optax.masked`` (leaves: Python, numpy or concrete 0-d bool
  arrays). A plain ``Mapping`` is matched key by key against any Mapping node
  of the params, so ``{"body": False, "head": True}`` works on an
  ``nnx.State``;
* **a function** ``params -> mask pytree`` (one positional argument), as for
  ``optax.masked``.

How a filter sees the parameters. In an ``nnx.State`` (from ``nnx.split`` or
``nnx.state``) the filter is called on each ``(path, variable)``, so path and
type filters both work. In a plain pytree of arrays (a dict, a Linen
``params`` tree, ``nnx.to_pure_dict``) there are no Variable types, only
paths: a filter that tests types or tags is a TypeError there rather than a
selection of nothing. Positions hidden by an enclosing ``optax.masked``
(``optax.MaskedNode``) are never selected.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from flax.nnx import filterlib

from flowjax import _checks

Path = tuple
Predicate = Callable[[Path, Any], bool]

_FILTER_HELP = (
    "a selection is an NNX filter (a Variable type such as nnx.LoRAParam, an NNX tag "
    "string, nnx.PathContains('head'), nnx.All/Any/Not(...), a predicate "
    "(path, x) -> bool, ..., True/False, or a list/tuple of those), a boolean mask "
    "pytree, or a function params -> mask pytree"
)


# ----------------------------------------------------------------------------- filters


def _is_bool(x) -> bool:
    return isinstance(x, (bool, np.bool_)) or (
        isinstance(x, (np.ndarray, jax.Array))
        and np.ndim(x) == 0
        and x.dtype == np.bool_
    )


def _positional_arity(fn) -> int | None:
    """Required positional parameters of ``fn`` (None when it cannot be inspected)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.kind in kinds and p.default is p.empty)


def is_mask_fn(select) -> bool:
    """A one-argument function ``params -> mask`` (optax's convention), not an NNX predicate."""
    return (
        callable(select)
        and not isinstance(select, type)
        and _positional_arity(select) == 1
    )


def is_filter(select) -> bool:
    """True for an NNX filter; False for a mask pytree or a ``params -> mask`` function."""
    if isinstance(select, (Mapping, nnx.State)) or is_mask_fn(select):
        return False
    if isinstance(select, (list, tuple)):
        leaves = jax.tree.leaves(select)
        return not (leaves and all(_is_bool(x) for x in leaves))
    return isinstance(select, bool) or not _is_bool(select)  # numpy/0-d bools: masks


def _check_filter(f, on: str) -> None:
    """A TypeError for anything ``to_predicate`` would not take as a filter."""
    if isinstance(f, (list, tuple)):
        if isinstance(f, tuple) and f and all(not isinstance(x, type) for x in f):
            bad = [x for x in f if not _is_filter_literal(x)]
            if bad:
                raise TypeError(
                    f"{f!r} is not an NNX filter: {bad[0]!r} is not a filter. In NNX a "
                    "tuple of filters means 'any of them', not a path prefix; select a "
                    f"path prefix with a predicate, e.g. lambda path, _: path[:{len(f)}] "
                    f"== {f!r}, or nnx.All(nnx.PathContains(...), ...). ({_FILTER_HELP}.)"
                )
        for x in f:
            _check_filter(x, on)
        return
    if not _is_filter_literal(f):
        raise TypeError(f"{f!r} is not an NNX filter; {_FILTER_HELP}.")
    if on == "leaf" and isinstance(f, type) and issubclass(f, nnx.Module):
        raise TypeError(
            f"{f.__name__} is a module type, but this selection is matched against "
            "state leaves (Variables), which never are modules. Select the module's "
            "paths instead, computed once from the model: "
            f"paths = [p for p, m in nnx.iter_modules(model) if isinstance(m, "
            f"nnx.{f.__name__})], then lambda path, _: any(path[:len(b)] == b for b in paths)."
        )


def _is_filter_literal(x) -> bool:
    return (
        isinstance(x, (type, str, bool, list, tuple))
        or x is Ellipsis
        or x is None
        or (callable(x) and not isinstance(x, (np.ndarray, jax.Array)))
    )


def predicate(select, *, on: str = "leaf") -> Predicate:
    """The NNX filter ``select`` as ``(path, x) -> bool``, via ``nnx.filterlib.to_predicate``.

    ``on`` is ``"leaf"`` (state leaves: Variables or arrays) or ``"module"``
    (layers of a model); module types cannot match state leaves and are
    rejected there with a hint.
    """
    _check_filter(select, on)
    return filterlib.to_predicate(select)


def _uses_types(pred) -> bool:
    """Does an NNX predicate test Variable types or tags (meaningless on plain arrays)?"""
    if isinstance(pred, (filterlib.OfType, filterlib.WithTag)):
        return True
    if isinstance(pred, (filterlib.All, filterlib.Any)):
        return any(_uses_types(p) for p in pred.predicates)
    if isinstance(pred, filterlib.Not):
        return _uses_types(pred.predicate)
    return False


# ----------------------------------------------------------------------------- pytrees


def _key(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    raise TypeError(f"unsupported pytree key {entry!r}.")  # pragma: no cover


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def is_masked_node(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _is_unit(x) -> bool:
    return is_variable(x) or is_masked_node(x)


def leaves_with_paths(tree) -> tuple[list[tuple[Path, Any]], Any]:
    """Flattens a pytree with Variables (and ``MaskedNode``) kept whole; plain key-tuple paths."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_unit)
    return [(tuple(_key(k) for k in kp), leaf) for kp, leaf in flat], treedef


def value_of(leaf):
    """The array inside a Variable (or the leaf itself)."""
    return leaf.get_value() if is_variable(leaf) else leaf


def check_not_module(tree, what: str, hint: str) -> None:
    if isinstance(tree, nnx.Module):
        raise TypeError(f"{what} must be a state or pytree, not an nnx.Module; {hint}")


def filter_units(select, params, *, what: str) -> tuple[list[bool], list, Any]:
    """One bool per unit of ``params`` (a Variable, an array or a MaskedNode) for a filter.

    Returns the bools, the ``(path, unit)`` pairs and the treedef with units as
    leaves. Raises TypeError for a type or tag filter on a pytree without
    Variables.
    """
    pred = predicate(select, on="leaf")
    flat, treedef = leaves_with_paths(params)
    has_vars = any(is_variable(u) for _, u in flat)
    if not has_vars and _uses_types(pred) and flat:
        raise TypeError(
            f"{what}={select!r} selects by Variable type or NNX tag, but the params are a "
            "plain pytree of arrays with no nnx.Variable leaves, so no type can match. "
            "Pass the nnx.State itself (from nnx.split(model, ...) or nnx.state(model, "
            "nnx.Param)), or select by path, e.g. nnx.PathContains('head')."
        )
    keep = [not is_masked_node(u) and bool(pred(path, u)) for path, u in flat]
    return keep, flat, treedef


# ----------------------------------------------------------------------------- boolean masks

_MASK_TYPE_HINT = (
    "leaves must be bools (Python, numpy or 0-d bool arrays), one per parameter leaf "
    "or subtree"
)


def resolve_mask(mask, params):
    """Calls a ``params -> mask`` function on ``params``; returns anything else unchanged."""
    return mask(params) if is_mask_fn(mask) else mask


def as_bool(m, what: str, where: str = "") -> bool:
    """A mask leaf as a Python bool; a TypeError naming its type otherwise."""
    if isinstance(m, (bool, np.bool_)):
        return bool(m)
    if _is_bool(m) and _checks.is_concrete(m):
        return bool(m)
    kind = type(m).__name__
    dtype = getattr(m, "dtype", None)
    if dtype is not None:
        kind = f"{kind} {np.shape(m)} {dtype}"
    at = f" at {what}{where}" if where else ""
    raise TypeError(f"{what} {_MASK_TYPE_HINT}; got {kind}{at}.")


def check_selection(select, what: str) -> None:
    """Eagerly checks a selection: a filter's form, or a static mask's leaves."""
    if is_mask_fn(select):
        return
    if is_filter(select):
        predicate(select, on="leaf")
        return
    flat = jax.tree_util.tree_flatten_with_path(select, is_leaf=lambda x: x is None)[0]
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
            " Build masks for an nnx.State with flowjax.trainable_mask(params, filter), "
            "or pass an NNX filter (e.g. nnx.PathContains('head')) directly."
        )
    return ValueError(
        f"{what} does not match the params (it must have their structure or a prefix "
        f"of it): {why} at {what}{where or ' (root)'}.{hint}"
    )


def mask_leaves(select, params, *, what: str = "mask") -> list[bool]:
    """One Python bool per array leaf of ``params`` (``optax.MaskedNode`` counted as one).

    ``select`` is None (every leaf), an NNX filter, a bool pytree with the
    structure of ``params`` or a prefix of it, or a function ``params ->
    mask``. Raises TypeError for a non-bool mask leaf or a type filter on plain
    arrays, and ValueError (naming the path) for a structure that is not a
    prefix of the params.
    """
    if select is None:
        flat = jax.tree.leaves(params, is_leaf=is_masked_node)
        return [not is_masked_node(x) for x in flat]
    if is_filter(select):
        keep, flat, _ = filter_units(select, params, what=what)
        out = []
        for k, (_, unit) in zip(keep, flat, strict=True):
            out.extend([k] * max(1, len(jax.tree.leaves(unit))))
        return out
    out: list[bool] = []
    _walk(resolve_mask(select, params), params, what, "", out, params)
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


def mask_tree(select, params, *, what: str = "mask"):
    """The selection as a bool pytree that optax accepts as a mask for ``params``.

    For a filter: a bool in place of each Variable (a prefix of ``params``);
    otherwise a bool per array leaf.
    """
    if select is not None and is_filter(select):
        keep, _, treedef = filter_units(select, params, what=what)
        return jax.tree.unflatten(treedef, keep)
    treedef = jax.tree.structure(params, is_leaf=is_masked_node)
    return jax.tree.unflatten(treedef, mask_leaves(select, params, what=what))
