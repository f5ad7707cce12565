"""Generating images from a trained model with any of the samplers, and saving them."""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from atdiff_jax.diffusion.dpm_solver import dpm_solver_sample
from atdiff_jax.diffusion.gaussian import GaussianDiffusion

SAMPLERS = ("ddim", "iddpm", "dpm_solver")


def sampler_fn(model, diffusion: GaussianDiffusion, *, sampler: str, steps: int,
               eps_scale: float = 1.0, clip_denoised: bool = True):
    """A jitted ``fn(params, x_T, rng, y) -> x_0`` for ``sampler`` at ``steps`` network calls.

    ``ddim`` respaces to ``"ddim{steps}"`` (eta 0), ``iddpm`` to ``"{steps}"`` (ancestral, learned
    or fixed variance; ``eps_scale`` != 1 is the ES sampler), ``dpm_solver`` is DPM-Solver++(2M)
    with logSNR steps as in the authors' sampling script.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddim":
        chain = diffusion.respace(f"ddim{steps}")
    elif sampler == "iddpm":
        chain = diffusion.respace(str(steps))

    def run(params, x_T, rng, y):
        def model_fn(x, t):
            return model.apply({"params": params}, x, t, y=y, train=False)

        if sampler == "ddim":
            return chain.ddim_sample_loop(model_fn, x_T, clip_denoised=clip_denoised,
                                          eps_scale=eps_scale)
        if sampler == "iddpm":
            return chain.p_sample_loop(model_fn, x_T, rng, clip_denoised=clip_denoised,
                                       eps_scale=eps_scale)
        return jnp.clip(dpm_solver_sample(model_fn, x_T, betas=diffusion.base_betas, steps=steps,
                                          t_start=0.992), -1.0, 1.0)

    return jax.jit(run)


def generate(model, params: Any, diffusion: GaussianDiffusion, *, num: int, image_shape,
             rng: jax.Array, sampler: str = "ddim", steps: int = 50, batch_size: int = 64,
             num_classes: int | None = None, eps_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` samples as uint8 [num, H, W, C] (and their labels for class-conditional models).

    Batch b uses ``fold_in(rng, b)``: the result does not depend on anything but the arguments.
    """
    fn = sampler_fn(model, diffusion, sampler=sampler, steps=steps, eps_scale=eps_scale)
    images, labels = [], []
    for b, start in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - start)
        key = jax.random.fold_in(rng, b)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (batch_size,) + tuple(image_shape))
        y = None
        if num_classes:
            y = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 0, num_classes)
            labels.append(np.asarray(y[:n]))
        x = np.asarray(fn(params, x_T, jax.random.fold_in(key, 2), y))[:n]
        images.append(to_uint8(x))
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels (guided-diffusion's rounding)."""
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*H, cols*W, C] tile image (1-px gaps)."""
    n, h, w, c = images.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
    return out


def save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = image[..., 0] if image.shape[-1] == 1 else image
    tmp = path + ".tmp"
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_samples(images: np.ndarray, labels: np.ndarray | None, out: str) -> tuple[str, str]:
    """Writes ``<out>.npz`` (``images`` uint8 [N,H,W,C], optional ``labels``) and ``<out>.png``."""
    base = out[:-4] if out.endswith((".npz", ".png")) else out
    os.makedirs(os.path.dirname(os.path.abspath(base)) or ".", exist_ok=True)
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    tmp = base + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, base + ".npz")
    save_png(grid(images), base + ".png")
    return base + ".npz", base + ".png"
