"""How well tensors sit on their quantization grids: pure, jittable per-layer metrics.

For a tensor ``v`` with step size ``alpha`` on the integer range ``[qn, qp]``, each
element has the bin ``m = round(clip(v / alpha, qn, qp))`` and the level ``q(v) = m * alpha``
(the forward of ``quant.lsq_quantize``, with its step-size floor). :func:`layer_metrics`
gives

* ``mse = mean((v - q(v))^2)``: the quantization error;
* ``near_frac = mean(|v - q(v)| <= 0.1 * alpha)``: the fraction of elements within a tenth
  of a step of their level (clipped elements far beyond the range are not near);
* ``occupancy[k - qn] = mean(m == k)`` for ``k = qn..qp``: the fraction per level;
* ``alpha``: the step size itself.

All in one pass over the tensor: one bin-count histogram (a segment sum), O(N) whatever
the bit width. The collectors :func:`weight_metrics` and :func:`activation_metrics` apply it
to every quantization site a forward pass recorded (see ``brjax.sites``), each on its own
range;
:func:`quant_metrics` runs a model on one batch and returns both, and :func:`to_python`
makes the result JSON-serializable (for ``metrics.jsonl``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brjax import quant
from brjax import sites

NEAR_TOLERANCE = 0.1
"""An element is "near" its level when ``|v - q(v)| <= NEAR_TOLERANCE * alpha``."""

LayerMetrics = dict[str, jax.Array]


def layer_metrics(v: jax.Array, alpha: jax.Array, qn: int, qp: int, *,
                  where: jax.Array | None = None) -> LayerMetrics:
  """Quantization metrics of one tensor.

  Computed in float32 (float64 for float64 input); for bfloat16 activations the model's
  quantizer rounds in bfloat16, so a few elements on a rounding tie may land in the
  neighbouring bin here. With ``where``, only the selected
  elements count (e.g. the real examples of a padded batch); if none is selected, the
  fractions and ``mse`` are NaN.

  Args:
    v: float array of any shape, ``N > 0`` elements (weights, or pre-quantization
      activations).
    alpha: the step size: a scalar, or an array broadcastable to ``v`` (one per channel:
      each element is measured on its channel's grid; ``"alpha"`` reports their mean).
    qn, qp: the integer range, Python ints with ``qn < qp`` (see ``quant.qrange``).
    where: optional bool array broadcastable to ``v``: the elements to count.

  Returns:
    ``{"alpha": (), "mse": (), "near_frac": (), "occupancy": (qp - qn + 1,)}``, float
    arrays; ``occupancy`` sums to 1, entry ``i`` is level ``qn + i`` (all channels pooled).

  Raises:
    ValueError: on an empty ``v``, a step size that does not broadcast, or a bad range.
  """
  _check_range(qn, qp)
  if np.size(alpha) != 1:
    try:
      np.broadcast_shapes(np.shape(alpha), np.shape(v))
    except ValueError:
      raise ValueError(f"alpha of shape {np.shape(alpha)} does not broadcast to v of shape "
                       f"{np.shape(v)}: use a scalar or one step size per channel") from None
  return _metrics(v, alpha, qn, qp - qn + 1, where)


def _metrics(v, alpha, qn, levels: int, where) -> LayerMetrics:
  if np.size(v) == 0:
    raise ValueError(f"v of shape {np.shape(v)} is empty: use a tensor with at least one element")
  dtype = jnp.promote_types(jnp.result_type(v), jnp.float32)
  v = jnp.asarray(v, dtype)
  alpha = jnp.asarray(alpha, dtype)
  qn = jnp.asarray(qn, dtype)
  step = quant.safe_alpha(alpha)
  bins = jnp.round(jnp.clip(v / step, qn, qn + (levels - 1)))
  err = v - bins * step  # v - q(v), q as in lsq_quantize's forward
  weight = (jnp.ones(v.shape, dtype) if where is None else
            jnp.broadcast_to(jnp.asarray(where), v.shape).astype(dtype))
  count = jnp.sum(weight)
  near = (jnp.abs(err) <= NEAR_TOLERANCE * step).astype(dtype)
  level_index = jnp.broadcast_to(bins - qn, v.shape).astype(jnp.int32).reshape(-1)
  per_level = jax.ops.segment_sum(weight.reshape(-1), level_index, num_segments=levels)
  return {"alpha": jnp.mean(alpha),
          "mse": jnp.sum(weight * err**2) / count,
          "near_frac": jnp.sum(weight * near) / count,
          "occupancy": per_level / count}


def site_metrics(site: sites.Site, *, where: jax.Array | None = None) -> LayerMetrics:
  """:func:`layer_metrics` of one quantization site, on its own range and grid(s)."""
  values, alpha, qn = sites.grouped(site)
  return _metrics(values, alpha, qn, site.levels, where)


def weight_metrics(collection: Any) -> dict[str, LayerMetrics]:
  """:func:`site_metrics` of every quantized kernel (the ``"weight"`` sites).

  Args:
    collection: the ``"quant"`` collection of one ``model.apply(..., mutable=["quant"])``.

  Returns:
    ``{layer: metrics}`` keyed by the '/'-joined module path, e.g.
    ``"BasicBlock_0/QuantConv_0"``; empty when no kernel is quantized.
  """
  return {name: site_metrics(site)
          for name, site in sites.named(collection, (sites.WEIGHT,)).items()}


def activation_metrics(collection: Any, *,
                       mask: jax.Array | None = None) -> dict[str, LayerMetrics]:
  """:func:`site_metrics` of every quantized activation (``"input"`` and ``"output"`` sites).

  Args:
    collection: the ``"quant"`` collection of one ``model.apply(..., mutable=["quant"])``.
    mask: optional bool ``(B,)``: the real examples along the batch axis of every
      activation (axis 0, after any stack axes); padded examples don't count.

  Returns:
    ``{name: metrics}`` under the names of ``sites.named``: the module path of a
    ``QuantReLU`` (``"act_init"``, ``"BasicBlock_0/QuantReLU_0"``), ``"<path>:input"`` of a
    layer's quantized input, ``"#i"`` appended per call of a site called several times.
    Empty when nothing was recorded.

  Raises:
    ValueError: if ``mask`` does not match the batch.
  """
  return {name: site_metrics(site, where=None if mask is None else _batch_mask(mask, site, name))
          for name, site in sites.named(collection, (sites.INPUT, sites.OUTPUT)).items()}


def collect_metrics(collection: Any, *,
                    mask: jax.Array | None = None) -> dict[str, dict[str, LayerMetrics]]:
  """``{"weights": weight_metrics(...), "activations": activation_metrics(...)}``."""
  return {"weights": weight_metrics(collection),
          "activations": activation_metrics(collection, mask=mask)}


def recorded_sites(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> Any:
  """The ``"quant"`` collection that a model's quantizers record on ``images`` (eval mode).

  Runs ``model.apply(variables, images, train=False, mutable=["quant"])``; a ``"quant"``
  collection already in ``variables`` is dropped first, so each call gives one record.

  Args:
    model: a Flax module quantized by brjax whose ``__call__`` takes ``train`` (as
      ``brjax.models.CifarResNet``).
    variables: ``{"params": ..., "batch_stats": ...}``.
    images: float ``(B, H, W, C)``, normalized as in training.

  Returns:
    The ``"quant"`` collection (``{}`` when nothing is quantized).
  """
  kept = {k: v for k, v in variables.items() if k != sites.COLLECTION}
  _, state = model.apply(kept, images, train=False, mutable=[sites.COLLECTION])
  return state.get(sites.COLLECTION, {})


def quant_metrics(model: nn.Module, variables: Mapping[str, Any], batch: Any, *,
                  mask: jax.Array | None = None) -> dict[str, dict[str, LayerMetrics]]:
  """Weight and activation metrics of a model on one batch: pure and jittable.

  One eval-mode forward pass (:func:`recorded_sites`); every site is measured on its own
  range (mixed precision, signed inputs and per-channel step sizes included).

  Args:
    model: the Flax module (close over it when jitting).
    variables: ``{"params": ..., "batch_stats": ...}``.
    batch: float images ``(B, H, W, C)``, or a dict with ``"image"`` and optionally
      ``"mask"`` (bool ``(B,)``), as ``input_pipeline.eval_batches`` yields.
    mask: bool ``(B,)``, the real examples, when ``batch`` is an array.

  Returns:
    ``{"weights": {layer: metrics}, "activations": {layer: metrics}}`` with the metrics of
    :func:`layer_metrics`.
  """
  if isinstance(batch, Mapping):
    if mask is not None:
      raise ValueError("mask was given twice: pass it in the batch dict or as mask=, not both")
    images, mask = batch["image"], batch.get("mask")
  else:
    images = batch
  return collect_metrics(recorded_sites(model, variables, images), mask=mask)


def to_python(tree: Any) -> Any:
  """A JSON-serializable copy of a metrics tree: dicts, lists, floats, ints and bools.

  Scalars become Python numbers and arrays (nested) lists; dict keys become strings.
  Non-finite floats stay ``nan``/``inf`` (``json.dumps`` writes them as ``NaN``/``Infinity``).
  """
  if isinstance(tree, Mapping):
    return {str(k): to_python(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_python(v) for v in tree]
  if isinstance(tree, (str, bool, int, float)) or tree is None:
    return tree
  return np.asarray(jax.device_get(tree)).tolist()


def _check_range(qn: int, qp: int) -> None:
  ok = all(isinstance(q, (int, np.integer)) and not isinstance(q, bool) for q in (qn, qp))
  if not ok or not qn < qp:
    raise ValueError(f"qn={qn!r}, qp={qp!r} is not an integer range: use Python ints with "
                     "qn < qp (see quant.qrange)")


def _batch_mask(mask: jax.Array, site: sites.Site, name: str) -> jax.Array:
  """``mask`` (B,) reshaped to broadcast along the batch axis of a site's values."""
  shape = np.shape(site.values)
  lead = len(shape) - site.ndim
  if np.shape(mask) != shape[lead:lead + 1]:
    raise ValueError(f"mask of shape {np.shape(mask)} does not fit the activation {name!r} of "
                     f"shape {shape}: use a bool mask of shape (batch,)")
  return jnp.reshape(mask, (1,) * lead + (-1,) + (1,) * (site.ndim - 1))
