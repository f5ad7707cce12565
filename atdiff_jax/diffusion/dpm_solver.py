"""DPM-Solver and DPM-Solver++ (Lu et al. 2022) as pure, jittable JAX samplers.

This is an independent JAX re-implementation of the semantics of the public DPM-Solver code
(``dpm_solver_pytorch.py``), which the AT_Diff authors use for their "DPM-Solver" rows
(``scripts/image_dpm_solver_sample.py``):

    ns = NoiseScheduleVP('discrete', betas=cosine_betas)
    model_fn = model_wrapper(unet, ns, model_type="noise", guidance_type="uncond")  # first C channels
    DPM_Solver(model_fn, ns, algorithm_type="dpmsolver++").sample(
        x_T, steps=N, skip_type="logSNR", t_start=0.992, order=2, method="multistep",
        lower_order_final=True)                                      # t_end = 1 / total_N

The equivalent call here is::

    x0 = dpm_solver_sample(unet_fn, x_T, betas=cosine_betas, steps=N, t_start=0.992)

What is reproduced exactly (and tested against the reference vectors):

* The discrete VP schedule: ``log alpha_t`` is ``0.5 * cumsum(log(1 - beta))`` (float64, then
  float32), truncated where the half-log-SNR falls below -5.1 (the cosine schedule keeps
  ``total_N = 996`` of its 1000 steps), on the float32 time grid ``t_n = (n + 1) / total_N``;
  ``log alpha(t)`` is piecewise linear in ``t`` (linear extrapolation outside the grid).
* The discrete-time network is called at ``(t - 1 / total_N) * 1000`` (990.996 for t = 0.992).
* Time steps for ``skip_type`` "logSNR" / "time_uniform" / "time_quadratic", including the
  float32 rounding of ``torch.linspace``.
* The multistep order schedule: the first ``order - 1`` steps warm up with lower orders and, with
  ``lower_order_final``, the final steps lower the order **only when steps < 10** (as the
  reference does).  N = 10 therefore runs order 2 up to the end; N = 5 ends with an order-1 step.
* The float32 formulas of every update, in the reference's order of operations.

Structure: all time steps, orders and (for singlestep) ratios ``r1, r2`` are computed in Python /
NumPy before tracing (they only depend on static options); the solver loop is a ``lax.scan`` over
these per-step arrays, with ``lax.switch`` on the per-step order, so ``dpm_solver_sample`` jits as a
single function whose size does not grow with ``steps``.  Arrays are NHWC float32 (any
``[B, ..., C]`` layout with channels last works).

Not implemented: the adaptive-step method (``method="adaptive"``) and the continuous "linear"
VP-SDE schedule; the classifier-guidance ``guidance_type="classifier"``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")
ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++")
METHODS = ("multistep", "singlestep", "singlestep_fixed")
SOLVER_TYPES = ("dpmsolver", "taylor")
MODEL_TYPES = ("noise", "x_start", "v", "score")
GUIDANCE_TYPES = ("uncond", "classifier-free")


# ---------------------------------------------------------------------------------------------
# float32 helpers
# ---------------------------------------------------------------------------------------------

def torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num)`` (float32, CPU) bit for bit, as a NumPy array [num].

    torch computes ``step = float32(end - start) / (num - 1)`` in float32, then fills the first
    half as ``start + step * i`` and the second half as ``end - step * (num - 1 - i)``, each with a
    single rounding (an FMA).  The product of a float32 and an integer below 2**24 is exact in
    float64, so rounding the float64 result once reproduces it.
    """
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    if num == 1:
        return np.asarray([start32], dtype=np.float32)
    step = f32(f32(end32 - start32) / f32(num - 1))
    idx = np.arange(num, dtype=np.float64)
    lo = np.float64(start32) + np.float64(step) * idx
    hi = np.float64(end32) - np.float64(step) * (num - 1 - idx)
    return np.where(np.arange(num) < num // 2, lo, hi).astype(np.float32)


def interpolate_fn(x: Array, xp: Array, yp: Array) -> Array:
    """Piecewise-linear ``y = f(x)`` through the keypoints ``(xp, yp)``, extrapolated linearly.

    Same function as the reference's ``interpolate_fn`` (for one channel): ``x`` in
    ``[xp[k-1], xp[k]]`` uses that segment; below ``xp[0]`` the first segment and above
    ``xp[-1]`` the last one.  A tie ``x == xp[k]`` uses the segment that ends at ``xp[k]``
    (the reference sorts ``x`` before equal keypoints).

    Args:
      x: any shape, float32.
      xp: [K] strictly increasing keypoints, K >= 2.
      yp: [K] values.
    Returns:
      f(x), same shape as ``x``, float32.
    """
    x = jnp.asarray(x, jnp.float32)
    xp = jnp.asarray(xp, jnp.float32)
    yp = jnp.asarray(yp, jnp.float32)
    k = xp.shape[0]
    pos = jnp.searchsorted(xp, x, side="left", method="compare_all")
    seg = jnp.clip(pos - 1, 0, k - 2)
    start_x, end_x = xp[seg], xp[seg + 1]
    start_y, end_y = yp[seg], yp[seg + 1]
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


# ---------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------

class NoiseScheduleVP:
    """Discrete-time VP noise schedule seen as a continuous function of ``t`` in ``(0, 1]``.

    ``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)`` with ``alpha_t^2 + sigma_t^2 = 1``;
    ``lambda_t = log(alpha_t / sigma_t)`` is the half log-SNR.  Discrete step ``n`` (0-based) of a
    schedule with ``total_N`` steps sits at ``t_n = (n + 1) / total_N``.

    Attributes:
      t_array: [total_N] float32 NumPy, the time grid (``torch.linspace(0, 1, total_N + 1)[1:]``).
      log_alpha_array: [total_N] float32 NumPy, ``log alpha`` at the grid points.
      total_N: number of grid points kept after the log-SNR clipping.
      T: 1.0, the end of the time range.

    All ``marginal_*`` methods accept a jnp/NumPy array or Python float of any shape (time, no
    unit) and return float32 jnp arrays of the same shape.  They are traceable.
    """

    schedule = "discrete"
    T = 1.0

    def __init__(self, betas: Array | None = None, *, alphas_cumprod: Array | None = None,
                 clipped_lambda: float = -5.1):
        """Builds the tables from ``betas`` [T] or ``alphas_cumprod`` [T] (float64 NumPy math).

        Trailing steps whose half log-SNR is below ``clipped_lambda`` are dropped (the
        reference's ``numerical_clip_alpha``; -5.1 as in the reference).
        """
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("NoiseScheduleVP needs exactly one of betas= or alphas_cumprod=")
        src = betas if betas is not None else alphas_cumprod
        if isinstance(src, jax.core.Tracer):
            raise ValueError("NoiseScheduleVP: betas/alphas_cumprod must be concrete arrays "
                             "(close over them, do not pass them as traced jit arguments)")
        src = np.asarray(src, dtype=np.float64)
        if src.ndim != 1 or src.shape[0] < 2:
            raise ValueError(f"betas/alphas_cumprod must be 1-D with >= 2 entries, got shape "
                             f"{src.shape}")
        if betas is not None:
            if np.any(src <= 0) or np.any(src >= 1):
                raise ValueError("betas must lie in (0, 1)")
            log_alphas = 0.5 * np.cumsum(np.log(1.0 - src))
        else:
            if np.any(src <= 0) or np.any(src >= 1):
                raise ValueError("alphas_cumprod must lie in (0, 1)")
            log_alphas = 0.5 * np.log(src)
        # numerical_clip_alpha: drop the tail where lambda < clipped_lambda.
        log_sigmas = 0.5 * np.log(1.0 - np.exp(2.0 * log_alphas))
        lambs = log_alphas - log_sigmas
        idx = int(np.searchsorted(lambs[::-1], clipped_lambda, side="left"))
        if idx > 0:
            log_alphas = log_alphas[:-idx]
        if log_alphas.shape[0] < 2:
            raise ValueError("fewer than 2 schedule steps left after the log-SNR clipping")
        self.log_alpha_array = log_alphas.astype(np.float32)
        self.total_N = int(self.log_alpha_array.shape[0])
        self.t_array = torch_linspace_f32(0.0, 1.0, self.total_N + 1)[1:]
        # jnp copies of the tables: closed over by jitted code they become one shared constant
        # argument instead of literals repeated at every interpolation (faster compiles).
        # (Built eagerly even when the schedule is created while tracing, so no tracer leaks.)
        with jax.ensure_compile_time_eval():
            self._t_jnp = jnp.asarray(self.t_array)
            self._log_alpha_jnp = jnp.asarray(self.log_alpha_array)
            # Tables for inverse_lambda: log_alpha decreases in t; flip to make it increasing.
            self._log_alpha_flipped = jnp.asarray(self.log_alpha_array[::-1])
            self._t_flipped = jnp.asarray(self.t_array[::-1])

    def marginal_log_mean_coeff(self, t: Array) -> Array:
        """``log alpha_t``: piecewise-linear interpolation of ``log_alpha_array`` in ``t``."""
        return interpolate_fn(t, self._t_jnp, self._log_alpha_jnp)

    def marginal_alpha(self, t: Array) -> Array:
        """``alpha_t = exp(log alpha_t)``."""
        return jnp.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: Array) -> Array:
        """``sigma_t = sqrt(1 - alpha_t^2)`` (computed as the reference does, in float32)."""
        return jnp.sqrt(1.0 - jnp.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: Array) -> Array:
        """Half log-SNR ``lambda_t = log alpha_t - log sigma_t``."""
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * jnp.log(1.0 - jnp.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb: Array) -> Array:
        """The time ``t`` whose half log-SNR is ``lamb`` (piecewise linear in ``log alpha``)."""
        lamb = jnp.asarray(lamb, jnp.float32)
        log_alpha = -0.5 * jnp.logaddexp(jnp.zeros_like(lamb), -2.0 * lamb)
        return interpolate_fn(log_alpha, self._log_alpha_flipped, self._t_flipped)

    def model_input_time(self, t: Array) -> Array:
        """Time label for a network trained on steps 0..999: ``(t - 1 / total_N) * 1000``."""
        return (jnp.asarray(t, jnp.float32) - 1.0 / self.total_N) * 1000.0


@functools.lru_cache(maxsize=16)
def _cached_schedule(key: bytes, n: int) -> NoiseScheduleVP:
    return NoiseScheduleVP(np.frombuffer(key, dtype=np.float64, count=n))


def schedule_from_betas(betas: Array) -> NoiseScheduleVP:
    """A (cached) :class:`NoiseScheduleVP` for the betas [T] of a discrete-time model."""
    if isinstance(betas, jax.core.Tracer):
        raise ValueError("betas must be a concrete array (close over it, e.g. with "
                         "functools.partial), not a traced jit argument")
    b = np.ascontiguousarray(np.asarray(betas, dtype=np.float64))
    if b.ndim != 1:
        raise ValueError(f"betas must be 1-D, got shape {b.shape}")
    return _cached_schedule(b.tobytes(), b.shape[0])


# ---------------------------------------------------------------------------------------------
# Model wrapper
# ---------------------------------------------------------------------------------------------

def model_wrapper(model_fn: Callable[..., Array], noise_schedule: NoiseScheduleVP, *,
                  model_type: str = "noise", guidance_type: str = "uncond",
                  condition: Array | None = None, unconditional_condition: Array | None = None,
                  guidance_scale: float = 1.0) -> Callable[[Array, Array], Array]:
    """Turns a discrete-time network into the continuous-time noise predictor DPM-Solver needs.

    Args:
      model_fn: the network.  ``guidance_type="uncond"``: ``model_fn(x, t_input) -> out`` with
        ``x`` [B, H, W, C] float32 and ``t_input`` [B] float32 discrete time labels
        (``(t - 1/total_N) * 1000``, fractional).  A class-conditional model is sampled by closing
        over its labels, e.g. ``lambda x, t: unet(x, t, y)``.  ``guidance_type="classifier-free"``:
        ``model_fn(x, t_input, cond) -> out``, where ``cond`` is ``condition`` (or
        ``unconditional_condition``), batched like ``x``.  ``out`` is [B, H, W, C] or, for a
        learned-sigma network, [B, H, W, 2C]; only the first C channels are used.
      noise_schedule: the :class:`NoiseScheduleVP`.
      model_type: what the first C channels are: "noise" (eps), "x_start", "v" or "score".
      guidance_type: "uncond" or "classifier-free".
      condition, unconditional_condition: labels for classifier-free guidance.
      guidance_scale: classifier-free guidance weight w: ``eps_u + w (eps_c - eps_u)``.  With
        ``w == 1`` or no ``unconditional_condition`` only the conditional model is evaluated
        (the authors' class-conditional setting is w = 1, i.e. plain conditional sampling).
    Returns:
      ``noise_fn(x, t_continuous) -> eps`` with ``x`` [B, ..., C], ``t_continuous`` a scalar or
      [B] (in ``(0, 1]``), ``eps`` [B, ..., C] float32.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"guidance_type must be one of {GUIDANCE_TYPES}, got {guidance_type!r}")
    if guidance_type == "classifier-free" and condition is None:
        raise ValueError("guidance_type='classifier-free' needs condition=")
    ns = noise_schedule

    def expand(v, x):
        v = jnp.asarray(v, jnp.float32)
        if v.ndim == 0:
            return v
        return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))

    def noise_pred(x, t_continuous, cond=None):
        t_vec = jnp.broadcast_to(jnp.asarray(t_continuous, jnp.float32), (x.shape[0],))
        t_input = ns.model_input_time(t_vec)
        out = model_fn(x, t_input) if cond is None else model_fn(x, t_input, cond)
        c = x.shape[-1]
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (c, 2 * c):
            raise ValueError(f"model output shape {out.shape} does not fit x {x.shape}: expected "
                             f"C={c} or 2C={2 * c} channels (channels last)")
        out = out[..., :c].astype(jnp.float32)
        if model_type == "noise":
            return out
        if model_type == "x_start":
            alpha_t, sigma_t = ns.marginal_alpha(t_vec), ns.marginal_std(t_vec)
            return (x - expand(alpha_t, x) * out) / expand(sigma_t, x)
        if model_type == "v":
            alpha_t, sigma_t = ns.marginal_alpha(t_vec), ns.marginal_std(t_vec)
            return expand(alpha_t, x) * out + expand(sigma_t, x) * x
        sigma_t = ns.marginal_std(t_vec)  # score
        return -expand(sigma_t, x) * out

    def noise_fn(x, t_continuous):
        if guidance_type == "uncond":
            return noise_pred(x, t_continuous)
        if guidance_scale == 1.0 or unconditional_condition is None:
            return noise_pred(x, t_continuous, cond=condition)
        x_in = jnp.concatenate([x, x], axis=0)
        t = jnp.broadcast_to(jnp.asarray(t_continuous, jnp.float32), (x.shape[0],))
        c_in = jnp.concatenate([jnp.asarray(unconditional_condition), jnp.asarray(condition)], 0)
        noise_uncond, noise = jnp.split(noise_pred(x_in, jnp.concatenate([t, t]), cond=c_in), 2)
        return noise_uncond + guidance_scale * (noise - noise_uncond)

    return noise_fn


# ---------------------------------------------------------------------------------------------
# Time steps and orders (static, computed before tracing)
# ---------------------------------------------------------------------------------------------

def _concrete(fn, x) -> np.ndarray:
    """Evaluates the elementwise schedule function ``fn`` on concrete ``x``, even while tracing.

    Returns a float32 NumPy array shaped like ``x``.  ``fn`` runs as a cached ``jax.jit`` on a
    zero-padded vector of 64k entries, so precomputing time steps for many step counts costs one
    compilation instead of one per shape and per op.
    """
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    size = max(64, -(-flat.shape[0] // 64) * 64)
    padded = np.zeros(size, np.float32)
    padded[:flat.shape[0]] = flat
    with jax.ensure_compile_time_eval():
        out = np.asarray(_jitted(fn)(padded), dtype=np.float32)
    return out[:flat.shape[0]].reshape(x.shape)


@functools.lru_cache(maxsize=64)
def _jitted(fn):
    return jax.jit(fn)


def get_time_steps(noise_schedule: NoiseScheduleVP, skip_type: str, t_T: float, t_0: float,
                   N: int) -> np.ndarray:
    """The N + 1 decreasing time steps from ``t_T`` to ``t_0``, float32 NumPy [N + 1].

    "logSNR": uniform in half log-SNR (then mapped back with ``inverse_lambda``, so the ends are
    only approximately ``t_T`` and ``t_0``); "time_uniform": uniform in t; "time_quadratic":
    uniform in sqrt(t).  Float32 rounding as in the reference.
    """
    if skip_type == "logSNR":
        ns = noise_schedule
        lambda_T, lambda_0 = _concrete(ns.marginal_lambda, np.float32([t_T, t_0]))
        lambdas = torch_linspace_f32(lambda_T, lambda_0, N + 1)
        return _concrete(ns.inverse_lambda, lambdas)
    if skip_type == "time_uniform":
        return torch_linspace_f32(t_T, t_0, N + 1)
    if skip_type == "time_quadratic":
        t = torch_linspace_f32(t_T ** 0.5, t_0 ** 0.5, N + 1)
        return (t * t).astype(np.float32)
    raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")


def multistep_orders(steps: int, order: int, lower_order_final: bool = True) -> tuple[int, ...]:
    """Solver order of each of the ``steps`` multistep updates (step 1 .. steps).

    Warm-up: step k < order uses order k.  With ``lower_order_final`` and ``steps < 10`` (only
    then, as in the reference) step k uses ``min(order, steps + 1 - k)``.  E.g. order 2:
    steps=10 -> (1, 2, ..., 2); steps=5 -> (1, 2, 2, 2, 1).
    """
    orders = []
    for k in range(1, steps + 1):
        if k < order:
            orders.append(k)
        elif lower_order_final and steps < 10:
            orders.append(min(order, steps + 1 - k))
        else:
            orders.append(order)
    return tuple(orders)


def singlestep_orders_and_timesteps(noise_schedule: NoiseScheduleVP, steps: int, order: int,
                                    skip_type: str, t_T: float, t_0: float,
                                    method: str = "singlestep"
                                    ) -> tuple[tuple[int, ...], np.ndarray]:
    """Orders [K] and outer time steps [K + 1] of the singlestep ("DPM-Solver-fast") schedule.

    ``method="singlestep"`` spends exactly ``steps`` evaluations: order 3 -> K = steps // 3 + 1
    steps ending with (2, 1), (1) or (2); order 2 -> (2, ..., 2[, 1]); order 1 -> steps x 1.
    ``method="singlestep_fixed"`` uses ``steps // order`` steps of order ``order``.
    (For order 1 with "logSNR", the reference requests only one outer interval and fails; here
    it uses ``steps`` intervals.)
    """
    if method == "singlestep_fixed":
        orders = (order,) * (steps // order)
        return orders, get_time_steps(noise_schedule, skip_type, t_T, t_0, len(orders))
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            orders = [3] * (k - 2) + [2, 1]
        elif steps % 3 == 1:
            orders = [3] * (k - 1) + [1]
        else:
            orders = [3] * (k - 1) + [2]
    elif order == 2:
        orders = [2] * (steps // 2) + ([1] if steps % 2 else [])
    else:
        orders = [1] * steps
    if skip_type == "logSNR":
        outer = get_time_steps(noise_schedule, skip_type, t_T, t_0, len(orders))
    else:
        outer = get_time_steps(noise_schedule, skip_type, t_T, t_0, steps)[
            np.cumsum([0] + orders)]
    return tuple(orders), outer


# ---------------------------------------------------------------------------------------------
# Solver updates (pure; s, t, r1, r2 are float32 scalars, x and model values [B, ..., C])
# ---------------------------------------------------------------------------------------------

class _Coeffs:
    """Schedule quantities at one time, computed as the reference computes them."""

    def __init__(self, ns: NoiseScheduleVP, t: Array):
        # One interpolation; the same float32 formulas as marginal_lambda / marginal_std.
        self.log_alpha = ns.marginal_log_mean_coeff(t)
        one_minus_alpha2 = 1.0 - jnp.exp(2.0 * self.log_alpha)
        self.lam = self.log_alpha - 0.5 * jnp.log(one_minus_alpha2)
        self.sigma = jnp.sqrt(one_minus_alpha2)
        self.alpha = jnp.exp(self.log_alpha)


def first_update(ns: NoiseScheduleVP, x: Array, s: Array, t: Array, model_s: Array, *,
                 algorithm_type: str) -> Array:
    """DPM-Solver-1 (= DDIM, eta 0) from time ``s`` to ``t`` with the model value at ``s``.

    ``model_s`` is x0 (dpmsolver++) or eps (dpmsolver) at (x, s).  Returns x_t, shape of x.
    """
    cs, ct = _Coeffs(ns, s), _Coeffs(ns, t)
    h = ct.lam - cs.lam
    if algorithm_type == "dpmsolver++":
        phi_1 = jnp.expm1(-h)
        return ct.sigma / cs.sigma * x - ct.alpha * phi_1 * model_s
    phi_1 = jnp.expm1(h)
    return jnp.exp(ct.log_alpha - cs.log_alpha) * x - (ct.sigma * phi_1) * model_s


def multistep_second_update(ns: NoiseScheduleVP, x: Array, model_prev: Sequence[Array],
                            t_prev: Sequence[Array], t: Array, *, algorithm_type: str,
                            solver_type: str = "dpmsolver") -> Array:
    """Multistep DPM-Solver-2 from ``t_prev[-1]`` to ``t`` using the last two model values."""
    m1, m0 = model_prev[-2], model_prev[-1]
    c1, c0, ct = _Coeffs(ns, t_prev[-2]), _Coeffs(ns, t_prev[-1]), _Coeffs(ns, t)
    h_0 = c0.lam - c1.lam
    h = ct.lam - c0.lam
    r0 = h_0 / h
    d1_0 = (1.0 / r0) * (m0 - m1)
    if algorithm_type == "dpmsolver++":
        phi_1 = jnp.expm1(-h)
        if solver_type == "dpmsolver":
            return ((ct.sigma / c0.sigma) * x - (ct.alpha * phi_1) * m0
                    - 0.5 * (ct.alpha * phi_1) * d1_0)
        return ((ct.sigma / c0.sigma) * x - (ct.alpha * phi_1) * m0
                + (ct.alpha * (phi_1 / h + 1.0)) * d1_0)
    phi_1 = jnp.expm1(h)
    if solver_type == "dpmsolver":
        return (jnp.exp(ct.log_alpha - c0.log_alpha) * x - (ct.sigma * phi_1) * m0
                - 0.5 * (ct.sigma * phi_1) * d1_0)
    return (jnp.exp(ct.log_alpha - c0.log_alpha) * x - (ct.sigma * phi_1) * m0
            - (ct.sigma * (phi_1 / h - 1.0)) * d1_0)


def multistep_third_update(ns: NoiseScheduleVP, x: Array, model_prev: Sequence[Array],
                           t_prev: Sequence[Array], t: Array, *, algorithm_type: str,
                           solver_type: str = "dpmsolver") -> Array:
    """Multistep DPM-Solver-3 from ``t_prev[-1]`` to ``t`` using the last three model values.

    (As in the reference, ``solver_type`` does not change the third-order multistep update.)
    """
    del solver_type
    m2, m1, m0 = model_prev[-3], model_prev[-2], model_prev[-1]
    c2, c1, c0 = _Coeffs(ns, t_prev[-3]), _Coeffs(ns, t_prev[-2]), _Coeffs(ns, t_prev[-1])
    ct = _Coeffs(ns, t)
    h_1 = c1.lam - c2.lam
    h_0 = c0.lam - c1.lam
    h = ct.lam - c0.lam
    r0, r1 = h_0 / h, h_1 / h
    d1_0 = (1.0 / r0) * (m0 - m1)
    d1_1 = (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    if algorithm_type == "dpmsolver++":
        phi_1 = jnp.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return ((ct.sigma / c0.sigma) * x - (ct.alpha * phi_1) * m0
                + (ct.alpha * phi_2) * d1 - (ct.alpha * phi_3) * d2)
    phi_1 = jnp.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return (jnp.exp(ct.log_alpha - c0.log_alpha) * x - (ct.sigma * phi_1) * m0
            - (ct.sigma * phi_2) * d1 - (ct.sigma * phi_3) * d2)


def multistep_update(ns: NoiseScheduleVP, x: Array, model_prev: Sequence[Array],
                     t_prev: Sequence[Array], t: Array, order: int, *, algorithm_type: str,
                     solver_type: str = "dpmsolver") -> Array:
    """Multistep update of (static) ``order`` 1, 2 or 3; uses the last ``order`` history items."""
    if order == 1:
        return first_update(ns, x, t_prev[-1], t, model_prev[-1], algorithm_type=algorithm_type)
    if order == 2:
        return multistep_second_update(ns, x, model_prev, t_prev, t,
                                       algorithm_type=algorithm_type, solver_type=solver_type)
    if order == 3:
        return multistep_third_update(ns, x, model_prev, t_prev, t,
                                      algorithm_type=algorithm_type, solver_type=solver_type)
    raise ValueError(f"solver order must be 1, 2 or 3, got {order}")


def singlestep_update(ns: NoiseScheduleVP, model: Callable[[Array, Array], Array], x: Array,
                      s: Array, t: Array, order: int, r1: Array, r2: Array, *,
                      algorithm_type: str, solver_type: str = "dpmsolver") -> Array:
    """Singlestep DPM-Solver-``order`` from ``s`` to ``t`` (``order`` model evaluations).

    ``model(x, t)`` returns x0 (dpmsolver++) or eps (dpmsolver); ``r1`` (order >= 2) and ``r2``
    (order 3) place the intermediate points at ``lambda_s + r * h``.
    """
    model_s = model(x, s)
    if order == 1:
        return first_update(ns, x, s, t, model_s, algorithm_type=algorithm_type)
    cs, ct = _Coeffs(ns, s), _Coeffs(ns, t)
    h = ct.lam - cs.lam
    s1 = ns.inverse_lambda(cs.lam + r1 * h)
    c1 = _Coeffs(ns, s1)
    pp = algorithm_type == "dpmsolver++"
    if order == 2:
        if pp:
            phi_11 = jnp.expm1(-r1 * h)
            phi_1 = jnp.expm1(-h)
            x_s1 = (c1.sigma / cs.sigma) * x - (c1.alpha * phi_11) * model_s
            model_s1 = model(x_s1, s1)
            if solver_type == "dpmsolver":
                return ((ct.sigma / cs.sigma) * x - (ct.alpha * phi_1) * model_s
                        - (0.5 / r1) * (ct.alpha * phi_1) * (model_s1 - model_s))
            return ((ct.sigma / cs.sigma) * x - (ct.alpha * phi_1) * model_s
                    + (1.0 / r1) * (ct.alpha * (phi_1 / h + 1.0)) * (model_s1 - model_s))
        phi_11 = jnp.expm1(r1 * h)
        phi_1 = jnp.expm1(h)
        x_s1 = jnp.exp(c1.log_alpha - cs.log_alpha) * x - (c1.sigma * phi_11) * model_s
        model_s1 = model(x_s1, s1)
        if solver_type == "dpmsolver":
            return (jnp.exp(ct.log_alpha - cs.log_alpha) * x - (ct.sigma * phi_1) * model_s
                    - (0.5 / r1) * (ct.sigma * phi_1) * (model_s1 - model_s))
        return (jnp.exp(ct.log_alpha - cs.log_alpha) * x - (ct.sigma * phi_1) * model_s
                - (1.0 / r1) * (ct.sigma * (phi_1 / h - 1.0)) * (model_s1 - model_s))
    if order != 3:
        raise ValueError(f"solver order must be 1, 2 or 3, got {order}")
    s2 = ns.inverse_lambda(cs.lam + r2 * h)
    c2 = _Coeffs(ns, s2)
    if pp:
        phi_11 = jnp.expm1(-r1 * h)
        phi_12 = jnp.expm1(-r2 * h)
        phi_1 = jnp.expm1(-h)
        phi_22 = jnp.expm1(-r2 * h) / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        x_s1 = (c1.sigma / cs.sigma) * x - (c1.alpha * phi_11) * model_s
        model_s1 = model(x_s1, s1)
        x_s2 = ((c2.sigma / cs.sigma) * x - (c2.alpha * phi_12) * model_s
                + r2 / r1 * (c2.alpha * phi_22) * (model_s1 - model_s))
        model_s2 = model(x_s2, s2)
        if solver_type == "dpmsolver":
            return ((ct.sigma / cs.sigma) * x - (ct.alpha * phi_1) * model_s
                    + (1.0 / r2) * (ct.alpha * phi_2) * (model_s2 - model_s))
        d1_0 = (1.0 / r1) * (model_s1 - model_s)
        d1_1 = (1.0 / r2) * (model_s2 - model_s)
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return ((ct.sigma / cs.sigma) * x - (ct.alpha * phi_1) * model_s
                + (ct.alpha * phi_2) * d1 - (ct.alpha * phi_3) * d2)
    phi_11 = jnp.expm1(r1 * h)
    phi_12 = jnp.expm1(r2 * h)
    phi_1 = jnp.expm1(h)
    phi_22 = jnp.expm1(r2 * h) / (r2 * h) - 1.0
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    x_s1 = jnp.exp(c1.log_alpha - cs.log_alpha) * x - (c1.sigma * phi_11) * model_s
    model_s1 = model(x_s1, s1)
    x_s2 = (jnp.exp(c2.log_alpha - cs.log_alpha) * x - (c2.sigma * phi_12) * model_s
            - r2 / r1 * (c2.sigma * phi_22) * (model_s1 - model_s))
    model_s2 = model(x_s2, s2)
    if solver_type == "dpmsolver":
        return (jnp.exp(ct.log_alpha - cs.log_alpha) * x - (ct.sigma * phi_1) * model_s
                - (1.0 / r2) * (ct.sigma * phi_2) * (model_s2 - model_s))
    d1_0 = (1.0 / r1) * (model_s1 - model_s)
    d1_1 = (1.0 / r2) * (model_s2 - model_s)
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    return (jnp.exp(ct.log_alpha - cs.log_alpha) * x - (ct.sigma * phi_1) * model_s
            - (ct.sigma * phi_2) * d1 - (ct.sigma * phi_3) * d2)


def dynamic_thresholding(x0: Array, *, ratio: float = 0.995, max_val: float = 1.0) -> Array:
    """Imagen's dynamic thresholding of an x0 prediction [B, ...] (the reference's variant)."""
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.quantile(flat, ratio, axis=1)
    s = jnp.maximum(s, max_val).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

def _check_options(*, steps, order, skip_type, method, algorithm_type, solver_type, t_start,
                   t_end, total_N):
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} ('adaptive' is not implemented), "
                         f"got {method!r}")
    if algorithm_type not in ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type must be one of {ALGORITHM_TYPES}, got "
                         f"{algorithm_type!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if method in ("multistep", "singlestep_fixed") and steps < order:
        raise ValueError(f"method={method!r} needs steps >= order, got steps={steps}, "
                         f"order={order}")
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if isinstance(v, jax.core.Tracer) or not np.isscalar(v):
            raise ValueError(f"{name} must be a Python float, got {v!r}")
    if not 0.0 < t_end < t_start <= 1.0:
        raise ValueError(f"need 0 < t_end < t_start <= 1, got t_start={t_start}, t_end={t_end} "
                         f"(the discrete schedule covers [1/{total_N}, 1])")


def sample_with_noise_fn(noise_fn: Callable[[Array, Array], Array], x_T: Array,
                         noise_schedule: NoiseScheduleVP, *, steps: int, order: int = 2,
                         skip_type: str = "logSNR", method: str = "multistep",
                         lower_order_final: bool = True, t_start: float | None = None,
                         t_end: float | None = None, algorithm_type: str = "dpmsolver++",
                         solver_type: str = "dpmsolver", denoise_to_zero: bool = False,
                         correcting_x0_fn: Callable[[Array, Array], Array] | str | None = None,
                         return_intermediates: bool = False):
    """DPM-Solver(++) with a continuous-time noise predictor ``noise_fn(x, t) -> eps``.

    Same options as :func:`dpm_solver_sample` (which wraps a discrete-time network with
    :func:`model_wrapper` and calls this).  ``noise_fn`` receives ``t`` as a [B] float32 array.
    """
    ns = noise_schedule
    t_0 = 1.0 / ns.total_N if t_end is None else float(t_end)
    t_T = ns.T if t_start is None else float(t_start)
    _check_options(steps=steps, order=order, skip_type=skip_type, method=method,
                   algorithm_type=algorithm_type, solver_type=solver_type, t_start=t_T,
                   t_end=t_0, total_N=ns.total_N)
    if correcting_x0_fn == "dynamic_thresholding":
        correcting_x0_fn = lambda x0, t: dynamic_thresholding(x0)  # noqa: E731
    elif isinstance(correcting_x0_fn, str):
        raise ValueError(f"correcting_x0_fn must be a callable, None or 'dynamic_thresholding', "
                         f"got {correcting_x0_fn!r}")
    if correcting_x0_fn is not None and algorithm_type != "dpmsolver++":
        raise ValueError("correcting_x0_fn needs algorithm_type='dpmsolver++'")

    x = jnp.asarray(x_T, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x_T must be batched [B, ..., C], got shape {x.shape}")
    batch = x.shape[0]

    def data_pred(x, t):
        noise = noise_fn(x, jnp.broadcast_to(t, (batch,))).astype(jnp.float32)
        alpha_t, sigma_t = ns.marginal_alpha(t), ns.marginal_std(t)
        x0 = (x - sigma_t * noise) / alpha_t
        if correcting_x0_fn is not None:
            x0 = correcting_x0_fn(x0, t)
        return x0

    def model(x, t):
        if algorithm_type == "dpmsolver++":
            return data_pred(x, t)
        return noise_fn(x, jnp.broadcast_to(t, (batch,))).astype(jnp.float32)

    upd = dict(algorithm_type=algorithm_type, solver_type=solver_type)
    intermediates = [x[None]] if return_intermediates else None

    if method == "multistep":
        timesteps = get_time_steps(ns, skip_type, t_T, t_0, steps)
        orders = multistep_orders(steps, order, lower_order_final)
        ts = jnp.asarray(timesteps)
        t0 = ts[0]
        m0 = model(x, t0)
        # History buffers hold the last `order` model values / times, newest last.  Before
        # `order` values exist, the warm-up orders only read the valid (newest) entries.
        hist_m = jnp.stack([m0] * order)
        hist_t = jnp.stack([t0] * order)

        def update(order_k, x, hist_m, hist_t, t):
            return multistep_update(ns, x, [hist_m[i] for i in range(order)],
                                    [hist_t[i] for i in range(order)], t, order_k, **upd)

        def body(carry, inp):
            x, hist_m, hist_t = carry
            t, order_idx = inp
            branches = [functools.partial(update, k) for k in range(1, order + 1)]
            if order == 1:
                x = branches[0](x, hist_m, hist_t, t)
            else:
                x = jax.lax.switch(order_idx, branches, x, hist_m, hist_t, t)
            m = model(x, t)
            hist_m = jnp.concatenate([hist_m[1:], m[None]], axis=0)
            hist_t = jnp.concatenate([hist_t[1:], t[None]], axis=0)
            return (x, hist_m, hist_t), (x if return_intermediates else None)

        # Steps 1 .. steps-1 evaluate the model after the update; the last step does not.
        xs = (ts[1:steps], jnp.asarray(np.asarray(orders[:-1], np.int32) - 1))
        (x, hist_m, hist_t), ys = jax.lax.scan(body, (x, hist_m, hist_t), xs)
        x = update(orders[-1], x, hist_m, hist_t, ts[steps])
        if return_intermediates:
            intermediates += [ys, x[None]]
    else:
        orders, outer = singlestep_orders_and_timesteps(ns, steps, order, skip_type, t_T, t_0,
                                                        method)
        if not orders:
            raise ValueError(f"steps={steps} gives no singlestep steps of order {order}")
        r1s = np.zeros(len(orders), np.float32)
        r2s = np.zeros(len(orders), np.float32)
        for i, o in enumerate(orders):
            if o == 1:
                continue
            inner = get_time_steps(ns, skip_type, float(outer[i]), float(outer[i + 1]), o)
            lam = _concrete(ns.marginal_lambda, inner)
            h = np.float32(lam[-1] - lam[0])
            r1s[i] = np.float32(lam[1] - lam[0]) / h
            if o == 3:
                r2s[i] = np.float32(lam[2] - lam[0]) / h
        # One scan per run of equal orders (at most 3 runs: e.g. 3, ..., 3, 2, 1).
        start = 0
        while start < len(orders):
            o = orders[start]
            stop = start
            while stop < len(orders) and orders[stop] == o:
                stop += 1

            def body(x, inp, o=o):
                s, t, r1, r2 = inp
                x = singlestep_update(ns, model, x, s, t, o, r1, r2, **upd)
                return x, (x if return_intermediates else None)

            xs = tuple(jnp.asarray(a) for a in (outer[start:stop], outer[start + 1:stop + 1],
                                                 r1s[start:stop], r2s[start:stop]))
            x, ys = jax.lax.scan(body, x, xs)
            if return_intermediates:
                intermediates.append(ys)
            start = stop

    if denoise_to_zero:
        x = data_pred(x, jnp.float32(t_0))
        if return_intermediates:
            intermediates.append(x[None])
    if return_intermediates:
        return x, jnp.concatenate(intermediates, axis=0)
    return x


def dpm_solver_sample(model_fn: Callable[..., Array], x_T: Array, *,
                      betas: Array | None = None,
                      noise_schedule: NoiseScheduleVP | None = None,
                      steps: int, order: int = 2, skip_type: str = "logSNR",
                      method: str = "multistep", lower_order_final: bool = True,
                      t_start: float | None = None, t_end: float | None = None,
                      algorithm_type: str = "dpmsolver++", solver_type: str = "dpmsolver",
                      denoise_to_zero: bool = False, model_type: str = "noise",
                      guidance_type: str = "uncond", condition: Array | None = None,
                      unconditional_condition: Array | None = None,
                      guidance_scale: float = 1.0,
                      correcting_x0_fn: Callable[[Array, Array], Array] | str | None = None,
                      return_intermediates: bool = False):
    """Samples with DPM-Solver / DPM-Solver++ from a discrete-time diffusion network.

    Jittable as one function: close over ``model_fn``, ``betas`` and all options, e.g.
    ``jax.jit(functools.partial(dpm_solver_sample, unet_fn, betas=betas, steps=10,
    t_start=0.992))(x_T)``.  The loop is a ``lax.scan`` (no Python loop over steps is traced);
    ``steps`` and every option except ``x_T`` / ``condition`` are static Python values.

    Args:
      model_fn: ``model_fn(x [B,H,W,C], t_input [B] float32) -> out [B,H,W,C or 2C]`` with
        ``t_input = (t - 1/total_N) * 1000`` (see :func:`model_wrapper`; a class-conditional
        model is used by closing over its labels, or via ``guidance_type="classifier-free"``).
      x_T: [B, H, W, C] starting noise at ``t_start`` (float32).
      betas: [T] betas of the training schedule (concrete; e.g. cosine, T = 1000).
      noise_schedule: alternatively, a prebuilt :class:`NoiseScheduleVP`.
      steps: number of solver steps; NFE = steps for "multistep"/"singlestep" (+1 with
        ``denoise_to_zero``).
      order: 1, 2 or 3.
      skip_type: "logSNR" (the authors' choice), "time_uniform" or "time_quadratic".
      method: "multistep" (the authors' choice), "singlestep" or "singlestep_fixed".
      lower_order_final: lower the order of the last steps (only acts when steps < 10).
      t_start: start time in (0, 1] (default 1.0; the authors use 0.992).
      t_end: end time (default 1 / total_N).
      algorithm_type: "dpmsolver++" (data prediction) or "dpmsolver" (noise prediction).
      solver_type: "dpmsolver" or "taylor" (second/third-order correction form).
      denoise_to_zero: finish with one extra data prediction at ``t_end``.
      model_type, guidance_type, condition, unconditional_condition, guidance_scale: see
        :func:`model_wrapper`.
      correcting_x0_fn: optional ``f(x0, t) -> x0`` (or "dynamic_thresholding"), dpmsolver++
        only; the authors use none.
      return_intermediates: also return the states after each step.
    Returns:
      x0 [B, H, W, C] float32 at ``t_end``; with ``return_intermediates`` a pair
      ``(x0, xs)`` where ``xs`` is [n + 1, B, H, W, C]: ``x_T`` then the state after each of the
      n solver steps (n = steps for multistep; the number of outer steps for singlestep; one
      more with ``denoise_to_zero``).
    Raises:
      ValueError: on unknown or inconsistent options.
    """
    if (betas is None) == (noise_schedule is None):
        raise ValueError("dpm_solver_sample needs exactly one of betas= or noise_schedule=")
    ns = schedule_from_betas(betas) if noise_schedule is None else noise_schedule
    noise_fn = model_wrapper(model_fn, ns, model_type=model_type, guidance_type=guidance_type,
                             condition=condition, unconditional_condition=unconditional_condition,
                             guidance_scale=guidance_scale)
    return sample_with_noise_fn(
        noise_fn, x_T, ns, steps=steps, order=order, skip_type=skip_type, method=method,
        lower_order_final=lower_order_final, t_start=t_start, t_end=t_end,
        algorithm_type=algorithm_type, solver_type=solver_type, denoise_to_zero=denoise_to_zero,
        correcting_x0_fn=correcting_x0_fn, return_intermediates=return_intermediates)
