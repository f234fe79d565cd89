"""Evaluating a run's checkpoint (``brjax.training.evaluation.evaluate_run``, scripts/evaluate.py)
and the float baseline shipped in checkpoints/."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shlex
import subprocess
import sys

from conftest import run_main, tiny_config
import numpy as np
import pytest

from brjax.data import input_pipeline
from brjax.models import cifar as models
from brjax.training import checkpoint, evaluation, train

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "scripts" / "evaluate.py")
BASELINE = REPO / "checkpoints" / "resnet20_float_cifar10"


def _logged(workdir: str, epoch: int) -> float:
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(l) for l in f if json.loads(l)["epoch"] == epoch][-1]["test_acc"]


@pytest.mark.parametrize("prefer", ["best", "latest"])
def test_evaluate_run_reproduces_the_logged_accuracy(tiny_run, prefer):
  workdir, _ = tiny_run
  _, meta = checkpoint.restore_pretrained(workdir, prefer)
  result = evaluation.evaluate_run(workdir, prefer=prefer)
  assert result["epoch"] == meta["epoch"]
  assert result["test_count"] == 128  # the run's --test_examples
  assert result["logged_test_acc"] == _logged(workdir, meta["epoch"])
  assert result["test_acc"] == pytest.approx(result["logged_test_acc"], abs=1e-9)
  # Another batch size pads differently (mask): the same images count, once each.
  other = evaluation.evaluate_run(workdir, prefer=prefer, batch_size=50)
  assert other["test_count"] == 128
  assert other["test_acc"] == pytest.approx(result["test_acc"], abs=1e-9)
  assert other["test_loss"] == pytest.approx(result["test_loss"], rel=1e-5)


def test_evaluate_run_uses_the_runs_normalization(tiny_run, tmp_path):
  """The checkpoint's mean/std, not statistics recomputed from whatever data is passed."""
  workdir, _ = tiny_run
  _, meta = checkpoint.restore_pretrained(workdir)
  assert meta["data"]["mean"] and meta["data"]["std"]
  calls = []
  real = evaluation.evaluate

  def spy(eval_fn, variables, ds, batch_size, topology):
    calls.append((ds.mean, ds.std))
    return real(eval_fn, variables, ds, batch_size, topology)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluation, "evaluate", spy)
    evaluation.evaluate_run(workdir)
  (mean, std), = calls
  np.testing.assert_array_equal(mean, np.float32(meta["data"]["mean"]))
  np.testing.assert_array_equal(std, np.float32(meta["data"]["std"]))


def test_evaluate_run_refuses_data_of_other_classes(tiny_run, tmp_path):
  workdir, _ = tiny_run
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      folder = tmp_path / "data" / split / name
      folder.mkdir(parents=True)
      Image.new("RGB", (32, 32)).save(folder / "0.png")
  with pytest.raises(ValueError,
                     match=r"classes of .* \(\['cat', 'dog'\]\) differ from the run's"):
    evaluation.evaluate_run(workdir, data_dir=str(tmp_path / "data"))


def _run_script(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        cwd=str(REPO), timeout=300, check=False)


@pytest.mark.parametrize("args, message", [
    ([], "--workdir is required"),
    (["--workdir=/nonexistent"], "--workdir=/nonexistent is not accepted: no such folder "
     "(use the --workdir of a training run)"),
    (["--workdir=tests"], "--workdir=tests is not accepted: it holds no checkpoints/"),
    (["--workdir=README.md"], "--workdir=README.md is not accepted: it is a file, not a "
     "folder"),
    (["--workdir=.", "--checkpoint=first"], "--checkpoint"),
    (["--workdir=.", "--batch_size=0"],
     "--batch_size=0 is not accepted"),
])
def test_script_bad_flags_are_one_line_errors(args, message, capsys):
  code, _, err = run_main("evaluate", args, capsys)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_script_checkpoint_errors_are_one_line(tmp_path):
  (tmp_path / "checkpoints" / "best").mkdir(parents=True)
  result = _run_script(f"--workdir={tmp_path}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "holds no checkpoint" in lines[0], lines


@pytest.mark.slow
def test_script_prints_the_tiny_runs_accuracy(tiny_run, tmp_path):
  workdir, _ = tiny_run
  result = _run_script(f"--workdir={workdir}", "--checkpoint=latest", "--json")
  assert result.returncode == 0, result.stderr
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  _, meta = checkpoint.restore_pretrained(workdir, "latest")
  assert printed["epoch"] == meta["epoch"]
  assert printed["test_acc"] == pytest.approx(_logged(workdir, meta["epoch"]), abs=1e-9)
  text = _run_script(f"--workdir={workdir}")
  assert text.returncode == 0, text.stderr
  assert re.fullmatch(rf"{re.escape(workdir)} \(latest checkpoint, epoch \d+\): Test Acc="
                      r"\d+\.\d\d% on 128 test images, loss \d+\.\d{4} \(logged by the run: "
                      r"\d+\.\d\d%\)", text.stdout.strip()), text.stdout


# ---------------------------------------------------------------- the shipped baseline


@pytest.fixture(scope="module")
def baseline_record() -> dict:
  path = BASELINE / "baseline.json"
  assert path.exists(), f"the float baseline is not shipped: {path} is missing"
  with open(path) as f:
    return json.load(f)


def test_reading_a_run_logs_no_orbax_warnings(caplog):
  with caplog.at_level(logging.INFO):
    checkpoint.restore_pretrained(str(BASELINE))
    checkpoint.describe_pretrained(str(BASELINE))
    checkpoint.peek_latest(str(BASELINE))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not warnings, warnings  # e.g. "Given directory is read only", "setting max_to_keep"


def test_shipped_baseline_record_matches_its_checkpoint(baseline_record):
  """baseline.json states the checkpoint's own command, epochs and logged accuracy."""
  _, meta = checkpoint.restore_pretrained(str(BASELINE))
  config = meta["config"]
  assert (config["model"], config["bits_w"], config["bits_a"]) == ("resnet20", 32, 32)
  assert baseline_record["epoch"] == meta["epoch"]
  assert baseline_record["test_acc"] == _logged(str(BASELINE), meta["epoch"])
  assert baseline_record["test_acc"] == meta["best_test_acc"]
  words = shlex.split(baseline_record["command"])
  assert words[:2] == ["python", "scripts/train.py"]
  flags = dict(w[2:].split("=", 1) for w in words[2:])
  assert int(flags["epochs"]) == config["epochs"] == baseline_record["epochs"]
  assert int(flags["bits"]) == 32
  for name in ("lr", "weight_decay", "momentum"):
    if name in flags:
      assert float(flags[name]) == config[name], name
  for name in ("batch_size", "seed", "train_examples"):
    if name in flags:
      assert int(flags[name]) == config[name], name
  readme = (BASELINE / "README.md").read_text()
  assert baseline_record["command"] in readme
  assert f"{baseline_record['test_acc']:.2f}%" in readme


@pytest.mark.slow
def test_shipped_baseline_reproduces_its_test_accuracy(baseline_record, cifar_dir):
  """Loads checkpoints/resnet20_float_cifar10 and evaluates it on the offline test set."""
  result = evaluation.evaluate_run(str(BASELINE), data_dir=cifar_dir)
  assert result["test_count"] == 10000
  assert abs(result["test_acc"] - baseline_record["test_acc"]) <= 0.1, result


@pytest.mark.slow
def test_shipped_baseline_starts_quantized_training(cifar_dir, tmp_path):
  """``--pretrained=checkpoints/resnet20_float_cifar10`` loads into a W2A2 ResNet-20."""
  config = tiny_config(cifar_dir, pretrained=str(BASELINE), train_examples=64,
                       test_examples=64)
  ds = input_pipeline.load_dataset(config.dataset, cifar_dir, 64, 64)
  model = models.create_model("resnet20", bits_w=2, bits_a=2, num_classes=10)
  state = train.create_train_state(config, model, ds, steps_per_epoch=1)
  loaded, _ = checkpoint.restore_pretrained(str(BASELINE))
  flat_state = {k: v for k, v in _flat(state.params).items() if k[-1] != "alpha"}
  flat_loaded = _flat(loaded["params"])
  assert flat_state.keys() == flat_loaded.keys()
  for key, value in flat_state.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_loaded[key]), str(key))
  alphas = [v for k, v in _flat(state.params).items() if k[-1] == "alpha"]
  assert alphas and all(float(np.min(a)) > 0 for a in alphas)


def _flat(tree: dict) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  return flax.traverse_util.flatten_dict(tree)
