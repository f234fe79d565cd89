"""Tests of brjax.models.cifar: the CIFAR ResNets, quantized everywhere but BatchNorm."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.quant import sites


def _shapes(name, **kw):
  model = models.create_model(name, **kw)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                        jnp.ones((2, 32, 32, 3)))


def test_resnet20_float_matches_the_paper_size():
  params = _shapes("resnet20")["params"]
  convs = [p for p in flax.traverse_util.flatten_dict(params) if p[-1] == "kernel"]
  assert len(convs) == 19 + 2 + 1  # 19 3x3 convs, 2 projection shortcuts, 1 dense
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  assert 0.26e6 < n < 0.28e6  # ResNet-20 has 0.27M parameters



# He et al.'s Table 6 (option A shortcuts): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters (8
# and 14 are not in it: 75,290 and 172,506 by the same count); brjax's projection shortcuts
# add two 1x1 convs and their BatchNorms (2,752 parameters).
@pytest.mark.parametrize("depth,millions", [(8, 0.07529), (14, 0.172506), (20, 0.27), (32, 0.46),
                                            (44, 0.66), (56, 0.85), (110, 1.7)])
def test_the_cifar_resnet_family_has_6n_plus_2_layers_and_the_paper_sizes(depth, millions):
  params = _shapes(f"resnet{depth}", bits_w=2, bits_a=2)["params"]
  kernels = [p for p in flax.traverse_util.flatten_dict(params) if p[-1] == "kernel"]
  assert len(kernels) == depth + 2  # depth - 1 3x3 convs, the dense, 2 projections
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  alphas = sum(1 for p in flax.traverse_util.flatten_dict(params) if p[-1] == "alpha")
  assert n - alphas - 2_752 == pytest.approx(millions * 1e6, rel=0.02)


def test_a_cifar_resnet_depth_not_6n_plus_2_is_refused():
  for depth in (7, 9, 21, 2):
    with pytest.raises(ValueError, match=f"depth={depth} is not accepted: a CIFAR ResNet has "
                                         r"6n \+ 2 layers"):
      models.cifar_resnet(depth)
  with pytest.raises(ValueError, match="model='resnet21' is not supported"):
    models.create_model("resnet21")

def test_resnet18_shapes():
  variables = _shapes("resnet18", bits_w=4, bits_a=4)
  flat = flax.traverse_util.flatten_dict(variables["params"])
  kernels = {p: v.shape for p, v in flat.items() if p[-1] == "kernel"}
  assert kernels[("conv_init", "kernel")] == (3, 3, 3, 64)  # 3x3 stem, no max-pool
  assert kernels[("QuantDense_0", "kernel")] == (512, 10)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
  assert 11.1e6 < n < 11.3e6


@pytest.mark.parametrize("bits_w,bits_a", [(2, 2), (4, 8), (32, 2), (2, 32)])
@pytest.mark.slow
def test_everything_but_batchnorm_is_quantized(bits_w, bits_a):
  model = models.create_model("resnet20", bits_w=bits_w, bits_a=bits_a)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))

  def init_and_record(x):  # traced only (shapes and the sites' static fields suffice)
    variables = model.init(jax.random.key(1), x, train=False)
    return variables, model.apply(variables, x, train=False, mutable=["quant"])[1]
  variables, state = jax.eval_shape(init_and_record, x)
  flat = flax.traverse_util.flatten_dict(variables["params"])
  kernels = [p[:-1] for p in flat if p[-1] == "kernel"]
  weight_alphas = [p[:-1] for p in flat if p[-1] == "alpha" and p[:-1] + ("kernel",) in flat]
  assert len(weight_alphas) == (len(kernels) if bits_w != 32 else 0)
  recorded = list(sites.iterate(state.get("quant", {})))
  outputs = [path for path, kind, _ in recorded if kind == "output"]
  assert len(outputs) == (19 if bits_a != 32 else 0)  # every ReLU, the first included
  assert len(recorded) - len(outputs) == len(weight_alphas)  # every quantized kernel
  if bits_a != 32:
    qn, qp = quant.qrange(bits_a, signed=False)
    assert qp == 2**bits_a - 1
  # Batch norm parameters are float and have no step size.
  assert not any(p[-1] == "alpha" and "BatchNorm" in "/".join(p) for p in flat)


@pytest.mark.slow
def test_logits_are_float32_and_batch_shaped():
  model = models.create_model("resnet20", bits_w=2, bits_a=2, clip=6.0)
  x = jnp.ones((3, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32


def test_bad_model_name_and_bits():
  with pytest.raises(ValueError, match="model='vgg'"):
    models.create_model("vgg")
  with pytest.raises(ValueError, match="bits=16"):
    models.create_model("resnet20", bits_w=16)


def _levels_by_site(model, x):
  variables = model.init(jax.random.key(1), x, train=False)
  logits, state = model.apply(variables, x, train=False, mutable=["quant"])
  return variables, logits, {(path, kind): site.levels
                             for path, kind, site in sites.iterate(state["quant"])}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["resnet20", "resnet20_option_a"])
def test_first_last_bits_sets_the_first_conv_the_dense_layer_and_its_input(model_name):
  """The literature's setting: conv_init's and the dense layer's kernels and the dense
  layer's input (the last block's output ReLU) at 8 bits, the rest at 2; unset, the model
  is the one without the option, variable for variable and logit for logit."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  base_vars, base_logits, base = _levels_by_site(
      models.create_model(model_name, bits_w=2, bits_a=2), x)
  _, same_logits, same = _levels_by_site(
      models.create_model(model_name, bits_w=2, bits_a=2, first_last_bits=None), x)
  np.testing.assert_array_equal(same_logits, base_logits)
  assert same == base and set(base.values()) == {4}  # 2 bits: 4 levels
  variables, _, levels = _levels_by_site(
      models.create_model(model_name, bits_w=2, bits_a=2, first_last_bits=8), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, base_vars)
  edges = {("conv_init", "weight"): 256, ("QuantDense_0", "weight"): 256,
           ("BasicBlock_8/QuantReLU_1", "output"): 256}  # 8 bits
  assert set(levels) == set(base)
  for key, count in levels.items():
    assert count == edges.get(key, base[key]), key


def test_first_last_bits_32_keeps_them_float_and_a_float_side_stays_float():
  x = jnp.ones((2, 16, 16, 3))
  _, _, levels = _levels_by_site(
      models.create_model("resnet20", bits_w=2, bits_a=2, first_last_bits=32), x)
  assert not {("conv_init", "weight"), ("QuantDense_0", "weight"),
              ("BasicBlock_8/QuantReLU_1", "output")} & set(levels)
  assert len(levels) == 20 + 18  # the other kernels (22 - 2) and ReLUs (19 - 1)
  _, _, levels = _levels_by_site(
      models.create_model("resnet20", bits_w=32, bits_a=2, first_last_bits=8), x)
  assert {kind for _, kind in levels} == {"output"}  # no kernel quantized
  assert levels[("BasicBlock_8/QuantReLU_1", "output")] == 256
  with pytest.raises(ValueError, match="first_last_bits=8 is not supported for "
                                       "model='resnet18_reference'"):
    models.create_model("resnet18_reference", bits_w=2, bits_a=2, first_last_bits=8)
