"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021) for NNX sequence models.

Both freeze the whole model by construction and learn a few vectors, each
with its own Variable type (select them with NNX filters and
:func:`flowjax.train_only`):

* **prompt tuning** (:class:`PromptTuning`, :class:`PromptParam`): :math:`L`
  soft-prompt embeddings :math:`P \\in \\mathbb{R}^{L\\times d}` are prepended to
  the input embeddings, :math:`y = f([P; E(x)])_{L:}` (Lester, Al-Rfou &
  Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP
  2021, §2);
* **prefix tuning** (:class:`PrefixTuning`, :class:`PrefixParam`): every
  attention layer :math:`\\ell` gets :math:`L` learnable key and value vectors
  per head, :math:`K_\\ell \\leftarrow [P^K_\\ell; K_\\ell]`, :math:`V_\\ell
  \\leftarrow [P^V_\\ell; V_\\ell]`, visible to every query (Li & Liang,
  "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021,
  §4.2). Li & Liang reparameterise the prefix through an MLP during training
  for stability; this is the direct parameterisation (PEFT's default,
  ``prefix_projection=False``); an MLP reparameterisation is a function of the
  same :class:`PrefixParam` you can compose outside.

**The model contract.** A sequence model takes part when it has

* ``embed(tokens) -> h`` of shape ``(batch, T, d)`` (prompt tuning), and
* ``from_embeddings(h, *, prefixes=None) -> out`` of shape ``(batch, T, ...)``
  computing the rest of the network from the embeddings, where ``prefixes``
  is ``None`` or an array ``(num_layers, 2, L, num_heads, head_dim)`` and
  attention layer ``i`` attends with :func:`prefix_attention` to
  ``prefixes[i]`` (prefix tuning; a model for prompt tuning only may ignore
  the keyword). A grouped-query model takes its ``num_key_value_heads``
  as ``num_heads``: each prefix head is shared by its group of queries, as
  the model's own keys are (:meth:`flowjax.models.CausalLM.from_embeddings`,
  which also applies its own query scale and soft-cap instead of
  :func:`prefix_attention`'s :math:`1/\\sqrt{D}`).

A model whose ``from_embeddings`` also takes ``attention_mask`` and
``positions`` (``[batch, T]``) gets them from :class:`PromptTuning` and
:class:`PrefixTuning` when their callers pass them: the prompt's
:math:`L` positions are real (mask 1) and take positions ``0 .. L-1``,
the tokens' positions are shifted by :math:`L`; a prefix is never masked.

Its own ``__call__(tokens)`` should be ``from_embeddings(embed(tokens))``; a
zero-length prompt or prefix then computes exactly what the base model
computes.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "PrefixParam",
    "PrefixTuning",
    "PromptParam",
    "PromptTuning",
    "prefix_attention",
]


class PromptParam(nnx.Param):
    """The Variable type of the soft prompt :math:`P` of :class:`PromptTuning` (an ``nnx.Param``).

    Train only the prompt with ``flowjax.train_only(tx, flowjax.PromptParam)``.
    """


class PrefixParam(nnx.Param):
    """The Variable type of :class:`PrefixTuning`'s per-layer keys and values (an ``nnx.Param``).

    Its array is ``(num_layers, 2, L, num_heads, head_dim)``; select it with
    ``flowjax.train_only(tx, flowjax.PrefixParam)``.
    """


def _check_length(length) -> int:
    if (
        isinstance(length, bool)
        or not isinstance(length, numbers.Integral)
        or length < 0
    ):
        raise ValueError(f"length must be an integer >= 0; got {length!r}.")
    return int(length)


def _check_model(model, needs: tuple[str, ...]) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}.")
    missing = [n for n in needs if not callable(getattr(model, n, None))]
    if missing:
        raise TypeError(
            f"{type(model).__name__} lacks {missing}: the prompt/prefix contract needs "
            "embed(tokens) -> (batch, T, d) and from_embeddings(h, *, prefixes=None) "
            "(see flowjax.prompts)."
        )


def prefix_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    prefix: jax.Array | None = None,
    *,
    causal: bool = True,
) -> jax.Array:
    """Multi-head attention whose keys and values start with a prefix every query sees.

    With :math:`q, k, v \\in \\mathbb{R}^{B\\times T\\times H\\times D}` and a
    prefix :math:`(P^K, P^V) \\in \\mathbb{R}^{2\\times L\\times H\\times D}`
    (shared by the batch),

    .. math::
        K = [P^K; k],\\; V = [P^V; v],\\quad
        \\text{out}_{t} = \\sum_{j} \\operatorname{softmax}_j\\Big(
        \\frac{q_t \\cdot K_j}{\\sqrt{D}} + M_{tj}\\Big) V_j,

    with :math:`M_{tj} = 0` for prefix positions :math:`j < L` and, when
    ``causal``, :math:`M_{tj} = -\\infty` for tokens after :math:`t`
    (:math:`j - L > t`). Scores and softmax are computed in float32 (or wider);
    the output has ``v``'s dtype. ``prefix=None`` or ``L = 0`` is plain
    (causal) attention.

    Args:
      q: queries ``(B, T, H, D)``.
      k: keys ``(B, T, H, D)``.
      v: values ``(B, T, H, D)``.
      prefix: ``None`` or ``(2, L, H, D)``: the prefix keys (``prefix[0]``)
        and values (``prefix[1]``).
      causal: mask tokens after the query (the prefix is never masked).

    Returns:
      ``(B, T, H, D)``.

    Raises:
      ValueError: shapes that do not fit together (named in the message).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> q = k = v = jnp.ones((1, 3, 2, 4))
      >>> flowjax.prefix_attention(q, k, v, jnp.zeros((2, 5, 2, 4))).shape
      (1, 3, 2, 4)
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (batch, T, heads, head_dim); got {q.shape}, {k.shape}, "
            f"{v.shape}."
        )
    b, t, h, d = q.shape
    length = 0
    if prefix is not None:
        if prefix.ndim != 4 or prefix.shape[0] != 2 or prefix.shape[2:] != (h, d):
            raise ValueError(
                f"prefix must be (2, L, heads={h}, head_dim={d}); got {prefix.shape}."
            )
        length = prefix.shape[1]
        pk = jnp.broadcast_to(prefix[0][None].astype(k.dtype), (b, length, h, d))
        pv = jnp.broadcast_to(prefix[1][None].astype(v.dtype), (b, length, h, d))
        k = jnp.concatenate([pk, k], axis=1)
        v = jnp.concatenate([pv, v], axis=1)
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype))
    scores = scores / math.sqrt(d)
    if causal:
        j = jnp.arange(length + t)[None, :]
        i = jnp.arange(t)[:, None]
        allowed = (j < length) | (j - length <= i)
        scores = jnp.where(allowed[None, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(dtype))
    return out.astype(v.dtype)


class PromptTuning(nnx.Module):
    """A frozen sequence model with :math:`L` learnable soft-prompt embeddings prepended.

    .. math::
        y = f\\big([P; E(x)]\\big)_{L:}, \\qquad P \\in \\mathbb{R}^{L\\times d}
        \\ (\\text{a } \\texttt{PromptParam}),

    with :math:`E` = ``model.embed`` and :math:`f` = ``model.from_embeddings``;
    the outputs at the prompt positions are dropped, so the result lines up
    with ``tokens`` (Lester et al., 2021). :math:`L = 0` is the base model
    exactly. Train only the prompt with
    ``flowjax.train_only(tx, flowjax.PromptParam)`` (or ``nnx.split(m,
    flowjax.PromptParam, ...)``); with FLOW, train on
    :func:`flowjax.weighted_objective` as for any method.

    Args:
      model: a sequence model with ``embed`` and ``from_embeddings`` (see
        ``flowjax.prompts``). It is held, not copied.
      length: :math:`L \\ge 0`, the number of soft-prompt tokens.
      features: :math:`d`, the embedding width.
      rngs: random streams; ``rngs.params()`` draws :math:`P` when ``init``
        is None.
      init: ``None`` (default: :math:`P_{ij} \\sim \\mathcal{N}(0, 0.02^2)`),
        or an array ``(L, d)`` to start from, e.g. the embeddings of real
        tokens (Lester et al.'s vocabulary initialisation).
      param_dtype: dtype of :math:`P` (cast to the embeddings' dtype when used).

    Raises:
      TypeError: ``model`` breaks the contract.
      ValueError: ``length`` or ``features`` is invalid, or ``init`` has the
        wrong shape.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> class Bag(nnx.Module):  # a toy model: running mean of embeddings
      ...     def __init__(self, rngs):
      ...         self.emb = nnx.Embed(10, 4, rngs=rngs)
      ...     def embed(self, tokens):
      ...         return self.emb(tokens)
      ...     def from_embeddings(self, h, *, prefixes=None):
      ...         return jnp.cumsum(h, axis=1)
      ...     def __call__(self, tokens):
      ...         return self.from_embeddings(self.embed(tokens))
      >>> base = Bag(nnx.Rngs(0))
      >>> tokens = jnp.array([[1, 2, 3]])
      >>> empty = flowjax.PromptTuning(base, 0, 4, rngs=nnx.Rngs(1))
      >>> bool((empty(tokens) == base(tokens)).all())
      True
      >>> flowjax.PromptTuning(base, 5, 4, rngs=nnx.Rngs(1))(tokens).shape
      (1, 3, 4)
    """

    def __init__(
        self,
        model: nnx.Module,
        length: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        init: jax.typing.ArrayLike | None = None,
        param_dtype: Any = jnp.float32,
    ):
        _check_model(model, ("embed", "from_embeddings"))
        length = _check_length(length)
        if isinstance(features, bool) or not isinstance(features, numbers.Integral):
            raise ValueError(f"features must be a positive integer; got {features!r}.")
        if features < 1:
            raise ValueError(f"features must be a positive integer; got {features!r}.")
        shape = (length, int(features))
        if init is None:
            value = 0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
        else:
            value = jnp.asarray(init, param_dtype)
            if value.shape != shape:
                raise ValueError(f"init must have shape {shape}; got {value.shape}.")
        self.model = model
        self.length = length
        self.prompt = PromptParam(value)

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``f([P; E(tokens)])`` at the tokens' positions, ``(batch, T, ...)``.

        ``attention_mask`` / ``positions`` ``[batch, T]`` (passed on only when
        given): the prompt is unmasked and at positions ``0 .. L-1``, the
        tokens' positions are ``positions + L``. The prompt takes the first
        :math:`L` slots, so left padding lies between it and the text: exact
        where attention masks by mask and position, but an attention window
        counted in slots (Gemma 2's sliding layers, as in transformers) also
        counts those padding slots; right-pad for such models
        (:func:`flowjax.models.generate` places the prompt after each row's
        padding).
        """
        h = self.model.embed(tokens)
        b = h.shape[0]
        prompt = self.prompt.get_value().astype(h.dtype)
        prompt = jnp.broadcast_to(prompt[None], (b, *prompt.shape))
        kw = {}
        if attention_mask is not None:
            ones = jnp.ones((b, self.length), jnp.asarray(attention_mask).dtype)
            kw["attention_mask"] = jnp.concatenate([ones, attention_mask], axis=1)
        if positions is not None:
            positions = jnp.asarray(positions)
            first = jnp.broadcast_to(
                jnp.arange(self.length, dtype=positions.dtype), (b, self.length)
            )
            kw["positions"] = jnp.concatenate([first, positions + self.length], axis=1)
        out = self.model.from_embeddings(jnp.concatenate([prompt, h], axis=1), **kw)
        return out[:, self.length :]


class PrefixTuning(nnx.Module):
    """A frozen sequence model with :math:`L` learnable key/value prefixes in every attention layer.

    .. math::
        K_\\ell \\leftarrow [P^K_\\ell; K_\\ell], \\quad V_\\ell \\leftarrow
        [P^V_\\ell; V_\\ell], \\qquad P \\in \\mathbb{R}^{N\\times 2\\times L\\times
        H\\times D} \\ (\\text{a } \\texttt{PrefixParam}),

    passed as ``model.from_embeddings(model.embed(tokens), prefixes=P)``;
    the model's attention layer :math:`\\ell` uses :func:`prefix_attention`
    with ``P[ℓ]`` (Li & Liang, 2021, direct parameterisation). :math:`L = 0`
    is the base model exactly. Train only the prefix with
    ``flowjax.train_only(tx, flowjax.PrefixParam)``.

    Args:
      model: a sequence model with ``embed`` and ``from_embeddings(h, *,
        prefixes)`` (see ``flowjax.prompts``). It is held, not copied.
      length: :math:`L \\ge 0`.
      num_layers: :math:`N`, the number of attention layers.
      num_heads: :math:`H`; for grouped-query attention the number of
        key/value heads (:class:`flowjax.models.CausalLM`:
        ``config.num_key_value_heads``).
      head_dim: :math:`D`.
      rngs: random streams; ``rngs.params()`` draws
        :math:`P \\sim \\mathcal{N}(0, 0.02^2)`.
      param_dtype: dtype of :math:`P`.

    Raises:
      TypeError: ``model`` breaks the contract.
      ValueError: a size is not a valid integer.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> class Attn(nnx.Module):  # one attention layer, q = k = v = embeddings
      ...     def __init__(self, rngs):
      ...         self.emb = nnx.Embed(10, 4, rngs=rngs)
      ...     def embed(self, tokens):
      ...         return self.emb(tokens)
      ...     def from_embeddings(self, h, *, prefixes=None):
      ...         x = h[:, :, None, :]  # one head
      ...         p = None if prefixes is None else prefixes[0]
      ...         return flowjax.prefix_attention(x, x, x, p)[:, :, 0]
      ...     def __call__(self, tokens):
      ...         return self.from_embeddings(self.embed(tokens))
      >>> base, tokens = Attn(nnx.Rngs(0)), jnp.array([[1, 2, 3]])
      >>> empty = flowjax.PrefixTuning(base, 0, num_layers=1, num_heads=1, head_dim=4,
      ...                              rngs=nnx.Rngs(1))
      >>> bool((empty(tokens) == base(tokens)).all())
      True
    """

    def __init__(
        self,
        model: nnx.Module,
        length: int,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
    ):
        _check_model(model, ("embed", "from_embeddings"))
        length = _check_length(length)
        sizes = {"num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim}
        for name, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"{name} must be a positive integer; got {n!r}.")
        shape = (int(num_layers), 2, length, int(num_heads), int(head_dim))
        self.model = model
        self.length = length
        self.prefix = PrefixParam(
            0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
        )

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``f(E(tokens))`` with every attention layer seeing its prefix, ``(batch, T, ...)``.

        ``attention_mask`` / ``positions`` ``[batch, T]`` are passed on to
        ``from_embeddings`` only when given (the prefix is never masked).
        """
        kw = {"attention_mask": attention_mask, "positions": positions}
        kw = {k: v for k, v in kw.items() if v is not None}
        h = self.model.embed(tokens)
        return self.model.from_embeddings(h, prefixes=self.prefix.get_value(), **kw)
