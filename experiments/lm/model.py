"""A small byte-level decoder-only transformer in Flax NNX, and its pure (split/merge) functions.

Vocabulary: the 256 byte values plus ``BOS`` (256), ``EOS`` (257) and ``PAD``
(258). Every projection (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``up_proj``, ``down_proj``, ``lm_head``) is a plain ``nnx.Linear``, so
:func:`flowjax.add_lora` can wrap them with the paper's target names.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Architecture of :class:`TinyLM` (all sizes are plain ints, so the config is JSON-able)."""

    vocab_size: int = VOCAB_SIZE
    max_len: int = 64
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}."
            )


class Block(nnx.Module):
    """Pre-LayerNorm causal self-attention block with a GELU MLP."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.q_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up_proj = nnx.Linear(d, cfg.d_ff, rngs=rngs)
        self.down_proj = nnx.Linear(cfg.d_ff, d, rngs=rngs)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values ``[..., T, heads, d_head]`` of the block input ``x``."""
        *lead, t, d = x.shape
        y = self.ln1(x)
        return tuple(
            p(y).reshape(*lead, t, self.num_heads, d // self.num_heads)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )

    def finish(self, x: jax.Array, att: jax.Array) -> jax.Array:
        """Residual output projection and MLP, given the attention output ``[..., T, d]``."""
        x = x + self.o_proj(att)
        return x + self.down_proj(nnx.gelu(self.up_proj(self.ln2(x))))

    def __call__(self, x: jax.Array, return_kv: bool = False):
        *lead, t, d = x.shape
        q, k, v = self.qkv(x)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((t, t), bool)).reshape(
            (1,) * (scores.ndim - 2) + (t, t)
        )
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        att = jnp.einsum("...hqk,...khd->...qhd", probs, v).reshape(*lead, t, d)
        out = self.finish(x, att)
        return (out, (k, v)) if return_kv else out


class TinyLM(nnx.Module):
    """Byte-level causal LM: ``tokens [..., T] -> logits [..., T, vocab_size]``.

    ``hidden(tokens)`` gives the final (normed) hidden states and
    ``lm_head.kernel`` ``[d_model, vocab]`` the unembedding, for
    :func:`flowjax.chunked_token_nll`.
    """

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.max_len = cfg.max_len
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.lm_head = nnx.Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs
        )

    def hidden(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}.")
        pos = self.pos(jnp.arange(t))
        x = self.embed(tokens) + pos.reshape((1,) * (tokens.ndim - 1) + pos.shape)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.lm_head(self.hidden(tokens))


def build(cfg: LMConfig, seed: int = 0) -> TinyLM:
    """A randomly initialised :class:`TinyLM` (the factory ``finetune_checkpoint`` can call)."""
    return TinyLM(cfg, rngs=nnx.Rngs(seed))


def from_kwargs(seed: int = 0, **config) -> TinyLM:
    """``TinyLM(LMConfig(**config))``: a JSON-friendly factory for ``finetune_checkpoint --model``."""
    return build(LMConfig(**config), seed)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 token ids (no BOS/EOS)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Bytes below 256 back to text (special tokens dropped, invalid UTF-8 replaced)."""
    return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace")


def make_logits_fn(graphdef):
    """``logits_fn(state, tokens [T]) -> logits [T, V]`` over ``nnx.split`` state (for the pre-pass).

    ``state`` is every part of the split state as one tuple, so a LoRA model
    split into ``(lora, rest)`` works as well as a plain ``(params,)`` split.
    """

    def logits_fn(state, tokens):
        return nnx.merge(graphdef, *state)(tokens)

    return logits_fn


def make_greedy_decode(graphdef, max_new: int):
    """Jitted greedy decoding of right-padded prompts with a key/value cache.

    ``decode(state, buf [N, T], prompt_len [N]) -> buf`` writes up to
    ``max_new`` generated tokens after each prompt (``PAD`` after an ``EOS``).
    One causal forward pass over ``buf`` fills the per-layer key/value cache
    (prompt positions are exact: they attend only to earlier positions); each
    further step runs the one new token per row at its own position
    ``prompt_len + s`` and attends to cache positions ``<=`` it, so the result
    equals recomputing the full forward pass at every step.
    """

    @jax.jit
    def greedy(state, buf, prompt_len):
        model = nnx.merge(graphdef, *state)
        n, t = buf.shape
        rows = jnp.arange(n)
        x = model.embed(buf) + model.pos(jnp.arange(t))[None]
        cache = []
        for block in model.blocks:
            x, kv = block(x, return_kv=True)
            cache.append(kv)
        logits = model.lm_head(model.ln_f(x[rows, prompt_len - 1]))
        first = jnp.argmax(logits, axis=-1).astype(buf.dtype)
        buf = buf.at[rows, prompt_len].set(first)

        def body(s, carry):
            buf, cache, done = carry
            pos = prompt_len + s - 1  # position of the token fed in
            x = model.embed(buf[rows, pos]) + model.pos(pos)  # [N, d]
            visible = jnp.arange(t)[None, None, :] <= pos[:, None, None]  # [N, 1, T]
            new_cache = []
            for block, (kc, vc) in zip(model.blocks, cache, strict=True):
                q, k, v = (a[:, 0] for a in block.qkv(x[:, None]))  # [N, h, dh]
                kc, vc = kc.at[rows, pos].set(k), vc.at[rows, pos].set(v)
                scores = jnp.einsum("nhd,nthd->nht", q, kc) / math.sqrt(q.shape[-1])
                probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
                att = jnp.einsum("nht,nthd->nhd", probs, vc).reshape(x.shape)
                x = block.finish(x, att)
                new_cache.append((kc, vc))
            nxt = jnp.argmax(model.lm_head(model.ln_f(x)), axis=-1).astype(buf.dtype)
            nxt = jnp.where(done, PAD, nxt)
            return buf.at[rows, pos + 1].set(nxt), new_cache, done | (nxt == EOS)

        done = first == EOS
        return jax.lax.fori_loop(1, max_new, body, (buf, cache, done))[0]

    return greedy
