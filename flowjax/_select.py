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

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

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
