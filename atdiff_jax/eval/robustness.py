"""Robustness of a trained DPM to perturbed inputs: the title claim of the paper, measured two ways.

1. **Denoiser attack** (:func:`denoiser_attack`): for a grid of timesteps t, data x_0 and noise,
   PGD looks for the perturbation δ of x_t, inside an l2 or linf ball of radius r, that maximises
   the network's epsilon error, and the clean and attacked errors are reported per (t, r).
   The error of ε_θ(x_t + δ, t) is measured against the target that is *consistent* with the
   perturbed input, ε + δ / sqrt(1 - ᾱ_t) (the noise that turns x_0 into x_t + δ; the paper's
   ``delta_detach`` target): a model whose x_0 estimate does not move when its input moves by δ
   has attacked error = clean error. The x_0 error ``||x̂_0 - x_0||²`` (the same quantity in image
   units) is reported beside it.

2. **Sampling under perturbation** (:func:`perturbed_ddim_sample`): DDIM with a perturbation of
   l2 size ``size * sqrt(D)`` added to the intermediate state x_t before each of the chosen steps,
   either Gaussian (random direction) or adversarial (one normalised-gradient step that maximises
   the change of the network's prediction ``||ε_θ(x_t + δ) - ε_θ(x_t)||²``; no ground truth is
   known during sampling). The samples are then scored like clean ones (FID / MNIST feature
   distance), so the degradation of a clean and an AT model can be set side by side.

Everything here is a pure function of a ``model_fn(x [B,H,W,C], t [B] int) -> output`` (the
chain's network call, as in :mod:`atdiff_jax.diffusion.gaussian`) and can be jitted.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax.adversarial.perturb import NORMS, ascent_step, per_example_l2, project
from atdiff_jax.diffusion.gaussian import GaussianDiffusion

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
PERTURB_KINDS = ("gaussian", "adversarial")
# The denoiser attack's default timesteps in percent of T: (50, 200, 500, 800) for T = 1000.
DEFAULT_T_PERCENT = (5, 20, 50, 80)


def attack_timesteps(num_timesteps: int, t_values: Sequence[int] | None = None
                     ) -> tuple[int, ...]:
    """The denoiser attack's timesteps on a chain of T = ``num_timesteps`` steps.

    ``t_values`` when given (each must lie in [0, T)); by default :data:`DEFAULT_T_PERCENT` of T,
    rounded down: (50, 200, 500, 800) for T = 1000, (5, 20, 50, 80) for T = 100.

    Raises:
      ValueError: a t outside [0, T).
    """
    if t_values is None:
        return tuple(dict.fromkeys(num_timesteps * p // 100 for p in DEFAULT_T_PERCENT))
    bad = [int(t) for t in t_values if not 0 <= int(t) < num_timesteps]
    if bad:
        raise ValueError(f"t_values must lie in [0, {num_timesteps}) (T = {num_timesteps} is the "
                         f"run's diffusion.steps), got {bad}")
    return tuple(int(t) for t in t_values)


def _eps_of(diffusion: GaussianDiffusion, output: jax.Array, channels: int) -> jax.Array:
    """The epsilon part of the network output (learned-sigma models output [eps, var])."""
    if diffusion.model_mean_type != "epsilon":
        raise ValueError("robustness evaluation needs an epsilon-prediction model, got "
                         f"model_mean_type={diffusion.model_mean_type!r}")
    return output[..., :channels]


def _errors(model_fn: ModelFn, diffusion: GaussianDiffusion, x_start, x_t, t, noise, delta):
    """Per-example eps MSE (against the δ-consistent target) and x_0 MSE for input x_t + δ."""
    n = x_t.ndim
    c = x_t.shape[-1]
    eps = _eps_of(diffusion, model_fn(x_t + delta, t), c).astype(jnp.float32)
    sigma = diffusion._extract("sqrt_one_minus_alphas_cumprod", t, n)
    target = noise + delta / sigma
    axes = tuple(range(1, n))
    eps_mse = jnp.mean(jnp.square(eps - target), axis=axes)
    x0 = diffusion.predict_xstart_from_eps(x_t + delta, t, eps)
    x0_mse = jnp.mean(jnp.square(x0 - x_start), axis=axes)
    return eps_mse, x0_mse


def _radius(radius, shape, radius_scaling: str):
    if radius_scaling == "sqrt_dim":
        return jnp.asarray(radius, jnp.float32) * jnp.sqrt(jnp.float32(np.prod(shape[1:])))
    if radius_scaling == "absolute":
        return jnp.asarray(radius, jnp.float32)
    raise ValueError(f"radius_scaling must be 'sqrt_dim' or 'absolute', got {radius_scaling!r}")


def _pgd(loss: Callable[[jax.Array], jax.Array], shape, rng: jax.Array, *, radius, norm: str,
         steps: int, step_size, random_start: bool) -> jax.Array:
    """``steps`` normalised-gradient ascent steps on ``loss(δ)`` from δ_0, each projected onto the
    ``norm`` ball of (absolute) ``radius``; returns the final δ of ``shape``.

    ``random_start``: δ_0 is a random direction of l2 length ``radius / 2`` (linf: ``± radius / 2``
    per pixel), so a zero gradient at δ = 0 cannot stall the attack; otherwise δ_0 = 0.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if random_start:
        d0 = jax.random.normal(rng, shape, jnp.float32)
        if norm == "l2":
            d0 = d0 / per_example_l2(d0).reshape((-1,) + (1,) * (len(shape) - 1)) * (0.5 * radius)
        else:
            d0 = 0.5 * radius * jnp.sign(d0)
    else:
        d0 = jnp.zeros(shape, jnp.float32)

    def body(delta, _):
        g = jax.grad(loss)(delta)
        delta = project(ascent_step(delta, g, norm=norm, step_size=step_size), norm=norm,
                        radius=radius)
        return delta, None

    # Unrolled: on XLA:CPU, convolution gradients inside a while loop run ~10x slower than
    # unrolled (measured here: 55 s vs 6 s for one 10-step attack on 64 MNIST images; see
    # adversarial/driver.py). The attack is the same.
    delta, _ = jax.lax.scan(body, d0, None, length=steps, unroll=True)
    return delta


def pgd_attack(model_fn: ModelFn, diffusion: GaussianDiffusion, x_start: jax.Array, t: jax.Array,
               noise: jax.Array, rng: jax.Array, *, radius: float | jax.Array, norm: str = "l2",
               steps: int = 10, step_fraction: float = 0.25, radius_scaling: str = "sqrt_dim",
               random_start: bool = True) -> dict[str, jax.Array]:
    """PGD on x_t = q_sample(x_start, t, noise) maximising the network's epsilon error.

    Args:
      x_start, noise: [B, H, W, C]; t: [B] int chain indices.
      radius: ball radius; with ``radius_scaling="sqrt_dim"`` the l2 radius is
        ``radius * sqrt(H*W*C)`` (a per-pixel RMS of ``radius``, the paper's convention); linf
        radii are per pixel whatever the scaling.
      steps: PGD iterations; each moves ``step_fraction * radius`` (l2 length, or per pixel for
        linf) along the normalised gradient, then projects onto the ball.
      random_start: start from a uniform point of the ball's surface direction (l2) / box (linf)
        scaled by 0.5, so a zero gradient at δ = 0 cannot stall the attack.
    Returns:
      per-example [B] ``eps_clean``, ``eps_attacked``, ``x0_clean``, ``x0_attacked`` (MSE per
      element) and ``delta_norm`` (l2 of the final δ).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    x_t = diffusion.q_sample(x_start, t, noise)
    r = _radius(radius, x_t.shape, "absolute" if norm == "linf" else radius_scaling)

    def loss(delta):
        return jnp.sum(_errors(model_fn, diffusion, x_start, x_t, t, noise, delta)[0])

    delta = _pgd(loss, x_t.shape, rng, radius=r, norm=norm, steps=steps,
                 step_size=step_fraction * r, random_start=random_start)
    eps_clean, x0_clean = _errors(model_fn, diffusion, x_start, x_t, t, noise, jnp.zeros_like(delta))
    eps_adv, x0_adv = _errors(model_fn, diffusion, x_start, x_t, t, noise, delta)
    return {"eps_clean": eps_clean, "eps_attacked": eps_adv, "x0_clean": x0_clean,
            "x0_attacked": x0_adv, "delta_norm": per_example_l2(delta)}


def denoiser_attack(model_fn: ModelFn, diffusion: GaussianDiffusion, x_start: jax.Array,
                    rng: jax.Array, *, t_values: Sequence[int], radii: Sequence[float],
                    norm: str = "l2", steps: int = 10, step_fraction: float = 0.25,
                    radius_scaling: str = "sqrt_dim") -> dict[str, np.ndarray]:
    """The attack of :func:`pgd_attack` over a grid of timesteps and radii (one compile).

    ``t_values`` are checked by :func:`attack_timesteps` (each in [0, T)).
    The same noise is used for every (t, r), so the rows differ only by t and r.
    Returns float64 arrays [len(t_values), len(radii)]: means over the batch of ``eps_clean``,
    ``eps_attacked``, ``x0_clean``, ``x0_attacked``, plus ``t`` and ``radius``.
    """
    t_values = attack_timesteps(diffusion.num_timesteps, t_values)
    b = x_start.shape[0]
    noise = jax.random.normal(jax.random.fold_in(rng, 0), x_start.shape, jnp.float32)

    @jax.jit
    def one(t_scalar, r, key):
        t = jnp.full((b,), t_scalar, jnp.int32)
        out = pgd_attack(model_fn, diffusion, x_start, t, noise, key, radius=r, norm=norm,
                         steps=steps, step_fraction=step_fraction, radius_scaling=radius_scaling)
        return {k: jnp.mean(v) for k, v in out.items()}

    keys = ("eps_clean", "eps_attacked", "x0_clean", "x0_attacked", "delta_norm")
    res = {k: np.zeros((len(t_values), len(radii))) for k in keys}
    for i, t in enumerate(t_values):
        for j, r in enumerate(radii):
            out = one(jnp.int32(t), jnp.float32(r), jax.random.fold_in(rng, 1 + i * len(radii) + j))
            for k in keys:
                res[k][i, j] = float(out[k])
    res["t"] = np.asarray(t_values)
    res["radius"] = np.asarray(radii, np.float64)
    return res


def perturbed_ddim_sample(model_fn: ModelFn, chain: GaussianDiffusion, x_T: jax.Array,
                          rng: jax.Array, *, kind: str, size: float | jax.Array,
                          perturb_steps: int | None = None, clip_denoised: bool = True
                          ) -> jax.Array:
    """DDIM (eta 0) over a respaced ``chain`` with x_t perturbed before chosen steps.

    Args:
      kind: ``"gaussian"`` (a random direction) or ``"adversarial"`` (the direction of the
        gradient of ``||ε_θ(x_t + δ) - ε_θ(x_t)||²`` at a small random δ).
      size: per-pixel RMS of each perturbation: its l2 norm is ``size * sqrt(H*W*C)``. ``0``
        gives exactly the clean DDIM sample.
      perturb_steps: perturb before the first this many steps (the noisiest; ``None`` = all).
    Returns:
      x_0 [B, H, W, C].
    """
    if kind not in PERTURB_KINDS:
        raise ValueError(f"kind must be one of {PERTURB_KINDS}, got {kind!r}")
    n_steps = chain.num_timesteps
    limit = n_steps if perturb_steps is None else int(perturb_steps)
    c = x_T.shape[-1]
    norm_of = lambda v: per_example_l2(v).reshape((-1,) + (1,) * (v.ndim - 1))  # noqa: E731
    length = jnp.asarray(size, jnp.float32) * jnp.sqrt(jnp.float32(np.prod(x_T.shape[1:])))

    def direction(x, t, key):
        u = jax.random.normal(key, x.shape, jnp.float32)
        if kind == "gaussian":
            return u / jnp.maximum(norm_of(u), 1e-12)
        ref = jax.lax.stop_gradient(_eps_of(chain, model_fn(x, t), c))

        def change(d):
            return jnp.sum(jnp.square(_eps_of(chain, model_fn(x + d, t), c) - ref))

        g = jax.grad(change)(1e-3 * u / jnp.maximum(norm_of(u), 1e-12))
        return g / jnp.maximum(norm_of(g), 1e-12)

    def body(x, i):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        order = n_steps - 1 - i  # 0 for the first (noisiest) step
        on = (order < limit).astype(x.dtype)
        d = direction(x, t, jax.random.fold_in(rng, i))
        x = x + on * length * d.astype(x.dtype)
        out = chain.ddim_sample(model_fn, x, t, jnp.zeros_like(x), eta=0.0,
                                clip_denoised=clip_denoised)
        return out["sample"], None

    # Unrolled when a step takes a gradient (the adversarial direction), as in pgd_attack.
    x, _ = jax.lax.scan(body, x_T, jnp.arange(n_steps - 1, -1, -1),
                        unroll=kind == "adversarial")
    return x


# ----------------------------------------------------------------------------------------------
# Consistency models (Karras/EDM students: cm.kind "cd" / "ct")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def chain_sigmas(diffusion: GaussianDiffusion, t_values: Sequence[int], *, sigma_min: float,
                 sigma_max: float) -> np.ndarray:
    """The EDM noise levels ``sqrt((1 - ᾱ_t) / ᾱ_t)`` of the chain's timesteps ``t_values``
    (checked by :func:`attack_timesteps`), clipped to the student's ``[sigma_min, sigma_max]``:
    the consistency attack's rows at the noise levels of the DPM attack's rows. float32 [len(t)]."""
    from atdiff_jax.consistency.karras import vp_sigmas
    t_values = attack_timesteps(diffusion.num_timesteps, t_values)
    sig = vp_sigmas(diffusion.tables["alphas_cumprod"])[np.asarray(t_values)]
    return np.clip(sig, sigma_min, sigma_max).astype(np.float32)


def consistency_pgd_attack(denoise_fn: DenoiseFn, x_start: jax.Array, sigma: jax.Array,
                           noise: jax.Array, rng: jax.Array, *, radius: float | jax.Array,
                           norm: str = "l2", steps: int = 10, step_fraction: float = 0.25,
                           radius_scaling: str = "sqrt_dim", random_start: bool = True
                           ) -> dict[str, jax.Array]:
    """PGD on the input x = x_0 + σ z (EDM scale) of a consistency function, maximising its x_0
    error ``||f(x + δ, σ) - x_0||²``.

    The consistency function's output is its estimate of x_0, so the error is measured against
    the x_0 the clean input came from: the quantity the DPM attack reports as ``x0_*`` (its eps
    error against the δ-consistent target is the same error in eps units). δ lives in the EDM
    scale, where CD/CT's adversarial training perturbs the student's input (docs/method.md, "AT
    for consistency models"), with the same radius convention as :func:`pgd_attack`.

    Args:
      denoise_fn: the student's ``f(x [B,H,W,C], sigma [B]) -> x_0`` (unclamped: a clamp has
        no gradient outside [-1, 1]).
      x_start, noise: [B, H, W, C]; sigma: [B] EDM noise levels.
    Returns:
      per-example [B] ``x0_clean``, ``x0_attacked`` (MSE per element) and ``delta_norm``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    x = x_start + sigma.reshape((-1,) + (1,) * (x_start.ndim - 1)) * noise
    r = _radius(radius, x.shape, "absolute" if norm == "linf" else radius_scaling)
    axes = tuple(range(1, x.ndim))

    def errors(delta):
        return jnp.mean(jnp.square(denoise_fn(x + delta, sigma).astype(jnp.float32) - x_start),
                        axis=axes)

    delta = _pgd(lambda d: jnp.sum(errors(d)), x.shape, rng, radius=r, norm=norm, steps=steps,
                 step_size=step_fraction * r, random_start=random_start)
    return {"x0_clean": errors(jnp.zeros_like(delta)), "x0_attacked": errors(delta),
            "delta_norm": per_example_l2(delta)}


@functools.partial(jax.jit, static_argnames=("denoise_fn", "norm", "steps", "step_fraction",
                                             "radius_scaling"))
def _consistency_attack_means(params, x_start, noise, s, r, key, *, denoise_fn, norm, steps,
                              step_fraction, radius_scaling):
    out = consistency_pgd_attack(lambda x, sig: denoise_fn(params, x, sig), x_start,
                                 jnp.full((x_start.shape[0],), s, jnp.float32), noise, key,
                                 radius=r, norm=norm, steps=steps, step_fraction=step_fraction,
                                 radius_scaling=radius_scaling)
    return {k: jnp.mean(v) for k, v in out.items()}


def consistency_attack(denoise_fn: Callable[[object, jax.Array, jax.Array], jax.Array],
                       params, x_start: jax.Array, rng: jax.Array, *, sigmas: Sequence[float],
                       radii: Sequence[float], norm: str = "l2", steps: int = 10,
                       step_fraction: float = 0.25, radius_scaling: str = "sqrt_dim"
                       ) -> dict[str, np.ndarray]:
    """The attack of :func:`consistency_pgd_attack` over a grid of noise levels and radii, the
    consistency-model counterpart of :func:`denoiser_attack`; the same noise for every (σ, r).

    ``denoise_fn(params, x, sigma)`` is the student's unclamped consistency function; the
    params are an argument of the one compiled attack, so every run of the same network and
    ``denoise_fn`` (a stable, hashable function) reuses it.
    Returns float64 [len(sigmas), len(radii)] batch means of ``x0_clean``, ``x0_attacked`` and
    ``delta_norm``, plus ``sigma`` and ``radius``.
    """
    noise = jax.random.normal(jax.random.fold_in(rng, 0), x_start.shape, jnp.float32)
    keys = ("x0_clean", "x0_attacked", "delta_norm")
    res = {k: np.zeros((len(sigmas), len(radii))) for k in keys}
    for i, s in enumerate(sigmas):
        for j, r in enumerate(radii):
            out = _consistency_attack_means(
                params, x_start, noise, jnp.float32(s), jnp.float32(r),
                jax.random.fold_in(rng, 1 + i * len(radii) + j), denoise_fn=denoise_fn, norm=norm,
                steps=steps, step_fraction=step_fraction, radius_scaling=radius_scaling)
            for k in keys:
                res[k][i, j] = float(out[k])
    res["sigma"] = np.asarray(sigmas, np.float64)
    res["radius"] = np.asarray(radii, np.float64)
    return res


def perturbed_cm_sample(denoise_fn: DenoiseFn, noise: jax.Array, rng: jax.Array,
                        perturb_rng: jax.Array, *, sigmas: Sequence[float],
                        noise_scales: Sequence[float], sigma_max: float, kind: str,
                        size: float | jax.Array, clip_denoised: bool = True) -> jax.Array:
    """Consistency sampling with the input of every network evaluation perturbed.

    Evaluation i denoises ``x0 = f(x + δ_i, sigmas[i])`` and re-noises ``x = x0 + z_i *
    noise_scales[i]`` (the multistep sampler; one evaluation with scale 0 is the one-step
    sampler), starting from ``x = sigma_max * noise``. With ``z = jax.random.normal(rng,
    [S, B, H, W, C])`` and ``sigmas``/``noise_scales`` from ``multistep_sigmas``, size 0 gives
    exactly ``karras_sample``'s multistep (or onestep) sample.

    Args:
      noise: [B, H, W, C] the initial noise z (x_T = sigma_max z).
      rng: the re-noising key (the sampler's own); perturb_rng: the perturbations' key.
      kind: ``"gaussian"`` or ``"adversarial"`` (the direction of the gradient of
        ``||f(x + d) - f(x)||²`` at a small random d), as :func:`perturbed_ddim_sample`.
      size: per-pixel RMS of each perturbation **in the VP scale** of
        :func:`perturbed_ddim_sample`: the EDM state x_σ is ``sqrt(1 + σ²)`` times the VP state,
        so δ_i has l2 norm ``size * sqrt(H*W*C) * sqrt(1 + sigmas[i]²)``; at σ_max that is the
        initial noise z perturbed by ``size`` per pixel RMS. ``0`` gives the clean sample.
    Returns:
      x_0 [B, H, W, C] in [-1, 1].
    """
    if kind not in PERTURB_KINDS:
        raise ValueError(f"kind must be one of {PERTURB_KINDS}, got {kind!r}")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    scales = jnp.asarray(noise_scales, jnp.float32)
    if sigmas.shape != scales.shape or sigmas.ndim != 1:
        raise ValueError(f"sigmas and noise_scales must be equal-length lists, got "
                         f"{sigmas.shape} and {scales.shape}")
    n = sigmas.shape[0]
    z = jax.random.normal(rng, (n,) + noise.shape, noise.dtype)
    norm_of = lambda v: per_example_l2(v).reshape((-1,) + (1,) * (v.ndim - 1))  # noqa: E731
    unit = jnp.sqrt(jnp.float32(np.prod(noise.shape[1:])))

    def f(x, s):
        out = denoise_fn(x, jnp.full((x.shape[0],), s, jnp.float32))
        return jnp.clip(out, -1.0, 1.0) if clip_denoised else out

    def direction(x, s, scale, key):
        u = jax.random.normal(key, x.shape, jnp.float32)
        u = u / jnp.maximum(norm_of(u), 1e-12)
        if kind == "gaussian":
            return u
        ref = jax.lax.stop_gradient(denoise_fn(x, jnp.full((x.shape[0],), s, jnp.float32)))

        def change(d):
            return jnp.sum(jnp.square(denoise_fn(x + d, jnp.full((x.shape[0],), s, jnp.float32))
                                      - ref))

        g = jax.grad(change)(1e-3 * scale * u)
        return g / jnp.maximum(norm_of(g), 1e-12)

    def body(x, inp):
        i, s, c, zi = inp
        scale = jnp.sqrt(1.0 + s ** 2)           # EDM / VP scale of the state at sigma s
        d = direction(x, s, scale, jax.random.fold_in(perturb_rng, i))
        x0 = f(x + jnp.asarray(size, jnp.float32) * unit * scale * d.astype(x.dtype), s)
        return x0 + zi * c, None

    x, _ = jax.lax.scan(body, sigma_max * noise, (jnp.arange(n), sigmas, scales, z),
                        unroll=kind == "adversarial")
    return jnp.clip(x, -1.0, 1.0)
