"""Where a run's step sizes go, step by step: each one's value and the gradient that each
loss term sends it, over the training steps that follow one of the run's checkpoints.

A step size that the run's epoch-level metrics show falling (or a run stopped because one
went to zero or below, ``run_control.Diverged``) is pushed by the sum of three gradients:
cross-entropy's (through LSQ), ``lambda_w * BR_W``'s and ``lambda_a * BR_A``'s. BR's
gradient reaches a step size through its own levels only when the alpha control lets it
(``--br_alpha_grad_w``, ``--br_alpha_grad_a``), but also, always, through the layers
downstream: a step size scales its layer's quantized output, which is the input of the
next layers, whose pre-quantization activations A-BR regularizes. :func:`trace` measures
the three gradients separately (one forward pass, three backward passes: ``jax.jacrev``)
on the very batches the run trains on, while it trains exactly as the run would. A fourth
push is not a loss term: the recipe's coupled weight decay, which adds
``weight_decay * alpha`` to a step size's gradient when ``decay_alphas`` (the reference
recipe) and is traced beside them (``decay``).

With Adam a small gradient of constant sign moves a step size by about the learning rate
per step whatever its size, so the sign of each term over many steps matters more than
its size.

Both parametrizations (``brjax.quant.step_size``): a ``log`` step size (``log_alpha``) is
traced under its parameter's path, its value shown as ``alpha = exp(theta)`` and its
gradients those of ``theta`` (``G / alpha`` for the gradient ``G`` on ``alpha``: the same
sign, so positive still lowers the step size); ``decay`` is the weight decay on ``theta``.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from brjax.data import datasets, streaming
from brjax.quant import lsq as quant
from brjax.quant import step_size
from brjax.training import checkpoint, optim, train
from brjax.training.config import BR_PHASE_FIELDS, Config
from brjax.training.parallel import Topology, device_batches, jit_train_step
from brjax.training.steps import (
  BR,
  TrainState,
  activation_sites,
  br_settings,
  loss_terms,
  phase_of,
  select_abr_sites,
)

TERMS = ("ce", "br_w", "br_a")
"""The loss terms whose gradients are traced: CE, ``lambda_w * BR_W``, ``lambda_a * BR_A``."""
PUSHES = TERMS + ("decay",)
"""Everything a step size's optimizer input is the sum of: the loss terms and the weight
decay (``brjax.training.optim``: ``g + weight_decay * alpha``, with ``decay_alphas``)."""


def decay_gradients(config: Config, values: dict[str, float],
                    labels: dict[str, str]) -> dict[str, float]:
  """``{path: optim.decay_rate(config, labels[path]) * values[path]}``: the coupled weight
  decay that ``brjax.training.optim`` adds to the gradient of a parameter of mean value
  ``values[path]`` and optimizer label ``labels[path]`` before the optimizer, as PyTorch's
  ``weight_decay`` does (for step sizes: ``weight_decay * alpha`` under ``decay_alphas``)."""
  return {path: optim.decay_rate(config, labels[path]) * value
          for path, value in values.items()}


def term_gradients(state: TrainState, batch: dict, br) -> dict[str, Any]:
  """``{term: gradient pytree like state.params}`` of CE, ``br.lambda_w * BR_W`` and
  ``br.lambda_a * BR_A`` at ``state`` on ``batch`` (their sum is the training step's
  gradient)."""
  def terms(params):
    parts, _, _ = loss_terms(state, params, batch, br)
    return jnp.stack([parts["ce"], br.lambda_w * parts["br_w"], br.lambda_a * parts["br_a"]])

  jacobian = jax.jacrev(terms)(state.params)  # every leaf: (3, *leaf.shape)
  return {term: jax.tree.map(lambda g, i=i: g[i], jacobian) for i, term in enumerate(TERMS)}


@dataclasses.dataclass(frozen=True)
class Sample:
  """The traced step sizes before training step ``step`` (0: the checkpoint's state):
  ``values[path]`` and ``grads[path][push]`` for each of ``PUSHES``, each the mean over
  the step size's channels (a per-tensor step size is one number)."""
  step: int
  values: dict[str, float]
  grads: dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Trace:
  """A trace: where it starts, what it trained with, its samples and the values at its end."""
  workdir: str
  epoch: int  # the checkpoint's epoch; the traced steps are the first of epoch + 1
  phase: str
  config: Config  # the run's config with the overrides: what the steps trained with
  samples: list[Sample]
  end_values: dict[str, float]  # after the last traced step
  steps: int


def step_size_paths(params: Any, layers: str | None) -> list[str]:
  """The ``/``-joined paths of the step sizes in ``params`` that ``layers`` (a regex,
  ``re.search``; None: every one) selects, in parameter order. A log step size is matched
  by its alpha's name too (``.../alpha`` selects ``.../log_alpha``), so one selection serves
  both parametrizations.

  Raises:
    ValueError: ``layers`` selects none (naming the step sizes there are).
  """
  every = ["/".join(path) for path in flax.traverse_util.flatten_dict(params)
           if quant.is_alpha_path(path)]
  as_alpha = lambda p: "/".join([*p.split("/")[:-1], step_size.linear_name(p.split("/")[-1])])
  chosen = [p for p in every
            if layers is None or re.search(layers, p) or re.search(layers, as_alpha(p))]
  if not chosen:
    raise ValueError(f"--layers={layers} is not accepted: it selects no step size; the run's "
                     f"are {', '.join(every)}")
  return chosen


def run_config(meta: dict, overrides: dict[str, Any]) -> tuple[Config, Config]:
  """``(the run's Config, the traced Config)`` from a checkpoint's meta; ``overrides`` may
  change BR-phase fields only (the others would not be the run's steps).

  Raises:
    ValueError: a field outside ``BR_PHASE_FIELDS``, or a meta without a config.
  """
  saved = meta.get("config")
  if not isinstance(saved, dict):
    raise ValueError("the checkpoint's meta has no config: it was not written by "
                     "brjax.training.train")
  fields = {f.name for f in dataclasses.fields(Config)}
  config = Config(**{k: v for k, v in saved.items() if k in fields})
  bad = sorted(set(overrides) - BR_PHASE_FIELDS)
  if bad:
    raise ValueError(f"--{bad[0]} is not accepted as an override: only the BR-phase fields "
                     f"({', '.join(sorted(BR_PHASE_FIELDS))}) may differ from the run's")
  return config, dataclasses.replace(config, **overrides)


def check_overrides_act(phase: str, overrides: dict[str, Any]) -> None:
  """Raises ValueError when BR-phase overrides are given for a phase where they do nothing
  (a warmup epoch): the trace would show BR terms of 0 that were never computed."""
  if overrides and phase != BR:
    raise ValueError(f"--{sorted(overrides)[0]} is not accepted here: the traced epoch is a "
                     f"{phase} epoch, where BR flags do nothing; use --epoch at or after the "
                     "end of the warmup")


def _means(tree: Any, paths: list[str], as_alpha: bool = False) -> dict[str, float]:
  """The mean of each path's leaf; with ``as_alpha``, of ``alpha = exp(theta)`` for a
  ``log`` step size's."""
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  value = lambda p: step_size.alpha_of(tuple(p.split("/")), flat[p]) if as_alpha else flat[p]
  return {p: float(np.mean(np.asarray(value(p), np.float64))) for p in paths}


def trace(workdir: str, *, epoch: int | None = None, steps: int = 100, every: int = 5,
          layers: str | None = None, overrides: dict[str, Any] | None = None,
          data_dir: str | None = None, devices=None,
          log: Callable[[Sample], None] = lambda sample: None) -> Trace:
  """Trains ``steps`` steps from a run's checkpoint of ``epoch`` (None: its latest), as the
  run trains its next epoch (same batches, phase, optimizer and frozen step sizes; with
  ``overrides`` of BR-phase fields), and samples the step sizes that ``layers`` selects
  before step 0, ``every``, ``2 * every``, ...; writes nothing.

  Args:
    workdir: the ``--workdir`` of a ``scripts/train.py`` run.
    epoch: a kept checkpoint's epoch (``checkpoints/latest`` keeps the last two).
    steps, every: steps to train (at most one epoch's), and the sampling interval.
    layers: regex on step-size paths (``BasicBlock_0/QuantReLU_1/alpha``); None: all.
    overrides: BR-phase Config fields to trace with instead of the run's, e.g.
      ``{"abr_clipped": "exclude"}`` (the same warmup, another BR).
    data_dir: the run's images, if not at its ``--data_dir`` any more.
    devices: the devices to shard the batch over (default: all).
    log: called with each sample as it is taken.

  Raises:
    CheckpointError: no such checkpoint. ValueError: bad arguments, or a checkpoint at the
    run's last epoch (no next epoch to trace).
  """
  saved, meta = checkpoint.peek_latest(workdir)
  if saved is None:
    raise checkpoint.CheckpointError(f"--workdir={workdir} has no checkpoints/latest: use the "
                                     "--workdir of a training run that saved an epoch")
  config, traced = run_config(meta, overrides or {})
  start = saved if epoch is None else epoch
  if start >= config.epochs:
    raise ValueError(f"--epoch={start} is not accepted: the run has {config.epochs} epochs, "
                     "so none follows it to trace; use an earlier kept checkpoint")
  ds = datasets.load(config, data_dir=data_dir, stats=datasets.stored_stats(meta))
  steps_per_epoch = streaming.num_train_steps(ds, config.batch_size)
  if not 1 <= steps <= steps_per_epoch or every < 1:
    raise ValueError(f"--steps={steps} --every={every} is not accepted: use 1 <= steps <= "
                     f"{steps_per_epoch} (one epoch) and every >= 1")
  model = train.create_model(config, ds.num_classes, ds.image_size)
  # The structure to restore into (no pretrained weights to load: all are restored).
  target = train.create_train_state(dataclasses.replace(config, pretrained=None), model, ds,
                                    steps_per_epoch)
  state, _ = checkpoint.restore_epoch(workdir, start, target)
  phase = phase_of(traced, start + 1)
  check_overrides_act(phase, overrides or {})
  abr_sites = None
  if phase == BR and traced.lambda_a > 0:
    variables = state.variables()
    abr_sites = select_abr_sites(traced, activation_sites(
        model, variables, jnp.asarray(next(streaming.train_batches(
            ds, config.batch_size, seed=config.seed, epoch=start + 1))["image"])))
  br = br_settings(traced, phase, abr_sites, steps_per_epoch)
  if phase == BR:  # as train._enter_phase: the BR optimizer freezes the chosen step sizes
    state = state.replace(tx=optim.create_optimizer(traced, steps_per_epoch,
                                                    optim.frozen_labels(traced)))
  paths = step_size_paths(state.params, layers)
  labels = flax.traverse_util.flatten_dict(optim.param_labels(state.params), sep="/")
  topology = Topology.create(devices)
  state = jax.device_put(state, topology.replicated)
  step_fn = jit_train_step(topology, br)
  grads_fn = jax.jit(functools.partial(term_gradients, br=br))
  batches = device_batches(streaming.train_batches(ds, config.batch_size, seed=config.seed,
                                                   epoch=start + 1),
                           topology, local=datasets.is_streamed(ds))
  samples = []
  for i, batch in zip(range(steps), batches):
    if i % every == 0:
      grads = jax.device_get(grads_fn(state, batch))
      params = jax.device_get(state.params)
      values = _means(params, paths, as_alpha=True)
      by_term = {t: _means(grads[t], paths) for t in TERMS}
      by_term["decay"] = decay_gradients(traced, _means(params, paths), labels)
      sample = Sample(i, values, {p: {t: by_term[t][p] for t in PUSHES} for p in paths})
      samples.append(sample)
      log(sample)
    state, _ = step_fn(state, batch)
  return Trace(workdir, start, phase, traced, samples,
               _means(jax.device_get(state.params), paths, as_alpha=True), steps)


def format_sample(sample: Sample) -> list[str]:
  """One line per step size: ``step  path  value  CE  BR_W  BR_A  decay``."""
  return [f"{sample.step:>5}  {path}  {value:+.4f}  " + "  ".join(
      f"{sample.grads[path][t]:+.2e}" for t in PUSHES) for path, value in sample.values.items()]


def format_summary(result: Trace) -> list[str]:
  """Per step size: its value at the start and the end, the mean of each push's gradient
  (``PUSHES``) over the samples, and at how many samples each was positive (lowers the step
  size)."""
  lines = []
  n = len(result.samples)
  for path, end in result.end_values.items():
    start = result.samples[0].values[path]
    parts = []
    for term in PUSHES:
      grads = [s.grads[path][term] for s in result.samples]
      positive = sum(g > 0 for g in grads)
      parts.append(f"{term} {np.mean(grads):+.1e} (> 0 at {positive}/{n})")
    lines.append(f"{path}: {start:.4f} -> {end:.4f} in {result.steps} steps; mean gradient "
                 + ", ".join(parts))
  return lines
