"""Properties of the perturbation math and of the AT drivers (tiny network, fast to compile)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atdiff_jax.adversarial import driver, perturb
from atdiff_jax.adversarial.perturb import AdversaryConfig
from atdiff_jax.diffusion.gaussian import create_gaussian_diffusion
from atdiff_jax.diffusion.objective import denoising_loss
from atdiff_jax.train.ema import ema_update

SHAPE = (4, 8, 8, 2)


class TinyNet(nn.Module):
    """conv -> +time -> silu -> dropout -> conv, learned-sigma output (2C channels)."""

    @nn.compact
    def __call__(self, x, t, train):
        h = nn.Conv(8, (3, 3))(x)
        h = h + nn.Dense(8)(jnp.sin(t.astype(jnp.float32)[:, None] / 100.0 * jnp.arange(1, 5)))[:, None, None]
        h = nn.Dropout(0.2, deterministic=not train)(nn.silu(h))
        return nn.Conv(2 * x.shape[-1], (3, 3))(h)


NET = TinyNet()
DIFFUSION = create_gaussian_diffusion(steps=100, learn_sigma=True, noise_schedule="cosine",
                                      rescale_learned_sigmas=True)
OPT = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def apply_fn(params, x, t, y, rng):
    return NET.apply({"params": params}, x, t, train=rng is not None,
                     rngs=None if rng is None else {"dropout": rng})


def make_batch(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"x_start": jax.random.uniform(k[0], SHAPE, minval=-1, maxval=1),
            "t": jax.random.randint(k[1], (SHAPE[0],), 0, 100),
            "noise": jax.random.normal(k[2], SHAPE)}


def init_state():
    params = NET.init(jax.random.key(1), jnp.zeros(SHAPE), jnp.zeros(SHAPE[0]), False)["params"]
    return {"params": params, "opt": OPT.init(params), "ema": params, "updates": jnp.int32(0)}


def apply_update(state, grads, aux):
    upd, opt = OPT.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], upd)
    ema = ema_update(state["ema"], params, 0.9999)
    return {"params": params, "opt": opt, "ema": ema, "updates": state["updates"] + 1}


def run(adversary, batch, state, rng):
    loss_fn = functools.partial(denoising_loss, batch=batch, apply_fn=apply_fn,
                                diffusion=DIFFUSION, target_type=adversary.target_type)
    return driver.run_adversary(loss_fn, state, rng, adversary=adversary, delta_shape=SHAPE,
                                params_of=lambda s: s["params"], apply_update=apply_update)


jit_run = jax.jit(run, static_argnums=0)


def test_l2_ascent_step_has_exact_length():
    g = jax.random.normal(jax.random.key(0), SHAPE) * jnp.array([1e-3, 1.0, 50.0, 1e-6])[:, None, None, None]
    delta = jax.random.normal(jax.random.key(1), SHAPE)
    for step in (0.1, 0.37):
        new = perturb.ascent_step(delta, g, norm="l2", step_size=step)
        np.testing.assert_allclose(perturb.per_example_l2(new - delta), step, rtol=1e-5)
    # The fp32 quirk: scaling the gradient by 2**-20 before the 1e-8 clamp shortens tiny steps.
    new = perturb.ascent_step(jnp.zeros(SHAPE), g, norm="l2", step_size=0.1, grad_scale=2.0 ** -20)
    lengths = np.asarray(perturb.per_example_l2(new))
    raw = np.asarray(perturb.per_example_l2(g))
    np.testing.assert_allclose(lengths[raw > 0.0105], 0.1, rtol=1e-5)
    np.testing.assert_allclose(lengths[raw < 0.0104], 0.1 * raw[raw < 0.0104] * 2.0 ** -20 / 1e-8, rtol=1e-5)
    # A zero gradient gives no step; linf steps by step_size * sign.
    np.testing.assert_array_equal(perturb.ascent_step(delta, jnp.zeros(SHAPE), norm="l2", step_size=0.1), delta)
    new = perturb.ascent_step(delta, g, norm="linf", step_size=0.05)
    np.testing.assert_allclose(jnp.abs(new - delta), 0.05, rtol=1e-5)


def test_projection_never_exceeds_radius():
    delta = jax.random.normal(jax.random.key(2), SHAPE) * jnp.array([0.01, 1.0, 10.0, 100.0])[:, None, None, None]
    for radius in (0.5, 3.0, 50.0):
        proj = perturb.project(delta, norm="l2", radius=radius)
        norms, before = np.asarray(perturb.per_example_l2(proj)), np.asarray(perturb.per_example_l2(delta))
        assert np.all(norms <= radius * (1 + 1e-6))
        inside = before <= radius
        np.testing.assert_array_equal(np.asarray(proj)[inside], np.asarray(delta)[inside])
        np.testing.assert_allclose(norms[~inside], radius, rtol=1e-6)
        proj = perturb.project(delta, norm="linf", radius=radius)
        assert float(jnp.max(jnp.abs(proj))) <= radius
        np.testing.assert_array_equal(proj, jnp.clip(delta, -radius, radius))


def test_radius_semantics_and_config_errors():
    cfg = AdversaryConfig()
    assert cfg.steps == 3 and cfg.step_size == 0.1 and cfg.max_norm == 0.1
    # The reference's radius for 3x16x16 (manifest clip_radius), float32 bit for bit.
    assert np.float32(cfg.radius((4, 16, 16, 3))) == np.float32(2.7712812423706055)
    assert float(cfg.radius((1, 32, 32, 3))) == pytest.approx(0.1 * np.sqrt(3072), rel=1e-6)
    assert float(AdversaryConfig(radius_scaling="absolute", max_norm=0.3).radius(SHAPE)) == pytest.approx(0.3)
    assert float(AdversaryConfig(norm="linf", max_norm=0.03).radius(SHAPE)) == pytest.approx(0.03)
    for bad in ({"kind": "freelb"}, {"norm": "l1"}, {"steps": 0}, {"target_type": "x"},
                {"radius_scaling": "rms"}, {"step_size": -1.0}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            AdversaryConfig(**bad)


def test_fast_at_makes_exactly_k_updates_and_steps_delta():
    batch, state = make_batch(), init_state()
    for k in (1, 2, 3, 5):
        new, metrics = jit_run(AdversaryConfig(steps=k), batch, state, jax.random.key(3))
        assert int(new["updates"]) == k
        assert metrics["loss"].shape == (k,) and metrics["aux"]["loss"].shape == (k, SHAPE[0])
        dn = np.asarray(metrics["delta_norm"])
        np.testing.assert_array_equal(dn[0], 0.0)  # the first update is clean
        if k > 1:
            np.testing.assert_allclose(dn[1], 0.1, rtol=1e-5)  # one unit-normalised step
            assert np.all(dn[1:] <= 0.1 * np.arange(1, k)[:, None] * (1 + 1e-5))
            assert np.all(np.asarray(metrics["delta_grad_norm"]) > 0)
        # The importance-weighted mean of the per-example losses is the reported loss.
        np.testing.assert_allclose(metrics["loss"], np.mean(metrics["aux"]["loss"], axis=1), rtol=1e-6)


def test_fast_at_with_k1_is_clean_training_bit_for_bit():
    batch, state, rng = make_batch(1), init_state(), jax.random.key(4)

    @jax.jit
    def clean_step(state, batch, rng):
        loss_fn = functools.partial(denoising_loss, batch=batch, apply_fn=apply_fn, diffusion=DIFFUSION)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], None, jax.random.fold_in(rng, 0))
        return apply_update(state, grads, None), loss

    expected, loss = clean_step(state, batch, rng)
    for adversary in (AdversaryConfig(steps=1), AdversaryConfig(kind="none")):
        got, metrics = jit_run(adversary, batch, state, rng)
        assert float(metrics["loss"][0]) == float(loss)
        jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_fast_at_first_inner_step_equals_clean_step_and_later_ones_differ():
    batch, state, rng = make_batch(2), init_state(), jax.random.key(5)
    clean, _ = jit_run(AdversaryConfig(steps=1), batch, state, rng)
    _, metrics = jit_run(AdversaryConfig(steps=3), batch, state, rng)
    loss_fn = functools.partial(denoising_loss, batch=batch, apply_fn=apply_fn, diffusion=DIFFUSION)
    # Step 0 is evaluated at the initial params and delta = 0.
    np.testing.assert_allclose(metrics["loss"][0], loss_fn(state["params"], None, jax.random.fold_in(rng, 0))[0],
                               rtol=1e-6)
    # Step 1 is evaluated at the params after one update, with delta != 0.
    d1 = metrics["delta_norm"][1]
    assert np.all(np.asarray(d1) > 0)
    l1_clean_delta = loss_fn(clean["params"], None, jax.random.fold_in(rng, 1))[0]
    assert float(metrics["loss"][1]) != pytest.approx(float(l1_clean_delta), rel=1e-7)


def test_projection_binds_inside_the_driver():
    adversary = AdversaryConfig(steps=4, step_size=0.5, max_norm=0.6, radius_scaling="absolute")
    _, metrics = jit_run(adversary, make_batch(3), init_state(), jax.random.key(6))
    dn = np.asarray(metrics["delta_norm"])
    np.testing.assert_allclose(dn[1], 0.5, rtol=1e-5)
    assert np.all(dn <= 0.6 * (1 + 1e-6)) and np.any(dn[2:] > 0.59)


def test_dropout_key_changes_every_inner_step():
    batch, state = make_batch(4), init_state()
    # With lr=0 and delta stuck at 0 the inner losses differ only through dropout.
    frozen = lambda s, g, a: s  # noqa: E731
    loss_fn = functools.partial(denoising_loss, batch=batch, apply_fn=apply_fn, diffusion=DIFFUSION)
    _, metrics = jax.jit(lambda s: driver.fast_at(
        loss_fn, s, jax.random.key(7), adversary=AdversaryConfig(steps=3, step_size=0.0),
        delta_shape=SHAPE, params_of=lambda st: st["params"], apply_update=frozen))(state)
    losses = np.asarray(metrics["loss"])
    assert len(set(losses.tolist())) == 3


def test_pgd_makes_one_update_at_the_final_delta():
    batch, state, rng = make_batch(5), init_state(), jax.random.key(8)
    new, metrics = jit_run(AdversaryConfig(kind="pgd", steps=3), batch, state, rng)
    assert int(new["updates"]) == 1
    assert metrics["delta_grad_norm"].shape == (3, SHAPE[0])
    assert np.all(np.asarray(metrics["delta_norm"][0]) <= 0.3 * (1 + 1e-5))
    assert np.all(np.asarray(metrics["delta_norm"][0]) > 0.1)
    # PGD's final delta increases the loss over the clean one at the same params and key.
    loss_fn = functools.partial(denoising_loss, batch=batch, apply_fn=apply_fn, diffusion=DIFFUSION)
    clean = loss_fn(state["params"], None, jax.random.fold_in(rng, 3))[0]
    assert float(metrics["loss"][0]) > float(clean)


def test_timestep_sampler_sees_the_adversarial_losses_of_every_inner_step():
    from atdiff_jax.diffusion.timestep_sampler import TimestepSampler
    sampler = TimestepSampler("loss-second-moment", DIFFUSION.num_timesteps)
    batch, rng = make_batch(7), jax.random.key(10)

    def update_with_sampler(state, grads, aux):
        new = apply_update(state, grads, aux)
        new["sampler"] = sampler.update(state["sampler"], batch["t"], aux["loss"])
        return new

    def step(state):
        loss_fn = functools.partial(denoising_loss, batch=batch, apply_fn=apply_fn, diffusion=DIFFUSION)
        return driver.fast_at(loss_fn, state, rng, adversary=AdversaryConfig(steps=3), delta_shape=SHAPE,
                              params_of=lambda s: s["params"], apply_update=update_with_sampler)

    state = dict(init_state(), sampler=sampler.init())
    new, metrics = jax.jit(step)(state)
    counts = np.asarray(new["sampler"].counts)
    assert counts.sum() == 3 * SHAPE[0]
    # The recorded history of each timestep is the per-example adversarial losses, in order.
    t0 = int(batch["t"][0])
    first = [i for i in range(SHAPE[0]) if int(batch["t"][i]) == t0]
    recorded = np.asarray(new["sampler"].losses[t0, :counts[t0]])
    expected = np.asarray(metrics["aux"]["loss"])[:, first].reshape(-1)
    np.testing.assert_allclose(recorded, expected, rtol=1e-6)


def test_random_direction_control():
    batch, state, rng = make_batch(6), init_state(), jax.random.key(9)
    new, m_rand = jit_run(AdversaryConfig(kind="random"), batch, state, rng)
    _, m_fast = jit_run(AdversaryConfig(kind="fast"), batch, state, rng)
    assert int(new["updates"]) == 3
    np.testing.assert_allclose(m_rand["delta_norm"][1], 0.1, rtol=1e-5)
    # Same clean first step, then different perturbations: the adversarial one hurts more.
    np.testing.assert_array_equal(m_rand["loss"][0], m_fast["loss"][0])
    assert not np.allclose(m_rand["loss"][1:], m_fast["loss"][1:])
