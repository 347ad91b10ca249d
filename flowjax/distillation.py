"""Learning without Forgetting (Li & Hoiem, 2016): distil the frozen pre-trained model.

LwF adds to the fine-tuning loss a knowledge-distillation term that keeps the
student's output distribution on the *new* data close to the frozen teacher's
(the pre-trained model), so no old data is needed:

.. math::
    L(\\theta) = \\mathrm{reduce}_i\\, w_i\\, \\ell_i(\\theta)
      + \\lambda\\, \\mathrm{reduce}_i\\, T^2\\,
        \\mathrm{KL}\\big(\\mathrm{softmax}(z^{\\text{teacher}}_i/T)\\,\\|\\,
                         \\mathrm{softmax}(z_i(\\theta)/T)\\big)

with :math:`w_i` optional FLOW weights, :math:`\\lambda` the ``strength`` and
:math:`T` the distillation temperature. The :math:`T^2` factor (Hinton et al.,
2015) keeps the size of the distillation gradient roughly independent of
:math:`T`, so ``strength`` need not be retuned when ``temperature`` changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import _checks, objectives
from flowjax._types import Array, ArrayLike, Params, Reduction
from flowjax.objectives import _batch_weights, _check_reduction, weighted_loss

__all__ = ["lwf_loss", "lwf_objective"]


def lwf_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike = 2.0,
    where: ArrayLike | None = None,
) -> Array:
    """Per-example LwF distillation loss: ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``.

    .. math::
        d_i = T^2 \\sum_c p_{ic}\\,(\\log p_{ic} - \\log q_{ic}), \\quad
        p_i = \\mathrm{softmax}(z^{\\text{teacher}}_i / T), \\;
        q_i = \\mathrm{softmax}(z^{\\text{student}}_i / T)

    Both log-probabilities come from ``log_softmax``, so the value is exactly 0
    when the two logits are equal and stays finite for very large logits.
    Classes the teacher gives probability exactly 0 contribute 0. The teacher
    is wrapped in ``stop_gradient``: gradients flow only into the student. The
    :math:`T^2` factor is Hinton et al.'s (2015) scaling, which keeps gradient
    magnitudes comparable across temperatures. The computation runs in at
    least float32 and the result has the logits' dtype.

    Args:
      student_logits: ``[..., C]`` logits of the model being fine-tuned.
      teacher_logits: ``[..., C]`` logits of the frozen teacher, same shape.
      temperature: the distillation temperature ``T > 0`` (Li & Hoiem use 2).
      where: optional boolean mask of shape ``[...]`` (the logits' shape
        without the class axis); masked rows (padding, prompt tokens) give
        exactly 0 and NaN or inf in them cannot leak into values or gradients.

    Returns:
      The per-row losses, shape ``[...]``: reduce them yourself (e.g. with
      :func:`flowjax.weighted_loss`).

    Raises:
      ValueError: logits of different shapes or without a class axis, a
        ``where`` of the wrong shape, or a concrete temperature that is not a
        finite number > 0 (under ``jax.jit`` a bad temperature gives NaN).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> teacher = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
      >>> flowjax.lwf_loss(teacher, teacher).tolist()
      [0.0, 0.0]
      >>> student = jnp.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
      >>> flowjax.lwf_loss(student, teacher, temperature=1.0).round(4).tolist()
      [0.5743, 0.0]
    """
    student = jnp.asarray(student_logits)
    teacher = jnp.asarray(teacher_logits)
    if student.ndim == 0 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape [..., C]; got "
            f"{student.shape} and {teacher.shape}."
        )
    _check_positive_temperature(temperature)
    out_dtype = jnp.result_type(student, teacher)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = jnp.float32
    dtype = jnp.promote_types(out_dtype, jnp.float32)
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    teacher = jax.lax.stop_gradient(teacher)
    where, (student, teacher) = _checks.zero_masked_rows(where, student, teacher)
    t = jnp.asarray(temperature, dtype)
    t_ok = jnp.isfinite(t) & (t > 0)
    t = jnp.where(t_ok, t, jnp.nan)
    log_q = jax.nn.log_softmax(student / t, axis=-1)
    log_p = jax.nn.log_softmax(teacher / t, axis=-1)
    p = jnp.exp(log_p)
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0), axis=-1) * t**2
    if where is not None:
        kl = jnp.where(where, kl, 0)
    return kl.astype(out_dtype)


def lwf_objective(
    apply_fn: Callable[[Params, Any], Any],
    task_loss: Callable[[Any, Any], ArrayLike],
    *,
    strength: float | ArrayLike,
    temperature: float | ArrayLike = 2.0,
    teacher_fn: Callable[[Params, Any], ArrayLike] | None = None,
    distill_outputs: Callable[[Any], ArrayLike] | None = None,
    reduction: Reduction = "mean",
    weight_key: str | None = "weight",
    valid_key: str | None = None,
    distill_mask_key: str | None = None,
    weight_distillation: bool = False,
) -> Callable[[Params, Params, Mapping[str, Any]], tuple[Array, dict[str, Array]]]:
    """An LwF training objective ``objective(params, teacher_params, batch) -> (loss, metrics)``.

    .. math::
        L = \\mathrm{reduce}_i\\, w_i\\, \\ell_i
          + \\lambda\\, \\mathrm{reduce}_i\\, v_i\\, d_i, \\quad
        \\ell_i = \\mathrm{task\\_loss}(f_\\theta(x_i), x_i), \\;
        d_i = \\mathrm{lwf\\_loss}(f_\\theta(x_i), g_{\\theta_0}(x_i))

    The frozen teacher's parameters :math:`\\theta_0` are an *argument* of the
    objective, never a closed-over constant, so one compiled step serves any
    teacher and the teacher is not baked into the program (split an NNX model
    with ``nnx.split`` and pass its state). Per-example functions are vmapped
    over the batch (every field except ``"id"``, the weight, valid and
    distillation-mask fields). Use it with
    ``jax.value_and_grad(objective, has_aux=True)(params, teacher_params, batch)``;
    the gradient never reaches ``teacher_params``.

    FLOW weights (``batch[weight_key]``, attached with
    :func:`flowjax.attach_weights`) multiply the task term, reduced by the one
    reduction :func:`flowjax.weighted_objective` uses (the same function, so
    the task term and the metrics ``loss_unweighted`` / ``weight_mean`` are
    the same numbers). By default they do **not**
    multiply the distillation term (:math:`v_i = 1`): distillation preserves
    the pre-trained function, and an example the pre-trained model finds hard
    is as informative about that function as an easy one. Set
    ``weight_distillation=True`` for :math:`v_i = w_i`. The distillation term
    uses the same ``reduction`` (with unit weights, ``"normalized"`` is the
    mean). With a concrete ``strength=0`` the teacher is not run at all: the
    value and gradient are bitwise those of :func:`flowjax.weighted_objective`
    and the metrics have no ``distill_loss`` (a traced strength of 0 still
    runs the teacher and may differ from it by rounding).

    Args:
      apply_fn: ``apply_fn(params, example) -> outputs`` for ONE example.
      task_loss: ``task_loss(outputs, example) -> scalar``: the fine-tuning loss.
      strength: :math:`\\lambda \\ge 0`, the weight of the distillation term.
      temperature: the distillation temperature ``T`` (see :func:`lwf_loss`).
      teacher_fn: ``teacher_fn(teacher_params, example) -> logits``; defaults
        to ``apply_fn`` (then passed through ``distill_outputs``). Give it when
        the teacher's structure differs (e.g. only the old head).
      distill_outputs: picks the logits to distil from the student's outputs
        (e.g. the old-task head when ``apply_fn`` returns both heads);
        identity by default. Per-example logits may be ``[C]`` or ``[T, C]``.
      reduction: ``"mean"``, ``"sum"`` or ``"normalized"`` (see
        :func:`flowjax.weighted_loss`).
      weight_key: the batch field with per-example weights, or ``None`` for
        unit weights (plain fine-tuning plus LwF).
      valid_key: optional boolean batch field marking real (non-padding) rows.
      distill_mask_key: optional boolean batch field ``[B, T]`` for token-level
        logits ``[T, C]``: the per-example distillation loss is the mean over
        the marked tokens (0 for a row with none); NaN or inf logits at
        unmarked tokens reach neither the value nor the gradient. Without it,
        the mean over all tokens.
      weight_distillation: multiply the distillation term by the weights too.

    Returns:
      ``objective(params, teacher_params, batch) -> (loss, metrics)`` with
      metrics ``task_loss`` (the weighted task term), ``distill_loss`` (the
      reduced distillation term, before ``strength``), ``loss_unweighted``
      (mean task loss over counted rows), ``weight_mean`` (if weighted) and
      ``param_distance`` = ‖θ − θ₀‖₂ when ``params`` and ``teacher_params``
      have the same structure and shapes.

    Raises:
      ValueError: an unknown ``reduction``, a concrete negative or non-finite
        ``strength`` or bad temperature; when called, a batch without the weight
        field, a ``task_loss`` that does not give one scalar per example, or a
        ``distill_mask_key`` field whose per-example shape is not the logits'
        shape without the class axis.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, flowjax, optax
      >>> apply_fn = lambda p, ex: ex["x"] @ p  # a linear classifier
      >>> ce = lambda logits, ex: optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])
      >>> objective = flowjax.lwf_objective(apply_fn, ce, strength=1.0)
      >>> teacher = jnp.eye(3)
      >>> batch = {"id": np.arange(2), "x": jnp.eye(3)[:2], "y": jnp.array([2, 2]),
      ...          "weight": jnp.array([1.0, 0.5])}
      >>> step = jax.jit(jax.value_and_grad(objective, has_aux=True))
      >>> (loss, metrics), grads = step(teacher, teacher, batch)  # params, teacher_params, batch
      >>> float(metrics["distill_loss"]), round(float(loss), 4)  # student == teacher: (1 + 0.5) * 1.5514 / 2
      (0.0, 1.1636)
    """
    _check_reduction(reduction)
    if _checks.is_concrete(strength):
        s = np.asarray(strength)
        if s.ndim != 0 or not np.isfinite(s) or s < 0:
            raise ValueError(
                f"strength must be a finite number >= 0; got {strength!r}."
            )
    _check_positive_temperature(temperature)
    pick = distill_outputs if distill_outputs is not None else (lambda out: out)
    teacher = (
        teacher_fn if teacher_fn is not None else (lambda p, ex: pick(apply_fn(p, ex)))
    )
    skip = {"id"} | {k for k in (weight_key, valid_key, distill_mask_key) if k}

    skip_teacher = _checks.is_concrete(strength) and float(np.asarray(strength)) == 0.0

    def per_example(params, teacher_params, example, token_mask):
        outputs = apply_fn(params, example)
        loss = task_loss(outputs, example)
        if skip_teacher:
            return loss, None
        student_logits = pick(outputs)
        teacher_logits = teacher(teacher_params, example)
        if token_mask is None:
            d = lwf_loss(student_logits, teacher_logits, temperature=temperature)
            return loss, jnp.mean(d)
        m = jnp.asarray(token_mask, bool)
        token_shape = jnp.shape(student_logits)[:-1]
        if m.shape != token_shape:
            raise ValueError(
                f"batch[{distill_mask_key!r}] has per-example shape {m.shape}; it must be "
                f"the per-example distillation logits' shape without the class axis, "
                f"{token_shape} (a [B, T] mask needs [T, C] logits per example)."
            )
        # where= inside lwf_loss: NaN/inf logits at masked tokens give exactly 0
        # in both the value and the gradient (masking afterwards would not).
        d = lwf_loss(student_logits, teacher_logits, temperature=temperature, where=m)
        return loss, jnp.sum(d) / jnp.maximum(jnp.sum(m), 1)

    def objective(params: Params, teacher_params: Params, batch: Mapping[str, Any]):
        weights = (
            None
            if weight_key is None
            else _batch_weights(
                batch,
                weight_key,
                ", or build the objective with weight_key=None for unit weights",
            )
        )
        fields = {k: v for k, v in batch.items() if k not in skip}
        token_mask = None if distill_mask_key is None else batch[distill_mask_key]
        losses, distill = jax.vmap(
            per_example, in_axes=(None, None, 0, None if token_mask is None else 0)
        )(params, teacher_params, fields, token_mask)
        if losses.ndim != 1:
            raise ValueError(
                f"task_loss must return a scalar per example; got shape {losses.shape[1:]}."
            )
        if weights is None:
            weights = jnp.ones(losses.shape, losses.dtype)
        where = None if valid_key is None else batch[valid_key]
        task, metrics = objectives._reduce(
            losses, weights, where, reduction, weighted=weight_key is not None
        )
        metrics = {"task_loss": task, **metrics}
        distance = _param_distance(params, teacher_params)
        if distance is not None:
            metrics["param_distance"] = distance
        if skip_teacher:
            return task, metrics
        distill_w = (
            weights if weight_distillation else jnp.ones(distill.shape, distill.dtype)
        )
        distill_term = weighted_loss(
            distill,
            distill_w,
            where=where,
            reduction="mean"
            if reduction == "normalized" and not weight_distillation
            else reduction,
        )
        metrics["distill_loss"] = distill_term
        return task + jnp.asarray(strength, task.dtype) * distill_term, metrics

    return objective


def _param_distance(params: Params, reference: Params) -> Array | None:
    """‖θ − θ₀‖₂ over all float leaves, or None if the two trees differ in structure or shapes."""
    leaves, treedef = jax.tree.flatten(params)
    ref_leaves, ref_treedef = jax.tree.flatten(reference)
    if treedef != ref_treedef or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(leaves, ref_leaves, strict=True)
    ):
        return None
    total = jnp.zeros((), jnp.float32)
    for a, b in zip(leaves, ref_leaves, strict=True):
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            diff = jax.lax.stop_gradient(
                jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
            )
            total = total + jnp.sum(diff * diff)
    return jnp.sqrt(total)


def _check_positive_temperature(temperature) -> None:
    if isinstance(temperature, str):
        raise ValueError(
            f"temperature must be a finite number > 0; got {temperature!r}."
        )
    _checks.check_temperature(temperature)
