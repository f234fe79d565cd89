"""What a mid-epoch checkpoint costs the training loop: the step time around a save.

A save (``RunCheckpoints.save_step``, as the loop makes it every
``--checkpoint_every_steps`` or on a signal) blocks only while the state is copied to the
host and orbax starts its background write; the files are written while the next steps
run. Measured here, interleaved on one state and batch:

* ``checkpoint_save_call_ms``: the median time the save call blocks;
* ``step_with_save_over_step``: a step preceded by an asynchronous save (the call and the
  step, as the loop runs them) over a plain step, median of per-round ratios;
* ``step_with_sync_save_over_step``: the same with the save waited for (what a synchronous
  checkpointer would cost), for comparison.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import numpy as np

from brjax.data import input_pipeline
from brjax.training import checkpoint, parallel
from brjax.training import steps as steps_lib
from brjax.training.state import create_model, create_train_state


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_checkpoint_saves(report: Any, config: Any, ds: input_pipeline.Dataset, rounds: int,
                          workdir: str) -> None:
  """Adds the three measurements of the module docstring to ``report`` (a
  ``brjax.bench.report.Report``), for ``config``'s model and batch on ``ds``; writes its
  checkpoints under ``workdir``."""
  topology = parallel.Topology.create()
  model = create_model(config, ds.num_classes, ds.image_size)  # the run's model
  state = jax.device_put(create_train_state(config, model, ds, 1), topology.replicated)
  step = parallel.jit_train_step(topology, steps_lib.br_settings(config, steps_lib.BR))
  batch = jax.device_put(next(input_pipeline.train_batches(
      ds, config.batch_size, seed=0, epoch=1)), topology.batch)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))

  partial = {"loss": np.zeros((1,), np.float32)}
  ckpts = checkpoint.RunCheckpoints(os.path.join(workdir, "bench_checkpoints"))

  def save(wait: bool) -> float:
    def call():
      ckpts.save_step(int(holder["state"].step), jax.device_get(holder["state"]), partial,
                      {"epoch": 1, "input": {"epoch": 1, "step_in_epoch": 1}})
      if wait:
        ckpts.wait()
    return _timed(call)

  try:
    for _ in range(2):  # compilation, allocations
      one_step()
    ckpts.wait()
    plain, asynchronous, synchronous, calls = [], [], [], []
    for _ in range(rounds):
      plain.append(_timed(one_step))
      call = save(wait=False)
      calls.append(call)
      asynchronous.append(call + _timed(one_step))
      ckpts.wait()  # each round starts with no write in flight
      synchronous.append(save(wait=True) + _timed(one_step))
  finally:
    ckpts.close()
  report.add("checkpoint_save_call_ms", statistics.median(calls) * 1e3, "ms",
             f"median of {rounds}: the blocking part of an asynchronous mid-epoch save")
  report.add("step_with_save_over_step",
             statistics.median(a / p for a, p in zip(asynchronous, plain)), "x",
             "a step after an asynchronous save (call + step) / a plain step")
  report.add("step_with_sync_save_over_step",
             statistics.median(s / p for s, p in zip(synchronous, plain)), "x",
             "the same with the save waited for (a synchronous checkpointer)")
