"""Export and .pth of a model with ``log`` step sizes (brjax.quant.step_size): every
reader sees alpha = exp(theta)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

import brjax
from brjax.export import npz, packed, torch_import
from brjax.models import cifar
from brjax.quant import step_size

X = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


def _log_model():
  model = brjax.quantize_model(Net(), [brjax.QuantRule(".*", weight_bits=2, act_bits=2,
                                                       alpha_param="log")])
  return model, model.init(jax.random.key(1), X)


@pytest.mark.slow
def test_packed_export_of_a_log_model_gives_the_same_logits():
  model, variables = _log_model()
  exported = packed.from_linen(model, variables, X)
  assert all(e["step_size"][-1] == "log_alpha" for e in exported.header["kernels"])
  restored = npz.to_variables(exported)
  chex.assert_trees_all_close(model.apply(restored, X), model.apply(variables, X),
                              rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_pth_out_and_back_in_a_log_model():
  model = cifar.create_model("resnet18_reference", bits_w=2, bits_a=2, width=4,
                             alpha_param="log")
  variables = model.init(jax.random.key(0), jax.numpy.ones((2, 32, 32, 3)), train=False)
  state_dict = torch_import.to_state_dict(variables)
  key = next(k for k in state_dict if k.endswith("weight_quantizer.alpha"))
  assert all(not k.endswith("log_alpha") for k in state_dict)
  loaded, has_alphas = torch_import.load_state_dict(variables, state_dict)
  assert has_alphas and np.all(state_dict[key] > 0)
  chex.assert_trees_all_close(loaded["params"], variables["params"], rtol=1e-6, atol=1e-6)


def test_onnx_export_of_a_log_model():
  pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  from brjax.export import onnx_export  # pylint: disable=g-import-not-at-top
  model, variables = _log_model()
  proto = onnx_export.to_onnx(model, variables, X)
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  got = session.run(None, {"input": np.asarray(X)})[0]
  np.testing.assert_allclose(got, np.asarray(model.apply(variables, X)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_integer_export_reads_log_step_sizes():
  from brjax.export import integer  # pylint: disable=g-import-not-at-top
  lin = cifar.create_model("resnet20", bits_w=2, bits_a=2)
  log = cifar.create_model("resnet20", bits_w=2, bits_a=2, alpha_param="log")
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  v_log = log.init(jax.random.key(0), x, train=False)
  v_lin = {**v_log, "params": step_size.linear_params(v_log["params"])}
  chex.assert_trees_all_close(log.apply(v_log, x, train=False),
                              lin.apply(v_lin, x, train=False), rtol=1e-5, atol=1e-5)
  got = integer.export_model(v_log, model="resnet20", bits_w=2, bits_a=2)
  want = integer.export_model(v_lin, model="resnet20", bits_w=2, bits_a=2)
  assert got.header["activations"] == want.header["activations"]
  for name, value in want.arrays.items():
    np.testing.assert_array_equal(got.arrays[name], value, err_msg=name)
