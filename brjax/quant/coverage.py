"""What ``quantize_model`` left float: the operations of matched modules that multiply a
parameter but could not be quantized (see ``brjax.quant.intercept``).

A Linen model quantized by ``quantize_model`` checks, at every ``init`` and ``apply``, that
each ``dot_general``/``einsum``/``conv_general_dilated`` multiplying a parameter in a
module a quantizing rule matches was quantized. Those left float are a ``ValueError`` that
lists them, unless the model was made with ``quantize_model(..., allow_float_ops=True)``;
either way :func:`left_float` returns them (those of the latest ``init``/``apply``).

An NNX model is checked once, by ``quantize_model`` itself (``brjax.quant.nnx_coverage``:
NNX quantizes layers, so every product of a parameter outside a quantized layer's call is
reported), with the same error and option; :func:`left_float` returns that report (or, when
the forward could not be traced and ``allow_float_ops=True`` skipped the check, raises).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, order=True)
class FloatOp:
  """One operation left float.

  Attributes:
    path: the module path of the module that runs it (``"/"``-joined; ``""`` is the root).
    op: the function called (``"jnp.einsum"``, ``"lax.dot_general"``, ``"@"``, ...).
    why: why brjax did not quantize it.
  """
  path: str
  op: str
  why: str

  def __str__(self) -> str:
    return f"{self.path or '<root>'}: {self.op} ({self.why})"


def left_float(model: Any) -> tuple[FloatOp, ...]:
  """The operations multiplying a parameter that ``model``'s latest ``init``/``apply`` left
  float (empty: every one was quantized); for an NNX model, those of its sample forward in
  ``quantize_model``.

  Args:
    model: a Linen model returned by ``brjax.quantize_model``, or an NNX model it quantized
      (or a view of one made after).

  Raises:
    ValueError: not such a model; a Linen model not yet run; an NNX model whose products
      were not checked (quantized with ``allow_float_ops=True`` though its forward could not
      be traced: ``brjax.quant.nnx_coverage``).
  """
  report = getattr(type(model), "_brjax_left_float", None)
  if report is None:
    nnx_report = getattr(model, "brjax_left_float", None)  # set by brjax.quant.nnx
    if isinstance(nnx_report, tuple):
      return nnx_report
    if isinstance(nnx_report, str):  # not checked: its forward could not be traced
      raise ValueError(nnx_report)
    raise ValueError(f"left_float takes a model returned by brjax.quantize_model (Linen, or "
                     f"an NNX model it quantized), not a {type(model).__name__}")
  if report[0] is None:
    raise ValueError("left_float reports the model's latest init or apply, and this "
                     f"{type(model).__name__} has run neither yet: call model.init first")
  return tuple(report[0])


def error(found: tuple[FloatOp, ...]) -> str:
  """The one-line message of a model whose rules left operations float."""
  listed = "; ".join(map(str, found[:6])) + (" ..." if len(found) > 6 else "")
  return (f"quantize_model: {len(found)} operation(s) multiplying a parameter in modules "
          f"that a quantizing rule matches stay float: {listed}; pass "
          "quantize_model(..., allow_float_ops=True) to accept them (brjax.quant.coverage."
          "left_float(model) lists them), or narrow the rules")
