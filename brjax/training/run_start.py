"""Where a run starts: epoch 1 in a new workdir, its own latest checkpoint (``--resume``),
or another run's warmup (``--branch_from``).

**Branching.** Two runs whose configs differ only in ``brjax.training.config.BR_PHASE_FIELDS``
(the BR weights, the step-size freezing and BR's gradients to them, the A-BR options)
train the same warmup, bit for bit: the warmup step has no BR term and the same optimizer,
schedule, data order and initialization. So a run may start from a checkpoint of another
run at or before the end of the warmup instead of training that warmup again.
:func:`check_branch` checks that (before any work; every refusal is one line), and
:func:`copy_branch` copies that run's finished checkpoints up to that epoch (latest and
best) and its metrics lines into the new workdir, with this run's config and
``"branched_from": {"workdir", "epoch"}`` in each copied checkpoint's meta (which the run
then carries into every checkpoint it saves). The run then resumes from its own workdir
as any run does, and its metrics.jsonl is the one the same run from scratch writes
(tests/training/test_train.py compares them).

A warmup to branch from is a run stopped at the end of its warmup:
``scripts/train.py <flags> --stop_after_epoch=<warmup_epochs>``.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import shutil

from brjax.training import checkpoint, history
from brjax.training.config import BR_PHASE_FIELDS, Config


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts: after ``epoch`` (None: at epoch 1; the newest epoch checkpoint),
  from the checkpoint whose meta is ``meta`` (a mid-epoch checkpoint's if that is newer:
  then ``meta["input"]`` holds its position); ``branch_from``: a warmup workdir to copy it
  from first."""
  epoch: int | None = None
  meta: dict = dataclasses.field(default_factory=dict)
  branch_from: str | None = None


def check_workdir(config: Config, workdir: str, resume: bool, log: Callable[[str], None],
                  branch_from: str | None = None) -> Start:
  """Looks at the workdir (and a warmup to branch from) before any work, creating nothing.

  A workdir with checkpoints continues them (with ``resume``; ``branch_from`` is then not
  used); one without starts at epoch 1, or from ``branch_from``'s warmup.

  Raises:
    CheckpointError: checkpoints there without ``resume`` (a finished run has nothing to
      continue; an unfinished one needs ``resume``), ``resume`` of an incompatible run, or
      a ``branch_from`` that :func:`check_branch` refuses.
  """
  epoch, meta = checkpoint.peek_latest(workdir)
  step, step_meta = checkpoint.peek_mid_epoch(workdir)
  mid_epoch = step is not None and step_meta.get("epoch", 0) > (epoch or 0)
  if mid_epoch and resume:
    checkpoint.check_compatible(step_meta.get("config", {}), config,
                                os.path.join(workdir, "checkpoints", "steps", str(step)))
    return Start(epoch, step_meta)
  if mid_epoch:
    where = step_meta.get("input", {})
    raise checkpoint.CheckpointError(
        f"--workdir={workdir} already holds checkpoints (stopped in epoch {where.get('epoch')}"
        f" at step {where.get('step_in_epoch')}): pass --resume to continue that run, or "
        "choose another --workdir")
  if epoch is None:
    if branch_from is not None:
      return check_branch(config, branch_from)
    if resume:
      log(f"--resume: {workdir} holds no checkpoint (no epoch of a run there finished): "
          "starting from epoch 1")
    return Start()
  if resume:
    checkpoint.check_compatible(meta.get("config", {}), config,
                                os.path.join(workdir, "checkpoints", "latest", str(epoch)))
    return Start(epoch, meta)
  saved = meta.get("config") or {}
  total = saved.get("epochs")
  best = meta.get("best_test_acc")
  best = f", best test acc {best:.2f}%" if isinstance(best, (int, float)) else ""
  if total is not None and epoch >= total:
    raise checkpoint.CheckpointError(
        f"--workdir={workdir} holds a finished run (all {total} epochs{best}): nothing is left "
        "to continue; choose another --workdir, or delete that one to train it again")
  raise checkpoint.CheckpointError(
      f"--workdir={workdir} already holds checkpoints (epoch {epoch}"
      f"{f' of {total}' if total else ''}): pass --resume to continue that run, or choose "
      "another --workdir")


def nothing_left(config: Config, workdir: str, meta: dict, log: Callable[[str], None],
                 stop_after: int | None = None) -> dict:
  """Says that a run has nothing left to do (finished, or at ``stop_after``); returns its
  last metrics line."""
  records = history.read_history(workdir, missing_ok=True)
  if stop_after is not None and meta.get("epoch", 0) < config.epochs:
    log(f"{workdir} is at epoch {meta.get('epoch')}, the --stop_after_epoch={stop_after} "
        f"asked for: nothing to do (continue it with --resume, or branch from it with "
        f"--branch_from={workdir})")
  else:
    log(f"{workdir} has finished all {config.epochs} epochs (best test acc "
        f"{meta.get('best_test_acc', 0.0):.2f}%): nothing to resume. Evaluate it with "
        f"scripts/evaluate.py --workdir={workdir}")
  return records[-1] if records else {}


def check_branch(config: Config, source: str) -> Start:
  """Where a run of ``config`` branched from the warmup run ``source`` starts.

  Returns:
    ``Start(epoch, meta, source)``: ``source``'s latest epoch and that checkpoint's meta as
    the branch will hold it (this run's config, ``branched_from``).

  Raises:
    CheckpointError: ``source`` holds no checkpoint, its latest is past the end of the
      warmup, its config differs from ``config`` in a field outside the BR phase (or
      the data paths), or its metrics.jsonl does not cover its epochs.
  """
  flag = f"--branch_from={source}"
  epoch, meta = checkpoint.peek_latest(source)
  if epoch is None:
    raise checkpoint.CheckpointError(
        f"{flag} holds no checkpoint: train the warmup there first (this run's flags with "
        f"--stop_after_epoch={config.warmup_epochs} --workdir={source})")
  if epoch > config.warmup_epochs:
    raise checkpoint.CheckpointError(
        f"{flag}: its latest checkpoint is epoch {epoch}, past the end of the warmup (epoch "
        f"{config.warmup_epochs}): a run branches only from a checkpoint at or before the "
        "switch to BR (train the warmup with --stop_after_epoch)")
  diffs = checkpoint.config_diffs(meta.get("config", {}), config,
                                  checkpoint.RESUMABLE_CHANGES | BR_PHASE_FIELDS)
  if diffs:
    raise checkpoint.CheckpointError(
        f"{flag} trained another warmup ({'; '.join(diffs)}): a branch may differ from its "
        f"warmup only in the BR-phase flags ({', '.join(sorted(BR_PHASE_FIELDS))})")
  try:
    epochs = [r["epoch"] for r in history.read_history(source)]
  except (OSError, ValueError) as e:
    raise checkpoint.CheckpointError(f"{flag}: its metrics.jsonl could not be read "
                                     f"({type(e).__name__}: {e})") from None
  if epochs[:epoch] != list(range(1, epoch + 1)):
    raise checkpoint.CheckpointError(f"{flag}: its metrics.jsonl holds epochs {epochs}, not "
                                     f"1..{epoch}: it is not the history of its checkpoints")
  return Start(epoch, branch_meta(meta, config, source, epoch), source)


def branch_meta(meta: dict, config: Config, source: str, epoch: int) -> dict:
  """A checkpoint's ``meta`` as a branch of ``source`` at ``epoch`` holds it."""
  return {**meta, "config": dataclasses.asdict(config),
          "branched_from": {"workdir": source, "epoch": epoch}}


def copy_branch(start: Start, config: Config, workdir: str, log: Callable[[str], None]) -> None:
  """Copies ``start.branch_from``'s checkpoints up to ``start.epoch`` (its latest ones and
  its best) and its metrics lines into ``workdir``, each checkpoint's meta as
  :func:`branch_meta` gives it. The latest checkpoint is written last, each by a rename: a
  copy cut short leaves a workdir without one, which branches again."""
  source, epoch = start.branch_from, start.epoch
  records = [r for r in history.read_history(source) if r["epoch"] <= epoch]
  os.makedirs(workdir, exist_ok=True)
  tmp = history.metrics_path(workdir) + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  os.replace(tmp, history.metrics_path(workdir))
  for kind in ("best", "latest"):
    for e in history.checkpoint_epochs(source, kind):
      if e <= epoch:
        _copy_checkpoint(history.checkpoint_dir(source, kind, e),
                         history.checkpoint_dir(workdir, kind, e), config, source, epoch)
  log(f"Branched from {source} at epoch {epoch} (its warmup): its checkpoints and metrics "
      f"copied into {workdir}")


def _copy_checkpoint(src: str, dst: str, config: Config, source: str, epoch: int) -> None:
  meta_path = os.path.join(src, history.META_FILE)
  if not os.path.isfile(meta_path):
    raise checkpoint.CheckpointError(f"checkpoint {src} has no {history.META_FILE}: not a "
                                     "brjax checkpoint, or another orbax layout")
  with open(meta_path) as f:
    meta = json.load(f)
  tmp = dst + checkpoint.TMP_MARK + "-branch"  # orbax removes such folders left by a kill
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  with open(os.path.join(tmp, history.META_FILE), "w") as f:
    json.dump(branch_meta(meta, config, source, epoch), f)
  shutil.rmtree(dst, ignore_errors=True)  # a best copied by a branch cut short
  os.rename(tmp, dst)
