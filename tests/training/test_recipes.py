"""Recipes (brjax.training.recipes) as the optimizer, schedule and model conventions they name."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.models import cifar as models
from brjax.training import optim, recipes, train
from brjax.training.config import Config


def test_config_takes_the_recipes_values_and_explicit_fields_win():
  ref = Config(recipe="reference")
  for name in recipes.FIELDS:
    assert getattr(ref, name) == getattr(recipes.REFERENCE, name), name
  assert ref.recipe_parts == recipes.REFERENCE
  default = Config()
  assert default.recipe == "brjax" and default.recipe_parts == recipes.BRJAX
  assert (default.optimizer, default.lr, default.weight_decay, default.schedule) == (
      "sgd", 0.1, 5e-4, "cosine")
  mixed = Config(recipe="reference", lr=0.05, schedule="step", decay_alphas=False)
  assert (mixed.optimizer, mixed.lr, mixed.schedule, mixed.decay_alphas) == (
      "adam", 0.05, "step", False)
  assert "reference" in mixed.name
  # A resolved config rebuilds to itself (checkpoint metas store the resolved fields).
  assert Config(**dataclasses.asdict(mixed)) == mixed


@pytest.mark.parametrize("field,value,accepted", [
    ("recipe", "pytorch", "brjax, reference"),
    ("optimizer", "rmsprop", "sgd, adam"),
    ("schedule", "linear", "cosine, constant_cosine, step"),
    ("act_grad_scale", "channel", "example, batch"),
    ("alpha_init", "random", "calibrate, first_step"),
    ("normalization", "cifar100", "dataset, reference, imagenet"),
    ("adam_eps", 0.0, "> 0"),
])
def test_bad_recipe_values(field, value, accepted):
  with pytest.raises(ValueError, match=rf"^--{field}={value} is not accepted: .*{accepted}"):
    Config(**{field: value})


def _lrs(config, steps_per_epoch):
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  return np.array([float(schedule(s)) for s in range(config.epochs * steps_per_epoch)])


def test_constant_cosine_is_torch_cosine_annealing_over_the_br_epochs():
  config = Config(recipe="reference", epochs=7, warmup_epochs=3, lr=0.02)
  lrs = _lrs(config, 3).reshape(7, 3)
  assert np.all(lrs == lrs[:, :1])  # per epoch: constant within an epoch
  t = 7 - 3  # CosineAnnealingLR(T_max=4), stepped after each BR epoch
  want = [0.02] * 3 + [0.02 * (1 + math.cos(math.pi * k / t)) / 2 for k in range(t)]
  np.testing.assert_allclose(lrs[:, 0], want, rtol=1e-6)
  assert lrs[3, 0] == pytest.approx(0.02)  # the first BR epoch still uses the full rate


def test_step_schedule_is_the_reference_baseline():
  config = Config(recipe="reference_baseline", bits_w=32, bits_a=32, epochs=8)
  lrs = _lrs(config, 2).reshape(8, 2)[:, 0]  # MultiStepLR(milestones=[4, 6], gamma=0.1)
  np.testing.assert_allclose(lrs, [0.1] * 4 + [0.01] * 2 + [0.001] * 2, rtol=1e-6)


def test_cosine_is_per_step_over_the_whole_run():
  config = Config(epochs=4, warmup_epochs=1)
  lrs = _lrs(config, 5)
  np.testing.assert_allclose(lrs, [0.1 * (1 + math.cos(math.pi * s / 20)) / 2
                                   for s in range(20)], rtol=1e-5, atol=1e-9)


def _params():
  return {"conv": {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "alpha": jnp.array(0.3)},
          "act": {"alpha": jnp.array(1.5)},
          "bn": {"scale": jnp.array([1.0, 0.8])}}


def _grads(i):
  return {"conv": {"kernel": jnp.array([[0.1, -0.2], [0.3, 0.05]]) * (i + 1),
                   "alpha": jnp.array(0.02 * (-1)**i)},
          "act": {"alpha": jnp.array(-0.01 * (i + 1))},
          "bn": {"scale": jnp.array([0.05, -0.04])}}


def _torch_adam(params, grads_list, lr, wd, eps=1e-8, b1=0.9, b2=0.999):
  """``torch.optim.Adam(weight_decay=wd)``, written out: L2 into the gradient, then Adam."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_list, start=1):
    for k in p:
      g = np.asarray(grads[k], np.float64) + wd * p[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      denom = np.sqrt(v[k] / (1 - b2**t)) + eps
      p[k] = p[k] - lr / (1 - b1**t) * m[k] / denom
  return p


def _flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def test_reference_optimizer_is_torch_adam_with_coupled_l2_on_every_parameter():
  with jax.enable_x64(True):
    config = Config(recipe="reference", epochs=3, warmup_epochs=1)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    tx = optim.create_optimizer(config, steps_per_epoch=10)
    state = tx.init(params)
    grads = [jax.tree.map(lambda x: x.astype(jnp.float64), _grads(i)) for i in range(3)]
    p = params
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    want = _torch_adam(_flat(params), [_flat(g) for g in grads], lr=0.01, wd=1e-4)
    for k, value in _flat(p).items():
      np.testing.assert_allclose(value, want[k], rtol=1e-12, err_msg=k)


def test_brjax_optimizer_keeps_weight_decay_off_the_alphas():
  config = Config(epochs=3, warmup_epochs=1, momentum=0.0, weight_decay=0.5)
  tx = optim.create_optimizer(config, steps_per_epoch=10)
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  flat = _flat(updates)
  assert float(flat["conv/alpha"]) == 0.0 and float(flat["act/alpha"]) == 0.0
  assert float(jnp.abs(flat["conv/kernel"]).min()) > 0  # weights are decayed
  ref = Config(recipe="reference", epochs=3, warmup_epochs=1)
  updates, _ = optim.create_optimizer(ref, 10).update(zero, optim.create_optimizer(
      ref, 10).init(params), params)
  assert float(_flat(updates)["act/alpha"]) != 0.0  # reference: L2 on alphas too


@pytest.mark.parametrize("recipe", ["reference", "brjax"])
def test_frozen_alphas_stay_exactly_frozen_and_state_carries_over(recipe):
  config = Config(recipe=recipe, epochs=3, warmup_epochs=1, freeze_alpha_w=True,
                  freeze_alpha_a=True)
  params = _params()
  warm = optim.create_optimizer(config, 10)
  state = warm.init(params)
  p = params
  for i in range(2):
    updates, state = warm.update(_grads(i), state, p)
    p = optax.apply_updates(p, updates)
  br = optim.create_optimizer(config, 10, optim.frozen_labels(config))
  # Same state structure across the phase switch: the warmup state feeds the BR optimizer.
  chex.assert_trees_all_equal_structs(state, br.init(params))
  frozen = p
  for i in range(3):
    updates, state = br.update(_grads(i), state, p)
    flat = _flat(updates)
    assert float(flat["conv/alpha"]) == 0.0 and float(flat["act/alpha"]) == 0.0
    p = optax.apply_updates(p, updates)
  assert float(p["conv"]["alpha"]) == float(frozen["conv"]["alpha"])
  assert float(p["act"]["alpha"]) == float(frozen["act"]["alpha"])
  assert not np.allclose(p["conv"]["kernel"], frozen["conv"]["kernel"])


def _act_alpha_grad(act_grad_scale, batch):
  model = models.create_model("resnet8", bits_w=32, bits_a=2, act_grad_scale=act_grad_scale)
  variables = model.init(jax.random.key(0), batch, train=False)

  def loss(params):
    return jnp.sum(model.apply({**variables, "params": params}, batch, train=False))

  return jax.grad(loss)(variables["params"])["act_init"]["alpha"]


@pytest.mark.slow
def test_act_grad_scale_batch_divides_the_alpha_gradient_by_sqrt_batch():
  batch = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  per_example = _act_alpha_grad("example", batch)
  per_batch = _act_alpha_grad("batch", batch)
  np.testing.assert_allclose(per_batch * 2.0, per_example, rtol=1e-5)  # sqrt(4) = 2
  with pytest.raises(ValueError, match="act_grad_scale='layer' is not supported"):
    models.create_model("resnet20", act_grad_scale="layer")


def test_reference_normalization_is_the_reference_constants():
  from brjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.Dataset(np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1, np.int32),
                              np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1, np.int32),
                              ("a",), np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
  assert recipes.normalize_dataset(ds, "dataset") is ds
  ref = recipes.normalize_dataset(ds, Config(recipe="reference").normalization)
  np.testing.assert_allclose(ref.mean, [0.4914, 0.4822, 0.4465])
  np.testing.assert_allclose(ref.std, [0.2023, 0.1994, 0.2010])


def test_describe_names_every_part():
  line = recipes.describe(recipes.REFERENCE, "reference")
  for part in ("recipe reference", "adam", "lr 0.01", "weight decay 0.0001", "alphas included",
               "constant_cosine", "per batch", "first_step", "normalization reference"):
    assert part in line, part


@pytest.mark.slow
def test_reference_recipe_run_logs_the_lr_each_epoch_used(cifar_dir, tmp_path):
  """End to end: the reference recipe; metrics.jsonl holds the per-epoch LR (constant
  through warmup, then cosine over the BR epochs) and the banner names it. (On ResNet-8:
  the reference layout's run is test_torch_import's test_pretrained_pth_starts_a_run.)"""
  config = Config(recipe="reference", model="resnet8", epochs=3,
                  warmup_epochs=1, train_examples=128, test_examples=64, batch_size=64,
                  data_dir=cifar_dir)
  lines = []
  train.train_and_evaluate(config, str(tmp_path), log=lines.append)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  np.testing.assert_allclose([m["lr"] for m in logged], [0.01, 0.01, 0.005], rtol=1e-6)
  assert [m["phase"] for m in logged] == ["WARMUP", "BR", "BR"]
  banner = "\n".join(lines)
  assert "Recipe: recipe reference: adam" in banner and "constant_cosine" in banner
