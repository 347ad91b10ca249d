"""Training pieces shared by the experiments: PyTorch-style SGD and per-epoch schedules as optax.

The official FLOW vision code trains with ``torch.optim.SGD`` (weight decay added to the
gradient, then momentum) and ``CosineAnnealingLR`` stepped once per epoch; these build
the same thing from optax, with the learning rate held in the optimiser state so that
every learning rate of a grid shares one compiled step (``flowjax.make_train_step``
shares programs between steps that compute the same thing).
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import optax

import flowjax

Schedule = Literal["cosine", "constant"]


def torch_sgd(
    trainable,
    momentum: float,
    weight_decay: float,
    extra: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """PyTorch SGD direction (decay added to the gradient, then momentum), frozen where not trainable.

    The caller multiplies the result by ``-lr``. ``flowjax.train_only`` gives
    frozen parameters a zero update and no optimizer state. ``extra`` (an
    L2-SP or EWC pull toward θ₀) comes FIRST in the chain, on the raw
    gradients of every parameter, so the optimizer sees the regularised
    gradient (frozen parameters still get a zero update).
    """
    body = flowjax.train_only(
        optax.chain(
            optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum)
        ),
        trainable,
    )
    return body if extra is None else optax.chain(extra, body)


def lr_factor(epoch, epochs: int, schedule: Schedule):
    """Per-epoch learning-rate factor: ``(1 + cos(π e / T)) / 2`` (cosine) or 1 (constant).

    ``epoch`` may be a traced integer (the step count // steps per epoch).
    """
    if schedule == "cosine":
        return (1.0 + jnp.cos(jnp.pi * epoch / epochs)) / 2.0
    if schedule == "constant":
        return jnp.ones_like(epoch, jnp.float32)
    raise ValueError(f"schedule must be 'cosine' or 'constant'; got {schedule!r}.")


def stage_tx(
    direction: optax.GradientTransformation,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    schedule: Schedule,
) -> optax.GradientTransformation:
    """``direction`` scaled by ``-lr`` times the per-epoch factor (:func:`lr_factor`).

    The learning rate is held in the optimiser state
    (``optax.inject_hyperparams``), not in the transformation's code, so
    every learning rate of a grid shares one compiled step
    (``flowjax.make_train_step`` shares programs between steps that compute
    the same thing).
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant'; got {schedule!r}.")

    def factor(count):
        return lr_factor(count // steps_per_epoch, epochs, schedule)

    return optax.chain(
        direction,
        optax.scale_by_schedule(factor),
        optax.inject_hyperparams(optax.scale)(step_size=-lr),
    )
