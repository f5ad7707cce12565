"""Helpers shared by the benchmarks in ``bench/``: configs, timing, XLA cost and memory analysis,
a measured matmul peak, the machine description and JSON output.

Every benchmark compiles ahead of time (``jit(...).lower(...).compile()``) so that compile time is
reported apart from run time, times the compiled executable with ``block_until_ready`` and reports
medians. Ratios are only ever formed between numbers measured in the same run.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import platform
import resource
import runpy
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class BenchError(ValueError):
    """Bad benchmark arguments (named in the message)."""


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()):
    """``get_config()`` of a config file, with ``group.name=value`` overrides applied.

    Values are parsed as Python literals (``3``, ``0.1``, ``True``, ``(0.99,)``), except for
    string fields, which take the text as given (``model.channel_mult=1,2``).
    """
    p = pathlib.Path(path)
    if not p.is_file() and (REPO / p).is_file():
        p = REPO / p
    if not p.is_file():
        raise BenchError(f"--config: no config file {path!r}")
    config = runpy.run_path(str(p))["get_config"]()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise BenchError(f"--set expects group.name=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        parts = key.split(".")
        target = config
        for part in parts[:-1]:
            if part not in target:
                raise BenchError(f"--set {item!r}: config has no field {key!r}")
            target = target[part]
        if len(parts) < 2 or parts[-1] not in target:
            raise BenchError(f"--set {item!r}: config has no field {key!r}")
        if isinstance(target[parts[-1]], str):  # string fields take the text as given
            value = raw
        try:
            target[parts[-1]] = value
        except TypeError as e:
            raise BenchError(f"--set {item!r}: {e}") from None
    return config


def comma_list(text: str, kind: Callable = str, name: str = "value") -> list:
    """``"10,50"`` -> ``[10, 50]``; one clear error naming the argument on bad input."""
    try:
        items = [kind(s.strip()) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"--{name}: expected a comma-separated list, got {text!r}") from None
    if not items:
        raise BenchError(f"--{name}: empty list")
    return items


def matmul_peak(n: int = 2048, iters: int = 10) -> float:
    """Measured float32 matmul FLOP/s of this backend (n x n x n, best of ``iters``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """``(compiled executable, seconds)`` of lowering + compiling ``jitted`` for ``args``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_calls(call: Callable[[], Any], iters: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``iters`` calls of ``call`` (each waited for), after ``warmup``."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t)
    return times


def time_interleaved(cases: dict[str, Callable[[], Any]], rounds: int,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every case, measured in ``rounds`` rounds that each call every case
    once (A, B, C, A, B, C, ...), so a slow spell of a shared machine hits all cases alike.
    Report medians."""
    for call in cases.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            t = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t)
    return times


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def spread(xs) -> float:
    """(max - min) / median of repeated timings: how noisy the measurement was."""
    xs = np.asarray(xs, dtype=np.float64)
    return float((xs.max() - xs.min()) / np.median(xs))


def cost_and_memory(compiled) -> dict:
    """XLA's static analysis of a compiled executable.

    ``flops``: XLA's FLOP count of one call (cost analysis; a loop body counts once).
    Memory (XLA buffer assignment, i.e. what the executable allocates, not the process RSS):
    ``argument_bytes``, ``output_bytes``, ``temp_bytes`` (intermediates live at some point),
    ``alias_bytes`` (outputs written into donated inputs) and ``memory_bytes`` =
    arguments + outputs + temporaries - aliased, the executable's peak footprint if everything
    were live at once (an upper bound on its peak). None where the backend does not report it.
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out: dict[str, Any] = {"flops": float((cost or {}).get("flops", float("nan")))}
    try:
        mem = compiled.memory_analysis()
        out.update(argument_bytes=int(mem.argument_size_in_bytes),
                   output_bytes=int(mem.output_size_in_bytes),
                   temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes))
        out["memory_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                               - out["alias_bytes"])
    except Exception:  # noqa: BLE001  (not every backend reports it)
        for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "memory_bytes"):
            out[k] = None
    return out


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on."""
    import jaxlib
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "num_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "machine": platform.machine(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def machine_line(info: dict) -> str:
    return (f"{info['backend']} ({info['device_kind']}, {info['cpu_model']}, "
            f"{info['cpu_count']} cores), {info['num_devices']} device(s), jax {info['jax']}"
            + (f", XLA_FLAGS={info['xla_flags']}" if info["xla_flags"] else ""))


def perturb_zero_params(params, key: jax.Array, scale: float = 0.02):
    """Params with every all-zero leaf (the zero-initialised output layers of a fresh ADM)
    replaced by N(0, scale^2) noise, so a random-init network has a non-trivial output."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    new = [scale * jax.random.normal(k, x.shape, x.dtype) if not np.any(np.asarray(x)) else x
           for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, new)


def write_json(out_dir: str, name: str, result: dict) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"\nwrote {path}")
    return path


def fmt_mib(nbytes) -> str:
    return f"{nbytes / 2 ** 20:.1f}" if nbytes else "n/a"


def run_main(main: Callable[[], Any]) -> None:
    """A benchmark's ``__main__``: bad arguments end in one ``error: ...`` line (exit 1)."""
    try:
        main()
    except BenchError as e:
        sys.exit(f"error: {e}")
