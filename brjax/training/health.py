"""Step-size health: whether a run's step sizes are collapsing, in every epoch's record.

A step size that falls towards zero kills its layer (every value clips to the top level,
or, for weights, the kernel rounds to a handful of codes), often long before it reaches
zero, which alone stops a run (``run_control.check_step_sizes``). Each epoch's record
therefore holds, per quantizer kind (``weights``, ``activations``), from the per-layer
metrics of the probe batch (``m["quant"]``, ``brjax.quant.metrics``):

* ``min_ratio``: the smallest step size relative to its value at the end of the first
  epoch (per-channel step sizes: their mean), and ``min_layer``, the layer it belongs to;
* ``clipped_top``: the fraction of values clipped at the top level (``v / alpha > qp +
  1/2``), the mean over the layers of that kind, and ``clipped_top_max`` with its layer.

:func:`warnings` gives the lines the epoch line is followed by when a step size has lost
:data:`WARN_LOSS` (90%) of that value: the run goes on. No JAX.
"""

from __future__ import annotations

import math

KINDS = ("weights", "activations")
WARN_LOSS = 0.9
"""A step size that lost this fraction of its value after epoch 1 gets a warning."""


def step_size_health(quant: dict, first: dict | None) -> dict:
  """``{kind: {"min_ratio", "min_layer", "clipped_top", "clipped_top_max",
  "clipped_top_layer"}}`` of one epoch's ``quant`` metrics against ``first``, the first
  epoch's (``None`` or the same as ``quant`` in epoch 1: every ratio 1). A layer missing
  from ``first`` counts from its own value."""
  out = {}
  for kind in KINDS:
    layers = quant.get(kind) or {}
    if not layers:
      continue
    base = (first or {}).get(kind) or {}
    ratios = {name: _ratio(m["alpha"], base.get(name, m)["alpha"]) for name, m in layers.items()}
    worst = min(ratios, key=lambda n: (ratios[n] if math.isfinite(ratios[n]) else -math.inf))
    clipped = {name: float(m["clipped_top"]) for name, m in layers.items()}
    top = max(clipped, key=clipped.get)
    out[kind] = {"min_ratio": ratios[worst], "min_layer": worst,
                 "clipped_top": sum(clipped.values()) / len(clipped),
                 "clipped_top_max": clipped[top], "clipped_top_layer": top}
  return out


def _ratio(alpha: float, first: float) -> float:
  alpha, first = float(alpha), float(first)
  return alpha / first if first > 0 else math.nan


def warnings(health: dict) -> list[str]:
  """One ``WARNING:`` line per kind whose smallest step size lost :data:`WARN_LOSS` of its
  value after epoch 1 (or is not finite)."""
  lines = []
  for kind, h in health.items():
    ratio = h["min_ratio"]
    if not (math.isfinite(ratio) and ratio > 1.0 - WARN_LOSS):
      lines.append(f"WARNING: the {kind[:-1]} step size of {h['min_layer']} is {ratio:.3g} of "
                   f"its value after epoch 1 (lost over {WARN_LOSS:.0%}; {kind} clipped at "
                   f"the top level: {h['clipped_top']:.1%} on average, "
                   f"{h['clipped_top_max']:.1%} at {h['clipped_top_layer']}); training goes "
                   "on (see --alpha_param, --alpha_lr_scale, --br_schedule)")
  return lines


def first_epoch_quant(records: list[dict]) -> dict | None:
  """The ``quant`` metrics of epoch 1 among a run's metrics records (a resumed run's
  reference), or None."""
  for record in records:
    if record.get("epoch") == 1:
      return record.get("quant")
  return None
