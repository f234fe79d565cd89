"""A generated image folder, for trying the input pipelines and training offline.

``write_image_folder`` writes ``<root>/train/<class>/*.JPEG`` and ``<root>/<eval>/<class>/*``
JPEGs of random sizes (ImageNet's layout with ``eval="val"``; the in-memory pipeline's with
``eval="test"`` and one fixed size). Each class is a colour: its images are that colour plus
noise and a random gradient, so a network can learn them, and tests can check accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: str | Path, *, classes: int = 4, train_per_class: int = 32,
                       eval_per_class: int = 8, sizes: Sequence[int] = (48, 96),
                       eval_folder: str = "val", seed: int = 0) -> Path:
  """Writes the folder; returns ``root``.

  Args:
    root: where to write (created; existing files of the same names are overwritten).
    classes: number of classes, named ``n0000000``, ``n0000001``, ... (WordNet-id style).
    train_per_class, eval_per_class: images per class in each split.
    sizes: ``(min, max)`` side in pixels (each side drawn independently, so aspect ratios
      vary), or one size for square images of that side.
    eval_folder: ``"val"`` (ImageNet layout: streamed) or ``"test"`` (held in memory).
    seed: the images are a function of it.
  """
  if classes < 1 or train_per_class < 1 or eval_per_class < 1:
    raise ValueError(f"classes={classes}, train_per_class={train_per_class}, "
                     f"eval_per_class={eval_per_class}: each must be >= 1")
  low, high = (sizes[0], sizes[-1])
  if not 8 <= low <= high:
    raise ValueError(f"sizes={tuple(sizes)} is not accepted: use (min, max) with 8 <= min <= max")
  rng = np.random.default_rng(seed)
  colours = rng.uniform(40, 215, (classes, 3))
  root = Path(root)
  for split, count in (("train", train_per_class), (eval_folder, eval_per_class)):
    for c in range(classes):
      folder = root / split / f"n{c:07d}"
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        h, w = rng.integers(low, high + 1, 2)
        ramp = np.linspace(-30, 30, w)[None, :, None] * rng.uniform(-1, 1)
        pixels = colours[c] + ramp + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"n{c:07d}_{i}.JPEG", quality=90)
  return root
