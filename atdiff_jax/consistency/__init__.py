"""Consistency models (Song et al. 2023) on the Karras/EDM parameterisation, in pure JAX.

* ``karras``: noise levels, EDM and boundary-condition scalings, ``denoise``, ``KarrasDenoiser``,
  and ``vp_denoiser`` (a VP epsilon model as an EDM denoiser / CD teacher).
* ``losses``: consistency distillation and consistency training losses with an adversarial δ on
  the student's input (``consistency_loss(params, delta, rng, *, batch, ...)``).
* ``schedule``: ``create_ema_and_scales_fn`` (target EMA rate and N per training step).
* ``samplers``: one-step, multistep and EDM Heun sampling (``karras_sample``).
* ``checkpoint``: openai/consistency_models UNet state dicts -> this project's UNet params.

Everything reproduces the official PyTorch code (``tests/testdata/cm_reference``).
"""
from atdiff_jax.consistency.checkpoint import (
    cm_create_model_kwargs,
    cm_to_guided_state_dict,
)
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
    "boundary_scalings",
    "cm_create_model_kwargs",
    "cm_to_guided_state_dict",
    "consistency_distillation_loss",
    "consistency_loss",
    "consistency_sigma_pair",
    "consistency_sigmas",
    "consistency_training_loss",
    "create_ema_and_scales_fn",
    "denoise",
    "edm_scalings",
    "karras_sample",
    "karras_sigmas",
    "rescale_sigma",
    "sample_heun",
    "sample_indices_and_noise",
    "sample_multistep",
    "sample_onestep",
    "vp_denoiser",
]
