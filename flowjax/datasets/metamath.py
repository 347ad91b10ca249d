"""MetaMathQA, the paper's LLM fine-tuning set, and the official code's prompt and masking.

FLOW's language results fine-tune Gemma 2 2B and Llama 3.2 3B on MetaMathQA (all
395K ``query`` → ``response`` pairs, FLOW_PAPER.md §2.2). The official code formats
each query with the Alpaca "no-input" template (:data:`ALPACA_TEMPLATE`, nothing
after ``"### Response:"``), appends the EOS token to the response, tokenises the
prompt and the whole example separately (each truncated at 1024 tokens, BOS added by
the tokenizer) and masks the first ``len(prompt tokens)`` positions: prompt tokens are
never trained on or weighted; the response and its EOS are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{query}\n\n### Response:"
)
"""The official prompt (Alpaca, no input); ``{query}`` is the MetaMathQA query."""

_FIELDS = ("query", "response")


def metamathqa(path: str | os.PathLike) -> list[dict]:
    """MetaMathQA records from its published files: ``[{"id", "query", "response", "type"}]``.

    Expected at ``path``: the dataset's ``MetaMathQA-395K.json`` (one JSON list of
    ``{"query", "response", "type", "original_question"}`` objects, as published on the
    Hugging Face hub), a JSON-lines file of such objects (``.jsonl``), a Parquet file
    of the hub's ``train`` split (``.parquet``, read with ``pyarrow`` when installed), or
    a directory holding one of them. The id of a record is its position in the file
    (stable for a given file), the key FLOW's weights are stored under.

    Args:
      path: the file, or a directory containing ``MetaMathQA-395K.json``,
        ``*.jsonl`` or ``*.parquet`` (exactly one).

    Returns:
      The records, in file order, with integer ``"id"``; ``"type"`` is ``None``
      where the file has none.

    Raises:
      FileNotFoundError: no such file, or a directory without a MetaMathQA file.
      ValueError: a file that is not valid JSON / JSON lines, or records without
        a string ``query`` and ``response`` (their ids named).

    Example:
      >>> import json, tempfile, os
      >>> from flowjax import datasets
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "MetaMathQA-395K.json"), "w") as f:
      ...     json.dump([{"query": "What is 2+2?", "response": "2+2=4. The answer is: 4",
      ...                 "type": "GSM_AnsAug"}], f)
      >>> datasets.metamathqa(d)[0]["id"], datasets.metamathqa(d)[0]["type"]
      (0, 'GSM_AnsAug')
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _find(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no MetaMathQA file at {path}.")
    if path.endswith(".parquet"):
        rows = _parquet(path)
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(rows, list):
        raise ValueError(
            f"{path}: expected a list of records, got {type(rows).__name__}."
        )
    bad = [
        i
        for i, r in enumerate(rows)
        if not isinstance(r, dict)
        or not all(isinstance(r.get(k), str) for k in _FIELDS)
    ]
    if bad:
        raise ValueError(
            f"{path}: records {bad[:10]}{' ...' if len(bad) > 10 else ''} ({len(bad)} in "
            "all) lack a string 'query' and 'response'."
        )
    return [
        {"id": i, "query": r["query"], "response": r["response"], "type": r.get("type")}
        for i, r in enumerate(rows)
    ]


def _find(directory: str) -> str:
    names = sorted(os.listdir(directory))
    if "MetaMathQA-395K.json" in names:
        return os.path.join(directory, "MetaMathQA-395K.json")
    found = [n for n in names if n.endswith((".jsonl", ".parquet"))]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{directory} holds no MetaMathQA-395K.json and {len(found)} .jsonl/.parquet "
            f"files ({found}); expected exactly one."
        )
    return os.path.join(directory, found[0])


def _parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow (pip install pyarrow); or pass the "
            "published MetaMathQA-395K.json."
        ) from None
    return pq.read_table(path).to_pylist()


def sft_example(
    record: dict,
    encode: Callable[[str], Sequence[int]],
    *,
    bos_id: int | None,
    eos_id: int,
    max_length: int = 1024,
    template: str = ALPACA_TEMPLATE,
) -> dict:
    """One record tokenised as the official code does: ``{"id", "tokens", "mask"}``.

    .. math::
        s = \\mathrm{BOS} + \\mathrm{enc}(\\text{prompt}), \\quad
        x = \\mathrm{BOS} + \\mathrm{enc}(\\text{prompt} + \\text{response}) + \\mathrm{EOS},
        \\quad \\text{mask}_t = [\\, t \\ge |s| \\,]

    each truncated at ``max_length``: the first ``|s|`` positions (the prompt, as
    the tokenizer saw it alone) are masked, the rest of ``x`` (the response and its
    EOS) are targets. The prompt and the whole example are encoded separately, as in
    the official code, so a token merged across the prompt/response boundary counts
    as prompt. ``tokens``/``mask`` are what :func:`flowjax.bucket_batches` and the LM
    pre-passes take (the mask is never True at position 0).

    Args:
      record: ``{"id", "query", "response"}`` (from :func:`metamathqa`).
      encode: text → token ids WITHOUT special tokens (e.g.
        ``lambda s: tokenizer.encode(s, add_special_tokens=False).ids`` with the
        ``tokenizers`` package).
      bos_id: the BOS id the model's tokenizer adds (Gemma ``<bos>``, Llama
        ``<|begin_of_text|>``), or None if it adds none.
      eos_id: the EOS id appended to the response.
      max_length: the truncation length (the official 1024).
      template: the prompt template with a ``{query}`` field.

    Returns:
      ``{"id": int, "tokens": int32 [T], "mask": bool [T]}``; the mask may be all
      False when truncation removed every response token (the pre-passes and
      :func:`flowjax.bucket_batches` then raise or skip it, by choice).

    Raises:
      ValueError: ``max_length < 2`` or a template without ``{query}``.

    Example:
      >>> from flowjax import datasets
      >>> encode = lambda s: [ord(c) for c in s]  # a byte tokenizer
      >>> ex = datasets.sft_example({"id": 7, "query": "1+1?", "response": "2"}, encode,
      ...                           bos_id=256, eos_id=257, template="Q:{query} A:")
      >>> ex["tokens"].tolist()[-3:], ex["mask"].tolist()[-3:], int(ex["mask"].sum())
      ([58, 50, 257], [False, True, True], 2)
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2; got {max_length}.")
    if "{query}" not in template:
        raise ValueError("template needs a {query} field.")
    prompt = template.format(query=record["query"])
    head = [] if bos_id is None else [bos_id]
    source = (head + list(encode(prompt)))[:max_length]
    full = (head + list(encode(prompt + record["response"])) + [eos_id])[:max_length]
    tokens = np.asarray(full, np.int32)
    mask = np.arange(len(tokens)) >= len(source)
    return {"id": int(record["id"]), "tokens": tokens, "mask": mask}
