"""Shared test setup: the offline CIFAR-10 archive, one small trained run, fixtures computed
once per session (`once_per_session`), and the session's XLA compilation cache."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import importlib.util
import logging
import os
import pathlib
import pickle
import re
import shutil
import tarfile
import tempfile

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


# Tests that use one of these fixtures wait for a real training run (or a benchmark run):
# they are marked slow, so `pytest -m "not slow"` leaves them out (see README, Test).
SLOW_FIXTURES = frozenset({"tiny_record", "tiny_run", "quick_run", "study"})


_OWN_CACHE = pytest.StashKey[str]()  # a cache folder this session made (and removes)


# XLA's backend optimization level for the tests (test speed only; see pytest_configure).
TEST_XLA_FLAG = "--xla_backend_optimization_level=2"


def pytest_configure(config):
  """XLA's optimization level 2 and one persistent compilation cache (test speed only).

  Compiling is most of the suite's time, and most of a model's compile time goes into
  LLVM's optimization of the random-number kernels of ``model.init``: at level 2 (XLA's
  CPU default is 3) ResNet-8's quantized init compiles in 4.1 s against 10.9 s, to the
  same values bit for bit, and training steps run as fast (measured 2026-12-07 on this
  project's CPU). A tiny ResNet-20 run gives the same losses, accuracies and BR terms; its
  reporting statistics (``quant_metrics``: averages over millions of values) differ in the
  7th digit, as another reduction order would. ``XLA_FLAGS`` that already set the level
  are kept (``XLA_FLAGS=--xla_backend_optimization_level=3`` tests at XLA's default); the
  flag reaches the tests' subprocesses through the environment.

  Many tests train the same tiny model in a new process or through new jitted closures:
  they compile the same programs, which the cache then reads back instead of compiling
  again. The controller picks the folder and exports it, so that pytest-xdist workers and
  the tests' subprocesses (which inherit the environment) share it: the caller's
  ``JAX_COMPILATION_CACHE_DIR`` if set, else pytest's cache folder
  (``.pytest_cache/d/jax_compilation_cache``, kept between sessions, so a second run of
  the fast tier compiles little), else (``-p no:cacheprovider``) a temporary folder.
  Every program is kept, however fast it compiled: the tests' eager operations and small
  jitted functions compile thousands of programs of 10 to 100 ms each, which are most of
  the fast tier's time (measured 2026-12-08 here: a second run of the fast tier in 84 s
  against 123 s when only programs over 0.1 s are kept). The cache has no size limit:
  with one, JAX's cache reads every entry's access time under a file lock at each write,
  which with thousands of entries made the fast tier's first run 7 min 19 s instead of
  2 min 28 s. Without the lock, a process can read an entry another is still writing:
  JAX then warns ("Error reading persistent compilation cache entry") and compiles it.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:  # read when the backend starts: later
    os.environ["XLA_FLAGS"] = f"{flags} {TEST_XLA_FLAG}".strip()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    if getattr(config, "cache", None) is not None:
      path = str(config.cache.mkdir("jax_compilation_cache"))
    else:
      path = config.stash[_OWN_CACHE] = tempfile.mkdtemp(prefix="brjax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
  for name, kind in (("jax_compilation_cache_dir", str),
                     ("jax_persistent_cache_min_compile_time_secs", float),
                     ("jax_compilation_cache_max_size", int)):
    jax.config.update(name, kind(os.environ[name.upper()]))  # jax was imported before


def pytest_unconfigure(config):
  path = config.stash.get(_OWN_CACHE, None)
  if path is not None:
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cifar_archive() -> str:
  """Path of the offline CIFAR-10 archive (../shared/datasets), or skip."""
  if not CIFAR_TAR.exists():
    pytest.skip(f"offline CIFAR-10 archive not found at {CIFAR_TAR}")
  return str(CIFAR_TAR)


def _unpack(archive: str, folder: pathlib.Path) -> str:
  with tarfile.open(archive, "r:gz") as tar:
    tar.extractall(folder, filter="data")
  return str(folder)


@pytest.fixture(scope="session")
def cifar_dir(cifar_archive, tmp_path_factory, request) -> str:
  """The CIFAR-10 archive unpacked into a folder, once per test session (shared by the
  workers): the same files, so the same canonical order, images and runs as the archive,
  but a run reads only the few hundred images it uses (~0.3 s) where the archive is
  decompressed whole, all 60,000 files, for each run (~3 s, more under load)."""
  return once_per_session(request, tmp_path_factory, "cifar10",
                          functools.partial(_unpack, cifar_archive))


@functools.cache
def load_script(name: str):
  """``scripts/<name>.py`` as a module, to call its ``main`` in-process."""
  spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_main(name: str, args: list[str], capsys) -> tuple[int, str, str]:
  """``(exit status, stdout, stderr)`` of ``scripts/<name>.py args``, run in-process: for
  errors found before any work (a subprocess costs a second of imports per case)."""
  capsys.readouterr()
  code = load_script(name).main([f"{name}.py", *args])
  out, err = capsys.readouterr()
  return code, out, err


def tiny_config(data_dir: str, **overrides):
  """A W2A2 ResNet-8 run small enough for tests: 2 epochs (1 warmup + 1 BR).

  ResNet-8 (one block a stage) exercises everything the trainer does to a CIFAR ResNet
  (stem, projections, every quantizer kind, BR on every site) at a third of ResNet-20's
  layers: it traces and compiles in half the time, which is most of a tiny run's cost.
  Tests of ResNet-20 itself pass ``model="resnet20"``."""
  from brjax.training.config import Config  # pylint: disable=g-import-not-at-top
  settings = dict(model="resnet8", bits_w=2, bits_a=2, epochs=2, warmup_epochs=1,
                  train_examples=256, test_examples=128, batch_size=64, lr=0.05,
                  data_dir=data_dir)
  settings.update(overrides)
  return Config(**settings)


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What one in-process training run left: its workdir, metrics, log, compilations."""
  workdir: str
  metrics: dict
  log: list[str]
  compiles: collections.Counter  # jitted function name -> number of XLA compilations


def run_and_record(config, workdir: str, **kwargs) -> RunRecord:
  """Runs ``train.train_and_evaluate`` and counts the XLA compilations of each function."""
  from brjax.training import train  # pylint: disable=g-import-not-at-top
  compiles = collections.Counter()

  class Handler(logging.Handler):
    def emit(self, record):
      match = re.search(r"Finished XLA compilation of (?:jit\()?([\w.<>]+)", record.getMessage())
      if match:
        compiles[match.group(1)] += 1

  handler = Handler(level=logging.DEBUG)
  loggers = [logging.getLogger(n) for n in ("jax._src.dispatch", "jax._src.interpreters.pxla")]
  for logger in loggers:
    logger.addHandler(handler)
    logger.propagate = False  # count compilations, don't print thousands of log lines
  lines = []
  try:
    with jax.log_compiles(True):
      metrics = train.train_and_evaluate(config, workdir, log=lines.append, **kwargs)
  finally:
    for logger in loggers:
      logger.removeHandler(handler)
      logger.propagate = True
  return RunRecord(workdir, metrics, lines, compiles)


@contextlib.contextmanager
def _exclusive(path: pathlib.Path):
  """An exclusive lock on ``path`` (created if missing), held for the ``with`` block."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def once_per_session(request, tmp_path_factory, name: str, make):
  """``make(folder)``, computed once per test session and shared by every worker.

  A module- or session-scoped fixture is computed once per pytest-xdist worker that needs
  it; for a fixture that trains or benchmarks for a minute that is a minute per worker.
  Here the first worker that asks computes it in the session's shared temporary folder
  (``<basetemp>/../<name>``) and pickles the value beside it; the others wait on a lock
  and read it. The folder is shared: fixtures built on it hand it out read-only (tests copy
  it to change it). In one process, the folder is a fresh temporary one.

  Args:
    request, tmp_path_factory: the calling fixture's.
    name: the folder's and the value's name, unique in the session.
    make: ``folder -> value``, the value picklable.
  """
  if not hasattr(request.config, "workerinput"):  # one process: nothing to share
    return make(tmp_path_factory.mktemp(name))
  shared = tmp_path_factory.getbasetemp().parent  # the same for every worker of the session
  saved = shared / f"{name}.pickle"
  with _exclusive(shared / f"{name}.lock"):
    if not saved.exists():
      shutil.rmtree(shared / name, ignore_errors=True)  # what a failed try left
      (shared / name).mkdir()
      saved.write_bytes(pickle.dumps(make(shared / name)))
  return pickle.loads(saved.read_bytes())


@pytest.fixture(scope="session")
def tiny_record(cifar_dir, tmp_path_factory, request) -> RunRecord:
  """One tiny W2A2 run with checkpoints, shared by tests. Read-only: copy to change it.

  Trained once per test session (``once_per_session``: training it on each worker cost
  ~45 s per worker).
  """
  config = tiny_config(cifar_dir)
  return once_per_session(request, tmp_path_factory, "tiny_run", lambda folder: run_and_record(
      config, str(folder), tensorboard=True, histogram_every=1))


@pytest.fixture(scope="session")
def tiny_run(tiny_record) -> tuple[str, dict]:
  """``(workdir, final metrics)`` of the tiny run (see ``tiny_record``)."""
  return tiny_record.workdir, tiny_record.metrics
