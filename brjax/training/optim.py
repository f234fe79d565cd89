"""Optimizer, learning-rate schedule, and step-size labels for freezing.

The optimizer and schedule are the run's recipe (``brjax.training.recipes``, resolved into the
Config): SGD with momentum or Adam, with coupled weight decay (``g + wd * w``, as PyTorch's
``weight_decay``). The step sizes are an optimizer group of their own: the same optimizer
at ``alpha_lr_scale`` times the learning rate, with their own weight decay
(``alpha_weight_decay``: by default ``weight_decay`` with ``decay_alphas``, the reference
recipe's, else 0).

Every parameter gets one of three labels: ``alpha_w`` (a weight step size: an ``alpha``
or ``log_alpha`` beside a ``kernel``), ``alpha_a`` (any other step size: an activation's),
or ``weights`` (everything else). ``optax.multi_transform`` gives each label the optimizer;
a frozen label's updates are then zeroed by ``optax.set_to_zero`` (after the weight decay
and the optimizer: a frozen step size moves by exactly 0). Unfrozen labels end in
``optax.identity`` instead, so the optimizer state has the same structure in both training
phases and carries across the switch (and through checkpoints) unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from brjax.quant import partitioning, step_size
from brjax.training.config import Config

WEIGHTS, ALPHA_W, ALPHA_A = "weights", "alpha_w", "alpha_a"
LABELS = (WEIGHTS, ALPHA_W, ALPHA_A)


def param_labels(params: Any) -> Any:
  """A tree like ``params`` whose leaves are ``"weights"``, ``"alpha_w"`` or ``"alpha_a"``.

  ``params`` is any pytree of parameters: a Linen ``params`` dict or FrozenDict, or an NNX
  ``nnx.State`` (of ``nnx.Variable``s, as ``nnx.Optimizer`` passes to ``tx.init``, or of
  arrays, as it passes to ``tx.update``); an ``nnx.Variable`` is one parameter. A weight
  step size is an ``alpha`` beside a ``kernel`` (or an operation's ``<name>_alpha`` beside
  ``<name>``); any other step size (``alpha``, ``input_alpha``, ``input_alpha_<k>``) is an
  activation step size (``brjax.quant.step_size.is_weight_alpha_path``). A boxed parameter
  (``nn.with_partitioning``) is one parameter, labelled by its name like an unboxed one.
  """
  is_param = lambda x: isinstance(x, nnx.Variable) or partitioning.is_boxed(x)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_param)
  paths = [tuple(_key_name(k) for k in path) for path, _ in leaves]
  names = set(paths)

  def label(path):
    if not step_size.is_alpha_path(path):
      return WEIGHTS
    return ALPHA_W if step_size.is_weight_alpha_path(path, names) else ALPHA_A

  return jax.tree_util.tree_unflatten(treedef, [label(p) for p in paths])


def _key_name(key: Any) -> Any:
  """The name or index of one pytree key (``DictKey``, ``GetAttrKey``, ``SequenceKey``)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate of each optimizer step (0-based), by ``config.schedule``.

  With ``lr = config.lr``, ``E = config.epochs``, ``e = step // steps_per_epoch`` the
  0-based epoch and ``W`` the warmup epochs (0 for a float run):

  * ``cosine``: per step, ``lr * (1 + cos(pi * step / (E * steps_per_epoch))) / 2``;
  * ``constant_cosine`` (the reference's QAT): per epoch, ``lr`` for ``e < W``, then
    ``lr * (1 + cos(pi * k / T)) / 2`` with ``k = e - W``, ``T = E - W`` (PyTorch's
    ``CosineAnnealingLR(T_max=T)`` stepped after each BR epoch);
  * ``step`` (the reference's baseline): per epoch, ``lr * 0.1^j`` with ``j`` the number of
    milestones ``int(0.5 E), int(0.75 E)`` that are ``<= e`` (``MultiStepLR``).

  ``schedule(state.step)`` at the start of an epoch is the rate the whole epoch uses for
  the per-epoch schedules.
  """
  lr, epochs = config.lr, config.epochs
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
  if config.schedule == "constant_cosine":
    warmup = config.warmup_epochs if config.quantized else 0
    total = max(epochs - warmup, 1)

    def constant_cosine(step):
      k = jnp.maximum(step // steps_per_epoch - warmup, 0)
      return lr * (1.0 + jnp.cos(math.pi * k / total)) / 2.0

    return constant_cosine
  if config.schedule == "step":
    milestones = (int(epochs * 0.5), int(epochs * 0.75))

    def step_decay(step):
      epoch = jnp.asarray(step) // steps_per_epoch
      return lr * 0.1**sum((epoch >= m).astype(jnp.int32) for m in milestones)

    return step_decay
  raise ValueError(f"--schedule={config.schedule} is not accepted: use one of cosine, "
                   "constant_cosine, step")


def frozen_labels(config: Config) -> frozenset[str]:
  """The labels that ``--freeze_alpha*`` freezes in the BR phase."""
  return frozenset(label for label, frozen in
                   ((ALPHA_W, config.freeze_alpha_w), (ALPHA_A, config.freeze_alpha_a))
                   if frozen)


def decay_rate(config: Config, label: str) -> float:
  """The coupled weight decay on parameters of ``label``: ``config.weight_decay`` for the
  weights, ``config.alpha_weight_decay`` for the step sizes (``weight_decay`` with
  ``decay_alphas``, the reference recipe's, unless set). ``create_optimizer`` adds
  ``rate * param`` to each gradient (to ``theta = log(alpha)`` for ``log`` step sizes)."""
  return config.weight_decay if label == WEIGHTS else config.alpha_weight_decay


def create_optimizer(config: Config, steps_per_epoch: int,
                     frozen: Iterable[str] = ()) -> optax.GradientTransformation:
  """The recipe's optimizer (SGD with momentum, or Adam) with its schedule and weight decay.

  ``chain(add_decayed_weights, sgd | adam, identity | set_to_zero)`` per label. The step
  sizes' chain has its own weight decay (:func:`decay_rate`; brjax's recipe: 0, which
  otherwise pulls every quantization grid towards zero) and its optimizer runs at
  ``config.alpha_lr_scale`` times the schedule. Adam is PyTorch's (``b1=0.9, b2=0.999``,
  ``eps`` added to ``sqrt(v_hat)``).

  Args:
    config: the run's configuration (optimizer, lr, momentum, weight_decay,
      alpha_weight_decay, alpha_lr_scale, adam_eps, schedule, epochs).
    steps_per_epoch: optimizer steps in one epoch.
    frozen: labels whose updates are zeroed (``optax.set_to_zero``).
  """
  frozen = frozenset(frozen)
  unknown = frozen - set(LABELS)
  if unknown:
    raise ValueError(f"unknown labels {sorted(unknown)}: use {LABELS}")
  schedule = learning_rate_schedule(config, steps_per_epoch)

  def optimizer(lr):
    if config.optimizer == "adam":
      return optax.adam(lr, b1=0.9, b2=0.999, eps=config.adam_eps)
    return optax.sgd(lr, momentum=config.momentum)

  scale = config.alpha_lr_scale
  opts = {WEIGHTS: optimizer(schedule)}
  opts[ALPHA_W] = opts[ALPHA_A] = (opts[WEIGHTS] if scale == 1.0 else
                                   optimizer(lambda step: schedule(step) * scale))

  def transform(label):
    decay = optax.add_decayed_weights(decay_rate(config, label))
    last = optax.set_to_zero() if label in frozen else optax.identity()
    return optax.chain(decay, opts[label], last)

  return optax.multi_transform({label: transform(label) for label in LABELS}, param_labels)
