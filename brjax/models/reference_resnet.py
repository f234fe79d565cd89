"""The reference package's CIFAR ResNet-18, layer for layer, and PyTorch's BatchNorm.

The PyTorch package brjax reimplements trains torchvision's ResNet-18 adapted to CIFAR:

* stem ``conv1`` 3x3 stride 1 padding 1 (no bias), ``bn1``, ``relu``; no max-pool;
* ``layer1`` .. ``layer4``, two ``BasicBlock`` each, ``width * (1, 2, 4, 8)`` channels,
  strides ``(1, 2, 2, 2)``; every 3x3 conv pads 1 pixel on *both* sides (also at stride 2,
  where Flax's ``"SAME"`` would pad ``(0, 1)``); ``downsample`` = 1x1 stride-2 conv + BN
  where the shape changes;
* global average pool, ``fc`` (with bias).

Its ``BasicBlock`` holds **one** ``relu`` module that ``forward`` calls twice: after ``bn1``
and after the residual add. Quantized, the two calls share one activation quantizer (one
step size, initialized by the first call), and activation BR, which reads the module's
last input, sees only the post-add call. :class:`ReferenceBasicBlock` does the same with
one ``QuantReLU(keep_last_call=True)`` instance called twice: 9 activation step sizes in
ResNet-18 (stem + 8 blocks), not 17.

Module names follow the PyTorch ``state_dict`` with ``.<digit>`` joined by ``_``
(``layer2.0.downsample.1`` -> ``layer2_0/downsample_1``), so that
``brjax.export.torch_import`` is a mapping of names, not a translation of structure.

BatchNorm is PyTorch's (:class:`TorchBatchNorm`): momentum 0.1, eps 1e-5, normalization
with the biased batch variance, running variance updated with the *unbiased* one.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brjax.quant import lsq as quant

ModuleDef = Any

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs;
# nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and the bias.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

TORCH_BN_MOMENTUM = 0.1
TORCH_BN_EPSILON = 1e-5


class TorchBatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` semantics over the last axis (features), NHWC input.

  Training (``use_running_average=False``), with ``n`` the elements per feature:

      mean = mean(x),  var = mean((x - mean)^2)             (biased: used to normalize)
      y = (x - mean) / sqrt(var + eps) * scale + bias
      running_mean <- (1 - momentum) * running_mean + momentum * mean
      running_var  <- (1 - momentum) * running_var + momentum * var * n / (n - 1)

  Eval: the running statistics normalize. Unlike ``flax.linen.BatchNorm`` (biased running
  variance, ``momentum`` the decay), this matches a PyTorch checkpoint's buffers step for
  step. Variables: ``params/{scale, bias}``, ``batch_stats/{mean, var}`` (Flax's names).
  The statistics are computed in at least float32; no update while initializing.
  """
  use_running_average: bool | None = None
  momentum: float = TORCH_BN_MOMENTUM
  epsilon: float = TORCH_BN_EPSILON
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    features = x.shape[-1]
    stat_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    running_mean = self.variable("batch_stats", "mean",
                                 lambda: jnp.zeros((features,), stat_dtype))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), stat_dtype))
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      mean = jnp.mean(xs, axes)
      var = jnp.mean(jnp.square(xs - mean), axes)
      if not self.is_initializing():
        n = x.size // features
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        running_mean.value = (1.0 - m) * running_mean.value + m * mean
        running_var.value = (1.0 - m) * running_var.value + m * unbiased
    dtype = self.dtype or jnp.result_type(x, scale)
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (x.astype(mul.dtype) - mean) * mul + bias
    return y.astype(dtype)


class ReferenceBasicBlock(nn.Module):
  """The reference ``BasicBlock``: one ``relu`` module called after ``bn1`` and after the add.

  ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, ``shortcut`` the identity or
  ``downsample_1(downsample_0(x))`` (1x1 conv with ``strides``, then BN).
  """
  planes: int
  conv: ModuleDef
  norm: ModuleDef
  act: ModuleDef
  strides: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    relu = self.act(name="relu")  # one module, two calls: one step size
    pad = ((1, 1), (1, 1))
    out = self.conv(self.planes, (3, 3), self.strides, padding=pad, name="conv1")(x)
    out = relu(self.norm(name="bn1")(out))
    out = self.conv(self.planes, (3, 3), 1, padding=pad, name="conv2")(out)
    out = self.norm(name="bn2")(out)
    identity = x
    if self.downsample:
      identity = self.conv(self.planes, (1, 1), self.strides, padding="VALID",
                           name="downsample_0")(x)
      identity = self.norm(name="downsample_1")(identity)
    return relu(out + identity)


class ReferenceResNet18(nn.Module):
  """The reference package's CIFAR ResNet-18 (torchvision layout, 3x3 stem, no max-pool).

  Input: float images ``(B, 32, 32, 3)`` (NHWC); output: logits ``(B, num_classes)`` in
  at least float32 (float64 stays float64).

  Attributes:
    width: channels of ``layer1`` (64 = the reference; the stages have ``width * (1, 2, 4,
      8)``).
    conv, dense, act: the layer types (e.g. ``brjax.quant.lsq`` layers with their bit widths);
      ``act`` is called as ``act(name=...)`` and its instances are called twice per block.
    param_dtype: dtype of the parameters and BatchNorm statistics.
  """
  width: int = 64
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  conv: ModuleDef = nn.Conv
  dense: ModuleDef = nn.Dense
  act: ModuleDef = quant.QuantReLU
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(self.conv, use_bias=False, kernel_init=CONV_INIT,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(TorchBatchNorm, use_running_average=not train, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    x = conv(self.width, (3, 3), 1, padding=((1, 1), (1, 1)), name="conv1")(x)
    x = norm(name="bn1")(x)
    x = self.act(name="relu")(x)
    inplanes = self.width
    for i, blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**i
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = ReferenceBasicBlock(planes, conv=conv, norm=norm, act=self.act, strides=strides,
                                downsample=j == 0 and (strides != 1 or inplanes != planes),
                                name=f"layer{i + 1}_{j}")(x)
        inplanes = planes
    x = jnp.mean(x, axis=(1, 2))
    bound = 1.0 / math.sqrt(x.shape[-1])
    x = self.dense(self.num_classes, kernel_init=DENSE_INIT,
                   bias_init=lambda key, shape, dtype: jax.random.uniform(
                       key, shape, dtype, -bound, bound),
                   dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
