"""`atdiff train` / `atdiff sample` end to end on the tiny config, and bad input at the CLI."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.py")


def atdiff(*args, timeout=600, env_extra=None):
    """``atdiff ARGS`` in a subprocess; it inherits the suite's XLA_FLAGS (conftest.FAST_COMPILE):
    what these tests compare are runs of the CLI with each other, files, exit codes and messages."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "atdiff_jax.cli", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_data_dir):
    workdir = tmp_path_factory.mktemp("cli") / "tiny"
    res = atdiff("train", f"--config={TINY}", f"--workdir={workdir}",
                 f"--config.data.data_dir={mnist_data_dir}", "--config.train.sample_every=2")
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


def test_train_writes_checkpoints_metrics_and_config(tiny_run):
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert list(tiny_run.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (tiny_run / "config.json").exists()
    # EMA sample grids every 2 minibatches (4 images of 16x16 with 1-px gaps: 35x35).
    from PIL import Image
    grids = sorted(p.name for p in (tiny_run / "samples").glob("ema_*.png"))
    assert grids == ["ema_00000002.png", "ema_00000004.png"]
    assert Image.open(tiny_run / "samples" / grids[0]).size == (35, 35)


def test_sample_from_workdir(tiny_run, tmp_path):
    out = tmp_path / "grid"
    res = atdiff("sample", f"--workdir={tiny_run}", "--sampler=ddim", "--steps=5", "--num=5",
                 "--batch_size=4", f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(f"{out}.npz") as f:
        images = f["images"]
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
    assert images.std() > 0  # not a constant image
    assert (tmp_path / "grid.png").stat().st_size > 100


def test_bad_config_value_is_rejected_before_anything_is_written(tmp_path, mnist_data_dir):
    workdir = tmp_path / "run"
    res = atdiff("train", f"--config={TINY}", f"--workdir={workdir}",
                 f"--config.data.data_dir={mnist_data_dir}", "--config.adv.kind=freelb")
    assert res.returncode == 2
    assert "config.adv.kind must be one of ('none', 'fast', 'pgd', 'random'), got 'freelb'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not workdir.exists()


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    res = atdiff("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.data_dir={tmp_path / 'nodata'}")
    assert res.returncode == 2
    assert "atdiff data prepare --dataset=mnist32" in res.stderr
    assert "Traceback" not in res.stderr


def test_corrupt_latest_checkpoint_is_reported_and_nothing_is_lost(tiny_run, tmp_path, mnist_data_dir):
    workdir = tmp_path / "tiny"
    shutil.copytree(tiny_run, workdir)
    # Damage the newest checkpoint's array data.
    state_dir = workdir / "checkpoints" / "4" / "state"
    victims = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 1000]
    assert victims
    for p in victims:
        p.write_bytes(b"\0" * 16)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    res = atdiff("train", f"--config={TINY}", f"--workdir={workdir}",
                 f"--config.data.data_dir={mnist_data_dir}", "--config.train.num_minibatches=6")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "checkpoint step 4" in res.stderr and "[2]" in res.stderr and "Nothing was deleted" in res.stderr
    after = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert before == after  # no checkpoint removed or added
    # The earlier checkpoint is intact and usable.
    res = atdiff("sample", f"--workdir={workdir}", "--restore_step=2", "--steps=2", "--num=2",
                 f"--out={tmp_path / 's'}")
    assert res.returncode == 0, res.stderr[-2000:]


def test_usage_errors():
    from atdiff_jax import cli
    res = atdiff("trian", "--workdir=x")  # an unknown command: one line naming the commands
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [(
        "atdiff: error: unknown command 'trian' (did you mean 'train'?); the commands are "
        f"{', '.join(cli.COMMANDS)} (atdiff --help)")]
    assert set(cli.COMMANDS) == {"train", "sample", "eval", "experiment", "convert", "data"}
    res = atdiff("sample")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("atdiff sample: error: ")
    assert "--workdir" in res.stderr.strip().splitlines()[-1]
    with pytest.raises(cli.UsageError, match=r"expected atdiff data prepare, got 'prep' \(did you "
                                             r"mean 'prepare'\?\); see atdiff data --help"):
        cli._subcommand("data", ["prep"])
    with pytest.raises(cli.UsageError, match="expected atdiff convert inception, got nothing"):
        cli._subcommand("convert", [])


def test_help_lists_the_commands_and_each_command_only_its_flags():
    from atdiff_jax import cli
    res = atdiff("-h")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == cli.overview()
    assert res.stdout.startswith("usage: atdiff {train,")
    assert "'atdiff <command> --help'" in res.stdout
    for command in cli.COMMANDS:  # one line each: the command and what it does
        line = f"  {command:<12}{cli.COMMAND_HELP[command].summary}"
        assert line in res.stdout.splitlines(), line
    res = atdiff()  # no command: the same list on stderr, and a usage error
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(cli.overview())
    assert res.stderr.strip().splitlines()[-1].startswith("atdiff: error: no command given")
    res = atdiff("train", "--help")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == cli.command_help("train")
    text = res.stdout
    assert text.startswith("usage: atdiff train --config=")
    for shown in ("--config=CONFIG", "Experiment config file", "--workdir=WORKDIR",
                  "--restore_step=", "--[no]distributed", "--config.<field>=value",
                  "docs/configuration.md"):
        assert shown in text, shown
    # no flag of another command, none of absl's or JAX's
    for hidden in ("--spec", "--metrics", "--sampler", "--root", "--dataset", "--logtostderr",
                   "--alsologtostderr", "--verbosity", "--jax", "--only_check_args"):
        assert hidden not in text, hidden
    assert "(default: ddim)" in cli.command_help("sample")  # defaults are shown


def test_every_flag_belongs_to_a_command(monkeypatch):
    from atdiff_jax import cli
    assert cli.command_table_problems() == []
    assert {"config", "spec", "workdir", "metrics", "torchscript"} <= set(cli.ATDIFF_FLAGS)
    assert not {"logtostderr", "verbosity", "help", "helpfull"} & set(cli.ATDIFF_FLAGS)
    for command in cli.COMMANDS:  # each help shows exactly its command's flags
        heads = re.findall(r"^  --(?:\[no\])?(\w+)", cli.command_help(command), re.MULTILINE)
        assert heads == list(cli.COMMAND_HELP[command].flags), command
    assert "  data prepare  " in cli.command_help("data")
    assert "  convert inception  " in cli.command_help("convert")
    # the check catches a flag no command lists and a command listing no such flag
    monkeypatch.setattr(cli, "ATDIFF_FLAGS", (*cli.ATDIFF_FLAGS, "new_flag"))
    monkeypatch.setitem(cli.COMMAND_HELP, "data", cli.COMMAND_HELP["data"]._replace(
        flags=("dataset", "data_dir", "gone")))
    assert cli.command_table_problems() == [
        "atdiff data: --gone is not an atdiff flag",
        "--new_flag belongs to no command: add it to the flags of its COMMAND_HELP entries"]


def test_mesh_that_does_not_fit_the_devices_is_a_config_error(tmp_path, mnist_data_dir):
    res = atdiff("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.data_dir={mnist_data_dir}", "--config.mesh.fsdp=3")
    assert res.returncode == 2
    assert "config.mesh.fsdp (3) must divide the number of devices (1)" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wrong_checkpoint_sha256_is_one_line_error(tmp_path, mnist_data_dir):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"not really a checkpoint")
    res = atdiff("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.data_dir={mnist_data_dir}", f"--config.init.checkpoint={weights}",
                 f"--config.init.checkpoint_sha256={'0' * 64}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "sha256" in res.stderr.splitlines()[-1]


def test_resume_with_another_global_batch_size_is_one_line_error(tiny_run, tmp_path,
                                                                  mnist_data_dir):
    workdir = tmp_path / "tiny"
    shutil.copytree(tiny_run, workdir)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    config_json = (workdir / "config.json").read_text()
    res = atdiff("train", f"--config={TINY}", f"--workdir={workdir}",
                 f"--config.data.data_dir={mnist_data_dir}", "--config.train.global_batch_size=16",
                 "--config.train.num_minibatches=6")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"atdiff train: error: cannot resume {workdir} from checkpoint step 4: "
                           "config.train.global_batch_size is 16, the run was saved with 8."), last
    assert "resume with the saved value (--config.train.global_batch_size=8)" in last
    # nothing was written: the same files, the saved config untouched
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert (workdir / "config.json").read_text() == config_json


def test_unknown_config_override_is_one_line_error_naming_close_matches(tmp_path):
    res = atdiff("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                 "--config.train.global_bach_size=16")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("atdiff train: error: unknown option --config.train.global_bach_size: "
                           f"{TINY} has no field 'train.global_bach_size'; did you mean "
                           "--config.train.global_batch_size"), last
    res = atdiff("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                 "--config.trian.seed=1")  # an unknown group
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown option --config.trian.seed" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
