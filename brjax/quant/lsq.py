"""LSQ fake-quantization (Esser et al., ICLR 2020) and the Flax layers built on it.

The math lives in pure functions:

* :func:`qrange` gives the integer range ``[qn, qp]`` of a bit width (defined in the
  JAX-free ``brjax.quant.bits``);
* :func:`init_alpha` and :func:`grad_scale` are LSQ's step-size init and gradient scale;
* :func:`lsq_quantize` is the fake-quantizer, a ``jax.custom_vjp`` with LSQ's
  straight-through estimator.

The layers :class:`QuantConv`, :class:`QuantDense` and :class:`QuantReLU` use them and are
drop-in replacements for ``nn.Conv``, ``nn.Dense`` and ``nn.relu`` with one extra field,
``bits`` (``32`` = not quantized). Every step size is a parameter named ``alpha``
(``input_alpha`` for a layer's input), or ``log_alpha`` with ``alpha_param="log"``
(``brjax.quant.step_size``; ``init_alphas`` and the step-size names live there too).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brjax.quant import calibration, sites, step_size
from brjax.quant.bits import FLOAT_BITS, MAX_BITS, MIN_BITS, check_range, qrange  # pylint: disable=unused-import
from brjax.quant.calibration import check_init  # pylint: disable=unused-import
from brjax.quant.step_size import (  # noqa: F401  # pylint: disable=unused-import
  STEP_SIZE_NAMES,
  init_alphas,
  is_alpha_path,
  is_weight_alpha_path,
)

STATE = "quant_state"
"""Variable collection of per-site decisions fixed at init (a data-decided input sign)."""

# Floor of the step size used by lsq_quantize, in float32 terms; see `_alpha_floor`.
_ALPHA_FLOOR = 1e-8


def check_layer_bits(bits: int) -> None:
  """Raises ValueError unless ``bits`` is a layer bit width: 2..8 or 32 (float)."""
  if bits != FLOAT_BITS:
    try:
      qrange(bits, signed=True)
    except ValueError:
      raise ValueError(f"bits={bits!r} is not supported: use an integer in "
                       f"{MIN_BITS}..{MAX_BITS}, or {FLOAT_BITS} for float") from None


def init_alpha(x: jax.Array, qp: int | jax.Array,
               channel_axes: tuple[int, ...] = ()) -> jax.Array:
  """LSQ step-size init ``alpha = 2 * mean(|x|) / sqrt(qp)`` (Esser et al., Sec. 2.1).

  Args:
    x: any float array: the weights, or one batch of activations.
    qp: the positive end of the integer range (``qrange(bits, signed)[1]``).
    channel_axes: axes that get one step size each (per-channel); the mean runs over the
      other axes. Empty: one scalar step size.

  Returns:
    A scalar (or, per channel, an array of ``x``'s rank with ones on the other axes) of
    dtype ``promote_types(x.dtype, float32)``: float64 input stays float64 (a float32 init
    alone puts 1e-8 relative errors into a float64 replay).
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if not all(-x.ndim <= a < x.ndim for a in channel_axes):
    raise ValueError(f"channel_axes={tuple(channel_axes)} is not accepted: use axes of the "
                     f"rank-{x.ndim} x")
  axes = tuple(a % x.ndim for a in channel_axes)
  if axes:
    mean = jnp.mean(jnp.abs(x.astype(dtype)), axis=tuple(a for a in range(x.ndim)
                                                        if a not in axes), keepdims=True)
  else:
    mean = jnp.mean(jnp.abs(x.astype(dtype)))
  root = math.sqrt(qp) if isinstance(qp, int) else jnp.sqrt(jnp.asarray(qp, dtype))
  return (2.0 * mean / root).astype(dtype)


def grad_scale(num_elements: int, qp: int | jax.Array) -> float | jax.Array:
  """LSQ gradient scale ``g = 1 / sqrt(N * qp)`` for the step size.

  ``N`` is the number of elements one step size quantizes *per example*: the kernel's size
  for weights, and the features of one example (``x[0].size``) for activations, as in the
  LSQ paper. Using the per-example count keeps the alpha update independent of the batch
  size: the loss is a mean over the batch, so the summed alpha gradient does not grow
  with it, and neither should its scale.
  """
  if isinstance(qp, int):
    return 1.0 / math.sqrt(num_elements * qp)
  return jax.lax.rsqrt(jnp.asarray(num_elements * qp, jnp.float32))


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


def lsq_quantize(x: jax.Array, alpha: jax.Array, qn: int | jax.Array, qp: int | jax.Array,
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
    qn: the negative end of the integer range (``0`` for unsigned): a Python int, or a
      scalar array for a range decided from data (see :func:`input_range`).
    qp: the positive end of the integer range, likewise.
    grad_scale: the scale of the alpha gradient, see :func:`grad_scale`.

  Returns:
    An array of ``x``'s shape and dtype whose values are ``k * alpha`` for integers
    ``qn <= k <= qp``. The codes ``k`` are computed in at least float32; for a bfloat16
    ``x`` the product ``k * alpha`` is then rounded to bfloat16 (relative error <= 2^-8:
    ``round(q / alpha)`` gives ``k`` back for ``|k| <= 128``, every code up to 7 bits and of
    8 signed bits; 8-bit unsigned codes above 128 may land on a neighbour).
  """
  if isinstance(qn, int) and isinstance(qp, int):
    check_range(qn, qp)
    return _lsq_static(x, alpha, qn, qp, grad_scale)
  return _lsq_traced(x, alpha, jnp.asarray(qn, x.dtype), jnp.asarray(qp, x.dtype), grad_scale)


def _scaled(x, alpha):
  """``(x / alpha, alpha)`` in at least float32: a bfloat16 input gets the codes float32
  would give it (only the output ``code * alpha`` is rounded back to its dtype)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  a = safe_alpha(alpha).astype(dtype)
  return x.astype(dtype) / a, a


def _lsq_forward(x, alpha, qn, qp):
  v, a = _scaled(x, alpha)
  return (jnp.round(jnp.clip(v, qn, qp)) * a).astype(x.dtype)


def _lsq_grads(x, alpha, qn, qp, scale, g):
  # The residual is x, not x / alpha: x is alive anyway (A-BR reads it), and recomputing the
  # division here is cheaper than writing and keeping a second activation-sized array.
  v, _ = _scaled(x, alpha)
  inside = (v >= qn) & (v <= qp)
  dx = jnp.where(inside, g, jnp.zeros_like(g))
  # The alpha gradient is a sum over many elements: accumulate in at least float32.
  acc = jnp.promote_types(v.dtype, jnp.float32)
  dq_dalpha = jnp.where(v < qn, qn, jnp.where(v > qp, qp, jnp.round(v) - v))
  dalpha = _sum_to_shape(g.astype(acc) * dq_dalpha.astype(acc), jnp.shape(alpha)) * scale
  return dx, dalpha.astype(jnp.result_type(alpha))


# Static range (Python ints, folded into the program): the common case.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq_static(x, alpha, qn, qp, scale):
  return _lsq_forward(x, alpha, qn, qp)


def _lsq_static_fwd(x, alpha, qn, qp, scale):
  return _lsq_forward(x, alpha, qn, qp), (x, alpha, scale)


def _lsq_static_bwd(qn, qp, res, g):
  x, alpha, scale = res
  return (*_lsq_grads(x, alpha, qn, qp, scale, g), jnp.zeros_like(scale))


_lsq_static.defvjp(_lsq_static_fwd, _lsq_static_bwd)


# Traced range (arrays): a sign decided from data; the range gets no gradient.
@jax.custom_vjp
def _lsq_traced(x, alpha, qn, qp, scale):
  return _lsq_forward(x, alpha, qn, qp)


def _lsq_traced_fwd(x, alpha, qn, qp, scale):
  return _lsq_forward(x, alpha, qn, qp), (x, alpha, qn, qp, scale)


def _lsq_traced_bwd(res, g):
  x, alpha, qn, qp, scale = res
  return (*_lsq_grads(x, alpha, qn, qp, scale, g), jnp.zeros_like(qn), jnp.zeros_like(qp),
          jnp.zeros_like(scale))


_lsq_traced.defvjp(_lsq_traced_fwd, _lsq_traced_bwd)


def quantize_kernel(module: nn.Module, kernel: jax.Array, bits: int, *,
                    channel_axes: tuple[int, ...] = (), alpha_param: str = "linear"
                    ) -> jax.Array:
  """Fake-quantizes a layer's kernel (signed, ``bits`` bits) on the layer's own scope.

  Creates the step size ``alpha`` beside the kernel (LSQ init from the kernel; one per
  output channel along ``channel_axes``, else a scalar; a zero or non-finite one fails, see
  ``brjax.quant.calibration``) and sows a ``"weight"`` site (see ``brjax.quant.sites``). The
  gradient scale counts the weights that share one step size.

  Args:
    module: the layer (a bound Flax module inside its call).
    kernel: its float kernel, as read from ``params``.
    bits: 1..8 (1 = ternary).
    channel_axes: kernel axes with one step size per index (per-channel).
    alpha_param: ``linear`` or ``log`` (``brjax.quant.step_size``).

  Returns:
    The quantized kernel, same shape and dtype.
  """
  qn, qp = qrange(bits, signed=True)
  alpha = step_size.create(module, "alpha", lambda _: check_init(
      _path(module), "kernel", init_alpha(kernel, qp, channel_axes), kernel), alpha_param)
  sites.sow(module, sites.WEIGHT, sites.record(kernel, alpha, qn, qp), keep_last=True)
  return lsq_quantize(kernel, alpha, qn, qp, grad_scale(kernel.size // alpha.size, qp))


def input_range(module: nn.Module, x: jax.Array, bits: int, signed: bool | None
                ) -> tuple[int | jax.Array, int | jax.Array]:
  """``(qn, qp)`` of a layer's input quantizer; with ``signed=None``, decided from data.

  A data-decided sign is fixed once, from the batch the model is initialized with
  (signed if any input is negative), and kept in the layer's ``"quant_state"``
  variable ``input_signed``: then ``qn`` and ``qp`` are int32 scalars (same number of
  levels either way, so the binning stays static).
  """
  if signed is not None:
    return qrange(bits, signed)
  if bits == 1:
    raise ValueError(f"{_path(module)}: act_bits=1 needs act_signed=True or False (a "
                     "1-bit signed range has 3 levels, an unsigned one 2)")
  if not (module.has_variable(STATE, "input_signed") or module.is_mutable_collection(STATE)):
    raise ValueError(
        f"{_path(module)}: its input sign (act_signed=None) is decided at init and kept in "
        f"the {STATE!r} collection, which "
        + ("this init cannot create: make it mutable in model.init (mutable=True), or set "
           "act_signed=True/False in the rule" if module.is_initializing() else
           "the variables given to model.apply lack: pass every collection that init "
           "returned, or set act_signed=True/False in the rule"))
  flag = module.variable(STATE, "input_signed", lambda: jnp.any(x < 0))
  return calibration.decided_range(bits, flag.value)


def quantize_input(module: nn.Module, x: jax.Array, bits: int, signed: bool | None, *,
                   batch_grad_scale: bool = False, alpha_param: str = "linear") -> jax.Array:
  """Fake-quantizes a layer's input on the layer's own scope (the step size ``input_alpha``).

  LSQ init from the first batch (a batch it cannot calibrate on fails loudly, see
  ``brjax.quant.calibration``); sows an ``"input"`` site for A-BR. The gradient scale is
  ``1/sqrt(n * qp)`` with ``n = x[0].size`` (one example, as the LSQ paper) or
  ``x.size`` (the whole batch, as the reference package) with ``batch_grad_scale``.
  """
  qn, qp = input_range(module, x, bits, signed)
  alpha = step_size.create(module, "input_alpha", lambda _: check_init(
      _path(module), "input", init_alpha(x, qp), x, signed), alpha_param)
  qn_any, qp_any = qrange(bits, signed is not False)  # the same number of levels either way
  sites.sow(module, sites.INPUT,
            sites.Site(values=x, alpha=alpha, qn=jnp.asarray(qn, jnp.int32),
                       levels=qp_any - qn_any + 1, ndim=x.ndim))
  n = x.size if batch_grad_scale else x[0].size
  return lsq_quantize(x, alpha, qn, qp, grad_scale(n, qp))


def _path(module: nn.Module) -> str:
  return "/".join(module.path) or type(module).__name__


class _QuantizedKernel:
  """Mixin for ``nn.Conv``/``nn.Dense``: the kernel is fake-quantized as it is read.

  Flax layers create their kernel with ``self.param("kernel", ...)``; intercepting that call
  keeps every other behaviour (and, with ``bits=32``, the numerics) of the Flax layer.
  """

  def param(self, name: str, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name != "kernel" or self.bits == FLOAT_BITS:
      return value
    return quantize_kernel(self, value, self.bits, channel_axes=(-1,) if self.per_channel else (),
                           alpha_param=self.alpha_param)


class QuantConv(_QuantizedKernel, nn.Conv):
  """``nn.Conv`` whose kernel is LSQ fake-quantized (signed, ``bits`` bits) as it is read.

  Same fields as ``nn.Conv`` plus ``bits`` (1..8, or 32 for a plain float ``nn.Conv``) and
  ``per_channel`` (one step size per output feature: ``alpha`` of shape ``(1, .., 1, F)``;
  else a scalar). Parameters: ``kernel``, ``bias`` (if ``use_bias``) and, when quantized,
  the step size ``alpha``, initialized the LSQ way from the initial kernel (``log_alpha``,
  its logarithm, with ``alpha_param="log"``: ``brjax.quant.step_size``).
  """
  bits: int = FLOAT_BITS
  per_channel: bool = False
  alpha_param: str = "linear"


class QuantDense(_QuantizedKernel, nn.Dense):
  """``nn.Dense`` whose kernel is LSQ fake-quantized (signed, ``bits`` bits) as it is read.

  Same fields as ``nn.Dense`` plus ``bits`` and ``per_channel``; parameters as
  :class:`QuantConv`.
  """
  bits: int = FLOAT_BITS
  per_channel: bool = False
  alpha_param: str = "linear"


class QuantReLU(nn.Module):
  """ReLU (optionally clipped at ``clip``) followed by unsigned LSQ quantization.

  ``y = min(max(x, 0), clip)``; when ``bits != 32`` the output is
  ``lsq_quantize(y, alpha, 0, qp, g)`` with ``qp = qrange(bits, signed=False)[1]``, and
  the layer sows an ``"output"`` site (``y``, ``alpha``, its range) into the ``"quant"``
  collection for activation Bin Regularization (see ``brjax.quant.sites``). Sowing only happens
  when the caller lists ``"quant"`` as mutable in ``apply``.

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
    alpha_param: ``linear`` (the parameter ``alpha``) or ``log`` (``log_alpha``).
  """
  bits: int = FLOAT_BITS
  clip: float | None = None
  batch_grad_scale: bool = False
  keep_last_call: bool = False
  alpha_param: str = "linear"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
      raise ValueError(f"QuantReLU clip={self.clip!r} is not accepted: use a positive finite "
                       "number, or None for a plain ReLU")
    y = nn.relu(x) if self.clip is None else jnp.clip(x, 0.0, self.clip)
    if self.bits == FLOAT_BITS:
      return y
    qn, qp = qrange(self.bits, signed=False)
    alpha = step_size.create(self, "alpha", lambda _: check_init(
        _path(self), "output", init_alpha(y, qp), y, False), self.alpha_param)
    sites.sow(self, sites.OUTPUT, sites.record(y, alpha, qn, qp), keep_last=self.keep_last_call)
    n = y.size if self.batch_grad_scale else y[0].size
    return lsq_quantize(y, alpha, qn, qp, grad_scale(n, qp))
