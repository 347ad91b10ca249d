"""CIFAR-10 and CIFAR-100 from the python-pickle tarballs of https://www.cs.toronto.edu/~kriz/cifar.html."""

from __future__ import annotations

import importlib
import io
import pickle

import numpy as np

from flowjax.datasets import _files

__all__ = ["cifar10", "cifar100"]

_TRAIN = 50_000  # test ids start here


def cifar10(
    root: str, split: str = "train", *, val_fraction: float = 0.1, val_seed: int = 0
) -> _files.VisionSource:
    """CIFAR-10 (10 classes, 50,000 train / 10,000 test 32×32 images) from its original download.

    Expected in ``root``: ``cifar-10-python.tar.gz`` or the folder it unpacks
    to, ``cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5``,
    ``test_batch`` and ``batches.meta`` (python pickles; only numpy arrays,
    lists and strings are unpickled, nothing executable).

    Splits (the paper's: the official train and test sets): ``"train"`` (ids
    0 … 49,999 in file order), ``"test"`` (ids 50,000 … 59,999), and for
    choosing learning rates ``"val"``, a seeded stratified ``val_fraction`` of
    ``"train"`` (:func:`flowjax.datasets.stratified_rows`), and
    ``"train_minus_val"``, the rest of ``"train"``. Images are decoded
    ``uint8 [32, 32, 3]`` (HWC, RGB).

    Args:
      root: the directory holding the tarball or its folder.
      split: ``"train"``, ``"test"``, ``"val"`` or ``"train_minus_val"``.
      val_fraction: the fraction of each class held out as ``"val"``.
      val_seed: the seed of that split.

    Returns:
      A :class:`flowjax.datasets.VisionSource` with ``classes`` from
      ``batches.meta`` (``"airplane"`` … ``"truck"``).

    Raises:
      FileNotFoundError: no tarball or folder in ``root``, or a missing batch
        file (named).
      ValueError: an unknown split, a corrupt tarball or pickle, or arrays of
        the wrong shape.

    Example:
      >>> from flowjax import datasets
      >>> train = datasets.cifar10("~/data/cifar10")  # doctest: +SKIP
      >>> len(train), train[0]["image"].shape, train.classes[int(train[0]["label"])]  # doctest: +SKIP
      (50000, (32, 32, 3), 'frog')
    """
    return _read(root, split, val_fraction, val_seed, 10)


def cifar100(
    root: str, split: str = "train", *, val_fraction: float = 0.1, val_seed: int = 0
) -> _files.VisionSource:
    """CIFAR-100 (100 fine classes, 50,000 train / 10,000 test) from its original download.

    Expected in ``root``: ``cifar-100-python.tar.gz`` or ``cifar-100-python/``
    with ``train``, ``test`` and ``meta``. Labels are the fine labels (the
    paper's 100 classes). Splits and ids as in :func:`cifar10`.

    Args:
      root: the directory holding ``cifar-100-python.tar.gz`` or its folder.
      split: as in :func:`cifar10`.
      val_fraction: the fraction of each fine class held out as ``"val"``.
      val_seed: the seed of the validation split.

    Returns:
      A :class:`flowjax.datasets.VisionSource`, ``classes`` the fine label
      names from ``meta``.

    Raises:
      FileNotFoundError: no tarball or folder in ``root``, or a missing file.
      ValueError: an unknown split, a corrupt tarball or pickle, or arrays of
        the wrong shape.

    Example:
      >>> from flowjax import datasets
      >>> test = datasets.cifar100("~/data/cifar100", "test")  # doctest: +SKIP
      >>> len(test), test.num_classes, int(test[0]["id"])  # doctest: +SKIP
      (10000, 100, 50000)
    """
    return _read(root, split, val_fraction, val_seed, 100)


def _read(root, split, val_fraction, val_seed, classes) -> _files.VisionSource:
    name = f"cifar{classes}"
    _files.check_split(split, name, val_fraction)
    if classes == 10:
        folder, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = (
            ["test_batch"],
            "batches.meta",
            b"labels",
            b"label_names",
        )
    else:
        folder, archive = "cifar-100-python", "cifar-100-python.tar.gz"
        train_files, test_files = ["train"], ["test"]
        meta_file, label_key, names_key = "meta", b"fine_labels", b"fine_label_names"
    tree = _files.open_tree(root, folder, [archive])
    meta = _unpickle(tree, meta_file)
    if names_key not in meta:
        raise ValueError(f"{meta_file} in {tree.where} has no {names_key!r} entry.")
    class_names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]
    ]
    is_test = split == "test"
    files = test_files if is_test else train_files
    images, labels = [], []
    for f in files:
        batch = _unpickle(tree, f)
        try:
            data, lab = (
                np.asarray(batch[b"data"]),
                np.asarray(batch[label_key], np.int64),
            )
        except KeyError as e:
            raise ValueError(
                f"{f} in {tree.where} has no {e.args[0]!r} entry."
            ) from None
        if (
            data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
            or len(lab) != len(data)
        ):
            raise ValueError(
                f"{f} in {tree.where}: data {data.dtype}{list(data.shape)} with {len(lab)} "
                "labels; expected uint8 [n, 3072] (3×32×32, channels first) and n labels."
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    images = np.ascontiguousarray(np.concatenate(images))
    images.setflags(write=False)
    labels = np.concatenate(labels)
    ids = np.arange(len(labels)) + (_TRAIN if is_test else 0)
    source = _files.VisionSource(
        f"{name}/{'test' if is_test else 'train'}", ids, labels, images, class_names
    )
    return _files.carve(source, split, val_fraction, val_seed)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if np.__version__[0] >= "2" else module
        return getattr(importlib.import_module(module), name)


def _unpickle(tree: _files.FileTree, name: str) -> dict:
    data = tree.read(name)
    try:
        out = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle raises many types
        raise ValueError(f"{name} in {tree.where} is not a CIFAR pickle: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{name} in {tree.where} is not a CIFAR pickle (not a dict).")
    return out
