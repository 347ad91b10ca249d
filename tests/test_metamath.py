"""MetaMathQA's reader and the official prompt, EOS and masking, on fabricated files."""

from __future__ import annotations

import json

import numpy as np
import pytest

import flowjax
from flowjax import datasets

RECORDS = [
    {
        "query": "What is 2+3?",
        "response": "2+3=5.\nThe answer is: 5",
        "type": "GSM_AnsAug",
    },
    {"query": "Solve x+1=3.", "response": "x=2. The answer is: 2", "type": "MATH_SV"},
    {
        "query": "Compute 7*6.",
        "response": "42. The answer is: 42",
        "original_question": "q",
    },
]


def _byte(s):
    return list(s.encode("utf-8"))


@pytest.mark.parametrize("layout", ["json", "jsonl", "dir"])
def test_reader_takes_the_published_json_jsonl_or_a_directory(tmp_path, layout):
    if layout == "jsonl":
        path = tmp_path / "train.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    else:
        path = tmp_path / "MetaMathQA-395K.json"
        path.write_text(json.dumps(RECORDS))
    rows = datasets.metamathqa(tmp_path if layout == "dir" else path)
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [r["query"] for r in rows] == [r["query"] for r in RECORDS]
    assert [r["type"] for r in rows] == ["GSM_AnsAug", "MATH_SV", None]


def test_reader_errors_name_the_file_and_the_bad_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MetaMathQA file"):
        datasets.metamathqa(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="expected exactly one"):
        datasets.metamathqa(tmp_path)
    bad = tmp_path / "MetaMathQA-395K.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        datasets.metamathqa(bad)
    bad.write_text(
        json.dumps([RECORDS[0], {"query": "q"}, RECORDS[1], {"response": 3}])
    )
    with pytest.raises(ValueError, match=r"records \[1, 3\]"):
        datasets.metamathqa(bad)


def test_official_template_eos_and_prompt_mask():
    rec = {"id": 5, **RECORDS[0]}
    ex = datasets.sft_example(rec, _byte, bos_id=256, eos_id=257)
    prompt = (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nWhat is 2+3?\n\n"
        "### Response:"
    )
    assert datasets.ALPACA_TEMPLATE.format(query=rec["query"]) == prompt
    want = [256, *_byte(prompt + rec["response"]), 257]
    assert (
        ex["id"] == 5
        and ex["tokens"].tolist() == want
        and ex["tokens"].dtype == np.int32
    )
    # labels = input_ids with the first len(BOS + prompt) positions ignored (-100)
    labels = np.array(want)
    labels[: 1 + len(_byte(prompt))] = -100
    np.testing.assert_array_equal(ex["mask"], labels != -100)
    assert ex["tokens"][ex["mask"]].tolist() == [*_byte(rec["response"]), 257]


def test_truncation_follows_the_official_code():
    rec = {"id": 0, **RECORDS[1]}
    prompt_len = 1 + len(_byte(datasets.ALPACA_TEMPLATE.format(query=rec["query"])))
    short = datasets.sft_example(
        rec, _byte, bos_id=256, eos_id=257, max_length=prompt_len + 3
    )
    assert (
        len(short["tokens"]) == prompt_len + 3 and short["mask"].sum() == 3
    )  # EOS cut
    assert 257 not in short["tokens"].tolist()
    none = datasets.sft_example(
        rec, _byte, bos_id=256, eos_id=257, max_length=prompt_len - 5
    )
    assert not none["mask"].any()  # the prompt fills it: nothing to train on
    with pytest.raises(ValueError, match="max_length"):
        datasets.sft_example(rec, _byte, bos_id=256, eos_id=257, max_length=1)


def test_a_merge_across_the_prompt_boundary_counts_as_prompt():
    """BPE-like tokenizer: 'e:' + 'x' may merge; the official mask length is the prompt's alone."""

    def encode(s):  # merges ":x" into one token 1000
        out, i = [], 0
        while i < len(s):
            if s[i : i + 2] == ":x":
                out.append(1000)
                i += 2
            else:
                out.append(ord(s[i]))
                i += 1
        return out

    rec = {"id": 1, "query": "q", "response": "x=2"}
    ex = datasets.sft_example(
        rec, encode, bos_id=None, eos_id=9, template="Q {query} A:"
    )
    assert ex["tokens"].tolist() == [*map(ord, "Q q A"), 1000, ord("="), ord("2"), 9]
    # len(encode("Q q A:")) = 6: the merged ':x' token is position 5, masked as prompt
    assert ex["mask"].tolist() == [False] * 6 + [True, True, True]


def test_examples_feed_the_bucketed_lm_pre_pass():
    rows = [{"id": i, **r} for i, r in enumerate(RECORDS)]
    examples = [datasets.sft_example(r, _byte, bos_id=256, eos_id=257) for r in rows]
    batches = list(flowjax.bucket_batches(examples, [256], 2, pad_id=258))
    assert sorted(np.concatenate([b["id"] for b in batches]).tolist()) == [0, 1, 2]
    for b in batches:
        for row, i in zip(b["mask"], b["id"], strict=True):
            np.testing.assert_array_equal(
                row[: len(examples[i]["mask"])], examples[i]["mask"]
            )
