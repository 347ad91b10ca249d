"""Fabricated inputs for the tiny vision config: a CIFAR-10 download, ImageNet validation folders, weights.

Nothing can be downloaded here, so the tiny config (and its test) runs the whole
protocol on files this module writes in the REAL formats the readers take:

* ``cifar-10-batches-py/`` (python pickles ``data_batch_1`` … ``data_batch_5``,
  ``test_batch``, ``batches.meta``, as the official tarball unpacks), 32×32 images whose
  class is a colour and stripe pattern plus noise (learnable, not trivially);
* ``imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG``: the class-folder layout of the
  ImageNet validation set, JPEGs written with PIL;
* ``<arch>_w<width>.safetensors``: a reduced-width ResNet-18 "pre-trained" for a few
  steps on those ImageNet images (so it has an accuracy to lose), under torchvision's
  state-dict names (``flowjax.models.torch_state_dict``).

The numbers a run on these files produces mean nothing about FLOW; they exercise every
step of the command. Deterministic in ``seed``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

CLASSES = 10


def _images(
    n: int,
    rng: np.random.Generator,
    size: int = 32,
    offset: int = 0,
    noise: float = 40.0,
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % CLASSES
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), np.float32)
    for i, label in enumerate(labels):
        c = int(label) + offset
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], np.float32)
        stripes = 60 * np.sin(2 * np.pi * (xx * (1 + c % 3) + yy * (c // 3)) / size)
        images[i] = colour + stripes[..., None] + rng.normal(0, noise, (size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def cifar10(
    root: Path, train_per_class: int = 20, test_per_class: int = 8, seed: int = 0
) -> Path:
    """A CIFAR-10 download in ``root/cifar-10-batches-py`` (the pickles of the real tarball)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    # Other patterns than the ImageNet images' (a new task), noisier (not fitted exactly).
    train, train_labels = _images(CLASSES * train_per_class, rng, offset=3, noise=90.0)
    test, test_labels = _images(CLASSES * test_per_class, rng, offset=3, noise=90.0)

    def dump(name, images, labels):
        # The real files: uint8 [N, 3072] rows, channel-major (R plane, G, B), list labels.
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        record = {
            b"data": data,
            b"labels": labels.tolist(),
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(record, f)

    for k, part in enumerate(np.array_split(np.arange(len(train)), 5), start=1):
        dump(f"data_batch_{k}", train[part], train_labels[part])
    dump("test_batch", test, test_labels)
    names = [f"class{c}".encode() for c in range(CLASSES)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 10000}, f)
    return root


def imagenet_val(root: Path, per_class: int = 4, seed: int = 1) -> Path:
    """ImageNet validation class folders ``root/val/<wnid>/ILSVRC2012_val_<n>.JPEG`` (JPEG, 48×48)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = _images(CLASSES * per_class, rng, size=48)
    for n, (image, c) in enumerate(zip(images, labels, strict=True), start=1):
        folder = root / "val" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        (folder / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(buf.getvalue())
    return root


def weights(
    path: Path,
    imagenet: Path,
    arch: str = "resnet18",
    width: int = 8,
    seed: int = 0,
    steps: int = 60,
) -> Path:
    """A reduced-width ResNet with a 1000-class head "pre-trained" on the fabricated ImageNet images.

    A few Adam steps (``flowjax.fit``) on the fabricated validation images, so the
    pre-trained model has an ImageNet accuracy to lose; saved under torchvision's names
    in safetensors (``flowjax.models.torch_state_dict``).
    """
    import optax
    from flax import nnx
    from safetensors.numpy import save_file

    import flowjax
    from experiments.vision import protocol as P
    from flowjax import datasets, models

    net = P.split(
        models.resnet(arch, num_classes=1000, rngs=nnx.Rngs(seed), width=width)
    )
    source = datasets.imagenet_val(str(imagenet))
    data = datasets.image_batches(
        source, 20, train=True, seed=seed, epochs=None, image_size=32,
        resize_size=32, resize="square", train_crop="random", num_threads=0,
    )  # fmt: skip
    tx = optax.adam(3e-3)
    step = flowjax.make_train_step(
        P.step_objective(net.graphdef), tx, anchor=net.params, has_aux=True
    )
    state = flowjax.init_train_state(net.params, tx, model_state=net.stats)
    batches = ({**b, "weight": np.ones(len(b["id"]), np.float32)} for b in data)
    result = flowjax.fit(step, state, batches, num_steps=steps, progress=False)
    model = P.merge(
        net.graphdef, result.state.params, result.state.model_state, train=False
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(models.torch_state_dict(model), str(path))
    return path


def make(root: Path, *, arch: str = "resnet18", width: int = 8) -> dict[str, str]:
    """Writes everything into ``root`` (once) and returns the config fields that point at it."""
    root = Path(root).resolve()
    done = root / ".complete"
    if not done.exists():
        cifar10(root / "cifar10")
        imagenet_val(root / "imagenet")
        weights(root / f"{arch}_w{width}.safetensors", root / "imagenet", arch, width)
        done.write_text("ok\n")
    return {
        "data_dir": str(root / "cifar10"),
        "imagenet_dir": str(root / "imagenet"),
        "weights": str(root / f"{arch}_w{width}.safetensors"),
    }
