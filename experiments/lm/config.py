"""Every hyper-parameter of the LM experiment, as plain data (``results.json`` records it).

``get_config()`` is the measured run (``make lm``); ``get_config(quick=True)`` the smoke-test
variant (``--quick``: a 1-layer model of width 32, 30 pre-training and 12 fine-tuning steps, 256 training
problems, the first seven methods). Fields can be changed from the command line, nested ones with a dot:
``python -m experiments.lm.run --set lora_rank=4 --set pretrain.steps=200``.

The pre-trained model depends on :class:`PretrainConfig` alone: its fields are hashed into the
pre-training cache's fingerprint (:mod:`experiments.lm.pretrain`), so changing a fine-tuning
field never re-runs pre-training. The methods' settings (LoRA rank and targets, the L2-SP
strength, the adapter width and placement, the NF4 block size, I-LoRA's decay and
consistency weight, the prompt and prefix lengths) were fixed in advance, not tuned.
"""

from __future__ import annotations

import dataclasses

from experiments.lm.model import LORA_TARGETS, ModelConfig

ALL_METHODS = (
    "standard",
    "flow_seq",
    "flow_seq_mean1",
    "flow_tok",
    "lora",
    "flow_lora",
    "l2sp",
    "adapters",
    "qlora",
    "flow_qlora",
    "ilora",
    "prompt",
    "prefix",
)
# The methods of the first measured run. A run does not depend on which other methods
# run, but the checkpoint digests of these seven were taken over a config whose
# ``methods`` was this tuple and which had none of :data:`PEFT_FIELDS`: the run digest
# (``FineTuner.run_info``) keeps that view, so their checkpoints keep their names.
FIRST_METHODS = ALL_METHODS[:7]
# Settings of the methods added after the first measured run; each method's digest
# holds the ones it reads (``Method.settings``), no other method's.
PEFT_FIELDS = (
    "adapter_bottleneck",
    "adapter_targets",
    "qlora_block_size",
    "ilora_decay",
    "ilora_consistency",
    "prompt_length",
    "prefix_length",
)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Next-byte pre-training on pydoc text (AdamW, 5 % warm-up, cosine to lr / 10, clip 1).

    ``model``: the tiny Llama's sizes (:class:`~experiments.lm.model.ModelConfig`:
    2 layers, width 128, 4 query and 2 key/value heads, SwiGLU 224, context 64;
    about 337k parameters).
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole experiment: pre-training, the FLOW pre-pass, fine-tuning, evaluation."""

    pretrain: PretrainConfig = PretrainConfig()
    # Fine-tuning (Adam, warm-up + cosine, grad-norm clip; the same for every method).
    ft_steps: int = 400
    ft_batch: int = 16
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    warmup_frac: float = 0.03  # the official 3 % warm-up
    clip_norm: float = 1.0
    # Methods and their settings.
    methods: tuple[str, ...] = ALL_METHODS
    lora_rank: int = 8  # α = r (scale 1), as in the paper
    lora_targets: tuple[str, ...] = LORA_TARGETS
    l2sp_strength: float = 0.1
    # Bottleneck adapters (Houlsby et al. 2019) after the attention output and the MLP
    # down-projection of every layer; width 32 gives about as many trainable parameters
    # as LoRA r=8 on the seven projections (33.4k vs. 31.2k).
    adapter_bottleneck: int = 32
    adapter_targets: tuple[str, ...] = ("o_proj", "down_proj")
    # QLoRA: LoRA (lora_rank, lora_targets) on an NF4 base quantised in blocks of this
    # many input rows (the paper's 64).
    qlora_block_size: int = 64
    # I-LoRA (LoRA rank and targets as above): the weight kept on the slow adapter
    # (the reference's 0.25) and of the consistency loss (the reference's 1); the
    # replayed examples are windows of the pre-training pydoc text.
    ilora_decay: float = 0.25
    ilora_consistency: float = 1.0
    # Prompt tuning (Lester et al. 2021): this many soft-prompt embeddings before the
    # input; prefix tuning (Li & Liang 2021): this many key/value vectors per key/value
    # head in every layer. Both 2,048 trainable numbers on the measured model
    # (16 x 128; 2 layers x 2 x 8 x 2 heads x 32), against LoRA's 31.2k.
    prompt_length: int = 16
    prefix_length: int = 8
    # FLOW pre-pass.
    prepass_batch: int = 256
    # Evaluation.
    ppl_windows: int | None = 512  # None: every held-out window
    max_new_tokens: int = 20  # greedy decoding budget for exact match
    # Retention curves and checkpoints (flowjax.fit, under --out/checkpoints): every this
    # many fine-tuning steps held-out perplexity and validation exact match are measured
    # and the run is checkpointed.
    curve_every: int = 100
    n_train: int | None = None  # None: all 2,200 training problems
    n_eval: int | None = None  # None: all validation / test problems


def get_config(quick: bool = False) -> Config:
    """The measured config, or with ``quick`` the smoke-test one."""
    if not quick:
        return Config()
    return Config(
        pretrain=PretrainConfig(
            model=ModelConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            ),
            steps=30,
        ),
        ft_steps=12,
        ft_batch=16,
        lr_grid=(3e-3,),
        seeds=(0, 1),
        # The first seven methods only (the added ones have their own short fits in
        # tests/test_lm_experiment.py, to keep the smoke test's time).
        methods=FIRST_METHODS,
        lora_rank=2,
        adapter_bottleneck=4,
        prompt_length=4,
        prefix_length=2,
        ppl_windows=32,
        curve_every=4,
        n_train=256,
        n_eval=64,
    )
