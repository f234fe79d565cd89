"""The papers' ImageNet models: published parameter counts, and quantized by paper_rules."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.models import paper as paper_models
from brjax.models.plain import count_params
from brjax.quant import regularizer, sites
from brjax.quant.quantize import quantize_model


def _init(model, images):
  """``model.init(key(1), images, train=True)`` jitted: one compile, where eagerly each op
  and parameter shape is one (the same values)."""
  return jax.jit(functools.partial(model.init, train=True))(jax.random.key(1), images)


@pytest.mark.parametrize("name,expected", [("resnet18_imagenet", 11_689_512),
                                           ("resnet50", 25_557_032),
                                           ("mobilenet_v2", 3_504_872)])
def test_published_parameter_counts_and_every_layer_quantized(name, expected):
  model = paper_models.MODELS[name]()
  images = jnp.zeros((1, 224, 224, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  assert count_params(variables["params"]) == expected
  # Traced only: every conv and dense layer gets a kernel and an input quantizer.
  qmodel = quantize_model(model, paper_models.paper_rules(name, 2, 2))
  qvars = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), images, train=False))
  logits, state = jax.eval_shape(
      lambda v: qmodel.apply(v, images, train=False, mutable=[sites.COLLECTION]), qvars)
  assert logits.shape == (1, 1000)
  recorded = state[sites.COLLECTION]
  weights = {p for p, _, _ in sites.iterate(recorded, (sites.WEIGHT,))}
  inputs = {p for p, _, _ in sites.iterate(recorded, (sites.INPUT,))}
  kernels = {"/".join(path[:-1]) for path in jax.tree_util.tree_flatten_with_path(
      qvars["params"])[0] for path in [tuple(k.key for k in path[0])] if path[-1] == "kernel"}
  assert weights == kernels == inputs


def test_paper_rules_first_last_signs_and_depthwise():
  rules = paper_models.paper_rules("mobilenet_v2", 2, 3)
  by_path = {p: next(r for r in rules if r.matches(p))
             for p in ("stem", "classifier", "block3/depthwise", "block3/expand",
                       "block3/project", "conv_last")}
  assert (by_path["stem"].weight_bits, by_path["stem"].act_bits) == (8, 8)
  assert by_path["stem"].act_signed and not by_path["classifier"].act_signed
  assert by_path["block3/depthwise"].per_channel and not by_path["block3/project"].per_channel
  assert by_path["block3/expand"].act_signed and by_path["conv_last"].act_signed
  assert not by_path["block3/project"].act_signed
  assert (by_path["block3/project"].weight_bits, by_path["block3/project"].act_bits) == (2, 3)
  edge = paper_models.paper_rules("resnet50", 4, 4, first_last_bits=None)[0]
  assert (edge.module_path, edge.weight_bits, edge.act_bits) == ("conv_init", 4, 4)
  with pytest.raises(ValueError, match="model='vgg16' has no paper rules"):
    paper_models.paper_rules("vgg16", 2, 2)


@pytest.mark.parametrize("name,model", [
    ("resnet18_imagenet", paper_models.ResNet(stage_sizes=(1,), num_classes=10,
                                              small_inputs=True)),
    ("resnet50", paper_models.ResNet(stage_sizes=(1,), block=paper_models.Bottleneck,
                                     num_classes=10)),
    ("mobilenet_v2", paper_models.MobileNetV2(num_classes=10, width=0.25, small_inputs=True,
                                              stages=paper_models.MOBILENET_V2_STAGES[:2])),
])
@pytest.mark.slow
def test_one_quantized_br_step(name, model):
  """A W2A2 step with CE + BR_W + BR_A on a shortened model of each family: finite, BR > 0,
  every step size gets a gradient."""
  size = 64 if name == "resnet50" else 32  # the ImageNet stem downsamples by 4
  qmodel = quantize_model(model, paper_models.paper_rules(name, 2, 2))
  images = jax.random.normal(jax.random.key(0), (4, size, size, 3))
  variables = _init(qmodel, images)

  def loss_fn(params):
    logits, state = qmodel.apply({**variables, "params": params}, images, train=True,
                                 mutable=["batch_stats", sites.COLLECTION])
    br_w, br_a = regularizer.br_losses(state[sites.COLLECTION])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4)).mean()
    return ce + br_w + br_a, (br_w, br_a)

  grads, (br_w, br_a) = jax.device_get(  # numpy: checked without an eager op per shape
      jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"]))
  chex.assert_tree_all_finite(grads)
  assert br_w > 0 and br_a > 0
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  step_sizes = {jax.tree_util.keystr(p): g for p, g in flat
                if p[-1].key in ("alpha", "input_alpha")}
  assert step_sizes and all(np.any(g != 0) for g in step_sizes.values()), [
      k for k, g in step_sizes.items() if not np.any(g != 0)]


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
  """The same variables (remat keeps the module paths: one init serves both) through the
  model with and without ``nn.remat``: the same loss and gradients."""
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  results, variables = [], None
  for remat in (False, True):
    model = quantize_model(paper_models.ResNet(stage_sizes=(1, 1), num_classes=10,
                                               small_inputs=True, remat=remat),
                           paper_models.paper_rules("resnet18_imagenet", 2, 2))
    variables = _init(model, images) if variables is None else variables

    def loss_fn(params, model=model, variables=variables):
      logits, state = model.apply({**variables, "params": params}, images, train=True,
                                  mutable=["batch_stats", sites.COLLECTION])
      return logits.sum() + sum(regularizer.br_losses(state[sites.COLLECTION]))

    results.append(jax.jit(jax.value_and_grad(loss_fn))(variables["params"]))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_last_bits,bits", [(None, 2), (4, 4), (8, 8), (32, None)])
def test_first_last_bits_rules_of_the_papers_models(first_last_bits, bits):
  """The first layer's and the classifier's rules (kernels and inputs): at
  ``first_last_bits`` (None: like the rest; 32: float); the rest at W2A2."""
  rules = paper_models.paper_rules("mobilenet_v2", 2, 2, first_last_bits=first_last_bits)
  assert [(r.module_path, r.weight_bits, r.act_bits) for r in rules[:2]] == [
      ("stem", bits, bits), ("classifier", bits, bits)]
  assert {(r.weight_bits, r.act_bits) for r in rules[2:]} == {(2, 2)}


def test_first_last_bits_32_leaves_the_first_and_last_layers_float():
  model = paper_models.create_model("resnet18_imagenet", bits_w=2, bits_a=2, num_classes=10,
                                    image_size=32, first_last_bits=32)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  def record(x):  # traced only: the sites' levels are static
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(variables, x, train=False, mutable=["quant"])[1]["quant"]
  found = {(path, kind): site.levels
           for path, kind, site in sites.iterate(jax.eval_shape(record, x))}
  assert not {path for path, _ in found} & {"conv_init", "head"}
  assert len(found) == 38 and set(found.values()) == {4}  # 19 kernels and inputs at 2 bits
