"""Names a package exports from its modules, imported on first use (PEP 562).

A package's ``__init__`` stays cheap to import: ``import brjax.quant.bits`` or
``brjax.training.history`` (plain Python, no JAX) does not pull in JAX through the
``__init__`` of the package above it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import importlib


def exports(package: str, names: Mapping[str, str]
            ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for ``package``, which exports ``names``.

  Args:
    package: the package's ``__name__``.
    names: exported name -> the submodule of ``package`` that defines it (``"lsq"``).

  Returns:
    The module-level ``__getattr__`` (imports the submodule on first access and caches the
    value in the package's namespace) and ``__dir__`` of the package.
  """
  def __getattr__(name: str) -> object:
    if name not in names:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(f"{package}.{names[name]}")
    value = getattr(module, name)
    setattr(importlib.import_module(package), name, value)
    return value

  def __dir__() -> list[str]:
    return sorted({*vars(importlib.import_module(package)), *names})

  return __getattr__, __dir__
