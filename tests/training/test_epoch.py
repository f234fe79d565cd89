"""Mid-epoch checkpoints: a run stopped anywhere resumes to the uninterrupted run's metrics.

The stops here are requested in-process at a chosen global step (or during an epoch's
evaluation), as a signal would request them (``StopOnSignal.requested``); the signals
themselves, through scripts/train.py, are tests/training/test_cli.py's.
"""

import json
import os

from conftest import tiny_config
import numpy as np
import pytest

from brjax.data import synthetic_images
from brjax.training import checkpoint, run_control, train
from brjax.training import epoch as epoch_lib
from brjax.training.config import Config

TIMING = ("epoch_time_s", "step_time_s")


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _stop_at(monkeypatch, global_step: int | None = None, eval_of_epoch: int | None = None,
             signal_name: str = "SIGTERM"):
  """Requests a stop after ``global_step``, or at the first evaluation batch of an epoch."""
  after_step, check = epoch_lib.Control.after_step, epoch_lib.Control.check
  seen = {"evaluations": 0}

  def stop_after(self, step, position, state, epoch_end=False):
    if step == global_step:
      self._stop.requested = signal_name
    return after_step(self, step, position, state, epoch_end)

  def stop_in_eval(self):
    if eval_of_epoch is not None and self._stop.requested is None:
      seen["evaluations"] += 1  # check() runs after every evaluation batch and between epochs
      if seen["evaluations"] == eval_of_epoch:
        self._stop.requested = signal_name
    return check(self)

  monkeypatch.setattr(epoch_lib.Control, "after_step", stop_after)
  monkeypatch.setattr(epoch_lib.Control, "check", stop_in_eval)


@pytest.mark.slow
@pytest.mark.slow
def test_stops_inside_an_epoch_and_during_an_evaluation_resume_to_the_same_metrics(
    cifar_dir, tiny_run, tmp_path, monkeypatch):
  """Stopped during epoch 1's evaluation (SIGINT), resumed, stopped again inside the BR
  epoch (SIGTERM at epoch 2, step 2: the phase switch, the optimizer swap and epoch 1's
  checkpoint lie behind it), resumed: the uninterrupted run's metrics, value for value."""
  config = tiny_config(cifar_dir)  # 4 steps an epoch, 2 epochs (warmup, BR)
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as patch:
    _stop_at(patch, eval_of_epoch=1, signal_name="SIGINT")
    with pytest.raises(run_control.Interrupted) as stopped:
      train.train_and_evaluate(config, workdir, log=lambda _: None)
  assert stopped.value.position == (1, 4) and stopped.value.saved_epoch is None
  assert stopped.value.signal == "SIGINT"
  with monkeypatch.context() as patch:
    _stop_at(patch, global_step=6)
    log = []
    with pytest.raises(run_control.Interrupted) as stopped:
      train.train_and_evaluate(config, workdir, resume=True, log=log.append)
  assert "at epoch 1 step 4 of 4" in log[0]
  assert stopped.value.position == (2, 2) and stopped.value.signal == "SIGTERM"
  step, meta = checkpoint.peek_mid_epoch(workdir)
  assert step == 6 and meta["input"] == {"epoch": 2, "step_in_epoch": 2, "iterator": None}
  log = []
  last = train.train_and_evaluate(config, workdir, resume=True, log=log.append)
  assert f"Resumed from {workdir} at epoch 2 step 2 of 4" in log[0]
  uninterrupted = _metrics(tiny_run[0])
  assert _metrics(workdir) == uninterrupted  # value for value
  assert {k: v for k, v in last.items() if k not in TIMING} == uninterrupted[-1]
  # The epoch's end made the mid-epoch checkpoint obsolete: it is gone.
  assert checkpoint.peek_mid_epoch(workdir) == (None, {})


@pytest.mark.slow
def test_checkpoint_every_steps_saves_inside_epochs_and_without_resume_the_run_is_refused(
    cifar_dir, tmp_path, monkeypatch):
  config = tiny_config(cifar_dir, epochs=1, warmup_epochs=1)
  workdir = str(tmp_path / "run")
  saved = []
  real = checkpoint.RunCheckpoints.save_step

  def record(self, step, state, partial, meta):
    saved.append((step, meta["input"]["step_in_epoch"], {k: v.shape for k, v in
                                                          partial.items()}))
    return real(self, step, state, partial, meta)

  monkeypatch.setattr(checkpoint.RunCheckpoints, "save_step", record)
  with monkeypatch.context() as patch:
    _stop_at(patch, global_step=3)
    with pytest.raises(run_control.Interrupted):
      train.train_and_evaluate(config, workdir, log=lambda _: None,
                               save_every=epoch_lib.SaveEvery(steps=2))
  assert [(s, k) for s, k, _ in saved] == [(2, 2), (3, 3)]
  assert set(saved[-1][2].values()) == {(3,)}  # the per-step metrics of the 3 steps
  with pytest.raises(checkpoint.CheckpointError, match="stopped in epoch 1 at step 3.*--resume"):
    train.train_and_evaluate(config, workdir, log=lambda _: None)


@pytest.fixture(scope="module")
def streamed_folder(tmp_path_factory):
  return synthetic_images.write_image_folder(tmp_path_factory.mktemp("streamed"), classes=4,
                                             train_per_class=24, eval_per_class=8)


@pytest.mark.slow
def test_a_streamed_run_resumes_from_its_grain_iterator_state(streamed_folder, tmp_path,
                                                              monkeypatch):
  config = Config(model="resnet8", bits_w=2, bits_a=2, epochs=1, warmup_epochs=1,
                  batch_size=32, data_dir=str(streamed_folder), image_size=32, data_workers=0)
  whole = str(tmp_path / "whole")
  train.train_and_evaluate(config, whole, log=lambda _: None)
  workdir = str(tmp_path / "stopped")
  with monkeypatch.context() as patch:
    _stop_at(patch, global_step=2)  # 3 steps an epoch: epoch 1, step 2
    with pytest.raises(run_control.Interrupted) as stopped:
      train.train_and_evaluate(config, workdir, log=lambda _: None)
  assert stopped.value.position == (1, 2)
  _, meta = checkpoint.peek_mid_epoch(workdir)
  assert json.loads(meta["input"]["iterator"])["next_batch"] == 2
  train.train_and_evaluate(config, workdir, resume=True, log=lambda _: None)
  assert _metrics(workdir) == _metrics(whole)


def test_per_step_metrics_round_trip_in_their_dtypes():
  sums = [{"loss": np.float32(1.5), "count": np.int32(4)},
          {"loss": np.float32(0.25), "count": np.int32(4)}]
  stacked = epoch_lib.stack_steps(sums)
  assert stacked["loss"].dtype == np.float32 and stacked["count"].shape == (2,)
  back = epoch_lib.unstack_steps(stacked)
  assert [{k: (v.item(), v.dtype) for k, v in s.items()} for s in back] == [
      {k: (np.asarray(v).item(), np.asarray(v).dtype) for k, v in s.items()} for s in sums]


def test_agree_with_one_process_is_the_local_decision():
  assert run_control.agree(True, False) == (True, False)
