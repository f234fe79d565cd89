"""Tests of brjax.studies.plan: a study's plan in words, with estimated times (no JAX)."""

from __future__ import annotations

import json
import pathlib
import re
import shlex

import pytest

from brjax.studies import plan as study_plan
from brjax.studies import study
from brjax.training.config import Config, saved_defaults

REPO = pathlib.Path(__file__).resolve().parents[2]


def flags(**overrides) -> dict:
  values = {"bits": 2, "seeds": ["0"], "configs": ["lsq", "lsq_br"], "warmup_epochs": 1,
            "epochs": 3, "lr": 0.01, "batch_size": 32, "train_examples": 0,
            "test_examples": 0, "pretrained": None, "data_dir": None}
  values.update(overrides)
  return study.check_study(values)


def float_run(workdir: pathlib.Path, times: list[float], steps: int, batch: int,
              **config) -> None:
  """A float run's metrics.jsonl and best checkpoint meta, as epoch_time reads them."""
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("".join(
      json.dumps({"epoch": e, "step": steps * e, "epoch_time_s": t}) + "\n"
      for e, t in enumerate(times, 1)))
  meta = workdir / "checkpoints" / "best" / str(len(times)) / "meta"
  meta.mkdir(parents=True)
  (meta / "metadata").write_text(json.dumps({"config": {"batch_size": batch, **config}}))


def test_epoch_time_per_image_from_a_float_run_else_the_shipped_baseline(tmp_path):
  float_run(tmp_path / "float", [300.0, 310.0, 100.0], steps=10, batch=4)
  per = study_plan.epoch_time("float", str(tmp_path))
  assert per == study_plan.EpochTime(7.5, 300.0, 40, "float")  # median 300 s / 40 images
  assert study_plan.epoch_time("no_such_run", str(tmp_path)) is None
  shipped = study_plan.epoch_time(None)  # the shipped baseline: 390 steps of 128 images
  assert shipped.source == study.BASELINE and shipped.images == 390 * 128
  assert shipped.model == "resnet20"
  assert 290 < shipped.epoch_seconds < 310


def test_run_seconds_by_phase_and_images():
  per = study_plan.float_pace(study_plan.EpochTime(0.01, 10.0, 1000, "x"))
  assert (per.lsq, per.br, per.images) == pytest.approx((0.0095, 0.0112, 1000))
  br = Config(warmup_epochs=2, epochs=5)
  assert study_plan.run_seconds(br, 1, 5, per) == pytest.approx((2 * 0.95 + 3 * 1.12) * 10)
  assert study_plan.run_seconds(br, 3, 5, per) == pytest.approx(3 * 1.12 * 10)
  lsq = Config(warmup_epochs=2, epochs=5, lambda_w=0.0, lambda_a=0.0)
  assert study_plan.run_seconds(lsq, 1, 5, per) == pytest.approx(5 * 0.95 * 10)
  half = Config(warmup_epochs=2, epochs=5, train_examples=500)
  assert study_plan.run_seconds(half, 3, 5, per) == pytest.approx(3 * 1.12 * 5)
  assert [study_plan.duration(s) for s in (29, 90, 3600, 4350)] == [
      "~0m", "~2m", "~1h00m", "~1h12m"]


def test_dry_run_lists_the_warmup_then_its_branches_with_times(tmp_path):
  float_run(tmp_path / "float", [100.0], steps=10, batch=10)
  checked = flags(pretrained=str(tmp_path / "float"))
  study_dir = tmp_path / "study"
  lines = study_plan.dry_run(str(study_dir), checked)
  runs = study.plan(str(study_dir), checked)
  warmup = runs[0].warmup
  # 1 s per image, 100 images: warmup 95 s; lsq 2 x 95 s; lsq_br 2 x 112 s: 509 s
  # (from scratch: 3 x 95 + 95 + 2 x 112 = 604 s).
  assert lines[0].startswith("# plan: 2 configs x 1 seeds = 2 runs + 1 shared warmups of 1 "
                             f"epochs, 3 epochs each (1 warmup); times estimated from "
                             f"{tmp_path / 'float'} (100 s per float epoch of 100 images; a "
                             "step costs 0.95x float with LSQ alone, 1.12x with BR)")
  assert lines[1] == f"warmup_s0 (new, ~2m): {warmup.command()}"
  assert lines[2].startswith("lsq_s0 (new, ~3m, from warmup_s0 at epoch 1): python "
                             "scripts/train.py ")
  assert lines[2].endswith(f"--branch_from={study_dir / 'warmup_s0'} "
                           f"--workdir={study_dir / 'lsq_s0'}")
  assert lines[3].startswith("lsq_br_s0 (new, ~4m, from warmup_s0 at epoch 1): ")
  assert lines[4] == ("# total left: ~8m on that machine, one run at a time (every run from "
                      "scratch, no shared warmup: ~10m)")
  assert len(lines) == 5 and not study_dir.exists()


def test_dry_run_states_skip_resume_and_no_warmup_when_none_is_needed(tmp_path):
  lsq, lsq_br = study.plan(str(tmp_path), flags())
  pathlib.Path(lsq.result_path).write_text("{}")
  (pathlib.Path(lsq_br.workdir) / "checkpoints" / "latest" / "2").mkdir(parents=True)
  lines = study_plan.dry_run(str(tmp_path), flags())
  assert lines[1] == f"lsq_s0 (skip): {lsq.command()}"
  assert lines[2].startswith("lsq_br_s0 (resume, ~")  # epoch 3 left
  assert lines[2].endswith(f"{lsq_br.command()} --resume") and len(lines) == 4
  lines = study_plan.dry_run(str(tmp_path / "other"), flags(), share_warmup=False)
  assert "(no shared warmup)" in lines[0]
  assert lines[1].startswith("lsq_s0 (new, ~") and "--branch_from" not in lines[1]


def logged(workdir: pathlib.Path, times: dict[int, float], steps: int) -> None:
  """A run's metrics.jsonl with ``{epoch: epoch_time_s}``, ``steps`` steps per epoch."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(
      json.dumps({"epoch": e, "step": steps * e, "epoch_time_s": t}) + "\n"
      for e, t in times.items()))


def test_once_the_study_logged_epochs_its_times_come_from_them(tmp_path):
  float_run(tmp_path / "float", [100.0], steps=10, batch=10)
  checked = flags(pretrained=str(tmp_path / "float"), epochs=4, warmup_epochs=2)
  study_dir = tmp_path / "study"
  lsq, lsq_br = study.plan(str(study_dir), checked)
  # The shared warmup: 2 LSQ epochs of 10 steps of 32 images (the first one compiled).
  logged(pathlib.Path(lsq.warmup.workdir), {1: 900.0, 2: 320.0}, steps=10)
  # lsq_s0 copied the warmup's epochs (not counted twice) and logged one LSQ epoch.
  logged(pathlib.Path(lsq.workdir), {1: 900.0, 2: 320.0, 3: 330.0}, steps=10)
  pace = study_plan.study_pace([lsq, lsq_br])
  # LSQ: median of 900, 320, 330 s per 320 images; BR not logged: LSQ x 1.12 / 0.95.
  assert pace.images == 320 and pace.lsq == pytest.approx(330.0 / 320)
  assert pace.br == pytest.approx(pace.lsq * 1.12 / 0.95)
  assert pace.source == ("times from this study's logged epochs of 320 images (330 s per LSQ "
                         "epoch, median of 3; BR by STEP_COST's ratio, 1.12/0.95)")
  logged(pathlib.Path(lsq_br.workdir), {1: 1.0, 2: 1.0, 3: 640.0, 4: 600.0}, steps=10)
  pace = study_plan.study_pace([lsq, lsq_br])
  assert pace.br == pytest.approx(620.0 / 320) and pace.lsq == pytest.approx(330.0 / 320)
  lines = study_plan.dry_run(str(study_dir), checked)
  assert lines[0].endswith("times from this study's logged epochs of 320 images (330 s per "
                           "LSQ epoch, median of 3; 620 s per BR epoch, median of 2)")
  # No checkpoint, so all is still to run: 2 LSQ epochs of 330 s each for the warmup and
  # for lsq_s0's BR phase, 2 BR epochs of 620 s for lsq_br_s0's.
  assert [line.split(": ", 1)[0] for line in lines[1:4]] == [
      "warmup_s0 (new, ~11m)", "lsq_s0 (new, ~11m, from warmup_s0 at epoch 2)",
      "lsq_br_s0 (new, ~21m, from warmup_s0 at epoch 2)"]
  assert study_plan.study_pace(study.plan(str(tmp_path / "new"), checked)) is None


def test_the_estimate_says_when_it_is_another_models(tmp_path):
  """STEP_COST was measured on a W2A2 ResNet-20, and a float run may be of another model
  than the study's: the plan's words say what its times are based on."""
  head = ("times estimated from float (100 s per float epoch of 100 images; a step costs "
          "0.95x float with LSQ alone, 1.12x with BR")
  resnet20 = study_plan.EpochTime(1.0, 100.0, 100, "float", "resnet20")
  assert study_plan.float_pace(resnet20).source == head + ")"
  assert study_plan.float_pace(resnet20, "resnet8").source == head + (
      "; this study trains resnet8, but that float run is a resnet20 and the step costs are "
      "W2A2 resnet20's: its times are not measured for resnet8)")
  resnet8 = study_plan.EpochTime(1.0, 100.0, 100, "float", "resnet8")
  assert study_plan.float_pace(resnet8, "resnet8").source == head + (
      "; this study trains resnet8, but the step costs are W2A2 resnet20's: its times are not "
      "measured for resnet8)")
  assert study_plan.float_pace(resnet8).source.endswith(
      "; this study trains resnet20, but that float run is a resnet8: its times are not "
      "measured for resnet20)")
  float_run(tmp_path / "float", [100.0], steps=10, batch=10, model="resnet20")
  lines = study_plan.dry_run(str(tmp_path / "study"), flags(
      pretrained=str(tmp_path / "float"), model="resnet8"))
  assert lines[0].endswith("1.12x with BR; this study trains resnet8, but that float run is a "
                           "resnet20 and the step costs are W2A2 resnet20's: its times are not "
                           "measured for resnet8)")


def test_the_shipped_evidence_study_plans_the_commands_its_summary_lists(cifar_archive,
                                                                         monkeypatch):
  """checkpoints/study_evidence_W2A2's study.json, written before --model and
  --first_last_bits, plans its runs as they ran: each the command its summary.md lists,
  flag for flag, plus only the flags scripts/train.py gained since, at the values those
  runs used (``config.saved_defaults``; ``--act_signs`` acts on the papers' models only)."""
  monkeypatch.chdir(REPO)  # its paths are relative to the repository root
  study_dir = REPO / "checkpoints" / "study_evidence_W2A2"
  saved = study.read_study_file(str(study_dir))
  assert "model" not in saved and "first_last_bits" not in saved
  checked = study.check_study(saved)
  assert (checked["model"], checked["first_last_bits"]) == ("resnet20", None)
  assert study.check_study_file(str(study_dir), checked)  # it continues with these flags
  listed = dict(re.findall(r"^- `(\w+)`: `(.+)`$", (study_dir / "summary.md").read_text(),
                           re.M))
  assert list(listed) == saved["configs"]
  runs = study.plan(str(study_dir), checked)
  assert len(runs) == 21
  for run in runs:
    recorded = shlex.split(listed[run.config].format(seed=run.seed))
    planned = shlex.split(run.command())
    names = {word.split("=", 1)[0] for word in recorded}
    added = [word for word in planned if word.split("=", 1)[0] not in names]
    assert [word for word in planned if word not in added] == recorded, run.name
    config = run.train_config
    then = {**saved_defaults(vars(config)), "act_signs": "architecture"}
    assert {w.split("=", 1)[0][2:] for w in added} == set(then), run.name
    assert all(getattr(config, name) == value for name, value in then.items()), run.name
