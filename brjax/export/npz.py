"""The file of a packed export (:mod:`brjax.export.packed`), and the variables it gives back.

    size = npz.save("model.npz", exported)         # atomically; returns its bytes
    variables = npz.load_variables("model.npz")    # model.apply(variables, ...) as before

File format (:func:`save`, :func:`load`)
-----------------------------------------
One ``.npz`` of two uint8 arrays (``np.load(path, allow_pickle=False)``), laid out as
safetensors: a JSON header, and one buffer that holds every tensor at an offset.

* ``header``: the UTF-8 bytes of a JSON object: ``format`` (``"brjax.quantized"``),
  ``version`` (1), ``framework`` (``"linen"``: variables ``{"params": ..., ...}``;
  ``"nnx"``: the pure dict of ``nnx.state(model)`` without rng state), ``packing``
  (``brjax.export.packing``'s layout in words), ``top_level`` (the top-level keys, empty ones
  included), ``kernels`` (per quantized kernel: ``path`` (its keys in the variables, a
  list), ``module``, ``shape``, ``dtype``, ``bits``, ``qn``, ``qp``, ``packed_bits``,
  ``step_size`` (the path of its ``alpha``), ``stack_axes`` (leading layer axes of a
  stack), ``offset``), ``floats`` (per other variable: ``path``, ``shape``, ``dtype``,
  ``offset``), ``activations`` (per quantized layer input or ``QuantReLU`` output:
  ``module``, ``kind`` (``"input"``/``"output"``), ``step_size``, ``bits``, ``signed`` (a
  list, one per layer, in a stack), ``calls``), ``data_bytes``, ``float_bytes`` (the size
  of the variables as given) and ``source`` (provenance);
* ``data``: ``(data_bytes,)``; at a kernel's ``offset``, its codes as
  ``packing.pack_codes`` packs them (``packed_size(prod(shape), bits)`` bytes); at a
  float's, its C-order bytes in its ``dtype`` (little-endian; bfloat16 included). Offsets
  are multiples of 8, kernels first.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from brjax.export import packing
from brjax.export.packed import FORMAT, VERSION, QuantizedExport, _join, _nbytes, _nnx_state
from brjax.quant import step_size


def to_variables(exported: QuantizedExport) -> dict:
  """The variables of the exported model, kernels dequantized (module docstring): Linen
  collections for ``model.apply``, or an NNX pure state dict for :func:`update_nnx`;
  numpy arrays in their original dtypes."""
  h = exported.header
  tree = {key: {} for key in h["top_level"]}
  for entry in h["floats"] + h["kernels"]:
    name = _join(entry["path"])
    if "bits" in entry:
      value = packing.dequantize(exported.codes[name],
                                 _alpha(entry, exported.floats),
                                 entry["dtype"], entry["stack_axes"])
    else:
      value = exported.floats[name]
    node = tree
    for key in entry["path"][:-1]:
      node = node.setdefault(key, {})
    node[entry["path"][-1]] = value
  return tree


def update_nnx(model: Any, variables: Mapping[str, Any]) -> None:
  """Puts an NNX pure state dict (:func:`to_variables`) into ``model``, in place."""
  nnx, state = _nnx_state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, variables))
  nnx.update(model, state)


def save(path: str, exported: QuantizedExport) -> int:
  """Writes ``exported`` as one ``.npz`` (module docstring), atomically; returns its bytes."""
  h = exported.header
  data = np.zeros(h["data_bytes"], np.uint8)
  for entry in h["kernels"] + h["floats"]:
    name = _join(entry["path"])
    if "bits" in entry:
      raw = packing.pack_codes(exported.codes[name], entry["bits"], signed=True)
    else:
      raw = np.ascontiguousarray(exported.floats[name], jnp.dtype(entry["dtype"]))
    raw = raw.reshape(-1).view(np.uint8)
    data[entry["offset"]:entry["offset"] + raw.size] = raw
  text = json.dumps(h, separators=(",", ":"), allow_nan=False)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, header=np.frombuffer(text.encode(), np.uint8), data=data)
  os.replace(tmp, path)
  return os.path.getsize(path)


def _read(path: str) -> tuple[dict, np.ndarray]:
  """``(header, data)`` of a file of this format and version."""
  try:
    with np.load(path, allow_pickle=False) as z:
      header, data = json.loads(bytes(z["header"]).decode()), z.get("data")
  except (OSError, ValueError, KeyError, EOFError) as e:
    raise ValueError(f"{path} is not a brjax export ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from e
  if header.get("format") != FORMAT or header.get("version") != VERSION:
    hint = ("; read it with brjax.export.integer.load"
            if header.get("format") == "brjax.export" else "")
    raise ValueError(f"{path} is format {header.get('format')!r} version "
                     f"{header.get('version')!r}: expected {FORMAT!r} version {VERSION}{hint}")
  if data is None or data.dtype != np.uint8 or data.shape != (header.get("data_bytes"),):
    raise ValueError(f"{path}: its data is not the uint8 ({header.get('data_bytes')},) "
                     "buffer its header describes")
  return header, data


def load(path: str) -> QuantizedExport:
  """Reads a file written by :func:`save`, codes unpacked (int8); raises ValueError for
  a file of another format or version, or a corrupt entry (named)."""
  header, data = _read(path)
  codes, floats, name = {}, {}, "the header"
  try:
    for entry in header["kernels"] + header["floats"]:
      name, start = _join(entry["path"]), entry["offset"]
      raw = data[start:start + _nbytes(entry)]
      if start < 0 or raw.size != _nbytes(entry):
        raise ValueError(f"offset {start} is outside the data")
      if "bits" in entry:
        codes[name] = packing.unpack_codes(raw, entry["shape"], entry["bits"], signed=True)
      else:
        floats[name] = raw.view(jnp.dtype(entry["dtype"])).reshape(entry["shape"]).copy()
    for entry in header["kernels"]:
      name = _join(entry["path"])
      packing.broadcastable_alpha(_alpha(entry, floats), entry["shape"],
                                  entry["stack_axes"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: {name} is unreadable ({type(e).__name__}: {e})") from e
  return QuantizedExport(header, codes, floats)


def _alpha(entry: dict, floats: dict) -> np.ndarray:
  """A kernel entry's step size: its ``step_size`` variable (``exp`` of a ``log_*`` one)."""
  step = tuple(entry["step_size"])
  return np.asarray(step_size.alpha_of(step, floats[_join(step)]))


def load_variables(path: str) -> dict:
  """``to_variables(load(path))``: the variables the exported model runs."""
  return to_variables(load(path))
