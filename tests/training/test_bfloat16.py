"""bfloat16 computation (--dtype=bfloat16): codes, BR and accuracy against float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.data import synthetic_images
from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.quant import regularizer, sites
from brjax.training import train
from brjax.training.config import Config


def _codes(site):
  values = jnp.asarray(site.values, jnp.float32) / quant.safe_alpha(site.alpha)
  return jnp.round(jnp.clip(values, site.qn, site.qp))


@pytest.mark.slow
def test_codes_and_br_of_a_bfloat16_forward_match_float32():
  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  model32 = models.from_run_config(Config(), 10, 32)
  model16 = models.from_run_config(Config(dtype="bfloat16"), 10, 32)
  variables = model32.init(jax.random.key(1), images, train=True)
  logits32, state32 = model32.apply(variables, images, train=False, mutable=[sites.COLLECTION])
  logits16, state16 = model16.apply(variables, images, train=False, mutable=[sites.COLLECTION])
  assert logits16.dtype == jnp.float32  # logits and losses stay float32
  np.testing.assert_allclose(logits16, logits32, atol=0.05)
  pairs = list(zip(sites.iterate(state32[sites.COLLECTION]),
                   sites.iterate(state16[sites.COLLECTION])))
  assert pairs
  for (path, kind, a), (_, _, b) in pairs:
    if kind == sites.WEIGHT:  # kernels are float32 parameters, quantized in float32
      np.testing.assert_array_equal(_codes(a), _codes(b))
    else:  # activations in bfloat16: a code moves only where rounding moved the value
      assert b.values.dtype == jnp.bfloat16
      assert jnp.mean(_codes(a) == _codes(b)) > 0.97, path
  br32, br16 = regularizer.br_losses(state32[sites.COLLECTION]), regularizer.br_losses(
      state16[sites.COLLECTION])
  assert br16[0].dtype == br16[1].dtype == jnp.float32  # BR sums in float32
  np.testing.assert_allclose(br16, br32, rtol=0.02)


@pytest.mark.parametrize("bits,signed", [(2, False), (4, True), (7, False), (8, True), (8, False)])
def test_bfloat16_quantizer_outputs_are_exact_codes(bits, signed):
  """A bfloat16 input gets exactly the codes float32 gives it; the output ``code * alpha``
  is rounded to bfloat16 only (relative error <= 2^-8), so codes with ``|k| <= 128`` come
  back exactly, and 8-bit unsigned ones within one level."""
  qn, qp = quant.qrange(bits, signed)
  x = (jnp.linspace(qn - 2.0, qp + 2.0, 4001) * 0.37).astype(jnp.bfloat16)
  alpha = jnp.float32(0.37)
  q = quant.lsq_quantize(x, alpha, qn, qp, 1.0)
  assert q.dtype == jnp.bfloat16
  codes = jnp.round(jnp.clip(x.astype(jnp.float32) / alpha, qn, qp))
  assert codes.min() == qn and codes.max() == qp
  np.testing.assert_allclose(q.astype(jnp.float32), codes * alpha, rtol=2.0**-8, atol=0)
  back = jnp.round(q.astype(jnp.float32) / alpha)
  if max(-qn, qp) <= 128:
    np.testing.assert_array_equal(back, codes)
  else:
    assert jnp.max(jnp.abs(back - codes)) <= 1


@pytest.mark.slow
def test_a_bfloat16_run_learns_like_a_float32_run(tmp_path):
  """The same small W2A2 run (4 colour classes, generated images) in both dtypes: both
  learn, and their test accuracies agree within the noise of 64 test images."""
  data = synthetic_images.write_image_folder(tmp_path / "data", classes=4, train_per_class=32,
                                             eval_per_class=16, sizes=(32,),
                                             eval_folder="test")
  accuracy = {}
  for dtype in ("float32", "bfloat16"):
    config = Config(model="resnet8", bits_w=2, bits_a=2, epochs=2, warmup_epochs=1,
                    batch_size=32, data_dir=str(data), dtype=dtype)
    accuracy[dtype] = train.train_and_evaluate(config, str(tmp_path / dtype),
                                               log=lambda _: None)["test_acc"]
  assert min(accuracy.values()) > 50.0, accuracy  # chance: 25%
  assert abs(accuracy["float32"] - accuracy["bfloat16"]) <= 12.5, accuracy
