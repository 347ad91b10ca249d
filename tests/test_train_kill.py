"""fit SIGKILLed several times and started again ends bit-identical to an uninterrupted run.

Each run is a fresh process (tests/_train_worker.py): FLOW weights from a pre-pass,
shuffled batches with per-example noise, a noisy loss from the step's key, an
evaluation every 5 steps, checkpoints every 4 (async, the last 2 kept). The kill
points are drawn from a seed; the process kills itself while fetching a batch,
inside a step or inside an evaluation, so checkpoints may be caught half-written.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from . import _subprocess

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_worker.py")
STEPS = 30


def _start(out, cache, *args):
    os.makedirs(out, exist_ok=True)
    return _subprocess.start(
        out, "--steps", str(STEPS), "--compile-cache", cache, *args, worker=WORKER
    )


def _run(out, cache, *args, expect_rc=0) -> str:
    return _subprocess.finish(_start(out, cache, *args), expect_rc)


def _kill_points(seed: int, count: int) -> list[tuple[int, str]]:
    """Increasing kill points, each after the previous (so each one fires)."""
    rng = np.random.default_rng(seed)
    points, low = [], 6
    kinds = ["data", "step", "eval"]
    for j in range(count):
        k = int(rng.integers(low, low + 7))
        kind = kinds[(seed + j) % 3]
        if kind == "eval":  # evaluations run after steps 5, 10, ...
            k = -(-k // 5) * 5
        points.append((k, kind))
        low = k + 2
    assert points[-1][0] < STEPS
    return points


def _read(out):
    with np.load(os.path.join(out, "params.npz")) as z:
        leaves = [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]
    with open(os.path.join(out, "metrics.jsonl"), "rb") as f:
        return leaves, f.read()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for every run of this module."""
    return str(tmp_path_factory.mktemp("jax-cache"))


# The final leaves of the 1-device runs, for the 8-device runs to compare with.
_ONE_DEVICE: dict[str, list[np.ndarray]] = {}


CASES = {  # model, devices, kills, seed, extra worker arguments
    # killed while fetching data, in a step, in an evaluation
    "plain-1dev": ("plain", 1, 3, 0, ()),
    # LoRA (a frozen input beside the trained one) data-parallel over 8 devices
    "lora-8dev": ("lora", 8, 2, 3, ()),
    # up.kernel's columns sharded over 'data' (the worker checks the final sharding); its
    # numbers are also checked against plain-1dev's
    "plain-8dev-sharded-params": ("plain", 8, 1, 4, ("--shard-params",)),
}


@pytest.mark.parametrize(
    "model,devices,kills,seed,extra", CASES.values(), ids=list(CASES)
)
def test_killed_and_resumed_run_is_bit_identical(
    compile_cache, tmp_path, model, devices, kills, seed, extra
):
    dev = ["--model", model, "--devices", str(devices), *extra]
    # The uninterrupted run, beside the killed ones.
    ref = _start(str(tmp_path / "ref"), compile_cache, *dev)
    try:
        out = str(tmp_path / "killed")
        resumed, previous_kill = [], None
        for k, kind in _kill_points(seed, kills):
            text = _run(
                out,
                compile_cache,
                *dev,
                "--kill-at",
                str(k),
                "--kill-in",
                kind,
                expect_rc=-9,
            )
            resumed.append((_resumed(text), previous_kill))
            previous_kill = k
        text = _run(out, compile_cache, *dev)
        resumed.append((_resumed(text), previous_kill))
        assert "done: 30 steps" in text
    except BaseException:
        ref.kill()  # do not leave the uninterrupted run behind
        ref.communicate()
        raise
    _subprocess.finish(ref)
    ref_leaves, ref_metrics = _read(str(tmp_path / "ref"))

    assert resumed[0][0] is None  # the first run started fresh
    # Every restart resumed from a checkpoint taken before its kill (or started fresh
    # when the kill came before the first write was final: saves are asynchronous).
    for step, killed_at in resumed[1:]:
        assert step is None or (step % 4 == 0 and 0 < step <= killed_at), resumed
    assert resumed[-1][0] is not None, resumed  # the last restart resumed
    leaves, metrics = _read(out)
    assert metrics == ref_metrics  # the metrics file, byte for byte
    assert len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    if devices == 1:
        _ONE_DEVICE[model] = leaves
    elif model in _ONE_DEVICE:  # data parallel: the 1-device numbers, to float rounding
        for a, b in zip(leaves, _ONE_DEVICE[model], strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def _resumed(text: str) -> int | None:
    found = re.findall(r"resumed from step (\d+)", text)
    assert len(found) <= 1, text
    return int(found[0]) if found else None
