"""Orbax checkpoints of a run: train state + data-iterator state + config, and restoring them.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. A workdir is a local path or a URL
that ``etils.epath`` reads (``gs://bucket/run``); it is handed to Orbax as an ``epath.Path``
(:func:`atdiff_jax.paths.workdir_path`), never turned into a local path. Orbax writes each
step into a temporary directory and renames it when complete (on ``gs://``, where there is no
rename, it writes a commit marker last), so an interrupted save never looks like a checkpoint
and never touches the earlier ones. Nothing here deletes a checkpoint except Orbax's
``max_to_keep`` after a *successful* newer save. On a local file system a checkpoint to delete is
first renamed into ``<workdir>/checkpoints/.deleting/`` (one atomic rename) and only then removed,
so a process killed while deleting never leaves a half-deleted step directory that looks like a
checkpoint (Orbax alone removes the files in place: a step directory with only some of its files,
listed as a step but unreadable; ``bench/faults.py`` found it). A checkpoint that cannot be read
is reported with its step and the steps that remain, and is left in place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from atdiff_jax.paths import workdir_path

ITEMS = ("state", "data", "config")
# Train-state fields renamed since checkpoints were first written: {name now: name in older ones}.
RENAMED_FIELDS = {"timestep_sampler": "sampler"}
# Where a local checkpoint is moved before it is deleted (not a step name, so never listed).
TRASH = ".deleting"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or unreadable (the message says which and what to do)."""


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


def _local(directory: epath.Path) -> bool:
    return "://" not in os.fspath(directory)


def _empty_trash(directory: epath.Path) -> None:
    """Removes the checkpoints moved to the trash (process 0 of a local directory only)."""
    if _local(directory) and jax.process_index() == 0:
        shutil.rmtree(os.path.join(os.fspath(directory), TRASH), ignore_errors=True)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _access_error(path, err: Exception) -> CheckpointError:
    hint = ("; a gs:// workdir needs Google Cloud credentials (`gcloud auth application-default "
            "login`, or GOOGLE_APPLICATION_CREDENTIALS=key.json) and an existing bucket you can "
            "write to" if os.fspath(path).startswith("gs://") else "")
    return CheckpointError(f"cannot access {path} ({_first_line(err)}){hint}")


def check_access(workdir) -> None:
    """Raises CheckpointError (with what to do) when ``workdir`` cannot even be looked at, e.g. a
    ``gs://`` URL without credentials; reads nothing else and writes nothing."""
    path = workdir_path(workdir)
    try:
        path.exists()
    except Exception as e:  # whatever the file system raises, the same advice
        raise _access_error(path, e) from e


def create_manager(workdir, *, max_to_keep: int | None = None, read_only: bool = False
                   ) -> ocp.CheckpointManager:
    directory = checkpoint_dir(workdir)
    # Local: old checkpoints are renamed into TRASH (atomic), then removed by _empty_trash.
    # Orbax ignores todelete_subdir on gs:// and deletes there in place.
    trash = TRASH if _local(directory) and not read_only else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, todelete_subdir=trash)
    try:
        manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
    except Exception as e:  # credentials, permissions, a full disk
        raise _access_error(directory, e) from e
    if trash:
        _empty_trash(directory)   # left by a process killed while deleting
    return manager


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         config: ml_collections.ConfigDict) -> None:
    """Writes checkpoint ``step`` (every process must call this; it blocks until written).

    Raises:
      CheckpointError: the write failed (a full disk, lost permissions or credentials); the
        partial step stays a temporary directory and the earlier checkpoints are untouched.
    """
    _empty_trash(manager.directory)   # Orbax cannot move a step onto a leftover of the same step
    try:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)
        manager.wait_until_finished()
    except Exception as e:  # OSError from Python, ValueError from TensorStore
        kept = [s for s in manager.all_steps() if s != step]
        then = (f"the earlier checkpoints ({kept}) are untouched: fix that and rerun the same "
                f"command to resume from step {max(kept)}" if kept else
                "there is no earlier checkpoint: fix that and rerun the same command")
        raise CheckpointError(f"cannot write checkpoint step {step} to {manager.directory} "
                              f"({_first_line(e)}); {then}") from e
    _empty_trash(manager.directory)


def _check_step(manager: ocp.CheckpointManager, step: int) -> None:
    if step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint step {step} in {manager.directory}; available: "
                              f"{list(manager.all_steps())}")


def _unreadable(manager, step: int, err: Exception) -> CheckpointError:
    others = [s for s in manager.all_steps() if s != step]
    hint = (f"the other checkpoints ({others}) are untouched: restore one of them with "
            f"--restore_step=N, or move {manager.directory / str(step)} away to "
            f"resume from the newest of them" if others else
            "there is no other checkpoint to fall back to")
    return CheckpointError(f"checkpoint step {step} in {manager.directory} cannot be read "
                           f"({type(err).__name__}: {err}); {hint}. Nothing was deleted.")


def _older_names(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> dict:
    """``{name now: older name}`` of the state fields that checkpoint ``step`` saved under their
    older name (``RENAMED_FIELDS``); empty for a checkpoint written with today's names."""
    if not dataclasses.is_dataclass(abstract_state):
        return {}
    try:
        saved = ocp.StandardCheckpointHandler().metadata(
            manager.directory / str(step) / "state").tree
    except Exception:  # noqa: BLE001 - no metadata to go by: restore with today's names
        return {}
    if not isinstance(saved, dict):
        return {}
    return {new: old for new, old in RENAMED_FIELDS.items()
            if hasattr(abstract_state, new) and new not in saved and old in saved}


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict, dict]:
    """``(state, data_state, config_dict)`` of ``step``, with the shardings of ``abstract_state``.

    A checkpoint that names a state field by its older name (``RENAMED_FIELDS``) is restored
    into today's field.
    """
    _check_step(manager, step)
    older = _older_names(manager, step, abstract_state)
    target = abstract_state
    if older:   # the saved tree is a dict of the fields: restore it under the names it has
        target = {older.get(f.name, f.name): getattr(abstract_state, f.name)
                  for f in dataclasses.fields(abstract_state)}
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise _unreadable(manager, step, e) from e
    state = out.state
    if older:
        state = type(abstract_state)(**{f.name: state[older.get(f.name, f.name)]
                                        for f in dataclasses.fields(abstract_state)})
    return state, out.data, out.config


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was written with."""
    _check_step(manager, step)   # else `--restore_step=N` of sample/eval read as "cannot be read"
    try:
        cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as e:  # noqa: BLE001
        raise _unreadable(manager, step, e) from e
    return ml_collections.ConfigDict(cfg)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` carrying ``shardings`` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
