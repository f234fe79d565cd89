"""A study's plan in words (``scripts/experiments.py --dry_run``): each shared warmup and
run, its state, its estimated time and the command that will run; no JAX, nothing written.

Times are estimates per training image (:class:`Pace`): once the study has logged epochs
of its own, from those (the median LSQ-only epoch and the median BR epoch, on the machine
that ran them); before, from a float run's epoch times (the study's ``--pretrained`` if its
metrics.jsonl has them, else the shipped baseline's) times the cost of a quantized step
over a float step (:data:`STEP_COST`), for the machine that float run was trained on. The
evaluation of each epoch is counted at the measured run's share (exact for the same
training set size, low for a subset). A study of another model than the one those step
costs were measured on, or estimated from another model's float run, says so in its plan.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import shlex
import statistics

from brjax.studies import study
from brjax.training import history
from brjax.training.config import Config

STEP_COST = {"lsq": 0.95, "br": 1.12}
"""A W2A2 ResNet-20 training step's time over a float step's, measured by
scripts/benchmark.py on this project's 2-core CPU (README, Performance): LSQ alone (the
warmup, and the BR phase of a config with both lambdas 0) and LSQ + W-BR + A-BR (every
other BR phase: an upper bound for W-BR alone)."""
STEP_COST_MODEL = "resnet20"
"""The model :data:`STEP_COST` was measured on (every layer at 2 bits)."""


@dataclasses.dataclass(frozen=True)
class EpochTime:
  """Seconds per training image of a float run's epochs (median epoch, evaluation included)."""
  seconds_per_image: float
  epoch_seconds: float  # its median epoch
  images: int  # its training images per epoch
  source: str  # its workdir, as given
  model: str | None = None  # its --model, if its checkpoint records it


def epoch_time(pretrained: str | None, root: str = study.REPO) -> EpochTime | None:
  """The epoch time of ``pretrained`` (a float run's workdir, relative to ``root``) or, if
  it logged none, of the shipped baseline; None if neither did."""
  for source in dict.fromkeys(p for p in (pretrained, study.BASELINE) if p):
    path = os.path.join(root, source)
    try:
      records = history.read_history(path, missing_ok=True)
      config = history.read_checkpoint_meta(path, "best").get("config", {})
      batch = config.get("batch_size")
    except (OSError, ValueError):
      continue
    times = [r["epoch_time_s"] for r in records if r.get("epoch_time_s")]
    if not times or not records[-1].get("step") or not batch:
      continue
    images = records[-1]["step"] // records[-1]["epoch"] * batch
    median = statistics.median(times)
    return EpochTime(median / images, median, images, source, config.get("model"))
  return None


@dataclasses.dataclass(frozen=True)
class Pace:
  """Seconds per training image of an LSQ-only epoch and of an epoch with BR (evaluation
  included), the whole training set's image count, and where they come from (words)."""
  lsq: float
  br: float
  images: int
  source: str


def float_pace(per: EpochTime, model: str = STEP_COST_MODEL) -> Pace:
  """The pace of ``model``'s quantized epochs estimated from a float run's: times
  :data:`STEP_COST`. Its words say when that run, or :data:`STEP_COST`, is another model's."""
  others = ([f"that float run is a {per.model}"] if per.model not in (None, model) else []) + (
      [f"the step costs are W2A2 {STEP_COST_MODEL}'s"] if model != STEP_COST_MODEL else [])
  based = (f"; this study trains {model}, but {' and '.join(others)}: its times are not "
           f"measured for {model}" if others else "")
  return Pace(STEP_COST["lsq"] * per.seconds_per_image, STEP_COST["br"] * per.seconds_per_image,
              per.images, f"times estimated from {per.source} ({per.epoch_seconds:.0f} s per "
              f"float epoch of {per.images} images; a step costs {STEP_COST['lsq']}x float "
              f"with LSQ alone, {STEP_COST['br']}x with BR{based})")


def _has_br(config: Config) -> bool:
  return bool(config.lambda_w or config.lambda_a)


def study_pace(runs: list[study.Run]) -> Pace | None:
  """The pace measured by the study's own logged epochs, or None if none is logged.

  Reads the metrics.jsonl of each run and shared warmup in ``runs``: a warmup epoch, or an
  epoch of a run without BR, is an LSQ-only epoch; a BR-phase epoch of a run with a lambda
  is a BR epoch (a branch's copy of its warmup's epochs is read once, from the warmup).
  Each pace is the median over its epochs, so that an epoch that compiled or shared the
  machine does not set it; a kind not logged yet is the other's times the ratio of
  :data:`STEP_COST`.
  """
  seconds = {"lsq": [], "br": []}
  images = []
  sources = [(w.workdir, w.train_config, 0) for w in study.warmups(runs)]
  sources += [(r.workdir, r.train_config, r.train_config.warmup_epochs if r.warmup else 0)
              for r in runs]
  for workdir, config, copied in sources:
    try:
      records = history.read_history(workdir, missing_ok=True)
    except (OSError, ValueError):
      continue
    for record in records:
      if record["epoch"] <= copied or not record.get("epoch_time_s") or not record.get("step"):
        continue
      count = record["step"] // record["epoch"] * config.batch_size
      kind = "br" if record["epoch"] > config.warmup_epochs and _has_br(config) else "lsq"
      seconds[kind].append(record["epoch_time_s"] / count)
      images.append(count)
  if not images:
    return None
  median = {k: statistics.median(v) for k, v in seconds.items() if v}
  ratio = STEP_COST["br"] / STEP_COST["lsq"]
  lsq = median.get("lsq", median.get("br", 0.0) / ratio)
  br = median.get("br", lsq * ratio)
  count = max(images)
  words = [f"{median[k] * count:.0f} s per {k.upper()} epoch, median of {len(v)}"
           for k, v in seconds.items() if v]
  if len(median) == 1:
    words.append(f"{'BR' if 'lsq' in median else 'LSQ'} by STEP_COST's ratio, "
                 f"{STEP_COST['br']}/{STEP_COST['lsq']}")
  return Pace(lsq, br, count, f"times from this study's logged epochs of {count} images "
              f"({'; '.join(words)})")


def run_seconds(config: Config, first: int, last: int, pace: Pace) -> float:
  """Estimated seconds of epochs ``first..last`` (1-based, inclusive) of ``config``."""
  images = config.train_examples or pace.images
  br_pace = pace.br if _has_br(config) else pace.lsq
  per_image = sum(pace.lsq if e <= config.warmup_epochs else br_pace
                  for e in range(first, last + 1))
  return per_image * images


def duration(seconds: float) -> str:
  """``"~1h12m"``, ``"~24m"``."""
  minutes = round(seconds / 60)
  return f"~{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"~{minutes}m"


def _line(name: str, state: str, left: float | None, command: str, note: str = "") -> str:
  time = "" if left is None else f", {duration(left)}"
  return f"{name} ({state}{time}{note}): {command}"


def dry_run(study_dir: str, flags: dict, share_warmup: bool = True,
            order: str = "seed", only: Sequence[str] = ()) -> list[str]:
  """The plan: a ``#`` line on the study, one line per warmup and run in the order the
  runner takes them, ``<name> (<new|resume|skip>[, ~time][, from <warmup> at epoch W]):
  <command>``, then a ``#`` line with the total time left. ``order``: see ``study.ORDERS``;
  ``only``: run names to take, in that order (``study.select``; empty: all).

  Raises:
    StudyError: as ``study.plan`` and ``study.select``, or ``study_dir`` holds a study with
      other flags.
  """
  every = study.plan(study_dir, flags, share_warmup, order)
  runs = study.select(every, only)
  study.check_study_file(study_dir, flags)
  per = epoch_time(flags["pretrained"])
  model = flags.get("model", study.STUDY_DEFAULTS["model"])
  pace = study_pace(every) or (None if per is None else float_pace(per, model))
  estimate = (lambda config, first, last: None) if pace is None else (
      lambda config, first, last: run_seconds(config, first, last, pace))
  lines, total, started = [], 0.0, set()
  for run in runs:
    warmup, state = run.warmup, run.state()
    if warmup is not None and warmup.name not in started and state == "new":
      started.add(warmup.name)
      w_state, config = warmup.state(), warmup.train_config
      if w_state != "done":
        done = (history.checkpoint_epochs(warmup.workdir) or [0])[-1]
        left = estimate(config, done + 1, config.warmup_epochs)
        total += left or 0.0
        resume = " --resume" if w_state == "resume" else ""
        lines.append(_line(warmup.name, w_state, left, warmup.command() + resume))
    config = run.train_config
    if state == "done":
      lines.append(_line(run.name, "skip", None, run.command()))
      continue
    if state == "resume":
      done = history.checkpoint_epochs(run.workdir)[-1]
      command = run.command() + " --resume"
    else:
      done = config.warmup_epochs if warmup is not None else 0
      command = shlex.join(["python", study.TRAIN_SCRIPT, *run.start_flags()])
    left = estimate(config, done + 1, config.epochs)
    total += left or 0.0
    note = (f", from {warmup.name} at epoch {config.warmup_epochs}"
            if warmup is not None and state == "new" else "")
    lines.append(_line(run.name, state, left, command, note))
  return [_head(runs, len(every), flags, pace, share_warmup), *lines,
          _foot(runs, total, pace)]


def _head(runs: list[study.Run], planned: int, flags: dict, pace: Pace | None,
          share_warmup: bool) -> str:
  shared = study.warmups(runs)
  warmup = (f" + {len(shared)} shared warmups of {flags['warmup_epochs']} epochs" if shared
            else " (no shared warmup)" if not share_warmup else "")
  times = "no time estimate: no float run with epoch times" if pace is None else pace.source
  taken = f"{len(runs)} of its {planned} runs (--runs)" if len(runs) < planned else (
      f"{planned} runs")
  return (f"# plan: {len(flags['configs'])} configs x {len(flags['seeds'])} seeds = "
          f"{taken}{warmup}, {flags['epochs']} epochs each "
          f"({flags['warmup_epochs']} warmup); {times}")


def _foot(runs: list[study.Run], total: float, pace: Pace | None) -> str:
  if pace is None:
    return "# total: no estimate"
  alone = sum(run_seconds(r.train_config, 1, r.train_config.epochs, pace) for r in runs)
  return (f"# total left: {duration(total)} on that machine, one run at a time (every run "
          f"from scratch, no shared warmup: {duration(alone)})")
