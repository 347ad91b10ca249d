"""Stanford Dogs (Khosla et al. 2011) from http://vision.stanford.edu/aditya86/ImageNetDogs/."""

from __future__ import annotations

import os

import numpy as np

from flowjax.datasets import _files

__all__ = ["stanford_dogs"]


def stanford_dogs(
    root: str, split: str = "train", *, val_fraction: float = 0.1, val_seed: int = 0
) -> _files.VisionSource:
    """Stanford Dogs (120 breeds; 12,000 train and 8,580 test images), the official split.

    Expected in ``root``: ``images.tar`` (or the ``Images/`` folder it
    unpacks to, ``Images/n02085620-Chihuahua/n02085620_10074.jpg`` …) and
    ``lists.tar`` (or its extracted ``train_list.mat`` and ``test_list.mat``;
    each has ``file_list``, paths under ``Images/``, and ``labels``, 1 … 120).

    The split is the official one. The FLOW code instead draws a random
    80/20 split of all images from the global torch RNG, a different one in
    each of its scripts (`FLOW_PAPER.md`, section 6.2), so its numbers
    cannot be matched exactly; the official lists are the reproducible
    choice. Ids: the image at position ``i`` of ``train_list.mat`` has id
    ``i``, position ``j`` of ``test_list.mat`` has ``len(train) + j``.
    ``classes`` are the breed folder names (``"n02085620-Chihuahua"`` …)
    indexed by ``label - 1``. ``"val"`` and ``"train_minus_val"`` split
    ``"train"`` (seeded, stratified ``val_fraction``). Images are the JPEG
    bytes.

    Args:
      root: the directory holding ``images.tar`` (or ``Images/``) and the lists.
      split: ``"train"`` or ``"test"`` (the official lists), ``"val"`` or
        ``"train_minus_val"`` (parts of ``"train"``).
      val_fraction: the fraction of each breed held out as ``"val"``.
      val_seed: the seed of the validation split.

    Returns:
      A :class:`flowjax.datasets.VisionSource` in list order.

    Raises:
      FileNotFoundError: a missing archive, list or image (named).
      ValueError: an unknown split, a corrupt archive or ``.mat`` file, or a
        label shared by two breed folders.

    Example:
      >>> from flowjax import datasets
      >>> train = datasets.stanford_dogs("~/data/stanford_dogs")  # doctest: +SKIP
      >>> len(train), train.num_classes  # doctest: +SKIP
      (12000, 120)
    """
    _files.check_split(split, "stanford_dogs", val_fraction)
    root = os.path.expanduser(os.fspath(root))
    lists = []
    if os.path.isfile(os.path.join(root, "lists.tar")):
        lists.append(_files.open_tree(root, ".", ["lists.tar"]))
    train_files, train_labels = _list(root, "train_list.mat", lists)
    if split == "test":
        files, labels = _list(root, "test_list.mat", lists)
        ids = len(train_files) + np.arange(len(files))
    else:
        files, labels, ids = train_files, train_labels, np.arange(len(train_files))
    folder_of = {}
    for f, lab in zip(files, labels, strict=True):
        folder = f.split("/")[0]
        if folder_of.setdefault(int(lab), folder) != folder:
            raise ValueError(
                f"label {int(lab)} is given to two breed folders, {folder_of[int(lab)]!r} and {folder!r}."
            )
    n = max(120, *folder_of)
    classes = [folder_of.get(c, f"class {c}") for c in range(1, n + 1)]
    tree = _files.open_tree(root, "Images", ["images.tar"])
    images = [tree.reader(f) for f in files]
    base = "test" if split == "test" else "train"
    source = _files.VisionSource(
        f"stanford_dogs/{base}", ids, labels - 1, images, classes
    )
    return _files.carve(source, split, val_fraction, val_seed)


def _list(root: str, name: str, trees) -> tuple[list[str], np.ndarray]:
    mat = _files.loadmat(_files.find_file(root, [name], trees), name)
    files = [
        str(f).replace("\\", "/") for f in _files.mat_field(mat, "file_list", name)
    ]
    labels = _files.mat_field(mat, "labels", name).astype(np.int64)
    if len(files) != len(labels):
        raise ValueError(f"{name}: {len(files)} files but {len(labels)} labels.")
    return files, labels
