"""Karras/EDM noise levels and denoiser parameterisations (Karras et al. 2022; Song et al. 2023).

A *denoiser* maps a noisy image ``x = x0 + sigma * z`` ([B, H, W, C], float32, VE/EDM scale: pixel
values in [-1, 1] plus Gaussian noise of standard deviation ``sigma``) and its noise levels
``sigma`` [B] to an estimate of ``x0``. Networks are wrapped as in openai/consistency_models'
``KarrasDenoiser.denoise``::

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, 250 * log(sigma + 1e-44))

with the EDM scalings (``distillation=False``, the teacher / score model)::

    c_skip = sd^2 / (sigma^2 + sd^2),   c_out = sigma * sd / sqrt(sigma^2 + sd^2)

or the consistency-model scalings (``distillation=True``), which make ``D(x, sigma_min) = x``
exactly (the boundary condition of a consistency function)::

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),   c_out = (sigma - sigma_min) * sd / sqrt(sigma^2 + sd^2)

and ``c_in = 1 / sqrt(sigma^2 + sd^2)`` in both (``sd`` = sigma_data). A network is passed in as
``apply_fn(params, x, t, y, rng) -> out`` (the project's ``ApplyFn`` convention, see
``atdiff_jax.diffusion.objective``); a ready denoiser is any ``denoise_fn(x, sigma) -> x0``.

``vp_denoiser`` turns a VP (DDPM) epsilon-prediction network and its ``GaussianDiffusion`` into such
a ``denoise_fn``, so a guided-diffusion / AT_Diff model can be the teacher of consistency
distillation or be sampled with the EDM samplers.

Numerics: ``karras_sigmas`` and ``consistency_sigmas`` reproduce the reference's float32 values
bit for bit (torch's ``linspace`` rounds its upper half with a fused multiply-add; ``x ** rho`` is
correctly rounded); they are host-side NumPy functions of static sizes, usable as constants
under ``jax.jit``. Note that ``1e-44`` is a float32 denormal: XLA:CPU flushes it to zero, so
``250 * log(sigma + 1e-44)`` differs from the reference only at ``sigma == 0`` (-inf instead of
-25328), a noise level no sampler or loss here evaluates the network at.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# apply_fn(params, x [B,H,W,C], t [B] float, y [B] or None, rng or None) -> out [B,H,W,C(,2C)]
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None, jax.Array | None], jax.Array]
# denoise_fn(x [B,H,W,C], sigma [B]) -> x0 estimate [B,H,W,C]
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

WEIGHT_SCHEDULES = ("snr", "snr+1", "karras", "truncated-snr", "uniform")

__all__ = [
    "WEIGHT_SCHEDULES",
    "ApplyFn",
    "DenoiseFn",
    "KarrasDenoiser",
    "append_dims",
    "boundary_scalings",
    "consistency_sigma_pair",
    "consistency_sigmas",
    "denoise",
    "edm_scalings",
    "get_weightings",
    "karras_sigmas",
    "rescale_sigma",
    "torch_linspace01",
    "vp_denoiser",
    "vp_sigmas",
]


# ----------------------------------------------------------------------------------------------
# noise levels


def torch_linspace01(n: int) -> np.ndarray:
    """``torch.linspace(0, 1, n)`` in float32, bit for bit: [n].

    torch computes ``i * step`` for the first half and ``1 - step * (n - 1 - i)`` (rounded once, a
    fused multiply-add) for the second, with ``step = 1 / (n - 1)`` in float32.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return np.zeros((1,), np.float32)
    i = np.arange(n)
    step = np.float32(1.0) / np.float32(n - 1)
    lower = step * i.astype(np.float32)
    upper = (1.0 - np.float64(step) * (n - 1 - i).astype(np.float64)).astype(np.float32)
    return np.where(i < n // 2, lower, upper).astype(np.float32)


def _rho_pow(base: np.ndarray, rho: float) -> np.ndarray:
    """float32 ``base ** rho``, correctly rounded (as torch's float32 ``pow`` gives here)."""
    return (np.asarray(base, np.float32).astype(np.float64) ** float(rho)).astype(np.float32)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *,
                  append_zero: bool = True) -> np.ndarray:
    """The Karras et al. (2022) schedule, descending: reference ``get_sigmas_karras``.

    ``sigma_i = (max^(1/rho) + i/(n-1) * (min^(1/rho) - max^(1/rho)))^rho`` for i = 0..n-1, in
    float32 as the reference computes it (so the first value is 79.999985, not 80, for
    ``sigma_max=80``), followed by a trailing 0 as in the reference (``append_zero=False`` drops it).

    Returns:
      float32 NumPy array [n + 1] (or [n]), from ``~sigma_max`` down to ``~sigma_min`` (then 0).
    """
    ramp = torch_linspace01(n)
    min_inv, max_inv = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    base = np.float32(max_inv) + ramp * np.float32(min_inv - max_inv)
    sigmas = _rho_pow(base, rho)
    if append_zero:
        sigmas = np.append(sigmas, np.float32(0.0))
    return sigmas.astype(np.float32)


def consistency_sigmas(num_scales: int, sigma_min: float, sigma_max: float,
                       rho: float = 7.0) -> np.ndarray:
    """The N = ``num_scales`` discretisation points of ``consistency_losses``: [N] float32.

    ``t_n = (max^(1/rho) + n/(N-1) * (min^(1/rho) - max^(1/rho)))^rho`` computed as the reference
    does in float32 from the integer n (``n / (N - 1)`` is a float32 division), n = 0..N-1;
    descending from ~sigma_max to ~sigma_min (``t_{N-1}`` = 0.0019999996 for sigma_min = 0.002).
    """
    if int(num_scales) < 2:
        raise ValueError(f"num_scales must be >= 2, got {num_scales}")
    n = np.arange(int(num_scales), dtype=np.float32)
    frac = n / np.float32(int(num_scales) - 1)
    min_inv, max_inv = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    base = np.float32(max_inv) + frac * np.float32(min_inv - max_inv)
    return _rho_pow(base, rho)


def consistency_sigma_pair(indices: jax.Array, num_scales: int | jax.Array, *, sigma_min: float,
                           sigma_max: float, rho: float = 7.0) -> tuple[jax.Array, jax.Array]:
    """``(t, t2)`` = (t_n, t_{n+1}) for the per-example indices n [B] (ints in [0, N-2]).

    With a static Python ``num_scales`` the values come from the bit-exact host table
    (``consistency_sigmas``). A traced ``num_scales`` (e.g. from a progressive schedule inside a
    jitted step, so that changing N does not recompile) uses the same formula in jnp; XLA:CPU
    contracts the base into a fused multiply-add (one rounding instead of two), so t can differ
    from the reference by up to ``rho`` ulps (relative 5e-7 measured).
    """
    indices = jnp.asarray(indices)
    if isinstance(num_scales, (int, np.integer)):
        table = jnp.asarray(consistency_sigmas(int(num_scales), sigma_min, sigma_max, rho))
        return table[indices], table[indices + 1]
    n_minus_1 = jnp.asarray(num_scales, jnp.float32) - 1.0
    min_inv, max_inv = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)

    def sig(i):
        base = jnp.float32(max_inv) + (i.astype(jnp.float32) / n_minus_1) * jnp.float32(
            min_inv - max_inv)
        return base ** jnp.float32(rho)

    return sig(indices), sig(indices + 1)


# ----------------------------------------------------------------------------------------------
# scalings and the denoiser


def append_dims(v: jax.Array, ndim: int) -> jax.Array:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dims in all."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def edm_scalings(sigma, *, sigma_data: float = 0.5):
    """EDM ``(c_skip, c_out, c_in)`` of noise levels ``sigma`` (any shape): reference ``get_scalings``."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * sigma_data / (sigma ** 2 + sd2) ** 0.5
    c_in = 1 / (sigma ** 2 + sd2) ** 0.5
    return c_skip, c_out, c_in


def boundary_scalings(sigma, *, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Consistency-model ``(c_skip, c_out, c_in)``: ``get_scalings_for_boundary_condition``.

    ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0`` exactly, so ``D(x, sigma_min) = x``.
    """
    sd2 = sigma_data ** 2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sd2) ** 0.5
    c_in = 1 / (sigma ** 2 + sd2) ** 0.5
    return c_skip, c_out, c_in


def rescale_sigma(sigma: jax.Array) -> jax.Array:
    """The network's time input ``250 * log(sigma + 1e-44)`` ([B], float32)."""
    return 1000 * 0.25 * jnp.log(sigma + 1e-44)


def denoise(apply_fn: ApplyFn, params: Any, x_t: jax.Array, sigmas: jax.Array, *,
            sigma_data: float = 0.5, sigma_min: float = 0.002, distillation: bool,
            y: jax.Array | None = None, rng: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Reference ``KarrasDenoiser.denoise``: the network wrapped as a denoiser.

    Args:
      apply_fn: the network ``F``, see ``ApplyFn``; it receives ``c_in * x_t`` and
        ``250 * log(sigma + 1e-44)``.
      params: its parameters.
      x_t: [B, H, W, C] noisy images ``x0 + sigma * z``.
      sigmas: [B] noise levels (a scalar is broadcast).
      sigma_data, sigma_min: scaling constants.
      distillation: True for the consistency-model (boundary-condition) scalings, False for EDM.
      y: [B] class labels or None; rng: key for stochastic layers (dropout) or None.

    Returns:
      ``(model_output, denoised)``, both [B, H, W, C]: the raw network output (its first C channels
      when the network outputs more) and ``c_skip * x_t + c_out * model_output``.
    """
    sigmas = jnp.broadcast_to(jnp.asarray(sigmas, jnp.float32), (x_t.shape[0],))
    scal = (boundary_scalings(sigmas, sigma_data=sigma_data, sigma_min=sigma_min) if distillation
            else edm_scalings(sigmas, sigma_data=sigma_data))
    c_skip, c_out, c_in = (append_dims(c, x_t.ndim) for c in scal)
    model_output = apply_fn(params, c_in * x_t, rescale_sigma(sigmas), y, rng)
    model_output = model_output[..., :x_t.shape[-1]]
    return model_output, c_out * model_output + c_skip * x_t


def get_weightings(weight_schedule: str, snrs: jax.Array, sigma_data: float) -> jax.Array:
    """Per-example loss weights from ``snrs = sigma^-2`` [B]: reference ``get_weightings``."""
    if weight_schedule == "snr":
        return snrs
    if weight_schedule == "snr+1":
        return snrs + 1
    if weight_schedule == "karras":
        return snrs + 1.0 / sigma_data ** 2
    if weight_schedule == "truncated-snr":
        return jnp.maximum(snrs, 1.0)
    if weight_schedule == "uniform":
        return jnp.ones_like(snrs)
    raise ValueError(f"weight_schedule must be one of {WEIGHT_SCHEDULES}, got {weight_schedule!r}")


@dataclasses.dataclass(frozen=True)
class KarrasDenoiser:
    """Static settings of a Karras/EDM denoiser (hashable, so usable as a jit static argument).

    ``distillation=True`` gives the consistency-model scalings (the student and target networks of
    CD/CT), False the EDM scalings (the teacher). Defaults are the reference's CM settings.
    """
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    distillation: bool = True
    weight_schedule: str = "uniform"

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")
        if self.sigma_data <= 0 or self.rho <= 0:
            raise ValueError("sigma_data and rho must be positive")
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"weight_schedule must be one of {WEIGHT_SCHEDULES}, got "
                             f"{self.weight_schedule!r}")

    def scalings(self, sigma):
        """``(c_skip, c_out, c_in)`` of ``sigma`` for this denoiser's parameterisation."""
        if self.distillation:
            return boundary_scalings(sigma, sigma_data=self.sigma_data, sigma_min=self.sigma_min)
        return edm_scalings(sigma, sigma_data=self.sigma_data)

    def denoise(self, apply_fn: ApplyFn, params: Any, x_t: jax.Array, sigmas: jax.Array, *,
                y: jax.Array | None = None, rng: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
        """``(model_output, denoised)``, see :func:`denoise`."""
        return denoise(apply_fn, params, x_t, sigmas, sigma_data=self.sigma_data,
                       sigma_min=self.sigma_min, distillation=self.distillation, y=y, rng=rng)

    def denoise_fn(self, apply_fn: ApplyFn, params: Any, *, y: jax.Array | None = None,
                   rng: jax.Array | None = None) -> DenoiseFn:
        """The closure ``denoise_fn(x, sigma) -> denoised`` (for the samplers and as a teacher)."""
        return lambda x, sigma: self.denoise(apply_fn, params, x, sigma, y=y, rng=rng)[1]

    def karras_sigmas(self, n: int, *, append_zero: bool = True) -> np.ndarray:
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho, append_zero=append_zero)

    def weights(self, sigma: jax.Array) -> jax.Array:
        """Per-example loss weights of noise levels ``sigma`` [B]."""
        return get_weightings(self.weight_schedule, sigma ** -2.0, self.sigma_data)


# ----------------------------------------------------------------------------------------------
# VP (DDPM) epsilon model -> denoiser


def vp_sigmas(alphas_cumprod) -> np.ndarray:
    """The EDM noise levels ``sqrt((1 - abar_t) / abar_t)`` of a VP chain: [T], ascending in t."""
    ac = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - ac) / ac)


def vp_denoiser(model_fn: Callable[[jax.Array, jax.Array], jax.Array], diffusion: Any, *,
                clip_denoised: bool = False) -> DenoiseFn:
    """A denoiser ``D(x, sigma)`` in EDM scale from a VP epsilon-prediction model.

    A VP sample ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps`` is ``x_vp = x / sqrt(1 + sigma^2)``
    with ``x = x0 + sigma * eps`` and ``sigma = sqrt((1 - abar) / abar)``. So::

        x_vp = x / sqrt(1 + sigma^2)
        t    = the (fractional) chain index whose sigma is ``sigma``: linear interpolation of the
               index over ``log sigma_t`` of the chain (as k-diffusion's ``DiscreteSchedule``);
               sigma outside [sigma_0, sigma_{T-1}] is clamped to the end points (the network is
               only ever queried at times it was trained on, the image scaling uses the true sigma)
        eps  = model_fn(x_vp, model_time(t))   (first C channels of a learned-sigma output)
        D    = x - sigma * eps

    ``model_time`` is the diffusion's timestep map interpolated at the fractional index (identity
    for an un-respaced chain), times ``1000 / T`` when ``rescale_timesteps`` is set: exactly what
    ``GaussianDiffusion.model_timesteps`` gives at integer t.

    Args:
      model_fn: ``model_fn(x_vp [B,H,W,C], t [B] float) -> eps [B,H,W,C or 2C]``, e.g.
        ``lambda x, t: unet.apply({'params': p}, x, t)``.
      diffusion: a ``GaussianDiffusion`` (its float32 ``alphas_cumprod`` table, ``timestep_map``,
        ``rescale_timesteps`` and ``original_num_steps`` are used) trained with
        ``model_mean_type='epsilon'``.
      clip_denoised: clamp D to [-1, 1].

    Returns:
      ``denoise_fn(x [B,H,W,C], sigma [B]) -> x0 estimate [B,H,W,C]`` (float32).
    """
    if getattr(diffusion, "model_mean_type", "epsilon") != "epsilon":
        raise ValueError("vp_denoiser needs an epsilon-prediction model "
                         f"(model_mean_type='epsilon'), got {diffusion.model_mean_type!r}")
    log_sigmas = np.log(vp_sigmas(diffusion.tables["alphas_cumprod"])).astype(np.float32)
    if np.any(np.diff(log_sigmas) <= 0):
        raise ValueError("the VP chain's sigmas must increase strictly with t")
    index = np.arange(len(log_sigmas), dtype=np.float32)
    tmap = np.asarray(diffusion.timestep_map, np.float32)
    scale = 1000.0 / diffusion.original_num_steps if diffusion.rescale_timesteps else 1.0

    def denoise_fn(x: jax.Array, sigma: jax.Array) -> jax.Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
        t = jnp.interp(jnp.log(sigma), jnp.asarray(log_sigmas), jnp.asarray(index))
        t_model = jnp.interp(t, jnp.asarray(index), jnp.asarray(tmap)) * scale
        s = append_dims(sigma, x.ndim)
        eps = model_fn(x / jnp.sqrt(1.0 + s ** 2), t_model)[..., :x.shape[-1]]
        x0 = x - s * eps
        return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

    return denoise_fn
