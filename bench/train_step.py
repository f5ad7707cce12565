"""Train-step benchmark: clean vs fast AT vs PGD-AT, timed in one run so the ratios are fair.

For each adversary setting the jitted train step of the given config is compiled once and timed
over a few minibatches. Printed per setting: compile time, seconds per minibatch and per
optimizer update, XLA's FLOP count per minibatch and the achieved FLOP/s, the compiled program's
memory (arguments + outputs + temporaries, from XLA's memory analysis), and the ratios against
clean training: fast AT per update (the method's promise: ~1) and per minibatch (~K).
The achieved FLOP/s is also given as a fraction of a float32 matmul peak measured in the same
run (model FLOPs utilisation).

    python bench/train_step.py --config=configs/mnist_adm_at.py --batch=32 --out=bench/results
    python bench/train_step.py --config=configs/cifar10_adm_at.py --batch=8 --iters=3
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import runpy
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from atdiff_jax.train.experiment import build_experiment, build_optimizer, lr_schedule  # noqa: E402
from atdiff_jax.train.state import create_state, init_params  # noqa: E402
from atdiff_jax.train.step import make_train_step  # noqa: E402

SETTINGS = (("clean", "none", 1), ("fast_at", "fast", 3), ("pgd_at", "pgd", 3))


def matmul_peak(n: int = 2048, iters: int = 10) -> float:
    """Measured float32 matmul FLOP/s of this backend (n x n x n, best of ``iters``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {"flops": float(cost.get("flops", float("nan")))}
    try:
        mem = compiled.memory_analysis()
        out["memory_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        out["memory_bytes"] = out["temp_bytes"] = None
    return out


def bench_setting(config, kind: str, steps: int, iters: int, warmup: int) -> dict:
    config = config.copy_and_resolve_references()
    config.adv.kind = kind
    config.adv.steps = steps
    exp = build_experiment(config)
    opt = build_optimizer(config)
    state = create_state(exp, opt, init_params(exp, jax.random.key(0)))
    step = jax.jit(make_train_step(exp, opt, seed=0, lr_fn=lr_schedule(config)), donate_argnums=0)
    b = config.train.global_batch_size
    s, c = config.model.image_size, config.model.in_channels
    batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, s, s, c)),
                                  jnp.float32)}
    if config.model.class_cond:
        batch["label"] = jnp.zeros((b,), jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    per_mb = float(np.median(times))
    updates = steps if kind == "fast" else 1
    out = {"kind": kind, "K": steps, "updates_per_minibatch": updates, "compile_s": compile_s,
           "s_per_minibatch": per_mb, "s_per_update": per_mb / updates,
           "times": times, **_cost(compiled)}
    out["flops_per_s"] = out["flops"] / per_mb
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_adm_at.py")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--settings", default="clean,fast_at,pgd_at")
    p.add_argument("--out", default="", help="folder for the JSON result (optional)")
    args = p.parse_args(argv)
    config = runpy.run_path(args.config)["get_config"]()
    if args.batch:
        config.train.global_batch_size = args.batch
    wanted = args.settings.split(",")
    peak = matmul_peak()
    rows = {name: bench_setting(config, kind, k, args.iters, args.warmup)
            for name, kind, k in SETTINGS if name in wanted}
    base = rows.get("clean")
    print(f"\n{args.config}  batch {config.train.global_batch_size}  backend "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {len(jax.devices())} device(s)"
          f"\nmeasured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s\n")
    hdr = (f"{'setting':9s} {'compile s':>9s} {'s/minibatch':>11s} {'s/update':>9s} "
           f"{'GFLOP/mb':>9s} {'GFLOP/s':>8s} {'MFU':>6s} {'mem MiB':>8s} "
           f"{'x clean/upd':>11s} {'x clean/mb':>10s}")
    print(hdr)
    for name, r in rows.items():
        mem = f"{r['memory_bytes'] / 2**20:8.1f}" if r["memory_bytes"] else f"{'n/a':>8s}"
        ru = r["s_per_update"] / base["s_per_update"] if base else float("nan")
        rm = r["s_per_minibatch"] / base["s_per_minibatch"] if base else float("nan")
        r["ratio_per_update_vs_clean"], r["ratio_per_minibatch_vs_clean"] = ru, rm
        r["mfu"] = r["flops_per_s"] / peak
        print(f"{name:9s} {r['compile_s']:9.1f} {r['s_per_minibatch']:11.4f} "
              f"{r['s_per_update']:9.4f} {r['flops'] / 1e9:9.1f} {r['flops_per_s'] / 1e9:8.1f} "
              f"{r['mfu']:6.1%} {mem} {ru:11.2f} {rm:10.2f}")
    result = {"config": args.config, "batch": config.train.global_batch_size,
              "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
              "num_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(),
              "jax": jax.__version__, "matmul_peak_flops": peak, "settings": rows}
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = pathlib.Path(args.config).stem + f"_b{config.train.global_batch_size}"
        path = out / f"train_step_{name}_{jax.default_backend()}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
