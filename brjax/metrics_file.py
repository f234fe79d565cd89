"""A run's ``metrics.jsonl``: one JSON object per finished epoch, appended as it ends.

Plain files and ``json`` only (no JAX).
"""

from __future__ import annotations

import json
import os

FILENAME = "metrics.jsonl"


def append_metrics(path: str, m: dict) -> None:
  """Appends one epoch's metrics as a JSON line."""
  with open(path, "a") as f:
    f.write(json.dumps(m) + "\n")


def read_metrics(path: str) -> list[dict]:
  """The JSON lines of a metrics.jsonl ([] if there is none; unparsable lines skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return out


def truncate_metrics(path: str, last_epoch: int) -> None:
  """Drops metric lines past ``last_epoch`` (written by a run killed before its save)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["epoch"] <= last_epoch]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
