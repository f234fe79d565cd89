"""quantize_model on unmodified Flax models: reach, training, transforms, loud failures."""

from __future__ import annotations

import functools
import re
from unittest import mock
import warnings

from absl.testing import parameterized
import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.models import plain as plain_models
from brjax.quant import calibration, regularizer, sites
from brjax.quant import lsq as quant
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule

W4A4 = (QuantRule(".*", weight_bits=4, act_bits=4),)
# Depthwise convolutions want one step size per channel at low bits.
W4A4_PER_CHANNEL = (QuantRule(".*", weight_bits=4, act_bits=4, per_channel=True),)

MODELS = {
    "resnet": (plain_models.ResNet, W4A4),
    "vit": (plain_models.ViT, W4A4),
    "vit_scan": (functools.partial(plain_models.ViT, scan=True), W4A4),
    "mobilenet_v2": (plain_models.MobileNetV2, W4A4_PER_CHANNEL),
}


def _batch(n=4):
  x = jax.random.normal(jax.random.key(0), (n, 16, 16, 3))
  return x, jnp.arange(n) % 10


def _init(model, *args, **kwargs):
  """``model.init(key(1), ...)`` jitted: one compile, where eagerly each op and parameter
  shape is one (the same values)."""
  return jax.jit(functools.partial(model.init, **kwargs))(jax.random.key(1), *args)


@functools.cache
def _setup(name):
  make, rules = MODELS[name]
  model = quantize_model(make(), rules)
  x, _ = _batch()
  return model, _init(model, x, train=True)


def _loss_fn(model, variables, x, y):
  def loss(params):
    logits, state = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats", "quant"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    br_w, br_a = regularizer.br_losses(state["quant"])
    return ce + br_w + br_a, (ce, br_w, br_a)
  return loss


class ReachTest(parameterized.TestCase):
  """Each plain model, quantized with zero edits: compiles whole models, so in the slow tier."""
  pytestmark = pytest.mark.slow

  @parameterized.parameters(*MODELS)
  def test_every_kernel_is_quantized(self, name):
    _, variables = _setup(name)
    flat = flax.traverse_util.flatten_dict(variables["params"])
    kernels = [p[:-1] for p in flat if p[-1] == "kernel"]
    assert len(kernels) >= 5
    for layer in kernels:
      assert layer + ("alpha",) in flat, layer
      assert layer + ("input_alpha",) in flat, layer
      kernel, alpha = flat[layer + ("kernel",)], flat[layer + ("alpha",)]
      assert np.all(np.asarray(alpha) > 0)
      if name == "mobilenet_v2":  # per output channel
        assert alpha.shape[-1] == kernel.shape[-1] and alpha.size == kernel.shape[-1]
    if name == "vit_scan":  # stacked by the scan: one step size per layer
      stacked = [p for p in flat if p[0] == "encoder" and quant.is_alpha_path(p)]
      assert len(stacked) == 12 and all(flat[p].shape == (2,) for p in stacked)

  @parameterized.parameters(*MODELS)
  def test_input_sign_is_decided_from_the_init_batch(self, name):
    _, variables = _setup(name)
    signs = flax.traverse_util.flatten_dict(variables["quant_state"])
    if name in ("resnet", "mobilenet_v2"):  # the images are signed; after a ReLU, unsigned
      assert bool(np.all(signs[("conv_init" if name == "resnet" else "stem",
                                "input_signed")]))
      unsigned = [p for p, s in signs.items() if not np.any(s)]
      assert unsigned, signs
    else:  # every ViT input follows a LayerNorm, a gelu or the signed images
      assert all(np.all(s) for s in signs.values())

  @parameterized.parameters(*MODELS)
  def test_train_step_br_and_every_step_size_gets_a_gradient(self, name):
    model, variables = _setup(name)
    # The ResNet zero-initializes each block's last BatchNorm scale, which zeroes every
    # gradient upstream of it in the branch at init: train from a later point.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.ones_like(v) if p[-1].key == "scale" else v, variables["params"])
    variables = {**variables, "params": params}
    x, y = _batch()
    loss = _loss_fn(model, variables, x, y)
    (value, (ce, br_w, br_a)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    assert np.isfinite(float(value)) and float(br_w) > 0 and float(br_a) > 0
    flat = flax.traverse_util.flatten_dict(grads)
    step_sizes = {p: g for p, g in flat.items() if quant.is_alpha_path(p)}
    assert len(step_sizes) >= 10
    for path, g in step_sizes.items():
      g = np.asarray(g).reshape(np.shape(g)[0], -1) if name == "vit_scan" and path[0] == "encoder" \
          else np.asarray(g).reshape(1, -1)
      assert np.all(np.any(g != 0, axis=1)), path  # every layer of a stack too

  @parameterized.parameters("resnet", "mobilenet_v2", "vit_scan")
  def test_init_alphas_in_train_mode(self, name):
    model, variables = _setup(name)
    x, _ = _batch()
    new = quant.init_alphas(model, variables, 3 * x, train=True)
    chex.assert_trees_all_close(new.get("batch_stats", {}), variables.get("batch_stats", {}))
    old_flat = flax.traverse_util.flatten_dict(variables["params"])
    new_flat = flax.traverse_util.flatten_dict(new["params"])
    assert set(old_flat) == set(new_flat)
    # The first layer's input is the images: its step size scales with them. (Named: a
    # jitted init's variables come back with their keys sorted, not in creation order.)
    first = ({"resnet": "conv_init", "mobilenet_v2": "stem", "vit_scan": "embedding"}[name],
             "input_alpha")
    np.testing.assert_allclose(new_flat[first], 3 * old_flat[first], rtol=1e-4)

  def test_training_lowers_the_loss(self):
    model, variables = _setup("mobilenet_v2")
    x, y = _batch(8)
    tx = optax.adam(1e-3)
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(params, opt_state):
      (value, _), grads = jax.value_and_grad(_loss_fn(model, variables, x, y),
                                             has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(6):
      params, opt_state, value = step(params, opt_state)
      losses.append(float(value))
    assert losses[-1] < losses[0], losses


class SmallModelTest(parameterized.TestCase):
  """quantize_model on small models: the fast tier."""

  @pytest.mark.slow
  def test_jit_and_no_jit_agree(self):
    class Small(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.gelu(nn.Conv(4, (3, 3))(x))
        return nn.DenseGeneral((2, 3))(x.mean(axis=(1, 2)))

    model = quantize_model(Small(), QuantRule(weight_bits=3, act_bits=3, per_channel=True))
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    variables = _init(model, x)  # what is compared is the step below, op by op and jitted

    def loss(params):
      y, state = model.apply({**variables, "params": params}, x, mutable=["quant"])
      return jnp.sum(y**2) + sum(regularizer.br_losses(state["quant"]))

    got = jax.value_and_grad(loss)(variables["params"])  # op by op
    chex.assert_trees_all_close(got, jax.jit(jax.value_and_grad(loss))(variables["params"]),
                                rtol=1e-5, atol=1e-7)
    assert variables["params"]["DenseGeneral_0"]["alpha"].shape == (1, 2, 3)  # per channel

  @pytest.mark.slow
  def test_mixed_precision_per_layer(self):
    rules = (QuantRule("conv_init|Dense_0", weight_bits=8, act_bits=8),
             QuantRule(".*", weight_bits=2, act_bits=2, act_signed=False))
    model = quantize_model(plain_models.ResNet(), rules)
    x, _ = _batch()
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, train=False, mutable=["quant"])
    levels = {(p, k): s.levels for p, k, s in sites.iterate(state["quant"])}
    assert levels[("conv_init", "weight")] == levels[("Dense_0", "input")] == 256
    assert levels[("ResNetBlock_0/Conv_0", "weight")] == 4
    assert int(state["quant"]["ResNetBlock_0"]["Conv_0"]["input"][0].qn) == 0  # unsigned
    # Only the first rule leaves the sign to the data: the images are signed, the pooled
    # ReLU outputs the head reads are not.
    assert jax.tree.map(bool, variables["quant_state"]) == {
        "conv_init": {"input_signed": True}, "Dense_0": {"input_signed": False}}
    # The regularizer bins every layer on its own range.
    want = sum(regularizer.bin_regularization(s.values, s.alpha, int(s.qn),
                                              int(s.qn) + s.levels - 1, alpha_grad=True)
               for _, _, s in sites.iterate(state["quant"], ("weight",)))
    np.testing.assert_allclose(regularizer.weight_br(state["quant"]), want, rtol=1e-6)

  @pytest.mark.slow
  def test_parameter_paths_are_the_float_models(self):
    x, _ = _batch()
    plain = plain_models.ViT().init(jax.random.key(0), x)["params"]
    quantized = _setup("vit")[1]["params"]
    plain_paths = set(flax.traverse_util.flatten_dict(plain))
    quant_paths = {p for p in flax.traverse_util.flatten_dict(quantized)
                   if not quant.is_alpha_path(p)}
    assert plain_paths == quant_paths

  def test_same_forward_as_the_layers(self):
    """A Dense quantized by a rule computes what QuantDense computes."""
    x = jax.random.normal(jax.random.key(0), (4, 8))
    rule_model = quantize_model(nn.Dense(3), QuantRule(weight_bits=3))
    variables = rule_model.init(jax.random.key(1), x)
    layer = quant.QuantDense(3, bits=3)
    np.testing.assert_array_equal(rule_model.apply(variables, x), layer.apply(variables, x))


class LoudFailureTest(parameterized.TestCase):

  def _x(self):
    return _batch()[0]

  def test_rule_that_matches_nothing(self):
    model = quantize_model(plain_models.ResNet(), [QuantRule("conv_init", weight_bits=4),
                                                   QuantRule("nope.*", weight_bits=4)])
    with pytest.raises(ValueError, match=r"rules\[1\] \(module_path='nope\.\*'\) matched no "
                                         "quantizable layer"):
      model.init(jax.random.key(0), self._x())

  @pytest.mark.slow
  def test_rule_naming_an_unsupported_module(self):
    model = quantize_model(plain_models.ViT(), [QuantRule(".*LayerNorm.*", weight_bits=4)])
    with pytest.raises(ValueError, match="matched only .*LayerNorm_0 \\(LayerNorm\\).*"
                                         "brjax does not quantize"):
      model.init(jax.random.key(0), self._x())

  def test_nothing_quantized(self):
    with pytest.raises(ValueError, match="no rule quantizes anything"):
      quantize_model(plain_models.ResNet(), [QuantRule(".*")])

  @parameterized.parameters(dict(weight_bits=9), dict(act_bits=0), dict(weight_bits=2.0))
  def test_bits_out_of_range(self, **bits):
    with pytest.raises(ValueError, match="QuantRule (weight|act)_bits=.* 1..8"):
      QuantRule(".*", **bits)

  def test_bad_regex_and_one_bit_auto_sign(self):
    with pytest.raises(ValueError, match="not a regular expression"):
      QuantRule("(", weight_bits=2)
    with pytest.raises(ValueError, match="act_bits=1 needs act_signed"):
      QuantRule(act_bits=1)

  def test_step_sizes_that_no_call_used(self):
    x = self._x()
    variables = quantize_model(plain_models.ResNet(), W4A4).init(jax.random.key(0), x)
    weights_only = quantize_model(plain_models.ResNet(), QuantRule(weight_bits=4))
    with pytest.raises(ValueError, match="step sizes that no quantized call used: "
                                         "Dense_0/input_alpha"):
      weights_only.apply(variables, x, train=False)

  @pytest.mark.slow
  def test_scan_without_the_quant_collection_carries_it(self):
    """brjax adds its collections to a lifted transform that does not list them
    (``brjax.quant.lifted``): the scanned blocks' sites come back, stacked."""
    model = quantize_model(plain_models.ViT(scan=True, scan_axes=("params", "quant_state")),
                           W4A4)
    x = self._x()
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, mutable=["quant"])
    found = [p for p, _, _ in sites.iterate(state["quant"]) if p.startswith("encoder/block/")]
    assert found and all(s.values.shape[0] == 2 for p, _, s in sites.iterate(state["quant"])
                         if p.startswith("encoder/block/"))

  @pytest.mark.slow
  def test_apply_without_the_decided_signs(self):
    model, variables = _setup("resnet")
    with pytest.raises(ValueError, match="conv_init: its input sign .* 'quant_state'"):
      model.apply({"params": variables["params"], "batch_stats": variables["batch_stats"]},
                  self._x(), train=False)

  def test_not_a_model(self):
    with pytest.raises(TypeError, match="takes a flax.linen or flax.nnx Module"):
      quantize_model(lambda x: x, W4A4)
    with pytest.raises(TypeError, match="rules\\[0\\] is a str"):
      quantize_model(plain_models.ResNet(), [".*"])
    model = quantize_model(plain_models.ResNet(), W4A4)
    with pytest.raises(ValueError, match="already quantized"):
      quantize_model(model, W4A4)


class _MLP(nn.Module):
  """Two dense layers; an auxiliary head only in training (``train=True``)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(8)(x))
    out = nn.Dense(3)(h)
    if train:
      return out, nn.Dense(2, name="aux")(h)
    return out


def _signed_batch(n=16):
  return jax.random.normal(jax.random.key(3), (n, 5))


class InitBatchTest(parameterized.TestCase):
  """What LSQ's init decides from the init batch, and the batches it cannot decide on."""

  @parameterized.parameters(dict(act_signed=True), dict(act_signed=None))
  def test_an_all_zero_init_batch_is_an_error(self, act_signed):
    model = quantize_model(_MLP(), QuantRule(weight_bits=4, act_bits=4, act_signed=act_signed))
    with pytest.raises(ValueError, match=r"Dense_0: the init batch gives its input .*every "
                                         r"value 0.*pass a real batch"):
      model.init(jax.random.key(0), jnp.zeros((4, 5)))

  def test_a_jitted_init_on_a_degenerate_batch_warns(self):
    model = quantize_model(_MLP(), W4A4)
    with pytest.warns(calibration.DegenerateInitWarning) as caught:
      variables = jax.block_until_ready(jax.jit(model.init)(jax.random.key(0),
                                                            jnp.zeros((4, 5))))
    assert any(re.match(r"Dense_0: .*every value 0.*pass a real batch", str(w.message))
               for w in caught), [str(w.message) for w in caught]
    assert float(variables["params"]["Dense_0"]["input_alpha"]) == 0.0

  def test_jit_init_warns_without_host_callbacks(self):
    """calibration.jit_init: the same warning, judged after the run from the program's
    outputs (a host callback would keep the program out of XLA's persistent cache)."""
    model = quantize_model(_MLP(), W4A4)

    def no_callback(*args, **kwargs):
      raise AssertionError("jit_init traced a jax.debug.callback")

    init = calibration.jit_init(model.init)
    with mock.patch.object(jax.debug, "callback", no_callback):
      with pytest.warns(calibration.DegenerateInitWarning) as caught:
        variables = init(jax.random.key(0), jnp.zeros((4, 5)))
      x = _signed_batch()
      with warnings.catch_warnings():
        warnings.simplefilter("error", calibration.DegenerateInitWarning)
        chex.assert_trees_all_close(calibration.jit_init(model.init)(jax.random.key(0), x),
                                    model.init(jax.random.key(0), x))
    assert any(re.match(r"Dense_0: .*every value 0.*pass a real batch", str(w.message))
               for w in caught), [str(w.message) for w in caught]
    assert float(variables["params"]["Dense_0"]["input_alpha"]) == 0.0

  def test_inputs_that_all_clip_to_zero_are_an_error(self):
    """A layer downstream of one whose outputs are all zero on the init batch."""
    model = quantize_model(_MLP(), W4A4)
    x = -jnp.abs(_signed_batch())  # all negative

    class Negative(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(3)(nn.relu(x))  # relu of a negative batch: every input is 0

    with pytest.raises(ValueError, match="Dense_0: the init batch gives its input"):
      quantize_model(Negative(), W4A4).init(jax.random.key(0), x)
    model.init(jax.random.key(0), x)  # the same batch, signed where it enters: fine

  def test_a_constant_init_batch_is_an_error(self):
    """``jnp.ones`` would decide "unsigned" for good: every later negative input -> 0."""
    model = quantize_model(_MLP(), W4A4)
    with pytest.raises(ValueError, match=r"Dense_0: .*no variation \(every value 1\).*input "
                                         r"sign.*pass a real batch"):
      model.init(jax.random.key(0), jnp.ones((4, 5)))

  def test_unsigned_inputs_that_are_negative_are_an_error(self):
    model = quantize_model(_MLP(), QuantRule("Dense_0", weight_bits=4, act_bits=4,
                                             act_signed=False))
    with pytest.raises(ValueError, match=r"Dense_0: act_signed=False, but the init batch gives "
                                         r"its input negative values \(min -[\d.]+\).*"
                                         r"act_signed=True"):
      model.init(jax.random.key(0), _signed_batch())

  def test_init_alphas_re_decides_the_input_sign(self):
    model = quantize_model(_MLP(), W4A4)
    with pytest.warns(calibration.DegenerateInitWarning):  # a jitted init on jnp.ones: a warning
      variables = jax.block_until_ready(jax.jit(model.init)(jax.random.key(0),
                                                            jnp.ones((4, 5))))
    assert not bool(variables["quant_state"]["Dense_0"]["input_signed"])  # ones: unsigned
    x = _signed_batch()
    fresh = model.init(jax.random.key(0), x)
    new = quant.init_alphas(model, variables, x)
    assert jax.tree.map(bool, new["quant_state"]) == jax.tree.map(bool, fresh["quant_state"])
    assert bool(new["quant_state"]["Dense_0"]["input_signed"])
    chex.assert_trees_all_close(new["params"], fresh["params"])
    np.testing.assert_array_equal(model.apply(new, x), model.apply(fresh, x))

  @parameterized.parameters(False, True)
  def test_conv_transpose_per_channel_is_per_output_channel(self, transpose_kernel):
    layer = nn.ConvTranspose(8, (3, 3), transpose_kernel=transpose_kernel)
    model = quantize_model(layer, QuantRule(weight_bits=4, per_channel=True))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = model.init(jax.random.key(1), x)["params"]
    axis = 2 if transpose_kernel else 3  # kernel (3, 3, out, in) with transpose_kernel
    assert params["kernel"].shape[axis] == 8
    assert params["alpha"].shape == tuple(8 if a == axis else 1 for a in range(4))
    _, qp = quant.qrange(4, signed=True)
    np.testing.assert_allclose(params["alpha"], quant.init_alpha(params["kernel"], qp, (axis,)),
                               rtol=1e-6)

  @pytest.mark.slow
  def test_a_train_only_head_does_not_fail_eval(self):
    model = quantize_model(_MLP(), W4A4)
    x = _signed_batch()
    variables = model.init(jax.random.key(0), x, train=True)
    assert "input_alpha" in variables["params"]["aux"]
    out = model.apply(variables, x)  # eval: the head is not called, its step sizes unused
    assert out.shape == (16, 3)
    _, recorded = model.apply(variables, x, mutable=["quant"])
    assert "aux" not in recorded["quant"]
    # A layer that runs but is not quantized the way its step sizes say still fails.
    with pytest.raises(ValueError, match="step sizes that no quantized call used: "
                                         "Dense_0/alpha, Dense_0/input_alpha"):
      quantize_model(_MLP(), QuantRule("Dense_1|aux", weight_bits=4, act_bits=4)).apply(
          variables, x)


class RuleInputTest(parameterized.TestCase):
  """What QuantRule and quantize_model accept, and what they say when they refuse."""

  def test_numpy_scalars_are_accepted_as_python_values(self):
    rule = QuantRule(weight_bits=np.int64(4), act_bits=np.int32(4), act_signed=np.bool_(True))
    assert (rule.weight_bits, rule.act_bits, rule.act_signed) == (4, 4, True)
    assert type(rule.weight_bits) is int and type(rule.act_bits) is int
    assert rule.act_signed is True

  @parameterized.parameters(0, 1, "yes", np.int64(1))
  def test_act_signed_must_be_a_bool_or_none(self, value):
    with pytest.raises(ValueError, match=r"QuantRule act_signed=.* is not accepted: use True, "
                                         r"False or None"):
      QuantRule(act_bits=4, act_signed=value)

  def test_per_channel_needs_weight_bits(self):
    with pytest.raises(ValueError, match=r"QuantRule per_channel=True needs weight_bits: .*"
                                         r"one step size per layer"):
      QuantRule(act_bits=4, per_channel=True)
    with pytest.raises(ValueError, match=r"per_channel=1 is not accepted: use True or False"):
      QuantRule(weight_bits=4, per_channel=1)

  def test_a_rule_that_matches_nothing_lists_the_layers(self):
    x = _signed_batch()
    with pytest.raises(ValueError, match=r"rules\[0\] \(module_path='Dense'\) matched no "
                                         r"quantizable layer: module_path must match the whole "
                                         r"module path \(re.fullmatch\); the quantizable layers "
                                         r"called are Dense_0, Dense_1"):
      quantize_model(_MLP(), QuantRule("Dense", weight_bits=4)).init(jax.random.key(0), x)
