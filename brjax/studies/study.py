"""The LSQ vs LSQ+BR comparison study: its runs, flags, results and summary, without JAX.

``scripts/experiments.py`` plans a study here and runs it with ``brjax.studies.runner``;
``brjax.studies.plan`` says the plan in words (``--dry_run``).

A study trains one model (``--model``, default ResNet-20) at W<bits>A<bits> (with
``--first_last_bits``, its first conv and last FC at their own bits) under each config of
:data:`CONFIGS` for each seed, with the same warmup and BR epochs for all (:data:`PRESETS`
names whole studies).
Layout of its ``study_dir``::

    study.json              the study's flags; a later run with other flags is refused
    warmup_s<seed>/         the seed's shared warmup (a --workdir stopped after the warmup)
    <config>_s<seed>/       the run's --workdir (checkpoints/, metrics.jsonl, train.log)
    <config>_s<seed>.json   the run's result, written when the run has finished
    summary.json            per config: mean and sample std over seeds, n, the command
    summary.md              the same as a table (``brjax.studies.summary``)

Each run is one ``scripts/train.py`` process of this repository, started with every flag
that defines it; the command recorded in its result reproduces the run from scratch, from
the repository root. **Shared warmups** (on by default): the configs differ only in
BR-phase fields, so their warmups are the same, bit for bit; the runner trains each
seed's warmup once (:class:`Warmup`, ``--stop_after_epoch``) and starts every run of
that seed from its checkpoint (``--branch_from``, ``brjax.training.run_start``), which gives the
metrics of the run from scratch; each result records its ``warmup_source``. A child
process rather than ``brjax.training.train.train_and_evaluate`` here: every run starts from a fresh
JAX runtime, as a user reproducing it will; and this module never imports JAX
(``brjax.training.config`` validates every run before the first starts), so it holds no
accelerator memory the runs need.

Resume: a run whose result JSON exists is skipped (state ``done``); a run whose workdir
holds checkpoints (of an epoch, or inside one) but has no result continues with
``--resume`` (``resume``), from where it stopped; a warmup with a checkpoint at the end of
the warmup is ``done``, one with fewer epochs resumes.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import contextlib
import dataclasses
import json
import os
import re
import shlex
from typing import Any

from brjax.training import history
from brjax.training.config import BR_PHASE_FIELDS, MODELS, Config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root: every run executes there, and recorded paths are relative to it."""
TRAIN_SCRIPT = os.path.join("scripts", "train.py")

_BR = {"lambda_w": 1.0, "lambda_a": 1.0}
CONFIGS = {
    "lsq": ("LSQ", {"lambda_w": 0.0, "lambda_a": 0.0}),
    "lsq_br": ("LSQ + W-BR + A-BR", _BR),
    "w_br": ("LSQ + W-BR", {"lambda_w": 1.0, "lambda_a": 0.0}),
    "lsq_br_small": ("LSQ + W-BR + A-BR at lambda_a 0.1", {"lambda_w": 1.0, "lambda_a": 0.1}),
    "lsq_br_frozen": ("LSQ + W-BR + A-BR, step sizes frozen after warmup",
                      {**_BR, "freeze_alpha_w": True, "freeze_alpha_a": True}),
    "lsq_br_gscaled": ("LSQ + W-BR (step-size gradient scaled by LSQ's g) + A-BR",
                       {**_BR, "br_alpha_grad_w": "lsq"}),
    "lsq_br_noclip": ("LSQ + W-BR + A-BR without the clipped values",
                      {**_BR, "abr_clipped": "exclude"}),
}
"""name -> (description, the Config fields it sets), in the order of the summary. Every
config sets BR-phase fields only (``brjax.training.config.BR_PHASE_FIELDS``), so the configs of a
seed share one warmup."""
DEFAULT_CONFIGS = ("lsq", "lsq_br", "w_br")

STUDY_FLAGS = ("bits", "seeds", "configs", "warmup_epochs", "epochs", "lr", "batch_size",
               "train_examples", "test_examples", "pretrained", "data_dir", "recipe", "model",
               "first_last_bits")
"""The flags stored in study.json: a study continues only with the same values."""
STUDY_DEFAULTS = {"recipe": "brjax", "model": "resnet20", "first_last_bits": None}
"""The value a flag had in a study.json written before the flag existed (every study before
``--model`` trained ResNet-20 with every layer at ``--bits``)."""
BASELINE = os.path.join("checkpoints", "resnet20_float_cifar10")
"""The shipped float baseline, relative to the repository root."""

PRESETS = {
    "evidence": {
        "configs": ["lsq", "lsq_br", "w_br", "lsq_br_small", "lsq_br_frozen",
                    "lsq_br_gscaled", "lsq_br_noclip"],
        "seeds": [0, 1, 2], "bits": 2, "recipe": "reference", "lr": 0.01, "model": "resnet20",
        "warmup_epochs": 5, "epochs": 20, "batch_size": 128, "train_examples": 0,
        "test_examples": 0, "pretrained": os.path.join(REPO, BASELINE)},
}
"""Named studies: the study flags each sets (a flag given explicitly wins). ``evidence``
(issue 14, does BR help?): W2A2 ResNet-20 from the shipped float baseline, the reference
package's recipe, the whole training set, 5 LSQ warmup + 15 BR epochs, seeds 0-2, LSQ
against BR at full and small A-BR weight, W-BR alone, frozen step sizes, W-BR's
step-size gradient scaled by LSQ's g, and A-BR without the clipped values."""
RESULT_RE = re.compile(r"^(?P<config>\w+?)_s(?P<seed>-?\d+)\.json$")
RESULT_KEYS = ("config", "seed", "command", "final_test_acc", "best_test_acc",
               "final_train_acc")


class StudyError(ValueError):
  """Bad input (flags, a study_dir of another study, malformed results): exit 2."""


@dataclasses.dataclass(frozen=True)
class Warmup:
  """A shared warmup: LSQ alone (every BR-phase field at its default, both lambdas 0) up to
  the end of the warmup (``--stop_after_epoch``), which the runs of one seed with that
  warmup branch from (``--branch_from``) instead of each training it again."""
  name: str  # warmup_s<seed>
  workdir: str  # absolute
  train_config: Config

  def flags(self) -> list[str]:
    """Every scripts/train.py flag of the warmup, ``--workdir`` last."""
    return train_flags(self.train_config) + [
        f"--stop_after_epoch={self.train_config.warmup_epochs}",
        f"--workdir={repo_path(self.workdir)}"]

  def command(self) -> str:
    return shlex.join(["python", TRAIN_SCRIPT, *self.flags()])

  def state(self) -> str:
    """``done`` (a checkpoint at the end of the warmup), ``resume`` or ``new``."""
    epochs = history.checkpoint_epochs(self.workdir, "latest")
    if epochs and epochs[-1] >= self.train_config.warmup_epochs:
      return "done"
    return "resume" if epochs or history.mid_epoch_position(self.workdir) else "new"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study."""
  config: str  # a key of CONFIGS
  seed: int
  workdir: str  # absolute
  result_path: str  # absolute
  train_config: Config
  warmup: Warmup | None = None  # the shared warmup it branches from, if any

  @property
  def name(self) -> str:
    return f"{self.config}_s{self.seed}"

  def flags(self) -> list[str]:
    """Every scripts/train.py flag that defines the run, ``--workdir`` last."""
    return train_flags(self.train_config) + [f"--workdir={repo_path(self.workdir)}"]

  def command(self) -> str:
    """The shell command that reproduces the run from scratch, from the repository root
    (a run branched from its warmup is this run, bit for bit)."""
    return shlex.join(["python", TRAIN_SCRIPT, *self.flags()])

  def start_flags(self) -> list[str]:
    """The flags that start the run: :meth:`flags`, with ``--branch_from`` its warmup."""
    flags = self.flags()
    if self.warmup is None:
      return flags
    return flags[:-1] + [f"--branch_from={repo_path(self.warmup.workdir)}", flags[-1]]

  def state(self) -> str:
    """``done`` (result written), ``resume`` (checkpoints, no result) or ``new``."""
    if os.path.exists(self.result_path):
      return "done"
    return "resume" if (history.checkpoint_epochs(self.workdir, "latest")
                        or history.mid_epoch_position(self.workdir)) else "new"


def warmup_config(config: Config) -> Config:
  """The config of ``config``'s warmup: LSQ alone, every BR-phase field at its default.
  Runs whose configs give the same one train the same warmup, bit for bit."""
  off = {f: getattr(Config(), f) for f in BR_PHASE_FIELDS}
  return dataclasses.replace(config, **{**off, "lambda_w": 0.0, "lambda_a": 0.0})


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


def apply_preset(name: str | None, values: dict, given: set[str]) -> dict:
  """``values`` with the flags of the preset ``name`` (:data:`PRESETS`) in place of those
  not ``given`` explicitly; ``values`` itself without a preset.

  Raises:
    StudyError: an unknown preset.
  """
  if name is None:
    return values
  if name not in PRESETS:
    raise StudyError(f"--preset={name} is not accepted: use one of {', '.join(PRESETS)}")
  return {**values, **{k: v for k, v in PRESETS[name].items() if k not in given}}


def check_study(values: Mapping[str, Any]) -> dict:
  """The study's flags (:data:`STUDY_FLAGS`) from ``values``, checked, paths as
  :func:`repo_path` gives them.

  Args:
    values: every name of STUDY_FLAGS (those of STUDY_DEFAULTS may be left out);
      ``seeds`` and ``configs`` as lists of strings (or seeds as ints), as the
      comma-separated flags give them.

  Raises:
    StudyError: a bit width outside 2..8, a model scripts/train.py does not train, or seeds /
      configs that are not distinct known values (the other flags are checked by
      :func:`plan`).
  """
  if not 2 <= values["bits"] <= 8:
    raise StudyError(f"--bits={values['bits']} is not accepted: use an integer in 2..8 (the "
                     "study compares quantized training)")
  model = values.get("model", STUDY_DEFAULTS["model"])
  if model not in MODELS:
    raise StudyError(f"--model={model} is not accepted: use one of {', '.join(MODELS)}")
  seeds = _parse_list(values["seeds"], "seeds", int,
                      "use distinct comma-separated integers, e.g. --seeds=0,1,2")
  configs = _parse_list(values["configs"], "configs", _known_config,
                        f"use distinct comma-separated names from {', '.join(CONFIGS)}")
  study = {name: values.get(name, STUDY_DEFAULTS.get(name)) for name in STUDY_FLAGS}
  return {**study, "seeds": seeds, "configs": configs,
          "pretrained": repo_path(values["pretrained"]),
          "data_dir": repo_path(values["data_dir"])}


ORDERS = ("seed", "config")
"""The order a study's runs are taken in: ``seed``, every config of a seed, then the next
seed (one seed's whole comparison first); ``config``, every seed of a config, then the next
config (with ``lsq`` and ``lsq_br`` first, their seed-paired comparison first). Results do
not depend on it."""


def plan(study_dir: str, study: dict, share_warmup: bool = True,
         order: str = "seed") -> list[Run]:
  """The study's runs in ``order`` (one of :data:`ORDERS`), each with its validated
  ``Config`` and, with ``share_warmup``, the warmup it branches from.

  With ``share_warmup`` the runs of a seed whose configs have the same
  :func:`warmup_config` branch from one :class:`Warmup` (``warmup_s<seed>``; with several
  warmups in a seed, ``warmup_<first config>_s<seed>``), which the runner trains first.

  Raises:
    StudyError: a value scripts/train.py would refuse (its own one-line message), no BR
      epoch, or an unknown ``order``.
  """
  if order not in ORDERS:
    raise StudyError(f"--order={order} is not accepted: use one of {', '.join(ORDERS)}")
  pairs = [(seed, name) for seed in study["seeds"] for name in study["configs"]]
  if order == "config":
    pairs = [(seed, name) for name in study["configs"] for seed in study["seeds"]]
  # Paths in ``study`` are relative to the repository root, as the runs execute there.
  with contextlib.chdir(REPO):
    runs = [_plan_run(study_dir, study, name, seed) for seed, name in pairs]
    if not share_warmup or study["warmup_epochs"] == 0:
      return runs
    keys = [(run.seed, warmup_config(run.train_config)) for run in runs]
  groups: dict[tuple[int, Config], list[Run]] = {}
  for key, run in zip(keys, runs):
    groups.setdefault(key, []).append(run)
  per_seed = collections.Counter(seed for seed, _ in groups)
  warmups = {}
  for (seed, config), members in groups.items():
    name = (f"warmup_s{seed}" if per_seed[seed] == 1 else
            f"warmup_{members[0].config}_s{seed}")
    warmups[(seed, config)] = Warmup(name, os.path.join(study_dir, name), config)
  return [dataclasses.replace(run, warmup=warmups[key]) for key, run in zip(keys, runs)]


def select(runs: list[Run], names: Sequence[str]) -> list[Run]:
  """The runs of ``runs`` named in ``names`` (``<config>_s<seed>``), in the order of
  ``names``; all of ``runs`` if ``names`` is empty. A part of a study to take now: one
  comparison before the rest, or the share of one machine when several run the study. The
  warmups the selected runs branch from stay theirs (they are trained first if missing).

  Raises:
    StudyError: a name that is not a run of the plan, or a name given twice.
  """
  if not names:
    return runs
  by_name = {run.name: run for run in runs}
  for name in names:
    if name not in by_name:
      raise StudyError(f"--runs={name} is not accepted: it is not a run of this study; use "
                       f"names from {', '.join(by_name)}")
  if len(set(names)) != len(names):
    twice = next(n for n in names if names.count(n) > 1)
    raise StudyError(f"--runs={twice} is not accepted: it is given twice; name each run once")
  return [by_name[name] for name in names]


def warmups(runs: list[Run]) -> list[Warmup]:
  """The distinct warmups of ``runs``, in the order of their first run."""
  return list({r.warmup.name: r.warmup for r in runs if r.warmup is not None}.values())


def _plan_run(study_dir: str, study: dict, name: str, seed: int) -> Run:
  try:
    config = Config(
        model=study.get("model", STUDY_DEFAULTS["model"]), bits_w=study["bits"],
        bits_a=study["bits"], first_last_bits=study.get("first_last_bits"), **CONFIGS[name][1],
        recipe=study.get("recipe", STUDY_DEFAULTS["recipe"]),
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
  saved = {**STUDY_DEFAULTS, **saved}
  diffs = [f"{_format_flag(k, saved.get(k))} there, {_format_flag(k, v)} here"
           for k, v in study.items() if saved.get(k) != v]
  if diffs:
    raise StudyError(f"--study_dir={study_dir} holds a study with other flags "
                     f"({'; '.join(diffs)}): run it again with its own flags to continue "
                     "it, or choose another --study_dir")
  return True
