"""guided-diffusion state dicts <-> Flax params, create_model, and safe .pt loading."""
from __future__ import annotations

import hashlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.convert import guided_diffusion as gd
from atdiff_jax.convert.guided_diffusion import (
    CheckpointIntegrityError, StateDictMismatchError, load_torch_state_dict, param_shapes,
    params_from_state_dict, state_dict_from_params, unet_from_checkpoint, unet_from_state_dict)
from atdiff_jax.models import UNetModel, adm
from atdiff_jax.models.adm import create_model, model_kwargs_from_args
from conftest import (assert_matches_unet_option, load_unet_option, ref_create_model_kwargs,
                      ref_manifest, ref_state_dict)


def _torch_shapes(module) -> dict[str, tuple[int, ...]]:
    """torch key -> torch-layout shape of a module's parameters (no FLOPs)."""
    return {k: v[2] for k, v in gd._expected_torch_layout(module).items()}


# ----------------------------------------------------------------------------------------------
# round trips


def test_state_dict_round_trip_is_exact(ref_unet):
    sd = ref_state_dict()
    _, params = ref_unet
    back = state_dict_from_params(params)
    # same keys, in the reference's named_parameters() order
    assert list(back) == ref_manifest()["parameter_order"]
    for k, v in sd.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_params_round_trip_is_exact(ref_unet):
    module, params = ref_unet
    again = params_from_state_dict(state_dict_from_params(params), module)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_layout_transposes(ref_unet):
    """Spot-check each layout rule against the raw torch arrays."""
    sd = ref_state_dict()
    _, p = ref_unet
    conv = sd["input_blocks.0.0.weight"]  # Conv2d [O, I, kh, kw]
    np.testing.assert_array_equal(p["input_blocks_0_0"]["kernel"][1, 2, 0, 5], conv[5, 0, 1, 2])
    qkv = sd["middle_block.1.qkv.weight"]  # Conv1d [O, I, 1] -> Dense [I, O]
    np.testing.assert_array_equal(p["middle_block_1"]["qkv"]["kernel"][3, 100], qkv[100, 3, 0])
    lin = sd["time_embed.2.weight"]  # Linear [out, in] -> [in, out]
    np.testing.assert_array_equal(p["time_embed_2"]["kernel"][7, 9], lin[9, 7])
    np.testing.assert_array_equal(p["out_0"]["scale"], sd["out.0.weight"])  # GroupNorm
    assert p["input_blocks_3_0"]["skip_connection"]["kernel"].shape == (1, 1, 32, 64)


def test_key_mapping():
    assert gd.flax_path("input_blocks.3.1.qkv.weight") == ("input_blocks_3_1", "qkv", "weight")
    assert gd.torch_key(("output_blocks_11_2", "in_layers_0", "bias")) == \
        "output_blocks.11.2.in_layers.0.bias"
    assert gd.torch_key(("input_blocks_1_0", "skip_connection", "weight")) == \
        "input_blocks.1.0.skip_connection.weight"


# ----------------------------------------------------------------------------------------------
# mismatches


def test_mismatch_error_lists_every_offender():
    sd = ref_state_dict()
    del sd["middle_block.1.qkv.bias"], sd["out.2.weight"]
    sd["input_blocks.9.0.weight"] = np.zeros(3, np.float32)
    sd["module.time_embed.0.weight"] = np.zeros((128, 32), np.float32)
    sd["time_embed.0.weight"] = np.zeros((32, 128), np.float32)   # transposed
    sd["input_blocks.0.0.weight"] = np.zeros((32, 3, 3), np.float32)  # missing kh/kw axis
    with pytest.raises(StateDictMismatchError) as info:
        params_from_state_dict(sd, create_model(**ref_create_model_kwargs()))
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["middle_block.1.qkv.bias", "out.2.weight"]
    assert err.unknown == ["input_blocks.9.0.weight", "module.time_embed.0.weight"]
    assert err.mismatched == [("input_blocks.0.0.weight", (32, 3, 3), (32, 3, 3, 3)),
                              ("time_embed.0.weight", (32, 128), (128, 32))]
    msg = str(err)
    for key in ("middle_block.1.qkv.bias", "out.2.weight", "input_blocks.9.0.weight",
                "module.time_embed.0.weight", "time_embed.0.weight", "input_blocks.0.0.weight"):
        assert key in msg
    assert "2 missing" in msg and "2 unknown" in msg and "2 key(s) with the wrong shape" in msg


def test_wrong_architecture_is_a_mismatch():
    kwargs = dict(ref_create_model_kwargs(), learn_sigma=False)
    with pytest.raises(StateDictMismatchError) as info:
        unet_from_state_dict(ref_state_dict(), **kwargs)
    assert info.value.mismatched == [("out.2.bias", (6,), (3,)),
                                     ("out.2.weight", (6, 32, 3, 3), (3, 32, 3, 3))]
    assert not info.value.missing and not info.value.unknown


def test_unknown_create_model_kwargs():
    with pytest.raises(TypeError, match=r"unknown create_model argument\(s\) \['noise_schedule'\]"):
        unet_from_state_dict(ref_state_dict(), noise_schedule="cosine", **ref_create_model_kwargs())
    with pytest.raises(TypeError):
        create_model(16, 32, 1, bogus=1)
    args = dict(ref_manifest()["model_and_diffusion_args"])
    assert model_kwargs_from_args(args) == ref_create_model_kwargs()


# ----------------------------------------------------------------------------------------------
# create_model


@pytest.mark.parametrize("image_size,mult", [
    (512, (0.5, 1, 1, 2, 2, 4, 4)), (256, (1, 1, 2, 2, 4, 4)), (128, (1, 1, 2, 3, 4)),
    (64, (1, 2, 3, 4)), (32, (1, 2, 2, 2))])
def test_default_channel_mult_by_image_size(image_size, mult):
    module = create_model(image_size, 64, 1, attention_resolutions="")
    assert module.channel_mult == mult
    if image_size <= 64:  # check the param shapes too (cheap at these sizes)
        shapes = _torch_shapes(module)
        levels = len(mult)
        assert f"input_blocks.{1 + 2 * (levels - 1) + 1}.0.in_layers.0.weight" not in shapes
        assert shapes[f"input_blocks.{2 * levels - 1}.0.in_layers.2.weight"] == (
            64 * mult[-1], 64 * mult[-2], 3, 3)  # last level's first res block widens
        assert shapes["middle_block.0.in_layers.2.weight"] == (64 * mult[-1],) * 2 + (3, 3)
        assert shapes["input_blocks.2.0.op.weight"] == (64, 64, 3, 3)  # conv downsampling


def test_create_model_defaults_on_param_shapes():
    shapes = _torch_shapes(create_model(32, 32, 1))
    # defaults: channel_mult (1,2,2,2) at 32, attention "16" -> factor 2 -> input block 3,
    # num_heads=1, learn_sigma False, no classes, conv resampling, additive embedding.
    assert {k.rsplit(".", 2)[0] for k in shapes if ".qkv." in k} == {
        "input_blocks.3.1", "middle_block.1", "output_blocks.4.1", "output_blocks.5.1"}
    assert shapes["out.2.weight"] == (3, 32, 3, 3)
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (32, 128)
    assert "label_emb.weight" not in shapes
    # conv upsampling ends each level but the first: after the attention block at factor 2
    assert shapes["output_blocks.1.1.conv.weight"] == (64, 64, 3, 3)
    assert shapes["output_blocks.5.2.conv.weight"] == (64, 64, 3, 3)
    assert not any(k.startswith("output_blocks.7.1") for k in shapes)


def test_create_model_options_on_param_shapes():
    module = create_model(32, 32, 1, channel_mult="1,2", learn_sigma=True, class_cond=True,
                          attention_resolutions="16,8", use_scale_shift_norm=True,
                          resblock_updown=True, use_fp16=True)
    assert module.attention_resolutions == (2, 4) and module.dtype == jnp.bfloat16
    shapes = _torch_shapes(module)
    assert shapes["out.2.weight"] == (6, 32, 3, 3)
    assert shapes["label_emb.weight"] == (10, 128)  # the authors' rule: 10 classes at 32 px
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (64, 128)  # scale and shift
    assert "input_blocks.2.0.in_layers.0.weight" in shapes  # resblock downsampling
    assert not any(".op." in k or ".conv." in k for k in shapes)
    assert {k.rsplit(".", 2)[0] for k in shapes if ".qkv." in k} == {
        "input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1"}
    # in_channels / num_classes extensions
    module = create_model(28, 32, 1, channel_mult="1,2", attention_resolutions="14",
                          learn_sigma=True, class_cond=True, num_classes=10, in_channels=1)
    shapes = _torch_shapes(module)
    assert shapes["input_blocks.0.0.weight"] == (32, 1, 3, 3)
    assert shapes["out.2.weight"] == (2, 32, 3, 3)
    assert shapes["label_emb.weight"] == (10, 128)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=48), "unsupported image size: 48"),
    (dict(channel_mult="1;2"), "channel_mult"),
    (dict(attention_resolutions="16,x"), "attention_resolutions"),
    (dict(attention_resolutions="5"), "does not divide"),
    (dict(num_classes=10), "class_cond"),
])
def test_create_model_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(**dict(dict(image_size=32, num_channels=32, num_res_blocks=1), **kwargs))


def test_param_shapes_match_init(ref_unet):
    module, params = ref_unet
    flat = {tuple(k.key for k in path): v.shape
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert param_shapes(module) == flat
    assert sum(int(np.prod(s)) for s in flat.values()) == 828358


# ----------------------------------------------------------------------------------------------
# class count: the authors' size rule, and the state dict's label embedding


def test_class_count_follows_the_authors_rule():
    # AT_Diff's script_util.create_model: CIFAR10_NUM_CLASSES (10) if image_size == 32 else 1000
    small = {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,1",
             "attention_resolutions": "", "class_cond": True}
    assert (adm.default_num_classes(32), adm.default_num_classes(64)) == (10, 1000)
    assert create_model(image_size=32, **small).num_classes == 10
    for size in (16, 28, 64, 128):
        assert create_model(image_size=size, **small).num_classes == 1000
    assert _torch_shapes(create_model(image_size=64, **small))["label_emb.weight"] == (1000, 128)
    # an explicit num_classes overrides the rule; class_cond=False has no classes at any size
    assert create_model(image_size=32, num_classes=1000, **small).num_classes == 1000
    assert create_model(image_size=64, num_classes=10, **small).num_classes == 10
    assert create_model(image_size=32, **dict(small, class_cond=False)).num_classes is None


def test_consistency_models_kwargs_keep_1000_classes():
    # openai/consistency_models' cm/script_util.py always uses NUM_CLASSES = 1000
    from atdiff_jax.convert.consistency_models import cm_create_model_kwargs
    args = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,1",
            "attention_resolutions": "", "class_cond": True}
    assert create_model(**cm_create_model_kwargs(args)).num_classes == 1000
    assert "num_classes" not in cm_create_model_kwargs(dict(args, class_cond=False))


@pytest.fixture(scope="module")
def classcond32():
    """The 32 px class-conditional (10 classes) option vector; its create_model kwargs are the
    authors' arguments: class_cond=True, image_size=32, no num_classes."""
    return load_unet_option("classcond32")


def test_authors_32px_class_conditional_model_loads_and_matches_torch(classcond32):
    data, unet_kwargs, cm_kwargs, sd = classcond32
    assert cm_kwargs["class_cond"] and cm_kwargs["image_size"] == 32
    assert "num_classes" not in cm_kwargs
    assert sd["label_emb.weight"].shape == (10, 128)
    module, params = unet_from_state_dict(sd, **cm_kwargs)
    assert module.num_classes == 10 and module == UNetModel(**unet_kwargs)
    assert params["label_emb"]["embedding"].shape == (10, 128)
    assert_matches_unet_option(module, params, data)  # the public torch UNet's output, atol 2e-5


def test_label_embedding_decides_the_class_count(classcond32):
    _, _, cm_kwargs, sd = classcond32
    # The same 32 px weights as a 64 px model (attention at 32 = the same downsample factor 2):
    # the size rule would say 1000 classes, label_emb.weight says 10.
    as64 = dict(cm_kwargs, image_size=64, attention_resolutions="32")
    assert create_model(**as64).num_classes == 1000
    module, params = unet_from_state_dict(sd, **as64)
    assert (module.image_size, module.num_classes) == (64, 10)
    assert params["label_emb"]["embedding"].shape == (10, 128)
    # 16 px with 10 classes (classcond_updown) without num_classes: the rule says 1000
    _, unet_kwargs, cc_kwargs, cc_sd = load_unet_option("classcond_updown")
    cc_kwargs = {k: v for k, v in cc_kwargs.items() if k != "num_classes"}
    assert create_model(**cc_kwargs).num_classes == 1000
    module, _ = unet_from_state_dict(cc_sd, **cc_kwargs)
    assert module.num_classes == 10 and module == UNetModel(**unet_kwargs)
    # a state dict of a 64 px model with 10 classes (zeros of the right shapes) loads
    small64 = {"image_size": 64, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,1",
               "attention_resolutions": "", "class_cond": True}
    sd64 = {k: np.zeros(shape, np.float32)
            for k, shape in _torch_shapes(create_model(num_classes=10, **small64)).items()}
    assert unet_from_state_dict(sd64, **small64)[0].num_classes == 10


def test_class_count_conflicts_are_one_clear_error(classcond32):
    _, _, cm_kwargs, sd = classcond32
    # explicit num_classes that is not label_emb.weight's
    with pytest.raises(StateDictMismatchError,
                       match=r"label_emb\.weight \(10, 128\) has 10 classes but the model has "
                             r"1000 \(expected \(1000, 128\)\): pass num_classes=10") as info:
        unet_from_state_dict(sd, **cm_kwargs, num_classes=1000)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.mismatched == [("label_emb.weight", (10, 128), (1000, 128))]
    assert not err.missing and not err.unknown
    # class_cond=False, but the state dict has a class embedding
    with pytest.raises(StateDictMismatchError,
                       match=r"label_emb\.weight \(10, 128\) is the class embedding of a "
                             r"class-conditional model \(10 classes\), but the model is "
                             r"unconditional \(class_cond=False\): pass class_cond=True") as info:
        unet_from_state_dict(sd, **dict(cm_kwargs, class_cond=False))
    assert info.value.unknown == ["label_emb.weight"]
    assert not info.value.missing and not info.value.mismatched
    # class_cond=True, but the state dict (config A, 16 px) has no class embedding
    with pytest.raises(StateDictMismatchError,
                       match=r"label_emb\.weight is missing: the state dict is of an unconditional "
                             r"model, but the model is class-conditional \(class_cond=True, 1000 "
                             r"classes, expected label_emb\.weight \(1000, 128\)\): pass "
                             r"class_cond=False") as info:
        unet_from_state_dict(ref_state_dict(), **dict(ref_create_model_kwargs(), class_cond=True))
    assert info.value.missing == ["label_emb.weight"]
    assert not info.value.unknown and not info.value.mismatched
    # params_from_state_dict (what a fine-tuning run's config.model builds) explains it too
    with pytest.raises(StateDictMismatchError, match="pass num_classes=10"):
        params_from_state_dict(sd, create_model(**cm_kwargs, num_classes=11))
    # other mismatches get no class hint
    with pytest.raises(StateDictMismatchError) as info:
        unet_from_state_dict(sd, **dict(cm_kwargs, learn_sigma=False))
    assert not info.value.hints and "label_emb" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# .pt files


def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    path = tmp_path / "x.pt"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match=r"atdiff_jax\[convert\]"):
        load_torch_state_dict(path)


@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


def test_load_torch_state_dict(tmp_path, torch_mod):
    torch = torch_mod
    sd = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
          "b.bias": torch.tensor([1.5], dtype=torch.bfloat16),
          "c.half": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "plain.pt"
    torch.save(sd, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    out = load_torch_state_dict(path, sha256=sha.upper())
    assert list(out) == list(sd)
    np.testing.assert_array_equal(out["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert out["b.bias"].dtype == np.float32 and out["b.bias"][0] == 1.5
    assert out["c.half"].dtype == np.float16
    with pytest.raises(CheckpointIntegrityError, match="SHA-256"):
        load_torch_state_dict(path, sha256="0" * 64)
    with pytest.raises(ValueError):  # CheckpointIntegrityError is a ValueError
        load_torch_state_dict(path, sha256=sha[:-1] + ("0" if sha[-1] != "0" else "1"))


def test_load_nested_state_dict(tmp_path, torch_mod):
    torch = torch_mod
    sd = {"w": torch.ones(2)}
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": sd, "step": 7, "opt": {"lr": 0.1}}, path)
    assert list(load_torch_state_dict(path)) == ["w"]
    torch.save({"model": sd, "ema": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="no unambiguous state dict"):
        load_torch_state_dict(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_torch_state_dict(path)


_MARKER = None


def _leave_marker(path):  # what a malicious pickle would run on load
    open(path, "w").close()
    return {}


class _Evil:
    def __reduce__(self):
        return (_leave_marker, (_MARKER,))


def test_pickle_with_code_is_refused(tmp_path, torch_mod):
    global _MARKER
    _MARKER = str(tmp_path / "code_ran")
    path = tmp_path / "evil.pt"
    torch_mod.save({"w": torch_mod.ones(1), "x": _Evil()}, path)
    with pytest.raises(ValueError, match="refused"):
        load_torch_state_dict(path)
    assert not (tmp_path / "code_ran").exists()


def test_unet_from_checkpoint(tmp_path, torch_mod, ref_unet):
    torch = torch_mod
    path = tmp_path / "model.pt"
    torch.save({k: torch.from_numpy(v) for k, v in ref_state_dict().items()}, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    module, params = unet_from_checkpoint(path, sha256=sha, **ref_create_model_kwargs())
    ref_module, ref_params = ref_unet
    assert module == ref_module
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_array_equal(a, b)


def test_unet_from_checkpoint_takes_the_class_count_from_the_file(tmp_path, torch_mod,
                                                                  classcond32):
    torch = torch_mod
    _, _, cm_kwargs, sd = classcond32
    path = tmp_path / "classcond32.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
    module, params = unet_from_checkpoint(path, **cm_kwargs)  # the authors' args, weights_only
    ref_module, ref_params = unet_from_state_dict(sd, **cm_kwargs)
    assert module == ref_module and module.num_classes == 10
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StateDictMismatchError, match="pass num_classes=10"):
        unet_from_checkpoint(path, **cm_kwargs, num_classes=1000)
    with pytest.raises(StateDictMismatchError, match="pass class_cond=True"):
        unet_from_checkpoint(path, **dict(cm_kwargs, class_cond=False))


def test_diffusion_from_args_maps_guided_diffusion_options():
    from atdiff_jax.convert.guided_diffusion import diffusion_from_args
    d = diffusion_from_args(steps=1000, learn_sigma=True, noise_schedule="cosine",
                            rescale_learned_sigmas=True, timestep_respacing="ddim10")
    assert (d.num_timesteps, d.model_var_type, d.loss_type, d.model_mean_type) == (
        10, "learned_range", "rescaled_mse", "epsilon")
    np.testing.assert_array_equal(d.timestep_map, np.arange(0, 1000, 100))
    d = diffusion_from_args(steps=100, sigma_small=True, use_kl=True, predict_xstart=True)
    assert (d.num_timesteps, d.model_var_type, d.loss_type, d.model_mean_type) == (
        100, "fixed_small", "rescaled_kl", "start_x")
    assert diffusion_from_args().model_var_type == "fixed_large"
    with pytest.raises(ValueError, match="noise_schedule"):
        diffusion_from_args(noise_schedule="quadratic")
