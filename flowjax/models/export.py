"""Writing a :class:`~flowjax.models.CausalLM` back as a Hugging Face checkpoint directory.

:func:`save_causal_lm` is the inverse of :func:`~flowjax.models.load_causal_lm`:
``config.json`` (:meth:`LMConfig.to_hf`) and the weights as safetensors under
the checkpoint's tensor names, torch layout (kernels transposed back to
``(out, in)``), one ``model.safetensors`` or, above ``max_shard_bytes``,
``model-0000k-of-0000n.safetensors`` files with a ``model.safetensors.index.json``
as transformers writes them. So a model fine-tuned here is read by
``transformers.AutoModelForCausalLM.from_pretrained`` and by
``lm_eval --model hf`` for a cross-check, and by ``load_causal_lm`` again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from flowjax.models.llm import _LEAF, CausalLM, _hf_name, _require

__all__ = ["save_causal_lm"]

_DEFAULT_SHARD = 5 * 2**30  # transformers' default max_shard_size, "5GB"


def _host(value: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from every process if it is spread over them)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def save_causal_lm(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    config_extra: Mapping[str, Any] | None = None,
    max_shard_bytes: int = _DEFAULT_SHARD,
) -> list[str]:
    """Writes ``model`` as a Hugging Face directory that :func:`load_causal_lm` and transformers read.

    Tensors are fetched one at a time (gathered across processes when the
    model is sharded over several hosts) and written by process 0 only, so
    peak host memory is one shard file. Parameters keep their dtype (bf16
    stays bf16). A model with LoRA factors, adapters or other extra
    variables is refused: merge them first (:func:`flowjax.merge_lora`).

    Args:
      model: the model (a :class:`CausalLM`).
      path: the directory; created if missing. Existing weight files of an
        earlier save are replaced.
      config_extra: extra ``config.json`` fields (``bos_token_id``,
        ``eos_token_id``, ``max_position_embeddings``, ...).
      max_shard_bytes: the largest safetensors file; bigger models are split
        into numbered files with an index.

    Returns:
      The files written, relative to ``path`` (empty on processes other than 0).

    Raises:
      TypeError: ``model`` is not a :class:`CausalLM`.
      ValueError: the model holds variables with no checkpoint name (named);
        ``max_shard_bytes`` is not positive.

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flowjax.models import CausalLM, LMConfig, load_causal_lm, save_causal_lm
      >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
      ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
      ...     "num_attention_heads": 2, "num_key_value_heads": 1})
      >>> lm = CausalLM(cfg, rngs=nnx.Rngs(0))
      >>> d = tempfile.mkdtemp()
      >>> save_causal_lm(lm, d)
      ['config.json', 'model.safetensors']
      >>> x = jnp.arange(6)[None]
      >>> bool((load_causal_lm(d)(x) == lm(x)).all())
      True
    """
    if not isinstance(model, CausalLM):
        raise TypeError(
            f"save_causal_lm writes a CausalLM, not {type(model).__name__}."
        )
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    st = _require("safetensors.numpy", "save_causal_lm")
    flat = list(nnx.to_flat_state(nnx.state(model)))
    foreign = [
        "/".join(map(str, p))
        for p, v in flat
        if type(v) is not nnx.Param or p[-1] not in _LEAF
    ]
    if foreign:
        raise ValueError(
            f"the model holds {len(foreign)} variables with no checkpoint name "
            f"(merge LoRA / adapters first, e.g. flowjax.merge_lora): {', '.join(foreign[:8])}"
            + (" ..." if len(foreign) > 8 else "")
            + "."
        )
    path = os.fspath(path)
    writer = jax.process_index() == 0
    dtypes = {str(np.dtype(v.get_value().dtype)) for _, v in flat}
    extra = {"torch_dtype": dtypes.pop() if len(dtypes) == 1 else "float32"}
    extra.update(config_extra or {})
    # Group tensors into shards of at most max_shard_bytes, in checkpoint-name order.
    sizes = {}
    for p, v in flat:
        a = v.get_value()
        sizes[_hf_name(p)] = (p, v, int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize)
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(sizes):
        nbytes = sizes[name][2]
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    if writer:
        os.makedirs(path, exist_ok=True)
        for old in os.listdir(path):
            if old.endswith(".safetensors") or old == "model.safetensors.index.json":
                os.remove(os.path.join(path, old))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(model.config.to_hf(**extra), f, indent=2, sort_keys=True)
    weight_map = {}
    for fname, names in zip(files, shards, strict=True):
        tensors = {}
        for name in names:
            p, v, _ = sizes[name]
            a = _host(v.get_value())  # every process takes part in a cross-host gather
            tensors[name] = np.ascontiguousarray(a.T if p[-1] == "kernel" else a)
            weight_map[name] = fname
        if writer:
            st.save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    if not writer:
        return []
    if n > 1:
        total = sum(s for _, _, s in sizes.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(
                {"metadata": {"total_size": total}, "weight_map": weight_map},
                f,
                indent=2,
                sort_keys=True,
            )
        return ["config.json", *files, "model.safetensors.index.json"]
    return ["config.json", *files]
