"""Runs an LSQ vs LSQ+BR comparison study: every config and seed, one JSON each, a summary.

    python scripts/experiments.py --study_dir=checkpoints/study_W2A2 \\
        --pretrained=checkpoints/resnet20_float_cifar10 \\
        --data_dir=../shared/datasets/cifar10-jpeg.tar.gz

The study trains ``--model`` (default resnet20; any model scripts/train.py takes, e.g.
the small resnet8) at W<bits>A<bits> (``--bits``, default 2; ``--first_last_bits=8``: the
first conv and the last FC at 8 bits, as the literature keeps them) under each of
``--configs`` (``brjax.studies.study.CONFIGS``; default lsq, lsq_br, w_br) for each of ``--seeds``,
with the same warmup and BR epochs for all. ``--preset=evidence`` is issue 14's study
(``brjax.studies.study.PRESETS``; flags given explicitly override it); ``--dry_run`` prints its
plan with estimated times; ``--order=config`` takes every seed of a config before the next
config (default ``seed``: every config of a seed before the next seed); ``--runs=lsq_br_s0,
lsq_br_s1`` takes only the named runs, in that order (one comparison first, or one
machine's share of the study).

Each run is one ``scripts/train.py`` process whose command is recorded in its result; the
runs of a seed share one warmup (``--noshare_warmup``: each trains its own; the metrics are
the same); the folder layout, resume and locking are ``brjax.studies.study``'s and
``brjax.studies.runner``'s. Run the same command again to continue a stopped study: finished
runs are skipped, an interrupted one resumes from its last checkpoint.

Bad flags stop before any work with a one-line error (exit 2); a failed run stops the
study with one line naming its log (exit 1, or 2 if ``scripts/train.py`` refused its flags
or its checkpoints).
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from brjax.studies import plan as study_plan
from brjax.studies import results as study_results
from brjax.studies import runner as study_runner
from brjax.studies import study
from brjax.training import cli, run_control
from brjax.training.config import MODELS

FLAGS = flags.FlagValues()
flags.DEFINE_string("study_dir", None, "Folder of the study: runs, results, summary "
                    "(required).", flag_values=FLAGS)
flags.DEFINE_string("pretrained", None, "Workdir of a float baseline run: every run starts "
                    "from it, and the summary shows its accuracy.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Local images (a folder or .tar.gz, as "
                    "scripts/train.py takes); unset: tensorflow-datasets cifar10.",
                    flag_values=FLAGS)
flags.DEFINE_integer("bits", 2, "Weight and activation bit width of the study (2..8).",
                     flag_values=FLAGS)
flags.DEFINE_string("model", study.STUDY_DEFAULTS["model"], "Model of every run "
                    f"(scripts/train.py's --model): one of {', '.join(MODELS)}.",
                    flag_values=FLAGS)
flags.DEFINE_integer("first_last_bits", None, "The first conv and the last FC (kernel and "
                     "input) at these bits (1..8; 32 keeps them float), every other layer at "
                     "--bits (scripts/train.py's --first_last_bits); unset: every layer at "
                     "--bits.", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, comma-separated.", flag_values=FLAGS)
flags.DEFINE_list("configs", list(study.DEFAULT_CONFIGS), f"Configs, comma-separated, from "
                  f"{', '.join(study.CONFIGS)}.", flag_values=FLAGS)
flags.DEFINE_string("preset", None, f"A named study ({', '.join(study.PRESETS)}): its "
                    "flags, unless given explicitly.", flag_values=FLAGS)
flags.DEFINE_string("recipe", "brjax", "Training recipe of every run (scripts/train.py's "
                    "--recipe).", flag_values=FLAGS)
flags.DEFINE_bool("share_warmup", True, "Train each seed's warmup once and start its runs "
                  "from it (--branch_from): the same metrics, fewer epochs.", flag_values=FLAGS)
flags.DEFINE_enum("order", "seed", list(study.ORDERS), "Order of the runs: seed (every "
                  "config of a seed, then the next seed) or config (every seed of a config, "
                  "then the next config). Results do not depend on it.", flag_values=FLAGS)
flags.DEFINE_list("runs", [], "Take only these runs (<config>_s<seed>, comma-separated), in "
                  "this order; unset: every run of the study. Runs are named in the plan "
                  "(--dry_run). Like --order, not a study flag.", flag_values=FLAGS)
flags.DEFINE_integer("warmup_epochs", 30, "LSQ-only epochs before BR (every config).",
                     flag_values=FLAGS)
flags.DEFINE_integer("epochs", 100, "Total epochs, warmup included.", flag_values=FLAGS)
flags.DEFINE_float("lr", 0.01, "Peak learning rate (the rate for QAT from a float model).",
                   flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 128, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_integer("train_examples", 0, "Use the first N training images (0 = all).",
                     flag_values=FLAGS)
flags.DEFINE_integer("test_examples", 0, "Use the first N test images (0 = all).",
                     flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print each run's state and command; run and write "
                  "nothing.", flag_values=FLAGS)
flags.DEFINE_bool("summarize_only", False, "Only rebuild summary.json and summary.md from "
                  "the result JSONs in --study_dir.", flag_values=FLAGS)


def study_dir_flag() -> str:
  """--study_dir, absolute; StudyError if it is missing or a file."""
  if not FLAGS.study_dir:
    raise study.StudyError("--study_dir is required: the folder of the study's runs, "
                           "results and summary")
  path = study.abspath(FLAGS.study_dir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise study.StudyError(f"--study_dir={FLAGS.study_dir} is not accepted: it is a file; "
                           "use a folder (new or of this study)")
  return path


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    study_dir = study_dir_flag()
    if FLAGS.summarize_only:
      others = [f"--{n}" for n in study.STUDY_FLAGS + ("dry_run", "preset", "order", "runs")
                if FLAGS[n].present and n != "pretrained"]
      if others:
        raise study.StudyError(f"--summarize_only reads the study's flags from study.json: "
                               f"leave out {', '.join(others)}")
      print(study_results.summarize_only(study_dir, study.repo_path(FLAGS.pretrained)), end="")
      return 0
    given = {name for name in study.STUDY_FLAGS if FLAGS[name].present}
    flag_values = study.check_study(study.apply_preset(
        FLAGS.preset, {name: FLAGS[name].value for name in study.STUDY_FLAGS}, given))
    if FLAGS.dry_run:
      print("\n".join(study_plan.dry_run(study_dir, flag_values, FLAGS.share_warmup,
                                         FLAGS.order, FLAGS.runs)))
      return 0
    command = shlex.join(["python", os.path.join("scripts", "experiments.py"), *argv[1:]])
    return study_runner.run_study(study_dir, flag_values, command, FLAGS.share_warmup,
                                  FLAGS.order, FLAGS.runs)
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # run_control.Interrupted, or Ctrl-C between two runs
    print("\ninterrupted: run the same command again to continue the study (finished runs "
          "are kept, the current one resumes where it stopped)", file=sys.stderr)
    return (run_control.EXIT_PREEMPTED if getattr(e, "signal", "SIGINT") == "SIGTERM"
            else 130)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
