"""What both input pipelines share: decoding, canonical order, normalization, eval padding.

`brjax.data.input_pipeline` (a dataset held in memory) and `brjax.data.streaming` (read batch by
batch) decode images, order examples, measure and apply the normalization statistics and
pad the last eval batch the same way; these are the one implementation of each.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
STATS_SAMPLE_SIZE = 10_000
# Image modes decoded to RGB; 16-bit and float images are refused (converting them clips).
ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def reason(e: BaseException) -> str:
  """The first line of an exception's message, or its type's name: for one-line errors."""
  text = str(e).splitlines()[0] if str(e) else ""
  return text or type(e).__name__


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
    raise ValueError(f"cannot decode image {where}: {reason(e)}") from e


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``."""
  return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def channel_counts(images: np.ndarray) -> np.ndarray:
  """int64 (3, 256): how many pixels of uint8 (..., 3) images have each value, per channel."""
  return np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)]
                  ).astype(np.int64)


def stats_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean and population std, float32 (3,) scaled to [0, 1], of the
  pixel histograms ``counts`` (3, 256) (`channel_counts`).

  The std is floored at 1/255 so that a constant channel cannot divide by zero.
  """
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = np.zeros(3), np.zeros(3)
  for c in range(3):
    p = counts[c] / counts[c].sum()
    mean[c] = p @ values
    std[c] = np.sqrt(max(p @ values**2 - mean[c]**2, 1 / 255**2))
  return mean.astype(np.float32), std.astype(np.float32)


def stats_sample(n: int, labels: np.ndarray | None, count: int) -> np.ndarray:
  """Sorted indices of the normalization sample of a train split of ``n`` examples.

  ``k = min(n, count)`` indices ``arange(k) * n // k`` into the class-major order (stable
  sort by ``labels``; None: the split's own order): each class contributes in proportion
  to its size, spread evenly over its files. (Even spacing directly over the interleaved
  order would alias with the class rotation: a stride of 5 over 10 interleaved classes
  would only ever see 2 classes.)
  """
  k = min(n, count)
  if labels is None:
    return np.arange(k) * n // k
  return np.sort(np.argsort(labels, kind="stable")[np.arange(k) * n // k])


def interleave(labels: np.ndarray) -> np.ndarray:
  """Permutation putting examples in round-robin class order, stable within a class."""
  labels = np.asarray(labels)
  by_class = np.argsort(labels, kind="stable")
  sorted_labels = labels[by_class]
  rank = np.empty(len(labels), np.int64)
  rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
  return np.lexsort((labels, rank))


def canonical(classes: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
  """Paths and int32 labels (label i: the i-th class) of ``{class: sorted paths}`` in the
  canonical order: classes interleaved round-robin, source order within a class."""
  paths = [p for files in classes.values() for p in files]
  labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(f) for f in classes.values()])
  order = interleave(labels)
  return [paths[i] for i in order], labels[order]


def take(n: int, count: int) -> int:
  """How many of ``n`` examples ``count`` keeps (0: all; more than ``n``: all)."""
  if count < 0:
    raise ValueError(f"example count {count} is negative; pass 0 for all examples or a "
                     "positive count")
  return n if count == 0 else min(count, n)


def pad_rows(indices: np.ndarray, width: int) -> np.ndarray:
  """int64 indices as (ceil(n / width), width) rows, the last padded with -1: the rows of
  eval batches, whose ``mask`` is ``row >= 0``."""
  rows = -(-len(indices) // width)
  out = np.full(rows * width, -1, np.int64)
  out[:len(indices)] = indices
  return out.reshape(rows, width)
