"""brjax.studies.plots and brjax.studies.analysis's pure parts on synthetic runs: no
checkpoint, no model."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from brjax.studies import analysis, plots


def synthetic_run(workdir="runs/lsq_br_s0", epochs=2, warmup=1):
  """What ``load_run`` returns, for a W2A2 run with one kernel and one activation layer."""
  layers = {"weights": ["conv_init", "QuantDense_0"], "activations": ["act_init"]}
  quant = {kind: {name: {"alpha": 0.1, "mse": 0.001, "near_frac": 0.5,
                         "occupancy": [0.25] * 4} for name in names}
           for kind, names in layers.items()}
  history = [{"epoch": e, "phase": "WARMUP" if e <= warmup else "BR",
              "br_w": None if e <= warmup else 0.3, "br_a": None if e <= warmup else 1.2,
              "test_acc": 30.0 if e == 1 else 20.0, "quant": quant} for e in range(1, epochs + 1)]
  rng = np.random.default_rng(0)
  return {"workdir": workdir, "label": f"LSQ+BR ({os.path.basename(workdir)})",
          "config": {"bits_w": 2, "bits_a": 2, "epochs": epochs, "warmup_epochs": warmup},
          "meta": {"epoch": epochs, "best_test_acc": 30.0}, "history": history,
          "quant": quant, "order": ["conv_init", "act_init", "QuantDense_0"],
          "weights": {n: rng.normal(0, 0.1, 500) for n in layers["weights"]},
          "activations": {"act_init": np.abs(rng.normal(0, 1, 500))},
          "data_dir": "data", "examples": 8}


def test_run_label_names_the_workdir():
  config = {"bits_w": 2, "bits_a": 2, "lambda_w": 1.0, "lambda_a": 0.0, "warmup_epochs": 1,
            "epochs": 3}
  assert analysis.run_label(config, "study/w_br_s0/") == "LSQ+BR (w_br_s0)"
  assert analysis.run_label({**config, "lambda_w": 0.0}, "study/lsq_s0") == "LSQ (lsq_s0)"


def test_one_br_epoch_sits_on_the_whole_integer_epoch_axis():
  fig = plots.br_curves_figure([synthetic_run(epochs=2, warmup=1)])
  for ax in fig.axes:
    assert ax.get_xlim() == (0.5, 2.5)
    ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 2.5]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
  br_w = fig.axes[0].lines[0]
  assert list(br_w.get_xdata()) == [2] and br_w.get_marker() == "o"


def test_alpha_curves_have_a_colour_scale_naming_the_layers():
  fig = plots.alpha_curves_figure([synthetic_run()])
  bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
  assert len(bars) == 2  # weights, activations
  weights_bar = [t.get_text() for t in bars[0].get_yticklabels()]
  assert weights_bar == ["1: conv_init", "2: QuantDense_0"], weights_bar
  assert bars[0].get_title(loc="left") == "layer (2)"
  assert plots.alpha_curves_figure([{**synthetic_run(), "history": [{"epoch": 1}]}]) is None


def test_activation_histograms_label_their_log_axis():
  fig = plots.histograms_figure([synthetic_run()], "activations")
  assert fig.axes[0].get_yscale() == "log"
  assert fig.axes[0].get_ylabel() == "fraction (log scale)"
  assert "(log scale)" in fig._suptitle.get_text()  # pylint: disable=protected-access
  weights = plots.histograms_figure([synthetic_run()], "weights")
  assert weights.axes[0].get_ylabel() == "fraction" and weights.axes[0].get_yscale() == "linear"


def test_checkpoint_line_gives_each_accuracy_its_own_epoch():
  run = synthetic_run()  # epoch 1: 30%, epoch 2 (the checkpoint): 20%
  assert plots.checkpoint_line(run["meta"], run["history"]) == (
      "checkpoint: epoch 2 (test accuracy 20.00%); best test accuracy 30.00%, epoch 1")


def test_hist_figsize_wraps_at_max_cols():
  assert plots.hist_figsize(1) == plots.PANEL_SIZE
  assert plots.hist_figsize(plots.MAX_COLS + 1) == (plots.MAX_COLS * plots.PANEL_SIZE[0],
                                                    2 * plots.PANEL_SIZE[1])


def test_sort_layers_forward_order_then_call_unknown_last():
  order = ["conv_init", "act_init", "head"]
  names = ["head", "zzz", "act_init#1", "act_init#0", "conv_init"]
  assert plots.sort_layers(names, order) == ["conv_init", "act_init#0", "act_init#1", "head",
                                             "zzz"]


def test_float_run_label():
  assert analysis.run_label({"bits_w": 32, "bits_a": 32}, "runs/float/") == "float (float)"
  # BR flags without a BR epoch: LSQ only.
  assert analysis.run_label({"bits_w": 2, "bits_a": 2, "lambda_w": 1.0, "warmup_epochs": 3,
                             "epochs": 3}, "r") == "LSQ (r)"


def test_metrics_markdown_rows_in_forward_order():
  text = plots.metrics_markdown([synthetic_run()])
  assert "## LSQ+BR (lsq_br_s0)" in text
  assert "- checkpoint: epoch 2 (test accuracy 20.00%); best test accuracy 30.00%, epoch 1" in text
  rows = [line.split("|")[1].strip() for line in text.splitlines()
          if line.startswith("| ") and line.count("|") == 7 and "layer" not in line]
  assert rows == ["conv_init", "QuantDense_0", "act_init"]  # weights first, forward order
  assert "| conv_init | weight | 0.1 | 0.001 | 0.5 | 0.2500 0.2500 0.2500 0.2500 |" in text


def test_write_outputs_of_a_history_without_quant_entries(tmp_path):
  """metrics.jsonl written before per-epoch "quant" entries existed: no alpha curves."""
  run = synthetic_run()
  run["history"] = [{k: v for k, v in r.items() if k != "quant"} for r in run["history"]]
  notes = []
  written = analysis.write_outputs([run], str(tmp_path / "out"), notes.append)
  assert sorted(os.path.basename(p) for p in written) == [
      "activations_hist.png", "br_curves.png", "metrics.md", "weights_hist.png"]
  assert not (tmp_path / "out" / "alpha_curves.png").exists()
  assert notes == ['metrics.jsonl has no per-epoch "quant" entries: alpha_curves.png not '
                   'written']
  with Image.open(tmp_path / "out" / "br_curves.png") as im:
    assert im.format == "PNG"
    assert im.size == (round(plots.CURVES_SIZE[0] * plots.DPI),
                       round(plots.CURVES_SIZE[1] * plots.DPI))


def test_write_outputs_without_quantized_weights(tmp_path):
  run = {**synthetic_run(), "weights": {}}
  notes = []
  written = analysis.write_outputs([run], str(tmp_path), notes.append)
  assert "weights_hist.png" not in [os.path.basename(p) for p in written]
  assert notes == ["no quantized weights: weights_hist.png not written"]


def _study_result(config, seed, accs, warmup=1):
  return {"config": config, "seed": seed, "warmup_epochs": warmup,
          "curve": [{"epoch": e, "test_acc": a, "train_acc": a + 1.0}
                    for e, a in enumerate(accs, 1)]}


def test_study_curves_show_the_seed_mean_and_its_range(tmp_path):
  results = [_study_result("lsq", 0, [50.0, 60.0, 70.0]),
             _study_result("lsq", 1, [52.0, 64.0, 68.0]),
             _study_result("lsq_br", 0, [50.0, 58.0, 72.0]),
             {"config": "w_br", "seed": 0}]  # a result from before curves: left out
  fig = plots.study_curves_figure(results)
  test_ax = fig.axes[0]
  lines = {line.get_label(): line for line in test_ax.lines if not line.get_label().startswith("_")}
  assert sorted(lines) == ["lsq (n=2)", "lsq_br (n=1)"]
  assert list(lines["lsq (n=2)"].get_ydata()) == [51.0, 62.0, 69.0]
  bands = test_ax.collections  # one band, for the config with two seeds
  assert len(bands) == 1
  lows_highs = bands[0].get_paths()[0].vertices[:, 1]
  assert lows_highs.min() == 50.0 and lows_highs.max() == 70.0
  assert fig.axes[1].lines[0].get_ydata()[0] == 52.0  # train accuracy, right
  assert test_ax.get_xlim() == (0.5, 3.5)
  path = plots.save(fig, str(tmp_path / "curves.png"))
  assert Image.open(path).size == tuple(int(x * plots.DPI) for x in plots.STUDY_CURVES_SIZE)
  assert plots.study_curves_figure([{"config": "lsq", "seed": 0}]) is None


def test_a_diverged_run_is_drawn_apart_and_never_in_the_mean():
  diverged = {**_study_result("lsq_br", 1, [50.0, 30.0]), "outcome": "diverged",
              "diverged": {"epoch": 3, "what": "step sizes went to zero or below"}}
  results = [_study_result("lsq", 0, [50.0, 60.0, 70.0]),
             {**_study_result("lsq_br", 0, [50.0, 58.0, 72.0]), "outcome": "finished"},
             diverged,
             {**_study_result("w_br", 0, [50.0]), "outcome": "diverged"}]
  fig = plots.study_curves_figure(results)
  for ax in fig.axes[:2]:
    labels = [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
    assert labels == ["lsq (n=1)", "lsq_br (n=1, 1 diverged)", "w_br (n=0, 1 diverged)"]
  test_ax = fig.axes[0]
  by_label = {line.get_label(): line for line in test_ax.lines}
  assert list(by_label["lsq_br (n=1, 1 diverged)"].get_ydata()) == [50.0, 58.0, 72.0]
  dashed = [line for line in test_ax.lines if line.get_linestyle() == "--"]
  assert [list(line.get_ydata()) for line in dashed] == [[50.0, 30.0], [50.0]]
  ends = [line for line in test_ax.lines if line.get_marker() == "x"]
  assert [(list(e.get_xdata()), list(e.get_ydata())) for e in ends] == [([2], [30.0]),
                                                                        ([1], [50.0])]
  assert not test_ax.collections  # no config has two finished seeds: no band
  # The x is the last saved epoch; the epoch it diverged in is written beside it.
  assert [(t.get_text(), t.xy) for t in test_ax.texts] == [("diverged in epoch 3", (2, 30.0))]
