"""flowjax.batches / flowjax.ArraySource against numpy references, the TF-free digits
TFDS dataset, and TFDS's mock data fed end to end into the pre-pass."""

from __future__ import annotations

import importlib.util
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowjax

N = 103  # prime: every batch size leaves a partial last batch


def _data(n: int = N, with_ids: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = {
        "x": rng.normal(size=(n, 3)).astype(np.float32),
        "label": rng.integers(0, 5, size=n),
    }
    if with_ids:  # sparse, shuffled, beyond int32
        data["id"] = (np.arange(n, dtype=np.int64) * 7_919 + 5_000_000_000)[
            rng.permutation(n)
        ]
    return data


def _records(data: dict[str, np.ndarray]) -> list[dict]:
    """The same data as a plain list of dict records (a generic random-access source)."""
    n = len(next(iter(data.values())))
    return [{k: v[i] for k, v in data.items()} for i in range(n)]


def _epochs(stream, steps_per_epoch: int) -> list[list[dict]]:
    out = list(stream)
    return [out[e : e + steps_per_epoch] for e in range(0, len(out), steps_per_epoch)]


def _ids(batches) -> np.ndarray:
    return np.concatenate([b["id"] for b in batches])


@pytest.mark.parametrize("kind", ["columns", "records"])
@pytest.mark.parametrize("with_ids", [False, True])
def test_every_example_once_per_epoch_with_its_own_fields(kind, with_ids):
    data = _data(with_ids=with_ids)
    source = data if kind == "columns" else _records(data)
    stream = flowjax.batches(source, 10, shuffle=True, seed=3, epochs=3, shard=(0, 1))
    assert len(stream) == 3 * 11 and stream.steps_per_epoch == 11
    epochs = _epochs(stream, 11)
    all_ids = data["id"] if with_ids else np.arange(N)
    row_of = {int(i): r for r, i in enumerate(all_ids)}
    for batches in epochs:
        assert [len(b["id"]) for b in batches] == [10] * 10 + [3]  # partial batch kept
        ids = _ids(batches)
        assert np.array_equal(np.sort(ids), np.sort(all_ids))  # each exactly once
        rows = np.array([row_of[int(i)] for i in ids])
        for b, r in zip(batches, np.split(rows, np.arange(10, N, 10)), strict=True):
            assert sorted(b) == ["id", "label", "x"]
            assert b["id"].dtype == np.int64
            np.testing.assert_array_equal(b["x"], data["x"][r])
            np.testing.assert_array_equal(b["label"], data["label"][r])
    orders = [_ids(batches) for batches in epochs]
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    assert not np.array_equal(orders[1], orders[2])
    assert not np.array_equal(orders[0], np.sort(orders[0]))


def test_order_is_a_function_of_seed_and_epoch_only():
    data = _data()
    a = _ids(flowjax.batches(data, 8, shuffle=True, seed=5, epochs=2, shard=(0, 1)))
    again = _ids(flowjax.batches(data, 8, shuffle=True, seed=5, epochs=2, shard=(0, 1)))
    other_bs = _ids(
        flowjax.batches(data, 31, shuffle=True, seed=5, epochs=2, shard=(0, 1))
    )
    other_seed = _ids(
        flowjax.batches(data, 8, shuffle=True, seed=6, epochs=2, shard=(0, 1))
    )
    stream = flowjax.batches(data, 8, shuffle=True, seed=5, epochs=2, shard=(0, 1))
    np.testing.assert_array_equal(a, again)
    np.testing.assert_array_equal(
        a, other_bs
    )  # the order does not depend on batch size
    np.testing.assert_array_equal(_ids(stream), _ids(stream))  # re-iterating restarts
    assert not np.array_equal(a, other_seed)
    plain = _ids(flowjax.batches(data, 8, epochs=2, shard=(0, 1)))
    np.testing.assert_array_equal(plain, np.tile(np.arange(N), 2))


def test_records_and_columns_give_identical_batches():
    data = _data(with_ids=True)
    kw = dict(shuffle=True, seed=1, epochs=2, shard=(0, 1))
    for a, b in zip(
        flowjax.batches(data, 16, **kw),
        flowjax.batches(_records(data), 16, **kw),
        strict=True,
    ):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype


def test_drop_remainder_and_lengths():
    data = _data()
    stream = flowjax.batches(data, 10, drop_remainder=True, epochs=2, shard=(0, 1))
    assert len(stream) == 20 and stream.examples_per_epoch == 100
    assert [len(b["id"]) for b in stream] == [10] * 20
    forever = flowjax.batches(data, 50, shuffle=True, epochs=None, shard=(0, 1))
    with pytest.raises(TypeError, match="forever"):
        len(forever)
    first7 = list(itertools.islice(forever, 7))  # 3 steps per epoch: epochs 0, 1, 2
    finite = list(flowjax.batches(data, 50, shuffle=True, epochs=3, shard=(0, 1)))
    np.testing.assert_array_equal(_ids(first7), _ids(finite[:7]))


def test_ids_from_field_index_or_custom_key():
    data = _data(with_ids=True)
    batch = next(iter(flowjax.batches(data, N, shard=(0, 1))))
    np.testing.assert_array_equal(batch["id"], data["id"])
    by_index = {"x": data["x"], "uid": data["id"] + 1}
    batch = next(iter(flowjax.batches(by_index, N, id_key="uid", shard=(0, 1))))
    np.testing.assert_array_equal(batch["id"], data["id"] + 1)
    assert sorted(batch) == ["id", "x"]
    batch = next(
        iter(flowjax.batches(data, N, id_key=None, fields=["x"], shard=(0, 1)))
    )
    np.testing.assert_array_equal(batch["id"], np.arange(N))
    with pytest.raises(ValueError, match='field "id" but ids come from record indices'):
        flowjax.batches(data, 4, id_key=None, shard=(0, 1))
    with pytest.raises(ValueError, match="'uid' is not a field"):
        flowjax.batches(_data(), 4, id_key="uid", shard=(0, 1))


def _noisy(example, rng):
    assert "id" not in example
    return {
        "x": example["x"] + rng.normal(size=3).astype(np.float32),
        "u": rng.random(),
    }


def _mapped(stream) -> dict[int, tuple]:
    return {
        int(i): (x.tolist(), float(u))
        for b in stream
        for i, x, u in zip(b["id"], b["x"], b["u"], strict=True)
    }


def test_map_fn_randomness_is_per_example_not_per_batch_or_shard():
    data = _data(with_ids=True)
    kw = dict(map_fn=_noisy, shuffle=True, seed=2)
    small = _mapped(flowjax.batches(data, 7, shard=(0, 1), **kw))
    large = _mapped(flowjax.batches(data, 64, shard=(0, 1), **kw))
    sharded = {}
    for p in range(2):
        sharded.update(_mapped(flowjax.batches(_records(data), 5, shard=(p, 2), **kw)))
    assert small == large == sharded and len(small) == N
    # The map really ran: the noise is there, and x - noise recovers the data.
    row_of = {int(i): r for r, i in enumerate(data["id"])}
    diffs = np.array(
        [np.subtract(x, data["x"][row_of[i]]) for i, (x, _) in small.items()]
    )
    assert 0.7 < diffs.std() < 1.3 and np.abs(diffs).min() > 0
    # Another epoch or another seed draws other noise.
    two = list(flowjax.batches(data, N, epochs=2, shard=(0, 1), **kw))
    e0, e1 = _mapped(two[:1]), _mapped(two[1:])
    assert e0 == small and all(e0[i][1] != e1[i][1] for i in e0)
    other = _mapped(flowjax.batches(data, 7, shard=(0, 1), map_fn=_noisy, seed=3))
    assert all(other[i][1] != small[i][1] for i in small)


def test_map_fn_can_change_dtype_and_shape():
    def to_float(example, rng):
        del rng
        return {"x": np.concatenate([example["x"], [1.0]]).astype(np.float64)}

    batch = next(iter(flowjax.batches(_data(), 8, map_fn=to_float, shard=(0, 1))))
    assert batch["x"].shape == (8, 4) and batch["x"].dtype == np.float64
    np.testing.assert_array_equal(batch["x"][:, :3], _data()["x"][:8])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_two_processes_partition_every_epoch(shuffle, drop_remainder):
    data = _data()
    streams = [
        flowjax.batches(
            data,
            4,
            shuffle=shuffle,
            seed=9,
            epochs=3,
            drop_remainder=drop_remainder,
            shard=(p, 2),
        )
        for p in range(2)
    ]
    steps = [s.steps_per_epoch for s in streams]
    per_process = [_epochs(s, k) for s, k in zip(streams, steps, strict=True)]
    union = []
    for e in range(3):
        a, b = _ids(per_process[0][e]), _ids(per_process[1][e])
        assert not set(a.tolist()) & set(b.tolist())  # disjoint
        union.append(np.concatenate([a, b]))
        if drop_remainder:
            # Equal slices of 51 (103 = 2·51 + 1), cut into 12 full batches of 4.
            assert len(a) == len(b) == 48 and steps == [12, 12]
            assert len(set(union[-1].tolist())) == 96
        else:
            assert sorted(union[-1].tolist()) == list(range(N))
            assert (len(a), len(b)) == (51, 52) and steps == [13, 13]
    if shuffle:
        # The global order is reshuffled, so a process sees other examples next epoch.
        assert set(_ids(per_process[0][0]).tolist()) != set(
            _ids(per_process[0][1]).tolist()
        )
        full = _ids(flowjax.batches(data, 4, shuffle=True, seed=9, shard=(0, 1)))
        if (
            not drop_remainder
        ):  # process slices are contiguous pieces of the global order
            np.testing.assert_array_equal(union[0], full)
    else:
        # Contiguous slices [0, 51) and [51, 103) (cut to full batches with drop_remainder).
        used = 48 if drop_remainder else 51
        np.testing.assert_array_equal(_ids(per_process[0][0]), np.arange(used))
        np.testing.assert_array_equal(
            _ids(per_process[1][0]), 51 + np.arange(used + (not drop_remainder))
        )


def test_default_shard_is_the_jax_process(monkeypatch):
    data = _data()
    here = _ids(flowjax.batches(data, 10, shuffle=True))
    np.testing.assert_array_equal(
        here, _ids(flowjax.batches(data, 10, shuffle=True, shard=(0, 1)))
    )
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    second = _ids(flowjax.batches(data, 10, shuffle=True))
    np.testing.assert_array_equal(second, here[51:])


def test_array_source():
    data = _data(with_ids=True)
    src = flowjax.ArraySource(data)
    assert len(src) == N and sorted(src[5]) == ["id", "label", "x"]
    np.testing.assert_array_equal(src[-1]["x"], data["x"][-1])
    with pytest.raises(IndexError):
        src[N]
    assert (
        data["x"].flags.writeable and data["id"].flags.writeable
    )  # caller's arrays untouched
    with pytest.raises(ValueError, match="read-only"):
        src.columns["x"][0, 0] = 1.0
    back = flowjax.ArraySource.from_source(_records(data))
    for k in data:
        np.testing.assert_array_equal(back.columns[k], data[k])
        assert back.columns[k].dtype == data[k].dtype
    only_x = flowjax.ArraySource.from_source(_records(data), fields=["x"])
    assert list(only_x.columns) == ["x"]


def test_errors_name_the_problem():
    data = _data()
    with pytest.raises(ValueError, match="empty"):
        flowjax.batches({"x": np.zeros((0, 3))}, 4)
    with pytest.raises(ValueError, match="empty"):
        flowjax.batches([], 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            flowjax.batches(data, bad)
    with pytest.raises(ValueError, match="epochs"):
        flowjax.batches(data, 4, epochs=0)
    with pytest.raises(ValueError, match="seed"):
        flowjax.batches(data, 4, seed=-1)
    for shard in ((2, 2), (0, 0), 3):
        with pytest.raises(ValueError, match="shard"):
            flowjax.batches(data, 4, shard=shard)
    with pytest.raises(ValueError, match=r"fields \['y'\] are not in the records"):
        flowjax.batches(data, 4, fields=["x", "y"], shard=(0, 1))
    with pytest.raises(ValueError, match="leaves no batch"):
        flowjax.batches(data, 60, drop_remainder=True, shard=(0, 2))
    with pytest.raises(ValueError, match="different lengths"):
        flowjax.batches({"x": np.zeros((3, 2)), "y": np.zeros(4)}, 2)
    with pytest.raises(TypeError, match="pass one split"):
        flowjax.batches({"train": _records(data)[0], "test": object()}, 2)
    with pytest.raises(TypeError, match="len"):
        flowjax.batches(iter(_records(data)), 2)
    with pytest.raises(TypeError, match="records must be dicts"):
        flowjax.batches([np.zeros(3)] * 4, 2, shard=(0, 1))


def test_errors_found_while_reading():
    records = _records(_data())
    records[9] = {**records[9], "x": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match=r"field 'x': example id 9 has shape \(4,\)"):
        list(flowjax.batches(records, 16, shard=(0, 1)))
    # Inconsistent across batches (each batch is consistent in itself).
    records = _records(_data(n=8))
    for r in records[4:]:
        r["x"] = r["x"].astype(np.float64)
    with pytest.raises(ValueError, match="differs from the first"):
        list(flowjax.batches(records, 4, shard=(0, 1)))
    records = _records(_data(n=8))
    del records[6]["label"]
    with pytest.raises(ValueError, match=r"record 6 lacks fields \['label'\]"):
        list(flowjax.batches(records, 4, shard=(0, 1)))
    # Duplicate ids: within a batch, across batches, and in an id column.
    records = [{"id": i % 7, "x": np.float32(i)} for i in range(8)]
    with pytest.raises(ValueError, match=r"duplicate example ids \[0\]"):
        list(flowjax.batches(records, 8, shard=(0, 1)))  # within one batch
    with pytest.raises(ValueError, match=r"duplicate example ids \[0\]"):
        list(flowjax.batches(records, 4, shard=(0, 1)))  # across batches
    with pytest.raises(ValueError, match="duplicate example ids"):
        flowjax.ArraySource({"id": np.array([3, 1, 3]), "x": np.zeros(3)})
    with pytest.raises(ValueError, match="must be integer scalars"):
        list(flowjax.batches([{"id": "a", "x": 1.0}] * 2, 2, shard=(0, 1)))
    with pytest.raises(ValueError, match='may not set "id"'):
        list(
            flowjax.batches(
                _data(), 4, map_fn=lambda e, r: {**e, "id": 0}, shard=(0, 1)
            )
        )
    with pytest.raises(TypeError, match="must return a dict"):
        list(flowjax.batches(_data(), 4, map_fn=lambda e, r: e["x"], shard=(0, 1)))


# --- TFDS: the digits builder (offline, TF-free) and mock data. ---


def test_tensorflow_is_not_installed():
    """The TFDS paths below must work without TensorFlow: make sure it is really absent."""
    assert importlib.util.find_spec("tensorflow") is None
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("sklearn")
    from experiments.digits import dataset

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return dataset, dataset.build(data_dir), data_dir


def test_digits_dataset_matches_sklearn_exactly(digits):
    from sklearn.datasets import load_digits

    dataset, sources, data_dir = digits
    ref = load_digits()
    assert {k: len(v) for k, v in sources.items()} == {"train": 1438, "test": 359}
    split_ids = {}
    for split, src in sources.items():
        mem = flowjax.ArraySource.from_source(src)
        cols = mem.columns
        assert cols["image"].dtype == np.uint8 and cols["image"].shape == (
            len(src),
            8,
            8,
            1,
        )
        assert cols["label"].dtype == np.int64 and cols["id"].dtype == np.int64
        ids = cols["id"]
        assert np.all(np.diff(ids) > 0)  # stored in increasing id order
        np.testing.assert_array_equal(
            cols["image"][..., 0], ref.images[ids]
        )  # 0..16, exact
        np.testing.assert_array_equal(cols["label"], ref.target[ids])
        split_ids[split] = ids
    train, test = split_ids["train"], split_ids["test"]
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(1797))
    for c in range(10):  # stratified: round(20%) of every class in test
        n_c = int((ref.target == c).sum())
        assert int((ref.target[test] == c).sum()) == round(0.2 * n_c)
    expected = dataset.split_ids(ref.target)
    np.testing.assert_array_equal(test, expected["test"])
    # The builder is registered: the usual TFDS entry point finds the same records.
    import tensorflow_datasets as tfds

    by_name = tfds.data_source(dataset.NAME, split="test", data_dir=data_dir)
    assert len(by_name) == 359 and int(by_name[10]["id"]) == test[10]
    assert "tensorflow" not in sys.modules


def _linear_loss(params, example):
    """Softmax cross-entropy of a linear model on ONE example (image uint8, label int)."""
    x = example["image"].reshape(-1).astype(jnp.float32) / 255.0
    logits = x @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[example["label"]]


def _reference_losses(params, images, labels) -> np.ndarray:
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    logits = x @ np.asarray(params["w"], np.float64) + np.asarray(
        params["b"], np.float64
    )
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def _params(dim: int, classes: int = 10):
    rng = np.random.default_rng(4)
    return {
        "w": jnp.asarray(rng.normal(size=(dim, classes)) / 4, jnp.float32),
        "b": jnp.asarray(rng.normal(size=classes), jnp.float32),
    }


def test_digits_source_feeds_the_prepass(digits):
    _, sources, _ = digits
    src = sources["test"]
    params = _params(64)
    stream = flowjax.batches(src, 64, shuffle=True, seed=0, shard=(0, 1))
    table = flowjax.per_example_losses(_linear_loss, params, stream, progress=False)
    mem = flowjax.ArraySource.from_source(src).columns
    np.testing.assert_array_equal(table.ids, mem["id"])
    ref = _reference_losses(params, mem["image"], mem["label"])
    np.testing.assert_allclose(table.losses, ref, rtol=2e-5, atol=1e-6)


def test_tfds_mock_mnist_end_to_end():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(
        num_examples=70, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        src = tfds.data_source("mnist", split="train")
        assert len(src) == 70
        stream = flowjax.batches(
            src, 32, shard=(0, 1)
        )  # mnist records have no "id": indices
        assert [len(b["id"]) for b in stream] == [32, 32, 6]
        params = _params(28 * 28)
        table = flowjax.per_example_losses(_linear_loss, params, stream, progress=False)
        records = [src[i] for i in range(70)]
    images = np.stack([r["image"] for r in records])
    labels = np.array([r["label"] for r in records])
    assert images.dtype == np.uint8 and images.shape == (70, 28, 28, 1)
    np.testing.assert_array_equal(table.ids, np.arange(70))
    np.testing.assert_allclose(
        table.losses, _reference_losses(params, images, labels), rtol=2e-5, atol=1e-6
    )
    weighted = flowjax.attach_weights(next(iter(stream)), table.flow_weights())
    assert weighted["weight"].shape == (32,) and np.all(weighted["weight"] > 0)


def test_tfds_mock_cifar10_string_ids_need_record_indices():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(
        num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        src = tfds.data_source("cifar10", split="train")
        with pytest.raises(ValueError, match="ids must be integer scalars"):
            list(flowjax.batches(src, 4, shard=(0, 1)))
        stream = flowjax.batches(
            src, 4, id_key=None, fields=["image", "label"], shard=(0, 1)
        )
        batches = list(stream)
        first = src[0]
    assert [len(b["id"]) for b in batches] == [4, 4, 1]
    assert (
        batches[0]["image"].shape == (4, 32, 32, 3)
        and batches[0]["image"].dtype == np.uint8
    )
    np.testing.assert_array_equal(batches[0]["image"][0], first["image"])


def test_grain_reads_the_same_examples():
    """Optional: grain's MapDataset over an ArraySource (grain is the ``data`` extra)."""
    grain = pytest.importorskip("grain")
    data = _data(with_ids=True)
    src = flowjax.ArraySource(data)
    ds = grain.MapDataset.source(src)
    # flowjax reads a grain MapDataset as a source: identical batches.
    kw = dict(shuffle=True, seed=4, epochs=2, shard=(0, 1))
    for a, b in zip(
        flowjax.batches(src, 10, **kw), flowjax.batches(ds, 10, **kw), strict=True
    ):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # grain's own shuffle + batch covers the same examples (in its own order).
    grain_batches = list(ds.shuffle(seed=4).batch(10))
    ours = next(iter(flowjax.batches(src, N, shard=(0, 1))))
    g_ids = np.concatenate([b["id"] for b in grain_batches])
    order = np.argsort(g_ids)
    np.testing.assert_array_equal(g_ids[order], np.sort(ours["id"]))
    g_x = np.concatenate([b["x"] for b in grain_batches])[order]
    np.testing.assert_array_equal(g_x, ours["x"][np.argsort(ours["id"])])
