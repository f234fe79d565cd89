"""Two-stage QAT+BR training: TrainState, the jitted steps, the phases, and the loop.

Phase 1 (``WARMUP``, ``warmup_epochs``): cross-entropy only; LSQ learns the grids.
Phase 2 (``BR``): ``CE + lambda_w * BR_W + lambda_a * BR_A``; at the switch the weight
and/or activation step sizes may be frozen (``optax.set_to_zero`` on their labels).
A float run (32-bit weights and activations) is one plain phase (``FLOAT``).

Each phase's step is one ``jax.jit`` function, compiled once; evaluation is always
quantized and compiled once. Data parallelism: the batch is sharded over a 1-D mesh of
all devices (axis ``"data"``), the state is replicated, and BatchNorm statistics are over
the global batch because the step is written on global arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import statistics
import sys
import threading
import time
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import flax
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import tqdm

from brjax import checkpoint
from brjax import input_pipeline
from brjax import metrics
from brjax import models
from brjax import optim
from brjax import quant
from brjax import regularizer
from brjax import recipes
from brjax import sites
from brjax import summary
from brjax.config import Config, PRETRAINED_SUFFIXES

WARMUP, BR, FLOAT = "WARMUP", "BR", "FLOAT"
RULE = "=" * 80


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from Flax), plus BatchNorm statistics and an rng."""
  batch_stats: Any = None
  rng: jax.Array = None


@struct.dataclass
class BRSettings:
  """What the loss adds to cross-entropy: static, so each setting compiles its own step."""
  lambda_w: float = struct.field(pytree_node=False, default=0.0)
  lambda_a: float = struct.field(pytree_node=False, default=0.0)
  alpha_grad_a: bool = struct.field(pytree_node=False, default=False)
  abr_layers: str | None = struct.field(pytree_node=False, default=None)


def phase_of(config: Config, epoch: int) -> str:
  """The phase of a 1-based epoch."""
  if not config.quantized:
    return FLOAT
  return WARMUP if epoch <= config.warmup_epochs else BR


def br_settings(config: Config, phase: str,
                abr_sites: Sequence[str] | None = None) -> BRSettings:
  """The loss terms of a phase: none outside BR; a zero lambda drops its term entirely.

  ``abr_sites``: the activation sites A-BR sums over (see :func:`select_abr_sites`);
  None means every site.
  """
  if phase != BR:
    return BRSettings()
  pattern = None
  if abr_sites is not None:
    pattern = "^(?:" + "|".join(re.escape(s) for s in abr_sites) + ")$"
  return BRSettings(
      lambda_w=config.lambda_w if config.bits_w != quant.FLOAT_BITS else 0.0,
      lambda_a=config.lambda_a if config.bits_a != quant.FLOAT_BITS else 0.0,
      alpha_grad_a=config.br_alpha_grad_a, abr_layers=pattern)


def activation_sites(model: flax.linen.Module, variables: dict, images: jax.Array) -> list[str]:
  """The module paths of a model's activation sites, in the order the forward pass runs them.

  Traced only (``jax.eval_shape``): no computation. A path called several times appears once.
  """
  order = []

  def record(variables, images):
    _, state = model.apply(variables, images, train=False, mutable=[sites.COLLECTION])
    for path, _, _ in sites.iterate(state.get(sites.COLLECTION, {}), (sites.INPUT, sites.OUTPUT)):
      if path not in order:
        order.append(path)

  jax.eval_shape(record, variables, images)
  return order


def select_abr_sites(config: Config, every: Sequence[str]) -> list[str] | None:
  """The activation sites A-BR regularizes: ``--abr_layers`` (a regex, ``re.search`` on the
  module path), then ``--abr_exclude_first`` / ``--abr_exclude_last`` in forward order.

  Returns None when no selection is asked for (every site). Raises ValueError when the
  selection is empty: A-BR would be a silent zero.
  """
  if config.abr_layers is None and not (config.abr_exclude_first or config.abr_exclude_last):
    return None
  chosen = [s for s in every if config.abr_layers is None or re.search(config.abr_layers, s)]
  if config.abr_exclude_first and every:
    chosen = [s for s in chosen if s != every[0]]
  if config.abr_exclude_last and every:
    chosen = [s for s in chosen if s != every[-1]]
  if not chosen:
    raise ValueError(f"--abr_layers={config.abr_layers} (exclude first: "
                     f"{config.abr_exclude_first}, last: {config.abr_exclude_last}) selects "
                     f"no activation site of {config.model}; its sites are: {', '.join(every)}")
  return chosen


def train_step(state: TrainState, batch: dict, br: BRSettings) -> tuple[TrainState, dict]:
  """One optimizer step on ``CE + br.lambda_w * BR_W + br.lambda_a * BR_A``.

  Args:
    state: the replicated training state.
    batch: ``{"image": float (B, H, W, C), "label": int32 (B,)}``, sharded on the batch.
    br: the BR terms (static).

  Returns:
    The new state and per-step sums: ``loss``, ``ce``, ``br_w``, ``br_a`` (each times B, so
    that epoch sums divided by ``count`` are means), ``correct`` and ``count``.
  """
  # Quantization sites are recorded only when BR reads them: otherwise no BR work at all.
  with_br = br.lambda_w > 0 or br.lambda_a > 0
  mutable = ["batch_stats"] + ([sites.COLLECTION] if with_br else [])

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     batch["image"], train=True, mutable=mutable)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    zero = jnp.zeros((), ce.dtype)
    recorded = updates.get(sites.COLLECTION, {})
    br_w = regularizer.weight_br(recorded) if br.lambda_w > 0 else zero
    br_a = (regularizer.activation_br(recorded, alpha_grad=br.alpha_grad_a,
                                      layers=br.abr_layers) if br.lambda_a > 0 else zero)
    loss = ce + br.lambda_w * br_w + br.lambda_a * br_a
    return loss, (logits, updates["batch_stats"], ce, br_w, br_a)

  (loss, (logits, batch_stats, ce, br_w, br_a)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  n = batch["label"].shape[0]
  metrics = {"loss": loss * n, "ce": ce * n, "br_w": br_w * n, "br_a": br_a * n,
             "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]),
             "count": jnp.asarray(n, jnp.int32)}
  return state, metrics


def eval_step(apply_fn: Callable, variables: dict, batch: dict) -> dict:
  """Quantized evaluation of one padded batch: sums of ``loss``, ``correct``, ``count``.

  ``variables`` is ``{"params", "batch_stats"}`` (not the TrainState, whose optimizer
  changes at the phase switch: the eval step compiles once for the whole run).
  ``batch`` is ``{"image", "label", "mask": bool (B,)}``; padded examples don't count.
  """
  logits = apply_fn(variables, batch["image"], train=False)
  mask = batch["mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return {"loss": jnp.sum(jnp.where(mask, ce, 0.0)),
          "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & mask),
          "count": jnp.sum(mask.astype(jnp.int32))}


@dataclasses.dataclass(frozen=True)
class Topology:
  """The device mesh and the shardings of the batch and of replicated values."""
  mesh: Mesh

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @classmethod
  def create(cls, devices=None) -> "Topology":
    return cls(Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",)))


def jit_train_step(topology: Topology, br: BRSettings) -> Callable:
  """``train_step`` for one phase, jitted with the state donated and replicated."""
  return jax.jit(functools.partial(train_step, br=br),
                 in_shardings=(topology.replicated, topology.batch),
                 out_shardings=(topology.replicated, topology.replicated),
                 donate_argnums=0)


def jit_eval_step(topology: Topology, apply_fn: Callable) -> Callable:
  """``eval_step(variables, batch)`` of a model, jitted."""
  return jax.jit(functools.partial(eval_step, apply_fn),
                 in_shardings=(topology.replicated, topology.batch),
                 out_shardings=topology.replicated)


def process_local_batches(batches: Iterable[dict], sharding: NamedSharding) -> Iterator[dict]:
  """Host batches as global arrays to which each process contributes only its own rows.

  Every process iterates the same global batches (same seed and order); ``sharding`` splits
  axis 0 over the devices of all processes, and each process hands over the rows its own
  devices hold (``jax.make_array_from_process_local_data``). With one process those are all
  the rows: the same arrays as ``jax.device_put(batch, sharding)``.
  """
  for batch in batches:
    yield {key: _from_process_rows(x, sharding) for key, x in batch.items()}


def device_batches(batches: Iterable[dict], topology: Topology) -> Iterator[dict]:
  """Host batches as global arrays sharded over the batch axis, prepared in a background
  thread (``input_pipeline.prefetch``): what the train and eval steps consume."""
  return input_pipeline.prefetch(process_local_batches(batches, topology.batch),
                                 sharding=topology.batch)


def _from_process_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  rows = {index[0].indices(x.shape[0])[:2]
          for index in sharding.addressable_devices_indices_map(x.shape).values()}
  lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
  if sum(stop - start for start, stop in rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(rows)} of the batch, "
                     "not one block: list the devices process by process")
  return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)


def _first_batch(ds: input_pipeline.Dataset, batch_size: int) -> jax.Array:
  """The first ``batch_size`` training images, normalized, unaugmented: for LSQ init."""
  return jnp.asarray(input_pipeline.normalize(ds.train_images[:batch_size], ds.mean, ds.std))


def create_train_state(config: Config, model: flax.linen.Module, ds: input_pipeline.Dataset,
                       steps_per_epoch: int, frozen=()) -> TrainState:
  """A fresh state; every step size initialized the LSQ way from weights and one batch.

  With ``config.pretrained`` the weights and BatchNorm statistics of that run (a brjax
  workdir, or a reference ``.pth`` via ``brjax.torch_import``) are loaded first. The step
  sizes then come from ``config.alpha_init``:

  * ``calibrate`` (brjax): ``model.init`` in train mode on the first ``batch_size``
    unaugmented training images; after loading pretrained weights, an eval-mode pass
    (their BatchNorm statistics are meaningful);
  * ``first_step`` (the reference): a train-mode pass on the first training batch, the
    augmented batch step 1 trains on (``quant.init_alphas(..., train=True)``: BatchNorm
    statistics untouched), as the reference initializes in its first training forward.

  A ``.pth`` that holds every step size (a reference QAT checkpoint) keeps them.
  """
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  batch = _first_batch(ds, config.batch_size)
  variables = jax.jit(functools.partial(model.init, train=True))(init_rng, batch)
  has_alphas = False
  if config.pretrained is not None:
    variables, has_alphas = _load_pretrained(config.pretrained, variables)
  if config.quantized and not has_alphas:
    if config.alpha_init == "first_step":
      first = next(input_pipeline.train_batches(ds, config.batch_size, seed=config.seed,
                                                epoch=1))
      variables = jax.jit(functools.partial(quant.init_alphas, model, train=True))(
          variables, jnp.asarray(first["image"]), rng=init_rng)
    elif config.pretrained is not None:
      variables = jax.jit(functools.partial(quant.init_alphas, model, train=False))(
          variables, batch, rng=init_rng)
  tx = optim.create_optimizer(config, steps_per_epoch, frozen)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"], rng=state_rng)


def create_model(config: Config, num_classes: int) -> flax.linen.Module:
  """The run's model: ``models.create_model`` with the config's layout options."""
  return models.from_run_config(config, num_classes)


def _load_pretrained(path: str, variables: dict) -> tuple[dict, bool]:
  """``variables`` with every non-alpha parameter and BatchNorm statistic from ``path``.

  Returns the variables and whether the step sizes came from ``path`` too (a reference
  QAT ``.pth``); a brjax workdir's step sizes are never taken (it is a float run).
  """
  if path.endswith(PRETRAINED_SUFFIXES):
    from brjax import torch_import  # pylint: disable=g-import-not-at-top
    try:
      loaded, has_alphas = torch_import.load_state_dict(
          variables, torch_import.read_pth(path), source=f"--pretrained={path}")
    except ImportError as e:
      raise ValueError(f"--pretrained={path} is not accepted: {e}") from None
    return jax.tree.map(jnp.asarray, loaded), has_alphas
  loaded, _ = checkpoint.restore_pretrained(path)
  flat_new = {c: flax.traverse_util.flatten_dict(variables[c]) for c in variables}
  flat_old = {c: flax.traverse_util.flatten_dict(loaded.get(c, {})) for c in loaded}
  merged = {}
  for collection, flat in flat_new.items():
    out = {}
    for p, value in flat.items():
      if quant.is_alpha_path(p):
        out[p] = value
        continue
      old = flat_old.get(collection, {}).get(p)
      if old is None or np.shape(old) != np.shape(value):
        found = "missing" if old is None else f"shape {np.shape(old)}, expected {value.shape}"
        raise checkpoint.CheckpointError(
            f"--pretrained={path} does not fit this model: {collection}/{'/'.join(p)} is "
            f"{found} (train the float baseline with the same --model)")
      out[p] = jnp.asarray(old, value.dtype)
    merged[collection] = flax.traverse_util.unflatten_dict(out)
  return merged, False


def _banner(config: Config, topology: Topology, ds: input_pipeline.Dataset,
            abr_line: str | None = None) -> str:
  devices = topology.mesh.devices.ravel()
  lines = [RULE]
  if not config.quantized:
    lines.append(f"Float training: {config.model}, epochs 1-{config.epochs}")
  else:
    lines.append(f"2-stage QAT+BR training: {config.model}, W{config.bits_w}A{config.bits_a}")
    lines.append(f"Stage 1 (Warmup): epochs 1-{config.warmup_epochs} (LSQ only)"
                 if config.warmup_epochs else "Stage 1 (Warmup): none")
    lines.append(f"Stage 2 (BR): epochs {config.warmup_epochs + 1}-{config.epochs}"
                 if config.warmup_epochs < config.epochs else "Stage 2 (BR): none")
    on = lambda lam: "ENABLED" if lam > 0 else "DISABLED"
    lines += [
        "BR configuration:",
        f"  - W-BR (weights): lambda={config.lambda_w:g} [{on(config.lambda_w)}]",
        "    └─> gradients to alpha: always (paper-faithful)",
        f"  - A-BR (activations): lambda={config.lambda_a:g} [{on(config.lambda_a)}]",
    ]
    if config.lambda_a > 0:
      lines.append(f"    └─> gradients to alpha: {config.br_alpha_grad_a} (--br_alpha_grad_a)")
    if abr_line:
      lines.append(f"    └─> activation sites: {abr_line} (--abr_layers, "
                   "--abr_exclude_first/last)")
    lines += [
        "Alpha control (after warmup):",
        f"  - freeze weight alphas: {config.freeze_alpha_w}",
        f"  - freeze activation alphas: {config.freeze_alpha_a}",
        "    └─> frozen: no update from CE or BR; not frozen: CE (and BR where enabled) "
        "update alpha",
    ]
  lines.append(_start_line(config))
  lines += [
      f"Recipe: {recipes.describe(config.recipe_parts, config.recipe)}",
      f"Data: {len(ds.train_labels)} train / {len(ds.test_labels)} test images, "
      f"{ds.num_classes} classes; batch {config.batch_size}, seed {config.seed}",
      f"Devices: {len(devices)} x {devices[0].platform}",
      RULE,
  ]
  return "\n".join(lines)


def _start_line(config: Config) -> str:
  """``Start: random initialization``, or which checkpoint ``--pretrained`` reads."""
  if config.pretrained is None:
    return "Start: random initialization"
  line = f"Start: weights of --pretrained={checkpoint.describe_pretrained(config.pretrained)}"
  return line + (", step sizes initialized the LSQ way" if config.quantized else "")


def _freeze_banner(config: Config) -> str:
  parts = [name for name, on in (("weights", config.freeze_alpha_w),
                                 ("activations", config.freeze_alpha_a)) if on]
  title = (f"FREEZING ALPHA ({' and '.join(parts)})" if parts else
           "BR PHASE: alphas keep learning (not frozen)")
  return f"\n{RULE}\n{title}\n{RULE}\n"


def format_epoch_line(m: dict, epochs: int) -> str:
  """``Epoch 31/100 [BR] (LR=0.004987): Train Acc=92.34%, Test Acc=90.45%, BR_W=..., BR_A=...``"""
  line = (f"Epoch {m['epoch']}/{epochs} [{m['phase']}] (LR={m['lr']:.6f}): "
          f"Train Acc={m['train_acc']:.2f}%, Test Acc={m['test_acc']:.2f}%")
  if m["phase"] == BR:
    fmt = lambda v: "off" if v is None else f"{v:.6f}"
    line += f", BR_W={fmt(m['br_w'])}, BR_A={fmt(m['br_a'])}"
  return line


def evaluate(eval_fn: Callable, variables: dict, ds: input_pipeline.Dataset,
             batch_size: int, topology: Topology,
             check: Callable[[], None] = lambda: None) -> dict:
  """Quantized test accuracy (%), mean loss and image count over the whole test split.

  ``variables`` is ``{"params", "batch_stats"}``; ``eval_fn`` is ``jit_eval_step``'s.
  ``check()`` runs after every batch (it may raise to stop).
  """
  sums = []
  for batch in device_batches(input_pipeline.eval_batches(ds, batch_size), topology):
    sums.append(eval_fn(variables, batch))
    check()
  total = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
  return {"test_acc": 100.0 * total["correct"] / total["count"],
          "test_loss": total["loss"] / total["count"], "test_count": int(total["count"])}


def evaluate_run(workdir: str, *, prefer: str = "best", data_dir: str | None = None,
                 batch_size: int | None = None, devices=None) -> dict:
  """Evaluates a run's checkpoint on its test split, as the run itself evaluated it.

  The model, bit widths and test split come from the checkpoint's config; the input
  normalization from its meta (the run's own statistics), so the result reproduces the
  ``test_acc`` the run logged for that epoch (up to float summation order).

  Args:
    workdir: the ``--workdir`` of a ``scripts/train.py`` run.
    prefer: ``"best"`` or ``"latest"`` checkpoint (see ``checkpoint.restore_pretrained``).
    data_dir: the run's images, if not at the run's ``--data_dir`` any more.
    batch_size: evaluation batch (default: the run's; any value gives the same accuracy).
    devices: the devices to shard the batch over (default: all).

  Returns:
    ``{"test_acc", "test_loss", "test_count", "epoch", "logged_test_acc"}``; the last is
    the run's logged ``test_acc`` of that epoch (None if its metrics.jsonl lacks it).

  Raises:
    CheckpointError: no readable checkpoint, or a meta not written by ``train_and_evaluate``.
    ValueError: the data's classes differ from the run's.
    FileNotFoundError: no data at ``data_dir``.
  """
  variables, meta = checkpoint.restore_pretrained(workdir, prefer)
  config = meta.get("config")
  needed = ("model", "bits_w", "bits_a", "batch_size", "test_examples")
  if not isinstance(config, dict) or any(k not in config for k in needed):
    raise checkpoint.CheckpointError(f"the checkpoint meta in {workdir} has no config with "
                                     f"{', '.join(needed)}: it was not written by brjax.train")
  ds = input_pipeline.load_dataset(config.get("dataset", "cifar10"),
                                   data_dir or config.get("data_dir"), train_examples=1,
                                   test_examples=config["test_examples"])
  data = meta.get("data")
  if data:
    if list(data["class_names"]) != list(ds.class_names):
      raise ValueError(f"the classes of {data_dir or config.get('data_dir')} "
                       f"({list(ds.class_names)}) differ from the run's "
                       f"({data['class_names']}): pass the run's data")
    ds = dataclasses.replace(ds, mean=np.asarray(data["mean"], np.float32),
                             std=np.asarray(data["std"], np.float32))
  model = models.from_run_config(config, ds.num_classes)
  topology = Topology.create(devices)
  batch_size = batch_size or config["batch_size"]
  batch_size = max(batch_size - batch_size % topology.mesh.size, topology.mesh.size)
  result = evaluate(jit_eval_step(topology, model.apply),
                    jax.device_put(variables, topology.replicated), ds, batch_size, topology)
  result["epoch"] = meta.get("epoch")
  logged = [m for m in _read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if m.get("epoch") == result["epoch"]]
  result["logged_test_acc"] = logged[-1].get("test_acc") if logged else None
  return result


def _read_metrics(path: str) -> list[dict]:
  """The JSON lines of a metrics.jsonl ([] if there is none; unparsable lines skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return out


def _truncate_metrics(path: str, last_epoch: int) -> None:
  """Drops metric lines past ``last_epoch`` (written by a run killed before its save)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["epoch"] <= last_epoch]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped a run between two steps: the epoch in progress was dropped, the
  checkpoints of the finished epochs are kept, and ``resume=True`` continues the run.

  Attributes:
    workdir: the run's workdir.
    saved_epoch: the epoch of the latest checkpoint (None if no epoch finished).
  """

  def __init__(self, workdir: str, saved_epoch: int | None):
    super().__init__(f"interrupted after epoch {saved_epoch or 0}")
    self.workdir, self.saved_epoch = workdir, saved_epoch


class _StopRequested(Exception):
  """Raised at a safe point after a Ctrl-C (see ``_StopOnSigint``)."""


class _StopOnSigint:
  """Within it, Ctrl-C (SIGINT) asks the loop to stop at its next safe point: ``check()``,
  called between steps and between evaluation batches, then raises ``_StopRequested``; a
  checkpoint being saved is finished first. A second Ctrl-C interrupts at once.

  It only takes over Python's default SIGINT handling, in the main thread; elsewhere (a
  thread, a custom or ignored SIGINT) it does nothing and Ctrl-C behaves as before.
  """

  def __init__(self):
    self.requested = False
    self._installed = False

  def __enter__(self) -> "_StopOnSigint":
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      signal.signal(signal.SIGINT, self._request)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def _request(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

  def check(self) -> None:
    if self.requested:
      raise _StopRequested()


def format_duration(seconds: float) -> str:
  """``"45s"``, ``"12m05s"``, ``"10h02m"``."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


@dataclasses.dataclass
class _RunClock:
  """Estimates how long the rest of the run takes from measured step and evaluation times."""
  epochs: int
  steps_per_epoch: int
  eval_s: float = 0.0  # the last evaluation's time (0 before the first)

  def seconds_left(self, epoch: int, steps_done: int, step_s: float) -> float:
    """Time left after ``steps_done`` steps of ``epoch``, at ``step_s`` seconds a step."""
    epoch_s = self.steps_per_epoch * step_s + self.eval_s
    return ((self.steps_per_epoch - steps_done) * step_s + self.eval_s
            + (self.epochs - epoch) * epoch_s)


def _train_epoch(step_fn: Callable, state: TrainState, ds: input_pipeline.Dataset,
                 config: Config, epoch: int, topology: Topology, steps_per_epoch: int,
                 clock: _RunClock, check: Callable[[], None] = lambda: None,
                 compiles: bool = False) -> tuple[TrainState, dict]:
  """One epoch of training steps; returns the state and the epoch's mean metrics.

  The per-step metrics stay on the device until the epoch ends. Step 1 (which compiles
  the step on its first use: ``compiles`` says so on the terminal) runs before the progress
  bar starts, so that the bar's rate is that of ordinary steps; after that the loop waits
  for step ``i - 1`` once step ``i`` is dispatched (one step in flight, no idle device), so
  the bar counts computed steps, not dispatched ones. Its postfix is the time left in the
  whole run. ``check()`` runs after every step (``_StopOnSigint.check``).
  """
  desc = f"Epoch {epoch}/{config.epochs}"
  batches = iter(device_batches(
      input_pipeline.train_batches(ds, config.batch_size, seed=config.seed, epoch=epoch),
      topology))
  with tqdm.tqdm(desc=f"{desc}: compiling the step", bar_format="{desc} ({elapsed})",
                 leave=False, file=sys.stderr, disable=not compiles):
    state, first = step_fn(state, next(batches))
    jax.block_until_ready(first)
  check()
  sums, step_times, last = [first], [], time.perf_counter()
  with tqdm.tqdm(total=steps_per_epoch, initial=1, desc=desc, leave=False, file=sys.stderr,
                 mininterval=2.0, unit="step") as bar:
    for batch in batches:
      state, step_metrics = step_fn(state, batch)
      if len(sums) > 1:  # wait for the previous step (step 1 is done)
        jax.block_until_ready(sums[-1])
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
      sums.append(step_metrics)
      if step_times:
        left = clock.seconds_left(epoch, len(sums), statistics.median(step_times[-50:]))
        bar.set_postfix_str(f"run: {format_duration(left)} left", refresh=False)
      bar.update()
      check()
  total = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
  count = total["count"]
  return state, {"train_acc": 100.0 * total["correct"] / count,
                 "train_loss": total["loss"] / count, "ce": total["ce"] / count,
                 "br_w": total["br_w"] / count, "br_a": total["br_a"] / count,
                 "step_time_s": statistics.median(step_times) if step_times else None}


def _check_workdir(config: Config, workdir: str, resume: bool,
                   log: Callable[[str], None]) -> tuple[int | None, dict]:
  """Looks at the workdir before any work (creating nothing): ``(latest epoch, its meta)``.

  Raises:
    CheckpointError: checkpoints there without ``resume`` (a finished run has nothing to
      continue; an unfinished one needs ``resume``), or ``resume`` of an incompatible run.
  """
  epoch, meta = checkpoint.peek_latest(workdir)
  if epoch is None:
    if resume:
      log(f"--resume: {workdir} holds no checkpoint (no epoch of a run there finished): "
          "starting from epoch 1")
    return None, {}
  if resume:
    checkpoint.check_compatible(meta.get("config", {}), config,
                                os.path.join(workdir, "checkpoints", "latest", str(epoch)))
  else:
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
  return epoch, meta


def train_and_evaluate(config: Config, workdir: str, *, resume: bool = False,
                       devices=None, log: Callable[[str], None] = print,
                       tensorboard: bool = False, histogram_every: int = 5) -> dict:
  """Runs (or resumes) a whole training run; returns the last epoch's metrics.

  Writes ``<workdir>/metrics.jsonl`` (one JSON object per epoch, with per-layer
  quantization metrics under ``"quant"`` and the reference's layer averages under
  ``"br_summary"``) and the checkpoints of ``brjax.checkpoint``;
  with ``tensorboard``, event files under ``<workdir>/tensorboard`` (histograms every
  ``histogram_every`` epochs and at the last). Nothing is written before the data are
  loaded. Without ``resume``, a workdir that already holds checkpoints is an error (nothing
  is overwritten); with it, a finished run returns its last metrics at once, and a workdir
  without checkpoints starts from epoch 1 (both say so).

  Raises:
    Interrupted: Ctrl-C (SIGINT, in the main thread) stopped the run between two steps;
      the checkpoints of the finished epochs are kept.
  """
  # With several processes (multi-host), process 0 alone logs and writes metrics;
  # orbax coordinates the checkpoint writes of all processes itself.
  is_chief = jax.process_index() == 0
  if not is_chief:
    log = lambda _: None
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  saved_epoch, meta = _check_workdir(config, workdir, resume, log)
  if saved_epoch is not None and saved_epoch >= config.epochs:
    history = _read_metrics(metrics_path)
    log(f"{workdir} has finished all {config.epochs} epochs (best test acc "
        f"{meta.get('best_test_acc', 0.0):.2f}%): nothing to resume. Evaluate it with "
        f"scripts/evaluate.py --workdir={workdir}")
    return history[-1] if history else {}

  ds = input_pipeline.load_dataset(config.dataset, config.data_dir, config.train_examples,
                                   config.test_examples)
  ds = recipes.normalize_dataset(ds, config.normalization)
  steps_per_epoch = input_pipeline.num_train_steps(ds, config.batch_size)
  if steps_per_epoch < 1:
    raise ValueError(f"--batch_size={config.batch_size} is not accepted: the training set "
                     f"has only {len(ds.train_labels)} images")
  topology = Topology.create(devices)
  if config.batch_size % topology.mesh.size:
    raise ValueError(f"--batch_size={config.batch_size} is not accepted: use a multiple of "
                     f"the {topology.mesh.size} devices")
  model = create_model(config, ds.num_classes)

  start_epoch, best_acc = 0, 0.0
  frozen_br = optim.frozen_labels(config)
  state = create_train_state(config, model, ds, steps_per_epoch)
  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpoint.RunCheckpoints(workdir)
  if saved_epoch is not None:
    state, meta = ckpts.restore_latest(state, config)
    start_epoch, best_acc = meta["epoch"], meta["best_test_acc"]
    if is_chief:
      _truncate_metrics(metrics_path, start_epoch)
    log(f"Resumed from {workdir} at epoch {start_epoch} (best test acc {best_acc:.2f}%)")
  elif is_chief and os.path.exists(metrics_path):
    os.remove(metrics_path)  # metrics of a run that never saved a checkpoint
  state = jax.device_put(state, topology.replicated)
  probe = next(input_pipeline.eval_batches(ds, config.batch_size))
  abr_sites, abr_line = None, None
  if br_settings(config, BR).lambda_a > 0:
    every = activation_sites(model, {"params": state.params, "batch_stats": state.batch_stats},
                             jnp.asarray(probe["image"]))
    abr_sites = select_abr_sites(config, every)
    abr_line = (f"all {len(every)}" if abr_sites is None else
                f"{len(abr_sites)} of {len(every)}: {', '.join(abr_sites)}")

  log(_banner(config, topology, ds, abr_line))
  eval_fn = jit_eval_step(topology, model.apply)
  # Per-layer quantization metrics, every epoch, on the first test batch.
  quant_fn = jax.jit(functools.partial(metrics.quant_metrics, model))
  writer = summary.create_writer(workdir) if tensorboard and is_chief else None
  step_fns = {}
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  clock = _RunClock(config.epochs, steps_per_epoch)
  last = {}
  try:
    with _StopOnSigint() as stop:
      for epoch in range(start_epoch + 1, config.epochs + 1):
        phase = phase_of(config, epoch)
        if phase == BR and phase not in step_fns:
          if epoch == config.warmup_epochs + 1:
            log(_freeze_banner(config))
          state = state.replace(tx=optim.create_optimizer(config, steps_per_epoch, frozen_br))
        compiles = phase not in step_fns
        step_fn = step_fns.setdefault(
            phase, jit_train_step(topology, br_settings(config, phase, abr_sites)))

        start = time.time()
        lr = float(schedule(int(state.step)))
        state, m = _train_epoch(step_fn, state, ds, config, epoch, topology, steps_per_epoch,
                                clock, stop.check, compiles)
        m.update(epoch=epoch, phase=phase, step=int(state.step), lr=lr)
        settings = br_settings(config, phase)
        if settings.lambda_w == 0:
          m["br_w"] = None  # not computed (not zero)
        if settings.lambda_a == 0:
          m["br_a"] = None
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        eval_start = time.time()
        m.update(evaluate(eval_fn, variables, ds, config.batch_size, topology, stop.check))
        clock.eval_s = time.time() - eval_start
        if config.quantized:
          m["quant"] = metrics.to_python(quant_fn(variables, probe))
          m["br_summary"] = metrics.reference_summary(m["quant"])  # the reference's averages
        is_best = m["test_acc"] > best_acc
        best_acc = max(best_acc, m["test_acc"])
        m["best_test_acc"] = best_acc
        m["epoch_time_s"] = time.time() - start
        if is_chief:
          with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        ckpts.save(epoch, jax.device_get(state),
                   {"epoch": epoch, "phase": phase, "best_test_acc": best_acc,
                    "config": dataclasses.asdict(config),
                    "data": {"mean": ds.mean.tolist(), "std": ds.std.tolist(),
                             "class_names": list(ds.class_names)}}, is_best=is_best)
        if writer is not None:
          summary.write_scalars(writer, epoch, m, state.params)
          if epoch % histogram_every == 0 or epoch == config.epochs:
            summary.write_histograms(writer, epoch, state.params,
                                     metrics.recorded_sites(model, variables, probe["image"]))
          writer.flush()
        log(format_epoch_line(m, config.epochs) + _time_note(m, clock))
        last = m
        if epoch < config.epochs:
          stop.check()
  except _StopRequested:
    raise Interrupted(workdir, ckpts.latest_epoch()) from None
  except KeyboardInterrupt:  # a second Ctrl-C, maybe within a save: drop what it left
    ckpts.remove_unfinished()
    raise
  finally:
    ckpts.close()
    if writer is not None:
      writer.close()
  if last:
    log(f"Best Test Acc={best_acc:.2f}%; checkpoints in {os.path.join(workdir, 'checkpoints')}")
  return last


def _time_note(m: dict, clock: _RunClock) -> str:
  """`` (took 5m58s; run: about 9h47m left)`` after an epoch line."""
  note = f" (took {format_duration(m['epoch_time_s'])}"
  if m["epoch"] < clock.epochs and m.get("step_time_s"):
    left = clock.seconds_left(m["epoch"], clock.steps_per_epoch, m["step_time_s"])
    note += f"; run: about {format_duration(left)} left"
  return note + ")"
