"""Trains a CIFAR ResNet (or one of the papers' ImageNet models) with LSQ and Bin Regularization.

    python scripts/train.py --bits=2 --lambda_a=1.0 \
        --data_dir=../shared/datasets/cifar10-jpeg.tar.gz

Flags are validated before any work; a bad value stops with a one-line error (exit 2). A
run that diverges (its training loss NaN or infinite, or a step size at or below zero)
stops with a one-line error (exit 3), without saving that epoch.
Ctrl-C stops between two steps, keeps the checkpoints of the finished epochs, prints the
command that continues the run, and exits 130.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax.training import (
  cli,  # pylint: disable=g-import-not-at-top
  run_control,  # pylint: disable=g-import-not-at-top
)
from brjax.training import flags as train_flags  # pylint: disable=g-import-not-at-top
from brjax.training.config import Config  # pylint: disable=g-import-not-at-top
from brjax.training.run_control import EXIT_PREEMPTED  # pylint: disable=g-import-not-at-top

FLAGS = train_flags.define(flags.FlagValues())
config_from_flags = train_flags.config_from_flags


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    config = config_from_flags(FLAGS)
    if FLAGS.histogram_every < 1:
      raise ValueError(f"--histogram_every={FLAGS.histogram_every} is not accepted: use an "
                       "integer >= 1")
    if FLAGS.checkpoint_every_steps < 0:
      raise ValueError(f"--checkpoint_every_steps={FLAGS.checkpoint_every_steps} is not "
                       "accepted: use an integer >= 0 (0: not by count)")
    if not FLAGS.checkpoint_every_minutes >= 0:
      raise ValueError(f"--checkpoint_every_minutes={FLAGS.checkpoint_every_minutes} is not "
                       "accepted: use a number >= 0 (0: not by time)")
    if FLAGS.stop_after_epoch is not None and not 1 <= FLAGS.stop_after_epoch <= config.epochs:
      raise ValueError(f"--stop_after_epoch={FLAGS.stop_after_epoch} is not accepted: use an "
                       f"integer in 1..{config.epochs} (--epochs={config.epochs})")
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = FLAGS.workdir or os.path.join("checkpoints", config.name)
  if FLAGS.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    try:
      jax.distributed.initialize()  # before any other use of JAX
    except (ValueError, RuntimeError) as e:
      print(f"error: --distributed: jax.distributed.initialize() failed: {e}", file=sys.stderr)
      return 2
  if FLAGS.dtype is None:  # asks JAX for the backend: only after distributed initialization
    config = dataclasses.replace(config, dtype=train_flags.default_dtype())

  # A SIGTERM before the loop (loading data, compiling) stops as Ctrl-C does; in the loop,
  # either saves where the run stops (run_control.StopOnSignal).
  signal.signal(signal.SIGTERM, run_control.interrupt_on_sigterm)
  try:
    return train(config, workdir)
  except KeyboardInterrupt as e:  # train.Interrupted, or Ctrl-C before the first step
    print(interrupted_message(argv, workdir, getattr(e, "saved_epoch", None),
                              getattr(e, "position", None)), file=sys.stderr)
    return EXIT_PREEMPTED if getattr(e, "signal", "SIGINT") == "SIGTERM" else 130


def train(config: Config, workdir: str) -> int:
  """Trains; returns the exit status (2 after a one-line error, 3 if the run diverged)."""
  # pylint: disable=g-import-not-at-top
  from brjax.training import checkpoint, run_control
  from brjax.training import train as train_lib
  from brjax.training.epoch import SaveEvery
  try:
    train_lib.train_and_evaluate(config, workdir, resume=FLAGS.resume,
                                 tensorboard=FLAGS.tensorboard,
                                 histogram_every=FLAGS.histogram_every,
                                 branch_from=FLAGS.branch_from,
                                 stop_after_epoch=FLAGS.stop_after_epoch,
                                 save_every=SaveEvery(FLAGS.checkpoint_every_steps,
                                                      FLAGS.checkpoint_every_minutes))
  except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except run_control.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return run_control.EXIT_DIVERGED
  return 0


def interrupted_message(argv: list[str], workdir: str, saved_epoch: int | None,
                        position: tuple[int, int] | None = None) -> str:
  """What a stop (Ctrl-C, SIGTERM) left, and the command that continues the run
  (``--resume`` added)."""
  if saved_epoch is None and position is None:
    saved_epoch = _saved_epoch(workdir)
  if saved_epoch is None and position is None:
    return f"interrupted before the first step: nothing saved in {workdir}"
  args = [a for a in argv[1:] if a not in ("--resume", "--noresume", "--resume=false")]
  command = shlex.join(["python", argv[0], *args, "--resume"])
  kept = (f"saved at epoch {position[0]} step {position[1]}" if position else
          f"the checkpoint of epoch {saved_epoch} is kept")
  return f"interrupted: {kept} in {workdir}; continue with\n  {command}"


def _saved_epoch(workdir: str) -> int | None:
  try:
    from brjax.training import checkpoint  # pylint: disable=g-import-not-at-top
    return checkpoint.peek_latest(workdir)[0]
  except Exception:  # pylint: disable=broad-except
    return None


if __name__ == "__main__":
  sys.exit(main(sys.argv))
