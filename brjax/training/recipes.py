"""Training recipes as data: what optimizes, at which learning rate, with which conventions.

A recipe fixes every choice of a training run that is not the model, the data or the BR
method itself. Two QAT recipes and one float baseline recipe:

=================  =============================  =========================================
part               ``brjax`` (default)            ``reference`` (the PyTorch package's QAT)
=================  =============================  =========================================
optimizer          SGD, momentum 0.9              Adam (b1 0.9, b2 0.999, eps 1e-8)
lr                 0.1                            0.01
weight decay       5e-4, coupled (L2 added to     1e-4, coupled, on *every* parameter:
                   the gradient), not on alphas   alphas and BatchNorm included
schedule           ``cosine``: per step, from lr  ``constant_cosine``: lr through the
                   to 0 over the whole run        warmup, then per epoch
                                                  ``lr * (1 + cos(pi * k / T)) / 2`` for
                                                  BR epoch ``k = 0..T-1`` of ``T``
act. alpha grad    ``example``: ``1/sqrt(N*qp)``  ``batch``: ``1/sqrt(B*N*qp)``, the whole
scale              with N the features of one     batch's element count, as its
                   example (LSQ paper)            ``x.numel()``
alpha init         ``calibrate``: model.init on   ``first_step``: train-mode forward of
                   the first unaugmented images   the first training batch (augmented,
                   (eval mode from a pretrained   shuffled: the batch step 1 trains on)
                   float run)
normalization      ``dataset``: the training      ``reference``: its fixed CIFAR-10
                   set's own per-channel mean     constants, mean (0.4914, 0.4822, 0.4465),
                   and std                        std (0.2023, 0.1994, 0.2010): what its
                                                  ``.pth`` baselines were trained on
=================  =============================  =========================================

``reference_baseline`` is the reference's float baseline script: SGD 0.1, momentum 0.9,
weight decay 5e-4 on every parameter, ``step`` schedule (x0.1 after 50% and 75% of the
epochs, per epoch).

Every part is also a flag of its own (``--optimizer``, ``--schedule``, ...); a flag given
explicitly overrides its recipe's value (``brjax.training.config.Config`` resolves them).
"""

from __future__ import annotations

import dataclasses

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant_cosine", "step")
ACT_GRAD_SCALES = ("example", "batch")
ALPHA_INITS = ("calibrate", "first_step")
NORMALIZATIONS = ("dataset", "reference", "imagenet")
ADAM_LR = 1e-3
"""The learning rate of ``--optimizer=adam`` without ``--lr`` in a recipe whose optimizer is
SGD (brjax's 0.1 is SGD's: Adam at 0.1 diverges)."""
ALPHA_PARAMS = ("linear", "log")  # brjax.quant.step_size.ALPHA_PARAMS, without JAX
BR_SCHEDULES = ("constant", "cosine")
ABR_CLIPPED = ("include", "exclude")  # brjax.quant.regularizer.CLIPPED, without JAX
REFERENCE_MEAN = (0.4914, 0.4822, 0.4465)
REFERENCE_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet constants
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One training recipe; field names are the flags (and Config fields) they set.

  Attributes:
    optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"`` (``adam_eps``; PyTorch's betas).
    lr: the peak learning rate.
    momentum: SGD momentum (unused by Adam).
    weight_decay: L2 coefficient added to the gradient before the optimizer
      (``g + wd * w``: PyTorch's ``weight_decay`` for SGD and Adam alike).
    decay_alphas: whether the step sizes get weight decay too.
    schedule: one of :data:`SCHEDULES` (see ``brjax.training.optim.learning_rate_schedule``).
    act_grad_scale: one of :data:`ACT_GRAD_SCALES`: the activation step size's gradient
      scale counts one example's elements, or the whole batch's.
    alpha_init: one of :data:`ALPHA_INITS` (see ``brjax.training.train.create_train_state``).
    normalization: one of :data:`NORMALIZATIONS`: the input normalization's mean and std
      come from the training set, or are the reference's constants.
    adam_eps: Adam's epsilon, added to ``sqrt(v_hat)``.
    alpha_param: one of :data:`ALPHA_PARAMS`: step sizes stored as themselves, or as their
      logarithm (positive by construction; ``brjax.quant.step_size``).
    alpha_lr_scale: the step sizes' learning rate, as a multiple of ``lr`` (their own
      optimizer group; ``brjax.training.optim``).
    abr_clipped: one of :data:`ABR_CLIPPED`: A-BR's activations above the top level
      counted in the top bin (the paper's), or left out.
    br_schedule: one of :data:`BR_SCHEDULES`: the BR terms' weight is ``lambda`` from the
      first BR step (``constant``, the reference's), or ramps from 0 to ``lambda`` on a
      half cosine over the first ``br_ramp_epochs`` BR epochs (``cosine``).
    br_ramp_epochs: the length of the ``cosine`` ramp, in epochs (>= 1 with ``cosine``).
  """
  optimizer: str
  lr: float
  momentum: float
  weight_decay: float
  decay_alphas: bool
  schedule: str
  act_grad_scale: str
  alpha_init: str
  normalization: str
  adam_eps: float = 1e-8
  alpha_param: str = "linear"
  alpha_lr_scale: float = 1.0
  abr_clipped: str = "include"
  br_schedule: str = "constant"
  br_ramp_epochs: int = 0

  def __post_init__(self):
    for name, accepted in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                           ("act_grad_scale", ACT_GRAD_SCALES), ("alpha_init", ALPHA_INITS),
                           ("normalization", NORMALIZATIONS), ("alpha_param", ALPHA_PARAMS),
                           ("abr_clipped", ABR_CLIPPED), ("br_schedule", BR_SCHEDULES)):
      if getattr(self, name) not in accepted:
        raise ValueError(f"--{name}={getattr(self, name)} is not accepted: use one of "
                         f"{', '.join(accepted)}")


BRJAX = Recipe(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, decay_alphas=False,
               schedule="cosine", act_grad_scale="example", alpha_init="calibrate",
               normalization="dataset", alpha_param="log", alpha_lr_scale=0.1,
               abr_clipped="exclude", br_schedule="cosine", br_ramp_epochs=5)
REFERENCE = Recipe(optimizer="adam", lr=0.01, momentum=0.9, weight_decay=1e-4,
                   decay_alphas=True, schedule="constant_cosine", act_grad_scale="batch",
                   alpha_init="first_step", normalization="reference")
REFERENCE_BASELINE = Recipe(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                            decay_alphas=True, schedule="step", act_grad_scale="batch",
                            alpha_init="first_step", normalization="reference")

RECIPES: dict[str, Recipe] = {"brjax": BRJAX, "reference": REFERENCE,
                              "reference_baseline": REFERENCE_BASELINE}
FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def get(name: str) -> Recipe:
  """The recipe called ``name``; ValueError naming the accepted ones otherwise."""
  if name not in RECIPES:
    raise ValueError(f"--recipe={name} is not accepted: use one of {', '.join(RECIPES)}")
  return RECIPES[name]


def describe(recipe: Recipe, name: str | None = None) -> str:
  """One line for the banner: ``recipe reference: adam lr 0.01, wd 1e-4 (coupled, alphas
  included), schedule constant_cosine, act. alpha grad scale per batch, alpha init
  first_step``."""
  if recipe.optimizer == "sgd":
    opt = f"sgd (momentum {recipe.momentum:g})"
  else:
    opt = f"adam (eps {recipe.adam_eps:g})"
  head = f"recipe {name}: " if name else ""
  return (f"{head}{opt}, lr {recipe.lr:g}, weight decay {recipe.weight_decay:g} (L2, "
          f"{'alphas included' if recipe.decay_alphas else 'not on alphas'}), schedule "
          f"{recipe.schedule}, act. alpha grad scale per {recipe.act_grad_scale}, alpha init "
          f"{recipe.alpha_init}, normalization {recipe.normalization}, step sizes "
          f"{recipe.alpha_param} (lr x{recipe.alpha_lr_scale:g}), A-BR clipped values "
          f"{recipe.abr_clipped}, BR weight {_br_schedule(recipe)}")


def _br_schedule(recipe: Recipe) -> str:
  if recipe.br_schedule == "constant":
    return "constant"
  return f"cosine ramp over {recipe.br_ramp_epochs} BR epochs"


def normalize_dataset(ds, normalization: str):
  """``ds`` (an in-memory or streamed dataset) with the input normalization of the recipe:
  unchanged for ``dataset``, the reference's CIFAR-10 constants for ``reference``,
  torchvision's ImageNet constants for ``imagenet``."""
  if normalization == "dataset":
    return ds
  constants = {"reference": (REFERENCE_MEAN, REFERENCE_STD),
               "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
  if normalization in constants:
    import numpy as np  # pylint: disable=g-import-not-at-top
    mean, std = constants[normalization]
    return dataclasses.replace(ds, mean=np.asarray(mean, np.float32),
                               std=np.asarray(std, np.float32))
  raise ValueError(f"--normalization={normalization} is not accepted: use one of "
                   f"{', '.join(NORMALIZATIONS)}")
