"""Tests of brjax.regularizer: the BR loss and its collectors."""

from absl.testing import parameterized
import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from brjax import quant
from brjax import regularizer


def _loop_reference(v, alpha, qn, qp):
  """Float64 BR straight from the paper's per-bin definition, looping over bins."""
  v = np.asarray(v, np.float64)
  a = np.broadcast_to(np.asarray(alpha, np.float64), v.shape)
  bins = np.round(np.clip(v / a, qn, qp))
  groups = np.broadcast_to(np.arange(np.size(alpha)).reshape(np.shape(alpha)), v.shape)
  total = 0.0
  for group in range(np.size(alpha)):
    for m in range(qn, qp + 1):
      members = (bins == m) & (groups == group)
      if not members.any():
        continue
      vals, level = v[members], m * a[members][0]
      total += (vals.mean() - level)**2
      if vals.size >= 2:
        total += vals.var()
  return total


class BinRegularizationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=[2, 3, 4, 8], signed=[True, False], per_channel=[False, True])
  def test_matches_loop_over_bins(self, bits, signed, per_channel):
    qn, qp = quant.qrange(bits, signed)
    rng = np.random.default_rng(bits)
    alpha = rng.uniform(0.05, 0.2, (7,)) if per_channel else np.float64(0.11)
    v = rng.normal(0, 0.1 * qp**0.5, (40, 7))
    if not signed:
      v = np.abs(v)
    with jax.enable_x64(True):
      loss = self.variant(lambda v, a: regularizer.bin_regularization(v, a, qn, qp))(
          jnp.asarray(v), jnp.asarray(alpha))
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, _loop_reference(v, alpha, qn, qp), rtol=1e-10)
    loss32 = regularizer.bin_regularization(jnp.asarray(v, jnp.float32), alpha, qn, qp)
    assert loss32.dtype == jnp.float32
    np.testing.assert_allclose(loss32, _loop_reference(v, alpha, qn, qp), rtol=1e-4)

  def test_empty_and_one_element_bins(self):
    alpha, qn, qp = 0.5, -2, 1
    # Bin -2 empty; bin -1 holds one element; bin 0 two; bin 1 three (one clipped from above).
    v = np.array([-0.6, 0.1, -0.2, 0.45, 0.55, 2.0])
    expected = ((-0.6 + 0.5)**2                                   # one element: no variance
                + ((0.1 - 0.2) / 2)**2 + np.var([0.1, -0.2])      # bin 0
                + (np.mean([0.45, 0.55, 2.0]) - 0.5)**2 + np.var([0.45, 0.55, 2.0]))
    with jax.enable_x64(True):
      loss = regularizer.bin_regularization(jnp.asarray(v), alpha, qn, qp)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(loss, _loop_reference(v, alpha, qn, qp), rtol=1e-12)

  def test_values_on_their_levels_give_zero(self):
    alpha = 0.3
    v = alpha * jnp.array([-2.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0])
    assert float(regularizer.bin_regularization(v, alpha, -2, 1)) == pytest.approx(0, abs=1e-12)

  def test_alpha_grad_switches_exactly_the_alpha_gradient(self):
    v = jax.random.normal(jax.random.key(0), (300,)) * 0.2
    alpha = jnp.float32(0.13)
    with_a = jax.grad(lambda v, a: regularizer.bin_regularization(v, a, -4, 3, alpha_grad=True),
                      argnums=(0, 1))(v, alpha)
    without_a = jax.grad(lambda v, a: regularizer.bin_regularization(v, a, -4, 3),
                         argnums=(0, 1))(v, alpha)
    chex.assert_trees_all_close(with_a[0], without_a[0])
    assert float(without_a[1]) == 0.0
    assert float(with_a[1]) != 0.0

  def test_finite_differences_float64(self):
    qn, qp = -2, 1
    rng = np.random.default_rng(3)
    v0 = rng.normal(0, 0.3, 30)
    a0 = 0.27
    loss = lambda v, a: regularizer.bin_regularization(v, a, qn, qp, alpha_grad=True)
    eps = 1e-6
    with jax.enable_x64(True):
      dv, da = jax.grad(loss, argnums=(0, 1))(jnp.asarray(v0), jnp.float64(a0))
      f = lambda v, a: float(loss(jnp.asarray(v), jnp.float64(a)))
      fd_v = np.array([(f(v0 + eps * e, a0) - f(v0 - eps * e, a0)) / (2 * eps)
                       for e in np.eye(30)])
      fd_a = (f(v0, a0 + eps) - f(v0, a0 - eps)) / (2 * eps)
    # No element is within eps of a bin edge, so bin assignment is fixed in the stencil.
    edges = np.abs(np.clip(v0 / a0, qn, qp) % 1 - 0.5)
    assert edges.min() > 1e-4
    np.testing.assert_allclose(dv, fd_v, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(da, fd_a, rtol=1e-6)

  @pytest.mark.filterwarnings("ignore")
  def test_nonpositive_alpha_is_finite(self):
    v = jnp.linspace(-1, 1, 20)
    for alpha in [0.0, -0.5]:
      loss, grads = jax.value_and_grad(
          lambda v, a: regularizer.bin_regularization(v, a, -2, 1, alpha_grad=True),
          argnums=(0, 1))(v, jnp.float32(alpha))
      assert np.isfinite(loss) and np.all(np.isfinite(grads[0])) and np.isfinite(grads[1])

  @parameterized.parameters(2, 8)
  def test_cost_does_not_grow_with_bins(self, bits):
    """No intermediate is larger than the input or the bin histogram: no one-hot."""
    n = 4096
    qn, qp = quant.qrange(bits, signed=True)
    jaxpr = jax.make_jaxpr(lambda v, a: regularizer.bin_regularization(v, a, qn, qp))(
        jnp.ones((n,)), 1.0)

    def sizes(jaxpr):
      for eqn in jaxpr.eqns:
        for var in eqn.outvars:
          yield int(np.prod(var.aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) == n
    assert len(jaxpr.jaxpr.eqns) < 40


def _params(bits):
  """A params tree with two quantized kernels, one float kernel and a BatchNorm."""
  rng = np.random.default_rng(0)
  k1, k2, k3 = (jnp.asarray(rng.normal(0, 0.1, s), jnp.float32)
                for s in [(3, 3, 3, 8), (8, 10), (4, 4)])
  qp = quant.qrange(bits, True)[1]
  return {
      "conv": {"kernel": k1, "alpha": quant.init_alpha(k1, qp)},
      "block": {"dense": {"kernel": k2, "bias": jnp.zeros(10), "alpha": jnp.float32(0.05)}},
      "float": {"kernel": k3},
      "bn": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
  }


def test_weight_br_sums_every_quantized_kernel():
  params = _params(2)
  qn, qp = quant.qrange(2, True)
  expected = (regularizer.bin_regularization(params["conv"]["kernel"], params["conv"]["alpha"],
                                             qn, qp)
              + regularizer.bin_regularization(params["block"]["dense"]["kernel"], 0.05, qn, qp))
  np.testing.assert_allclose(regularizer.weight_br(params, 2), expected, rtol=1e-6)
  grads = jax.grad(regularizer.weight_br)(params, 2)
  # Gradient reaches the weight step sizes (W-BR) and only quantized kernels.
  assert float(grads["conv"]["alpha"]) != 0 and float(grads["block"]["dense"]["alpha"]) != 0
  assert not np.any(grads["float"]["kernel"]) and not np.any(grads["bn"]["scale"])
  assert float(regularizer.weight_br({"float": {"kernel": jnp.ones(3)}}, 2)) == 0.0


def test_activation_br_collects_every_sown_call():
  rng = np.random.default_rng(1)
  acts = [jnp.asarray(np.abs(rng.normal(0, 1, (4, 6))), jnp.float32) for _ in range(3)]
  alphas = [jnp.float32(a) for a in (0.3, 0.5, 0.7)]
  # A layer called twice sows two entries; another layer sows one.
  inter = {"relu_a": {"pre_quant": (acts[0], acts[1]), "alpha": (alphas[0], alphas[1])},
           "stage": {"relu_b": {"pre_quant": (acts[2],), "alpha": (alphas[2],)}}}
  expected = sum(regularizer.bin_regularization(v, a, 0, 15) for v, a in zip(acts, alphas))
  np.testing.assert_allclose(regularizer.activation_br(inter, 4), expected, rtol=1e-6)
  grad_off = jax.grad(lambda i: regularizer.activation_br(i, 4))(inter)
  grad_on = jax.grad(lambda i: regularizer.activation_br(i, 4, alpha_grad=True))(inter)
  assert all(float(g) == 0 for g in grad_off["relu_a"]["alpha"])
  assert all(float(g) != 0 for g in grad_on["relu_a"]["alpha"])
  chex.assert_trees_all_close(grad_off["relu_a"]["pre_quant"], grad_on["relu_a"]["pre_quant"])
  assert float(regularizer.activation_br({}, 4)) == 0.0


def test_br_losses_returns_both_parts():
  params = _params(4)
  inter = {"r": {"pre_quant": (jnp.ones((2, 3)),), "alpha": (jnp.float32(0.4),)}}
  br_w, br_a = regularizer.br_losses(params, inter, bits_w=4, bits_a=4)
  np.testing.assert_allclose(br_w, regularizer.weight_br(params, 4))
  np.testing.assert_allclose(br_a, regularizer.activation_br(inter, 4))
  assert float(br_a) > 0
  zero_w, zero_a = regularizer.br_losses(params, inter, bits_w=32, bits_a=32)
  assert float(zero_w) == 0 and float(zero_a) == 0
