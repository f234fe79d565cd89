"""Export and deployment: a trained quantized model out of brjax.

* :mod:`brjax.export.packed`: any brjax-quantized Flax model (Linen or NNX) as packed
  integer kernels and its float rest; :mod:`brjax.export.npz`: its file, and the
  variables it gives back. Their names are exported here (``brjax.export.from_linen``,
  ``brjax.export.save``, ...).
* :mod:`brjax.export.packing`: integer codes packed at their bit width.
* :mod:`brjax.export.integer`, :mod:`brjax.export.integer_inference`: a CIFAR ResNet
  with folded BatchNorm, and its integer-arithmetic inference.
* :mod:`brjax.export.onnx_export` (``brjax.export.to_onnx``): any brjax-quantized model as
  ONNX (QDQ, integer kernels) for onnxruntime; :mod:`brjax.export.onnx_check`,
  :mod:`brjax.export.onnx_run`: checked in onnxruntime against brjax.
* :mod:`brjax.export.torch_import`: the reference package's PyTorch checkpoints, in and out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brjax import _lazy

_EXPORTS = {
    **dict.fromkeys(("FORMAT", "PARAMS_PREFIX", "QuantizedExport", "VERSION", "export_run",
                     "from_linen", "from_nnx", "from_sites", "record_linen", "record_nnx"),
                    "packed"),
    **dict.fromkeys(("load", "load_variables", "save", "to_variables", "update_nnx"), "npz"),
    "to_onnx": "onnx_export",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see: the eager imports the lazy ones stand for
  from brjax.export.npz import load, load_variables, save, to_variables, update_nnx
  from brjax.export.onnx_export import to_onnx
  from brjax.export.packed import (
    FORMAT,
    PARAMS_PREFIX,
    VERSION,
    QuantizedExport,
    export_run,
    from_linen,
    from_nnx,
    from_sites,
    record_linen,
    record_nnx,
  )
