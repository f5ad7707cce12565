"""Orbax checkpoints of a run: train state + data-iterator state + config, and restoring them.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. A workdir is a local path or a URL
that ``etils.epath`` reads (``gs://bucket/run``); it is handed to Orbax as an ``epath.Path``
(:func:`atdiff_jax.train.paths.workdir_path`), never turned into a local path. Orbax writes each
step into a temporary directory and renames it when complete (on ``gs://``, where there is no
rename, it writes a commit marker last), so an interrupted save never looks like a checkpoint
and never touches the earlier ones. Nothing here deletes a checkpoint except Orbax's
``max_to_keep`` after a *successful* newer save. A checkpoint that cannot be read is reported with
its step and the steps that remain, and is left in place.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from atdiff_jax.train.paths import workdir_path

ITEMS = ("state", "data", "config")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or unreadable (the message says which and what to do)."""


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


def create_manager(workdir, *, max_to_keep: int | None = None, read_only: bool = False
                   ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         config: ml_collections.ConfigDict) -> None:
    """Writes checkpoint ``step`` (every process must call this; it blocks until written)."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)
    manager.wait_until_finished()


def _unreadable(manager, step: int, err: Exception) -> CheckpointError:
    others = [s for s in manager.all_steps() if s != step]
    hint = (f"the other checkpoints ({others}) are untouched: restore one of them with "
            f"--restore_step=N, or move {manager.directory / str(step)} away to "
            f"resume from the newest of them" if others else
            "there is no other checkpoint to fall back to")
    return CheckpointError(f"checkpoint step {step} in {manager.directory} cannot be read "
                           f"({type(err).__name__}: {err}); {hint}. Nothing was deleted.")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict, dict]:
    """``(state, data_state, config_dict)`` of ``step``, with the shardings of ``abstract_state``."""
    if step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint step {step} in {manager.directory}; available: "
                              f"{list(manager.all_steps())}")
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise _unreadable(manager, step, e) from e
    return out.state, out.data, out.config


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was written with."""
    try:
        cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as e:  # noqa: BLE001
        raise _unreadable(manager, step, e) from e
    return ml_collections.ConfigDict(cfg)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` carrying ``shardings`` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
