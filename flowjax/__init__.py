"""flowjax: fine-tune pre-trained JAX/Flax models without forgetting.

FLOW (Sanyal et al., ICML 2025) in three steps::

    table = flowjax.per_example_losses(loss_fn, pretrained_params, batches)  # f_i(θ*)
    weights = table.flow_weights()                 # w_i = exp(-f_i(θ*)/τ), τ = median
    objective = flowjax.weighted_objective(loss_fn)  # Σ w_i f_i(θ) / B, for optax

Methods FLOW is compared with and combined with, all composable with FLOW
weights: L2-SP (:func:`l2sp`), EWC (:func:`ewc`, :func:`diagonal_fisher`),
Synaptic Intelligence (:func:`synaptic_intelligence`), LwF distillation
(:func:`lwf_objective`), WiSE-FT (:func:`wise_ft`), LoRA (:func:`add_lora`,
:func:`merge_lora`), replay / DER (:class:`ReplayBuffer`, :func:`der_loss`),
dynamic DRO (:func:`dro_loss`) and frozen parts (:func:`freeze`,
:func:`swap_task_parts`). Language models: :func:`token_nll`,
:func:`chunked_token_nll`, :func:`lm_sequence_losses`, :func:`weighted_lm_loss`.
Input pipeline: :func:`batches`. The linear-model theory of the paper's
section 7 lives in :mod:`flowjax.theory`.
"""

from flowjax.averaging import WiseFTCurve, wise_ft, wise_ft_sweep
from flowjax.chunked_ce import chunked_token_nll
from flowjax.data import ArraySource, batches
from flowjax.distillation import lwf_loss, lwf_objective
from flowjax.dro import dro_loss
from flowjax.fisher import diagonal_fisher
from flowjax.freezing import swap_task_parts, train_only, trainable_mask
from flowjax.lm import (
    response_mask,
    sequence_nll,
    token_flow_weights,
    token_nll,
    weighted_lm_loss,
)
from flowjax.lm_prepass import (
    TokenLosses,
    TokenWeights,
    bucket_batches,
    lm_sequence_losses,
    lm_token_losses,
)
from flowjax.lora import add_lora, merge_lora
from flowjax.objectives import attach_weights, weighted_loss, weighted_objective
from flowjax.prepass import default_mesh, per_example_losses
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
from flowjax.tables import LossTable, WeightTable
from flowjax.weights import dro_weights, flow_weights, median_temperature

__version__ = "0.1.0"

__all__ = [
    "ArraySource",
    "EWCState",
    "L2SPState",
    "LossTable",
    "ReplayBuffer",
    "SIState",
    "TokenLosses",
    "TokenWeights",
    "WeightTable",
    "WiseFTCurve",
    "add_lora",
    "attach_weights",
    "batches",
    "bucket_batches",
    "chunked_token_nll",
    "default_mesh",
    "der_loss",
    "diagonal_fisher",
    "dro_loss",
    "dro_weights",
    "ewc",
    "ewc_penalty",
    "flow_weights",
    "train_only",
    "l2sp",
    "l2sp_penalty",
    "lm_sequence_losses",
    "lm_token_losses",
    "lwf_loss",
    "lwf_objective",
    "median_temperature",
    "merge_lora",
    "per_example_losses",
    "replay_batches",
    "response_mask",
    "sequence_nll",
    "si_consolidate",
    "swap_task_parts",
    "synaptic_intelligence",
    "token_flow_weights",
    "token_nll",
    "trainable_mask",
    "weighted_lm_loss",
    "weighted_loss",
    "weighted_objective",
    "wise_ft",
    "wise_ft_sweep",
]
