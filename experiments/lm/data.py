"""Data of the LM experiment: CPython's pydoc topics (pre-training) and an addition Q/A task.

**Pre-training text.** ``pydoc_data.topics.topics`` (79 topics, about 465k
characters of English documentation in CPython 3.11). Topics are sorted by
name; every ``HELDOUT_EVERY``-th one (indices 2, 7, 12, ...) is held out for
perplexity, the others are pre-training text. Each topic is encoded as
``BOS + utf-8 bytes + EOS`` and the topics of a split are concatenated.

**Fine-tuning task.** Addition of ``0 <= a < 1000`` and a small second
operand ``b`` in ``B_VALUES = (1, 2, 3)`` (3,000 problems) in words, tokenised
by :func:`flowjax.datasets.sft_example` (the official rules of the MetaMathQA
pipeline: the record ``{"query": "{a} plus {b}", "response": "The result is
{a+b}."}`` in the template ``PROMPT_TEMPLATE``). The prompt is ``BOS + "What is
{a} plus {b}?\\n"``; the response (the target, prompt masked) is ``"The result
is {a+b}." + EOS``.
The response has an English scaffold (``"The result is "``, ``"."``) whose
bytes and words are common in the pydoc text (``"result"`` 108 times,
``" is "`` 2,000 times, ``"the result is"`` 11 times), so the pre-trained
model already predicts part of it, and the digits it has never seen in this
role: some target tokens are easy and some hard, as in the paper's token
weights (Figure 3). The problems are permuted with
``numpy.random.default_rng(0)``: the first ``N_TEST`` (500) are the test
set, the next ``N_VAL`` (300) the validation set (learning-rate choice), the
rest (2,200) the training set. Example ids are ``10 * a + b``.

Why ``b`` in {1, 2, 3} and not ``0 <= b < 10``: with ``b < 10`` the units
digit of the answer is a 100-entry table (``a % 10``, ``b``), which the
former TinyLM did not learn within the fine-tuning budget of the experiment
(400 steps of batch 16: every method copied ``a`` and stayed at exact match
<= 0.12). With ``b`` in {1, 2, 3} it is a 30-entry table plus the carry;
TinyLM learned it within that budget (standard FT, seed 0, validation exact
match 0.89 at lr 1e-3), the tiny Llama of :mod:`experiments.lm.model` only
partly (0.23 at lr 1e-3, 0.29 at 3e-3; ``results/lm/results.json``).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from experiments.lm.model import BOS, EOS, PAD, encode
from flowjax.datasets import sft_example

HELDOUT_EVERY = 5
HELDOUT_OFFSET = 2
TASK_SEED = 0
N_TEST, N_VAL = 500, 300
B_VALUES = (1, 2, 3)
PROMPT_TEMPLATE = "What is {query}?\n"
SCAFFOLD = "The result is "
RESPONSE = SCAFFOLD + "{s}."
# Longest example: BOS + "What is 999 plus 3?\n" (21) + "The result is 1002." (19) + EOS
# = 41 tokens; SEQ_LEN leaves one more column of padding (a causal model: no effect).
SEQ_LEN = 42
_ANSWER_RE = re.compile(re.escape(SCAFFOLD) + r"(\d+)")


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

    ``mask`` is True on the response (scaffold, digits, ``"."``) and the EOS;
    ``tokens`` are right-padded with ``PAD``.
    """
    pairs = np.array([(a, b) for a in range(1000) for b in B_VALUES])
    order = np.random.default_rng(TASK_SEED).permutation(len(pairs))
    cut = {
        "test": order[:N_TEST],
        "val": order[N_TEST : N_TEST + N_VAL],
        "train": order[N_TEST + N_VAL :],
    }
    return {name: _encode_pairs(pairs[np.sort(idx)]) for name, idx in cut.items()}


def _encode_pairs(pairs: np.ndarray) -> dict[str, np.ndarray]:
    n = len(pairs)
    ids = (10 * pairs[:, 0] + pairs[:, 1]).astype(np.int64)
    tokens = np.full((n, SEQ_LEN), PAD, np.int32)
    mask = np.zeros((n, SEQ_LEN), bool)
    prompt_len = np.zeros(n, np.int32)
    for r, (i, (a, b)) in enumerate(zip(ids, pairs, strict=True)):
        ex = sft_example(
            record(int(i), int(a), int(b)),
            encode,
            bos_id=BOS,
            eos_id=EOS,
            max_length=SEQ_LEN,
            template=PROMPT_TEMPLATE,
        )
        length = len(ex["tokens"])
        tokens[r, :length], mask[r, :length] = ex["tokens"], ex["mask"]
        prompt_len[r] = int(np.argmax(ex["mask"]))  # the first target position
    return {
        "id": ids,
        "tokens": tokens,
        "mask": mask,
        "prompt_len": prompt_len,
        "answer": pairs.sum(axis=1),
    }


def record(i: int, a: int, b: int) -> dict:
    """Problem ``a + b`` as a ``{"id", "query", "response"}`` record of :func:`flowjax.datasets.sft_example`."""
    return {"id": i, "query": f"{a} plus {b}", "response": RESPONSE.format(s=a + b)}


def parse_answer(text: str) -> int | None:
    """The number after the first ``"The result is "`` in ``text`` (None if there is none).

    Exact match counts a greedy completion as correct when this number equals
    ``a + b``: the scaffold must be produced up to the number, what follows
    the number (the ``"."`` and ``EOS``) is not checked.
    """
    m = _ANSWER_RE.search(text)
    return None if m is None else int(m.group(1))


def examples(split: dict[str, np.ndarray]) -> list[dict]:
    """The split as the per-example dicts of :func:`flowjax.bucket_batches` (unpadded)."""
    out = []
    for i, tok, m in zip(split["id"], split["tokens"], split["mask"], strict=True):
        n = int(m.nonzero()[0][-1]) + 1
        out.append({"id": int(i), "tokens": tok[:n], "mask": m[:n]})
    return out
