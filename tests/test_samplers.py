"""DDIM, IDDPM ancestral and epsilon-scaling samplers against the reference trajectories.

Tolerance atol 1e-4 on DDIM states and p_mean_variance outputs: the reference itself moves by up
to 1.9e-5 with a different thread count, and ten sequential UNet evaluations compound that.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_ref, nchw_to_nhwc

from atdiff_jax.diffusion.gaussian import create_gaussian_diffusion


def _diffusion(respacing):
    return create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                     rescale_learned_sigmas=True, timestep_respacing=respacing)


@pytest.fixture(scope="module")
def ddim10():
    return _diffusion("ddim10")


def test_ddim_trajectory_matches_reference(ref_model_fn, ddim10):
    ref = load_ref("samplers")
    np.testing.assert_array_equal(ddim10.timestep_map, ref["ddim/timestep_map"])
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return ref_model_fn(x, t)

    sample, traj = jax.jit(lambda x: ddim10.ddim_sample_loop(
        model_fn, x, eta=0.0, clip_denoised=True, return_trajectory=True))(nchw_to_nhwc(ref["x_T"]))
    expected = nchw_to_nhwc(ref["ddim/x"])
    assert traj.shape == expected.shape
    np.testing.assert_allclose(traj, expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(sample, traj[-1])
    assert len(seen) == 1  # traced once: one lax.scan, not a Python loop over steps


@pytest.mark.parametrize("eps_scale,prefix", [(1.0, "pmv"), (1.017, "pmv_es")])
def test_p_mean_variance_and_es_match_reference(ref_model_fn, ddim10, eps_scale, prefix):
    ref = load_ref("samplers")
    xs = nchw_to_nhwc(ref["ddim/x"])[:-1]
    idx = ref["ddim/t_index"]
    pmv = jax.jit(lambda x, t: ddim10.p_mean_variance(ref_model_fn, x, t, clip_denoised=True,
                                                      eps_scale=eps_scale))
    for k in range(10):
        out = pmv(xs[k], jnp.full((4,), idx[k]))
        keys = ("mean", "pred_xstart") if prefix == "pmv_es" else ("mean", "variance",
                                                                   "log_variance", "pred_xstart")
        for key in keys:
            np.testing.assert_allclose(out[key], nchw_to_nhwc(ref[f"{prefix}/{key}"][k]), rtol=0,
                                       atol=1e-4, err_msg=f"{key} step {k}")
        if prefix == "pmv_es":
            np.testing.assert_allclose(out["log_variance"], nchw_to_nhwc(ref["pmv/log_variance"][k]),
                                       rtol=0, atol=1e-4)


def test_iddpm_ancestral_step_is_mean_plus_scaled_noise(ref_model_fn, ddim10):
    ref = load_ref("samplers")
    xs = nchw_to_nhwc(ref["ddim/x"])
    noise = jax.random.normal(jax.random.key(0), xs[0].shape)
    for k in (0, 9):  # a step with noise and the last step (t = 0, no noise)
        t = jnp.full((4,), ref["ddim/t_index"][k])
        out = ddim10.p_sample(ref_model_fn, xs[k], t, noise)
        mean = nchw_to_nhwc(ref["pmv/mean"][k])
        std = np.exp(0.5 * nchw_to_nhwc(ref["pmv/log_variance"][k]))
        expected = mean + (std * noise if int(t[0]) > 0 else 0.0)
        np.testing.assert_allclose(out["sample"], expected, rtol=0, atol=1e-4)


def test_iddpm_and_es_loops_are_deterministic_per_key_and_class_conditional():
    # A tiny analytic "network": eps-prediction of a unit Gaussian's score plus a label offset.
    d = _diffusion("10")
    y = jnp.array([0, 1])

    def model_fn(x, t):
        eps = 0.5 * x + 0.1 * y[:, None, None, None]
        return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)

    x_T = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    run = jax.jit(lambda x, key, s: d.p_sample_loop(model_fn, x, key, eps_scale=s))
    a, b = run(x_T, jax.random.key(2), 1.0), run(x_T, jax.random.key(2), 1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(run(x_T, jax.random.key(3), 1.0), a)
    es = run(x_T, jax.random.key(2), 1.017)
    assert not np.allclose(es, a) and np.abs(es - a).max() < 0.5
    # The label changes the result: class-conditioning reaches the network through the closure.
    assert not np.allclose(a[0], a[1])
    with pytest.raises(ValueError, match="rng"):
        d.p_sample_loop(model_fn, x_T, None)


def test_ddim_eta_one_uses_noise_and_eta_zero_does_not():
    d = _diffusion("ddim5")
    model_fn = lambda x, t: jnp.concatenate([0.3 * x, jnp.zeros_like(x)], -1)  # noqa: E731
    x_T = jax.random.normal(jax.random.key(4), (2, 4, 4, 1))
    det = d.ddim_sample_loop(model_fn, x_T)
    np.testing.assert_array_equal(det, d.ddim_sample_loop(model_fn, x_T, jax.random.key(9)))
    s1 = d.ddim_sample_loop(model_fn, x_T, jax.random.key(5), eta=1.0)
    s2 = d.ddim_sample_loop(model_fn, x_T, jax.random.key(6), eta=1.0)
    assert not np.allclose(s1, s2) and not np.allclose(s1, det)


def _exact_eps_model(data, alphas_cumprod):
    """The exact eps-prediction for the empirical distribution of ``data`` [N,H,W,C]."""
    ab = jnp.asarray(alphas_cumprod, jnp.float32)

    def model_fn(x, t):
        a = ab[t]
        d2 = jnp.sum((x[:, None] - jnp.sqrt(a)[:, None, None, None, None] * data[None]) ** 2,
                     axis=(2, 3, 4))
        w = jax.nn.softmax(-d2 / (2.0 * (1.0 - a))[:, None], axis=1)
        x0 = jnp.einsum("bn,nhwc->bhwc", w, data)
        return (x - jnp.sqrt(a)[:, None, None, None] * x0) / jnp.sqrt(1.0 - a)[:, None, None, None]

    return model_fn


@pytest.mark.parametrize("spec", ["ddim10", "ddim50"])
def test_ddim_with_the_exact_denoiser_returns_members_of_the_data(spec):
    """A deterministic sampler driven by the exact model of a finite set must land on its points.

    The images have black backgrounds like MNIST: a sampler that shifted the image mean (the
    first steps divide by sqrt(alpha_bar) ~ 5e-5 under the cosine schedule, then clip) would end
    between data points or on grey backgrounds.
    """
    rng = np.random.default_rng(0)
    data = -np.ones((6, 8, 8, 1), np.float32)
    for i in range(6):  # one bright 3x3 stroke per image at a different place
        r, c = divmod(i, 3)
        data[i, 1 + 3 * r:4 + 3 * r, 1 + 2 * c:4 + 2 * c] = 1.0
    base = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    chain = base.respace(spec)
    model_fn = _exact_eps_model(jnp.asarray(data), base.tables["alphas_cumprod"])
    x_T = jnp.asarray(rng.standard_normal((12, 8, 8, 1)), jnp.float32)
    out = np.asarray(jax.jit(lambda x: chain.ddim_sample_loop(model_fn, x, clip_denoised=True))(x_T))
    dist = np.sqrt(((out[:, None] - data[None]) ** 2).mean(axis=(2, 3, 4)))
    assert dist.min(axis=1).max() < 1e-3
    # and the samples are not all the same point
    assert len(set(dist.argmin(axis=1).tolist())) >= 3


def test_sampler_fn_is_compiled_once_per_network_chain_and_steps():
    """Evaluating many checkpoints of one network reuses each compiled sampler."""
    import pathlib
    import runpy

    from atdiff_jax.samplers import sampler_fn
    from atdiff_jax.train.build import build_experiment
    config = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
                            )["get_config"]()
    a, b = build_experiment(config), build_experiment(config)
    fn = sampler_fn(a.model, a.diffusion, sampler="ddim", steps=4)
    assert sampler_fn(b.model, b.diffusion, sampler="ddim", steps=4) is fn
    assert sampler_fn(a.model, a.diffusion, sampler="ddim", steps=5) is not fn
    assert sampler_fn(a.model, a.diffusion.respace("50"), sampler="ddim", steps=4) is not fn
    config.model.num_channels = 64
    c = build_experiment(config)
    assert sampler_fn(c.model, c.diffusion, sampler="ddim", steps=4) is not fn
