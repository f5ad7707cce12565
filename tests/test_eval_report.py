"""`atdiff eval` pieces end to end on a tiny workdir: samples x NFEs, metrics, robustness, report."""
import json

import numpy as np
import pytest

from atdiff_jax.eval import report
from conftest import subprocess_xla_flags
from test_cli import TINY, atdiff


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_data_dir):
    workdir = tmp_path_factory.mktemp("eval") / "tiny"
    res = atdiff("train", f"--config={TINY}", f"--workdir={workdir}",
                 f"--config.data.data_dir={mnist_data_dir}", "--config.train.num_minibatches=2")
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def results(tiny_run, mnist_data_dir):
    return report.evaluate_workdir(
        str(tiny_run), metrics=("fd_mnist", "robustness"), samplers=("ddim", "es"), nfes=(2, 3),
        num_samples=12, batch_size=6, data_dir=str(mnist_data_dir),  # robustness_t: the default
        robustness_radii=(0.0, 0.05, 0.1), robustness_pgd_steps=2, robustness_images=4,
        robustness_sizes=(0.0, 0.1), robustness_samples=6, robustness_nfe=3, label="tiny",
        save_features=True)


def test_results_json_has_every_cell(results, tiny_run):
    saved = json.loads((tiny_run / "eval" / "2" / "results.json").read_text())
    assert saved["step"] == 2 and saved["label"] == "tiny"
    cells = {(r["sampler"], r["nfe"]) for r in saved["rows"]}
    assert cells == {("ddim", 2), ("ddim", 3), ("es", 2), ("es", 3)}
    for r in saved["rows"]:
        # an untrained model's samples are far from MNIST: the distance is large and finite
        assert np.isfinite(r["fd_mnist"]) and r["fd_mnist"] > 1.0
        assert 0.0 < r["confidence"] <= 1.0


def test_saved_features_give_the_rows_fd_mnist(results, tiny_run, mnist_data_dir):
    """save_features: each row's classifier features beside results.json; fd_mnist is their
    distance to the reference (computed once, from these features)."""
    from atdiff_jax.eval.fid import feature_statistics, frechet_distance
    saved = json.loads((tiny_run / "eval" / "2" / "results.json").read_text())
    assert saved["features_file"] == "results.features.npz"
    with np.load(tiny_run / "eval" / "2" / "results.features.npz") as f:
        assert sorted(f.files) == ["ddim_2", "ddim_3", "es_2", "es_3"]
        feats = {k: f[k] for k in f.files}
    ref = report.mnist_reference(str(mnist_data_dir))
    for r in saved["rows"]:
        x = feats[f"{r['sampler']}_{r['nfe']}"]
        assert x.shape == (12, 128) and x.dtype == np.float32
        assert frechet_distance(*feature_statistics(x), *ref) == r["fd_mnist"]


def test_robustness_section(results):
    a = results["robustness"]["attack"]
    assert a["t"] == [5, 20, 50, 80]  # the default grid: 5/20/50/80 % of configs/tiny.py's T = 100
    assert np.asarray(a["eps_attacked"]).shape == (4, 3)
    np.testing.assert_allclose(np.asarray(a["eps_attacked"])[:, 0],
                               np.asarray(a["eps_clean"])[:, 0], rtol=1e-5)
    assert np.all(np.diff(np.asarray(a["eps_attacked"]), axis=1) > 0)
    rows = results["robustness"]["sampling"]["rows"]
    assert [(r["kind"], r["size"]) for r in rows] == [("gaussian", 0.0), ("gaussian", 0.1),
                                                       ("adversarial", 0.0), ("adversarial", 0.1)]
    # size 0 is the same clean DDIM run for both kinds
    assert rows[0]["fd_mnist"] == pytest.approx(rows[2]["fd_mnist"], rel=1e-6)
    assert results["robustness"]["sampling"]["nfe"] == 3   # robustness_nfe


def test_two_devices_split_the_batch_and_give_the_same_numbers(results, tiny_run, mnist_data_dir,
                                                               tmp_path):
    """The same evaluation with 2 simulated devices: samplers and the robustness attack split
    each batch over both (samplers.batch_shardings), which is per-example work, so the samples and
    every score match the 1-device run. One cell of the grid (the sampler code is shared by all)
    and the denoiser attack; the sampling under perturbation spreads its batch with the same
    ``spread`` as the attack and is left out (its two programs would double the compile time)."""
    import os
    import subprocess
    import sys
    from test_cli import ROOT
    script = f"""
import jax
from atdiff_jax import samplers
from atdiff_jax.eval import report
assert jax.local_device_count() == 2
assert samplers.batch_shardings(6) is not None and samplers.batch_shardings(5) is None
report.evaluate_workdir(
    {str(tiny_run)!r}, metrics=("fd_mnist", "robustness"), samplers=("ddim",), nfes=(3,),
    num_samples=12, batch_size=6, data_dir={str(mnist_data_dir)!r},
    robustness_radii=(0.0, 0.05, 0.1), robustness_pgd_steps=2, robustness_images=4,
    robustness_sizes=(), label="tiny",
    out_file={str(tmp_path / "two.json")!r})
"""
    env = dict(os.environ,
               XLA_FLAGS=subprocess_xla_flags("--xla_force_host_platform_device_count=2"),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = {(r["sampler"], r["nfe"]): r for r in results["rows"]}
    assert len(two["rows"]) == 1 and len(one) == 4
    for r in two["rows"]:   # the same images: the same distance and confidence
        mine = one[r["sampler"], r["nfe"]]
        assert (r["fd_mnist"], r["confidence"]) == pytest.approx(
            (mine["fd_mnist"], mine["confidence"]), rel=1e-6, abs=0)
    for k in ("eps_clean", "eps_attacked", "x0_attacked"):  # batch means: summed in 2 halves
        np.testing.assert_allclose(two["robustness"]["attack"][k],
                                   results["robustness"]["attack"][k], rtol=1e-5)
    assert "sampling" not in two["robustness"]


def test_cli_robustness_t_outside_the_chain_is_one_line_error(tiny_run, mnist_data_dir, tmp_path):
    res = atdiff("eval", f"--workdir={tiny_run}", "--metrics=robustness", "--robustness_t=10,100",
                 f"--data_dir={mnist_data_dir}", f"--out={tmp_path / 'rep'}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "atdiff eval: error: robustness_t: t_values must lie in [0, 100) (T = 100 is the run's "
        "diffusion.steps), got [100]")
    assert not (tmp_path / "rep").exists()


def test_report_tables_and_plots(results, tmp_path):
    other = json.loads(json.dumps(results))
    other["label"] = "copy"
    out = report.write_report([results, other], str(tmp_path / "rep"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| sampler | model | NFE 2 | NFE 3 |" in md
    # rows: sampler x model, in sampler order
    lines = [ln for ln in md.splitlines() if ln.startswith("| ddim |") or ln.startswith("| es |")]
    assert [ln.split("|")[1:3] for ln in lines[:4]] == [[" ddim ", " tiny "], [" ddim ", " copy "],
                                                        [" es ", " tiny "], [" es ", " copy "]]
    assert "## Robustness" in md
    assert sorted(p.rsplit("/", 1)[1] for p in out["plots"]) == [
        "fd_mnist_vs_nfe.png", "robustness.png"]
    for p in out["plots"]:
        assert (tmp_path / "rep" / p.rsplit("/", 1)[1]).stat().st_size > 1000


def test_bad_arguments_are_named(tiny_run, mnist_data_dir):
    with pytest.raises(report.EvalError, match="samplers"):
        report.evaluate_workdir(str(tiny_run), samplers=("heun",), data_dir=str(mnist_data_dir))
    with pytest.raises(report.EvalError, match="nfe"):
        report.evaluate_workdir(str(tiny_run), nfes=(0,), data_dir=str(mnist_data_dir))
    with pytest.raises(report.EvalError, match="convert inception"):
        report.evaluate_workdir(str(tiny_run), metrics=("fid",), inception="/nonexistent",
                                data_dir=str(mnist_data_dir))
    with pytest.raises(report.EvalError, match="save_features .* needs metrics to include"):
        report.evaluate_workdir(str(tiny_run), metrics=("robustness",), save_features=True,
                                data_dir=str(mnist_data_dir))


@pytest.mark.slow  # ~1-4 min: converts 87 MB of weights and compiles InceptionV3 at 299x299
def test_cli_convert_inception_then_eval_with_fid(tiny_run, mnist_data_dir, tmp_path):
    """`atdiff convert inception` once, then `atdiff eval` reads the weights (no torch needed)."""
    from atdiff_jax.convert.inception import find_fid_helper_weights
    try:
        find_fid_helper_weights()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    weights = tmp_path / "inception.msgpack"
    res = atdiff("convert", "inception", f"--out={weights}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sha256" in res.stdout and weights.stat().st_size > 80_000_000
    res = atdiff("eval", f"--workdir={tiny_run}", "--metrics=fd_mnist", "--samplers=ddim,dpm_solver",
                 "--nfe=2", "--num_samples=6", "--batch_size=6", f"--data_dir={mnist_data_dir}",
                 f"--out={tmp_path / 'rep'}", "--labels=tiny")
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| ddim | tiny |" in md and "| dpm_solver | tiny |" in md
    # FID through the library with a small reference (the protocol uses the whole split)
    out = report.evaluate_workdir(str(tiny_run), metrics=("fid",), samplers=("ddim",), nfes=(2,),
                                  num_samples=6, batch_size=6, data_dir=str(mnist_data_dir),
                                  inception=str(weights), stats_dir=str(tmp_path / "stats"),
                                  fid_reference_num=16)
    fid = out["rows"][0]["fid"]
    assert np.isfinite(fid) and fid > 10.0  # noise-like samples vs real digits
    assert list((tmp_path / "stats").glob("*.npz")), "reference statistics were not cached"


def test_cli_eval_errors_exit_2_with_one_line(tiny_run, mnist_data_dir):
    res = atdiff("eval", f"--workdir={tiny_run}", "--samplers=heun", f"--data_dir={mnist_data_dir}")
    assert res.returncode == 2 and "samplers" in res.stderr and "Traceback" not in res.stderr
    res = atdiff("eval", f"--workdir={tiny_run}", "--metrics=fid", "--inception=/nope",
                 f"--data_dir={mnist_data_dir}")
    assert res.returncode == 2 and "atdiff convert inception" in res.stderr
