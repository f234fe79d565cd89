"""Tests of brjax.nnx: quantize_model on unmodified Flax NNX models, BR, freezing, nnx.jit."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax import metrics
from brjax import nnx as brjax_nnx
from brjax import optim
from brjax import quant
from brjax import regularizer
from brjax import sites
from brjax.quantize import quantize_model
from brjax.rules import QuantRule


# --- A model as third-party code writes it: no brjax in it. ---

class CNN(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.1):
    self.conv1 = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = self.dropout(jnp.mean(x, axis=(1, 2)))
    return self.head(x)


class Block(nnx.Module):

  def __init__(self, features: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(features, features, rngs=rngs)

  def __call__(self, x):
    return x + nnx.relu(self.linear(x))


class MLP(nnx.Module):
  """Blocks in a list, a layer called twice, and a layer the forward never calls."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(6, rngs=rngs) for _ in range(2)])
    self.shared = nnx.Linear(6, 6, rngs=rngs)
    self.unused = nnx.Linear(6, 6, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.shared(nnx.relu(self.shared(x)))


RULES = [QuantRule("conv1", weight_bits=4, act_bits=4, act_signed=True),
         QuantRule(".*", weight_bits=2, act_bits=2)]


def _images(seed=1, n=8):
  return jax.random.normal(jax.random.key(seed), (n, 8, 8, 3))


def _labels(n=8):
  return jnp.arange(n) % 10


def _quantized_cnn(**kwargs):
  return quantize_model(CNN(rngs=nnx.Rngs(0), **kwargs), RULES, _images())


def _flat(state):
  return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _step_size_paths(model):
  return sorted(p for p in _flat(nnx.state(model, nnx.Param)) if p.endswith("alpha"))


# --- quantize_model / quantize_nnx ---

def test_every_kernel_is_quantized_and_paths_are_kept():
  model = CNN(rngs=nnx.Rngs(0))
  before = _flat(nnx.state(model))
  out = quantize_model(model, RULES, _images())
  assert out is model
  assert brjax_nnx.quantized_layers(model) == {"conv1": RULES[0], "conv2": RULES[1],
                                               "head": RULES[1]}
  assert type(model.conv1).__name__ == "QuantConv" and isinstance(model.conv1, nnx.Conv)
  assert type(model.head).__name__ == "QuantLinear" and isinstance(model.head, nnx.Linear)
  after = _flat(nnx.state(model))
  assert set(before) <= set(after)
  assert sorted(set(after) - set(before)) == [f"{layer}/{name}" for layer in ("conv1", "conv2", "head")
                                              for name in ("alpha", "input_alpha")]
  params = _flat(nnx.state(model, nnx.Param))  # what nnx.Optimizer(wrt=nnx.Param) trains
  kernels = [p for p in params if p.endswith("/kernel")]
  assert len(kernels) == 3
  for path in kernels:
    assert isinstance(params[path.replace("kernel", "alpha")], nnx.Param)
    assert isinstance(params[path.replace("kernel", "input_alpha")], nnx.Param)


def test_init_is_lsq_from_the_kernels_and_the_sample_batch():
  x = _images()
  model = quantize_model(CNN(rngs=nnx.Rngs(0)), RULES, x)
  assert model.conv1.brjax_input_signed is True          # the rule's sign
  assert model.conv2.brjax_input_signed is False         # after a ReLU: decided unsigned
  assert model.head.brjax_input_signed is False
  np.testing.assert_allclose(model.conv1.alpha[...], quant.init_alpha(model.conv1.kernel[...], 7))
  np.testing.assert_allclose(model.conv2.alpha[...], quant.init_alpha(model.conv2.kernel[...], 1))
  np.testing.assert_allclose(model.conv1.input_alpha[...], quant.init_alpha(x, 7))
  # conv2's input step size comes from its input with conv1 already quantized: the site
  # values of the same (train-mode) forward.
  _, collection = brjax_nnx.record_sites(model, x)
  seen = collection["conv2"]["input"][0].values
  np.testing.assert_allclose(model.conv2.input_alpha[...], quant.init_alpha(seen, 3), rtol=1e-6)


def test_init_is_not_a_training_step():
  model = CNN(rngs=nnx.Rngs(0))
  before = _flat(nnx.as_pure(nnx.state(model)))
  quantize_model(model, RULES, _images())  # train mode: BatchNorm batch stats, dropout rngs
  after = _flat(nnx.as_pure(nnx.state(model)))
  assert any("mean" in p for p in before) and any("count" in p for p in before)
  for path, value in before.items():
    np.testing.assert_array_equal(_data(after[path]), _data(value), err_msg=path)
  model(_images())  # a training-mode call does move them: the check above can fail
  moved = _flat(nnx.as_pure(nnx.state(model)))
  assert not np.array_equal(moved["bn1/mean"], before["bn1/mean"])
  assert not np.array_equal(_data(moved["dropout/rngs/count"]),
                            _data(before["dropout/rngs/count"]))


def _data(x):
  return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def test_per_channel_and_other_layer_types():
  class Layers(nnx.Module):

    def __init__(self, rngs):
      self.general = nnx.LinearGeneral((4, 3), (2, 5), axis=(-2, -1), rngs=rngs)
      self.einsum = nnx.Einsum("bij,jk->bik", (5, 6), rngs=rngs)
      self.up = nnx.ConvTranspose(6, 3, kernel_size=(3,), rngs=rngs)
      self.up_t = nnx.ConvTranspose(3, 7, kernel_size=(3,), transpose_kernel=True, rngs=rngs)

    def __call__(self, x):  # x: (B, 4, 3)
      y = self.general(x)                     # (B, 2, 5)
      y = self.einsum(y)                      # (B, 2, 6)
      return self.up_t(self.up(y))            # (B, 2, 7)

  x = jax.random.normal(jax.random.key(0), (3, 4, 3))
  model = quantize_model(Layers(nnx.Rngs(0)), QuantRule(".*", weight_bits=3, act_bits=3,
                                                        per_channel=True), x)
  assert model.general.alpha.shape == (1, 1, 2, 5)
  assert model.einsum.alpha.shape == (1, 6)
  assert model.up.alpha.shape == (1, 1, 3)
  assert model.up_t.alpha.shape == (1, 7, 1)   # kernel (3, out=7, in=3)
  out, collection = brjax_nnx.record_sites(model, x)
  assert out.shape == (3, 2, 7)
  w_br, a_br = regularizer.br_losses(collection)
  assert np.isfinite(w_br) and w_br > 0 and np.isfinite(a_br) and a_br > 0
  for name in ("general", "einsum", "up", "up_t"):
    kernel = getattr(model, name).kernel[...]
    assert getattr(model, name).alpha.size == np.prod(
        [kernel.shape[a] for a in range(kernel.ndim)
         if getattr(model, name).alpha.shape[a] != 1])


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="dense")(x)


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.dense(x)


@pytest.mark.parametrize("rule", [QuantRule(".*", weight_bits=3, act_bits=4),
                                  QuantRule(".*", weight_bits=2, act_bits=2, act_signed=False,
                                            per_channel=True)])
def test_quantized_layer_matches_linen(rule):
  kernel = jax.random.normal(jax.random.key(0), (5, 3)) * 0.3
  bias = jnp.linspace(-0.1, 0.1, 3)
  x = jax.random.normal(jax.random.key(1), (4, 5))
  linen = quantize_model(LinenNet(), rule)
  variables = linen.init(jax.random.key(2), x)
  # The same kernel and bias, step sizes initialized from them and x.
  variables = quant.init_alphas(
      linen, {**variables, "params": {"dense": {"kernel": kernel, "bias": bias}}}, x)
  y_linen, state = linen.apply(variables, x, mutable=[sites.COLLECTION])

  model = NNXNet(nnx.Rngs(0))
  model.dense.kernel[...] = kernel
  model.dense.bias[...] = bias
  quantize_model(model, rule, x)
  y_nnx, collection = brjax_nnx.record_sites(model, x)
  linen_params = variables["params"]["dense"]
  np.testing.assert_allclose(model.dense.alpha[...], linen_params["alpha"], rtol=1e-7)
  np.testing.assert_allclose(model.dense.input_alpha[...], linen_params["input_alpha"],
                             rtol=1e-7)
  np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-7)
  assert [(p, k) for p, k, _ in sites.iterate(collection)] == [
      (p, k) for p, k, _ in sites.iterate(state[sites.COLLECTION])]
  for got, want in zip(regularizer.br_losses(collection),
                       regularizer.br_losses(state[sites.COLLECTION])):
    np.testing.assert_allclose(got, want, rtol=1e-6)
