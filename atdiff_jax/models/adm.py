"""The ADM UNet (guided-diffusion's ``script_util.create_model``) with its argument conventions.

``create_model(**kwargs)`` takes exactly ``guided_diffusion.script_util.create_model``'s keyword
arguments (same string formats and defaults, plus keyword-only ``in_channels``, ``num_classes``,
``dtype`` and ``norm_groups``) and returns the equivalent ``UNetModel`` (``models/unet.py``).
``model_kwargs_from_args`` picks those arguments out of a full script argument dict;
``default_num_classes`` is the AT_Diff fork's class count of a class-conditional model. The
checkpoint converters (``atdiff_jax.convert``) and the trainer (``train/build.py``) build their
networks here.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax.numpy as jnp

from atdiff_jax.models.unet import NUM_GROUPS, UNetModel

__all__ = ["CIFAR10_NUM_CLASSES", "DEFAULT_CHANNEL_MULT", "FP16_DTYPE", "NUM_CLASSES",
           "check_create_model_kwargs", "create_model", "default_num_classes",
           "model_kwargs_from_args"]

# Class count of a class_cond=True model when num_classes is not given. The AT_Diff fork's
# script_util.create_model picks it by image size:
#     num_classes = CIFAR10_NUM_CLASSES if image_size == 32 else IMAGENET_NUM_CLASSES
# (10 and 1000), where openai/guided-diffusion always uses NUM_CLASSES = 1000. Source:
# guided_diffusion/script_util.py of nstromberg/imbalanced-dro-diffusion, commit
# 534df03015c3b08b6386c7f72b1bf63fcabe90fa (a public fork of the authors' AT_Diff repository, whose
# own copy we could not read); tests/testdata/adm_reference/manifest.json
# (derived.num_classes_rule) records the same rule from the authors' code at commit 2178b51.
NUM_CLASSES = 1000  # guided-diffusion's NUM_CLASSES (ImageNet); AT_Diff: IMAGENET_NUM_CLASSES
CIFAR10_NUM_CLASSES = 10  # AT_Diff's script_util.CIFAR10_NUM_CLASSES, used at image_size 32

# channel_mult="" defaults by image size: guided-diffusion's create_model, plus the AT_Diff fork's
# CIFAR-10 entry (32 -> (1, 2, 2, 2)).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}

# The compute dtype that use_fp16=True selects. bfloat16 has float32's exponent range, so it needs
# no loss scaling and is the native 16-bit type of TPUs (and fast on recent GPUs).
FP16_DTYPE = jnp.bfloat16


def default_num_classes(image_size: int) -> int:
    """The authors' class count of a class-conditional model: 10 (CIFAR-10) at 32 px, else 1000."""
    return CIFAR10_NUM_CLASSES if image_size == 32 else NUM_CLASSES


def _parse_channel_mult(channel_mult, image_size: int) -> tuple:
    if isinstance(channel_mult, str):
        if channel_mult == "":
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(f"unsupported image size: {image_size} (no default channel_mult; "
                                 f"known sizes {sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult, "
                                 "e.g. '1,2,2,2'")
            return DEFAULT_CHANNEL_MULT[image_size]
        try:
            return tuple(int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"channel_mult must be '' or comma-separated ints such as '1,2,2,2', "
                             f"got {channel_mult!r}") from None
    return tuple(channel_mult)


def _parse_attention_resolutions(attention_resolutions, image_size: int) -> tuple[int, ...]:
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ValueError("attention_resolutions must be comma-separated resolutions such as "
                             f"'16,8', got {attention_resolutions!r}") from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    for r in resolutions:
        if r < 1 or image_size % r:
            raise ValueError(f"attention resolution {r} does not divide image_size {image_size}")
    return tuple(image_size // r for r in resolutions)


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | tuple = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions: str | tuple = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    *,
    in_channels: int = 3,
    num_classes: int | None = None,
    dtype: Any = None,
    norm_groups: int = NUM_GROUPS,
) -> UNetModel:
    """The ``UNetModel`` that guided-diffusion's ``script_util.create_model`` builds.

    Arguments and defaults are those of the reference. ``channel_mult=""`` picks the default for
    the image size (512, 256, 128, 64 as guided-diffusion; 32 -> (1,2,2,2) as the AT_Diff fork);
    otherwise "1,2,2,2" (a tuple is accepted too). ``attention_resolutions`` "16,8" are
    resolutions, turned into downsample factors ``image_size // res`` ("" means no attention
    outside the middle block). ``learn_sigma`` doubles the output channels; ``class_cond`` makes
    the model class-conditional with, as the AT_Diff fork's ``create_model``, 10 classes
    (``CIFAR10_NUM_CLASSES``) when ``image_size == 32`` and 1000 (``NUM_CLASSES``) otherwise
    (``default_num_classes``; upstream guided-diffusion always uses 1000).

    Keyword-only extensions: ``in_channels`` (default 3; outputs have ``in_channels`` or
    ``2 * in_channels`` channels); ``num_classes`` overrides that class count (needs
    ``class_cond=True``; ``unet_from_state_dict`` takes it from the state dict);
    ``dtype`` sets the compute dtype. ``use_fp16=True`` selects bfloat16 (``FP16_DTYPE``) unless
    ``dtype`` is given. ``use_checkpoint`` rematerialises blocks (memory only, same values).
    ``norm_groups`` is the GroupNorm group count (32 in every guided-diffusion checkpoint; see
    ``UNetModel`` for why narrow models need fewer).
    """
    channel_mult = _parse_channel_mult(channel_mult, image_size)
    attention_ds = _parse_attention_resolutions(attention_resolutions, image_size)
    if num_classes is not None and not class_cond:
        raise ValueError("num_classes is only used with class_cond=True")
    if dtype is None:
        dtype = FP16_DTYPE if use_fp16 else jnp.float32
    return UNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=float(dropout),
        channel_mult=channel_mult,
        num_classes=((default_num_classes(image_size) if num_classes is None else num_classes)
                     if class_cond else None),
        use_checkpoint=bool(use_checkpoint),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=bool(use_scale_shift_norm),
        resblock_updown=bool(resblock_updown),
        use_new_attention_order=bool(use_new_attention_order),
        dtype=dtype,
        norm_groups=norm_groups,
    )


_CREATE_MODEL_ARGS = tuple(inspect.signature(create_model).parameters)


def check_create_model_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Raises TypeError naming the keyword arguments ``create_model`` does not take."""
    unknown = sorted(set(kwargs) - set(_CREATE_MODEL_ARGS))
    if unknown:
        raise TypeError(f"unknown create_model argument(s) {unknown}; accepted: "
                        f"{list(_CREATE_MODEL_ARGS)} (use model_kwargs_from_args to pick them "
                        "out of a full argument dict)")


def model_kwargs_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The ``create_model`` keyword arguments found in a full script argument dict.

    ``args`` is e.g. ``model_and_diffusion_defaults()`` updated from the command line (or an
    ``argparse.Namespace``'s ``vars``); keys that ``create_model`` does not take are dropped.
    """
    return {k: args[k] for k in _CREATE_MODEL_ARGS if k in args}
