"""brjax: LSQ quantization-aware training with Bin Regularization, in JAX and Flax."""

from brjax import optim
from brjax import quant
from brjax import regularizer
from brjax import sites
from brjax.quant import QuantConv, QuantDense, QuantReLU, init_alphas, lsq_quantize, qrange
from brjax.quantize import quantize_model
from brjax.regularizer import activation_br, bin_regularization, br_losses, weight_br
from brjax.rules import QuantRule

__version__ = "0.1.0"
