"""The data sources of `brjax.data.streaming`: random access to the images of one split.

* `FolderSource`: an image folder in ImageNet layout, ``<root>/train/<class>/<image>``
  and ``<root>/val/<class>/<image>`` (or ``validation/`` or ``test/``), found by
  `find_layout` and listed by `list_split`;
* `TfdsSource`: a prepared tensorflow-datasets dataset, read through
  ``tfds.data_source`` (its ``array_record`` files; no TensorFlow needed).

Sources give encoded images; `brjax.data.image_data.open_image` decodes them, with one-line
errors naming the file or record.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from brjax.data.image_data import IMAGE_EXTENSIONS, reason

EVAL_FOLDERS = ("val", "validation", "test")  # first one present is the eval split
TFDS_EVAL_SPLITS = ("validation", "test")


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
      raise ValueError(f"cannot read {where}: {reason(e)}") from e
    name = record.get("file_name")
    if name is not None:
      where += f" ({name.decode() if isinstance(name, bytes) else name})"
    return image, label, where


class Head:
  """The first ``count`` examples of a source."""

  def __init__(self, source: ImageSource, count: int):
    self.source, self.count = source, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int):
    if not 0 <= index < self.count:
      raise IndexError(f"index {index} out of range [0, {self.count})")
    return self.source[index]


# ------------------------------------------------------------------------ folders


def find_layout(root: Path) -> tuple[Path, str]:
  """``(folder holding train/, name of the eval folder)`` of an ImageNet-layout folder."""
  layout = layout_or_none(root)
  if layout is None:
    raise ValueError(f"data_dir {root} has no train/ folder beside a val/, validation/ or "
                     "test/ folder; expected train/<class>/<image> and "
                     "val/<class>/<image>, optionally inside one top-level folder")
  return layout


def layout_or_none(root: Path) -> tuple[Path, str] | None:
  """`find_layout`'s answer, or None where ``root`` is not in ImageNet layout."""
  candidates = [root]
  if not (root / "train").is_dir():
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))]
    candidates = subdirs if len(subdirs) == 1 else []
  for base in candidates:
    found = next((e for e in EVAL_FOLDERS if (base / e).is_dir()), None)
    if (base / "train").is_dir() and found:
      return base, found
  return None


def holds_tfds(path: Path, dataset: str) -> bool:
  """Whether ``path/<dataset>/[config/]version/dataset_info.json`` exists."""
  folder = path / dataset.split(":")[0].split("/")[0]
  return folder.is_dir() and any(next(folder.glob(p), None) for p in
                                 ("*/dataset_info.json", "*/*/dataset_info.json"))


def larger_than(folder: Path, limit: int) -> bool:
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


def list_split(split_dir: Path) -> dict[str, list[str]]:
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
                   and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
      raise ValueError(f"class folder {split_dir / cls} has no images (accepted extensions: "
                       f"{', '.join(IMAGE_EXTENSIONS)})")
    out[cls] = [f"{cls}/{n}" for n in names]
  return out
