"""LSQ fake-quantization (Esser et al., ICLR 2020) and the Flax layers built on it.

The math lives in pure functions:

* :func:`qrange` gives the integer range ``[qn, qp]`` of a bit width;
* :func:`init_alpha` and :func:`grad_scale` are LSQ's step-size init and gradient scale;
* :func:`lsq_quantize` is the fake-quantizer, a ``jax.custom_vjp`` with LSQ's
  straight-through estimator.

The layers :class:`QuantConv`, :class:`QuantDense` and :class:`QuantReLU` use them and are
drop-in replacements for ``nn.Conv``, ``nn.Dense`` and ``nn.relu`` with one extra field,
``bits`` (``32`` = not quantized). Every step size is a parameter named ``alpha``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

FLOAT_BITS = 32
"""The bit width that means "not quantized" at the layer level."""

MIN_BITS, MAX_BITS = 1, 8

# Floor of the step size used by lsq_quantize, in float32 terms; see `_alpha_floor`.
_ALPHA_FLOOR = 1e-8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
  """Integer range ``(qn, qp)`` of a ``bits``-bit quantizer.

  Signed: ``(-2^(b-1), 2^(b-1) - 1)`` (2 bits: -2..1). Unsigned: ``(0, 2^b - 1)`` (2 bits: 0..3).
  One bit, as the reference package quantizes it: signed is *ternary* ``(-1, 1)`` (levels
  -1, 0, 1: a symmetric grid needs the zero level), unsigned is binary ``(0, 1)``.

  Raises:
    ValueError: if ``bits`` is not an integer in 1..8.
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"bits={bits!r} is not supported: use an integer in "
                     f"{MIN_BITS}..{MAX_BITS}")
  if signed:
    return (-1, 1) if bits == 1 else (-(2**(bits - 1)), 2**(bits - 1) - 1)
  return 0, 2**bits - 1


def check_layer_bits(bits: int) -> None:
  """Raises ValueError unless ``bits`` is a layer bit width: 2..8 or 32 (float)."""
  if bits != FLOAT_BITS:
    try:
      qrange(bits, signed=True)
    except ValueError:
      raise ValueError(f"bits={bits!r} is not supported: use an integer in "
                       f"{MIN_BITS}..{MAX_BITS}, or {FLOAT_BITS} for float") from None


def init_alpha(x: jax.Array, qp: int) -> jax.Array:
  """LSQ step-size init ``alpha = 2 * mean(|x|) / sqrt(qp)`` (Esser et al., Sec. 2.1).

  Args:
    x: any float array: the weights, or one batch of activations.
    qp: the positive end of the integer range (``qrange(bits, signed)[1]``).

  Returns:
    A scalar of dtype ``promote_types(x.dtype, float32)``: float64 input stays float64 (a
    float32 init alone puts 1e-8 relative errors into a float64 replay).
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return (2.0 * jnp.mean(jnp.abs(x.astype(dtype))) / math.sqrt(qp)).astype(dtype)


def grad_scale(num_elements: int, qp: int) -> float:
  """LSQ gradient scale ``g = 1 / sqrt(N * qp)`` for the step size.

  ``N`` is the number of elements one step size quantizes *per example*: the kernel's size
  for weights, and the features of one example (``x[0].size``) for activations, as in the
  LSQ paper. Using the per-example count keeps the alpha update independent of the batch
  size: the loss is a mean over the batch, so the summed alpha gradient does not grow
  with it, and neither should its scale.
  """
  return 1.0 / math.sqrt(num_elements * qp)


def _alpha_floor(dtype: Any) -> float:
  return max(_ALPHA_FLOOR, float(jnp.finfo(dtype).tiny))


def safe_alpha(alpha: jax.Array) -> jax.Array:
  """``max(alpha, floor)``: the step size the quantizer actually uses (see lsq_quantize)."""
  return jnp.maximum(alpha, _alpha_floor(jnp.result_type(alpha)))


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``t`` over the dimensions that were broadcast from ``shape``."""
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1)
  return jnp.sum(t, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lsq_quantize(x: jax.Array, alpha: jax.Array, qn: int, qp: int,
                 grad_scale: float | jax.Array) -> jax.Array:
  """LSQ fake-quantization ``q(x) = round(clip(x / alpha, qn, qp)) * alpha``.

  Backward (straight-through), with ``v = x / alpha``:

  * ``dq/dx = 1`` where ``qn <= v <= qp`` (inclusive), else ``0``;
  * ``dq/dalpha = round(v) - v`` inside the range, ``qn`` below it, ``qp`` above it,
    multiplied by ``grad_scale`` and summed over the dimensions ``alpha`` was
    broadcast along.

  ``grad_scale`` gets no gradient. Rounding is half-to-even (``jnp.round``).

  Step-size guard: the quantizer uses ``max(alpha, floor)`` with ``floor = 1e-8`` (or the
  dtype's smallest normal number, if larger), so a step size that an optimizer pushed to
  zero or below gives finite outputs and gradients instead of NaN. The gradient flows to
  ``alpha`` as if it were the clamped value, so the optimizer can move it back up.

  Args:
    x: float array of any shape and float dtype.
    alpha: positive step size: a scalar (per tensor) or an array broadcastable to ``x``
      (e.g. per output channel, shape ``(C,)`` for ``x`` of shape ``(..., C)``).
    qn: the negative end of the integer range, a Python int (``0`` for unsigned).
    qp: the positive end of the integer range, a Python int.
    grad_scale: the scale of the alpha gradient, see :func:`grad_scale`.

  Returns:
    An array of ``x``'s shape and dtype whose values are ``k * alpha`` for integers
    ``qn <= k <= qp``.
  """
  return _lsq_fwd(x, alpha, qn, qp, grad_scale)[0]


def _lsq_fwd(x, alpha, qn, qp, grad_scale):
  a = safe_alpha(alpha).astype(x.dtype)
  v = x / a
  q = jnp.round(jnp.clip(v, qn, qp)) * a
  return q, (v, alpha, grad_scale)


def _lsq_bwd(qn, qp, res, g):
  v, alpha, scale = res
  inside = (v >= qn) & (v <= qp)
  dx = jnp.where(inside, g, jnp.zeros_like(g))
  # The alpha gradient is a sum over many elements: accumulate in at least float32.
  acc = jnp.promote_types(v.dtype, jnp.float32)
  dq_dalpha = jnp.where(v < qn, qn, jnp.where(v > qp, qp, jnp.round(v) - v))
  dalpha = _sum_to_shape(g.astype(acc) * dq_dalpha.astype(acc), jnp.shape(alpha)) * scale
  return dx, dalpha.astype(jnp.result_type(alpha)), jnp.zeros_like(scale)


lsq_quantize.defvjp(_lsq_fwd, _lsq_bwd)


class _QuantizedKernel:
  """Mixin for ``nn.Conv``/``nn.Dense``: the kernel is fake-quantized as it is read.

  Flax layers create their kernel with ``self.param("kernel", ...)``; intercepting that call
  keeps every other behaviour (and, with ``bits=32``, the numerics) of the Flax layer.
  """

  def param(self, name: str, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name != "kernel" or self.bits == FLOAT_BITS:
      return value
    qn, qp = qrange(self.bits, signed=True)
    alpha = super().param("alpha", lambda _: init_alpha(value, qp))
    return lsq_quantize(value, alpha, qn, qp, grad_scale(value.size, qp))


class QuantConv(_QuantizedKernel, nn.Conv):
  """``nn.Conv`` whose kernel is LSQ fake-quantized (signed, ``bits`` bits) as it is read.

  Same fields as ``nn.Conv`` plus ``bits`` (2..8, or 32 for a plain float ``nn.Conv``).
  Parameters: ``kernel``, ``bias`` (if ``use_bias``) and, when quantized, the scalar
  step size ``alpha``, initialized the LSQ way from the initial kernel.
  """
  bits: int = FLOAT_BITS


class QuantDense(_QuantizedKernel, nn.Dense):
  """``nn.Dense`` whose kernel is LSQ fake-quantized (signed, ``bits`` bits) as it is read.

  Same fields as ``nn.Dense`` plus ``bits``; parameters as :class:`QuantConv`.
  """
  bits: int = FLOAT_BITS


class QuantReLU(nn.Module):
  """ReLU (optionally clipped at ``clip``) followed by unsigned LSQ quantization.

  ``y = min(max(x, 0), clip)``; when ``bits != 32`` the output is
  ``lsq_quantize(y, alpha, 0, qp, g)`` with ``qp = qrange(bits, signed=False)[1]`` and the
  layer sows ``y`` (``"pre_quant"``) and ``alpha`` (``"alpha"``) into the
  ``"intermediates"`` collection, for activation Bin Regularization. Sowing only happens
  when the caller lists ``"intermediates"`` as mutable in ``apply``.

  The step size ``alpha`` is a scalar parameter initialized the LSQ way from the layer's
  input on the batch the model is initialized with.

  Attributes:
    bits: 1..8, or 32 for a plain (clipped) ReLU.
    clip: optional upper clip (6.0 gives ReLU6).
    batch_grad_scale: the alpha gradient scale ``g``: ``1/sqrt(y.size * qp)`` (the whole
      batch, as the reference package) if True, else ``1/sqrt(y[0].size * qp)`` (one
      example, as the LSQ paper; the update then does not depend on the batch size).
    keep_last_call: when one instance is called several times (weight sharing of the
      step size, as the reference ResNet-18's one ``relu`` per block), sow only the last
      call's input, as the reference's forward hooks see it; else every call's.
  """
  bits: int = FLOAT_BITS
  clip: float | None = None
  batch_grad_scale: bool = False
  keep_last_call: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(x) if self.clip is None else jnp.clip(x, 0.0, self.clip)
    if self.bits == FLOAT_BITS:
      return y
    qn, qp = qrange(self.bits, signed=False)
    alpha = self.param("alpha", lambda _: init_alpha(y, qp))
    reduce = dict(reduce_fn=lambda _, new: (new,)) if self.keep_last_call else {}
    self.sow("intermediates", "pre_quant", y, **reduce)
    self.sow("intermediates", "alpha", alpha, **reduce)
    n = y.size if self.batch_grad_scale else y[0].size
    return lsq_quantize(y, alpha, qn, qp, grad_scale(n, qp))


def is_alpha_path(path: tuple[str, ...]) -> bool:
  """Whether a flattened parameter path names a step size (its last key is ``alpha``)."""
  return bool(path) and path[-1] == "alpha"


def init_alphas(model: nn.Module, variables: Any, *args, rng: jax.Array | None = None,
                rngs: dict[str, jax.Array] | None = None, **apply_kwargs) -> Any:
  """Re-initializes every ``alpha`` the LSQ way from the current weights and one batch.

  Weight step sizes come from their kernels; activation step sizes from the activations
  of the batch, in one forward pass, so each layer sees inputs quantized with the step
  sizes already set upstream (the data-driven init of LSQ's first training step). Works by
  dropping every ``alpha`` and letting the layers create them again in ``model.apply``.

  The forward pass may run in training mode (``train=True``: LSQ's init is a training
  forward, the right choice for a model that has not been trained, whose running
  BatchNorm statistics mean nothing yet) or in eval mode (``train=False``: after loading
  trained float weights). Every collection is mutable during the pass, and everything but
  the new step sizes is discarded: BatchNorm statistics, sown values and other state come
  back as they went in.

  Args:
    model: a Flax module built from the layers above.
    variables: its variables, e.g. ``{"params": ..., "batch_stats": ...}``; every other
      parameter (kernels, biases, BatchNorm) is kept as it is.
    *args: the model's inputs, as ``model.apply`` takes them (one batch).
    rng: the ``"params"`` rng (default ``key(0)``): the step-size initializers use none,
      but Flax wants one to create parameters.
    rngs: other rngs the forward pass needs (e.g. ``{"dropout": key}``).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=True``).

  Returns:
    ``variables`` with new ``alpha`` values (a new dict; the input is not modified).
  """
  flat = traverse_util.flatten_dict(variables["params"])
  kept = {p: v for p, v in flat.items() if not is_alpha_path(p)}
  others = {k: v for k, v in variables.items() if k != "params"}
  rngs = dict(rngs or {})
  rngs["params"] = jax.random.key(0) if rng is None else rng
  _, updated = model.apply(
      {**others, "params": traverse_util.unflatten_dict(kept)}, *args,
      rngs=rngs, mutable=True, **apply_kwargs)
  return {**others, "params": updated["params"]}
