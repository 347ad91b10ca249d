"""The docs: every public name has an API entry, the results pages show every committed
result, and the code on the pages runs (the quick start, the baselines, resuming, the theory)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

import flowjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_spec = importlib.util.spec_from_file_location(
    "flowjax_docs", DOCS / "_ext" / "flowjax_docs.py"
)
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def _entries(api: pathlib.Path) -> dict[str, set[str]]:
    """module -> names with an autodoc entry on the generated pages."""
    out: dict[str, set[str]] = {}
    for page in api.glob("*.rst"):
        text = page.read_text()
        current = re.search(r"^\.\. currentmodule:: (\S+)$", text, flags=re.M)
        if current is None:
            continue
        names = re.findall(
            r"^\.\. auto(?:function|class|data):: (\S+)$", text, flags=re.M
        )
        out.setdefault(current.group(1), set()).update(names)
    return out


def _public_objects() -> list[tuple[str, object]]:
    """Every public name a user can reach, flat or in a namespace, with its object."""
    import flowjax.datasets
    import flowjax.evaluation
    import flowjax.models
    from flowjax import theory

    names = [
        (n, getattr(flowjax, n))
        for n in flowjax.__all__
        if not isinstance(getattr(flowjax, n), types.ModuleType)
    ]
    for ns in (theory, flowjax.datasets, flowjax.models, flowjax.evaluation):
        short = ns.__name__.split(".")[-1]
        names += [(f"{short}.{n}", getattr(ns, n)) for n in ns.__all__]
    return names


def test_every_public_name_has_an_api_entry(tmp_path):
    pages = gen.api_pages(tmp_path / "api")
    assert pages[0] == "flowjax"  # the core first, then the namespaces as layered
    namespaces = [
        n for n in flowjax.__all__ if isinstance(getattr(flowjax, n), types.ModuleType)
    ]
    assert pages[1:] == [f"flowjax.{n}" for n in namespaces] + [
        "flowjax.theory",
        "flowjax.datasets",
        "flowjax.models",
        "flowjax.evaluation",
    ]
    entries = _entries(tmp_path / "api")
    documented = {
        id(getattr(sys.modules[module], name))
        for module, names in entries.items()
        for name in names
    }
    missing = [n for n, obj in _public_objects() if id(obj) not in documented]
    assert missing == []
    # Each namespace's names are documented under the namespace, the core at the top.
    for ns in namespaces:
        assert entries[f"flowjax.{ns}"] == set(getattr(flowjax, ns).__all__), ns
    core = entries["flowjax"]
    assert {
        "per_example_losses",
        "LossTable",
        "flow_weights",
        "weighted_objective",
    } <= core
    assert not core & set(flowjax.baselines.__all__)
    index = (tmp_path / "api" / "index.rst").read_text()
    assert all(f"   {p}\n" in index for p in pages)


def test_a_new_name_or_namespace_gets_an_entry_without_touching_the_docs(
    tmp_path, monkeypatch
):
    def new_metric(x):
        """A metric added later."""
        return x

    models = types.ModuleType("flowjax.models")
    models.__doc__ = "Models added by another branch."

    class ResNet:
        """A model."""

    models.ResNet, models.__all__ = ResNet, ["ResNet"]
    monkeypatch.setitem(sys.modules, "flowjax.models", models)
    monkeypatch.setattr(flowjax, "models", models, raising=False)
    monkeypatch.setattr(
        flowjax, "ResNet", ResNet, raising=False
    )  # flat, as for the others
    monkeypatch.setattr(flowjax, "__all__", [*flowjax.__all__, "models", "ResNet"])
    monkeypatch.setattr(flowjax.metrics, "new_metric", new_metric, raising=False)
    monkeypatch.setattr(
        flowjax.metrics, "__all__", [*flowjax.metrics.__all__, "new_metric"]
    )
    gen.api_pages(tmp_path / "api")
    entries = _entries(tmp_path / "api")
    assert "new_metric" in entries["flowjax.metrics"]
    assert entries["flowjax.models"] == {"ResNet"}
    assert "ResNet" not in entries["flowjax"]  # a namespace's name is not core
    # The build's own check names a public name whose entry did not make it.
    documented = {f"{m}.{n}" for m, names in entries.items() for n in names}
    assert gen.missing_entries(documented) == []
    assert gen.missing_entries(documented - {"flowjax.metrics.new_metric"}) == [
        "flowjax.metrics.new_metric"
    ]


def test_flat_and_short_references_resolve_to_the_namespace_entry():
    names = gen.documented_names()
    assert names["flowjax.l2sp"] == "flowjax.baselines.l2sp"
    assert names["flowjax.baselines.l2sp"] == "flowjax.baselines.l2sp"
    assert names["flowjax.LossTable"] == "flowjax.LossTable"
    assert names["flowjax.theory.make_setting"] == "flowjax.theory.make_setting"
    assert "flowjax.no_such_name" not in names


def test_results_pages_show_every_committed_table_and_figure(tmp_path):
    docs = tmp_path / "docs"
    out = docs / "_generated"
    names = gen.results_pages(ROOT / "results", out, docs)
    assert names == sorted(p.name for p in (ROOT / "results").iterdir() if p.is_dir())
    for name in names:
        page = (out / "results" / f"{name}.md").read_text()
        for png in (ROOT / "results" / name).glob("*.png"):
            assert f"```{{figure}} /_generated/results/{name}/{png.name}" in page
            copied = out / "results" / name / png.name
            assert copied.read_bytes() == png.read_bytes()
    digits = (out / "results" / "digits.md").read_text()
    report = (ROOT / "results" / "digits" / "results.md").read_text()
    table_rows = [line for line in report.splitlines() if line.startswith("| FLOW |")]
    assert table_rows and all(row in digits for row in table_rows)
    assert "\n### FLOW on digits" in digits  # the report's title, two levels down
    bench = (out / "results" / "benchmarks.md").read_text()
    suite = (ROOT / "results" / "benchmarks" / "suite.md").read_text()
    rows = [line for line in suite.splitlines() if line.startswith("| pre-pass")]
    assert rows and all(row in bench for row in rows)  # make bench's table, as written


def test_a_new_result_shows_up_and_an_unknown_one_is_an_error(tmp_path):
    results = tmp_path / "results"
    (results / "tasks").mkdir(parents=True)
    (results / "tasks" / "results.md").write_text(
        "# Tasks\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    )
    (results / "tasks" / "curve.png").write_bytes(b"\x89PNG fake")
    docs = tmp_path / "docs"
    gen.results_pages(results, docs / "_generated", docs)
    page = (docs / "_generated" / "results" / "tasks.md").read_text()
    assert "\n### Tasks" in page and "| 1 | 2 |" in page
    assert "/_generated/results/tasks/curve.png" in page
    (results / "empty").mkdir()
    with pytest.raises(ValueError, match=r"results/empty/ has no report"):
        gen.results_pages(results, docs / "_generated", docs)


def _blocks(page: str, start: str | None = None) -> list[str]:
    text = (DOCS / page).read_text()
    if start is not None:
        text = text[text.index(start) :]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_pages_code_runs_and_does_what_it_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    quick = _blocks("getting_started.md")
    assert len(quick) == 5
    exec(compile("\n".join(quick), "getting_started.md", "exec"), ns)
    first = ns["result"]
    assert first.history[-1]["step"] == 100 and first.resumed_from is None
    assert ns["weights"].temperature == ns["table"].median_temperature()
    # Step 4 run again resumes from its last checkpoint to the same state.
    exec(compile(quick[-1], "getting_started.md", "exec"), ns)
    assert "resumed from step 100" in capsys.readouterr().out
    assert ns["result"].history == first.history

    exec(compile("\n".join(_blocks("howto/baselines.md")), "baselines.md", "exec"), ns)
    pretrained = ns["pretrained"]
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    for name in ("l2sp", "ewc", "flow", "lwf", "replay", "dro"):
        moved = [
            np.abs(a - b).max()
            for a, b in zip(
                leaves(ns[f"{name}_params"]), leaves(pretrained), strict=True
            )
        ]
        assert max(moved) > 0 and all(np.isfinite(moved)), name
    # L2-SP's state anchors at θ₀; WiSE-FT is the leafwise average; the probe kept the kernel.
    for a, b in zip(
        leaves(ns["l2sp_state"][0].anchor), leaves(pretrained), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for avg, a, b in zip(
        leaves(ns["averaged"]),
        leaves(pretrained),
        leaves(ns["flow_params"]),
        strict=True,
    ):
        np.testing.assert_allclose(avg, 0.5 * a + 0.5 * b, rtol=1e-6)
    np.testing.assert_array_equal(
        ns["probe_params"]["kernel"][...], pretrained["kernel"][...]
    )
    assert np.abs(ns["probe_params"]["bias"][...] - pretrained["bias"][...]).max() > 0
    # LoRA: the merged Linear computes what the adapted model computes.
    merged, x = ns["merged"], ns["data"]["x"][:16]
    assert isinstance(merged, nnx.Linear)
    lora = nnx.merge(ns["lora_graphdef"], ns["lora_params"], ns["base"])
    np.testing.assert_allclose(merged(x), lora(x), atol=1e-5)
    assert np.abs(np.asarray(lora.lora.lora_b[...])).max() > 0
    # Replay: a quarter of every full mixed batch is replayed, with weight 1.
    full = ns["mixed"][0]
    assert full["replay"].mean() == pytest.approx(0.25, abs=0.01)
    assert (full["weight"][full["replay"]] == 1).all() and (
        full["id"][full["replay"]] >= 10_000
    ).all()

    resume = _blocks("howto/resume.md")
    exec(compile("\n".join(resume), "resume.md", "exec"), ns)
    assert ns["result"].history[-1]["step"] == 100
    exec(compile("\n".join(resume), "resume.md", "exec"), ns)
    assert "resumed from step 100" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "run2" / "metrics.jsonl")


def test_the_theory_example_prints_lemma_f3s_eigenvalues(capsys):
    (block,) = _blocks("concepts/theory.md", "## Example")
    exec(compile(block, "theory.md", "exec"), {})
    beta, rho = 0.01, 0.8
    lam1 = (1 + beta * rho**2) / (1 + beta)
    lam2 = rho**2 * (1 - beta) / (1 - beta * rho**2)
    assert capsys.readouterr().out.split() == [str(round(lam1, 4)), str(round(lam2, 4))]
