"""``quantize_model`` on models written without brjax in mind (``third_party_models``):
operations on parameters in any module, ``nn.RNN``/``nn.scan`` with no model edits, boxed
(partitioned) parameters, and the report of what stayed float (issue 32). The partitioned
LM's step on a 2-device FSDP mesh is ``tests/training/test_multidevice.py``'s."""

from __future__ import annotations

from flax import nnx, traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np
import optax
import pytest
import third_party_models as tp

from brjax.quant import lsq as quant
from brjax.quant import names, regularizer, sites, step_size
from brjax.quant.coverage import FloatOp, left_float
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule
from brjax.training import optim

W4A4 = QuantRule(".*", weight_bits=4, act_bits=4)


def _flat(tree) -> dict[str, jax.Array]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(nn.meta.unbox(tree)).items()}


def _trains(model, x, labels, *, not_multiplied=(), stacked=None):
  """Init, the coverage report, every multiplied parameter's step size, BR, a gradient on
  every step size (every layer of a stack) and two jitted training steps."""
  variables = jax.jit(model.init)(jax.random.key(1), x)  # faster than eager, same values
  assert left_float(model) == ()
  params = _flat(variables["params"])
  for path, value in params.items():
    *owner, name = path.split("/")
    rank = value.ndim - (stacked is not None and path.startswith(stacked))
    if (rank >= 2 and not names.is_alpha_name(name)
        and name not in ("bias", "scale", *not_multiplied)):
      assert "/".join([*owner, names.weight_alpha(name)]) in params, path
  tx = optax.adam(1e-3)

  def loss_fn(p, state):
    logits, new = model.apply({**state, "params": p}, x, mutable=["quant"])
    br_w, br_a = regularizer.br_losses(new["quant"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + br_w + br_a, (br_w, br_a)

  @jax.jit
  def step(state, opt):
    (loss, brs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state)
    updates, opt = tx.update(grads, opt)
    return {**state, "params": optax.apply_updates(state["params"], updates)}, opt, loss, \
        brs, grads

  state, opt = variables, tx.init(variables["params"])
  state, opt, loss, (br_w, br_a), grads = step(state, opt)
  assert np.isfinite(float(loss)) and float(br_w) > 0 and float(br_a) > 0
  alphas = {p: g for p, g in _flat(grads).items() if names.is_alpha_name(p.split("/")[-1])}
  assert alphas and all(bool(jnp.all(g != 0)) for g in alphas.values()), \
      [p for p, g in alphas.items() if not bool(jnp.all(g != 0))]
  state, opt, loss2, _, _ = step(state, opt)  # the same program, jitted
  assert np.isfinite(float(loss2))
  return variables, alphas


@pytest.mark.slow
def test_lstm_classifier_with_optimized_cells():
  """Every gate kernel of ``OptimizedLSTMCell`` (read through ``DenseParams``, multiplied as
  one concatenation) is quantized, with its step size beside it; the cell's two products
  quantize their activations as ``input_alpha`` and ``input_alpha_1``."""
  tokens = jax.random.randint(jax.random.key(0), (4, 5), 0, 20)
  variables, alphas = _trains(quantize_model(tp.LstmClassifier(), W4A4), tokens,
                              jnp.arange(4) % 3, not_multiplied=("embedding",))
  params = _flat(variables["params"])
  kernels = [p for p in params if p.endswith("/kernel") and "Cell" in p]
  assert len(kernels) == 16 and all(p[:-len("kernel")] + "alpha" in alphas for p in kernels)
  cells = {p.rsplit("/", 1)[0] for p in params if p.endswith("input_alpha_1")}
  assert len(cells) == 2 and all(f"{c}/input_alpha" in params for c in cells)


@pytest.mark.slow
def test_rnn_tagger_signs_decided_under_broadcast_params():
  """``nn.RNN`` broadcasts its parameters; an input sign and step size decided from data
  are calibrated after init instead of inside the scan (flax: "broadcasted variable has a
  data dependency"): an all-positive input is unsigned, with LSQ's step size."""
  x = jnp.abs(jax.random.normal(jax.random.key(0), (3, 4, 5))) + 0.1
  model = quantize_model(tp.RecurrentTagger(), W4A4)
  variables, _ = _trains(model, x, jnp.zeros((3, 4), jnp.int32))
  signs = _flat(variables["quant_state"])
  assert not bool(signs["LSTMCell_0/ii/input_signed"])   # the positive data
  assert bool(signs["LSTMCell_0/hi/input_signed"])       # tanh: signed
  got = variables["params"]["LSTMCell_0"]["ii"]["input_alpha"]
  np.testing.assert_allclose(got, 2 * jnp.mean(jnp.abs(x)) / jnp.sqrt(15.0), rtol=1e-5)
  assert "w_alpha" in variables["params"]["EinsumDense_0"]


@pytest.mark.slow
def test_scanned_vit_with_plain_variable_axes():
  """``nn.scan(..., variable_axes={"params": 0})`` as big_vision writes it: brjax carries its
  collections; one step size per block, each with its gradient; the blocks' custom MLP
  (``jnp.einsum`` and ``@`` on its parameters) is quantized too."""
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables, alphas = _trains(quantize_model(tp.ScannedViT(), W4A4), images, jnp.arange(2),
                              not_multiplied=("cls", "pos_embedding"), stacked="encoder/")
  mlp = variables["params"]["encoder"]["MlpBlock_0"]
  assert mlp["wi_alpha"].shape == mlp["wo_alpha"].shape == (2,)
  assert alphas["encoder/MlpBlock_0/input_alpha_1"].shape == (2,)


class _LowRank(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = self.param("a", nn.initializers.lecun_normal(), (x.shape[-1], 2))
    b = self.param("b", nn.initializers.lecun_normal(), (2, 3))
    return x @ (a @ b)


def test_an_operation_left_float_is_an_error_or_listed():
  x = jax.random.normal(jax.random.key(0), (2, 4))
  with pytest.raises(ValueError, match=r"1 operation\(s\) .* stay float: <root>: @ \(both "
                                       r"operands are computed from parameters alone\).*"
                                       "allow_float_ops=True"):
    quantize_model(_LowRank(), W4A4).init(jax.random.key(1), x)
  model = quantize_model(_LowRank(), W4A4, allow_float_ops=True)
  with pytest.raises(ValueError, match="has run neither yet"):  # not an empty report
    left_float(model)
  variables = model.init(jax.random.key(1), x)
  assert left_float(model) == (FloatOp("", "@", "both operands are computed from parameters "
                                           "alone"),)
  assert {"a_alpha", "b_alpha", "input_alpha"} <= set(variables["params"])  # the outer product
  _, state = model.apply(variables, x, mutable=["quant"])
  assert {p for p, k, _ in sites.iterate(state["quant"]) if k == "weight"} == {"a", "b"}
  with pytest.raises(ValueError, match="allow_float_ops=1 is not accepted"):
    quantize_model(_LowRank(), W4A4, allow_float_ops=1)
  with pytest.raises(ValueError, match="left_float takes a model returned by "
                                       "brjax.quantize_model"):
    left_float(_LowRank())


class _NnxNet(nnx.Module):  # the tutorial's pattern: dropout, batch norm, views
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.norm(self.l1(x)))))


@pytest.mark.slow
def test_nnx_model_trained_through_views():
  """Views made after quantize_model are quantized (they share the step sizes); a view made
  before it, and a model with no quantized layer, are errors in record_sites."""
  from brjax.quant import nnx as brjax_nnx  # pylint: disable=g-import-not-at-top
  x, y = jax.random.normal(jax.random.key(0), (8, 4)), jnp.arange(8) % 3
  model = _NnxNet(nnx.Rngs(0))
  stale = nnx.view(model, deterministic=True, use_running_average=True)
  quantize_model(model, W4A4, x)
  assert left_float(model) == ()
  train = nnx.view(model, deterministic=False, use_running_average=False)
  evaluate = nnx.view(model, deterministic=True, use_running_average=True)
  optimizer = nnx.Optimizer(train, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(train, optimizer):
    def loss_fn(train):
      logits, collection = brjax_nnx.record_sites(train, x)
      br_w, br_a = regularizer.br_losses(collection)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + br_w + br_a
    loss, grads = nnx.value_and_grad(loss_fn)(train)
    optimizer.update(train, grads)
    return loss, grads

  before = float(model.l1.alpha[...])
  loss, grads = step(train, optimizer)
  assert np.isfinite(float(loss)) and float(model.l1.alpha[...]) != before
  assert all(bool(jnp.all(g != 0)) for p, g in _flat(nnx.to_pure_dict(grads)).items()
             if names.is_alpha_name(p.split("/")[-1]))
  _, collection = brjax_nnx.record_sites(evaluate, x)
  assert {p for p, _, _ in sites.iterate(collection)} == {"l1", "l2"}
  assert float(collection["l1"]["weight"][0].alpha) == float(model.l1.alpha[...])
  with pytest.raises(ValueError, match="l1, l2 share.* nnx.view made before"):
    brjax_nnx.record_sites(stale, x)
  with pytest.raises(ValueError, match="has no quantized layer"):
    brjax_nnx.record_sites(_NnxNet(nnx.Rngs(1)), x)


class _Boxed(nn.Module):  # a Dense layer and an operation, on nn.with_partitioning params
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(4, kernel_init=nn.with_partitioning(init, (None, "model")))(x)
    return x @ self.param("w", nn.with_partitioning(init, ("model", None)), (4, 2))


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_sizes_of_boxed_parameters_are_boxed(per_channel):
  """A weight's step size takes its weight's box and axis names where it has the weight's
  extent (per channel: the output axis); a per-tensor or an input's step size is boxed
  replicated. Readers of step sizes unbox."""
  rule = QuantRule(".*", weight_bits=4, act_bits=4, per_channel=per_channel)
  model, x = quantize_model(_Boxed(), rule), jnp.ones((2, 6))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  again = jax.eval_shape(lambda v: quant.init_alphas(model, v, x), shapes)  # boxed the same
  assert jax.tree.structure(again) == jax.tree.structure(shapes)
  params = traverse_util.flatten_dict(shapes["params"], sep="/")
  assert not isinstance(params.pop("Dense_0/bias"), nn.Partitioned)  # as the model made it
  assert all(isinstance(v, nn.Partitioned) for v in params.values()), params
  names = {p: v.names for p, v in params.items()}
  assert names == {"Dense_0/kernel": (None, "model"), "Dense_0/input_alpha": (),
                   "Dense_0/alpha": (None, "model") if per_channel else (),
                   "w": ("model", None), "w_alpha": (), "input_alpha": ()}
  assert nn.get_partition_spec(shapes)["params"]["Dense_0"]["alpha"] == (
      PartitionSpec(None, "model") if per_channel else PartitionSpec())
  assert not isinstance(step_size.step_size(shapes["params"]["Dense_0"]), nn.Partitioned)
  assert optim.param_labels(shapes["params"])["Dense_0"] == {
      "kernel": "weights", "bias": "weights", "alpha": "alpha_w", "input_alpha": "alpha_a"}


W4A4_PER_CHANNEL = QuantRule(".*", weight_bits=4, act_bits=4, per_channel=True)


@pytest.mark.slow
def test_partitioned_lm_trains_exports_and_checkpoints(tmp_path):
  """flax's lm1b style: every parameter boxed by nn.with_logical_partitioning. Every kernel
  quantized, its per-channel step size boxed along the kernel's output axes, the inputs'
  replicated; BR, gradients, jit; the export and an orbax checkpoint read the boxes."""
  from brjax import export  # pylint: disable=g-import-not-at-top
  from brjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 16)
  model = quantize_model(tp.PartitionedLM(), W4A4_PER_CHANNEL)
  variables, alphas = _trains(model, tokens, jnp.roll(tokens, -1, axis=1),
                              not_multiplied=("embedding", "pos_embedding"))
  boxes = traverse_util.flatten_dict(variables["params"], sep="/")
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes.values())
  kernels = [p for p in boxes if p.endswith("/kernel")]
  assert len(kernels) == 2 * 6 + 1 and all(p[:-len("kernel")] + "alpha" in alphas
                                           for p in kernels)
  block = "DecoderBlock_1/"
  for path, axes in (("MultiHeadDotProductAttention_0/query/alpha", (None, "heads", "kv")),
                     ("MultiHeadDotProductAttention_0/out/alpha", (None, None, "embed")),
                     ("LmMlpBlock_0/Dense_0/alpha", (None, "mlp")),
                     ("LmMlpBlock_0/Dense_1/input_alpha", ())):
    assert boxes[block + path].names == axes, path
  assert boxes["logitdense/alpha"].names == (None, "vocab")

  exported = export.from_linen(model, variables, tokens)  # boxed: exported unboxed
  assert len(exported.header["kernels"]) == len(kernels)
  apply = jax.jit(model.apply)  # one program for both: the same unboxed structure
  np.testing.assert_array_equal(apply(export.to_variables(exported), tokens),
                                apply(nn.meta.unbox(variables), tokens))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  ckpts.save(1, jax.device_get(variables), {"epoch": 1}, is_best=False)
  ckpts.close()
  restored, _ = checkpoint.restore_epoch(str(tmp_path), 1, variables)
  assert jax.tree.structure(restored) == jax.tree.structure(variables)  # the boxes again
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(variables))
  plain, _ = checkpoint.restore_pretrained(str(tmp_path), "latest")  # no target: arrays
  jax.tree.map(np.testing.assert_array_equal, plain["params"],
               jax.device_get(nn.meta.unbox(variables["params"])))
