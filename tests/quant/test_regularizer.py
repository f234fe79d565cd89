"""Tests of brjax.quant.regularizer: the BR loss and its collectors."""

from absl.testing import parameterized
import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.quant import lsq as quant
from brjax.quant import regularizer, sites


def _loop_reference(v, alpha, qn, qp, clipped="include"):
  """Float64 BR straight from the paper's per-bin definition, looping over bins; with
  ``clipped="exclude"``, elements above ``qp + 0.5`` steps belong to no bin."""
  v = np.asarray(v, np.float64)
  a = np.broadcast_to(np.asarray(alpha, np.float64), v.shape)
  bins = np.round(np.clip(v / a, qn, qp))
  inside = (v / a <= qp + 0.5) if clipped == "exclude" else np.ones(v.shape, bool)
  groups = np.broadcast_to(np.arange(np.size(alpha)).reshape(np.shape(alpha)), v.shape)
  total = 0.0
  for group in range(np.size(alpha)):
    for m in range(qn, qp + 1):
      members = (bins == m) & (groups == group) & inside
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

  @parameterized.product(bits=[2, 4], signed=[True, False], per_channel=[False, True])
  def test_exclude_clipped_matches_loop_over_bins(self, bits, signed, per_channel):
    """``clipped="exclude"``: values above the top level's rounding edge count nowhere."""
    qn, qp = quant.qrange(bits, signed)
    rng = np.random.default_rng(10 + bits)
    alpha = rng.uniform(0.05, 0.2, (7,)) if per_channel else np.float64(0.11)
    v = rng.normal(0, 0.3 * qp**0.5, (60, 7))  # wide: many values beyond the range
    if not signed:
      v = np.abs(v)
    expected = _loop_reference(v, alpha, qn, qp, "exclude")
    assert (v / alpha > qp + 0.5).any() and expected != _loop_reference(v, alpha, qn, qp)
    with jax.enable_x64(True):
      loss = jax.jit(lambda v, a: regularizer.bin_regularization(v, a, qn, qp,
                                                                 clipped="exclude"))(
          jnp.asarray(v), jnp.asarray(alpha))
    np.testing.assert_allclose(loss, expected, rtol=1e-10)

  def test_exclude_clipped_by_hand_and_an_emptied_top_bin(self):
    alpha, qn, qp = 0.5, 0, 3  # edge of the top bin: v / alpha = 3.5, v = 1.75
    v = np.array([0.1, 0.2, 1.4, 1.6, 1.75, 1.76, 9.0])
    expected = ((0.15 - 0.0)**2 + np.var([0.1, 0.2])                  # bin 0
                + (np.mean([1.4, 1.6, 1.75]) - 1.5)**2 + np.var([1.4, 1.6, 1.75]))  # bin 3
    with jax.enable_x64(True):
      loss = regularizer.bin_regularization(jnp.asarray(v), alpha, qn, qp, clipped="exclude")
      np.testing.assert_allclose(loss, expected, rtol=1e-12)
      # Every element of the top bin above the edge: the bin is empty and adds nothing.
      top = jnp.asarray([0.1, 0.2, 1.9, 5.0])
      np.testing.assert_allclose(
          regularizer.bin_regularization(top, alpha, qn, qp, clipped="exclude"),
          0.15**2 + np.var([0.1, 0.2]), rtol=1e-12)
      all_out = regularizer.bin_regularization(jnp.asarray([4.0, 7.0]), alpha, qn, qp,
                                               clipped="exclude")
      assert float(all_out) == 0.0
    with pytest.raises(ValueError, match="clipped='drop' is not accepted: use one of "
                                         "include, exclude"):
      regularizer.bin_regularization(jnp.asarray(v), alpha, qn, qp, clipped="drop")

  @parameterized.parameters(True, False)
  @pytest.mark.slow
  def test_exclude_differs_from_include_only_beyond_the_range(self, alpha_grad):
    """Bit-identical loss and gradients while no value passes the top edge; beyond it the
    excluded values get exactly zero gradient, and every gradient stays finite."""
    qn, qp, alpha = 0, 3, jnp.float32(0.2)
    v = jnp.abs(jax.random.normal(jax.random.key(1), (500,))) * 0.2
    inside = jnp.clip(v, 0, (qp + 0.5) * alpha * 0.999)
    grad = lambda x, mode: jax.value_and_grad(
        lambda x, a: regularizer.bin_regularization(x, a, qn, qp, alpha_grad=alpha_grad,
                                                    clipped=mode), argnums=(0, 1))(x, alpha)
    (li, gi), (le, ge) = grad(inside, "include"), grad(inside, "exclude")
    assert float(li) == float(le)
    chex.assert_trees_all_equal(gi, ge)
    outside = inside.at[:20].set(jnp.linspace(0.75, 3.0, 20))  # 20 values above 0.7
    (li, gi), (le, ge) = grad(outside, "include"), grad(outside, "exclude")
    assert float(li) != float(le)
    assert all(np.all(np.isfinite(g)) for g in (*gi, *ge))
    np.testing.assert_array_equal(ge[0][:20], 0.0)
    assert np.all(gi[0][:20] != 0.0)

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


def _kernels():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(0, 0.1, s), jnp.float32) for s in [(3, 3, 3, 8), (8, 10)]]


def _collection(bits_w=2, bits_a=4):
  """A "quant" collection as a forward pass records it: two kernels (one at 8 bits), a ReLU
  called twice, a signed layer input."""
  k1, k2 = _kernels()
  rng = np.random.default_rng(1)
  acts = [jnp.asarray(np.abs(rng.normal(0, 1, (4, 6))), jnp.float32) for _ in range(2)]
  signed_in = jnp.asarray(rng.normal(0, 1, (4, 8)), jnp.float32)
  qp = quant.qrange(bits_w, True)[1]
  return {
      "conv": {"weight": (sites.record(k1, quant.init_alpha(k1, qp),
                                       *quant.qrange(bits_w, True)),)},
      "block": {"dense": {
          "weight": (sites.record(k2, jnp.float32(0.01), *quant.qrange(8, True)),),
          "input": (sites.record(signed_in, jnp.float32(0.2), *quant.qrange(bits_a, True)),)}},
      "relu": {"output": tuple(sites.record(v, jnp.float32(a), *quant.qrange(bits_a, False))
                               for v, a in zip(acts, (0.3, 0.5)))},
  }


@pytest.mark.slow
def test_weight_br_bins_every_kernel_on_its_own_range():
  col = _collection()
  (k1, a1), (k2, a2) = [(s.values, s.alpha) for _, _, s in sites.iterate(col, ("weight",))]
  expected = (regularizer.bin_regularization(k1, a1, -2, 1)
              + regularizer.bin_regularization(k2, a2, -128, 127))  # mixed precision
  np.testing.assert_allclose(regularizer.weight_br(col), expected, rtol=1e-6)
  grads = jax.grad(regularizer.weight_br, allow_int=True)(col)
  # Gradient reaches the weight step sizes (W-BR) and the kernels.
  assert float(grads["conv"]["weight"][0].alpha) != 0
  assert np.any(grads["block"]["dense"]["weight"][0].values)
  # Nothing to regularize is an error, not a silent zero.
  with pytest.raises(ValueError, match="W-BR found no quantized kernel.*mutable"):
    regularizer.weight_br({})
  with pytest.raises(ValueError, match="W-BR found no quantized kernel"):
    regularizer.weight_br({"relu": col["relu"]})


@pytest.mark.slow
def test_activation_br_collects_every_call_signed_and_unsigned():
  col = _collection()
  acts = [s for _, _, s in sites.iterate(col, ("output",))]
  (inp,) = [s for _, _, s in sites.iterate(col, ("input",))]
  expected = (sum(regularizer.bin_regularization(s.values, s.alpha, 0, 15) for s in acts)
              + regularizer.bin_regularization(inp.values, inp.alpha, -8, 7))
  np.testing.assert_allclose(regularizer.activation_br(col), expected, rtol=1e-6)
  grad_off = jax.grad(regularizer.activation_br, allow_int=True)(col)
  grad_on = jax.grad(lambda c: regularizer.activation_br(c, alpha_grad=True), allow_int=True)(col)
  assert all(float(g.alpha) == 0 for g in grad_off["relu"]["output"])
  assert all(float(g.alpha) != 0 for g in grad_on["relu"]["output"])
  chex.assert_trees_all_close([g.values for g in grad_off["relu"]["output"]],
                              [g.values for g in grad_on["relu"]["output"]])
  # Site selection by module path.
  only_relu = sum(regularizer.bin_regularization(s.values, s.alpha, 0, 15) for s in acts)
  np.testing.assert_allclose(regularizer.activation_br(col, layers="^relu"), only_relu,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="A-BR found no quantized activation whose path"):
    regularizer.activation_br(col, layers="nothing")
  with pytest.raises(ValueError, match="A-BR found no quantized activation"):
    regularizer.activation_br({"conv": col["conv"]})


def test_br_losses_returns_both_parts():
  col = _collection(bits_w=4, bits_a=4)
  br_w, br_a = regularizer.br_losses(col)
  np.testing.assert_allclose(br_w, regularizer.weight_br(col))
  np.testing.assert_allclose(br_a, regularizer.activation_br(col))
  assert float(br_a) > 0 and float(br_w) > 0


def test_activation_br_clipped_reaches_every_site_and_only_activations():
  """``abr_clipped="exclude"``: each activation site on its own range, W-BR unchanged."""
  col = _collection(bits_w=2, bits_a=2)  # 2-bit activations: many values above the range
  acts = [s for _, _, s in sites.iterate(col, ("output", "input"))]
  expected = sum(_loop_reference(s.values, s.alpha, int(s.qn), int(s.qn) + s.levels - 1,
                                 "exclude") for s in acts)
  br_w, br_a = regularizer.br_losses(col, abr_clipped="exclude")
  np.testing.assert_allclose(br_a, expected, rtol=1e-5)
  assert float(br_a) != float(regularizer.activation_br(col))
  assert float(br_w) == float(regularizer.weight_br(col))
  grads = jax.grad(lambda c: regularizer.activation_br(c, clipped="exclude"),
                   allow_int=True)(col)
  assert all(np.all(np.isfinite(g.values)) for g in grads["relu"]["output"])
  with pytest.raises(ValueError, match="clipped='top' is not accepted"):
    regularizer.activation_br(col, clipped="top")


@pytest.mark.slow
def test_stacked_sites_bin_each_layer_on_its_own_grid():
  """nn.scan stacks records: each layer of the stack is binned with its own step size."""
  k1, _ = _kernels()
  layers = [k1, 3 * k1]
  alphas = [jnp.float32(0.05), jnp.float32(0.2)]
  stacked = sites.Site(values=jnp.stack(layers), alpha=jnp.stack(alphas),
                       qn=jnp.full((2,), -2, jnp.int32), levels=4, ndim=4)
  expected = sum(regularizer.bin_regularization(k, a, -2, 1) for k, a in zip(layers, alphas))
  np.testing.assert_allclose(regularizer.weight_br({"scan": {"weight": (stacked,)}}), expected,
                             rtol=1e-6)
  # Per-channel step sizes, stacked: one grid and one set of bins per (layer, channel); a
  # layer counts the mean over its channels.
  per_channel = jnp.stack([jnp.linspace(0.03, 0.1, 8).reshape(1, 1, 1, 8),
                           jnp.linspace(0.1, 0.3, 8).reshape(1, 1, 1, 8)])
  stacked = stacked.replace(alpha=per_channel)
  expected = sum(regularizer.bin_regularization(layers[i][..., c], per_channel[i, 0, 0, 0, c],
                                                -2, 1)
                 for i in range(2) for c in range(8)) / 8
  np.testing.assert_allclose(regularizer.weight_br({"scan": {"weight": (stacked,)}}), expected,
                             rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_br_alpha_grad_options(per_channel):
  """``lsq`` scales W-BR's step-size gradient by g = 1/sqrt(N * qp) (N weights per step
  size), ``none`` stops it; the loss value and the kernel gradient stay bit-identical."""
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8)) * 0.1
  alpha = jnp.full((1, 1, 1, 8) if per_channel else (), 0.05) * (
      1 + 0.1 * jnp.arange(8) if per_channel else 1.0)
  qn, qp = quant.qrange(3, signed=True)

  def loss(kernel, alpha, mode):
    collection = {"conv": {sites.WEIGHT: (sites.record(kernel, alpha, qn, qp),)}}
    return regularizer.weight_br(collection, alpha_grad=mode)

  out = {m: jax.value_and_grad(loss, argnums=(0, 1))(kernel, alpha, m)
         for m in regularizer.ALPHA_GRADS_W}
  n = kernel.size // alpha.size
  assert out["full"][0] == out["lsq"][0] == out["none"][0]
  for m in ("lsq", "none"):
    np.testing.assert_array_equal(out[m][1][0], out["full"][1][0])
  np.testing.assert_allclose(out["lsq"][1][1], out["full"][1][1] / np.sqrt(n * qp), rtol=1e-6)
  assert jnp.all(out["full"][1][1] != 0)
  np.testing.assert_array_equal(out["none"][1][1], 0)
  with pytest.raises(ValueError, match="alpha_grad='scaled' is not accepted"):
    loss(kernel, alpha, "scaled")


@pytest.mark.parametrize("value", ["true", "yes", "full", 1, 0, None])
def test_activation_alpha_grad_is_a_bool(value):
  """``alpha_grad_a`` is validated as strictly as ``alpha_grad_w``: ``"yes"`` silently meant
  off, ``1`` and ``"full"`` on."""
  col = _collection()
  with pytest.raises(ValueError, match=f"alpha_grad_a={value!r} is not accepted: use True or "
                                       "False"):
    regularizer.br_losses(col, alpha_grad_a=value)
  with pytest.raises(ValueError, match=f"alpha_grad={value!r} is not accepted: use True or "
                                       "False"):
    regularizer.activation_br(col, alpha_grad=value)
  with pytest.raises(ValueError, match=f"alpha_grad={value!r} is not accepted: use True or "
                                       "False"):
    regularizer.bin_regularization(jnp.ones(4), 0.5, 0, 3, alpha_grad=value)
  for ok in (True, False, np.bool_(True)):
    regularizer.br_losses(col, alpha_grad_a=ok)


def test_abr_layers_is_a_regular_expression():
  col = _collection()
  with pytest.raises(ValueError, match=r"abr_layers='\(' is not accepted: use a regular "
                                       "expression"):
    regularizer.br_losses(col, abr_layers="(")
  with pytest.raises(ValueError, match=r"layers=3 is not accepted: use a regular expression"):
    regularizer.activation_br(col, layers=3)


def test_bin_regularization_validates_what_layer_metrics_does():
  """The sibling of ``metrics.layer_metrics`` takes the same ``(v, alpha, qn, qp)``: a range
  with ``qn >= qp`` or a step size that does not fit ``v`` failed deep in a segment sum."""
  v = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"qn=1, qp=1 is not an integer range"):
    regularizer.bin_regularization(v, 0.5, 1, 1)
  with pytest.raises(ValueError, match=r"qn=-2.0, qp=1 is not an integer range"):
    regularizer.bin_regularization(v, 0.5, -2.0, 1)
  with pytest.raises(ValueError, match=r"alpha of shape \(4,\) does not broadcast to v of "
                                       r"shape \(4, 3\)"):
    regularizer.bin_regularization(v, jnp.ones(4), -2, 1)
