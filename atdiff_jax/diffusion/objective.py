"""The denoising objective as a pure loss function of (params, batch, rng), ready for jax.grad.

``denoising_loss`` is what a notebook jits and differentiates, and what the trainer hands to the
adversarial drivers: ``functools.partial(denoising_loss, batch=..., ...)`` with ``delta`` as the
second differentiable argument.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from atdiff_jax.diffusion.gaussian import GaussianDiffusion

# apply_fn(params, x [B,H,W,C], t [B], y [B] or None, rng or None) -> output [B,H,W,C or 2C]
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None, jax.Array | None], jax.Array]


def denoising_loss(params: Any, delta: jax.Array | None, rng: jax.Array | None, *,
                   batch: Mapping[str, jax.Array], apply_fn: ApplyFn,
                   diffusion: GaussianDiffusion, target_type: str = "delta_detach",
                   input_perturb: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Importance-weighted mean diffusion loss of a minibatch, with the network input shifted by δ.

    Args:
      params: network parameters (differentiable).
      delta: perturbation of x_t, [B, H, W, C] (differentiable), or None for clean training.
      rng: key for the network's stochastic layers (dropout), or None.
      batch: ``x_start`` [B,H,W,C] in [-1, 1], ``t`` [B] int, ``noise`` [B,H,W,C], optional
        ``weights`` [B] (importance weights; default 1), ``y`` [B] labels, ``ip_noise``
        [B,H,W,C] (needed when ``input_perturb > 0``).
      apply_fn: the network, see ``ApplyFn``.
      diffusion: the training chain.
      target_type, input_perturb: see ``GaussianDiffusion.training_losses``.
    Returns:
      ``(mean(weights * loss), terms)`` where ``terms`` holds the per-example [B] ``loss`` (and
      ``mse``/``vb`` when the loss type has them).
    """
    y = batch.get("y")

    def model_fn(x, t):
        return apply_fn(params, x, t, y, rng)

    terms = diffusion.training_losses(model_fn, batch["x_start"], batch["t"], batch["noise"],
                                      delta=delta, target_type=target_type,
                                      input_perturb=input_perturb, ip_noise=batch.get("ip_noise"))
    weights = batch.get("weights")
    loss = terms["loss"] if weights is None else terms["loss"] * weights
    return jnp.mean(loss), terms
