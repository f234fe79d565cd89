"""Speed of quantized training steps of unmodified models: brjax against float and Qwix.

:func:`quantized_model_steps` times, in one process and interleaved (so that load from
other processes hits every variant alike), the jitted training step of one plain Flax
model (``brjax.models.plain``) in three forms:

* ``float``: cross-entropy, Adam;
* ``brjax_lsq``: ``brjax.quantize_model`` with LSQ on every weight and every layer input,
  cross-entropy only (the warmup phase's step);
* ``brjax``: the same with ``CE + BR_W + BR_A`` (the BR phase's step, the most expensive);
* ``qwix``: ``qwix.quantize_model`` with a ``QtProvider`` (Qwix's quantization-aware
  training: fake quantization with straight-through gradients, no learned step size, no
  BR) at the same bit width, where Qwix can train the model.

Qwix is a benchmark-only dependency: it is imported here, inside the function, and a
missing Qwix or a Qwix step that fails is reported, not raised.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from brjax.models import plain as plain_models
from brjax.quant import regularizer
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule

MODELS: dict[str, Callable[[], Any]] = {
    # ViT-Tiny's width (192, 3 heads, MLP 768) at depth 4, patches of 4 pixels.
    "vit": functools.partial(plain_models.ViT, hidden=192, mlp_dim=768, depth=4, num_heads=3),
    "mobilenet_v2": plain_models.MobileNetV2,
}
# Depthwise convolutions get one step size per channel (the usual choice at low bits).
PER_CHANNEL = {"vit": False, "mobilenet_v2": True}


def _train_step(model, variables, images, labels, *, with_br: bool) -> tuple:
  """``(step, params, opt_state)``: a jitted Adam step ``(params, opt_state) -> (params,
  opt_state, loss)`` and its initial arguments."""
  tx = optax.adam(1e-3)
  others = {k: v for k, v in variables.items() if k != "params"}
  mutable = [k for k in ("batch_stats",) if k in others] + (["quant"] if with_br else [])

  def loss_fn(params):
    logits, state = model.apply({**others, "params": params}, images, train=True,
                                mutable=mutable)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if with_br:
      br_w, br_a = regularizer.br_losses(state["quant"])
      loss = loss + br_w + br_a
    return loss

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, variables["params"], tx.init(variables["params"])


def _qwix_model(model, bits: int, images):
  import qwix  # pylint: disable=g-import-not-at-top
  qtype = {4: "int4", 8: "int8"}[bits]
  provider = qwix.QtProvider([qwix.QtRule(module_path=".*", weight_qtype=qtype,
                                          act_qtype=qtype)])
  del images
  return qwix.quantize_model(model, provider)


def quantized_model_steps(name: str, *, batch: int = 64, image_size: int = 32, bits: int = 4,
                          qwix_bits: int | None = None, rounds: int = 5, steps: int = 3,
                          log: Callable[[str], None] = lambda _: None) -> dict:
  """Median seconds per training step of ``float``, ``brjax`` and ``qwix`` forms of a model.

  Args:
    name: a key of :data:`MODELS`.
    batch, image_size: the random input batch ``(batch, size, size, 3)``.
    bits: brjax's weight and input bits.
    qwix_bits: Qwix's bits (4 or 8; default ``bits``); Qwix's int4 may not run on CPU.
    rounds, steps: ``rounds`` interleaved rounds of ``steps`` timed steps per form, after
      one compiling step each.
    log: progress lines.

  Returns:
    ``{"model", "batch", "bits", "qwix_bits", "float_s", "brjax_lsq_s", "brjax_s",
    "qwix_s" (None if Qwix failed), "qwix_error", "brjax_over_float", "brjax_over_qwix",
    "device"}``.
  """
  images = jax.random.normal(jax.random.key(0), (batch, image_size, image_size, 3))
  labels = jnp.arange(batch) % 10
  plain = MODELS[name]()
  rules = (QuantRule(".*", weight_bits=bits, act_bits=bits, per_channel=PER_CHANNEL[name]),)
  forms = {}
  variables = plain.init(jax.random.key(1), images, train=True)
  forms["float"] = _train_step(plain, variables, images, labels, with_br=False)
  brjax_model = quantize_model(plain, rules)
  variables = brjax_model.init(jax.random.key(1), images, train=True)
  forms["brjax_lsq"] = _train_step(brjax_model, variables, images, labels, with_br=False)
  forms["brjax"] = _train_step(brjax_model, variables, images, labels, with_br=True)
  qwix_bits = bits if qwix_bits is None else qwix_bits
  qwix_error = None
  try:
    qwix_model = _qwix_model(plain, qwix_bits, images)
    variables = qwix_model.init(jax.random.key(1), images, train=True)
    forms["qwix"] = _train_step(qwix_model, variables, images, labels, with_br=False)
  except Exception as e:  # pylint: disable=broad-except
    qwix_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

  state = {}
  for form, (step, params, opt_state) in list(forms.items()):
    try:
      state[form] = jax.block_until_ready(step(params, opt_state))  # compiles
    except Exception as e:  # pylint: disable=broad-except
      if form != "qwix":
        raise
      qwix_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      del forms["qwix"]
      continue
    log(f"{name}: compiled the {form} step")
  times = {form: [] for form in forms}
  for _ in range(rounds):
    for form, (step, _, _) in forms.items():
      params, opt_state, loss = state[form]
      start = time.perf_counter()
      for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
      jax.block_until_ready(loss)
      times[form].append((time.perf_counter() - start) / steps)
      state[form] = (params, opt_state, loss)
  median = {form: statistics.median(t) for form, t in times.items()}
  qwix_s = median.get("qwix")
  return {"model": name, "batch": batch, "bits": bits, "qwix_bits": qwix_bits,
          "float_s": median["float"], "brjax_lsq_s": median["brjax_lsq"],
          "brjax_s": median["brjax"], "qwix_s": qwix_s,
          "qwix_error": qwix_error, "brjax_over_float": median["brjax"] / median["float"],
          "brjax_over_qwix": None if qwix_s is None else median["brjax"] / qwix_s,
          "device": f"{jax.devices()[0].platform} x{len(jax.devices())}"}
