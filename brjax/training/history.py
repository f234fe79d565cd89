"""A training run's history on disk, read without JAX.

``brjax.training.train`` leaves in a run's ``--workdir`` (and writes the first through
:func:`append_record` and :func:`truncate_history`)::

    metrics.jsonl                     one JSON object per finished epoch, in order
    checkpoints/latest/<epoch>/       the last two epochs (orbax)
    checkpoints/best/<epoch>/         the epoch with the best test accuracy

This module reads the first and lists the others, with the standard library only, so that
study runners, summaries and figures can look at runs without importing JAX (checked by
``tests/training/test_history.py``). Restoring a checkpoint's arrays is
``brjax.training.checkpoint``'s job.
"""

from __future__ import annotations

import json
import os

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_KINDS = ("latest", "best")
META_FILE = os.path.join("meta", "metadata")
"""Where a checkpoint folder holds its JSON meta (epoch, config, best test accuracy, and
``branched_from`` for a branched run): orbax's ``JsonCheckpointHandler`` writes the
``meta`` item of ``brjax.training.checkpoint`` there as one JSON object
(tests/training/test_train.py checks
that orbax reads back what this module reads)."""


class HistoryError(ValueError):
  """A metrics.jsonl that is not one JSON object with an ``"epoch"`` per line."""


def metrics_path(workdir: str) -> str:
  """``<workdir>/metrics.jsonl``."""
  return os.path.join(workdir, METRICS_FILE)


def read_history(workdir: str, *, missing_ok: bool = False) -> list[dict]:
  """The epoch records of ``<workdir>/metrics.jsonl``, in the order they were written.

  Blank lines are skipped. A last line that is cut short (no newline, not JSON) is what a
  process killed while appending it leaves: it is dropped, as the epoch it began is not
  finished. Any other line that is not a JSON object with an ``"epoch"`` is an error, not
  skipped, so that a damaged history never passes for a shorter one.

  Args:
    workdir: the ``--workdir`` of a training run.
    missing_ok: return ``[]`` if there is no metrics.jsonl, instead of raising.

  Raises:
    FileNotFoundError: no metrics.jsonl (unless ``missing_ok``).
    HistoryError: a line that is not a JSON object with an ``"epoch"``, naming it.
  """
  path = metrics_path(workdir)
  if missing_ok and not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  records = []
  for i, raw in enumerate(lines, 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise HistoryError(f"{path} line {i} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                         f"column {e.start + 1}): expected one JSON object per epoch") from None
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines):  # no newline after it: an append cut short
        break
      raise HistoryError(f"{path} line {i} is not JSON ({e.msg}): expected one JSON object "
                         "per epoch") from None
    if not isinstance(record, dict) or "epoch" not in record:
      raise HistoryError(f"{path} line {i} has no 'epoch': expected one JSON object per "
                         "epoch")
    records.append(record)
  return records


def append_record(workdir: str, record: dict) -> None:
  """Appends one finished epoch's record to ``<workdir>/metrics.jsonl`` as a JSON line."""
  with open(metrics_path(workdir), "a") as f:
    f.write(json.dumps(record) + "\n")


def truncate_history(workdir: str, last_epoch: int) -> None:
  """Drops the records past ``last_epoch`` (written by a run killed before its save),
  atomically: the file is rewritten beside it and renamed over it."""
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return
  kept = [r for r in read_history(workdir) if r["epoch"] <= last_epoch]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


def checkpoint_epochs(workdir: str, kind: str = "latest") -> list[int]:
  """The epochs of ``<workdir>/checkpoints/<kind>/<epoch>/`` folders, ascending.

  Args:
    workdir: the ``--workdir`` of a training run.
    kind: ``"latest"`` (what ``--resume`` continues from) or ``"best"``.
  """
  if kind not in CHECKPOINT_KINDS:
    raise ValueError(f"kind={kind!r} is not accepted: use one of {', '.join(CHECKPOINT_KINDS)}")
  directory = os.path.join(workdir, "checkpoints", kind)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def checkpoint_dir(workdir: str, kind: str, epoch: int) -> str:
  """``<workdir>/checkpoints/<kind>/<epoch>``."""
  return os.path.join(workdir, "checkpoints", kind, str(epoch))


def read_checkpoint_meta(workdir: str, kind: str = "latest", epoch: int | None = None) -> dict:
  """The JSON meta of the checkpoint of ``epoch`` (default: the newest) of ``kind``; ``{}``
  when the run has no such checkpoint.

  Raises:
    OSError: the meta file is missing. ValueError: it is not a JSON object (naming it).
  """
  epochs = checkpoint_epochs(workdir, kind)
  if epoch is None and not epochs:
    return {}
  epoch = epochs[-1] if epoch is None else epoch
  path = os.path.join(checkpoint_dir(workdir, kind, epoch), META_FILE)
  with open(path, "rb") as f:
    try:
      meta = json.loads(f.read().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
      meta = e
  if not isinstance(meta, dict):
    reason = str(meta) if isinstance(meta, ValueError) else f"a JSON {type(meta).__name__}"
    raise ValueError(f"{path} is not a JSON object ({reason}): the checkpoint's meta is "
                     "damaged")
  return meta


def has_checkpoint(workdir: str, kinds: tuple[str, ...] = CHECKPOINT_KINDS) -> bool:
  """Whether the run saved a checkpoint of any of ``kinds``."""
  return any(checkpoint_epochs(workdir, kind) for kind in kinds)


def mid_epoch_position(workdir: str) -> tuple[int, int] | None:
  """``(epoch, steps done in it)`` of the run's mid-epoch checkpoint
  (``<workdir>/checkpoints/steps/<global step>``) if it is newer than its latest epoch
  checkpoint, else None: where ``--resume`` continues inside an epoch.

  Raises:
    OSError, ValueError: its meta is missing or damaged.
  """
  directory = os.path.join(workdir, "checkpoints", "steps")
  steps = sorted(int(name) for name in os.listdir(directory)
                 if name.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    return None
  with open(os.path.join(directory, str(steps[-1]), META_FILE), "rb") as f:
    where = json.loads(f.read().decode("utf-8"))["input"]
  epochs = checkpoint_epochs(workdir, "latest")
  if where["epoch"] <= (epochs[-1] if epochs else 0):
    return None
  return where["epoch"], where["step_in_epoch"]
