"""Training schedules of consistency models: target-network EMA rate and number of scales N.

``create_ema_and_scales_fn`` is openai/consistency_models' ``script_util.create_ema_and_scales_fn``:
a host-side function ``step -> (target_ema: float, num_scales: int)`` evaluated once per training
step (in float64 NumPy, exactly as the reference, so progressive schedules switch N at the same
steps). Modes (``target_ema_mode`` / ``scale_mode``):

* fixed / fixed: ``(start_ema, start_scales)`` (CD in the paper: 0.95, N = 40).
* fixed / progressive and adaptive / progressive (CT): ``N(k) = ceil(sqrt(k/K * ((s1 + 1)^2 - s0^2)
  + s0^2) - 1)``, at least 1, plus 1; the adaptive EMA is ``exp(-c / (N(k) - 1))`` with
  ``c = -log(start_ema) * s0`` (K = total_steps, s0/s1 = start/end scales).
* fixed / progdist: progressive distillation's halving schedule, EMA 1.0.

adaptive / fixed (and any other combination) is rejected when the function is created (the
reference raises ``NotImplementedError`` at the first call).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

TARGET_EMA_MODES = ("fixed", "adaptive")
SCALE_MODES = ("fixed", "progressive", "progdist")
_SUPPORTED = {("fixed", "fixed"), ("fixed", "progressive"), ("adaptive", "progressive"),
              ("fixed", "progdist")}

__all__ = ["SCALE_MODES", "TARGET_EMA_MODES", "create_ema_and_scales_fn"]


def create_ema_and_scales_fn(target_ema_mode: str, start_ema: float, scale_mode: str,
                             start_scales: int, end_scales: int, total_steps: int,
                             distill_steps_per_iter: int = 50000
                             ) -> Callable[[int], tuple[float, int]]:
    """``ema_and_scales_fn(step) -> (target_ema, num_scales)`` (see the module docstring).

    Raises:
      ValueError: unknown modes, an unsupported combination (e.g. adaptive / fixed), or
        non-positive scales / steps.
    """
    if target_ema_mode not in TARGET_EMA_MODES:
        raise ValueError(f"target_ema_mode must be one of {TARGET_EMA_MODES}, got "
                         f"{target_ema_mode!r}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if (target_ema_mode, scale_mode) not in _SUPPORTED:
        raise ValueError(f"target_ema_mode={target_ema_mode!r} with scale_mode={scale_mode!r} is "
                         f"not supported (the reference raises NotImplementedError); supported: "
                         f"{sorted(_SUPPORTED)}")
    if start_scales < 1 or end_scales < 1 or total_steps < 1 or distill_steps_per_iter < 1:
        raise ValueError("start_scales, end_scales, total_steps and distill_steps_per_iter must "
                         "be >= 1")
    if not 0.0 < start_ema <= 1.0:
        raise ValueError(f"start_ema must be in (0, 1], got {start_ema}")

    def progressive(step):
        scales = np.ceil(np.sqrt((step / total_steps) * ((end_scales + 1) ** 2 - start_scales ** 2)
                                 + start_scales ** 2) - 1).astype(np.int32)
        return np.maximum(scales, 1)

    def ema_and_scales_fn(step: int) -> tuple[float, int]:
        if target_ema_mode == "fixed" and scale_mode == "fixed":
            target_ema, scales = start_ema, start_scales
        elif target_ema_mode == "fixed" and scale_mode == "progressive":
            target_ema, scales = start_ema, progressive(step) + 1
        elif target_ema_mode == "adaptive" and scale_mode == "progressive":
            scales = progressive(step)
            c = -np.log(start_ema) * start_scales
            target_ema = np.exp(-c / scales)
            scales = scales + 1
        else:  # fixed / progdist
            distill_stage = step // distill_steps_per_iter
            scales = np.maximum(start_scales // (2 ** distill_stage), 2)
            sub_stage = np.maximum(step - distill_steps_per_iter * (np.log2(start_scales) - 1), 0)
            sub_stage = sub_stage // (distill_steps_per_iter * 2)
            with np.errstate(over="ignore"):  # 2 ** large -> inf -> 2 // inf = 0, as the reference
                sub_scales = np.maximum(2 // (2 ** sub_stage), 1)
            scales = np.where(scales == 2, sub_scales, scales)
            target_ema = 1.0
        return float(target_ema), int(scales)

    return ema_and_scales_fn
