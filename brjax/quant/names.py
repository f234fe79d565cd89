"""The names of step sizes and input signs (plain Python).

A layer's kernel has its step size ``alpha`` beside it and its input ``input_alpha`` (and,
with a data-decided sign, ``input_signed`` in ``"quant_state"``). A parameter that an
operation multiplies (``brjax.quant.intercept``) has ``<name>_alpha`` beside it
(``alpha`` for a ``kernel``); the activation of a module's ``k``-th quantized operation has
``input_alpha_<k>`` and ``input_signed_<k>`` (``k = 0``: ``input_alpha``, ``input_signed``).
"""

from __future__ import annotations

import re

STEP_SIZE_NAMES = ("alpha", "input_alpha")
"""Parameter names of step sizes of brjax's layers: a kernel's or a ReLU's ``alpha``, a layer
input's ``input_alpha``; an operation's step sizes extend them (see the module docstring)."""

_INPUT = re.compile(r"input_alpha(_\d+)?")


def weight_alpha(name: str) -> str:
  """The step size's name of the parameter ``name``."""
  return "alpha" if name == "kernel" else f"{name}_alpha"


def input_alpha(k: int) -> str:
  return "input_alpha" if k == 0 else f"input_alpha_{k}"


def input_signed(k: int) -> str:
  return "input_signed" if k == 0 else f"input_signed_{k}"


def stored(name: str, alpha_param: str = "linear") -> str:
  """The parameter's name of step size ``name`` under ``alpha_param`` (``log_<name>`` for
  ``log``, as ``brjax.quant.step_size``)."""
  return f"log_{name}" if alpha_param == "log" else name


def join(path: str, name: str) -> str:
  return f"{path}/{name}" if path else name


def is_alpha_name(name) -> bool:
  """Whether a parameter name is a step size's."""
  if isinstance(name, str) and name.startswith("log_"):
    name = name[len("log_"):]
  return isinstance(name, str) and (name in STEP_SIZE_NAMES or name.endswith("_alpha")
                                    or _INPUT.fullmatch(name) is not None)


def _linear(name):
  """``name`` without the ``log_`` of a log-parametrized step size."""
  return name[len("log_"):] if isinstance(name, str) and name.startswith("log_") else name


def is_input_alpha_name(name) -> bool:
  name = _linear(name)
  return isinstance(name, str) and _INPUT.fullmatch(name) is not None


def weight_name(name) -> str | None:
  """The name of the weight whose step size is named ``name`` (``kernel`` for ``alpha``,
  ``<name>`` for ``<name>_alpha``, either in its ``log_*`` form); None for an input's step
  size or a name that is no step size's."""
  if not is_alpha_name(name) or is_input_alpha_name(name):
    return None
  name = _linear(name)
  return "kernel" if name == "alpha" else name[:-len("_alpha")]


def weight_of(path: tuple, names: set | dict) -> bool:
  """Whether the step size at ``path`` is a weight's: an ``alpha`` beside a ``kernel``, or
  a ``<name>_alpha`` beside a parameter ``<name>``."""
  owner = weight_name(path[-1]) if path else None
  return owner is not None and path[:-1] + (owner,) in names
