"""The whole LLM pipeline on CPU in under a minute: a fabricated checkpoint, MetaMathQA and GSM8K.

    python -m experiments.llm.run --config experiments/llm/configs/tiny.py --workdir /tmp/llm

With ``checkpoint`` empty, ``experiments.llm.fabricate`` writes into ``<workdir>/fabricated``
a 1-layer random Llama-style checkpoint (HF layout, ``save_causal_lm``), its byte-level BPE
``tokenizer.json``, 48 MetaMathQA-style records and two local lm-eval tasks (a GSM8K-style
``generate_until`` task with the ``#### N`` filter, 2-shot, and a multiple-choice task).
The numbers mean nothing about FLOW (a random model); every step of the paper's pipeline
runs: tokenising with the official template, the bucketed pre-pass, τ, FLOW weights,
training with gradient accumulation (4 micro-batches per step), checkpoints, the retention
probe, export, reload and lm-eval. ``--set method=lora`` (or any method) runs the others.
"""

from experiments.llm.config import Config


def get_config():
    return Config(
        model="tiny",
        method="flow",
        bucket_lengths=(128, 192),
        max_length=192,
        prepass_batch_size=8,
        epochs=1,
        batch_size=8,
        micro_batch_size=2,
        lr=3e-3,
        lora_rank=4,
        lora_alpha=4.0,
        checkpoint_every=8,
        retention_windows=2,
        retention_window=64,
        retention_every=8,
        tasks=(
            ("commonsense", "tiny_commonsense", "acc,none", 0),
            ("gsm8k", "tiny_gsm8k", "exact_match,strict-match", 2),
        ),
        eval_include_defaults=False,
        eval_batch_size=16,
        eval_max_length=512,
        eval_bucket=128,
        eval_bootstrap_iters=0,
        confirm_run_unsafe_code=False,
    )
