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

Then six namespaces (their names are also available flat, as
``flowjax.<name>``):

* :mod:`flowjax.baselines`: the methods FLOW is compared with and combined
  with: L2-SP, EWC and its Fisher, SI, LwF, WiSE-FT, LoRA, QLoRA, I-LoRA, frozen parts
  (:func:`train_only`, NNX filters), replay / DER, DRO;
* :mod:`flowjax.lm`: language models: token and sequence losses, the
  chunked cross-entropy, the LM pre-passes and their tables, the weighted LM
  objective, length-bucketed batches;
* :mod:`flowjax.data`: id-keyed batches from in-memory or random-access
  sources (:func:`batches`, :class:`ArraySource`);
* :mod:`flowjax.train`: the functional train step and loop
  (:func:`init_train_state`, :func:`make_train_step`, :func:`fit`) with
  orbax checkpoints that resume bit-identically after a kill, retention
  monitoring with early stopping (:class:`RetentionMonitor`) and the
  low-LR short-run recipe (:func:`low_lr_recipe`);
* :mod:`flowjax.metrics`: forgetting metrics: retention against the
  pre-trained model, the paper's pre-training/target average, accuracy on
  the hardest k % by pre-trained loss, and for task sequences ACC, BWT, FWT
  and forgetting;
* :mod:`flowjax.diagnostics`: how concentrated FLOW's weights are: the
  effective sample size, the weight histogram (and its plot), the most
  down-weighted examples and a printable :func:`weight_summary`.

The linear-model theory of the paper's section 7 lives in
:mod:`flowjax.theory`. The paper's vision datasets, read from their original
downloads without TensorFlow, and the seeded, resumable image pipeline live in
:mod:`flowjax.datasets` (``from flowjax import datasets``; it needs the
``data`` extra and is not imported by ``import flowjax``). Torchvision-exact
ResNets and their weights loader live in :mod:`flowjax.models` (``import
flowjax.models``; not imported by ``import flowjax`` either), and the
lm-evaluation-harness adapter in :mod:`flowjax.evaluation` (the ``eval`` extra).
"""

# isort: off
# The core: pre-pass, tables, weights, objectives.
from flowjax.prepass import default_mesh, per_example_losses
from flowjax.tables import LossTable, WeightTable
from flowjax.weights import flow_weights, median_temperature
from flowjax.objectives import attach_weights, weighted_loss, weighted_objective

# Namespaces: baselines, language models, data, training, metrics, diagnostics; each
# one's names also flat.
from flowjax import baselines, data, diagnostics, lm, metrics, train
from flowjax.baselines import *  # noqa: F403
from flowjax.lm import *  # noqa: F403
from flowjax.data import *  # noqa: F403
from flowjax.train import *  # noqa: F403
from flowjax.metrics import *  # noqa: F403
from flowjax.diagnostics import *  # noqa: F403
# isort: on

__version__ = "0.2.0"

# Layered, not sorted: the core, the namespaces, then every name of each namespace.
__all__ = [  # noqa: RUF022
    "per_example_losses",
    "default_mesh",
    "LossTable",
    "WeightTable",
    "flow_weights",
    "median_temperature",
    "weighted_objective",
    "weighted_loss",
    "attach_weights",
    "baselines",
    "lm",
    "data",
    "train",
    "metrics",
    "diagnostics",
]
__all__ += baselines.__all__
__all__ += lm.__all__
__all__ += data.__all__
__all__ += train.__all__
__all__ += metrics.__all__
__all__ += diagnostics.__all__
