"""Tests of brjax.export.integer, brjax.export.integer_inference and scripts/export.py (integer)."""

import dataclasses
import functools
import json
import math
import re
import subprocess
import sys

from conftest import REPO
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.data import input_pipeline
from brjax.export import integer as integer_export
from brjax.export import integer_inference, packing
from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.quant import sites
from brjax.training import checkpoint
from brjax.training.config import Config

SCRIPT = str(REPO / "scripts" / "export.py")
MEAN = np.array([0.49, 0.48, 0.45], np.float32)
STD = np.array([0.25, 0.24, 0.26], np.float32)
# A flip-free example differs only by float32 rounding: measured <= 2e-7 * (1 + max|logit|).
ROUNDING_TOL = 1e-4
# Requantization tie flips: measured about 1 code in 10^7; anything near 1e-5 is a bug.
MAX_FLIP_RATE = 1e-5

# ------------------------------------------------------------------------------- folding


def test_fold_batchnorm_is_exact_in_float64():
  rng = np.random.default_rng(0)
  c = 64
  scale, bias = rng.normal(0, 1, c), rng.normal(0, 1, c)
  mean = rng.normal(0, 3, c)
  var = np.exp(rng.uniform(-14, 3, c))  # down to ~1e-6: epsilon matters there
  z = mean + rng.normal(0, 1, (500, c)) * np.sqrt(var)
  z[:10] = mean  # the cancellation case
  s, b = integer_export.fold_batchnorm(scale, bias, mean, var)
  reference = scale * (z - mean) / np.sqrt(var + 1e-5) + bias
  bound = 8 * np.finfo(np.float64).eps * (np.abs(s * z) + np.abs(b) + np.abs(reference))
  assert np.all(np.abs(s * z + b - reference) <= bound)


def test_fold_batchnorm_matches_flax_batchnorm():
  rng = np.random.default_rng(1)
  c = 32
  bn = nn.BatchNorm(use_running_average=True, epsilon=integer_export.BN_EPSILON)
  variables = {"params": {"scale": rng.normal(0, 1, c).astype(np.float32),
                          "bias": rng.normal(0, 1, c).astype(np.float32)},
               "batch_stats": {"mean": rng.normal(0, 2, c).astype(np.float32),
                               "var": np.exp(rng.uniform(-12, 2, c)).astype(np.float32)}}
  z = rng.normal(0, 3, (200, c)).astype(np.float32)
  expected = np.asarray(bn.apply(variables, z), np.float64)
  s, b = integer_export.fold_batchnorm(**variables["params"], **variables["batch_stats"])
  s32, b32 = s.astype(np.float32), b.astype(np.float32)
  got = (z * s32 + b32).astype(np.float64)
  # float32 rounding of both sides, relative to the magnitudes of the folded terms.
  bound = 1e-6 * (np.abs(s * z) + np.abs(b) + 1e-3)
  assert np.all(np.abs(got - expected) <= bound)



# ------------------------------------------------------------- integer vs fake-quant


def _random_variables(model: nn.Module, images: np.ndarray, seed: int,
                      alpha_scale: float = 1.0) -> dict:
  """Non-trivial variables: random kernels, BatchNorm and step sizes.

  Shapes come from ``jax.eval_shape(model.init)`` (``model.init`` itself compiles its
  random initializers for ~15 s on a busy CPU); activation step sizes are set the LSQ way
  from ``images`` (``quant.init_alphas``) and then scaled by random factors in
  ``alpha_scale * [0.7, 1.4]``.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          images)
  flat = traverse_util.flatten_dict(shapes, sep="/")
  values = {}
  for path, leaf in flat.items():
    shape, last = leaf.shape, path.rsplit("/", 1)[-1]
    if last == "kernel":
      value = rng.normal(0, math.sqrt(2 / math.prod(shape[:-1])), shape)
    elif last in ("scale", "var"):
      value = rng.uniform(0.4, 1.6, shape)
    elif last in ("bias", "mean"):
      value = rng.normal(0, 0.3, shape)
    else:  # alpha: recomputed below
      value = np.ones(shape)
    values[path] = np.asarray(value, np.float32)
  variables = traverse_util.unflatten_dict(values, sep="/")
  variables = jax.jit(functools.partial(quant.init_alphas, model, train=False))(
      variables, images)
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  for path in flat:
    if path.endswith("/alpha"):
      flat[path] = np.float32(flat[path] * alpha_scale * rng.uniform(0.7, 1.4))
  return traverse_util.unflatten_dict(flat, sep="/")


def _fake_quant(model: nn.Module, variables: dict, images: np.ndarray):
  """Fake-quant eval: logits, each QuantReLU's codes ``round(clip(y / alpha, 0, qp))``, and
  how many activations sit at the top of their range (code ``qp``, or ``y`` at the clip)."""
  apply = jax.jit(functools.partial(model.apply, train=False, mutable=["quant"]))
  logits, state = apply(variables, images)
  recorded = sites.named(jax.device_get(state["quant"]), (sites.OUTPUT,))
  qp, clip = 2**model.act.keywords["bits"] - 1, model.act.keywords["clip"]
  codes, saturated = {}, 0
  for name, site in recorded.items():
    value = np.asarray(site.values)
    codes[name] = np.round(np.clip(value / np.asarray(quant.safe_alpha(site.alpha)), 0, qp))
    saturated += np.sum((codes[name] == qp) | (value == clip))
  return np.asarray(logits), codes, saturated


def _integer(exported, images, given=None, chunk=16):
  """``integer_forward_with_codes`` in chunks of 16 images: every test reuses its ops."""
  parts = []
  for i in range(0, len(images), chunk):
    part = None if given is None else {k: v[i:i + chunk] for k, v in given.items()}
    parts.append(integer_inference.integer_forward_with_codes(exported, images[i:i + chunk],
                                                              given=part))
  logits = np.concatenate([np.asarray(p[0]) for p in parts])
  codes = {k: np.concatenate([np.asarray(p[1][k]) for p in parts]) for k in parts[0][1]}
  return logits, codes


def _flips(codes, fq_codes):
  """Per example, how many activation codes differ from the fake-quant ones."""
  assert sorted(codes) == sorted(fq_codes)
  n = len(next(iter(codes.values())))
  return sum((codes[k] != fq_codes[k]).reshape(n, -1).sum(1) for k in codes)


def _compare(exported, images, fq_logits, fq_codes, teacher_forced=True):
  """Checks integer vs fake-quant inference; returns (logits, flips, max |dlogit|) per example.

  Teacher-forced (every layer reads the fake-quant codes of its inputs): a code differs
  only by that layer's own rounding (a tie flip), which must be rare, and the logits,
  computed from the same final codes, agree to float32 rounding. Free-running: an early
  flip can cascade, so only the examples without any differing code must agree tightly.
  """
  total = sum(c.size for c in fq_codes.values())
  tol = ROUNDING_TOL * (1 + np.abs(fq_logits).max(axis=1))
  if teacher_forced:
    logits, codes = _integer(exported, images, given=fq_codes)
    local = _flips(codes, fq_codes).sum()
    assert local <= MAX_FLIP_RATE * total, f"{local} of {total} codes differ (teacher-forced)"
    err = np.abs(logits - fq_logits).max(axis=1)
    assert np.all(err <= tol), (err.max(), tol.min())
  logits, codes = _integer(exported, images)
  flips = _flips(codes, fq_codes)
  exact = flips == 0
  err = np.abs(logits - fq_logits).max(axis=1)
  assert np.all(err[exact] <= tol[exact]), (err[exact].max(), tol.min())
  np.testing.assert_array_equal(logits[exact].argmax(1), fq_logits[exact].argmax(1))
  return logits, flips, err


@pytest.fixture(scope="module")
def random_images():
  rng = np.random.default_rng(7)
  pixels = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  return pixels, ((pixels / np.float32(255) - MEAN) / STD).astype(np.float32)


@pytest.mark.parametrize("bits_w,bits_a,clip,per_channel", [
    (2, 2, None, False), (4, 4, 2.0, False), (8, 8, None, False), (3, 4, None, True)])
@pytest.mark.slow
def test_integer_forward_matches_fake_quant(bits_w, bits_a, clip, per_channel, random_images,
                                            tmp_path):
  pixels, images = random_images
  model = models.create_model("resnet20", bits_w=bits_w, bits_a=bits_a, clip=clip,
                              per_channel=per_channel)
  # LSQ's init puts 8-bit grids far above the data: shrink them so that codes reach qp.
  variables = _random_variables(model, images, seed=bits_w,
                                alpha_scale=0.25 if bits_a == 8 else 1.0)
  fq_logits, fq_codes, saturated = _fake_quant(model, variables, images)
  # The perturbation must make a network that is not trivial: logits that vary between
  # images far more than the tolerance, layers neither dead nor saturated.
  assert fq_logits.std(axis=0).min() > 10 * ROUNDING_TOL * (1 + np.abs(fq_logits).max())
  for name, c in fq_codes.items():
    assert 0.02 < np.mean(c > 0) < 0.98 and len(np.unique(c)) >= 4, name
  assert saturated > 1000  # clipping at qp (or at the ReLU clip) is exercised
  assert max(c.max() for c in fq_codes.values()) > 127 or bits_a < 8  # int16 codes
  exported = integer_export.export_model(variables, model="resnet20", bits_w=bits_w, bits_a=bits_a,
                                 clip=clip, mean=MEAN, std=STD)
  if per_channel:  # one step size per output channel, in the header
    stem = next(l for l in exported.header["layers"] if l["name"] == "conv_init")
    assert isinstance(stem["alpha"], list) and len(stem["alpha"]) == stem["shape"][-1]
  size = integer_export.save(str(tmp_path / "model.npz"), exported)
  loaded = integer_export.load(str(tmp_path / "model.npz"))
  assert loaded.header == json.loads(json.dumps(exported.header))
  assert loaded.arrays.keys() == exported.arrays.keys()
  for key, value in exported.arrays.items():
    np.testing.assert_array_equal(loaded.arrays[key], value)
  codes_bytes = sum(packing.packed_size(v.size, bits_w) for k, v in exported.arrays.items()
                    if k.endswith("/codes"))
  # Per-channel step sizes travel in the JSON header: ~25 bytes of text each.
  header_alphas = sum(len(l["alpha"]) for l in exported.header["layers"]
                      if isinstance(l["alpha"], list))
  assert codes_bytes < size < codes_bytes + 40_000 + 25 * header_alphas
  # Integer stem on uint8 pixels, float stem on normalized float images.
  for inputs, teacher_forced in ((pixels, True), (images, False)):
    _, flips, _ = _compare(loaded, inputs, fq_logits, fq_codes, teacher_forced)
    if bits_a <= 4:  # at 8 bits flips are ~30x likelier, and cascade in a random net
      assert np.sum(flips > 0) <= 2  # measured: 0 or 1 example of 16 touched by a flip


@pytest.mark.slow
def test_one_bit_exports_ternary_weights_and_binary_activations(random_images, tmp_path):
  """W1A1: weight codes in {-1, 0, 1} (2-bit containers), activation codes in {0, 1}; the
  integer forward reproduces the fake-quant model."""
  pixels, images = random_images
  model = models.create_model("resnet20", bits_w=1, bits_a=1)
  variables = _random_variables(model, images, seed=1)
  fq_logits, fq_codes, _ = _fake_quant(model, variables, images)
  for name, c in fq_codes.items():
    assert set(np.unique(c)) <= {0, 1}, name
  exported = integer_export.export_model(variables, model="resnet20", bits_w=1, bits_a=1, mean=MEAN,
                                 std=STD)
  integer_export.save(str(tmp_path / "w1a1.npz"), exported)
  loaded = integer_export.load(str(tmp_path / "w1a1.npz"))
  layers = [l for l in loaded.header["layers"] if "shape" in l]
  assert layers and all(l["packed_bits"] == 2 for l in layers)
  for layer in layers:
    codes = loaded.arrays[f"{layer['name']}/codes"]
    assert set(np.unique(codes)) <= {-1, 0, 1} and -1 in codes and 1 in codes, layer["name"]
  for inputs, teacher_forced in ((pixels, True), (images, False)):
    _, flips, _ = _compare(loaded, inputs, fq_logits, fq_codes, teacher_forced)
    assert np.sum(flips > 0) <= 2


def test_export_refuses_other_layouts():
  for name in ("resnet18_reference", "resnet20_option_a"):
    with pytest.raises(ValueError, match=f"model='{name}' is not exportable"):
      integer_export.export_model({}, model=name, bits_w=2, bits_a=2)


def test_export_refuses_unquantized_or_mismatched(random_images):
  for bits_w, bits_a, kind in ((32, 32, "a float run"), (2, 32, "weight-only"),
                               (32, 4, "activation-only")):
    with pytest.raises(ValueError, match=f"W{bits_w}A{bits_a} is .*{kind}"):
      integer_export.export_model({}, model="resnet20", bits_w=bits_w, bits_a=bits_a)
  with pytest.raises(ValueError, match="bits_w=9 is not accepted"):
    integer_export.export_model({}, model="resnet20", bits_w=9, bits_a=2)
  with pytest.raises(ValueError, match="params/conv_init/kernel is missing"):
    integer_export.export_model({"params": {}}, model="resnet20", bits_w=2, bits_a=2)
  # ResNet-20 variables (9 blocks) read as a ResNet-18 (8 blocks, 4 stages).
  model = models.create_model("resnet20", bits_w=2, bits_a=2)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          random_images[1])
  variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
  with pytest.raises(ValueError, match="BasicBlock_8/.* is not part of a resnet18"):
    integer_export.export_model(variables, model="resnet18", bits_w=2, bits_a=2)
  variables["params"]["conv_init"]["alpha"] = np.float32(np.nan)
  with pytest.raises(ValueError, match="params/conv_init/alpha holds non-finite"):
    integer_export.export_model(variables, model="resnet20", bits_w=2, bits_a=2)


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / "x.npz"
  path.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="is not a brjax export"):
    integer_export.load(str(path))
  np.savez(path, header=np.frombuffer(json.dumps({"format": "other"}).encode(), np.uint8))
  with pytest.raises(ValueError, match="format 'other'"):
    integer_export.load(str(path))


def test_export_run_refuses_a_float_checkpoint(tmp_path):
  model = models.create_model("resnet20")
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  config = dataclasses.asdict(Config(bits_w=32, bits_a=32))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  ckpts.save(1, variables, {"epoch": 1, "config": config}, is_best=True)
  ckpts.close()
  with pytest.raises(ValueError, match="W32A32 is a float run"):
    integer_export.export_run(str(tmp_path))


def test_export_run_refuses_first_and_last_layers_at_other_bits(tmp_path):
  """The integer format has one bit width for every layer: a --first_last_bits=8 run would
  be packed wrong, so it is refused (the ONNX and quantized formats keep each layer's)."""
  model = models.create_model("resnet20", bits_w=2, bits_a=2, first_last_bits=8)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
  config = dataclasses.asdict(Config(first_last_bits=8))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  ckpts.save(1, variables, {"epoch": 1, "config": config}, is_best=True)
  ckpts.close()
  with pytest.raises(ValueError, match=r"^--first_last_bits=8: .* use --format=onnx or "
                                       "--format=quantized$"):
    integer_export.export_run(str(tmp_path))


def test_export_run_needs_a_checkpoint(tmp_path):
  (tmp_path / "checkpoints" / "best").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"--workdir=.* holds no checkpoint \(checkpoints/best"):
    integer_export.export_run(str(tmp_path))


# --------------------------------------------------------------------------- end to end


def _run_script(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        cwd=str(REPO), timeout=300, check=False)


@pytest.mark.slow
def test_script_exports_the_tiny_run(tiny_run, tmp_path):
  workdir, _ = tiny_run
  out = tmp_path / "tiny.npz"
  result = _run_script(f"--workdir={workdir}", f"--out={out}")
  assert result.returncode == 0, result.stderr
  match = re.search(r"exported ([\d.]+) MB \(W2A2\) vs float ([\d.]+) MB: ([\d.]+)x smaller",
                    result.stdout)
  assert match, result.stdout
  exported_mb, float_mb, ratio = map(float, match.groups())
  variables, meta = checkpoint.restore_pretrained(workdir, prefer="latest")  # export's default
  assert exported_mb == round(out.stat().st_size / 1e6, 2)
  assert float_mb == round(integer_export.float_size_bytes(variables) / 1e6, 2)
  assert ratio == round(integer_export.float_size_bytes(variables) / out.stat().st_size, 1)
  assert ratio > 8  # 2-bit codes: 16x on the weights, less the float parts and headers

  exported = integer_export.load(str(out))
  config = meta["config"]
  h = exported.header
  assert (h["model"], h["bits_w"], h["bits_a"], h["clip"], h["num_classes"]) == (
      "resnet8", 2, 2, None, 10)  # the tiny run's model
  assert len(h["layers"]) == 10 and len(h["activations"]) == 7
  ds = input_pipeline.load_dataset(config["dataset"], config["data_dir"],
                                   train_examples=config["train_examples"],
                                   test_examples=config["test_examples"])
  np.testing.assert_array_equal(np.float32(h["normalization"]["mean"]), ds.mean)
  np.testing.assert_array_equal(np.float32(h["normalization"]["std"]), ds.std)
  model = models.from_run_config(config, ds.num_classes)  # its bits, clip, step sizes
  batch = next(input_pipeline.eval_batches(ds, len(ds.test_labels)))
  assert batch["mask"].all() and len(ds.test_labels) == 128
  fq_logits, fq_codes, _ = _fake_quant(model, variables, batch["image"])
  # The deployed path: uint8 pixels (the float stem is covered by the random models).
  logits, flips, err = _compare(exported, ds.test_images, fq_logits, fq_codes)
  np.testing.assert_array_equal(logits.argmax(1), fq_logits.argmax(1))
  print(f"tiny run: {flips.sum()} flipped codes, max |dlogit| {err.max():.3g}, "
        f"max |logit| {np.abs(fq_logits).max():.3g}")


def test_script_rejects_a_bad_workdir(tmp_path):
  out = tmp_path / "x.npz"
  result = _run_script(f"--workdir={tmp_path / 'nope'}", f"--out={out}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --workdir=") and "nope" in lines[0]
  assert not out.exists() and not result.stdout


# ------------------------------------------------------------ the run's input normalization


def _write_integer_run(workdir, data_dir: str, data: dict | None, **config) -> None:
  """A W2A2 ResNet-20 checkpoint with random variables, as brjax.training.train writes it;
  ``data``: the meta's stored statistics (None: a meta from before they were stored)."""
  model = models.create_model("resnet20", bits_w=2, bits_a=2)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.uniform(0.1, 1, s.shape).astype(s.dtype), shapes)
  meta = {"epoch": 1, "config": dict(dataclasses.asdict(Config(**config)), data_dir=data_dir)}
  if data is not None:
    meta["data"] = data
  ckpts = checkpoint.RunCheckpoints(str(workdir))
  ckpts.save(1, variables, meta, is_best=True)
  ckpts.close()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  from brjax.data import synthetic_images  # pylint: disable=g-import-not-at-top
  return str(synthetic_images.write_image_folder(
      tmp_path_factory.mktemp("images"), classes=2, train_per_class=4, eval_per_class=2,
      sizes=(32,), eval_folder="test"))


def test_export_run_writes_the_normalization_the_run_stored(image_folder, tmp_path):
  """A ``--normalization=reference`` run stored the reference's std; the export wrote the
  dataset's own statistics instead, and integer_forward then disagreed with the model."""
  from brjax.training import recipes  # pylint: disable=g-import-not-at-top
  stored = {"mean": list(recipes.REFERENCE_MEAN), "std": list(recipes.REFERENCE_STD),
            "class_names": ["a", "b"], "image_size": 32}
  _write_integer_run(tmp_path / "run", image_folder, stored, normalization="reference")
  h = integer_export.export_run(str(tmp_path / "run")).header
  np.testing.assert_array_equal(h["normalization"]["mean"], np.float32(recipes.REFERENCE_MEAN))
  np.testing.assert_array_equal(h["normalization"]["std"], np.float32(recipes.REFERENCE_STD))
  assert h["source"]["normalization"] == "stored by the run"
  # The stored statistics need no data: a run whose images moved still exports.
  _write_integer_run(tmp_path / "moved", "/no/such/images", dict(stored, std=[0.3] * 3))
  h = integer_export.export_run(str(tmp_path / "moved")).header
  np.testing.assert_array_equal(h["normalization"]["std"], np.float32([0.3] * 3))


def test_export_run_of_an_older_meta_follows_the_runs_recipe(image_folder, tmp_path):
  """A meta without statistics: measured again, then normalized as the run's recipe says."""
  from brjax.training import recipes  # pylint: disable=g-import-not-at-top
  _write_integer_run(tmp_path / "ref", image_folder, None, normalization="reference")
  h = integer_export.export_run(str(tmp_path / "ref")).header
  np.testing.assert_array_equal(h["normalization"]["std"], np.float32(recipes.REFERENCE_STD))
  assert h["source"]["normalization"].startswith("measured again from")
  _write_integer_run(tmp_path / "own", image_folder, None)
  h = integer_export.export_run(str(tmp_path / "own")).header
  ds = input_pipeline.load_dataset("cifar10", image_folder, 1, 1)
  np.testing.assert_array_equal(h["normalization"]["std"], ds.std)
