"""Small MNIST CNN used as the feature extractor of the MNIST feature distance.

A functional Flax Linen module (no BatchNorm or other mutable state, no dropout): five 3x3 conv
layers, each followed by GroupNorm and SiLU, with three stride-2 downsamplings
(32 -> 16 -> 8 -> 4; receptive field 27 px), global average pooling to the 128-d feature vector,
and a linear layer to 10 logits -- the same shape as InceptionV3's pool3 features + logits in
FID. About 141k parameters (~0.56 MB float32). Trained by
:mod:`atdiff_jax.eval.train_classifier`, used by :mod:`atdiff_jax.eval.mnist_fd`.

Input: float ``[B, 32, 32, 1]`` NHWC in ``[-1, 1]`` (the diffusion data scaling
``uint8 / 127.5 - 1``). Output: ``(logits [B, 10], features [B, channels[-1]])``, float32.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["MnistClassifier"]


class MnistClassifier(nn.Module):
    """``__call__(x [B, 32, 32, 1] in [-1, 1]) -> (logits [B, 10], features [B, 128])``.

    ``features`` is the global average of the last conv layer's activations (its width is
    ``channels[-1]``); ``logits`` is a linear function of it.

    Attributes:
      channels: output channels of the 3x3 conv layers.
      strides: stride of each conv layer (2 halves H and W).
      num_classes: number of logits.
      num_groups: GroupNorm groups (must divide every entry of ``channels``).
    """

    channels: Sequence[int] = (32, 32, 64, 64, 128)
    strides: Sequence[int] = (2, 1, 2, 1, 2)
    num_classes: int = 10
    num_groups: int = 8

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        if x.ndim != 4:
            raise ValueError(f"expected NHWC images [B, H, W, C], got shape {x.shape}")
        if len(self.channels) != len(self.strides):
            raise ValueError(f"channels {self.channels} and strides {self.strides} differ in "
                             "length")
        h = x.astype(jnp.float32)
        for i, (ch, s) in enumerate(zip(self.channels, self.strides, strict=True)):
            h = nn.Conv(ch, (3, 3), strides=(s, s), padding="SAME", name=f"conv{i}")(h)
            h = nn.GroupNorm(num_groups=self.num_groups, name=f"norm{i}")(h)
            h = nn.silu(h)
        features = jnp.mean(h, axis=(1, 2))                            # [B, C] global avg pool
        logits = nn.Dense(self.num_classes, name="logits")(features)
        return logits, features
