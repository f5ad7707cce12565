"""MNIST feature distance: a Frechet distance in the feature space of a small MNIST classifier.

A fast (seconds on CPU) stand-in for FID on the embedded ``mnist32`` dataset (MNIST padded to
32x32x1). The features are the 128-d global average of the last conv layer (the input of the
linear logits layer, like InceptionV3's pool3 in FID) of
:class:`atdiff_jax.models.classifier.MnistClassifier`, whose trained weights ship with the package
(``atdiff_jax/assets/mnist_classifier.msgpack``, sha256-verified; trained by
:mod:`atdiff_jax.eval.train_classifier`, test accuracy in the JSON beside it).

* :func:`load_classifier` -- the verified params.
* :func:`classifier_features` / :func:`classifier_outputs` -- images -> features / logits.
* :func:`mnist_feature_distance` -- Frechet distance (float64) between two image sets, or an image
  set and cached statistics.
* :func:`classifier_precision` -- mean max-softmax confidence, fraction of confident samples and
  the predicted-class histogram (mode coverage); :func:`precision_from_logits` the same from
  logits already computed (one classifier pass for features and confidence).
* :func:`reference_stats` -- ``(mu, sigma)`` of real images (a seeded random subset of a
  split), cached in an ``.npz``.
* :func:`real_data_floor` -- the distance between two disjoint real sets of the same size: what
  a perfect generator would score with that many samples.

Images: ``[N, 32, 32, 1]`` NHWC, either ``uint8`` in ``[0, 255]`` (as read from the dataset) or
floating point in ``[-1, 1]`` (the diffusion model's output range, ``uint8 / 127.5 - 1``).
Anything else -- other shapes, integer dtypes other than uint8, floats outside ``[-1, 1]`` by
more than ``1e-3``, non-finite values -- is rejected with a ``ValueError``/``TypeError``. Note a
float image in ``[0, 1]`` cannot be told apart from one in ``[-1, 1]``: convert it first.

Example::

    mu, sigma = reference_stats(data_dir, "train", 10000)
    samples = sample_fn(...)                      # float [N, 32, 32, 1] in [-1, 1]
    d = mnist_feature_distance(samples, (mu, sigma))
    floor = real_data_floor(data_dir, len(samples))
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from typing import Any

import flax.serialization
import jax
import numpy as np
from etils import epath

from atdiff_jax.eval.fid import feature_statistics, frechet_distance
from atdiff_jax.models.classifier import MnistClassifier

__all__ = [
    "FEATURE_DIM",
    "IMAGE_SHAPE",
    "WEIGHTS_PATH",
    "WEIGHTS_SHA256",
    "ClassifierWeightsError",
    "classifier_features",
    "classifier_outputs",
    "classifier_precision",
    "load_classifier",
    "mnist_feature_distance",
    "precision_from_logits",
    "real_data_floor",
    "reference_images",
    "reference_stats",
    "reference_stats_path",
    "split_indices",
    "to_classifier_input",
]

ASSETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_PATH = ASSETS_DIR / "mnist_classifier.msgpack"
# sha256 of the shipped weights (also in mnist_classifier.json); a retrained file must update it.
WEIGHTS_SHA256 = "e3c6d97a59f376e3ef2bd55c41e71cafdf31e5c46b2bf114d1bfe9a851ece065"
IMAGE_SHAPE = (32, 32, 1)
FEATURE_DIM = MnistClassifier.channels[-1]
NUM_CLASSES = MnistClassifier.num_classes
DATASET = "mnist32"
RANGE_TOLERANCE = 1e-3
DEFAULT_BATCH_SIZE = 500

_RETRAIN_HINT = ("Reinstall atdiff_jax (the weights are package data), or retrain them with\n"
                 "    python -m atdiff_jax.eval.train_classifier --data_dir <tfds data dir>\n"
                 "and update WEIGHTS_SHA256 in atdiff_jax/eval/mnist_fd.py.")


class ClassifierWeightsError(RuntimeError):
    """The classifier weights are missing, corrupt, or do not fit :class:`MnistClassifier`."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _param_template() -> Any:
    shapes = jax.eval_shape(MnistClassifier().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), np.float32))
    return shapes["params"]


def _load(path: pathlib.Path, sha256: str | None) -> Any:
    if not path.is_file():
        raise ClassifierWeightsError(f"MNIST classifier weights not found at {path}.\n"
                                     + _RETRAIN_HINT)
    data = path.read_bytes()
    actual = _sha256_bytes(data)
    if sha256 is not None and actual != sha256:
        raise ClassifierWeightsError(
            f"MNIST classifier weights at {path} are corrupt or not the expected file: sha256 "
            f"{actual}, expected {sha256}.\n" + _RETRAIN_HINT)
    try:
        raw = flax.serialization.msgpack_restore(data)
    except Exception as e:
        raise ClassifierWeightsError(f"cannot parse MNIST classifier weights {path}: "
                                     f"{type(e).__name__}: {e}") from e
    template = _param_template()
    want = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(template)}
    try:
        got = {jax.tree_util.keystr(k): np.shape(v)
               for k, v in jax.tree_util.tree_leaves_with_path(raw)}
    except Exception as e:
        raise ClassifierWeightsError(f"{path} does not hold a params tree: {e}") from e
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise ClassifierWeightsError(
            f"weights at {path} do not fit MnistClassifier() (default architecture); "
            f"mismatching entries (name, shape): {diff[:6]}")
    return jax.tree.map(lambda a: np.asarray(a, np.float32), raw)


@functools.lru_cache(maxsize=1)
def _default_params() -> Any:
    return _load(WEIGHTS_PATH, WEIGHTS_SHA256)


def load_classifier(path: str | os.PathLike | None = None, *, sha256: str | None = None) -> Any:
    """Params of :class:`MnistClassifier` (default architecture), sha256-verified.

    Args:
      path: a ``.msgpack`` written by :mod:`atdiff_jax.eval.train_classifier`; default: the
        shipped weights (verified against :data:`WEIGHTS_SHA256`; loaded once per process).
      sha256: expected digest for ``path``; default: the ``sha256`` of the ``.json`` beside
        ``path`` if it exists, else no digest check.
    Returns:
      params pytree of float32 numpy arrays, for ``MnistClassifier().apply({'params': p}, x)``.
    Raises:
      ClassifierWeightsError: missing file, digest mismatch, unparsable file, or params that do
        not fit the architecture.
    """
    if path is None:
        if sha256 is not None and sha256 != WEIGHTS_SHA256:
            return _load(WEIGHTS_PATH, sha256)
        return _default_params()
    path = pathlib.Path(path)
    if sha256 is None and path.with_suffix(".json").is_file():
        sha256 = json.loads(path.with_suffix(".json").read_text()).get("sha256")
    return _load(path, sha256)


def _params_id(params: Any) -> str:
    """sha256 of the serialized params: identifies the network in cached statistics."""
    return _sha256_bytes(flax.serialization.to_bytes(jax.device_get(params)))


def to_classifier_input(images: Any) -> np.ndarray:
    """Validates images and returns float32 ``[N, 32, 32, 1]`` in ``[-1, 1]``.

    uint8 -> ``x / 127.5 - 1``; floats must be finite and within ``[-1, 1]`` (up to ``1e-3``,
    then clipped). Raises ``TypeError`` (dtype) or ``ValueError`` (shape, range) otherwise.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected MNIST images [N, 32, 32, 1] (NHWC), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
        raise TypeError(f"expected uint8 images in [0, 255] or float images in [-1, 1], got "
                        f"dtype {x.dtype}; convert to uint8 (e.g. np.uint8) or to float in [-1, 1]")
    x = x.astype(np.float32)
    if x.size:
        if not np.all(np.isfinite(x)):
            raise ValueError("images contain NaN or inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(f"float images must lie in [-1, 1] (uint8 / 127.5 - 1); got values "
                             f"in [{lo:.4g}, {hi:.4g}]. Clip model samples to [-1, 1], or pass "
                             "uint8 images in [0, 255].")
    return np.clip(x, -1.0, 1.0)


@functools.lru_cache(maxsize=1)
def _apply_fn():
    model = MnistClassifier()
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def classifier_outputs(images: Any, params: Any = None, *, batch_size: int = DEFAULT_BATCH_SIZE
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(logits float32 [N, 10], features float32 [N, 128])`` of images (see module doc).

    Runs one jitted forward per ``batch_size`` images (fp32 matmuls, "highest" precision on
    every backend). The last batch is zero-padded to ``batch_size`` (to the next power of two
    when ``N < batch_size``) and the padding dropped, so only a few shapes are ever compiled.
    """
    x = to_classifier_input(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params = load_classifier() if params is None else params
    n = len(x)
    if n == 0:
        return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    bs = batch_size if n >= batch_size else min(batch_size, 1 << (n - 1).bit_length())
    fn = _apply_fn()
    logits, feats = [], []
    with jax.default_matmul_precision("highest"):
        for lo in range(0, n, bs):
            chunk = x[lo:lo + bs]
            m = len(chunk)
            if m < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - m, *IMAGE_SHAPE), np.float32)])
            lg, ft = fn(params, chunk)
            logits.append(np.asarray(lg)[:m])
            feats.append(np.asarray(ft)[:m])
    return np.concatenate(logits), np.concatenate(feats)


def classifier_features(images: Any, params: Any = None, *,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """float32 ``[N, 128]`` features (globally pooled last conv layer) of images.

    Args:
      images: ``[N, 32, 32, 1]`` uint8 in ``[0, 255]`` or float in ``[-1, 1]``.
      params: from :func:`load_classifier`; default: the shipped weights.
      batch_size: images per jitted forward pass.
    """
    return classifier_outputs(images, params, batch_size=batch_size)[1]


def _stats(x: Any, params: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images, or an already computed ``(mu, sigma)`` pair, -> float64 ``(mu, sigma)``."""
    if isinstance(x, (tuple, list)) and len(x) == 2:
        mu, sigma = np.asarray(x[0], np.float64), np.asarray(x[1], np.float64)
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise ValueError(f"statistics must be (mu [{FEATURE_DIM}], sigma [{FEATURE_DIM}, "
                             f"{FEATURE_DIM}]), got {mu.shape}, {sigma.shape}")
        return mu, sigma
    feats = classifier_features(x, params, batch_size=batch_size)
    if len(feats) < 2:
        raise ValueError(f"need at least 2 images for a feature distance, got {len(feats)}")
    return feature_statistics(feats)


def mnist_feature_distance(samples: Any, reference: Any, *, params: Any = None,
                           batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Frechet distance (float64) between two sets in the classifier's 128-d feature space.

    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``, computed by
    :func:`atdiff_jax.eval.fid.frechet_distance`.

    Args:
      samples, reference: each either images ``[N, 32, 32, 1]`` (uint8 in ``[0, 255]`` or float
        in ``[-1, 1]``, N >= 2) or a ``(mu [128], sigma [128, 128])`` pair such as
        :func:`reference_stats` returns.
      params: from :func:`load_classifier`; default: the shipped weights.
    Returns:
      the distance (>= 0). Like FID it is biased upwards for small N: compare with
      :func:`real_data_floor` at the same N.
    """
    return frechet_distance(*_stats(samples, params, batch_size),
                            *_stats(reference, params, batch_size))


def classifier_precision(samples: Any, *, params: Any = None, threshold: float = 0.9,
                         mode_min_fraction: float = 0.025,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """How digit-like samples are to the classifier, and which digits they cover.

    Args:
      samples: images ``[N, 32, 32, 1]`` (uint8 in ``[0, 255]`` or float in ``[-1, 1]``), N >= 1.
      threshold, mode_min_fraction: see :func:`precision_from_logits`.
    Returns:
      :func:`precision_from_logits` of the classifier's logits of ``samples``.
    """
    logits, _ = classifier_outputs(samples, params, batch_size=batch_size)
    return precision_from_logits(logits, threshold=threshold,
                                 mode_min_fraction=mode_min_fraction)


def precision_from_logits(logits: np.ndarray, *, threshold: float = 0.9,
                          mode_min_fraction: float = 0.025) -> dict[str, Any]:
    """:func:`classifier_precision` of ``[N, 10]`` classifier logits (:func:`classifier_outputs`).

    Args:
      logits: ``[N, 10]``, N >= 1.
      threshold: confidence above which a sample counts as confident.
      mode_min_fraction: a class counts as covered when at least this fraction of the samples
        is predicted as it (default 0.025: a quarter of the uniform share 1/10).
    Returns:
      dict with ``mean_confidence`` (mean max-softmax probability), ``frac_confident``
      (fraction with max probability > ``threshold``), ``class_counts`` (int64 [10], argmax
      predictions), ``class_histogram`` (float64 [10], fractions), ``modes_covered`` (int),
      ``class_kl_uniform`` (KL(histogram || uniform) in nats; 0 = balanced, log 10 = one class),
      ``num_samples``.
    """
    n = len(logits)
    if n == 0:
        raise ValueError("classifier_precision needs at least one sample")
    z = np.asarray(logits).astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    conf = probs.max(-1)
    counts = np.bincount(probs.argmax(-1), minlength=NUM_CLASSES).astype(np.int64)
    hist = counts / n
    nz = hist > 0
    return {
        "mean_confidence": float(conf.mean()),
        "frac_confident": float((conf > threshold).mean()),
        "class_counts": counts,
        "class_histogram": hist,
        "modes_covered": int((hist >= mode_min_fraction).sum()),
        "class_kl_uniform": float((hist[nz] * np.log(hist[nz] * NUM_CLASSES)).sum()),
        "num_samples": n,
    }


def reference_stats_path(cache_dir: str | os.PathLike, split: str, num: int, start: int,
                         seed: int | None, params_id: str) -> epath.Path:
    """``<cache_dir>/mnist32_<split>_<start>-<start+num>_<seed<seed>|fileorder>_<id16>.npz``."""
    order = "fileorder" if seed is None else f"seed{int(seed)}"
    return epath.Path(cache_dir) / (f"{DATASET}_{split}_{start}-{start + num}_{order}_"
                                    f"{params_id[:16]}.npz")


def split_indices(split_size: int, seed: int | None) -> np.ndarray:
    """The order in which :func:`reference_stats` takes a split: file order (``seed=None``) or
    a permutation seeded by ``seed`` (numpy ``SeedSequence``, stable across numpy versions)."""
    if seed is None:
        return np.arange(split_size)
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D4E4953])
                                 ).permutation(split_size)


def reference_images(data_dir: str | os.PathLike, split: str, num: int, *, start: int = 0,
                     seed: int | None = 0) -> np.ndarray:
    """uint8 ``[num, 32, 32, 1]`` real images: entries ``[start, start + num)`` of
    :func:`split_indices` ``(len(split), seed)`` (``seed=None``: a contiguous file-order range)."""
    from atdiff_jax.data import get_dataset_meta, load_examples
    size = get_dataset_meta(DATASET, data_dir=data_dir).num_examples[split]
    if start < 0 or num < 0 or start + num > size:
        raise ValueError(f"cannot take images [{start}, {start + num}) of {DATASET}/{split}, "
                         f"which has {size}")
    if seed is None:
        return load_examples(DATASET, data_dir=data_dir, split=split, num_examples=num,
                             start=start)
    return load_examples(DATASET, data_dir=data_dir, split=split,
                         indices=split_indices(size, seed)[start:start + num])


def reference_stats(data_dir: str | os.PathLike, split: str = "train", num: int | None = 10000,
                    *, start: int = 0, seed: int | None = 0,
                    cache_dir: str | os.PathLike | None = None, params: Any = None,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of ``num`` real ``mnist32`` images of ``split``, cached.

    The images are :func:`reference_images` ``(data_dir, split, num, start=start, seed=seed)``:
    by default a random subset (seed 0) rather than the first ``num`` in file order, because the
    MNIST files are ordered by writer population (test images 0-4999 come from NIST SD-3,
    5000-9999 from SD-1), so file-order ranges are not identically distributed.

    Computed once and cached in ``cache_dir`` (default ``<data_dir>/mnist_fd_stats``) under a
    name keyed by split, range, seed and the network's params digest
    (:func:`reference_stats_path`), written atomically.

    Args:
      data_dir: TFDS data dir holding the prepared ``mnist32``
        (:func:`atdiff_jax.data.prepare_mnist`).
      split: ``"train"`` (60000) or ``"test"`` (10000); num: number of images (None: all from
        ``start`` on); start: first position in the (permuted) order; seed: the permutation
        (None: file order).
    Returns:
      float64 ``(mu [128], sigma [128, 128])`` (``sigma`` with ``ddof=1``).
    """
    params = load_classifier() if params is None else params
    pid = _params_id(params)
    cache_dir = epath.Path(data_dir) / "mnist_fd_stats" if cache_dir is None else cache_dir
    if num is None:
        from atdiff_jax.data import get_dataset_meta
        num = get_dataset_meta(DATASET, data_dir=data_dir).num_examples[split] - start
    num = int(num)
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    path = reference_stats_path(cache_dir, split, num, start, seed, pid)
    if path.is_file():
        with path.open("rb") as file, np.load(file, allow_pickle=False) as f:
            if str(f["params_id"]) != pid or int(f["num"]) != num or str(f["split"]) != split:
                raise ValueError(f"{path} holds other statistics; delete it to recompute")
            return f["mu"], f["sigma"]
    images = reference_images(data_dir, split, num, start=start, seed=seed)
    mu, sigma = feature_statistics(classifier_features(images, params, batch_size=batch_size))
    from atdiff_jax.paths import write_atomic
    write_atomic(path, lambda f: np.savez(
        f, mu=mu, sigma=sigma, num=np.int64(num), start=np.int64(start),
        seed=np.int64(-1 if seed is None else seed), split=np.str_(split),
        dataset=np.str_(DATASET), params_id=np.str_(pid)))
    return mu, sigma


def real_data_floor(data_dir: str | os.PathLike, num: int = 5000, *, split: str = "test",
                    seed: int | None = 0, cache_dir: str | os.PathLike | None = None,
                    params: Any = None, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Distance between two disjoint random sets of ``num`` real images of ``split``.

    Positions ``[0, num)`` vs ``[num, 2 num)`` of the ``seed`` permutation (so ``num <= 5000``
    for ``test``; ``seed=None`` takes file-order ranges, which differ in writer population).
    This is what a perfect generator scores with ``num`` samples against ``num`` real images:
    the floor of the metric at that sample size (it falls roughly like ``1 / num``). Statistics
    are cached as in :func:`reference_stats`.
    """
    kw = {"seed": seed, "cache_dir": cache_dir, "params": params, "batch_size": batch_size}
    a = reference_stats(data_dir, split, num, start=0, **kw)
    b = reference_stats(data_dir, split, num, start=num, **kw)
    return frechet_distance(*a, *b)
