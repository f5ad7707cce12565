"""Scaling benchmark: the same global batch on 1, 2, 4, 8 simulated CPU devices (and FSDP meshes),
checked for correctness against one device and timed.

Each mesh runs in its own subprocess, since ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
must be set before JAX starts. Every worker builds the same initial state (one single-device
init, then placed on its ``("data", "fsdp")`` mesh with the trainer's shardings,
``atdiff_jax.train.sharding``), runs ``--minibatches`` train steps (fast AT by default) on the same
global batch, saves the loss of each minibatch and the final params and optimizer state, then
times ``--iters`` more steps.

Correctness (against the 1-device run; it exits non-zero if any check fails):

* ``loss rel``: max over the minibatches of |loss - loss_1| / |loss_1|            <= --tol (1e-4)
* ``params rel``: ||params - params_1|| / ||params_1|| over all parameters         <= --tol
* ``update rel``: the same for the change of the params, (p - p0) vs (p_1 - p0)   <= --update_tol
* ``opt rel``: the same for Adam's moments (catches a wrongly scaled gradient,
  which Adam's scale-invariant update would hide)                               <= --update_tol
* ``max |dp|``: the largest elementwise params difference (printed for information).

The results are not bit-identical: with N devices the batch-mean gradient is summed in another
order, a float32 rounding difference of ~1e-7 relative, which Adam amplifies for coordinates
whose gradient is near zero (its update is ~lr whatever the gradient's size). Hence the update
and moment tolerances are looser than the params/loss one; an actual error (another example, noise
draw, a summed instead of averaged gradient, a missed update) gives O(1) update differences.

Timing: simulated devices are threads of ONE process sharing the machine's cores, so on a
2-core CPU the ratio against 1 device shows the partitioning and collective overhead, not a
speed-up (N devices cannot be faster than the cores they share).

    python bench/scaling.py --config=configs/tiny.py --meshes=1,2,4,8,8:2,8:8 --out=bench/results
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from common import BenchError, comma_list, run_main, write_json

HERE = pathlib.Path(__file__).resolve()


def parse_meshes(text: str) -> list[tuple[int, int]]:
    """``"1,2,8:2"`` -> ``[(1, 1), (2, 1), (8, 2)]`` (devices, fsdp)."""
    out = []
    for item in comma_list(text, name="meshes"):
        dev, _, fsdp = item.partition(":")
        try:
            d, f = int(dev), int(fsdp or 1)
        except ValueError:
            raise BenchError(f"--meshes: {item!r} is not DEVICES or DEVICES:FSDP") from None
        if d < 1 or f < 1 or d % f:
            raise BenchError(f"--meshes: {item!r}: fsdp must divide the device count")
        out.append((d, f))
    if (1, 1) not in out:
        out.insert(0, (1, 1))  # the reference
    return out


# ------------------------------------------------------------------------------------- worker


def _flat(tree) -> dict[str, np.ndarray]:
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves
            if np.issubdtype(np.asarray(v).dtype, np.floating)}


def worker(args) -> dict:
    import jax
    from common import compile_timed, load_config, machine_info, time_calls

    from atdiff_jax.train.step import random_train_batch

    from atdiff_jax.train import sharding
    from atdiff_jax.train.build import build_experiment, build_optimizer, lr_schedule
    from atdiff_jax.train.state import init_state
    from atdiff_jax.train.step import make_train_step

    if jax.device_count() != args.devices:
        raise RuntimeError(f"asked for {args.devices} devices, JAX has {jax.device_count()} "
                           "(XLA_FLAGS must be set before JAX starts)")
    config = load_config(args.config, args.set)
    if args.batch:
        config.train.global_batch_size = args.batch
    config.mesh.fsdp = args.fsdp
    b = config.train.global_batch_size
    if b % args.devices:
        raise BenchError(f"--batch: the global batch ({b}) must be divisible by {args.devices}")
    exp = build_experiment(config)
    opt = build_optimizer(config)
    # One single-device init (identical in every worker), then placed on the mesh.
    host = jax.device_get(jax.jit(functools.partial(init_state, exp, opt))(
        jax.random.key(config.seed)))
    mesh = sharding.create_mesh(args.fsdp)
    shardings = sharding.state_shardings(jax.eval_shape(lambda: host), mesh)
    state = jax.device_put(host, shardings)
    batch = sharding.global_batch(
        {k: np.asarray(v) for k, v in random_train_batch(config, b, seed=1).items()}, mesh)
    step = jax.jit(make_train_step(exp, opt, seed=config.seed, lr_fn=lr_schedule(config)),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    compiled, compile_s = compile_timed(step, state, batch)
    losses = []
    for _ in range(args.minibatches):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    arrays = {f"init{k}": v for k, v in _flat(host.params).items()}
    arrays.update({f"params{k}": v for k, v in _flat(state.params).items()})
    arrays.update({f"opt{k}": v for k, v in _flat(state.opt_state).items()})
    np.savez(args.dump, **arrays)
    holder = {"state": state}

    def call():
        holder["state"], m = compiled(holder["state"], batch)
        return m

    times = time_calls(call, args.iters, warmup=0)
    return {"devices": args.devices, "fsdp": args.fsdp, "batch": b, "compile_s": compile_s,
            "losses": losses, "updates": int(jax.device_get(holder["state"].updates)),
            "times": times, "s_per_minibatch": float(np.median(times)),
            "machine": machine_info()}


# ------------------------------------------------------------------------------------- parent


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / den if den else float(np.linalg.norm(a - b))


def compare(dump: str, ref_dump: str) -> dict:
    """Correctness numbers of one worker's dump against the 1-device dump."""
    got, want = np.load(dump), np.load(ref_dump)
    if sorted(got.files) != sorted(want.files):
        raise RuntimeError(f"{dump}: a different set of arrays than the 1-device run")

    def cat(arrs, prefix):
        return np.concatenate([arrs[k].ravel().astype(np.float64) for k in sorted(arrs.files)
                               if k.startswith(prefix)])

    p, p1, p0 = cat(got, "params"), cat(want, "params"), cat(want, "init")
    return {"params_rel": _rel(p, p1), "update_rel": _rel(p - p0, p1 - p0),
            "opt_rel": _rel(cat(got, "opt"), cat(want, "opt")),
            "params_max_abs": float(np.max(np.abs(p - p1))),
            "init_max_abs": float(np.max(np.abs(cat(got, "init") - p0)))}


def run_worker(devices: int, fsdp: int, args, tmp: pathlib.Path) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    dump = tmp / f"d{devices}_f{fsdp}.npz"
    cmd = [sys.executable, str(HERE), "--worker", f"--devices={devices}", f"--fsdp={fsdp}",
           f"--config={args.config}", f"--batch={args.batch}", f"--minibatches={args.minibatches}",
           f"--iters={args.iters}", f"--dump={dump}", *[f"--set={s}" for s in args.set]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {devices} devices / fsdp {fsdp} failed ({proc.returncode}):\n"
                           + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["dump"] = str(dump)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.NAME=VALUE",
                   help="config override (repeatable), e.g. adv.kind=none")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    p.add_argument("--meshes", default="1,2,4,8,8:2,8:8",
                   help="DEVICES or DEVICES:FSDP, comma-separated (1 is always run)")
    p.add_argument("--minibatches", type=int, default=2, help="steps compared for correctness")
    p.add_argument("--iters", type=int, default=5, help="timed steps after those")
    p.add_argument("--tol", type=float, default=1e-4, help="loss and params relative tolerance")
    p.add_argument("--update_tol", type=float, default=1e-3,
                   help="relative tolerance of the params' change and Adam's moments")
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    p.add_argument("--out", default="", help="folder for the JSON result (optional)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fsdp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dump", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.minibatches < 1 or args.iters < 1:
        raise BenchError("--minibatches and --iters must be >= 1")
    if args.worker:
        result = worker(args)
        print(json.dumps(result))
        return result

    meshes = parse_meshes(args.meshes)
    with tempfile.TemporaryDirectory(prefix="atdiff_scaling_") as tmp:
        runs = [run_worker(d, f, args, pathlib.Path(tmp)) for d, f in meshes]
        ref = runs[0]
        failures = []
        for r in runs:
            r.update(compare(r.pop("dump"), ref["dump"]) if r is not ref else
                     {"params_rel": 0.0, "update_rel": 0.0, "opt_rel": 0.0,
                      "params_max_abs": 0.0, "init_max_abs": 0.0})
            r["loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
            r["ratio_vs_1"] = r["s_per_minibatch"] / ref["s_per_minibatch"]
            checks = {"loss_rel": args.tol, "params_rel": args.tol, "update_rel": args.update_tol,
                      "opt_rel": args.update_tol}
            bad = [f"{k} {r[k]:.2e} > {tol:g}" for k, tol in checks.items() if not r[k] <= tol]
            if r["init_max_abs"] != 0.0 or r["updates"] != ref["updates"]:
                bad.append("different initial params or update count")
            r["ok"] = not bad
            if bad:
                failures.append(f"{r['devices']} devices / fsdp {r['fsdp']}: " + "; ".join(bad))
        ref.pop("dump", None)
    m = ref["machine"]
    print(f"\n{args.config}  global batch {ref['batch']}, {args.minibatches} minibatch(es) "
          f"compared, {args.iters} timed; {m['cpu_model']}, {m['cpu_count']} cores, "
          f"jax {m['jax']}")
    print("Simulated devices share the CPU cores: the ratio is overhead, not speed-up.\n")
    print(f"{'devices':>7s} {'fsdp':>4s} {'compile s':>9s} {'s/minibatch':>11s} {'x 1 dev':>7s} "
          f"{'loss rel':>9s} {'params rel':>10s} {'update rel':>10s} {'opt rel':>9s} "
          f"{'max |dp|':>9s}  ok")
    for r in runs:
        print(f"{r['devices']:7d} {r['fsdp']:4d} {r['compile_s']:9.1f} {r['s_per_minibatch']:11.4f} "
              f"{r['ratio_vs_1']:7.2f} {r['loss_rel']:9.1e} {r['params_rel']:10.1e} "
              f"{r['update_rel']:10.1e} {r['opt_rel']:9.1e} {r['params_max_abs']:9.1e}  "
              f"{'yes' if r['ok'] else 'NO'}")
    result = {**{k: v for k, v in m.items() if k != "num_devices"}, "config": args.config,
              "overrides": list(args.set), "minibatches": args.minibatches,
              "tol": args.tol, "update_tol": args.update_tol, "runs": runs}
    for r in runs:
        r.pop("machine", None)
    if args.out:
        write_json(args.out, f"scaling_{pathlib.Path(args.config).stem}", result)
    if failures:
        raise SystemExit("scaling: results differ from 1 device beyond tolerance:\n  "
                         + "\n  ".join(failures))
    return result


if __name__ == "__main__":
    run_main(main)
