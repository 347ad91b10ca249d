"""flowjax.models: torchvision-exact ResNets, the torch-name converter, FLOW's task parts.

The references are torchvision's own outputs, committed as fixtures by
tests/fixtures/make_resnet_fixtures.py (run by hand with torch; torch is not needed
here): the same seeded weights (tests/fixtures/resnet_reference.py) go into
torchvision's model there and into ours here.
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flowjax
import flowjax.models as fm
from tests.fixtures import resnet_reference as ref

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# torchvision's parameter counts (measured with torchvision 0.29.1: sum of p.numel()).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
}
forward = nnx.jit(lambda model, x: model(x))


def _fixture(arch):
    fx = np.load(FIXTURES / f"{arch}_torchvision.npz")
    names = [str(n) for n in fx["names"]]
    shapes = [tuple(int(d) for d in s.split(",")) if s else () for s in fx["shapes"]]
    return fx, names, shapes


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _n_params(model) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("arch", ref.ARCHS)
def test_matches_torchvision_in_eval_and_train_mode(arch):
    fx, names, shapes = _fixture(arch)
    weights = ref.reference_weights(names, shapes)
    x = ref.reference_input()
    # The seeded draws are the ones the fixture was made from.
    assert ref.checksum(weights.values()) == pytest.approx(
        float(fx["weights_checksum"])
    )
    assert ref.checksum([x]) == pytest.approx(float(fx["input_checksum"]))

    model = fm.load_resnet(arch, weights)  # num_batches_tracked included, dropped
    assert _n_params(model) == int(fx["n_params"]) == TORCHVISION_PARAMS[arch]
    # Same names and shapes as torchvision's state dict, without num_batches_tracked.
    ours = fm.torch_state_dict(model)
    theirs = {n: s for n, s in zip(names, shapes, strict=True)}
    theirs = {n: s for n, s in theirs.items() if not n.endswith("num_batches_tracked")}
    assert {n: a.shape for n, a in ours.items()} == theirs
    np.testing.assert_array_equal(
        ours["layer1.0.conv2.weight"], weights["layer1.0.conv2.weight"]
    )

    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    model.eval()
    assert _rel(forward(model, x_nhwc), fx["eval_logits"]) < 1e-4  # the bar
    model.train()
    # torch's own float32 run is 6e-5 from its float64 one here (batch statistics of
    # 8 values per channel in layer4); a biased running variance would be off by 14 %.
    assert _rel(forward(model, x_nhwc), fx["train_logits"]) < 3e-4
    after = fm.torch_state_dict(model)
    for layer in fx["stat_layers"]:
        for stat in ("running_mean", "running_var"):
            key = f"{layer}.{stat}"
            assert _rel(after[key], fx[f"stat:{key}"]) < 1e-4, key
            assert _rel(after[key], weights[key]) > 1e-3, key  # the pass did move them


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_are_torchvisions(arch):
    model = nnx.eval_shape(lambda: fm.resnet(arch, rngs=nnx.Rngs(0)))
    assert _n_params(model) == TORCHVISION_PARAMS[arch]
    assert model.fc.kernel.shape == (model.num_features, 1000)


def _tiny(arch="resnet18", classes=5, seed=0, width=8):
    """A reduced-width model with seeded weights and non-trivial BatchNorm statistics,
    in eval mode (loaded from numpy draws: no per-op compilation of random inits)."""
    abstract = nnx.eval_shape(
        lambda: fm.resnet(arch, num_classes=classes, rngs=nnx.Rngs(0), width=width)
    )
    shapes = {k: v.shape for k, v in fm.torch_state_dict(abstract).items()}
    model = fm.load_resnet(
        arch, ref.reference_weights(list(shapes), list(shapes.values()), seed)
    )
    model.train()
    forward(model, _images(seed=seed + 100))
    model.eval()
    return model


def _images(n=4, size=32, seed=0):
    return jnp.asarray(
        np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32
    )


def test_round_trip_through_a_safetensors_file(tmp_path):
    from safetensors.numpy import save_file

    model = _tiny()
    sd = fm.torch_state_dict(model)
    sd = {**sd, "bn1.num_batches_tracked": np.array(7, np.int64)}  # as torch saves it
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    loaded = fm.load_resnet("resnet18", path)
    loaded.eval()
    x = _images()
    np.testing.assert_array_equal(forward(loaded, x), forward(model, x))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded), nnx.state(model))
    # A float16 checkpoint gives float32 parameters.
    save_file(
        {k: v.astype(np.float16) for k, v in sd.items() if v.dtype == np.float32},
        str(tmp_path / "half.safetensors"),
    )
    half = fm.load_resnet("resnet18", tmp_path / "half.safetensors")
    assert {v.dtype for v in jax.tree.leaves(nnx.state(half))} == {jnp.dtype("float32")}
    np.testing.assert_allclose(
        half.conv1.kernel[...], model.conv1.kernel[...], rtol=1e-3, atol=1e-4
    )


def test_other_num_classes_gives_a_fresh_head_on_the_same_backbone():
    pre = _tiny(classes=5)
    sd = fm.torch_state_dict(pre)
    new = fm.load_resnet("resnet18", sd, num_classes=7, rngs=nnx.Rngs(3))
    new.eval()
    x = _images()
    feats = nnx.jit(lambda m, x: m.features(x))
    np.testing.assert_array_equal(feats(new, x), feats(pre, x))
    assert new.fc.kernel.shape == (64, 7) and new.fc.bias.shape == (7,)
    # torch's Linear init: uniform within ±1/sqrt(fan_in), not zeros or copies.
    bound = 1 / math.sqrt(64)
    for p in (new.fc.kernel[...], new.fc.bias[...]):
        assert float(jnp.abs(p).max()) <= bound and float(jnp.std(p)) > 0.3 * bound
    again = fm.load_resnet("resnet18", sd, num_classes=7, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(again.fc.kernel[...], new.fc.kernel[...])
    other = fm.load_resnet("resnet18", sd, num_classes=7, rngs=nnx.Rngs(4))
    assert not np.array_equal(other.fc.kernel[...], new.fc.kernel[...])
    # The same number of classes keeps the checkpoint's head; a headless checkpoint
    # (timm's num_classes=0) takes num_classes and rngs.
    same = fm.load_resnet("resnet18", sd, num_classes=5)
    np.testing.assert_array_equal(same.fc.kernel[...], pre.fc.kernel[...])
    headless = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert fm.load_resnet(
        "resnet18", headless, num_classes=2, rngs=nnx.Rngs(0)
    ).fc.kernel.shape == (64, 2)
    with pytest.raises(ValueError, match="pass rngs"):
        fm.load_resnet("resnet18", sd, num_classes=7)
    with pytest.raises(ValueError, match="no head"):
        fm.load_resnet("resnet18", headless)


def test_bad_checkpoints_give_errors_that_name_the_keys(tmp_path):
    sd = fm.torch_state_dict(_tiny())
    with pytest.raises(ValueError, match=r"unknown ResNet arch 'resnet19'.*resnet101"):
        fm.load_resnet("resnet19", sd)
    with pytest.raises(ValueError, match="unknown ResNet arch"):
        fm.resnet("resnet19", rngs=nnx.Rngs(0))
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(
        ValueError, match=r"missing 1 keys: layer3\.1\.bn2\.running_var"
    ):
        fm.load_resnet("resnet18", missing)
    extra = {**sd, "module.head.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected 1 keys: module\.head\.weight"):
        fm.load_resnet("resnet18", extra)
    # Another depth: ResNet-34 lacks layer1.2 etc. in an 18 checkpoint.
    with pytest.raises(ValueError, match=r"missing \d+ keys: layer1\.2\.bn1\.bias"):
        fm.load_resnet("resnet34", sd)
    with pytest.raises(ValueError, match=r"missing \d+ keys: layer1\.0\.bn3\.bias"):
        fm.load_resnet("resnet50", sd)
    bad = {**sd, "layer2.0.conv1.weight": np.zeros((16, 8, 3, 1), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"layer2\.0\.conv1\.weight: \(16, 8, 3, 1\) \(expected \(16, 8, 3, 3\)\)",
    ):
        fm.load_resnet("resnet18", bad)
    nan = {**sd, "layer4.1.bn2.weight": np.full(64, np.nan, np.float32)}
    with pytest.raises(ValueError, match=r"NaN or inf: layer4\.1\.bn2\.weight"):
        fm.load_resnet("resnet18", nan)
    ints = {**sd, "fc.bias": np.zeros(5, np.int32)}
    with pytest.raises(ValueError, match=r"not floating point: fc\.bias: int32"):
        fm.load_resnet("resnet18", ints)
    no_stem = {k: v for k, v in sd.items() if k != "conv1.weight"}
    with pytest.raises(ValueError, match=r"no conv1\.weight"):
        fm.load_resnet("resnet18", no_stem)
    with pytest.raises(ValueError, match="no weights file"):
        fm.load_resnet("resnet18", tmp_path / "absent.safetensors")
    with pytest.raises(TypeError, match=r"path to a \.safetensors file or a mapping"):
        fm.load_resnet("resnet18", 42)


def test_bfloat16_compute_keeps_float32_parameters_and_is_close():
    pre = _tiny()
    sd = fm.torch_state_dict(pre)
    half = fm.load_resnet("resnet18", sd, dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(half))} == {jnp.dtype("float32")}
    half.eval()
    x = _images()
    out, want = forward(half, x), forward(pre, x)
    assert out.dtype == jnp.bfloat16 and want.dtype == jnp.float32
    assert (
        0 < _rel(out, np.asarray(want, np.float64)) < 0.05
    )  # bfloat16 ran, and is close
    half.train()
    forward(half, x)
    assert half.bn1.var.dtype == jnp.float32
    assert _rel(half.bn1.var[...], np.asarray(pre.bn1.var[...], np.float64)) > 1e-4


def test_batchnorm_is_torchs_batchnorm2d():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32) * 2 + 1
    bn = fm.BatchNorm(6, rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    y = bn(jnp.asarray(x))  # train mode
    mu, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    n = 3 * 4 * 5
    want = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(
        bn.bias[...]
    )
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    bn.eval()
    z = bn(jnp.asarray(x))
    want = (x - 0.1 * mu) / np.sqrt(np.asarray(bn.var[...]) + 1e-5) * np.asarray(
        bn.scale[...]
    ) + np.asarray(bn.bias[...])
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)
    assert isinstance(bn, nnx.BatchNorm)
    bn.train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(jnp.ones((1, 1, 1, 6)))


def test_batchnorm_with_an_axis_name_uses_the_global_batch():
    """Cross-replica BatchNorm (pmap / shard_map / vmap with axis_name): every replica's
    output and running statistics are those of the whole batch."""
    x = np.random.default_rng(1).normal(size=(3, 2, 4, 4, 6)).astype(np.float32) * 2 + 1
    graphdef, state = nnx.split(fm.BatchNorm(6, rngs=nnx.Rngs(0), axis_name="d"))

    def replica(state, x):
        bn = nnx.merge(graphdef, state)
        return bn(x), nnx.state(bn)

    y, states = jax.vmap(replica, in_axes=(None, 0), axis_name="d")(
        state, jnp.asarray(x)
    )
    whole = fm.BatchNorm(6, rngs=nnx.Rngs(0))
    want = whole(jnp.asarray(x.reshape(6, 4, 4, 6)))
    np.testing.assert_allclose(
        np.asarray(y).reshape(6, 4, 4, 6), want, rtol=1e-5, atol=1e-5
    )
    for stat in ("mean", "var"):  # n = 6·4·4 in the unbiased variance, not 2·4·4
        for r in range(3):
            np.testing.assert_allclose(
                states[stat][...][r], getattr(whole, stat)[...], rtol=1e-5, atol=1e-6
            )


def test_swap_task_parts_puts_the_pretrained_head_and_batchnorm_back():
    pre = _tiny(classes=5)
    pre_state = nnx.state(pre)
    # Fine-tune: a new 3-class head, BatchNorm statistics from target data, a changed body.
    ft = fm.load_resnet(
        "resnet18", fm.torch_state_dict(pre), num_classes=3, rngs=nnx.Rngs(9)
    )
    ft.train()
    forward(ft, _images(seed=7) + 2.0)
    ft.eval()
    parts = fm.task_parts(pre)
    n_bn = sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(pre))
    selected = [p for p, v in nnx.to_flat_state(pre_state) if parts(p, v)]
    assert len(selected) == 2 + 4 * n_bn  # fc kernel and bias; scale, bias, mean, var
    x = _images(seed=3)

    swapped = flowjax.swap_task_parts(nnx.state(ft), pre_state, parts)
    restored = nnx.merge(nnx.graphdef(pre), swapped)
    assert restored.fc.kernel.shape == (64, 5)
    # The body is unchanged here, so the pre-trained model comes back exactly ...
    np.testing.assert_array_equal(forward(restored, x), forward(pre, x))
    # ... and without the BatchNorm statistics it does not.
    head_only = nnx.merge(
        nnx.graphdef(pre),
        flowjax.swap_task_parts(nnx.state(ft), pre_state, nnx.PathContains("fc")),
    )
    assert _rel(forward(head_only, x), np.asarray(forward(pre, x), np.float64)) > 1e-3
    # A changed body stays fine-tuned.
    ft.layer2[0].conv1.kernel[...] = ft.layer2[0].conv1.kernel[...] * 1.5
    restored = nnx.merge(
        nnx.graphdef(pre), flowjax.swap_task_parts(nnx.state(ft), pre_state, parts)
    )
    np.testing.assert_array_equal(
        restored.layer2[0].conv1.kernel[...], ft.layer2[0].conv1.kernel[...]
    )
    np.testing.assert_array_equal(
        restored.layer2[0].bn1.var[...], pre.layer2[0].bn1.var[...]
    )
    with pytest.raises(ValueError, match="no head 'head'"):
        fm.task_parts(pre, head="head")


def test_jit_per_example_losses_and_a_batched_train_step_on_a_tiny_resnet():
    model = _tiny()
    graphdef, state = nnx.split(model)
    x = np.asarray(_images(8, seed=1))
    y = np.random.default_rng(1).integers(0, 5, size=8).astype(np.int32)

    def loss_fn(state, ex):  # one example, eval mode
        logits = nnx.merge(graphdef, state)(ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    batches = [
        {"id": np.arange(s, s + 4) + 100, "x": x[s : s + 4], "y": y[s : s + 4]}
        for s in (0, 4)
    ]
    table = flowjax.per_example_losses(loss_fn, state, batches, progress=False)
    logits = jnp.concatenate([forward(model, x[:4]), forward(model, x[4:])])
    direct = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    np.testing.assert_array_equal(table.ids, np.arange(100, 108))
    np.testing.assert_allclose(table.losses, np.asarray(direct), rtol=1e-5, atol=1e-6)

    # FLOW's batched objective trains it in train mode: loss and statistics as a plain
    # train-mode forward gives them.
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def batch_loss(params, batch, stats):
        m = nnx.merge(graphdef, params, stats, copy=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            m(batch["x"]), batch["y"]
        )
        return losses, nnx.state(m, nnx.BatchStat)

    objective = flowjax.weighted_objective(batch_loss, batched=True, has_aux=True)
    batch = {
        "x": jnp.asarray(x[:4]),
        "y": jnp.asarray(y[:4]),
        "weight": jnp.linspace(0.1, 1.0, 4),
    }
    (loss, new_stats), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
        params, batch, stats
    )
    plain = nnx.merge(graphdef, params, stats, copy=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        forward(plain, batch["x"]), batch["y"]
    )
    np.testing.assert_allclose(
        float(loss), float(jnp.sum(batch["weight"] * ce) / 4), rtol=1e-5
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        new_stats,
        nnx.state(plain, nnx.BatchStat),
    )
    assert not np.allclose(new_stats["bn1"]["var"][...], stats["bn1"]["var"][...])
    assert float(optax.tree.norm(grads)) > 0
