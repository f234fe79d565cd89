"""Data parallelism: the device mesh, the jitted steps, and the batches on the devices.

The batch is sharded over a 1-D mesh of all devices (axis ``"data"``), the state is
replicated, and BatchNorm statistics are over the global batch because the steps
(``brjax.training.steps``) are written on global arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import functools

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from brjax.data import input_pipeline, streaming
from brjax.training.steps import BRSettings, eval_step, train_step


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
  def create(cls, devices=None) -> Topology:
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


def device_batches(batches: Iterable[dict], topology: Topology, *,
                   local: bool = False) -> Iterator[dict]:
  """Host batches as global arrays sharded over the batch axis, prepared in a background
  thread (``input_pipeline.prefetch``): what the train and eval steps consume.

  ``batches`` hold whole global batches (``input_pipeline``; each process takes its rows),
  or with ``local`` this process's rows only (``streaming``: each host reads its shard).
  """
  arrays = (streaming.global_batches(batches, topology.batch) if local else
            process_local_batches(batches, topology.batch))
  return input_pipeline.prefetch(arrays, sharding=topology.batch)


def _from_process_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  rows = {index[0].indices(x.shape[0])[:2]
          for index in sharding.addressable_devices_indices_map(x.shape).values()}
  lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
  if sum(stop - start for start, stop in rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(rows)} of the batch, "
                     "not one block: list the devices process by process")
  return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)
