"""The statistics of an experiment's report: per-seed means, mean ± std over training seeds, and
paired per-seed differences between arms.

A *row* is one (sampler, NFE) result of one evaluation cell, with its ``label`` (the arm),
training ``seed`` and ``eval_seed`` (``runner.collect_rows``). Every statistic first averages
over evaluation seeds, then treats the training seeds as the independent replicates.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_std(v: list[float]) -> dict:
    """``mean``, sample ``std`` (0 for one value), ``n``, the ``values`` themselves and ``ci95``:
    the 95% confidence interval of the mean over the ``n`` replicates, ``mean ± t(0.975, n-1) *
    std / sqrt(n)`` (Student's t: a handful of training seeds), ``None`` for one value."""
    from scipy import stats as scipy_stats   # a dependency of jax

    n, mean = len(v), float(np.mean(v))
    std = float(np.std(v, ddof=1)) if n > 1 else 0.0
    ci = None
    if n > 1:
        half = float(scipy_stats.t.ppf(0.975, n - 1)) * std / np.sqrt(n)
        ci = [mean - half, mean + half]
    return {"mean": mean, "std": std, "n": n, "values": v, "ci95": ci}


def _per_seed(rows: list[dict], metric: str) -> dict[tuple[str, str, int, int], float]:
    """(label, sampler, nfe, training seed) -> the mean over evaluation seeds."""
    vals: dict[tuple, list[float]] = {}
    for r in rows:
        if metric in r:
            vals.setdefault((r["label"], r["sampler"], r["nfe"], r["seed"]), []).append(r[metric])
    return {k: float(np.mean(v)) for k, v in vals.items()}


def summarize(rows: list[dict], metric: str) -> dict[tuple[str, str, int], dict]:
    """(label, sampler, nfe) -> mean/std over training seeds of the per-seed eval-seed means."""
    cells: dict[tuple, list[float]] = {}
    for (label, sampler, nfe, _), v in sorted(_per_seed(rows, metric).items()):
        cells.setdefault((label, sampler, nfe), []).append(v)
    return {k: mean_std(v) for k, v in cells.items()}


def paired_differences(rows: list[dict], metric: str, arm: str, reference: str, *,
                       lower_is_better: bool = True) -> dict[tuple[str, int], dict]:
    """(sampler, nfe) -> ``100 * (arm - reference) / reference`` per training seed, paired.

    Both runs of a training seed saw the same minibatches and noise and are sampled from the
    same x_T, so the per-seed difference removes most of the evaluation noise that the spread of
    either arm alone contains. Only seeds both labels have count; ``wins`` is the number of
    seeds where ``arm`` is better.
    """
    per = _per_seed(rows, metric)
    out: dict[tuple, list[tuple[float, bool]]] = {}
    for (label, sampler, nfe, seed), a in sorted(per.items()):
        if label != arm:
            continue
        b = per.get((reference, sampler, nfe, seed))
        if b is None:
            continue
        out.setdefault((sampler, nfe), []).append(
            (100.0 * (a - b) / b, a < b if lower_is_better else a > b))
    return {k: {**mean_std([d for d, _ in v]), "wins": sum(w for _, w in v)}
            for k, v in out.items()}


def comparisons(spec, labels: Sequence[str]) -> list[tuple[str, str]]:
    """The (arm, reference) pairs the report differences: every arm against the clean baseline,
    and the AT arm against clean with equal updates and at equal wall-clock."""
    w = spec.wallclock
    pairs = [(lb, w.baseline) for lb in labels if lb not in ("start", w.baseline)]
    pairs += [(w.arm, w.reference), (w.arm, f"{w.reference}@wallclock")]
    out = []
    for a, b in pairs:
        if a in labels and b in labels and a != b and (a, b) not in out:
            out.append((a, b))
    return out
