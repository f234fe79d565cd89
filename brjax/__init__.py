"""brjax: LSQ quantization-aware training with Bin Regularization, in JAX and Flax.

The flat API below is imported on first use (PEP 562), so that ``import brjax.history``,
``brjax.config`` or ``brjax.study`` (reading runs, planning studies) needs no JAX, while
``brjax.quantize_model``, ``from brjax import quant`` and the rest work as always.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the submodule that defines it.
_API = {
    "QuantConv": "quant", "QuantDense": "quant", "QuantReLU": "quant",
    "init_alphas": "quant", "lsq_quantize": "quant", "qrange": "quant",
    "quantize_model": "quantize", "QuantRule": "rules",
    "activation_br": "regularizer", "bin_regularization": "regularizer",
    "br_losses": "regularizer", "weight_br": "regularizer",
}
_SUBMODULES = ("optim", "quant", "regularizer", "sites")

__all__ = [*_SUBMODULES, *_API]

if TYPE_CHECKING:  # what static tools see: the eager imports the lazy ones stand for
  from brjax import optim, quant, regularizer, sites
  from brjax.quant import QuantConv, QuantDense, QuantReLU, init_alphas, lsq_quantize, qrange
  from brjax.quantize import quantize_model
  from brjax.regularizer import activation_br, bin_regularization, br_losses, weight_br
  from brjax.rules import QuantRule


def __getattr__(name: str):
  """Imports a name of the flat API, or any submodule (``brjax.train``), on first access."""
  if name in _API:
    value = getattr(importlib.import_module(f"brjax.{_API[name]}"), name)
    globals()[name] = value
    return value
  if not name.startswith("_") and importlib.util.find_spec(f"brjax.{name}") is not None:
    return importlib.import_module(f"brjax.{name}")
  raise AttributeError(f"module 'brjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
