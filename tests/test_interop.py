"""Tests for rpg_jax.interop: importing the authors' PyTorch RPG ResNet checkpoints.

``reference_format`` rebuilds the reference RPG ResNet in PyTorch (the ring a submodule of
every generated conv) and writes its files as the authors' code does; the imported Flax
model must reproduce its eval-mode logits.
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reference_format import (  # noqa: E402
    RING_FAN,
    RPGConv2d,
    TorchResNet,
    build_reference,
    object_array,
    randomise_bn,
)

from rpg_jax import data, steps  # noqa: E402
from rpg_jax.interop import (  # noqa: E402
    ReferenceCheckpoint,
    load_reference_checkpoint,
    reference_paths,
)
from rpg_jax.models import get_model  # noqa: E402

TOL = 1e-4  # max |logit difference| relative to the logit scale
RING18 = 11 * RING_FAN  # their ring sizes are multiples of 4608
MAIN_PY_RING = 2422 * RING_FAN  # their main.py default: more than ResNet18's generated weights
RESNET18_GENERATED = 11_157_504


def torch_logits(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def flax_logits(ckpt, x_nhwc: np.ndarray) -> np.ndarray:
    apply = jax.jit(lambda params, batch_stats, x: ckpt.model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=False))
    return np.asarray(apply(ckpt.params, ckpt.batch_stats, jnp.asarray(x_nhwc)))


def report(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """Prints and returns the max |logit difference| relative to the logit scale."""
    diff, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
    print(f"{name}: max |logit diff| = {diff:.3g} (max |logit| = {scale:.3g})")
    return diff / max(scale, 1.0)


def files(savename) -> tuple[str, str, str]:
    return f"{savename}.pth.tar", f"{savename}p_idxs.npy", f"{savename}b_masks.npy"


def ring_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith("mem.w")]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref18(tmp_path_factory):
    savename = str(tmp_path_factory.mktemp("ref18") / "rpg18")
    model = build_reference(savename, "resnet18", 10, RING18, seed=0)
    pth, p_idxs, b_masks = files(savename)
    ckpt = load_reference_checkpoint(pth)  # side files and arch found from the checkpoint
    return dict(model=model, pth=pth, p_idxs=p_idxs, b_masks=b_masks, ckpt=ckpt,
                idxs=list(model.mem.p_idxs), masks=list(model.mem.b_masks))


# ----------------------------------------------------------------------------- the format


def test_fixture_writes_the_reference_format(ref18):
    """The files are those of the authors' code: dict, module. keys, ring aliases, tables."""
    loaded = torch.load(ref18["pth"], weights_only=False)
    assert set(loaded) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer"}
    assert loaded["arch"] == "resnet18" and isinstance(loaded["best_acc1"], torch.Tensor)
    state = loaded["state_dict"]
    assert all(k.startswith("module.") for k in state)
    rings = ring_keys(state)
    assert len(rings) == 20  # mem.w + 19 generated convs
    assert {"module.mem.w", "module.layer1.0.conv1.mem.w",
            "module.layer2.0.downsample.0.mem.w"} <= set(rings)
    assert all(torch.equal(state[k], state["module.mem.w"]) for k in rings)
    assert "module.layer1.0.conv1.weight" not in state
    idxs = np.load(ref18["p_idxs"], allow_pickle=True)
    masks = np.load(ref18["b_masks"], allow_pickle=True)
    assert idxs.dtype == object and idxs.shape == (19,) and masks.shape == (19,)
    assert [i.size for i in idxs[3:6]] == [64 * 64 * 9, 128 * 64, 128 * 64 * 9]  # ds first
    assert {i.dtype for i in idxs} == {m.dtype for m in masks} == {np.dtype(np.int64)}
    assert set(np.unique(np.concatenate(list(masks)))) == {-1, 1}
    assert sum(i.size for i in idxs) == RESNET18_GENERATED


# ----------------------------------------------------------------------------- equivalence


def test_resnet18_logits_match_reference(ref18):
    ckpt = ref18["ckpt"]
    assert isinstance(ckpt, ReferenceCheckpoint)
    assert ckpt.epoch == 7 and ckpt.step == 0 and ckpt.best_acc1 == 61.25
    assert ckpt.info.name == "imagenet2012" and ckpt.info.num_classes == 10
    assert ckpt.config.model == "resnet18" and ckpt.config.rpg.ring_size == float(RING18)
    assert ckpt.spec.rings[0].size == RING18
    assert ckpt.spec.rings[0].length == RESNET18_GENERATED
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    want = torch_logits(ref18["model"], x)
    got = flax_logits(ckpt, x)
    assert got.shape == (2, 10)
    assert report("resnet18 RPG 64x64", got, want) <= TOL


def test_generated_kernels_match_reference(ref18):
    """Every generated kernel equals the reference kernel, transposed OIHW -> HWIO."""
    params = ref18["ckpt"].params
    for name, module in ref18["model"].named_modules():
        if isinstance(module, RPGConv2d):
            layer, rest = re.fullmatch(r"layer(\d+\.\d+)\.(.*)", name).groups()
            flax_name = {"downsample.0": "downsample_conv"}.get(rest, rest)
            with torch.no_grad():
                want = module.kernel().numpy().transpose(2, 3, 1, 0)
            got = np.asarray(params[f"layer{layer.replace('.', '_')}"][flax_name]["kernel"])
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_predict_runs_imagenet_preprocessing(ref18):
    ckpt = ref18["ckpt"]
    images = np.random.default_rng(2).integers(0, 256, size=(2, 72, 96, 3), dtype=np.uint8)
    logits = ckpt.predict(images)
    assert logits.shape == (2, 10) and logits.dtype == np.float32
    # The same as the reference model on the preprocessed (resize 256, crop 224) images.
    x = np.asarray(steps.normalize(jnp.asarray(data.preprocess_for_eval("imagenet2012", images)),
                                   ckpt.info.mean, ckpt.info.std))
    assert x.shape == (2, 224, 224, 3)
    assert report("resnet18 RPG predict 224x224", logits, torch_logits(ref18["model"], x)) <= TOL


@pytest.mark.slow
def test_resnet34_logits_match_reference(tmp_path):
    savename = str(tmp_path / "rpg34")
    model = build_reference(savename, "resnet34", 5, 5 * RING_FAN, seed=3, epoch=90)
    pth, p_idxs, b_masks = files(savename)
    assert len(ring_keys(torch.load(pth, weights_only=False)["state_dict"])) == 36
    ckpt = load_reference_checkpoint(pth, p_idxs, b_masks)  # arch "resnet34" from the file
    assert ckpt.config.model == "resnet34" and ckpt.epoch == 90
    x = np.random.default_rng(4).normal(size=(1, 32, 32, 3)).astype(np.float32)
    got = flax_logits(ckpt, x)
    assert got.shape == (1, 5)
    assert report("resnet34 RPG 32x32", got, torch_logits(model, x)) <= TOL
    # The wrong architecture: ResNet18's p_idxs[4] is layer2.0's projection.
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.0 \(p_idxs\[4\]\): expected "
                                         r"8192 index entries.*got 36864.*35 tables.*19 "
                                         r"generated"):
        load_reference_checkpoint(pth, p_idxs, b_masks, arch="resnet18")


@pytest.mark.slow
def test_ring_larger_than_generated_weights(tmp_path):
    """Their main.py default ring (11,160,576 entries) exceeds ResNet18's generated weights:
    every weight reads its own entry and 3072 entries are read by none."""
    savename = str(tmp_path / "main_py")
    model = build_reference(savename, "resnet18", 1000, MAIN_PY_RING, seed=8)
    assert len(set(np.concatenate(model.mem.p_idxs))) == RESNET18_GENERATED
    ckpt = load_reference_checkpoint(f"{savename}.pth.tar")
    ring = ckpt.spec.rings[0]
    assert (ring.size, ring.length) == (MAIN_PY_RING, RESNET18_GENERATED)
    x = np.random.default_rng(9).normal(size=(1, 32, 32, 3)).astype(np.float32)
    assert report("resnet18 RPG, ring > generated", flax_logits(ckpt, x),
                  torch_logits(model, x)) <= TOL


def _flax_name_to_torch(path: tuple[str, ...], collection: str) -> str:
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"layer(\d+)_(\d+)", p)
        parts.append(f"layer{m[1]}.{m[2]}" if m else
                     {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(p, p))
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}[path[-1]]
    return ".".join(parts + [leaf])


def test_plain_resnet18_matches_torchvision_style():
    """Without RPG: torchvision-style ResNet18 weights give the same logits in Flax."""
    torch.manual_seed(5)
    model = TorchResNet("resnet18", 1000)
    randomise_bn(model, torch.Generator().manual_seed(5))
    model.eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    flax_model = get_model("resnet18")
    shapes = jax.eval_shape(lambda: flax_model.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 64, 64, 3)), train=False))
    variables = {}
    for collection in ("params", "batch_stats"):
        def convert(path, leaf, collection=collection):
            names = tuple(getattr(k, "key", str(k)) for k in path)
            value = state[_flax_name_to_torch(names, collection)]
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
            value = value.T if value.ndim == 2 else value
            assert value.shape == leaf.shape, names
            return jnp.asarray(value)

        variables[collection] = jax.tree_util.tree_map_with_path(convert, shapes[collection])
    used = {_flax_name_to_torch(tuple(getattr(k, "key", str(k)) for k in p), c)
            for c in variables for p, _ in jax.tree_util.tree_flatten_with_path(variables[c])[0]}
    assert used == {k for k in state if not k.endswith("num_batches_tracked")}
    x = np.random.default_rng(6).normal(size=(2, 64, 64, 3)).astype(np.float32)
    got = np.asarray(flax_model.apply(variables, jnp.asarray(x), train=False))
    assert report("plain resnet18 64x64", got, torch_logits(model, x)) <= TOL


# ----------------------------------------------------------------------------- errors


def _load_with(ref18, tmp_path, idxs, masks, arch="resnet18"):
    p, b = tmp_path / "yp_idxs.npy", tmp_path / "yb_masks.npy"
    np.save(p, object_array(idxs), allow_pickle=True)
    np.save(b, object_array(masks), allow_pickle=True)
    return load_reference_checkpoint(ref18["pth"], p, b, arch=arch)


def _save_state(ref18, path, edit) -> str:
    """The fixture checkpoint with its state_dict changed by ``edit(state)``."""
    loaded = torch.load(ref18["pth"], weights_only=False)
    edit(loaded["state_dict"])
    torch.save(loaded, path)
    return str(path)


def test_missing_table(ref18, tmp_path):
    idxs, masks = ref18["idxs"], ref18["masks"]
    # Without table 2 (layer1.1.conv1) layer1.1.conv1 reads conv2's table (same shape) and
    # layer1.1.conv2 reads the projection's 1x1 table of layer2.0.
    with pytest.raises(ValueError, match=r"layer1\.1\.conv2 \(p_idxs\[3\]\): expected 36864 "
                                         r"index entries.*got 8192.*18 tables.*19 generated"):
        _load_with(ref18, tmp_path, idxs[:2] + idxs[3:], masks[:2] + masks[3:])
    with pytest.raises(ValueError, match=r"layer4\.1\.conv2 \(p_idxs\[18\]\): no table"):
        _load_with(ref18, tmp_path, idxs[:-1], masks[:-1])


def test_swapped_projection_and_conv1(ref18, tmp_path):
    idxs, masks = list(ref18["idxs"]), list(ref18["masks"])
    idxs[4], idxs[5] = idxs[5], idxs[4]  # layer2.0: downsample.0 and conv1 in the wrong order
    masks[4], masks[5] = masks[5], masks[4]
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.0 \(p_idxs\[4\]\): expected "
                                         r"8192 index entries .*128x64x1x1.*got 73728"):
        _load_with(ref18, tmp_path, idxs, masks)


def test_resnet18_files_as_resnet34(ref18, tmp_path):
    with pytest.raises(ValueError, match=r"layer1\.2\.conv1 \(p_idxs\[4\]\): expected 36864"):
        load_reference_checkpoint(ref18["pth"], arch="resnet34")


def test_float_masks_and_bare_state_dict_load_the_same(ref18, tmp_path):
    """float32 masks (their in-memory dtype) and a bare state_dict without the ring's
    aliases give the same model; a bare state_dict has no epoch."""
    floats = [m.astype(np.float32) for m in ref18["masks"]]
    assert _load_with(ref18, tmp_path, ref18["idxs"], floats).spec == ref18["ckpt"].spec
    state = torch.load(ref18["pth"], weights_only=False)["state_dict"]
    bare = {k[len("module."):]: v for k, v in state.items()
            if k == "module.mem.w" or not k.endswith(".mem.w")}
    torch.save(bare, tmp_path / "bare.pth.tar")
    ckpt = load_reference_checkpoint(tmp_path / "bare.pth.tar", ref18["p_idxs"],
                                     ref18["b_masks"])
    assert ckpt.epoch is None and ckpt.best_acc1 is None and ckpt.step == 0
    assert ckpt.spec == ref18["ckpt"].spec
    np.testing.assert_array_equal(ckpt.trainable["rings"]["ring"],
                                  ref18["ckpt"].trainable["rings"]["ring"])


def test_index_out_of_range_and_bad_mask(ref18, tmp_path):
    idxs, masks = list(ref18["idxs"]), list(ref18["masks"])
    idxs[3] = idxs[3].copy()
    idxs[3][17] = RING18
    with pytest.raises(ValueError, match=rf"layer1\.1\.conv2 \(p_idxs\[3\]\): index {RING18} "
                                         rf"is outside the ring \[0, {RING18}\)"):
        _load_with(ref18, tmp_path, idxs, masks)
    idxs, masks = list(ref18["idxs"]), list(ref18["masks"])
    masks[6] = masks[6].copy()
    masks[6][0] = 0
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2 \(p_idxs\[6\]\): mask values"):
        _load_with(ref18, tmp_path, idxs, masks)


def test_differing_ring_alias(ref18, tmp_path):
    key = "module.layer2.0.downsample.0.mem.w"

    def nudge(state):
        state[key] = state[key].clone()
        state[key][123] += 1e-3

    pth = _save_state(ref18, tmp_path / "n.pth.tar", nudge)
    with pytest.raises(ValueError, match=r"state_dict\['layer2\.0\.downsample\.0\.mem\.w'\] "
                                         r"differs from the ring 'mem\.w' \(max \|difference\| "
                                         r"0\.001\)"):
        load_reference_checkpoint(pth, ref18["p_idxs"], ref18["b_masks"])

    def shorten(state):
        state["module.layer4.1.conv2.mem.w"] = state["module.mem.w"][:-1].clone()

    pth = _save_state(ref18, tmp_path / "s.pth.tar", shorten)
    with pytest.raises(ValueError, match=rf"'layer4\.1\.conv2\.mem\.w'\] differs .*"
                                         rf"\({RING18 - 1} entries, the ring has {RING18}\)"):
        load_reference_checkpoint(pth, ref18["p_idxs"], ref18["b_masks"])


def test_state_dict_key_errors(ref18, tmp_path):
    state = torch.load(ref18["pth"], weights_only=False)["state_dict"]
    missing = {k: v for k, v in state.items() if k != "module.layer3.1.bn2.running_var"}
    torch.save(missing, tmp_path / "m.pth.tar")  # a bare state_dict
    with pytest.raises(ValueError, match=r"no 'layer3\.1\.bn2\.running_var'"):
        load_reference_checkpoint(tmp_path / "m.pth.tar", ref18["p_idxs"], ref18["b_masks"])
    extra = {**state, "module.layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
             "module.conv1.mem.w": state["module.mem.w"]}  # the stem is not generated
    torch.save({"state_dict": extra}, tmp_path / "e.pth.tar")
    with pytest.raises(ValueError, match=r"does not use: \['conv1\.mem\.w', "
                                         r"'layer1\.0\.conv1\.weight'\]"):
        load_reference_checkpoint(tmp_path / "e.pth.tar", ref18["p_idxs"], ref18["b_masks"])
    bad = {**state, "module.bn1.weight": torch.ones(32)}
    torch.save({"state_dict": bad}, tmp_path / "b.pth.tar")
    with pytest.raises(ValueError, match=r"state_dict\['bn1\.weight'\]: expected shape \(64,\)"):
        load_reference_checkpoint(tmp_path / "b.pth.tar", ref18["p_idxs"], ref18["b_masks"])


def test_unsupported_arch(ref18, tmp_path):
    with pytest.raises(ValueError, match=r"arch='resnet50' is not supported; valid: resnet18, "
                                         r"resnet34"):
        load_reference_checkpoint(ref18["pth"], arch="resnet50")
    loaded = torch.load(ref18["pth"], weights_only=False)
    torch.save({**loaded, "arch": "resnet50"}, tmp_path / "a.pth.tar")
    with pytest.raises(ValueError, match=r"the checkpoint's arch 'resnet50' is not supported"):
        load_reference_checkpoint(tmp_path / "a.pth.tar", ref18["p_idxs"], ref18["b_masks"])


def test_reference_paths():
    assert reference_paths("run/rpg18.pth.tar") == ("run/rpg18p_idxs.npy",
                                                    "run/rpg18b_masks.npy")
    assert reference_paths("run/rpg18.pth.tarbest.pth.tar")[0] == "run/rpg18p_idxs.npy"
    with pytest.raises(ValueError, match=r"'rpg18\.pt' is not named <savename>\.pth\.tar"):
        reference_paths("rpg18.pt")


def test_missing_torch_is_an_import_error(ref18, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        load_reference_checkpoint(ref18["pth"])
