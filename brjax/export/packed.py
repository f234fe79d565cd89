"""Export of any brjax-quantized Flax model: packed integer kernels and the float rest.

    exported = export.from_linen(model, variables, images, train=False)   # or from_nnx
    size = npz.save("model.npz", exported)                # brjax.export.npz
    variables = npz.load_variables("model.npz")
    model.apply(variables, images, train=False)   # the fake-quantized original's logits

What is exported
----------------
One recording forward pass (``apply(..., mutable=["quant"])`` or ``brjax.quant.nnx.record_sites``,
jitted) lists the model's quantizers as sites (``brjax.quant.sites``). Each ``"weight"`` site is
a quantized kernel with its step size and integer range, whatever the rules: per-channel
step sizes, bits per layer, ``nn.scan`` stacks (leading layer axes, a grid per layer).
brjax's quantizers read a kernel as the variable ``kernel`` of the site's module and keep
its step size beside it (``alpha``; a layer input's ``input_alpha``; their ``log_*`` forms,
stored as they are, read as ``alpha = exp(theta)``); export checks that
these variables hold exactly the tensors the site recorded, so nothing is taken from a
name alone. A kernel is stored as its codes ``round(clip(kernel / alpha, qn, qp))``
(``packing.weight_codes``: the quantizer's own float operations) packed at its bit width;
every other variable as it is (biases, step sizes, norms, batch statistics,
``quant_state``, kernels left float). The header also lists each quantized activation (a
layer's input, a ``QuantReLU``'s output): its step size, bits and signedness.

Loading and exactness
---------------------
:func:`brjax.export.npz.to_variables` puts ``codes * max(alpha, floor)``, in the kernel's
dtype, in place of
each quantized kernel: the very tensor the fake-quantizer made of the original kernel. The
same model quantizes it again as it runs, and ``(codes * alpha) / alpha`` rounds back to
``codes`` (two float roundings move it by at most ``2^-23 * |codes| <= 2^-16``, far from
a rounding boundary), so every quantized kernel, and everything computed from it, equals
the original's (bit for bit, except that a code 0 from a negative weight gives +0.0 where
the original had -0.0, equal in every sum). Run the same way (jit or not, same device),
the loaded variables give exactly the logits of the fake-quantized original variables.

Failures are loud, one line naming the path: a model that records no quantized kernel; a
kernel or step size that is not the variable beside its site (computed from other
variables, broadcast by a lifted transform); a step size that no site used (an ``nn.scan``
without ``"quant"`` in its ``variable_axes``, a layer the call skipped); non-finite
values; kernels that are not float32/float64; leaves that are not arrays.

The file format and loading are :mod:`brjax.export.npz`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
import os
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from brjax.export import packing
from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.quant import partitioning, sites, step_size
from brjax.training import checkpoint

FORMAT = "brjax.quantized"
VERSION = 1
PARAMS_PREFIX = {"linen": ("params",), "nnx": ()}
"""Where each framework's variables keep a layer's kernel and step sizes."""

_STEP_SIZE = {sites.WEIGHT: "alpha", sites.INPUT: "input_alpha", sites.OUTPUT: "alpha"}


@dataclasses.dataclass(frozen=True)
class QuantizedExport:
  """An exported quantized model in memory (codes unpacked).

  Attributes:
    header: the JSON header described in the module docstring.
    codes: ``{"/"-joined kernel path: int8 codes of the kernel's shape}``.
    floats: ``{"/"-joined path: array}``, every other variable.
  """
  header: dict[str, Any]
  codes: dict[str, np.ndarray]
  floats: dict[str, np.ndarray]


# ----------------------------------------------------------------------------- recording


def _weights_only(collection: Any) -> dict:
  """The ``"quant"`` collection without the values of input and output sites."""
  flat = traverse_util.flatten_dict(collection or {})
  return traverse_util.unflatten_dict({
      path: tuple(s if path[-1] == sites.WEIGHT else s.replace(values=None) for s in records)
      for path, records in flat.items()})


def record_linen(model: Any, variables: Mapping[str, Any], *inputs, **kwargs) -> dict:
  """The ``"quant"`` collection of ``model.apply(variables, *inputs, **kwargs)``, jitted.

  ``kwargs`` select the evaluation mode (e.g. ``train=False``). Activation sites come
  back without their values (export needs only their step sizes and ranges), so XLA
  drops most of the forward pass. Returns numpy leaves.
  """
  def run(variables, inputs):
    _, state = model.apply(variables, *inputs, mutable=[sites.COLLECTION], **kwargs)
    return _weights_only(state.get(sites.COLLECTION))

  return jax.device_get(jax.jit(run)(variables, inputs))


def _nnx_state(model: Any) -> tuple[Any, Any]:
  """``(flax.nnx, the model's state without rng state)``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx, nnx.state(model, nnx.Not(nnx.RngState))


def record_nnx(model: Any, *inputs, **kwargs) -> dict:
  """:func:`record_linen` for NNX: ``brjax.quant.nnx.record_sites`` on a copy, jitted."""
  from brjax.quant import nnx as brjax_nnx  # pylint: disable=g-import-not-at-top
  nnx, _ = _nnx_state(model)
  graphdef, state = nnx.split(model)

  def run(state, inputs):
    _, collection = brjax_nnx.record_sites(nnx.merge(graphdef, state), *inputs, **kwargs)
    return _weights_only(collection)

  return jax.device_get(jax.jit(run)(state, inputs))


def from_linen(model: Any, variables: Mapping[str, Any], *inputs, **kwargs
               ) -> QuantizedExport:
  """Exports a quantized Linen model (``quantize_model`` or brjax layers).

  ``variables``: every collection its ``init`` returned (``params``, ``quant_state``,
  ``batch_stats``, ...), e.g. trained; boxed parameters (``nn.with_partitioning``) are
  exported unboxed. ``*inputs, **kwargs``: one ``model.apply`` call in
  evaluation mode (``images, train=False``); one example will do: no exported value
  depends on the inputs. Raises ValueError for the failures of the module docstring.
  """
  if isinstance(variables, Mapping) and sites.COLLECTION in variables:
    raise ValueError(f"variables hold the {sites.COLLECTION!r} collection (recorded sites): "
                     "pass the model's variables without it")
  variables = partitioning.unbox(variables)
  return from_sites(variables, record_linen(model, variables, *inputs, **kwargs),
                    framework="linen")


def from_nnx(model: Any, *inputs, **kwargs) -> QuantizedExport:
  """Exports a quantized NNX model's state (without rng state); ``inputs``, ``kwargs``:
  one call of the model, in eval mode, as :func:`from_linen`."""
  nnx, state = _nnx_state(model)
  return from_sites(nnx.to_pure_dict(state), record_nnx(model, *inputs, **kwargs),
                    framework="nnx")


# -------------------------------------------------------------------------------- export


def _join(path) -> str:
  return "/".join(str(k) for k in path)


def _flatten(variables: Mapping[str, Any]) -> dict[tuple, np.ndarray]:
  """``{path: numpy array}`` of every leaf; raises, naming the path, for other leaves."""
  if not isinstance(variables, Mapping):
    raise TypeError(f"variables must be a dict of collections, not {type(variables).__name__}")
  flat, names = {}, {}
  for path, leaf in traverse_util.flatten_dict(dict(variables)).items():
    name = _join(path)
    if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in path):
      raise ValueError(f"{name}: a path with a key that is neither str nor int")
    try:
      value = np.asarray(leaf)
    except (TypeError, ValueError):  # e.g. a typed PRNG key array
      value = None
    if value is None or value.dtype == object:
      raise ValueError(f"{name}: a {type(leaf).__name__}, which export cannot store as an "
                       "array")
    if name in names:
      raise ValueError(f"{name}: two variables join to this name ({names[name]})")
    flat[path], names[name] = value, path
  return flat


def _variable(names: dict[str, tuple], prefix: tuple, module: str, name: str, kind: str
              ) -> tuple:
  joined = _join([*prefix, *([module] if module else []), name])
  if joined not in names:
    raise ValueError(f"{joined} is missing, but the {kind} site of {module or '<root>'} "
                     "keeps it there: these variables are not the recorded model's")
  return names[joined]


def _step_variable(names: dict[str, tuple], prefix: tuple, module: str, name: str,
                   kind: str) -> tuple:
  """The path of a site's step size: ``name``, or its ``log_*`` form (``step_size``)."""
  log = _join([*prefix, *([module] if module else []), step_size.param_name(name, "log")])
  return names[log] if log in names else _variable(names, prefix, module, name, kind)


def _check_recorded(name: str, value: np.ndarray, recorded: Any, what: str) -> None:
  if not np.all(np.isfinite(value)):
    raise ValueError(f"{name} holds non-finite values: the run diverged")
  recorded = np.asarray(recorded)
  if value.shape != recorded.shape or not np.array_equal(value, recorded):
    raise ValueError(f"{name} (shape {value.shape}) is not the {what} its site recorded "
                     f"(shape {recorded.shape}): computed from other variables, or broadcast "
                     "by a lifted transform, it cannot be packed")


def _bits(qn: int, qp: int, where: str) -> int:
  """The bit width whose range (signed if ``qn < 0``) is ``[qn, qp]``."""
  for bits in range(quant.MIN_BITS, quant.MAX_BITS + 1):
    if quant.qrange(bits, qn < 0) == (qn, qp):
      return bits
  raise ValueError(f"{where}: the range [{qn}, {qp}] is no brjax quantizer's")


def _kernel(flat: dict, names: dict, prefix: tuple, module: str, site: sites.Site,
            step: tuple) -> tuple[dict[str, Any], np.ndarray]:
  """The header entry and the codes of one ``"weight"`` site."""
  path = _variable(names, prefix, module, "kernel", sites.WEIGHT)
  kernel, name = flat[path], _join(path)
  if kernel.dtype not in (np.float32, np.float64):
    raise ValueError(f"{name} has dtype {kernel.dtype}: export packs float32 or float64 "
                     "kernels")
  _check_recorded(name, kernel, site.values, "kernel")
  qn = np.unique(np.asarray(site.qn))
  if qn.size != 1:
    raise ValueError(f"{name}: the layers of its stack have different ranges")
  qn, lead = int(qn[0]), kernel.ndim - site.ndim
  bits = _bits(qn, qn + site.levels - 1, name)
  try:
    alpha = packing.broadcastable_alpha(np.asarray(step_size.alpha_of(step, flat[step])),
                                        kernel.shape, lead)
  except ValueError as e:
    raise ValueError(f"{_join(step)}: {e}") from None
  entry = {"path": list(path), "module": module, "shape": list(kernel.shape),
           "dtype": kernel.dtype.name, "bits": bits, "qn": qn, "qp": qn + site.levels - 1,
           "packed_bits": packing.packed_bits(bits), "step_size": list(step),
           "stack_axes": lead}
  return entry, packing.weight_codes(kernel, alpha, bits)


def _activation(module: str, kind: str, step: tuple, records: list[sites.Site]
                ) -> dict[str, Any]:
  """The header entry of a quantized layer input or ``QuantReLU`` output."""
  qn, levels = np.asarray(records[-1].qn), records[-1].levels
  bits = _bits(int(qn.flat[0]), int(qn.flat[0]) + levels - 1, _join(step))
  return {"module": module, "kind": kind, "step_size": list(step), "bits": bits,
          "signed": (qn < 0).tolist(), "calls": len(records)}


def _nbytes(entry: Mapping[str, Any]) -> int:
  """Bytes of an entry's tensor in the data buffer: packed codes, or the float's own."""
  n = math.prod(entry["shape"])
  if "bits" in entry:
    return packing.packed_size(n, entry["bits"])
  return n * jnp.dtype(entry["dtype"]).itemsize


def _layout(entries: list[dict]) -> int:
  """Gives every entry its ``offset`` (multiples of 8); returns the buffer's size."""
  end = 0
  for entry in entries:
    entry["offset"] = end
    end += -(-_nbytes(entry) // 8) * 8
  return end


def from_sites(variables: Mapping[str, Any], collection: Any, *, framework: str = "linen",
               source: Mapping[str, Any] | None = None) -> QuantizedExport:
  """Exports ``variables`` given the ``"quant"`` collection that one pass recorded.

  Args:
    variables: the model's variables: Linen collections (boxed parameters are unboxed), or
      an NNX pure state dict.
    collection: its sites (:func:`record_linen`, :func:`record_nnx`).
    framework: ``"linen"`` (kernels under ``params``) or ``"nnx"``.
    source: provenance stored as ``header["source"]`` (JSON-able).

  Raises:
    ValueError: the loud failures of the module docstring.
  """
  if framework not in PARAMS_PREFIX:
    raise ValueError(f"framework={framework!r} is not accepted: use one of "
                     f"{sorted(PARAMS_PREFIX)}")
  prefix = PARAMS_PREFIX[framework]
  variables = partitioning.unbox(variables)
  flat = _flatten(variables)
  names = {_join(p): p for p in flat}
  kernels, codes, acts, used = [], {}, {}, set()
  for module, kind, site in sites.iterate(collection):
    step = _step_variable(names, prefix, module, _STEP_SIZE[kind], kind)
    _check_recorded(_join(step), np.asarray(step_size.alpha_of(step, flat[step])), site.alpha,
                    "step size")
    used.add(step)
    if kind == sites.WEIGHT:
      entry, kernel_codes = _kernel(flat, names, prefix, module, site, step)
      kernels.append(entry)
      codes[_join(entry["path"])] = kernel_codes
    else:
      acts.setdefault((module, kind, step), []).append(site)
  if not kernels:
    raise ValueError("the model recorded no quantized kernel (no 'weight' site): nothing "
                     "to pack (quantize it with brjax, and pass the inputs of one call)")
  unused = [p for p in flat if p[:len(prefix)] == prefix and quant.is_alpha_path(p)
            and p not in used]
  if unused:
    raise ValueError(f"{_join(unused[0])} is a step size that no recorded site used "
                     f"({len(unused)} in all): its layer did not run in the call, or runs "
                     f"in an nn.scan/nn.vmap without {sites.COLLECTION!r} in variable_axes")
  quantized = {tuple(k["path"]) for k in kernels}
  rest = {p: v for p, v in flat.items() if p not in quantized}
  floats = [{"path": list(p), "shape": list(v.shape), "dtype": v.dtype.name}
            for p, v in rest.items()]
  header = {
      "format": FORMAT, "version": VERSION, "framework": framework,
      "packing": packing.LAYOUT, "top_level": list(variables), "kernels": kernels,
      "floats": floats,
      "activations": [_activation(m, k, s, r) for (m, k, s), r in acts.items()],
      "data_bytes": _layout(kernels + floats),
      "float_bytes": sum(int(v.nbytes) for v in flat.values()), "source": dict(source or {})}
  return QuantizedExport(header, codes, {_join(p): v for p, v in rest.items()})


def export_run(workdir: str, *, prefer: str = "best") -> QuantizedExport:
  """Exports the best (else latest; or ``prefer="latest"``) checkpoint of a training run.

  Any ``scripts/train.py`` run with quantized weights: every model, per-channel step
  sizes, weight-only runs. ``header["source"]`` keeps the run's ``config`` and ``data``
  (class names, input normalization): the model that runs :func:`load_variables`' result
  is ``models.from_run_config(config, len(data["class_names"]), data["image_size"])``.

  Raises:
    ValueError: no checkpoint, a meta not written by ``brjax.training.train``, a float run.
  """
  variables, meta = checkpoint.restore_pretrained(workdir, prefer)
  config, data = meta.get("config") or {}, meta.get("data") or {}
  if "model" not in config:
    raise ValueError(f"the checkpoint meta in {workdir} has no config: it was not written "
                     "by brjax.training.train")
  if config.get("bits_w") == quant.FLOAT_BITS:
    raise ValueError(f"W{config['bits_w']}A{config.get('bits_a')}: the run's kernels are "
                     "float, there is nothing to pack")
  if "class_names" not in data:
    raise ValueError(f"the checkpoint meta in {workdir} lacks the run's class names: it was "
                     "written by an older brjax.training.train")
  size = data.get("image_size", 32)  # runs saved before it was recorded were CIFAR-size
  model = models.from_run_config(config, len(data["class_names"]), size)
  sample = np.zeros((1, size, size, 3), np.float32)  # no exported value depends on it
  source = {"workdir": os.path.abspath(workdir), "epoch": meta.get("epoch"),
            "best_test_acc": meta.get("best_test_acc"), "config": config, "data": data}
  return from_sites(variables, record_linen(model, variables, sample, train=False),
                    framework="linen", source=source)
