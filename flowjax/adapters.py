"""Bottleneck adapters (Houlsby et al., 2019) as NNX model surgery with their own Variable type.

:func:`add_adapters` wraps chosen layers :math:`h = f(x)` of a model so that

.. math::
    h' = h + \\phi(h W_\\downarrow + b_\\downarrow) W_\\uparrow + b_\\uparrow,
    \\qquad W_\\downarrow \\in \\mathbb{R}^{d\\times m},\\;
    W_\\uparrow \\in \\mathbb{R}^{m\\times d},\\; m \\ll d,

a down-projection to a bottleneck of width :math:`m`, a nonlinearity
:math:`\\phi`, an up-projection and a residual connection (Houlsby et al.,
"Parameter-Efficient Transfer Learning for NLP", ICML 2019, §2.1 and Fig. 2;
they insert the adapter after each attention and feed-forward sublayer of a
Transformer, before its residual add). Houlsby et al. initialise the
projections near zero so the adapter starts near the identity; here, as in
AdapterHub and Hugging Face PEFT, the *up*-projection starts at exactly zero,
so the adapted model computes *exactly* the base model's outputs until it is
trained (``h + 0`` is ``h`` bit for bit).

Every adapter weight is an :class:`AdapterParam`, a subclass of
``nnx.Param``, so the trainable set is one NNX filter::

    model = flowjax.add_adapters(base, 16, rngs=nnx.Rngs(0))
    tx = flowjax.train_only(optax.adam(1e-3), flowjax.AdapterParam)
    # or: graphdef, adapters, rest = nnx.split(model, flowjax.AdapterParam, ...)

:func:`remove_adapters` takes them out again (the base model, unchanged). A
bottleneck adapter is nonlinear, so unlike LoRA it cannot be folded into the
wrapped layer's weights.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flowjax import _select
from flowjax._types import Filter
from flowjax.lora import _check_untied, _replace

__all__ = ["AdaptedLayer", "Adapter", "AdapterParam", "add_adapters", "remove_adapters"]


_LECUN_NORMAL = nnx.initializers.lecun_normal()


class AdapterParam(nnx.Param):
    """The Variable type of every bottleneck-adapter weight (a subclass of ``nnx.Param``).

    Select the adapters with it as an NNX filter:
    ``flowjax.train_only(tx, flowjax.AdapterParam)`` or
    ``nnx.split(model, flowjax.AdapterParam, ...)``.
    """


class Adapter(nnx.Module):
    """A bottleneck adapter :math:`h \\mapsto h + \\phi(h W_\\downarrow + b_\\downarrow) W_\\uparrow + b_\\uparrow`.

    :math:`W_\\downarrow` is drawn with ``down_init`` (default
    ``lecun_normal``), :math:`b_\\downarrow, W_\\uparrow, b_\\uparrow` start at
    zero, so the adapter starts as the identity, exactly. The projections are
    computed in the dtype of :math:`h` promoted with ``param_dtype`` and the
    result is cast back to :math:`h`'s dtype (float32 adapters on a bf16 model
    keep the model's activations bf16).

    Args:
      features: :math:`d`, the size of the last axis of :math:`h`.
      bottleneck: :math:`m \\ge 1`, the width of the bottleneck.
      rngs: random streams; ``rngs.params()`` draws :math:`W_\\downarrow`.
      activation: :math:`\\phi` (default ``nnx.gelu``).
      param_dtype: dtype of the four :class:`AdapterParam` arrays.
      down_init: initialiser of :math:`W_\\downarrow`.

    Raises:
      ValueError: ``features`` or ``bottleneck`` is not a positive integer.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> adapter = flowjax.Adapter(4, 2, rngs=nnx.Rngs(0))
      >>> h = jnp.arange(8.0).reshape(2, 4)
      >>> bool((adapter(h) == h).all())  # W_up = 0: the identity
      True
    """

    def __init__(
        self,
        features: int,
        bottleneck: int,
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = nnx.gelu,
        param_dtype: Any = jnp.float32,
        down_init: Callable = _LECUN_NORMAL,
    ):
        for name, v in (("features", features), ("bottleneck", bottleneck)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        d, m = int(features), int(bottleneck)
        self.activation = activation
        self.down_kernel = AdapterParam(down_init(rngs.params(), (d, m), param_dtype))
        self.down_bias = AdapterParam(jnp.zeros((m,), param_dtype))
        self.up_kernel = AdapterParam(jnp.zeros((m, d), param_dtype))
        self.up_bias = AdapterParam(jnp.zeros((d,), param_dtype))

    def __call__(self, h: jax.Array) -> jax.Array:
        dtype = jnp.promote_types(h.dtype, self.down_kernel.get_value().dtype)
        z = h.astype(dtype) @ self.down_kernel.get_value().astype(dtype)
        z = self.activation(z + _lead(self.down_bias.get_value().astype(dtype), z))
        delta = z @ self.up_kernel.get_value().astype(dtype)
        delta = delta + _lead(self.up_bias.get_value().astype(dtype), delta)
        return h + delta.astype(h.dtype)


def _lead(b: jax.Array, like: jax.Array) -> jax.Array:
    """``b`` with leading unit axes, to add to ``like`` without rank promotion."""
    return b.reshape((1,) * (like.ndim - 1) + b.shape)


class AdaptedLayer(nnx.Module):
    """A layer followed by a bottleneck :class:`Adapter`: ``adapter(layer(*args, **kwargs))``.

    Built by :func:`add_adapters`; ``layer`` is the original module (the same
    Variables), ``adapter`` holds the :class:`AdapterParam` weights.

    Args:
      layer: the wrapped module; its output's last axis has ``adapter``'s
        ``features`` entries.
      adapter: the :class:`Adapter` applied to that output.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> adapted = flowjax.AdaptedLayer(lin, flowjax.Adapter(4, 2, rngs=nnx.Rngs(1)))
      >>> x = jnp.ones((2, 3))
      >>> bool((adapted(x) == lin(x)).all())
      True
    """

    def __init__(self, layer: nnx.Module, adapter: Adapter):
        self.layer = layer
        self.adapter = adapter

    def __call__(self, *args, **kwargs):
        return self.adapter(self.layer(*args, **kwargs))


def _out_features(path, m) -> int:
    d = getattr(m, "out_features", None)
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise TypeError(
            f"the layer at {path} is a {type(m).__name__} without an integer "
            "`out_features`, so the adapter's width is unknown; select layers such as "
            "nnx.Linear or nnx.Conv (or wrap the layer with flowjax.AdaptedLayer "
            "yourself)."
        )
    return int(d)


def add_adapters(
    model: nnx.Module,
    bottleneck: int,
    *,
    rngs: nnx.Rngs,
    select: Filter = None,
    activation: Callable[[jax.Array], jax.Array] = nnx.gelu,
    param_dtype: Any = None,
) -> nnx.Module:
    """Returns a copy of ``model`` with a bottleneck adapter after each selected layer.

    Each selected layer :math:`h = f(x)` with :math:`d` output features
    becomes :class:`AdaptedLayer` computing

    .. math::
        h' = h + \\phi(h W_\\downarrow + b_\\downarrow) W_\\uparrow + b_\\uparrow,
        \\qquad W_\\uparrow = 0,\\; b_\\downarrow = b_\\uparrow = 0 \\text{ at init}

    (Houlsby et al., 2019), so the new model's outputs equal the base
    model's bit for bit until the adapters are trained. The wrapped layer
    keeps its Variables (values and metadata); the adapters' weights are new
    :class:`AdapterParam` variables. Train only them with
    ``flowjax.train_only(tx, flowjax.AdapterParam)`` (or ``nnx.split``): every
    base parameter then stays bitwise unchanged. With FLOW, train on
    :func:`flowjax.weighted_objective` as for any other method.

    Houlsby et al.'s placement, after the attention output projection and
    after the feed-forward down-projection of every block, is
    ``select=nnx.Any(nnx.PathContains("o_proj"), nnx.PathContains("down_proj"))``
    on a model with those layer names.

    ``model`` is not modified: the result is an ``nnx.clone`` sharing its
    (immutable) array buffers.

    Args:
      model: an NNX module (or a single layer).
      bottleneck: the adapter width :math:`m \\ge 1`.
      rngs: random streams; ``rngs.params()`` draws each :math:`W_\\downarrow`.
      select: which layers get an adapter: an NNX filter evaluated on
        ``(path, module)`` (``nnx.PathContains("down_proj")``, ``nnx.Any``,
        ``nnx.All``, ``nnx.Not``, a predicate). ``None`` (default): every
        ``nnx.Linear``. Selected layers need an integer ``out_features``
        (``nnx.Linear``, ``nnx.Conv``, ``nnx.LoRALinear``).
      activation: :math:`\\phi` (default ``nnx.gelu``).
      param_dtype: dtype of the adapters' weights; ``None`` (default): the
        dtype of the wrapped layer's ``kernel`` (float32 when it has none). Pass
        ``jnp.float32`` on a bf16 model to keep the adapters' updates in
        float32.

    Returns:
      A new module whose selected layers are :class:`AdaptedLayer`; a single
      :class:`AdaptedLayer` if ``model`` itself is selected.

    Raises:
      TypeError: ``model`` is not an nnx.Module, or a selected layer has no
        integer ``out_features``.
      ValueError: ``bottleneck`` is not a positive integer, ``select`` matches
        no layer, one selected layer lies inside another (say which), or a
        selected layer is shared by several paths (tied weights).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> base = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 4, rngs=rngs))
      >>> model = flowjax.add_adapters(base, 2, rngs=nnx.Rngs(1), select=nnx.PathContains(2))
      >>> type(model.layers[0]).__name__, type(model.layers[2]).__name__
      ('Linear', 'AdaptedLayer')
      >>> x = jnp.ones((3, 4))
      >>> bool((model(x) == base(x)).all())
      True
      >>> sorted(nnx.state(model, flowjax.AdapterParam)["layers"][2]["adapter"])
      ['down_bias', 'down_kernel', 'up_bias', 'up_kernel']
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}.")
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, numbers.Integral):
        raise ValueError(f"bottleneck must be a positive integer; got {bottleneck!r}.")
    if bottleneck < 1:
        raise ValueError(f"bottleneck must be a positive integer; got {bottleneck!r}.")
    if select is None:

        def pred(_path, m):
            return isinstance(m, nnx.Linear)
    else:
        pred = _select.predicate(select, on="module")

    new_model = nnx.clone(model)
    inside = {
        id(m)
        for _, a in nnx.iter_modules(new_model)
        if isinstance(a, AdaptedLayer)
        for _, m in nnx.iter_modules(a)
    }
    targets = [
        (path, m)
        for path, m in nnx.iter_modules(new_model)
        if id(m) not in inside and not isinstance(m, AdaptedLayer) and pred(path, m)
    ]
    if not targets:
        raise ValueError(
            f"select={select!r} matches no layer of the model (layers already inside "
            "an AdaptedLayer are skipped). A string is an NNX tag; select a path key "
            "with nnx.PathContains."
        )
    paths = [p for p, _ in targets]
    for p in paths:
        for q in paths:
            if p != q and q[: len(p)] == p:
                raise ValueError(
                    f"select matches both {p} and {q}, which lies inside it; an "
                    "adapter goes after one layer, so select only one of them."
                )
    built = []
    for path, m in targets:
        d = _out_features(path, m)
        kernel = getattr(m, "kernel", None)
        dtype = param_dtype
        if dtype is None:
            dtype = (
                kernel.get_value().dtype
                if isinstance(kernel, nnx.Variable)
                else jnp.float32
            )
        adapter = Adapter(
            d, bottleneck, rngs=rngs, activation=activation, param_dtype=dtype
        )
        if path == ():
            return AdaptedLayer(m, adapter)
        built.append((path, AdaptedLayer(m, adapter)))
    # Tied layers: with every target taken out, none may still be reachable.
    for path, _ in built:
        _replace(new_model, path, nnx.Module())
    _check_untied(
        new_model,
        {id(m): path for path, m in targets},
        "adding an adapter to one path only",
    )
    for path, new in built:
        _replace(new_model, path, new)
    return new_model


def remove_adapters(model: nnx.Module) -> nnx.Module:
    """Returns a copy of ``model`` with every :class:`AdaptedLayer` replaced by its layer.

    The inverse of :func:`add_adapters`: the result has the base model's
    structure and its (possibly fine-tuned) layer Variables, and no
    :class:`AdapterParam`. On a model trained with
    ``train_only(tx, flowjax.AdapterParam)`` it is the pre-trained model bit
    for bit. (A bottleneck adapter is nonlinear, so it cannot be merged into
    the layer's weights as LoRA can.)

    Args:
      model: an NNX module containing :class:`AdaptedLayer` modules, or one.

    Returns:
      A new module without adapters.

    Raises:
      TypeError: ``model`` is not an nnx.Module.
      ValueError: the model has no :class:`AdaptedLayer`, or a standalone
        :class:`Adapter` (outside an ``AdaptedLayer``) remains.

    Example:
      >>> import flowjax
      >>> from flax import nnx
      >>> model = flowjax.add_adapters(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
      >>> type(flowjax.remove_adapters(model)).__name__
      'Linear'
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}.")
    new_model = nnx.clone(model)

    def adapted(root):
        return [
            (p, m) for p, m in nnx.iter_modules(root) if isinstance(m, AdaptedLayer)
        ]

    targets = adapted(new_model)
    if not targets:
        raise ValueError("model has no flowjax.AdaptedLayer to remove.")
    # Outermost first; an inner AdaptedLayer (an adapter on an adapted layer) is
    # reached again through the unwrapped layer on the next pass.
    while targets:
        path, m = min(targets, key=lambda t: len(t[0]))
        if path == ():
            new_model = m.layer
        else:
            _replace(new_model, path, m.layer)
        targets = adapted(new_model)
    standalone = [p for p, m in nnx.iter_modules(new_model) if isinstance(m, Adapter)]
    if standalone:
        raise ValueError(
            f"standalone flowjax.Adapter modules remain at {standalone[:5]}; "
            "remove_adapters only removes AdaptedLayer wrappers."
        )
    return new_model
