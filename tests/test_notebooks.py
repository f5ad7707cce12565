"""The notebooks in ``notebooks/`` run end to end and compute what they show (tiny setting).

Each notebook is executed with nbclient in a kernel of THIS interpreter: the test writes its own
kernelspec (``sys.executable -m ipykernel_launcher``) to a temporary ``JUPYTER_PATH``, so neither an
installed ``python3`` kernelspec nor an activated venv is needed. Parameters go to the kernel as
environment variables: ``ATDIFF_NB_TINY=1`` (a one-level 16x16 UNet, 12 minibatches, few
samples), the session's offline MNIST, a temporary workdir, and ``ATDIFF_NB_OUT``, where each
notebook writes ``summary.json``; the checks below are on those numbers and on the executed
cells' outputs. XLA flags in the kernel's environment make compiling faster (see run_notebook).

The quickstart trains on 1 (CPU) device; the restore notebook restores that run on 2 simulated
devices and must get bit-identical EMA params (sha256 over all leaves) to the ones the trainer
returned in memory.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import subprocess_xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "atdiff-notebook-test"
TINY_STEPS = 12             # ATDIFF_NB_STEPS default in the tiny setting
TINY_LOG_EVERY = 2
K = 3                       # adv.steps of configs/mnist_adm_at.py
STEP_SIZE = 0.1             # adv.step_size
SAMPLERS = ("ddim", "iddpm", "es", "dpm_solver")
TINY_NFES = (2, 4)
TINY_NUM_SAMPLES = 64


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A JUPYTER_PATH with one kernelspec that runs this interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "atdiff_jax tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, mnist_data_dir):
    """A data dir whose mnist32 is the session's (linked): the notebooks' feature-statistics cache
    goes here, not into the shared dataset dir."""
    d = tmp_path_factory.mktemp("nb_data")
    (d / "mnist32").symlink_to(mnist_data_dir / "mnist32", target_is_directory=True)
    return d


def run_notebook(name: str, jupyter_path, *, devices: int, **env_vars) -> nbformat.NotebookNode:
    """Executes notebooks/<name> (cwd notebooks/, like Jupyter) and returns the executed copy."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = dict(os.environ)
    # The suite's XLA_FLAGS (conftest.FAST_COMPILE after the caller's) and the simulated devices.
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
                "XLA_FLAGS": subprocess_xla_flags(
                    f"--xla_force_host_platform_device_count={devices}")})
    env.update({k: str(v) for k, v in env_vars.items()})
    client = NotebookClient(nb, timeout=900, startup_timeout=120, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)
    return nb


def outputs(nb, output_type: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == output_type]


def stdout(nb) -> str:
    return "".join(o.text for o in outputs(nb, "stream") if o.name == "stdout")


def png_count(nb) -> int:
    return sum("image/png" in o.data for o in outputs(nb, "display_data"))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, jupyter_path, data_dir):
    tmp = tmp_path_factory.mktemp("nb_quickstart")
    nb = run_notebook("quickstart.ipynb", jupyter_path, devices=1, ATDIFF_NB_TINY=1,
                      ATDIFF_NB_WORKDIR=tmp / "run", ATDIFF_NB_DATA_DIR=data_dir,
                      ATDIFF_NB_OUT=tmp / "out")
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    return nb, summary, tmp / "run"


@pytest.fixture(scope="module")
def restored(tmp_path_factory, jupyter_path, data_dir, quickstart):
    _, _, workdir = quickstart
    tmp = tmp_path_factory.mktemp("nb_restore")
    nb = run_notebook("restore_and_sample.ipynb", jupyter_path, devices=2, ATDIFF_NB_TINY=1,
                      ATDIFF_NB_WORKDIR=workdir, ATDIFF_NB_DATA_DIR=data_dir,
                      ATDIFF_NB_OUT=tmp / "out")
    return nb, json.loads((tmp / "out" / "summary.json").read_text())


def _finite(*values) -> bool:
    return all(math.isfinite(v) for v in values)


def test_quickstart_losses_and_delta_gradient(quickstart):
    _, s, _ = quickstart
    init, trained = s["losses_init"], s["losses_trained"]
    assert _finite(*init.values(), *trained.values())
    # Zero output layers at init: the output ignores the input, so the δ-gradient is exactly 0,
    # the "original" loss (clean target, perturbed input) equals the clean loss, and
    # "delta_detach" differs through its target ε + δ/sqrt(1 - abar_t) only.
    assert init["|g_delta|"] == 0.0 and init["max|g_delta|"] == 0.0
    assert init["original"] == pytest.approx(init["clean"], rel=1e-6)
    assert abs(init["delta_detach"] - init["clean"]) > 1e-4
    assert init["|g_params|"] > 0
    # After the fast-AT minibatches the δ-gradient is real and the losses went down.
    assert trained["max|g_delta|"] > 1e-5
    assert trained["original"] != trained["clean"]
    assert trained["clean"] < 0.6 * init["clean"]


def test_quickstart_fast_at_minibatch(quickstart):
    _, s, _ = quickstart
    losses = s["fast_at_losses"]  # [minibatches, K]
    assert len(losses) == 4 and all(len(row) == K for row in losses)
    assert _finite(*(v for row in losses for v in row))
    assert sum(losses[-1]) < sum(losses[0])
    # δ used at inner step k (last minibatch): 0, then one normalised l2 step of length
    # step_size, then a second step (shorter than 2 step_size unless the gradients align);
    # all far inside the projection radius 0.1 * sqrt(16 * 16 * 1) = 1.6.
    d0, d1, d2 = s["fast_at_delta_norm"]
    assert d0 == 0.0
    assert d1 == pytest.approx(STEP_SIZE, rel=1e-5)
    assert STEP_SIZE < d2 <= 2 * STEP_SIZE + 1e-6
    assert s["fast_at_radius"] == pytest.approx(1.6, rel=1e-6)


def test_quickstart_trains_with_the_library_loop(quickstart):
    nb, s, workdir = quickstart
    assert s["tiny"] is True and s["image_shape"] == [16, 16, 1]
    assert s["final_step"] == TINY_STEPS
    assert s["optimizer_updates"] == K * TINY_STEPS and s["skipped_updates"] == 0
    steps = [step for step, _ in s["loss_curve"]]
    values = [v for _, v in s["loss_curve"]]
    assert steps == list(range(TINY_LOG_EVERY, TINY_STEPS + 1, TINY_LOG_EVERY))
    assert _finite(*values)
    assert values[-1] < 0.5 * values[0], values   # the loss goes down
    assert (workdir / "checkpoints" / str(TINY_STEPS)).is_dir()
    assert list(workdir.glob("events.out.tfevents.*"))
    assert f"trained to minibatch {TINY_STEPS} ({K * TINY_STEPS} AdamW updates, 0 skipped)" in stdout(nb)


def test_quickstart_samples_and_inline_figures(quickstart):
    nb, s, _ = quickstart
    assert set(s["samples"]) == {"ddim", "dpm_solver"}
    for sampler, info in s["samples"].items():
        assert info["shape"] == [8, 16, 16, 1] and info["dtype"] == "uint8", sampler
        assert 0 < info["mean"] < 255
    assert png_count(nb) == 2          # the loss plot and the sample grids
    assert not outputs(nb, "error")


def test_restore_gives_the_trained_ema_on_another_device_count(quickstart, restored):
    _, trained, _ = quickstart
    _, s = restored
    assert s["device_count"] == 2
    assert s["checkpoints"] == [TINY_STEPS] and s["restored_step"] == TINY_STEPS
    assert s["ema_rate"] == trained["ema_rate"]
    assert s["ema_digest"] == trained["ema_digest"]


def test_restore_samples_every_sampler_at_several_nfes(restored):
    nb, s = restored
    assert s["nfes"] == list(TINY_NFES)
    assert set(s["samples"]) == {f"{name}/{nfe}" for name in SAMPLERS for nfe in TINY_NFES}
    for key, info in s["samples"].items():
        assert info["shape"] == [TINY_NUM_SAMPLES, 16, 16, 1] and info["dtype"] == "uint8", key
    # ES starts from the same noise as IDDPM but scales ε: different images.
    assert all(v > 0 for v in s["es_minus_iddpm_mean_abs"].values())
    assert png_count(nb) == 2          # the grids and fd_mnist vs NFE
    assert not outputs(nb, "error")


def test_restore_scores_mnist_feature_distance(restored):
    nb, s = restored
    floor = s["real_data_floor"]
    assert _finite(floor) and floor > 0
    assert set(s["metrics"]) == set(s["samples"])
    for key, m in s["metrics"].items():
        assert _finite(m["fd_mnist"], m["confidence"]), key
        # 12 minibatches are far from digits: farther than real images are from each other.
        assert m["fd_mnist"] > floor, key
        assert 0.1 <= m["confidence"] <= 1.0 and 1 <= m["modes"] <= 10, key
    assert "| dpm_solver |" in stdout(nb)


@pytest.mark.parametrize("name,env,message", [
    ("quickstart.ipynb", {"ATDIFF_NB_TINY": "yes"}, "ATDIFF_NB_TINY must be 0 or 1, got 'yes'"),
    ("quickstart.ipynb", {"ATDIFF_NB_STEPS": "0"}, "ATDIFF_NB_STEPS must be an integer >= 1"),
    ("restore_and_sample.ipynb", {"ATDIFF_NB_WORKDIR": "/nonexistent/run"},
     "/nonexistent/run has no checkpoints/ folder"),
])
def test_bad_parameters_stop_in_the_first_cell(jupyter_path, name, env, message):
    with pytest.raises(CellExecutionError) as e:
        run_notebook(name, jupyter_path, devices=1, **env)
    assert message in str(e.value)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "restore_and_sample.ipynb"])
def test_stored_notebooks_are_valid_small_and_executed(name):
    path = NOTEBOOKS / name
    assert path.stat().st_size < 1_500_000
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    # Stored with the outputs of one execution, in order, without errors.
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert "Stored outputs" in nb.cells[0].source
