"""Tests of brjax.quant.metrics: each metric against a float64 numpy reference, and the
collectors."""

from __future__ import annotations

import functools
import json

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.quant import metrics


def np_layer_metrics(v, alpha, qn, qp, where=None) -> dict:
  """The definitions, in float64 numpy, with a per-level loop (the obvious way)."""
  v = np.asarray(v, np.float64)
  alpha = float(alpha)
  where = np.ones(v.shape, bool) if where is None else np.broadcast_to(where, v.shape)
  v = v[where]
  m = np.round(np.clip(v / alpha, qn, qp))
  err = v - m * alpha
  return {"alpha": alpha, "mse": np.mean(err**2),
          "near_frac": np.mean(np.abs(err) <= 0.1 * alpha),
          "clipped_top": np.mean(v / alpha > qp + 0.5),
          "occupancy": np.array([np.mean(m == k) for k in range(qn, qp + 1)])}


def assert_metrics_close(got, want, **tol):
  tol = {"rtol": 1e-5, "atol": 1e-7, **tol}
  base = {"alpha", "mse", "near_frac", "clipped_top", "occupancy"}
  # The collectors add the reference's metrics (tested below) to layer_metrics'.
  assert set(got) in (base, base | {"mean_distance", "effectiveness", "pct_near", "bins_used",
                                    "bin_count", "bin_mean", "bin_std"})
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), want[key], err_msg=key, **tol)


RANGES = {"signed2": (-2, 1), "unsigned2": (0, 3), "signed4": (-8, 7), "unsigned8": (0, 255)}


class LayerMetricsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, *r) for name, r in RANGES.items()])
  def test_matches_numpy_reference(self, qn, qp):
    rng = np.random.default_rng(qp)
    v = rng.normal(0.0, 1.0, (8, 3, 3, 5)).astype(np.float32)
    v = np.abs(v) if qn == 0 else v
    alpha = np.float32(2.0 * np.mean(np.abs(v)) / np.sqrt(qp))
    got = self.variant(functools.partial(metrics.layer_metrics, qn=qn, qp=qp))(v, alpha)
    chex.assert_shape(got["occupancy"], (qp - qn + 1,))
    chex.assert_shape([got["alpha"], got["mse"], got["near_frac"]], ())
    assert_metrics_close(got, np_layer_metrics(v, alpha, qn, qp))
    np.testing.assert_allclose(np.sum(got["occupancy"]), 1.0, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_on_levels(self):
    alpha = 0.25  # exact in binary: every k * alpha is exactly representable
    k = np.array([-2, -1, -1, 0, 0, 0, 1, 1, 1, 1])
    got = self.variant(functools.partial(metrics.layer_metrics, qn=-2, qp=1))(
        (k * alpha).astype(np.float32), alpha)
    assert float(got["mse"]) == 0.0
    assert float(got["near_frac"]) == 1.0
    np.testing.assert_allclose(got["occupancy"], [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(got["alpha"], alpha)

  @chex.variants(with_jit=True, without_jit=True)
  def test_clipped_values_are_not_near(self):
    alpha = 0.5
    # 3 far above qp * alpha = 1.5, 1 far below 0; 1 on level 1; 1 clipped but near.
    v = np.array([10.0, 4.0, 2.0, -3.0, 0.5, 1.52], np.float32)
    got = self.variant(functools.partial(metrics.layer_metrics, qn=0, qp=3))(v, alpha)
    want = np_layer_metrics(v, alpha, 0, 3)
    assert_metrics_close(got, want)
    np.testing.assert_allclose(got["near_frac"], 2 / 6, rtol=1e-6)
    np.testing.assert_allclose(got["occupancy"], [1 / 6, 1 / 6, 0.0, 4 / 6], rtol=1e-6)
    np.testing.assert_allclose(
        got["mse"], np.mean([8.5**2, 2.5**2, 0.5**2, 3.0**2, 0.0, 0.02**2]), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_levels(self):
    # All elements in levels -8 and 7 of a 4-bit grid: the 14 levels between are empty.
    v = np.array([-100.0, -3.9, 3.6, 100.0, 100.0], np.float32)
    got = self.variant(functools.partial(metrics.layer_metrics, qn=-8, qp=7))(v, 0.5)
    want = np.zeros(16)
    want[0], want[-1] = 2 / 5, 3 / 5
    np.testing.assert_allclose(got["occupancy"], want, rtol=1e-6)
    assert_metrics_close(got, np_layer_metrics(v, 0.5, -8, 7))

  @chex.variants(with_jit=True, without_jit=True)
  def test_near_threshold(self):
    alpha = 1.0
    v = np.array([0.05, -0.09, 1.11, 2.5 - 0.35, 0.3], np.float32)  # near, near, no, no, no
    got = self.variant(functools.partial(metrics.layer_metrics, qn=-2, qp=2))(v, alpha)
    np.testing.assert_allclose(got["near_frac"], 2 / 5, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mse_uses_the_lsq_forward(self):
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.normal(size=(64, 9)), jnp.float32)
    alpha = jnp.float32(0.3)
    q = quant.lsq_quantize(v, alpha, -4, 3, 1.0)
    got = self.variant(functools.partial(metrics.layer_metrics, qn=-4, qp=3))(v, alpha)
    np.testing.assert_allclose(got["mse"], np.mean((np.asarray(v) - np.asarray(q))**2),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_where_selects_elements(self):
    rng = np.random.default_rng(1)
    v = np.abs(rng.normal(size=(6, 4, 4, 3))).astype(np.float32)
    mask = np.array([True, True, False, True, False, False]).reshape(6, 1, 1, 1)
    got = self.variant(functools.partial(metrics.layer_metrics, qn=0, qp=3))(v, 0.4, where=mask)
    assert_metrics_close(got, np_layer_metrics(v[mask[:, 0, 0, 0]], 0.4, 0, 3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_alpha_shape_one_and_float64(self):
    with jax.enable_x64(True):
      v = np.linspace(-1.0, 1.0, 101) + 0.013  # no element on a rounding tie
      got = self.variant(functools.partial(metrics.layer_metrics, qn=-2, qp=1))(
          v, np.array([0.4]))
      assert got["mse"].dtype == jnp.float64
      chex.assert_shape(got["alpha"], ())
      assert_metrics_close(got, np_layer_metrics(v, 0.4, -2, 1), rtol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero", 0.0), ("negative", -0.5))
  def test_nonpositive_alpha_is_floored(self, alpha):
    """Like lsq_quantize: the grid of max(alpha, 1e-8), so 0 / 0 gives no NaN."""
    v = np.array([0.0, 1.0, -1.0, 2e-8], np.float32)
    got = self.variant(functools.partial(metrics.layer_metrics, qn=-2, qp=1))(v, alpha)
    want = np_layer_metrics(v, np.float32(1e-8), -2, 1)
    assert_metrics_close({**got, "alpha": np.float32(1e-8)}, want)
    np.testing.assert_allclose(got["occupancy"], [0.25, 0.0, 0.25, 0.5])
    assert float(got["alpha"]) == alpha  # reported as the parameter is

  @parameterized.named_parameters(
      ("empty", np.zeros((0, 3)), 1.0, -2, 1, "empty"),
      ("vector_alpha", np.ones((4, 3)), np.ones(4), -2, 1, r"alpha of shape \(4,\) does not"),
      ("bad_range", np.ones(3), 1.0, 1, 1, "qn=1, qp=1"),
      ("float_range", np.ones(3), 1.0, -2.0, 1, "qn=-2.0"),
  )
  def test_errors(self, v, alpha, qn, qp, match):
    with pytest.raises(ValueError, match=match):
      metrics.layer_metrics(v, alpha, qn, qp)


# ------------------------------------------------------------------ collectors


class Block(nn.Module):
  """A conv and a dense of bits_w bits, one QuantReLU called twice and one called once."""
  bits_w: int
  bits_a: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    shared = quant.QuantReLU(bits=self.bits_a, name="shared_act")
    x = quant.QuantConv(4, (3, 3), bits=self.bits_w)(x)
    x = shared(x)
    x = quant.QuantConv(4, (1, 1), bits=self.bits_w, name="proj")(x)
    x = shared(x)
    x = nn.Conv(4, (1, 1), name="float_conv")(x)  # not quantized: no alpha, not listed
    x = quant.QuantReLU(bits=self.bits_a)(x)
    return quant.QuantDense(3, bits=self.bits_w)(x.mean(axis=(1, 2)))


class Tiny(nn.Module):
  bits_w: int = 2
  bits_a: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    return Block(self.bits_w, self.bits_a, name="block")(x, train)


def tiny_model_and_variables(bits_w=2, bits_a=3):
  """The model, its variables (init jitted: one compile, where eagerly each op and shape
  is one) and a batch."""
  model = Tiny(bits_w, bits_a)
  x = jax.random.normal(jax.random.key(0), (5, 6, 6, 3))
  return model, jax.jit(model.init)(jax.random.key(1), x), x


WEIGHT_LAYERS = {"block/QuantConv_0", "block/proj", "block/QuantDense_0"}
ACT_LAYERS = {"block/shared_act#0", "block/shared_act#1", "block/QuantReLU_0"}


def recorded(model, variables, x):
  _, state = model.apply(variables, x, mutable=["quant"])
  return state["quant"]


class CollectorsTest(parameterized.TestCase):

  def test_weight_metrics_finds_every_quantized_kernel(self):
    model, variables, x = tiny_model_and_variables()
    got = metrics.weight_metrics(recorded(model, variables, x))
    assert set(got) == WEIGHT_LAYERS
    for name, m in got.items():
      p = variables["params"]["block"][name.split("/")[1]]
      assert_metrics_close(m, np_layer_metrics(p["kernel"], p["alpha"], -2, 1))

  @pytest.mark.slow
  def test_per_channel_and_mixed_bits(self):
    class Mixed(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = quant.QuantConv(4, (3, 3), bits=8, per_channel=True)(x)
        return quant.QuantDense(3, bits=2)(x.mean(axis=(1, 2)))

    model = Mixed()
    x = jax.random.normal(jax.random.key(0), (5, 6, 6, 3))
    variables = model.init(jax.random.key(1), x)
    conv = variables["params"]["QuantConv_0"]
    chex.assert_shape(conv["alpha"], (1, 1, 1, 4))
    got = metrics.weight_metrics(recorded(model, variables, x))
    chex.assert_shape(got["QuantConv_0"]["occupancy"], (256,))
    chex.assert_shape(got["QuantDense_0"]["occupancy"], (4,))
    per_channel = [np_layer_metrics(conv["kernel"][..., c], conv["alpha"][0, 0, 0, c], -128, 127)
                   for c in range(4)]
    np.testing.assert_allclose(got["QuantConv_0"]["mse"],
                               np.mean([m["mse"] for m in per_channel]), rtol=1e-5)
    np.testing.assert_allclose(got["QuantConv_0"]["alpha"], np.mean(conv["alpha"]), rtol=1e-6)

  @pytest.mark.slow
  def test_activation_metrics_names_every_call(self):
    model, variables, x = tiny_model_and_variables()
    col = recorded(model, variables, x)
    got = metrics.activation_metrics(col)
    assert set(got) == ACT_LAYERS
    block = col["block"]
    for name, (layer, i) in {"block/shared_act#0": ("shared_act", 0),
                             "block/shared_act#1": ("shared_act", 1),
                             "block/QuantReLU_0": ("QuantReLU_0", 0)}.items():
      site = block[layer]["output"][i]
      assert_metrics_close(got[name], np_layer_metrics(site.values, site.alpha, 0, 7))

  @pytest.mark.slow
  def test_activation_metrics_mask(self):
    model, variables, x = tiny_model_and_variables()
    col = recorded(model, variables, x)
    mask = np.array([True, False, True, True, False])
    got = metrics.activation_metrics(col, mask=mask)
    site = col["block"]["QuantReLU_0"]["output"][0]
    want = np_layer_metrics(np.asarray(site.values)[mask], site.alpha, 0, 7)
    assert_metrics_close(got["block/QuantReLU_0"], want)
    with pytest.raises(ValueError, match=r"mask of shape \(4,\)"):
      metrics.activation_metrics(col, mask=mask[:4])

  def test_empty_collections(self):
    assert metrics.weight_metrics({}) == {}
    assert metrics.activation_metrics({}) == {}
    with pytest.raises(ValueError, match="no brjax site sowed"):
      metrics.weight_metrics({"act": {"pre_quant": (jnp.ones((2, 3)),)}})

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_metrics(self):
    model, variables, x = tiny_model_and_variables()
    fn = self.variant(functools.partial(metrics.quant_metrics, model))
    got = fn(variables, x)
    assert set(got) == {"weights", "activations"}
    assert set(got["weights"]) == WEIGHT_LAYERS and set(got["activations"]) == ACT_LAYERS
    col = recorded(model, variables, x)
    want = {"weights": metrics.weight_metrics(col),
            "activations": metrics.activation_metrics(col)}
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_quant_metrics_batch_dict_with_mask(self):
    model, variables, x = tiny_model_and_variables()
    mask = jnp.array([True, True, False, False, True])
    fn = self.variant(functools.partial(metrics.quant_metrics, model))
    got = fn(variables, {"image": x, "mask": mask, "label": jnp.zeros(5, jnp.int32)})
    want = fn(variables, x[np.asarray(mask)])
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask was given twice"):
      metrics.quant_metrics(model, variables, {"image": x, "mask": mask}, mask=mask)

  def test_quant_metrics_ignores_stale_records(self):
    model, variables, x = tiny_model_and_variables()
    _, state = model.apply(variables, x, mutable=["quant"])
    got = metrics.quant_metrics(model, {**variables, **state}, x)
    assert set(got["activations"]) == ACT_LAYERS  # not shared_act#0..#3

  @parameterized.named_parameters(("float_weights", 32, 3), ("float_acts", 2, 32),
                                  ("float", 32, 32))
  def test_quant_metrics_float_parts_are_empty(self, bits_w, bits_a):
    model, variables, x = tiny_model_and_variables(bits_w, bits_a)
    got = jax.jit(functools.partial(metrics.quant_metrics, model))(variables, x)
    assert (got["weights"] == {}) == (bits_w == 32)
    assert (got["activations"] == {}) == (bits_a == 32)

  def test_quant_metrics_traces_once(self):
    model, variables, x = tiny_model_and_variables()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(variables, x):
      return metrics.quant_metrics(model, variables, x)

    fn(variables, x)
    fn(jax.tree.map(lambda a: a * 1.5, variables), x + 1.0)

  def test_resnet20_layer_names(self):
    """Every conv (stem and projections too), the dense layer and every ReLU is listed."""
    model = models.create_model("resnet20", bits_w=2, bits_a=2)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    got = jax.eval_shape(functools.partial(metrics.quant_metrics, model), variables, x)
    blocks = [f"BasicBlock_{i}" for i in range(9)]
    assert set(got["weights"]) == (
        {"conv_init", "QuantDense_0", "BasicBlock_3/conv_proj", "BasicBlock_6/conv_proj"} |
        {f"{b}/QuantConv_{j}" for b in blocks for j in (0, 1)})
    assert set(got["activations"]) == (
        {"act_init"} | {f"{b}/QuantReLU_{j}" for b in blocks for j in (0, 1)})
    chex.assert_shape(got["weights"]["conv_init"]["occupancy"], (4,))


# ------------------------------------------------------------------- to_python


def test_to_python_is_json_serializable():
  model, variables, x = tiny_model_and_variables()
  got = metrics.quant_metrics(model, variables, x)
  py = metrics.to_python(got)
  assert json.loads(json.dumps(py)) == py
  m = py["weights"]["block/proj"]
  assert isinstance(m["alpha"], float) and isinstance(m["mse"], float)
  assert isinstance(m["occupancy"], list) and all(isinstance(o, float) for o in m["occupancy"])
  as_arrays = lambda tree: jax.tree.map(np.asarray, tree, is_leaf=lambda x: isinstance(x, list))
  chex.assert_trees_all_close(as_arrays(py), as_arrays(got))


def test_to_python_types():
  tree = {1: (np.int32(3), np.bool_(True)), "a": [jnp.ones((2, 2)), None, "s", 2.5]}
  assert metrics.to_python(tree) == {"1": [3, True], "a": [[[1.0, 1.0], [1.0, 1.0]], None, "s",
                                                           2.5]}


# ------------------------------------------------- the reference package's BR metrics


def _reference_numpy(v, alpha, qn, qp):
  """The reference's BinRegularizer metrics, transcribed to numpy (loop over bins)."""
  v = np.asarray(v, np.float64).reshape(-1)
  m = np.round(np.clip(v / alpha, qn, qp))
  d = np.abs(v - m * alpha)
  out = {"mean_distance": d.mean(),
         "effectiveness": np.clip(100 * (1 - d.mean() / (alpha * 0.5 + 1e-12)), 0, 100),
         "pct_near": 100 * np.mean(d < 0.01 * alpha)}
  counts, means, stds = [], [], []
  for k in range(qn, qp + 1):
    b = v[m == k]
    counts.append(b.size)
    means.append(b.mean() if b.size else 0.0)
    stds.append(b.std(ddof=1) if b.size > 1 else 0.0)
  out.update(bins_used=sum(c > 0 for c in counts), bin_count=counts, bin_mean=means,
             bin_std=stds)
  return out


@pytest.mark.parametrize("bits,signed", [(1, True), (1, False), (2, True), (2, False),
                                         (4, True), (3, False)])
def test_reference_br_metrics_match_the_reference_definitions(bits, signed):
  qn, qp = quant.qrange(bits, signed)
  rng = np.random.default_rng(bits)
  alpha = 0.3
  # Values on levels, near levels and spread, a few clipped far outside.
  v = np.concatenate([rng.integers(qn, qp + 1, 40) * alpha,
                      rng.integers(qn, qp + 1, 30) * alpha + rng.normal(0, 0.001, 30),
                      rng.uniform(qn * alpha, qp * alpha, 50), [qp * alpha * 3]])
  if qn < 0:
    v = np.concatenate([v, [qn * alpha * 3]])
  got = jax.jit(metrics.reference_br_metrics, static_argnums=(2, 3))(
      jnp.asarray(v, jnp.float32), jnp.float32(alpha), qn, qp)
  want = _reference_numpy(v.astype(np.float32), np.float32(alpha), qn, qp)
  assert set(got) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
  assert 0 < float(got["effectiveness"]) < 100 and 30 < float(got["pct_near"]) < 80


def test_reference_br_metrics_extremes_and_mask():
  on = jnp.array([0.0, 0.5, 0.5, 1.0, 1.5])
  got = metrics.reference_br_metrics(on, 0.5, 0, 3)
  assert float(got["effectiveness"]) == 100.0 and float(got["pct_near"]) == 100.0
  np.testing.assert_allclose(got["bin_count"], [1, 2, 1, 1])
  np.testing.assert_allclose(got["bin_std"], [0, 0, 0, 0])
  half = jnp.array([0.25, 0.75, 1.25])  # every value half a step from a level
  assert float(metrics.reference_br_metrics(half, 0.5, 0, 3)["effectiveness"]) == 0.0
  mixed = jnp.array([[0.0, 0.5], [0.25, 0.75]])
  masked = metrics.reference_br_metrics(mixed, 0.5, 0, 3, where=jnp.array([[True], [False]]))
  assert float(masked["effectiveness"]) == 100.0 and float(masked["bins_used"]) == 2.0


def test_collectors_carry_the_reference_metrics_and_the_summary_averages_layers():
  """On the small Block model (three kernels, three activation records, one of them a
  second call): every layer's metrics carry the reference's, and the summary is the mean
  over layers. (Was ResNet-20, run eagerly: ~25 s of compiles for the same code paths; the
  ResNet's layer names are test_resnet20_layer_names'.)"""
  model, variables, x = tiny_model_and_variables()
  got = jax.jit(functools.partial(metrics.quant_metrics, model))(variables, x)
  got = metrics.to_python(got)
  assert set(got["weights"]) == WEIGHT_LAYERS and set(got["activations"]) == ACT_LAYERS
  for kind in ("weights", "activations"):
    for layer in got[kind].values():
      assert {"effectiveness", "pct_near", "mean_distance", "bins_used", "bin_count",
              "bin_mean", "bin_std"} <= set(layer)
  summary = metrics.reference_summary(got)
  for kind in ("weights", "activations"):
    want = np.mean([m["effectiveness"] for m in got[kind].values()])
    assert summary[kind]["effectiveness"] == pytest.approx(want)
    assert set(summary[kind]) == set(metrics.REFERENCE_SUMMARY_KEYS)
  assert metrics.reference_summary({"weights": {}, "activations": {}}) == {}


def test_tensorboard_gets_the_reference_metrics():
  from brjax.training import tensorboard as summary  # pylint: disable=g-import-not-at-top

  class Writer:

    def __init__(self):
      self.scalars = {}

    def add_scalar(self, tag, value, step):
      self.scalars[tag] = (float(value), step)

  quant_tree = {"weights": {"conv": {"effectiveness": 80.0, "pct_near": 10.0, "mse": 0.1,
                                     "mean_distance": 0.05}},
                "activations": {"act": {"effectiveness": 60.0, "pct_near": 30.0, "mse": 0.2,
                                        "mean_distance": 0.1}}}
  writer = Writer()
  summary.write_reference_metrics(writer, 3, {"quant": quant_tree})
  assert writer.scalars["br/weights/effectiveness"] == (80.0, 3)
  assert writer.scalars["br/activations/pct_near"] == (30.0, 3)
  assert writer.scalars["effectiveness/activations/act"] == (60.0, 3)
  writer = Writer()
  summary.write_reference_metrics(writer, 1, {})  # a float run: nothing
  assert writer.scalars == {}
