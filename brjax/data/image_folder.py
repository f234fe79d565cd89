"""The in-memory pipeline's image folders: a folder, or a ``.tar.gz`` of one, decoded.

`read_image_folder` lists ``train/<class>/<image>`` and ``test/<class>/<image>`` (optionally
inside one top-level folder) in a folder or a gzip tar (read in memory, never extracted),
puts them in the canonical order (`brjax.data.image_data.canonical`) and decodes, with a thread
pool, only the images a `brjax.data.input_pipeline.Dataset` needs: the first ``train_examples``,
the normalization sample and the first ``test_examples``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import concurrent.futures
import os
from pathlib import Path
import tarfile
import zlib

import numpy as np

from brjax.data.image_data import (
  IMAGE_EXTENSIONS,
  canonical,
  open_image,
  reason,
  stats_sample,
  take,
)

SPLITS = ("train", "test")

Split = tuple[np.ndarray, np.ndarray]  # uint8 images (N, H, W, 3), int32 labels (N,)


def read_image_folder(data_dir: str, train_examples: int, test_examples: int,
                      stats_examples: int) -> tuple[Split, Split, np.ndarray, list[str]]:
  """``(train, test, sample, class_names)`` of an image folder or ``.tar.gz`` of one.

  ``train`` and ``test`` are the first ``train_examples`` and ``test_examples`` (0: all)
  of the canonical order; ``sample`` the ``stats_examples`` train images of
  `image_data.stats_sample` (of the FULL train split), for the normalization statistics.

  Raises:
    FileNotFoundError: ``data_dir`` does not exist.
    ValueError: not a folder or archive, bad layout, unreadable image, images of
      different sizes (one line naming the folder or file).
  """
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
    raise ValueError(f"unsupported data_dir {data_dir}: expected a folder or a .tar.gz/.tgz "
                     "archive "
                     "holding train/<class>/<image> and test/<class>/<image>")
  if not files:
    raise ValueError(f"data_dir {data_dir} holds no files; expected train/<class>/<image> and "
                     "test/<class>/<image>")
  prefix = _find_root(dirs, data_dir)
  classes = {s: _split_classes(dirs, files, prefix + s, where) for s in SPLITS}
  if list(classes["train"]) != list(classes["test"]):
    diff = sorted(set(classes["train"]) ^ set(classes["test"]))
    raise ValueError(f"class folders differ between {where(prefix + 'train')} and "
                     f"{where(prefix + 'test')}: {diff} are in only one of them")
  train_paths, train_labels = canonical(classes["train"])
  test_paths, test_labels = canonical(classes["test"])
  n_train = take(len(train_paths), train_examples)
  n_test = take(len(test_paths), test_examples)
  sample = stats_sample(len(train_labels), train_labels, stats_examples)
  needed = np.union1d(np.arange(n_train), sample)  # sorted, starts with 0..n_train-1
  paths = [train_paths[i] for i in needed] + test_paths[:n_test]
  images = _decode_images(paths, read, where)
  train_images, test_images = images[:n_train], images[len(needed):]
  return ((train_images, train_labels[:n_train]), (test_images, test_labels[:n_test]),
          images[np.searchsorted(needed, sample)], list(classes["train"]))


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
  missing = [s for s in SPLITS if prefix + s not in dirs]
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
    raise ValueError(f"{where(split)} has no class folders; expected "
                     f"{where(split)}/<class>/<image>")
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
  """Decodes images (RGB, all one size; `open_image`) with a thread pool -> uint8 (N, H, W, 3)."""

  def decode(p: str) -> np.ndarray:
    try:
      data = read(p)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot decode image {where(p)}: {reason(e)}") from e
    return np.asarray(open_image(data, where(p)))

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
