"""A run's model and its first training state: LSQ step-size init, ``--pretrained`` weights."""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from brjax.data import datasets, streaming
from brjax.models import cifar as models
from brjax.quant import calibration
from brjax.quant import lsq as quant
from brjax.training import checkpoint, optim
from brjax.training.config import PRETRAINED_SUFFIXES, Config
from brjax.training.steps import TrainState


def create_model(config: Config, num_classes: int, image_size: int) -> flax.linen.Module:
  """The run's model: ``models.from_run_config`` (a CIFAR ResNet with the config's layout
  options, or one of the papers' models quantized by its rules)."""
  return models.from_run_config(config, num_classes, image_size)


def create_train_state(config: Config, model: flax.linen.Module, ds: datasets.Dataset,
                       steps_per_epoch: int, frozen=()) -> TrainState:
  """A fresh state; every step size initialized the LSQ way from weights and one batch.

  With ``config.pretrained`` the weights and BatchNorm statistics of that run (a brjax
  workdir, or a reference ``.pth`` via ``brjax.export.torch_import``) are loaded first. The step
  sizes then come from ``config.alpha_init``:

  * ``calibrate`` (brjax): ``model.init`` in train mode on the first ``batch_size``
    unaugmented training images; after loading pretrained weights, an eval-mode pass
    (their BatchNorm statistics are meaningful);
  * ``first_step`` (the reference): a train-mode pass on the first training batch, the
    augmented batch step 1 trains on (``quant.init_alphas(..., train=True)``: BatchNorm
    statistics untouched), as the reference initializes in its first training forward.

  A ``.pth`` that holds every step size (a reference QAT checkpoint) keeps them. Input
  signs that the model's rules leave to the data (``act_signed=None``) are decided by the
  batch its step sizes come from, and kept in the state's ``quant_state``.
  """
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  batch = _first_batch(ds, config.batch_size)
  variables = calibration.jit_init(functools.partial(model.init, train=True))(init_rng, batch)
  has_alphas = False
  if config.pretrained is not None:
    variables, has_alphas = _load_pretrained(config.pretrained, variables)
  if config.quantized and not has_alphas:
    if config.alpha_init == "first_step":
      first = next(streaming.train_batches(ds, config.batch_size, seed=config.seed,
                                                epoch=1))
      variables = calibration.jit_init(functools.partial(quant.init_alphas, model, train=True))(
          variables, jnp.asarray(first["image"]), rng=init_rng)
    elif config.pretrained is not None:
      variables = calibration.jit_init(functools.partial(quant.init_alphas, model, train=False))(
          variables, batch, rng=init_rng)
  tx = optim.create_optimizer(config, steps_per_epoch, frozen)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"], rng=state_rng,
                           quant_state=variables.get(quant.STATE, {}))


def _first_batch(ds: datasets.Dataset, batch_size: int) -> jax.Array:
  """The first ``batch_size`` training images, normalized, unaugmented: for LSQ init."""
  return jnp.asarray(streaming.first_images(ds, batch_size))


def _load_pretrained(path: str, variables: dict) -> tuple[dict, bool]:
  """``variables`` with every non-alpha parameter and BatchNorm statistic from ``path``
  (the step sizes and the data-decided input signs, ``quant_state``, stay this model's).

  Returns the variables and whether the step sizes came from ``path`` too (a reference
  QAT ``.pth``); a brjax workdir's step sizes are never taken (it is a float run).
  """
  if path.endswith(PRETRAINED_SUFFIXES):
    from brjax.export import torch_import  # pylint: disable=g-import-not-at-top
    try:
      loaded, has_alphas = torch_import.load_state_dict(
          variables, torch_import.read_pth(path), source=f"--pretrained={path}")
    except ImportError as e:
      raise ValueError(f"--pretrained={path} is not accepted: {e}") from None
    return jax.tree.map(jnp.asarray, loaded), has_alphas
  loaded, _ = checkpoint.restore_pretrained(path)
  flat_new = {c: flax.traverse_util.flatten_dict(variables[c]) for c in variables}
  flat_old = {c: flax.traverse_util.flatten_dict(loaded.get(c, {})) for c in loaded}
  merged = {}
  for collection, flat in flat_new.items():
    out = {}
    for p, value in flat.items():
      if quant.is_alpha_path(p) or collection == quant.STATE:  # this model's, from its init
        out[p] = value
        continue
      old = flat_old.get(collection, {}).get(p)
      if old is None or np.shape(old) != np.shape(value):
        found = "missing" if old is None else f"shape {np.shape(old)}, expected {value.shape}"
        raise checkpoint.CheckpointError(
            f"--pretrained={path} does not fit this model: {collection}/{'/'.join(p)} is "
            f"{found} (train the float baseline with the same --model)")
      out[p] = jnp.asarray(old, value.dtype)
    merged[collection] = flax.traverse_util.unflatten_dict(out)
  return merged, False
