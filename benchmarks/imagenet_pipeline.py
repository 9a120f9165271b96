"""ImageNet host input pipeline, images/s per core: today's path, the new path and tf.data.

    python benchmarks/imagenet_pipeline.py [--data_dir DIR] [--tf_python VENV/bin/python]
        [--rounds 3] [--out benchmarks/results/imagenet_pipeline.json]

Data: ``--num_train`` + ``--num_eval`` JPEGs (quality 90) with ImageNet's size distribution
(long side 500 px for 8 in 10, 501-1000 px or 200-499 px for 1 in 10 each, aspect 1:1
to 4:3, a quarter portrait), natural-image-like content (1/f colour noise with overlaid
shapes: smooth structures, edges and texture, ~100 KB at 500x375), written once into the
array_record layout that ``tfds.data_source("imagenet2012")`` reads (``--data_dir``; kept
between runs).

Cases, each in a child process pinned to ``workers`` CPU cores (so images/s / workers is
per core), alternated round by round so that load from other processes hits all alike:

* ``today``: ``make_train_iterator``/``make_eval_batches`` with ``decoder="pil"`` (full
  Pillow decode, Pillow's antialiased resize), the path before the JPEG work;
* ``new``: the same with ``decoder="turbo"`` (crop from the header, DCT-domain downscale,
  uint8 warp);
* ``tfdata``: the Flax ImageNet example's tf.data pipeline (``decode_and_crop_jpeg`` of a
  ``sample_distorted_bounding_box`` window, bicubic resize, flip, normalisation; eval:
  centre crop of 224/256 of the short side) on the same serialized records, run by
  ``--tf_python`` (a separate venv with ``tensorflow-cpu`` and ``array_record``;
  TensorFlow is never a dependency of rpg_jax). tf.data has no array_record reader, so the
  child reads the records once into memory and feeds them with ``from_tensor_slices``.

Train and eval, 1 and 2 grain workers (tf.data: 1 and 2 cores, AUTOTUNE parallelism). The
JSON also gives the host cores one accelerator needs at ``--model_rate`` images/s (H200,
ResNet18 224 px bfloat16 batch 256, benchmarks/results/gpu.json) with each path.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

H200_RESNET18_RATE = 14_991.0  # images/s, 224 px bf16 batch 256 (plain; RPG step 1.013x)
RPG_STEP_RATIO = 1.013


# ------------------------------------------------------------------------------ data


def natural_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A natural-looking uint8 HxWx3 image: 1/f colour noise plus a few soft ellipses."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :, None]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    shape = (h, w // 2 + 1, 3)
    spectrum = f**-0.8 * rng.standard_normal(shape, np.float32) * np.exp(
        2j * np.pi * rng.random(shape, np.float32))
    base = np.fft.irfft2(spectrum, s=(h, w), axes=(0, 1)).astype(np.float32)
    base = base @ (rng.normal(size=(3, 3)) * 0.4 + np.eye(3)).astype(np.float32)
    image = 128 + 45 * (base - base.mean()) / (base.std() + 1e-8)
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = rng.random() * h, rng.random() * w
        ry, rx = (0.05 + 0.3 * rng.random()) * h, (0.05 + 0.3 * rng.random()) * w
        y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        patch = image[y0:y1, x0:x1]
        patch[inside] = patch[inside] * 0.5 + rng.uniform(0, 255, 3).astype(np.float32) * 0.5
    return np.clip(image, 0, 255).astype(np.uint8)


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(h, w): long side 500 (8 in 10), 501-1000 (1 in 10) or 200-499; aspect 1 to 4/3."""
    u = rng.random()
    long_side = 500 if u < 0.8 else int(rng.integers(501, 1001)) if u < 0.9 else int(
        rng.integers(200, 500))
    short_side = int(round(long_side / rng.uniform(1.0, 4 / 3)))
    return (long_side, short_side) if rng.random() < 0.25 else (short_side, long_side)


def _jpeg_example(seed_and_index: tuple[int, int]) -> dict:
    from PIL import Image

    seed, i = seed_and_index
    rng = np.random.default_rng([seed, i])
    h, w = imagenet_like_size(rng)
    buf = io.BytesIO()
    Image.fromarray(natural_image(rng, h, w)).save(buf, "JPEG", quality=90)
    return {"image": buf.getvalue(), "label": int(rng.integers(1000)),
            "file_name": f"synthetic_{seed}_{i:06d}.JPEG"}


def jpeg_examples(n: int, seed: int):
    """Yields ``{"image": JPEG bytes, "label", "file_name"}`` for the TFDS writer.

    Example ``i`` depends on ``(seed, i)`` only; made by one process per core.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        yield from pool.imap(_jpeg_example, [(seed, i) for i in range(n)], chunksize=8)


def ensure_data(data_dir: str, num_train: int, num_eval: int) -> dict:
    """Writes the JPEG set once (skipped when the same sizes are there); returns its stats."""
    from rpg_jax.data import jpeg, sources

    marker = os.path.join(data_dir, f"synthetic_jpegs_{num_train}_{num_eval}.json")
    if not os.path.exists(marker):
        t = time.perf_counter()
        sources.write_tfds_split("imagenet2012", data_dir, {
            "train": jpeg_examples(num_train, seed=0), "validation": jpeg_examples(num_eval, 1)})
        src = sources.tfds_source("imagenet2012", "train", data_dir, encoded=True)
        sizes, shapes = [], []
        for i in range(len(src)):
            data = src.read_encoded(i)[0]
            sizes.append(len(data))
            shapes.append(jpeg.image_size(data)[:2])
        shapes = np.array(shapes)
        stats = {"num_train": num_train, "num_eval": num_eval,
                 "mean_jpeg_kb": float(np.mean(sizes) / 1e3),
                 "median_shorter_side": float(np.median(shapes.min(1))),
                 "fraction_shorter_side_300_500": float(np.mean(
                     (shapes.min(1) >= 300) & (shapes.min(1) <= 500))),
                 "fraction_longer_side_over_500": float(np.mean(shapes.max(1) > 500)),
                 "write_seconds": time.perf_counter() - t}
        with open(marker, "w") as f:
            json.dump(stats, f)
    with open(marker) as f:
        return json.load(f)


# ------------------------------------------------------------------------- children


def _pin(cores: int) -> None:
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(available[:cores]))


def _time_batches(batches, batch_size: int, warmup: int, timed: int) -> float:
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)
    return timed * batch_size / (time.perf_counter() - start)


def child_ours(args) -> float:
    from rpg_jax import data

    if args.mode == "train":
        batches = data.make_train_iterator(
            "imagenet2012", global_batch_size=args.batch_size, seed=0, data_dir=args.data_dir,
            worker_count=args.workers, decoder=args.decoder)
    else:
        evals = data.make_eval_batches(
            "imagenet2012", global_batch_size=args.batch_size, data_dir=args.data_dir,
            worker_count=args.workers, decoder=args.decoder)
        needed = args.warmup + args.timed
        if len(evals) < needed:
            raise ValueError(f"eval split has {len(evals)} batches, the run needs {needed}")
        batches = iter(evals)
    return _time_batches(batches, args.batch_size, args.warmup, args.timed)


def child_tfdata(args) -> float:
    """The Flax ImageNet example's input pipeline (examples/imagenet/input_pipeline.py)."""
    import glob

    import tensorflow as tf
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    split = "train" if args.mode == "train" else "validation"
    files = sorted(glob.glob(os.path.join(
        args.data_dir, "imagenet2012", "*", f"imagenet2012-{split}.array_record-*")))
    source = ArrayRecordDataSource(files)
    records = [source[i] for i in range(len(source))]
    size, crop_padding = 224, 32
    mean = tf.constant([0.485 * 255, 0.456 * 255, 0.406 * 255], shape=[1, 1, 3])
    std = tf.constant([0.229 * 255, 0.224 * 255, 0.225 * 255], shape=[1, 1, 3])
    resize = tf.image.ResizeMethod.BICUBIC

    def center_crop(image_bytes):
        shape = tf.io.extract_jpeg_shape(image_bytes)
        h, w = shape[0], shape[1]
        side = tf.cast(size / (size + crop_padding) * tf.cast(tf.minimum(h, w), tf.float32),
                       tf.int32)
        window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
        image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
        return tf.image.resize([image], [size, size], method=resize)[0]

    def random_crop(image_bytes):
        bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
        shape = tf.io.extract_jpeg_shape(image_bytes)
        begin, box_size, _ = tf.image.sample_distorted_bounding_box(
            shape, bounding_boxes=bbox, min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        y, x, _ = tf.unstack(begin)
        h, w, _ = tf.unstack(box_size)
        image = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
        bad = tf.reduce_sum(tf.cast(tf.equal(shape, tf.shape(image)), tf.int32)) >= 3
        return tf.cond(bad, lambda: center_crop(image_bytes),
                       lambda: tf.image.resize([image], [size, size], method=resize)[0])

    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64)}

    def preprocess(record):
        example = tf.io.parse_single_example(record, features)
        if args.mode == "train":
            image = tf.image.random_flip_left_right(random_crop(example["image"]))
        else:
            image = center_crop(example["image"])
        image = tf.reshape(image, [size, size, 3])
        return {"image": (image - mean) / std, "label": example["label"]}

    ds = tf.data.Dataset.from_tensor_slices(records)
    if args.mode == "train":
        ds = ds.repeat().shuffle(16 * args.batch_size, seed=0)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(args.batch_size, drop_remainder=True).prefetch(10)
    options = tf.data.Options()
    options.threading.private_threadpool_size = args.workers
    ds = ds.with_options(options)
    return _time_batches(iter(ds), args.batch_size, args.warmup, args.timed)


def paired_transform_rates(data_dir: str, rounds: int, per_round: int = 64) -> dict:
    """Today's vs the new per-image work (read, decode, crop, resize) on one pinned core.

    The two alternate every ``per_round`` images in one process, so load from other
    processes hits both alike; returns median images/s and the median paired ratio.
    """
    from rpg_jax.data import hashing, pipeline, sources

    _pin(1)
    result = {}
    for mode, split in (("train", "train"), ("eval", "validation")):
        src = sources.tfds_source("imagenet2012", split, data_dir, encoded=True)
        readers = {d: pipeline._ImageReader(src, 224, d, "error") for d in ("pil", "turbo")}
        out = np.empty((224, 224, 3), np.uint8)
        rates: dict[str, list[float]] = {"pil": [], "turbo": []}
        for r in range(rounds):
            indices = [(r * per_round + j) % len(src) for j in range(per_round)]
            keys = hashing.example_bits(0, np.array(indices)).tolist()
            for decoder, reader in readers.items():
                start = time.perf_counter()
                for i, key in zip(indices, keys, strict=True):
                    reader.train(i, key, out) if mode == "train" else reader.eval(i, out)
                rates[decoder].append(per_round / (time.perf_counter() - start))
        result[mode] = {
            "today_images_per_sec": statistics.median(rates["pil"]),
            "new_images_per_sec": statistics.median(rates["turbo"]),
            "new_over_today": statistics.median(
                [a / b for a, b in zip(rates["turbo"], rates["pil"], strict=True)]),
        }
    return result


def run_child(python: str, case: dict, args) -> float:
    cmd = [python, os.path.abspath(__file__), "--child", case["path"], "--mode", case["mode"],
           "--workers", str(case["workers"]), "--data_dir", args.data_dir,
           "--batch_size", str(args.batch_size), "--warmup", str(args.warmup),
           "--timed", str(args.timed)]
    if case["path"] != "tfdata":
        cmd += ["--decoder", {"today": "pil", "new": "turbo"}[case["path"]]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ train runs (GPU)


def host_pipeline_rate(data_dir: str, batch_size: int, workers: int, batches: int = 30) -> float:
    """images/s of the host train iterator alone (``decoder="turbo"``, all cores)."""
    from rpg_jax import data

    it = data.make_train_iterator("imagenet2012", global_batch_size=batch_size, seed=0,
                                  data_dir=data_dir, worker_count=workers)
    return _time_batches(it, batch_size, 5, batches)


def train_runs(args) -> dict:
    """``train_and_evaluate`` of RPG ResNet18 (bf16, batch 256) with the host path and DALI.

    Reports the loop's images/s next to the host pipeline alone and the train step alone
    (``--step_rate``, e.g. from benchmarks/results/gpu.json): a loop more than 10% below
    the step's rate is input-bound.
    """
    import importlib.util
    import inspect

    import jax

    from rpg_jax import train
    from rpg_jax.config import validate

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs"))
    import imagenet_resnet18_rpg

    workers = args.train_workers or max(1, (os.cpu_count() or 2) - 2)
    result = {"steps": args.train_steps, "worker_count": workers,
              "backend": jax.default_backend(), "step_rate_images_per_sec": args.step_rate,
              "batch_size": args.train_batch_size,
              "host_pipeline_images_per_sec": host_pipeline_rate(
                  args.data_dir, args.train_batch_size, workers)}
    for decoder in ("turbo", "dali"):
        if decoder == "dali":
            if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec(
                    "nvidia.dali") is None:
                result[decoder] = {"skipped": "NVIDIA DALI is not installed"}
                continue
            if "image_decoder" not in inspect.getsource(train):
                result[decoder] = {"skipped": "rpg_jax/train.py does not pass "
                                   "config.image_decoder to make_train_iterator"}
                continue
        config = imagenet_resnet18_rpg.get_config()
        config.data_dir = args.data_dir
        config.half_precision = True
        config.batch_size = args.train_batch_size
        config.num_train_steps = args.train_steps
        config.log_every_steps = 50
        config.eval_every_steps = 0
        config.eval_steps = 4
        config.checkpoint_every_steps = 0
        config.worker_count = workers
        config.image_decoder = decoder
        validate(config)
        with tempfile.TemporaryDirectory() as workdir:
            summary = train.train_and_evaluate(config, workdir)
        rate = summary["images_per_sec"]
        result[decoder] = {"images_per_sec": rate, "train_seconds": summary["train_seconds"],
                           "input_bound": None if args.step_rate is None
                           else rate < 0.9 * args.step_rate}
        print(decoder, json.dumps(result[decoder]), file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(),
                                                           "rpg_jax_imagenet_jpegs"))
    parser.add_argument("--num_train", type=int, default=1536)
    parser.add_argument("--num_eval", type=int, default=1280)
    parser.add_argument("--tf_python", default="", help="python of a tensorflow-cpu venv")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paired_rounds", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=16)
    parser.add_argument("--model_rate", type=float, default=H200_RESNET18_RATE)
    parser.add_argument("--cases", default="", help="e.g. train/2,eval/1 (default: all four)")
    parser.add_argument("--no_paired", action="store_true", help="skip the one-core pairs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--train_run", action="store_true",
                        help="instead: train_and_evaluate runs, host path and DALI (GPU)")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--train_batch_size", type=int, default=256)
    parser.add_argument("--train_workers", type=int, default=0, help="0: cores - 2")
    parser.add_argument("--step_rate", type=float, default=None,
                        help="images/s of the train step alone, for the input-bound check")
    parser.add_argument("--child", choices=("today", "new", "tfdata"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--decoder", default="turbo")
    args = parser.parse_args()
    if args.child:
        _pin(args.workers)
        rate = child_tfdata(args) if args.child == "tfdata" else child_ours(args)
        print(rate)
        return

    from _util import emit, machine  # benchmarks/_util.py (imports jax: parent only)

    stats = ensure_data(args.data_dir, args.num_train, args.num_eval)
    if args.train_run:
        emit({"machine": machine(), "data": stats, "train_runs": train_runs(args)}, args.out)
        return
    loads = [os.getloadavg()]
    paired = None if args.no_paired else paired_transform_rates(args.data_dir, args.paired_rounds)
    paths = ["today", "new"] + (["tfdata"] if args.tf_python else [])
    groups = args.cases.split(",") if args.cases else ["train/1", "train/2", "eval/1", "eval/2"]
    cases = [{"path": p, "mode": g.split("/")[0], "workers": int(g.split("/")[1])}
             for g in groups for p in paths]
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for case in cases:
            python = args.tf_python if case["path"] == "tfdata" else sys.executable
            key = f"{case['path']}/{case['mode']}/{case['workers']}"
            rates.setdefault(key, []).append(run_child(python, case, args) / case["workers"])
            print(key, f"{rates[key][-1]:.0f} images/s per core", file=sys.stderr)
        loads.append(os.getloadavg())
    table = {}
    for group in groups:
        mode, w = group.split("/")[0], int(group.split("/")[1])
        row = {p: statistics.median(rates[f"{p}/{mode}/{w}"]) for p in paths}
        ratios = {f"new_over_{p}": statistics.median(
            [a / b for a, b in zip(rates[f"new/{mode}/{w}"], rates[f"{p}/{mode}/{w}"],
                                   strict=True)]) for p in paths if p != "new"}
        table[f"{mode}/{w}_workers"] = {"images_per_sec_per_core": row, "paired_ratios": ratios}
    rpg_rate = args.model_rate / RPG_STEP_RATIO
    cores = {}
    if "train/1_workers" in table:
        per_core = table["train/1_workers"]["images_per_sec_per_core"]
        cores = {p: {"plain": math.ceil(args.model_rate / per_core[p]),
                     "rpg": math.ceil(rpg_rate / per_core[p])} for p in paths}
    result = {
        "machine": machine(), "loadavg": loads, "data": stats,
        "settings": {k: getattr(args, k) for k in ("rounds", "batch_size", "warmup", "timed")},
        "paired_one_core_transforms": paired,
        "per_round_images_per_sec_per_core": rates, "table": table,
        "model_rate_images_per_sec": {"plain": args.model_rate, "rpg": rpg_rate},
        "host_cores_per_accelerator_train": cores,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
