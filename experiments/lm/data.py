"""Data of the LM experiment: CPython's pydoc topics (pre-training) and an addition Q/A task.

**Pre-training text.** ``pydoc_data.topics.topics`` (79 topics, about 465k
characters of English documentation in CPython 3.11). Topics are sorted by
name; every ``HELDOUT_EVERY``-th one (indices 2, 7, 12, ...) is held out for
perplexity, the others are pre-training text. Each topic is encoded as
``BOS + utf-8 bytes + EOS`` and the topics of a split are concatenated.

**Fine-tuning task.** ``Q: {a}+{b}=\\nA: {a+b}<EOS>`` for ``0 <= a, b < 100``
(10,000 problems). The prompt is ``BOS + "Q: {a}+{b}=\\nA: "``; the response
(the target) is the digits of the sum and ``EOS``. The problems are permuted
with ``numpy.random.default_rng(0)``: the first 1,000 are the test set, the
next 500 the validation set (learning-rate choice), the rest (8,500) the
training set. Example ids are ``100 * a + b``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from experiments.lm.model import BOS, EOS, PAD, encode

HELDOUT_EVERY = 5
HELDOUT_OFFSET = 2
TASK_SEED = 0
N_TEST, N_VAL = 1000, 500
SEQ_LEN = 20  # longest example: BOS + "Q: 999+9=\nA: " (13) + "1008" + EOS = 19


def pydoc_streams() -> tuple[np.ndarray, np.ndarray, str]:
    """``(train_tokens, heldout_tokens, sha256 of the text)`` of the pydoc topics."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    parts = {"train": [], "heldout": []}
    digest = hashlib.sha256()
    for i, name in enumerate(names):
        digest.update(name.encode() + b"\0" + topics[name].encode() + b"\0")
        split = "heldout" if i % HELDOUT_EVERY == HELDOUT_OFFSET else "train"
        parts[split].append(np.concatenate([[BOS], encode(topics[name]), [EOS]]))
    return (
        np.concatenate(parts["train"]).astype(np.int32),
        np.concatenate(parts["heldout"]).astype(np.int32),
        digest.hexdigest(),
    )


def heldout_windows(stream: np.ndarray, length: int, count: int | None) -> np.ndarray:
    """Non-overlapping windows ``[n, length]`` from the start of ``stream`` (all if count is None)."""
    n = len(stream) // length if count is None else min(count, len(stream) // length)
    return stream[: n * length].reshape(n, length)


def sample_windows(stream: np.ndarray, length: int, batch: int, rng) -> np.ndarray:
    """``batch`` random windows ``[batch, length]`` of ``stream``."""
    starts = rng.integers(0, len(stream) - length + 1, size=batch)
    return stream[starts[:, None] + np.arange(length)]


def addition_task() -> dict[str, dict[str, np.ndarray]]:
    """The train/val/test splits: ``{"id", "tokens" [n, SEQ_LEN], "mask", "prompt_len", "answer"}``.

    ``mask`` is True on the response digits and the EOS; ``tokens`` are
    right-padded with ``PAD``.
    """
    pairs = np.array([(a, b) for a in range(1000) for b in range(10)])
    order = np.random.default_rng(TASK_SEED).permutation(len(pairs))
    cut = {
        "test": order[:N_TEST],
        "val": order[N_TEST : N_TEST + N_VAL],
        "train": order[N_TEST + N_VAL :],
    }
    return {name: _encode_pairs(pairs[np.sort(idx)]) for name, idx in cut.items()}


def _encode_pairs(pairs: np.ndarray) -> dict[str, np.ndarray]:
    n = len(pairs)
    tokens = np.full((n, SEQ_LEN), PAD, np.int32)
    mask = np.zeros((n, SEQ_LEN), bool)
    prompt_len = np.zeros(n, np.int32)
    for r, (a, b) in enumerate(pairs):
        prompt = np.concatenate([[BOS], encode(f"Q: {a}+{b}=\nA: ")])
        response = np.concatenate([encode(str(a + b)), [EOS]])
        p, length = len(prompt), len(prompt) + len(response)
        tokens[r, :length] = np.concatenate([prompt, response])
        mask[r, p:length] = True
        prompt_len[r] = p
    return {
        "id": (10 * pairs[:, 0] + pairs[:, 1]).astype(np.int64),
        "tokens": tokens,
        "mask": mask,
        "prompt_len": prompt_len,
        "answer": pairs.sum(axis=1),
    }


def examples(split: dict[str, np.ndarray]) -> list[dict]:
    """The split as the per-example dicts of :func:`flowjax.bucket_batches` (unpadded)."""
    out = []
    for i, tok, m in zip(split["id"], split["tokens"], split["mask"], strict=True):
        n = int(m.nonzero()[0][-1]) + 1
        out.append({"id": int(i), "tokens": tok[:n], "mask": m[:n]})
    return out
