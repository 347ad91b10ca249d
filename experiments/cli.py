"""Command-line config handling shared by the experiment drivers: ``--quick`` and ``--set``.

Every driver takes its config from its experiment's ``get_config(quick)`` and then applies
``--set name=value`` assignments (values are Python literals: ``--set lora_rank=8``,
``--set "lr_grid=(0.01, 0.1)"``; a nested dataclass field is ``--set pretrain.steps=50``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any


def add_config_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """Adds ``--quick`` and ``--set NAME=VALUE`` (repeatable) to ``parser``."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one config field (a Python literal); repeatable",
    )


def override(cfg: Any, assignments: list[str]) -> Any:
    """``cfg`` (a frozen dataclass) with ``name=value`` assignments applied.

    Values are parsed with :func:`ast.literal_eval`; lists become tuples (configs hold tuples);
    a field holding a string also takes unquoted text (``--set data_dir=/abs/cifar10``).
    ``a.b=value`` sets field ``b`` of the dataclass in field ``a``.

    Raises:
      ValueError: an assignment is not ``name=value``, names no field, or its value does not
        parse.

    Example:
      >>> @dataclasses.dataclass(frozen=True)
      ... class C:
      ...     seeds: int = 10
      ...     grid: tuple = (1,)
      >>> override(C(), ["seeds=2", "grid=[0.1, 1]"])
      C(seeds=2, grid=(0.1, 1))
    """
    for a in assignments:
        name, eq, text = a.partition("=")
        if not eq:
            raise ValueError(f"--set {a!r}: expected NAME=VALUE.")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError) as e:
            value = _Raw(text.strip(), e)  # a plain string field takes it unquoted
        cfg = _set(cfg, name.strip().split("."), value, a)
    return cfg


class _Raw(str):
    """Unparsed ``--set`` text: accepted (as the string) only by a field holding a string."""

    def __new__(cls, text: str, error: Exception):
        self = super().__new__(cls, text)
        self.error = error
        return self


def _set(cfg: Any, path: list[str], value: Any, assignment: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cfg)}
    if path[0] not in fields:
        raise ValueError(
            f"--set {assignment!r}: {type(cfg).__name__} has no field {path[0]!r}; "
            f"fields: {sorted(fields)}."
        )
    if len(path) > 1:
        inner = getattr(cfg, path[0])
        if not dataclasses.is_dataclass(inner):
            raise ValueError(
                f"--set {assignment!r}: {path[0]!r} is not a nested config."
            )
        value = _set(inner, path[1:], value, assignment)
    elif isinstance(value, _Raw):
        if not isinstance(getattr(cfg, path[0]), str):
            raise ValueError(
                f"--set {assignment!r}: cannot parse {str(value)!r} ({value.error})."
            )
        value = str(value)  # a path or a name, unquoted
    elif isinstance(value, list):
        value = tuple(value)
    return dataclasses.replace(cfg, **{path[0]: value})


def with_dependencies(names, known, needs) -> list[str]:
    """``names`` and, recursively, the methods they need, in the order of ``known``.

    ``needs(name)`` gives the names a method builds on (its LR or its model).

    Raises:
      ValueError: a name not in ``known`` (the unknown ones and the known ones listed).

    Example:
      >>> with_dependencies(["C"], ["A", "B", "C"], {"C": ("A",)}.get)
      ['A', 'C']
    """
    known = list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {known}.")
    need, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(needs(n) or ())
    return [n for n in known if n in need]


def load_config(path, cls: type) -> Any:
    """``get_config()`` of the big_vision-style config file ``path``, checked to be a ``cls``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file defines no ``get_config()``, or it returns something else.
    """
    import importlib.util
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}.")
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config().")
    cfg = module.get_config()
    if not isinstance(cfg, cls):
        raise ValueError(
            f"{path}: get_config() returned {type(cfg).__name__}, not a {cls.__name__}."
        )
    return cfg


def config_command(description: str, load, argv=None):
    """``--config FILE --workdir DIR --set FIELD=VALUE``: ``(parser, config, workdir)``.

    ``load(path)`` reads the config file; the ``--set`` overrides are applied
    (:func:`override`); the workdir is made absolute. A bad file or override is a
    usage error (``parser.error``).
    """
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", required=True, help="a config file defining get_config()"
    )
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE"
    )
    args = parser.parse_args(argv)
    try:
        cfg = override(load(args.config), args.overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return parser, cfg, args.workdir.resolve()
