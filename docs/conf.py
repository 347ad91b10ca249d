"""Sphinx configuration of the flowjax docs (``make docs``)."""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import flowjax  # noqa: E402
from flowjax import _types  # noqa: E402

project = "flowjax"
author = "the flowjax authors"
copyright = "2026, the flowjax authors"
release = flowjax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "flowjax_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated/results/*.md", "README.md"]
root_doc = "index"

# Docstrings: Google style (napoleon), type hints in the signature.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False

# A dead reference to a flowjax name fails the build; names of other libraries
# (no network here, so no intersphinx inventories) and typing spellings are not links.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(jax|jaxlib|numpy|np|optax|flax|nnx|orbax|ocp|chex|tqdm|matplotlib|grain|tensorflow_datasets|tfds|collections|typing|types|os|pathlib|concurrent|dataclasses|enum|abc|contextlib|functools|json)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Any|Callable|Iterable|Iterator|Sequence|Mapping|NamedTuple|Literal|Optional|Union|Self|TypeVar|Protocol|PathLike|Path|ArrayLike|Array|PyTree|DTypeLike|ndarray|Mesh|NamedSharding|Sharding|Module|GradientTransformation|Filter|Figure|Axes|Optimizer|PRNGKeyArray|PartitionSpec|Device)",
    ),
    (
        r"py:.*",
        r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|None|type|callable|slice|complex|Ellipsis|NotImplemented|optional)",
    ),
    # Private modules and classes (a base class, a type alias of flowjax._types).
    (r"py:.*", r"flowjax(\.\w+)*\._\w+(\..*)?"),
    (r"py:.*", r"|".join(n for n in vars(_types) if n[0].isupper())),
]

# MyST: $…$ and $$…$$ maths, definition lists, ::: fences, heading anchors.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "sphinx_book_theme"
html_title = f"flowjax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_repository_button": False,
}
html_static_path: list[str] = []
