"""Converters: guided-diffusion / AT_Diff and openai/consistency_models PyTorch checkpoints ->
Flax params (the networks themselves are built by ``atdiff_jax.models.adm.create_model``)."""
from atdiff_jax.convert.consistency_models import cm_create_model_kwargs, cm_to_guided_state_dict
from atdiff_jax.convert.guided_diffusion import (
    CheckpointIntegrityError,
    StateDictMismatchError,
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
    "cm_create_model_kwargs",
    "cm_to_guided_state_dict",
    "diffusion_from_args",
    "load_torch_state_dict",
    "params_from_state_dict",
    "state_dict_from_params",
    "unet_from_checkpoint",
    "unet_from_state_dict",
]
