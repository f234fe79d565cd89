"""The ONNX graph that :mod:`brjax.export.onnx_export` fills: values, nodes, initializers.

Built with ``onnx.helper`` (nodes, graph, model) and ``onnx.numpy_helper`` (initializers);
nothing here writes protobuf by hand. A traced value is one of

* :class:`Const`: a numpy array known at export time (a variable, or computed from
  variables only: BatchNorm's ``scale * rsqrt(var + eps)`` is folded here). A constant
  broadcast along the symbolic batch keeps size-1 axes there (``shape`` is the traced one);
* :class:`Tensor`: a float (or other) ONNX tensor computed from the inputs;
* :class:`Quant`: a value held as integers, ``float = scale * sum_pending(ints) + shift``:
  a quantized activation (``ints`` = its codes, uint8/int8), a quantized kernel (codes as
  an int8 initializer), or an integer kernel's int32 accumulator. ``scale`` and ``shift``
  broadcast against the value's shape, with at most one axis of size > 1 (per channel).
  ``pending`` lists axes of ``ints`` summed lazily (a global average pool of codes, so a
  following quantized matmul still runs on the 8-bit codes, see ``onnx_ops``).

:meth:`Graph.float` turns any value into a float tensor: ``DequantizeLinear`` (per axis
where the scale is per channel) for a :class:`Quant`, ``Expand`` for a broadcast constant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from brjax.quant import step_size

OPSET = 21
IR_VERSION = 10


def onnx_modules():
  """``(onnx, onnx.helper, onnx.numpy_helper)``: imported only when exporting."""
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("ONNX export needs the onnx package: pip install 'brjax[onnx]'") from e
  return onnx, helper, numpy_helper


@dataclasses.dataclass
class Const:
  """A value known at export time. ``path``: the variable it is (or a slice of), if any."""
  value: np.ndarray
  shape: tuple = ()
  path: tuple | None = None


@dataclasses.dataclass
class Tensor:
  """An ONNX tensor ``name`` of traced ``shape`` (ints, or the symbolic batch) and dtype."""
  name: str
  shape: tuple
  dtype: np.dtype


@dataclasses.dataclass
class Quant:
  """``float = scale * sum over pending axes of ints + shift``, of traced ``shape``.

  ``ints``: an ONNX tensor name, or a numpy array (a kernel's codes); ``ints_shape``: its
  shape (``shape`` plus the pending axes); ``site``: the quantizer's name, for a kernel
  or an activation's codes.
  """
  ints: str | np.ndarray
  dtype: np.dtype
  scale: np.ndarray
  shape: tuple
  ints_shape: tuple
  shift: np.ndarray | None = None
  pending: tuple = ()
  site: str | None = None

  @property
  def plain(self) -> bool:
    """8-bit codes with one scale per tensor (or per channel), no shift or pending sum."""
    return (self.dtype in (np.uint8, np.int8) and self.shift is None and not self.pending)


def channel_axis(scale: np.ndarray) -> int | None:
  """The one axis of ``scale`` of size > 1, None for a scalar; raises for several."""
  axes = [i for i, n in enumerate(np.shape(scale)) if n != 1]
  if len(axes) > 1:
    raise ValueError(f"a scale of shape {np.shape(scale)} is not per tensor or per channel")
  return axes[0] if axes else None


def is_static(dim: Any) -> bool:
  return isinstance(dim, (int, np.integer))


class Graph:
  """Nodes and initializers in the order they are made; unique names."""

  def __init__(self, batch_source: str | None = None):
    _, self.helper, self.numpy_helper = onnx_modules()
    self.nodes, self.initializers, self.outputs = [], [], []
    self.counts: dict[str, int] = {}
    self.kernel_inits: dict[str, str] = {}  # a quantized kernel's site: its codes' name
    self.batch_source = batch_source  # an input whose axis 0 is the symbolic batch
    self._batch = None

  def name(self, hint: str) -> str:
    hint = hint.replace(":", "_") or "t"
    n = self.counts.get(hint, 0)
    self.counts[hint] = n + 1
    return hint if n == 0 else f"{hint}_{n}"

  def init(self, value: np.ndarray, hint: str = "const") -> str:
    """An initializer holding ``value``; returns its name."""
    name = self.name(hint)
    self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs: list[str], hint: str | None = None, *, outputs: int = 1,
           name: str | None = None, **attrs) -> Any:
    """Appends one node; returns its output name (a list if ``outputs > 1``)."""
    outs = [self.name(f"{hint or op}") for _ in range(outputs)]
    self.nodes.append(self.helper.make_node(op, inputs, outs, name=self.name(name or op),
                                            **attrs))
    return outs if outputs > 1 else outs[0]

  def identity(self, source: str, output: str) -> None:
    """An ``Identity`` node writing ``source`` to the graph output name ``output``."""
    self.nodes.append(self.helper.make_node("Identity", [source], [output],
                                            name=self.name(output)))

  def batch(self) -> str:
    """A 1-D int64 tensor holding the runtime batch size (the symbolic dimension)."""
    if self._batch is None:
      if self.batch_source is None:
        raise ValueError("a shape depends on the batch size, but no input carries it")
      self._batch = self.node("Shape", [self.batch_source], "batch", start=0, end=1)
    return self._batch

  def shape_tensor(self, dims: tuple, symbol: Any) -> str:
    """A 1-D int64 tensor of ``dims``: ints, or the symbolic batch ``symbol``."""
    if not any(d == symbol for d in dims):
      return self.init(np.asarray(dims, np.int64), "shape")
    parts = []
    for d in dims:
      if d == symbol:
        parts.append(self.batch())
      elif is_static(d):
        parts.append(self.init(np.asarray([d], np.int64), "dim"))
      else:
        raise ValueError(f"a shape entry {d} is neither an integer nor the batch size")
    return self.node("Concat", parts, "shape", axis=0)

  # ------------------------------------------------------------------------ float values

  def float(self, value: Any, symbol: Any = None) -> str:
    """The ONNX name of ``value`` as a (float) tensor of its traced shape."""
    if isinstance(value, Tensor):
      return value.name
    if isinstance(value, Const):
      arr = np.asarray(value.value)
      name = self.init(arr, "const")
      if arr.shape != tuple(value.shape):
        full = tuple(1 if is_static(s) and n == s else s
                     for n, s in zip(arr.shape, value.shape))
        name = self.node("Expand", [name, self.shape_tensor(full, symbol)], "expand")
      return name
    return self.dequantize(value)

  def dequantize(self, q: Quant) -> str:
    """``scale * sum_pending(ints) + shift`` as a float32 tensor."""
    ints = q.ints
    if not isinstance(ints, str):
      ints = self.kernel_inits[q.site] = self.init(q.ints, f"{q.site}_codes")
    if q.pending:
      ints = self.node("Cast", [ints], "int32", to=self.helper.np_dtype_to_tensor_dtype(
          np.dtype(np.int32)))
      axes = self.init(np.asarray(q.pending, np.int64), "axes")
      ints = self.node("ReduceSum", [ints, axes], "sum", keepdims=0)
    scale = np.asarray(q.scale, np.float32)
    axis = channel_axis(scale)
    attrs = {} if axis is None else {"axis": axis - scale.ndim + len(q.shape)}
    flat = scale.reshape(-1) if axis is not None else scale.reshape(())
    out = self.node("DequantizeLinear", [ints, self.init(flat, "scale")],
                    f"{q.site or 'dq'}_dq", **attrs)
    if q.shift is not None:
      out = self.node("Add", [out, self.init(np.asarray(q.shift, np.float32), "shift")],
                      "shifted")
    return out

  def model(self, inputs: list[tuple[str, np.dtype, tuple]],
            outputs: list[tuple[str, np.dtype, tuple]], doc: str = "", symbol: Any = None
            ) -> Any:
    """The ``onnx.ModelProto`` (opset :data:`OPSET`), checked by ``onnx.checker``."""
    onnx, helper, _ = onnx_modules()

    def info(name, dtype, shape):
      dims = [d if is_static(d) and not (symbol is not None and d == symbol) else "batch"
              for d in shape]
      return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(
          np.dtype(dtype)), dims)

    graph = helper.make_graph(self.nodes, "brjax", [info(*i) for i in inputs],
                              [info(*o) for o in outputs], self.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="brjax", doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def log_step_size(ins: list) -> Const | None:
  """``alpha = exp(theta)`` of a ``log`` step size (``step_size.exp_step_size`` on its
  variable ``log_alpha``/``log_input_alpha``): a constant under the linear name, so the
  quantizer that reads it finds its step size as a variable."""
  if len(ins) != 1 or not (isinstance(ins[0], Const) and ins[0].path):
    return None
  path = list(ins[0].path)
  i = max(k for k, p in enumerate(path) if not isinstance(p, int))
  if not step_size.is_log_name(str(path[i])):
    return None
  path[i] = step_size.linear_name(str(path[i]))
  value = np.asarray(jnp.exp(jnp.asarray(ins[0].value)))
  return Const(value, tuple(ins[0].shape), tuple(path))
