"""Networks: the ADM UNet of guided-diffusion (Flax Linen, NHWC) and its ``create_model``."""
from atdiff_jax.models.adm import create_model
from atdiff_jax.models.unet import UNetModel, timestep_embedding

__all__ = ["UNetModel", "create_model", "timestep_embedding"]
