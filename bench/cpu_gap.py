"""Where the CPU time of a UNet train step goes, JAX against PyTorch eager, and what XLA options,
layouts, precisions and conv formulations change it. Findings: ``bench/README.md``.

Parts (``--parts``, all by default), each timed with interleaved repeats (A, B, C, A, B, C, ...)
and reported as medians, so a busy spell of a shared machine hits every variant alike:

* ``net``: forward + backward (value and gradient of mean(out^2) with respect to the params and
  the input, as an AT step needs) of the config's UNet at ``--batch``: JAX (float32; bfloat16
  compute; float32 traced under ``jax_default_matmul_precision=bfloat16``) against the same
  network in PyTorch eager (``bench/torch_unet.py``, same weights: the outputs are compared
  first), NCHW and channels_last, ``torch.set_num_threads(--torch_threads)`` (and 1).
  ``--net_only=jax|torch`` times one framework alone, to check that the two do not slow each
  other down in one process (thread pools spinning after their work).
* ``profile``: one forward+backward of each, profiled (``jax.profiler`` trace events classified
  by their optimized-HLO instruction; ``torch.profiler`` self time by operator), summed by kind
  of op: where each framework spends its time.
* ``convs``: every distinct convolution of the network (shapes and counts taken from its
  jaxpr): JAX forward / input gradient / weight gradient against PyTorch's, JAX with NCHW
  operands, JAX bf16 operands with float32 accumulation (``preferred_element_type``), and three
  re-formulations of the weight gradient a ``custom_vjp`` conv could use (patches @ grad,
  im2col by slicing + one GEMM, nine shifted GEMMs), each checked against XLA's weight gradient
  to float32 tolerance before it is timed. Totals are weighted by how often each conv occurs.
* ``gn``: GroupNorm + SiLU forward + backward at the network's widest activation, JAX (flax,
  two-pass variance as the UNet uses, and single-pass) against PyTorch.
* ``flags``: the network's forward + backward under XLA CPU flag sets (one subprocess per flag
  set and round, since XLA reads its flags once; later rounds reuse the compiled program from a
  persistent cache keyed on the flags), with what the optimized HLO sends to which library.
* ``step``: the config's whole train step (its adversary, e.g. fast AT with K=3) under
  ``--step_flagsets`` (subprocess rounds as for ``flags``): the before/after on the real step.
  A ``+flax_gn`` suffix puts flax's ``nn.GroupNorm`` back into the UNet (the GroupNorm it had
  before ``unet.GroupNorm``: the same function and params): the before/after of the one change
  found to help; ``net`` times both too and prints how far apart their losses and gradients are.

    python bench/cpu_gap.py --config=configs/mnist_adm_at.py --batch=32 --out=bench/results
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import flax.linen as nn
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
    median,
    perturb_zero_params,
    spread,
    time_interleaved,
    run_main,
    write_json,
)
from jax import lax

from atdiff_jax.models import unet as unet_lib
from atdiff_jax.train.build import build_experiment, build_model
from atdiff_jax.train.state import init_params
from atdiff_jax.train.step import standalone_train_step

HERE = pathlib.Path(__file__).resolve()
PARTS = ("net", "profile", "convs", "gn", "flags", "step")
YNN_NO_CONV = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
FLAGSETS = {
    "default": "",
    # YNNPACK takes convolutions, reductions and dots by default; without it convolutions go to
    # XLA's convolution thunk (XNNPACK or Eigen) or, with use_onednn, to oneDNN.
    "ynn_no_conv": YNN_NO_CONV,
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce,"
               "-individual_dot",
    "ynn_no_conv_no_xnnpack": YNN_NO_CONV + " --xla_cpu_use_xnnpack=false",
    "ynn_no_conv_onednn": YNN_NO_CONV + " --xla_cpu_use_onednn=true",
    "ynn_plus_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "vector_512": "--xla_cpu_prefer_vector_width=512",
}
DN = ("NHWC", "HWIO", "NHWC")


def _unet(args, dtype: str | None = None):
    """(flax model, params with non-zero output layers, x [B,H,W,C], t [B]) of the config."""
    config = load_config(args.config, args.set)
    if dtype:
        config.model.dtype = dtype
    exp = build_experiment(config)
    if exp.class_cond:
        raise BenchError("--config: the comparison covers unconditional networks only")
    params = perturb_zero_params(init_params(exp, jax.random.key(0)), jax.random.key(1))
    b = args.batch
    x = jax.random.normal(jax.random.key(2), (b, *exp.image_shape), jnp.float32)
    t = jnp.linspace(0, exp.diffusion.num_timesteps - 1, b).astype(jnp.int32)
    return exp.model, params, x, t


def _net_grad(model):
    def loss(params, x, t):
        return jnp.mean(jnp.square(model.apply({"params": params}, x, t)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


# ------------------------------------------- variant: the UNet's GroupNorm before (flax's)


def _flax_group_norm(x, name: str, groups: int = unet_lib.NUM_GROUPS, scale=None, shift=None):
    """The UNet's GroupNorm (+FiLM) until session 4: flax's two-pass ``nn.GroupNorm`` in float32,
    cast back, then ``* (1 + scale) + shift``. Same params and function as ``unet.GroupNorm``."""
    y = nn.GroupNorm(num_groups=groups, epsilon=unet_lib.GROUPNORM_EPS, dtype=jnp.float32,
                     param_dtype=jnp.float32, use_fast_variance=False, name=name)(
                         x.astype(jnp.float32)).astype(x.dtype)
    return y if scale is None else y * (1 + scale) + shift


@contextlib.contextmanager
def flax_group_norm(enabled: bool = True):
    """Within the block, UNets traced use flax's GroupNorm (the "before" of bench/README.md)."""
    saved = unet_lib._group_norm
    if enabled:
        unet_lib._group_norm = _flax_group_norm
    try:
        yield
    finally:
        unet_lib._group_norm = saved


def _tree_rel(a, b) -> float:
    num = sum(float(jnp.sum(jnp.square(u - v))) for u, v in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))
    den = sum(float(jnp.sum(jnp.square(u))) for u in jax.tree.leaves(a))
    return (num / den) ** 0.5


# ------------------------------------------------------------------------------------ net


BEFORE_ROW = "jax f32 fwd+bwd, flax GroupNorm (before)"


def part_net(args) -> dict:
    import torch
    from torch_unet import from_flax
    torch.set_num_threads(args.torch_threads)
    model, params, x, t = _unet(args)
    grad = _net_grad(model)
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    c_grad, compile_grad = compile_timed(grad, params, x, t)
    c_fwd, _ = compile_timed(fwd, params, x, t)
    bf16_model = build_model(load_config(args.config, [*args.set, "model.dtype=bfloat16"]))
    c_bf16, _ = compile_timed(_net_grad(bf16_model), params, x, t)
    with jax.default_matmul_precision("bfloat16"):
        c_prec, _ = compile_timed(grad, params, x, t)
    with flax_group_norm():  # the UNet looks _group_norm up when it is traced
        c_before, _ = compile_timed(_net_grad(model), params, x, t)

    net = from_flax(model, jax.device_get(params))
    xt = torch.from_numpy(np.array(jnp.transpose(x, (0, 3, 1, 2))))
    tt = torch.from_numpy(np.array(t))
    with torch.no_grad():
        out_t = net(xt, tt).permute(0, 2, 3, 1).numpy()
    out_j = np.asarray(c_fwd(params, x, t))
    out_diff = float(np.max(np.abs(out_t - out_j)))
    if not out_diff <= 1e-4 * max(1.0, float(np.max(np.abs(out_j)))):
        raise RuntimeError(f"the PyTorch twin disagrees with the JAX network: {out_diff:.2e}")
    net_cl = from_flax(model, jax.device_get(params)).to(memory_format=torch.channels_last)
    xt_cl = xt.contiguous(memory_format=torch.channels_last)

    def torch_grad(n, xin, threads):
        def call():
            torch.set_num_threads(threads)
            n.zero_grad(set_to_none=True)
            xg = xin.detach().requires_grad_(True)
            loss = torch.mean(torch.square(n(xg, tt)))
            loss.backward()
            return loss
        return call

    def torch_fwd(threads):
        def call():
            torch.set_num_threads(threads)
            with torch.no_grad():
                return net(xt, tt)
        return call

    # How far the reduced-precision variants move the loss and the input gradient.
    (l32, (gp32, gx32)) = c_grad(params, x, t)
    deviation = {}
    for name, c in (("jax bf16-compute fwd+bwd", c_bf16),
                    ("jax precision=bfloat16 fwd+bwd", c_prec),
                    (BEFORE_ROW, c_before)):
        loss, (gp, gx) = c(params, x, t)
        deviation[name] = {"loss_rel": float(abs(loss - l32) / abs(l32)),
                           "input_grad_rel": float(jnp.linalg.norm(gx - gx32)
                                                   / jnp.linalg.norm(gx32)),
                           "param_grad_rel": _tree_rel(gp32, gp)}
    th = args.torch_threads
    cases = {
        "jax f32 fwd+bwd": lambda: c_grad(params, x, t),
        "jax bf16-compute fwd+bwd": lambda: c_bf16(params, x, t),
        "jax precision=bfloat16 fwd+bwd": lambda: c_prec(params, x, t),
        BEFORE_ROW: lambda: c_before(params, x, t),
        f"torch NCHW fwd+bwd ({th} thr)": torch_grad(net, xt, th),
        f"torch channels_last fwd+bwd ({th} thr)": torch_grad(net_cl, xt_cl, th),
    }
    if th != 1:
        cases["torch NCHW fwd+bwd (1 thr)"] = torch_grad(net, xt, 1)
    cases["jax f32 fwd"] = lambda: c_fwd(params, x, t)
    cases[f"torch NCHW fwd ({th} thr)"] = torch_fwd(th)
    if args.net_only != "both":  # one framework alone: is there in-process interference?
        cases = {k: v for k, v in cases.items() if k.startswith(args.net_only)}
    times = time_interleaved(cases, args.rounds)
    return {"compile_s": compile_grad, "torch_vs_jax_output_max_abs_diff": out_diff,
            "deviation_from_f32": deviation,
            "torch_threads": args.torch_threads,
            "rows": {k: {"s": median(v), "spread": spread(v), "times": v}
                     for k, v in times.items()}}


def print_net(res: dict) -> None:
    rows = res["rows"]
    th = res["torch_threads"]
    nan = {"s": float("nan")}
    ref = rows.get("jax f32 fwd+bwd", nan)["s"]
    tref = rows.get(f"torch NCHW fwd+bwd ({th} thr)", nan)["s"]
    print("\n== net: forward+backward of the UNet (the PyTorch twin's output agrees to "
          f"{res['torch_vs_jax_output_max_abs_diff']:.1e}); x torch: against torch NCHW, "
          f"{th} threads")
    print(f"{'':40s} {'ms':>8s} {'x jax f32':>9s} {'x torch':>8s} {'spread':>7s}")
    for k, r in rows.items():
        base_t = tref if "bwd" in k else rows.get(f"torch NCHW fwd ({th} thr)", nan)["s"]
        base_j = ref if "bwd" in k else rows.get("jax f32 fwd", nan)["s"]
        dev = res["deviation_from_f32"].get(k)
        print(f"{k:40s} {r['s'] * 1e3:8.1f} {r['s'] / base_j:9.2f} {r['s'] / base_t:8.2f} "
              f"{r['spread']:7.0%}" + (f"  (vs f32: loss {dev['loss_rel']:.1e}, input grad "
                                       f"{dev['input_grad_rel']:.1e}, params grad "
                                       f"{dev['param_grad_rel']:.1e} relative)" if dev else ""))
    j = rows.get("jax f32 fwd+bwd", {}).get("times")
    a = rows.get(BEFORE_ROW, {}).get("times")
    if j and a:
        r = np.asarray(j) / np.asarray(a)
        print(f"the UNet's GroupNorm / flax's (before), round by round: median {np.median(r):.3f}"
              f", faster in {int(np.sum(r < 1))} of {len(r)} rounds")


# ---------------------------------------------------------------------------------- convs


def conv_shapes(model, params, x, t) -> list[dict]:
    """Distinct forward convolutions of the network with their counts (from its jaxpr)."""
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t))(params)
    found: collections.Counter = collections.Counter()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                found[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                       tuple(p["window_strides"]), tuple(map(tuple, p["padding"])),
                       p["feature_group_count"], tuple(p["lhs_dilation"]),
                       tuple(p["rhs_dilation"]))] += 1
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jaxpr.jaxpr)
    out = []
    for (lhs, rhs, strides, pad, groups, ld, rd), n in found.items():
        if groups != 1 or set(ld) != {1} or set(rd) != {1}:
            continue
        out.append({"x": lhs, "w": rhs, "stride": strides, "padding": pad, "count": n})
    return sorted(out, key=lambda s: -np.prod(s["x"]) * np.prod(s["w"]))


def _conv(x, w, stride, padding, dn=DN, **kw):
    return lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=dn, **kw)


def wgrad_patches(x, gy, k, padding):
    """Weight gradient as patches(x) @ grad: one matmul over B*H*W."""
    p = lax.conv_general_dilated_patches(x, (k, k), (1, 1), padding, dimension_numbers=DN)
    c = x.shape[-1]  # patches' features are ordered (c, kh, kw)
    return jnp.einsum("bhwf,bhwo->fo", p, gy).reshape(c, k, k, -1).transpose(1, 2, 0, 3)


def _shifted(x, k, padding):
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    h, w = x.shape[1], x.shape[2]
    return [xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)]


def wgrad_im2col(x, gy, k, padding):
    """Weight gradient as one GEMM of an im2col matrix built by slicing + concatenation."""
    cols = jnp.concatenate(_shifted(x, k, padding), axis=-1).reshape(-1, k * k * x.shape[-1])
    return (cols.T @ gy.reshape(-1, gy.shape[-1])).reshape(k, k, x.shape[-1], -1)


def wgrad_taps(x, gy, k, padding):
    """Weight gradient as k*k shifted GEMMs (one per kernel tap)."""
    taps = [jnp.einsum("bhwc,bhwo->co", s, gy) for s in _shifted(x, k, padding)]
    return jnp.stack(taps).reshape(k, k, x.shape[-1], -1)


WGRAD_ALTS = {"wgrad patches@g": wgrad_patches, "wgrad im2col GEMM": wgrad_im2col,
              "wgrad 9 shifted GEMMs": wgrad_taps}


def _conv_cases(s: dict, rng, torch, F) -> tuple[dict, dict, tuple]:
    """The timed calls of one conv shape ``s``, the weight-gradient re-formulations' relative
    errors, and the output shape."""
    k, stride, pad = s["w"][0], s["stride"], s["padding"]
    x = jnp.asarray(rng.normal(size=s["x"]), jnp.float32)
    w = jnp.asarray(rng.normal(size=s["w"]) * 0.1, jnp.float32)
    y = _conv(x, w, stride, pad)
    gy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    fwd = jax.jit(lambda x, w: _conv(x, w, stride, pad))
    dgrad = jax.jit(lambda w, gy: jax.vjp(lambda xx: _conv(xx, w, stride, pad), x)[1](gy)[0])
    wgrad = jax.jit(lambda x, gy: jax.vjp(lambda ww: _conv(x, ww, stride, pad), w)[1](gy)[0])
    x_nchw, w_oihw = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    nchw = jax.jit(lambda x, w: _conv(x, w, stride, pad, ("NCHW", "OIHW", "NCHW")))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    bf16 = jax.jit(lambda x, w: _conv(x, w, stride, pad, preferred_element_type=jnp.float32))
    cases = {"jax fwd": lambda: fwd(x, w), "jax dgrad": lambda: dgrad(w, gy),
             "jax wgrad": lambda: wgrad(x, gy), "jax fwd NCHW": lambda: nchw(x_nchw, w_oihw),
             "jax fwd bf16->f32": lambda: bf16(xb, wb)}
    errors = {}
    ref = np.asarray(wgrad(x, gy))
    if stride == (1, 1) and pad == ((k // 2, k // 2),) * 2:
        for name, fn in WGRAD_ALTS.items():
            f = jax.jit(lambda x, gy, fn=fn: fn(x, gy, k, pad))
            errors[name] = float(np.max(np.abs(np.asarray(f(x, gy)) - ref)) / np.max(np.abs(ref)))
            if not errors[name] <= 1e-5:
                raise RuntimeError(f"{name} is not the weight gradient: {errors[name]:.1e}")
            cases[name] = lambda f=f: f(x, gy)
    if all(a == b for a, b in pad):  # torch pads symmetrically
        xt = torch.from_numpy(np.array(x_nchw))
        wt = torch.from_numpy(np.array(w_oihw))
        gt = torch.from_numpy(np.array(jnp.transpose(gy, (0, 3, 1, 2))))
        tp = [a for a, _ in pad]

        def tback(mask):
            return torch.ops.aten.convolution_backward(
                gt, xt, wt, None, list(stride), tp, [1, 1], False, [0, 0], 1, mask)
        cases["torch fwd"] = lambda: F.conv2d(xt, wt, None, stride, tp)
        cases["torch dgrad"] = lambda: tback([True, False, False])
        cases["torch wgrad"] = lambda: tback([False, True, False])
    return cases, errors, y.shape


def part_convs(args) -> dict:
    import torch
    from torch.nn import functional as F
    torch.set_num_threads(args.torch_threads)
    model, params, x0, t0 = _unet(args)
    rng = np.random.default_rng(0)
    rows = []
    for s in conv_shapes(model, params, x0, t0):
        cases, errors, y_shape = _conv_cases(s, rng, torch, F)
        times = time_interleaved(cases, args.rounds)
        rows.append({**{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
                     "flops": 2 * int(np.prod(y_shape)) * int(np.prod(s["w"][:3])),
                     "ms": {n: median(v) * 1e3 for n, v in times.items()},
                     "wgrad_alt_rel_err": errors})
    totals: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        for n, ms in r["ms"].items():
            totals[n] += r["count"] * ms
    return {"rows": rows, "totals_ms": dict(totals), "torch_threads": args.torch_threads}


def print_convs(res: dict) -> None:
    cols = ["jax fwd", "torch fwd", "jax dgrad", "torch dgrad", "jax wgrad", "torch wgrad",
            "jax fwd NCHW", "jax fwd bf16->f32", *WGRAD_ALTS]
    short = {c: c.replace("jax ", "j ").replace("torch ", "t ").replace("wgrad ", "wg ")
             for c in cols}
    print(f"\n== convs: ms per call (torch threads {res['torch_threads']}); x = count in one "
          "forward (each also has a dgrad and a wgrad in the backward)")
    print(f"{'x [B,H,W,C] -> w [kh,kw,i,o] /s':34s} {'n':>2s} "
          + " ".join(f"{short[c][:11]:>11s}" for c in cols))

    def cell(ms):
        return f"{ms:11.2f}" if ms is not None else f"{'-':>11s}"

    for r in res["rows"]:
        desc = f"{r['x']}->{r['w'][:2]}{r['w'][2:]} /{r['stride'][0]}"
        print(f"{desc[:34]:34s} {r['count']:2d} " + " ".join(cell(r["ms"].get(c)) for c in cols))
    tot = res["totals_ms"]
    print(f"{'weighted total':34s} {'':2s} " + " ".join(cell(tot.get(c)) for c in cols))


# -------------------------------------------------------------------------------- profile

JAX_CATEGORIES = ("conv forward", "conv backward (input grad)", "conv backward (weight grad)",
                  "matmul", "reductions (norm statistics, sums)", "transposes/copies",
                  "elementwise (norm, SiLU, adds, casts)")


def _is_weight_grad(conv_line: str) -> bool:
    """A weight-gradient convolution slides an H x W window (the activation) to produce a
    kernel-sized output: its window is larger than its output's spatial size."""
    shape = re.search(r"= \w+\[([\d,]*)\]", conv_line)
    window = re.search(r"size=(\d+)x(\d+)", conv_line)
    labels = re.search(r"dim_labels=\w+_\w+->(\w+)", conv_line)
    if not (shape and window and labels):
        return False
    dims = [int(d) for d in shape.group(1).split(",") if d]
    out = labels.group(1)
    if len(dims) != len(out) or "0" not in out:
        return False
    return int(window.group(1)) > dims[out.index("0")]


def _hlo_computations(text: str) -> dict[str, list[str]]:
    """The body lines of every computation of an HLO module's text, by computation name."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(line)
    return comps


def _hlo_ops(text: str) -> dict[str, str]:
    """Category (``JAX_CATEGORIES``) of every instruction of the optimized HLO, by name."""
    comps = _hlo_computations(text)

    def body(name, seen):
        out = []
        for line in comps.get(name, []):
            out.append(line)
            for sub in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
                if sub not in seen:
                    seen.add(sub)
                    out += body(sub, seen)
        return out

    cats = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
            if not m:
                continue
            calls = re.findall(r"calls=%([\w.\-]+)", line)
            inner = body(calls[0], set()) if calls else [line]
            ops = [re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ ([\w\-]+)\(", x) for x in inner]
            ops = {o.group(1) for o in ops if o} - {"parameter", "constant", "bitcast"}
            conv = next((x for x in inner if " convolution(" in x), None)
            if conv is not None:
                if _is_weight_grad(conv) or "rhs_dilate" in conv:
                    cats[m.group(1)] = JAX_CATEGORIES[2]
                elif "transpose(" in conv or "transpose(" in line:
                    cats[m.group(1)] = JAX_CATEGORIES[1]
                else:
                    cats[m.group(1)] = JAX_CATEGORIES[0]
            elif "dot" in ops:
                cats[m.group(1)] = JAX_CATEGORIES[3]
            elif "reduce" in ops:
                cats[m.group(1)] = JAX_CATEGORIES[4]
            elif ops and ops <= {"transpose", "copy", "reshape"}:
                cats[m.group(1)] = JAX_CATEGORIES[5]
            else:
                cats[m.group(1)] = JAX_CATEGORIES[6]
    return cats


def _torch_category(name: str) -> str:
    n = name.lower()
    if "convolution_backward" in n:
        return "conv backward (input + weight grad)"
    if "conv" in n:
        return "conv forward"
    if "group_norm" in n:
        return "group norm (forward + backward)"
    if re.search(r"(^|::)(b?mm|addmm|baddbmm|matmul|linear|einsum)", n):
        return "matmul"
    if any(k in n for k in ("copy", "clone", "contiguous", "cat", "permute", "transpose",
                            "upsample", "pool")):
        return "copies, concat, resampling"
    return "elementwise and other"


def part_profile(args) -> dict:
    """Where the time of one forward+backward goes: JAX (trace events of the compiled program,
    classified by their HLO) and PyTorch (its profiler's self time by operator)."""
    import glob
    import gzip

    import torch
    from torch_unet import from_flax
    torch.set_num_threads(args.torch_threads)
    model, params, x, t = _unet(args)
    compiled, _ = compile_timed(_net_grad(model), params, x, t)
    cats = _hlo_ops(compiled.as_text())
    iters = max(args.rounds, 3)
    jax.block_until_ready(compiled(params, x, t))
    with tempfile.TemporaryDirectory(prefix="atdiff_trace_") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(iters):
                jax.block_until_ready(compiled(params, x, t))
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(files[0]) as f:
            events = json.load(f)["traceEvents"]
    jax_ms: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in cats:
            jax_ms[cats[e["name"]]] += e["dur"] / 1e3 / iters

    net = from_flax(model, jax.device_get(params))
    xt = torch.from_numpy(np.array(jnp.transpose(x, (0, 3, 1, 2))))
    tt = torch.from_numpy(np.array(t))

    def step():
        net.zero_grad(set_to_none=True)
        xg = xt.detach().requires_grad_(True)
        torch.mean(torch.square(net(xg, tt))).backward()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
    torch_ms: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        torch_ms[_torch_category(ev.key)] += ev.self_cpu_time_total / 1e3 / iters
    return {"iters": iters, "torch_threads": args.torch_threads, "jax_ms": dict(jax_ms),
            "torch_ms": dict(torch_ms)}


def print_profile(res: dict) -> None:
    print(f"\n== profile: ms per forward+backward by kind of op (mean of {res['iters']}; "
          f"torch threads {res['torch_threads']}; profiler overhead included)")
    for name, ms in (("JAX (XLA ops, by HLO)", res["jax_ms"]),
                     ("PyTorch (operator self time)", res["torch_ms"])):
        total = sum(ms.values())
        print(f"{name}: {total:.1f} ms")
        for k, v in sorted(ms.items(), key=lambda kv: -kv[1]):
            print(f"    {k:40s} {v:8.1f}  {v / total:5.1%}")


# ------------------------------------------------------------------------------------- gn


def part_gn(args) -> dict:
    import flax.linen as nn
    import torch
    torch.set_num_threads(args.torch_threads)
    config = load_config(args.config, args.set)
    groups = config.model.get("norm_groups", 32)
    b, s, c = args.batch, config.model.image_size, config.model.num_channels
    x = jax.random.normal(jax.random.key(0), (b, s, s, c)) * 2 + 0.5
    gn = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)
    p = gn.init(jax.random.key(1), x)
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(nn.silu(gn.apply(p, x)) * x), argnums=(0, 1)))
    xt = torch.from_numpy(np.array(jnp.transpose(x, (0, 3, 1, 2)))).requires_grad_(True)
    tg = torch.nn.GroupNorm(groups, c)

    def tcall():
        xt.grad = None
        tg.zero_grad()
        out = (torch.nn.functional.silu(tg(xt)) * xt).sum()
        out.backward()
        return out

    fast = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=True)
    g_fast = jax.jit(jax.grad(lambda p, x: jnp.sum(nn.silu(fast.apply(p, x)) * x),
                              argnums=(0, 1)))
    mine = unet_lib.GroupNorm(groups)
    g_mine = jax.jit(jax.grad(lambda p, x: jnp.sum(nn.silu(mine.apply(p, x)) * x),
                              argnums=(0, 1)))
    times = time_interleaved({"jax": lambda: g(p, x), "jax fast_variance": lambda: g_fast(p, x),
                              "jax unet.GroupNorm": lambda: g_mine(p, x), "torch": tcall},
                             args.rounds * 3)
    return {"shape": [b, s, s, c], "groups": groups,
            "ms": {k: median(v) * 1e3 for k, v in times.items()}}


# -------------------------------------------------------------------------- flags and step


def hlo_summary(text: str) -> dict:
    """Where the optimized HLO sends its convolutions: library fusions (by kind) or XLA's own
    convolution thunk ("bare"), and how many library fusions of each kind there are."""
    comps = _hlo_computations(text)
    convs_in: collections.Counter = collections.Counter()
    fusions: collections.Counter = collections.Counter()
    for line in text.splitlines():
        m = re.search(r"calls=%([\w.\-]+).*\"kind\":\"(__\w+?)\"", line)
        if m:
            fusions[m.group(2)] += 1
            convs_in[m.group(2)] += sum(" convolution(" in b for b in comps.get(m.group(1), []))
    total = text.count(" convolution(")
    return {"library_fusions": dict(fusions), "convolutions": total,
            "convolutions_in_library_fusions": dict(convs_in),
            "bare_convolutions": total - sum(convs_in.values()), "dots": text.count(" dot(")}


def flags_worker(args) -> dict:
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    with flax_group_norm(args.flax_gn):  # traced inside, so the swap takes effect
        return _flags_worker(args)


def _flags_worker(args) -> dict:
    if args.what == "net":
        model, params, x, t = _unet(args)
        compiled, compile_s = compile_timed(_net_grad(model), params, x, t)

        def call():
            return compiled(params, x, t)
    else:
        config = load_config(args.config, args.set)
        config.train.global_batch_size = args.batch
        step, state, batch = standalone_train_step(config)
        compiled, compile_s = compile_timed(step, state, batch)
        holder = {"state": state}

        def call():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

    times = time_interleaved({"x": call}, args.iters)["x"]
    return {"compile_s": compile_s, "times": times, "hlo": hlo_summary(compiled.as_text())}


BEFORE = "+flax_gn"  # a variant name suffix: the flag set with flax's GroupNorm (before)


def run_flagsets(args, names: list[str], what: str, cache_dir: str) -> dict:
    """``names``: flag sets (``FLAGSETS``), each optionally suffixed with ``+flax_gn``."""
    res: dict[str, dict] = {n: {"times": [], "compile_s": None, "hlo": None} for n in names}
    base_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()]
    for rnd in range(args.flag_rounds):
        for name in names:
            flagset = name.removesuffix(BEFORE)
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
                       XLA_FLAGS=" ".join(base_flags + FLAGSETS[flagset].split()))
            cmd = [sys.executable, str(HERE), "--flags_worker", f"--what={what}",
                   f"--config={args.config}", f"--batch={args.batch}",
                   f"--iters={args.flag_iters}", f"--cache_dir={cache_dir}",
                   *[f"--set={s}" for s in args.set],
                   *(["--flax_gn"] if name.endswith(BEFORE) else [])]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                                  timeout=args.timeout)
            if proc.returncode:
                res[name]["error"] = "\n".join((proc.stdout + proc.stderr).splitlines()[-5:])
                print(f"  flag set {name}: failed\n{res[name]['error']}", file=sys.stderr)
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            res[name]["times"] += out["times"]
            if rnd == 0:
                res[name]["compile_s"], res[name]["hlo"] = out["compile_s"], out["hlo"]
    for name, r in res.items():
        r["flags"] = FLAGSETS[name.removesuffix(BEFORE)]
        r["flax_group_norm"] = name.endswith(BEFORE)
        r["s"] = median(r["times"]) if r["times"] else None
        r["spread"] = spread(r["times"]) if r["times"] else None
    return res


def print_flags(res: dict, title: str) -> None:
    ref = res.get("default", {}).get("s")
    print(f"\n== {title}")
    print(f"{'flag set':26s} {'ms':>8s} {'x default':>9s} {'spread':>7s} {'compile s':>9s}  "
          "HLO: library fusions / their convolutions / other convolutions")
    for name, r in res.items():
        if r["s"] is None:
            print(f"{name:26s} failed")
            continue
        h = r["hlo"]
        print(f"{name:26s} {r['s'] * 1e3:8.1f} {r['s'] / ref if ref else float('nan'):9.2f} "
              f"{r['spread']:7.0%} {r['compile_s']:9.1f}  {h['library_fusions']} / "
              f"{h['convolutions_in_library_fusions']} / {h['bare_convolutions']}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_adm_at.py")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.NAME=VALUE")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--parts", default="net,convs,gn,flags,step")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (net, convs, gn)")
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--net_only", default="both", choices=["both", "jax", "torch"],
                   help="net: time one framework alone (checks in-process interference)")
    p.add_argument("--flagsets", default=",".join(FLAGSETS))
    p.add_argument("--step_flagsets", default="default,default+flax_gn",
                   help="flag sets for the whole step; suffix +flax_gn: with flax's GroupNorm "
                   "in the UNet (the before)")
    p.add_argument("--flag_rounds", type=int, default=3, help="subprocess rounds per flag set")
    p.add_argument("--flag_iters", type=int, default=3, help="timed calls per subprocess")
    p.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    p.add_argument("--out", default="", help="folder for the JSON result (optional)")
    p.add_argument("--flags_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", default="net", choices=["net", "step"], help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--flax_gn", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flags_worker:
        out = flags_worker(args)
        print(json.dumps(out))
        return out
    parts = comma_list(args.parts, name="parts")
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise BenchError(f"--parts: unknown {bad}; choose from {list(PARTS)}")
    for opt in ("flagsets", "step_flagsets"):
        unknown = sorted({n.removesuffix(BEFORE) for n in comma_list(getattr(args, opt), name=opt)}
                         - set(FLAGSETS))
        if unknown:
            raise BenchError(f"--{opt}: unknown {unknown}; choose from {list(FLAGSETS)}")
    if min(args.rounds, args.flag_rounds, args.flag_iters, args.batch, args.torch_threads) < 1:
        raise BenchError("--rounds, --flag_rounds, --flag_iters, --batch and --torch_threads "
                         "must be >= 1")
    info = machine_info()
    print(machine_line(info))
    result = {**info, "config": args.config, "overrides": list(args.set), "batch": args.batch}
    if "net" in parts:
        result["net"] = part_net(args)
        print_net(result["net"])
    if "profile" in parts:
        result["profile"] = part_profile(args)
        print_profile(result["profile"])
    if "convs" in parts:
        result["convs"] = part_convs(args)
        print_convs(result["convs"])
    if "gn" in parts:
        result["gn"] = part_gn(args)
        g = result["gn"]
        print(f"\n== GroupNorm({g['groups']}) + SiLU fwd+bwd at {g['shape']}: jax "
              f"{g['ms']['jax']:.2f} ms (single-pass variance: "
              f"{g['ms']['jax fast_variance']:.2f}; unet.GroupNorm: {g['ms']['jax unet.GroupNorm']:.2f}), "
              f"torch {g['ms']['torch']:.2f} ms "
              f"(jax/torch x{g['ms']['jax'] / g['ms']['torch']:.2f})")
    with tempfile.TemporaryDirectory(prefix="atdiff_cpu_gap_cache_") as cache:
        if "flags" in parts:
            result["flags"] = run_flagsets(args, comma_list(args.flagsets), "net", cache)
            print_flags(result["flags"], f"flags: UNet forward+backward at batch {args.batch}")
        if "step" in parts:
            result["step"] = run_flagsets(args, comma_list(args.step_flagsets), "step", cache)
            print_flags(result["step"], f"step: the whole train step of {args.config} at batch "
                        f"{args.batch}")
    if args.out:
        write_json(args.out, f"cpu_gap_{pathlib.Path(args.config).stem}_b{args.batch}", result)
    return result


if __name__ == "__main__":
    run_main(main)
