"""A run's data, held in memory or streamed: one choice, one interface for the loop.

``brjax.data.input_pipeline`` holds small datasets in host memory (CIFAR from a ``.tar.gz``, a
folder with ``test/``, tfds); ``brjax.data.streaming`` reads large ones with Grain worker
processes (ImageNet-layout folders with ``val/``, prepared tfds datasets, folders over
1 GiB). :func:`load` makes the choice (``--input=auto|memory|streaming``, see
``streaming.use_streaming``); the training loop and evaluation then use ``streaming``'s
batch functions, which take either kind (an in-memory dataset gives the in-memory batches).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
from typing import Any

import numpy as np

from brjax.data import input_pipeline, streaming
from brjax.training import recipes

Dataset = input_pipeline.Dataset | streaming.StreamingDataset


def data_workers(requested: int | None) -> int:
  """Grain worker processes: ``requested``, or (None) half the CPUs, at most 8."""
  if requested is not None:
    return requested
  return min(8, max(1, (os.cpu_count() or 2) // 2))


def load(config: Any, *, data_dir: str | None = None, train_examples: int | None = None,
         test_examples: int | None = None, stats: dict | None = None) -> Dataset:
  """The data of a run's config (a ``Config`` or a checkpoint's config dict), normalized as
  its recipe says.

  Args:
    config: ``dataset``, ``data_dir``, ``train_examples``, ``test_examples``,
      ``normalization`` and, for streaming, ``input``, ``image_size``, ``data_workers``.
    data_dir, train_examples, test_examples: overrides of the config's.
    stats: ``{"mean", "std"}`` of a saved run (its checkpoint meta): used instead of
      measuring them again (a streamed dataset measures over 10,000 decoded images).
  """
  get = (config.get if isinstance(config, dict) else
         lambda name, default=None: getattr(config, name, default))
  data_dir = data_dir if data_dir is not None else get("data_dir")
  train_examples = get("train_examples", 0) if train_examples is None else train_examples
  test_examples = get("test_examples", 0) if test_examples is None else test_examples
  dataset, normalization = get("dataset", "cifar10"), get("normalization") or "dataset"
  if streaming.use_streaming(dataset, data_dir, get("input") or "auto"):
    if normalization == "imagenet":
      stats = {"mean": recipes.IMAGENET_MEAN, "std": recipes.IMAGENET_STD}
    stats = {k: np.asarray(stats[k], np.float32) for k in ("mean", "std") if stats}
    ds = streaming.load(dataset, data_dir, image_size=get("image_size") or 224,
                        train_examples=train_examples, test_examples=test_examples,
                        worker_count=data_workers(get("data_workers")), **stats)
  else:
    ds = input_pipeline.load_dataset(dataset, data_dir, train_examples, test_examples)
    if stats:
      ds = dataclasses.replace(ds, mean=np.asarray(stats["mean"], np.float32),
                               std=np.asarray(stats["std"], np.float32))
  return recipes.normalize_dataset(ds, normalization)


def stored_stats(meta: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
  """The input normalization a run trained with, as its checkpoint meta stored it.

  ``meta["data"]`` (written with every checkpoint by ``brjax.training.train``) holds the
  ``mean`` and ``std`` the run normalized its images with, its recipe's constants
  (``--normalization=reference``) included: the one source for every reader of a saved
  run (evaluation, export, analysis), which must not measure them again.

  Returns:
    ``{"mean", "std"}``, float32 ``(C,)``; None for a meta written before they were stored.

  Raises:
    ValueError: stored statistics that are not finite means and positive stds of one
      length.
  """
  data = meta.get("data")
  if not isinstance(data, Mapping) or "mean" not in data or "std" not in data:
    return None
  mean, std = (np.asarray(data[k], np.float32) for k in ("mean", "std"))
  if (mean.ndim != 1 or mean.shape != std.shape or not np.all(np.isfinite(mean))
      or not np.all(np.isfinite(std) & (std > 0))):
    raise ValueError(f"the checkpoint meta's input normalization mean={data['mean']} "
                     f"std={data['std']} is not accepted: expected finite means and positive "
                     "stds, one per channel")
  return {"mean": mean, "std": std}


def normalized_as_run(ds: Dataset, config: Mapping[str, Any],
                      meta: Mapping[str, Any]) -> Dataset:
  """``ds`` with the input normalization of the saved run (``config`` and ``meta`` of its
  checkpoint): the statistics it stored (:func:`stored_stats`), else (a meta from before
  they were stored) ``ds``'s own, measured as training measures them, under the run's
  recipe (``config["normalization"]``)."""
  stats = stored_stats(meta)
  if stats is not None:
    return dataclasses.replace(ds, **stats)
  return recipes.normalize_dataset(ds, config.get("normalization") or "dataset")


def is_streamed(ds: Dataset) -> bool:
  """Whether batches of ``ds`` hold this process's rows only (``streaming``) rather than
  whole global batches (``input_pipeline``)."""
  return isinstance(ds, streaming.StreamingDataset)
