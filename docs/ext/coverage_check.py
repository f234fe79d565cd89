"""A Sphinx extension that fails the build when a public name is not documented.

Every name in the ``__all__`` of each module listed in ``coverage_check_modules``
(``conf.py``) must be an object of the generated API pages, under that module's name:
``brjax.quantize_model`` for ``"quantize_model"`` in ``brjax.__all__``, ``brjax.quant.lsq_quantize``
for ``"lsq_quantize"`` in ``brjax.quant.__all__``. A submodule named in ``__all__`` counts
when its page declares it (``automodule`` / ``py:module``). A package without ``__all__``
makes its public modules public (each must have its entry); any other checked module
without ``__all__`` is an error: its public names would be a guess.

The check runs after every document is read (``env-check-consistency``), so the ordinary
``sphinx-build -b html`` fails on it; no separate builder is needed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
import importlib
import pkgutil
from types import ModuleType
from typing import Any

from sphinx import errors

__all__ = ["public_names", "undocumented", "check_coverage", "setup"]


def public_names(module: ModuleType) -> list[str]:
  """The full names that ``module`` makes public: ``module.__name__ + "." + name``.

  They are the names of its ``__all__``; a package without ``__all__`` (a folder of public
  modules, such as ``brjax.training``) makes its modules public, those whose names do not
  start with ``_``.
  """
  names = getattr(module, "__all__", None)
  if names is None and hasattr(module, "__path__"):
    names = [info.name for info in pkgutil.iter_modules(module.__path__)
             if not info.name.startswith("_")]
  if names is None:
    raise errors.SphinxError(
        f"coverage check: {module.__name__} has no __all__, so its public names are not "
        "known; declare them, or leave the module out of coverage_check_modules")
  return [f"{module.__name__}.{name}" for name in names]


def undocumented(modules: Iterable[ModuleType], documented: Collection[str]) -> list[str]:
  """The public names of ``modules`` that are not in ``documented``, sorted."""
  documented = frozenset(documented)
  return sorted({name for module in modules for name in public_names(module)} - documented)


def check_coverage(module_names: Iterable[str], documented: Collection[str]) -> None:
  """Raises ``SphinxError`` naming every public name of ``module_names`` not documented."""
  modules = [importlib.import_module(name) for name in module_names]
  missing = undocumented(modules, documented)
  if missing:
    raise errors.SphinxError(
        f"{len(missing)} public name(s) missing from the API reference (docs/api/): "
        + ", ".join(missing)
        + ". Add each to the page of its module (an autofunction, autoclass, autodata or "
        "automodule entry under that module's name).")


def _documented(env: Any) -> set[str]:
  domain = env.get_domain("py")
  return set(domain.objects) | set(domain.modules)


def _on_check_consistency(app: Any, env: Any) -> None:
  check_coverage(app.config.coverage_check_modules, _documented(env))


def setup(app: Any) -> dict[str, Any]:
  app.add_config_value("coverage_check_modules", [], "env", types=[list])
  app.connect("env-check-consistency", _on_check_consistency)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
