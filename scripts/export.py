"""Exports a trained quantized run as integer weight codes (one .npz; see brjax/export.py).

    python scripts/export.py --workdir=checkpoints/resnet20_W2A2_lw1_la1_s42 --out=model.npz

Reads the run's best (else latest) checkpoint, packs every layer's weight codes at 2, 4 or
8 bits, folds BatchNorm, and prints the file size against the float model's. A float run,
or a run with only weights or only activations quantized, is refused. Errors stop with a
one-line message (exit 2).
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax import cli  # pylint: disable=g-import-not-at-top

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The --workdir of a finished quantized training run.",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output file (.npz).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "The run's images (folder or .tar.gz), for the input "
                    "normalization; default: the run's --data_dir.", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    cli.check_run_workdir(FLAGS.workdir)
    if not FLAGS.out:
      raise ValueError("--out is required: the .npz file to write")
    out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
    if not os.path.isdir(out_dir):
      raise ValueError(f"--out={FLAGS.out} is not accepted: folder {out_dir} does not exist")
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  from absl import logging  # pylint: disable=g-import-not-at-top
  from brjax import export  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # orbax's read-only-manager warnings
  try:
    exported = export.export_run(FLAGS.workdir, data_dir=FLAGS.data_dir)
    size = export.save(FLAGS.out, exported)
  except (ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  h = exported.header
  print(f"{FLAGS.out}: {h['model']}, {len(h['layers'])} quantized layers, "
        f"epoch {h['source'].get('epoch')}")
  print(export.describe_size(size, h["source"]["float_bytes"], h["bits_w"], h["bits_a"]))
  codes = sum(export.packed_size(v.size, h["bits_w"]) for k, v in exported.arrays.items()
              if k.endswith("/codes"))
  floats = sum(v.nbytes for k, v in exported.arrays.items() if not k.endswith("/codes"))
  print(f"  codes {codes / 1e6:.3f} MB at {export.packed_bits(h['bits_w'])} bits per weight, "
        f"folded BatchNorm and bias {floats / 1e6:.3f} MB, header and container "
        f"{(size - codes - floats) / 1e6:.3f} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
