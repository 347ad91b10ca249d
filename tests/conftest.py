"""Strict numerics for every test (as in equinox/tests/conftest.py)."""

import jax
import pytest

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
