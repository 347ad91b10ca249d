"""flowjax.datasets' readers on tiny copies of each original download, fabricated in its real layout.

Every archive is written here in the real format (python pickles in a
``.tar.gz``, MATLAB files through ``scipy.io.savemat``, plain and gzipped
tarballs, JPEGs written by PIL), with known contents; the readers must give
back exactly those images, labels, ids and splits.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from flowjax import datasets

# ----------------------------------------------------------------------------- writers


def _jpeg(seed: int, size=(12, 10)) -> bytes:
    """A small JPEG with pixels drawn from ``seed`` (width, height = size)."""
    pixels = np.random.default_rng(seed).integers(
        0, 256, (size[1], size[0], 3), dtype=np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _mat(variables: dict) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables)
    return buf.getvalue()


def _cells(strings) -> np.ndarray:
    """A MATLAB cell column of strings, as the datasets' .mat files hold them."""
    return np.array(list(strings), dtype=object)[:, None]


def _tar(path, files: dict[str, bytes], mode="w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write(folder, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


# ----------------------------------------------------------------------------- CIFAR


def _cifar_files(classes: int, per_file: int, rng) -> tuple[dict[str, bytes], dict]:
    if classes == 10:
        train, test = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta = {"batches.meta": {b"label_names": [f"c{i}".encode() for i in range(10)]}}
        key = b"labels"
    else:
        train, test = ["train"], ["test"]
        meta = {"meta": {b"fine_label_names": [f"f{i}".encode() for i in range(100)]}}
        key = b"fine_labels"
    contents = {}
    for name in [*train, *test]:
        n = per_file * (5 if classes == 100 and name == "train" else 1)
        contents[name] = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, n).tolist(),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
    contents.update(meta)
    return {k: pickle.dumps(v, protocol=2) for k, v in contents.items()}, contents


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("packed", [True, False])
def test_cifar_gives_the_pickled_pixels_hwc_with_labels_ids_and_splits(
    tmp_path, classes, packed
):
    files, contents = _cifar_files(classes, 8, np.random.default_rng(classes))
    folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    if packed:
        archive = f"cifar-{classes}-python.tar.gz"
        _tar(tmp_path / archive, {f"{folder}/{k}": v for k, v in files.items()}, "w:gz")
    else:
        _write(tmp_path / folder, files)
    read = datasets.cifar10 if classes == 10 else datasets.cifar100
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]

    train = read(tmp_path)
    want = np.concatenate([contents[n][b"data"] for n in names])
    want_hwc = want.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert len(train) == 40 and train.num_classes == classes
    assert train.classes[3] == ("c3" if classes == 10 else "f3")
    np.testing.assert_array_equal(train.ids, np.arange(40))
    np.testing.assert_array_equal(
        train.labels, np.concatenate([contents[n][key] for n in names])
    )
    record = train[17]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
    # pixel (row 5, column 7) of channel c is byte c·1024 + 5·32 + 7 of the row-major record
    assert record["image"][5, 7].tolist() == [
        want[17, c * 1024 + 5 * 32 + 7] for c in range(3)
    ]
    np.testing.assert_array_equal(record["image"], want_hwc[17])
    assert int(record["id"]) == 17 and int(record["label"]) == train.labels[17]

    test_name = "test_batch" if classes == 10 else "test"
    test = read(tmp_path, "test")
    np.testing.assert_array_equal(test.ids, 50_000 + np.arange(8))
    np.testing.assert_array_equal(
        test[2]["image"].transpose(2, 0, 1).reshape(-1), contents[test_name][b"data"][2]
    )

    val, rest = (
        read(tmp_path, "val", val_fraction=0.25),
        read(tmp_path, "train_minus_val", val_fraction=0.25),
    )
    assert not set(val.ids) & set(rest.ids) and set(val.ids) | set(rest.ids) == set(
        train.ids
    )
    for c in np.unique(
        train.labels
    ):  # stratified: each class split as round(n_c / 4), at least 1
        n_c = int((train.labels == c).sum())
        assert int((val.labels == c).sum()) == (
            max(1, round(n_c / 4)) if n_c > 1 else 0
        )
    for r in (
        val[0],
        rest[3],
    ):  # the records keep their training ids, images and labels
        i = int(r["id"])
        np.testing.assert_array_equal(r["image"], train[i]["image"])
        assert int(r["label"]) == train.labels[i]
    np.testing.assert_array_equal(read(tmp_path, "val", val_fraction=0.25).ids, val.ids)
    assert not np.array_equal(
        read(tmp_path, "val", val_fraction=0.25, val_seed=1).ids, val.ids
    )


def test_cifar_errors_name_the_missing_file_and_refuse_bad_pickles(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"cifar-10-batches-py/.*cifar-10-python\.tar\.gz"
    ):
        datasets.cifar10(tmp_path)
    files, _ = _cifar_files(10, 2, np.random.default_rng(0))
    del files["data_batch_3"]
    _write(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        datasets.cifar10(tmp_path)
    _write(
        tmp_path / "cifar-10-batches-py",
        {"data_batch_3": pickle.dumps(os.system, protocol=2)},
    )
    with pytest.raises(ValueError, match=r"data_batch_3.*refusing to unpickle"):
        datasets.cifar10(tmp_path)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    _write(tmp_path / "cifar-10-batches-py", {"data_batch_3": pickle.dumps(bad)})
    with pytest.raises(ValueError, match=r"data_batch_3.*uint8 \[n, 3072\]"):
        datasets.cifar10(tmp_path)
    with pytest.raises(ValueError, match="split"):
        datasets.cifar10(tmp_path, "validation")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cifar-10-python.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(ValueError, match="not a readable tarball"):
        datasets.cifar10(tmp_path / "other")


# ----------------------------------------------------------------------------- Flowers-102


def test_flowers102_reads_the_tgz_and_the_mat_files_with_the_papers_splits(tmp_path):
    n = 12
    jpegs = {f"jpg/image_{k:05d}.jpg": _jpeg(k) for k in range(1, n + 1)}
    _tar(tmp_path / "102flowers.tgz", jpegs, "w:gz")
    labels = np.array([5, 5, 1, 102, 7, 7, 1, 5, 102, 3, 3, 1])
    (tmp_path / "imagelabels.mat").write_bytes(_mat({"labels": labels[None, :]}))
    sets = {
        "trnid": [[1, 4, 7]],
        "valid": [[2, 9, 12]],
        "tstid": [[3, 5, 6, 8, 10, 11]],
    }
    (tmp_path / "setid.mat").write_bytes(
        _mat({k: np.array(v) for k, v in sets.items()})
    )

    train = datasets.flowers102(tmp_path)
    np.testing.assert_array_equal(
        train.ids, [1, 2, 4, 7, 9, 12]
    )  # trnid + valid, by image number
    np.testing.assert_array_equal(train.labels, labels[[0, 1, 3, 6, 8, 11]] - 1)
    assert train.num_classes == 102 and train.classes[101] == "102"
    assert (
        train[2]["image"] == jpegs["jpg/image_00004.jpg"]
    )  # the file's bytes, as stored
    np.testing.assert_array_equal(
        datasets.flowers102(tmp_path, "test").ids, sets["tstid"][0]
    )
    np.testing.assert_array_equal(
        datasets.flowers102(tmp_path, "val").ids, sets["valid"][0]
    )
    np.testing.assert_array_equal(
        datasets.flowers102(tmp_path, "train_minus_val").ids, sets["trnid"][0]
    )

    (tmp_path / "setid.mat").write_bytes(
        _mat({"trnid": [[1, 13]], "valid": [[2]], "tstid": [[3]]})
    )
    with pytest.raises(ValueError, match=r"outside 1\.\.12"):
        datasets.flowers102(tmp_path)
    (tmp_path / "setid.mat").write_bytes(_mat({"trnid": [[1]], "tstid": [[3]]}))
    with pytest.raises(ValueError, match=r"setid\.mat has no variable 'valid'"):
        datasets.flowers102(tmp_path)
    (tmp_path / "setid.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(ValueError, match=r"setid\.mat is not a readable MATLAB file"):
        datasets.flowers102(tmp_path)
    os.remove(tmp_path / "imagelabels.mat")
    with pytest.raises(FileNotFoundError, match=r"imagelabels\.mat"):
        datasets.flowers102(tmp_path)


def test_flowers102_names_an_image_the_archive_lacks(tmp_path):
    _tar(tmp_path / "102flowers.tgz", {"jpg/image_00001.jpg": _jpeg(1)}, "w:gz")
    (tmp_path / "imagelabels.mat").write_bytes(_mat({"labels": np.array([[1, 2]])}))
    (tmp_path / "setid.mat").write_bytes(
        _mat({"trnid": [[1]], "valid": [[2]], "tstid": [[1]]})
    )
    with pytest.raises(FileNotFoundError, match=r"image_00002\.jpg"):
        datasets.flowers102(tmp_path)


# ----------------------------------------------------------------------------- Caltech-101


_CALTECH = {"accordion": 5, "BACKGROUND_Google": 4, "Faces": 3, "Faces_easy": 6}


def _caltech_files():
    return {
        f"101_ObjectCategories/{c}/image_{k:04d}.jpg": _jpeg(100 * i + k)
        for i, (c, n) in enumerate(_CALTECH.items())
        for k in range(1, n + 1)
    }


@pytest.mark.parametrize("packed", [True, False])
def test_caltech101_splits_a_seeded_fixed_number_per_class(tmp_path, packed):
    files = _caltech_files()
    if packed:
        _tar(tmp_path / "101_ObjectCategories.tar.gz", files, "w:gz")
    else:
        _write(tmp_path, files)
    train = datasets.caltech101(tmp_path, train_per_class=3)
    test = datasets.caltech101(tmp_path, "test", train_per_class=3)
    assert train.classes == ("BACKGROUND_Google", "Faces", "Faces_easy", "accordion")
    ordered = sorted(
        files, key=lambda n: tuple(n.split("/"))
    )  # ids: sorted (class, file)
    # 3 per class for training, but a class of 3 keeps one for the test
    assert np.bincount(train.labels).tolist() == [3, 2, 3, 3]
    assert np.bincount(test.labels).tolist() == [1, 1, 3, 2]
    assert set(train.ids).isdisjoint(test.ids) and len(train) + len(test) == len(files)
    for source in (train, test):
        for r in (source[0], source[len(source) - 1]):
            name = ordered[int(r["id"])]
            assert r["image"] == files[name]
            assert source.classes[int(r["label"])] == name.split("/")[1]
    again = datasets.caltech101(tmp_path, train_per_class=3)
    np.testing.assert_array_equal(again.ids, train.ids)
    other = datasets.caltech101(tmp_path, train_per_class=3, split_seed=5)
    assert not np.array_equal(other.ids, train.ids)
    val = datasets.caltech101(tmp_path, "val", train_per_class=3, val_fraction=0.3)
    rest = datasets.caltech101(
        tmp_path, "train_minus_val", train_per_class=3, val_fraction=0.3
    )
    assert sorted([*val.ids, *rest.ids]) == sorted(train.ids) and len(val) == 4
    with pytest.raises(ValueError, match="train_per_class"):
        datasets.caltech101(tmp_path, train_per_class=0)


def test_caltech101_missing_download_names_both_forms(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"'101_ObjectCategories/' or '101_ObjectCategories\.tar\.gz'",
    ):
        datasets.caltech101(tmp_path)
    _tar(
        tmp_path / "101_ObjectCategories.tar.gz",
        {"101_ObjectCategories/README": b"x"},
        "w:gz",
    )
    with pytest.raises(ValueError, match="no class folders"):
        datasets.caltech101(tmp_path)


# ----------------------------------------------------------------------------- Stanford Cars


def _cars_annotations(names, classes, with_labels=True) -> bytes:
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O")]
    fields += [("class", "O")] if with_labels else []
    fields += [("fname", "O")]
    ann = np.zeros((1, len(names)), dtype=fields)
    for i, (name, c) in enumerate(zip(names, classes, strict=True)):
        box = [np.array([[v]], np.uint16) for v in (1, 2, 9, 8)]
        ann[0, i] = (
            *box,
            *([np.array([[c]], np.uint8)] if with_labels else []),
            np.array([name]),
        )
    return _mat({"annotations": ann})


def test_stanford_cars_reads_the_devkit_and_the_image_tarballs(tmp_path):
    train_names = [f"{k:05d}.jpg" for k in range(1, 7)]
    test_names = [f"{k:05d}.jpg" for k in range(1, 5)]
    train_classes, test_classes = [3, 1, 196, 3, 2, 1], [196, 2, 2, 1]
    train_jpegs = {f"cars_train/{n}": _jpeg(k) for k, n in enumerate(train_names)}
    test_jpegs = {f"cars_test/{n}": _jpeg(50 + k) for k, n in enumerate(test_names)}
    _tar(tmp_path / "cars_train.tgz", train_jpegs, "w:gz")
    _write(tmp_path, test_jpegs)  # one extracted, one packed
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)[None, :]
    devkit = {
        "devkit/cars_meta.mat": _mat({"class_names": names}),
        "devkit/cars_train_annos.mat": _cars_annotations(train_names, train_classes),
        "devkit/cars_test_annos.mat": _cars_annotations(
            test_names, test_classes, with_labels=False
        ),
    }
    _tar(tmp_path / "car_devkit.tgz", devkit, "w:gz")
    with pytest.raises(FileNotFoundError, match=r"cars_test_annos_withlabels\.mat"):
        datasets.stanford_cars(tmp_path, "test")
    (tmp_path / "cars_test_annos_withlabels.mat").write_bytes(
        _cars_annotations(test_names, test_classes)
    )

    train = datasets.stanford_cars(tmp_path)
    np.testing.assert_array_equal(train.ids, np.arange(6))
    np.testing.assert_array_equal(train.labels, np.array(train_classes) - 1)
    assert train.num_classes == 196 and train.classes[195] == "Car 196"
    assert train[4]["image"] == train_jpegs["cars_train/00005.jpg"]
    test = datasets.stanford_cars(tmp_path, "test")
    np.testing.assert_array_equal(test.ids, 6 + np.arange(4))
    np.testing.assert_array_equal(test.labels, np.array(test_classes) - 1)
    assert test[1]["image"] == test_jpegs["cars_test/00002.jpg"]
    val = datasets.stanford_cars(tmp_path, "val", val_fraction=0.5)
    rest = datasets.stanford_cars(tmp_path, "train_minus_val", val_fraction=0.5)
    assert sorted([*val.ids, *rest.ids]) == list(range(6))
    np.testing.assert_array_equal(
        np.sort(val.labels), [0, 2]
    )  # one of each class with two

    (tmp_path / "cars_test_annos_withlabels.mat").write_bytes(
        _cars_annotations(test_names, test_classes, with_labels=False)
    )
    with pytest.raises(ValueError, match=r"lack \['class'\].*withlabels"):
        datasets.stanford_cars(tmp_path, "test")
    os.remove(tmp_path / "cars_train.tgz")
    with pytest.raises(FileNotFoundError, match=r"cars_train\.tgz"):
        datasets.stanford_cars(tmp_path)


def test_stanford_cars_reads_the_one_set_layout_car_ims_and_cars_annos(tmp_path):
    paths = [f"car_ims/{k:06d}.jpg" for k in range(1, 8)]
    classes, is_test = [2, 2, 1, 196, 1, 2, 196], [0, 1, 0, 0, 1, 0, 1]
    jpegs = {p: _jpeg(k) for k, p in enumerate(paths)}
    _tar(tmp_path / "car_ims.tgz", jpegs, "w:gz")
    ann = np.zeros(
        (1, 7), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    )
    for i in range(7):
        ann[0, i] = (
            np.array([paths[i]]),
            np.array([[classes[i]]], np.uint8),
            np.array([[is_test[i]]], np.uint8),
        )
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)[None, :]
    (tmp_path / "cars_annos.mat").write_bytes(
        _mat({"annotations": ann, "class_names": names})
    )
    train = datasets.stanford_cars(tmp_path)
    test = datasets.stanford_cars(tmp_path, "test")
    np.testing.assert_array_equal(train.ids, [0, 2, 3, 5])
    np.testing.assert_array_equal(test.ids, [1, 4, 6])
    np.testing.assert_array_equal(train.labels, [1, 0, 195, 1])
    np.testing.assert_array_equal(test.labels, [1, 0, 195])
    assert test[2]["image"] == jpegs[paths[6]] and train.classes[0] == "Car 1"
    assert (
        len(datasets.stanford_cars(tmp_path, "val", val_fraction=0.5)) == 1
    )  # only class 2 has two


# ----------------------------------------------------------------------------- Stanford Dogs


def test_stanford_dogs_uses_the_official_lists(tmp_path):
    breeds = [
        "n02085620-Chihuahua",
        "n02085782-Japanese_spaniel",
        "n02085936-Maltese_dog",
    ]
    paths = [f"{b}/{b.split('-')[0]}_{k}.jpg" for b in breeds for k in range(3)]
    jpegs = {p: _jpeg(i) for i, p in enumerate(paths)}
    _tar(
        tmp_path / "images.tar", {f"Images/{p}": v for p, v in jpegs.items()}
    )  # plain tar: read lazily
    label_of = {p: breeds.index(p.split("/")[0]) + 1 for p in paths}
    train_paths = [paths[i] for i in (0, 1, 3, 4, 6, 7)]
    test_paths = [paths[i] for i in (8, 2, 5)]

    def listing(ps):
        return _mat(
            {
                "file_list": _cells(ps),
                "annotation_list": _cells(p[:-4] for p in ps),
                "labels": np.array([[label_of[p]] for p in ps]),
            }
        )

    _tar(
        tmp_path / "lists.tar",
        {"train_list.mat": listing(train_paths), "test_list.mat": listing(test_paths)},
    )
    train = datasets.stanford_dogs(tmp_path)
    np.testing.assert_array_equal(train.ids, np.arange(6))
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    assert train.classes[:3] == tuple(breeds)
    assert train[3]["image"] == jpegs[train_paths[3]]
    test = datasets.stanford_dogs(tmp_path, "test")
    np.testing.assert_array_equal(test.ids, [6, 7, 8])
    np.testing.assert_array_equal(test.labels, [2, 0, 1])
    assert [test[i]["image"] for i in range(3)] == [jpegs[p] for p in test_paths]
    val = datasets.stanford_dogs(tmp_path, "val", val_fraction=0.5)
    assert np.bincount(val.labels).tolist() == [1, 1, 1]

    # extracted lists in root, a label given to two folders
    os.remove(tmp_path / "lists.tar")
    bad = dict(label_of, **{train_paths[2]: 1})
    (tmp_path / "train_list.mat").write_bytes(
        _mat(
            {
                "file_list": _cells(train_paths),
                "labels": np.array([[bad[p]] for p in train_paths]),
            }
        )
    )
    with pytest.raises(ValueError, match="label 1 is given to two breed folders"):
        datasets.stanford_dogs(tmp_path)
    os.remove(tmp_path / "train_list.mat")
    with pytest.raises(FileNotFoundError, match=r"train_list\.mat"):
        datasets.stanford_dogs(tmp_path)


# ----------------------------------------------------------------------------- ImageNet validation


_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # sorted: labels 0..3
_TRUTH = {
    1: "n01484850",
    2: "n01440764",
    3: "n01491361",
    4: "n01484850",
    5: "n01443537",
}


def _val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def _check_imagenet(source, jpegs):
    np.testing.assert_array_equal(source.ids, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(
        source.labels, [_WNIDS.index(_TRUTH[k]) for k in range(1, 6)]
    )
    assert source.classes == tuple(_WNIDS)
    assert [source[i]["image"] for i in range(5)] == [jpegs[k] for k in range(1, 6)]


def test_imagenet_val_from_class_folders(tmp_path):
    jpegs = {k: _jpeg(k) for k in _TRUTH}
    _write(tmp_path, {f"val/{w}/{_val_name(k)}": jpegs[k] for k, w in _TRUTH.items()})
    _check_imagenet(datasets.imagenet_val(tmp_path), jpegs)
    # a copy missing a class: the mapping file keeps the labels right
    os.remove(tmp_path / "val" / "n01440764" / _val_name(2))
    os.rmdir(tmp_path / "val" / "n01440764")
    folders_only = datasets.imagenet_val(tmp_path)
    assert folders_only.classes == tuple(_WNIDS[1:])  # what ImageFolder would do
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} name of {w}\n" for w in _WNIDS)
    )
    mapped = datasets.imagenet_val(tmp_path)
    np.testing.assert_array_equal(
        mapped.labels, [_WNIDS.index(_TRUTH[k]) for k in (1, 3, 4, 5)]
    )


def test_imagenet_val_from_the_tar_and_kaggle_csv(tmp_path):
    jpegs = {k: _jpeg(k) for k in _TRUTH}
    _tar(
        tmp_path / "ILSVRC2012_img_val.tar", {_val_name(k): v for k, v in jpegs.items()}
    )
    with pytest.raises(
        FileNotFoundError, match=r"LOC_val_solution\.csv.*ILSVRC2012_devkit_t12"
    ):
        datasets.imagenet_val(tmp_path)
    rows = [
        f"{_val_name(k)[:-5]},{w} 1 2 30 40 {w} 5 6 7 8\n"
        for k, w in sorted(_TRUTH.items(), reverse=True)
    ]
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(rows[1:])
    )
    with pytest.raises(FileNotFoundError, match=r"LOC_synset_mapping\.txt"):
        datasets.imagenet_val(tmp_path)
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} a name\n" for w in _WNIDS)
    )
    with pytest.raises(
        ValueError, match=_val_name(5)
    ):  # the first row (image 5) is missing
        datasets.imagenet_val(tmp_path)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(rows)
    )
    _check_imagenet(datasets.imagenet_val(tmp_path), jpegs)


def test_imagenet_val_from_flat_images_and_the_devkit(tmp_path):
    jpegs = {k: _jpeg(k) for k in _TRUTH}
    _write(tmp_path / "ILSVRC2012_img_val", {_val_name(k): v for k, v in jpegs.items()})
    # devkit class numbers are not in wnid order; one non-leaf synset must be ignored
    devkit_order = ["n01491361", "n01440764", "n01484850", "n01443537"]
    synsets = np.zeros(
        (5, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    )
    for i, w in enumerate(devkit_order):
        synsets[i, 0] = (np.array([[i + 1]]), np.array([w]), np.array([[0]]))
    synsets[4, 0] = (np.array([[1001]]), np.array(["n00001740"]), np.array([[3]]))
    truth = "".join(f"{devkit_order.index(_TRUTH[k]) + 1}\n" for k in range(1, 6))
    _tar(
        tmp_path / "ILSVRC2012_devkit_t12.tar.gz",
        {
            "ILSVRC2012_devkit_t12/data/meta.mat": _mat({"synsets": synsets}),
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth.encode(),
        },
        "w:gz",
    )
    _check_imagenet(datasets.imagenet_val(tmp_path), jpegs)
    _write(tmp_path / "ILSVRC2012_img_val", {"photo.JPEG": jpegs[1]})
    with pytest.raises(ValueError, match=r"'photo\.JPEG'.*ILSVRC2012_val_NNNNNNNN"):
        datasets.imagenet_val(tmp_path)


def test_imagenet_val_without_images_names_the_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_val\.tar"):
        datasets.imagenet_val(tmp_path)


def test_vision_source_checks_and_subsets():
    images = np.zeros((3, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="duplicate"):
        datasets.VisionSource("x", [1, 1, 2], [0, 0, 0], images, ["a"])
    with pytest.raises(
        ValueError, match=r"labels \[4\] \(ids \[2\]\) are outside 0..1"
    ):
        datasets.VisionSource("x", [0, 1, 2], [0, 1, 4], images, ["a", "b"])
    src = datasets.VisionSource("x/train", [7, 8, 9], [0, 1, 0], images, ["a", "b"])
    sub = src.subset(np.array([2, 0]), "x/val")
    assert [int(sub[i]["id"]) for i in range(2)] == [9, 7] and sub.name == "x/val"
    assert int(src[-1]["id"]) == 9
    with pytest.raises(IndexError):
        src[3]


def test_truncated_tarballs_are_named(tmp_path):
    files = {_val_name(k): _jpeg(k, size=(64, 48)) for k in _TRUTH}
    _tar(tmp_path / "full.tar", files)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} x\n" for w in _WNIDS)
    )
    rows = "".join(f"{_val_name(k)[:-5]},{w} 1 2 3 4\n" for k, w in _TRUTH.items())
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + rows)
    # cut inside the last image: the index still lists it, reading it fails
    with tarfile.open(tmp_path / "full.tar") as tar:
        last = max(m.offset_data + m.size for m in tar)
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(data[: last - 10])
    try:
        source = datasets.imagenet_val(tmp_path)
    except ValueError as e:  # or the index already sees the cut
        assert "ILSVRC2012_img_val.tar" in str(e)
    else:
        assert source[0]["image"] == files[_val_name(1)]
        with pytest.raises(ValueError, match=r"ILSVRC2012_img_val\.tar.*truncated"):
            source[len(source) - 1]["image"]
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz") as tar:
        for name, v in files.items():
            info = tarfile.TarInfo(f"101_ObjectCategories/a/{name}")
            info.size = len(v)
            tar.addfile(info, io.BytesIO(v))
    (tmp_path / "101_ObjectCategories.tar.gz").write_bytes(packed.getvalue()[:-200])
    with pytest.raises(
        ValueError, match=r"101_ObjectCategories\.tar\.gz.*not a readable tarball"
    ):
        datasets.caltech101(tmp_path)
