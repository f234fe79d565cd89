"""Tests of brjax.quant.nnx_coverage: the products of parameters that an NNX ``quantize_model``
leaves float, reported at quantize time (issue 32, item 1 for NNX)."""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from brjax.quant import nnx as brjax_nnx
from brjax.quant import nnx_coverage
from brjax.quant.coverage import FloatOp, left_float
from brjax.quant.quantize import quantize_model
from brjax.quant.rules import QuantRule

W4A4 = QuantRule(".*", weight_bits=4, act_bits=4)
X = jax.random.normal(jax.random.key(0), (2, 4))
DOT, CONV = "lax.dot_general", "lax.conv_general_dilated"


def _why(*names: str) -> str:
  listed = ", ".join(repr(n) for n in names)
  return (f"multiplies its parameter {listed} float: brjax.quant.nnx quantizes only the layer "
          "types of QUANTIZABLE")


class _Custom(nnx.Module):  # multiplies its own parameters: @, einsum and a conv
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 4)))
    self.k = nnx.Param(jax.random.normal(rngs.params(), (2, 1, 3, 3)))  # OIHW

  def __call__(self, x):
    y = x @ self.w[...] + jnp.einsum("bi,io->bo", x, self.w)
    image = jax.lax.conv_general_dilated(x.reshape(2, 1, 2, 2), self.k[...], (1, 1), "SAME")
    return y + image.sum(axis=1).reshape(2, 4)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)
    self.custom = _Custom(rngs)

  def __call__(self, x):
    return self.custom(self.lin(x))


def test_a_custom_layer_multiplying_its_parameters_is_an_error_or_listed():
  """Under ``.*`` a custom layer's ``@``/einsum and conv on its own nnx.Param are one-line
  errors naming its path and the op, and the model is left float; allow_float_ops accepts
  and lists them. As Linen: a module no quantizing rule matches (a narrower rule, or a first
  match that keeps it float) is not reported."""
  model = _Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^quantize_model: 2 operation\(s\) .* stay float: "
                                       rf"custom: {CONV} \(.*'k'.*\); custom: {DOT} \(.*'w'.*"
                                       r"allow_float_ops=True") as error:
    quantize_model(model, W4A4, X)
  assert "\n" not in str(error.value)
  assert not brjax_nnx.quantized_layers(model) and not hasattr(model.lin, "alpha")
  with pytest.raises(ValueError, match="left_float takes a model returned by"):
    left_float(model)  # brjax did not quantize it
  quantize_model(model, W4A4, X, allow_float_ops=True)
  assert left_float(model) == (FloatOp("custom", CONV, _why("k")),
                               FloatOp("custom", DOT, _why("w")))
  assert left_float(nnx.view(model)) == left_float(model)  # a view made after: the same
  assert "lin" in brjax_nnx.quantized_layers(model)
  for rules in ([QuantRule("lin", weight_bits=4, act_bits=4)],
                [QuantRule("custom"), W4A4],  # the first match keeps it float
                [QuantRule("lin", act_bits=4)]):  # lin's kernel float by the rule's choice
    assert left_float(quantize_model(_Net(nnx.Rngs(0)), rules, X)) == ()
  with pytest.raises(ValueError, match="allow_float_ops=1 is not accepted"):
    brjax_nnx.quantize_nnx(_Net(nnx.Rngs(0)), W4A4, X, allow_float_ops=1)


class _Eager(nnx.Module):  # Python control flow on values: runs eagerly, not under jit
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return self.lin(x) if float(x.sum()) > -100 else x


UNTRACEABLE = (r"the model's forward on the sample inputs cannot be traced by "
               r"jax.make_jaxpr \(ConcretizationTypeError: [^\n]*\)")


def test_a_forward_that_cannot_be_traced_is_an_error():
  """The report needs a trace of the forward: a model that only runs eagerly is a one-line
  error saying why (JAX's error, which it is chained to) and that allow_float_ops=True
  quantizes it without the check; the model is left float."""
  model = _Eager(nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf"^quantize_nnx: {UNTRACEABLE}, which finds .* as "
                                       r"jax.jit needs, or pass quantize_model\(\.\.\., "
                                       r"allow_float_ops=True\) to quantize the model without "
                                       r"this check$") as error:
    quantize_model(model, W4A4, X)
  assert "\n" not in str(error.value)
  assert isinstance(error.value.__cause__, jax.errors.ConcretizationTypeError)
  assert not brjax_nnx.quantized_layers(model) and not hasattr(model.lin, "alpha")


def test_allow_float_ops_quantizes_an_untraceable_forward_left_float_says_unchecked():
  """With allow_float_ops=True a model that only runs eagerly is quantized as before the
  check existed; left_float then raises (one line, with the reason) rather than returning
  (), which means "checked, nothing float" -- on views made after too."""
  model = quantize_model(_Eager(nnx.Rngs(0)), W4A4, X, allow_float_ops=True)
  assert set(brjax_nnx.quantized_layers(model)) == {"lin"}
  float_out = _Eager(nnx.Rngs(0))(X)
  assert model(X).shape == float_out.shape and not jnp.allclose(model(X), float_out)  # 4-bit
  for target in (model, nnx.view(model)):
    with pytest.raises(ValueError, match=rf"^left_float: this NNX model's products of "
                                         rf"parameters were not checked, because "
                                         rf"{UNTRACEABLE}; quantize_model\(\.\.\., "
                                         r"allow_float_ops=True\) quantized it without the "
                                         r"check") as error:
      left_float(target)
    assert "\n" not in str(error.value)


@jax.custom_jvp
def _custom_jvp_product(x, w):
  return x @ w


_custom_jvp_product.defjvp(lambda primals, tangents: (_custom_jvp_product(*primals),
                                                      tangents[0] @ primals[1]))


class _Transforms(nnx.Module):
  """Products of parameters inside JAX's and NNX's transforms, and a recurrence whose carry
  starts from a parameter (``h0``: the carry is data from the first step on)."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)
    for name in ("h0", "scan", "cond", "loop", "remat", "jit", "jvp"):
      setattr(self, name, nnx.Param(0.3 * jax.random.normal(rngs.params(), (4, 4))))

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return _Custom(rngs)

    self.stack = create(rngs)

  def __call__(self, x):
    x = self.lin(x)
    step = lambda c, xi: (jnp.tanh(c @ self.scan[...] + xi), None)
    h, _ = jax.lax.scan(step, self.h0[...][:2], jnp.stack([x, x]))
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ self.cond[...], lambda x: -x, x + h)
    x = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ self.loop[...]),
                           (0, x))[1]
    x = jax.checkpoint(lambda x: x @ self.remat[...])(x)
    x = jax.jit(lambda x, w: x @ w)(x, self.jit[...])
    x = _custom_jvp_product(x, self.jvp[...])

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def layers(x, block):
      return block(x)

    return layers(x, self.stack)


def test_products_inside_transforms_are_found():
  """Found through scan (its carry to a fixed point), cond, while, remat, jit, custom_jvp and
  an nnx.scan over a stack made by nnx.vmap (the stack's path); the parameter that only
  starts a carry is not multiplied as a weight."""
  model = quantize_model(_Transforms(nnx.Rngs(0)), W4A4, X, allow_float_ops=True)
  expected = {FloatOp("", DOT, _why(n)) for n in ("scan", "cond", "loop", "remat", "jit",
                                                   "jvp")}
  expected |= {FloatOp("stack", DOT, _why("w")), FloatOp("stack", CONV, _why("k"))}
  assert set(left_float(model)) == expected
  assert str(FloatOp("", DOT, "x")) == f"<root>: {DOT} (x)"


class _Lm(nnx.Module):
  """An embedding looked up, (with ``attention``) attention, a dense and a conv layer; with
  ``tied`` the embedding is also the output projection (``nnx.Embed.attend``); with
  ``outside`` the dense kernel is multiplied again outside the layer's call."""

  def __init__(self, rngs, attention=False):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs) if attention else None
    self.dense = nnx.Linear(8, 8, rngs=rngs)
    self.conv = nnx.Conv(8, 8, (3,), rngs=rngs)

  def __call__(self, tokens, tied=False, outside=False):
    x = self.norm(self.embed(tokens))
    if self.attn is not None:
      x = x + self.attn(x)
    x = self.dense(x)
    if outside:
      x = x @ self.dense.kernel[...].T
    x = self.conv(x)
    return self.embed.attend(x) if tied else x


TOKENS = jnp.array([[1, 2, 3], [4, 5, 6]])


def test_layers_and_lookups_are_not_reported_a_tied_projection_is():
  """Quantized layers (nnx.Linear, nnx.Conv), an embedding lookup (gather), biases and a
  norm leave nothing float; a tied embedding used as the output projection and a quantized
  kernel multiplied outside its layer's call are reported."""
  model = quantize_model(_Lm(nnx.Rngs(0)), W4A4, TOKENS)
  assert left_float(model) == ()
  report = functools.partial(nnx_coverage.report, model, brjax_nnx._Quantized, (W4A4,),
                             (TOKENS,))  # what quantize_model checks, on other calls
  assert report({"tied": True}) == (FloatOp("embed", DOT, _why("embedding")),)
  assert report({"outside": True}) == (FloatOp("dense", DOT, "its kernel is multiplied "
                                                            "outside the quantized layer's "
                                                            "call, float"),)


@pytest.mark.slow
def test_attention_is_not_reported():
  """nnx.MultiHeadAttention: its LinearGeneral projections are quantized layers, and its
  products of two activations (q.k, weights.v) multiply no parameter: nothing left float."""
  model = quantize_model(_Lm(nnx.Rngs(0), attention=True), W4A4, TOKENS)
  assert left_float(model) == ()
  assert set(brjax_nnx.quantized_layers(model)) == {
      "attn/query", "attn/key", "attn/value", "attn/out", "dense", "conv"}
