"""ResNet-18/34/50/101 in Flax NNX with torchvision's layout and numerics.

The modules mirror ``torchvision.models.resnet`` (which timm's ``resnet18``
/ ``resnet50`` share, key for key), so a torch state dict maps onto them by
name alone (:mod:`flowjax.models.convert`):

* stem: 7×7/2 convolution padded by 3 on every side, BatchNorm, ReLU, 3×3/2
  max-pool padded by 1 with −∞ (Flax's ``'SAME'`` pads asymmetrically for
  even inputs, which moves every torch weight by a pixel);
* ``layer1`` … ``layer4``: :class:`BasicBlock` (ResNet-18/34) or the v1.5
  :class:`Bottleneck` (ResNet-50/101: the stride on the 3×3 convolution, not on
  the first 1×1), a 1×1 convolution + BatchNorm as ``downsample`` where the
  shape changes;
* global average pool, then the head ``fc``.

Inputs are NHWC images (``(batch, height, width, 3)``). Parameters are
float32; ``dtype`` is the compute dtype (``jnp.bfloat16`` on accelerators).
On GPUs, XLA may run float32 convolutions in TF32; for float32 parity with
torch there, set ``jax.config.update("jax_default_matmul_precision", "highest")``.
BatchNorm is :class:`BatchNorm`: torch's ε = 1e-5, momentum 0.1 (Flax's 0.9)
and torch's *unbiased* running variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "ARCHS",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "ResNet",
    "resnet",
    "task_parts",
]

# arch -> (block, blocks per stage): torchvision's table.
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated as in torch.
_CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: weight and bias uniform in ±1/sqrt(fan_in).
_LINEAR_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _linear_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` with torch's ``BatchNorm2d`` numerics.

    In train mode the batch is normalised with its biased variance and the
    running statistics move as in torch, with the *unbiased* variance
    (``nnx.BatchNorm`` uses the biased one):

    .. math::
        \\mu_B = \\tfrac1n \\textstyle\\sum x, \\quad
        \\sigma_B^2 = \\tfrac1n \\textstyle\\sum (x - \\mu_B)^2, \\quad
        \\hat\\mu \\leftarrow m\\hat\\mu + (1-m)\\mu_B, \\quad
        \\hat\\sigma^2 \\leftarrow m\\hat\\sigma^2 + (1-m)\\tfrac{n}{n-1}\\sigma_B^2

    with ``n`` the values per channel (batch × height × width) and Flax's
    ``m = 0.9`` (torch's momentum 0.1). In eval mode (``model.eval()``) it uses
    the running statistics: ``y = (x - μ̂) / sqrt(σ̂² + ε) · scale + bias`` with
    ``ε = 1e-5``. Statistics and the normalisation are computed in float32,
    the output cast to ``dtype``. A subclass, so ``isinstance(m,
    nnx.BatchNorm)``, ``model.eval()``, ``model.train()`` and ``nnx.view`` work
    as for ``nnx.BatchNorm``.

    Args:
      num_features: channels (the last axis).
      momentum: Flax's momentum, ``1 - torch_momentum``.
      epsilon: added to the variance.
      dtype: the output (compute) dtype; ``None`` keeps the input's.
      use_running_average: start in eval mode (``True``) or train mode.
      axis_name: a named axis (``pmap``, ``shard_map``, ``vmap``) over which
        the batch statistics are combined; not needed under ``jax.jit`` with
        sharded arrays (XLA reduces over the global batch).
      rngs: unused by the initialisers (scale 1, bias 0), required by NNX.

    Raises:
      ValueError: in train mode, a batch with one value per channel (torch
        raises the same; the unbiased variance is undefined).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flowjax.models import BatchNorm
      >>> bn = BatchNorm(2, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, 0.0], [3.0, 0.0]])
      >>> y = bn(x)  # train mode: batch statistics
      >>> bn.mean[...], bn.var[...]  # 0.9·(0, 1) + 0.1·(mean, unbiased var)
      (Array([0.2, 0. ], dtype=float32), Array([1.1, 0.9], dtype=float32))
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Any = None,
        use_running_average: bool = False,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_features,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            use_running_average=use_running_average,
            axis_name=axis_name,
            use_fast_variance=False,
            rngs=rngs,
        )

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if mask is not None:
            raise ValueError("flowjax.models.BatchNorm does not take a mask.")
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "BatchNorm has no use_running_average: call model.eval() or model.train()."
            )
        axes = tuple(range(x.ndim - 1))
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = math.prod(x.shape[:-1])
            if n < 2 and self.axis_name is None:
                raise ValueError(
                    f"BatchNorm in train mode needs more than one value per channel, "
                    f"got input shape {x.shape}; call model.eval() for single examples."
                )
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - _expand(mean, x.ndim)), axis=axes)
            if self.axis_name is not None:  # shard_map / pmap: the global batch
                mean2 = jax.lax.pmean(var + jnp.square(mean), self.axis_name)
                mean = jax.lax.pmean(mean, self.axis_name)
                var = jnp.maximum(mean2 - jnp.square(mean), 0.0)  # rounding
                n = n * jax.lax.psum(1, self.axis_name)
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
            self.var[...] = jax.lax.stop_gradient(
                m * self.var[...] + (1 - m) * var * (n / (n - 1))
            )
        a = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        y = (x32 - _expand(mean, x.ndim)) * _expand(a, x.ndim) + _expand(
            self.bias[...], x.ndim
        )
        return y.astype(self.dtype or x.dtype)


def _expand(v, ndim: int):
    """A per-channel vector shaped to broadcast against an ``ndim``-rank NHWC array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _conv(cin, cout, k, stride, pad, dtype, rngs):
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=_CONV_INIT,
        rngs=rngs,
    )


def _downsample(cin, cout, stride, dtype, rngs):
    """torchvision's ``downsample`` where the shape changes (else ``None``):
    ``Sequential(conv1x1, BatchNorm)``, as ``[0]``, ``[1]``."""
    if stride == 1 and cin == cout:
        return None
    return nnx.List(
        [
            _conv(cin, cout, 1, stride, 0, dtype, rngs),
            BatchNorm(cout, dtype=dtype, rngs=rngs),
        ]
    )


def _shortcut(downsample, x):
    if downsample is None:
        return x
    conv, bn = downsample
    return bn(conv(x))


class BasicBlock(nnx.Module):
    """Two 3×3 convolutions with a residual: ResNet-18/34's block.

    .. math:: y = \\mathrm{relu}(\\mathrm{bn_2}(\\mathrm{conv_2}(\\mathrm{relu}(
        \\mathrm{bn_1}(\\mathrm{conv_1}(x))))) + \\mathrm{shortcut}(x))

    Args:
      cin: input channels.
      planes: output channels (``expansion = 1``).
      stride: of ``conv1`` and of the shortcut.
      dtype: the compute dtype.
      rngs: for the initialisers.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, planes, 3, stride, 1, dtype, rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(planes, planes, 3, 1, 1, dtype, rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype, rngs=rngs)
        self.downsample = _downsample(cin, planes, stride, dtype, rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
    """1×1 → 3×3 (with the stride: v1.5) → 1×1 ×4 with a residual: ResNet-50/101's block.

    .. math:: y = \\mathrm{relu}(\\mathrm{bn_3}(\\mathrm{conv_3}(h)) +
        \\mathrm{shortcut}(x)), \\quad h = \\mathrm{relu}(\\mathrm{bn_2}(
        \\mathrm{conv_2^{stride}}(\\mathrm{relu}(\\mathrm{bn_1}(\\mathrm{conv_1}(x))))))

    Args:
      cin: input channels.
      planes: the inner width; the output has ``4 · planes`` channels.
      stride: of ``conv2`` (the 3×3) and of the shortcut.
      dtype: the compute dtype.
      rngs: for the initialisers.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1, 1, 0, dtype, rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(planes, planes, 3, stride, 1, dtype, rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype, rngs=rngs)
        self.conv3 = _conv(planes, cout, 1, 1, 0, dtype, rngs)
        self.bn3 = BatchNorm(cout, dtype=dtype, rngs=rngs)
        self.downsample = _downsample(cin, cout, stride, dtype, rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + _shortcut(self.downsample, x))


def _max_pool(x):
    """3×3/2 max-pool padded by 1 with −∞ (torch's ``MaxPool2d(3, 2, 1)``)."""
    return jax.lax.reduce_window(
        x,
        -jnp.inf,  # a Python scalar: the max monoid JAX knows how to differentiate
        jax.lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )


class ResNet(nnx.Module):
    """A torchvision-layout ResNet on NHWC images.

    Attributes mirror torchvision's names: ``conv1``, ``bn1``, ``layer1`` …
    ``layer4`` (``nnx.List`` of blocks), ``fc`` (the head, an ``nnx.Linear``
    from ``num_features`` to ``num_classes``). The pre-trained *task parts* the
    FLOW protocol swaps back for ImageNet retention are ``fc`` and every
    :class:`BatchNorm` (:func:`task_parts`).

    Args:
      arch: one of :data:`ARCHS`: ``"resnet18"``, ``"resnet34"``,
        ``"resnet50"``, ``"resnet101"``.
      num_classes: outputs of ``fc``.
      rngs: for the initialisers (torchvision's: Kaiming-normal fan-out
        convolutions, BatchNorm 1/0, torch's default ``Linear``).
      dtype: the compute dtype; parameters stay float32.
      width: channels of the stem and of ``layer1`` (64 in every published
        ResNet; smaller for tests and tiny configs, doubled at each stage).

    Raises:
      ValueError: an unknown ``arch``, or ``num_classes`` / ``width`` < 1.
    """

    def __init__(
        self,
        arch: str,
        *,
        num_classes: int = 1000,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        width: int = 64,
    ):
        kind, depths = _arch(arch)
        if num_classes < 1 or width < 1:
            raise ValueError(
                f"num_classes and width must be >= 1, got {num_classes}, {width}."
            )
        block = BasicBlock if kind == "basic" else Bottleneck
        self.arch = arch
        self.conv1 = _conv(3, width, 7, 2, 3, dtype, rngs)
        self.bn1 = BatchNorm(width, dtype=dtype, rngs=rngs)
        cin = width
        for stage, depth in enumerate(depths):
            planes = width * 2**stage
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(cin, planes, stride, dtype=dtype, rngs=rngs))
                cin = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))
        self.num_features = cin
        self.fc = _head(cin, num_classes, rngs=rngs, dtype=dtype)

    def features(self, x: jax.Array) -> jax.Array:
        """The pooled features before ``fc``: ``(batch, num_features)``."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = _max_pool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(batch, num_classes)`` for NHWC images ``(batch, H, W, 3)``."""
        return self.fc(self.features(x))


def _head(num_features: int, num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    """A fresh ``fc`` with torch's default ``Linear`` init: ``W, b ~ U(±1/sqrt(num_features))``."""
    return nnx.Linear(
        num_features,
        num_classes,
        dtype=dtype,
        kernel_init=_LINEAR_INIT,
        bias_init=_linear_bias_init(num_features),
        rngs=rngs,
    )


def _arch(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown ResNet arch {arch!r}; known: {sorted(ARCHS)}.")
    return ARCHS[arch]


def resnet(
    arch: str,
    *,
    num_classes: int = 1000,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    width: int = 64,
) -> ResNet:
    """A randomly initialised torchvision-layout ResNet (train mode).

    Same as ``ResNet(arch, ...)``; :func:`~flowjax.models.load_resnet` loads
    pre-trained weights instead.

    Args:
      arch: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``.
      num_classes: outputs of the head ``fc``.
      rngs: for the initialisers.
      dtype: the compute dtype (``jnp.bfloat16`` for accelerators); the
        parameters are float32.
      width: stem / ``layer1`` channels (64 for the published models).

    Returns:
      A :class:`ResNet` in train mode; call ``model.eval()`` for inference.

    Raises:
      ValueError: an unknown ``arch``; non-positive ``num_classes`` or ``width``.

    Example:
      >>> from flax import nnx
      >>> from flowjax.models import resnet
      >>> model = resnet("resnet18", num_classes=10, rngs=nnx.Rngs(0), width=4)
      >>> model.fc.kernel.shape, model.bn1.momentum, model.bn1.epsilon  # torch's 0.1, 1e-5
      ((32, 10), 0.9, 1e-05)
      >>> big = nnx.eval_shape(lambda: resnet("resnet50", rngs=nnx.Rngs(0)))  # no memory
      >>> big.layer2[0].conv1.strides, big.layer2[0].conv2.strides  # v1.5: on the 3x3
      ((1, 1), (2, 2))
    """
    return ResNet(arch, num_classes=num_classes, rngs=rngs, dtype=dtype, width=width)


def task_parts(model: nnx.Module, head: str = "fc"):
    """An NNX filter for the head and every BatchNorm: what FLOW's protocol swaps back.

    The paper measures retained ImageNet accuracy after replacing "the
    task-specific components of the fine-tuned model with their pre-trained
    counterparts": the head and every BatchNorm's scale, bias and running
    statistics. Pass this filter to :func:`flowjax.swap_task_parts`.

    Args:
      model: the (pre-trained) model, to find its BatchNorm layers.
      head: the attribute path of the head (``"fc"`` for :class:`ResNet`).

    Returns:
      A predicate ``(path, leaf) -> bool``, true under ``head`` or under any
      ``nnx.BatchNorm``.

    Raises:
      ValueError: ``model`` has no attribute ``head`` or no BatchNorm.

    Example:
      >>> import flowjax
      >>> from flax import nnx
      >>> from flowjax.models import resnet, task_parts
      >>> from flowjax.models import load_resnet, torch_state_dict
      >>> pre = resnet("resnet18", rngs=nnx.Rngs(0), num_classes=4, width=4)
      >>> ft = load_resnet("resnet18", torch_state_dict(pre), num_classes=2, rngs=nnx.Rngs(1))
      >>> ft.conv1.kernel[...] += 1.0  # "fine-tuned" body, new 2-class head
      >>> swapped = flowjax.swap_task_parts(nnx.state(ft), nnx.state(pre), task_parts(pre))
      >>> restored = nnx.merge(nnx.graphdef(pre), swapped)  # pre-trained head and BN
      >>> restored.fc.kernel.shape, bool((restored.conv1.kernel[...] == ft.conv1.kernel[...]).all())
      ((32, 4), True)
    """
    head_path = tuple(head.split("."))
    modules = dict(nnx.iter_modules(model))
    key_path = tuple(int(k) if k.isdigit() else k for k in head_path)
    if key_path not in modules:
        raise ValueError(f"model has no head {head!r}.")
    bns = [p for p, m in modules.items() if isinstance(m, nnx.BatchNorm)]
    if not bns:
        raise ValueError("model has no BatchNorm layer.")
    roots: Sequence[tuple] = [key_path, *bns]

    def predicate(path, _leaf) -> bool:
        return any(tuple(path[: len(r)]) == r for r in roots)

    return predicate
