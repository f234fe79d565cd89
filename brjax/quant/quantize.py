"""``quantize_model``: LSQ quantization of an unmodified Flax model, by rules on module paths.

For a Linen module, :func:`quantize_model` returns the same model (same class name, same
fields, same ``init``/``apply`` arguments) whose ``init`` and ``apply`` run under a Flax
method interceptor (``nn.intercept_methods``). Every call of an ``nn.Conv``,
``nn.ConvTranspose``, ``nn.Dense``, ``nn.DenseGeneral`` or ``nn.Einsum`` whose module path
matches a :class:`~brjax.quant.rules.QuantRule` is quantized on the layer's own scope:

* its input (``act_bits``): ``quant.quantize_input``, step size ``input_alpha``;
* its kernel (``weight_bits``): ``quant.quantize_kernel`` as the layer reads it with
  ``self.param("kernel", ...)``, step size ``alpha`` beside the kernel.

In any other module a quantizing rule matches, every product of a parameter
(``dot_general``, ``einsum``, ``conv_general_dilated``, ``@``) is quantized at the operation
(``brjax.quant.intercept``, run by ``brjax.quant.passes``), and what could not be is reported
(``brjax.quant.coverage``); lifted transforms need no edits (``brjax.quant.lifted``).

Parameter paths are unchanged; the step sizes are added beside the kernels (boxed with a
partitioning in a model whose parameters are boxed: ``brjax.quant.partitioning``). Each quantizer
records a site (see ``brjax.quant.sites``) for Bin Regularization and metrics when ``"quant"`` is
mutable. For NNX models, see ``brjax.quant.nnx``.

Failures are loud, with the module paths named: a rule that matches no quantizable layer
(at ``apply``: nor any layer whose step sizes ``variables`` hold, as a head only called in
training), a model in which nothing was quantized, step sizes in ``variables`` of a layer
that ran without using them (the rules changed since the variables were made; a layer that
did not run, as that head in eval, is no error), products left float (unless
``allow_float_ops``), and sites that did not come back (a transform brjax does not lift,
which A-BR and W-BR would silently miss). An init batch LSQ cannot calibrate on fails too
(see ``brjax.quant.calibration``).
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import dataclasses
import functools
from typing import Any

from flax import traverse_util
from flax.core.scope import in_filter
import flax.linen as nn
import jax

from brjax.quant import calibration, intercept, lifted, names, partitioning, passes, sites
from brjax.quant import lsq as quant
from brjax.quant.rules import QuantRule, check_rules, first_match
from brjax.quant.step_size import param_name

QUANTIZABLE = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum)
"""The Linen layer types ``quantize_model`` quantizes (subclasses included)."""

_BRJAX_LAYERS = (quant.QuantConv, quant.QuantDense, quant.QuantReLU)


def quantize_model(model: Any, rules: QuantRule | Sequence[QuantRule], *sample_inputs,
                   allow_float_ops: bool = False, **sample_kwargs) -> Any:
  """Quantizes an unmodified Flax model (Linen or NNX) by ``rules``.

  Args:
    model: a ``flax.linen.Module`` (unbound), or an ``flax.nnx.Module``.
    rules: one or more :class:`~brjax.quant.rules.QuantRule`; the first rule matching a layer's
      module path decides how it is quantized.
    *sample_inputs: NNX only: inputs of one call (a real batch: step sizes are
      initialized from it the LSQ way).
    allow_float_ops: accept operations that multiply a parameter in a module a quantizing
      rule matches but stay float (``brjax.quant.coverage``); by default they are an error
      that lists them, at ``init``/``apply`` (Linen) or here (NNX).
    **sample_kwargs: NNX only: keyword arguments of that call (e.g. ``train=True``).

  Returns:
    Linen: a module whose ``init``/``apply`` take the same arguments as ``model``'s.
    NNX: an ``nnx.Module`` (see ``brjax.quant.nnx.quantize_nnx``).

  Raises:
    ValueError / TypeError: bad rules; and, at ``init``/``apply``, the loud failures
      listed in the module docstring.
  """
  rules = check_rules(rules)
  if not isinstance(allow_float_ops, bool):
    raise ValueError(f"allow_float_ops={allow_float_ops!r} is not accepted: use True or False")
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(model, nnx.Module):
    from brjax.quant import nnx as brjax_nnx  # pylint: disable=g-import-not-at-top
    return brjax_nnx.quantize_nnx(model, rules, *sample_inputs,
                                  allow_float_ops=allow_float_ops, **sample_kwargs)
  if not isinstance(model, nn.Module):
    raise TypeError(f"quantize_model takes a flax.linen or flax.nnx Module, not a "
                    f"{type(model).__name__}")
  if sample_inputs or sample_kwargs:
    raise TypeError("a Linen model takes no sample inputs: its step sizes are initialized "
                    "by model.init(rng, batch)")
  if model.scope is not None:
    raise ValueError("quantize_model takes an unbound Linen module (not one inside "
                     "apply/bind): quantize the outermost model")
  if getattr(type(model), "_brjax_rules", None) is not None:
    raise ValueError(f"{type(model).__name__} is already quantized by quantize_model")
  cls = _quantized_class(type(model), rules, allow_float_ops)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return cls(**fields, name=model.name)


@functools.cache
def _quantized_class(cls: type, rules: tuple[QuantRule, ...], allow_float_ops: bool = False
                     ) -> type:
  """A subclass of ``cls`` with the same name whose ``init``/``apply`` intercept (the passes
  of ``brjax.quant.passes``)."""
  left_float = [None]  # None until an init or apply ran: nothing was checked yet
  make_log = functools.partial(_Interception, rules)

  def init_with_output(self, rngs, *args, **kwargs):
    out, log = passes.run(rules, make_log, functools.partial(cls.init_with_output, self, rngs),
                          args, kwargs, left_float, allow_float_ops, self)
    variables = passes.calibrate(rules, make_log, functools.partial(cls.apply, self),
                                 out[1], log, rngs, args, kwargs)
    log.check(variables=None, returned=variables, recording=False)  # init records no site
    return out[0], partitioning.box_step_sizes(variables)

  def apply(self, variables, *args, **kwargs):
    out, log = passes.run(rules, make_log, functools.partial(cls.apply, self, variables),
                          args, kwargs, left_float, allow_float_ops, self)
    mutable = kwargs.get("mutable", False)
    log.check(variables=variables, returned=out[1] if mutable is not False else {},
              recording=in_filter(mutable, sites.COLLECTION))
    return out

  return type(cls.__name__, (cls,), {
      "__qualname__": cls.__qualname__, "__module__": cls.__module__,
      "__doc__": cls.__doc__, "_brjax_rules": rules, "_brjax_left_float": left_float,
      "init_with_output": init_with_output, "apply": apply})


class _Interception:
  """One ``init``/``apply`` under the interceptor, and what its calls did (at trace time)."""

  def __init__(self, rules: tuple[QuantRule, ...]):
    self.rules = rules
    self.matched = {i: set() for i in range(len(rules))}
    self.unsupported = {i: set() for i in range(len(rules))}
    self.step_sizes = set()   # "/"-joined parameter paths of the step sizes used
    self.sites = set()        # (module path, kind) of every quantizer that ran
    self.called = set()       # module path of every module called
    self.quantizable = set()  # module path of every quantizable layer called
    self.deferred = {}        # (module path, step size): inputs initialized after init
    self.plan = None
    self._context = None

  def __enter__(self) -> _Interception:
    self._context = nn.intercept_methods(self._intercept)
    self._context.__enter__()
    return self

  def __exit__(self, *exc):
    return self._context.__exit__(*exc)

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    frame = intercept.push(module, "/".join(module.path),
                           isinstance(module, QUANTIZABLE + _BRJAX_LAYERS), context.method_name)
    try:
      return self._intercept_call(next_fun, args, kwargs, context)
    finally:
      intercept.pop(frame)

  def _intercept_call(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    self.called.add(path)
    if isinstance(module, QUANTIZABLE):
      self.quantizable.add(path)
    if isinstance(module, _BRJAX_LAYERS):  # quantized by its own fields, not by the rules
      if module.bits != quant.FLOAT_BITS:
        self.step_sizes.add(_join(path, param_name("alpha", module.alpha_param)))
      return next_fun(*args, **kwargs)
    hit = first_match(self.rules, path)
    if hit is None:
      return next_fun(*args, **kwargs)
    index, rule = hit
    if not isinstance(module, QUANTIZABLE):
      self.unsupported[index].add(f"{path} ({type(module).__name__})")
      return next_fun(*args, **kwargs)
    self.matched[index].add(path)
    if rule.act_bits is not None:
      args, kwargs = _quantize_first_input(module, rule, path, args, kwargs)
      self.step_sizes.add(_join(path, param_name("input_alpha", rule.alpha_param)))
      self.sites.add((path, sites.INPUT))
    if rule.weight_bits is None:
      return next_fun(*args, **kwargs)
    self.step_sizes.add(_join(path, param_name("alpha", rule.alpha_param)))
    self.sites.add((path, sites.WEIGHT))
    with _kernel_quantized(module, rule, args, kwargs):
      return next_fun(*args, **kwargs)

  def check(self, variables: Any, returned: Any, recording: bool) -> None:
    """The loud failures: rules that matched nothing, nothing quantized, unused step sizes,
    and (when the caller asked for the ``"quant"`` collection) sites that did not come
    back. At ``apply`` (``variables`` given), a rule or a model whose quantized layers did
    not run in this call (a head called only in training) is no error: ``variables`` hold
    their step sizes."""
    held = {"/".join(p[:-1]) for p in _flat_params(variables) if _is_step_size(p)}
    for i, rule in enumerate(self.rules):
      if rule.quantizes and not self.matched[i] and not any(map(rule.matches, held)):
        raise ValueError(self._matched_nothing(i, rule))
    if not self.step_sizes and not held:
      raise ValueError("quantize_model: nothing was quantized (every matching rule keeps "
                       "its layers float)")
    if variables is not None:
      self._check_step_sizes(variables)
    if recording:
      self._check_recorded(returned)

  def _matched_nothing(self, i: int, rule: QuantRule) -> str:
    seen = sorted(self.unsupported[i])
    found = (f"; it matched only {', '.join(seen[:5])}{' ...' if len(seen) > 5 else ''}, "
             f"which brjax does not quantize" if seen else "")
    layers = sorted(self.quantizable)
    called = (f"; the quantizable layers called are {', '.join(layers[:8])}"
              f"{' ...' if len(layers) > 8 else ''}" if layers else "")
    return (f"rules[{i}] (module_path={rule.module_path!r}) matched no quantizable layer: "
            f"module_path must match the whole module path (re.fullmatch){called}{found} "
            f"(quantizable: {', '.join(t.__name__ for t in QUANTIZABLE)}, and any module's "
            "dot_general/einsum/conv that multiplies one of its parameters)")

  def _check_step_sizes(self, variables: Any) -> None:
    """Step sizes of a layer that ran in this call without using them; a layer that did not
    run (a training-only head in eval) uses none, and is no error."""
    unused = sorted("/".join(p) for p in _flat_params(variables)
                    if _is_step_size(p) and "/".join(p) not in self.step_sizes
                    and "/".join(p[:-1]) in self.called)
    if unused:
      raise ValueError(
          f"variables hold step sizes that no quantized call used: {', '.join(unused[:5])}"
          f"{' ...' if len(unused) > 5 else ''} (were they made with other rules?)")

  def _check_recorded(self, returned: Any) -> None:
    collection = returned.get(sites.COLLECTION, {}) if hasattr(returned, "get") else {}
    came_back = {(path, kind) for path, kind, _ in sites.iterate(collection)}
    lost = sorted(f"{path} ({kind})" for path, kind in self.sites - came_back)
    if lost:
      raise ValueError(
          f"quantization sites of {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''} "
          f"did not come back from apply: they run inside a lifted transform (nn.scan, "
          f"nn.vmap, ...) that does not carry the {sites.COLLECTION!r} collection; add it "
          f"to the transform's variable_axes (e.g. variable_axes={{'params': 0, "
          f"'{sites.COLLECTION}': 0}}), or BR would miss those layers")


def _is_step_size(path: tuple) -> bool:
  return quant.is_alpha_path(path) or (bool(path) and names.is_alpha_name(path[-1]))


def _join(path: str, name: str) -> str:
  return f"{path}/{name}" if path else name


def _flat_params(variables: Any) -> dict:
  """The flattened ``params`` of ``variables`` (None, at init: empty)."""
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  return traverse_util.flatten_dict(params) if params else {}


def _quantize_first_input(module: nn.Module, rule: QuantRule, path: str,
                          args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """``(args, kwargs)`` with the layer's input (``inputs``, the first argument) quantized."""
  if args:
    x, rest = args[0], args[1:]
  elif "inputs" in kwargs:
    x, rest = kwargs["inputs"], ()
  else:
    raise ValueError(f"{path}: act_bits needs the layer's input as its first argument")
  if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
    raise ValueError(f"{path}: act_bits={rule.act_bits} quantizes float inputs, but the "
                     f"input is {x.dtype}")
  q = lifted.quantize_input(module, x, rule)
  if args:
    return (q, *rest), kwargs
  return rest, {**kwargs, "inputs": q}


@contextlib.contextmanager
def _kernel_quantized(module: nn.Module, rule: QuantRule, args: tuple, kwargs: dict):
  """While the layer runs, its ``self.param("kernel", ...)`` returns the quantized kernel.

  Shadows ``param`` on this (bound, per-call) instance only; every other behaviour of the
  Flax layer is its own.
  """
  read = type(module).param

  def param(name, init_fn, *init_args, **init_kwargs):
    value = read(module, name, init_fn, *init_args, **init_kwargs)
    if name != "kernel":
      return value
    axes = _channel_axes(module, value.ndim, args, kwargs) if rule.per_channel else ()
    return quant.quantize_kernel(module, value, rule.weight_bits, channel_axes=axes,
                                 alpha_param=rule.alpha_param)

  object.__setattr__(module, "param", param)
  try:
    yield
  finally:
    object.__delattr__(module, "param")


def _channel_axes(module: nn.Module, ndim: int, args: tuple, kwargs: dict) -> tuple[int, ...]:
  """The kernel axes of the layer's output features (``calibration.output_channel_axes``)."""
  if isinstance(module, nn.Einsum):
    spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    return calibration.output_channel_axes(ndim, einsum=spec)
  if isinstance(module, nn.DenseGeneral):
    features = module.features
    n = len(features) if isinstance(features, (tuple, list)) else 1
    return calibration.output_channel_axes(ndim, out_features=n)
  return calibration.output_channel_axes(
      ndim, transpose_kernel=isinstance(module, nn.ConvTranspose) and module.transpose_kernel)
