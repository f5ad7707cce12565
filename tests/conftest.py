"""Shared test fixtures: reference vectors, the converted reference UNet (compiled once) and the
offline MNIST dataset (built once per session, ~10 s).

One persistent JAX compilation cache serves the whole run: the pytest process that loads this
file first (the xdist controller, or the only process) makes a fresh directory and exports it in
``JAX_COMPILATION_CACHE_DIR``, which the xdist workers and every ``atdiff`` subprocess a test
starts inherit; it is removed when that process exits. Many tests compile the same programs (the
tiny config's train step in each `atdiff train`, the samplers): a tiny `atdiff train` takes
40 s instead of 101 s with the cache warm. A ``JAX_COMPILATION_CACHE_DIR`` set by the caller is
used as it is (and kept).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import pathlib
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="atdiff-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# Cache every program, however small or quick to compile (the defaults skip those under 1 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # noqa: E402

# The suite compiles every program, in-process and in every subprocess a test starts, with LLVM's
# optimisation of the generated CPU code turned down: the HLO passes are unchanged, a tiny `atdiff
# train` compiles with about a third less CPU time, and the code runs as fast where it matters
# (convolutions and matmuls are library calls either way). The tests check properties and
# reference vectors whose tolerances come from float32 error bounds, which hold at any LLVM level
# (sin/cos expansions round differently: see test_unet's timestep-embedding tolerance). Every run a
# test compares is compiled alike. ``ATDIFF_TESTS_XLA_OPT=default`` keeps XLA's default level.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_XLA_OPT = os.environ.get("ATDIFF_TESTS_XLA_OPT", "fast")
if _XLA_OPT not in ("fast", "default"):
    raise pytest.UsageError(f"ATDIFF_TESTS_XLA_OPT must be 'fast' or 'default', got {_XLA_OPT!r}")
if _XLA_OPT == "fast" and FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    # once (xdist workers inherit it), after the caller's flags (e.g. the portability check's
    # --xla_cpu_max_isa=AVX2)
    os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), FAST_COMPILE)))


def subprocess_xla_flags(*extra: str) -> str:
    """``XLA_FLAGS`` for a subprocess: this run's (the caller's, then ``FAST_COMPILE``), then
    ``extra`` (e.g. a simulated device count)."""
    return " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), *extra)))


import jax  # noqa: E402  (reads XLA_FLAGS and the cache settings above when imported)
import numpy as np  # noqa: E402

# float32 everywhere; on TPU the reference tolerances need full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

TESTDATA = pathlib.Path(__file__).parent / "testdata"
ADM_REF = TESTDATA / "adm_reference"


@functools.lru_cache(maxsize=None)
def load_ref(name: str) -> dict[str, np.ndarray]:
    """All arrays of ``tests/testdata/adm_reference/<name>.npz`` as a dict."""
    with np.load(ADM_REF / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


@functools.lru_cache(maxsize=None)
def ref_manifest() -> dict:
    return json.loads((ADM_REF / "manifest.json").read_text())


def ref_state_dict(npz: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """guided-diffusion state dict (torch names and layouts) from ``param/<key>`` arrays."""
    npz = load_ref("model_init") if npz is None else npz
    return {k[len("param/"):]: v for k, v in npz.items() if k.startswith("param/")}


def nchw_to_nhwc(x):
    return np.moveaxis(np.asarray(x), -3, -1)


def nhwc_to_nchw(x):
    return np.moveaxis(np.asarray(x), -1, -3)


def ref_create_model_kwargs() -> dict:
    """The exact ``create_model`` keyword arguments the reference vectors were made with."""
    args = ref_manifest()["model_and_diffusion_args"]
    keys = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma",
            "class_cond", "use_checkpoint", "attention_resolutions", "num_heads",
            "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "dropout",
            "resblock_updown", "use_fp16", "use_new_attention_order")
    return {k: args[k] for k in keys}


# UNet option vectors from the public guided-diffusion code (tests/testdata/unet_options/): the
# JAX UNet reproduces their torch `out` at this atol (see tests/test_unet.py's docstring).
UNET_OPTIONS = TESTDATA / "unet_options"
UNET_OPTION_ATOL = 2e-5


def load_unet_option(path: str | pathlib.Path):
    """``(arrays, reference UNetModel kwargs, create_model kwargs or None, state dict)`` of an
    option vector, given its path or its name (``"classcond32"``)."""
    path = pathlib.Path(path)
    if path.suffix != ".npz":
        path = UNET_OPTIONS / f"{path}.npz"
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    unet_kwargs = json.loads(str(data["unet_kwargs"]))
    for k in ("attention_resolutions", "channel_mult"):
        unet_kwargs[k] = tuple(unet_kwargs[k])
    cm_kwargs = json.loads(str(data["create_model_kwargs"]))
    state_dict = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    return data, unet_kwargs, cm_kwargs, state_dict


def assert_matches_unet_option(module, params, data, atol: float = UNET_OPTION_ATOL) -> float:
    """``module`` with ``params`` reproduces an option vector's torch ``out`` (from its ``x``,
    ``t`` and, if class-conditional, ``y``) at ``atol``; returns the max abs difference."""
    out = jax.jit(lambda x, t, y: module.apply({"params": params}, x, t, y))(
        nchw_to_nhwc(data["x"]), data["t"], data.get("y"))
    np.testing.assert_allclose(nhwc_to_nchw(out), data["out"], rtol=0, atol=atol)
    return float(np.abs(nhwc_to_nchw(out) - data["out"]).max())


@pytest.fixture(scope="session")
def ref_unet():
    """(module, params) of the reference UNet (config A) built through the converter."""
    from atdiff_jax.convert.guided_diffusion import unet_from_state_dict
    return unet_from_state_dict(ref_state_dict(), **ref_create_model_kwargs())


@pytest.fixture(scope="session")
def ref_model_fn(ref_unet):
    """Jitted eval-mode ``model_fn(x_nhwc, t) -> out_nhwc`` of the reference UNet."""
    module, params = ref_unet
    return jax.jit(lambda x, t: module.apply({"params": params}, x, t, train=False))


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory) -> pathlib.Path:
    """A TFDS data_dir holding only ``mnist32``, built offline once per session (read-only)."""
    from atdiff_jax.data import prepare_mnist
    data_dir = tmp_path_factory.mktemp("mnist_tfds")
    prepare_mnist(data_dir)
    return data_dir


# The files whose tests take longest (measured by --durations on 2 cores), longest first. With
# `-n 2 --dist loadfile` each file goes whole to one worker in collection order; starting the
# long ones first keeps one worker from running a long file alone at the end.
LONG_FILES_FIRST = (
    "test_cm_train.py", "test_eval_report.py", "test_train_step.py", "test_train_distributed.py",
    "test_study.py", "test_docs.py", "test_at_reference.py", "test_cli.py", "test_adversarial.py",
    "test_notebooks.py", "test_bench.py", "test_robustness.py", "test_unet.py", "test_gcs.py")


def pytest_collection_modifyitems(config, items):
    """Runs the long files first (the order of the tests inside a file is unchanged)."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))
