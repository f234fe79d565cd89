"""Batches read by a Grain pipeline: the engine of `brjax.data.streaming`'s iterators.

A plan (rows of example indices, -1 for padding) becomes batches through
``grain.MapDataset.source(plan).map(Example(...)).batch(...)``: each index is read from an
`ImageSource`, decoded, transformed (`brjax.data.imagenet_augment`), optionally normalized, in
``worker_count`` worker processes (0: in this process, with ``read_threads`` threads).
`BatchIterator` holds one integer of position, saved and restored as JSON bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import json
import signal
from typing import TYPE_CHECKING, Any

from absl import flags
import grain
from grain._src.python.ipc import shared_memory_array
import numpy as np

from brjax.data.image_data import normalize, open_image, reason
from brjax.data.image_sources import ImageSource
from brjax.data.imagenet_augment import eval_transform, train_transform

if TYPE_CHECKING:
  from brjax.data.streaming import StreamingDataset

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """Record index -> one example dict; what the Grain map runs (pickled to the workers).

  Train: ``{"image", "label"}``, augmented with ``default_rng([seed, epoch, index])``.
  Eval: ``{"image", "label", "mask"}``; index -1 is padding (image 0, label 0, mask False).
  """
  source: ImageSource
  size: int
  mean: np.ndarray
  std: np.ndarray
  dtype: str
  train: bool
  seed: int = 0
  epoch: int = 0

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if index < 0:
      return {"image": np.zeros((self.size, self.size, 3), self.dtype), "label": np.int32(0),
              "mask": np.bool_(False)}
    data, label, where = self.source[index]
    image = open_image(data, where)
    if self.train:
      rng = np.random.default_rng([self.seed, self.epoch, index])
      pixels = train_transform(image, self.size, rng)
    else:
      pixels = eval_transform(image, self.size)
    if self.dtype == "float32":
      pixels = normalize(pixels, self.mean, self.std)
    out = {"image": pixels, "label": np.int32(label)}
    if not self.train:
      out["mask"] = np.bool_(True)
    return out


class BatchIterator(Iterator[dict]):
  """Batches of a plan (rows of example indices), read by a Grain pipeline.

  The pipeline is ``grain.MapDataset.source(plan).map(example).batch(...)``: random access
  from a batch number to a batch, read ahead by ``read_threads`` threads in each of
  ``worker_count`` processes (``to_iter_dataset``, ``mp_prefetch``). Its position is
  therefore one integer, the next batch (as in ``grain.experimental.ElasticIterator``):
  ``get_state()`` is JSON bytes of it and of what the batches are a function of, and
  ``set_state`` restarts the pipeline there. Read-ahead batches are not part of the
  state, and a state is valid whatever the worker count. Batches from workers are copied
  out of Grain's shared memory (plain arrays, which a device transfer may alias).
  ``close()`` (or the end, or garbage collection) stops the workers; usable as a context
  manager.
  """

  def __init__(self, ds: StreamingDataset, plan: np.ndarray, example: Example,
               identity: dict[str, Any]):
    self._ds, self._plan, self._example, self._identity = ds, plan, example, identity
    self._next = 0
    self._iterator = None

  @property
  def num_batches(self) -> int:
    """Batches in the whole epoch (or eval pass), read or not."""
    return len(self._plan)

  def __len__(self) -> int:
    return len(self._plan) - self._next

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next >= len(self._plan):
      self.close()
      raise StopIteration
    if self._iterator is None:
      self._iterator = iter(pipeline(self._ds, self._plan[self._next:], self._example))
    try:
      batch = next(self._iterator)
    except ValueError as e:  # ours (a bad image): one line, without what Grain appends
      self.close()
      raise ValueError(reason(e)) from e
    except BaseException:
      self.close()
      raise
    self._next += 1
    if self._ds.worker_count:  # out of Grain's shared memory: plain arrays, freed as usual
      batch = {key: np.array(value) for key, value in batch.items()}
    return batch

  def get_state(self, next_batch: int | None = None) -> bytes:
    """JSON bytes: ``{"version", "next_batch", ...identity}``, for a checkpoint.

    ``next_batch`` (default: the batches this iterator has returned) sets the position
    to save, e.g. the steps a training loop has taken when a prefetcher reads ahead.
    """
    step = self._next if next_batch is None else next_batch
    if not 0 <= step <= len(self._plan):
      raise ValueError(f"next_batch={step} is not in [0, {len(self._plan)}]")
    return json.dumps({"version": STATE_VERSION, "next_batch": step, **self._identity}).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    """Continues from a ``get_state()`` of an iterator over the same batches.

    Raises:
      ValueError: not such a state, or one of other batches (another epoch, seed,
        batch size, shard or dataset), in one line naming the difference.
    """
    try:
      saved = json.loads(state) if isinstance(state, (bytes, str)) else dict(state)
      version, step = saved.pop("version"), saved.pop("next_batch")
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"not a brjax.data.streaming iterator state ({reason(e)})") from e
    if version != STATE_VERSION:
      raise ValueError(f"iterator state version {version} is not {STATE_VERSION}")
    diff = [f"{k}={saved.get(k)} (here {v})" for k, v in self._identity.items()
            if saved.get(k) != v]
    if diff:
      raise ValueError(f"the iterator state is of other batches: {', '.join(diff)}")
    if not (isinstance(step, int) and 0 <= step <= len(self._plan)):
      raise ValueError(f"iterator state next_batch={step} is not in [0, {len(self._plan)}]")
    self.close()
    self._next = step

  def close(self) -> None:
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()
      del iterator
      if self._ds.worker_count:
        finish_shared_memory_deletes()

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self.close()


def pipeline(ds: StreamingDataset, plan: np.ndarray, example: Example) -> grain.IterDataset:
  """Grain pipeline of the batches of ``plan`` (rows of example indices)."""
  batches = grain.MapDataset.source(plan.reshape(-1)).map(example).batch(
      plan.shape[1], drop_remainder=True)
  out = batches.to_iter_dataset(grain.ReadOptions(num_threads=ds.read_threads,
                                                  prefetch_buffer_size=max(1, ds.read_threads)))
  if ds.worker_count:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts workers
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=ds.worker_count),
                          worker_init_fn=_ignore_sigint)
  return out


def finish_shared_memory_deletes() -> None:
  """Runs Grain's pending unlinks of shared memory now, before the process may exit.

  Grain unlinks the shared memory of a batch it received from a worker when the batch is
  garbage-collected, on a thread pool: those of batches read ahead and not used (a stop
  mid-epoch, the end of an epoch) are still pending when ``close()`` returns. A process that
  exits then leaves them to Python's resource tracker, which warns "There appear to be N
  leaked shared_memory objects". Closing and joining the pool runs them; the next batches
  from workers start a new pool. (Grain has no public call for this: the attribute is
  checked, and ``tests/data/test_streaming.py`` fails if none of this happens.)
  """
  array_type = shared_memory_array.SharedMemoryArray
  pool = getattr(array_type, "_del_thread_pool", None)
  if pool is not None:
    array_type._del_thread_pool = None  # later deletes run synchronously, in __del__
    pool.close()
    pool.join()


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
  """Workers ignore Ctrl-C (SIGINT reaches the whole process group): the training process
  alone decides to stop, and closing the iterator ends them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
