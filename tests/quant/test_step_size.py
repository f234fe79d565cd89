"""Step-size parametrizations (brjax.quant.step_size): linear and log, and every reader."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import flax
from flax import nnx, traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brjax
from brjax.quant import lsq, step_size
from brjax.training import optim

X = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


def _rules(alpha_param, per_channel=False):
  return [brjax.QuantRule(".*", weight_bits=2, act_bits=2, alpha_param=alpha_param,
                          per_channel=per_channel)]


class ExpStepSizeTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_is_exp_and_gradient_is_g_over_alpha(self):
    theta = jnp.asarray([-3.0, -1.0, 0.5], jnp.float32)
    g = jnp.asarray([0.2, -1.5, 3.0], jnp.float32)
    alpha, vjp = jax.vjp(self.variant(step_size.exp_step_size), theta)
    chex.assert_trees_all_close(alpha, jnp.exp(theta))
    chex.assert_trees_all_close(vjp(g)[0], g / jnp.exp(theta), rtol=1e-6)

  def test_float64_gradient_is_the_chain_rule_over_alpha_squared(self):
    """Finite differences of L(exp(theta)) give alpha * dL/dalpha; the custom gradient is
    that divided by alpha^2 (module doc), in float64."""
    with jax.enable_x64(True):
      x = jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float64)

      def loss(theta, fn):
        q = lsq.lsq_quantize(x, fn(theta), -2, 1, 0.25)
        return jnp.sum(q * jnp.sin(x))

      theta = jnp.asarray(np.log(0.37), jnp.float64)
      alpha = float(np.exp(theta))
      custom = jax.grad(loss)(theta, step_size.exp_step_size)
      chain = jax.grad(loss)(theta, jnp.exp)
      chex.assert_type(custom, jnp.float64)
      # A smooth loss of alpha: the finite difference in theta is alpha * L'(alpha), and the
      # custom gradient is L'(alpha) / alpha.
      smooth = lambda t, fn: jnp.sum(jnp.cos(x * fn(t)) + fn(t) ** 3)
      eps = 1e-6
      fd = (smooth(theta + eps, jnp.exp) - smooth(theta - eps, jnp.exp)) / (2 * eps)
      got = jax.jit(jax.grad(smooth), static_argnums=1)(theta, step_size.exp_step_size)
      chex.assert_type(got, jnp.float64)
      np.testing.assert_allclose(float(got) * alpha**2, float(fd), rtol=1e-8)
      # Through LSQ (a straight-through estimate, no finite difference): the same relation
      # to the chain rule's gradient.
      np.testing.assert_allclose(float(custom) * alpha**2, float(chain), rtol=1e-12)

  def test_underflowed_alpha_gets_a_finite_gradient(self):
    g = jax.grad(lambda t: jnp.sum(step_size.exp_step_size(t)))(jnp.asarray(-200.0))
    assert np.isfinite(float(g))

  @parameterized.parameters(0.001, 0.01)
  def test_first_sgd_update_moves_alpha_as_linear_lsq(self, lr):
    """One SGD step on theta moves alpha = exp(theta) by LSQ's -lr * G to first order."""
    x = jax.random.normal(jax.random.key(1), (256,))
    alpha0 = lsq.init_alpha(x, 1)

    def loss(alpha):
      return jnp.mean((lsq.lsq_quantize(x, alpha, -2, 1, lsq.grad_scale(256, 1)) - x) ** 2)

    g_lin = jax.grad(loss)(alpha0)
    theta0 = jnp.log(alpha0)
    g_log = jax.grad(lambda t: loss(step_size.exp_step_size(t)))(theta0)
    linear = alpha0 - lr * g_lin
    log = jnp.exp(theta0 - lr * g_log)
    np.testing.assert_allclose(float(log - alpha0), float(linear - alpha0), rtol=2e-2)


class LinenTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  @pytest.mark.slow
  def test_log_model_stores_log_alpha_and_computes_the_same(self, per_channel):
    lin = brjax.quantize_model(Net(), _rules("linear", per_channel))
    log = brjax.quantize_model(Net(), _rules("log", per_channel))
    v_lin = lin.init(jax.random.key(1), X)
    v_log = log.init(jax.random.key(1), X)
    flat = traverse_util.flatten_dict(v_log["params"])
    assert {p[-1] for p in flat if step_size.is_alpha_path(p)} == {"log_alpha",
                                                                   "log_input_alpha"}
    linear = step_size.linear_params(v_log["params"])
    chex.assert_trees_all_close(linear, v_lin["params"], rtol=1e-6)
    chex.assert_trees_all_close(log.apply(v_log, X), lin.apply(v_lin, X), rtol=1e-5,
                                atol=1e-5)
    chex.assert_trees_all_close(step_size.like(linear, v_log["params"]), v_log["params"],
                                rtol=1e-6, atol=1e-7)
    assert step_size.step_size(v_log["params"]["head"]).shape == (
        v_lin["params"]["head"]["alpha"].shape)
    # BR reads alpha from the sites, the same in both.
    _, s_lin = lin.apply(v_lin, X, mutable=["quant"])
    _, s_log = log.apply(v_log, X, mutable=["quant"])
    chex.assert_trees_all_close(brjax.br_losses(s_log["quant"]),
                                brjax.br_losses(s_lin["quant"]), rtol=1e-5)

  def test_layers_and_init_alphas_keep_the_parametrization(self):
    model = nn.Sequential([lsq.QuantConv(4, (3, 3), bits=2, alpha_param="log"),
                           lsq.QuantReLU(bits=2, alpha_param="log")])
    variables = model.init(jax.random.key(0), X)
    names = {p[-1] for p in traverse_util.flatten_dict(variables["params"])}
    assert names == {"kernel", "bias", "log_alpha"}
    again = lsq.init_alphas(model, variables, X)
    chex.assert_trees_all_close(again["params"], variables["params"])

  def test_optimizer_labels_log_step_sizes(self):
    v = brjax.quantize_model(Net(), _rules("log")).init(jax.random.key(1), X)
    labels = optim.param_labels(v["params"])
    assert labels["head"]["log_alpha"] == optim.ALPHA_W
    assert labels["head"]["log_input_alpha"] == optim.ALPHA_A
    assert labels["head"]["kernel"] == optim.WEIGHTS

  def test_linear_model_refuses_log_variables(self):
    v_log = brjax.quantize_model(Net(), _rules("log")).init(jax.random.key(1), X)
    with pytest.raises(flax.errors.ScopeParamNotFoundError, match="input_alpha"):
      brjax.quantize_model(Net(), _rules("linear")).apply(v_log, X)

  @parameterized.parameters("exp", "LOG", 1, None)
  def test_bad_alpha_param_is_a_one_line_error(self, value):
    with pytest.raises(ValueError, match=r"alpha_param=.* is not accepted: use one of "
                                         r"linear, log") as e:
      brjax.QuantRule(".*", weight_bits=2, alpha_param=value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="is not accepted"):
      lsq.QuantReLU(bits=2, alpha_param=value).init(jax.random.key(0), X)


class NnxTest(parameterized.TestCase):

  def test_nnx_log_model(self):
    class M(nnx.Module):
      def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4 * 36, 5, rngs=rngs)

      def __call__(self, x):
        return self.head(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

    lin, log = M(nnx.Rngs(0)), M(nnx.Rngs(0))
    brjax.quantize_model(lin, _rules("linear"), X)
    brjax.quantize_model(log, _rules("log"), X)
    assert hasattr(log.head, "log_alpha") and hasattr(log.head, "log_input_alpha")
    assert not hasattr(log.head, "alpha")
    np.testing.assert_allclose(np.exp(log.head.log_alpha[...]), lin.head.alpha[...], rtol=1e-6)
    chex.assert_trees_all_close(log(X), lin(X), rtol=1e-5, atol=1e-5)
    _, collection = brjax.nnx.record_sites(log, X)
    _, expected = brjax.nnx.record_sites(lin, X)
    chex.assert_trees_all_close(brjax.br_losses(collection), brjax.br_losses(expected),
                                rtol=1e-5)
    labels = optim.param_labels(nnx.state(log, nnx.Param))
    assert labels["head"]["log_alpha"] == optim.ALPHA_W


def test_operation_level_log_step_sizes_read_as_alpha():
  """An operation's log step sizes (issue 32's ``<name>_alpha``, ``input_alpha_<k>``) are
  read as alpha like a layer's: a reader of raw parameters never sees theta."""
  assert step_size.linear_name("log_w_alpha") == "w_alpha"
  assert step_size.linear_name("log_input_alpha_1") == "input_alpha_1"
  assert step_size.linear_name("log_scale") == "log_scale"  # not a step size
  params = {"cell": {"kernel": jnp.ones((2, 2)), "log_w_alpha": jnp.zeros(()),
                     "log_input_alpha_1": jnp.log(jnp.float32(0.5))}}
  linear = step_size.linear_params(params)
  assert set(linear["cell"]) == {"kernel", "w_alpha", "input_alpha_1"}
  np.testing.assert_allclose(linear["cell"]["w_alpha"], 1.0)
  np.testing.assert_allclose(linear["cell"]["input_alpha_1"], 0.5, rtol=1e-6)
