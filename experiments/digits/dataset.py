"""scikit-learn's handwritten digits as a TFDS dataset in ``array_record`` files.

The data ships inside scikit-learn (``sklearn.datasets.load_digits``), so the
dataset builds offline and reads without TensorFlow: :class:`FlowjaxDigits` is
a ``tfds.core.GeneratorBasedBuilder`` written as ``array_record`` and read with
``builder.as_data_source(split)`` (random access, numpy records).

Records (one per image)::

    {"image": uint8 [8, 8, 1]  # pixel values 0..16, exactly sklearn's (not rescaled)
     "label": int64 []         # 0..9 (tfds.features.ClassLabel(num_classes=10))
     "id":    int64 []}        # the row of the image in load_digits(): 0..1796

Pixels are kept at sklearn's 0..16 scale: uint8 holds them exactly, so the
stored images equal ``load_digits().images`` bit for bit; divide by 16 (e.g.
in a ``map_fn`` of :func:`flowjax.batches`) to get [0, 1].

Splits, stratified 80/20 and fixed (:func:`split_ids`): for each class
``c = 0..9`` in turn, the ids of class ``c`` are permuted by
``numpy.random.default_rng(SPLIT_SEED = 0)`` (one generator shared by the ten
classes, drawn in class order) and the first ``round(0.2 * n_c)`` go to
``test``. That gives ``train`` 1,438 and ``test`` 359 records. Inside a split,
records are stored in increasing id order (``disable_shuffling``), so record
index ``i`` of a split holds its ``i``-th smallest id. A validation set is
carved from ``train`` by the experiment, not here.

Build (about a second; writes ~0.2 MB)::

    python -m experiments.digits.build_data --data_dir /tmp/flowjax_tfds
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

NAME = "flowjax_digits"
NUM_CLASSES = 10
NUM_EXAMPLES = 1797
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as ``(images uint8 [1797, 8, 8, 1] in 0..16, labels int64 [1797])``."""
    from sklearn.datasets import load_digits  # the experiments extra

    digits = load_digits()
    images = np.asarray(digits.images)
    if (
        images.min() < 0
        or images.max() > 16
        or not np.array_equal(images, np.round(images))
    ):
        raise ValueError("load_digits() no longer holds integer pixels in 0..16.")
    return images.astype(np.uint8)[..., None], np.asarray(digits.target, np.int64)


def split_ids(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed stratified 80/20 split of the ids (rows of ``load_digits()``).

    Args:
      labels: the class of every example, ``int [n]`` with values ``0..9``.

    Returns:
      ``{"train": ids, "test": ids}``, each sorted ascending, disjoint, together
      ``0..n-1``; ``test`` holds ``round(0.2 * n_c)`` ids of every class ``c``.

    Raises:
      ValueError: labels that are not a 1-D array of ints in ``0..9``.

    Example:
      >>> import numpy as np
      >>> s = split_ids(np.repeat(np.arange(10), 10))
      >>> len(s["train"]), len(s["test"])
      (80, 20)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a 1-D integer array; got {labels.dtype} {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}.")
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in range(NUM_CLASSES):
        ids = np.flatnonzero(labels == c)
        test.append(rng.permutation(ids)[: round(TEST_FRACTION * len(ids))])
    test = np.sort(np.concatenate(test)).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test)
    return {"train": train, "test": test}


class FlowjaxDigits(tfds.core.GeneratorBasedBuilder):
    """sklearn's 8×8 handwritten digits (1,797 images, 10 classes), offline and TF-free."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "sklearn load_digits, stratified 80/20 train/test, seed 0."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: Image encoding (PNG) needs TensorFlow.
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "id": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records stay in increasing id order
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        images, labels = _load_digits()
        return {
            split: self._generate_examples(images, labels, ids)
            for split, ids in split_ids(labels).items()
        }

    def _generate_examples(self, images, labels, ids):
        for i in ids.tolist():
            yield i, {"image": images[i], "label": int(labels[i]), "id": i}


def build(
    data_dir: str, *, quiet: bool = True
) -> dict[str, tfds.data_sources.ArrayRecordDataSource]:
    """Builds ``flowjax_digits`` into ``data_dir`` (offline) and returns its data sources.

    Building is skipped when ``data_dir`` already holds this version.

    Args:
      data_dir: the TFDS data directory (the dataset goes to
        ``data_dir/flowjax_digits/1.0.0``).
      quiet: hide TFDS's messages and progress bars (shown if building fails).

    Returns:
      ``{"train": source, "test": source}``: random-access TFDS data sources of
      numpy records, ready for :func:`flowjax.batches`.

    Raises:
      ValueError: if ``data_dir`` holds this dataset in a format other than
        ``array_record`` (it cannot be read without TensorFlow).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as data_dir:
      ...     sources = build(data_dir)
      ...     print(len(sources["train"]), len(sources["test"]), sorted(sources["test"][0]))
      1438 359 ['id', 'image', 'label']
    """
    builder = FlowjaxDigits(data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    if quiet:
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                builder.download_and_prepare(download_config=config)
        except BaseException:
            sys.stderr.write(log.getvalue())
            raise
    else:
        builder.download_and_prepare(download_config=config)
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"{builder.data_dir} holds {NAME} as {builder.info.file_format}, not array_record; "
            "delete it and build again."
        )
    return {split: builder.as_data_source(split) for split in ("train", "test")}
