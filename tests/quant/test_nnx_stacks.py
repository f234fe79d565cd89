"""Tests of brjax.quant.nnx_stacks: NNX layers stacked by ``nnx.vmap``/``nnx.scan`` and under
``nnx.remat``, quantized with no model edits, one step size per layer of a stack (issue 32)."""

from __future__ import annotations

from flax import nnx, traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import third_party_models as tp

from brjax.quant import lsq as quant
from brjax.quant import names, regularizer, sites
from brjax.quant import nnx as brjax_nnx
from brjax.quant.coverage import left_float
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule

W4A4 = QuantRule(".*", weight_bits=4, act_bits=4)
X = jax.random.normal(jax.random.key(0), (8, 4))
LABELS = jnp.arange(8) % 3


def _flat(tree) -> dict[str, jax.Array]:
  return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _params(model) -> dict[str, jax.Array]:
  return _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _every_kernel_quantized(model) -> None:
  params = _params(model)
  kernels = [p for p in params if p.endswith("kernel")]
  assert kernels and all(p[:-len("kernel")] + "alpha" in params
                         or p[:-len("kernel")] + "log_alpha" in params for p in kernels)
  assert set(brjax_nnx.quantized_layers(model)) == {p[:-len("/kernel")] for p in kernels}
  assert left_float(model) == ()  # no product of a parameter left float, in the stacks too


def _loss(model, x, labels):
  logits, collection = brjax_nnx.record_sites(model, x)
  br_w, br_a = regularizer.br_losses(collection)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ce + br_w + br_a, (br_w, br_a)


def _trains(model, x, labels):
  """Two nnx.jit steps of CE + BR: finite, BR nonzero, every entry of every step size (every
  layer of a stack) with a nonzero gradient."""
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    (loss, brs), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, labels)
    optimizer.update(model, grads)
    return loss, brs, grads

  loss, (br_w, br_a), grads = step(model, optimizer)
  assert np.isfinite(float(loss)) and float(br_w) > 0 and float(br_a) > 0
  alphas = {p: g for p, g in _flat(nnx.to_pure_dict(grads)).items()
            if names.is_alpha_name(p.split("/")[-1])}
  assert alphas and all(bool(jnp.all(g != 0)) for g in alphas.values()), \
      [p for p, g in alphas.items() if not bool(jnp.all(g != 0))]
  loss2, _, _ = step(model, optimizer)
  assert np.isfinite(float(loss2)) and float(loss2) != float(loss)
  return alphas


@pytest.mark.slow
def test_scan_over_layers_mlp_one_step_size_per_layer():
  """flax's scan over layers (blocks made by nnx.vmap, run by nnx.scan): each block's kernel
  and input get a step size per layer, LSQ's init of that layer; the stack's sites lead with
  the stack axis; CE + BR under nnx.jit trains every step size of every layer (dropout
  on)."""
  model = tp.NnxScanMLP(rngs=nnx.Rngs(0))
  quantize_model(model, W4A4, X)
  _every_kernel_quantized(model)
  linear = model.blocks.linear
  kernel, alpha = linear.kernel[...], linear.alpha[...]
  assert alpha.shape == linear.input_alpha[...].shape == linear.input_signed[...].shape == (2,)
  np.testing.assert_allclose(alpha, 2 * jnp.mean(jnp.abs(kernel), axis=(1, 2)) / jnp.sqrt(7.0),
                             rtol=1e-6)  # 2 mean|W_l| / sqrt(Qp), layer by layer
  assert not bool(jnp.any(linear.input_signed[...]))  # after the embedding's ReLU
  _, collection = brjax_nnx.record_sites(model, X)
  weight, = collection["blocks"]["linear"]["weight"]
  inputs, = collection["blocks"]["linear"]["input"]
  assert (weight.values.shape, weight.alpha.shape, weight.qn.shape, weight.ndim) == (
      (2, 8, 8), (2,), (2,), 2)
  assert (inputs.values.shape, inputs.alpha.shape, inputs.qn.shape, inputs.ndim) == (
      (2, 8, 8), (2,), (2,), 2)
  assert {p for p, _, _ in sites.iterate(collection)} == {"embed", "blocks/linear", "head"}
  assert not any(n.startswith("brjax_moved") for n in vars(linear))  # nothing stays
  alphas = _trains(model, X, LABELS)
  assert alphas["blocks/linear/alpha"].shape == alphas["blocks/linear/input_alpha"].shape == (2,)


def _unrolled(stacked: tp.NnxScanMLP) -> nnx.Module:
  """The same MLP with its blocks in a list, called one after the other, with the (float)
  stack's weights, layer by layer."""

  class Unrolled(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Linear(4, 8, rngs=rngs)
      self.blocks = nnx.List([tp.NnxBlock(8, rngs) for _ in range(2)])
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.embed(x))
      for block in self.blocks:
        x = block(x)
      return self.head(x)

  model = Unrolled(nnx.Rngs(1))
  for name in ("embed", "head"):
    nnx.update(getattr(model, name), nnx.state(getattr(stacked, name)))
  for i, block in enumerate(model.blocks):
    nnx.update(block.linear, jax.tree.map(lambda v, i=i: v[i],
                                          nnx.state(stacked.blocks.linear, nnx.Param)))
  return model


@pytest.mark.slow
@pytest.mark.parametrize("rule", [W4A4, QuantRule(".*", weight_bits=3, act_bits=2,
                                                  per_channel=True, alpha_param="log")],
                         ids=["per_tensor", "per_channel_log"])
def test_a_stack_is_the_unrolled_model(rule):
  """Quantized from the same weights and batch, a 2-layer stack and the same layers unrolled
  have the same step sizes and signs per layer, logits, W-BR, A-BR and gradients."""
  stacked = tp.NnxScanMLP(rngs=nnx.Rngs(0))
  stacked.eval()
  unrolled = _unrolled(stacked)
  unrolled.eval()
  quantize_model(stacked, rule, X)
  quantize_model(unrolled, rule, X)
  s, u = _params(stacked), _params(unrolled)
  for name in ("alpha", "input_alpha"):
    name = names.stored(name, rule.alpha_param)
    assert s[f"blocks/linear/{name}"].shape[0] == 2
    for i in range(2):
      np.testing.assert_allclose(s[f"blocks/linear/{name}"][i], u[f"blocks/{i}/linear/{name}"],
                                 rtol=1e-6)
  signs = stacked.blocks.linear.input_signed[...]
  assert [bool(signs[i]) for i in range(2)] == [
      bool(block.linear.input_signed[...]) for block in unrolled.blocks]
  if rule.per_channel:
    assert s["blocks/linear/log_alpha"].shape == (2, 1, 8)

  grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
  (loss_s, brs_s), grads_s = grad(stacked, X, LABELS)
  (loss_u, brs_u), grads_u = grad(unrolled, X, LABELS)
  np.testing.assert_allclose(brs_s, brs_u, rtol=1e-5)  # BR_W, BR_A: each layer counted once
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  np.testing.assert_allclose(stacked(X), unrolled(X), rtol=1e-5, atol=1e-6)
  gs, gu = _flat(nnx.to_pure_dict(grads_s)), _flat(nnx.to_pure_dict(grads_u))
  for path, g in gs.items():
    if path.startswith("blocks/linear/"):
      leaf = path.split("/")[-1]
      for i in range(2):
        np.testing.assert_allclose(g[i], gu[f"blocks/{i}/linear/{leaf}"], rtol=1e-4, atol=1e-6,
                                   err_msg=f"{path}[{i}]")
    else:
      np.testing.assert_allclose(g, gu[path], rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.slow
def test_remat_layer_in_a_scanned_stack():
  """flax 0.11's pattern (``__init__`` under nnx.vmap, ``__call__`` under nnx.scan on the stack
  itself) with its layer under nnx.remat and batch norm: one step size per layer, the same
  sites as without remat (NnxScanMLP), the init leaves batch statistics as they were, and
  CE + BR trains every step size."""
  model = tp.NnxStack(nnx.Rngs(0))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  quantize_model(model, W4A4, X)
  _every_kernel_quantized(model)
  assert model.linear.alpha[...].shape == model.linear.input_alpha[...].shape == (3,)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
               stats)
  plain, remat = tp.NnxScanMLP(rngs=nnx.Rngs(0)), tp.NnxScanMLP(rngs=nnx.Rngs(0), remat=True)
  for m in (plain, remat):
    m.eval()
    quantize_model(m, W4A4, X)
  jax.tree.map(np.testing.assert_array_equal, _params(plain), _params(remat))
  recorded = [brjax_nnx.record_sites(m, X) for m in (plain, remat)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), *recorded)
  model.train()
  alphas = _trains(model, X, jnp.arange(8) % 4)
  assert alphas["linear/alpha"].shape == (3,)


@nnx.jit
def _jitted(layer, x):  # transformed once: JAX keeps its trace for the next calls
  return layer(x)


class _Wrapped(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x, how=None):
    if how == "remat":
      return nnx.remat(lambda layer, x: layer(x))(self.dense, x)
    return _jitted(self.dense, x) if how == "jit" else self.dense(x)


def test_a_layer_under_remat_or_jit_records_its_sites():
  """A layer called under nnx.remat or a module-level nnx.jit (a transform's copy, no stack)
  is quantized and recorded as when called plainly, also after a plain call cached the jit's
  trace; nothing is left on the model."""
  model = quantize_model(_Wrapped(nnx.Rngs(0)), W4A4, X, how="remat")
  assert left_float(model) == ()
  dense = model.dense  # LSQ's init, as outside (computed in a compiled program: to ~1 ulp)
  np.testing.assert_allclose(dense.alpha[...], 2 * jnp.mean(jnp.abs(dense.kernel[...]))
                             / jnp.sqrt(7.0), rtol=1e-6)
  assert bool(dense.input_signed[...])
  np.testing.assert_allclose(dense.input_alpha[...], 2 * jnp.mean(jnp.abs(X)) / jnp.sqrt(7.0),
                             rtol=1e-6)
  keys = _params(model).keys()
  direct = brjax_nnx.record_sites(model, X)
  for how in ("remat", "jit"):
    model(X, how=how)  # a plain call first
    recorded = brjax_nnx.record_sites(model, X, how=how)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), recorded, direct)
    model(X, how=how)
    assert _params(model).keys() == keys and not any(
        n.startswith("brjax_m") for n in vars(model.dense)), how
  site = direct[1]["dense"]
  assert site["weight"][0].ndim == 2 and site["input"][0].alpha.shape == ()


class _Signs(nnx.Module):  # layer 0 sees the (signed) batch, layer 1 a ReLU's output
  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return nnx.Linear(4, 4, rngs=rngs)
    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
      return nnx.relu(layer(x))
    return forward(x, self.layers)


def test_a_decided_sign_per_layer_of_a_stack():
  """Each layer's input sign is its own, decided from its own input in the sample batch."""
  model = quantize_model(_Signs(nnx.Rngs(0)), QuantRule(".*", act_bits=4), X)
  assert left_float(model) == ()
  assert [bool(s) for s in model.layers.input_signed[...]] == [True, False]
  qp = jnp.array([quant.qrange(4, True)[1], quant.qrange(4, False)[1]], jnp.float32)
  first = 2 * jnp.mean(jnp.abs(X)) / jnp.sqrt(qp[0])
  np.testing.assert_allclose(model.layers.input_alpha[...][0], first, rtol=1e-6)
  _, collection = brjax_nnx.record_sites(model, X)
  site, = collection["layers"]["input"]
  np.testing.assert_array_equal(site.qn, [quant.qrange(4, True)[0], 0])
  assert site.values.shape == (2, 8, 4) and site.ndim == 2 and "weight" not in collection["layers"]
  np.testing.assert_array_equal(site.values[0], X)  # layer 0's input: the batch


def test_unsupported_stacks_are_one_line_errors():
  """A stack on a non-leading axis and a layer whose variables nnx.scan broadcasts (nnx.RNN's
  cell) are errors naming the layer and what is accepted; the model is left as it was.
  quantize_nnx under nnx.jit is an error too, also when every layer runs in a transform."""
  class Axis1(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=0, out_axes=nnx.StateAxes({...: 1}))
      def create(rngs):
        return nnx.Linear(4, 4, rngs=rngs)
      self.layers = create(rngs)

    def __call__(self, x):
      return nnx.vmap(lambda layer, x: layer(x), in_axes=(nnx.StateAxes({...: 1}), None))(
          self.layers, x)

  class Recurrent(nnx.Module):
    def __init__(self, rngs):
      self.rnn = nnx.RNN(nnx.SimpleCell(4, 4, rngs=rngs))

    def __call__(self, x):
      return self.rnn(x)

  model = Axis1(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^layers: its kernel, \(4, 3, 4\) in the model, is "
                                       r"\(4, 4\) .* not leading: .*accepts layers stacked "
                                       "along leading axes"):
    quantize_model(model, W4A4, X)
  assert type(model.layers) is nnx.Linear and not hasattr(model.layers, "alpha")
  model = Recurrent(nnx.Rngs(0))
  before = _params(model)
  with pytest.raises(ValueError, match=r"rnn/cell/dense_i, rnn/cell/dense_h ran inside an NNX "
                                       r"transform \(.*\): .*broadcasts \(in_axes=None, "
                                       "nnx.RNN's cell\\)") as error:
    quantize_model(model, W4A4, X.reshape(2, 4, 4))
  assert "\n" not in str(error.value)
  assert not brjax_nnx.quantized_layers(model) and _params(model).keys() == before.keys()
  with pytest.raises(ValueError, match="layers: its kernel is traced .* call quantize_nnx "
                                       "eagerly"):
    nnx.jit(lambda model: quantize_model(model, W4A4, X) and None)(_Signs(nnx.Rngs(0)))
