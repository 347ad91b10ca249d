"""Memory-lean cross-entropy: per-token NLL from hidden states, never building ``[N, V]`` logits.

A language model's last step turns hidden states ``h`` ``[N, D]`` into logits
``h W`` ``[N, V]``. With a 256k vocabulary and a few thousand tokens those
logits (and their gradient) dwarf everything else in memory.
:func:`chunked_token_nll` computes the same per-token NLL by scanning over
vocabulary chunks of ``chunk_size`` columns with an online logsumexp, and its
custom backward pass recomputes each chunk's logits instead of storing them,
so forward and backward both hold ``[N, chunk_size]`` at a time.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from flowjax import _checks
from flowjax._types import Array, ArrayLike

__all__ = ["chunked_token_nll"]

Layout = Literal["dv", "vd"]


def chunked_token_nll(
    hidden: ArrayLike,
    unembedding: ArrayLike,
    targets: ArrayLike,
    *,
    chunk_size: int | None = None,
    mask: ArrayLike | None = None,
    logit_softcap: float | None = None,
    layout: Layout = "dv",
) -> Array:
    """Per-token cross-entropy from final hidden states, in vocabulary chunks.

    .. math::
        z_{n} = h_n W, \\quad c_n = \\begin{cases} z_n & \\text{no cap} \\\\
        s \\tanh(z_n / s) & \\text{soft-cap } s \\end{cases}, \\quad
        \\mathrm{nll}_n = \\log\\textstyle\\sum_v e^{c_{n v}} - c_{n, y_n}

    The logsumexp runs over vocabulary chunks of ``chunk_size`` with a running
    maximum and sum (``lax.scan``), so the forward pass never holds more than
    ``[N, chunk_size]`` logits. The gradient is a ``jax.custom_vjp`` that
    recomputes each chunk's logits and accumulates

    .. math::
        \\frac{\\partial\\,\\mathrm{nll}_n}{\\partial z_{nv}} =
        (\\mathrm{softmax}(c_n)_v - [v = y_n])\\,(1 - (c_{nv}/s)^2)

    (the last factor is 1 without a cap) into ``dh`` and ``dW`` chunk by
    chunk, so the backward pass is memory-lean as well. A gradient that is not
    asked for is never computed: differentiating only w.r.t. ``hidden`` (a
    frozen ``lm_head`` or tied embedding table, as with LoRA, or ``W`` under
    ``stop_gradient``) allocates no ``[D, V]`` float32 ``dW`` buffer. Logits and the
    logsumexp are computed in float32 whatever the input dtype; gradients come
    back in the inputs' dtypes. A vocabulary that is not a multiple of
    ``chunk_size`` is handled without copying ``W``: the last chunk is shifted
    to end at ``V`` and its columns already seen are masked out.

    Args:
      hidden: final hidden states ``[N, D]`` (flatten batch and time first).
      unembedding: the output projection, ``[D, V]`` with ``layout="dv"``, or
        a tied input-embedding table ``[V, D]`` with ``layout="vd"`` (no
        transposed copy is made).
      targets: integer target token ids ``[N]`` (for a causal LM: the input
        tokens shifted left by one, see :func:`flowjax.token_nll`).
      chunk_size: vocabulary columns per chunk (clipped to ``V``). Working
        memory is about ``(N + D) * chunk_size * 4`` bytes: one float32
        ``[N, chunk_size]`` block of logits and the chunk of ``W``. Default
        (``None``): the largest power of two (at least 512) whose working
        memory fits ``flowjax.chunked_ce.CHUNK_BYTES`` (16 MiB), e.g. 4096 columns for
        ``N = 512, D = 128`` and 1024 for ``N = 2048``: at ``V = 128k``
        about 1/25 (forward) of the plain ``[N, V]`` logits and less below.
      mask: optional boolean ``[N]``; positions where it is False get NLL 0,
        contribute no gradient, and their targets are never read (so an
        ignore index such as -100 is harmless there).
      logit_softcap: Gemma-2-style final soft-cap ``s``: logits become
        ``s * tanh(z / s)``. ``None`` for no cap.
      layout: ``"dv"`` for ``unembedding`` of shape ``[D, V]``, ``"vd"`` for
        ``[V, D]``.

    Returns:
      float32 ``[N]``: the NLL of each target token (0 where ``mask`` is False).

    Raises:
      ValueError: wrong ranks or mismatched ``N``/``D``; a non-integer
        ``targets``; ``chunk_size < 1``; a ``logit_softcap`` that is not a
        finite number > 0; an unknown
        ``layout``; concrete unmasked targets outside ``[0, V)``. Under
        ``jax.jit`` they cannot be checked: their NLL is NaN, and so is the
        gradient they reach (their row of ``dh``, all of ``dW``), never the
        loss of a clamped token. Mask ignored positions.

    Example:
      >>> import jax, jax.numpy as jnp, flowjax
      >>> h = jax.random.normal(jax.random.key(0), (6, 4))
      >>> w = jax.random.normal(jax.random.key(1), (4, 10))
      >>> y = jnp.array([0, 3, 9, 2, 5, 7])
      >>> plain = -jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[:, None], 1)[:, 0]
      >>> bool(jnp.allclose(flowjax.chunked_token_nll(h, w, y, chunk_size=4), plain, atol=1e-5))
      True
    """
    hidden, unembedding, targets = (
        jnp.asarray(hidden),
        jnp.asarray(unembedding),
        jnp.asarray(targets),
    )
    if layout not in ("dv", "vd"):
        raise ValueError(
            f'layout must be "dv" ([D, V]) or "vd" ([V, D]); got {layout!r}.'
        )
    if hidden.ndim != 2 or unembedding.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            f"expected hidden [N, D], unembedding [D, V] or [V, D] and targets [N]; got shapes "
            f"{hidden.shape}, {unembedding.shape}, {targets.shape}."
        )
    d_axis = 0 if layout == "dv" else 1
    n, d = hidden.shape
    v = unembedding.shape[1 - d_axis]
    if unembedding.shape[d_axis] != d:
        raise ValueError(
            f'hidden has D={d} but unembedding {unembedding.shape} with layout="{layout}" has '
            f'D={unembedding.shape[d_axis]} (a tied [V, D] embedding table needs layout="vd").'
        )
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} entries; hidden has N={n}.")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"targets must be integer token ids; got dtype {targets.dtype}."
        )
    if chunk_size is None:
        chunk_size = _default_chunk_size(n, d)
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive int or None; got {chunk_size!r}."
        )
    if logit_softcap is not None:
        try:
            cap_value = float(logit_softcap)
        except (TypeError, ValueError):
            cap_value = np.nan
        if not (np.isfinite(cap_value) and cap_value > 0):
            raise ValueError(
                f"logit_softcap must be a finite number > 0 or None; got {logit_softcap!r} "
                "(use None for no cap; an infinite cap would give NaN)."
            )
    if mask is None:
        mask = jnp.ones((n,), bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != (n,):
            raise ValueError(f"mask has shape {mask.shape}; expected ({n},).")
        mask = mask.astype(bool)
    if _checks.is_concrete(targets) and _checks.is_concrete(mask):
        t, m = np.asarray(targets), np.asarray(mask)
        bad = m & ((t < 0) | (t >= v))
        if bad.any():
            raise ValueError(
                f"targets outside the vocabulary [0, {v}) at unmasked {_checks.describe(bad, values=t)}; "
                "mask ignored positions (e.g. label -100) with mask=."
            )
    cap = None if logit_softcap is None else float(logit_softcap)
    # Under jit an unmasked target outside [0, V) cannot raise: its NLL is NaN (and
    # so is every gradient it reaches), never the loss of some clamped token.
    bad = mask & ((targets < 0) | (targets >= v))
    safe = jnp.where(mask & ~bad, targets, 0).astype(jnp.int32)
    return _nll_jit(
        min(chunk_size, v), cap, layout, hidden, unembedding, safe, mask, bad
    )


# The working memory the default chunk size aims at: logits block plus W chunk, float32.
CHUNK_BYTES = 16 * 2**20
_MIN_CHUNK = 512


def _default_chunk_size(n: int, d: int) -> int:
    """The default ``chunk_size`` of :func:`chunked_token_nll` for ``N`` tokens and width ``D``.

    .. math:: c = \\max\\bigl(512,\\ 2^{\\lfloor \\log_2
        (\\mathrm{CHUNK\\_BYTES} / (4 (N + D))) \\rfloor}\\bigr)

    (4096 columns for ``N = 512, D = 128``; 1024 for ``N = 2048``.)
    """
    budget = CHUNK_BYTES // (4 * max(n + d, 1))
    return max(_MIN_CHUNK, 1 << max(int(budget).bit_length() - 1, 0))


def _cap(z: Array, cap: float | None) -> Array:
    return z if cap is None else cap * jnp.tanh(z / cap)


def _over_chunks(step, init, v: int, c: int):
    """Folds ``step(carry, start, fresh)`` over the vocabulary chunks of ``c`` columns.

    One ``lax.scan``. When ``c`` divides ``V``, ``fresh`` is None (no mask at
    all). Otherwise the last chunk is shifted to end at ``V`` (so ``W`` is
    never padded or copied) and ``fresh`` is the boolean ``[c]`` mask of the
    columns no earlier chunk saw: all True but in that chunk. (Running the
    shifted chunk outside the scan would allocate its own ``[N, c]`` block
    beside the loop's.)
    """
    k = -(-v // c)
    starts = jnp.minimum(jnp.arange(k) * c, v - c)
    ragged = k * c != v

    def body(carry, xs):
        i, start = xs
        fresh = start + jnp.arange(c) >= i * c if ragged else None
        return step(carry, start, fresh), None

    carry, _ = jax.lax.scan(body, init, (jnp.arange(k), starts))
    return carry


def _chunk_logits(h, w, start, c, layout):
    axis = 1 if layout == "dv" else 0
    wk = jax.lax.dynamic_slice_in_dim(w, start, c, axis=axis)
    spec = "nd,dc->nc" if layout == "dv" else "nd,cd->nc"
    return wk, jnp.einsum(spec, h, wk, preferred_element_type=jnp.float32)


def _target_logits(h, w, targets, layout):
    wt = w[:, targets] if layout == "dv" else w[targets, :]  # [D, N] or [N, D]
    spec = "nd,dn->n" if layout == "dv" else "nd,nd->n"
    return wt, jnp.einsum(spec, h, wt, preferred_element_type=jnp.float32)


def _lse(c, cap, layout, h, w):
    v = w.shape[1] if layout == "dv" else w.shape[0]
    n = h.shape[0]

    def step(carry, start, fresh):
        m, s = carry
        _, z = _chunk_logits(h, w, start, c, layout)  # the one [N, c] buffer
        # The cap is increasing, so the max of the capped logits is the cap of their
        # max; the shifted last chunk's columns already seen are logits too, harmless
        # in the max. Both reductions read z: nothing else of [N, c] is materialised.
        m_new = jnp.maximum(m, _cap(jnp.max(z, axis=1), cap))
        e = jnp.exp(_cap(z, cap) - m_new[:, None])
        if fresh is not None:
            e = jnp.where(fresh, e, 0.0)
        return m_new, s * jnp.exp(m - m_new) + jnp.sum(e, axis=1)

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    m, s = _over_chunks(step, init, v, c)
    return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _nll(c, cap, layout, h, w, targets, mask, bad):
    lse = _lse(c, cap, layout, h, w)
    _, zt = _target_logits(h, w, targets, layout)
    return jnp.where(bad, jnp.nan, jnp.where(mask, lse - _cap(zt, cap), 0.0))


def _nll_fwd(c, cap, layout, h, w, targets, mask, bad):
    # symbolic_zeros=True: each array argument arrives as a CustomVJPPrimal whose
    # static ``perturbed`` bit says whether its gradient is needed at all.
    need = (h.perturbed, w.perturbed)
    h, w, targets, mask, bad = h.value, w.value, targets.value, mask.value, bad.value
    lse = _lse(c, cap, layout, h, w)
    _, zt = _target_logits(h, w, targets, layout)
    out = jnp.where(bad, jnp.nan, jnp.where(mask, lse - _cap(zt, cap), 0.0))
    # The flags travel in the residuals' tree structure (None vs ()), so bwd sees them statically.
    flags = tuple(() if n else None for n in need)
    return out, (h, w, targets, mask, bad, lse, flags)


def _dcap(ccap, cap):
    """d cap(z) / dz written with the capped value: 1 - (c/s)^2."""
    return 1.0 if cap is None else 1.0 - jnp.square(ccap / cap)


def _nll_bwd(c, cap, layout, res, g):
    h, w, targets, mask, bad, lse, flags = res
    need_dh, need_dw = (f is not None for f in flags)
    if isinstance(g, SymbolicZero) or not (need_dh or need_dw):
        return None, None, None, None, None
    # A target outside the vocabulary has no gradient: NaN reaches its row of dh and all of dW.
    g = jnp.where(bad, jnp.nan, jnp.where(mask, g, 0.0)).astype(jnp.float32)
    v = w.shape[1] if layout == "dv" else w.shape[0]

    def step(carry, start, fresh):
        dh, dw = carry
        wk, z = _chunk_logits(h, w, start, c, layout)
        cz = _cap(z, cap)
        p = jnp.exp(cz - lse[:, None])
        if fresh is not None:
            p = jnp.where(fresh, p, 0.0)
        gz = g[:, None] * p * _dcap(cz, cap)  # [N, C], softmax part only
        if need_dh:
            spec = "nc,dc->nd" if layout == "dv" else "nc,cd->nd"
            dh = dh + jnp.einsum(spec, gz, wk, preferred_element_type=jnp.float32)
        if need_dw:
            spec = "nd,nc->dc" if layout == "dv" else "nd,nc->cd"
            dwk = jnp.einsum(spec, h, gz, preferred_element_type=jnp.float32)
            axis = 1 if layout == "dv" else 0
            old = jax.lax.dynamic_slice_in_dim(dw, start, c, axis=axis)
            dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dwk, start, axis=axis)
        return dh, dw

    # An unneeded gradient is never allocated: for a frozen W (LoRA, tied
    # embeddings) this saves the [D, V] float32 dW buffer.
    init = (
        jnp.zeros(h.shape, jnp.float32) if need_dh else None,
        jnp.zeros(w.shape, jnp.float32) if need_dw else None,
    )
    dh, dw = _over_chunks(step, init, v, c)
    # The one-hot part: -g (1 - (c_y/s)^2) at each target column.
    wt, zt = _target_logits(h, w, targets, layout)
    gt = g * _dcap(_cap(zt, cap), cap)  # [N]
    if need_dh:
        wt_nd = wt.T if layout == "dv" else wt
        dh = (dh - gt[:, None] * wt_nd.astype(jnp.float32)).astype(h.dtype)
    if need_dw:
        upd = -(h.astype(jnp.float32) * gt[:, None])  # [N, D]
        if layout == "dv":
            dw = dw.at[:, targets].add(upd.T)
        else:
            dw = dw.at[targets, :].add(upd)
        dw = dw.astype(w.dtype)
    return dh, dw, None, None, None


_nll.defvjp(_nll_fwd, _nll_bwd, symbolic_zeros=True)
# Jitted, so an eager call compiles the chunk loop once per shape instead of dispatching op by op.
_nll_jit = jax.jit(_nll, static_argnums=(0, 1, 2))
