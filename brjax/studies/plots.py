"""Figures and tables of quantized runs: histograms on the grid, curves over epochs, metrics.

Every function takes *runs*, dicts as ``brjax.studies.analysis.load_run`` returns them (only the
keys a function reads need be there, so figures of a synthetic history are easy to test):

* ``label``: the run's name in legends; ``config``: its flags (``bits_w``, ``bits_a``,
  ``epochs``, ``warmup_epochs``); ``history``: its metrics.jsonl records;
* ``quant``: per kind (``"weights"``, ``"activations"``) and layer, the metrics of
  ``brjax.quant.metrics.quant_metrics``; ``weights``, ``activations``: layer -> 1-D values;
* ``order``: module paths in forward order; ``meta``, ``workdir``, ``data_dir``,
  ``examples``: for the tables.

Figures are ``matplotlib.figure.Figure`` objects, made without pyplot (no global state, no
GUI backend). Importing this module imports matplotlib, not JAX.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import math

from matplotlib import cm, colormaps, colors, figure, ticker
from matplotlib.lines import Line2D
import numpy as np

from brjax.quant import bits as bits_lib

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


def hist_figsize(num_panels: int) -> tuple[float, float]:
  """Figure size (inches) of a grid of ``num_panels`` histograms, ``MAX_COLS`` per row."""
  cols = max(1, min(num_panels, MAX_COLS))
  rows = max(1, math.ceil(num_panels / cols))
  return cols * PANEL_SIZE[0], rows * PANEL_SIZE[1]


def sort_layers(names: Iterable[str], order: Sequence[str]) -> list[str]:
  """``names`` (``path`` or ``path#i``) in forward order, then by call; unknown paths last."""
  rank = {p: i for i, p in enumerate(order)}

  def key(name):
    path, _, call = name.partition("#")
    return rank.get(path, len(rank)), path, int(call) if call.isdigit() else -1

  return sorted(names, key=key)


# ---------------------------------------------------------------------- figures


def _new_figure(size: tuple[float, float], margins: tuple[float, float] = (0.45, 0.5)):
  """A pyplot-free Figure of ``size`` inches; ``margins``: (top, bottom) in inches.

  Fixed margins rather than a layout engine: a grid of ~20 subplots lays out in a fraction
  of the time, and the size in pixels is exactly ``size * DPI``.
  """
  fig = figure.Figure(figsize=size, dpi=DPI)
  width, height = size
  fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, top=1 - margins[0] / height,
                      bottom=margins[1] / height, wspace=0.3, hspace=0.5)
  return fig


def _few_ticks(ax, log_y: bool = False) -> None:
  ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
  if log_y:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(numticks=4))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
  else:
    ax.yaxis.set_major_locator(ticker.MaxNLocator(4))
  ax.tick_params(labelsize=6)


def save(fig, path: str) -> str:
  """Writes ``fig`` to ``path`` as a PNG of exactly its size in inches times DPI."""
  fig.savefig(path, dpi=DPI, format="png")
  return path


def histograms_figure(runs: list[dict], kind: str):
  """One subplot per layer of ``kind`` ("weights" or "activations"), runs overlaid.

  Each run's histogram is a step line (fraction of elements per bin) and its levels
  ``k * alpha`` are dotted vertical lines of the same color. Activations use a log y-axis
  (ReLU puts many exact zeros in the first bin). Returns None if no run has such layers.
  """
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
    for _, run in present:
      bits = run["config"]["bits_w" if signed else "bits_a"]
      qn, qp = bits_lib.qrange(bits, signed)
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


STUDY_CURVES_SIZE = (10.0, 3.8)  # a study's curves.png


def study_curves_figure(results: list[dict]):
  """A study's per-epoch accuracy: per config, the mean over its seeds that finished as a
  line and their range (min to max) as a band, each run that diverged as a thin dashed line
  ending in an x at its last saved epoch, with the epoch it diverged in written beside it;
  test accuracy left, train accuracy right; the end of the warmup as a dotted line.

  Args:
    results: run results of ``brjax.studies.study`` (``config``, ``seed``, ``warmup_epochs``,
      ``outcome``, ``diverged`` and ``curve``: per epoch ``{"epoch", "test_acc",
      "train_acc", ...}``), in the order the legend shows the configs. Results without a
      curve (written before results kept one) are left out.

  Returns:
    The figure, or None if no result has a curve.
  """
  configs: dict[str, list[dict]] = {}
  for result in results:
    if result.get("curve"):
      configs.setdefault(result["config"], []).append(result)
  if not configs:
    return None
  fig = _new_figure(STUDY_CURVES_SIZE, margins=(0.35, 0.5))
  axes = fig.subplots(1, 2)
  palette = colormaps["tab10"]
  last = 1
  noted = {"test_acc": set(), "train_acc": set()}
  for i, (name, rows) in enumerate(configs.items()):
    done = [r for r in rows if r.get("outcome", "finished") == "finished"]
    diverged = [r for r in rows if r not in done]
    label = f"{name} (n={len(done)}" + (f", {len(diverged)} diverged)" if diverged else ")")
    color = palette(i % 10)
    for ax, key in zip(axes, ("test_acc", "train_acc")):
      labels = iter([label])  # the config's first line on each axis carries its label
      by_epoch: dict[int, list[float]] = {}
      for row in done:
        for point in row["curve"]:
          if isinstance(point.get(key), (int, float)):
            by_epoch.setdefault(point["epoch"], []).append(point[key])
      epochs = sorted(by_epoch)
      if epochs:
        last = max(last, epochs[-1])
        values = [np.asarray(by_epoch[e]) for e in epochs]
        ax.plot(epochs, [v.mean() for v in values], color=color, lw=1.4,
                label=next(labels, None))
        if len(done) > 1:
          ax.fill_between(epochs, [v.min() for v in values], [v.max() for v in values],
                          color=color, alpha=0.18, lw=0)
      for row in diverged:
        points = [(p["epoch"], p[key]) for p in row["curve"]
                  if isinstance(p.get(key), (int, float))]
        if points:
          x, y = zip(*points)
          ax.plot(x, y, color=color, lw=0.8, ls="--", label=next(labels, None))
          ax.plot(x[-1], y[-1], color=color, marker="x", ms=6, ls="none")
          epoch = (row.get("diverged") or {}).get("epoch")
          if epoch is not None and (x[-1], y[-1], epoch) not in noted[key]:
            noted[key].add((x[-1], y[-1], epoch))  # seeds that diverged alike: one note
            ax.annotate(f"diverged in epoch {epoch}", (x[-1], y[-1]), xytext=(4, -9),
                        textcoords="offset points", fontsize=6, color=color)
  warmups = {r.get("warmup_epochs") for rows in configs.values() for r in rows} - {None, 0}
  for ax, title in zip(axes, ("test accuracy (%)", "train accuracy (%)")):
    for warmup in warmups:
      ax.axvline(warmup + 0.5, color="0.4", ls=":", lw=0.9)
    ax.set_title(title + ": mean over seeds, band = their range", fontsize=9)
    _epoch_axis(ax, last)
    ax.yaxis.set_major_locator(ticker.MaxNLocator(6))
    ax.grid(alpha=0.3, lw=0.5)
  axes[0].legend(fontsize=7)
  return fig


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


# ------------------------------------------------------------------------ tables


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
  (``brjax.quant.metrics.reference_br_metrics``, ``reference_summary``)."""
  from brjax.quant import metrics  # pylint: disable=g-import-not-at-top
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
      per_bin = lambda key: " ".join(f"{float(x):.4g}" for x in m[key])  # noqa: B023
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


def metrics_markdown(runs: list[dict]) -> str:
  """metrics.md: per run, its checkpoint and bits, then ``metrics_table`` and
  ``reference_metrics_table``."""
  lines = ["# Quantization metrics", "",
           "Recomputed from each run's checkpoint with `brjax.quant.metrics.quant_metrics`. "
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
  return "\n".join(lines)
