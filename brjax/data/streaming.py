"""Streaming input with Grain: image datasets of any size, read batch by batch.

The counterpart of `brjax.data.input_pipeline` (which holds a whole dataset in memory) for data
too large for that, ImageNet first. Sources:

* an image folder in ImageNet layout, ``<root>/train/<class>/<image>`` and
  ``<root>/val/<class>/<image>`` (or ``validation/`` or ``test/``), any number of images
  of any sizes (`from_folder`);
* a prepared tensorflow-datasets dataset, read through ``tfds.data_source`` (its
  ``array_record`` files; no TensorFlow needed) (`from_tfds`).

Examples are decoded (PIL), augmented and batched by a Grain ``MapDataset`` in
``worker_count`` worker processes (0: in this process, with ``read_threads`` threads).
Augmentation is ImageNet's: for training the Inception crop (random area in [0.08, 1] of
the image, aspect ratio log-uniform in [3/4, 4/3]) resized to S x S, and a horizontal flip
with p = 0.5; for evaluation the shorter side resized to S / 0.875 and the central S x S.

Batches are the in-memory pipeline's: the epoch's order is
``np.random.default_rng([seed, epoch]).permutation(N_train)``, global batch ``k`` holds
examples ``perm[k*B:(k+1)*B]`` (the remainder is dropped), and example ``i`` is augmented
with ``np.random.default_rng([seed, epoch, i])``: every batch is a pure function of
(seed, epoch, step), whatever the worker count. With P processes (JAX hosts), process p
reads only rows ``[p*B/P, (p+1)*B/P)`` of every global batch: the processes' shards are
disjoint and together cover each epoch once. An iterator's position is one integer, saved
as JSON bytes by ``get_state()`` and restored by ``set_state()`` (mid-epoch resume).

The pieces live in `brjax.data.image_sources` (the sources, the folder layout),
`brjax.data.imagenet_augment` (the transforms), `brjax.data.grain_batches` (`BatchIterator`,
the Grain pipeline), `brjax.data.image_data` (decoding, what `input_pipeline` shares) and
`brjax.data.streaming_dataset` (the dataset and how it is loaded); this module holds the
batch plans and sharding, and re-exports their names.

Canonical example order (what ``train_examples=N`` and `first_images` take the first of):
an image folder's is `input_pipeline`'s (files sorted, classes interleaved); a tfds
source's is its record order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from brjax.data import input_pipeline
from brjax.data.grain_batches import STATE_VERSION, BatchIterator, Example
from brjax.data.image_data import (
  ACCEPTED_MODES,
  normalize,
  open_image,
  pad_rows,
)
from brjax.data.image_sources import (
  EVAL_FOLDERS,
  TFDS_EVAL_SPLITS,
  FolderSource,
  ImageSource,
  TfdsSource,
  find_layout,
)
from brjax.data.imagenet_augment import (
  AREA_RANGE,
  CROP_ATTEMPTS,
  CROP_FRACTION,
  RATIO_RANGE,
  eval_transform,
  inception_crop_box,
  train_transform,
)
from brjax.data.streaming_dataset import (
  DTYPES,
  IN_MEMORY_LIMIT_BYTES,
  INPUT_MODES,
  StreamingDataset,
  channel_stats,
  from_folder,
  from_tfds,
  load,
  use_streaming,
)
from brjax.training.recipes import IMAGENET_MEAN, IMAGENET_STD  # pixels in [0, 1]

__all__ = [  # with the names of brjax.data.image_sources, .imagenet_augment, .grain_batches
    "ACCEPTED_MODES", "AREA_RANGE", "BatchIterator", "CROP_ATTEMPTS", "CROP_FRACTION",
    "DTYPES", "EVAL_FOLDERS", "FolderSource", "IMAGENET_MEAN", "IMAGENET_STD",
    "IN_MEMORY_LIMIT_BYTES", "INPUT_MODES", "ImageSource", "RATIO_RANGE", "STATE_VERSION",
    "StreamingDataset", "TFDS_EVAL_SPLITS", "TfdsSource", "channel_stats", "eval_batches",
    "eval_plan", "eval_transform", "find_layout", "first_images", "from_folder", "from_tfds",
    "global_batches", "inception_crop_box", "load", "num_examples", "num_train_steps",
    "open_image", "train_batches", "train_plan", "train_transform", "use_streaming",
]

def num_examples(ds: StreamingDataset | input_pipeline.Dataset, split: str) -> int:
  """Number of examples of ``split`` ("train" or "test") of either kind of dataset."""
  if split not in ("train", "test"):
    raise ValueError(f"split {split!r} is not accepted: use 'train' or 'test'")
  if isinstance(ds, input_pipeline.Dataset):
    return len(ds.train_labels if split == "train" else ds.test_labels)
  return len(ds.train_source if split == "train" else ds.test_source)


def num_train_steps(ds: StreamingDataset | input_pipeline.Dataset, batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped), as `input_pipeline`'s."""
  if isinstance(ds, input_pipeline.Dataset):
    return input_pipeline.num_train_steps(ds, batch_size)
  n = num_examples(ds, "train")
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size={batch_size} must be in [1, {n}] (number of train examples)")
  return n // batch_size


def train_plan(ds: StreamingDataset, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
  """int64 (steps, batch_size / P): the train indices of this process's rows of every
  global batch of the epoch (P = ``shard_count``; see the module docstring)."""
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative integers")
  steps = num_train_steps(ds, batch_size)
  shard, rows = _shard_rows(ds, batch_size)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples(ds, "train"))
  return perm[:steps * batch_size].reshape(steps, shard.shard_count, rows)[:, shard.shard_index]


def eval_plan(ds: StreamingDataset, batch_size: int) -> np.ndarray:
  """int64 (ceil(N_test / B), B / P): this process's rows of every global eval batch,
  canonical order, -1 where the last batch is padding (the same count on every process)."""
  shard, rows = _shard_rows(ds, batch_size)
  n = num_examples(ds, "test")
  plan = pad_rows(np.arange(n), batch_size)
  return plan.reshape(len(plan), shard.shard_count, rows)[:, shard.shard_index]


def _shard_rows(ds: StreamingDataset, batch_size: int) -> tuple[grain.sharding.ShardOptions, int]:
  shard = ds.shard()
  if batch_size < 1 or batch_size % shard.shard_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                     f"{shard.shard_count} processes reading shards")
  return shard, batch_size // shard.shard_count


def train_batches(ds: StreamingDataset | input_pipeline.Dataset, batch_size: int, *,
                  seed: int, epoch: int, start_step: int = 0) -> Iterator[dict]:
  """One epoch of shuffled, augmented train batches: this process's rows of each, from
  batch ``start_step`` on (a run resumed mid-epoch).

  An in-memory dataset gives `input_pipeline.train_batches` (whole global batches).

  Returns:
    A `BatchIterator` of ``{"image": (B/P, S, S, 3) float32 (normalized) or uint8,
    "label": int32 (B/P,)}``, ``num_train_steps`` of them; resumable with
    ``get_state``/``set_state``.
  """
  if isinstance(ds, input_pipeline.Dataset):
    return input_pipeline.train_batches(ds, batch_size, seed=seed, epoch=epoch,
                                        start_step=start_step)
  plan = train_plan(ds, batch_size, seed=seed, epoch=epoch)
  example = Example(ds.train_source, ds.image_size, ds.mean, ds.std, ds.dtype, True, seed,
                     epoch)
  batches = BatchIterator(ds, plan, example, _identity(ds, "train", batch_size, seed, epoch))
  if start_step:
    batches.set_state(batches.get_state(next_batch=start_step))
  return batches


def eval_batches(ds: StreamingDataset | input_pipeline.Dataset,
                 batch_size: int) -> Iterator[dict]:
  """The eval split in canonical order, eval-transformed: this process's rows of each
  global batch; the last global batch is padded (image 0, label 0) and ``mask`` marks the
  real examples. An in-memory dataset gives `input_pipeline.eval_batches`.

  Returns:
    A `BatchIterator` of ``{"image": (B/P, S, S, 3), "label": int32 (B/P,),
    "mask": bool (B/P,)}``, ceil(N_test / B) of them on every process.
  """
  if isinstance(ds, input_pipeline.Dataset):
    return input_pipeline.eval_batches(ds, batch_size)
  example = Example(ds.test_source, ds.image_size, ds.mean, ds.std, ds.dtype, False)
  return BatchIterator(ds, eval_plan(ds, batch_size), example,
                       _identity(ds, "test", batch_size))


def first_images(ds: StreamingDataset | input_pipeline.Dataset, count: int) -> np.ndarray:
  """The first ``count`` train images (canonical order), unaugmented, as batches hold
  them: (count, S, S, 3) (eval-transformed for a streaming dataset); the same on every
  process. For initializing a model and its step sizes."""
  if isinstance(ds, input_pipeline.Dataset):
    return normalize(ds.train_images[:count], ds.mean, ds.std)
  count = min(count, num_examples(ds, "train"))
  if count < 1:
    raise ValueError(f"count={count} must be positive")
  example = Example(ds.train_source, ds.image_size, ds.mean, ds.std, ds.dtype, False)
  rows = pad_rows(np.arange(count), min(count, 64))
  with BatchIterator(dataclasses.replace(ds, worker_count=0), rows, example,
                     {"split": "first"}) as batches:
    return np.concatenate([b["image"][b["mask"]] for b in batches])


def global_batches(batches: Iterable[dict], sharding: jax.sharding.Sharding) -> Iterator[dict]:
  """This module's process-local batches as global ``jax.Array`` s of P times the rows
  (``jax.make_array_from_process_local_data``): what a jitted step sharded over all
  processes' devices takes. With one process, ``jax.device_put(batch, sharding)``."""
  count = jax.process_count()
  for batch in batches:
    yield {key: jax.make_array_from_process_local_data(
        sharding, x, (x.shape[0] * count, *x.shape[1:])) for key, x in batch.items()}


def _identity(ds: StreamingDataset, split: str, batch_size: int, seed: int | None = None,
              epoch: int | None = None) -> dict[str, Any]:
  """What a split's batches are a function of; a saved state restores only onto the same."""
  shard = ds.shard()
  identity = {"split": split, "batch_size": batch_size, "num_examples": num_examples(ds, split),
              "shard": [shard.shard_index, shard.shard_count], "image_size": ds.image_size}
  if split == "train":
    identity.update(seed=seed, epoch=epoch)
  return identity
