"""The ImageNet-1K (ILSVRC 2012) validation set, for the retention metric."""

from __future__ import annotations

import csv
import io
import os
import re

import numpy as np

from flowjax.datasets import _files

__all__ = ["imagenet_val"]

_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")
_WNID = re.compile(r"n\d{8}$")


def imagenet_val(root: str) -> _files.VisionSource:
    """The 50,000 ImageNet-1K validation images with labels in the timm/torchvision class order.

    The label of an image is the index of its WordNet id (``n01440764`` …)
    in the sorted list of the 1,000 class ids: the order of torchvision's
    ``ImageNet``/``ImageFolder`` and of the timm and torchvision weights'
    heads. The id is the image number (``ILSVRC2012_val_00000001.JPEG`` has
    id 1). Images are the JPEG bytes. Accepted layouts, tried in this order:

    1. **Class folders** (after the usual ``valprep.sh``, or torchvision's
       ``ImageNet(split="val")``): ``root/val/<wnid>/ILSVRC2012_val_*.JPEG``.
       The classes are the sorted folder names (exactly the official code's
       ImageFolder), or, when ``root/LOC_synset_mapping.txt`` exists, its
       1,000 ids (so a copy missing a class still gets the right labels).
    2. **The flat images**, ``ILSVRC2012_img_val.tar`` or its extracted
       folder ``ILSVRC2012_img_val/`` (or Kaggle's
       ``ILSVRC/Data/CLS-LOC/val/``, or a flat ``val/``), with the labels
       from either

       * Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``;
         the first id of the prediction string is the class) and
         ``LOC_synset_mapping.txt`` (one ``wnid name`` per line), or
       * the ILSVRC 2012 devkit, ``ILSVRC2012_devkit_t12.tar.gz`` or its
         folder ``ILSVRC2012_devkit_t12/``, with
         ``data/ILSVRC2012_validation_ground_truth.txt`` (the devkit's
         class number of image ``k`` on line ``k``) and ``data/meta.mat``
         (``synsets``: each number's wnid).

    Args:
      root: the directory holding one of the layouts.

    Returns:
      A :class:`flowjax.datasets.VisionSource` named ``"imagenet/val"`` in
      image-number order; ``classes`` are the sorted wnids.

    Raises:
      FileNotFoundError: no image layout in ``root``, or flat images without
        a labels file (names the files tried).
      ValueError: a corrupt archive, image names not of the form
        ``ILSVRC2012_val_NNNNNNNN.JPEG``, an image without a label (named), or
        a malformed labels file.

    Example:
      >>> from flowjax import datasets
      >>> val = datasets.imagenet_val("~/data/imagenet")  # doctest: +SKIP
      >>> len(val), val.num_classes, int(val[0]["id"])  # doctest: +SKIP
      (50000, 1000, 1)
    """
    root = os.path.expanduser(os.fspath(root))
    mapping = os.path.join(root, "LOC_synset_mapping.txt")
    tree = _images(root)
    files = [n for n in tree.names() if n.upper().endswith(".JPEG")]
    if not files:
        raise ValueError(f"{tree.where} holds no .JPEG images.")
    nested = [n for n in files if "/" in n]
    if nested:
        folders = [n.split("/")[-2] for n in files]
        if os.path.isfile(mapping):
            classes = _mapping(mapping)
        else:
            classes = sorted(set(folders))
        by_number = {_number(n, tree): w for n, w in zip(files, folders, strict=True)}
    else:
        numbers = {_number(n, tree): n for n in files}
        classes, truth = _flat_labels(root)
        missing = sorted(set(numbers) - set(truth))
        if missing:
            raise ValueError(
                f"images {[numbers[k] for k in missing[:5]]} have no label in the labels file."
            )
        by_number = {k: truth[k] for k in numbers}
    index = {w: i for i, w in enumerate(classes)}
    unknown = sorted({w for w in by_number.values() if w not in index})
    if unknown:
        raise ValueError(
            f"class ids {unknown[:5]} are not among the {len(classes)} classes."
        )
    numbers = np.array(sorted(by_number), np.int64)
    path = {_number(n, tree): n for n in files}
    labels = np.array([index[by_number[k]] for k in numbers], np.int64)
    images = [tree.reader(path[k]) for k in numbers]
    return _files.VisionSource("imagenet/val", numbers, labels, images, classes)


def _images(root: str) -> _files.FileTree:
    for folder, archives in (
        ("val", []),
        ("ILSVRC2012_img_val", ["ILSVRC2012_img_val.tar"]),
        ("ILSVRC/Data/CLS-LOC/val", []),
    ):
        if os.path.isdir(os.path.join(root, folder)) or any(
            os.path.isfile(os.path.join(root, a)) for a in archives
        ):
            return _files.open_tree(root, folder, archives)
    raise FileNotFoundError(
        f"expected the validation images in {root!r} as 'val/' (class folders or flat), "
        "'ILSVRC2012_img_val.tar', 'ILSVRC2012_img_val/' or 'ILSVRC/Data/CLS-LOC/val/'; found none."
    )


def _number(name: str, tree: _files.FileTree) -> int:
    m = _NAME.search(name)
    if not m:
        raise ValueError(
            f"{name!r} in {tree.where} is not named ILSVRC2012_val_NNNNNNNN.JPEG: the id comes "
            "from the image number."
        )
    return int(m.group(1))


def _mapping(path: str) -> list[str]:
    with open(path) as f:
        wnids = [line.split(maxsplit=1)[0] for line in f if line.strip()]
    bad = [w for w in wnids if not _WNID.match(w)]
    if bad or not wnids:
        raise ValueError(
            f"{path!r}: lines must start with a WordNet id (n########); got {bad[:3]}."
        )
    return sorted(set(wnids))


def _flat_labels(root: str) -> tuple[list[str], dict[int, str]]:
    """The classes and image number -> wnid, from Kaggle's CSV or the devkit."""
    solution = os.path.join(root, "LOC_val_solution.csv")
    if os.path.isfile(solution):
        classes = _mapping(
            _require(root, "LOC_synset_mapping.txt", "beside LOC_val_solution.csv")
        )
        truth = {}
        with open(solution, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    number = _NAME.search(row["ImageId"] + ".JPEG").group(1)
                    truth[int(number)] = row["PredictionString"].split()[0]
                except (KeyError, AttributeError, IndexError):
                    raise ValueError(
                        f"{solution!r}: expected rows 'ILSVRC2012_val_NNNNNNNN,<wnid> ...' under "
                        f"the header ImageId,PredictionString; got {row}."
                    ) from None
        return classes, truth
    try:
        devkit = _files.open_tree(
            root, "ILSVRC2012_devkit_t12", ["ILSVRC2012_devkit_t12.tar.gz"]
        )
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the flat validation images in {root!r} need labels: 'LOC_val_solution.csv' with "
            "'LOC_synset_mapping.txt', or 'ILSVRC2012_devkit_t12.tar.gz' (or its folder "
            "'ILSVRC2012_devkit_t12/'); found none."
        ) from None
    meta = _files.loadmat(devkit.read("data/meta.mat"), "data/meta.mat")
    synsets = _files.mat_field(meta, "synsets", "data/meta.mat")
    try:
        wnid_of = {
            int(s["ILSVRC2012_ID"]): str(s["WNID"])
            for s in synsets
            if int(s["num_children"]) == 0
        }
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"data/meta.mat: synsets need ILSVRC2012_ID, WNID and num_children ({e})."
        ) from e
    text = devkit.read("data/ILSVRC2012_validation_ground_truth.txt").decode()
    try:
        numbers = [int(v) for v in io.StringIO(text).read().split()]
        truth = {k + 1: wnid_of[v] for k, v in enumerate(numbers)}
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"data/ILSVRC2012_validation_ground_truth.txt: each line must be a class number of "
            f"data/meta.mat ({e})."
        ) from None
    return sorted(wnid_of.values()), truth


def _require(root: str, name: str, why: str) -> str:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected {name!r} in {root!r} ({why}); not found.")
    return path
