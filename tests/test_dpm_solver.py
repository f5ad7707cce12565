"""Tests for atdiff_jax.diffusion.dpm_solver (DPM-Solver / DPM-Solver++).

Reference vectors: ``samplers.npz`` (``dpm/script/...``), made with the authors' copy of the public
DPM-Solver code (NoiseScheduleVP('discrete', cosine betas), DPM-Solver++ multistep order 2,
skip_type logSNR, t_start 0.992) on the random reference UNet (config A).

Tolerances:
* schedule tables and time steps: exact (they are built with the reference's float32 rounding);
* the UNet input times: 1e-4 absolute (values up to ~991, i.e. a few float32 ulps);
* trajectories: 1e-5 * max|x| (the README's suggestion; torch itself moves the samples by 8e-7
  of max|x| when run on 2 instead of 1 thread; samples reach ~200 because the network is random
  and DPM-Solver++ does not clip).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.diffusion import dpm_solver as D
from atdiff_jax.diffusion.schedules import get_named_beta_schedule

from conftest import load_ref, nchw_to_nhwc

BETAS = get_named_beta_schedule("cosine", 1000)


@pytest.fixture(scope="module")
def ns():
    return D.schedule_from_betas(BETAS)


@pytest.fixture(scope="module")
def ref():
    return load_ref("samplers")


# ---------------------------------------------------------------------------------------------
# Schedule, time steps, orders
# ---------------------------------------------------------------------------------------------

def test_schedule_tables_match_reference(ns, ref):
    assert ns.total_N == int(ref["dpm/script/total_N"]) == 996
    assert ns.t_array.dtype == np.float32 and ns.log_alpha_array.dtype == np.float32
    np.testing.assert_array_equal(ns.t_array, ref["dpm/script/ns_t_array"])
    np.testing.assert_array_equal(ns.log_alpha_array, ref["dpm/script/ns_log_alpha_array"])


def test_schedule_functions(ns):
    # At the grid points the interpolation returns the table values.
    idx = np.array([0, 1, 100, 500, 994, 995])
    t = ns.t_array[idx]
    np.testing.assert_allclose(np.asarray(ns.marginal_log_mean_coeff(t)),
                               ns.log_alpha_array[idx], rtol=1e-6, atol=0)
    # Halfway between grid points it is the midpoint (piecewise linear in t).
    tm = 0.5 * (ns.t_array[10] + ns.t_array[11])
    np.testing.assert_allclose(float(ns.marginal_log_mean_coeff(tm)),
                               0.5 * (ns.log_alpha_array[10] + ns.log_alpha_array[11]),
                               rtol=1e-5)
    # alpha^2 + sigma^2 = 1, lambda = log(alpha / sigma), inverse_lambda inverts lambda.
    tt = jnp.asarray([0.01, 0.3, 0.7, 0.95], jnp.float32)
    a, s = np.asarray(ns.marginal_alpha(tt)), np.asarray(ns.marginal_std(tt))
    np.testing.assert_allclose(a ** 2 + s ** 2, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ns.marginal_lambda(tt)), np.log(a / s), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ns.inverse_lambda(ns.marginal_lambda(tt))),
                               np.asarray(tt), rtol=1e-4)
    # The clipped end of the schedule: lambda(1) is just above -5.1.
    assert -5.1 < float(ns.marginal_lambda(1.0)) < -4.8
    for fn in (ns.marginal_log_mean_coeff, ns.marginal_alpha, ns.marginal_std,
               ns.marginal_lambda, ns.inverse_lambda):
        assert fn(tt).dtype == jnp.float32 and fn(tt).shape == (4,)


def test_torch_linspace_emulation():
    # Values from torch.linspace(0, 1, 997, dtype=float32) that a naive float32 or float64
    # linspace gets wrong are covered by test_schedule_tables_match_reference; here the ends.
    x = D.torch_linspace_f32(2.0, -3.0, 6)
    np.testing.assert_array_equal(x, np.float32([2, 1, 0, -1, -2, -3]))
    assert x.dtype == np.float32


@pytest.mark.parametrize("n", [10, 5])
def test_time_steps_match_reference(ns, ref, n):
    ts = D.get_time_steps(ns, "logSNR", 0.992, 1.0 / ns.total_N, n)
    np.testing.assert_array_equal(ts, ref[f"dpm/script/steps{n}/timesteps"])
    np.testing.assert_allclose(np.asarray(ns.model_input_time(ts[:n])),
                               ref[f"dpm/script/steps{n}/unet_t_inputs"], rtol=0, atol=1e-4)


def test_other_skip_types(ns):
    tu = D.get_time_steps(ns, "time_uniform", 0.9, 0.1, 4)
    np.testing.assert_allclose(tu, [0.9, 0.7, 0.5, 0.3, 0.1], atol=1e-7)
    tq = D.get_time_steps(ns, "time_quadratic", 0.81, 0.01, 4)
    np.testing.assert_allclose(tq, np.linspace(0.9, 0.1, 5) ** 2, rtol=1e-6)


def test_multistep_orders():
    assert D.multistep_orders(10, 2, True) == (1,) + (2,) * 9      # steps >= 10: no lowering
    assert D.multistep_orders(5, 2, True) == (1, 2, 2, 2, 1)
    assert D.multistep_orders(5, 2, False) == (1, 2, 2, 2, 2)
    assert D.multistep_orders(8, 3, True) == (1, 2, 3, 3, 3, 3, 2, 1)
    assert D.multistep_orders(12, 3, True) == (1, 2) + (3,) * 10
    assert D.multistep_orders(3, 1, True) == (1, 1, 1)


def test_singlestep_orders(ns):
    for steps, order, want in [(6, 3, (3, 2, 1)), (7, 3, (3, 3, 1)), (8, 3, (3, 3, 2)),
                               (5, 2, (2, 2, 1)), (4, 2, (2, 2)), (3, 1, (1, 1, 1))]:
        orders, outer = D.singlestep_orders_and_timesteps(ns, steps, order, "logSNR", 0.992,
                                                          1 / 996)
        assert orders == want and sum(orders) == steps and outer.shape == (len(want) + 1,)
    orders, outer = D.singlestep_orders_and_timesteps(ns, 7, 2, "time_uniform", 0.9, 0.2)
    assert orders == (2, 2, 2, 1)
    np.testing.assert_allclose(outer, [0.9, 0.7, 0.5, 0.3, 0.2], atol=1e-6)
    orders, _ = D.singlestep_orders_and_timesteps(ns, 7, 3, "logSNR", 0.9, 0.2,
                                                  method="singlestep_fixed")
    assert orders == (3, 3)


# ---------------------------------------------------------------------------------------------
# Analytic model: Gaussian data N(mu, s^2 I).  The exact noise prediction is
#   eps(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)
# and the probability-flow ODE keeps (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed.
# ---------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
MU = _RNG.uniform(-0.8, 0.8, (1, 4, 4, 3)).astype(np.float32)
S_DATA = 0.3
X_T = _RNG.standard_normal((2, 4, 4, 3)).astype(np.float32)


def gaussian_noise_fn(ns):
    def noise_fn(x, t):  # continuous time t [B]
        t = t[:, None, None, None]
        a, s = ns.marginal_alpha(t), ns.marginal_std(t)
        return s * (x - a * MU) / (a * a * S_DATA ** 2 + s * s)
    return noise_fn


def gaussian_unet_fn(ns):
    """The same model as a discrete-time 'UNet' (learned-sigma layout: 2C output channels)."""
    noise_fn = gaussian_noise_fn(ns)

    def model_fn(x, t_input):
        t = t_input / 1000.0 + 1.0 / ns.total_N
        eps = noise_fn(x, t)
        return jnp.concatenate([eps, jnp.full_like(eps, 123.0)], axis=-1)
    return model_fn


def exact_ode_solution(ns, x_T, t_from, t_to):
    a = lambda t: np.float64(ns.marginal_alpha(np.float32(t)))  # noqa: E731
    s = lambda t: np.float64(ns.marginal_std(np.float32(t)))  # noqa: E731
    v_from = np.sqrt(a(t_from) ** 2 * S_DATA ** 2 + s(t_from) ** 2)
    v_to = np.sqrt(a(t_to) ** 2 * S_DATA ** 2 + s(t_to) ** 2)
    return a(t_to) * MU + v_to * (x_T - a(t_from) * MU) / v_from


@functools.lru_cache(maxsize=None)
def _solve_gaussian(steps: int, kw: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(final x, outer time steps) of the sampler on the Gaussian model (cached across tests)."""
    kw = dict(kw)
    ns = D.schedule_from_betas(BETAS)
    fn = jax.jit(functools.partial(D.sample_with_noise_fn, gaussian_noise_fn(ns),
                                   noise_schedule=ns, steps=steps, t_start=0.992, **kw))
    if kw.get("method", "multistep") == "multistep":
        ts = D.get_time_steps(ns, "logSNR", 0.992, 1 / ns.total_N, steps)
    else:
        _, ts = D.singlestep_orders_and_timesteps(ns, steps, kw["order"], "logSNR", 0.992,
                                                  1 / ns.total_N)
    return np.asarray(fn(X_T)), ts


ORDER1 = (("order", 1),)
ORDER2 = (("order", 2),)
NOISE_TAYLOR2 = (("order", 2), ("algorithm_type", "dpmsolver"), ("solver_type", "taylor"))
MULTI3 = (("order", 3),)
SINGLE3 = (("order", 3), ("method", "singlestep"))


@pytest.mark.parametrize("kw, lo, hi", [
    (ORDER1, 1.6, 2.4),           # first order
    (ORDER2, 3.0, 6.0),           # the authors' setting (DPM-Solver++ multistep 2)
    (NOISE_TAYLOR2, 3.0, 6.0),
    (MULTI3, 4.0, 12.0),          # not yet asymptotic at 20 -> 40 steps (5.2 measured)
    (SINGLE3, 8.0, 40.0),
])
def test_converges_to_exact_ode_solution(ns, kw, lo, hi):
    errs = []
    for steps in (10, 20, 40):
        x, ts = _solve_gaussian(steps, kw)
        errs.append(np.abs(x - exact_ode_solution(ns, X_T, ts[0], ts[-1])).max())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.04, errs
    # Doubling the steps divides the error by about 2**order.
    assert lo < errs[1] / errs[2] < hi, errs


def test_order1_is_ddim(ns):
    """Order-1 DPM-Solver(++) multistep is DDIM (eta=0) on the same time steps."""
    steps = 6
    model_fn = gaussian_unet_fn(ns)
    noise_fn = gaussian_noise_fn(ns)
    ts = D.get_time_steps(ns, "logSNR", 0.992, 1 / ns.total_N, steps)
    a = np.asarray(ns.marginal_alpha(ts), np.float64)
    s = np.asarray(ns.marginal_std(ts), np.float64)
    x = X_T.astype(np.float64)
    want = [x]
    for k in range(steps):
        eps = np.asarray(noise_fn(jnp.asarray(x, jnp.float32), jnp.full((2,), ts[k])), np.float64)
        x0 = (x - s[k] * eps) / a[k]
        x = a[k + 1] * x0 + s[k + 1] * eps
        want.append(x)
    want = np.stack(want)
    for algo in ("dpmsolver++", "dpmsolver"):
        fn = jax.jit(functools.partial(D.dpm_solver_sample, model_fn, betas=BETAS, steps=steps,
                                       order=1, t_start=0.992, algorithm_type=algo,
                                       return_intermediates=True))
        x0, xs = fn(X_T)
        assert xs.shape == (steps + 1,) + X_T.shape
        np.testing.assert_array_equal(np.asarray(xs[0]), X_T)
        np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(x0))
        np.testing.assert_allclose(np.asarray(xs), want, rtol=0, atol=2e-5)


def test_second_order_uses_history():
    """Multistep order 2 differs from order 1 (so the history is actually used), while the
    higher-order variants agree with each other much more closely."""
    x1, x2, x2n, x3 = (_solve_gaussian(20, kw)[0] for kw in (ORDER1, ORDER2, NOISE_TAYLOR2,
                                                              SINGLE3))
    assert np.abs(x1 - x2).max() > 0.06
    assert np.abs(x2 - x3).max() < 0.015 and np.abs(x2 - x2n).max() < 0.03


def test_jit_is_one_scan_independent_of_steps(ns):
    """No Python loop over steps is traced: the jaxpr does not grow with `steps`."""
    model_fn = gaussian_unet_fn(ns)

    def n_eqns(steps, **kw):
        fn = functools.partial(D.dpm_solver_sample, model_fn, betas=BETAS, steps=steps,
                               t_start=0.992, **kw)
        jaxpr = jax.make_jaxpr(fn)(X_T)
        return len(jaxpr.jaxpr.eqns), sum(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)

    assert n_eqns(10) == n_eqns(50)
    assert n_eqns(10)[1] == 1
    assert n_eqns(9, order=3, method="singlestep") == n_eqns(30, order=3, method="singlestep")


def test_schedule_built_inside_jit_does_not_leak_tracers():
    """The cached schedule may first be built while tracing; it must stay usable afterwards."""
    D._cached_schedule.cache_clear()
    betas = get_named_beta_schedule("cosine", 1000)
    model_fn = lambda x, t: jnp.concatenate([0.1 * x, x], axis=-1)  # noqa: E731
    a = jax.jit(functools.partial(D.dpm_solver_sample, model_fn, betas=betas, steps=4))(X_T)
    b = jax.jit(functools.partial(D.dpm_solver_sample, model_fn, betas=betas, steps=4))(X_T)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ns = D.schedule_from_betas(betas)
    assert abs(float(ns.marginal_lambda(ns.t_array[499]))) < 0.1   # lambda ~ 0 mid-schedule


def test_denoise_to_zero_and_guidance(ns):
    model_fn = gaussian_unet_fn(ns)
    sample = lambda fn, **kw: jax.jit(functools.partial(  # noqa: E731
        D.dpm_solver_sample, fn, betas=BETAS, steps=5, t_start=0.992, **kw))(X_T)
    x, xs = sample(model_fn, denoise_to_zero=True, return_intermediates=True)
    assert xs.shape == (7,) + X_T.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(xs[-1]))
    # The extra step is the data prediction x0 = (x - sigma eps) / alpha at t_end.
    t_end = np.float32(1 / ns.total_N)
    eps = np.asarray(gaussian_noise_fn(ns)(xs[-2], jnp.full((2,), t_end)))
    a, s = float(ns.marginal_alpha(t_end)), float(ns.marginal_std(t_end))
    np.testing.assert_allclose(np.asarray(xs[-1]), (np.asarray(xs[-2]) - s * eps) / a,
                               rtol=0, atol=1e-5)
    assert np.abs(np.asarray(xs[-1]) - np.asarray(xs[-2])).max() > 1e-4

    # Classifier-free path: the label shifts the data mean; scale 1 == conditional model only.
    def cond_model(x, t_input, y):
        return model_fn(x - y[:, None, None, None], t_input)
    y, y_null = jnp.asarray([0.0, 0.5]), jnp.zeros(2)
    plain = np.asarray(sample(lambda x, t: cond_model(x, t, y)))
    cfg = dict(guidance_type="classifier-free", condition=y, unconditional_condition=y_null)
    cfg1 = np.asarray(sample(cond_model, guidance_scale=1.0, **cfg))
    np.testing.assert_allclose(cfg1, plain, rtol=0, atol=1e-6)
    cfg2 = np.asarray(sample(cond_model, guidance_scale=2.0, **cfg))
    # Sample 0 has y == null label, so guidance does not change it; sample 1 moves further
    # along its conditional shift (w = 2 doubles the shift relative to the null label).
    np.testing.assert_allclose(cfg2[0], plain[0], rtol=0, atol=1e-5)
    unc = np.asarray(sample(lambda x, t: cond_model(x, t, y_null)))
    np.testing.assert_allclose((cfg2[1] - unc[1]).mean(), 2 * (plain[1] - unc[1]).mean(),
                               rtol=0.2)
    assert abs((plain[1] - unc[1]).mean()) > 0.1


@pytest.mark.parametrize("kw, match", [
    (dict(skip_type="uniform"), "skip_type"),
    (dict(algorithm_type="ddim"), "algorithm_type"),
    (dict(method="adaptive"), "method"),
    (dict(solver_type="heun"), "solver_type"),
    (dict(order=4), "order"),
    (dict(order=0), "order"),
    (dict(steps=2, order=3), "steps >= order"),
    (dict(steps=0), "steps"),
    (dict(t_start=0.5, t_end=0.5), "t_end < t_start"),
    (dict(t_start=1.5), "t_start"),
    (dict(t_end=0.0), "t_end"),
    (dict(model_type="eps"), "model_type"),
    (dict(guidance_type="classifier"), "guidance_type"),
])
def test_bad_options(ns, kw, match):
    args = dict(betas=BETAS, steps=5)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        D.dpm_solver_sample(gaussian_unet_fn(ns), X_T, **args)


def test_bad_model_output_channels(ns):
    with pytest.raises(ValueError, match="channels"):
        D.dpm_solver_sample(lambda x, t: jnp.zeros(x.shape[:-1] + (5,)), X_T, betas=BETAS,
                            steps=3)


# ---------------------------------------------------------------------------------------------
# Reference trajectories with the reference UNet
# ---------------------------------------------------------------------------------------------

def _have_converter():
    try:
        from atdiff_jax.convert.guided_diffusion import unet_from_state_dict  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_converter(), reason="atdiff_jax.convert.guided_diffusion missing")
@pytest.mark.parametrize("n", [10, 5])
def test_reference_trajectory(ref, ref_model_fn, n):
    pre = f"dpm/script/steps{n}/"
    x_T = nchw_to_nhwc(ref["x_T"])
    recorded = []

    def model_fn(x, t):
        jax.debug.callback(lambda tt: recorded.append(np.asarray(tt)), t, ordered=True)
        return ref_model_fn(x, t)

    fn = jax.jit(functools.partial(D.dpm_solver_sample, model_fn, betas=BETAS, steps=n,
                                   t_start=0.992, return_intermediates=True))
    x0, xs = fn(x_T)
    x0, xs = np.asarray(x0), np.asarray(xs)
    jax.effects_barrier()

    t_in = np.stack(recorded)
    assert t_in.shape == (n, x_T.shape[0])
    np.testing.assert_allclose(t_in, np.broadcast_to(ref[pre + "unet_t_inputs"][:, None],
                                                     t_in.shape), rtol=0, atol=1e-4)
    want_xs = nchw_to_nhwc(ref[pre + "intermediates"])
    want = nchw_to_nhwc(ref[pre + "sample"])
    assert xs.shape == want_xs.shape
    scale = np.abs(want).max()
    assert scale > 50  # the random network drives the samples far out
    for k in range(n + 1):
        np.testing.assert_allclose(xs[k], want_xs[k], rtol=0,
                                   atol=1e-5 * np.abs(want_xs[k]).max(), err_msg=f"step {k}")
    np.testing.assert_allclose(x0, want, rtol=0, atol=1e-5 * scale)
