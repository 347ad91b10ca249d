"""Strict numerics for every test (as in equinox/tests/conftest.py); one compilation cache.

Every test process, the subprocesses the tests start included (they inherit the
environment), shares JAX's persistent compilation cache in ``.jax_cache/tests``
(git-ignored; empty on a fresh clone): a program compiled once, in a fixture's run or
another test file, is loaded instead of compiled again by the killed-and-restarted runs
and by tests that build the same model. The cache is keyed by the program and the
compiler, so it changes no result; set ``JAX_COMPILATION_CACHE_DIR`` to move it.
"""

import os
from pathlib import Path

import jax
import pytest

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(Path(__file__).resolve().parents[1] / ".jax_cache" / "tests"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture(params=["without_jit", "with_jit"])
def variant(request):
    """Runs a test twice: the function as is, and under ``jax.jit`` (chex.variants, pytest-style)."""
    return jax.jit if request.param == "with_jit" else (lambda fn: fn)


# --doctest-modules imports every module under tests/: not the subprocess workers (they set
# up their own JAX runtime, e.g. 8 fake devices, at import) nor the fixture generators (run
# by hand with torch installed).
collect_ignore_glob = ["_*_worker.py", "fixtures/make_*.py"]


# The files that take longest (module fixtures that run whole experiments, several
# compiles) are scheduled first: with `-n 2 --dist loadfile` (make test) files go to the
# workers in collection order, and a long file collected last leaves one worker running
# it alone at the end (longest first, as for any greedy scheduling).
_LONGEST_FIRST = (
    "test_vision_experiment.py",
    "test_lm_experiment.py",
    "test_digits_experiment.py",
    "test_llm_experiment.py",
    "test_train_kill.py",
    "test_methods.py",
    "test_continual_experiment.py",
    "test_prepass_multiprocess.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
