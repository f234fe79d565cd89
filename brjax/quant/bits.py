"""Bit widths and their integer ranges: plain Python, no JAX.

The one definition of LSQ's integer range, shared by the quantizers (``brjax.quant.lsq``
re-exports :func:`qrange`), the configuration and the figures of a run's history, which
must not need JAX to draw a run's levels.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

FLOAT_BITS = 32
"""The bit width that means "not quantized"."""

MIN_BITS, MAX_BITS = 1, 8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
  """Integer range ``(qn, qp)`` of a ``bits``-bit quantizer.

  Signed: ``(-2^(b-1), 2^(b-1) - 1)`` (2 bits: -2..1). Unsigned: ``(0, 2^b - 1)`` (2 bits: 0..3).
  One bit, as the reference package quantizes it: signed is *ternary* ``(-1, 1)`` (levels
  -1, 0, 1: a symmetric grid needs the zero level), unsigned is binary ``(0, 1)``.

  Returns:
    Python ints (for numpy integer ``bits`` too: the quantizer folds them into its program).

  Raises:
    ValueError: if ``bits`` is not an integer (Python or numpy) in 1..8.
  """
  if (isinstance(bits, bool) or not isinstance(bits, numbers.Integral)
      or not MIN_BITS <= bits <= MAX_BITS):
    raise ValueError(f"bits={bits!r} is not supported: use an integer in "
                     f"{MIN_BITS}..{MAX_BITS}")
  bits = int(bits)
  if signed:
    return (-1, 1) if bits == 1 else (-(2**(bits - 1)), 2**(bits - 1) - 1)
  return 0, 2**bits - 1


def check_range(qn: int, qp: int) -> None:
  """Raises ValueError unless ``(qn, qp)`` is an integer range, ``qn < qp`` (Python or numpy
  integers): what every function taking a range by hand checks (the quantizer, BR, the
  metrics)."""
  ok = all(isinstance(q, numbers.Integral) and not isinstance(q, bool) for q in (qn, qp))
  if not ok or not qn < qp:
    raise ValueError(f"qn={qn!r}, qp={qp!r} is not an integer range: use Python ints with "
                     "qn < qp (see quant.qrange)")


def check_grid(qn: int, qp: int, alpha_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> None:
  """:func:`check_range`, and that a step size of ``alpha_shape`` (one, or one per channel)
  broadcasts to values of ``v_shape``: what BR and the grid metrics take by hand."""
  check_range(qn, qp)
  if math.prod(alpha_shape) != 1:
    try:
      np.broadcast_shapes(tuple(alpha_shape), tuple(v_shape))
    except ValueError:
      raise ValueError(f"alpha of shape {tuple(alpha_shape)} does not broadcast to v of shape "
                       f"{tuple(v_shape)}: use a scalar or one step size per channel") from None
