"""Quantization sites: what each quantizer records for Bin Regularization and metrics.

Every quantizer of brjax (a layer's kernel, a layer's input, a ``QuantReLU``'s output) is a
*site*. When the caller lists :data:`COLLECTION` (``"quant"``) as mutable in
``model.apply``, each site sows one :class:`Site` record under its own module path:

* ``"weight"``: the kernel before quantization (signed range);
* ``"input"``: a layer's input before quantization (signed or unsigned range);
* ``"output"``: a ``QuantReLU``'s clipped output before quantization (unsigned range).

A record holds the values, the step size and the integer range of that site, so the
regularizer needs no global bit width: mixed precision per layer just works. The names
live in their own collection, so they can never collide with parameters (``alpha``,
``input_alpha``) or with a model's own ``intermediates``.

Lifted transforms (``nn.scan``, ``nn.vmap``) stack the records of their layers along new
leading axes. A record knows the rank its values had at the site (``ndim``), so
:func:`grouped` can tell the stacked axes apart and bin each layer of a stack on its own
grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flax import struct, traverse_util
import jax
import jax.numpy as jnp

COLLECTION = "quant"
"""The variable collection that quantization sites sow into."""

WEIGHT, INPUT, OUTPUT = "weight", "input", "output"
KINDS = (WEIGHT, INPUT, OUTPUT)


@struct.dataclass
class Site:
  """One quantizer's tensor, step size and integer range, as seen in one call.

  Attributes:
    values: the float tensor before quantization, any shape.
    alpha: its step size: a scalar, or an array of ``values``' rank broadcastable to it
      (one step size per output channel).
    qn: int32 scalar, the lower end of the integer range (0 for unsigned). An array, not
      a Python int, because a site whose sign is decided from data holds it as a variable.
    levels: ``qp - qn + 1``, the number of levels (static).
    ndim: ``values.ndim`` at the site (static); more axes in ``values`` are stack axes.
  """
  values: jax.Array
  alpha: jax.Array
  qn: jax.Array
  levels: int = struct.field(pytree_node=False)
  ndim: int = struct.field(pytree_node=False)

  @property
  def qp(self) -> jax.Array:
    return self.qn + self.levels - 1


def record(values: jax.Array, alpha: jax.Array, qn: int | jax.Array, qp: int | jax.Array,
           ) -> Site:
  """The :class:`Site` of a tensor quantized on ``[qn, qp]`` with step size ``alpha``.

  ``qp - qn`` must be static (it is for every range of ``quant.qrange``: a data-decided
  sign moves ``qn`` but keeps the number of levels).
  """
  levels = _static_levels(qn, qp)
  return Site(values=values, alpha=alpha, qn=jnp.asarray(qn, jnp.int32), levels=levels,
              ndim=values.ndim)


def _static_levels(qn, qp) -> int:
  if isinstance(qn, int) and isinstance(qp, int):
    return qp - qn + 1
  raise TypeError("a site's range needs a static number of levels: pass qn, qp as Python "
                  "ints, or use quant.input_range for a data-decided sign")


def sow(module: Any, kind: str, site: Site, *, keep_last: bool = False) -> None:
  """Records ``site`` under ``kind`` on ``module``'s path, if ``"quant"`` is mutable.

  Nothing is recorded while the model is initialized, so ``model.init`` returns no
  ``"quant"`` collection (as Flax keeps ``intermediates`` out of ``init``). With
  ``keep_last``, a module called several times keeps only the last call's record (a
  kernel is the same tensor at every call; a shared ReLU may want only its last input).
  """
  if module.is_initializing():
    return
  reduce = {"reduce_fn": lambda _, new: (new,)} if keep_last else {}
  module.sow(COLLECTION, kind, site, **reduce)


def iterate(collection: Any, kinds: tuple[str, ...] = KINDS
            ) -> Iterator[tuple[str, str, Site]]:
  """Every record of a ``"quant"`` collection: ``(module path, kind, site)``.

  The module path is ``"/"``-joined (``"Block_0/Dense_0"``); a module called several
  times yields one record per call, in call order.
  """
  if not collection:
    return
  flat = traverse_util.flatten_dict(collection)
  for path, records in flat.items():
    kind = path[-1]
    if kind not in KINDS:
      raise ValueError(f"the {COLLECTION!r} collection holds {'/'.join(path)!r}, which no "
                       f"brjax site sowed (kinds: {KINDS})")
    if kind in kinds:
      for site in records:
        yield "/".join(path[:-1]), kind, site


def grouped(site: Site) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(values, alpha, qn)`` of a record, with ``alpha`` and ``qn`` broadcastable to values.

  Stack axes (from ``nn.scan``/``nn.vmap``) lead ``values``, ``alpha`` and ``qn`` alike;
  the step size and ``qn`` get ones for the site's own axes, so each layer of a stack (and
  each channel of a per-channel step size) is one group of bins.
  """
  values, alpha, qn = site.values, jnp.asarray(site.alpha), jnp.asarray(site.qn)
  lead = values.ndim - site.ndim
  if lead < 0:
    raise ValueError(f"a site's values have rank {values.ndim}, less than the rank "
                     f"{site.ndim} the site recorded")
  stack = values.shape[:lead]
  if alpha.ndim == lead:  # a per-tensor step size, stacked or not
    alpha = alpha.reshape(stack + (1,) * site.ndim)
  elif alpha.ndim != lead + site.ndim:
    raise ValueError(f"a step size of shape {alpha.shape} does not fit values of shape "
                     f"{values.shape} with {lead} stack axes")
  qn = qn.reshape(stack + (1,) * site.ndim)
  return values, alpha, qn


def named(collection: Any, kinds: tuple[str, ...] = KINDS) -> dict[str, Site]:
  """The records of :func:`iterate` under unique display names, in call order.

  A kernel's and a ``QuantReLU`` output's name is the module path; a layer input's is
  ``"<path>:input"``; a site called ``k > 1`` times gives ``"<name>#0"`` .. ``"<name>#<k-1>"``.
  """
  found = [(path if kind != INPUT else f"{path}:input", site)
           for path, kind, site in iterate(collection, kinds)]
  calls = {}
  for name, _ in found:
    calls[name] = calls.get(name, 0) + 1
  out, seen = {}, {}
  for name, site in found:
    i = seen[name] = seen.get(name, -1) + 1
    out[name if calls[name] == 1 else f"{name}#{i}"] = site
  return out
