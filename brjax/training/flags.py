"""The flags of ``scripts/train.py`` and the :class:`~brjax.training.config.Config` they build.

Flag names are Config field names (``--bits`` sets both ``bits_w`` and ``bits_a``), so the
errors the Config raises name the flag as typed. Defined on a given ``FlagValues`` rather
than absl's global one, so that a script's ``main`` can be called (and tested) in-process.
"""

from __future__ import annotations

from absl import flags

from brjax.training import recipes
from brjax.training.config import ABR_CLIPPED, ACT_SIGNS, MODELS, Config

_D = Config()


def define(values: flags.FlagValues) -> flags.FlagValues:
  """Defines every training flag on ``values``; returns it."""
  flags.DEFINE_enum("model", _D.model, list(MODELS), "CIFAR ResNet: resnet20 (and "
                    "resnet8 ... resnet110, He et al.'s 6n+2 family), resnet18 "
                    "(brjax's), resnet20_option_a (He et al.'s parameter-free shortcuts), "
                    "resnet18_reference (the reference package's layout; reads its .pth). "
                    "The papers' ImageNet models (brjax.models.paper, quantized by paper_rules: "
                    "first and "
                    "last layer 8 bits, layer inputs quantized): resnet18_imagenet, resnet50, "
                    "mobilenet_v2 (their small-input variant for images of at most 64 pixels).",
                    flag_values=values)
  flags.DEFINE_integer("width", None, "resnet18_reference: channels of the first stage "
                       "(default 64, the reference's).", flag_values=values)
  flags.DEFINE_enum("act_signs", _D.act_signs, list(ACT_SIGNS), "The papers' models: the "
                    "sign of each quantized layer input, fixed by the architecture (unsigned "
                    "after a ReLU; paper_rules) or decided from the init batch (data: signed "
                    "where it holds a negative value; kept in the training state's "
                    "quant_state, saved and restored with it).", flag_values=values)
  flags.DEFINE_bool("remat", False, "The papers' models: recompute each block's activations "
                    "in the backward pass instead of keeping them (less memory, about a third "
                    "more time; see the benchmark's memory lines).", flag_values=values)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Computation dtype of convolutions, "
                    "matmuls, BatchNorm and activations (parameters, optimizer state, step sizes "
                    "and losses stay float32; integer codes are exact either way). Default: "
                    "bfloat16 on GPU/TPU, float32 on CPU.", flag_values=values)
  flags.DEFINE_integer("bits", _D.bits_w, "Bit width of weights and activations: 1..8, or 32 "
                       "(float). 1 bit: ternary weights (-1, 0, 1), binary activations (0, 1).",
                       flag_values=values)
  flags.DEFINE_integer("bits_w", None, "Weight bit width (default: --bits).", flag_values=values)
  flags.DEFINE_integer("bits_a", None, "Activation bit width (default: --bits).",
                       flag_values=values)
  flags.DEFINE_integer("first_last_bits", None, "The literature's setting: the first conv and "
                       "the last dense layer (its kernel and its input) at these bits (1..8; 32 "
                       "keeps them float); a float side stays float. Unset: like every other "
                       "layer (the papers' models: 8).", flag_values=values)
  flags.DEFINE_float("clip", None, "Clip ReLU at this value (6 = ReLU6); unset: plain ReLU.",
                     flag_values=values)
  flags.DEFINE_float("lambda_w", _D.lambda_w, "W-BR weight (0 disables).", flag_values=values)
  flags.DEFINE_float("lambda_a", _D.lambda_a, "A-BR weight (0 disables, and nothing is sown).",
                     flag_values=values)
  flags.DEFINE_integer("warmup_epochs", _D.warmup_epochs, "Epochs of LSQ-only warmup.",
                       flag_values=values)
  flags.DEFINE_integer("epochs", _D.epochs, "Total epochs (warmup included).", flag_values=values)
  flags.DEFINE_bool("freeze_alpha", False, "Freeze weight and activation alphas after warmup.",
                    flag_values=values)
  flags.DEFINE_bool("freeze_alpha_w", False, "Freeze weight alphas after warmup.",
                    flag_values=values)
  flags.DEFINE_bool("freeze_alpha_a", False, "Freeze activation alphas after warmup.",
                    flag_values=values)
  flags.DEFINE_bool("br_alpha_grad_a", _D.br_alpha_grad_a,
                    "Let A-BR gradients reach activation alphas.", flag_values=values)
  flags.DEFINE_enum("br_alpha_grad_w", _D.br_alpha_grad_w, ["full", "lsq", "none"],
                    "W-BR's gradient to the weight alphas: full (the BR paper's and the "
                    "reference's), lsq (scaled by LSQ's g = 1/sqrt(N*Qp), as the CE gradient; "
                    "steadier for 8-bit layers), none.", flag_values=values)
  flags.DEFINE_bool("per_channel", False, "One weight step size per output channel (else one "
                    "per kernel).", flag_values=values)
  flags.DEFINE_string("abr_layers", None, "A-BR only on activation sites whose module path "
                      "matches this regular expression (re.search), e.g. 'BasicBlock_[0-4]/'; "
                      "unset: every site.", flag_values=values)
  flags.DEFINE_bool("abr_exclude_first", False, "Leave the first activation site (in forward "
                    "order) out of A-BR.", flag_values=values)
  flags.DEFINE_bool("abr_exclude_last", False, "Leave the last activation site out of A-BR.",
                    flag_values=values)
  flags.DEFINE_enum("abr_clipped", None, list(ABR_CLIPPED), "A-BR's activations "
                    "above the top level (value/alpha > qp + 0.5, clipped by the quantizer): "
                    "include = counted in the top bin (the paper's, the reference recipe's), "
                    "exclude = left out of every bin (default: the recipe's).",
                    flag_values=values)
  flags.DEFINE_enum("br_schedule", None, list(recipes.BR_SCHEDULES), "The BR terms' weight: "
                    "constant = lambda from the first BR step (the reference's); cosine = a "
                    "half-cosine ramp from 0 to lambda over the first --br_ramp_epochs BR "
                    "epochs (default: the recipe's).", flag_values=values)
  flags.DEFINE_integer("br_ramp_epochs", None, "With --br_schedule=cosine: the ramp's length "
                       "in BR epochs (default: the recipe's).", flag_values=values)
  flags.DEFINE_enum("alpha_param", None, list(recipes.ALPHA_PARAMS), "Step sizes stored as "
                    "themselves (linear, LSQ's and the reference's) or as log(alpha) (log: "
                    "positive by construction, LSQ's first updates) (default: the recipe's).",
                    flag_values=values)
  flags.DEFINE_float("alpha_lr_scale", None, "The step sizes' learning rate as a multiple of "
                     "--lr (their own optimizer group) (default: the recipe's).",
                     flag_values=values)
  flags.DEFINE_float("alpha_weight_decay", None, "L2 weight decay on the step sizes (default: "
                     "--weight_decay with decay_alphas, as the reference recipe; else 0).",
                     flag_values=values)
  flags.DEFINE_enum("recipe", _D.recipe, list(recipes.RECIPES), "Training recipe: brjax (SGD "
                    "0.1, per-step cosine, ...), reference (the reference package's QAT: Adam "
                    "0.01, constant-then-cosine per epoch, ...), reference_baseline (its float "
                    "baseline: SGD 0.1, step decay). The flags below override its parts.",
                    flag_values=values)
  flags.DEFINE_float("lr", None, "Peak learning rate (default: the recipe's).", flag_values=values)
  flags.DEFINE_enum("optimizer", None, list(recipes.OPTIMIZERS), "Optimizer (default: the "
                    "recipe's).", flag_values=values)
  flags.DEFINE_enum("schedule", None, list(recipes.SCHEDULES), "LR schedule (default: the "
                    "recipe's): cosine = per step to 0 over the run; constant_cosine = constant "
                    "through warmup, then cosine per epoch over the BR epochs; step = x0.1 "
                    "after 50% and 75% of the epochs.", flag_values=values)
  flags.DEFINE_float("weight_decay", None, "L2 weight decay added to the gradient (default: "
                     "the recipe's).", flag_values=values)
  flags.DEFINE_bool("decay_alphas", None, "Weight decay on the step sizes too (default: the "
                    "recipe's).", flag_values=values)
  flags.DEFINE_float("momentum", None, "SGD momentum (default: the recipe's).",
                     flag_values=values)
  flags.DEFINE_float("adam_eps", None, "Adam epsilon (default: the recipe's).",
                     flag_values=values)
  flags.DEFINE_enum("act_grad_scale", None, list(recipes.ACT_GRAD_SCALES), "Activation step "
                    "size gradient scale 1/sqrt(N*qp): N per example (LSQ paper) or per batch "
                    "(the reference) (default: the recipe's).", flag_values=values)
  flags.DEFINE_enum("alpha_init", None, list(recipes.ALPHA_INITS), "Step-size init: calibrate "
                    "(first unaugmented images; eval mode after --pretrained) or first_step "
                    "(train-mode forward of the first training batch, as the reference) "
                    "(default: the recipe's).", flag_values=values)
  flags.DEFINE_enum("normalization", None, list(recipes.NORMALIZATIONS), "Input normalization: "
                    "dataset (the training set's mean and std) or reference (the reference "
                    "package's CIFAR-10 constants, which its .pth baselines expect) or imagenet "
                    "(torchvision's ImageNet constants) (default: the recipe's).",
                    flag_values=values)
  flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.", flag_values=values)
  flags.DEFINE_integer("seed", _D.seed, "Random seed (init, shuffling, augmentation).",
                       flag_values=values)
  flags.DEFINE_string("dataset", _D.dataset, "tensorflow-datasets name (e.g. cifar10, "
                      "imagenet2012), used without --data_dir or prepared inside it.",
                      flag_values=values)
  flags.DEFINE_string("data_dir", None, "Local images: a folder with train/<class>/ and "
                      "test/<class>/ (or val/<class>/: ImageNet layout), a .tar.gz of one, or "
                      "a folder holding a prepared tfds dataset.", flag_values=values)
  flags.DEFINE_enum("input", _D.input, ["auto", "memory", "streaming"], "Hold the data in "
                    "memory or stream them with Grain; auto streams ImageNet-layout folders "
                    "(val/), prepared tfds datasets and folders over 1 GiB.", flag_values=values)
  flags.DEFINE_integer("image_size", _D.image_size, "Streamed input: the side images are "
                       "cropped and resized to (Inception crop for training, resize + center "
                       "crop for test).", flag_values=values)
  flags.DEFINE_integer("data_workers", None, "Streamed input: Grain worker processes that "
                       "decode and augment (0 = in the training process; default half the "
                       "CPUs, at most 8).", flag_values=values)
  flags.DEFINE_integer("train_examples", 0, "Use the first N training images (0 = all).",
                       flag_values=values)
  flags.DEFINE_integer("test_examples", 0, "Use the first N test images (0 = all).",
                       flag_values=values)
  flags.DEFINE_string("pretrained", None, "Workdir of a float run to start from, or a "
                      "reference package .pth (its ResNet-18 state_dict; with "
                      "--model=resnet18_reference; needs PyTorch).", flag_values=values)
  flags.DEFINE_string("workdir", None, "Output folder (default: checkpoints/<run name>).",
                      flag_values=values)
  flags.DEFINE_bool("tensorboard", False, "Write TensorBoard events to <workdir>/tensorboard.",
                    flag_values=values)
  flags.DEFINE_integer("histogram_every", 5, "With --tensorboard: histograms every N epochs.",
                       flag_values=values)
  flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its newest "
                    "checkpoint (an epoch's end, or inside an epoch).", flag_values=values)
  flags.DEFINE_integer("checkpoint_every_steps", 0, "Also save a mid-epoch checkpoint every "
                       "N training steps (0: not by count). Epoch ends always save; Ctrl-C "
                       "and SIGTERM save where the run stops.", flag_values=values)
  flags.DEFINE_float("checkpoint_every_minutes", 15.0, "Also save a mid-epoch checkpoint "
                     "when this many minutes passed since the last save (0: not by time): "
                     "a killed run loses at most that much.", flag_values=values)
  flags.DEFINE_string("branch_from", None, "Workdir of a warmup run (one stopped with "
                      "--stop_after_epoch at or before the end of its warmup) whose flags differ "
                      "from this run's only in BR-phase flags (lambda_w, lambda_a, "
                      "freeze_alpha*, br_alpha_grad_*, abr_*): a --workdir without checkpoints "
                      "starts from its checkpoint instead of training the warmup again, and "
                      "trains what this command trains from scratch, bit for bit.",
                      flag_values=values)
  flags.DEFINE_integer("stop_after_epoch", None, "Stop after this epoch (1..--epochs), "
                       "leaving a run that --resume continues; with --stop_after_epoch="
                       "<warmup_epochs>, a warmup that runs differing only in BR-phase flags "
                       "branch from (--branch_from).", flag_values=values)
  flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() before "
                    "anything else; it reads the cluster from the environment (Cloud TPU, "
                    "SLURM, Open MPI, Kubernetes). Every process runs the same command.",
                    flag_values=values)
  return values


def default_dtype() -> str:
  """bfloat16 on GPU/TPU (their matrix units run it at full rate), float32 on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def config_from_flags(values: flags.FlagValues) -> Config:
  """Builds (and so validates) the Config from parsed flags."""
  bits_w = values.bits if values.bits_w is None else values.bits_w
  bits_a = values.bits if values.bits_a is None else values.bits_a
  if not (1 <= values.bits <= 8 or values.bits == 32):
    raise ValueError(f"--bits={values.bits} is not accepted: use an integer in 1..8, or 32 "
                     "for float")
  return Config(
      model=values.model, width=values.width, bits_w=bits_w, bits_a=bits_a,
      first_last_bits=values.first_last_bits, clip=values.clip,
      # dtype unset: default_dtype(), after --distributed
      per_channel=values.per_channel, dtype=values.dtype or "float32",
      remat=values.remat, act_signs=values.act_signs,
      lambda_w=values.lambda_w, lambda_a=values.lambda_a,
      warmup_epochs=values.warmup_epochs, epochs=values.epochs,
      freeze_alpha_w=values.freeze_alpha or values.freeze_alpha_w,
      freeze_alpha_a=values.freeze_alpha or values.freeze_alpha_a,
      br_alpha_grad_a=values.br_alpha_grad_a, br_alpha_grad_w=values.br_alpha_grad_w,
      abr_layers=values.abr_layers,
      abr_exclude_first=values.abr_exclude_first, abr_exclude_last=values.abr_exclude_last,
      abr_clipped=values.abr_clipped, br_schedule=values.br_schedule,
      br_ramp_epochs=values.br_ramp_epochs, alpha_param=values.alpha_param,
      alpha_lr_scale=values.alpha_lr_scale, alpha_weight_decay=values.alpha_weight_decay,
      recipe=values.recipe, lr=values.lr,
      optimizer=values.optimizer, schedule=values.schedule, decay_alphas=values.decay_alphas,
      act_grad_scale=values.act_grad_scale, alpha_init=values.alpha_init,
      normalization=values.normalization,
      adam_eps=values.adam_eps, batch_size=values.batch_size,
      weight_decay=values.weight_decay, momentum=values.momentum, seed=values.seed,
      dataset=values.dataset, data_dir=values.data_dir,
      train_examples=values.train_examples, test_examples=values.test_examples,
      input=values.input, image_size=values.image_size, data_workers=values.data_workers,
      pretrained=values.pretrained)
