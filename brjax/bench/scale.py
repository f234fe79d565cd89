"""Measurements for scaling past CIFAR: bfloat16 against float32, and the memory of a step.

* :func:`time_dtypes`: the BR-phase training step (W2A2, CE + BR_W + BR_A) of one model in
  float32 and in bfloat16 computation (``Config.dtype``), interleaved rounds in one
  process; reports both medians and their ratio.
* :func:`step_memory`: XLA's memory plan of the BR-phase step of one of the papers' models
  (``compiled.memory_analysis()``: no step is run, only compiled), with and without A-BR,
  each with and without ``nn.remat`` (``Config.remat``). A-BR keeps every pre-quantization
  activation of the step for its bins; remat recomputes the blocks' activations in the
  backward pass instead of keeping them.

Both build the training step exactly as ``brjax.training.train`` does (``parallel.jit_train_step``,
``steps.br_settings``), from abstract shapes where nothing needs to run.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from brjax.models import cifar as models
from brjax.training import optim, steps
from brjax.training.config import Config
from brjax.training.parallel import Topology, jit_train_step


def _create_state(model, config: Config, image_size: int) -> steps.TrainState:
  """A fresh TrainState of ``model`` (step sizes initialized from a random batch)."""
  images = jax.random.normal(jax.random.key(2),
                             (config.batch_size, image_size, image_size, 3), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=True)
  return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                 tx=optim.create_optimizer(config, 1),
                                 batch_stats=variables["batch_stats"], rng=jax.random.key(0))


def _batch(config: Config, image_size: int, num_classes: int) -> dict:
  key = jax.random.key(1)
  return {"image": jax.random.normal(key, (config.batch_size, image_size, image_size, 3)),
          "label": jnp.arange(config.batch_size, dtype=jnp.int32) % num_classes}


MEMORY_VARIANTS = ("no_abr", "no_abr_remat", "abr", "abr_remat")


def step_memory(config: Config, image_size: int, *, num_classes: int = 1000,
                variants: tuple[str, ...] = MEMORY_VARIANTS,
                log: Callable[[str], None] = lambda _: None) -> dict[str, float]:
  """MB of XLA's plan for the BR-phase step: ``{"no_abr", "no_abr_remat", "abr",
  "abr_remat"}``.

  Each value is the step's temporaries plus its outputs (arguments excluded: the state and
  batch are the same in every variant; donated state buffers are reused for the outputs).
  """
  topology = Topology.create()
  changes = {"no_abr": dict(lambda_a=0.0, remat=False),
             "no_abr_remat": dict(lambda_a=0.0, remat=True),
             "abr": dict(remat=False), "abr_remat": dict(remat=True)}
  batch = jax.eval_shape(lambda: _batch(config, image_size, num_classes))
  out = {}
  for name in variants:  # remat variants need one of the papers' models (Config checks)
    variant = dataclasses.replace(config, **changes[name])
    log(f"memory of the {variant.model} BR step: {name}")
    model = models.from_run_config(variant, num_classes, image_size)
    state = jax.eval_shape(lambda m=model, v=variant: _create_state(m, v, image_size))
    step = jit_train_step(topology, steps.br_settings(variant, steps.BR))
    stats = step.lower(state, batch).compile().memory_analysis()
    out[name] = (stats.temp_size_in_bytes + stats.output_size_in_bytes
                 - stats.alias_size_in_bytes) / 2**20
  return out


def time_dtypes(config: Config, image_size: int, rounds: int, *, num_classes: int = 10,
                log: Callable[[str], None] = lambda _: None) -> dict[str, float]:
  """Median seconds of the BR-phase step in float32 and bfloat16: ``{"float32",
  "bfloat16", "ratio"}`` (ratio: the median of per-round bfloat16 / float32)."""
  topology = Topology.create()
  batch = jax.device_put(_batch(config, image_size, num_classes), topology.batch)
  runs = {}
  for dtype in ("float32", "bfloat16"):
    variant = dataclasses.replace(config, dtype=dtype)
    model = models.from_run_config(variant, num_classes, image_size)
    state = jax.device_put(_create_state(model, variant, image_size), topology.replicated)
    step = jit_train_step(topology, steps.br_settings(variant, steps.BR))
    log(f"compiling the {variant.model} BR step in {dtype}")
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    runs[dtype] = [step, state]
  times = {dtype: [] for dtype in runs}
  for r in range(rounds):
    for dtype in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
      step, state = runs[dtype]
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times[dtype].append(time.perf_counter() - start)
      runs[dtype][1] = state
  ratio = statistics.median(b / f for b, f in zip(times["bfloat16"], times["float32"]))
  return {"float32": statistics.median(times["float32"]),
          "bfloat16": statistics.median(times["bfloat16"]), "ratio": ratio}

