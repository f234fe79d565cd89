"""brjax: LSQ quantization-aware training with Bin Regularization, in JAX and Flax."""

from brjax import quant
from brjax import regularizer
from brjax.quant import QuantConv, QuantDense, QuantReLU, init_alphas, lsq_quantize, qrange
from brjax.regularizer import activation_br, bin_regularization, br_losses, weight_br

__version__ = "0.1.0"
