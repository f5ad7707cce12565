"""The image samplers: their names (the one registry that options and checks use), the jitted
samplers they build, and generating and saving images with them.

=================  =====================  ========================================================
name               runs                   what it is
=================  =====================  ========================================================
``ddim``           DPM                    DDIM, eta 0, on the chain respaced to ``steps`` steps
``iddpm``          DPM                    ancestral sampling (IDDPM) on the respaced chain
``dpm_solver``     DPM                    DPM-Solver++(2M) with logSNR steps, as the authors'
                                          sampling script (``diffusion/dpm_solver.py``)
``es``             DPM, evaluation only   ``iddpm`` with epsilon scaling (``eps_scale``), the ES
                                          baseline of ``atdiff eval`` and experiments
``cm_onestep``     consistency models     one network evaluation
``cm_multistep``   consistency models     ``steps`` evaluations, re-noising in between
=================  =====================  ========================================================

DPM runs use ``DPM_SAMPLERS`` (``sampler_fn``); consistency-model runs (``config.cm.kind !=
"none"``) use ``CM_SAMPLERS`` (``cm_sampler_fn``: Karras runs through
``consistency.samplers.karras_sample``, whose own ``sampler=`` names, ``KARRAS_SAMPLERS``, are the
reference code's; LCM runs through ``consistency.lcm.lcm_sample``). ``generate`` draws any number
of images with either; ``grid``, ``save_png`` and ``save_samples`` write them.

Timestep samplers (which t a training example gets) are another thing:
``diffusion.timestep_sampler.TIMESTEP_SAMPLERS``.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from atdiff_jax.consistency.lcm import lcm_sample
from atdiff_jax.consistency.samplers import KARRAS_SAMPLERS, karras_sample
from atdiff_jax.diffusion.dpm_solver import dpm_solver_sample
from atdiff_jax.diffusion.gaussian import GaussianDiffusion
from atdiff_jax.paths import write_atomic

# config.train.sampler (the grids of DPM runs) and `atdiff sample` on a DPM run
DPM_SAMPLERS = ("ddim", "iddpm", "dpm_solver")
# config.train.sampler and `atdiff sample` on a consistency-model run
CM_SAMPLERS = ("cm_onestep", "cm_multistep")
# `atdiff eval --samplers` and an experiment's spec.eval.samplers (DPM runs)
EVAL_SAMPLERS = ("ddim", "iddpm", "es", "dpm_solver")
# every name `atdiff sample --sampler` takes
SAMPLE_SAMPLERS = DPM_SAMPLERS + CM_SAMPLERS

__all__ = ["CM_SAMPLERS", "DPM_SAMPLERS", "EVAL_SAMPLERS", "KARRAS_SAMPLERS", "SAMPLE_SAMPLERS",
           "batch_shardings", "cm_sampler_fn", "generate", "grid", "multistep_ts", "sampler_fn",
           "save_png", "save_samples", "to_uint8"]


def sampler_fn(model, diffusion: GaussianDiffusion, *, sampler: str, steps: int,
               eps_scale: float = 1.0, clip_denoised: bool = True):
    """A jitted ``fn(params, x_T, rng, y) -> x_0`` for ``sampler`` at ``steps`` network calls.

    ``ddim`` respaces to ``"ddim{steps}"`` (eta 0), ``iddpm`` to ``"{steps}"`` (ancestral, learned
    or fixed variance; ``eps_scale`` != 1 is the ES sampler), ``dpm_solver`` is DPM-Solver++(2M)
    with logSNR steps as in the authors' sampling script.
    """
    if sampler not in DPM_SAMPLERS:
        raise ValueError(f"sampler must be one of {DPM_SAMPLERS}, got {sampler!r}")
    # One compiled sampler per (network, chain, sampler, steps): evaluating many checkpoints of
    # the same network (atdiff eval, atdiff experiment) compiles each sampler once.
    key = (model, _chain_key(diffusion), sampler, int(steps), float(eps_scale), clip_denoised)
    return _cached_sampler(key, lambda: _build_sampler_fn(
        model, diffusion, sampler=sampler, steps=steps, eps_scale=eps_scale,
        clip_denoised=clip_denoised))


_SAMPLER_CACHE: dict = {}
_SAMPLER_CACHE_SIZE = 64


def _cached_sampler(key, build):
    """The compiled sampler of ``key`` in ``_SAMPLER_CACHE`` (``build()`` on a miss; the oldest
    entry goes once the cache holds ``_SAMPLER_CACHE_SIZE``)."""
    if key not in _SAMPLER_CACHE:
        if len(_SAMPLER_CACHE) >= _SAMPLER_CACHE_SIZE:
            _SAMPLER_CACHE.pop(next(iter(_SAMPLER_CACHE)))
        _SAMPLER_CACHE[key] = build()
    return _SAMPLER_CACHE[key]


def _chain_key(diffusion: GaussianDiffusion) -> tuple:
    """What defines a chain (its tables are computed from these)."""
    return (diffusion.base_betas, tuple(np.asarray(diffusion.timestep_map).tolist()),
            diffusion.model_mean_type, diffusion.model_var_type, diffusion.loss_type,
            diffusion.rescale_timesteps)


def _build_sampler_fn(model, diffusion, *, sampler, steps, eps_scale, clip_denoised):
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


def multistep_ts(num_scales: int, steps: int) -> tuple[int, ...]:
    """Time indices of ``steps``-evaluation Karras multistep sampling: ``steps + 1`` points evenly
    spread over a ``max(num_scales, steps + 1)``-point schedule, e.g. (0, 20, 39) for 2 of 40."""
    n = max(int(num_scales), int(steps) + 1)
    return tuple(int(round(v)) for v in np.linspace(0, n - 1, int(steps) + 1))


def cm_sampler_fn(model, cm, *, sampler: str, steps: int,
                  diffusion: GaussianDiffusion | None = None, guidance_w: float | None = None):
    """A jitted ``fn(params, noise, rng, y) -> x_0`` in [-1, 1] for a consistency model.

    ``cm`` is the run's ``CMSettings`` (``atdiff_jax.train.build``). Karras runs (cd/ct):
    ``cm_onestep`` is ``f(sigma_max z, sigma_max)``; ``cm_multistep`` the stochastic multistep
    sampler at ``multistep_ts(cm.sample_scales, steps)``. LCM runs: ``lcm_sample`` with 1 or
    ``steps`` steps over the teacher's ``diffusion`` (the guidance scale ``guidance_w``, default
    ``cm.sample_w``, for a guided student).
    """
    if sampler not in CM_SAMPLERS:
        raise ValueError(f"sampler must be one of {CM_SAMPLERS} for a consistency model, got "
                         f"{sampler!r}")
    nfe = 1 if sampler == "cm_onestep" else int(steps)
    w = None
    if cm.kind == "lcm":
        if diffusion is None:
            raise ValueError("an LCM student samples over its teacher's chain: pass diffusion")
        w = cm.sample_w if guidance_w is None else float(guidance_w)
    # One compiled sampler per (network, what the sampler reads of the settings, sampler, NFE):
    # the experiment evaluates many checkpoints of one network (as sampler_fn).
    key = ("cm", model, cm.kind, cm.denoiser, cm.sample_scales, cm.lcm, w, sampler, nfe,
           _chain_key(diffusion) if cm.kind == "lcm" else None)
    return _cached_sampler(key, lambda: _build_cm_sampler_fn(model, cm, sampler=sampler, nfe=nfe,
                                                             diffusion=diffusion, w=w))


def _build_cm_sampler_fn(model, cm, *, sampler: str, nfe: int, diffusion, w):
    def apply_fn(params, x, t, y, rng, **kw):
        return model.apply({"params": params}, x, t, y=y, train=False, **kw)

    if cm.kind == "lcm":
        def run(params, noise, rng, y):
            return lcm_sample(apply_fn, params, noise, diffusion=diffusion, settings=cm.lcm,
                              steps=nfe, y=y, w=w if cm.lcm.guidance else None, rng=rng)

        return jax.jit(run)
    den = cm.denoiser

    def run(params, noise, rng, y):
        denoise_fn = den.denoise_fn(apply_fn, params, y=y)
        kw = dict(clip_denoised=True, sigma_min=den.sigma_min, sigma_max=den.sigma_max,
                  rho=den.rho)
        if nfe == 1 and sampler == "cm_onestep":
            return karras_sample(denoise_fn, noise, sampler="onestep", steps=cm.sample_scales, **kw)
        ts = multistep_ts(cm.sample_scales, nfe)
        return karras_sample(denoise_fn, noise, sampler="multistep", ts=ts,
                             steps=max(cm.sample_scales, nfe + 1), rng=rng, **kw)

    return jax.jit(run)


def generate(model, params: Any, diffusion: GaussianDiffusion | None, *, num: int, image_shape,
             rng: jax.Array, sampler: str = "ddim", steps: int = 50, batch_size: int = 64,
             num_classes: int | None = None, eps_scale: float = 1.0, cm=None,
             guidance_w: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` samples as uint8 [num, H, W, C] (and their labels for class-conditional models).

    A consistency model passes its ``CMSettings`` as ``cm`` and a ``CM_SAMPLERS`` sampler.
    Batch b uses ``fold_in(rng, b)``: the result does not depend on anything but the arguments.
    """
    if cm is not None:
        fn = cm_sampler_fn(model, cm, sampler=sampler, steps=steps, diffusion=diffusion,
                           guidance_w=guidance_w)
    else:
        fn = sampler_fn(model, diffusion, sampler=sampler, steps=steps, eps_scale=eps_scale)
    shardings = batch_shardings(batch_size)
    if shardings is not None:
        params = jax.device_put(params, shardings[1])
    images, labels = [], []
    for b, start in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - start)
        key = jax.random.fold_in(rng, b)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (batch_size,) + tuple(image_shape))
        y = None
        if num_classes:
            y = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 0, num_classes)
            labels.append(np.asarray(y[:n]))
        if shardings is not None:
            x_T, y = jax.device_put((x_T, y), shardings[0])
        x = np.asarray(fn(params, x_T, jax.random.fold_in(key, 2), y))[:n]
        images.append(to_uint8(x))
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def batch_shardings(batch_size: int) -> tuple[Any, Any] | None:
    """``(batch, replicated)`` shardings that split a batch of ``batch_size`` over this process's
    devices (the largest count that divides it), or None for one device or several processes.

    Sampling is per example, so a split batch gives the same images. It is what lets several
    accelerators share the work, and on a CPU it is worth ~1.9x on 2 cores: XLA:CPU runs one
    program's convolutions on about one core, while the programs of several simulated devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) run in parallel.
    """
    if jax.process_count() > 1:
        return None     # params may be spread over hosts: let the jitted sampler follow them
    devices = jax.local_devices()
    n = len(devices)
    while n > 1 and batch_size % n:
        n -= 1
    if n == 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices[:n]), ("data",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


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


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Writes uint8 ``image`` [H, W, C] as a PNG (local path or URL such as ``gs://``)."""
    img = image[..., 0] if image.shape[-1] == 1 else image
    write_atomic(path, lambda f: Image.fromarray(img).save(f, format="PNG"))


def save_samples(images: np.ndarray, labels: np.ndarray | None, out: str) -> tuple[str, str]:
    """Writes ``<out>.npz`` (``images`` uint8 [N,H,W,C], optional ``labels``) and ``<out>.png``."""
    out = os.fspath(out)
    base = out[:-4] if out.endswith((".npz", ".png")) else out
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    write_atomic(base + ".npz", lambda f: np.savez(f, **arrays))
    save_png(grid(images), base + ".png")
    return base + ".npz", base + ".png"
