"""Sphinx extension of the flowjax docs: pages generated at build time.

Two generators run when the builder starts (``builder-inited``), into
``docs/api/`` and ``docs/_generated/`` (git-ignored, rewritten on every build):

* **The API reference** (:func:`api_pages`): one page for the core and one per
  namespace, each listing every name of the namespace's ``__all__`` (a summary
  table, then the entry), so that a name added to ``__all__`` gets an entry
  without touching the docs. The namespaces are the modules named in
  ``flowjax.__all__``, in its (layered) order, then :mod:`flowjax.theory`.
* **The experiment results** (:func:`results_pages`): for each directory under
  ``results/``, its report (``results.md`` or ``summary.md``, headings moved
  two levels down) or, for the benchmarks, tables rendered from the JSON
  files, then a figure for every PNG in it. The experiment pages include
  them under a second-level heading (the report's title becomes a third-level
  one); a results directory that no page includes is a build warning (an
  error under ``-W``).

A reference to a flat name (``flowjax.l2sp``, or ``l2sp`` from another
module's docstring) resolves to the namespace entry of the same object
(:func:`resolve_alias`), so docstrings keep their short references while a
dead one still fails the build. Once every page is read, every public name is
checked to have an entry (:func:`missing_entries`).

The page generators import only flowjax and the standard library, so the
test suite runs them without Sphinx (``tests/test_docs.py``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import pathlib
import shutil
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GENERATED = DOCS / "_generated"
API = DOCS / "api"
# Namespaces documented although not in flowjax.__all__ (imported on their own).
EXTRA_NAMESPACES = ("theory", "datasets", "models", "evaluation")


# -- the API reference ------------------------------------------------------------------


def namespaces() -> list[tuple[str, list[str]]]:
    """``(module name, public names)`` in the order of the reference.

    The core (``flowjax``: its names not re-exported from a namespace) comes
    first, then each namespace module of ``flowjax.__all__``, then the extra
    namespaces (:data:`EXTRA_NAMESPACES`).
    """
    flowjax = importlib.import_module("flowjax")
    mods = [
        n for n in flowjax.__all__ if isinstance(getattr(flowjax, n), types.ModuleType)
    ]
    mods += [n for n in EXTRA_NAMESPACES if n not in mods]
    out: list[tuple[str, list[str]]] = []
    spread: set[str] = set()
    for name in mods:
        module = importlib.import_module(f"flowjax.{name}")
        out.append((module.__name__, list(module.__all__)))
        spread.update(module.__all__)
    core = [
        n
        for n in flowjax.__all__
        if n not in spread and not isinstance(getattr(flowjax, n), types.ModuleType)
    ]
    return [("flowjax", core), *out]


def _kind(obj: object) -> str:
    if isinstance(obj, type):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def _entry(name: str, obj: object) -> list[str]:
    kind = _kind(obj)
    lines = [f".. auto{kind}:: {name}"]
    if kind == "class":
        lines.append("   :members:")
        if any(
            b.__name__.startswith("_") and b.__module__.startswith("flowjax")
            for b in obj.__mro__[1:]
        ):
            # Methods of a private flowjax base (the id-keyed tables' lookup, save).
            # (An NNX module's own methods, sow, perturb, ..., belong to Flax's docs.)
            lines.append("   :inherited-members: object, tuple, dict, Module, Pytree")
        if issubclass(obj, tuple) and hasattr(obj, "_fields"):
            # NamedTuple fields: documented in the class docstring's Attributes.
            lines.append(f"   :exclude-members: {', '.join(obj._fields)}, count, index")
    return [*lines, ""]


def api_page(module_name: str, names: list[str]) -> str:
    """The reST page of one namespace: its docstring, a summary table, the entries."""
    module = importlib.import_module(module_name)
    title = (
        "The core: ``flowjax``" if module_name == "flowjax" else f"``{module_name}``"
    )
    lines = [title, "=" * len(title), ""]
    if module_name == "flowjax":
        lines += [".. currentmodule:: flowjax", ""]
        lines += [
            "The names of the top level that belong to no namespace: the pre-pass,",
            "the tables, the weights and the objectives. Every namespace's names are",
            "also available flat (``flowjax.<name>``); they are documented under",
            "their namespace.",
            "",
        ]
    else:
        lines += [f".. automodule:: {module_name}", "   :no-members:", ""]
        lines += [f".. currentmodule:: {module_name}", ""]
    lines += [".. autosummary::", "   :nosignatures:", ""]
    lines += [f"   {n}" for n in names]
    lines.append("")
    for n in names:
        lines += _entry(n, getattr(module, n))
    return "\n".join(lines)


def api_pages(api: pathlib.Path) -> list[str]:
    """Write ``api/*.rst`` (one page per namespace plus an index); return the pages."""
    shutil.rmtree(api, ignore_errors=True)
    api.mkdir(parents=True)
    docnames = []
    for module_name, names in namespaces():
        stem = module_name
        (api / f"{stem}.rst").write_text(api_page(module_name, names))
        docnames.append(stem)
    title = "API reference"
    index = [title, "=" * len(title), ""]
    index += [
        "Every public name, grouped as the public surface is layered: the core",
        "first, then the namespaces in the order of ``flowjax.__all__``, then",
        "the theory. These pages are generated from each namespace's",
        "``__all__`` when the docs are built.",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
    ]
    index += [f"   {d}" for d in docnames]
    (api / "index.rst").write_text("\n".join(index) + "\n")
    return docnames


def documented_names() -> dict[str, str]:
    """Every public name (flat and namespaced spellings) -> the entry documenting it."""
    out = {}
    for module_name, names in namespaces():
        for n in names:
            full = f"{module_name}.{n}"
            out[full] = full
            out.setdefault(f"flowjax.{n}", full)
    return out


def missing_entries(objects: set[str]) -> list[str]:
    """The public names whose entry is not among ``objects`` (the py domain's names)."""
    return sorted(
        full for full in set(documented_names().values()) if full not in objects
    )


# -- the experiment results -------------------------------------------------------------

# Reports written by the experiments, in the order they are looked for.
REPORTS = ("results.md", "summary.md", "suite.md")


def _shift_headings(markdown: str, by: int = 1) -> str:
    out, fence = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("#"):
            line = "#" * by + line
        out.append(line)
    return "\n".join(out)


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _prepass_benchmark(data: dict) -> str:
    rows = [
        [
            r["model"],
            f"{r['examples']:,}",
            f"{r['plain_examples_per_s']:,.0f}",
            f"{r['prepass_examples_per_s']:,.0f}",
            f"**{r['ratio']:.3f}**",
            f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}",
            f"{r['plain_first_call_s']:.2f} / {r['prepass_first_call_s']:.2f}",
        ]
        for r in data["rows"]
    ]
    header = (
        "model|examples|plain jit, ex/s|`per_example_losses`, ex/s|"
        f"ratio (goal ≥ {data['goal_ratio']})|ratio range over rounds|"
        "first call s (plain / pre-pass)"
    ).split("|")
    diff = max(r["max_abs_loss_diff"] for r in data["rows"])
    where = (
        f"jax {data['jax']}, backend {data['backend']}, {data['cpu_count']} CPU "
        f"core(s), {data['machine']}; batch size {data['rows'][0]['batch_size']}, "
        f"{data['rows'][0]['repeats']} alternating rounds; largest difference "
        f"between the two paths' losses: {diff:g}."
    )
    return where + "\n\n" + _table(header, rows, "lrrrrll")


def _chunked_ce_benchmark(data: dict) -> str:
    c = data["config"]
    rows = [
        [
            f"{r['V']:,}",
            "forward" if r["pass"] == "fwd" else "forward + backward",
            f"{r['plain_temp_mib']:,.1f} MiB",
            f"{r['chunked_temp_mib']:,.1f} MiB",
            f"{r['plain_ms']:,.0f}",
            f"{r['chunked_ms']:,.0f}",
        ]
        for r in data["rows"]
    ]
    header = "vocabulary|pass|plain scratch|chunked scratch|plain ms|chunked ms".split(
        "|"
    )
    where = (
        f"{c['tokens']} tokens, hidden size {c['hidden']}, chunk {c['chunk']}, "
        f"median of {c['repeats']}; jax {c['jax']}, backend {c['backend']}, "
        f"{c['cpus']} CPU core(s)."
    )
    return where + "\n\n" + _table(header, rows, "rlrrrr")


# JSON results rendered as tables: file name -> (title, renderer).
JSON_TABLES = {
    "prepass.json": ("The pre-pass against a plain jitted forward", _prepass_benchmark),
    "chunked_ce.json": (
        "Chunked cross-entropy: memory and time",
        _chunked_ce_benchmark,
    ),
}


def results_page(
    directory: pathlib.Path, figures_dir: pathlib.Path, docs: pathlib.Path = DOCS
) -> str:
    """Markdown for one results directory: its report or JSON tables, then its figures.

    The PNGs are copied into ``figures_dir`` (inside the docs source ``docs``) and shown
    with their file name as caption.

    Raises:
      ValueError: if the directory holds neither a report nor a known JSON file.
    """
    parts = [f"<!-- Generated from results/{directory.name}/ at build time. -->", ""]
    report = next((directory / r for r in REPORTS if (directory / r).is_file()), None)
    tables = [p for p in sorted(directory.glob("*.json")) if p.name in JSON_TABLES]
    if report is not None:
        parts.append(_shift_headings(report.read_text(), by=2))
    elif tables:
        for path in tables:
            title, render = JSON_TABLES[path.name]
            parts += [
                f"### {title}",
                "",
                f"From `results/{directory.name}/{path.name}`:",
                "",
            ]
            parts += [render(json.loads(path.read_text())), ""]
    else:
        raise ValueError(
            f"results/{directory.name}/ has no report ({', '.join(REPORTS)}) "
            f"and no JSON file the docs can render ({', '.join(JSON_TABLES)})"
        )
    pngs = sorted(directory.glob("*.png"))
    if pngs:
        figures_dir.mkdir(parents=True, exist_ok=True)
        parts += ["", "### Figures", ""]
    for png in pngs:
        shutil.copy2(png, figures_dir / png.name)
        rel = figures_dir.relative_to(docs).as_posix()
        parts += [
            f"```{{figure}} /{rel}/{png.name}",
            f":alt: results/{directory.name}/{png.name}",
            "",
            f"`results/{directory.name}/{png.name}`",
            "```",
            "",
        ]
    return "\n".join(parts) + "\n"


def results_pages(
    results: pathlib.Path, out: pathlib.Path, docs: pathlib.Path = DOCS
) -> list[str]:
    """Write ``out/results/<name>.md`` for every directory of ``results``; return the names.

    ``out`` lies inside ``docs``, the docs source (figure paths are relative to it).
    """
    dest = out / "results"
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for directory in sorted(p for p in results.iterdir() if p.is_dir()):
        page = results_page(directory, dest / directory.name, docs)
        (dest / f"{directory.name}.md").write_text(page)
        names.append(directory.name)
    return names


def generate(
    out: pathlib.Path = GENERATED, api: pathlib.Path = API
) -> dict[str, list[str]]:
    """Regenerate every generated page: the results under ``out``, the reference in ``api``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return {"api": api_pages(api), "results": results_pages(ROOT / "results", out)}


# -- Sphinx hooks ---------------------------------------------------------------------


def _builder_inited(app) -> None:
    app.env.flowjax_results = generate()["results"]


def _included_results(app) -> set[str]:
    found = set()
    for path in DOCS.rglob("*.md"):
        if GENERATED in path.parents or "_build" in path.parts:
            continue
        text = path.read_text()
        for name in app.env.flowjax_results:
            if f"_generated/results/{name}.md" in text:
                found.add(name)
    return found


def resolve_alias(app, env, node, contnode):
    """``missing-reference``: a flat or short name of a documented object -> its entry."""
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode

    target = node["reftarget"].lstrip(".~")
    module = node.get("py:module") or ""
    names = documented_names()
    objects = env.get_domain("py").objects
    flowjax = importlib.import_module("flowjax")
    for cand in (target, f"flowjax.{target}", f"{module}.{target}"):
        full = names.get(cand)
        if full is None and cand.startswith("flowjax."):
            # A name of a documented class (flowjax.LossTable.save) or module.
            head, _, tail = cand.rpartition(".")
            base = names.get(head)
            if base is not None and f"{base}.{tail}" in objects:
                full = f"{base}.{tail}"
            elif cand in objects:
                full = cand
        if full is None and "." not in target and hasattr(flowjax, target):
            full = names.get(f"flowjax.{target}")
        if full is not None and full in objects:
            entry = objects[full]
            return make_refnode(
                app.builder,
                node["refdoc"],
                entry.docname,
                entry.node_id,
                contnode,
                full,
            )
    return None


def _check(app, env) -> None:
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    missing = missing_entries(set(env.get_domain("py").objects))
    if missing:
        log.warning("public names without an API entry: %s", ", ".join(missing))
    orphans = sorted(set(app.env.flowjax_results) - _included_results(app))
    if orphans:
        log.warning(
            "results directories no docs page includes: %s (add an experiment page)",
            ", ".join(f"results/{o}/" for o in orphans),
        )


def _no_builtin_type_docs(app, what, name, obj, options, lines):
    """A public constant (a dict, a tuple) shows its value, not its builtin type's docstring."""
    if what in ("data", "attribute") and type(obj).__module__ == "builtins":
        type_doc = (type(obj).__doc__ or "").strip()
        if type_doc and "\n".join(lines).strip() == inspect.cleandoc(type_doc):
            lines[:] = []


def setup(app):
    app.connect("autodoc-process-docstring", _no_builtin_type_docs)
    app.connect("builder-inited", _builder_inited)
    app.connect("missing-reference", resolve_alias)
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
