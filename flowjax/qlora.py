"""QLoRA (Dettmers et al., 2023): LoRA on a frozen, NF4-quantised base.

:func:`add_qlora` replaces chosen ``nnx.Linear`` layers by :class:`QLoRALinear`
layers that hold the base kernel :math:`W \\in \\mathbb{R}^{d_\\text{in}\\times
d_\\text{out}}` as 4-bit NormalFloat codes plus one absmax constant per block, and
a trainable LoRA pair :math:`A, B` (``nnx.LoRAParam``, as :func:`flowjax.add_lora`):

.. math::
    y = x\\,\\widetilde W + b + \\frac{\\alpha}{r}\\, x A B, \\qquad
    \\widetilde W_{kj} = c_{\\lceil k/s\\rceil j}\\; q_{n_{kj}},

where :math:`q_0 < \\dots < q_{15}` is the NF4 code book (the 16 values of
Dettmers et al.'s NormalFloat, ``flowjax.qlora.NF4_CODE``), :math:`s` the block size (64,
the paper's) and, for each output column :math:`j` and each block of :math:`s`
consecutive input rows, :math:`c = \\max |W_\\text{block}|` its absmax constant
and :math:`n_{kj} = \\arg\\min_i |q_i - W_{kj}/c|` the code of each entry (blocks
run along the input axis, which is bitsandbytes' blockwise order for a torch
``(out, in)`` weight). The forward dequantises :math:`\\widetilde W` on the fly
(in float32, then cast to the original kernel's dtype) and computes
``nnx.Linear``'s own forward with it, so a :class:`QLoRALinear` with
:math:`B = 0` gives exactly the outputs of the ``nnx.Linear`` holding
:math:`\\widetilde W` (:func:`dequantize_qlora`).

The codes (two per byte, ``uint8`` of shape ``(ceil(in/2), out)``: half a
byte per weight on every backend, where a ``uint4`` array takes a whole byte
per entry on CPU) and the absmax constants (float32, one per block: 0.5 bit
per weight at block size 64) are :class:`NF4` variables, not ``nnx.Param``: they are not in ``nnx.state(model, nnx.Param)``,
never differentiated and never updated, whichever of flowjax's selections
the trainable set is taken with (``nnx.LoRAParam``, or ``nnx.Param`` with
:func:`flowjax.train_only`). The bias, if any, stays the base model's float
``nnx.Param``.

**Why not qwix.** qwix 0.1.8 (Google's quantisation library for JAX) has a
QLoRA (``qwix.apply_lora_to_model`` with ``qwix.LoraProvider(weight_qtype="nf4",
tile_size=64)``); tried on an ``nnx.Linear`` MLP and on a tiny
:class:`flowjax.models.CausalLM` it runs, jitted (jit = no jit), with LoRA
factors as ``nnx.LoRAParam``. It is not used here because it stores the NF4
codes and scales as ``nnx.Param`` (a ``uint4`` ``qvalue`` leaf in
``nnx.state(model, nnx.Param)``, which :func:`flowjax.init_train_state`'s
float check would refuse and which an ``nnx.Param``-based selection would
try to train); it swaps the model's class for a generated interception
subclass and needs a traced forward pass on example inputs; and each
layer's ``kernel`` becomes a qwix quantised array, which
:func:`flowjax.merge_lora` and a dequantised float model cannot be built
from without qwix internals. This module is small, on ``nnx.LoRA`` and
flowjax's LoRA surgery (same selection, same errors, same tied-weight check).

Not implemented: the paper's double quantisation of the absmax constants
(8-bit, blocks of 256; it saves 0.37 bit per parameter) and paged optimisers.

The workflow, with FLOW's weights as with any other model::

    model = flowjax.add_qlora(base, rank=64, rngs=nnx.Rngs(0), select=targets)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)  # train `lora`
    ...
    merged = flowjax.merge_lora(flowjax.dequantize_qlora(model))  # a float model
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as _dtypes

from flowjax import _checks
from flowjax import lora as _lora
from flowjax._types import Array, Filter

__all__ = [
    "NF4",
    "NF4_CODE",
    "QLoRALinear",
    "add_qlora",
    "dequantize_qlora",
    "nf4_dequantize",
    "nf4_quantize",
]

#: The NF4 code book of Dettmers et al. (2023), as in bitsandbytes: the
#: quantiles of N(0, 1) for 8 positive and 7 negative levels, offset 0.9677,
#: normalised to [-1, 1], with an exact 0.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Nearest code = number of midpoints below the value (ties go to the lower code).
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


class NF4(nnx.Variable):
    """The frozen NF4 state of a :class:`QLoRALinear`: its codes and absmax constants.

    Not an ``nnx.Param``: never in ``nnx.state(model, nnx.Param)``, never trained.
    """


def _check_block_size(block_size) -> int:
    return _checks.check_int(block_size, "block_size", 1)


def _absmax_rows(absmax: Array, n: int, block_size: int) -> Array:
    """The block constants repeated over the ``n`` rows of their blocks."""
    return jnp.repeat(absmax, block_size, axis=0)[:n]


def nf4_quantize(w: jax.typing.ArrayLike, block_size: int = 64) -> tuple[Array, Array]:
    """Blockwise absmax NF4 quantisation of an array along its first axis.

    .. math::
        c_{bj} = \\max_{k \\in \\text{block } b} |w_{kj}|, \\qquad
        n_{kj} = \\arg\\min_i \\bigl|q_i - w_{kj} / c_{bj}\\bigr|

    with :math:`q` = ``flowjax.qlora.NF4_CODE`` and blocks of ``block_size`` consecutive
    entries of axis 0 (the input axis of a kernel ``[in, out]``) for each
    index of the other axes; the last block is shorter when ``block_size``
    does not divide ``w.shape[0]``. Computed in float32; an all-zero block
    gets :math:`c = 0` and code 7 (:math:`q_7 = 0`).

    Args:
      w: a floating array with at least one axis.
      block_size: :math:`s \\ge 1` (the paper's is 64).

    Returns:
      ``(codes, absmax)``: ``uint4`` codes of ``w``'s shape and float32
      constants of shape ``(ceil(w.shape[0] / s), *w.shape[1:])``.

    Raises:
      ValueError: ``block_size`` is not a positive integer, or ``w`` is a scalar.
      TypeError: ``w`` is not floating point.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> codes, absmax = flowjax.nf4_quantize(jnp.array([[0.5], [-1.0], [0.0], [2.0]]), 2)
      >>> codes[:, 0].tolist(), absmax[:, 0].tolist()
      ([12, 0, 7, 15], [1.0, 2.0])
    """
    block_size = _check_block_size(block_size)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"nf4_quantize needs a floating array; got {w.dtype}.")
    if w.ndim == 0:
        raise ValueError("nf4_quantize needs an array with at least one axis.")
    return _quantize(w, block_size)


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w, block_size):
    w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    n = w.shape[0]
    pad = -n % block_size
    padded = jnp.pad(w, [(0, pad)] + [(0, 0)] * (w.ndim - 1))
    blocks = padded.reshape(-1, block_size, *w.shape[1:])
    absmax = jnp.max(jnp.abs(blocks), axis=1).astype(jnp.float32)
    scale = _absmax_rows(absmax, n, block_size)
    x = (w / jnp.where(scale == 0, 1, scale)).astype(jnp.float32)
    codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), x, side="left")
    return codes.astype(jnp.uint4), absmax


def nf4_dequantize(
    codes: jax.typing.ArrayLike,
    absmax: jax.typing.ArrayLike,
    block_size: int = 64,
    dtype=jnp.float32,
) -> Array:
    """The array that :func:`nf4_quantize`'s codes stand for: :math:`c_{bj}\\, q_{n_{kj}}`.

    Computed in float32 (one exact table look-up and one rounded product per
    entry), then cast to ``dtype``.

    Args:
      codes: integer codes in ``0..15`` (from :func:`nf4_quantize`).
      absmax: the block constants, shape ``(ceil(n / block_size), *codes.shape[1:])``.
      block_size: the block size they were made with.
      dtype: the result's dtype.

    Returns:
      An array of ``codes``' shape and ``dtype``.

    Raises:
      ValueError: ``block_size`` is not a positive integer, or ``absmax``'s
        shape does not fit ``codes`` and ``block_size``.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> w = jnp.array([[0.5], [-1.0], [0.0], [2.0]])
      >>> flowjax.nf4_dequantize(*flowjax.nf4_quantize(w, 2), 2)[:, 0].tolist()
      [0.44070982933044434, -1.0, 0.0, 2.0]
    """
    block_size = _check_block_size(block_size)
    codes, absmax = jnp.asarray(codes), jnp.asarray(absmax)
    want = (math.ceil(codes.shape[0] / block_size), *codes.shape[1:])
    if absmax.shape != want:
        raise ValueError(
            f"absmax has shape {absmax.shape}; codes of shape {codes.shape} in blocks "
            f"of {block_size} need {want}."
        )
    return _dequantize(codes, absmax, block_size, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(codes, absmax, block_size, dtype):
    table = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
    scale = _absmax_rows(absmax.astype(jnp.float32), codes.shape[0], block_size)
    return (table * scale).astype(dtype)


def _pack(codes: Array) -> Array:
    """Two 4-bit codes per byte along axis 0: ``byte[k] = c[2k] | c[2k+1] << 4``."""
    c = codes.astype(jnp.uint8)
    if c.shape[0] % 2:
        c = jnp.pad(c, [(0, 1)] + [(0, 0)] * (c.ndim - 1))
    return c[0::2] | (c[1::2] << 4)


def _unpack(packed: Array, n: int) -> Array:
    """The ``n`` codes along axis 0 that :func:`_pack` stored."""
    pairs = jnp.stack([packed & 15, packed >> 4], axis=1)
    return pairs.reshape(-1, *packed.shape[1:])[:n]


def _axis_size(mesh, names) -> int:
    names = names if isinstance(names, tuple) else (names,)
    return math.prod(mesh.shape[n] for n in names)


class QLoRALinear(nnx.Module):
    """A frozen NF4 linear layer plus a trainable LoRA: :math:`y = x\\widetilde W + b + s\\,xAB`.

    ``codes`` holds the NF4 codes two per byte along the input axis
    (``uint8``, ``(ceil(in/2), out)``), ``absmax`` the float32 block
    constants; both are :class:`NF4` variables placed like the kernel.
    ``kernel`` (a property) is the dequantised :math:`\\widetilde W` in the
    original kernel's dtype; the forward is ``nnx.Linear``'s own on it,
    plus ``lora_scale * lora(x)`` (``nnx.LoRA``: :math:`A` he-uniform,
    :math:`B = 0`). Built by :func:`add_qlora`; see the module doc.

    Args:
      kernel: the float kernel ``[in, out]`` to quantise (an array or an
        ``nnx.Param``, whose metadata, e.g. sharding names, the codes keep).
      bias: the bias ``nnx.Param`` (kept as it is), or None.
      lora_rank: :math:`r`.
      rngs: draws :math:`A`.
      block_size: the NF4 block size.
      lora_scale: :math:`s = \\alpha / r`.
      dtype: the computation dtype, as for ``nnx.Linear`` (also ``precision``,
        ``dot_general``, ``promote_dtype``, ``preferred_element_type``).
      lora_dtype: the factors' computation dtype (default ``dtype``).
      lora_param_dtype: the factors' dtype (default: the kernel's).
      **lora_kwargs: ``a_initializer``, ``b_initializer``,
        ``lora_param_type``, ``lora_promote_dtype``, ``a_metadata``,
        ``b_metadata``, as for ``nnx.LoRALinear``.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> layer = flowjax.QLoRALinear(jnp.ones((4, 3)), None, lora_rank=2, rngs=nnx.Rngs(0),
      ...                             block_size=4)
      >>> layer(jnp.ones((1, 4))).tolist()
      [[4.0, 4.0, 4.0]]
    """

    def __init__(
        self,
        kernel,
        bias,
        *,
        lora_rank: int,
        rngs: nnx.Rngs,
        block_size: int = 64,
        lora_scale: float = 1.0,
        dtype=None,
        precision=None,
        dot_general=jax.lax.dot_general,
        promote_dtype=_dtypes.promote_dtype,
        preferred_element_type=None,
        lora_dtype=None,
        lora_param_dtype=None,
        **lora_kwargs,
    ):
        metadata = kernel.get_metadata() if isinstance(kernel, nnx.Variable) else {}
        w = (
            kernel.get_value()
            if isinstance(kernel, nnx.Variable)
            else jnp.asarray(kernel)
        )
        if w.ndim != 2:
            raise ValueError(f"kernel must be [in, out]; got shape {w.shape}.")
        self.block_size = _check_block_size(block_size)
        codes, absmax = nf4_quantize(w, self.block_size)
        codes = _pack(codes)
        sharding = getattr(w, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):  # the kernel's placement
            rows, cols = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
            if rows is not None and codes.shape[0] % _axis_size(sharding.mesh, rows):
                rows = None  # the packed rows do not divide: replicate them
            P = jax.sharding.PartitionSpec
            codes = jax.device_put(codes, sharding.update(spec=P(rows, cols)))
            absmax = jax.device_put(absmax, sharding.update(spec=P(None, cols)))
        self.codes = NF4(codes, **metadata)
        self.absmax = NF4(absmax)
        self.bias = bias if bias is not None else nnx.data(None)
        self.in_features, self.out_features = w.shape
        self.use_bias = bias is not None
        self.param_dtype = w.dtype  # the dtype `kernel` is dequantised to
        self.dtype = dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.lora_scale = float(lora_scale)
        self.lora = nnx.LoRA(
            self.in_features,
            int(lora_rank),
            self.out_features,
            dtype=dtype if lora_dtype is None else lora_dtype,
            param_dtype=w.dtype if lora_param_dtype is None else lora_param_dtype,
            rngs=rngs,
            **{
                ("promote_dtype" if k == "lora_promote_dtype" else k): v
                for k, v in lora_kwargs.items()
            },
        )

    @property
    def kernel(self) -> Array:
        """The dequantised base kernel :math:`\\widetilde W` in the original kernel's dtype."""
        return nf4_dequantize(
            _unpack(self.codes.get_value(), self.in_features),
            self.absmax.get_value(),
            self.block_size,
            self.param_dtype,
        )

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        # nnx.Linear's forward, reading `self.kernel` (the dequantised kernel).
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        if self.lora_scale == 1.0:
            return y + self.lora(x)
        return y + self.lora_scale * self.lora(x)


def add_qlora(
    model: nnx.Module,
    rank: int,
    *,
    rngs: nnx.Rngs,
    select: Filter = None,
    alpha: float | None = None,
    block_size: int = 64,
    **lora_kwargs,
) -> nnx.Module:
    """Returns a copy of ``model`` with chosen ``nnx.Linear`` layers as :class:`QLoRALinear`.

    Each selected layer :math:`y = xW + b` becomes

    .. math::
        y = x\\,\\mathrm{NF4}_s(W) + b + \\frac{\\alpha}{r}\\, x A B, \\qquad
        A_{ij} \\sim \\text{he\\_uniform},\\; B = 0,

    with :math:`\\mathrm{NF4}_s(W)` the blockwise NF4 quantisation of
    :math:`W` (:func:`nf4_quantize`, dequantised on the fly in the forward;
    codes and constants are frozen :class:`NF4` variables), :math:`b` the
    same ``nnx.Param`` as before and :math:`A, B` new ``nnx.LoRAParam``.
    Right after the call the model computes exactly what its
    :func:`dequantize_qlora` float model computes (the base model up to NF4
    error). Arguments, selection and errors are :func:`flowjax.add_lora`'s;
    train the adapters the same way (``nnx.split(model, nnx.LoRAParam,
    ...)`` or ``flowjax.train_only(tx, nnx.LoRAParam)``). ``model`` is not
    modified. This is the paper's setting with ``rank=64``, ``alpha=16`` and
    every projection selected (LoRA on all linear layers).

    Args:
      model: an NNX module (or a single ``nnx.Linear``).
      rank: the LoRA rank :math:`r \\ge 1`.
      rngs: ``rngs.params()`` draws :math:`A`.
      select: which ``nnx.Linear`` layers: an NNX filter on ``(path, layer)``,
        as in :func:`flowjax.add_lora`; ``None`` (default): all.
      alpha: the LoRA :math:`\\alpha` (scale :math:`\\alpha/r`); ``None``:
        :math:`\\alpha = r`.
      block_size: the NF4 block size :math:`s` along each kernel's input
        axis (default 64, the paper's).
      **lora_kwargs: as in :func:`flowjax.add_lora` (e.g.
        ``lora_param_dtype=jnp.float32`` for float32 adapters on a bf16 base).

    Returns:
      A new module whose selected layers are :class:`QLoRALinear`; a single
      :class:`QLoRALinear` if ``model`` is an ``nnx.Linear``.

    Raises:
      TypeError: as :func:`flowjax.add_lora`.
      ValueError: as :func:`flowjax.add_lora`; ``block_size`` is not a
        positive integer.

    Example:
      >>> import jax, jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> base = nnx.Linear(128, 4, rngs=nnx.Rngs(0))
      >>> model = flowjax.add_qlora(base, rank=2, rngs=nnx.Rngs(1))
      >>> model.codes.shape, model.codes.dtype, model.absmax.shape  # 2 codes a byte
      ((64, 4), dtype('uint8'), (2, 4))
      >>> sorted(nnx.state(model, nnx.Param))  # the NF4 state is not a Param
      ['bias', 'lora']
      >>> # NF4 error: at most half the widest code gap (0.152) times the block's absmax
      >>> err = jnp.abs(model.kernel - base.kernel[...])
      >>> bool((err <= 0.152 * jnp.repeat(model.absmax[...], 64, axis=0)).all())
      True
      >>> x = jax.random.normal(jax.random.key(0), (3, 128))
      >>> bool((model(x) == flowjax.dequantize_qlora(model)(x)).all())  # B = 0
      True
    """
    block_size = _check_block_size(block_size)
    new_model, scale, targets = _lora._lora_targets(
        model, rank, select, alpha, lora_kwargs, "add_qlora"
    )

    def make(lin):
        kwargs = {
            "lora_dtype": lin.dtype,
            "lora_param_dtype": lin.kernel.get_value().dtype,
            **lora_kwargs,
        }
        return QLoRALinear(
            lin.kernel,
            lin.bias,
            lora_rank=int(rank),
            rngs=rngs,
            block_size=block_size,
            lora_scale=scale,
            dtype=lin.dtype,
            precision=lin.precision,
            dot_general=lin.dot_general,
            promote_dtype=lin.promote_dtype,
            preferred_element_type=lin.preferred_element_type,
            **kwargs,
        )

    return _lora._swap(new_model, targets, make, "adding QLoRA to one path only")


def dequantize_qlora(model: nnx.Module) -> nnx.Module:
    """Returns a float copy of ``model``: each :class:`QLoRALinear` as a LoRA layer on :math:`\\widetilde W`.

    Each :class:`QLoRALinear` becomes the ``nnx.LoRALinear`` (scaled as
    :func:`flowjax.add_lora` scales it when :math:`\\alpha \\ne r`) whose kernel
    is the dequantised :math:`\\widetilde W` (an ``nnx.Param`` in the original
    kernel's dtype, with the codes' metadata), with the same bias and the
    same trained :math:`A, B`: it computes exactly what the QLoRA layer
    computes. Follow with :func:`flowjax.merge_lora` for plain ``nnx.Linear``
    layers :math:`\\widetilde W + sAB` (e.g. to export or evaluate), or set
    the factors aside for the dequantised base model alone. ``model`` is not
    modified.

    Args:
      model: a module with :class:`QLoRALinear` layers (from :func:`add_qlora`),
        or a single :class:`QLoRALinear`.

    Returns:
      A new module without :class:`NF4` variables.

    Raises:
      TypeError: ``model`` is not an nnx.Module.
      ValueError: the model has no :class:`QLoRALinear`.

    Example:
      >>> import jax.numpy as jnp, flowjax
      >>> from flax import nnx
      >>> q = flowjax.add_qlora(nnx.Linear(64, 3, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
      >>> q.lora.lora_b[...] = jnp.ones((2, 3))  # pretend it was trained
      >>> merged = flowjax.merge_lora(flowjax.dequantize_qlora(q))
      >>> type(merged).__name__, merged.kernel.dtype
      ('Linear', dtype('float32'))
      >>> x = jnp.ones((2, 64))
      >>> bool(jnp.allclose(merged(x), q(x), atol=1e-4))
      True
    """
    new_model, targets = _lora._layers_of(
        model, QLoRALinear, "model has no QLoRALinear layer to dequantise."
    )

    def make(q):
        scale = q.lora_scale
        cls = nnx.LoRALinear if scale == 1.0 else _lora._ScaledLoRALinear
        extra = {} if scale == 1.0 else {"lora_scale": scale}
        kernel = nnx.Param(q.kernel, **q.codes.get_metadata())
        new = _lora._with_values(
            cls,
            q,
            kernel,
            q.bias,
            rngs=nnx.Rngs(0),
            lora_rank=q.lora.lora_a.get_value().shape[1],
            **extra,
        )
        new.lora = q.lora  # the trained factors themselves
        return new

    return _lora._swap(new_model, targets, make, "dequantising one path only")
