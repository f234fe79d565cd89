"""Tests of brjax.training.optim: labels, freezing with set_to_zero, schedule, weight decay."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.models import cifar as models
from brjax.training import optim
from brjax.training.config import Config


@pytest.fixture(scope="module")
def params():
  model = models.create_model("resnet20", bits_w=2, bits_a=4)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 32, 32, 3)))["params"]
  return jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)


def _by_label(params):
  labels = optim.param_labels(params)
  paths = jax.tree_util.tree_leaves_with_path(labels)
  out = {}
  for path, label in paths:
    out.setdefault(label, []).append("/".join(k.key for k in path))
  return out


def test_labels(params):
  groups = _by_label(params)
  assert set(groups) == set(optim.LABELS)
  assert len(groups["alpha_w"]) == 22  # 19 convs + 2 projections + the dense layer
  assert len(groups["alpha_a"]) == 19  # every ReLU, the first included
  assert all(p.endswith("/alpha") for p in groups["alpha_w"] + groups["alpha_a"])
  assert all("QuantReLU" in p or "act_init" in p for p in groups["alpha_a"])
  assert not any(p.endswith("alpha") for p in groups["weights"])


@pytest.mark.parametrize("frozen", [set(), {"alpha_w"}, {"alpha_a"}, {"alpha_w", "alpha_a"}])
def test_freezing_zeroes_exactly_the_frozen_labels(params, frozen):
  config = Config(weight_decay=0.0)
  tx = optim.create_optimizer(config, steps_per_epoch=10, frozen=frozen)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  labels = optim.param_labels(params)
  for (path, u), label in zip(jax.tree_util.tree_leaves_with_path(updates),
                              jax.tree.leaves(labels)):
    if label in frozen:
      assert not np.any(u), path
    else:  # step sizes at their own learning rate (--alpha_lr_scale)
      lr = config.lr * (config.alpha_lr_scale if label != optim.WEIGHTS else 1.0)
      np.testing.assert_allclose(u, -lr, rtol=1e-6, err_msg=str(path))


def test_boxed_parameters_are_labelled_by_their_names():
  """Partitioned parameters (nn.with_partitioning) are labelled and frozen as plain ones."""
  box = lambda value, *axes: nn.LogicallyPartitioned(value, axes)
  params = {"dense": {"kernel": box(jnp.ones((2, 4)), "embed", "mlp"),
                      "alpha": box(jnp.ones((1, 4)), None, "mlp"), "input_alpha": box(1.0)}}
  assert optim.param_labels(params) == {"dense": {"kernel": "weights", "alpha": "alpha_w",
                                                  "input_alpha": "alpha_a"}}
  tx = optim.create_optimizer(Config(weight_decay=0.0), 10, frozen={"alpha_w"})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert isinstance(updates["dense"]["alpha"], nn.LogicallyPartitioned)
  assert not np.any(updates["dense"]["alpha"].value)
  assert np.all(updates["dense"]["kernel"].value < 0) and updates["dense"]["input_alpha"].value < 0


def test_state_structure_is_the_same_in_both_phases(params):
  config = Config()
  warm = optim.create_optimizer(config, 10).init(params)
  frozen = optim.create_optimizer(config, 10, {"alpha_w", "alpha_a"}).init(params)
  chex.assert_trees_all_equal_structs(warm, frozen)
  chex.assert_trees_all_equal_shapes(warm, frozen)


def test_weight_decay_spares_alphas(params):
  config = Config(weight_decay=0.1, momentum=0.0)
  tx = optim.create_optimizer(config, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  labels = jax.tree.leaves(optim.param_labels(params))
  for u, label in zip(jax.tree.leaves(updates), labels):
    expected = 0.0 if label != "weights" else -config.lr * 0.1 * 0.5
    np.testing.assert_allclose(u, expected, rtol=1e-6)


def test_cosine_schedule():
  schedule = optim.learning_rate_schedule(Config(lr=0.2, epochs=10, warmup_epochs=2), 5)
  assert float(schedule(0)) == pytest.approx(0.2)
  assert float(schedule(25)) == pytest.approx(0.1)
  assert float(schedule(50)) == pytest.approx(0.0, abs=1e-9)


def test_unknown_label():
  with pytest.raises(ValueError, match="unknown labels"):
    optim.create_optimizer(Config(), 10, {"alpha"})
