"""Writes a generated image folder in ImageNet's layout, to try streaming training offline.

    python scripts/make_image_folder.py --out=/tmp/imagenet_like
    python scripts/train.py --model=mobilenet_v2 --dataset=imagenet2012 \
        --data_dir=/tmp/imagenet_like ...
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax.training import cli  # pylint: disable=g-import-not-at-top

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "Folder to write (train/<class>/, val/<class>/).",
                    flag_values=FLAGS)
flags.DEFINE_integer("classes", 4, "Number of classes.", flag_values=FLAGS)
flags.DEFINE_integer("train_per_class", 32, "Training images per class.", flag_values=FLAGS)
flags.DEFINE_integer("eval_per_class", 8, "Validation images per class.", flag_values=FLAGS)
flags.DEFINE_integer("min_size", 48, "Smallest image side.", flag_values=FLAGS)
flags.DEFINE_integer("max_size", 96, "Largest image side.", flag_values=FLAGS)
flags.DEFINE_string("eval_folder", "val", "val (ImageNet layout) or test.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    if not FLAGS.out:
      raise ValueError("--out is required: the folder to write")
    if FLAGS.eval_folder not in ("val", "test"):
      raise ValueError(f"--eval_folder={FLAGS.eval_folder} is not accepted: use val or test")
    from brjax.data import synthetic_images  # pylint: disable=g-import-not-at-top
    root = synthetic_images.write_image_folder(
        FLAGS.out, classes=FLAGS.classes, train_per_class=FLAGS.train_per_class,
        eval_per_class=FLAGS.eval_per_class, sizes=(FLAGS.min_size, FLAGS.max_size),
        eval_folder=FLAGS.eval_folder, seed=FLAGS.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = FLAGS.classes * (FLAGS.train_per_class + FLAGS.eval_per_class)
  print(f"wrote {n} JPEGs to {root} (train/, {FLAGS.eval_folder}/; {FLAGS.classes} classes)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
