"""The readers' plumbing: file trees from folders or tarballs, the source class, the splits."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections.abc import Callable, Sequence

import numpy as np

_ID, _IMAGE, _LABEL = "id", "image", "label"


class FileTree:
    """The files under one folder, read from the folder itself or from a tarball of it.

    Names are ``/``-separated paths relative to the folder. A plain ``.tar`` is
    indexed once (member offsets) and read lazily with ``os.pread`` (thread-safe;
    the file is reopened after a fork); a compressed tarball (``.tgz``,
    ``.tar.gz``) cannot be read at random, so its members are read into memory
    in one pass (extract it to save the memory).
    """

    def __init__(self, where: str, members: dict[str, Callable[[], bytes]]):
        self.where = where
        self._members = members

    def names(self) -> list[str]:
        """Every file name, sorted."""
        return sorted(self._members)

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def reader(self, name: str) -> Callable[[], bytes]:
        """A function returning the bytes of ``name``."""
        try:
            return self._members[name]
        except KeyError:
            raise FileNotFoundError(
                f"{name!r} is not in {self.where} (it holds {len(self._members)} files)."
            ) from None

    def read(self, name: str) -> bytes:
        """The bytes of ``name``."""
        return self.reader(name)()


def open_tree(root: str, folder: str, archives: Sequence[str]) -> FileTree:
    """``root/folder`` as a :class:`FileTree`, or the first of ``root/archives`` that exists.

    Args:
      root: the directory the user downloaded into.
      folder: the folder the archive unpacks to (``"."``: members at the top of
        the archive; then only the archives are looked for).
      archives: file names of tarballs holding ``folder/...`` (members may also
        sit at the top of the tarball, without the ``folder/`` prefix).

    Raises:
      FileNotFoundError: neither the folder nor any archive exists (names both).
      ValueError: an archive that is not a readable tarball.
    """
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"the data directory {root!r} does not exist.")
    base = os.path.normpath(os.path.join(root, folder))
    if folder not in ("", ".") and os.path.isdir(base):
        return _folder_tree(base)
    for name in archives:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return _tar_tree(path, folder)
    wanted = " or ".join([repr(f"{folder}/"), *map(repr, archives)])
    raise FileNotFoundError(f"expected {wanted} in {root!r}; found none of them.")


def find_file(root: str, names: Sequence[str], trees: Sequence[FileTree] = ()) -> bytes:
    """The bytes of the first of ``names`` found in ``root`` or in one of ``trees``."""
    root = os.path.expanduser(os.fspath(root))
    for name in names:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        for tree in trees:
            if name in tree:
                return tree.read(name)
    where = [repr(root), *(t.where for t in trees)]
    raise FileNotFoundError(
        f"expected {' or '.join(map(repr, names))} in {', '.join(where)}; not found."
    )


def _folder_tree(base: str) -> FileTree:
    members = {}
    for dirpath, _, files in os.walk(base):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            members[rel] = _file_reader(path)
    return FileTree(repr(base), members)


def _file_reader(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return read


def _tar_tree(path: str, folder: str) -> FileTree:
    prefix = "" if folder in ("", ".") else folder.strip("/") + "/"
    try:
        with tarfile.open(path, "r:") as tar:  # plain tar: index, read lazily
            infos = [m for m in tar if m.isfile()]
        compressed = False
    except tarfile.ReadError:
        compressed = True
    members: dict[str, Callable[[], bytes]] = {}
    try:
        if not compressed:
            handle = _Pread(path)
            for m in infos:
                members[_strip(m.name, prefix)] = handle.reader(m.offset_data, m.size)
        else:
            with tarfile.open(path, "r:*") as tar:
                for m in tar:
                    if m.isfile():
                        data = tar.extractfile(m).read()
                        members[_strip(m.name, prefix)] = _bytes_reader(data)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path!r} is not a readable tarball: {e}") from e
    if not members:
        raise ValueError(f"{path!r} is not a readable tarball: it holds no files.")
    return FileTree(repr(path), members)


def _strip(name: str, prefix: str) -> str:
    name = name[2:] if name.startswith("./") else name
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _bytes_reader(data: bytes) -> Callable[[], bytes]:
    return lambda: data


class _Pread:
    """One read-only file descriptor per process; ``os.pread`` itself needs no lock."""

    def __init__(self, path: str):
        self.path, self._fd, self._pid = path, None, None
        self._lock = threading.Lock()

    def reader(self, offset: int, size: int) -> Callable[[], bytes]:
        return lambda: self.read(offset, size)

    def _descriptor(self) -> int:
        with self._lock:  # (re)open once per process, e.g. after a fork
            if self._pid != os.getpid():
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
            return self._fd

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._descriptor(), size, offset)
        if len(data) != size:
            raise ValueError(
                f"{self.path!r} is truncated at byte {offset + len(data)}."
            )
        return data

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


class VisionSource:
    """A random-access image-classification source: ``source[i]`` is ``{"id", "image", "label"}``.

    ``"id"`` is the example's stable integer id (the same in every split it
    belongs to, and across runs), ``"label"`` an int64 class index into
    ``classes``, ``"image"`` the image as stored: the encoded file's bytes
    (JPEG datasets: decoded by the pipeline, so that a 50,000-image set costs
    its file size in memory, not its pixels) or, for CIFAR, the decoded
    ``uint8 [32, 32, 3]`` pixels the pickle already holds. It is a valid
    :func:`flowjax.batches` and grain source.

    Attributes:
      name: the dataset and split, e.g. ``"cifar10/train"``.
      ids: int64 ``[n]``, the example ids in record order (read-only).
      labels: int64 ``[n]``, the labels in record order (read-only).
      classes: the class names, ``classes[label]``.
    """

    def __init__(
        self,
        name: str,
        ids: np.ndarray,
        labels: np.ndarray,
        images: np.ndarray | Sequence[Callable[[], bytes]],
        classes: Sequence[str],
    ):
        ids = np.asarray(ids, np.int64)
        labels = np.asarray(labels, np.int64)
        if not (len(ids) == len(labels) == len(images)) or not len(ids):
            raise ValueError(
                f"{name}: {len(ids)} ids, {len(labels)} labels and {len(images)} images; "
                "need the same, non-zero number."
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{name}: duplicate example ids.")
        bad = (labels < 0) | (labels >= len(classes))
        if bad.any():
            raise ValueError(
                f"{name}: labels {labels[bad][:5].tolist()} (ids {ids[bad][:5].tolist()}) are "
                f"outside 0..{len(classes) - 1}."
            )
        for a in (ids, labels):
            a.setflags(write=False)
        self.name, self.ids, self.labels = name, ids, labels
        self.classes = tuple(classes)
        self._images = images

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"record index {i} out of range for {len(self)} records.")
        image = self._images[i]
        if callable(image):
            image = image()
        return {_ID: self.ids[i], _IMAGE: image, _LABEL: self.labels[i]}

    def subset(self, rows: np.ndarray, name: str) -> VisionSource:
        """The records ``rows`` (record indices, in that order) as a new source."""
        rows = np.asarray(rows, np.int64)
        images = self._images
        taken = (
            images[rows]
            if isinstance(images, np.ndarray)
            else [images[r] for r in rows]
        )
        return VisionSource(
            name, self.ids[rows], self.labels[rows], taken, self.classes
        )

    def __repr__(self) -> str:
        return f"VisionSource({self.name!r}, n={len(self)}, classes={self.num_classes})"


def stratified_rows(
    labels: np.ndarray,
    *,
    seed: int,
    fraction: float | None = None,
    per_class: int | None = None,
) -> np.ndarray:
    """A seeded stratified sample of record indices: the readers' validation (and Caltech) splits.

    Class ``c``'s :math:`n_c` records (in record order) are permuted by
    ``numpy.random.default_rng([seed, c])`` and the first :math:`k_c` taken:
    :math:`k_c = \\min(\\text{per\\_class}, n_c - 1)` (each class keeps one
    record outside the sample), or with ``fraction``
    :math:`k_c = \\max(1, \\mathrm{round}(\\text{fraction} \\cdot n_c))`
    (0 if :math:`n_c = 1`). A class's draw depends only on ``seed``, ``c``
    and its own records, so the sample is identical on every machine.

    Args:
      labels: int ``[n]``, the class of each record.
      seed: a non-negative int.
      fraction: the fraction of each class to take, in (0, 1); or
      per_class: the number of records of each class to take (exactly one
        of the two).

    Returns:
      The sorted record indices of the sample (int64).

    Raises:
      ValueError: neither or both of ``fraction`` and ``per_class``, a
        fraction outside (0, 1), ``per_class < 1``, or labels that are not
        1-D integers.

    Example:
      >>> import numpy as np
      >>> from flowjax.datasets import stratified_rows
      >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
      >>> rows = stratified_rows(labels, seed=0, fraction=0.5)
      >>> len(rows), np.bincount(labels[rows]).tolist()
      (5, [2, 3])
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be 1-D integers; got {labels.dtype}{list(labels.shape)}."
        )
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction and per_class.")
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1); got {fraction!r}.")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1; got {per_class!r}.")
    out = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        perm = np.random.default_rng([seed, int(c)]).permutation(len(rows))
        if per_class is not None:
            k = min(per_class, len(rows) - 1)
        else:
            k = max(1, round(fraction * len(rows))) if len(rows) > 1 else 0
        out.append(rows[perm[:k]])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


SPLITS = ("train", "test", "val", "train_minus_val")


def check_split(split: str, name: str, val_fraction: float) -> None:
    """Raises ValueError for an unknown split or a bad validation fraction."""
    if split not in SPLITS:
        raise ValueError(f"{name} has splits {list(SPLITS)}; got split={split!r}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}.")


def carve(
    source: VisionSource, split: str, val_fraction: float, val_seed: int
) -> VisionSource:
    """``"val"`` or ``"train_minus_val"`` of a training source (a seeded stratified split).

    Any other split returns ``source`` itself.
    """
    if split not in ("val", "train_minus_val"):
        return source
    val = np.zeros(len(source), bool)
    val[stratified_rows(source.labels, seed=val_seed, fraction=val_fraction)] = True
    rows = np.flatnonzero(val if split == "val" else ~val)
    return source.subset(rows, source.name.rsplit("/", 1)[0] + "/" + split)


def loadmat(data: bytes, what: str) -> dict:
    """A MATLAB file's variables (scipy.io.loadmat), or a ValueError naming ``what``."""
    import scipy.io

    try:
        return scipy.io.loadmat(
            io.BytesIO(data), squeeze_me=True, struct_as_record=True
        )
    except Exception as e:  # scipy raises several types for a bad file
        raise ValueError(f"{what} is not a readable MATLAB file: {e}") from e


def mat_field(mat: dict, key: str, what: str) -> np.ndarray:
    """``mat[key]`` as a 1-D array, or a ValueError naming the missing variable."""
    if key not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{what} has no variable {key!r} (it has {names}).")
    return np.atleast_1d(mat[key])
