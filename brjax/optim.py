"""Optimizer, learning-rate schedule, and step-size labels for freezing.

Every parameter gets one of three labels: ``alpha_w`` (a weight step size: an ``alpha``
beside a ``kernel``), ``alpha_a`` (any other ``alpha``: an activation step size), or
``weights`` (everything else). ``optax.multi_transform`` gives each label SGD with momentum;
a frozen label's updates are then zeroed by ``optax.set_to_zero``. Unfrozen labels end in
``optax.identity`` instead, so the optimizer state has the same structure in both training
phases and carries across the switch (and through checkpoints) unchanged.
"""

from __future__ import annotations

from typing import Any, Iterable

from flax import nnx
import jax
import optax

from brjax.config import Config
from brjax.quant import STEP_SIZE_NAMES

WEIGHTS, ALPHA_W, ALPHA_A = "weights", "alpha_w", "alpha_a"
LABELS = (WEIGHTS, ALPHA_W, ALPHA_A)


def param_labels(params: Any) -> Any:
  """A tree like ``params`` whose leaves are ``"weights"``, ``"alpha_w"`` or ``"alpha_a"``.

  ``params`` is any pytree of parameters: a Linen ``params`` dict or FrozenDict, or an NNX
  ``nnx.State`` (of ``nnx.Variable``s, as ``nnx.Optimizer`` passes to ``tx.init``, or of
  arrays, as it passes to ``tx.update``); an ``nnx.Variable`` is one parameter. A weight
  step size is an ``alpha`` beside a ``kernel``; any other step size (``alpha``,
  ``input_alpha``) is an activation step size.
  """
  is_param = lambda x: isinstance(x, nnx.Variable)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_param)
  paths = [tuple(_key_name(k) for k in path) for path, _ in leaves]
  names = set(paths)

  def label(path):
    if not path or path[-1] not in STEP_SIZE_NAMES:
      return WEIGHTS
    return ALPHA_W if path[-1] == "alpha" and path[:-1] + ("kernel",) in names else ALPHA_A

  return jax.tree_util.tree_unflatten(treedef, [label(p) for p in paths])


def _key_name(key: Any) -> Any:
  """The name or index of one pytree key (``DictKey``, ``GetAttrKey``, ``SequenceKey``)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """Cosine decay from ``config.lr`` to 0 over the whole run (both phases), per step."""
  return optax.cosine_decay_schedule(config.lr, config.epochs * steps_per_epoch)


def frozen_labels(config: Config) -> frozenset[str]:
  """The labels that ``--freeze_alpha*`` freezes in the BR phase."""
  return frozenset(label for label, frozen in
                   ((ALPHA_W, config.freeze_alpha_w), (ALPHA_A, config.freeze_alpha_a))
                   if frozen)


def create_optimizer(config: Config, steps_per_epoch: int,
                     frozen: Iterable[str] = ()) -> optax.GradientTransformation:
  """SGD with momentum and a cosine schedule; weight decay on weights only.

  Step sizes get no weight decay: it would pull every quantization grid towards zero.

  Args:
    config: the run's configuration (lr, momentum, weight_decay, epochs).
    steps_per_epoch: optimizer steps in one epoch.
    frozen: labels whose updates are zeroed (``optax.set_to_zero``).
  """
  frozen = frozenset(frozen)
  unknown = frozen - set(LABELS)
  if unknown:
    raise ValueError(f"unknown labels {sorted(unknown)}: use {LABELS}")
  schedule = learning_rate_schedule(config, steps_per_epoch)
  sgd = optax.sgd(schedule, momentum=config.momentum)

  def transform(label):
    decay = optax.add_decayed_weights(config.weight_decay if label == WEIGHTS else 0.0)
    last = optax.set_to_zero() if label in frozen else optax.identity()
    return optax.chain(decay, sgd, last)

  return optax.multi_transform({label: transform(label) for label in LABELS}, param_labels)
