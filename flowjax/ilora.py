"""I-LoRA (Ren et al., 2024, arXiv 2402.18865): a fast and a slow LoRA, interpolated.

Two LoRA adapters on one frozen base: the *fast* one :math:`\\theta_f` is
trained by the optimiser on the current task plus replayed examples; the
*slow* one :math:`\\theta_s` is never differentiated: after every optimiser
step it moves toward the fast one by interpolation (an EMA of the fast
adapter's trajectory),

.. math::
    \\theta_s \\leftarrow \\lambda_t\\,\\theta_s + (1-\\lambda_t)\\,\\theta_f,
    \\qquad \\lambda_t = \\min\\bigl(1 - \\tfrac{1}{t+1},\\; \\lambda\\bigr),

and the fast adapter is pulled toward the slow one's hidden states on the
replayed examples by a consistency loss, so that what the slow adapter keeps
(old tasks) constrains what the fast one learns:

.. math::
    \\mathcal{L} = \\tfrac12\\bigl(\\mathcal{L}_\\text{task}(\\theta_f; x) +
    \\mathcal{L}_\\text{task}(\\theta_f; x_\\text{replay})\\bigr)
    + \\gamma\\,\\ell_\\text{cons}(h_f(x_\\text{replay}), \\operatorname{sg} h_s(x_\\text{replay})),
    \\qquad
    \\ell_\\text{cons} = \\operatorname{mean}\\bigl(h_f - \\max(h_f, h_s)\\bigr)^2
    = \\operatorname{mean}\\,\\operatorname{relu}(h_s - h_f)^2.

**What the reference code does** (``which47/LLMCL``, ``method/ILORA.py``,
class ``ILoRAModel``; this module follows it):

* The slow adapter is a second PEFT adapter (``"ema"``) updated after every
  optimiser step (a ``TrainerCallback.on_step_end``) with
  ``alpha = min(1 - 1/(step + 1), ema_alpha)``, ``ema_alpha = 0.25``, as
  ``slow = alpha * slow + (1 - alpha) * fast``: :math:`\\lambda = 0.25` is the
  weight kept on the *slow* adapter, so it moves three quarters of the way
  to the fast one at every step (``step`` is the trainer's global step,
  already counting the step just taken: :math:`t \\ge 1`, so with
  :math:`\\lambda = 0.25` the warm-up never binds). :func:`ilora_slow_update`
  is this update (``step=t`` for the warm-up); :func:`ilora` runs it after
  each step of an optax optimiser.
* The hidden states are all of Hugging Face's ``output_hidden_states``
  (the embedding output and every decoder layer's output, every position,
  padding included: the replayed batch is zero-padded and run without an
  attention mask); the slow ones under ``torch.no_grad``. The target is the
  element-wise maximum of the fast and slow states, so only entries where the
  fast state is *below* the slow one are penalised; the loss is
  ``nn.MSELoss`` averaged over every entry of every layer (the layers are
  concatenated), i.e. :func:`ilora_consistency_loss` averaged over examples.
* The total is ``(loss(current) + loss(replay)) / 2 + reg_weight * l_cons``
  with ``reg_weight`` :math:`\\gamma = 1`, both task losses with the fast
  adapter; without replay data (the first task) just ``loss(current)``. The
  replay buffer is a 500-example reservoir, sampled with as many examples
  as the current batch (flowjax's :class:`flowjax.ReplayBuffer`).

Choices here: the slow adapter starts as a copy of the fast one (the
reference adds it with a fresh PEFT initialisation, another random
:math:`A` and :math:`B = 0`; both start at the base model's outputs). With
:class:`flowjax.models.CausalLM` the hidden states at hand are the final
(normed) ones, ``lm.hidden(tokens)``; pass a list of per-layer states to
average over layers as the reference does (entries of layers the adapters
do not change, like the embedding output, add zeros to the mean).

With FLOW: weight the current-task losses by FLOW's weights
(:func:`flowjax.weighted_loss`), leave the replayed examples and the
consistency term unweighted. Worked example (an NNX model with
:func:`flowjax.add_lora`; ``hidden(model, x)`` returns its hidden states)::

    graphdef, fast, rest = nnx.split(flowjax.add_lora(base, 8, rngs=nnx.Rngs(0)),
                                     nnx.LoRAParam, ...)
    params = {"fast": fast, "slow": jax.tree.map(jnp.copy, fast)}

    def objective(params, batch, rest):
        fast = nnx.merge(graphdef, params["fast"], rest)
        slow = nnx.merge(graphdef, params["slow"], rest)
        cur = flowjax.weighted_loss(task_loss(fast, batch), batch["weight"])
        old = task_loss(fast, batch["replay"]).mean()
        cons = flowjax.ilora_consistency_loss(
            hidden(fast, batch["replay"]["x"]), hidden(slow, batch["replay"]["x"]))
        return (cur + old) / 2 + 1.0 * cons.mean()

    tx = flowjax.ilora(optax.adamw(2e-4), decay=0.25)   # the slow update inside
    step = flowjax.make_train_step(objective, tx, anchor=params, frozen=rest,
                                   return_metrics=False)
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from flowjax._types import Array, Params

__all__ = ["ILoRAState", "ilora", "ilora_consistency_loss", "ilora_slow_update"]


def _check_decay(decay):
    if isinstance(decay, bool):
        raise ValueError(f"decay must be a number in [0, 1]; got {decay!r}.")
    if isinstance(decay, numbers.Real):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1]; got {decay!r}.")
        return float(decay)
    d = jnp.asarray(decay, jnp.float32)  # traced: a bad value becomes NaN
    return jnp.where((d >= 0) & (d <= 1), d, jnp.nan)


def _effective_decay(decay, step):
    if step is None:
        return decay
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (t + 1.0), decay)


def ilora_slow_update(
    slow: Params, fast: Params, decay: float = 0.25, *, step: Any = None
) -> Params:
    """The slow adapter's update: :math:`\\theta_s \\leftarrow \\lambda_t\\theta_s + (1-\\lambda_t)\\theta_f`.

    .. math::
        \\lambda_t = \\lambda \\;\\; (\\text{no } step), \\qquad
        \\lambda_t = \\min\\bigl(1 - \\tfrac{1}{t+1}, \\lambda\\bigr) \\;\\; (step = t)

    leafwise, computed in float32 (or wider) and rounded once to each slow
    leaf's dtype. :math:`\\lambda = 1` without ``step`` returns ``slow``
    itself (the slow adapter never moves), :math:`\\lambda = 0` copies the
    fast one. The reference's
    :math:`\\lambda` is 0.25, with ``step`` the number of optimiser steps
    taken so far (see the module doc).

    Args:
      slow: :math:`\\theta_s`, a pytree (e.g. ``nnx.state(slow_model, nnx.LoRAParam)``).
      fast: :math:`\\theta_f`, the same structure.
      decay: :math:`\\lambda \\in [0, 1]`, the weight kept on the slow adapter
        (a traced value outside [0, 1] gives NaN).
      step: optional :math:`t \\ge 1` for the warm-up (a Python or traced integer).

    Returns:
      The new :math:`\\theta_s`, with ``slow``'s structure and dtypes.

    Raises:
      ValueError: a concrete ``decay`` outside [0, 1], or trees that differ
        in structure or shapes (naming the leaf).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> slow, fast = {"a": jnp.array([0.0, 4.0])}, {"a": jnp.array([4.0, 0.0])}
      >>> flowjax.ilora_slow_update(slow, fast, 0.25)["a"].tolist()
      [3.0, 1.0]
      >>> flowjax.ilora_slow_update(slow, fast, 0.75, step=1)["a"].tolist()  # λ_1 = 0.5
      [2.0, 2.0]
    """
    decay = _check_decay(decay)
    lam = _effective_decay(decay, step)
    if step is None and isinstance(lam, float) and lam == 1.0:
        return slow
    s_paths, s_def = jax.tree_util.tree_flatten_with_path(slow)
    f_leaves, f_def = jax.tree.flatten(fast)
    if s_def != f_def:
        raise ValueError(
            f"slow and fast adapters differ in structure: {s_def} vs {f_def}."
        )
    out = []
    for (path, s), f in zip(s_paths, f_leaves, strict=True):
        s, f = jnp.asarray(s), jnp.asarray(f)
        if s.shape != f.shape:
            raise ValueError(
                f"slow{jax.tree_util.keystr(path)} has shape {s.shape}, the fast "
                f"adapter's {f.shape}."
            )
        c = jnp.promote_types(s.dtype, jnp.float32)
        new = lam * s.astype(c) + (1.0 - lam) * f.astype(c)
        out.append(new.astype(s.dtype))
    return jax.tree.unflatten(s_def, out)


def ilora_consistency_loss(
    fast_hidden: Any, slow_hidden: Any, *, where: Array | None = None
) -> Array:
    """I-LoRA's consistency loss per example: :math:`\\operatorname{mean}\\,\\operatorname{relu}(h_s - h_f)^2`.

    .. math::
        \\ell_i = \\frac{1}{N_i} \\sum_{\\text{layers}} \\sum_{t, d}
        \\bigl(h^f_{i t d} - \\max(h^f_{i t d},\\, \\operatorname{sg} h^s_{i t d})\\bigr)^2,

    over every layer's hidden states (leaves of ``fast_hidden``, each
    ``[B, ...]`` with the batch first), every position and feature
    (:math:`N_i` entries, or those of the positions ``where`` keeps). The slow
    states are wrapped in ``jax.lax.stop_gradient``: the gradient reaches the
    fast adapter only, and only where its state is below the slow one. The
    mean over examples of this vector is the reference's loss (its
    ``MSELoss`` over all entries) when ``where`` is None. Computed in float32.

    Args:
      fast_hidden: the fast adapter's hidden states: an array ``[B, ...]`` or
        a pytree (a list of per-layer ``[B, T, D]``).
      slow_hidden: the slow adapter's, the same structure and shapes.
      where: optional ``[B, T]`` (or any prefix shape of the leaves) mask of
        the positions to count; an example with none counts 0.

    Returns:
      A float32 vector ``[B]``.

    Raises:
      ValueError: structures or shapes that differ, leaves with different
        batch sizes, or a ``where`` that does not broadcast (naming the leaf).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> fast = jnp.array([[1.0, 3.0], [0.0, 0.0]])
      >>> slow = jnp.array([[2.0, 1.0], [0.0, 4.0]])
      >>> flowjax.ilora_consistency_loss(fast, slow).tolist()  # only h_f < h_s counts
      [0.5, 8.0]
    """
    f_paths, f_def = jax.tree_util.tree_flatten_with_path(fast_hidden)
    s_leaves, s_def = jax.tree.flatten(slow_hidden)
    if f_def != s_def:
        raise ValueError(
            f"fast and slow hidden states differ in structure: {f_def} vs {s_def}."
        )
    if not f_paths:
        raise ValueError(
            "ilora_consistency_loss needs at least one hidden-state array."
        )
    batch = None
    total = count = None
    for (path, f), s in zip(f_paths, s_leaves, strict=True):
        name = f"fast_hidden{jax.tree_util.keystr(path)}"
        f, s = jnp.asarray(f), jnp.asarray(s)
        if f.shape != s.shape or f.ndim == 0:
            raise ValueError(
                f"{name} has shape {f.shape} and the slow state {s.shape}; they must "
                "match, with the batch axis first."
            )
        if batch is None:
            batch = f.shape[0]
        elif f.shape[0] != batch:
            raise ValueError(f"{name} has batch size {f.shape[0]}, not {batch}.")
        f = f.astype(jnp.promote_types(f.dtype, jnp.float32))
        s = jax.lax.stop_gradient(s).astype(f.dtype)
        sq = jnp.square(f - jnp.maximum(f, s))
        if where is None:
            keep = jnp.ones(f.shape, f.dtype)
        else:
            w = jnp.asarray(where)
            if w.shape != f.shape[: w.ndim]:
                raise ValueError(
                    f"where has shape {w.shape}, not a prefix of {name}'s {f.shape}."
                )
            keep = jnp.broadcast_to(
                w.reshape(w.shape + (1,) * (f.ndim - w.ndim)), f.shape
            ).astype(f.dtype)
        axes = tuple(range(1, f.ndim))
        t = jnp.sum(sq * keep, axis=axes)
        c = jnp.sum(keep, axis=axes)
        total = t if total is None else total + t
        count = c if count is None else count + c
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0).astype(jnp.float32)


def _count_like(tree) -> Array:
    """A zero int32 step count, replicated over the mesh the parameters live on."""
    count = jnp.zeros((), jnp.int32)
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf, jax.Array) and isinstance(sharding, NamedSharding):
            return jax.device_put(count, NamedSharding(sharding.mesh, PartitionSpec()))
    return count


class ILoRAState(NamedTuple):
    """State of :func:`ilora`: the inner optimiser's state and the step count."""

    inner: optax.OptState
    count: Array


def ilora(
    tx: optax.GradientTransformation, decay: float = 0.25, *, warmup: bool = True
) -> optax.GradientTransformation:
    """I-LoRA's optimiser: ``tx`` on the fast adapter, then the slow update, in one step.

    For parameters ``{"fast": θ_f, "slow": θ_s}``:

    .. math::
        (u_f, s') = \\mathrm{tx.update}(g_f, s, \\theta_f), \\quad
        \\theta_f' = \\theta_f + u_f, \\quad
        u_s = \\mathrm{ilora\\_slow\\_update}(\\theta_s, \\theta_f', \\lambda, t) - \\theta_s,

    with :math:`t` the number of steps including this one (warm-up
    :math:`\\lambda_t = \\min(1 - 1/(t+1), \\lambda)` when ``warmup``, as the
    reference; :func:`ilora_slow_update`). The slow adapter's gradient is
    ignored (the consistency loss stops it anyway): it is updated outside the
    gradient, from the fast adapter's new value. The fast adapter trains
    exactly as under ``tx`` whatever the slow one does, unless the objective
    couples them (the consistency loss). With ``decay=1`` and
    ``warmup=False`` the slow adapter never moves; with ``decay=1`` and the
    warm-up it is the running mean of the fast adapter's iterates
    (:math:`\\lambda_t = t/(t+1)`).

    Args:
      tx: the optimiser of the fast adapter.
      decay: :math:`\\lambda \\in [0, 1]`, the weight kept on the slow adapter
        (0.25 in the reference).
      warmup: use the reference's :math:`\\min(1 - 1/(t+1), \\lambda)`.

    Returns:
      An ``optax.GradientTransformation`` on ``{"fast": ..., "slow": ...}``
      whose state is :class:`ILoRAState`; ``update`` needs ``params``.

    Raises:
      ValueError: ``decay`` outside [0, 1]; on ``init``/``update``: params
        that are not a mapping with exactly the keys ``"fast"`` and
        ``"slow"``, or missing ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, flowjax
      >>> tx = flowjax.ilora(optax.sgd(1.0), decay=0.25, warmup=False)
      >>> p = {"fast": jnp.array([2.0]), "slow": jnp.array([0.0])}
      >>> g = {"fast": jnp.array([1.0]), "slow": jnp.array([0.0])}
      >>> u, state = tx.update(g, tx.init(p), p)
      >>> optax.apply_updates(p, u)["fast"].tolist(), optax.apply_updates(p, u)["slow"].tolist()
      ([1.0], [0.75])
    """
    decay = _check_decay(decay)

    def check(params, what):
        if params is None:
            raise ValueError(
                f"ilora's {what} needs params {{'fast': ..., 'slow': ...}}."
            )
        if not hasattr(params, "keys") or set(params.keys()) != {"fast", "slow"}:
            raise ValueError(
                "ilora optimises params {'fast': θ_f, 'slow': θ_s}; got "
                f"{type(params).__name__} with keys "
                f"{sorted(params.keys()) if hasattr(params, 'keys') else None}."
            )

    def init_fn(params):
        check(params, "init")
        return ILoRAState(tx.init(params["fast"]), _count_like(params["fast"]))

    def update_fn(updates, state, params=None):
        check(params, "update")
        u_fast, inner = tx.update(updates["fast"], state.inner, params["fast"])
        count = state.count + 1
        new_fast = optax.apply_updates(params["fast"], u_fast)
        new_slow = ilora_slow_update(
            params["slow"], new_fast, decay, step=count if warmup else None
        )
        u_slow = jax.tree.map(
            lambda n, s: (n.astype(jnp.promote_types(n.dtype, jnp.float32)) - s).astype(
                s.dtype
            ),
            new_slow,
            params["slow"],
        )
        return {"fast": u_fast, "slow": u_slow}, ILoRAState(inner, count)

    return optax.GradientTransformation(init_fn, update_fn)
