"""The training state: params, EMA params, optimizer state, counters, timestep-sampler state.

A consistency-model run (``experiment.cm``) uses ``CMTrainState``: the same fields plus the target
network ``target`` (an EMA of the student, stop-gradiented in the loss). It is a subclass rather
than an optional field so that DPM checkpoints keep exactly the tree they were written with.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atdiff_jax.diffusion.timestep_sampler import LossHistory
from atdiff_jax.train.build import Experiment


def ema_key(rate: float) -> str:
    """Name of the EMA copy for a rate in ``TrainState.ema`` and checkpoints: 0.9999 -> "0_9999"."""
    return repr(float(rate)).replace(".", "_")


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # minibatches done (the paper's "iterations"), int32
    updates: jax.Array   # optimizer updates applied (K per minibatch under fast AT), int32
    skipped: jax.Array   # updates skipped because a gradient or loss was not finite, int32
    params: Any
    ema: dict[str, Any]  # {ema_key(rate): params}
    opt_state: Any
    timestep_sampler: LossHistory


@flax.struct.dataclass
class CMTrainState(TrainState):
    target: Any          # target network params θ⁻ (EMA of ``params`` at the cm target rate)


def init_params(experiment: Experiment, rng: jax.Array) -> Any:
    """Freshly initialised network parameters (float32)."""
    h, w, c = experiment.image_shape
    x = jnp.zeros((1, h, w, c), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if experiment.class_cond else None
    kw = {} if experiment.model.guidance_embed_dim is None else {"w": jnp.zeros((1,), jnp.float32)}
    return experiment.model.init({"params": rng}, x, t, y=y, train=False, **kw)["params"]


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


def init_state(experiment: Experiment, optimizer: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
    """A fresh state around freshly initialised params (pure: jit it, or ``jax.eval_shape`` it
    for the shapes; run eagerly, every op of the UNet's init would compile on its own)."""
    return create_state(experiment, optimizer, init_params(experiment, rng))


def create_state(experiment: Experiment, optimizer: optax.GradientTransformation, params: Any,
                 ema_params: Any | None = None) -> TrainState:
    """A fresh state around ``params`` (EMA from ``ema_params`` if given, else the params).

    For a consistency model the target network starts as a copy of ``params`` too.
    """
    ema_src = params if ema_params is None else ema_params
    fields = dict(
        step=jnp.int32(0), updates=jnp.int32(0), skipped=jnp.int32(0), params=params,
        ema={ema_key(r): jax.tree.map(jnp.array, ema_src) for r in experiment.ema_rates},
        opt_state=optimizer.init(params), timestep_sampler=experiment.timestep_sampler.init())
    if experiment.cm is not None:
        return CMTrainState(target=jax.tree.map(jnp.array, params), **fields)
    return TrainState(**fields)
