"""ONNX export of any brjax-quantized Flax model (Linen or NNX): the QAT model as integers.

    proto = brjax.export.to_onnx(model, variables, images, train=False)    # Linen
    proto = brjax.export.to_onnx(nnx_model, images)                        # NNX
    onnx.save(proto, "model.onnx")
    onnxruntime.InferenceSession("model.onnx").run(None, {"input": images})[0]  # logits

How it is built
---------------
The model's evaluation call is traced with ``jax.make_jaxpr`` (the batch size symbolic,
``jax.export.symbolic_shape``), its variables as inputs, and the jaxpr is translated
primitive by primitive into ONNX nodes with ``onnx.helper`` (opset 21). Everything computed
from variables only is folded at export time by JAX itself. jax2onnx (the maintained JAX
converter) is not used: it has no QuantizeLinear/DequantizeLinear, it would have to be
taught brjax's quantizer (a ``custom_vjp``) through its plugin system, and it pins
packages (orbax-checkpoint < 0.11.37, equinox, netron, ...) that would change brjax's
environment; a jaxpr covers every model brjax quantizes (Linen layers, ``quantize_model``,
NNX, ``nn.scan``, ``nn.remat``) with one translation of about 40 primitives.

Quantizers
----------
Every call of brjax's LSQ quantizer (``brjax.quant.lsq.lsq_quantize``, a ``custom_vjp``
whose forward is ``round(clip(x / max(alpha, floor), qn, qp)) * alpha``) is recognised
in the jaxpr, its step size found as the variable it reads (``alpha``, ``input_alpha``, or
``exp`` of ``log_alpha``, ``log_input_alpha``):

* a kernel (a constant): its codes, computed with the quantizer's own float operations,
  become an int8 initializer, dequantized with scale = the step size (per output channel
  where it is per channel, ``DequantizeLinear`` per axis) or consumed as integers (below);
* an activation: ``QuantizeLinear(x, alpha, 0)`` into uint8 (unsigned range) or int8
  (signed), then, where ``[qn, qp]`` is narrower than the 8-bit container (2..7 bits, 1-bit),
  ``Clip`` of the integer codes to ``[qn, qp]``: ``clip(round(v)) = round(clip(v))`` for
  integer bounds, so the codes are brjax's exactly, whatever the container's saturation.
  Both round half to even, as ``jnp.round``; ORT divides ``x / scale`` as brjax does.

Integer kernels and BatchNorm folding: see :mod:`brjax.export.onnx_ops`. With
``integer_ops=True`` (default) a quantized conv/matmul on quantized codes is
``ConvInteger``/``MatMulInteger`` with the BatchNorm that follows folded into the one
``DequantizeLinear`` of its int32 accumulator; ``integer_ops=False`` gives the plain QDQ
form (``DequantizeLinear`` -> float ``Conv``/``MatMul``) for runtimes that fuse it.

A primitive without translation (``while``, ``cond``, ``gather``, ...) stops the export
with one line: ``<module path>: cannot export <primitive>: <why>``.
"""

from __future__ import annotations

import json
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from brjax.export import onnx_ops
from brjax.export.onnx_graph import Const, Graph, Quant, Tensor, log_step_size
from brjax.quant import lsq, partitioning

INLINED = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
           "custom_lin")
CODES_PREFIX = "codes/"
"""Graph outputs of ``codes_outputs=True``: ``codes/<site>``, a quantized activation's codes."""


class ExportError(ValueError):
  """One line: the module path, the primitive, why it cannot be exported."""


class Failed:
  """An equation's output that could not be translated: an error only if it is used
  (``y[0].size`` traces a slice that nothing reads)."""

  def __init__(self, message: str):
    self.message = message


def _jaxpr(params: dict) -> tuple[Any, list]:
  """``(jaxpr, consts)`` of a call primitive's body."""
  inner = params.get("jaxpr", params.get("call_jaxpr"))
  if hasattr(inner, "jaxpr"):  # a ClosedJaxpr
    return inner.jaxpr, list(inner.consts)
  return inner, []


def _named_call(jaxpr, name: str):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("jit", "pjit") and eqn.params.get("name") == name:
      return eqn
  return None


def _lsq_operands(eqn) -> tuple[int, Any, Any] | None:
  """``(index of x, qn, qp)`` (qn/qp: a literal value or an inner invar) of an LSQ call."""
  inner, _ = _jaxpr(eqn.params)
  clip, rounding = _named_call(inner, "clip"), _named_call(inner, "round")
  divs = [e for e in inner.eqns if e.primitive.name == "div"]
  if clip is None or rounding is None or not divs:
    return None
  x = divs[0].invars[0]
  if x not in inner.invars:
    return None
  return inner.invars.index(x), clip.invars[1], clip.invars[2]


class Exporter:
  """Walks a jaxpr, filling a :class:`Graph`."""

  def __init__(self, graph: Graph, symbol: Any, integer_ops: bool, prefix: tuple):
    self.g, self.symbol, self.integer_ops, self.prefix = graph, symbol, integer_ops, prefix
    self.activations: list[tuple] = []  # (site, codes tensor, dtype), in call order
    self.kernels: list[str] = []

  # -------------------------------------------------------------------------- quantizers

  def _site(self, alpha: Const, kind: str) -> str:
    path = list(alpha.path or ())
    index = []
    while path and isinstance(path[-1], int):
      index.insert(0, path.pop())
    module = "/".join(str(k) for k in path[len(self.prefix):-1])
    name = f"{module}:input" if kind == "input" else module
    return name + "".join(f"[{i}]" for i in index)

  def lsq(self, eqn, ins: list, found: tuple) -> list:
    index, qn, qp = found
    inner, _ = _jaxpr(eqn.params)
    k = inner.invars

    def bound(v):
      if hasattr(v, "val"):
        return int(v.val)
      value = ins[k.index(v)]
      if not isinstance(value, Const):
        raise onnx_ops.Unsupported("a quantizer range computed from the input")
      return int(np.asarray(value.value))

    x, alpha = ins[index], ins[index + 1]
    qn, qp = bound(qn), bound(qp)
    if not (isinstance(alpha, Const) and alpha.path and
            str([p for p in alpha.path if not isinstance(p, int)][-1]) in lsq.STEP_SIZE_NAMES):
      raise onnx_ops.Unsupported("a quantizer whose step size is not a variable")
    dtype = np.dtype(eqn.invars[index].aval.dtype)
    if dtype != np.float32:
      raise onnx_ops.Unsupported(f"a {dtype} quantizer input: export the float32 model")
    a = np.asarray(lsq.safe_alpha(jnp.asarray(alpha.value, jnp.float32)))
    shape = tuple(eqn.invars[index].aval.shape)
    scale = a.reshape((1,) * (len(shape) - a.ndim) + a.shape)
    if isinstance(x, Const):
      site = self._site(alpha, "weight")
      v = jnp.asarray(x.value, jnp.float32) / jnp.asarray(a)
      codes = np.asarray(jnp.round(jnp.clip(v, qn, qp))).astype(np.int8)
      self.kernels.append(site)
      return [Quant(codes, np.dtype(np.int8), scale, shape, shape, site=site)]
    name = [p for p in alpha.path if not isinstance(p, int)][-1]
    site = self._site(alpha, "input" if name == "input_alpha" else "output")
    container = np.dtype(np.uint8 if qn >= 0 else np.int8)
    g = self.g
    info = np.iinfo(container)
    flat = scale.reshape(-1) if a.size > 1 else scale.reshape(())
    attrs = {} if a.size == 1 else {"axis": int(np.argmax(scale.shape))}
    codes = g.node("QuantizeLinear", [g.float(x, self.symbol), g.init(flat, "step_size"),
                                      g.init(np.zeros(flat.shape, container), "zero_point")],
                   f"{site}_q", **attrs)
    if (qn, qp) != (info.min, info.max):
      codes = g.node("Clip", [codes, g.init(np.asarray(qn, container), "qn"),
                              g.init(np.asarray(qp, container), "qp")], f"{site}_codes")
    self.activations.append((site, codes, container, shape))
    return [Quant(codes, container, scale, shape, shape, site=site)]

  # ------------------------------------------------------------------------- the walk

  def scan(self, eqn, ins: list, where: str) -> list:
    p = eqn.params
    body, consts = _jaxpr(p)
    nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
    fixed = ins[:nc]
    carry, xs = ins[nc:nc + ncarry], ins[nc + ncarry:]
    ys = []
    steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
    for i in steps:
      sliced = [self._slice(x, i) for x in xs]
      outs = self.run(body, [Const(np.asarray(c), np.shape(c)) for c in consts],
                      fixed + carry + sliced, where)
      carry, y = outs[:ncarry], outs[ncarry:]
      ys.append(y)
    if p["reverse"]:
      ys = ys[::-1]
    stacked = []
    for j, v in enumerate(eqn.outvars[ncarry:]):
      parts = [y[j] for y in ys]
      if all(isinstance(x, Const) for x in parts):
        stacked.append(Const(np.stack([np.asarray(x.value) for x in parts]), v.aval.shape))
        continue
      names = [self.g.node("Unsqueeze", [self.g.float(x, self.symbol),
                                         self.g.init(np.asarray([0], np.int64), "axes")])
               for x in parts]
      stacked.append(Tensor(self.g.node("Concat", names, axis=0), tuple(v.aval.shape),
                            np.dtype(v.aval.dtype)))
    return list(carry) + stacked

  def _slice(self, x: Any, i: int) -> Any:
    if isinstance(x, Const):
      path = None if x.path is None else (*x.path, i)
      return Const(np.asarray(x.value)[i], tuple(x.shape[1:]), path)
    name = self.g.node("Gather", [self.g.float(x, self.symbol),
                                  self.g.init(np.asarray(i, np.int64), "index")], axis=0)
    return Tensor(name, tuple(x.shape[1:]), np.dtype(getattr(x, "dtype", np.float32)))

  def equation(self, eqn, ins: list, where: str) -> list:
    prim = eqn.primitive.name
    if prim in INLINED:
      inner, consts = _jaxpr(eqn.params)
      return self.run(inner, [Const(np.asarray(c), np.shape(c)) for c in consts], ins, where)
    if prim == "custom_vjp_call":
      found = _lsq_operands(eqn)
      if found is not None:
        _check_used(ins[found[0]:found[0] + 2])
        return self.lsq(eqn, ins, found)
      log = log_step_size(ins)
      if log is not None:
        return [log]
      inner, consts = _jaxpr(eqn.params)
      return self.run(inner, [Const(np.asarray(c), np.shape(c)) for c in consts], ins, where)
    if prim == "scan":
      return self.scan(eqn, ins, where)
    _check_used(ins)
    if prim != "dim_as_value" and all(isinstance(v, Const) for v in ins):
      outs = onnx_ops.fold_constants(eqn, ins)
      if outs is not None:
        return [Const(o, tuple(v.aval.shape)) for o, v in zip(outs, eqn.outvars)]
    return onnx_ops.translate(self, eqn, ins)

  def run(self, jaxpr, consts: list, args: list, where: str = "") -> list:
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v):
      if hasattr(v, "val"):  # a Literal
        return Const(np.asarray(v.val, np.dtype(v.aval.dtype)), ())
      return env[v]

    for eqn in jaxpr.eqns:
      stack = str(eqn.source_info.name_stack)
      here = "/".join(s for s in (where, stack) if s)
      ins = [read(v) for v in eqn.invars]
      try:
        outs = self.equation(eqn, ins, here)
      except _UsedFailure as e:
        outs = [e.failed] * len(eqn.outvars)
      except ExportError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        outs = [Failed(f"{here or '<root>'}: cannot export {eqn.primitive.name}: {why}")
                ] * len(eqn.outvars)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


class _UsedFailure(Exception):
  def __init__(self, failed: Failed):
    super().__init__(failed.message)
    self.failed = failed


def _check_used(values: list) -> None:
  for v in values:
    if isinstance(v, Failed):
      raise _UsedFailure(v)


# ------------------------------------------------------------------------------ tracing


def _is_nnx(model: Any) -> bool:
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return isinstance(model, nnx.Module)


def _linen_function(model, variables, kwargs):
  if "quant" in variables:
    raise ValueError("variables hold the 'quant' collection (recorded sites): pass the "
                     "model's variables without it")
  flat = traverse_util.flatten_dict(dict(partitioning.unbox(variables)))  # boxes: their values
  keys = list(flat)

  def fn(leaves, *args):
    return model.apply(traverse_util.unflatten_dict(dict(zip(keys, leaves))), *args, **kwargs)

  return fn, keys, [flat[k] for k in keys], ("params",)


def _nnx_function(model, kwargs):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  keys = list(flat)

  def fn(leaves, *args):
    new = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new, traverse_util.unflatten_dict(dict(zip(keys, leaves))))
    return nnx.merge(graphdef, new)(*args, **kwargs)

  return fn, keys, [flat[k] for k in keys], ()


STAND_IN_BATCH = 7919
"""A batch size (prime, no model's other size) traced in place of a symbolic one where the
model's Python code needs a concrete batch (``math.sqrt(x.size)``); sizes equal to it, or
multiples, are the runtime batch in the graph."""


def _trace(fn, leaves, args, dynamic_batch: bool):
  """``(closed jaxpr, batch symbol or None)``; the batch (axis 0 of every array) symbolic,
  else :data:`STAND_IN_BATCH`."""
  if not dynamic_batch:
    return jax.make_jaxpr(fn)(leaves, *[np.asarray(a) for a in args]), None
  for symbol in (jax.export.symbolic_shape("batch")[0], STAND_IN_BATCH):
    specs = [jax.ShapeDtypeStruct((symbol, *np.shape(a)[1:]), np.asarray(a).dtype)
             for a in args]
    try:
      return jax.make_jaxpr(fn)(leaves, *specs), symbol
    except Exception:  # pylint: disable=broad-except
      if symbol == STAND_IN_BATCH:
        raise
  raise AssertionError("unreachable")


def to_onnx(model: Any, *args, integer_ops: bool = True, codes_outputs: bool = False,
            dynamic_batch: bool = True, **kwargs) -> Any:
  """The ``onnx.ModelProto`` of a brjax-quantized model's evaluation call.

  Linen: ``to_onnx(model, variables, *sample_args, **apply_kwargs)`` (``variables``: every
  collection ``init`` returned, e.g. trained, boxed or not; ``apply_kwargs`` the evaluation
  mode, e.g. ``train=False``). NNX: ``to_onnx(nnx_model, *sample_args, **call_kwargs)`` (in
  eval mode). The sample arguments (arrays, NHWC images for the CNNs) fix every shape but the batch:
  the graph's inputs ``input`` (``input_<i>`` for several) take any batch size; its
  output is ``output`` (``output_<i>``), float32.

  Args:
    integer_ops: quantized convs/matmuls on quantized codes as ``ConvInteger`` /
      ``MatMulInteger`` (see :mod:`brjax.export.onnx_ops`); False: plain QDQ.
    codes_outputs: also output every quantized activation's codes, as
      ``codes/<site>`` (site names as ``brjax.quant.sites.named``; a scanned layer's
      ``<site>[<layer>]``), for checks.
    dynamic_batch: a symbolic batch size (falls back to the sample's for model code
      that needs a concrete one).

  The model's metadata (``metadata_props``) holds ``brjax.kernels`` (each quantized
  kernel's site: its codes' initializer) and ``brjax.activations`` (sites in call order).

  Raises:
    ExportError: one line, the module path and primitive that cannot be exported.
    ValueError: variables with the ``"quant"`` collection.
  """
  if _is_nnx(model):
    fn, keys, leaves, prefix = _nnx_function(model, kwargs)
  else:
    if not args:
      raise TypeError("to_onnx(model, variables, *sample_args): variables missing")
    fn, keys, leaves, prefix = _linen_function(model, args[0], kwargs)
    args = args[1:]
  arrays, _ = jax.tree.flatten(args)
  closed, symbol = _trace(fn, leaves, arrays, dynamic_batch)
  names = ["input"] if len(arrays) == 1 else [f"input_{i}" for i in range(len(arrays))]
  graph = Graph(names[0] if symbol is not None else None)
  ex = Exporter(graph, symbol, integer_ops, prefix)
  jaxpr, n = closed.jaxpr, len(leaves)
  variables = [Const(_array(leaf), tuple(np.shape(leaf)), tuple(path))
               for leaf, path in zip(leaves, keys)]
  inputs = [Tensor(name, tuple(v.aval.shape), np.dtype(v.aval.dtype))
            for name, v in zip(names, jaxpr.invars[n:])]
  outs = ex.run(jaxpr, [Const(np.asarray(c), np.shape(c)) for c in closed.consts],
                variables + inputs)
  for value in outs:
    if isinstance(value, Failed):
      raise ExportError(value.message)
  if not graph.kernel_inits and not ex.activations:  # a float graph named a quantized one
    raise ExportError("the model records no brjax quantizer: nothing is quantized (quantize "
                      "it with brjax.quantize_model or brjax's layers first)")
  out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
  outputs = []
  for name, value, var in zip(out_names, outs, jaxpr.outvars):
    graph.identity(graph.float(value, symbol), name)
    outputs.append((name, np.dtype(var.aval.dtype), tuple(var.aval.shape)))
  sites = _unique([a[0] for a in ex.activations])
  if codes_outputs:
    for site, (_, tensor, dtype, shape) in zip(sites, ex.activations):
      graph.identity(tensor, CODES_PREFIX + site)
      outputs.append((CODES_PREFIX + site, dtype, shape))
  proto = graph.model([(name, v.dtype, v.shape) for name, v in zip(names, inputs)], outputs,
                      doc="brjax quantized model (brjax.export.to_onnx)", symbol=symbol)
  graph.helper.set_model_props(proto, {
      "brjax.kernels": json.dumps(graph.kernel_inits), "brjax.activations": json.dumps(sites),
      "brjax.integer_ops": json.dumps(integer_ops)})
  return proto


def _array(leaf: Any) -> Any:
  """A variable as numpy (a typed PRNG key array stays as it is)."""
  try:
    value = np.asarray(leaf)
  except (TypeError, ValueError):
    return leaf
  return leaf if value.dtype == object else value


def _unique(names: list[str]) -> list[str]:
  """``brjax.quant.sites.named``'s names: ``<name>#<i>`` for a site called several times."""
  calls: dict[str, int] = {}
  for name in names:
    calls[name] = calls.get(name, 0) + 1
  seen: dict[str, int] = {}
  out = []
  for name in names:
    i = seen[name] = seen.get(name, -1) + 1
    out.append(name if calls[name] == 1 else f"{name}#{i}")
  return out
