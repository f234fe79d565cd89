"""Runs the LSQ vs LSQ+BR comparison study: every config and seed, one JSON each, a summary.

    python scripts/experiments.py --study_dir=checkpoints/study_W2A2 \\
        --pretrained=checkpoints/resnet20_float_cifar10 \\
        --data_dir=../shared/datasets/cifar10-jpeg.tar.gz

The study trains ResNet-20 at W<bits>A<bits> (``--bits``, default 2) under each of
``--configs`` for each of ``--seeds``, with the same warmup and BR epochs for all:

* ``lsq``:    ``--lambda_w=0 --lambda_a=0`` (LSQ alone),
* ``lsq_br``: ``--lambda_w=1 --lambda_a=1`` (LSQ + W-BR + A-BR),
* ``w_br``:   ``--lambda_w=1 --lambda_a=0`` (LSQ + W-BR only).

Layout of ``--study_dir``::

    study.json              the study's flags; a later run with other flags is refused
    <config>_s<seed>/       the run's --workdir (checkpoints/, metrics.jsonl, train.log)
    <config>_s<seed>.json   the run's result, written when the run has finished
    summary.json            per config: mean and sample std over seeds, n, the command
    summary.md              the same as a table (also printed at the end)

Each run is one ``scripts/train.py`` process, started with every flag that defines it; the
command is recorded in its result and reproduces the run from the repository root. A
subprocess rather than ``brjax.train.train_and_evaluate`` in this process, because:

* the recorded command is the one that ran, not a flag mapping kept in step by hand;
* every run starts from a fresh JAX runtime (device memory, compiled code, a crash are the
  run's own), as a user reproducing one run will have;
* this process imports ``brjax.config`` (to validate every run before the first starts)
  but never initializes a JAX backend: it holds no accelerator memory the runs need, and
  skipping, ``--dry_run`` and ``--summarize_only`` take about a second.

The cost is a few seconds of start-up per run (imports, data), negligible beside a run.

Resume: a run whose result JSON exists is skipped; a run whose workdir holds checkpoints
but has no result continues with ``--resume`` (same metrics as an uninterrupted run, see
``scripts/train.py``). So a study that was stopped (Ctrl-C, a killed process, the end of a
working session) continues where it stopped when the same command is run again. A running
study holds a lock on its ``study_dir`` (a second one is refused), and a run's process dies
with the study's process. Runs go seed by seed (every config of seed 0 first), so a
stopped study already compares the configs on its first seeds; the summary is rewritten
after each run.

Bad flags stop before any work with a one-line error (exit 2); a failed run stops the
study with one line naming its log (exit 1, or 2 if ``scripts/train.py`` refused its flags
or its checkpoints).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from brjax import cli  # pylint: disable=g-import-not-at-top

TRAIN_SCRIPT = os.path.join("scripts", "train.py")

# name -> (description, lambda_w, lambda_a), in the order of the summary.
CONFIGS = {
    "lsq": ("LSQ", 0.0, 0.0),
    "lsq_br": ("LSQ + W-BR + A-BR", 1.0, 1.0),
    "w_br": ("LSQ + W-BR", 1.0, 0.0),
}

FLAGS = flags.FlagValues()
flags.DEFINE_string("study_dir", None, "Folder of the study: runs, results, summary "
                    "(required).", flag_values=FLAGS)
flags.DEFINE_string("pretrained", None, "Workdir of a float baseline run: every run starts "
                    "from it, and the summary shows its accuracy.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Local images (a folder or .tar.gz, as "
                    "scripts/train.py takes); unset: tensorflow-datasets cifar10.",
                    flag_values=FLAGS)
flags.DEFINE_integer("bits", 2, "Weight and activation bit width of the study (2..8).",
                     flag_values=FLAGS)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, comma-separated.", flag_values=FLAGS)
flags.DEFINE_list("configs", list(CONFIGS), f"Configs, comma-separated, from "
                  f"{', '.join(CONFIGS)}.", flag_values=FLAGS)
flags.DEFINE_integer("warmup_epochs", 30, "LSQ-only epochs before BR (every config).",
                     flag_values=FLAGS)
flags.DEFINE_integer("epochs", 100, "Total epochs, warmup included.", flag_values=FLAGS)
flags.DEFINE_float("lr", 0.01, "Peak learning rate (the rate for QAT from a float model).",
                   flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 128, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_integer("train_examples", 0, "Use the first N training images (0 = all).",
                     flag_values=FLAGS)
flags.DEFINE_integer("test_examples", 0, "Use the first N test images (0 = all).",
                     flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print each run's state and command; run and write "
                  "nothing.", flag_values=FLAGS)
flags.DEFINE_bool("summarize_only", False, "Only rebuild summary.json and summary.md from "
                  "the result JSONs in --study_dir.", flag_values=FLAGS)

# The flags stored in study.json: a study continues only with the same values.
STUDY_FLAGS = ("bits", "seeds", "configs", "warmup_epochs", "epochs", "lr", "batch_size",
               "train_examples", "test_examples", "pretrained", "data_dir")
RESULT_RE = re.compile(r"^(?P<config>\w+?)_s(?P<seed>-?\d+)\.json$")
RESULT_KEYS = ("config", "seed", "command", "final_test_acc", "best_test_acc",
               "final_train_acc")
# Prints a JSON description of the devices and JAX version the runs will see.
DEVICE_PROBE = """\
import importlib.metadata, json, jax
d = jax.devices()
print(json.dumps({"platform": d[0].platform, "device_kind": d[0].device_kind,
                  "device_count": len(d), "jax_version": jax.__version__,
                  "jaxlib_version": importlib.metadata.version("jaxlib")}))
"""


class StudyError(ValueError):
  """Bad input (flags, a study_dir of another study, malformed results): exit 2."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study."""
  config: str  # a key of CONFIGS
  seed: int
  workdir: str  # absolute
  result_path: str  # absolute
  train_config: Any  # brjax.config.Config

  @property
  def name(self) -> str:
    return f"{self.config}_s{self.seed}"

  def flags(self) -> list[str]:
    """Every scripts/train.py flag that defines the run, ``--workdir`` last."""
    return train_flags(self.train_config) + [f"--workdir={repo_path(self.workdir)}"]

  def command(self) -> str:
    """The shell command that reproduces the run, from the repository root."""
    return shlex.join(["python", TRAIN_SCRIPT, *self.flags()])

  def has_checkpoint(self) -> bool:
    """Whether ``checkpoints/latest/<epoch>/`` exists (what ``--resume`` continues from)."""
    latest = os.path.join(self.workdir, "checkpoints", "latest")
    return os.path.isdir(latest) and any(n.isdigit() for n in os.listdir(latest))

  def state(self) -> str:
    """``done`` (result written), ``resume`` (checkpoints, no result) or ``new``."""
    if os.path.exists(self.result_path):
      return "done"
    return "resume" if self.has_checkpoint() else "new"


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)  # round-trips exactly
  return str(value)


def train_flags(config) -> list[str]:
  """``config`` (a ``brjax.config.Config``) as scripts/train.py flags, every field explicit.

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


# ------------------------------------------------------------------ flags and study


def _abspath(path: str | None) -> str | None:
  return None if path is None else os.path.abspath(os.path.expanduser(path))


def repo_path(path: str | None) -> str | None:
  """``path`` as the runs see it: relative to the repository root (where every run executes)
  if it lies in the repository or beside it (``../shared/...``), else absolute.

  So recorded commands and study.json hold no machine-specific prefix for a checkout with
  its data beside it, and reproduce from any clone's root.
  """
  if path is None:
    return None
  absolute = _abspath(path)
  relative = os.path.relpath(absolute, REPO)
  return absolute if relative.startswith(os.pardir + os.sep + os.pardir) else relative


def _parse_list(values: list[str], flag: str, convert, accepted: str) -> list:
  text = ",".join(values)
  try:
    items = [convert(v.strip()) for v in values]
  except ValueError:
    items = None
  if not items or len(set(items)) != len(items):
    raise StudyError(f"--{flag}={text} is not accepted: {accepted}")
  return items


def _known_config(name: str) -> str:
  if name not in CONFIGS:
    raise ValueError(name)
  return name


def study_flags(values: flags.FlagValues) -> dict:
  """The study's flags (STUDY_FLAGS) from parsed flags, checked; paths made absolute."""
  if not (2 <= values.bits <= 8):
    raise StudyError(f"--bits={values.bits} is not accepted: use an integer in 2..8 (the "
                     "study compares quantized training)")
  seeds = _parse_list(values.seeds, "seeds", int,
                      "use distinct comma-separated integers, e.g. --seeds=0,1,2")
  configs = _parse_list(values.configs, "configs", _known_config,
                        f"use distinct comma-separated names from {', '.join(CONFIGS)}")
  return {"bits": values.bits, "seeds": seeds, "configs": configs,
          "warmup_epochs": values.warmup_epochs, "epochs": values.epochs, "lr": values.lr,
          "batch_size": values.batch_size, "train_examples": values.train_examples,
          "test_examples": values.test_examples, "pretrained": repo_path(values.pretrained),
          "data_dir": repo_path(values.data_dir)}


def plan(study_dir: str, study: dict) -> list[Run]:
  """The study's runs, seed by seed, each with its validated ``Config``.

  Raises:
    StudyError: a value scripts/train.py would refuse (its own one-line message), or no BR
      epoch.
  """
  runs = []
  # Paths in ``study`` are relative to the repository root, as the runs execute there.
  with contextlib.chdir(REPO):
    for seed in study["seeds"]:
      for name in study["configs"]:
        runs.append(_plan_run(study_dir, study, name, seed))
  return runs


def _plan_run(study_dir: str, study: dict, name: str, seed: int) -> Run:
  from brjax.config import Config  # pylint: disable=g-import-not-at-top
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


def check_study_file(study_dir: str, study: dict) -> bool:
  """Whether ``study.json`` exists; StudyError if it holds other flags than ``study``."""
  path = os.path.join(study_dir, "study.json")
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      saved = json.load(f)["flags"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise StudyError(f"{path} could not be read ({type(e).__name__}: {e}): move it away to "
                     "start a new study there, or choose another --study_dir") from None
  diffs = [f"{_format_flag(k, saved.get(k))} there, {_format_flag(k, v)} here"
           for k, v in study.items() if saved.get(k) != v]
  if diffs:
    raise StudyError(f"--study_dir={study_dir} holds a study with other flags "
                     f"({'; '.join(diffs)}): run it again with its own flags to continue "
                     "it, or choose another --study_dir")
  return True


def _write_json(path: str, data: Any) -> None:
  """Writes ``data`` as JSON atomically (a stopped study never leaves half a file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _lock(study_dir: str):
  """Holds an exclusive lock on the study (released by the kernel when this process ends)."""
  path = os.path.join(study_dir, ".lock")
  f = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise StudyError(f"--study_dir={study_dir} is in use by another scripts/experiments.py "
                     f"(pid {holder}): wait for it to finish, or stop it first") from None
  f.seek(0)
  f.truncate()
  f.write(str(os.getpid()))
  f.flush()
  return f


# ------------------------------------------------------------------ running


try:  # resolved here: nothing may be imported between fork and exec
  _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
  _PRCTL = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL when the study's process dies (Linux), so that a
  killed study never leaves a run training on its own (orbax checkpoints are atomic)."""
  if _PRCTL is not None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _log_line(line: str) -> str:
  """A terminal line as a log line: progress bars rewritten with ``\\r`` keep their end."""
  return line.rsplit("\r", 1)[-1].rstrip()


def execute(argv: list[str], log_path: str) -> tuple[int, float, str]:
  """Runs ``argv``, streaming its output here and (without progress bars) to ``log_path``.

  Returns:
    ``(exit code, wall time in seconds, last non-empty output line)``.
  """
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  start = time.monotonic()
  last, pending = "", ""
  with open(log_path, "a") as log:
    log.write(f"# {_now()} {shlex.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                            env=env, preexec_fn=_die_with_parent)
    try:
      while chunk := proc.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        *lines, pending = (pending + chunk.decode(errors="replace")).split("\n")
        for line in map(_log_line, lines):
          log.write(line + "\n")
          last = line or last
      proc.wait()
    finally:
      if proc.poll() is None:  # interrupted: the run resumes from its last checkpoint
        proc.kill()
        proc.wait()
    if pending.strip():
      log.write(_log_line(pending) + "\n")
      last = _log_line(pending) or last
  return proc.returncode, time.monotonic() - start, last


def probe_device() -> dict:
  """The platform, device kind and count, and JAX versions that a run's process sees."""
  proc = subprocess.run([sys.executable, "-c", DEVICE_PROBE], capture_output=True, text=True,
                        cwd=REPO, timeout=600, check=False)
  try:
    info = json.loads(proc.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    info = {"error": err[:200]}
  info["host"] = socket.gethostname()
  return info


def git_commit() -> dict:
  """The repository's commit and whether tracked files differ from it (read-only git)."""
  env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never touch the index
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=30, check=False)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True,
                           cwd=REPO, env=env, timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return {"commit": None, "dirty": None}
  commit = head.stdout.strip() if head.returncode == 0 else None
  return {"commit": commit, "dirty": {0: False, 1: True}.get(dirty.returncode)}


def read_metrics(workdir: str) -> list[dict]:
  """The epoch records of ``<workdir>/metrics.jsonl`` (written by brjax.train)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def build_result(run: Run, wall_time_s: float, resumed_from: int | None, device: dict,
                 git: dict) -> dict:
  """The result of a finished run, from its metrics.jsonl."""
  history = read_metrics(run.workdir)
  config = run.train_config
  if not history or history[-1]["epoch"] != config.epochs:
    ended = history[-1]["epoch"] if history else "no epoch"
    raise RuntimeError(f"run {run.name} exited without error but its metrics.jsonl ends at "
                       f"{ended}, not epoch {config.epochs}")
  last = history[-1]
  best_epoch = max(history, key=lambda m: m["test_acc"])["epoch"]
  description, lambda_w, lambda_a = CONFIGS[run.config]
  return {
      "config": run.config, "seed": run.seed, "description": description,
      "lambda_w": lambda_w, "lambda_a": lambda_a,
      "bits_w": config.bits_w, "bits_a": config.bits_a,
      "command": run.command(), "workdir": run.workdir,
      "epochs": config.epochs, "warmup_epochs": config.warmup_epochs,
      "final_test_acc": last["test_acc"], "best_test_acc": last["best_test_acc"],
      "best_epoch": best_epoch, "final_train_acc": last["train_acc"],
      "final_test_loss": last["test_loss"], "br_w": last["br_w"], "br_a": last["br_a"],
      "wall_time_s": wall_time_s,
      "train_time_s": sum(m["epoch_time_s"] for m in history),
      "resumed_from_epoch": resumed_from,
      "device": {k: v for k, v in device.items() if not k.endswith("_version")},
      "jax_version": device.get("jax_version"), "jaxlib_version": device.get("jaxlib_version"),
      "python_version": sys.version.split()[0], "git": git, "finished": _now(),
  }


def _latest_checkpoint_epoch(workdir: str) -> int:
  latest = os.path.join(workdir, "checkpoints", "latest")
  return max(int(n) for n in os.listdir(latest) if n.isdigit())


def run_study(study_dir: str, study: dict, runs: list[Run]) -> int:
  """Runs every unfinished run in order, writing its result; returns the exit code."""
  os.makedirs(study_dir, exist_ok=True)
  lock = _lock(study_dir)
  try:
    if not check_study_file(study_dir, study):
      _write_json(os.path.join(study_dir, "study.json"), {
          "flags": study, "created": _now(),
          "command": shlex.join(["python", os.path.join("scripts", "experiments.py"),
                                 *sys.argv[1:]])})
    device, git = None, None
    for i, run in enumerate(runs, 1):
      head = f"[{i}/{len(runs)}] {run.name}"
      state = run.state()
      if state == "done":
        print(f"{head}: skip, its result exists ({run.result_path})", flush=True)
        continue
      argv = [sys.executable, os.path.join(REPO, TRAIN_SCRIPT), *run.flags()]
      resumed_from = None
      if state == "resume":
        resumed_from = _latest_checkpoint_epoch(run.workdir)
        argv.append("--resume")
      if device is None:  # once per invocation, and only if something runs
        device, git = probe_device(), git_commit()
      what = f"resume from epoch {resumed_from}" if state == "resume" else "start"
      print(f"{head}: {what}\n{run.command()}{' --resume' if state == 'resume' else ''}",
            flush=True)
      os.makedirs(run.workdir, exist_ok=True)
      log_path = os.path.join(run.workdir, "train.log")
      code, wall, last = execute(argv, log_path)
      if code != 0:
        print(f"error: run {run.name} failed (exit {code}): {last[:300]} (log: {log_path}); "
              "fix the cause and run the study again to continue", file=sys.stderr)
        return 2 if code == 2 else 1
      try:
        result = build_result(run, wall, resumed_from, device, git)
      except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: run {run.name} left no usable metrics ({type(e).__name__}: {e}) "
              f"(log: {log_path})", file=sys.stderr)
        return 1
      _write_json(run.result_path, result)
      print(f"{head}: done in {wall:.0f}s: final test acc {result['final_test_acc']:.2f}%, "
            f"best {result['best_test_acc']:.2f}% -> {run.result_path}", flush=True)
      write_summary(study_dir, study, study["pretrained"])
  finally:
    lock.close()
  return 0


# ------------------------------------------------------------------ summary


def collect_results(study_dir: str) -> list[dict]:
  """Every ``<config>_s<seed>.json`` result in ``study_dir``, by config order then seed."""
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
    results.append(result)
  order = {name: i for i, name in enumerate(CONFIGS)}
  return sorted(results, key=lambda r: (order.get(r["config"], len(order)), r["config"],
                                        r["seed"]))


def mean_std(values: list[float]) -> dict:
  """Mean and sample standard deviation (n - 1; None for one value) of ``values``."""
  return {"mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "values": list(values)}


def command_template(result: dict) -> str:
  """The result's command with its seed (in ``--seed`` and ``--workdir``) as ``{seed}``."""
  seed, mark = str(result["seed"]), "SEED_PLACEHOLDER"
  words = shlex.split(result["command"])
  for i, word in enumerate(words):
    if word == f"--seed={seed}":
      words[i] = f"--seed={mark}"
    elif word.startswith("--workdir=") and word.endswith(f"_s{seed}"):
      words[i] = word[:-len(seed)] + mark
  return shlex.join(words).replace(mark, "{seed}")


def read_baseline(pretrained: str) -> dict:
  """The float baseline's accuracy from ``<pretrained>/metrics.jsonl`` (``pretrained``
  relative to the repository root, or absolute)."""
  baseline = {"workdir": pretrained, "final_test_acc": None, "best_test_acc": None,
              "epochs": None}
  try:
    history = read_metrics(os.path.join(REPO, pretrained))  # relative to the repository
  except (OSError, ValueError) as e:
    baseline["error"] = f"no readable metrics.jsonl ({type(e).__name__})"
    return baseline
  if history:
    baseline.update(final_test_acc=history[-1].get("test_acc"),
                    best_test_acc=history[-1].get("best_test_acc"),
                    epochs=history[-1].get("epoch"), phase=history[-1].get("phase"))
  return baseline


def summarize(results: list[dict], study: dict | None, pretrained: str | None) -> dict:
  """summary.json: per config the mean and sample std over seeds; the float baseline.

  Args:
    results: run results (``collect_results``).
    study: the study's flags (study.json), or None if unknown.
    pretrained: the float baseline's workdir, or None.
  """
  configs = {}
  for result in results:
    configs.setdefault(result["config"], []).append(result)
  out = {"study": study, "baseline": read_baseline(pretrained) if pretrained else None,
         "configs": {}}
  for name, rows in configs.items():
    templates = sorted({command_template(r) for r in rows})
    if len(templates) > 1:
      raise StudyError(f"the results of config {name} were run with different commands "
                       f"(seeds {[r['seed'] for r in rows]}): keep one study per --study_dir")
    out["configs"][name] = {
        "description": rows[0].get("description", CONFIGS.get(name, (name,))[0]),
        "n": len(rows), "seeds": [r["seed"] for r in rows],
        "final_test_acc": mean_std([r["final_test_acc"] for r in rows]),
        "best_test_acc": mean_std([r["best_test_acc"] for r in rows]),
        "final_train_acc": mean_std([r["final_train_acc"] for r in rows]),
        "command_template": templates[0],
    }
  return out


def _pm(stats: dict) -> str:
  std = "n/a" if stats["std"] is None else f"{stats['std']:.2f}"
  return f"{stats['mean']:.2f} ± {std}"


def _acc(value) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def summary_markdown(summary: dict) -> str:
  """The summary as a Markdown table, then the command template of each config."""
  study = summary["study"]
  if study is not None:
    title = f"# LSQ vs LSQ+BR: ResNet-20 W{study['bits']}A{study['bits']}"
    data = study["data_dir"] or "tensorflow-datasets cifar10"
    for split in ("train", "test"):
      if study[f"{split}_examples"]:
        data += f", first {study[f'{split}_examples']} {split} images"
    setup = (f"{study['epochs']} epochs ({study['warmup_epochs']} LSQ warmup, then BR), "
             f"lr {study['lr']:g}, batch {study['batch_size']}, seeds "
             f"{','.join(map(str, study['seeds']))}; data: {data}; from "
             f"{study['pretrained'] or 'scratch'}.")
    lines = [title, "", setup, ""]
  else:
    lines = ["# LSQ vs LSQ+BR", ""]
  lines += ["| config | training | n | final test acc (%) | best test acc (%) | "
            "final train acc (%) |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
  baseline = summary["baseline"]
  if baseline is not None:
    lines.append(f"| float baseline | float, {baseline['epochs'] or '?'} epochs | 1 | "
                 f"{_acc(baseline['final_test_acc'])} | {_acc(baseline['best_test_acc'])} | "
                 "n/a |")
  for name, c in summary["configs"].items():
    lines.append(f"| {name} | {c['description']} | {c['n']} | {_pm(c['final_test_acc'])} | "
                 f"{_pm(c['best_test_acc'])} | {_pm(c['final_train_acc'])} |")
  lines += ["", "Mean ± sample standard deviation over the n seeds (n/a for one seed); "
            "test accuracy is always quantized.", "", "Commands (from the repository root; "
            "one run per seed):", ""]
  lines += [f"- `{name}`: `{c['command_template']}`" for name, c in summary["configs"].items()]
  if baseline is not None and baseline.get("error"):
    lines += ["", f"Float baseline {baseline['workdir']}: {baseline['error']}."]
  return "\n".join(lines) + "\n"


def write_summary(study_dir: str, study: dict | None, pretrained: str | None) -> str:
  """Writes summary.json and summary.md from the results in ``study_dir``; returns the table.

  Raises:
    StudyError: a malformed result, or none at all.
  """
  results = collect_results(study_dir)
  if not results:
    raise StudyError(f"--study_dir={study_dir} holds no result (<config>_s<seed>.json): run "
                     "the study first")
  summary = summarize(results, study, pretrained)
  markdown = summary_markdown(summary)
  _write_json(os.path.join(study_dir, "summary.json"), summary)
  tmp = os.path.join(study_dir, f"summary.md.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(markdown)
  os.replace(tmp, os.path.join(study_dir, "summary.md"))
  return markdown


def summarize_only(study_dir: str, pretrained: str | None) -> int:
  """--summarize_only: rebuilds and prints the summary of the results in ``study_dir``.

  The study's flags come from its study.json if there is one; ``pretrained`` (if given)
  replaces the baseline workdir recorded there.
  """
  if not os.path.isdir(study_dir):
    raise StudyError(f"--study_dir={study_dir} is not accepted: no such folder")
  path = os.path.join(study_dir, "study.json")
  study = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        study = json.load(f)["flags"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise StudyError(f"{path} could not be read ({type(e).__name__}: {e})") from None
  if pretrained is None and study is not None:
    pretrained = study.get("pretrained")
  print(write_summary(study_dir, study, pretrained), end="")
  return 0


# ------------------------------------------------------------------ main


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    if not FLAGS.study_dir:
      raise StudyError("--study_dir is required: the folder of the study's runs, results "
                       "and summary")
    study_dir = _abspath(FLAGS.study_dir)
    if os.path.exists(study_dir) and not os.path.isdir(study_dir):
      raise StudyError(f"--study_dir={FLAGS.study_dir} is not accepted: it is a file; use a "
                       "folder (new or of this study)")
    if FLAGS.summarize_only:
      others = [f"--{n}" for n in STUDY_FLAGS + ("dry_run",)
                if FLAGS[n].present and n != "pretrained"]
      if others:
        raise StudyError(f"--summarize_only reads the study's flags from study.json: leave "
                         f"out {', '.join(others)}")
      return summarize_only(study_dir, repo_path(FLAGS.pretrained))
    study = study_flags(FLAGS)
    runs = plan(study_dir, study)
    if FLAGS.dry_run:
      check_study_file(study_dir, study)
      for run in runs:
        state = run.state()
        extra = " --resume" if state == "resume" else ""
        print(f"{run.name} ({'skip' if state == 'done' else state}): {run.command()}{extra}")
      return 0
    code = run_study(study_dir, study, runs)
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("\ninterrupted: run the same command again to continue the study (finished runs "
          "are kept, the current one resumes from its last checkpoint)", file=sys.stderr)
    return 130
  if code == 0:
    try:
      print("\n" + write_summary(study_dir, study, study["pretrained"]), end="")
    except StudyError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv))
