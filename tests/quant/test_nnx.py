"""Tests of brjax.quant.nnx: quantize_model on unmodified Flax NNX models, BR, freezing, nnx.jit."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.quant import lsq as quant
from brjax.quant import metrics, regularizer, sites
from brjax.quant import nnx as brjax_nnx
from brjax.quant.coverage import left_float
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule
from brjax.training import optim

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
  """Normal images, from numpy (jax.random's threefry costs a compile)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 3)), jnp.float32)


def _labels(n=8):
  return jnp.arange(n) % 10


def _quantized_cnn(**kwargs):
  return quantize_model(CNN(rngs=nnx.Rngs(0), **kwargs), RULES, _images())


def _flat(state):
  return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _step_size_paths(model):
  return sorted(p for p in _flat(nnx.state(model, nnx.Param)) if p.endswith("alpha"))


# --- quantize_model / quantize_nnx ---

@pytest.mark.slow
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
  assert sorted(set(after) - set(before)) == [
      "conv1/alpha", "conv1/input_alpha", "conv2/alpha", "conv2/input_alpha",
      "conv2/input_signed", "head/alpha", "head/input_alpha", "head/input_signed"]
  signs = nnx.state(model, brjax_nnx.QuantState)  # state, but not a parameter
  assert sorted(_flat(signs)) == ["conv2/input_signed", "head/input_signed"]
  params = _flat(nnx.state(model, nnx.Param))  # what nnx.Optimizer(wrt=nnx.Param) trains
  kernels = [p for p in params if p.endswith("/kernel")]
  assert len(kernels) == 3
  for path in kernels:
    assert isinstance(params[path.replace("kernel", "alpha")], nnx.Param)
    assert isinstance(params[path.replace("kernel", "input_alpha")], nnx.Param)


@pytest.mark.slow
def test_init_is_lsq_from_the_kernels_and_the_sample_batch():
  x = _images()
  model = quantize_model(CNN(rngs=nnx.Rngs(0)), RULES, x)
  assert not hasattr(model.conv1, "input_signed")        # the rule's sign: static
  assert not model.conv2.input_signed[...]                # after a ReLU: decided unsigned
  assert not model.head.input_signed[...]
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
  assert left_float(model) == ()  # convs, batch norms, dropout, a dense head: none float
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


@pytest.mark.slow
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
  w_br, a_br = jax.jit(regularizer.br_losses)(collection)  # one compile, not one per eager op
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
                                            per_channel=True),
                                  QuantRule(".*", weight_bits=1, act_bits=1, act_signed=True),
                                  QuantRule(".*", act_bits=3, act_batch_grad_scale=True)])
@pytest.mark.slow
def test_quantized_layer_matches_linen(rule):
  kernel = jax.random.normal(jax.random.key(0), (5, 3)) * 0.3
  bias = jnp.linspace(-0.1, 0.1, 3)
  x = jax.random.normal(jax.random.key(1), (4, 5))
  if rule.act_signed is False:  # an unsigned input given negative values fails at init
    x = jnp.abs(x)
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
  assert hasattr(model.dense, "alpha") == ("alpha" in linen_params)
  if "alpha" in linen_params:
    np.testing.assert_allclose(model.dense.alpha[...], linen_params["alpha"], rtol=1e-7)
  np.testing.assert_allclose(model.dense.input_alpha[...], linen_params["input_alpha"],
                             rtol=1e-7)
  np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-7)
  assert [(p, k) for p, k, _ in sites.iterate(collection)] == [
      (p, k) for p, k, _ in sites.iterate(state[sites.COLLECTION])]
  np.testing.assert_allclose(regularizer.activation_br(collection),
                             regularizer.activation_br(state[sites.COLLECTION]), rtol=1e-6)
  if rule.weight_bits is not None:
    np.testing.assert_allclose(regularizer.weight_br(collection),
                               regularizer.weight_br(state[sites.COLLECTION]), rtol=1e-6)
  # And the gradients of the loss with respect to every parameter.
  def linen_loss(params):
    y, state = linen.apply({**variables, "params": params}, x, mutable=[sites.COLLECTION])
    return jnp.sum(y**2) + regularizer.activation_br(state[sites.COLLECTION])

  def nnx_loss(model):
    y, collection = brjax_nnx.record_sites(model, x)
    return jnp.sum(y**2) + regularizer.activation_br(collection)

  want = jax.grad(linen_loss)(variables["params"])["dense"]
  got = nnx.grad(nnx_loss)(model)["dense"]
  assert sorted(_flat(got)) == sorted(want)
  for name, value in want.items():
    np.testing.assert_allclose(got[name][...], value, rtol=1e-5, atol=1e-7, err_msg=name)


# --- record_sites: the "quant" collection for BR and metrics ---

@pytest.mark.slow
def test_record_sites_gives_the_collection_br_and_metrics_read():
  model = _quantized_cnn()
  structure = nnx.graphdef(model), _flat(nnx.state(model)).keys()
  y = model(_images())  # a plain call records nothing and stores nothing
  assert (nnx.graphdef(model), _flat(nnx.state(model)).keys()) == structure
  out, collection = brjax_nnx.record_sites(model, _images())
  assert out.shape == y.shape == (8, 10)
  assert (nnx.graphdef(model), _flat(nnx.state(model)).keys()) == structure
  assert [(path, kind) for path, kind, _ in sites.iterate(collection)] == [
      (layer, kind) for layer in ("conv1", "conv2", "head") for kind in ("input", "weight")]
  conv1 = collection["conv1"]
  assert conv1["weight"][0].alpha is not None and conv1["input"][0].levels == 16
  assert int(conv1["input"][0].qn) == -8 and int(collection["conv2"]["input"][0].qn) == 0
  assert collection["conv2"]["weight"][0].levels == 4   # 2-bit signed kernel: -2..1
  # BR and the metrics, each one compile (eagerly: one per op and shape, seconds).
  w_br, a_br = jax.jit(regularizer.br_losses)(collection)
  assert np.isfinite(w_br) and w_br > 0 and np.isfinite(a_br) and a_br > 0
  found = jax.jit(metrics.collect_metrics)(collection)
  assert set(found["weights"]) == {"conv1", "conv2", "head"}
  assert set(found["activations"]) == {"conv1:input", "conv2:input", "head:input"}


def test_list_paths_and_a_layer_called_twice():
  x = jax.random.normal(jax.random.key(0), (4, 6))
  model = quantize_model(MLP(rngs=nnx.Rngs(0)),
                         [QuantRule("unused"), QuantRule(".*", weight_bits=2, act_bits=3)], x)
  assert sorted(brjax_nnx.quantized_layers(model)) == ["blocks/0/linear", "blocks/1/linear",
                                                       "shared"]
  assert type(model.unused) is nnx.Linear and not hasattr(model.unused, "alpha")
  assert left_float(model) == ()
  _, collection = brjax_nnx.record_sites(model, x)
  assert set(collection) == {"blocks", "shared"}
  assert set(collection["blocks"]) == {"0", "1"}
  assert len(collection["shared"]["input"]) == 2 and len(collection["shared"]["weight"]) == 1
  assert list(sites.named(collection)) == [
      "blocks/0/linear:input", "blocks/0/linear", "blocks/1/linear:input", "blocks/1/linear",
      "shared:input#0", "shared:input#1", "shared"]
  # The shared layer's input sign was decided by its first call (block output, signed).
  assert model.shared.input_signed[...]


# --- training under nnx.jit ---

def _loss(model, x, y):
  logits, collection = brjax_nnx.record_sites(model, x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  w_br, a_br = regularizer.br_losses(collection)
  return ce + w_br + a_br, (w_br, a_br)


def test_training_step_under_nnx_jit():
  model = _quantized_cnn(dropout=0.0)
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
  x, y = _images(), _labels()

  traces = []

  @nnx.jit
  def step(model, optimizer, x, y):
    traces.append(1)
    (loss, brs), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    return loss, brs, grads

  losses = []
  for i in range(6):
    loss, (w_br, a_br), grads = step(model, optimizer, x, y)
    losses.append(float(loss))
    assert np.isfinite(w_br) and w_br > 0 and np.isfinite(a_br) and a_br > 0
    if i == 0:
      flat = _flat(grads)
      step_sizes = [p for p in flat if p.endswith("alpha")]
      assert len(step_sizes) == 6
      for path in step_sizes:
        assert np.all(np.abs(np.asarray(flat[path])) > 0), path
  assert losses[-1] < losses[0], losses
  assert len(traces) == 1  # the quantized model's structure is stable across steps


@pytest.mark.parametrize("frozen", [{"alpha_w", "alpha_a"}, {"alpha_a"}])
def test_freezing_step_sizes_with_param_labels(frozen):
  model = _quantized_cnn()
  labels = optim.param_labels(nnx.state(model, nnx.Param))
  flat_labels = _flat(labels)
  assert {p for p, l in flat_labels.items() if l == "alpha_w"} == {
      f"{layer}/alpha" for layer in ("conv1", "conv2", "head")}
  assert {p for p, l in flat_labels.items() if l == "alpha_a"} == {
      f"{layer}/input_alpha" for layer in ("conv1", "conv2", "head")}
  sgd = optax.sgd(0.05, momentum=0.9)
  tx = optax.multi_transform(
      {label: optax.chain(sgd, optax.set_to_zero() if label in frozen else optax.identity())
       for label in optim.LABELS}, optim.param_labels)  # called on the state, as in optim
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = _flat(nnx.as_pure(nnx.state(model, nnx.Param)))

  @nnx.jit
  def step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: _loss(m, x, y)[0])(model)
    optimizer.update(model, grads)

  for _ in range(2):
    step(model, optimizer, _images(), _labels())
  after = _flat(nnx.as_pure(nnx.state(model, nnx.Param)))
  for path, label in flat_labels.items():
    if label in frozen:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert not np.array_equal(after[path], before[path]), path


def test_param_labels_of_linen_trees_are_unchanged():
  params = {"Dense_0": {"kernel": 1.0, "bias": 2.0, "alpha": 3.0, "input_alpha": 4.0},
            "QuantReLU_0": {"alpha": 5.0}, "alpha": 6.0}
  assert optim.param_labels(params) == {
      "Dense_0": {"kernel": "weights", "bias": "weights", "alpha": "alpha_w",
                  "input_alpha": "alpha_a"},
      "QuantReLU_0": {"alpha": "alpha_a"}, "alpha": "alpha_a"}
  from flax.core import freeze  # pylint: disable=g-import-not-at-top
  assert optim.param_labels(freeze(params)) == freeze(optim.param_labels(params))


# --- loud failures ---

def _fresh_cnn():
  return CNN(rngs=nnx.Rngs(0))


def test_a_rule_that_matches_nothing():
  with pytest.raises(ValueError, match=r"rules\[1\] \(module_path='nope'\) matched no "):
    quantize_model(_fresh_cnn(), [RULES[1], QuantRule("nope", weight_bits=2)], _images())
  with pytest.raises(ValueError, match=r"rules\[0\].*matched only bn1 \(BatchNorm\)"):
    quantize_model(_fresh_cnn(), QuantRule("bn1", weight_bits=2), _images())


def test_nothing_quantized():
  with pytest.raises(ValueError, match="no rule quantizes anything"):
    quantize_model(_fresh_cnn(), QuantRule(".*"), _images())


def test_bits_out_of_range():
  with pytest.raises(ValueError, match="weight_bits=9"):
    QuantRule(".*", weight_bits=9)
  with pytest.raises(ValueError, match="act_bits=0"):
    QuantRule(".*", act_bits=0)


def test_a_matched_layer_the_sample_forward_never_called():
  model = MLP(rngs=nnx.Rngs(0))
  before = _flat(nnx.state(model))
  with pytest.raises(ValueError, match="unused matched a rule but the sample forward never "
                                       "called it"):
    quantize_model(model, QuantRule(".*", weight_bits=2, act_bits=2),
                   jax.random.normal(jax.random.key(0), (4, 6)))
  # The model is left as it was.
  assert not brjax_nnx.quantized_layers(model)
  assert type(model.shared) is nnx.Linear and not hasattr(model.shared, "brjax_rule")
  assert _flat(nnx.state(model)).keys() == before.keys()


def test_a_non_concrete_sample_input():
  model = _fresh_cnn()
  with pytest.raises(ValueError, match="sample inputs must be concrete"):
    jax.jit(lambda x: quantize_model(model, RULES, x) and 0)(_images())
  assert not brjax_nnx.quantized_layers(model)


def test_quantized_twice_and_non_float_inputs():
  model = _quantized_cnn()
  with pytest.raises(ValueError, match="already quantized"):
    quantize_model(model, RULES, _images())
  layer = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"matched only <root> \(Embed\)"):
    quantize_model(layer, QuantRule(".*", weight_bits=2), jnp.arange(3))
  with pytest.raises(ValueError, match="quantizes float inputs, but the input is int32"):
    quantize_model(NNXNet(nnx.Rngs(0)), QuantRule(".*", act_bits=2),
                   jnp.ones((2, 5), jnp.int32))


def test_a_decided_sign_travels_with_the_state():
  signed, unsigned = jnp.linspace(-1, 1, 10).reshape(2, 5), jnp.linspace(0, 1, 10).reshape(2, 5)
  rule = QuantRule(".*", weight_bits=2, act_bits=2)
  trained = quantize_model(NNXNet(nnx.Rngs(0)), rule, signed)
  restored = quantize_model(NNXNet(nnx.Rngs(1)), rule, unsigned)  # another batch, sign
  assert trained.dense.input_signed[...] and not restored.dense.input_signed[...]
  assert not np.allclose(restored(signed), trained(signed))
  nnx.update(restored, nnx.state(trained))  # as a checkpoint restore does
  np.testing.assert_array_equal(restored(signed), trained(signed))
  _, collection = nnx.jit(brjax_nnx.record_sites)(restored, signed)
  assert int(collection["dense"]["input"][0].qn) == -2


# --- the sample batch: what init decides from it, and the batches it cannot decide on ---

@pytest.mark.parametrize("sample,message", [
    (jnp.zeros((8, 8, 8, 3)), r"conv1: the init batch gives its input no variation \(every "
                              r"value 0\).*step size 0.*pass a real batch"),
    (jnp.ones((8, 8, 8, 3)), r"conv1: the init batch gives its input no variation \(every "
                             r"value 1\).*pass a real batch"),
])
def test_a_degenerate_sample_batch_is_an_error(sample, message):
  model = _fresh_cnn()
  before = _flat(nnx.state(model))
  with pytest.raises(ValueError, match=message):
    quantize_model(model, RULES, sample)
  assert not brjax_nnx.quantized_layers(model)  # left as it was
  assert _flat(nnx.state(model)).keys() == before.keys()


def test_a_constant_sample_cannot_decide_a_sign():
  with pytest.raises(ValueError, match=r"dense: .*no variation \(every value 1\).*and its "
                                       r"input sign"):
    quantize_model(NNXNet(nnx.Rngs(0)), QuantRule(".*", act_bits=2), jnp.ones((2, 5)))


def test_negative_values_at_an_unsigned_input_are_an_error():
  with pytest.raises(ValueError, match=r"dense: act_signed=False, but the init batch gives "
                                       r"its input negative values \(min -[\d.]+\)"):
    quantize_model(NNXNet(nnx.Rngs(0)), QuantRule(".*", act_bits=2, act_signed=False),
                   jax.random.normal(jax.random.key(0), (4, 5)))


def test_a_zero_kernel_is_an_error():
  model = NNXNet(nnx.Rngs(0))
  model.dense.kernel[...] = jnp.zeros((5, 3))
  with pytest.raises(ValueError, match=r"dense: LSQ's init gives its kernel step size 0: the "
                                       r"kernel .* is all zero"):
    quantize_model(model, QuantRule(".*", weight_bits=2), jax.random.normal(jax.random.key(0),
                                                                            (2, 5)))


def test_no_sample_batch_is_a_clear_error():
  with pytest.raises(TypeError, match=r"needs the arguments of one model call on a real batch"):
    quantize_model(_fresh_cnn(), RULES)


def test_a_rule_that_matches_nothing_lists_the_layers():
  with pytest.raises(ValueError, match=r"module_path='conv'\) .* must match the whole module "
                                       r"path \(re.fullmatch\); the quantizable layers are "
                                       r"conv1, conv2, head"):
    quantize_model(_fresh_cnn(), QuantRule("conv", weight_bits=2), _images())
