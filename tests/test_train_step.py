"""The jitted training step in-process: non-finite skipping, micro-batching, bf16, several EMA
rates, and starting from a converted PyTorch checkpoint."""
import functools
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.diffusion.objective import denoising_loss
from atdiff_jax.train import step as step_lib
from atdiff_jax.train.build import (ConfigError, build_experiment, build_optimizer,
                                    lr_schedule, validate_config)
from atdiff_jax.train.state import create_state, ema_key, init_params, init_state

TINY = pathlib.Path(__file__).parent.parent / "configs" / "tiny.py"


def tiny_config(**overrides):
    c = runpy.run_path(str(TINY))["get_config"]()
    for path, value in overrides.items():
        group, name = path.split(".")
        c[group][name] = value
    return c


def make(config):
    exp = build_experiment(config)
    opt = build_optimizer(config)
    state = jax.jit(functools.partial(init_state, exp, opt))(jax.random.key(0))
    step = jax.jit(step_lib.make_train_step(exp, opt, seed=config.seed, lr_fn=lr_schedule(config)))
    return exp, opt, state, step


def batch_of(config, seed=0):
    b, s = config.train.global_batch_size, config.model.image_size
    return {"image": jax.random.uniform(jax.random.key(seed), (b, s, s, 1), minval=-1, maxval=1)}


def test_non_finite_updates_are_skipped_and_counted_and_ema_rates_are_separate():
    config = tiny_config(**{"adv.steps": 2, "train.ema_rates": (0.5, 0.9)})
    _, _, state, step = make(config)
    good, metrics = step(state, batch_of(config))
    assert int(good.updates) == 2 and int(good.skipped) == 0 and int(good.step) == 1
    e1, e2 = good.ema[ema_key(0.5)], good.ema[ema_key(0.9)]
    # Two EMA copies with their own rates: the faster one moved further from the init.
    d1 = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum(jnp.abs(a - b)), e1, state.params))
    d2 = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum(jnp.abs(a - b)), e2, state.params))
    assert sum(map(float, d1)) > 2 * sum(map(float, d2)) > 0
    bad_batch = batch_of(config)
    bad_batch["image"] = bad_batch["image"].at[0, 0, 0, 0].set(jnp.nan)
    bad, metrics = step(good, bad_batch)
    assert int(bad.skipped) == 2 and int(bad.updates) == 2 and int(bad.step) == 2
    assert int(metrics["skipped_updates"]) == 2
    jax.tree.map(np.testing.assert_array_equal, bad.params, good.params)
    jax.tree.map(np.testing.assert_array_equal, bad.ema, good.ema)
    jax.tree.map(np.testing.assert_array_equal, bad.opt_state, good.opt_state)


def test_microbatched_gradients_equal_whole_batch_gradients():
    config = tiny_config()
    exp, _, state, _ = make(config)
    b = config.train.global_batch_size
    x = batch_of(config)["image"]
    k = jax.random.split(jax.random.key(3), 2)
    batch = {"x_start": x, "t": jax.random.randint(k[0], (b,), 0, 100),
             "noise": jax.random.normal(k[1], x.shape), "weights": jnp.linspace(0.5, 1.5, b)}
    apply_fn = lambda p, xx, t, y, rng: exp.model.apply({"params": p}, xx, t, y=y)  # noqa: E731
    loss_of_batch = functools.partial(denoising_loss, apply_fn=apply_fn, diffusion=exp.diffusion)

    def loss_mb(params, delta, rng, mb):
        return loss_of_batch(params, delta, rng, batch=mb)

    delta = 0.05 * jax.random.normal(jax.random.key(4), x.shape)
    whole = jax.jit(jax.value_and_grad(functools.partial(loss_mb, mb=batch), argnums=(0, 1),
                                       has_aux=True))
    (l1, aux1), (g1, d1) = whole(state.params, delta, None)
    micro = jax.jit(step_lib.microbatched_grad_fn(loss_mb, batch, 4))
    (l2, aux2), (g2, d2) = micro(state.params, delta, None)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    np.testing.assert_allclose(aux2["loss"], aux1["loss"], rtol=1e-6)  # merged back in batch order
    np.testing.assert_allclose(d2, d1, rtol=1e-4, atol=1e-6 * float(jnp.abs(d1).max()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g2, g1)
    # The clean path (delta=None) too.
    (l3, _), (g3, none) = micro(state.params, None, None)
    assert none is None and np.isfinite(float(l3))


def test_bfloat16_compute_trains_with_float32_params():
    config = tiny_config(**{"model.dtype": "bfloat16", "adv.steps": 1})
    _, _, state, step = make(config)
    new, metrics = step(state, batch_of(config))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
    assert np.isfinite(float(metrics["loss"])) and int(new.skipped) == 0
    f32 = tiny_config(**{"adv.steps": 1})
    _, _, state32, step32 = make(f32)
    _, m32 = step32(state32, batch_of(f32))
    assert float(metrics["loss"]) == pytest.approx(float(m32["loss"]), rel=0.05)


def test_start_from_a_converted_pytorch_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from atdiff_jax.convert.guided_diffusion import state_dict_from_params
    from atdiff_jax.train.loop import _initial_params
    config = tiny_config()
    exp = build_experiment(config)
    src = init_params(exp, jax.random.key(7))
    ema_src = jax.tree.map(lambda p: p + 0.5, src)
    for name, tree in (("model.pt", src), ("ema.pt", ema_src)):
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in
                    state_dict_from_params(jax.device_get(tree)).items()}, tmp_path / name)
    config.init.checkpoint = str(tmp_path / "model.pt")
    config.init.ema_checkpoint = str(tmp_path / "ema.pt")
    params, ema = _initial_params(config, exp)
    jax.tree.map(np.testing.assert_array_equal, params, src)
    state = create_state(exp, build_optimizer(config), params, ema)
    jax.tree.map(np.testing.assert_array_equal, state.ema[ema_key(0.9999)], ema_src)
    assert int(state.updates) == 0 and int(state.step) == 0  # optimizer state is fresh
    config.init.checkpoint_sha256 = "0" * 64
    with pytest.raises(ValueError, match="SHA-256 is .*, expected 0000"):
        _initial_params(config, exp)


@pytest.mark.parametrize("path,value,message", [
    ("adv.kind", "freelb", "config.adv.kind must be one of"),
    ("adv.steps", 0, "config.adv.steps must be an integer > 0"),
    ("diffusion.noise_schedule", "sigmoid", "config.diffusion.noise_schedule must be one of"),
    ("train.microbatches", 3, "divisible by config.train.microbatches"),
    ("model.dtype", "float16", "config.model.dtype must be one of"),
    ("optim.b1", 1.5, "config.optim.b1 must be in [0, 1)"),
    ("train.ema_rates", (1.5,), "config.train.ema_rates"),
    ("train.ema_rates", (0.999, "abc"), ("config.train.ema_rates must be a non-empty list of "
                                         "rates in [0, 1), got (0.999, 'abc')")),
])
def test_invalid_config_values_name_the_option(path, value, message):
    config = tiny_config()
    group, name = path.split(".")
    config[group][name] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate_config(config)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decays_after_the_warm_up_to_the_end_factor(decay):
    config = tiny_config()
    o = config.optim
    o.lr, o.warmup_steps, o.decay, o.decay_steps, o.end_lr_factor = 1e-3, 10, decay, 110, 0.1
    validate_config(config)
    lr = lr_schedule(config)
    end = 1e-4
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4, rel=1e-6)
    assert float(lr(10)) == pytest.approx(1e-3, rel=1e-6)   # the peak, where the decay starts
    # half-way through the decay: (peak + end) / 2 for both shapes
    assert float(lr(60)) == pytest.approx((1e-3 + end) / 2, rel=1e-5)
    # a quarter of the way: linear 3/4 of the span above end; cosine (1 + cos(pi/4)) / 2 of it
    frac = 0.75 if decay == "linear" else (1 + np.cos(np.pi / 4)) / 2
    assert float(lr(35)) == pytest.approx(end + frac * (1e-3 - end), rel=1e-5)
    assert float(lr(110)) == pytest.approx(end, rel=1e-5)
    assert float(lr(500)) == pytest.approx(end, rel=1e-5)    # constant after decay_steps
    o.warmup_steps = 0
    assert float(lr_schedule(config)(0)) == pytest.approx(1e-3)   # no warm-up: starts at the peak


def test_lr_without_the_decay_options_is_constant_after_the_warm_up():
    """The default, and configs written before optim.decay existed (e.g. an old config.json)."""
    config = tiny_config()
    config.optim.lr, config.optim.warmup_steps = 1e-3, 4
    for c in (config, _without(config, "optim.decay", "optim.decay_steps", "optim.end_lr_factor")):
        validate_config(c)
        lr = lr_schedule(c)
        assert [float(lr(n)) for n in (0, 2, 4, 10_000)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])


def _without(config, *paths):
    config = config.copy_and_resolve_references()
    for path in paths:
        group, name = path.split(".")
        del config[group][name]
    return config


@pytest.mark.parametrize("values,message", [
    ({"decay": "step"}, "config.optim.decay must be one of ('none', 'cosine', 'linear'), got 'step'"),
    ({"decay": "cosine"}, "config.optim.decay_steps must be an integer > 0, got 0"),
    ({"decay": "linear", "decay_steps": 50, "warmup_steps": 50},
     "config.optim.decay_steps (50) must be larger than config.optim.warmup_steps (50): the "
     "decay follows the warm-up"),
    ({"decay": "cosine", "decay_steps": 100, "end_lr_factor": 1.5},
     "config.optim.end_lr_factor must be in [0, 1], got 1.5"),
    ({"decay": "cosine", "decay_steps": 100, "end_lr_factor": -0.1},
     "config.optim.end_lr_factor must be a number >= 0, got -0.1"),
])
def test_bad_lr_decay_options_name_the_option(values, message):
    config = tiny_config()
    config.optim.update(values)
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert str(e.value) == message


def test_a_run_starts_from_the_pytorch_weights_placed_on_the_mesh(tmp_path):
    torch = pytest.importorskip("torch")
    from atdiff_jax.convert.guided_diffusion import state_dict_from_params
    from atdiff_jax.train import sharding
    from atdiff_jax.train.loop import _abstract_state, _initial_state
    config = tiny_config()
    exp, opt = build_experiment(config), build_optimizer(config)
    src = init_params(exp, jax.random.key(11))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in
                state_dict_from_params(jax.device_get(src)).items()}, tmp_path / "model.pt")
    config.init.checkpoint = str(tmp_path / "model.pt")
    mesh = sharding.create_mesh(1)
    shardings = sharding.state_shardings(_abstract_state(exp, opt), mesh)
    state = _initial_state(config, exp, opt, shardings)
    jax.tree.map(np.testing.assert_array_equal, state.params, src)
    jax.tree.map(np.testing.assert_array_equal, state.ema[ema_key(0.9999)], src)
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(state.params))


def test_an_override_of_the_wrong_type_is_a_flag_error():
    """``--config.x=v`` is parsed by ml_collections with the field's type, as the CLI does; a
    wrong type stops the flag parser (``FATAL Flags parsing error: ...``, exit status 1)."""
    from absl import flags
    from ml_collections import config_flags

    def parse(*overrides):
        argv = ["atdiff", f"--config={TINY}", *overrides]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                        sys_argv=argv)
        fv(argv)
        return fv.config

    with pytest.raises(flags.IllegalFlagValueError) as e:
        parse("--config.adv.steps=1.5")
    assert str(e.value) == ("flag --config.adv.steps=1.5: invalid literal for int() with base 10: "
                            "'1.5'")
    with pytest.raises(flags.IllegalFlagValueError, match="Non-boolean argument to boolean flag"):
        parse("--config.data.random_flip=maybe")
    # a tuple field takes any text (here one string): validate_config names it
    with pytest.raises(ConfigError) as e:
        validate_config(parse("--config.train.ema_rates=0.999,abc"))
    assert str(e.value) == ("config.train.ema_rates must be a non-empty list of rates in [0, 1), "
                            "got ('0.999,abc',)")


@pytest.mark.parametrize("overrides,message", [
    ({"model.in_channels": 3}, ("config.model.in_channels is 3, but the images of 'mnist32' "
                                "have 1 channel(s): set --config.model.in_channels=1")),
    ({"model.class_cond": True, "model.num_classes": 5},
     ("config.model.num_classes is 5, but 'mnist32' has 10 classes: set "
      "--config.model.num_classes=10")),
    ({"model.class_cond": True, "model.num_classes": 10, "train.label_dropout": 0.1},
     ("config.model.num_classes is 10, but 'mnist32' has 10 classes plus the null class "
      "num_classes - 1: set --config.model.num_classes=11")),
    ({"data.split": "train[:4]"},
     "config.data: split 'train[:4]' of 'mnist32' has 4 examples, fewer than global_batch_size=8"),
], ids=["in_channels", "num_classes", "null_class", "too_few_examples"])
def test_data_that_does_not_fit_the_model_is_one_config_error(tmp_path, mnist_data_dir,
                                                              overrides, message):
    """Checked when the data are opened, before anything is compiled or written (a wrong channel
    count would fail inside the jitted step, labels >= num_classes would be clamped silently)."""
    from atdiff_jax.train.loop import train
    config = tiny_config(**{"data.data_dir": str(mnist_data_dir), **overrides})
    with pytest.raises(ConfigError) as e:
        train(config, tmp_path / "run")
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()
