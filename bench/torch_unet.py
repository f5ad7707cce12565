"""A PyTorch (eager, NCHW) twin of ``atdiff_jax.models.UNetModel``, for speed comparisons only.

It is built from the Flax module's own architecture plan (``UNetModel.blocks()``), uses
guided-diffusion's parameter names, and loads the Flax params through
``atdiff_jax.convert.state_dict_from_params``, so both frameworks run the same network with the
same weights (``bench/cpu_gap.py`` checks that their outputs agree before timing anything).
Covered options: everything the configs in ``configs/`` use (scale-shift norm or additive
embedding, residual or plain resampling, both attention orders, any GroupNorm group count);
class labels, dropout, checkpointing and guidance embeddings are not (none affects speed here).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _conv(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)


def _timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _Resample(nn.Module):
    def __init__(self, up: bool, channels: int, use_conv: bool):
        super().__init__()
        self.up = up
        if use_conv:
            if up:
                self.conv = _conv(channels, channels)
            else:
                self.op = _conv(channels, channels, stride=2)

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if hasattr(self, "conv") else x
        return self.op(x) if hasattr(self, "op") else F.avg_pool2d(x, 2, 2)


class _ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, scale_shift, groups, up=False, down=False):
        super().__init__()
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), _conv(c_in, c_out))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out if scale_shift
                                                             else c_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, c_out), nn.SiLU(), nn.Identity(),
                                        _conv(c_out, c_out))
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2, 2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h, x = self._resample(h), self._resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + e))
        return self.skip_connection(x) + h


class _Attention(nn.Module):
    def __init__(self, channels, heads, new_order, groups):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))
        n, ch = self.heads, c // self.heads
        if self.new_order:
            q, k, v = (z.reshape(b * n, ch, -1) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * n, 3 * ch, -1).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return x + self.proj_out(a).reshape(b, c, hh, ww)


class _Seq(nn.ModuleList):
    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
        return h


class TorchUNet(nn.Module):
    """The network of a Flax ``UNetModel`` (unconditional, no dropout) in PyTorch, NCHW."""

    def __init__(self, flax_model):
        super().__init__()
        m = flax_model
        if m.num_classes is not None or m.guidance_embed_dim is not None:
            raise ValueError("TorchUNet covers unconditional models without guidance embedding")
        self.mc = mc = m.model_channels
        ted, groups = 4 * mc, m.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))

        def block(b):
            layers = []
            for lay in b.layers:
                if lay.kind == "conv":
                    layers.append(_conv(lay.in_ch, lay.out_ch))
                elif lay.kind == "res":
                    layers.append(_ResBlock(lay.in_ch, lay.out_ch, ted, m.use_scale_shift_norm,
                                            groups, up=lay.up, down=lay.down))
                elif lay.kind == "attn":
                    layers.append(_Attention(lay.in_ch, lay.heads, m.use_new_attention_order,
                                             groups))
                else:
                    layers.append(_Resample(lay.kind == "up", lay.in_ch, m.conv_resample))
            return _Seq(layers)

        inputs, middle, outputs = m.blocks()
        self.input_blocks = nn.ModuleList(block(b) for b in inputs)
        self.middle_block = block(middle)
        self.output_blocks = nn.ModuleList(block(b) for b in outputs)
        ch = outputs[-1].layers[-1].out_ch
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), _conv(ch, m.out_channels))

    def forward(self, x, t):
        emb = self.time_embed(_timestep_embedding(t, self.mc))
        hs, h = [], x
        for b in self.input_blocks:
            h = b(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for b in self.output_blocks:
            h = b(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def from_flax(flax_model, params) -> TorchUNet:
    """A ``TorchUNet`` holding the Flax ``params`` (strict load: every name and shape must match)."""
    from atdiff_jax.convert.guided_diffusion import state_dict_from_params
    net = TorchUNet(flax_model)
    sd = {k: torch.from_numpy(v.copy()) for k, v in state_dict_from_params(params).items()}
    net.load_state_dict(sd, strict=True)
    return net
