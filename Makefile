# flowjax: `make demo` runs the main job, `make test` runs the tests. Both create .venv
# (python3 -m venv) when it is missing and install flowjax into it (the distribution
# flowjax-ft, editable, with the test and experiments extras); a second run reinstalls only
# when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flowjax-installed
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install test demo theory digits continual bench bench-llm bench-torch lm llm-tiny lint clean docs dist wheel-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test,experiments]'
	@touch $@

install: $(STAMP)

# Test files run in parallel, one file per worker (the subprocess tests start their own JAX
# runtimes); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The main job: FLOW and the baselines on real data (digits), then the linear-model theory of the
# paper's section 7; prints the digits table and where every output is.
demo: digits theory
	@echo "digits: results/digits/results.md (table), results/digits/pareto.png, results/digits/weights.png"
	@echo "theory: results/theory/"

theory: $(STAMP)
	$(PY) -m experiments.theory.linear_theory --out results/theory

# FLOW's forgetting result on real data (scikit-learn's digits through TFDS, built once into
# .cache/tfds or $$FLOWJAX_DATA_DIR): LP, FT, LP-FT, L2-SP, EWC, LoRA, WiSE-FT, LwF, DRO, FLOW,
# FLOW + LoRA, FLOW + WiSE-FT over 10 seeds; prints the table.
digits: $(STAMP)
	$(PY) -m experiments.digits.run --out results/digits

# Every forgetting defence on a task sequence (digits split into 5 tasks of 2 classes,
# task- and class-incremental, 5 seeds): accuracy matrices, ACC, BWT, FWT, forgetting.
continual: $(STAMP)
	$(PY) -m experiments.continual.run --out results/continual

# What FLOW costs, every figure a ratio measured side by side in one run (not a test: timings
# vary by machine): results/benchmarks/suite.json and suite.md.
bench: $(STAMP)
	$(PY) -m experiments.benchmarks.suite --out results/benchmarks

# The LM workload (pre-pass, bucketing waste, weighted train step, KV-cache decoding) of a
# Gemma-2-2B-shaped model on the accelerator present (reduced size on CPU), under 4 minutes:
# results/benchmarks/llm.json and llm.md.
bench-llm: $(STAMP)
	$(PY) -m experiments.benchmarks.llm --out results/benchmarks

# Optional: PyTorch's official-style FLOW loop against its own fine-tuning, in a separate venv
# (torch 2.13.0, a CPU wheel) made only here; never part of make test. Run before make bench,
# which then quotes it.
TORCH_VENV ?= .venv-torch
bench-torch:
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install $(PIP_FLAGS) 'torch==2.13.0' numpy
	$(TORCH_VENV)/bin/python -m experiments.benchmarks.torch_flow --out results/benchmarks/torch.json

# FLOW on a small byte-level LM (pydoc pre-training, addition fine-tuning) into results/lm/;
# the pre-trained model is cached with orbax in .cache/lm/ (git-ignored).
lm: $(STAMP)
	$(PY) -m experiments.lm.run --out results/lm

# The paper's LLM pipeline (experiments/llm) end to end on CPU, on inputs the tiny config
# fabricates in the workdir (a random checkpoint, MetaMathQA- and GSM8K-style files); the paper
# configs are in experiments/llm/configs/ (docs/howto/llm.md).
llm-tiny: $(STAMP)
	$(PY) -m experiments.llm.run --config experiments/llm/configs/tiny.py --workdir .cache/llm-tiny

# The documentation site (Sphinx) into docs/_build/html; warnings (a broken docstring, a dead
# cross-reference, a public name without an entry, a results directory no page shows) are errors.
DOCS_STAMP := $(VENV)/.flowjax-docs-installed

$(DOCS_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[docs]'
	@touch $@

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# The sdist and, built from it, the wheel, into dist/.
DIST_STAMP := $(VENV)/.flowjax-dist-installed

$(DIST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dist]'
	@touch $@

dist: $(DIST_STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .

# Checks the built sdist and wheel, installs the wheel into a fresh venv (not editable, no
# repository on sys.path) and runs the quick start and the theory example from it.
wheel-check: dist
	$(PY) .ci/check_wheel.py dist

lint: $(STAMP)
	$(PY) -m pip install $(PIP_FLAGS) 'ruff>=0.6'
	$(PY) -m ruff format --check flowjax experiments tests
	$(PY) -m ruff check flowjax experiments tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dist docs/_build docs/_generated docs/api
