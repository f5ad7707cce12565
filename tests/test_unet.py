"""The Flax ADM UNet against the PyTorch reference (config A and the option vectors).

Tolerances: UNet outputs and activations are compared at atol 2e-5, the tolerance the reference
README suggests for a float32 port (torch alone moves config A's output by 2.7e-6 between 1 and 2
CPU threads; this port measures <= 5e-6 on outputs, 9e-6 on the middle block).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.convert.guided_diffusion import params_from_state_dict, unet_from_state_dict
from atdiff_jax.models import UNetModel, timestep_embedding
from atdiff_jax.models.adm import create_model
from atdiff_jax.models.unet import AttentionBlock, ResBlock
from conftest import (UNET_OPTION_ATOL, UNET_OPTIONS, assert_matches_unet_option, load_ref,
                      load_unet_option, nchw_to_nhwc, nhwc_to_nchw, ref_create_model_kwargs,
                      ref_state_dict)

ATOL = UNET_OPTION_ATOL  # 2e-5
OPTIONS = sorted(UNET_OPTIONS.glob("*.npz"))


def _random_params(module, *args, seed=0, scale=0.1):
    """Params of ``module`` filled with N(0, scale^2) values (GroupNorm scales 1 + N(0, scale^2)).

    Uses ``jax.eval_shape`` + numpy instead of ``module.init``: compiling Flax's per-parameter RNG
    initialisers takes many seconds on CPU.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, s):
        v = scale * rng.standard_normal(s.shape).astype(np.float32)
        return jnp.asarray(v + 1 if path[-1].key == "scale" else v)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def ref_intermediates_fn(ref_unet):
    """Jitted ``(x, t) -> (out, intermediates)`` of the reference UNet."""
    module, params = ref_unet
    return jax.jit(lambda x, t: module.apply({"params": params}, x, t,
                                             mutable=["intermediates"]))


# ----------------------------------------------------------------------------------------------
# config A (authors' reference)


@pytest.mark.parametrize("t_key,out_key", [("t", "out"), ("t_float", "out_t_float")])
def test_forward_matches_reference(ref_model_fn, t_key, out_key):
    ref = load_ref("unet_forward")
    out = ref_model_fn(nchw_to_nhwc(ref["x"]), ref[t_key])
    assert out.shape == (4, 16, 16, 6) and out.dtype == jnp.float32
    np.testing.assert_allclose(nhwc_to_nchw(out), ref[out_key], rtol=0, atol=ATOL)


def test_intermediate_activations_match_reference(ref_intermediates_fn):
    ref = load_ref("unet_forward")
    _, state = ref_intermediates_fn(nchw_to_nhwc(ref["x"]), ref["t"])
    acts = state["intermediates"]
    # cos/sin(t * f) for f <= 1: an implementation within 1 ulp of the exactly rounded argument
    # t * f (|t * f| <= t) can differ from another by eps32 * t, the argument's own rounding (XLA's
    # vectorised and scalar expansions do, by 1.7e-6 at t = 999); plus 1e-6 for the result.
    t = np.asarray(ref["t"], np.float32)[:, None]
    diff = np.abs(acts["timestep_embedding"][0] - ref["act/timestep_embedding"])
    np.testing.assert_array_less(diff, np.broadcast_to(1e-6 + np.finfo(np.float32).eps * t,
                                                       diff.shape))
    np.testing.assert_allclose(acts["time_embed"][0], ref["act/time_embed"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(nhwc_to_nchw(acts["middle_block"][0]), ref["act/middle_block"],
                               rtol=0, atol=ATOL)


def test_timestep_embedding_layout():
    t = jnp.array([0.0, 990.996])
    emb = timestep_embedding(t, 7)  # odd width: 3 cos, 3 sin, 1 zero column
    assert emb.shape == (2, 7) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 0, 0, 0, 0])
    freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
    np.testing.assert_allclose(emb[1, :3], np.cos(990.996 * freqs), atol=2e-4)
    np.testing.assert_allclose(emb[1, 3:6], np.sin(990.996 * freqs), atol=2e-4)
    assert emb[1, 6] == 0


# ----------------------------------------------------------------------------------------------
# options not in config A: vectors from the public guided-diffusion code (see unet_options/)


@pytest.mark.parametrize("path", OPTIONS, ids=[p.stem for p in OPTIONS])
def test_unet_options_match_public_reference(path):
    data, unet_kwargs, cm_kwargs, state_dict = load_unet_option(path)
    module = UNetModel(**unet_kwargs)
    if cm_kwargs is not None:  # create_model must build exactly the same architecture
        assert create_model(**cm_kwargs) == module
    params = params_from_state_dict(state_dict, module)
    assert_matches_unet_option(module, params, data, atol=ATOL)


def test_option_vectors_present():
    assert {p.stem for p in OPTIONS} == {"legacy_numheads", "classcond_updown",
                                        "avgpool_1ch_float_t", "classcond32"}


def test_legacy_and_new_attention_order_agree_after_permuting_qkv():
    """QKVAttention splits qkv channels as [3, heads, ch], the legacy one as [heads, 3, ch]."""
    heads, ch, c = 4, 8, 32
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, c))
    new = AttentionBlock(heads, new_order=True)
    legacy = AttentionBlock(heads, new_order=False)
    params = _random_params(new, x)
    perm = np.arange(3 * c).reshape(3, heads, ch).transpose(1, 0, 2).reshape(-1)
    legacy_params = dict(params, qkv={"kernel": params["qkv"]["kernel"][:, perm],
                                      "bias": params["qkv"]["bias"][perm]})
    apply_new, apply_legacy = jax.jit(new.apply), jax.jit(legacy.apply)
    out_new = apply_new({"params": params}, x)
    np.testing.assert_allclose(apply_legacy({"params": legacy_params}, x), out_new, atol=1e-5)
    # Without the permutation the two layouts compute different functions.
    assert np.abs(apply_legacy({"params": params}, x) - out_new).max() > 1e-2


# ----------------------------------------------------------------------------------------------
# dropout, dtype, class conditioning, checkpointing


def _tiny_unet(**kwargs):
    """One level, attention in the middle block only: small enough to compile fast."""
    return UNetModel(**dict(dict(image_size=4, in_channels=3, model_channels=32, out_channels=3,
                                 num_res_blocks=1, attention_resolutions=(), channel_mult=(1,),
                                 num_heads=2, use_scale_shift_norm=True), **kwargs))


@pytest.fixture(scope="module")
def tiny_inputs():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    t = jnp.array([3, 700])
    # non-zero output convs, so every parameter's gradient is informative
    return x, t, _random_params(_tiny_unet(), x, t, scale=0.05)


def test_dropout_only_in_train_mode_and_depends_on_rng(tiny_inputs):
    x, t, params = tiny_inputs
    module = _tiny_unet(dropout=0.3)
    fn = jax.jit(lambda key, train: module.apply({"params": params}, x, t, train=train,
                                                 rngs={"dropout": key}), static_argnums=1)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    evaluated = fn(k1, False)
    no_dropout = jax.jit(lambda: _tiny_unet().apply({"params": params}, x, t))()
    np.testing.assert_array_equal(evaluated, no_dropout)  # dropout off in eval mode
    np.testing.assert_array_equal(fn(k2, False), evaluated)  # ... whatever the key
    train1, train1b, train2 = fn(k1, True), fn(k1, True), fn(k2, True)
    np.testing.assert_array_equal(train1, train1b)
    assert np.abs(train1 - evaluated).max() > 1e-2
    assert np.abs(train1 - train2).max() > 1e-2
    with pytest.raises(ValueError, match="dropout"):
        jax.eval_shape(lambda: module.apply({"params": params}, x, t, train=True))
    # train=True without dropout needs no key
    jax.eval_shape(lambda: _tiny_unet().apply({"params": params}, x, t, train=True))


def test_bfloat16_compute_close_to_float32():
    """use_fp16 -> bfloat16 torso. bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per
    op); through ~20 layers the output error measured 0.08 max / 0.01 mean for |out| <= 3, so
    the bounds are 0.05 * max|out| (max) and 0.01 * max|out| (mean)."""
    kwargs = dict(ref_create_model_kwargs(), use_fp16=True)
    module, params = unet_from_state_dict(ref_state_dict(), **kwargs)
    assert module.dtype == jnp.bfloat16
    ref = load_ref("unet_forward")
    out, state = jax.jit(lambda x, t: module.apply({"params": params}, x, t,
                                                   mutable=["intermediates"]))(
        nchw_to_nhwc(ref["x"]), ref["t"])
    assert out.dtype == jnp.float32
    assert state["intermediates"]["middle_block"][0].dtype == jnp.bfloat16
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda p: p.dtype == jnp.float32, params))
    err = np.abs(nhwc_to_nchw(out) - ref["out"])
    scale = np.abs(ref["out"]).max()
    assert 1e-4 < err.max() < 0.05 * scale  # really computed in bf16, and still close
    assert err.mean() < 0.01 * scale


@pytest.fixture(scope="module")
def class_cond_unet():
    data, unet_kwargs, _, state_dict = load_unet_option("classcond_updown")
    module = UNetModel(**unet_kwargs)
    params = params_from_state_dict(state_dict, module)
    fn = jax.jit(lambda x, t, y: module.apply({"params": params}, x, t, y))
    return module, params, fn, data


def test_class_label_changes_output(class_cond_unet):
    _, _, fn, data = class_cond_unet
    x, t, y = nchw_to_nhwc(data["x"]), data["t"], data["y"]
    out = fn(x, t, y)
    other = fn(x, t, (y + 1) % 10)
    assert np.abs(out - other).max() > 1e-2
    # Labels act per example: changing example 1's label leaves example 0 unchanged.
    mixed = fn(x, t, np.array([y[0], (y[1] + 1) % 10]))
    np.testing.assert_allclose(mixed[0], out[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], other[1], atol=1e-6)


def test_class_conditioning_errors(class_cond_unet, ref_unet):
    module, params, _, _ = class_cond_unet
    x, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros(2)
    with pytest.raises(ValueError, match="class-conditional"):
        module.apply({"params": params}, x, t)
    with pytest.raises(ValueError, match=r"y must have shape"):
        module.apply({"params": params}, x, t, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        module.apply({"params": params}, x, t, jnp.zeros(2))
    uncond, uparams = ref_unet
    with pytest.raises(ValueError, match="not class-conditional"):
        uncond.apply({"params": uparams}, x, t, jnp.zeros(2, jnp.int32))


def test_bad_inputs_raise(ref_unet):
    module, params = ref_unet
    apply = lambda x, t: jax.eval_shape(lambda: module.apply({"params": params}, x, t))
    with pytest.raises(ValueError, match="NCHW"):
        apply(jnp.zeros((2, 3, 16, 16)), jnp.zeros(2))
    with pytest.raises(ValueError, match="NHWC"):
        apply(jnp.zeros((16, 16, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="divisible by 2"):
        apply(jnp.zeros((2, 15, 16, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="t must have shape"):
        apply(jnp.zeros((2, 16, 16, 3)), jnp.zeros(3))
    # A scalar t is broadcast to the batch; other spatial sizes are fine.
    assert apply(jnp.zeros((2, 16, 16, 3)), 5.0).shape == (2, 16, 16, 6)
    assert apply(jnp.zeros((1, 8, 24, 3)), jnp.zeros(1)).shape == (1, 8, 24, 6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_head_channels=24), "not divisible by num_head_channels=24"),
    (dict(num_head_channels=-1, num_heads=3), "not divisible by 3 heads"),
    (dict(num_head_channels=-1, num_heads=2, num_heads_upsample=5), "output_blocks_0_1"),
    (dict(num_channels=48), "multiple of the 32 GroupNorm groups"),
    (dict(channel_mult="1,0"), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(**dict(ref_create_model_kwargs(), **kwargs))


def test_use_checkpoint_same_params_and_gradients(tiny_inputs):
    """use_checkpoint (nn.remat) changes memory use only: same params tree and same gradients."""
    x, t, params = tiny_inputs
    plain, remat = _tiny_unet(), _tiny_unet(use_checkpoint=True)
    assert (jax.tree_util.tree_structure(_random_params(remat, x, t))
            == jax.tree_util.tree_structure(params))

    def grads(module):
        return jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x, t) ** 2)))(params)

    assert "remat" in str(jax.make_jaxpr(lambda p: remat.apply({"params": p}, x, t))(params))
    g0, g1 = grads(plain), grads(remat)
    gmax = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g0))
    assert gmax > 1e-3
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        # float32 reassociation only (some biases before a GroupNorm have zero true gradient
        # and float32-noise values), so the tolerance is relative to the largest gradient.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * gmax)


def test_fresh_init_follows_torch_defaults():
    """kaiming_uniform(a=sqrt(5)) weights and biases in +-1/sqrt(fan_in); zero_module convs."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 32))
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 128))
    block = ResBlock(64, use_scale_shift_norm=True)
    variables = jax.jit(block.init)(jax.random.PRNGKey(2), x, emb)
    p = variables["params"]
    for name, fan_in in (("in_layers_2", 9 * 32), ("emb_layers_1", 128), ("skip_connection", 32)):
        bound = 1 / np.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            v = np.asarray(p[name][leaf])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound, (name, leaf)
        assert abs(np.asarray(p[name]["kernel"]).std() - bound / np.sqrt(3)) < 0.1 * bound
    assert not np.any(p["out_layers_3"]["kernel"]) and not np.any(p["out_layers_3"]["bias"])
    np.testing.assert_array_equal(p["out_layers_0"]["scale"], 1)
    # With the zero output conv a fresh block is its skip connection.
    skip = jax.jit(lambda: nn.Conv(64, (1, 1)).apply({"params": p["skip_connection"]}, x))()
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x, emb), skip, atol=1e-6)


def test_norm_groups_sets_every_groupnorm():
    """``norm_groups`` reaches every GroupNorm (checked against a hand-computed out_0 norm)."""
    kw = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="4", in_channels=1, num_head_channels=32)
    m32, m8 = create_model(**kw), create_model(**kw, norm_groups=8)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    t = jnp.array([10, 500])
    params = m8.init(jax.random.key(0), x, t)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                          params)  # the zero-initialised convs would hide the difference
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, m32.init(jax.random.key(0), x, t)["params"])  # same params
    assert not np.allclose(m8.apply({"params": params}, x, t), m32.apply({"params": params}, x, t))

    # The output norm: undo its affine part; what is left is normalised per (image, group of 4).
    _, inter = m8.apply({"params": params}, x, t, capture_intermediates=True)
    gn_out = inter["intermediates"]["out_0"]["__call__"][0]
    assert gn_out.shape[-1] == 32
    g = np.asarray(gn_out, np.float64).reshape(2, 8, 8, 8, 4)
    scale = np.asarray(params["out_0"]["scale"]).reshape(8, 4)
    bias = np.asarray(params["out_0"]["bias"]).reshape(8, 4)
    z = (g - bias) / scale  # the normalised values: zero mean, unit variance per (image, group)
    np.testing.assert_allclose(z.mean(axis=(1, 2, 4)), 0, atol=1e-4)
    np.testing.assert_allclose(z.var(axis=(1, 2, 4)), 1, atol=1e-2)
    assert np.abs(z.mean(axis=(1, 2))).max() > 0.05  # per-channel means survive inside a group
    with pytest.raises(ValueError, match="multiple of the 7 GroupNorm groups"):
        create_model(**kw, norm_groups=7).init(jax.random.key(0), x, t)


@pytest.mark.parametrize("shape,groups,film", [((3, 8, 8, 16), 4, True), ((2, 4, 4, 32), 32, False),
                                               ((2, 5, 3, 8), 1, True)])
def test_group_norm_is_flax_group_norm_then_film(shape, groups, film):
    """The UNet's GroupNorm (per-channel statistics, [B, C] factors computed once, a written-out
    VJP; models/unet.py) is flax's two-pass ``nn.GroupNorm`` followed by the ResBlock's FiLM
    ``* (1 + scale) + shift``: same params, outputs and all five gradients to float32 rounding."""
    from atdiff_jax.models.unet import GroupNorm
    b, c = shape[0], shape[-1]
    k = jax.random.split(jax.random.key(0), 7)
    x = 2.0 * jax.random.normal(k[0], shape) + 0.7      # a mean far from 0 tests the centring
    scale, shift = (0.5 * jax.random.normal(k[1], (b, 1, 1, c)),
                    0.5 * jax.random.normal(k[2], (b, 1, 1, c)))
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)
    params = ref.init(k[3], x)["params"]
    assert jax.tree.structure(GroupNorm(groups).init(k[3], x)["params"]) == \
        jax.tree.structure(params)
    params = {"scale": 1 + 0.3 * jax.random.normal(k[4], (c,)),
              "bias": 0.3 * jax.random.normal(k[5], (c,))}

    def f_ref(p, x, scale, shift):
        y = ref.apply({"params": p}, x)
        return y * (1 + scale) + shift if film else y

    def f_new(p, x, scale, shift):
        return GroupNorm(groups).apply({"params": p}, x, *((scale, shift) if film else ()))

    args = (params, x, scale, shift)
    y_ref, vjp_ref = jax.vjp(f_ref, *args)
    y_new, vjp_new = jax.jit(lambda *a: jax.vjp(f_new, *a))(*args)
    np.testing.assert_allclose(y_new, y_ref, atol=2e-6)
    cot = jax.random.normal(k[6], shape)
    g_ref, g_new = vjp_ref(cot), vjp_new(cot)
    for name, a, b_ in zip(("scale", "bias", "x", "film scale", "film shift"),
                           jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b_, rtol=0, atol=2e-6 * float(jnp.abs(b_).max()) + 1e-7,
                                   err_msg=name)
    with pytest.raises(ValueError, match="12 channels are not divisible into 8 groups"):
        GroupNorm(8).init(k[0], jnp.zeros((1, 2, 2, 12)))
