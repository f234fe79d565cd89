"""Benchmarks of brjax on the machine they run on (``scripts/benchmark.py``).

* :mod:`brjax.bench.training`: step times, BR cost, compiles, input pipeline, FLOP/s.
* :mod:`brjax.bench.plain`: quantized steps of unmodified models, against float and Qwix.
* :mod:`brjax.bench.scale`: bfloat16 against float32, and the memory of a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brjax import _lazy

_EXPORTS = {
    **dict.fromkeys(("BR_BITS", "BR_ELEMENTS", "COMPILE_EVENT", "CompileLog", "Report", "STEPS",
                     "TARGETS", "check_targets", "count_run_compiles", "measure_flops",
                     "measure_scale", "median_time", "results_text", "run_benchmark",
                     "synthetic_dataset", "time_bin_regularization", "time_input_pipeline",
                     "time_plain_models", "time_steps", "write_image_folder",), "training"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see: the eager imports the lazy ones stand for
  from brjax.bench.training import (
    BR_BITS,
    BR_ELEMENTS,
    COMPILE_EVENT,
    STEPS,
    TARGETS,
    CompileLog,
    Report,
    check_targets,
    count_run_compiles,
    measure_flops,
    measure_scale,
    median_time,
    results_text,
    run_benchmark,
    synthetic_dataset,
    time_bin_regularization,
    time_input_pipeline,
    time_plain_models,
    time_steps,
    write_image_folder,
  )
