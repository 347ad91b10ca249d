"""flowjax: fine-tune pre-trained JAX/Flax models without forgetting.

The core is FLOW (Sanyal et al., ICML 2025) in four steps, the first names
here::

    table = flowjax.per_example_losses(loss_fn, pretrained_params, batches)  # f_i(θ*)
    weights = table.flow_weights()           # w_i = exp(-f_i(θ*)/τ), τ = median
    batch = flowjax.attach_weights(batch, weights)   # by example id
    objective = flowjax.weighted_objective(loss_fn)  # Σ w_i f_i(θ) / B, for optax

* pre-pass: :func:`per_example_losses` (run the frozen model in eval mode:
  ``model.eval()`` or ``nnx.view(model, use_running_average=True)``);
* tables: :class:`LossTable`, :class:`WeightTable` (id-keyed, saved and
  loaded);
* weights: :func:`flow_weights`, :func:`median_temperature`;
* objectives: :func:`weighted_objective` (per example, or ``batched=True``
  for BatchNorm models), :func:`weighted_loss`, :func:`attach_weights`.

Then three namespaces (their names are also available flat, as
``flowjax.<name>``):

* :mod:`flowjax.baselines`: the methods FLOW is compared with and combined
  with: L2-SP, EWC and its Fisher, SI, LwF, WiSE-FT, LoRA, frozen parts
  (:func:`train_only`, NNX filters), replay / DER, DRO;
* :mod:`flowjax.lm`: language models: token and sequence losses, the
  chunked cross-entropy, the LM pre-passes and their tables, the weighted LM
  objective, length-bucketed batches;
* :mod:`flowjax.data`: id-keyed batches from in-memory or random-access
  sources (:func:`batches`, :class:`ArraySource`).

The linear-model theory of the paper's section 7 lives in
:mod:`flowjax.theory`.
"""

# isort: off
# The core: pre-pass, tables, weights, objectives.
from flowjax.prepass import default_mesh, per_example_losses
from flowjax.tables import LossTable, WeightTable
from flowjax.weights import flow_weights, median_temperature
from flowjax.objectives import attach_weights, weighted_loss, weighted_objective

# Namespaces: baselines, language models, data.
from flowjax import baselines, data, lm
from flowjax.baselines import (
    EWCState,
    L2SPState,
    ReplayBuffer,
    SIState,
    WiseFTCurve,
    add_lora,
    der_loss,
    diagonal_fisher,
    dro_loss,
    dro_weights,
    ewc,
    ewc_penalty,
    l2sp,
    l2sp_penalty,
    lwf_loss,
    lwf_objective,
    merge_lora,
    replay_batches,
    si_consolidate,
    swap_task_parts,
    synaptic_intelligence,
    train_only,
    trainable_mask,
    wise_ft,
    wise_ft_sweep,
)
from flowjax.lm import (
    TokenLosses,
    TokenWeights,
    bucket_batches,
    chunked_token_nll,
    lm_sequence_losses,
    lm_token_losses,
    response_mask,
    sequence_nll,
    token_flow_weights,
    token_nll,
    weighted_lm_loss,
)
from flowjax.data import ArraySource, batches
# isort: on

__version__ = "0.1.0"

# Layered, not sorted: the core, the namespaces, then every name of each namespace.
__all__ = [  # noqa: RUF022
    # core: pre-pass, tables, weights, objectives
    "per_example_losses",
    "default_mesh",
    "LossTable",
    "WeightTable",
    "flow_weights",
    "median_temperature",
    "weighted_objective",
    "weighted_loss",
    "attach_weights",
    # namespaces
    "baselines",
    "lm",
    "data",
    # flowjax.baselines
    "EWCState",
    "L2SPState",
    "ReplayBuffer",
    "SIState",
    "WiseFTCurve",
    "add_lora",
    "der_loss",
    "diagonal_fisher",
    "dro_loss",
    "dro_weights",
    "ewc",
    "ewc_penalty",
    "l2sp",
    "l2sp_penalty",
    "lwf_loss",
    "lwf_objective",
    "merge_lora",
    "replay_batches",
    "si_consolidate",
    "swap_task_parts",
    "synaptic_intelligence",
    "train_only",
    "trainable_mask",
    "wise_ft",
    "wise_ft_sweep",
    # flowjax.lm
    "TokenLosses",
    "TokenWeights",
    "bucket_batches",
    "chunked_token_nll",
    "lm_sequence_losses",
    "lm_token_losses",
    "response_mask",
    "sequence_nll",
    "token_flow_weights",
    "token_nll",
    "weighted_lm_loss",
    # flowjax.data
    "ArraySource",
    "batches",
]
