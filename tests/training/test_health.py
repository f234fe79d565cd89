"""Step-size health in every epoch record (brjax.training.health)."""

from __future__ import annotations

import math

from brjax.training import health


def _quant(w, a, clipped=0.1):
  return {"weights": {"conv": {"alpha": w, "clipped_top": 0.0}},
          "activations": {"relu0": {"alpha": 1.0, "clipped_top": 0.0},
                          "relu1": {"alpha": a, "clipped_top": clipped}}}


def test_ratios_are_against_the_first_epoch():
  first = _quant(0.2, 0.5)
  h = health.step_size_health(_quant(0.1, 0.04, clipped=0.6), first)
  assert h["weights"]["min_ratio"] == 0.5 and h["weights"]["min_layer"] == "conv"
  assert math.isclose(h["activations"]["min_ratio"], 0.08)
  assert h["activations"]["min_layer"] == "relu1"
  assert math.isclose(h["activations"]["clipped_top"], 0.3)
  assert (h["activations"]["clipped_top_max"], h["activations"]["clipped_top_layer"]) == (
      0.6, "relu1")
  assert health.step_size_health(first, first)["activations"]["min_ratio"] == 1.0


def test_a_step_size_that_lost_90_percent_warns_and_one_that_lost_less_does_not():
  first = _quant(0.2, 0.5)
  assert health.warnings(health.step_size_health(_quant(0.1, 0.06), first)) == []
  lines = health.warnings(health.step_size_health(_quant(0.1, 0.04), first))
  assert len(lines) == 1 and lines[0].startswith("WARNING: the activation step size of relu1")
  assert "0.08 of its value after epoch 1" in lines[0]
  nan = health.step_size_health(_quant(float("nan"), 0.5), first)
  assert len(health.warnings(nan)) == 1


def test_first_epoch_quant_of_a_history():
  records = [{"epoch": 1, "quant": _quant(1, 1)}, {"epoch": 2, "quant": _quant(2, 2)}]
  assert health.first_epoch_quant(records) == _quant(1, 1)
  assert health.first_epoch_quant([]) is None
