"""Stanford Cars (Krause et al. 2013) from its original images and devkit annotations."""

from __future__ import annotations

import os

import numpy as np

from flowjax.datasets import _files

__all__ = ["stanford_cars"]


def stanford_cars(
    root: str, split: str = "train", *, val_fraction: float = 0.1, val_seed: int = 0
) -> _files.VisionSource:
    """Stanford Cars (196 classes; 8,144 train and 8,041 test images), the official split.

    Expected in ``root`` (the original release):

    * ``cars_train.tgz`` or ``cars_train/`` (``00001.jpg`` …), and
      ``cars_test.tgz`` or ``cars_test/``;
    * ``car_devkit.tgz`` or ``devkit/`` with ``cars_meta.mat``
      (``class_names``) and ``cars_train_annos.mat`` (``annotations``:
      ``fname`` and ``class``, 1 … 196, per training image);
    * ``cars_test_annos_withlabels.mat`` (released after the devkit, whose
      ``cars_test_annos.mat`` has no labels), in ``root`` or ``devkit/``.

    Or the same images as one set: ``car_ims.tgz`` (or ``car_ims/``) with
    ``cars_annos.mat`` (``annotations``: ``relative_im_path``, ``class`` and
    ``test``, 1 for the 8,041 test images; ``class_names``). It is used when
    ``cars_annos.mat`` is in ``root``; then the id is the image's position
    in ``cars_annos.mat`` (ids differ between the two layouts).

    The official code reads an ImageFolder copy (train/test by class name)
    of this same split, so only the class order differs: here the label is
    the devkit's ``class - 1`` and ``classes`` are ``cars_meta.mat``'s names.
    Ids: training image ``i`` of ``cars_train_annos.mat`` (0-based) has id
    ``i``, test image ``j`` has ``8144 + j`` (the number of training
    annotations, in general). ``"val"`` and ``"train_minus_val"`` split
    ``"train"`` (seeded, stratified ``val_fraction``) for choosing learning
    rates. Images are the JPEG bytes; bounding boxes are not used.

    Args:
      root: the directory holding the files.
      split: ``"train"``, ``"test"``, ``"val"`` or ``"train_minus_val"``.
      val_fraction: the fraction of each class held out as ``"val"``.
      val_seed: the seed of that split.

    Returns:
      A :class:`flowjax.datasets.VisionSource` in annotation order.

    Raises:
      FileNotFoundError: a missing archive, annotation file or image (named).
      ValueError: an unknown split, a corrupt archive or ``.mat`` file, an
        annotation file without ``fname``/``class``, or labels outside
        1 … 196.

    Example:
      >>> from flowjax import datasets
      >>> test = datasets.stanford_cars("~/data/stanford_cars", "test")  # doctest: +SKIP
      >>> len(test), test.num_classes, int(test[0]["id"])  # doctest: +SKIP
      (8041, 196, 8144)
    """
    _files.check_split(split, "stanford_cars", val_fraction)
    if os.path.isfile(
        os.path.join(os.path.expanduser(os.fspath(root)), "cars_annos.mat")
    ):
        return _files.carve(_one_set(root, split), split, val_fraction, val_seed)
    devkit = _files.open_tree(root, "devkit", ["car_devkit.tgz", "car_devkit.tar.gz"])
    meta = _files.loadmat(
        _files.find_file(root, ["cars_meta.mat"], [devkit]), "cars_meta.mat"
    )
    classes = [str(c) for c in _files.mat_field(meta, "class_names", "cars_meta.mat")]
    train_names, train_labels, _ = _annotations(
        _files.find_file(root, ["cars_train_annos.mat"], [devkit]),
        "cars_train_annos.mat",
    )
    if split == "test":
        names, labels, _ = _annotations(
            _files.find_file(root, ["cars_test_annos_withlabels.mat"], [devkit]),
            "cars_test_annos_withlabels.mat",
        )
        ids = len(train_names) + np.arange(len(names))
        folder = "cars_test"
    else:
        names, labels, ids, folder = (
            train_names,
            train_labels,
            np.arange(len(train_names)),
            "cars_train",
        )
    tree = _files.open_tree(
        root, folder, [f"{folder}.tgz", f"{folder}.tar.gz", f"{folder}.tar"]
    )
    images = [tree.reader(n) for n in names]
    base = "test" if split == "test" else "train"
    source = _files.VisionSource(
        f"stanford_cars/{base}", ids, labels - 1, images, classes
    )
    return _files.carve(source, split, val_fraction, val_seed)


def _one_set(root, split: str) -> _files.VisionSource:
    """The ``car_ims`` + ``cars_annos.mat`` layout."""
    data = _files.find_file(root, ["cars_annos.mat"])
    mat = _files.loadmat(data, "cars_annos.mat")
    classes = [str(c) for c in _files.mat_field(mat, "class_names", "cars_annos.mat")]
    names, labels, ann = _annotations(
        data, "cars_annos.mat", "relative_im_path", "test"
    )
    test = np.array([int(t) for t in ann["test"]]) == 1
    rows = np.flatnonzero(test if split == "test" else ~test)
    tree = _files.open_tree(
        root, "car_ims", ["car_ims.tgz", "car_ims.tar.gz", "car_ims.tar"]
    )
    prefix = "car_ims/"
    images = [
        tree.reader(
            names[r][len(prefix) :] if names[r].startswith(prefix) else names[r]
        )
        for r in rows
    ]
    base = "test" if split == "test" else "train"
    return _files.VisionSource(
        f"stanford_cars/{base}", rows, labels[rows] - 1, images, classes
    )


def _annotations(
    data: bytes, what: str, path: str = "fname", *extra: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    mat = _files.loadmat(data, what)
    ann = _files.mat_field(mat, "annotations", what)
    fields = ann.dtype.names or ()
    missing = [f for f in (path, "class", *extra) if f not in fields]
    if missing:
        hint = (
            " (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)"
            if "class" in missing
            else ""
        )
        raise ValueError(
            f"{what}: the annotations lack {missing} (they have {list(fields)}){hint}."
        )
    names = [str(n) for n in ann[path]]
    labels = np.array([int(c) for c in ann["class"]], np.int64)
    return names, labels, ann
