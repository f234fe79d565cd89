"""brjax.bench.training (the report and its targets) and brjax.bench.plain (unmodified models)."""

import json

import pytest

from brjax.bench import plain as bench_plain
from brjax.bench import training as bench
from brjax.models import plain as plain_models


def report_with(values: dict, json_out=None) -> bench.Report:
  report = bench.Report({"device": "1 x cpu (cpu)", "jax": "0.x", "cores": 2, "quick": False},
                        json_out)
  for name, value in values.items():
    report.add(name, value, "x", "a note" if name == "input_ratio" else "")
  report.close()
  return report


def test_report_writes_one_json_line_per_measurement(tmp_path):
  path = tmp_path / "bench.jsonl"
  report = report_with({"step_ratio_br": 1.1, "compiles_train_step": 2}, str(path))
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert [line["name"] for line in lines] == ["step_ratio_br", "compiles_train_step"]
  assert lines[1] == {"name": "compiles_train_step", "value": 2, "unit": "x",
                      "context": report.context}
  assert report.table().splitlines()[1].split() == ["step_ratio_br", "1.1", "x"]


def test_targets_pass_fail_and_skip():
  values = {"step_ratio_br": 1.2, "br_ratio_8bit_2bit": 0.8, "input_ratio": 5.0,
            "compiles_train_step": 2, "compiles_eval_step": 1}
  lines, ok = bench.check_targets(report_with(values), quick=False)
  assert not ok  # 1.2 > 1.15
  assert lines[0] == "FAIL  QAT+BR step / float step: step_ratio_br = 1.200 (target <= 1.15)"
  assert [line.split()[0] for line in lines] == ["FAIL", "PASS", "PASS", "PASS", "PASS",
                                                 "SKIP", "SKIP"]  # plain models not measured
  lines, ok = bench.check_targets(report_with(values), quick=True)
  assert ok and lines[0].startswith("SKIP") and "not checked with --quick" in lines[0]
  lines, ok = bench.check_targets(report_with({**values, "compiles_eval_step": None}), True)
  assert not ok and lines[4].startswith("FAIL")  # a count that could not be taken


def test_results_text_is_the_table_then_the_targets():
  text = bench.results_text(report_with({"step_ratio_br": 1.0}))
  table, targets = text.split("\n\nTargets (1 x cpu (cpu), jax 0.x, 2 cores):\n")
  assert table.startswith("measurement ") and len(targets.splitlines()) == len(bench.TARGETS)


@pytest.mark.slow
def test_quantized_model_steps_measures_every_form(monkeypatch):
  pytest.importorskip("qwix")  # .ci/run installs it: this runs in CI
  # The small default ViT: compiles fast.
  monkeypatch.setitem(bench_plain.MODELS, "vit", plain_models.ViT)
  lines = []
  result = bench_plain.quantized_model_steps("vit", batch=8, image_size=16, rounds=1, steps=1,
                                             qwix_bits=8, log=lines.append)
  assert result["qwix_error"] is None, result["qwix_error"]
  for key in ("float_s", "brjax_lsq_s", "brjax_s", "qwix_s"):
    assert result[key] > 0, key
  assert result["brjax_over_float"] == pytest.approx(result["brjax_s"] / result["float_s"])
  assert result["brjax_over_qwix"] == pytest.approx(result["brjax_s"] / result["qwix_s"])
  assert lines == [f"vit: compiled the {f} step" for f in ("float", "brjax_lsq", "brjax",
                                                           "qwix")]


def test_unknown_model():
  with pytest.raises(KeyError):
    bench_plain.quantized_model_steps("vgg")


@pytest.mark.slow
def test_scale_measurements_on_small_models():
  """bench_scale builds the training step as brjax.training.train does: the memory plans of the four
  variants, and float32 against bfloat16 step times.

  On ResNet-8, the smallest CIFAR ResNet: the same stem, blocks, projections and quantizers
  as ResNet-20 with a third of its layers to initialize, trace and compile (four steps
  here); its plans take a few MB (6.3 MB without A-BR, 6.5 MB with it)."""
  from brjax.bench import scale as bench_scale  # pylint: disable=g-import-not-at-top
  from brjax.training.config import Config  # pylint: disable=g-import-not-at-top
  config = Config(model="resnet8", batch_size=4)
  memory = bench_scale.step_memory(config, 32, num_classes=10, variants=("no_abr", "abr"))
  assert set(memory) == {"no_abr", "abr"}
  assert all(0 < megabytes < 1024 for megabytes in memory.values()), memory
  times = bench_scale.time_dtypes(config, 32, 1)
  assert times["float32"] > 0 and times["bfloat16"] > 0
  assert times["ratio"] == pytest.approx(times["bfloat16"] / times["float32"])
