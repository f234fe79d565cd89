"""How well tensors sit on their quantization grids: pure, jittable per-layer metrics.

For a tensor ``v`` with scalar step size ``alpha`` on the integer range ``[qn, qp]``, each
element has the bin ``m = round(clip(v / alpha, qn, qp))`` and the level ``q(v) = m * alpha``
(the forward of ``quant.lsq_quantize``, with its step-size floor). :func:`layer_metrics`
gives

* ``mse = mean((v - q(v))^2)``: the quantization error;
* ``near_frac = mean(|v - q(v)| <= 0.1 * alpha)``: the fraction of elements within a tenth
  of a step of their level (clipped elements far beyond the range are not near);
* ``occupancy[k - qn] = mean(m == k)`` for ``k = qn..qp``: the fraction per level;
* ``alpha``: the step size itself.

All in one pass over the tensor: one bin-count histogram (a segment sum), O(N) whatever
the bit width. :func:`reference_br_metrics` adds the reference package's BR metrics
(``effectiveness``, ``pct_near`` within 1% of alpha, ``mean_distance``, ``bins_used`` and
per-bin count, mean and std) and :func:`reference_summary` its layer averages. The
collectors :func:`weight_metrics` and :func:`activation_metrics` apply both
to every quantized kernel and every activation sown by ``quant.QuantReLU``;
:func:`quant_metrics` runs a model on one batch and returns both, and :func:`to_python`
makes the result JSON-serializable (for ``metrics.jsonl``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brjax import quant

NEAR_TOLERANCE = 0.1
"""An element is "near" its level when ``|v - q(v)| <= NEAR_TOLERANCE * alpha``."""

LayerMetrics = dict[str, jax.Array]


def layer_metrics(v: jax.Array, alpha: jax.Array, qn: int, qp: int, *,
                  where: jax.Array | None = None) -> LayerMetrics:
  """Quantization metrics of one tensor with one (scalar) step size.

  Computed in float32 (float64 for float64 input); for bfloat16 activations the model's
  quantizer rounds in bfloat16, so a few elements on a rounding tie may land in the
  neighbouring bin here. With ``where``, only the selected
  elements count (e.g. the real examples of a padded batch); if none is selected, the
  fractions and ``mse`` are NaN.

  Args:
    v: float array of any shape, ``N > 0`` elements (weights, or pre-quantization
      activations).
    alpha: the step size: a scalar (shape ``()`` or any shape of size 1). Per-channel
      step sizes are not supported.
    qn, qp: the integer range, Python ints with ``qn < qp`` (see ``quant.qrange``).
    where: optional bool array broadcastable to ``v``: the elements to count.

  Returns:
    ``{"alpha": (), "mse": (), "near_frac": (), "occupancy": (qp - qn + 1,)}``, float
    arrays; ``occupancy`` sums to 1, entry ``i`` is level ``qn + i``.

  Raises:
    ValueError: on an empty ``v``, a non-scalar ``alpha`` or a bad range.
  """
  _check_range(qn, qp)
  if np.size(alpha) != 1:
    raise ValueError(f"alpha of shape {np.shape(alpha)} is not supported: layer_metrics takes "
                     "one scalar step size per tensor")
  if np.size(v) == 0:
    raise ValueError(f"v of shape {np.shape(v)} is empty: use a tensor with at least one element")
  dtype = jnp.promote_types(jnp.result_type(v), jnp.float32)
  v = jnp.asarray(v, dtype)
  alpha = jnp.asarray(alpha, dtype).reshape(())
  step = quant.safe_alpha(alpha)
  bins = jnp.round(jnp.clip(v / step, qn, qp))
  err = v - bins * step  # v - q(v), q as in lsq_quantize's forward
  weight = (jnp.ones(v.shape, dtype) if where is None else
            jnp.broadcast_to(jnp.asarray(where), v.shape).astype(dtype))
  count = jnp.sum(weight)
  near = (jnp.abs(err) <= NEAR_TOLERANCE * step).astype(dtype)
  per_level = jax.ops.segment_sum(weight.reshape(-1), (bins - qn).astype(jnp.int32).reshape(-1),
                                  num_segments=qp - qn + 1)
  return {"alpha": alpha,
          "mse": jnp.sum(weight * err**2) / count,
          "near_frac": jnp.sum(weight * near) / count,
          "occupancy": per_level / count}


def weight_metrics(params: Any, bits: int) -> dict[str, LayerMetrics]:
  """:func:`layer_metrics` of every quantized kernel, on the signed ``bits``-bit range.

  A quantized kernel is a ``kernel`` parameter with an ``alpha`` beside it (as
  ``quant.QuantConv`` and ``quant.QuantDense`` create).

  Args:
    params: a Flax ``params`` tree.
    bits: the weight bit width (2..8).

  Returns:
    ``{layer: metrics}`` keyed by the '/'-joined module path, e.g.
    ``"BasicBlock_0/QuantConv_0"``; empty when no kernel is quantized.
  """
  qn, qp = quant.qrange(bits, signed=True)
  flat = _flatten(params)
  return {"/".join(p[:-1]): _with_reference(flat[p[:-1] + ("kernel",)], alpha, qn, qp)
          for p, alpha in flat.items()
          if quant.is_alpha_path(p) and p[:-1] + ("kernel",) in flat}


def activation_metrics(intermediates: Any, bits: int, *,
                       mask: jax.Array | None = None) -> dict[str, LayerMetrics]:
  """:func:`layer_metrics` of every activation sown by ``quant.QuantReLU`` (unsigned range).

  Reads the ``pre_quant`` tuples and their ``alpha`` tuples of the ``intermediates``
  collection (one entry per call of the layer).

  Args:
    intermediates: the ``intermediates`` collection from ``model.apply(...,
      mutable=["intermediates"])``.
    bits: the activation bit width (2..8).
    mask: optional bool ``(B,)``: the real examples along axis 0 (the batch) of every
      activation; padded examples don't count.

  Returns:
    ``{layer: metrics}`` keyed by the '/'-joined module path (``"act_init"``,
    ``"BasicBlock_0/QuantReLU_0"``, ...); a layer called ``k > 1`` times gives the entries
    ``"<path>#0"`` .. ``"<path>#<k-1>"``. Empty when nothing was sown.

  Raises:
    ValueError: if a ``pre_quant`` has no ``alpha`` beside it, or ``mask`` does not match
      the batch.
  """
  qn, qp = quant.qrange(bits, signed=False)
  flat = _flatten(intermediates)
  out = {}
  for path, values in flat.items():
    if path[-1] != "pre_quant":
      continue
    name = "/".join(path[:-1])
    alphas = flat.get(path[:-1] + ("alpha",))
    if alphas is None or len(alphas) != len(values):
      raise ValueError(f"intermediates at {name!r} hold {len(values)} pre_quant but "
                       f"{0 if alphas is None else len(alphas)} alpha: expected the pairs "
                       "that quant.QuantReLU sows")
    for i, (v, alpha) in enumerate(zip(values, alphas)):
      where = None if mask is None else _batch_mask(mask, v, name)
      out[name if len(values) == 1 else f"{name}#{i}"] = _with_reference(v, alpha, qn, qp,
                                                                         where=where)
  return out


def collect_metrics(params: Any, intermediates: Any, *, bits_w: int, bits_a: int,
                    mask: jax.Array | None = None) -> dict[str, dict[str, LayerMetrics]]:
  """``{"weights": weight_metrics(params), "activations": activation_metrics(...)}``.

  A float bit width (32) leaves that part empty.
  """
  quant.check_layer_bits(bits_w)
  quant.check_layer_bits(bits_a)
  float_bits = quant.FLOAT_BITS
  return {"weights": {} if bits_w == float_bits else weight_metrics(params, bits_w),
          "activations": ({} if bits_a == float_bits else
                          activation_metrics(intermediates, bits_a, mask=mask))}


def sown_activations(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> Any:
  """The ``intermediates`` that ``quant.QuantReLU`` layers sow on ``images`` (eval mode).

  Runs ``model.apply(variables, images, train=False, mutable=["intermediates"])``; an
  ``intermediates`` collection already in ``variables`` is dropped first, so each layer
  call gives exactly one entry.

  Args:
    model: a Flax module built from ``brjax.quant`` layers whose ``__call__`` takes
      ``train`` (as ``brjax.models.CifarResNet``).
    variables: ``{"params": ..., "batch_stats": ...}``.
    images: float ``(B, H, W, C)``, normalized as in training.

  Returns:
    The ``intermediates`` tree (``{}`` when nothing is quantized).
  """
  kept = {k: v for k, v in variables.items() if k != "intermediates"}
  _, state = model.apply(kept, images, train=False, mutable=["intermediates"])
  return state.get("intermediates", {})


def quant_metrics(model: nn.Module, variables: Mapping[str, Any], batch: Any, *,
                  bits_w: int, bits_a: int,
                  mask: jax.Array | None = None) -> dict[str, dict[str, LayerMetrics]]:
  """Weight and activation metrics of a model on one batch: pure and jittable.

  Weight metrics come from ``variables["params"]``; activation metrics from one eval-mode
  forward pass (:func:`sown_activations`), skipped when ``bits_a == 32``.

  Args:
    model: the Flax module (close over it, with the bit widths, when jitting).
    variables: ``{"params": ..., "batch_stats": ...}``.
    batch: float images ``(B, H, W, C)``, or a dict with ``"image"`` and optionally
      ``"mask"`` (bool ``(B,)``), as ``input_pipeline.eval_batches`` yields.
    bits_w, bits_a: the model's bit widths (2..8, or 32 = float: that part is empty).
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
  quant.check_layer_bits(bits_a)
  intermediates = ({} if bits_a == quant.FLOAT_BITS else
                   sown_activations(model, variables, images))
  return collect_metrics(variables["params"], intermediates, bits_w=bits_w, bits_a=bits_a,
                         mask=mask)


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


def _batch_mask(mask: jax.Array, v: jax.Array, name: str) -> jax.Array:
  """``mask`` (B,) reshaped to broadcast along axis 0 of ``v``."""
  if np.shape(mask) != np.shape(v)[:1]:
    raise ValueError(f"mask of shape {np.shape(mask)} does not fit the activation {name!r} of "
                     f"shape {np.shape(v)}: use a bool mask of shape (batch,)")
  return jnp.reshape(mask, (-1,) + (1,) * (np.ndim(v) - 1))


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(tree) if tree else {}


# ------------------------------------------------- the reference package's BR metrics

REFERENCE_NEAR_TOLERANCE = 0.01
"""The reference's "at a level": ``|v - q(v)| < 0.01 * alpha`` (strict)."""

REFERENCE_SUMMARY_KEYS = ("mse", "mean_distance", "effectiveness", "pct_near")


def reference_br_metrics(v: jax.Array, alpha: jax.Array, qn: int, qp: int, *,
                         where: jax.Array | None = None) -> LayerMetrics:
  """The reference package's BR metrics of one tensor (its ``BinRegularizer`` logging).

  With ``m = round(clip(v / alpha, qn, qp))``, ``q(v) = m * alpha`` and ``d = |v - q(v)|``:

  * ``mean_distance = mean(d)``;
  * ``effectiveness = clip(100 * (1 - mean_distance / (alpha / 2 + 1e-12)), 0, 100)``: 100
    when every value sits on its level, 0 when the mean distance is half a step (uniform
    spread);
  * ``pct_near = 100 * mean(d < 0.01 * alpha)``: percent of values "at" a level;
  * ``bins_used``: the number of non-empty bins;
  * per bin ``k = qn..qp`` (entry ``k - qn``): ``bin_count``, ``bin_mean`` (0 for an empty
    bin) and ``bin_std`` (the unbiased standard deviation, as ``torch.std``; 0 for fewer
    than 2 values).

  The range is the quantizer's own (``quant.qrange``): for 1-bit weights ``(-1, 1)``,
  where the reference's regularizer bins them on ``(-1, 0)``. O(N): segment sums.

  Args:
    v: float array, ``N > 0`` elements.
    alpha: the scalar step size.
    qn, qp: the integer range, Python ints.
    where: optional bool array broadcastable to ``v``: the elements to count.

  Returns:
    Scalars ``mean_distance``, ``effectiveness``, ``pct_near``, ``bins_used`` (float) and
    ``(qp - qn + 1,)`` arrays ``bin_count``, ``bin_mean``, ``bin_std``.
  """
  _check_range(qn, qp)
  if np.size(alpha) != 1:
    raise ValueError(f"alpha of shape {np.shape(alpha)} is not supported: one scalar step "
                     "size per tensor")
  if np.size(v) == 0:
    raise ValueError(f"v of shape {np.shape(v)} is empty: use a tensor with at least one element")
  dtype = jnp.promote_types(jnp.result_type(v), jnp.float32)
  shape = np.shape(v)
  v = jnp.asarray(v, dtype).reshape(-1)
  step = quant.safe_alpha(jnp.asarray(alpha, dtype).reshape(()))
  weight = (jnp.ones(v.shape, dtype) if where is None else
            jnp.broadcast_to(jnp.asarray(where), shape).astype(dtype).reshape(-1))
  bins = jnp.round(jnp.clip(v / step, qn, qp))
  dist = jnp.abs(v - bins * step)
  count = jnp.sum(weight)
  mean_distance = jnp.sum(weight * dist) / count
  segment = (bins - qn).astype(jnp.int32)
  levels = qp - qn + 1
  n = jax.ops.segment_sum(weight, segment, levels)
  bin_mean = jax.ops.segment_sum(weight * v, segment, levels) / jnp.maximum(n, 1)
  sq = jax.ops.segment_sum(weight * (v - bin_mean[segment])**2, segment, levels)
  bin_std = jnp.where(n > 1, jnp.sqrt(sq / jnp.maximum(n - 1, 1)), 0.0)
  return {
      "mean_distance": mean_distance,
      "effectiveness": jnp.clip(100.0 * (1.0 - mean_distance / (0.5 * step + 1e-12)), 0, 100),
      "pct_near": 100.0 * jnp.sum(weight * (dist < REFERENCE_NEAR_TOLERANCE * step)) / count,
      "bins_used": jnp.sum(n > 0).astype(dtype),
      "bin_count": n, "bin_mean": bin_mean, "bin_std": bin_std,
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


def _with_reference(v, alpha, qn, qp, *, where=None) -> LayerMetrics:
  """:func:`layer_metrics` and :func:`reference_br_metrics` of one tensor, in one dict."""
  return {**layer_metrics(v, alpha, qn, qp, where=where),
          **reference_br_metrics(v, alpha, qn, qp, where=where)}
