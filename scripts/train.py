"""Trains a CIFAR ResNet (or one of the papers' ImageNet models) with LSQ and Bin Regularization.

    python scripts/train.py --bits=2 --lambda_a=1.0 --data_dir=../shared/datasets/cifar10-jpeg.tar.gz

Flags are validated before any work; a bad value stops with a one-line error (exit 2). A
run whose training loss becomes NaN or infinite stops with a one-line error (exit 1),
without saving that epoch.
Ctrl-C stops between two steps, keeps the checkpoints of the finished epochs, prints the
command that continues the run, and exits 130.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax import cli  # pylint: disable=g-import-not-at-top
from brjax import recipes  # pylint: disable=g-import-not-at-top
from brjax.config import Config, MODELS  # pylint: disable=g-import-not-at-top

_D = Config()
FLAGS = flags.FlagValues()
flags.DEFINE_enum("model", _D.model, list(MODELS), "CIFAR ResNet: resnet20, resnet18 "
                  "(brjax's), resnet20_option_a (He et al.'s parameter-free shortcuts), "
                  "resnet18_reference (the reference package's layout; reads its .pth). The papers' "
                  "ImageNet models (brjax.paper_models, quantized by paper_rules: first and "
                  "last layer 8 bits, layer inputs quantized): resnet18_imagenet, resnet50, "
                  "mobilenet_v2 (their small-input variant for images of at most 64 pixels).",
                  flag_values=FLAGS)
flags.DEFINE_integer("width", None, "resnet18_reference: channels of the first stage "
                     "(default 64, the reference's).", flag_values=FLAGS)
flags.DEFINE_integer("bits", _D.bits_w, "Bit width of weights and activations: 1..8, or 32 "
                     "(float). 1 bit: ternary weights (-1, 0, 1), binary activations (0, 1).",
                     flag_values=FLAGS)
flags.DEFINE_integer("bits_w", None, "Weight bit width (default: --bits).", flag_values=FLAGS)
flags.DEFINE_integer("bits_a", None, "Activation bit width (default: --bits).",
                     flag_values=FLAGS)
flags.DEFINE_float("clip", None, "Clip ReLU at this value (6 = ReLU6); unset: plain ReLU.",
                   flag_values=FLAGS)
flags.DEFINE_float("lambda_w", _D.lambda_w, "W-BR weight (0 disables).", flag_values=FLAGS)
flags.DEFINE_float("lambda_a", _D.lambda_a, "A-BR weight (0 disables, and nothing is sown).",
                   flag_values=FLAGS)
flags.DEFINE_integer("warmup_epochs", _D.warmup_epochs, "Epochs of LSQ-only warmup.",
                     flag_values=FLAGS)
flags.DEFINE_integer("epochs", _D.epochs, "Total epochs (warmup included).", flag_values=FLAGS)
flags.DEFINE_bool("freeze_alpha", False, "Freeze weight and activation alphas after warmup.",
                  flag_values=FLAGS)
flags.DEFINE_bool("freeze_alpha_w", False, "Freeze weight alphas after warmup.",
                  flag_values=FLAGS)
flags.DEFINE_bool("freeze_alpha_a", False, "Freeze activation alphas after warmup.",
                  flag_values=FLAGS)
flags.DEFINE_bool("br_alpha_grad_a", _D.br_alpha_grad_a,
                  "Let A-BR gradients reach activation alphas.", flag_values=FLAGS)
flags.DEFINE_enum("br_alpha_grad_w", _D.br_alpha_grad_w, ["full", "lsq", "none"],
                  "W-BR's gradient to the weight alphas: full (the BR paper's and the "
                  "reference's), lsq (scaled by LSQ's g = 1/sqrt(N*Qp), as the CE gradient; "
                  "steadier for 8-bit layers), none.", flag_values=FLAGS)
flags.DEFINE_bool("per_channel", False, "One weight step size per output channel (else one "
                  "per kernel).", flag_values=FLAGS)
flags.DEFINE_string("abr_layers", None, "A-BR only on activation sites whose module path "
                    "matches this regular expression (re.search), e.g. 'BasicBlock_[0-4]/'; "
                    "unset: every site.", flag_values=FLAGS)
flags.DEFINE_bool("abr_exclude_first", False, "Leave the first activation site (in forward "
                  "order) out of A-BR.", flag_values=FLAGS)
flags.DEFINE_bool("abr_exclude_last", False, "Leave the last activation site out of A-BR.",
                  flag_values=FLAGS)
flags.DEFINE_enum("recipe", _D.recipe, list(recipes.RECIPES), "Training recipe: brjax (SGD "
                  "0.1, per-step cosine, ...), reference (the reference package's QAT: Adam "
                  "0.01, constant-then-cosine per epoch, ...), reference_baseline (its float "
                  "baseline: SGD 0.1, step decay). The flags below override its parts.",
                  flag_values=FLAGS)
flags.DEFINE_float("lr", None, "Peak learning rate (default: the recipe's).", flag_values=FLAGS)
flags.DEFINE_enum("optimizer", None, list(recipes.OPTIMIZERS), "Optimizer (default: the "
                  "recipe's).", flag_values=FLAGS)
flags.DEFINE_enum("schedule", None, list(recipes.SCHEDULES), "LR schedule (default: the "
                  "recipe's): cosine = per step to 0 over the run; constant_cosine = constant "
                  "through warmup, then cosine per epoch over the BR epochs; step = x0.1 "
                  "after 50% and 75% of the epochs.", flag_values=FLAGS)
flags.DEFINE_float("weight_decay", None, "L2 weight decay added to the gradient (default: "
                   "the recipe's).", flag_values=FLAGS)
flags.DEFINE_bool("decay_alphas", None, "Weight decay on the step sizes too (default: the "
                  "recipe's).", flag_values=FLAGS)
flags.DEFINE_float("momentum", None, "SGD momentum (default: the recipe's).",
                   flag_values=FLAGS)
flags.DEFINE_float("adam_eps", None, "Adam epsilon (default: the recipe's).",
                   flag_values=FLAGS)
flags.DEFINE_enum("act_grad_scale", None, list(recipes.ACT_GRAD_SCALES), "Activation step "
                  "size gradient scale 1/sqrt(N*qp): N per example (LSQ paper) or per batch "
                  "(the reference) (default: the recipe's).", flag_values=FLAGS)
flags.DEFINE_enum("alpha_init", None, list(recipes.ALPHA_INITS), "Step-size init: calibrate "
                  "(first unaugmented images; eval mode after --pretrained) or first_step "
                  "(train-mode forward of the first training batch, as the reference) "
                  "(default: the recipe's).", flag_values=FLAGS)
flags.DEFINE_enum("normalization", None, list(recipes.NORMALIZATIONS), "Input normalization: "
                  "dataset (the training set's mean and std) or reference (the reference "
                  "package's CIFAR-10 constants, which its .pth baselines expect) or imagenet "
                  "(torchvision's ImageNet constants) (default: the recipe's).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_integer("seed", _D.seed, "Random seed (init, shuffling, augmentation).",
                     flag_values=FLAGS)
flags.DEFINE_string("dataset", _D.dataset, "tensorflow-datasets name (e.g. cifar10, "
                    "imagenet2012), used without --data_dir or prepared inside it.",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Local images: a folder with train/<class>/ and "
                    "test/<class>/ (or val/<class>/: ImageNet layout), a .tar.gz of one, or "
                    "a folder holding a prepared tfds dataset.", flag_values=FLAGS)
flags.DEFINE_enum("input", _D.input, ["auto", "memory", "streaming"], "Hold the data in "
                  "memory or stream them with Grain; auto streams ImageNet-layout folders "
                  "(val/), prepared tfds datasets and folders over 1 GiB.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", _D.image_size, "Streamed input: the side images are "
                     "cropped and resized to (Inception crop for training, resize + center "
                     "crop for test).", flag_values=FLAGS)
flags.DEFINE_integer("data_workers", None, "Streamed input: Grain worker processes that "
                     "decode and augment (0 = in the training process; default half the "
                     "CPUs, at most 8).", flag_values=FLAGS)
flags.DEFINE_integer("train_examples", 0, "Use the first N training images (0 = all).",
                     flag_values=FLAGS)
flags.DEFINE_integer("test_examples", 0, "Use the first N test images (0 = all).",
                     flag_values=FLAGS)
flags.DEFINE_string("pretrained", None, "Workdir of a float run to start from, or a "
                    "reference package .pth (its ResNet-18 state_dict; with "
                    "--model=resnet18_reference; needs PyTorch).", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Output folder (default: checkpoints/<run name>).",
                    flag_values=FLAGS)
flags.DEFINE_bool("tensorboard", False, "Write TensorBoard events to <workdir>/tensorboard.",
                  flag_values=FLAGS)
flags.DEFINE_integer("histogram_every", 5, "With --tensorboard: histograms every N epochs.",
                     flag_values=FLAGS)
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its latest "
                  "checkpoint.", flag_values=FLAGS)
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() before "
                  "anything else; it reads the cluster from the environment (Cloud TPU, "
                  "SLURM, Open MPI, Kubernetes). Every process runs the same command.",
                  flag_values=FLAGS)


def config_from_flags(values: flags.FlagValues) -> Config:
  """Builds (and so validates) the Config from parsed flags."""
  bits_w = values.bits if values.bits_w is None else values.bits_w
  bits_a = values.bits if values.bits_a is None else values.bits_a
  if not (1 <= values.bits <= 8 or values.bits == 32):
    raise ValueError(f"--bits={values.bits} is not accepted: use an integer in 1..8, or 32 "
                     "for float")
  return Config(
      model=values.model, width=values.width, bits_w=bits_w, bits_a=bits_a, clip=values.clip,
      per_channel=values.per_channel,
      lambda_w=values.lambda_w, lambda_a=values.lambda_a,
      warmup_epochs=values.warmup_epochs, epochs=values.epochs,
      freeze_alpha_w=values.freeze_alpha or values.freeze_alpha_w,
      freeze_alpha_a=values.freeze_alpha or values.freeze_alpha_a,
      br_alpha_grad_a=values.br_alpha_grad_a, br_alpha_grad_w=values.br_alpha_grad_w,
      abr_layers=values.abr_layers,
      abr_exclude_first=values.abr_exclude_first, abr_exclude_last=values.abr_exclude_last,
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


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    config = config_from_flags(FLAGS)
    if FLAGS.histogram_every < 1:
      raise ValueError(f"--histogram_every={FLAGS.histogram_every} is not accepted: use an "
                       "integer >= 1")
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = FLAGS.workdir or os.path.join("checkpoints", config.name)
  if FLAGS.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    try:
      jax.distributed.initialize()  # before any other use of JAX
    except (ValueError, RuntimeError) as e:
      print(f"error: --distributed: jax.distributed.initialize() failed: {e}", file=sys.stderr)
      return 2

  try:
    return train(config, workdir)
  except KeyboardInterrupt as e:  # train.Interrupted, or Ctrl-C before the first step
    print(interrupted_message(argv, workdir, getattr(e, "saved_epoch", None)),
          file=sys.stderr)
    return 130


def train(config: Config, workdir: str) -> int:
  """Trains; returns the exit status (2 after a one-line error, 1 if the run diverged)."""
  from brjax import checkpoint, run_control, train as train_lib  # pylint: disable=g-import-not-at-top
  try:
    train_lib.train_and_evaluate(config, workdir, resume=FLAGS.resume,
                                 tensorboard=FLAGS.tensorboard,
                                 histogram_every=FLAGS.histogram_every)
  except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except run_control.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def interrupted_message(argv: list[str], workdir: str, saved_epoch: int | None) -> str:
  """What a Ctrl-C left, and the command that continues the run (``--resume`` added)."""
  if saved_epoch is None:
    saved_epoch = _saved_epoch(workdir)
  if saved_epoch is None:
    return f"interrupted before any epoch finished: nothing saved in {workdir}"
  args = [a for a in argv[1:] if a not in ("--resume", "--noresume", "--resume=false")]
  command = shlex.join(["python", argv[0], *args, "--resume"])
  return (f"interrupted: the checkpoint of epoch {saved_epoch} is kept in {workdir}; "
          f"continue with\n  {command}")


def _saved_epoch(workdir: str) -> int | None:
  try:
    from brjax import checkpoint  # pylint: disable=g-import-not-at-top
    return checkpoint.peek_latest(workdir)[0]
  except Exception:  # pylint: disable=broad-except
    return None


if __name__ == "__main__":
  sys.exit(main(sys.argv))
