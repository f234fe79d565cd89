"""LSQ quantization of an unmodified Flax NNX model, by rules on module paths.

:func:`quantize_nnx` (also reached through ``brjax.quantize_model(nnx_model, rules,
*sample_inputs)``) quantizes, in place, every ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Conv``, ``nnx.ConvTranspose`` and ``nnx.Einsum`` (subclasses included) whose module
path matches a :class:`~brjax.quant.rules.QuantRule`, the first matching rule deciding. The path
is the ``"/"``-joined attribute names and indices from the model (``"conv1"``,
``"blocks/0/linear"``), as in the model's ``nnx.state``.

A quantized layer stays the same object: its class becomes a subclass of its own class
(``Linear`` -> ``QuantLinear``) whose ``__call__`` quantizes and then calls the layer's own
``__call__``, so every other behaviour (and the parameter paths) is the NNX layer's. It
gets, as ``nnx.Param`` beside its ``kernel``:

* ``alpha`` (``weight_bits``): the kernel's step size, a scalar, or with ``per_channel``
  one per output feature (the kernel's rank, ones on the other axes). While the layer
  runs, its kernel reads ``lsq_quantize(W, alpha, qn, qp, 1/sqrt(N_alpha * qp))`` with
  ``[qn, qp] = qrange(weight_bits, signed=True)`` and ``N_alpha = W.size / alpha.size``;
* ``input_alpha`` (``act_bits``): the step size of the layer's first argument ``x``,
  which is replaced by ``lsq_quantize(x, input_alpha, qn, qp, 1/sqrt(n * qp))`` with
  ``n = x[0].size`` (or ``x.size`` with ``act_batch_grad_scale``).

Step sizes are initialized the LSQ way, ``alpha = 2 mean|v| / sqrt(qp)``, by one forward
pass on the sample inputs: a kernel's from the kernel, an input's from the layer's input
in that batch, with the layers upstream already quantized (as Linen's ``model.init``). An
input sign left to the data (``act_signed=None``) is decided by that batch too (signed iff
any value is negative) and kept in the state as ``input_signed``, a :class:`QuantState`
(not a parameter; it travels with ``nnx.state`` into checkpoints, as Linen's
``"quant_state"``; either sign has ``2^bits`` levels, so the range's start ``qn`` is a traced
int32 scalar and the binning stays static). Everything else the pass changed
(BatchNorm statistics, rng counts, sown intermediates) is restored: the init is not a
training step. Run the model in the mode you want the init in (``model.train()`` is LSQ's
choice for an untrained model; ``model.eval()`` after loading float weights), or pass the
flag in the sample keyword arguments.

Bin Regularization reads quantization sites (``brjax.quant.sites``): :func:`record_sites` runs
the model and returns its output and the ``"quant"`` collection that
``brjax.quant.regularizer.br_losses`` and ``brjax.quant.metrics`` read (one ``"weight"`` record per
quantized kernel, one ``"input"`` record per call). Plain calls record nothing and store
nothing on the model. ``brjax.training.optim.param_labels`` labels the NNX param state
(``weights``, ``alpha_w``, ``alpha_a``) for freezing step sizes with
``optax.multi_transform``. A training step, under ``nnx.jit``::

  model = brjax.quantize_model(model, [QuantRule(".*", weight_bits=2, act_bits=2)], x0)
  tx = optax.multi_transform({"weights": sgd, "alpha_w": optax.set_to_zero(),
                              "alpha_a": sgd}, brjax.training.optim.param_labels)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits, collection = brjax.quant.nnx.record_sites(model, x)
      w_br, a_br = brjax.quant.regularizer.br_losses(collection)
      return cross_entropy(logits, y) + w_br + a_br
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

Layers stacked by ``nnx.vmap``/``nnx.scan`` (flax's scan-over-layers) get one step size per
layer (``alpha`` of shape ``(L,)``, each from its own slice), and layers under ``nnx.remat``
or an inner ``nnx.jit`` are quantized as outside; :func:`record_sites` returns their sites
stacked along the stack's axes, which BR bins layer by layer (``brjax.quant.nnx_stacks``).

Not supported, with an error rather than a silent skip:

* layers whose variables a transform broadcasts or carries (``nnx.RNN``'s cell), or maps
  along an axis that is not leading: the sample forward raises, naming the layer;
* calling :func:`quantize_nnx` under a transform, without sample inputs, or with sample
  inputs that are tracers, or that LSQ cannot calibrate on (all zero, constant, negative
  at an ``act_signed=False`` input: ``brjax.quant.calibration``; pass a real batch);
* a quantized layer whose input is not its first argument (``inputs``), or not float.

Failures are loud, naming module paths: a rule that matches no quantizable layer (listing
them), a model in which nothing was quantized, a matched layer that the sample forward
never called, a model quantized twice, and (unless ``allow_float_ops``) a product of a
parameter left float in a module a quantizing rule matches (a custom layer's ``x @ self.w``;
``left_float`` lists them) or a forward ``jax.make_jaxpr`` cannot trace (``nnx_coverage``).
On any failure the model is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from brjax.quant import calibration, nnx_coverage, nnx_stacks, sites, step_size, views
from brjax.quant import lsq as quant
from brjax.quant.nnx_stacks import Init as _Init
from brjax.quant.nnx_stacks import Recording as _Recording
from brjax.quant.rules import QuantRule, check_rules, first_match

__all__ = ["QUANTIZABLE", "QuantState", "quantize_nnx", "quantized_layers", "record_sites"]

QUANTIZABLE = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)
"""The NNX layer types :func:`quantize_nnx` quantizes (subclasses included)."""

_STATIC = ("brjax_rule", "brjax_path")
"""Static (hashable, non-pytree) attributes a quantized layer carries."""


class QuantState(nnx.Variable):
  """A quantizer's decision kept in the model's state, not trained: the data-decided input
  sign ``input_signed`` (a bool scalar; ``act_signed=None``), as Linen's ``"quant_state"``
  collection. Not an ``nnx.Param``, so ``nnx.Optimizer(..., wrt=nnx.Param)`` and
  ``nnx.grad`` leave it alone, but it is in ``nnx.state(model)`` and so in checkpoints."""


_STATE_NAMES = ("input_signed",)


class _Quantized(nnx.Module):
  """Mixin placed before an NNX layer class: quantizes its input and kernel as it runs.

  A ``nnx.Module`` itself (a plain mixin would give the subclass another instance layout,
  and ``__class__`` could not be swapped).

  Static attributes (set by :func:`quantize_nnx`): ``brjax_rule`` (the QuantRule) and
  ``brjax_path`` (the module path it was quantized at, for messages). A data-decided input
  sign is state: ``input_signed``, a :class:`QuantState`.
  """

  def __call__(self, *args, **kwargs):
    mode = nnx_stacks.current()
    rule, path = self.brjax_rule, self.brjax_path
    moved = mode is not None and mode.is_copy(self)  # a transform's copy: nnx_stacks
    if isinstance(mode, _Init):
      mode.called.add(path)
    if rule.act_bits is not None:
      args, kwargs = self._brjax_quantize_input(mode, moved, args, kwargs)
    if rule.weight_bits is None:
      return super().__call__(*args, **kwargs)
    raw = self.kernel.get_value()
    qn, qp = quant.qrange(rule.weight_bits, signed=True)
    if isinstance(mode, _Init):
      axes = _channel_axes(self, raw.ndim, args, kwargs) if rule.per_channel else ()
      init = lambda: quant.init_alpha(raw, qp, axes)
      if moved:  # traced: checked per layer after the forward (nnx_stacks.check_init)
        nnx_stacks.check_stacked(path, mode.shapes.get(path, raw.shape), raw.shape)
        nnx_stacks.hand_back(self, nnx_stacks.WEIGHT, 0)
      else:
        _check_concrete(raw, path, "kernel")
        init = lambda: calibration.check_init(path, "kernel", quant.init_alpha(raw, qp, axes),
                                              raw)
      step_size.nnx_create(self, "alpha", rule.alpha_param, init)
    alpha = self._brjax_step_size("alpha")
    if isinstance(mode, _Recording):
      if moved:
        nnx_stacks.hand_back(self, nnx_stacks.WEIGHT, 0)
      else:
        mode.log.append((self, sites.WEIGHT, sites.record(raw, alpha, qn, qp)))
    self.kernel.set_value(
        quant.lsq_quantize(raw, alpha, qn, qp, quant.grad_scale(raw.size // alpha.size, qp)))
    try:
      return super().__call__(*args, **kwargs)
    finally:
      self.kernel.set_value(raw)

  def _brjax_step_size(self, name: str) -> jax.Array:
    """The value of the step size (or input sign) ``name``, which the init created."""
    form = "linear" if name == "input_signed" else self.brjax_rule.alpha_param
    name = step_size.param_name(name, form)  # log_alpha, log_input_alpha with "log"
    if not hasattr(self, name):
      raise ValueError(f"{self.brjax_path}: the quantized layer has no {name!r}: "
                       "it was removed after quantize_nnx (restore it, or quantize the model "
                       "again from float)")
    return step_size.value(getattr(self, name).get_value(), form)

  def _brjax_quantize_input(self, mode, moved: bool, args: tuple, kwargs: dict
                            ) -> tuple[tuple, dict]:
    rule, path = self.brjax_rule, self.brjax_path
    if args:
      x, rest = args[0], args[1:]
    elif "inputs" in kwargs:
      x, rest = kwargs["inputs"], ()
    else:
      raise ValueError(f"{path}: act_bits needs the layer's input as its first argument "
                       "(inputs)")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{path}: act_bits={rule.act_bits} quantizes float inputs, but the "
                       f"input is {jnp.result_type(x)}")
    if isinstance(mode, _Init):
      if not moved:
        _check_concrete(x, path, "input")
      if rule.act_signed is None and not hasattr(self, "input_signed"):
        self.input_signed = QuantState(jnp.any(x < 0))
      if rule.act_signed is None and moved:  # the copy's own traced sign, per layer
        qp_in = calibration.decided_range(rule.act_bits, self.input_signed[...])[1]
      else:
        signed = rule.act_signed if rule.act_signed is not None else bool(self.input_signed[...])
        qp_in = quant.qrange(rule.act_bits, signed)[1]
      init = lambda: calibration.check_init(path, "input", quant.init_alpha(x, qp_in), x,
                                            rule.act_signed)
      if moved and not hasattr(self, step_size.param_name("input_alpha", rule.alpha_param)):
        nnx_stacks.hand_back(self, nnx_stacks.CALIB, jnp.stack([jnp.min(x), jnp.max(x)]))
        init = lambda: quant.init_alpha(x, qp_in)  # checked after the forward
      step_size.nnx_create(self, "input_alpha", rule.alpha_param, init)
    alpha = self._brjax_step_size("input_alpha")
    if rule.act_signed is not None:
      qn, qp = quant.qrange(rule.act_bits, rule.act_signed)
      site = sites.record(x, alpha, qn, qp)
    else:  # decided from data and kept in the state: int32 scalars, the same levels
      qn, qp = calibration.decided_range(rule.act_bits, self._brjax_step_size("input_signed"))
      qn_any, qp_any = quant.qrange(rule.act_bits, signed=True)  # the levels of either sign
      site = sites.Site(values=x, alpha=alpha, qn=qn, levels=qp_any - qn_any + 1, ndim=x.ndim)
    if isinstance(mode, _Recording) and moved:
      nnx_stacks.hand_back(self, nnx_stacks.INPUT, x)
    elif isinstance(mode, _Recording):
      mode.log.append((self, sites.INPUT, site))
    n = x.size if rule.act_batch_grad_scale else x[0].size
    q = quant.lsq_quantize(x, alpha, qn, qp, quant.grad_scale(n, qp))
    if args:
      return (q, *rest), kwargs
    return rest, {**kwargs, "inputs": q}


_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
  """``Quant<Name>(_Quantized, cls)``, one per layer class."""
  if cls not in _CLASSES:
    _CLASSES[cls] = type(f"Quant{cls.__name__}", (_Quantized, cls), {
        "__module__": __name__, "__qualname__": f"Quant{cls.__name__}",
        "__doc__": f"``{cls.__module__}.{cls.__qualname__}`` quantized by brjax "
                   "(see ``brjax.quant.nnx``)."})
  return _CLASSES[cls]


def _check_concrete(x: Any, path: str, what: str) -> None:
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
        f"{path}: its {what} is traced in quantize_nnx's sample forward, which runs under "
        "jit/grad: call quantize_nnx eagerly")


def _channel_axes(module: Any, ndim: int, args: tuple, kwargs: dict) -> tuple[int, ...]:
  """The kernel axes of the layer's output features (``calibration.output_channel_axes``)."""
  if isinstance(module, nnx.Einsum):
    spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    return calibration.output_channel_axes(ndim, einsum=spec)
  if isinstance(module, nnx.LinearGeneral):
    return calibration.output_channel_axes(ndim, out_features=len(module.out_features))
  return calibration.output_channel_axes(
      ndim, transpose_kernel=isinstance(module, nnx.ConvTranspose) and module.transpose_kernel)


def _path_str(parts: tuple) -> str:
  return "/".join(str(p) for p in parts)


def quantized_layers(model: nnx.Module) -> dict[str, QuantRule]:
  """``{module path: rule}`` of every layer of ``model`` that brjax quantized."""
  return {_path_str(p): m.brjax_rule for p, m in nnx.iter_modules(model)
          if isinstance(m, _Quantized)}


def quantize_nnx(model: nnx.Module, rules: QuantRule | Sequence[QuantRule], *sample_inputs,
                 allow_float_ops: bool = False, **sample_kwargs) -> nnx.Module:
  """Quantizes an NNX model in place by ``rules`` and initializes its step sizes.

  Args:
    model: an ``nnx.Module``, not yet quantized.
    rules: one or more :class:`~brjax.quant.rules.QuantRule`; the first rule whose
      ``module_path`` fully matches a layer's path decides how it is quantized.
    *sample_inputs: the arguments of one ``model(...)`` call on real data (concrete
      arrays, e.g. the first training batch): the step sizes are initialized from it.
    allow_float_ops: accept products of parameters left float in modules a quantizing rule
      matches (``brjax.quant.left_float`` lists them), and a forward make_jaxpr cannot trace.
    **sample_kwargs: keyword arguments of that call (e.g. ``train=True``).

  Returns:
    ``model`` itself: same parameters and paths, plus the ``nnx.Param`` step sizes
    ``alpha``/``input_alpha`` and (``act_signed=None``) the :class:`QuantState`
    ``input_signed`` in the quantized layers, whose classes are ``Quant<Name>``
    subclasses of their own.

  Raises:
    TypeError / ValueError: bad rules; ``model`` not an NNX module, or already quantized;
      a rule that matches no quantizable layer; nothing quantized; sample inputs that are
      tracers (or quantize_nnx under jit); a layer in a transform brjax does not support
      (``brjax.quant.nnx_stacks``); a matched layer the sample forward never called; products
      left float or an untraceable forward, unless ``allow_float_ops``. The model is unchanged.
  """
  rules = check_rules(rules)
  if not isinstance(model, nnx.Module):
    raise TypeError(f"quantize_nnx takes a flax.nnx.Module, not a {type(model).__name__}")
  if not sample_inputs and not sample_kwargs:
    raise TypeError("quantize_model(nnx_model, rules, *sample_inputs) needs the arguments "
                    "of one model call on a real batch, which the step sizes are initialized "
                    "from: e.g. quantize_model(model, rules, first_batch)")
  traced = [x for x in jax.tree.leaves((sample_inputs, sample_kwargs))
            if isinstance(x, jax.core.Tracer)]
  if traced:
    raise ValueError("quantize_nnx: the sample inputs must be concrete arrays (the step "
                     "sizes and data-decided input signs are initialized from their values), "
                     "but some are tracers: call it outside jax.jit/nnx.jit/grad")
  modules = list(nnx.iter_modules(model))
  done = [_path_str(p) for p, m in modules if isinstance(m, _Quantized)]
  if done:
    raise ValueError(f"the model is already quantized (e.g. {done[0]}): quantize_nnx takes "
                     "a float model")

  matched = {i: [] for i in range(len(rules))}
  unsupported = {i: [] for i in range(len(rules))}
  plan = []  # (path, module, rule)
  for parts, module in modules:
    path = _path_str(parts)
    hit = first_match(rules, path)
    if hit is None:
      continue
    index, rule = hit
    if not isinstance(module, QUANTIZABLE):
      unsupported[index].append(f"{path or '<root>'} ({type(module).__name__})")
      continue
    matched[index].append(path)
    if rule.quantizes:
      plan.append((path, module, rule))
  layers = sorted(_path_str(p) or "<root>" for p, m in modules if isinstance(m, QUANTIZABLE))
  for i, rule in enumerate(rules):
    if rule.quantizes and not matched[i]:
      seen = sorted(unsupported[i])
      found = (f"; it matched only {', '.join(seen[:5])}{' ...' if len(seen) > 5 else ''}, "
               "which brjax does not quantize" if seen else "")
      raise ValueError(
          f"rules[{i}] (module_path={rule.module_path!r}) matched no quantizable layer: "
          "module_path must match the whole module path (re.fullmatch); the quantizable "
          f"layers are {', '.join(layers[:8]) or 'none'}{' ...' if len(layers) > 8 else ''}"
          f"{found} (quantizable: {', '.join('nnx.' + t.__name__ for t in QUANTIZABLE)})")
  if not plan:
    raise ValueError("quantize_nnx: nothing was quantized (every matching rule keeps its "
                     "layers float)")
  for path, module, _ in plan:
    taken = [n for n in quant.STEP_SIZE_NAMES + _STATE_NAMES + _STATIC if hasattr(module, n)]
    if taken:
      raise ValueError(f"{path or '<root>'}: the {type(module).__name__} already has an "
                       f"attribute {taken[0]!r}, which brjax would add")

  snapshot = nnx.as_pure(nnx.state(model))
  before = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
  swapped = []
  try:
    for path, module, rule in plan:
      swapped.append((module, type(module)))
      object.__setattr__(module, "__class__", _quantized_class(type(module)))
      module.brjax_rule = rule
      module.brjax_path = path or "<root>"
    init = nnx_stacks.sample_forward(model, _Quantized, *sample_inputs, **sample_kwargs)
    _restore(model, snapshot, before, swapped, keep_step_sizes=True)
    never = [path or "<root>" for path, module, _ in plan
             if module.brjax_path not in init.called]
    if never:
      raise ValueError(
          f"quantize_nnx: {', '.join(never[:5])}{' ...' if len(never) > 5 else ''} matched "
          "a rule but the sample forward never called it, so its step sizes cannot be "
          "initialized: pass sample inputs (and keyword arguments) that run every "
          "quantized layer, or narrow the rules")
    model.brjax_left_float = nnx_coverage.check(model, _Quantized, rules, allow_float_ops,
                                                sample_inputs, sample_kwargs)
  except BaseException:
    _restore(model, snapshot, before, swapped, keep_step_sizes=False)
    raise
  return views.register(model, _Quantized)


def _restore(model: nnx.Module, snapshot: Any, before: set, swapped: list, *,
             keep_step_sizes: bool) -> None:
  """Puts back every variable's value from ``snapshot`` and drops the variables the
  sample forward created; keeps the quantized layers' step sizes if ``keep_step_sizes``,
  else also undoes the quantization (classes and attributes)."""
  nnx.update(model, snapshot)
  quantized = {id(m) for m, _ in swapped} if keep_step_sizes else set()
  owners = {}
  for parts, module in nnx.iter_modules(model):
    owners.setdefault(parts, module)

  def created(path, _):
    if path in before:
      return False
    owner = owners.get(path[:-1])
    return not (len(path) and path[-1] in quant.STEP_SIZE_NAMES + _STATE_NAMES and owner is not None
                and id(owner) in quantized)

  if any(created(p, v) for p, v in nnx.to_flat_state(nnx.state(model))):
    nnx.pop(model, created)
  if not keep_step_sizes:
    for module, cls in swapped:
      for name in _STATIC:
        if name in vars(module):
          delattr(module, name)
      object.__setattr__(module, "__class__", cls)


def record_sites(model: nnx.Module, *args, **kwargs) -> tuple[Any, dict]:
  """Runs ``model(*args, **kwargs)`` and returns its output and its quantization sites.

  Args:
    model: a model quantized by :func:`quantize_nnx`.
    *args, **kwargs: the call's arguments.

  Returns:
    ``(output, collection)``: ``collection`` is the nested dict that
    ``brjax.quant.regularizer`` and ``brjax.quant.metrics`` read as the ``"quant"`` collection,
    ``{path part: ... {"weight": (Site,), "input": (Site, ...)}}``: one ``"weight"``
    record per quantized kernel (its last call's) and one ``"input"`` record per call of a
    layer whose input is quantized, in call order; those of a layer stacked by
    ``nnx.scan``/``nnx.vmap`` lead with the stack's axes (``brjax.quant.nnx_stacks``).
    Nothing is stored on the model.

  Raises:
    ValueError: ``model`` has no quantized layer, or is a view made before quantizing
      (``brjax.quant.views``); a quantized layer ran that is not one of ``model``'s.
  """
  paths = views.checked_paths(model, _Quantized)  # none, or a stale nnx.view: an error
  out, log = nnx_stacks.record(model, _Quantized, frozenset(paths), *args, **kwargs)
  collection: dict = {}
  for module, kind, site in log:
    node = collection
    for part in paths[id(module)]:
      node = node.setdefault(str(part), {})
    node[kind] = (site,) if kind == sites.WEIGHT else node.get(kind, ()) + (site,)
  return out, collection
