"""Quantization rules: which layers of a model get which quantizers.

A :class:`QuantRule` names layers by a regular expression on their module path (``"/"``
joined, as in the ``params`` tree: ``"Encoder_0/MlpBlock_1/Dense_0"``) and says how to
quantize them: the kernel's bits (signed, LSQ), optionally one step size per output
channel, and the bits and sign of the layer's *input* activation. ``quantize_model`` gives
each matched layer the first rule that matches it (as Qwix does); a rule with neither
``weight_bits`` nor ``act_bits`` leaves the layers it matches float, which is how a later,
broader rule is kept off the first and last layers.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import re

from brjax.quant import lsq as quant
from brjax.quant import step_size


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """How to quantize the layers whose module path matches ``module_path``.

  Attributes:
    module_path: a regular expression that must match the whole module path
      (``re.fullmatch``), e.g. ``".*"``, ``"Encoder_0/.*/Dense_[01]"``.
    weight_bits: bits of the kernel (signed; 1 = ternary), or None to keep it float.
    act_bits: bits of the layer's input, or None to keep it float.
    act_signed: the input's range: True = signed (``[-2^(b-1), 2^(b-1) - 1]``), False =
      unsigned (``[0, 2^b - 1]``, after a ReLU; negative inputs at init are an error),
      None = decided once from the batch the model is initialized with (unsigned when it
      holds no negative value) and kept in the ``"quant_state"`` collection: init with a
      real batch (a constant one is an error), or re-decide with ``init_alphas``.
    per_channel: one weight step size per output channel (the usual choice for
      depthwise convolutions at 2-4 bits) instead of one per kernel; needs
      ``weight_bits`` (an input has one step size per layer).
    act_batch_grad_scale: the input step size's gradient scale counts the whole batch
      (``1/sqrt(x.size * qp)``, the reference package's choice) instead of one example
      (``1/sqrt(x[0].size * qp)``, the LSQ paper's).
    alpha_param: how the step sizes are stored: ``"linear"`` (``alpha``, LSQ's) or
      ``"log"`` (``log_alpha = log(alpha)``: positive by construction; see
      ``brjax.quant.step_size``).
  """
  module_path: str = ".*"
  weight_bits: int | None = None
  act_bits: int | None = None
  act_signed: bool | None = None
  per_channel: bool = False
  act_batch_grad_scale: bool = False
  alpha_param: str = "linear"

  def __post_init__(self):
    for field in dataclasses.fields(self):  # numpy scalars: the Python values they stand for
      value = getattr(self, field.name)
      if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        object.__setattr__(self, field.name, value.item())
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(f"QuantRule module_path={self.module_path!r} is not a regular "
                       f"expression: {e}") from None
    for name in ("weight_bits", "act_bits"):
      bits = getattr(self, name)
      if bits is not None:
        try:
          quant.qrange(bits, signed=True)
        except ValueError:
          raise ValueError(f"QuantRule {name}={bits!r} is not accepted: use an integer in "
                           f"{quant.MIN_BITS}..{quant.MAX_BITS}, or None for float") from None
    if not (self.act_signed is None or isinstance(self.act_signed, bool)):
      raise ValueError(f"QuantRule act_signed={self.act_signed!r} is not accepted: use "
                       "True, False or None (decided from the init batch)")
    for name in ("per_channel", "act_batch_grad_scale"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"QuantRule {name}={getattr(self, name)!r} is not accepted: use True "
                         "or False")
    step_size.check_alpha_param(self.alpha_param, "QuantRule alpha_param")
    if self.per_channel and self.weight_bits is None:
      raise ValueError("QuantRule per_channel=True needs weight_bits: it gives the kernel one "
                       "step size per output channel (an input has one step size per layer)")
    if self.act_bits == 1 and self.act_signed is None:
      raise ValueError("QuantRule act_bits=1 needs act_signed=True or False: a 1-bit signed "
                       "input is ternary (3 levels), an unsigned one binary (2)")

  @property
  def quantizes(self) -> bool:
    """Whether the rule quantizes anything (else it keeps its layers float)."""
    return self.weight_bits is not None or self.act_bits is not None

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.module_path, path) is not None


def check_rules(rules: Sequence[QuantRule]) -> tuple[QuantRule, ...]:
  """``rules`` as a tuple, after checking it holds QuantRules and quantizes something."""
  rules = tuple(rules) if not isinstance(rules, QuantRule) else (rules,)
  for i, rule in enumerate(rules):
    if not isinstance(rule, QuantRule):
      raise TypeError(f"rules[{i}] is a {type(rule).__name__}: use brjax.QuantRule")
  if not any(rule.quantizes for rule in rules):
    raise ValueError("no rule quantizes anything: give at least one QuantRule a weight_bits "
                     "or an act_bits")
  return rules


def first_match(rules: Sequence[QuantRule], path: str) -> tuple[int, QuantRule] | None:
  """``(index, rule)`` of the first rule matching ``path``, or None."""
  for i, rule in enumerate(rules):
    if rule.matches(path):
      return i, rule
  return None
