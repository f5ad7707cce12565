"""The trainer across devices, processes and interruptions, through real `atdiff train` runs.

Every run is an ``atdiff train`` subprocess (``python -m atdiff_jax.cli``) on ``configs/tiny.py``
(16x16 MNIST, global batch 8, fast AT with K=3, i.e. 3 AdamW updates per minibatch, lr 1e-4),
compared through checkpoints restored with ``restore_state`` onto this process's one CPU device.

* 8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set in the
  child before jax is imported), data parallel and FSDP (mesh 2 x 4), and two processes on
  127.0.0.1 (``jax.distributed`` with gloo CPU collectives, ``--distributed`` + ``ATDIFF_*``)
  agree with one device after 2 minibatches (6 AT updates). Not bit for bit: the batch-mean
  gradients are summed in a different order across devices, so float32 rounding differs at the
  1e-7 relative level and Adam amplifies it for parameters whose gradient is close to zero.
  Tolerances (measured diffs in parentheses):
    - params and EMA: ``|got - want| <= 1e-5`` for all but 1e-4 of the elements (measured max
      3.5e-6 params / 2e-9 EMA, no element above 1e-5), i.e. 10% of one AdamW step (lr 1e-4),
      and every element within ``updates * lr`` = 6e-4, the most one coordinate can move (Adam's
      step is at most ~lr; a near-zero gradient can flip its sign). A real divergence (another
      example, noise draw or update count) moves most coordinates by ~lr per update.
    - global relative difference ``||got - want|| / ||want||`` of params, EMA and each Adam
      moment <= 1e-5 (measured: params <= 2.1e-7, Adam mu <= 3.4e-7, nu <= 6.3e-7). Adam's step
      is invariant to the gradient's scale, so the moments are what catches a wrongly scaled
      (e.g. summed instead of averaged) gradient.
    - counters (step, optimizer updates, skipped) and the timestep-sampler state: exact.
* The 2-process checkpoint (written by both processes together) restores in one process, both
  as the full train state and through ``restore_for_sampling``.
* ``kill -9`` mid-run, then the same command again: it resumes and the final state equals an
  uninterrupted run BIT FOR BIT. SIGTERM mid-run: a checkpoint at the next step boundary, exit
  code 0; the same command again resumes to the same bit-identical final state.

Every run compiles with the suite's ``XLA_FLAGS`` (``conftest.FAST_COMPILE`` after the caller's
flags: LLVM's optimisation of the CPU code turned down, the HLO passes unchanged), the same for
all the runs that are compared. The measured diffs above were taken with these flags. The
8-device test is ``slow`` (two 8-device compiles, ~3 min of 2 cores).

Runtime: the runs that do not interact with the test (the reference, the 8-device and the
2-process runs) start together when the module starts, so their compilations (single-threaded)
overlap on the cores; each test waits for the runs it checks. Single-device runs share a
persistent JAX compilation cache in the module's temp dir (the same executable, so it changes no
number; XLA's CPU compilation is deterministic anyway). Every subprocess has a deadline and is
killed (its whole process group) on failure and at module teardown.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import subprocess_xla_flags

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"

NUM_MINIBATCHES = 6      # reference and interrupted runs; checkpoint_every = 2 (tiny.py)
SHARDED_MINIBATCHES = 2  # 8-device and 2-process runs: 2 minibatches = 6 AT updates
LR, K = 1e-4, 3          # tiny.py (configs/default.py): optim.lr, adv.steps
JOB_TIMEOUT_S = 600      # per subprocess; generous for a loaded 2-core machine
ATOL = 1e-5              # 10% of one AdamW step
OUTLIER_FRACTION = 1e-4  # elements allowed above ATOL (still within updates * lr)
GLOBAL_RTOL = 1e-5

# The runs each test checks; the module fixture starts those of the selected tests at once.
NEEDS = {
    "test_eight_devices_match_one_device": ("reference", "dp8", "fsdp8"),
    "test_two_processes_match_one_process_and_restore_in_one": ("reference", "proc0", "proc1"),
    # the sigterm / kill9 tests start their own runs once the reference is done
}


# --------------------------------------------------------------------------- subprocess runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One ``atdiff train`` subprocess in its own process group, with a log file and a deadline."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: pathlib.Path,
                 timeout: float = JOB_TIMEOUT_S):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "atdiff_jax.cli", "train", *argv], cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.deadline = time.monotonic() + timeout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return f"--- last lines of {self.log_path}:\n" + "\n".join(self.log().splitlines()[-n:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the whole process group (if still running) and reaps the child."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def wait(self) -> int:
        """The exit code; kills the job and fails the test when the deadline passes."""
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish in time and was killed\n{self.tail()}")

    def wait_ok(self) -> None:
        rc = self.wait()
        assert rc == 0, f"{self.name} exited with {rc}\n{self.tail()}"


def wait_all_ok(jobs: list[Job]) -> None:
    """Waits for all; as soon as one fails the others are killed (no collective hangs forever)."""
    pending = list(jobs)
    try:
        while pending:
            for job in list(pending):
                rc = job.proc.poll()
                if rc is None and time.monotonic() > job.deadline:
                    pytest.fail(f"{job.name} did not finish in time\n{job.tail()}")
                if rc is not None:
                    assert rc == 0, f"{job.name} exited with {rc}\n{job.tail()}"
                    pending.remove(job)
            time.sleep(0.2)
    finally:
        for job in pending:
            job.kill()


class Runs:
    """Starts the non-interactive runs of the module, and single runs for the other tests."""

    def __init__(self, root: pathlib.Path, data_dir: pathlib.Path):
        self.root = root
        self.data_dir = data_dir
        self.cache_dir = root / "jax_cache"
        self.jobs: dict[str, Job] = {}
        self.all_jobs: list[Job] = []
        self.selected: set[str] = set()  # the names of this module's selected tests
        self._port = None

    def workdir(self, name: str) -> pathlib.Path:
        return self.root / name

    def train_args(self, workdir: pathlib.Path, num_minibatches: int, *extra: str) -> list[str]:
        """The `atdiff train` command line (the same for the reference and the resumed runs)."""
        return [f"--config={TINY}", f"--workdir={workdir}",
                f"--config.data.data_dir={self.data_dir}",
                f"--config.train.num_minibatches={num_minibatches}",
                "--config.train.keep_checkpoints=10",
                # Metrics every step: the loop then waits for each step (dispatch cannot run
                # ahead), so a SIGTERM is acted on right after the step that is running, off the
                # checkpoint_every schedule (e.g. at 3). The numbers do not depend on it.
                "--config.train.log_every=1", *extra]

    def env(self, *, devices: int = 1, cache: bool = False, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ATDIFF_", "JAX_", "XLA_"))}
        env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   # the same for every run: they are compared
                   XLA_FLAGS=subprocess_xla_flags(
                       f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""))
        if cache:  # the single-device runs share their compiled train step and init
            env["JAX_COMPILATION_CACHE_DIR"] = str(self.cache_dir)
        env.update(extra)
        return env

    def launch(self, name: str, argv: list[str], env: dict[str, str]) -> Job:
        job = Job(name, argv, env, self.root)
        self.all_jobs.append(job)
        return job

    def start(self, name: str) -> None:
        if name in self.jobs:
            return
        if name == "reference":
            self.jobs[name] = self.launch(
                name, self.train_args(self.workdir(name), NUM_MINIBATCHES), self.env(cache=True))
        elif name in ("dp8", "fsdp8"):
            fsdp = 4 if name == "fsdp8" else 1
            self.jobs[name] = self.launch(
                name, self.train_args(self.workdir(name), SHARDED_MINIBATCHES,
                                      f"--config.mesh.fsdp={fsdp}"), self.env(devices=8))
        elif name in ("proc0", "proc1"):
            self._port = self._port or free_port()
            for i in range(2):
                self.jobs[f"proc{i}"] = self.launch(
                    f"proc{i}", self.train_args(self.workdir("two_processes"),
                                                SHARDED_MINIBATCHES, "--distributed"),
                    self.env(ATDIFF_COORDINATOR=f"127.0.0.1:{self._port}",
                             ATDIFF_NUM_PROCESSES="2", ATDIFF_PROCESS_ID=str(i)))
        else:
            raise KeyError(name)

    def finished(self, *names: str) -> None:
        """Starts (if needed) and waits for the named runs; they must exit 0."""
        for name in names:
            self.start(name)
        wait_all_ok([self.jobs[n] for n in names])

    def close(self) -> None:
        for job in self.all_jobs:
            job.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_data_dir, request):
    r = Runs(tmp_path_factory.mktemp("train_distributed"), mnist_data_dir)
    r.selected = {item.originalname for item in request.session.items
                  if item.module is request.module}
    try:
        for test in sorted(r.selected):
            for name in NEEDS.get(test, ()):
                r.start(name)
        yield r
    finally:
        r.close()


# --------------------------------------------------------------------------- checkpoints


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def load(workdir: pathlib.Path, step: int):
    from atdiff_jax.train.loop import restore_state
    state, _ = restore_state(os.fspath(workdir), step)
    return state


def saved_shardings(workdir: pathlib.Path, step: int) -> dict[str, dict]:
    """Orbax 0.12's record of each saved array's sharding (``state/_sharding``), by tree path."""
    path = workdir / "checkpoints" / str(step) / "state" / "_sharding"
    assert path.is_file(), f"no sharding record {path} (Orbax layout changed?)"
    return {base64.b64decode(k).decode(): json.loads(v)
            for k, v in json.loads(path.read_text()).items()}


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bit_identical(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
    for path, g, w in zip(paths, _leaves(got), _leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape, path
        assert np.array_equal(g, w), (
            f"{path} differs: max |diff| {np.max(np.abs(g.astype(np.float64) - w)):.3g}")


def assert_states_close(got, want) -> dict[str, float]:
    """The tolerance of the module docstring; returns the measured diffs (for the report)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for name in ("step", "updates", "skipped"):
        assert int(getattr(got, name)) == int(getattr(want, name)), name
    assert_bit_identical(got.timestep_sampler, want.timestep_sampler)
    for g, w in zip(_leaves(got.opt_state), _leaves(want.opt_state)):
        if not np.issubdtype(w.dtype, np.floating):  # Adam's update count
            assert np.array_equal(g, w)
    got_m, want_m = _adam_moments(got.opt_state), _adam_moments(want.opt_state)
    updates = int(want.updates)
    measured = {}
    groups = {"params": (got.params, want.params), "ema": (got.ema, want.ema),
              "adam_mu": (got_m[0], want_m[0]), "adam_nu": (got_m[1], want_m[1])}
    for name, (g_tree, w_tree) in groups.items():
        g = np.concatenate([x.ravel().astype(np.float64) for x in _leaves(g_tree)])
        w = np.concatenate([x.ravel().astype(np.float64) for x in _leaves(w_tree)])
        diff = np.abs(g - w)
        rel = float(np.linalg.norm(g - w) / np.linalg.norm(w))
        measured[f"{name}_global_rel"] = rel
        assert rel <= GLOBAL_RTOL, f"{name}: ||got - want|| / ||want|| = {rel:.3g}"
        if name in ("params", "ema"):
            measured[f"{name}_max_abs"] = float(diff.max())
            outliers = int(np.sum(diff > ATOL))
            measured[f"{name}_above_atol"] = outliers
            assert outliers <= OUTLIER_FRACTION * diff.size, (
                f"{name}: {outliers} of {diff.size} elements differ by more than {ATOL} "
                f"(max {diff.max():.3g})")
            assert diff.max() <= updates * LR, f"{name}: max |diff| {diff.max():.3g}"
    return measured


def _adam_moments(opt_state):
    """(mu, nu) of the AdamW state inside the optax chain."""
    is_adam = lambda x: hasattr(x, "mu") and hasattr(x, "nu")  # noqa: E731
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(n)]
    assert len(found) == 1, "expected one AdamW state in the optimizer state"
    return found[0].mu, found[0].nu


def resumed_step(log: str) -> int | None:
    """The step of the loop's "resumed from <dir> step N" log line (None if it did not resume)."""
    m = re.search(r"resumed from \S+ step (\d+)", log)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- tests


# ~3 min of the default run's 2 cores (two 8-device compiles); sharded training stays covered by
# default by the 2-process mesh below and by test_bench's FSDP 2 x 2 equivalence (bench/scaling).
@pytest.mark.slow
def test_eight_devices_match_one_device(runs):
    runs.finished("reference", "dp8", "fsdp8")
    want = load(runs.workdir("reference"), SHARDED_MINIBATCHES)
    assert int(want.updates) == K * SHARDED_MINIBATCHES

    for name, mesh, fsdp in (("dp8", [8, 1], False), ("fsdp8", [2, 4], True)):
        workdir = runs.workdir(name)
        assert checkpoint_steps(workdir) == [SHARDED_MINIBATCHES]
        # The checkpoint was written from the intended mesh and sharding.
        record = saved_shardings(workdir, SHARDED_MINIBATCHES)
        assert {tuple(r["shape"]) for r in record.values()} == {tuple(mesh)}
        sharded = sorted(p for p, r in record.items() if p.startswith("params.")
                         and "fsdp" in (r.get("partition_spec") or []))
        if fsdp:  # every big parameter (and its EMA / Adam moments) is split over the fsdp axis
            assert len(sharded) >= 10, sharded
            for path in sharded:
                rest = path[len("params."):]
                for other in (f"ema.0_9999.{rest}", f"opt_state.0.mu.{rest}",
                              f"opt_state.0.nu.{rest}"):
                    assert "fsdp" in record[other]["partition_spec"], other
        else:
            assert sharded == []
        got = load(workdir, SHARDED_MINIBATCHES)
        measured = assert_states_close(got, want)
        print(f"\n{name} vs 1 device after {SHARDED_MINIBATCHES} minibatches: {measured}")


def test_two_processes_match_one_process_and_restore_in_one(runs):
    from atdiff_jax.train.loop import restore_for_sampling
    from atdiff_jax.train.state import ema_key

    runs.finished("reference", "proc0", "proc1")
    workdir = runs.workdir("two_processes")
    step = SHARDED_MINIBATCHES
    assert checkpoint_steps(workdir) == [step]
    # One checkpoint, written together: a 2-device mesh (each process has one CPU device), and
    # Orbax's per-process stores of both processes.
    record = saved_shardings(workdir, step)
    assert {tuple(r["shape"]) for r in record.values()} == {(2, 1)}
    state_dir = workdir / "checkpoints" / str(step) / "state"
    assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()

    # Full-state restore in this (one-device) process, equal to the single-process run.
    got = load(workdir, step)
    assert all(x.sharding.device_set == {jax.local_devices()[0]} for x in jax.tree.leaves(got))
    measured = assert_states_close(got, load(runs.workdir("reference"), step))
    print(f"\n2 processes vs 1 process after {step} minibatches: {measured}")

    # restore_for_sampling: the EMA params of the same checkpoint, on one device.
    module, ema, experiment, config = restore_for_sampling(os.fspath(workdir))
    assert config.train.num_minibatches == step and experiment.image_shape == (16, 16, 1)
    assert_bit_identical(ema, got.ema[ema_key(config.train.ema_rates[0])])
    x = np.zeros((1, 16, 16, 1), np.float32)
    out = module.apply({"params": ema}, x, np.zeros((1,), np.int32), train=False)
    assert out.shape == (1, 16, 16, 2) and np.all(np.isfinite(out))


SIGTERM_TEST = "test_sigterm_saves_at_step_boundary_exits_0_and_resumes_bit_exact"
KILL9_TEST = "test_kill9_then_same_command_resumes_bit_exact"
INTERRUPTIONS = {"sigterm": (signal.SIGTERM, SIGTERM_TEST),  # run -> (signal, the test of it)
                 "kill9": (signal.SIGKILL, KILL9_TEST)}


@pytest.fixture(scope="module")
def interrupted(runs):
    """Both interrupted runs at once (they start once the reference has warmed the compile cache).

    Each starts the reference's command in a fresh workdir, gets its signal as soon as checkpoint
    2 is complete (SIGTERM to the process; SIGKILL to its process group), and is then started
    again with the same command. Returns, per name, what the tests check.
    """
    runs.finished("reference")
    names = [n for n, (_, test) in INTERRUPTIONS.items() if test in runs.selected]
    out = {n: {"workdir": runs.workdir(n)} for n in names}
    argv = {n: runs.train_args(runs.workdir(n), NUM_MINIBATCHES) for n in names}
    env = runs.env(cache=True)
    first = {n: runs.launch(f"{n}_1", argv[n], env) for n in names}
    pending = dict(first)
    while pending:
        for n, job in list(pending.items()):
            if (runs.workdir(n) / "checkpoints" / "2").is_dir():
                if INTERRUPTIONS[n][0] == signal.SIGKILL:
                    job.kill(signal.SIGKILL)
                else:
                    job.proc.send_signal(signal.SIGTERM)
                del pending[n]
            elif job.proc.poll() is not None or time.monotonic() > job.deadline:
                del pending[n]  # exited (or hung) before checkpoint 2: reported by its test
        time.sleep(0.05)
    for n, job in first.items():
        out[n].update(first_job=job, first_rc=job.wait(),
                      steps_after_signal=checkpoint_steps(runs.workdir(n)),
                      others_after_signal=sorted(  # e.g. an unfinished save's temp dir
                          p.name for p in (runs.workdir(n) / "checkpoints").glob("*")
                          if not p.name.isdigit()))
    second = {n: runs.launch(f"{n}_2", argv[n], env) for n in names}
    for n, job in second.items():
        out[n].update(second_job=job, second_rc=job.wait())
    return out


def test_sigterm_saves_at_step_boundary_exits_0_and_resumes_bit_exact(runs, interrupted):
    r = interrupted["sigterm"]
    job, workdir = r["first_job"], r["workdir"]
    assert r["first_rc"] == 0, f"SIGTERM: exit code {r['first_rc']}\n{job.tail()}"
    steps = r["steps_after_signal"]
    stopped = steps[-1]
    assert steps == [2, stopped] and 2 < stopped < NUM_MINIBATCHES, (steps, job.tail())
    assert "SIGTERM received" in job.log(), job.tail()
    assert f"preempted: checkpoint {stopped} written, exiting" in job.log(), job.tail()
    assert r["others_after_signal"] == [], "a temporary checkpoint was left behind"
    state = load(workdir, stopped)
    assert int(state.step) == stopped and int(state.updates) == K * stopped
    if stopped in checkpoint_steps(runs.workdir("reference")):
        assert_bit_identical(state, load(runs.workdir("reference"), stopped))

    job = r["second_job"]
    assert r["second_rc"] == 0, job.tail()
    assert resumed_step(job.log()) == stopped, job.tail()
    assert checkpoint_steps(workdir)[-1] == NUM_MINIBATCHES
    assert_bit_identical(load(workdir, NUM_MINIBATCHES),
                         load(runs.workdir("reference"), NUM_MINIBATCHES))


def test_kill9_then_same_command_resumes_bit_exact(runs, interrupted):
    r = interrupted["kill9"]
    job, workdir = r["first_job"], r["workdir"]
    assert r["first_rc"] == -signal.SIGKILL, f"exit code {r['first_rc']}\n{job.tail()}"
    before = r["steps_after_signal"]
    assert 2 in before and before[-1] < NUM_MINIBATCHES, before

    job = r["second_job"]
    assert r["second_rc"] == 0, job.tail()
    assert resumed_step(job.log()) == before[-1], job.tail()
    after = checkpoint_steps(workdir)
    assert set(before) <= set(after) and after[-1] == NUM_MINIBATCHES, (before, after)
    assert_bit_identical(load(workdir, NUM_MINIBATCHES),
                         load(runs.workdir("reference"), NUM_MINIBATCHES))


def test_distributed_flag_reads_the_atdiff_environment():
    from atdiff_jax.cli import UsageError, distributed_init_kwargs

    assert distributed_init_kwargs({}) == {}  # JAX's cluster auto-detection decides
    env = {"ATDIFF_COORDINATOR": "10.0.0.1:1234", "ATDIFF_NUM_PROCESSES": "4",
           "ATDIFF_PROCESS_ID": " 3 ", "JAX_COORDINATOR_ADDRESS": "ignored:1"}
    assert distributed_init_kwargs(env) == {"coordinator_address": "10.0.0.1:1234",
                                            "num_processes": 4, "process_id": 3}
    with pytest.raises(UsageError, match="ATDIFF_PROCESS_ID must be an integer"):
        distributed_init_kwargs({"ATDIFF_PROCESS_ID": "one"})
