"""The report of an experiment: ``<root>/report.md`` (tables in the paper's layout, rows sampler x
arm, columns NFE; paired differences; robustness; cost), ``results.json`` and the
fd_mnist-vs-NFE plot. The table, plot and file helpers are ``atdiff eval``'s
(``atdiff_jax.eval.report``); the numbers come from ``stats.py``.
"""
from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from atdiff_jax.eval.report import nfe_axis, nfe_table, pyplot, save_figure, write_json
from atdiff_jax.experiment.stats import (DEFAULT_BOOTSTRAP, comparisons, mean_std,
                                         paired_differences, summarize)
from atdiff_jax.samplers import EVAL_SAMPLERS


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
    ``bootstrap_draws``."""
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
    rob = robustness
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
    (root / "report.md").write_text("\n".join(parts) + "\n")
    write_json(root / "results.json", {"summary": summaries, "paired": paired, "rows": rows,
                                       "robustness": rob, **extra})
    return root / "report.md"


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
