"""Oxford Flowers-102 from the files of https://www.robots.ox.ac.uk/~vgg/data/flowers/102/."""

from __future__ import annotations

import numpy as np

from flowjax.datasets import _files

__all__ = ["flowers102"]


def flowers102(root: str, split: str = "train") -> _files.VisionSource:
    """Oxford Flowers-102 (102 classes, 8,189 images) with the paper's splits.

    Expected in ``root``: ``102flowers.tgz`` (or the ``jpg/`` folder it
    unpacks to, ``jpg/image_00001.jpg`` … ``jpg/image_08189.jpg``),
    ``imagelabels.mat`` (``labels``: the class 1 … 102 of image ``k`` at
    position ``k - 1``) and ``setid.mat`` (``trnid``, ``valid``, ``tstid``:
    1-based image numbers).

    Splits: ``"train"`` is ``trnid`` ∪ ``valid`` (2,040 images: the official
    code trains on the concatenation), ``"test"`` is ``tstid`` (6,149). For
    choosing learning rates the official split is used: ``"val"`` is
    ``valid`` and ``"train_minus_val"`` is ``trnid`` (1,020 each). The id is
    the image number ``k``; the label is the class minus one; ``classes``
    are the official class numbers ``"1"`` … ``"102"`` (the download has no
    names). Images are the JPEG bytes.

    Args:
      root: the directory holding the three files.
      split: ``"train"``, ``"test"``, ``"val"`` or ``"train_minus_val"``.

    Returns:
      A :class:`flowjax.datasets.VisionSource`, records in image-number order.

    Raises:
      FileNotFoundError: a missing file (named), or an image that ``setid.mat``
        lists but the archive lacks.
      ValueError: an unknown split, a corrupt archive or ``.mat`` file, or
        labels outside 1 … 102.

    Example:
      >>> from flowjax import datasets
      >>> train = datasets.flowers102("~/data/flowers102")  # doctest: +SKIP
      >>> len(train), train.num_classes  # doctest: +SKIP
      (2040, 102)
    """
    _files.check_split(split, "flowers102", 0.5)
    labels_mat = _files.loadmat(
        _files.find_file(root, ["imagelabels.mat"]), "imagelabels.mat"
    )
    labels = _files.mat_field(labels_mat, "labels", "imagelabels.mat").astype(np.int64)
    sets = _files.loadmat(_files.find_file(root, ["setid.mat"]), "setid.mat")
    parts = {
        k: _files.mat_field(sets, k, "setid.mat").astype(np.int64)
        for k in ("trnid", "valid", "tstid")
    }
    chosen = {
        "train": np.concatenate([parts["trnid"], parts["valid"]]),
        "test": parts["tstid"],
        "val": parts["valid"],
        "train_minus_val": parts["trnid"],
    }[split]
    numbers = np.sort(chosen)
    if numbers.min() < 1 or numbers.max() > len(labels):
        raise ValueError(
            f"setid.mat lists images outside 1..{len(labels)} (the images imagelabels.mat labels)."
        )
    tree = _files.open_tree(root, "jpg", ["102flowers.tgz"])
    images = [tree.reader(f"image_{k:05d}.jpg") for k in numbers]
    label = labels[numbers - 1] - 1
    classes = [str(c) for c in range(1, 103)]
    return _files.VisionSource(f"flowers102/{split}", numbers, label, images, classes)
