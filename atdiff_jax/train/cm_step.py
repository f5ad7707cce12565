"""The consistency-model training step: ONE pure function per minibatch, with AT (SPEC §2.3).

``make_cm_train_step`` builds ``train_step(state, batch, teacher_params, schedule) -> (state,
metrics)`` for ``experiment.cm.kind`` in "cd" (Karras consistency distillation from a VP teacher
through ``vp_denoiser``), "ct" (consistency training) and "lcm" (``lcm_loss``). It is the DPM
step's twin (``step.py``): the same adversary driver (``run_adversary``: K inner updates with δ on
the student's input, l2/linf, step size and radius from ``config.adv``), the same micro-batching,
non-finite skipping, EMA copies and counter-based randomness, with these differences:

* The state is a ``CMTrainState``: ``target`` holds the target network θ⁻, an EMA of the student
  that the loss stop-gradients. It is updated after EVERY optimizer update, i.e. after each of
  the K inner updates of fast AT: each inner update is a full optimizer step in the DPM recipe,
  and θ⁻ tracks the optimizer's params, as in openai/consistency_models (one update, one EMA step).
* ``teacher_params`` (the frozen DPM teacher, ``{}`` for CT) is an argument, not part of the state:
  it is sharded like params and never donated or checkpointed.
* ``schedule`` = ``cm_schedule(experiment, step)``: the target EMA rate and N of
  ``create_ema_and_scales_fn`` at the minibatch count ``step``, computed on the host in float64
  as the reference does and passed as (traced) scalars, so a progressive N never recompiles.

Per-example draws: example i of the global batch draws its discretisation index (``indices``),
its noise and, for guided LCM, its guidance scale ``w`` from ``fold_in(example_root, i)`` (see
``cm_loss_batch``), so results do not depend on the device count.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atdiff_jax.adversarial.driver import run_adversary
from atdiff_jax.consistency.karras import vp_denoiser
from atdiff_jax.consistency.lcm import ddim_timesteps, lcm_loss
from atdiff_jax.consistency.losses import consistency_loss
from atdiff_jax.train.ema import ema_update
from atdiff_jax.train.experiment import Experiment
from atdiff_jax.train.state import CMTrainState, ema_key
from atdiff_jax.train.step import _all_finite, adversary_metrics, microbatched_grad_fn

__all__ = ["cm_loss_batch", "cm_schedule", "make_cm_train_step", "merge_teacher_params"]


def cm_schedule(experiment: Experiment, step: int) -> dict[str, np.ndarray]:
    """The traced schedule inputs of the step at minibatch count ``step`` (host-side).

    ``target_ema`` and ``target_ema_c`` = 1 - rate (both rounded once from float64 to float32)
    and ``num_scales`` (N; unused by LCM).
    """
    rate, scales = experiment.cm.ema_and_scales(int(step))
    return {"target_ema": np.float32(rate), "target_ema_c": np.float32(1.0 - rate),
            "num_scales": np.int32(scales)}


def cm_loss_batch(experiment: Experiment, batch: dict, *, step_key: jax.Array,
                  num_scales: jax.Array | int) -> dict[str, jax.Array]:
    """The loss batch of one minibatch: ``x_start``, per-example ``indices`` and ``noise`` (and
    ``w`` for guided LCM, ``y`` for class-conditional runs).

    ``step_key`` is ``fold_in(key(seed), step)``; example i draws from ``fold_in(fold_in(step_key,
    0), i)``: index from ``fold_in(k, 0)``, noise from ``fold_in(k, 1)``, w from ``fold_in(k, 2)``.
    Karras indices are uniform in [0, N-2], LCM DDIM indices in [0, T // k - 1].
    """
    cm = experiment.cm
    x0 = batch["image"]
    b = x0.shape[0]
    example_root = jax.random.fold_in(step_key, 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(example_root, i))(jnp.arange(b))
    if cm.kind == "lcm":
        high = len(ddim_timesteps(experiment.diffusion.num_timesteps, cm.lcm.skip))
    else:
        high = jnp.asarray(num_scales, jnp.int32) - 1
    indices = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, high))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(keys)
    out = {"x_start": x0, "indices": indices.astype(jnp.int32), "noise": noise}
    if cm.kind == "lcm" and cm.lcm.guidance:
        out["w"] = jax.vmap(lambda k: jax.random.uniform(
            jax.random.fold_in(k, 2), (), jnp.float32, cm.lcm.w_min, cm.lcm.w_max))(keys)
    if experiment.class_cond:
        out["y"] = batch["label"]
    return out


def merge_teacher_params(init: Any, teacher: Any) -> Any:
    """The student's initial params: the teacher's (host arrays) wherever the trees agree (same
    path and shape), ``init`` elsewhere (e.g. an LCM student's zero-initialised
    ``guidance_proj``). ``init`` may be abstract (``jax.eval_shape``): its unmatched leaves then
    stay ``ShapeDtypeStruct``s, which tells the caller a real init is needed."""
    flat_t = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(teacher)}

    def pick(path, x):
        v = flat_t.get(jax.tree_util.keystr(path))
        if v is None or tuple(np.shape(v)) != tuple(x.shape):
            return x
        return np.asarray(v, x.dtype)

    return jax.tree_util.tree_map_with_path(pick, init)


def make_cm_train_step(experiment: Experiment, optimizer: optax.GradientTransformation, *,
                       seed: int, lr_fn: Callable[[Any], Any], teacher_model=None,
                       teacher_diffusion=None) -> Callable:
    """Builds ``train_step(state, batch, teacher_params, schedule) -> (state, metrics)``.

    Args:
      experiment: a CM experiment (``experiment.cm`` set).
      teacher_model, teacher_diffusion: the DPM teacher's network and training chain (cd, lcm);
        its params are the step's third argument.
      seed: the run's seed; lr_fn: the learning rate of the optimizer-update count (a metric).

    ``batch``: ``image`` [B, H, W, C] in [-1, 1] (and ``label`` [B] for class-conditional runs);
    ``schedule``: ``cm_schedule(experiment, state.step)``.
    """
    exp = experiment
    cm = exp.cm
    if cm is None:
        raise ValueError("make_cm_train_step needs a consistency-model experiment (config.cm.kind)")
    if cm.kind in ("cd", "lcm") and teacher_model is None:
        raise ValueError(f"cm.kind={cm.kind!r} needs the teacher's model")
    model = exp.model

    def apply_fn(params, x, t, y, rng, **kw):
        return model.apply({"params": params}, x, t, y=y, train=True, rngs={"dropout": rng}, **kw)

    def teacher_apply(teacher_params, x, t, y):
        return teacher_model.apply({"params": teacher_params}, x, t, y=y, train=False)

    def loss_of_batch(params, delta, rng, mb, *, target, teacher_params, num_scales):
        if cm.kind == "lcm":
            return lcm_loss(
                params, delta, rng, batch=mb, apply_fn=apply_fn, diffusion=exp.diffusion,
                teacher_eps_fn=functools.partial(teacher_apply, teacher_params),
                target_params=target, settings=cm.lcm,
                teacher_from_perturbed=cm.teacher_from_perturbed, null_label=cm.null_label)
        teacher_denoise_fn = None
        if cm.kind == "cd":
            y = mb.get("y")
            teacher_denoise_fn = vp_denoiser(
                lambda x, t: teacher_apply(teacher_params, x, t, y), teacher_diffusion)
        return consistency_loss(
            params, delta, rng, batch=mb, apply_fn=apply_fn, num_scales=num_scales,
            target_params=target, teacher_denoise_fn=teacher_denoise_fn, denoiser=cm.denoiser,
            loss_norm=cm.loss_norm, solver=cm.solver if cm.kind == "cd" else "euler",
            teacher_from_perturbed=cm.teacher_from_perturbed, huber_c=cm.huber_c)

    def train_step(state: CMTrainState, batch: dict, teacher_params: Any, schedule: dict
                   ) -> tuple[CMTrainState, dict]:
        x0 = batch["image"]
        num_scales = schedule["num_scales"]
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        dropout_root = jax.random.fold_in(step_key, 1)
        loss_batch = cm_loss_batch(exp, batch, step_key=step_key, num_scales=num_scales)

        def grad_fn(params_and_target, delta, rng):
            # Differentiates w.r.t. the student's params (and δ) only; θ⁻ is a constant here.
            params, target = params_and_target
            lob = functools.partial(loss_of_batch, target=target, teacher_params=teacher_params,
                                    num_scales=num_scales)
            if exp.microbatches > 1:
                return microbatched_grad_fn(lob, loss_batch, exp.microbatches)(params, delta, rng)
            f = functools.partial(lob, mb=loss_batch)
            if delta is None:
                value, g = jax.value_and_grad(f, has_aux=True)(params, None, rng)
                return value, (g, None)
            return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, delta, rng)

        def apply_update(st: CMTrainState, grads, aux) -> CMTrainState:
            finite = _all_finite(grads) & jnp.all(jnp.isfinite(aux["loss"]))

            def update(st):
                updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
                params = optax.apply_updates(st.params, updates)
                target = ema_update(st.target, params, schedule["target_ema"],
                                    schedule["target_ema_c"])
                ema = {ema_key(r): ema_update(st.ema[ema_key(r)], params, r) for r in exp.ema_rates}
                return st.replace(params=params, target=target, opt_state=opt_state, ema=ema,
                                  updates=st.updates + 1)

            def skip(st):
                return st.replace(skipped=st.skipped + 1)

            return jax.lax.cond(finite, update, skip, st)

        state, m = run_adversary(None, state, dropout_root, adversary=exp.adversary,
                                 delta_shape=x0.shape, params_of=lambda s: (s.params, s.target),
                                 apply_update=apply_update, grad_fn=grad_fn)
        state = state.replace(step=state.step + 1)
        metrics = adversary_metrics(m, state, lr_fn, exp.adversary.kind)
        metrics["target_ema"] = jnp.asarray(schedule["target_ema"], jnp.float32)
        if cm.kind != "lcm":
            metrics["num_scales"] = jnp.asarray(num_scales, jnp.int32)
        return state, metrics

    return train_step
