"""Integer export of a trained quantized CIFAR ResNet: weight codes and folded BatchNorm.

The format that ``brjax.export.integer_inference`` runs on integer codes. It knows the layout of
brjax's CIFAR ResNets (``resnet20``, ``resnet18``); ``brjax.export.packed`` exports any quantized
model (codes and the float rest, loaded back into the same model).

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
* ``<layer>/codes``: uint8, the packed weight codes (``packing.pack_codes``) of ``shape``;
* ``<layer>/scale``, ``<layer>/bias``: float32 ``(C_out,)``, the folded BatchNorm (convs);
  the dense layer has ``<layer>/bias`` only.

Each array costs ~250 bytes of npy and zip headers: ~15 KB of the ~0.1 MB of a W2A2
ResNet-20, negligible for ResNet-18.

Packing: ``brjax.export.packing`` (codes of ``b`` bits in ``packed_bits(b)`` = 2, 4 or 8 bits, C
order, first code in the lowest bits, two's complement).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import os
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from brjax.data import datasets
from brjax.export import packing
from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.quant import step_size
from brjax.training import checkpoint

FORMAT = "brjax.export"
VERSION = 1
BN_EPSILON = models.BN_EPSILON
"""The BatchNorm epsilon of ``models.CifarResNet`` (folded into the exported scale)."""


class NotIntegerExportable(ValueError):
  """A run or model that the integer format cannot hold (``brjax.export.packed`` can)."""


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


# -------------------------------------------------------------------------------- export


def float_size_bytes(variables: Mapping[str, Any]) -> int:
  """Bytes of the float model: every leaf of ``params`` and ``batch_stats`` as float32."""
  leaves = jax.tree.leaves({k: variables.get(k, {}) for k in ("params", "batch_stats")})
  return 4 * sum(int(np.size(x)) for x in leaves)


EXPORTABLE_MODELS = (*(f"resnet{d}" for d in models.DEPTHS), "resnet18")
"""brjax's CIFAR ResNets with projection shortcuts (the layout :func:`export_model` reads)."""


def check_exportable(bits_w: int, bits_a: int, model: str | None = None) -> None:
  """Raises ValueError unless weights and activations are both quantized (1..8 bits) and
  ``model`` (if given) is one of :data:`EXPORTABLE_MODELS`: :class:`NotIntegerExportable`
  for a float or half-quantized run, or another model."""
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
    raise NotIntegerExportable(
        f"W{bits_w}A{bits_a} is {kind}: integer export needs quantized weights and "
        f"activations (bits_w and bits_a in {quant.MIN_BITS}..{quant.MAX_BITS})")
  if model is not None and model not in EXPORTABLE_MODELS:
    raise NotIntegerExportable(f"model={model!r} is not exportable: integer export knows the "
                               f"layouts of {', '.join(EXPORTABLE_MODELS)} only")


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
    model: one of :data:`EXPORTABLE_MODELS` (``"resnet20"``, ``"resnet18"``, ...).
    bits_w, bits_a: the run's bit widths, both in 2..8 (see :func:`check_exportable`).
    clip: the run's ReLU clip (None: plain ReLU).
    mean, std: float ``(3,)`` input normalization (pixels in [0, 1]) of the training data,
      to run the first conv on uint8 pixels; None exports without it (float input only).
    source: provenance stored as ``header["source"]`` (JSON-able).

  Returns:
    An :class:`Exported`.

  Raises:
    ValueError: for float or half-quantized runs, a model not in :data:`EXPORTABLE_MODELS`,
      a variable missing, misshapen or not finite, or a bad normalization.
  """
  check_exportable(bits_w, bits_a, model)
  if clip is not None and not (math.isfinite(clip) and clip > 0):
    raise ValueError(f"clip={clip!r} is not accepted: use a positive number or None")
  params = step_size.linear_params(variables.get("params", {}))  # log step sizes as alpha
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
    arrays[f"{name}/codes"] = packing.weight_codes(kernel, alpha_w, bits_w)
    arrays[f"{name}/scale"] = s.astype(np.float32)
    arrays[f"{name}/bias"] = b.astype(np.float32)
    layers.append({"name": name, "kind": "conv", "shape": list(kernel.shape),
                   "strides": [strides, strides], "padding": "SAME", "bits": bits_w,
                   "packed_bits": packing.packed_bits(bits_w), "alpha": alpha_w,
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
  arrays["QuantDense_0/codes"] = packing.weight_codes(kernel, dense_alpha, bits_w)
  arrays["QuantDense_0/bias"] = get("params", "QuantDense_0/bias", kernel.shape[-1:])
  layers.append({"name": "QuantDense_0", "kind": "dense", "shape": list(kernel.shape),
                 "bits": bits_w, "packed_bits": packing.packed_bits(bits_w),
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
            "bn_epsilon": BN_EPSILON, "normalization": normalization,
            "packing": packing.LAYOUT,
            "blocks": blocks, "layers": layers, "activations": activations,
            "source": dict(source or {})}
  return Exported(header, arrays)


def export_run(workdir: str, *, data_dir: str | None = None, prefer: str = "best") -> Exported:
  """Exports the best (else latest; or ``prefer="latest"``) checkpoint of the training run
  in ``workdir``.

  The input normalization is the one the run stored in its checkpoint meta
  (``datasets.stored_stats``; ``header["source"]["normalization"]`` says "stored by the
  run"), which needs no data. A meta from before it was stored: measured again from the
  run's dataset (``data_dir`` overrides the run's ``--data_dir``) as training measures it,
  under the run's ``--normalization`` recipe.

  Raises:
    ValueError: no checkpoint, a float or half-quantized run, or (an older meta)
      unreadable data.
  """
  root = os.path.join(workdir, "checkpoints")
  kinds = [os.path.join(root, k) for k in ("best", "latest")
           if os.path.isdir(os.path.join(root, k))]
  if not any(name.isdigit() for d in kinds for name in os.listdir(d)):
    raise ValueError(f"--workdir={workdir} holds no checkpoint (checkpoints/best/<epoch> or "
                     "checkpoints/latest/<epoch>): use the --workdir of a training run")
  variables, meta = checkpoint.restore_pretrained(workdir, prefer)
  config = meta.get("config") or {}
  missing = [k for k in ("model", "bits_w", "bits_a") if k not in config]
  if missing:
    raise ValueError(f"the checkpoint meta in {workdir} lacks config {missing}: it was not "
                     "written by brjax.training.train")
  check_exportable(config["bits_w"], config["bits_a"], config["model"])
  edge = config.get("first_last_bits")
  if edge is not None and edge not in {config["bits_w"]} & {config["bits_a"]}:
    raise ValueError(f"--first_last_bits={edge}: the run's first and last layers are not at "
                     f"W{config['bits_w']}A{config['bits_a']}, and the integer format has one bit "
                     "width for every layer: use --format=onnx or --format=quantized")
  stats, how = datasets.stored_stats(meta), "stored by the run"
  if stats is None:  # a meta from before the statistics were stored
    data_dir = data_dir or config.get("data_dir")
    try:
      ds = datasets.load(config, data_dir=data_dir, train_examples=1, test_examples=1)
    except (ValueError, OSError) as e:
      raise ValueError(f"cannot load the run's data for its input normalization ({e}); pass "
                       "--data_dir=<the run's image folder or .tar.gz>") from e
    stats = {"mean": ds.mean, "std": ds.std}
    how = (f"measured again from {data_dir or config.get('dataset', 'cifar10')} "
           f"(--normalization={config.get('normalization') or 'dataset'}): the checkpoint "
           "stored none")
  source = {"workdir": os.path.abspath(workdir), "epoch": meta.get("epoch"),
            "best_test_acc": meta.get("best_test_acc"),
            "float_bytes": float_size_bytes(variables), "normalization": how}
  return export_model(variables, model=config["model"], bits_w=config["bits_w"],
                      bits_a=config["bits_a"], clip=config.get("clip"), mean=stats["mean"],
                      std=stats["std"], source=source)


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
    arrays[f"{name}/codes"] = packing.pack_codes(exported.arrays[f"{name}/codes"],
                                                 layer["bits"], signed=True)
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
    hint = ("; read it with brjax.export.npz.load" if header.get("format") == "brjax.quantized"
            else "")
    raise ValueError(f"{path} is format {header.get('format')!r} version "
                     f"{header.get('version')!r}: expected {FORMAT!r} version {VERSION}{hint}")
  arrays = {}
  for layer in header["layers"]:
    name = layer["name"]
    keys = [f"{name}/bias"] + ([f"{name}/scale"] if layer["kind"] == "conv" else [])
    try:
      arrays[f"{name}/codes"] = packing.unpack_codes(stored[f"{name}/codes"], layer["shape"],
                                                     layer["bits"], signed=True)
      for key in keys:
        arrays[key] = np.asarray(stored[key], np.float32)
        if arrays[key].shape != (layer["shape"][-1],):
          raise ValueError(f"{key} has shape {arrays[key].shape}, expected "
                           f"({layer['shape'][-1]},)")
    except (KeyError, ValueError) as e:
      raise ValueError(f"{path}: layer {name} is unreadable ({e})") from e
  return Exported(header, arrays)


def describe_size(exported_bytes: int, float_bytes: int, bits_w: int, bits_a: int) -> str:
  """``exported 0.07 MB (W2A2) vs float 1.09 MB: 15.6x smaller`` (MB = 10^6 bytes)."""
  return (f"exported {exported_bytes / 1e6:.2f} MB (W{bits_w}A{bits_a}) vs float "
          f"{float_bytes / 1e6:.2f} MB: {float_bytes / exported_bytes:.1f}x smaller")
