"""Networks: the ADM UNet of guided-diffusion (Flax Linen, NHWC)."""
from atdiff_jax.models.unet import UNetModel, timestep_embedding

__all__ = ["UNetModel", "timestep_embedding"]
