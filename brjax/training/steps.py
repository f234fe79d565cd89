"""The training state, the phases, and the two step functions (train and eval).

Phase 1 (``WARMUP``, ``warmup_epochs``): cross-entropy only; LSQ learns the grids.
Phase 2 (``BR``): ``CE + r * (lambda_w * BR_W + lambda_a * BR_A)``; at the switch the
weight and/or activation step sizes may be frozen (``optax.set_to_zero`` on their labels).
``r`` is 1 (``--br_schedule=constant``) or a half-cosine ramp from 0 to 1 over the first
``--br_ramp_epochs`` BR epochs (``cosine``, :func:`br_weight`).
A float run (32-bit weights and activations) is one plain phase (``FLOAT``).

The steps are written on global arrays and are not jitted here: ``brjax.training.parallel``
jits them over a device mesh, once per phase (train) and once per run (eval).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import re
from typing import Any

import flax
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from brjax.quant import lsq as quant
from brjax.quant import regularizer, sites
from brjax.training.config import Config

WARMUP, BR, FLOAT = "WARMUP", "BR", "FLOAT"


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from Flax), plus BatchNorm statistics, an rng and
  the model's ``quant_state`` (the input signs it decided from data at init,
  ``brjax.quant.lsq.STATE``; empty for a model whose rules fix every sign): never trained,
  passed to every ``apply``, saved and restored with the rest."""
  batch_stats: Any = None
  rng: jax.Array = None
  quant_state: Any = struct.field(default_factory=dict)

  def variables(self, params: Any = None) -> dict:
    """What ``apply`` takes: ``params`` (default: the state's), ``batch_stats`` and, when
    the model has one, ``quant_state``."""
    params = self.params if params is None else params
    signs = {quant.STATE: self.quant_state} if self.quant_state else {}
    return {"params": params, "batch_stats": self.batch_stats, **signs}


@struct.dataclass
class BRSettings:
  """What the loss adds to cross-entropy: static, so each setting compiles its own step."""
  lambda_w: float = struct.field(pytree_node=False, default=0.0)
  lambda_a: float = struct.field(pytree_node=False, default=0.0)
  alpha_grad_a: bool = struct.field(pytree_node=False, default=False)
  alpha_grad_w: str = struct.field(pytree_node=False, default="full")
  abr_layers: str | None = struct.field(pytree_node=False, default=None)
  abr_clipped: str = struct.field(pytree_node=False, default="include")
  ramp_start: int = struct.field(pytree_node=False, default=0)
  ramp_steps: int = struct.field(pytree_node=False, default=0)


def br_weight(br: BRSettings, step: jax.Array) -> jax.Array:
  """``r``, the BR terms' weight at optimizer step ``step`` (0-based, as ``state.step``).

  ``ramp_steps == 0`` (constant): 1. Else ``(1 - cos(pi * min((k + 1) / R, 1))) / 2`` for
  the ``k``-th BR step ``k = step - ramp_start`` and ``R = ramp_steps``: above 0 from the
  first BR step, 1 from step ``R - 1`` on.
  """
  if br.ramp_steps == 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip((jnp.asarray(step) - br.ramp_start + 1) / br.ramp_steps, 0.0, 1.0)
  return ((1.0 - jnp.cos(jnp.pi * t)) / 2.0).astype(jnp.float32)


def phase_of(config: Config, epoch: int) -> str:
  """The phase of a 1-based epoch."""
  if not config.quantized:
    return FLOAT
  return WARMUP if epoch <= config.warmup_epochs else BR


def br_settings(config: Config, phase: str, abr_sites: Sequence[str] | None = None,
                steps_per_epoch: int | None = None) -> BRSettings:
  """The loss terms of a phase: none outside BR; a zero lambda drops its term entirely.

  ``abr_sites``: the activation sites A-BR sums over (see :func:`select_abr_sites`);
  None means every site. ``steps_per_epoch``: needed for ``--br_schedule=cosine``'s ramp
  (:func:`br_weight`), which starts at the first BR step; without it the weight is
  constant (what timing a step needs).
  """
  if phase != BR:
    return BRSettings()
  pattern = None
  if abr_sites is not None:
    pattern = "^(?:" + "|".join(re.escape(s) for s in abr_sites) + ")$"
  lambda_w, lambda_a = config.br_lambdas  # a float side has no BR term
  return BRSettings(
      lambda_w=lambda_w, lambda_a=lambda_a,
      alpha_grad_a=config.br_alpha_grad_a, alpha_grad_w=config.br_alpha_grad_w,
      abr_layers=pattern, abr_clipped=config.abr_clipped,
      **_ramp(config, steps_per_epoch))


def _ramp(config: Config, steps_per_epoch: int | None) -> dict:
  if config.br_schedule == "constant" or steps_per_epoch is None:
    return {}
  return {"ramp_start": config.warmup_epochs * steps_per_epoch,
          "ramp_steps": config.br_ramp_epochs * steps_per_epoch}


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


def loss_terms(state: TrainState, params: Any, batch: dict,
               br: BRSettings) -> tuple[dict[str, jax.Array], jax.Array, Any]:
  """The training loss's terms at ``params``: ``({"ce", "br_w", "br_a"}, logits, new
  batch_stats)``, each term a scalar mean (a zero lambda's term is a constant 0, not
  computed); the loss is ``ce + br.lambda_w * br_w + br.lambda_a * br_a``.

  ``batch`` and ``br`` as :func:`train_step`'s; BatchNorm in train mode (batch statistics).
  """
  # Quantization sites are recorded only when BR reads them: otherwise no BR work at all.
  with_br = br.lambda_w > 0 or br.lambda_a > 0
  mutable = ["batch_stats"] + ([sites.COLLECTION] if with_br else [])
  logits, updates = state.apply_fn(state.variables(params), batch["image"], train=True,
                                   mutable=mutable)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  zero = jnp.zeros((), ce.dtype)
  recorded = updates.get(sites.COLLECTION, {})
  br_w = (regularizer.weight_br(recorded, alpha_grad=br.alpha_grad_w) if br.lambda_w > 0
          else zero)
  br_a = (regularizer.activation_br(recorded, alpha_grad=br.alpha_grad_a,
                                    layers=br.abr_layers, clipped=br.abr_clipped)
          if br.lambda_a > 0 else zero)
  return {"ce": ce, "br_w": br_w, "br_a": br_a}, logits, updates["batch_stats"]


def train_step(state: TrainState, batch: dict, br: BRSettings) -> tuple[TrainState, dict]:
  """One optimizer step on ``CE + r * (br.lambda_w * BR_W + br.lambda_a * BR_A)``
  (``r``: :func:`br_weight`, 1 unless the BR weight ramps).

  Args:
    state: the replicated training state.
    batch: ``{"image": float (B, H, W, C), "label": int32 (B,)}``, sharded on the batch.
    br: the BR terms (static).

  Returns:
    The new state and per-step sums: ``loss``, ``ce``, ``br_w``, ``br_a`` (each times B, so
    that epoch sums divided by ``count`` are means), ``correct`` and ``count``.
  """
  r = br_weight(br, state.step)

  def loss_fn(params):
    terms, logits, batch_stats = loss_terms(state, params, batch, br)
    if br.ramp_steps == 0:  # the constant weight: the reference's loss, as it sums it
      loss = terms["ce"] + br.lambda_w * terms["br_w"] + br.lambda_a * terms["br_a"]
    else:
      r_ = r.astype(terms["ce"].dtype)
      loss = terms["ce"] + r_ * (br.lambda_w * terms["br_w"] + br.lambda_a * terms["br_a"])
    return loss, (logits, batch_stats, terms["ce"], terms["br_w"], terms["br_a"])

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

  ``variables`` is ``TrainState.variables()`` (not the TrainState, whose optimizer
  changes at the phase switch: the eval step compiles once for the whole run).
  ``batch`` is ``{"image", "label", "mask": bool (B,)}``; padded examples don't count.
  """
  logits = apply_fn(variables, batch["image"], train=False)
  mask = batch["mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return {"loss": jnp.sum(jnp.where(mask, ce, 0.0)),
          "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & mask),
          "count": jnp.sum(mask.astype(jnp.int32))}
