"""From a config to the objects of an experiment: network, diffusion, adversary, sampler, optimizer
and, for consistency models (``config.cm.kind != "none"``), the CM settings.

``validate_config`` rejects bad values at start-up with the option's name and the allowed values,
before anything is compiled or written; ``check_teacher_config`` checks a CM run against the
config of its teacher run.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import optax

from atdiff_jax.adversarial.perturb import KINDS, NORMS, RADIUS_SCALINGS, AdversaryConfig
from atdiff_jax.consistency.karras import WEIGHT_SCHEDULES, KarrasDenoiser
from atdiff_jax.consistency.lcm import LCM_LOSS_NORMS, LCMSettings
from atdiff_jax.consistency.losses import LOSS_NORMS as CD_LOSS_NORMS
from atdiff_jax.consistency.losses import SOLVERS as CD_SOLVERS
from atdiff_jax.consistency.schedule import SCALE_MODES, TARGET_EMA_MODES, create_ema_and_scales_fn
from atdiff_jax.diffusion.gaussian import (TARGET_TYPES, GaussianDiffusion,
                                           create_gaussian_diffusion)
from atdiff_jax.diffusion.schedules import SCHEDULES
from atdiff_jax.diffusion.timestep_sampler import TIMESTEP_SAMPLERS, TimestepSampler
from atdiff_jax.models.adm import create_model
from atdiff_jax.models.unet import NUM_GROUPS, UNetModel
from atdiff_jax.samplers import CM_SAMPLERS, DPM_SAMPLERS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CM_KINDS = ("none", "cd", "ct", "lcm")
# model options that fix the network's parameters (a student initialised from its teacher must
# have the teacher's values)
ARCH_KEYS = ("image_size", "in_channels", "num_channels", "num_res_blocks", "channel_mult",
             "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
             "use_scale_shift_norm", "resblock_updown", "use_new_attention_order", "learn_sigma",
             "class_cond", "num_classes", "norm_groups")
# values of ARCH_KEYS in configs written before the option existed
ARCH_DEFAULTS = {"norm_groups": 32}
# diffusion options an LCM student shares with its teacher (it uses the teacher's chain)
CHAIN_KEYS = ("steps", "noise_schedule", "rescale_timesteps", "predict_xstart")


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


def cm_kind(config) -> str:
    """``config.cm.kind``; "none" (DPM) for configs written before the ``cm`` section existed."""
    return config.cm.kind if "cm" in config else "none"


def _bool(config, path: str) -> None:
    value = _get(config, path)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{path} must be True or False, got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first invalid option."""
    _choice(config, "diffusion.noise_schedule", SCHEDULES)
    _choice(config, "diffusion.schedule_sampler", TIMESTEP_SAMPLERS)
    _choice(config, "adv.kind", KINDS)
    _choice(config, "adv.norm", NORMS)
    _choice(config, "adv.radius_scaling", RADIUS_SCALINGS)
    _choice(config, "adv.target_type", TARGET_TYPES)
    _choice(config, "model.dtype", tuple(DTYPES))
    if "cm" in config:
        _choice(config, "cm.kind", CM_KINDS)
    if cm_kind(config) == "none":
        _choice(config, "train.sampler", DPM_SAMPLERS)
    else:
        if _get(config, "train.sampler") not in CM_SAMPLERS:
            raise ConfigError(f"config.train.sampler must be one of {CM_SAMPLERS} for a "
                              f"consistency model (cm.kind={cm_kind(config)!r}), got "
                              f"{config.train.sampler!r}")
    for path in ("adv.steps", "train.global_batch_size", "train.microbatches",
                 "train.num_minibatches", "train.keep_checkpoints", "train.num_samples",
                 "train.sample_steps", "train.log_every", "train.checkpoint_every",
                 "diffusion.steps", "model.image_size", "model.in_channels", "model.num_channels",
                 "model.num_res_blocks", "mesh.fsdp"):
        _positive(config, path, integer=True)
    if "norm_groups" in config.model:  # configs written before the option existed mean 32
        _positive(config, "model.norm_groups", integer=True)
    for path in ("adv.step_size", "adv.max_norm", "optim.weight_decay", "optim.warmup_steps",
                 "optim.grad_clip", "diffusion.input_perturb", "train.sample_every",
                 "model.dropout"):
        _positive(config, path, allow_zero=True)
    for path in ("optim.lr", "optim.eps", "adv.grad_scale"):
        _positive(config, path)
    for path in ("optim.b1", "optim.b2"):
        if not 0 <= _get(config, path) < 1:
            raise ConfigError(f"config.{path} must be in [0, 1), got {_get(config, path)!r}")
    if "decay" in config.optim:   # configs written before the option existed are constant
        _choice(config, "optim.decay", LR_DECAYS)
        if config.optim.decay != "none":
            _positive(config, "optim.decay_steps", integer=True)
            if config.optim.decay_steps <= config.optim.warmup_steps:
                raise ConfigError(f"config.optim.decay_steps ({config.optim.decay_steps}) must be "
                                  f"larger than config.optim.warmup_steps "
                                  f"({config.optim.warmup_steps}): the decay follows the warm-up")
            _positive(config, "optim.end_lr_factor", allow_zero=True)
            if config.optim.end_lr_factor > 1:
                raise ConfigError(f"config.optim.end_lr_factor must be in [0, 1], got "
                                  f"{config.optim.end_lr_factor!r}")
    rates = tuple(_get(config, "train.ema_rates"))
    if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1
                        for r in rates):   # `--config.train.ema_rates=0.99,abc` gives a str
        raise ConfigError(f"config.train.ema_rates must be a non-empty list of rates in [0, 1), "
                          f"got {rates!r}")
    if config.train.global_batch_size % config.train.microbatches:
        raise ConfigError(f"config.train.global_batch_size ({config.train.global_batch_size}) must "
                          f"be divisible by config.train.microbatches ({config.train.microbatches})")
    if config.model.dropout >= 1:
        raise ConfigError(f"config.model.dropout must be in [0, 1), got {config.model.dropout!r}")
    if config.model.class_cond and config.model.num_classes < 1:
        raise ConfigError("config.model.num_classes must be >= 1 for a class-conditional model")
    label_dropout = config.train.get("label_dropout", 0.0)
    if isinstance(label_dropout, bool) or not isinstance(label_dropout, (int, float)) or not (
            0 <= label_dropout < 1):
        raise ConfigError(f"config.train.label_dropout must be in [0, 1), got {label_dropout!r}")
    if label_dropout and (not config.model.class_cond or config.model.num_classes < 2):
        raise ConfigError("config.train.label_dropout > 0 (classifier-free guidance training) "
                          "needs a class-conditional model (config.model.class_cond=True) whose last "
                          "class, num_classes - 1, is the null class (num_classes >= 2)")
    if cm_kind(config) != "none":
        _validate_cm(config)
    _validate_init(config)
    try:
        build_model(config)
        build_diffusion(config)
        build_cm_settings(config)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid model/diffusion/cm config: {e}") from None


def _validate_init(config) -> None:
    init = config.get("init", {})
    if not init.get("workdir", ""):
        return
    if init.get("checkpoint", ""):
        raise ConfigError("config.init.workdir and config.init.checkpoint both set: start from "
                          "either an atdiff_jax run or a PyTorch checkpoint, not both")
    if cm_kind(config) != "none":
        raise ConfigError("config.init.workdir starts a DPM run from another DPM run; a "
                          "consistency model starts from its teacher (config.teacher.workdir, "
                          "cm.init_from_teacher)")
    step = init.get("step", -1)
    if isinstance(step, bool) or not isinstance(step, int) or step < -1:
        raise ConfigError(f"config.init.step must be a checkpoint step or -1 (the newest), got "
                          f"{step!r}")
    rate = init.get("ema_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"config.init.ema_rate must be in [0, 1) (0 = the source run's first "
                          f"rate), got {rate!r}")


# Fields of the data-iterator state (atdiff_jax.data.pipeline.TrainIterator) that fix the data
# order of a run, and the options that set them.
DATA_ORDER_OPTIONS = {"dataset": "data.dataset", "split": "data.split",
                      "global_batch_size": "train.global_batch_size", "seed": "seed",
                      "random_flip": "data.random_flip", "class_cond": "model.class_cond",
                      "image_size": "model.image_size"}


def resume_data_error(mismatched: dict, workdir, step: int) -> ConfigError:
    """The error for resuming ``workdir`` at checkpoint ``step`` with options that change its
    data order; ``mismatched`` maps data-iterator state fields to ``(saved, now)``."""
    diffs, keep = [], []
    for field, (saved, now) in sorted(mismatched.items()):
        option = DATA_ORDER_OPTIONS.get(field)
        if option is None:  # e.g. num_records: the prepared dataset itself changed
            diffs.append(f"the dataset's {field} is {now!r}, the run was saved with {saved!r}")
            continue
        diffs.append(f"config.{option} is {now!r}, the run was saved with {saved!r}")
        keep.append(f"--config.{option}={saved}")
    fix = (f"resume with the saved value{'s' if len(keep) > 1 else ''} ({' '.join(keep)})"
           if keep else "resume with the dataset the run was saved with")
    return ConfigError(f"cannot resume {workdir} from checkpoint step {step}: " + "; ".join(diffs)
                       + ". These options fix the data order stored in the checkpoint: "
                       f"{fix}, or train in a new workdir")


def check_init_config(config, source_config, workdir: str) -> None:
    """Raises :class:`ConfigError` when the DPM run in ``workdir`` (config ``source_config``) cannot
    initialise the run ``config`` (``config.init.workdir``): a CM run, or another network."""
    if cm_kind(source_config) != "none":
        raise ConfigError(f"config.init.workdir: the run in {workdir} is a consistency-model run "
                          f"(cm.kind={cm_kind(source_config)!r}); it must be a DPM run")
    m, sm = config.model, source_config.model
    diffs = [f"model.{k}: {m.get(k, ARCH_DEFAULTS.get(k))!r} here, "
             f"{sm.get(k, ARCH_DEFAULTS.get(k))!r} in the source run" for k in ARCH_KEYS
             if m.get(k, ARCH_DEFAULTS.get(k)) != sm.get(k, ARCH_DEFAULTS.get(k))]
    if diffs:
        raise ConfigError(f"config.init.workdir: the network differs from the run in {workdir} "
                          "(its params are copied): " + "; ".join(diffs))


def _validate_cm(config) -> None:
    """The ``cm`` and ``teacher`` sections of a consistency-model run."""
    kind = cm_kind(config)
    if "teacher" not in config:
        raise ConfigError("config.teacher is missing")
    for path in ("cm.init_from_teacher", "cm.teacher_from_perturbed", "cm.lcm.guidance"):
        _bool(config, path)
    _choice(config, "cm.target_ema_mode", TARGET_EMA_MODES)
    _choice(config, "cm.scale_mode", SCALE_MODES)
    for path in ("cm.start_scales", "cm.end_scales", "cm.distill_steps_per_iter"):
        _positive(config, path, integer=True)
    _positive(config, "cm.total_steps", integer=True, allow_zero=True)
    if not 0 < _get(config, "cm.start_ema") <= 1:
        raise ConfigError(f"config.cm.start_ema must be in (0, 1], got {config.cm.start_ema!r}")
    _positive(config, "cm.huber_c", allow_zero=True)
    try:
        create_ema_and_scales_fn(config.cm.target_ema_mode, float(config.cm.start_ema),
                                 config.cm.scale_mode, int(config.cm.start_scales),
                                 int(config.cm.end_scales), int(config.train.num_minibatches),
                                 int(config.cm.distill_steps_per_iter))
    except ValueError as e:
        raise ConfigError(f"config.cm.target_ema_mode / config.cm.scale_mode: {e}") from None
    if config.diffusion.input_perturb:
        raise ConfigError(f"config.diffusion.input_perturb (DDPM-IP) applies to DPM training only, "
                          f"not to cm.kind={kind!r}; set it to 0")
    if kind in ("cd", "ct"):
        _choice(config, "cm.loss_norm", CD_LOSS_NORMS)
        _choice(config, "cm.solver", CD_SOLVERS)
        _choice(config, "cm.weight_schedule", WEIGHT_SCHEDULES)
        for path in ("cm.sigma_min", "cm.sigma_max", "cm.rho", "cm.sigma_data"):
            _positive(config, path)
        if not config.cm.sigma_min < config.cm.sigma_max:
            raise ConfigError(f"config.cm.sigma_min ({config.cm.sigma_min}) must be < "
                              f"config.cm.sigma_max ({config.cm.sigma_max})")
        for path in ("cm.start_scales", "cm.end_scales"):
            if _get(config, path) < 2:
                raise ConfigError(f"config.{path} must be an integer >= 2 (the number of "
                                  f"discretisation points N), got {_get(config, path)!r}")
    else:  # lcm
        _choice(config, "cm.loss_norm", LCM_LOSS_NORMS)
        _positive(config, "cm.lcm.skip", integer=True)
        if config.cm.lcm.skip > config.diffusion.steps:
            raise ConfigError(f"config.cm.lcm.skip ({config.cm.lcm.skip}) must be <= "
                              f"config.diffusion.steps ({config.diffusion.steps}), the teacher's "
                              "chain")
        for path in ("cm.lcm.timestep_scaling", "cm.lcm.sigma_data"):
            _positive(config, path)
        if config.diffusion.predict_xstart:
            raise ConfigError("cm.kind='lcm' needs an epsilon-prediction teacher: "
                              "config.diffusion.predict_xstart must be False")
        if config.cm.lcm.guidance:
            _positive(config, "cm.lcm.guidance_embed_dim", integer=True)
            lo, hi, w = config.cm.lcm.w_min, config.cm.lcm.w_max, config.cm.lcm.sample_w
            if not 0 <= lo <= hi:
                raise ConfigError(f"config.cm.lcm.w_min/w_max must satisfy 0 <= w_min <= w_max, "
                                  f"got {lo!r}, {hi!r}")
            if not lo <= w <= hi:
                raise ConfigError(f"config.cm.lcm.sample_w ({w!r}) must be in [w_min, w_max] = "
                                  f"[{lo!r}, {hi!r}]")
            if not config.model.class_cond or config.model.num_classes < 2:
                raise ConfigError("config.cm.lcm.guidance needs a class-conditional teacher and "
                                  "student (config.model.class_cond=True) whose last class, "
                                  "num_classes - 1, is the null class")
    t = config.teacher
    if kind in ("cd", "lcm") and not (isinstance(t.workdir, str) and t.workdir):
        raise ConfigError(f"config.teacher.workdir must name the DPM run to distil for cm.kind="
                          f"{kind!r} (e.g. --config.teacher.workdir=runs/mnist_adm), got "
                          f"{t.workdir!r}")
    if not (isinstance(t.ema_rate, (int, float)) and 0 <= t.ema_rate < 1):
        raise ConfigError(f"config.teacher.ema_rate must be in [0, 1) (0 = the teacher run's first "
                          f"rate), got {t.ema_rate!r}")
    if not isinstance(t.step, int) or isinstance(t.step, bool) or t.step < -1:
        raise ConfigError(f"config.teacher.step must be -1 (newest) or a checkpoint step, got "
                          f"{t.step!r}")


def check_teacher_config(config, teacher_config, workdir: str) -> None:
    """Raises :class:`ConfigError` when the DPM run in ``workdir`` (its config ``teacher_config``)
    cannot be the teacher of the CM run ``config``."""
    where = f"the teacher run in {workdir}"
    if cm_kind(teacher_config) != "none":
        raise ConfigError(f"config.teacher.workdir: {where} is a consistency-model run (cm.kind="
                          f"{cm_kind(teacher_config)!r}); the teacher must be a DPM run")
    if teacher_config.diffusion.predict_xstart:
        raise ConfigError(f"config.teacher.workdir: {where} predicts x_0; distillation needs an "
                          "epsilon-prediction teacher")
    m, tm = config.model, teacher_config.model
    keys = ARCH_KEYS if config.cm.init_from_teacher else ("image_size", "in_channels", "class_cond")
    unconditional = not m.class_cond and not tm.class_cond
    mine = {k: m.get(k, ARCH_DEFAULTS.get(k)) for k in keys}
    theirs = {k: tm.get(k, ARCH_DEFAULTS.get(k)) for k in keys}
    diffs = [f"model.{k}: {mine[k]!r} here, {theirs[k]!r} in the teacher" for k in keys
             if mine[k] != theirs[k] and not (k == "num_classes" and unconditional)]
    if not config.cm.init_from_teacher and m.class_cond and m.num_classes != tm.num_classes:
        diffs.append(f"model.num_classes: {m.num_classes!r} here, {tm.num_classes!r} in the teacher")
    if cm_kind(config) == "lcm":
        diffs += [f"diffusion.{k}: {config.diffusion[k]!r} here, {teacher_config.diffusion[k]!r} in "
                  f"the teacher" for k in CHAIN_KEYS
                  if config.diffusion[k] != teacher_config.diffusion[k]]
    if diffs:
        why = ("cm.init_from_teacher copies its params" if config.cm.init_from_teacher
               else "the data and labels are shared")
        raise ConfigError(f"config does not match {where} ({why}; the LCM student also uses the "
                          f"teacher's chain): " + "; ".join(diffs) + ". Set these options to the "
                          "teacher's values" + ("" if not config.cm.init_from_teacher else
                                                " or --config.cm.init_from_teacher=False"))
    if (cm_kind(config) == "lcm" and config.cm.lcm.guidance
            and not teacher_config.train.get("label_dropout", 0.0)):
        raise ConfigError(f"config.cm.lcm.guidance: {where} was trained without label dropout "
                          "(train.label_dropout = 0), so its null class (the unconditional branch "
                          "of classifier-free guidance) is untrained")


def build_model(config) -> UNetModel:
    m = config.model
    model = create_model(
        image_size=m.image_size, num_channels=m.num_channels, num_res_blocks=m.num_res_blocks,
        channel_mult=m.channel_mult, learn_sigma=m.learn_sigma, class_cond=m.class_cond,
        use_checkpoint=m.use_checkpoint, attention_resolutions=m.attention_resolutions,
        num_heads=m.num_heads, num_head_channels=m.num_head_channels,
        num_heads_upsample=m.num_heads_upsample, use_scale_shift_norm=m.use_scale_shift_norm,
        dropout=m.dropout, resblock_updown=m.resblock_updown,
        use_new_attention_order=m.use_new_attention_order, in_channels=m.in_channels,
        num_classes=m.num_classes if m.class_cond else None, dtype=DTYPES[m.dtype],
        norm_groups=m.get("norm_groups", NUM_GROUPS))
    if cm_kind(config) == "lcm" and config.cm.lcm.guidance:
        model = model.clone(guidance_embed_dim=int(config.cm.lcm.guidance_embed_dim))
    return model


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


LR_DECAYS = ("none", "cosine", "linear")


def lr_schedule(config) -> optax.Schedule:
    """Learning rate as a function of the optimizer-update count: a linear warm-up from 0 over
    ``optim.warmup_steps`` updates, then ``optim.lr`` constant (``optim.decay="none"``) or decayed
    (cosine or linear) to ``end_lr_factor * lr`` at update ``optim.decay_steps``, constant after.

    Configs written before the decay options existed (no ``optim.decay``) are constant."""
    o = config.optim
    warmup, decay = int(o.warmup_steps), o.get("decay", "none")
    if decay == "none":
        if warmup:
            return optax.warmup_constant_schedule(0.0, o.lr, warmup)
        return optax.constant_schedule(o.lr)
    end = float(o.end_lr_factor) * o.lr
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, int(o.decay_steps), end)
    linear = optax.linear_schedule(o.lr, end, int(o.decay_steps) - warmup)
    if not warmup:
        return linear
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), linear], [warmup])


@dataclasses.dataclass(frozen=True)
class CMSettings:
    """What a consistency-model run needs beyond a DPM run (see ``config.cm``)."""
    kind: str                                # "cd" | "ct" | "lcm"
    denoiser: KarrasDenoiser                 # cd/ct: sigma range, rho, sigma_data, weights
    loss_norm: str
    solver: str                              # cd/ct ODE step
    huber_c: float | None                    # None: the loss's default
    teacher_from_perturbed: bool
    init_from_teacher: bool
    lcm: LCMSettings | None                  # lcm only
    null_label: int | None                   # lcm with guidance: the teacher's null class
    sample_w: float                          # lcm with guidance: w of the sample grids / CLI
    sample_scales: int                       # cd/ct: N of the multistep sampler's schedule
    # step (minibatches done) -> (target EMA rate, N); host-side, see create_ema_and_scales_fn
    ema_and_scales: Callable[[int], tuple[float, int]] = dataclasses.field(compare=False)


def build_cm_settings(config) -> CMSettings | None:
    """The CM settings of ``config`` (None for a DPM run)."""
    kind = cm_kind(config)
    if kind == "none":
        return None
    c = config.cm
    total = int(c.total_steps) or int(config.train.num_minibatches)
    fn = create_ema_and_scales_fn(c.target_ema_mode, float(c.start_ema), c.scale_mode,
                                  int(c.start_scales), int(c.end_scales), total,
                                  int(c.distill_steps_per_iter))
    lcm = None
    if kind == "lcm":
        lcm = LCMSettings(skip=int(c.lcm.skip), sigma_data=float(c.lcm.sigma_data),
                          timestep_scaling=float(c.lcm.timestep_scaling), loss_norm=c.loss_norm,
                          huber_c=float(c.huber_c) or 0.001, guidance=bool(c.lcm.guidance),
                          w_min=float(c.lcm.w_min), w_max=float(c.lcm.w_max))
    guided = lcm is not None and lcm.guidance
    return CMSettings(
        kind=kind,
        denoiser=KarrasDenoiser(sigma_data=float(c.sigma_data), sigma_min=float(c.sigma_min),
                                sigma_max=float(c.sigma_max), rho=float(c.rho), distillation=True,
                                weight_schedule=c.weight_schedule),
        loss_norm=c.loss_norm, solver=c.solver, huber_c=float(c.huber_c) or None,
        teacher_from_perturbed=bool(c.teacher_from_perturbed),
        init_from_teacher=bool(c.init_from_teacher), lcm=lcm,
        null_label=int(config.model.num_classes) - 1 if guided else None,
        sample_w=float(c.lcm.sample_w) if guided else 0.0,
        sample_scales=max(int(fn(total)[1]), 2), ema_and_scales=fn)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything the step needs that is not state (hashable pieces + the network module)."""
    model: UNetModel
    diffusion: GaussianDiffusion
    adversary: AdversaryConfig
    timestep_sampler: TimestepSampler
    ema_rates: tuple[float, ...]
    input_perturb: float
    microbatches: int
    image_shape: tuple[int, int, int]   # [H, W, C]
    class_cond: bool
    cm: CMSettings | None = None        # a consistency-model run (None: DPM)
    label_dropout: float = 0.0          # DPM: classifier-free guidance label dropout
    num_classes: int | None = None      # classes of the labels (None: unconditional)

    @property
    def sample_classes(self) -> int | None:
        """Labels to draw for samples: the real classes (the null class excluded), or None."""
        if not self.class_cond:
            return None
        null = self.label_dropout > 0 or (self.cm is not None and self.cm.null_label is not None)
        return self.num_classes - 1 if null else self.num_classes


def build_experiment(config) -> Experiment:
    validate_config(config)
    diffusion = build_diffusion(config)
    m = config.model
    return Experiment(
        model=build_model(config), diffusion=diffusion, adversary=build_adversary(config),
        timestep_sampler=TimestepSampler(config.diffusion.schedule_sampler,
                                         diffusion.num_timesteps),
        ema_rates=tuple(float(r) for r in config.train.ema_rates),
        input_perturb=float(config.diffusion.input_perturb),
        microbatches=int(config.train.microbatches),
        image_shape=(m.image_size, m.image_size, m.in_channels), class_cond=bool(m.class_cond),
        cm=build_cm_settings(config), label_dropout=float(config.train.get("label_dropout", 0.0)),
        num_classes=int(m.num_classes) if m.class_cond else None)
