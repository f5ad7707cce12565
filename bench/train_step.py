"""Train-step benchmark: clean vs fast AT vs PGD-AT, timed in one run so the ratios are fair.

For each adversary setting the jitted train step of the given config is compiled once and timed
over a few minibatches. Printed per setting: compile time, seconds per minibatch and per
optimizer update, XLA's FLOP count per minibatch and the achieved FLOP/s, the compiled program's
memory (XLA memory analysis: arguments + outputs + temporaries - donated/aliased buffers, i.e.
what the executable allocates, not the process RSS, which is also reported as a running peak),
and the ratios against clean training: fast AT per update (the method's promise: ~1) and per
minibatch (~K). The achieved FLOP/s is also given as a fraction of a float32 matmul peak
measured in the same run (model FLOPs utilisation, MFU).

The three configurations of the benchmark issue in one invocation (tiny at batch 8, the MNIST
default at batch 32, the CIFAR-10 paper network at batch 4; a few minutes on 2 CPU cores):

    python bench/train_step.py --preset=issue --iters=2 --out=bench/results

or any configs and batches (one batch for all configs, or one per config):

    python bench/train_step.py --config=configs/mnist_adm_at.py --batch=32 --out=bench/results
    python bench/train_step.py --config=configs/cifar10_adm_at.py --batch=8 --iters=3
    python bench/train_step.py --config=configs/tiny.py --set=model.dtype=bfloat16
"""
from __future__ import annotations

import argparse
import pathlib

import jax
from common import (
    BenchError,
    comma_list,
    compile_timed,
    cost_and_memory,
    fmt_mib,
    load_config,
    machine_info,
    machine_line,
    matmul_peak,
    max_rss_bytes,
    time_calls,
    run_main,
    write_json,
)

from atdiff_jax.train.step import standalone_train_step

SETTINGS = (("clean", "none", 1), ("fast_at", "fast", 3), ("pgd_at", "pgd", 3))
PRESETS = {"issue": (("configs/tiny.py", 8), ("configs/mnist_adm_at.py", 32),
                     ("configs/cifar10_adm_at.py", 4))}


def build_step(config, kind: str, steps: int):
    """(jitted donating train step, fresh state, batch) of ``config`` with adversary ``kind``."""
    config = config.copy_and_resolve_references()
    config.adv.kind = kind
    config.adv.steps = steps
    return standalone_train_step(config)


def bench_setting(config, kind: str, steps: int, iters: int, warmup: int) -> dict:
    step, state, batch = build_step(config, kind, steps)
    compiled, compile_s = compile_timed(step, state, batch)
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    times = time_calls(call, iters, warmup)
    per_mb = sorted(times)[len(times) // 2]
    updates = steps if kind == "fast" else 1
    out = {"kind": kind, "K": steps, "updates_per_minibatch": updates, "compile_s": compile_s,
           "s_per_minibatch": per_mb, "s_per_update": per_mb / updates, "times": times,
           **cost_and_memory(compiled), "process_peak_rss_bytes": max_rss_bytes()}
    out["flops_per_s"] = out["flops"] / per_mb
    return out


def run_config(path: str, batch: int | None, args, peak: float) -> dict:
    config = load_config(path, args.set)
    if batch:
        config.train.global_batch_size = batch
    wanted = comma_list(args.settings, name="settings")
    rows = {name: bench_setting(config, kind, k, args.iters, args.warmup)
            for name, kind, k in SETTINGS if name in wanted}
    base = rows.get("clean")
    print(f"\n{path}  batch {config.train.global_batch_size}"
          + (f"  (--set {' '.join(args.set)})" if args.set else ""))
    print(f"{'setting':9s} {'compile s':>9s} {'s/minibatch':>11s} {'s/update':>9s} "
          f"{'GFLOP/mb':>9s} {'GFLOP/s':>8s} {'MFU':>6s} {'XLA MiB':>8s} {'RSS MiB':>8s} "
          f"{'x clean/upd':>11s} {'x clean/mb':>10s}")
    for name, r in rows.items():
        ru = r["s_per_update"] / base["s_per_update"] if base else float("nan")
        rm = r["s_per_minibatch"] / base["s_per_minibatch"] if base else float("nan")
        r["ratio_per_update_vs_clean"], r["ratio_per_minibatch_vs_clean"] = ru, rm
        r["mfu"] = r["flops_per_s"] / peak
        print(f"{name:9s} {r['compile_s']:9.1f} {r['s_per_minibatch']:11.4f} "
              f"{r['s_per_update']:9.4f} {r['flops'] / 1e9:9.1f} {r['flops_per_s'] / 1e9:8.1f} "
              f"{r['mfu']:6.1%} {fmt_mib(r['memory_bytes']):>8s} "
              f"{fmt_mib(r['process_peak_rss_bytes']):>8s} {ru:11.2f} {rm:10.2f}")
    return {"config": path, "batch": config.train.global_batch_size, "overrides": list(args.set),
            "settings": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_adm_at.py",
                   help="config file(s), comma-separated")
    p.add_argument("--batch", default="", help="global batch: one for all configs or one per "
                   "config, comma-separated (default: each config's)")
    p.add_argument("--preset", default="", choices=["", *PRESETS],
                   help="'issue': tiny b8, MNIST default b32, CIFAR-10 paper config b4")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.NAME=VALUE",
                   help="config override (repeatable), e.g. model.dtype=bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--settings", default="clean,fast_at,pgd_at")
    p.add_argument("--out", default="", help="folder for the JSON results (optional)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        raise BenchError("--iters must be >= 1 and --warmup >= 0")
    unknown = sorted(set(comma_list(args.settings, name="settings")) - {s[0] for s in SETTINGS})
    if unknown:
        raise BenchError(f"--settings: unknown {unknown}; choose from {[s[0] for s in SETTINGS]}")
    if args.preset:
        runs = list(PRESETS[args.preset])
    else:
        configs = comma_list(args.config, name="config")
        batches = comma_list(args.batch, int, "batch") if args.batch else [0]
        if len(batches) == 1:
            batches = batches * len(configs)
        if len(batches) != len(configs):
            raise BenchError(f"--batch: give one batch or one per config ({len(configs)}), got "
                             f"{args.batch!r}")
        runs = list(zip(configs, batches))
    info = machine_info()
    peak = matmul_peak()
    print(f"{machine_line(info)}\nmeasured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    results = [run_config(path, batch, args, peak) for path, batch in runs]
    result = {**info, "matmul_peak_flops": peak, "runs": results}
    # The single-config layout of earlier versions (top-level config/batch/settings) is kept.
    if len(results) == 1:
        result.update(results[0])
    if args.out:
        stem = "+".join(f"{pathlib.Path(r['config']).stem}_b{r['batch']}" for r in results)
        write_json(args.out, f"train_step_{stem}_{jax.default_backend()}", result)
    return result


if __name__ == "__main__":
    run_main(main)
