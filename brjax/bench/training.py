"""Benchmarks of brjax training on this machine: step times, BR cost, compiles, input, FLOP/s.

:func:`run_benchmark` (``scripts/benchmark.py``) measures everything in one process, after
compilation, with wall-clock time:

* ``step_time_{float,warmup,br}``: median time of one jitted training step
  (``brjax.training.train.jit_train_step``, state from ``create_train_state``, one synthetic batch
  of random uint8 images) for float (32 bits), QAT W2A2 without BR (the WARMUP step) and
  QAT W2A2 with ``lambda_w = lambda_a = 1`` (the BR step). The three are interleaved round
  by round (in a rotating order), so machine noise hits all of them alike;
  ``step_ratio_*`` are medians of the per-round ratios to the float step of that round.
* ``compile_time_*``: XLA backend compilation of each step, in seconds (the WARMUP and BR
  steps as the two-phase run below compiled them; they are then read back from a
  persistent compilation cache in a temporary folder instead of being compiled twice).
* ``br_time_{2,4,8}bit`` (forward) and ``br_grad_time_{2,4,8}bit`` (value and gradients):
  median time of the jitted ``regularizer.bin_regularization`` on a 1M-element tensor.
* ``compiles_train_step``, ``compiles_eval_step``: backend compilations (counted with a
  ``jax.monitoring`` listener, per function name) of a whole two-phase run of
  ``train.train_and_evaluate`` (1 warmup + 1 BR epoch) on a tiny synthetic image folder
  (or on ``data_dir``).
* ``input_images_per_s``: the input pipeline alone, as the training loop runs it
  (``train_batches`` with augmentation, then ``train.device_batches``: global arrays,
  prefetched onto the devices), against ``step_images_per_s``, the images per second the
  fastest of the three steps consumes (batch size / step time).
* ``plain_<model>_*`` (``plain_models=True``):
  ``brjax.bench.plain.quantized_model_steps`` for unmodified Flax models (``brjax.models.plain``:
  a ViT of ViT-Tiny's width and a small MobileNetV2, batch 64 of 32x32 images): the float
  step, the step of the model quantized by ``brjax.quantize_model`` (W4A4 on every weight
  and layer input; LSQ only, and with BR_W + BR_A), and Qwix's QAT step (int8: its int4
  fails on the CPU; where Qwix cannot train the model, its error is reported instead).
* ``float_step_flops_per_s``: the float step's FLOPs (XLA's ``cost_analysis`` of the
  compiled step) per second of its median time, against ``matmul_flops_per_s``, a large
  float32 matmul on the same devices.
* ``checkpoint_save_call_ms``, ``step_with_save_over_step``,
  ``step_with_sync_save_over_step``: the step time around a mid-epoch checkpoint
  (``brjax.bench.checkpointing``: asynchronous saves against waited-for ones).
* with ``onnx=True``: ``brjax.bench.onnx``, the ONNX export in onnxruntime.

Measurements go into a :class:`Report` (and, as they come, one JSON line each to
``json_out``); :func:`results_text` is its table and the :data:`TARGETS` with PASS, FAIL or
SKIP (timing targets are not checked with ``quick``: too few, too small steps to mean
anything; the compile counts are checked in both modes).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import contextlib
import dataclasses
import functools
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from brjax.bench import plain as bench_plain
from brjax.bench import scale as bench_scale
from brjax.bench.checkpointing import time_checkpoint_saves

# Imported by name: brjax.bench.training's public names too (scripts/benchmark.py, tests).
from brjax.bench.report import (  # noqa: F401
  TARGETS,
  Report,
  check_targets,
  median_time,
  results_text,
)
from brjax.data import input_pipeline
from brjax.quant import lsq as quant
from brjax.quant import regularizer
from brjax.training import train
from brjax.training.config import Config

BR_ELEMENTS = 1 << 20
BR_BITS = (2, 4, 8)
STEPS = ("float", "warmup", "br")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

def synthetic_dataset(num_train: int, num_test: int, seed: int = 0):
  """A CIFAR-shaped ``input_pipeline.Dataset`` of random uint8 images and labels."""
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
  return input_pipeline.Dataset(
      images(num_train), labels(num_train), images(num_test), labels(num_test),
      tuple(str(i) for i in range(10)), np.full(3, 0.5, np.float32),
      np.full(3, 0.25, np.float32))


def time_steps(report: Report, config, rounds: int, compiles: CompileLog) -> dict:
  """Step times (interleaved), step ratios and compile times; returns the float step.

  The WARMUP and BR steps use ``config``: that of the two-phase run, which compiled them
  first (their compile times are that run's); the float step is the same config at 32 bits.
  """
  batch_size = config.batch_size
  ds = synthetic_dataset(batch_size, 16)
  topology = train.Topology.create()
  batch = jax.device_put(next(input_pipeline.train_batches(ds, batch_size, seed=0, epoch=1)),
                         topology.batch)
  setups = {"float": (dataclasses.replace(config, bits_w=32, bits_a=32), train.FLOAT),
            "warmup": (config, train.WARMUP), "br": (config, train.BR)}
  steps, compiled_float, fresh = {}, None, {}
  for name in STEPS:
    step_config, phase = setups[name]
    if step_config not in fresh:  # WARMUP and BR start from copies of one state
      model = train.create_model(step_config, ds.num_classes, ds.image_size)  # the run's
      fresh[step_config] = jax.device_put(
          train.create_train_state(step_config, model, ds, 1), topology.replicated)
    state = jax.tree.map(jnp.copy, fresh[step_config])  # the step donates its state
    seen = len(compiles.train_step)
    step = train.jit_train_step(topology, train.br_settings(step_config, phase))
    if name == "float":  # compiled ahead of time, for the cost analysis of the program
      compiled = compiled_float = step.lower(state, batch).compile()
      seconds = compiles.train_step[seen] if len(compiles.train_step) > seen else None
    else:  # the two-phase run compiled them: its first train step is WARMUP, its second BR
      compiled, i = step, STEPS.index(name) - 1
      seconds = compiles.run_train_step[i] if i < len(compiles.run_train_step) else None
    report.add(f"compile_time_{name}", seconds, "s", "XLA backend compilation of the step")
    state, metrics = compiled(state, batch)  # first run: allocations, thread pools
    jax.block_until_ready((state, metrics))
    steps[name] = [compiled, state]
  del fresh

  times = {name: [] for name in STEPS}
  for r in range(rounds):
    order = STEPS[r % 3:] + STEPS[:r % 3]  # rotate, so no step always follows another
    for name in order:
      compiled, state = steps[name]
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times[name].append(time.perf_counter() - start)
      steps[name][1] = state
  medians = {name: statistics.median(t) for name, t in times.items()}
  for name in STEPS:
    report.add(f"step_time_{name}", medians[name] * 1e3, "ms",
               f"median of {rounds} interleaved steps, batch {batch_size}")
  for name in ("warmup", "br"):
    ratios = [q / f for q, f in zip(times[name], times["float"])]
    report.add(f"step_ratio_{name}", statistics.median(ratios), "x",
               f"median per-round {name} / float")
  return {"compiled_float": compiled_float, "medians": medians}


def time_bin_regularization(report: Report, reps: int) -> None:
  """The jitted BR of one 1M-element tensor at 2, 4 and 8 bits (forward, and with grads)."""
  v = jax.random.normal(jax.random.key(0), (BR_ELEMENTS,)) * 0.1
  fns = {}
  for bits in BR_BITS:
    qn, qp = quant.qrange(bits, signed=True)
    alpha = quant.init_alpha(v, qp)  # LSQ init: every bin in use
    loss = functools.partial(regularizer.bin_regularization, qn=qn, qp=qp, alpha_grad=True)
    fns[f"br_time_{bits}bit"] = (jax.jit(loss), alpha)
    fns[f"br_grad_time_{bits}bit"] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), alpha)
  for fn, alpha in fns.values():
    jax.block_until_ready(fn(v, alpha))
  times = {name: [] for name in fns}
  for _ in range(reps):  # interleaved, like the steps
    for name, (fn, alpha) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(v, alpha))
      times[name].append(time.perf_counter() - start)
  for name, t in times.items():
    what = "value and grads" if "grad" in name else "forward"
    report.add(name, statistics.median(t) * 1e3, "ms",
               f"{what}, {BR_ELEMENTS} elements, median of {reps}")
  ratios = [a / b for a, b in zip(times["br_time_8bit"], times["br_time_2bit"])]
  report.add("br_ratio_8bit_2bit", statistics.median(ratios), "x", "forward, per-round median")
  ratios = [a / b for a, b in zip(times["br_grad_time_8bit"], times["br_grad_time_2bit"])]
  report.add("br_grad_ratio_8bit_2bit", statistics.median(ratios), "x",
             "value and grads, per-round median")


def write_image_folder(root: str, train_per_class: int, test_per_class: int) -> None:
  """A tiny CIFAR-shaped image folder: root/{train,test}/<class>/<i>.png."""
  rng = np.random.default_rng(0)
  for split, count in (("train", train_per_class), ("test", test_per_class)):
    for c in range(10):
      folder = os.path.join(root, split, f"class{c}")
      os.makedirs(folder)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i}.png"))


class CompileLog:
  """Backend compilations per function name, with their durations (``jax.monitoring``)."""
  def __init__(self):
    self.seconds: dict[str, list[float]] = collections.defaultdict(list)
    self.run_train_step: list[float] = []  # those of the two-phase run

  @property
  def train_step(self) -> list[float]:
    return self.seconds["jit(train_step)"]

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
      self.seconds[str(kwargs.get("fun_name", "?"))].append(duration)

  @contextlib.contextmanager
  def listening(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    try:
      yield self
    finally:
      jax.monitoring.unregister_event_duration_listener(self)


def count_run_compiles(report: Report, config, workdir: str, compiles: CompileLog) -> None:
  """Backend compilations of a whole two-phase run (1 warmup + 1 BR epoch) of ``config``."""
  before = {name: len(s) for name, s in compiles.seconds.items()}
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir, log=lambda _: None)
  seconds = time.perf_counter() - start
  counts = {name: len(s) - before.get(name, 0) for name, s in compiles.seconds.items()}
  compiles.run_train_step = compiles.train_step[before.get("jit(train_step)", 0):]
  report.add("compiles_train_step", counts.get("jit(train_step)", 0), "count",
             "jit(train_step), whole two-phase run")
  report.add("compiles_eval_step", counts.get("jit(eval_step)", 0), "count",
             "jit(eval_step), whole two-phase run")
  report.add("compiles_total", sum(counts.values()), "count",
             "every backend compilation of that run, small ops included")
  report.add("two_phase_run_time", seconds, "s",
             f"{config.epochs} epochs of {config.train_examples} images, compilation included")


def time_input_pipeline(report: Report, batch_size: int, num_batches: int, reps: int,
                        step_seconds: float) -> None:
  """Images/second of augmented, prefetched train batches vs the step's consumption."""
  ds = synthetic_dataset(batch_size * num_batches, 16, seed=1)
  topology = train.Topology.create()

  def epoch(e: int) -> None:  # as train.train_and_evaluate feeds its steps
    for batch in train.device_batches(
        input_pipeline.train_batches(ds, batch_size, seed=0, epoch=e), topology):
      jax.block_until_ready(batch)

  epoch(0)
  counter = iter(range(1, reps + 1))
  seconds = median_time(lambda: epoch(next(counter)), reps)
  images_per_s = batch_size * num_batches / seconds
  consumed = batch_size / step_seconds
  report.add("input_images_per_s", images_per_s, "images/s",
             f"train_batches, process_local_batches, prefetch: {num_batches} x {batch_size}")
  report.add("step_images_per_s", consumed, "images/s",
             "batch size / median time of the fastest timed step")
  report.add("input_ratio", images_per_s / consumed, "x", "input / step consumption")


def measure_flops(report: Report, compiled_float, float_seconds: float, matmul_size: int,
                  reps: int) -> None:
  """The float step's achieved FLOP/s against a large float32 matmul's."""
  cost = compiled_float.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  report.add("float_step_flops", flops / 1e9, "GFLOP", "XLA cost_analysis of the compiled step")
  achieved = flops / float_seconds
  report.add("float_step_flops_per_s", achieved / 1e9, "GFLOP/s", "per median float step")
  n = matmul_size
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  seconds = median_time(lambda: jax.block_until_ready(matmul(a, b)), reps)
  peak = 2.0 * n**3 / seconds
  report.add("matmul_flops_per_s", peak / 1e9, "GFLOP/s", f"f32 {n}x{n} @ {n}x{n}")
  report.add("float_step_peak_fraction", achieved / peak, "fraction",
             "float step FLOP/s / matmul FLOP/s")


def time_plain_models(report: Report, rounds: int, log: Callable[[str], None]) -> None:
  """``brjax.bench.plain.quantized_model_steps`` of each plain model: W4A4 + BR against
  float and against Qwix's QAT (int8: Qwix's int4 does not run on the CPU)."""
  for name in bench_plain.MODELS:
    log(f"{name}: float, brjax and Qwix steps")
    r = bench_plain.quantized_model_steps(name, rounds=rounds, qwix_bits=8, log=log)
    prefix = f"plain_{name}"
    report.add(f"{prefix}_float_step", r["float_s"], "s", f"batch {r['batch']}")
    report.add(f"{prefix}_brjax_lsq_step", r["brjax_lsq_s"], "s", "W4A4 LSQ, no BR")
    report.add(f"{prefix}_brjax_step", r["brjax_s"], "s", "W4A4 LSQ + BR_W + BR_A")
    report.add(f"{prefix}_qwix_step", r["qwix_s"], "s",
               "Qwix QAT int8" if r["qwix_error"] is None else f"Qwix failed: {r['qwix_error']}")
    report.add(f"{prefix}_brjax_over_float", r["brjax_over_float"], "x")
    report.add(f"{prefix}_brjax_over_qwix", r["brjax_over_qwix"], "x")


def measure_scale(report: Report, config, rounds: int, quick: bool,
                  log: Callable[[str], None]) -> None:
  """bfloat16 against float32 (the BR step of ``config``), and the step memory of ResNet-50
  (ResNet-18 at 64x64, batch 8, with ``quick``) without A-BR, with it, with remat."""
  dtypes = bench_scale.time_dtypes(config, 32, rounds, log=log)
  note = f"BR step, {config.model} W2A2, batch {config.batch_size}, median of {rounds} rounds"
  report.add("step_time_br_bfloat16", dtypes["bfloat16"] * 1e3, "ms", note)
  report.add("step_ratio_bfloat16", dtypes["ratio"], "x", "median per-round bfloat16 / float32")
  model, size, batch = ("resnet18_imagenet", 64, 8) if quick else ("resnet50", 224, 32)
  memory = bench_scale.step_memory(
      dataclasses.replace(config, model=model, batch_size=batch), size, log=log)
  for name, megabytes in memory.items():
    report.add(f"step_memory_{name}", megabytes, "MB",
               f"XLA's plan of the BR step, {model} W2A2 {size}x{size} batch {batch}")


@contextlib.contextmanager
def _compilation_cache(path: str):
  """Caches every compilation of the block in ``path`` (JAX's persistent cache), then
  restores the caller's cache settings (before ``path`` goes). A process whose cache is
  already in use (JAX opens it once) keeps writing to that one instead."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (path, 0.0, 0)):
    jax.config.update(name, value)
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)


def run_benchmark(quick: bool, model_name: str, batch_size: int, rounds: int,
                  data_dir: str | None = None, json_out: str | None = None,
                  plain_models: bool = False, scale: bool = False, onnx: bool = False,
                  log: Callable[[str], None] = lambda _: None) -> Report:
  """Takes every measurement of this module's docstring; returns the report.

  Args:
    quick: fewer repetitions and smaller inputs (the batch size is the caller's).
    model_name: the CIFAR ResNet timed (``create_model``'s name).
    batch_size, rounds: of the timed steps (interleaved rounds).
    data_dir: images for the two-phase run; None: a tiny synthetic folder.
    json_out: a file for one JSON line per measurement, or None.
    plain_models: also time ``brjax.bench.plain.MODELS`` against float and Qwix.
    scale: also ``brjax.bench.scale``: the BR step in bfloat16 against float32 (this
      model, this batch), and the memory plan of ResNet-50's BR step (224x224, batch 32)
      without A-BR, with it, and with it under remat.
    onnx: also ``brjax.bench.onnx`` (when onnxruntime is installed): the ONNX int model
      against its QDQ and float ONNX exports and brjax's jitted evaluation.
    log: progress lines.
  """
  devices = jax.devices()
  context = {"device": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
             "jax": jax.__version__, "cores": os.cpu_count(), "model": model_name,
             "batch_size": batch_size, "quick": quick, "python": platform.python_version(),
             "xla_flags": os.environ.get("XLA_FLAGS", "")}
  report = Report(context, json_out)
  compiles = CompileLog()
  try:
    # The temporary folder holds a fresh persistent compilation cache, configured for every
    # compilation below: the two-phase run compiles everything first (so its counts are
    # real compilations); the timed WARMUP and BR steps are the same programs and are then
    # read back from it instead of being compiled a second time.
    with (tempfile.TemporaryDirectory() as tmp, compiles.listening(),
          _compilation_cache(os.path.join(tmp, "jax_cache"))):
      if data_dir is None:
        data_dir = os.path.join(tmp, "images")
        write_image_folder(data_dir, train_per_class=-(-batch_size // 10), test_per_class=2)
      # One batch per epoch: 1 WARMUP epoch, then 1 BR epoch. The timed QAT steps below are
      # the same programs (same config, batch and schedule length).
      config = Config(model=model_name, bits_w=2, bits_a=2, lambda_w=1.0, lambda_a=1.0,
                      epochs=2, warmup_epochs=1, batch_size=batch_size,
                      train_examples=batch_size, test_examples=20, data_dir=data_dir)
      log("a two-phase run (compile counts)")
      count_run_compiles(report, config, os.path.join(tmp, "run"), compiles)
      log(f"float, warmup and BR steps, {rounds} rounds")
      steps = time_steps(report, config, rounds, compiles)
      log("Bin Regularization on 1M elements")
      time_bin_regularization(report, reps=10 if quick else 50)
      log("input pipeline")
      time_input_pipeline(report, batch_size, num_batches=8 if quick else 40,
                          reps=2 if quick else 3, step_seconds=min(steps["medians"].values()))
      log("FLOP/s")
      measure_flops(report, steps["compiled_float"], steps["medians"]["float"],
                    matmul_size=1024 if quick else 2048, reps=3 if quick else 10)
      log("the step time around a mid-epoch checkpoint")
      time_checkpoint_saves(report, config, synthetic_dataset(batch_size, 16),
                            rounds=3 if quick else 10, workdir=tmp)
      if plain_models:  # inside: the compilation cache writes to the folder until it goes
        time_plain_models(report, rounds=3 if quick else 5, log=log)
      if scale:
        measure_scale(report, config, rounds, quick, log)
      if onnx:
        from brjax.bench import onnx as bench_onnx  # pylint: disable=g-import-not-at-top
        if bench_onnx.available():
          bench_onnx.time_onnx(report, model_name, reps=5 if quick else 20, log=log)
        else:
          log("onnx: skipped (pip install 'brjax[onnx]')")
  finally:
    report.close()
  return report
