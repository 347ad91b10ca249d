"""The shared battery run against every training-step method (tests/_methods.py).

For each method: jit and no-jit agree; float32 and bfloat16 parameters keep
their dtype; zero strength is plain fine-tuning; the FLOW-weighted step lowers
the loss; and on 8 fake devices (own process) sharded parameters keep their
sharding and give the single-device result.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import flowjax

from . import _methods, _subprocess

NAMES = [m.name for m in _methods.METHODS]
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_methods_worker.py")


@pytest.fixture(scope="module")
def plain():
    return _methods.train(_methods.BY_NAME["plain"], 0.0)[0]


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_no_jit_agree(name):
    m = _methods.BY_NAME[name]
    p_jit, _, l_jit = _methods.train(m, m.strength, jit=True)
    p_eager, _, l_eager = _methods.train(m, m.strength, jit=False)
    np.testing.assert_allclose(l_jit, l_eager, rtol=1e-5)
    p_jit, p_eager = _methods.leaves(p_jit), _methods.leaves(p_eager)
    assert p_jit.keys() == p_eager.keys()
    for k in p_jit:
        np.testing.assert_allclose(
            p_jit[k], p_eager[k], rtol=1e-5, atol=1e-6, err_msg=k
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_kept(name, dtype):
    m = _methods.BY_NAME[name]
    p, _, losses = _methods.train(m, m.strength, dtype=dtype)
    p = _methods.leaves(p)
    assert {k: v.dtype for k, v in p.items()} == {k: dtype for k in p}
    assert all(np.isfinite(losses))


WITH_ZERO = [
    m.name for m in _methods.METHODS if m.name != "plain" and m.zero is not None
]


@pytest.mark.parametrize("name", WITH_ZERO)
def test_zero_strength_is_plain_fine_tuning(name, plain):
    m = _methods.BY_NAME[name]
    p, _, _ = _methods.train(m, m.zero)
    if name in _methods.ZERO_REFERENCE:
        plain = _methods.train(_methods.ZERO_REFERENCE[name], 0.0)[0]
    assert p.keys() == plain.keys()
    for k in p:
        np.testing.assert_array_equal(p[k], plain[k], err_msg=k)


@pytest.mark.parametrize("name", WITH_ZERO)
def test_nonzero_strength_changes_the_step(name, plain):
    m = _methods.BY_NAME[name]
    p, _, _ = _methods.train(m, m.strength)
    assert max(float(jnp.max(jnp.abs(p[k] - plain[k]))) for k in p) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_flow_weighted_step_lowers_the_loss(name):
    m = _methods.BY_NAME[name]
    _, _, losses = _methods.train(m, m.strength, steps=8)
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("methods") / "m.npz")
    proc = subprocess.run(
        [sys.executable, WORKER, out],
        env=_subprocess._env(),
        capture_output=True,
        text=True,
        timeout=_subprocess.TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_sharding_kept_on_eight_devices(name, eight_devices):
    m = _methods.BY_NAME[name]
    assert eight_devices[f"{name}/sharding_kept"]
    assert eight_devices[f"{name}/state_on_all_devices"]
    p = _methods.leaves(_methods.train(m, m.strength)[0])
    for k in p:
        np.testing.assert_allclose(
            eight_devices[f"{name}/{k}"], p[k], rtol=1e-5, atol=1e-6, err_msg=k
        )


def test_l2sp_inside_train_only_is_l2sp_on_the_head_with_n_trainable():
    """The battery's train_only-l2sp equals L2-SP (N = 27 head entries) with the body frozen."""
    m = _methods.BY_NAME["train_only-l2sp"]
    got, _, _ = _methods.train(m, m.strength)
    theta0 = _methods.params()
    head = ("w2", "b2")

    def objective(h, frozen, b):
        return _methods.plain_objective({**theta0, **h}, frozen, b)

    ref = _methods.Method(
        "ref",
        lambda s, t0: (
            objective,
            _methods._chain(flowjax.l2sp(s, scale="num_params")),
            None,
            {k: t0[k] for k in head},
        ),
    )
    want, _, _ = _methods.train(ref, m.strength)
    for k in head:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for k in ("w1", "b1"):
        np.testing.assert_array_equal(got[k], theta0[k])
    plain_head, _, _ = _methods.train(ref, 0.0)
    assert max(np.abs(np.asarray(want[k] - plain_head[k])).max() for k in head) > 1e-4
