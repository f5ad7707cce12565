"""atdiff_jax.consistency against openai/consistency_models (testdata/cm_reference) + properties.

The reference vectors come from the official PyTorch code (see testdata/cm_reference/README.md);
the UNet is the reference's 16x16 test network converted with ``cm_to_guided_state_dict``.

Tolerances (float32; the max error measured on XLA:CPU is given in brackets):

* noise levels, t/t2 (static N), scalings, EMA/scales: exact (bitwise), as the reference
  computes them; t/t2 from a traced N (one compile for every N): rtol 1e-6 [5.1e-7], see below.
* unit-scale tensors (network outputs, denoised images, distiller/targets, samples): atol 1e-5
  [5.6e-6]. The reference itself moves by up to 3.6e-6 between 1 and 2 torch threads.
* activations inside the UNet (time embedding, input block 3, middle block, |x| up to 6): atol
  1e-5 * max|ref|, at least 1e-5 [middle block: 1.6e-6 * max|ref| = 9.7e-6 with AVX-512, also with
  XLA's ISA capped at AVX2; 1.7e-6 * max|ref| = 1.0e-5 on an AMD EPYC without AVX-512, which
  failed the flat atol 1e-5 used before].
  1e-5 relative is ~80 float32 ulps of the largest activation after a dozen convolutions of
  576-term sums: 6x the worst error seen, far below what a wrong weight or layout gives (> 1e-2).
* large tensors (x_t up to 317, x_t2, the Euler predictor, sampler states): atol
  1e-6 * max|ref| per array or sampler step, at least 1e-5 [1.1e-7 * max|ref|]. XLA:CPU
  contracts ``x_start + noise * t`` into a fused multiply-add (one rounding instead of torch's
  two; verified: an FMA evaluated in float64 reproduces XLA's result exactly, and no XLA flag
  turns the contraction off), so x_t differs from the reference by up to 1 ulp (3e-5 at 300).
* the traced-N formula ``(max^(1/rho) + n/(N-1) (min^(1/rho) - max^(1/rho)))^rho``: XLA:CPU
  contracts the base into an FMA too, 1 ulp there becomes up to rho = 7 ulps after the power.
* CT with N = 2 (t = 80 -> t2 = 0.002): ``x_t2 = x_t + (x_t - x_0)/t * (t2 - t)`` cancels
  |x_t| <= 317 down to |x_t2| <= 1, so the 1-ulp difference in x_t (and the reference's own
  rounding, ~ulp(317) = 3.05e-5) survives as an absolute error on unit-scale values: x_t2,
  distiller_target and target_model_output are compared with atol 4 ulp(max|x_t|) = 1.2e-4
  [3.4e-5, 3.4e-5, 5.1e-5]. This is the conditioning of the reference formula, not a bug.
* per-example losses: rtol 1e-5, atol 1e-6 [2.7e-7].
* the full UNet gradient (CD, N = 18, l2): atol 2e-5 * max|grad| = 1.0e-6 [7.3e-8]; its
  per-parameter norms, also for l1 / l2-32 / CT (those under ``-m slow``), rtol 1e-4 [8.1e-6]
  (the six parameters with a mathematically zero gradient: atol 1e-7).
* samplers: atol 1e-5 on samples and denoiser outputs [3.7e-6]; sampler states as large tensors
  per step (the Heun state starts at |x| = 334).
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nchw_to_nhwc

from atdiff_jax.adversarial import AdversaryConfig, run_adversary
from atdiff_jax.consistency import (
    KarrasDenoiser,
    boundary_scalings,
    consistency_distillation_loss,
    consistency_loss,
    consistency_sigma_pair,
    consistency_training_loss,
    create_ema_and_scales_fn,
    denoise,
    edm_scalings,
    karras_sample,
    karras_sigmas,
    rescale_sigma,
    sample_heun,
    sample_indices_and_noise,
    sample_multistep,
    vp_denoiser,
)
from atdiff_jax.consistency.karras import torch_linspace01, vp_sigmas
from atdiff_jax.consistency.losses import torch_bilinear_resize
from atdiff_jax.convert.consistency_models import cm_create_model_kwargs, cm_to_guided_state_dict
from atdiff_jax.convert.guided_diffusion import (
    params_from_state_dict,
    state_dict_from_params,
)
from atdiff_jax.diffusion.gaussian import create_gaussian_diffusion
from atdiff_jax.models.adm import create_model

CM_REF = pathlib.Path(__file__).parent / "testdata" / "cm_reference"

UNIT_ATOL = 1e-5
# Activations inside the network grow to |x| ~ 6 (middle block): float32 rounding grows with them,
# and XLA's convolution kernels sum in another order on each CPU (AVX-512 vs AVX2 code paths), so
# they are compared relative to their magnitude (see internal_atol and the module docstring).
INTERNAL_REL_ATOL = 1e-5
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
GRAD_REL_ATOL = 2e-5
ZERO_GRAD_PARAMS = {
    "input_blocks.1.0.in_layers.2.bias", "input_blocks.2.0.in_layers.2.bias",
    "output_blocks.2.0.in_layers.2.bias", "output_blocks.3.0.in_layers.2.bias",
    "output_blocks.3.0.out_layers.3.bias", "output_blocks.3.0.skip_connection.bias",
}
# Arrays whose values reach O(100): compared relative to their magnitude.
LARGE = {"x_t", "x_t2", "x_t2_euler_predictor"}


@functools.cache
def cm_ref(name: str) -> dict[str, np.ndarray]:
    with np.load(CM_REF / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


@functools.cache
def cm_manifest() -> dict:
    return json.loads((CM_REF / "manifest.json").read_text())


def _nhwc(a: np.ndarray) -> np.ndarray:
    return nchw_to_nhwc(a) if np.ndim(a) >= 4 else np.asarray(a)


def assert_close(actual, expected, atol: float, what: str) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    assert err <= atol, f"{what}: max|diff| = {err:.3g} > atol {atol:.3g}"
    return err


def large_atol(ref: np.ndarray) -> float:
    return max(UNIT_ATOL, 1e-6 * float(np.max(np.abs(ref))))


def internal_atol(ref: np.ndarray) -> float:
    """Activations inside the network: INTERNAL_REL_ATOL * max|ref|, at least UNIT_ATOL."""
    return max(UNIT_ATOL, INTERNAL_REL_ATOL * float(np.max(np.abs(ref))))


# ----------------------------------------------------------------------------------------------
# the reference network


@pytest.fixture(scope="module")
def cm_unet():
    """(apply_fn, {'online', 'target', 'teacher'} params) of the reference test UNet."""
    kwargs = cm_create_model_kwargs(cm_manifest()["settings"]["create_model_and_diffusion_kwargs"])
    assert kwargs["use_new_attention_order"] is True
    module = create_model(**kwargs)
    p = cm_ref("params")
    params = {name: params_from_state_dict(cm_to_guided_state_dict(
        {k: p[f"{name}/{k}"] for k in p["param_keys"]}), module)
        for name in ("online", "target", "teacher")}

    def apply_fn(prm, x, t, y, rng):
        return module.apply({"params": prm}, x, t, y=y, train=False)

    return module, apply_fn, params


@pytest.fixture(scope="module")
def denoise_jit(cm_unet):
    _, apply_fn, _ = cm_unet
    return jax.jit(lambda p, x, s, dist: denoise(apply_fn, p, x, s, distillation=dist),
                   static_argnums=3)


# ----------------------------------------------------------------------------------------------
# noise levels and scalings


def test_karras_sigmas_bit_exact():
    ref = cm_ref("karras_sigmas")
    for n in (18, 40):
        sig = karras_sigmas(n, 0.002, 80.0, 7.0)
        assert sig.dtype == np.float32 and sig.shape == (n + 1,)
        np.testing.assert_array_equal(sig, ref[f"n{n}"])
        assert sig[-1] == 0 and np.all(np.diff(sig) < 0)
        np.testing.assert_array_equal(karras_sigmas(n, 0.002, 80.0, append_zero=False), sig[:-1])


@pytest.mark.parametrize("n", [2, 3, 18, 19, 40, 201, 1001])
def test_torch_linspace_rounding(n):
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(torch_linspace01(n), torch.linspace(0, 1, n).numpy())


@pytest.mark.parametrize("ref_name", ["cd_loss", "ct_loss"])
def test_consistency_sigma_pairs_bit_exact(ref_name):
    """A static N gathers from the bit-exact host table (also under jit); a traced N evaluates the
    formula in jnp, where XLA:CPU contracts the base into an FMA: 1 ulp in the base, so up to
    rho = 7 ulps in base**rho (measured 5.1e-7 relative)."""
    ref = cm_ref(ref_name)
    pair = jax.jit(lambda i, n: consistency_sigma_pair(i, n, sigma_min=0.002, sigma_max=80.0))
    for n_scales in sorted({int(k.split("/")[0][1:]) for k in ref if k.startswith("N")}):
        idx = ref[f"N{n_scales}/indices"]
        exact = jax.jit(lambda i, n=n_scales: consistency_sigma_pair(
            i, n, sigma_min=0.002, sigma_max=80.0))(idx)
        for got in (consistency_sigma_pair(idx, n_scales, sigma_min=0.002, sigma_max=80.0), exact):
            np.testing.assert_array_equal(got[0], ref[f"N{n_scales}/t"])
            np.testing.assert_array_equal(got[1], ref[f"N{n_scales}/t2"])
        t, t2 = pair(idx, jnp.int32(n_scales))
        np.testing.assert_allclose(t, ref[f"N{n_scales}/t"], rtol=1e-6, atol=0)
        np.testing.assert_allclose(t2, ref[f"N{n_scales}/t2"], rtol=1e-6, atol=0)


def test_scalings_match_reference():
    ref = cm_ref("denoise")
    sig = ref["scalings/sigma"]
    for kind, fn in (("edm", edm_scalings), ("cm", boundary_scalings)):
        for dtype, suffix in ((np.float32, ""), (np.float64, "_f64")):
            vals = fn(sig.astype(dtype))
            for name, v in zip(("c_skip", "c_out", "c_in"), vals):
                expected = ref[f"scalings/{kind}/{name}{suffix}"]
                assert np.asarray(v).dtype == dtype
                np.testing.assert_allclose(v, expected, rtol=2e-7 if dtype == np.float32 else 1e-14,
                                           atol=0, err_msg=f"{kind}/{name}{suffix}")
    for kind, dist in (("cm", True), ("edm", False)):
        s = jnp.asarray(ref["sigmas"])
        for name, v in zip(("c_skip", "c_out", "c_in"),
                           KarrasDenoiser(distillation=dist).scalings(s)):
            np.testing.assert_array_equal(v, ref[f"{kind}/{name}"])
        np.testing.assert_array_equal(rescale_sigma(s), ref[f"{kind}/rescaled_t"])


# ----------------------------------------------------------------------------------------------
# the denoiser


@pytest.mark.parametrize("kind,dist,which", [("cm", True, "online"), ("edm", False, "teacher")])
def test_denoise_matches_reference(cm_unet, denoise_jit, kind, dist, which):
    _, _, params = cm_unet
    ref = cm_ref("denoise")
    x, s = _nhwc(ref["x_t"]), ref["sigmas"]
    outs = [denoise_jit(params[which], x[sl], s[sl], dist) for sl in (slice(0, 4), slice(4, 8))]
    model_output = np.concatenate([o[0] for o in outs])
    denoised = np.concatenate([o[1] for o in outs])
    assert_close(model_output, _nhwc(ref[f"{kind}/model_output"]), UNIT_ATOL, "model_output")
    assert_close(denoised, _nhwc(ref[f"{kind}/denoised"]), UNIT_ATOL, "denoised")


def test_unet_internals_match_reference(cm_unet):
    module, _, params = cm_unet
    ref = cm_ref("denoise")
    x, s = _nhwc(ref["x_t"])[:4], ref["sigmas"][:4]
    c_in = 1 / np.sqrt(s ** 2 + 0.25)

    @jax.jit
    def run(x, t):
        return module.apply({"params": params["online"]}, x, t, capture_intermediates=lambda m, _: (
            m.name == "input_blocks_3_1"), mutable=["intermediates"])[1]["intermediates"]

    inter = run(x * c_in[:, None, None, None], rescale_sigma(jnp.asarray(s)))
    got = {"time_embed_in": inter["timestep_embedding"][0],
           "time_embed_out": inter["time_embed"][0],
           "input_blocks.3": inter["input_blocks_3_1"]["__call__"][0],
           "middle_block": inter["middle_block"][0]}
    for name, value in got.items():
        expected = ref[f"online_internals/{name}"]
        expected = _nhwc(expected) if expected.ndim == 4 else expected
        err = assert_close(value, expected, internal_atol(expected), name)
        print(f"{name}: max|diff| {err:.3g} = {err / np.max(np.abs(expected)):.3g} max|ref|")


def test_boundary_condition_is_exact(cm_unet, denoise_jit):
    """f(x, sigma_min) == x bit for bit (c_skip = 1, c_out = 0), whatever the network says."""
    _, _, params = cm_unet
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    model_output, f = denoise_jit(params["online"], x, jnp.full((4,), 0.002, jnp.float32), True)
    assert float(jnp.max(jnp.abs(model_output))) > 0.1  # the network output is not zero ...
    np.testing.assert_array_equal(f, x)                 # ... and still f(x, sigma_min) = x
    # The reference's last Karras point is 0.0019999996 != float32(0.002): c_out ~ -4.7e-10 there.
    t_last = jnp.full((4,), karras_sigmas(18, 0.002, 80.0)[-2])
    _, f_last = denoise_jit(params["online"], x, t_last, True)
    assert 0 < float(jnp.max(jnp.abs(f_last - x))) < 1e-8


# ----------------------------------------------------------------------------------------------
# the losses against the reference


def _ref_batch(ref, n):
    return {"x_start": _nhwc(ref["x_start"]), "noise": _nhwc(ref["noise"]),
            "indices": jnp.asarray(ref[f"N{n}/indices"], jnp.int32)}


NORMS = {"cd_loss": ("l2", "l1", "l2-32"), "ct_loss": ("l2", "l1")}


@pytest.fixture(scope="module")
def loss_jit(cm_unet):
    """Jitted reference-setting losses, one compile per reference file: N is traced (so N = 18
    and 40 share it) and the norms are evaluated in the same program (XLA's CSE merges their
    identical network evaluations, so three norms cost about one)."""
    _, apply_fn, params = cm_unet
    teacher = KarrasDenoiser(distillation=False).denoise_fn(apply_fn, params["teacher"])
    fns = {}
    for ref_name, norms in NORMS.items():
        cd = ref_name == "cd_loss"

        def all_norms(batch, num_scales, norms=norms, cd=cd):
            return {norm: consistency_loss(
                params["online"], None, None, batch=batch, apply_fn=apply_fn,
                num_scales=num_scales, target_params=params["target"],
                teacher_denoise_fn=teacher if cd else None, loss_norm=norm,
                return_intermediates=True) for norm in norms}

        fns[ref_name] = jax.jit(all_norms)
    return fns


@pytest.mark.parametrize("ref_name,n", [("cd_loss", 18), ("cd_loss", 40), ("ct_loss", 18),
                                        ("ct_loss", 2)])
def test_consistency_loss_matches_reference(loss_jit, ref_name, n):
    ref = cm_ref(ref_name)
    results = loss_jit[ref_name](_ref_batch(ref, n), jnp.int32(n))
    names = ["t", "t2", "x_t", "x_t2", "distiller", "distiller_model_output", "distiller_target",
             "target_model_output", "weights"]
    if ref_name == "cd_loss":
        names += ["teacher_denoised_t", "x_t2_euler_predictor", "teacher_denoised_t2"]
    ill_conditioned = ref_name == "ct_loss" and n == 2
    for norm in NORMS[ref_name]:
        key = f"N{n}/{norm}/loss"
        if key not in ref:  # l2-32 is stored for N = 18 only
            continue
        total, aux = results[norm]
        if ref_name == "ct_loss":
            assert "teacher_denoised_t" not in aux
        for name in names:
            what = f"{norm}: {name}"
            expected = _nhwc(ref[f"N{n}/{name}"])
            if name == "weights":
                np.testing.assert_array_equal(aux[name], expected, err_msg=what)
            elif name in ("t", "t2"):
                # traced N: XLA fuses the base into an FMA, up to 7 ulps after **rho (exact with
                # a static N, see test_consistency_sigma_pairs_bit_exact)
                np.testing.assert_allclose(aux[name], expected, rtol=1e-6, atol=0, err_msg=what)
            elif ill_conditioned and name in ("x_t2", "distiller_target", "target_model_output"):
                ulp = float(np.spacing(np.float32(np.max(np.abs(ref[f"N{n}/x_t"])))))
                assert_close(aux[name], expected, 4 * ulp, what)
            elif name in LARGE:
                assert_close(aux[name], expected, large_atol(expected), what)
            else:
                assert_close(aux[name], expected, UNIT_ATOL, what)
        if norm == "l2-32":
            for name in ("distiller_32", "distiller_target_32"):
                assert_close(aux[name], _nhwc(ref[f"N{n}/{norm}/{name}"]), UNIT_ATOL, name)
        np.testing.assert_allclose(aux["loss"], ref[key], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=key)
        np.testing.assert_allclose(total, ref[key].mean(), rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=key)


def _grad_and_norms(cm_unet, ref_name, norm):
    _, apply_fn, params = cm_unet
    teacher = KarrasDenoiser(distillation=False).denoise_fn(apply_fn, params["teacher"])
    cd = ref_name == "cd_loss"

    @jax.jit
    def grad(batch, num_scales):
        return jax.grad(lambda p: consistency_loss(
            p, None, None, batch=batch, apply_fn=apply_fn, num_scales=num_scales,
            target_params=params["target"], teacher_denoise_fn=teacher if cd else None,
            loss_norm=norm)[0])(params["online"])

    def run(n):
        sd = state_dict_from_params(grad(_ref_batch(cm_ref(ref_name), n), jnp.int32(n)))
        return {k: v.reshape(cm_ref("params")[f"online/{k}"].shape) for k, v in sd.items()}

    return run


def _check_grad_norms(grads, ref_norms, what):
    keys = cm_ref("params")["param_keys"]
    norms = np.array([np.linalg.norm(grads[k].astype(np.float64)) for k in keys])
    for k, got, want in zip(keys, norms, ref_norms):
        if k in ZERO_GRAD_PARAMS:
            assert got <= 1e-7 and want <= 1e-7, f"{what} {k}: {got} {want}"
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{what} {k}")


def test_cd_gradient_matches_reference(cm_unet):
    """The full gradient of mean(N18/l2/loss) w.r.t. the online UNet, and the N=40 grad norms
    (same compiled function)."""
    run = _grad_and_norms(cm_unet, "cd_loss", "l2")
    ref = cm_ref("cd_loss")
    grads = run(18)
    keys = cm_ref("params")["param_keys"]
    gmax = max(float(np.max(np.abs(ref[f"grad/{k}"]))) for k in keys)
    for k in keys:
        assert_close(grads[k], ref[f"grad/{k}"], GRAD_REL_ATOL * gmax, f"grad/{k}")
    _check_grad_norms(grads, ref["N18/l2/grad_norms_f64"], "N18/l2")
    _check_grad_norms(run(40), ref["N40/l2/grad_norms_f64"], "N40/l2")


@pytest.mark.slow
@pytest.mark.parametrize("ref_name,norm", [("cd_loss", "l1"), ("cd_loss", "l2-32"),
                                           ("ct_loss", "l2"), ("ct_loss", "l1")])
def test_gradient_norms_match_reference(cm_unet, ref_name, norm):
    run = _grad_and_norms(cm_unet, ref_name, norm)
    ref = cm_ref(ref_name)
    for n in sorted({int(k.split("/")[0][1:]) for k in ref
                     if k.startswith("N") and k.endswith(f"/{norm}/grad_norms_f64")}):
        _check_grad_norms(run(n), ref[f"N{n}/{norm}/grad_norms_f64"], f"N{n}/{norm}")


def test_bilinear_resize_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 3, 24, 64)).astype(np.float32)
    for size in (32, 48, 16):
        expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size,
                                                   mode="bilinear").numpy()
        got = torch_bilinear_resize(jnp.asarray(_nhwc(x)), size)
        assert_close(got, _nhwc(expected), 2e-6, f"resize to {size}")


def test_loss_rejects_bad_options():
    batch = {"x_start": jnp.zeros((2, 4, 4, 3)), "noise": jnp.zeros((2, 4, 4, 3)),
             "indices": jnp.zeros((2,), jnp.int32)}

    def apply_fn(p, x, t, y, rng):
        return x

    kw = {"batch": batch, "apply_fn": apply_fn, "num_scales": 18}
    with pytest.raises(NotImplementedError, match="lpips"):
        consistency_loss({}, None, None, loss_norm="lpips", **kw)
    with pytest.raises(ValueError, match="loss_norm"):
        consistency_loss({}, None, None, loss_norm="l3", **kw)
    with pytest.raises(ValueError, match="solver"):
        consistency_loss({}, None, None, solver="rk4", **kw)
    with pytest.raises(ValueError, match="delta"):
        consistency_loss({}, jnp.zeros((2, 4, 4, 1)), None, **kw)
    with pytest.raises(ValueError, match="teacher"):
        consistency_distillation_loss({}, None, None, teacher_denoise_fn=None, **kw)
    with pytest.raises(ValueError, match="teacher"):
        consistency_training_loss({}, None, None, teacher_denoise_fn=lambda x, s: x, **kw)


# ----------------------------------------------------------------------------------------------
# samplers against the reference


@pytest.fixture(scope="module")
def sample_jit(cm_unet):
    _, apply_fn, params = cm_unet
    cm, edm = KarrasDenoiser(distillation=True), KarrasDenoiser(distillation=False)

    @functools.partial(jax.jit, static_argnames=("sampler", "ts", "steps"))
    def run(z, clip, step_noise, sampler, ts=None, steps=40):
        den = (edm if sampler == "heun" else cm).denoise_fn(
            apply_fn, params["teacher" if sampler == "heun" else "online"])
        return karras_sample(den, z, sampler=sampler, steps=steps, clip_denoised=clip, ts=ts,
                             step_noise=step_noise, return_trajectory=True)

    return run


def _per_step_close(actual, expected, what):
    for i in range(expected.shape[0]):
        assert_close(actual[i], expected[i], large_atol(expected[i]), f"{what}[{i}]")


def test_onestep_sampler_matches_reference(sample_jit):
    ref = cm_ref("samplers")
    z = _nhwc(ref["z"])
    np.testing.assert_array_equal(karras_sigmas(40, 0.002, 80.0)[0], ref["onestep/sigma"][0])
    for clip in (True, False):
        sample, traj = sample_jit(z, jnp.asarray(clip), None, "onestep")
        assert_close(sample, _nhwc(ref[f"onestep/{'clip' if clip else 'noclip'}/sample"]),
                     UNIT_ATOL, f"onestep clip={clip}")
        if not clip:
            assert_close(traj["sampler_return"], _nhwc(ref["onestep/denoised_raw"]), UNIT_ATOL,
                         "onestep denoised_raw")


@pytest.mark.parametrize("ts,steps", [((0, 22, 39), 40), ((0, 106, 200), 201)])
def test_multistep_sampler_matches_reference(sample_jit, ts, steps):
    ref = cm_ref("samplers")
    key = "multistep_ts" + "_".join(map(str, ts))
    z, noise = _nhwc(ref["z"]), _nhwc(ref[f"{key}/noise"])
    for clip in (True, False):
        sample, traj = sample_jit(z, jnp.asarray(clip), noise, "multistep", ts, steps)
        assert_close(sample, _nhwc(ref[f"{key}/{'clip' if clip else 'noclip'}/sample"]),
                     UNIT_ATOL, f"{key} clip={clip}")
        if clip:
            np.testing.assert_array_equal(traj["sigma"], ref[f"{key}/sigma_per_step"][:, 0])
            _per_step_close(traj["x"], _nhwc(ref[f"{key}/x_in_per_step"]), "x_in_per_step")
            assert_close(traj["denoised"], np.clip(_nhwc(ref[f"{key}/denoised_raw_per_step"]),
                                                   -1, 1), UNIT_ATOL, "denoised")
            assert_close(traj["sampler_return"], _nhwc(ref[f"{key}/sampler_return"]), UNIT_ATOL,
                         "sampler_return")


def test_heun_sampler_matches_reference(sample_jit):
    ref = cm_ref("samplers")
    z = _nhwc(ref["z"])
    np.testing.assert_array_equal(karras_sigmas(18, 0.002, 80.0), ref["heun18/sigmas"])
    for clip in (True, False):
        sample, traj = sample_jit(z, jnp.asarray(clip), None, "heun", None, 18)
        assert_close(sample, _nhwc(ref[f"heun18/{'clip' if clip else 'noclip'}/sample"]),
                     UNIT_ATOL, f"heun18 clip={clip}")
        if clip:
            assert traj["x"].shape == (19, 4, 16, 16, 3)
            _per_step_close(traj["x"], _nhwc(ref["heun18/x_per_step"]), "heun18 x_per_step")
            assert_close(traj["denoised"], _nhwc(ref["heun18/denoised_per_step"]), UNIT_ATOL,
                         "heun18 denoised_per_step")


# ----------------------------------------------------------------------------------------------
# EMA / scales schedule


@pytest.mark.parametrize("cfg", ["cd_launch", "ct_imagenet64_launch", "ct_lsun256_launch",
                                 "fixed_progressive"])
def test_ema_and_scales_match_reference(cfg):
    ref = cm_ref("ema_scales")
    fn = create_ema_and_scales_fn(**cm_manifest()["ema_scales"][cfg]["config"])
    got = [fn(int(s)) for s in ref[f"{cfg}/steps"]]
    np.testing.assert_array_equal([g[0] for g in got], ref[f"{cfg}/target_ema"])
    np.testing.assert_array_equal([g[1] for g in got], ref[f"{cfg}/num_scales"])
    assert all(isinstance(e, float) and isinstance(n, int) for e, n in got)


def test_ema_and_scales_rejects_unsupported():
    with pytest.raises(ValueError, match="not supported"):
        create_ema_and_scales_fn(**cm_manifest()["ema_scales"]["adaptive_fixed"]["config"])
    with pytest.raises(ValueError, match="scale_mode"):
        create_ema_and_scales_fn("fixed", 0.95, "linear", 2, 150, 1000)
    fn = create_ema_and_scales_fn("fixed", 0.95, "progdist", 4096, 4096, 10 ** 6, 100)
    assert fn(0) == (1.0, 4096) and fn(150) == (1.0, 2048) and fn(10 ** 6)[1] == 1


# ----------------------------------------------------------------------------------------------
# properties: Gaussian data N(0, S^2 I), where everything is known in closed form
#
# Exact denoiser D(x, sigma) = S^2 / (S^2 + sigma^2) x. The PF ODE dx/dsigma = (x - D)/sigma =
# x sigma / (S^2 + sigma^2) has solutions x(sigma) ∝ sqrt(S^2 + sigma^2), so the exact consistency
# function (mapping to sigma_min) is f(x, sigma) = k(sigma) x, k = sqrt(S^2 + smin^2)/sqrt(S^2 + sigma^2).
# The network F that the boundary-condition parameterisation needs, f = c_skip x + c_out F(c_in x),
# is F = r(sigma) x with r = (k - c_skip) / c_out, written without the 0/0 at sigma_min:
#   k - c_skip = a [a / (a^2 + sd^2) - (sigma + smin) / A],  a = sigma - smin,
#   A = sqrt(S^2 + sigma^2) (sqrt(S^2 + smin^2) + sqrt(S^2 + sigma^2)),
#   c_out = a sd / sqrt(sigma^2 + sd^2).

S, SD, SMIN = 0.5, 0.5, 0.002


def _k(sig, s=S):
    return np.sqrt(s ** 2 + SMIN ** 2) / jnp.sqrt(s ** 2 + sig ** 2)


def _gaussian_cm_apply(params, u, t, y, rng):
    """The exact consistency network for N(0, s^2 I) data with s = params['s']."""
    s = params["s"]
    sig = jnp.exp(t / 250.0)  # invert the time embedding 250 log(sigma)
    a = sig - SMIN
    big_a = jnp.sqrt(s ** 2 + sig ** 2) * (jnp.sqrt(s ** 2 + SMIN ** 2) + jnp.sqrt(s ** 2 + sig ** 2))
    r = jnp.sqrt(sig ** 2 + SD ** 2) / SD * (a / (a ** 2 + SD ** 2) - (sig + SMIN) / big_a)
    x = u * jnp.sqrt(sig ** 2 + SD ** 2)[:, None, None, None]  # undo c_in
    return r[:, None, None, None] * x


def _gaussian_teacher(x, sig):
    return (S ** 2 / (S ** 2 + sig ** 2))[:, None, None, None] * x


def _gaussian_batch(n_scales, b=64, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"x_start": S * jax.random.normal(k1, (b, 8, 8, 3)),
            "noise": jax.random.normal(k2, (b, 8, 8, 3)),
            "indices": jnp.arange(b, dtype=jnp.int32) % (n_scales - 1)}


def _gaussian_cd(n_scales, s=S, solver="heun", delta=None, teacher_from_perturbed=True, b=64):
    return consistency_loss({"s": jnp.float32(s)}, delta, None, batch=_gaussian_batch(n_scales, b),
                            apply_fn=_gaussian_cm_apply, num_scales=n_scales,
                            teacher_denoise_fn=_gaussian_teacher, solver=solver,
                            teacher_from_perturbed=teacher_from_perturbed,
                            return_intermediates=True)


def test_gaussian_consistency_function_is_exact():
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 4, 4, 3))
    sig = jnp.asarray([0.002, 0.01, 0.5, 5.0, 80.0], jnp.float32)
    _, f = denoise(_gaussian_cm_apply, {"s": S}, x, sig, distillation=True)
    np.testing.assert_allclose(f, _k(sig)[:, None, None, None] * x, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(f[0], x[0])


def test_cd_loss_of_exact_consistency_function_vanishes():
    """With the exact teacher, the exact consistency function has ~0 CD loss; what is left is the
    ODE solver's truncation error (Heun: local O(h^3), so the loss falls ~(40/18)^6 ~ 120x from
    N = 18 to 40; measured 1.1e-5 -> 6.5e-8), and a wrong function (data std 0.6 instead of 0.5)
    is far worse."""
    exact18, exact40 = float(_gaussian_cd(18)[0]), float(_gaussian_cd(40)[0])
    assert exact40 < 3e-7 and exact18 / exact40 > 50
    assert float(_gaussian_cd(40, solver="euler")[0]) > 10 * exact40  # Euler is first order
    assert float(_gaussian_cd(1000)[0]) < 1e-9                         # float32 noise floor
    wrong40 = float(_gaussian_cd(40, s=0.6)[0])
    assert wrong40 > 100 * exact40


def test_ct_loss_of_exact_consistency_function_vanishes():
    """One-point data x0: D = x0, the ODE paths are straight lines, f(x, sigma) = x0 + (x - x0)
    smin/sigma, and CT's Euler step is exact, so the loss is 0 up to rounding; with the exponent of
    smin/sigma changed from 1 to 0.5 it is not."""
    x0 = jax.random.uniform(jax.random.PRNGKey(5), (1, 8, 8, 3), minval=-1, maxval=1)
    x0 = jnp.broadcast_to(x0, (32, 8, 8, 3))

    def apply_fn(params, u, t, y, rng):
        sig = jnp.exp(t / 250.0)[:, None, None, None]
        x = u * jnp.sqrt(sig ** 2 + SD ** 2)
        c_skip, c_out, _ = boundary_scalings(sig)
        f = x0 + (x - x0) * (SMIN / sig) ** params["p"]
        return (f - c_skip * x) / jnp.where(c_out == 0, 1.0, c_out)

    for n_scales in (18, 2):
        batch = _gaussian_batch(n_scales, 32) | {"x_start": x0}
        exact = consistency_training_loss({"p": 1.0}, None, None, batch=batch, apply_fn=apply_fn,
                                          num_scales=n_scales)[0]
        wrong = consistency_training_loss({"p": 0.5}, None, None, batch=batch, apply_fn=apply_fn,
                                          num_scales=n_scales)[0]
        assert float(exact) < 1e-9 and float(wrong) > 1e-4


def test_delta_none_equals_zero_delta():
    delta0 = jnp.zeros((64, 8, 8, 3))
    l_none, aux_none = _gaussian_cd(18, s=0.6)
    for tfp in (True, False):
        l_zero, aux_zero = _gaussian_cd(18, s=0.6, delta=delta0, teacher_from_perturbed=tfp)
        np.testing.assert_allclose(l_zero, l_none, rtol=1e-6, atol=0)
        for k in ("distiller", "distiller_target", "x_t2", "loss"):
            np.testing.assert_allclose(aux_zero[k], aux_none[k], rtol=1e-6, atol=1e-7)


def test_delta_semantics_and_gradient():
    """teacher_from_perturbed=True: the target moves with δ, so the exact consistency function
    stays consistent (loss ~0); False: the target ignores δ and the loss is ~mean|k(t) δ|^2.
    Either way ∂loss/∂δ flows only through the student (the solver output is stop-gradiented)."""
    b = 64
    delta = 0.3 * jax.random.normal(jax.random.PRNGKey(7), (b, 8, 8, 3))
    clean = float(_gaussian_cd(40)[0])
    moved, _ = _gaussian_cd(40, delta=delta, teacher_from_perturbed=True)
    fixed, aux = _gaussian_cd(40, delta=delta, teacher_from_perturbed=False)
    k_t = _k(aux["t"])[:, None, None, None]
    expected_fixed = float(jnp.mean(jnp.mean((k_t * delta) ** 2, axis=(1, 2, 3))))
    assert float(moved) < 10 * clean + 1e-9
    np.testing.assert_allclose(float(fixed), expected_fixed, rtol=0.05)
    assert float(fixed) > 1e3 * float(moved)

    for tfp in (True, False):
        (_, aux), g = jax.value_and_grad(
            lambda d, tfp=tfp: _gaussian_cd(40, delta=d, teacher_from_perturbed=tfp),
            has_aux=True)(delta)
        d_dim = 8 * 8 * 3
        # d/dδ mean_b mean_pixels (f(x_t + δ) - target)^2 with df/dx = k(t) and target held fixed
        expected = 2.0 / (b * d_dim) * _k(aux["t"])[:, None, None, None] * (
            aux["distiller"] - aux["distiller_target"])
        np.testing.assert_allclose(g, expected, rtol=2e-3, atol=1e-9 * float(jnp.max(
            jnp.abs(expected))) + 1e-12)


def test_consistency_loss_drives_run_adversary():
    """The loss plugs into the fast-AT driver: step 0 is the clean loss, then δ grows by the
    step size and (target ignoring δ) the loss rises."""
    batch = _gaussian_batch(18, 16)
    loss_fn = functools.partial(consistency_loss, batch=batch, apply_fn=_gaussian_cm_apply,
                                num_scales=18, teacher_denoise_fn=_gaussian_teacher,
                                target_params={"s": jnp.float32(S)}, teacher_from_perturbed=False)
    adversary = AdversaryConfig(kind="fast", steps=3, step_size=0.5, max_norm=10.0)
    state = {"s": jnp.float32(0.6)}
    _, m = jax.jit(lambda st: run_adversary(
        loss_fn, st, jax.random.PRNGKey(0), adversary=adversary, delta_shape=(16, 8, 8, 3),
        params_of=lambda s: s, apply_update=lambda s, g, aux: s))(state)
    clean = loss_fn(state, None, None)[0]
    np.testing.assert_allclose(m["loss"][0], clean, rtol=1e-5)
    np.testing.assert_array_equal(m["delta_norm"][0], 0.0)
    np.testing.assert_allclose(m["delta_norm"][1], 0.5, rtol=1e-5)
    assert np.all(m["delta_norm"][2] > 0.5) and np.all(m["delta_norm"][2] <= 1.0 + 1e-5)
    assert m["loss"][2] > m["loss"][1] > m["loss"][0]
    assert m["aux"]["loss"].shape == (3, 16)


def test_pseudo_huber_weight_schedules_and_batch_weights():
    batch = _gaussian_batch(18, 16)
    base = {"apply_fn": _gaussian_cm_apply, "num_scales": 18,
            "teacher_denoise_fn": _gaussian_teacher, "return_intermediates": True}
    p = {"s": jnp.float32(0.6)}
    _, l2 = consistency_loss(p, None, None, batch=batch, loss_norm="l2", **base)
    diff = l2["distiller"] - l2["distiller_target"]
    sq = jnp.sum(diff ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(l2["loss"], sq / (8 * 8 * 3), rtol=1e-6)
    for huber_c, c in ((None, 0.00054 * np.sqrt(8 * 8 * 3)), (0.1, 0.1)):
        _, ph = consistency_loss(p, None, None, batch=batch, loss_norm="pseudo_huber",
                                 huber_c=huber_c, **base)
        np.testing.assert_allclose(ph["loss"], jnp.sqrt(sq + c ** 2) - c, rtol=1e-5)
    t = l2["t"]
    for schedule, w in (("snr", t ** -2), ("snr+1", t ** -2 + 1), ("karras", t ** -2 + 4),
                        ("truncated-snr", jnp.maximum(t ** -2, 1.0))):
        _, a = consistency_loss(p, None, None, batch=batch, loss_norm="l2",
                                denoiser=KarrasDenoiser(weight_schedule=schedule), **base)
        np.testing.assert_allclose(a["weights"], w, rtol=1e-6)
        np.testing.assert_allclose(a["loss"], l2["loss"] * w, rtol=1e-5)
    iw = jnp.linspace(0.0, 2.0, 16)
    total, a = consistency_loss(p, None, None, batch=batch | {"weights": iw}, loss_norm="l2",
                                **base)
    np.testing.assert_allclose(total, jnp.mean(a["loss"] * iw), rtol=1e-6)
    with pytest.raises(ValueError, match="weight_schedule"):
        KarrasDenoiser(weight_schedule="lognormal")


def test_sample_indices_and_noise():
    x = jnp.zeros((256, 4, 4, 3))
    for n in (2, 18, jnp.int32(40)):
        out = sample_indices_and_noise(jax.random.PRNGKey(0), x, n)
        assert out["noise"].shape == x.shape and out["indices"].shape == (256,)
        assert int(out["indices"].min()) >= 0 and int(out["indices"].max()) <= int(n) - 2
    assert int(sample_indices_and_noise(jax.random.PRNGKey(0), x, 40)["indices"].max()) == 38


# ----------------------------------------------------------------------------------------------
# samplers and the VP wrapper on Gaussian data


def test_heun_sampler_integrates_the_pf_ode():
    """Exact denoiser: x(0) = x_T * S / sqrt(S^2 + sigma_max^2). Heun is second order globally
    (max relative error measured: 5.5% at 18 steps, 0.98% at 40, 0.15% at 100); with churn the
    marginal std stays S (measured 1.7% off at 100 steps, S_churn = 40)."""
    z = jax.random.normal(jax.random.PRNGKey(11), (64, 8, 8, 3))
    exact = z * 80.0 * S / np.sqrt(S ** 2 + 80.0 ** 2)
    err = {}
    for n in (40, 100):
        out = sample_heun(_gaussian_teacher, z * 80.0, sigmas=karras_sigmas(n, 0.002, 80.0))
        err[n] = float(jnp.max(jnp.abs(out / exact - 1)))
    assert err[100] < 3e-3 and err[40] / err[100] > 4  # ~(100/40)^2 = 6.25
    sample = karras_sample(_gaussian_teacher, z, sampler="heun", steps=100, clip_denoised=False)
    np.testing.assert_allclose(sample, np.clip(exact, -1, 1), rtol=3e-3, atol=1e-6)
    sigmas = karras_sigmas(100, 0.002, 80.0)
    churned = sample_heun(_gaussian_teacher, z * 80.0, sigmas=sigmas, s_churn=40.0,
                          rng=jax.random.PRNGKey(12))
    assert abs(float(jnp.std(churned)) / S - 1) < 0.03
    assert float(jnp.max(jnp.abs(churned - exact))) > 0.1  # the churn noise did something
    with pytest.raises(ValueError, match="rng or step_noise"):
        sample_heun(_gaussian_teacher, z, sigmas=sigmas, s_churn=40.0)


def test_multistep_sampler_with_rng():
    z = jax.random.normal(jax.random.PRNGKey(13), (8, 4, 4, 3))

    def f(x, sig):  # exact consistency function of the Gaussian
        return _k(sig)[:, None, None, None] * x

    out = sample_multistep(f, z * 80.0, ts=(0, 20, 39), steps=40, rng=jax.random.PRNGKey(1))
    again = sample_multistep(f, z * 80.0, ts=(0, 20, 39), steps=40, rng=jax.random.PRNGKey(1))
    other = sample_multistep(f, z * 80.0, ts=(0, 20, 39), steps=40, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(out, again)
    assert float(jnp.max(jnp.abs(out - other))) > 1e-3
    with pytest.raises(ValueError, match="step_noise"):
        sample_multistep(f, z, ts=(0, 20, 39), steps=40, step_noise=jnp.zeros((3,) + z.shape))


@pytest.mark.parametrize("steps,respacing,rescale", [(1000, "", False), (500, "50", True)])
def test_vp_denoiser_is_exact_for_gaussian_data(steps, respacing, rescale):
    """The exact VP eps model of N(0, S^2 I) data, eps = sqrt(1 - ab) x_vp / (ab S^2 + 1 - ab),
    wrapped by vp_denoiser must be the exact EDM denoiser S^2 / (S^2 + sigma^2) x at the chain's
    noise levels, and receive the chain's (mapped, rescaled) timesteps there."""
    diffusion = create_gaussian_diffusion(steps=steps, timestep_respacing=respacing,
                                          rescale_timesteps=rescale)
    ab = np.asarray(diffusion.tables["alphas_cumprod"], np.float32)
    model_t = np.asarray(diffusion.model_timesteps(jnp.arange(len(ab))), np.float32)
    if rescale:  # the map really is in play: respaced indices scaled by 1000 / 500
        assert model_t[1] == 2.0 * float(diffusion.timestep_map[1]) > 1
    seen = {}

    def model_fn(x_vp, t):
        seen["t"] = t
        a = jnp.interp(t, jnp.asarray(model_t), jnp.asarray(ab))
        a = a[:, None, None, None]
        return jnp.sqrt(1 - a) * x_vp / (a * S ** 2 + 1 - a)

    den = jax.jit(vp_denoiser(model_fn, diffusion))
    idx = np.array([0, 3, len(ab) // 2, len(ab) - 1])
    sig = jnp.asarray(vp_sigmas(ab)[idx], jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(4), (4, 8, 8, 3)) * jnp.sqrt(S ** 2 + sig ** 2)[
        :, None, None, None]
    got, expected = den(x, sig), _gaussian_teacher(x, sig)
    for i in range(4):  # D = x - sigma * eps cancels |x| (up to 470) down to |D| ~ 0.005
        atol = 1e-5 * float(jnp.max(jnp.abs(expected[i]))) + 4 * float(
            np.spacing(np.float32(jnp.max(jnp.abs(x[i])))))
        assert_close(got[i], expected[i], atol, f"vp denoiser at sigma={float(sig[i])}")
    got_t = jax.jit(lambda x, s: (vp_denoiser(model_fn, diffusion)(x, s), seen["t"])[1])(x, sig)
    np.testing.assert_allclose(got_t, model_t[idx], rtol=1e-4, atol=2e-2)
    # sigma beyond the chain's range: time clamped to the last step, image scaling still exact
    big = jnp.full((4,), 2.0 * float(vp_sigmas(ab)[-1]), jnp.float32)
    got_t = jax.jit(lambda x, s: (vp_denoiser(model_fn, diffusion)(x, s), seen["t"])[1])(x, big)
    np.testing.assert_allclose(got_t, np.full(4, model_t[-1]), rtol=1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        vp_denoiser(model_fn, create_gaussian_diffusion(steps=100, predict_xstart=True))


def test_cm_state_dict_conversion():
    sd = {"middle_block.1.qkv.weight": np.ones((6, 2, 1, 1)), "middle_block.1.qkv.bias": np.ones(6),
          "input_blocks.0.0.weight": np.ones((4, 3, 3, 3))}
    out = cm_to_guided_state_dict(sd)
    assert out["middle_block.1.qkv.weight"].shape == (6, 2, 1)
    assert out["input_blocks.0.0.weight"].shape == (4, 3, 3, 3)
    with pytest.raises(ValueError, match="1x1"):
        cm_to_guided_state_dict({"middle_block.1.proj_out.weight": np.ones((2, 2, 3, 3))})
