"""Quantized NNX layers inside ``nnx.scan``/``nnx.vmap`` stacks and ``nnx.remat``, with no
model edits: one step size per layer of a stack.

An NNX transform runs a *copy* of the modules it is given (``nnx.split`` outside, ``nnx.merge``
inside) on its own traced slice of their variables, and hands back to the originals every
variable the copy changed or created, stacked along the axes it mapped over (flax's
scan-over-layers: layers made under ``nnx.vmap(in_axes=0, out_axes=0)``, run by
``nnx.scan(..., in_axes=(nnx.Carry, 0))`` or ``nnx.scan(in_axes=(0, nnx.Carry))`` on the stack
itself). A quantized layer that finds itself to be such a copy (it is not one of the model's
modules) does what it does outside, and hands back what the caller needs through that same
mechanism, as :class:`Moved` variables on itself:

* in ``quantize_nnx``'s sample forward, its step sizes (and data-decided input sign) are
  created in the copy from the copy's own kernel and input, so each layer of a stack gets
  LSQ's ``2 mean|v| / sqrt(qp)`` of its own slice: ``alpha`` of shape ``(L,)`` (per channel:
  ``(L, 1, ..., out)``), ``input_alpha`` and ``input_signed`` of shape ``(L,)``. Values are
  traced there, so LSQ's checks of the init batch (``brjax.quant.calibration``) run after
  the forward, per layer, on each input's ``[min, max]`` handed back (``calib``);
* in ``record_sites``, a kernel hands back that it ran (``weight``: a scalar per layer, so
  its stacked shape is the stack's) and each input call its values (``input``). The sites
  are then built outside, on the model's own stacked variables: one
  :class:`~brjax.quant.sites.Site` per kernel and per input call whose leading axes are the
  stack's, which ``brjax.quant.sites.grouped`` bins layer by layer, so W-BR and A-BR count
  each layer of a stack as they count the same layers unrolled.

No Python side effect carries a value out of a transform (a traced value would leak, and
JAX may replay a cached trace): only the variables do. Not supported, with an error that
names the layer: a stack whose axis is not leading (``nnx.StateAxes({...: 1})``), and
layers whose variables a transform broadcasts (``in_axes=None``, ``nnx.RNN``'s cell) or
carries (``nnx.Carry``): their step sizes cannot be one per layer, and flax cannot hand
back variables they create.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from brjax.quant import calibration, sites
from brjax.quant import lsq as quant

WEIGHT, INPUT, CALIB = "weight", "input", "calib"
"""What a copy hands back: that its kernel ran, an input call's values, an input's range
at init (``[min, max]``)."""

ACCEPTED = ("brjax.quant.nnx accepts layers stacked along leading axes by nnx.vmap/nnx.scan "
            "(their variables in and out on axis 0, as flax's scan-over-layers) and layers "
            "under nnx.remat or nnx.jit")


@dataclasses.dataclass
class Mode:
  """One forward of a model under brjax. ``ids``: the ``id()`` of the model's own modules
  (a quantized layer that is none of them is a transform's copy); ``moved``: the paths of
  the layers that ran as copies."""
  ids: frozenset
  moved: list = dataclasses.field(default_factory=list)

  def is_copy(self, module: Any) -> bool:
    """Whether ``module`` (a quantized layer running now) is a transform's copy."""
    if id(module) in self.ids:
      return False
    if module.brjax_path not in self.moved:
      self.moved.append(module.brjax_path)
    return True


@dataclasses.dataclass
class Init(Mode):
  """``quantize_nnx``'s sample forward: layers create their step sizes. ``shapes``: each
  quantized layer's kernel shape in the model (by path); ``called``: the paths that ran."""
  shapes: dict = dataclasses.field(default_factory=dict)
  called: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Recording(Mode):
  """One ``record_sites`` forward: ``log`` holds ``(layer, kind, Site)`` of the layers that
  ran as the model's own modules, in call order."""
  log: list = dataclasses.field(default_factory=list)


_MODE: contextvars.ContextVar = contextvars.ContextVar("brjax_nnx_mode", default=None)


def current() -> Mode | None:
  """The forward running now (None: a plain call, which quantizes and records nothing)."""
  return _MODE.get()


@contextlib.contextmanager
def _running(mode: Mode, layers: Any):
  """Runs under ``mode``, with ``brjax_mode`` set on the quantized ``layers``: a static
  attribute, so part of the graph definition that keys every NNX transform's compiled trace.
  A function transformed once (a module-level ``nnx.jit``) would otherwise replay, in
  ``record_sites``, the trace of a plain call that hands nothing back (its Python, which
  reads the mode, does not run again), and record no site without a word."""
  token = _MODE.set(mode)
  for layer in layers:
    layer.brjax_mode = type(mode).__name__
  try:
    yield mode
  finally:
    for layer in layers:
      if "brjax_mode" in vars(layer):
        delattr(layer, "brjax_mode")
    _MODE.reset(token)


class Moved(nnx.Variable):
  """A value a quantized layer's copy inside an NNX transform hands back to the model's
  layer (see the module docstring): never a parameter, and popped by the caller right after
  the forward, so nothing stays on the model."""


def _name(kind: str, k: int | None = None) -> str:
  return f"brjax_moved_{kind}" + ("" if k is None else f"_{k}")


def hand_back(module: nnx.Module, kind: str, value: Any) -> None:
  """Puts ``value`` (an array of any shape) on ``module`` as a :class:`Moved` variable.

  ``WEIGHT`` is one variable per layer; ``INPUT`` and ``CALIB`` take the first free index,
  so that calls in several transforms (each one's copy holds what the previous ones handed
  back) and several calls in one transform keep one variable each, in call order.
  """
  if kind == WEIGHT:
    setattr(module, _name(kind), Moved(jnp.asarray(value)))
    return
  k = 0
  while hasattr(module, _name(kind, k)):
    k += 1
  setattr(module, _name(kind, k), Moved(value))


def check_stacked(path: str, stored: tuple[int, ...], inner: tuple[int, ...]) -> None:
  """Raises unless a kernel of shape ``inner`` inside a transform is the trailing part of the
  model's kernel of shape ``stored`` (the stack's axes lead, or there is no stack)."""
  lead = len(stored) - len(inner)
  if lead < 0 or tuple(stored[lead:]) != tuple(inner):
    raise ValueError(f"{path}: its kernel, {tuple(stored)} in the model, is {tuple(inner)} "
                     f"inside an NNX transform, which maps it along an axis that is not "
                     f"leading: {ACCEPTED}")


def _popped(model: nnx.Module) -> dict[tuple, dict[str, Any]]:
  """Pops every :class:`Moved` variable of ``model``: ``{module path: {name: value}}``."""
  out: dict[tuple, dict[str, Any]] = {}
  for path, variable in nnx.to_flat_state(nnx.pop(model, Moved)):
    out.setdefault(tuple(path[:-1]), {})[path[-1]] = variable.get_value()
  return out


def _inputs(moved: dict[str, Any], kind: str) -> list[Any]:
  k, found = 0, []
  while _name(kind, k) in moved:
    found.append(moved[_name(kind, k)])
    k += 1
  return found


def _layers(model: nnx.Module, quantized: type) -> dict[tuple, Any]:
  return {tuple(p): m for p, m in nnx.iter_modules(model) if isinstance(m, quantized)}


def check_init(model: nnx.Module, quantized: type) -> None:
  """After ``quantize_nnx``'s sample forward: pops what the copies handed back and runs LSQ's
  init checks (``calibration.check_init``) on the step sizes they created, per layer of a
  stack (``path[i]`` in the message).

  Args:
    model: the model just run by the sample forward (step sizes created, concrete).
    quantized: the class of brjax's quantized NNX layers (``brjax.quant.nnx._Quantized``).

  Raises:
    ValueError: a kernel or init batch LSQ cannot calibrate on, naming the layer.
  """
  layers = _layers(model, quantized)
  for parts, moved in _popped(model).items():
    module = layers[parts]
    path, rule = module.brjax_path, module.brjax_rule
    if _name(WEIGHT) in moved:
      raw = module.kernel.get_value()
      calibration.check_init(path, "kernel", module._brjax_step_size("alpha"), raw)
    ranges = _inputs(moved, CALIB)
    if not ranges:
      continue
    alpha = np.asarray(module._brjax_step_size("input_alpha"))
    for lo_hi in ranges:  # (*stack, 2): each layer of the stack on its own
      lo_hi = np.asarray(lo_hi)
      for index in np.ndindex(lo_hi.shape[:-1]):
        where = f"{path}[{', '.join(map(str, index))}]" if index else path
        calibration.check_init(where, "input", alpha[index], lo_hi[index], rule.act_signed)


def collect(model: nnx.Module, quantized: type) -> list[tuple[Any, str, sites.Site]]:
  """After ``record_sites``' forward: pops what the copies handed back and returns the sites
  of the layers that ran inside transforms, as ``(model's layer, kind, Site)``.

  A kernel's site holds the model's stacked kernel ``(*stack, *kernel)`` with its stacked
  step size (``(*stack,)``, or per channel ``(*stack, 1, ..., out)``) and ``qn`` of shape
  ``stack``; an input call's, the values the copies saw ``(*stack, *x)`` with the stacked
  ``input_alpha`` and ``qn`` (``stack``, int32). ``ndim`` is the rank at the layer, so the
  stack's axes are the leading ones (``sites.grouped``). With no stack, the shapes are the
  plain layer's.
  """
  layers, found = _layers(model, quantized), []
  for parts, moved in _popped(model).items():
    module = layers[parts]
    rule = module.brjax_rule
    if _name(WEIGHT) in moved:
      stack = np.shape(moved[_name(WEIGHT)])
      raw = module.kernel.get_value()
      if tuple(raw.shape[:len(stack)]) != tuple(stack):
        raise ValueError(f"{module.brjax_path}: its kernel {tuple(raw.shape)} is not stacked "
                         f"along the leading axes {tuple(stack)} of its stack: {ACCEPTED}")
      qn, qp = quant.qrange(rule.weight_bits, signed=True)
      found.append((module, sites.WEIGHT, sites.Site(
          values=raw, alpha=module._brjax_step_size("alpha"),
          qn=jnp.full(stack, qn, jnp.int32), levels=qp - qn + 1, ndim=raw.ndim - len(stack))))
    for values in _inputs(moved, INPUT):
      alpha = module._brjax_step_size("input_alpha")  # a scalar per layer: its shape is the stack's
      if rule.act_signed is None:
        qn, _ = calibration.decided_range(rule.act_bits, module._brjax_step_size("input_signed"))
        qn_any, qp_any = quant.qrange(rule.act_bits, signed=True)
        levels = qp_any - qn_any + 1
      else:
        qn, qp = quant.qrange(rule.act_bits, rule.act_signed)
        levels = qp - qn + 1
      found.append((module, sites.INPUT, sites.Site(
          values=values, alpha=alpha, qn=jnp.broadcast_to(jnp.asarray(qn, jnp.int32),
                                                          alpha.shape),
          levels=levels, ndim=values.ndim - alpha.ndim)))
  return found


def sample_forward(model: nnx.Module, quantized: type, *args, **kwargs) -> Init:
  """Runs ``quantize_nnx``'s sample forward ``model(*args, **kwargs)``, in which the
  quantized layers create their step sizes, then :func:`check_init`.

  Returns:
    The :class:`Init` mode it ran under (``called``: the paths of the layers that ran).

  Raises:
    ValueError: what the layers raise; a failure once layers ran in a transform, as
      :func:`unsupported`; what :func:`check_init` raises.
  """
  layers = list(_layers(model, quantized).values())
  traced = [m.brjax_path for m in layers if isinstance(m.kernel.get_value(), jax.core.Tracer)]
  if traced:  # the checks below read the step sizes' values
    raise ValueError(f"{traced[0]}: its kernel is traced in quantize_nnx's sample forward, "
                     "which runs under jit/grad: call quantize_nnx eagerly")
  mode = Init(frozenset(id(m) for _, m in nnx.iter_modules(model)),
              shapes={m.brjax_path: tuple(m.kernel.get_value().shape) for m in layers})
  with _running(mode, layers):
    try:
      model(*args, **kwargs)
    except Exception as e:  # a layer's own error names it first; flax's is rewritten
      if mode.moved and not str(e).startswith(tuple(f"{p}:" for p in mode.shapes)):
        raise unsupported(e, mode.moved) from e
      raise
  check_init(model, quantized)
  return mode


def record(model: nnx.Module, quantized: type, ids: frozenset, *args,
           **kwargs) -> tuple[Any, list[tuple[Any, str, sites.Site]]]:
  """Runs ``model(*args, **kwargs)`` recording sites: ``(output, [(layer, kind, Site)])``,
  the layers that ran as the model's modules in call order, then those that ran in
  transforms (:func:`collect`). ``ids``: the ``id()`` of the model's quantized layers.

  Raises:
    ValueError: a quantized layer ran as a copy that handed nothing back to ``model`` (a
      layer of another model, or a transform that drops the variables it creates).
  """
  with _running(Recording(ids), _layers(model, quantized).values()) as mode:
    out = model(*args, **kwargs)
  found = collect(model, quantized)
  missing = sorted(set(mode.moved) - {m.brjax_path for m, _, _ in found})
  if missing:
    raise ValueError(f"{', '.join(missing[:5])}: a quantized layer ran on an object that is "
                     "not one of the recorded model's modules and handed nothing back to it (a "
                     "layer of another model, or a transform that drops the variables a layer "
                     f"creates), so its sites are not recorded: {ACCEPTED}")
  return out, mode.log + found


def unsupported(error: BaseException, paths: list[str]) -> ValueError:
  """The one-line error of a sample forward that failed once layers ran in a transform
  (flax's own message, when a transform cannot hand back the step sizes a layer created)."""
  first = (str(error).strip().splitlines() or [""])[0][:200]
  listed = ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else "")
  return ValueError(f"quantize_nnx: the sample forward failed after {listed} ran inside an "
                    f"NNX transform ({type(error).__name__}: {first}): {ACCEPTED}, not layers "
                    "whose variables a transform broadcasts (in_axes=None, nnx.RNN's cell) or "
                    "carries (nnx.Carry); unroll such layers, or keep them float")
