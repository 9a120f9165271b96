"""Host input pipeline alone vs what the model consumes, in images/s.

    python benchmarks/pipeline.py [--batches 200] [--out FILE]

For Fashion-MNIST (crop + flip) and CIFAR-shaped synthetic data (crop + flip) this times
``make_train_iterator`` alone (median of repeats, after a warm-up) and the plain train step
of the model that consumes it (ResNet-20 on Fashion-MNIST at batch 128, the 32x32
ResNet18 at batch 64), and reports their ratio (target: >= 3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import rpg_jax
from _util import emit, machine  # benchmarks/_util.py (the script directory is on sys.path)
from rpg_jax import data, steps

CASES = {
    "fashion_mnist": ("resnet20", 128),
    "synthetic_cifar": ("cifar_resnet18", 64),
}


def pipeline_rate(name: str, batch_size: int, batches: int, repeats: int = 3) -> float:
    it = data.make_train_iterator(name, global_batch_size=batch_size, seed=0)
    for _ in range(20):
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def model_rate(name: str, model_name: str, batch_size: int, steps_timed: int = 5) -> float:
    info = data.dataset_info(name)
    model = rpg_jax.models.get_model(model_name, num_classes=info.num_classes)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *info.image_shape)),
                                             train=False))(jax.random.key(0, impl="rbg"))
    tx = optax.sgd(0.1, momentum=0.9)
    state = steps.init_state(variables["params"], variables["batch_stats"], tx)
    step = jax.jit(steps.make_train_step(model, tx, None, info.mean, info.std),
                   donate_argnums=0)
    batch = {"image": jnp.zeros((batch_size, *info.image_shape), jnp.uint8),
             "label": jnp.zeros((batch_size,), jnp.int32)}
    state, m = step(state, batch, {})
    jax.block_until_ready(m)
    times = []
    for _ in range(steps_timed):
        start = time.perf_counter()
        state, m = step(state, batch, {})
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"machine": machine(), "datasets": {}}
    for name, (model_name, batch_size) in CASES.items():
        host = pipeline_rate(name, batch_size, args.batches)
        consumed = model_rate(name, model_name, batch_size)
        result["datasets"][name] = {
            "batch_size": batch_size, "model": model_name,
            "pipeline_images_per_sec": host, "model_images_per_sec": consumed,
            "ratio_pipeline_over_model": host / consumed,
        }
    emit(result, args.out)


if __name__ == "__main__":
    main()
