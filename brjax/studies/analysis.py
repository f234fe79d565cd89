"""Analysis of trained runs (``scripts/analyze.py``): load a run, recompute its metrics, plot.

:func:`analyze` restores each run's checkpoint, runs the model on the first test images of
the run's data (normalized with the statistics the run stored in its checkpoint, as it
trained), and writes into one folder:

* ``weights_hist.png``, ``activations_hist.png``: one histogram per quantized layer, its
  levels drawn in (``brjax.studies.plots.histograms_figure``);
* ``br_curves.png``: BR_W, BR_A and test accuracy over epochs;
* ``alpha_curves.png``: every layer's step size over epochs (only if the history has the
  per-epoch ``"quant"`` entries of ``brjax.quant.metrics``);
* ``metrics.md``: per-layer alpha, mse, near_frac, occupancy and the reference package's BR
  metrics, per run.

Runs are checked first (:func:`read_run_history`, no JAX); JAX, Flax and orbax are imported
when a run is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import os
from typing import Any

from brjax.quant import bits
from brjax.studies import plots
from brjax.training import history
from brjax.training.config import br_lambdas


def read_run_history(workdir: str, flag: str = "workdir") -> list[dict]:
  """The history of the run in ``workdir``, after checking that it is a training run's
  workdir with at least one epoch and a checkpoint.

  Args:
    workdir: the run's folder.
    flag: the command-line flag that named it, for the error message.

  Raises:
    ValueError: one line naming ``--<flag>=<workdir>`` (or the bad line of metrics.jsonl).
  """
  if not os.path.isdir(workdir):
    raise ValueError(f"--{flag}={workdir} is not accepted: no such folder; use the --workdir "
                     "of a training run")
  if not os.path.isfile(history.metrics_path(workdir)):
    raise ValueError(f"--{flag}={workdir} is not accepted: it has no metrics.jsonl; use the "
                     "--workdir of a training run")
  records = history.read_history(workdir)
  if not records:
    raise ValueError(f"--{flag}={workdir} is not accepted: its metrics.jsonl is empty")
  if not history.has_checkpoint(workdir):
    raise ValueError(f"--{flag}={workdir} is not accepted: it has no checkpoint in "
                     "checkpoints/best or checkpoints/latest; use the --workdir of a run that "
                     "saved one")
  return records


def run_label(config: dict, workdir: str) -> str:
  """``"LSQ+BR (lsq_br_s0)"``, ``"LSQ (...)"`` or ``"float (...)"``: the kind of training,
  and the workdir's name."""
  name = os.path.basename(os.path.normpath(workdir))
  bits_w = config.get("bits_w", bits.FLOAT_BITS)
  bits_a = config.get("bits_a", bits.FLOAT_BITS)
  if bits_w == bits.FLOAT_BITS and bits_a == bits.FLOAT_BITS:
    return f"float ({name})"
  br = any(lam > 0 for lam in br_lambdas(config))  # the terms the run computed
  br = br and config.get("warmup_epochs", 0) < config.get("epochs", 0)
  return f"{'LSQ+BR' if br else 'LSQ'} ({name})"


@contextlib.contextmanager
def recording_call_order(order: list[str]) -> Iterator[None]:
  """Within it, appends the path of every Flax module called (pre-order: forward order)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def record(f, args, kwargs, context):
    if context.method_name == "__call__":
      order.append("/".join(context.module.path))
    return f(*args, **kwargs)

  with nn.intercept_methods(record):
    yield


def load_run(workdir: str, flag: str, records: list[dict], data_dir: str | None,
             examples: int, cache: dict, prefer: str = "latest") -> dict:
  """Restores a run, recomputes its metrics on the first test images, keeps the tensors.

  Args:
    workdir, flag: the run's folder and the flag that named it (for errors).
    records: its history (:func:`read_run_history`).
    data_dir: test images to use instead of the run's own ``--data_dir`` (None: its own).
    examples: how many test images the activations are computed on.
    cache: shared between the runs of one analysis: data and compiled functions.
    prefer: ``"latest"`` or ``"best"`` checkpoint.

  Returns:
    A run as ``brjax.studies.plots`` takes it: ``workdir``, ``label``, ``config``, ``meta``,
    ``history``, ``quant`` (``brjax.quant.metrics.quant_metrics`` as numpy), ``weights`` and
    ``activations`` (layer -> 1-D numpy values), ``order`` (module paths in forward order),
    ``data_dir``, ``examples``.

  Raises:
    ValueError: an unreadable checkpoint, one without a run config, or one that does not
      fit the data.
  """
  # pylint: disable=g-import-not-at-top
  import flax
  import jax
  import numpy as np

  from brjax.data import datasets, input_pipeline
  from brjax.models import cifar as models
  from brjax.quant import metrics, sites
  from brjax.training import checkpoint

  try:
    variables, meta = checkpoint.restore_pretrained(workdir, prefer)
  except checkpoint.CheckpointError as e:
    raise ValueError(f"--{flag}={workdir}: {e}") from None
  config = meta.get("config")
  if not isinstance(config, dict) or not {"model", "bits_w", "bits_a"} <= set(config):
    raise ValueError(f"--{flag}={workdir} is not accepted: its checkpoint meta has no config "
                     "with model, bits_w and bits_a (written by brjax.training.train)")
  data_dir = data_dir if data_dir is not None else config.get("data_dir")
  data_key = (config.get("dataset", "cifar10"), data_dir)
  if data_key not in cache:
    cache[data_key] = input_pipeline.load_dataset(*data_key, train_examples=1,
                                                  test_examples=examples)
  # Normalized as the run was: the statistics it stored (datasets.normalized_as_run).
  try:
    ds = datasets.normalized_as_run(cache[data_key], config, meta)
  except ValueError as e:
    raise ValueError(f"--{flag}={workdir}: {e}") from None
  batch_key = data_key + (tuple(ds.mean.tolist()), tuple(ds.std.tolist()))
  if batch_key not in cache:
    cache[batch_key] = next(input_pipeline.eval_batches(ds, examples))
  num_classes, batch = ds.num_classes, cache[batch_key]

  model_key = (config["model"], config["bits_w"], config["bits_a"], config.get("clip"),
               num_classes, config.get("width"), config.get("per_channel"),
               config.get("alpha_param"), config.get("first_last_bits"),
               config.get("act_signs"), batch["image"].shape[1])
  if model_key not in cache:
    model = models.from_run_config(config, num_classes, batch["image"].shape[1])
    order: list[str] = []

    def compute(variables, images, mask):
      # The forward pass runs even for float activations: tracing it records the layer
      # order (once, when jit traces), and XLA drops it from the compiled code if unused.
      del order[:]
      with recording_call_order(order):
        recorded = metrics.recorded_sites(model, variables, images)
      return metrics.collect_metrics(recorded, mask=mask), recorded

    cache[model_key] = (jax.jit(compute), order)
  compute, order = cache[model_key]
  try:
    quant, recorded = jax.device_get(compute(variables, batch["image"], batch["mask"]))
  except flax.errors.ScopeParamShapeError as e:
    reason = str(e).splitlines()[0]
    raise ValueError(f"--{flag}={workdir}: its checkpoint does not fit {config['model']} on "
                     f"the data of {data_dir} ({num_classes} classes): {reason[:200]}") from None

  weights = {name: np.asarray(site.values).ravel()
             for name, site in sites.named(recorded, (sites.WEIGHT,)).items()}
  mask = np.asarray(batch["mask"])
  activations = {name: np.asarray(site.values)[mask].ravel()
                 for name, site in sites.named(recorded, (sites.INPUT, sites.OUTPUT)).items()}
  return {"workdir": workdir, "label": run_label(config, workdir), "config": config,
          "meta": meta, "history": records, "quant": quant, "weights": weights,
          "activations": activations, "order": list(order), "data_dir": data_dir,
          "examples": int(mask.sum())}


def write_outputs(runs: list[dict], out: str, note: Callable[[str], None]) -> list[str]:
  """Writes every figure and metrics.md of ``runs`` into ``out``; returns the paths written.

  A figure with nothing to show (no quantized weights, no per-epoch step sizes) is left out
  and ``note`` says why.
  """
  os.makedirs(out, exist_ok=True)
  written = []
  for kind in ("weights", "activations"):
    fig = plots.histograms_figure(runs, kind)
    if fig is None:
      note(f"no quantized {kind}: {kind}_hist.png not written")
    else:
      written.append(plots.save(fig, os.path.join(out, f"{kind}_hist.png")))
  written.append(plots.save(plots.br_curves_figure(runs), os.path.join(out, "br_curves.png")))
  fig = plots.alpha_curves_figure(runs)
  if fig is None:
    note('metrics.jsonl has no per-epoch "quant" entries: alpha_curves.png not written')
  else:
    written.append(plots.save(fig, os.path.join(out, "alpha_curves.png")))
  path = os.path.join(out, "metrics.md")
  with open(path, "w") as f:
    f.write(plots.metrics_markdown(runs))
  written.append(path)
  return written


def analyze(workdirs: list[tuple[str, str]], histories: list[list[dict]], out: str,
            data_dir: str | None, examples: int, note: Callable[[str], None],
            prefer: str = "latest") -> list[str]:
  """Loads every run and writes every output into ``out``; returns the paths written.

  Args:
    workdirs: ``(flag, workdir)`` per run, e.g. ``[("workdir", a), ("compare", b)]``.
    histories: each run's records (:func:`read_run_history`).
    out: the output folder (created).
    data_dir, examples, prefer: as :func:`load_run`.
    note: receives one line per output left out.

  Raises:
    ValueError: a run that cannot be loaded (one line).
  """
  cache: dict[Any, Any] = {}
  runs = [load_run(w, flag, h, data_dir, examples, cache, prefer)
          for (flag, w), h in zip(workdirs, histories)]
  labels = [run["label"] for run in runs]
  if len(set(labels)) < len(labels):  # workdirs of one name: add the folders they are in
    for run in runs:
      run["label"] += f" [{os.path.dirname(os.path.abspath(run['workdir']))}]"
  return write_outputs(runs, out, note)
