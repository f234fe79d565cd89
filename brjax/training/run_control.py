"""Run control: stopping at a safe point on Ctrl-C, and the clock that estimates the rest.

``StopOnSigint`` turns the first Ctrl-C into a request that the loop honours between two
steps (``StopRequested``), which ``train_and_evaluate`` reports as ``Interrupted``;
``RunClock`` and ``format_duration`` give the "time left" of the progress bar and log.
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import threading

EXIT_DIVERGED = 3
"""scripts/train.py's exit status when the run diverged (:class:`Diverged`): an outcome of
the run's flags, not a failure of the program (1) or a refused flag (2)."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped a run between two steps: the epoch in progress was dropped, the
  checkpoints of the finished epochs are kept, and ``resume=True`` continues the run.

  Attributes:
    workdir: the run's workdir.
    saved_epoch: the epoch of the latest checkpoint (None if no epoch finished).
  """

  def __init__(self, workdir: str, saved_epoch: int | None):
    super().__init__(f"interrupted after epoch {saved_epoch or 0}")
    self.workdir, self.saved_epoch = workdir, saved_epoch


class StopRequested(Exception):
  """Raised at a safe point after a Ctrl-C (see ``StopOnSigint``)."""


class StopOnSigint:
  """Within it, Ctrl-C (SIGINT) asks the loop to stop at its next safe point: ``check()``,
  called between steps and between evaluation batches, then raises ``StopRequested``; a
  checkpoint being saved is finished first. A second Ctrl-C interrupts at once.

  It only takes over Python's default SIGINT handling, in the main thread; elsewhere (a
  thread, a custom or ignored SIGINT) it does nothing and Ctrl-C behaves as before.
  """

  def __init__(self):
    self.requested = False
    self._installed = False

  def __enter__(self) -> "StopOnSigint":
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      signal.signal(signal.SIGINT, self._request)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def _request(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

  def check(self) -> None:
    if self.requested:
      raise StopRequested()


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
