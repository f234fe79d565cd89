"""Integer codes of quantized kernels, packed at their bit width, and back.

Codes
-----
A kernel quantized with step size ``alpha`` on the signed range ``[qn, qp]`` of ``bits``
bits (``quant.qrange(bits, signed=True)``; 1 bit is ternary, -1..1) has the codes

    codes = round(clip(kernel / max(alpha, floor), qn, qp))

(:func:`weight_codes`: the operations of ``quant.lsq_quantize``, so ``codes * alpha``,
:func:`dequantize`, is the fake-quantized kernel bit for bit).

Packing
-------
Codes of ``b`` bits are stored in ``packed_bits(b)`` = 2, 4 or 8 bits (1..2 -> 2, 3..4 -> 4,
5..8 -> 8: a byte holds a whole number of codes, so any code is read with one shift and
mask; 3-bit codes in 4 bits waste 25%, 5..7-bit codes in 8 bits 37..12%). Codes are taken
in C order (row-major over the kernel's shape); code ``i`` sits in byte ``i // k`` at bit
offset ``(i % k) * packed_bits`` with ``k = 8 // packed_bits`` (first code in the lowest
bits, as ONNX int4), signed codes in two's complement; the unused bits of the last byte
are zero. So a tensor of ``n`` codes takes ``ceil(n * packed_bits / 8)`` bytes
(:func:`packed_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from brjax.quant import lsq as quant

LAYOUT = ("C order; code i in byte i // k at bit (i % k) * packed_bits, k = 8 // "
          "packed_bits; signed codes in two's complement; unused trailing bits zero")
"""The packing layout in one line, as export headers state it."""


def packed_bits(bits: int) -> int:
  """The container width of a ``bits``-bit code: 1..2 -> 2, 3..4 -> 4, 5..8 -> 8.

  One bit takes two: a 1-bit signed code is ternary (-1, 0, 1).

  Raises:
    ValueError: if ``bits`` is not an integer in 1..8.
  """
  quant.qrange(bits, signed=True)  # validates bits
  return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_size(num_codes: int, bits: int) -> int:
  """Bytes that ``num_codes`` codes of ``bits`` bits take: ``ceil(n * packed_bits / 8)``."""
  return -(-num_codes * packed_bits(bits) // 8)


def pack_codes(codes: np.ndarray, bits: int, *, signed: bool) -> np.ndarray:
  """Packs integer codes into bytes, ``packed_bits(bits)`` bits per code.

  Args:
    codes: an integer array of any shape, values in ``quant.qrange(bits, signed)``.
    bits: the code width, 2..8.
    signed: two's complement codes (weights) or unsigned codes (activations).

  Returns:
    uint8 ``(ceil(codes.size * packed_bits(bits) / 8),)``, laid out as in the module
    docstring; :func:`unpack_codes` with ``codes.shape`` inverts it exactly.

  Raises:
    ValueError: for a bad ``bits``, a non-integer array, or a code outside the range.
  """
  qn, qp = quant.qrange(bits, signed)
  codes = np.asarray(codes)
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes of dtype {codes.dtype} are not accepted: use an integer array")
  flat = codes.reshape(-1).astype(np.int64)
  if flat.size and (flat.min() < qn or flat.max() > qp):
    raise ValueError(f"codes hold values in [{flat.min()}, {flat.max()}]: "
                     f"{bits}-bit {'signed' if signed else 'unsigned'} codes must be in "
                     f"[{qn}, {qp}]")
  width = packed_bits(bits)
  per_byte = 8 // width
  fields = (flat & (2**width - 1)).astype(np.uint8)  # two's complement low bits
  fields = np.pad(fields, (0, -fields.size % per_byte)).reshape(-1, per_byte)
  shifts = (np.arange(per_byte) * width).astype(np.uint8)
  return np.bitwise_or.reduce(fields << shifts, axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, shape: Sequence[int], bits: int, *,
                 signed: bool) -> np.ndarray:
  """Inverse of :func:`pack_codes`.

  Args:
    packed: uint8 ``(ceil(prod(shape) * packed_bits(bits) / 8),)``.
    shape: the shape of the codes.
    bits: the code width, 2..8.
    signed: as given to :func:`pack_codes`.

  Returns:
    The codes, int8 (signed) or uint8 (unsigned), of ``shape``.

  Raises:
    ValueError: if ``packed`` has the wrong dtype or size, or decodes to codes outside
      ``quant.qrange(bits, signed)`` (a corrupt file).
  """
  qn, qp = quant.qrange(bits, signed)
  packed = np.asarray(packed)
  shape = tuple(int(d) for d in shape)
  n = math.prod(shape)
  if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != packed_size(n, bits):
    raise ValueError(f"packed codes are {packed.dtype}{packed.shape}: shape {shape} at "
                     f"{bits} bits needs uint8 ({packed_size(n, bits)},)")
  width = packed_bits(bits)
  per_byte = 8 // width
  shifts = (np.arange(per_byte) * width).astype(np.uint8)
  fields = ((packed[:, None] >> shifts) & (2**width - 1)).reshape(-1)[:n].astype(np.int16)
  if signed:
    fields = np.where(fields >= 2**(width - 1), fields - 2**width, fields)
  if n and (fields.min() < qn or fields.max() > qp):
    raise ValueError(f"packed codes decode to values in [{fields.min()}, {fields.max()}], "
                     f"outside the {bits}-bit range [{qn}, {qp}]: the data is corrupt")
  return fields.astype(np.int8 if signed else np.uint8).reshape(shape)


def weight_codes(kernel: np.ndarray, alpha: float | np.ndarray, bits: int) -> np.ndarray:
  """``round(clip(kernel / alpha, qn, qp))`` as int8: the codes ``lsq_quantize`` rounds to.

  The same operations as ``quant.lsq_quantize`` (IEEE division in the kernel's dtype,
  half-to-even rounding, step size floored by ``quant.safe_alpha`` and cast to the kernel's
  dtype), in numpy, so that ``codes * alpha`` equals the fake-quantized kernel bit for bit.

  Args:
    kernel: float32 (or float64) weights of any shape.
    alpha: the step size: a scalar, or an array broadcastable to ``kernel`` (per output
      channel: ``(O,)`` or the kernel's rank with ones elsewhere).
    bits: the weight bit width, 1..8 (signed codes).

  Returns:
    int8 codes of ``kernel``'s shape, in ``quant.qrange(bits, signed=True)``.
  """
  qn, qp = quant.qrange(bits, signed=True)
  kernel = np.asarray(kernel)
  dtype = np.float64 if kernel.dtype == np.float64 else np.float32
  a = np.asarray(quant.safe_alpha(jnp.asarray(alpha))).astype(dtype)
  return np.round(np.clip(kernel.astype(dtype) / a, qn, qp)).astype(np.int8)


def broadcastable_alpha(alpha: np.ndarray, shape: Sequence[int], stack_axes: int = 0
                        ) -> np.ndarray:
  """A kernel's step size, reshaped to broadcast against the kernel (as ``sites.grouped``).

  Args:
    alpha: a scalar, or one per output channel (the kernel's rank, ones elsewhere); with
      ``stack_axes`` leading layer axes of an ``nn.scan`` stack in front of either.
    shape: the (stacked) kernel's shape.
    stack_axes: the number of those leading axes.

  Raises:
    ValueError: if ``alpha`` fits neither form.
  """
  alpha, shape = np.asarray(alpha), tuple(int(d) for d in shape)
  if alpha.shape == shape[:stack_axes]:
    return alpha.reshape(alpha.shape + (1,) * (len(shape) - stack_axes))
  if alpha.ndim == len(shape) and all(a in (1, d) for a, d in zip(alpha.shape, shape)):
    return alpha
  raise ValueError(f"a step size of shape {alpha.shape} does not fit a kernel of shape "
                   f"{shape} with {stack_axes} stack axes")


def dequantize(codes: np.ndarray, alpha: np.ndarray, dtype: Any, stack_axes: int = 0
               ) -> np.ndarray:
  """``codes * max(alpha, floor)`` in ``dtype``: the kernel ``lsq_quantize`` made.

  Args:
    codes: integer codes of the kernel's shape (from :func:`weight_codes`).
    alpha: its step size as stored (see :func:`broadcastable_alpha`).
    dtype: the kernel's dtype.
    stack_axes: leading layer axes of a stack.

  Returns:
    An array of ``codes``' shape and ``dtype``.
  """
  a = np.asarray(quant.safe_alpha(jnp.asarray(alpha))).astype(dtype)
  return codes.astype(dtype) * broadcastable_alpha(a, codes.shape, stack_axes)
