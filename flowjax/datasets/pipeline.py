"""The image pipeline: decode, crop, flip, normalise, batch; seeded by (seed, epoch, id), resumable.

:func:`image_batches` is :func:`flowjax.batches` with :func:`image_transform`
as its ``map_fn``, computed by a pool of threads. It is built on
``flowjax.batches`` rather than on grain because ``flowjax.batches`` already
has exactly the contract the training loop and the pre-pass rely on: the
record order is a function of ``(seed, epoch)``, each example's augmentation
of ``(seed, epoch, id)`` (grain's ``random_map`` seeds by the element's
position, so an example's crop would change with the shuffle, the shard and
the process count), ``from_batch(k)`` resumes at any batch without reading
the ones before, the processes partition each epoch, and the pre-pass cache
understands it. What grain would add is parallel decoding; the threads here
give it (PIL decodes and resizes without holding the GIL), and since batch
``k`` is ``flowjax.batches``' batch ``k`` computed on some thread, the
output does not depend on the number of threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from flowjax import data as _data

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "center_crop_box",
    "image_batches",
    "image_transform",
    "random_resized_crop_box",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""The ImageNet RGB channel means (of pixel values in [0, 1])."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The ImageNet RGB channel standard deviations."""


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """The box of torchvision's ``RandomResizedCrop``: ``(top, left, h, w)``.

    Up to 10 tries: draw an area fraction :math:`s \\sim U(\\text{scale})`
    and an aspect :math:`a = e^{u}`, :math:`u \\sim U(\\log r_0, \\log r_1)`;
    :math:`w = \\mathrm{round}(\\sqrt{sHW a})`,
    :math:`h = \\mathrm{round}(\\sqrt{sHW / a})`; if the box fits
    (:math:`0 < w \\le W`, :math:`0 < h \\le H`) its corner is uniform over
    the valid positions. Otherwise the fallback is the whole image cut to the
    nearest allowed aspect, centred. The same algorithm as torchvision's,
    drawn from ``rng``.

    Args:
      height: the image height ``H``.
      width: the image width ``W``.
      rng: the generator (in the pipeline: the example's, from
        ``(seed, epoch, id)``).
      scale: the range of the box's area as a fraction of the image's.
      ratio: the range of the box's aspect ``w / h``.

    Returns:
      ``(top, left, h, w)`` integers with the box inside the image.

    Raises:
      ValueError: a non-positive size, or a range with low > high or a
        non-positive ratio.

    Example:
      >>> import numpy as np
      >>> from flowjax.datasets import random_resized_crop_box
      >>> top, left, h, w = random_resized_crop_box(300, 400, np.random.default_rng(0))
      >>> 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
      True
    """
    _check_range(scale, "scale", positive=False)
    _check_range(ratio, "ratio", positive=True)
    if height < 1 or width < 1:
        raise ValueError(f"the image must be at least 1×1; got {height}×{width}.")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """The box of torchvision's ``CenterCrop(size)``: ``(top, left, size, size)``.

    :math:`\\text{top} = \\mathrm{round}((H - s)/2)`,
    :math:`\\text{left} = \\mathrm{round}((W - s)/2)` (Python's rounding, as
    torchvision).

    Args:
      height: the image height ``H``.
      width: the image width ``W``.
      size: the crop side ``s``.

    Returns:
      ``(top, left, size, size)``.

    Raises:
      ValueError: ``size`` larger than the image or below 1.

    Example:
      >>> from flowjax.datasets import center_crop_box
      >>> center_crop_box(256, 341, 224)
      (16, 58, 224, 224)
    """
    if not 1 <= size <= min(height, width):
        raise ValueError(
            f"a centre crop of {size} needs an image at least that big; got {height}×{width}."
        )
    return round((height - size) / 2), round((width - size) / 2), size, size


def image_transform(
    *,
    train: bool,
    image_size: int = 224,
    resize_size: int = 256,
    resize: str = "shorter_side",
    train_crop: str = "random_resized",
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    color_jitter: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: str = "float32",
) -> Callable[[dict, np.random.Generator], dict]:
    """The per-example ``map_fn(example, rng)`` of the pipeline: decode, crop, flip, normalise.

    ``example["image"]`` is encoded image bytes (decoded with PIL, converted
    to RGB) or a ``uint8 [H, W, 3]`` array. Evaluation (``train=False``):
    resize, then the centre ``image_size`` crop (:func:`center_crop_box`).
    Training: ``train_crop="random_resized"`` crops
    :func:`random_resized_crop_box` and resizes it to ``image_size``
    (torchvision's ``RandomResizedCrop``); ``train_crop="random"`` resizes
    and takes a uniformly placed ``image_size`` crop (``RandomCrop``); then,
    with ``flip``, a horizontal flip with probability 1/2; then, with
    ``color_jitter = j > 0``, torchvision's ``ColorJitter(j, j, j)``:
    brightness, contrast and saturation (PIL's ``ImageEnhance`` ``Brightness``,
    ``Contrast``, ``Color``, as torchvision on PIL images) with factors drawn
    from :math:`U(1 - j, 1 + j)`, applied in a random order. "Resize" is
    ``resize="shorter_side"`` (the shorter side to ``resize_size``, the other
    ``int(resize_size · long / short)``: ``Resize(256)``) or
    ``resize="square"`` (to ``resize_size × resize_size``:
    ``Resize((256, 256))``). Every resize is PIL's bilinear (antialiased),
    as torchvision on PIL images. Then
    :math:`x = (p / 255 - \\mu) / \\sigma` per channel, in float32, cast to
    ``dtype``.

    The FLOW code's transforms in these terms: Caltech-101 and the ImageNet
    evaluation are the defaults; Stanford Cars and Dogs
    ``resize="square", train_crop="random"``; CIFAR and Flowers-102
    ``resize="square", resize_size=224, train_crop="random"`` (a crop of
    the whole image: just resize and flip), CIFAR with its own ``mean`` and
    ``std`` ((0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010) for
    CIFAR-10, (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761) for
    CIFAR-100); Caltech-101, Cars and Dogs train with ``color_jitter=0.2``.

    Args:
      train: training augmentation (random crop and flip) or evaluation.
      image_size: the output side.
      resize_size: the resize target (see above).
      resize: ``"shorter_side"`` or ``"square"``.
      train_crop: ``"random_resized"`` or ``"random"``.
      scale: ``RandomResizedCrop``'s area range.
      ratio: ``RandomResizedCrop``'s aspect range.
      flip: flip half the training images left-right.
      color_jitter: the brightness/contrast/saturation jitter ``j`` of
        training images, in [0, 1) (0: none).
      mean: the channel means ``μ`` of pixel values in [0, 1].
      std: the channel standard deviations ``σ``.
      dtype: ``"float32"`` or ``"bfloat16"``.

    Returns:
      ``map_fn(example, rng) -> {"image": dtype [image_size, image_size, 3],
      "label": example["label"]}`` (other fields are dropped); it uses only
      ``rng`` for randomness, so with :func:`flowjax.batches` an example's
      view depends only on ``(seed, epoch, id)``.

    Raises:
      ValueError: bad sizes (``image_size > resize_size`` where a crop of the
        resized image is taken), an unknown ``resize``/``train_crop``/``dtype``,
        or ``mean``/``std`` not three numbers (``std`` > 0). The returned
        function raises ValueError for an image that is neither bytes nor a
        ``uint8`` HWC array, or bytes PIL cannot decode.

    Example:
      >>> import numpy as np
      >>> from flowjax.datasets import image_transform
      >>> fn = image_transform(train=False, image_size=4, resize_size=6)
      >>> out = fn({"image": np.full((8, 12, 3), 255, np.uint8), "label": 3}, np.random.default_rng(0))
      >>> out["image"].shape, out["image"].dtype, round(float(out["image"][0, 0, 0]), 4)
      ((4, 4, 3), dtype('float32'), 2.2489)
    """
    for v, name in ((image_size, "image_size"), (resize_size, "resize_size")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}.")
    if resize not in ("shorter_side", "square"):
        raise ValueError(f'resize must be "shorter_side" or "square"; got {resize!r}.')
    if train_crop not in ("random_resized", "random"):
        raise ValueError(
            f'train_crop must be "random_resized" or "random"; got {train_crop!r}.'
        )
    if (not train or train_crop == "random") and image_size > resize_size:
        raise ValueError(
            f"image_size={image_size} > resize_size={resize_size}: the crop is taken from the "
            "resized image, so it cannot be larger."
        )
    _check_range(scale, "scale", positive=False)
    _check_range(ratio, "ratio", positive=True)
    if not 0 <= color_jitter < 1:
        raise ValueError(f"color_jitter must be in [0, 1); got {color_jitter!r}.")
    out_dtype = _dtype(dtype)
    mu = _channels(mean, "mean")
    sigma = _channels(std, "std")
    if (sigma <= 0).any():
        raise ValueError(f"std must be > 0; got {list(std)}.")
    random_resized = train and train_crop == "random_resized"

    def transform(example: dict, rng: np.random.Generator) -> dict:
        from PIL import Image

        img = _decode(example["image"])
        if random_resized:
            top, left, h, w = random_resized_crop_box(
                img.height, img.width, rng, scale=scale, ratio=ratio
            )
            img = img.crop((left, top, left + w, top + h)).resize(
                (image_size, image_size), Image.Resampling.BILINEAR
            )
        else:
            img = img.resize(
                _resized(img.width, img.height, resize_size, resize),
                Image.Resampling.BILINEAR,
            )
            if train:
                top = int(rng.integers(0, img.height - image_size + 1))
                left = int(rng.integers(0, img.width - image_size + 1))
            else:
                top, left, _, _ = center_crop_box(img.height, img.width, image_size)
            img = img.crop((left, top, left + image_size, top + image_size))
        if train and flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if train and color_jitter:
            img = _jitter(img, rng, color_jitter)
        x = (np.asarray(img, np.float32) / np.float32(255) - mu) / sigma
        return {"image": x.astype(out_dtype, copy=False), "label": example["label"]}

    return transform


def image_batches(
    source: Any,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epochs: int | None = 1,
    shuffle: bool | None = None,
    drop_remainder: bool | None = None,
    shard: tuple[int, int] | None = None,
    num_threads: int | None = None,
    **transform_options: Any,
):
    """Batches of decoded, augmented, normalised images with ids: what :func:`flowjax.fit` takes as ``data``.

    ``flowjax.batches(source, batch_size, map_fn=image_transform(...),
    fields=["image", "label"])`` (see :func:`flowjax.batches` for the
    order, the sharding and the per-example generators): each epoch visits
    a permutation drawn from ``(seed, epoch)`` (training) or the record
    order (evaluation); process ``p`` of ``P`` reads its contiguous slice;
    example ``id``'s crop and flip in epoch ``e`` come from a generator
    keyed by ``(seed, id)`` with ``e`` in its counter. So batch ``k`` is the
    same on every restart, whatever the number of threads, and
    ``from_batch(k)`` (which :func:`flowjax.fit` calls on resume) yields
    batches ``k, k + 1, …`` without decoding the first ``k``.

    The FLOW code's pre-pass (τ and the weights) reads the training set once,
    in order, with the *training* augmentations: ``image_batches(train_source,
    B, train=True, shuffle=False, drop_remainder=False)``. Sources are read
    from the threads of one process; a :class:`VisionSource` is safe after a
    fork (each process reopens its tar file) but is not picklable.

    Args:
      source: a random-access source of ``{"id", "image", "label"}`` records,
        e.g. a :class:`flowjax.datasets.VisionSource` from one of the readers.
      batch_size: examples per batch on this process.
      train: training (shuffled, random crop and flip, last partial batch
        dropped) or evaluation (record order, centre crop, every example).
      seed: the seed of the order and of the augmentation.
      epochs: passes over the data, or ``None`` for endless.
      shuffle: override the order (default: ``train``).
      drop_remainder: override dropping each epoch's partial batch (default:
        ``train``, so every training step has one shape and every process
        the same number of steps; the official code keeps it, which changes
        at most ``batch_size - 1`` examples per epoch).
      shard: ``(process_index, process_count)``; default JAX's.
      num_threads: threads decoding batches ahead (default ``min(8, CPUs)``;
        0 or 1: decode in the caller's thread). Only the speed changes.
      **transform_options: :func:`image_transform`'s options (``image_size``,
        ``resize_size``, ``resize``, ``train_crop``, ``scale``, ``ratio``,
        ``flip``, ``color_jitter``, ``mean``, ``std``, ``dtype``:
        ``"float32"`` or ``"bfloat16"`` images).

    Returns:
      A re-iterable of ``{"id": int64 [b], "image": dtype [b, S, S, 3]
      (NHWC), "label": int64 [b]}`` batches with ``len()``,
      ``steps_per_epoch``, ``examples_per_epoch`` and ``from_batch(k)`` as
      :func:`flowjax.batches`' (and its ``cache_key``/``skip`` for the
      pre-pass).

    Raises:
      ValueError: bad transform options (see :func:`image_transform`) or
        batching options (see :func:`flowjax.batches`), or ``num_threads < 0``.
      TypeError: a source without ``len``/``[]``, or an unknown option.

    Example:
      >>> import numpy as np, flowjax
      >>> from flowjax.datasets import image_batches
      >>> rng = np.random.default_rng(0)
      >>> src = [{"id": i, "image": rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), "label": i % 2}
      ...        for i in range(10)]
      >>> data = image_batches(src, 4, train=True, image_size=16, epochs=2, shard=(0, 1))
      >>> len(data), next(iter(data))["image"].shape
      (4, (4, 16, 16, 3))
      >>> [b["id"].tolist() for b in data.from_batch(3)] == [b["id"].tolist() for b in data][3:]
      True
    """
    transform = image_transform(train=train, **transform_options)
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    if (
        isinstance(num_threads, bool)
        or not isinstance(num_threads, int)
        or num_threads < 0
    ):
        raise ValueError(f"num_threads must be an int >= 0; got {num_threads!r}.")
    inner = _data.batches(
        source,
        batch_size,
        shuffle=train if shuffle is None else shuffle,
        seed=seed,
        epochs=epochs,
        drop_remainder=train if drop_remainder is None else drop_remainder,
        map_fn=transform,
        fields=["image", "label"],
        id_key="id",
        shard=shard,
    )
    return _Threaded(inner, num_threads)


class _Threaded:
    """``flowjax.batches``' batches, batch ``k`` computed on a thread as ``next(from_batch(k))``."""

    def __init__(self, inner, num_threads: int):
        self._inner, self._threads = inner, num_threads
        self.steps_per_epoch = inner.steps_per_epoch
        self.examples_per_epoch = inner.examples_per_epoch
        self.skipped = inner.skipped

    def __len__(self) -> int:
        return len(self._inner)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.from_batch(0)

    def cache_key(self) -> str | None:
        """The inner batches' key (see :func:`flowjax.batches`)."""
        return self._inner.cache_key()

    def skip(self, ids) -> _Threaded:
        """The same batches without ``ids`` (see :func:`flowjax.batches`)."""
        return _Threaded(self._inner.skip(ids), self._threads)

    def from_batch(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches from batch index ``start`` on."""
        if self._threads <= 1:
            return self._inner.from_batch(start)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0; got {start!r}.")
        return self._ahead(start)

    def _one(self, k: int) -> dict[str, np.ndarray]:
        return next(iter(self._inner.from_batch(k)))

    def _ahead(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        total = None if self._inner._epochs is None else len(self._inner)
        with concurrent.futures.ThreadPoolExecutor(self._threads) as pool:
            pending: collections.deque = collections.deque()
            k = start
            try:
                while True:
                    while len(pending) < 2 * self._threads and (
                        total is None or k < total
                    ):
                        pending.append(pool.submit(self._one, k))
                        k += 1
                    if not pending:
                        return
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


def _jitter(img, rng: np.random.Generator, j: float):
    """Brightness, contrast, saturation by factors from U(1 - j, 1 + j), in a random order."""
    from PIL import ImageEnhance

    order = rng.permutation(3)
    factors = rng.uniform(1 - j, 1 + j, size=3)
    kinds = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in order:
        img = kinds[k](img).enhance(float(factors[k]))
    return img


def _decode(image):
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, bytes | bytearray | memoryview):
        try:
            img = Image.open(io.BytesIO(image))
            return img.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"an image could not be decoded: {e}") from e
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"images must be encoded bytes or uint8 [H, W, 3] arrays; got {arr.dtype}{list(arr.shape)}."
        )
    return Image.fromarray(arr, "RGB")


def _resized(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """The (width, height) of torchvision's ``Resize(size)`` or ``Resize((size, size))``."""
    if mode == "square":
        return size, size
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _check_range(pair, name: str, *, positive: bool) -> None:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair; got {pair!r}.") from None
    if not lo <= hi or (positive and lo <= 0) or lo < 0:
        raise ValueError(
            f"{name} must have 0 {'<' if positive else '<='} low <= high; got {pair!r}."
        )


def _channels(values, name: str) -> np.ndarray:
    arr = np.asarray(values, np.float32)
    if arr.shape != (3,) or not np.isfinite(arr).all():
        raise ValueError(
            f"{name} must be three finite numbers (R, G, B); got {values!r}."
        )
    return arr


def _dtype(name: str):
    if name == "float32":
        return np.float32
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    raise ValueError(f'dtype must be "float32" or "bfloat16"; got {name!r}.')
