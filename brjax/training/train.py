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

import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Callable

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from brjax.training import checkpoint
from brjax.data import datasets
from brjax.training import history
from brjax.quant import metrics
from brjax.training import optim
from brjax.quant import lsq as quant
from brjax.training import report
from brjax.training import run_control
from brjax.training import run_start
from brjax.data import streaming
from brjax.training import tensorboard as summary
from brjax.training.config import Config
# Imported by name: the loop uses them, and they are brjax.training.train's public names too.
# pylint: disable=unused-import
from brjax.training.evaluation import evaluate, evaluate_run
from brjax.training.parallel import Topology, device_batches, jit_eval_step, jit_train_step
from brjax.training.run_control import (Interrupted, RunClock, StopOnSigint, StopRequested,
                               format_duration)
from brjax.training.steps import (BR, FLOAT, WARMUP, BRSettings, TrainState, activation_sites,
                         br_settings, eval_step, phase_of, select_abr_sites, train_step)
from brjax.training.state import (_first_batch, _load_pretrained, create_model,
                                  create_train_state)
# pylint: enable=unused-import


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
                       stop_after_epoch: int | None = None) -> dict:
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
  continues.

  Raises:
    Interrupted: Ctrl-C (SIGINT, in the main thread) stopped the run between two steps;
      the checkpoints of the finished epochs are kept.
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
  state, start_epoch, best_acc = _restore_or_start(run, ckpts, state, saved_epoch)
  probe = _probe_batch(run)  # for quant metrics
  abr_sites, abr_line = _abr_sites(run, state, probe)
  log(report.banner(config, run.topology, run.ds, abr_line))

  eval_fn = jit_eval_step(run.topology, run.model.apply)
  quant_fn = jax.jit(functools.partial(metrics.quant_metrics, run.model))
  writer = summary.create_writer(workdir) if tensorboard and is_chief else None
  schedule = optim.learning_rate_schedule(config, run.steps_per_epoch)
  clock, step_fns, last = RunClock(last_epoch, run.steps_per_epoch), {}, {}
  try:
    with StopOnSigint() as stop:
      for epoch in range(start_epoch + 1, last_epoch + 1):
        phase = phase_of(config, epoch)
        state, step_fn, compiles = _enter_phase(run, state, epoch, phase, step_fns, abr_sites)
        start, lr = time.time(), float(schedule(int(state.step)))
        state, m = _train_epoch(run, step_fn, state, epoch, clock, stop.check, compiles)
        run_control.check_finite(epoch, m, ckpts.latest_epoch())
        run_control.check_step_sizes(epoch, _smallest_step_sizes(state), ckpts.latest_epoch())
        m.update(epoch=epoch, phase=phase, step=int(state.step), lr=lr)
        _mark_terms_not_computed(m, config, phase)
        m.update(_evaluate_epoch(run, eval_fn, quant_fn, state, probe, clock, stop.check))
        is_best, best_acc = m["test_acc"] > best_acc, max(best_acc, m["test_acc"])
        m.update(best_test_acc=best_acc, epoch_time_s=time.time() - start)
        _save_epoch(run, ckpts, state, m, is_best)
        _write_summaries(run, writer, state, m, probe, histogram_every)
        log(report.format_epoch_line(m, config.epochs) + report.time_note(m, clock))
        last = m
        if epoch < last_epoch:
          stop.check()
  except StopRequested:
    raise Interrupted(workdir, ckpts.latest_epoch()) from None
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


def _smallest_step_sizes(state: TrainState) -> dict[str, float]:
  """``{path: smallest entry}`` of every step size (``alpha``, ``input_alpha``) in ``state``."""
  flat = flax.traverse_util.flatten_dict(state.params)
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
  ds = datasets.load(config, stats=meta.get("data"))
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
                      saved_epoch: int | None) -> tuple[TrainState, int, float]:
  """``(state on the devices, last finished epoch, best test accuracy)`` to start from.

  Resuming restores the latest checkpoint into ``state`` and drops the metrics lines past
  it (a run killed between its log line and its save); a fresh start removes the
  metrics.jsonl of a run that never saved a checkpoint.
  """
  start_epoch, best_acc = 0, 0.0
  if saved_epoch is not None:
    state, meta = ckpts.restore_latest(state, run.config)
    start_epoch, best_acc = meta["epoch"], meta["best_test_acc"]
    if run.is_chief:
      history.truncate_history(run.workdir, start_epoch)
    run.log(f"Resumed from {run.workdir} at epoch {start_epoch} "
            f"(best test acc {best_acc:.2f}%)")
  elif run.is_chief and os.path.exists(history.metrics_path(run.workdir)):
    os.remove(history.metrics_path(run.workdir))  # metrics of a run that never saved a checkpoint
  return jax.device_put(state, run.topology.replicated), start_epoch, best_acc


def _abr_sites(run: _Run, state: TrainState,
               probe: dict) -> tuple[list[str] | None, str | None]:
  """The activation sites A-BR sums over (None: every one) and the banner's line on them
  (None when the run has no A-BR)."""
  if not br_settings(run.config, BR).lambda_a > 0:
    return None, None
  every = activation_sites(run.model,
                           {"params": state.params, "batch_stats": state.batch_stats},
                           jnp.asarray(probe["image"]))
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
    step_fns[phase] = jit_train_step(run.topology, br_settings(config, phase, abr_sites))
  return state, step_fns[phase], compiles


def _train_epoch(run: _Run, step_fn: Callable, state: TrainState, epoch: int,
                 clock: RunClock, check: Callable[[], None] = lambda: None,
                 compiles: bool = False) -> tuple[TrainState, dict]:
  """One epoch of training steps; returns the state and the epoch's mean metrics.

  The per-step metrics stay on the device until the epoch ends. Step 1 (which compiles
  the step on its first use: ``compiles`` says so on the terminal) runs before the progress
  bar starts, so that the bar's rate is that of ordinary steps; after that the loop waits
  for step ``i - 1`` once step ``i`` is dispatched (one step in flight, no idle device), so
  the bar counts computed steps, not dispatched ones. Its postfix is the time left in the
  whole run. ``check()`` runs after every step (``StopOnSigint.check``).
  """
  config = run.config
  desc = f"Epoch {epoch}/{config.epochs}"
  batches = iter(device_batches(
      streaming.train_batches(run.ds, config.batch_size, seed=config.seed, epoch=epoch),
      run.topology, local=datasets.is_streamed(run.ds)))
  with tqdm.tqdm(desc=f"{desc}: compiling the step", bar_format="{desc} ({elapsed})",
                 leave=False, file=sys.stderr, disable=not compiles):
    state, first = step_fn(state, next(batches))
    jax.block_until_ready(first)
  check()
  sums, step_times, last = [first], [], time.perf_counter()
  with tqdm.tqdm(total=run.steps_per_epoch, initial=1, desc=desc, leave=False,
                 file=sys.stderr, mininterval=2.0, unit="step") as bar:
    for batch in batches:
      state, step_metrics = step_fn(state, batch)
      if len(sums) > 1:  # wait for the previous step (step 1 is done)
        jax.block_until_ready(sums[-1])
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
      sums.append(step_metrics)
      if step_times:
        left = clock.seconds_left(epoch, len(sums), statistics.median(step_times[-50:]))
        bar.set_postfix_str(f"run: {format_duration(left)} left", refresh=False)
      bar.update()
      check()
  return state, _epoch_means(sums, step_times)


def _epoch_means(sums: list[dict], step_times: list[float]) -> dict:
  """The epoch's training metrics from the per-step sums: means over its images, and the
  median step time (None with a single step)."""
  total = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
  count = total["count"]
  return {"train_acc": 100.0 * total["correct"] / count,
          "train_loss": total["loss"] / count, "ce": total["ce"] / count,
          "br_w": total["br_w"] / count, "br_a": total["br_a"] / count,
          "step_time_s": statistics.median(step_times) if step_times else None}


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
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  start = time.time()
  m = evaluate(eval_fn, variables, run.ds, run.config.batch_size, run.topology, check)
  clock.eval_s = time.time() - start
  if run.config.quantized:
    m["quant"] = metrics.to_python(quant_fn(variables, probe))
    m["br_summary"] = metrics.reference_summary(m["quant"])  # the reference's averages
  return m


def _save_epoch(run: _Run, ckpts: checkpoint.RunCheckpoints, state: TrainState, m: dict,
                is_best: bool) -> None:
  """Appends the epoch's metrics line (process 0) and saves its checkpoint, with the meta
  that resume and ``evaluate_run`` read: the config and the data's normalization."""
  if run.is_chief:
    history.append_record(run.workdir, m)
  ds = run.ds
  ckpts.save(m["epoch"], jax.device_get(state),
             {"epoch": m["epoch"], "phase": m["phase"], "best_test_acc": m["best_test_acc"],
              "config": dataclasses.asdict(run.config),
              "data": {"mean": ds.mean.tolist(), "std": ds.std.tolist(),
                       "class_names": list(ds.class_names), "image_size": ds.image_size},
              **({"branched_from": run.branched_from} if run.branched_from else {})},
             is_best=is_best)


def _write_summaries(run: _Run, writer, state: TrainState, m: dict, probe: dict,
                     histogram_every: int) -> None:
  """TensorBoard scalars every epoch; histograms every ``histogram_every`` and at the last."""
  if writer is None:
    return
  epoch = m["epoch"]
  summary.write_scalars(writer, epoch, m, state.params)
  if epoch % histogram_every == 0 or epoch == run.config.epochs:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    summary.write_histograms(writer, epoch, state.params,
                             metrics.recorded_sites(run.model, variables, probe["image"]))
  writer.flush()
