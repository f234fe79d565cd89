"""Quantized layers inside Flax's lifted transforms, with no edits to the model.

``nn.scan``, ``nn.vmap`` and ``nn.RNN`` lift only the variable collections they list; brjax
adds its own while a ``quantize_model`` model runs (``flax.core.lift.scan``/``vmap`` are
wrapped, and do what they did when no brjax model runs):

* ``"quant"`` (the sites BR reads) and ``"quant_calib"`` (see below) go along the axis of
  ``"params"``, or axis 0 when the parameters are broadcast (``nn.RNN``: one record per step);
* ``"quant_state"`` (data-decided input signs) goes where ``"params"`` goes: one sign per
  layer of a scanned stack, one for all steps of a recurrence.

A collection the model lists itself is left as it is. ``nn.remat`` lifts every collection.

**Broadcast parameters.** A transform that broadcasts ``"params"`` (``nn.RNN``'s scan,
``nn.vmap(..., variable_axes={"params": None})``) initializes them in a pass that may not
depend on the data, so an input's step size and sign, which LSQ takes from the data, cannot
be initialized there. brjax *defers* them: ``init`` creates them with placeholders, runs
the model once more with those inputs left float, reads what each such input saw over
every step (``"quant_calib"``: its sum of ``|x|``, its count and whether a value was
negative), and writes LSQ's init, ``2 mean|x| / sqrt(qp)``, and the sign into the variables
it returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import types
from typing import Any

from flax import traverse_util
from flax.core import lift
from flax.core.scope import in_filter, union_filters
import flax.linen as nn
import jax
import jax.numpy as jnp

from brjax.quant import calibration, intercept, names, sites, step_size
from brjax.quant import lsq as quant
from brjax.quant.rules import QuantRule

CALIB = "quant_calib"
"""The collection in which deferred inputs record what they saw (only inside ``init``)."""

_CARRIED = (sites.COLLECTION, CALIB, quant.STATE)
_BROADCAST: contextvars.ContextVar = contextvars.ContextVar("brjax_broadcast", default=0)


def install() -> None:
  """Wraps ``flax.core.lift.scan`` and ``vmap`` in place (once): every caller, including
  the transforms a model class was built with, goes through :func:`_lifted`."""
  for name in ("scan", "vmap"):
    fn = getattr(lift, name)
    if "_brjax_original" in fn.__dict__:
      continue
    original = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__,
                                  fn.__closure__)
    original.__kwdefaults__ = fn.__kwdefaults__
    hook = f"_brjax_{name}"
    lift.__dict__[hook] = functools.partial(_lifted, name, original)
    namespace: dict = {}
    exec(f"def trampoline(*args, **kwargs):\n  return {hook}(*args, **kwargs)\n", namespace)  # noqa: S102
    fn.__code__ = namespace["trampoline"].__code__
    fn.__defaults__ = fn.__kwdefaults__ = None
    fn.__dict__["_brjax_original"] = original


def _lifted(name: str, original, *args, **kwargs):
  if intercept.active() is None:
    return original(*args, **kwargs)
  bound = inspect.signature(original).bind(*args, **kwargs)
  bound.apply_defaults()
  a = bound.arguments
  axes = dict(a["variable_axes"])
  broadcast = a.get("variable_broadcast", False)
  listed = [*axes, broadcast, a.get("variable_carry", False)]
  params_axis = next((ax for f, ax in axes.items() if in_filter(f, "params")), None)
  broadcasting = params_axis is None
  for col in _CARRIED:
    if any(in_filter(f, col) for f in listed):
      continue
    if col == quant.STATE and broadcasting:
      if name == "scan":
        broadcast = union_filters(broadcast, col)
      else:
        axes[col] = None
    else:
      axes[col] = 0 if broadcasting else params_axis
  a["variable_axes"] = axes
  if name == "scan":
    a["variable_broadcast"] = broadcast
  fn = original(*bound.args, **bound.kwargs)
  if not broadcasting:
    return fn

  @functools.wraps(fn)
  def under_broadcast(*inner_args, **inner_kwargs):
    token = _BROADCAST.set(_BROADCAST.get() + 1)
    try:
      return fn(*inner_args, **inner_kwargs)
    finally:
      _BROADCAST.reset(token)
  return under_broadcast


def quantize_input(module: nn.Module, x: jax.Array, rule: QuantRule, k: int = 0) -> jax.Array:
  """``x`` fake-quantized by ``rule.act_bits`` on ``module``'s scope, as the ``k``-th input
  of the module (step size ``names.input_alpha(k)``); deferred under broadcast parameters."""
  state = intercept.active()
  path = "/".join(module.path)
  alpha_name, sign_name = names.input_alpha(k), names.input_signed(k)
  key = (path, alpha_name)
  if state is not None and _BROADCAST.get() and module.is_initializing():
    state.log.deferred[key] = (sign_name if rule.act_signed is None else None, rule)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    module.param(names.stored(alpha_name, rule.alpha_param),
                 lambda _: step_size.stored(jnp.ones((), dtype), rule.alpha_param))
    if rule.act_signed is None:
      module.variable(quant.STATE, sign_name, lambda: jnp.array(True))
    return x
  if state is not None and getattr(state, "calibrating", False) and key in state.log.deferred:
    v = x.astype(jnp.float32)
    module.sow(CALIB, alpha_name, jnp.stack([jnp.sum(jnp.abs(v)), jnp.asarray(v.size, v.dtype),
                                              jnp.any(v < 0).astype(v.dtype)]))
    return x
  if k == 0:
    return quant.quantize_input(module, x, rule.act_bits, rule.act_signed,
                                batch_grad_scale=rule.act_batch_grad_scale,
                                alpha_param=rule.alpha_param)
  bits, signed = rule.act_bits, rule.act_signed
  if signed is None:
    if not (module.has_variable(quant.STATE, sign_name)
            or module.is_mutable_collection(quant.STATE)):
      raise ValueError(f"{path}: its input sign {sign_name!r} (act_signed=None) is kept in the "
                       f"{quant.STATE!r} collection, which the variables given to model.apply "
                       "lack: pass every collection that init returned, or set act_signed")
    flag = module.variable(quant.STATE, sign_name, lambda: jnp.any(x < 0))
    qn, qp = calibration.decided_range(bits, flag.value)
  else:
    qn, qp = quant.qrange(bits, signed)
  alpha = create_step_size(module, alpha_name, lambda _: calibration.check_init(
      path, "input", quant.init_alpha(x, qp), x, signed), rule.alpha_param)
  qn_any, qp_any = quant.qrange(bits, signed is not False)
  sites.sow(module, sites.INPUT, sites.Site(values=x, alpha=alpha, qn=jnp.asarray(qn, jnp.int32),
                                            levels=qp_any - qn_any + 1, ndim=x.ndim))
  n = x.size if rule.act_batch_grad_scale else x[0].size
  return quant.lsq_quantize(x, alpha, qn, qp, quant.grad_scale(n, qp))


def create_step_size(module: Any, name: str, init_fn, alpha_param: str) -> jax.Array:
  """``brjax.quant.step_size.create`` for any step size's name (``module``: a bound Linen
  module or a scope)."""
  if name in step_size.LINEAR_NAMES:
    return step_size.create(module, name, init_fn, alpha_param)
  if alpha_param == "log":
    return step_size.exp_step_size(module.param(names.stored(name, "log"),
                                                lambda rng: jnp.log(init_fn(rng))))
  return module.param(name, init_fn)


@contextlib.contextmanager
def calibrating(state: intercept.OpState):
  state.calibrating = True
  try:
    yield
  finally:
    state.calibrating = False


def finish_deferred(variables: Any, deferred: dict, calib: Any) -> Any:
  """``variables`` with the deferred inputs' step sizes and signs from ``calib`` (the
  ``"quant_calib"`` collection of one pass with those inputs float)."""
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  state = traverse_util.flatten_dict(variables.get(quant.STATE, {}), sep="/")
  seen = traverse_util.flatten_dict(calib or {}, sep="/")
  for (path, alpha_name), (sign_name, rule) in deferred.items():
    records = seen.get(names.join(path, alpha_name))
    where = names.join(path, names.stored(alpha_name, rule.alpha_param))
    if not records:
      raise ValueError(f"{path or '<root>'}: its input ran at init but not in the calibration "
                       f"pass, so its step size {alpha_name!r} cannot be initialized")
    old = params[where]
    lead = old.ndim
    total = sum(jnp.sum(r.reshape(r.shape[:lead] + (-1, 3)), axis=-2) for r in records)
    negative = total[..., 2] > 0
    signed = negative if rule.act_signed is None else jnp.asarray(rule.act_signed)
    qp_s = quant.qrange(rule.act_bits, True)[1]
    qp_u = quant.qrange(rule.act_bits, False)[1]
    qp = jnp.where(signed, qp_s, qp_u).astype(jnp.float32)
    alpha = (2.0 * total[..., 0] / total[..., 1] / jnp.sqrt(qp)).astype(old.dtype)
    concrete = not isinstance(alpha, jax.core.Tracer)  # under jax.jit(init): no check
    if concrete and not bool(jnp.all(jnp.isfinite(alpha) & (alpha > 0))):
      raise ValueError(f"{path or '<root>'}: LSQ's init gives its input step size "
                       f"{alpha_name!r} {alpha} from the init batch; init with a real batch")
    if concrete and rule.act_signed is False and bool(jnp.any(negative)):
      raise ValueError(f"{path or '<root>'}: act_signed=False, but the init batch gives its "
                       "input negative values: use act_signed=True or None in its QuantRule")
    params[where] = step_size.stored(alpha, rule.alpha_param).reshape(old.shape)
    if sign_name is not None:
      state[names.join(path, sign_name)] = negative.reshape(
          jnp.shape(state[names.join(path, sign_name)]))
  out = {**variables, "params": traverse_util.unflatten_dict(params, sep="/")}
  if state:
    out[quant.STATE] = traverse_util.unflatten_dict(state, sep="/")
  return out
