"""Gaussian diffusion: schedules, respacing, losses and p_mean_variance against the reference.

Tolerances: the betas (Python's scalar ``math.cos``, the same glibc code path as the reference)
and the products/quotients/square roots built from them (correctly rounded IEEE operations) match
bit for bit on every CPU. The tables that apply ``np.log`` do not: NumPy dispatches its float64
log/exp at run time (AVX-512 kernels on CPUs that have them, glibc's scalar code elsewhere), and the
two paths differ by up to 1 ulp of the argument (measured over 3e6 values: |diff| <=
1.0 eps * max(1, |y|) for log, 1.1 for exp). Those tables are compared with ``F64_TABLE_TOL`` =
4 eps relative and absolute (absolute for logs near 0): the measured worst case, doubled for the
reference's own path, doubled again for a margin. Their float32 copies may then round the other way
at a tie: 1 ulp of float32 (``assert_array_max_ulp``). Loss terms are float32 arithmetic on the stored network outputs; the reference
itself moves by up to 9e-8 relative under a different thread count, so rtol 1e-5 leaves room for
XLA's different summation order but catches any wrong coefficient.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_ref, nchw_to_nhwc

from atdiff_jax.diffusion import likelihood, schedules
from atdiff_jax.diffusion.gaussian import (GaussianDiffusion, create_gaussian_diffusion,
                                           diffusion_tables)


F64_TABLE_TOL = 4 * np.finfo(np.float64).eps  # see the module docstring
# Tables computed without a transcendental function: bit for bit on every CPU.
EXACT_TABLES = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
                "sqrt_alphas_cumprod", "one_minus_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                "posterior_mean_coef1", "posterior_mean_coef2", "fixed_large_variance",
                "recip_posterior_mean_coef1", "posterior_coef2_over_coef1"}


def assert_table_matches(got, want, name):
    """float64 table vs the reference: exact unless it applies np.log (see the docstring)."""
    if name in EXACT_TABLES:
        np.testing.assert_array_equal(got, want, err_msg=name)
    else:
        np.testing.assert_allclose(got, want, rtol=F64_TABLE_TOL, atol=F64_TABLE_TOL, err_msg=name)


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                     rescale_learned_sigmas=True)


def test_named_schedules_match_reference():
    ref = load_ref("schedule")
    np.testing.assert_array_equal(schedules.get_named_beta_schedule("cosine", 1000), ref["base/betas"])
    np.testing.assert_array_equal(np.cumprod(1 - ref["base/betas"]), ref["base/alphas_cumprod"])
    lin = schedules.get_named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    lin250 = schedules.get_named_beta_schedule("linear", 250)
    assert lin250[0] == pytest.approx(4e-4) and lin250[-1] == pytest.approx(0.08)
    cos = schedules.get_named_beta_schedule("cosine", 1000)
    assert cos.max() == pytest.approx(0.999)  # max_beta clip at the end of the cosine schedule


def test_training_tables_match_reference():
    ref = load_ref("schedule")
    betas, tmap = schedules.respace_betas(schedules.get_named_beta_schedule("cosine", 1000),
                                          schedules.space_timesteps(1000, [1000]))
    np.testing.assert_array_equal(tmap, np.arange(1000))
    tables = diffusion_tables(betas)
    names = [k[len("train/"):] for k in ref if k.startswith("train/")]
    assert len(names) == 13
    assert {n for n in names if n not in EXACT_TABLES} == {"log_one_minus_alphas_cumprod",
                                                         "posterior_log_variance_clipped"}
    for name in names:
        assert_table_matches(tables[name], ref[f"train/{name}"], name)


@pytest.mark.parametrize("spec", ["ddim50", "ddim20", "ddim10", "ddim8", "ddim5",
                                  "50", "20", "10", "8", "5"])
def test_respacing_matches_reference(spec):
    ref = load_ref("schedule")
    d = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                  timestep_respacing=spec)
    np.testing.assert_array_equal(d.timestep_map, ref[f"respaced/{spec}/timestep_map"])
    full = diffusion_tables(schedules.respace_betas(
        schedules.get_named_beta_schedule("cosine", 1000),
        schedules.space_timesteps(1000, spec))[0])
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped"):
        assert_table_matches(full[name], ref[f"respaced/{spec}/{name}"], name)
        # The pytree stores the same tables rounded once to float32.
        want32 = ref[f"respaced/{spec}/{name}"].astype(np.float32)
        if name in EXACT_TABLES:
            np.testing.assert_array_equal(d.tables[name], want32, err_msg=name)
        else:
            np.testing.assert_array_max_ulp(d.tables[name], want32, maxulp=1)


def test_section_respacing_and_errors():
    # "10,5": first half strided to 10 steps, second half to 5.
    steps = sorted(schedules.space_timesteps(100, "10,5"))
    assert steps == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]
    assert sorted(schedules.space_timesteps(100, "ddim4")) == [0, 25, 50, 75]
    with pytest.raises(ValueError, match="integer stride"):
        schedules.space_timesteps(10, "ddim6")
    with pytest.raises(ValueError, match="cannot divide"):
        schedules.space_timesteps(10, "6,6")
    with pytest.raises(ValueError, match="timestep_respacing"):
        schedules.space_timesteps(10, "abc")
    with pytest.raises(ValueError, match="noise_schedule"):
        schedules.get_named_beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="model_var_type"):
        GaussianDiffusion.create(np.full(10, 0.1), model_var_type="large")


def test_model_sees_mapped_and_rescaled_timesteps():
    d = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim10")
    np.testing.assert_array_equal(d.model_timesteps(jnp.array([0, 9])), [0, 900])
    d = create_gaussian_diffusion(steps=500, rescale_timesteps=True, timestep_respacing="5")
    np.testing.assert_allclose(d.model_timesteps(jnp.arange(5)),
                               np.array(sorted(schedules.space_timesteps(500, "5"))) * 2.0)


def test_clean_losses_match_reference(diffusion):
    ref = load_ref("clean_loss")
    x0, noise = nchw_to_nhwc(ref["x_start"]), nchw_to_nhwc(ref["noise"])
    out = nchw_to_nhwc(ref["model_output"])
    np.testing.assert_array_equal(diffusion.q_sample(x0, ref["t"], noise), nchw_to_nhwc(ref["x_t"]))
    seen = {}

    def model_fn(x, t):
        seen["x"], seen["t"] = x, t
        return out

    terms = diffusion.training_losses(model_fn, x0, ref["t"], noise)
    np.testing.assert_array_equal(seen["x"], nchw_to_nhwc(ref["x_t"]))
    np.testing.assert_array_equal(seen["t"], ref["t"])
    for k in ("mse", "vb", "loss"):
        np.testing.assert_allclose(terms[k], ref[f"plain/{k}"], rtol=1e-5, err_msg=k)
    # The adversarial loss at delta = 0 is the clean loss, bit for bit.
    adv = diffusion.training_losses(model_fn, x0, ref["t"], noise, delta=jnp.zeros_like(x0))
    for k in ("mse", "vb", "loss"):
        np.testing.assert_array_equal(adv[k], terms[k])


@pytest.mark.parametrize("target_type", ["delta_detach", "delta", "original"])
def test_adversarial_losses_match_reference(diffusion, target_type):
    ref = load_ref("adv_loss")
    x0, noise, delta = (nchw_to_nhwc(ref[k]) for k in ("x_start", "noise", "delta"))
    out = nchw_to_nhwc(ref["delta_detach/model_output"])  # the network sees x_t + delta for all
    seen = {}

    def model_fn(x, t):
        seen["x"] = x
        return out

    terms = diffusion.training_losses(model_fn, x0, ref["t"], noise, delta=delta,
                                      target_type=target_type)
    x_t = diffusion.q_sample(x0, ref["t"], noise)
    np.testing.assert_allclose(seen["x"], x_t + delta, rtol=0, atol=0)
    for k in ("mse", "vb", "loss"):
        np.testing.assert_allclose(terms[k], ref[f"{target_type}/{k}"], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(jnp.mean(terms["loss"]), ref[f"{target_type}/mean_loss"], rtol=1e-5)


def test_target_types_differ_only_where_they_should(diffusion):
    ref = load_ref("adv_loss")
    x0, noise, delta = (jnp.asarray(nchw_to_nhwc(ref[k])) for k in ("x_start", "noise", "delta"))
    out = jnp.asarray(nchw_to_nhwc(ref["delta_detach/model_output"]))
    t = jnp.asarray(ref["t"])

    def loss_wrt_delta(d, target_type):
        # A model that reads its input, so the gradient flows through the network path too.
        model_fn = lambda x, tt: out + 0.01 * jnp.concatenate([x, x], -1)  # noqa: E731
        return jnp.mean(diffusion.training_losses(model_fn, x0, t, noise, delta=d,
                                                  target_type=target_type)["loss"])

    grads = {tt: jax.grad(loss_wrt_delta)(delta, tt) for tt in ("delta_detach", "delta", "original")}
    # delta_detach: gradient only through the network input; 'delta' adds the target path.
    assert not np.allclose(grads["delta_detach"], grads["delta"], rtol=1e-3)
    assert np.abs(grads["delta_detach"]).max() > 0


def test_ddpm_ip_perturbs_input_not_target(diffusion):
    ref = load_ref("clean_loss")
    x0, noise = nchw_to_nhwc(ref["x_start"]), nchw_to_nhwc(ref["noise"])
    ip = np.asarray(jax.random.normal(jax.random.key(0), x0.shape))
    seen = {}

    def model_fn(x, t):
        seen["x"] = x
        return jnp.zeros(x.shape[:-1] + (6,))

    terms = diffusion.training_losses(model_fn, x0, ref["t"], noise, input_perturb=0.1, ip_noise=ip)
    np.testing.assert_allclose(seen["x"], diffusion.q_sample(x0, ref["t"], noise + 0.1 * ip),
                               rtol=1e-6, atol=1e-6)
    # Zero eps prediction: mse is the mean square of the *unperturbed* noise.
    np.testing.assert_allclose(terms["mse"], np.mean(noise ** 2, axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="ip_noise"):
        diffusion.training_losses(model_fn, x0, ref["t"], noise, input_perturb=0.1)


def test_normal_kl_and_decoder_likelihood():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=100), rng.normal(size=100)
    lv1, lv2 = rng.normal(size=100), rng.normal(size=100)
    expected = (np.log(np.exp(0.5 * lv2) / np.exp(0.5 * lv1))
                + (np.exp(lv1) + (m1 - m2) ** 2) / (2 * np.exp(lv2)) - 0.5)
    np.testing.assert_allclose(likelihood.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)
    # The 256 bins of the decoder partition the real line: probabilities sum to 1.
    x = (np.arange(256) / 127.5 - 1.0).astype(np.float32)
    for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0), (0.95, -1.0)):
        lp = likelihood.discretized_gaussian_log_likelihood(
            x, means=np.float32(mean), log_scales=np.float32(log_scale))
        assert float(jnp.sum(jnp.exp(lp))) == pytest.approx(1.0, abs=2e-3)


def test_p_mean_variance_variance_types():
    betas = schedules.get_named_beta_schedule("linear", 100)
    t = jnp.array([0, 1, 50, 99])
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, 4, 2)), jnp.float32)
    tables = diffusion_tables(betas)
    for var_type, expected in (("fixed_small", "posterior_variance"),
                               ("fixed_large", "fixed_large_variance")):
        d = GaussianDiffusion.create(betas, model_var_type=var_type)
        out = d.p_mean_variance_from_output(jnp.zeros_like(x), x, t, clip_denoised=False)
        np.testing.assert_allclose(out["variance"][:, 0, 0, 0],
                                   tables[expected][np.asarray(t)].astype(np.float32))
        # eps = 0: x_0 prediction is x_t / sqrt(abar_t).
        np.testing.assert_allclose(out["pred_xstart"],
                                   x / np.sqrt(tables["alphas_cumprod"][np.asarray(t)])[:, None, None, None],
                                   rtol=1e-5)
    # fixed_large uses beta_t except at t=0 where it uses the posterior variance of t=1.
    assert tables["fixed_large_variance"][0] == tables["posterior_variance"][1]
    np.testing.assert_array_equal(tables["fixed_large_variance"][1:], betas[1:])
    # start_x prediction: mean is the posterior mean at the (clipped) prediction.
    d = GaussianDiffusion.create(betas, model_mean_type="start_x", model_var_type="fixed_small")
    out = d.p_mean_variance_from_output(jnp.full_like(x, 3.0), x, t, clip_denoised=True)
    np.testing.assert_array_equal(out["pred_xstart"], jnp.ones_like(x))
    mean, _, _ = d.q_posterior_mean_variance(jnp.ones_like(x), x, t)
    np.testing.assert_allclose(out["mean"], mean)
    # previous_x prediction inverts the posterior mean.
    d = GaussianDiffusion.create(betas, model_mean_type="previous_x", model_var_type="fixed_small")
    x0 = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, size=x.shape), jnp.float32)
    xprev = d.q_posterior_mean_variance(x0, x, t)[0]
    out = d.p_mean_variance_from_output(xprev, x, t, clip_denoised=False)
    np.testing.assert_allclose(out["pred_xstart"][1:], x0[1:], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance_from_output(jnp.zeros(x.shape[:-1] + (4,)), x, t)
