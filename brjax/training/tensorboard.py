"""TensorBoard summaries of a run, written with tensorboardX (``--tensorboard``).

Scalars every epoch: losses, BR_W, BR_A, accuracies, learning rate, every step size, and
the reference package's BR metrics (``br/<kind>/<metric>``: layer averages of effectiveness,
pct_near, mean_distance, mse; ``effectiveness/<kind>/<layer>`` per layer).
Histograms every few epochs: float weights, quantized weights, pre-quantization
activations. Events go to ``<workdir>/tensorboard``; ``tensorboard --logdir <workdir>``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from flax import traverse_util
import jax
import numpy as np

if TYPE_CHECKING:
  from tensorboardX import SummaryWriter

from brjax.quant import lsq as quant
from brjax.quant import sites, step_size
from brjax.quant.partitioning import unbox

SCALARS = ("train_acc", "test_acc", "train_loss", "test_loss", "ce", "br_w", "br_a", "lr")


def create_writer(workdir: str) -> SummaryWriter:
  # Imported here: tensorboardX imports PyTorch when it is installed (~1.4 s at every start
  # of a run, with or without --tensorboard).
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))


def _name(path: tuple[str, ...]) -> str:
  return "/".join(path)


def write_scalars(writer: SummaryWriter, epoch: int, metrics: dict, params: Any) -> None:
  """The epoch's metrics (see ``SCALARS``) and every step size as ``alpha/<layer>`` (an
  input's as ``input_alpha/<layer>``; per-channel step sizes as their mean; a ``log`` step
  size as ``alpha = exp(theta)``), and the step-size health (``health/<kind>/<key>``)."""
  for key in SCALARS:
    if metrics.get(key) is not None:  # BR terms are None when not computed
      writer.add_scalar(f"metrics/{key}", metrics[key], epoch)
  for kind, h in (metrics.get("step_size_health") or {}).items():
    for key in ("min_ratio", "clipped_top", "clipped_top_max"):
      writer.add_scalar(f"health/{kind}/{key}", h[key], epoch)
  flat = step_size.linear_params(traverse_util.flatten_dict(jax.device_get(params)))
  for path, value in flat.items():
    if quant.is_alpha_path(path):
      writer.add_scalar(f"{path[-1]}/{_name(path[:-1])}", float(np.mean(value)), epoch)
  write_reference_metrics(writer, epoch, metrics)


def write_reference_metrics(writer: SummaryWriter, epoch: int, metrics: dict) -> None:
  """The reference's BR metrics of an epoch's ``metrics`` (its ``"quant"`` entry, see
  ``brjax.quant.metrics.reference_br_metrics``): layer averages and per-layer effectiveness."""
  from brjax.quant import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  per_layer = metrics.get("quant") or {}
  for kind, values in metrics_lib.reference_summary(per_layer).items():
    for key, value in values.items():
      writer.add_scalar(f"br/{kind}/{key}", value, epoch)
  for kind in ("weights", "activations"):
    for layer, m in per_layer.get(kind, {}).items():
      if "effectiveness" in m:
        writer.add_scalar(f"effectiveness/{kind}/{layer}", float(np.asarray(m["effectiveness"])),
                          epoch)


def write_histograms(writer: SummaryWriter, epoch: int, params: Any, collection: Any) -> None:
  """Every kernel, the fake-quantized kernels and the pre-quantization activations.

  ``collection`` is the ``"quant"`` collection of one eval-mode forward pass
  (``metrics.recorded_sites``): each quantized kernel is shown on its own range and grid.
  """
  for path, kernel in traverse_util.flatten_dict(jax.device_get(unbox(params))).items():
    if path[-1] == "kernel":
      writer.add_histogram(f"weights/{_name(path[:-1])}", np.asarray(kernel), epoch)
  recorded = jax.device_get(collection)
  for layer, site in sites.named(recorded, (sites.WEIGHT,)).items():
    values, alpha, qn = sites.grouped(site)
    q = quant.lsq_quantize(values, alpha, qn, qn + site.levels - 1, 1.0)
    writer.add_histogram(f"quantized_weights/{layer}", np.asarray(q), epoch)
  for name, site in sites.named(recorded, (sites.INPUT, sites.OUTPUT)).items():
    writer.add_histogram(f"activations/{name}", np.asarray(site.values), epoch)
