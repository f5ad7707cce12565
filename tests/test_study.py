"""`atdiff experiment` (atdiff_jax.experiment): fine-tuning from a run, the smoke experiment end to
end, resuming it, and bad specs."""
import json
import pathlib
import runpy
import shutil

import jax
import numpy as np
import pytest

from atdiff_jax import experiment as study
from atdiff_jax.train.build import ConfigError

ROOT = pathlib.Path(__file__).parent.parent
SMOKE = ROOT / "configs" / "experiments" / "smoke.py"


def smoke_spec(data_dir):
    """The smoke spec cut to the arms the equal wall-clock comparison needs, one seed, one
    sampler (the whole smoke spec runs in test_full_smoke_experiment_from_the_cli, slow)."""
    spec = runpy.run_path(str(SMOKE))["get_config"]()
    spec.data_dir = str(data_dir)
    spec.arm_order = ("clean", "fast_at", "clean_kx")
    spec.seeds = (0,)
    spec.finetune.checkpoints = 6        # clean_kx: a checkpoint after every minibatch
    spec.gate.nfe = 3                    # one compiled sampler for the gate and the cells
    spec.eval.samplers = ("ddim",)
    spec.eval.nfes = (3,)
    spec.eval.robustness = False         # covered by test_robustness / test_eval_report
    spec.cm.enabled = False              # the CM stage: test_cm_stage_* below
    return spec


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, mnist_data_dir):
    root = tmp_path_factory.mktemp("study") / "exp"
    spec = smoke_spec(mnist_data_dir)
    report = study.run_experiment(spec, root)
    return spec, root, report


def test_smoke_experiment_writes_every_stage(smoke):
    spec, root, report = smoke
    from atdiff_jax.train.loop import restore_state
    # pre-training, then each arm continued from its last checkpoint for N x factor minibatches
    pre, _ = restore_state(str(root / "pretrain"))
    assert int(pre.step) == 4
    for arm, n, updates in (("clean", 2, 2), ("fast_at", 2, 6), ("clean_kx", 6, 6)):
        state, config = restore_state(str(root / "arms" / arm / "seed0"))
        assert (int(state.step), int(state.updates)) == (n, updates), arm
        assert config.init.workdir == str(root / "pretrain") and config.init.step == 4
        assert config.seed == spec.finetune.base_seed
    # the quality gate compares the start with the real-data floor at the same N
    gate = json.loads((root / "gate.json").read_text())
    assert gate["step"] == 4 and gate["num_samples"] == spec.gate.num_samples
    assert gate["floor"] > 0 and gate["factor"] == pytest.approx(gate["fd_mnist"] / gate["floor"])
    assert gate["passed"] is False   # a 4-minibatch model makes no digits
    # equal wall-clock: clean_kx read at the checkpoint nearest N * t(fast) / t(clean)
    timing = json.loads((root / "timing.json").read_text())["arms"]
    ratio = timing["fast_at"]["s_per_minibatch"] / timing["clean"]["s_per_minibatch"]
    assert 1.2 < ratio < 6, ratio  # K=3 updates per minibatch (one backward each)
    assert set(timing) == {"clean", "fast_at"}
    results = json.loads((root / "results.json").read_text())
    assert results["wallclock_target"] == round(2 * ratio)
    assert results["wallclock_step"] == min(results["wallclock_target"], 6)
    # one evaluation cell per (run, sampler, eval seed), with finite metrics
    labels = {r["label"] for r in results["rows"]}
    assert labels == {"start", "clean", "fast_at", "clean_kx", "clean_kx@wallclock"}
    for r in results["rows"]:
        assert r["nfe"] == 3 and r["num_samples"] == spec.eval.num_samples
        assert np.isfinite(r["fd_mnist"]) and 0 < r["confidence"] <= 1
    # the arms are different models: same x_T, different samples and scores
    fd = {r["label"]: r["fd_mnist"] for r in results["rows"]}
    if results["wallclock_step"] == 6:   # the whole clean_kx run: the same model
        assert fd.pop("clean_kx@wallclock") == fd["clean_kx"]
    assert len({round(v, 6) for v in fd.values()}) == len(fd), fd
    text = report.read_text()
    assert "| ddim | fast_at |" in text and "Equal wall-clock" in text
    # the paired differences: every arm against clean, AT against equal updates / wall-clock
    assert set(results["paired"]) == {"fast_at|clean", "clean_kx|clean",
                                      "clean_kx@wallclock|clean", "fast_at|clean_kx",
                                      "fast_at|clean_kx@wallclock"}
    d = results["paired"]["fast_at|clean"]["ddim|3"]
    assert d["mean"] == pytest.approx(100 * (fd["fast_at"] - fd["clean"]) / fd["clean"])
    assert d["wins"] == int(fd["fast_at"] < fd["clean"]) and d["n"] == 1
    assert "| fast_at vs clean_kx@wallclock | ddim |" in text
    # the bootstrap over each cell's saved features (spec.eval.bootstrap resamples)
    assert d["bootstrap_draws"] == spec.eval.bootstrap == 20
    lo, hi = d["boot95"]
    assert lo <= hi and f"{{{lo:+.1f}, {hi:+.1f}}} [{d['wins']}/1]" in text
    assert "{lo, hi}: the 95% bootstrap interval over the generated samples" in text
    assert "No bootstrap interval" not in text
    feats = np.load(root / "eval" / "fast_at" / "seed0" / "ddim_e0.features.npz")["ddim_3"]
    assert feats.shape == (spec.eval.num_samples, 128)
    # the floor of one cell: N real training images against the same reference, 5 draws
    floor = results["cell_floor"]
    assert floor["num_samples"] == spec.eval.num_samples and floor["n"] == 5
    assert min(floor["values"]) > 0 and len(set(floor["values"])) == 5
    assert f"{floor['mean']:.3f} ± {floor['std']:.3f}" in text
    assert (root / "fd_mnist_vs_nfe.png").stat().st_size > 1000
    wall = json.loads((root / "wall_seconds.json").read_text())
    assert set(wall) == {"pretrain", "clean/seed0", "fast_at/seed0", "clean_kx/seed0"}


def test_arms_start_from_the_pretrained_params_and_ema(smoke):
    """An arm's first update starts from the start checkpoint's params; its EMA from its EMA."""
    spec, root, _ = smoke
    from atdiff_jax.train.loop import load_init_run, restore_state
    from atdiff_jax.train.state import ema_key
    pre, pre_config = restore_state(str(root / "pretrain"))
    config = study.arm_config(spec, "clean", 0, root, spec.data_dir, 4)
    params, ema = load_init_run(config)
    rate = ema_key(pre_config.train.ema_rates[0])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(pre.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(pre.ema[rate])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(ema)))


def test_rerun_reuses_everything_and_redoes_only_what_is_missing(smoke):
    spec, root, _ = smoke
    cells = sorted((root / "eval").glob("*/*/*.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in cells}
    # an interrupted evaluation (a missing cell) and an arm cut short (its last checkpoint lost)
    lost_cell = root / "eval" / "fast_at" / "seed0" / "ddim_e0.json"
    lost_cell.unlink()
    shutil.rmtree(root / "arms" / "clean" / "seed0" / "checkpoints" / "2")
    study.run_experiment(spec, root)
    from atdiff_jax.train.loop import restore_state
    state, _ = restore_state(str(root / "arms" / "clean" / "seed0"))
    assert int(state.step) == 2   # resumed from checkpoint 1 and finished
    assert lost_cell.is_file()
    # Nothing else was recomputed: cells are keyed by checkpoint step, and the resumed clean arm
    # ends at the same step with the same params (resuming is exact).
    redone = {p for p in cells if p != lost_cell and p.stat().st_mtime_ns != mtimes[p]}
    assert redone == set(), redone


def test_paired_differences_pair_training_seeds_and_count_wins():
    rows = []
    for seed, (clean, at) in enumerate([(2.0, 1.5), (4.0, 5.0), (1.0, 0.9)]):
        for label, v in (("clean", clean), ("fast_at", at)):
            # two evaluation seeds per run: the per-seed value is their mean
            rows += [{"label": label, "seed": seed, "eval_seed": e, "sampler": "ddim", "nfe": 5,
                      "fd_mnist": v + d} for e, d in ((0, -0.1), (1, 0.1))]
    rows.append({"label": "fast_at", "seed": 3, "eval_seed": 0, "sampler": "ddim", "nfe": 5,
                 "fd_mnist": 9.0})   # no clean run of seed 3: not paired
    d = study.paired_differences(rows, "fd_mnist", "fast_at", "clean")
    assert set(d) == {("ddim", 5)}
    rel = [-25.0, 25.0, -10.0]
    assert d["ddim", 5]["values"] == pytest.approx(rel)
    assert d["ddim", 5]["mean"] == pytest.approx(np.mean(rel))
    assert d["ddim", 5]["std"] == pytest.approx(np.std(rel, ddof=1))
    assert (d["ddim", 5]["n"], d["ddim", 5]["wins"]) == (3, 2)
    # 95% interval over the 3 seeds: Student's t quantile t(0.975, 2) = 4.302653
    half = 4.302653 * np.std(rel, ddof=1) / np.sqrt(3)
    assert d["ddim", 5]["ci95"] == pytest.approx([np.mean(rel) - half, np.mean(rel) + half],
                                                 rel=1e-6)
    assert study.mean_std([1.0])["ci95"] is None
    # the report's cell: mean ± std (95% interval) [wins/n]
    from atdiff_jax.experiment.render import _fmt_diff
    assert _fmt_diff(d["ddim", 5]) == "-3.3 ± 25.7 (-67.1, +60.4) [2/3]"
    assert _fmt_diff({**study.mean_std([4.0]), "wins": 1}) == "+4.0 [1/1]"
    up = study.paired_differences(rows, "fd_mnist", "fast_at", "clean", lower_is_better=False)
    assert up["ddim", 5]["wins"] == 1
    # summarize: per-arm mean +- std over training seeds of the eval-seed means
    s = study.summarize(rows, "fd_mnist")
    assert s["fast_at", "ddim", 5]["values"] == pytest.approx([1.5, 5.0, 0.9, 9.0])
    assert s["clean", "ddim", 5]["std"] == pytest.approx(np.std([2.0, 4.0, 1.0], ddof=1))


def _gaussian_cells(seeds=3, n=300, dim=8, shift=0.5):
    """Synthetic features: the target N(0, I) (from 20,000 draws) and, per seed, n samples of a
    model N(shift * 1, I), whose fd to the target is about dim * shift^2."""
    rng = np.random.default_rng(123)
    from atdiff_jax.eval.fid import feature_statistics
    target = feature_statistics(rng.normal(size=(20000, dim)))
    return target, [rng.normal(size=(n, dim)) + shift for _ in range(seeds)], rng


def test_paired_bootstrap_over_the_generated_set():
    from atdiff_jax.eval.fid import feature_statistics, frechet_distance
    from atdiff_jax.experiment.render import _fmt_diff
    from atdiff_jax.experiment.stats import bootstrap_fd, bootstrap_indices
    target, ref, rng = _gaussian_cells()
    # The same model, other samples: the interval holds 0; its width is the sampling noise of
    # the sample means, 2 * 1.96 * sqrt(2 / 3) * 2|m| / sqrt(n) / |m|^2 = 26% here.
    same = [rng.normal(size=x.shape) + 0.5 for x in ref]
    b = study.paired_bootstrap(same, ref, target, draws=200)
    lo, hi = b["boot95"]
    assert b["draws"] == 200 and lo < 0 < hi and 15 < hi - lo < 40, b
    # an arm further from the target (mean 0.7: fd ~ 3.9 against ~2) or nearer (0.3: ~0.7)
    worse = study.paired_bootstrap([x + 0.2 for x in ref], ref, target, draws=200)["boot95"]
    better = study.paired_bootstrap([x - 0.2 for x in ref], ref, target, draws=200)["boot95"]
    assert 80 < worse[0] < worse[1] < 115 and -75 < better[0] < better[1] < -50, (worse, better)
    # Paired: an arm equal to its reference up to a tiny perturbation has a tiny interval; with
    # independent resamples of the two (unpaired) the same data give a 100x wider one.
    near = [x + 1e-3 * rng.normal(size=x.shape) for x in ref]
    lo, hi = study.paired_bootstrap(near, ref, target, draws=200)["boot95"]
    idx_a, idx_b = (bootstrap_indices(300, 200, 0, (k,)) for k in (0, 1))
    unpaired = np.percentile(100 * (bootstrap_fd(near[0], target, idx_a)
                                    / bootstrap_fd(ref[0], target, idx_b) - 1), [2.5, 97.5])
    assert hi - lo < 0.05 and unpaired[1] - unpaired[0] > 100 * (hi - lo), (lo, hi, unpaired)
    # reproducible from its seed; another seed, other resamples
    again = study.paired_bootstrap(near, ref, target, draws=200)["boot95"]
    assert again == [lo, hi]
    assert study.paired_bootstrap(near, ref, target, draws=200, seed=1)["boot95"] != [lo, hi]
    # the definition, with the exact frechet_distance: percentiles of the mean over seeds
    arm = [x + 0.2 for x in ref]
    fd = lambda x: frechet_distance(*feature_statistics(x), *target)  # noqa: E731
    rel = [[100 * (fd(a[i]) - fd(r[i])) / fd(r[i]) for i in bootstrap_indices(300, 7, 5, (j,))]
           for j, (a, r) in enumerate(zip(arm, ref))]
    want = np.percentile(np.mean(rel, axis=0), [2.5, 97.5])
    got = study.paired_bootstrap(arm, ref, target, draws=7, seed=5)["boot95"]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    with pytest.raises(ValueError, match="not paired"):
        study.paired_bootstrap([ref[0][:-1]], [ref[0]], target, draws=2)
    # the report's cell: mean ± std (t interval) {bootstrap interval} [wins/n]
    cell = {**study.mean_std([-25.0, 25.0, -10.0]), "wins": 2, "boot95": [-5.04, 1.2]}
    assert _fmt_diff(cell) == "-3.3 ± 25.7 (-67.1, +60.4) {-5.0, +1.2} [2/3]"
    one = {**study.mean_std([4.0]), "wins": 1, "boot95": [2, 6]}
    assert _fmt_diff(one) == "+4.0 {+2.0, +6.0} [1/1]"


def test_bootstrap_differences_of_rows_resample_each_run_once():
    target, ref, rng = _gaussian_cells(seeds=2)
    feats = {("clean", s): x for s, x in enumerate(ref)}
    feats.update({("fast_at", s): x + 0.2 for s, x in enumerate(ref)})
    feats.update({("ddpm_ip", s): x - 0.1 for s, x in enumerate(ref)})
    rows = [{"label": lb, "seed": s, "eval_seed": 0, "sampler": "ddim", "nfe": 5,
             "num_samples": 300, "fd_mnist": 1.0} for lb, s in feats]
    # a second cell whose fast_at features were not saved (evaluated by an older version)
    rows += [dict(r, nfe=10) for r in rows]
    loads = []

    def features(row):
        loads.append((row["label"], row["seed"], row["nfe"]))
        return None if (row["label"], row["nfe"]) == ("fast_at", 10) else feats[row["label"],
                                                                                row["seed"]]

    out = study.bootstrap_differences(rows, [("fast_at", "clean"), ("ddpm_ip", "clean")],
                                      features, target, draws=50)
    want = study.paired_bootstrap([feats["fast_at", s] for s in (0, 1)], ref, target, draws=50,
                                  keys=[(1,), (2,)])
    assert out["fast_at", "clean"] == {("ddim", 5): want}
    assert set(out["ddpm_ip", "clean"]) == {("ddim", 5), ("ddim", 10)}
    assert out["ddpm_ip", "clean"]["ddim", 5]["boot95"][1] < 0
    assert len(loads) == len(set(loads)) == 11   # clean's runs once for both comparisons


def test_report_says_which_cells_have_no_bootstrap(tmp_path):
    """Cells evaluated before features were saved: the report still renders, without their
    bootstrap bracket, and says so; results.json has boot95 None there."""
    target, ref, _ = _gaussian_cells(seeds=1)
    rows = [{"label": lb, "seed": 0, "eval_seed": 0, "sampler": "ddim", "nfe": nfe,
             "num_samples": 300, "fd_mnist": fd, "confidence": 0.5}
            for nfe in (5, 10) for lb, fd in (("clean", 2.0), ("fast_at", 1.0))]
    feats = {"clean": ref[0], "fast_at": ref[0] - 0.1}
    boot = study.bootstrap_differences(
        rows, [("fast_at", "clean")],
        lambda r: feats[r["label"]] if r["nfe"] == 5 else None, target, draws=10)
    spec = smoke_spec(tmp_path)
    study.write_report(spec, tmp_path, ["clean", "fast_at"], rows=rows, robustness=[],
                       extra={}, bootstrap=boot)
    text = (tmp_path / "report.md").read_text()
    lo, hi = boot["fast_at", "clean"]["ddim", 5]["boot95"]
    row = f"| fast_at vs clean | ddim | -50.0 {{{lo:+.1f}, {hi:+.1f}}} [1/1] | -50.0 [1/1] |"
    assert row in text
    assert "No bootstrap interval in 1 cell(s)" in text
    paired = json.loads((tmp_path / "results.json").read_text())["paired"]["fast_at|clean"]
    assert paired["ddim|10"]["boot95"] is None and paired["ddim|5"]["bootstrap_draws"] == 10


def test_at_effect_spec_removes_the_sampler_confound_and_sweeps_the_radius(tmp_path):
    """configs/experiments/mnist_at_effect.py (issue 17): every arm with uniform t, 2,000
    fine-tuning minibatches (clean_kx 3x), fast AT at radius 0.05/0.1/0.2/0.4 with step = radius;
    only the arms' own options differ."""
    spec = study.load_spec(str(ROOT / "configs" / "experiments" / "mnist_at_effect.py"))  # valid
    assert tuple(spec.seeds) == (0, 1, 2)
    configs = {arm: study.arm_config(spec, arm, 0, tmp_path, "data", 10000)
               for arm in spec.arm_order}
    assert {a: c.diffusion.schedule_sampler for a, c in configs.items()} == dict.fromkeys(
        spec.arm_order, "uniform")
    assert {a: c.train.num_minibatches for a, c in configs.items()} == {
        **dict.fromkeys(spec.arm_order, 2000), "clean_kx": 6000}
    radii = {a: (c.adv.max_norm, c.adv.step_size) for a, c in configs.items()
             if c.adv.kind == "fast"}
    assert radii == {"fast_at": (0.1, 0.1), "fast_at_r005": (0.05, 0.05),
                     "fast_at_r02": (0.2, 0.2), "fast_at_r04": (0.4, 0.4)}
    ref = configs["fast_at"].to_dict()
    for arm in ("fast_at_r005", "fast_at_r02", "fast_at_r04"):
        other = configs[arm].to_dict()
        other["adv"].update(max_norm=0.1, step_size=0.1)
        assert other == ref, arm
    assert configs["clean"].adv.kind == "none" and configs["ddpm_ip"].diffusion.input_perturb == 0.1


def test_bad_specs_name_the_field(mnist_data_dir, tmp_path):
    spec = smoke_spec(mnist_data_dir)
    spec.arm_order = ("clean", "nonsense")
    with pytest.raises(study.StudyError, match="spec.arm_order names arms without"):
        study.validate_spec(spec)
    spec = smoke_spec(mnist_data_dir)
    spec.arms.clean.overrides.adv.kindd = "none"
    with pytest.raises(study.StudyError, match="unknown config option 'adv.kindd'"):
        study.arm_config(spec, "clean", 0, tmp_path, str(mnist_data_dir), 4)
    spec = smoke_spec(mnist_data_dir)
    spec.eval.samplers = ("ddim", "heun")
    with pytest.raises(study.StudyError, match="spec.eval.samplers must be from"):
        study.validate_spec(spec)
    for bad in (-1, 2.5, True):
        spec = smoke_spec(mnist_data_dir)
        del spec.eval["bootstrap"]          # an int field takes no float
        spec.eval.bootstrap = bad
        with pytest.raises(study.StudyError, match=r"spec.eval.bootstrap must be an integer >= 0"):
            study.validate_spec(spec)
    spec = smoke_spec(mnist_data_dir)
    spec.wallclock.reference = "pgd_at"   # not in this arm_order
    with pytest.raises(study.StudyError, match="spec.wallclock.reference='pgd_at'"):
        study.validate_spec(spec)
    with pytest.raises(study.StudyError, match=r"root must be a local directory \(or a mounted file system\), got 'gs://b/x'"):
        study.run_experiment(smoke_spec(mnist_data_dir), "gs://b/x")
    assert not (pathlib.Path.cwd() / "gs:").exists()


def test_a_run_written_with_another_config_is_not_reused(smoke):
    spec, root, _ = smoke
    other = smoke_spec(spec.data_dir)
    other.arms.clean.overrides.optim = {"lr": 5e-4}
    with pytest.raises(study.StudyError, match=r"optim.lr: 0.002 on disk, 0.0005 now"):
        study.run_experiment(other, root)


def test_init_workdir_errors(smoke, tmp_path):
    spec, root, _ = smoke
    from atdiff_jax.train.build import validate_config
    from atdiff_jax.train.loop import load_init_run
    config = study.arm_config(spec, "clean", 0, root, spec.data_dir, 4)
    config.init.step = 3
    with pytest.raises(ConfigError, match="cannot restore step 3"):
        load_init_run(config)
    config.init.step = 4
    config.model.num_channels = 16
    with pytest.raises(ConfigError, match="model.num_channels: 16 here, 32 in the source run"):
        load_init_run(config)
    config = study.arm_config(spec, "clean", 0, root, spec.data_dir, 4)
    config.init.checkpoint = "x.pt"
    with pytest.raises(ConfigError, match="init.workdir and config.init.checkpoint both set"):
        validate_config(config)
    config = study.arm_config(spec, "clean", 0, tmp_path, spec.data_dir, 4)  # no such run
    with pytest.raises(ConfigError, match=r"cannot restore step 4: no checkpoint step 4 in .*; "
                                          r"available: \[\]"):
        load_init_run(config)
    config.init.step = -1
    with pytest.raises(ConfigError, match="cannot restore the newest checkpoint"):
        load_init_run(config)


@pytest.mark.slow
def test_full_smoke_experiment_from_the_cli(tmp_path, mnist_data_dir):
    """configs/experiments/smoke.py as it is (all arms, two seeds, two samplers, robustness, the
    CM stage) through `atdiff experiment`; a SIGTERM mid-run exits 3 and the rerun finishes
    it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    root = tmp_path / "exp"
    cmd = [sys.executable, "-m", "atdiff_jax.cli", "experiment", f"--spec={SMOKE}",
           f"--root={root}", f"--spec.data_dir={mnist_data_dir}"]
    # without the suite's compilation cache: `atdiff experiment` keeps its own in <root>
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    target = root / "arms" / "fast_at" / "seed0" / "config.json"
    while not target.exists() and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)   # while fast_at trains: it checkpoints and stops
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-2000:]
    assert "rerun the same command to resume" in err
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any((root / "jax_cache").iterdir())   # the experiment's compilation cache
    results = json.loads((root / "results.json").read_text())
    arms = {"clean", "ddpm_ip", "fast_at", "clean_kx", "pgd_at", "clean_kx@wallclock"}
    # the CM stage: CD clean and CD + fast AT on both seeds, the clean-teacher ablation on seed 0
    cm_runs = {(a, s) for a in ("cd_clean", "cd_at") for s in (0, 1)} | {
        ("cd_at_teacher_clean", 0)}
    runs = ({("start", -1)} | {(a, s) for a in arms for s in (0, 1) if a != "pgd_at"}
            | {("pgd_at", 0)})
    assert {(r["label"], r["seed"]) for r in results["rows"]} == runs | cm_runs
    assert {r["sampler"] for r in results["rows"]} == {"ddim", "dpm_solver", "cm_onestep",
                                                       "cm_multistep"}
    assert {(r["label"], r["seed"]) for r in results["robustness"]} == runs | cm_runs
    assert {(r["sampler"], r["nfe"]) for r in results["rows"] if r["label"] == "cd_at"} == {
        ("cm_onestep", 1), ("cm_multistep", 2), ("cm_multistep", 4)}
    assert set(results["cm"]["paired"]) == {"cd_at|cd_clean", "cd_at_teacher_clean|cd_clean"}
    assert results["cm"]["paired"]["cd_at|cd_clean"]["cm_multistep|4"]["n"] == 2
    # robustness under sampling: mean ± std over the two training seeds of an arm
    rob = {(r["label"], r["seed"]): r["sampling"]["rows"][-1]["fd_mnist"]
           for r in results["robustness"]}
    fast = [rob["fast_at", 0], rob["fast_at", 1]]
    report = (root / "report.md").read_text()
    assert f"{np.mean(fast):.3f} ± {np.std(fast, ddof=1):.3f} |" in report
    summ = results["summary"]["fd_mnist"]
    assert summ["fast_at|ddim|2"]["n"] == 2 and summ["pgd_at|ddim|2"]["n"] == 1


# ----------------------------------------------------------------------------------------------
# The consistency-model stage (spec.cm): consistency distillation from the start checkpoint


def cm_smoke_spec(data_dir):
    """smoke_spec with its CM stage on: the CM arms of configs/experiments/smoke.py (tiny CD
    students of the tiny pre-training, 2 minibatches each)."""
    spec = smoke_spec(data_dir)
    spec.cm.enabled = True
    return spec


def test_old_specs_have_no_cm_stage_and_bad_cm_fields_are_named(mnist_data_dir, tmp_path):
    old = study.load_spec(str(ROOT / "configs" / "experiments" / "mnist.py"))   # no spec.cm
    assert study.cm_spec(old) is None and study.cm_spec(smoke_spec(mnist_data_dir)) is None

    def bad(edit, message):
        spec = cm_smoke_spec(mnist_data_dir)
        edit(spec.cm)
        with pytest.raises(study.StudyError, match=message):
            study.validate_spec(spec)
        spec.cm.enabled = False       # a disabled stage is not checked
        study.validate_spec(spec)

    bad(lambda c: setattr(c, "arm_order", ("cd_clean", "nope")),
        r"spec.cm.arm_order names arms without a spec.cm.arms entry: \['nope'\]")
    bad(lambda c: c.arms.update({"clean": c.arms.cd_clean.to_dict()}) or setattr(
        c, "arm_order", ("cd_clean", "clean")), r"spec.cm.arm_order: \['clean'\] are names of DPM")
    bad(lambda c: setattr(c.arms.cd_at, "minibatch_factor", 2),
        r"spec.cm.arms.cd_at: unknown field\(s\) \['minibatch_factor'\]")
    bad(lambda c: setattr(c, "baseline", "cd_x"), "spec.cm.baseline='cd_x' is not an arm")
    bad(lambda c: setattr(c, "seeds", (0, 5)), r"spec.cm.seeds must be training seeds of "
                                               r"spec.seeds \(0,\)")
    bad(lambda c: setattr(c.arms.cd_at_teacher_clean, "seeds", (2,)),
        r"spec.cm.arms.cd_at_teacher_clean.seeds: \[2\] are not seeds of the CM stage")
    bad(lambda c: setattr(c, "num_minibatches", 0), "spec.cm.num_minibatches must be an integer")
    bad(lambda c: setattr(c, "samplers", ("cm_onestep", "ddim")),
        "spec.cm.samplers must be distinct samplers from")
    bad(lambda c: setattr(c, "nfes", (2, 4)), r"spec.cm.nfes \(2, 4\) lacks 1, the NFE of "
                                              r"cm_onestep")
    bad(lambda c: setattr(c, "nfes", (1,)), r"spec.cm.nfes \(1,\) has no NFE >= 2 for "
                                            r"cm_multistep")
    bad(lambda c: setattr(c, "samplers", ("cm_onestep",)),
        r"spec.cm.nfes: NFEs \[2, 4\] are cm_multistep's, which spec.cm.samplers")
    bad(lambda c: setattr(c, "samplers", ("cm_multistep",)),
        r"spec.cm.nfes: NFE 1 is cm_onestep's")
    bad(lambda c: setattr(c, "robustness_seeds", (3,)),
        r"spec.cm.robustness_seeds: \[3\] are not seeds of the CM stage")
    bad(lambda c: delattr(c, "baseline"), "spec.cm.baseline is missing")
    # Configs: a DPM config, and a student network that is not the teacher's, are refused
    # before anything is written.
    spec = cm_smoke_spec(mnist_data_dir)
    spec.cm.config = "configs/tiny.py"
    with pytest.raises(study.StudyError, match=r"spec.cm.config 'configs/tiny.py' \(with "
                       r"spec.cm.arms.cd_clean.overrides\) trains a diffusion model"):
        study.run_experiment(spec, tmp_path / "a")
    spec = cm_smoke_spec(mnist_data_dir)
    spec.cm.overrides.model = {"num_res_blocks": 2}
    with pytest.raises(study.StudyError, match=r"spec.cm.arms.cd_clean \(spec.cm.config "
                       r"'configs/tiny_cm.py'\): config does not match the teacher run in .*"
                       r"model.num_res_blocks: 2 here, 1 in the teacher"):
        study.run_experiment(spec, tmp_path / "b")
    spec = cm_smoke_spec(mnist_data_dir)
    spec.cm.arms.cd_at.overrides.cm.kindd = "cd"
    with pytest.raises(study.StudyError, match="spec.cm.arms.cd_at.overrides: unknown config "
                                               "option 'cm.kindd'"):
        study.run_experiment(spec, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_at_effect_cm_section_distils_the_start_with_the_dpm_at_recipe(tmp_path):
    """mnist_at_effect.py's CM stage (issue 17 point 4): CD clean vs CD + the DPM arms' fast AT
    (same K, step, radius), the teacher's step from the clean point as a one-seed ablation; the
    students' network is the pre-training's (checked as the run will check its teacher)."""
    spec = study.load_spec(str(ROOT / "configs" / "experiments" / "mnist_at_effect.py"))
    cm = spec.cm
    assert tuple(cm.arm_order) == ("cd_clean", "cd_at", "cd_at_teacher_clean")
    assert study.cm_seeds(spec) == (0, 1, 2) and study.cm_arm_seeds(spec, "cd_at_teacher_clean") == (0,)
    assert study.cm_nfes(cm, "cm_onestep") == (1,) and study.cm_nfes(cm, "cm_multistep") == (2, 4)
    pre = study.pretrain_config(spec, tmp_path, "data")
    study.check_cm_configs(spec, tmp_path, "data", pre)
    configs = {a: study.cm_arm_config(spec, a, 1, tmp_path, "data", 10000) for a in cm.arm_order}
    for c in configs.values():
        assert c.cm.kind == "cd" and c.cm.init_from_teacher and c.model == pre.model
        assert (c.teacher.workdir, c.teacher.step) == (str(tmp_path / "pretrain"), 10000)
        assert c.train.num_minibatches == 1000 and c.seed == spec.finetune.base_seed + 1
    dpm_at = study.arm_config(spec, "fast_at", 1, tmp_path, "data", 10000).adv
    at = configs["cd_at"].adv
    assert (at.kind, at.steps, at.step_size, at.max_norm, at.norm) == (
        "fast", dpm_at.steps, dpm_at.step_size, dpm_at.max_norm, dpm_at.norm) == (
        "fast", 3, 0.1, 0.1, "l2")
    assert configs["cd_clean"].adv.kind == "none"
    assert configs["cd_at"].cm.teacher_from_perturbed is True
    ablation = configs["cd_at_teacher_clean"].to_dict()
    assert ablation["cm"].pop("teacher_from_perturbed") is False
    ref = configs["cd_at"].to_dict()
    ref["cm"].pop("teacher_from_perturbed")
    assert ablation == ref
    clean = configs["cd_clean"].to_dict()
    assert clean["cm"].pop("teacher_from_perturbed") is True     # unused without AT
    clean.pop("adv"), ref.pop("adv")
    assert clean == ref   # the arms differ only by their own options


def _cm_rows():
    """Synthetic evaluation rows: two CM arms on seeds 0 and 1 (the ablation on 0), one DPM arm."""
    rows = []
    for seed in (0, 1):
        for arm, base in (("cd_clean", 10.0), ("cd_at", 8.0), ("cd_at_teacher_clean", 9.0)):
            if arm == "cd_at_teacher_clean" and seed:
                continue
            for sampler, nfe in (("cm_onestep", 1), ("cm_multistep", 2), ("cm_multistep", 4)):
                rows.append({"label": arm, "seed": seed, "eval_seed": 0, "step": 2,
                             "sampler": sampler, "nfe": nfe, "num_samples": 8,
                             "fd_mnist": base + 2.0 * seed - nfe, "confidence": 0.5})
        rows.append({"label": "clean", "seed": seed, "eval_seed": 0, "step": 2, "sampler": "ddim",
                     "nfe": 3, "num_samples": 8, "fd_mnist": 20.0 + seed, "confidence": 0.3})
    return rows


def _cm_robustness(label, seed, scale):
    return {"label": label, "seed": seed, "model": "cm",
            "attack": {"t": [10, 50], "sigma": [0.186, 1.04], "radius": [0.0, 0.05],
                       "x0_clean": [[0.1, 0.1], [0.5, 0.5]],
                       "x0_attacked": [[0.1, 0.2 * scale], [0.5, 0.7 * scale]]},
            "sampling": {"num_samples": 8, "rows": [
                {"sampler": s, "nfe": n, "kind": k, "size": z, "fd_mnist": 5.0 * scale + z,
                 "confidence": 0.5} for s, n in (("cm_onestep", 1), ("cm_multistep", 2))
                for k in ("gaussian", "adversarial") for z in (0.0, 0.1)]}}


def test_cm_report_tables_paired_differences_and_plot(mnist_data_dir, tmp_path):
    from atdiff_jax.experiment.render import write_report
    spec = cm_smoke_spec(mnist_data_dir)
    rob = [_cm_robustness("cd_at", 0, 1.0), _cm_robustness("cd_at", 1, 2.0)]
    write_report(spec, tmp_path, ["start", "clean"], rows=_cm_rows(), robustness=rob,
                 extra={"wall": {"cd_at/seed0": 12.0, "cd_at/seed1": 14.0}})
    text = (tmp_path / "report.md").read_text()
    # the DPM tables keep their own NFEs; the CM tables: rows sampler x CM arm, columns NFE
    assert "| sampler | arm | NFE 3 |" in text and "| ddim | clean | 20.50 ± 0.71 |" in text
    assert "| sampler | CM arm | NFE 1 | NFE 2 | NFE 4 |" in text
    assert "| cm_onestep | cd_at | 8.00 ± 1.41 |  |  |" in text
    assert "| cm_multistep | cd_clean |  | 9.00 ± 1.41 | 7.00 ± 1.41 |" in text
    assert "| cm_multistep | cd_at_teacher_clean |  | 7.00 | 5.00 |" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]["fd_mnist"]) == {"clean|ddim|3"}
    summ = results["cm"]["summary"]["fd_mnist"]
    assert summ["cd_at|cm_multistep|4"]["values"] == [4.0, 6.0]
    # paired per seed against the clean CD arm: (7 - 9) / 9 and (9 - 11) / 11 at NFE 1
    d = results["cm"]["paired"]["cd_at|cd_clean"]["cm_onestep|1"]
    assert d["values"] == pytest.approx([-200 / 9, -200 / 11]) and d["wins"] == 2
    assert set(results["cm"]["paired"]) == {"cd_at|cd_clean", "cd_at_teacher_clean|cd_clean"}
    assert results["cm"]["paired"]["cd_at_teacher_clean|cd_clean"]["cm_multistep|2"]["n"] == 1
    assert "| cd_at vs cd_clean | cm_onestep | -20.2 ± 2.9 (" in text
    # the students' robustness: attacked x_0 MSE (mean over seeds), perturbed sampling
    assert "| cd_at | 50 (1.04) | 0.5000 | 1.0500 |" in text
    assert "cm_multistep-2 adversarial 0.1" in text and "| cd_at | 7.500 ± 3.536 |" in text
    assert "| cd_at | 2 | 13 |" in text    # cost: minibatches, mean train wall time
    assert len([r for r in results["rows"] if r["sampler"].startswith("cm_")]) == 15
    assert (tmp_path / "cm_fd_mnist_vs_nfe.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def cm_stage(smoke, tmp_path_factory):
    """The CM stage end to end, on a root holding a copy of the smoke fixture's finished
    pre-training, gate and start cells (reused, not redone; the clean arm's 2 minibatches are
    retrained, its config names this root's pre-training): one CM arm (clean CD: AT's K-step
    program costs K x the compile and is covered by test_cm_train) of seed 0 is trained from the
    start checkpoint, evaluated (cm_onestep at NFE 1, cm_multistep at 2) with the
    consistency-function attack (2 PGD steps), and reported."""
    spec0, root0, _ = smoke
    root = tmp_path_factory.mktemp("study_cm") / "exp"
    for part in ("pretrain", "eval/start"):
        shutil.copytree(root0 / part, root / part)
    shutil.copy(root0 / "gate.json", root / "gate.json")
    spec = cm_smoke_spec(spec0.data_dir)
    spec.arm_order = ("clean",)
    spec.wallclock.enabled = False
    spec.cm.arm_order = ("cd_clean",)
    spec.cm.baseline = "cd_clean"
    spec.cm.nfes = (1, 2)
    spec.cm.robustness_seeds = (0,)
    spec.eval.robustness_sizes = ()      # the attack only (perturbed sampling: test_cm_train)
    spec.eval.robustness_pgd_steps = 2
    report = study.run_experiment(spec, root)
    return spec, root, report


def test_cm_stage_trains_evaluates_and_reports(cm_stage):
    spec, root, report = cm_stage
    from atdiff_jax.train.loop import restore_state
    state, config = restore_state(str(root / "cm" / "cd_clean" / "seed0"))
    assert (int(state.step), int(state.updates)) == (2, 2)
    assert config.cm.kind == "cd" and config.adv.kind == "none" and config.seed == 100
    assert (config.teacher.workdir, config.teacher.step) == (str(root / "pretrain"), 4)
    cells = root / "eval" / "cd_clean" / "seed0"
    one = json.loads((cells / "cm_onestep_e0.json").read_text())
    multi = json.loads((cells / "cm_multistep_e0.json").read_text())
    assert one["step"] == multi["step"] == 2
    assert [(r["sampler"], r["nfe"]) for r in one["rows"] + multi["rows"]] == [
        ("cm_onestep", 1), ("cm_multistep", 2)]
    results = json.loads((root / "results.json").read_text())
    fd = {(r["sampler"], r["nfe"]): r["fd_mnist"] for r in results["rows"]
          if r["label"] == "cd_clean"}
    assert len(fd) == 2 and all(np.isfinite(v) and v > 1.0 for v in fd.values())
    assert {r["label"] for r in results["rows"]} == {"start", "clean", "cd_clean"}
    rob = [r for r in results["robustness"] if r["label"] == "cd_clean"]
    assert len(rob) == 1 and rob[0]["model"] == "cm" and "sampling" not in rob[0]
    assert np.asarray(rob[0]["attack"]["x0_attacked"]).shape == (2, 2)
    text = report.read_text()
    assert f"| cm_onestep | cd_clean | {fd['cm_onestep', 1]:.2f} |  |" in text
    assert "### CM: robustness" in text and (root / "cm_fd_mnist_vs_nfe.png").is_file()
    assert "cd_clean/seed0" in json.loads((root / "wall_seconds.json").read_text())
    # Rerunning reuses the CM run and its cells (nothing is retrained or re-evaluated).
    files = list((root / "eval" / "cd_clean").rglob("*.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    ckpt = root / "cm" / "cd_clean" / "seed0" / "checkpoints"
    ckpts = sorted(p.name for p in ckpt.iterdir())
    study.run_experiment(spec, root)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert sorted(p.name for p in ckpt.iterdir()) == ckpts
