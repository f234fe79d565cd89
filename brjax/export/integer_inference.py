"""Integer-arithmetic inference of an exported CIFAR ResNet (``brjax.export.integer``).

    exported = integer_export.load("model.npz")      # or integer_export.export_run(workdir)
    logits = integer_inference.integer_forward(exported, uint8_images)

Integer inference (:func:`integer_forward`)
-------------------------------------------
Every conv and the dense layer multiply integer activation codes by integer weight codes
with int32 accumulation (``lax.conv_general_dilated``/``lax.dot_general`` on int8 operands,
int16 for 8-bit activations whose codes reach 255, ``preferred_element_type=int32``); then
one float32 multiply-add per output channel, ``y = (s * alpha_w * alpha_in) * acc + b``
(``s``, ``b``: the folded BatchNorm), the residual add in float32, and the next
``QuantReLU``'s requantization ``round(clip(relu(y) / alpha_a, 0, qp))`` gives the next codes
(``clip(y, 0, clip)`` in place of ``relu(y)`` for a clipped ReLU).
The global average pool is an int32 sum of codes, scaled by ``alpha / (H * W)`` after the
dense layer's integer product. The first conv:

* on uint8 pixels ``p`` (needs ``normalization``): the normalization is the per-channel
  affine map ``x = a_c * p + d_c`` (``a_c = 1 / (255 std_c)``, ``d_c = -mean_c / std_c``), so
  with ``p' = p - 128`` (int8), ``conv(x, W)[o] = sum_c a_c * S_c[o] + sum_c d'_c * T_c[o]``,
  ``d'_c = d_c + 128 a_c``, where ``S_c = conv_c(p', W)`` is an exact int32 accumulation per
  input channel (a grouped conv) and ``T_c`` is the int32 sum of the kernel taps that fall
  inside the image (the "SAME" padding is zero in ``x``-space, as in training, not zero
  pixels). Only the 3-term float combination and the rescale are float.
* on float images (already normalized, as ``input_pipeline.eval_batches`` yields them):
  float input times integer weight codes with float32 accumulation: the first layer's
  input was never quantized in training, so this layer is not integer arithmetic.

Agreement with the fake-quant eval (``model.apply(variables, x, train=False)``)
------------------------------------------------------------------------------
Both compute the same real-valued function and differ only in float32 rounding. The
integer accumulations are exact (``|acc| <= fan_in * qp_in * 2^(bits_w-1)`` < 2^28 for both
CIFAR ResNets at 8 bits, checked at run time; converting an ``|acc| > 2^24`` to float32
rounds it by a relative 2^-24); the fake-quant float32 conv is not exact, and the folded
BatchNorm rounds differently (``integer_export.fold_batchnorm``). So a pre-requantization value
differs by a few float32 ulps of the terms summed into it, a relative ~1e-7..1e-6.

* Without any code difference, the logits agree to that rounding: measured at most
  ~2e-7 * (1 + max|logits|). The tests allow ``1e-4 * (1 + max|logits|)`` per example.
* Tie flips: a code differs when ``relu(y) / alpha_a`` lies within that rounding of a
  boundary ``k + 1/2``, changing one activation by one step ``alpha_a``. Measured with
  :func:`integer_forward_with_codes` against the sown fake-quant codes, teacher-forced (each
  layer reads the fake-quant codes of its inputs, so only its own rounding counts): 0 to 1
  per 10^7 codes at W2A2/W4A4 (random and trained ResNet-20), ~3 per 10^6 at W8A8 (error
  in code units grows with ``qp``). The tests require at most 1 per 10^5.
* Effect of a flip: in the last block, exactly ``alpha_a * alpha_dense * |w_code| / (H*W)``
  per logit. Earlier, it propagates and can flip codes downstream (a cascade). Forcing one
  flip per layer moved the logits by at most 6e-3 (1% of max|logits|) on the trained
  2-epoch W2A2 tiny run, and by up to 4-6% of max|logits| on random, chaotic W2A2/W4A4
  nets; free-running random W8A8 nets, where flips are common, differed by up to 1% of
  max|logits| (ResNet-18) after cascades. So argmax agreement is expected except where
  the top two logits are that close; on the tiny run's 128 test images there was no flip at
  all (0 of 2.4e7 codes), the max logit difference was 9e-8 and every class agreed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from brjax.export.integer import Exported

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")
_INT32_LIMIT = 2**31 - 1


def _code_dtype(bits_a: int) -> Any:
  """int8 holds codes up to 127 (activations up to 7 bits, all weights); else int16."""
  return jnp.int8 if 2**bits_a - 1 <= 127 else jnp.int16


def _int_conv(x: jax.Array, w: jax.Array, strides: Sequence[int], dtype: Any,
              groups: int = 1) -> jax.Array:
  return lax.conv_general_dilated(x.astype(dtype), w.astype(dtype), tuple(strides), "SAME",
                                  dimension_numbers=_CONV_DIMS, feature_group_count=groups,
                                  preferred_element_type=jnp.int32)


def _check_accumulator(layer: dict[str, Any], qp_in: int, terms: int) -> None:
  """Raises if ``terms`` products of codes could overflow the int32 accumulator."""
  bound = terms * qp_in * 2**(layer["bits"] - 1)
  if bound > _INT32_LIMIT:
    raise ValueError(f"layer {layer['name']}: |accumulator| may reach {bound} > 2^31 - 1")


def _alpha(layer: Mapping[str, Any]) -> np.ndarray:
  """A layer's weight step size as float64: a scalar, or ``(O,)`` per output channel."""
  return np.asarray(layer["alpha"], np.float64)


def _requantize(y: jax.Array, act: Mapping[str, Any]) -> jax.Array:
  """``QuantReLU``: ``round(clip(relu_or_clip(y) / alpha_a, 0, qp))`` as integer codes."""
  y = jax.nn.relu(y) if act["clip"] is None else jnp.clip(y, 0.0, act["clip"])
  codes = jnp.round(jnp.clip(y / jnp.float32(act["alpha"]), 0, act["qp"]))
  return codes.astype(_code_dtype(act["bits"]))


def _conv_bn(exported: Exported, layer: Mapping[str, Any], codes: jax.Array,
             alpha_in: float, qp_in: int) -> jax.Array:
  """Integer conv of activation codes, then ``(s * alpha_w * alpha_in) * acc + b``.

  Args:
    codes: int8/int16 ``(B, H, W, C_in)`` activation codes with step size ``alpha_in``.

  Returns:
    float32 ``(B, H', W', C_out)``: the conv's BatchNorm output.
  """
  name = layer["name"]
  w = exported.arrays[f"{name}/codes"]
  _check_accumulator(layer, qp_in, math.prod(w.shape[:3]))
  acc = _int_conv(codes, jnp.asarray(w), layer["strides"], codes.dtype)
  m = np.asarray(exported.arrays[f"{name}/scale"], np.float64) * _alpha(layer) * alpha_in
  return acc.astype(jnp.float32) * m.astype(np.float32) + exported.arrays[f"{name}/bias"]


def _inside_taps(image_hw: Sequence[int], w: np.ndarray, strides: Sequence[int]) -> np.ndarray:
  """``T[h, w, c, o]``: the sum of the kernel taps ``W[:, :, c, o]`` that a "SAME" conv
  places inside the image at output position ``(h, w)`` (the others read padding).

  Returns:
    int64 ``(H', W', C, O)``, computed in numpy (static given the shapes).
  """
  kh, kw = w.shape[:2]
  pads = lax.padtype_to_pads(tuple(image_hw), (kh, kw), tuple(strides), "SAME")
  inside = np.pad(np.ones(tuple(image_hw), np.int64), pads)
  out_h = (inside.shape[0] - kh) // strides[0] + 1
  out_w = (inside.shape[1] - kw) // strides[1] + 1
  taps = np.zeros((out_h, out_w, *w.shape[2:]), np.int64)
  for i in range(kh):
    for j in range(kw):
      window = inside[i:i + strides[0] * out_h:strides[0], j:j + strides[1] * out_w:strides[1]]
      taps += window[:, :, None, None] * w[i, j].astype(np.int64)
  return taps


def _stem(exported: Exported, layer: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """The first conv + BatchNorm on uint8 pixels (integer) or normalized floats."""
  name = layer["name"]
  w = exported.arrays[f"{name}/codes"]
  s = np.asarray(exported.arrays[f"{name}/scale"], np.float64)
  b = np.asarray(exported.arrays[f"{name}/bias"], np.float64)
  if images.dtype != jnp.uint8:
    acc = lax.conv_general_dilated(images.astype(jnp.float32), jnp.asarray(w, jnp.float32),
                                   tuple(layer["strides"]), "SAME",
                                   dimension_numbers=_CONV_DIMS,
                                   preferred_element_type=jnp.float32)
    return acc * (s * _alpha(layer)).astype(np.float32) + b.astype(np.float32)
  norm = exported.header["normalization"]
  if norm is None:
    raise ValueError("uint8 images need the input normalization, and this export has none: "
                     "pass normalized float32 images")
  _, _, cin, cout = w.shape
  if images.shape[-1] != cin:
    raise ValueError(f"images have {images.shape[-1]} channels, the first conv takes {cin}")
  _check_accumulator(layer, 128, math.prod(w.shape[:2]))
  std = np.asarray(norm["std"], np.float64)
  a = 1.0 / (255.0 * std)  # x = a * p + d = a * (p - 128) + (d + 128 a)
  d = 128.0 * a - np.asarray(norm["mean"], np.float64) / std
  grouped = jnp.asarray(w.reshape(*w.shape[:2], 1, cin * cout))  # group c: W[:, :, c, :]
  shifted = (images.astype(jnp.int16) - 128).astype(jnp.int8)
  acc = _int_conv(shifted, grouped, layer["strides"], jnp.int8, groups=cin)
  acc = acc.reshape(*acc.shape[:3], cin, cout)  # S_c[o], exact int32 per input channel
  taps = _inside_taps(images.shape[1:3], w, layer["strides"])  # T_c[o]: (H', W', C, O)
  scale = s * _alpha(layer)  # (O,)
  m = (a[:, None] * scale[None, :]).astype(np.float32)  # (C, O)
  offset = (np.einsum("hwco,c->hwo", taps, d) * scale + b).astype(np.float32)  # (H, W, O)
  return jnp.einsum("bhwco,co->bhwo", acc.astype(jnp.float32), m) + offset


def _forward(exported: Exported, images: jax.Array,
             given: Mapping[str, Any] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  h = exported.header
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images of shape {images.shape} are not accepted: use (B, H, W, 3)")
  if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
    raise ValueError(f"images of dtype {images.dtype} are not accepted: use uint8 pixels or "
                     "normalized float images")
  layers = {layer["name"]: layer for layer in h["layers"]}
  acts = {act["name"]: act for act in h["activations"]}
  codes: dict[str, jax.Array] = {}

  def act(name: str, y: jax.Array) -> tuple[jax.Array, Mapping[str, Any]]:
    codes[name] = _requantize(y, acts[name])
    if given is None:
      return codes[name], acts[name]
    if name not in given or np.shape(given[name]) != codes[name].shape:
      raise ValueError(f"given codes for {name} are missing or not of shape "
                       f"{codes[name].shape}")
    return jnp.asarray(given[name]).astype(codes[name].dtype), acts[name]

  x, a = act("act_init", _stem(exported, layers["conv_init"], images))
  for block in h["blocks"]:
    b = block["name"]
    y = _conv_bn(exported, layers[f"{b}/QuantConv_0"], x, a["alpha"], a["qp"])
    mid, am = act(f"{b}/QuantReLU_0", y)
    y = _conv_bn(exported, layers[f"{b}/QuantConv_1"], mid, am["alpha"], am["qp"])
    if block["proj"]:
      residual = _conv_bn(exported, layers[f"{b}/conv_proj"], x, a["alpha"], a["qp"])
    else:
      residual = x.astype(jnp.float32) * jnp.float32(a["alpha"])  # = the fake-quant value
    x, a = act(f"{b}/QuantReLU_1", residual + y)
  dense = layers["QuantDense_0"]
  positions = x.shape[1] * x.shape[2]
  _check_accumulator(dense, a["qp"] * positions, dense["shape"][0])
  pooled = jnp.sum(x.astype(jnp.int32), axis=(1, 2))  # (B, C): sum of codes, exact
  acc = lax.dot_general(pooled, jnp.asarray(exported.arrays["QuantDense_0/codes"], jnp.int32),
                        (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  m = (np.float64(a["alpha"]) * _alpha(dense) / positions).astype(np.float32)
  logits = acc.astype(jnp.float32) * m + exported.arrays["QuantDense_0/bias"]
  return logits, codes


def integer_forward(exported: Exported, images: np.ndarray | jax.Array) -> jax.Array:
  """Logits of the exported model, computed on integer codes (module docstring).

  Args:
    exported: from ``integer_export.export_model``, ``export_run`` or ``load``.
    images: uint8 pixels ``(B, H, W, 3)`` (first conv in exact integer arithmetic; needs
      ``header["normalization"]``), or float images normalized as in training (first conv
      in float32: float input times integer weight codes).

  Returns:
    float32 ``(B, num_classes)``: equal to the fake-quant eval's logits up to float32
    rounding and rare requantization tie flips (see the module docstring).
  """
  return _forward(exported, images)[0]


def integer_forward_with_codes(exported: Exported, images: np.ndarray | jax.Array, *,
                               given: Mapping[str, Any] | None = None
                               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`integer_forward`, plus the integer codes every ``QuantReLU`` produced.

  Args:
    exported, images: as :func:`integer_forward`.
    given: optional reference codes ``{activation name: (B, H, W, C)}`` for every
      ``QuantReLU`` (e.g. the fake-quant model's ``round(pre_quant / alpha)``). When given,
      each layer reads the *given* codes of its inputs instead of its own ("teacher
      forcing"), so a returned code differs from the given one only by that layer's own
      rounding: the local tie-flip rate, without the downstream cascade of earlier flips.

  Returns:
    ``(logits, codes)``, ``codes = {name: int8/int16 (B, H, W, C)}`` keyed by the header's
    activation names.
  """
  return _forward(exported, images, given)
