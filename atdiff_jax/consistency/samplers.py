"""Samplers for consistency models and EDM denoisers (openai/consistency_models' ``karras_sample``).

All samplers take a denoiser ``denoise_fn(x [B,H,W,C], sigma [B]) -> x0 [B,H,W,C]`` (see
``KarrasDenoiser.denoise_fn`` / ``vp_denoiser``), start from ``x_T = sigma_max * z`` and are pure
and jittable (step counts and time lists are static; loops are ``lax.scan``):

* ``sample_onestep``: ``f(x_T, sigma_0)``, one network evaluation (a consistency model).
* ``sample_multistep``: the consistency models' stochastic iterative sampler: for the time
  indices ``ts`` (e.g. (0, 22, 39) of a 40-point schedule) alternately denoise and re-noise to the
  next time with fresh Gaussian noise.
* ``sample_heun``: EDM Algorithm 2 (Heun steps, optional churn ``S_churn``), the last step (to
  sigma = 0) an Euler step.

``karras_sample`` dispatches like the reference: optional clamping of every denoiser output
(``clip_denoised``: a Python bool, or a traced bool array so that one compiled sampler serves both)
and the final output always clamped to [-1, 1].

Randomness is explicit: either a key ``rng`` or the pre-drawn ``step_noise`` (stacked in call order,
what the reference's generator returns from ``randn_like``), so runs can be replayed exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax.consistency.karras import DenoiseFn, karras_sigmas

# karras_sample(sampler=...): the names of openai/consistency_models (the project's image
# samplers are atdiff_jax.samplers)
KARRAS_SAMPLERS = ("onestep", "multistep", "heun")

__all__ = ["KARRAS_SAMPLERS", "karras_sample", "multistep_sigmas", "sample_heun",
           "sample_multistep", "sample_onestep"]


def _clipped(denoise_fn: DenoiseFn, clip_denoised: bool | jax.Array) -> DenoiseFn:
    """The denoiser with its output clamped to [-1, 1]; ``clip_denoised`` may be a traced bool
    (one compiled sampler for both settings)."""
    if isinstance(clip_denoised, (bool, np.bool_)):
        if not clip_denoised:
            return denoise_fn
        return lambda x, s: jnp.clip(denoise_fn(x, s), -1.0, 1.0)

    def f(x, s):
        d = denoise_fn(x, s)
        return jnp.where(clip_denoised, jnp.clip(d, -1.0, 1.0), d)

    return f


def _per_example(sigma, x):
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))


def _step_noise(rng, step_noise, n: int, x: jax.Array, what: str) -> jax.Array:
    if step_noise is not None:
        step_noise = jnp.asarray(step_noise, x.dtype)
        if step_noise.shape != (n,) + x.shape:
            raise ValueError(f"{what}: step_noise must have shape {(n,) + x.shape}, got "
                             f"{step_noise.shape}")
        return step_noise
    if rng is None:
        raise ValueError(f"{what} needs fresh noise: pass rng or step_noise")
    return jax.random.normal(rng, (n,) + x.shape, x.dtype)


def sample_onestep(denoise_fn: DenoiseFn, x: jax.Array, *, sigma: float | jax.Array,
                   clip_denoised: bool | jax.Array = False) -> jax.Array:
    """One evaluation ``f(x, sigma)`` of a consistency model: [B,H,W,C] -> [B,H,W,C]."""
    return _clipped(denoise_fn, clip_denoised)(x, _per_example(sigma, x))


def multistep_sigmas(ts: Sequence[int], *, steps: int, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """Noise levels of the multistep sampler, computed in float64 as the reference does.

    Returns ``(sigma [len(ts)-1], noise_scale [len(ts)-1])`` as float32: step i denoises at
    ``sigma[i] = (max^(1/rho) + ts[i]/(steps-1) * (min^(1/rho) - max^(1/rho)))^rho`` and re-noises
    with ``noise_scale[i] = sqrt(next_t^2 - sigma_min^2)``, ``next_t`` the next time clipped to
    [sigma_min, sigma_max].
    """
    ts = [int(t) for t in ts]
    if len(ts) < 2:
        raise ValueError(f"ts needs at least 2 entries, got {ts}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    max_rho, min_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = [(max_rho + t / (steps - 1) * (min_rho - max_rho)) ** rho for t in ts]
    sigma = np.asarray(sig[:-1], np.float64)
    next_t = np.clip(np.asarray(sig[1:], np.float64), sigma_min, sigma_max)
    scale = np.sqrt(next_t ** 2 - sigma_min ** 2)
    return sigma.astype(np.float32), scale.astype(np.float32)


def sample_multistep(denoise_fn: DenoiseFn, x: jax.Array, *, ts: Sequence[int], steps: int,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                     clip_denoised: bool | jax.Array = False, rng: jax.Array | None = None,
                     step_noise: jax.Array | None = None, return_trajectory: bool = False):
    """Stochastic iterative (multistep) consistency sampling: reference ``stochastic_iterative_sampler``.

    For i = 0 .. len(ts)-2: ``x0 = f(x, sigma_i)``; ``x = x0 + z_i * sqrt(next_t^2 - sigma_min^2)``
    (see :func:`multistep_sigmas`). Note that the result is the last *re-noised* x, as in the
    reference (with the usual ``ts`` ending at ``steps - 1`` the last noise scale is ~1e-10).

    Args:
      denoise_fn: the consistency function ``f(x, sigma)``.
      x: [B, H, W, C] starting point ``sigma_max * z``.
      ts: static time indices into a ``steps``-point Karras schedule, e.g. (0, 22, 39).
      clip_denoised: clamp every ``f`` output to [-1, 1].
      rng / step_noise: the fresh noise: a key, or pre-drawn ``z`` [len(ts)-1, B, H, W, C].
      return_trajectory: also return ``{"x": inputs [S,B,...], "denoised": f outputs [S,B,...]
        (clamped when clip_denoised), "sigma": [S]}``.

    Returns:
      [B, H, W, C] (and the trajectory dict).
    """
    sigma, scale = multistep_sigmas(ts, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
                                    rho=rho)
    z = _step_noise(rng, step_noise, len(sigma), x, "sample_multistep")
    f = _clipped(denoise_fn, clip_denoised)

    def body(x, inp):
        s, c, zi = inp
        x0 = f(x, _per_example(s, x))
        return x0 + zi * c, (x, x0)

    x_out, (xs, x0s) = jax.lax.scan(body, x, (jnp.asarray(sigma), jnp.asarray(scale), z))
    if return_trajectory:
        return x_out, {"x": xs, "denoised": x0s, "sigma": jnp.asarray(sigma)}
    return x_out


def sample_heun(denoise_fn: DenoiseFn, x: jax.Array, *, sigmas: np.ndarray | jax.Array,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0, clip_denoised: bool | jax.Array = False, rng: jax.Array | None = None,
                step_noise: jax.Array | None = None, return_trajectory: bool = False):
    """EDM Algorithm 2 (Heun steps with optional churn): reference ``sample_heun``.

    For each step i: ``gamma = min(s_churn / n, sqrt(2) - 1)`` if ``s_tmin <= sigma_i <= s_tmax``
    else 0; ``sigma_hat = sigma_i (1 + gamma)``; ``x += s_noise z_i sqrt(sigma_hat^2 - sigma_i^2)``
    when gamma > 0; then a Heun step from sigma_hat to sigma_{i+1}, or an Euler step when
    ``sigma_{i+1} == 0``.

    Args:
      denoise_fn: ``D(x, sigma)``.
      x: [B, H, W, C] starting point ``sigmas[0] * z`` (the reference uses ``sigma_max * z``).
      sigmas: [n + 1] descending noise levels, e.g. ``karras_sigmas(n, ...)`` ending in 0. Must be
        concrete (NumPy or a non-traced array): the step structure depends on which entries are 0.
      s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity settings (s_churn = 0: deterministic).
      clip_denoised: clamp every denoiser output to [-1, 1].
      rng / step_noise: churn noise (only needed when s_churn > 0): a key or ``z`` [n, B, H, W, C].
      return_trajectory: also return ``{"x": [n+1, B, ...] (x at the start of each step, then the
        result), "denoised": [n, B, ...] (the first denoiser output of each step)}``.

    Returns:
      [B, H, W, C] (and the trajectory dict).
    """
    sig = np.asarray(sigmas, np.float32)
    if sig.ndim != 1 or len(sig) < 2:
        raise ValueError(f"sigmas must be a 1-D array of at least 2 noise levels, got {sig.shape}")
    n = len(sig) - 1
    if np.any(sig[:-1] == 0):
        raise ValueError("only the last entry of sigmas may be 0")
    f = _clipped(denoise_fn, clip_denoised)
    # gamma per step, computed on the host like the reference (Python floats).
    gam = np.asarray([min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= float(s) <= s_tmax else 0.0
                      for s in sig[:-1]], np.float64)
    churn = bool(np.any(gam > 0))
    z = (_step_noise(rng, step_noise, n, x, "sample_heun with s_churn > 0") if churn
         else jnp.zeros((n,) + (1,) * x.ndim, x.dtype))
    sigma_hat = (sig[:-1] * (gam + 1.0).astype(np.float32)).astype(np.float32)
    churn_scale = (np.sqrt(np.maximum(sigma_hat.astype(np.float64) ** 2 - sig[:-1].astype(
        np.float64) ** 2, 0.0)) * s_noise).astype(np.float32)
    churn_scale = np.where(gam > 0, churn_scale, 0.0).astype(np.float32)

    def first_stage(x, s_hat, c, zi):
        x = jnp.where(c > 0, x + zi * c, x) if churn else x
        denoised = f(x, _per_example(s_hat, x))
        d = (x - denoised) / s_hat
        return x, denoised, d

    def heun(x, inp):
        s_hat, s_next, c, zi = inp
        x_start = x
        x, denoised, d = first_stage(x, s_hat, c, zi)
        dt = s_next - s_hat
        x_2 = x + d * dt
        denoised_2 = f(x_2, _per_example(s_next, x_2))
        d_2 = (x_2 - denoised_2) / s_next
        return x + (d + d_2) / 2 * dt, (x_start, denoised)

    last_euler = sig[-1] == 0
    n_heun = n - 1 if last_euler else n
    xs, dens = [], []
    if n_heun:
        inputs = (jnp.asarray(sigma_hat[:n_heun]), jnp.asarray(sig[1:n_heun + 1]),
                  jnp.asarray(churn_scale[:n_heun]), z[:n_heun])
        x, (xs_h, dens_h) = jax.lax.scan(heun, x, inputs)
        xs.append(xs_h)
        dens.append(dens_h)
    if last_euler:
        x_start = x
        x, denoised, d = first_stage(x, sigma_hat[-1], churn_scale[-1], z[-1])
        x = x + d * (sig[-1] - sigma_hat[-1])
        xs.append(x_start[None])
        dens.append(denoised[None])
    if return_trajectory:
        traj = {"x": jnp.concatenate(xs + [x[None]]), "denoised": jnp.concatenate(dens)}
        return x, traj
    return x


def karras_sample(denoise_fn: DenoiseFn, noise: jax.Array, *, sampler: str, steps: int,
                  clip_denoised: bool | jax.Array = True, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, ts: Sequence[int] | None = None, s_churn: float = 0.0,
                  s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                  rng: jax.Array | None = None, step_noise: jax.Array | None = None,
                  return_trajectory: bool = False):
    """Samples from ``noise`` ~ N(0, I) [B, H, W, C]: reference ``karras_sample``.

    ``x_T = sigma_max * noise``; ``sampler``:

    * "onestep": ``f(x_T, karras_sigmas(steps)[0])`` (79.999985 for sigma_max = 80, as the reference).
    * "multistep": :func:`sample_multistep` with ``ts`` (required) on a ``steps``-point schedule.
    * "heun": :func:`sample_heun` on ``karras_sigmas(steps, ...)`` (with its trailing 0).

    ``clip_denoised`` clamps every denoiser output; the result is always clamped to [-1, 1]
    (``return_trajectory`` returns the unclamped trajectory alongside).
    """
    if sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"sampler must be one of {KARRAS_SAMPLERS}, got {sampler!r}")
    x_T = noise * sigma_max
    traj = None
    if sampler == "onestep":
        sigma0 = karras_sigmas(steps, sigma_min, sigma_max, rho)[0]
        x = sample_onestep(denoise_fn, x_T, sigma=sigma0, clip_denoised=clip_denoised)
    elif sampler == "multistep":
        if ts is None:
            raise ValueError("sampler='multistep' needs ts, e.g. (0, 22, 39)")
        out = sample_multistep(denoise_fn, x_T, ts=ts, steps=steps, sigma_min=sigma_min,
                               sigma_max=sigma_max, rho=rho, clip_denoised=clip_denoised, rng=rng,
                               step_noise=step_noise, return_trajectory=return_trajectory)
        x, traj = out if return_trajectory else (out, None)
    else:
        out = sample_heun(denoise_fn, x_T, sigmas=karras_sigmas(steps, sigma_min, sigma_max, rho),
                          s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                          clip_denoised=clip_denoised, rng=rng, step_noise=step_noise,
                          return_trajectory=return_trajectory)
        x, traj = out if return_trajectory else (out, None)
    sample = jnp.clip(x, -1.0, 1.0)
    if return_trajectory:
        return sample, ({} if traj is None else traj) | {"sampler_return": x}
    return sample
