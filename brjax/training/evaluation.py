"""Quantized evaluation: over a test split, and of a finished run's checkpoint.

There is no float path: the model evaluates as it trains, with quantized weights and
activations (``brjax.training.steps.eval_step``, jitted once by
``brjax.training.parallel.jit_eval_step``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from brjax.data import datasets, streaming
from brjax.models import cifar as models
from brjax.training import checkpoint, history
from brjax.training.parallel import Topology, device_batches, jit_eval_step


def evaluate(eval_fn: Callable, variables: dict, ds: datasets.Dataset,
             batch_size: int, topology: Topology,
             check: Callable[[], None] = lambda: None) -> dict:
  """Quantized test accuracy (%), mean loss and image count over the whole test split.

  ``variables`` is ``{"params", "batch_stats"}``; ``eval_fn`` is ``jit_eval_step``'s.
  ``check()`` runs after every batch (it may raise to stop).
  """
  sums = []
  for batch in device_batches(streaming.eval_batches(ds, batch_size), topology,
                              local=datasets.is_streamed(ds)):
    sums.append(eval_fn(variables, batch))
    check()
  total = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
  return {"test_acc": 100.0 * total["correct"] / total["count"],
          "test_loss": total["loss"] / total["count"], "test_count": int(total["count"])}


def evaluate_run(workdir: str, *, prefer: str = "best", data_dir: str | None = None,
                 batch_size: int | None = None, devices=None) -> dict:
  """Evaluates a run's checkpoint on its test split, as the run itself evaluated it.

  The model, bit widths and test split come from the checkpoint's config; the input
  normalization from its meta (the run's own statistics), so the result reproduces the
  ``test_acc`` the run logged for that epoch (up to float summation order).

  Args:
    workdir: the ``--workdir`` of a ``scripts/train.py`` run.
    prefer: ``"best"`` or ``"latest"`` checkpoint (see ``checkpoint.restore_pretrained``).
    data_dir: the run's images, if not at the run's ``--data_dir`` any more.
    batch_size: evaluation batch (default: the run's; any value gives the same accuracy).
    devices: the devices to shard the batch over (default: all).

  Returns:
    ``{"test_acc", "test_loss", "test_count", "epoch", "logged_test_acc"}``; the last is
    the run's logged ``test_acc`` of that epoch (None if its metrics.jsonl lacks it).

  Raises:
    CheckpointError: no readable checkpoint, or a meta not written by ``train_and_evaluate``.
    ValueError: the data's classes differ from the run's.
    FileNotFoundError: no data at ``data_dir``.
  """
  variables, meta = checkpoint.restore_pretrained(workdir, prefer)
  config = meta.get("config")
  needed = ("model", "bits_w", "bits_a", "batch_size", "test_examples")
  if not isinstance(config, dict) or any(k not in config for k in needed):
    raise checkpoint.CheckpointError(f"the checkpoint meta in {workdir} has no config with "
                                     f"{', '.join(needed)}: it was not written by "
                                     "brjax.training.train")
  data = meta.get("data")
  ds = datasets.load(config, data_dir=data_dir, train_examples=1,
                     stats=datasets.stored_stats(meta))  # the run's own, the one source
  if data and list(data["class_names"]) != list(ds.class_names):
    raise ValueError(f"the classes of {data_dir or config.get('data_dir')} "
                     f"({list(ds.class_names)}) differ from the run's "
                     f"({data['class_names']}): pass the run's data")
  model = models.from_run_config(config, ds.num_classes, ds.image_size)
  topology = Topology.create(devices)
  batch_size = batch_size or config["batch_size"]
  batch_size = max(batch_size - batch_size % topology.mesh.size, topology.mesh.size)
  result = evaluate(jit_eval_step(topology, model.apply),
                    jax.device_put(variables, topology.replicated), ds, batch_size, topology)
  result["epoch"] = meta.get("epoch")
  logged = [m for m in history.read_history(workdir, missing_ok=True)
            if m.get("epoch") == result["epoch"]]
  result["logged_test_acc"] = logged[-1].get("test_acc") if logged else None
  return result
