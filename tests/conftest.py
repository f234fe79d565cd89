"""Shared fixtures: the offline CIFAR-10 archive and one small trained run."""

from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_tar() -> str:
  """Path of the offline CIFAR-10 archive (../shared/datasets), or skip."""
  if not CIFAR_TAR.exists():
    pytest.skip(f"offline CIFAR-10 archive not found at {CIFAR_TAR}")
  return str(CIFAR_TAR)


def tiny_config(data_dir: str, **overrides):
  """A W2A2 ResNet-20 run small enough for tests: 2 epochs (1 warmup + 1 BR)."""
  from brjax.config import Config  # pylint: disable=g-import-not-at-top
  settings = dict(model="resnet20", bits_w=2, bits_a=2, epochs=2, warmup_epochs=1,
                  train_examples=256, test_examples=128, batch_size=64, lr=0.05,
                  data_dir=data_dir)
  settings.update(overrides)
  return Config(**settings)


@pytest.fixture(scope="session")
def tiny_run(cifar_tar, tmp_path_factory) -> tuple[str, dict]:
  """``(workdir, final metrics)`` of one tiny W2A2 run with checkpoints, shared by tests.

  Read-only for its users: copy the workdir before changing anything in it.
  """
  from brjax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  metrics = train.train_and_evaluate(tiny_config(cifar_tar), workdir, log=lambda _: None)
  return workdir, metrics
