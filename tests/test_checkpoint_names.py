"""Checkpoints written before a train-state field was renamed still restore
(``atdiff_jax.train.checkpoint.RENAMED_FIELDS``: ``sampler`` is now ``timestep_sampler``)."""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from atdiff_jax.diffusion.timestep_sampler import LossHistory
from atdiff_jax.train import checkpoint as ckpt
from atdiff_jax.train.state import CMTrainState, TrainState


@flax.struct.dataclass
class _OldTrainState:
    """TrainState as checkpoints before the rename hold it."""
    step: jax.Array
    updates: jax.Array
    skipped: jax.Array
    params: dict
    ema: dict
    opt_state: tuple
    sampler: LossHistory


@flax.struct.dataclass
class _OldCMTrainState(_OldTrainState):
    target: dict


def _fields(k: float) -> dict:
    return dict(step=jnp.int32(3), updates=jnp.int32(6), skipped=jnp.int32(1),
                params={"w": jnp.full((4,), k)}, ema={"0_9": {"w": jnp.full((4,), k + 1)}},
                opt_state=(jnp.zeros((4,)), {"mu": jnp.full((4,), k + 2)}),
                sampler=LossHistory(losses=jnp.full((5, 2), k + 3), counts=jnp.arange(5)))


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _now(cls, old):
    kw = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
    kw["timestep_sampler"] = kw.pop("sampler")
    return cls(**kw)


def test_a_checkpoint_with_the_older_field_name_restores_into_todays_state(tmp_path):
    config = ml_collections.ConfigDict({"seed": 0})
    old = _OldTrainState(**_fields(1.0))
    old_cm = _OldCMTrainState(target={"w": jnp.full((4,), 9.0)}, **_fields(2.0))
    new = _now(TrainState, _OldTrainState(**_fields(5.0)))
    manager = ckpt.create_manager(tmp_path)
    try:
        ckpt.save(manager, 1, old, {"step": 1}, config)
        ckpt.save(manager, 2, new, {"step": 2}, config)
        ckpt.save(manager, 3, old_cm, {"step": 3}, config)
    finally:
        manager.close()
    manager = ckpt.create_manager(tmp_path, read_only=True)
    try:
        for step, want, cls in ((1, _now(TrainState, old), TrainState), (2, new, TrainState),
                                (3, _now(CMTrainState, old_cm), CMTrainState)):
            got, data, _ = ckpt.restore(manager, step, _abstract(want))
            assert type(got) is cls and data == {"step": step}
            jax.tree.map(np.testing.assert_array_equal, got, want)
    finally:
        manager.close()
