"""How a step size is stored: as itself (``linear``) or as its logarithm (``log``).

Every quantizer's step size ``alpha`` is a trained parameter. Two parametrizations, a
choice per :class:`~brjax.quant.rules.QuantRule` (``alpha_param``), per layer
(``QuantConv(alpha_param=...)``) and per training run (``--alpha_param``):

* ``linear`` (LSQ's and the reference package's): the parameter *is* ``alpha``, named
  ``alpha`` (a kernel's or a ``QuantReLU``'s) or ``input_alpha`` (a layer input's). An
  optimizer step can take it to zero or below (the quantizer then uses its floor,
  ``lsq.safe_alpha``, and training stops loudly: ``brjax.training.run_control``).
* ``log``: the parameter is ``theta = log(alpha)``, named ``log_alpha`` /
  ``log_input_alpha``, and the quantizer uses ``alpha = exp(theta)``: positive by
  construction. The distinct name means nothing can read ``theta`` as a step size: every
  reader of parameters goes through :func:`step_size` (one quantizer's) or
  :func:`linear_params` (a whole tree, as the linear model would hold it), and BR and the
  metrics read the sites, which record ``alpha`` itself.

LSQ carried over to ``log``
---------------------------
The init is LSQ's, ``theta_0 = log(alpha_0)`` with ``alpha_0 = 2 mean|v| / sqrt(qp)``, and
``alpha = exp(theta)`` has a custom gradient (:func:`exp_step_size`): with ``G`` the
gradient the loss sends to ``alpha`` (LSQ's, scaled by its ``g = 1/sqrt(N qp)``, plus BR's)

    dL/dtheta := G * alpha / max(alpha, floor)^2  =  G / alpha     (alpha >= floor = 1e-8)

instead of the chain rule's ``G * alpha``. An SGD step of learning rate ``lr`` then moves
``theta`` by ``-lr G / alpha`` and ``alpha`` to ``alpha * exp(-lr G / alpha)
= alpha - lr G + O((lr G)^2 / alpha)``: LSQ's update ``-lr G`` to first order, at the first
step and at every later one, but applied multiplicatively, so no step can take ``alpha`` to
zero or below (a push that would take a linear ``alpha`` past zero divides it by
``e^(lr G / alpha)`` instead). The chain rule's gradient would scale every update by
``alpha^2`` (1e-2..1e-4 for typical step sizes): the step sizes would barely train under
SGD. Adam normalizes each parameter's gradient, so the scale cancels there: a ``log``
step size moves by a *relative* amount of about the learning rate per step
(``alpha * e^(+-lr)``) where a linear one moves by an absolute ``lr``, which for a step
size of 0.05 and an lr of 0.01 goes through zero in a few steps. Weight decay on a ``log``
parameter pulls ``theta`` to 0, that is ``alpha`` to 1: leave it at 0 (brjax's recipe does,
``--alpha_weight_decay``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp

from brjax.quant import names, partitioning

ALPHA_PARAMS = ("linear", "log")
"""The step-size parametrizations: ``alpha`` itself, or ``theta = log(alpha)``."""

LINEAR_NAMES = ("alpha", "input_alpha")
LOG_NAMES = ("log_alpha", "log_input_alpha")
STEP_SIZE_NAMES = LINEAR_NAMES + LOG_NAMES
"""Parameter names of step sizes: a kernel's or a ReLU's ``alpha``, a layer input's
``input_alpha``, and their ``log`` forms ``log_alpha``, ``log_input_alpha``."""

_TO_LOG = dict(zip(LINEAR_NAMES, LOG_NAMES))
_FLOOR = 1e-8  # lsq._ALPHA_FLOOR


def check_alpha_param(value: Any, name: str = "alpha_param") -> str:
  """``value`` if it is one of :data:`ALPHA_PARAMS`, else a one-line ValueError."""
  if not (isinstance(value, str) and value in ALPHA_PARAMS):
    raise ValueError(f"{name}={value!r} is not accepted: use one of {', '.join(ALPHA_PARAMS)}")
  return value


def param_name(name: str, alpha_param: str) -> str:
  """The stored parameter's name of step size ``name`` (``alpha``, ``input_alpha``)."""
  check_alpha_param(alpha_param)
  return _TO_LOG[name] if alpha_param == "log" else name


def linear_name(name: str) -> str:
  """``alpha`` for ``log_alpha``, ``input_alpha`` for ``log_input_alpha``, and so for an
  operation's step sizes (``log_w_alpha`` -> ``w_alpha``, ``brjax.quant.names``); else
  ``name``."""
  if isinstance(name, str) and name.startswith("log_") and names.is_alpha_name(name[4:]):
    return name[4:]
  return name


def is_log_name(name: Any) -> bool:
  """Whether ``name`` is a ``log`` step size's parameter name."""
  return linear_name(name) != name


def _floor(dtype: Any) -> float:
  return max(_FLOOR, float(jnp.finfo(dtype).tiny))


@jax.custom_vjp
def exp_step_size(theta: jax.Array) -> jax.Array:
  """``alpha = exp(theta)``, whose gradient to ``theta`` is ``G / alpha`` (module doc).

  Exactly: ``G * alpha / max(alpha, floor)^2`` with ``floor = 1e-8`` (or the dtype's
  smallest normal number, if larger), so a ``theta`` so low that ``alpha`` underflows still
  gets a finite gradient.
  """
  return jnp.exp(theta)


def _exp_fwd(theta):
  alpha = jnp.exp(theta)
  return alpha, alpha


def _exp_bwd(alpha, g):
  floor = _floor(jnp.result_type(alpha))
  return (g * alpha / jnp.square(jnp.maximum(alpha, floor)),)


exp_step_size.defvjp(_exp_fwd, _exp_bwd)


def stored(alpha: jax.Array, alpha_param: str) -> jax.Array:
  """What the parameter holds for step size ``alpha``: itself, or ``log(alpha)``."""
  return jnp.log(alpha) if check_alpha_param(alpha_param) == "log" else alpha


def value(param: jax.Array, alpha_param: str) -> jax.Array:
  """The step size a stored parameter stands for (:func:`exp_step_size` for ``log``)."""
  return exp_step_size(param) if check_alpha_param(alpha_param) == "log" else param


def create(module: Any, name: str, init_fn: Callable[[Any], jax.Array],
           alpha_param: str) -> jax.Array:
  """Creates (or reads) a Linen module's step size ``name`` and returns ``alpha``.

  ``init_fn(rng)`` gives the initial ``alpha`` (LSQ's); with ``log`` the parameter is
  ``log_<name>`` holding its logarithm.
  """
  if check_alpha_param(alpha_param) == "linear":
    return module.param(name, init_fn)
  return exp_step_size(module.param(_TO_LOG[name], lambda rng: jnp.log(init_fn(rng))))


def nnx_create(module: Any, name: str, alpha_param: str,
               init_fn: Callable[[], jax.Array]) -> None:
  """Gives an NNX layer its step size ``name`` as an ``nnx.Param`` (``log_<name>`` holding
  ``log(alpha)`` with ``log``), from ``init_fn()`` (LSQ's ``alpha``), unless it has it."""
  stored_name = param_name(name, alpha_param)
  if not hasattr(module, stored_name):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    setattr(module, stored_name, nnx.Param(stored(init_fn(), alpha_param)))


def step_size(params: Mapping[str, Any], name: str = "alpha") -> jax.Array:
  """The step size ``name`` (``alpha``, ``input_alpha``) of one quantizer's parameters.

  ``params`` is one layer's parameter dict (``{"kernel": ..., "alpha": ...}`` or
  ``{"kernel": ..., "log_alpha": ...}``): ``params[name]`` if stored linearly, else
  ``exp(params["log_" + name])``, unboxed (``brjax.quant.partitioning``). KeyError naming
  both when neither is there.
  """
  if name in params:
    return partitioning.unbox(params[name])
  log = _TO_LOG[name]
  if log in params:
    return jnp.exp(jnp.asarray(partitioning.unbox(params[log])))
  raise KeyError(f"no step size {name!r} (or {log!r}) among {sorted(map(str, params))}")


def alpha_of(path: tuple, stored_value: Any) -> Any:
  """The step size the parameter at ``path`` (a flattened path) holds: ``exp`` of it for a
  ``log_*`` name, else the value itself (unboxed)."""
  stored_value = partitioning.unbox(stored_value)
  return jnp.exp(jnp.asarray(stored_value)) if path and is_log_name(path[-1]) else stored_value


def linear_params(params: Any) -> Any:
  """``params`` as the ``linear`` model would hold them: every ``log_alpha`` /
  ``log_input_alpha`` replaced by ``alpha = exp(theta)`` under ``alpha`` / ``input_alpha``.

  ``params``: a nested mapping (a Linen ``params`` dict or FrozenDict) or a flat dict of
  tuple paths; the result is a new dict of the same form (unchanged if nothing is ``log``
  or boxed; boxed parameters come back unboxed, ``brjax.quant.partitioning``).
  """
  if not params:
    return params
  flat_given = all(isinstance(k, tuple) for k in params)
  flat = dict(params) if flat_given else traverse_util.flatten_dict(dict(params))
  if any(partitioning.is_boxed(v) for v in flat.values()):
    flat = {p: partitioning.unbox(v) for p, v in flat.items()}
    params = flat if flat_given else traverse_util.unflatten_dict(flat)
  if not any(is_log_name(p[-1]) for p in flat):
    return params
  out = {(p[:-1] + (linear_name(p[-1]),) if is_log_name(p[-1]) else p):
         (jnp.exp(jnp.asarray(v)) if is_log_name(p[-1]) else v) for p, v in flat.items()}
  return out if flat_given else traverse_util.unflatten_dict(out)


def like(linear: Any, template: Any) -> Any:
  """The inverse of :func:`linear_params`: ``linear`` (nested params holding linear step
  sizes) stored as ``template`` stores them (``log`` where ``template`` has ``log_*``)."""
  flat_t = traverse_util.flatten_dict(dict(template))
  flat = traverse_util.flatten_dict(dict(linear))
  out = {}
  for p, v in flat.items():
    log = p[:-1] + (_TO_LOG.get(p[-1], p[-1]),)
    out[log if log != p and log in flat_t else p] = jnp.log(jnp.asarray(v)) if (
        log != p and log in flat_t) else v
  return traverse_util.unflatten_dict(out)


def is_alpha_path(path: tuple[str, ...]) -> bool:
  """Whether a flattened parameter path names a step size (either parametrization): a
  layer's (``alpha``, ``input_alpha``) or an operation's (``<name>_alpha``,
  ``input_alpha_<k>``, ``brjax.quant.names``)."""
  return bool(path) and (path[-1] in STEP_SIZE_NAMES or names.is_alpha_name(path[-1]))


def is_weight_alpha_path(path: tuple[str, ...], flat_params: dict) -> bool:
  """Whether ``path`` is a weight's step size: an ``alpha`` (``log_alpha``) beside a
  ``kernel``, or a ``<name>_alpha`` beside a parameter ``<name>``."""
  return names.weight_of(tuple(path), flat_params)


def init_alphas(model: Any, variables: Any, *args, rng: jax.Array | None = None,
                rngs: dict[str, jax.Array] | None = None, **apply_kwargs) -> Any:
  """Re-initializes every ``alpha`` the LSQ way from the current weights and one batch.

  Weight step sizes come from their kernels; activation step sizes from the activations
  of the batch, in one forward pass, so each layer sees inputs quantized with the step
  sizes already set upstream (the data-driven init of LSQ's first training step). Every
  other decision init took from data is taken again from this batch: the data-decided
  input signs (``act_signed=None``, the ``"quant_state"`` collection). Works by dropping
  every step size (``alpha``, ``input_alpha`` and their ``log_*`` forms) and every input
  sign and letting the layers create them again in ``model.apply``, each in its own
  parametrization; a batch LSQ cannot calibrate on fails as at init
  (``brjax.quant.calibration``).

  The forward pass may run in training mode (``train=True``: LSQ's init is a training
  forward, the right choice for a model that has not been trained, whose running
  BatchNorm statistics mean nothing yet) or in eval mode (``train=False``: after loading
  trained float weights). Every collection is mutable during the pass, and everything but
  the new step sizes is discarded: BatchNorm statistics, sown values and other state come
  back as they went in. In a model whose parameters are boxed, the new step sizes are
  boxed as ``quantize_model``'s init boxes them (``brjax.quant.partitioning``).

  Args:
    model: a Flax module built from the layers above.
    variables: its variables, e.g. ``{"params": ..., "batch_stats": ...}``; every other
      parameter (kernels, biases, BatchNorm) is kept as it is.
    *args: the model's inputs, as ``model.apply`` takes them (one batch).
    rng: the ``"params"`` rng (default ``key(0)``): the step-size initializers use none,
      but Flax wants one to create parameters.
    rngs: other rngs the forward pass needs (e.g. ``{"dropout": key}``).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=True``).

  Returns:
    ``variables`` with new step sizes and input signs (a new dict; the input is not
    modified).
  """
  state = "quant_state"  # lsq.STATE
  flat = traverse_util.flatten_dict(variables["params"])
  kept = {p: v for p, v in flat.items() if not is_alpha_path(p)}
  others = {k: v for k, v in variables.items() if k not in ("params", state)}
  rngs = dict(rngs or {})
  rngs["params"] = jax.random.key(0) if rng is None else rng
  _, updated = model.apply(
      {**others, "params": traverse_util.unflatten_dict(kept)}, *args,
      rngs=rngs, mutable=True, **apply_kwargs)
  signs = {state: updated[state]} if updated.get(state) else {}
  return partitioning.box_step_sizes({**others, "params": updated["params"], **signs})
