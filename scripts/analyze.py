"""Shows how a trained run's weights and activations sit on their quantization grids.

    python scripts/analyze.py --workdir=checkpoints/<run> [--compare=checkpoints/<other run>]

Reads ``<workdir>/metrics.jsonl`` and the run's latest checkpoint (``--checkpoint=best``: its
best), runs the model on the first ``--examples`` test images of the run's data, and writes
into ``--out`` (default ``<workdir>/analysis/``) what ``brjax.studies.analysis.analyze`` writes:

* ``weights_hist.png``: one histogram per quantized kernel, its levels as vertical lines;
* ``activations_hist.png``: the same for the pre-quantization activations;
* ``br_curves.png``: BR_W, BR_A and test accuracy over epochs;
* ``alpha_curves.png``: every layer's step size over epochs (only if ``metrics.jsonl`` has
  the per-epoch ``"quant"`` entries of ``brjax.quant.metrics``);
* ``metrics.md``: per-layer alpha, mse, near_frac and occupancy (``brjax.quant.metrics``).

With ``--compare`` both runs are drawn in every plot (labelled by kind and workdir name,
e.g. ``LSQ (lsq_s0)`` vs ``LSQ+BR (lsq_br_s0)``) and ``metrics.md`` holds one table per run.
Bad input stops with a one-line error (exit 2); the paths written are printed, one per line.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# pylint: disable=g-import-not-at-top
from brjax.studies import analysis
from brjax.training import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The --workdir of a training run (required).",
                    flag_values=FLAGS)
flags.DEFINE_string("compare", None, "The --workdir of a second run to draw beside the first.",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/analysis).",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Test images to use instead of the run's own --data_dir.",
                    flag_values=FLAGS)
cli.define_checkpoint(FLAGS)
flags.DEFINE_integer("examples", 256, "Number of test images for the activations.",
                     flag_values=FLAGS)


def error(e: Exception) -> int:
  """Prints ``e`` as one ``error:`` line; returns exit status 2."""
  print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
  return 2


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    if not FLAGS.workdir:
      raise ValueError("--workdir is required: use the --workdir of a training run")
    if FLAGS.examples < 1:
      raise ValueError(f"--examples={FLAGS.examples} is not accepted: use an integer >= 1")
    if FLAGS.data_dir is not None and not os.path.exists(FLAGS.data_dir):
      raise ValueError(f"--data_dir={FLAGS.data_dir} is not accepted: no such file or folder; "
                       "use a folder with test/<class>/ images, or a .tar.gz of one")
    workdirs = [("workdir", FLAGS.workdir)] + ([("compare", FLAGS.compare)]
                                               if FLAGS.compare else [])
    histories = [analysis.read_run_history(w, flag) for flag, w in workdirs]
    out = FLAGS.out or os.path.join(FLAGS.workdir, "analysis")
    if os.path.exists(out) and not os.path.isdir(out):
      raise ValueError(f"--out={out} is not accepted: it is a file; use a folder")
  except (flags.Error, ValueError) as e:
    return error(e)

  logging.set_verbosity(logging.ERROR)  # orbax warns about read-only checkpoint managers
  try:
    print(cli.checkpoint_line(FLAGS.workdir, FLAGS.checkpoint), file=sys.stderr)
    written = analysis.analyze(workdirs, histories, out, FLAGS.data_dir, FLAGS.examples,
                               note=lambda msg: print(f"note: {msg}", file=sys.stderr),
                               prefer=FLAGS.checkpoint)
  except (ValueError, OSError) as e:
    return error(e)
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
