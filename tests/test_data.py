"""Tests for rpg_jax.data: IDX reading, sources, augmentation and grain pipelines."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from rpg_jax.data import (
    ArraySource,
    DatasetInfo,
    SyntheticSource,
    crop_flip_batch,
    dataset_info,
    hashing,
    inception_crop,
    load_fashion_mnist,
    make_eval_batches,
    make_train_iterator,
    preprocess_for_eval,
    random_crop_flip,
    random_crop_flip_batch,
    read_idx,
    resize_center_crop,
    tfds_source,
)
from rpg_jax.data import fashion_mnist as fm
from rpg_jax.data.sources import SliceSource, slice_source

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 96, 23


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Writes a uint8 array as an IDX file (gzipped if ``gz``)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    """Tiny Fashion-MNIST: image i is filled with value i, label i % 10 (train gz, test plain)."""
    for split, n, gz in (("train", N_TRAIN, True), ("test", N_TEST, False)):
        images_stem, labels_stem = fm.FILES[split]
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        write_idx(tmp_path / (images_stem + (".gz" if gz else "")), images, gz)
        write_idx(tmp_path / (labels_stem + (".gz" if gz else "")), np.arange(n) % 10, gz)
    return tmp_path


def ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Example index of each image of a fake-Fashion-MNIST batch (centre pixel survives crops)."""
    return batch["image"][:, 14, 14, 0].astype(np.int64)


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("shape", [(7,), (5, 4, 3)])
def test_read_idx_roundtrip(tmp_path, gz, shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x", array, gz)), array)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_bad_magic_names_file(tmp_path, gz):
    path = write_idx(tmp_path / "bad-idx", np.zeros((2, 3), np.uint8), gz)
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    raw[2] = 0x0C  # int32 IDX: not what Fashion-MNIST uses
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    with pytest.raises(ValueError, match="bad-idx.*magic"):
        read_idx(path)


def test_read_idx_truncated_and_corrupt_gzip(tmp_path):
    path = write_idx(tmp_path / "short", np.zeros((4, 5), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="short.*truncated"):
        read_idx(path)
    bad_gz = tmp_path / "broken.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(12))[:15])
    with pytest.raises(ValueError, match="broken.gz"):
        read_idx(bad_gz)


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        load_fashion_mnist(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8), True)
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist(tmp_path)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte.gz" in msg and "t10k-images-idx3-ubyte.gz" in msg
    assert "train-images" not in msg.split("missing")[0]
    assert "zalandoresearch/fashion-mnist" in msg and "dataset-fashion-mnist" in msg


def test_load_fake_fashion_mnist(fake_fmnist, monkeypatch):
    data = load_fashion_mnist(fake_fmnist)
    (x, y), (xt, yt) = data["train"], data["test"]
    assert x.shape == (N_TRAIN, 28, 28, 1) and x.dtype == np.uint8
    assert xt.shape == (N_TEST, 28, 28, 1) and yt.dtype == np.int32
    np.testing.assert_array_equal(x[:, 3, 5, 0], np.arange(N_TRAIN))
    np.testing.assert_array_equal(y, np.arange(N_TRAIN) % 10)
    assert not x.flags.writeable
    assert load_fashion_mnist(fake_fmnist)["train"][0] is x  # cached per process
    monkeypatch.setenv(fm.ENV_VAR, str(fake_fmnist))
    assert load_fashion_mnist()["test"][0] is xt


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    data = load_fashion_mnist(REAL_FMNIST)
    (x, y), (xt, yt) = data["train"], data["test"]
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert y.min() == 0 and y.max() == 9 and yt.min() == 0 and yt.max() == 9
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 6000))
    info = dataset_info("fashion_mnist", REAL_FMNIST)
    assert (info.num_train, info.num_eval, info.image_shape) == (60000, 10000, (28, 28, 1))
    pixels = x.astype(np.float32) / 255
    assert abs(pixels.mean() - info.mean[0]) < 1e-4 and abs(pixels.std() - info.std[0]) < 1e-4


# ----------------------------------------------------------------------------- sources


def test_array_source():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    src = ArraySource(images, np.array([3, 7]))
    assert len(src) == 2 and src[1]["label"] == 7 and isinstance(src[1]["label"], int)
    np.testing.assert_array_equal(src[1]["image"], images[1])
    batch = src.read_batch(np.array([1, 0, 1]))
    assert batch["label"].dtype == np.int32 and batch["label"].tolist() == [7, 3, 7]
    with pytest.raises(ValueError):
        ArraySource(images.astype(np.float32), np.array([3, 7]))


def test_synthetic_source_deterministic_and_picklable():
    src = SyntheticSource(50, (8, 8, 3), num_classes=5, seed=3)
    batch = src.read_batch(np.arange(50))
    assert batch["image"].shape == (50, 8, 8, 3) and batch["image"].dtype == np.uint8
    assert set(batch["label"].tolist()) <= set(range(5)) and len(set(batch["label"].tolist())) > 1
    np.testing.assert_array_equal(src[7]["image"], batch["image"][7])
    assert src[7]["label"] == batch["label"][7]
    clone = pickle.loads(pickle.dumps(src))
    assert_batches_equal([clone.read_batch(np.arange(50))], [batch])
    other = SyntheticSource(50, (8, 8, 3), num_classes=5, seed=4).read_batch(np.arange(50))
    assert not np.array_equal(other["image"], batch["image"])
    with pytest.raises(IndexError):
        src[50]


def test_splitmix_int_matches_array():
    xs = [0, 1, 12345, 2**64 - 1]
    assert hashing.splitmix64(np.array(xs, np.uint64)).tolist() == [
        hashing.splitmix64_int(x) for x in xs
    ]


# ----------------------------------------------------------------------------- augment


def test_crop_flip_batch_known_offsets():
    img = np.arange(4 * 5 * 2, dtype=np.uint8).reshape(1, 4, 5, 2) + 1
    padded = np.pad(img[0], ((2, 2), (2, 2), (0, 0)))
    out = crop_flip_batch(
        np.repeat(img, 3, 0),
        2,
        np.array([0, 4, 1]),
        np.array([4, 0, 3]),
        np.array([False, True, False]),
    )
    np.testing.assert_array_equal(out[0], padded[0:4, 4:9])
    np.testing.assert_array_equal(out[1], padded[4:8, 0:5][:, ::-1])
    np.testing.assert_array_equal(out[2], padded[1:5, 3:8])


def test_random_crop_flip_matches_rng_draws():
    img = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out = random_crop_flip(img, np.random.default_rng(42), pad=2)
    replay = np.random.default_rng(42)
    dy, dx = replay.integers(0, 5, size=2)
    expected = np.pad(img, ((2, 2), (2, 2), (0, 0)))[dy : dy + 6, dx : dx + 6]
    if replay.random() < 0.5:
        expected = expected[:, ::-1]
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    no_flip = random_crop_flip(img, np.random.default_rng(42), pad=0, flip=False)
    np.testing.assert_array_equal(no_flip, img)


def test_random_crop_flip_batch_uses_all_offsets():
    images = np.random.default_rng(0).integers(1, 256, (400, 8, 8, 1), dtype=np.uint8)
    bits = hashing.example_bits(7, np.arange(400))
    out = random_crop_flip_batch(images, bits, pad=1)
    assert out.shape == images.shape
    np.testing.assert_array_equal(out, random_crop_flip_batch(images, bits, pad=1))
    kinds = set()
    for img, aug in zip(images, out, strict=True):
        padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
        match = [
            (y, x, f)
            for y in range(3)
            for x in range(3)
            for f in (0, 1)
            if np.array_equal(aug, padded[y : y + 8, x : x + 8][:, :: -1 if f else 1])
        ]
        assert match
        kinds.add(match[0])
    assert len(kinds) == 18  # every offset and flip occurs


@pytest.mark.parametrize("shape", [(300, 200, 3), (50, 400, 3), (64, 64, 1)])
def test_inception_crop_size(shape):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    for _ in range(5):
        out = inception_crop(img, rng, 32)
        assert out.shape == (32, 32, shape[2]) and out.dtype == np.uint8
    # Impossible scale forces the central-crop fallback; constant images stay constant.
    const = np.full(shape, 77, np.uint8)
    out = inception_crop(const, rng, 16, scale=(5.0, 6.0), flip=False)
    assert out.shape == (16, 16, shape[2]) and (out == 77).all()


def test_resize_center_crop():
    img = np.zeros((256, 512, 3), np.uint8)
    img[:, 128:384] = 100
    img[:, 384:] = 200
    out = resize_center_crop(img, 256, 224)
    assert out.shape == (224, 224, 3) and (out == 100).all()
    assert resize_center_crop(np.zeros((500, 375, 3), np.uint8)).shape == (224, 224, 3)


# ----------------------------------------------------------------------------- train pipeline


def test_train_batches_shapes_and_determinism(fake_fmnist):
    kw = dict(global_batch_size=16, data_dir=fake_fmnist)
    a = take(make_train_iterator("fashion_mnist", seed=0, **kw), 4)
    assert set(a[0]) == {"image", "label"}
    assert a[0]["image"].shape == (16, 28, 28, 1) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].shape == (16,) and a[0]["label"].dtype == np.int32
    np.testing.assert_array_equal(a[0]["label"], ids(a[0]) % 10)
    assert_batches_equal(a, take(make_train_iterator("fashion_mnist", seed=0, **kw), 4))
    b = take(make_train_iterator("fashion_mnist", seed=1, **kw), 4)
    assert not np.array_equal(
        np.concatenate([ids(x) for x in a]), np.concatenate([ids(x) for x in b])
    )
    # Augmentation happened: zero padding shows up at some borders.
    assert any((x["image"][:, :, 0] == 0).any() or (x["image"][:, 0] == 0).any() for x in a)


@pytest.mark.parametrize("batch", [16, 20])
def test_each_example_once_per_epoch(fake_fmnist, batch):
    it = make_train_iterator("fashion_mnist", global_batch_size=batch, seed=5, data_dir=fake_fmnist)
    stream = np.concatenate([ids(b) for b in take(it, -(-3 * N_TRAIN // batch))])
    epochs = [stream[e * N_TRAIN : (e + 1) * N_TRAIN] for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(N_TRAIN))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_host_shards_partition_global_batches(fake_fmnist):
    kw = dict(global_batch_size=16, seed=3, data_dir=fake_fmnist)
    full = take(make_train_iterator("fashion_mnist", **kw), 6)
    hosts = [
        take(make_train_iterator("fashion_mnist", process_index=p, process_count=2, **kw), 6)
        for p in range(2)
    ]
    for k in range(6):
        assert len(set(ids(hosts[0][k])) & set(ids(hosts[1][k]))) == 0
        joined = {key: np.concatenate([h[k][key] for h in hosts]) for key in full[k]}
        assert_batches_equal([joined], [full[k]])  # same examples, order and augmentation
    with pytest.raises(ValueError, match="16.*3"):
        make_train_iterator("fashion_mnist", process_count=3, **kw)


def test_checkpoint_roundtrip(fake_fmnist, tmp_path):
    kw = dict(global_batch_size=16, seed=9, data_dir=fake_fmnist)
    it = make_train_iterator("fashion_mnist", **kw)
    take(it, 7)  # crosses an epoch boundary (6 batches per epoch)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    restored = make_train_iterator("fashion_mnist", **kw)
    restored.set_state(state)
    assert_batches_equal(take(restored, 5), expected)

    ocp = pytest.importorskip("orbax.checkpoint")
    ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    it = make_train_iterator("fashion_mnist", **kw)
    take(it, 3)
    ckpt.save(tmp_path / "ckpt", args=grain.checkpoint.CheckpointSave(it))
    expected = take(it, 4)
    restored = make_train_iterator("fashion_mnist", **kw)
    ckpt.restore(tmp_path / "ckpt", args=grain.checkpoint.CheckpointRestore(restored))
    assert_batches_equal(take(restored, 4), expected)


def test_worker_processes_give_same_batches():
    kw = dict(global_batch_size=32, seed=2, synthetic_size=200)
    expected = take(make_train_iterator("synthetic_cifar", **kw), 8)
    it = make_train_iterator("synthetic_cifar", worker_count=2, **kw)
    try:
        assert_batches_equal(take(it, 8), expected)
    finally:
        it.close()


def test_synthetic_datasets():
    info = dataset_info("synthetic_cifar", synthetic_size=64)
    assert (info.num_train, info.num_eval, info.num_classes) == (64, 64, 10)
    assert dataset_info("synthetic_imagenet").num_train == 1_281_167
    batch = next(
        make_train_iterator("synthetic_imagenet", global_batch_size=4, seed=0, synthetic_size=8)
    )
    assert batch["image"].shape == (4, 224, 224, 3) and batch["label"].max() < 1000
    with pytest.raises(ValueError, match="synthetic_size"):
        dataset_info("fashion_mnist", synthetic_size=10)


def test_dataset_info_round_trips_through_json():
    info = dataset_info("synthetic_cifar", synthetic_size=64)
    stored = json.loads(json.dumps(info.to_dict()))
    assert stored["image_shape"] == [32, 32, 3] and stored["num_train"] == 64
    assert DatasetInfo.from_dict(stored) == info


def test_bad_arguments(fake_fmnist):
    with pytest.raises(ValueError, match="valid names: fashion_mnist, cifar10"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="global_batch_size"):
        make_train_iterator("fashion_mnist", global_batch_size=0, seed=0, data_dir=fake_fmnist)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        make_train_iterator(
            "fashion_mnist", global_batch_size=8, seed=0, data_dir=fake_fmnist / "missing"
        )


# ----------------------------------------------------------------------------- eval pipeline


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_each_example_once(fake_fmnist, process_count):
    seen = []
    lengths = set()
    for p in range(process_count):
        batches = make_eval_batches(
            "fashion_mnist",
            global_batch_size=8,
            data_dir=fake_fmnist,
            process_index=p,
            process_count=process_count,
        )
        lengths.add(len(batches))
        passes = [list(batches), list(batches)]
        assert_batches_equal(*passes)  # every iter() is one identical pass
        for b in passes[0]:
            assert b["image"].shape == (8 // process_count, 28, 28, 1)
            assert b["mask"].dtype == np.float32 and set(b["mask"].tolist()) <= {0.0, 1.0}
            real = b["mask"] == 1
            assert (b["image"][~real] == 0).all() and (b["label"][~real] == 0).all()
            np.testing.assert_array_equal(b["label"][real], ids(b)[real] % 10)
            seen += ids(b)[real].tolist()
    assert lengths == {3}
    assert sorted(seen) == list(range(N_TEST))


def test_preprocess_for_eval():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = preprocess_for_eval("fashion_mnist", imgs)
    assert out.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(out[..., 0], imgs)
    with pytest.raises(ValueError, match="28, 28, 1"):
        preprocess_for_eval("fashion_mnist", np.zeros((2, 32, 32, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(buf, format="JPEG")
    out = preprocess_for_eval("imagenet2012", [np.zeros((300, 500, 3), np.uint8), buf.getvalue()])
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------- holdout


def test_holdout_trains_on_the_first_examples_and_evaluates_the_last(fake_fmnist):
    """holdout=8: train on train[:-8] (each example once per epoch), evaluate train[-8:] with
    the eval preprocessing; the test split takes no part."""
    info = dataset_info("fashion_mnist", fake_fmnist, holdout=8)
    assert (info.num_train, info.num_eval) == (N_TRAIN - 8, 8)
    assert (info.train_split, info.eval_split) == ("train[:-8]", "train[-8:]")
    it = make_train_iterator("fashion_mnist", global_batch_size=8, seed=0, data_dir=fake_fmnist,
                             holdout=8)
    stream = np.concatenate([ids(b) for b in take(it, 2 * (N_TRAIN - 8) // 8)])
    for epoch in np.split(stream, 2):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(N_TRAIN - 8))
    batches = list(make_eval_batches("fashion_mnist", global_batch_size=3, data_dir=fake_fmnist,
                                     holdout=8))
    seen = np.concatenate([ids(b)[b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(N_TRAIN - 8, N_TRAIN))
    labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(labels, seen % 10)
    assert all((b["image"][b["mask"] == 1] == ids(b)[b["mask"] == 1, None, None, None]).all()
               for b in batches)  # eval preprocessing: no crop, no flip


@pytest.mark.parametrize("holdout, pattern", [
    (N_TRAIN, rf"holdout={N_TRAIN}: expected fewer than the {N_TRAIN} examples"),
    (-1, r"holdout=-1: expected a non-negative int"),
    (2.5, r"holdout=2\.5: expected a non-negative int"),
])
def test_bad_holdout_is_named(fake_fmnist, holdout, pattern):
    with pytest.raises(ValueError, match=pattern):
        dataset_info("fashion_mnist", fake_fmnist, holdout=holdout)


def test_slice_source_renumbers_checks_bounds_and_pickles():
    base = SyntheticSource(20, (4, 4, 3), 10, seed=0)
    part = slice_source(base, 5, 12)
    assert isinstance(part, SliceSource) and len(part) == 7
    np.testing.assert_array_equal(part[0]["image"], base[5]["image"])
    batch = part.read_batch(np.array([6, 0]))
    np.testing.assert_array_equal(batch["image"], base.read_batch(np.array([11, 5]))["image"])
    with pytest.raises(IndexError):
        part[7]
    with pytest.raises(IndexError):
        part.read_batch(np.array([7]))
    with pytest.raises(ValueError, match=r"slice \[5:30\] of a source of 20"):
        slice_source(base, 5, 30)
    again = pickle.loads(pickle.dumps(part))
    np.testing.assert_array_equal(again[3]["image"], part[3]["image"])
    arrays = ArraySource(np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1), np.arange(20))
    view = slice_source(arrays, 15, 20)
    assert isinstance(view, ArraySource) and np.shares_memory(view.images, arrays.images)
    assert view[0]["label"] == 15


# ----------------------------------------------------------------------------- TFDS


def test_tfds_mock_data_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        info = dataset_info("cifar10", data_dir="/nonexistent")
        assert (info.num_train, info.num_eval, info.image_shape) == (40, 40, (32, 32, 3))
        it = make_train_iterator("cifar10", global_batch_size=8, seed=0, data_dir="/nonexistent")
        batch = next(it)
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
        masks = [b["mask"] for b in make_eval_batches("cifar10", global_batch_size=16)]
        assert len(masks) == 3 and sum(m.sum() for m in masks) == 40
        batch = next(make_train_iterator("imagenet2012", global_batch_size=2, seed=0))
        assert batch["image"].shape == (2, 224, 224, 3)


def _write_fake_prepared_cifar10(data_dir: Path, sizes: dict[str, int]) -> None:
    """Writes a tiny array_record 'cifar10' in TFDS layout without TensorFlow.

    Image i of each split is filled with value i and has label i % 10.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    array_record = pytest.importorskip("array_record.python.array_record_module")
    builder = tfds.builder("cifar10", data_dir=os.fspath(data_dir), file_format="array_record")
    os.makedirs(builder.data_dir, exist_ok=True)
    splits = []
    for split, n in sizes.items():
        path = os.path.join(builder.data_dir, f"cifar10-{split}.array_record-00000-of-00001")
        writer = array_record.ArrayRecordWriter(path, "group_size:1")
        for i in range(n):
            image = Image.fromarray(np.full((32, 32, 3), i, np.uint8))  # PNG-encoded by PIL
            example = {"id": f"{split}_{i}", "image": image, "label": i % 10}
            writer.write(builder.info.features.serialize_example(example))
        writer.close()
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir,
            template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="cifar10",
            split=split,
            filetype_suffix="array_record",
        )
        splits.append(
            tfds.core.SplitInfo(
                name=split, shard_lengths=[n], num_bytes=0, filename_template=template
            )
        )
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(builder.data_dir)


def test_tfds_prepared_array_record(tmp_path):
    _write_fake_prepared_cifar10(tmp_path, {"train": 12, "test": 5})
    src = tfds_source("cifar10", "train", tmp_path)
    assert len(src) == 12 and src[3]["label"] == 3
    np.testing.assert_array_equal(src[3]["image"], np.full((32, 32, 3), 3, np.uint8))
    info = dataset_info("cifar10", tmp_path)
    assert (info.num_train, info.num_eval) == (12, 5)
    batches = list(make_eval_batches("cifar10", global_batch_size=4, data_dir=tmp_path))
    assert [b["mask"].sum() for b in batches] == [4, 1]
    np.testing.assert_array_equal(batches[0]["image"][:, 16, 16, 0], [0, 1, 2, 3])
    it = make_train_iterator("cifar10", global_batch_size=4, seed=0, data_dir=tmp_path)
    stream = np.concatenate([b["image"][:, 16, 16, 0] for b in take(it, 3)])
    np.testing.assert_array_equal(np.sort(stream), np.arange(12))


def test_tfds_holdout_reads_only_the_train_split(tmp_path):
    """A prepared dataset without its test split still trains and evaluates with a holdout:
    the eval split is not opened; the held-out records keep their names in errors."""
    _write_fake_prepared_cifar10(tmp_path, {"train": 12})
    info = dataset_info("cifar10", tmp_path, holdout=3)
    assert (info.num_train, info.num_eval, info.eval_split) == (9, 3, "train[-3:]")
    batches = list(make_eval_batches("cifar10", global_batch_size=4, data_dir=tmp_path,
                                     holdout=3))
    np.testing.assert_array_equal(batches[0]["image"][:3, 16, 16, 0], [9, 10, 11])
    it = make_train_iterator("cifar10", global_batch_size=3, seed=0, data_dir=tmp_path,
                             holdout=3)
    stream = np.concatenate([b["image"][:, 16, 16, 0] for b in take(it, 3)])
    np.testing.assert_array_equal(np.sort(stream), np.arange(9))
    with pytest.raises(FileNotFoundError):
        dataset_info("cifar10", tmp_path)  # without a holdout the test split is needed


def test_tfds_errors(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar100, imagenet2012"):
        tfds_source("mnist", "train", tmp_path)
    with pytest.raises(
        FileNotFoundError, match="tfds build cifar10 --file_format=array_record"
    ) as e:
        dataset_info("cifar10", tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(FileNotFoundError, match="--manual_dir"):
        tfds_source("imagenet2012", "validation", tmp_path)
