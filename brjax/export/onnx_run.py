"""A training run's checkpoint as ONNX, and its test accuracy in onnxruntime against brjax's.

    proto = onnx_run.export_run("checkpoints/w2a2")            # brjax.export.to_onnx
    result = onnx_run.compare_run("checkpoints/w2a2", "model.onnx")

:func:`compare_run` evaluates the run's test split (the run's own normalization, as
``brjax.training.evaluation.evaluate_run``) twice, batch by batch: brjax's jitted quantized
evaluation (``model.apply``) and the ONNX model in onnxruntime (CPU); it reports both
accuracies, the fraction of images whose top-1 class agrees and the largest logit
difference. ``scripts/evaluate.py --onnx=model.onnx`` prints it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from brjax.export import onnx_check, onnx_export


def load_run(workdir: str, prefer: str = "best") -> tuple[Any, dict, dict]:
  """``(model, variables, meta)`` of a run's checkpoint (the model rebuilt from its config)."""
  from brjax.models import cifar  # pylint: disable=g-import-not-at-top
  from brjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  variables, meta = checkpoint.restore_pretrained(workdir, prefer)
  config, data = meta.get("config") or {}, meta.get("data") or {}
  if "model" not in config or "class_names" not in data:
    raise ValueError(f"the checkpoint meta in {workdir} lacks its config or class names: it "
                     "was not written by brjax.training.train")
  model = cifar.from_run_config(config, len(data["class_names"]), data.get("image_size", 32))
  return model, variables, meta


def export_run(workdir: str, *, prefer: str = "best", integer_ops: bool = True) -> Any:
  """The ONNX model (``onnx.ModelProto``) of a run's best (or latest) checkpoint.

  Its input is the run's normalized NHWC float images (``(x / 255 - mean) / std``, the
  run's statistics, kept in the model's metadata as ``brjax.normalization``).
  """
  model, variables, meta = load_run(workdir, prefer)
  size = (meta.get("data") or {}).get("image_size", 32)
  sample = np.zeros((1, size, size, 3), np.float32)
  proto = onnx_export.to_onnx(model, variables, sample, train=False, integer_ops=integer_ops)
  import json  # pylint: disable=g-import-not-at-top

  from onnx import helper  # pylint: disable=g-import-not-at-top
  data = meta.get("data") or {}
  props = {p.key: p.value for p in proto.metadata_props}
  props["brjax.normalization"] = json.dumps({k: data.get(k) for k in ("mean", "std")})
  props["brjax.run"] = json.dumps({"epoch": meta.get("epoch"),
                                   "best_test_acc": meta.get("best_test_acc"),
                                   "class_names": data.get("class_names")})
  del proto.metadata_props[:]
  helper.set_model_props(proto, props)
  return proto


def compare_run(workdir: str, onnx_model: Any, *, prefer: str = "best",
                data_dir: str | None = None, batch_size: int = 256,
                limit: int | None = None, threads: int = 0) -> dict[str, Any]:
  """brjax's and onnxruntime's test accuracy of a run, image by image.

  Args:
    workdir: the run; ``prefer``: its checkpoint (must be the one exported).
    onnx_model: the exported model (a path, bytes or ModelProto).
    data_dir: the run's images if not at its ``--data_dir``.
    batch_size: images per batch (both sides); ``limit``: only the first ``limit`` test
      images (tests); ``threads``: ORT intra-op threads.

  Returns:
    ``{"count", "brjax_acc", "onnx_acc" (percent), "top1_agreement" (fraction),
    "max_logit_diff", "logit_scale" (max |logit|), "epoch"}``.
  """
  from brjax.data import datasets, streaming  # pylint: disable=g-import-not-at-top
  model, variables, meta = load_run(workdir, prefer)
  ds = datasets.load(meta["config"], data_dir=data_dir, train_examples=1,
                     stats=datasets.stored_stats(meta))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  sess = onnx_check.session(onnx_model, threads=threads)
  name = sess.get_inputs()[0].name
  ours, theirs, labels = [], [], []
  seen = 0
  for batch in streaming.eval_batches(ds, batch_size):
    keep = np.asarray(batch["mask"], bool)
    images = np.asarray(batch["image"], np.float32)[keep]
    if limit is not None:
      images = images[:max(0, limit - seen)]
    if not len(images):
      break
    ours.append(np.asarray(apply(variables, images)))
    theirs.append(sess.run(None, {name: images})[0])
    labels.append(np.asarray(batch["label"])[keep][:len(images)])
    seen += len(images)
  ours, theirs, labels = map(np.concatenate, (ours, theirs, labels))
  return {"count": int(len(labels)),
          "brjax_acc": 100.0 * float(np.mean(ours.argmax(-1) == labels)),
          "onnx_acc": 100.0 * float(np.mean(theirs.argmax(-1) == labels)),
          "top1_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
          "max_logit_diff": float(np.max(np.abs(ours - theirs))),
          "logit_scale": float(np.max(np.abs(ours))), "epoch": meta.get("epoch")}
