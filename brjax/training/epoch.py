"""One training epoch: its steps, its running metrics, and the checkpoints taken inside it.

:func:`train_epoch` runs the steps of an epoch from any position in it, and returns the
per-step metrics (the epoch's means are :func:`epoch_means` of them). After every step,
:class:`Control` decides, the same way on every process (``run_control.agree``), whether
to save a mid-epoch checkpoint (``--checkpoint_every_steps``, ``--checkpoint_every_minutes``)
and whether to stop (a SIGINT or SIGTERM: ``StopOnSignal``). A stop saves the position
first, so a stopped run loses nothing: :class:`MidEpoch` is what such a checkpoint holds,
and a run resumed from it reads the batches, and sums the per-step metrics, that the
uninterrupted run does (the input pipelines are functions of (seed, epoch, step); the
per-step metrics are kept as the float32 values the steps returned), so its metrics are
the same, value for value.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
import tqdm

from brjax.data import datasets, streaming
from brjax.training import run_control
from brjax.training.parallel import device_batches
from brjax.training.run_control import RunClock, StopRequested, format_duration


@dataclasses.dataclass(frozen=True)
class SaveEvery:
  """When to save a mid-epoch checkpoint: every ``steps`` global steps, and after
  ``minutes`` without a save (0 turns either off). Epoch ends always save."""
  steps: int = 0
  minutes: float = 0.0


@dataclasses.dataclass(frozen=True)
class MidEpoch:
  """A position inside an epoch, as a mid-epoch checkpoint holds it.

  Attributes:
    epoch: the epoch in progress (1-based).
    step: its steps done, ``0 < step <= steps_per_epoch`` (``steps_per_epoch``: trained,
      not yet evaluated).
    partial: the per-step metrics of those steps, ``{name: (step,) array}`` (the dtypes
      the train step returned).
    iterator: the streamed input's iterator state (``BatchIterator.get_state``, JSON), or
      None for the in-memory input, whose position is ``step``.
  """
  epoch: int
  step: int
  partial: dict[str, np.ndarray]
  iterator: str | None = None

  def input_meta(self) -> dict:
    """The input's position, for the checkpoint's meta."""
    return {"epoch": self.epoch, "step_in_epoch": self.step, "iterator": self.iterator}


def stack_steps(sums: list[dict]) -> dict[str, np.ndarray]:
  """Per-step metric dicts (on the device or not) as ``{name: (steps,) array}``."""
  host = jax.device_get(sums)
  return {name: np.stack([np.asarray(s[name]) for s in host]) for name in host[0]}


def unstack_steps(partial: dict[str, np.ndarray]) -> list[dict]:
  """The inverse of :func:`stack_steps`: one dict of 0-d arrays per step."""
  count = len(next(iter(partial.values())))
  return [{name: np.asarray(values[i]) for name, values in partial.items()}
          for i in range(count)]


def epoch_means(sums: list[dict], step_times: list[float]) -> dict:
  """The epoch's training metrics from the per-step sums: means over its images, and the
  median step time (None with fewer than two timed steps)."""
  total = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
  count = total["count"]
  return {"train_acc": 100.0 * total["correct"] / count,
          "train_loss": total["loss"] / count, "ce": total["ce"] / count,
          "br_w": total["br_w"] / count, "br_a": total["br_a"] / count,
          "step_time_s": statistics.median(step_times) if step_times else None}


class Control:
  """The decisions taken after each step (and each evaluation batch), agreed by every
  process: stop (a signal was caught by ``stop``), or save a mid-epoch checkpoint.

  Args:
    stop: the run's ``StopOnSignal``.
    every: when to save without a stop.
    save: ``save(position, state)``: writes the mid-epoch checkpoint.
  """

  def __init__(self, stop: run_control.StopOnSignal, every: SaveEvery,
               save: Callable[[MidEpoch, Any], None]):
    self._stop, self._every, self._save = stop, every, save
    self._last_save = time.monotonic()

  def saved(self) -> None:
    """Restarts the clock of ``every.minutes`` (after any save, epoch ends included)."""
    self._last_save = time.monotonic()

  def save(self, position: MidEpoch, state: Any) -> None:
    """Saves a mid-epoch checkpoint of ``state`` at ``position`` now."""
    self._save(position, state)
    self.saved()

  def check(self) -> None:
    """Raises ``StopRequested`` if a process caught a signal (between evaluation batches)."""
    (stop,) = run_control.agree(self._stop.requested is not None)
    if stop:
      raise StopRequested(self._stop.requested or "SIGINT")

  def after_step(self, global_step: int, position: Callable[[], MidEpoch], state: Any,
                 epoch_end: bool = False) -> None:
    """Saves ``position()`` if a save is due (not at ``epoch_end``: the epoch's own save
    follows) or a stop requested; then raises ``StopRequested`` for a stop."""
    due_steps = self._every.steps > 0 and global_step % self._every.steps == 0
    due_time = (self._every.minutes > 0 and
                time.monotonic() - self._last_save >= 60.0 * self._every.minutes)
    stop, due = run_control.agree(self._stop.requested is not None,
                                  (due_steps or due_time) and not epoch_end)
    if stop or due:
      self.save(position(), state)
    if stop:
      raise StopRequested(self._stop.requested or "SIGINT")


def train_epoch(run: Any, step_fn: Callable, state: Any, epoch: int, clock: RunClock,
                control: Control, compiles: bool = False,
                resume: MidEpoch | None = None) -> tuple[Any, list[dict], list[float]]:
  """The training steps of ``epoch`` from its start, or from ``resume``'s position.

  The per-step metrics stay on the device until the epoch ends. The first step (which
  compiles the step on its first use: ``compiles`` says so on the terminal) runs before
  the progress bar starts, so that the bar's rate is that of ordinary steps; after that the
  loop waits for step ``i - 1`` once step ``i`` is dispatched (one step in flight, no idle
  device), so the bar counts computed steps, not dispatched ones. Its postfix is the time
  left in the whole run. ``control.after_step`` runs after every step.

  Args:
    run: the loop's ``_Run`` (config, ds, topology, steps_per_epoch).

  Returns:
    ``(state, per-step metrics of the whole epoch, step times measured in this call)``.
  """
  config, total = run.config, run.steps_per_epoch
  sums = unstack_steps(resume.partial) if resume else []
  if len(sums) >= total:  # stopped after training the epoch, before evaluating it
    return state, sums, []
  streamed = datasets.is_streamed(run.ds)
  raw = streaming.train_batches(run.ds, config.batch_size, seed=config.seed, epoch=epoch,
                                start_step=0 if streamed else len(sums))
  if streamed and resume is not None:
    raw.set_state(resume.iterator)  # the saved Grain position (checked: same epoch, seed...)
  batches = device_batches(raw, run.topology, local=streamed)
  step_base = int(state.step) - len(sums)  # the global step before the epoch's first

  def position() -> MidEpoch:
    iterator = raw.get_state(next_batch=len(sums)).decode() if streamed else None
    return MidEpoch(epoch, len(sums), stack_steps(sums), iterator)

  desc, step_times = f"Epoch {epoch}/{config.epochs}", []
  try:
    with tqdm.tqdm(desc=f"{desc}: compiling the step", bar_format="{desc} ({elapsed})",
                   leave=False, file=sys.stderr, disable=not compiles):
      state, metrics = step_fn(state, next(batches))
      jax.block_until_ready(metrics)
    sums.append(metrics)
    control.after_step(step_base + len(sums), position, state, len(sums) == total)
    last, waited = time.perf_counter(), False
    with tqdm.tqdm(total=total, initial=len(sums), desc=desc, leave=False, file=sys.stderr,
                   mininterval=2.0, unit="step") as bar:
      for batch in batches:
        state, metrics = step_fn(state, batch)
        if waited:  # wait for the previous step (the first was waited for above)
          jax.block_until_ready(sums[-1])
          now = time.perf_counter()
          step_times.append(now - last)
          last = now
        waited = True
        sums.append(metrics)
        if step_times:
          left = clock.seconds_left(epoch, len(sums), statistics.median(step_times[-50:]))
          bar.set_postfix_str(f"run: {format_duration(left)} left", refresh=False)
        bar.update()
        control.after_step(step_base + len(sums), position, state, len(sums) == total)
  finally:
    batches.close()
  return state, sums, step_times


def evaluation_check(control: Control, state: Any, epoch: int,
                     sums: list[dict]) -> Callable[[], None]:
  """The ``check`` for the epoch's evaluation: on a stop, saves the position "epoch
  trained, not evaluated" (a resume evaluates it), then raises ``StopRequested``."""

  def check() -> None:
    try:
      control.check()
    except StopRequested:
      control.save(MidEpoch(epoch, len(sums), stack_steps(sums)), state)
      raise
  return check
