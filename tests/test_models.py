"""Tests for rpg_jax.models (plain Flax ResNets)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpg_jax.models import (
    MODEL_NAMES,
    CifarResNet18,
    ResNet18,
    ResNet20,
    ResNet34,
    ResNet50,
    ResNet110,
    get_model,
)

IMAGENET = ("resnet18", "resnet34", "resnet50")


def _key(seed: int = 0) -> jax.Array:
    # Threefry kernels are slow to compile on CPU; "unsafe_rbg" keeps real inits fast.
    return jax.random.key(seed, impl="unsafe_rbg")


def _abstract_vars(model, shape=(1, 64, 64, 3)):
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, _key(0), jnp.zeros(shape, jnp.float32))


def _flat(tree):
    return {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Eager init compiles one kernel per distinct shape, so tests share a few small inits.
SMALL_RESNET18 = ResNet18(width=0.25)  # ImageNet stem/pool/strides, 16..128 channels


@functools.cache
def _resnet18_vars():
    return SMALL_RESNET18.init(_key(0), jnp.zeros((1, 32, 32, 3)), train=False)


@functools.cache
def _resnet20_vars():
    return ResNet20().init(_key(0), jnp.zeros((1, 32, 32, 3)), train=False)


@pytest.mark.parametrize(
    "model, n_params",
    [
        (ResNet18(), 11_689_512),
        (ResNet34(), 21_797_672),
        (ResNet50(), 25_557_032),
    ],
)
def test_imagenet_param_counts(model, n_params):
    assert _count(_abstract_vars(model)["params"]) == n_params


def test_resnet18_param_breakdown():
    flat = _flat(_abstract_vars(ResNet18())["params"])
    block_convs = sum(
        int(np.prod(v.shape)) for k, v in flat.items() if len(k) == 3 and k[-1] == "kernel"
    )
    bn = sum(
        int(np.prod(v.shape))
        for k, v in flat.items()
        if "bn" in k[-2] and k[-1] in ("scale", "bias")
    )
    assert block_convs == 11_157_504
    assert flat[("conv1", "kernel")].shape == (7, 7, 3, 64)
    assert int(np.prod(flat[("conv1", "kernel")].shape)) == 9_408
    assert bn == 9_600
    fc = int(np.prod(flat[("fc", "kernel")].shape)) + int(np.prod(flat[("fc", "bias")].shape))
    assert fc == 513_000
    assert block_convs + 9_408 + bn + fc == 11_689_512
    # Names mirror torchvision's state_dict keys; kernels are HWIO.
    assert flat[("layer2_0", "conv1", "kernel")].shape == (3, 3, 64, 128)
    assert flat[("layer2_0", "downsample_conv", "kernel")].shape == (1, 1, 64, 128)
    assert ("layer2_0", "downsample_bn", "scale") in flat
    assert ("layer1_0", "downsample_conv", "kernel") not in flat
    assert all(v.dtype == jnp.float32 for v in flat.values())


def test_resnet50_structure():
    flat = _flat(_abstract_vars(ResNet50())["params"])
    # v1.5: stride lives on the 3x3 conv; bottleneck expansion 4.
    assert flat[("layer2_0", "conv2", "kernel")].shape == (3, 3, 128, 128)
    assert flat[("layer2_0", "conv3", "kernel")].shape == (1, 1, 128, 512)
    assert flat[("layer1_0", "downsample_conv", "kernel")].shape == (1, 1, 64, 256)
    assert flat[("fc", "kernel")].shape == (2048, 1000)


def test_cifar_resnet20_param_count():
    v = _abstract_vars(ResNet20(), (1, 32, 32, 3))
    assert _count(v["params"]) == 272_474
    flat = _flat(v["params"])
    assert flat[("conv1", "kernel")].shape == (3, 3, 3, 16)
    assert flat[("layer3_0", "downsample_conv", "kernel")].shape == (1, 1, 32, 64)
    assert ("layer4_0", "conv1", "kernel") not in flat
    assert sum(1 for k in flat if k[0].startswith("layer") and k[1] == "conv1") == 9


def test_cifar_resnet18_param_count():
    flat = _flat(_abstract_vars(CifarResNet18(), (1, 32, 32, 3))["params"])
    assert flat[("conv1", "kernel")].shape == (3, 3, 3, 64)
    assert _count(flat) == 11_173_962


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes_abstract(name):
    model = get_model(name, num_classes=7, dtype=jnp.bfloat16)
    shape = (2, 64, 64, 3) if name in IMAGENET else (2, 32, 32, 3)
    v = _abstract_vars(model, shape)
    out = jax.eval_shape(functools.partial(model.apply, train=False), v, jnp.zeros(shape))
    assert out.shape == (2, 7)
    assert out.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v["params"]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resnet20_forward(dtype):
    model = ResNet20(dtype=dtype)
    x = jax.random.normal(_key(1), (2, 32, 32, 3))
    v = _resnet20_vars()
    out = model.apply(v, x, train=False)
    assert out.shape == (2, 10) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    out_t, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    assert out_t.shape == (2, 10) and out_t.dtype == jnp.float32
    assert set(upd) == {"batch_stats"}


def test_grayscale_28x28_forward():
    model = ResNet20(num_classes=5)
    x = jnp.ones((2, 28, 28, 1))
    v = model.init(_key(0), x, train=False)
    assert v["params"]["conv1"]["kernel"].shape == (3, 3, 1, 16)
    out = model.apply(v, x, train=False)
    assert out.shape == (2, 5) and out.dtype == jnp.float32


def test_resnet18_forward_small():
    x = jax.random.normal(_key(1), (2, 64, 64, 3))
    out = SMALL_RESNET18.apply(_resnet18_vars(), x, train=False)
    assert out.shape == (2, 1000) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def _conv(x, kernel, stride, pad):
    """Reference conv; ``pad`` is a (lo, hi) pair applied to H and W, or "SAME"."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=pad if isinstance(pad, str) else (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


def test_symmetric_padding_matches_pytorch():
    v = _resnet18_vars()
    x = jax.random.normal(_key(2), (2, 32, 32, 3))
    _, state = SMALL_RESNET18.apply(v, x, train=False, capture_intermediates=True)
    inter = state["intermediates"]
    p = v["params"]

    stem_out = inter["conv1"]["__call__"][0]
    manual = _conv(x, p["conv1"]["kernel"], 2, (3, 3))
    assert stem_out.shape == (2, 16, 16, 16)
    np.testing.assert_allclose(stem_out, manual, rtol=1e-4, atol=1e-4)
    same = _conv(x, p["conv1"]["kernel"], 2, "SAME")  # pads (2, 3), as Flax "SAME" would
    assert same.shape == stem_out.shape
    assert not np.allclose(stem_out, same, atol=1e-3)

    # Max-pool 3x3/2 with symmetric (1, 1) -inf padding: 16x16 -> 8x8, checked through the
    # first conv of layer1_0 (3x3/1, padding (1, 1)).
    act = jax.nn.relu(inter["bn1"]["__call__"][0])
    pooled = jax.lax.reduce_window(
        act, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )
    assert pooled.shape == (2, 8, 8, 16)
    np.testing.assert_allclose(
        inter["layer1_0"]["conv1"]["__call__"][0],
        _conv(pooled, p["layer1_0"]["conv1"]["kernel"], 1, (1, 1)),
        rtol=1e-4,
        atol=1e-4,
    )

    # Stride-2 3x3 conv at the start of stage 2; its input is the output of layer1_1.
    block_in = inter["layer1_1"]["__call__"][0]
    conv_out = inter["layer2_0"]["conv1"]["__call__"][0]
    kernel = p["layer2_0"]["conv1"]["kernel"]
    np.testing.assert_allclose(conv_out, _conv(block_in, kernel, 2, (1, 1)), rtol=1e-4, atol=1e-4)
    same = _conv(block_in, kernel, 2, "SAME")  # pads (0, 1)
    assert same.shape == conv_out.shape
    assert not np.allclose(conv_out, same, atol=1e-3)


def test_batchnorm_momentum_and_epsilon():
    model = ResNet20()
    x = jax.random.normal(_key(3), (4, 8, 8, 3))
    v = _resnet20_vars()
    old_mean = jnp.full((16,), 0.5)
    old_var = jnp.full((16,), 2.0)
    stats = dict(v["batch_stats"])
    stats["bn1"] = {"mean": old_mean, "var": old_var}
    v = {"params": v["params"], "batch_stats": stats}

    # Train mode: running = 0.9 * old + 0.1 * batch statistic.
    _, state = model.apply(
        v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    conv_out = state["intermediates"]["conv1"]["__call__"][0]
    batch_mean = conv_out.mean(axis=(0, 1, 2))
    batch_var = conv_out.var(axis=(0, 1, 2))
    new = state["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old_var + 0.1 * batch_var, rtol=1e-4)

    # Eval mode with tiny running variance: y = (x - mean) / sqrt(var + 1e-5).
    stats["bn1"] = {"mean": jnp.zeros(16), "var": jnp.full((16,), 1e-5)}
    v = {"params": v["params"], "batch_stats": stats}
    _, state = model.apply(v, x, train=False, capture_intermediates=True)
    conv_out = state["intermediates"]["conv1"]["__call__"][0]
    bn_out = state["intermediates"]["bn1"]["__call__"][0]
    np.testing.assert_allclose(bn_out, conv_out / np.sqrt(2e-5), rtol=1e-4, atol=1e-4)


def test_zero_init_residual():
    small_resnet50 = ResNet50(stage_sizes=(1, 1, 1, 1), width=0.25, zero_init_residual=True)
    for model in (ResNet20(zero_init_residual=True), small_resnet50):
        shape = (1, 32, 32, 3)
        params = model.init(_key(0), jnp.zeros(shape), train=False)["params"]
        blocks = [k for k in params if k.startswith("layer")]
        assert blocks
        last = "bn3" if "bn3" in params[blocks[0]] else "bn2"
        for b in blocks:
            assert np.all(np.asarray(params[b][last]["scale"]) == 0)
            assert np.all(np.asarray(params[b]["bn1"]["scale"]) == 1)
            if "downsample_bn" in params[b]:
                assert np.all(np.asarray(params[b]["downsample_bn"]["scale"]) == 1)
    params = _resnet20_vars()["params"]
    assert np.all(np.asarray(params["layer1_0"]["bn2"]["scale"]) == 1)


def test_width_halves_channels():
    full = _flat(_abstract_vars(ResNet20(), (1, 32, 32, 3))["params"])
    half = _flat(_abstract_vars(ResNet20(width=0.5), (1, 32, 32, 3))["params"])
    assert half[("conv1", "kernel")].shape == (3, 3, 3, 8)
    assert half[("layer1_0", "conv1", "kernel")].shape == (3, 3, 8, 8)
    assert half[("layer2_0", "conv1", "kernel")].shape == (3, 3, 8, 16)
    assert half[("layer3_2", "conv2", "kernel")].shape == (3, 3, 32, 32)
    assert half[("fc", "kernel")].shape == (32, 10)
    for k, v in full.items():
        if k[-1] == "kernel" and k[0] != "fc":
            h, w, i, o = v.shape
            assert half[k].shape == (h, w, 3 if i == 3 else i // 2, o // 2)
    # Tiny widths never give zero channels.
    tiny = _flat(_abstract_vars(ResNet20(width=0.01), (1, 32, 32, 3))["params"])
    assert tiny[("conv1", "kernel")].shape[-1] == 1


def test_get_model():
    assert isinstance(get_model("ResNet18"), ResNet18)
    assert isinstance(get_model("resnet110"), ResNet110)
    m = get_model("CIFAR_RESNET18", num_classes=100, width=2)
    assert isinstance(m, CifarResNet18) and m.num_classes == 100 and m.width == 2
    assert get_model("resnet20").num_classes == 10
    assert get_model("resnet50").num_classes == 1000
    assert len(MODEL_NAMES) == 9 and "cifar_resnet18" in MODEL_NAMES and "vit" in MODEL_NAMES
    with pytest.raises(ValueError, match="resnet9000") as err:
        get_model("resnet9000")
    assert "resnet20" in str(err.value)
