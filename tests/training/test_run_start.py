"""Tests of brjax.training.run_start: --branch_from (a run started from another run's warmup) and
--stop_after_epoch (a warmup to branch from).

The fast tests use workdirs of fake checkpoints (a tiny state, the meta a run writes) and
a --data_dir without images, so every refusal is shown to come before any data are read;
the slow one trains a warmup and a branch of the tiny run and compares its history with
the tiny run's, trained from scratch.
"""

import dataclasses
import json
import os

from conftest import tiny_config
import numpy as np
import pytest

from brjax.training import checkpoint, history, run_start, train
from brjax.training.config import BR_PHASE_FIELDS

TIMING = ("epoch_time_s", "step_time_s")


def fake_run(workdir, config, epochs_done):
  """Checkpoints of epochs 1..epochs_done of ``config`` (best: epoch 1) and their
  metrics lines, without training."""
  ckpts = checkpoint.RunCheckpoints(str(workdir))
  for epoch in range(1, epochs_done + 1):
    ckpts.save(epoch, {"x": np.full(2, epoch, np.float32)},
               {"epoch": epoch, "phase": "WARMUP", "best_test_acc": 12.5,
                "config": dataclasses.asdict(config), "data": {"mean": [0.5]}},
               is_best=epoch == 1)
  ckpts.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for epoch in range(1, epochs_done + 1):
      f.write(json.dumps({"epoch": epoch, "test_acc": 12.5}) + "\n")


@pytest.fixture(name="no_data")
def no_data_fixture(tmp_path):
  """A --data_dir that exists but holds no images: loading it is an error."""
  path = tmp_path / "no_images"
  path.mkdir()
  return str(path)


def _branch(config, workdir, source, **kwargs):
  return train.train_and_evaluate(config, str(workdir), branch_from=str(source),
                                  log=lambda _: None, **kwargs)


@pytest.mark.parametrize("source_overrides,epochs_done,message", [
    ({}, 0, r"holds no checkpoint: train the warmup there first \(this run's flags with "
            r"--stop_after_epoch=2"),
    ({}, 3, r"its latest checkpoint is epoch 3, past the end of the warmup \(epoch 2\)"),
    ({"lr": 0.1}, 2, r"trained another warmup \(--lr=0.1 there, --lr=0.05 here\): a branch "
                     r"may differ from its warmup only in the BR-phase flags \(abr_clipped"),
    ({"seed": 1}, 1, r"--seed=1 there, --seed=42 here"),
])
def test_a_branch_from_another_warmup_is_refused_before_any_work(
    tmp_path, no_data, source_overrides, epochs_done, message):
  config = tiny_config(no_data, epochs=4, warmup_epochs=2)
  source = tmp_path / "warmup"
  source.mkdir()
  if epochs_done:
    fake_run(source, dataclasses.replace(config, **source_overrides), epochs_done)
  with pytest.raises(checkpoint.CheckpointError, match=message):
    _branch(config, tmp_path / "branch", source)
  assert not (tmp_path / "branch").exists()


def test_a_branch_may_differ_in_every_br_phase_field(tmp_path, no_data):
  """Accepted before any work: the data error comes next, and leaves no workdir."""
  config = tiny_config(no_data, epochs=4, warmup_epochs=2)
  source = tmp_path / "warmup"
  fake_run(source, dataclasses.replace(config, lambda_w=0.0, lambda_a=0.0), 1)
  branch = dataclasses.replace(
      config, lambda_w=0.5, lambda_a=0.1, freeze_alpha_w=True, freeze_alpha_a=True,
      br_alpha_grad_a=True, br_alpha_grad_w="lsq", abr_layers="Block", abr_exclude_first=True,
      abr_exclude_last=True, data_dir=str(tmp_path),
      abr_clipped="include" if config.abr_clipped == "exclude" else "exclude",
      br_schedule="constant" if config.br_schedule == "cosine" else "cosine",
      br_ramp_epochs=config.br_ramp_epochs + 1)
  changed = {f for f in BR_PHASE_FIELDS if getattr(branch, f) != getattr(config, f)}
  assert changed == BR_PHASE_FIELDS  # every one of them differs here
  start = run_start.check_branch(branch, str(source))
  assert (start.epoch, start.branch_from) == (1, str(source))
  with pytest.raises(ValueError, match="no_images|images"):
    _branch(dataclasses.replace(branch, data_dir=no_data), tmp_path / "branch", source)
  assert not (tmp_path / "branch").exists()


def test_copy_branch_gives_a_workdir_that_resumes_as_the_branch(tmp_path, no_data):
  config = tiny_config(no_data, epochs=4, warmup_epochs=2)
  source, workdir = tmp_path / "warmup", tmp_path / "branch"
  fake_run(source, dataclasses.replace(config, lambda_a=0.0), 2)
  with open(source / "metrics.jsonl", "a") as f:  # an epoch logged, not saved (a kill)
    f.write(json.dumps({"epoch": 3, "test_acc": 1.0}) + "\n")
  (workdir / "checkpoints" / "best" / "1").mkdir(parents=True)  # a copy cut short
  start = run_start.check_branch(config, str(source))
  log = []
  run_start.copy_branch(start, config, str(workdir), log.append)
  assert log == [f"Branched from {source} at epoch 2 (its warmup): its checkpoints and "
                 f"metrics copied into {workdir}"]
  assert [r["epoch"] for r in history.read_history(str(workdir))] == [1, 2]
  assert history.checkpoint_epochs(str(workdir), "latest") == [1, 2]
  assert history.checkpoint_epochs(str(workdir), "best") == [1]
  epoch, meta = checkpoint.peek_latest(str(workdir))  # read by orbax
  assert epoch == 2 and meta == history.read_checkpoint_meta(str(workdir))  # and as a file
  assert meta["config"] == dataclasses.asdict(config) and meta["data"] == {"mean": [0.5]}
  assert meta["branched_from"] == {"workdir": str(source), "epoch": 2}
  assert history.read_checkpoint_meta(str(workdir), "best")["epoch"] == 1
  # The source is untouched, and the copy restores as this run's own checkpoint.
  assert checkpoint.peek_latest(str(source))[1]["config"]["lambda_a"] == 0.0
  ckpts = checkpoint.RunCheckpoints(str(workdir))
  state, _ = ckpts.restore_latest({"x": np.zeros(2, np.float32)}, config)
  ckpts.close()
  np.testing.assert_array_equal(state["x"], [2.0, 2.0])
  # With checkpoints there, --branch_from is not used: --resume continues them.
  assert run_start.check_workdir(config, str(workdir), True, log.append,
                                 str(tmp_path / "elsewhere")).epoch == 2
  with pytest.raises(checkpoint.CheckpointError, match="pass --resume"):
    run_start.check_workdir(config, str(workdir), False, log.append, str(source))


def test_stop_after_epoch(tmp_path, no_data):
  config = tiny_config(no_data, epochs=4, warmup_epochs=2)
  fake_run(tmp_path / "run", config, 2)
  log = []
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"), resume=True,
                                     stop_after_epoch=2, log=log.append)
  assert metrics == {"epoch": 2, "test_acc": 12.5}
  assert log == [f"{tmp_path / 'run'} is at epoch 2, the --stop_after_epoch=2 asked for: "
                 f"nothing to do (continue it with --resume, or branch from it with "
                 f"--branch_from={tmp_path / 'run'})"]
  for bad in (0, 5):
    with pytest.raises(ValueError, match=rf"--stop_after_epoch={bad} is not accepted: use an "
                                         r"integer in 1..4"):
      train.train_and_evaluate(config, str(tmp_path / "new"), stop_after_epoch=bad)


@pytest.mark.slow
def test_a_branched_run_is_bit_identical_to_the_run_from_scratch(tiny_record, cifar_dir,
                                                                 tmp_path):
  """The tiny run (lambda 1/1, 1 warmup + 1 BR epoch), branched at epoch 1 from a warmup
  trained with lambda 0/0 and every other BR-phase field off, writes the tiny run's
  metrics.jsonl, every value equal (timings aside)."""
  config = tiny_config(cifar_dir)
  warmup = dataclasses.replace(config, lambda_w=0.0, lambda_a=0.0)
  log = []
  train.train_and_evaluate(warmup, str(tmp_path / "warmup"), stop_after_epoch=1,
                           log=log.append)
  assert log[-1].startswith("Stopped after epoch 1 (--stop_after_epoch)")
  assert history.checkpoint_epochs(str(tmp_path / "warmup")) == [1]
  train.train_and_evaluate(config, str(tmp_path / "branch"),
                           branch_from=str(tmp_path / "warmup"), log=log.append)
  branched = history.read_history(str(tmp_path / "branch"))
  scratch = history.read_history(tiny_record.workdir)
  assert [r["epoch"] for r in branched] == [1, 2] and len(scratch) == 2
  for ours, theirs in zip(branched, scratch):
    for key in TIMING:
      ours.pop(key, None)
      theirs.pop(key, None)
    assert ours == theirs, ours["epoch"]
  assert branched[1]["phase"] == "BR" and branched[1]["br_a"] > 0
  meta = history.read_checkpoint_meta(str(tmp_path / "branch"))
  assert meta["epoch"] == 2 and meta["config"] == dataclasses.asdict(config)
  assert meta["branched_from"] == {"workdir": str(tmp_path / "warmup"), "epoch": 1}
