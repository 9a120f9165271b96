"""Optional NVIDIA DALI train path: GPU JPEG decode of host-chosen crop windows.

The host does what is cheap: the shuffled index stream of
:func:`rpg_jax.data.pipeline.train_index_batches`, reading the JPEG bytes and sampling
each crop box and flip from the header (:func:`rpg_jax.data.augment.inception_box` with
the same Philox key per stream position as the host path). DALI does the rest on the
GPU: ``fn.decoders.image_slice`` (nvJPEG, decoding only the window), ``fn.resize`` to
224 x 224 (bilinear) and ``fn.flip``. So a given ``(seed, position)`` gets the same
example, box and flip as with ``decoder="turbo"``; batches arrive as uint8 jax arrays on
the GPU, ready for the same train step.

Corrupt data: headers are parsed on the host, so a corrupt header is handled by
``on_corrupt`` as on the host path; damage that only the GPU decoder sees surfaces as
DALI's error. One GPU per process (the usual one-process-per-GPU layout).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from rpg_jax.data import augment, hashing, jpeg, pipeline

DALI_INSTALL = (
    "install NVIDIA DALI for your CUDA version on a machine with an NVIDIA GPU: "
    "`pip install nvidia-dali-cuda120` (CUDA 12) or `pip install nvidia-dali-cuda130` (CUDA 13)"
)


def import_dali() -> tuple[Any, Any, Any, Any]:
    """Returns ``(nvidia.dali, fn, types, plugin.jax)``; ImportError saying how to install."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.jax as dax
        from nvidia.dali import fn, types
    except ImportError as e:
        raise ImportError(f"decoder='dali' needs NVIDIA DALI ({e}); {DALI_INSTALL}") from e
    return dali, fn, types, dax


class CropWindows:
    """DALI ``external_source`` callable: iteration ``i`` -> host step ``start_step + i``.

    Returns per-sample lists: JPEG bytes (uint8 [n]), label (int32), crop anchor and
    shape (float32 [x, y] and [w, h], original pixels) and flip (int32 0/1).
    """

    def __init__(self, source: Any, seed: int, per_host: int, process_index: int,
                 process_count: int, start_step: int, on_corrupt: str):
        self.source = source
        self.seed = seed
        self.per_host = per_host
        self.process_index = process_index
        self.process_count = process_count
        self.start_step = start_step
        self.reader = pipeline._ImageReader(source, 224, "turbo", on_corrupt)
        self._indices = pipeline.train_index_batches(len(source), per_host, seed)

    def window(self, index: int, key: int) -> tuple[bytes, int, tuple[int, ...], bool]:
        """``(jpeg, label, (x, y, w, h), flip)`` of record ``index`` for Philox ``key``."""
        data, label, where = self.source.read_encoded(index)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"{where}: decoder='dali' needs encoded images, got an array")
        try:
            h, w, _ = jpeg.image_size(bytes(data))
        except jpeg.CorruptImageError as e:
            raise jpeg.CorruptImageError(f"{where}: {e}") from e
        rng = np.random.Generator(np.random.Philox(key=key))
        box = augment.inception_box(h, w, rng)
        return bytes(data), label, box, bool(rng.random() < 0.5)

    def _readable_window(self, index: int, key: int):
        n = len(self.source)
        for offset in range(n):
            try:
                return self.window((index + offset) % n, key)
            except jpeg.CorruptImageError as e:
                if self.reader.on_corrupt == "error":
                    raise
                self.reader._skip(e)
        raise jpeg.CorruptImageError(f"no readable image in the {n} records of {self.source!r}")

    def __call__(self, iteration: int) -> tuple[list[np.ndarray], ...]:
        # Host sub-batch j = step * P + p covers stream positions j * per_host + [0, per_host),
        # exactly as `_TrainBatch` of the host path.
        j = (self.start_step + iteration) * self.process_count + self.process_index
        indices = self._indices[j]
        positions = np.arange(j * self.per_host, (j + 1) * self.per_host, dtype=np.uint64)
        out: tuple[list[np.ndarray], ...] = ([], [], [], [], [])
        for i, key in zip(np.asarray(indices).tolist(),
                          hashing.example_bits(self.seed, positions).tolist(), strict=True):
            data, label, (x, y, cw, ch), flip = self._readable_window(i, key)
            out[0].append(np.frombuffer(data, np.uint8))
            out[1].append(np.array(label, np.int32))
            out[2].append(np.array([x, y], np.float32))
            out[3].append(np.array([cw, ch], np.float32))
            out[4].append(np.array(int(flip), np.int32))
        return out


class DaliTrainIterator:
    """Infinite iterator of ``{"image": uint8 [b, 224, 224, 3], "label": int32 [b]}`` on the GPU.

    Checkpointable like grain's iterators (``get_state``/``set_state`` bytes, as
    ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` use them).
    """

    def __init__(self, windows: CropWindows, device_id: int, num_threads: int):
        self._windows = windows
        self._device_id = device_id
        self._num_threads = num_threads
        self._step = windows.start_step
        self._iterator = None

    def _build(self) -> Any:
        dali, fn, types, dax = import_dali()
        self._windows.start_step = self._step
        size = 224

        @dali.pipeline_def(batch_size=self._windows.per_host, num_threads=self._num_threads,
                           device_id=self._device_id, prefetch_queue_depth=2)
        def crop_pipeline():
            jpegs, labels, anchors, shapes, flips = fn.external_source(
                source=self._windows, num_outputs=5, batch=True)
            images = fn.decoders.image_slice(
                jpegs, anchors, shapes, device="mixed", output_type=types.RGB,
                axis_names="WH", normalized_anchor=False, normalized_shape=False)
            images = fn.resize(images, resize_x=size, resize_y=size,
                               interp_type=types.INTERP_LINEAR)
            images = fn.flip(images, horizontal=flips)
            return images, labels.gpu()

        return dax.DALIGenericIterator([crop_pipeline()], ["image", "label"])

    def __iter__(self) -> DaliTrainIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._build()
        batch = next(self._iterator)
        self._step += 1
        return {"image": batch["image"], "label": batch["label"].reshape(-1)}

    def get_state(self) -> bytes:
        """The next host step, as JSON bytes."""
        return json.dumps({"step": self._step}).encode()

    def set_state(self, state: bytes) -> None:
        """Continues from a state of :meth:`get_state` (rebuilds the DALI pipeline)."""
        self._step = int(json.loads(state)["step"])
        self._iterator = None

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint restore; the pipeline starts on the next batch."""


def make_dali_train_iterator(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: Any = None,
    process_index: int = 0,
    process_count: int = 1,
    on_corrupt: str = "error",
    num_threads: int | None = None,
    holdout: int = 0,
) -> DaliTrainIterator:
    """DALI version of ``make_train_iterator`` for JPEG datasets (``imagenet2012``).

    Same examples, crop boxes and flips per stream position as the host path; needs
    NVIDIA DALI and JAX on one NVIDIA GPU per process.
    """
    import_dali()
    import jax

    if name != "imagenet2012":
        raise ValueError(f"decoder='dali' reads JPEG datasets ('imagenet2012'), not {name!r}")
    if jax.default_backend() != "gpu":
        raise ValueError(f"decoder='dali' needs an NVIDIA GPU; JAX's backend is "
                         f"{jax.default_backend()!r}")
    if jax.local_device_count() != 1:
        raise ValueError(f"decoder='dali' feeds one GPU per process; this process has "
                         f"{jax.local_device_count()} (run one process per GPU)")
    per_host = pipeline._check_sharding(global_batch_size, process_index, process_count)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    source, _ = pipeline._open_sources(name, data_dir, None, encoded=True, holdout=holdout)
    windows = CropWindows(source, seed, per_host, process_index, process_count, 0, on_corrupt)
    device_id = jax.local_devices()[0].local_hardware_id or 0
    return DaliTrainIterator(windows, device_id, num_threads or min(8, os.cpu_count() or 1))
