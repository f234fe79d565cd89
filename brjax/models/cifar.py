"""CIFAR ResNets whose convolution, dense and activation layers are module fields.

Pass ``brjax.quant.lsq`` layers (see :func:`create_model`) and every convolution, including the
stem, every ReLU, including the first, and the final dense layer are quantized; BatchNorm
stays float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brjax.models import paper as paper_models
from brjax.models import reference_resnet
from brjax.quant import lsq as quant
from brjax.quant import step_size

ModuleDef = Any
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (He et al., 2016).

  ``shortcut`` where the shape changes: ``"projection"`` (option B: 1x1 conv + BN, named
  ``conv_proj``/``norm_proj``), or ``"option_a"`` (He et al.'s parameter-free CIFAR
  shortcut: every other pixel, ``x[:, ::2, ::2]``, and the new channels zero-padded
  equally on both sides; the 3x3 convs then pad 1 pixel on both sides, so that at stride 2
  they sample the pixels the shortcut keeps).
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: ModuleDef
  strides: int = 1
  shortcut: str = "projection"
  out_act: ModuleDef | None = None  # the block's output ReLU, if not ``act`` (last block)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = {"padding": ((1, 1), (1, 1))} if self.shortcut == "option_a" else {}
    y = self.conv(self.filters, (3, 3), self.strides, **pad)(x)
    y = self.norm()(y)
    y = self.act()(y)
    y = self.conv(self.filters, (3, 3), **pad)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    residual = x
    if self.shortcut == "option_a":
      residual = residual[:, ::self.strides, ::self.strides, :]
      extra = self.filters - residual.shape[-1]
      if extra:
        residual = jnp.pad(residual, ((0, 0),) * 3 + ((extra // 2, extra - extra // 2),))
    elif residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return (self.out_act or self.act)()(residual + y)


BasicBlockOptionA = functools.partial(BasicBlock, shortcut="option_a")


class CifarResNet(nn.Module):
  """ResNet for 32x32 images: a 3x3 stem (no max-pool), stages of basic blocks.

  Input: float images ``(B, H, W, C)``; output: float32 logits ``(B, num_classes)``.
  ``block`` is :class:`BasicBlock` (1x1 conv + BN projection where the shape changes,
  "option B") or ``BasicBlockOptionA`` (its parameter-free "option A" shortcut).
  """
  stage_sizes: Sequence[int]
  stage_filters: Sequence[int]
  num_classes: int = 10
  conv: ModuleDef = nn.Conv
  dense: ModuleDef = nn.Dense
  act: ModuleDef = quant.QuantReLU
  dtype: Any = jnp.float32
  block: ModuleDef = BasicBlock
  stem_conv: ModuleDef | None = None  # the first conv, if not ``conv``
  last_act: ModuleDef | None = None  # the last block's output ReLU (the dense's input)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    layer = functools.partial(functools.partial, use_bias=False, dtype=self.dtype,
                              padding="SAME", kernel_init=nn.initializers.kaiming_normal())
    conv = layer(self.conv)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=self.dtype)
    x = layer(self.stem_conv or self.conv)(self.stage_filters[0], (3, 3), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = self.act(name="act_init")(x)
    for i, (blocks, filters) in enumerate(zip(self.stage_sizes, self.stage_filters)):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        last = i == len(self.stage_sizes) - 1 and j == blocks - 1
        x = self.block(filters, conv=conv, norm=norm, act=self.act, strides=strides,
                       out_act=self.last_act if last else None)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = self.dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, jnp.float32)




def cifar_resnet(depth: int, **kwargs) -> CifarResNet:
  """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers: three stages of ``n`` basic blocks
  of 16, 32 and 64 filters (ResNet-20: n = 3). ``kwargs`` go to :class:`CifarResNet`."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth={depth} is not accepted: a CIFAR ResNet has 6n + 2 layers "
                     "(8, 14, 20, 32, 44, 56, 110, ...)")
  n = (depth - 2) // 6
  return CifarResNet(stage_sizes=(n, n, n), stage_filters=(16, 32, 64), **kwargs)


DEPTHS = (8, 14, 20, 32, 44, 56, 110)
"""The depths registered as ``resnet<depth>``: He et al.'s CIFAR table (20-110), and 8 and 14,
the small members of the family (ResNet-8: one block a stage)."""
ResNet20 = functools.partial(cifar_resnet, 20)
ResNet18 = functools.partial(CifarResNet, stage_sizes=(2, 2, 2, 2),
                             stage_filters=(64, 128, 256, 512))

ResNet20OptionA = functools.partial(CifarResNet, stage_sizes=(3, 3, 3),
                                    stage_filters=(16, 32, 64), block=BasicBlockOptionA)
ResNet18Reference = reference_resnet.ReferenceResNet18

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": functools.partial(cifar_resnet, d) for d in DEPTHS},
    "resnet18": ResNet18, "resnet18_reference": ResNet18Reference,
    "resnet20_option_a": ResNet20OptionA}
"""``resnet20`` (and the other depths of :data:`DEPTHS`, ``resnet8`` ... ``resnet110``),
``resnet18``: brjax's CIFAR ResNets (1x1 projection shortcuts, one quantized ReLU per call
site). ``resnet20_option_a``: He et al.'s CIFAR ResNet-20 with
parameter-free shortcuts (0.27M parameters). ``resnet18_reference``: the reference
package's layout (``brjax.models.reference_resnet``: shared per-block ReLU, PyTorch padding and
BatchNorm, PyTorch state_dict names)."""

ACT_GRAD_SCALES = ("example", "batch")


def create_model(name: str, *, bits_w: int = 32, bits_a: int = 32, clip: float | None = None,
                 num_classes: int = 10, dtype: Any = jnp.float32, width: int | None = None,
                 act_grad_scale: str = "example", per_channel: bool = False,
                 param_dtype: Any = jnp.float32, alpha_param: str = "linear",
                 first_last_bits: int | None = None) -> nn.Module:
  """A CIFAR ResNet with ``bits_w``-bit weights and ``bits_a``-bit activations.

  Args:
    name: one of :data:`MODELS`.
    bits_w: weight bit width of every conv and the dense layer (1..8, 32 = float; 1 bit
      is ternary, levels -1, 0, 1).
    bits_a: activation bit width of every ReLU (1..8, 32 = float; 1 bit is binary).
    clip: optional ReLU clip value (6.0 gives ReLU6).
    num_classes: size of the output.
    dtype: computation dtype (parameters stay float32).
    width: ``resnet18_reference`` only: channels of its first stage (default 64, the
      reference's).
    act_grad_scale: ``"example"`` (LSQ paper: one example's element count in the
      activation step size's gradient scale) or ``"batch"`` (the reference's: the batch's).
    per_channel: one weight step size per output channel of every conv and the dense
      layer (else one per kernel).
    param_dtype: ``resnet18_reference`` only: dtype of its parameters (float64 to replay
      a float64 PyTorch run).
    alpha_param: ``"linear"`` or ``"log"``: how every step size is stored
      (``brjax.quant.step_size``).
    first_last_bits: the literature's setting (LSQ, APoT, LQ-Net): the first conv's and
      the dense layer's kernels, and the dense layer's input (the last block's output
      ReLU), at these bits (1..8; 32 keeps them float); a float side (``bits_w`` or
      ``bits_a`` of 32) stays float. None: like every other layer. The first conv's input
      is the normalized image, not quantized: an affine map of 8-bit pixels, so 8-bit data
      already. Not for ``resnet18_reference`` (its ReLUs are shared within a block).
  """
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not supported: use one of {sorted(MODELS)}")
  if act_grad_scale not in ACT_GRAD_SCALES:
    raise ValueError(f"act_grad_scale={act_grad_scale!r} is not supported: use one of "
                     f"{ACT_GRAD_SCALES}")
  quant.check_layer_bits(bits_w)
  quant.check_layer_bits(bits_a)
  step_size.check_alpha_param(alpha_param)
  act = functools.partial(quant.QuantReLU, bits=bits_a, clip=clip,
                          batch_grad_scale=act_grad_scale == "batch", alpha_param=alpha_param)
  kernel = dict(bits=bits_w, per_channel=per_channel, alpha_param=alpha_param)
  layers = dict(conv=functools.partial(quant.QuantConv, **kernel),
                dense=functools.partial(quant.QuantDense, **kernel))
  if name == "resnet18_reference":
    if first_last_bits is not None:
      raise ValueError(f"first_last_bits={first_last_bits!r} is not supported for "
                       "model='resnet18_reference' (its ReLUs are shared within a block): "
                       "leave it unset")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int)
                              or width < 1):
      raise ValueError(f"width={width!r} is not supported: use an integer >= 1 (64 = the "
                       "reference)")
    return ResNet18Reference(
        width=64 if width is None else width, num_classes=num_classes,
        act=functools.partial(act, keep_last_call=True), dtype=dtype,
        param_dtype=param_dtype, **layers)
  if width is not None:
    raise ValueError(f"width={width!r} is not supported for model={name!r}: only "
                     "resnet18_reference has a width option")
  edges = {}
  if first_last_bits is not None:
    quant.check_layer_bits(first_last_bits)
    edge_w = first_last_bits if bits_w != quant.FLOAT_BITS else bits_w
    edge_kernel = dict(kernel, bits=edge_w)
    edges = dict(stem_conv=functools.partial(quant.QuantConv, **edge_kernel),
                 dense=functools.partial(quant.QuantDense, **edge_kernel),
                 last_act=functools.partial(
                     act, bits=first_last_bits if bits_a != quant.FLOAT_BITS else bits_a))
  return MODELS[name](num_classes=num_classes, act=act, dtype=dtype, **{**layers, **edges})


def from_run_config(config: Any, num_classes: int, image_size: int | None = None) -> nn.Module:
  """The model of a run, from its config: a ``brjax.training.config.Config`` or the dict of one
  that a checkpoint's meta holds (fields a saved config lacks take their defaults). Its
  ``dtype`` is the computation dtype (``"bfloat16"``: convolutions, matmuls, BatchNorm and
  activations in bfloat16; parameters, step sizes, logits and losses float32).

  ``image_size``: the side of the run's images; needed by the papers' models
  (``brjax.models.paper``: their small-input variant for CIFAR-size images), else unused.
  """
  get = (config.get if isinstance(config, dict) else
         lambda name, default=None: getattr(config, name, default))
  dtype = jnp.dtype(get("dtype") or "float32")
  if get("model") in paper_models.MODELS:
    if image_size is None:
      raise ValueError(f"model={get('model')!r} needs the run's image size")
    return paper_models.create_model(
        get("model"), bits_w=get("bits_w", quant.FLOAT_BITS),
        bits_a=get("bits_a", quant.FLOAT_BITS), num_classes=num_classes, image_size=image_size,
        per_channel=bool(get("per_channel", False)),
        act_batch_grad_scale=get("act_grad_scale") == "batch", dtype=dtype,
        remat=bool(get("remat", False)), alpha_param=get("alpha_param") or "linear",
        first_last_bits=get("first_last_bits") or paper_models.FIRST_LAST_BITS,
        act_signs=get("act_signs") or "architecture")
  return create_model(get("model"), bits_w=get("bits_w", quant.FLOAT_BITS),
                      bits_a=get("bits_a", quant.FLOAT_BITS), clip=get("clip"),
                      num_classes=num_classes, width=get("width"), dtype=dtype,
                      act_grad_scale=get("act_grad_scale") or "example",
                      per_channel=bool(get("per_channel", False)),
                      alpha_param=get("alpha_param") or "linear",
                      first_last_bits=get("first_last_bits"))
