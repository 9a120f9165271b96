"""Tests for rpg_jax.interop: importing the authors' PyTorch RPG ResNet checkpoints.

A small PyTorch re-implementation of the reference RPG ResNet (torchvision-style BasicBlock
ResNet whose block convs are generated from a ring ``mem.w``) writes a checkpoint in the
reference format; the imported Flax model must reproduce its eval-mode logits.
"""

from __future__ import annotations

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from rpg_jax import data, steps  # noqa: E402
from rpg_jax.generator import generate_params  # noqa: E402
from rpg_jax.interop import load_reference_checkpoint  # noqa: E402
from rpg_jax.models import get_model  # noqa: E402

TOL = 1e-4
RING_FAN = 4608
STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)


# ----------------------------------------------------------------------------- reference model


class Mem(torch.nn.Module):
    """The shared ring (state_dict key ``mem.w``)."""

    def __init__(self, size: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(size) * math.sqrt(2.0 / RING_FAN))


class RPGConv2d(torch.nn.Module):
    """A conv whose kernel is (c * mask * w[idx]).reshape(O, I, kh, kw); no own parameters."""

    def __init__(self, mem: Mem, cin: int, cout: int, k: int, stride: int, registry: list):
        super().__init__()
        self._mem = [mem]  # a plain list: the ring is not a submodule (no duplicate keys)
        self.shape = (cout, cin, k, k)
        self.stride, self.pad = stride, (k - 1) // 2
        self.c = math.sqrt(RING_FAN / (cout * k * k))
        self.idx = self.mask = None  # set by assign_tables, not saved in the state_dict
        registry.append(self)

    def forward(self, x):
        kernel = (self.c * self.mask * self._mem[0].w[self.idx]).reshape(self.shape)
        return F.conv2d(x, kernel, stride=self.stride, padding=self.pad)


def plain_conv(cin: int, cout: int, k: int, stride: int):
    return torch.nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=False)


class Block(torch.nn.Module):
    """torchvision BasicBlock; the projection is built first (reference registration order)."""

    def __init__(self, cin: int, planes: int, stride: int, conv):
        super().__init__()
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = torch.nn.Sequential(conv(cin, planes, 1, stride),
                                                  torch.nn.BatchNorm2d(planes))
        self.conv1 = conv(cin, planes, 3, stride)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, 1)
        self.bn2 = torch.nn.BatchNorm2d(planes)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(torch.nn.Module):
    """torchvision-style ResNet18/34; block convs generated from ``mem`` when ring_size."""

    def __init__(self, arch: str, num_classes: int, ring_size: int | None = None):
        super().__init__()
        self.registry: list[RPGConv2d] = []
        if ring_size is not None:
            self.mem = Mem(ring_size)
            conv = lambda *a: RPGConv2d(self.mem, *a, self.registry)
        else:
            conv = plain_conv
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        cin = 64
        for s, (n, planes) in enumerate(zip(STAGES[arch], WIDTHS, strict=True)):
            blocks = []
            for b in range(n):
                blocks.append(Block(cin, planes, 2 if (s > 0 and b == 0) else 1, conv))
                cin = planes
            setattr(self, f"layer{s + 1}", torch.nn.Sequential(*blocks))
        self.fc = torch.nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2, padding=1)
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def randomise_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))


def assign_tables(model: TorchResNet, rng: np.random.Generator) -> tuple[list, list]:
    """Evenly sampled ring indices and random +1/-1 masks, one pair per generated conv."""
    sizes = [math.prod(conv.shape) for conv in model.registry]
    ring = model.mem.w.numel()
    flat = rng.permutation(sum(sizes)) % ring  # every entry used floor(T/N) or ceil(T/N) times
    idxs, masks = [], []
    for conv, piece in zip(model.registry, np.split(flat, np.cumsum(sizes)[:-1]), strict=True):
        mask = rng.choice(np.array([-1.0, 1.0], np.float32), size=piece.size)
        conv.idx, conv.mask = torch.from_numpy(piece.astype(np.int64)), torch.from_numpy(mask)
        idxs.append(piece.astype(np.int64))
        masks.append(mask)
    return idxs, masks


def save_object_array(path, entries: list) -> None:
    array = np.empty(len(entries), dtype=object)
    array[:] = entries
    np.save(path, array, allow_pickle=True)


def make_reference(tmp_path, arch: str, num_classes: int, ring_size: int, seed: int):
    """A reference RPG model and its checkpoint files: (model, pth, p_idxs, b_masks, idxs,
    masks)."""
    torch.manual_seed(seed)
    model = TorchResNet(arch, num_classes, ring_size)
    randomise_bn(model, torch.Generator().manual_seed(seed))
    idxs, masks = assign_tables(model, np.random.default_rng(seed))
    model.eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    pth = tmp_path / "x.pth.tar"
    torch.save({"epoch": 7, "state_dict": state}, pth)
    p_idxs, b_masks = tmp_path / "xp_idxs.npy", tmp_path / "xb_masks.npy"
    save_object_array(p_idxs, idxs)
    save_object_array(b_masks, masks)
    return model, pth, p_idxs, b_masks, idxs, masks


def torch_logits(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def flax_logits(ckpt, x_nhwc: np.ndarray) -> np.ndarray:
    variables = {"params": generate_params(ckpt.bank, ckpt.spec),
                 "batch_stats": ckpt.batch_stats}
    return np.asarray(ckpt.model.apply(variables, jnp.asarray(x_nhwc), train=False))


def report(name: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.max(np.abs(got - want)))
    print(f"{name}: max |logit diff| = {diff:.3g} (max |logit| = {np.max(np.abs(want)):.3g})")
    return diff


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref18(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref18")
    model, pth, p_idxs, b_masks, idxs, masks = make_reference(tmp, "resnet18", 10, 50_000, 0)
    ckpt = load_reference_checkpoint(str(pth), str(p_idxs), str(b_masks), arch="resnet18")
    return dict(model=model, pth=pth, p_idxs=p_idxs, b_masks=b_masks, idxs=idxs, masks=masks,
                ckpt=ckpt, dir=tmp)


# ----------------------------------------------------------------------------- equivalence


def test_resnet18_logits_match_reference(ref18):
    ckpt = ref18["ckpt"]
    assert ckpt.step == 7
    assert ckpt.info.name == "imagenet2012" and ckpt.info.num_classes == 10
    assert ckpt.config.model == "resnet18" and ckpt.config.rpg.ring_size == 50_000.0
    assert ckpt.spec.rings[0].size == 50_000
    assert ckpt.spec.rings[0].length == sum(i.size for i in ref18["idxs"])
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    want = torch_logits(ref18["model"], x)
    got = flax_logits(ckpt, x)
    assert got.shape == (2, 10)
    assert report("resnet18 RPG 64x64", got, want) <= TOL


def test_generated_kernels_match_reference(ref18):
    """Every generated kernel equals the reference kernel, transposed OIHW -> HWIO."""
    params = generate_params(ref18["ckpt"].bank, ref18["ckpt"].spec)
    for name, module in ref18["model"].named_modules():
        if isinstance(module, RPGConv2d):
            layer, rest = re.fullmatch(r"layer(\d+\.\d+)\.(.*)", name).groups()
            flax_name = {"downsample.0": "downsample_conv"}.get(rest, rest)
            with torch.no_grad():
                want = (module.c * module.mask * module._mem[0].w[module.idx]).reshape(
                    module.shape).numpy().transpose(2, 3, 1, 0)
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


def test_resnet34_logits_match_reference(tmp_path):
    model, pth, p_idxs, b_masks, _, _ = make_reference(tmp_path, "resnet34", 5, 20_000, 3)
    ckpt = load_reference_checkpoint(str(pth), str(p_idxs), str(b_masks), arch="ResNet34")
    x = np.random.default_rng(4).normal(size=(1, 32, 32, 3)).astype(np.float32)
    got = flax_logits(ckpt, x)
    assert got.shape == (1, 5)
    assert report("resnet34 RPG 32x32", got, torch_logits(model, x)) <= TOL


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
    save_object_array(p, idxs)
    save_object_array(b, masks)
    return load_reference_checkpoint(str(ref18["pth"]), str(p), str(b), arch=arch)


def test_missing_table(ref18, tmp_path):
    idxs, masks = list(ref18["idxs"]), list(ref18["masks"])
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
        _load_with(ref18, tmp_path, ref18["idxs"], ref18["masks"], arch="resnet34")


def test_index_out_of_range_and_bad_mask(ref18, tmp_path):
    idxs, masks = list(ref18["idxs"]), list(ref18["masks"])
    idxs[3] = idxs[3].copy()
    idxs[3][17] = 50_000
    with pytest.raises(ValueError, match=r"layer1\.1\.conv2 \(p_idxs\[3\]\): index 50000 is "
                                         r"outside the ring \[0, 50000\)"):
        _load_with(ref18, tmp_path, idxs, masks)
    idxs, masks = list(ref18["idxs"]), list(ref18["masks"])
    masks[6] = masks[6].copy()
    masks[6][0] = 0.0
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2 \(p_idxs\[6\]\): mask values"):
        _load_with(ref18, tmp_path, idxs, masks)


def test_state_dict_key_errors(ref18, tmp_path):
    state = torch.load(ref18["pth"], weights_only=False)["state_dict"]
    missing = {k: v for k, v in state.items() if k != "module.layer3.1.bn2.running_var"}
    torch.save(missing, tmp_path / "m.pth.tar")  # a bare state_dict
    with pytest.raises(ValueError, match=r"no 'layer3\.1\.bn2\.running_var'"):
        load_reference_checkpoint(str(tmp_path / "m.pth.tar"), str(ref18["p_idxs"]),
                                  str(ref18["b_masks"]))
    extra = {**state, "module.layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}
    torch.save({"state_dict": extra}, tmp_path / "e.pth.tar")
    with pytest.raises(ValueError, match=r"does not use: \['layer1\.0\.conv1\.weight'\]"):
        load_reference_checkpoint(str(tmp_path / "e.pth.tar"), str(ref18["p_idxs"]),
                                  str(ref18["b_masks"]))
    bad = {**state, "module.bn1.weight": torch.ones(32)}
    torch.save({"state_dict": bad}, tmp_path / "b.pth.tar")
    with pytest.raises(ValueError, match=r"state_dict\['bn1\.weight'\]: expected shape \(64,\)"):
        load_reference_checkpoint(str(tmp_path / "b.pth.tar"), str(ref18["p_idxs"]),
                                  str(ref18["b_masks"]))


def test_unsupported_arch(ref18):
    with pytest.raises(ValueError, match=r"resnet50.*valid: resnet18, resnet34"):
        load_reference_checkpoint(str(ref18["pth"]), str(ref18["p_idxs"]),
                                  str(ref18["b_masks"]), arch="resnet50")


def test_missing_torch_is_an_import_error(ref18, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        load_reference_checkpoint(str(ref18["pth"]), str(ref18["p_idxs"]),
                                  str(ref18["b_masks"]))
