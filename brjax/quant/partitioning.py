"""Step sizes of boxed parameters: their partitioning, and the readers that unbox.

A Linen model may box its parameters with partitioning metadata (``nn.with_partitioning``,
``nn.with_logical_partitioning``; flax's lm1b example boxes every one), so that
``nn.get_partition_spec`` / ``nn.get_sharding`` shard them over a device mesh (FSDP,
tensor parallelism). In such a model, ``quantize_model``'s ``init`` (and ``init_alphas``)
boxes every step size it adds, in the box of the parameters around it (same kind, mesh and
logical rules):

* a weight's step size (``alpha`` beside a ``kernel``, ``<name>_alpha`` beside ``<name>``,
  their ``log_*`` forms) beside a boxed weight takes the weight's axis names on the axes
  where it has the weight's extent, None elsewhere: a per-channel step size is sharded as
  the weight's output axes are; a per-tensor one (a scalar) is replicated; under a lifted
  transform that stacks layers, the stack axis keeps the weight's name;
* every other step size (a layer input's, a ``QuantReLU``'s, a weight's whose weight is not
  boxed) is replicated: None on every axis.

A model without a ``Partitioned`` box among its parameters is left as it is. brjax's own
layers (``QuantConv``, ``QuantDense``) create their step sizes in ``model.init`` without
``quantize_model``: :func:`box_step_sizes` boxes them the same way.

Whatever reads parameters as arrays (the packed and ONNX exports, the checkpoints, the
step-size readers of ``brjax.quant.step_size``) unboxes them first (:func:`unbox`); a
checkpoint restored into a boxed state gets its boxes back (:func:`rebox`).
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
from flax.core import meta
import jax
import numpy as np

from brjax.quant import names


def is_boxed(x: Any) -> bool:
  """Whether ``x`` is a Flax metadata box (``nn.Partitioned``, ``nn.LogicallyPartitioned``,
  any ``flax.core.meta.AxisMetadata``)."""
  return isinstance(x, meta.AxisMetadata)


def unbox(tree: Any) -> Any:
  """``tree`` with every metadata box replaced by the value it holds
  (``flax.core.meta.unbox``); a tree without boxes comes back as it is."""
  return meta.unbox(tree)


def rebox(template: Any, values: Any) -> Any:
  """``values`` (an unboxed tree of ``template``'s structure) in ``template``'s boxes."""
  return jax.tree.map(lambda t, v: t.replace_boxed(v) if is_boxed(t) else v, template, values,
                      is_leaf=is_boxed)


def box_step_sizes(variables: Any) -> Any:
  """``variables`` whose every unboxed step size in ``params`` is boxed as the module
  docstring says; unchanged when no parameter is boxed (``nn.Partitioned``)."""
  params = variables.get("params") if hasattr(variables, "get") else None
  if not params:
    return variables
  flat = traverse_util.flatten_dict(dict(params))
  boxes = {p: v for p, v in flat.items() if isinstance(v, meta.Partitioned)}
  if not boxes:
    return variables
  first = next(iter(boxes.values()))
  out = dict(flat)
  for path, value in flat.items():
    if not names.is_alpha_name(path[-1]) or is_boxed(value):
      continue
    owner = names.weight_name(path[-1])
    box = boxes.get(path[:-1] + (owner,)) if owner is not None else None
    if box is not None:
      axes = _axes_like(box, np.shape(value))
    else:
      box = next((b for p, b in boxes.items() if p[:-1] == path[:-1]), first)
      axes = (None,) * len(np.shape(value))
    out[path] = box.replace(value=value, names=axes)
  return {**variables, "params": traverse_util.unflatten_dict(out)}


def _axes_like(box: meta.Partitioned, shape: tuple[int, ...]) -> tuple:
  """The weight's axis names where a step size of ``shape`` has the weight's extent (its
  per-channel axes, a leading stack axis), None elsewhere."""
  weight_shape = np.shape(box.value)
  weight_names = tuple(box.names)
  return tuple(weight_names[i] if i < len(weight_names) and i < len(weight_shape)
               and n == weight_shape[i] and n > 1 else None for i, n in enumerate(shape))
