"""Trains the MNIST feature-distance classifier and writes the weights shipped in ``assets/``.

Trains :class:`atdiff_jax.models.classifier.MnistClassifier` (default architecture) on the 60k
MNIST training images of the offline ``mnist32`` dataset (32x32x1, scaled to ``[-1, 1]`` as the
diffusion training data), with AdamW (cosine-decayed learning rate), cross-entropy, random
shifts of up to +-2 pixels as the only augmentation, and outlier exposure (synthetic noise,
blank and blob images trained towards the uniform prediction, so non-digits get low
confidence); evaluates on the 10k test images and writes

    <out>.msgpack   flax.serialization.to_bytes(params)  (no pickle)
    <out>.json      sha256 of the msgpack, test accuracy, architecture, seed, command, date, ...

Usage (the shipped weights were made with the defaults, on CPU)::

    python -m atdiff_jax.eval.train_classifier --data_dir /tmp/tfds

``--data_dir`` is a TFDS data directory; ``mnist32`` is prepared there offline if missing.
Everything is seeded (``--seed``): batch order from numpy's ``SeedSequence``, parameter init and
shifts from ``jax.random``; a rerun on the same platform gives the same weights up to XLA's
floating-point reduction order.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import platform
import sys
import time

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atdiff_jax.models.classifier import MnistClassifier

__all__ = ["DEFAULT_OUT", "evaluate_accuracy", "main", "train_classifier", "write_weights"]

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier"
MAX_SHIFT = 2
OUTLIER_KINDS = ("uniform noise", "clipped gaussian noise", "constant", "smooth blobs")


def synthetic_outliers(key: jax.Array, n: int) -> jnp.ndarray:
    """``n`` non-digit images float ``[n, 32, 32, 1]`` in ``[-1, 1]`` for outlier exposure.

    Each is, with equal probability, uniform noise in ``[-1, 1]``; gaussian noise with random
    mean in ``[-1, 1]`` and std in ``[0.1, 1]``, clipped; a constant image of a random level; or
    smooth blobs (4x4 or 8x8 gaussian noise, bilinearly upsampled, ``tanh``).
    """
    k_kind, k_u, k_g, k_m, k_s, k_c, k_b4, k_b8, k_r = jax.random.split(key, 9)
    shape = (n, 32, 32, 1)
    uniform = jax.random.uniform(k_u, shape, minval=-1.0, maxval=1.0)
    mean = jax.random.uniform(k_m, (n, 1, 1, 1), minval=-1.0, maxval=1.0)
    std = jax.random.uniform(k_s, (n, 1, 1, 1), minval=0.1, maxval=1.0)
    gauss = jnp.clip(mean + std * jax.random.normal(k_g, shape), -1.0, 1.0)
    const = jnp.broadcast_to(jax.random.uniform(k_c, (n, 1, 1, 1), minval=-1.0, maxval=1.0),
                             shape)
    b4 = jax.image.resize(jax.random.normal(k_b4, (n, 4, 4, 1)) * 2, shape, "bilinear")
    b8 = jax.image.resize(jax.random.normal(k_b8, (n, 8, 8, 1)) * 2, shape, "bilinear")
    blobs = jnp.tanh(jnp.where(jax.random.bernoulli(k_r, 0.5, (n, 1, 1, 1)), b4, b8))
    kind = jax.random.randint(k_kind, (n, 1, 1, 1), 0, len(OUTLIER_KINDS))
    return jnp.select([kind == 0, kind == 1, kind == 2], [uniform, gauss, const], blobs)


def _shift(images: jnp.ndarray, key: jax.Array, max_shift: int = MAX_SHIFT) -> jnp.ndarray:
    """Random integer translation by ``[-max_shift, max_shift]`` px per image (fill: -1 = black).

    images: float ``[B, H, W, C]`` in ``[-1, 1]``.
    """
    b, h, w, c = images.shape
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad, constant_values=-1.0)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def evaluate_accuracy(model: MnistClassifier, params, images_uint8: np.ndarray,
                      labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy on uint8 ``[N, 32, 32, 1]`` images with int labels ``[N]``."""
    @jax.jit
    def predict(x):
        logits, _ = model.apply({"params": params}, x.astype(jnp.float32) / 127.5 - 1.0)
        return jnp.argmax(logits, -1)

    correct = 0
    for lo in range(0, len(images_uint8), batch_size):
        pred = np.asarray(predict(images_uint8[lo:lo + batch_size]))
        correct += int((pred == labels[lo:lo + batch_size]).sum())
    return correct / len(images_uint8)


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, *,
                     model: MnistClassifier | None = None, epochs: int = 5,
                     batch_size: int = 128, learning_rate: float = 2e-3,
                     weight_decay: float = 1e-4, num_outliers: int = 16,
                     outlier_weight: float = 0.5, seed: int = 0, log_every: int = 100):
    """Trains ``model`` and returns its params.

    Args:
      train_images: uint8 ``[N, 32, 32, 1]``; train_labels: int ``[N]`` in ``[0, 10)``.
      epochs, batch_size: full passes over the data (the last partial batch of an epoch is
        dropped); learning_rate: peak Adam(W) step size, 5% linear warm-up then cosine decay to 0.
      num_outliers, outlier_weight: outlier exposure (Hendrycks et al., ICLR 2019): each batch
        gets ``num_outliers`` :func:`synthetic_outliers` whose KL divergence from the uniform
        distribution (cross-entropy to it minus log 10) is added with weight
        ``outlier_weight``, so that non-digit images (noise, blank, blobs) get low confidence
        instead of the usual over-confident predictions.
      seed: parameter init, shifts (jax.random) and batch order (numpy SeedSequence).
    """
    model = MnistClassifier() if model is None else model
    n = len(train_images)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(total // 20, 1), total)
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    key = jax.random.key(seed)
    params = model.init(jax.random.fold_in(key, 0), jnp.zeros((1, 32, 32, 1)))["params"]
    opt_state = tx.init(params)
    shift_key = jax.random.fold_in(key, 1)

    @jax.jit
    def step(params, opt_state, x_uint8, y, step_idx):
        k_shift, k_out = jax.random.split(jax.random.fold_in(shift_key, step_idx))
        x = _shift(x_uint8.astype(jnp.float32) / 127.5 - 1.0, k_shift)
        if num_outliers:
            x = jnp.concatenate([x, synthetic_outliers(k_out, num_outliers)])

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            digits, out = logits[:len(y)], logits[len(y):]
            loss = optax.softmax_cross_entropy_with_integer_labels(digits, y).mean()
            if num_outliers:  # KL(uniform || softmax) = CE to the uniform target - log 10
                kl_uniform = (jax.nn.logsumexp(out, -1) - jnp.mean(out, -1)
                              - jnp.log(out.shape[-1]))
                loss = loss + outlier_weight * kl_uniform.mean()
            return loss, jnp.mean(jnp.argmax(digits, -1) == y)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    labels = np.asarray(train_labels, np.int32)
    t0, it = time.time(), 0
    for epoch in range(epochs):
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
        perm = rng.permutation(n)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            params, opt_state, loss, acc = step(params, opt_state, train_images[idx],
                                                labels[idx], it)
            it += 1
            if log_every and (it % log_every == 0 or it == total):
                print(f"epoch {epoch} step {it}/{total} loss {float(loss):.4f} "
                      f"batch acc {float(acc):.3f} ({time.time() - t0:.0f} s)", flush=True)
    return params


def write_weights(params, out: str | os.PathLike, meta: dict) -> str:
    """Writes ``<out>.msgpack`` (flax serialization) and ``<out>.json`` (``meta`` + sha256).

    Both are written to temporary files and renamed into place. Returns the sha256 hex digest.
    """
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = flax.serialization.to_bytes(jax.device_get(params))
    digest = hashlib.sha256(data).hexdigest()
    weights, info = out.with_suffix(".msgpack"), out.with_suffix(".json")
    tmp = weights.with_name(weights.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, weights)
    meta = {"file": weights.name, "sha256": digest, "size_bytes": len(data), **meta}
    tmp = info.with_name(info.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, info)
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="TFDS data dir (mnist32 prepared "
                        "there if missing)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="output path without suffix (.msgpack and .json are written)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--num_outliers", type=int, default=16,
                        help="synthetic non-digit images per batch (outlier exposure); 0: off")
    parser.add_argument("--outlier_weight", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from atdiff_jax.data import load_examples, prepare_mnist
    prepare_mnist(args.data_dir)
    x_train, y_train = load_examples("mnist32", data_dir=args.data_dir, split="train",
                                     with_labels=True)
    x_test, y_test = load_examples("mnist32", data_dir=args.data_dir, split="test",
                                   with_labels=True)
    model = MnistClassifier()
    t0 = time.time()
    params = train_classifier(x_train, y_train, model=model, epochs=args.epochs,
                              batch_size=args.batch_size, learning_rate=args.learning_rate,
                              weight_decay=args.weight_decay, num_outliers=args.num_outliers,
                              outlier_weight=args.outlier_weight, seed=args.seed)
    jax.block_until_ready(params)
    train_s = time.time() - t0
    acc = evaluate_accuracy(model, params, x_test, y_test)
    print(f"test accuracy {acc:.4f} ({round((1 - acc) * len(y_test))} errors of {len(y_test)}); "
          f"training took {train_s:.0f} s", flush=True)
    arch = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}
    meta = {
        "model": "atdiff_jax.models.classifier.MnistClassifier",
        "architecture": arch,
        "num_params": int(sum(np.size(a) for a in jax.tree.leaves(params))),
        "input": "float32 [B, 32, 32, 1] NHWC in [-1, 1] (uint8 / 127.5 - 1), mnist32",
        "test_accuracy": acc,
        "test_examples": len(y_test),
        "training": {"epochs": args.epochs, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                     "seed": args.seed, "augmentation": f"random shift +-{MAX_SHIFT} px",
                     "outlier_exposure": {"per_batch": args.num_outliers,
                                          "weight": args.outlier_weight,
                                          "kinds": list(OUTLIER_KINDS),
                                          "target": "uniform over the 10 classes"},
                     "optimizer": "optax.adamw, warmup_cosine_decay_schedule",
                     "train_examples": len(y_train), "seconds": round(train_s, 1)},
        "command": "python -m atdiff_jax.eval.train_classifier " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": f"{jax.default_backend()} ({platform.machine()}), jax {jax.__version__}, "
                    f"flax {flax.__version__}",
    }
    digest = write_weights(params, args.out, meta)
    print(f"wrote {pathlib.Path(args.out).with_suffix('.msgpack')} sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
