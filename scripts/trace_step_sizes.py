"""Traces a run's step sizes through the steps after one of its checkpoints: why they fall.

    python scripts/trace_step_sizes.py --workdir=checkpoints/<run> \\
        --layers='QuantReLU_1/alpha' --steps=100 --every=5

Restores the run's checkpoint of ``--epoch`` (default: its latest kept), trains ``--steps``
steps of the next epoch exactly as the run would (its batches, phase, optimizer, frozen
step sizes), and every ``--every`` steps prints, for each step size ``--layers`` selects,
its value and the gradient that each loss term sends it: CE, ``lambda_w * BR_W``,
``lambda_a * BR_A``, and the recipe's weight decay (``weight_decay * alpha`` when it decays
the step sizes; ``brjax.studies.step_size_trace``). A positive gradient lowers the step size.
It ends with one line per step size: its start and end value, each term's mean gradient
and at how many samples it was positive. BR-phase flags (``--lambda_a``, ``--abr_clipped``,
``--freeze_alpha_a``, ...) trace the same steps under another BR than the run's. Writes
nothing unless ``--json_out`` (one JSON line per sample). Bad input stops with a one-line
error (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# pylint: disable=g-import-not-at-top
from brjax.studies import step_size_trace
from brjax.training import checkpoint, cli

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The --workdir of a training run (required).",
                    flag_values=FLAGS)
flags.DEFINE_integer("epoch", None, "Start from the checkpoint of this epoch (default: the "
                     "latest kept; checkpoints/latest keeps the last two).", flag_values=FLAGS)
flags.DEFINE_integer("steps", 100, "Training steps to trace (at most one epoch).",
                     flag_values=FLAGS)
flags.DEFINE_integer("every", 5, "Sample every this many steps.", flag_values=FLAGS)
flags.DEFINE_string("layers", None, "Regex on step-size paths, e.g. 'QuantReLU_1/alpha' "
                    "(default: every step size).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "The run's images, if not at its --data_dir any more.",
                    flag_values=FLAGS)
flags.DEFINE_string("json_out", None, "Write each sample as a JSON line to this file.",
                    flag_values=FLAGS)
flags.DEFINE_float("lambda_w", None, "Override: W-BR weight.", flag_values=FLAGS)
flags.DEFINE_float("lambda_a", None, "Override: A-BR weight.", flag_values=FLAGS)
flags.DEFINE_bool("freeze_alpha_w", None, "Override: freeze weight step sizes in BR.",
                  flag_values=FLAGS)
flags.DEFINE_bool("freeze_alpha_a", None, "Override: freeze activation step sizes in BR.",
                  flag_values=FLAGS)
flags.DEFINE_bool("br_alpha_grad_a", None, "Override: A-BR's gradient reaches the "
                  "activation step sizes through its levels.", flag_values=FLAGS)
flags.DEFINE_enum("br_alpha_grad_w", None, ["full", "lsq", "none"], "Override: W-BR's "
                  "gradient to the weight step sizes.", flag_values=FLAGS)
flags.DEFINE_enum("abr_clipped", None, ["include", "exclude"], "Override: values above the "
                  "top level in A-BR's top bin, or left out.", flag_values=FLAGS)

OVERRIDES = ("lambda_w", "lambda_a", "freeze_alpha_w", "freeze_alpha_a", "br_alpha_grad_a",
             "br_alpha_grad_w", "abr_clipped")


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    if not FLAGS.workdir:
      raise ValueError("--workdir is required: use the --workdir of a training run")
    if FLAGS.json_out and os.path.isdir(FLAGS.json_out):
      raise ValueError(f"--json_out={FLAGS.json_out} is not accepted: it is a folder; use a "
                       "file path")
    overrides = {name: FLAGS[name].value for name in OVERRIDES if FLAGS[name].value is not None}
    logging.set_verbosity(logging.ERROR)  # orbax warns about read-only checkpoint managers
    print(f"{'step':>5}  step size  value  gradient of: " + "  ".join(step_size_trace.PUSHES),
          flush=True)
    out = open(FLAGS.json_out, "w") if FLAGS.json_out else None  # pylint: disable=consider-using-with

    def log(sample: step_size_trace.Sample) -> None:
      print("\n".join(step_size_trace.format_sample(sample)), flush=True)
      if out is not None:
        out.write(json.dumps(dataclasses.asdict(sample)) + "\n")
        out.flush()

    try:
      result = step_size_trace.trace(
          FLAGS.workdir, epoch=FLAGS.epoch, steps=FLAGS.steps, every=FLAGS.every,
          layers=FLAGS.layers, overrides=overrides, data_dir=FLAGS.data_dir, log=log)
    finally:
      if out is not None:
        out.close()
  except (flags.Error, ValueError, OSError, checkpoint.CheckpointError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 2
  changed = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"
  print(f"# from {result.workdir} at epoch {result.epoch}: {result.steps} steps of epoch "
        f"{result.epoch + 1} ({result.phase}); overrides of the run's BR flags: {changed}")
  print("\n".join(step_size_trace.format_summary(result)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
