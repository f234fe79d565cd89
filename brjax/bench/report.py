"""The benchmark's report: its measurements, the targets they are checked against, the text.

No JAX: the measurements are plain numbers (``brjax.bench.training`` takes them).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import statistics
import time
from typing import Any

# (measurement, comparison, limit, description, timing): the target holds if
# `value <op> limit`; timing targets are not checked with --quick.
TARGETS = (
    ("step_ratio_br", "<=", 1.15, "QAT+BR step / float step", True),
    ("br_ratio_8bit_2bit", "<=", 1.3, "BR at 8 bits / BR at 2 bits", True),
    ("input_ratio", ">=", 3.0, "input pipeline / step consumption", True),
    ("compiles_train_step", "<=", 2, "train step compilations in a two-phase run", False),
    ("compiles_eval_step", "==", 1, "eval step compilations in a two-phase run", False),
    ("plain_vit_brjax_over_float", "<=", 1.3, "ViT: quantized + BR step / float step", True),
    ("plain_mobilenet_v2_brjax_over_float", "<=", 1.3,
     "MobileNetV2: quantized + BR step / float step", True),
)


class Report:
  """Collects measurements; writes each as one JSON line to ``json_out`` as it comes."""
  def __init__(self, context: dict, json_out: str | None):
    self.context = context
    self.rows: dict[str, tuple[Any, str, str]] = {}
    self._file = open(json_out, "w") if json_out else None

  def add(self, name: str, value, unit: str, note: str = "") -> None:
    """One measurement; ``None`` when it could not be taken."""
    self.rows[name] = (value, unit, note)
    if self._file:
      line = json.dumps({"name": name, "value": value, "unit": unit, "context": self.context})
      self._file.write(line + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()

  def table(self) -> str:
    width = max(len(n) for n in self.rows)
    lines = [f"{'measurement':{width}s}  {'value':>12s}  unit"]
    for name, (value, unit, note) in self.rows.items():
      shown = f"{value:12.4g}" if isinstance(value, float) else f"{value!s:>12s}"
      lines.append(f"{name:{width}s}  {shown}  {unit}" + (f"  ({note})" if note else ""))
    return "\n".join(lines)


def check_targets(report: Report, quick: bool) -> tuple[list[str], bool]:
  """Lines ``PASS  what: name = value (target <= limit)`` for every target (``SKIP`` for
  timing targets with ``quick``), and whether all checked ones passed."""
  ops = {"<=": lambda v, l: v <= l, ">=": lambda v, l: v >= l, "==": lambda v, l: v == l}
  lines, all_ok = [], True
  for name, op, limit, what, timing in TARGETS:
    if name not in report.rows:  # a part that was not measured (--noplain_models)
      lines.append(f"SKIP  {what}: {name} not measured")
      continue
    value = report.rows[name][0]
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    line = f"{what}: {name} = {shown} (target {op} {limit}"
    if quick and timing:
      lines.append(f"SKIP  {line}; not checked with --quick: run without it)")
      continue
    ok = value is not None and ops[op](value, limit)
    all_ok &= ok
    lines.append(f"{'PASS' if ok else 'FAIL'}  {line})")
  return lines, all_ok



def results_text(report: Report) -> str:
  """The table of measurements, then every target with PASS, FAIL or SKIP."""
  context = report.context
  lines, _ = check_targets(report, context["quick"])
  return (f"{report.table()}\n\nTargets ({context['device']}, jax {context['jax']}, "
          f"{context['cores']} cores):\n" + "\n".join(lines))


def median_time(fn: Callable[[], Any], reps: int) -> float:
  """Median wall time of ``fn()`` (which must block until its work is done), over ``reps``."""
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
