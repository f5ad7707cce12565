"""The ADM UNet of guided-diffusion (``UNetModel``) as a Flax Linen module, NHWC.

Every option of guided-diffusion's ``UNetModel`` is supported: residual blocks with FiLM-style
scale/shift conditioning, self-attention at chosen downsample factors with either head layout
(``QKVAttention`` / ``QKVAttentionLegacy``), residual or plain up/downsampling, class conditioning
and dropout. With the same parameters it computes the same function as the PyTorch reference (to
float32 rounding): see ``atdiff_jax.convert.guided_diffusion`` for loading reference weights.

Layout and naming
-----------------
Images are NHWC at the interface and inside. Submodules are named after the torch module path with
dots replaced by underscores (``input_blocks.3.1.qkv`` -> ``input_blocks_3_1/qkv``), so a torch
state-dict key maps onto a params path by ``re.sub(r"\\.(\\d+)", r"_\\1", key)`` and a layout
transpose; the leaves are ``kernel``/``bias`` (Conv, Dense), ``scale``/``bias`` (GroupNorm) and
``embedding`` (Embed). The 1x1 attention convolutions ``qkv``/``proj_out`` are Dense layers.

Precision
---------
Params are always float32. ``dtype`` is the compute dtype of the torso (input, middle and output
blocks), as guided-diffusion's ``use_fp16`` does: the timestep embedding, its MLP, the per-block
embedding projections and the output head run in float32, GroupNorm and the attention softmax
compute in float32 and cast back (as ``GroupNorm32`` and ``th.softmax(w.float())`` do).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array
Dtype = Any

__all__ = ["UNetModel", "guidance_scale_embedding", "timestep_embedding", "NUM_GROUPS"]

NUM_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels), eps 1e-5
GROUPNORM_EPS = 1e-5


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal timestep embedding, identical to guided-diffusion's ``nn.timestep_embedding``.

    Args:
      timesteps: [B] timesteps, int or float (fractional values are allowed).
      dim: embedding width.
      max_period: the longest period (in timestep units) of the sinusoids.

    Returns:
      [B, dim] float32: ``cos(t * f_i)`` for the first ``dim // 2`` columns, then ``sin(t * f_i)``,
      with ``f_i = exp(-log(max_period) * i / (dim // 2))``; a zero column is appended if ``dim`` is
      odd. Everything is computed in float32 as in the reference.
    """
    half = dim // 2
    exponent = jnp.float32(-math.log(max_period)) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / jnp.float32(half))
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def guidance_scale_embedding(w: Array, dim: int) -> Array:
    """Sinusoidal embedding of classifier-free guidance scales (LCM's ``guidance_scale_embedding``).

    Args:
      w: [B] guidance scales (floats).
      dim: embedding width.

    Returns:
      [B, dim] float32: ``sin(1000 w f_i)`` for the first ``dim // 2`` columns, then
      ``cos(1000 w f_i)``, with ``f_i = exp(-log(10000) * i / (dim // 2 - 1))`` (a zero column is
      appended if ``dim`` is odd), as in latent consistency distillation.
    """
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-scale))
    args = (jnp.asarray(w, jnp.float32) * 1000.0)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# ----------------------------------------------------------------------------------------------
# Initialisers: PyTorch's defaults (kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(fan_in)) for weight
# and bias) and guided-diffusion's zero_module, so a freshly initialised model behaves like one
# created by the reference.

_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv(features: int, kernel: int, fan_in_channels: int, *, name: str, dtype: Dtype,
          stride: int = 1, zero: bool = False) -> nn.Conv:
    """A torch-style Conv2d (padding kernel//2 on both sides) in NHWC."""
    pad = kernel // 2
    zeros = nn.initializers.zeros_init()
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        dtype=dtype, param_dtype=jnp.float32,
        kernel_init=zeros if zero else _torch_kernel_init,
        bias_init=zeros if zero else _torch_bias_init(fan_in_channels * kernel * kernel),
        name=name)


def _dense(features: int, fan_in: int, *, name: str, dtype: Dtype, zero: bool = False) -> nn.Dense:
    zeros = nn.initializers.zeros_init()
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=zeros if zero else _torch_kernel_init,
                    bias_init=zeros if zero else _torch_bias_init(fan_in), name=name)


def _once(ref: Array, *xs: Array) -> tuple[Array, ...]:
    """``xs`` unchanged, divided by an exact, data-dependent 1 (``ref / ref``, ``ref`` > 0).

    XLA:CPU does not fuse an "expensive" producer (a divide) into a consumer that broadcasts it,
    so small ``[B, C]`` factors passed through here are computed once, not recomputed inside the
    big ``[B, H, W, C]`` loop that uses them, which makes that loop ~10x slower (bench/README.md).
    ``lax.optimization_barrier`` would say this directly, but XLA:CPU drops barriers. Elsewhere
    this costs one tiny divide."""
    one = jax.lax.stop_gradient(ref) / jax.lax.stop_gradient(ref)
    return tuple(x / one for x in xs)


def _group_mean_fn(x: Array, groups: int):
    """For ``x`` [B, ..., C]: a function of per-channel sums over the spatial axes [B, C] that
    returns each channel's group mean [B, C]; and those spatial axes."""
    b, c = x.shape[0], x.shape[-1]
    per, axes = c // groups, tuple(range(1, x.ndim - 1))
    n = per * math.prod(x.shape[1:-1])

    def group_mean(per_channel_sum):
        g = per_channel_sum.reshape(b, groups, per).sum(-1) / n
        return jnp.repeat(g, per, axis=1)

    return group_mean, axes


def _group_stats(x: Array, groups: int, eps: float):
    """Per-(example, channel) group mean, 1/std and var + eps of ``x`` [B, ..., C] (two-pass),
    from per-channel sums over the spatial axes."""
    group_mean, axes = _group_mean_fn(x, groups)
    mean = group_mean(x.sum(axes))
    var_eps = group_mean(jnp.square(x - _bc(mean, x)).sum(axes)) + eps
    return mean, jax.lax.rsqrt(var_eps), var_eps


def _bc(v: Array, x: Array) -> Array:
    """[B, C] -> [B, 1, ..., 1, C], broadcastable against ``x``."""
    return v.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def group_norm_film(x: Array, gamma: Array, beta: Array, scale: Array, shift: Array,
                    groups: int, eps: float) -> Array:
    """``GroupNorm(x) * gamma + beta``, then ``* (1 + scale) + shift`` (FiLM; [B, C] each), for
    ``x`` [B, ..., C] in float32: ``(x - m) * A + D`` with [B, C] factors. Its VJP is written
    out as one more such pass (``g * A + (x - m) * P + Q``) after two per-channel reductions, so
    that XLA:CPU runs no per-pixel arithmetic on [B, C] quantities (see :func:`_once`)."""
    return _gnf_fwd(x, gamma, beta, scale, shift, groups, eps)[0]


def _gnf_fwd(x, gamma, beta, scale, shift, groups, eps):
    mean, r, var_eps = _group_stats(x, groups, eps)
    film = 1 + scale
    mean, a, d = _once(var_eps, mean, r * gamma * film, beta * film + shift)
    y = (x - _bc(mean, x)) * _bc(a, x) + _bc(d, x)
    return y, (x, gamma, beta, scale, mean, r, var_eps)


def _gnf_bwd(groups, eps, res, g):
    x, gamma, beta, scale, mean, r, var_eps = res     # the statistics of the forward pass
    group_mean, axes = _group_mean_fn(x, groups)
    film = 1 + scale
    centred = x - _bc(mean, x)
    s1, s2 = g.sum(axes), (g * centred).sum(axes)      # [B, C]: sum g, sum g (x - m)
    gam = gamma * film                                 # the effective per-(b, c) scale
    # d/dx of (x - m) r gam + ...: r gam g - r mean_grp(gam g) - r^2 (x - m) mean_grp(gam g r (x-m))
    a, p, q = _once(var_eps, r * gam, -r * r * group_mean(gam * r * s2), -r * group_mean(gam * s1))
    dx = g * _bc(a, x) + centred * _bc(p, x) + _bc(q, x)
    xhat_g = r * s2                                    # sum over pixels of g * normalised x
    return (dx, jnp.sum(xhat_g * film, 0), jnp.sum(s1 * film, 0),
            xhat_g * gamma + s1 * beta, s1)


group_norm_film.defvjp(_gnf_fwd, _gnf_bwd)


class GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis of ``[B, ..., C]``, eps 1e-5, statistics over every
    axis but the batch, optionally followed by a FiLM ``* (1 + scale) + shift`` with per-(example,
    channel) ``scale``/``shift``: ``nn.GroupNorm(use_fast_variance=False)``'s function and params
    (``scale``, ``bias``), to float32 rounding; two-pass variance, like guided-diffusion's
    GroupNorm32. Computed by :func:`group_norm_film`, which XLA:CPU runs markedly faster than
    ``nn.GroupNorm``, forward and backward (bench/README.md)."""
    groups: int = NUM_GROUPS
    epsilon: float = GROUPNORM_EPS

    @nn.compact
    def __call__(self, x: Array, scale: Array | None = None, shift: Array | None = None
                 ) -> Array:
        b, c = x.shape[0], x.shape[-1]
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.groups} "
                             "groups")
        gamma = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        beta = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        x = x.astype(jnp.float32)
        scale = (jnp.zeros((b, c), jnp.float32) if scale is None
                 else scale.reshape(b, c).astype(jnp.float32))
        shift = (jnp.zeros((b, c), jnp.float32) if shift is None
                 else shift.reshape(b, c).astype(jnp.float32))
        return group_norm_film(x, gamma, beta, scale, shift, self.groups, float(self.epsilon))


def _group_norm(x: Array, name: str, groups: int = NUM_GROUPS, scale: Array | None = None,
                shift: Array | None = None) -> Array:
    """GroupNorm (guided-diffusion: 32 groups), eps 1e-5, [then FiLM], in float32, cast back to
    x.dtype."""
    return GroupNorm(groups=groups, name=name)(x, scale, shift).astype(x.dtype)


def _upsample_nearest(x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour (torch ``F.interpolate(scale_factor=2)``)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def _avg_pool2(x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C], 2x2 average pooling with stride 2."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Blocks


class ResBlock(nn.Module):
    """guided-diffusion ``ResBlock``: GN-SiLU-conv, + timestep embedding, GN-SiLU-dropout-conv, + skip.

    Submodules (torch names): ``in_layers_0`` (GroupNorm), ``in_layers_2`` (3x3 conv),
    ``emb_layers_1`` (Dense to C_out or 2*C_out with scale/shift), ``out_layers_0`` (GroupNorm),
    ``out_layers_3`` (3x3 conv, zero-initialised), ``skip_connection`` (1x1 conv, only if
    C_in != C_out). ``up``/``down`` resample both branches by 2 (nearest / 2x2 average) between the
    first SiLU and the first conv.
    """
    out_channels: int
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    norm_groups: int = NUM_GROUPS

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        """x: [B, H, W, C_in] (compute dtype); emb: [B, E] float32 -> [B, H', W', C_out]."""
        c_in, c_out = x.shape[-1], self.out_channels
        h = nn.silu(_group_norm(x, "in_layers_0", self.norm_groups))
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _avg_pool2(h), _avg_pool2(x)
        h = _conv(c_out, 3, c_in, name="in_layers_2", dtype=self.dtype)(h)

        emb_dim = 2 * c_out if self.use_scale_shift_norm else c_out
        emb_out = _dense(emb_dim, emb.shape[-1], name="emb_layers_1", dtype=jnp.float32)(
            nn.silu(emb)).astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = _group_norm(h, "out_layers_0", self.norm_groups, scale, shift)
        else:
            h = _group_norm(h + emb_out, "out_layers_0", self.norm_groups)
        h = nn.silu(h)
        if self.dropout > 0:
            h = nn.Dropout(rate=self.dropout, deterministic=self.deterministic)(h)
        h = _conv(c_out, 3, c_out, name="out_layers_3", dtype=self.dtype, zero=True)(h)

        if c_in != c_out:
            x = _conv(c_out, 1, c_in, name="skip_connection", dtype=self.dtype)(x)
        return x + h


class AttentionBlock(nn.Module):
    """guided-diffusion ``AttentionBlock``: x + proj_out(attention(qkv(GN(x)))) over all H*W positions.

    ``qkv`` is a Dense layer C -> 3C (torch: Conv1d k=1). Its output channels are split as
    [3, heads, ch] when ``new_order`` (``QKVAttention``) or as [heads, 3, ch] otherwise
    (``QKVAttentionLegacy``), so reference weights of either kind load without permutation.
    """
    num_heads: int
    new_order: bool = False
    dtype: Dtype = jnp.float32
    norm_groups: int = NUM_GROUPS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, hh, ww, c = x.shape
        heads = self.num_heads
        ch = c // heads
        qkv = _dense(3 * c, c, name="qkv", dtype=self.dtype)(
            _group_norm(x, "norm", self.norm_groups))
        if self.new_order:
            qkv = qkv.reshape(b, hh * ww, 3, heads, ch)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            qkv = qkv.reshape(b, hh * ww, heads, 3, ch)
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        # [B, T, heads, ch] each. Scaling q and k by ch**-1/4 each is more stable in 16 bits.
        scale = jnp.asarray(1.0 / math.sqrt(math.sqrt(ch)), q.dtype)
        w = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(w.dtype)
        a = jnp.einsum("bhts,bshc->bthc", w, v).reshape(b, hh, ww, c)
        h = _dense(c, c, name="proj_out", dtype=self.dtype, zero=True)(a)
        return x + h


class Downsample(nn.Module):
    """Downsample by 2: a stride-2 3x3 conv ``op`` (use_conv) or 2x2 average pooling."""
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[B, H, W, C] -> [B, H/2, W/2, C]."""
        if self.use_conv:
            c = x.shape[-1]
            return _conv(c, 3, c, stride=2, name="op", dtype=self.dtype)(x)
        return _avg_pool2(x)


class Upsample(nn.Module):
    """Upsample by 2 (nearest), then a 3x3 conv ``conv`` if use_conv."""
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[B, H, W, C] -> [B, 2H, 2W, C]."""
        x = _upsample_nearest(x)
        if self.use_conv:
            c = x.shape[-1]
            x = _conv(c, 3, c, name="conv", dtype=self.dtype)(x)
        return x


# Rematerialised variants for use_checkpoint (same params, recomputed in the backward pass).
_RematResBlock = nn.remat(ResBlock)
_RematAttentionBlock = nn.remat(AttentionBlock)


class _Layer(NamedTuple):
    """One layer of a ``TimestepEmbedSequential`` block (the static architecture plan)."""
    kind: str        # "conv" | "res" | "attn" | "down" | "up"
    in_ch: int
    out_ch: int
    heads: int = 0   # attention heads ("attn")
    up: bool = False    # "res": resblock_updown upsampling
    down: bool = False  # "res": resblock_updown downsampling


class _Block(NamedTuple):
    name: str                  # torch prefix with "_" for ".", e.g. "input_blocks_3"
    layers: tuple[_Layer, ...]


# ----------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """guided-diffusion's ``UNetModel`` (2-D), NHWC.

    Attributes:
      image_size: nominal input height/width (used to build example inputs, e.g. for init; the
        model itself accepts any H, W divisible by ``2 ** (len(channel_mult) - 1)``).
      in_channels: input channels C_in.
      model_channels: base width; the time embedding has ``4 * model_channels`` channels.
      out_channels: output channels (2 * C_in for a learned-sigma model).
      num_res_blocks: residual blocks per level.
      attention_resolutions: downsample factors (1, 2, 4, ...) at which attention blocks follow the
        residual blocks (``create_model`` converts resolutions such as "16,8" to these).
      dropout: dropout rate inside residual blocks (used only when ``train=True``).
      channel_mult: width multiplier per level; widths are ``int(mult * model_channels)``.
      conv_resample: learned 3x3 convs for non-residual up/downsampling (else nearest / avg-pool).
      num_classes: if set, the model is class-conditional: ``label_emb`` is added to the time
        embedding and ``y`` must be given.
      num_heads: attention heads when ``num_head_channels == -1``.
      num_head_channels: channels per head; -1 means use ``num_heads``.
      num_heads_upsample: heads in the output (upsampling) blocks when ``num_head_channels == -1``;
        -1 means ``num_heads``.
      use_scale_shift_norm: FiLM conditioning ``GN(h) * (1 + scale) + shift``; else ``h + emb``.
      resblock_updown: residual blocks for up/downsampling.
      use_new_attention_order: ``QKVAttention`` (split q/k/v, then heads) instead of
        ``QKVAttentionLegacy`` (split heads, then q/k/v).
      use_checkpoint: rematerialise residual and attention blocks in the backward pass
        (``nn.remat``); changes memory use only, never the values.
      dtype: compute dtype of the torso (float32, bfloat16, float16). Params are float32.
      guidance_embed_dim: if set, the model also takes a classifier-free guidance scale ``w`` [B]
        (a latent-consistency-distillation student): ``guidance_proj``, a bias-free Dense layer
        initialised to zero, maps ``guidance_scale_embedding(w, guidance_embed_dim)`` to
        ``model_channels`` and adds it to the sinusoidal timestep embedding before the time MLP
        (diffusers' ``time_cond_proj_dim``). Zero init: the student starts as exactly the network
        whose other params it copies (e.g. its teacher). None (default): no such input or param.
      norm_groups: groups of every GroupNorm; 32 is guided-diffusion's ``normalization()`` and
        the only value its checkpoints use. Narrow models need fewer: with 32 channels and 32
        groups every GroupNorm is a per-channel instance norm, and the final ``out_0`` norm then
        erases each image's mean, so the network cannot predict the mean of epsilon (the per-image
        mean of its error equals that of the noise, 1/sqrt(H*W*C)) and samples get grey or white
        backgrounds at any training length. 8 groups (4 channels each, as ADM's 128-channel
        CIFAR-10 model has) fixes that for a 32-channel model.
    """
    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_checkpoint: bool = False
    dtype: Dtype = jnp.float32
    guidance_embed_dim: int | None = None
    norm_groups: int = NUM_GROUPS

    def __post_init__(self):
        super().__post_init__()
        self._validate()

    # -- static architecture ---------------------------------------------------------------

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def _heads(self, channels: int, num_heads: int, where: str) -> int:
        if self.num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"{where}: {channels} attention channels are not divisible by "
                                 f"{num_heads} heads")
            return num_heads
        if channels % self.num_head_channels:
            raise ValueError(f"{where}: {channels} attention channels are not divisible by "
                             f"num_head_channels={self.num_head_channels}")
        return channels // self.num_head_channels

    def blocks(self) -> tuple[tuple[_Block, ...], _Block, tuple[_Block, ...]]:
        """The architecture plan ``(input_blocks, middle_block, output_blocks)``.

        Follows ``UNetModel.__init__`` of guided-diffusion exactly; each block lists its layers
        with their channel counts. Raises ValueError on an inconsistent configuration.
        """
        mc = self.model_channels
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        ch = int(self.channel_mult[0] * mc)
        inputs = [_Block("input_blocks_0", (_Layer("conv", self.in_channels, ch),))]
        chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                out = int(mult * mc)
                layers = [_Layer("res", ch, out)]
                ch = out
                if ds in self.attention_resolutions:
                    name = f"input_blocks_{len(inputs)}_1"
                    layers.append(_Layer("attn", ch, ch, heads=self._heads(ch, self.num_heads, name)))
                inputs.append(_Block(f"input_blocks_{len(inputs)}", tuple(layers)))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                layer = (_Layer("res", ch, ch, down=True) if self.resblock_updown
                         else _Layer("down", ch, ch))
                inputs.append(_Block(f"input_blocks_{len(inputs)}", (layer,)))
                chans.append(ch)
                ds *= 2
        middle = _Block("middle_block", (
            _Layer("res", ch, ch),
            _Layer("attn", ch, ch, heads=self._heads(ch, self.num_heads, "middle_block_1")),
            _Layer("res", ch, ch)))
        outputs = []
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                skip = chans.pop()
                out = int(mc * mult)
                layers = [_Layer("res", ch + skip, out)]
                ch = out
                if ds in self.attention_resolutions:
                    name = f"output_blocks_{len(outputs)}_1"
                    layers.append(_Layer("attn", ch, ch, heads=self._heads(ch, heads_up, name)))
                if level and i == self.num_res_blocks:
                    layers.append(_Layer("res", ch, ch, up=True) if self.resblock_updown
                                  else _Layer("up", ch, ch))
                    ds //= 2
                outputs.append(_Block(f"output_blocks_{len(outputs)}", tuple(layers)))
        return tuple(inputs), middle, tuple(outputs)

    def _validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"UNetModel.{name} must be a positive int, got {v!r}")

        for name in ("image_size", "in_channels", "model_channels", "out_channels", "norm_groups"):
            positive_int(name)
        if not isinstance(self.num_res_blocks, numbers.Integral) or self.num_res_blocks < 0:
            raise ValueError(f"UNetModel.num_res_blocks must be an int >= 0, got "
                             f"{self.num_res_blocks!r}")
        if len(self.channel_mult) == 0 or any(int(m * self.model_channels) < 1
                                              for m in self.channel_mult):
            raise ValueError(f"UNetModel.channel_mult must be a non-empty sequence of positive "
                             f"multipliers, got {self.channel_mult!r}")
        if any(not isinstance(r, numbers.Integral) or r < 1 for r in self.attention_resolutions):
            raise ValueError("UNetModel.attention_resolutions must be downsample factors (ints "
                             f">= 1), got {self.attention_resolutions!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetModel.dropout must be in [0, 1), got {self.dropout!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, numbers.Integral)
                                             or self.num_classes < 1):
            raise ValueError(f"UNetModel.num_classes must be None or a positive int, got "
                             f"{self.num_classes!r}")
        if self.num_heads < 1:
            raise ValueError(f"UNetModel.num_heads must be >= 1, got {self.num_heads}")
        if self.num_heads_upsample != -1 and self.num_heads_upsample < 1:
            raise ValueError("UNetModel.num_heads_upsample must be -1 (= num_heads) or >= 1, got "
                             f"{self.num_heads_upsample}")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise ValueError("UNetModel.num_head_channels must be -1 (use num_heads) or >= 1, got "
                             f"{self.num_head_channels}")
        if self.guidance_embed_dim is not None:
            positive_int("guidance_embed_dim")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"UNetModel.dtype must be a floating dtype, got {self.dtype!r}")
        # Every normalised width must be a multiple of the GroupNorm group count.
        inputs, middle, outputs = self.blocks()  # also checks the attention head counts
        for block in (*inputs, middle, *outputs):
            for j, layer in enumerate(block.layers):
                widths = {"res": (layer.in_ch, layer.out_ch), "attn": (layer.in_ch,)}.get(
                    layer.kind, ())
                for w in widths:
                    if w % self.norm_groups:
                        raise ValueError(
                            f"{block.name}_{j} ({layer.kind}) normalises {w} channels, which is not a "
                            f"multiple of the {self.norm_groups} GroupNorm groups; choose "
                            "model_channels/channel_mult (or norm_groups) so that every width is")

    # -- forward ---------------------------------------------------------------------------

    def _check_inputs(self, x: Array, t: Array, y: Array | None, w: Array | None = None) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            hint = (" (it looks like NCHW; transpose to NHWC)"
                    if x.ndim == 4 and x.shape[1] == self.in_channels else "")
            raise ValueError(f"x must be NHWC [B, H, W, {self.in_channels}], got shape "
                             f"{tuple(x.shape)}{hint}")
        f = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"x height and width must be divisible by {f} (the UNet downsamples "
                             f"{len(self.channel_mult) - 1} times), got {tuple(x.shape[1:3])}")
        if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != x.shape[0]):
            raise ValueError(f"t must have shape [B]=[{x.shape[0]}] (or be a scalar), got "
                             f"{jnp.shape(t)}")
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y was given but the model is not class-conditional "
                                 "(num_classes=None)")
        else:
            if y is None:
                raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}): "
                                 "labels y [B] are required")
            if jnp.shape(y) != (x.shape[0],):
                raise ValueError(f"y must have shape [B]=({x.shape[0]},), got {jnp.shape(y)}")
            if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
                raise ValueError(f"y must hold integer class labels, got dtype {jnp.result_type(y)}")
        if self.guidance_embed_dim is None:
            if w is not None:
                raise ValueError("w (guidance scale) was given but the model has no guidance "
                                 "embedding (guidance_embed_dim=None)")
        elif w is None or jnp.shape(w) != (x.shape[0],):
            raise ValueError(f"the model takes a guidance scale (guidance_embed_dim="
                             f"{self.guidance_embed_dim}): w must have shape [B]=({x.shape[0]},), "
                             f"got {None if w is None else jnp.shape(w)}")

    def _block(self, block: _Block, h: Array, emb: Array, train: bool) -> Array:
        res_cls = _RematResBlock if self.use_checkpoint else ResBlock
        attn_cls = _RematAttentionBlock if self.use_checkpoint else AttentionBlock
        for j, layer in enumerate(block.layers):
            name = f"{block.name}_{j}"
            if layer.kind == "conv":
                h = _conv(layer.out_ch, 3, layer.in_ch, name=name, dtype=self.dtype)(h)
            elif layer.kind == "res":
                h = res_cls(layer.out_ch, use_scale_shift_norm=self.use_scale_shift_norm,
                            dropout=self.dropout, up=layer.up, down=layer.down,
                            deterministic=not train, dtype=self.dtype,
                            norm_groups=self.norm_groups, name=name)(h, emb)
            elif layer.kind == "attn":
                h = attn_cls(layer.heads, new_order=self.use_new_attention_order,
                             dtype=self.dtype, norm_groups=self.norm_groups, name=name)(h)
            elif layer.kind == "down":
                h = Downsample(self.conv_resample, dtype=self.dtype, name=name)(h)
            elif layer.kind == "up":
                h = Upsample(self.conv_resample, dtype=self.dtype, name=name)(h)
            else:  # pragma: no cover - the plan only produces the kinds above
                raise AssertionError(layer.kind)
        return h

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False,
                 w: Array | None = None) -> Array:
        """Predicts the model output (eps, and the variance values if learned) for a noisy batch.

        Args:
          x: [B, H, W, in_channels] noisy images (any float dtype; cast to ``dtype``).
          t: [B] timesteps, int or float (e.g. 990.996 from DPM-Solver); a scalar is broadcast.
          y: [B] int class labels; required iff ``num_classes`` is set.
          train: enables dropout (needs ``rngs={'dropout': key}`` when ``dropout > 0``).
          w: [B] float guidance scales; required iff ``guidance_embed_dim`` is set.

        Returns:
          [B, H, W, out_channels] float32.

        Sows into the ``intermediates`` collection (when it is mutable): ``timestep_embedding``
        [B, model_channels], ``time_embed`` [B, 4*model_channels] (before the label embedding is
        added) and ``middle_block`` [B, H/2^L, W/2^L, C_mid].
        """
        self._check_inputs(x, t, y, w)
        if train and self.dropout > 0 and not self.has_rng("dropout"):
            raise ValueError("train=True with dropout > 0 needs a dropout key: "
                             "apply(..., rngs={'dropout': key})")
        inputs, middle, outputs = self.blocks()
        mc, ted = self.model_channels, self.time_embed_dim

        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = timestep_embedding(t, mc)
        self.sow("intermediates", "timestep_embedding", temb)
        if self.guidance_embed_dim is not None:
            temb = temb + nn.Dense(mc, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                                   kernel_init=nn.initializers.zeros, name="guidance_proj")(
                guidance_scale_embedding(w, self.guidance_embed_dim))
        emb = _dense(ted, mc, name="time_embed_0", dtype=jnp.float32)(temb)
        emb = _dense(ted, ted, name="time_embed_2", dtype=jnp.float32)(nn.silu(emb))
        self.sow("intermediates", "time_embed", emb)
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes, ted, dtype=jnp.float32,
                                 param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(1.0),
                                 name="label_emb")(y)

        h = x.astype(self.dtype)
        hs = []
        for block in inputs:
            h = self._block(block, h, emb, train)
            hs.append(h)
        h = self._block(middle, h, emb, train)
        self.sow("intermediates", "middle_block", h)
        for block in outputs:
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            h = self._block(block, h, emb, train)

        h = nn.silu(_group_norm(h.astype(jnp.float32), "out_0", self.norm_groups))
        return _conv(self.out_channels, 3, h.shape[-1], name="out_2", dtype=jnp.float32,
                     zero=True)(h)
