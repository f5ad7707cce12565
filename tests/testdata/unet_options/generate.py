"""Generates the UNet option test vectors in this folder from the public guided-diffusion code.

Usage (outside the project; needs torch and numpy):

    python tests/testdata/unet_options/generate.py --reference /path/to/checkout [--out DIR] \
        [--only NAME ...]

``/path/to/checkout`` is a directory containing the ``guided_diffusion`` package of
openai/guided-diffusion (only ``unet.py``, ``nn.py`` and ``fp16_util.py`` are imported). The
reference code is imported from there, never copied here. See README.md for provenance.

Each ``<name>.npz`` holds, with torch's layouts:
  x [B, C, H, W] float32, t [B] (int64 or float32), y [B] int64 (class-conditional configs only),
  out [B, C_out, H, W] float32 = UNetModel(**unet_kwargs)(x, t, y) in eval mode,
  param/<state_dict key> float32 (every parameter, set by the seeded rule below),
  unet_kwargs (JSON str): the reference UNetModel constructor arguments,
  create_model_kwargs (JSON str, may be "null"): equivalent atdiff_jax create_model arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np
import torch

B, IMAGE = 2, 16  # batch; the default image size (each config gives its image_size)

# name -> (reference UNetModel kwargs, equivalent create_model kwargs or None, t, seed)
CONFIGS = {
    # QKVAttentionLegacy with num_heads (num_head_channels=-1) and a different num_heads_upsample;
    # attention at two resolutions; conv up/downsampling (resblock_updown=False, conv_resample);
    # additive timestep conditioning (use_scale_shift_norm=False); learn_sigma=False.
    "legacy_numheads": (
        dict(image_size=IMAGE, in_channels=3, model_channels=32, out_channels=3,
             num_res_blocks=1, attention_resolutions=(1, 2), dropout=0.0, channel_mult=(1, 1),
             conv_resample=True, num_classes=None, num_heads=2, num_head_channels=-1,
             num_heads_upsample=4, use_scale_shift_norm=False, resblock_updown=False,
             use_new_attention_order=False),
        dict(image_size=IMAGE, num_channels=32, num_res_blocks=1, channel_mult="1,1",
             learn_sigma=False, class_cond=False, attention_resolutions="16,8", num_heads=2,
             num_head_channels=-1, num_heads_upsample=4, use_scale_shift_norm=False,
             resblock_updown=False, use_new_attention_order=False),
        [0, 999], 2001),
    # Class-conditional (10 classes), legacy order with num_head_channels, residual
    # up/downsampling, scale/shift norm, learn_sigma, two res blocks per level.
    "classcond_updown": (
        dict(image_size=IMAGE, in_channels=3, model_channels=32, out_channels=6,
             num_res_blocks=2, attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 1),
             conv_resample=True, num_classes=10, num_heads=1, num_head_channels=16,
             num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
             use_new_attention_order=False),
        dict(image_size=IMAGE, num_channels=32, num_res_blocks=2, channel_mult="1,1",
             learn_sigma=True, class_cond=True, num_classes=10, attention_resolutions="8",
             num_heads=1, num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
             use_new_attention_order=False),
        [17, 500], 2002),
    # One input channel, average-pool / nearest resampling without convs (conv_resample=False,
    # not reachable through create_model), new attention order with num_heads=4 in the middle
    # block only, a width change (1x1 skip convs in the input path), float timesteps.
    "avgpool_1ch_float_t": (
        dict(image_size=IMAGE, in_channels=1, model_channels=32, out_channels=1,
             num_res_blocks=1, attention_resolutions=(), dropout=0.0, channel_mult=(1, 2),
             conv_resample=False, num_classes=None, num_heads=4, num_head_channels=-1,
             num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
             use_new_attention_order=True),
        None,
        [3.5, 990.996], 2003),
    # The AT_Diff authors' class-conditional CIFAR-10 layout in small: 32x32 with the authors'
    # create_model arguments (class_cond=True, image_size=32 and no class count: their
    # script_util gives 10 classes at 32 px), new attention order with num_head_channels,
    # residual up/downsampling, scale/shift norm, learn_sigma.
    "classcond32": (
        dict(image_size=32, in_channels=3, model_channels=32, out_channels=6,
             num_res_blocks=1, attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 1),
             conv_resample=True, num_classes=10, num_heads=1, num_head_channels=16,
             num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
             use_new_attention_order=True),
        dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1",
             learn_sigma=True, class_cond=True, attention_resolutions="16",
             num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
             use_new_attention_order=True),
        [42, 999], 2004),
}


def set_params(model: torch.nn.Module, seed: int) -> None:
    """Every parameter := round(256 * 0.05 * r) / 256 (GroupNorm weights: 1 + 0.05 * r), with r
    drawn by one torch.Generator(seed) as randn(p.shape) per parameter in named_parameters() order."""
    gen = torch.Generator().manual_seed(seed)
    gn_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    with torch.no_grad():
        for _, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            v = (1.0 + 0.05 * r) if id(p) in gn_weights else 0.05 * r
            p.copy_(torch.round(v * 256.0) / 256.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True,
                    help="directory containing the guided_diffusion package")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent))
    ap.add_argument("--only", nargs="+", choices=sorted(CONFIGS), metavar="NAME",
                    help="generate only these configs (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, args.reference)
    from guided_diffusion.unet import UNetModel  # the public reference implementation

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ref_dir = pathlib.Path(args.reference) / "guided_diffusion"
    for f in ("unet.py", "nn.py", "fp16_util.py"):
        print(f"sha256 {f}: {hashlib.sha256((ref_dir / f).read_bytes()).hexdigest()}")
    print(f"torch {torch.__version__}, numpy {np.__version__}")

    for name, (unet_kwargs, cm_kwargs, t, seed) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        size = unet_kwargs["image_size"]
        model = UNetModel(**unet_kwargs).eval()
        set_params(model, seed)
        gen = torch.Generator().manual_seed(seed + 10000)
        x = torch.randn(B, unet_kwargs["in_channels"], size, size, generator=gen)
        tt = torch.tensor(t, dtype=torch.float32 if any(isinstance(v, float) for v in t)
                          else torch.int64)
        y = None
        if unet_kwargs["num_classes"] is not None:
            y = torch.randint(0, unet_kwargs["num_classes"], (B,), generator=gen)
        with torch.no_grad():
            out = model(x, tt, y)
        arrays = {"x": x.numpy(), "t": tt.numpy(), "out": out.numpy(),
                  "unet_kwargs": np.array(json.dumps(unet_kwargs)),
                  "create_model_kwargs": np.array(json.dumps(cm_kwargs))}
        if y is not None:
            arrays["y"] = y.numpy()
        for k, v in model.state_dict().items():
            arrays[f"param/{k}"] = v.numpy()
        path = pathlib.Path(args.out) / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        n = sum(v.numel() for v in model.parameters())
        print(f"{name}: {n} params, out max |.| {out.abs().max().item():.4f}, "
              f"{path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
