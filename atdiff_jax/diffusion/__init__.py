"""Gaussian diffusion: schedules, forward/reverse process, losses, timestep samplers, samplers."""
from atdiff_jax.diffusion.dpm_solver import dpm_solver_sample
from atdiff_jax.diffusion.gaussian import GaussianDiffusion, create_gaussian_diffusion
from atdiff_jax.diffusion.objective import denoising_loss
from atdiff_jax.diffusion.schedules import get_named_beta_schedule, space_timesteps
from atdiff_jax.diffusion.timestep_sampler import LossHistory, TimestepSampler

__all__ = ["GaussianDiffusion", "create_gaussian_diffusion", "denoising_loss",
           "dpm_solver_sample", "get_named_beta_schedule", "space_timesteps", "TimestepSampler",
           "LossHistory"]
