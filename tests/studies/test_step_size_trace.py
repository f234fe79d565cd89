"""brjax.studies.step_size_trace and scripts/trace_step_sizes.py: a run's step sizes step by step,
with the gradient each loss term sends them."""

from __future__ import annotations

import functools
import json

import chex
from conftest import run_main
import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.quant import lsq as quant
from brjax.studies import step_size_trace
from brjax.training import checkpoint, optim
from brjax.training.config import Config
from brjax.training.steps import BRSettings, TrainState, loss_terms


def test_run_config_takes_br_phase_overrides_only():
  meta = {"config": {"lambda_a": 1.0, "lr": 0.01, "no_longer_a_field": 3}}
  config, traced = step_size_trace.run_config(meta, {"abr_clipped": "exclude",
                                                     "lambda_a": 0.0})
  assert config == Config(lambda_a=1.0, lr=0.01)
  assert traced == Config(lambda_a=0.0, lr=0.01, abr_clipped="exclude")
  with pytest.raises(ValueError, match="--lr is not accepted as an override: only the "
                                       "BR-phase fields"):
    step_size_trace.run_config(meta, {"lr": 0.1})
  with pytest.raises(ValueError, match="has no config"):
    step_size_trace.run_config({}, {})


def test_br_overrides_are_refused_for_a_warmup_epoch():
  step_size_trace.check_overrides_act("BR", {"lambda_a": 1.0})
  step_size_trace.check_overrides_act("WARMUP", {})
  with pytest.raises(ValueError, match="--lambda_a is not accepted here: the traced epoch is a "
                                       "WARMUP epoch, where BR flags do nothing"):
    step_size_trace.check_overrides_act("WARMUP", {"lambda_a": 1.0})


def test_step_size_paths_select_by_regex_or_refuse():
  params = {"conv": {"kernel": 1, "alpha": 2}, "relu": {"alpha": 3}, "dense": {"bias": 4}}
  assert step_size_trace.step_size_paths(params, None) == ["conv/alpha", "relu/alpha"]
  assert step_size_trace.step_size_paths(params, "^relu") == ["relu/alpha"]
  with pytest.raises(ValueError, match="--layers=bn is not accepted: it selects no step size; "
                                       "the run's are "
                                       "conv/alpha, relu/alpha"):
    step_size_trace.step_size_paths(params, "bn")


@pytest.mark.parametrize("args,message", [
    ([], "--workdir is required"),
    (["--workdir=/no/such/run"], "has no checkpoints/latest"),
    (["--workdir=x", "--abr_clipped=top"], "--abr_clipped"),
    (["--workdir=x", "--steps=abc"], "--steps"),
])
def test_script_bad_flags_are_one_line_errors(args, message, capsys):
  code, _, err = run_main("trace_step_sizes", args, capsys)
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_decay_gradients_are_the_optimizers_coupled_weight_decay():
  """``optim.decay_rate * value`` per label: ``weight_decay * alpha`` exactly when the
  recipe decays the step sizes, what brjax.training.optim's chain adds before the optimizer."""
  values = {"relu/alpha": 0.1, "conv/alpha": 0.02, "conv/kernel": 0.5}
  labels = {"relu/alpha": optim.ALPHA_A, "conv/alpha": optim.ALPHA_W,
            "conv/kernel": optim.WEIGHTS}
  decayed = Config(weight_decay=1e-4, decay_alphas=True)
  got = step_size_trace.decay_gradients(decayed, values, labels)
  assert got == pytest.approx({"relu/alpha": 1e-5, "conv/alpha": 2e-6, "conv/kernel": 5e-5})
  kept = step_size_trace.decay_gradients(Config(weight_decay=1e-4, decay_alphas=False),
                                         values, labels)
  assert kept == pytest.approx({"relu/alpha": 0.0, "conv/alpha": 0.0, "conv/kernel": 5e-5})


@pytest.mark.parametrize("decay_alphas", [True, False])
def test_decay_rate_is_what_the_optimizer_adds(decay_alphas):
  """The recipe's optimizer, on a zero gradient with lr 1 and no momentum, moves each
  parameter by ``-optim.decay_rate(config, label) * param``: the trace reads the same rule."""
  config = Config(optimizer="sgd", momentum=0.0, lr=1.0, schedule="step", epochs=10,
                  warmup_epochs=1,
                  weight_decay=1e-4, decay_alphas=decay_alphas, alpha_lr_scale=1.0)
  params = {"conv": {"kernel": jnp.full((2,), 0.5), "alpha": jnp.float32(0.02)},
            "relu": {"alpha": jnp.float32(0.1)}}
  tx = optim.create_optimizer(config, steps_per_epoch=1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update, _ = tx.update(zeros, tx.init(params), params)
  alpha_rate = 1e-4 if decay_alphas else 0.0
  want = {"conv": {"kernel": -1e-4 * params["conv"]["kernel"],
                   "alpha": -alpha_rate * params["conv"]["alpha"]},
          "relu": {"alpha": -alpha_rate * params["relu"]["alpha"]}}
  chex.assert_trees_all_close(update, want, rtol=1e-6)
  rates = jax.tree.map(lambda label: optim.decay_rate(config, label),
                       optim.param_labels(params))
  assert rates == {"conv": {"kernel": 1e-4, "alpha": alpha_rate}, "relu": {"alpha": alpha_rate}}


class SmallModel(nn.Module):
  """Two quantized convolutions and ReLUs, then a quantized head: two A-BR sites."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = quant.QuantConv(8, (3, 3), bits=2, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = quant.QuantReLU(bits=2)(x)
    x = quant.QuantConv(8, (3, 3), strides=2, bits=2)(x)
    x = quant.QuantReLU(bits=2)(x)
    return quant.QuantDense(10, bits=2)(x.mean(axis=(1, 2)))


@pytest.mark.slow
def test_the_term_gradients_sum_to_the_training_gradient():
  """CE, lambda_w * BR_W and lambda_a * BR_A's gradients add up to the gradient of the
  loss the training step descends; A-BR reaches the first ReLU's step size only through
  the layer after it (its own levels are stop_gradient'ed by default)."""
  model = SmallModel()
  batch = {"image": jax.random.normal(jax.random.key(0), (8, 8, 8, 3)),
           "label": jnp.arange(8) % 10}
  variables = model.init(jax.random.key(1), batch["image"], train=False)
  variables = quant.init_alphas(model, variables, batch["image"], train=True)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            tx=optax.sgd(0.1), batch_stats=variables["batch_stats"])
  br = BRSettings(lambda_w=0.5, lambda_a=2.0)
  parts = jax.jit(functools.partial(step_size_trace.term_gradients, br=br))(state, batch)

  def loss(params):
    terms, _, _ = loss_terms(state, params, batch, br)
    return terms["ce"] + 0.5 * terms["br_w"] + 2.0 * terms["br_a"]

  total = jax.jit(jax.grad(loss))(state.params)
  summed = jax.tree.map(lambda a, b, c: a + b + c, *(parts[t] for t in step_size_trace.TERMS))
  for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(total)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(want))))
  br_a = flax.traverse_util.flatten_dict(parts["br_a"], sep="/")
  assert br_a["QuantReLU_0/alpha"] != 0  # through QuantConv_1's input to QuantReLU_1's site
  assert br_a["QuantReLU_1/alpha"] == 0  # nothing A-BR reads is downstream of it
  assert step_size_trace.step_size_paths(state.params, "ReLU") == ["QuantReLU_0/alpha",
                                                                  "QuantReLU_1/alpha"]


def test_the_script_traces_the_runs_next_epoch_and_writes_json(tiny_run, tmp_path, capsys):
  workdir, _ = tiny_run
  out = tmp_path / "trace.jsonl"
  code, stdout, err = run_main("trace_step_sizes", [
      f"--workdir={workdir}", "--epoch=1", "--steps=3", "--every=2",
      "--layers=BasicBlock_0/QuantReLU_1/alpha", "--lambda_w=0", "--lambda_a=0",
      f"--json_out={out}"], capsys)  # without BR terms: the lightest step to compile
  assert code == 0, err
  name = "BasicBlock_0/QuantReLU_1/log_alpha"  # the brjax recipe's log step sizes, selected
  # by their alpha's name
  lines = stdout.splitlines()
  assert lines[0].split() == ["step", "step", "size", "value", "gradient", "of:", "ce", "br_w",
                              "br_a", "decay"]
  assert [line.split()[:2] for line in lines[1:3]] == [
      ["0", name], ["2", name]]
  assert lines[3] == (f"# from {workdir} at epoch 1: 3 steps of epoch 2 (BR); overrides of "
                      "the run's BR flags: lambda_w=0.0, lambda_a=0.0")
  assert lines[4].startswith(f"{name}: ") and "in 3 steps" in lines[4]
  samples = [json.loads(line) for line in out.read_text().splitlines()]
  assert [s["step"] for s in samples] == [0, 2]
  grads = samples[0]["grads"][name]
  assert set(grads) == {"ce", "br_w", "br_a", "decay"} and grads["br_a"] == grads["br_w"] == 0.0
  assert grads["ce"] != 0.0
  # The tiny run's recipe (brjax's) keeps weight decay off the step sizes.
  assert grads["decay"] == 0.0 and "decay +0.0e+00 (> 0 at 0/2)" in lines[4]
  # The checkpoint of the run's last epoch has no next epoch to trace; refused before any
  # work, as is an epoch past the run.
  for args in ([], ["--epoch=7"]):
    code, _, err = run_main("trace_step_sizes", [f"--workdir={workdir}", *args], capsys)
    assert code == 2 and "is not accepted: the run has 2 epochs, so none follows it" in err, err
  with pytest.raises(checkpoint.CheckpointError, match=r"--epoch=0 is not accepted: .* keeps "
                                                       r"the checkpoints of epochs \[1, 2\]"):
    checkpoint.restore_epoch(workdir, 0, None)
