"""NNX views (``nnx.view``) of quantized models.

``nnx.view(model, ...)`` copies the module objects and shares their variables. A view made
*after* ``quantize_model`` copies the quantized layers: it is quantized, and trains and
records the same step sizes as the model. A view made *before* it (or the base model of a
quantized view) holds plain layers whose kernels a quantized layer also holds: calling it
runs float. :func:`checked_paths` (``record_sites``) refuses such a model, and a model with
no quantized layer at all, instead of returning no sites.
"""

from __future__ import annotations

from typing import Any
import weakref

from flax import nnx

_KERNELS: dict[int, weakref.ref] = {}  # id(kernel Variable) -> its quantized layer (weak)


def register(model: nnx.Module, quantized: type) -> nnx.Module:
  """Remembers the kernels of ``model``'s quantized layers; returns ``model``."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, quantized) and isinstance(getattr(module, "kernel", None),
                                                    nnx.Variable):
      _KERNELS[id(module.kernel)] = weakref.ref(module)
  for key in [k for k, ref in _KERNELS.items() if ref() is None]:
    del _KERNELS[key]
  return model


def _quantized_elsewhere(variable: nnx.Variable) -> bool:
  ref = _KERNELS.get(id(variable))
  layer = ref() if ref is not None else None
  return layer is not None and getattr(layer, "kernel", None) is variable


def checked_paths(model: nnx.Module, quantized: type) -> dict[int, Any]:
  """``{id(module): path}`` of ``model``'s quantized layers, after checking that it has some
  and that no plain layer of it shares a kernel with a quantized one."""
  paths, stale = {}, []
  for parts, module in nnx.iter_modules(model):
    if isinstance(module, quantized):
      paths[id(module)] = parts
    elif (isinstance(getattr(module, "kernel", None), nnx.Variable)
          and _quantized_elsewhere(module.kernel)):
      stale.append("/".join(map(str, parts)) or "<root>")
  if stale:
    raise ValueError(
        f"record_sites: {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''} share(s) "
        "its kernel with a quantized layer but is not quantized: the model is an nnx.view "
        "made before brjax.quantize_model, or the base model of a quantized view; quantize "
        "the base model, then make every view from it")
  if not paths:
    raise ValueError(f"record_sites: the {type(model).__name__} has no quantized layer, so "
                     "it records no site: quantize it first with brjax.quantize_model(model, "
                     "rules, sample_batch)")
  return paths
