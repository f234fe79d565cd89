"""Tests of brjax.export.packing: integer codes, their packing at 2, 4 or 8 bits, and back."""

import math
import re

import jax
import numpy as np
import pytest

from brjax.export import packing
from brjax.quant import lsq as quant


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip(bits, signed):
  qn, qp = quant.qrange(bits, signed)
  rng = np.random.default_rng(bits)
  width = {1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}[bits]
  assert packing.packed_bits(bits) == width
  for shape in [(0,), (1,), (3,), (7,), (13,), (3, 5, 7), (2, 1, 3, 3)]:
    codes = rng.integers(qn, qp + 1, shape)
    codes.reshape(-1)[:2] = [qn, qp][:codes.size]  # both ends of the range
    packed = packing.pack_codes(codes, bits, signed=signed)
    n = codes.size
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n * width / 8),)
    assert packing.packed_size(n, bits) == packed.size
    back = packing.unpack_codes(packed, shape, bits, signed=signed)
    assert back.dtype == (np.int8 if signed else np.uint8) and back.shape == shape
    np.testing.assert_array_equal(back, codes)


def test_pack_layout_is_the_documented_one():
  # 2-bit signed: two's complement fields 2, 3, 0, 1 | 1, first code in the lowest bits.
  packed = packing.pack_codes(np.array([-2, -1, 0, 1, 1]), 2, signed=True)
  np.testing.assert_array_equal(packed, [2 | 3 << 2 | 0 << 4 | 1 << 6, 1])
  # 3-bit codes use 4-bit fields; 5-bit codes a whole byte.
  packed = packing.pack_codes(np.array([-4, 3]), 3, signed=True)
  np.testing.assert_array_equal(packed, [0xC | 3 << 4])
  packed = packing.pack_codes(np.array([15, -16]), 5, signed=True)
  np.testing.assert_array_equal(packed, [15, 0xF0])
  packed = packing.pack_codes(np.array([255, 1, 0]), 8, signed=False)
  np.testing.assert_array_equal(packed, [255, 1, 0])


def test_pack_rejects_bad_input():
  with pytest.raises(ValueError, match=r"\[-2, 2\].*\[-2, 1\]"):
    packing.pack_codes(np.array([0, 2, -2]), 2, signed=True)
  with pytest.raises(ValueError, match=r"\[-1, 3\].*\[0, 3\]"):
    packing.pack_codes(np.array([-1, 3]), 2, signed=False)
  with pytest.raises(ValueError, match="dtype float"):
    packing.pack_codes(np.array([0.5]), 4, signed=True)
  for bits in (0, 9, 32):
    with pytest.raises(ValueError, match=f"bits={bits}"):
      packing.pack_codes(np.array([0]), bits, signed=True)
  with pytest.raises(ValueError, match=r"needs uint8 \(2,\)"):
    packing.unpack_codes(np.zeros(3, np.uint8), (5,), 2, signed=True)
  # A 3-bit code stored in 4 bits can decode outside [-4, 3]: a corrupt file.
  with pytest.raises(ValueError, match="corrupt"):
    packing.unpack_codes(np.array([0x08], np.uint8), (1,), 3, signed=True)



@pytest.mark.parametrize("signed,codes", [(True, [-1, 0, 1, 1, 0, -1, 1]),
                                          (False, [0, 1, 1, 0, 1])])
def test_one_bit_codes_pack_in_two_bits(signed, codes):
  codes = np.array(codes)
  packed = packing.pack_codes(codes, 1, signed=signed)
  assert packed.size == packing.packed_size(codes.size, 1) == -(-2 * codes.size // 8)
  np.testing.assert_array_equal(packing.unpack_codes(packed, codes.shape, 1, signed=signed), codes)


def test_weight_codes_reproduce_lsq_bit_for_bit():
  rng = np.random.default_rng(2)
  kernel = rng.normal(0, 0.1, (3, 3, 8, 16)).astype(np.float32)
  for bits in (2, 3, 8):
    qn, qp = quant.qrange(bits, signed=True)
    alpha = np.float32(quant.init_alpha(kernel, qp))
    codes = packing.weight_codes(kernel, alpha, bits)
    assert codes.dtype == np.int8 and codes.min() >= qn and codes.max() <= qp
    fake = jax.jit(quant.lsq_quantize, static_argnums=(2, 3))(kernel, alpha, qn, qp, 1.0)
    np.testing.assert_array_equal(codes.astype(np.float32) * alpha, np.asarray(fake))



@pytest.mark.parametrize("shape,alpha_shape,stack_axes,expected", [
    ((3, 3, 4, 8), (), 0, (1, 1, 1, 1)),
    ((3, 3, 4, 8), (1, 1, 1, 8), 0, (1, 1, 1, 8)),
    ((2, 16, 8), (2,), 1, (2, 1, 1)),
    ((2, 16, 8), (2, 1, 8), 1, (2, 1, 8)),
])
def test_broadcastable_alpha(shape, alpha_shape, stack_axes, expected):
  alpha = np.arange(1, math.prod(alpha_shape) + 1, dtype=np.float32).reshape(alpha_shape)
  got = packing.broadcastable_alpha(alpha, shape, stack_axes)
  assert got.shape == expected
  np.testing.assert_array_equal(got.reshape(-1), alpha.reshape(-1))


def test_broadcastable_alpha_rejects_misfits():
  for alpha_shape, stack_axes in (((8,), 0), ((1, 1, 1, 4), 0), ((3,), 1)):
    with pytest.raises(ValueError, match=f"shape {re.escape(str(alpha_shape))} does not fit"):
      packing.broadcastable_alpha(np.ones(alpha_shape), (2, 3, 4, 8), stack_axes)


def test_dequantized_codes_requantize_to_themselves():
  """codes * alpha, quantized again, gives the same codes and the same kernel, bit for bit:
  what makes a loaded export run exactly as the original."""
  rng = np.random.default_rng(3)
  for bits in (1, 2, 4, 8):
    qn, qp = quant.qrange(bits, signed=True)
    alpha = np.exp(rng.uniform(-12, 4, (1, 1, 1, 64))).astype(np.float32)
    codes = rng.integers(qn, qp + 1, (3, 3, 16, 64)).astype(np.int8)
    kernel = packing.dequantize(codes, alpha, "float32")
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(packing.weight_codes(kernel, alpha, bits), codes)
    fake = jax.jit(quant.lsq_quantize, static_argnums=(2, 3))(kernel, alpha, qn, qp, 1.0)
    np.testing.assert_array_equal(np.asarray(fake), kernel)
