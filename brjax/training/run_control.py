"""Run control: stopping at a safe point on Ctrl-C or SIGTERM, and the clock of the rest.

``StopOnSignal`` turns the first Ctrl-C (SIGINT) or SIGTERM (a preemption notice) into a
request that the loop honours after the step in progress: it saves a mid-epoch checkpoint
and stops (``StopRequested``), which ``train_and_evaluate`` reports as ``Interrupted``.
With several processes, :func:`agree` makes every process take the same decision at the
same step. ``RunClock`` and ``format_duration`` give the "time left" of the progress bar
and log.
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import threading

import numpy as np

EXIT_DIVERGED = 3
"""scripts/train.py's exit status when the run diverged (:class:`Diverged`): an outcome of
the run's flags, not a failure of the program (1) or a refused flag (2)."""
EXIT_PREEMPTED = 75
"""scripts/train.py's exit status after a SIGTERM that it answered with a checkpoint
(sysexits' EX_TEMPFAIL: run the same command with ``--resume``). Ctrl-C exits 130."""


class Interrupted(KeyboardInterrupt):
  """A signal stopped a run after a step: a mid-epoch checkpoint of that step was saved
  (with the epoch's running metrics and the input's position), the checkpoints of the
  finished epochs are kept, and ``resume=True`` continues the run where it stopped.

  Attributes:
    workdir: the run's workdir.
    saved_epoch: the epoch of the latest epoch checkpoint (None if no epoch finished).
    position: ``(epoch, step in that epoch)`` of the mid-epoch checkpoint saved on the way
      out (None when the run stopped at an epoch's end, or before its first step).
    signal: ``"SIGINT"`` or ``"SIGTERM"``.
  """

  def __init__(self, workdir: str, saved_epoch: int | None,
               position: tuple[int, int] | None = None, signal_name: str = "SIGINT"):
    where = (f"at epoch {position[0]} step {position[1]}" if position else
             f"after epoch {saved_epoch or 0}")
    super().__init__(f"{signal_name}: stopped {where}")
    self.workdir, self.saved_epoch = workdir, saved_epoch
    self.position, self.signal = position, signal_name


class StopRequested(Exception):
  """Raised at a safe point after a stop request (see :class:`StopOnSignal`); ``signal``
  names it (``"SIGINT"``, ``"SIGTERM"``)."""

  def __init__(self, signal_name: str = "SIGINT"):
    super().__init__(signal_name)
    self.signal = signal_name


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt_on_sigterm(signum, frame) -> None:
  """A SIGTERM handler that raises :class:`Interrupted` (``signal="SIGTERM"``), as Python's
  default SIGINT handler raises ``KeyboardInterrupt``: ``scripts/train.py`` installs it so
  that a SIGTERM before the loop (loading data, compiling) also ends with a message and
  its exit status; inside the loop :class:`StopOnSignal` takes over."""
  del signum, frame
  raise Interrupted("", None, None, "SIGTERM")


def _takes_over(signum: int, handler) -> bool:
  if signum == signal.SIGINT:
    return handler is signal.default_int_handler
  return handler in (signal.SIG_DFL, interrupt_on_sigterm)


class StopOnSignal:
  """Within it, Ctrl-C (SIGINT) and SIGTERM ask the loop to stop at its next safe point:
  ``requested`` names the signal, and ``check()`` then raises :class:`StopRequested`. A
  second signal (either) stops at once, through the handler that was there before (SIGINT:
  ``KeyboardInterrupt``; SIGTERM: the end of the process, or :func:`interrupt_on_sigterm`).

  It only takes over a signal's default handling (or :func:`interrupt_on_sigterm`), in the
  main thread; elsewhere (a thread, a custom or ignored handler) it leaves that signal
  alone.
  """

  def __init__(self):
    self.requested: str | None = None
    self._installed: dict[int, object] = {}

  def __enter__(self) -> StopOnSignal:
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in _STOP_SIGNALS:
      handler = signal.getsignal(signum)
      if _takes_over(signum, handler):
        self._installed[signum] = handler
        signal.signal(signum, self._request)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, default in self._installed.items():
      signal.signal(signum, default)
    self._installed = {}

  def _request(self, signum, frame) -> None:
    del frame
    self.requested = self.requested or signal.Signals(signum).name
    for other, default in self._installed.items():  # a second signal: at once
      signal.signal(other, default)

  def check(self) -> None:
    if self.requested:
      raise StopRequested(self.requested)


StopOnSigint = StopOnSignal  # its name before it answered SIGTERM too


def agree(*local: bool) -> tuple[bool, ...]:
  """Each flag OR-ed over every process (one small all-gather; none with one process).

  What makes several processes stop, or save, at the same step: a decision taken by one
  process alone (its Ctrl-C, its clock) would leave the others waiting in a collective.
  """
  import jax  # pylint: disable=g-import-not-at-top (this module is imported without JAX)
  if jax.process_count() == 1:
    return tuple(bool(x) for x in local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray(local, np.int32))
  return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(local)).any(axis=0))


def format_duration(seconds: float) -> str:
  """``"45s"``, ``"12m05s"``, ``"10h02m"``."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


@dataclasses.dataclass
class RunClock:
  """Estimates how long the rest of the run takes from measured step and evaluation times."""
  epochs: int
  steps_per_epoch: int
  eval_s: float = 0.0  # the last evaluation's time (0 before the first)

  def seconds_left(self, epoch: int, steps_done: int, step_s: float) -> float:
    """Time left after ``steps_done`` steps of ``epoch``, at ``step_s`` seconds a step."""
    epoch_s = self.steps_per_epoch * step_s + self.eval_s
    return ((self.steps_per_epoch - steps_done) * step_s + self.eval_s
            + (self.epochs - epoch) * epoch_s)


class Diverged(ArithmeticError):
  """An epoch left the model broken (a non-finite loss, a step size at or below zero): the
  run stops before saving that epoch. ``str(e)`` is ``epoch <N> diverged: <what>; ...``
  (:func:`parse_diverged` reads it back from a log line)."""

  def __init__(self, epoch: int, what: str, saved_epoch: int | None):
    kept = (f"the checkpoint of epoch {saved_epoch} is kept" if saved_epoch else
            "no checkpoint was saved")
    self.epoch, self.what = epoch, what
    super().__init__(
        f"epoch {epoch} diverged: {what}; the epoch was not saved, {kept}: lower --lr or "
        "--lambda_w/--lambda_a, or freeze the step sizes (--freeze_alpha_w/--freeze_alpha_a) "
        "or scale W-BR's gradient to them (--br_alpha_grad_w=lsq), or leave values above "
        "the top level out of A-BR (--abr_clipped=exclude); scripts/trace_step_sizes.py "
        "shows which loss term pushes each step size")


_DIVERGED_RE = re.compile(r"^(?:error: )?epoch (?P<epoch>\d+) diverged: (?P<what>.*?); the "
                          r"epoch was not saved")


def parse_diverged(line: str) -> tuple[int, str] | None:
  """``(epoch, what)`` of a :class:`Diverged` message (as scripts/train.py prints it, with
  or without its ``error: ``), or None for any other line."""
  match = _DIVERGED_RE.match(line.strip())
  return (int(match["epoch"]), match["what"]) if match else None


def check_finite(epoch: int, m: dict, saved_epoch: int | None) -> None:
  """Raises :class:`Diverged` when the epoch's training loss is NaN or infinite."""
  if not math.isfinite(m["train_loss"]):
    terms = ", ".join(f"{k}={m[k]:.4g}" for k in ("ce", "br_w", "br_a")
                      if isinstance(m.get(k), float))
    raise Diverged(epoch, f"its mean training loss is {m['train_loss']} ({terms})", saved_epoch)


def check_step_sizes(epoch: int, smallest: dict[str, float], saved_epoch: int | None) -> None:
  """Raises :class:`Diverged` when a step size is at or below zero (``smallest``: each step
  size's path and its smallest entry): its quantizer then runs on the 1e-8 floor and the
  layer outputs zeros, which training would not undo."""
  bad = {path: value for path, value in smallest.items() if not value > 0}
  if bad:
    shown = ", ".join(f"{path}={value:.4g}" for path, value in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise Diverged(epoch, f"step sizes went to zero or below ({shown}{more}): their layers "
                   "output zeros", saved_epoch)
