"""CIFAR ResNets whose convolution, dense and activation layers are module fields.

Pass ``brjax.quant`` layers (see :func:`create_model`) and every convolution, including the
stem, every ReLU, including the first, and the final dense layer are quantized; BatchNorm
stays float.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from brjax import quant

ModuleDef = Any
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (He et al., 2016)."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act()(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act()(residual + y)


class CifarResNet(nn.Module):
  """ResNet for 32x32 images: a 3x3 stem (no max-pool), stages of basic blocks.

  Input: float images ``(B, H, W, C)``; output: float32 logits ``(B, num_classes)``.
  """
  stage_sizes: Sequence[int]
  stage_filters: Sequence[int]
  num_classes: int = 10
  conv: ModuleDef = nn.Conv
  dense: ModuleDef = nn.Dense
  act: ModuleDef = quant.QuantReLU
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype, padding="SAME",
                             kernel_init=nn.initializers.kaiming_normal())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=self.dtype)
    x = conv(self.stage_filters[0], (3, 3), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = self.act(name="act_init")(x)
    for i, (blocks, filters) in enumerate(zip(self.stage_sizes, self.stage_filters)):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(filters, conv=conv, norm=norm, act=self.act, strides=strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = self.dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, jnp.float32)


ResNet20 = functools.partial(CifarResNet, stage_sizes=(3, 3, 3), stage_filters=(16, 32, 64))
ResNet18 = functools.partial(CifarResNet, stage_sizes=(2, 2, 2, 2),
                             stage_filters=(64, 128, 256, 512))

MODELS: dict[str, Callable[..., CifarResNet]] = {"resnet20": ResNet20, "resnet18": ResNet18}


def create_model(name: str, *, bits_w: int = 32, bits_a: int = 32, clip: float | None = None,
                 num_classes: int = 10, dtype: Any = jnp.float32) -> CifarResNet:
  """A CIFAR ResNet with ``bits_w``-bit weights and ``bits_a``-bit activations.

  Args:
    name: ``"resnet20"`` or ``"resnet18"``.
    bits_w: weight bit width of every conv and the dense layer (2..8, 32 = float).
    bits_a: activation bit width of every ReLU (2..8, 32 = float).
    clip: optional ReLU clip value (6.0 gives ReLU6).
    num_classes: size of the output.
    dtype: computation dtype (parameters stay float32).
  """
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not supported: use one of {sorted(MODELS)}")
  quant.check_layer_bits(bits_w)
  quant.check_layer_bits(bits_a)
  return MODELS[name](
      num_classes=num_classes,
      conv=functools.partial(quant.QuantConv, bits=bits_w),
      dense=functools.partial(quant.QuantDense, bits=bits_w),
      act=functools.partial(quant.QuantReLU, bits=bits_a, clip=clip),
      dtype=dtype)
