"""Two-stage QAT+BR training: the loop over epochs.

``train_and_evaluate`` runs (or resumes) a whole run: setup (data, model, state, resume),
then per epoch: the phase switch, training, evaluation, the log line, the checkpoint.
The parts it calls live next door:

  brjax.training.state         the run's model and its first state (LSQ init, --pretrained)
  brjax.training.steps         TrainState, the phases (WARMUP, BR, FLOAT), train_step, eval_step
  brjax.training.parallel      the device mesh, the jitted steps, the batches on the devices
  brjax.training.evaluation    evaluate (a test split), evaluate_run (a run's checkpoint)
  brjax.training.report        the banner and the log lines
  brjax.training.run_start     where a run starts: a new workdir, --resume, --branch_from
  brjax.training.run_control   Ctrl-C at a safe point (Interrupted), the clock of the time left
  brjax.training.history       the run's metrics.jsonl

Their public names stay importable from here (``brjax.training.train.TrainState``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import os
import time

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from brjax.data import datasets, streaming
from brjax.quant import lsq as quant
from brjax.quant import metrics, step_size
from brjax.training import checkpoint, health, history, optim, report, run_control, run_start
from brjax.training import epoch as epoch_lib
from brjax.training import tensorboard as summary
from brjax.training.config import Config
from brjax.training.epoch import SaveEvery

# Imported by name: the loop uses some, and all are brjax.training.train's public names too.
# pylint: disable=unused-import
from brjax.training.evaluation import evaluate, evaluate_run  # noqa: F401
from brjax.training.parallel import (  # noqa: F401
  Topology,
  device_batches,
  jit_eval_step,
  jit_train_step,
)
from brjax.training.run_control import Interrupted, RunClock, StopOnSignal, StopRequested
from brjax.training.state import (  # noqa: F401
  _first_batch,
  _load_pretrained,
  create_model,
  create_train_state,
)
from brjax.training.steps import (  # noqa: F401
  BR,
  FLOAT,
  WARMUP,
  BRSettings,
  TrainState,
  activation_sites,
  br_settings,
  eval_step,
  phase_of,
  select_abr_sites,
  train_step,
)

# pylint: enable=unused-import

_NO_MID_EPOCH_SAVES = SaveEvery()  # epoch ends and signals only


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the loop's helpers share: the parts of a run fixed at its setup."""
  config: Config
  workdir: str
  ds: datasets.Dataset
  topology: Topology
  model: flax.linen.Module
  steps_per_epoch: int
  is_chief: bool  # process 0, which alone logs and writes metrics (multi-host)
  log: Callable[[str], None]
  branched_from: dict | None = None  # the warmup run it branched from (run_start)


def train_and_evaluate(config: Config, workdir: str, *, resume: bool = False,
                       devices=None, log: Callable[[str], None] = print,
                       tensorboard: bool = False, histogram_every: int = 5,
                       branch_from: str | None = None,
                       stop_after_epoch: int | None = None,
                       save_every: SaveEvery = _NO_MID_EPOCH_SAVES) -> dict:
  """Runs (or resumes) a whole training run; returns the last epoch's metrics.

  Writes ``<workdir>/metrics.jsonl`` (one JSON object per epoch, with per-layer
  quantization metrics under ``"quant"`` and the reference's layer averages under
  ``"br_summary"``) and the checkpoints of ``brjax.training.checkpoint``;
  with ``tensorboard``, event files under ``<workdir>/tensorboard`` (histograms every
  ``histogram_every`` epochs and at the last). Nothing is written before the data are
  loaded. Without ``resume``, a workdir that already holds checkpoints is an error (nothing
  is overwritten); with it, a finished run returns its last metrics at once, and a workdir
  without checkpoints starts from epoch 1 (both say so).

  ``branch_from``: a workdir without checkpoints starts from that warmup run's checkpoint
  instead of epoch 1 (``brjax.training.run_start``: its config may differ only in BR-phase fields,
  its checkpoint must be at or before the end of the warmup); the metrics are those of
  the same run from scratch. ``stop_after_epoch``: return after that epoch (a warmup to
  branch from: ``stop_after_epoch=config.warmup_epochs``), leaving a run that ``resume``
  continues. ``save_every``: mid-epoch checkpoints (``brjax.training.epoch``); a resume
  continues from the newest checkpoint, mid-epoch or not, and gives the metrics of the
  uninterrupted run.

  Raises:
    Interrupted: Ctrl-C (SIGINT) or SIGTERM (in the main thread) stopped the run after a
      step, or during an evaluation, and a mid-epoch checkpoint of that point was saved.
  """
  last_epoch = config.epochs if stop_after_epoch is None else stop_after_epoch
  if not 1 <= last_epoch <= config.epochs:
    raise ValueError(f"--stop_after_epoch={stop_after_epoch} is not accepted: use an integer "
                     f"in 1..{config.epochs} (--epochs={config.epochs})")
  # With several processes (multi-host), process 0 alone logs and writes metrics;
  # orbax coordinates the checkpoint writes of all processes itself.
  is_chief = jax.process_index() == 0
  log = log if is_chief else lambda _: None
  start = run_start.check_workdir(config, workdir, resume, log, branch_from)
  saved_epoch, meta = start.epoch, start.meta
  if start.branch_from is None and saved_epoch is not None and saved_epoch >= last_epoch:
    return run_start.nothing_left(config, workdir, meta, log, stop_after_epoch)

  run = _setup(config, workdir, devices, is_chief, log, meta)
  state = create_train_state(config, run.model, run.ds, run.steps_per_epoch)
  if start.branch_from is not None:
    if is_chief:
      run_start.copy_branch(start, config, workdir, log)
    if jax.process_count() > 1:  # the others restore what process 0 copied
      multihost_utils.sync_global_devices("brjax.training.run_start.copy_branch")
  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpoint.RunCheckpoints(workdir)
  state, start_epoch, best_acc, mid_epoch = _restore_or_start(run, ckpts, state, saved_epoch)
  probe = _probe_batch(run)  # for quant metrics
  abr_sites, abr_line = _abr_sites(run, state, probe)
  log(report.banner(config, run.topology, run.ds, abr_line))

  eval_fn = jit_eval_step(run.topology, run.model.apply)
  quant_fn = jax.jit(functools.partial(metrics.quant_metrics, run.model))
  writer = summary.create_writer(workdir) if tensorboard and is_chief else None
  schedule = optim.learning_rate_schedule(config, run.steps_per_epoch)
  clock, step_fns, last = RunClock(last_epoch, run.steps_per_epoch), {}, {}
  first_quant = (health.first_epoch_quant(history.read_history(workdir, missing_ok=True))
                 if start_epoch > 0 and is_chief else None)
  try:
    with StopOnSignal() as stop:
      control = epoch_lib.Control(stop, save_every, functools.partial(_save_mid_epoch, run,
                                                                      ckpts, best_acc))
      for epoch in range(start_epoch + 1, last_epoch + 1):
        phase = phase_of(config, epoch)
        state, step_fn, compiles = _enter_phase(run, state, epoch, phase, step_fns, abr_sites)
        lr = float(schedule((epoch - 1) * run.steps_per_epoch))
        start = time.time()
        state, sums, step_times = epoch_lib.train_epoch(run, step_fn, state, epoch, clock,
                                                        control, compiles, mid_epoch)
        mid_epoch = None
        m = epoch_lib.epoch_means(sums, step_times)
        run_control.check_finite(epoch, m, ckpts.latest_epoch())
        run_control.check_step_sizes(epoch, _smallest_step_sizes(state), ckpts.latest_epoch())
        m.update(epoch=epoch, phase=phase, step=int(state.step), lr=lr)
        _mark_terms_not_computed(m, config, phase)
        m.update(_evaluate_epoch(run, eval_fn, quant_fn, state, probe, clock,
                                 epoch_lib.evaluation_check(control, state, epoch, sums)))
        is_best, best_acc = m["test_acc"] > best_acc, max(best_acc, m["test_acc"])
        control = epoch_lib.Control(stop, save_every, functools.partial(
            _save_mid_epoch, run, ckpts, best_acc))
        m.update(best_test_acc=best_acc, epoch_time_s=time.time() - start)
        first_quant = _add_health(run, m, first_quant)
        _save_epoch(run, ckpts, state, m, is_best)
        _write_summaries(run, writer, state, m, probe, histogram_every)
        log(report.format_epoch_line(m, config.epochs) + report.time_note(m, clock))
        for line in health.warnings(m.get("step_size_health", {})):
          log(line)
        last = m
        if epoch < last_epoch:
          control.check()
  except StopRequested as e:
    ckpts.wait()
    step_epoch, step_meta = ckpts.latest_step_meta()
    saved = ckpts.latest_epoch()
    position = None
    if step_epoch is not None and step_meta["epoch"] > (saved or 0):
      position = (step_meta["epoch"], step_meta["input"]["step_in_epoch"])
    raise Interrupted(workdir, saved, position, e.signal) from None
  except KeyboardInterrupt:  # a second Ctrl-C, maybe within a save: drop what it left
    ckpts.remove_unfinished()
    raise
  finally:
    ckpts.close()
    if writer is not None:
      writer.close()
  if last:
    log(f"Best Test Acc={best_acc:.2f}%; checkpoints in {os.path.join(workdir, 'checkpoints')}")
  if last_epoch < config.epochs:
    log(f"Stopped after epoch {last_epoch} (--stop_after_epoch): continue with --resume, or "
        f"branch runs from it with --branch_from={workdir}")
  return last


def _add_health(run: _Run, m: dict, first_quant: dict | None) -> dict | None:
  """Adds ``step_size_health`` to a quantized run's epoch record (``brjax.training.health``);
  returns the first epoch's ``quant`` metrics, the reference (this one's in epoch 1)."""
  if "quant" not in m:
    return first_quant
  first_quant = first_quant or m["quant"]
  m["step_size_health"] = health.step_size_health(m["quant"], first_quant)
  return first_quant


def _smallest_step_sizes(state: TrainState) -> dict[str, float]:
  """``{path: smallest entry}`` of every step size (``alpha``, ``input_alpha``; a ``log``
  one as ``alpha = exp(theta)``, under its linear name) in ``state``."""
  flat = step_size.linear_params(flax.traverse_util.flatten_dict(state.params))
  step_sizes = jax.device_get({path: value for path, value in flat.items()
                               if quant.is_alpha_path(path)})  # one transfer
  return {"/".join(path): float(np.min(value)) for path, value in step_sizes.items()}


def _probe_batch(run: _Run) -> dict:
  """The first test batch (whole on every process): what the per-layer metrics see."""
  batches = streaming.eval_batches(run.ds, run.config.batch_size)
  try:
    return next(batches)
  finally:
    batches.close()


def _setup(config: Config, workdir: str, devices, is_chief: bool,
           log: Callable[[str], None], meta: dict) -> _Run:
  """Loads the data, checks the batch size against it and the devices, creates the model.

  A resumed run (``meta`` of its checkpoint) keeps its normalization statistics and
  its ``branched_from``.

  Writes nothing: a data or flag error leaves no workdir behind.
  """
  ds = datasets.load(config, stats=datasets.stored_stats(meta))
  steps_per_epoch = streaming.num_train_steps(ds, config.batch_size)
  if steps_per_epoch < 1:
    raise ValueError(f"--batch_size={config.batch_size} is not accepted: the training set "
                     f"has only {streaming.num_examples(ds, 'train')} images")
  topology = Topology.create(devices)
  if config.batch_size % topology.mesh.size:
    raise ValueError(f"--batch_size={config.batch_size} is not accepted: use a multiple of "
                     f"the {topology.mesh.size} devices")
  model = create_model(config, ds.num_classes, ds.image_size)
  return _Run(config, workdir, ds, topology, model,
              steps_per_epoch, is_chief, log, meta.get("branched_from"))


def _restore_or_start(run: _Run, ckpts: checkpoint.RunCheckpoints, state: TrainState,
                      saved_epoch: int | None
                      ) -> tuple[TrainState, int, float, epoch_lib.MidEpoch | None]:
  """``(state on the devices, last finished epoch, best test accuracy, position in the
  epoch after it or None)`` to start from.

  Resuming restores the newest checkpoint into ``state``: the mid-epoch one if it is past
  the latest epoch's, else the latest epoch's; and drops the metrics lines past the last
  finished epoch (a run killed between its log line and its save). A fresh start removes
  the metrics.jsonl of a run that never saved a checkpoint.
  """
  start_epoch, best_acc, mid_epoch = 0, 0.0, None
  step, step_meta = ckpts.latest_step_meta()
  if step is not None and step_meta["epoch"] > (saved_epoch or 0):
    state, partial, meta = ckpts.restore_step(state, run.config)
    where = meta["input"]
    mid_epoch = epoch_lib.MidEpoch(where["epoch"], where["step_in_epoch"],
                                   {k: np.asarray(v) for k, v in partial.items()},
                                   where.get("iterator"))
    start_epoch, best_acc = mid_epoch.epoch - 1, meta["best_test_acc"]
    run.log(f"Resumed from {run.workdir} at epoch {mid_epoch.epoch} step {mid_epoch.step} of "
            f"{run.steps_per_epoch} (global step {step}; best test acc {best_acc:.2f}%)")
  elif saved_epoch is not None:
    state, meta = ckpts.restore_latest(state, run.config)
    start_epoch, best_acc = meta["epoch"], meta["best_test_acc"]
    run.log(f"Resumed from {run.workdir} at epoch {start_epoch} "
            f"(best test acc {best_acc:.2f}%)")
  if run.is_chief and (mid_epoch is not None or saved_epoch is not None):
    history.truncate_history(run.workdir, start_epoch)
  elif run.is_chief and os.path.exists(history.metrics_path(run.workdir)):
    os.remove(history.metrics_path(run.workdir))  # metrics of a run that never saved a checkpoint
  return jax.device_put(state, run.topology.replicated), start_epoch, best_acc, mid_epoch


def _abr_sites(run: _Run, state: TrainState,
               probe: dict) -> tuple[list[str] | None, str | None]:
  """The activation sites A-BR sums over (None: every one) and the banner's line on them
  (None when the run has no A-BR)."""
  if not br_settings(run.config, BR).lambda_a > 0:
    return None, None
  every = activation_sites(run.model, state.variables(), jnp.asarray(probe["image"]))
  chosen = select_abr_sites(run.config, every)
  line = (f"all {len(every)}" if chosen is None else
          f"{len(chosen)} of {len(every)}: {', '.join(chosen)}")
  return chosen, line


def _enter_phase(run: _Run, state: TrainState, epoch: int, phase: str, step_fns: dict,
                 abr_sites: list[str] | None) -> tuple[TrainState, Callable, bool]:
  """The state and jitted step for ``phase`` (that of ``epoch``), and whether that step is
  new (its first call compiles it). ``step_fns`` caches the steps by phase.

  Entering BR (after the warmup, or on a resume past it) swaps in the optimizer that
  freezes the chosen step sizes; the switch after the warmup is announced.
  """
  config = run.config
  if phase == BR and phase not in step_fns:
    if epoch == config.warmup_epochs + 1:
      run.log(report.freeze_banner(config))
    state = state.replace(tx=optim.create_optimizer(config, run.steps_per_epoch,
                                                    optim.frozen_labels(config)))
  compiles = phase not in step_fns
  if compiles:
    step_fns[phase] = jit_train_step(run.topology, br_settings(config, phase, abr_sites,
                                                               run.steps_per_epoch))
  return state, step_fns[phase], compiles


def _mark_terms_not_computed(m: dict, config: Config, phase: str) -> None:
  """``br_w`` / ``br_a`` are None, not zero, in a phase whose loss leaves them out."""
  settings = br_settings(config, phase)
  if settings.lambda_w == 0:
    m["br_w"] = None
  if settings.lambda_a == 0:
    m["br_a"] = None


def _evaluate_epoch(run: _Run, eval_fn: Callable, quant_fn: Callable, state: TrainState,
                    probe: dict, clock: RunClock, check: Callable[[], None]) -> dict:
  """Test accuracy and loss (timed for the clock); for a quantized run, per-layer
  quantization metrics on ``probe`` (the first test batch) and the reference's averages."""
  variables = state.variables()
  start = time.time()
  m = evaluate(eval_fn, variables, run.ds, run.config.batch_size, run.topology, check)
  clock.eval_s = time.time() - start
  if run.config.quantized:
    m["quant"] = metrics.to_python(quant_fn(variables, probe))
    m["br_summary"] = metrics.reference_summary(m["quant"])  # the reference's averages
  return m


def _meta(run: _Run, epoch: int, phase: str, best_test_acc: float) -> dict:
  """A checkpoint's meta: what resume and ``evaluate_run`` read (the config and the data's
  normalization)."""
  ds = run.ds
  return {"epoch": epoch, "phase": phase, "best_test_acc": best_test_acc,
          "config": dataclasses.asdict(run.config),
          "data": {"mean": ds.mean.tolist(), "std": ds.std.tolist(),
                   "class_names": list(ds.class_names), "image_size": ds.image_size},
          **({"branched_from": run.branched_from} if run.branched_from else {})}


def _save_epoch(run: _Run, ckpts: checkpoint.RunCheckpoints, state: TrainState, m: dict,
                is_best: bool) -> None:
  """Appends the epoch's metrics line (process 0) and saves its checkpoint."""
  if run.is_chief:
    history.append_record(run.workdir, m)
  ckpts.save(m["epoch"], jax.device_get(state),
             _meta(run, m["epoch"], m["phase"], m["best_test_acc"]), is_best=is_best)


def _save_mid_epoch(run: _Run, ckpts: checkpoint.RunCheckpoints, best_acc: float,
                    position: epoch_lib.MidEpoch, state: TrainState) -> None:
  """Saves a mid-epoch checkpoint: the state, the epoch's per-step metrics so far, and the
  input's position in its meta."""
  meta = {**_meta(run, position.epoch, phase_of(run.config, position.epoch), best_acc),
          "input": position.input_meta()}
  ckpts.save_step(int(state.step), jax.device_get(state), position.partial, meta)


def _write_summaries(run: _Run, writer, state: TrainState, m: dict, probe: dict,
                     histogram_every: int) -> None:
  """TensorBoard scalars every epoch; histograms every ``histogram_every`` and at the last."""
  if writer is None:
    return
  epoch = m["epoch"]
  summary.write_scalars(writer, epoch, m, state.params)
  if epoch % histogram_every == 0 or epoch == run.config.epochs:
    variables = state.variables()
    summary.write_histograms(writer, epoch, state.params,
                             metrics.recorded_sites(run.model, variables, probe["image"]))
  writer.flush()
