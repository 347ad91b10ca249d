"""flowjax: fine-tune pre-trained JAX/Flax models without forgetting.

FLOW (Sanyal et al., ICML 2025) in three steps::

    table = flowjax.per_example_losses(loss_fn, pretrained_params, batches)  # f_i(θ*)
    weights = table.flow_weights()                 # w_i = exp(-f_i(θ*)/τ), τ = median
    objective = flowjax.weighted_objective(loss_fn)  # Σ w_i f_i(θ) / B, for optax

The linear-model theory of the paper's section 7 lives in :mod:`flowjax.theory`.
"""

from flowjax.chunked_ce import chunked_token_nll
from flowjax.lm import (
    response_mask,
    sequence_nll,
    token_flow_weights,
    token_nll,
    weighted_lm_loss,
)
from flowjax.lm_prepass import (
    TokenLosses,
    bucket_batches,
    lm_sequence_losses,
    lm_token_losses,
)
from flowjax.objectives import attach_weights, weighted_loss, weighted_objective
from flowjax.prepass import default_mesh, per_example_losses
from flowjax.tables import LossTable, WeightTable
from flowjax.weights import dro_weights, flow_weights, median_temperature

__version__ = "0.1.0"

__all__ = [
    "LossTable",
    "TokenLosses",
    "WeightTable",
    "attach_weights",
    "bucket_batches",
    "chunked_token_nll",
    "default_mesh",
    "dro_weights",
    "flow_weights",
    "lm_sequence_losses",
    "lm_token_losses",
    "median_temperature",
    "per_example_losses",
    "response_mask",
    "sequence_nll",
    "token_flow_weights",
    "token_nll",
    "weighted_lm_loss",
    "weighted_loss",
    "weighted_objective",
]
