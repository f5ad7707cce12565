"""Consistency models with AT: the LCM loss and sampler, the guidance embedding, the CM train step,
and the trainer / CLI end to end (teacher DPM run -> CD with fast AT -> resume -> atdiff sample).

Compiles are shared through the suite's persistent compilation cache (tests/conftest.py), so
identical step programs (a resumed run, K = 1 as adv.kind "none" or "fast" with steps = 1)
compile once.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import runpy
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from atdiff_jax.adversarial import AdversaryConfig, run_adversary
from atdiff_jax.consistency import (
    LCMSettings,
    consistency_loss,
    ddim_timesteps,
    lcm_loss,
    lcm_sample,
    lcm_sample_timesteps,
    lcm_scalings,
    sample_lcm_inputs,
    vp_denoiser,
)
from atdiff_jax.diffusion.gaussian import create_gaussian_diffusion
from atdiff_jax.train import objectives as objectives_lib
from atdiff_jax.train import step as step_lib
from atdiff_jax.train.ema import ema_update
from atdiff_jax.train.build import (ConfigError, build_experiment, build_model,
                                    build_optimizer, lr_schedule, validate_config)
from atdiff_jax.train.state import CMTrainState, create_state, ema_key, init_params

ROOT = pathlib.Path(__file__).parent.parent
TINY = ROOT / "configs" / "tiny.py"
TINY_CM = ROOT / "configs" / "tiny_cm.py"


def config_of(path, **overrides):
    c = runpy.run_path(str(path))["get_config"]()
    for key, value in overrides.items():
        node = c
        *groups, name = key.split(".")
        for g in groups:
            node = node[g]
        node[name] = value
    return c


@pytest.fixture(scope="module")
def compilation_cache():
    """The suite's persistent compilation cache (conftest: shared by every worker and ``atdiff``
    subprocess of the run), so the CLI runs here also reuse what other tests compiled."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


# ----------------------------------------------------------------------------------------------
# LCM: one-point data, where the DDIM step is exact
#
# With all data at one point x0, the teacher's eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t) is exact,
# every PF-ODE trajectory is x(t) = sqrt(a_t) x0 + sqrt(1 - a_t) e with a constant e, and one
# DDIM step (any skip k) lands exactly on it. The exact LCM consistency function maps x_t to the
# trajectory's point at timestep 0 (where c_skip = 1, c_out = 0):
#   f*(x, t) = sqrt(a_0) x0 + sqrt(1 - a_0) e(x, t),  e = (x - sqrt(a_t) x0) / sqrt(1 - a_t),
# so the LCM loss of f* vanishes up to rounding. Classifier-free guidance of one-point teachers
# (x0_c for the class, x0_u for the null class) is again a one-point teacher, x0_w = x0_c +
# w (x0_c - x0_u), so the guided f* is the same formula with x0_w: it needs the student's w.

DIFF = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
AB = jnp.asarray(DIFF.tables["alphas_cumprod"])
POINTS = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3), minval=-1, maxval=1)
NULL = 2  # POINTS[2] is the null class's point
GUIDED = LCMSettings(skip=20, loss_norm="l2", guidance=True, w_min=0.0, w_max=2.0)


def _x0(y, w):
    x0 = POINTS[y]
    return x0 if w is None else x0 + w[:, None, None, None] * (x0 - POINTS[NULL])


def _teacher_eps(x, t, y):
    a = AB[t][:, None, None, None]
    return (x - jnp.sqrt(a) * _x0(y, None)) / jnp.sqrt(1 - a)


def _exact_apply(params, x, t, y, rng, w=None):
    """The eps network whose LCM consistency function is f* (see above); params["drift"] != 0
    moves its target point with t (inconsistent), params["use_w"] = False ignores w."""
    t4 = t[:, None, None, None]
    a, a0 = AB[t][:, None, None, None], AB[0]
    x0 = _x0(y, w if params.get("use_w", True) else None) + params["drift"] * t4 / 1000.0
    e = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    f = jnp.sqrt(a0) * x0 + jnp.sqrt(1 - a0) * e
    c_skip, c_out = (c[:, None, None, None] for c in lcm_scalings(t))
    x0_pred = (f - c_skip * x) / jnp.where(c_out == 0, 1.0, c_out)
    return (x - jnp.sqrt(a) * x0_pred) / jnp.sqrt(1 - a)


def _lcm_batch(b=32, settings=GUIDED, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    y = jax.random.randint(k1, (b,), 0, 2)
    inputs = sample_lcm_inputs(k2, jnp.zeros((b, 8, 8, 3)),
                               num_ddim=len(ddim_timesteps(1000, settings.skip)), settings=settings)
    return dict(inputs, x_start=POINTS[y], y=y)


def _lcm(params=None, delta=None, tfp=True, settings=GUIDED, batch=None, **kw):
    params = {"drift": jnp.float32(0.0)} if params is None else params
    return lcm_loss(params, delta, None, batch=_lcm_batch(settings=settings) if batch is None
                    else batch, apply_fn=_exact_apply, diffusion=DIFF, teacher_eps_fn=_teacher_eps,
                    settings=settings, teacher_from_perturbed=tfp,
                    null_label=NULL if settings.guidance else None, **kw)


def test_ddim_timesteps_scalings_and_sampling_schedule():
    np.testing.assert_array_equal(ddim_timesteps(1000, 20), np.arange(1, 51) * 20 - 1)
    np.testing.assert_array_equal(ddim_timesteps(100, 30), [29, 59, 89])
    c_skip, c_out = lcm_scalings(jnp.asarray([0, 1, 999]))
    np.testing.assert_array_equal([c_skip[0], c_out[0]], [1.0, 0.0])  # boundary at timestep 0
    np.testing.assert_allclose(c_skip[1:], 0.25 / (jnp.asarray([10.0, 9990.0]) ** 2 + 0.25),
                               rtol=1e-6)
    np.testing.assert_allclose(c_out[1], 10 / np.sqrt(100.25), rtol=1e-6)
    np.testing.assert_array_equal(lcm_sample_timesteps(1000, 20, 1), [999])
    np.testing.assert_array_equal(lcm_sample_timesteps(1000, 20, 4), [999, 759, 519, 279])
    with pytest.raises(ValueError, match="steps must be in"):
        lcm_sample_timesteps(100, 20, 6)
    with pytest.raises(ValueError, match="loss_norm"):
        LCMSettings(loss_norm="l1")


def _exact_enough(aux):
    """Student and target of an exact consistency function agree to float32 rounding (max
    |f - target| < 2e-5 on unit-scale values), except at the chain's last timestep T-1, where
    abar = 2.4e-9 (cosine) makes x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplify the rounding
    of x (|x| ~ 3, ulp 2.4e-7) by 1/sqrt(abar) = 2e4 (measured up to 5.3e-3), for the reference
    formula as for ours."""
    diff = np.abs(np.asarray(aux["student"]) - np.asarray(aux["target"])).max(axis=(1, 2, 3))
    t = np.asarray(aux["t"])
    return float(diff[t < 999].max(initial=0.0)) < 2e-5 and float(diff.max()) < 1e-2


def test_lcm_loss_of_exact_consistency_function_vanishes():
    exact, aux = _lcm(return_intermediates=True)
    assert _exact_enough(aux) and float(exact) < 1e-11
    np.testing.assert_array_equal(aux["s"], np.maximum(np.asarray(aux["t"]) - 20, 0))
    assert set(np.asarray(aux["t"]) % 20) == {19}
    # The teacher's guided DDIM step lands on the guided trajectory.
    w, y = _lcm_batch()["w"], _lcm_batch()["y"]
    ok = np.asarray(aux["t"]) < 999
    np.testing.assert_allclose(np.asarray(aux["teacher_x0"])[ok], np.asarray(_x0(y, w))[ok],
                               atol=2e-4)
    drift = float(_lcm({"drift": jnp.float32(0.05)})[0])
    no_w = float(_lcm({"drift": jnp.float32(0.0), "use_w": False})[0])
    assert drift > 1e-7 and no_w > 1e-7 and min(drift, no_w) > 100 * float(exact)
    # Without guidance (a plain conditional teacher), other skips, Huber: the same.
    for s in (LCMSettings(skip=10, loss_norm="l2"), LCMSettings(skip=50, loss_norm="huber"),
              LCMSettings(skip=1, loss_norm="l2")):
        assert _exact_enough(_lcm(settings=s, return_intermediates=True)[1]), s


def test_lcm_delta_semantics_and_gradient():
    """teacher_from_perturbed=True: the perturbed point has its own trajectory and f* is
    consistent on it (loss ~0); False: the target ignores δ, f*(x + δ) - f*(x) = r(t) δ with
    r = sqrt(1 - a_0) / sqrt(1 - a_t), so the loss is mean((r δ)^2). ∂loss/∂δ flows only through
    the student."""
    b = 32
    delta = 0.3 * jax.random.normal(jax.random.PRNGKey(7), (b, 8, 8, 3))
    moved = float(_lcm(delta=delta, tfp=True)[0])
    fixed, aux = _lcm(delta=delta, tfp=False, return_intermediates=True)
    r = (jnp.sqrt(1 - AB[0]) / jnp.sqrt(1 - AB[aux["t"]]))[:, None, None, None]
    np.testing.assert_allclose(float(fixed), float(jnp.mean((r * delta) ** 2)), rtol=1e-3)
    assert moved < 1e-11 and float(fixed) > 1e4 * moved
    for tfp in (True, False):
        (_, aux), g = jax.value_and_grad(lambda d, tfp=tfp: _lcm(delta=d, tfp=tfp,
                                                                 return_intermediates=True),
                                         has_aux=True)(delta)
        expected = 2.0 / (b * 8 * 8 * 3) * r * (aux["student"] - aux["target"])
        np.testing.assert_allclose(g, expected, rtol=1e-3,
                                   atol=1e-6 * float(jnp.max(jnp.abs(expected))) + 1e-14)


def test_lcm_loss_drives_run_adversary_and_checks_inputs():
    batch = _lcm_batch(16)
    loss_fn = functools.partial(lcm_loss, batch=batch, apply_fn=_exact_apply, diffusion=DIFF,
                                teacher_eps_fn=_teacher_eps, settings=GUIDED, null_label=NULL,
                                teacher_from_perturbed=False,
                                target_params={"drift": jnp.float32(0.0)})
    state = {"drift": jnp.float32(0.02)}
    adversary = AdversaryConfig(kind="fast", steps=3, step_size=0.5, max_norm=10.0)
    _, m = jax.jit(lambda st: run_adversary(
        loss_fn, st, jax.random.PRNGKey(0), adversary=adversary, delta_shape=(16, 8, 8, 3),
        params_of=lambda s: s, apply_update=lambda s, g, aux: s))(state)
    np.testing.assert_allclose(m["loss"][0], loss_fn(state, None, None)[0], rtol=1e-5)
    np.testing.assert_allclose(m["delta_norm"][1], 0.5, rtol=1e-5)
    assert m["loss"][2] > m["loss"][1] > m["loss"][0]
    with pytest.raises(ValueError, match="null_label"):
        lcm_loss(state, None, None, batch=batch, apply_fn=_exact_apply, diffusion=DIFF,
                 teacher_eps_fn=_teacher_eps, settings=GUIDED)
    with pytest.raises(ValueError, match="w"):
        lcm_loss(state, None, None, batch={k: v for k, v in batch.items() if k != "w"},
                 apply_fn=_exact_apply, diffusion=DIFF, teacher_eps_fn=_teacher_eps,
                 settings=GUIDED, null_label=NULL)


def test_lcm_latent_mode_and_sampler():
    """encode_fn runs before the loss (δ and noise take the latent shape); the sampler of the
    exact consistency function lands on the data point after 1 or 4 steps, then decode_fn."""
    encode = lambda x: 0.5 * x  # noqa: E731  (a linear "VAE": latents = x / 2)
    decode = lambda z: 2.0 * z  # noqa: E731
    plain = LCMSettings(skip=20, loss_norm="l2")
    batch = _lcm_batch(settings=plain)
    batch["x_start"] = 2.0 * batch["x_start"]  # pixels whose latents are the points
    loss, _ = _lcm(settings=plain, batch=batch, encode_fn=encode)
    assert float(loss) < 1e-11
    y = jnp.asarray([0, 1, 1, 0])
    noise = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 3))
    apply = functools.partial(_exact_apply)
    for steps in (1, 4):
        out = lcm_sample(apply, {"drift": 0.0}, noise, diffusion=DIFF, settings=plain,
                         steps=steps, y=y, rng=jax.random.PRNGKey(4), decode_fn=decode)
        # f* at timestep 0 is x0 up to sqrt(1 - a_0) e (|e| <~ 4): 0.006 * 4 after decoding x2
        np.testing.assert_allclose(out, jnp.clip(2.0 * POINTS[y], -1, 1), atol=0.06)
    guided = lcm_sample(apply, {"drift": 0.0}, noise, diffusion=DIFF, settings=GUIDED, steps=1,
                        y=y, w=1.5)
    np.testing.assert_allclose(guided, jnp.clip(_x0(y, jnp.full((4,), 1.5)), -1, 1), atol=0.03)


def test_unet_guidance_embedding():
    """guidance_proj starts at zero (the student is exactly the network it copies), then w
    changes the output; w is required iff the model has the embedding."""
    from atdiff_jax.models.adm import create_model
    base = create_model(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1",
                        attention_resolutions="", in_channels=1, use_scale_shift_norm=True)
    guided = base.clone(guidance_embed_dim=16)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    t = jnp.asarray([3, 700])
    w = jnp.asarray([0.5, 2.0])
    p = guided.init(jax.random.PRNGKey(1), x, t, w=w)["params"]
    assert p["guidance_proj"]["kernel"].shape == (16, 32)
    assert not np.any(p["guidance_proj"]["kernel"])
    p = jax.tree.map(lambda v: v + 0.01 * jnp.ones_like(v), p)  # non-zero output layer
    p["guidance_proj"]["kernel"] = jnp.zeros((16, 32))
    p_base = {k: v for k, v in p.items() if k != "guidance_proj"}
    ref = base.apply({"params": p_base}, x, t)
    np.testing.assert_array_equal(guided.apply({"params": p}, x, t, w=w), ref)
    p["guidance_proj"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (16, 32))
    out1 = guided.apply({"params": p}, x, t, w=w)
    out2 = guided.apply({"params": p}, x, t, w=w + 1.0)
    assert float(jnp.max(jnp.abs(out1 - out2))) > 1e-4
    with pytest.raises(ValueError, match="guidance scale"):
        guided.apply({"params": p}, x, t)
    with pytest.raises(ValueError, match="no guidance"):
        base.apply({"params": p_base}, x, t, w=w)


# ----------------------------------------------------------------------------------------------
# the CM train step in-process


def _random_params(experiment, seed):
    """Random params of the experiment's network without compiling its init (slow on CPU)."""
    shapes = jax.eval_shape(lambda: init_params(experiment, jax.random.key(0)))
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, s.shape, s.dtype)
                                     for k, s in zip(keys, leaves)])


def _image_batch(config, seed=0, labels=None):
    b, s = config.train.global_batch_size, config.model.image_size
    batch = {"image": jax.random.uniform(jax.random.key(seed), (b, s, s, 1), minval=-1, maxval=1)}
    if labels is not None:
        batch["label"] = jnp.asarray(labels, jnp.int32)
    return batch


def _cm_setup(config, teacher_seed=1):
    exp, opt = build_experiment(config), build_optimizer(config)
    teacher_config = config_of(TINY)
    teacher_exp = build_experiment(teacher_config)
    teacher_params = _random_params(teacher_exp, teacher_seed)
    params = _random_params(exp, teacher_seed + 1)
    state = create_state(exp, opt, params)
    step = step_lib.make_train_step(exp, opt, seed=config.seed, lr_fn=lr_schedule(config),
                                    teacher_model=teacher_exp.model,
                                    teacher_diffusion=teacher_exp.diffusion)
    return exp, opt, state, jax.jit(step), teacher_exp, teacher_params


@pytest.mark.parametrize("adv", [("none", 1), ("fast", 1)])
def test_at_with_one_inner_step_is_plain_cd_bit_for_bit(adv):
    """The CM step with K = 1 (adv.kind "none", or "fast" with steps = 1) is exactly one plain CD
    update written out here: the loss's gradient, one AdamW update, the target EMA at the
    scheduled rate, the sampling EMA; compared bit for bit."""
    config = config_of(TINY_CM, **{"adv.kind": adv[0], "adv.steps": adv[1],
                                   "teacher.workdir": "unused"})
    exp, opt, state, step, teacher_exp, teacher_params = _cm_setup(config)
    assert isinstance(state, CMTrainState)
    batch = _image_batch(config)
    sched = objectives_lib.cm_schedule(exp, 0)
    assert (float(sched["target_ema"]), int(sched["num_scales"])) == (np.float32(0.9), 10)
    new, metrics = step(state, batch, teacher_params, sched)

    @jax.jit
    def plain_cd(state, batch, teacher_params, sched):
        step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)
        mb = objectives_lib.cm_loss_batch(exp, batch, step_key=step_key,
                                          num_scales=sched["num_scales"])
        teacher = vp_denoiser(lambda x, t: teacher_exp.model.apply(
            {"params": teacher_params}, x, t, train=False), teacher_exp.diffusion)

        def apply_fn(p, x, t, y, rng):
            return exp.model.apply({"params": p}, x, t, y=y, train=True, rngs={"dropout": rng})

        def loss(p):
            return consistency_loss(p, None, jax.random.fold_in(jax.random.fold_in(step_key, 1), 0),
                                    batch=mb, apply_fn=apply_fn, num_scales=sched["num_scales"],
                                    target_params=state.target, teacher_denoise_fn=teacher,
                                    denoiser=exp.cm.denoiser, loss_norm="l2", solver="heun")

        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target = ema_update(state.target, params, sched["target_ema"], sched["target_ema_c"])
        ema = ema_update(state.ema[ema_key(0.9)], params, 0.9)
        return value, params, target, ema, opt_state

    value, params, target, ema, opt_state = plain_cd(state, batch, teacher_params, sched)
    assert float(metrics["loss"]) == float(value) > 0
    jax.tree.map(np.testing.assert_array_equal, new.params, params)
    jax.tree.map(np.testing.assert_array_equal, new.target, target)
    jax.tree.map(np.testing.assert_array_equal, new.ema[ema_key(0.9)], ema)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, opt_state)
    assert (int(new.step), int(new.updates), int(new.skipped)) == (1, 1, 0)
    assert int(metrics["num_scales"]) == 10 and float(metrics["delta_norm"]) == 0.0
    # The target moved towards the new params at rate 0.9.
    leaf = lambda tree: jax.tree.leaves(tree)[5]  # noqa: E731
    np.testing.assert_allclose(leaf(new.target), 0.9 * leaf(state.target) + 0.1 * leaf(params),
                               rtol=1e-5, atol=1e-7)


def test_guided_lcm_step_trains_the_guidance_embedding():
    """LCM with guidance in the trainer: a class-conditional teacher whose last class is the
    null class, w drawn per example and fed to the student, whose zero-initialised guidance
    projection gets a gradient from the first update (K = 1 here to keep the compile short; the
    K-step driver is the same for every CM kind, see the CD tests)."""
    config = config_of(TINY_CM, **{
        "cm.kind": "lcm", "cm.loss_norm": "huber", "cm.lcm.skip": 10, "cm.lcm.guidance": True,
        "cm.lcm.guidance_embed_dim": 32, "cm.lcm.w_min": 0.5, "cm.lcm.w_max": 3.0,
        "cm.lcm.sample_w": 1.0, "model.class_cond": True, "model.num_classes": 3,
        "train.global_batch_size": 4, "adv.kind": "none", "adv.steps": 1,
        "teacher.workdir": "unused"})
    exp, opt = build_experiment(config), build_optimizer(config)
    assert exp.cm.null_label == 2 and exp.sample_classes == 2
    assert exp.model.guidance_embed_dim == 32
    teacher_model = build_model(config_of(TINY, **{"model.class_cond": True,
                                                   "model.num_classes": 3}))
    params = _random_params(exp, 3)
    params["guidance_proj"]["kernel"] = jnp.zeros_like(params["guidance_proj"]["kernel"])
    teacher_params = {k: v for k, v in _random_params(exp, 4).items() if k != "guidance_proj"}
    state = create_state(exp, opt, params)
    step = jax.jit(step_lib.make_train_step(
        exp, opt, seed=0, lr_fn=lr_schedule(config), teacher_model=teacher_model))
    batch = _image_batch(config, labels=[0, 1, 1, 0])
    sched = objectives_lib.cm_schedule(exp, 0)
    mb = objectives_lib.cm_loss_batch(exp, batch, step_key=jax.random.key(0), num_scales=10)
    assert np.all((mb["w"] >= 0.5) & (mb["w"] <= 3.0)) and np.all(mb["indices"] < 10)
    new, metrics = step(state, batch, teacher_params, sched)
    assert int(new.updates) == 1 and int(new.skipped) == 0
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert float(jnp.max(jnp.abs(new.params["guidance_proj"]["kernel"]))) > 0
    assert "num_scales" not in metrics


# ----------------------------------------------------------------------------------------------
# end to end: teacher DPM run -> CD with AT (K = 2) -> resume -> atdiff sample


def atdiff(*args, timeout=600, cache_dir=None):
    """test_cli's ``atdiff`` (conftest.FAST_COMPILE: the CLI runs are compared with each other,
    the resume bit for bit against the uninterrupted run), sharing this module's cache."""
    from test_cli import atdiff as cli
    # conftest's cache-everything settings are inherited; only the directory is this module's
    return cli(*args, timeout=timeout,
               env_extra={"JAX_COMPILATION_CACHE_DIR": cache_dir} if cache_dir else None)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, mnist_data_dir):
    from atdiff_jax.train.loop import train
    workdir = tmp_path_factory.mktemp("cm_e2e") / "teacher"
    config = config_of(TINY, **{"data.data_dir": str(mnist_data_dir), "adv.kind": "none",
                                "adv.steps": 1, "train.num_minibatches": 2})
    train(config, str(workdir))
    return workdir


def _cm_config(teacher_run, mnist_data_dir, **overrides):
    return config_of(TINY_CM, **{"data.data_dir": str(mnist_data_dir),
                                 "teacher.workdir": str(teacher_run), **overrides})


def _cli_train_cm(workdir, teacher_run, mnist_data_dir, cache_dir):
    res = atdiff("train", f"--config={TINY_CM}", f"--workdir={workdir}",
                 f"--config.teacher.workdir={teacher_run}",
                 f"--config.data.data_dir={mnist_data_dir}", cache_dir=cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def cm_run(teacher_run, mnist_data_dir, compilation_cache):
    """`atdiff train --config=configs/tiny_cm.py --config.teacher.workdir=...`: CD, AT K = 2."""
    workdir = teacher_run.parent / "cd_at"
    _cli_train_cm(workdir, teacher_run, mnist_data_dir, compilation_cache)
    return workdir


def test_distil_with_at_and_resume_bit_for_bit(cm_run, teacher_run, mnist_data_dir,
                                              compilation_cache):
    from atdiff_jax.train.loop import restore_for_sampling, restore_state
    workdir = cm_run
    final, _ = restore_state(str(workdir))
    assert isinstance(final, CMTrainState)
    assert (int(final.step), int(final.updates), int(final.skipped)) == (4, 8, 0)  # K = 2
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2", "4"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["cm"]["kind"] == "cd" and saved["teacher"]["workdir"] == str(teacher_run)
    # The student started from the teacher's EMA params (config.cm.init_from_teacher) and moved.
    _, teacher_params, _, _ = restore_for_sampling(str(teacher_run))
    first, _ = restore_state(str(workdir), step=2)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(first.params), jax.tree.leaves(teacher_params))]
    assert 0 < max(moved) < 0.1
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in
               zip(jax.tree.leaves(final.target), jax.tree.leaves(final.params)))
    # Resume from checkpoint 2 in a copy of the run: bit-identical to the uninterrupted run.
    resumed_dir = workdir.parent / "cd_at_resumed"
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    _cli_train_cm(resumed_dir, teacher_run, mnist_data_dir, compilation_cache)
    resumed, _ = restore_state(str(resumed_dir))
    assert int(resumed.step) == 4 and int(resumed.updates) == 8
    for field in ("params", "target", "ema", "opt_state", "timestep_sampler"):
        jax.tree.map(np.testing.assert_array_equal, getattr(resumed, field), getattr(final, field))


def test_sample_one_and_two_steps(cm_run, tmp_path, compilation_cache):
    from atdiff_jax import samplers as samples_lib
    from atdiff_jax.train.loop import restore_for_sampling
    workdir = cm_run
    model, params, experiment, _ = restore_for_sampling(str(workdir))
    noise = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))  # the CLI's batch below
    outs = {}
    for sampler, steps in (("cm_onestep", 1), ("cm_multistep", 2)):
        fn = samples_lib.cm_sampler_fn(model, experiment.cm, sampler=sampler, steps=steps)
        x = np.asarray(fn(params, noise, jax.random.key(1), None))
        assert x.shape == (4, 16, 16, 1) and np.all(np.isfinite(x))
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
        outs[sampler] = x
    assert float(np.max(np.abs(outs["cm_onestep"] - outs["cm_multistep"]))) > 1e-3
    # The CLI: cm_onestep is the default for a CM workdir; two-step with cm_multistep.
    res = atdiff("sample", f"--workdir={workdir}", "--num=5", "--batch_size=4",
                 f"--out={tmp_path / 'one'}", cache_dir=compilation_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    res2 = atdiff("sample", f"--workdir={workdir}", "--sampler=cm_multistep", "--steps=2",
                  "--num=5", "--batch_size=4", f"--out={tmp_path / 'two'}",
                  cache_dir=compilation_cache)
    assert res2.returncode == 0, res2.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as f1, np.load(tmp_path / "two.npz") as f2:
        one, two = f1["images"], f2["images"]
    assert one.shape == two.shape == (5, 16, 16, 1) and one.dtype == np.uint8
    assert one.std() > 0 and np.any(one != two)
    res3 = atdiff("sample", f"--workdir={workdir}", "--sampler=ddim", "--steps=2", "--num=2")
    assert res3.returncode != 0 and "consistency-model run" in res3.stderr


def test_teacher_errors_are_one_clear_message(teacher_run, mnist_data_dir, tmp_path):
    from atdiff_jax.train.loop import load_teacher
    # A teacher that does not fit the student (params copied from it) is named option by option.
    config = _cm_config(teacher_run, mnist_data_dir, **{"model.num_channels": 64})
    with pytest.raises(ConfigError, match=r"model\.num_channels: 64 here, 32 in the teacher.*"
                                          r"init_from_teacher=False"):
        load_teacher(config)
    config = _cm_config(teacher_run, mnist_data_dir, **{"teacher.ema_rate": 0.5})
    with pytest.raises(ConfigError, match="config.teacher.ema_rate: ema_rate 0.5 is not in this"):
        load_teacher(config)
    config = _cm_config(teacher_run, mnist_data_dir, **{"teacher.step": 7})
    with pytest.raises(ConfigError, match=r"config.teacher.step=7 is not a checkpoint .* \[2\]"):
        load_teacher(config)
    # Missing teacher workdir at the CLI: exit 2, one line, nothing written.
    workdir = tmp_path / "cm"
    res = atdiff("train", f"--config={TINY_CM}", f"--workdir={workdir}",
                 f"--config.data.data_dir={mnist_data_dir}",
                 f"--config.teacher.workdir={tmp_path / 'no_such_run'}")
    assert res.returncode == 2
    assert "config.teacher.workdir=" in res.stderr and "has no checkpoints" in res.stderr
    assert "Traceback" not in res.stderr and not workdir.exists()
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, res.stderr


@pytest.mark.parametrize("overrides,message", [
    ({"cm.kind": "rectified"}, "config.cm.kind must be one of ('none', 'cd', 'ct', 'lcm')"),
    ({"cm.loss_norm": "lpips"}, "config.cm.loss_norm must be one of ('l2', 'l1', 'l2-32', "
                                "'pseudo_huber')"),
    ({"cm.solver": "rk4"}, "config.cm.solver must be one of ('heun', 'euler')"),
    ({"cm.start_scales": 1}, "config.cm.start_scales must be an integer >= 2"),
    ({"cm.start_ema": 1.5}, "config.cm.start_ema must be in (0, 1]"),
    ({"cm.target_ema_mode": "adaptive"}, "target_ema_mode='adaptive' with scale_mode='fixed' is "
                                         "not supported"),
    ({"cm.sigma_min": 100.0}, "config.cm.sigma_min (100.0) must be < config.cm.sigma_max"),
    ({"teacher.workdir": ""}, "config.teacher.workdir must name the DPM run to distil"),
    ({"train.sampler": "ddim"}, "config.train.sampler must be one of ('cm_onestep', "
                                "'cm_multistep') for a consistency model"),
    ({"diffusion.input_perturb": 0.1}, "config.diffusion.input_perturb (DDPM-IP) applies to DPM"),
    ({"cm.kind": "lcm", "cm.loss_norm": "l1"}, "config.cm.loss_norm must be one of ('l2', "
                                               "'huber')"),
    ({"cm.kind": "lcm", "cm.loss_norm": "huber", "cm.lcm.skip": 101},
     "config.cm.lcm.skip (101) must be <= config.diffusion.steps (100)"),
    ({"cm.kind": "lcm", "cm.loss_norm": "huber", "cm.lcm.guidance": True},
     "config.cm.lcm.guidance needs a class-conditional teacher"),
    ({"cm.kind": "lcm", "cm.loss_norm": "huber", "cm.lcm.guidance": True, "cm.lcm.w_min": 3.0,
      "model.class_cond": True, "model.num_classes": 11},
     "config.cm.lcm.w_min/w_max must satisfy 0 <= w_min <= w_max"),
    ({"cm.kind": "none", "train.label_dropout": 0.1}, "config.train.label_dropout > 0"),
])
def test_bad_cm_config_values_name_the_option(overrides, message):
    config = config_of(TINY_CM, **{"teacher.workdir": "somewhere", **overrides})
    if overrides.get("cm.kind") == "none":
        config.train.sampler = "ddim"
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert message in str(err.value)


def test_bad_cm_value_at_the_cli(tmp_path, mnist_data_dir):
    res = atdiff("train", f"--config={TINY_CM}", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.data_dir={mnist_data_dir}", "--config.teacher.workdir=x",
                 "--config.cm.kind=rectified")
    assert res.returncode == 2
    assert ("atdiff train: error: config.cm.kind must be one of ('none', 'cd', 'ct', 'lcm'), got "
            "'rectified'") in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_old_dpm_configs_without_cm_sections_still_load():
    """Configs saved before the cm/teacher sections existed are DPM runs."""
    config = config_of(TINY)
    d = config.to_dict()
    del d["cm"], d["teacher"], d["train"]["label_dropout"]
    exp = build_experiment(ml_collections.ConfigDict(d))
    assert exp.cm is None and exp.label_dropout == 0.0


def test_label_dropout_for_classifier_free_guidance_teachers():
    """train.label_dropout replaces labels by the null class (num_classes - 1) at that rate."""
    from atdiff_jax.train.objectives import drop_labels
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4000))
    labels = jnp.arange(4000, dtype=jnp.int32) % 10
    out = np.asarray(drop_labels(keys, labels, rate=0.2, null_label=10))
    dropped = out == 10
    assert abs(dropped.mean() - 0.2) < 0.03
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    config = config_of(TINY, **{"model.class_cond": True, "model.num_classes": 11,
                                "train.label_dropout": 0.1})
    exp = build_experiment(config)
    assert exp.label_dropout == 0.1 and exp.sample_classes == 10  # samples skip the null class


# ----------------------------------------------------------------------------------------------
# atdiff eval on a consistency model (the experiment's CM cells and robustness)


@pytest.fixture(scope="module")
def cm_eval(cm_run, mnist_data_dir):
    """evaluate_workdir on the CD + AT run: cm_multistep at NFE 2 with the robustness evaluation
    (small grids), and cm_onestep at NFE 1; the same seed and batches, so the same x_T."""
    from atdiff_jax.eval import report
    kw = dict(num_samples=8, batch_size=4, seed=3, data_dir=str(mnist_data_dir))
    multi = report.evaluate_workdir(
        str(cm_run), metrics=("fd_mnist", "robustness"), samplers=("cm_multistep",), nfes=(2,),
        robustness_t=(10, 50), robustness_radii=(0.0, 0.05), robustness_pgd_steps=2,
        robustness_images=4, robustness_sizes=(0.0, 0.1), robustness_samples=8, label="cd_at",
        **kw)
    one = report.evaluate_workdir(str(cm_run), samplers=("cm_onestep",), nfes=(1,),
                                  out_file=cm_run.parent / "onestep.json", **kw)
    return multi, one


def test_eval_scores_cm_samplers_like_dpm_cells(cm_eval, cm_run):
    from atdiff_jax import samplers as samples_lib
    from atdiff_jax.eval.mnist_fd import mnist_feature_distance
    from atdiff_jax.eval.report import _at_32, mnist_reference
    from atdiff_jax.train.loop import restore_for_sampling
    multi, one = cm_eval
    assert [(r["sampler"], r["nfe"]) for r in multi["rows"] + one["rows"]] == [
        ("cm_multistep", 2), ("cm_onestep", 1)]
    for r in multi["rows"] + one["rows"]:    # the row format of DPM cells
        assert set(r) == {"sampler", "nfe", "num_samples", "sample_seconds", "fd_mnist",
                          "confidence", "frac_confident"}
        assert np.isfinite(r["fd_mnist"]) and r["fd_mnist"] > 1.0 and 0 < r["confidence"] <= 1
    assert multi["step"] == one["step"] == 4 and multi["label"] == "cd_at"
    assert json.loads((cm_run / "eval" / "4" / "results.json").read_text())["rows"] == multi["rows"]
    # The cell's images are the ones `atdiff sample` draws (generate with the run's CM settings).
    model, params, experiment, config = restore_for_sampling(str(cm_run))
    imgs, _ = samples_lib.generate(model, params, experiment.diffusion, num=8,
                                   image_shape=(16, 16, 1), rng=jax.random.key(3),
                                   sampler="cm_onestep", steps=1, batch_size=4, cm=experiment.cm)
    ref = mnist_reference(config.data.data_dir)
    assert one["rows"][0]["fd_mnist"] == pytest.approx(mnist_feature_distance(_at_32(imgs), ref),
                                                       rel=1e-6)


def test_eval_robustness_of_a_consistency_model(cm_eval, cm_run):
    """The attack on the consistency function: r = 0 is the clean x_0 error, a radius makes it
    larger, at the chain's noise levels of t; sampling with perturbed inputs: size 0 is the
    clean cell (the same x_T and re-noising), a perturbation of size 0.1 moves the samples."""
    from atdiff_jax.consistency.karras import vp_sigmas
    from atdiff_jax.train.loop import restore_for_sampling
    multi, _ = cm_eval
    chain = restore_for_sampling(str(cm_run))[2].diffusion
    rob = multi["robustness"]
    a = rob["attack"]
    assert rob["model"] == "cm" and a["t"] == [10, 50]
    np.testing.assert_allclose(a["sigma"], vp_sigmas(chain.tables["alphas_cumprod"])[[10, 50]],
                               rtol=1e-6)
    x0c, x0a = np.asarray(a["x0_clean"]), np.asarray(a["x0_attacked"])
    assert x0c.shape == x0a.shape == (2, 2)
    np.testing.assert_allclose(x0a[:, 0], x0c[:, 0], rtol=1e-6)
    assert np.all(x0a[:, 1] > x0c[:, 1]) and np.all(x0c[:, 0] == x0c[:, 1])
    norms = np.asarray(a["delta_norm"])       # inside the l2 ball of radius 0.05 sqrt(16 * 16)
    assert np.all(norms[:, 0] == 0) and np.all((norms[:, 1] > 0.4) & (norms[:, 1] <= 0.8 + 1e-5))
    rows = {(r["sampler"], r["nfe"], r["kind"], r["size"]): r for r in rob["sampling"]["rows"]}
    assert set(rows) == {(s, n, k, z) for s, n in (("cm_onestep", 1), ("cm_multistep", 2))
                         for k in ("gaussian", "adversarial") for z in (0.0, 0.1)}
    clean = multi["rows"][0]["fd_mnist"]
    for kind in ("gaussian", "adversarial"):
        assert rows["cm_multistep", 2, kind, 0.0]["fd_mnist"] == pytest.approx(clean, rel=1e-6)
        assert rows["cm_multistep", 2, kind, 0.1]["fd_mnist"] != pytest.approx(clean, rel=1e-6)
    assert rows["cm_onestep", 1, "gaussian", 0.0]["fd_mnist"] == pytest.approx(
        rows["cm_onestep", 1, "adversarial", 0.0]["fd_mnist"], rel=1e-6)


def test_eval_sampler_and_nfe_must_fit_the_run(cm_run, teacher_run, mnist_data_dir, cm_eval,
                                               tmp_path):
    from atdiff_jax.eval import report
    kw = dict(data_dir=str(mnist_data_dir), num_samples=4)
    with pytest.raises(report.EvalError, match=r"samplers \['ddim'\]: this workdir holds a "
                       r"consistency model \(cm.kind='cd'\), whose samplers are \('cm_onestep', "
                       r"'cm_multistep'\)"):
        report.evaluate_workdir(str(cm_run), samplers=("ddim",), **kw)
    with pytest.raises(report.EvalError, match=r"nfe \[1, 2\]: cm_onestep makes exactly one"):
        report.evaluate_workdir(str(cm_run), samplers=("cm_onestep",), nfes=(1, 2), **kw)
    with pytest.raises(report.EvalError, match=r"nfe \[1\]: cm_multistep makes 2 or more"):
        report.evaluate_workdir(str(cm_run), samplers=("cm_multistep",), nfes=(1,), **kw)
    with pytest.raises(report.EvalError, match=r"samplers \['cm_onestep'\]: this workdir holds a "
                       r"diffusion \(DPM\) run, whose samplers are \('ddim', 'iddpm', 'es', "
                       r"'dpm_solver'\)"):
        report.evaluate_workdir(str(teacher_run), samplers=("cm_onestep",), nfes=(1,), **kw)
    # atdiff eval's report lays CM cells out like DPM ones and has the students' robustness.
    multi, one = cm_eval
    out = report.write_report([multi, one], str(tmp_path / "rep"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| sampler | model | NFE 1 | NFE 2 |" in md
    assert "| cm_onestep | cd_at | " in md and "| cm_multistep | cd_at | " in md
    assert "consistency-function attack" in md and "| cm_multistep-2 | adversarial | 0.1 |" in md
    assert sorted(p.rsplit("/", 1)[1] for p in out["plots"]) == ["fd_mnist_vs_nfe.png",
                                                                 "robustness.png"]
