"""Integer export of a trained quantized CIFAR ResNet, and an integer-arithmetic inference.

What is exported
----------------
For every quantized layer (each ``QuantConv``, including the stem and the residual
projections, and the final ``QuantDense``) the signed integer weight codes

    codes = round(clip(kernel / alpha_w, qn, qp)),   qn, qp = quant.qrange(bits_w, signed=True)

computed exactly as ``quant.lsq_quantize`` does (float32, ``alpha_w = quant.safe_alpha``,
half-to-even), so ``codes * alpha_w`` is bit for bit the kernel the fake-quant model uses.
Every ``QuantReLU`` keeps its step size ``alpha_a`` and range ``[0, qp_a]``. The float parts:
each BatchNorm folded into the conv before it as a per-channel ``(scale, bias)`` (see
:func:`fold_batchnorm`) and the dense bias. The input normalization of the training data
(per-channel ``mean``/``std``) is kept too, so the first conv can run on uint8 pixels.

File format (:func:`save`, :func:`load`)
-----------------------------------------
One ``.npz`` (a zip of ``.npy`` arrays, read with ``np.load(path, allow_pickle=False)``):

* ``header``: uint8, the UTF-8 bytes of a JSON object: ``format`` (``"brjax.export"``),
  ``version`` (1), ``model``, ``bits_w``, ``bits_a``, ``clip``, ``num_classes``,
  ``bn_epsilon``, ``normalization`` (``{"mean": [3], "std": [3]}``, pixels in [0, 1], or
  null), ``packing``, ``blocks`` (``{"name", "strides", "proj"}`` per residual block),
  ``layers`` (per quantized layer, in execution order: ``name``, ``kind``
  ``"conv"``/``"dense"``, ``shape`` (HWIO or (in, out)), ``strides``, ``bits``,
  ``packed_bits``, ``alpha`` (the weight step size), ``input`` (the activation it reads),
  ``bn`` (the BatchNorm folded into it, or null)), ``activations`` (per ``QuantReLU``:
  ``name``, ``bits``, ``qp``, ``alpha``, ``clip``) and ``source`` (workdir, epoch,
  ``float_bytes``). Step sizes are JSON numbers: a float32 printed as a float64 reads back
  exactly.
* ``<layer>/codes``: uint8, the packed weight codes (:func:`pack_codes`) of ``shape``;
* ``<layer>/scale``, ``<layer>/bias``: float32 ``(C_out,)``, the folded BatchNorm (convs);
  the dense layer has ``<layer>/bias`` only.

Each array costs ~250 bytes of npy and zip headers: ~15 KB of the ~0.1 MB of a W2A2
ResNet-20, negligible for ResNet-18.

Packing: codes of ``b`` bits are stored in ``packed_bits(b)`` = 2, 4 or 8 bits (3..4 -> 4,
5..8 -> 8: a byte holds a whole number of codes, so any code is read with one shift and
mask; 3-bit codes in 4 bits waste 25%, 5..7-bit codes in 8 bits 37..12%). Codes are taken
in C order (row-major over ``shape``); code ``i`` sits in byte ``i // k`` at bit offset
``(i % k) * packed_bits`` with ``k = 8 // packed_bits`` (first code in the lowest bits, as
ONNX int4), signed codes in two's complement; the unused bits of the last byte are zero.
So a tensor of ``n`` codes takes ``ceil(n * packed_bits / 8)`` bytes.

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
BatchNorm rounds differently (:func:`fold_batchnorm`). So a pre-requantization value
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

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from brjax import checkpoint
from brjax import input_pipeline
from brjax import models
from brjax import quant

FORMAT = "brjax.export"
VERSION = 1
BN_EPSILON = models.BN_EPSILON
"""The BatchNorm epsilon of ``models.CifarResNet`` (folded into the exported scale)."""

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")
_INT32_LIMIT = 2**31 - 1
_PACKING = ("C order; code i in byte i // k at bit (i % k) * packed_bits, k = 8 // "
            "packed_bits; signed codes in two's complement; unused trailing bits zero")


@dataclasses.dataclass(frozen=True)
class Exported:
  """An exported model: a JSON-able header and its arrays (codes unpacked in memory).

  Attributes:
    header: the JSON header described in the module docstring.
    arrays: ``<layer>/codes`` int8 of the layer's ``shape``; ``<layer>/scale`` and
      ``<layer>/bias`` float32 ``(C_out,)``.
  """
  header: dict[str, Any]
  arrays: dict[str, np.ndarray]


# ------------------------------------------------------------------------------- packing


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


# ------------------------------------------------------------------------------- folding


def fold_batchnorm(scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray,
                   epsilon: float = BN_EPSILON) -> tuple[np.ndarray, np.ndarray]:
  """Folds inference BatchNorm into a per-channel affine map ``BN(z) = s * z + b``.

  ``BN(z) = scale * (z - mean) / sqrt(var + eps) + bias``, so ``s = scale / sqrt(var + eps)``
  and ``b = bias - s * mean``. This is exact in real arithmetic, for every ``z``: it is
  only the distributive law. What rounding remains: ``s`` and ``b`` are computed here in
  float64 and rounded once each (the export stores them as float32: a relative 2^-24 each);
  at inference ``s * z + b`` in float32 has an absolute error of a few ulps of
  ``|s * z| + |b|``, which can exceed ``|BN(z)|`` when ``z`` is close to ``mean``
  (cancellation), whereas Flax computes ``(z - mean) * s + bias``, whose error scales with
  ``|z - mean|``. Both are at the float32 noise level of the conv output ``z`` itself.

  Args:
    scale, bias, mean, var: float ``(C,)``: the BatchNorm's params and running statistics.
    epsilon: the BatchNorm's epsilon.

  Returns:
    ``(s, b)``, float64 ``(C,)``.
  """
  scale, bias, mean, var = (np.asarray(t, np.float64) for t in (scale, bias, mean, var))
  s = scale / np.sqrt(var + epsilon)
  return s, bias - s * mean


def weight_codes(kernel: np.ndarray, alpha: float | np.ndarray, bits: int) -> np.ndarray:
  """``round(clip(kernel / alpha, qn, qp))`` as int8: the codes ``lsq_quantize`` rounds to.

  The same float32 operations as ``quant.lsq_quantize`` (IEEE division, half-to-even
  rounding, step size floored by ``quant.safe_alpha``), in numpy, so that
  ``codes * alpha`` equals the fake-quantized kernel bit for bit.

  Args:
    kernel: float32 weights of any shape.
    alpha: the layer's weight step size: a scalar, or one per output channel (shape
      ``(O,)`` or the kernel's rank with ones elsewhere).
    bits: the weight bit width, 1..8 (signed codes).
  """
  qn, qp = quant.qrange(bits, signed=True)
  a = np.asarray(quant.safe_alpha(jnp.asarray(alpha, jnp.float32)), np.float32)
  return np.round(np.clip(np.asarray(kernel, np.float32) / a, qn, qp)).astype(np.int8)


# -------------------------------------------------------------------------------- export


def float_size_bytes(variables: Mapping[str, Any]) -> int:
  """Bytes of the float model: every leaf of ``params`` and ``batch_stats`` as float32."""
  leaves = jax.tree.leaves({k: variables.get(k, {}) for k in ("params", "batch_stats")})
  return 4 * sum(int(np.size(x)) for x in leaves)


EXPORTABLE_MODELS = ("resnet20", "resnet18")


def check_exportable(bits_w: int, bits_a: int) -> None:
  """Raises ValueError unless weights and activations are both quantized (2..8 bits)."""
  for name, bits in (("bits_w", bits_w), ("bits_a", bits_a)):
    try:
      quant.check_layer_bits(bits)
    except ValueError:
      raise ValueError(f"{name}={bits!r} is not accepted: use an integer in "
                       f"{quant.MIN_BITS}..{quant.MAX_BITS}") from None
  if bits_w == quant.FLOAT_BITS or bits_a == quant.FLOAT_BITS:
    kind = ("a float run" if bits_w == bits_a else
            "an activation-only quantized run" if bits_w == quant.FLOAT_BITS else
            "a weight-only quantized run")
    raise ValueError(f"W{bits_w}A{bits_a} is {kind}: integer export needs quantized weights "
                     f"and activations (bits_w and bits_a in {quant.MIN_BITS}.."
                     f"{quant.MAX_BITS})")


def _block_plan(model: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
  net = models.create_model(model)
  blocks = []
  for i, num in enumerate(net.stage_sizes):
    for j in range(num):
      name = f"BasicBlock_{len(blocks)}"
      blocks.append({"name": name, "strides": 2 if i > 0 and j == 0 else 1,
                     "proj": "conv_proj" in params.get(name, {})})
  return blocks


def export_model(variables: Mapping[str, Any], *, model: str, bits_w: int, bits_a: int,
                 clip: float | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None,
                 source: Mapping[str, Any] | None = None) -> Exported:
  """Exports the variables of a ``models.create_model(model, bits_w=, bits_a=, clip=)`` net.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of that model (numpy or jax arrays).
    model: ``"resnet20"`` or ``"resnet18"``.
    bits_w, bits_a: the run's bit widths, both in 2..8 (see :func:`check_exportable`).
    clip: the run's ReLU clip (None: plain ReLU).
    mean, std: float ``(3,)`` input normalization (pixels in [0, 1]) of the training data,
      to run the first conv on uint8 pixels; None exports without it (float input only).
    source: provenance stored as ``header["source"]`` (JSON-able).

  Returns:
    An :class:`Exported`.

  Raises:
    ValueError: for float or half-quantized runs, a model other than ``resnet20`` and
      ``resnet18``, a variable missing, misshapen or not finite, or a bad normalization.
  """
  check_exportable(bits_w, bits_a)
  if model not in EXPORTABLE_MODELS:
    raise ValueError(f"model={model!r} is not exportable: integer export knows the layouts of "
                     f"{', '.join(EXPORTABLE_MODELS)} only")
  if clip is not None and not (math.isfinite(clip) and clip > 0):
    raise ValueError(f"clip={clip!r} is not accepted: use a positive number or None")
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  flat = {"params": traverse_util.flatten_dict(params, sep="/"),
          "batch_stats": traverse_util.flatten_dict(stats, sep="/")}

  used: set[tuple[str, str]] = set()

  def get(collection: str, path: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    used.add((collection, path))
    if path not in flat[collection]:
      raise ValueError(f"{collection}/{path} is missing: these variables are not a {model} "
                       f"W{bits_w}A{bits_a} model")
    value = np.asarray(flat[collection][path], np.float32)
    if shape is not None and value.shape != shape:
      raise ValueError(f"{collection}/{path} has shape {value.shape}, expected {shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{collection}/{path} holds non-finite values: the run diverged")
    return value

  def alpha(path: str) -> float:
    return float(quant.safe_alpha(jnp.asarray(get("params", f"{path}/alpha", ()))))

  def weight_alpha(path: str, channels: int) -> float | list[float]:
    """A kernel's step size: a float, or (per channel) a list of ``channels`` floats."""
    value = get("params", f"{path}/alpha")
    if value.size == 1:
      return alpha(path)
    if value.size != channels or value.shape[-1] != channels:
      raise ValueError(f"params/{path}/alpha has shape {value.shape}: expected a scalar or "
                       f"one step size per output channel ({channels})")
    return np.asarray(quant.safe_alpha(jnp.asarray(value.ravel()))).tolist()

  arrays: dict[str, np.ndarray] = {}
  layers: list[dict[str, Any]] = []
  activations: list[dict[str, Any]] = []
  _, qp_a = quant.qrange(bits_a, signed=False)

  def add_act(name: str) -> str:
    activations.append({"name": name, "bits": bits_a, "qp": qp_a, "alpha": alpha(name),
                        "clip": clip})
    return name

  def add_conv(name: str, bn: str, strides: int, source_act: str) -> None:
    kernel = get("params", f"{name}/kernel")
    if kernel.ndim != 4:
      raise ValueError(f"params/{name}/kernel has shape {kernel.shape}, expected HWIO")
    c = kernel.shape[-1]
    s, b = fold_batchnorm(get("params", f"{bn}/scale", (c,)), get("params", f"{bn}/bias", (c,)),
                          get("batch_stats", f"{bn}/mean", (c,)),
                          get("batch_stats", f"{bn}/var", (c,)))
    alpha_w = weight_alpha(name, c)
    arrays[f"{name}/codes"] = weight_codes(kernel, alpha_w, bits_w)
    arrays[f"{name}/scale"] = s.astype(np.float32)
    arrays[f"{name}/bias"] = b.astype(np.float32)
    layers.append({"name": name, "kind": "conv", "shape": list(kernel.shape),
                   "strides": [strides, strides], "padding": "SAME", "bits": bits_w,
                   "packed_bits": packed_bits(bits_w), "alpha": alpha_w,
                   "input": source_act, "bn": bn})

  blocks = _block_plan(model, params)
  add_conv("conv_init", "bn_init", 1, "image")
  act = add_act("act_init")
  for block in blocks:
    b = block["name"]
    add_conv(f"{b}/QuantConv_0", f"{b}/BatchNorm_0", block["strides"], act)
    mid = add_act(f"{b}/QuantReLU_0")
    add_conv(f"{b}/QuantConv_1", f"{b}/BatchNorm_1", 1, mid)
    if block["proj"]:
      add_conv(f"{b}/conv_proj", f"{b}/norm_proj", block["strides"], act)
    act = add_act(f"{b}/QuantReLU_1")
  kernel = get("params", "QuantDense_0/kernel")
  if kernel.ndim != 2:
    raise ValueError(f"params/QuantDense_0/kernel has shape {kernel.shape}, expected (in, out)")
  dense_alpha = weight_alpha("QuantDense_0", kernel.shape[-1])
  arrays["QuantDense_0/codes"] = weight_codes(kernel, dense_alpha, bits_w)
  arrays["QuantDense_0/bias"] = get("params", "QuantDense_0/bias", kernel.shape[-1:])
  layers.append({"name": "QuantDense_0", "kind": "dense", "shape": list(kernel.shape),
                 "bits": bits_w, "packed_bits": packed_bits(bits_w),
                 "alpha": dense_alpha, "input": f"mean({act})", "bn": None})

  unused = sorted(f"{c}/{p}" for c in flat for p in flat[c] if (c, p) not in used)
  if unused:
    raise ValueError(f"{unused[0]} (and {len(unused) - 1} more) is not part of a {model}: "
                     "export with the run's --model")
  normalization = None
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std (the input normalization), or neither")
  if mean is not None:
    m, sd = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if m.shape != (3,) or sd.shape != (3,) or not np.all(np.isfinite(m)) or not np.all(sd > 0):
      raise ValueError(f"normalization mean={m.tolist()} std={sd.tolist()} is not accepted: "
                       "use 3 finite means and 3 positive stds")
    normalization = {"mean": [float(v) for v in m], "std": [float(v) for v in sd]}

  header = {"format": FORMAT, "version": VERSION, "model": model, "bits_w": bits_w,
            "bits_a": bits_a, "clip": clip, "num_classes": int(kernel.shape[-1]),
            "bn_epsilon": BN_EPSILON, "normalization": normalization, "packing": _PACKING,
            "blocks": blocks, "layers": layers, "activations": activations,
            "source": dict(source or {})}
  return Exported(header, arrays)


def export_run(workdir: str, *, data_dir: str | None = None) -> Exported:
  """Exports the best (else latest) checkpoint of the training run in ``workdir``.

  The input normalization is recomputed from the run's dataset (``data_dir`` overrides the
  run's ``--data_dir``); ``input_pipeline`` derives it from the full train split only, so
  it equals the run's.

  Raises:
    ValueError: no checkpoint, a float or half-quantized run, or unreadable data.
  """
  root = os.path.join(workdir, "checkpoints")
  kinds = [os.path.join(root, k) for k in ("best", "latest")
           if os.path.isdir(os.path.join(root, k))]
  if not any(name.isdigit() for d in kinds for name in os.listdir(d)):
    raise ValueError(f"--workdir={workdir} holds no checkpoint (checkpoints/best/<epoch> or "
                     "checkpoints/latest/<epoch>): use the --workdir of a training run")
  variables, meta = checkpoint.restore_pretrained(workdir)
  config = meta.get("config") or {}
  missing = [k for k in ("model", "bits_w", "bits_a") if k not in config]
  if missing:
    raise ValueError(f"the checkpoint meta in {workdir} lacks config {missing}: it was not "
                     "written by brjax.train")
  check_exportable(config["bits_w"], config["bits_a"])
  data_dir = data_dir or config.get("data_dir")
  try:
    ds = input_pipeline.load_dataset(config.get("dataset", "cifar10"), data_dir,
                                     train_examples=1, test_examples=1)
  except (ValueError, OSError) as e:
    raise ValueError(f"cannot load the run's data for its input normalization ({e}); pass "
                     "--data_dir=<the run's image folder or .tar.gz>") from e
  source = {"workdir": os.path.abspath(workdir), "epoch": meta.get("epoch"),
            "best_test_acc": meta.get("best_test_acc"),
            "float_bytes": float_size_bytes(variables)}
  return export_model(variables, model=config["model"], bits_w=config["bits_w"],
                      bits_a=config["bits_a"], clip=config.get("clip"), mean=ds.mean,
                      std=ds.std, source=source)


# ------------------------------------------------------------------------------ file I/O


def save(path: str, exported: Exported) -> int:
  """Writes ``exported`` as one ``.npz`` (format in the module docstring), atomically.

  Returns:
    The size of the file in bytes.
  """
  h = exported.header
  text = json.dumps(h, separators=(",", ":"), allow_nan=False)
  arrays = {"header": np.frombuffer(text.encode(), np.uint8)}
  for layer in h["layers"]:
    name = layer["name"]
    arrays[f"{name}/codes"] = pack_codes(exported.arrays[f"{name}/codes"], layer["bits"],
                                         signed=True)
    for key in (f"{name}/scale", f"{name}/bias"):
      if key in exported.arrays:
        arrays[key] = np.asarray(exported.arrays[key], np.float32)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return os.path.getsize(path)


def load(path: str) -> Exported:
  """Reads a file written by :func:`save`; the codes come back unpacked (int8).

  Raises:
    ValueError: if the file is not a readable brjax export of a supported version.
  """
  try:
    with np.load(path, allow_pickle=False) as z:
      stored = {k: z[k] for k in z.files}
    header = json.loads(bytes(stored.pop("header")).decode())
  except (OSError, ValueError, KeyError, EOFError) as e:
    raise ValueError(f"{path} is not a brjax export ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from e
  if header.get("format") != FORMAT or header.get("version") != VERSION:
    raise ValueError(f"{path} is format {header.get('format')!r} version "
                     f"{header.get('version')!r}: expected {FORMAT!r} version {VERSION}")
  arrays = {}
  for layer in header["layers"]:
    name = layer["name"]
    keys = [f"{name}/bias"] + ([f"{name}/scale"] if layer["kind"] == "conv" else [])
    try:
      arrays[f"{name}/codes"] = unpack_codes(stored[f"{name}/codes"], layer["shape"],
                                             layer["bits"], signed=True)
      for key in keys:
        arrays[key] = np.asarray(stored[key], np.float32)
        if arrays[key].shape != (layer["shape"][-1],):
          raise ValueError(f"{key} has shape {arrays[key].shape}, expected "
                           f"({layer['shape'][-1]},)")
    except (KeyError, ValueError) as e:
      raise ValueError(f"{path}: layer {name} is unreadable ({e})") from e
  return Exported(header, arrays)


# ----------------------------------------------------------------------- integer forward


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
    exported: from :func:`export_model` or :func:`load`.
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


def describe_size(exported_bytes: int, float_bytes: int, bits_w: int, bits_a: int) -> str:
  """``exported 0.07 MB (W2A2) vs float 1.09 MB: 15.6x smaller`` (MB = 10^6 bytes)."""
  return (f"exported {exported_bytes / 1e6:.2f} MB (W{bits_w}A{bits_a}) vs float "
          f"{float_bytes / 1e6:.2f} MB: {float_bytes / exported_bytes:.1f}x smaller")
