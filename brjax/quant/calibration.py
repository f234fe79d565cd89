"""What LSQ's init decides from data, and the init batches it cannot decide on.

A quantizer's step size is initialized the LSQ way, ``alpha = 2 mean|v| / sqrt(qp)``, from
its kernel (weights) or from the values the init batch gives it (activations), and a
data-decided input sign (``act_signed=None``) is fixed from that batch too. A batch that
carries no information gives a step size, or a sign, that is wrong without a word:

* a site whose values are all equal (an all-zero batch, ``jnp.ones``, a layer downstream of
  one whose outputs all clip to 0) gets a step size calibrated on a constant (0 for zeros:
  a constant output) and, for a data-decided sign, "unsigned" whenever the constant is
  not negative: every later negative input then quantizes to 0;
* an unsigned input (``act_signed=False``) that is negative quantizes those values to 0;
* a step size that is 0 or not finite (a zero kernel, inf or NaN in the batch).

:func:`check_init` fails loudly on each: a ``ValueError`` naming the layer and what to
pass, when the values are concrete (an eager ``model.init``, NNX's ``quantize_model``);
under ``jax.jit`` (which cannot raise on values) a :class:`DegenerateInitWarning` with the
same text, when the computation runs. It only reads the values: the step size is the
same bit for bit.

:func:`output_channel_axes` is the one definition of a kernel's output-feature axes (a
per-channel step size's axes), and :func:`decided_range` the integer range of a
data-decided sign, for the Linen and the NNX layers alike.
"""

from __future__ import annotations

from collections.abc import Callable
import contextvars
from typing import Any
import warnings

from flax.core import tracers
import jax
import jax.numpy as jnp
import numpy as np

from brjax.quant.bits import qrange

KINDS = ("kernel", "input", "output")
"""What a step size quantizes: a layer's kernel, a layer's input, a QuantReLU's output."""

_WHAT_TO_DO = ("pass a real batch of data to init (model.init(rng, batch); NNX: "
               "quantize_model(model, rules, batch)), or re-initialize with "
               "brjax.init_alphas(model, variables, batch)")


# Inside jit_init's trace: (the trace, the checks recorded so far); None elsewhere.
_RECORDING: contextvars.ContextVar[tuple[Any, list] | None] = contextvars.ContextVar(
    "brjax_init_checks", default=None)


class DegenerateInitWarning(UserWarning):
  """An init batch LSQ cannot calibrate on, found while the init ran under ``jax.jit``
  (where it cannot raise); run the init eagerly to get the ``ValueError`` instead, or
  ``warnings.simplefilter("error", DegenerateInitWarning)``."""


def check_init(where: str, kind: str, alpha: jax.Array, values: jax.Array,
               signed: bool | None = True) -> jax.Array:
  """Fails loudly on a step size (and sign) that LSQ's init could not calibrate.

  Args:
    where: the layer's module path, for the message.
    kind: one of :data:`KINDS`; for ``"input"`` and ``"output"`` the values are checked
      too (a kernel's values are the model's, not the batch's).
    alpha: the step size just initialized, any shape.
    values: what it was initialized from (the kernel, or the batch's values at the site).
    signed: an input's sign: True, False (negative values are an error) or None (decided
      from ``values``: a constant batch is an error for the sign too).

  Returns:
    ``alpha``, unchanged.

  Raises:
    ValueError: (concrete values) the problem, the layer and what to pass, in one line.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not accepted: use one of {', '.join(KINDS)}")
  stats = _stats(alpha, values, kind != "kernel")
  if any(isinstance(v, jax.core.Tracer) for v in stats.values()):
    recording = _RECORDING.get()
    if recording is not None and recording[0] == tracers.current_trace():
      recording[1].append((where, kind, signed, stats))  # judged by jit_init, after the run
    else:
      jax.debug.callback(lambda **s: _warn(_problem(where, kind, signed, s)), **stats)
    return alpha
  problem = _problem(where, kind, signed, jax.device_get(stats))
  if problem:
    raise ValueError(problem)
  return alpha


def jit_init(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``jax.jit(fn)`` for an init (``model.init``, ``init_alphas``), with the
  :func:`check_init` checks of its trace as outputs of the program, judged here after it ran
  (the same :class:`DegenerateInitWarning`), instead of host callbacks (``jax.debug.callback``).

  XLA's persistent compilation cache keeps no program with a host callback: a jitted init
  with them is compiled again by every process (ResNet-8's: 4 to 10 s of CPU, as much as
  the rest of a tiny run). Checks inside a nested transform (``nn.scan``, ``nn.remat``) keep
  their callback.
  """
  checks: list[tuple[str, str, bool | None]] = []  # (where, kind, signed) of the trace

  def traced(*args, **kwargs):
    recorded = []
    token = _RECORDING.set((tracers.current_trace(), recorded))
    try:
      out = fn(*args, **kwargs)
    finally:
      _RECORDING.reset(token)
    checks[:] = [record[:3] for record in recorded]
    return out, [record[3] for record in recorded]

  jitted = jax.jit(traced)

  def run(*args, **kwargs):
    out, stats = jitted(*args, **kwargs)
    for (where, kind, signed), values in zip(checks, jax.device_get(stats), strict=True):
      _warn(_problem(where, kind, signed, values))
    return out

  return run


def _stats(alpha: jax.Array, values: jax.Array, data: bool) -> dict[str, jax.Array]:
  a = jnp.asarray(alpha)
  stats = {"alpha_ok": jnp.all(jnp.isfinite(a) & (a > 0)), "alpha_min": jnp.min(a)}
  if data:  # behind a barrier: XLA computes the step size exactly as without the check
    v = jax.lax.optimization_barrier(values)
    stats.update(lo=jnp.min(v), hi=jnp.max(v))
  return stats


def _warn(problem: str | None) -> None:
  if problem:
    warnings.warn(problem, DegenerateInitWarning, stacklevel=2)


def _problem(where: str, kind: str, signed: bool | None, s: dict) -> str | None:
  """The one-line message of what is wrong with an init (``s``: :func:`_stats`'s values),
  or None."""
  if kind == "kernel":
    if s["alpha_ok"]:
      return None
    reason = ("0: the kernel (or one of its channels) is all zero"
              if float(s["alpha_min"]) == 0 else "a value that is not finite: the kernel "
              "holds inf or NaN")
    return (f"{where}: LSQ's init gives its kernel step size {reason}; give the layer a "
            "finite, nonzero kernel_init, or keep it float")
  lo, hi = float(s["lo"]), float(s["hi"])
  if lo == hi:
    decided = " and its input sign" if signed is None else ""
    return (f"{where}: the init batch gives its {kind} no variation (every value {lo:g}), so "
            f"LSQ's step size{decided} would be calibrated on a constant"
            f"{' (step size 0: a constant output)' if lo == 0 else ''}; {_WHAT_TO_DO}")
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return (f"{where}: the init batch holds values that are not finite at its {kind} "
            f"(min {lo:g}, max {hi:g}), so its step size is not finite; {_WHAT_TO_DO}")
  if not s["alpha_ok"]:  # values so small that 2 mean|v| / sqrt(qp) underflows
    return (f"{where}: LSQ's init gives its {kind} step size {float(s['alpha_min']):g} from "
            f"values in [{lo:g}, {hi:g}]; {_WHAT_TO_DO}")
  if signed is False and lo < 0:
    return (f"{where}: act_signed=False, but the init batch gives its {kind} negative values "
            f"(min {lo:g}), which quantize to 0: use act_signed=True (or None: decided from "
            "the data) in its QuantRule")
  return None


def decided_range(bits: int, signed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(qn, qp)`` of an input whose sign was decided from data (``signed``, a bool scalar
  kept in the model's state): int32 scalars, ``qrange(bits, True)`` or ``(0, 2^bits - 1)``;
  either has ``2^bits`` levels, so the binning stays static. The one definition that the
  Linen and the NNX layers use."""
  qn_s, qp_s = qrange(bits, signed=True)
  qn = jnp.where(signed, qn_s, 0).astype(jnp.int32)
  return qn, qn + (qp_s - qn_s)


def output_channel_axes(ndim: int, *, einsum: str | None = None, out_features: int = 1,
                        transpose_kernel: bool = False) -> tuple[int, ...]:
  """The kernel axes of a layer's output features: one step size per index (per-channel).

  Args:
    ndim: the kernel's rank.
    einsum: an Einsum layer's ``"...,kernel->out"`` spec: the kernel's letters that the
      output keeps.
    out_features: how many trailing axes are output features (a DenseGeneral's
      ``features`` tuple); 1 for Dense and Conv.
    transpose_kernel: a ConvTranspose with ``transpose_kernel=True``, whose kernel is
      ``kernel_size + (out_features, in_features)``: the axis before the last.

  Returns:
    The axes, in ``range(ndim)``.
  """
  if einsum is not None:
    operands, out = einsum.replace(" ", "").split("->")
    kernel = operands.split(",")[1]
    return tuple(i for i, c in enumerate(kernel) if c in out)
  if transpose_kernel:
    return (ndim - 2,)
  return tuple(range(ndim - out_features, ndim))
