"""brjax.bench: the quantized-step measurements of unmodified models, against float and Qwix."""

import pytest

from brjax import bench
from brjax import plain_models


@pytest.mark.slow
def test_quantized_model_steps_measures_every_form(monkeypatch):
  pytest.importorskip("qwix")  # .ci/run installs it: this runs in CI
  monkeypatch.setitem(bench.MODELS, "vit", plain_models.ViT)  # the small default: compiles fast
  lines = []
  result = bench.quantized_model_steps("vit", batch=8, image_size=16, rounds=1, steps=1,
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
    bench.quantized_model_steps("vgg")
