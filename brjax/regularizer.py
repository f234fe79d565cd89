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
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp

from brjax import quant

# Interleaved partial sums per bin in bin_regularization, and the largest lanes x bins table.
_LANES = 16
_MAX_LANE_TABLE = 4096


def bin_regularization(v: jax.Array, alpha: jax.Array, qn: int, qp: int, *,
                       alpha_grad: bool = False) -> jax.Array:
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

  Returns:
    A float32 (or float64, for float64 input) scalar: the sum over non-empty bins.
  """
  dtype = jnp.promote_types(v.dtype, jnp.float32)
  v = v.astype(dtype)
  alpha = jnp.asarray(alpha, dtype)
  fixed_alpha = jax.lax.stop_gradient(alpha)
  bins = jax.lax.stop_gradient(jnp.round(jnp.clip(v / quant.safe_alpha(fixed_alpha), qn, qp)))
  level = bins * (alpha if alpha_grad else fixed_alpha)

  num_levels = qp - qn + 1
  num_bins = alpha.size * num_levels
  bin_index = (bins - qn).astype(jnp.int32)
  if alpha.size > 1:  # one grid per channel: the bins of group g follow those of g - 1
    groups = jnp.broadcast_to(jnp.arange(alpha.size).reshape(alpha.shape), v.shape)
    bin_index = groups * num_levels + bin_index
  bin_index = bin_index.reshape(-1)
  # Per-bin sums rather than a gather of N(m_i) per element, which on CPU costs as much as
  # a scatter: ResNet-20 W2A2's BR step went from 1.20 to 1.09 float steps on 2 cores
  # (scripts/benchmark.py). Element i adds into lane i % lanes, the lanes summed at the
  # end: one running float32 sum over 2M elements lost 5e-4 of precision, lanes 6e-6.
  lanes = max(1, min(_LANES, v.size // num_bins, _MAX_LANE_TABLE // num_bins))
  segment = jax.lax.iota(jnp.int32, v.size) % lanes * num_bins + bin_index
  counts = jax.ops.segment_sum(jnp.ones_like(segment), segment, lanes * num_bins)
  sums = jax.ops.segment_sum((v - level).reshape(-1)**2, segment, lanes * num_bins)
  counts = counts.reshape(lanes, num_bins).sum(0)
  sums = sums.reshape(lanes, num_bins).sum(0)
  return jnp.sum(sums / jnp.maximum(counts, 1).astype(dtype))


def _leaf_paths(tree: Any) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(tree) if tree else {}


def weight_br(params: Any, bits: int) -> jax.Array:
  """W-BR: the sum of :func:`bin_regularization` over every quantized kernel.

  A quantized kernel is a ``kernel`` parameter with an ``alpha`` beside it (as
  ``quant.QuantConv`` and ``quant.QuantDense`` create). Signed bins; the gradient reaches
  the weight step sizes (``alpha_grad=True``), as in the BR paper.

  Args:
    params: a Flax ``params`` tree.
    bits: the weight bit width of every quantized kernel (2..8).

  Returns:
    A float32 scalar (0 when the tree holds no quantized kernel).
  """
  qn, qp = quant.qrange(bits, signed=True)
  flat = _leaf_paths(params)
  losses = [bin_regularization(flat[p[:-1] + ("kernel",)], alpha, qn, qp, alpha_grad=True)
            for p, alpha in flat.items()
            if quant.is_alpha_path(p) and p[:-1] + ("kernel",) in flat]
  return sum(losses, jnp.zeros((), jnp.float32))


def activation_br(intermediates: Any, bits: int, *, alpha_grad: bool = False) -> jax.Array:
  """A-BR: the sum of :func:`bin_regularization` over every sown activation.

  Reads the ``pre_quant`` activations and their ``alpha`` that ``quant.QuantReLU`` sows
  into the ``intermediates`` collection (one entry per call of the layer). Unsigned bins.

  Args:
    intermediates: the ``intermediates`` collection returned by ``model.apply(...,
      mutable=["intermediates", ...])``.
    bits: the activation bit width of every quantized activation (2..8).
    alpha_grad: whether A-BR's gradient reaches the activation step sizes (off by
      default: activations change from batch to batch, and letting the levels chase them
      makes a moving target).

  Returns:
    A float32 scalar (0 when nothing was sown).
  """
  qn, qp = quant.qrange(bits, signed=False)
  flat = _leaf_paths(intermediates)
  losses = [bin_regularization(v, alpha, qn, qp, alpha_grad=alpha_grad)
            for p, values in flat.items() if p[-1] == "pre_quant"
            for v, alpha in zip(values, flat[p[:-1] + ("alpha",)])]
  return sum(losses, jnp.zeros((), jnp.float32))


def br_losses(params: Any, intermediates: Any, *, bits_w: int, bits_a: int,
              alpha_grad_a: bool = False) -> tuple[jax.Array, jax.Array]:
  """Both collectors at once: ``(weight_br(params), activation_br(intermediates))``.

  A float bit width (32) gives a zero loss for that part.
  """
  zero = jnp.zeros((), jnp.float32)
  br_w = zero if bits_w == quant.FLOAT_BITS else weight_br(params, bits_w)
  br_a = (zero if bits_a == quant.FLOAT_BITS else
          activation_br(intermediates, bits_a, alpha_grad=alpha_grad_a))
  return br_w, br_a
