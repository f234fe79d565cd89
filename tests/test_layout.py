"""The package's layout: its parts as subpackages, small modules, and the 0.1 paths kept."""

import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import brjax
from brjax import _deprecated

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "brjax"
SUBPACKAGES = ("bench", "data", "export", "models", "quant", "studies", "training")
MAX_LINES = 425  # "no module over ~400 lines" (issue 30)


def test_the_parts_are_subpackages_and_the_top_level_holds_only_entry_points():
  assert sorted(p.name for p in PACKAGE.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()) == sorted(SUBPACKAGES)
  assert sorted(p.name for p in PACKAGE.glob("*.py")) == [
      "__init__.py", "_deprecated.py", "_lazy.py", "nnx.py"]
  assert set(SUBPACKAGES) | {"nnx"} <= set(brjax.__all__)


def test_tests_mirror_the_layout():
  folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name[0] != "."
             and p.name != "__pycache__"}
  assert folders == set(SUBPACKAGES)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_long(path):
  assert len(path.read_text().splitlines()) <= MAX_LINES


def test_every_old_path_is_the_new_module_and_warns_once():
  code = """if True:
    import importlib, warnings
    from brjax import _deprecated
    for old, new in sorted(_deprecated.MOVED.items()):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        importlib.import_module(old)
      assert module is importlib.import_module(new), (old, new)
      assert [(w.category, new in str(w.message)) for w in caught] == [
          (DeprecationWarning, True)], (old, [str(w.message) for w in caught])
    print(len(_deprecated.MOVED))
  """
  # A new process: here the old paths may already be imported (and warned about).
  out = subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=ROOT,
                       capture_output=True, text=True).stdout
  assert int(out) == len(_deprecated.MOVED) > 40


def test_from_brjax_import_an_old_module_warns_once_at_the_caller(recwarn):
  sys.modules.pop("brjax.optim", None)
  vars(brjax).pop("optim", None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from brjax import optim  # noqa: F401
    optim_again = brjax.optim
  assert optim_again is importlib.import_module("brjax.training.optim")
  [w] = caught
  assert w.category is DeprecationWarning and w.filename == __file__
  assert "brjax.training.optim" in str(w.message)


@pytest.mark.parametrize("package,name,module", [
    ("brjax.quant", "QuantConv", "brjax.quant.lsq"),
    ("brjax.quant", "quantize_model", "brjax.quant.quantize"),
    ("brjax.models", "create_model", "brjax.models.cifar"),
    ("brjax.export", "from_linen", "brjax.export.packed"),
    ("brjax.export", "load_variables", "brjax.export.npz"),
    ("brjax.bench", "run_benchmark", "brjax.bench.training"),
    ("brjax.nnx", "quantize_nnx", "brjax.quant.nnx"),
    ("brjax", "br_losses", "brjax.quant.regularizer"),
])
def test_packages_that_kept_a_module_name_export_its_names(package, name, module):
  value = getattr(importlib.import_module(package), name)
  assert value is getattr(importlib.import_module(module), name)
  assert name in importlib.import_module(package).__all__


@pytest.mark.parametrize("package", ["brjax", "brjax.quant", "brjax.models", "brjax.export",
                                     "brjax.bench", "brjax.nnx"])
def test_every_exported_name_resolves(package):
  module = importlib.import_module(package)
  missing = [name for name in module.__all__ if not hasattr(module, name)]
  assert not missing, missing


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="has no attribute 'nope'"):
    brjax.quant.nope  # noqa: B018
