"""The statistics of an experiment's report: per-seed means, mean ± std over training seeds,
paired per-seed differences between arms, and a paired bootstrap over the generated samples.

A *row* is one (sampler, NFE) result of one evaluation cell, with its ``label`` (the arm),
training ``seed`` and ``eval_seed`` (``runner.collect_rows``). Every statistic first averages
over evaluation seeds, then treats the training seeds as the independent replicates.

Two intervals of a paired difference answer two questions. ``mean_std(...)["ci95"]`` (Student's
t over training seeds): would other training seeds give the same difference?
:func:`paired_bootstrap` (``boot95``): how much of the difference is the finite generated set of
each cell, i.e. would other samples of the *same* models give it? With few seeds the t interval
is wide; the bootstrap interval can be narrow even then, and says nothing about seed variation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

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


DEFAULT_BOOTSTRAP = 200   # resamples when a spec has no eval.bootstrap


def bootstrap_indices(n: int, draws: int, seed: int, key: Sequence[int] = ()) -> np.ndarray:
    """int64 ``[draws, n]``: ``draws`` resamples of ``range(n)`` with replacement, from the numpy
    ``Generator`` seeded by ``SeedSequence([seed, *key])`` (``key`` tells independent streams
    apart, e.g. the training and evaluation seed; non-negative integers)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))
    return rng.integers(0, n, size=(int(draws), int(n)))


def bootstrap_fd(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
                 indices: np.ndarray, *, distance: Callable | None = None) -> np.ndarray:
    """float64 ``[draws]``: the Fréchet distance to ``reference = (mu [D], sigma [D, D])`` of
    ``features[idx]`` (``[N, D]``) for each row ``idx`` of ``indices`` (``[draws, N]``).

    ``distance``: :func:`atdiff_jax.eval.fid.frechet_distance_to` of ``reference``, to share
    its square root between calls (made here when None). One draw is a mean and covariance of
    N x D features and one symmetric D x D eigenvalue problem (the square root).
    """
    from atdiff_jax.eval.fid import frechet_distance_to
    distance = distance or frechet_distance_to(*reference)
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or indices.ndim != 2 or indices.shape[1] < 2:
        raise ValueError(f"need features [N, D] and indices [draws, N >= 2], got {f.shape}, "
                         f"{indices.shape}")
    out = np.empty(len(indices))
    for i, idx in enumerate(indices):
        x = f[idx]
        mu = x.mean(axis=0)
        d = x - mu
        out[i] = distance(mu, d.T @ d / (len(x) - 1))
    return out


def _as_eval_seeds(per_seed) -> list[list[np.ndarray]]:
    """Per training seed: one ``[N, D]`` array, or a list of them (one per evaluation seed)."""
    return [[np.asarray(x)] if np.ndim(x) == 2 else [np.asarray(y) for y in x] for x in per_seed]


def _interval(rel: np.ndarray) -> dict:
    """``rel``: ``[seeds, draws]`` per-seed % differences -> the percentile interval of their
    mean over seeds."""
    means = rel.mean(axis=0)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"boot95": [float(lo), float(hi)], "draws": int(rel.shape[1])}


def paired_bootstrap(arm: Sequence, reference: Sequence, target: tuple[np.ndarray, np.ndarray],
                     *, draws: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                     keys: Sequence[Sequence[int]] | None = None) -> dict:
    """95% bootstrap interval, over the generated samples, of the mean over training seeds of
    ``100 * (fd(arm) - fd(reference)) / fd(reference)`` (``paired_differences`` of fd_mnist).

    Args:
      arm, reference: one entry per training seed: the ``[N, D]`` features (the MNIST
        classifier's, ``D = 128``) of the arm's and of the reference's generated samples, paired
        by index (sample ``i`` of both started from the same x_T), the same ``N`` within a seed.
        An entry may also be a list of such arrays, one per evaluation seed; the seed's fd is
        then the mean over them, as in ``paired_differences``.
      target: ``(mu [D], sigma [D, D])`` the distance is measured to (the 10,000 real test
        images of ``runner``'s evaluation).
      draws: B, the number of resamples (>= 1).
      seed, keys: the resamples of seed ``j``'s (evaluation seed ``e``'s) samples are
        :func:`bootstrap_indices` ``(N, draws, seed, (*keys[j], e))``; ``keys`` defaults to
        ``[(j,)]``. So the arm and its reference are resampled with the *same* indices
        (pairing keeps the shared x_T noise out of the interval), while seeds are resampled
        independently, and the result is reproducible.
    Returns:
      ``{"boot95": [lo, hi], "draws": B}``: the 2.5 and 97.5 percentiles over the B resamples.
      It is the percentile bootstrap: a resample repeats samples, which raises every fd a
      little (as a smaller N would), but arm and reference alike, and the ratio mostly cancels
      it. Cost: ``2 * B * seeds * eval seeds`` fds, each about 1 ms at N = 256, D = 128 with
      one BLAS thread (:func:`bootstrap_fd`).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    arm, reference = _as_eval_seeds(arm), _as_eval_seeds(reference)
    if len(arm) != len(reference) or not arm:
        raise ValueError(f"need the same number (>= 1) of training seeds, got {len(arm)} and "
                         f"{len(reference)}")
    keys = [(j,) for j in range(len(arm))] if keys is None else [tuple(k) for k in keys]
    from atdiff_jax.eval.fid import frechet_distance_to
    distance = frechet_distance_to(*target)
    rel = []
    for j, (a_sets, b_sets) in enumerate(zip(arm, reference)):
        if len(a_sets) != len(b_sets):
            raise ValueError(f"training seed {j}: {len(a_sets)} and {len(b_sets)} eval seeds")
        fa, fb = np.zeros(draws), np.zeros(draws)
        for e, (a, b) in enumerate(zip(a_sets, b_sets)):
            if a.shape != b.shape:
                raise ValueError(f"training seed {j}: the arm's features {a.shape} and the "
                                 f"reference's {b.shape} are not paired (same N, D)")
            idx = bootstrap_indices(len(a), draws, seed, (*keys[j], e))
            fa += bootstrap_fd(a, target, idx, distance=distance) / len(a_sets)
            fb += bootstrap_fd(b, target, idx, distance=distance) / len(b_sets)
        rel.append(100.0 * (fa - fb) / fb)
    return _interval(np.asarray(rel))


def bootstrap_differences(rows: list[dict], pairs: Sequence[tuple[str, str]],
                          features: Callable[[dict], np.ndarray | None],
                          target: tuple[np.ndarray, np.ndarray], *,
                          draws: int = DEFAULT_BOOTSTRAP, seed: int = 0
                          ) -> dict[tuple[str, str], dict[tuple[str, int], dict]]:
    """:func:`paired_bootstrap` of fd_mnist for every ``(arm, reference)`` of ``pairs`` and every
    (sampler, nfe) that ``paired_differences`` pairs: ``(arm, ref) -> (sampler, nfe) ->
    {"boot95", "draws"}``.

    ``features(row)``: the ``[N, 128]`` features of a row's samples, or None when they were not
    saved (an evaluation cell from before features were kept); a (sampler, nfe) with any such
    row is left out. Only evaluation seeds both runs of a training seed have count. The
    resamples of (training seed ``s``, evaluation seed ``e``) are
    ``bootstrap_indices(N, draws, seed, (s + 1, e))`` in every comparison, so a run's resampled
    fds are computed once for all comparisons it is in (the same numbers as
    :func:`paired_bootstrap` with ``keys=[(s + 1,) for s in seeds]`` when the evaluation seeds
    are 0, 1, ...).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    from atdiff_jax.eval.fid import frechet_distance_to
    distance = frechet_distance_to(*target)
    by_key: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if "fd_mnist" in r:
            by_key.setdefault((r["label"], r["sampler"], r["nfe"], r["seed"]), {})[
                r["eval_seed"]] = r
    cache: dict[tuple, np.ndarray | None] = {}

    def fds(label, sampler, nfe, train_seed, eval_seed, n):
        k = (label, sampler, nfe, train_seed, eval_seed)
        if k not in cache:
            f = features(by_key[label, sampler, nfe, train_seed][eval_seed])
            cache[k] = None if f is None or len(f) != n else bootstrap_fd(
                f, target, bootstrap_indices(n, draws, seed, (train_seed + 1, eval_seed)),
                distance=distance)
        return cache[k]

    out: dict = {}
    for arm, ref in pairs:
        cells: dict[tuple, list] = {}
        for (label, sampler, nfe, s), evals in sorted(by_key.items()):
            if label == arm and (ref, sampler, nfe, s) in by_key:
                cells.setdefault((sampler, nfe), []).append((s, evals))
        res = {}
        for (sampler, nfe), seeds in cells.items():
            rel = []
            for s, evals in seeds:
                common = sorted(set(evals) & set(by_key[ref, sampler, nfe, s]))
                if not common:
                    break
                n = evals[common[0]]["num_samples"]
                fa = [fds(arm, sampler, nfe, s, e, n) for e in common]
                fb = [fds(ref, sampler, nfe, s, e, n) for e in common]
                if any(x is None for x in fa + fb):
                    break
                fa, fb = np.mean(fa, axis=0), np.mean(fb, axis=0)
                rel.append(100.0 * (fa - fb) / fb)
            else:
                res[sampler, nfe] = _interval(np.asarray(rel))
        out[arm, ref] = res
    return out


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
