"""Runs a study (``brjax.studies.study``): one child process per training run, then its result.

The study holds a lock on its folder; each run is a ``scripts/train.py`` process that dies
with the study's (Linux), whose output is streamed to the terminal and to the run's
``train.log`` without progress-bar redraws; the devices and the code version the runs see
are recorded in every result. A seed's shared warmup (``study.Warmup``) is trained just
before the first run that branches from it. Standard library only: no JAX in this process.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from brjax.studies import results as study_results
from brjax.studies import study
from brjax.studies import summary as study_summary
from brjax.training import history, run_control
from brjax.training.config import BR_PHASE_FIELDS

# Prints a JSON description of the devices and JAX version the runs will see.
DEVICE_PROBE = """\
import importlib.metadata, json, jax
d = jax.devices()
print(json.dumps({"platform": d[0].platform, "device_kind": d[0].device_kind,
                  "device_count": len(d), "jax_version": jax.__version__,
                  "jaxlib_version": importlib.metadata.version("jaxlib")}))
"""

try:  # resolved here: nothing may be imported between fork and exec
  _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
  _PRCTL = None
_PR_SET_PDEATHSIG = 1


def now() -> str:
  """The current UTC time, ISO 8601 to the second."""
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL when the study's process dies (Linux), so that a
  killed study never leaves a run training on its own (orbax checkpoints are atomic)."""
  if _PRCTL is not None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def log_line(line: str) -> str:
  """A terminal line as a log line: progress bars rewritten with ``\\r`` keep their end."""
  return line.rsplit("\r", 1)[-1].rstrip()


def execute(argv: list[str], log_path: str, cwd: str) -> tuple[int, float, str]:
  """Runs ``argv`` in ``cwd``, streaming its output to stdout and (without progress bars)
  appending it to ``log_path``, after a ``# <time> <command>`` header.

  Returns:
    ``(exit code, wall time in seconds, last non-empty output line)``.
  """
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  start = time.monotonic()
  last, pending = "", ""
  with open(log_path, "a") as log:
    log.write(f"# {now()} {shlex.join(argv)}\n")
    log.flush()
    # Its own session: a Ctrl-C in the terminal reaches the study alone, which passes it
    # on once (two would stop the run without its save).
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            env=env, preexec_fn=_die_with_parent, start_new_session=True)
    try:
      with _ForwardSignals(proc) as forwarded:
        while chunk := proc.stdout.read1(65536):
          sys.stdout.buffer.write(chunk)
          sys.stdout.flush()
          *lines, pending = (pending + chunk.decode(errors="replace")).split("\n")
          for line in map(log_line, lines):
            log.write(line + "\n")
            last = line or last
        proc.wait()
    finally:
      if proc.poll() is None:  # the study itself failed: the run resumes from its last save
        proc.kill()
        proc.wait()
    if pending.strip():
      log.write(log_line(pending) + "\n")
      last = log_line(pending) or last
  if forwarded.signal is not None:  # the run saved where it stopped (or was stopped twice)
    raise run_control.Interrupted("", None, None, forwarded.signal)
  return proc.returncode, time.monotonic() - start, last


class _ForwardSignals:
  """Within it (in the main thread), SIGINT and SIGTERM to the study are passed on to the
  run's process, which saves where it stops and exits; ``signal`` names the first one."""

  def __init__(self, proc: subprocess.Popen):
    self.proc, self.signal, self._previous = proc, None, {}

  def __enter__(self) -> _ForwardSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._forward)
    return self

  def _forward(self, signum, frame) -> None:
    del frame
    self.signal = self.signal or signal.Signals(signum).name
    if self.proc.poll() is None:
      self.proc.send_signal(signum)

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def probe_device(cwd: str) -> dict:
  """The platform, device kind and count, and JAX versions that a run's process sees (a
  child process: this one never initializes a JAX backend), and this host's name."""
  proc = subprocess.run([sys.executable, "-c", DEVICE_PROBE], capture_output=True, text=True,
                        cwd=cwd, timeout=600, check=False)
  try:
    info = json.loads(proc.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    info = {"error": err[:200]}
  info["host"] = socket.gethostname()
  return info


def git_commit(repo: str) -> dict:
  """``{"commit", "dirty"}`` of the git checkout at ``repo`` (read-only git; None when
  unknown): the commit, and whether tracked files outside ``checkpoints/`` differ from it
  (the code and docs that ran; a study rewrites its own tracked summary there as it goes)."""
  env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never touch the index
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=repo, env=env, timeout=30, check=False)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".",
                            ":(exclude)checkpoints"], capture_output=True, cwd=repo, env=env,
                           timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return {"commit": None, "dirty": None}
  commit = head.stdout.strip() if head.returncode == 0 else None
  return {"commit": commit, "dirty": {0: False, 1: True}.get(dirty.returncode)}


# ------------------------------------------------------------------ a study


# Per-epoch values a result keeps (its "curve"), for the study's figure without the runs.
CURVE_KEYS = ("epoch", "phase", "train_acc", "test_acc", "test_loss", "br_w", "br_a")


def step_size_curve(records: list[dict]) -> list[dict]:
  """Per epoch of ``records`` (metrics.jsonl lines), ``{"epoch", "weights": {layer: alpha},
  "activations": {layer: alpha}}``: each quantizer's step size (the mean over its channels,
  as ``brjax.quant.metrics`` reports it) after that epoch. An epoch without quantization metrics
  (a float run) has ``None`` for both."""
  def alphas(m, kind):
    quant = m.get("quant")
    return None if quant is None else {layer: q["alpha"] for layer, q in quant[kind].items()}

  return [{"epoch": m["epoch"], "weights": alphas(m, "weights"),
           "activations": alphas(m, "activations")} for m in records]


def build_result(run: study.Run, wall_time_s: float, resumed_from: int | None, device: dict,
                 git: dict, diverged: tuple[int, str] | None = None) -> dict:
  """The result of a run that ended, from its metrics.jsonl (per epoch the
  :data:`CURVE_KEYS` in ``"curve"`` and the step sizes in ``"step_sizes"``
  (:func:`step_size_curve`), warmup epochs included).

  ``"outcome"`` is ``"finished"`` (the accuracies are its last epoch's) or, with
  ``diverged`` (``(epoch, what)`` of scripts/train.py's message), ``"diverged"``: the run
  stopped at that epoch, which was not saved; ``"diverged"`` holds the epoch and what went
  wrong, the accuracies are None and the curve ends at the epoch before.

  Raises:
    RuntimeError: the history does not end at the run's last epoch (finished) or at the
      epoch before the diverged one.
    OSError, ValueError: no readable history.
  """
  records = history.read_history(run.workdir, missing_ok=diverged is not None)
  config = run.train_config
  end = config.epochs if diverged is None else diverged[0] - 1
  ended = records[-1]["epoch"] if records else 0
  if ended != end:
    what = "exited without error" if diverged is None else f"diverged at epoch {diverged[0]}"
    raise RuntimeError(f"run {run.name} {what} but its metrics.jsonl ends at "
                       f"{ended or 'no epoch'}, not epoch {end}")
  if diverged is None:
    last = records[-1]
    outcome = {"outcome": "finished", "diverged": None,
               "final_test_acc": last["test_acc"], "best_test_acc": last["best_test_acc"],
               "best_epoch": max(records, key=lambda m: m["test_acc"])["epoch"],
               "final_train_acc": last["train_acc"], "final_test_loss": last["test_loss"],
               "br_w": last["br_w"], "br_a": last["br_a"]}
  else:
    outcome = {"outcome": "diverged", "diverged": {"epoch": diverged[0], "what": diverged[1]},
               **dict.fromkeys(("final_test_acc", "best_test_acc", "best_epoch",
                                "final_train_acc", "final_test_loss", "br_w", "br_a"))}
  return {
      "config": run.config, "seed": run.seed, "description": study.CONFIGS[run.config][0],
      "lambda_w": config.lambda_w, "lambda_a": config.lambda_a,
      "br_flags": {k: v for k, v in dataclasses.asdict(config).items()
                   if k in BR_PHASE_FIELDS},
      "model": config.model, "bits_w": config.bits_w, "bits_a": config.bits_a,
      "first_last_bits": config.first_last_bits,
      "command": run.command(), "workdir": run.workdir,
      "warmup_source": warmup_source(run),
      "epochs": config.epochs, "warmup_epochs": config.warmup_epochs, **outcome,
      "wall_time_s": wall_time_s,
      "train_time_s": sum(m["epoch_time_s"] for m in records),
      "resumed_from_epoch": resumed_from,
      "device": {k: v for k, v in device.items() if not k.endswith("_version")},
      "jax_version": device.get("jax_version"), "jaxlib_version": device.get("jaxlib_version"),
      "python_version": sys.version.split()[0], "git": git, "finished": now(),
      "curve": [{k: m.get(k) for k in CURVE_KEYS} for m in records],
      "step_sizes": step_size_curve(records),
  }


def warmup_source(run: study.Run) -> dict | None:
  """Where the run's warmup came from: ``{"workdir", "epoch", "command"}`` of the warmup
  it branched from (its checkpoints' ``branched_from``; the command when it is the run's
  planned warmup), or None if it trained its own warmup."""
  try:
    branched = history.read_checkpoint_meta(run.workdir).get("branched_from")
  except (OSError, ValueError):
    branched = None
  if not branched:
    return None
  warmup = run.warmup
  planned = warmup is not None and study.repo_path(warmup.workdir) == branched["workdir"]
  return {**branched, "command": warmup.command() if planned else None}


@contextlib.contextmanager
def _lock(study_dir: str):
  """Holds an exclusive lock on the study (released by the kernel if this process dies).

  Raises:
    study.StudyError: another process holds it.
  """
  with open(os.path.join(study_dir, ".lock"), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise study.StudyError(f"--study_dir={study_dir} is in use by another "
                             f"scripts/experiments.py (pid {holder}): wait for it to "
                             "finish, or stop it first") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield


def run_study(study_dir: str, flags: dict, command: str, share_warmup: bool = True,
              order: str = "seed", only: Sequence[str] = ()) -> int:
  """Runs every unfinished run of the study in order, writing its result; returns the exit
  code (0, 1 if a run failed, 2 if scripts/train.py refused its flags or checkpoints). A
  run that diverged did not fail: its result says so (``build_result``) and the study goes
  on.

  Prints each run's state, command and output as it goes, and the summary table at the end.

  Args:
    study_dir: the study's folder (absolute).
    flags: the study's flags, from ``study.check_study``.
    command: the command line that started the study, recorded in a new study.json.
    share_warmup: train each seed's warmup once and branch its runs from it (see
      ``brjax.studies.study``); off: every run trains its own warmup.
    order: the order of the runs (``study.ORDERS``); a warmup is trained before the first
      run that needs it.
    only: run names (``<config>_s<seed>``) to take, in that order; empty: every run. The
      summary still covers every result of the study.

  Raises:
    study.StudyError: as ``study.plan`` and ``study.select``; another process holds the
      study; other flags in
      its study.json; a malformed result.
    run_control.Interrupted: Ctrl-C or SIGTERM, passed on to the current run, which saved
      where it stopped and resumes there when the study is run again
      (``Interrupted.signal`` names it).
  """
  runs = study.select(study.plan(study_dir, flags, share_warmup, order), only)
  os.makedirs(study_dir, exist_ok=True)
  with _lock(study_dir):
    if not study.check_study_file(study_dir, flags):
      study_summary.write_json(os.path.join(study_dir, "study.json"), {
          "flags": flags, "created": now(), "command": command})
    probes = {}  # the devices and commit, probed once and only if a run starts
    for i, run in enumerate(runs, 1):
      head = f"[{i}/{len(runs)}] {run.name}"
      if run.warmup is not None and run.state() == "new" and run.warmup.state() != "done":
        code = _run_warmup(run.warmup, f"{head}: warmup {run.warmup.name}")
        if code:
          return code
      code = _run_one(run, head, probes)
      if code:
        return code
      if code is not None:
        study_results.write_summary(study_dir, flags, flags["pretrained"])
  print("\n" + study_results.write_summary(study_dir, flags, flags["pretrained"]), end="")
  return 0


def _run_warmup(warmup: study.Warmup, head: str) -> int:
  """Trains (or resumes) a shared warmup up to the end of its warmup; 0, else the study's
  exit code (a one-line error printed)."""
  argv = [sys.executable, os.path.join(study.REPO, study.TRAIN_SCRIPT), *warmup.flags()]
  state = warmup.state()
  if state == "resume":
    argv.append("--resume")
  print(f"{head}: {'resume' if state == 'resume' else 'start'}\n{warmup.command()}"
        f"{' --resume' if state == 'resume' else ''}", flush=True)
  os.makedirs(warmup.workdir, exist_ok=True)
  log_path = os.path.join(warmup.workdir, "train.log")
  code, wall, last = execute(argv, log_path, study.REPO)
  if code == 0 and warmup.state() != "done":
    code, last = 1, f"no checkpoint of epoch {warmup.train_config.warmup_epochs} was left"
  if code != 0:
    print(f"error: warmup {warmup.name} failed (exit {code}): {last[:300]} (log: "
          f"{log_path}); fix the cause and run the study again to continue", file=sys.stderr)
    return 2 if code == 2 else 1
  print(f"{head}: done in {wall:.0f}s", flush=True)
  return 0


def _run_one(run: study.Run, head: str, probes: dict) -> int | None:
  """Runs ``run`` unless its result exists (None); 0 once its result is written, else the
  study's exit code (a one-line error printed)."""
  state = run.state()
  if state == "done":
    print(f"{head}: skip, its result exists ({run.result_path})", flush=True)
    return None
  argv = [sys.executable, os.path.join(study.REPO, study.TRAIN_SCRIPT), *run.start_flags()]
  command = shlex.join(["python", study.TRAIN_SCRIPT, *run.start_flags()])
  resumed_from, where = None, None
  if state == "resume":
    resumed_from = (history.checkpoint_epochs(run.workdir, "latest") or [0])[-1]
    position = history.mid_epoch_position(run.workdir)
    where = (f"epoch {position[0]} step {position[1]}" if position else
             f"epoch {resumed_from}")
    argv = argv[:2] + run.flags() + ["--resume"]
    command = run.command() + " --resume"
  if not probes:
    probes.update(device=probe_device(study.REPO), git=git_commit(study.REPO))
  what = (f"resume from {where}" if state == "resume" else
          f"branch from {run.warmup.name}" if run.warmup is not None else "start")
  print(f"{head}: {what}\n{command}", flush=True)
  os.makedirs(run.workdir, exist_ok=True)
  log_path = os.path.join(run.workdir, "train.log")
  code, wall, last = execute(argv, log_path, study.REPO)
  # A diverged run is an outcome of its config, kept as its result: the study goes on.
  diverged = run_control.parse_diverged(last) if code == run_control.EXIT_DIVERGED else None
  if code != 0 and diverged is None:
    print(f"error: run {run.name} failed (exit {code}): {last[:300]} (log: {log_path}); "
          "fix the cause and run the study again to continue", file=sys.stderr)
    return 2 if code == 2 else 1
  try:
    result = build_result(run, wall, resumed_from, probes["device"], probes["git"], diverged)
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    print(f"error: run {run.name} left no usable metrics ({type(e).__name__}: {e}) "
          f"(log: {log_path})", file=sys.stderr)
    return 1
  study_summary.write_json(run.result_path, result)
  if diverged is not None:
    print(f"{head}: diverged at epoch {diverged[0]} after {wall:.0f}s ({diverged[1]}); kept "
          f"as its result -> {run.result_path} (delete it to run it again)", flush=True)
  else:
    print(f"{head}: done in {wall:.0f}s: final test acc {result['final_test_acc']:.2f}%, "
          f"best {result['best_test_acc']:.2f}% -> {run.result_path}", flush=True)
  return 0
