"""The papers' ImageNet models, in plain Flax, and the rules that quantize them.

LSQ (Esser et al., 2020) reports ResNet-18/34/50/101/152 on ImageNet; Bin Regularization (Han
et al., 2021) reports MobileNetV2/V3 and ResNet-18 there. This module holds

* :class:`ResNet` (``ResNet18``, ``ResNet50``): He et al.'s ImageNet layout (7x7/2 stem,
  3x3/2 max-pool, basic or bottleneck blocks with the stride on the 3x3 convolution, "v1.5",
  as torchvision; 1x1 projection shortcuts where the shape changes; BatchNorm scales start
  at 1, torchvision's default, not at 0 for the last BN of a block);
* :class:`MobileNetV2`: Sandler et al.'s network (width multiplier 1.0: a 32-channel stem,
  17 inverted residuals, a 1280-channel 1x1 convolution, a linear classifier);

written as third-party Flax code is (``nn.Conv``, ``nn.Dense``, functional ReLU/ReLU6, no
brjax inside), with parameter counts equal to the published ones (ResNet-18 11,689,512,
ResNet-50 25,557,032, MobileNetV2 3,504,872 at 1000 classes). ``small_inputs=True`` adapts
them to 32x32 images as CIFAR papers do (a stride-1 3x3 stem and no max-pool; MobileNetV2 with
a stride-1 stem and a stride-1 second stage). They are quantized through the general path,
``brjax.quantize_model(model, paper_rules(name, bits_w, bits_a))``: see :func:`paper_rules`.

Not included: MobileNetV2's dropout before the classifier (the training step passes no
dropout rng), MobileNetV3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brjax.quant.bits import FLOAT_BITS
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule

# PyTorch's BatchNorm defaults (momentum 0.1 = Flax 0.9, epsilon 1e-5), as the published
# models use.
_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions and a residual (ResNet-18/34)."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(_norm, use_running_average=not train, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = nn.relu(norm(name="bn1")(conv(self.filters, (3, 3), self.strides, name="conv1")(x)))
    y = norm(name="bn2")(conv(self.filters, (3, 3), name="conv2")(y))
    return nn.relu(_shortcut(x, y, self.strides, norm, conv) + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, and a residual (ResNet-50+)."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(_norm, use_running_average=not train, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = nn.relu(norm(name="bn1")(conv(self.filters, (1, 1), name="conv1")(x)))
    y = nn.relu(norm(name="bn2")(conv(self.filters, (3, 3), self.strides, name="conv2")(y)))
    y = norm(name="bn3")(conv(self.filters * 4, (1, 1), name="conv3")(y))
    return nn.relu(_shortcut(x, y, self.strides, norm, conv) + y)


def _maybe_remat(block: Any, remat: bool) -> Any:
  """``nn.remat(block)`` (activations recomputed in the backward pass instead of kept: less
  memory, about one more forward pass of time) when ``remat``; ``train`` is static."""
  return nn.remat(block, static_argnums=(2,)) if remat else block


def _shortcut(x: jax.Array, y: jax.Array, strides: int, norm: Callable,
              conv: Callable) -> jax.Array:
  """The identity, or a strided 1x1 projection + BN where the shape changes."""
  if x.shape == y.shape:
    return x
  return norm(name="norm_proj")(conv(y.shape[-1], (1, 1), strides, name="conv_proj")(x))


class ResNet(nn.Module):
  """ResNet (ImageNet layout). Input ``(B, H, W, 3)`` floats; output float32 logits.

  Module paths: ``conv_init``/``bn_init``, ``stage{i}_block{j}/conv{1,2,3}`` (and
  ``conv_proj``), ``head``.
  """
  stage_sizes: Sequence[int]
  block: Any = BasicBlock
  num_classes: int = 1000
  small_inputs: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    block = _maybe_remat(self.block, self.remat)
    if self.small_inputs:
      x = nn.Conv(64, (3, 3), use_bias=False, dtype=self.dtype, name="conv_init")(x)
    else:
      x = nn.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype,
                  name="conv_init")(x)
    x = nn.relu(_norm(use_running_average=not train, dtype=self.dtype, name="bn_init")(x))
    if not self.small_inputs:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = block(64 * 2**i, strides=2 if i > 0 and j == 0 else 1, dtype=self.dtype,
                  name=f"stage{i + 1}_block{j + 1}")(x, train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(x, axis=(1, 2)))
    return jnp.asarray(x, jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)


def _make_divisible(value: float, divisor: int = 8) -> int:
  """MobileNet's channel rounding: to a multiple of ``divisor``, never 10% below ``value``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
  """1x1 expansion (omitted when ``expansion == 1``), ReLU6, 3x3 depthwise, ReLU6, 1x1 linear
  projection, and the residual when the shape is kept (no activation after the add)."""
  filters: int
  expansion: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(_norm, use_running_average=not train, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = nn.relu6(norm(name="bn_expand")(conv(hidden, (1, 1), name="expand")(y)))
    y = conv(hidden, (3, 3), self.strides, padding=((1, 1), (1, 1)), feature_group_count=hidden,
             name="depthwise")(y)
    y = nn.relu6(norm(name="bn_depthwise")(y))
    y = norm(name="bn_project")(conv(self.filters, (1, 1), name="project")(y))
    return x + y if self.strides == 1 and x.shape == y.shape else y


# (expansion t, channels c, repeats n, first stride s), Sandler et al., Table 2.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
  """MobileNetV2. Input ``(B, H, W, 3)`` floats; output float32 logits.

  Module paths: ``stem``, ``block{k}/{expand,depthwise,project}`` (k = 1..17; block 1 has no
  ``expand``), ``conv_last``, ``classifier``. ``stages``: ``(t, c, n, s)`` rows (default
  the paper's; fewer for tests).
  """
  num_classes: int = 1000
  width: float = 1.0
  small_inputs: bool = False
  dtype: Any = jnp.float32
  stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    norm = functools.partial(_norm, use_running_average=not train, dtype=self.dtype)
    block = _maybe_remat(InvertedResidual, self.remat)
    x = nn.Conv(_make_divisible(32 * self.width), (3, 3), 1 if self.small_inputs else 2,
                padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype, name="stem")(x)
    x = nn.relu6(norm(name="bn_stem")(x))
    k = 0
    for stage, (t, c, n, s) in enumerate(self.stages):
      if self.small_inputs and stage == 1:
        s = 1  # 32x32 inputs: keep 4x4 maps at the end, as CIFAR versions do
      for i in range(n):
        k += 1
        x = block(_make_divisible(c * self.width), t, s if i == 0 else 1, dtype=self.dtype,
                  name=f"block{k}")(x, train)
    last = _make_divisible(1280 * max(1.0, self.width))
    x = nn.Conv(last, (1, 1), use_bias=False, dtype=self.dtype, name="conv_last")(x)
    x = nn.relu6(norm(name="bn_last")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(jnp.mean(x, axis=(1, 2)))
    return jnp.asarray(x, jnp.float32)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_imagenet": ResNet18, "resnet50": ResNet50, "mobilenet_v2": MobileNetV2}
"""The papers' models by name (``--model`` values of ``scripts/train.py``)."""

FIRST_LAST_BITS = 8

ACT_SIGNS = ("architecture", "data")
"""How :func:`paper_rules` sets the sign of each quantized input: fixed by the architecture
(what precedes it), or decided from the init batch (``QuantRule(act_signed=None)``)."""


def paper_rules(name: str, bits_w: int, bits_a: int, *,
                first_last_bits: int | None = FIRST_LAST_BITS, per_channel: bool = False,
                act_batch_grad_scale: bool = False, alpha_param: str = "linear",
                act_signs: str = "architecture") -> tuple[QuantRule, ...]:
  """The quantization of the LSQ / BR papers for one of :data:`MODELS`.

  * every convolution's and dense layer's kernel at ``bits_w`` bits (signed), and its input
    at ``bits_a`` bits; the first layer (its input: the normalized image) and the last one
    (the classifier) at ``first_last_bits`` (8, as both papers; 32: float; None: like
    the others);
  * input signs fixed by the architecture, not decided from data: unsigned after a
    ReLU/ReLU6, signed for the image and for MobileNetV2's linear-bottleneck outputs (the
    inputs of ``expand`` and ``conv_last``); with ``act_signs="data"``, every input's sign
    is decided from the init batch instead (``act_signed=None``: signed iff the batch
    holds a negative value there), and kept in the ``"quant_state"`` collection;
  * MobileNetV2's depthwise kernels with one step size per channel (the usual choice at
    2-4 bits: their channels have very different ranges); every kernel with
    ``per_channel``;
  * ``bits_w`` or ``bits_a`` of 32 (``FLOAT_BITS``) keeps every kernel or input float.

  ``act_batch_grad_scale``, ``alpha_param``: see :class:`QuantRule`.

  Raises:
    ValueError: for an unknown ``name`` or ``act_signs``; bits are checked by
      :class:`QuantRule`.
  """
  if name not in MODELS:
    raise ValueError(f"model={name!r} has no paper rules: use one of {sorted(MODELS)}")
  if act_signs not in ACT_SIGNS:
    raise ValueError(f"act_signs={act_signs!r} is not accepted: use one of {ACT_SIGNS}")
  w = None if bits_w == FLOAT_BITS else bits_w
  a = None if bits_a == FLOAT_BITS else bits_a
  if first_last_bits is None:  # like the other layers
    edge_w, edge_a = w, a
  elif first_last_bits == FLOAT_BITS:
    edge_w = edge_a = None
  else:  # a float side stays float
    edge_w, edge_a = w and first_last_bits, a and first_last_bits
  edge = dict(weight_bits=edge_w, act_bits=edge_a,
              per_channel=per_channel and w is not None,  # per_channel: a kernel's step sizes
              act_batch_grad_scale=act_batch_grad_scale, alpha_param=alpha_param)
  first = "stem" if name == "mobilenet_v2" else "conv_init"
  last = "classifier" if name == "mobilenet_v2" else "head"
  rules = [QuantRule(first, act_signed=True, **edge), QuantRule(last, act_signed=False, **edge)]
  body = dict(edge, weight_bits=w, act_bits=a)
  if name == "mobilenet_v2":
    rules += [QuantRule(r"block\d+/depthwise", act_signed=False,
                        **dict(body, per_channel=w is not None)),
              QuantRule(r"block\d+/expand|conv_last", act_signed=True, **body)]
  rules.append(QuantRule(".*", act_signed=False, **body))
  if act_signs == "data":
    return tuple(dataclasses.replace(rule, act_signed=None) for rule in rules)
  return tuple(rules)


SMALL_INPUTS = 64
"""Images of at most this side get the ``small_inputs`` variant of a model."""


def create_model(name: str, *, bits_w: int, bits_a: int, num_classes: int, image_size: int,
                 per_channel: bool = False, act_batch_grad_scale: bool = False,
                 dtype: Any = jnp.float32, remat: bool = False,
                 alpha_param: str = "linear",
                 first_last_bits: int | None = FIRST_LAST_BITS,
                 act_signs: str = "architecture") -> nn.Module:
  """One of :data:`MODELS`, quantized by :func:`paper_rules` (plain Flax when float).

  ``image_size``: the side of the input images; at most :data:`SMALL_INPUTS` (CIFAR) gives
  the ``small_inputs`` variant. ``remat``: recompute each block's activations in the
  backward pass (``nn.remat``) instead of keeping them. ``act_signs``: see
  :func:`paper_rules`.
  """
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not supported: use one of {sorted(MODELS)}")
  model = MODELS[name](num_classes=num_classes, small_inputs=image_size <= SMALL_INPUTS,
                       dtype=dtype, remat=remat)
  if bits_w == FLOAT_BITS and bits_a == FLOAT_BITS:
    return model
  return quantize_model(model, paper_rules(name, bits_w, bits_a, per_channel=per_channel,
                                           act_batch_grad_scale=act_batch_grad_scale,
                                           alpha_param=alpha_param,
                                           first_last_bits=first_last_bits,
                                           act_signs=act_signs))
