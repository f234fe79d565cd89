"""Exports a trained quantized run as packed integer weight codes (one .npz).

    python scripts/export.py --workdir=checkpoints/resnet20_W2A2_lw1_la1_s42 --out=model.npz

Reads the run's latest checkpoint (``--checkpoint=best``: its best epoch; as analyze and
evaluate), says which, and prints the file size against the float
model's. ``--format``:

* ``integer`` (default; ``brjax/export/integer.py``): every layer's weight codes packed at
  2, 4 or 8 bits and BatchNorm folded, for ``brjax.export.integer_inference.integer_forward``;
  ResNet-20/18 runs with quantized weights and activations only.
* ``quantized`` (``brjax/export/packed.py``): the weight codes packed at their bit width and the
  float rest of the variables, which ``brjax.export.npz.load_variables`` gives back to the same
  model; any run with quantized weights (every model, weight-only runs).

A float run is refused. Errors stop with a one-line message (exit 2).
"""

from __future__ import annotations

import math
import os
import sys

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from brjax.training import cli  # pylint: disable=g-import-not-at-top

FORMATS = ("integer", "quantized", "onnx")

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The --workdir of a finished quantized training run.",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output file (.npz; .onnx with --format=onnx).",
                    flag_values=FLAGS)
cli.define_checkpoint(FLAGS)
flags.DEFINE_string("data_dir", None, "The run's images (folder or .tar.gz), for the input "
                    "normalization of --format=integer of a run whose checkpoint did not "
                    "store it (older runs); default: the run's --data_dir.",
                    flag_values=FLAGS)
flags.DEFINE_enum("format", "integer", FORMATS, "integer: codes and folded BatchNorm for "
                  "integer-only inference (ResNet-20/18); quantized: codes and the float "
                  "rest, loaded back into the same model (any quantized run).",
                  flag_values=FLAGS)


def _size(num_bytes: float) -> str:
  return f"{num_bytes / 1e6:.2f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.1f} kB"


def _integer(workdir: str, out: str) -> list[str]:
  from brjax.export import integer as integer_export  # pylint: disable=g-import-not-at-top
  from brjax.export import packing  # pylint: disable=g-import-not-at-top
  try:
    exported = integer_export.export_run(workdir, data_dir=FLAGS.data_dir,
                                         prefer=FLAGS.checkpoint)
  except integer_export.NotIntegerExportable as e:
    raise ValueError(f"{e}; --format=quantized exports any quantized run") from e
  size = integer_export.save(out, exported)
  h = exported.header
  codes = sum(packing.packed_size(v.size, h["bits_w"]) for k, v in exported.arrays.items()
              if k.endswith("/codes"))
  floats = sum(v.nbytes for k, v in exported.arrays.items() if not k.endswith("/codes"))
  return [f"{out}: {h['model']}, {len(h['layers'])} quantized layers, "
          f"epoch {h['source'].get('epoch')}",
          integer_export.describe_size(size, h["source"]["float_bytes"], h["bits_w"],
                                       h["bits_a"]),
          f"  codes {codes / 1e6:.3f} MB at {_packed_bits([h['bits_w']])}, folded "
          f"BatchNorm and bias {floats / 1e6:.3f} MB, header and container "
          f"{(size - codes - floats) / 1e6:.3f} MB",
          f"  input normalization: mean {_floats(h['normalization']['mean'])} std "
          f"{_floats(h['normalization']['std'])} ({h['source']['normalization']})"]


def _floats(values: list[float]) -> str:
  return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _packed_bits(bits: list[int]) -> str:
  """``2 bits per weight`` (or ``2-4 bits``): what codes of ``bits`` bits are packed at,
  and the code widths where they differ: ``2 bits per weight (1-bit ternary codes)``."""
  from brjax.export import packing  # pylint: disable=g-import-not-at-top
  packed = sorted({packing.packed_bits(b) for b in bits})
  text = f"{'-'.join(map(str, sorted({packed[0], packed[-1]})))} bits per weight"
  narrower = sorted({b for b in bits if b != packing.packed_bits(b)})
  if narrower:
    text += f" ({', '.join(f'{b}-bit' for b in narrower)}"
    text += f"{' ternary' if narrower == [1] else ''} codes)"
  return text


def _quantized(workdir: str, out: str) -> list[str]:
  # pylint: disable=g-import-not-at-top
  from brjax.export import npz, packing
  from brjax.export import packed as export
  exported = export.export_run(workdir, prefer=FLAGS.checkpoint)
  size = npz.save(out, exported)
  h = exported.header
  config = h["source"]["config"]
  codes = sum(packing.packed_size(math.prod(k["shape"]), k["bits"]) for k in h["kernels"])
  floats = sum(v.nbytes for v in exported.floats.values())
  bits = sorted({k["bits"] for k in h["kernels"]})
  ratio = h["float_bytes"] / size
  return [f"{out}: {config['model']} (W{config['bits_w']}A{config['bits_a']}), "
          f"{len(h['kernels'])} quantized kernels, epoch {h['source'].get('epoch')}",
          f"exported {_size(size)} vs float {_size(h['float_bytes'])}: "
          + (f"{ratio:.1f}x smaller" if ratio >= 1 else f"{1 / ratio:.1f}x larger"),
          f"  codes {_size(codes)} at {_packed_bits(bits)}, float rest "
          f"{_size(floats)}, header and container {_size(size - codes - floats)}"]


def _onnx(workdir: str, out: str) -> list[str]:
  import onnx  # pylint: disable=g-import-not-at-top

  from brjax.export import onnx_check, onnx_run  # pylint: disable=g-import-not-at-top
  proto = onnx_run.export_run(workdir, prefer=FLAGS.checkpoint)
  onnx.save(proto, out)
  ops = onnx_check.integer_kernels(proto)
  integer = sorted(s for s, op in ops.items() if op in onnx_check.INTEGER_OPS)
  return [f"{out}: {_size(os.path.getsize(out))}, opset {proto.opset_import[0].version}, "
          f"{len(integer)} of {len(ops)} quantized kernels run as integer kernels in "
          f"onnxruntime (float: {sorted(set(ops) - set(integer)) or 'none'})",
          f"  accuracy in onnxruntime: python scripts/evaluate.py --workdir={workdir} "
          f"--checkpoint={FLAGS.checkpoint} --onnx={out}"]


def main(argv: list[str]) -> int:
  try:
    cli.parse_flags(FLAGS, argv)
    cli.check_run_workdir(FLAGS.workdir)
    if not FLAGS.out:
      raise ValueError("--out is required: the file to write (.npz; .onnx with --format=onnx)")
    out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
    if not os.path.isdir(out_dir):
      raise ValueError(f"--out={FLAGS.out} is not accepted: folder {out_dir} does not exist")
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # orbax's read-only-manager warnings
  try:
    lines = [cli.checkpoint_line(FLAGS.workdir, FLAGS.checkpoint)]
    lines += {"integer": _integer, "quantized": _quantized, "onnx": _onnx}[FLAGS.format](
        FLAGS.workdir, FLAGS.out)
  except (ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
