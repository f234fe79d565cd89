"""ONNX export (brjax.export.to_onnx) run and checked in onnxruntime against brjax."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("onnx", reason="ONNX export needs the onnx package (brjax[onnx])")
pytest.importorskip("onnxruntime", reason="the checks need onnxruntime (brjax[onnx])")

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
import flax.linen as nn

from brjax.export import onnx_check, onnx_export, packed
from brjax.models import cifar, paper, plain
from brjax.quant import lsq
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule

REPO = pathlib.Path(__file__).resolve().parents[2]

LOGIT_TOL = 1e-4
"""Logits (relative to their largest magnitude) where no code differs: float sums in
another order (int32 accumulators in ORT)."""
MISMATCH_TOL = 1e-3
"""Fraction of activation codes that may differ from brjax's (ties, and what they change
downstream)."""


def _images(size: int, n: int = 4, seed: int = 1) -> np.ndarray:
  return np.asarray(jax.random.normal(jax.random.key(seed), (n, size, size, 3)) * 1.5)


@functools.cache
def _linen(name: str):
  """``(model, variables, images)`` of a small quantized Linen model."""
  size = 32
  if name == "resnet20_w2a2":
    model = cifar.create_model("resnet20", bits_w=2, bits_a=2)
  elif name == "resnet20_option_a_w4a4":
    model = cifar.create_model("resnet20_option_a", bits_w=4, bits_a=4)
  elif name == "resnet20_w1a4_per_channel":
    model = cifar.create_model("resnet20", bits_w=1, bits_a=4, per_channel=True)
  elif name == "resnet18_w2a2":
    model = cifar.create_model("resnet18", bits_w=2, bits_a=2)
  elif name == "resnet18_reference_w4a4":
    model = cifar.create_model("resnet18_reference", bits_w=4, bits_a=4, width=8)
  elif name == "resnet18_imagenet":
    model = paper.create_model(name, bits_w=4, bits_a=4, num_classes=10, image_size=size)
  elif name == "resnet50":  # one bottleneck a stage (every layer kind, a third of the compile)
    base = paper.ResNet(stage_sizes=(1, 1, 1, 1), block=paper.Bottleneck, num_classes=10,
                        small_inputs=True)
    model = quantize_model(base, paper.paper_rules("resnet50", 4, 4))
  elif name == "mobilenet_v2":
    base = paper.MobileNetV2(num_classes=10, small_inputs=True,
                             stages=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2)))
    model = quantize_model(base, paper.paper_rules("mobilenet_v2", 4, 4))
  elif name.startswith("vit"):
    size = 16
    model = quantize_model(plain.ViT(scan=name == "vit_scan"),
                           QuantRule(".*", weight_bits=4, act_bits=4))
  else:
    raise ValueError(name)
  images = _images(size)
  return model, _variables(model, images), images


def _variables(model, images):
  """Variables of ``model`` without compiling its init: shapes from ``jax.eval_shape``;
  from numpy, kernels He normal, BatchNorm scales and variances one, every other float
  zero; then every step size (and data-decided input sign) the LSQ way from ``images`` by
  ``lsq.init_alphas`` (eval mode), as ``model.init`` sets them.

  ``model.init``'s random initializers and checks compile to a program about twice the
  forward pass's (the shortened MobileNetV2: ~5 s at the tests' XLA level; this way ~2 s)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          images)
  rng = np.random.default_rng(0)

  def value(path, leaf):
    if path[-1].key == "kernel":  # He normal over all but the output axis
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
    return (np.ones if path[-1].key in ("scale", "var") else np.zeros)(leaf.shape, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(value, shapes)
  return jax.jit(functools.partial(lsq.init_alphas, model, train=False))(variables, images)


class _CNN(nnx.Module):
  """A CNN as third-party NNX code writes it."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


def _nnx_cnn():
  images = _images(8)
  model = quantize_model(_CNN(nnx.Rngs(0)),
                         [QuantRule("conv1", weight_bits=4, act_bits=8, act_signed=True),
                          QuantRule(".*", weight_bits=2, act_bits=2, act_signed=False)], images)
  model.eval()
  return model, images


def _recorded(model, variables, images):
  """brjax's logits and ``"quant"`` collection (jitted)."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["quant"]))(
      variables, images)


def _export(name: str, **kwargs):
  model, variables, images = _linen(name)
  proto = onnx_export.to_onnx(model, variables, images[:2], train=False, **kwargs)
  return proto, model, variables, images


def _check_against_brjax(proto, logits, collection, images, mismatch_tol=MISMATCH_TOL):
  """ORT's logits and activation codes against brjax's; returns the codes report."""
  outputs = onnx_check.run(onnx_check.session(proto), images)
  report = onnx_check.compare_codes(outputs, onnx_check.brjax_codes(collection))
  n, wrong, at_ties = report.total
  logits = np.asarray(logits)
  np.testing.assert_array_equal(outputs["output"].argmax(-1), logits.argmax(-1))
  assert wrong <= mismatch_tol * n, report.sites
  if wrong == 0:
    np.testing.assert_allclose(outputs["output"], logits,
                               atol=LOGIT_TOL * np.abs(logits).max(), rtol=0)
  else:  # the first site that differs differs only at ties: the rest follows from them
    first = next(site for site, r in report.sites.items() if r[1])
    assert report.sites[first][1] == report.sites[first][2], (first, report.sites[first])
  del at_ties
  return report


FAST = ("resnet20_w2a2",)
SLOW = ("mobilenet_v2", "vit_scan", "resnet20_option_a_w4a4", "resnet20_w1a4_per_channel",
        "resnet18_reference_w4a4", "resnet18_imagenet", "vit", "resnet18_w2a2", "resnet50")
ALL_INTEGER = ("resnet18_imagenet", "resnet50", "mobilenet_v2")
"""Every quantized layer's input is quantized: all run as integer kernels."""
STEM_FLOAT = {"resnet20_w2a2": "conv_init", "resnet20_option_a_w4a4": "conv_init",
              "resnet20_w1a4_per_channel": "conv_init", "resnet18_w2a2": "conv_init",
              "resnet18_reference_w4a4": "conv1"}
"""brjax's CIFAR ResNets quantize the stem's kernel but not its input (the image): the stem
runs in float on dequantized codes, every other layer as an integer kernel."""


@pytest.mark.parametrize("name", [*FAST, *[pytest.param(n, marks=pytest.mark.slow)
                                           for n in SLOW]])
def test_onnx_matches_brjax(name):
  proto, model, variables, images = _export(name, codes_outputs=True)
  logits, state = _recorded(model, variables, images)
  report = _check_against_brjax(proto, logits, state["quant"], images)
  assert report.total[0] > 0
  # every kernel's codes are packed.from_linen's (an independent numpy computation)
  codes = packed.from_sites(variables, state["quant"]).codes  # numpy's weight_codes
  inits = {i.name: i for i in proto.graph.initializer}
  from onnx import numpy_helper
  kernels = onnx_check.metadata(proto)["brjax.kernels"]
  assert len({k.partition("[")[0] for k in kernels}) == len(codes)
  for site, init in kernels.items():
    ours = numpy_helper.to_array(inits[init])
    site_path, _, layer = site.partition("[")
    ref = codes["/".join(("params", site_path, "kernel"))]
    ref = ref[int(layer[:-1])] if layer else ref
    ref = ref.transpose(3, 2, 0, 1) if ours.ndim == 4 else ref.reshape(ours.shape)
    np.testing.assert_array_equal(ours, ref, err_msg=site)


@pytest.mark.parametrize("name", [
    *[n for n in FAST if n in (*ALL_INTEGER, *STEM_FLOAT)],
    *[pytest.param(n, marks=pytest.mark.slow) for n in SLOW
      if n in (*ALL_INTEGER, *STEM_FLOAT)]])
def test_quantized_layers_run_as_integer_kernels(name):
  proto = _export(name)[0]
  ops = onnx_check.integer_kernels(proto)
  floats = {s: op for s, op in ops.items() if op not in onnx_check.INTEGER_OPS}
  print(name, ops)
  if name in ALL_INTEGER:
    assert not floats, floats
  else:
    assert set(floats) == {STEM_FLOAT[name]}, floats
  assert len(ops) >= 10


@pytest.mark.parametrize("name", ["vit_scan", pytest.param("vit", marks=pytest.mark.slow)])
def test_vit_dense_layers_run_as_integer_kernels(name):
  if True:  # pylint: disable=using-constant-test
    ops = onnx_check.integer_kernels(_export(name)[0])
    floats = {s: op for s, op in ops.items() if op not in onnx_check.INTEGER_OPS}
    # only the patch embedding's input (the image) is unquantized... and it is quantized
    # here (act_bits on every layer): every kernel is an integer kernel
    assert not floats, (name, floats)
    assert any("[1]" in s for s in ops) == (name == "vit_scan")


def test_qdq_form_runs_and_matches():
  proto, model, variables, images = _export("resnet20_w2a2", codes_outputs=True,
                                            integer_ops=False)
  assert not any(n.op_type in ("ConvInteger", "MatMulInteger") for n in proto.graph.node)
  assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) >= 20
  logits, state = _recorded(model, variables, images)
  _check_against_brjax(proto, logits, state["quant"], images)


@pytest.mark.slow
def test_nnx_cnn():
  model, images = _nnx_cnn()
  proto = onnx_export.to_onnx(model, images[:2], codes_outputs=True)
  from brjax.quant import nnx as brjax_nnx
  logits, collection = brjax_nnx.record_sites(model, images)
  _check_against_brjax(proto, logits, collection, images)
  ops = onnx_check.integer_kernels(proto)
  assert set(ops) == {"conv1", "conv2", "head"}
  assert all(op in onnx_check.INTEGER_OPS for op in ops.values()), ops


@pytest.mark.slow
def test_any_batch_size():
  """Also where model code needs a concrete batch size (the reference's gradient scale
  ``1/sqrt(x.size qp)``): traced at a stand-in batch size."""
  model = cifar.create_model("resnet20", bits_w=2, bits_a=2, act_grad_scale="batch")
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                                   _images(32))
  proto = onnx_export.to_onnx(model, variables, _images(32, 1), train=False)
  assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
  sess = onnx_check.session(proto)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  for n in (1, 5):
    images = _images(32, n, seed=n)
    np.testing.assert_allclose(onnx_check.run(sess, images)["output"], apply(images),
                               atol=1e-4)


def test_activation_codes_span_exactly_the_range():
  """A 2-bit unsigned activation in a uint8 container: codes 0..3, ties half to even."""

  class Act(nn.Module):
    @nn.compact
    def __call__(self, x):
      return lsq.QuantReLU(bits=2)(x)

  model = Act()
  variables = {"params": {"QuantReLU_0": {"alpha": jnp.asarray(0.25, jnp.float32)}}}
  x = np.asarray([[0.0, 0.125, 0.375, 0.5, 0.625, 0.875, 1.0, 100.0, -3.0, 0.3, 0.74, 0.76]],
                 np.float32)  # 0.125 = 0.5 alpha and 0.625 = 2.5 alpha: ties to even
  proto = onnx_export.to_onnx(model, variables, x, codes_outputs=True)
  out = onnx_check.run(onnx_check.session(proto), x)
  np.testing.assert_array_equal(out["codes/QuantReLU_0"], [[0, 0, 2, 2, 2, 3, 3, 3, 0, 1, 3, 3]])
  np.testing.assert_array_equal(out["output"], model.apply(variables, x))
  assert any(n.op_type == "Clip" for n in proto.graph.node)


def test_unsupported_op_stops_with_one_line():

  class Sorts(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = lsq.QuantDense(4, bits=4, name="dense")(x)
      return jnp.cumsum(nn.Dense(4, name="after")(x), axis=-1)

  model = Sorts()
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(onnx_export.ExportError) as e:
    onnx_export.to_onnx(model, variables, x)
  message = str(e.value)
  assert "\n" not in message and "cumsum" in message and "Sorts" in message, message


def test_importing_brjax_does_not_import_onnx():
  code = ("import sys, brjax, brjax.export; brjax.export.to_onnx; "
          "assert not {'onnx', 'onnxruntime'} & set(sys.modules), 'onnx imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_run_accuracy_in_onnxruntime(tiny_run, cifar_dir, tmp_path):
  """A trained W2A2 ResNet-20 run: ORT's top-1 equals brjax's on (a subset of) its test
  split. The whole test set: scripts/evaluate.py --onnx (see the docs)."""
  import onnx

  from brjax.export import onnx_run
  workdir, _ = tiny_run
  path = str(tmp_path / "model.onnx")
  onnx.save(onnx_run.export_run(workdir), path)
  result = onnx_run.compare_run(workdir, path, data_dir=cifar_dir, limit=128, batch_size=64)
  print(result)
  assert result["count"] == 128
  assert result["top1_agreement"] == 1.0
  assert result["onnx_acc"] == result["brjax_acc"]
  assert result["max_logit_diff"] <= 1e-3 * max(1.0, result["logit_scale"])


def test_a_model_without_quantizers_is_an_error_not_a_float_graph():
  model = nn.Dense(4)
  x = jnp.ones((2, 8))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(onnx_export.ExportError, match="records no brjax quantizer"):
    onnx_export.to_onnx(model, variables, x)


@pytest.mark.slow
def test_onnx_agrees_with_the_independent_integer_reference(tiny_run):
  """The ONNX graph in ORT against brjax's own integer inference (``integer_inference``, on
  uint8 pixels, exact int32 accumulations): two integer paths written apart, from the same
  trained W2A2 run, give the same classes and logits within ``MISMATCH_TOL`` of their scale.
  (Why both paths stay: the docs' export guide.)"""
  from brjax.data import input_pipeline
  from brjax.export import integer as integer_export
  from brjax.export import integer_inference, onnx_run
  from brjax.training import checkpoint
  workdir, _ = tiny_run
  _, meta = checkpoint.restore_pretrained(workdir)
  config = meta["config"]
  ds = input_pipeline.load_dataset(config["dataset"], config["data_dir"],
                                   train_examples=config["train_examples"],
                                   test_examples=config["test_examples"])
  batch = next(input_pipeline.eval_batches(ds, len(ds.test_labels)))
  sess = onnx_check.session(onnx_run.export_run(workdir))
  ort_logits = onnx_check.predict(sess, [batch["image"]])
  exported = integer_export.export_run(workdir)
  int_logits = np.asarray(integer_inference.integer_forward(exported, ds.test_images))
  assert ort_logits.shape == int_logits.shape == (128, 10)
  np.testing.assert_array_equal(ort_logits.argmax(1), int_logits.argmax(1))
  scale = max(1.0, float(np.abs(int_logits).max()))
  assert float(np.abs(ort_logits - int_logits).max()) <= MISMATCH_TOL * scale


@pytest.mark.slow
@pytest.mark.parametrize("workdir,prefer", [
    ("checkpoints/study_evidence_W2A2/warmup_s0", "latest"),  # W2A2, 5 LSQ epochs: 57.05%
    ("checkpoints/resnet20_W4A4_lsq_1ep", "best")])  # W4A4, 1 LSQ epoch: 80.26%
def test_trained_resnet20s_give_brjaxs_classes_in_onnxruntime(cifar_dir, workdir, prefer):
  """The committed trained W2A2 and W4A4 ResNet-20s, exported and run in ORT: top-1 equal to
  brjax's on >= 99.9% of the first 1,000 test images (the whole test set, measured with
  scripts/evaluate.py --onnx: 99.99% and 100.00%; the docs' export guide)."""
  from brjax.export import onnx_run
  path = str(REPO / workdir)
  result = onnx_run.compare_run(path, onnx_run.export_run(path, prefer=prefer), prefer=prefer,
                                data_dir=cifar_dir, limit=1000, batch_size=250)
  assert result["count"] == 1000
  assert result["top1_agreement"] >= 0.999, result
  assert abs(result["onnx_acc"] - result["brjax_acc"]) <= 0.1, result
