"""Shows how a trained run's weights and activations sit on their quantization grids.

    python scripts/analyze.py --workdir=checkpoints/<run> [--compare=checkpoints/<other run>]

Reads ``<workdir>/metrics.jsonl`` and the run's latest checkpoint (``--checkpoint=best``: its
best), runs the
model on the first ``--examples`` test images of the run's data, and writes into ``--out``
(default ``<workdir>/analysis/``):

* ``weights_hist.png``: one histogram per quantized kernel, its levels as vertical lines;
* ``activations_hist.png``: the same for the pre-quantization activations;
* ``br_curves.png``: BR_W, BR_A and test accuracy over epochs;
* ``alpha_curves.png``: every layer's step size over epochs (only if ``metrics.jsonl`` has
  the per-epoch ``"quant"`` entries of ``brjax.metrics``);
* ``metrics.md``: per-layer alpha, mse, near_frac and occupancy (``brjax.metrics``).

With ``--compare`` both runs are drawn in every plot (labelled by kind and workdir name,
e.g. ``LSQ (lsq_s0)`` vs ``LSQ+BR (lsq_br_s0)``) and ``metrics.md`` holds one table per run.
Bad input stops with a one-line error (exit 2); the paths written are printed, one per line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any, Callable, Iterable, Sequence

from absl import flags
from absl import logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax import cli  # pylint: disable=g-import-not-at-top

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The --workdir of a training run (required).",
                    flag_values=FLAGS)
flags.DEFINE_string("compare", None, "The --workdir of a second run to draw beside the first.",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/analysis).",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Test images to use instead of the run's own --data_dir.",
                    flag_values=FLAGS)
flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint to draw: "
                  "the end of training, or the best test accuracy.", flag_values=FLAGS)
flags.DEFINE_integer("examples", 256, "Number of test images for the activations.",
                     flag_values=FLAGS)

# Figure geometry: PNG size in pixels = figure size in inches * DPI (no tight bbox).
DPI = 100
PANEL_SIZE = (3.2, 2.4)  # inches per histogram subplot
MAX_COLS = 5  # histogram subplots per row
CURVES_SIZE = (12.0, 3.6)  # br_curves.png
ALPHA_CURVES_SIZE = (12.0, 4.4)  # alpha_curves.png
HIST_BINS = 100
RANGE_SAMPLE = 100_000  # elements sampled to pick a histogram's x-range
MAX_LEVEL_LINES = 64  # levels beyond this (7-8 bits) are not drawn
RUN_COLORS = ("tab:blue", "tab:orange")
RUN_STYLES = ("-", "--")
FLOAT_BITS = 32


def hist_figsize(num_panels: int) -> tuple[float, float]:
  """Figure size (inches) of a grid of ``num_panels`` histograms, ``MAX_COLS`` per row."""
  cols = max(1, min(num_panels, MAX_COLS))
  rows = max(1, math.ceil(num_panels / cols))
  return cols * PANEL_SIZE[0], rows * PANEL_SIZE[1]


# ------------------------------------------------------------------ run loading


def read_history(workdir: str, flag: str) -> list[dict]:
  """The epoch records of ``<workdir>/metrics.jsonl``; ValueError on a bad workdir."""
  if not os.path.isdir(workdir):
    raise ValueError(f"--{flag}={workdir} is not accepted: no such folder; use the --workdir "
                     "of a training run")
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"--{flag}={workdir} is not accepted: it has no metrics.jsonl; use the "
                     "--workdir of a training run")
  records = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {i} is not JSON ({e.msg}): expected one JSON object "
                         "per epoch") from None
      if not isinstance(record, dict) or "epoch" not in record:
        raise ValueError(f"{path} line {i} has no 'epoch': expected one JSON object per epoch")
      records.append(record)
  if not records:
    raise ValueError(f"--{flag}={workdir} is not accepted: its metrics.jsonl is empty")
  if not _has_checkpoint(workdir):
    raise ValueError(f"--{flag}={workdir} is not accepted: it has no checkpoint in "
                     "checkpoints/best or checkpoints/latest; use the --workdir of a run that "
                     "saved one")
  return records


def _has_checkpoint(workdir: str) -> bool:
  """Whether ``checkpoints/{best,latest}/<epoch>/`` (brjax.checkpoint's layout) exists."""
  for kind in ("best", "latest"):
    directory = os.path.join(workdir, "checkpoints", kind)
    if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
      return True
  return False


def run_label(config: dict, workdir: str) -> str:
  """``"LSQ+BR (lsq_br_s0)"``, ``"LSQ (...)"`` or ``"float (...)"``: the kind of training,
  and the workdir's name."""
  name = os.path.basename(os.path.normpath(workdir))
  bits_w, bits_a = config.get("bits_w", FLOAT_BITS), config.get("bits_a", FLOAT_BITS)
  if bits_w == FLOAT_BITS and bits_a == FLOAT_BITS:
    return f"float ({name})"
  br = ((config.get("lambda_w", 0) > 0 and bits_w != FLOAT_BITS) or
        (config.get("lambda_a", 0) > 0 and bits_a != FLOAT_BITS))
  br = br and config.get("warmup_epochs", 0) < config.get("epochs", 0)
  return f"{'LSQ+BR' if br else 'LSQ'} ({name})"


@contextlib.contextmanager
def recording_call_order(order: list[str]):
  """Within it, appends the path of every Flax module called (pre-order: forward order)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def record(f, args, kwargs, context):
    if context.method_name == "__call__":
      order.append("/".join(context.module.path))
    return f(*args, **kwargs)

  with nn.intercept_methods(record):
    yield


def sort_layers(names: Iterable[str], order: Sequence[str]) -> list[str]:
  """``names`` (``path`` or ``path#i``) in forward order, then by call; unknown paths last."""
  rank = {p: i for i, p in enumerate(order)}

  def key(name):
    path, _, call = name.partition("#")
    return rank.get(path, len(rank)), path, int(call) if call.isdigit() else -1

  return sorted(names, key=key)


def load_run(workdir: str, flag: str, history: list[dict], data_dir: str | None,
             examples: int, cache: dict, prefer: str = "latest") -> dict:
  """Restores a run, recomputes its metrics on the first test images, keeps the tensors.

  Returns a dict: ``label``, ``config``, ``meta``, ``history``, ``quant`` (the metrics of
  ``brjax.metrics.quant_metrics`` as numpy), ``weights`` and ``activations`` (layer -> 1-D
  numpy values), ``order`` (module paths in forward order), ``data_dir``, ``examples``.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from brjax import checkpoint, input_pipeline, metrics, models, sites

  try:
    variables, meta = checkpoint.restore_pretrained(workdir, prefer)
  except checkpoint.CheckpointError as e:
    raise ValueError(f"--{flag}={workdir}: {e}") from None
  config = meta.get("config")
  if not isinstance(config, dict) or not {"model", "bits_w", "bits_a"} <= set(config):
    raise ValueError(f"--{flag}={workdir} is not accepted: its checkpoint meta has no config "
                     "with model, bits_w and bits_a (written by brjax.train)")
  data_dir = data_dir if data_dir is not None else config.get("data_dir")
  data_key = (config.get("dataset", "cifar10"), data_dir)
  if data_key not in cache:
    ds = input_pipeline.load_dataset(*data_key, train_examples=1, test_examples=examples)
    batch = next(input_pipeline.eval_batches(ds, examples))
    cache[data_key] = (ds.num_classes, batch)
  num_classes, batch = cache[data_key]

  bits_w, bits_a = config["bits_w"], config["bits_a"]
  model_key = (config["model"], bits_w, bits_a, config.get("clip"), num_classes,
               config.get("width"), config.get("per_channel"))
  if model_key not in cache:
    model = models.from_run_config(config, num_classes)

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
          "meta": meta, "history": history, "quant": quant, "weights": weights,
          "activations": activations, "order": list(order), "data_dir": data_dir,
          "examples": int(mask.sum())}


def qrange(bits: int, signed: bool) -> tuple[int, int]:
  from brjax import quant  # pylint: disable=g-import-not-at-top
  return quant.qrange(bits, signed)


# ---------------------------------------------------------------------- figures


def _new_figure(size: tuple[float, float], margins: tuple[float, float] = (0.45, 0.5)):
  """A pyplot-free Figure of ``size`` inches; ``margins``: (top, bottom) in inches.

  Fixed margins rather than a layout engine: a grid of ~20 subplots lays out in a fraction
  of the time, and the size in pixels is exactly ``size * DPI``.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=size, dpi=DPI)
  width, height = size
  fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, top=1 - margins[0] / height,
                      bottom=margins[1] / height, wspace=0.3, hspace=0.5)
  return fig


def _few_ticks(ax, log_y: bool = False) -> None:
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
  if log_y:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(numticks=4))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
  else:
    ax.yaxis.set_major_locator(ticker.MaxNLocator(4))
  ax.tick_params(labelsize=6)


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=DPI, format="png")
  return path


def plot_histograms(runs: list[dict], kind: str, path: str) -> str | None:
  """``histograms_figure`` saved to ``path``; None (nothing written) if it is None."""
  fig = histograms_figure(runs, kind)
  return None if fig is None else _save(fig, path)


def histograms_figure(runs: list[dict], kind: str):
  """One subplot per layer of ``kind`` ("weights" or "activations"), runs overlaid.

  Each run's histogram is a step line (fraction of elements per bin) and its levels
  ``k * alpha`` are dotted vertical lines of the same color. Activations use a log y-axis
  (ReLU puts many exact zeros in the first bin). Returns None if no run has such layers.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  names = []
  for run in runs:
    names += [n for n in sort_layers(run[kind], run["order"]) if n not in names]
  if not names:
    return None
  signed = kind == "weights"
  fig = _new_figure(hist_figsize(len(names)), margins=(0.75, 0.55))
  cols = min(len(names), MAX_COLS)
  rows = math.ceil(len(names) / cols)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[len(names):]:
    ax.set_axis_off()
  for ax, name in zip(axes, names):
    present = [(i, run) for i, run in enumerate(runs) if name in run[kind]]
    lo, hi = math.inf, -math.inf
    grids = []
    for i, run in present:
      bits = run["config"]["bits_w" if signed else "bits_a"]
      qn, qp = qrange(bits, signed)
      alpha = float(run["quant"][kind][name]["alpha"])
      values = run[kind][name]
      grids.append((qn, qp, alpha))
      sample = values[::max(1, values.size // RANGE_SAMPLE)]  # the x-range needs no more
      sample = sample[np.isfinite(sample)]
      if math.isfinite(alpha):
        lo, hi = min(lo, (qn - 0.5) * alpha), max(hi, (qp + 0.5) * alpha)
      if sample.size:
        lo = min(lo, float(np.quantile(sample, 0.001)))
        hi = max(hi, float(np.quantile(sample, 0.999)))
    if not lo < hi:  # nothing finite (a diverged run), or one value and no grid
      lo, hi = (lo - 1.0, lo + 1.0) if math.isfinite(lo) else (-1.0, 1.0)
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    for (i, run), (qn, qp, alpha) in zip(present, grids):
      values = run[kind][name]
      counts, _ = np.histogram(values, edges)
      ax.stairs(counts / max(values.size, 1), edges, color=RUN_COLORS[i], lw=1.0,
                label=run["label"])
      if qp - qn + 1 <= MAX_LEVEL_LINES and math.isfinite(alpha):
        for k in range(qn, qp + 1):
          ax.axvline(k * alpha, color=RUN_COLORS[i], ls=":", lw=0.9)
    _few_ticks(ax, log_y=not signed)
    if ax.get_subplotspec().is_first_col():
      ax.set_ylabel("fraction (log scale)" if not signed else "fraction", fontsize=7)
    if len(runs) == 1:
      m = runs[0]["quant"][kind][name]
      ax.set_title(f"{name}\nalpha={float(m['alpha']):.3g}  near={float(m['near_frac']):.2f}",
                   fontsize=7)
    else:
      ax.set_title(name, fontsize=7)
  what = ("Weights: fraction of elements per bin" if signed else
          "Pre-quantization activations: fraction of elements per bin (log scale)")
  fig.suptitle(f"{what}; dotted lines: quantization levels", fontsize=9)
  if len(runs) > 1:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(runs), fontsize=7)
  return fig


def _epoch_axis(ax, last_epoch: int) -> None:
  """Whole epochs 1..last_epoch on the x-axis, whatever the curve (one point included)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_xlim(0.5, last_epoch + 0.5)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
  ax.set_xlabel("epoch", fontsize=8)
  ax.tick_params(labelsize=7)


def _last_epoch(runs: list[dict]) -> int:
  return max([r["epoch"] for run in runs for r in run["history"]] +
             [run["config"].get("epochs", 1) for run in runs])


def br_curves_figure(runs: list[dict]):
  """BR_W and BR_A per epoch of the BR phase (not computed in warmup), test accuracy per
  epoch, all on the run's whole epoch axis; the end of each run's warmup as a dotted line."""
  fig = _new_figure(CURVES_SIZE)
  axes = fig.subplots(1, 3)
  for i, run in enumerate(runs):
    for ax, key in zip(axes, ("br_w", "br_a", "test_acc")):
      records = [r for r in run["history"]
                 if key == "test_acc" or r.get("phase", "BR") == "BR"]
      values = [math.nan if r.get(key) is None else r[key] for r in records]
      ax.plot([r["epoch"] for r in records], values, RUN_STYLES[i], color=RUN_COLORS[i],
              marker="o", ms=4, label=run["label"])
      warmup = run["config"].get("warmup_epochs", 0)
      if 0 < warmup < run["config"].get("epochs", 0):
        ax.axvline(warmup + 0.5, color=RUN_COLORS[i], ls=":", lw=0.9)
        ax.text(warmup + 0.55, 0.98 - 0.06 * i, "BR →", color=RUN_COLORS[i], fontsize=7,
                va="top", transform=ax.get_xaxis_transform())
  for ax, title in zip(axes, ("BR_W (train mean, BR phase)", "BR_A (train mean, BR phase)",
                              "test accuracy (%)")):
    ax.set_title(title, fontsize=9)
    _epoch_axis(ax, _last_epoch(runs))
  axes[2].legend(fontsize=7)
  return fig


def plot_br_curves(runs: list[dict], path: str) -> str:
  return _save(br_curves_figure(runs), path)


def _alpha_curves(run: dict, kind: str) -> dict[str, tuple[list, list]]:
  """``{layer: (epochs, alphas)}`` of one kind from the history's ``"quant"`` entries."""
  curves = {}
  for record in run["history"]:
    for name, m in record.get("quant", {}).get(kind, {}).items():
      if isinstance(m, dict) and "alpha" in m:
        curves.setdefault(name, ([], []))
        curves[name][0].append(record["epoch"])
        curves[name][1].append(m["alpha"])
  return curves


def _layer_colorbar(fig, ax, cmap, names: list[str]) -> None:
  """A colour scale beside ``ax``: layer 1 (dark) to the last, its ends and middle named."""
  from matplotlib import cm, colors  # pylint: disable=g-import-not-at-top
  n = len(names)
  bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(0, max(n - 1, 1)), cmap), ax=ax,
                     fraction=0.05, pad=0.02)
  ticks = sorted({0, (n - 1) // 2, n - 1})
  bar.set_ticks(ticks, labels=[f"{i + 1}: {names[i]}" for i in ticks])
  bar.ax.tick_params(labelsize=6)
  bar.ax.set_title(f"layer ({n})", fontsize=7, loc="left")


def alpha_curves_figure(runs: list[dict]):
  """Each layer's step size per epoch from the ``"quant"`` entries; None if there are none.

  One panel for weights, one for activations; colour = layer in forward order (the colour
  scale names the first, middle and last), line style = run.
  """
  from matplotlib import colormaps, ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  if not any("quant" in r for run in runs for r in run["history"]):
    return None
  fig = _new_figure(ALPHA_CURVES_SIZE)
  # Room for the colour scales' layer names: right of each panel, and between the two.
  fig.subplots_adjust(wspace=0.9, right=1 - 1.9 / ALPHA_CURVES_SIZE[0])
  axes = fig.subplots(1, 2)
  cmap = colormaps["viridis"]
  for ax, kind in zip(axes, ("weights", "activations")):
    curves = [_alpha_curves(run, kind) for run in runs]
    names = []
    for run, run_curves in zip(runs, curves):
      names += [n for n in sort_layers(run_curves, run["order"]) if n not in names]
    for i, run_curves in enumerate(curves):
      for name, (epochs, alphas) in run_curves.items():
        color = cmap(names.index(name) / max(len(names) - 1, 1))
        ax.plot(epochs, alphas, RUN_STYLES[i], color=color, lw=1.0, marker=".", ms=3)
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
    ax.set_title(f"{kind} step sizes (alpha)", fontsize=9)
    _epoch_axis(ax, _last_epoch(runs))
    if names:
      _layer_colorbar(fig, ax, cmap, names)
  axes[0].legend([Line2D([], [], color="gray", ls=RUN_STYLES[i]) for i in range(len(runs))],
                 [run["label"] for run in runs], fontsize=7)
  return fig


def plot_alpha_curves(runs: list[dict], path: str) -> str | None:
  fig = alpha_curves_figure(runs)
  return None if fig is None else _save(fig, path)


# ------------------------------------------------------------------------ table


def _fmt(x: float) -> str:
  return f"{float(x):.6g}"


def metrics_table(run: dict) -> list[str]:
  """Markdown lines: one row per layer (weights first), in forward order."""
  lines = ["| layer | kind | alpha | mse | near_frac | occupancy |",
           "|---|---|---|---|---|---|"]
  for kind, label in (("weights", "weight"), ("activations", "activation")):
    for name in sort_layers(run["quant"][kind], run["order"]):
      m = run["quant"][kind][name]
      occupancy = " ".join(f"{float(x):.4f}" for x in m["occupancy"])
      lines.append(f"| {name} | {label} | {_fmt(m['alpha'])} | {_fmt(m['mse'])} | "
                   f"{_fmt(m['near_frac'])} | {occupancy} |")
  return lines


def reference_metrics_table(run: dict) -> list[str]:
  """Markdown lines: the reference package's BR metrics per layer, then its layer averages
  (``brjax.metrics.reference_br_metrics``, ``reference_summary``)."""
  from brjax import metrics  # pylint: disable=g-import-not-at-top
  lines = ["BR metrics as the reference package logs them: effectiveness = 100 (1 - mean "
           "distance / (alpha/2)), pct_near = % within 1% of alpha of its level, bins used, "
           "per-bin count / mean / std.", "",
           "| layer | kind | effectiveness | pct_near | mean_distance | bins_used | "
           "bin_count | bin_mean | bin_std |", "|---|---|---|---|---|---|---|---|---|"]
  for kind, label in (("weights", "weight"), ("activations", "activation")):
    for name in sort_layers(run["quant"][kind], run["order"]):
      m = run["quant"][kind][name]
      if "effectiveness" not in m:
        continue
      per_bin = lambda key: " ".join(f"{float(x):.4g}" for x in m[key])
      lines.append(f"| {name} | {label} | {_fmt(m['effectiveness'])} | {_fmt(m['pct_near'])} "
                   f"| {_fmt(m['mean_distance'])} | {int(float(m['bins_used']))} | "
                   f"{per_bin('bin_count')} | {per_bin('bin_mean')} | {per_bin('bin_std')} |")
  for kind, values in metrics.reference_summary(run["quant"]).items():
    lines.append(f"| average | {kind} | {_fmt(values['effectiveness'])} | "
                 f"{_fmt(values['pct_near'])} | {_fmt(values['mean_distance'])} | | | | |")
  return lines


def checkpoint_line(meta: dict, history: list[dict]) -> str:
  """``checkpoint: epoch 2 (test accuracy 20.31%); best test accuracy 21.88%, epoch 1``."""
  acc = {r["epoch"]: r.get("test_acc") for r in history}
  epoch = meta.get("epoch")
  line = f"checkpoint: epoch {epoch}"
  if isinstance(acc.get(epoch), (int, float)):
    line += f" (test accuracy {acc[epoch]:.2f}%)"
  scored = [(a, -e) for e, a in acc.items() if isinstance(a, (int, float))]
  if scored:
    best, neg_epoch = max(scored)  # the first epoch to reach the best accuracy
    line += f"; best test accuracy {best:.2f}%, epoch {-neg_epoch}"
  return line


def write_markdown(runs: list[dict], path: str) -> str:
  lines = ["# Quantization metrics", "",
           "Recomputed from each run's checkpoint with `brjax.metrics.quant_metrics`. "
           "mse = mean((v - q(v))^2); near_frac = fraction within 0.1 alpha of its level; "
           "occupancy = fraction of elements per level, from qn to qp (signed for weights, "
           "unsigned for activations).", ""]
  for run in runs:
    config = run["config"]
    lines += [f"## {run['label']}", "",
              f"- workdir: `{run['workdir']}`",
              f"- {checkpoint_line(run['meta'], run['history'])}",
              f"- bits: W{config['bits_w']} A{config['bits_a']}; activations on the first "
              f"{run['examples']} test images of `{run['data_dir']}`", ""]
    lines += metrics_table(run) + [""]
    lines += reference_metrics_table(run) + [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


# ------------------------------------------------------------------------- main


def analyze(workdirs: list[tuple[str, str]], histories: list[list[dict]], out: str,
            data_dir: str | None, examples: int, note: Callable[[str], None],
            prefer: str = "latest") -> list[str]:
  """Loads every run and writes every output; returns the paths written."""
  cache: dict[Any, Any] = {}
  runs = [load_run(w, flag, h, data_dir, examples, cache, prefer)
          for (flag, w), h in zip(workdirs, histories)]
  labels = [run["label"] for run in runs]
  if len(set(labels)) < len(labels):  # workdirs of one name: add the folders they are in
    for run in runs:
      run["label"] += f" [{os.path.dirname(os.path.abspath(run['workdir']))}]"
  os.makedirs(out, exist_ok=True)
  written = []
  for kind in ("weights", "activations"):
    path = plot_histograms(runs, kind, os.path.join(out, f"{kind}_hist.png"))
    if path is None:
      note(f"no quantized {kind}: {kind}_hist.png not written")
    else:
      written.append(path)
  written.append(plot_br_curves(runs, os.path.join(out, "br_curves.png")))
  path = plot_alpha_curves(runs, os.path.join(out, "alpha_curves.png"))
  if path is None:
    note('metrics.jsonl has no per-epoch "quant" entries: alpha_curves.png not written')
  else:
    written.append(path)
  written.append(write_markdown(runs, os.path.join(out, "metrics.md")))
  return written


def main(argv: list[str]) -> int:
  def error(e: Exception) -> int:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 2

  try:
    cli.parse_flags(FLAGS, argv)
    if not FLAGS.workdir:
      raise ValueError("--workdir is required: use the --workdir of a training run")
    if FLAGS.examples < 1:
      raise ValueError(f"--examples={FLAGS.examples} is not accepted: use an integer >= 1")
    if FLAGS.data_dir is not None and not os.path.exists(FLAGS.data_dir):
      raise ValueError(f"--data_dir={FLAGS.data_dir} is not accepted: no such file or folder; "
                       "use a folder with test/<class>/ images, or a .tar.gz of one")
    workdirs = [("workdir", FLAGS.workdir)] + ([("compare", FLAGS.compare)]
                                               if FLAGS.compare else [])
    histories = [read_history(w, flag) for flag, w in workdirs]
    out = FLAGS.out or os.path.join(FLAGS.workdir, "analysis")
    if os.path.exists(out) and not os.path.isdir(out):
      raise ValueError(f"--out={out} is not accepted: it is a file; use a folder")
  except (flags.Error, ValueError) as e:
    return error(e)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  logging.set_verbosity(logging.ERROR)  # orbax warns about read-only checkpoint managers
  try:
    written = analyze(workdirs, histories, out, FLAGS.data_dir, FLAGS.examples,
                      note=lambda msg: print(f"note: {msg}", file=sys.stderr),
                      prefer=FLAGS.checkpoint)
  except (ValueError, OSError) as e:
    return error(e)
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
