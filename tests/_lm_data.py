"""Deterministic tokenised examples and a small causal LM for the token pre-pass tests and worker."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

V, D = 11, 4
BUCKETS = (6, 12, 20)
N_EXAMPLES = 37  # with batch sizes 3 and 5: ragged last batches in every bucket


def examples(n: int = N_EXAMPLES, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 21))
        prompt = int(rng.integers(1, length))
        out.append(
            {
                # Large, sparse ids beyond int32.
                "id": 3_000_000_000 + 7_919 * int(rng.permutation(1000)[0]) + i,
                "tokens": rng.integers(0, V, size=length),
                "mask": np.arange(length) >= prompt,
            }
        )
    return out


def params(seed: int = 1) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "E": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
        "W": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
    }


class LM:
    """Causal: h_t = Σ_{s<=t} E[x_s], logits = h W; NaN logits at negative tokens. Counts its traces."""

    def __init__(self):
        self.traces = 0

    def __call__(self, p, tokens):
        self.traces += 1
        logits = jnp.cumsum(p["E"][jnp.maximum(tokens, 0)], axis=0) @ p["W"]
        return jnp.where((tokens < 0)[:, None], jnp.nan, logits)


def reference(p, ex) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy NLLs [len - 1] of one unpadded example, and its shifted target mask."""
    e, w = np.asarray(p["E"], np.float64), np.asarray(p["W"], np.float64)
    z = (np.cumsum(e[ex["tokens"]], axis=0) @ w)[:-1]
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(z)), ex["tokens"][1:]], ex["mask"][1:]


def split(ex: list[dict], process: int, nproc: int) -> list[dict]:
    """Uneven shares; with 2 processes, process 1 holds no example longer than 12 (none of
    the longest bucket)."""
    if nproc == 1:
        return ex
    mine = [
        (k % 3 == 0 and len(e["tokens"]) <= 12) == (process == 1)
        for k, e in enumerate(ex)
    ]
    return [e for e, m in zip(ex, mine, strict=True) if m]
