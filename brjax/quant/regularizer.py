"""Bin Regularization (Han et al., ICCV 2021) and its collectors over Flax variable trees.

For a tensor ``v`` quantized with step size ``alpha`` on the integer range ``[qn, qp]``,
each element falls in the bin ``m = round(clip(v / alpha, qn, qp))`` whose target level is
``m * alpha``. The loss of the tensor is the sum over non-empty bins of

    (mean(v in bin) - m * alpha)^2 + var(v in bin)        (population variance)

Because ``(mean - level)^2 + var = mean((v - level)^2)`` within one bin, the loss equals
``sum_i (v_i - m_i * alpha)^2 / N(m_i)`` with ``N(m)`` the number of elements in bin ``m``,
that is ``sum_m S(m) / N(m)`` with ``S(m)`` the sum of ``(v_i - m * alpha)^2`` over bin ``m``:
two segment sums (scatter-adds) over the elements, O(N) whatever the bit width. The
gradient, ``2 (v_i - m_i * alpha) / N(m_i)``, gathers ``1 / N`` once per element.

The collectors read the quantization sites that brjax's quantizers sow into the ``"quant"``
collection (see ``brjax.quant.sites``): each site carries its own step size and integer range,
so every layer is binned on its own grid (mixed precision, signed or unsigned inputs,
per-channel step sizes, layers stacked by ``nn.scan``). A collector that finds nothing to
regularize raises instead of returning a silent zero.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from brjax.quant import bits, sites
from brjax.quant import lsq as quant

# Interleaved partial sums per bin in bin_regularization, and the largest lanes x bins table.
_LANES = 16
_MAX_LANE_TABLE = 4096


_WHERE_SITES = (f"read the sites a quantized call records (Linen: model.apply(..., "
                f"mutable=[{sites.COLLECTION!r}, ...]); NNX: brjax.nnx.record_sites(model, "
                "...))")

CLIPPED = ("include", "exclude")
"""What A-BR does with values clipped above the top level (``v / alpha > qp + 0.5``):
``include`` them in the top bin (the BR paper's and the reference package's binning), or
``exclude`` them from every bin."""


def bin_regularization(v: jax.Array, alpha: jax.Array, qn: int, qp: int, *,
                       alpha_grad: bool = False, clipped: str = "include") -> jax.Array:
  """Bin Regularization loss of one tensor.

  Bin assignment never carries gradient. The gradient reaches ``v`` through the bin means
  and variances, and reaches ``alpha`` through the levels only if ``alpha_grad``.

  With a non-scalar ``alpha`` (one step size per channel), bins are per channel and level:
  each channel's elements are binned on that channel's grid.

  Args:
    v: float array of any shape (weights, or pre-quantization activations).
    alpha: step size, a scalar or an array broadcastable to ``v``.
    qn, qp: the integer range, Python ints (see ``quant.qrange``).
    alpha_grad: whether the loss is differentiable with respect to ``alpha``.
    clipped: one of :data:`CLIPPED`. ``"exclude"`` leaves every element with
      ``v / alpha > qp + 0.5`` (one the quantizer clips down to the top level) out of
      every bin: it adds to no count and no sum, and gets no gradient. A bin left empty
      (say the top bin, when all of its elements lay above the range) adds nothing, as
      any empty bin; with every element excluded the loss is 0. Values clipped below
      ``qn`` (signed inputs) stay in the bottom bin either way.

  Returns:
    A float32 (or float64, for float64 input) scalar: the sum over non-empty bins.
  """
  _check_clipped(clipped)
  _check_bool(alpha_grad, "alpha_grad")
  bits.check_grid(qn, qp, np.shape(alpha), np.shape(v))
  return _binned_loss(v, alpha, qn, qp - qn + 1, alpha_grad, clipped == "exclude")


def _check_clipped(clipped: str, name: str = "clipped") -> None:
  if not isinstance(clipped, str) or clipped not in CLIPPED:
    raise ValueError(f"{name}={clipped!r} is not accepted: use one of {', '.join(CLIPPED)}")


def _check_bool(value: Any, name: str) -> None:
  """Raises ValueError unless ``value`` is a bool (``"yes"`` or ``1`` is not one)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}={value!r} is not accepted: use True or False")


def _check_layers(layers: Any, name: str = "layers") -> None:
  """Raises ValueError unless ``layers`` is None or a regular expression."""
  if layers is None:
    return
  try:
    re.compile(layers)
  except (re.error, TypeError) as e:
    raise ValueError(f"{name}={layers!r} is not accepted: use a regular expression on module "
                     f"paths, or None for every site ({e})") from None


def _binned_loss(v, alpha, qn, levels: int, alpha_grad: bool,
                 exclude_above: bool = False) -> jax.Array:
  """:func:`bin_regularization` on ``levels`` levels from ``qn`` (an int, or an int array
  broadcastable to ``v``: then each of its entries starts the grid of its group);
  ``exclude_above``: leave out the elements above ``qn + levels - 1 + 0.5`` steps."""
  dtype = jnp.promote_types(v.dtype, jnp.float32)
  v = v.astype(dtype)
  alpha = jnp.asarray(alpha, dtype)
  qn = jnp.asarray(qn, dtype)
  if qn.ndim:  # one grid per group of alpha and qn alike
    alpha = jnp.broadcast_to(alpha, jnp.broadcast_shapes(alpha.shape, qn.shape))
  fixed_alpha = jax.lax.stop_gradient(alpha)
  ratio = jax.lax.stop_gradient(v / quant.safe_alpha(fixed_alpha))
  bins = jnp.round(jnp.clip(ratio, qn, qn + (levels - 1)))
  level = bins * (alpha if alpha_grad else fixed_alpha)

  num_bins = alpha.size * levels
  bin_index = (bins - qn).astype(jnp.int32)
  if alpha.size > 1:  # one grid per channel: the bins of group g follow those of g - 1
    groups = jnp.broadcast_to(jnp.arange(alpha.size).reshape(alpha.shape), v.shape)
    bin_index = groups * levels + bin_index
  bin_index = bin_index.reshape(-1)
  # Per-bin sums rather than a gather of N(m_i) per element, which on CPU costs as much as
  # a scatter: ResNet-20 W2A2's BR step went from 1.20 to 1.09 float steps on 2 cores
  # (scripts/benchmark.py). Element i adds into lane i % lanes, the lanes summed at the
  # end: one running float32 sum over 2M elements lost 5e-4 of precision, lanes 6e-6.
  lanes = max(1, min(_LANES, v.size // num_bins, _MAX_LANE_TABLE // num_bins))
  segment = jax.lax.iota(jnp.int32, v.size) % lanes * num_bins + bin_index
  ones, squares = jnp.ones_like(segment), (v - level).reshape(-1)**2
  if exclude_above:  # elements clipped down to the top level count nowhere
    keep = (ratio <= qn + (levels - 1) + 0.5).reshape(-1)
    ones, squares = jnp.where(keep, ones, 0), jnp.where(keep, squares, 0)
  counts = jax.ops.segment_sum(ones, segment, lanes * num_bins)
  sums = jax.ops.segment_sum(squares, segment, lanes * num_bins)
  counts = counts.reshape(lanes, num_bins).sum(0)
  sums = sums.reshape(lanes, num_bins).sum(0)
  return jnp.sum(sums / jnp.maximum(counts, 1).astype(dtype))


ALPHA_GRADS_W = ("full", "lsq", "none")
"""What W-BR's gradient does to the weight step sizes: ``full`` (the BR paper's and the
reference package's: the plain derivative of the loss), ``lsq`` (that derivative times
LSQ's gradient scale ``g = 1 / sqrt(N * qp)``, as the cross-entropy gradient gets; ``N``
the weights one step size quantizes), ``none`` (W-BR leaves the step sizes alone)."""


@jax.custom_vjp
def _scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity forward (bit for bit); the gradient to ``x`` times ``scale``."""
  return x


_scale_gradient.defvjp(lambda x, scale: (x, scale),
                       lambda scale, g: (g * scale, jnp.zeros_like(scale)))


def site_br(site: sites.Site, *, alpha_grad: bool | str, clipped: str = "include") -> jax.Array:
  """BR of one quantization site, on its own range; each stacked layer on its own grid.

  Layers stacked by ``nn.scan`` add up (each is a tensor of its own). A per-channel step
  size bins each channel on its own grid, and the site counts the *mean* of its channels'
  BR: a per-channel kernel then weighs as much in the loss as a per-tensor one. (The sum
  grows with the channel count: with it, MobileNetV2's 960-channel depthwise kernels gave
  a W-BR 2,500 times ResNet-18's, which swamped cross-entropy at lambda 1.)

  ``alpha_grad``: a bool, or one of :data:`ALPHA_GRADS_W` (``"lsq"`` scales the step
  size's gradient by ``1 / sqrt(N * qp)``, ``N = values.size / alpha.size`` per step size).
  ``clipped``: one of :data:`CLIPPED` (see :func:`bin_regularization`).
  """
  if not (isinstance(alpha_grad, (bool, np.bool_)) or alpha_grad in ALPHA_GRADS_W):
    raise ValueError(f"alpha_grad={alpha_grad!r} is not accepted: use True, False or one of "
                     f"{', '.join(ALPHA_GRADS_W)}")
  values, alpha, qn = sites.grouped(site)
  stack_size = math.prod(values.shape[:values.ndim - site.ndim])
  channels = alpha.size // stack_size
  if alpha_grad == "lsq":
    qp = site.levels - 1 + jnp.max(qn)  # weights: a static signed range
    g = quant.grad_scale(values.size // alpha.size, 1) * jax.lax.rsqrt(qp.astype(jnp.float32))
    alpha = _scale_gradient(alpha, g.astype(alpha.dtype))
  loss = _binned_loss(values, alpha, qn, site.levels, alpha_grad in (True, "full", "lsq"),
                      clipped == "exclude")
  return loss / channels if channels > 1 else loss


def weight_br(collection: Any, *, alpha_grad: str = "full") -> jax.Array:
  """W-BR: the sum of :func:`bin_regularization` over every quantized kernel.

  Reads the ``"weight"`` sites of the ``"quant"`` collection (``model.apply(...,
  mutable=["quant", ...])``); signed bins on each kernel's own range; the gradient reaches
  the kernels and, with ``alpha_grad="full"`` (the BR paper's), their step sizes; see
  :data:`ALPHA_GRADS_W` for ``"lsq"`` and ``"none"``.

  Returns:
    A float32 (float64 for float64 kernels) scalar.

  Raises:
    ValueError: if the collection holds no kernel (nothing quantized, or ``"quant"`` was
      not mutable in ``apply``): a silent 0 would train without BR.
  """
  if not isinstance(alpha_grad, str) or alpha_grad not in ALPHA_GRADS_W:
    raise ValueError(f"alpha_grad={alpha_grad!r} is not accepted: use one of "
                     f"{', '.join(ALPHA_GRADS_W)}")
  found = [site_br(s, alpha_grad=alpha_grad)
           for _, _, s in sites.iterate(collection, (sites.WEIGHT,))]
  if not found:
    raise ValueError(f"W-BR found no quantized kernel: {_WHERE_SITES}, and quantize at "
                     "least one layer's weights")
  return sum(found[1:], found[0])


def activation_br(collection: Any, *, alpha_grad: bool = False,
                  layers: str | None = None, clipped: str = "include") -> jax.Array:
  """A-BR: the sum of :func:`bin_regularization` over every quantized activation.

  Reads the ``"input"`` (a layer's quantized input) and ``"output"`` (a ``QuantReLU``'s
  quantized output) sites of the ``"quant"`` collection: one term per call, each on its
  own range (unsigned after a ReLU, signed where the input can be negative).

  Args:
    collection: the ``"quant"`` collection from ``model.apply(..., mutable=["quant"])``.
    alpha_grad: whether A-BR's gradient reaches the activation step sizes (off by
      default: activations change from batch to batch, and letting the levels chase them
      makes a moving target).
    layers: a regular expression; only sites whose module path it matches
      (``re.search``) count. ``None``: every site.
    clipped: one of :data:`CLIPPED`: ``"include"`` (the paper's) counts an activation
      above the top level (``v / alpha > qp + 0.5``, clipped by the quantizer) in the top
      bin, which pulls it down to that level; ``"exclude"`` leaves it out of every bin
      (no count, no sum, no gradient from A-BR), so the top bin's mean and variance are
      those of the values that round to it. A bin left empty adds nothing.

  Returns:
    A float32 (float64 for float64 activations) scalar.

  Raises:
    ValueError: if no activation site was found (or ``layers`` matched none), or
      ``clipped`` is not one of :data:`CLIPPED`.
  """
  _check_clipped(clipped)
  _check_bool(alpha_grad, "alpha_grad")
  _check_layers(layers)
  found = [site_br(s, alpha_grad=bool(alpha_grad), clipped=clipped)
           for path, _, s in sites.iterate(collection, (sites.INPUT, sites.OUTPUT))
           if layers is None or re.search(layers, path)]
  if not found:
    which = "" if layers is None else f" whose path matches {layers!r}"
    raise ValueError(f"A-BR found no quantized activation{which}: {_WHERE_SITES}, and "
                     "quantize at least one activation")
  return sum(found[1:], found[0])


def br_losses(collection: Any, *, alpha_grad_a: bool = False, abr_layers: str | None = None,
              alpha_grad_w: str = "full",
              abr_clipped: str = "include") -> tuple[jax.Array, jax.Array]:
  """Both collectors at once: ``(weight_br(collection), activation_br(collection))``.

  ``collection`` is the ``"quant"`` collection of one ``model.apply(..., mutable=["quant",
  ...])``: every kernel and every activation binned with its own bits and range.
  ``alpha_grad_w``: one of :data:`ALPHA_GRADS_W`; ``alpha_grad_a``: True or False;
  ``abr_layers``: a regular expression or None; ``abr_clipped``: one of :data:`CLIPPED`
  (each checked here, under its own name).
  """
  _check_bool(alpha_grad_a, "alpha_grad_a")
  _check_layers(abr_layers, "abr_layers")
  _check_clipped(abr_clipped, "abr_clipped")
  if not isinstance(alpha_grad_w, str) or alpha_grad_w not in ALPHA_GRADS_W:
    raise ValueError(f"alpha_grad_w={alpha_grad_w!r} is not accepted: use one of "
                     f"{', '.join(ALPHA_GRADS_W)}")
  return (weight_br(collection, alpha_grad=alpha_grad_w),
          activation_br(collection, alpha_grad=alpha_grad_a, layers=abr_layers,
                        clipped=abr_clipped))
