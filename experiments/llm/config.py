"""The paper's LLM pipeline as data: one :class:`Config` per run, the official settings in :func:`paper`.

A config file (``experiments/llm/configs/<name>.py``, big_vision style) defines
``get_config() -> Config``; ``python -m experiments.llm.run --config FILE --workdir DIR
--set field=value`` overrides single fields (``experiments.cli.override``).

The official settings (FLOW_PAPER.md §2.2, the ``language/`` scripts of
github.com/sanyalsunny111/FLOW_finetuning):

* Data: MetaMathQA, all 395K ``query`` → ``response`` pairs; the Alpaca no-input
  template, nothing after ``"### Response:"``; response + EOS as the target, prompt
  masked; truncation at 1024 tokens; the tokenizer's BOS first.
* Pre-pass: the PRE-TRAINED model, float32; sequence loss = mean NLL of the response
  tokens (EOS included); τ = median; ``w = exp(-loss / τ)``; token-level weights are
  the ablation (``weighting="token"``).
* Training: HF Trainer defaults the script does not change: AdamW β = (0.9, 0.999),
  ε = 1e-8, weight decay 0, gradient clipping at global norm 1, cosine schedule with
  3 % linear warm-up; 2 epochs; per-device batch 4 × 32 accumulation = 128 sequences
  per optimiser step; seed 42; learning rate 1e-5 (``launch_ft_arithmetic.slurm``;
  the paper's per-model rates were NOT FOUND: run-directory names also show 2e-5 and
  5e-6, so treat ``lr`` as the first field to tune).
* Loss: ``Σ_i w_i Σ_t nll_it / N`` with ``N`` the UNWEIGHTED number of target tokens
  of the whole effective batch (all micro-batches and devices;
  ``flowjax.weighted_lm_loss(reduction="tokens", denominator=N)``).
* LoRA: r = 64, α = 64 (scale 1), no dropout, on q, k, v, o, gate, up, down; merged
  before evaluation. ℓ2: ``λ · mean_k (θ_k − θ₀_k)²`` with λ = 1e-3
  (``flowjax.l2sp(scale="num_params")``). WiSE-FT: ``0.5 θ_pre + 0.5 θ_FT``.
* Evaluation: lm-evaluation-harness: GSM8K 5-shot (the target; ``#### N`` strict
  match), MMLU (5-shot as the paper says; the shipped script ran lm-eval's 0-shot
  default), MBPP 3-shot pass@1, and the commonsense six (ARC-E, ARC-C, HellaSwag,
  PIQA, SIQA, OBQA; 0-shot; their mean).

``method`` is one of :data:`METHODS`. ``qlora`` / ``flow_qlora`` are LoRA with the same
r, α and targets on an NF4-quantised frozen base (``flowjax.add_qlora``, blocks of
``qlora_block_size`` along each kernel's input axis; Dettmers et al. 2023); the paper has
no QLoRA row, so these are ours. The exported model is the dequantised base plus the
merged factors (``flowjax.dequantize_qlora`` then ``flowjax.merge_lora``), as QLoRA
models are merged for serving: it differs from the pre-trained weights by the NF4
error in every targeted projection, as well as by what was learnt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from experiments import cli
from flowjax.datasets.metamath import ALPACA_TEMPLATE

METHODS = ("ft", "flow", "lora", "flow_lora", "qlora", "flow_qlora", "l2", "wise_ft")
"""``ft``: full fine-tuning; ``flow``: full FT with FLOW weights; ``lora``, ``flow_lora``;
``qlora``, ``flow_qlora`` (LoRA on an NF4 base); ``l2``: full FT + ℓ2 toward θ₀;
``wise_ft``: ``ft`` averaged with θ₀."""

LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

COMMONSENSE = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "social_iqa",
    "openbookqa",
)

# (Table 2 column, lm-eval task, result key, few-shot): a column is the mean of its tasks.
PAPER_TASKS: tuple[tuple[str, str, str, int], ...] = (
    *(("commonsense", t, "acc,none", 0) for t in COMMONSENSE),
    ("mmlu", "mmlu", "acc,none", 5),
    ("mbpp", "mbpp", "pass_at_1,none", 3),
    ("gsm8k", "gsm8k", "exact_match,strict-match", 5),
)

TARGET_COLUMN = "gsm8k"
GENERAL_COLUMNS = ("commonsense", "mmlu", "mbpp")

# FLOW_PAPER.md §3.2: the paper's text gives differences, not the absolute Table 2 values
# (those were NOT FOUND). "FLOW − FT" is Table 2 for Gemma 2 2B; Table 4 gives ranges over
# the general-capability columns (its FLOW + ℓ2 vs ℓ2 row, general +0.5 to +1.80 and GSM8K
# −0.83, has no method here yet). Llama 3.2 3B: "a similar trend", no numbers.
PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    "gemma2_2b": {
        "flow - ft": {"commonsense": 2.52, "mmlu": 3.73, "mbpp": 10.00, "gsm8k": -0.83},
        "flow_lora - lora": {"general": (1.07, 3.40), "gsm8k": 1.06},
    },
    "llama3_2_3b": {},
}

MODELS = {
    "gemma2_2b": {"hf": "google/gemma-2-2b", "lr": 1e-5},
    "llama3_2_3b": {"hf": "meta-llama/Llama-3.2-3B", "lr": 1e-5},
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run of :mod:`experiments.llm.run` depends on (see the module doc)."""

    # Model: an HF directory (config.json, *.safetensors, tokenizer.json) for load_causal_lm.
    model: str = "gemma2_2b"  # the name in tables and PAPER_NUMBERS
    checkpoint: str = (
        ""  # e.g. /abs/gemma-2-2b (huggingface-cli download google/gemma-2-2b)
    )
    tokenizer: str = ""  # "" : the checkpoint directory's tokenizer.json
    dtype: str = "float32"  # parameter and compute dtype ("bfloat16" halves memory)
    mesh: tuple[int, int] = (
        -1,
        1,
    )  # ('data', 'model') sizes; -1: the remaining devices
    bos_id: int = -1  # -1: config.json's bos_token_id
    eos_id: int = (
        -1
    )  # -1: config.json's eos_token_id (also the padding id, as officially)
    # Data: MetaMathQA-395K.json (or its .jsonl / .parquet) from a local path.
    data: str = ""
    data_limit: int | None = None  # the first N records (None: all 395K)
    template: str = ALPACA_TEMPLATE
    max_length: int = 1024
    bucket_lengths: tuple[int, ...] = (256, 512, 1024)
    # Method.
    method: str = "flow"
    weighting: str = (
        "sequence"  # FLOW weights per "sequence" (paper) or per "token" (ablation)
    )
    temperature: float | None = None  # None: the median pre-trained loss (τ)
    prepass_batch_size: int = 8
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    qlora_block_size: int = 64  # NF4 block (qlora, flow_qlora)
    l2_strength: float = 1e-3
    wise_alpha: float = 0.5  # weight on the PRE-TRAINED model
    # Optimisation (HF Trainer defaults of the official script).
    epochs: int = 2
    batch_size: int = (
        128  # sequences per optimiser step (micro_batch_size × accumulation)
    )
    micro_batch_size: int = 4
    lr: float = 1e-5
    warmup_ratio: float = 0.03
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    chunked_ce: int = (
        0  # training and the probe: vocabulary chunk of chunked_token_nll (0: full
    )
    # logits); the pre-pass always builds full logits: keep prepass_batch_size small at 256k
    seed: int = 42
    checkpoint_every: int = 256  # micro-steps between train-state checkpoints
    # Retention: held-out text perplexity while training (flowjax.RetentionMonitor).
    retention_text: str = ""  # a UTF-8 file; "": CPython's pydoc_data topics (offline)
    retention_windows: int = 16
    retention_window: int = 1024
    retention_every: int = 512  # micro-steps between probes (0: only at the end)
    retention_budget: float | None = (
        None  # stop when ppl₀ / ppl drops below it (None: never)
    )
    # Evaluation: lm-evaluation-harness through flowjax.evaluation.harness_lm.
    tasks: tuple[tuple[str, str, str, int], ...] = PAPER_TASKS
    eval_include_path: str = ""  # a directory of local task YAMLs (offline evaluation)
    eval_include_defaults: bool = True  # also index lm-eval's own tasks (about 30 s)
    eval_limit: int | None = None  # documents per task (None: all)
    eval_batch_size: int = 32
    eval_max_length: int = 4096
    eval_bucket: int = 128
    eval_bootstrap_iters: int = 100000
    confirm_run_unsafe_code: bool = True  # MBPP executes the generated code

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {METHODS}.")
        if self.weighting not in ("sequence", "token"):
            raise ValueError(
                f"weighting must be 'sequence' or 'token'; got {self.weighting!r}."
            )
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}."
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimiser step."""
        return self.batch_size // self.micro_batch_size

    @property
    def flow(self) -> bool:
        return self.method in ("flow", "flow_lora", "flow_qlora")

    @property
    def lora(self) -> bool:
        """LoRA factors are what is trained (on a float or an NF4 base)."""
        return self.method in ("lora", "flow_lora", "qlora", "flow_qlora")

    @property
    def qlora(self) -> bool:
        return self.method in ("qlora", "flow_qlora")


def paper(model: str, method: str, **overrides: Any) -> Config:
    """The official recipe for ``model`` (a key of :data:`MODELS`) and ``method``."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}.")
    cfg = Config(model=model, method=method, lr=MODELS[model]["lr"])
    return dataclasses.replace(cfg, **overrides)


def load(path: str | Path) -> Config:
    """``get_config()`` of a config file."""
    return cli.load_config(path, Config)
