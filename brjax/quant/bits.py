"""Bit widths and their integer ranges: plain Python, no JAX.

The one definition of LSQ's integer range, shared by the quantizers (``brjax.quant.lsq``
re-exports :func:`qrange`), the configuration and the figures of a run's history, which
must not need JAX to draw a run's levels.
"""

from __future__ import annotations

FLOAT_BITS = 32
"""The bit width that means "not quantized"."""

MIN_BITS, MAX_BITS = 1, 8


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
