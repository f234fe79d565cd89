"""Models: brjax's CIFAR ResNets, the reference package's ResNet-18, the papers' ImageNet
models, and plain Flax models written as third-party code is.

* :mod:`brjax.models.cifar`: the CIFAR ResNets and the registry (``create_model``,
  ``from_run_config``, ``MODELS``).
* :mod:`brjax.models.reference_resnet`: the reference package's ResNet-18, layer for layer.
* :mod:`brjax.models.paper`: ResNet-18/50 and MobileNetV2 for ImageNet, quantized by rules.
* :mod:`brjax.models.plain`: unmodified Flax models (no brjax inside).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brjax import _lazy

_EXPORTS = {
    **dict.fromkeys(("ACT_GRAD_SCALES", "BN_EPSILON", "BN_MOMENTUM", "BasicBlock",
                     "BasicBlockOptionA", "CifarResNet", "MODELS", "ModuleDef", "ResNet18",
                     "ResNet18Reference", "ResNet20", "ResNet20OptionA", "create_model",
                     "from_run_config",), "cifar"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see: the eager imports the lazy ones stand for
  from brjax.models.cifar import (
    ACT_GRAD_SCALES,
    BN_EPSILON,
    BN_MOMENTUM,
    MODELS,
    BasicBlock,
    BasicBlockOptionA,
    CifarResNet,
    ModuleDef,
    ResNet18,
    ResNet18Reference,
    ResNet20,
    ResNet20OptionA,
    create_model,
    from_run_config,
  )
