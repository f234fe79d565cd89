"""The ONNX integer model in onnxruntime against its float ONNX export and brjax's evaluation.

For a W2A2 CIFAR ResNet (random weights: timing does not depend on them) exported by
``brjax.export.to_onnx``:

* ``onnx_int``: the exported model (ConvInteger/MatMulInteger on the codes);
* ``onnx_qdq``: the same model in QDQ form (``integer_ops=False``): what ORT runs of it;
* ``onnx_float``: the float model (``bits=32``, same architecture) exported the same way;
* ``brjax``: the quantized model's jitted ``model.apply(train=False)`` (XLA, fake-quant).

Each: latency at batch 1 (median of ``reps`` calls), throughput at batch 128 (images/s,
median), all on this machine's CPU (ORT's CPU execution provider, its default threads;
XLA on ``jax.devices()[0]``); and the file size of each ONNX model.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import os
import tempfile
from typing import Any

import jax
import numpy as np

from brjax.bench.report import median_time
from brjax.models import cifar
from brjax.quant.bits import FLOAT_BITS


def available() -> bool:
  """Whether onnx and onnxruntime are installed (the ``brjax[onnx]`` extra)."""
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(onnx.__version__ and onnxruntime.__version__)


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
  fn()  # warm up (and compile)
  return median_time(fn, reps)


def time_onnx(report: Any, model_name: str = "resnet20", *, bits: int = 2, reps: int = 20,
              batch: int = 128, log: Callable[[str], None] = lambda _: None) -> dict:
  """Adds ``onnx/<variant>/{latency_b1, throughput_b<batch>, file}`` to ``report``."""
  import onnx  # pylint: disable=g-import-not-at-top

  from brjax.export import onnx_check, onnx_export  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  big = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
  one = big[:1]
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    sessions = {}
    for variant, model_bits, integer_ops in (("onnx_int", bits, True),
                                             ("onnx_qdq", bits, False),
                                             ("onnx_float", FLOAT_BITS, True)):
      model = cifar.create_model(model_name, bits_w=model_bits, bits_a=model_bits)
      variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), one)
      path = os.path.join(tmp, f"{variant}.onnx")
      onnx.save(onnx_export.to_onnx(model, variables, one, train=False,
                                    integer_ops=integer_ops), path)
      sessions[variant] = onnx_check.session(path)
      report.add(f"onnx/{variant}/file", os.path.getsize(path) / 1024, "KiB")
      if variant == "onnx_int":
        apply = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
        sessions["brjax"] = lambda x, v=variables, f=apply: f(v, x).block_until_ready()
    for variant, run in sessions.items():
      log(f"onnx: {variant}")
      call = run if callable(run) and not hasattr(run, "run") else (
          lambda x, s=run: s.run(None, {"input": x}))
      latency = _median_seconds(lambda c=call: c(one), reps)
      per_batch = _median_seconds(lambda c=call: c(big), max(3, reps // 4))
      report.add(f"onnx/{variant}/latency_b1", latency * 1e3, "ms",
                 f"{model_name} W{bits}A{bits}, CPU")
      report.add(f"onnx/{variant}/throughput_b{batch}", batch / per_batch, "images/s")
      results[variant] = {"latency_ms": latency * 1e3, "images_per_s": batch / per_batch}
  return results
