"""Streaming input with Grain: image datasets of any size, read batch by batch.

The counterpart of `brjax.input_pipeline` (which holds a whole dataset in memory) for data
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

Canonical example order (what ``train_examples=N`` and `first_images` take the first of):
an image folder's is `input_pipeline`'s (files sorted, classes interleaved); a tfds
source's is its record order.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from absl import flags
import grain
import jax
import numpy as np
from PIL import Image

from brjax import input_pipeline

CROP_FRACTION = 0.875  # eval: resize the shorter side to S / 0.875, keep the central S x S
AREA_RANGE = (0.08, 1.0)  # Inception crop: fraction of the image area
RATIO_RANGE = (3 / 4, 4 / 3)  # Inception crop: aspect ratio (width / height)
CROP_ATTEMPTS = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the usual ImageNet statistics, pixels in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_FOLDERS = ("val", "validation", "test")  # first one present is the eval split
TFDS_EVAL_SPLITS = ("validation", "test")
# Image modes decoded to RGB; 16-bit and float images are refused (converting them clips).
ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
IN_MEMORY_LIMIT_BYTES = 1 << 30  # auto choice: larger train folders stream (see use_streaming)
INPUT_MODES = ("auto", "memory", "streaming")
DTYPES = ("float32", "uint8")
STATE_VERSION = 1


class ImageSource(Protocol):
  """Random access to one split: ``source[i] = (image, label, where)``.

  ``image`` is encoded bytes (JPEG, PNG, ...) or a uint8 (H, W, C) array, ``label`` an int
  in [0, num_classes), ``where`` names the example in error messages (a path). Sources
  are pickled to the worker processes.
  """

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[bytes | np.ndarray, int, str]:
    ...


class FolderSource:
  """The images of one split folder, ``<split_dir>/<class>/<file>``, in a given order.

  The relative paths are kept as one bytes blob and offsets, so that a million of them
  pickle to each worker as two buffers.
  """

  def __init__(self, split_dir: str, paths: Sequence[str], labels: np.ndarray):
    encoded = [p.encode() for p in paths]
    self.split_dir = split_dir
    self.labels = np.asarray(labels, np.int32)
    self._blob = b"".join(encoded)
    self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, index: int) -> str:
    start, stop = self._offsets[index], self._offsets[index + 1]
    return os.path.join(self.split_dir, self._blob[start:stop].decode())

  def __getitem__(self, index: int) -> tuple[bytes, int, str]:
    path = self.path(index)
    try:
      data = Path(path).read_bytes()
    except OSError as e:
      raise ValueError(f"cannot read image {path}: {e.strerror or e}") from e
    return data, int(self.labels[index]), path


class TfdsSource:
  """One split of a prepared tensorflow-datasets dataset, via ``tfds.data_source``.

  Images are read undecoded (``tfds.decode.SkipDecoding``) and decoded like files; the
  tfds data source is opened lazily in each process (it is not pickled).
  """

  def __init__(self, name: str, split: str, data_dir: str | None,
               image_key: str = "image", label_key: str = "label"):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    self._source = None
    self._length = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                      download=False,
                                      decoders={self.image_key: tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> tuple[bytes | np.ndarray, int, str]:
    where = f"tfds {self.name} split {self.split} record {index}"
    try:
      record = self._open()[int(index)]
      image, label = record[self.image_key], int(record[self.label_key])
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot read {where}: {_reason(e)}") from e
    name = record.get("file_name")
    if name is not None:
      where += f" ({name.decode() if isinstance(name, bytes) else name})"
    return image, label, where


class _Head:
  """The first ``count`` examples of a source."""

  def __init__(self, source: ImageSource, count: int):
    self.source, self.count = source, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int):
    if not 0 <= index < self.count:
      raise IndexError(f"index {index} out of range [0, {self.count})")
    return self.source[index]


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
      (``input_pipeline.IMAGE_EXTENSIONS``) are ignored. Images are only listed here.
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
  train = _list_split(base / "train")
  test = _list_split(base / eval_folder)
  if list(train) != list(test):
    diff = sorted(set(train) ^ set(test))
    raise ValueError(f"class folders differ between {base / 'train'} and {base / eval_folder}: "
                     f"{diff[:5]}{' ...' if len(diff) > 5 else ''} are in only one of them")
  train_paths, train_labels = _canonical(train)
  test_paths, test_labels = _canonical(test)
  n_train, n_test = _take(len(train_paths), train_examples), _take(len(test_paths), test_examples)
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
                     f"({_reason(e)}); prepare it in array_record format, or pass an image "
                     "folder") from e
  full = sources[0]
  train = _Head(full, _take(len(full), train_examples))
  test = _Head(sources[1], _take(len(sources[1]), test_examples))
  return _build(train, test, class_names, full, None, **options)


def load(dataset: str, data_dir: str | os.PathLike | None = None,
         **options) -> StreamingDataset:
  """`from_folder` if ``data_dir`` is an image folder in ImageNet layout, else `from_tfds`
  of ``dataset`` prepared under ``data_dir`` (None: tfds's default data dir)."""
  if data_dir is None:
    return from_tfds(dataset, **options)
  path = Path(data_dir)
  if not path.is_dir() or _layout_or_none(path) is not None:
    return from_folder(path, **options)
  if not _holds_tfds(path, dataset):
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
  if _holds_tfds(path, dataset):
    return True
  layout = _layout_or_none(path)
  if layout is None:
    return False
  base, eval_folder = layout
  return eval_folder != "test" or _larger_than(base / "train", IN_MEMORY_LIMIT_BYTES)


def find_layout(root: Path) -> tuple[Path, str]:
  """``(folder holding train/, name of the eval folder)`` of an ImageNet-layout folder."""
  layout = _layout_or_none(root)
  if layout is None:
    raise ValueError(f"data_dir {root} has no train/ folder beside a val/, validation/ or "
                     "test/ folder; expected train/<class>/<image> and "
                     "val/<class>/<image>, optionally inside one top-level folder")
  return layout


def _layout_or_none(root: Path) -> tuple[Path, str] | None:
  candidates = [root]
  if not (root / "train").is_dir():
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))]
    candidates = subdirs if len(subdirs) == 1 else []
  for base in candidates:
    found = next((e for e in EVAL_FOLDERS if (base / e).is_dir()), None)
    if (base / "train").is_dir() and found:
      return base, found
  return None


def _holds_tfds(path: Path, dataset: str) -> bool:
  """Whether ``path/<dataset>/[config/]version/dataset_info.json`` exists."""
  folder = path / dataset.split(":")[0].split("/")[0]
  return folder.is_dir() and any(next(folder.glob(p), None) for p in
                                 ("*/dataset_info.json", "*/*/dataset_info.json"))


def _larger_than(folder: Path, limit: int) -> bool:
  """Whether the files under ``folder`` exceed ``limit`` bytes (stops as soon as known)."""
  total = 0
  for current, _, names in os.walk(folder):
    for name in names:
      try:
        total += os.stat(os.path.join(current, name)).st_size
      except OSError:
        continue
      if total > limit:
        return True
  return False


def _list_split(split_dir: Path) -> dict[str, list[str]]:
  """Sorted class name -> sorted ``"<class>/<file>"`` image paths of one split folder."""
  classes = sorted(e.name for e in os.scandir(split_dir)
                   if e.is_dir() and not e.name.startswith("."))
  if not classes:
    raise ValueError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image> "
                     "(sort ImageNet's validation images into class folders first)")
  out = {}
  for cls in classes:
    names = sorted(e.name for e in os.scandir(split_dir / cls)
                   if not e.name.startswith(".") and e.is_file()
                   and e.name.lower().endswith(input_pipeline.IMAGE_EXTENSIONS))
    if not names:
      raise ValueError(f"class folder {split_dir / cls} has no images (accepted extensions: "
                       f"{', '.join(input_pipeline.IMAGE_EXTENSIONS)})")
    out[cls] = [f"{cls}/{n}" for n in names]
  return out


def _canonical(classes: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
  """Paths and int32 labels in `input_pipeline`'s canonical (class-interleaved) order."""
  paths = [p for files in classes.values() for p in files]
  labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(f) for f in classes.values()])
  order = input_pipeline._interleave(labels)  # pylint: disable=protected-access
  return [paths[i] for i in order], labels[order]


def _take(n: int, count: int) -> int:
  if count < 0:
    raise ValueError(f"example count {count} is negative; pass 0 for all examples or a "
                     "positive count")
  return n if count == 0 else min(count, n)


def _build(train: ImageSource, test: ImageSource, class_names: tuple[str, ...],
           full_train: ImageSource, full_labels: np.ndarray | None, *,
           image_size: int = 224, dtype: str = "float32", worker_count: int = 0,
           read_threads: int = 2, shard_options: grain.sharding.ShardOptions | None = None,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           stats_examples: int = input_pipeline.STATS_SAMPLE_SIZE) -> StreamingDataset:
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
    mean, std = channel_stats(ds, full_train, _stats_indices(len(full_train), full_labels,
                                                             stats_examples))
  return dataclasses.replace(ds, mean=np.asarray(mean, np.float32).reshape(3),
                             std=np.asarray(std, np.float32).reshape(3))


def _stats_indices(n: int, labels: np.ndarray | None, count: int) -> np.ndarray:
  """Sorted indices of the statistics sample (`input_pipeline._stats_sample`'s rule)."""
  k = min(n, count)
  if labels is None:
    return np.arange(k) * n // k
  return np.sort(np.argsort(labels, kind="stable")[np.arange(k) * n // k])


def channel_stats(ds: StreamingDataset, source: ImageSource,
                  indices: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std (float32 (3,), pixels in [0, 1]) of ``source[indices]``,
  eval-transformed to S x S, with ``input_pipeline``'s formula (exact, from histograms;
  std floored at 1/255). Every process computes the same (the indices are not sharded)."""
  rows = _pad_rows(np.asarray(indices, np.int64), batch_size)
  example = _Example(source, ds.image_size, np.zeros(3, np.float32), np.ones(3, np.float32),
                     "uint8", train=False)
  counts = np.zeros((3, 256), np.int64)
  with BatchIterator(ds, rows, example, {"split": "stats"}) as batches:
    for batch in batches:
      images = batch["image"][batch["mask"]]
      for c in range(3):
        counts[c] += np.bincount(images[..., c].ravel(), minlength=256)
  values = np.arange(256) / 255.0
  p = counts / counts.sum(axis=1, keepdims=True)
  mean = p @ values
  std = np.sqrt(np.maximum(p @ values**2 - mean**2, 1 / 255**2))
  return mean.astype(np.float32), std.astype(np.float32)


# ------------------------------------------------------------ decoding, augmentation


def open_image(data: bytes | np.ndarray, where: str) -> Image.Image:
  """Encoded image bytes (or a uint8 (H, W, C) array) -> a loaded RGB PIL image.

  Raises:
    ValueError: one line naming ``where``: not an image, truncated, or a mode other than
      ``ACCEPTED_MODES`` (16-bit and float images).
  """
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim != 3 or data.shape[-1] not in (1, 3, 4):
      raise ValueError(f"image {where} is {data.dtype}{data.shape}; expected uint8 (H, W, 1|3|4)")
    return Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).convert("RGB")
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.mode not in ACCEPTED_MODES:
        raise ValueError(f"unsupported image mode {image.mode} (accepted: "
                         f"{', '.join(ACCEPTED_MODES)})")
      image.load()
      return image.convert("RGB")
  except Image.UnidentifiedImageError as e:
    raise ValueError(f"cannot decode image {where}: not a recognized image file") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot decode image {where}: {_reason(e)}") from e


def inception_crop_box(width: int, height: int,
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
  """``(left, top, right, bottom)`` of an Inception crop of a ``width`` x ``height`` image.

  Up to 10 draws of an area fraction ~ U(0.08, 1) and an aspect ratio log-uniform in
  [3/4, 4/3]; the first that fits is placed uniformly. If none fits: the central crop,
  the whole image with its aspect ratio clamped to [3/4, 4/3] (as torchvision's
  ``RandomResizedCrop``).
  """
  log_lo, log_hi = math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1])
  for _ in range(CROP_ATTEMPTS):
    area = width * height * rng.uniform(*AREA_RANGE)
    ratio = math.exp(rng.uniform(log_lo, log_hi))
    w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < w <= width and 0 < h <= height:
      left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  w, h = width, height
  if width / height < RATIO_RANGE[0]:
    h = round(width / RATIO_RANGE[0])
  elif width / height > RATIO_RANGE[1]:
    w = round(height * RATIO_RANGE[1])
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def train_transform(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """Inception crop resized (bilinear, antialiased) to ``size`` x ``size``, flipped
  horizontally with p = 0.5 -> uint8 (size, size, 3)."""
  box = inception_crop_box(*image.size, rng)
  out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if rng.random() < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def eval_transform(image: Image.Image, size: int) -> np.ndarray:
  """Shorter side resized to ``size / 0.875``, central ``size`` x ``size`` -> uint8
  (size, size, 3); done as one bilinear resize of the central square whose side is 0.875
  of the shorter side."""
  width, height = image.size
  side = CROP_FRACTION * min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  box = (left, top, left + side, top + side)
  return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))


@dataclasses.dataclass(frozen=True, eq=False)
class _Example:
  """Record index -> one example dict; what the Grain map runs (pickled to the workers).

  Train: ``{"image", "label"}``, augmented with ``default_rng([seed, epoch, index])``.
  Eval: ``{"image", "label", "mask"}``; index -1 is padding (image 0, label 0, mask False).
  """
  source: ImageSource
  size: int
  mean: np.ndarray
  std: np.ndarray
  dtype: str
  train: bool
  seed: int = 0
  epoch: int = 0

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if index < 0:
      return {"image": np.zeros((self.size, self.size, 3), self.dtype), "label": np.int32(0),
              "mask": np.bool_(False)}
    data, label, where = self.source[index]
    image = open_image(data, where)
    if self.train:
      rng = np.random.default_rng([self.seed, self.epoch, index])
      pixels = train_transform(image, self.size, rng)
    else:
      pixels = eval_transform(image, self.size)
    if self.dtype == "float32":
      pixels = input_pipeline.normalize(pixels, self.mean, self.std)
    out = {"image": pixels, "label": np.int32(label)}
    if not self.train:
      out["mask"] = np.bool_(True)
    return out


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
  steps = -(-n // batch_size)
  plan = np.arange(steps * batch_size).reshape(steps, shard.shard_count, rows)[:, shard.shard_index]
  return np.where(plan < n, plan, -1)


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
  example = _Example(ds.train_source, ds.image_size, ds.mean, ds.std, ds.dtype, True, seed,
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
  example = _Example(ds.test_source, ds.image_size, ds.mean, ds.std, ds.dtype, False)
  return BatchIterator(ds, eval_plan(ds, batch_size), example,
                       _identity(ds, "test", batch_size))


def first_images(ds: StreamingDataset | input_pipeline.Dataset, count: int) -> np.ndarray:
  """The first ``count`` train images (canonical order), unaugmented, as batches hold
  them: (count, S, S, 3) (eval-transformed for a streaming dataset); the same on every
  process. For initializing a model and its step sizes."""
  if isinstance(ds, input_pipeline.Dataset):
    return input_pipeline.normalize(ds.train_images[:count], ds.mean, ds.std)
  count = min(count, num_examples(ds, "train"))
  if count < 1:
    raise ValueError(f"count={count} must be positive")
  example = _Example(ds.train_source, ds.image_size, ds.mean, ds.std, ds.dtype, False)
  rows = _pad_rows(np.arange(count), min(count, 64))
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


def _pad_rows(indices: np.ndarray, width: int) -> np.ndarray:
  """Indices as (ceil(n / width), width) rows, padded with -1."""
  rows = -(-len(indices) // width)
  out = np.full(rows * width, -1, np.int64)
  out[:len(indices)] = indices
  return out.reshape(rows, width)


def _identity(ds: StreamingDataset, split: str, batch_size: int, seed: int | None = None,
              epoch: int | None = None) -> dict[str, Any]:
  """What a split's batches are a function of; a saved state restores only onto the same."""
  shard = ds.shard()
  identity = {"split": split, "batch_size": batch_size, "num_examples": num_examples(ds, split),
              "shard": [shard.shard_index, shard.shard_count], "image_size": ds.image_size}
  if split == "train":
    identity.update(seed=seed, epoch=epoch)
  return identity


class BatchIterator(Iterator[dict]):
  """Batches of a plan (rows of example indices), read by a Grain pipeline.

  The pipeline is ``grain.MapDataset.source(plan).map(example).batch(...)``: random access
  from a batch number to a batch, read ahead by ``read_threads`` threads in each of
  ``worker_count`` processes (``to_iter_dataset``, ``mp_prefetch``). Its position is
  therefore one integer, the next batch (as in ``grain.experimental.ElasticIterator``):
  ``get_state()`` is JSON bytes of it and of what the batches are a function of, and
  ``set_state`` restarts the pipeline there. Read-ahead batches are not part of the
  state, and a state is valid whatever the worker count. Batches from workers are copied
  out of Grain's shared memory (plain arrays, which a device transfer may alias).
  ``close()`` (or the end, or garbage collection) stops the workers; usable as a context
  manager.
  """

  def __init__(self, ds: StreamingDataset, plan: np.ndarray, example: _Example,
               identity: dict[str, Any]):
    self._ds, self._plan, self._example, self._identity = ds, plan, example, identity
    self._next = 0
    self._iterator = None

  @property
  def num_batches(self) -> int:
    """Batches in the whole epoch (or eval pass), read or not."""
    return len(self._plan)

  def __len__(self) -> int:
    return len(self._plan) - self._next

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next >= len(self._plan):
      self.close()
      raise StopIteration
    if self._iterator is None:
      self._iterator = iter(_pipeline(self._ds, self._plan[self._next:], self._example))
    try:
      batch = next(self._iterator)
    except ValueError as e:  # ours (a bad image): one line, without what Grain appends
      self.close()
      raise ValueError(_reason(e)) from e
    except BaseException:
      self.close()
      raise
    self._next += 1
    if self._ds.worker_count:  # out of Grain's shared memory: plain arrays, freed as usual
      batch = {key: np.array(value) for key, value in batch.items()}
    return batch

  def get_state(self, next_batch: int | None = None) -> bytes:
    """JSON bytes: ``{"version", "next_batch", ...identity}``, for a checkpoint.

    ``next_batch`` (default: the batches this iterator has returned) sets the position
    to save, e.g. the steps a training loop has taken when a prefetcher reads ahead.
    """
    step = self._next if next_batch is None else next_batch
    if not 0 <= step <= len(self._plan):
      raise ValueError(f"next_batch={step} is not in [0, {len(self._plan)}]")
    return json.dumps({"version": STATE_VERSION, "next_batch": step, **self._identity}).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    """Continues from a ``get_state()`` of an iterator over the same batches.

    Raises:
      ValueError: not such a state, or one of other batches (another epoch, seed,
        batch size, shard or dataset), in one line naming the difference.
    """
    try:
      saved = json.loads(state) if isinstance(state, (bytes, str)) else dict(state)
      version, step = saved.pop("version"), saved.pop("next_batch")
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"not a brjax.streaming iterator state ({_reason(e)})") from e
    if version != STATE_VERSION:
      raise ValueError(f"iterator state version {version} is not {STATE_VERSION}")
    diff = [f"{k}={saved.get(k)} (here {v})" for k, v in self._identity.items()
            if saved.get(k) != v]
    if diff:
      raise ValueError(f"the iterator state is of other batches: {', '.join(diff)}")
    if not (isinstance(step, int) and 0 <= step <= len(self._plan)):
      raise ValueError(f"iterator state next_batch={step} is not in [0, {len(self._plan)}]")
    self.close()
    self._next = step

  def close(self) -> None:
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self.close()


def _pipeline(ds: StreamingDataset, plan: np.ndarray, example: _Example) -> grain.IterDataset:
  """Grain pipeline of the batches of ``plan`` (rows of example indices)."""
  batches = grain.MapDataset.source(plan.reshape(-1)).map(example).batch(
      plan.shape[1], drop_remainder=True)
  out = batches.to_iter_dataset(grain.ReadOptions(num_threads=ds.read_threads,
                                                  prefetch_buffer_size=max(1, ds.read_threads)))
  if ds.worker_count:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts workers
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=ds.worker_count),
                          worker_init_fn=_ignore_sigint)
  return out


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
  """Workers ignore Ctrl-C (SIGINT reaches the whole process group): the training process
  alone decides to stop, and closing the iterator ends them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _reason(e: BaseException) -> str:
  text = str(e).splitlines()[0] if str(e) else ""
  return text or type(e).__name__
