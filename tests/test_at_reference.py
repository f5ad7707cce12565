"""The adversarial objective and one whole K=3 AT minibatch against the authors' PyTorch code.

Tolerances (from tests/testdata/adm_reference/README.md, where the reference's own float32
run-to-run spread with a different thread count is listed): per-example losses rtol 1e-5,
δ-gradients atol 2e-5 * max|g|, δ after each ascent step atol 1e-6, parameters after the three
AdamW steps compared as (param - init) with atol 2e-5 and the EMA as (ema - init) with atol 5e-8,
skipping the 6 parameters whose exact gradient is zero (their float32 gradient noise is amplified
by Adam into arbitrary updates of up to K*lr in any implementation). For the same reason single
elements whose first-step gradient is below Adam's eps = 1e-8 in magnitude (a few hundred out of
828k, where float32 summation noise decides the update) are compared with atol K*lr = 3e-4.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_ref, nchw_to_nhwc, ref_manifest, ref_state_dict

from atdiff_jax.adversarial import driver
from atdiff_jax.adversarial.perturb import AdversaryConfig
from atdiff_jax.convert.guided_diffusion import state_dict_from_params
from atdiff_jax.diffusion.gaussian import create_gaussian_diffusion
from atdiff_jax.diffusion.objective import denoising_loss
from atdiff_jax.train.ema import ema_update

EMA_RATE = 0.9999


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                     rescale_learned_sigmas=True)


@pytest.fixture(scope="module")
def apply_fn(ref_unet):
    module, _ = ref_unet
    return lambda p, x, t, y, rng: module.apply({"params": p}, x, t, y=y, train=False)


@pytest.mark.parametrize("target_type", ["delta_detach", "delta", "original"])
def test_delta_gradient_matches_reference(ref_unet, apply_fn, diffusion, target_type):
    _, params = ref_unet
    ref = load_ref("adv_loss")
    batch = {"x_start": nchw_to_nhwc(ref["x_start"]), "t": ref["t"], "noise": nchw_to_nhwc(ref["noise"])}
    loss_fn = jax.jit(jax.value_and_grad(functools.partial(
        denoising_loss, batch=batch, apply_fn=apply_fn, diffusion=diffusion,
        target_type=target_type), argnums=(0, 1), has_aux=True))
    (loss, terms), (g_params, g_delta) = loss_fn(params, jnp.asarray(nchw_to_nhwc(ref["delta"])), None)
    np.testing.assert_allclose(loss, ref[f"{target_type}/mean_loss"], rtol=1e-5)
    for k in ("mse", "vb", "loss"):
        np.testing.assert_allclose(terms[k], ref[f"{target_type}/{k}"], rtol=1e-5, err_msg=k)
    g_ref = nchw_to_nhwc(ref[f"{target_type}/grad_delta"])
    np.testing.assert_allclose(g_delta, g_ref, rtol=0, atol=2e-5 * np.abs(g_ref).max())
    if target_type == "delta_detach":
        # The parameter gradient of the same backward pass, as per-tensor l2 norms.
        sd = state_dict_from_params(jax.device_get(g_params))
        order = ref_manifest()["parameter_order"]
        norms = np.array([np.linalg.norm(sd[k].astype(np.float64)) for k in order])
        ref_norms = ref["delta_detach/param_grad_l2"]
        mask = ~load_ref("adv_minibatch")["zero_true_grad_mask"]
        np.testing.assert_allclose(norms[mask], ref_norms[mask], rtol=2e-4, atol=1e-7)


def _run_minibatch(ref_unet, apply_fn, diffusion, ref, grad_scale):
    _, params0 = ref_unet
    opt = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    batch = {"x_start": nchw_to_nhwc(ref["batch"]), "t": ref["t"],
             "noise": nchw_to_nhwc(ref["noise"]), "weights": ref["weights"]}
    adversary = AdversaryConfig(steps=3, step_size=0.1, max_norm=0.1, grad_scale=grad_scale)

    def apply_update(state, grads, aux):
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = ema_update(state["ema"], params, EMA_RATE)
        return {"params": params, "opt": opt_state, "ema": ema}

    @jax.jit
    def minibatch(state, batch):
        loss_fn = functools.partial(denoising_loss, batch=batch, apply_fn=apply_fn,
                                    diffusion=diffusion, target_type=adversary.target_type)
        return driver.fast_at(loss_fn, state, jax.random.key(0), adversary=adversary,
                              delta_shape=batch["x_start"].shape, params_of=lambda s: s["params"],
                              apply_update=apply_update, return_deltas=True)

    state = {"params": params0, "opt": opt.init(params0), "ema": params0}
    return minibatch(state, batch)


def _first_step_grads(ref_unet, apply_fn, diffusion, ref):
    """The float32 gradient of the first (clean) inner step, in torch names."""
    _, params0 = ref_unet
    batch = {"x_start": nchw_to_nhwc(ref["batch"]), "t": ref["t"],
             "noise": nchw_to_nhwc(ref["noise"]), "weights": ref["weights"]}
    grad = jax.jit(jax.grad(lambda p: denoising_loss(p, None, None, batch=batch, apply_fn=apply_fn,
                                                     diffusion=diffusion)[0]))
    return state_dict_from_params(jax.device_get(grad(params0)))


@pytest.mark.parametrize("name,grad_scale", [("adv_minibatch", 2.0 ** -20),
                                             ("adv_minibatch_lgscale0", 1.0)])
def test_whole_at_minibatch_matches_reference(ref_unet, apply_fn, diffusion, name, grad_scale):
    ref = load_ref(name)
    state, metrics = _run_minibatch(ref_unet, apply_fn, diffusion, ref, grad_scale)

    # δ used at inner steps 1 and 2 = δ after each ascent step; step 0 is clean.
    deltas = np.asarray(metrics["delta"])
    np.testing.assert_array_equal(deltas[0], 0.0)
    np.testing.assert_allclose(deltas[1:], nchw_to_nhwc(ref["delta_after_ascent"]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics["delta_norm"][1:], ref["delta_l2_before_clip"], rtol=1e-5)
    for k in ("mse", "vb", "loss"):
        np.testing.assert_allclose(metrics["aux"][k], ref[f"inner_terms/{k}"], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(metrics["loss"], ref["inner_mean_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["delta_grad_norm"], ref["delta_grad_raw_l2"], rtol=1e-4)

    init = ref_state_dict()
    mask = dict(zip(ref_manifest()["parameter_order"], ref["zero_true_grad_mask"]))
    tiny = {k: np.abs(g) < 1e-8 for k, g in _first_step_grads(ref_unet, apply_fn, diffusion, ref).items()}
    assert sum(int(v.sum()) for k, v in tiny.items() if not mask[k]) < 1000
    params = state_dict_from_params(jax.device_get(state["params"]))
    ema = state_dict_from_params(jax.device_get(state["ema"]))
    checked = 0
    for key, p0 in init.items():
        if mask[key]:
            continue
        if f"param/{key}" in ref:  # the lgscale0 file keeps three spot-check parameters only
            atol = np.where(tiny[key], 3e-4, 2e-5)
            np.testing.assert_array_less(np.abs(params[key] - ref[f"param/{key}"]), atol, err_msg=key)
            checked += 1
        if f"ema_minus_init/{key}" in ref:
            # ema and the reference's ema are float32 numbers near p0: each is known to half an
            # ulp of |p0|, so their differences from p0 can differ by one ulp of |p0| (6e-8 for
            # |p0| in [0.5, 1)) however exactly the update was computed; plus 5e-8.
            np.testing.assert_array_less(np.abs((ema[key] - p0) - ref[f"ema_minus_init/{key}"]),
                                         5e-8 + np.spacing(np.abs(p0)), err_msg=key)
    assert checked == (138 if name == "adv_minibatch" else 3)
    # Every parameter moved by about lr per step: the update really happened three times.
    if name == "adv_minibatch":
        np.testing.assert_allclose(
            sum(float(np.sum(ema[k].astype(np.float64))) for k in init),
            ref["opt/ema_sum_after"][-1], rtol=1e-7)
