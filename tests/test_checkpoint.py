"""Checkpoints that are missing, corrupt, truncated, half-deleted or cannot be written, and a
``gs://`` workdir without credentials: one clear ``CheckpointError`` each, and the earlier
checkpoints survive (atdiff_jax/train/checkpoint.py).

A small stand-in state (a dict of arrays) is saved with the trainer's own ``checkpoint.save``:
Orbax writes the same files for it as for a train state. ``bench/faults.py`` kills real trainings
during these writes; docs/troubleshooting.md lists the messages.
"""
from __future__ import annotations

import errno
import functools
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath

from atdiff_jax.train import checkpoint as ckpt

CONFIG = ml_collections.ConfigDict({"seed": 0})


def stand_in_state(k: int) -> dict:
    return {"w": jnp.arange(2000.0) + k, "b": jnp.full((2,), k, jnp.float32)}


def target() -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        stand_in_state(0))


def make_run(workdir: pathlib.Path, steps=(2, 4), keep: int = 3) -> pathlib.Path:
    """A workdir with checkpoints ``steps`` of the stand-in state (``data`` = {"step": s})."""
    manager = ckpt.create_manager(workdir, max_to_keep=keep)
    try:
        for s in steps:
            ckpt.save(manager, s, stand_in_state(s), {"step": s}, CONFIG)
    finally:
        manager.close()
    return workdir


def restore(workdir, step: int):
    manager = ckpt.create_manager(workdir, read_only=True)
    try:
        return ckpt.restore(manager, step, target())
    finally:
        manager.close()


def steps_of(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def damage(step_dir: pathlib.Path, how: str) -> None:
    """Overwrites (``corrupt``) or cuts to half (``truncate``) every array file of a step."""
    victims = [p for p in (step_dir / "state").rglob("*") if p.is_file()
               and p.stat().st_size > 1000]
    assert victims
    for p in victims:
        data = p.read_bytes()
        p.write_bytes(b"\0" * 16 if how == "corrupt" else data[:len(data) // 2])


def listing(workdir: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def test_no_checkpoint_and_a_missing_step_are_named(tmp_path, run):
    from atdiff_jax.train.loop import restore_state
    with pytest.raises(ckpt.CheckpointError,
                       match=f"^no checkpoint in {tmp_path / 'empty' / 'checkpoints'}$"):
        restore_state(str(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()   # reading created nothing
    for restore_step in (restore, restore_state):   # resuming; sampling and evaluating
        with pytest.raises(ckpt.CheckpointError, match=r"^no checkpoint step 7 in .*/run/"
                                                       r"checkpoints; available: \[2, 4\]$"):
            restore_step(run, 7)


@pytest.mark.parametrize("how", ["corrupt", "truncate"])
def test_a_damaged_checkpoint_is_named_and_nothing_is_deleted(run, how):
    damage(run / "checkpoints" / "4", how)
    before = listing(run)
    with pytest.raises(ckpt.CheckpointError) as e:
        restore(run, 4)
    message = str(e.value)
    assert message.startswith(f"checkpoint step 4 in {run / 'checkpoints'} cannot be read (")
    assert message.endswith(f"the other checkpoints ([2]) are untouched: restore one of them with "
                            f"--restore_step=N, or move {run / 'checkpoints' / '4'} away to "
                            f"resume from the newest of them. Nothing was deleted.")
    assert listing(run) == before
    state, data, _ = restore(run, 2)   # the earlier checkpoint is intact
    np.testing.assert_array_equal(state["w"], stand_in_state(2)["w"])
    assert data == {"step": 2}


def test_disk_full_during_a_save_keeps_the_earlier_checkpoints(run, monkeypatch):
    """A write that fails (here every small file Orbax writes, with ENOSPC) is one error naming
    the step and what survives; the partial step is never listed, and saving again works."""
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))

    manager = ckpt.create_manager(run, max_to_keep=2)
    try:
        with monkeypatch.context() as m:
            m.setattr(epath.Path, "write_text", full)
            with pytest.raises(ckpt.CheckpointError) as e:
                ckpt.save(manager, 6, stand_in_state(6), {"step": 6}, CONFIG)
        message = str(e.value)
        assert message.startswith(f"cannot write checkpoint step 6 to {run / 'checkpoints'} "
                                  "(OSError: [Errno 28] No space left on device: ")
        assert message.endswith("the earlier checkpoints ([2, 4]) are untouched: fix that and "
                                "rerun the same command to resume from step 4")
        assert steps_of(run) == [2, 4]   # nothing deleted, the partial step not listed
        for s in (2, 4):
            np.testing.assert_array_equal(restore(run, s)[0]["w"], stand_in_state(s)["w"])
        # space again: the same save succeeds over the leftover temporary directory
        ckpt.save(manager, 6, stand_in_state(6), {"step": 6}, CONFIG)
    finally:
        manager.close()
    assert steps_of(run) == [4, 6]
    assert restore(run, 6)[1] == {"step": 6}


def test_old_checkpoints_are_moved_away_before_they_are_deleted(tmp_path, monkeypatch):
    """Orbax deletes a checkpoint file by file; the trainer first renames it into
    checkpoints/.deleting (one atomic rename), so a process killed while deleting never leaves a
    half-deleted step directory that is listed as a checkpoint (bench/faults.py found one)."""
    workdir = make_run(tmp_path / "run", steps=(1, 2, 3), keep=2)
    assert steps_of(workdir) == [2, 3]
    assert not (workdir / "checkpoints" / ckpt.TRASH).exists()   # emptied after each save
    # a kill after the rename, halfway through removing the files
    manager = ckpt.create_manager(workdir, max_to_keep=2)
    with monkeypatch.context() as m:
        m.setattr(ckpt, "_empty_trash", lambda directory: None)
        ckpt.save(manager, 4, stand_in_state(4), {"step": 4}, CONFIG)
    manager.close()
    trash = workdir / "checkpoints" / ckpt.TRASH
    assert [p.name for p in trash.iterdir()] == ["2"]
    for p in list((trash / "2").rglob("*"))[::2]:
        if p.is_file():
            p.unlink()
    assert steps_of(workdir) == [3, 4]
    read_only = ckpt.create_manager(workdir, read_only=True)
    assert list(read_only.all_steps()) == [3, 4]   # the half-deleted copy is not a step
    read_only.close()
    make_run(workdir, steps=(5,), keep=2)           # the next start empties the trash
    assert not trash.exists() and steps_of(workdir) == [4, 5]


class PermissionDeniedError(Exception):
    """What TensorFlow's GCS file system raises for an anonymous caller."""


def test_gs_workdir_without_credentials_is_one_clear_error(tmp_path, monkeypatch):
    from etils.epath import gpath

    from atdiff_jax.train.loop import train

    def no_credentials(original, path, *args, **kwargs):
        if os.fspath(path).startswith("gs://"):
            raise PermissionDeniedError(
                "Error executing an HTTP request: HTTP response code 401 with body 'Anonymous "
                "caller does not have storage.objects.get access to the Google Cloud Storage "
                "object.'\n\twhen reading metadata of " + os.fspath(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    fns = ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "stat", "glob")
    with epath.testing.mock_epath(**dict.fromkeys(fns, no_credentials)):
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.check_access("gs://my-bucket/runs/x")
        assert str(e.value) == (
            "cannot access gs://my-bucket/runs/x (PermissionDeniedError: Error executing an HTTP "
            "request: HTTP response code 401 with body 'Anonymous caller does not have "
            "storage.objects.get access to the Google Cloud Storage object.'); a gs:// workdir "
            "needs Google Cloud credentials (`gcloud auth application-default login`, or "
            "GOOGLE_APPLICATION_CREDENTIALS=key.json) and an existing bucket you can write to")
        with pytest.raises(ckpt.CheckpointError,
                           match="^cannot access gs://my-bucket/runs/x/checkpoints "):
            ckpt.create_manager("gs://my-bucket/runs/x")
        # the trainer stops there, before reading any data (none is prepared here)
        import runpy
        config = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
                                )["get_config"]()
        config.data.data_dir = str(tmp_path / "no_data")
        with pytest.raises(ckpt.CheckpointError, match="^cannot access gs://my-bucket/runs/x "):
            train(config, "gs://my-bucket/runs/x")


def test_sampling_with_an_ema_rate_the_run_lacks_is_a_config_error(tmp_path):
    """``atdiff sample --ema_rate=R`` (and ``atdiff eval``) for a rate the run does not keep."""
    from atdiff_jax.train.build import ConfigError
    from atdiff_jax.train.loop import restore_for_sampling
    workdir = micro_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^ema_rate 0.5 is not in this run; it has \[0.9999\]$"):
        restore_for_sampling(str(workdir), ema_rate=0.5)


MICRO = {"model.image_size": 8, "model.num_channels": 16, "model.channel_mult": "1",
         "model.attention_resolutions": "", "model.num_head_channels": 16,
         "model.norm_groups": 4}


def micro_run(workdir: pathlib.Path, step: int = 2) -> pathlib.Path:
    """A workdir with one checkpoint of a train state of configs/tiny.py at 8x8 with 16 channels
    (the real tree, shapes and dtypes; zeros, so that nothing is compiled)."""
    import runpy

    from atdiff_jax.train.build import build_experiment, build_optimizer
    from atdiff_jax.train.state import init_state
    config = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.py")
                            )["get_config"]()
    for path, value in MICRO.items():
        group, name = path.split(".")
        config[group][name] = value
    exp, opt = build_experiment(config), build_optimizer(config)
    abstract = jax.eval_shape(functools.partial(init_state, exp, opt), jax.random.key(0))
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    manager = ckpt.create_manager(workdir)
    try:
        ckpt.save(manager, step, state, {"step": step}, config)
    finally:
        manager.close()
    return workdir


def copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst
