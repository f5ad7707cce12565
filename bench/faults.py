"""Fault injection: SIGKILL a real training at random moments, resume it, and compare with an
uninterrupted run bit for bit; check that no complete checkpoint is ever lost.

The training is ``atdiff train`` on ``configs/tiny.py`` shrunk to a micro network (8x8 images,
16 channels, one level, no attention; fast AT, K=2), with the real trainer, the TFDS/grain data
pipeline of ``mnist32`` with its resumable iterator state, and Orbax checkpoints written after
EVERY minibatch (``train.checkpoint_every=1``, ``train.keep_checkpoints=2``), so that kills land
during checkpoint writes and old-checkpoint deletions as well as during steps.

1. Reference: one uninterrupted run to ``--steps`` N minibatches (keeping every checkpoint, so
   each step has a reference; otherwise the same command; it fills the compilation cache), then
   a second one with the cache warm and ``keep_checkpoints`` as in the killed runs, whose final
   checkpoint must equal the first's and whose directory is watched to time each phase of a
   checkpoint write (what the kills are aimed with).
2. ``--kills`` times, in a fresh workdir: start the same ``atdiff train`` command, SIGKILL it
   (the whole process group) at a moment drawn from a seeded RNG, then run the same command again
   (it resumes) to N. The kill moments are aimed, by timing and by watching the workdir, at one of
   these moments in turn (which phase a kill actually hit is read from the workdir right after
   it, not assumed):

   * ``random``: uniform from 2 s before the warm reference run's first checkpoint to its end
     (mostly while it trains, some at the end of its startup: restore, compile);
   * ``step``: a random moment after checkpoint s-1 was committed (the next step's data, compute
     and metrics);
   * ``data``: as soon as checkpoint s's temporary directory appears (Orbax writes the
     data-iterator state and the config, two JSON items, first);
   * ``state``: a random moment of the train-state (arrays) write;
   * ``commit``: when the items are committed and the step directory is about to be renamed;
   * ``delete``: right after checkpoint s is committed, when the checkpoint that
     ``keep_checkpoints`` drops is deleted (moved into ``checkpoints/.deleting``, then removed).

Checks, for every kill:

* **bit-identical**: the resumed run's final checkpoint N equals the reference's bit for bit:
  params, every EMA copy, the AdamW state, the counters and the timestep-sampler state (every leaf
  of the train state, compared as bytes), the data-iterator state (its next global step and
  fingerprint) and the config (all but ``train.keep_checkpoints``);
* **no good checkpoint lost**: every checkpoint that was complete (committed) just before the
  kill and that ``keep_checkpoints`` still keeps restores after the kill, and after the resume
  (the ones still kept then), and equals the reference's checkpoint of that step; every step
  directory present after a kill restores (no partial checkpoint looks like a complete one); and
  the resume starts from the newest complete checkpoint (from scratch when there was none).

Every training is ``atdiff train ...`` run by a fresh Python process (the console script's
function, ``atdiff_jax.cli.run``). To spare the 41 processes their ~8 s of imports (mostly
TensorFlow, through clu's summary writer), the next process is started ahead with its imports
done and waits for its command line on stdin (``--no_prewarm``: plain ``python -m
atdiff_jax.cli`` processes). All of them share one persistent JAX compilation cache and run on
one simulated CPU device.

    python bench/faults.py --out=bench/results                 # 20 kills, ~9 min on 2 busy cores
    python bench/faults.py --kills=2 --steps=4 --out=/tmp/x    # the smoke test's size

The process exits non-zero when a resume is not bit-identical or a checkpoint was lost.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parents[1]


def _child() -> None:
    """A training process started ahead: imports first, then the ``atdiff`` argv from stdin."""
    sys.path.insert(0, str(REPO))
    # cli first, as `atdiff` does (it sets TensorFlow's environment); then the heavy imports
    from atdiff_jax import cli
    from atdiff_jax.train import loop  # noqa: F401
    line = sys.stdin.readline()
    if not line.strip():   # not needed after all
        sys.exit(0)
    sys.argv = ["atdiff", *json.loads(line)]
    cli.run()


def one_device_xla_flags() -> str:
    """``$XLA_FLAGS`` with one simulated CPU device."""
    return " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
                    + ["--xla_force_host_platform_device_count=1"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child()
        sys.exit(0)
    # The parent restores checkpoints itself: one CPU device, set before JAX starts.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["XLA_FLAGS"] = one_device_xla_flags()

import argparse
import collections
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
from common import BenchError, comma_list, machine_info, run_main, write_json

from atdiff_jax.train.checkpoint import TRASH  # where old checkpoints go first

TMP = ".orbax-checkpoint-tmp"
POLL_S = 0.001   # how often the workdir is looked at while aiming
ITEMS = ("state", "data", "config")
AIMS = ("random", "step", "data", "state", "commit", "delete")
# The micro network of tests/test_bench.py, fast AT with K=2 (two optimizer updates per minibatch).
MICRO = ("model.image_size=8", "model.num_channels=16", "model.channel_mult=1",
         "model.attention_resolutions=", "model.num_head_channels=16", "model.norm_groups=4",
         "adv.steps=2")

PHASES = {
    "startup": "startup (imports done; dataset, restore, compile) before the run's first step",
    "step": "a train step (next batch, compute, metrics) between checkpoint writes",
    "ckpt:data": "checkpoint write: data-iterator state and config JSON (the first items)",
    "ckpt:state": "checkpoint write: train state arrays (params, EMA, AdamW, sampler)",
    "ckpt:commit": "checkpoint write: items committed, step directory not yet renamed",
    "delete": "deleting the checkpoint that keep_checkpoints drops",
    "ended": "after the run had ended (the kill came too late)",
}


# ------------------------------------------------------------------------------ the workdir


def _listdir(path: pathlib.Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def committed_steps(ck: pathlib.Path) -> list[int]:
    """Steps whose directory has its final name (Orbax renames a step when it is complete)."""
    return sorted(int(n) for n in _listdir(ck) if n.isdigit())


def _json_ok(path: pathlib.Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def full_checkpoint(step_dir: pathlib.Path) -> bool:
    """Every file Orbax writes for a complete step is there (false while one is being deleted)."""
    names = set(_listdir(step_dir))
    return ({"_CHECKPOINT_METADATA", "commit_success.txt", *ITEMS} <= names
            and all("commit_success.txt" in _listdir(step_dir / i) for i in ITEMS))


def data_written(tmp_dir: pathlib.Path) -> bool:
    return "data" in _listdir(tmp_dir) or _json_ok(tmp_dir / f"data{TMP}" / "metadata")


def observed_phase(ck: pathlib.Path, log: pathlib.Path, ended: bool, start_step: int) -> str:
    """What the run was doing when it died, read from its workdir and log (see PHASES)."""
    if ended:
        return "ended"
    names = _listdir(ck)
    if TRASH in names or any(n.isdigit() and not full_checkpoint(ck / n) for n in names):
        return "delete"
    tmps = sorted((n for n in names if TMP in n), key=lambda n: int(n.split(".")[0]))
    if tmps:
        t = ck / tmps[-1]
        if not data_written(t):
            return "ckpt:data"
        return "ckpt:commit" if "state" in _listdir(t) else "ckpt:state"
    return "step" if any(s > start_step for s in logged_steps(log)) else "startup"


_METRIC = re.compile(r"\] \[(\d+)\] (delta_grad_norm=.*)$")


def logged_steps(log: pathlib.Path) -> set[int]:
    return {int(m.group(1)) for line in log.read_text(errors="replace").splitlines()
            if (m := _METRIC.search(line))}


def logged_metrics(log: pathlib.Path) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for line in log.read_text(errors="replace").splitlines()
            if (m := _METRIC.search(line))}


# ------------------------------------------------------------------------------ processes


class Trainings:
    """Starts ``atdiff train`` processes, each with its own log; keeps one started ahead."""

    def __init__(self, env: dict, logs: pathlib.Path, prewarm: bool):
        self.env, self.logs, self.prewarm = env, logs, prewarm
        self.count = 0
        self.spare = None

    def _spawn(self, argv: list[str] | None):
        log = self.logs / f"run{self.count:03d}.log"
        self.count += 1
        cmd = ([sys.executable, str(HERE), "--child"] if argv is None
               else [sys.executable, "-m", "atdiff_jax.cli", *argv])
        with open(log, "w") as f:   # the child keeps its own handle
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    stdin=subprocess.PIPE if argv is None else subprocess.DEVNULL,
                                    text=True)
        return proc, log

    def start(self, argv: list[str]):
        """``(process, log, start time)`` of ``atdiff <argv>``."""
        if not self.prewarm:
            proc, log = self._spawn(argv)
            return proc, log, time.monotonic()
        proc, log = self.spare or self._spawn(None)
        proc.stdin.write(json.dumps(argv) + "\n")
        proc.stdin.close()
        t0 = time.monotonic()
        self.spare = self._spawn(None)
        return proc, log, t0

    def close(self):
        if self.spare is not None:
            proc, _ = self.spare
            proc.stdin.close()   # it exits after its imports
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.spare = None


def wait_ok(proc, log: pathlib.Path, timeout: float, what: str) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"{what} did not finish in {timeout:.0f} s; log {log}") from None
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{what} exited with {rc} (log {log}):\n{tail}")


def watch_reference(proc, ck: pathlib.Path) -> dict[str, dict[int, float]]:
    """Seconds (since its start) at which each phase of each checkpoint write was first seen:
    ``tmp`` (its temporary directory), ``data`` (the JSON items written), ``state`` (the state
    item committed), ``final`` (renamed to its step) and ``gone`` (deleted)."""
    t0 = time.monotonic()
    seen: dict[str, dict[int, float]] = {k: {} for k in ("tmp", "data", "state", "final", "gone")}
    while proc.poll() is None:
        now = time.monotonic() - t0
        names = _listdir(ck)
        for n in names:
            head = n.split(".")[0]
            if not head.isdigit():
                continue
            s = int(head)
            if n.isdigit():
                seen["final"].setdefault(s, now)
                if not full_checkpoint(ck / n):
                    seen["gone"].setdefault(-s, now)   # deletion started
                continue
            seen["tmp"].setdefault(s, now)
            if s not in seen["data"] and data_written(ck / n):
                seen["data"][s] = now
            if s not in seen["state"] and "state" in _listdir(ck / n):
                seen["state"][s] = now
        for s in seen["final"]:
            if str(s) not in names:
                seen["gone"].setdefault(s, now)
        time.sleep(POLL_S)
    return seen


def phase_times(seen: dict[str, dict[int, float]], steps: int, keep: int) -> dict[str, float]:
    """Median seconds of each phase of a minibatch in a reference run (steps 2 .. N)."""
    def med(xs):
        return float(np.median(xs)) if xs else 0.0
    f, t = seen["final"], seen["tmp"]
    rng = range(2, steps + 1)
    return {
        "step_s": med([t[s] - f[s - 1] for s in rng if s in t and s - 1 in f]),
        "ckpt_data_s": med([seen["data"][s] - t[s] for s in rng if s in seen["data"]]),
        "ckpt_state_s": med([seen["state"][s] - seen["data"][s] for s in rng
                             if s in seen["state"] and s in seen["data"]]),
        "ckpt_commit_s": med([f[s] - seen["state"][s] for s in rng
                              if s in f and s in seen["state"]]),
        # from the commit of step s to the disappearance of step s - keep
        "delete_s": med([seen["gone"][s - keep] - f[s] for s in rng
                         if s in f and s - keep in seen["gone"]]),
    }


# ------------------------------------------------------------------------------ checkpoints


class Checkpoints:
    """Restores checkpoints of the runs (one target built once) and compares them."""

    def __init__(self, ref_workdir: pathlib.Path):
        import jax

        from atdiff_jax.train import checkpoint as ckpt
        from atdiff_jax.train.build import build_experiment, build_optimizer
        from atdiff_jax.train.loop import _abstract_state
        self.jax, self.ckpt = jax, ckpt
        manager = ckpt.create_manager(ref_workdir, read_only=True)
        try:
            config = ckpt.restore_config(manager, manager.latest_step())
        finally:
            manager.close()
        abstract = _abstract_state(build_experiment(config), build_optimizer(config))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        self.target = ckpt.abstract_with_shardings(abstract,
                                                   jax.tree.map(lambda _: device, abstract))

    def load(self, workdir: pathlib.Path, step: int) -> dict:
        """``{"state": {leaf path: array}, "data": ..., "config": ...}`` of checkpoint ``step``
        (raises if it cannot be restored)."""
        jax = self.jax
        manager = self.ckpt.create_manager(workdir, read_only=True)
        try:
            state, data, config = self.ckpt.restore(manager, step, self.target)
        finally:
            manager.close()
        leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
        config = json.loads(json.dumps(config))
        config.get("train", {}).pop("keep_checkpoints", None)  # the reference keeps every step
        return {"state": {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves},
                "data": dict(data), "config": config}

    def try_load(self, workdir, step) -> tuple[dict | None, str]:
        try:
            return self.load(workdir, step), ""
        except Exception as e:  # noqa: BLE001 - the finding is that it cannot be restored
            return None, f"{type(e).__name__}: {str(e)[:300]}"


def differences(got: dict, want: dict) -> list[str]:
    """What differs between two loaded checkpoints: state leaves (as bytes), data, config."""
    out = []
    a, b = got["state"], want["state"]
    if a.keys() != b.keys():
        out.append(f"state leaves differ: {sorted(a.keys() ^ b.keys())[:5]}")
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            out.append(f"state{k}")
    if got["data"] != want["data"]:
        out.append(f"data iterator state {got['data']} != {want['data']}")
    if got["config"] != want["config"]:
        out.append("config")
    return out


def summarize_leaves(diff: list[str]) -> list[str]:
    """Differing state leaves grouped by their top-level field (params, ema, opt_state, ...)."""
    groups = collections.Counter(re.match(r"state\.(\w+)", d).group(1) if d.startswith("state.")
                                 else d for d in diff)
    return [f"{k} ({n} leaves)" if n > 1 else k for k, n in groups.items()]


# ------------------------------------------------------------------------------ one kill


def aim_and_kill(proc, t0: float, ck: pathlib.Path, aim: str, step: int, rng: random.Random,
                 timing: dict, ref_wall: float) -> dict:
    """Waits for the aimed moment, SIGKILLs the process group; what was seen just before."""
    def wait(cond) -> bool:
        while proc.poll() is None:
            if cond():
                return True
            time.sleep(POLL_S)
        return False

    tmp = ck / f"{step}{TMP}"
    delay = 0.0
    if aim == "random":   # mostly while it trains, some in the end of its startup
        delay = rng.uniform(max(0.0, timing["first_checkpoint_s"] - 2.0), 0.95 * ref_wall)
        ok = True
    elif aim == "step":
        ok = wait(lambda: (ck / str(step - 1)).is_dir())
        delay = rng.uniform(0.0, 0.9 * timing["step_s"])
    elif aim == "data":
        ok = wait(tmp.is_dir)
    elif aim == "state":
        ok = wait(lambda: data_written(tmp))
        delay = rng.uniform(0.0, 0.9 * timing["ckpt_state_s"])
    elif aim == "commit":
        ok = wait(lambda: (tmp / "state").is_dir())
    else:  # delete: Orbax removes the oldest step right after committing a new one
        ok = wait(lambda: (ck / str(step)).is_dir())
        delay = rng.uniform(0.0, 0.9 * timing["delete_s"])
    if ok and delay:
        end = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(POLL_S)
    before = committed_steps(ck)
    killed_at = time.monotonic() - t0
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    return {"aim": aim, "aimed_step": step, "delay_s": delay, "kill_s": killed_at,
            "ended_before_kill": rc != -signal.SIGKILL, "committed_before": before}


# ------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.NAME=VALUE",
                   help="extra config override (repeatable), passed as --config.GROUP.NAME=VALUE")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=6, help="minibatches of every run (N)")
    p.add_argument("--keep", type=int, default=2, help="train.keep_checkpoints of the killed runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--aims", default=",".join(AIMS),
                   help=f"the moments aimed at, in turn (any of {', '.join(AIMS)})")
    p.add_argument("--data_dir", default="", help="TFDS data_dir with mnist32 (default: built "
                   "in the scratch directory, ~15 s)")
    p.add_argument("--root", default="", help="scratch directory (default: a temporary one, "
                   "removed at the end)")
    p.add_argument("--no_prewarm", action="store_true",
                   help="start every training as a plain `python -m atdiff_jax.cli` process")
    p.add_argument("--timeout", type=float, default=600, help="seconds per training process")
    p.add_argument("--out", default="", help="folder for the JSON result (optional)")
    args = p.parse_args(argv)
    if args.kills < 1 or args.steps < 3 or args.keep < 1:
        raise BenchError("--kills must be >= 1, --steps >= 3 and --keep >= 1")
    args.aims = comma_list(args.aims, name="aims")
    if bad := [a for a in args.aims if a not in AIMS]:
        raise BenchError(f"--aims: unknown {bad}; choose from {AIMS}")
    t_start = time.monotonic()
    root = pathlib.Path(args.root or tempfile.mkdtemp(prefix="atdiff_faults_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for old in [root / "logs", root / "reference", root / "reference_warm",
                *root.glob("kill[0-9]*")]:   # of an earlier invocation (the cache is kept)
        shutil.rmtree(old, ignore_errors=True)
    (root / "logs").mkdir()
    try:
        result = _run(args, root, t_start)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _run(args, root: pathlib.Path, t_start: float) -> dict:
    data_dir = pathlib.Path(args.data_dir).resolve() if args.data_dir else root / "data"
    if not args.data_dir:
        sys.path.insert(0, str(REPO))
        from atdiff_jax.data import prepare_mnist
        prepare_mnist(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "ATDIFF_"))}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               XLA_FLAGS=one_device_xla_flags(), JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    overrides = [*MICRO, f"data.data_dir={data_dir}", f"train.num_minibatches={args.steps}",
                 "train.checkpoint_every=1", "train.log_every=1", "train.sample_every=0",
                 *args.set]

    def command(workdir: pathlib.Path, keep: int) -> list[str]:
        return ["train", f"--config={args.config}", f"--workdir={workdir}",
                *[f"--config.{o}" for o in overrides], f"--config.train.keep_checkpoints={keep}"]

    runs = Trainings(env, root / "logs", prewarm=not args.no_prewarm)
    try:
        return _experiment(args, root, runs, command, t_start)
    finally:
        runs.close()


def _experiment(args, root, runs: Trainings, command, t_start: float) -> dict:
    n, keep = args.steps, args.keep
    # ---- the reference (cold compile: fills the cache)
    ref = root / "reference"
    proc, log, t0 = runs.start(command(ref, n))
    watch_reference(proc, ref / "checkpoints")
    wait_ok(proc, log, args.timeout, "the reference run")
    ref_wall_cold = time.monotonic() - t0
    if committed_steps(ref / "checkpoints") != list(range(1, n + 1)):
        raise RuntimeError("the reference run has checkpoints "
                           f"{committed_steps(ref / 'checkpoints')}")
    # ---- a second reference run with a warm cache: the timings the kills are aimed with
    ref2 = root / "reference_warm"
    proc, log2, t0 = runs.start(command(ref2, keep))
    seen = watch_reference(proc, ref2 / "checkpoints")
    wait_ok(proc, log2, args.timeout, "the warm reference run")
    ref_wall = time.monotonic() - t0
    timing = phase_times(seen, n, keep)
    start_of_training = timing["first_checkpoint_s"] = min(seen["tmp"].values(), default=0.0)
    cks = Checkpoints(ref)
    reference = {s: cks.load(ref, s) for s in range(1, n + 1)}
    warm_diff = differences(cks.load(ref2, n), reference[n])
    ref_metrics = logged_metrics(log)
    print(f"reference: {n} minibatches in {ref_wall_cold:.1f} s (cold compile), "
          f"{ref_wall:.1f} s warm (first checkpoint at {start_of_training:.1f} s); per minibatch: "
          f"step {timing['step_s'] * 1e3:.0f} ms, checkpoint: JSON items "
          f"{timing['ckpt_data_s'] * 1e3:.0f} ms, state arrays {timing['ckpt_state_s'] * 1e3:.0f} "
          f"ms, commit {timing['ckpt_commit_s'] * 1e3:.0f} ms, deleting the oldest "
          f"{timing['delete_s'] * 1e3:.0f} ms; the warm rerun is "
          f"{'bit-identical' if not warm_diff else 'DIFFERENT: ' + ', '.join(warm_diff[:3])}")
    shutil.rmtree(ref2, ignore_errors=True)

    rng = random.Random(args.seed)
    plan = [args.aims[i % len(args.aims)] for i in range(args.kills)]
    records = []
    for i, aim in enumerate(plan):
        lo = keep + 1 if aim == "delete" else 2 if aim == "step" else 1
        step = rng.randint(min(lo, n - 1), n - 1)
        work = root / f"kill{i:02d}"
        ck = work / "checkpoints"
        proc, log, t0 = runs.start(command(work, keep))
        rec = {"kill": i, **aim_and_kill(proc, t0, ck, aim, step, rng, timing, ref_wall)}
        rec["phase"] = observed_phase(ck, log, rec["ended_before_kill"], 0)
        after = committed_steps(ck)
        rec["committed_after"] = after
        rec["tmp_dirs_after"] = sorted(x for x in _listdir(ck) if TMP in x)
        newest = sorted(set(rec["committed_before"]) | set(after))[-keep:]
        required = [s for s in rec["committed_before"] if s in newest]
        lost, partial, mismatched = [], [], []
        for s in after:   # every step directory there must restore, and be the reference's
            got, err = cks.try_load(work, s)
            if got is None:
                (lost if s in required else partial).append(
                    f"step {s} does not restore after the kill: {err}")
            elif d := differences(got, reference[s]):
                mismatched.append(f"checkpoint {s} differs from the reference: "
                                  f"{', '.join(summarize_leaves(d))}")
        lost += [f"step {s}, complete before the kill, is gone" for s in required
                 if s not in after]
        expected_start = max(after) if after else None
        # ---- resume
        proc, rlog, t1 = runs.start(command(work, keep))
        wait_ok(proc, rlog, args.timeout, f"the resume after kill {i}")
        rec["resume_s"] = time.monotonic() - t1
        m = re.search(r"resumed from \S+ step (\d+)", rlog.read_text(errors="replace"))
        rec["resumed_from"] = int(m.group(1)) if m else None
        rec["expected_resume"] = expected_start
        if rec["resumed_from"] != expected_start:
            lost.append(f"resumed from {rec['resumed_from']}, the newest complete checkpoint "
                        f"was {expected_start}")
        final = committed_steps(ck)
        rec["committed_final"] = final
        rec["required_after_kill"] = required
        for s in required:
            if s in final[-keep:]:
                got, err = cks.try_load(work, s)
                if got is None:
                    lost.append(f"step {s} does not restore after the resume: {err}")
                elif differences(got, reference[s]):
                    mismatched.append(f"step {s} differs from the reference after the resume")
        got, err = cks.try_load(work, n)
        diff = ([f"final checkpoint {n} does not restore: {err}"] if got is None
                else summarize_leaves(differences(got, reference[n])))
        rec["bit_identical"] = not diff
        rec["differences"] = diff
        resumed_metrics = logged_metrics(rlog)
        rec["metrics_equal_reference"] = all(ref_metrics.get(s) == v
                                             for s, v in resumed_metrics.items())
        rec.update(lost=lost, partial_visible=partial, mismatched=mismatched,
                   no_checkpoint_lost=not lost)
        problems = lost + partial + mismatched
        records.append(rec)
        print(f"kill {i:2d}  aim {aim:6s} s{step:<2d} at {rec['kill_s']:5.2f} s  "
              f"phase {rec['phase']:11s}  committed {rec['committed_before']} -> {after}"
              f"{' +tmp' if rec['tmp_dirs_after'] else ''}  resumed from "
              f"{rec['resumed_from']}  {'identical' if rec['bit_identical'] else 'DIFFERENT'}"
              + (f"  PROBLEMS: {'; '.join(problems)}" if problems else ""), flush=True)
        shutil.rmtree(work, ignore_errors=True)

    k = sum(r["bit_identical"] for r in records)
    lost = [r for r in records if not r["no_checkpoint_lost"]]
    visible = [r for r in records if r["partial_visible"]]
    mismatched = [r for r in records if r["mismatched"]]
    hist = collections.Counter(r["phase"] for r in records)
    total_s = time.monotonic() - t_start
    print(f"\n{k}/{len(records)} bit-identical")
    for r in records:
        if not r["bit_identical"]:
            print(f"  kill {r['kill']} ({r['phase']}): {', '.join(r['differences'])}")
    print(f"no good checkpoint lost: {'yes' if not lost else 'no'}")
    for r in lost:
        print(f"  kill {r['kill']} ({r['phase']}): {'; '.join(r['lost'])}")
    print(f"checkpoints equal to the reference's: {'yes' if not mismatched else 'no'}; partial "
          f"checkpoints left visible: {'none' if not visible else len(visible)}")
    for r in mismatched + visible:
        print(f"  kill {r['kill']} ({r['phase']}): "
              + "; ".join(r["mismatched"] + r["partial_visible"]))
    print("phases hit: " + ", ".join(f"{ph} {hist[ph]}" for ph in PHASES if hist[ph]))
    print(f"metrics logged after each resume equal the reference's: "
          f"{sum(r['metrics_equal_reference'] for r in records)}/{len(records)}")
    print(f"time: {total_s:.0f} s ({total_s / 60:.1f} min)")
    result = {**machine_info(), "config": args.config, "overrides": list(MICRO) + list(args.set),
              "steps": n, "checkpoint_every": 1, "keep_checkpoints": keep, "kills": args.kills,
              "seed": args.seed, "aims": args.aims, "prewarm": not args.no_prewarm,
              "reference": {"wall_s_cold": ref_wall_cold, "wall_s_warm": ref_wall,
                            **timing,
                            "warm_rerun_bit_identical": not warm_diff},
              "phases": PHASES, "phase_histogram": dict(hist),
              "bit_identical": k, "no_good_checkpoint_lost": not lost,
              "partial_checkpoints_visible": len(visible),
              "checkpoints_equal_reference": not mismatched, "total_s": total_s,
              "runs": records}
    result.pop("num_devices", None)
    if args.out:
        write_json(args.out, f"faults_{pathlib.Path(args.config).stem}_{args.kills}kills", result)
    if k < len(records) or lost or mismatched or visible:
        raise SystemExit("faults: a resume was not bit-identical, a checkpoint was lost, differs "
                         "from the reference or is left partial")
    return result


if __name__ == "__main__":
    run_main(main)
