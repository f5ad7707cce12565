"""Latent-consistency-style distillation (LCM, Luo et al. 2023) from a VP epsilon teacher.

The teacher is a VP (DDPM) epsilon-prediction network with its ``GaussianDiffusion`` (T steps);
the student is a network of the same kind wrapped in LCM's boundary-condition parameterisation
(diffusers' ``train_lcm_distill_sd_wds.py``)::

    f(x, t)   = c_skip(t) x + c_out(t) x0_pred(x, t)
    x0_pred   = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    c_skip(t) = sd^2 / ((t s)^2 + sd^2),   c_out(t) = t s / sqrt((t s)^2 + sd^2)

with ``t`` the integer DDPM timestep, ``s = timestep_scaling`` (10) and ``sd = sigma_data``
(0.5), so ``f(x, 0) = x`` exactly (the boundary condition sits at timestep 0).

Skipping-step DDIM solver (``LCMSettings.skip`` = k): the DDIM timesteps are ``t_n = n k - 1``,
n = 1 .. N with N = T // k (diffusers' ``DDIMSolver``). For an example with DDIM index i
(``indices``, uniform in [0, N-1]) the student sees time ``t = t_{i+1}`` and the target time is
``s = max(t - k, 0)``::

    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    f_s    = f_theta(x_t + delta, t, w, y)                     (online network)
    x_sol  = stop_grad(x_t + delta) or stop_grad(x_t)          (teacher_from_perturbed)
    eps    = eps_c + w (eps_c - eps_u)                         classifier-free guidance (or eps_c)
    x_s    = sqrt(abar_s) x0_pred(x_sol, t, eps) + sqrt(1 - abar_s) eps     one DDIM step t -> s
    target = stop_grad(f_theta-(x_s, s, w, y))                 (target network, same dropout key)
    loss_i = d(f_s, target)

``d`` is the mean squared error (``"l2"``) or LCM's pseudo-Huber loss ``"huber"``: the mean over
elements of ``sqrt((a - b)^2 + c^2) - c`` (c = ``huber_c``, 0.001 in LCM).

Classifier-free guidance (``LCMSettings.guidance``): every example draws ``w ~ U[w_min, w_max]``;
the teacher's prediction is guided with the *unconditional branch* of a class-conditional
teacher, i.e. the same network called with the null class ``null_label`` (by this project's
convention the teacher's last class, ``num_classes - 1``, which ``train.label_dropout`` trains),
and the student receives ``w`` through its guidance embedding (``UNetModel.guidance_embed_dim``).
``w`` follows LCM's convention: ``w = 0`` is the plain conditional model (CFG scale ``1 + w``).

Latent mode: ``encode_fn`` (applied to ``x_start`` before the loss, stop-gradiented) and
``decode_fn`` (applied to the samples) are plain functions, e.g. a frozen VAE's encoder/decoder
closed over its params; δ then lives in latent space (its shape is that of the latents).

Adversarial training: ``delta`` is added to the student's input x_t (VP scale, as in the DPM code);
with ``teacher_from_perturbed`` the teacher's DDIM step starts from the perturbed point, so the
target moves with δ (the analogue of the DPM code's ``delta_detach``). ∂loss/∂δ flows only
through the student.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax.consistency.karras import append_dims

LCM_LOSS_NORMS = ("l2", "huber")

# teacher_eps_fn(x_vp [B,H,W,C], t_model [B], y [B] or None) -> eps [B,H,W,C or 2C]
TeacherEpsFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]

__all__ = [
    "LCM_LOSS_NORMS",
    "LCMSettings",
    "ddim_timesteps",
    "lcm_denoise",
    "lcm_loss",
    "lcm_sample",
    "lcm_sample_timesteps",
    "lcm_scalings",
    "sample_lcm_inputs",
]


@dataclasses.dataclass(frozen=True)
class LCMSettings:
    """Static settings of LCM distillation (hashable).

    Attributes:
      skip: k, the DDIM skipping step over the teacher's T-step chain (LCM: 20 for T = 1000).
      sigma_data, timestep_scaling: the boundary-condition scalings (LCM: 0.5 and 10).
      loss_norm: "l2" or "huber" (LCM's elementwise pseudo-Huber).
      huber_c: c of the pseudo-Huber loss (LCM: 0.001).
      guidance: classifier-free guidance with ``w ~ U[w_min, w_max]`` fed to the student.
      w_min, w_max: range of the guidance scale ``w`` (``eps_c + w (eps_c - eps_u)``).
    """
    skip: int = 20
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    loss_norm: str = "huber"
    huber_c: float = 0.001
    guidance: bool = False
    w_min: float = 0.0
    w_max: float = 0.0

    def __post_init__(self):
        if not isinstance(self.skip, (int, np.integer)) or self.skip < 1:
            raise ValueError(f"skip must be an integer >= 1, got {self.skip!r}")
        if self.sigma_data <= 0 or self.timestep_scaling <= 0:
            raise ValueError("sigma_data and timestep_scaling must be > 0")
        if self.loss_norm not in LCM_LOSS_NORMS:
            raise ValueError(f"loss_norm must be one of {LCM_LOSS_NORMS}, got {self.loss_norm!r}")
        if self.huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}")
        if self.guidance and not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got {self.w_min}, {self.w_max}")


def ddim_timesteps(num_timesteps: int, skip: int) -> np.ndarray:
    """The DDIM timesteps ``t_n = n k - 1``, n = 1 .. T // k: int32 [N], ascending."""
    n = int(num_timesteps) // int(skip)
    if n < 1:
        raise ValueError(f"skip ({skip}) must be <= the teacher's number of timesteps "
                         f"({num_timesteps})")
    return (np.arange(1, n + 1, dtype=np.int64) * int(skip) - 1).astype(np.int32)


def lcm_scalings(t: jax.Array, *, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                 ) -> tuple[jax.Array, jax.Array]:
    """``(c_skip, c_out)`` of integer timesteps ``t`` (any shape); exactly (1, 0) at t = 0."""
    st = jnp.asarray(t, jnp.float32) * jnp.float32(timestep_scaling)
    sd2 = jnp.float32(sigma_data) ** 2
    return sd2 / (st ** 2 + sd2), st / jnp.sqrt(st ** 2 + sd2)


def _check_diffusion(diffusion: Any) -> None:
    if getattr(diffusion, "model_mean_type", "epsilon") != "epsilon":
        raise ValueError("LCM needs an epsilon-prediction chain (model_mean_type='epsilon'), got "
                         f"{diffusion.model_mean_type!r}")


def lcm_denoise(apply_fn: Callable, params: Any, x: jax.Array, t: jax.Array, *, diffusion: Any,
                settings: LCMSettings, y: jax.Array | None = None, w: jax.Array | None = None,
                rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The student's consistency function ``f(x, t)`` (see the module docstring).

    Args:
      apply_fn: ``apply_fn(params, x, t_model, y, rng)`` -> eps [B,H,W,C or 2C] (the project's
        ``ApplyFn``); with ``settings.guidance`` it is called with the extra keyword ``w=w``.
      x: [B, H, W, C] VP-scale inputs; t: [B] int chain indices (= DDPM timesteps).
      diffusion: the teacher's ``GaussianDiffusion`` (tables and ``model_timesteps``).
      y: [B] labels or None; w: [B] guidance scales (needed with ``settings.guidance``).

    Returns:
      ``(eps, f)``, both [B, H, W, C].
    """
    kwargs = {}
    if settings.guidance:
        if w is None:
            raise ValueError("settings.guidance needs the guidance scales w [B]")
        kwargs["w"] = w
    eps = apply_fn(params, x, diffusion.model_timesteps(t), y, rng, **kwargs)[..., :x.shape[-1]]
    x0 = diffusion.predict_xstart_from_eps(x, t, eps)
    c_skip, c_out = lcm_scalings(t, sigma_data=settings.sigma_data,
                                 timestep_scaling=settings.timestep_scaling)
    return eps, append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * x0


def sample_lcm_inputs(rng: jax.Array, x_start: jax.Array, *, num_ddim: int,
                      settings: LCMSettings) -> dict[str, jax.Array]:
    """Random inputs of one loss evaluation: ``indices`` [B] uniform in [0, N-1], ``noise``
    [B, H, W, C] ~ N(0, I) and, with guidance, ``w`` [B] ~ U[w_min, w_max]."""
    k_idx, k_noise, k_w = jax.random.split(rng, 3)
    b = x_start.shape[0]
    out = {"indices": jax.random.randint(k_idx, (b,), 0, num_ddim),
           "noise": jax.random.normal(k_noise, x_start.shape, jnp.float32)}
    if settings.guidance:
        out["w"] = jax.random.uniform(k_w, (b,), jnp.float32, settings.w_min, settings.w_max)
    return out


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def lcm_loss(params: Any, delta: jax.Array | None, rng: jax.Array | None, *,
             batch: Mapping[str, jax.Array], apply_fn: Callable, diffusion: Any,
             teacher_eps_fn: TeacherEpsFn, target_params: Any = None,
             settings: LCMSettings = LCMSettings(), teacher_from_perturbed: bool = True,
             null_label: int | None = None, encode_fn: Callable | None = None,
             return_intermediates: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LCM distillation loss of a minibatch, optionally with δ on the student's input.

    Same convention as ``consistency_loss``: a pure function of ``(params, delta, rng)`` that
    ``atdiff_jax.adversarial.run_adversary`` differentiates.

    Args:
      params: student parameters (differentiable).
      delta: [B, H, W, C] perturbation of the student's input x_t (latent shape in latent
        mode), or None.
      rng: dropout key of the student; the target network uses the same key. None without dropout.
      batch: ``x_start`` [B, H, W, C] (pixels, or whatever ``encode_fn`` takes), ``noise`` (shape
        of the encoded x_start) ~ N(0, I), ``indices`` [B] DDIM indices in [0, N-1], ``w`` [B]
        guidance scales (with ``settings.guidance``), optional ``y`` [B] labels and ``weights``
        [B] (batch weights; default 1). See ``sample_lcm_inputs``.
      apply_fn: the student network (see ``lcm_denoise``).
      diffusion: the teacher's ``GaussianDiffusion`` (epsilon prediction, un-respaced).
      teacher_eps_fn: ``teacher_eps_fn(x, t_model, y) -> eps`` (the teacher network with its
        params closed over; only the first C output channels are used).
      target_params: target (EMA) network params; None means ``stop_gradient(params)``.
      settings: skip, scalings, loss, guidance (see ``LCMSettings``).
      teacher_from_perturbed: the teacher's DDIM step starts from ``x_t + delta`` (True) or x_t.
      null_label: the teacher's null (unconditional) class for guidance; required with
        ``settings.guidance``.
      encode_fn: latent mode: ``x_start -> latents`` (stop-gradiented), e.g. a VAE encoder.
      return_intermediates: add ``t, s, x_t, x_s, student, target, teacher_eps, teacher_x0``.

    Returns:
      ``(mean(weights * loss), aux)`` with ``aux["loss"]`` [B] and ``aux["t"]`` [B] (the
      student's timesteps).
    """
    _check_diffusion(diffusion)
    x_start = batch["x_start"]
    if encode_fn is not None:
        x_start = jax.lax.stop_gradient(encode_fn(x_start))
    noise, indices = batch["noise"], batch["indices"]
    if noise.shape != x_start.shape:
        raise ValueError(f"noise {noise.shape} must have the shape of the (encoded) x_start "
                         f"{x_start.shape}")
    if indices.shape != (x_start.shape[0],):
        raise ValueError(f"indices must have shape [B]=({x_start.shape[0]},), got {indices.shape}")
    if delta is not None and delta.shape != x_start.shape:
        raise ValueError(f"delta {delta.shape} must have the shape of the (encoded) x_start "
                         f"{x_start.shape}")
    y, w = batch.get("y"), batch.get("w")
    if settings.guidance:
        if w is None:
            raise ValueError("settings.guidance needs batch['w'] (see sample_lcm_inputs)")
        if null_label is None or y is None:
            raise ValueError("classifier-free guidance needs a class-conditional teacher: pass "
                             "batch['y'] and null_label (the teacher's unconditional class)")
    k = settings.skip
    table = jnp.asarray(ddim_timesteps(diffusion.num_timesteps, k))
    t = table[indices]
    s = jnp.maximum(t - k, 0)

    x_t = diffusion.q_sample(x_start, t, noise)
    x_student = x_t if delta is None else x_t + delta
    _, student = lcm_denoise(apply_fn, params, x_student, t, diffusion=diffusion,
                             settings=settings, y=y, w=w, rng=rng)

    x_sol = jax.lax.stop_gradient(x_student if teacher_from_perturbed else x_t)
    t_model = diffusion.model_timesteps(t)
    c = x_sol.shape[-1]
    eps = teacher_eps_fn(x_sol, t_model, y)[..., :c]
    if settings.guidance:
        eps_u = teacher_eps_fn(x_sol, t_model, jnp.full_like(y, null_label))[..., :c]
        eps = eps + append_dims(w, eps.ndim) * (eps - eps_u)
    eps = jax.lax.stop_gradient(eps)
    x0 = diffusion.predict_xstart_from_eps(x_sol, t, eps)
    ab_s = jnp.asarray(diffusion.tables["alphas_cumprod"])[s]
    x_s = jax.lax.stop_gradient(append_dims(jnp.sqrt(ab_s), x0.ndim) * x0
                                + append_dims(jnp.sqrt(1.0 - ab_s), x0.ndim) * eps)

    tp = jax.lax.stop_gradient(params if target_params is None else target_params)
    _, target = lcm_denoise(apply_fn, tp, x_s, s, diffusion=diffusion, settings=settings, y=y,
                            w=w, rng=rng)
    target = jax.lax.stop_gradient(target)

    if settings.loss_norm == "l2":
        loss = _mean_flat((student - target) ** 2)
    else:
        c2 = jnp.float32(settings.huber_c)
        loss = _mean_flat(jnp.sqrt((student - target) ** 2 + c2 ** 2) - c2)
    batch_weights = batch.get("weights")
    total = jnp.mean(loss if batch_weights is None else loss * batch_weights)
    aux = {"loss": loss, "t": t}
    if return_intermediates:
        aux.update(s=s, x_t=x_t, x_s=x_s, student=student, target=target, teacher_eps=eps,
                   teacher_x0=x0)
    return total, aux


def lcm_sample_timesteps(num_timesteps: int, skip: int, steps: int) -> np.ndarray:
    """The ``steps`` timesteps of LCM multistep sampling, descending (diffusers' ``LCMScheduler``):
    every ``N // steps``-th DDIM timestep counted down from the top one, int32 [steps]."""
    origin = ddim_timesteps(num_timesteps, skip)
    if not 1 <= int(steps) <= len(origin):
        raise ValueError(f"steps must be in [1, {len(origin)}] (the DDIM timesteps of a "
                         f"{num_timesteps}-step chain with skip {skip}), got {steps}")
    stride = len(origin) // int(steps)
    return origin[::-1][::stride][:int(steps)].astype(np.int32)


def lcm_sample(apply_fn: Callable, params: Any, noise: jax.Array, *, diffusion: Any,
               settings: LCMSettings, steps: int, y: jax.Array | None = None,
               w: jax.Array | float | None = None, rng: jax.Array | None = None,
               decode_fn: Callable | None = None, clip: bool = True) -> jax.Array:
    """LCM one-step (``steps=1``) or multistep sampling from ``noise`` ~ N(0, I) [B, H, W, C].

    For the timesteps ``tau_1 > ... > tau_S`` of :func:`lcm_sample_timesteps`: ``x0 = f(x,
    tau_i)``; unless last, ``x = sqrt(abar) x0 + sqrt(1 - abar) z_i`` at ``tau_{i+1}``, with
    ``z_i`` from ``fold_in(rng, i)``. Returns ``decode_fn(x0)`` (latent mode) clipped to [-1, 1]
    (``clip``). ``w`` is a scalar or [B] guidance scale (with ``settings.guidance``).
    """
    _check_diffusion(diffusion)
    ts = lcm_sample_timesteps(diffusion.num_timesteps, settings.skip, steps)
    if len(ts) > 1 and rng is None:
        raise ValueError("multistep LCM sampling re-noises between steps: pass rng")
    b = noise.shape[0]
    if settings.guidance:
        if w is None:
            raise ValueError("a guided LCM student needs the guidance scale w")
        w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
    else:
        w = None
    ab = jnp.asarray(diffusion.tables["alphas_cumprod"])
    x = noise
    x0 = None
    for i, tau in enumerate(ts):
        t = jnp.full((b,), int(tau), jnp.int32)
        _, x0 = lcm_denoise(apply_fn, params, x, t, diffusion=diffusion, settings=settings, y=y,
                            w=w, rng=None)
        if i + 1 < len(ts):
            a = ab[int(ts[i + 1])]
            z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            x = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * z
    out = x0 if decode_fn is None else decode_fn(x0)
    return jnp.clip(out, -1.0, 1.0) if clip else out
