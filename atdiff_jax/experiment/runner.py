"""Running an experiment (``atdiff experiment``): the spec, its stages, resuming, timing.

The paper's comparison of clean ADM, ADM-AT and the baselines in its CIFAR-10 recipe
(docs/method.md, "Hyper-parameters" and "Baselines"), at MNIST scale, resumable.

The experiment is described by a *spec* (``configs/experiments/mnist.py``; a smoke version is
``configs/experiments/smoke.py``) and lives in one root directory::

  <root>/pretrain/                 the clean ADM every arm starts from (a normal workdir)
  <root>/gate.json                 quality of the starting checkpoint vs the real-data floor
  <root>/timing.json               seconds per minibatch of clean and fast-AT steps, one process
  <root>/arms/<arm>/seed<s>/       one fine-tuning run per (arm, training seed)
  <root>/cm/<cm arm>/seed<s>/      one consistency-distillation run per (CM arm, seed), optional
  <root>/eval/<run>/seed<s>/<sampler>_e<k>.json   one evaluation cell (sampler x all NFEs)
  <root>/eval/<run>/seed<s>/<sampler>_e<k>.features.npz   its samples' classifier features
  <root>/report.md, results.json, *.png           the tables and plots
  <root>/jax_cache/                `atdiff experiment`'s persistent compilation cache

Stages, in order; each one skips what is already on disk, so rerunning the same command after an
interruption resumes (a half-trained run resumes from its last checkpoint, finished arms and
evaluation cells are reused):

1. **pretrain**: ``atdiff train`` of ``spec.pretrain.config`` in ``<root>/pretrain``.
2. **gate**: the MNIST feature distance and classifier confidence of ``spec.gate.num_samples``
   samples of the starting checkpoint (``spec.pretrain.start_step``), against the real-data
   floor at the same N (two disjoint sets of real test images). The comparison only means
   something on a model that already makes good digits; with ``spec.gate.require`` the
   experiment stops when the start is worse than ``max_factor`` x floor or below
   ``min_confidence``; otherwise the shortfall is reported.
3. **timing**: seconds per minibatch of the clean and the fast-AT train steps
   (``spec.wallclock.baseline``, ``.arm``), measured interleaved in one process. It fixes the
   **equal wall-clock** comparison: the clean run with K times the
   minibatches (``spec.wallclock.reference``) is also evaluated at the checkpoint nearest to
   ``N * t(fast AT) / t(clean)`` minibatches, i.e. clean training given the time fast AT took.
4. **arms** (per training seed, all arms of a seed before the next seed): each arm continues
   from the start checkpoint's params and EMA with a fresh optimizer (``config.init.workdir``),
   for ``spec.finetune.num_minibatches * minibatch_factor`` minibatches.
5. **eval** (after each seed's arms): every sampler of ``spec.eval.samplers`` at every NFE of
   ``spec.eval.nfes``, for every evaluation seed, plus the robustness evaluation. The classifier
   features of each cell's samples are kept beside it (``evaluate_workdir(save_features=True)``).
4b./5b. **CM arms** (optional, ``spec.cm``; after the DPM arms of each seed in
   ``spec.cm.seeds``): consistency distillation with the start checkpoint as the teacher
   (``config.teacher``; the student starts from its EMA params), ``spec.cm.num_minibatches``
   minibatches of ``spec.cm.config`` + the CM arm's overrides (:func:`cm_arm_config`; every
   CM arm's config is checked against the pre-training before anything trains,
   :func:`check_cm_configs`), trained and resumed like the DPM arms; then evaluated with
   ``cm_onestep`` at NFE 1 and ``cm_multistep`` at the other NFEs of ``spec.cm.nfes`` (the
   evaluation seeds and sizes of ``spec.eval``), and with the students' robustness evaluation
   (``spec.cm.robustness``). Specs without a ``cm`` section, or with ``cm.enabled=False``, have
   no CM stage.
6. **report**: mean +- std over training seeds (each the mean over evaluation seeds) in the
   paper's layout (rows sampler x arm, columns NFE); the paired per-seed differences of each arm
   against clean, and of AT against equal updates and equal wall-clock
   (``stats.paired_differences``), with a 95% interval over training seeds (Student's t) and one
   over the generated samples (``stats.bootstrap_differences``: ``spec.eval.bootstrap``
   resamples of the saved features, 0 = off; cells evaluated before features were saved have
   none); the floor of one cell (:func:`cell_floor`); robustness, plots, wall time
   (``render.write_report``); and the same for the CM arms against
   ``spec.cm.baseline``, with the plot of fd_mnist against NFE per CM arm.

Arms (DPM and CM) are given as nested overrides of the fine-tuning config; unknown keys are
errors.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import runpy
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from atdiff_jax.eval.report import write_json
from atdiff_jax.experiment.render import cm_nfes, cm_spec, write_report
from atdiff_jax.experiment.stats import (DEFAULT_BOOTSTRAP, bootstrap_differences, comparisons,
                                         mean_std)
from atdiff_jax.samplers import CM_SAMPLERS, EVAL_SAMPLERS

# the fields a CM arm may have (spec.cm.arms.<arm>)
CM_ARM_FIELDS = ("overrides", "seeds")


class StudyError(ValueError):
    """A bad experiment spec or root directory (named in the message)."""


class StudyInterrupted(RuntimeError):
    """A training run stopped before its end (SIGTERM / preemption); rerun to resume."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model the report compares: a workdir at a checkpoint step."""
    label: str          # arm name (or "start", "<reference>@wallclock")
    seed: int           # training seed (-1 for the start checkpoint)
    workdir: str
    step: int


# ---------------------------------------------------------------------------------------------
# Configs


REPO = pathlib.Path(__file__).resolve().parents[2]


def _load_config(path: str) -> ml_collections.ConfigDict:
    """A config file's ``get_config()``; a relative path is tried from the working directory,
    then from the repository root (where ``configs/`` lives)."""
    p = pathlib.Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO / p).is_file():
        p = REPO / p
    if not p.is_file():
        raise StudyError(f"config file {path!r} not found")
    return runpy.run_path(str(p))["get_config"]()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Any, where: str
                    ) -> ml_collections.ConfigDict:
    """``config`` with the nested ``overrides`` set; an unknown key is a :class:`StudyError`."""
    config = config.copy_and_resolve_references()

    def merge(node, upd, prefix):
        for key, value in (upd.items() if upd else ()):
            name = f"{prefix}{key}"
            if key not in node:
                raise StudyError(f"{where}: unknown config option {name!r}")
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                if not isinstance(node[key], ml_collections.ConfigDict):
                    raise StudyError(f"{where}: {name!r} is a value, not a section")
                merge(node[key], value, name + ".")
            else:
                try:
                    node[key] = tuple(value) if isinstance(value, list) else value
                except TypeError as e:
                    raise StudyError(f"{where}: {name}: {e}") from None

    merge(config, overrides, "")
    return config


def validate_spec(spec: ml_collections.ConfigDict) -> None:
    """Raises :class:`StudyError` naming the first bad field of an experiment spec."""
    for key in ("pretrain", "finetune", "arm_order", "arms", "seeds", "gate", "eval", "wallclock"):
        if key not in spec:
            raise StudyError(f"spec.{key} is missing")
    order = tuple(spec.arm_order)
    if not order or len(set(order)) != len(order):
        raise StudyError(f"spec.arm_order must list distinct arm names, got {order}")
    missing = [a for a in order if a not in spec.arms]
    if missing:
        raise StudyError(f"spec.arm_order names arms without a spec.arms entry: {missing}")
    for arm in order:
        factor = spec.arms[arm].get("minibatch_factor", 1)
        if not isinstance(factor, int) or factor < 1:
            raise StudyError(f"spec.arms.{arm}.minibatch_factor must be an integer >= 1, "
                             f"got {factor!r}")
    if not spec.seeds or any(not isinstance(s, int) or s < 0 for s in spec.seeds):
        raise StudyError(f"spec.seeds must be non-negative integers, got {tuple(spec.seeds)}")
    if spec.finetune.num_minibatches < 1:
        raise StudyError("spec.finetune.num_minibatches must be >= 1")
    bad = [s for s in spec.eval.samplers if s not in EVAL_SAMPLERS]
    if bad or not spec.eval.samplers:
        raise StudyError(f"spec.eval.samplers must be from {EVAL_SAMPLERS}, got "
                         f"{tuple(spec.eval.samplers)}")
    if not spec.eval.nfes or any(int(n) < 1 for n in spec.eval.nfes):
        raise StudyError(f"spec.eval.nfes must be integers >= 1, got {tuple(spec.eval.nfes)}")
    if not spec.eval.seeds:
        raise StudyError("spec.eval.seeds must not be empty")
    boot = spec.eval.get("bootstrap", DEFAULT_BOOTSTRAP)
    if isinstance(boot, bool) or not isinstance(boot, int) or boot < 0:
        raise StudyError(f"spec.eval.bootstrap must be an integer >= 0 (resamples of the "
                         f"generated set; 0 = off), got {boot!r}")
    wc = spec.wallclock
    if wc.enabled:
        for key in ("arm", "baseline", "reference"):
            if wc[key] not in order:
                raise StudyError(f"spec.wallclock.{key}={wc[key]!r} is not an arm of "
                                 f"spec.arm_order {order}")
    if cm_spec(spec) is not None:
        _validate_cm(spec)


def cm_seeds(spec) -> tuple[int, ...]:
    """The training seeds of the CM stage: ``spec.cm.seeds``, or ``spec.seeds`` when empty."""
    return tuple(spec.cm.get("seeds", ())) or tuple(spec.seeds)


def cm_arm_seeds(spec, arm: str) -> tuple[int, ...]:
    """The training seeds of CM arm ``arm`` (its ``seeds``, or every CM seed)."""
    return tuple(spec.cm.arms[arm].get("seeds", ())) or cm_seeds(spec)


def cm_robustness_seeds(spec) -> tuple[int, ...]:
    """The CM arms' seeds that get the robustness evaluation: ``spec.cm.robustness_seeds``, or
    when empty those of ``spec.eval.robustness_seeds`` the CM stage trains (none without
    ``spec.cm.robustness``)."""
    if not spec.cm.get("robustness", False):
        return ()
    return (tuple(spec.cm.get("robustness_seeds", ()))
            or tuple(s for s in spec.eval.robustness_seeds if s in cm_seeds(spec)))


def _is_int(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _validate_cm(spec) -> None:
    """The checks of ``spec.cm`` (the consistency-model stage), each naming its field."""
    cm = spec.cm
    for key in ("config", "num_minibatches", "arm_order", "arms", "baseline", "samplers", "nfes"):
        if key not in cm:
            raise StudyError(f"spec.cm.{key} is missing (or set spec.cm.enabled=False)")
    order = tuple(cm.arm_order)
    if not order or len(set(order)) != len(order):
        raise StudyError(f"spec.cm.arm_order must list distinct arm names, got {order}")
    missing = [a for a in order if a not in cm.arms]
    if missing:
        raise StudyError(f"spec.cm.arm_order names arms without a spec.cm.arms entry: {missing}")
    taken = [a for a in order if a in tuple(spec.arm_order) or a == "start" or "@" in a]
    if taken:
        raise StudyError(f"spec.cm.arm_order: {taken} are names of DPM runs (spec.arm_order, "
                         "'start', '<arm>@wallclock'); CM arms need names of their own (every "
                         "run's evaluation cells share <root>/eval/)")
    for arm in order:
        extra = sorted(set(cm.arms[arm].keys()) - set(CM_ARM_FIELDS))
        if extra:
            raise StudyError(f"spec.cm.arms.{arm}: unknown field(s) {extra}; a CM arm has "
                             f"{CM_ARM_FIELDS}")
    if cm.baseline not in order:
        raise StudyError(f"spec.cm.baseline={cm.baseline!r} is not an arm of spec.cm.arm_order "
                         f"{order}")
    seeds = cm_seeds(spec)
    if any(not isinstance(s, int) for s in seeds) or not set(seeds) <= set(spec.seeds):
        raise StudyError(f"spec.cm.seeds must be training seeds of spec.seeds {tuple(spec.seeds)} "
                         f"(a seed's CM arms run after its DPM arms), got {seeds}")
    for arm in order:
        bad = [s for s in cm_arm_seeds(spec, arm) if s not in seeds]
        if bad:
            raise StudyError(f"spec.cm.arms.{arm}.seeds: {bad} are not seeds of the CM stage "
                             f"{seeds} (spec.cm.seeds)")
    if not _is_int(cm.num_minibatches, 1):
        raise StudyError(f"spec.cm.num_minibatches must be an integer >= 1, got "
                         f"{cm.num_minibatches!r}")
    if not _is_int(cm.get("checkpoints", 1), 1):
        raise StudyError(f"spec.cm.checkpoints must be an integer >= 1, got {cm.checkpoints!r}")
    samplers = tuple(cm.samplers)
    if not samplers or len(set(samplers)) != len(samplers) or any(
            s not in CM_SAMPLERS for s in samplers):
        raise StudyError(f"spec.cm.samplers must be distinct samplers from {CM_SAMPLERS}, got "
                         f"{samplers}")
    nfes = tuple(cm.nfes)
    if not nfes or len(set(nfes)) != len(nfes) or not all(_is_int(n, 1) for n in nfes):
        raise StudyError(f"spec.cm.nfes must be distinct integers >= 1, got {nfes}")
    if "cm_onestep" in samplers and 1 not in nfes:
        raise StudyError(f"spec.cm.nfes {nfes} lacks 1, the NFE of cm_onestep (one network "
                         "evaluation)")
    if "cm_multistep" in samplers and not any(n >= 2 for n in nfes):
        raise StudyError(f"spec.cm.nfes {nfes} has no NFE >= 2 for cm_multistep")
    if 1 in nfes and "cm_onestep" not in samplers:
        raise StudyError(f"spec.cm.nfes: NFE 1 is cm_onestep's, which spec.cm.samplers "
                         f"{samplers} does not list (cm_multistep makes >= 2 evaluations)")
    if any(n >= 2 for n in nfes) and "cm_multistep" not in samplers:
        raise StudyError(f"spec.cm.nfes: NFEs {[n for n in nfes if n >= 2]} are cm_multistep's, "
                         f"which spec.cm.samplers {samplers} does not list (cm_onestep makes "
                         "one evaluation)")
    bad = [s for s in cm_robustness_seeds(spec) if s not in seeds]
    if bad:
        raise StudyError(f"spec.cm.robustness_seeds: {bad} are not seeds of the CM stage {seeds}")


def pretrain_config(spec, root: pathlib.Path, data_dir: str) -> ml_collections.ConfigDict:
    config = apply_overrides(_load_config(spec.pretrain.config), spec.pretrain.overrides,
                             "spec.pretrain.overrides")
    config.data.data_dir = data_dir
    return config


def arm_config(spec, arm: str, seed: int, root: pathlib.Path, data_dir: str, start_step: int
               ) -> ml_collections.ConfigDict:
    """The fine-tuning config of ``arm`` with training seed ``seed``."""
    base = apply_overrides(_load_config(spec.finetune.config), spec.finetune.overrides,
                           "spec.finetune.overrides")
    config = apply_overrides(base, spec.arms[arm].overrides, f"spec.arms.{arm}.overrides")
    factor = int(spec.arms[arm].get("minibatch_factor", 1))
    n = int(spec.finetune.num_minibatches) * factor
    config.train.num_minibatches = n
    # Checkpoints at 1/checkpoints of the run; the wall-clock reference keeps all of them.
    config.train.checkpoint_every = max(1, n // int(spec.finetune.checkpoints))
    config.train.keep_checkpoints = int(spec.finetune.checkpoints) + 1
    config.seed = int(spec.finetune.base_seed) + seed
    config.data.data_dir = data_dir
    config.init.workdir = str(root / "pretrain")
    config.init.step = int(start_step)
    return config


def cm_arm_config(spec, arm: str, seed: int, root: pathlib.Path, data_dir: str, start_step: int
                  ) -> ml_collections.ConfigDict:
    """The consistency-distillation config of CM arm ``arm`` with training seed ``seed``: its
    teacher is the pre-training's checkpoint ``start_step`` (its first EMA copy), from which the
    student starts (``cm.init_from_teacher``)."""
    cm = spec.cm
    base = apply_overrides(_load_config(cm.config), cm.get("overrides", {}), "spec.cm.overrides")
    config = apply_overrides(base, cm.arms[arm].get("overrides", {}),
                             f"spec.cm.arms.{arm}.overrides")
    if config.get("cm", {}).get("kind", "none") == "none":
        raise StudyError(f"spec.cm.config {cm.config!r} (with spec.cm.arms.{arm}.overrides) "
                         "trains a diffusion model (cm.kind='none'); the CM stage needs a "
                         "consistency-model config, e.g. configs/experiments/mnist_cd_finetune.py")
    n = int(cm.num_minibatches)
    k = int(cm.get("checkpoints", 1))
    config.train.num_minibatches = n
    config.train.checkpoint_every = max(1, n // k)
    config.train.keep_checkpoints = k + 1
    config.seed = int(spec.finetune.base_seed) + seed
    config.data.data_dir = data_dir
    config.teacher.workdir = str(root / "pretrain")
    config.teacher.step = int(start_step)
    return config


def check_cm_configs(spec, root: pathlib.Path, data_dir: str,
                     pre: ml_collections.ConfigDict) -> None:
    """Every CM arm's config is valid and fits the pre-training as its teacher (the network the
    student copies, see ``train.build.check_teacher_config``): checked before anything trains.

    Raises:
      StudyError: naming the arm and the option.
    """
    from atdiff_jax.train.build import (CHAIN_KEYS, ConfigError, check_teacher_config,
                                        validate_config)
    for arm in spec.cm.arm_order:
        config = cm_arm_config(spec, arm, cm_arm_seeds(spec, arm)[0], root, data_dir, -1)
        try:
            validate_config(config)
            check_teacher_config(config, pre, str(root / "pretrain"))
        except ConfigError as e:
            raise StudyError(f"spec.cm.arms.{arm} (spec.cm.config {spec.cm.config!r}): {e}"
                             ) from None
        if cm_robustness_seeds(spec) and config.cm.kind == "lcm":
            raise StudyError(f"spec.cm.robustness: the robustness evaluation of consistency "
                             f"models covers Karras students (cm.kind 'cd' / 'ct'); "
                             f"spec.cm.arms.{arm} trains an LCM student")
        if cm_robustness_seeds(spec):
            diffs = [f"diffusion.{k}: {config.diffusion[k]!r} here, {pre.diffusion[k]!r} in the "
                     "pre-training" for k in CHAIN_KEYS if config.diffusion[k] != pre.diffusion[k]]
            if diffs:
                raise StudyError(f"spec.cm.config {spec.cm.config!r}: {'; '.join(diffs)} (the "
                                 "CM robustness attack takes its noise levels from the student's "
                                 "chain, which must be its teacher's)")


def _check_saved_config(workdir: pathlib.Path, config) -> None:
    """A workdir written with another config is not silently reused."""
    saved = workdir / "config.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    new = json.loads(config.to_json())
    for cfg in (old, new):
        cfg.get("train", {}).pop("num_minibatches", None)   # a run may be extended
        cfg.get("data", {}).pop("data_dir", None)           # and its data may move
    diff = _diff(old, new)
    if diff:
        raise StudyError(f"{workdir} was trained with another config ({'; '.join(diff[:5])}); "
                         "use another --root or delete that run")


def _diff(a, b, prefix=""):
    """Differences between the config on disk ``a`` and ``b``; options absent on disk (added to
    the library after that run was written) are not differences."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} on disk, {vb!r} now")
    return out


# ---------------------------------------------------------------------------------------------
# Stages


def _all_steps(workdir: pathlib.Path) -> list[int]:
    """The checkpointed steps of a run, ascending ([] when it has none yet)."""
    from atdiff_jax.train.checkpoint import checkpoint_dir, create_manager
    if not checkpoint_dir(workdir).is_dir():
        return []
    manager = create_manager(str(workdir), read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _latest_step(workdir: pathlib.Path) -> int | None:
    steps = _all_steps(workdir)
    return steps[-1] if steps else None


def _seed_dir(seed: int) -> str:
    """An evaluation cell's seed directory: ``seed<s>``, or ``start`` for the start checkpoint."""
    return f"seed{seed}" if seed >= 0 else "start"


def _seed_of(seed_dir: str) -> int:
    return -1 if seed_dir == "start" else int(seed_dir[len("seed"):])


def train_run(config, workdir: pathlib.Path) -> float:
    """Trains (or resumes, or skips a finished) run; returns the seconds spent.

    Raises:
      StudyInterrupted: the run was stopped (SIGTERM) before its last minibatch; its checkpoint
        is written and the next invocation resumes it.
    """
    from atdiff_jax.train.loop import train
    _check_saved_config(workdir, config)
    if _latest_step(workdir) == config.train.num_minibatches:
        return 0.0
    t0 = time.perf_counter()
    train(config, str(workdir))
    done = _latest_step(workdir)
    if done != config.train.num_minibatches:
        raise StudyInterrupted(f"{workdir} stopped at minibatch {done} of "
                               f"{config.train.num_minibatches}; rerun the same command to resume")
    return time.perf_counter() - t0


def gate(spec, root: pathlib.Path, data_dir: str, start_step: int) -> dict:
    """Quality of the starting checkpoint against the real-data floor (cached in gate.json)."""
    from atdiff_jax.eval.mnist_fd import real_data_floor
    from atdiff_jax.eval.report import evaluate_workdir
    g = spec.gate
    path = root / "gate.json"
    key = {"step": start_step, "sampler": g.sampler, "nfe": int(g.nfe),
           "num_samples": int(g.num_samples)}
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(cached.get(k) == v for k, v in key.items()):
            return cached
    res = evaluate_workdir(str(root / "pretrain"), metrics=("fd_mnist",), samplers=(g.sampler,),
                           nfes=(int(g.nfe),), num_samples=int(g.num_samples), step=start_step,
                           # the cells' batch: the same compiled sampler when the NFE is too
                           batch_size=int(spec.eval.batch_size), data_dir=data_dir, label="start",
                           out_file=root / "eval" / "gate_samples.json")
    row = res["rows"][0]
    # The floor at the same N: two disjoint sets of N real test images (N <= 5000).
    floor = real_data_floor(data_dir, num=min(int(g.num_samples), 5000))
    out = {**key, "fd_mnist": row["fd_mnist"], "confidence": row["confidence"],
           "frac_confident": row["frac_confident"], "floor": floor,
           "factor": row["fd_mnist"] / floor, "max_factor": float(g.max_factor),
           "min_confidence": float(g.min_confidence)}
    out["passed"] = bool(out["factor"] <= g.max_factor and out["confidence"] >= g.min_confidence)
    write_json(path, out)
    return out


def measure_step_seconds(configs: dict[str, ml_collections.ConfigDict], *, repeats: int = 5
                         ) -> dict[str, dict]:
    """Seconds per minibatch of each config's jitted train step, timed interleaved.

    Each is the train loop's own program (``loop.loop_train_step``; with a persistent
    compilation cache, which ``atdiff experiment`` keeps in ``<root>/jax_cache``, the arms' runs
    load it instead of compiling it again) from the run's initial state on its first minibatch. Every step is compiled first, then the configs take turns
    (``repeats`` rounds, one minibatch each) so that load changes on a shared machine hit all of
    them alike; the median is kept.
    """
    import jax

    from atdiff_jax.train.loop import loop_train_step

    steps, times = {}, {name: [] for name in configs}
    for name, config in configs.items():
        fn, state, batch = loop_train_step(config)
        state, m = fn(state, batch)       # compile + one warm-up minibatch
        jax.block_until_ready(m)
        steps[name] = [fn, state, batch]
    for _ in range(repeats):
        for name, entry in steps.items():
            fn, state, batch = entry
            t = time.perf_counter()
            state, m = fn(state, batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t)
            entry[1] = state
    return {name: {"s_per_minibatch": float(np.median(t)), "times": t}
            for name, t in times.items()}


def timing(spec, root: pathlib.Path, data_dir: str, start_step: int) -> dict:
    path = root / "timing.json"
    if path.is_file():
        return json.loads(path.read_text())
    configs = {arm: arm_config(spec, arm, spec.seeds[0], root, data_dir, start_step)
               for arm in (spec.wallclock.baseline, spec.wallclock.arm)}
    out = {"arms": measure_step_seconds(configs, repeats=int(spec.wallclock.repeats))}
    write_json(path, out)
    return out


def wallclock_step(spec, timing_result: dict) -> int:
    """Minibatches of the reference (clean) run that take as long as the AT arm's N minibatches."""
    wc, arms = spec.wallclock, timing_result["arms"]
    n_at = int(spec.finetune.num_minibatches) * int(spec.arms[wc.arm].get("minibatch_factor", 1))
    return int(round(n_at * arms[wc.arm]["s_per_minibatch"]
                     / arms[wc.baseline]["s_per_minibatch"]))


def _nearest(steps: Sequence[int], target: int) -> int:
    return min(steps, key=lambda s: (abs(s - target), s))


def evaluate(spec, root: pathlib.Path, run: Run, data_dir: str, *, cm: bool = False
             ) -> list[pathlib.Path]:
    """All evaluation cells of one run (skipping those on disk); returns their files.

    A DPM run: every sampler of ``spec.eval.samplers`` at every NFE of ``spec.eval.nfes``; a CM
    run (``cm``): every sampler of ``spec.cm.samplers`` at its NFEs of ``spec.cm.nfes``
    (``render.cm_nfes``). Both with the evaluation seeds and sizes of ``spec.eval``.
    """
    from atdiff_jax.eval.report import evaluate_workdir
    e = spec.eval
    if cm:
        cells = [(s, cm_nfes(spec.cm, s)) for s in spec.cm.samplers]
        robust = run.seed in cm_robustness_seeds(spec)
        robust_cell = ("cm_onestep", 1)   # the clean cell written beside the robustness rows
    else:
        cells = [(s, tuple(int(n) for n in e.nfes)) for s in e.samplers]
        robust = e.robustness and (run.seed < 0 or run.seed in tuple(e.robustness_seeds))
        robust_cell = ("ddim", 10)
    files = []
    base = root / "eval" / run.label / _seed_dir(run.seed)
    for sampler, nfes in cells:
        for k in e.seeds:
            path = base / f"{sampler}_e{k}.json"
            files.append(path)
            if path.is_file() and json.loads(path.read_text()).get("step") == run.step:
                continue
            logging.info("experiment: evaluating %s seed %d step %d: %s, eval seed %d",
                         run.label, run.seed, run.step, sampler, k)
            evaluate_workdir(run.workdir, metrics=("fd_mnist",), samplers=(sampler,),
                             nfes=nfes, num_samples=int(e.num_samples),
                             seed=int(k), step=run.step, data_dir=data_dir,
                             batch_size=int(e.batch_size), label=run.label, out_file=path,
                             save_features=True)
    if robust:
        path = base / "robustness.json"
        files.append(path)
        if not (path.is_file() and json.loads(path.read_text()).get("step") == run.step):
            logging.info("experiment: robustness of %s seed %d", run.label, run.seed)
            evaluate_workdir(run.workdir, metrics=("robustness",), samplers=robust_cell[:1],
                             nfes=robust_cell[1:], num_samples=2, seed=0, step=run.step,
                             data_dir=data_dir, batch_size=int(e.batch_size), label=run.label,
                             robustness_t=tuple(e.robustness_t),
                             robustness_radii=tuple(e.robustness_radii),
                             robustness_pgd_steps=int(e.get("robustness_pgd_steps", 10)),
                             robustness_images=int(e.robustness_images),
                             robustness_sizes=tuple(e.robustness_sizes),
                             robustness_samples=int(e.robustness_samples),
                             robustness_nfe=int(e.get("robustness_nfe", 10)), out_file=path)
    return files


def cell_floor(data_dir: str, num: int, draws: int = 5) -> dict:
    """fd_mnist of ``num`` real *training* images against the evaluation's reference (test
    images), for ``draws`` random subsets: what a perfect generator scores in one evaluation cell
    of ``num`` samples (the gate's floor is two sets of N; this one matches the cells)."""
    from atdiff_jax.eval.fid import frechet_distance
    from atdiff_jax.eval.mnist_fd import reference_stats
    from atdiff_jax.eval.report import mnist_reference
    ref = mnist_reference(data_dir)
    vals = [float(frechet_distance(*reference_stats(data_dir, "train", num, seed=k), *ref))
            for k in range(draws)]
    return {"num_samples": int(num), "draws": int(draws), **mean_std(vals)}


# ---------------------------------------------------------------------------------------------
# The evaluation cells on disk


def collect_rows(root: pathlib.Path) -> list[dict]:
    """Every evaluation cell on disk as flat rows (see ``stats.py``); a cell with saved features
    gives its rows ``features_file``, the features file's path relative to ``root``."""
    rows = []
    for path in sorted((root / "eval").glob("*/*/*_e*.json")):
        res = json.loads(path.read_text())
        seed = _seed_of(path.parent.name)
        eval_seed = int(path.stem.rsplit("_e", 1)[1])
        feats = {}
        if res.get("features_file"):
            feats = {"features_file": str((path.parent / res["features_file"]).relative_to(root))}
        for r in res["rows"]:
            rows.append({"label": path.parent.parent.name, "seed": seed, "eval_seed": eval_seed,
                         "step": res["step"], **r, **feats})
    return rows


def row_features(root: pathlib.Path):
    """``row -> float32 [N, 128]`` features of a row's samples (None for a cell evaluated before
    features were saved), for ``stats.bootstrap_differences``."""
    def load(row: dict):
        if "features_file" not in row:
            return None
        with np.load(root / row["features_file"]) as f:
            key = f"{row['sampler']}_{row['nfe']}"
            return f[key] if key in f.files else None
    return load


def robustness_rows(root: pathlib.Path) -> list[dict]:
    """Every robustness result on disk, with its label and training seed."""
    out = []
    for path in sorted((root / "eval").glob("*/*/robustness.json")):
        res = json.loads(path.read_text())
        out.append({"label": path.parent.parent.name, "seed": _seed_of(path.parent.name),
                    **res["robustness"]})
    return out


# ---------------------------------------------------------------------------------------------
# Driver


class _StopFlag:
    """SIGTERM between stages: finish the current unit of work (a training run checkpoints at
    its next step, an evaluation cell is written), then stop with :class:`StudyInterrupted`."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: stopping after the current stage")
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise StudyInterrupted("SIGTERM received; everything finished so far is kept, "
                                   "rerun the same command to resume")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run_experiment(spec: ml_collections.ConfigDict, root: str | os.PathLike, *,
                   until: str = "report") -> pathlib.Path:
    """Runs (or resumes) the experiment ``spec`` in ``root``; returns the report's path.

    ``until``: stop after this stage ("pretrain", "gate", "arms" = every seed's arms and
    evaluations, "report"). SIGTERM stops it cleanly at the next stage boundary (a training run
    at its next step, with a checkpoint) with :class:`StudyInterrupted`.
    """
    with _StopFlag() as stop:
        return _run(spec, root, until, stop)


def _run(spec, root, until: str, stop: _StopFlag) -> pathlib.Path:
    from atdiff_jax.data.mnist import check_prepared, prepare_mnist
    validate_spec(spec)
    if until not in ("pretrain", "gate", "arms", "report"):
        raise StudyError(f"until must be pretrain|gate|arms|report, got {until!r}")
    if "://" in os.fspath(root):
        raise StudyError("the experiment root must be a local directory (or a mounted file "
                         f"system), got {os.fspath(root)!r}")
    root = pathlib.Path(root).absolute()
    cm = cm_spec(spec)
    data_dir = spec.data_dir or str(root / "data")
    pre = pretrain_config(spec, root, data_dir)
    if cm is not None:
        check_cm_configs(spec, root, data_dir, pre)   # before hours of DPM training
    root.mkdir(parents=True, exist_ok=True)
    if check_prepared(data_dir) is not None:
        prepare_mnist(data_dir)
    wall = _load_wall(root)

    # 1. pre-training
    secs = train_run(pre, root / "pretrain")
    stop.check()
    if secs:
        wall["pretrain"] = wall.get("pretrain", 0.0) + secs
        _save_wall(root, wall)
    steps = _all_steps(root / "pretrain")
    start = steps[-1] if spec.pretrain.start_step == -1 else int(spec.pretrain.start_step)
    if start not in steps:
        raise StudyError(f"spec.pretrain.start_step={start} is not a checkpoint of "
                         f"{root / 'pretrain'} (has {steps})")
    if until == "pretrain":
        return root
    # 2. quality gate of the start
    g = gate(spec, root, data_dir, start)
    stop.check()
    logging.info("experiment: start step %d: fd_mnist %.3f (%.1f x floor %.3f), confidence %.3f",
                 start, g["fd_mnist"], g["factor"], g["floor"], g["confidence"])
    if spec.gate.require and not g["passed"]:
        raise StudyError(f"the start checkpoint (step {start}) fails the quality gate: fd_mnist "
                         f"{g['fd_mnist']:.3f} = {g['factor']:.1f} x floor (max "
                         f"{spec.gate.max_factor}), confidence {g['confidence']:.3f} (min "
                         f"{spec.gate.min_confidence}); pre-train longer")
    if until == "gate":
        return root
    labels = ["start", *spec.arm_order]
    extra: dict[str, Any] = {"gate": g, "wall": wall,
                             "cell_floor": cell_floor(data_dir, int(spec.eval.num_samples))}
    runs_start = Run("start", -1, str(root / "pretrain"), start)
    evaluate(spec, root, runs_start, data_dir)
    stop.check()
    # 3. timing (for the equal wall-clock comparison)
    if spec.wallclock.enabled:
        extra["timing"] = timing(spec, root, data_dir, start)
        extra["wallclock_target"] = wallclock_step(spec, extra["timing"])
        labels.append(f"{spec.wallclock.reference}@wallclock")
    # 4./5. arms and their evaluation, seed by seed
    for seed in spec.seeds:
        for arm in spec.arm_order:
            if seed not in tuple(spec.arms[arm].get("seeds", spec.seeds)):
                continue
            workdir = _train_and_evaluate(
                spec, root, arm_config(spec, arm, seed, root, data_dir, start),
                root / "arms" / arm / f"seed{seed}", arm, seed, data_dir, wall, stop)
            if spec.wallclock.enabled and arm == spec.wallclock.reference:
                step = _nearest(_all_steps(workdir), extra["wallclock_target"])
                extra["wallclock_step"] = step
                evaluate(spec, root, Run(f"{arm}@wallclock", seed, str(workdir), step), data_dir)
        # 4b./5b. consistency distillation from the start checkpoint, and its evaluation
        for arm in (cm.arm_order if cm is not None else ()):
            if seed not in cm_arm_seeds(spec, arm):
                continue
            _train_and_evaluate(spec, root, cm_arm_config(spec, arm, seed, root, data_dir, start),
                                root / "cm" / arm / f"seed{seed}", arm, seed, data_dir, wall,
                                stop, cm=True)
        _report(spec, root, labels, extra, data_dir)
    return _report(spec, root, labels, extra, data_dir)


def _train_and_evaluate(spec, root: pathlib.Path, config, workdir: pathlib.Path, arm: str,
                        seed: int, data_dir: str, wall: dict, stop, *, cm: bool = False
                        ) -> pathlib.Path:
    """Trains (resumes, or skips) one arm's run of ``seed`` in ``workdir``, adds its seconds to
    ``wall`` (saved), then evaluates its last checkpoint; ``stop`` is checked after each."""
    secs = train_run(config, workdir)
    if secs:
        wall[f"{arm}/seed{seed}"] = wall.get(f"{arm}/seed{seed}", 0.0) + secs
        _save_wall(root, wall)
    stop.check()
    evaluate(spec, root, Run(arm, seed, str(workdir), config.train.num_minibatches), data_dir,
             cm=cm)
    stop.check()
    return workdir


def _report(spec, root: pathlib.Path, labels: list[str], extra: dict, data_dir: str
            ) -> pathlib.Path:
    """The report of every evaluation cell on disk."""
    rows = collect_rows(root)
    draws = int(spec.eval.get("bootstrap", DEFAULT_BOOTSTRAP))
    boot = None
    if draws:
        from atdiff_jax.eval.report import mnist_reference
        t0 = time.perf_counter()
        boot = bootstrap_differences(rows, comparisons(spec, labels), row_features(root),
                                     mnist_reference(data_dir), draws=draws)
        logging.info("experiment: bootstrap (%d resamples) in %.1f s", draws,
                     time.perf_counter() - t0)
    return write_report(spec, root, labels, rows=rows, robustness=robustness_rows(root),
                        extra=extra, bootstrap=boot)


def _load_wall(root: pathlib.Path) -> dict:
    path = root / "wall_seconds.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_wall(root: pathlib.Path, wall: dict) -> None:
    write_json(root / "wall_seconds.json", wall)


def load_spec(path: str) -> ml_collections.ConfigDict:
    spec = _load_config(path)
    validate_spec(spec)
    return spec
