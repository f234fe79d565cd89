"""End-to-end tests of scripts/analyze.py on the shared tiny W2A2 run (``tiny_run``)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import run_main

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "analyze.py"
EXAMPLES = 64  # test images the activations are computed on (the script's default is 256)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analyze():
  """The script as a module, for its figure geometry (DPI, PANEL_SIZE, ...)."""
  spec = importlib.util.spec_from_file_location("analyze_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def recomputed(tiny_run) -> dict:
  """``metrics.quant_metrics`` of the tiny run's checkpoint on its first EXAMPLES test images."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from brjax import checkpoint, input_pipeline, metrics, models
  variables, meta = checkpoint.restore_pretrained(tiny_run[0], prefer="latest")
  config = meta["config"]
  ds = input_pipeline.load_dataset(config["dataset"], config["data_dir"], 1, EXAMPLES)
  batch = next(input_pipeline.eval_batches(ds, EXAMPLES))
  model = models.create_model(config["model"], bits_w=config["bits_w"], bits_a=config["bits_a"],
                              clip=config["clip"], num_classes=ds.num_classes)
  fn = jax.jit(functools.partial(metrics.quant_metrics, model))
  return metrics.to_python(fn(variables, batch))


def run_script(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        timeout=300, check=False)


def png_size(path: pathlib.Path) -> tuple[int, int]:
  """(width, height) from the IHDR chunk, after checking the PNG signature."""
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
  assert data[12:16] == b"IHDR"
  width, height = struct.unpack(">II", data[16:24])
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == (width, height)
    im.verify()
  return width, height


def pixels(analyze, size: tuple[float, float]) -> tuple[int, int]:
  return round(size[0] * analyze.DPI), round(size[1] * analyze.DPI)


def hist_pixels(analyze, num_panels: int) -> tuple[int, int]:
  """Independent of analyze.hist_figsize: MAX_COLS panels of PANEL_SIZE inches per row."""
  cols = min(num_panels, analyze.MAX_COLS)
  rows = -(-num_panels // cols)
  return pixels(analyze, (cols * analyze.PANEL_SIZE[0], rows * analyze.PANEL_SIZE[1]))


def parse_markdown(text: str) -> dict[str, dict[tuple[str, str], dict]]:
  """``{section title: {(kind, layer): row}}`` from the tables under each ``## `` heading."""
  sections, rows, main = {}, None, False
  for line in text.splitlines():
    if line.startswith("## "):
      rows = sections.setdefault(line[3:].strip(), {})
    elif line.startswith("|") and rows is not None:
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if cells[0] == "layer":  # the metrics table, or the reference's BR metrics after it
        main = cells == ["layer", "kind", "alpha", "mse", "near_frac", "occupancy"]
        assert main or cells[2] == "effectiveness", cells
      if cells[0] == "layer" or set(cells[0]) <= {"-"} or not main:
        continue
      layer, kind, alpha, mse, near, occupancy = cells
      rows[(kind, layer)] = {"alpha": float(alpha), "mse": float(mse),
                             "near_frac": float(near),
                             "occupancy": [float(x) for x in occupancy.split()]}
  return sections


def assert_table_matches(rows: dict, recomputed: dict) -> None:
  """Every layer of ``recomputed`` is a row, with its numbers as printed (6 digits, 4 dp)."""
  want = {(kind, layer): m for kind, part in (("weight", "weights"),
                                              ("activation", "activations"))
          for layer, m in recomputed[part].items()}
  assert set(rows) == set(want)
  for key, m in want.items():
    row = rows[key]
    for name in ("alpha", "mse", "near_frac"):
      np.testing.assert_allclose(row[name], m[name], rtol=1e-5, atol=1e-6, err_msg=f"{key} {name}")
    np.testing.assert_allclose(row["occupancy"], m["occupancy"], atol=6e-5, err_msg=f"{key}")


def test_analyze_one_run(tiny_run, recomputed, analyze, tmp_path):
  workdir, _ = tiny_run
  out = tmp_path / "out"
  result = run_script(f"--workdir={workdir}", f"--out={out}", f"--examples={EXAMPLES}")
  assert result.returncode == 0, result.stderr
  written = result.stdout.split()
  assert sorted(os.path.basename(p) for p in written) == [
      "activations_hist.png", "alpha_curves.png", "br_curves.png", "metrics.md",
      "weights_hist.png"]
  assert all(pathlib.Path(p).parent == out for p in written)
  assert png_size(out / "alpha_curves.png") == pixels(analyze, analyze.ALPHA_CURVES_SIZE)
  assert not os.path.exists(os.path.join(workdir, "analysis"))  # --out respected

  assert png_size(out / "weights_hist.png") == hist_pixels(analyze, len(recomputed["weights"]))
  assert png_size(out / "activations_hist.png") == hist_pixels(
      analyze, len(recomputed["activations"]))
  assert png_size(out / "br_curves.png") == pixels(analyze, analyze.CURVES_SIZE)

  text = (out / "metrics.md").read_text()
  sections = parse_markdown(text)
  label = f"LSQ+BR ({os.path.basename(workdir)})"  # the kind of run and its workdir's name
  assert list(sections) == [label]
  rows = sections[label]
  assert_table_matches(rows, recomputed)
  # Rows in forward order: the stem first, the classifier last among the weights.
  layers = [layer for kind, layer in rows]
  assert layers[0] == "conv_init" and layers[len(recomputed["weights"]) - 1] == "QuantDense_0"
  assert layers[len(recomputed["weights"])] == "act_init"
  assert f"first {EXAMPLES} test images" in text
  # The reference's BR metrics: one row per layer, then the averages.
  ref = {(c[1], c[0]): c for c in (
      [x.strip() for x in line.strip().strip("|").split("|")] for line in text.splitlines()
      if line.startswith("|") and line.count("|") == 10) if c[0] not in ("layer", "---")}
  assert len(ref) == len(recomputed["weights"]) + len(recomputed["activations"]) + 2
  np.testing.assert_allclose(float(ref[("weight", "conv_init")][2]),
                             recomputed["weights"]["conv_init"]["effectiveness"], rtol=1e-5)


def test_analyze_compare(tiny_run, recomputed, analyze, tmp_path):
  """The run compared to a copy of it; then a copy without per-epoch "quant" entries."""
  workdir, _ = tiny_run
  copy = tmp_path / "with_quant"
  shutil.copytree(workdir, copy)
  lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
  assert lines and all("quant" in line for line in lines)

  out = tmp_path / "out"
  result = run_script(f"--workdir={copy}", f"--compare={workdir}", f"--out={out}",
                      f"--examples={EXAMPLES}")
  assert result.returncode == 0, result.stderr
  assert sorted(os.path.basename(p) for p in result.stdout.split()) == [
      "activations_hist.png", "alpha_curves.png", "br_curves.png", "metrics.md",
      "weights_hist.png"]
  assert png_size(out / "alpha_curves.png") == pixels(analyze, analyze.ALPHA_CURVES_SIZE)
  assert png_size(out / "weights_hist.png") == hist_pixels(analyze, len(recomputed["weights"]))
  assert png_size(out / "activations_hist.png") == hist_pixels(
      analyze, len(recomputed["activations"]))
  assert png_size(out / "br_curves.png") == pixels(analyze, analyze.CURVES_SIZE)

  sections = parse_markdown((out / "metrics.md").read_text())
  # Same config twice: the labels are told apart by the workdir names.
  assert list(sections) == ["LSQ+BR (with_quant)", f"LSQ+BR ({os.path.basename(workdir)})"]
  for rows in sections.values():
    assert_table_matches(rows, recomputed)


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "no_flag", "bad_compare",
                                  "bad_examples", "bad_json", "no_checkpoint",
                                  "unreadable_checkpoint", "extra_arg"])
def test_bad_input_is_one_line_error(case, tmp_path, capsys):
  bad = tmp_path / "run"  # passes every check before orbax, whose restore then fails
  (bad / "checkpoints" / "best" / "3").mkdir(parents=True)
  (bad / "metrics.jsonl").write_text('{"epoch": 1}\n')
  args, expect = {
      "missing_dir": ([f"--workdir={tmp_path / 'nope'}"], "no such folder"),
      "no_metrics": ([f"--workdir={tmp_path}"], "has no metrics.jsonl"),
      "no_flag": ([], "--workdir is required"),
      "bad_compare": ([f"--workdir={bad}", f"--compare={tmp_path / 'nope'}"],
                      "--compare="),
      "bad_examples": ([f"--workdir={bad}", "--examples=0"], "--examples=0"),
      "bad_json": ([f"--workdir={bad}"], "line 2 is not JSON"),
      "no_checkpoint": ([f"--workdir={bad}"], "has no checkpoint"),
      "unreadable_checkpoint": ([f"--workdir={bad}"], "could not be read"),
      "extra_arg": ([f"--workdir={bad}", "stray"], "unexpected arguments"),
  }[case]
  if case == "bad_json":
    (bad / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2,\n')
  if case == "no_checkpoint":
    (bad / "checkpoints" / "best" / "3").rmdir()
  args = [*args, f"--out={tmp_path / 'out'}"]
  if case == "unreadable_checkpoint":  # as a real process: it gets as far as orbax
    result = run_script(*args)
    code, out, err = result.returncode, result.stdout, result.stderr
  else:  # stopped before any work: in-process is enough, and a second faster
    code, out, err = run_main("analyze", args, capsys)
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("error: ") and expect in lines[0], lines[0]
  assert out == ""
  assert not (tmp_path / "out").exists()


def test_analyze_without_quant_entries(tiny_run, tmp_path):
  """metrics.jsonl written before per-epoch "quant" entries existed: no alpha curves."""
  copy = tmp_path / "no_quant"
  shutil.copytree(tiny_run[0], copy)
  lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
  (copy / "metrics.jsonl").write_text(
      "".join(json.dumps({k: v for k, v in line.items() if k != "quant"}) + "\n"
              for line in lines))
  out = tmp_path / "out"
  result = run_script(f"--workdir={copy}", f"--out={out}", f"--examples={EXAMPLES}")
  assert result.returncode == 0, result.stderr
  assert not (out / "alpha_curves.png").exists()
  assert 'no per-epoch "quant" entries' in result.stderr


# ------------------------------------------------- figures of a synthetic run (fast)


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


def test_run_label_names_the_workdir(analyze):
  config = {"bits_w": 2, "bits_a": 2, "lambda_w": 1.0, "lambda_a": 0.0, "warmup_epochs": 1,
            "epochs": 3}
  assert analyze.run_label(config, "study/w_br_s0/") == "LSQ+BR (w_br_s0)"
  assert analyze.run_label({**config, "lambda_w": 0.0}, "study/lsq_s0") == "LSQ (lsq_s0)"


def test_one_br_epoch_sits_on_the_whole_integer_epoch_axis(analyze):
  fig = analyze.br_curves_figure([synthetic_run(epochs=2, warmup=1)])
  for ax in fig.axes:
    assert ax.get_xlim() == (0.5, 2.5)
    ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 2.5]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
  br_w = fig.axes[0].lines[0]
  assert list(br_w.get_xdata()) == [2] and br_w.get_marker() == "o"


def test_alpha_curves_have_a_colour_scale_naming_the_layers(analyze):
  fig = analyze.alpha_curves_figure([synthetic_run()])
  bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
  assert len(bars) == 2  # weights, activations
  weights_bar = [t.get_text() for t in bars[0].get_yticklabels()]
  assert weights_bar == ["1: conv_init", "2: QuantDense_0"], weights_bar
  assert bars[0].get_title(loc="left") == "layer (2)"
  assert analyze.alpha_curves_figure([{**synthetic_run(), "history": [{"epoch": 1}]}]) is None


def test_activation_histograms_label_their_log_axis(analyze):
  fig = analyze.histograms_figure([synthetic_run()], "activations")
  assert fig.axes[0].get_yscale() == "log"
  assert fig.axes[0].get_ylabel() == "fraction (log scale)"
  assert "(log scale)" in fig._suptitle.get_text()  # pylint: disable=protected-access
  weights = analyze.histograms_figure([synthetic_run()], "weights")
  assert weights.axes[0].get_ylabel() == "fraction" and weights.axes[0].get_yscale() == "linear"


def test_checkpoint_line_gives_each_accuracy_its_own_epoch(analyze):
  run = synthetic_run()  # epoch 1: 30%, epoch 2 (the checkpoint): 20%
  assert analyze.checkpoint_line(run["meta"], run["history"]) == (
      "checkpoint: epoch 2 (test accuracy 20.00%); best test accuracy 30.00%, epoch 1")
