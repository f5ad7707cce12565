"""From a config to the objects of an experiment: network, diffusion, adversary, sampler, optimizer.

``validate_config`` rejects bad values at start-up with the option's name and the allowed values,
before anything is compiled or written.
"""
from __future__ import annotations

import dataclasses
import jax.numpy as jnp
import ml_collections
import optax

from atdiff_jax.adversarial.perturb import KINDS, NORMS, RADIUS_SCALINGS, TARGET_TYPES, AdversaryConfig
from atdiff_jax.convert.guided_diffusion import create_model
from atdiff_jax.diffusion.gaussian import GaussianDiffusion, create_gaussian_diffusion
from atdiff_jax.diffusion.schedules import SCHEDULES
from atdiff_jax.diffusion.timestep_sampler import SAMPLERS, TimestepSampler
from atdiff_jax.eval.samples import SAMPLERS as GRID_SAMPLERS
from atdiff_jax.models.unet import UNetModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """A config value is invalid; the message names the option and what is allowed."""


def _choice(config, path: str, allowed) -> None:
    value = _get(config, path)
    if value not in allowed:
        raise ConfigError(f"config.{path} must be one of {tuple(allowed)}, got {value!r}")


def _get(config, path: str):
    node = config
    for part in path.split("."):
        if part not in node:
            raise ConfigError(f"config.{path} is missing")
        node = node[part]
    return node


def _positive(config, path: str, *, allow_zero: bool = False, integer: bool = False) -> None:
    value = _get(config, path)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value < 0 or (value == 0 and not allow_zero):
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{path} must be {kind} {bound}, got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first invalid option."""
    _choice(config, "diffusion.noise_schedule", SCHEDULES)
    _choice(config, "diffusion.schedule_sampler", SAMPLERS)
    _choice(config, "adv.kind", KINDS)
    _choice(config, "adv.norm", NORMS)
    _choice(config, "adv.radius_scaling", RADIUS_SCALINGS)
    _choice(config, "adv.target_type", TARGET_TYPES)
    _choice(config, "model.dtype", tuple(DTYPES))
    _choice(config, "train.sampler", GRID_SAMPLERS)
    for path in ("adv.steps", "train.global_batch_size", "train.microbatches",
                 "train.num_minibatches", "train.keep_checkpoints", "train.num_samples",
                 "train.sample_steps", "train.log_every", "train.checkpoint_every",
                 "diffusion.steps", "model.image_size", "model.in_channels", "model.num_channels",
                 "model.num_res_blocks", "mesh.fsdp"):
        _positive(config, path, integer=True)
    for path in ("adv.step_size", "adv.max_norm", "optim.weight_decay", "optim.warmup_steps",
                 "optim.grad_clip", "diffusion.input_perturb", "train.sample_every",
                 "model.dropout"):
        _positive(config, path, allow_zero=True)
    for path in ("optim.lr", "optim.eps", "adv.grad_scale"):
        _positive(config, path)
    for path in ("optim.b1", "optim.b2"):
        if not 0 <= _get(config, path) < 1:
            raise ConfigError(f"config.{path} must be in [0, 1), got {_get(config, path)!r}")
    rates = tuple(_get(config, "train.ema_rates"))
    if not rates or any(not 0 <= r < 1 for r in rates):
        raise ConfigError(f"config.train.ema_rates must be a non-empty list of rates in [0, 1), "
                          f"got {rates!r}")
    if config.train.global_batch_size % config.train.microbatches:
        raise ConfigError(f"config.train.global_batch_size ({config.train.global_batch_size}) must "
                          f"be divisible by config.train.microbatches ({config.train.microbatches})")
    if config.model.dropout >= 1:
        raise ConfigError(f"config.model.dropout must be in [0, 1), got {config.model.dropout!r}")
    if config.model.class_cond and config.model.num_classes < 1:
        raise ConfigError("config.model.num_classes must be >= 1 for a class-conditional model")
    try:
        build_model(config)
        build_diffusion(config)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid model/diffusion config: {e}") from None


def build_model(config) -> UNetModel:
    m = config.model
    return create_model(
        image_size=m.image_size, num_channels=m.num_channels, num_res_blocks=m.num_res_blocks,
        channel_mult=m.channel_mult, learn_sigma=m.learn_sigma, class_cond=m.class_cond,
        use_checkpoint=m.use_checkpoint, attention_resolutions=m.attention_resolutions,
        num_heads=m.num_heads, num_head_channels=m.num_head_channels,
        num_heads_upsample=m.num_heads_upsample, use_scale_shift_norm=m.use_scale_shift_norm,
        dropout=m.dropout, resblock_updown=m.resblock_updown,
        use_new_attention_order=m.use_new_attention_order, in_channels=m.in_channels,
        num_classes=m.num_classes if m.class_cond else None, dtype=DTYPES[m.dtype])


def build_diffusion(config) -> GaussianDiffusion:
    g = config.diffusion
    return create_gaussian_diffusion(
        steps=g.steps, learn_sigma=config.model.learn_sigma, sigma_small=g.sigma_small,
        noise_schedule=g.noise_schedule, use_kl=g.use_kl, predict_xstart=g.predict_xstart,
        rescale_timesteps=g.rescale_timesteps, rescale_learned_sigmas=g.rescale_learned_sigmas)


def build_adversary(config) -> AdversaryConfig:
    a = config.adv
    return AdversaryConfig(kind=a.kind, steps=int(a.steps), step_size=float(a.step_size),
                           max_norm=float(a.max_norm), norm=a.norm,
                           radius_scaling=a.radius_scaling, target_type=a.target_type,
                           grad_scale=float(a.grad_scale))


def build_optimizer(config) -> optax.GradientTransformation:
    """AdamW (torch semantics: decoupled weight decay) with optional warm-up and clipping.

    The schedule counts optimizer updates (K per minibatch under fast AT).
    """
    o = config.optim
    # optax's adamw multiplies the decay by the learning rate, like torch.optim.AdamW.
    adamw = optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay)
    if o.grad_clip:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw


def lr_schedule(config) -> optax.Schedule:
    """Learning rate as a function of the optimizer-update count (linear warm-up, then constant)."""
    o = config.optim
    if o.warmup_steps:
        return optax.warmup_constant_schedule(0.0, o.lr, int(o.warmup_steps))
    return optax.constant_schedule(o.lr)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything the step needs that is not state (hashable pieces + the network module)."""
    model: UNetModel
    diffusion: GaussianDiffusion
    adversary: AdversaryConfig
    sampler: TimestepSampler
    ema_rates: tuple[float, ...]
    input_perturb: float
    microbatches: int
    image_shape: tuple[int, int, int]   # [H, W, C]
    class_cond: bool


def build_experiment(config) -> Experiment:
    validate_config(config)
    diffusion = build_diffusion(config)
    m = config.model
    return Experiment(
        model=build_model(config), diffusion=diffusion, adversary=build_adversary(config),
        sampler=TimestepSampler(config.diffusion.schedule_sampler, diffusion.num_timesteps),
        ema_rates=tuple(float(r) for r in config.train.ema_rates),
        input_perturb=float(config.diffusion.input_perturb),
        microbatches=int(config.train.microbatches),
        image_shape=(m.image_size, m.image_size, m.in_channels), class_cond=bool(m.class_cond))
