"""Workdirs and caches on ``gs://``: the trainer, restoring and ``atdiff eval`` keep the URL.

No network is touched: a fake bucket serves ``gs://`` from a local directory at the three places
where the code talks to GCS -- etils.epath's backend (every file the project and Orbax write or
list), Orbax's TensorStore kvstore (the arrays), and Orbax's hierarchical-namespace query.
Everything above those calls (path joins, Orbax's GCS commit protocol, the project's code) runs
as it would against a bucket.
"""
import json
import os
import pathlib
import runpy

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath

from test_cli import TINY

BACKEND_FNS = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
               "remove", "rename", "replace", "rmtree", "stat", "walk")


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``(bucket_root, calls)``: ``gs://X`` lives in ``bucket_root/X``; ``calls`` records every
    epath backend call made with a ``gs://`` path. The working directory is an empty ``cwd``."""
    from orbax.checkpoint._src.path import gcs_utils

    root = tmp_path / "gcs"
    root.mkdir()
    calls = []

    def local(p):
        s = os.fspath(p)
        return str(root / s[len("gs://"):]) if s.startswith("gs://") else s

    def remote(p):
        s = os.fspath(p)
        return "gs://" + os.path.relpath(s, root) if s.startswith(str(root) + os.sep) else s

    def redirect(name):
        def fn(original, path, *args, **kwargs):
            if os.fspath(path).startswith("gs://"):
                calls.append((name, os.fspath(path)))
            out = original(local(path), *[local(a) for a in args], **kwargs)
            if name == "glob":
                return [remote(p) for p in out]
            if name == "walk":
                return [(remote(top), dirs, files) for top, dirs, files in out]
            return out
        return fn

    # epath picks TensorFlow's GCS file system when TensorFlow is installed: use the mock instead.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": local(path)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a `gs:` directory made by os.path/pathlib would appear here
    with epath.testing.mock_epath(**{n: redirect(n) for n in BACKEND_FNS}):
        yield root, calls


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    from atdiff_jax.eval import fid, mnist_fd
    from atdiff_jax.train import checkpoint as ckpt
    from atdiff_jax.train.loop import default_data_dir
    from atdiff_jax.paths import workdir_path

    monkeypatch.chdir(tmp_path)
    assert isinstance(workdir_path("gs://b/runs/x"), epath.Path)
    assert str(ckpt.checkpoint_dir("gs://b/runs/x")) == "gs://b/runs/x/checkpoints"
    assert str(ckpt.checkpoint_dir("runs/x")) == str(tmp_path / "runs" / "x" / "checkpoints")
    assert default_data_dir("gs://b/runs/x") == "gs://b/runs/data"
    assert default_data_dir("runs/x") == str(tmp_path / "runs" / "data")
    assert str(fid.reference_statistics_path("gs://b/stats", "cifar10", "train", None)) == (
        "gs://b/stats/cifar10_train_all.npz")
    assert str(mnist_fd.reference_stats_path("gs://b/s", "test", 4, 0, 0, "ab" * 8)).startswith(
        "gs://b/s/mnist32_test_0-4_seed0_")
    assert not (tmp_path / "gs:").exists()


def test_train_restore_and_eval_on_a_gs_workdir(fake_gcs, mnist_data_dir, monkeypatch):
    from clu import metric_writers  # the loop imports it when it trains

    from atdiff_jax.eval import mnist_fd, report
    from atdiff_jax.train import loop

    root, calls = fake_gcs
    writer_dirs = []
    create_writer = metric_writers.create_default_writer

    def fake_writer(logdir, **kwargs):  # TensorBoard writes through TensorFlow's own GCS client
        writer_dirs.append(logdir)
        return create_writer(str(root / logdir[len("gs://"):]), **kwargs)

    monkeypatch.setattr(metric_writers, "create_default_writer", fake_writer)
    config = runpy.run_path(TINY)["get_config"]()
    config.data.data_dir = str(mnist_data_dir)
    state = loop.train(config, "gs://bucket/runs/tiny")
    assert int(state.step) == 4
    run = root / "bucket" / "runs" / "tiny"
    assert writer_dirs == ["gs://bucket/runs/tiny"]
    assert json.loads((run / "config.json").read_text())["train"]["global_batch_size"] == 8
    # Orbax's GCS protocol (no rename; a commit marker written last) ran on the gs:// paths.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert (run / "checkpoints" / "4" / "commit_success.txt").is_file()
    assert ("open", "gs://bucket/runs/tiny/config.json") in calls
    assert any(path.startswith("gs://bucket/runs/tiny/checkpoints/4") for _, path in calls)

    restored, saved = loop.restore_state("gs://bucket/runs/tiny")
    assert int(restored.step) == 4 and saved.train.global_batch_size == 8
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    res = report.evaluate_workdir("gs://bucket/runs/tiny", metrics=("fd_mnist",),
                                  samplers=("ddim",), nfes=(2,), num_samples=2, batch_size=2,
                                  data_dir=str(mnist_data_dir))
    assert res["workdir"] == "gs://bucket/runs/tiny" and res["label"] == "tiny"
    assert json.loads((run / "eval" / "4" / "results.json").read_text())["step"] == 4
    written = report.write_report([res], "gs://bucket/report")
    assert written["report"] == "gs://bucket/report/report.md"
    assert "gs://bucket/runs/tiny" in (root / "bucket" / "report" / "report.md").read_text()
    assert (root / "bucket" / "report" / "fd_mnist_vs_nfe.png").stat().st_size > 1000

    # An evaluation cache in the bucket: written once, then read back.
    stats = mnist_fd.reference_stats(mnist_data_dir, "test", 8, cache_dir="gs://bucket/stats")
    (cached,) = (root / "bucket" / "stats").iterdir()
    assert cached.suffix == ".npz"
    again = mnist_fd.reference_stats(mnist_data_dir, "test", 8, cache_dir="gs://bucket/stats")
    np.testing.assert_array_equal(again[1], stats[1])
    assert ("open", "gs://bucket/stats/" + cached.name) in calls  # read back, not recomputed
    assert list(pathlib.Path.cwd().iterdir()) == [], "a gs:// URL was turned into a local path"


def test_gs_data_dir_reaches_tfds_unchanged(fake_gcs, mnist_data_dir):
    """TFDS reads the dataset's metadata from gs:// through epath (the fake bucket here). The
    ArrayRecord files themselves are read by array_record's own GCS client, which the fake
    bucket cannot serve; docs/scale.md says so."""
    from atdiff_jax.data.pipeline import get_dataset_meta, open_builder

    root, calls = fake_gcs
    (root / "bucket").mkdir()
    (root / "bucket" / "tfds").symlink_to(mnist_data_dir, target_is_directory=True)
    builder = open_builder("mnist32", data_dir="gs://bucket/tfds")
    assert str(builder.data_dir) == "gs://bucket/tfds/mnist32/1.0.0"
    meta = get_dataset_meta("mnist32", data_dir="gs://bucket/tfds")
    assert meta.num_examples == {"train": 60000, "test": 10000}
    assert any(path.startswith("gs://bucket/tfds/mnist32/1.0.0/") for _, path in calls)
    assert list(pathlib.Path.cwd().iterdir()) == []
