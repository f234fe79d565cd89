"""Export and deployment: a trained quantized model out of brjax.

* :mod:`brjax.export.packed`: any brjax-quantized Flax model (Linen or NNX) as packed
  integer kernels and its float rest (``export``'s names are re-exported here).
* :mod:`brjax.export.packing`: integer codes packed at their bit width.
* :mod:`brjax.export.integer`, :mod:`brjax.export.integer_inference`: a CIFAR ResNet
  with folded BatchNorm, and its integer-arithmetic inference.
* :mod:`brjax.export.torch_import`: the reference package's PyTorch checkpoints, in and out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brjax import _lazy

_EXPORTS = {
    **dict.fromkeys(("FORMAT", "PARAMS_PREFIX", "QuantizedExport", "VERSION", "export_run",
                     "from_linen", "from_nnx", "from_sites", "load", "load_variables",
                     "record_linen", "record_nnx", "save", "to_variables", "update_nnx",),
                     "packed"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see: the eager imports the lazy ones stand for
  from brjax.export.packed import (FORMAT, PARAMS_PREFIX, QuantizedExport, VERSION, export_run,
                                   from_linen, from_nnx, from_sites, load, load_variables,
                                   record_linen, record_nnx, save, to_variables, update_nnx)
