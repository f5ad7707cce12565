"""The training step of DPM and consistency-model runs: ONE pure function per minibatch,
``train_step(state, batch, teacher_params, schedule) -> (state, metrics)``.

It draws the minibatch's timesteps (or CM indices) and noise, runs the adversary's K inner updates
(``run_adversary``: one forward/backward per update, micro-batched when asked), applies each
update unless a gradient or loss is not finite (then it is counted in ``state.skipped``), keeps
the EMA copies, and returns scalar metrics. What is minimised and what follows every update (the
timestep-sampler update of DPM, the target EMA of CM) is the objective's (``objectives.py``). It
is compiled once with ``jax.jit`` and shardings (see ``sharding.py``).

Randomness is counter-based: the minibatch key is ``fold_in(key(seed), state.step)``; example i of
the global batch draws its timestep and noise from ``fold_in(fold_in(step_key, 0), i)`` and
dropout uses ``fold_in(step_key, 1)``, so results do not depend on the number of devices or
processes, and a resumed run draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from atdiff_jax.adversarial.driver import run_adversary, value_and_grads
from atdiff_jax.train.build import Experiment
from atdiff_jax.train.ema import ema_update
from atdiff_jax.train.objectives import objective_for
from atdiff_jax.train.state import TrainState, ema_key


def all_finite(tree) -> jax.Array:
    """True when every leaf of ``tree`` is finite everywhere (a scalar bool array)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _split_micro(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [m, B/m, ...] taking every m-th example (keeps each device's rows local)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_split_micro`."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def microbatched_grad_fn(loss_of_batch: Callable, batch: dict, m: int) -> Callable:
    """A driver ``grad_fn`` that accumulates gradients over ``m`` micro-batches with a scan.

    ``loss_of_batch(params, delta, rng, batch) -> (loss, aux)``. The loss and gradients equal those
    of the whole batch (mean of equal-sized means); dropout draws a different key per micro-batch.
    """
    micro = jax.tree.map(functools.partial(_split_micro, m=m), batch)

    def grad_fn(params, delta, rng):
        with_delta = delta is not None
        vg = jax.value_and_grad(loss_of_batch, argnums=(0, 1) if with_delta else 0, has_aux=True)
        deltas = _split_micro(delta, m) if with_delta else jnp.zeros((m,))

        def body(acc, xs):
            j, mb, d = xs
            rng_j = None if rng is None else jax.random.fold_in(rng, j)
            (loss, aux), g = vg(params, d if with_delta else None, rng_j, mb)
            g_params, g_delta = g if with_delta else (g, jnp.zeros(()))
            return jax.tree.map(jnp.add, acc, g_params), (loss, aux, g_delta)

        zeros = jax.tree.map(jnp.zeros_like, params)
        # Unrolled: see the note on XLA:CPU loops in atdiff_jax/adversarial/driver.py.
        acc, (losses, aux, g_delta) = jax.lax.scan(body, zeros, (jnp.arange(m), micro, deltas),
                                                   unroll=True)
        grads = jax.tree.map(lambda g: g / m, acc)
        aux = jax.tree.map(_merge_micro, aux)
        # d mean_B / d delta = (1/m) d mean_{B/m} / d delta on each micro-batch.
        g_delta = _merge_micro(g_delta) / m if with_delta else None
        return (jnp.mean(losses), aux), (grads, g_delta)

    return grad_fn


def adversary_metrics(m: dict, state: Any, lr_fn: Callable, kind: str) -> dict:
    """Per-minibatch metrics from ``run_adversary``'s per-inner-step outputs ``m`` [K, ...].

    ``loss`` is the mean over the K inner steps; for fast AT step 0 is clean (δ = 0), so it is
    ``loss_clean`` and the later ones give ``loss_adv``; for PGD the single update is adversarial.
    """
    losses = m["loss"]
    metrics = {"loss": jnp.mean(losses)}
    if kind == "pgd":
        metrics["loss_adv"] = losses[0]
    else:
        metrics["loss_clean"] = losses[0]
        if losses.shape[0] > 1:
            metrics["loss_adv"] = jnp.mean(losses[1:])
    metrics.update({
        "delta_norm": jnp.mean(m["delta_norm"][-1]),
        "delta_grad_norm": jnp.mean(m["delta_grad_norm"]),
        "grad_norm": jnp.mean(m["grad_norm"]),
        "lr": jnp.asarray(lr_fn(state.updates), jnp.float32),
        "skipped_updates": state.skipped,
        "optimizer_updates": state.updates,
    })
    return metrics


def make_train_step(experiment: Experiment, optimizer: optax.GradientTransformation, *,
                    seed: int, lr_fn: Callable[[Any], Any], teacher_model=None,
                    teacher_diffusion=None) -> Callable:
    """Builds ``train_step(state, batch, teacher_params=None, schedule=None) -> (state, metrics)``
    of a DPM or a consistency-model experiment (its objective: ``objectives.objective_for``).

    Args:
      experiment, optimizer: the run's objects (``build.py``).
      seed: the run's seed; lr_fn: the learning rate of the optimizer-update count (a metric).
      teacher_model, teacher_diffusion: a CM run's DPM teacher network and training chain (cd,
        lcm); its params are the step's ``teacher_params``.

    ``batch``: ``image`` [B, H, W, C] float32 in [-1, 1] (the global batch) and, for
    class-conditional models, ``label`` [B] int32. ``schedule``: ``objectives.step_schedule(
    experiment, state.step)`` (needed by consistency models: their target EMA rate and N).
    """
    exp = experiment
    objective = objective_for(exp, teacher_model=teacher_model,
                              teacher_diffusion=teacher_diffusion)

    def train_step(state: TrainState, batch: dict, teacher_params: Any = None,
                   schedule: dict | None = None) -> tuple[TrainState, dict]:
        teacher_params = {} if teacher_params is None else teacher_params
        schedule = {} if schedule is None else schedule
        x0 = batch["image"]
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        dropout_root = jax.random.fold_in(step_key, 1)
        loss_batch = objective.loss_batch(state, batch, step_key, schedule)

        def grad_fn(params_and_frozen, delta, rng):
            # Differentiates w.r.t. the params (and δ) only; the frozen part (θ⁻) is a constant.
            params, frozen = params_and_frozen
            loss_of_batch = objective.loss_of_batch(frozen, teacher_params, schedule)
            if exp.microbatches > 1:
                return microbatched_grad_fn(loss_of_batch, loss_batch, exp.microbatches)(
                    params, delta, rng)
            return value_and_grads(functools.partial(loss_of_batch, mb=loss_batch))(
                params, delta, rng)

        def apply_update(st: TrainState, grads, aux) -> TrainState:
            finite = all_finite(grads) & jnp.all(jnp.isfinite(aux["loss"]))

            def update(st):
                updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
                params = optax.apply_updates(st.params, updates)
                ema = {ema_key(r): ema_update(st.ema[ema_key(r)], params, r) for r in exp.ema_rates}
                st = st.replace(params=params, opt_state=opt_state, ema=ema,
                                updates=st.updates + 1)
                return objective.after_update(st, loss_batch, aux, schedule)

            def skip(st):
                return st.replace(skipped=st.skipped + 1)

            return jax.lax.cond(finite, update, skip, st)

        state, m = run_adversary(None, state, dropout_root, adversary=exp.adversary,
                                 delta_shape=x0.shape,
                                 params_of=lambda s: (s.params, objective.frozen(s)),
                                 apply_update=apply_update, grad_fn=grad_fn)
        state = state.replace(step=state.step + 1)
        metrics = adversary_metrics(m, state, lr_fn, exp.adversary.kind)
        metrics.update(objective.metrics(m, schedule))
        return state, metrics

    return train_step


def random_train_batch(config, batch: int, seed: int = 0) -> dict:
    """A train batch of uniform [-1, 1] images of ``config``'s shape (class 0 labels for
    class-conditional models): for timing a step without a dataset."""
    import numpy as np
    s, c = config.model.image_size, config.model.in_channels
    out = {"image": jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, s, s, c)),
                                jnp.float32)}
    if config.model.class_cond:
        out["label"] = jnp.zeros((batch,), jnp.int32)
    return out


def standalone_train_step(config, seed: int = 0):
    """``(step, state, batch)`` of a DPM config, outside the train loop: its train step jitted
    with the state donated, a freshly initialised state and a random batch of the config's
    global size. ``bench/`` times this (the experiment's timing uses the loop's own step,
    ``loop.loop_train_step``)."""
    from atdiff_jax.train.build import build_experiment, build_optimizer, lr_schedule
    from atdiff_jax.train.state import init_state
    exp, opt = build_experiment(config), build_optimizer(config)
    state = jax.jit(functools.partial(init_state, exp, opt))(jax.random.key(seed))
    step = jax.jit(make_train_step(exp, opt, seed=seed, lr_fn=lr_schedule(config)),
                   donate_argnums=0)
    return step, state, random_train_batch(config, config.train.global_batch_size, seed)
