"""brjax replays the reference PyTorch package's own training run, step by step, in float64.

``../shared/reference/seed_trajectory_w2a2.npz`` (or the file named by the environment
variable ``BRJAX_SEED_TRAJECTORY``) is the reference package's code run unchanged in
float64 on fixed batches: its initial weights (``init/<state_dict key>``), the batches of
every epoch, and per epoch the LR, the means of loss, CE, BR_W and BR_A, the train
accuracy, every step size and the eval logits; then the final state (``final/<key>``).

The replay uses nothing but brjax's public pieces, as the CLI does: the model
``resnet18_reference`` (``models.create_model``), the ``.pth`` name mapping of
``brjax.export.torch_import`` (on numpy arrays: torch is not needed), the ``reference`` recipe
(``Config``, ``optim.create_optimizer``, ``optim.learning_rate_schedule``), the LSQ init of
the first training step (``quant.init_alphas(..., train=True)``) and ``steps.train_step``
with ``steps.br_settings`` and the phase switch of
``brjax.training.train.train_and_evaluate``. Every
setting comes from the file's own ``args``.

Tolerances (float64 on both sides): every logged value and every final array within
``RTOL = 1e-8`` relative (plus ``ATOL = 1e-12`` absolute, for values at 0). On the shared
W2A2 file the replay agrees to 2e-13 in every logged value and to 1e-10 in the final
weights (absolute 8e-13: Adam divides tiny, partly cancelling gradients by their own
magnitude); the test prints the largest relative error it sees.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.export import torch_import
from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.training import optim, steps
from brjax.training.config import Config

pytestmark = pytest.mark.slow  # a whole replay: the slow tier

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_TRAJECTORY = REPO.parent / "shared" / "reference" / "seed_trajectory_w2a2.npz"
RTOL = 1e-8
ATOL = 1e-12


def _trajectory_path() -> pathlib.Path:
  return pathlib.Path(os.environ.get("BRJAX_SEED_TRAJECTORY", DEFAULT_TRAJECTORY))


def config_from_args(args: dict, **overrides) -> Config:
  """The brjax Config of the reference run's ``args`` (the reference recipe)."""
  settings = dict(
      recipe="reference", model="resnet18_reference", width=args["width"],
      bits_w=args["bits_w"], bits_a=args["bits_a"], clip=args["clip"],
      lambda_w=args["lambda_w"], lambda_a=args["lambda_a"],
      warmup_epochs=args["warmup_epochs"], epochs=args["epochs"], batch_size=args["batch"],
      lr=args["lr"], freeze_alpha_w=args["freeze_weight_alpha"],
      freeze_alpha_a=args["freeze_act_alpha"], br_alpha_grad_a=args["br_backprop_to_alpha_act"],
      seed=args["seed"])
  settings.update(overrides)
  return Config(**settings)


def _nhwc(images_nchw: np.ndarray) -> jax.Array:
  return jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1)), jnp.float64)


def replay(path: pathlib.Path, epochs: int | None = None, **overrides) -> dict:
  """Trains brjax as the file's run trained; returns what it logged and its final state.

  Must run with float64 enabled. ``epochs`` stops early; ``overrides`` change the Config
  (for the negative controls).
  """
  data = np.load(path)
  trajectory = json.loads(str(data["trajectory"]))
  args = trajectory["args"]
  assert args.get("dtype", "float64") == "float64", args
  config = config_from_args(args, **overrides)
  model = models.create_model(config.model, bits_w=config.bits_w, bits_a=config.bits_a,
                              clip=config.clip, width=config.width,
                              act_grad_scale=config.act_grad_scale, dtype=jnp.float64,
                              param_dtype=jnp.float64)
  images, labels = _nhwc(data["images_nchw"]), jnp.asarray(data["labels"], jnp.int32)
  batches = [{"image": images[lo:hi], "label": labels[lo:hi]}
             for lo, hi in trajectory["batches"]]
  lo, hi = trajectory["eval_rows"]
  eval_images = _nhwc(data["eval_images_nchw"]) if "eval_images_nchw" in data else images[lo:hi]

  # The reference's initial weights, then LSQ's init in its first training forward.
  variables = jax.jit(functools.partial(model.init, train=True))(jax.random.key(0),
                                                                  batches[0]["image"])
  state_dict = {k[len("init/"):]: data[k] for k in data.files if k.startswith("init/")}
  variables, has_alphas = torch_import.load_state_dict(variables, state_dict)
  assert not has_alphas
  assert config.alpha_init == "first_step"
  variables = jax.jit(functools.partial(quant.init_alphas, model, train=True))(
      variables, batches[0]["image"])

  steps_per_epoch = len(batches)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  state = steps.TrainState.create(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=optim.create_optimizer(config, steps_per_epoch), rng=jax.random.key(0))
  step_fns, epochs = {}, []
  evaluate = jax.jit(functools.partial(model.apply, train=False))
  for epoch in range(1, (epochs or config.epochs) + 1):
    phase = steps.phase_of(config, epoch)
    if phase == steps.BR and phase not in step_fns:  # the switch, as train_and_evaluate
      state = state.replace(tx=optim.create_optimizer(config, steps_per_epoch,
                                                      optim.frozen_labels(config)))
    step_fn = step_fns.setdefault(
        phase, jax.jit(functools.partial(steps.train_step,
                                         br=steps.br_settings(config, phase))))
    lr = float(schedule(int(state.step)))
    per_batch = []
    for batch in batches:
      state, m = step_fn(state, batch)
      per_batch.append(jax.device_get(m))
    # The reference logs means over batches of the per-batch means.
    mean = lambda k: float(np.mean([b[k] / b["count"] for b in per_batch]))  # noqa: B023
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    sd = torch_import.to_state_dict(jax.device_get(variables))
    epochs.append({
        "epoch": epoch, "phase": phase, "lr": lr, "loss": mean("loss"), "ce": mean("ce"),
        "br_w": mean("br_w"), "br_a": mean("br_a"),
        "train_acc": 100.0 * sum(float(b["correct"]) for b in per_batch)
                     / sum(float(b["count"]) for b in per_batch),
        "alphas": {k: float(v.reshape(())) for k, v in sd.items() if k.endswith(".alpha")},
        "eval_logits": np.asarray(evaluate(variables, eval_images)),
    })
  return {"trajectory": trajectory, "data": data, "epochs": epochs, "final": sd}


@pytest.fixture(scope="module")
def replayed():
  path = _trajectory_path()
  if not path.exists():
    pytest.skip(f"reference trajectory not found at {path} (set BRJAX_SEED_TRAJECTORY)")
  with jax.enable_x64(True):
    return replay(path)


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want) / (np.abs(want) + ATOL), initial=0.0))


def _close(got, want, what: str) -> float:
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             rtol=RTOL, atol=ATOL, err_msg=what)
  return _rel_err(got, want)


def test_every_logged_value_matches(replayed):
  want_epochs = replayed["trajectory"]["epochs"]
  assert len(replayed["epochs"]) == len(want_epochs)
  worst = 0.0
  for got, want in zip(replayed["epochs"], want_epochs):
    where = f"epoch {want['epoch']}"
    assert got["epoch"] == want["epoch"]
    assert got["phase"] == want["phase"], where
    for key in ("lr", "loss", "ce", "br_w", "br_a", "train_acc"):
      worst = max(worst, _close(got[key], want[key], f"{where}: {key}"))
    assert sorted(got["alphas"]) == sorted(want["alphas"]), where
    for name, alpha in want["alphas"].items():
      worst = max(worst, _close(got["alphas"][name], alpha, f"{where}: {name}"))
    chex.assert_shape(got["eval_logits"], np.shape(want["eval_logits"]))
    worst = max(worst, _close(got["eval_logits"], want["eval_logits"],
                              f"{where}: eval logits"))
  print(f"largest relative error over the logged values: {worst:.2e}")


def test_final_state_matches(replayed):
  data, final = replayed["data"], replayed["final"]
  want = {k[len("final/"):]: data[k] for k in data.files if k.startswith("final/")}
  compared = {k for k in want if not k.endswith(torch_import.IGNORED_SUFFIXES)}
  assert compared <= set(final), sorted(compared - set(final))
  worst = 0.0
  for key in sorted(compared):
    worst = max(worst, _close(final[key], want[key], key))
  print(f"largest relative error over the final state ({len(compared)} arrays): {worst:.2e}")


def test_a_recipe_difference_fails_the_replay():
  """Negative control: brjax's per-example activation step-size gradient scale instead of
  the reference's per-batch one, one epoch, and the step sizes no longer match."""
  path = _trajectory_path()
  if not path.exists():
    pytest.skip(f"reference trajectory not found at {path}")
  with jax.enable_x64(True):
    got = replay(path, epochs=1, act_grad_scale="example")
  want = got["trajectory"]["epochs"][0]["alphas"]
  with pytest.raises(AssertionError):
    for name, alpha in want.items():
      _close(got["epochs"][0]["alphas"][name], alpha, name)
