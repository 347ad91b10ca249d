"""The methods FLOW is compared with and combined with, in one namespace.

Every one composes with FLOW's weights (fine-tune on
:func:`flowjax.weighted_objective` and add the method):

* parameter-space regularisers, as optax transforms put first in the chain:
  L2-SP (:func:`l2sp`, :func:`l2sp_penalty`), EWC (:func:`ewc`,
  :func:`ewc_penalty`, with :func:`diagonal_fisher`), Synaptic Intelligence
  (:func:`synaptic_intelligence`, :func:`si_consolidate`);
* function-space: LwF distillation (:func:`lwf_loss`, :func:`lwf_objective`);
* weight averaging: WiSE-FT (:func:`wise_ft`, :func:`wise_ft_sweep`);
* parameter-efficient and partial fine-tuning: LoRA (:func:`add_lora`,
  :func:`merge_lora`), QLoRA on an NF4 base (:func:`add_qlora`,
  :func:`dequantize_qlora`, :func:`nf4_quantize`), I-LoRA's fast and slow
  adapters (:func:`ilora`, :func:`ilora_slow_update`,
  :func:`ilora_consistency_loss`), bottleneck adapters (:func:`add_adapters`,
  :func:`remove_adapters`, :class:`AdapterParam`), prompt and prefix tuning
  (:class:`PromptTuning`, :class:`PrefixTuning`, :func:`prefix_attention`),
  frozen parts (:func:`train_only`,
  :func:`trainable_mask`) and swapping task parts back
  (:func:`swap_task_parts`);
* architecture: PackNet (:func:`packnet_init`, :func:`packnet_prune`,
  :func:`packnet_freeze_batchnorm`,
  :func:`packnet_start_task`, :func:`packnet_updates`,
  :func:`packnet_task_params`) and progressive networks
  (:class:`ProgressiveMLP`, :class:`ProgressiveCNN`);
* data: replay / DER (:class:`ReplayBuffer`, :func:`replay_batches`,
  :func:`der_loss`) and dynamic DRO (:func:`dro_loss`, :func:`dro_weights`).

Parameter subsets are selected with Flax NNX filters, unchanged
(``nnx.PathContains("head")``, ``nnx.LoRAParam``, ``nnx.All`` / ``nnx.Not``),
or boolean mask pytrees. Every name here is also available as
``flowjax.<name>``.

Example:
  >>> import optax
  >>> from flax import nnx
  >>> from flowjax import baselines
  >>> tx = optax.chain(baselines.l2sp(1e-2), optax.adam(1e-3))
  >>> head_only = baselines.train_only(optax.sgd(0.1), nnx.PathContains("head"))
"""

from flowjax.adapters import (
    AdaptedLayer,
    Adapter,
    AdapterParam,
    add_adapters,
    remove_adapters,
)
from flowjax.averaging import WiseFTCurve, wise_ft, wise_ft_sweep
from flowjax.distillation import lwf_loss, lwf_objective
from flowjax.dro import dro_loss
from flowjax.fisher import diagonal_fisher
from flowjax.freezing import swap_task_parts, train_only, trainable_mask
from flowjax.ilora import (
    ILoRAState,
    ilora,
    ilora_consistency_loss,
    ilora_slow_update,
)
from flowjax.lora import add_lora, merge_lora
from flowjax.packnet import (
    packnet_freeze_batchnorm,
    packnet_init,
    packnet_prune,
    packnet_start_task,
    packnet_task_params,
    packnet_updates,
)
from flowjax.progressive import ProgressiveCNN, ProgressiveMLP
from flowjax.prompts import (
    PrefixParam,
    PrefixTuning,
    PromptParam,
    PromptTuning,
    prefix_attention,
)
from flowjax.qlora import (
    NF4,
    QLoRALinear,
    add_qlora,
    dequantize_qlora,
    nf4_dequantize,
    nf4_quantize,
)
from flowjax.regularizers import (
    EWCState,
    L2SPState,
    SIState,
    ewc,
    ewc_penalty,
    l2sp,
    l2sp_penalty,
    si_consolidate,
    synaptic_intelligence,
)
from flowjax.replay import ReplayBuffer, der_loss, replay_batches
from flowjax.weights import dro_weights

__all__ = [
    "NF4",
    "AdaptedLayer",
    "Adapter",
    "AdapterParam",
    "EWCState",
    "ILoRAState",
    "L2SPState",
    "PrefixParam",
    "PrefixTuning",
    "ProgressiveCNN",
    "ProgressiveMLP",
    "PromptParam",
    "PromptTuning",
    "QLoRALinear",
    "ReplayBuffer",
    "SIState",
    "WiseFTCurve",
    "add_adapters",
    "add_lora",
    "add_qlora",
    "dequantize_qlora",
    "der_loss",
    "diagonal_fisher",
    "dro_loss",
    "dro_weights",
    "ewc",
    "ewc_penalty",
    "ilora",
    "ilora_consistency_loss",
    "ilora_slow_update",
    "l2sp",
    "l2sp_penalty",
    "lwf_loss",
    "lwf_objective",
    "merge_lora",
    "nf4_dequantize",
    "nf4_quantize",
    "packnet_freeze_batchnorm",
    "packnet_init",
    "packnet_prune",
    "packnet_start_task",
    "packnet_task_params",
    "packnet_updates",
    "prefix_attention",
    "remove_adapters",
    "replay_batches",
    "si_consolidate",
    "swap_task_parts",
    "synaptic_intelligence",
    "train_only",
    "trainable_mask",
    "wise_ft",
    "wise_ft_sweep",
]
