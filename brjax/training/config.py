"""The training configuration: a frozen dataclass, validated once when it is built.

Field names are the command-line flag names of ``scripts/train.py``, so every error names
the flag as the user typed it: ``--bits_w=3 is not accepted: ...``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from brjax.quant.bits import FLOAT_BITS
from brjax.training import recipes

CIFAR_RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)  # brjax.models.cifar.DEPTHS, without JAX
CIFAR_MODELS = (*(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS), "resnet18", "resnet18_reference",
                "resnet20_option_a")
PAPER_MODELS = ("resnet18_imagenet", "resnet50", "mobilenet_v2")  # brjax.models.paper
MODELS = CIFAR_MODELS + PAPER_MODELS
ACT_SIGNS = ("architecture", "data")  # brjax.models.paper.ACT_SIGNS
PRETRAINED_SUFFIXES = (".pth", ".pt")
DTYPES = ("float32", "bfloat16")  # computation dtypes; parameters stay float32
INPUT_MODES = ("auto", "memory", "streaming")  # brjax.data.streaming.INPUT_MODES
ALPHA_GRADS_W = ("full", "lsq", "none")  # brjax.quant.regularizer.ALPHA_GRADS_W, without JAX
ABR_CLIPPED = recipes.ABR_CLIPPED  # brjax.quant.regularizer.CLIPPED, without JAX
BR_PHASE_FIELDS = frozenset({
    "lambda_w", "lambda_a", "freeze_alpha_w", "freeze_alpha_a", "br_alpha_grad_a",
    "br_alpha_grad_w", "abr_layers", "abr_exclude_first", "abr_exclude_last", "abr_clipped",
    "br_schedule", "br_ramp_epochs"})
"""The fields that act only in the BR phase: two runs that differ only in them train the
same warmup, bit for bit (``--branch_from`` and the study's shared warmups rely on it)."""
SWITCHES = ("per_channel", "freeze_alpha_w", "freeze_alpha_a", "br_alpha_grad_a",
            "abr_exclude_first", "abr_exclude_last")
"""The on/off fields (besides ``remat`` and ``decay_alphas``): each must be a bool."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a training run depends on. Building one validates it (ValueError).

  The fields of ``brjax.training.recipes.Recipe`` (``lr``, ``momentum``, ``weight_decay``,
  ``optimizer``, ``schedule``, ...) default to None, which means "the value of
  ``recipe``": building the Config fills them in, so after construction every field holds
  the value the run uses, and a value given explicitly overrides the recipe's. (So
  ``dataclasses.replace(config, recipe=...)`` keeps the old recipe's resolved values: build
  a new Config to change recipes.)
  """
  # Model and quantization.
  model: str = "resnet20"
  width: int | None = None
  bits_w: int = 2
  bits_a: int = 2
  first_last_bits: int | None = None
  clip: float | None = None
  per_channel: bool = False
  dtype: str = "float32"
  remat: bool = False
  act_signs: str = "architecture"
  # Bin Regularization and step-size control.
  lambda_w: float = 1.0
  lambda_a: float = 1.0
  warmup_epochs: int = 30
  freeze_alpha_w: bool = False
  freeze_alpha_a: bool = False
  br_alpha_grad_a: bool = False
  br_alpha_grad_w: str = "full"
  abr_layers: str | None = None
  abr_exclude_first: bool = False
  abr_exclude_last: bool = False
  abr_clipped: str | None = None
  br_schedule: str | None = None
  br_ramp_epochs: int | None = None
  # Optimization: a recipe (brjax.training.recipes), each part overridable.
  recipe: str = "brjax"
  epochs: int = 100
  batch_size: int = 128
  lr: float | None = None
  momentum: float | None = None
  weight_decay: float | None = None
  optimizer: str | None = None
  schedule: str | None = None
  decay_alphas: bool | None = None
  act_grad_scale: str | None = None
  alpha_init: str | None = None
  normalization: str | None = None
  adam_eps: float | None = None
  alpha_param: str | None = None
  alpha_lr_scale: float | None = None
  alpha_weight_decay: float | None = None
  seed: int = 42
  # Data.
  dataset: str = "cifar10"
  data_dir: str | None = None
  train_examples: int = 0
  test_examples: int = 0
  input: str = "auto"
  image_size: int = 224
  data_workers: int | None = None
  # Initialization.
  pretrained: str | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):  # numpy numbers: as the Python ones they stand for
      value = getattr(self, field.name)
      if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        object.__setattr__(self, field.name, value.item())
    if self.abr_layers is not None:
      try:
        re.compile(self.abr_layers)
      except (re.error, TypeError) as e:
        raise ValueError(f"--abr_layers={self.abr_layers} is not accepted: use a regular "
                         f"expression on module paths ({e})") from None
    _check(self.recipe in recipes.RECIPES, "recipe", self.recipe,
           f"use one of {', '.join(recipes.RECIPES)}")
    recipe = recipes.RECIPES[self.recipe]
    if self.lr is None and self.optimizer == "adam" and recipe.optimizer != "adam":
      object.__setattr__(self, "lr", recipes.ADAM_LR)  # the recipe's lr is SGD's
    for name in recipes.FIELDS:  # None: the recipe's value
      if getattr(self, name) is None:
        object.__setattr__(self, name, getattr(recipe, name))
    for name, accepted in (("optimizer", recipes.OPTIMIZERS), ("schedule", recipes.SCHEDULES),
                           ("act_grad_scale", recipes.ACT_GRAD_SCALES),
                           ("alpha_init", recipes.ALPHA_INITS),
                           ("normalization", recipes.NORMALIZATIONS)):
      _check(getattr(self, name) in accepted, name, getattr(self, name),
             f"use one of {', '.join(accepted)}")
    _check(self.br_alpha_grad_w in ALPHA_GRADS_W, "br_alpha_grad_w", self.br_alpha_grad_w,
           f"use one of {', '.join(ALPHA_GRADS_W)}")
    for name, accepted in (("abr_clipped", ABR_CLIPPED), ("alpha_param", recipes.ALPHA_PARAMS),
                           ("br_schedule", recipes.BR_SCHEDULES)):
      _check(getattr(self, name) in accepted, name, getattr(self, name),
             f"use one of {', '.join(accepted)}")
    _check(_is_int(self.br_ramp_epochs) and self.br_ramp_epochs >= 0
           and (self.br_ramp_epochs >= 1 or self.br_schedule == "constant"), "br_ramp_epochs",
           self.br_ramp_epochs, "use an integer >= 1 with --br_schedule=cosine (>= 0 with "
           "constant, where it is unused)")
    _check(_is_finite(self.alpha_lr_scale) and self.alpha_lr_scale >= 0, "alpha_lr_scale",
           self.alpha_lr_scale, "use a finite number >= 0 (the step sizes' lr as a multiple "
           "of --lr)")
    for name in ("decay_alphas",) + SWITCHES:
      _check(isinstance(getattr(self, name), bool), name, getattr(self, name),
             "use true or false")
    _check(_is_finite(self.adam_eps) and self.adam_eps > 0, "adam_eps", self.adam_eps,
           "use a number > 0")
    _check(self.model in MODELS, "model", self.model, f"use one of {', '.join(MODELS)}")
    if self.width is not None:
      _check(_is_int(self.width) and self.width >= 1 and self.model == "resnet18_reference",
             "width", self.width, "use an integer >= 1 with --model=resnet18_reference "
             "(64 = the reference), or leave it unset")
    _check(self.remat in (False, True) and (not self.remat or self.model in PAPER_MODELS),
           "remat", self.remat, f"use it with one of {', '.join(PAPER_MODELS)}")
    _check(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {', '.join(DTYPES)}")
    for name in ("bits_w", "bits_a"):
      bits = getattr(self, name)
      _check(_is_int(bits) and (1 <= bits <= 8 or bits == FLOAT_BITS), name, bits,
             f"use an integer in 1..8, or {FLOAT_BITS} for float")
    if self.first_last_bits is not None:
      _check(_is_int(self.first_last_bits)
             and (1 <= self.first_last_bits <= 8 or self.first_last_bits == FLOAT_BITS)
             and self.quantized and self.model != "resnet18_reference",
             "first_last_bits", self.first_last_bits,
             f"use an integer in 1..8, or {FLOAT_BITS} for float, with a quantized run of a "
             "model other than resnet18_reference; or leave it unset (like the other layers; "
             "the papers' models: 8)")
    _check(not self.per_channel or self.bits_w != FLOAT_BITS, "per_channel", self.per_channel,
           f"one step size per output channel needs quantized weights (--bits_w={FLOAT_BITS} "
           "keeps them float)")
    _check(self.act_signs in ACT_SIGNS and (self.act_signs == "architecture" or (
        self.model in PAPER_MODELS and 2 <= self.bits_a <= 8)),
           "act_signs", self.act_signs, "use architecture, or data with one of "
           f"{', '.join(PAPER_MODELS)} and --bits_a in 2..8 (the CIFAR ResNets quantize "
           "ReLU outputs, unsigned; a 1-bit input needs a fixed sign)")
    if self.clip is not None:
      _check(_is_finite(self.clip) and self.clip > 0 and self.model in CIFAR_MODELS, "clip",
             self.clip, "use a positive number with a CIFAR ResNet (the papers' models keep "
             "their own ReLU/ReLU6), or leave it unset for a plain ReLU")
    if self.alpha_weight_decay is None:  # the recipe's: --weight_decay with decay_alphas
      object.__setattr__(self, "alpha_weight_decay",
                         self.weight_decay if self.decay_alphas else 0.0)
    for name in ("lambda_w", "lambda_a", "weight_decay", "alpha_weight_decay"):
      value = getattr(self, name)
      _check(_is_finite(value) and value >= 0, name, value, "use a finite number >= 0")
    _check(_is_finite(self.lr) and self.lr > 0, "lr", self.lr, "use a number > 0")
    _check(_is_finite(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum,
           "use a number in [0, 1)")
    _check(_is_int(self.epochs) and self.epochs >= 1, "epochs", self.epochs,
           "use an integer >= 1")
    # A float run has no warmup phase: only the sign of --warmup_epochs is checked there.
    _check(_is_int(self.warmup_epochs) and self.warmup_epochs >= 0
           and (self.warmup_epochs <= self.epochs or not self.quantized),
           "warmup_epochs", self.warmup_epochs,
           f"use an integer in 0..{self.epochs} (--epochs={self.epochs})")
    _check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size,
           "use an integer >= 1")
    for name in ("train_examples", "test_examples"):
      value = getattr(self, name)
      _check(_is_int(value) and value >= 0, name, value, "use an integer >= 0 (0 = all)")
    _check(_is_int(self.seed), "seed", self.seed, "use an integer")
    _check(self.input in INPUT_MODES, "input", self.input, f"use one of {', '.join(INPUT_MODES)}")
    _check(_is_int(self.image_size) and self.image_size >= 8, "image_size", self.image_size,
           "use an integer >= 8 (the side streamed images are cropped to)")
    _check(self.data_workers is None or (_is_int(self.data_workers) and self.data_workers >= 0),
           "data_workers", self.data_workers, "use an integer >= 0 (0 = decode in the "
           "training process), or leave it unset (half the CPUs, at most 8)")
    if self.data_dir is not None:
      _check(os.path.exists(self.data_dir), "data_dir", self.data_dir,
             "use an existing folder with train/<class>/ and test/<class>/ (or val/<class>/), "
             "a .tar.gz of one, or a folder holding a prepared tfds dataset")
    if self.pretrained is not None:
      if self.pretrained.endswith(PRETRAINED_SUFFIXES):
        _check(os.path.isfile(self.pretrained) and self.model == "resnet18_reference",
               "pretrained", self.pretrained, "use an existing PyTorch state_dict of the "
               "reference package's ResNet-18, with --model=resnet18_reference")
      else:
        _check(os.path.isdir(os.path.join(self.pretrained, "checkpoints")), "pretrained",
               self.pretrained, "use the --workdir of a float run (a folder holding its "
               "checkpoints/ folder), or a reference .pth file")

  @property
  def quantized(self) -> bool:
    """Whether anything is quantized (otherwise the run is plain float training)."""
    return self.bits_w != FLOAT_BITS or self.bits_a != FLOAT_BITS

  @property
  def br_lambdas(self) -> tuple[float, float]:
    """``(lambda_w, lambda_a)`` of the BR phase as the run computes it (:func:`br_lambdas`)."""
    return br_lambdas(vars(self))

  @property
  def name(self) -> str:
    """A short run name, e.g. ``resnet20_W2A2_lw1_la1_s42``."""
    bits = "float" if not self.quantized else f"W{_bits_tag(self.bits_w)}A{_bits_tag(self.bits_a)}"
    br = f"_lw{self.lambda_w:g}_la{self.lambda_a:g}" if self.quantized else ""
    if self.quantized and self.first_last_bits is not None:
      bits += f"_fl{_bits_tag(self.first_last_bits)}"
    recipe = "" if self.recipe == "brjax" else f"_{self.recipe}"
    signs = "_datasigns" if self.act_signs == "data" else ""
    return f"{self.model}_{bits}{br}{signs}{recipe}_s{self.seed}"

  @property
  def recipe_parts(self) -> recipes.Recipe:
    """The recipe this run uses, explicit flags included."""
    return recipes.Recipe(**{name: getattr(self, name) for name in recipes.FIELDS})


def br_lambdas(config: dict) -> tuple[float, float]:
  """``(lambda_w, lambda_a)`` that the BR phase computes, from a config (a ``Config``'s
  fields, or a checkpoint's config dict): a side whose bits are 32 (float) has no BR term
  (0.0), whatever its lambda. The one definition that the loss (``steps.br_settings``),
  the banner and the analysis read."""
  return tuple(config.get(lam, 0.0) if config.get(bits, FLOAT_BITS) != FLOAT_BITS else 0.0
               for bits, lam in (("bits_w", "lambda_w"), ("bits_a", "lambda_a")))


def saved_defaults(saved: dict) -> dict:
  """What a run whose saved config predates a field used for it: the step-size fields
  (``alpha_param``, ``alpha_lr_scale``, ``alpha_weight_decay``) and the BR schedule did
  not exist, and every run trained linear step sizes at ``--lr``, decayed with
  ``--weight_decay`` under ``decay_alphas``, at a constant BR weight."""
  decayed = saved.get("weight_decay") if saved.get("decay_alphas") else 0.0
  return {"alpha_param": "linear", "alpha_lr_scale": 1.0, "alpha_weight_decay": decayed,
          "br_schedule": "constant", "br_ramp_epochs": 0}


def _bits_tag(bits: int) -> str:
  return "32" if bits == FLOAT_BITS else str(bits)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value, accepted: str) -> None:
  if not ok:
    raise ValueError(f"--{name}={value} is not accepted: {accepted}")
