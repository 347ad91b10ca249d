"""The public surface: everything in flowjax.__all__ exists and is documented as the house style asks."""

from __future__ import annotations

import inspect

import pytest

import flowjax


def test_all_is_sorted_complete_and_importable():
    assert flowjax.__all__ == sorted(flowjax.__all__)
    public = {
        n
        for n, v in vars(flowjax).items()
        if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
    }
    assert public == set(flowjax.__all__)


@pytest.mark.parametrize("name", flowjax.__all__)
def test_public_functions_have_maths_args_returns_and_examples(name):
    obj = getattr(flowjax, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    if inspect.isfunction(obj) and name != "default_mesh":
        for section in ("Args:", "Returns:", "Raises:", "Example:"):
            assert section in doc, f"{name} docstring lacks {section}"
