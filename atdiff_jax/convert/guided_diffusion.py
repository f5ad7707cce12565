"""guided-diffusion / AT_Diff PyTorch UNet checkpoints <-> Flax params of ``UNetModel``.

* The model of a checkpoint is built by ``atdiff_jax.models.adm.create_model``, which takes
  exactly ``guided_diffusion.script_util.create_model``'s keyword arguments (same string formats
  and defaults) and returns the equivalent ``UNetModel``.
* ``params_from_state_dict`` / ``state_dict_from_params`` convert between a torch state dict
  (parameter name -> array in torch layout) and a Flax params pytree. The conversion is a rename
  (``input_blocks.3.1.qkv.weight`` -> ``input_blocks_3_1/qkv/kernel``) plus a layout transpose:

  ======================  ====================  ==========================
  torch module            torch layout          Flax leaf
  ======================  ====================  ==========================
  Conv2d ``weight``       [O, I, kh, kw]        ``kernel`` [kh, kw, I, O]
  Conv1d (qkv, proj_out)  [O, I, 1]             ``kernel`` [I, O] (Dense)
  Linear ``weight``       [out, in]             ``kernel`` [in, out]
  Embedding ``weight``    [num, dim]            ``embedding`` [num, dim]
  GroupNorm ``weight``    [C]                   ``scale`` [C]
  any ``bias``            [C]                   ``bias`` [C]
  ======================  ====================  ==========================

* ``load_torch_state_dict(path)`` reads a ``.pt`` file safely (``weights_only=True``); it needs the
  optional ``convert`` extra (``pip install atdiff_jax[convert]``, i.e. torch).

Example::

    sd = load_torch_state_dict("model.pt", sha256="...")
    module, params = unet_from_state_dict(sd, image_size=32, num_channels=128, num_res_blocks=3,
                                          learn_sigma=True, attention_resolutions="16,8", ...)
    out = module.apply({"params": params}, x_nhwc, t)
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax.diffusion.gaussian import create_gaussian_diffusion
from atdiff_jax.models.adm import check_create_model_kwargs, create_model
from atdiff_jax.models.unet import UNetModel

__all__ = [
    "StateDictMismatchError",
    "CheckpointIntegrityError",
    "params_from_state_dict",
    "param_shapes",
    "state_dict_from_params",
    "load_torch_state_dict",
    "unet_from_state_dict",
    "unet_from_checkpoint",
    "torch_key",
    "flax_path",
]

# Flax modules whose Dense kernel is a torch Conv1d with kernel size 1.
_CONV1D_MODULES = ("qkv", "proj_out")


class StateDictMismatchError(ValueError):
    """A state dict does not fit the model: lists every unknown, missing and mis-shaped key."""

    def __init__(self, unknown=(), missing=(), mismatched=(), context: str = "", hints=()):
        self.unknown = sorted(unknown)
        self.missing = sorted(missing)
        self.mismatched = sorted(mismatched)  # (key, given shape, expected shape)
        self.hints = list(hints)  # what the offenders mean and what to pass, when that is known
        lines = [f"state dict does not match the model{context}:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s):")
            lines += [f"    {k}" for k in self.missing]
        if self.unknown:
            lines.append(f"  {len(self.unknown)} unknown key(s):")
            lines += [f"    {k}" for k in self.unknown]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} key(s) with the wrong shape "
                         "(given -> expected, torch layout):")
            lines += [f"    {k}: {g} -> {e}" for k, g, e in self.mismatched]
        lines += self.hints
        lines.append("Check the create_model arguments (num_channels, channel_mult, "
                     "num_res_blocks, attention_resolutions, learn_sigma, class_cond, ...).")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# state dict <-> params


def flax_path(key: str) -> tuple[str, ...]:
    """torch parameter name -> Flax params path, e.g. 'input_blocks.3.1.qkv.weight' ->
    ('input_blocks_3_1', 'qkv', 'weight') (the leaf name is renamed by the layout rules)."""
    return tuple(re.sub(r"\.(\d+)", r"_\1", key).split("."))


def torch_key(path: tuple[str, ...]) -> str:
    """Flax params path (leaf renamed to weight/bias) -> torch parameter name."""
    return re.sub(r"_(\d+)", r".\1", ".".join(path))


def _leaf_rule(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """(torch leaf name, layout kind) of the Flax leaf at ``path`` with ``ndim`` dims."""
    leaf = path[-1]
    if leaf == "bias":
        return "bias", "vector"
    if leaf == "scale":
        return "weight", "vector"
    if leaf == "embedding":
        return "weight", "embedding"
    if leaf == "kernel" and ndim == 4:
        return "weight", "conv2d"
    if leaf == "kernel" and ndim == 2:
        return "weight", ("conv1d" if path[-2] in _CONV1D_MODULES else "linear")
    raise ValueError(f"no torch layout rule for the Flax parameter {'/'.join(path)} "
                     f"with {ndim} dims")


def _flax_to_torch(a, kind: str) -> np.ndarray:
    a = np.asarray(a)
    if kind == "conv2d":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv1d":
        return np.ascontiguousarray(a.T[:, :, None])
    return a


def _torch_to_flax(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv2d":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv1d":
        return np.ascontiguousarray(a[:, :, 0].T)
    return a


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "conv2d":
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "conv1d":
        i, o = shape
        return (o, i, 1)
    return tuple(shape)


# Registration order of guided-diffusion's modules, so exported state dicts list their keys in the
# reference's named_parameters() order.
_TOP_ORDER = {"time_embed": 0, "label_emb": 1, "input_blocks": 2, "middle_block": 3,
              "output_blocks": 4, "out": 5}
_SUB_ORDER = {"in_layers": 0, "emb_layers": 1, "out_layers": 2, "skip_connection": 3,
              "norm": 4, "qkv": 5, "proj_out": 6, "op": 7, "conv": 8}
_LEAF_ORDER = {"kernel": 0, "scale": 0, "embedding": 0, "bias": 1}


def _order_key(path: tuple[str, ...]) -> list:
    key = []
    for depth, name in enumerate(path):
        stem = re.sub(r"(_\d+)+$", "", name)
        nums = tuple(int(n) for n in re.findall(r"\d+", name[len(stem):]))
        table = (_TOP_ORDER if depth == 0 else
                 _LEAF_ORDER if depth == len(path) - 1 else _SUB_ORDER)
        key.append((table.get(stem, 99), stem, nums))
    return key


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def _example_inputs(module: UNetModel):
    x = jnp.zeros((1, module.image_size, module.image_size, module.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = None if module.num_classes is None else jnp.zeros((1,), jnp.int32)
    return x, t, y


def param_shapes(module: UNetModel) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax params path -> shape of ``module``'s parameters (from ``jax.eval_shape``, no FLOPs)."""
    x, t, y = _example_inputs(module)
    variables = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), x, t, y, train=False))
    return {p: tuple(s.shape) for p, s in _flatten(variables["params"]).items()}


def _expected_torch_layout(module: UNetModel):
    """torch key -> (Flax path, layout kind, torch shape), in torch registration order."""
    out = {}
    for path, shape in sorted(param_shapes(module).items(), key=lambda kv: _order_key(kv[0])):
        leaf, kind = _leaf_rule(path, len(shape))
        out[torch_key(path[:-1] + (leaf,))] = (path, kind, _torch_shape(shape, kind))
    return out


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor slipped through
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


_LABEL_EMB = "label_emb.weight"  # nn.Embedding(num_classes, time_embed_dim) of class_cond models


def _class_embedding_hints(given: Mapping[str, np.ndarray], expected: Mapping) -> list[str]:
    """Plain-words lines for a class-conditioning mismatch (label_emb.weight unknown, missing or
    with another class count), naming the key, the shapes and the argument to pass."""
    if _LABEL_EMB in given and _LABEL_EMB not in expected:
        shape = tuple(given[_LABEL_EMB].shape)
        n = f"{shape[0]} classes" if len(shape) == 2 else "classes"
        hint = (f"  {_LABEL_EMB} {shape} is the class embedding of a class-conditional model "
                f"({n}), but the model is unconditional (class_cond=False): pass "
                "class_cond=True (unet_from_state_dict then takes num_classes from this shape).")
        return [hint]
    if _LABEL_EMB in expected and _LABEL_EMB not in given:
        shape = expected[_LABEL_EMB][2]
        hint = (f"  {_LABEL_EMB} is missing: the state dict is of an unconditional model, but "
                f"the model is class-conditional (class_cond=True, {shape[0]} classes, expected "
                f"{_LABEL_EMB} {shape}): pass class_cond=False.")
        return [hint]
    if _LABEL_EMB in given and _LABEL_EMB in expected:
        g, e = tuple(given[_LABEL_EMB].shape), expected[_LABEL_EMB][2]
        if len(g) == 2 and g[0] != e[0]:
            hint = (f"  {_LABEL_EMB} {g} has {g[0]} classes but the model has {e[0]} (expected "
                    f"{e}): pass num_classes={g[0]}, or leave num_classes out and "
                    "unet_from_state_dict takes it from the state dict.")
            return [hint]
    return []


def params_from_state_dict(state_dict: Mapping[str, Any], module: UNetModel) -> dict:
    """Flax params for ``module`` from a guided-diffusion state dict.

    Args:
      state_dict: torch parameter name -> array in torch layout (numpy, or anything
        ``np.asarray`` accepts; torch tensors are converted). Values are cast to float32.
      module: the ``UNetModel`` the state dict belongs to (see ``create_model``).

    Returns:
      The nested params dict (float32 ``jax.Array`` leaves) for ``module.apply({'params': p}, ...)``.

    Raises:
      StateDictMismatchError: (a ValueError) listing every unknown, missing and mis-shaped key.
    """
    expected = _expected_torch_layout(module)
    given = {k: _to_numpy(v) for k, v in state_dict.items()}
    unknown = [k for k in given if k not in expected]
    missing = [k for k in expected if k not in given]
    mismatched = [(k, tuple(given[k].shape), expected[k][2]) for k in expected
                  if k in given and tuple(given[k].shape) != expected[k][2]]
    if unknown or missing or mismatched:
        raise StateDictMismatchError(unknown, missing, mismatched,
                                     hints=_class_embedding_hints(given, expected))
    flat = {}
    for k, (path, kind, _) in expected.items():
        flat[path] = jnp.asarray(_torch_to_flax(given[k].astype(np.float32), kind))
    return _unflatten(flat)


def state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """The guided-diffusion state dict (torch names and layouts, numpy) of Flax ``params``.

    Keys come in the reference's ``named_parameters()`` order; dtypes are kept (float32).
    """
    if "params" in params and len(params) == 1:
        params = params["params"]
    flat = _flatten(params)
    out = {}
    for path in sorted(flat, key=_order_key):
        a = np.asarray(jax.device_get(flat[path]))
        leaf, kind = _leaf_rule(path, a.ndim)
        out[torch_key(path[:-1] + (leaf,))] = _flax_to_torch(a, kind)
    return out


# ----------------------------------------------------------------------------------------------
# .pt files


class CheckpointIntegrityError(ValueError):
    """The checkpoint file's SHA-256 is not the expected one."""


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torch_state_dict(path: str | os.PathLike, *, sha256: str | None = None
                          ) -> dict[str, np.ndarray]:
    """Reads a PyTorch ``.pt`` state dict into numpy arrays, without unpickling code.

    Uses ``torch.load(path, map_location='cpu', weights_only=True)``: a file whose pickle refers to
    anything other than tensors and plain containers is refused. A state dict nested in a dict
    (e.g. under "state_dict" or "model") is used if it is the only mapping of tensors there.

    Args:
      path: the ``.pt`` file.
      sha256: if given, the file's hex SHA-256 must equal it (checked before unpickling).

    Returns:
      parameter name -> numpy array (bfloat16 tensors become float32; other dtypes are kept).

    Raises:
      ImportError: torch is not installed (``pip install atdiff_jax[convert]``).
      CheckpointIntegrityError: (a ValueError) the SHA-256 does not match.
      ValueError: the file is not a plain tensor checkpoint, or holds no unambiguous state dict.
    """
    path = os.fspath(path)
    if sha256 is not None:
        actual = _sha256(path)
        if actual.lower() != sha256.strip().lower():
            raise CheckpointIntegrityError(
                f"{path}: SHA-256 is {actual}, expected {sha256.strip().lower()}")
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading PyTorch checkpoints needs torch: install the 'convert' extra "
                          "with `pip install atdiff_jax[convert]`") from e
    import pickle
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: it is not a plain tensor checkpoint (torch.load with "
            f"weights_only=True rejected it, so it may contain code): {e}") from e

    def is_tensor_dict(d) -> bool:
        return (isinstance(d, Mapping) and len(d) > 0
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()))

    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got "
                         f"{type(obj).__name__}")
    if not is_tensor_dict(obj):
        nested = [k for k, v in obj.items() if is_tensor_dict(v)]
        if len(nested) != 1:
            what = f"several candidates {nested}" if nested else "none"
            raise ValueError(f"{path}: no unambiguous state dict: the top-level keys are "
                             f"{list(obj)[:20]}, of which dicts of tensors: {what}")
        obj = obj[nested[0]]
    return {k: _to_numpy(v) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------
# convenience


def unet_from_state_dict(state_dict: Mapping[str, Any], **create_model_kwargs
                         ) -> tuple[UNetModel, dict]:
    """``(module, params)`` from a state dict and ``create_model`` keyword arguments.

    The class count follows the checkpoint: with ``class_cond=True`` and no ``num_classes``, the
    number of rows of the state dict's ``label_emb.weight`` is used (so a 64 px model with 10
    classes loads as well as the authors' 32 px CIFAR-10 one, whatever ``create_model``'s size
    rule would pick). A conflict raises one ``StateDictMismatchError`` (a ValueError) that names
    the key, the shapes and what to pass: ``num_classes`` given but different from
    ``label_emb.weight``'s rows; ``class_cond=False`` but the state dict has ``label_emb.weight``;
    ``class_cond=True`` but it has none.
    """
    check_create_model_kwargs(create_model_kwargs)
    kwargs = dict(create_model_kwargs)
    label_emb = state_dict.get(_LABEL_EMB)
    if (kwargs.get("class_cond") and kwargs.get("num_classes") is None
            and label_emb is not None and len(np.shape(label_emb)) == 2):
        kwargs["num_classes"] = int(np.shape(label_emb)[0])
    module = create_model(**kwargs)
    return module, params_from_state_dict(state_dict, module)


def unet_from_checkpoint(path: str | os.PathLike, *, sha256: str | None = None,
                         **create_model_kwargs) -> tuple[UNetModel, dict]:
    """``(module, params)`` from a guided-diffusion ``.pt`` file (see ``load_torch_state_dict``)."""
    check_create_model_kwargs(create_model_kwargs)
    return unet_from_state_dict(load_torch_state_dict(path, sha256=sha256), **create_model_kwargs)


# guided-diffusion's ``create_gaussian_diffusion`` with the same arguments, string formats and
# defaults (steps, learn_sigma, sigma_small, noise_schedule, use_kl, predict_xstart,
# rescale_timesteps, rescale_learned_sigmas, timestep_respacing). The result keeps guided-diffusion's
# method names (training_losses, q_sample, p_mean_variance, p_sample_loop, ddim_sample_loop), each
# taking a pure ``model_fn(x_nhwc, t)`` in place of the torch model.
diffusion_from_args = create_gaussian_diffusion
