"""Small Linen models written the way third-party code writes them (not copies), for the
reach of ``quantize_model`` (issue 32): none of them knows brjax.

* :class:`LstmClassifier`: an embedding, a bidirectional LSTM of ``nn.OptimizedLSTMCell``
  (whose gates read their kernels through ``DenseParams`` and multiply a concatenation of
  them), a dense head; as flax's sst2 example.
* :class:`RecurrentTagger`: ``nn.RNN`` over ``nn.LSTMCell`` and ``nn.GRUCell``
  (``variable_broadcast="params"``), then a custom layer that multiplies its own
  ``self.param`` with ``jnp.einsum``.
* :class:`ScannedViT`: patches, a class token, position embeddings and ``nn.scan`` over
  encoder blocks with plain ``variable_axes={"params": 0}``, as big_vision writes it; the
  blocks' MLP calls ``jnp.einsum`` and ``@`` on its own parameters.
"""

from __future__ import annotations

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
