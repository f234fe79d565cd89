"""What ``quantize_nnx`` left float: the products of parameters that no quantized layer runs.

``brjax.quant.nnx`` quantizes layers (``nnx.Linear``, ``nnx.Conv``, ...), not operations: a
custom NNX module that multiplies its own ``nnx.Param`` (``x @ self.w``, ``jnp.einsum(...,
self.w)``, ``lax.conv_general_dilated(x, self.k, ...)``, a tied embedding's
``embed.attend(x)``) runs float. :func:`report` finds every such product once, at quantize
time, from the model's forward on the sample inputs traced by ``jax.make_jaxpr`` (no
compile, no values), with the model's state split by ``nnx.split`` so that each input of the
jaxpr is one state leaf whose path is known.

The walk (:func:`origins`) follows the jaxpr's data flow from its inputs, into every
sub-jaxpr (``jit``/``pjit``, ``scan``, ``while``, ``cond``, ``remat``/``checkpoint``,
``custom_jvp``/``custom_vjp`` calls, and any other primitive whose jaxprs take its operands
one to one), and gives each value its *origin*: the ``nnx.Param`` leaves it is computed
from, or "data" when it depends on the call's inputs. Other state (batch statistics, rng
keys, brjax's ``QuantState`` signs) and constants are neither: they do not make a weight an
activation. Each ``dot_general`` and ``conv_general_dilated`` operand computed from
parameters alone is a *weight operand*. It is quantized when it is a quantized layer's
kernel read through its step size (``alpha``/``log_alpha``: the layer's own call), or the
kernel of a layer whose rule keeps weights float (``weight_bits=None``: the rule's choice).
Otherwise each module owning one of its parameters, when the first rule matching that
module's path quantizes, gets a :class:`~brjax.quant.coverage.FloatOp` (path, op, why), as
Linen reports an operation left float only in a module that a quantizing rule matches.

Not reported: products of two activations (attention's ``q @ k``, ``probs @ v``: no operand
comes from parameters alone, and an activation only is quantized at a layer's input);
parameters that are read but not multiplied (an embedding looked up with ``take``/``gather``,
biases, norm scales); products in modules that no rule matches, or whose first matching
rule keeps them float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx
import jax
from jax.extend import core as jcore
import numpy as np

from brjax.quant import coverage, step_size
from brjax.quant.coverage import FloatOp
from brjax.quant.rules import QuantRule, first_match

PRODUCTS = ("dot_general", "conv_general_dilated")
"""The primitives whose operands are checked (``jnp.einsum``, ``@``, ``jnp.dot``,
``lax.conv``, ``nnx.Conv`` all reach one of them)."""

Origin = tuple[frozenset, bool]
"""A value's origin: ``(paths of the nnx.Param leaves it is computed from, from data)``;
once from data the parameters no longer matter, so it is ``(frozenset(), True)``."""

NONE: Origin = (frozenset(), False)  # a constant, or state that is not a parameter
DATA: Origin = (frozenset(), True)


def _union(origins: Sequence[Origin]) -> Origin:
  if any(data for _, data in origins):
    return DATA
  return frozenset().union(*(params for params, _ in origins)), False


def _jaxprs(value: Any) -> list[jcore.Jaxpr]:
  """The jaxprs in one of an equation's parameters (a jaxpr, a closed one, or a tuple)."""
  if isinstance(value, jcore.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jcore.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _jaxprs(v)]
  return []


def origins(jaxpr: jcore.Jaxpr, inputs: Sequence[Origin],
            found: list | None) -> list[Origin]:
  """The origins of ``jaxpr``'s outputs, given its inputs' (constvars: :data:`NONE`).

  Appends ``(primitive name, (lhs origin, rhs origin))`` of every product met, in this jaxpr
  and its sub-jaxprs, to ``found`` (None: the walk only computes origins, as in a loop's
  fixed point, whose products are recorded once, on its final walk).
  """
  env: dict = dict(zip(jaxpr.invars, inputs))

  def read(v) -> Origin:
    return NONE if isinstance(v, jcore.Literal) else env.get(v, NONE)

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in PRODUCTS and found is not None:
      found.append((name, (ins[0], ins[1])))
    if name == "scan":
      outs = _loop(eqn.params["jaxpr"].jaxpr, ins, eqn.params["num_consts"],
                   eqn.params["num_carry"], found)
    elif name == "while":
      outs = _while(eqn, ins, found)
    elif name == "cond":  # operands: the branch index, then the branches' inputs
      outs = [_union(o) for o in zip(*(origins(b.jaxpr, ins[1:], found)
                                       for b in eqn.params["branches"]))]
      if ins[0][1]:  # the branch taken depends on data: so does what comes out
        outs = [DATA] * len(outs)
    else:
      outs = _call(eqn, ins, found)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _call(eqn: Any, ins: list[Origin], found: list | None) -> list[Origin]:
  """A primitive with sub-jaxprs that take its operands one to one (jit, remat, custom_jvp
  and custom_vjp calls, shard_map, ...): walked with them. Any other equation (or a
  sub-jaxpr whose inputs do not line up): every output comes from all the inputs."""
  subs = [j for value in eqn.params.values() for j in _jaxprs(value)]
  outs = None
  for sub in subs:
    lined_up = len(sub.invars) == len(ins)
    got = origins(sub, ins if lined_up else [_union(ins)] * len(sub.invars), found)
    if lined_up and len(got) == len(eqn.outvars) and outs is None:
      outs = got
  return outs if outs is not None else [_union(ins)] * len(eqn.outvars)


def _fixed_point(body: Callable[[list[Origin]], list[Origin]], carry: list[Origin]
                 ) -> list[Origin]:
  """The loop carry's origins: the initial ones joined with what the body makes of them,
  until nothing changes (origins only grow: a finite lattice)."""
  while True:
    new = [_union([c, o]) for c, o in zip(carry, body(carry))]
    if new == carry:
      return carry
    carry = new


def _loop(body: jcore.Jaxpr, ins: list[Origin], n_consts: int, n_carry: int,
          found: list | None) -> list[Origin]:
  """``scan``: the body takes ``consts + carry + xs`` (a slice of each) and gives
  ``carry + ys``."""
  consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
  carry = _fixed_point(lambda c: origins(body, consts + c + xs, None)[:n_carry], carry)
  return origins(body, consts + carry + xs, found)


def _while(eqn: Any, ins: list[Origin], found: list | None) -> list[Origin]:
  """``while``: the operands are ``cond_consts + body_consts + carry``."""
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
  body = p["body_jaxpr"].jaxpr
  carry = _fixed_point(lambda c: origins(body, body_consts + c, None), carry)
  origins(body, body_consts + carry, found)
  (stop,) = origins(p["cond_jaxpr"].jaxpr, cond_consts + carry, found)
  return [DATA] * len(carry) if stop[1] else carry  # a data-dependent trip count


def products(model: nnx.Module, args: tuple, kwargs: dict) -> list[tuple[str, tuple]]:
  """Every product in ``model(*args, **kwargs)``: ``(primitive, (lhs origin, rhs origin))``,
  the parameters named by their state paths (tuples). The model is not changed: the trace
  runs a merged copy, on abstract values (array inputs are data, others static)."""
  graphdef, state = nnx.split(model)
  keyed = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
  starts: list[Origin] = []
  for key, variable in keyed:  # in the order jax flattens the state: the jaxpr's inputs
    path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key)
    origin = (frozenset([path]), False) if isinstance(variable, nnx.Param) else NONE
    starts += [origin] * len(jax.tree.leaves(variable))
  leaves, treedef = jax.tree.flatten((args, kwargs))
  where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

  def forward(state, arrays):
    filled = list(leaves)
    for i, a in zip(where, arrays):
      filled[i] = a
    a, k = jax.tree.unflatten(treedef, filled)
    return nnx.merge(graphdef, state)(*a, **k)

  closed = jax.make_jaxpr(forward)(state, [leaves[i] for i in where])
  found: list = []
  origins(closed.jaxpr, starts + [DATA] * len(where), found)
  return found


class NotTraceable(ValueError):
  """:func:`report`'s one-line error when ``jax.make_jaxpr`` cannot trace the forward (Python
  control flow on values, ``float(x)``, ...), chained to JAX's error; it says that
  ``allow_float_ops=True`` quantizes the model without the check.

  Attributes:
    reason: ``"the model's forward on the sample inputs cannot be traced by jax.make_jaxpr
      (<JAX's error type>: <its first line>)"``.
  """

  def __init__(self, reason: str):
    super().__init__(f"quantize_nnx: {reason}, which finds the products of parameters left "
                     "float: make the forward traceable, as jax.jit needs, or pass "
                     "quantize_model(..., allow_float_ops=True) to quantize the model without "
                     "this check")
    self.reason = reason


def _owner(path: tuple, modules: dict) -> tuple:
  """The path of the innermost module holding the parameter at ``path``."""
  for cut in range(len(path) - 1, -1, -1):
    if path[:cut] in modules:
      return path[:cut]
  return ()


def _float_owners(params: frozenset, modules: dict, quantized: type) -> list[tuple[tuple, str]]:
  """``[(owner path, why)]`` of a weight operand computed from ``params``: empty when a
  quantized layer's own call computes it (its kernel through its step size, or a kernel the
  rule keeps float)."""
  by_owner: dict = {}
  for path in params:
    owner = _owner(path, modules)
    by_owner.setdefault(owner, set()).add("/".join(map(str, path[len(owner):])))
  bad = []
  for owner, names in sorted(by_owner.items(), key=lambda kv: tuple(map(str, kv[0]))):
    module = modules[owner]
    if isinstance(module, quantized) and "kernel" in names:
      rule = module.brjax_rule
      alpha = step_size.param_name("alpha", rule.alpha_param)
      if (rule.weight_bits is None and names == {"kernel"}) or names == {"kernel", alpha}:
        continue
      if names == {"kernel"}:  # the kernel read without its step size: not in its call
        bad.append((owner, "its kernel is multiplied outside the quantized layer's call, "
                           "float"))
        continue
    listed = ", ".join(repr(n) for n in sorted(names))
    bad.append((owner, f"multiplies its parameter {listed} float: brjax.quant.nnx quantizes "
                       "only the layer types of QUANTIZABLE"))
  return bad


def report(model: nnx.Module, quantized: type, rules: Sequence[QuantRule], args: tuple,
           kwargs: dict) -> tuple[FloatOp, ...]:
  """The products of parameters in ``model(*args, **kwargs)`` that stay float, in modules
  whose first matching rule quantizes (sorted, one per module, op and reason).

  Args:
    model: an NNX model just quantized (its step sizes created).
    quantized: the class of brjax's quantized NNX layers (``brjax.quant.nnx._Quantized``).
    rules: the rules it was quantized by.
    args, kwargs: the sample call.

  Raises:
    NotTraceable: the forward cannot be traced (``jax.make_jaxpr``), chained to JAX's error.
  """
  modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
  try:
    found = products(model, args, kwargs)
  except (jax.errors.JAXTypeError, jax.errors.JAXIndexError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise NotTraceable(f"the model's forward on the sample inputs cannot be traced by "
                       f"jax.make_jaxpr ({type(e).__name__}: {first})") from e
  out = set()
  for name, operands in found:
    for params, data in operands:
      if data or not params:
        continue  # an activation, or a constant
      for owner, why in _float_owners(params, modules, quantized):
        path = "/".join(map(str, owner))
        hit = first_match(rules, path)
        if hit is not None and hit[1].quantizes:
          out.add(FloatOp(path, f"lax.{name}", why))
  return tuple(sorted(out))


def check(model: nnx.Module, quantized: type, rules: Sequence[QuantRule],
          allow_float_ops: bool, args: tuple, kwargs: dict) -> tuple[FloatOp, ...] | str:
  """:func:`report`, which is an error (Linen's message, ``coverage.error``) unless
  ``allow_float_ops``; returns it, which ``left_float`` returns.

  A forward that cannot be traced is an error too (:class:`NotTraceable`'s one line, saying
  that ``allow_float_ops=True`` quantizes without the check); with ``allow_float_ops`` it
  returns instead :func:`not_checked`'s message (a ``str``, never an empty tuple, which
  means "checked, nothing float"), which ``left_float`` raises.
  """
  if not isinstance(allow_float_ops, bool):
    raise ValueError(f"allow_float_ops={allow_float_ops!r} is not accepted: use True or False")
  try:
    found = report(model, quantized, rules, args, kwargs)
  except NotTraceable as e:
    if not allow_float_ops:
      raise
    return not_checked(e.reason)
  if found and not allow_float_ops:
    raise ValueError(coverage.error(found))
  return found


def not_checked(reason: str) -> str:
  """The one-line error of ``left_float`` on a model quantized with ``allow_float_ops=True``
  whose forward could not be traced (``reason``: :attr:`NotTraceable.reason`)."""
  return (f"left_float: this NNX model's products of parameters were not checked, because "
          f"{reason}; quantize_model(..., allow_float_ops=True) quantized it without the check "
          "(make the forward traceable, as jax.jit needs, and quantize the float model again "
          "for the report)")
