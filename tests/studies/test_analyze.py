"""Tests of scripts/analyze.py and brjax.studies.analysis on the shared tiny W2A2 run
(``tiny_run``).

One run of the command line end to end; the comparison of two runs calls
``brjax.studies.analysis.analyze`` in this process (same outputs, no second interpreter); the
figures and tables of synthetic runs are in tests/studies/test_plots.py.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

from conftest import run_main
import numpy as np
from PIL import Image
import pytest

from brjax.studies import analysis, plots

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "analyze.py"
EXAMPLES = 64  # test images the activations are computed on (the script's default is 256)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recomputed(tiny_run) -> dict:
  """``metrics.quant_metrics`` of the tiny run's checkpoint on its first EXAMPLES test images."""
  import jax  # pylint: disable=g-import-not-at-top

  from brjax.data import input_pipeline
  from brjax.models import cifar as models
  from brjax.quant import metrics

  # pylint: disable=g-import-not-at-top
  from brjax.training import checkpoint
  variables, meta = checkpoint.restore_pretrained(tiny_run[0], prefer="latest")
  config = meta["config"]
  ds = input_pipeline.load_dataset(config["dataset"], config["data_dir"], 1, EXAMPLES)
  batch = next(input_pipeline.eval_batches(ds, EXAMPLES))
  model = models.from_run_config(config, ds.num_classes)  # its bits, clip, step sizes
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


def pixels(size: tuple[float, float]) -> tuple[int, int]:
  return round(size[0] * plots.DPI), round(size[1] * plots.DPI)


def hist_pixels(num_panels: int) -> tuple[int, int]:
  """Independent of plots.hist_figsize: MAX_COLS panels of PANEL_SIZE inches per row."""
  cols = min(num_panels, plots.MAX_COLS)
  rows = -(-num_panels // cols)
  return pixels((cols * plots.PANEL_SIZE[0], rows * plots.PANEL_SIZE[1]))


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


def test_analyze_one_run(tiny_run, recomputed, tmp_path):
  workdir, _ = tiny_run
  out = tmp_path / "out"
  result = run_script(f"--workdir={workdir}", f"--out={out}", f"--examples={EXAMPLES}")
  assert result.returncode == 0, result.stderr
  written = result.stdout.split()
  assert sorted(os.path.basename(p) for p in written) == [
      "activations_hist.png", "alpha_curves.png", "br_curves.png", "metrics.md",
      "weights_hist.png"]
  assert all(pathlib.Path(p).parent == out for p in written)
  assert png_size(out / "alpha_curves.png") == pixels(plots.ALPHA_CURVES_SIZE)
  assert not os.path.exists(os.path.join(workdir, "analysis"))  # --out respected

  assert png_size(out / "weights_hist.png") == hist_pixels(len(recomputed["weights"]))
  assert png_size(out / "activations_hist.png") == hist_pixels(
      len(recomputed["activations"]))
  assert png_size(out / "br_curves.png") == pixels(plots.CURVES_SIZE)

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


def test_analyze_compare(tiny_run, recomputed, tmp_path):
  """The run compared to a copy of it, in this process (the command line's own call)."""
  workdir, _ = tiny_run
  copy = tmp_path / "with_quant"
  shutil.copytree(workdir, copy)
  lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
  assert lines and all("quant" in line for line in lines)

  out = tmp_path / "out"
  workdirs = [("workdir", str(copy)), ("compare", workdir)]
  notes = []
  written = analysis.analyze(workdirs, [analysis.read_run_history(w, f) for f, w in workdirs],
                             str(out), None, EXAMPLES, note=notes.append)
  assert not notes, notes
  assert sorted(os.path.basename(p) for p in written) == [
      "activations_hist.png", "alpha_curves.png", "br_curves.png", "metrics.md",
      "weights_hist.png"]
  assert png_size(out / "alpha_curves.png") == pixels(plots.ALPHA_CURVES_SIZE)
  assert png_size(out / "weights_hist.png") == hist_pixels(len(recomputed["weights"]))
  assert png_size(out / "activations_hist.png") == hist_pixels(len(recomputed["activations"]))
  assert png_size(out / "br_curves.png") == pixels(plots.CURVES_SIZE)

  sections = parse_markdown((out / "metrics.md").read_text())
  # Same config twice: the labels are told apart by the workdir names.
  assert list(sections) == ["LSQ+BR (with_quant)", f"LSQ+BR ({os.path.basename(workdir)})"]
  for rows in sections.values():
    assert_table_matches(rows, recomputed)


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "no_flag", "bad_compare",
                                  "bad_examples", "bad_json", "not_utf8", "no_checkpoint",
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
      "not_utf8": ([f"--workdir={bad}"], "metrics.jsonl line 2 is not UTF-8 text (byte 0xff"),
      "no_checkpoint": ([f"--workdir={bad}"], "has no checkpoint"),
      "unreadable_checkpoint": ([f"--workdir={bad}"], "could not be read"),
      "extra_arg": ([f"--workdir={bad}", "stray"], "unexpected arguments"),
  }[case]
  if case == "bad_json":
    (bad / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2,\n')
  if case == "not_utf8":
    (bad / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n{"epoch": 2, "x": "\xff"}\n')
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


@pytest.mark.slow
def test_load_run_normalizes_as_the_run_did(tmp_path):
  """A ``--normalization=reference`` run: its activations are those of images normalized
  with the statistics it stored, not the dataset's own (metrics.md reported act_init mse
  0.0218 where the run logged 0.0552)."""
  # pylint: disable=g-import-not-at-top
  import dataclasses

  import jax

  from brjax.data import input_pipeline, synthetic_images
  from brjax.models import cifar as models
  from brjax.quant import metrics, sites
  from brjax.training import checkpoint, recipes
  from brjax.training.config import Config
  data = str(synthetic_images.write_image_folder(tmp_path / "data", classes=2,
                                                 train_per_class=4, eval_per_class=4,
                                                 sizes=(32,), eval_folder="test"))
  config = Config(model="resnet8", bits_w=2, bits_a=2, normalization="reference",
                  data_dir=data)
  model = models.from_run_config(config, 2)
  raw = input_pipeline.load_dataset("cifar10", data, 1, 8)
  ds = dataclasses.replace(raw, mean=np.float32(recipes.REFERENCE_MEAN),
                           std=np.float32(recipes.REFERENCE_STD))
  images = next(input_pipeline.eval_batches(ds, 8))["image"]
  variables = model.init(jax.random.key(0), images, train=False)
  ckpts = checkpoint.RunCheckpoints(str(tmp_path / "run"))
  ckpts.save(1, variables, {"epoch": 1, "config": dataclasses.asdict(config),
                            "data": {"mean": ds.mean.tolist(), "std": ds.std.tolist(),
                                     "class_names": list(ds.class_names), "image_size": 32}},
             is_best=True)
  ckpts.close()
  run = analysis.load_run(str(tmp_path / "run"), "workdir", [{"epoch": 1}], None, 8, {})
  want = sites.named(metrics.recorded_sites(model, variables, images), (sites.OUTPUT,))
  np.testing.assert_allclose(run["activations"]["act_init"],
                             np.asarray(want["act_init"].values).ravel(), rtol=1e-5, atol=1e-6)
