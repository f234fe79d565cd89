"""The streamed dataset (`brjax.data.streaming`): what it is made of, and how it is loaded.

A `StreamingDataset` holds two `ImageSource` splits (an ImageNet-layout folder, or a prepared
tensorflow-datasets dataset), the class names, the normalization statistics and how batches
are read; `load` and `use_streaming` are what the training config calls. Reading its batches
is `brjax.data.streaming`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
from pathlib import Path

import grain
import numpy as np

from brjax.data.grain_batches import BatchIterator, Example
from brjax.data.image_data import (
  STATS_SAMPLE_SIZE,
  canonical,
  channel_counts,
  pad_rows,
  reason,
  stats_from_counts,
  stats_sample,
  take,
)
from brjax.data.image_sources import (
  TFDS_EVAL_SPLITS,
  FolderSource,
  Head,
  ImageSource,
  TfdsSource,
  find_layout,
  holds_tfds,
  larger_than,
  layout_or_none,
  list_split,
)

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
