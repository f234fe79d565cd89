"""ImageNet's transforms of one decoded image, as `brjax.data.streaming` applies them.

Training: the Inception crop (random area in [0.08, 1] of the image, aspect ratio
log-uniform in [3/4, 4/3]) resized to S x S, and a horizontal flip with p = 0.5.
Evaluation: the shorter side resized to S / 0.875 and the central S x S.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CROP_FRACTION = 0.875  # eval: resize the shorter side to S / 0.875, keep the central S x S
AREA_RANGE = (0.08, 1.0)  # Inception crop: fraction of the image area
RATIO_RANGE = (3 / 4, 4 / 3)  # Inception crop: aspect ratio (width / height)
CROP_ATTEMPTS = 10


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
