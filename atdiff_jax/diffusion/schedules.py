"""Noise schedules and timestep respacing, numerically identical to guided-diffusion.

All tables are computed in float64 NumPy (as the reference does) and only cast to float32 when
they are gathered for a batch, which reproduces the reference's ``_extract_into_tensor``
(float64 gather, then ``.float()``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretises a continuous alpha_bar(t), t in [0, 1], into ``num_diffusion_timesteps`` betas."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas [T] (float64) of the ``"linear"`` (DDPM, scaled to T) or ``"cosine"`` (IDDPM) schedule."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"noise_schedule must be one of {SCHEDULES}, got {schedule_name!r}")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The set of original timesteps kept by a respacing.

    ``section_counts`` is either ``"ddimN"`` (a constant integer stride giving exactly N steps,
    as DDIM uses), a comma-separated string such as ``"10,5"`` or a list of ints: the T steps are
    cut into equal sections and each section is strided evenly to the given count.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad timestep_respacing {section_counts!r}: expected 'ddimN'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(
                f"timestep_respacing {section_counts!r}: cannot make exactly {desired} steps out of "
                f"{num_timesteps} with an integer stride")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"bad timestep_respacing {section_counts!r}: expected 'ddimN' or "
                             "comma-separated integers such as '10,5'") from None
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"timestep_respacing sections must be positive, got {section_counts}")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"timestep_respacing: cannot divide a section of {size} steps into "
                             f"{section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def respace_betas(betas: np.ndarray, use_timesteps: set[int] | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the respaced chain and its ``timestep_map`` (respaced index -> original step).

    The respaced chain has the same alpha_bar at each kept step as the original one.
    """
    use = set(int(t) for t in use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    last = 1.0
    new_betas, timestep_map = [], []
    for i, ac in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1.0 - ac / last)
            last = ac
            timestep_map.append(i)
    return np.asarray(new_betas, dtype=np.float64), np.asarray(timestep_map, dtype=np.int32)
