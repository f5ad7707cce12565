"""The report of an experiment: ``<root>/report.md`` (tables in the paper's layout, rows sampler x
arm, columns NFE; paired differences; robustness; cost; the same for the consistency-model arms
when ``spec.cm`` is enabled), ``results.json`` and the fd_mnist-vs-NFE plots. The table, plot
and file helpers are ``atdiff eval``'s (``atdiff_jax.eval.report``); the numbers come from
``stats.py``.
"""
from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from atdiff_jax.eval.report import nfe_axis, nfe_table, pyplot, save_figure, write_json
from atdiff_jax.experiment.stats import (DEFAULT_BOOTSTRAP, comparisons, mean_std,
                                         paired_differences, summarize)
from atdiff_jax.samplers import CM_SAMPLERS, EVAL_SAMPLERS


def cm_spec(spec):
    """``spec.cm`` when the experiment has a consistency-model stage (the section is present and
    not ``enabled=False``), else None (specs written before the stage existed have none)."""
    cm = spec.get("cm")
    return cm if cm is not None and cm.get("enabled", True) else None


def cm_nfes(cm, sampler: str) -> tuple[int, ...]:
    """The NFEs of ``cm.nfes`` a CM sampler is evaluated at: 1 for ``cm_onestep``, the others
    (>= 2) for ``cm_multistep``."""
    nfes = tuple(int(n) for n in cm.nfes)
    return tuple(n for n in nfes if (n == 1) == (sampler == "cm_onestep"))


def _fmt(cell: dict | None, spec: str = ".2f") -> str:
    if cell is None:
        return ""
    if cell["n"] > 1:
        return f"{cell['mean']:{spec}} ± {cell['std']:{spec}}"
    return f"{cell['mean']:{spec}}"


def _fmt_diff(cell: dict | None) -> str:
    """``mean ± std (t lo, hi) {bootstrap lo, hi} [wins/n]`` of a paired difference; the std and
    t interval need two seeds, the bootstrap interval saved features (``boot95``)."""
    if cell is None:
        return ""
    spread = ""
    if cell["n"] > 1:
        lo, hi = cell["ci95"]
        spread = f" ± {cell['std']:.1f} ({lo:+.1f}, {hi:+.1f})"
    if cell.get("boot95"):
        lo, hi = cell["boot95"]
        spread += f" {{{lo:+.1f}, {hi:+.1f}}}"
    return f"{cell['mean']:+.1f}{spread} [{cell['wins']}/{cell['n']}]"


def write_report(spec, root: pathlib.Path, labels: Sequence[str], *, rows: list[dict],
                 robustness: list[dict], extra: dict, bootstrap: dict | None = None
                 ) -> pathlib.Path:
    """``<root>/report.md`` + ``results.json`` + plots of the evaluation cells' ``rows`` and
    ``robustness`` results (``runner.collect_rows``, ``runner.robustness_rows``); ``extra``: the
    gate, timing, wall time and floor of the run, stored in results.json as they are;
    ``bootstrap``: ``stats.bootstrap_differences`` of the comparisons (None: off), merged into
    the paired differences as ``boot95`` (None where a cell has no saved features) and
    ``bootstrap_draws``.

    The consistency-model arms' cells (``spec.cm``; samplers ``CM_SAMPLERS``) get a section of
    their own (:func:`_cm_section`); every other table covers the DPM runs."""
    all_rows, all_robustness = rows, robustness
    rows = [r for r in rows if r["sampler"] in EVAL_SAMPLERS]
    robustness = [r for r in robustness if r.get("model") != "cm"]
    nfes = sorted({r["nfe"] for r in rows})
    samplers = [s for s in EVAL_SAMPLERS if any(r["sampler"] == s for r in rows)]
    present = [lb for lb in labels if any(r["label"] == lb for r in rows)]
    parts = ["# Experiment report", "",
             f"Root `{root}`. Each cell: mean ± std over training seeds (n in the JSON) of the "
             f"mean over {len(spec.eval.seeds)} evaluation seed(s), "
             f"{spec.eval.num_samples} samples each.", ""]
    g = extra.get("gate")
    if g:
        parts += [f"**Start checkpoint** (step {g['step']}, {g['sampler']}-{g['nfe']}, "
                  f"{g['num_samples']} samples): fd_mnist {g['fd_mnist']:.3f} = "
                  f"{g['factor']:.1f} x the real-data floor {g['floor']:.3f}; confidence "
                  f"{g['confidence']:.3f} (gate: <= {g['max_factor']:g} x floor, >= "
                  f"{g['min_confidence']:g}: {'passed' if g['passed'] else 'NOT passed'}).", ""]
    f = extra.get("cell_floor")
    if f:
        parts += [f"**Floor of a cell:** {f['num_samples']} real training images score fd_mnist "
                  f"{f['mean']:.3f} ± {f['std']:.3f} against the same reference ({f['draws']} "
                  f"random draws): what a perfect generator would score in these tables.", ""]
    summaries = {}
    for metric, title in (("fd_mnist", "MNIST feature distance (lower is better)"),
                          ("confidence", "Classifier confidence (higher is better)")):
        summ = summarize(rows, metric)
        summaries[metric] = {"|".join(map(str, k)): v for k, v in summ.items()}
        if not summ:
            continue
        table = [(s, lb, [_fmt(summ.get((lb, s, n))) for n in nfes])
                 for s in samplers for lb in present if any((lb, s, n) in summ for n in nfes)]
        parts += [f"## {title}", "", *nfe_table("sampler", "arm", table, nfes), ""]
    paired, table, no_boot = {}, [], 0
    for a, b in comparisons(spec, present):
        d = paired_differences(rows, "fd_mnist", a, b)
        if bootstrap is not None:
            boot = bootstrap.get((a, b), {})
            for k, v in d.items():
                v["boot95"] = boot[k]["boot95"] if k in boot else None
                v["bootstrap_draws"] = boot[k]["draws"] if k in boot else 0
                no_boot += k not in boot
        paired[f"{a}|{b}"] = {"|".join(map(str, k)): v for k, v in d.items()}
        table += [(f"{a} vs {b}", s, [_fmt_diff(d.get((s, n))) for n in nfes])
                  for s in samplers if any((s, n) in d for n in nfes)]
    if table:
        draws = int(spec.eval.get("bootstrap", DEFAULT_BOOTSTRAP))
        parts += ["## Paired differences in fd_mnist", "",
                  "(arm − reference) / reference in %, per training seed (both saw the same "
                  "minibatches and noise and start from the same x_T), mean ± std over seeds. "
                  "Negative is better.", "",
                  *nfe_table("arm vs reference", "sampler", table, nfes), "",
                  "(lo, hi): the 95% confidence interval of the mean over training seeds "
                  "(Student's t): excluding 0, a difference the seeds resolve. " + (
                      f"{{lo, hi}}: the 95% bootstrap interval over the generated samples "
                      f"(2.5/97.5 percentiles of the mean over seeds in {draws} resamples of "
                      "each cell's samples, the same resample for arm and reference): "
                      "excluding 0, a difference larger than the sampling noise of "
                      f"{spec.eval.num_samples} samples, whatever other seeds would do. "
                      if bootstrap is not None else
                      "{lo, hi} (the bootstrap over the generated samples) is off "
                      "(spec.eval.bootstrap = 0). ") +
                  "[k/n]: the arm is better on k of n seeds.", ""]
        if no_boot:
            parts += [f"No bootstrap interval in {no_boot} cell(s): some of their evaluation "
                      "cells were written before the samples' features were saved "
                      "(`<sampler>_e<k>.features.npz`); delete those cells' JSON to "
                      "re-evaluate them.", ""]
    rob = [r for r in robustness if r["label"] in present]
    if rob:
        parts += ["## Robustness (denoiser attack: attacked eps MSE, mean over seeds)", ""]
        radii = rob[0]["attack"]["radius"]
        ts = rob[0]["attack"]["t"]
        parts.append("| arm | t | " + " | ".join(f"r={r:g}" for r in radii) + " |")
        parts.append("|---|---|" + "---|" * len(radii))
        for lb in present:
            mine = [r for r in rob if r["label"] == lb]
            if not mine:
                continue
            att = np.mean([np.asarray(r["attack"]["eps_attacked"]) for r in mine], axis=0)
            for i, t in enumerate(ts):
                parts.append(f"| {lb} | {t} | " + " | ".join(f"{v:.4f}" for v in att[i]) + " |")
        parts.append("")
        if "sampling" in rob[0]:
            parts += [f"DDIM-{rob[0]['sampling'].get('nfe', 10)} with perturbed intermediate "
                      "states: fd_mnist (mean ± std over training seeds)", "",
                      "| arm | " + " | ".join(f"{r['kind']} {r['size']:g}"
                                              for r in rob[0]["sampling"]["rows"]) + " |",
                      "|---|" + "---|" * len(rob[0]["sampling"]["rows"])]
            for lb in present:
                mine = [r for r in rob if r["label"] == lb and "sampling" in r]
                if mine:
                    vals = np.array([[x["fd_mnist"] for x in r["sampling"]["rows"]]
                                     for r in mine])
                    parts.append(f"| {lb} | " + " | ".join(
                        _fmt(mean_std(list(col)), ".3f") for col in vals.T) + " |")
            parts.append("")
    t = extra.get("timing")
    if t:
        parts += ["## Cost", "", "| arm | s / minibatch (interleaved, one process) | "
                  "minibatches | train wall time (s, as run) |", "|---|---|---|---|"]
        wall = extra.get("wall", {})
        for arm in spec.arm_order:
            n = int(spec.finetune.num_minibatches) * int(spec.arms[arm].get("minibatch_factor", 1))
            ws = [v for k, v in wall.items() if k.startswith(arm + "/")]
            sec = f"{t['arms'][arm]['s_per_minibatch']:.3f}" if arm in t["arms"] else ""
            parts.append(f"| {arm} | {sec} | {n} | " + (f"{np.mean(ws):.0f}" if ws else "") + " |")
        if "wallclock_step" in extra:
            parts += ["", f"Equal wall-clock: `{spec.wallclock.reference}@wallclock` is "
                      f"{spec.wallclock.reference} at minibatch {extra['wallclock_step']} "
                      f"(the nearest checkpoint to {extra['wallclock_target']})."]
        parts.append("")
    plots = _plot(rows, present, samplers, root)
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    cm_results = {}
    if cm_spec(spec) is not None:
        cm_parts, cm_results = _cm_section(spec, root, all_rows, all_robustness,
                                           extra.get("wall", {}))
        parts += ["", *cm_parts]
    (root / "report.md").write_text("\n".join(parts) + "\n")
    write_json(root / "results.json", {"summary": summaries, "paired": paired, "rows": all_rows,
                                       "robustness": all_robustness, "cm": cm_results, **extra})
    return root / "report.md"


def _cm_section(spec, root: pathlib.Path, rows: list[dict], robustness: list[dict],
                wall: dict) -> tuple[list[str], dict]:
    """The consistency-model part of the report: fd_mnist and confidence (rows sampler x CM arm,
    columns NFE, mean ± std over training seeds), the paired differences of every CM arm
    against ``spec.cm.baseline``, the robustness of the students, the cost, and the plot
    ``cm_fd_mnist_vs_nfe.png``; returns the lines and what results.json keeps under "cm"."""
    cm = spec.cm
    rows = [r for r in rows if r["sampler"] in CM_SAMPLERS]
    present = [a for a in cm.arm_order if any(r["label"] == a for r in rows)]
    if not present:
        return [], {}
    nfes = sorted({r["nfe"] for r in rows})
    samplers = [s for s in CM_SAMPLERS if any(r["sampler"] == s for r in rows)]
    parts = ["## Consistency models", "",
             f"Consistency distillation ({cm.num_minibatches} minibatches per arm) from the start "
             "checkpoint as the teacher, the student initialised from its EMA params; "
             "cm_onestep at NFE 1, cm_multistep at the others, the same x_T for every arm and "
             "the same scoring as above.", ""]
    out: dict = {"summary": {}, "paired": {}}
    for metric, title in (("fd_mnist", "MNIST feature distance (lower is better)"),
                          ("confidence", "classifier confidence (higher is better)")):
        summ = summarize(rows, metric)
        out["summary"][metric] = {"|".join(map(str, k)): v for k, v in summ.items()}
        table = [(s, a, [_fmt(summ.get((a, s, n))) for n in nfes])
                 for s in samplers for a in present if any((a, s, n) in summ for n in nfes)]
        if table:
            parts += [f"### CM: {title}", "", *nfe_table("sampler", "CM arm", table, nfes), ""]
    table = []
    for a in present:
        if a == cm.baseline or cm.baseline not in present:
            continue
        d = paired_differences(rows, "fd_mnist", a, cm.baseline)
        out["paired"][f"{a}|{cm.baseline}"] = {"|".join(map(str, k)): v for k, v in d.items()}
        table += [(f"{a} vs {cm.baseline}", s, [_fmt_diff(d.get((s, n))) for n in nfes])
                  for s in samplers if any((s, n) in d for n in nfes)]
    if table:
        parts += ["### CM: paired differences in fd_mnist", "",
                  "(arm − reference) / reference in %, per training seed, as above.", "",
                  *nfe_table("CM arm vs reference", "sampler", table, nfes), ""]
    rob = [r for r in robustness if r.get("model") == "cm" and r["label"] in present]
    if rob:
        parts += _cm_robustness_lines(present, rob)
    parts += ["### CM: cost", "", "| CM arm | minibatches | train wall time (s, as run) |",
              "|---|---|---|"]
    for a in present:
        ws = [v for k, v in wall.items() if k.startswith(a + "/")]
        parts.append(f"| {a} | {cm.num_minibatches} | "
                     + (f"{np.mean(ws):.0f}" if ws else "") + " |")
    parts.append("")
    plot = _cm_plot(rows, present, root)
    if plot:
        parts.append(f"![{plot.stem}]({plot.name})")
    return parts, out


def _cm_robustness_lines(labels: Sequence[str], rob: list[dict]) -> list[str]:
    a0 = rob[0]["attack"]
    radii, ts, sigmas = a0["radius"], a0["t"], a0["sigma"]
    parts = [f"### CM: robustness (consistency-function attack: attacked x_0 MSE, EDM-scale "
             "radius, mean over seeds)", "",
             "| CM arm | t (sigma) | " + " | ".join(f"r={r:g}" for r in radii) + " |",
             "|---|---|" + "---|" * len(radii)]
    for lb in labels:
        mine = [r for r in rob if r["label"] == lb]
        if not mine:
            continue
        att = np.mean([np.asarray(r["attack"]["x0_attacked"]) for r in mine], axis=0)
        for i, (t, sig) in enumerate(zip(ts, sigmas)):
            parts.append(f"| {lb} | {t} ({sig:.3g}) | "
                         + " | ".join(f"{v:.4f}" for v in att[i]) + " |")
    parts.append("")
    if "sampling" in rob[0]:
        cols = [f"{r['sampler']}-{r['nfe']} {r['kind']} {r['size']:g}"
                for r in rob[0]["sampling"]["rows"]]
        parts += ["Consistency sampling with the input of every network evaluation perturbed "
                  "(VP-scale size, as the DPM's DDIM-10 rows): fd_mnist (mean ± std over "
                  "training seeds)", "",
                  "| CM arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for lb in labels:
            mine = [r for r in rob if r["label"] == lb and "sampling" in r]
            if mine:
                vals = np.array([[x["fd_mnist"] for x in r["sampling"]["rows"]] for r in mine])
                parts.append(f"| {lb} | " + " | ".join(
                    _fmt(mean_std(list(col)), ".3f") for col in vals.T) + " |")
        parts.append("")
    return parts


def _cm_plot(rows, labels, root: pathlib.Path) -> pathlib.Path | None:
    """fd_mnist vs NFE, one line per CM arm (NFE 1: cm_onestep, the others: cm_multistep)."""
    summ = summarize(rows, "fd_mnist")
    if not summ:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lb in labels:
        pts = sorted((n, c["mean"], c["std"]) for (la, _, n), c in summ.items() if la == lb)
        if pts:
            n, m, sd = map(np.asarray, zip(*pts))
            ax.errorbar(n, m, yerr=sd, marker="o", capsize=2, label=lb)
    ax.set_title("consistency models (NFE 1: one-step, else multistep)")
    nfe_axis(ax, "fd_mnist")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = root / "cm_fd_mnist_vs_nfe.png"
    save_figure(fig, path, dpi=90)
    return path


def _plot(rows, labels, samplers, root: pathlib.Path) -> list[pathlib.Path]:
    plt = pyplot()
    summ = summarize(rows, "fd_mnist")
    if not summ:
        return []
    fig, axes = plt.subplots(1, len(samplers), figsize=(4 * len(samplers), 3.5), squeeze=False)
    for ax, s in zip(axes[0], samplers):
        for lb in labels:
            pts = sorted((n, c["mean"], c["std"]) for (la, sa, n), c in summ.items()
                         if la == lb and sa == s)
            if pts:
                n, m, sd = map(np.asarray, zip(*pts))
                ax.errorbar(n, m, yerr=sd, marker="o", capsize=2, label=lb)
        ax.set_title(s)
        nfe_axis(ax, "fd_mnist")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = root / "fd_mnist_vs_nfe.png"
    save_figure(fig, path, dpi=90)
    return [path]
