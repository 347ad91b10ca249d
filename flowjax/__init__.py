"""flowjax: fine-tune pre-trained JAX/Flax models without forgetting.

FLOW (Sanyal et al., ICML 2025) in three steps::

    table = flowjax.per_example_losses(loss_fn, pretrained_params, batches)  # f_i(θ*)
    weights = table.flow_weights()                 # w_i = exp(-f_i(θ*)/τ), τ = median
    objective = flowjax.weighted_objective(loss_fn)  # Σ w_i f_i(θ) / B, for optax

The linear-model theory of the paper's section 7 lives in :mod:`flowjax.theory`.
"""

from flowjax.data import ArraySource, batches
from flowjax.fisher import diagonal_fisher
from flowjax.freezing import freeze, swap_task_parts, trainable_mask
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
from flowjax.tables import LossTable, WeightTable
from flowjax.weights import dro_weights, flow_weights, median_temperature

__version__ = "0.1.0"

__all__ = [
    "ArraySource",
    "EWCState",
    "L2SPState",
    "LossTable",
    "SIState",
    "WeightTable",
    "add_lora",
    "attach_weights",
    "batches",
    "default_mesh",
    "diagonal_fisher",
    "dro_weights",
    "ewc",
    "ewc_penalty",
    "flow_weights",
    "freeze",
    "l2sp",
    "l2sp_penalty",
    "median_temperature",
    "merge_lora",
    "per_example_losses",
    "si_consolidate",
    "swap_task_parts",
    "synaptic_intelligence",
    "trainable_mask",
    "weighted_loss",
    "weighted_objective",
]
