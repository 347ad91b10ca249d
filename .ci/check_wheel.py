"""The release as a user gets it: check the built sdist and wheel, install the wheel, run it.

    python .ci/check_wheel.py dist      # make wheel-check (after make dist)

1. The sdist and the wheel in ``dist/`` hold every module of ``flowjax/`` (the
   theory sub-package included) and ``py.typed``, and no tests, results,
   experiments or docs; the wheel's metadata names the distribution
   ``flowjax-ft``, the version of ``flowjax.__version__`` and the runtime
   dependencies of ``pyproject.toml``.
2. A fresh virtual environment (no system site-packages) gets the wheel with
   ``pip --python VENV install`` (not editable; its dependencies from the index,
   through pip's cache).
3. From a temporary directory, with ``python -I`` (no repository on
   ``sys.path``, no ``PYTHONPATH``), it runs the README's quick start, the docs'
   quick start (docs/getting_started.md) and the theory example
   (docs/concepts/theory.md), and checks that ``flowjax`` was imported from the
   venv. A file missing from the wheel or an undeclared dependency fails here.

Exits non-zero with a message on the first failure; prints the time of each
phase.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("tests/", "results/", "experiments/", "docs/", ".ci/")


def fail(message: str) -> None:
    sys.exit(f"wheel-check: {message}")


def python_blocks(path: pathlib.Path, start: str, end: str | None = None) -> list[str]:
    text = path.read_text()
    if start not in text:
        fail(f"{path.relative_to(ROOT)} has no section {start!r}")
    section = text[text.index(start) :]
    if end is not None and end in section[len(start) :]:
        section = section[: section.index(end, len(start))]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    if not blocks:
        fail(f"{path.relative_to(ROOT)} section {start!r} has no python block")
    return blocks


def version() -> str:
    source = (ROOT / "flowjax" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', source, flags=re.M).group(1)


def check_contents(dist: pathlib.Path, expected_version: str) -> pathlib.Path:
    wheels = sorted(dist.glob("flowjax_ft-*.whl"))
    sdists = sorted(dist.glob("flowjax_ft-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        fail(f"expected one wheel and one sdist in {dist}, got {wheels + sdists}")
    wheel, sdist = wheels[0], sdists[0]
    if f"-{expected_version}-" not in wheel.name + "-":
        fail(f"{wheel.name} is not version {expected_version}")
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "flowjax").rglob("*")
        if p.is_file() and (p.suffix == ".py" or p.name == "py.typed")
    }
    for must in (
        "flowjax/py.typed",
        "flowjax/theory/__init__.py",
        "flowjax/theory/linear.py",
    ):
        assert must in modules, must
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta_name).decode()
    prefix = f"flowjax_ft-{expected_version}/"
    with tarfile.open(sdist) as t:
        snames = {m.name.removeprefix(prefix) for m in t.getmembers() if m.isfile()}
    for label, found in (("wheel", names), ("sdist", snames)):
        missing = sorted(modules - found)
        if missing:
            fail(f"the {label} lacks {missing}")
        extra = sorted(n for n in found if n.startswith(FORBIDDEN))
        if extra:
            fail(f"the {label} holds files that are not the library: {extra[:10]}")
    for must in ("pyproject.toml", "README.md", "CHANGELOG.md"):
        if must not in snames:
            fail(f"the sdist lacks {must}")
    if (
        "Name: flowjax-ft\n" not in metadata
        or f"Version: {expected_version}\n" not in metadata
    ):
        fail(
            f"the wheel's METADATA names another distribution or version:\n{metadata[:300]}"
        )
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    required = re.findall(r"^Requires-Dist: ([^;\n]+)$", metadata, flags=re.M)
    for dep in declared:
        if dep.replace(" ", "") not in {r.replace(" ", "") for r in required}:
            fail(f"the wheel does not require {dep} (Requires-Dist: {required})")
    print(
        f"contents: {wheel.name} ({len(names)} files), {sdist.name} ({len(snames)} files)"
    )
    return wheel


def main(dist: pathlib.Path) -> None:
    expected = version()
    t0 = time.perf_counter()
    wheel = check_contents(dist.resolve(), expected)
    with tempfile.TemporaryDirectory(prefix="flowjax-wheel-") as tmp:
        tmp = pathlib.Path(tmp)
        venv = tmp / "venv"
        t1 = time.perf_counter()
        # No pip inside (ensurepip takes seconds): this interpreter's pip installs into it.
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
        )
        py = venv / "bin" / "python"
        pip = [sys.executable, "-m", "pip", "--python", str(py), "install"]
        subprocess.run(
            [*pip, "--quiet", "--disable-pip-version-check", str(wheel)], check=True
        )
        t2 = time.perf_counter()
        print(f"fresh venv + pip install of the wheel: {t2 - t1:.1f} s")
        readme = python_blocks(ROOT / "README.md", "## Quick start", "\n## ")
        docs_quick = python_blocks(
            ROOT / "docs" / "getting_started.md", "## Quick start", "\n## "
        )
        theory = python_blocks(ROOT / "docs" / "concepts" / "theory.md", "## Example")
        check = f"""
import importlib.metadata, pathlib, sys
import flowjax
where = pathlib.Path(flowjax.__file__).resolve()
assert where.is_relative_to(pathlib.Path({str(venv.resolve())!r})), where
assert flowjax.__version__ == {expected!r} == importlib.metadata.version("flowjax-ft")
assert not any("flowjax" in p and "site-packages" not in p for p in sys.path), sys.path
print("flowjax", flowjax.__version__, "from", where.parent)
"""
        for label, blocks in (
            ("README quick start", readme),
            ("docs quick start", docs_quick),
            ("theory example", theory),
        ):
            work = tmp / label.replace(" ", "_")
            work.mkdir()
            script = work / "run.py"
            script.write_text(check + "\n".join(blocks))
            t = time.perf_counter()
            run = subprocess.run(
                [str(py), "-I", str(script)], cwd=work, capture_output=True, text=True
            )
            if run.returncode != 0:
                fail(
                    f"the {label} failed from the installed wheel:\n{run.stdout}\n{run.stderr}"
                )
            print(f"{label} from the wheel: ok ({time.perf_counter() - t:.1f} s)")
    print(f"wheel-check: ok in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(pathlib.Path(sys.argv[1]))
