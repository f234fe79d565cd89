"""Tests of brjax.quant.lsq: LSQ math, its custom gradient, and the Flax layers."""

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.quant import lsq as quant
from brjax.quant import regularizer

ALL_BITS = range(2, 9)


def _ref_forward(x, alpha, qn, qp):
  return np.round(np.clip(x / alpha, qn, qp)) * alpha


def _ref_grads(x, alpha, qn, qp, g, ct):
  """Float64 LSQ gradients written from the paper's equations, elementwise."""
  x, ct = np.asarray(x, np.float64), np.asarray(ct, np.float64)
  a = np.broadcast_to(np.asarray(alpha, np.float64), x.shape)
  dx, dalpha = np.zeros_like(x), np.zeros_like(x)
  for i in np.ndindex(x.shape):
    v = x[i] / a[i]
    if v < qn:
      dalpha[i] = qn
    elif v > qp:
      dalpha[i] = qp
    else:
      dx[i] = 1.0
      dalpha[i] = np.round(v) - v
  return dx * ct, dalpha * ct * g


def _sum_to(t, shape):
  while t.ndim > len(shape):
    t = t.sum(0)
  return t.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True)


class QRangeTest(parameterized.TestCase):

  @parameterized.parameters(*ALL_BITS)
  def test_ranges(self, bits):
    self.assertEqual(quant.qrange(bits, signed=True), (-2**(bits - 1), 2**(bits - 1) - 1))
    self.assertEqual(quant.qrange(bits, signed=False), (0, 2**bits - 1))

  def test_two_bit_levels(self):
    self.assertEqual(quant.qrange(2, True), (-2, 1))
    self.assertEqual(quant.qrange(2, False), (0, 3))

  def test_one_bit_is_ternary_signed_and_binary_unsigned(self):
    self.assertEqual(quant.qrange(1, True), (-1, 1))
    self.assertEqual(quant.qrange(1, False), (0, 1))

  @parameterized.parameters(0, 9, 16, 32, -2, 2.0, True, "4", None)
  def test_rejects_bad_bits(self, bits):
    with pytest.raises(ValueError, match=r"bits=.*1\.\.8"):
      quant.qrange(bits, signed=True)

  def test_numpy_integers_are_bits_and_give_python_ints(self):
    """``np.int64(4)`` was refused as "not an integer"; the range must stay Python ints (the
    quantizer's static path)."""
    qn, qp = quant.qrange(np.int64(4), signed=True)
    assert (qn, qp) == (-8, 7) and type(qn) is int and type(qp) is int
    quant.check_layer_bits(np.int32(32))
    x = jax.random.normal(jax.random.key(0), (2, 3))
    variables = quant.QuantDense(2, bits=np.int64(4)).init(jax.random.key(0), x)
    assert variables["params"]["alpha"].shape == ()

  def test_layer_bits(self):
    quant.check_layer_bits(32)
    quant.check_layer_bits(4)
    with pytest.raises(ValueError, match="bits=16.*1..8.*32"):
      quant.check_layer_bits(16)


def test_init_alpha_and_grad_scale():
  x = jnp.array([[-1.0, 2.0], [3.0, -4.0]])
  np.testing.assert_allclose(quant.init_alpha(x, 3), 2 * 2.5 / np.sqrt(3), rtol=1e-6)
  assert quant.init_alpha(x, 3).dtype == jnp.float32
  assert quant.init_alpha(x.astype(jnp.bfloat16), 3).dtype == jnp.float32
  with jax.enable_x64(True):
    x64 = jnp.asarray(np.random.default_rng(0).normal(size=1000), jnp.float64)
    a = quant.init_alpha(x64, 3)
    assert a.dtype == jnp.float64  # a float32 init is 1e-8 off: enough to flip codes
    np.testing.assert_allclose(float(a), 2 * np.mean(np.abs(np.asarray(x64))) / np.sqrt(3),
                               rtol=1e-14)
  assert quant.grad_scale(100, 1) == pytest.approx(0.1)
  assert quant.grad_scale(8, 2) == pytest.approx(0.25)


class LsqForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=list(ALL_BITS), signed=[True, False], per_channel=[False, True])
  def test_on_grid_in_range_idempotent(self, bits, signed, per_channel):
    qn, qp = quant.qrange(bits, signed)
    alpha = (jnp.linspace(0.05, 0.6, 8) if per_channel else jnp.float32(0.37))
    x = alpha * jax.random.uniform(jax.random.key(bits), (64, 8), minval=qn - 2,
                                   maxval=qp + 2)
    fn = self.variant(lambda x, a: quant.lsq_quantize(x, a, qn, qp, 1.0))
    q = fn(x, alpha)
    chex.assert_shape(q, x.shape)
    chex.assert_type(q, jnp.float32)
    k = np.asarray(q / alpha)
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert k.min() >= qn - 1e-4 and k.max() <= qp + 1e-4
    np.testing.assert_allclose(q, _ref_forward(np.asarray(x), np.asarray(alpha), qn, qp),
                               rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(fn(q, alpha), q, atol=1e-6)
    # Both ends of the range are reached by this wide input.
    assert k.min() == pytest.approx(qn, abs=1e-4) and k.max() == pytest.approx(qp, abs=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_dtypes(dtype):
  x = jnp.linspace(-2, 2, 41).astype(dtype)
  alpha = jnp.float32(0.25)
  q, grads = jax.value_and_grad(lambda x, a: quant.lsq_quantize(x, a, -8, 7, 0.1).sum(),
                                argnums=(0, 1))(x, alpha)
  assert quant.lsq_quantize(x, alpha, -8, 7, 0.1).dtype == dtype
  assert grads[0].dtype == dtype and grads[1].dtype == jnp.float32
  assert np.isfinite(float(q)) and np.isfinite(float(grads[1]))


class LsqGradientTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=[2, 3, 8], signed=[True, False], per_channel=[False, True])
  def test_matches_float64_reference(self, bits, signed, per_channel):
    qn, qp = quant.qrange(bits, signed)
    rng = np.random.default_rng(bits)
    # Powers of two make k * alpha / alpha exact, so boundary points are exactly on them.
    alpha = 2.0**-rng.integers(1, 4, (6,)) if per_channel else np.float64(0.25)
    a = np.broadcast_to(alpha, (5, 6))
    # Random values plus exact range boundaries, points just outside them, rounding ties.
    x = rng.normal(0, 2 * qp * 0.3, (5, 6))
    x[0] = qn * a[0]
    x[1] = qp * a[1]
    x[2] = (qn - 1e-3) * a[2]
    x[3] = (qp + 1e-3) * a[3]
    x[4] = (np.arange(6) % (qp - qn) + qn + 0.5) * a[4]
    ct = rng.normal(size=(5, 6))
    g = 0.07
    with jax.enable_x64(True):
      fn = self.variant(lambda x, a, ct: jax.vjp(
          lambda x, a: quant.lsq_quantize(x, a, qn, qp, g), x, a)[1](ct))
      dx, dalpha = fn(jnp.asarray(x), jnp.asarray(alpha), jnp.asarray(ct))
      assert dx.dtype == jnp.float64
    ref_dx, ref_dalpha = _ref_grads(x, alpha, qn, qp, g, ct)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dalpha, _sum_to(ref_dalpha, np.shape(alpha)), rtol=1e-10,
                               atol=1e-12)
    # The boundaries are inside (inclusive range), just outside is outside.
    np.testing.assert_array_equal(dx[0], ct[0])
    np.testing.assert_array_equal(dx[1], ct[1])
    np.testing.assert_array_equal(dx[2], 0)
    np.testing.assert_array_equal(dx[3], 0)

  def test_rounding_ties_and_boundary_values(self):
    with jax.enable_x64(True):
      alpha = jnp.float64(0.5)
      x = jnp.array([-1.0, -1.0005, -0.75, 0.25, 0.5, 0.5005])  # v=-2, <-2, -1.5, .5, 1, >1
      q = quant.lsq_quantize(x, alpha, -2, 1, 1.0)
      dx, dalpha = jax.jacrev(lambda x, a: quant.lsq_quantize(x, a, -2, 1, 1.0),
                              argnums=(0, 1))(x, alpha)
    np.testing.assert_allclose(q, [-1.0, -1.0, -1.0, 0.0, 0.5, 0.5])  # ties: half to even
    np.testing.assert_allclose(np.diag(dx), [1, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(dalpha, [0.0, -2.0, -0.5, -0.5, 0.0, 1.0], atol=1e-12)

  def test_finite_difference_of_ste_surrogate(self):
    """The custom gradient is the exact gradient of the STE surrogate.

    ``s(x, a) = a * (c + K)`` with ``c = clip(x / a, qn, qp)`` and ``K = round(c) - c`` held
    at the base point: its central finite differences equal the custom vjp.
    """
    qn, qp, g = -4, 3, 0.3
    rng = np.random.default_rng(0)
    x0 = rng.normal(0, 1.5, 40)
    a0 = 0.41
    c0 = np.clip(x0 / a0, qn, qp)
    k = np.round(c0) - c0

    def surrogate(x, a):
      return a * (np.clip(x / a, qn, qp) + k)

    ct = rng.normal(size=40)
    eps = 1e-6
    fd_dx = np.array([(ct @ surrogate(x0 + eps * e, a0) - ct @ surrogate(x0 - eps * e, a0))
                      / (2 * eps) for e in np.eye(40)])
    fd_da = (ct @ surrogate(x0, a0 + eps) - ct @ surrogate(x0, a0 - eps)) / (2 * eps)
    with jax.enable_x64(True):
      _, vjp = jax.vjp(lambda x, a: quant.lsq_quantize(x, a, qn, qp, g),
                       jnp.asarray(x0), jnp.float64(a0))
      dx, da = vjp(jnp.asarray(ct))
    np.testing.assert_allclose(dx, fd_dx, atol=1e-6)
    np.testing.assert_allclose(da, g * fd_da, rtol=1e-6)

  def test_grad_scale_gets_no_gradient_and_scales_alpha_only(self):
    x = jnp.linspace(-1, 1, 11)
    f = lambda x, a, g: quant.lsq_quantize(x, a, -2, 1, g).sum()
    g1 = jax.grad(f, argnums=(0, 1, 2))(x, 0.3, 1.0)
    g2 = jax.grad(f, argnums=(0, 1, 2))(x, 0.3, 0.5)
    chex.assert_trees_all_close(g1[0], g2[0])
    np.testing.assert_allclose(g2[1], 0.5 * g1[1], rtol=1e-6)
    assert g1[2] == 0

  @pytest.mark.filterwarnings("ignore")
  def test_nonpositive_alpha_gives_no_nan(self):
    x = jax.random.normal(jax.random.key(1), (64,))
    for alpha in [0.0, -0.3, 1e-30]:
      q, (dx, da) = jax.value_and_grad(
          lambda x, a: jnp.sum(quant.lsq_quantize(x, a, -2, 1, 0.1)**2), argnums=(0, 1))(
              x, jnp.float32(alpha))
      assert np.isfinite(q) and np.all(np.isfinite(dx)) and np.isfinite(da)
    # The clamped step size still gets a gradient, so an optimizer can move it back up.
    da = jax.grad(lambda a: jnp.sum((quant.lsq_quantize(x, a, -2, 1, 0.1) - x)**2))(0.0)
    assert da < 0

  @pytest.mark.slow
  def test_vmap_and_jit(self):
    x = jax.random.normal(jax.random.key(2), (3, 10))
    alphas = jnp.array([0.2, 0.3, 0.4])
    f = lambda x, a: quant.lsq_quantize(x, a, 0, 3, 0.1)
    batched = jax.jit(jax.vmap(f))(x, alphas)
    chex.assert_trees_all_close(batched, f(x, alphas[:, None]))
    per_row = jax.vmap(jax.grad(lambda x, a: f(x, a).sum(), argnums=1))(x, alphas)
    whole = jax.grad(lambda a: f(x, a[:, None]).sum())(alphas)
    chex.assert_trees_all_close(per_row, whole, rtol=1e-6)


# ----------------------------------------------------------------------------- layers


def _pair(qcls, fcls, bits, **kw):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  qmodel, fmodel = qcls(bits=bits, **kw), fcls(**kw)
  qvars = qmodel.init(jax.random.key(1), x)
  fvars = fmodel.init(jax.random.key(1), x)
  return x, qmodel, qvars, fmodel, fvars


@pytest.mark.parametrize("qcls,fcls,kw", [
    (quant.QuantConv, nn.Conv, dict(features=5, kernel_size=(3, 3), strides=2)),
    (quant.QuantConv, nn.Conv, dict(features=4, kernel_size=(1, 1), use_bias=False)),
    (quant.QuantDense, nn.Dense, dict(features=7)),
])
def test_float_layers_match_flax(qcls, fcls, kw):
  x, qmodel, qvars, fmodel, fvars = _pair(qcls, fcls, 32, **kw)
  chex.assert_trees_all_equal_structs(qvars, fvars)
  chex.assert_trees_all_close(qmodel.apply(fvars, x), fmodel.apply(fvars, x), rtol=0, atol=0)


@pytest.mark.parametrize("qcls,fcls,kw", [
    (quant.QuantConv, nn.Conv, dict(features=5, kernel_size=(3, 3))),
    (quant.QuantDense, nn.Dense, dict(features=7)),
])
@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_layers(qcls, fcls, kw, bits):
  x, qmodel, qvars, fmodel, _ = _pair(qcls, fcls, bits, **kw)
  params = qvars["params"]
  qn, qp = quant.qrange(bits, signed=True)
  assert set(params) == {"kernel", "bias", "alpha"}
  np.testing.assert_allclose(params["alpha"], quant.init_alpha(params["kernel"], qp),
                             rtol=1e-6)
  qkernel = _ref_forward(np.asarray(params["kernel"]), float(params["alpha"]), qn, qp)
  expected = fmodel.apply({"params": {"kernel": qkernel, "bias": params["bias"]}}, x)
  chex.assert_trees_all_close(qmodel.apply(qvars, x), expected, atol=1e-5)


def test_quant_relu():
  x = 3 * jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  np.testing.assert_array_equal(quant.QuantReLU().apply({}, x), nn.relu(x))
  np.testing.assert_array_equal(quant.QuantReLU(clip=1.0).apply({}, x), jnp.clip(x, 0, 1))
  layer = quant.QuantReLU(bits=2, clip=6.0)
  variables = layer.init(jax.random.key(0), x)
  y_pre = jnp.clip(x, 0, 6)
  alpha = variables["params"]["alpha"]
  np.testing.assert_allclose(alpha, quant.init_alpha(y_pre, 3), rtol=1e-6)
  y, state = layer.apply(variables, x, mutable=["quant"])
  np.testing.assert_allclose(y, _ref_forward(np.asarray(y_pre), float(alpha), 0, 3), atol=1e-6)
  (site,) = state["quant"]["output"]
  chex.assert_trees_all_close(site.values, y_pre)
  chex.assert_trees_all_close(site.alpha, alpha)
  assert (int(site.qn), site.levels, site.ndim) == (0, 4, 4)
  # Without 'quant' in mutable nothing is recorded.
  y2, state2 = layer.apply(variables, x, mutable=["batch_stats"])
  chex.assert_trees_all_close(y2, y)
  assert "quant" not in state2


def test_invalid_layer_bits():
  with pytest.raises(ValueError, match="bits=9"):
    quant.QuantDense(3, bits=9).init(jax.random.key(0), jnp.ones((1, 2)))


class UserModel(nn.Module):
  """A model a user writes: brjax layers composed with plain Flax."""
  bits: int = 2

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = quant.QuantConv(8, (3, 3), bits=self.bits, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = quant.QuantReLU(bits=self.bits)(x)
    x = quant.QuantConv(8, (3, 3), strides=2, bits=self.bits)(x)
    x = quant.QuantReLU(bits=self.bits, clip=6.0)(x)
    x = x.mean(axis=(1, 2))
    return quant.QuantDense(10, bits=self.bits)(x)


@pytest.mark.slow
def test_user_model_jitted_training_step():
  model = UserModel()
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  y = jnp.arange(8) % 10
  variables = model.init(jax.random.key(1), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  mutable=["batch_stats", "quant"])
      br_w, br_a = regularizer.br_losses(state["quant"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + br_w + br_a, (state["batch_stats"], br_w, br_a)
    (loss, (bs, br_w, br_a)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), bs, opt_state, loss, br_w, br_a, grads

  losses = []
  for _ in range(5):
    params, batch_stats, opt_state, loss, br_w, br_a, grads = step(params, batch_stats,
                                                                  opt_state)
    losses.append(float(loss))
  assert br_w > 0 and br_a > 0
  assert losses[-1] < losses[0]
  # Every step size, weights' and activations', received a gradient.
  alphas = {p: g for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if p[-1].key == "alpha"}
  assert len(alphas) == 5 and all(float(g) != 0 for g in alphas.values())
  # The collectors found both activations and all three kernels.
  _, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False,
                         mutable=["quant"])
  expected = sum(regularizer.bin_regularization(m["output"][0].values, m["output"][0].alpha, 0, 3)
                 for name, m in state["quant"].items() if name.startswith("QuantReLU"))
  np.testing.assert_allclose(regularizer.activation_br(state["quant"]), expected, rtol=1e-6)
  expected = sum(regularizer.bin_regularization(params[name]["kernel"], params[name]["alpha"],
                                                -2, 1)
                 for name in ("QuantConv_0", "QuantConv_1", "QuantDense_0"))
  np.testing.assert_allclose(regularizer.weight_br(state["quant"]), expected, rtol=1e-6)
  assert len(state["quant"]) == 5


def test_init_alphas_data_driven():
  model = UserModel(bits=4)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  # Pretend new float weights were loaded: scale every kernel.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 3.0 if p[-1].key == "kernel" else v, variables["params"])
  new = quant.init_alphas(model, {**variables, "params": params}, 2 * x, train=False)
  _, qp_w = quant.qrange(4, True)
  _, qp_a = quant.qrange(4, False)
  for name in ["QuantConv_0", "QuantConv_1", "QuantDense_0"]:
    np.testing.assert_allclose(new["params"][name]["alpha"],
                               quant.init_alpha(params[name]["kernel"], qp_w), rtol=1e-6)
  # Activation alphas come from the inputs each layer sees with the new upstream alphas.
  _, state = model.apply(new, 2 * x, train=False, mutable=["quant"])
  for name in ["QuantReLU_0", "QuantReLU_1"]:
    np.testing.assert_allclose(new["params"][name]["alpha"],
                               quant.init_alpha(state["quant"][name]["output"][0].values,
                                                qp_a), rtol=1e-5)
  # Everything that is not a step size is untouched.
  chex.assert_trees_all_close(new["params"]["QuantConv_0"]["kernel"],
                              params["QuantConv_0"]["kernel"])
  chex.assert_trees_all_close(new["batch_stats"], variables["batch_stats"])


def test_init_alphas_in_train_mode_keeps_batch_stats_and_takes_rngs():
  class DropNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = quant.QuantConv(4, (3, 3), bits=4)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.Dropout(0.5, deterministic=not train)(x)
      return quant.QuantReLU(bits=4)(x)

  model = DropNet()
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
  new = quant.init_alphas(model, variables, 3 * x, rngs={"dropout": jax.random.key(3)},
                          train=True)
  chex.assert_trees_all_close(new["batch_stats"], variables["batch_stats"])  # not a step
  assert not np.allclose(new["params"]["QuantReLU_0"]["alpha"],
                         variables["params"]["QuantReLU_0"]["alpha"])


def test_quant_relu_keep_last_call_and_batch_grad_scale():
  x = jax.random.normal(jax.random.key(0), (16, 5))

  class Twice(nn.Module):
    keep_last_call: bool

    @nn.compact
    def __call__(self, x):
      relu = quant.QuantReLU(bits=2, keep_last_call=self.keep_last_call)
      return relu(relu(x) - 0.3)  # one step size, two call sites

  for keep, sown in [(False, 2), (True, 1)]:
    variables = Twice(keep).init(jax.random.key(0), x)
    _, state = Twice(keep).apply(variables, x, mutable=["quant"])
    assert len(state["quant"]["QuantReLU_0"]["output"]) == sown
  # The last call's input is what is kept.
  _, state = Twice(True).apply(variables, x, mutable=["quant"])
  relu = quant.QuantReLU(bits=2)
  first = relu.apply({"params": variables["params"]["QuantReLU_0"]}, x)
  np.testing.assert_allclose(state["quant"]["QuantReLU_0"]["output"][0].values,
                             jnp.maximum(first - 0.3, 0.0))
  # The batch-wide gradient scale divides the alpha gradient by sqrt(batch size).
  grads = {}
  for batch_scale in (False, True):
    layer = quant.QuantReLU(bits=2, batch_grad_scale=batch_scale)
    params = layer.init(jax.random.key(0), x)
    grads[batch_scale] = jax.grad(lambda p: layer.apply(p, x).sum())(  # noqa: B023
        params)["params"]["alpha"]
  np.testing.assert_allclose(grads[True] * np.sqrt(16), grads[False], rtol=1e-5)


# -------------------------------------------------------- what the layers and functions accept


@pytest.mark.parametrize("clip", [0.0, -6.0, float("nan"), float("inf")])
def test_quant_relu_clip_is_validated_as_the_config_does(clip):
  """``--clip`` must be positive; ``QuantReLU(clip=-6)`` gave ``jnp.clip(x, 0, -6)``: -6."""
  x = jax.random.normal(jax.random.key(0), (4, 3))
  with pytest.raises(ValueError, match=r"QuantReLU clip=.* is not accepted: use a positive "
                                       r"finite number, or None"):
    quant.QuantReLU(bits=2, clip=clip).init(jax.random.key(0), x)


def test_ranges_and_axes_are_validated():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  with pytest.raises(ValueError, match=r"qn=2, qp=-2 is not an integer range"):
    quant.lsq_quantize(x, 0.1, 2, -2, 1.0)
  with pytest.raises(ValueError, match=r"channel_axes=\(2,\) is not accepted: use axes of the "
                                       r"rank-2 x"):
    quant.init_alpha(x, 3, (2,))  # wrapped to axis 0 without a word
  np.testing.assert_array_equal(quant.init_alpha(x, 3, (-1,)), quant.init_alpha(x, 3, (1,)))


def test_a_zero_kernel_and_a_relu_that_sees_no_positive_input_are_errors():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  with pytest.raises(ValueError, match=r"layers_0: LSQ's init gives its kernel step size "
                                       r"0: the kernel .* is all zero"):
    nn.Sequential([quant.QuantDense(2, bits=2, kernel_init=nn.initializers.zeros)]).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"QuantReLU: the init batch gives its output no "
                                       r"variation \(every value 0\)"):
    quant.QuantReLU(bits=2).init(jax.random.key(0), -jnp.abs(x))


def test_an_init_batch_with_nan_or_inf_is_an_error():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  for bad in (jnp.nan, jnp.inf):
    with pytest.raises(ValueError, match=r"QuantReLU: the init batch holds values that are not "
                                         r"finite at its output .*pass a real batch"):
      quant.QuantReLU(bits=2).init(jax.random.key(0), x.at[0, 0].set(bad))
