"""Perturbation math for adversarial training of x_t: ascent steps, projections, radii.

Every function works on a batch ``[B, ...]`` and treats each example separately (norms are taken
over all non-batch axes), as the authors' code does.

Radius semantics (``AdversaryConfig.radius``):

* ``norm="l2"``, ``radius_scaling="sqrt_dim"`` (the authors' code): radius = ``max_norm * sqrt(D)``
  with ``D = H*W*C``, i.e. ``max_norm`` is a per-dimension RMS bound (0.1 -> 5.54 on CIFAR-10).
* ``norm="l2"``, ``radius_scaling="absolute"``: radius = ``max_norm`` as an absolute l2 length.
* ``norm="linf"``: every coordinate is bounded by ``max_norm`` (a per-dimension radius).

The ascent step always has length ``step_size`` in its own norm: ``step_size * g / ||g||_2`` (l2) or
``step_size * sign(g)`` (linf).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from atdiff_jax.diffusion.gaussian import TARGET_TYPES

NORMS = ("l2", "linf")
RADIUS_SCALINGS = ("sqrt_dim", "absolute")
KINDS = ("none", "fast", "pgd", "random")


def per_example_l2(x: jax.Array) -> jax.Array:
    """l2 norm of each example: [B, ...] -> [B] (float32)."""
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def _per_example(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def ascent_step(delta: jax.Array, grad: jax.Array, *, norm: str, step_size: float,
                grad_scale: float = 1.0, eps: float = 1e-8) -> jax.Array:
    """One normalised gradient-ascent step on ``delta`` [B, ...].

    l2: ``delta + step_size * g / max(||g||_2, eps)`` with ``g = grad * grad_scale`` per example
    (``grad_scale = 2**-20`` reproduces the reference's fp32 path, which divides δ's gradient by the
    unused fp16 loss scale; docs/method.md, "Fast AT"); a zero gradient gives a zero step. linf:
    ``delta + step_size * sign(grad)``.
    """
    if norm == "l2":
        g = grad * grad_scale
        denom = jnp.maximum(per_example_l2(g), eps)
        return delta + step_size * g / _per_example(denom, g)
    if norm == "linf":
        return delta + step_size * jnp.sign(grad)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def project(delta: jax.Array, *, norm: str, radius: float | jax.Array) -> jax.Array:
    """Projects each example of ``delta`` onto the ball of the given radius (never grows it)."""
    if norm == "l2":
        n = jnp.maximum(per_example_l2(delta), 1e-8)
        factor = jnp.where(n > radius, radius / n, 1.0)
        return delta * _per_example(factor, delta).astype(delta.dtype)
    if norm == "linf":
        return jnp.clip(delta, -radius, radius)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


@dataclasses.dataclass(frozen=True)
class AdversaryConfig:
    """How x_t is perturbed during training (hashable: usable as a static jit argument).

    Attributes:
      kind: ``"fast"`` (the paper's free/fast AT, K updates per minibatch), ``"pgd"`` (K ascent
        steps with fixed params, then one update), ``"random"`` (fast AT with random unit
        directions instead of gradients: the Gaussian-noise control) or ``"none"`` (clean).
      steps: K (inner iterations).
      step_size: length of each ascent step (``adv_lr``).
      max_norm: radius parameter (``adv_max_norm``), see the module docstring.
      norm: ``"l2"`` (the authors' code) or ``"linf"``.
      radius_scaling: ``"sqrt_dim"`` (authors) or ``"absolute"``; l2 only.
      target_type: ``"delta_detach"`` (released recipe), ``"delta"`` or ``"original"``.
      grad_scale: factor applied to the δ-gradient before normalising; 1 is the recipe's
        intended semantics, ``2**-20`` reproduces the reference's fp32 quirk.
    """

    kind: str = "fast"
    steps: int = 3
    step_size: float = 0.1
    max_norm: float = 0.1
    norm: str = "l2"
    radius_scaling: str = "sqrt_dim"
    target_type: str = "delta_detach"
    grad_scale: float = 1.0

    def __post_init__(self):
        for name, allowed in (("kind", KINDS), ("norm", NORMS),
                              ("radius_scaling", RADIUS_SCALINGS), ("target_type", TARGET_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"adversary {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"adversary steps must be an integer >= 1, got {self.steps!r}")
        if self.step_size < 0 or self.max_norm < 0:
            raise ValueError("adversary step_size and max_norm must be >= 0, got "
                             f"{self.step_size} and {self.max_norm}")
        if self.grad_scale <= 0:
            raise ValueError(f"adversary grad_scale must be > 0, got {self.grad_scale}")

    def radius(self, shape: tuple[int, ...]) -> jax.Array:
        """Projection radius for a batch of the given shape [B, ...] (float32 scalar)."""
        if self.norm == "linf" or self.radius_scaling == "absolute":
            return jnp.float32(self.max_norm)
        dim = math.prod(shape[1:])
        # Computed in float32 like the reference: sqrt(float32(D)) * max_norm.
        return jnp.sqrt(jnp.float32(dim)) * jnp.float32(self.max_norm)

    def step(self, delta: jax.Array, direction: jax.Array) -> jax.Array:
        """Ascent step along ``direction`` (a gradient) followed by projection."""
        delta = ascent_step(delta, direction, norm=self.norm, step_size=self.step_size,
                            grad_scale=self.grad_scale)
        return project(delta, norm=self.norm, radius=self.radius(delta.shape))
