"""How well tensors sit on their quantization grids: pure, jittable per-layer metrics.

For a tensor ``v`` with step size ``alpha`` on the integer range ``[qn, qp]``, each
element has the bin ``m = round(clip(v / alpha, qn, qp))`` and the level ``q(v) = m * alpha``
(the forward of ``quant.lsq_quantize``, with its step-size floor). :func:`layer_metrics`
gives

* ``mse = mean((v - q(v))^2)``: the quantization error;
* ``near_frac = mean(|v - q(v)| <= 0.1 * alpha)``: the fraction of elements within a tenth
  of a step of their level (clipped elements far beyond the range are not near);
* ``occupancy[k - qn] = mean(m == k)`` for ``k = qn..qp``: the fraction per level;
* ``clipped_top = mean(v / alpha > qp + 1/2)``: the fraction clipped at the top level
  (beyond its bin; A-BR's ``clipped`` values);
* ``alpha``: the step size itself.

All in one pass over the tensor: one bin-count histogram (a segment sum), O(N) whatever
the bit width. :func:`reference_br_metrics` adds the reference package's BR metrics
(``effectiveness``, ``pct_near`` within 1% of alpha, ``mean_distance``, ``bins_used`` and
per-bin count, mean and std) and :func:`reference_summary` its layer averages. The collectors
:func:`weight_metrics` and :func:`activation_metrics` apply it
to every quantization site a forward pass recorded (see ``brjax.quant.sites``), each on its own
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

from brjax.quant import bits, sites
from brjax.quant import lsq as quant

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
    ``{"alpha": (), "mse": (), "near_frac": (), "clipped_top": (),
    "occupancy": (qp - qn + 1,)}``, float arrays; ``occupancy`` sums to 1, entry ``i``
    is level ``qn + i`` (all channels pooled).

  Raises:
    ValueError: on an empty ``v``, a step size that does not broadcast, or a bad range.
  """
  bits.check_grid(qn, qp, np.shape(alpha), np.shape(v))
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
  clipped = (v / step > qn + (levels - 1) + 0.5).astype(dtype)
  return {"alpha": jnp.mean(alpha),
          "mse": jnp.sum(weight * err**2) / count,
          "near_frac": jnp.sum(weight * near) / count,
          "clipped_top": jnp.sum(weight * clipped) / count,
          "occupancy": per_level / count}


def site_metrics(site: sites.Site, *, where: jax.Array | None = None) -> LayerMetrics:
  """:func:`layer_metrics` and :func:`reference_br_metrics` of one quantization site, on
  its own range and grid(s)."""
  values, alpha, qn = sites.grouped(site)
  return {**_metrics(values, alpha, qn, site.levels, where),
          **_reference_metrics(values, alpha, qn, site.levels, where)}


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
      ``brjax.models.cifar.CifarResNet``).
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
    :func:`layer_metrics` and :func:`reference_br_metrics`.
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


_check_range = bits.check_range  # the quantizer's and BR's check too


def _batch_mask(mask: jax.Array, site: sites.Site, name: str) -> jax.Array:
  """``mask`` (B,) reshaped to broadcast along the batch axis of a site's values."""
  shape = np.shape(site.values)
  lead = len(shape) - site.ndim
  if np.shape(mask) != shape[lead:lead + 1]:
    raise ValueError(f"mask of shape {np.shape(mask)} does not fit the activation {name!r} of "
                     f"shape {shape}: use a bool mask of shape (batch,)")
  return jnp.reshape(mask, (1,) * lead + (-1,) + (1,) * (site.ndim - 1))


# ------------------------------------------------- the reference package's BR metrics

REFERENCE_NEAR_TOLERANCE = 0.01
"""The reference's "at a level": ``|v - q(v)| < 0.01 * alpha`` (strict)."""

REFERENCE_SUMMARY_KEYS = ("mse", "mean_distance", "effectiveness", "pct_near")


def reference_br_metrics(v: jax.Array, alpha: jax.Array, qn: int, qp: int, *,
                         where: jax.Array | None = None) -> LayerMetrics:
  """The reference package's BR metrics of one tensor (its ``BinRegularizer`` logging).

  With ``m = round(clip(v / alpha, qn, qp))``, ``q(v) = m * alpha`` and ``d = |v - q(v)|``:

  * ``mean_distance = mean(d)``;
  * ``effectiveness = clip(100 * (1 - mean(d / (alpha / 2 + 1e-12))), 0, 100)``: 100 when
    every value sits on its level, 0 when the mean distance is half a step (uniform
    spread); for a scalar alpha, the reference's ``mean_distance / (alpha / 2 + 1e-12)``;
  * ``pct_near = 100 * mean(d < 0.01 * alpha)``: percent of values "at" a level;
  * ``bins_used``: the number of non-empty bins;
  * per bin ``k = qn..qp`` (entry ``k - qn``): ``bin_count``, ``bin_mean`` (0 for an empty
    bin) and ``bin_std`` (the unbiased standard deviation, as ``torch.std``; 0 for fewer
    than 2 values); with one step size per channel, the channels' bins of one level pool.

  The range is the quantizer's own (``quant.qrange``): for 1-bit weights ``(-1, 1)``,
  where the reference's regularizer bins them on ``(-1, 0)``. O(N): segment sums.

  Args:
    v: float array, ``N > 0`` elements.
    alpha: the step size, a scalar or broadcastable to ``v``.
    qn, qp: the integer range, Python ints.
    where: optional bool array broadcastable to ``v``: the elements to count.

  Returns:
    Scalars ``mean_distance``, ``effectiveness``, ``pct_near``, ``bins_used`` (float) and
    ``(qp - qn + 1,)`` arrays ``bin_count``, ``bin_mean``, ``bin_std``.
  """
  _check_range(qn, qp)
  if np.size(v) == 0:
    raise ValueError(f"v of shape {np.shape(v)} is empty: use a tensor with at least one element")
  return _reference_metrics(v, alpha, qn, qp - qn + 1, where)


def _reference_metrics(v, alpha, qn, levels: int, where) -> LayerMetrics:
  dtype = jnp.promote_types(jnp.result_type(v), jnp.float32)
  v = jnp.asarray(v, dtype)
  step = jnp.broadcast_to(quant.safe_alpha(jnp.asarray(alpha, dtype)), v.shape)
  qn = jnp.asarray(qn, dtype)
  bins = jnp.round(jnp.clip(v / step, qn, qn + (levels - 1)))
  dist = jnp.abs(v - bins * step)
  weight = (jnp.ones(v.shape, dtype) if where is None else
            jnp.broadcast_to(jnp.asarray(where), v.shape).astype(dtype))
  count = jnp.sum(weight)
  segment = jnp.broadcast_to(bins - qn, v.shape).astype(jnp.int32).reshape(-1)
  w, flat = weight.reshape(-1), v.reshape(-1)
  n = jax.ops.segment_sum(w, segment, levels)
  bin_mean = jax.ops.segment_sum(w * flat, segment, levels) / jnp.maximum(n, 1)
  sq = jax.ops.segment_sum(w * (flat - bin_mean[segment])**2, segment, levels)
  relative = jnp.sum(weight * dist / (0.5 * step + 1e-12)) / count
  return {
      "mean_distance": jnp.sum(weight * dist) / count,
      "effectiveness": jnp.clip(100.0 * (1.0 - relative), 0, 100),
      "pct_near": 100.0 * jnp.sum(weight * (dist < REFERENCE_NEAR_TOLERANCE * step)) / count,
      "bins_used": jnp.sum(n > 0).astype(dtype),
      "bin_count": n, "bin_mean": bin_mean,
      "bin_std": jnp.where(n > 1, jnp.sqrt(sq / jnp.maximum(n - 1, 1)), 0.0),
  }


def reference_summary(quant_metrics_tree: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """The reference's model-level BR metrics: layer averages of ``mse`` (its
  ``avg_quantization_mse``), ``mean_distance``, ``effectiveness`` and ``pct_near``, per kind.

  Args:
    quant_metrics_tree: ``{"weights": {layer: metrics}, "activations": {...}}`` as
      :func:`quant_metrics` returns it (or its :func:`to_python` copy).

  Returns:
    ``{"weights": {key: float}, "activations": {key: float}}``; a kind without layers is
    left out.
  """
  out = {}
  for kind in ("weights", "activations"):
    layers = [m for m in quant_metrics_tree.get(kind, {}).values()
              if all(k in m for k in REFERENCE_SUMMARY_KEYS)]
    if layers:
      out[kind] = {k: float(np.mean([float(np.asarray(m[k])) for m in layers]))
                   for k in REFERENCE_SUMMARY_KEYS}
  return out
