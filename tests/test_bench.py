"""Smoke tests of the benchmarks in ``bench/``: each script runs once on a micro network (8x8
images, 16 channels, one level) with one timed iteration, in a subprocess, and its JSON must
hold every field with finite, plausible values; the scaling run must agree with one device.

The four scripts start together when the module starts (their compilations overlap on the
cores), with XLA's backend optimisations off (faster compiles; nothing here checks speed); each
test waits for its own. Meanwhile the helpers (config overrides, mesh parsing, the scaling
comparison) are tested in-process.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import subprocess_xla_flags

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
TIMEOUT_S = 600  # per script; generous for a loaded 2-core machine
MICRO = ["--config=configs/tiny.py", "--set=model.image_size=8", "--set=model.num_channels=16",
         "--set=model.channel_mult=1", "--set=model.attention_resolutions=",
         "--set=model.num_head_channels=16", "--set=model.norm_groups=4"]
SCRIPTS = {
    "train_step": ["--batch=4", "--settings=clean,fast_at", "--iters=1", "--warmup=0"],
    "samplers": ["--batch=2", "--nfe=2", "--iters=1", "--warmup=0"],
    "scaling": ["--meshes=2:2", "--minibatches=1", "--iters=1", "--set=adv.steps=2"],
    "cpu_gap": ["--batch=2", "--parts=net,profile,convs,gn,flags", "--rounds=1",
                "--flagsets=default",
                "--flag_rounds=1", "--flag_iters=1", "--torch_threads=1"],
}

# the sampler benchmark also runs with the batch split over 2 simulated devices
DEVICES = {"samplers": "--xla_force_host_platform_device_count=2"}

sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory, request):
    here = [item for item in request.session.items if item.module is request.module]
    if not any("runs" in inspect.signature(item.function).parameters for item in here):
        yield {}   # no selected test reads the scripts' results (e.g. -m slow): start none
        return
    root = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               # the suite's fast compile (~35% less CPU): these runs check fields, not speed
               XLA_FLAGS=subprocess_xla_flags())
    procs = {}
    for name, extra in SCRIPTS.items():
        out = root / name
        env["XLA_FLAGS"] = subprocess_xla_flags(DEVICES.get(name, ""))
        with open(root / f"{name}.log", "w") as log:  # the child keeps its own handle
            proc = subprocess.Popen(
                [sys.executable, str(BENCH / f"{name}.py"), *MICRO, *extra, f"--out={out}"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs[name] = (proc, out, root / f"{name}.log", time.monotonic() + TIMEOUT_S)
    yield procs
    for proc, *_ in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


# ------------------------------------------------------------------ in-process helper tests


def test_config_overrides_and_their_errors():
    from common import BenchError, load_config
    c = load_config("configs/tiny.py", ["adv.steps=5", "model.channel_mult=1,2,2",
                                        "train.ema_rates=(0.5,)"])
    assert c.adv.steps == 5 and c.model.channel_mult == "1,2,2" and c.train.ema_rates == (0.5,)
    with pytest.raises(BenchError, match="no field 'adv.stepz'"):
        load_config("configs/tiny.py", ["adv.stepz=5"])
    with pytest.raises(BenchError, match="group.name=value"):
        load_config("configs/tiny.py", ["adv.steps"])
    with pytest.raises(BenchError, match="no config file"):
        load_config("configs/nope.py")


def test_scaling_mesh_parsing_and_comparison(tmp_path):
    from common import BenchError
    from scaling import compare, parse_meshes
    assert parse_meshes("2,8:4") == [(1, 1), (2, 1), (8, 4)]
    with pytest.raises(BenchError, match="fsdp must divide"):
        parse_meshes("8:3")
    rng = np.random.default_rng(0)
    init = rng.normal(size=1000)
    upd = 1e-3 * rng.choice([-1.0, 1.0], size=1000)
    ref = {"init['w']": init, "params['w']": init + upd, "opt['mu']": upd * 10}
    np.savez(tmp_path / "ref.npz", **ref)
    # a run whose update is off by 1% of its size in every coordinate
    got = dict(ref, **{"params['w']": init + 1.01 * upd, "opt['mu']": upd * 10.1})
    np.savez(tmp_path / "got.npz", **got)
    c = compare(str(tmp_path / "got.npz"), str(tmp_path / "ref.npz"))
    assert c["update_rel"] == pytest.approx(0.01) and c["opt_rel"] == pytest.approx(0.01)
    assert c["params_max_abs"] == pytest.approx(1e-5) and c["init_max_abs"] == 0.0
    assert c["params_rel"] == pytest.approx(1e-5 * np.sqrt(1000) / np.linalg.norm(init + upd))


# ------------------------------------------------------------------ the scripts


def result(runs, name: str) -> dict:
    proc, out, log, deadline = runs[name]
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        pytest.fail(f"bench/{name}.py did not finish in {TIMEOUT_S} s\n{log.read_text()[-3000:]}")
    assert rc == 0, f"bench/{name}.py exited with {rc}\n{log.read_text()[-3000:]}"
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def finite_positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_train_step_reports_times_flops_memory_and_ratios(runs):
    r = result(runs, "train_step")
    assert r["backend"] == "cpu" and finite_positive(r["matmul_peak_flops"])
    s = r["runs"][0]["settings"]
    assert set(s) == {"clean", "fast_at"}
    for row in s.values():
        assert finite_positive(row["compile_s"], row["s_per_minibatch"], row["s_per_update"],
                               row["flops"], row["flops_per_s"], row["mfu"],
                               row["memory_bytes"], row["temp_bytes"],
                               row["process_peak_rss_bytes"])
        assert row["memory_bytes"] >= row["argument_bytes"] > 0
    assert s["fast_at"]["updates_per_minibatch"] == 3 and s["clean"]["updates_per_minibatch"] == 1
    assert s["fast_at"]["s_per_update"] == pytest.approx(s["fast_at"]["s_per_minibatch"] / 3)
    assert s["clean"]["ratio_per_update_vs_clean"] == 1.0
    # K=3 forward/backward passes: ~3x the XLA FLOPs of one clean update (+ the delta steps).
    assert 2.7 < s["fast_at"]["flops"] / s["clean"]["flops"] < 3.5


def test_samplers_report_images_per_second_for_every_sampler(runs):
    r = result(runs, "samplers")
    rows = {(row["sampler"], row["nfe"], row["devices"]): row for row in r["rows"]}
    assert set(rows) == {(s, 2, d) for s in ("ddim", "iddpm", "es", "dpm_solver") for d in (1, 2)}
    for row in rows.values():
        assert finite_positive(row["compile_s"], row["s_per_batch"], row["images_per_s"],
                               row["loop_overhead"], row["output_std"])
        assert row["images_per_s"] == pytest.approx(2 / row["s_per_batch"])
        if row["devices"] == 2:   # the batch split over 2 devices: the same samples
            one = rows[row["sampler"], 2, 1]
            assert row["x_one_device"] == pytest.approx(row["s_per_batch"] / one["s_per_batch"])
            assert row["max_abs_diff_one_device"] <= 1e-3   # float32 rounding; an error is O(1)
            assert row["output_std"] == pytest.approx(one["output_std"], rel=1e-3)
    assert finite_positive(r["forward_s"])


def test_scaling_matches_one_device_with_fsdp(runs):
    r = result(runs, "scaling")
    by_mesh = {(x["devices"], x["fsdp"]): x for x in r["runs"]}
    assert set(by_mesh) == {(1, 1), (2, 2)}
    two = by_mesh[(2, 2)]
    assert two["ok"] and two["updates"] == by_mesh[(1, 1)]["updates"] == 2 * 2  # K=2, 2 calls
    assert two["loss_rel"] <= r["tol"] and two["params_rel"] <= r["tol"]
    assert two["update_rel"] <= r["update_tol"] and two["opt_rel"] <= r["update_tol"]
    assert two["params_max_abs"] < 1e-4 and two["init_max_abs"] == 0.0
    assert finite_positive(two["s_per_minibatch"], two["ratio_vs_1"], two["compile_s"])


def test_cpu_gap_compares_jax_with_torch(runs):
    r = result(runs, "cpu_gap")
    net = r["net"]
    assert net["torch_vs_jax_output_max_abs_diff"] < 1e-4
    assert finite_positive(*(row["s"] for row in net["rows"].values()))
    assert {"jax f32 fwd+bwd", "torch NCHW fwd+bwd (1 thr)",
            "jax f32 fwd+bwd, flax GroupNorm (before)"} <= set(net["rows"])
    # the UNet's GroupNorm is flax's to float32 rounding, and the comparison is not vacuous
    before = net["deviation_from_f32"]["jax f32 fwd+bwd, flax GroupNorm (before)"]
    assert 0 < before["param_grad_rel"] < 1e-5 and before["input_grad_rel"] < 1e-5
    # bf16 compute really is another precision (so the comparison is not vacuous)
    assert net["deviation_from_f32"]["jax bf16-compute fwd+bwd"]["input_grad_rel"] > 1e-4
    convs = r["convs"]["rows"]
    assert convs and sum(c["count"] for c in convs) >= 5
    for c in convs:
        assert finite_positive(*c["ms"].values())
        if c["stride"] == [1, 1]:
            assert c["wgrad_alt_rel_err"] and max(c["wgrad_alt_rel_err"].values()) <= 1e-5
    assert finite_positive(r["gn"]["ms"]["jax"], r["gn"]["ms"]["jax unet.GroupNorm"],
                           r["gn"]["ms"]["torch"])
    prof = r["profile"]
    assert prof["jax_ms"]["conv forward"] > 0 and prof["jax_ms"]["conv backward (weight grad)"] > 0
    assert prof["torch_ms"]["conv forward"] > 0 and sum(prof["torch_ms"].values()) > 0
    default = r["flags"]["default"]
    assert finite_positive(default["s"], default["compile_s"])
    assert default["hlo"]["convolutions"] >= sum(c["count"] for c in convs)


# ------------------------------------------------------------------ fault injection


def test_faults_reads_the_phase_of_a_kill_from_the_workdir(tmp_path):
    """bench/faults.py's classification of what a killed run was doing, on hand-made workdirs
    (the directory layout Orbax and the trainer write), and its bit-for-bit comparison."""
    import faults
    ck, log = tmp_path / "checkpoints", tmp_path / "log"
    log.write_text("")

    def step_dir(name, files=("_CHECKPOINT_METADATA", "commit_success.txt"), items=faults.ITEMS):
        d = ck / name
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_text("{}")
        for i in items:
            (d / i).mkdir()
            (d / i / "commit_success.txt").write_text("")
        return d

    assert faults.observed_phase(ck, log, False, 0) == "startup"
    assert faults.observed_phase(ck, log, True, 0) == "ended"
    step_dir("1")
    log.write_text("I1202 logging_writer.py:48] [1] delta_grad_norm=0.1, loss=1.0\n")
    assert faults.committed_steps(ck) == [1] and faults.full_checkpoint(ck / "1")
    assert faults.observed_phase(ck, log, False, 0) == "step"
    tmp = step_dir("2" + faults.TMP, files=("_CHECKPOINT_METADATA",), items=())
    (tmp / f"data{faults.TMP}").mkdir()
    assert faults.observed_phase(ck, log, False, 0) == "ckpt:data"
    (tmp / f"data{faults.TMP}" / "metadata").write_text('{"step": 2}')
    assert faults.observed_phase(ck, log, False, 0) == "ckpt:state"
    (tmp / "state").mkdir()
    assert faults.observed_phase(ck, log, False, 0) == "ckpt:commit"
    shutil.rmtree(tmp)
    (ck / "1" / "commit_success.txt").unlink()   # Orbax deleting it in place
    assert faults.committed_steps(ck) == [1] and not faults.full_checkpoint(ck / "1")
    assert faults.observed_phase(ck, log, False, 0) == "delete"
    shutil.rmtree(ck / "1")
    (ck / faults.TRASH / "1").mkdir(parents=True)   # the trainer: moved away, then removed
    assert faults.observed_phase(ck, log, False, 0) == "delete"
    assert faults.committed_steps(ck) == []
    a = {"state": {".w": np.zeros(3, np.float32)}, "data": {"step": 2}, "config": {}}
    b = {"state": {".w": np.array([0, 0, -0.0], np.float32)}, "data": {"step": 2}, "config": {}}
    assert faults.differences(a, a) == [] and faults.differences(a, b) == ["state.w"]  # -0 != 0
    assert faults.differences(a, dict(a, data={"step": 3}))[0].startswith("data iterator state")


@pytest.mark.slow  # ~2-4 min on 2 busy CPU cores: 1 cold compile, 6 trainings of 4 minibatches
def test_faults_two_kills_resume_bit_identically(tmp_path, mnist_data_dir):
    """bench/faults.py in its reduced mode (2 kills, 4 minibatches): both resumes are
    bit-identical, nothing is lost, and the JSON holds the machine, the phases and every run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=subprocess_xla_flags())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / "faults.py"), "--kills=2", "--steps=4",
                           f"--data_dir={mnist_data_dir}", f"--out={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 bit-identical" in proc.stdout and "no good checkpoint lost: yes" in proc.stdout
    (file,) = out.glob("faults_*.json")
    r = json.loads(file.read_text())
    assert r["cpu_count"] >= 1 and r["cpu_model"] and r["backend"] == "cpu"
    assert (r["kills"], r["steps"], r["keep_checkpoints"]) == (2, 4, 2)
    assert r["bit_identical"] == 2 and r["no_good_checkpoint_lost"] is True
    assert r["partial_checkpoints_visible"] == 0 and r["checkpoints_equal_reference"] is True
    assert sum(r["phase_histogram"].values()) == 2 and set(r["phase_histogram"]) <= set(r["phases"])
    assert r["reference"]["warm_rerun_bit_identical"] is True
    assert finite_positive(r["reference"]["wall_s_cold"], r["reference"]["ckpt_state_s"],
                           r["total_s"])
    for run in r["runs"]:
        assert run["bit_identical"] and run["no_checkpoint_lost"] and run["metrics_equal_reference"]
        assert run["aim"] in ("random", "step") and run["phase"] in r["phases"]
        assert run["resumed_from"] == run["expected_resume"]
        assert run["committed_final"][-1] == 4
