"""Flag parsing shared by the scripts: ``--name=value`` flags, ``--help``, one-line errors."""

from __future__ import annotations

import os
import sys

from absl import flags


def parse_flags(values: flags.FlagValues, argv: list[str]) -> None:
  """Parses ``argv`` into ``values``; ``--help`` prints every flag and exits 0.

  Re-parsing is allowed (values not given fall back to their defaults), so a script's
  ``main`` can be called more than once in one process.

  Raises:
    ValueError: an unknown flag, a value of the wrong type, or a positional argument.
  """
  values.unparse_flags()
  if any(arg in ("-h", "--help", "-help", "--helpshort", "--helpfull") for arg in argv[1:]):
    print(values.get_help())
    sys.exit(0)
  try:
    rest = values(argv)
  except flags.Error as e:
    raise ValueError(str(e)) from None
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments {rest[1:]}: flags take the form --name=value")


CHECKPOINTS = ("latest", "best")
"""``--checkpoint`` of scripts/analyze.py, evaluate.py and export.py: the same default in all
three, the end of training (``latest``); ``best`` is the epoch of the best test accuracy."""


def define_checkpoint(values: flags.FlagValues) -> None:
  """Defines ``--checkpoint`` (:data:`CHECKPOINTS`) in ``values``."""
  flags.DEFINE_enum("checkpoint", CHECKPOINTS[0], list(CHECKPOINTS),
                    "Which checkpoint of the run: latest (the end of training) or best (the "
                    "epoch of the best test accuracy); either falls back to the other when the "
                    "run has none. analyze, evaluate and export read the same by default.",
                    flag_values=values)


def checkpoint_line(workdir: str, prefer: str) -> str:
  """``"checkpoint: <workdir> (latest checkpoint, epoch 20, best test acc 74.78%)"``: what a
  script reads, as it will read it (the fallback included). Imports JAX (orbax)."""
  from brjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  return f"checkpoint: {checkpoint.describe_pretrained(workdir, prefer)}"


def check_run_workdir(path: str | None, flag: str = "workdir") -> None:
  """Raises ValueError unless ``path`` (the value of ``--flag``) is a training run's workdir."""
  if not path:
    raise ValueError(f"--{flag} is required: the --workdir of a training run")
  if not os.path.exists(path):
    raise ValueError(f"--{flag}={path} is not accepted: no such folder (use the --workdir of "
                     "a training run)")
  if not os.path.isdir(path):
    raise ValueError(f"--{flag}={path} is not accepted: it is a file, not a folder (use the "
                     "--workdir of a training run)")
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(f"--{flag}={path} is not accepted: it holds no checkpoints/ folder (use "
                     "the --workdir of a training run)")
