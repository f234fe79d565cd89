"""The quantization core: LSQ fake-quantization and what is built on it.

* :mod:`brjax.quant.lsq`: ``lsq_quantize`` (LSQ, Esser et al., ICLR 2020, with a
  straight-through ``jax.custom_vjp``) and the Flax layers ``QuantConv``, ``QuantDense``,
  ``QuantReLU`` that users compose into their models; ``init_alphas``.
* :mod:`brjax.quant.bits`: bit widths and integer ranges (plain Python).
* :mod:`brjax.quant.rules`, :mod:`brjax.quant.quantize`, :mod:`brjax.quant.nnx`:
  ``quantize_model`` of an unmodified Linen or NNX model, by rules on module paths.
* :mod:`brjax.quant.intercept`, :mod:`brjax.quant.passes`, :mod:`brjax.quant.lifted`,
  :mod:`brjax.quant.coverage`, :mod:`brjax.quant.names`: what ``quantize_model`` reaches
  beyond the layer types (any module's products with its parameters, lifted transforms)
  and what it left float; :mod:`brjax.quant.views`: NNX views; :mod:`brjax.quant.nnx_stacks`:
  NNX layers in ``nnx.scan``/``nnx.vmap`` stacks and under ``nnx.remat``;
  :mod:`brjax.quant.nnx_coverage`: the products of parameters an NNX model left float.
* :mod:`brjax.quant.partitioning`: step sizes of boxed (partitioned) parameters, sharded
  as their kernels; the readers that unbox.
* :mod:`brjax.quant.sites`: what each quantizer records (no hooks).
* :mod:`brjax.quant.calibration`: what LSQ's init decides from the init batch, and the
  batches it cannot decide on (all zero, constant, negative at an unsigned input).
* :mod:`brjax.quant.regularizer`: Bin Regularization (Han et al., ICCV 2021).
* :mod:`brjax.quant.metrics`: how well tensors sit on their grids.

The names below are imported on first use, so that ``brjax.quant.bits`` needs no JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brjax import _lazy

_EXPORTS = {
    **dict.fromkeys(("FLOAT_BITS", "MAX_BITS", "MIN_BITS", "qrange"), "bits"),
    **dict.fromkeys(("DegenerateInitWarning",), "calibration"),
    **dict.fromkeys(("FloatOp", "left_float"), "coverage"),
    **dict.fromkeys(("QuantConv", "QuantDense", "QuantReLU", "STATE", "STEP_SIZE_NAMES",
                     "check_layer_bits", "grad_scale", "init_alpha", "init_alphas",
                     "input_range", "is_alpha_path", "is_weight_alpha_path", "lsq_quantize",
                     "quantize_input", "quantize_kernel", "safe_alpha"), "lsq"),
    **dict.fromkeys(("box_step_sizes",), "partitioning"),
    **dict.fromkeys(("quantize_model",), "quantize"),
    **dict.fromkeys(("activation_br", "bin_regularization", "br_losses", "weight_br"),
                    "regularizer"),
    **dict.fromkeys(("QuantRule",), "rules"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see: the eager imports the lazy ones stand for
  from brjax.quant.bits import FLOAT_BITS, MAX_BITS, MIN_BITS, qrange
  from brjax.quant.calibration import DegenerateInitWarning
  from brjax.quant.coverage import FloatOp, left_float
  from brjax.quant.lsq import (
    STATE,
    STEP_SIZE_NAMES,
    QuantConv,
    QuantDense,
    QuantReLU,
    check_layer_bits,
    grad_scale,
    init_alpha,
    init_alphas,
    input_range,
    is_alpha_path,
    is_weight_alpha_path,
    lsq_quantize,
    quantize_input,
    quantize_kernel,
    safe_alpha,
  )
  from brjax.quant.partitioning import box_step_sizes
  from brjax.quant.quantize import quantize_model
  from brjax.quant.regularizer import activation_br, bin_regularization, br_losses, weight_br
  from brjax.quant.rules import QuantRule
