"""Exponential moving averages of parameters."""
from __future__ import annotations

from typing import Any

import jax


def ema_update(ema: Any, params: Any, rate: float | jax.Array,
               one_minus_rate: float | jax.Array | None = None) -> Any:
    """``ema * rate + params * (1 - rate)`` leaf by leaf, in the leaves' dtype.

    A traced ``rate`` (e.g. a consistency model's scheduled target rate) comes with
    ``one_minus_rate`` computed on the host in float64, so that ``1 - rate`` is rounded once, as
    for a Python-float rate (and PyTorch's ``alpha=1 - rate``).

    Written as ``params * (1 - rate) + ema * rate`` on purpose: XLA contracts it into
    ``fma(params, 1 - rate, round(ema * rate))``, which is exactly PyTorch's
    ``ema.mul_(rate).add_(params, alpha=1 - rate)`` (guided-diffusion's ``update_ema``). Near 1.0
    (GroupNorm scales) the EMA step is below one ulp, so the rounding order decides the result.
    """
    c = 1 - rate if one_minus_rate is None else one_minus_rate
    return jax.tree.map(lambda e, p: p * c + e * rate, ema, params)
