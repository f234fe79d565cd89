"""brjax: LSQ quantization-aware training with Bin Regularization, in JAX and Flax.

The package's parts are its subpackages: :mod:`brjax.quant` (the quantization core),
:mod:`brjax.models`, :mod:`brjax.data`, :mod:`brjax.training`, :mod:`brjax.export`,
:mod:`brjax.studies` and :mod:`brjax.bench`; :mod:`brjax.nnx` is the NNX entry point.

The flat API below is imported on first use (PEP 562), so that ``import
brjax.training.history``, ``brjax.training.config`` or ``brjax.studies.study`` (reading
runs, planning studies) needs no JAX, while ``brjax.quantize_model``, ``from brjax import
quant`` and the rest work as always. The module paths of brjax 0.1 (``brjax.train``,
``brjax.optim``, ...) still import, with a ``DeprecationWarning`` (:mod:`brjax._deprecated`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from brjax import _deprecated

__version__ = "0.2.0.dev0"

# name -> the module that defines it.
_API = {
    "QuantConv": "quant.lsq", "QuantDense": "quant.lsq", "QuantReLU": "quant.lsq",
    "init_alphas": "quant.lsq", "lsq_quantize": "quant.lsq", "qrange": "quant.bits",
    "quantize_model": "quant.quantize", "QuantRule": "quant.rules",
    "activation_br": "quant.regularizer", "bin_regularization": "quant.regularizer",
    "br_losses": "quant.regularizer", "weight_br": "quant.regularizer",
}
_SUBPACKAGES = ("bench", "data", "export", "models", "nnx", "quant", "studies", "training")

__all__ = [*_SUBPACKAGES, *_API]

if TYPE_CHECKING:  # what static tools see: the eager imports the lazy ones stand for
  from brjax import bench, data, export, models, nnx, quant, studies, training
  from brjax.quant.bits import qrange
  from brjax.quant.lsq import QuantConv, QuantDense, QuantReLU, init_alphas, lsq_quantize
  from brjax.quant.quantize import quantize_model
  from brjax.quant.regularizer import activation_br, bin_regularization, br_losses, weight_br
  from brjax.quant.rules import QuantRule

_deprecated.install()


def __getattr__(name: str):
  """Imports a name of the flat API, or any subpackage (``brjax.training``), on first access."""
  if name in _API:
    value = getattr(importlib.import_module(f"brjax.{_API[name]}"), name)
    globals()[name] = value
    return value
  if f"brjax.{name}" in _deprecated.MOVED:  # warns once, then the attribute is set
    value = globals()[name] = importlib.import_module(_deprecated.warn_moved(f"brjax.{name}"))
    return value
  if not name.startswith("_") and importlib.util.find_spec(f"brjax.{name}") is not None:
    return importlib.import_module(f"brjax.{name}")
  raise AttributeError(f"module 'brjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
