"""Plain Flax models written the way third-party code is written: no brjax in them.

Hard-coded ``nn.Conv``/``nn.Dense``, functional ``nn.relu``/``nn.gelu``/``nn.relu6``,
``nn.MultiHeadDotProductAttention`` (``nn.DenseGeneral`` inside), ``nn.LayerNorm``,
depthwise convolutions and ``nn.scan`` over blocks: what ``brjax.quantize_model`` has to
reach without edits. Small by default (tests and benchmarks); the structure is that of the
Flax ImageNet example's ResNet, a ViT encoder and MobileNetV2's inverted residuals.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class ResNetBlock(nn.Module):
  """Basic residual block (Flax ImageNet example style)."""
  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    residual = x
    y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                         name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet with a hard-coded stem (conv, BN, functional ReLU, max-pool) and head."""
  stage_sizes: Sequence[int] = (1, 1)
  num_filters: int = 8
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.num_filters, (3, 3), use_bias=False, name="conv_init")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = ResNetBlock(self.num_filters * 2**i, strides=2 if i > 0 and j == 0 else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: self-attention (DenseGeneral q/k/v/out) and a gelu MLP."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_dim)(y)
    y = nn.gelu(y)
    y = nn.Dense(x.shape[-1])(y)
    return x + y


class _ScanBlock(nn.Module):
  """``EncoderBlock`` with the ``(carry, x) -> (carry, y)`` signature of ``nn.scan``."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, _):
    return EncoderBlock(self.num_heads, self.mlp_dim, name="block")(x), None


class ViT(nn.Module):
  """A small ViT: patch embedding conv, learned position embedding, encoder blocks, head.

  With ``scan``, the blocks are one ``nn.scan`` over stacked parameters, whose
  ``variable_axes`` lists the collections of ``scan_axes``: brjax's ``"quant"`` and
  ``"quant_state"`` beside ``"params"`` by default; a scan that lists only ``"params"``
  works as well (``quantize_model`` adds them, ``brjax.quant.lifted``).
  """
  patch: int = 4
  hidden: int = 32
  depth: int = 2
  num_heads: int = 2
  mlp_dim: int = 64
  num_classes: int = 10
  scan: bool = False
  scan_axes: tuple[str, ...] = ("params", "quant", "quant_state")

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = nn.Conv(self.hidden, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="embedding")(x)
    x = x.reshape(x.shape[0], -1, self.hidden)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    if self.scan:
      blocks = nn.scan(_ScanBlock, variable_axes={a: 0 for a in self.scan_axes},
                       split_rngs={"params": True}, length=self.depth)
      x, _ = blocks(self.num_heads, self.mlp_dim, name="encoder")(x, None)
    else:
      for i in range(self.depth):
        x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"encoder_{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=1))


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand, ReLU6, 3x3 depthwise, ReLU6, 1x1 linear projection."""
  filters: int
  expansion: int = 6
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    channels = x.shape[-1]
    hidden = channels * self.expansion
    y = nn.relu6(norm()(nn.Conv(hidden, (1, 1), use_bias=False)(x)))
    y = nn.Conv(hidden, (3, 3), self.strides, feature_group_count=hidden, use_bias=False,
                name="depthwise")(y)
    y = nn.relu6(norm()(y))
    y = norm()(nn.Conv(self.filters, (1, 1), use_bias=False, name="project")(y))
    if self.strides == 1 and channels == self.filters:
      y = x + y  # linear bottleneck: no activation after the residual add
    return y


class MobileNetV2(nn.Module):
  """A small MobileNetV2: stem conv, inverted residual blocks, 1x1 conv, pooled head."""
  blocks: Sequence[tuple[int, int]] = ((8, 1), (8, 1), (16, 2))  # (filters, strides)
  stem: int = 8
  last: int = 32
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = nn.relu6(norm()(nn.Conv(self.stem, (3, 3), use_bias=False, name="stem")(x)))
    for filters, strides in self.blocks:
      x = InvertedResidual(filters, strides=strides)(x, train)
    x = nn.relu6(norm()(nn.Conv(self.last, (1, 1), use_bias=False, name="conv_last")(x)))
    return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


def count_params(params) -> int:
  """The number of parameters in a params tree."""
  return sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))
