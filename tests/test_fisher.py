"""diagonal_fisher: numpy references, the exact expected Fisher, one trace, batching, errors, 8 devices."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax

from . import _subprocess
from ._fisher_worker import CLASSES, batches, dataset, fishers, logits, nll, params

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fisher_worker.py")


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _numpy_fisher(p, x, labels):
    """Mean of squared per-example gradients of -log softmax(Wx+b)[y], float64."""
    W, b = (np.asarray(p[k], np.float64) for k in ("W", "b"))
    prob = _softmax(x.astype(np.float64) @ W.T + b)
    r = prob - np.eye(W.shape[0])[labels]  # d(-log p_y)/dlogits
    return {
        "W": np.mean((r[:, :, None] * x[:, None, :]) ** 2, axis=0),
        "b": np.mean(r**2, axis=0),
    }


def _id_keys(key, ids):
    pairs = np.ascontiguousarray(ids, np.int64).view(np.int32).reshape(-1, 2)
    return jax.vmap(lambda q: jax.random.fold_in(jax.random.fold_in(key, q[0]), q[1]))(
        pairs
    )


def test_empirical_fisher_matches_numpy(rng):
    data, p = dataset(), params()
    got = flowjax.diagonal_fisher(nll, p, batches(data, 16), progress=False)
    want = _numpy_fisher(p, data["x"], data["label"])
    for k in want:
        assert got[k].dtype == jnp.float32 and got[k].shape == p[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-8)


def test_sampled_fisher_matches_a_per_example_loop_with_id_keys():
    """Each example's label is categorical(fold_in(fold_in(rng, id_lo), id_hi), logits)."""
    data, p = dataset(), params()
    key = jax.random.key(11)
    got = flowjax.diagonal_fisher(
        logits, p, batches(data, 16), kind="sampled", rng=key, progress=False
    )
    z = jax.vmap(logits, in_axes=(None, 0))(p, {"x": data["x"]})
    labels = np.asarray(jax.vmap(jax.random.categorical)(_id_keys(key, data["id"]), z))
    want = _numpy_fisher(p, data["x"], labels)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-8)
    assert not np.array_equal(labels, data["label"])  # not the true labels


@pytest.mark.parametrize("kind", ["empirical", "sampled"])
def test_traced_once_across_ragged_batches_and_independent_of_batching(kind):
    data, p = dataset(), params()
    traces = []

    def counted(params, ex):
        traces.append(1)
        return (nll if kind == "empirical" else logits)(params, ex)

    rng = jax.random.key(2) if kind == "sampled" else None
    # Ragged: 203 = 12·16 + 11, and one oversized batch of 40 split into 16 + 16 + 8.
    feed = [
        *batches({k: v[:40] for k, v in data.items()}, 40),
        *batches({k: v[40:] for k, v in data.items()}, 16),
    ]
    a = flowjax.diagonal_fisher(
        counted, p, feed, kind=kind, rng=rng, batch_size=16, progress=False
    )
    assert len(traces) == 1
    order = np.random.default_rng(4).permutation(len(data["id"]))
    # Another feed (shuffled, batches of 50); the empirical run also changes the step size
    # (a sampled step compiles slowly on CPU, so it keeps 16 rows per step).
    b = flowjax.diagonal_fisher(
        counted,
        p,
        batches(data, 50, order),
        kind=kind,
        rng=rng,
        batch_size=50 if kind == "empirical" else 16,
        progress=False,
    )
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_sampled_fisher_approaches_the_exact_expected_fisher():
    """Softmax regression: E_y[(1[y=k]-p_k)² x_j²] = p_k(1-p_k) x_j², summed exactly over classes."""
    n = 4000
    rng = np.random.default_rng(8)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    data = {"id": np.arange(n, dtype=np.int64), "x": x, "label": np.zeros(n, np.int32)}
    p = params()
    prob = _softmax(
        x.astype(np.float64) @ np.asarray(p["W"], np.float64).T
        + np.asarray(p["b"], np.float64)
    )
    v = prob * (1 - prob)  # E[Z] per example and class, Z = (1[y=k]-p_k)²
    ez2 = prob * (1 - prob) ** 4 + (1 - prob) * prob**4
    x2 = x.astype(np.float64) ** 2
    exact = {"W": np.mean(v[:, :, None] * x2[:, None, :], axis=0), "b": v.mean(axis=0)}
    se = {
        "W": np.sqrt(np.sum((ez2 - v**2)[:, :, None] * x2[:, None, :] ** 2, axis=0))
        / n,
        "b": np.sqrt(np.sum(ez2 - v**2, axis=0)) / n,
    }
    sampled = flowjax.diagonal_fisher(
        logits,
        p,
        batches(data, 500),
        kind="sampled",
        rng=jax.random.key(0),
        progress=False,
    )
    empirical = flowjax.diagonal_fisher(nll, p, batches(data, 16), progress=False)
    for k in exact:
        z = np.abs(np.asarray(sampled[k], np.float64) - exact[k]) / se[k]
        assert z.max() < 5, (k, z)
    # The empirical Fisher with wrong labels (all 0) is far off: the test can tell them apart.
    assert (
        max(
            (np.abs(np.asarray(empirical[k], np.float64) - exact[k]) / se[k]).max()
            for k in exact
        )
        > 20
    )


def test_result_feeds_ewc(rng):
    p = params()
    fisher = flowjax.diagonal_fisher(nll, p, batches(dataset(), 16), progress=False)
    tx = flowjax.ewc(2.0, fisher, p)
    moved = jax.tree.map(lambda x: x + 1.0, p)
    added, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), moved)
    np.testing.assert_allclose(added["W"], 2.0 * fisher["W"], rtol=1e-6)


def test_bad_inputs_raise():
    data, p = dataset(), params()
    with pytest.raises(ValueError, match="batches is empty"):
        flowjax.diagonal_fisher(nll, p, [], progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        flowjax.diagonal_fisher(
            nll, p, [{k: v[:0] for k, v in data.items()}], progress=False
        )
    with pytest.raises(ValueError, match="kind must be one of"):
        flowjax.diagonal_fisher(nll, p, batches(data, 16), kind="true", progress=False)
    with pytest.raises(ValueError, match="pass rng="):
        flowjax.diagonal_fisher(
            logits, p, batches(data, 16), kind="sampled", progress=False
        )
    with pytest.raises(ValueError, match='only used by kind="sampled"'):
        flowjax.diagonal_fisher(
            nll, p, batches(data, 16), rng=jax.random.key(0), progress=False
        )
    with pytest.raises(ValueError, match="ONE scalar"):
        flowjax.diagonal_fisher(logits, p, batches(data, 16), progress=False)
    with pytest.raises(ValueError, match=r"logits \[num_classes\] of ONE example"):
        flowjax.diagonal_fisher(
            nll, p, batches(data, 16), kind="sampled", rng=0, progress=False
        )
    with pytest.raises(ValueError, match="duplicate example ids"):
        flowjax.diagonal_fisher(
            nll, p, [*batches(data, 16), *batches(data, 16)], progress=False
        )
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    with pytest.raises(ValueError, match="'data' axis"):
        flowjax.diagonal_fisher(nll, p, batches(data, 16), mesh=mesh, progress=False)
    poisoned = dict(data, x=data["x"].copy())
    poisoned["x"][[5, 77]] = np.nan
    with pytest.raises(
        ValueError, match=r"NaN or infinite gradients .* ids \[" + str(data["id"][5])
    ):
        flowjax.diagonal_fisher(nll, p, batches(poisoned, 16), progress=False)


def test_a_loader_that_repeats_examples_fails_within_one_pass():
    data, p = dataset(), params()  # 203 examples: 13 batches of 16 per pass
    pulled = []

    def endless():
        for batch in itertools.cycle(list(batches(data, 16))):
            pulled.append(batch)
            assert len(pulled) <= 18, "the Fisher went on past one pass and a quarter"
            yield batch

    with pytest.raises(ValueError, match="this loader repeats examples: pass a single"):
        flowjax.diagonal_fisher(nll, p, endless(), progress=False)
    assert 14 <= len(pulled) <= 18  # it stopped early in the second pass


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
    """Two fresh 8-device processes (ragged steps; W sharded over 'data') against this 1-device one."""
    cases = {
        "8dev-uneven": [
            "--devices",
            "8",
            "--batch-size",
            "13",
        ],  # 13 rows -> 16 per step
        "8dev-sharded-params": ["--devices", "8", "--shard-params"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / f"{name}.npz"), *args],
            env=_subprocess._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in cases.items()
    }
    assert len(jax.devices()) == 1
    one = fishers()
    want = _numpy_fisher(params(), dataset()["x"], dataset()["label"])
    np.testing.assert_allclose(one["empirical/W"], want["W"], rtol=2e-5)
    assert one["sampled/W"].shape == (CLASSES, 3)
    for name, proc in procs.items():
        output = _subprocess.finish(proc)
        assert "fisher on 8 devices" in output
        got = dict(np.load(tmp_path / f"{name}.npz"))
        for k in one:
            np.testing.assert_allclose(
                got[k], one[k], rtol=1e-5, atol=1e-8, err_msg=f"{name} {k}"
            )


def test_numpy_integer_seed_is_a_seed():
    data, p = dataset(), params()
    kw = dict(kind="sampled", progress=False)
    want = flowjax.diagonal_fisher(logits, p, batches(data, 16), rng=3, **kw)
    for seed in (np.int64(3), np.int32(3), np.uint8(3)):
        got = flowjax.diagonal_fisher(logits, p, batches(data, 16), rng=seed, **kw)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other = flowjax.diagonal_fisher(logits, p, batches(data, 16), rng=4, **kw)
    assert not np.array_equal(other["W"], want["W"])
    # A legacy raw uint32 key is the same key as jax.random.key(3).
    legacy = flowjax.diagonal_fisher(
        logits, p, batches(data, 16), rng=jax.random.PRNGKey(3), **kw
    )
    for k in want:
        np.testing.assert_array_equal(legacy[k], want[k])
    with pytest.raises(TypeError, match=r"rng must be a jax\.random key"):
        flowjax.diagonal_fisher(logits, p, batches(data, 16), rng=0.5, **kw)


def _two_processes(tmp_path, tag: str, *args: str) -> list[subprocess.Popen]:
    outs = [str(tmp_path / f"{tag}-{i}.npz") for i in range(2)]
    return _subprocess.start_two(outs, *args, worker=WORKER)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 1 and x 2 devices, uneven shares (3/5, 2/5), ragged steps: the 1-process Fisher.

    (Bad input on one process: tests/test_prepass_multiprocess.py runs diagonal_fisher's
    cases with the pre-pass's, in one two-process run.)
    """
    runs = {
        # 13 rows per process -> 14, so the global step of 28 rows divides 4 devices.
        "2dev": _two_processes(
            tmp_path, "2dev", "--devices", "2", "--batch-size", "13"
        ),
        "1dev": _two_processes(tmp_path, "1dev", "--devices", "1"),
    }
    one = fishers()
    for name, procs in runs.items():
        for output in [_subprocess.finish(p) for p in procs]:
            assert "devices in 2 processes" in output
        first, second = (dict(np.load(tmp_path / f"{name}-{i}.npz")) for i in range(2))
        assert first.keys() == one.keys()
        for k in one:
            np.testing.assert_array_equal(first[k], second[k])  # replicated: identical
            np.testing.assert_allclose(
                first[k], one[k], rtol=1e-5, atol=1e-8, err_msg=f"{name} {k}"
            )
