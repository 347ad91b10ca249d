"""Llama 3.x and Gemma 2 causal language models in Flax NNX, loaded from Hugging Face checkpoints.

Written here rather than wrapped from google-tunix: tunix's Llama 3 ignores the
configured ``rope_theta`` and has no ``llama3`` rope scaling (Llama 3.1 / 3.2
logits come out wrong), it pins ``jax<0.11.1`` and pulls about 100 packages.
The two families are small; this module implements them from the published
architecture and is tested against Hugging Face transformers' logits on tiny
random checkpoints (``tests/fixtures/make_llm_fixtures.py``).

Module and parameter names follow the checkpoint's: the NNX path
``layers / 3 / self_attn / q_proj / kernel`` is the tensor
``model.layers.3.self_attn.q_proj.weight`` (transposed: NNX kernels are
``(in, out)``, torch's ``(out, in)``); norms' ``scale`` and the embedding
table ``embed_tokens / embedding`` keep the checkpoint's layout; an untied
head ``lm_head / embedding`` is ``lm_head.weight`` as stored, ``[V, D]``.

Sharding (``mesh`` with axes ``('data', 'model')``), by default
(:func:`default_partition_spec`): FSDP over ``'data'`` and Megatron tensor
parallelism over ``'model'`` at once,

==================================  ======================
parameter (NNX layout)              PartitionSpec
==================================  ======================
q/k/v, gate/up kernels ``(D, F)``   ``('data', 'model')``
o, down kernels ``(F, D)``          ``('model', 'data')``
embedding / head ``(V, D)``         ``('model', 'data')``
norm scales ``(D,)``                replicated
==================================  ======================

so a ``(n, 1)`` mesh is pure FSDP and a ``(1, n)`` mesh pure tensor
parallelism. A dimension that the mesh axis does not divide is left
unsharded on that axis.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flowjax.models.convert import _list

__all__ = [
    "CausalLM",
    "KVCache",
    "LMConfig",
    "default_partition_spec",
    "generate",
    "load_causal_lm",
    "load_tokenizer",
]

MODEL_TYPES = ("llama", "gemma2")
_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The architecture of a Llama 3.x or Gemma 2 model (the fields of HF's ``config.json``).

    Build it with :meth:`from_hf` from a ``config.json`` dict; the field names
    are Hugging Face's. ``rope_scaling`` is ``None`` or the ``llama3`` rule's
    ``(factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings)``; ``sliding_layers`` marks the layers
    with sliding-window attention (Gemma 2: the even ones; the default ``()``
    means none). Sizes are checked on construction.

    Example:
      >>> from flowjax.models import LMConfig
      >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
      ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
      ...     "num_attention_heads": 4, "num_key_value_heads": 2})
      >>> cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings
      (4, 10000.0, False)
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[float, float, float, int] | None = None
    tie_word_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {MODEL_TYPES}; got {self.model_type!r}."
            )
        sizes = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        bad = {
            k: getattr(self, k)
            for k in sizes
            if isinstance(getattr(self, k), bool)
            or not isinstance(getattr(self, k), numbers.Integral)
            or getattr(self, k) < 1
        }
        if bad:
            raise ValueError(f"sizes must be positive integers; got {bad}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        n = self.num_hidden_layers
        if not self.sliding_layers:  # the default: no sliding-window layer
            object.__setattr__(self, "sliding_layers", (False,) * n)
        sliding = tuple(bool(s) for s in self.sliding_layers)
        if len(sliding) != n:
            raise ValueError(
                f"sliding_layers has {len(sliding)} entries for num_hidden_layers={n}."
            )
        object.__setattr__(self, "sliding_layers", sliding)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> LMConfig:
        """The :class:`LMConfig` of a Hugging Face ``config.json`` dict.

        Reads the rope settings from ``rope_theta`` / ``rope_scaling`` (the
        published checkpoints) or ``rope_parameters`` (transformers >= 5).

        Args:
          cfg: the parsed ``config.json``.

        Returns:
          The config.

        Raises:
          ValueError: an unknown ``model_type``, a missing field, a rope
            scaling other than ``llama3``, biases in attention or MLP, an
            activation other than the family's.

        Example:
          >>> from flowjax.models import LMConfig
          >>> LMConfig.from_hf({"model_type": "gpt2"})
          Traceback (most recent call last):
          ...
          ValueError: unknown model_type 'gpt2': load_causal_lm reads ('llama', 'gemma2').
        """
        kind = cfg.get("model_type")
        if kind not in MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {kind!r}: load_causal_lm reads {MODEL_TYPES}."
            )
        need = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in need if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {missing} for model_type {kind!r}.")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(
                    f"{flag}=True is not supported (Llama 3 / Gemma 2 have none)."
                )
        act = (
            cfg.get("hidden_act")
            if kind == "llama"
            else (cfg.get("hidden_activation") or cfg.get("hidden_act"))
        )
        want = "silu" if kind == "llama" else "gelu_pytorch_tanh"
        if act is not None and act != want:
            raise ValueError(f"hidden activation {act!r} is not {kind}'s {want!r}.")
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        scale = None
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype != "llama3":
                raise ValueError(
                    f"rope scaling {rtype!r} is not supported (only 'llama3')."
                )
            scale = (
                float(scaling["factor"]),
                float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]),
            )
        heads = int(cfg["num_attention_heads"])
        n = int(cfg["num_hidden_layers"])
        gemma = kind == "gemma2"
        if gemma:
            types = cfg.get("layer_types") or [
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(n)
            ]
            sliding = tuple(t == "sliding_attention" for t in types)
        else:
            sliding = (False,) * n
        return cls(
            model_type=kind,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scale,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            query_pre_attn_scalar=(
                float(cfg.get("query_pre_attn_scalar", 256)) if gemma else None
            ),
            sliding_window=(cfg.get("sliding_window") if gemma else None),
            sliding_layers=sliding,
            attn_logit_softcapping=(
                cfg.get("attn_logit_softcapping") if gemma else None
            ),
            final_logit_softcapping=(
                cfg.get("final_logit_softcapping") if gemma else None
            ),
        )

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """This config as a Hugging Face ``config.json`` dict (the inverse of :meth:`from_hf`).

        ``LMConfig.from_hf(cfg.to_hf()) == cfg``, and transformers builds the
        same architecture from it (``LlamaForCausalLM`` / ``Gemma2ForCausalLM``).

        Args:
          **extra: further fields to set or override (``max_position_embeddings``,
            ``bos_token_id``, ``eos_token_id``, ``torch_dtype``, ...).

        Returns:
          A JSON-serialisable dict.

        Example:
          >>> from flowjax.models import LMConfig
          >>> cfg = LMConfig.from_hf({"model_type": "gemma2", "vocab_size": 32,
          ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
          ...     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
          ...     "sliding_window": 4, "final_logit_softcapping": 30.0})
          >>> hf = cfg.to_hf(eos_token_id=1)
          >>> hf["architectures"], hf["layer_types"], LMConfig.from_hf(hf) == cfg
          (['Gemma2ForCausalLM'], ['sliding_attention', 'full_attention'], True)
        """
        gemma = self.model_type == "gemma2"
        out: dict[str, Any] = {
            "architectures": ["Gemma2ForCausalLM" if gemma else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
        }
        if gemma:
            out.update(
                hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                sliding_window=self.sliding_window,
                layer_types=[
                    "sliding_attention" if s else "full_attention"
                    for s in self.sliding_layers
                ],
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
            )
        else:
            out.update(hidden_act="silu", mlp_bias=False)
            if self.rope_scaling is not None:
                factor, low, high, original = self.rope_scaling
                out["rope_scaling"] = {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
        out.update(extra)
        return out


def _inv_freq(cfg: LMConfig) -> np.ndarray:
    """Rope frequencies θ^(-2i/d), with the ``llama3`` rule when configured."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if cfg.rope_scaling is not None:
        factor, low, high, old = cfg.rope_scaling
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(
            wavelen > old / low, inv / factor, np.where(wavelen < old / high, inv, mid)
        )
    return inv.astype(np.float32)


def _rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [B, T, H, d]`` by its positions (the half-split convention of HF)."""
    ang = positions[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _Linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # A plain bias-free nnx.Linear, so flowjax.add_lora / add_adapters select it like any other.
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=False,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=jax.nn.initializers.normal(n_in**-0.5),
        rngs=rngs,
    )


class _RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool, dtype):
        self.scale = nnx.Param(
            jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype)
        )
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        if self.plus_one:  # Gemma: (1 + w), in float32
            return (h * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w * h.astype(x.dtype)  # Llama: cast back, then scale


class _Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (vocab, dim), dtype)
        )


class _Attention(nnx.Module):
    def __init__(self, cfg: LMConfig, layer: int, dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _Linear(d, cfg.num_attention_heads * hd, dtype, rngs)
        self.k_proj = _Linear(d, cfg.num_key_value_heads * hd, dtype, rngs)
        self.v_proj = _Linear(d, cfg.num_key_value_heads * hd, dtype, rngs)
        self.o_proj = _Linear(cfg.num_attention_heads * hd, d, dtype, rngs)
        self.cfg = cfg
        self.window = cfg.sliding_window if cfg.sliding_layers[layer] else None

    def __call__(self, x, positions, allowed, kv=None, index=None, prefix=None):
        """Attention of ``x [B, T, D]``; with ``kv`` (the layer's cached keys and values
        ``[B, S, KV, hd]``), the new keys go to slots ``index .. index + T - 1`` and the
        queries attend over all ``S`` slots. ``allowed [B, T, S]`` is causality and padding;
        the sliding window is added here, in slots (sequence indices), as transformers'.
        ``prefix`` ``(2, L, KV, hd)``: keys (no rope) and values put before the tokens'
        (or the cache's), seen by every query; the returned ``kv`` never holds them."""
        cfg = self.cfg
        b, t, _ = x.shape
        kv_heads, hd = cfg.num_key_value_heads, cfg.head_dim
        g = cfg.num_attention_heads // kv_heads
        inv = _inv_freq(cfg)
        q = _rope(self.q_proj(x).reshape(b, t, kv_heads * g, hd), positions, inv)
        k = _rope(self.k_proj(x).reshape(b, t, kv_heads, hd), positions, inv)
        v = self.v_proj(x).reshape(b, t, kv_heads, hd)
        if kv is None:
            at = jnp.arange(t)
        else:
            k = jax.lax.dynamic_update_slice_in_dim(
                kv[0], k.astype(kv[0].dtype), index, axis=1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                kv[1], v.astype(kv[1].dtype), index, axis=1
            )
            at = index + jnp.arange(t)
        if self.window is not None:
            slots = jnp.arange(k.shape[1])
            allowed = allowed & (slots[None, :] > at[:, None] - self.window)[None]
        keys, values = k, v
        if prefix is not None:  # never masked: not causal, not padding, not the window
            length = prefix.shape[1]
            pk = jnp.broadcast_to(
                prefix[0][None].astype(k.dtype), (b, *prefix.shape[1:])
            )
            pv = jnp.broadcast_to(
                prefix[1][None].astype(v.dtype), (b, *prefix.shape[1:])
            )
            keys = jnp.concatenate([pk, k], axis=1)
            values = jnp.concatenate([pv, v], axis=1)
            seen = jnp.ones((*allowed.shape[:-1], length), bool)
            allowed = jnp.concatenate([seen, allowed], axis=-1)
        q = q.reshape(b, t, kv_heads, g, hd)
        scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        s = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32)
        s = s * scale
        if cfg.attn_logit_softcapping:  # prefix scores capped too
            cap = cfg.attn_logit_softcapping
            s = cap * jnp.tanh(s / cap)
        s = jnp.where(allowed[:, None, None], s, _NEG)
        p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
        o = jnp.einsum("bkgts,bskd->btkgd", p, values.astype(x.dtype))
        return self.o_proj(o.reshape(b, t, kv_heads * g * hd)), (k, v)


class _MLP(nnx.Module):
    def __init__(self, cfg: LMConfig, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _Linear(d, f, dtype, rngs)
        self.up_proj = _Linear(d, f, dtype, rngs)
        self.down_proj = _Linear(f, d, dtype, rngs)
        self.gelu = cfg.model_type == "gemma2"

    def __call__(self, x):
        gate = self.gate_proj(x)
        act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down_proj(act * self.up_proj(x))


class _Layer(nnx.Module):
    def __init__(self, cfg: LMConfig, layer: int, dtype, rngs: nnx.Rngs):
        gemma = cfg.model_type == "gemma2"

        def norm():
            return _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma, dtype)

        self.self_attn = _Attention(cfg, layer, dtype, rngs)
        self.mlp = _MLP(cfg, dtype, rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if gemma:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.gemma = gemma

    def __call__(self, x, positions, allowed, kv=None, index=None, prefix=None):
        h, kv = self.self_attn(
            self.input_layernorm(x), positions, allowed, kv, index, prefix
        )
        if self.gemma:  # sandwich norms around both blocks
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x))
            ), kv
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class KVCache(NamedTuple):
    """The keys and values a :class:`CausalLM` has seen: its state for incremental decoding.

    A pytree of fixed shapes (``S`` slots, ``S`` the ``max_length`` of
    :meth:`CausalLM.init_cache`), so a jitted decode step compiles once for
    every step. Slot ``s`` holds the token at sequence index ``s`` of every
    row; :meth:`CausalLM.decode` writes ``T`` new tokens into slots
    ``index .. index + T - 1`` of all rows at once. Attention sees slot ``s``
    from the query in slot ``q`` iff ``mask[b, s]`` and ``s <= q`` (and, on
    Gemma 2's sliding layers, ``q - window < s``): exactly the full forward's
    attention over the sequence of all tokens written so far, with the
    concatenated attention masks.

    Attributes:
      k: per layer, keys ``[B, S, KV, head_dim]`` (rope applied).
      v: per layer, values ``[B, S, KV, head_dim]``.
      mask: bool ``[B, S]``, True where a slot holds a real (unpadded) token.
      index: int32 scalar, the number of slots written.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flowjax.models import CausalLM, LMConfig
      >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
      ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
      ...     "num_attention_heads": 4, "num_key_value_heads": 2})
      >>> cache = CausalLM(cfg, rngs=nnx.Rngs(0)).init_cache(3, 10)
      >>> len(cache.k), cache.k[0].shape, cache.mask.shape, int(cache.index)
      (2, (3, 10, 2, 4), (3, 10), 0)
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array


class CausalLM(nnx.Module):
    """A Llama 3.x or Gemma 2 decoder: ``lm(tokens, attention_mask) -> logits``.

    .. math::
        h^{(0)} = c\\,E[x], \\quad h^{(\\ell)} = \\text{block}_\\ell(h^{(\\ell-1)}),
        \\quad z = \\text{cap}_s(\\text{RMSNorm}(h^{(L)})\\,U^\\top)

    with :math:`c = \\sqrt{D}` for Gemma 2 (1 for Llama), :math:`U` the
    unembedding ``[V, D]`` (the embedding table :math:`E` when tied) and
    :math:`\\text{cap}_s(z) = s\\tanh(z/s)` Gemma 2's final soft-cap. Blocks:
    Llama ``h + \\text{MLP}(\\text{N}(h + \\text{Attn}(\\text{N}(h))))`` with
    SwiGLU; Gemma 2 wraps attention and its GeGLU MLP each in a pre- and a
    post-norm, caps attention logits at ``attn_logit_softcapping``, scales
    queries by ``query_pre_attn_scalar ** -0.5`` and uses a sliding window
    on its sliding layers (key ``k`` seen by query ``q`` iff
    ``q - window < k <= q``). Attention is grouped-query, rope as in HF.

    Padding: ``attention_mask[b, s] = 0`` hides key ``s``; positions are
    ``0 .. T-1`` whatever the mask (as transformers' forward without
    ``position_ids``); pass ``positions`` to count from the first real token
    instead. Logits at padded positions are finite and meaningless.

    Prompt and prefix tuning (:class:`flowjax.PromptTuning`,
    :class:`flowjax.PrefixTuning`): ``lm(x)`` is
    ``lm.from_embeddings(lm.embed(x))``, and :meth:`from_embeddings` takes
    per-layer prefix keys/values (``prefixes``, one head per key/value head).

    Incremental decoding: :meth:`init_cache` gives an empty :class:`KVCache`
    and :meth:`decode` appends tokens to it and returns their logits, equal
    to the full forward's on the whole sequence (see :func:`generate`).
    Parameters and activations are in ``dtype``; norms, rope, softmax and
    the logits are float32.

    Args:
      config: the :class:`LMConfig`.
      dtype: parameter and compute dtype.
      rngs: for the random initialisation (:func:`load_causal_lm` overwrites it).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flowjax.models import CausalLM, LMConfig
      >>> cfg = LMConfig.from_hf({"model_type": "gemma2", "vocab_size": 32,
      ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
      ...     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
      ...     "sliding_window": 4})
      >>> lm = CausalLM(cfg, rngs=nnx.Rngs(0))
      >>> lm(jnp.zeros((2, 6), jnp.int32)).shape, lm.unembedding.shape
      ((2, 6, 32), (32, 16))
    """

    def __init__(self, config: LMConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _Embed(config.vocab_size, config.hidden_size, dtype, rngs)
        self.layers = nnx.List(
            [_Layer(config, i, dtype, rngs) for i in range(config.num_hidden_layers)]
        )
        self.norm = _RMSNorm(
            config.hidden_size,
            config.rms_norm_eps,
            config.model_type == "gemma2",
            dtype,
        )
        if not config.tie_word_embeddings:
            self.lm_head = _Embed(config.vocab_size, config.hidden_size, dtype, rngs)

    @property
    def unembedding(self) -> jax.Array:
        """The output projection ``[V, D]`` (``chunked_token_nll(..., layout="vd")``)."""
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.embedding[...]

    def embed(self, tokens: jax.Array) -> jax.Array:
        """The input embeddings ``h^{(0)} = c\\,E[x]`` ``[B, T, D]`` of ``tokens [B, T]``.

        :math:`c = \\sqrt{D}` for Gemma 2 (cast to the parameters' dtype, as
        the checkpoint's own forward), 1 for Llama. With
        :meth:`from_embeddings` this is the model contract of
        ``flowjax.prompts``: ``lm(x) == lm.from_embeddings(lm.embed(x))``
        bit for bit.

        Args:
          tokens: int ``[B, T]``.

        Returns:
          ``[B, T, D]`` in the parameters' dtype.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> from flowjax.models import CausalLM, LMConfig
          >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
          ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          ...     "num_attention_heads": 4, "num_key_value_heads": 2})
          >>> lm = CausalLM(cfg, rngs=nnx.Rngs(0))
          >>> x = jnp.array([[3, 1, 4]])
          >>> bool((lm.from_embeddings(lm.embed(x)) == lm(x)).all())
          True
        """
        x = jnp.take(self.embed_tokens.embedding[...], tokens, axis=0)
        if self.config.model_type == "gemma2":
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        return x

    def _logits(self, h: jax.Array) -> jax.Array:
        z = jnp.einsum(
            "btd,vd->btv", h, self.unembedding, preferred_element_type=jnp.float32
        )
        cap = self.config.final_logit_softcapping
        return cap * jnp.tanh(z / cap) if cap else z

    def _prefixes(self, prefixes) -> list:
        """Per layer, ``None`` or its ``(2, L, KV, hd)`` prefix (``L = 0``: ``None``)."""
        cfg = self.config
        n = cfg.num_hidden_layers
        if prefixes is None:
            return [None] * n
        prefixes = jnp.asarray(prefixes)
        want = (n, 2, cfg.num_key_value_heads, cfg.head_dim)
        if prefixes.ndim != 5 or (*prefixes.shape[:2], *prefixes.shape[3:]) != want:
            raise ValueError(
                f"prefixes must be (num_layers={n}, 2, L, "
                f"num_key_value_heads={cfg.num_key_value_heads}, "
                f"head_dim={cfg.head_dim}) (PrefixTuning(..., num_layers={n}, "
                f"num_heads={cfg.num_key_value_heads}, head_dim={cfg.head_dim})); "
                f"got {prefixes.shape}."
            )
        if prefixes.shape[2] == 0:
            return [None] * n
        return [prefixes[i] for i in range(n)]

    def _trunk(self, x, prefixes=None, attention_mask=None, positions=None):
        """The final normed hidden states of the embeddings ``x [B, T, D]``."""
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        allowed = jnp.tril(jnp.ones((t, t), bool))[None]
        if attention_mask is not None:
            allowed = allowed & (jnp.asarray(attention_mask) != 0)[:, None, :]
        for layer, prefix in zip(self.layers, self._prefixes(prefixes), strict=True):
            x, _ = layer(x, positions, allowed, prefix=prefix)
        return self.norm(x)

    def from_embeddings(
        self, h, *, prefixes=None, attention_mask=None, positions=None
    ) -> jax.Array:
        """Logits ``[B, T, V]`` of the input embeddings ``h [B, T, D]``, optionally with prefix keys/values.

        The rest of the network after :meth:`embed` (the contract of
        ``flowjax.prompts``, for :class:`flowjax.PromptTuning` and
        :class:`flowjax.PrefixTuning`). With ``prefixes`` :math:`P \\in
        \\mathbb{R}^{N\\times 2\\times L\\times KV\\times hd}`, layer
        :math:`\\ell`'s attention of query :math:`t` is

        .. math::
            \\operatorname{softmax}_j\\big(\\text{cap}(q_t \\cdot K_j\\, s)
            + M_{tj}\\big),\\quad K = [P^K_\\ell; R(k)],\\ V = [P^V_\\ell; v]

        over the :math:`L` prefix slots and the tokens, with :math:`s` the
        model's query scale, cap Gemma 2's attention soft-cap (applied to the
        prefix scores too) and :math:`R` rope. Under grouped-query attention
        the prefix has the model's ``num_key_value_heads`` heads, shared by
        each group of queries exactly as the tokens' own keys are. Prefix keys
        are free vectors and get **no rope** (a rotation would be absorbed by
        learning); the tokens keep positions ``0 .. T-1`` (or ``positions``),
        so ``L = 0`` is the base model exactly. :math:`M_{tj} = 0` on the
        prefix: neither causality, nor ``attention_mask``, nor Gemma 2's
        sliding window hides it.

        Args:
          h: ``[B, T, D]`` (e.g. ``lm.embed(tokens)``, or a soft prompt
            concatenated before it).
          prefixes: ``None`` or ``(num_layers, 2, L, num_key_value_heads,
            head_dim)``: ``prefixes[i, 0]`` the keys, ``prefixes[i, 1]`` the
            values of layer ``i``.
          attention_mask: ``[B, T]``, 0 hides that key (padding); ``None``: all real.
          positions: rope positions ``[B, T]``; ``None``: ``0 .. T-1``.

        Returns:
          float32 logits ``[B, T, V]``.

        Raises:
          ValueError: ``prefixes`` of another shape (the expected one is named).

        Example:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> from flowjax.models import CausalLM, LMConfig
          >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
          ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
          ...     "num_attention_heads": 4, "num_key_value_heads": 2})
          >>> lm = CausalLM(cfg, rngs=nnx.Rngs(0))
          >>> h = lm.embed(jnp.array([[3, 1, 4]]))
          >>> lm.from_embeddings(h, prefixes=jnp.zeros((2, 2, 5, 2, 4))).shape
          (1, 3, 32)
        """
        return self._logits(self._trunk(h, prefixes, attention_mask, positions))

    def hidden(self, tokens, attention_mask=None, positions=None) -> jax.Array:
        """Final (normed) hidden states ``[B, T, D]``: ``logits = cap(hidden @ unembedding.T)``."""
        return self._trunk(
            self.embed(jnp.asarray(tokens)), None, attention_mask, positions
        )

    def __call__(self, tokens, attention_mask=None, positions=None) -> jax.Array:
        return self.from_embeddings(
            self.embed(jnp.asarray(tokens)),
            attention_mask=attention_mask,
            positions=positions,
        )

    def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty :class:`KVCache` of ``max_length`` slots for ``batch`` rows.

        Args:
          batch: rows.
          max_length: slots: the longest sequence (prompt + generated tokens) it holds.
          dtype: of the keys and values; ``None``: the parameters' dtype.

        Returns:
          The cache, zeros with ``mask`` all False and ``index`` 0.

        Raises:
          ValueError: ``batch`` or ``max_length`` < 1.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> from flowjax.models import CausalLM, LMConfig
          >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
          ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          ...     "num_attention_heads": 4, "num_key_value_heads": 2})
          >>> CausalLM(cfg, rngs=nnx.Rngs(0)).init_cache(2, 8, jnp.bfloat16).v[0].dtype
          dtype(bfloat16)
        """
        for name, n in (("batch", batch), ("max_length", max_length)):
            if int(n) < 1:
                raise ValueError(f"init_cache: {name} must be >= 1; got {n}.")
        cfg = self.config
        dtype = dtype or self.embed_tokens.embedding[...].dtype
        shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        return KVCache(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            mask=jnp.zeros((batch, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def decode(
        self,
        tokens,
        cache: KVCache,
        attention_mask=None,
        positions=None,
        *,
        prefixes=None,
    ) -> tuple[jax.Array, KVCache]:
        """Logits of ``tokens [B, T]`` appended to ``cache``, and the cache that holds them.

        The tokens take slots ``i .. i + T - 1`` (``i = cache.index``) of every
        row; query ``i + t`` attends the cached slots ``<= i + t`` whose mask
        is set (and the sliding window on Gemma 2's sliding layers). So a
        prefill of ``x[:, :p]`` then steps of ``x[:, p:p + 1]``, ... give the
        logits ``lm(x, attention_mask, positions)`` has at those positions.
        Pure: ``jax.jit`` it (split/merge the model) and it compiles once per
        ``T``. Left-pad prompts of different lengths (``attention_mask`` 0 on
        the padding, ``positions`` counted from each row's first real token,
        as :func:`generate` does) so that every row's next token lands in the
        same slot. A prefix-tuned model passes its ``prefixes`` (as to
        :meth:`from_embeddings`) to every call: they are put before the
        cached slots in each layer, never written into the cache, so the
        tokens keep slots and positions from 0 and the logits are
        :meth:`from_embeddings`' with the same prefixes.

        Args:
          tokens: int ``[B, T]``.
          cache: from :meth:`init_cache` (``B`` rows) or a previous ``decode``.
          attention_mask: ``[B, T]``, 0 at padding; ``None``: all real.
          positions: rope positions ``[B, T]``; ``None``: the slot indices.
          prefixes: ``None`` or ``(num_layers, 2, L, num_key_value_heads,
            head_dim)``, the same at every call.

        Returns:
          ``(logits float32 [B, T, V], cache)``. Under ``jit``, tokens that do
          not fit in the cache give NaN logits.

        Raises:
          ValueError: ``tokens`` not ``[B, T]`` with the cache's ``B``, (outside
            ``jit``) more tokens than the cache has free slots, or ``prefixes``
            of another shape.

        Example:
          >>> import jax, jax.numpy as jnp, numpy as np
          >>> from flax import nnx
          >>> from flowjax.models import CausalLM, LMConfig
          >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
          ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          ...     "num_attention_heads": 4, "num_key_value_heads": 2})
          >>> lm = CausalLM(cfg, rngs=nnx.Rngs(0))
          >>> graphdef, state = nnx.split(lm)  # the model a jit argument
          >>> decode = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).decode(x, c))
          >>> x = jnp.array([[3, 1, 4, 1]])
          >>> _, cache = decode(state, x[:, :2], lm.init_cache(1, 8))  # prefill
          >>> z, cache = decode(state, x[:, 2:], cache)  # 2 more: the same program
          >>> forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
          >>> bool(np.allclose(z, forward(state, x)[:, 2:], atol=1e-5)), int(cache.index)
          (True, 4)
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] != cache.mask.shape[0]:
            raise ValueError(
                f"decode: tokens must be [B, T] with the cache's B = "
                f"{cache.mask.shape[0]}; got shape {tokens.shape}."
            )
        h, cache = self._extend(
            self.embed(tokens), cache, attention_mask, positions, prefixes
        )
        return self._logits(h), cache

    def _extend(self, x, cache, attention_mask=None, positions=None, prefixes=None):
        """:meth:`decode` of the embeddings ``x [B, T, D]``: final hidden states (NaN if
        they do not fit) and the cache."""
        b, t = x.shape[:2]
        slots = cache.mask.shape[1]
        index = jnp.asarray(cache.index, jnp.int32)
        if not isinstance(index, jax.core.Tracer) and int(index) + t > slots:
            raise ValueError(
                f"decode: the cache has {slots} slots, {int(index)} filled: "
                f"{t} more tokens do not fit."
            )
        new = (
            jnp.ones((b, t), bool)
            if attention_mask is None
            else jnp.asarray(attention_mask) != 0
        )
        mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, new, index, axis=1)
        at = index + jnp.arange(t)
        if positions is None:
            positions = jnp.broadcast_to(at, (b, t))
        allowed = (jnp.arange(slots)[None, :] <= at[:, None])[None] & mask[:, None, :]
        ks, vs = [], []
        layers = zip(
            self.layers, cache.k, cache.v, self._prefixes(prefixes), strict=True
        )
        for layer, k, v, prefix in layers:
            x, (k, v) = layer(x, positions, allowed, (k, v), index, prefix)
            ks.append(k)
            vs.append(v)
        h = jnp.where(index + t > slots, jnp.nan, self.norm(x))
        return h, KVCache(tuple(ks), tuple(vs), mask, index + t)


def _unwrap(model):
    """``(lm, prefixes, prompt)`` of a CausalLM or a PrefixTuning / PromptTuning of one."""
    from flowjax.prompts import PrefixTuning, PromptTuning

    prefixes = prompt = None
    if isinstance(model, PrefixTuning):
        model, prefixes = model.model, model.prefix.get_value()
    elif isinstance(model, PromptTuning):
        model, prompt = model.model, model.prompt.get_value()
    if not isinstance(model, CausalLM):
        raise TypeError(
            "generate decodes a CausalLM or a PrefixTuning / PromptTuning of one; got "
            f"{type(model).__name__}."
        )
    return model, prefixes, prompt


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "cache_dtype"))
def _greedy(graphdef, state, tokens, mask, *, steps, eos_id, pad_id, cache_dtype):
    """Prefill of the left-padded ``tokens``, then greedy decode steps in a while loop.

    A soft prompt ``P [L, D]`` goes between each row's padding and its tokens,
    ``[pad...; P; x]``, at positions ``0 .. L-1`` and the tokens at ``L + ``
    their own (so a window counted in slots, Gemma 2's, sees what the row
    alone sees); a prefix is passed to every step."""
    lm, prefixes, prompt = _unwrap(nnx.merge(graphdef, state))
    b = tokens.shape[0]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    x = lm.embed(tokens)
    if prompt is not None:  # row i: [pad...; P; x_i], P at positions 0 .. L-1
        length, width = prompt.shape[0], tokens.shape[1]
        start = width - jnp.sum(mask, axis=1)  # the first real slot of each row
        slot = jnp.arange(length + width)
        offset = slot[None, :] - start[:, None]  # [B, L + W]: < 0 on the padding
        at_x = jnp.clip(slot - length, 0, width - 1)
        x = jnp.where(
            ((offset >= 0) & (offset < length))[..., None],
            prompt.astype(x.dtype)[jnp.clip(offset, 0, length - 1)],
            x[:, at_x],
        )
        mask = (offset >= 0).astype(mask.dtype)
        positions = jnp.maximum(offset, 0)
    cache = lm.init_cache(b, x.shape[1] + steps - 1, cache_dtype)
    h, cache = lm._extend(x, cache, mask, positions, prefixes)
    first = jnp.argmax(lm._logits(h[:, -1:])[:, 0], axis=-1).astype(
        jnp.int32
    )  # [B, V] only
    out = jnp.full((b, steps), pad_id, jnp.int32).at[:, 0].set(first)

    def more(carry):
        step, _, _, done, _ = carry
        return (step < steps) & ~jnp.all(done)

    def step_fn(carry):
        step, cache, out, done, pos = carry
        prev = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)
        logits, cache = lm.decode(
            prev, cache, positions=pos[:, None], prefixes=prefixes
        )
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        token = jnp.where(done, pad_id, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, cache, out, done | (token == eos_id), pos + 1

    pos = jnp.sum(mask, axis=1, dtype=jnp.int32)  # prompt included: L + real tokens
    carry = (jnp.int32(1), cache, out, first == eos_id, pos)
    _, _, out, _, _ = jax.lax.while_loop(more, step_fn, carry)
    is_eos = out == eos_id
    lengths = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, steps)
    return out, lengths


def generate(
    lm: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    bucket: int = 1,
    cache_dtype: Any = None,
) -> list[list[int]]:
    """Batched greedy decoding with the KV cache, each row stopped at its EOS.

    .. math:: y_{n} = \\arg\\max_v\\, \\text{lm}(x \\,\\|\\, y_{<n})_v,
        \\quad n = 1, \\dots, N, \\text{ until } y_n = \\text{eos}

    The prompts are left-padded to a common width (rounded up to a
    multiple of ``bucket``), with positions counted from each row's first
    real token, so every row decodes as it would alone. One jitted program
    runs a prefill (:meth:`CausalLM.decode` of the prompts into a
    :class:`KVCache` of ``width + N - 1`` slots) and a ``lax.while_loop`` of
    one-token decode steps that ends when every row has emitted EOS or after
    ``N`` tokens; it compiles once per (batch size, width, ``N``) and the
    model goes in as an argument (``nnx.split``), so updated weights reuse it.
    A :class:`flowjax.PrefixTuning` or :class:`flowjax.PromptTuning` of a
    :class:`CausalLM` decodes the same way: its prefix in every step
    (:meth:`CausalLM.decode`), its soft prompt prefilled first at positions
    ``0 .. L-1``, the prompts' tokens after it (as the wrapper's own forward).

    Args:
      lm: the :class:`CausalLM`, or a prefix- or prompt-tuned one.
      prompts: token ids per row (BOS included if the model wants one).
      max_new_tokens: ``N``, the most tokens per row.
      eos_id: the end-of-sequence id.
      pad_id: the id that fills the left padding (masked out).
      bucket: padded prompt widths are multiples of it (fewer compilations).
      cache_dtype: of the cached keys and values; ``None``: the parameters'.

    Returns:
      Each row's new tokens, up to and including its EOS (at most ``N``).

    Raises:
      ValueError: no prompts, an empty prompt (its row named),
        ``max_new_tokens`` or ``bucket`` < 1.

    Example:
      >>> from flax import nnx
      >>> from flowjax.models import CausalLM, LMConfig, generate
      >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 32,
      ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
      ...     "num_attention_heads": 4, "num_key_value_heads": 2})
      >>> lm = CausalLM(cfg, rngs=nnx.Rngs(0))
      >>> out = generate(lm, [[1, 5, 7], [2]], max_new_tokens=4, eos_id=0)
      >>> [len(row) for row in out]  # neither row emitted EOS (id 0)
      [4, 4]
    """
    if not prompts:
        raise ValueError("generate: no prompts.")
    for name, n in (("max_new_tokens", max_new_tokens), ("bucket", bucket)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"generate: {name} must be an int >= 1; got {n!r}.")
    rows = [[int(t) for t in p] for p in prompts]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"generate: prompts {empty[:10]} (row indices) are empty.")
    width = -(-max(map(len, rows)) // bucket) * bucket
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    graphdef, state = nnx.split(lm)
    out, lengths = _greedy(
        graphdef,
        state,
        tokens,
        mask,
        steps=max_new_tokens,
        eos_id=jnp.int32(eos_id),
        pad_id=jnp.int32(pad_id),
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, : lengths[i]].tolist() for i in range(len(rows))]


def default_partition_spec(name: str, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """The default FSDP + tensor-parallel placement of one parameter (see the module doc).

    Args:
      name: the checkpoint's tensor name, e.g. ``"model.layers.0.mlp.down_proj.weight"``.
      shape: the parameter's shape in the NNX layout (kernels ``(in, out)``).
      mesh: a ``jax.sharding.Mesh`` with axes ``'data'`` and ``'model'``.

    Returns:
      The ``PartitionSpec``; an axis the mesh does not divide is dropped.

    Raises:
      ValueError: a mesh without the axes ``'data'`` and ``'model'``.

    Example:
      >>> import jax
      >>> from flowjax.models import default_partition_spec
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> default_partition_spec("model.layers.0.mlp.down_proj.weight", (32, 16), mesh)
      P('model', 'data')
    """
    if not {"data", "model"} <= set(mesh.axis_names):
        raise ValueError(f"mesh axes {mesh.axis_names} lack 'data' and 'model'.")
    if len(shape) < 2:
        return PartitionSpec()
    if (
        name.endswith(("o_proj.weight", "down_proj.weight"))
        or "embed" in name
        or (name.startswith("lm_head"))
    ):
        axes = ("model", "data")
    else:
        axes = ("data", "model")
    return PartitionSpec(
        *(
            a if n % mesh.shape[a] == 0 else None
            for a, n in zip(axes, shape, strict=False)
        )
    )


_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _hf_name(path) -> str:
    *module, leaf = (str(k) for k in path)
    prefix = "" if module[0] == "lm_head" else "model."
    return prefix + ".".join([*module, _LEAF[leaf]])


def _require(package: str, who: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{who} needs the {package} package: pip install 'flowjax-ft[models]' "
            f"(or {package})."
        ) from e


def _open(path: str):
    safe_open = _require("safetensors", "load_causal_lm").safe_open
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise ValueError(
            f"no model.safetensors or model.safetensors.index.json in {path!r}."
        )
    handles, where = {}, {}
    for fname in files:
        full = os.path.join(path, fname)
        if not os.path.isfile(full):
            raise ValueError(f"the index names {fname!r}, which is not in {path!r}.")
        handles[fname] = safe_open(full, framework="numpy")
        for key in handles[fname].keys():
            where[key] = fname
    return handles, where


def load_causal_lm(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    shardings: Callable[[str, tuple[int, ...], Any], PartitionSpec] | None = None,
) -> CausalLM:
    """A :class:`CausalLM` from a Hugging Face directory (Llama 3.x or Gemma 2), no torch.

    Reads ``config.json`` and ``model.safetensors`` or the sharded
    ``model-0000k-of-0000n.safetensors`` named by
    ``model.safetensors.index.json``. The model is built abstractly
    (``nnx.eval_shape``) and each tensor is read on its own (``safe_open``),
    transposed to the NNX layout, cast to ``dtype`` and ``jax.device_put``
    with its ``NamedSharding``: the whole model is never assembled on one
    device. A tied checkpoint's ``lm_head.weight`` (if stored) is dropped.

    Args:
      path: the checkpoint directory.
      dtype: parameter and compute dtype (``jnp.bfloat16`` at scale).
      mesh: a ``Mesh`` with axes ``('data', 'model')`` of ``AxisType.Auto``
        (``jax.make_mesh(..., axis_types=(AxisType.Auto,) * 2)``); ``None`` puts every
        parameter on the default device.
      shardings: ``(name, shape, mesh) -> PartitionSpec`` for each tensor
        (HF name, NNX shape); ``None``: :func:`default_partition_spec`.

    Returns:
      The model; ``lm(tokens, attention_mask)`` gives float32 logits
      ``[B, T, V]``, ``lm.hidden(...)`` and ``lm.unembedding`` the inputs of
      ``flowjax.chunked_token_nll(..., layout="vd",
      logit_softcap=lm.config.final_logit_softcapping)``.

    Raises:
      ValueError: no ``config.json`` or weights; an unknown ``model_type``
        (and the other :meth:`LMConfig.from_hf` errors); missing, unexpected
        or mis-shaped tensors (named); ``shardings`` without ``mesh``.
      ImportError: ``safetensors`` is not installed.

    Example:
      >>> import json, os, tempfile
      >>> import numpy as np, safetensors.numpy
      >>> from flax import nnx
      >>> from flowjax.models import CausalLM, LMConfig, load_causal_lm
      >>> hf = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
      ...       "intermediate_size": 32, "num_hidden_layers": 1,
      ...       "num_attention_heads": 4, "num_key_value_heads": 2,
      ...       "tie_word_embeddings": True}
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "config.json"), "w") as f:
      ...     json.dump(hf, f)
      >>> safetensors.numpy.save_file({"model.embed_tokens.weight": np.ones((32, 16), np.float32)},
      ...     os.path.join(d, "model.safetensors"))
      >>> load_causal_lm(d)
      Traceback (most recent call last):
      ...
      ValueError: the checkpoint lacks 10 tensors: model.layers.0.input_layernorm.weight, model.layers.0.mlp.down_proj.weight, model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight, model.layers.0.post_attention_layernorm.weight, model.layers.0.self_attn.k_proj.weight, model.layers.0.self_attn.o_proj.weight, model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.v_proj.weight, model.norm.weight.
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"no config.json in {path!r}.")
    with open(cfg_file) as f:
        config = LMConfig.from_hf(json.load(f))
    if shardings is not None and mesh is None:
        raise ValueError("shardings needs a mesh.")
    rule = shardings or default_partition_spec
    handles, where = _open(path)
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    names = {_hf_name(p): (p, v) for p, v in flat}
    extra = set(where) - set(names)
    if config.tie_word_embeddings:
        extra.discard("lm_head.weight")
    missing = set(names) - set(where)
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} tensors: {_list(missing)}."
        )
    if extra:
        raise ValueError(
            f"the checkpoint has {len(extra)} tensors that {config.model_type} "
            f"with this config.json does not: {_list(extra)}."
        )
    shapes = {k: handles[where[k]].get_slice(k).get_shape() for k in names}
    bad = []
    for name, (p, v) in names.items():
        want = tuple(v.get_value().shape)
        torch_shape = want[::-1] if p[-1] == "kernel" else want
        if tuple(shapes[name]) != torch_shape:
            bad.append(f"{name} {tuple(shapes[name])} (expected {torch_shape})")
    if bad:
        raise ValueError(f"tensors of the wrong shape: {'; '.join(sorted(bad))}.")
    leaves = []
    for p, v in flat:
        name = _hf_name(p)
        a = handles[where[name]].get_tensor(name)
        if p[-1] == "kernel":
            a = a.T
        a = np.ascontiguousarray(a.astype(jnp.dtype(dtype)))
        if mesh is None:
            leaves.append((p, v.replace(jnp.asarray(a))))
        else:
            spec = rule(name, a.shape, mesh)
            leaves.append((p, v.replace(jax.device_put(a, NamedSharding(mesh, spec)))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a Hugging Face directory's ``tokenizer.json`` (no transformers).

    ``tok.encode(text).ids`` gives the ids transformers' fast tokenizer gives
    (the file's post-processor adds the BOS token as the checkpoint's does);
    ``tok.decode(ids, skip_special_tokens=True)`` inverts it.

    Args:
      path: the checkpoint directory (or the ``tokenizer.json`` file itself).

    Returns:
      The ``tokenizers.Tokenizer``.

    Raises:
      ValueError: no ``tokenizer.json`` at ``path``.
      ImportError: ``tokenizers`` is not installed.

    Example:
      >>> from flowjax.models import load_tokenizer
      >>> load_tokenizer("/nonexistent")
      Traceback (most recent call last):
      ...
      ValueError: no tokenizer.json at '/nonexistent'.
    """
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"no tokenizer.json at {path!r}.")
    tokenizers = _require("tokenizers", "load_tokenizer")
    return tokenizers.Tokenizer.from_file(file)
