"""torch state dicts (timm / torchvision ``.safetensors``) to and from :class:`ResNet`.

An NNX path maps to a torch name by joining it with dots and renaming the
leaf; arrays change layout where the two frameworks differ:

=============================  ==============================  =================
NNX (path, leaf)               torch state-dict name            layout
=============================  ==============================  =================
``conv1 / kernel``             ``conv1.weight``                 HWIO ← OIHW
``layer1 / 0 / bn1 / scale``   ``layer1.0.bn1.weight``          same
``… / bias``                   ``….bias``                       same
``… / mean``, ``… / var``      ``….running_mean``, ``…_var``    same
``layer2 / 0 / downsample /``  ``layer2.0.downsample.0.weight`` HWIO ← OIHW
``0 / kernel``
``fc / kernel``                ``fc.weight``                    (in, out) ← (out, in)
=============================  ==============================  =================

``*.num_batches_tracked`` is dropped (torch's momentum is fixed, so it is
unused). timm and torchvision ResNets share these names: 102 arrays for
ResNet-18 and 267 for ResNet-50 (122 and 320 with ``num_batches_tracked``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowjax.models.resnets import ResNet, _arch, _head

__all__ = ["load_resnet", "torch_state_dict"]

_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_HEAD = ("fc.weight", "fc.bias")


def _torch_name(path) -> str:
    *module, leaf = path
    return ".".join([*(str(k) for k in module), _TORCH_LEAF[leaf]])


def _to_torch(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # conv: HWIO -> OIHW
        return a.transpose(3, 2, 0, 1)
    if a.ndim == 2:  # linear: (in, out) -> (out, in)
        return a.T
    return a


def _from_torch(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # conv: OIHW -> HWIO
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 2:
        return a.T
    return a


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _flat(model_or_state):
    state = (
        nnx.state(model_or_state, nnx.Param, nnx.BatchStat)
        if isinstance(model_or_state, nnx.Module)
        else model_or_state
    )
    if isinstance(state, tuple):  # nnx.state with two filters gives two states
        state = nnx.merge_state(*state)
    return list(nnx.to_flat_state(state))


def torch_state_dict(model: ResNet) -> dict[str, np.ndarray]:
    """The model's parameters and BatchNorm statistics under torch's names and layouts.

    The inverse of :func:`load_resnet`: ``load_resnet(arch,
    torch_state_dict(model))`` rebuilds ``model`` exactly, and
    ``torchvision.models.resnet50().load_state_dict(...)`` (after
    ``torch.from_numpy``) takes it strictly (torch fills in the missing
    ``num_batches_tracked``). Save it for timm / torchvision with
    ``safetensors.numpy.save_file(torch_state_dict(model), path)``.

    .. math:: W^{\\text{torch}}_{oihw} = K_{hwio}, \\qquad
        W^{\\text{torch}}_{ji} = K_{ij} \\ (\\texttt{fc})

    Args:
      model: a :class:`ResNet` (or its ``nnx.state``); an abstract one
        (``nnx.eval_shape(lambda: resnet(...))``) gives the names and shapes
        without allocating.

    Returns:
      A dict torch name -> float32 numpy array, e.g. ``"conv1.weight"`` of
      shape ``(64, 3, 7, 7)``, ``"bn1.running_var"``, ``"fc.bias"``
      (``jax.ShapeDtypeStruct`` in torch's shape for an abstract model).

    Raises:
      KeyError: a variable with a leaf name this layout does not know (not a
        ResNet of this module).

    Example:
      >>> from flax import nnx
      >>> from flowjax.models import resnet, torch_state_dict
      >>> sd = torch_state_dict(resnet("resnet18", rngs=nnx.Rngs(0), width=4))
      >>> len(sd), sd["conv1.weight"].shape, sd["fc.weight"].shape
      (102, (4, 3, 7, 7), (1000, 32))
      >>> abstract = nnx.eval_shape(lambda: resnet("resnet50", rngs=nnx.Rngs(0)))
      >>> torch_state_dict(abstract)["layer1.0.conv3.weight"].shape
      (256, 64, 1, 1)
    """
    out = {}
    for path, var in _flat(model):
        v = var.get_value()
        out[_torch_name(path)] = (
            jax.ShapeDtypeStruct(_torch_shape(v.shape), v.dtype)
            if isinstance(v, jax.ShapeDtypeStruct)
            # contiguous, as torch's tensors are (safetensors writes the raw buffer)
            else np.ascontiguousarray(
                _to_torch(np.asarray(jax.device_get(v), np.float32))
            )
        )
    return out


def _read(weights) -> dict[str, Any]:
    if isinstance(weights, (str, os.PathLike)):
        try:
            import safetensors.numpy
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "load_resnet reads .safetensors with the safetensors package: "
                "pip install 'flowjax-ft[models]' (or safetensors)."
            ) from e
        if not os.path.isfile(weights):
            raise ValueError(f"no weights file at {os.fspath(weights)!r}.")
        return safetensors.numpy.load_file(os.fspath(weights))
    if isinstance(weights, Mapping):
        return dict(weights)
    raise TypeError(
        "weights must be a path to a .safetensors file or a mapping from torch "
        f"state-dict names to arrays, got {type(weights).__name__}."
    )


def _list(names, n: int = 10) -> str:
    names = sorted(names)
    more = f" … and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_resnet(
    arch: str,
    weights: str | os.PathLike | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
) -> ResNet:
    """A :class:`ResNet` with timm / torchvision weights, no torch needed.

    Every array of the checkpoint is matched by name (:func:`torch_state_dict`
    gives the names) and converted: convolutions OIHW → HWIO, ``fc.weight``
    (out, in) → (in, out), BatchNorm ``weight``, ``bias``, ``running_mean``,
    ``running_var`` → ``scale``, ``bias``, ``mean``, ``var``;
    ``num_batches_tracked`` is dropped. The stem's width is read from
    ``conv1.weight`` (64 for published models, less for small test models).

    The FLOW paper's weights are timm's ``resnet18.tv_in1k`` (torchvision's
    original ResNet-18 weights, ``timm/resnet18.tv_in1k/model.safetensors``)
    and ``resnet50.ram_in1k`` (``resnet50_ram-a26f946b``; plain ``resnet50``
    in timm 1.x names other weights). Download them yourself, then e.g.
    ``load_resnet("resnet50", "model.safetensors", num_classes=102, rngs=...)``
    for Flowers102: backbone pre-trained, a fresh 102-class head.

    Args:
      arch: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``.
      weights: a path to a ``.safetensors`` file (read with
        ``safetensors.numpy``), or a mapping from torch state-dict names to
        arrays (numpy arrays, or anything ``np.asarray`` takes).
      num_classes: classes of the head. ``None``: the checkpoint's. Another
        number (or a checkpoint without ``fc``): the backbone is loaded and
        a fresh head initialised from ``rngs``; the checkpoint's ``fc`` is
        ignored.
      rngs: for a fresh head (required only then).
      dtype: the compute dtype (``jnp.bfloat16`` on accelerators); the
        parameters are float32 whatever the checkpoint's dtype.

    Returns:
      The :class:`ResNet`, in train mode like a new NNX module: call
      ``model.eval()`` for inference and the pre-pass.

    Raises:
      ValueError: an unknown ``arch``; a missing file; missing or unexpected
        keys, shapes that differ from ``arch``'s, non-float or non-finite
        arrays (each message names the keys); no head in the checkpoint and
        no ``num_classes``; a fresh head without ``rngs``.
      TypeError: ``weights`` is neither a path nor a mapping.
      ImportError: a path is given and ``safetensors`` is not installed.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from flowjax.models import load_resnet, resnet, torch_state_dict
      >>> model = resnet("resnet18", num_classes=5, rngs=nnx.Rngs(0), width=4)
      >>> sd = torch_state_dict(model)  # torch names, as in a .safetensors file
      >>> same = load_resnet("resnet18", sd)
      >>> all(np.array_equal(a, b) for a, b in zip(sd.values(), torch_state_dict(same).values()))
      True
      >>> load_resnet("resnet18", sd, num_classes=3, rngs=nnx.Rngs(1)).fc.kernel.shape
      (32, 3)
    """
    _arch(arch)
    raw = {
        k: v
        for k, v in _read(weights).items()
        if not k.endswith(".num_batches_tracked")
    }
    if "conv1.weight" not in raw:
        raise ValueError(
            f"the checkpoint has no conv1.weight (the stem); keys start with: {_list(raw, 5)}."
        )
    width = int(np.shape(raw["conv1.weight"])[0])
    has_head = all(k in raw for k in _HEAD)
    ckpt_classes = int(np.shape(raw["fc.weight"])[0]) if has_head else None
    if num_classes is None:
        if ckpt_classes is None:
            raise ValueError(
                "the checkpoint has no head (fc.weight, fc.bias): pass num_classes "
                "(and rngs) for a fresh one."
            )
        num_classes = ckpt_classes
    fresh = num_classes != ckpt_classes
    if fresh:
        if rngs is None:
            raise ValueError(
                f"num_classes={num_classes} differs from the checkpoint's head "
                f"({ckpt_classes}): pass rngs to initialise a fresh head."
            )
        for k in _HEAD:
            raw.pop(k, None)

    abstract = nnx.eval_shape(
        lambda: ResNet(
            arch, num_classes=num_classes, rngs=nnx.Rngs(0), dtype=dtype, width=width
        )
    )
    graphdef, state = nnx.split(abstract)
    expected = {
        _torch_name(path): (path, var) for path, var in nnx.to_flat_state(state)
    }
    wanted = {k for k in expected if not (fresh and k in _HEAD)}
    missing, unexpected = wanted - raw.keys(), raw.keys() - wanted
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_list(unexpected)}")
        raise ValueError(
            f"the checkpoint does not fit {arch} (width {width}): "
            + "; ".join(parts)
            + "."
        )

    arrays, bad_shape, bad_dtype, bad_value = {}, [], [], []
    for name in sorted(wanted):
        path, var = expected[name]
        a = np.asarray(raw[name])
        want = _torch_shape(var.shape)
        if a.shape != want:
            bad_shape.append(f"{name}: {a.shape} (expected {want})")
        elif not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
            bad_dtype.append(f"{name}: {a.dtype}")
        else:
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                bad_value.append(name)
            arrays[path] = _from_torch(a)
    if bad_shape:
        raise ValueError(
            f"shapes do not fit {arch} (width {width}): " + "; ".join(bad_shape) + "."
        )
    if bad_dtype:
        raise ValueError(
            "arrays that are not floating point: " + "; ".join(bad_dtype) + "."
        )
    if bad_value:
        raise ValueError(f"arrays with NaN or inf: {_list(bad_value)}.")

    if fresh:
        fc = _head(abstract.num_features, num_classes, rngs=rngs, dtype=dtype)
        arrays[("fc", "kernel")] = fc.kernel[...]
        arrays[("fc", "bias")] = fc.bias[...]
    flat = [
        (path, var.replace(value=jnp.asarray(arrays[path])))
        for path, var in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
