"""An exported model in onnxruntime (CPU), checked against brjax.

* :func:`session`: an ``onnxruntime.InferenceSession`` on the CPU execution provider;
* :func:`integer_kernels`: per quantized kernel, the op that runs it in ORT's optimized
  graph (``SessionOptions.optimized_model_filepath``), and whether it is an integer kernel;
* :func:`compare_codes`: the codes of every quantized activation in ORT against brjax's,
  ``round(clip(x / alpha, qn, qp))`` of the values its sites record, with ties counted;
* :func:`predict`: logits of a dataset's worth of images, in batches.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import json
import os
import tempfile
from typing import Any

import numpy as np

INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "NhwcQLinearConv",
               "DynamicQuantizeConvInteger")
"""Operators that run a convolution or matmul in integer arithmetic (ONNX and ORT's fused
contrib ops)."""

TIE = 1e-4
"""``|frac(x / alpha) - 0.5| < TIE``: a value at a rounding boundary, where float sums in
another order (ORT's against XLA's) may round to the neighbouring code."""


def _ort():
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("checking in onnxruntime needs it: pip install 'brjax[onnx]'") from e
  return onnxruntime


def session(model: Any, *, optimized_path: str | None = None, threads: int = 0,
            optimize: bool = True) -> Any:
  """An ``InferenceSession`` (CPU EP) of a ModelProto, its bytes or a path.

  ``optimized_path``: where ORT writes the graph it runs; ``threads``: intra-op threads
  (0: ORT's default); ``optimize``: False disables graph optimizations.
  """
  ort = _ort()
  options = ort.SessionOptions()
  options.log_severity_level = 3
  if threads:
    options.intra_op_num_threads = threads
  if optimized_path:
    options.optimized_model_filepath = optimized_path
  if not optimize:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
  return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def metadata(model: Any) -> dict[str, Any]:
  """The ``brjax.*`` entries of an exported model's ``metadata_props``, decoded."""
  return {p.key: json.loads(p.value) for p in model.metadata_props
          if p.key.startswith("brjax.")}


def integer_kernels(model: Any) -> dict[str, str]:
  """``{kernel site: the op that consumes its codes in ORT's optimized graph}``.

  A site whose codes no longer appear (ORT folded ``DequantizeLinear`` of the
  initializer into float weights) maps to ``"float (dequantized at load)"``. The
  kernel runs as an integer kernel iff its op is in :data:`INTEGER_OPS`.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "optimized.onnx")
    session(model, optimized_path=path)
    optimized = onnx.load(path)
  consumers: dict[str, list[str]] = {}
  for node in optimized.graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node.op_type)
  found = {}
  for site, init in metadata(model)["brjax.kernels"].items():
    ops = consumers.get(init, [])
    integer = [op for op in ops if op in INTEGER_OPS]
    found[site] = (integer or ops or ["float (dequantized at load)"])[0]
  return found


def run(sess: Any, images: np.ndarray) -> dict[str, np.ndarray]:
  """Every output of one batch, by name."""
  names = [o.name for o in sess.get_outputs()]
  return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: np.asarray(
      images, np.float32)})))


@dataclasses.dataclass(frozen=True)
class CodesReport:
  """Per quantized activation, in call order: ``(codes, mismatched, at a tie in brjax,
  max |diff|)``."""
  sites: dict[str, tuple[int, int, int, int]]

  @property
  def total(self) -> tuple[int, int, int]:
    """``(codes, mismatched, mismatched at a tie)`` over all sites."""
    n = sum(v[0] for v in self.sites.values())
    return n, sum(v[1] for v in self.sites.values()), sum(v[2] for v in self.sites.values())


def brjax_codes(collection: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{site: (codes, v = x / alpha)}`` of the activation sites of a ``"quant"``
  collection, with the quantizer's float ops; a stacked (scanned) site as ``site[i]``."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from brjax.quant import lsq, sites  # pylint: disable=g-import-not-at-top
  out = {}
  for name, site in sites.named(collection, (sites.INPUT, sites.OUTPUT)).items():
    values, alpha, qn = sites.grouped(site)
    v = jnp.asarray(values, jnp.float32) / lsq.safe_alpha(jnp.asarray(alpha, jnp.float32))
    codes = np.asarray(jnp.round(jnp.clip(v, qn, qn + site.levels - 1)))
    lead = values.ndim - site.ndim
    if lead:
      for i in range(values.shape[0]):
        out[_indexed(name, i)] = codes[i], np.asarray(v[i])
    else:
      out[name] = codes, np.asarray(v)
  return out


def _indexed(name: str, i: int) -> str:
  base, _, call = name.partition("#")
  return f"{base}[{i}]" + (f"#{call}" if call else "")


def compare_codes(ort_outputs: dict[str, np.ndarray], reference: dict[str, tuple]
                  ) -> CodesReport:
  """Compares ``codes/<site>`` outputs (``to_onnx(codes_outputs=True)``) with
  :func:`brjax_codes`; raises if a site is missing on either side or shapes differ."""
  from brjax.export.onnx_export import CODES_PREFIX  # pylint: disable=g-import-not-at-top
  got = {k[len(CODES_PREFIX):]: v for k, v in ort_outputs.items()
         if k.startswith(CODES_PREFIX)}
  for name in set(reference) - set(got):  # a shared ReLU whose site keeps its last call
    calls = sorted((int(k.rpartition("#")[2]), k) for k in got if k.rpartition("#")[0] == name)
    if calls:
      got = {(name if k == calls[-1][1] else k): v for k, v in got.items()
             if k == calls[-1][1] or k.rpartition("#")[0] != name}
  if set(got) != set(reference):
    raise ValueError(f"sites differ: only in ONNX {sorted(set(got) - set(reference))}, "
                     f"only in brjax {sorted(set(reference) - set(got))}")
  report = {}  # in call order (the ONNX outputs')
  for name in sorted(reference, key=list(got).index):
    codes, v = reference[name]
    ours = got[name].astype(np.int64)
    if ours.shape != codes.shape:
      raise ValueError(f"{name}: ONNX codes of shape {ours.shape}, brjax's {codes.shape}")
    wrong = ours != codes
    tie = np.abs(np.abs(v - np.floor(v)) - 0.5) < TIE
    report[name] = (int(codes.size), int(wrong.sum()), int((wrong & tie).sum()),
                    int(np.abs(ours - codes).max(initial=0)))
  return CodesReport(report)


def predict(sess: Any, batches: Iterable[np.ndarray]) -> np.ndarray:
  """The first output (logits) of every batch, concatenated."""
  name = sess.get_inputs()[0].name
  out = sess.get_outputs()[0].name
  return np.concatenate([sess.run([out], {name: np.asarray(b, np.float32)})[0]
                         for b in batches])
