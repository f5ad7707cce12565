"""openai/consistency_models UNet checkpoints -> this project's ``UNetModel``.

``cm.unet.UNetModel`` is guided-diffusion's UNet with two differences that matter for conversion:

* its ``AttentionBlock`` uses 1x1 **Conv2d** ``qkv`` / ``proj_out`` layers (weights
  ``[O, I, 1, 1]``) where guided-diffusion has Conv1d (``[O, I, 1]``); the maths is the same;
* its default attention (``QKVFlashAttention``, and the fp32 fallback ``QKVAttention``) splits the
  qkv channels as (3, heads, head_dim) *whatever* ``use_new_attention_order`` says, i.e. it is
  guided-diffusion's ``QKVAttention`` ("new order"). Build the model with
  ``use_new_attention_order=True`` (``cm_create_model_kwargs`` does).

Parameter names are otherwise identical, so::

    module = create_model(**cm_create_model_kwargs(args))
    params = params_from_state_dict(cm_to_guided_state_dict(state_dict), module)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from atdiff_jax.models.adm import NUM_CLASSES, model_kwargs_from_args

__all__ = ["cm_create_model_kwargs", "cm_to_guided_state_dict"]

_CONV1X1 = ("qkv", "proj_out")


def cm_to_guided_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A consistency_models UNet state dict in guided-diffusion layout (1x1 Conv2d -> Conv1d)."""
    out = {}
    for k, v in state_dict.items():
        a = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v)
        parts = k.split(".")
        if (len(parts) >= 2 and parts[-2] in _CONV1X1 and parts[-1] == "weight" and a.ndim == 4):
            if a.shape[2:] != (1, 1):
                raise ValueError(f"{k}: expected a 1x1 convolution, got shape {a.shape}")
            a = a[:, :, :, 0]
        out[k] = a
    return out


def cm_create_model_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """``create_model`` keyword arguments for a consistency_models model from its script args
    (``image_size``, ``num_channels``, ...): the guided-diffusion ones, with
    ``use_new_attention_order=True`` (see the module docstring), and for ``class_cond=True``
    ``num_classes=1000``: consistency_models' ``cm/script_util.py`` always uses
    ``NUM_CLASSES = 1000``, where the AT_Diff rule of ``create_model`` would give 10 at 32 px."""
    kwargs = model_kwargs_from_args(dict(args))
    kwargs["use_new_attention_order"] = True
    if kwargs.get("class_cond") and kwargs.get("num_classes") is None:
        kwargs["num_classes"] = NUM_CLASSES
    return kwargs
