"""A thin wrapper of orbax's CheckpointManager: the latest and the best checkpoint of a run,
and the mid-epoch checkpoint of a run stopped or saved between two epochs.

Layout of a workdir::

    <workdir>/checkpoints/latest/<epoch>/   the last two epochs (orbax writes each atomically)
    <workdir>/checkpoints/best/<epoch>/     the epoch with the best test accuracy
    <workdir>/checkpoints/steps/<step>/     the newest mid-epoch save (global step), if it is
                                            newer than the latest epoch

Each checkpoint holds the training state as a plain state dict (``state``: parameters
unboxed, ``brjax.quant.partitioning``, so a model with boxed parameters saves the arrays a
plain one does, and a restore into a boxed state boxes them again; an empty
``quant_state`` is not written, see :data:`OPTIONAL`) and a JSON
``meta`` with the epoch, the run's config and the best test accuracy so far; a mid-epoch one
also holds the epoch's per-step metrics so far (``partial``) and, in its meta, the input's
position (``meta["input"]``). Saves are asynchronous (orbax writes in a background thread
while training goes on; :meth:`RunCheckpoints.wait` waits), each still atomic: a save cut
short leaves a ``*.orbax-checkpoint-tmp*`` folder, removed when the run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
from typing import Any

from flax import serialization
import jax
import orbax.checkpoint as ocp

from brjax.quant import partitioning
from brjax.quant.bits import FLOAT_BITS
from brjax.training import config as config_lib
from brjax.training.config import Config

# Flags that may differ between a run and the run it resumes.
RESUMABLE_CHANGES = frozenset({"pretrained", "data_dir", "data_workers"})
QUANTIZATION_FIELDS = config_lib.BR_PHASE_FIELDS | {"alpha_param", "alpha_lr_scale",
                                                    "alpha_weight_decay", "act_signs"}
"""Fields a float run does not read: its resume ignores them."""


OPTIONAL = ("quant_state",)
"""Top-level entries of a state that a checkpoint holds only when they are not empty: the
input signs a model decides from data (``brjax.quant.lsq.STATE``), which most models lack
and checkpoints written before they were saved lack too; such a checkpoint restores them
empty."""


def _saved(state: Any) -> Any:
  """What a checkpoint holds of ``state``: its state dict, unboxed, without the empty
  :data:`OPTIONAL` entries."""
  tree = serialization.to_state_dict(partitioning.unbox(state))
  if isinstance(tree, dict):
    tree = {k: v for k, v in tree.items() if k not in OPTIONAL or v}
  return tree


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or from an incompatible run."""


# Orbax names a checkpoint being written `<epoch>.orbax-checkpoint-tmp-<n>` until it is done.
TMP_MARK = ".orbax-checkpoint-tmp"


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's "Given directory is read only" warning: reading is all we ask of it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only():
  logger = logging.getLogger("absl")
  quiet = _DropReadOnlyNotice()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _manager(directory: str, max_to_keep: int | None,
             read_only: bool = False, asynchronous: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager, asynchronous or not; read-only ones create, delete and log
  nothing."""
  if read_only:  # only the options read-only allows, so orbax has nothing to warn about
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                           save_interval_steps=0,
                                           enable_async_checkpointing=False)
    with _quiet_read_only():
      return ocp.CheckpointManager(os.path.abspath(directory), options=options)
  # cleanup_tmp_directories: a save cut short by a kill is removed when the run resumes.
  # Each manager its own barrier names: with several processes, "latest" and "best" save
  # the same step at once, and orbax's barriers are named by step.
  prefix = os.path.basename(os.path.normpath(directory))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=asynchronous,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=prefix))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _peek(workdir: str, kind: str) -> tuple[int | None, dict]:
  """``(step, meta)`` of the newest checkpoint in ``<workdir>/checkpoints/<kind>``,
  ``(None, {})`` if none; read-only."""
  directory = os.path.join(workdir, "checkpoints", kind)
  if not os.path.isdir(directory):
    return None, {}
  manager = _manager(directory, None, read_only=True)
  try:
    step = manager.latest_step()
    return (None, {}) if step is None else (step, _read_meta(manager, step))
  finally:
    manager.close()


def peek_latest(workdir: str) -> tuple[int | None, dict]:
  """``(epoch, meta)`` of a workdir's latest checkpoint, ``(None, {})`` if it has none.

  Read-only: creates and deletes nothing (unlike ``RunCheckpoints``), so it can look
  before any work, even at a workdir another run is writing.

  Raises:
    CheckpointError: the latest checkpoint's meta cannot be read.
  """
  return _peek(workdir, "latest")


def peek_mid_epoch(workdir: str) -> tuple[int | None, dict]:
  """``(global step, meta)`` of a workdir's mid-epoch checkpoint, ``(None, {})`` if it has
  none; read-only (see :func:`peek_latest`). ``meta["input"]`` holds its position."""
  return _peek(workdir, "steps")


def restore_epoch(workdir: str, epoch: int | None, target: Any) -> tuple[Any, dict]:
  """``(state, meta)`` of a workdir's latest-kind checkpoint of ``epoch`` (None: the newest),
  read into the structure of ``target``; read-only (see :func:`peek_latest`).

  Raises:
    CheckpointError: no such checkpoint (naming the epochs there are), or an unreadable one.
  """
  directory = os.path.join(workdir, "checkpoints", "latest")
  if not os.path.isdir(directory):
    raise CheckpointError(f"--workdir={workdir} has no checkpoints/latest: use the --workdir "
                          "of a training run that saved an epoch")
  manager = _manager(directory, None, read_only=True)
  try:
    kept = sorted(manager.all_steps())
    chosen = kept[-1] if epoch is None and kept else epoch
    if chosen not in kept:
      raise CheckpointError(f"--epoch={epoch} is not accepted: {directory} keeps the "
                            f"checkpoints of epochs {kept or 'none'}")
    return _restore(manager, chosen, target, None)
  finally:
    manager.close()


class RunCheckpoints:
  """The latest (two kept), best (one kept) and mid-epoch (one kept) checkpoints of one
  workdir. Saves are asynchronous: ``save`` and ``save_step`` return once the state is in
  host memory (the caller passes host arrays), and the files are written while training
  goes on; each save first waits for the one before it. ``close`` waits for the last."""

  def __init__(self, workdir: str):
    root = os.path.join(workdir, "checkpoints")
    self.latest = _manager(os.path.join(root, "latest"), max_to_keep=2, asynchronous=True)
    self.best = _manager(os.path.join(root, "best"), max_to_keep=1, asynchronous=True)
    self.steps = _manager(os.path.join(root, "steps"), max_to_keep=1, asynchronous=True)

  def latest_epoch(self) -> int | None:
    return self.latest.latest_step()

  def save(self, epoch: int, state: Any, meta: dict, *, is_best: bool) -> None:
    """Saves ``state`` (any Flax-serializable pytree) as the latest, and as best if so; the
    mid-epoch saves it makes obsolete are deleted."""
    self.wait()
    args = ocp.args.Composite(state=ocp.args.StandardSave(_saved(state)),
                              meta=ocp.args.JsonSave(meta))
    self.latest.save(epoch, args=args)
    if is_best:
      self.best.save(epoch, args=args)
    for step in self.steps.all_steps():  # older than this epoch's end
      self.steps.delete(step)

  def save_step(self, step: int, state: Any, partial: dict, meta: dict) -> None:
    """Saves a mid-epoch checkpoint at global step ``step``: ``state``, ``partial`` (the
    epoch's per-step metrics so far, ``{name: (steps_done,) array}``) and ``meta`` (with
    ``"input"``, the input pipeline's position)."""
    self.wait()
    self.steps.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_saved(state)),
        partial=ocp.args.StandardSave(partial), meta=ocp.args.JsonSave(meta)))

  def latest_step_meta(self) -> tuple[int | None, dict]:
    """``(global step, meta)`` of the mid-epoch checkpoint, ``(None, {})`` if none."""
    step = self.steps.latest_step()
    return (None, {}) if step is None else (step, _read_meta(self.steps, step))

  def restore_step(self, target: Any, config: Config) -> tuple[Any, dict, dict]:
    """``(state, partial, meta)`` of the mid-epoch checkpoint, read into ``target``'s
    structure (see :meth:`save_step`).

    Raises:
      CheckpointError: if there is none, it cannot be read, or the config differs.
    """
    step = self.steps.latest_step()
    if step is None:
      raise CheckpointError(f"no mid-epoch checkpoint in {self.steps.directory}")
    state, meta = _restore(self.steps, step, target, config)
    try:
      partial = self.steps.restore(step, args=ocp.args.Composite(
          partial=ocp.args.StandardRestore(None)))["partial"]
    except Exception as e:
      raise CheckpointError(_unreadable(self.steps, step, e)) from e
    return state, jax.device_get(partial), meta

  def latest_meta(self, config: Config) -> dict:
    """The latest checkpoint's meta, after checking it was written with ``config``.

    Cheap (reads JSON only): call it before any work to refuse a bad resume early.

    Raises:
      CheckpointError: if there is none, it cannot be read, or the config differs.
    """
    epoch = self._latest_epoch()
    meta = _read_meta(self.latest, epoch)
    check_compatible(meta.get("config", {}), config, _describe(self.latest, epoch))
    return meta

  def restore_latest(self, target: Any, config: Config) -> tuple[Any, dict]:
    """Restores the latest checkpoint into the structure of ``target``.

    Raises:
      CheckpointError: if it cannot be read, or was written by an incompatible config.
    """
    return _restore(self.latest, self._latest_epoch(), target, config)

  def _latest_epoch(self) -> int:
    epoch = self.latest.latest_step()
    if epoch is None:
      raise CheckpointError(f"no checkpoint to resume in {self.latest.directory}")
    return epoch

  def remove_unfinished(self) -> list[str]:
    """Deletes the folders of saves cut short (orbax's ``*.orbax-checkpoint-tmp*``); the
    finished checkpoints stay. Returns the paths removed."""
    removed = []
    for manager in (self.latest, self.best, self.steps):
      for path in glob.glob(os.path.join(str(manager.directory), f"*{TMP_MARK}*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed

  def wait(self) -> None:
    """Waits until every save has been written."""
    for manager in (self.latest, self.best, self.steps):
      manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then closes the managers."""
    for manager in (self.latest, self.best, self.steps):
      manager.close()


def _describe(manager: ocp.CheckpointManager, epoch: int) -> str:
  return os.path.join(str(manager.directory), str(epoch))


def _restore(manager: ocp.CheckpointManager, epoch: int, target: Any | None,
             config: Config | None) -> tuple[Any, dict]:
  meta = _read_meta(manager, epoch)
  if config is not None:
    check_compatible(meta.get("config", {}), config, _describe(manager, epoch))
  state_dict = None if target is None else _saved(target)
  abstract = None if state_dict is None else jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                          state_dict)
  try:
    restored = manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:
    raise CheckpointError(_unreadable(manager, epoch, e)) from e
  # Host arrays: each process then puts its own copy on its devices (a restored jax.Array
  # sits on one device, which a multi-process device_put cannot move across hosts).
  restored = jax.device_get(restored)
  if target is None:
    return restored, meta
  plain = partitioning.unbox(target)
  full = serialization.to_state_dict(plain)
  if isinstance(full, dict):  # the empty optional entries the checkpoint does not hold
    restored = {**{k: full[k] for k in OPTIONAL if k in full}, **restored}
  return partitioning.rebox(target, serialization.from_state_dict(plain, restored)), meta


def _read_meta(manager: ocp.CheckpointManager, epoch: int) -> dict:
  try:
    return manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # orbax raises many types for unreadable files
    raise CheckpointError(_unreadable(manager, epoch, e)) from e


def _unreadable(manager: ocp.CheckpointManager, epoch: int, error: Exception) -> str:
  others = [s for s in manager.all_steps() if s != epoch]
  hint = (f"; the other checkpoints (epochs {others}) are kept: move the broken one away "
          "to resume from them") if others else ""
  reason = str(error).splitlines()[0] if str(error) else type(error).__name__
  return (f"checkpoint {_describe(manager, epoch)} could not be read "
          f"({type(error).__name__}: {reason[:200]}){hint}")


def config_diffs(saved: dict, config: Config, allowed=RESUMABLE_CHANGES) -> list[str]:
  """``["--lr=0.1 there, --lr=0.01 here", ...]``: the fields outside ``allowed`` in which
  ``config`` differs from the saved one.

  A field the saved config lacks (written before the field existed) counts as the value
  that run used: ``config_lib.saved_defaults`` for the step-size fields and the BR
  schedule, else the default of a ``Config()``, whose recipe is the only one there was.
  Two float runs do not differ in the fields only quantization reads (BR, step sizes).
  """
  saved = {**dataclasses.asdict(Config()), **config_lib.saved_defaults(saved), **saved}
  both_float = not config.quantized and saved["bits_w"] == saved["bits_a"] == FLOAT_BITS
  unused = QUANTIZATION_FIELDS if both_float else frozenset()
  return [f"--{k}={saved.get(k)!r} there, --{k}={v!r} here"
          for k, v in dataclasses.asdict(config).items()
          if k not in allowed and k not in unused and saved.get(k) != v]


def check_compatible(saved: dict, config: Config, path: str) -> None:
  """Raises CheckpointError if ``config`` differs from the saved one (beyond data paths,
  :data:`RESUMABLE_CHANGES`; see :func:`config_diffs`)."""
  diffs = config_diffs(saved, config)
  if diffs:
    raise CheckpointError(f"checkpoint {path} is from an incompatible run ({'; '.join(diffs)}): "
                          "resume with the same flags, or choose another --workdir")


def restore_pretrained(path: str, prefer: str = "best") -> tuple[dict, dict]:
  """Reads the params and batch_stats of a run's best (else latest) checkpoint.

  Args:
    path: the ``--workdir`` of a run.
    prefer: ``"best"`` (the best test accuracy; the latest if there is none) or
      ``"latest"`` (the end of training; the best if there is none).

  Returns:
    ``(variables, meta)`` with ``variables = {"params": ..., "batch_stats": ...}`` (and
    ``"quant_state"``, the input signs, for a model that decided them from data) as numpy
    arrays, and the run's meta (its config and epoch).
  """
  with _pretrained_manager(path, prefer) as (manager, epoch, _):
    state, meta = _restore(manager, epoch, None, None)
  signs = {k: state[k] for k in OPTIONAL if state.get(k)}
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {}), **signs}, meta


def which(path: str, prefer: str = "best") -> tuple[str, int]:
  """``(kind, epoch)`` that ``restore_pretrained(path, prefer)`` reads: ``prefer``'s kind,
  or the other where the run has none (reads the folder listing only)."""
  with _pretrained_manager(path, prefer) as (_, epoch, kind):
    return kind, epoch


def describe_pretrained(path: str, prefer: str = "best", *,
                        drops_step_sizes: bool = False) -> str:
  """What ``restore_pretrained(path, prefer)`` reads, in words (reads the JSON meta only):
  ``"checkpoints/run (best checkpoint, epoch 10, best test acc 82.03%)"``.

  ``drops_step_sizes``: the caller keeps the weights only (``--pretrained``); a quantized
  run's description then says so: ``"...; a W2A2 run: its step sizes are not used)"``.
  """
  with _pretrained_manager(path, prefer) as (manager, epoch, kind):
    meta = _read_meta(manager, epoch)
  acc = meta.get("best_test_acc")
  config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
  bits = config.get("bits_w", FLOAT_BITS), config.get("bits_a", FLOAT_BITS)
  dropped = (f"; a W{bits[0]}A{bits[1]} run: its step sizes are not used"
             if drops_step_sizes and bits != (FLOAT_BITS, FLOAT_BITS) else "")
  return (f"{path} ({kind} checkpoint, epoch {epoch}"
          + (f", best test acc {acc:.2f}%" if isinstance(acc, (int, float)) else "")
          + f"{dropped})")


@contextlib.contextmanager
def _pretrained_manager(path: str, prefer: str):
  """``(read-only manager, epoch, "best" or "latest")`` of the checkpoint to read."""
  root = os.path.join(path, "checkpoints")
  if prefer not in ("best", "latest"):
    raise ValueError(f"prefer={prefer!r} is not accepted: use 'best' or 'latest'")
  for kind in (prefer, "latest" if prefer == "best" else "best"):
    directory = os.path.join(root, kind)
    if not os.path.isdir(directory):
      continue
    manager = _manager(directory, None, read_only=True)
    try:
      epoch = manager.latest_step()
      if epoch is not None:
        yield manager, epoch, kind
        return
    finally:
      manager.close()
  raise CheckpointError(f"{path} holds no checkpoint: expected the --workdir of a "
                        "scripts/train.py run (with checkpoints/best or checkpoints/latest)")
