"""MNIST feature distance (atdiff_jax.eval.mnist_fd) with the shipped classifier weights.

Thresholds are measured values (CPU, shipped weights) with margin; the measured value is in the
comment at each assertion. Real-vs-real distances are O(0.1), images that are not digits O(100).
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from atdiff_jax.data import load_examples
from atdiff_jax.eval import mnist_fd
from atdiff_jax.eval.fid import feature_statistics
from atdiff_jax.eval.mnist_fd import (
    ClassifierWeightsError,
    classifier_features,
    classifier_outputs,
    classifier_precision,
    load_classifier,
    mnist_feature_distance,
    real_data_floor,
    reference_images,
    reference_stats,
    split_indices,
)

N = 2000


@pytest.fixture(scope="module")
def test_sample(mnist_data_dir):
    """A seeded random sample of N test images (uint8) with labels (file order is not i.i.d.:
    the first and second half of the MNIST test set come from different writer populations)."""
    images, labels = load_examples("mnist32", data_dir=mnist_data_dir, split="test",
                                   with_labels=True)
    idx = split_indices(len(labels), 0)[:N]
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def test_outputs(test_sample):
    return classifier_outputs(test_sample[0])


@pytest.fixture(scope="module")
def test_stats(test_outputs):
    return feature_statistics(test_outputs[1])


def _uniform_noise(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 1)).astype(np.float32)


# --------------------------------------------------------------------------- weights


def test_shipped_weights_sha256_and_metadata():
    data = mnist_fd.WEIGHTS_PATH.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == mnist_fd.WEIGHTS_SHA256
    meta = json.loads(mnist_fd.WEIGHTS_PATH.with_suffix(".json").read_text())
    assert meta["sha256"] == digest and meta["size_bytes"] == len(data)
    assert meta["test_accuracy"] >= 0.99 and meta["test_examples"] == 10000
    assert len(data) < 1_000_000
    params = load_classifier()
    assert params["logits"]["kernel"].shape == (mnist_fd.FEATURE_DIM, 10) == (128, 10)


def test_load_classifier_rejects_missing_and_corrupt(tmp_path):
    with pytest.raises(ClassifierWeightsError, match="not found"):
        load_classifier(tmp_path / "nope.msgpack")
    bad = tmp_path / "w.msgpack"
    shutil.copy(mnist_fd.WEIGHTS_PATH, bad)
    shutil.copy(mnist_fd.WEIGHTS_PATH.with_suffix(".json"), bad.with_suffix(".json"))
    assert load_classifier(bad)["logits"]["kernel"].shape == (128, 10)  # digest from the JSON
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ClassifierWeightsError, match="sha256"):
        load_classifier(bad)
    bad.with_suffix(".json").unlink()  # no digest to check: the parse/shape checks must catch it
    bad.write_bytes(b"\x00not msgpack")
    with pytest.raises(ClassifierWeightsError, match="cannot parse|params tree|do not fit"):
        load_classifier(bad)


# --------------------------------------------------------------------------- classifier


def test_test_accuracy(test_sample, test_outputs):
    acc = float((test_outputs[0].argmax(-1) == test_sample[1]).mean())
    assert acc >= 0.99, acc  # measured 0.9955 (full test set: in the JSON, 0.9935)


def test_uint8_and_float_inputs_agree_and_batching_is_invisible(test_sample, test_outputs):
    x = test_sample[0][:37]
    f_float = classifier_features(x.astype(np.float64) / 127.5 - 1.0, batch_size=16)
    np.testing.assert_allclose(f_float, test_outputs[1][:37], rtol=1e-5, atol=1e-5)
    assert test_outputs[1].shape == (N, 128) and test_outputs[1].dtype == np.float32


def test_confidence_real_vs_not_digits(test_sample):
    real = classifier_precision(test_sample[0])
    # measured: mean 0.991, frac > 0.9: 0.978, KL to uniform 0.003
    assert real["mean_confidence"] >= 0.95 and real["frac_confident"] >= 0.95, real
    assert real["modes_covered"] == 10 and real["class_counts"].sum() == N
    assert real["class_kl_uniform"] < 0.02
    noise = classifier_precision(_uniform_noise(500))
    assert noise["mean_confidence"] < 0.3 and noise["frac_confident"] < 0.05, noise  # 0.10, 0
    # A checkerboard was not among the training outliers (held out): measured 0.11.
    board = np.kron(np.array([[1.0, -1.0], [-1.0, 1.0]]), np.ones((2, 2)))
    board = np.tile(board, (8, 8))[None, :, :, None].repeat(4, 0)
    assert classifier_precision(board)["mean_confidence"] < 0.5
    blank = classifier_precision(np.zeros((100, 32, 32, 1), np.uint8))
    assert blank["modes_covered"] == 1 and blank["class_kl_uniform"] == pytest.approx(np.log(10))


def test_input_validation():
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 1\]"):
        classifier_features(np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 1\]"):
        classifier_features(np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        classifier_features(np.zeros((4, 32, 32, 1), np.int32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        classifier_features(np.full((4, 32, 32, 1), 255.0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        classifier_features(np.full((4, 32, 32, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        mnist_feature_distance(np.zeros((1, 32, 32, 1), np.uint8),
                               np.zeros((5, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="statistics"):
        mnist_feature_distance((np.zeros(64), np.eye(64)), np.zeros((5, 32, 32, 1), np.uint8))


# --------------------------------------------------------------------------- distance


def test_distance_real_small_not_digits_large(mnist_data_dir, test_stats):
    train = reference_images(mnist_data_dir, "train", N, seed=None)  # file order: fast to read
    d_self = mnist_feature_distance(test_stats, test_stats)
    d_real = mnist_feature_distance(train, test_stats)
    d_noise = mnist_feature_distance(_uniform_noise(N), test_stats)
    d_blank = mnist_feature_distance(np.full((N, 32, 32, 1), -1.0, np.float32), test_stats)
    assert d_self < 1e-9, d_self  # measured 0
    assert d_real < 1.0, d_real  # measured 0.16 (floor, test vs test at N=2000: 0.23)
    # measured: noise 124, blank 115: ~700x the real-vs-real distance
    assert d_noise > 50 and d_blank > 50 and min(d_noise, d_blank) > 100 * d_real


def test_distance_grows_with_corruption(test_sample, test_stats):
    """The metric is informative between 'real' and 'noise': more corruption, larger distance."""
    x = test_sample[0][:1000].astype(np.float32) / 127.5 - 1.0
    rng = np.random.default_rng(1)
    d = [mnist_feature_distance(np.clip(x + s * rng.normal(size=x.shape), -1, 1), test_stats)
         for s in (0.1, 0.3, 0.6)]
    d.append(mnist_feature_distance(_uniform_noise(1000), test_stats))
    assert d[0] < d[1] < d[2] < d[3], d  # measured 0.09, 2.5, 68, 124
    assert d[0] < 1.0, d


def test_reference_stats_cache_and_floor(mnist_data_dir, tmp_path, monkeypatch, test_sample):
    mu, sigma = reference_stats(mnist_data_dir, "test", 1000, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("mnist32_test_0-1000_seed0_"), files
    images = reference_images(mnist_data_dir, "test", 2000)
    idx = split_indices(10000, 0)[:2000]
    assert len(set(idx.tolist())) == 2000 and idx.max() > 5000  # a random subset, not a range
    np.testing.assert_array_equal(images, test_sample[0])  # the fixture indexes the split
    ref = feature_statistics(classifier_features(images[:1000]))
    np.testing.assert_allclose(mu, ref[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, ref[1], rtol=1e-5, atol=1e-6)
    floor = real_data_floor(mnist_data_dir, 1000, cache_dir=tmp_path)
    direct = mnist_feature_distance(images[:1000], images[1000:])
    assert floor == pytest.approx(direct, rel=1e-6)
    assert 0 < floor < 1.0, floor  # measured 0.23
    # Cache hit: the dataset is not read again.
    monkeypatch.setattr(mnist_fd, "reference_images", lambda *a, **k: pytest.fail("cache miss"))
    mu2, _ = reference_stats(mnist_data_dir, "test", 1000, cache_dir=tmp_path)
    np.testing.assert_array_equal(mu2, mu)
    assert real_data_floor(mnist_data_dir, 1000, cache_dir=tmp_path) == floor
