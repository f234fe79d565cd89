"""scripts/gpu/run_study.sh plans the study it promises: its flags pass scripts/experiments.py's
checks, at the reference package's budget (and, with --tiny, the rehearsal's size).

Its dry run prints the plan without JAX; the training and the benchmark it then runs are
rehearsed by hand (``bash scripts/gpu/run_study.sh --tiny``, docs/guides/gpu_run.md)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu" / "run_study.sh"


def _dry_run(study_dir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHON=sys.executable, STUDY_DIR=str(study_dir))
  for name in ("TINY", "FLOAT", "OUT"):
    env.pop(name, None)
  return subprocess.run(["bash", str(SCRIPT), "--dry_run", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=60, check=False)


pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("tiny,size", [
    (False, ("--warmup_epochs=30", "--epochs=100", "--train_examples=0",
             "--test_examples=0")),
    (True, ("--warmup_epochs=1", "--epochs=3", "--train_examples=512",
            "--test_examples=256"))])
def test_dry_run_plans_lsq_and_lsq_br_from_one_warmup(tmp_path, tiny, size):
  study = tmp_path / "study"
  proc = _dry_run(study, *(["--tiny"] if tiny else []))
  assert proc.returncode == 0, proc.stderr
  assert not study.exists()  # a dry run writes nothing
  lines = proc.stdout.splitlines()
  runs = {line.split()[0]: line for line in lines if " python scripts/train.py " in line}
  assert set(runs) == {"warmup_s0", "lsq_s0", "lsq_br_s0"}
  assert f"--stop_after_epoch={size[0].split('=')[1]}" in runs["warmup_s0"]
  # The plan writes the study's path as given or relative to the repository, the shorter.
  forms = (str(study), os.path.relpath(study, REPO))
  for name in ("lsq_s0", "lsq_br_s0"):
    assert any(f"--branch_from={form}/warmup_s0" in runs[name] for form in forms), runs[name]
  for line in runs.values():
    for flag in (*size, "--bits=2", "--seed=0", "--recipe=reference", "--lr=0.01",
                 "--batch_size=128", "--pretrained=checkpoints/resnet20_float_cifar10"):
      assert f" {flag} " in line, (flag, line)
  assert "--lambda_w=0.0 --lambda_a=0.0" in runs["lsq_s0"]
  assert "--lambda_w=1.0 --lambda_a=1.0" in runs["lsq_br_s0"]


def test_an_unknown_argument_stops_before_any_work(tmp_path):
  proc = _dry_run(tmp_path / "study", "--fast")
  assert proc.returncode == 2
  assert "unknown argument --fast" in proc.stderr
