"""Exponential moving averages of parameters."""
from __future__ import annotations

from typing import Any

import jax


def ema_update(ema: Any, params: Any, rate: float) -> Any:
    """``ema * rate + params * (1 - rate)`` leaf by leaf, in the leaves' dtype.

    Written as ``params * (1 - rate) + ema * rate`` on purpose: XLA contracts it into
    ``fma(params, 1 - rate, round(ema * rate))``, which is exactly PyTorch's
    ``ema.mul_(rate).add_(params, alpha=1 - rate)`` (guided-diffusion's ``update_ema``). Near 1.0
    (GroupNorm scales) the EMA step is below one ulp, so the rounding order decides the result.
    """
    return jax.tree.map(lambda e, p: p * (1 - rate) + e * rate, ema, params)
