"""Converters: guided-diffusion / AT_Diff PyTorch checkpoints -> Flax params."""
from atdiff_jax.convert.guided_diffusion import (
    CheckpointIntegrityError,
    StateDictMismatchError,
    create_model,
    diffusion_from_args,
    load_torch_state_dict,
    params_from_state_dict,
    state_dict_from_params,
    unet_from_checkpoint,
    unet_from_state_dict,
)

__all__ = [
    "CheckpointIntegrityError",
    "StateDictMismatchError",
    "create_model",
    "diffusion_from_args",
    "load_torch_state_dict",
    "params_from_state_dict",
    "state_dict_from_params",
    "unet_from_checkpoint",
    "unet_from_state_dict",
]
