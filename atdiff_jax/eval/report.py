"""``atdiff eval``: sample a run's EMA params over samplers x NFEs, score them, write a report.

One protocol everywhere (the FID protocol of the docs):

* **Params**: the EMA params of the chosen checkpoint (``--ema_rate``, default the run's first
  rate), restored on whatever devices exist.
* **Samples**: ``num_samples`` images per (sampler, NFE); batch ``b`` starts from
  ``fold_in(seed, b)`` (:func:`atdiff_jax.samplers.generate`), so every sampler and every
  model in a comparison starts from the same x_T. Samples are rounded to uint8 exactly as saved
  images are (``to_uint8``) before any metric sees them.
* **FID**: InceptionV3 pool3 features (TF 2015-12-05 network, converted once with ``atdiff
  convert inception``) of the samples against the statistics of the run's whole training split
  (cached under ``stats_dir``), Fréchet distance in float64.
* **fd_mnist**: the same distance in the feature space of the shipped MNIST classifier against
  10,000 random test images, plus the classifier's mean confidence (MNIST runs only; one
  classifier pass gives both). With ``save_features`` the samples' 128-d features are kept
  beside the results (:func:`features_path`) for a bootstrap over the generated set
  (:func:`atdiff_jax.experiment.stats.paired_bootstrap`).
* **robustness**: the PGD denoiser attack over a grid of (t, radius) on test images, and the
  MNIST feature distance of DDIM samples whose intermediate states are perturbed (Gaussian and
  adversarial), see :mod:`atdiff_jax.eval.robustness`. Consistency models (Karras ``cd`` /
  ``ct`` students): the PGD attack on the consistency function's x_0 error at the noise levels
  of the same timesteps, and one-step / two-step sampling with the input of every network
  evaluation perturbed (:data:`CM_ROBUSTNESS_SAMPLING`).

Samplers of diffusion (DPM) runs: ``ddim``, ``iddpm``, ``es`` (IDDPM with epsilon scaling
``es_scale``, Ning et al. 2024) and ``dpm_solver`` (DPM-Solver++(2M)); of consistency-model runs:
``cm_onestep`` (NFE 1) and ``cm_multistep`` (NFE >= 2). The NFE is the number of network
evaluations.

Results go to ``<workdir>/eval/<step>/results.json``; :func:`write_report` turns the results of
one or more runs into ``report.md`` (tables laid out like the paper's: rows sampler x model,
columns NFE) and PNG plots. Workdirs, output and cache directories are ``etils.epath`` paths
(local, or URLs such as ``gs://bucket/run``).
"""
from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from atdiff_jax.paths import workdir_path, write_atomic
from atdiff_jax.samplers import CM_SAMPLERS, EVAL_SAMPLERS

METRICS = ("fd_mnist", "fid", "robustness")
# every sampler `atdiff eval` takes, in the order of the report's tables
ALL_EVAL_SAMPLERS = EVAL_SAMPLERS + CM_SAMPLERS
# the consistency-model robustness evaluation's samplers under perturbation: (sampler, NFE)
CM_ROBUSTNESS_SAMPLING = (("cm_onestep", 1), ("cm_multistep", 2))
DEFAULT_ES_SCALE = 1.017  # ES's λ in the authors' CIFAR-10 script (docs/method.md, "Baselines")


class EvalError(ValueError):
    """Bad evaluation arguments (named in the message)."""


def _check_choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise EvalError(f"{name} must be a non-empty list from {tuple(allowed)}, got {list(values)}")


def _sample(model, params, experiment, *, sampler: str, nfe: int, num: int, seed: int,
            batch_size: int, es_scale: float) -> np.ndarray:
    from atdiff_jax.samplers import generate
    if experiment.cm is not None:
        images, _ = generate(model, params, experiment.diffusion, num=num,
                             image_shape=experiment.image_shape, rng=jax.random.key(seed),
                             sampler=sampler, steps=nfe, batch_size=batch_size,
                             num_classes=experiment.sample_classes, cm=experiment.cm)
        return images
    cfg_model = experiment.model
    shape = (cfg_model.image_size, cfg_model.image_size, cfg_model.in_channels)
    images, _ = generate(model, params, experiment.diffusion, num=num, image_shape=shape,
                         rng=jax.random.key(seed), sampler="iddpm" if sampler == "es" else sampler,
                         steps=nfe, batch_size=batch_size,
                         num_classes=cfg_model.num_classes,
                         eps_scale=es_scale if sampler == "es" else 1.0)
    return images


def _at_32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 1] -> [N, 32, 32, 1] (bilinear) for the MNIST classifier."""
    if images.shape[1:3] == (32, 32):
        return images
    x = jax.image.resize(images.astype(np.float32), (images.shape[0], 32, 32, images.shape[3]),
                         "bilinear")
    return np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8)


def mnist_reference(data_dir: str, num: int = 10000):
    """The fd_mnist reference of every evaluation: ``num`` random real test images."""
    from atdiff_jax.eval.mnist_fd import reference_stats
    return reference_stats(data_dir, split="test", num=num)


def _fid_reference(inception_params, config, data_dir: str, stats_dir: str,
                   num: int | None = None):
    from atdiff_jax.data.pipeline import get_dataset_meta, load_examples
    from atdiff_jax.eval.fid import reference_statistics
    dataset, split = config.data.dataset, config.data.split
    total = get_dataset_meta(dataset, data_dir=data_dir).num_examples[split]
    total = min(total, num) if num else total

    def batches(chunk=5000):
        for start in range(0, total, chunk):
            yield load_examples(dataset, data_dir=data_dir, split=split, start=start,
                                num_examples=min(chunk, total - start),
                                image_size=config.model.image_size)

    return reference_statistics(inception_params, batches(), cache_dir=stats_dir,
                                dataset=dataset, split=split, num=total)


def _spread(x):
    """``x`` split over this process's devices along the batch (per-example work: the same
    numbers as on one device), or as it is."""
    from atdiff_jax.samplers import batch_shardings
    sh = batch_shardings(x.shape[0])
    return jax.device_put(x, sh[0]) if sh is not None else x


def _test_images(config, data_dir: str, num: int) -> jax.Array:
    """The first ``num`` test images of the run's dataset, in the model's range, spread."""
    from atdiff_jax.data.pipeline import load_examples, to_model_range
    x0 = to_model_range(load_examples(config.data.dataset, data_dir=data_dir, split="test",
                                      num_examples=num, image_size=config.model.image_size))
    return _spread(jnp.asarray(x0))


def _mnist_scores(imgs: np.ndarray, mnist_ref) -> tuple[dict[str, float], np.ndarray]:
    """``({fd_mnist, confidence, frac_confident}, features)`` of uint8 samples from one pass of
    the MNIST classifier (features -> the Fréchet distance to ``mnist_ref``, logits -> the
    confidence)."""
    from atdiff_jax.eval.fid import feature_statistics, frechet_distance
    from atdiff_jax.eval.mnist_fd import classifier_outputs, precision_from_logits
    logits, feats = classifier_outputs(_at_32(imgs))
    prec = precision_from_logits(logits)
    return ({"fd_mnist": frechet_distance(*feature_statistics(feats), *mnist_ref),
             "confidence": prec["mean_confidence"], "frac_confident": prec["frac_confident"]},
            feats)


def _batched_samples(sample_batch, *, seed: int, num: int, batch_size: int, shape
                     ) -> np.ndarray:
    """``num`` uint8 samples, ``batch_size`` at a time: batch ``b`` starts from
    ``normal(fold_in(fold_in(key(seed), b), 0))`` (the x_T of :func:`samplers.generate`), spread
    over the devices, and ``sample_batch(x_T, batch_key)`` returns its images in [-1, 1]."""
    from atdiff_jax.samplers import to_uint8
    imgs = []
    for b, start in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - start)
        key = jax.random.fold_in(jax.random.key(seed), b)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (batch_size,) + tuple(shape))
        imgs.append(to_uint8(np.asarray(sample_batch(_spread(x_T), key)))[:n])
    return np.concatenate(imgs)


def _robustness(model, params, experiment, config, data_dir: str, *, seed: int,
                t_values: Sequence[int], radii: Sequence[float], norm: str, pgd_steps: int,
                num_images: int, sample_sizes: Sequence[float], num_samples: int, nfe: int,
                mnist_ref, batch_size: int) -> dict:
    from atdiff_jax.eval import robustness

    def model_fn(x, t):
        return model.apply({"params": params}, x, t, train=False)

    attack = robustness.denoiser_attack(model_fn, experiment.diffusion,
                                        _test_images(config, data_dir, num_images),
                                        jax.random.key(seed), t_values=t_values, radii=radii,
                                        norm=norm, steps=pgd_steps)
    out = {"attack": {k: np.asarray(v).tolist() for k, v in attack.items()},
           "attack_settings": {"norm": norm, "pgd_steps": pgd_steps, "num_images": num_images}}
    if mnist_ref is None or not sample_sizes:
        return out
    chain = experiment.diffusion.respace(f"ddim{nfe}")
    run = jax.jit(lambda x, key, s, kind: robustness.perturbed_ddim_sample(
        model_fn, chain, x, key, kind=kind, size=s), static_argnames="kind")
    rows = []
    for kind in ("gaussian", "adversarial"):
        for size in sample_sizes:
            imgs = _batched_samples(
                lambda x_T, key: run(x_T, jax.random.fold_in(key, 3), float(size), kind),
                seed=seed, num=num_samples, batch_size=batch_size,
                shape=experiment.image_shape)
            scores, _ = _mnist_scores(imgs, mnist_ref)
            rows.append({"kind": kind, "size": float(size), "fd_mnist": scores["fd_mnist"],
                         "confidence": scores["confidence"]})
    out["sampling"] = {"sampler": "ddim", "nfe": nfe, "num_samples": num_samples, "rows": rows}
    return out


def features_path(results_file: str | os.PathLike) -> epath.Path:
    """The features file beside a results file: ``<dir>/<stem>.features.npz`` (``results.json``
    -> ``results.features.npz``), one float32 ``[num_samples, 128]`` array per row, keyed
    ``"<sampler>_<nfe>"``: the MNIST classifier features of that row's samples, in sample order
    (sample ``i`` of every model starts from the same x_T)."""
    p = epath.Path(results_file)
    return p.with_name(p.name.removesuffix(".json") + ".features.npz")


def check_run_samplers(experiment, samplers: Sequence[str], nfes: Sequence[int],
                       where: str = "this workdir") -> None:
    """Raises :class:`EvalError` unless ``samplers`` (at every NFE of ``nfes``) are samplers of
    the run: ``EVAL_SAMPLERS`` for a diffusion (DPM) run, ``CM_SAMPLERS`` for a consistency model,
    where ``cm_onestep`` makes exactly 1 network evaluation and ``cm_multistep`` 2 or more (an LCM
    student at most one per DDIM timestep of its chain)."""
    nfes = [int(n) for n in nfes]
    if experiment.cm is None:
        wrong = [s for s in samplers if s not in EVAL_SAMPLERS]
        if wrong:
            raise EvalError(f"samplers {wrong}: {where} holds a diffusion (DPM) run, whose "
                            f"samplers are {EVAL_SAMPLERS} ({CM_SAMPLERS} sample consistency "
                            "models)")
        return
    wrong = [s for s in samplers if s not in CM_SAMPLERS]
    if wrong:
        raise EvalError(f"samplers {wrong}: {where} holds a consistency model (cm.kind="
                        f"{experiment.cm.kind!r}), whose samplers are {CM_SAMPLERS} (cm_onestep at "
                        "nfe 1, cm_multistep at nfe >= 2)")
    if "cm_onestep" in samplers and any(n != 1 for n in nfes):
        raise EvalError(f"nfe {nfes}: cm_onestep makes exactly one network evaluation (nfe 1); "
                        "evaluate cm_multistep at nfe >= 2 in a call of its own")
    if "cm_multistep" in samplers:
        if any(n < 2 for n in nfes):
            raise EvalError(f"nfe {nfes}: cm_multistep makes 2 or more network evaluations "
                            "(nfe 1 is cm_onestep)")
        if experiment.cm.kind == "lcm":
            from atdiff_jax.consistency.lcm import ddim_timesteps
            most = len(ddim_timesteps(experiment.diffusion.num_timesteps,
                                      experiment.cm.lcm.skip))
            if max(nfes) > most:
                raise EvalError(f"nfe {nfes}: this LCM run has {most} DDIM timesteps "
                                "(diffusion.steps / cm.lcm.skip); cm_multistep takes nfe <= "
                                f"{most}")


@functools.lru_cache(maxsize=16)
def _cm_denoise_fn(model, denoiser):
    """The student's unclamped consistency function ``f(params, x, sigma)``: one stable function
    per (network, denoiser), so the compiled attacks and samplers of one network are reused for
    every run of it (the experiment evaluates many)."""
    def apply_fn(p, x, t, y, rng):
        return model.apply({"params": p}, x, t, y=y, train=False)

    return lambda p, x, sigma: denoiser.denoise(apply_fn, p, x, sigma)[1]


@functools.partial(jax.jit, static_argnames=("denoise_fn", "sigmas", "noise_scales",
                                             "sigma_max", "kind"))
def _perturbed_cm_sample(params, z, key, perturb_key, size, *, denoise_fn, sigmas, noise_scales,
                         sigma_max, kind):
    from atdiff_jax.eval.robustness import perturbed_cm_sample
    return perturbed_cm_sample(lambda x, s: denoise_fn(params, x, s), z, key, perturb_key,
                               sigmas=sigmas, noise_scales=noise_scales, sigma_max=sigma_max,
                               kind=kind, size=size)


def _cm_robustness(model, params, experiment, config, data_dir: str, *, seed: int,
                   t_values: Sequence[int], radii: Sequence[float], norm: str, pgd_steps: int,
                   num_images: int, sample_sizes: Sequence[float], num_samples: int,
                   mnist_ref, batch_size: int) -> dict:
    """The robustness evaluation of a Karras consistency model (cd / ct): the PGD attack on the
    consistency function at the chain's noise levels of ``t_values`` (EDM-scale δ, the x_0
    error), and :data:`CM_ROBUSTNESS_SAMPLING` with every network input perturbed (VP-scale
    sizes, as the DPM's DDIM-10 rows), see :mod:`atdiff_jax.eval.robustness`."""
    from atdiff_jax.consistency.samplers import multistep_sigmas
    from atdiff_jax.eval import robustness
    from atdiff_jax.samplers import multistep_ts

    cm = experiment.cm
    den = cm.denoiser
    denoise_fn = _cm_denoise_fn(model, den)      # unclamped: the attack needs gradients
    sigmas = robustness.chain_sigmas(experiment.diffusion, t_values, sigma_min=den.sigma_min,
                                     sigma_max=den.sigma_max)
    attack = robustness.consistency_attack(denoise_fn, params,
                                           _test_images(config, data_dir, num_images),
                                           jax.random.key(seed), sigmas=sigmas, radii=radii,
                                           norm=norm, steps=pgd_steps)
    attack["t"] = np.asarray(t_values)
    out = {"model": "cm", "attack": {k: np.asarray(v).tolist() for k, v in attack.items()},
           "attack_settings": {"norm": norm, "pgd_steps": pgd_steps, "num_images": num_images,
                               "scale": "edm"}}
    if mnist_ref is None or not sample_sizes:
        return out
    rows = []
    for sampler, nfe in CM_ROBUSTNESS_SAMPLING:
        if sampler == "cm_onestep":
            from atdiff_jax.consistency.karras import karras_sigmas
            sig = karras_sigmas(cm.sample_scales, den.sigma_min, den.sigma_max, den.rho)[:1]
            scales = np.zeros(1, np.float32)
        else:
            sig, scales = multistep_sigmas(multistep_ts(cm.sample_scales, nfe),
                                           steps=max(cm.sample_scales, nfe + 1),
                                           sigma_min=den.sigma_min, sigma_max=den.sigma_max,
                                           rho=den.rho)
        static = dict(denoise_fn=denoise_fn, sigmas=tuple(map(float, sig)),
                      noise_scales=tuple(map(float, scales)), sigma_max=float(den.sigma_max))
        for kind in robustness.PERTURB_KINDS:
            for size in sample_sizes:
                imgs = _batched_samples(
                    lambda z, key: _perturbed_cm_sample(
                        params, z, jax.random.fold_in(key, 2), jax.random.fold_in(key, 3),
                        jnp.float32(size), kind=kind, **static),
                    seed=seed, num=num_samples, batch_size=batch_size,
                    shape=experiment.image_shape)
                scores, _ = _mnist_scores(imgs, mnist_ref)
                rows.append({"sampler": sampler, "nfe": nfe, "kind": kind, "size": float(size),
                             "fd_mnist": scores["fd_mnist"], "confidence": scores["confidence"]})
    out["sampling"] = {"num_samples": num_samples, "scale": "vp", "rows": rows}
    return out


def evaluate_workdir(workdir: str, *, metrics: Sequence[str] = ("fd_mnist",),
                     samplers: Sequence[str] = ("ddim",), nfes: Sequence[int] = (10,),
                     num_samples: int = 1000, seed: int = 0, step: int | None = None,
                     ema_rate: float | None = None, batch_size: int = 250,
                     data_dir: str | None = None, es_scale: float = DEFAULT_ES_SCALE,
                     inception: str | None = None, stats_dir: str | None = None,
                     fid_reference_num: int | None = None,
                     robustness_t: Sequence[int] | None = None,
                     robustness_radii: Sequence[float] = (0.0, 0.02, 0.05, 0.1),
                     robustness_norm: str = "l2", robustness_pgd_steps: int = 10,
                     robustness_images: int = 64,
                     robustness_sizes: Sequence[float] = (0.0, 0.05, 0.1),
                     robustness_samples: int = 500, robustness_nfe: int = 10,
                     label: str | None = None,
                     out_file: str | os.PathLike | None = None,
                     save_features: bool = False) -> dict:
    """Evaluates one run and writes ``<workdir>/eval/<step>/results.json`` (or ``out_file``);
    returns the results.

    ``fid_reference_num`` limits the FID reference to the first N training images (None: the
    whole split, the protocol; smaller values are for smoke tests). ``robustness_t`` are the
    denoiser attack's timesteps, each in [0, T) (None: 5%, 20%, 50%, 80% of the run's T,
    :func:`atdiff_jax.eval.robustness.attack_timesteps`). A DPM's sampling under perturbation
    runs DDIM with ``robustness_nfe`` steps (10 by default). MNIST runs whose models are
    not 32x32 are scored by ``fd_mnist`` after a bilinear resize to 32x32.

    ``save_features`` (needs ``fd_mnist``) also writes the classifier features ``fd_mnist`` was
    computed from to :func:`features_path` of the results file (before the results file, whose
    ``features_file`` then names it); ``fd_mnist`` is
    ``frechet_distance(*feature_statistics(features), *mnist_reference(data_dir))`` of them.

    A consistency-model run is sampled with ``cm_onestep`` (``nfes=(1,)``) or ``cm_multistep``
    (every NFE >= 2) and scored the same way; its robustness evaluation is
    :func:`_cm_robustness` (``robustness_t`` are then timesteps of the run's chain, whose noise
    levels the attack uses).

    Raises:
      EvalError: unknown metric/sampler, NFE < 1, a sampler or NFE that does not fit the run
        (:func:`check_run_samplers`), a metric that does not apply to the run (``fd_mnist`` on
        another dataset, ``robustness`` of an LCM student), missing Inception weights for
        ``fid``, a ``robustness_t`` outside [0, T), ``robustness_nfe`` < 1, or ``save_features``
        without ``fd_mnist``.
    """
    from atdiff_jax.eval.robustness import attack_timesteps
    from atdiff_jax.train.checkpoint import create_manager
    from atdiff_jax.train.loop import default_data_dir, restore_for_sampling

    _check_choices("metrics", metrics, METRICS)
    _check_choices("samplers", samplers, ALL_EVAL_SAMPLERS)
    if not nfes or any(int(n) < 1 for n in nfes):
        raise EvalError(f"nfe must be a non-empty list of integers >= 1, got {list(nfes)}")
    if num_samples < 2:
        raise EvalError(f"num_samples must be >= 2 (a covariance needs two), got {num_samples}")
    if "robustness" in metrics and (isinstance(robustness_nfe, bool) or not isinstance(
            robustness_nfe, int) or robustness_nfe < 1):
        raise EvalError(f"robustness_nfe must be an integer >= 1, got {robustness_nfe!r}")
    if save_features and "fd_mnist" not in metrics:
        raise EvalError("save_features keeps the fd_mnist features: it needs metrics to include "
                        f"fd_mnist, got {list(metrics)}")
    model, params, experiment, config = restore_for_sampling(workdir, step=step,
                                                             ema_rate=ema_rate)
    check_run_samplers(experiment, samplers, nfes)
    if "robustness" in metrics and experiment.cm is not None and experiment.cm.kind == "lcm":
        raise EvalError("metrics: the robustness evaluation of consistency models covers the "
                        "Karras students (cm.kind 'cd' / 'ct'); this workdir holds an LCM student")
    if "robustness" in metrics:
        try:
            robustness_t = attack_timesteps(experiment.diffusion.num_timesteps, robustness_t)
        except ValueError as e:
            raise EvalError(f"robustness_t: {e}") from None
    data_dir = data_dir or config.data.data_dir or default_data_dir(workdir)
    is_mnist = config.data.dataset == "mnist32"
    if "fd_mnist" in metrics and not is_mnist:
        raise EvalError(f"fd_mnist needs an MNIST run, this one trains on {config.data.dataset!r}")
    if step is None:
        step = create_manager(workdir, read_only=True).latest_step()
    ckpt_step = step

    mnist_ref = mnist_reference(data_dir) if is_mnist and (
        "fd_mnist" in metrics or "robustness" in metrics) else None
    inception_params = fid_ref = None
    if "fid" in metrics:
        from atdiff_jax.convert.inception import load_inception_params
        if not inception or not os.path.exists(inception):
            raise EvalError(f"fid needs the converted Inception weights, not found at "
                            f"{inception!r}: run `atdiff convert inception --out=PATH` once and "
                            "pass --inception=PATH")
        inception_params = load_inception_params(inception)
        fid_ref = _fid_reference(inception_params, config, data_dir,
                                 stats_dir or str(epath.Path(data_dir) / "fid_stats"),
                                 fid_reference_num)

    rows, features = [], {}
    for sampler in samplers:
        for nfe in nfes:
            t0 = time.perf_counter()
            imgs = _sample(model, params, experiment, sampler=sampler, nfe=int(nfe),
                           num=num_samples, seed=seed, batch_size=batch_size, es_scale=es_scale)
            row = {"sampler": sampler, "nfe": int(nfe), "num_samples": num_samples,
                   "sample_seconds": time.perf_counter() - t0}
            if "fd_mnist" in metrics:
                scores, feats = _mnist_scores(imgs, mnist_ref)
                row.update(scores)
                if save_features:
                    features[f"{sampler}_{int(nfe)}"] = np.asarray(feats, np.float32)
            if "fid" in metrics:
                from atdiff_jax.eval.fid import feature_statistics, fid_features, frechet_distance
                # grey images are repeated to RGB inside the network
                mu, sigma = feature_statistics(fid_features(inception_params, imgs))
                row["fid"] = frechet_distance(mu, sigma, *fid_ref)
            rows.append(row)
    results = {"workdir": str(workdir_path(workdir)), "label": label or workdir_path(workdir).name,
               "step": int(ckpt_step) if ckpt_step is not None else None,
               "ema_rate": ema_rate, "seed": seed, "dataset": config.data.dataset,
               "es_scale": es_scale, "metrics": list(metrics), "rows": rows}
    if "robustness" in metrics:
        # a DPM's perturbed sampling is DDIM-<robustness_nfe>; a CM's, CM_ROBUSTNESS_SAMPLING
        robust_fn = (_cm_robustness if experiment.cm is not None
                     else functools.partial(_robustness, nfe=robustness_nfe))
        results["robustness"] = robust_fn(
            model, params, experiment, config, data_dir, seed=seed, t_values=robustness_t,
            radii=robustness_radii, norm=robustness_norm, pgd_steps=robustness_pgd_steps,
            num_images=robustness_images, sample_sizes=robustness_sizes,
            num_samples=robustness_samples, mnist_ref=mnist_ref, batch_size=batch_size)
    path = out_file or workdir_path(workdir) / "eval" / str(results["step"]) / "results.json"
    if save_features:   # first: a results file that names its features file has it
        feat_path = features_path(path)
        write_atomic(feat_path, lambda f: np.savez(f, **features))
        results["features_file"] = feat_path.name
    write_json(path, results)
    return results


# ----------------------------------------------------------------------------------------------
# Report (the table, plot and file helpers are shared with atdiff_jax.experiment.render)


def nfe_table(first: str, second: str, rows: Sequence[tuple[str, str, Sequence[str]]],
              nfes: Sequence[int]) -> list[str]:
    """The lines of a markdown table laid out like the paper's: columns ``first``, ``second``
    (e.g. sampler and model) and one per NFE; ``rows``: ``(first, second, one cell per NFE)``."""
    lines = [f"| {first} | {second} | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    lines += [f"| {a} | {b} | " + " | ".join(cells) + " |" for a, b, cells in rows]
    return lines


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def nfe_axis(ax, ylabel: str) -> None:
    """A log-scale NFE x axis and ``ylabel``."""
    ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)


def save_figure(fig, path, *, dpi: int) -> None:
    """Writes ``fig`` as a PNG to ``path`` (local path or URL, atomically) and closes it."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)


def write_json(path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` (local path or URL, atomically)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _table(results: Sequence[dict], metric: str) -> str:
    nfes = sorted({r["nfe"] for res in results for r in res["rows"] if metric in r})
    if not nfes:
        return ""
    samplers = [s for s in ALL_EVAL_SAMPLERS
                if any(r["sampler"] == s for res in results for r in res["rows"])]
    rows = []
    for s in samplers:
        for res in results:
            vals = {r["nfe"]: r[metric] for r in res["rows"] if r["sampler"] == s and metric in r}
            if vals:
                rows.append((s, res["label"], [f"{vals[n]:.3f}" if n in vals else ""
                                               for n in nfes]))
    return "\n".join(nfe_table("sampler", "model", rows, nfes))


def _robustness_tables(results: Sequence[dict]) -> str:
    out = []
    for res in results:
        rob = res.get("robustness")
        if not rob:
            continue
        if rob.get("model") == "cm":
            out += _cm_robustness_table(res["label"], rob)
            continue
        a = rob["attack"]
        radii = a["radius"]
        out.append(f"**{res['label']}** — denoiser attack ({rob['attack_settings']['norm']}, "
                   f"{rob['attack_settings']['pgd_steps']} PGD steps): eps MSE clean / attacked")
        out.append("| t | " + " | ".join(f"r={r:g}" for r in radii) + " |")
        out.append("|---|" + "---|" * len(radii))
        for i, t in enumerate(a["t"]):
            cells = [f"{a['eps_clean'][i][j]:.4f} / {a['eps_attacked'][i][j]:.4f}"
                     for j in range(len(radii))]
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        if "sampling" in rob:
            out.append("")
            nfe = rob["sampling"].get("nfe", 10)
            out.append(f"**{res['label']}** — DDIM-{nfe} with perturbed intermediate states "
                       "(MNIST feature distance)")
            out.append("| perturbation | size | fd_mnist | confidence |")
            out.append("|---|---|---|---|")
            for r in rob["sampling"]["rows"]:
                out.append(f"| {r['kind']} | {r['size']:g} | {r['fd_mnist']:.3f} | "
                           f"{r['confidence']:.3f} |")
        out.append("")
    return "\n".join(out)


def _cm_robustness_table(label: str, rob: dict) -> list[str]:
    """The lines of one consistency model's robustness tables (:func:`_cm_robustness`)."""
    a = rob["attack"]
    radii = a["radius"]
    out = [f"**{label}** — consistency-function attack ({rob['attack_settings']['norm']}, "
           f"{rob['attack_settings']['pgd_steps']} PGD steps, EDM-scale radius): x_0 MSE clean / "
           "attacked",
           "| t (sigma) | " + " | ".join(f"r={r:g}" for r in radii) + " |",
           "|---|" + "---|" * len(radii)]
    for i, (t, sig) in enumerate(zip(a["t"], a["sigma"])):
        cells = [f"{a['x0_clean'][i][j]:.4f} / {a['x0_attacked'][i][j]:.4f}"
                 for j in range(len(radii))]
        out.append(f"| {t} ({sig:.3g}) | " + " | ".join(cells) + " |")
    if "sampling" in rob:
        out += ["", f"**{label}** — consistency sampling with every network input perturbed "
                "(VP-scale size; MNIST feature distance)",
                "| sampler | perturbation | size | fd_mnist | confidence |", "|---|---|---|---|---|"]
        out += [f"| {r['sampler']}-{r['nfe']} | {r['kind']} | {r['size']:g} | "
                f"{r['fd_mnist']:.3f} | {r['confidence']:.3f} |" for r in rob["sampling"]["rows"]]
    return out


def _plots(results: Sequence[dict], out: epath.Path) -> list[str]:
    plt = pyplot()
    written = []
    for metric in ("fd_mnist", "fid"):
        if not any(metric in r for res in results for r in res["rows"]):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for res in results:
            for s in ALL_EVAL_SAMPLERS:
                pts = sorted((r["nfe"], r[metric]) for r in res["rows"]
                             if r["sampler"] == s and metric in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{res['label']} / {s}")
        nfe_axis(ax, metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric}_vs_nfe.png"
        save_figure(fig, path, dpi=100)
        written.append(str(path))
    if any(res.get("robustness") for res in results):
        fig, ax = plt.subplots(figsize=(6, 4))
        for res in results:
            rob = res.get("robustness")
            if not rob:
                continue
            a = rob["attack"]
            key = "x0_attacked" if rob.get("model") == "cm" else "eps_attacked"
            for i, t in enumerate(a["t"]):
                ax.plot(a["radius"], a[key][i], marker="o",
                        label=f"{res['label']} t={t}" + (" (x0)" if key[0] == "x" else ""))
        ax.set_xlabel("attack radius (per-pixel RMS)")
        ax.set_ylabel("attacked eps MSE (DPM) / x0 MSE (CM)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "robustness.png"
        save_figure(fig, path, dpi=100)
        written.append(str(path))
    return written


def write_report(results: Sequence[dict], out_dir: str) -> dict[str, Any]:
    """``report.md`` + ``results.json`` + PNG plots for one or more runs' results."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# atdiff eval report", ""]
    for res in results:
        parts.append(f"- **{res['label']}**: `{res['workdir']}` step {res['step']}, EMA "
                     f"{res['ema_rate'] or 'default'}, seed {res['seed']}, "
                     f"{res['rows'][0]['num_samples'] if res['rows'] else 0} samples per cell")
    parts.append("")
    for metric, title in (("fd_mnist", "MNIST feature distance (lower is better)"),
                          ("confidence", "MNIST classifier confidence (higher is better)"),
                          ("fid", "FID (lower is better)")):
        table = _table(results, metric)
        if table:
            parts += [f"## {title}", "", table, ""]
    rob = _robustness_tables(results)
    if rob:
        parts += ["## Robustness", "", rob]
    plots = _plots(results, out)
    parts += [f"![{epath.Path(p).stem}]({epath.Path(p).name})" for p in plots]
    (out / "report.md").write_text("\n".join(parts) + "\n")
    write_json(out / "results.json", list(results))
    return {"report": str(out / "report.md"), "plots": plots}
