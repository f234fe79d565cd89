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
`brjax.data.imagenet_augment` (the transforms), `brjax.data.grain_batches` (`BatchIterator`, the
Grain pipeline) and `brjax.data.image_data` (decoding, what `input_pipeline` shares); this
module holds the dataset, the batch plans and sharding, and re-exports their names.

Canonical example order (what ``train_examples=N`` and `first_images` take the first of):
an image folder's is `input_pipeline`'s (files sorted, classes interleaved); a tfds
source's is its record order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from brjax.data import input_pipeline
from brjax.data.grain_batches import STATE_VERSION, BatchIterator, Example
from brjax.data.image_data import (ACCEPTED_MODES, STATS_SAMPLE_SIZE, canonical, channel_counts,
                              normalize, open_image, pad_rows, reason, stats_from_counts,
                              stats_sample, take)
from brjax.data.image_sources import (EVAL_FOLDERS, TFDS_EVAL_SPLITS, FolderSource, Head,
                                 ImageSource, TfdsSource, find_layout, holds_tfds, larger_than,
                                 layout_or_none, list_split)
from brjax.data.imagenet_augment import (AREA_RANGE, CROP_ATTEMPTS, CROP_FRACTION, IMAGENET_MEAN,
                                    IMAGENET_STD, RATIO_RANGE, eval_transform,
                                    inception_crop_box, train_transform)

__all__ = [  # with the names of brjax.data.image_sources, .imagenet_augment, .grain_batches
    "ACCEPTED_MODES", "AREA_RANGE", "BatchIterator", "CROP_ATTEMPTS", "CROP_FRACTION",
    "DTYPES", "EVAL_FOLDERS", "FolderSource", "IMAGENET_MEAN", "IMAGENET_STD",
    "IN_MEMORY_LIMIT_BYTES", "INPUT_MODES", "ImageSource", "RATIO_RANGE", "STATE_VERSION",
    "StreamingDataset", "TFDS_EVAL_SPLITS", "TfdsSource", "channel_stats", "eval_batches",
    "eval_plan", "eval_transform", "find_layout", "first_images", "from_folder", "from_tfds",
    "global_batches", "inception_crop_box", "load", "num_examples", "num_train_steps",
    "open_image", "train_batches", "train_plan", "train_transform", "use_streaming",
]

IN_MEMORY_LIMIT_BYTES = 1 << 30  # auto choice: larger train folders stream (see use_streaming)
INPUT_MODES = ("auto", "memory", "streaming")
DTYPES = ("float32", "uint8")


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingDataset:
  """A labelled image dataset read from storage batch by batch (see the module docstring).

  Used through this module's functions (`num_train_steps`, `train_batches`,
  `eval_batches`, `first_images`, `num_examples`), which also accept an in-memory
  `input_pipeline.Dataset`. ``dataclasses.replace(ds, mean=..., std=...)`` works as for
  that one.

  Attributes:
    train_source: the train split (`ImageSource`), canonical order.
    test_source: the eval split.
    class_names: label i is ``class_names[i]``.
    mean: float32 (3,), per-channel mean, pixels in [0, 1] (as `input_pipeline.Dataset`).
    std: float32 (3,), per-channel std, same scale.
    image_size: S, the side of the square images of every batch.
    dtype: ``"float32"``: images ``(x / 255 - mean) / std`` (as `input_pipeline`);
      ``"uint8"``: raw pixels, 4x less to move (normalize on the device).
    worker_count: Grain worker processes decoding and augmenting (0: this process).
    read_threads: threads per process preparing batches (Grain ``ReadOptions``).
    shard_options: this process's shard of every batch (``shard_index`` of
      ``shard_count``); None: ``grain.sharding.ShardByJaxProcess()``, i.e.
      ``jax.process_index()`` of ``jax.process_count()``, looked up when iterating.
  """
  train_source: ImageSource
  test_source: ImageSource
  class_names: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray
  image_size: int = 224
  dtype: str = "float32"
  worker_count: int = 0
  read_threads: int = 2
  shard_options: grain.sharding.ShardOptions | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def shard(self) -> grain.sharding.ShardOptions:
    """This process's `ShardOptions` (``shard_options`` or the JAX process's)."""
    return self.shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)


# ------------------------------------------------------------------------ loading


def from_folder(data_dir: str | os.PathLike, *, train_examples: int = 0,
                test_examples: int = 0, **options) -> StreamingDataset:
  """A `StreamingDataset` of an image folder in ImageNet layout.

  Args:
    data_dir: a folder holding ``train/<class>/<image>`` and ``val/<class>/<image>``
      (or ``validation/``, ``test/``; the first present), optionally inside one
      top-level folder. Class names are the sorted train class folders; the eval split
      must have the same. Files whose name starts with "." or lacks an image extension
      (``image_data.IMAGE_EXTENSIONS``) are ignored. Images are only listed here.
    train_examples: keep the first N train examples of the canonical order (0 = all).
    test_examples: same for the eval split.
    **options: ``image_size`` (224), ``dtype`` ("float32"), ``worker_count`` (0),
      ``read_threads`` (2), ``shard_options`` (None): the `StreamingDataset` fields;
      ``mean`` and ``std`` (pixels in [0, 1], e.g. ``IMAGENET_MEAN``/``IMAGENET_STD``), or
      neither: then they are measured over ``stats_examples`` (10,000) images of the
      FULL train split, spread evenly over its classes (`input_pipeline`'s rule),
      eval-transformed to S x S, decoded with the workers at start-up.

  Raises:
    FileNotFoundError: ``data_dir`` does not exist.
    ValueError: bad layout (one line naming the folder), bad option.
  """
  root = Path(data_dir)
  if not root.is_dir():
    if not root.exists():
      raise FileNotFoundError(f"data_dir {root} does not exist; pass a folder holding "
                              "train/<class>/<image> and val/<class>/<image>")
    raise ValueError(f"streaming reads image folders and tfds data sources, not {root}: "
                     "extract the archive, or read it with the in-memory input_pipeline")
  base, eval_folder = find_layout(root)
  train = list_split(base / "train")
  test = list_split(base / eval_folder)
  if list(train) != list(test):
    diff = sorted(set(train) ^ set(test))
    raise ValueError(f"class folders differ between {base / 'train'} and {base / eval_folder}: "
                     f"{diff[:5]}{' ...' if len(diff) > 5 else ''} are in only one of them")
  train_paths, train_labels = canonical(train)
  test_paths, test_labels = canonical(test)
  n_train, n_test = take(len(train_paths), train_examples), take(len(test_paths), test_examples)
  full = FolderSource(str(base / "train"), train_paths, train_labels)
  return _build(FolderSource(str(base / "train"), train_paths[:n_train], train_labels[:n_train]),
                FolderSource(str(base / eval_folder), test_paths[:n_test], test_labels[:n_test]),
                tuple(train), full, train_labels, **options)


def from_tfds(name: str, *, data_dir: str | None = None, train_split: str = "train",
              test_split: str | None = None, train_examples: int = 0, test_examples: int = 0,
              image_key: str = "image", label_key: str = "label",
              **options) -> StreamingDataset:
  """A `StreamingDataset` of a prepared tfds dataset, read with ``tfds.data_source``.

  The dataset must have been prepared in ``array_record`` format under ``data_dir``
  (default: tfds's own data dir); nothing is downloaded. ``test_split`` defaults to the
  first of "validation", "test" the dataset has (ImageNet's is "validation"). Records hold
  an encoded image under ``image_key`` and an int label under ``label_key`` (a
  ``ClassLabel``, whose names are the class names); ``train_examples``, ``test_examples``
  and ``**options`` are `from_folder`'s (the statistics sample is spread over the records).

  Raises:
    ValueError: the dataset or split is not there (one line), bad option.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    info = tfds.builder(name, data_dir=data_dir).info
    splits = list(info.splits)
    if test_split is None:
      test_split = next((s for s in TFDS_EVAL_SPLITS if s in splits), None)
    for split in (train_split, test_split):
      if split not in splits:
        raise ValueError(f"it has no split {split!r} (splits: {', '.join(splits) or 'none'})")
    sources = [TfdsSource(name, s, data_dir, image_key, label_key)
               for s in (train_split, test_split)]
    class_names = tuple(info.features[label_key].names)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read tfds dataset {name!r} from "
                     f"{data_dir or 'the default tfds data dir'} as a data source "
                     f"({reason(e)}); prepare it in array_record format, or pass an image "
                     "folder") from e
  full = sources[0]
  train = Head(full, take(len(full), train_examples))
  test = Head(sources[1], take(len(sources[1]), test_examples))
  return _build(train, test, class_names, full, None, **options)


def load(dataset: str, data_dir: str | os.PathLike | None = None,
         **options) -> StreamingDataset:
  """`from_folder` if ``data_dir`` is an image folder in ImageNet layout, else `from_tfds`
  of ``dataset`` prepared under ``data_dir`` (None: tfds's default data dir)."""
  if data_dir is None:
    return from_tfds(dataset, **options)
  path = Path(data_dir)
  if not path.is_dir() or layout_or_none(path) is not None:
    return from_folder(path, **options)
  if not holds_tfds(path, dataset):
    raise ValueError(f"data_dir {path} holds neither train/ and val/ image folders nor a "
                     f"prepared tfds dataset {dataset!r} (<data_dir>/{dataset}/<version>/)")
  return from_tfds(dataset, data_dir=os.fspath(path), **options)


def use_streaming(dataset: str, data_dir: str | os.PathLike | None,
                  mode: str = "auto") -> bool:
  """Whether a run should stream its data (this module) or hold them (`input_pipeline`).

  ``mode`` "memory" or "streaming" decides; "auto" streams when the in-memory pipeline
  cannot or should not hold the data: ``data_dir`` holds a prepared tfds dataset
  ``dataset``, or an image folder whose eval split is ``val/``/``validation/`` (ImageNet
  layout; `input_pipeline` reads ``test/`` only), or one whose train images exceed
  ``IN_MEMORY_LIMIT_BYTES`` on disk (1 GiB of JPEGs decode to several). Everything else
  (no ``data_dir``: tfds in memory; a ``.tar.gz``; a small folder) stays in memory.
  """
  if mode not in INPUT_MODES:
    raise ValueError(f"input mode {mode!r} is not accepted: use one of {', '.join(INPUT_MODES)}")
  if mode != "auto":
    return mode == "streaming"
  if data_dir is None or not Path(data_dir).is_dir():
    return False
  path = Path(data_dir)
  if holds_tfds(path, dataset):
    return True
  layout = layout_or_none(path)
  if layout is None:
    return False
  base, eval_folder = layout
  return eval_folder != "test" or larger_than(base / "train", IN_MEMORY_LIMIT_BYTES)


def _build(train: ImageSource, test: ImageSource, class_names: tuple[str, ...],
           full_train: ImageSource, full_labels: np.ndarray | None, *,
           image_size: int = 224, dtype: str = "float32", worker_count: int = 0,
           read_threads: int = 2, shard_options: grain.sharding.ShardOptions | None = None,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           stats_examples: int = STATS_SAMPLE_SIZE) -> StreamingDataset:
  """The dataset, options checked; ``mean``/``std`` given or measured (see `from_folder`)
  over ``full_train`` (the whole split; ``full_labels`` spread the sample over classes)."""
  if image_size < 1:
    raise ValueError(f"image_size={image_size} must be a positive number of pixels")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not accepted: use one of {', '.join(DTYPES)}")
  if worker_count < 0 or read_threads < 0:
    raise ValueError(f"worker_count={worker_count} and read_threads={read_threads} must be "
                     ">= 0 (0 workers: decode in this process)")
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std (pixels in [0, 1]), or neither to measure them")
  if stats_examples < 1:
    raise ValueError(f"stats_examples={stats_examples} must be positive")
  if len(train) == 0 or len(test) == 0:
    raise ValueError(f"the dataset has {len(train)} train and {len(test)} eval examples; "
                     "both splits need some")
  ds = StreamingDataset(train, test, tuple(class_names), np.zeros(3, np.float32),
                        np.ones(3, np.float32), image_size, dtype, worker_count, read_threads,
                        shard_options)
  if mean is None:
    sample = stats_sample(len(full_train), full_labels, stats_examples)
    mean, std = channel_stats(ds, full_train, sample)
  return dataclasses.replace(ds, mean=np.asarray(mean, np.float32).reshape(3),
                             std=np.asarray(std, np.float32).reshape(3))


def channel_stats(ds: StreamingDataset, source: ImageSource,
                  indices: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std (float32 (3,), pixels in [0, 1]) of ``source[indices]``,
  eval-transformed to S x S, with ``input_pipeline``'s formula (exact, from histograms;
  std floored at 1/255). Every process computes the same (the indices are not sharded)."""
  rows = pad_rows(np.asarray(indices, np.int64), batch_size)
  example = Example(source, ds.image_size, np.zeros(3, np.float32), np.ones(3, np.float32),
                     "uint8", train=False)
  counts = np.zeros((3, 256), np.int64)
  with BatchIterator(ds, rows, example, {"split": "stats"}) as batches:
    for batch in batches:
      counts += channel_counts(batch["image"][batch["mask"]])
  return stats_from_counts(counts)


# ------------------------------------------------------------------------ batches


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
                  seed: int, epoch: int) -> Iterator[dict]:
  """One epoch of shuffled, augmented train batches: this process's rows of each.

  An in-memory dataset gives `input_pipeline.train_batches` (whole global batches).

  Returns:
    A `BatchIterator` of ``{"image": (B/P, S, S, 3) float32 (normalized) or uint8,
    "label": int32 (B/P,)}``, ``num_train_steps`` of them; resumable with
    ``get_state``/``set_state``.
  """
  if isinstance(ds, input_pipeline.Dataset):
    return input_pipeline.train_batches(ds, batch_size, seed=seed, epoch=epoch)
  plan = train_plan(ds, batch_size, seed=seed, epoch=epoch)
  example = Example(ds.train_source, ds.image_size, ds.mean, ds.std, ds.dtype, True, seed,
                     epoch)
  return BatchIterator(ds, plan, example, _identity(ds, "train", batch_size, seed, epoch))


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
