"""Benchmarks brjax training on this machine: step times, BR cost, compiles, input, FLOP/s.

    python scripts/benchmark.py [--quick] [--model=resnet20] [--batch_size=128] [--json_out=FILE]
        [--[no]plain_models] [--[no]scale] [--[no]onnx]

Runs ``brjax.bench.training.run_benchmark`` (its docstring lists every measurement): step times of
float, QAT W2A2 and QAT W2A2 + BR, interleaved; BR alone at 2/4/8 bits; compile times and
counts of a two-phase run; the input pipeline; FLOP/s; and, with ``--plain_models`` (on by
default, off with ``--quick``), unmodified Flax models quantized by ``brjax.quantize_model``
against float and Qwix; with ``--scale`` (likewise), the BR step in bfloat16 against
float32 and the memory plan of ResNet-50's BR step without A-BR, with it, and with remat;
with ``--onnx`` (likewise, and when onnxruntime is installed), the ONNX export in
onnxruntime (integer kernels, QDQ, float) against brjax's jitted evaluation.

Output: a table of the measurements and the targets with PASS/FAIL on stdout (progress on
stderr); ``--json_out`` writes one JSON line per measurement (``name``, ``value``,
``unit``, ``context``) to a file. With ``--quick`` (batch 32, 3 rounds) the timing targets
are shown as ``SKIP`` (not checked: too few, too small steps to mean anything); the compile
counts are checked in both modes. The exit status is 0 whether targets pass or not
(timings are noisy); flag errors exit 2.
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax.training import cli  # pylint: disable=g-import-not-at-top
from brjax.training import config as config_lib  # pylint: disable=g-import-not-at-top

FLAGS = flags.FlagValues()
flags.DEFINE_bool("quick", False, "A short run CI can afford: fewer rounds, smaller "
                  "inputs, batch 32 unless --batch_size is given.", flag_values=FLAGS)
flags.DEFINE_enum("model", "resnet20",
                  [f"resnet{d}" for d in config_lib.CIFAR_RESNET_DEPTHS] + ["resnet18"],
                  "CIFAR ResNet (brjax's, projection shortcuts).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 128, "Global batch size of the timed steps.",
                     flag_values=FLAGS)
flags.DEFINE_integer("rounds", 0, "Timed rounds of the three steps (0: 10, or 3 with "
                     "--quick).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Images for the compile-count run (a folder or "
                    ".tar.gz as scripts/train.py takes); unset: a tiny synthetic folder.",
                    flag_values=FLAGS)
flags.DEFINE_bool("plain_models", None, "Also time unmodified Flax models (ViT, MobileNetV2) "
                  "quantized by brjax.quantize_model against float and Qwix (default: on, "
                  "off with --quick).", flag_values=FLAGS)
flags.DEFINE_bool("scale", None, "Also measure the BR step in bfloat16 against float32, "
                  "and the step memory of ResNet-50 (224x224, batch 32) without A-BR, with "
                  "it, and with remat (default: on, off with --quick).", flag_values=FLAGS)
flags.DEFINE_bool("onnx", None, "Also time the ONNX export in onnxruntime: integer "
                  "kernels, QDQ and float, against brjax's jitted evaluation (default: on, off "
                  "with --quick; skipped without onnxruntime).", flag_values=FLAGS)
flags.DEFINE_string("json_out", None, "Write one JSON line per measurement to this file.",
                    flag_values=FLAGS)


def progress(what: str) -> None:
  print(f"benchmark: {what}...", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    if FLAGS.batch_size < 1:
      raise ValueError(f"--batch_size={FLAGS.batch_size} is not accepted: use an integer >= 1")
    if FLAGS.rounds < 0:
      raise ValueError(f"--rounds={FLAGS.rounds} is not accepted: use an integer >= 0")
    if FLAGS.data_dir is not None and not os.path.exists(FLAGS.data_dir):
      raise ValueError(f"--data_dir={FLAGS.data_dir} is not accepted: it does not exist")
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  batch_size = 32 if FLAGS.quick and not FLAGS["batch_size"].present else FLAGS.batch_size
  rounds = FLAGS.rounds or (3 if FLAGS.quick else 10)
  plain_models = not FLAGS.quick if FLAGS.plain_models is None else FLAGS.plain_models
  scale = not FLAGS.quick if FLAGS.scale is None else FLAGS.scale
  onnx = not FLAGS.quick if FLAGS.onnx is None else FLAGS.onnx
  from brjax.bench import training as bench  # pylint: disable=g-import-not-at-top  (JAX: after the flags)
  report = bench.run_benchmark(FLAGS.quick, FLAGS.model, batch_size, rounds, FLAGS.data_dir,
                               FLAGS.json_out, plain_models, scale, onnx=onnx, log=progress)
  print(bench.results_text(report))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
