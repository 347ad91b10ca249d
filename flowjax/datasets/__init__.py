"""The paper's vision datasets, read from their original downloads, and the image pipeline.

No TensorFlow and no download: each reader takes the directory where the
user put the dataset's original files (named in its docstring) and returns a
:class:`VisionSource`, a random-access source whose record ``i`` is
``{"id": int64, "image": ..., "label": int64}`` with stable example ids and
the paper's splits (``"train"``, ``"test"``), plus ``"val"`` and
``"train_minus_val"`` (a seeded stratified split of ``"train"``, or the
dataset's own validation split) for choosing learning rates:

* :func:`cifar10`, :func:`cifar100`: the python-pickle tarballs;
* :func:`flowers102`: ``102flowers.tgz``, ``imagelabels.mat``, ``setid.mat``;
* :func:`caltech101`: ``101_ObjectCategories`` (30 training images per class);
* :func:`stanford_cars`: the images and the devkit's annotations;
* :func:`stanford_dogs`: ``images.tar`` and ``lists.tar``;
* :func:`imagenet_val`: the 50,000 validation images (for retention), in
  the layouts users have;
* :func:`metamathqa`: the LLM fine-tuning set, and :func:`sft_example`, the
  official code's prompt (:data:`ALPACA_TEMPLATE`), EOS and prompt masking.

:func:`image_batches` turns a source into batches of decoded, cropped,
flipped and ImageNet-normalised NHWC images (torchvision's
``RandomResizedCrop`` + flip for training, ``Resize(256)`` +
``CenterCrop(224)`` for evaluation), sharded over processes and seeded by
``(seed, epoch, id)``: what :func:`flowjax.fit` takes as ``data``, resumable
at any batch. :func:`image_transform` is its per-example transform, for
:func:`flowjax.batches` or grain.

This namespace needs the ``data`` extra (``pip install 'flowjax-ft[data]'``:
Pillow to decode, SciPy to read ``.mat`` files) and is not imported by
``import flowjax``::

    from flowjax import datasets
    train = datasets.flowers102("~/data/flowers102", "train")
    # the pre-pass: one ordered pass with the training augmentations (as the FLOW code)
    once = datasets.image_batches(train, 256, train=True, shuffle=False, drop_remainder=False)
    weights = flowjax.per_example_losses(loss_fn, lp_params, once).flow_weights()
    data = datasets.image_batches(train, 128, train=True, epochs=25)
    result = flowjax.fit(
        step, state,
        lambda k: (flowjax.attach_weights(b, weights) for b in data.from_batch(k)),
        num_steps=len(data), checkpoint_dir="/abs/ckpt",
    )
"""

from flowjax.datasets._files import VisionSource, stratified_rows
from flowjax.datasets.caltech import caltech101
from flowjax.datasets.cars import stanford_cars
from flowjax.datasets.cifar import cifar10, cifar100
from flowjax.datasets.dogs import stanford_dogs
from flowjax.datasets.flowers import flowers102
from flowjax.datasets.imagenet import imagenet_val
from flowjax.datasets.metamath import ALPACA_TEMPLATE, metamathqa, sft_example
from flowjax.datasets.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_box,
    image_batches,
    image_transform,
    random_resized_crop_box,
)

__all__ = [
    "ALPACA_TEMPLATE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VisionSource",
    "caltech101",
    "center_crop_box",
    "cifar10",
    "cifar100",
    "flowers102",
    "image_batches",
    "image_transform",
    "imagenet_val",
    "metamathqa",
    "random_resized_crop_box",
    "sft_example",
    "stanford_cars",
    "stanford_dogs",
    "stratified_rows",
]
