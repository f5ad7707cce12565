"""Sampler benchmark: images/s of DDIM, IDDPM, ES (IDDPM with epsilon scaling) and DPM-Solver++
at a few NFEs, for a config's network.

The network is randomly initialised (speed does not depend on the values), with its
zero-initialised output layers given small random weights so that every sampler produces a
non-trivial output (checked: finite and not constant). Each (sampler, NFE) is the jitted
``atdiff_jax.samplers.sampler_fn`` (one ``lax.scan`` over the steps), compiled ahead of time
once; compile time is reported apart from the run time. In the same run the bare jitted network
forward at the same batch is timed too, so ``loop overhead`` = (seconds per network evaluation
inside the sampler) / (one standalone forward) shows what the sampler adds around the network
(1.0 = nothing).

With several devices (e.g. ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` on a CPU) each
(sampler, NFE) is also run with the batch split over them, as ``atdiff_jax.samplers.generate``
does (``batch_shardings``), and ``x 1 device`` is its time over the one-device time of the same run;
the outputs of the two must agree to 1e-2 (sampling is per example; XLA may tile the smaller
per-device convolutions differently, and a random network amplifies that float32 rounding over
the steps: up to 7e-4 for ES-10 on the MNIST network; a wrong example or noise draw is O(1)).

    python bench/samplers.py --config=configs/mnist_adm_at.py --batch=32 --nfe=10,50 --out=bench/results
"""
from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    BenchError,
    comma_list,
    compile_timed,
    load_config,
    machine_info,
    machine_line,
    perturb_zero_params,
    time_calls,
    run_main,
    write_json,
)

from atdiff_jax.eval.report import DEFAULT_ES_SCALE
from atdiff_jax.samplers import EVAL_SAMPLERS, batch_shardings, sampler_fn
from atdiff_jax.train.build import build_experiment
from atdiff_jax.train.state import init_params


def _median(xs):
    return float(np.median(xs))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_adm_at.py")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.NAME=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--batch", type=int, default=32, help="images per sampler call")
    p.add_argument("--samplers", default=",".join(EVAL_SAMPLERS))
    p.add_argument("--nfe", default="10,50", help="network evaluations, comma-separated")
    p.add_argument("--es_scale", type=float, default=DEFAULT_ES_SCALE)
    p.add_argument("--iters", type=int, default=3, help="timed calls per (sampler, NFE)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="", help="folder for the JSON result (optional)")
    args = p.parse_args(argv)
    samplers = comma_list(args.samplers, name="samplers")
    bad = sorted(set(samplers) - set(EVAL_SAMPLERS))
    if bad:
        raise BenchError(f"--samplers: unknown {bad}; choose from {list(EVAL_SAMPLERS)}")
    nfes = comma_list(args.nfe, int, "nfe")
    if any(n < 1 for n in nfes) or args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise BenchError("--nfe values, --batch and --iters must be >= 1, --warmup >= 0")

    config = load_config(args.config, args.set)
    if config.get("cm", {}).get("kind", "none") != "none":
        raise BenchError("--config: a consistency-model config; this benchmark times the DPM "
                         "samplers (cm.kind must be 'none')")
    exp = build_experiment(config)
    params = perturb_zero_params(init_params(exp, jax.random.key(0)), jax.random.key(1))
    b = args.batch
    x_T = jax.random.normal(jax.random.key(2), (b, *exp.image_shape), jnp.float32)
    y = jnp.zeros((b,), jnp.int32) if exp.class_cond else None
    rng = jax.random.key(3)

    # The bare network forward at the same batch (the unit of work of every sampler step).
    t_mid = jnp.full((b,), exp.diffusion.num_timesteps // 2, jnp.int32)
    fwd = jax.jit(lambda prm, x: exp.model.apply({"params": prm}, x, t_mid, y=y, train=False))
    fwd_c, fwd_compile = compile_timed(fwd, params, x_T)
    fwd_s = _median(time_calls(lambda: fwd_c(params, x_T), max(args.iters, 3), args.warmup))

    # The inputs on one device, and split over all of this process's devices when there are more.
    variants = {1: (params, x_T, y)}
    shardings = batch_shardings(b)
    if shardings is not None:
        n = len(shardings[0].mesh.devices.flat)
        variants[n] = (jax.device_put(params, shardings[1]),
                       *jax.device_put((x_T, y), shardings[0]))
    info = machine_info()
    rows = []
    for sampler in samplers:
        for nfe in nfes:
            fn = sampler_fn(exp.model, exp.diffusion, sampler="iddpm" if sampler == "es" else sampler,
                            steps=nfe, eps_scale=args.es_scale if sampler == "es" else 1.0)
            first = None
            for devices, (prm, x, yy) in variants.items():
                compiled, compile_s = compile_timed(fn, prm, x, rng, yy)
                times = time_calls(lambda c=compiled, a=(prm, x, rng, yy): c(*a), args.iters,
                                   args.warmup)
                x0 = np.asarray(compiled(prm, x, rng, yy))
                if not np.all(np.isfinite(x0)) or float(np.std(x0)) == 0.0:
                    raise RuntimeError(f"{sampler} NFE {nfe}: trivial output (non-finite or "
                                       "constant)")
                s = _median(times)
                row = {"sampler": sampler, "nfe": nfe, "batch": b, "devices": devices,
                       "compile_s": compile_s, "s_per_batch": s, "images_per_s": b / s,
                       "s_per_nfe": s / nfe, "loop_overhead": s / nfe / fwd_s, "times": times,
                       "output_std": float(np.std(x0))}
                if first is None:
                    first = (s, x0)
                else:
                    row["x_one_device"] = s / first[0]
                    row["max_abs_diff_one_device"] = float(np.max(np.abs(x0 - first[1])))
                    if row["max_abs_diff_one_device"] > 1e-2:   # an error is O(1)
                        raise RuntimeError(f"{sampler} NFE {nfe}: {devices} devices differ from "
                                           f"one by {row['max_abs_diff_one_device']:.2e}")
                rows.append(row)

    print(f"\n{machine_line(info)}\n{args.config}  batch {b}  (random-init network; one forward "
          f"at this batch: {fwd_s * 1e3:.1f} ms, compile {fwd_compile:.1f} s)\n")
    print(f"{'sampler':10s} {'NFE':>4s} {'devices':>7s} {'compile s':>9s} {'s/batch':>8s} "
          f"{'images/s':>9s} {'ms/NFE':>7s} {'loop overhead':>13s} {'x 1 device':>10s}")
    for r in rows:
        ratio = f"{r['x_one_device']:10.2f}" if "x_one_device" in r else f"{'':10s}"
        print(f"{r['sampler']:10s} {r['nfe']:4d} {r['devices']:7d} {r['compile_s']:9.1f} "
              f"{r['s_per_batch']:8.3f} {r['images_per_s']:9.2f} {r['s_per_nfe'] * 1e3:7.1f} "
              f"{r['loop_overhead']:13.2f} {ratio}")
    result = {**info, "config": args.config, "overrides": list(args.set), "batch": b,
              "es_scale": args.es_scale, "forward_s": fwd_s, "forward_compile_s": fwd_compile,
              "rows": rows}
    if args.out:
        write_json(args.out, f"samplers_{pathlib.Path(args.config).stem}_b{b}_"
                   f"{jax.default_backend()}", result)
    return result


if __name__ == "__main__":
    run_main(main)
