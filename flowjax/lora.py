"""LoRA with Flax NNX's own layers: add adapters, train ``nnx.LoRAParam``, merge.

:func:`add_lora` swaps chosen ``nnx.Linear`` layers for ``nnx.LoRALinear``
(Flax's layer, not a re-implementation), copying the base kernel and bias, so

.. math::
    y = x W + b + s \\, x A B, \\qquad A \\in \\mathbb{R}^{d_\\text{in}\\times r},\\;
    B \\in \\mathbb{R}^{r\\times d_\\text{out}},\\; s = \\alpha / r.

``nnx.LoRA`` initialises :math:`A` with ``he_uniform`` and :math:`B` with zeros,
so right after :func:`add_lora` the model computes exactly what the base model
computes. ``nnx.LoRA`` itself applies no :math:`\\alpha/r` scaling (``s = 1``); the
paper's LLM setting is :math:`\\alpha = r = 64`, i.e. ``s = 1``, and that is the
default here. For another ``alpha`` the layer is a subclass of
``nnx.LoRALinear`` whose only change is multiplying the ``nnx.LoRA`` output by
``s``.

The trainable set is exactly the ``nnx.LoRAParam`` variables; select it with
NNX's own filter, outside the training loop::

    graphdef, lora_params, rest = nnx.split(model, nnx.LoRAParam, ...)
    # or, with the stateful API: nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

:func:`merge_lora` folds the adapters back, :math:`W \\leftarrow W + s A B`, into
plain ``nnx.Linear`` layers (the paper merges in fp32 before evaluation).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flowjax import _checks, _select
from flowjax._types import Filter

__all__ = ["add_lora", "merge_lora"]

_LORA_KWARGS = frozenset(
    {
        "a_initializer",
        "b_initializer",
        "lora_param_type",
        "lora_promote_dtype",
        "a_metadata",
        "b_metadata",
        "lora_dtype",
        "lora_param_dtype",
    }
)


class _ScaledLoRALinear(nnx.LoRALinear):
    """``nnx.LoRALinear`` with its ``nnx.LoRA`` output multiplied by ``lora_scale``."""

    def __init__(self, *args, lora_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_scale = lora_scale

    def __call__(self, x: jax.Array, out_sharding=None):
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        return y + self.lora_scale * self.lora(x)


def _get(node, key):
    return getattr(node, key) if isinstance(key, str) else node[key]


def _replace(root, path: tuple, new) -> None:
    parent = root
    for key in path[:-1]:
        parent = _get(parent, key)
    key = path[-1]
    if isinstance(key, str):
        setattr(parent, key, new)
    else:
        parent[key] = new


def _check_untied(root, replaced: dict[int, tuple], what: str) -> None:
    for path, m in nnx.iter_modules(root):
        if id(m) in replaced:
            raise ValueError(
                f"the layer at {replaced[id(m)]} is also reachable at {path} (tied or shared "
                f"weights); {what} would untie it. Untie the layers first or exclude them with "
                "`select`."
            )


def _linear_config(lin: nnx.Linear) -> dict[str, Any]:
    return {
        "use_bias": lin.use_bias,
        "dtype": lin.dtype,
        "param_dtype": lin.param_dtype,
        "precision": lin.precision,
        "dot_general": lin.dot_general,
        "promote_dtype": lin.promote_dtype,
        "preferred_element_type": lin.preferred_element_type,
    }


def _with_values(lin_cls, lin: nnx.Linear, kernel, bias, *, rngs, **kwargs):
    """Builds ``lin_cls`` with ``lin``'s configuration and the given values (no random init)."""
    new = lin_cls(
        lin.in_features,
        lin.out_features,
        **_linear_config(lin),
        kernel_init=lambda *_: kernel.get_value(),
        bias_init=(lambda *_: bias.get_value())
        if bias is not None
        else nnx.initializers.zeros,
        rngs=rngs,
        **kwargs,
    )
    new.kernel = kernel  # The Variable itself: metadata such as sharding is kept.
    if bias is not None:
        new.bias = bias
    return new


def add_lora(
    model: nnx.Module,
    rank: int,
    *,
    rngs: nnx.Rngs,
    select: Filter = None,
    alpha: float | None = None,
    **lora_kwargs,
) -> nnx.Module:
    """Returns a copy of ``model`` with chosen ``nnx.Linear`` layers as ``nnx.LoRALinear``.

    Each selected layer :math:`y = xW + b` becomes

    .. math::
        y = x W + b + \\frac{\\alpha}{r} \\, x A B, \\qquad A_{ij} \\sim
        \\text{he\\_uniform},\\; B = 0,

    with :math:`W, b` the *same* Variables as before (values and metadata
    copied exactly) and :math:`A, B` new ``nnx.LoRAParam`` variables. Because
    ``nnx.LoRA`` initialises :math:`B = 0`, the new model's outputs equal the
    base model's right away (``x A 0 = 0`` is added exactly). Train only the
    adapters with ``nnx.split(model, nnx.LoRAParam, ...)`` or
    ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``. ``nnx.LoRAParam`` is a
    subclass of ``nnx.Param``, so ``nnx.state(model, nnx.Param)`` includes the
    adapters; to optimise that whole state, wrap the optimiser with
    ``flowjax.train_only(tx, nnx.LoRAParam)``.

    ``model`` is not modified: the result is an ``nnx.clone`` of it, which
    shares the (immutable) array buffers, so the copy costs no memory and the
    base model stays usable as the frozen pre-trained reference (for FLOW's
    weights). Because buffers are shared, do not donate the result's base
    kernels to a jitted function while ``model`` is alive.

    **Adapter precision.** By default the LoRA factors take the base kernel's
    dtype and the layer's computation ``dtype``, so on a bf16 base model the
    adapters are stored, and updated by the optimiser, in pure bf16. bf16 has an
    8-bit mantissa: small updates to a factor are rounded away, which hurts
    with the small learning rates of fine-tuning. PEFT keeps adapters in
    float32 for this reason; to do the same, pass
    ``lora_param_dtype=jnp.float32``: :math:`A, B` (hence their gradients and
    optimiser state) are float32, the frozen base stays bf16, the layer still
    computes in its ``dtype`` (override with ``lora_dtype``), and the model
    still starts exactly at the base model's outputs::

        model = flowjax.add_lora(base, rank=64, rngs=nnx.Rngs(0),
                                 lora_param_dtype=jnp.float32)

    Args:
      model: an NNX module (or a single ``nnx.Linear``).
      rank: the LoRA rank :math:`r \\ge 1`.
      rngs: random streams; ``rngs.params()`` draws :math:`A`.
      select: which ``nnx.Linear`` layers get adapters: an NNX filter,
        unchanged, evaluated on ``(path, layer)`` (``nnx.PathContains("q_proj")``,
        ``nnx.Any(...)``, ``nnx.All(...)``, ``nnx.Not(...)``, a predicate
        ``(path, module) -> bool``; a list/tuple of filters matches any). A
        string is an NNX tag, as in NNX, and layers have none: select a path
        key with ``nnx.PathContains``. ``None`` (default): every
        ``nnx.Linear``. The paper's LLM setup is ``nnx.Any(*map(nnx.PathContains,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
        "down_proj")))`` with ``rank=64``.
      alpha: the LoRA :math:`\\alpha`; the adapter output is scaled by
        :math:`\\alpha / r`. ``None`` (default) means :math:`\\alpha = r`, scale 1,
        which is ``nnx.LoRALinear`` exactly and the paper's setting.
      **lora_kwargs: passed to ``nnx.LoRALinear``: ``a_initializer``,
        ``b_initializer``, ``lora_param_type``, ``lora_promote_dtype``,
        ``a_metadata``, ``b_metadata`` (e.g. sharding names for the factors),
        ``lora_dtype``, ``lora_param_dtype``. A non-zero ``b_initializer`` breaks
        the "starts at the base model" property.

    Returns:
      A new module whose selected layers are ``nnx.LoRALinear`` (a subclass of
      it when ``alpha != rank``); a single ``nnx.LoRALinear`` if ``model`` is an
      ``nnx.Linear``.

    Raises:
      TypeError: ``model`` is not an nnx.Module, a selected layer is a subclass
        of ``nnx.Linear`` (its own ``__call__`` would be lost), or an unknown
        keyword argument.
      ValueError: ``rank`` is not a positive integer, ``alpha`` is not a
        finite positive number, ``select`` matches no ``nnx.Linear``, or a
        selected layer is shared by several paths (tied weights).

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.up = nnx.Linear(4, 8, rngs=rngs)
      ...         self.down = nnx.Linear(8, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.down(nnx.relu(self.up(x)))
      >>> base = MLP(nnx.Rngs(0))
      >>> model = flowjax.add_lora(base, rank=2, rngs=nnx.Rngs(1), select=nnx.PathContains("up"))
      >>> type(model.up).__name__, type(model.down).__name__
      ('LoRALinear', 'Linear')
      >>> x = jnp.ones((3, 4))
      >>> bool((model(x) == base(x)).all())  # B = 0: the base model's outputs
      True
      >>> lora_params = nnx.state(model, nnx.LoRAParam)  # the trainable set
      >>> sorted(lora_params["up"]["lora"])
      ['lora_a', 'lora_b']
    """
    new_model, scale, targets = _lora_targets(
        model, rank, select, alpha, lora_kwargs, "add_lora"
    )
    cls = nnx.LoRALinear if scale == 1.0 else _ScaledLoRALinear
    extra = {} if scale == 1.0 else {"lora_scale": scale}

    def make(lin):
        kwargs = {
            "lora_rank": int(rank),
            "lora_dtype": lin.dtype,
            "lora_param_dtype": lin.kernel.get_value().dtype,
            **lora_kwargs,
            **extra,
        }
        return _with_values(cls, lin, lin.kernel, lin.bias, rngs=rngs, **kwargs)

    return _swap(new_model, targets, make, "adding LoRA to one path only")


def _lora_targets(model, rank, select, alpha, lora_kwargs, fn: str):
    """Checks add_lora-style arguments; returns (a clone of model, alpha/r, its selected layers).

    Shared by :func:`add_lora` and :func:`flowjax.add_qlora`; ``fn`` names the caller
    in error messages.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}.")
    rank = _checks.check_int(rank, "rank", 1)
    if alpha is None:
        scale = 1.0
    else:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}.")
        scale = float(alpha) / int(rank)
    unknown = set(lora_kwargs) - _LORA_KWARGS
    if unknown:
        raise TypeError(
            f"unknown keyword arguments {sorted(unknown)}; {fn} passes only "
            f"{sorted(_LORA_KWARGS)} to the LoRA factors."
        )
    pred = (
        (lambda _p, _m: True)
        if select is None
        else _select.predicate(select, on="module")
    )

    new_model = nnx.clone(model)
    targets = []
    for path, m in nnx.iter_modules(new_model):
        if not isinstance(m, nnx.Linear) or isinstance(m, nnx.LoRALinear):
            continue
        if not pred(path, m):
            continue
        if type(m) is not nnx.Linear:
            raise TypeError(
                f"the layer at {path} is a {type(m).__name__}, a subclass of nnx.Linear; "
                f"{fn} only converts plain nnx.Linear layers (a subclass's own "
                "__call__ would be lost). Exclude it with `select`."
            )
        targets.append((path, m))
    if not targets:
        tags = (
            " A string is an NNX tag and layers have none: select a path key with "
            "nnx.PathContains."
            if any(isinstance(x, str) for x in jax.tree.leaves(select))
            else ""
        )
        raise ValueError(
            f"select={select!r} matches no plain nnx.Linear layer of the model "
            f"(layers that already are nnx.LoRALinear are skipped).{tags}"
        )
    return new_model, scale, targets


def _layers_of(model, cls, missing: str):
    """``(a clone of model, its (path, layer) pairs of type cls)``; ValueError(missing) if none."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}.")
    new_model = nnx.clone(model)
    targets = [(p, m) for p, m in nnx.iter_modules(new_model) if isinstance(m, cls)]
    if not targets:
        raise ValueError(missing)
    return new_model, targets


def _swap(new_model, targets, make, what: str):
    """Replaces each ``(path, layer)`` of ``targets`` in ``new_model`` by ``make(layer)``."""
    replaced = {}
    for path, layer in targets:
        new = make(layer)
        if path == ():
            return new
        _replace(new_model, path, new)
        replaced[id(layer)] = path
    _check_untied(new_model, replaced, what)
    return new_model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Returns a copy of ``model`` with every ``nnx.LoRALinear`` folded into an ``nnx.Linear``.

    For each LoRA layer (scale :math:`s = \\alpha / r`, 1 for ``nnx.LoRALinear``)

    .. math::
        W' = W + s \\, A B,

    computed in float32 (or wider) at ``HIGHEST`` precision and cast back to
    the kernel's dtype; the bias, the layer's configuration and the kernel's
    metadata are kept. The merged model computes the same function as the
    LoRA model up to floating-point rounding of the reassociation
    :math:`x(W + sAB)` versus :math:`xW + s(xA)B`, and holds no
    ``nnx.LoRAParam``. ``model`` is not modified.

    Args:
      model: an NNX module containing ``nnx.LoRALinear`` layers (e.g. from
        :func:`add_lora`), or a single ``nnx.LoRALinear``.

    Returns:
      A new module with plain ``nnx.Linear`` layers in their place.

    Raises:
      TypeError: ``model`` is not an nnx.Module.
      ValueError: the model has no ``nnx.LoRALinear``; or ``nnx.LoRAParam``
        variables remain outside ``nnx.LoRALinear`` layers (e.g. a standalone
        ``nnx.LoRA``), which cannot be folded into a kernel.

    Example:
      >>> import jax, jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> lora = flowjax.add_lora(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
      >>> lora.lora.lora_b[...] = jnp.ones((2, 3))  # pretend it was trained
      >>> merged = flowjax.merge_lora(lora)
      >>> type(merged).__name__, len(nnx.state(merged, nnx.LoRAParam))
      ('Linear', 0)
      >>> x = jax.random.normal(jax.random.key(0), (5, 4))
      >>> bool(jnp.allclose(merged(x), lora(x), atol=1e-5))
      True
    """
    new_model, targets = _layers_of(
        model, nnx.LoRALinear, "model has no nnx.LoRALinear layer to merge."
    )

    def make(m):
        scale = getattr(m, "lora_scale", 1.0)
        w = m.kernel.get_value()
        compute = jnp.promote_types(w.dtype, jnp.float32)
        delta = jnp.matmul(
            m.lora.lora_a.get_value().astype(compute),
            m.lora.lora_b.get_value().astype(compute),
            precision=jax.lax.Precision.HIGHEST,
        )
        merged = (w.astype(compute) + scale * delta).astype(w.dtype)
        return _with_values(
            nnx.Linear, m, m.kernel.copy(merged), m.bias, rngs=nnx.Rngs(0)
        )

    new_model = _swap(new_model, targets, make, "merging one path only")
    left = [path for path, _ in nnx.to_flat_state(nnx.state(new_model, nnx.LoRAParam))]
    if left:
        raise ValueError(
            f"nnx.LoRAParam variables remain outside nnx.LoRALinear layers at {left[:5]}; "
            "merge_lora can only fold adapters of nnx.LoRALinear layers into their kernels."
        )
    return new_model
