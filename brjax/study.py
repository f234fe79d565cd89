"""The LSQ vs LSQ+BR comparison study: its runs, flags, results and summary, without JAX.

``scripts/experiments.py`` plans a study here and runs it with ``brjax.study_runner``.

A study trains ResNet-20 at W<bits>A<bits> under each config of :data:`CONFIGS` for each
seed, with the same warmup and BR epochs for all. Layout of its ``study_dir``::

    study.json              the study's flags; a later run with other flags is refused
    <config>_s<seed>/       the run's --workdir (checkpoints/, metrics.jsonl, train.log)
    <config>_s<seed>.json   the run's result, written when the run has finished
    summary.json            per config: mean and sample std over seeds, n, the command
    summary.md              the same as a table (``brjax.study_summary``)

Each run is one ``scripts/train.py`` process of this repository, started with every flag
that defines it; the command is recorded in its result and reproduces the run from the
repository root. A child process rather than ``brjax.train.train_and_evaluate`` here: the
recorded command is the one that ran; every run starts from a fresh JAX runtime, as a user
reproducing it will; and this module never imports JAX (``brjax.config`` validates every
run before the first starts), so it holds no accelerator memory the runs need.

Resume: a run whose result JSON exists is skipped (state ``done``); a run whose workdir
holds checkpoints but has no result continues with ``--resume`` (``resume``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
from typing import Any, Mapping

from brjax import history
from brjax import study_summary
from brjax.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root: every run executes there, and recorded paths are relative to it."""
TRAIN_SCRIPT = os.path.join("scripts", "train.py")

CONFIGS = {
    "lsq": ("LSQ", 0.0, 0.0),
    "lsq_br": ("LSQ + W-BR + A-BR", 1.0, 1.0),
    "w_br": ("LSQ + W-BR", 1.0, 0.0),
}
"""name -> (description, lambda_w, lambda_a), in the order of the summary."""

STUDY_FLAGS = ("bits", "seeds", "configs", "warmup_epochs", "epochs", "lr", "batch_size",
               "train_examples", "test_examples", "pretrained", "data_dir")
"""The flags stored in study.json: a study continues only with the same values."""
RESULT_RE = re.compile(r"^(?P<config>\w+?)_s(?P<seed>-?\d+)\.json$")
RESULT_KEYS = ("config", "seed", "command", "final_test_acc", "best_test_acc",
               "final_train_acc")


class StudyError(ValueError):
  """Bad input (flags, a study_dir of another study, malformed results): exit 2."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study."""
  config: str  # a key of CONFIGS
  seed: int
  workdir: str  # absolute
  result_path: str  # absolute
  train_config: Config

  @property
  def name(self) -> str:
    return f"{self.config}_s{self.seed}"

  def flags(self) -> list[str]:
    """Every scripts/train.py flag that defines the run, ``--workdir`` last."""
    return train_flags(self.train_config) + [f"--workdir={repo_path(self.workdir)}"]

  def command(self) -> str:
    """The shell command that reproduces the run, from the repository root."""
    return shlex.join(["python", TRAIN_SCRIPT, *self.flags()])

  def state(self) -> str:
    """``done`` (result written), ``resume`` (checkpoints, no result) or ``new``."""
    if os.path.exists(self.result_path):
      return "done"
    return "resume" if history.checkpoint_epochs(self.workdir, "latest") else "new"


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)  # round-trips exactly
  return str(value)


def train_flags(config: Config) -> list[str]:
  """``config`` as scripts/train.py flags, every field explicit.

  Field names are the flag names; unset (None) fields are left out, which is their default.
  Equal weight and activation widths are written as ``--bits``.
  """
  values = dataclasses.asdict(config)
  out = []
  for name, value in values.items():
    if value is None:
      continue
    if name == "bits_w" and values["bits_w"] == values["bits_a"]:
      out.append(f"--bits={value}")
    elif name == "bits_a" and values["bits_w"] == values["bits_a"]:
      continue
    else:
      out.append(f"--{name}={_flag_value(value)}")
  return out


# ------------------------------------------------------------------ flags and plan


def abspath(path: str | None) -> str | None:
  """``path`` with ``~`` expanded, made absolute; None stays None."""
  return None if path is None else os.path.abspath(os.path.expanduser(path))


def repo_path(path: str | None) -> str | None:
  """``path`` as the runs see it: relative to the repository root (where every run executes)
  if it lies in the repository or beside it (``../shared/...``), else absolute.

  So recorded commands and study.json hold no machine-specific prefix for a checkout with
  its data beside it, and reproduce from any clone's root.
  """
  if path is None:
    return None
  absolute = abspath(path)
  relative = os.path.relpath(absolute, REPO)
  return absolute if relative.startswith(os.pardir + os.sep + os.pardir) else relative


def _parse_list(values: list, flag: str, convert, accepted: str) -> list:
  text = ",".join(str(v) for v in values)
  try:
    items = [convert(str(v).strip()) for v in values]
  except ValueError:
    items = None
  if not items or len(set(items)) != len(items):
    raise StudyError(f"--{flag}={text} is not accepted: {accepted}")
  return items


def _known_config(name: str) -> str:
  if name not in CONFIGS:
    raise ValueError(name)
  return name


def check_study(values: Mapping[str, Any]) -> dict:
  """The study's flags (:data:`STUDY_FLAGS`) from ``values``, checked, paths as
  :func:`repo_path` gives them.

  Args:
    values: every name of STUDY_FLAGS; ``seeds`` and ``configs`` as lists of strings (or
      seeds as ints), as the comma-separated flags give them.

  Raises:
    StudyError: a bit width outside 2..8, or seeds / configs that are not distinct known
      values (the other flags are checked by :func:`plan`).
  """
  if not 2 <= values["bits"] <= 8:
    raise StudyError(f"--bits={values['bits']} is not accepted: use an integer in 2..8 (the "
                     "study compares quantized training)")
  seeds = _parse_list(values["seeds"], "seeds", int,
                      "use distinct comma-separated integers, e.g. --seeds=0,1,2")
  configs = _parse_list(values["configs"], "configs", _known_config,
                        f"use distinct comma-separated names from {', '.join(CONFIGS)}")
  study = {name: values[name] for name in STUDY_FLAGS}
  return {**study, "seeds": seeds, "configs": configs,
          "pretrained": repo_path(values["pretrained"]),
          "data_dir": repo_path(values["data_dir"])}


def plan(study_dir: str, study: dict) -> list[Run]:
  """The study's runs, seed by seed (every config of the first seed first), each with its
  validated ``Config``.

  Raises:
    StudyError: a value scripts/train.py would refuse (its own one-line message), or no BR
      epoch.
  """
  # Paths in ``study`` are relative to the repository root, as the runs execute there.
  with contextlib.chdir(REPO):
    return [_plan_run(study_dir, study, name, seed)
            for seed in study["seeds"] for name in study["configs"]]


def _plan_run(study_dir: str, study: dict, name: str, seed: int) -> Run:
  _, lambda_w, lambda_a = CONFIGS[name]
  try:
    config = Config(
        bits_w=study["bits"], bits_a=study["bits"], lambda_w=lambda_w, lambda_a=lambda_a,
        warmup_epochs=study["warmup_epochs"], epochs=study["epochs"], lr=study["lr"],
        batch_size=study["batch_size"], seed=seed, data_dir=study["data_dir"],
        train_examples=study["train_examples"], test_examples=study["test_examples"],
        pretrained=study["pretrained"])
  except ValueError as e:
    raise StudyError(str(e)) from None
  if config.warmup_epochs >= config.epochs:
    raise StudyError(f"--warmup_epochs={config.warmup_epochs} is not accepted: use an "
                     f"integer in 0..{config.epochs - 1} (--epochs={config.epochs}): the "
                     "study compares BR epochs")
  run_name = f"{name}_s{seed}"
  return Run(name, seed, os.path.join(study_dir, run_name),
             os.path.join(study_dir, run_name + ".json"), config)


def _format_flag(name: str, value) -> str:
  if isinstance(value, list):
    value = ",".join(str(v) for v in value)
  return f"--{name}={'unset' if value is None else value}"


def read_study_file(study_dir: str) -> dict | None:
  """The flags in ``<study_dir>/study.json``; None if there is none; StudyError if unreadable."""
  path = os.path.join(study_dir, "study.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)["flags"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise StudyError(f"{path} could not be read ({type(e).__name__}: {e}): move it away to "
                     "start a new study there, or choose another --study_dir") from None


def check_study_file(study_dir: str, study: dict) -> bool:
  """Whether ``study.json`` exists; StudyError if it holds other flags than ``study``."""
  saved = read_study_file(study_dir)
  if saved is None:
    return False
  diffs = [f"{_format_flag(k, saved.get(k))} there, {_format_flag(k, v)} here"
           for k, v in study.items() if saved.get(k) != v]
  if diffs:
    raise StudyError(f"--study_dir={study_dir} holds a study with other flags "
                     f"({'; '.join(diffs)}): run it again with its own flags to continue "
                     "it, or choose another --study_dir")
  return True


def dry_run(study_dir: str, study: dict) -> list[str]:
  """One line per run: ``<name> (<new|resume|skip>): <command>``; writes nothing.

  Raises:
    StudyError: as :func:`plan`, or ``study_dir`` holds a study with other flags.
  """
  runs = plan(study_dir, study)
  check_study_file(study_dir, study)
  lines = []
  for run in runs:
    state = run.state()
    extra = " --resume" if state == "resume" else ""
    lines.append(f"{run.name} ({'skip' if state == 'done' else state}): {run.command()}{extra}")
  return lines


# ------------------------------------------------------------------ results


def collect_results(study_dir: str) -> list[dict]:
  """Every ``<config>_s<seed>.json`` result in ``study_dir``, by config order then seed.

  Raises:
    StudyError: a result that cannot be read or lacks one of :data:`RESULT_KEYS`.
  """
  results = []
  for name in sorted(os.listdir(study_dir)):
    if not RESULT_RE.match(name) or name in ("study.json", "summary.json"):
      continue
    path = os.path.join(study_dir, name)
    try:
      with open(path) as f:
        result = json.load(f)
    except (OSError, ValueError) as e:
      raise StudyError(f"{path} could not be read ({type(e).__name__}: {e}): delete it to "
                       "run that run again") from None
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
      raise StudyError(f"{path} is not a run result (missing {', '.join(missing)}): delete "
                       "it to run that run again")
    result.setdefault("description", CONFIGS.get(result["config"], (result["config"],))[0])
    results.append(result)
  order = {name: i for i, name in enumerate(CONFIGS)}
  return sorted(results, key=lambda r: (order.get(r["config"], len(order)), r["config"],
                                        r["seed"]))


def write_summary(study_dir: str, study: dict | None, pretrained: str | None) -> str:
  """Writes summary.json and summary.md from the results in ``study_dir``; returns the table.

  Args:
    study_dir: the study's folder.
    study: its flags (study.json), or None if unknown.
    pretrained: the float baseline's workdir (relative to the repository root), or None.

  Raises:
    StudyError: a malformed result, or none at all.
  """
  results = collect_results(study_dir)
  if not results:
    raise StudyError(f"--study_dir={study_dir} holds no result (<config>_s<seed>.json): run "
                     "the study first")
  baseline = study_summary.read_baseline(pretrained, REPO) if pretrained else None
  try:
    summary = study_summary.summarize(results, study, baseline)
  except ValueError as e:
    raise StudyError(str(e)) from None
  return study_summary.write_summary_files(study_dir, summary)


def summarize_only(study_dir: str, pretrained: str | None = None) -> str:
  """Rebuilds the summary of the results in ``study_dir``; returns its Markdown.

  The study's flags come from its study.json if there is one; ``pretrained`` (if given)
  replaces the baseline workdir recorded there.
  """
  if not os.path.isdir(study_dir):
    raise StudyError(f"--study_dir={study_dir} is not accepted: no such folder")
  study = read_study_file(study_dir)
  if pretrained is None and study is not None:
    pretrained = study.get("pretrained")
  return write_summary(study_dir, study, pretrained)


