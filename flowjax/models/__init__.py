"""Vision models for the paper's experiments: torchvision-exact ResNets in Flax NNX.

FLOW's vision results (paper Table 1) fine-tune ImageNet-1K ResNet-18 and
ResNet-50. This namespace builds them with torchvision's layout and numerics
(symmetric padding, −∞-padded max-pool, the v1.5 bottleneck, BatchNorm with
torch's ε, momentum and unbiased running variance) and loads timm /
torchvision ``.safetensors`` weights without torch:

* :func:`resnet` (random init) and :func:`load_resnet` (pre-trained weights;
  a fresh head for another ``num_classes``), the :class:`ResNet` module and its
  blocks (:class:`BasicBlock`, :class:`Bottleneck`, :class:`BatchNorm`);
* :func:`torch_state_dict`: the reverse mapping, NNX -> torch names;
* :func:`task_parts`: the head ``fc`` and every BatchNorm, the filter
  :func:`flowjax.swap_task_parts` takes to put the pre-trained parts back for
  the ImageNet retention metric.

Language models (paper Table 2): :func:`load_causal_lm` reads Hugging Face
Llama 3.x / Gemma 2 checkpoints into a :class:`CausalLM` (its
:class:`LMConfig`), sharded on load by :func:`default_partition_spec`;
:func:`load_tokenizer` reads its ``tokenizer.json``; :func:`generate` decodes
greedily with the model's :class:`KVCache`; :func:`save_causal_lm` writes a model
back in the same layout (for transformers or ``lm_eval --model hf``).

The paper's weights are timm's ``resnet18.tv_in1k`` and ``resnet50.ram_in1k``.
Models take NHWC images, keep float32 parameters and compute in ``dtype``
(``jnp.bfloat16`` on accelerators); ``model.eval()`` / ``model.train()``
switch BatchNorm as for any NNX model. Not imported by ``import flowjax``:
``import flowjax.models``.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import flowjax.models
  >>> model = flowjax.models.resnet("resnet18", num_classes=10, rngs=nnx.Rngs(0), width=4)
  >>> model.eval()  # BatchNorm on its running statistics
  >>> forward = nnx.jit(lambda model, x: model(x))
  >>> forward(model, jnp.zeros((2, 32, 32, 3))).shape
  (2, 10)
"""

from flowjax.models.convert import load_resnet, torch_state_dict
from flowjax.models.export import save_causal_lm
from flowjax.models.llm import (
    CausalLM,
    KVCache,
    LMConfig,
    default_partition_spec,
    generate,
    load_causal_lm,
    load_tokenizer,
)
from flowjax.models.resnets import (
    ARCHS,
    BasicBlock,
    BatchNorm,
    Bottleneck,
    ResNet,
    resnet,
    task_parts,
)

__all__ = [
    "ARCHS",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "CausalLM",
    "KVCache",
    "LMConfig",
    "ResNet",
    "default_partition_spec",
    "generate",
    "load_causal_lm",
    "load_resnet",
    "load_tokenizer",
    "resnet",
    "save_causal_lm",
    "task_parts",
    "torch_state_dict",
]
