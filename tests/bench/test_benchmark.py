"""Tests of scripts/benchmark.py: its output, not its timings (they depend on the machine).

Compile counts are deterministic, so they are checked; every other value only has to be a
finite number of the right sign.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

from conftest import once_per_session, run_main
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = ("float", "warmup", "br")
BITS = (2, 4, 8)
MEASUREMENTS = {
    **{f"step_time_{s}": "ms" for s in STEPS},
    **{f"compile_time_{s}": "s" for s in STEPS},
    "step_ratio_warmup": "x", "step_ratio_br": "x",
    **{f"br_time_{b}bit": "ms" for b in BITS},
    **{f"br_grad_time_{b}bit": "ms" for b in BITS},
    "br_ratio_8bit_2bit": "x", "br_grad_ratio_8bit_2bit": "x",
    "compiles_train_step": "count", "compiles_eval_step": "count", "compiles_total": "count",
    "two_phase_run_time": "s",
    "checkpoint_save_call_ms": "ms", "step_with_save_over_step": "x",
    "step_with_sync_save_over_step": "x",
    "input_images_per_s": "images/s", "step_images_per_s": "images/s", "input_ratio": "x",
    "float_step_flops": "GFLOP", "float_step_flops_per_s": "GFLOP/s",
    "matmul_flops_per_s": "GFLOP/s", "float_step_peak_fraction": "fraction",
}
TARGETS = ("step_ratio_br", "br_ratio_8bit_2bit", "input_ratio", "compiles_train_step",
           "compiles_eval_step")
PLAIN_TARGETS = ("plain_vit_brjax_over_float", "plain_mobilenet_v2_brjax_over_float")


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, request):
  """``(stdout, stderr, JSON lines of --json_out)`` of one --quick run, once per session."""
  def make(folder):
    json_out = folder / "bench.jsonl"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--quick", "--model=resnet8",
         f"--json_out={json_out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    written = [json.loads(line) for line in json_out.read_text().splitlines()]
    return result.stdout, result.stderr, written
  return once_per_session(request, tmp_path_factory, "benchmark", make)


@pytest.mark.slow
def test_every_measurement_once_well_formed(quick_run):
  _, _, lines = quick_run
  names = [line["name"] for line in lines]
  assert sorted(names) == sorted(MEASUREMENTS), set(names) ^ set(MEASUREMENTS)
  for line in lines:
    assert set(line) == {"name", "value", "unit", "context"}
    assert line["unit"] == MEASUREMENTS[line["name"]], line
    value = line["value"]
    assert isinstance(value, (int, float)) and not isinstance(value, bool), line
    assert math.isfinite(value) and value >= 0, line
    context = line["context"]
    assert {"device", "jax", "cores"} <= set(context), context
    assert context["quick"] is True and context["model"] == "resnet8"
  values = {line["name"]: line["value"] for line in lines}
  for name in ("step_time_float", "br_time_2bit", "input_images_per_s", "float_step_flops",
               "matmul_flops_per_s"):
    assert values[name] > 0, name


@pytest.mark.slow
def test_compile_counts_of_a_two_phase_run(quick_run):
  _, _, lines = quick_run
  values = {line["name"]: line["value"] for line in lines}
  assert values["compiles_train_step"] == 2  # the WARMUP step and the BR step
  assert values["compiles_eval_step"] == 1
  assert values["compiles_total"] >= 3


@pytest.mark.slow
def test_stdout_is_the_table_then_the_targets(quick_run):
  stdout, _, _ = quick_run
  assert stdout.startswith("measurement "), stdout[:500]  # no JSON lines before it
  for name in MEASUREMENTS:
    assert f"\n{name} " in stdout, name
  targets = stdout[stdout.index("\nTargets ("):].strip().splitlines()[1:]
  assert len(targets) == len(TARGETS) + len(PLAIN_TARGETS)
  for line, name in zip(targets, TARGETS):
    assert f" {name} = " in line, line
  # --quick leaves the plain models out (--plain_models puts them back).
  for line, name in zip(targets[len(TARGETS):], PLAIN_TARGETS):
    assert line.startswith("SKIP ") and f"{name} not measured" in line, line
  # --quick's timings are too short to mean anything: shown, not checked.
  for line in targets[:3]:
    assert line.startswith("SKIP ") and "not checked with --quick" in line, line
  # Compile counts are deterministic: those targets must pass.
  assert targets[3].startswith("PASS") and targets[4].startswith("PASS")


@pytest.mark.slow
def test_no_warnings_on_stderr(quick_run):
  _, stderr, _ = quick_run
  # Progress lines and bars only: e.g. no "Error writing persistent compilation cache entry".
  assert "benchmark: input pipeline..." in stderr
  for word in ("Error", "WARNING", "Warning", "Traceback"):
    assert word not in stderr, stderr[-3000:]


@pytest.mark.parametrize("flag", ["--batch_size=0", "--model=vgg", "--rounds=-1", "extra"])
def test_bad_flags_are_one_line_errors(flag, capsys):
  code, out, err = run_main("benchmark", [flag], capsys)
  assert code == 2
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
  assert out == ""
