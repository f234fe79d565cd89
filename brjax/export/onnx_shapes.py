"""Shape primitives (reshape, broadcast, slices, ...) as ONNX nodes, for
:mod:`brjax.export.onnx_ops`; the batch size may be symbolic (``ex.symbol``): a shape
that holds it is computed at run time from the input's ``Shape``."""

from __future__ import annotations

import numpy as np

from brjax.export.onnx_graph import Const, Tensor, is_static

INT64_MAX = np.iinfo(np.int64).max


class Unsupported(Exception):
  """An equation the exporter cannot translate (the message says why)."""


def out_value(ex, eqn, name: str, i: int = 0) -> Tensor:
  aval = eqn.outvars[i].aval
  return Tensor(name, tuple(aval.shape), np.dtype(aval.dtype))


def float_name(ex, v) -> str:
  return ex.g.float(v, ex.symbol)


def int64s(ex, values) -> str:
  return ex.g.init(np.asarray(values, np.int64), "ints")


# ------------------------------------------------------------------------------ shapes


def _reshape_target(ex, dims: tuple) -> str:
  """``Reshape``'s shape input: ints, the runtime batch, and one -1 for another symbol."""
  def batch(d):
    return ex.symbol is not None and d == ex.symbol

  def derived(d):  # a size computed from the batch: symbolic, or a multiple of the
    return not batch(d) and (not is_static(d) or (  # concrete stand-in batch
        is_static(ex.symbol) and d != 0 and d % ex.symbol == 0))

  if not any(batch(d) or derived(d) for d in dims):
    return int64s(ex, dims)
  free = [i for i, d in enumerate(dims) if derived(d)]
  if len(free) > 1:
    raise Unsupported(f"a shape {dims} with several batch-dependent sizes")
  parts = [ex.g.batch() if batch(d) else
           int64s(ex, [-1 if i in free else d]) for i, d in enumerate(dims)]
  return ex.g.node("Concat", parts, "shape", axis=0)


def reshape(ex, eqn, ins):
  if eqn.params.get("dimensions") is not None:
    raise Unsupported("reshape with dimensions")
  target = _reshape_target(ex, eqn.params["new_sizes"])
  name = ex.g.node("Reshape", [float_name(ex, ins[0]), target])
  return [out_value(ex, eqn, name)]


def broadcast_in_dim(ex, eqn, ins):
  x, shape, dims = ins[0], tuple(eqn.params["shape"]), eqn.params["broadcast_dimensions"]
  in_shape = tuple(eqn.invars[0].aval.shape)
  full = [1] * len(shape)
  for src, dst in enumerate(dims):
    full[dst] = in_shape[src]
  if isinstance(x, Const):
    value = np.asarray(x.value).reshape([n if is_static(n) else 1 for n in full])
    return [Const(value, shape)]
  name = float_name(ex, x)
  new = [i for i in range(len(shape)) if i not in dims]
  if new:
    name = ex.g.node("Unsqueeze", [name, int64s(ex, new)])
  if tuple(full) != shape:
    target = tuple(1 if (is_static(n) and is_static(s) and n == s) or n is s else s
                   for n, s in zip(full, shape))
    name = ex.g.node("Expand", [name, ex.g.shape_tensor(target, ex.symbol)])
  return [out_value(ex, eqn, name)]


def transpose(ex, eqn, ins):
  return [out_value(ex, eqn, ex.g.node("Transpose", [float_name(ex, ins[0])],
                                  perm=list(eqn.params["permutation"])))]


def squeeze(ex, eqn, ins):
  return [out_value(ex, eqn, ex.g.node("Squeeze", [float_name(ex, ins[0]),
                                              int64s(ex, eqn.params["dimensions"])]))]


def concatenate(ex, eqn, ins):
  return [out_value(ex, eqn, ex.g.node("Concat", [float_name(ex, v) for v in ins],
                                  axis=int(eqn.params["dimension"])))]


def pad(ex, eqn, ins):
  config = eqn.params["padding_config"]
  if any(i != 0 or lo < 0 or hi < 0 for lo, hi, i in config):
    raise Unsupported("negative or interior padding")
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  name = ex.g.node("Pad", [float_name(ex, ins[0]), int64s(ex, pads), float_name(ex, ins[1])])
  return [out_value(ex, eqn, name)]


def slice_(ex, eqn, ins):
  p, shape = eqn.params, eqn.invars[0].aval.shape
  ends = [e if is_static(e) and not (ex.symbol is not None and e == ex.symbol) else INT64_MAX
          for e in p["limit_indices"]]
  if any(not is_static(s) or (not is_static(e) and e is not n)
         for s, e, n in zip(p["start_indices"], p["limit_indices"], shape)):
    raise Unsupported("a slice whose bounds depend on the batch size")
  steps = p["strides"] or (1,) * len(ends)
  name = ex.g.node("Slice", [float_name(ex, ins[0]), int64s(ex, p["start_indices"]),
                             int64s(ex, ends),
                             int64s(ex, range(len(ends))), int64s(ex, steps)])
  return [out_value(ex, eqn, name)]


def dynamic_slice(ex, eqn, ins):
  if not all(isinstance(v, Const) for v in ins[1:]):
    raise Unsupported("a slice at traced indices")
  starts = [int(np.asarray(v.value)) for v in ins[1:]]
  sizes = eqn.params["slice_sizes"]
  if not all(is_static(s) for s in sizes):
    raise Unsupported("a slice of batch-dependent size")
  ends = [s + n for s, n in zip(starts, sizes)]
  name = ex.g.node("Slice", [float_name(ex, ins[0]), int64s(ex, starts), int64s(ex, ends),
                             int64s(ex, range(len(ends)))])
  return [out_value(ex, eqn, name)]


def split(ex, eqn, ins):
  names = ex.g.node("Split", [float_name(ex, ins[0]), int64s(ex, eqn.params["sizes"])],
                    outputs=len(eqn.params["sizes"]), axis=int(eqn.params["axis"]))
  names = names if isinstance(names, list) else [names]
  return [out_value(ex, eqn, n, i) for i, n in enumerate(names)]


def gather(ex, eqn, ins):
  """A gather of an outer product of 1-D index vectors (``x[:, ::2, ::2]`` traced with a
  symbolic batch): one ``Slice`` (arithmetic progressions) or ``Gather`` per axis."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  if not isinstance(ins[1], Const) or dn.operand_batching_dims:
    raise Unsupported("a gather at traced indices")
  idx = np.asarray(ins[1].value)
  axes, shape = tuple(dn.start_index_map), eqn.invars[0].aval.shape
  kept = [d for d in range(len(shape)) if d not in axes]
  ok = (tuple(dn.collapsed_slice_dims) == axes == tuple(sorted(axes))
        and idx.ndim == len(axes) + 1 and all(sizes[d] == 1 for d in axes)
        and all(sizes[d] is shape[d] or sizes[d] == shape[d] for d in kept)
        and tuple(dn.offset_dims) == tuple(kept))
  vectors = []
  for k in range(len(axes) if ok else 0):
    column = np.moveaxis(idx[..., k], k, 0)
    ok = ok and bool(np.all(column == column[:, *([0] * (idx.ndim - 2))][
        (slice(None),) + (None,) * (idx.ndim - 2)]))
    vectors.append(column.reshape(column.shape[0], -1)[:, 0])
  if not ok:
    raise Unsupported("a gather that is not a strided slice of some axes")
  name = float_name(ex, ins[0])
  for axis, vec in zip(axes, vectors):
    step = int(vec[1] - vec[0]) if len(vec) > 1 else 1
    if step > 0 and np.array_equal(vec, vec[0] + step * np.arange(len(vec))):
      name = ex.g.node("Slice", [name, int64s(ex, [vec[0]]), int64s(ex, [vec[-1] + 1]),
                                 int64s(ex, [axis]), int64s(ex, [step])])
    else:
      name = ex.g.node("Gather", [name, int64s(ex, vec)], axis=axis)
  return [out_value(ex, eqn, name)]


def dim_as_value(ex, eqn, ins):
  dim = eqn.params["dim"]
  dtype = np.dtype(eqn.outvars[0].aval.dtype)
  if is_static(dim):
    return [Const(np.asarray(dim, dtype))]
  if dim != ex.symbol:
    raise Unsupported(f"the value of a dimension {dim}")
  name = ex.g.node("Squeeze", [ex.g.batch()])
  return [out_value(ex, eqn, ex.g.node("Cast", [name], to=ex.g.helper.np_dtype_to_tensor_dtype(
      dtype)))]
