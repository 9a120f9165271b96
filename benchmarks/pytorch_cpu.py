"""PyTorch's train step vs ours on this CPU, for the Fashion-MNIST default's network.

    python benchmarks/pytorch_cpu.py --jax-python .venv-newest/bin/python \
        --torch-python .venv/bin/python [--rounds 3] [--steps 20] [--out FILE]

Each round runs one child process per stack, in alternating order, on the same machine (the
parent imports neither stack, so either interpreter may run it). The jax child times what
benchmarks/jax_versions.py times (the RPG default and its ``plain`` variant) and the plain
variant with ``config.half_precision``. The torch child times a PyTorch ResNet-20 built
layer for layer like rpg_jax/models/resnet.py's (option-B shortcuts, 272,186 trainable
parameters, checked) with ``torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)`` and
the cross entropy, as fp32 NCHW, fp32 channels_last and bf16 autocast channels_last. Both
take one resident uint8 batch of 128 28x28x1 images, normalised inside the timed step; a
torch variant gets 3 untimed steps, then ``--steps`` timed ones (the jax ones: the compiling
call and 2 more); the torch variants' order in their process rotates with the round. Each
ratio is the median over rounds of that round's ratio of median step times; ``jax_plain_fp32
/ torch_X`` is how many times faster torch's X is than our plain step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TORCH_VARIANTS = ("fp32", "fp32_channels_last", "bf16_autocast_channels_last")
TORCH_WARMUP = 3
#: Trainable parameters of our plain ResNet-20 on 28x28x1 (BN scale and bias included).
RESNET20_PARAMS = 272_186
#: rpg_jax/data/catalog.py's Fashion-MNIST statistics (used if rpg_jax is not importable).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def median_ms(step, warmup: int, steps: int) -> float:
    """Median milliseconds of ``step()`` (which must finish its work) after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def jax_child(steps: int) -> dict:
    """jax_versions.child's timings plus the plain variant in bfloat16 (half_precision)."""
    import jax
    import numpy as np
    from jax_versions import child

    out = child(steps)
    sys.path.insert(0, ROOT)
    from configs.fashion_mnist import get_config
    from rpg_jax import data, experiment
    from rpg_jax import steps as steps_lib

    info = data.dataset_info("fashion_mnist")
    config = get_config("plain")
    config.half_precision = True
    exp = experiment.build(config, info)
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "image": rng.integers(0, 256, (config.batch_size, *info.image_shape), np.uint8),
        "label": rng.integers(0, info.num_classes, config.batch_size).astype(np.int32)})
    # as rpg_jax/train.py (via experiment.make_train_step): inputs in the compute dtype
    step = jax.jit(steps_lib.make_train_step(exp.model, exp.tx, exp.spec, info.mean, info.std,
                                             exp.lr_fn, exp.compute_dtype), donate_argnums=0)
    state = [experiment.initial_state(exp)]

    def one():
        state[0], metrics = step(state[0], batch, {})
        jax.block_until_ready(metrics)

    t0 = time.perf_counter()
    one()
    compile_s = time.perf_counter() - t0
    out["plain_bf16"] = {"median_step_ms": median_ms(one, 2, steps), "first_call_s": compile_s}
    return out


def torch_resnet20(nn):
    """rpg_jax.models.ResNet20 in PyTorch (``nn`` is ``torch.nn``), 1 input channel."""

    def bn(c):  # flax momentum 0.9 is torch momentum 0.1
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, planes: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = bn(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = bn(planes)
            self.downsample = nn.Identity()
            if stride != 1 or cin != planes:  # option B: 1x1 projection + BN
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, 0, bias=False),
                                                bn(planes))

        def forward(self, x):
            y = nn.functional.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return nn.functional.relu(y + self.downsample(x))

    class ResNet20(nn.Module):
        def __init__(self, in_channels: int = 1, num_classes: int = 10):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)  # cifar stem
            self.bn1 = bn(16)
            blocks, cin = [], 16
            for i, planes in enumerate((16, 32, 64)):
                for j in range(3):
                    blocks.append(BasicBlock(cin, planes, 2 if (i > 0 and j == 0) else 1))
                    cin = planes
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, num_classes)
            for m in self.modules():  # as our conv_kernel_init (and torchvision)
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.layers(nn.functional.relu(self.bn1(self.conv1(x))))
            # ours pools in float32 (a no-op in fp32; under autocast the fc casts back)
            return self.fc(x.float().mean((2, 3)))

    return ResNet20()


def fashion_mnist_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from rpg_jax if it imports here, else catalog.py's values."""
    sys.path.insert(0, ROOT)
    try:
        from rpg_jax.data import dataset_info
    except ImportError:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    info = dataset_info("fashion_mnist")
    return tuple(info.mean), tuple(info.std)


def torch_child(steps: int, round_index: int = 0) -> dict:
    """Median step time (ms) of each PyTorch variant, this interpreter; the variants' order
    is rotated by ``round_index`` (so no variant is always the first in its process)."""
    import torch

    torch.set_num_threads(os.cpu_count())
    mean, std = fashion_mnist_stats()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, len(mean), 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (128,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "mkldnn": torch.backends.mkldnn.is_available(), "threads": torch.get_num_threads()}
    shift = round_index % len(TORCH_VARIANTS)
    for variant in TORCH_VARIANTS[shift:] + TORCH_VARIANTS[:shift]:
        torch.manual_seed(0)
        model = torch_resnet20(torch.nn).train()
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if n != RESNET20_PARAMS:
            raise RuntimeError(f"torch ResNet-20 has {n:,} trainable parameters, "
                               f"ours {RESNET20_PARAMS:,}: the models differ")
        x = images
        if variant.endswith("channels_last"):
            model = model.to(memory_format=torch.channels_last)
            x = images.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        bf16 = variant.startswith("bf16")

        def one(model=model, x=x, opt=opt, bf16=bf16):
            opt.zero_grad()
            inputs = (x.float() / 255.0 - mean_t) / std_t
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(inputs).float(), labels)
            loss.backward()
            opt.step()

        out[variant] = {"median_step_ms": median_ms(one, TORCH_WARMUP, steps)}
    out["params"] = RESNET20_PARAMS
    return out


def run_child(kind: str, python: str, steps: int, round_index: int, env: dict) -> dict:
    """One child's JSON line; exits naming the interpreter if it fails."""
    proc = subprocess.run([python, os.path.abspath(__file__), "--child", kind,
                           "--steps", str(steps), "--round", str(round_index)],
                          env=env, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        sys.exit(f"{kind} child {python} failed (exit {proc.returncode}):\n"
                 f"{proc.stderr[-3000:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        sys.exit(f"{kind} child {python} printed no JSON line:\n{proc.stdout[-1000:]}\n"
                 f"{proc.stderr[-2000:]}")


def step_ms(jax_run: dict, torch_run: dict) -> dict[str, float]:
    """Median step ms of every variant of one round, by name."""
    ms = {"jax_rpg": jax_run["rpg"]["median_step_ms"],
          "jax_plain_fp32": jax_run["plain"]["median_step_ms"],
          "jax_plain_bf16": jax_run["plain_bf16"]["median_step_ms"]}
    ms.update({f"torch_{v}": torch_run[v]["median_step_ms"] for v in TORCH_VARIANTS})
    return ms


def ratios(ms: dict[str, float]) -> dict[str, float]:
    """One round's ratios of median step times."""
    out = {f"jax_plain_fp32 / torch_{v}": ms["jax_plain_fp32"] / ms[f"torch_{v}"]
           for v in TORCH_VARIANTS}
    out["jax_rpg / jax_plain_fp32"] = ms["jax_rpg"] / ms["jax_plain_fp32"]
    out["jax_plain_bf16 / jax_plain_fp32"] = ms["jax_plain_bf16"] / ms["jax_plain_fp32"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jax-python", help="an interpreter with jax (and rpg_jax's deps)")
    ap.add_argument("--torch-python", help="an interpreter with torch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = (jax_child(args.steps) if args.child == "jax"
                  else torch_child(args.steps, args.round))
        print(json.dumps(result))
        return
    if not (args.jax_python and args.torch_python):
        ap.error("give both --jax-python and --torch-python")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    pythons = {"jax": args.jax_python, "torch": args.torch_python}
    per_round = []
    for r in range(args.rounds):
        order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
        entry = {"order": list(order)}
        for kind in order:
            entry[kind] = run_child(kind, pythons[kind], args.steps, r, env)
            print(f"round {r}: {kind}: {entry[kind]}", file=sys.stderr)
        per_round.append(entry)
    ms = [step_ms(x["jax"], x["torch"]) for x in per_round]
    rs = [ratios(m) for m in ms]
    jax_first, torch_first = per_round[0]["jax"], per_round[0]["torch"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _util import emit, machine
    m = machine()
    m.pop("jax", None)
    emit({"benchmark": "fashion_mnist ResNet-20 train step: PyTorch vs rpg_jax on CPU",
          "machine": m, "rounds": args.rounds, "steps": args.steps,
          "torch_warmup_steps": TORCH_WARMUP,
          "jax": {"python": jax_first["python"], "jax": jax_first["jax"]},
          "torch": {k: torch_first[k] for k in ("python", "torch", "mkldnn", "threads")},
          "median_step_ms": {k: statistics.median(x[k] for x in ms) for k in ms[0]},
          "ratios": {k: statistics.median(x[k] for x in rs) for k in rs[0]},
          "per_round": per_round}, args.out)


if __name__ == "__main__":
    main()
