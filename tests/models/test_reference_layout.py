"""The reference ResNet-18 layout, PyTorch's BatchNorm, ResNet-20 option A, and 1-bit models.

(Layer-for-layer agreement with a PyTorch ResNet-18 is in test_torch_import.py; the whole
training run in test_seed_equivalence.py.)
"""

from __future__ import annotations

import functools

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.models import cifar as models
from brjax.models import reference_resnet
from brjax.quant import lsq as quant
from brjax.quant import regularizer, sites


def _init(model, x, train):
  """``model.init(key(1), x, train=train)`` jitted: one compile, where eagerly each op and
  parameter shape is one (the same values)."""
  return jax.jit(functools.partial(model.init, train=train))(jax.random.key(1), x)


def _shapes(model, batch=1):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros((batch, 32, 32, 3)))


def test_parameter_counts_are_the_usual_ones():
  count = lambda m: sum(x.size for x in jax.tree.leaves(_shapes(m)["params"]))
  assert count(models.create_model("resnet18_reference")) == 11_173_962  # torchvision, CIFAR
  assert count(models.create_model("resnet20_option_a")) == 269_722  # He et al.'s 0.27M
  assert count(models.create_model("resnet18_reference", width=8)) < 200_000


def test_reference_layout_names_and_shared_activation_quantizers():
  model = models.create_model("resnet18_reference", bits_w=2, bits_a=2, width=8)
  params = traverse_util.flatten_dict(_shapes(model)["params"], sep="/")
  alphas = sorted(p for p in params if p.endswith("/alpha"))
  act = [p for p in alphas if "relu" in p]
  assert len(alphas) == 21 + 9 and len(act) == 9  # one step size per relu module
  assert "layer2_0/downsample_0/kernel" in params and "layer2_0/downsample_1/scale" in params
  assert not any(p.startswith("layer1_0/downsample") for p in params)
  assert params["layer2_0/conv1/kernel"].shape == (3, 3, 8, 16)
  assert params["fc/kernel"].shape == (64, 10) and "fc/bias" in params


@pytest.mark.slow
def test_a_shared_relu_sows_only_its_last_call_and_that_call_feeds_the_next_layer():
  model = models.create_model("resnet18_reference", bits_w=2, bits_a=2, width=4)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = _init(model, x, train=False)
  logits, state = jax.jit(functools.partial(model.apply, train=False,
                                            mutable=[sites.COLLECTION]))(variables, x)
  sown = state[sites.COLLECTION]
  assert len(sown["layer4_1"]["relu"][sites.OUTPUT]) == 1  # not 2: A-BR sees one call
  assert len(list(sites.iterate(sown, (sites.INPUT, sites.OUTPUT)))) == 9
  # The sown value is the post-add call's input: quantized, pooled and through fc, it gives
  # the logits (the first call's would not).
  @jax.jit  # one compile, not one per eager op
  def head_and_br(sown, p):
    y = sown["layer4_1"]["relu"][sites.OUTPUT][0].values
    qn, qp = quant.qrange(2, signed=False)
    feats = jnp.mean(quant.lsq_quantize(y, p["layer4_1"]["relu"]["alpha"], qn, qp, 1.0), (1, 2))
    wn, wp = quant.qrange(2, signed=True)
    kernel = quant.lsq_quantize(p["fc"]["kernel"], p["fc"]["alpha"], wn, wp, 1.0)
    return feats @ kernel + p["fc"]["bias"], regularizer.activation_br(sown)

  head, a_br = head_and_br(sown, variables["params"])
  chex.assert_trees_all_close(head, logits, rtol=1e-5, atol=1e-5)
  assert float(a_br) > 0


def test_torch_batchnorm_statistics():
  bn = reference_resnet.TorchBatchNorm()
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 2.0 + 1.0
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  chex.assert_trees_all_equal(variables["batch_stats"]["var"], jnp.ones(2))  # no update at init
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  xs = np.asarray(x).reshape(-1, 2)
  n = xs.shape[0]
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 + 0.1 * xs.var(0) * n / (n - 1), rtol=1e-5)  # unbiased
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2),
                             (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), rtol=1e-4,
                             atol=1e-5)  # normalized with the biased variance
  eval_y = bn.apply({**variables, **updates}, x, use_running_average=True)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(np.asarray(eval_y).reshape(-1, 2),
                             (xs - stats["mean"]) / np.sqrt(stats["var"] + 1e-5), rtol=1e-4,
                             atol=1e-5)


def test_option_a_shortcut_subsamples_and_zero_pads():
  block = models.BasicBlockOptionA(8, conv=functools.partial(models.nn.Conv, use_bias=False),
                                   norm=functools.partial(models.nn.BatchNorm,
                                                          use_running_average=True),
                                   act=lambda: jax.nn.relu, strides=2)
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
  variables = block.init(jax.random.key(1), x)
  # Zero the residual branch (its last BN scale starts at 0): the block is relu(shortcut).
  y = block.apply(variables, x)
  want = jnp.pad(jax.nn.relu(x[:, ::2, ::2, :]), ((0, 0), (0, 0), (0, 0), (2, 2)))
  chex.assert_trees_all_close(y, want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "resnet18_reference"])
def test_one_bit_models_are_ternary_and_binary(name):
  kwargs = {"width": 4} if name == "resnet18_reference" else {}
  model = models.create_model(name, bits_w=1, bits_a=1, **kwargs)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = _init(model, x, train=True)

  @jax.jit  # one compile, not one per eager op
  def forward_and_br(variables, x):
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats", sites.COLLECTION])
    recorded = state[sites.COLLECTION]
    return recorded, regularizer.weight_br(recorded), regularizer.activation_br(recorded)

  recorded, w_br, a_br = forward_and_br(variables, x)
  flat = traverse_util.flatten_dict(jax.device_get(variables["params"]))
  for path, alpha in flat.items():
    if path[-1] == "alpha" and path[:-1] + ("kernel",) in flat:
      codes = np.round(np.clip(flat[path[:-1] + ("kernel",)] / alpha, -1, 1))
      assert set(np.unique(codes)) == {-1.0, 0.0, 1.0}, path
  # BR at 1 bit uses the quantizer's own ranges: (-1, 1) for weights, (0, 1) activations.
  assert float(w_br) > 0
  assert float(a_br) > 0
  for _, _, site in sites.iterate(recorded):
    assert site.levels in (2, 3)  # binary activations, ternary weights
  with pytest.raises(ValueError, match="bits=0 is not supported"):
    models.create_model(name, bits_w=0, **kwargs)


def test_width_is_the_reference_models_option_only():
  with pytest.raises(ValueError, match="width=8 is not supported for model='resnet20'"):
    models.create_model("resnet20", width=8)
  with pytest.raises(ValueError, match="width=0 is not supported"):
    models.create_model("resnet18_reference", width=0)
