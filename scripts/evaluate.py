"""Evaluates a training run's checkpoint on its test split (quantized as it was trained).

    python scripts/evaluate.py --workdir=checkpoints/resnet20_float_cifar10 \\
        --data_dir=../shared/datasets/cifar10-jpeg.tar.gz

Reads the run's latest checkpoint (``--checkpoint=best``: its best epoch), rebuilds its
model from the checkpoint's config, normalizes with the run's own statistics, and prints
the test accuracy beside the one the run logged for that epoch. Errors stop with a
one-line message (exit 2).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax.training import cli  # pylint: disable=g-import-not-at-top

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The --workdir of a training run (required).",
                    flag_values=FLAGS)
cli.define_checkpoint(FLAGS)
flags.DEFINE_string("data_dir", None, "The run's images (folder or .tar.gz); default: the "
                    "run's --data_dir.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "Evaluation batch (default: the run's).",
                     flag_values=FLAGS)
flags.DEFINE_bool("json", False, "Print the result as one JSON object.", flag_values=FLAGS)
flags.DEFINE_string("onnx", None, "An ONNX model of this run (scripts/export.py "
                    "--format=onnx): evaluate it in onnxruntime beside brjax, image by image.",
                    flag_values=FLAGS)


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    cli.check_run_workdir(FLAGS.workdir)
    if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
      raise ValueError(f"--batch_size={FLAGS.batch_size} is not accepted: use a positive "
                       "integer")
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  from absl import logging  # pylint: disable=g-import-not-at-top

  from brjax.training import evaluation  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # orbax's read-only-manager warnings
  if FLAGS.onnx:
    return _onnx()
  try:
    result = evaluation.evaluate_run(FLAGS.workdir, prefer=FLAGS.checkpoint,
                                data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size)
  except (ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  if FLAGS.json:
    print(json.dumps(result))
    return 0
  logged = result["logged_test_acc"]
  from brjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  kind, _ = checkpoint.which(FLAGS.workdir, FLAGS.checkpoint)
  print(f"{FLAGS.workdir} ({kind} checkpoint, epoch {result['epoch']}): "
        f"Test Acc={result['test_acc']:.2f}% on {result['test_count']} test images, "
        f"loss {result['test_loss']:.4f} (logged by the run: "
        f"{'n/a' if logged is None else f'{logged:.2f}%'})")
  return 0


def _onnx() -> int:
  from brjax.export import onnx_run  # pylint: disable=g-import-not-at-top
  try:
    r = onnx_run.compare_run(FLAGS.workdir, FLAGS.onnx, prefer=FLAGS.checkpoint,
                             data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size or 256)
  except (ValueError, OSError, ImportError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  if FLAGS.json:
    print(json.dumps(r))
    return 0
  print(f"{FLAGS.onnx} in onnxruntime (epoch {r['epoch']}): Test Acc={r['onnx_acc']:.2f}% on "
        f"{r['count']} test images; brjax {r['brjax_acc']:.2f}%; top-1 agreement "
        f"{100 * r['top1_agreement']:.2f}%, max logit difference {r['max_logit_diff']:.2e} "
        f"(logits up to {r['logit_scale']:.2f})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
