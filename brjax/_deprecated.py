"""The module paths of brjax 0.1 (one flat package), kept for one release.

brjax 0.2 moved its modules into subpackages (CHANGELOG.md). ``import brjax.train``,
``from brjax import optim`` and ``brjax.history`` still work: each old path is an alias of
the module's new path (the same module object), and its first import warns with a
``DeprecationWarning`` that names the new path. ``brjax.quant``, ``brjax.models``,
``brjax.export``, ``brjax.bench`` and ``brjax.nnx`` kept their names: those packages
export what the old modules did.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED = {
    "brjax.analysis": "brjax.studies.analysis",
    "brjax.bench_plain": "brjax.bench.plain",
    "brjax.bench_scale": "brjax.bench.scale",
    "brjax.bits": "brjax.quant.bits",
    "brjax.checkpoint": "brjax.training.checkpoint",
    "brjax.cli": "brjax.training.cli",
    "brjax.config": "brjax.training.config",
    "brjax.datasets": "brjax.data.datasets",
    "brjax.evaluation": "brjax.training.evaluation",
    "brjax.grain_batches": "brjax.data.grain_batches",
    "brjax.history": "brjax.training.history",
    "brjax.image_data": "brjax.data.image_data",
    "brjax.image_folder": "brjax.data.image_folder",
    "brjax.image_sources": "brjax.data.image_sources",
    "brjax.imagenet_augment": "brjax.data.imagenet_augment",
    "brjax.input_pipeline": "brjax.data.input_pipeline",
    "brjax.integer_export": "brjax.export.integer",
    "brjax.integer_inference": "brjax.export.integer_inference",
    "brjax.metrics": "brjax.quant.metrics",
    "brjax.optim": "brjax.training.optim",
    "brjax.packing": "brjax.export.packing",
    "brjax.paper_models": "brjax.models.paper",
    "brjax.parallel": "brjax.training.parallel",
    "brjax.plain_models": "brjax.models.plain",
    "brjax.plots": "brjax.studies.plots",
    "brjax.quantize": "brjax.quant.quantize",
    "brjax.recipes": "brjax.training.recipes",
    "brjax.reference_resnet": "brjax.models.reference_resnet",
    "brjax.regularizer": "brjax.quant.regularizer",
    "brjax.report": "brjax.training.report",
    "brjax.rules": "brjax.quant.rules",
    "brjax.run_control": "brjax.training.run_control",
    "brjax.run_start": "brjax.training.run_start",
    "brjax.sites": "brjax.quant.sites",
    "brjax.step_size_trace": "brjax.studies.step_size_trace",
    "brjax.steps": "brjax.training.steps",
    "brjax.streaming": "brjax.data.streaming",
    "brjax.study": "brjax.studies.study",
    "brjax.study_plan": "brjax.studies.plan",
    "brjax.study_runner": "brjax.studies.runner",
    "brjax.study_summary": "brjax.studies.summary",
    "brjax.summary": "brjax.training.tensorboard",
    "brjax.synthetic_images": "brjax.data.synthetic_images",
    "brjax.torch_import": "brjax.export.torch_import",
    "brjax.train": "brjax.training.train",
    "brjax.train_flags": "brjax.training.flags",
}
"""Old module path -> new module path."""


def _user_stacklevel() -> int:
  """The ``stacklevel`` of the first frame outside brjax's ``__init__``, this module and
  the import machinery: the line that imported the old path. ``warnings.warn`` does not
  count the import machinery's frames, so neither does this."""
  frame, level = sys._getframe(2), 2  # pylint: disable=protected-access
  internal = (__file__, __file__.replace("_deprecated.py", "__init__.py"))
  while frame is not None:
    name = frame.f_code.co_filename
    if not name.startswith("<frozen importlib"):
      if name not in internal:
        break
      level += 1
    frame = frame.f_back
  return level


def warn_moved(old: str) -> str:
  """Warns, at the importing line, that module path ``old`` moved; returns its new path."""
  new = MOVED[old]
  warnings.warn(f"{old} moved to {new} in brjax 0.2; the old path will be removed in the next "
                f"release", DeprecationWarning, stacklevel=_user_stacklevel())
  return new


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds an old module path and loads it as the module at its new path."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname not in MOVED:
      return None
    return importlib.machinery.ModuleSpec(fullname, self)

  def create_module(self, spec):
    return importlib.import_module(warn_moved(spec.name))

  def exec_module(self, module: types.ModuleType) -> None:
    del module  # the new module was executed when it was imported


def install() -> None:
  """Puts the alias finder on ``sys.meta_path`` (once)."""
  if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.append(_Alias())
