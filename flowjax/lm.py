"""Causal language-model losses and the weighted LM objective of the official FLOW code.

Conventions (those of the official pipeline, ``language/`` in
github.com/sanyalsunny111/FLOW_finetuning):

* One example is ``tokens`` ``[T]`` (prompt, response, EOS, then padding) and a
  boolean **target mask** ``[T]``: True exactly at the response tokens and the
  final EOS (the positions whose Hugging Face label is not -100). Prompt and
  padding are False. Build it with :func:`response_mask`.
* Shift: ``logits[t]`` predicts ``tokens[t + 1]``. :func:`token_nll` returns
  ``T - 1`` losses, entry ``t`` being the NLL of ``tokens[t + 1]``, with the
  shifted mask ``mask[1:]``. Position 0 can never be a target.
* A sequence's loss is the **mean** NLL over its target tokens
  (:func:`sequence_nll`); ``τ_seq`` is the median of those, ``τ_tok`` the
  median of all target-token NLLs (:func:`token_flow_weights`).
* A sequence with no target token (e.g. its response was truncated away) has
  no mean loss. The official code gets 0/0 = NaN and turns the weight into 0
  with ``nan_to_num``; flowjax raises instead, naming the sequence, unless you
  ask for NaN explicitly.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import _checks
from flowjax import weights as _weights
from flowjax._types import Array, ArrayLike

__all__ = [
    "response_mask",
    "sequence_nll",
    "token_flow_weights",
    "token_nll",
    "weighted_lm_loss",
]

OnEmpty = Literal["raise", "nan"]
_LEVELS = ("sequence", "token")
_REDUCTIONS = ("tokens", "sequences", "weights")


def response_mask(
    lengths: ArrayLike, prompt_lengths: ArrayLike, max_len: int
) -> np.ndarray:
    """The target mask of right-padded examples: response and EOS True, prompt and padding False.

    .. math:: m_{it} = [\\,p_i \\le t < L_i\\,], \\qquad t = 0, \\dots, T-1

    with :math:`L_i` the example's length (prompt + response + EOS, no
    padding) and :math:`p_i` its prompt length (BOS included), as in the
    official code, where the first ``len(tokenised prompt)`` labels are -100.

    Args:
      lengths: integer ``[B]``, tokens per example before padding.
      prompt_lengths: integer ``[B]``, prompt tokens per example (>= 1: the
        first token has no logit predicting it, so it is always prompt).
      max_len: the padded length ``T``.

    Returns:
      bool numpy ``[B, max_len]``. A row with ``prompt_length == length`` (a
      response truncated away) is all False; :func:`sequence_nll` refuses it.

    Raises:
      ValueError: shapes that differ or are not 1-D, non-integer values,
        ``prompt_lengths < 1``, ``prompt_lengths > lengths``,
        ``lengths > max_len``, or a ``max_len`` that is not an int >= 0.

    Example:
      >>> import flowjax
      >>> flowjax.response_mask([4, 3], [2, 1], 5).astype(int)
      array([[0, 0, 1, 1, 0],
             [0, 1, 1, 0, 0]])
    """
    if (
        isinstance(max_len, bool)
        or not isinstance(max_len, int | np.integer)
        or max_len < 0
    ):
        raise ValueError(
            f"max_len must be an int >= 0 (the padded length T); got {max_len!r}."
        )
    lengths = np.asarray(lengths)
    prompt = np.asarray(prompt_lengths)
    if lengths.ndim != 1 or prompt.shape != lengths.shape:
        raise ValueError(
            f"lengths and prompt_lengths must be 1-D of one length; got shapes {lengths.shape} "
            f"and {prompt.shape}."
        )
    for name, x in (("lengths", lengths), ("prompt_lengths", prompt)):
        if x.size and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} must be integers; got dtype {x.dtype}.")
    for bad, what in (
        (prompt < 1, "prompt_lengths must be >= 1 (position 0 is never a target)"),
        (prompt > lengths, "prompt_lengths exceed lengths"),
        (lengths > max_len, f"lengths exceed max_len={max_len} (truncate first)"),
    ):
        if bad.any():
            raise ValueError(f"{what} at {_checks.describe(bad)}.")
    t = np.arange(max_len)
    return (t >= prompt[:, None]) & (t < lengths[:, None])


def token_nll(
    logits: ArrayLike, tokens: ArrayLike, mask: ArrayLike
) -> tuple[Array, Array]:
    """Shifted next-token NLL of a causal LM, with the shifted target mask.

    .. math::
        \\mathrm{nll}_t = \\log\\textstyle\\sum_v e^{z_{t v}} - z_{t,\\,x_{t+1}},
        \\qquad m'_t = m_{t+1}, \\qquad t = 0, \\dots, T-2

    ``logits[t]`` predicts ``tokens[t + 1]``. Computed in float32 as
    logsumexp minus the target logit. Works on one example ``[T]`` or any
    batch ``[..., T]``.

    Args:
      logits: ``[..., T, V]``.
      tokens: integer ``[..., T]``, the model's input tokens.
      mask: boolean target mask ``[..., T]`` (see :func:`response_mask`):
        True where ``tokens[t]`` is a target.

    Returns:
      ``(nll, target_mask)``: float32 ``[..., T-1]`` and bool ``[..., T-1]``.
      ``nll`` is 0 where ``target_mask`` is False (those positions are not
      losses and their tokens are never read); reduce with the mask.

    Raises:
      ValueError: shapes that do not match, ``T < 2``, non-integer tokens, or
        for concrete input: ``mask[..., 0]`` True (nothing predicts the first
        token) or target tokens outside ``[0, V)``.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> logits = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]))
      >>> nll, m = flowjax.token_nll(logits, jnp.array([0, 1, 0]), jnp.array([False, True, True]))
      >>> nll.round(4).tolist(), m.tolist()  # -log 0.5, -log 0.25
      ([0.6931, 1.3863], [True, True])
    """
    logits, tokens, mask = jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask)
    if (
        logits.ndim < 2
        or logits.shape[:-1] != tokens.shape
        or mask.shape != tokens.shape
    ):
        raise ValueError(
            f"expected logits [..., T, V], tokens [..., T] and mask [..., T]; got shapes "
            f"{logits.shape}, {tokens.shape}, {mask.shape}."
        )
    if tokens.shape[-1] < 2:
        raise ValueError(
            f"sequences need T >= 2 tokens to have a next token; T={tokens.shape[-1]}."
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}.")
    mask = mask.astype(bool)
    v = logits.shape[-1]
    if _checks.is_concrete(mask) and _checks.is_concrete(tokens):
        m, x = np.asarray(mask), np.asarray(tokens)
        if m[..., 0].any():
            raise ValueError(
                f"mask[..., 0] is True at {_checks.describe(m[..., 0])}: no logit predicts the first "
                "token, so it cannot be a target (keep BOS in the prompt)."
            )
        bad = m & ((x < 0) | (x >= v))
        if bad.any():
            raise ValueError(
                f"target tokens outside the vocabulary [0, {v}) at flat {_checks.describe(bad, values=x)}."
            )
    target_mask = mask[..., 1:]
    targets = jnp.where(target_mask, tokens[..., 1:], 0)
    z = logits[..., :-1, :].astype(jnp.float32)
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(z, axis=-1) - picked
    return jnp.where(target_mask, nll, 0.0), target_mask


def sequence_nll(
    nll: ArrayLike,
    mask: ArrayLike,
    *,
    on_empty: OnEmpty = "raise",
    ids: ArrayLike | None = None,
) -> Array:
    """Per-sequence mean NLL over target tokens: the official FLOW sequence loss.

    .. math:: f_i = \\frac{\\sum_t m_{it}\\, \\mathrm{nll}_{it}}{\\sum_t m_{it}}

    This is the loss whose median is ``τ_seq`` and which gives the sequence
    weight ``w_i = exp(-f_i/τ_seq)`` (use :func:`flowjax.flow_weights` or a
    :class:`flowjax.LossTable` on the result).

    A sequence with no target token has no mean (0/0). ``on_empty="raise"``
    (default) raises a ``ValueError`` naming it when the mask is concrete;
    inside ``jax.jit`` it cannot raise and the sequence gets NaN, which the
    pre-pass (:func:`flowjax.per_example_losses`) then rejects with the
    example's id. ``on_empty="nan"`` gives NaN without raising, for callers
    who drop such sequences themselves. There is no option that turns it into
    a loss or weight of 0 silently.

    Args:
      nll: token NLLs ``[..., T]`` (e.g. from :func:`token_nll`).
      mask: boolean target mask ``[..., T]``.
      on_empty: ``"raise"`` or ``"nan"``.
      ids: optional example ids ``[...]`` to name in the error.

    Returns:
      float32 ``[...]``: one mean NLL per sequence.

    Raises:
      ValueError: mismatched shapes (``ids`` must be ``mask.shape[:-1]``),
        an unknown ``on_empty``, or (with
        ``on_empty="raise"`` and a concrete mask) a sequence without target
        tokens.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> nll = jnp.array([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]])
      >>> mask = jnp.array([[True, True, False], [True, False, False]])
      >>> flowjax.sequence_nll(nll, mask).tolist()
      [1.5, 4.0]
      >>> flowjax.sequence_nll(nll, mask & False, on_empty="nan").tolist()
      [nan, nan]
    """
    if on_empty not in ("raise", "nan"):
        raise ValueError(f'on_empty must be "raise" or "nan"; got {on_empty!r}.')
    nll, mask = jnp.asarray(nll), jnp.asarray(mask)
    if nll.shape != mask.shape or nll.ndim < 1:
        raise ValueError(
            f"nll {nll.shape} and mask {mask.shape} must have one shape [..., T]."
        )
    if ids is not None and jnp.shape(ids) != mask.shape[:-1]:
        raise ValueError(
            f"ids has shape {jnp.shape(ids)}; it must be the mask's shape without the "
            f"token axis, {mask.shape[:-1]} (one id per sequence)."
        )
    mask = mask.astype(bool)
    count = jnp.sum(mask, axis=-1)
    if on_empty == "raise" and _checks.is_concrete(count):
        empty = np.asarray(count) == 0
        if empty.any():
            raise ValueError(
                f"sequences with no target token at {_checks.describe(empty, ids)}: their mean loss "
                "is 0/0. flowjax does not set it to 0 (the official code's nan_to_num): drop them "
                '(a response truncated away trains nothing), or pass on_empty="nan" and drop the NaNs.'
            )
    total = jnp.sum(jnp.where(mask, nll.astype(jnp.float32), 0.0), axis=-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def token_flow_weights(
    token_losses: ArrayLike,
    mask: ArrayLike,
    temperature: float | ArrayLike | None = None,
) -> ArrayLike:
    """Token-level FLOW weights: ``exp(-nll_it / τ_tok)`` on target tokens.

    .. math::
        \\tau_{tok} = \\mathrm{median}\\{\\mathrm{nll}_{it} : m_{it}\\}, \\qquad
        w_{it} = m_{it} \\exp(-\\mathrm{nll}_{it}/\\tau_{tok})

    The median runs over every target token of every sequence (not over
    sequences), as in the official ``get_dataset_temperature.py``; get it
    with ``flowjax.median_temperature(token_losses[mask])`` (or use a
    :class:`flowjax.TokenLosses` table, whose ``flow_weights()`` records
    it). Positions that are not targets carry no loss and get weight 0 (the
    official code gives them 1 and masks them later; the training loss is the
    same); their values are never read.

    Args:
      token_losses: pre-trained token NLLs ``[..., T]`` (numpy or jax).
      mask: boolean target mask of the same shape.
      temperature: ``None`` (τ_tok, the median) or a number > 0.

    Returns:
      The weights, of the shape of ``token_losses`` (numpy in, numpy out; jax
      in, jax out).

    Raises:
      ValueError: mismatched shapes, no target token at all, NaN/inf or
        negative losses at target positions, a bad temperature or a median of
        0 (concrete input). Under ``jax.jit`` these give NaN weights at the
        target positions instead.

    Example:
      >>> import numpy as np, flowjax
      >>> losses = np.array([[0.0, 1.0, 2.0], [9.0, 3.0, 7.0]])
      >>> mask = np.array([[True, True, True], [False, True, False]])
      >>> flowjax.median_temperature(losses[mask])  # median of 0, 1, 2, 3
      1.5
      >>> flowjax.token_flow_weights(losses, mask).round(4).tolist()
      [[1.0, 0.5134, 0.2636], [0.0, 0.1353, 0.0]]
    """
    if jnp.shape(token_losses) != jnp.shape(mask):
        raise ValueError(
            f"token_losses {jnp.shape(token_losses)} and mask {jnp.shape(mask)} must have "
            "one shape."
        )
    if not isinstance(token_losses, jax.Array):
        token_losses, mask = np.asarray(token_losses), np.asarray(mask, bool)
    return _weights._exp_weights(
        token_losses, temperature, None, sign=-1.0, where=mask
    )[0]


def weighted_lm_loss(
    token_nll: ArrayLike,
    mask: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    level: Literal["sequence", "token"] = "sequence",
    reduction: Literal["tokens", "sequences", "weights"] = "tokens",
    denominator: ArrayLike | None = None,
) -> Array:
    """The weighted causal-LM training loss, with an explicit normaliser.

    With :math:`m_{it}` the target mask and :math:`w_{it} = w_i` (sequence
    level, ``weights`` ``[B]``) or :math:`w_{it}` (token level, ``weights``
    ``[B, T]``):

    .. math::
        \\text{"tokens"}: \\frac{\\sum_{i,t} m_{it} w_{it}\\, \\mathrm{nll}_{it}}{N_{tok}}, \\quad
        N_{tok} = \\sum_{i,t} m_{it}

    is the official FLOW loss (``WeightedLossTrainer``): the weighted token
    sum divided by the *unweighted* number of target tokens, never by
    :math:`\\sum w`. Long sequences keep proportionally more gradient.

    .. math::
        \\text{"sequences"}: \\frac{1}{N_{seq}} \\sum_i
        \\frac{\\sum_t m_{it} w_{it}\\, \\mathrm{nll}_{it}}{\\sum_t m_{it}}, \\qquad
        \\text{"weights"}: \\frac{\\sum_{i,t} m_{it} w_{it}\\, \\mathrm{nll}_{it}}{\\sum_{i,t} m_{it} w_{it}}

    ``"sequences"`` is the paper's :math:`\\frac1B\\sum_i w_i f_i(\\theta)` with
    :math:`f_i` the sequence mean NLL, :math:`N_{seq}` the number of rows with
    at least one target token (rows without any, e.g. padding rows, are left
    out). ``"weights"`` is a weighted token mean.

    **Gradient accumulation.** A micro-batch's own count is the wrong
    normaliser when gradients of several micro-batches are summed: pass
    ``denominator`` = the normaliser of the whole effective batch (``N_tok``,
    ``N_seq`` or the weight mass, summed over all micro-batches and devices,
    as ``num_items_in_batch`` in transformers >= 4.46), and **sum** the
    micro-batch gradients. The result equals the gradient of one big batch
    exactly. With ``denominator=None`` each micro-batch divides by its own
    count (averaging those gradients is then *not* the big-batch gradient
    unless every micro-batch has the same count).

    Args:
      token_nll: ``[B, T]`` token NLLs of the model being trained (e.g. from
        :func:`token_nll` or :func:`flowjax.chunked_token_nll`).
      mask: boolean ``[B, T]`` target mask.
      weights: ``[B]`` for ``level="sequence"``, ``[B, T]`` for
        ``level="token"``; ``None`` means all 1 (plain SFT loss).
      level: ``"sequence"`` or ``"token"``.
      reduction: ``"tokens"`` (official), ``"sequences"`` or ``"weights"``.
      denominator: optional scalar overriding the micro-batch's own
        normaliser (see gradient accumulation above).

    Returns:
      A float32 scalar. With no counted entry (and no ``denominator``) the
      ``"tokens"`` and ``"sequences"`` losses are 0, the sum over nothing;
      ``"weights"`` gives NaN if the counted weights sum to 0.

    Raises:
      ValueError: an unknown ``level`` or ``reduction``; shapes that do not
        match; for concrete input, NaN/inf or negative weights on counted
        entries or a ``denominator <= 0`` (under ``jax.jit`` these give NaN).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> nll = jnp.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
      >>> mask = jnp.array([[True, True, False], [True, False, False]])
      >>> w = jnp.array([1.0, 0.5])
      >>> float(flowjax.weighted_lm_loss(nll, mask, w))  # (1 + 2 + 0.5 * 3) / 3
      1.5
      >>> float(flowjax.weighted_lm_loss(nll, mask, w, reduction="sequences"))  # (1.5 + 1.5) / 2
      1.5
      >>> float(flowjax.weighted_lm_loss(nll, mask, w, denominator=6))  # micro-batch of 6 global tokens
      0.75
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}; got {level!r}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
    nll, mask = jnp.asarray(token_nll, jnp.float32), jnp.asarray(mask)
    if nll.ndim != 2 or mask.shape != nll.shape:
        raise ValueError(
            f"token_nll and mask must both be [B, T]; got {nll.shape} and {mask.shape}."
        )
    mask = mask.astype(bool)
    if weights is None:
        w = jnp.ones(nll.shape, jnp.float32)
    else:
        w = jnp.asarray(weights, jnp.float32)
        want = nll.shape[:1] if level == "sequence" else nll.shape
        if w.shape != want:
            raise ValueError(
                f'level="{level}" needs weights of shape {want}; got {w.shape}'
                + (
                    ' (token weights need level="token")'
                    if w.shape == nll.shape
                    else ""
                )
                + "."
            )
        if level == "sequence":
            w = jnp.broadcast_to(w[:, None], nll.shape)
        _checks.check_counted_weights(w, mask)
    if denominator is not None and _checks.is_concrete(denominator):
        if np.ndim(denominator) != 0 or not float(np.asarray(denominator)) > 0:
            raise ValueError(f"denominator must be a scalar > 0; got {denominator!r}.")
    contrib = jnp.where(mask, w * nll, 0.0)  # masked NaN/inf cannot leak
    # Under jit the checks above cannot run: a negative counted weight or a denominator
    # <= 0 makes the loss NaN (NaN and inf weights already give NaN or inf).
    contrib = _checks.nan_if_negative_weights(contrib, w, mask)
    if denominator is not None:
        contrib = jnp.where(jnp.asarray(denominator, jnp.float32) > 0, contrib, jnp.nan)
    if reduction == "sequences":
        count = jnp.sum(mask, axis=1)
        per_seq = jnp.sum(contrib, axis=1) / jnp.maximum(count, 1)
        total, own = jnp.sum(per_seq), jnp.sum(count > 0)
    else:
        total = jnp.sum(contrib)
        own = (
            jnp.sum(mask) if reduction == "tokens" else jnp.sum(jnp.where(mask, w, 0.0))
        )
    if denominator is not None:
        return total / jnp.asarray(denominator, jnp.float32)
    if reduction == "weights":
        return total / jnp.where(jnp.sum(mask) > 0, own, 1.0)
    return total / jnp.maximum(own, 1)


# flowjax.lm is the language-model namespace: the LM pre-passes, their tables and
# the chunked cross-entropy live in their own modules and are re-exported here
# (imported last: lm_prepass imports this module).
from flowjax.chunked_ce import chunked_token_nll  # noqa: E402
from flowjax.lm_prepass import (  # noqa: E402
    TokenLosses,
    TokenWeights,
    bucket_batches,
    lm_sequence_losses,
    lm_token_losses,
)

__all__ += [
    "TokenLosses",
    "TokenWeights",
    "bucket_batches",
    "chunked_token_nll",
    "lm_sequence_losses",
    "lm_token_losses",
]
