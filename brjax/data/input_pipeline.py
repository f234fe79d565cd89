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

Folders and archives are read by `brjax.data.image_folder`; decoding, canonical order,
statistics and eval padding are `brjax.data.image_data`'s, shared with `brjax.data.streaming`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import os
import queue
import threading

import jax
import numpy as np

from brjax.data import image_data
from brjax.data.image_data import (
  IMAGE_EXTENSIONS,
  channel_counts,
  interleave,
  normalize,
  pad_rows,
  stats_from_counts,
  take,
)
from brjax.data.image_folder import read_image_folder

__all__ = ["CROP_PADDING", "Dataset", "IMAGE_EXTENSIONS", "STATS_SAMPLE_SIZE", "eval_batches",
           "load_dataset", "normalize", "num_train_steps", "prefetch", "train_batches"]

STATS_SAMPLE_SIZE = image_data.STATS_SAMPLE_SIZE  # looked up at each load
CROP_PADDING = 4


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
    A `Dataset`; images are decoded with PIL (`image_data.open_image`: 16-bit and
    float images are refused), converted to RGB, and must all have the same size.

  Raises:
    FileNotFoundError: ``data_dir`` does not exist.
    ValueError: bad layout, unreadable image, negative counts, tfds failure.
  """
  for name, value in (("train_examples", train_examples), ("test_examples", test_examples)):
    if value < 0:
      raise ValueError(f"{name}={value} is negative; pass 0 for all examples or a positive count")
  if data_dir is None:
    return _load_tfds(dataset, train_examples, test_examples)
  return _finish(*read_image_folder(os.fspath(data_dir), train_examples, test_examples,
                                    STATS_SAMPLE_SIZE))


def num_train_steps(ds: Dataset, batch_size: int) -> int:
  """Number of full batches per epoch (the remainder is dropped)."""
  n = len(ds.train_labels)
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size={batch_size} must be in [1, {n}] (number of train examples)")
  return n // batch_size


def train_batches(ds: Dataset, batch_size: int, *, seed: int, epoch: int,
                  start_step: int = 0) -> Iterator[dict]:
  """Yields one epoch of shuffled, augmented train batches, from batch ``start_step`` on
  (a run resumed mid-epoch: the batches an uninterrupted run reads from there).

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
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step={start_step} is not in [0, {steps}] (batches in an epoch)")
  perm = np.random.default_rng([seed, epoch]).permutation(len(ds.train_labels))
  for step in range(start_step, steps):
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
  for row in pad_rows(np.arange(len(ds.test_labels)), batch_size):
    mask = row >= 0
    image = np.zeros((batch_size, *ds.test_images.shape[1:]), np.float32)
    image[mask] = normalize(ds.test_images[row[mask]], ds.mean, ds.std)
    label = np.zeros((batch_size,), np.int32)
    label[mask] = ds.test_labels[row[mask]]
    yield {"image": image, "label": label, "mask": mask}


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


def _stats_sample(labels: np.ndarray) -> np.ndarray:
  """Sorted indices of the normalization sample, given all canonical train labels
  (`image_data.stats_sample` of ``STATS_SAMPLE_SIZE``)."""
  return image_data.stats_sample(len(labels), labels, STATS_SAMPLE_SIZE)


def _finish(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            sample: np.ndarray, class_names: Sequence[str]) -> Dataset:
  mean, std = stats_from_counts(channel_counts(sample))
  return Dataset(train[0], train[1].astype(np.int32), test[0], test[1].astype(np.int32),
                 tuple(class_names), mean, std)


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
    order = interleave(labels)
    out.append((images[order], labels[order], take(len(order), count)))
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
