"""Packaging: the distribution name, py.typed, and runtime dependencies = what flowjax/ imports."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Declared but not imported by flowjax/ (none since flowjax.train imports orbax-checkpoint).
DECLARED_AHEAD: set[str] = set()


def _name(requirement: str) -> str:
    return (
        re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    )


def _module_level_imports(path: Path) -> set[str]:
    """Top-level module names imported at module level (not inside functions) of one file."""
    names = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            f = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import) and not in_function:
                names.update(a.name.split(".")[0] for a in child.names)
            elif (
                isinstance(child, ast.ImportFrom)
                and not in_function
                and not child.level
            ):
                names.add(child.module.split(".")[0])
            visit(child, f)

    visit(ast.parse(path.read_text()), False)
    return names


def test_distribution_name_is_not_the_other_flowjax():
    # "flowjax" on PyPI is an unrelated normalizing-flows library; the import package stays flowjax.
    assert PYPROJECT["project"]["name"] == "flowjax-ft"
    assert PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == [
        "flowjax"
    ]
    for extra in PYPROJECT["project"]["optional-dependencies"]["dev"]:
        if extra.startswith("flowjax"):
            assert _name(extra) == "flowjax-ft", extra


def test_ships_py_typed():
    assert (ROOT / "flowjax" / "py.typed").is_file()
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]


def test_runtime_dependencies_are_what_the_library_imports():
    imported = set()
    for path in (ROOT / "flowjax").rglob("*.py"):
        imported |= _module_level_imports(path)
    third_party = imported - set(sys.stdlib_module_names) - {"flowjax", "__future__"}
    dists = importlib.metadata.packages_distributions()
    unknown = sorted(m for m in third_party if m not in dists)
    assert not unknown, (
        f"flowjax/ imports modules of no installed distribution: {unknown}"
    )
    needed = {d.lower() for m in third_party for d in dists[m]}
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert needed - declared == set(), "imported by flowjax/ but not declared"
    assert declared - needed == DECLARED_AHEAD, "declared but not imported by flowjax/"


def test_what_tests_and_experiments_need_is_in_the_extras_make_test_installs():
    extras = PYPROJECT["project"]["optional-dependencies"]
    installed = {_name(r) for r in extras["test"] + extras["experiments"]}
    # make test installs '.[test,experiments]'
    assert "'.[test,experiments]'" in (ROOT / "Makefile").read_text()
    for dist in (
        "pytest",
        "pytest-xdist",
        "chex",
        "scipy",
        "matplotlib",
        "scikit-learn",
        "tensorflow-datasets",
        "safetensors",  # tests/test_models_resnet.py writes and reads .safetensors
    ):
        assert dist in installed, dist


def test_one_version_source_and_a_changelog_entry_for_it():
    # hatch reads the version from flowjax/__init__.py; pyproject states none of its own.
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "flowjax/__init__.py"
    init = (ROOT / "flowjax" / "__init__.py").read_text()
    (version,) = re.findall(r'^__version__ = "([^"]+)"$', init, flags=re.M)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)} ", changelog, flags=re.M), version
