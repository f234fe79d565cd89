"""How one ``init``/``apply`` of a ``quantize_model`` Linen model runs.

1. The real call, under the module interceptor (``brjax.quant.quantize``) and the operation
   interceptor (``brjax.quant.intercept``). If a module a quantizing rule matches runs a
   watched operation (outside a layer quantized as a layer), the call stops and
2. a *plan* is made: the same call under ``jax.eval_shape``, which traces every value back
   to the parameters it is computed from; then the real call runs again with the plan.
3. ``init`` only: step sizes and signs deferred under broadcast parameters
   (``brjax.quant.lifted``) are calibrated by one more pass.

The operations the plan left float are kept for ``brjax.quant.coverage.left_float`` and,
unless the model allows them, are an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from brjax.quant import coverage, intercept, lifted
from brjax.quant.rules import QuantRule


def run(rules: tuple[QuantRule, ...], make_log: Callable[[], Any], call: Callable, args: tuple,
        kwargs: dict, holder: list, allow_float_ops: bool, owner: Any = None
        ) -> tuple[Any, Any]:
  """``(output of call(*args, **kwargs), its log)``, quantized; see the module docstring.

  A plan is kept on ``owner`` (the unbound model) for calls on inputs of the same
  structure and shapes, ``init`` and ``apply`` alike (the same code runs the same
  products), so that a model called again is not traced again."""
  lifted.install()
  key = _key(args, {k: v for k, v in kwargs.items() if k not in _NOT_INPUTS})
  plans = owner.__dict__.setdefault("_brjax_plans", {}) if owner is not None else {}
  plan = plans.get(key) if key is not None else None
  while True:
    log = make_log()
    state = intercept.OpState(rules, "real", plan, log)
    try:
      with log, intercept.watching(state):
        out = call(*args, **kwargs)
      break
    except intercept.NeedPlan:
      if plan is not None:
        raise
      plan = _plan(rules, make_log, call, args, kwargs)
      if key is not None:
        plans[key] = plan
  found = tuple(sorted(plan.left_float.values())) if plan is not None else ()
  holder[0] = found
  if found and not allow_float_ops:
    raise ValueError(coverage.error(found))
  log.plan = plan
  return out, log


_NOT_INPUTS = ("mutable", "rngs", "capture_intermediates")


def _key(args: tuple, kwargs: dict) -> Any:
  """What a plan depends on: the call's structure, its arrays' shapes and dtypes and its
  other arguments; None if one of those cannot be hashed."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  parts = tuple((a.shape, str(a.dtype), bool(getattr(a, "weak_type", False)))
                if isinstance(a, (jax.Array, np.ndarray)) else a for a in leaves)
  key = (treedef, parts)
  try:
    hash(key)
  except TypeError:
    return None
  return key


def _plan(rules: tuple[QuantRule, ...], make_log: Callable[[], Any], call: Callable,
          args: tuple, kwargs: dict) -> intercept.Plan:
  plan = intercept.Plan()
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

  def traced(*arrays):
    filled = list(leaves)
    for i, a in zip(where, arrays):
      filled[i] = a
    a, k = jax.tree_util.tree_unflatten(treedef, filled)
    log = make_log()
    with log, intercept.watching(intercept.OpState(rules, "plan", plan, log)):
      call(*a, **k)

  jax.eval_shape(traced, *[leaves[i] for i in where])
  return plan


def calibrate(rules: tuple[QuantRule, ...], make_log: Callable[[], Any], apply: Callable,
              variables: Any, init_log: Any, rngs: Any, args: tuple, kwargs: dict) -> Any:
  """``variables`` with the step sizes and signs that ``init`` deferred, calibrated on the
  init batch (``brjax.quant.lifted``)."""
  if not init_log.deferred:
    return variables
  kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "capture_intermediates")}
  rngs = dict(rngs) if isinstance(rngs, dict) else {"params": rngs}
  log = make_log()
  log.deferred = init_log.deferred
  state = intercept.OpState(rules, "real", init_log.plan, log)
  with log, intercept.watching(state), lifted.calibrating(state):
    _, updated = apply(variables, *args, rngs=rngs, mutable=True, **kwargs)
  return lifted.finish_deferred(variables, init_log.deferred, updated.get(lifted.CALIB))
