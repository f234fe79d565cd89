"""The step sizes' own optimizer group (lr multiplier, weight decay), the BR weight ramp,
and the recipes' defaults for both (brjax.training.optim, steps, recipes, config)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.training import checkpoint, optim, recipes, steps
from brjax.training.config import Config

PARAMS = {"conv": {"kernel": jnp.full((3, 3, 2, 2), 0.5), "alpha": jnp.asarray(0.5),
                   "log_input_alpha": jnp.asarray(-0.7)},
          "relu": {"alpha": jnp.asarray(0.5)}}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)


def _update(config, frozen=()):
  tx = optim.create_optimizer(config, steps_per_epoch=10, frozen=frozen)
  updates, _ = jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
  return updates


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 3.0])
def test_alpha_lr_scale_scales_only_the_step_sizes(optimizer, scale):
  base = Config(optimizer=optimizer, weight_decay=0.0, alpha_lr_scale=1.0)
  got = _update(dataclasses.replace(base, alpha_lr_scale=scale))
  ref = _update(base)
  chex.assert_trees_all_close(got["conv"]["kernel"], ref["conv"]["kernel"])
  for path in (("conv", "alpha"), ("conv", "log_input_alpha"), ("relu", "alpha")):
    a, b = got[path[0]][path[1]], ref[path[0]][path[1]]
    np.testing.assert_allclose(float(a), scale * float(b), rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_alpha_weight_decay_is_the_step_sizes_own(optimizer):
  config = Config(optimizer=optimizer, weight_decay=0.0, alpha_weight_decay=0.5,
                  alpha_lr_scale=1.0)
  assert optim.decay_rate(config, optim.WEIGHTS) == 0.0
  assert optim.decay_rate(config, optim.ALPHA_A) == optim.decay_rate(config, optim.ALPHA_W) == 0.5
  got = _update(config)
  ref = _update(dataclasses.replace(config, alpha_weight_decay=0.0))
  chex.assert_trees_all_close(got["conv"]["kernel"], ref["conv"]["kernel"])
  if optimizer == "sgd":  # lr * (g + wd * alpha): one more -lr * 0.5 * 0.5
    np.testing.assert_allclose(float(got["relu"]["alpha"] - ref["relu"]["alpha"]),
                               -0.1 * 0.25, rtol=1e-5)


def test_recipe_defaults_of_the_step_size_group():
  brjax, reference = Config(), Config(recipe="reference")
  assert (brjax.alpha_param, brjax.alpha_weight_decay, brjax.abr_clipped) == ("log", 0.0,
                                                                              "exclude")
  assert brjax.br_schedule == "cosine" and brjax.br_ramp_epochs >= 1
  assert (reference.alpha_param, reference.alpha_lr_scale, reference.abr_clipped,
          reference.br_schedule) == ("linear", 1.0, "include", "constant")
  assert reference.alpha_weight_decay == reference.weight_decay == 1e-4  # decay_alphas
  assert Config(recipe="reference", weight_decay=5e-4).alpha_weight_decay == 5e-4
  assert Config(recipe="reference", alpha_weight_decay=0.0).alpha_weight_decay == 0.0
  line = recipes.describe(brjax.recipe_parts, "brjax")
  assert "step sizes log (lr x0.1)" in line and "cosine ramp over" in line


def test_reference_optimizer_is_one_object_for_every_label():
  """alpha_lr_scale 1 keeps the reference's optimizer exactly (the replay depends on it)."""
  tx = optim.create_optimizer(Config(recipe="reference"), 10)
  got, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  ref = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(0.01, b1=0.9, b2=0.999))
  want, _ = ref.update(GRADS, ref.init(PARAMS), PARAMS)
  chex.assert_trees_all_equal(got, want)


def test_br_weight_ramps_on_a_half_cosine_over_the_first_br_epochs():
  config = Config(warmup_epochs=2, epochs=10, br_schedule="cosine", br_ramp_epochs=3)
  br = steps.br_settings(config, steps.BR, steps_per_epoch=5)
  assert (br.ramp_start, br.ramp_steps) == (10, 15)
  r = [float(steps.br_weight(br, s)) for s in range(8, 30)]
  assert r[:2] == [0.0, 0.0]  # (warmup steps: no BR term anyway)
  assert 0.0 < r[2] < 0.02 and r[2 + 14] == 1.0 and r[-1] == 1.0
  assert all(b >= a for a, b in zip(r, r[1:]))
  np.testing.assert_allclose(r[2 + 7 - 1 + 1], (1 - np.cos(np.pi * 8 / 15)) / 2, rtol=1e-6)
  constant = steps.br_settings(dataclasses.replace(config, br_schedule="constant"), steps.BR,
                               steps_per_epoch=5)
  assert constant.ramp_steps == 0 and float(steps.br_weight(constant, 12)) == 1.0
  assert steps.br_settings(config, steps.BR).ramp_steps == 0  # no steps: constant (timing)


def test_old_run_configs_resume_as_what_they_trained():
  """A saved config without the new fields counts as linear, lr x1, constant BR weight:
  resuming it under the new brjax defaults names the differences; a float run's resume
  ignores the fields only quantization reads."""
  old = {k: v for k, v in dataclasses.asdict(Config(recipe="reference")).items()
         if k not in ("alpha_param", "alpha_lr_scale", "alpha_weight_decay", "br_schedule",
                      "br_ramp_epochs")}
  assert checkpoint.config_diffs(old, Config(recipe="reference")) == []
  brjax_old = {k: v for k, v in dataclasses.asdict(Config()).items()
               if k not in ("alpha_param", "br_schedule")}
  diffs = checkpoint.config_diffs(brjax_old, Config())
  assert any(d.startswith("--alpha_param='linear' there") for d in diffs)
  float_old = {**dataclasses.asdict(Config(bits_w=32, bits_a=32)), "abr_clipped": "include"}
  assert checkpoint.config_diffs(float_old, Config(bits_w=32, bits_a=32)) == []
