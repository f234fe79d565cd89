"""Operation-level quantization of Linen models: every matmul and conv that multiplies a
parameter, whatever module computes it.

``quantize_model`` quantizes the layer types of ``brjax.quant.quantize.QUANTIZABLE`` as
layers. Inside any *other* module that a quantizing rule matches (an LSTM cell built from
``DenseParams``, a GRU cell, a custom layer calling ``jnp.einsum`` on ``self.param``),
brjax watches the operations ``jax.lax.dot_general``, ``jax.lax.dot``,
``jax.lax.conv_general_dilated`` (and ``conv``, ``conv_with_general_padding``),
``jax.numpy.einsum``, ``dot``, ``matmul``, ``tensordot``, ``inner`` and the ``@`` operator,
as the model calls them through ``jax.lax``/``jax.numpy`` (patched while ``init``/``apply``
runs). An operand computed from parameters alone (through any reshape, concatenation or
cast) is a *weight* operand; the other one is the activation:

* every parameter the weight operand is computed from is quantized as it is read
  (``weight_bits``, signed LSQ), with its step size beside it: ``alpha`` for a parameter
  named ``kernel``, else ``<name>_alpha`` (``names``);
* the activation operand is quantized (``act_bits``) on the scope of the module that runs
  the operation: ``input_alpha``, then ``input_alpha_1``, ... for its later operations.

Which operands are weights is found by a trace of the whole ``init``/``apply`` under
``jax.eval_shape`` (the *plan*), run before the real call whenever a watched module runs an
operation; an operation the plan cannot quantize (both operands parameters, an operand
that is not float, an einsum of three operands) is recorded as left float, with the reason
(``brjax.quant.coverage``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

from flax.core import scope as flax_scope
import flax.linen as nn
import jax
import jax.numpy as jnp

from brjax.quant import calibration, names, sites
from brjax.quant import lsq as quant
from brjax.quant.coverage import FloatOp
from brjax.quant.rules import QuantRule, first_match


class NeedPlan(Exception):
  """Raised inside a real call that reached a watched operation without a plan."""


@dataclasses.dataclass
class Plan:
  """What the abstract trace found: the parameters to quantize as they are read
  (``(owner path, name) -> (rule index, rule)``), the operations whose activation to quantize
  (``(module path, (method, op index)) -> (operand position, input index)``) and what
  stays float."""
  params: dict = dataclasses.field(default_factory=dict)
  ops: dict = dataclasses.field(default_factory=dict)
  inputs: dict = dataclasses.field(default_factory=dict)  # module path -> inputs so far
  left_float: dict = dataclasses.field(default_factory=dict)  # (path, op, why) -> FloatOp


@dataclasses.dataclass
class _Frame:
  module: Any
  path: str
  layer: bool   # a layer quantized as a layer (or one of brjax's): its ops are its own
  method: str = "__call__"
  ops: int = 0  # operations watched so far in this call


class OpState:
  """One pass of ``init``/``apply`` under ``rules`` (QuantRules): ``mode`` is ``"plan"``
  (abstract: find the weight operands) or ``"real"`` (quantize by ``plan``)."""

  def __init__(self, rules: tuple, mode: str, plan: Plan | None, log: Any):
    self.rules, self.mode, self.plan, self.log = rules, mode, plan, log
    self.stack: list[_Frame] = []
    self.reads: dict[int, tuple[Any, tuple[str, str]]] = {}  # id -> (value, (path, name))
    self.memo: dict[int, tuple[Any, frozenset, bool]] = {}
    self.busy = 0
    self.calibrating = False


_STATE: contextvars.ContextVar = contextvars.ContextVar("brjax_op_state", default=None)


def active() -> OpState | None:
  return _STATE.get()


@contextlib.contextmanager
def watching(state: OpState):
  """Patches the watched operations and ``Scope.param`` while ``state`` is active."""
  token = _STATE.set(state)
  saved = []
  try:
    for owner, attr, op in _targets():
      original = getattr(owner, attr)
      saved.append((owner, attr, original))
      setattr(owner, attr, _wrap(op, original))
    read = flax_scope.Scope.param
    saved.append((flax_scope.Scope, "param", read))
    flax_scope.Scope.param = _param_hook(read)
    yield state
  finally:
    for owner, attr, original in reversed(saved):
      setattr(owner, attr, original)
    _STATE.reset(token)


def _targets():
  from jax._src import array as jax_array  # pylint: disable=g-import-not-at-top
  for attr in ("dot_general", "dot", "conv_general_dilated", "conv",
               "conv_with_general_padding"):
    yield jax.lax, attr, f"lax.{attr}"
  for attr in ("einsum", "dot", "matmul", "tensordot", "inner"):
    yield jnp, attr, f"jnp.{attr}"
  for cls in (jax_array.ArrayImpl, jax.core.Tracer):
    yield cls, "__matmul__", "@"
    yield cls, "__rmatmul__", "@"


def push(module: nn.Module, path: str, layer: bool, method: str = "__call__") -> _Frame:
  frame = _Frame(module, path, layer, method)
  state = active()
  if state is not None:
    state.stack.append(frame)
  return frame


def pop(frame: _Frame) -> None:
  state = active()
  if state is not None and state.stack and state.stack[-1] is frame:
    state.stack.pop()


def _operand_positions(op: str, args: tuple) -> list[int]:
  if op == "jnp.einsum":
    return [i for i, a in enumerate(args) if i > 0 and hasattr(a, "shape")]
  return [i for i in (0, 1) if i < len(args)]


def _wrap(op: str, original):
  def wrapped(*args, **kwargs):
    state = active()
    if state is None or state.busy or not state.stack or state.stack[-1].layer:
      return original(*args, **kwargs)
    frame = state.stack[-1]
    hit = first_match(state.rules, frame.path)
    if hit is None or not hit[1].quantizes:
      return original(*args, **kwargs)
    index = (frame.method, frame.ops)
    frame.ops += 1
    positions = _operand_positions(op, args)
    if state.mode == "plan":
      data = _plan_op(state, frame, hit, op, index, args, positions)
      return _call(state, original, args, kwargs, data)
    if state.plan is None:
      raise NeedPlan(frame.path)
    entry = state.plan.ops.get((frame.path, index))
    if entry is not None:
      position, k = entry
      args = list(args)
      args[position] = _quantize_activation(state, frame, hit, args[position], k)
      state.log.matched[hit[0]].add(frame.path)
    return _call(state, original, tuple(args), kwargs)
  wrapped.__name__ = getattr(original, "__name__", op)
  return wrapped


def _call(state: OpState, original, args, kwargs, data: bool = False):
  state.busy += 1
  try:
    out = original(*args, **kwargs)
  finally:
    state.busy -= 1
  if data and isinstance(out, jax.core.Tracer):  # an activation
    state.memo[id(out)] = (out, frozenset(), True)
  return out


def _plan_op(state: OpState, frame: _Frame, hit: tuple[int, QuantRule], op: str,
             index: tuple, args: tuple, positions: list[int]) -> bool:
  """Records in the plan how the operation is quantized, or why it stays float; returns
  whether an operand depends on data (the output is then an activation)."""
  rule = hit[1]
  origins = [_origin(state, args[p]) for p in positions]
  weights = [p for p, (params, data) in zip(positions, origins) if params and not data]
  data = any(d for _, d in origins)
  if not weights:
    return data  # multiplies no parameter: activations only
  plan = state.plan
  assert plan is not None

  def left_float(why: str) -> None:
    plan.left_float.setdefault((frame.path, op, why), FloatOp(frame.path, op, why))

  if len(positions) != 2:
    left_float(f"{len(positions)} operands (brjax quantizes two-operand products)")
    return data
  if len(weights) == 2:
    left_float("both operands are computed from parameters alone")
    return data
  (w,) = weights
  (a,) = [p for p in positions if p != w]
  for p, what in ((w, "weight"), (a, "activation")):
    dtype = jnp.result_type(args[p])
    if not jnp.issubdtype(dtype, jnp.floating):
      left_float(f"its {what} operand is {dtype}, not float")
      return data
  if rule.weight_bits is not None:
    for key in sorted(origins[positions.index(w)][0]):
      plan.params.setdefault(key, hit)
  if rule.act_bits is not None and (frame.path, index) not in plan.ops:
    k = plan.inputs.get(frame.path, 0)
    plan.inputs[frame.path] = k + 1
    plan.ops[(frame.path, index)] = (a, k)
  return data


def _origin(state: OpState, x: Any) -> tuple[frozenset, bool]:
  """``(parameters, from data)`` of a value: the parameter reads it is computed from, and
  whether it depends on anything else (an input, a carry: then it is an activation)."""
  if not isinstance(x, jax.core.Tracer):
    read = state.reads.get(id(x))
    return (frozenset([read[1]]) if read else frozenset()), False
  found, todo, seen = set(), [x], set()
  data = False
  while todo:
    t = todo.pop()
    if id(t) in seen:
      continue
    seen.add(id(t))
    read = state.reads.get(id(t))
    if read is not None:
      found.add(read[1])
      continue
    if not isinstance(t, jax.core.Tracer):
      continue  # a constant
    known = state.memo.get(id(t))
    if known is not None:
      found |= known[1]
      if known[2]:
        data = True
        break
      continue
    parents = _parents(t)
    if parents is None:
      data = True
      break
    todo.extend(parents)
  result = (frozenset(found), data)
  state.memo[id(x)] = (x, *result)
  return result


def _parents(t: jax.core.Tracer) -> list | None:
  """The tracers ``t`` is computed from; ``[]`` for a constant, None for an input."""
  parent = getattr(t, "parent", None)
  if parent is not None:
    return list(parent.in_tracers)
  pval = getattr(t, "pval", None)  # a partial-eval tracer (flax's broadcast pass)
  if pval is not None:
    if pval.is_known():
      return []
    recipe = getattr(t, "recipe", None)
    return list(recipe.in_tracers) if hasattr(recipe, "in_tracers") else None
  get_const = getattr(t, "get_const", None)
  const = get_const() if get_const is not None else None
  if const is not None:  # a constant, or a value of an outer trace (a transform's body)
    return [const]
  return None


def _param_hook(read):
  def param(scope, name, init_fn, *init_args, unbox=True, **init_kwargs):
    value = read(scope, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    state = active()
    if state is None or state.busy or not isinstance(value, jax.Array):
      return value
    path = "/".join(scope.path)
    key = (path, name)
    state.reads[id(value)] = (value, key)
    if state.mode == "real" and state.plan is not None and key in state.plan.params:
      state.busy += 1
      try:
        return _quantize_param(state, scope, path, name, value, state.plan.params[key])
      finally:
        state.busy -= 1
    return value
  return param


def _quantize_param(state: OpState, scope, path: str, name: str, value: jax.Array,
                    hit: tuple[int, QuantRule]) -> jax.Array:
  """The parameter ``name`` of ``scope``, fake-quantized; its step size beside it."""
  rule = hit[1]
  state.log.matched[hit[0]].add(path)
  qn, qp = quant.qrange(rule.weight_bits, signed=True)
  alpha_name = names.weight_alpha(name)
  where = f"{path}/{name}" if path else name
  from brjax.quant import lifted  # pylint: disable=g-import-not-at-top
  alpha = lifted.create_step_size(scope, alpha_name, lambda _: calibration.check_init(
      where, "kernel", quant.init_alpha(value, qp), value), rule.alpha_param)
  site = sites.record(value, alpha, qn, qp)
  if not scope.get_flag("initializing", False) and scope.is_mutable_collection(sites.COLLECTION):
    if name == "kernel":
      scope.put_variable(sites.COLLECTION, sites.WEIGHT, (site,))
    else:
      scope.put_variable(sites.COLLECTION, name, {sites.WEIGHT: (site,)})
  site_path = path if name == "kernel" else where
  state.log.sites.add((site_path, sites.WEIGHT))
  state.log.step_sizes.add(names.join(path, names.stored(alpha_name, rule.alpha_param)))
  return quant.lsq_quantize(value, alpha, qn, qp, quant.grad_scale(value.size // alpha.size, qp))


def _quantize_activation(state: OpState, frame: _Frame, hit: tuple[int, QuantRule],
                         x: jax.Array, k: int) -> jax.Array:
  from brjax.quant import lifted  # pylint: disable=g-import-not-at-top
  rule = hit[1]
  state.busy += 1
  try:
    out = lifted.quantize_input(frame.module, x, rule, k)
  finally:
    state.busy -= 1
  state.log.step_sizes.add(names.join(frame.path, names.stored(names.input_alpha(k),
                                                               rule.alpha_param)))
  state.log.sites.add((frame.path, sites.INPUT))
  return out
