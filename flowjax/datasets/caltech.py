"""Caltech-101 from the original ``101_ObjectCategories`` download (https://data.caltech.edu/records/mzrjq-6wc02)."""

from __future__ import annotations

import numpy as np

from flowjax.datasets import _files

__all__ = ["caltech101"]


def caltech101(
    root: str,
    split: str = "train",
    *,
    train_per_class: int = 30,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    val_seed: int = 0,
) -> _files.VisionSource:
    """Caltech-101 (102 classes: 101 objects and ``BACKGROUND_Google``; 9,144 images).

    Expected in ``root``: ``101_ObjectCategories.tar.gz`` (inside the
    ``caltech-101.zip`` of the download page: unzip it first) or the
    ``101_ObjectCategories/`` folder, with one sub-folder per class holding
    ``image_NNNN.jpg`` files.

    The split: the dataset has none, and the FLOW code's own split
    (an ImageFolder ``caltech101_processed/{train,test}``) was never
    published, only its 102 classes. This reader uses the standard Caltech-101
    protocol (Fei-Fei et al. 2004; also TFDS's ``caltech101``): per class,
    ``train_per_class`` = 30 images drawn with a seed for ``"train"``
    (3,060) and all the others for ``"test"`` (6,084), by
    :func:`flowjax.datasets.stratified_rows` with ``per_class`` (a class of
    ``n ≤ 30`` images keeps one for the test). Classes are the sorted folder
    names (ImageFolder's order, as the official code reads them), so
    ``BACKGROUND_Google`` is class 0; ids are the positions in the sorted
    ``(class, file name)`` list of all images, the same for every split.
    ``"val"`` and ``"train_minus_val"`` split ``"train"`` further (seeded,
    stratified ``val_fraction``) for choosing learning rates. Images are
    the JPEG bytes.

    Args:
      root: the directory holding the tarball or the folder.
      split: ``"train"``, ``"test"``, ``"val"`` or ``"train_minus_val"``.
      train_per_class: training images per class.
      split_seed: the seed of the train/test split.
      val_fraction: the fraction of each class of ``"train"`` held out as
        ``"val"``.
      val_seed: the seed of that split.

    Returns:
      A :class:`flowjax.datasets.VisionSource` in id order.

    Raises:
      FileNotFoundError: neither the tarball nor the folder is in ``root``.
      ValueError: an unknown split, ``train_per_class < 1``, a corrupt
        tarball, or no class folders with images.

    Example:
      >>> from flowjax import datasets
      >>> train = datasets.caltech101("~/data/caltech101")  # doctest: +SKIP
      >>> len(train), train.classes[:2]  # doctest: +SKIP
      (3060, ('BACKGROUND_Google', 'Faces'))
    """
    _files.check_split(split, "caltech101", val_fraction)
    if (
        isinstance(train_per_class, bool)
        or not isinstance(train_per_class, int)
        or train_per_class < 1
    ):
        raise ValueError(
            f"train_per_class must be an int >= 1; got {train_per_class!r}."
        )
    tree = _files.open_tree(
        root,
        "101_ObjectCategories",
        ["101_ObjectCategories.tar.gz", "101_ObjectCategories.tar"],
    )
    files = [
        n for n in tree.names() if n.count("/") == 1 and n.lower().endswith(".jpg")
    ]
    files.sort(key=lambda n: tuple(n.split("/")))
    if not files:
        raise ValueError(f"{tree.where} has no class folders of .jpg images.")
    folders = [n.split("/")[0] for n in files]
    classes = sorted(set(folders))
    labels = np.searchsorted(classes, folders).astype(np.int64)
    images = [tree.reader(n) for n in files]
    every = _files.VisionSource(
        "caltech101/all", np.arange(len(files)), labels, images, classes
    )
    train = np.zeros(len(files), bool)
    train[
        _files.stratified_rows(labels, seed=split_seed, per_class=train_per_class)
    ] = True
    if split == "test":
        return every.subset(np.flatnonzero(~train), "caltech101/test")
    source = every.subset(np.flatnonzero(train), "caltech101/train")
    if split == "train":
        return source
    return _files.carve(source, split, val_fraction, val_seed)
