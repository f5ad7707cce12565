"""What the train step minimises: the DPM denoising objective and the consistency-model objectives.

The train step (``step.py``) is the same for every objective: counter-based keys, the adversary
driver, micro-batching, one optimizer update with non-finite skipping, the EMA copies. An
objective supplies the rest:

* ``loss_batch(state, batch, step_key, schedule)``: the per-minibatch draws (timesteps or
  discretisation indices, noise, ...). Example i of the global batch draws from
  ``fold_in(fold_in(step_key, 0), i)``, so results do not depend on the device count.
* ``loss_of_batch(frozen, teacher_params, schedule)``: ``(params, delta, rng, mb) -> (loss, aux)``,
  the loss the step differentiates w.r.t. the params and δ (``aux["loss"]`` per example).
* ``frozen(state)``: the part of the state the loss reads but does not train (the CM target
  network θ⁻; ``None`` for DPM). It is read afresh at every inner update.
* ``after_update(state, mb, aux, schedule)``: what follows every optimizer update besides the EMA
  copies: the DPM timestep-sampler update, the CM target EMA.
* ``metrics(m, schedule)``: the objective's own metrics.

``schedule`` is a dict of host-side scalars (``step_schedule``): empty for DPM; for a consistency
model the target EMA rate and N at the minibatch count (``cm_schedule``), computed in float64 as
the reference does and passed as traced scalars, so a progressive N never recompiles.
``teacher_params`` (the frozen DPM teacher of CD and LCM) is a step input, not part of the state:
it is sharded like params and never donated or checkpointed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax.consistency.karras import vp_denoiser
from atdiff_jax.consistency.lcm import ddim_timesteps, lcm_loss
from atdiff_jax.consistency.losses import consistency_loss
from atdiff_jax.diffusion.objective import denoising_loss
from atdiff_jax.train.build import Experiment
from atdiff_jax.train.ema import ema_update

__all__ = ["ConsistencyObjective", "DenoisingObjective", "cm_loss_batch", "cm_schedule",
           "drop_labels", "objective_for", "step_schedule"]


def _example_keys(step_key: jax.Array, b: int) -> jax.Array:
    """The per-example keys [b] of a minibatch: ``fold_in(fold_in(step_key, 0), i)``."""
    example_root = jax.random.fold_in(step_key, 0)
    return jax.vmap(lambda i: jax.random.fold_in(example_root, i))(jnp.arange(b))


def _normal_per_example(keys: jax.Array, salt: int, shape) -> jax.Array:
    """One standard normal draw of ``shape`` per example, from ``fold_in(keys[i], salt)``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape))(keys)


def drop_labels(keys: jax.Array, labels: jax.Array, *, rate: float, null_label: int) -> jax.Array:
    """Classifier-free guidance training: each label [B] becomes ``null_label`` with probability
    ``rate``, drawn from ``fold_in(keys[i], 3)`` (``keys`` [B]: the per-example keys)."""
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 3)))(keys)
    return jnp.where(u < rate, jnp.asarray(null_label, labels.dtype), labels)


def step_schedule(experiment: Experiment, steps_done: int) -> dict[str, np.ndarray]:
    """The host-side scalars of the step after ``steps_done`` minibatches: ``cm_schedule`` for a
    consistency model, nothing for DPM."""
    return {} if experiment.cm is None else cm_schedule(experiment, steps_done)


@dataclasses.dataclass(frozen=True)
class DenoisingObjective:
    """DPM training: the (adversarial) denoising loss of ``diffusion/objective.py``.

    Example i draws its timestep from ``fold_in(k, 0)`` (the timestep sampler, with importance
    weights), its noise from ``fold_in(k, 1)``, the DDPM-IP input noise from ``fold_in(k, 2)`` and
    its label dropout (classifier-free guidance: the null class is ``num_classes - 1``) from
    ``fold_in(k, 3)``. The timestep sampler is updated with the per-example losses after every
    optimizer update.
    """
    experiment: Experiment

    def _apply(self, params, x, t, y, rng):
        return self.experiment.model.apply({"params": params}, x, t, y=y, train=True,
                                           rngs={"dropout": rng})

    def loss_batch(self, state, batch: dict, step_key: jax.Array, schedule: dict) -> dict:
        exp = self.experiment
        x0 = batch["image"]
        keys = _example_keys(step_key, x0.shape[0])
        t, weights = exp.timestep_sampler.sample_per_example(
            state.timestep_sampler, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
        out = {"x_start": x0, "t": t, "noise": _normal_per_example(keys, 1, x0.shape[1:]),
               "weights": weights}
        if exp.class_cond:
            y = batch["label"]
            if exp.label_dropout:
                y = drop_labels(keys, y, rate=exp.label_dropout, null_label=exp.num_classes - 1)
            out["y"] = y
        if exp.input_perturb:
            out["ip_noise"] = _normal_per_example(keys, 2, x0.shape[1:])
        return out

    def loss_of_batch(self, frozen, teacher_params, schedule):
        exp = self.experiment
        return functools.partial(_denoising_loss_of_batch, apply_fn=self._apply,
                                 diffusion=exp.diffusion, target_type=exp.adversary.target_type,
                                 input_perturb=exp.input_perturb)

    def frozen(self, state) -> None:
        return None

    def after_update(self, state, mb: dict, aux: dict, schedule: dict):
        exp = self.experiment
        return state.replace(timestep_sampler=exp.timestep_sampler.update(
            state.timestep_sampler, mb["t"], aux["loss"]))

    def metrics(self, m: dict, schedule: dict) -> dict:
        return {k: jnp.mean(m["aux"][k]) for k in ("mse", "vb") if k in m["aux"]}


def _denoising_loss_of_batch(params, delta, rng, mb, **kw):
    return denoising_loss(params, delta, rng, batch=mb, **kw)


def cm_schedule(experiment: Experiment, step: int) -> dict[str, np.ndarray]:
    """The traced schedule inputs of the CM step at minibatch count ``step`` (host-side).

    ``target_ema`` and ``target_ema_c`` = 1 - rate (both rounded once from float64 to float32)
    and ``num_scales`` (N; unused by LCM).
    """
    rate, scales = experiment.cm.ema_and_scales(int(step))
    return {"target_ema": np.float32(rate), "target_ema_c": np.float32(1.0 - rate),
            "num_scales": np.int32(scales)}


def cm_loss_batch(experiment: Experiment, batch: dict, *, step_key: jax.Array,
                  num_scales: jax.Array | int) -> dict[str, jax.Array]:
    """The loss batch of one CM minibatch: ``x_start``, per-example ``indices`` and ``noise`` (and
    ``w`` for guided LCM, ``y`` for class-conditional runs).

    ``step_key`` is ``fold_in(key(seed), step)``; example i draws from ``fold_in(fold_in(step_key,
    0), i)``: index from ``fold_in(k, 0)``, noise from ``fold_in(k, 1)``, w from ``fold_in(k, 2)``.
    Karras indices are uniform in [0, N-2], LCM DDIM indices in [0, T // k - 1].
    """
    cm = experiment.cm
    x0 = batch["image"]
    keys = _example_keys(step_key, x0.shape[0])
    if cm.kind == "lcm":
        high = len(ddim_timesteps(experiment.diffusion.num_timesteps, cm.lcm.skip))
    else:
        high = jnp.asarray(num_scales, jnp.int32) - 1
    indices = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, high))(keys)
    out = {"x_start": x0, "indices": indices.astype(jnp.int32),
           "noise": _normal_per_example(keys, 1, x0.shape[1:])}
    if cm.kind == "lcm" and cm.lcm.guidance:
        out["w"] = jax.vmap(lambda k: jax.random.uniform(
            jax.random.fold_in(k, 2), (), jnp.float32, cm.lcm.w_min, cm.lcm.w_max))(keys)
    if experiment.class_cond:
        out["y"] = batch["label"]
    return out


@dataclasses.dataclass(frozen=True)
class ConsistencyObjective:
    """Consistency models with AT (docs/method.md, "AT for consistency models"): ``cm.kind`` "cd"
    (Karras consistency distillation from a VP teacher through ``vp_denoiser``), "ct"
    (consistency training) or "lcm" (``lcm_loss``); δ is on the student's input.

    The target network θ⁻ (``CMTrainState.target``, stop-gradiented in the loss) is an EMA of the
    student updated after EVERY optimizer update, i.e. after each of the K inner updates of fast
    AT: each inner update is a full optimizer step in the DPM recipe, and θ⁻ tracks the
    optimizer's params, as in openai/consistency_models (one update, one EMA step).
    """
    experiment: Experiment
    teacher_model: Any = None       # the DPM teacher's network (cd, lcm)
    teacher_diffusion: Any = None   # its training chain (cd)

    def __post_init__(self):
        cm = self.experiment.cm
        if cm is None:
            raise ValueError("ConsistencyObjective needs a consistency-model experiment "
                             "(config.cm.kind)")
        if cm.kind in ("cd", "lcm") and self.teacher_model is None:
            raise ValueError(f"cm.kind={cm.kind!r} needs the teacher's model")

    def _apply(self, params, x, t, y, rng, **kw):
        return self.experiment.model.apply({"params": params}, x, t, y=y, train=True,
                                           rngs={"dropout": rng}, **kw)

    def _teacher_apply(self, teacher_params, x, t, y):
        return self.teacher_model.apply({"params": teacher_params}, x, t, y=y, train=False)

    def loss_batch(self, state, batch: dict, step_key: jax.Array, schedule: dict) -> dict:
        if "num_scales" not in schedule:
            raise ValueError("a consistency-model step needs its schedule: "
                             "cm_schedule(experiment, state.step)")
        return cm_loss_batch(self.experiment, batch, step_key=step_key,
                             num_scales=schedule["num_scales"])

    def loss_of_batch(self, frozen, teacher_params, schedule):
        return functools.partial(self._loss, target=frozen, teacher_params=teacher_params,
                                 num_scales=schedule["num_scales"])

    def _loss(self, params, delta, rng, mb, *, target, teacher_params, num_scales):
        exp, cm = self.experiment, self.experiment.cm
        if cm.kind == "lcm":
            return lcm_loss(
                params, delta, rng, batch=mb, apply_fn=self._apply, diffusion=exp.diffusion,
                teacher_eps_fn=functools.partial(self._teacher_apply, teacher_params),
                target_params=target, settings=cm.lcm,
                teacher_from_perturbed=cm.teacher_from_perturbed, null_label=cm.null_label)
        teacher_denoise_fn = None
        if cm.kind == "cd":
            y = mb.get("y")
            teacher_denoise_fn = vp_denoiser(
                lambda x, t: self._teacher_apply(teacher_params, x, t, y), self.teacher_diffusion)
        return consistency_loss(
            params, delta, rng, batch=mb, apply_fn=self._apply, num_scales=num_scales,
            target_params=target, teacher_denoise_fn=teacher_denoise_fn, denoiser=cm.denoiser,
            loss_norm=cm.loss_norm, solver=cm.solver if cm.kind == "cd" else "euler",
            teacher_from_perturbed=cm.teacher_from_perturbed, huber_c=cm.huber_c)

    def frozen(self, state):
        return state.target

    def after_update(self, state, mb: dict, aux: dict, schedule: dict):
        return state.replace(target=ema_update(state.target, state.params, schedule["target_ema"],
                                               schedule["target_ema_c"]))

    def metrics(self, m: dict, schedule: dict) -> dict:
        out = {"target_ema": jnp.asarray(schedule["target_ema"], jnp.float32)}
        if self.experiment.cm.kind != "lcm":
            out["num_scales"] = jnp.asarray(schedule["num_scales"], jnp.int32)
        return out


def objective_for(experiment: Experiment, *, teacher_model=None, teacher_diffusion=None):
    """The objective of ``experiment``: consistency (``experiment.cm`` set) or denoising."""
    if experiment.cm is None:
        return DenoisingObjective(experiment)
    return ConsistencyObjective(experiment, teacher_model, teacher_diffusion)
