"""Data parallelism on several CPU devices, and on several processes.

JAX fixes its devices when it initializes, so every test runs its JAX work in a subprocess
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (two CPU devices), and
compares what the subprocess wrote with chex.

What is not tested here: several hosts for real (the two-process test runs both processes on
this machine, over localhost and gloo), and accelerators.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
from conftest import once_per_session
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# A small quantized CIFAR ResNet with every layer type of ResNet-20 (quantized stem, basic
# blocks, a strided projection, BatchNorm, quantized ReLU and dense): it compiles in
# seconds. The state after two BR steps (W2A2, lambda_w = lambda_a = 1) on one global
# batch of 16 is saved to the .npz file named by argv[1], with the metrics of the second.
STEPS = textwrap.dedent("""
    import functools, sys
    import jax, numpy as np
    from brjax.data import input_pipeline
    from brjax.models import cifar as models
    from brjax.training import parallel
    from brjax.quant import lsq as quant
    from brjax.training import steps
    from brjax.training import train
    from brjax.training.config import Config

    def tiny_dataset(n=32):
      rng = np.random.default_rng(0)
      images = lambda k: rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8)
      labels = lambda k: rng.integers(0, 10, k).astype(np.int32)
      return input_pipeline.Dataset(images(n), labels(n), images(8), labels(8),
                                    tuple("abcdefghij"), np.full(3, 0.5, np.float32),
                                    np.full(3, 0.25, np.float32))

    CONFIG = Config(bits_w=2, bits_a=2, lambda_w=1.0, lambda_a=1.0, batch_size=16)

    def initial_state(ds):
      model = models.CifarResNet(
          stage_sizes=(1, 1), stage_filters=(8, 16),
          conv=functools.partial(quant.QuantConv, bits=2),
          dense=functools.partial(quant.QuantDense, bits=2),
          act=functools.partial(quant.QuantReLU, bits=2))
      return jax.device_get(train.create_train_state(CONFIG, model, ds, 2))

    def two_steps(devices, ds, state):
      topology = parallel.Topology.create(devices)
      state = jax.device_put(state, topology.replicated)
      step = parallel.jit_train_step(topology, steps.br_settings(CONFIG, steps.BR))
      batch = next(parallel.process_local_batches(
          input_pipeline.train_batches(ds, 16, seed=0, epoch=1), topology.batch))
      assert len(batch["image"].sharding.device_set) == len(devices)
      for _ in range(2):
        state, metrics = step(state, batch)
      assert len(state.params["conv_init"]["kernel"].sharding.device_set) == len(devices)
      return jax.device_get({"params": state.params, "batch_stats": state.batch_stats,
                             "opt_state": state.opt_state, "metrics": metrics})

    def save(path, tree):
      flat = jax.tree_util.tree_flatten_with_path(tree)[0]
      np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
""")


# The subprocesses below compile at XLA's optimization level 0 (LLVM's optimizations off),
# after the level the tests run at (tests/conftest.py), which it overrides: compiling is
# most of their time (the two-step subprocess: 13 s of CPU at level 0, 19 s at level 2,
# 35 s at XLA's default 3), and running slower is nothing at these sizes. Every comparison
# here, 1 device against 2, one process against two, is between programs compiled at the
# same level: what they check (the partitioning, the collectives) is XLA's and brjax's,
# not LLVM's. (The signal test's processes, started without these flags, keep XLA's
# default level.)
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _env(**extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count=2 {FAST_COMPILE}").strip()
  env.update(extra)
  return env


def _python(code: str, *args: str, env: dict) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, timeout: int = 300) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"subprocess timed out after {timeout} s:\n{out[-3000:]}")
  assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{out[-3000:]}"
  return out


def _load(path) -> dict:
  with np.load(path) as f:
    return dict(f)


@pytest.fixture(scope="session")
def steps_on_one_and_two_devices(tmp_path_factory, request):
  """The state after two steps on 1 device and on 2 devices, from one subprocess, once per
  test session."""
  code = STEPS + textwrap.dedent("""
      assert len(jax.devices()) == 2, jax.devices()
      ds = tiny_dataset()
      state = initial_state(ds)
      save(sys.argv[1], two_steps(jax.devices()[:1], ds, state))
      save(sys.argv[2], two_steps(jax.devices()[:2], ds, state))
  """)
  def make(tmp):
    _wait(_python(code, str(tmp / "one.npz"), str(tmp / "two.npz"), env=_env()))
    return _load(tmp / "one.npz"), _load(tmp / "two.npz")
  return once_per_session(request, tmp_path_factory, "multidevice_steps", make)


@pytest.mark.slow
def test_step_on_two_devices_equals_one_device(steps_on_one_and_two_devices):
  """Same state and batch: same parameters, BatchNorm statistics, optimizer state, metrics.

  BatchNorm statistics are over the global batch on both, so they match too.
  """
  one, two = steps_on_one_and_two_devices
  assert one.keys() == two.keys()
  assert any("batch_stats" in k for k in one) and any("'mean'" in k for k in one)
  chex.assert_trees_all_close(two, one, rtol=2e-4, atol=2e-6)
  assert float(one["['metrics']['br_a']"]) > 0 and float(one["['metrics']['br_w']"]) > 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _slurm_env(num_processes: int, process_id: int, port: int) -> dict:
  """What a SLURM job step sets, for ``jax.distributed.initialize()`` to find."""
  return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
          "SLURM_NTASKS": str(num_processes), "SLURM_PROCID": str(process_id),
          "SLURM_LOCALID": str(process_id), "SLURM_STEP_NUM_NODES": "1",
          "JAX_COORDINATOR_ADDRESS": f"localhost:{port}"}


@pytest.mark.slow
def test_two_processes_each_feed_their_rows(steps_on_one_and_two_devices, tmp_path):
  """2 processes x 2 devices, each passing only its half of every batch: same result.

  Each process builds the global arrays with ``jax.make_array_from_process_local_data``
  from its own rows (``parallel.process_local_batches``); BatchNorm statistics and gradients
  are reduced across the processes (gloo, over localhost).
  """
  one, _ = steps_on_one_and_two_devices
  code = STEPS + textwrap.dedent("""
      jax.distributed.initialize()
      assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
      ds = tiny_dataset()
      save(sys.argv[1], two_steps(jax.devices(), ds, initial_state(ds)))
  """)
  port = _free_port()
  procs = [_python(code, str(tmp_path / f"process{i}.npz"), env=_env(**_slurm_env(2, i, port)))
           for i in range(2)]
  try:
    for proc in procs:
      _wait(proc)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i in range(2):
    chex.assert_trees_all_close(_load(tmp_path / f"process{i}.npz"), one, rtol=2e-4,
                                atol=2e-6)


@pytest.mark.slow
def test_cli_trains_on_two_devices(cifar_dir, tmp_path):
  """A tiny two-phase run of scripts/train.py on 2 devices, through --distributed.

  One process (the SLURM variables say so) with two CPU devices: the flag's
  ``jax.distributed.initialize()`` path, and the data-parallel loop, end to end.
  """
  proc = subprocess.Popen(
      [sys.executable, "scripts/train.py", "--distributed", "--model=resnet8",
       "--train_examples=128",
       "--test_examples=64", "--batch_size=32", "--epochs=2", "--warmup_epochs=1",
       f"--data_dir={cifar_dir}", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env=_env(**_slurm_env(1, 0, _free_port())), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  out = _wait(proc)
  assert "Devices: 2 x cpu" in out
  assert "Epoch 2/2 [BR]" in out
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2


def test_cli_distributed_without_a_cluster_is_a_one_line_error(tmp_path):
  env = {k: v for k, v in _env().items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
  result = subprocess.run(
      [sys.executable, "scripts/train.py", "--distributed", "--epochs=1", "--warmup_epochs=0",
       f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith("error: --distributed: ")
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


# Unmodified Flax models quantized by rules: the loss and gradient of one BR step with the
# batch sharded over 2 devices, and on 1 device. In float64: BR's bins are discontinuous,
# and in float32 the reduction order of the sharded program moves an activation across a
# bin boundary now and then, which moves the gradients of a sparsely filled bin by far
# more than rounding (seen: 50% on a few elements of one channel). (A ResNet whose stem
# max-pools quantized values is left out: tied maxima in a pooling window route the
# gradient by the program's layout, both valid subgradients; seen, and gone with an
# average pool.)
QUANTIZED_MODELS = textwrap.dedent("""
    import functools, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from brjax.models import plain as plain_models
    from brjax.quant import regularizer
    from brjax.quant.quantize import quantize_model
    from brjax.quant.rules import QuantRule

    assert len(jax.devices()) == 2, jax.devices()
    rules = (QuantRule(".*", weight_bits=4, act_bits=4, per_channel=True),)
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3), jnp.float64)
    y = jnp.arange(8) % 10
    to64 = lambda tree: jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    out = {}
    for name, make in [("mobilenet_v2", plain_models.MobileNetV2),
                       ("vit_scan", functools.partial(plain_models.ViT, scan=True))]:
      model = quantize_model(make(), rules)
      variables = jax.jit(lambda key, x: to64(model.init(key, x)))(jax.random.key(1), x)

      def loss(params, x):
        logits, state = model.apply({**variables, "params": params}, x,
                                    mutable=["batch_stats", "quant"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + sum(regularizer.br_losses(state["quant"]))

      step = jax.jit(jax.value_and_grad(loss))
      for devices in (1, 2):
        mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        params = jax.device_put(variables["params"], NamedSharding(mesh, P()))
        value, grads = jax.device_get(step(params, xs))
        flat = jax.tree_util.tree_flatten_with_path(grads)[0]
        out.update({f"{devices}/{name}/{jax.tree_util.keystr(k)}": np.asarray(v)
                    for k, v in flat})
        out[f"{devices}/{name}/loss"] = np.asarray(value)
    np.savez(sys.argv[1], **out)
""")


@pytest.mark.slow
def test_quantized_plain_models_on_two_devices_equal_one(tmp_path):
  _wait(_python(QUANTIZED_MODELS, str(tmp_path / "out.npz"), env=_env()))
  out = _load(tmp_path / "out.npz")
  one = {k[2:]: v for k, v in out.items() if k.startswith("1/")}
  two = {k[2:]: v for k, v in out.items() if k.startswith("2/")}
  assert one.keys() == two.keys() and len(one) > 50
  assert {k.split("/")[0] for k in one} == {"mobilenet_v2", "vit_scan"}
  assert all(v.dtype == np.float64 for v in one.values())
  chex.assert_trees_all_close(two, one, rtol=1e-9, atol=1e-12)


# flax's lm1b style (tests/quant/third_party_models.PartitionedLM: every parameter boxed by
# nn.with_logical_partitioning), quantized, its parameters sharded FSDP-style over the
# "data" axis by logical rules (each array along its first axis a rule names), the batch
# too. init is jitted with the shardings nn.get_partition_spec gives, so the step sizes
# are sharded as their boxes say; one SGD step (CE + BR) from those very values then runs
# on 1 device and on 2. In float64, as above (the init is float32: LSQ's mean over a
# sharded kernel sums in another order, so the 1-device init is compared at float32's).
PARTITIONED_LM = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests/quant")
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import third_party_models as tp
    from brjax.quant import regularizer
    from brjax.quant.quantize import quantize_model
    from brjax.quant.rules import QuantRule

    assert len(jax.devices()) == 2, jax.devices()
    RULES = (("mlp", "data"), ("heads", "data"), ("vocab", "data"), ("embed", "data"))
    model = quantize_model(tp.PartitionedLM(), QuantRule(".*", weight_bits=4, act_bits=4,
                                                         per_channel=True))
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 16)
    tx = optax.sgd(0.1)

    def shardings(devices):
      mesh = Mesh(np.asarray(devices), ("data",))
      spec = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(1), tokens))
      return mesh, nn.logical_to_mesh_sharding(spec, mesh, RULES)

    def loss_fn(params, rest, tokens):
      logits, new = model.apply({**rest, "params": params}, tokens, mutable=["quant"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
      br_w, br_a = regularizer.br_losses(new["quant"])
      return ce.mean() + br_w + br_a, (br_w, br_a)

    def train(params, rest, tokens):
      (loss, brs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, tokens)
      updates, _ = tx.update(grads, tx.init(params))
      return optax.apply_updates(params, updates), loss, brs, grads

    out = {}
    for devices in (1, 2):
      mesh, sh = shardings(jax.devices()[:devices])
      variables = nn.meta.unbox(jax.jit(model.init, out_shardings=sh)(jax.random.key(1),
                                                                       tokens))
      out[f"init{devices}"] = jax.device_get(variables)
    mlp = jax.tree.map(lambda a: a.sharding.spec, variables["params"]["DecoderBlock_0"]
                       ["LmMlpBlock_0"]["Dense_0"])  # the 2-device init's, as boxed
    assert mlp == {"alpha": P(None, "data"), "kernel": P(None, "data"), "bias": P("data"),
                   "input_alpha": P()}, mlp
    host = jax.tree.map(lambda a: a.astype(np.float64) if a.dtype == np.float32 else a,
                        out["init2"])
    for devices in (1, 2):
      mesh, sh = shardings(jax.devices()[:devices])
      v = jax.device_put(host, sh)
      params = v.pop("params")
      step = jax.jit(train, out_shardings=(sh["params"], None, None, None))
      batch = jax.device_put(tokens, NamedSharding(mesh, P("data")))
      new, loss, brs, grads = step(params, v, batch)
      if devices == 2:
        alpha = new["DecoderBlock_0"]["LmMlpBlock_0"]["Dense_0"]["alpha"]
        assert alpha.sharding.spec == P(None, "data"), alpha.sharding
      out[f"step{devices}"] = jax.device_get({"params": new, "grads": grads, "loss": loss,
                                              "br": brs})
    flat = jax.tree_util.tree_flatten_with_path(out)[0]
    np.savez(sys.argv[1], **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
""")


@pytest.mark.slow
def test_partitioned_lm_fsdp_step_on_two_devices_equals_one(tmp_path):
  """Step sizes of boxed kernels, sharded with them (per channel along the kernel's output
  axis, inputs replicated): the 2-device FSDP step gives the 1-device step (loss, BR, every
  gradient and updated parameter, step sizes included); the sharded init, LSQ's."""
  _wait(_python(PARTITIONED_LM, str(tmp_path / "out.npz"), env=_env()))
  out = _load(tmp_path / "out.npz")
  part = lambda prefix: {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
  one, two = part("['step1']"), part("['step2']")
  assert one.keys() == two.keys() and len(one) > 100
  alphas = [k for k in one if k.startswith("['grads']") and "alpha'" in k]
  assert len(alphas) == 2 * 13 and all(np.all(one[k] != 0) for k in alphas)
  assert float(one["['br'][0]"]) > 0 and float(one["['br'][1]"]) > 0
  chex.assert_trees_all_close(two, one, rtol=1e-9, atol=1e-12)
  chex.assert_trees_all_close(part("['init2']"), part("['init1']"), rtol=1e-6, atol=1e-7)


def _two_processes(argv: list[str], port: int) -> list[subprocess.Popen]:
  env = dict(_env(), XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))  # one device per process
  return [subprocess.Popen([sys.executable, "scripts/train.py", "--distributed", *argv],
                           cwd=REPO, env={**env, **_slurm_env(2, i, port)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: int = 300) -> list[tuple[int, str]]:
  try:
    return [(proc.returncode, proc.communicate(timeout=timeout)[0]) for proc in procs
            if proc.wait(timeout=timeout) is not None]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_at_one_step_and_resume_is_exact(
    cifar_dir, tmp_path):
  """A Ctrl-C to process 1 alone: both processes save one checkpoint at the same step and
  exit (no hang); resumed on two processes, the run gives the uninterrupted run's metrics."""
  # Ten steps, each saving a checkpoint: the signal, sent when the first is saved, lands
  # while the run still has nine to go, however fast it compiles (or reads its programs
  # from the compilation cache).
  flags = ["--model=resnet8", "--train_examples=320", "--test_examples=32", "--batch_size=32",
           "--epochs=1", "--warmup_epochs=1", f"--data_dir={cifar_dir}"]
  whole, stopped = tmp_path / "whole", tmp_path / "stopped"
  procs = _two_processes([*flags, f"--workdir={whole}"], _free_port())
  assert [code for code, _ in _finish(procs)] == [0, 0]

  argv = [*flags, f"--workdir={stopped}", "--checkpoint_every_steps=1"]
  procs = _two_processes(argv, _free_port())
  first = stopped / "checkpoints" / "steps" / "1"
  deadline = time.time() + 300
  while not first.exists() and procs[1].poll() is None and time.time() < deadline:
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGINT)
  results = _finish(procs)
  assert [code for code, _ in results] == [130, 130], results
  assert "interrupted: saved at epoch" in results[0][1], results[0][1][-2000:]
  assert not list(stopped.rglob("*orbax-checkpoint-tmp*"))
  assert len(os.listdir(stopped / "checkpoints" / "steps")) == 1

  procs = _two_processes([*argv, "--resume"], _free_port())
  results = _finish(procs)
  assert [code for code, _ in results] == [0, 0], results[0][1][-2000:]
  assert "Resumed from" in results[0][1]
  timing = ("epoch_time_s", "step_time_s")
  read = lambda workdir: [{k: v for k, v in json.loads(line).items() if k not in timing}
                          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert read(stopped) == read(whole)
