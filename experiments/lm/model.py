"""The LM experiment's model: a tiny byte-level Llama, a :class:`flowjax.models.CausalLM`.

The model users fine-tune at scale (:func:`flowjax.models.load_causal_lm` of a Llama 3.x
checkpoint) is the model of the CPU reproduction, at a small size: grouped-query
attention with rope, RMSNorm, a SwiGLU MLP, an untied head. Its projections
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj``) are plain ``nnx.Linear``, so :func:`flowjax.add_lora` wraps them by
their names (:data:`LORA_TARGETS`, the paper's targets).

Vocabulary: the 256 byte values plus ``BOS`` (256), ``EOS`` (257) and ``PAD``
(258); the ids are written into the checkpoint's ``config.json``
(``bos_token_id`` ...) beside the architecture.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flowjax
from experiments.llm.config import LORA_TARGETS as LLM_LORA_TARGETS
from flowjax.models import CausalLM, LMConfig

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
LORA_TARGETS = LLM_LORA_TARGETS  # the paper-scale pipeline's, so the two cannot drift


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The tiny Llama's sizes (plain ints, so the experiment's config stays JSON-able).

    ``max_len`` is the pre-training window (the context the model is trained on;
    rope itself has no length limit). :meth:`hf_config` is the Hugging Face
    ``config.json`` of the model, :meth:`lm_config` its
    :class:`flowjax.models.LMConfig`.
    """

    hidden_size: int = 128
    intermediate_size: int = 224
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_len: int = 64
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )

    def hf_config(self) -> dict:
        """The ``config.json`` dict of a Llama with these sizes and the byte vocabulary."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": VOCAB_SIZE,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_len,
            "rms_norm_eps": 1e-6,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        }

    def lm_config(self) -> LMConfig:
        """The :class:`flowjax.models.LMConfig` (``LMConfig.from_hf(self.hf_config())``)."""
        return LMConfig.from_hf(self.hf_config())


def build(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialised tiny Llama (the factory ``finetune_checkpoint`` can call)."""
    return CausalLM(cfg.lm_config(), rngs=nnx.Rngs(seed))


def from_kwargs(seed: int = 0, **config) -> CausalLM:
    """``build(ModelConfig(**config), seed)``: a JSON-friendly factory for ``finetune_checkpoint --model``."""
    return build(ModelConfig(**config), seed)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 token ids (no BOS/EOS)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Bytes below 256 back to text (special tokens dropped, invalid UTF-8 replaced)."""
    return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace")


def make_logits_fn(graphdef):
    """``logits_fn(state, tokens [B, T]) -> logits [B, T, V]`` over ``nnx.split`` state.

    The batched form of the LM pre-pass (``flowjax.lm_sequence_losses(...,
    batched=True)``): the model is called on the whole batch, as in training.
    ``state`` is every part of the split state as one tuple, so a LoRA model
    split into ``(lora, rest)`` works as well as a plain ``(params,)`` split.
    """

    def logits_fn(state, tokens):
        return nnx.merge(graphdef, *state)(tokens)

    return logits_fn


def _rope(x, positions, theta: float):
    """``x [N, S, H, d]`` rotated by ``positions [N, S]`` (HF's half-split convention)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    ang = positions[..., None].astype(jnp.float32) * inv[None, None]  # [N, S, d/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(
        x.dtype
    )


def _llama_layer(layer, cfg: LMConfig, x, positions, cache, rows, prefix=None):
    """One Llama layer on the new positions ``x [N, S, D]``, reading and extending ``cache``.

    ``cache = (k, v)``, each ``[N, T, kv, d]`` (rotated keys, values); the new
    keys and values are written at ``positions [N, S]`` and every query
    attends to the cache positions ``<=`` its own, and to every slot of the
    layer's ``prefix`` ``(2, L, kv, d)`` (prefix tuning: keys without rope,
    put before the cache, never masked).
    """
    n, s, _ = x.shape
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    g = cfg.num_attention_heads // kv
    att = layer.self_attn
    h = layer.input_layernorm(x)
    q = _rope(att.q_proj(h).reshape(n, s, kv * g, hd), positions, cfg.rope_theta)
    k = _rope(att.k_proj(h).reshape(n, s, kv, hd), positions, cfg.rope_theta)
    v = att.v_proj(h).reshape(n, s, kv, hd)
    kc, vc = cache
    kc = kc.at[rows[:, None], positions].set(k)
    vc = vc.at[rows[:, None], positions].set(v)
    scores = jnp.einsum(
        "nskgd,ntkd->nkgst", q.reshape(n, s, kv, g, hd), kc,
        preferred_element_type=jnp.float32,
    ) * hd**-0.5  # fmt: skip
    visible = jnp.arange(kc.shape[1])[None, None] <= positions[:, :, None]  # [N, S, T]
    values = vc
    if prefix is not None:
        pk = jnp.broadcast_to(prefix[0][None].astype(kc.dtype), (n, *prefix.shape[1:]))
        pv = jnp.broadcast_to(prefix[1][None].astype(vc.dtype), (n, *prefix.shape[1:]))
        ps = jnp.einsum(
            "nskgd,nlkd->nkgsl", q.reshape(n, s, kv, g, hd), pk,
            preferred_element_type=jnp.float32,
        ) * hd**-0.5  # fmt: skip
        scores = jnp.concatenate([ps, scores], axis=-1)
        values = jnp.concatenate([pv, vc], axis=1)
        seen = jnp.ones((n, s, prefix.shape[1]), bool)
        visible = jnp.concatenate([seen, visible], axis=-1)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    o = jnp.einsum("nkgst,ntkd->nskgd", p, values).reshape(n, s, kv * g * hd)
    x = x + att.o_proj(o)
    return x + layer.mlp(layer.post_attention_layernorm(x)), (kc, vc)


def _unwrap(model):
    """``(CausalLM, prefixes or None, soft prompt or None)`` of the model to decode."""
    if isinstance(model, flowjax.PrefixTuning):
        return model.model, model.prefix.get_value(), None
    if isinstance(model, flowjax.PromptTuning):
        return model.model, None, model.prompt.get_value()
    return model, None, None


def make_greedy_decode(graphdef, max_new: int):
    """Jitted greedy decoding of right-padded prompts by a Llama :class:`~flowjax.models.CausalLM`.

    ``decode(state, buf [N, T], prompt_len [N]) -> buf`` writes up to
    ``max_new`` generated tokens after each prompt (``PAD`` after an
    ``EOS``). The experiment's own key/value cache, written before
    :func:`flowjax.models.generate` (left-padded prompts, positions counted
    from each row's first token) reached main; moving to it is a follow-up
    that needs ``results/lm`` regenerated if a greedy choice flips. One causal pass over ``buf`` fills each layer's cache with the
    rotated keys and values (prompt positions are exact: they see only
    earlier positions), then each step feeds the one new token per row at its
    own position ``prompt_len + s`` and attends to cache positions ``<=`` it,
    so the result equals recomputing ``model(buf)`` at every step
    (``tests/test_lm_experiment.py`` checks it, LoRA included). A
    :class:`flowjax.PrefixTuning` of the model passes its layer's prefix to
    every attention (before the cache, never masked); a
    :class:`flowjax.PromptTuning` of it fills cache positions ``0 .. L-1``
    with its soft prompt and the prompt tokens from ``L`` on, as its own
    forward does. Llama configs without rope scaling only (the experiment's
    model).

    Raises:
      ValueError: a Gemma 2 config or one with rope scaling.
    """

    @jax.jit
    def greedy(state, buf, prompt_len):
        model, prefixes, soft = _unwrap(nnx.merge(graphdef, *state))
        cfg = model.config
        if cfg.model_type != "llama" or cfg.rope_scaling is not None:
            raise ValueError(
                f"make_greedy_decode handles Llama without rope scaling; got "
                f"model_type={cfg.model_type!r}, rope_scaling={cfg.rope_scaling}."
            )
        n, t = buf.shape
        shift = 0 if soft is None else soft.shape[0]  # the soft prompt's positions
        rows = jnp.arange(n)
        shape = (n, shift + t, cfg.num_key_value_heads, cfg.head_dim)
        empty = jnp.zeros(shape, model.embed_tokens.embedding.dtype)
        layer_prefix = [None] * cfg.num_hidden_layers
        if prefixes is not None and prefixes.shape[2]:
            layer_prefix = list(prefixes)

        def forward(x, positions, caches):
            new = []
            for layer, cache, pre in zip(
                model.layers, caches, layer_prefix, strict=True
            ):
                x, cache = _llama_layer(layer, cfg, x, positions, cache, rows, pre)
                new.append(cache)
            return model.norm(x), new

        def embed(tokens):
            return jnp.take(model.embed_tokens.embedding[...], tokens, axis=0)

        caches = [(empty, empty) for _ in model.layers]
        x = embed(buf)
        if shift:
            p = jnp.broadcast_to(soft.astype(x.dtype)[None], (n, *soft.shape))
            x = jnp.concatenate([p, x], axis=1)
        at = jnp.broadcast_to(jnp.arange(shift + t), (n, shift + t))
        h, caches = forward(x, at, caches)
        head = model.unembedding
        last = h[rows, shift + prompt_len - 1]
        first = jnp.argmax(last @ head.T, axis=-1).astype(buf.dtype)
        buf = buf.at[rows, prompt_len].set(first)

        def body(s, carry):
            buf, caches, done = carry
            pos = prompt_len + s - 1  # position of the token fed in
            x = embed(buf[rows, pos][:, None])
            h, caches = forward(x, shift + pos[:, None], caches)
            nxt = jnp.argmax(h[:, 0] @ head.T, axis=-1).astype(buf.dtype)
            nxt = jnp.where(done, PAD, nxt)
            return buf.at[rows, pos + 1].set(nxt), caches, done | (nxt == EOS)

        done = first == EOS
        return jax.lax.fori_loop(1, max_new, body, (buf, caches, done))[0]

    return greedy
