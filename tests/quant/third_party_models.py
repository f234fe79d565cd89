"""Small Linen and NNX models written the way third-party code writes them (not copies),
for the reach of ``quantize_model`` (issue 32): none of them knows brjax.

* :class:`LstmClassifier`: an embedding, a bidirectional LSTM of ``nn.OptimizedLSTMCell``
  (whose gates read their kernels through ``DenseParams`` and multiply a concatenation of
  them), a dense head; as flax's sst2 example.
* :class:`RecurrentTagger`: ``nn.RNN`` over ``nn.LSTMCell`` and ``nn.GRUCell``
  (``variable_broadcast="params"``), then a custom layer that multiplies its own
  ``self.param`` with ``jnp.einsum``.
* :class:`ScannedViT`: patches, a class token, position embeddings and ``nn.scan`` over
  encoder blocks with plain ``variable_axes={"params": 0}``, as big_vision writes it; the
  blocks' MLP calls ``jnp.einsum`` and ``@`` on its own parameters.
* :class:`NnxScanMLP`: NNX scan over layers as flax's examples write it: blocks made by
  ``nnx.vmap`` over split rngs, run by ``nnx.scan`` with the carry first (and, with
  ``remat``, each block's call under ``nnx.remat``).
* :class:`NnxStack`: the same as flax 0.11's migration guide writes it: ``__init__`` under
  ``nnx.vmap``, ``__call__`` under ``nnx.scan`` on the stack itself, the layer under
  ``nnx.remat``, with batch norm.
* :class:`PartitionedLM`: a decoder-only transformer LM whose every parameter is boxed by
  ``nn.with_logical_partitioning`` (logical axes ``vocab``, ``embed``, ``mlp``, ``heads``,
  ``kv``), attention by ``nn.MultiHeadDotProductAttention``; as flax's lm1b example.
"""

from __future__ import annotations

import functools

from flax import nnx
import flax.linen as nn
import jax.numpy as jnp


class LstmClassifier(nn.Module):
  vocab: int = 20
  embed: int = 8
  hidden: int = 8
  classes: int = 3

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.embed)(tokens)
    x = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(self.hidden)),
                         nn.RNN(nn.OptimizedLSTMCell(self.hidden)))(x)
    return nn.Dense(self.classes, name="output")(x.mean(axis=1))


class EinsumDense(nn.Module):
  """A custom layer: its own parameter, multiplied by ``jnp.einsum``."""
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    b = self.param("b", nn.initializers.zeros, (self.features,))
    return jnp.einsum("...i,io->...o", x, w) + b


class RecurrentTagger(nn.Module):
  hidden: int = 8
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.RNN(nn.LSTMCell(self.hidden))(x)
    x = nn.RNN(nn.GRUCell(self.hidden))(x)
    return EinsumDense(self.classes)(x)


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    wi = self.param("wi", nn.initializers.xavier_uniform(), (d, self.mlp_dim))
    wo = self.param("wo", nn.initializers.xavier_uniform(), (self.mlp_dim, d))
    return nn.gelu(jnp.einsum("bnd,dm->bnm", x, wi)) @ wo


class EncoderBlock(nn.Module):
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, _):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
    x = x + y
    return x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x)), None


class ScannedViT(nn.Module):
  width: int = 8
  depth: int = 2
  heads: int = 2
  mlp_dim: int = 16
  classes: int = 3

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (4, 4), strides=(4, 4), padding="VALID", name="embedding")(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    x, _ = nn.scan(EncoderBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.depth)(self.heads, self.mlp_dim, name="encoder")(x, None)
    return nn.Dense(self.classes, name="head")(nn.LayerNorm()(x[:, 0]))


def _boxed(init, *axes):
  return nn.with_logical_partitioning(init, axes)


_KERNEL = nn.initializers.xavier_uniform()


class LmMlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, kernel_init=_boxed(_KERNEL, "embed", "mlp"),
                 bias_init=_boxed(nn.initializers.zeros, "mlp"))(x)
    return nn.Dense(x.shape[-1], kernel_init=_boxed(_KERNEL, "mlp", "embed"),
                    bias_init=_boxed(nn.initializers.zeros, "embed"))(nn.relu(y))


class LmDecoderBlock(nn.Module):
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, mask):
    norm = functools.partial(nn.LayerNorm, scale_init=_boxed(nn.initializers.ones, "embed"),
                             bias_init=_boxed(nn.initializers.zeros, "embed"))
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, use_bias=False, deterministic=True,
        kernel_init=_boxed(_KERNEL, "embed", "heads", "kv"),
        out_kernel_init=_boxed(_KERNEL, "heads", "kv", "embed"))(norm()(x), mask=mask)
    x = x + y
    return x + LmMlpBlock(self.mlp_dim)(norm()(x))


class PartitionedLM(nn.Module):
  """A decoder-only language model whose every parameter is boxed with logical axis names
  (``nn.with_logical_partitioning``), as flax's lm1b ``TransformerLM``."""
  vocab: int = 16
  width: int = 8
  depth: int = 2
  heads: int = 2
  mlp_dim: int = 16
  max_len: int = 8

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width, name="Embed_0",
                 embedding_init=_boxed(nn.initializers.normal(1.0), "vocab", "embed"))(tokens)
    pos = self.param("pos_embedding", _boxed(nn.initializers.normal(0.02), None, "embed"),
                     (self.max_len, self.width))
    x = x + pos[None, :tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.depth):
      x = LmDecoderBlock(self.heads, self.mlp_dim, name=f"DecoderBlock_{i}")(x, mask)
    x = nn.LayerNorm(scale_init=_boxed(nn.initializers.ones, "embed"),
                     bias_init=_boxed(nn.initializers.zeros, "embed"))(x)
    return nn.Dense(self.vocab, name="logitdense", kernel_init=_boxed(_KERNEL, "embed", "vocab"),
                    bias_init=_boxed(nn.initializers.zeros, "vocab"))(x)


class NnxBlock(nnx.Module):
  def __init__(self, features: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(features, features, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.dropout(self.linear(x)))


class NnxScanMLP(nnx.Module):
  def __init__(self, din: int = 4, features: int = 8, depth: int = 2, classes: int = 3, *,
               remat: bool = False, rngs: nnx.Rngs):
    self.embed = nnx.Linear(din, features, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_block(rngs: nnx.Rngs):
      return NnxBlock(features, rngs)

    self.blocks = create_block(rngs)
    self.head = nnx.Linear(features, classes, rngs=rngs)
    self.remat = remat

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return nnx.remat(lambda block, x: block(x))(block, x) if self.remat else block(x)

    return self.head(forward(nnx.relu(self.embed(x)), self.blocks))


class NnxStack(nnx.Module):
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0, 0))
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def __call__(self, x):
    return nnx.gelu(self.norm(nnx.remat(lambda linear, x: linear(x))(self.linear, x)))
