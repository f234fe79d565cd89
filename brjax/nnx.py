"""brjax for Flax NNX: quantize an unmodified ``nnx.Module`` in place, by rules.

The public entry point of :mod:`brjax.quant.nnx` (see there for what is quantized and how);
``brjax.quantize_model(nnx_model, rules, *sample_inputs)`` reaches the same function.
"""

from brjax.quant.nnx import (
                             QUANTIZABLE,
                             QuantRule,
                             QuantState,
                             check_rules,
                             first_match,
                             quantize_nnx,
                             quantized_layers,
                             record_sites,
)

__all__ = ["QUANTIZABLE", "QuantRule", "QuantState", "check_rules", "first_match", "quantize_nnx",
           "quantized_layers", "record_sites"]
