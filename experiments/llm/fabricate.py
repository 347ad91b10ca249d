"""The tiny config's inputs, made in the workdir: a random Llama-style checkpoint, a tokenizer, MetaMathQA and GSM8K.

Everything the paper configs read from downloads, in the same formats and small:

* ``model/``: a 1-layer Llama 3.2-style :class:`flowjax.models.CausalLM` (grouped-query
  attention, ``llama3`` rope scaling, tied embeddings) with random weights, written by
  :func:`flowjax.models.save_causal_lm` (HF ``config.json`` + ``model.safetensors``)
  beside a byte-level BPE ``tokenizer.json`` (the ``tokenizers`` package, trained on the
  fabricated text; ``<bos>`` added by its post-processor, as Llama's and Gemma's are);
* ``MetaMathQA-395K.json``: ``{"query", "response", "type"}`` records of two-number
  arithmetic in MetaMathQA's style (``"The answer is: N"``);
* ``tasks/``: lm-eval task YAMLs over local JSONL files: ``tiny_gsm8k`` (GSM8K's prompt,
  stop strings and ``#### N`` filters; few-shot examples from its train file) and
  ``tiny_commonsense`` (a multiple-choice task scored by ``acc``).

The files are a pure function of :data:`SPEC`: made once per workdir (a marker holds the
spec's digest), so a rerun finds the same bytes and restores every stage.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from experiments import report

SPEC = {
    "records": 48,
    "gsm_test": 6,
    "gsm_train": 4,
    "mc": 6,
    "vocab_size": 384,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "seed": 0,
}


def _problems(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(1, 60), rng.randint(1, 40)) for _ in range(n)]


def _metamath(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i, (a, b) in enumerate(_problems(rng, n)):
        if i % 2:
            q = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
            r = f"Tom has {a} + {b} = {a + b} apples.\nThe answer is: {a + b}"
            kind = "GSM_AnsAug"
        else:
            q = f"What is the value of ${a} + {b}$?"
            r = f"Adding, we get ${a} + {b} = {a + b}$.\nThe answer is: {a + b}"
            kind = "MATH_AnsAug"
        out.append({"query": q, "response": r, "type": kind})
    return out


def _gsm(rng: random.Random, n: int) -> list[dict]:
    return [
        {
            "question": f"Ann has {a} pens and gets {b} more. How many pens does she have?",
            "answer": f"Ann has {a} + {b} = {a + b} pens.\n#### {a + b}",
        }
        for a, b in _problems(rng, n)
    ]


def _mc(n: int) -> list[dict]:
    facts = [
        ("Water is", ["wet", "dry"], 0),
        ("Fire is", ["cold", "hot"], 1),
        ("Ice is", ["cold", "hot"], 0),
        ("The sun is", ["bright", "dark"], 0),
        ("Night is", ["bright", "dark"], 1),
        ("Sugar is", ["sour", "sweet"], 1),
    ]
    return [{"question": q, "choices": c, "answer": a} for q, c, a in (facts * n)[:n]]


def _tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<bos>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    return tok


def _task_yaml(name: str, files: dict[str, Path], spec: list[str]) -> str:
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {path}" for split, path in files.items()]
    return "\n".join(lines + spec) + "\n"


GSM_SPEC = [  # lm-eval's gsm8k.yaml, on local files
    "output_type: generate_until",
    "training_split: train",
    "fewshot_split: train",
    "test_split: test",
    'doc_to_text: "Question: {{question}}\\nAnswer:"',
    'doc_to_target: "{{answer}}"',
    "metric_list:",
    "  - metric: exact_match",
    "    aggregation: mean",
    "    higher_is_better: true",
    "    ignore_case: true",
    "    ignore_punctuation: false",
    "    regexes_to_ignore:",
    '      - ","',
    '      - "\\\\$"',
    '      - "(?s).*#### "',
    '      - "\\\\.$"',
    "generation_kwargs:",
    "  until:",
    '    - "Question:"',
    '    - "</s>"',
    "  do_sample: false",
    "  temperature: 0.0",
    "  max_gen_toks: 24",
    "filter_list:",
    '  - name: "strict-match"',
    "    filter:",
    '      - function: "regex"',
    '        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"',
    '      - function: "take_first"',
    '  - name: "flexible-extract"',
    "    filter:",
    '      - function: "regex"',
    "        group_select: -1",
    '        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"',
    '      - function: "take_first"',
]

MC_SPEC = [
    "output_type: multiple_choice",
    "test_split: test",
    'doc_to_text: "{{question}}"',
    'doc_to_choice: "{{choices}}"',
    'doc_to_target: "{{answer}}"',
    "metric_list:",
    "  - metric: acc",
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make(root: Path) -> dict[str, str]:
    """Writes the tiny inputs under ``root`` (once) and returns the config fields that name them."""
    from flax import nnx

    from flowjax import models

    root = Path(root)
    fields = {
        "checkpoint": str(root / "model"),
        "data": str(root / "MetaMathQA-395K.json"),
        "eval_include_path": str(root / "tasks"),
    }
    marker = root / "fabricated.json"
    spec_digest = report.digest(SPEC)
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec_digest:
        return fields
    rng = random.Random(SPEC["seed"])
    records = _metamath(rng, SPEC["records"])
    gsm_train, gsm_test = _gsm(rng, SPEC["gsm_train"]), _gsm(rng, SPEC["gsm_test"])
    mc = _mc(SPEC["mc"])
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "model").mkdir(parents=True, exist_ok=True)
    Path(fields["data"]).write_text(json.dumps(records, indent=1))
    files = {
        "train": _jsonl(root / "tasks" / "tiny_gsm8k_train.jsonl", gsm_train),
        "test": _jsonl(root / "tasks" / "tiny_gsm8k_test.jsonl", gsm_test),
    }
    (root / "tasks" / "tiny_gsm8k.yaml").write_text(
        _task_yaml("tiny_gsm8k", files, GSM_SPEC)
    )
    files = {"test": _jsonl(root / "tasks" / "tiny_commonsense.jsonl", mc)}
    (root / "tasks" / "tiny_commonsense.yaml").write_text(
        _task_yaml("tiny_commonsense", files, MC_SPEC)
    )
    from flowjax.datasets.metamath import ALPACA_TEMPLATE

    texts = [ALPACA_TEMPLATE.format(query=r["query"]) + r["response"] for r in records]
    texts += [f"Question: {g['question']}\nAnswer: {g['answer']}" for g in gsm_train]
    tok = _tokenizer(texts, SPEC["vocab_size"])
    tok.save(str(root / "model" / "tokenizer.json"))
    hf = {
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": SPEC["hidden_size"],
        "intermediate_size": SPEC["intermediate_size"],
        "num_hidden_layers": SPEC["num_hidden_layers"],
        "num_attention_heads": SPEC["num_attention_heads"],
        "num_key_value_heads": SPEC["num_key_value_heads"],
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
    }
    lm = models.CausalLM(models.LMConfig.from_hf(hf), rngs=nnx.Rngs(SPEC["seed"]))
    # Random N(0, 1) embeddings give logits of size sqrt(D) · |h|: scale them to a plausible
    # "pre-trained" spread so that the pre-pass losses vary between examples.
    emb = lm.embed_tokens.embedding
    emb.set_value(emb.get_value() * 0.5)
    models.save_causal_lm(
        lm,
        root / "model",
        config_extra={
            "bos_token_id": tok.token_to_id("<bos>"),
            "eos_token_id": tok.token_to_id("<eos>"),
        },
    )
    marker.write_text(json.dumps({"spec": spec_digest}))
    return fields
