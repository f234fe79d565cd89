"""Input pipeline: image classification data as host numpy arrays.

Data comes from a local image folder (or a ``.tar.gz`` of one) laid out as
``train/<class>/<image>`` and ``test/<class>/<image>``, or from
``tensorflow_datasets`` (which needs TensorFlow and, the first time, network).

Canonical example order (both sources): within each class, examples in source
order (folder: files sorted by name); classes interleaved round-robin
(class0 #0, class1 #0, ..., class0 #1, ...; exhausted classes drop out). The
first N examples are therefore as class-balanced as possible.

Normalization statistics (``Dataset.mean``/``std``) are computed over a fixed
sample of at most 10,000 images of the FULL train split, spread evenly over
every class (see `_stats_sample`; all images if the split has <= 10,000), so
they do not depend on ``train_examples`` and a subset run decodes at most
``train_examples + 10,000`` train images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import queue
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
STATS_SAMPLE_SIZE = 10_000
CROP_PADDING = 4
_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A labelled image dataset held in host memory.

  Attributes:
    train_images: uint8 (N_train, H, W, 3), canonical order.
    train_labels: int32 (N_train,), values in [0, num_classes).
    test_images: uint8 (N_test, H, W, 3), canonical order.
    test_labels: int32 (N_test,).
    class_names: names of the classes; label i is ``class_names[i]``.
    mean: float32 (3,), per-channel mean of the full train split, pixels in [0, 1]
      (over at most 10,000 images spread evenly over it; see the module docstring).
    std: float32 (3,), per-channel std of the full train split, same scale.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_size(self) -> int:
    """The side of the (square) images, as the models see them."""
    return int(self.test_images.shape[1])


def load_dataset(dataset: str = "cifar10", data_dir: str | None = None,
                 train_examples: int = 0, test_examples: int = 0) -> Dataset:
  """Loads a dataset into host memory.

  Args:
    dataset: tensorflow-datasets name, used only when ``data_dir`` is None.
    data_dir: a folder holding ``train/<class>/*`` and ``test/<class>/*`` images
      (optionally wrapped in one top-level folder), or a ``.tar.gz``/``.tgz``
      archive of such a folder (read in memory, never extracted). Files whose
      name starts with "." or lacks an image extension are ignored.
    train_examples: keep the first N train examples of the canonical order
      (0 = all; N larger than the split keeps all).
    test_examples: same for the test split.

  Returns:
    A `Dataset`; images are decoded with PIL, converted to RGB, and must all
    have the same size.

  Raises:
    FileNotFoundError: ``data_dir`` does not exist.
    ValueError: bad layout, unreadable image, negative counts, tfds failure.
  """
  for name, value in (("train_examples", train_examples), ("test_examples", test_examples)):
    if value < 0:
      raise ValueError(f"{name}={value} is negative; pass 0 for all examples or a positive count")
  if data_dir is None:
    return _load_tfds(dataset, train_examples, test_examples)
  return _load_image_folder(os.fspath(data_dir), train_examples, test_examples)


def num_train_steps(ds: Dataset, batch_size: int) -> int:
  """Number of full batches per epoch (the remainder is dropped)."""
  n = len(ds.train_labels)
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size={batch_size} must be in [1, {n}] (number of train examples)")
  return n // batch_size


def train_batches(ds: Dataset, batch_size: int, *, seed: int, epoch: int) -> Iterator[dict]:
  """Yields one epoch of shuffled, augmented train batches.

  The order is ``np.random.default_rng([seed, epoch]).permutation(N_train)``;
  batch ``step`` is augmented with ``np.random.default_rng([seed, epoch, 1, step])``.
  So every batch is a pure function of (seed, epoch, step): a run resumed at
  any epoch (or step) sees exactly the batches of an uninterrupted run.
  Augmentation: zero-pad 4 pixels per side (black, in pixel space), random HxW
  crop, horizontal flip with p=0.5, then ``(x / 255 - mean) / std``.

  Yields:
    ``{"image": float32 (B, H, W, 3), "label": int32 (B,)}``; the last partial
    batch is dropped.
  """
  steps = num_train_steps(ds, batch_size)
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative integers")
  perm = np.random.default_rng([seed, epoch]).permutation(len(ds.train_labels))
  for step in range(steps):
    idx = perm[step * batch_size:(step + 1) * batch_size]
    rng = np.random.default_rng([seed, epoch, 1, step])
    image = normalize(_random_crop_flip(ds.train_images[idx], rng), ds.mean, ds.std)
    yield {"image": image, "label": ds.train_labels[idx]}


def eval_batches(ds: Dataset, batch_size: int) -> Iterator[dict]:
  """Yields the test split in canonical order, normalized, not augmented.

  Every batch has exactly ``batch_size`` rows: the last one is zero-filled
  (image 0.0, label 0) and ``mask`` marks the real examples.

  Yields:
    ``{"image": float32 (B, H, W, 3), "label": int32 (B,), "mask": bool (B,)}``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive")
  n = len(ds.test_labels)
  for start in range(0, n, batch_size):
    real = min(batch_size, n - start)
    image = np.zeros((batch_size, *ds.test_images.shape[1:]), np.float32)
    image[:real] = normalize(ds.test_images[start:start + real], ds.mean, ds.std)
    label = np.zeros((batch_size,), np.int32)
    label[:real] = ds.test_labels[start:start + real]
    yield {"image": image, "label": label, "mask": np.arange(batch_size) < real}


def prefetch(batches: Iterable[dict], size: int = 2, sharding=None) -> Iterator[dict]:
  """Prepares batches in a background thread and puts them on device.

  The thread starts immediately, keeps up to ``size`` batches ready, and
  transfers each with ``jax.device_put(batch, sharding)`` (None = default
  device). An exception raised by ``batches`` is re-raised in the consumer.
  Calling ``close()`` on the returned iterator, or dropping it, stops the
  thread (and closes ``batches`` if it is a generator) once its current item
  is done.
  """
  if size < 1:
    raise ValueError(f"prefetch size={size} must be positive")
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  source = iter(batches)

  def produce() -> None:
    try:
      while not stop.is_set():
        try:
          batch = next(source)
        except StopIteration:
          put(("end", None))
          return
        if not put(("batch", jax.device_put(batch, sharding))):
          return
    except BaseException as e:  # pylint: disable=broad-except
      put(("error", e))
    finally:
      if hasattr(source, "close"):
        source.close()

  thread = threading.Thread(target=produce, name="brjax-prefetch", daemon=True)
  thread.start()
  return _Prefetcher(ready, stop, thread)


class _Prefetcher(Iterator[dict]):
  """Consumer side of `prefetch`; `close()` (or garbage collection) stops the producer."""

  def __init__(self, ready: queue.Queue, stop: threading.Event, thread: threading.Thread):
    self._ready, self._stop, self._thread = ready, stop, thread

  def __next__(self) -> dict:
    if self._stop.is_set():
      raise StopIteration
    kind, value = self._ready.get()
    if kind == "batch":
      return value
    self.close()
    if kind == "error":
      raise value
    raise StopIteration

  def close(self) -> None:
    self._stop.set()
    while not self._ready.empty():  # drop references to device buffers
      self._ready.get_nowait()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=1.0)

  def __del__(self):
    self.close()


def _random_crop_flip(images: np.ndarray, rng: np.random.Generator,
                      pad: int = CROP_PADDING) -> np.ndarray:
  """Zero-pads (B, H, W, C) images by ``pad``, takes random HxW crops, flips half."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  top = rng.integers(0, 2 * pad + 1, size=b)
  left = rng.integers(0, 2 * pad + 1, size=b)
  flip = rng.random(b) < 0.5
  rows = top[:, None] + np.arange(h)  # (B, H)
  cols = left[:, None] + np.arange(w)  # (B, W)
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``."""
  return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean and population std of uint8 (N, H, W, 3), scaled to [0, 1].

  The std is floored at 1/255 so that a constant channel cannot divide by zero.
  """
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = np.zeros(3), np.zeros(3)
  for c in range(3):
    counts = np.bincount(images[..., c].ravel(), minlength=256)
    p = counts / counts.sum()
    mean[c] = p @ values
    std[c] = np.sqrt(max(p @ values**2 - mean[c]**2, 1 / 255**2))
  return mean.astype(np.float32), std.astype(np.float32)


def _stats_sample(labels: np.ndarray) -> np.ndarray:
  """Sorted indices of the normalization sample, given all canonical train labels.

  ``k = min(n, 10_000)`` indices ``arange(k) * n // k`` into the class-major
  order (stable sort by label): each class contributes in proportion to its
  size, spread evenly over its files. (Even spacing directly over the
  interleaved order would alias with the class rotation: a stride of 5 over
  10 interleaved classes would only ever see 2 classes.)
  """
  n = len(labels)
  k = min(n, STATS_SAMPLE_SIZE)
  return np.sort(np.argsort(labels, kind="stable")[np.arange(k) * n // k])


def _interleave(labels: np.ndarray) -> np.ndarray:
  """Permutation putting examples in round-robin class order, stable within a class."""
  labels = np.asarray(labels)
  by_class = np.argsort(labels, kind="stable")
  sorted_labels = labels[by_class]
  rank = np.empty(len(labels), np.int64)
  rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
  return np.lexsort((labels, rank))


def _take(n: int, count: int) -> int:
  return n if count == 0 else min(count, n)


def _finish(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            sample: np.ndarray, class_names: Sequence[str]) -> Dataset:
  mean, std = _channel_stats(sample)
  return Dataset(train[0], train[1].astype(np.int32), test[0], test[1].astype(np.int32),
                 tuple(class_names), mean, std)


# ----------------------------------------------------------------- image folder


def _load_image_folder(data_dir: str, train_examples: int, test_examples: int) -> Dataset:
  path = Path(data_dir)
  if not path.exists():
    raise FileNotFoundError(f"data_dir {data_dir} does not exist; pass a folder with "
                            "train/<class>/<image> and test/<class>/<image>, or a .tar.gz of one")
  if path.is_dir():
    dirs, files = _list_folder(path)
    read = lambda rel: (path / rel).read_bytes()
    where = lambda rel: str(path / rel)
  elif path.name.endswith((".tar.gz", ".tgz")):
    dirs, blobs = _read_tar(path)
    files = list(blobs)
    read = blobs.__getitem__
    where = lambda rel: f"{path}:{rel}"
  else:
    raise ValueError(f"unsupported data_dir {data_dir}: expected a folder or a .tar.gz/.tgz archive "
                     "holding train/<class>/<image> and test/<class>/<image>")
  if not files:
    raise ValueError(f"data_dir {data_dir} holds no files; expected train/<class>/<image> and "
                     "test/<class>/<image>")
  prefix = _find_root(dirs, data_dir)
  classes = {s: _split_classes(dirs, files, prefix + s, where) for s in _SPLITS}
  if list(classes["train"]) != list(classes["test"]):
    diff = sorted(set(classes["train"]) ^ set(classes["test"]))
    raise ValueError(f"class folders differ between {where(prefix + 'train')} and "
                     f"{where(prefix + 'test')}: {diff} are in only one of them")
  class_names = list(classes["train"])

  def canonical(split: str) -> tuple[list[str], np.ndarray]:
    paths = [p for c in class_names for p in classes[split][c]]
    labels = np.repeat(np.arange(len(class_names)), [len(classes[split][c]) for c in class_names])
    order = _interleave(labels)
    return [paths[i] for i in order], labels[order]

  train_paths, train_labels = canonical("train")
  test_paths, test_labels = canonical("test")
  n_train = _take(len(train_paths), train_examples)
  n_test = _take(len(test_paths), test_examples)
  sample = _stats_sample(train_labels)
  needed = np.union1d(np.arange(n_train), sample)  # sorted, starts with 0..n_train-1
  paths = [train_paths[i] for i in needed] + test_paths[:n_test]
  images = _decode_images(paths, read, where)
  train_images, test_images = images[:n_train], images[len(needed):]
  return _finish((train_images, train_labels[:n_train]), (test_images, test_labels[:n_test]),
                 images[np.searchsorted(needed, sample)], class_names)


def _list_folder(root: Path) -> tuple[set[str], list[str]]:
  """Relative posix dirs (depth <= 3) and files (depth <= 4) under ``root``."""
  dirs, files = set(), []
  for current, subdirs, names in os.walk(root):
    rel = Path(current).relative_to(root).as_posix()
    depth = 0 if rel == "." else rel.count("/") + 1
    if depth:
      dirs.add(rel)
    if depth >= 3:
      subdirs.clear()
    files.extend(n if depth == 0 else f"{rel}/{n}" for n in names)
  return dirs, files


def _read_tar(path: Path) -> tuple[set[str], dict[str, bytes]]:
  """Streams a gzip tar once; returns its dirs and the raw bytes of its files."""
  dirs, blobs = set(), {}
  try:
    with tarfile.open(path, "r:gz") as archive:
      for member in archive:
        name = member.name.lstrip("/")
        while name.startswith("./"):
          name = name[2:]
        name = name.rstrip("/")
        if not name or ".." in name.split("/"):
          continue
        if member.isdir():
          dirs.add(name)
        elif member.isfile():
          blobs[name] = archive.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise ValueError(f"cannot read {path} as a .tar.gz archive ({e}); expected a gzip-compressed "
                     "tar of train/<class>/<image> and test/<class>/<image>") from e
  for name in blobs:  # tar files need not list parent directories
    parts = name.split("/")
    dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
  return dirs, blobs


def _find_root(dirs: set[str], data_dir: str) -> str:
  """'' if train/ and test/ are top-level, '<folder>/' if wrapped in one folder."""
  if "train" in dirs or "test" in dirs:
    prefix = ""
  else:
    tops = sorted(d for d in dirs if "/" not in d and not d.startswith((".", "__MACOSX")))
    prefix = f"{tops[0]}/" if len(tops) == 1 else ""
  missing = [s for s in _SPLITS if prefix + s not in dirs]
  if missing:
    raise ValueError(f"data_dir {data_dir} has no {' or '.join(m + '/' for m in missing)} folder; "
                     "expected train/<class>/<image> and test/<class>/<image>, optionally inside "
                     "one top-level folder")
  return prefix


def _split_classes(dirs: set[str], files: Iterable[str], split: str,
                   where: Callable[[str], str]) -> dict[str, list[str]]:
  """Sorted class name -> sorted image paths (relative) of one split folder."""
  classes = {d[len(split) + 1:]: [] for d in dirs
             if d.startswith(split + "/") and "/" not in d[len(split) + 1:]
             and not d[len(split) + 1:].startswith(".")}
  if not classes:
    raise ValueError(f"{where(split)} has no class folders; expected {where(split)}/<class>/<image>")
  for f in files:
    head, _, name = f.rpartition("/")
    cls = head[len(split) + 1:]
    if (head.startswith(split + "/") and cls in classes and not name.startswith(".")
        and name.lower().endswith(IMAGE_EXTENSIONS)):
      classes[cls].append(f)
  for cls, paths in classes.items():
    if not paths:
      raise ValueError(f"class folder {where(f'{split}/{cls}')} has no images "
                       f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
    paths.sort()
  return dict(sorted(classes.items()))


def _decode_images(paths: Sequence[str], read: Callable[[str], bytes],
                   where: Callable[[str], str]) -> np.ndarray:
  """Decodes images (RGB, all one size) with a thread pool -> uint8 (N, H, W, 3)."""

  def decode(p: str) -> np.ndarray:
    try:
      with Image.open(io.BytesIO(read(p))) as im:
        return np.asarray(im.convert("RGB"))
    except Exception as e:  # pylint: disable=broad-except
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"cannot decode image {where(p)}: {reason}") from e

  if not paths:
    return np.zeros((0, 0, 0, 3), np.uint8)
  first = decode(paths[0])
  out = np.empty((len(paths), *first.shape), np.uint8)

  def decode_chunk(start: int, stop: int) -> None:
    for i in range(start, stop):
      image = decode(paths[i])
      if image.shape != first.shape:
        raise ValueError(f"image {where(paths[i])} is {image.shape[1]}x{image.shape[0]} but "
                         f"{where(paths[0])} is {first.shape[1]}x{first.shape[0]}; all images "
                         "must have the same size")
      out[i] = image

  chunk = 512
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = [pool.submit(decode_chunk, s, min(s + chunk, len(paths)))
               for s in range(0, len(paths), chunk)]
    try:
      for future in futures:
        future.result()
    except BaseException:
      for future in futures:
        future.cancel()  # fail fast: do not decode the rest
      raise
  return out


# ------------------------------------------------------------ tensorflow-datasets


def _load_tfds(name: str, train_examples: int, test_examples: int) -> Dataset:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    (train, test), info = tfds.load(name, split=["train", "test"], batch_size=-1,
                                    as_supervised=True, with_info=True)
    splits = [tuple(np.asarray(a) for a in tfds.as_numpy(s)) for s in (train, test)]
  except Exception as e:  # pylint: disable=broad-except
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    raise ValueError(f"could not load {name!r} with tensorflow-datasets ({reason}); pass "
                     "--data_dir=<folder or .tar.gz> to train from local images") from e
  out = []
  for (images, labels), count in zip(splits, (train_examples, test_examples)):
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
      raise ValueError(f"tensorflow-datasets {name!r} gave images {images.dtype}{images.shape}; "
                       "expected uint8 (N, H, W, 1 or 3)")
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    order = _interleave(labels)
    out.append((images[order], labels[order], _take(len(order), count)))
  (train_images, train_labels, n_train), (test_images, test_labels, n_test) = out
  try:
    class_names = tuple(info.features["label"].names)
  except Exception:  # pylint: disable=broad-except
    class_names = ()
  if not class_names:
    num = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    class_names = tuple(str(i) for i in range(num))
  return _finish((train_images[:n_train], train_labels[:n_train]),
                 (test_images[:n_test], test_labels[:n_test]),
                 train_images[_stats_sample(train_labels)], class_names)
