"""flowjax.datasets' image pipeline against PIL/numpy references: crops, flips, normalisation, resume, shards."""

from __future__ import annotations

import io
import itertools
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from PIL import Image

import flowjax
from flowjax import datasets

_MEAN = np.array(datasets.IMAGENET_MEAN)
_STD = np.array(datasets.IMAGENET_STD)


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normalised(pixels) -> np.ndarray:
    """The reference normalisation, in float64."""
    return (np.asarray(pixels, np.float64) / 255 - _MEAN) / _STD


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless: the decode is exact
    return buf.getvalue()


def test_normalisation_is_exact_per_channel():
    fn = datasets.image_transform(train=False, image_size=4, resize_size=4)
    for value in (0, 1, 128, 255):
        out = fn({"image": np.full((4, 4, 3), value, np.uint8), "label": 0}, None)
        want = (value / 255 - _MEAN) / _STD
        np.testing.assert_allclose(
            out["image"], np.broadcast_to(want, (4, 4, 3)), rtol=1e-6, atol=1e-6
        )
    custom = datasets.image_transform(
        train=False,
        image_size=2,
        resize_size=2,
        mean=(0.5, 0.25, 0.0),
        std=(0.5, 0.25, 2.0),
    )
    out = custom({"image": np.full((2, 2, 3), 51, np.uint8), "label": 0}, None)
    np.testing.assert_allclose(
        out["image"][0, 0], [(0.2 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, 0.1], rtol=1e-6
    )


def test_centre_crop_of_an_unresized_image_is_a_numpy_slice():
    pixels = _pixels(20, 31)
    # the shorter side already is resize_size: Resize is the identity, the crop a slice
    fn = datasets.image_transform(train=False, image_size=16, resize_size=20)
    for image in (pixels, _png(pixels)):
        out = fn({"image": image, "label": 1}, None)
        top, left = (
            round((20 - 16) / 2),
            round((31 - 16) / 2),
        )  # torchvision's CenterCrop
        np.testing.assert_allclose(
            out["image"],
            _normalised(pixels[top : top + 16, left : left + 16]),
            atol=1e-6,
        )
        assert out["label"] == 1
    assert datasets.center_crop_box(20, 31, 16) == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="centre crop of 21"):
        datasets.center_crop_box(20, 31, 21)


@pytest.mark.parametrize(("h", "w", "size"), [(37, 53, 24), (53, 37, 24), (30, 30, 16)])
def test_eval_resize_matches_torchvisions_resize_then_center_crop_in_pil(h, w, size):
    pixels = _pixels(h, w, seed=h)
    # torchvision's Resize(size): shorter side -> size, longer int(size * long / short)
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    ref = Image.fromarray(pixels).resize(new, Image.Resampling.BILINEAR)
    top, left = round((new[1] - 14) / 2), round((new[0] - 14) / 2)
    ref = np.asarray(ref)[top : top + 14, left : left + 14]
    out = datasets.image_transform(train=False, image_size=14, resize_size=size)(
        {"image": pixels, "label": 0}, None
    )
    np.testing.assert_allclose(out["image"], _normalised(ref), atol=1e-6)
    square = datasets.image_transform(
        train=False, image_size=size, resize_size=size, resize="square"
    )
    ref = np.asarray(
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    )
    np.testing.assert_allclose(
        square({"image": pixels, "label": 0}, None)["image"],
        _normalised(ref),
        atol=1e-6,
    )


def test_random_resized_crop_boxes_are_in_bounds_follow_the_ranges_and_replay():
    ratio = (3 / 4, 4 / 3)
    areas, aspects = [], []
    for seed in range(300):
        h, w = 20 + seed % 37, 15 + (seed * 7) % 50
        box = datasets.random_resized_crop_box(h, w, np.random.default_rng(seed))
        top, left, bh, bw = box
        assert (
            0 <= top
            and top + bh <= h
            and 0 <= left
            and left + bw <= w
            and bh > 0
            and bw > 0
        )
        assert box == datasets.random_resized_crop_box(
            h, w, np.random.default_rng(seed)
        )
        areas.append(bh * bw / (h * w))
        aspects.append(bw / bh)
    # rounding the sides moves area and aspect a little outside the drawn ranges
    assert 0.05 < min(areas) < 0.2 and max(areas) <= 1.0
    assert 0.6 < min(aspects) < 0.85 and 1.2 < max(aspects) < 1.6
    assert len({a for a in areas}) > 200  # not a fixed box
    # a 2x60 strip: no 3/4..4/3 box of >= 90 % of its area fits, so the fallback: full height,
    # width cut to the largest allowed aspect, centred
    for seed in range(5):
        box = datasets.random_resized_crop_box(
            2, 60, np.random.default_rng(seed), scale=(0.9, 1.0), ratio=ratio
        )
        assert box == (0, (60 - round(2 * 4 / 3)) // 2, 2, round(2 * 4 / 3))
    with pytest.raises(ValueError, match="ratio"):
        datasets.random_resized_crop_box(
            5, 5, np.random.default_rng(0), ratio=(0.0, 1.0)
        )
    with pytest.raises(ValueError, match="scale"):
        datasets.random_resized_crop_box(
            5, 5, np.random.default_rng(0), scale=(0.5, 0.1)
        )


def test_training_transform_is_the_crop_resize_and_flip_of_its_generator():
    pixels = _pixels(40, 56, seed=3)
    fn = datasets.image_transform(train=True, image_size=12)
    flipped = 0
    for seed in range(12):
        out = fn({"image": _png(pixels), "label": 0}, np.random.default_rng(seed))[
            "image"
        ]
        rng = np.random.default_rng(seed)  # replay the draws: the box, then the coin
        top, left, h, w = datasets.random_resized_crop_box(40, 56, rng)
        crop = Image.fromarray(pixels[top : top + h, left : left + w]).resize(
            (12, 12), Image.Resampling.BILINEAR
        )
        ref = np.asarray(crop)
        if rng.random() < 0.5:
            ref, flipped = ref[:, ::-1], flipped + 1
        np.testing.assert_allclose(out, _normalised(ref), atol=1e-6)
    assert 0 < flipped < 12
    # random crop of a square resize (the FLOW code's Cars/Dogs training transform)
    square_random = {"resize": "square", "train_crop": "random"}
    fn = datasets.image_transform(
        train=True, image_size=10, resize_size=16, flip=False, **square_random
    )
    out = fn({"image": pixels, "label": 0}, np.random.default_rng(1))["image"]
    rng = np.random.default_rng(1)
    top, left = int(rng.integers(0, 7)), int(rng.integers(0, 7))
    ref = np.asarray(
        Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR)
    )[top : top + 10, left : left + 10]
    np.testing.assert_allclose(out, _normalised(ref), atol=1e-6)


def test_color_jitter_is_pils_enhancers_in_the_drawn_order():
    from PIL import ImageEnhance

    pixels = _pixels(16, 16, seed=4)
    cars = {"resize_size": 16, "resize": "square", "train_crop": "random"}
    fn = datasets.image_transform(train=True, image_size=16, color_jitter=0.2, **cars)
    outs = []
    for seed in range(4):
        out = fn({"image": pixels, "label": 0}, np.random.default_rng(seed))["image"]
        rng = np.random.default_rng(
            seed
        )  # crop (the whole image), coin, order, factors
        rng.integers(0, 1), rng.integers(0, 1)
        img = Image.fromarray(pixels)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        order, factors = rng.permutation(3), rng.uniform(0.8, 1.2, size=3)
        assert ((0.8 <= factors) & (factors <= 1.2)).all()
        for k in order:
            img = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[
                k
            ](img).enhance(factors[k])
        np.testing.assert_allclose(out, _normalised(np.asarray(img)), atol=1e-6)
        outs.append(out)
    plain = datasets.image_transform(
        train=True, image_size=16, resize_size=16, resize="square", train_crop="random"
    )
    assert not np.allclose(
        outs[0], plain({"image": pixels, "label": 0}, np.random.default_rng(0))["image"]
    )
    with pytest.raises(ValueError, match="color_jitter"):
        datasets.image_transform(train=True, color_jitter=1.5)


def test_transform_options_are_checked_and_bfloat16_is_the_float32_cast():
    pixels = _pixels(9, 9)
    f32 = datasets.image_transform(train=False, image_size=8, resize_size=9)(
        {"image": pixels, "label": 0}, None
    )
    b16 = datasets.image_transform(
        train=False, image_size=8, resize_size=9, dtype="bfloat16"
    )({"image": pixels, "label": 0}, None)
    assert b16["image"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(b16["image"], f32["image"].astype(ml_dtypes.bfloat16))
    for bad, match in [
        ({"image_size": 300}, "image_size=300 > resize_size=256"),
        ({"resize": "long"}, "resize must be"),
        ({"dtype": "float16"}, "dtype"),
        ({"std": (1.0, 0.0, 1.0)}, "std must be > 0"),
        ({"mean": (0.5, 0.5)}, "mean must be three"),
    ]:
        with pytest.raises(ValueError, match=match):
            datasets.image_transform(train=False, **bad)
    fn = datasets.image_transform(train=False, image_size=4, resize_size=4)
    with pytest.raises(ValueError, match="could not be decoded"):
        fn({"image": b"not an image", "label": 0}, None)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        fn({"image": np.zeros((4, 4), np.uint8), "label": 0}, None)


def _source(n=23, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(16, 30)), int(rng.integers(16, 30))) for _ in range(n)]
    images = [_png(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]
    ids = 1000 + 3 * np.arange(n)
    return datasets.VisionSource(
        "toy/train", ids, np.arange(n) % 4, [(lambda b=b: b) for b in images], "abcd"
    )


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_image_batches_are_deterministic_resumable_and_thread_count_free():
    src = _source()
    kw = {"train": True, "image_size": 8, "epochs": 3, "seed": 7, "shard": (0, 1)}
    full = list(datasets.image_batches(src, 5, num_threads=0, **kw))
    assert len(full) == 3 * (23 // 5) and all(
        b["image"].shape == (5, 8, 8, 3) for b in full
    )
    assert full[0]["image"].dtype == np.float32 and full[0]["label"].dtype == np.int64
    threaded = datasets.image_batches(src, 5, num_threads=3, **kw)
    assert len(threaded) == len(full) and threaded.steps_per_epoch == 4
    assert _same(list(threaded), full)
    assert _same(list(threaded.from_batch(6)), full[6:])
    assert _same(
        list(datasets.image_batches(src, 5, num_threads=2, **kw).from_batch(9)),
        full[9:],
    )
    # labels ride with their ids; each epoch is a new order and a new crop of the same example
    for b in full:
        np.testing.assert_array_equal(b["label"], ((b["id"] - 1000) // 3) % 4)
    first = {
        int(i): x for b in full[:4] for i, x in zip(b["id"], b["image"], strict=True)
    }
    second = {
        int(i): x for b in full[4:8] for i, x in zip(b["id"], b["image"], strict=True)
    }
    assert [b["id"].tolist() for b in full[:4]] != [b["id"].tolist() for b in full[4:8]]
    common = sorted(set(first) & set(second))
    assert common and not any(np.array_equal(first[i], second[i]) for i in common)
    # another seed, another stream
    other = list(datasets.image_batches(src, 5, num_threads=0, **{**kw, "seed": 8}))
    assert not _same(other, full)
    # an endless stream resumes the same way
    endless = datasets.image_batches(src, 5, num_threads=2, **{**kw, "epochs": None})
    assert _same(list(itertools.islice(endless.from_batch(10), 2)), full[10:12])


def test_evaluation_batches_keep_every_example_in_order_and_shards_partition_them():
    src = _source()
    whole = list(
        datasets.image_batches(
            src,
            4,
            train=False,
            image_size=12,
            resize_size=16,
            shard=(0, 1),
            num_threads=2,
        )
    )
    ids = np.concatenate([b["id"] for b in whole])
    np.testing.assert_array_equal(ids, src.ids)  # record order, last partial batch kept
    fn = datasets.image_transform(train=False, image_size=12, resize_size=16)
    np.testing.assert_array_equal(whole[2]["image"][1], fn(src[9], None)["image"])
    parts = [
        np.concatenate(
            [
                b["id"]
                for b in datasets.image_batches(
                    src, 4, train=False, image_size=12, resize_size=16, shard=(p, 2)
                )
            ]
        )
        for p in range(2)
    ]
    assert not set(parts[0]) & set(parts[1]) and sorted(
        [*parts[0], *parts[1]]
    ) == sorted(src.ids)
    # training shards: every process the same number of full steps, disjoint ids in each epoch
    train = [
        datasets.image_batches(
            src, 3, train=True, image_size=8, epochs=2, shard=(p, 2), num_threads=0
        )
        for p in range(2)
    ]
    assert len(train[0]) == len(train[1]) == 2 * (11 // 3)
    for epoch in range(2):
        seen = [
            np.concatenate([b["id"] for b in list(t)[epoch * 3 : (epoch + 1) * 3]])
            for t in train
        ]
        assert not set(seen[0]) & set(seen[1])
    # a process's crops are those of the unsharded run for the same ids and epoch
    single = {
        int(i): x
        for b in datasets.image_batches(
            src,
            3,
            train=True,
            image_size=8,
            epochs=1,
            shard=(0, 1),
            drop_remainder=False,
        )
        for i, x in zip(b["id"], b["image"], strict=True)
    }
    for b in list(train[1])[:3]:
        for i, x in zip(b["id"], b["image"], strict=True):
            np.testing.assert_array_equal(x, single[int(i)])


def test_fit_trains_on_image_batches_and_resumes_to_the_same_bytes(tmp_path):
    src = _source(n=16)
    pipe = datasets.image_batches(
        src, 4, train=True, image_size=6, epochs=None, shard=(0, 1), num_threads=2
    )

    def data(start):
        for b in pipe.from_batch(start):
            yield {**b, "weight": np.ones(len(b["id"]), np.float32)}

    def loss_fn(params, example):
        logits = example["image"].reshape(-1) @ params["w"]
        return -jax_log_softmax(logits)[example["label"]]

    def setup():
        params = {"w": jnp.zeros((6 * 6 * 3, 4))}
        tx = optax.sgd(0.05, momentum=0.9)
        step = flowjax.make_train_step(
            flowjax.weighted_objective(loss_fn, return_metrics=True), tx, anchor=params
        )
        return step, flowjax.init_train_state(params, tx, rng=0)

    ref = flowjax.fit(*setup(), data, num_steps=6, progress=False)
    step, state = setup()
    flowjax.fit(
        step,
        state,
        lambda s: itertools.islice(data(s), 4 - s),
        num_steps=6,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        progress=False,
    )
    step, state = setup()
    out = flowjax.fit(
        step,
        state,
        data,
        num_steps=6,
        checkpoint_dir=tmp_path,
        progress=False,
        log=lambda s: None,
    )
    assert out.resumed_from == 4 and out.history == ref.history
    assert (
        np.asarray(out.state.params["w"]).tobytes()
        == np.asarray(ref.state.params["w"]).tobytes()
    )
    assert not math.isclose(ref.history[0]["loss"], ref.history[-1]["loss"])


def jax_log_softmax(x):
    return x - jnp.log(jnp.sum(jnp.exp(x - jnp.max(x)))) - jnp.max(x)
