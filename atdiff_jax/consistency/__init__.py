"""Consistency models (Song et al. 2023) on the Karras/EDM parameterisation, in pure JAX.

* ``karras``: noise levels, EDM and boundary-condition scalings, ``denoise``, ``KarrasDenoiser``,
  and ``vp_denoiser`` (a VP epsilon model as an EDM denoiser / CD teacher).
* ``losses``: consistency distillation and consistency training losses with an adversarial δ on
  the student's input (``consistency_loss(params, delta, rng, *, batch, ...)``).
* ``schedule``: ``create_ema_and_scales_fn`` (target EMA rate and N per training step).
* ``samplers``: one-step, multistep and EDM Heun sampling (``karras_sample``).
* ``lcm``: latent-consistency-style distillation from a VP epsilon teacher (DDIM skipping-step
  solver, LCM boundary scalings, classifier-free guidance, Huber loss, optional latent mode):
  ``lcm_loss(params, delta, rng, *, batch, ...)`` and ``lcm_sample``.

openai/consistency_models UNet state dicts are converted to this project's UNet params by
``atdiff_jax.convert.consistency_models``.

The Karras/EDM parts reproduce the official PyTorch code (``tests/testdata/cm_reference``); the
LCM part follows diffusers' ``train_lcm_distill_sd_wds.py`` (tested by its exact properties).
"""
from atdiff_jax.consistency.karras import (
    KarrasDenoiser,
    boundary_scalings,
    consistency_sigma_pair,
    consistency_sigmas,
    denoise,
    edm_scalings,
    karras_sigmas,
    rescale_sigma,
    vp_denoiser,
)
from atdiff_jax.consistency.lcm import (
    LCMSettings,
    ddim_timesteps,
    lcm_denoise,
    lcm_loss,
    lcm_sample,
    lcm_sample_timesteps,
    lcm_scalings,
    sample_lcm_inputs,
)
from atdiff_jax.consistency.losses import (
    LOSS_NORMS,
    consistency_distillation_loss,
    consistency_loss,
    consistency_training_loss,
    sample_indices_and_noise,
)
from atdiff_jax.consistency.samplers import (
    karras_sample,
    sample_heun,
    sample_multistep,
    sample_onestep,
)
from atdiff_jax.consistency.schedule import create_ema_and_scales_fn

__all__ = [
    "LOSS_NORMS",
    "KarrasDenoiser",
    "LCMSettings",
    "boundary_scalings",
    "consistency_distillation_loss",
    "consistency_loss",
    "consistency_sigma_pair",
    "consistency_sigmas",
    "consistency_training_loss",
    "create_ema_and_scales_fn",
    "ddim_timesteps",
    "denoise",
    "edm_scalings",
    "karras_sample",
    "karras_sigmas",
    "lcm_denoise",
    "lcm_loss",
    "lcm_sample",
    "lcm_sample_timesteps",
    "lcm_scalings",
    "rescale_sigma",
    "sample_heun",
    "sample_indices_and_noise",
    "sample_lcm_inputs",
    "sample_multistep",
    "sample_onestep",
    "vp_denoiser",
]
