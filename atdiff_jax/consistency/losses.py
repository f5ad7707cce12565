"""Consistency distillation (CD) and consistency training (CT) losses (Song et al. 2023).

``consistency_loss`` reproduces openai/consistency_models' ``KarrasDenoiser.consistency_losses``
as a pure function of ``(params, delta, rng)`` -- the signature the adversarial drivers
(``atdiff_jax.adversarial.run_adversary``) differentiate -- with everything random passed in the
batch (``indices``, ``noise``) so results are reproducible and independent of the device count::

    t, t2     = t_n, t_{n+1}       Karras points of an N-point discretisation (n = indices)
    x_t       = x_start + noise * t
    distiller = f_theta(x_t + delta, t)                    (online network, consistency scalings)
    x_t2      = stop_grad(solver(x_s, t -> t2))            one ODE step, x_s = x_t + delta or x_t
    target    = stop_grad(f_theta-(x_t2, t2))              (target network, same dropout key)
    loss_i    = weight(t) * d(distiller, target)

The ODE step is Heun (the reference's CD) or Euler with the teacher denoiser ``D(x, sigma)``; with
no teacher (CT) the denoiser is ``x_start`` itself (the one-sample estimate of the score).

Adversarial training, this project's reading of the paper's CM algorithm (docs/method.md,
"Consistency models" and "AT for consistency models"): ``delta`` [B, H, W, C] is added to the
student's input ``x_t``. ``teacher_from_perturbed`` chooses the ODE step's starting point: ``x_t +
delta`` (the target moves with δ, the analogue of the DPM code's ``delta_detach``; default) or the
clean ``x_t`` (the target ignores δ). Either way the solver output is stop-gradiented, so ∂loss/∂δ
flows only through the student's input. With ``delta=None`` (or zeros) both choices are the clean
loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from atdiff_jax.consistency.karras import (
    ApplyFn,
    DenoiseFn,
    KarrasDenoiser,
    append_dims,
    consistency_sigma_pair,
)

LOSS_NORMS = ("l2", "l1", "l2-32", "pseudo_huber")
SOLVERS = ("heun", "euler")
# The reference's consistency-model settings (sigma_data 0.5, sigma 0.002..80, rho 7, uniform).
DEFAULT_DENOISER = KarrasDenoiser()

__all__ = [
    "LOSS_NORMS",
    "SOLVERS",
    "consistency_distillation_loss",
    "consistency_loss",
    "consistency_training_loss",
    "euler_step",
    "heun_step",
    "sample_indices_and_noise",
    "torch_bilinear_resize",
]


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------
# one ODE step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma


def euler_step(denoise_fn: DenoiseFn | None, x: jax.Array, t: jax.Array, next_t: jax.Array, *,
               x0: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Euler step from ``t`` to ``next_t`` ([B] each); ``x0`` replaces the denoiser when given.

    Returns ``(x_next, {"teacher_denoised_t": D(x, t)})`` (the dict is empty when ``x0`` is used).
    """
    n = x.ndim
    denoised = x0 if x0 is not None else denoise_fn(x, t)
    d = (x - denoised) / append_dims(t, n)
    x_next = x + d * append_dims(next_t - t, n)
    return x_next, ({} if x0 is not None else {"teacher_denoised_t": denoised})


def heun_step(denoise_fn: DenoiseFn | None, x: jax.Array, t: jax.Array, next_t: jax.Array, *,
              x0: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Heun step from ``t`` to ``next_t`` ([B] each), the reference's ``heun_solver``.

    Returns ``(x_next, parts)`` with ``parts`` = ``teacher_denoised_t``, ``x_t2_euler_predictor``
    and ``teacher_denoised_t2`` (only the predictor when ``x0`` replaces the denoiser).
    """
    n = x.ndim
    denoised = x0 if x0 is not None else denoise_fn(x, t)
    d = (x - denoised) / append_dims(t, n)
    samples = x + d * append_dims(next_t - t, n)
    denoised_2 = x0 if x0 is not None else denoise_fn(samples, next_t)
    next_d = (samples - denoised_2) / append_dims(next_t, n)
    x_next = x + (d + next_d) * append_dims((next_t - t) / 2, n)
    parts = {"x_t2_euler_predictor": samples}
    if x0 is None:
        parts.update(teacher_denoised_t=denoised, teacher_denoised_t2=denoised_2)
    return x_next, parts


# ----------------------------------------------------------------------------------------------
# distances


def _resize_axis_weights(n_in: int, n_out: int):
    """Source indices and weights of torch's bilinear resize (align_corners=False) on one axis."""
    scale = jnp.float32(n_in / n_out)
    src = scale * (jnp.arange(n_out, dtype=jnp.float32) + 0.5) - 0.5
    src = jnp.maximum(src, 0.0)
    i0 = jnp.floor(src).astype(jnp.int32)
    i0 = jnp.minimum(i0, n_in - 1)
    i1 = jnp.minimum(i0 + 1, n_in - 1)
    lam1 = src - i0.astype(jnp.float32)
    return i0, i1, 1.0 - lam1, lam1


def torch_bilinear_resize(x: jax.Array, size: int) -> jax.Array:
    """``F.interpolate(x, size=size, mode='bilinear', align_corners=False)`` (no antialiasing) on
    NHWC images [B, H, W, C] -> [B, size, size, C]."""
    _, h, w, _ = x.shape
    i0, i1, l0, l1 = _resize_axis_weights(h, size)
    x = (l0[None, :, None, None] * x[:, i0] + l1[None, :, None, None] * x[:, i1])
    j0, j1, m0, m1 = _resize_axis_weights(w, size)
    return m0[None, None, :, None] * x[:, :, j0] + m1[None, None, :, None] * x[:, :, j1]


def _distance(a: jax.Array, b: jax.Array, loss_norm: str, huber_c: float | None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example distance [B] (before the weights) and any resized images."""
    if loss_norm == "l2":
        return _mean_flat((a - b) ** 2), {}
    if loss_norm == "l1":
        return _mean_flat(jnp.abs(a - b)), {}
    if loss_norm == "l2-32":
        a32, b32 = torch_bilinear_resize(a, 32), torch_bilinear_resize(b, 32)
        return _mean_flat((a32 - b32) ** 2), {"distiller_32": a32, "distiller_target_32": b32}
    if loss_norm == "pseudo_huber":
        dim = a[0].size
        c = 0.00054 * dim ** 0.5 if huber_c is None else huber_c
        sq = jnp.sum((a - b) ** 2, axis=tuple(range(1, a.ndim)))
        return jnp.sqrt(sq + c ** 2) - c, {}
    _check_loss_norm(loss_norm)
    raise AssertionError(loss_norm)  # pragma: no cover


def _check_loss_norm(loss_norm: str) -> None:
    if loss_norm == "lpips":
        raise NotImplementedError(
            "loss_norm='lpips' is not supported: it needs the pretrained VGG LPIPS weights, which "
            f"this project does not ship; use one of {LOSS_NORMS}")
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")


# ----------------------------------------------------------------------------------------------
# the loss


def sample_indices_and_noise(rng: jax.Array, x_start: jax.Array, num_scales: int | jax.Array
                             ) -> dict[str, jax.Array]:
    """The random inputs of one loss evaluation: ``indices`` [B] int32 uniform in [0, N-2] (the
    reference's ``randint(0, N - 1)``) and ``noise`` [B, H, W, C] standard normal."""
    k_idx, k_noise = jax.random.split(rng)
    indices = jax.random.randint(k_idx, (x_start.shape[0],), 0, jnp.asarray(num_scales) - 1)
    noise = jax.random.normal(k_noise, x_start.shape, jnp.float32)
    return {"indices": indices, "noise": noise}


def consistency_loss(params: Any, delta: jax.Array | None, rng: jax.Array | None, *,
                     batch: Mapping[str, jax.Array], apply_fn: ApplyFn,
                     num_scales: int | jax.Array, target_params: Any = None,
                     teacher_denoise_fn: DenoiseFn | None = None,
                     denoiser: KarrasDenoiser = DEFAULT_DENOISER, loss_norm: str = "l2",
                     solver: str | None = None, teacher_from_perturbed: bool = True,
                     huber_c: float | None = None, return_intermediates: bool = False
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Consistency distillation / training loss of a minibatch, optionally with δ on x_t.

    Args:
      params: online (student) network parameters (differentiable).
      delta: [B, H, W, C] perturbation of the student's input x_t (differentiable), or None.
      rng: dropout key of the online network; the target network uses the same key (the
        reference restores the dropout RNG state before the target call). None without dropout.
      batch: ``x_start`` [B, H, W, C] (data in [-1, 1]), ``noise`` [B, H, W, C] ~ N(0, I),
        ``indices`` [B] ints in [0, N-2] (see ``sample_indices_and_noise``); optional ``y`` [B]
        labels and ``weights`` [B] (importance weights of the batch mean; default 1).
      apply_fn: the consistency network, see ``ApplyFn`` (online and target share it).
      num_scales: N, the number of discretisation points (a Python int uses the bit-exact host
        table of noise levels; a traced int avoids recompiling when N changes during training).
      target_params: target (EMA) network parameters; None means ``stop_gradient(params)``
        (improved CT, target EMA rate 0).
      teacher_denoise_fn: ``D(x, sigma)`` of the teacher for CD (e.g.
        ``KarrasDenoiser(distillation=False).denoise_fn(apply, teacher_params)`` or
        ``vp_denoiser(...)``); None for CT (the solver uses ``x_start`` as the denoiser).
      denoiser: sigma_data, sigma_min, sigma_max, rho and weight_schedule (its ``distillation``
        field is ignored: online and target always use the consistency-model scalings).
      loss_norm: "l2" (mean squared error), "l1" (mean absolute error), "l2-32" (l2 after a
        bilinear resize to 32x32, as the reference), "pseudo_huber" (improved CT:
        ``sqrt(||a - b||^2 + c^2) - c`` with ``c = huber_c`` or ``0.00054 * sqrt(H*W*C)``).
        "lpips" raises NotImplementedError (needs pretrained weights).
      solver: "heun" or "euler"; default (None) as the reference: Heun with a teacher, Euler
        without (for CT both are the same step, analytically).
      teacher_from_perturbed: the ODE step starts from ``x_t + delta`` (True) or ``x_t`` (False).
      return_intermediates: add every intermediate array to ``aux`` (for tests and debugging;
        keep False in training, where ``aux`` is stacked over the adversarial inner steps).

    Returns:
      ``(mean(weights * loss), aux)``; ``aux["loss"]`` is the per-example loss [B] (weighted by
      the weight schedule, not by the batch weights) and ``aux["t"]`` the noise levels [B]. With
      ``return_intermediates`` also ``t2, x_t, x_t2, distiller, distiller_model_output,
      distiller_target, target_model_output, weights`` and the solver's parts
      (``teacher_denoised_t``, ``x_t2_euler_predictor``, ``teacher_denoised_t2``; ``distiller_32``
      and ``distiller_target_32`` for l2-32), named as in the reference.
    """
    _check_loss_norm(loss_norm)
    if solver is None:
        solver = "euler" if teacher_denoise_fn is None else "heun"
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    x_start, noise, indices = batch["x_start"], batch["noise"], batch["indices"]
    if noise.shape != x_start.shape:
        raise ValueError(f"noise {noise.shape} must have the shape of x_start {x_start.shape}")
    if indices.shape != (x_start.shape[0],):
        raise ValueError(f"indices must have shape [B]=({x_start.shape[0]},), got {indices.shape}")
    if delta is not None and delta.shape != x_start.shape:
        raise ValueError(f"delta {delta.shape} must have the shape of x_start {x_start.shape}")
    y = batch.get("y")
    dims = x_start.ndim
    cm = KarrasDenoiser(sigma_data=denoiser.sigma_data, sigma_min=denoiser.sigma_min,
                        sigma_max=denoiser.sigma_max, rho=denoiser.rho, distillation=True,
                        weight_schedule=denoiser.weight_schedule)

    t, t2 = consistency_sigma_pair(indices, num_scales, sigma_min=cm.sigma_min,
                                   sigma_max=cm.sigma_max, rho=cm.rho)
    x_t = x_start + noise * append_dims(t, dims)
    x_student = x_t if delta is None else x_t + delta
    distiller_model_output, distiller = cm.denoise(apply_fn, params, x_student, t, y=y, rng=rng)

    x_solver = x_student if teacher_from_perturbed else x_t
    x_solver = jax.lax.stop_gradient(x_solver)
    step = heun_step if solver == "heun" else euler_step
    x0 = jax.lax.stop_gradient(x_start) if teacher_denoise_fn is None else None
    x_t2, parts = step(teacher_denoise_fn, x_solver, t, t2, x0=x0)
    x_t2 = jax.lax.stop_gradient(x_t2)

    tp = jax.lax.stop_gradient(params if target_params is None else target_params)
    target_model_output, distiller_target = cm.denoise(apply_fn, tp, x_t2, t2, y=y, rng=rng)
    distiller_target = jax.lax.stop_gradient(distiller_target)

    weights = cm.weights(t)
    dist, resized = _distance(distiller, distiller_target, loss_norm, huber_c)
    loss = dist * weights
    batch_weights = batch.get("weights")
    total = jnp.mean(loss if batch_weights is None else loss * batch_weights)
    aux = {"loss": loss, "t": t}
    if return_intermediates:
        aux.update(t2=t2, x_t=x_t, x_t2=x_t2, distiller=distiller,
                   distiller_model_output=distiller_model_output,
                   distiller_target=distiller_target,
                   target_model_output=jax.lax.stop_gradient(target_model_output),
                   weights=weights, **jax.lax.stop_gradient(parts), **resized)
    return total, aux


def consistency_distillation_loss(params: Any, delta: jax.Array | None, rng: jax.Array | None, *,
                                  teacher_denoise_fn: DenoiseFn, solver: str = "heun",
                                  **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CD: :func:`consistency_loss` with a teacher denoiser (Heun by default, as the reference)."""
    if teacher_denoise_fn is None:
        raise ValueError("consistency distillation needs teacher_denoise_fn")
    return consistency_loss(params, delta, rng, teacher_denoise_fn=teacher_denoise_fn,
                            solver=solver, **kwargs)


def consistency_training_loss(params: Any, delta: jax.Array | None, rng: jax.Array | None,
                              **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CT: :func:`consistency_loss` without a teacher (Euler step with ``x_start`` as denoiser)."""
    if kwargs.get("teacher_denoise_fn") is not None:
        raise ValueError("consistency training takes no teacher; use "
                         "consistency_distillation_loss")
    return consistency_loss(params, delta, rng, **kwargs)
