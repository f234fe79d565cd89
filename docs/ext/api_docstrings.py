"""How brjax's docstrings become API pages: three autodoc hooks, no source edits.

* **One entry per object.** A public package re-exports names of its modules
  (``brjax.quant.QuantConv`` is ``brjax.quant.lsq.QuantConv``). The API pages document each
  such name under the package, so an ``automodule`` listing of the defining module skips
  it (``autodoc-skip-member``): the object appears once, under its public name.
* **Constants keep their own comment.** ``autodata`` of a re-exported constant would show
  the docstring of its type (``str``'s, ``dict``'s); it gets the ``#:`` comment of the
  module that defines it instead, or nothing.
* **Module docstrings' section titles become rubrics.** Several modules title a part of
  their docstring alike ("What is exported"); as sections, two on one page would collide.

Two repairs of reST that docutils rejects, so that a docstring does not have to change for
the site: an ``Args:`` entry ``*args, **kwargs: ...`` is split in two (napoleon escapes only
the first name of such a pair), and an inline literal that ends in a space (````error: ````)
loses the space.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re
from typing import Any

from sphinx.pycode import ModuleAnalyzer

__all__ = ["setup"]

_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
_ARGS_KWARGS = re.compile(r"^(\s+)\*(\w+), \*\*(\w+): (.*)$")


@functools.cache
def _public_exports(modules: tuple[str, ...]) -> dict[str, set[int]]:
  """name -> ids of the objects that a checked public module exports under that name."""
  exports: dict[str, set[int]] = {}
  for module_name in modules:
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
      value = getattr(module, name)
      if not inspect.ismodule(value):
        exports.setdefault(name, set()).add(id(value))
  return exports


def _skip_reexported(app: Any, what: str, name: str, obj: Any, skip: bool,
                     options: Any) -> bool | None:
  if what != "module" or skip:
    return None
  exports = _public_exports(tuple(app.config.api_public_modules))
  if id(obj) in exports.get(name, ()):
    return True
  return None


@functools.cache
def _defining_comment(package_name: str, name: str, value_id: int) -> tuple[str, ...]:
  """The ``#:`` comment of ``name`` in the module of ``package_name`` that defines it."""
  package = importlib.import_module(package_name)
  candidates = [package_name]
  if hasattr(package, "__path__"):
    candidates += [f"{package_name}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
  for module_name in candidates:
    module = importlib.import_module(module_name)
    if id(getattr(module, name, None)) != value_id:
      continue
    docs = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", name))
    if docs:
      return tuple(docs)
  return ()


def _repair(lines: list[str]) -> list[str]:
  out = []
  for line in lines:
    pair = _ARGS_KWARGS.match(line)
    if pair:
      indent, args, kwargs, description = pair.groups()
      out += [f"{indent}*{args}: {description}", f"{indent}**{kwargs}: {description}"]
      continue
    parts = line.split("``")
    if len(parts) % 2 == 1:  # the literals of this line close on it: parts[1], parts[3], ...
      parts[1::2] = [part.rstrip() if part.strip() else part for part in parts[1::2]]
      line = "``".join(parts)
    out.append(line)
  return out


def _process_docstring(app: Any, what: str, name: str, obj: Any, options: Any,
                       lines: list[str]) -> None:
  lines[:] = _repair(lines)
  if what == "data":
    type_doc = inspect.getdoc(type(obj)) or ""
    if lines and type_doc and lines[0].strip() == type_doc.splitlines()[0].strip():
      package_name, _, short = name.rpartition(".")
      lines[:] = list(_defining_comment(package_name, short, id(obj)))
  elif what == "module":
    out: list[str] = []
    for line in lines:
      if (_UNDERLINE.match(line) and out and out[-1].strip()
          and not out[-1].startswith((" ", ".."))):
        title = out.pop()
        if out and out[-1].strip():
          out.append("")
        out += [f".. rubric:: {title}", ""]
        continue
      out.append(line)
    lines[:] = out


def setup(app: Any) -> dict[str, Any]:
  app.add_config_value("api_public_modules", [], "env", types=[list])
  app.connect("autodoc-skip-member", _skip_reexported)
  # Before napoleon (priority 500) reads the docstrings.
  app.connect("autodoc-process-docstring", _process_docstring, priority=400)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
