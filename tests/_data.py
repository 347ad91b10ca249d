"""Deterministic data and a small model shared by the pre-pass tests and their subprocess worker."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

N_EXAMPLES = 203  # prime: every batch size leaves a ragged last batch
DIM = 6


def dataset(n: int = N_EXAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        # Large, sparse, non-contiguous ids: exercises int64 ids beyond int32.
        "id": (np.arange(n, dtype=np.int64) * 7_919 + 5_000_000_000)[
            rng.permutation(n)
        ],
        "x": rng.normal(size=(n, DIM)).astype(np.float32),
        "y": rng.normal(size=(n,)).astype(np.float32),
    }


def params(seed: int = 1) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(DIM, 16)), jnp.float32) / 3,
        "b1": jnp.zeros((16,), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16,)), jnp.float32) / 4,
    }


def loss_fn(p, example):
    """Squared error of a 2-layer MLP on ONE example."""
    h = jnp.tanh(example["x"] @ p["w1"] + p["b1"])
    return (h @ p["w2"] - example["y"]) ** 2


def batch_loss(p, batch):
    """``loss_fn`` written for a batch: ``[B]``, each row's loss from its own row."""
    h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"][None])
    return (h @ p["w2"] - batch["y"]) ** 2


def coupled_batch_loss(p, batch):
    """A batched loss that mixes rows (as a train-mode BatchNorm does): refused."""
    out = batch_loss(p, batch)
    return out - jnp.mean(out) + 1.0


def reference_losses(p, data) -> np.ndarray:
    """The same losses, batched, in numpy float64: an independent reference."""
    w1, b1, w2 = (np.asarray(p[k], np.float64) for k in ("w1", "b1", "w2"))
    h = np.tanh(data["x"].astype(np.float64) @ w1 + b1)
    return (h @ w2 - data["y"]) ** 2


def batches(data, batch_size: int, order=None):
    """Dict batches in the given example order (default: as stored)."""
    order = np.arange(len(data["id"])) if order is None else np.asarray(order)
    for s in range(0, len(order), batch_size):
        j = order[s : s + batch_size]
        yield {k: v[j] for k, v in data.items()}
