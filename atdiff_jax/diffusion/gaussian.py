"""Gaussian diffusion (DDPM/IDDPM/ADM) as an immutable pytree with pure methods.

``GaussianDiffusion`` keeps guided-diffusion's method names (``q_sample``, ``q_posterior_mean_variance``,
``p_mean_variance``, ``training_losses``, ...) so code written against the reference maps one to one,
but every method is a pure function of its arguments: the network is passed in as
``model_fn(x_nhwc, t) -> output_nhwc`` and randomness as explicit noise arrays or PRNG keys.
Images are NHWC; timesteps ``t`` are int indices into *this* (possibly respaced) chain, and
``model_fn`` receives ``model_timesteps(t)`` -- the original timestep (respacing map, optionally
rescaled to [0, 1000)), exactly what guided-diffusion's ``_WrappedModel`` passes to the network.

Numerics follow the reference: schedule tables are computed in float64 NumPy and cast to float32
once (the reference gathers float64 then casts with ``.float()``, which rounds identically); all
arithmetic on images is float32.

The adversarial-training extension of the authors' ``AdvGaussianDiffusion`` lives in
``training_losses(..., delta=..., target_type=...)``; the DDPM-IP baseline in ``input_perturb``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax.diffusion import likelihood, schedules

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

MEAN_TYPES = ("epsilon", "start_x", "previous_x")
VAR_TYPES = ("learned", "learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
# How the loss target follows an input perturbation delta (``training_losses``): the target moves
# with delta, stop-gradiented (the released recipe) or not, or stays the clean one.
TARGET_TYPES = ("delta_detach", "delta", "original")

def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def diffusion_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All float64 schedule tables [T] of guided-diffusion's ``GaussianDiffusion.__init__``."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a 1-D array with values in (0, 1]")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at t=0: the clipped log uses t=1's value there.
    post_var_for_log = np.append(post_var[1], post_var[1:]) if len(betas) > 1 else post_var
    coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    fixed_large = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas
    with np.errstate(divide="ignore"):
        return {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": np.append(ac[1:], 0.0),
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "one_minus_alphas_cumprod": 1.0 - ac,
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(post_var_for_log),
            "posterior_mean_coef1": coef1,
            "posterior_mean_coef2": coef2,
            "fixed_large_variance": fixed_large,
            "fixed_large_log_variance": np.log(fixed_large),
            "recip_posterior_mean_coef1": 1.0 / coef1,
            "posterior_coef2_over_coef1": coef2 / coef1,
        }


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


@flax.struct.dataclass
class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion chain.

    Build it with :meth:`create` or :func:`create_gaussian_diffusion`. Array fields are float32
    tables of length ``num_timesteps``; the rest is static (hashable) configuration.
    """

    tables: dict[str, np.ndarray]
    timestep_map: np.ndarray
    num_timesteps: int = flax.struct.field(pytree_node=False)
    original_num_steps: int = flax.struct.field(pytree_node=False)
    model_mean_type: str = flax.struct.field(pytree_node=False)
    model_var_type: str = flax.struct.field(pytree_node=False)
    loss_type: str = flax.struct.field(pytree_node=False)
    rescale_timesteps: bool = flax.struct.field(pytree_node=False)
    # The float64 betas of the original (un-respaced) chain, kept for ``respace``.
    base_betas: tuple[float, ...] = flax.struct.field(pytree_node=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, betas, *, model_mean_type: str = "epsilon",
               model_var_type: str = "fixed_large", loss_type: str = "mse",
               rescale_timesteps: bool = False, use_timesteps=None) -> "GaussianDiffusion":
        """A chain from float64 ``betas`` [T], optionally respaced to ``use_timesteps``."""
        _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
        _check_choice("model_var_type", model_var_type, VAR_TYPES)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        base = np.asarray(betas, dtype=np.float64)
        if use_timesteps is None:
            use_timesteps = range(len(base))
        new_betas, timestep_map = schedules.respace_betas(base, use_timesteps)
        if len(new_betas) == 0:
            raise ValueError("the respaced chain keeps no timesteps")
        tables = {k: v.astype(np.float32) for k, v in diffusion_tables(new_betas).items()}
        return cls(tables=tables, timestep_map=timestep_map,
                   num_timesteps=len(new_betas), original_num_steps=len(base),
                   model_mean_type=model_mean_type, model_var_type=model_var_type,
                   loss_type=loss_type, rescale_timesteps=bool(rescale_timesteps),
                   base_betas=tuple(float(b) for b in base))

    def respace(self, timestep_respacing: str | list[int]) -> "GaussianDiffusion":
        """The same model's chain respaced for sampling, e.g. ``"ddim10"``, ``"10"`` or ``"10,5"``."""
        use = schedules.space_timesteps(self.original_num_steps, timestep_respacing)
        return GaussianDiffusion.create(
            np.asarray(self.base_betas), model_mean_type=self.model_mean_type,
            model_var_type=self.model_var_type, loss_type=self.loss_type,
            rescale_timesteps=self.rescale_timesteps, use_timesteps=use)

    # ------------------------------------------------------------------ helpers
    def _extract(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """``tables[name][t]`` shaped [B, 1, ..., 1] to broadcast against an ndim-array."""
        vals = jnp.asarray(self.tables[name])[t]
        return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """The timestep the network sees for chain index ``t`` (respacing map + optional rescale)."""
        mapped = jnp.asarray(self.timestep_map)[t]
        if self.rescale_timesteps:
            return mapped.astype(jnp.float32) * (1000.0 / self.original_num_steps)
        return mapped

    @property
    def learns_variance(self) -> bool:
        return self.model_var_type in ("learned", "learned_range")

    def split_output(self, model_output: jax.Array, channels: int) -> tuple[jax.Array, jax.Array | None]:
        """Splits a [..., 2C] learned-variance output into (mean part, variance values)."""
        if not self.learns_variance:
            if model_output.shape[-1] != channels:
                raise ValueError(f"model output has {model_output.shape[-1]} channels, expected "
                                 f"{channels} (model_var_type={self.model_var_type!r})")
            return model_output, None
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(f"model output has {model_output.shape[-1]} channels, expected "
                             f"{2 * channels} (learned variance, model_var_type={self.model_var_type!r})")
        return model_output[..., :channels], model_output[..., channels:]

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        n = x_start.ndim
        return (self._extract("sqrt_alphas_cumprod", t, n) * x_start,
                self._extract("one_minus_alphas_cumprod", t, n),
                self._extract("log_one_minus_alphas_cumprod", t, n))

    def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.  [B, H, W, C]."""
        n = x_start.ndim
        return (self._extract("sqrt_alphas_cumprod", t, n) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, n) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = (self._extract("posterior_mean_coef1", t, n) * x_start
                + self._extract("posterior_mean_coef2", t, n) * x_t)
        return (mean, self._extract("posterior_variance", t, n),
                self._extract("posterior_log_variance_clipped", t, n))

    # ------------------------------------------------------------------ reverse process
    def predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps)

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        n = x_t.ndim
        return (self._extract("recip_posterior_mean_coef1", t, n) * xprev
                - self._extract("posterior_coef2_over_coef1", t, n) * x_t)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return ((self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, n))

    def p_mean_variance_from_output(self, model_output: jax.Array, x: jax.Array, t: jax.Array, *,
                                    clip_denoised: bool = True,
                                    denoised_fn: Callable | None = None,
                                    eps_scale: float | jax.Array = 1.0) -> dict[str, jax.Array]:
        """p(x_{t-1} | x_t) from a network output already computed at (x, t).

        Args:
          model_output: [B, H, W, C] or [B, H, W, 2C] (learned variance).
          x: x_t, [B, H, W, C].
          t: [B] chain indices.
          clip_denoised: clip the predicted x_0 to [-1, 1].
          denoised_fn: optional function applied to the predicted x_0 before clipping.
          eps_scale: epsilon scaling (ADM-ES): the predicted eps is divided by this before x_0 is
            predicted; a scalar, or an array [num_timesteps] indexed by ``t``.
        Returns:
          dict with ``mean``, ``variance``, ``log_variance`` and ``pred_xstart`` (all [B, H, W, C]).
        """
        n = x.ndim
        out, var_values = self.split_output(model_output, x.shape[-1])
        if self.model_var_type == "learned":
            log_variance = var_values
            variance = jnp.exp(log_variance)
        elif self.model_var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, n)
            max_log = self._extract("log_betas", t, n)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = jnp.exp(log_variance)
        elif self.model_var_type == "fixed_large":
            variance = jnp.broadcast_to(self._extract("fixed_large_variance", t, n), x.shape)
            log_variance = jnp.broadcast_to(self._extract("fixed_large_log_variance", t, n), x.shape)
        else:
            variance = jnp.broadcast_to(self._extract("posterior_variance", t, n), x.shape)
            log_variance = jnp.broadcast_to(
                self._extract("posterior_log_variance_clipped", t, n), x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

        if self.model_mean_type == "previous_x":
            pred_xstart = process_xstart(self.predict_xstart_from_xprev(x, t, out))
            mean = out
        else:
            if self.model_mean_type == "start_x":
                pred_xstart = process_xstart(out)
            else:
                eps = out
                if not (isinstance(eps_scale, (int, float)) and eps_scale == 1.0):
                    scale = jnp.asarray(eps_scale, jnp.float32)
                    if scale.ndim == 1:
                        scale = scale[t].reshape((-1,) + (1,) * (n - 1))
                    eps = eps / scale
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, eps))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, *,
                        clip_denoised: bool = True, denoised_fn: Callable | None = None,
                        eps_scale: float | jax.Array = 1.0) -> dict[str, jax.Array]:
        """Runs ``model_fn`` at (x_t, t) and returns p(x_{t-1} | x_t); see ``p_mean_variance_from_output``."""
        model_output = model_fn(x, self.model_timesteps(t))
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised=clip_denoised,
                                                denoised_fn=denoised_fn, eps_scale=eps_scale)

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, *, clip_denoised=False):
        """The variational bound term per example, in bits per dimension: [B].

        KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) for t > 0, the discretized decoder NLL at t = 0.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(likelihood.normal_kl(true_mean, true_log_var, out["mean"],
                                            out["log_variance"])) / math.log(2.0)
        nll = -likelihood.discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                        noise: jax.Array, *, delta: jax.Array | None = None,
                        target_type: str = "delta_detach", input_perturb: float = 0.0,
                        ip_noise: jax.Array | None = None) -> dict[str, jax.Array]:
        """Per-example training loss terms, as the authors' ``AdvGaussianDiffusion.training_losses``.

        Args:
          model_fn: ``model_fn(x_in [B,H,W,C], model_timesteps(t)) -> output``.
          x_start: x_0 in [-1, 1], [B, H, W, C].
          t: [B] int chain indices.
          noise: eps ~ N(0, I), [B, H, W, C].
          delta: adversarial perturbation of the network input x_t (None = clean training).
          target_type: how the loss target follows ``delta`` (see below).
          input_perturb: DDPM-IP gamma: x_t is built from ``noise + gamma * ip_noise`` while the
            eps target stays ``noise``. Requires ``ip_noise`` when non-zero.

        With ``delta`` the network sees ``x_t + delta``; ``target_type``:

        * ``"delta_detach"`` (released recipe): eps target ``noise + stop_grad(delta)/sqrt(1-abar_t)``,
          the vb term uses ``stop_grad(x_t + delta)``;
        * ``"delta"``: the same without stop-gradient;
        * ``"original"``: eps target ``noise`` and the vb term uses the clean ``x_t``.

        Returns:
          dict of [B] arrays: ``loss`` and, depending on ``loss_type``, ``mse`` and ``vb``.
        """
        _check_choice("target_type", target_type, TARGET_TYPES)
        n = x_start.ndim
        if x_start.shape != noise.shape:
            raise ValueError(f"x_start {x_start.shape} and noise {noise.shape} differ in shape")
        if input_perturb:
            if ip_noise is None:
                raise ValueError("input_perturb > 0 needs ip_noise (the DDPM-IP extra Gaussian)")
            x_t = self.q_sample(x_start, t, noise + input_perturb * ip_noise)
        else:
            x_t = self.q_sample(x_start, t, noise)

        # What the network sees, and the x_t / eps target the loss measures against.
        model_in, x_t_loss, eps_target = x_t, x_t, noise
        if delta is not None:
            if delta.shape != x_start.shape:
                raise ValueError(f"delta {delta.shape} must have the image shape {x_start.shape}")
            model_in = x_t + delta
            if target_type != "original":
                d = jax.lax.stop_gradient(delta) if target_type == "delta_detach" else delta
                x_t_loss = model_in
                if target_type == "delta_detach":
                    x_t_loss = jax.lax.stop_gradient(model_in)
                eps_target = noise + d / self._extract("sqrt_one_minus_alphas_cumprod", t, n)

        terms: dict[str, jax.Array] = {}
        model_output = model_fn(model_in, self.model_timesteps(t))
        if self.loss_type in ("kl", "rescaled_kl"):
            loss = self.vb_terms_bpd_from_output(model_output, x_start, x_t_loss, t)
            if self.loss_type == "rescaled_kl":
                loss = loss * self.num_timesteps
            terms["loss"] = loss
            return terms

        out, var_values = self.split_output(model_output, x_start.shape[-1])
        if var_values is not None:
            # The vb term only trains the variance: the mean output is frozen inside it.
            frozen = jnp.concatenate([jax.lax.stop_gradient(out), var_values], axis=-1)
            vb = self.vb_terms_bpd_from_output(frozen, x_start, x_t_loss, t)
            if self.loss_type == "rescaled_mse":
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
        if self.model_mean_type == "epsilon":
            target = eps_target
        elif self.model_mean_type == "start_x":
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t_loss, t)[0]
        terms["mse"] = mean_flat(jnp.square(target - out))
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ------------------------------------------------------------------ sampling
    def p_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, noise: jax.Array, *,
                 clip_denoised: bool = True, denoised_fn: Callable | None = None,
                 eps_scale: float | jax.Array = 1.0) -> dict[str, jax.Array]:
        """One ancestral (IDDPM) step x_t -> x_{t-1}: mean + exp(log_var / 2) * noise (no noise at t=0).

        Returns ``sample`` and ``pred_xstart`` ([B, H, W, C]). ``eps_scale`` != 1 is the ES sampler.
        """
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, eps_scale=eps_scale)
        nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, noise: jax.Array, *,
                    eta: float = 0.0, clip_denoised: bool = True,
                    denoised_fn: Callable | None = None,
                    eps_scale: float | jax.Array = 1.0) -> dict[str, jax.Array]:
        """One DDIM step x_t -> x_{t-1} with stochasticity ``eta`` (0 = deterministic).

        eps is re-derived from the (clipped) predicted x_0, as in the reference.
        """
        n = x.ndim
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, eps_scale=eps_scale)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, n)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, n)
        sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean_pred = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
                     + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (n - 1))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _sample_loop(self, step: Callable, x_T: jax.Array, rng: jax.Array | None,
                     needs_noise: bool, return_trajectory: bool):
        if needs_noise and rng is None:
            raise ValueError("this sampler is stochastic: pass rng")

        def body(x, i):
            t = jnp.full((x.shape[0],), i, jnp.int32)
            noise = (jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
                     if needs_noise else jnp.zeros_like(x))
            out = step(x, t, noise)
            return out["sample"], out["sample"] if return_trajectory else None

        indices = jnp.arange(self.num_timesteps - 1, -1, -1)
        x0, traj = jax.lax.scan(body, x_T, indices)
        if return_trajectory:
            return x0, jnp.concatenate([x_T[None], traj], axis=0)
        return x0

    def p_sample_loop(self, model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, *,
                      clip_denoised: bool = True, denoised_fn: Callable | None = None,
                      eps_scale: float | jax.Array = 1.0, return_trajectory: bool = False):
        """Ancestral sampling over the whole (respaced) chain, one ``lax.scan``.

        Args:
          x_T: the starting noise [B, H, W, C].
          rng: key; step i (chain index) draws its noise from ``fold_in(rng, i)``.
        Returns:
          x_0 [B, H, W, C], and with ``return_trajectory`` also [T + 1, B, H, W, C] (x_T first).
        """
        step = lambda x, t, noise: self.p_sample(  # noqa: E731
            model_fn, x, t, noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            eps_scale=eps_scale)
        return self._sample_loop(step, x_T, rng, True, return_trajectory)

    def ddim_sample_loop(self, model_fn: ModelFn, x_T: jax.Array, rng: jax.Array | None = None, *,
                         eta: float = 0.0, clip_denoised: bool = True,
                         denoised_fn: Callable | None = None, eps_scale: float | jax.Array = 1.0,
                         return_trajectory: bool = False):
        """DDIM sampling over the whole (respaced, e.g. ``"ddim10"``) chain, one ``lax.scan``.

        ``rng`` is needed only when ``eta > 0``. Returns like :meth:`p_sample_loop`.
        """
        step = lambda x, t, noise: self.ddim_sample(  # noqa: E731
            model_fn, x, t, noise, eta=eta, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, eps_scale=eps_scale)
        return self._sample_loop(step, x_T, rng, eta != 0, return_trajectory)


def create_gaussian_diffusion(*, steps: int = 1000, learn_sigma: bool = False,
                              sigma_small: bool = False, noise_schedule: str = "linear",
                              use_kl: bool = False, predict_xstart: bool = False,
                              rescale_timesteps: bool = False, rescale_learned_sigmas: bool = False,
                              timestep_respacing: str | list[int] = "") -> GaussianDiffusion:
    """guided-diffusion's ``script_util.create_gaussian_diffusion``, same arguments and defaults."""
    betas = schedules.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    return GaussianDiffusion.create(
        betas, model_mean_type="start_x" if predict_xstart else "epsilon",
        model_var_type=var_type, loss_type=loss_type, rescale_timesteps=rescale_timesteps,
        use_timesteps=schedules.space_timesteps(steps, timestep_respacing))
