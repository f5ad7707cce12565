"""Device mesh and shardings: data parallel over every device of every process, optional FSDP.

The mesh has two axes, ``("data", "fsdp")``. The batch is split over both (every device sees
different examples); with ``fsdp > 1`` each parameter (and its EMA and optimizer moments) is split
along its largest axis divisible by the fsdp size, the rest is replicated. Everything is a global
``jax.Array``; no host-local pmap arrays.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2 ** 12  # smaller parameters stay replicated


def create_mesh(fsdp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must divide the number of devices "
                         f"({len(devices)})")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def params_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    """Shardings for a params pytree (e.g. a frozen teacher's): the FSDP rule, else replicated."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp)),
                        abstract_params)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for a TrainState: FSDP rule on params / EMA / optimizer state (and a CM state's
    target network), others replicated."""
    rep = lambda x: replicated(mesh)  # noqa: E731
    extra = {}
    if hasattr(abstract_state, "target"):
        extra["target"] = params_shardings(abstract_state.target, mesh)
    return abstract_state.replace(
        step=replicated(mesh), updates=replicated(mesh), skipped=replicated(mesh),
        params=params_shardings(abstract_state.params, mesh),
        ema=params_shardings(abstract_state.ema, mesh),
        opt_state=params_shardings(abstract_state.opt_state, mesh),
        timestep_sampler=jax.tree.map(rep, abstract_state.timestep_sampler), **extra)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
