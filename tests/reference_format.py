"""The authors' PyTorch RPG ResNet18/34 and the files their code writes, rebuilt for tests.

As in their model file, the ring module ``mem`` is an attribute of the model and of every
generated conv, so ``state_dict()`` lists its ``w`` as ``mem.w`` and again as
``<conv>.mem.w`` for each generated conv. As in their ``main.py``, the model is wrapped in
DataParallel (keys ``module.``), ``<savename>.pth.tar`` is ``{epoch, arch, state_dict,
best_acc1, optimizer}``, and the index / mask vector of every generated conv go to
``<savename>p_idxs.npy`` / ``<savename>b_masks.npy``: pickled 1-D object arrays in
registration order, int64 indices over the OIHW-flattened kernel, int64 +1/-1 masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

F = torch.nn.functional

RING_FAN = 4608  # 512 * 3 * 3: the ring is initialised as a (512, -1, 3, 3) kernel
STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)


class Mem(torch.nn.Module):
    """The ring ``w`` and the tables it hands out, one (index, mask) pair per conv."""

    def __init__(self, size: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(size))
        torch.nn.init.kaiming_normal_(self.w.data.view(512, -1, 3, 3), mode="fan_out")
        self.convs: list[RPGConv2d] = []  # a plain list: not submodules
        self.p_idxs: list[np.ndarray] = []
        self.b_masks: list[np.ndarray] = []

    def assign(self, rng: np.random.Generator) -> None:
        """Even sampling: floor(T/N) copies of every entry plus T mod N distinct ones,
        shuffled once, cut into the registered convs' chunks in registration order."""
        sizes = [math.prod(conv.shape) for conv in self.convs]
        total, n = sum(sizes), self.w.numel()
        pool = np.concatenate([np.tile(np.arange(n), total // n),
                               rng.choice(n, total % n, replace=False)])
        pool = rng.permutation(pool)
        for conv, idx in zip(self.convs, np.split(pool, np.cumsum(sizes)[:-1]), strict=True):
            mask = rng.choice(np.array([-1, 1], np.int64), size=idx.size)
            conv.idx = torch.from_numpy(idx.astype(np.int64))
            conv.mask = torch.from_numpy(mask.astype(np.float32))
            self.p_idxs.append(idx.astype(np.int64))
            self.b_masks.append(mask)


class RPGConv2d(torch.nn.Module):
    """A conv whose kernel is (c * mask * mem.w[idx]).reshape(O, I, kh, kw)."""

    def __init__(self, mem: Mem, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.mem = mem  # a submodule: the state_dict lists the ring again under this conv
        self.shape = (cout, cin, k, k)
        self.stride, self.pad = stride, (k - 1) // 2
        self.c = math.sqrt(RING_FAN / (cout * k * k))
        self.idx = self.mask = None  # set by Mem.assign; kept out of the state_dict
        mem.convs.append(self)

    def kernel(self) -> torch.Tensor:
        return (self.c * self.mask * self.mem.w[self.idx]).reshape(self.shape)

    def forward(self, x):
        return F.conv2d(x, self.kernel(), stride=self.stride, padding=self.pad)


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
        if ring_size is not None:
            self.mem = Mem(ring_size)
            conv = lambda *a: RPGConv2d(self.mem, *a)
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
    """Non-trivial BN affine parameters and running statistics (as after training)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))


def object_array(entries: list) -> np.ndarray:
    """The 1-D object array NumPy < 1.24 makes of a list of unequal vectors."""
    array = np.empty(len(entries), dtype=object)
    array[:] = entries
    return array


def save_tables(mem: Mem, savename: str) -> None:
    """``<savename>p_idxs.npy`` and ``<savename>b_masks.npy``, as written at model build."""
    np.save(f"{savename}p_idxs.npy", object_array(mem.p_idxs), allow_pickle=True)
    np.save(f"{savename}b_masks.npy", object_array(mem.b_masks), allow_pickle=True)


def save_checkpoint(model: torch.nn.Module, savename: str, arch: str, epoch: int,
                    best_acc1: float) -> None:
    """``<savename>.pth.tar`` of the DataParallel-wrapped model, as their main.py saves it."""
    parallel = torch.nn.DataParallel(model)
    optimizer = torch.optim.SGD(parallel.parameters(), lr=0.1, momentum=0.9,
                                weight_decay=1e-4)
    torch.save({"epoch": epoch, "arch": arch, "state_dict": parallel.state_dict(),
                "best_acc1": torch.tensor(best_acc1), "optimizer": optimizer.state_dict()},
               f"{savename}.pth.tar")


def build_reference(savename: str, arch: str, num_classes: int, ring_size: int, seed: int,
                    epoch: int = 7, best_acc1: float = 61.25) -> TorchResNet:
    """A reference RPG model in eval mode, its side files and its checkpoint."""
    torch.manual_seed(seed)
    model = TorchResNet(arch, num_classes, ring_size)
    model.mem.assign(np.random.default_rng(seed))
    save_tables(model.mem, savename)
    randomise_bn(model, torch.Generator().manual_seed(seed))
    model.eval()
    save_checkpoint(model, savename, arch, epoch, best_acc1)
    return model
