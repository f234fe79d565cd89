"""Tests of brjax.export.packed: any quantized model out as packed codes and back, exactly."""

import dataclasses
import functools
import json
import math
import re

from conftest import run_main
from flax import nnx, traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brjax
from brjax.export import npz, packing
from brjax.export import packed as export
from brjax.models import cifar as models
from brjax.models import plain as plain_models
from brjax.quant import lsq as quant
from brjax.training import checkpoint
from brjax.training.config import Config

IMAGES = np.random.default_rng(0).normal(0, 1, (4, 8, 8, 3)).astype(np.float32)


def _random_variables(model: nn.Module, images: np.ndarray, seed: int, **kwargs) -> dict:
  """Non-trivial variables of ``model``, from ``jax.eval_shape`` (no init compile).

  Kernels ~ He normal, each weight step size a random fraction of its kernel's std (per
  channel too), activation step sizes in [0.05, 0.5], BatchNorm around its identity,
  data-decided input signs at random.
  """
  shapes = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), images)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(shapes)
  values = {}
  for path, leaf in flat.items():
    shape, name = leaf.shape, path[-1]
    if leaf.dtype == bool:
      value = rng.random(shape) < 0.5
    elif name == "kernel":
      value = rng.normal(0, math.sqrt(2 / math.prod(shape[:-1])), shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name in ("alpha", "input_alpha"):
      value = rng.uniform(0.05, 0.5, shape)
    else:
      value = rng.normal(0, 0.2, shape)
    values[path] = np.asarray(value, leaf.dtype)
  for path in values:  # a weight step size: a fraction of its kernel's std
    if path[-1] == "alpha" and path[:-1] + ("kernel",) in values:
      kernel = values[path[:-1] + ("kernel",)]
      values[path] = (np.std(kernel) * rng.uniform(0.3, 1.0, values[path].shape)
                      ).astype(values[path].dtype)
  return traverse_util.unflatten_dict(values)


def _check_round_trip(model, variables, exported, tmp_path, **kwargs):
  """Saved, loaded: the same logits bit for bit, every kernel the fake-quantized one, every
  other variable as it was, every kernel's codes in ``packed_size`` bytes."""
  size = npz.save(str(tmp_path / "model.npz"), exported)
  loaded = npz.load(str(tmp_path / "model.npz"))
  assert loaded.header == json.loads(json.dumps(exported.header))
  h = loaded.header
  for entry in h["kernels"]:
    assert packing.packed_bits(entry["bits"]) == entry["packed_bits"]
    assert quant.qrange(entry["bits"], signed=True) == (entry["qn"], entry["qp"])
  # Packed size: each kernel takes ceil(n * packed_bits / 8) bytes; the file, little more.
  codes = sum(packing.packed_size(math.prod(k["shape"]), k["bits"]) for k in h["kernels"])
  floats = sum(v.nbytes for v in loaded.floats.values())
  entries = len(h["kernels"]) + len(h["floats"])
  assert codes + floats <= h["data_bytes"] < codes + floats + 8 * entries
  with np.load(str(tmp_path / "model.npz")) as z:
    assert z["data"].size == h["data_bytes"]
    header_bytes = z["header"].size
  assert h["data_bytes"] + header_bytes < size < h["data_bytes"] + header_bytes + 1000

  original = traverse_util.flatten_dict(jax.device_get(variables))
  restored = traverse_util.flatten_dict(npz.load_variables(str(tmp_path / "model.npz")))
  assert restored.keys() == original.keys()
  kernels = {tuple(k["path"]): k for k in h["kernels"]}
  for path, value in restored.items():
    assert value.dtype == original[path].dtype and value.shape == original[path].shape, path
    if path not in kernels:
      np.testing.assert_array_equal(value, original[path], err_msg=str(path))
      continue
    k = kernels[path]
    alpha = packing.broadcastable_alpha(original[tuple(k["step_size"])], k["shape"],
                                        k["stack_axes"])
    fake = jax.jit(quant.lsq_quantize, static_argnums=(2, 3))(original[path], alpha, k["qn"],
                                                              k["qp"], 1.0)
    np.testing.assert_array_equal(value, np.asarray(fake), err_msg=str(path))
  apply = jax.jit(functools.partial(model.apply, **kwargs))
  expected = np.asarray(apply(variables, IMAGES))
  assert expected.std(axis=0).min() > 1e-3  # a network whose outputs depend on the input
  np.testing.assert_array_equal(np.asarray(apply(traverse_util.unflatten_dict(restored),
                                                 IMAGES)), expected)
  return h


def test_plain_resnet_mixed_bits_per_channel(tmp_path):
  """quantize_model'ed plain ResNet: 8-bit first and last layer, 2-4 bits elsewhere,
  per-channel step sizes, a weight-only rule, a layer kept float, data-decided signs."""
  model = brjax.quantize_model(plain_models.ResNet(), [
      brjax.QuantRule("conv_init|Dense_0", weight_bits=8, act_bits=8),
      brjax.QuantRule("ResNetBlock_1/conv_proj", weight_bits=4, per_channel=True),
      brjax.QuantRule("ResNetBlock_1/Conv_1"),  # float
      brjax.QuantRule("ResNetBlock_0/.*", weight_bits=2, act_bits=2, per_channel=True),
      brjax.QuantRule(".*", weight_bits=3, act_bits=4)])
  variables = _random_variables(model, IMAGES, seed=1, train=False)
  exported = export.from_linen(model, variables, IMAGES[:1], train=False)
  h = _check_round_trip(model, variables, exported, tmp_path, train=False)
  bits = {k["module"]: (k["bits"], np.ndim(exported.floats["/".join(k["step_size"])]) > 0)
          for k in h["kernels"]}  # (bits, per channel)
  assert bits == {"conv_init": (8, False), "Dense_0": (8, False),
                  "ResNetBlock_0/Conv_0": (2, True), "ResNetBlock_0/Conv_1": (2, True),
                  "ResNetBlock_1/Conv_0": (3, False), "ResNetBlock_1/conv_proj": (4, True)}
  assert "params/ResNetBlock_1/Conv_1/kernel" in exported.floats
  assert {f"params/{k['module']}/kernel" for k in h["kernels"]}.isdisjoint(exported.floats)
  acts = {a["module"]: a for a in h["activations"]}
  assert sorted(acts) == ["Dense_0", "ResNetBlock_0/Conv_0", "ResNetBlock_0/Conv_1",
                          "ResNetBlock_1/Conv_0", "conv_init"]
  for module, act in acts.items():
    assert act["kind"] == "input" and act["calls"] == 1
    assert act["step_size"] == ["params", *module.split("/"), "input_alpha"]
    signed = variables["quant_state"]
    for key in module.split("/"):
      signed = signed[key]
    assert act["signed"] == bool(signed["input_signed"])
  assert (acts["conv_init"]["bits"], acts["ResNetBlock_0/Conv_1"]["bits"],
          acts["ResNetBlock_1/Conv_0"]["bits"]) == (8, 2, 4)


def test_vit_scan_stacks_each_layer_on_its_grid(tmp_path):
  model = brjax.quantize_model(plain_models.ViT(scan=True, hidden=16, mlp_dim=32), [
      brjax.QuantRule("embedding|head", weight_bits=8, act_bits=8),
      brjax.QuantRule(".*", weight_bits=2, act_bits=4, per_channel=True)])
  variables = _random_variables(model, IMAGES, seed=2)
  exported = export.from_linen(model, variables, IMAGES[:1])
  h = _check_round_trip(model, variables, exported, tmp_path)
  stacked = [k for k in h["kernels"] if k["module"].startswith("encoder/block/")]
  assert len(stacked) == 6 and all(k["stack_axes"] == 1 and k["bits"] == 2 for k in stacked)
  query = next(k for k in stacked if k["module"].endswith("/query"))
  assert query["shape"] == [2, 16, 2, 8]
  assert exported.floats["/".join(query["step_size"])].shape == (2, 1, 2, 8)
  acts = [a for a in h["activations"] if a["module"].startswith("encoder/block/")]
  assert acts and all(isinstance(a["signed"], list) and len(a["signed"]) == 2 for a in acts)


def test_quantconv_resnet_and_relu_outputs(tmp_path):
  """brjax's own layers (the CIFAR ResNet's): QuantConv/QuantDense kernels (ternary 1-bit
  convs), QuantReLU outputs as "output" activations."""
  model = models.CifarResNet(
      stage_sizes=(1, 1), stage_filters=(4, 8),
      conv=functools.partial(quant.QuantConv, bits=1, per_channel=True),
      dense=functools.partial(quant.QuantDense, bits=8),
      act=functools.partial(quant.QuantReLU, bits=4))
  variables = _random_variables(model, IMAGES, seed=3, train=False)
  exported = export.from_linen(model, variables, IMAGES[:1], train=False)
  h = _check_round_trip(model, variables, exported, tmp_path, train=False)
  assert sorted((k["bits"], k["packed_bits"], k["qn"]) for k in h["kernels"]) == (
      [(1, 2, -1)] * 6 + [(8, 8, -128)])
  outputs = [a for a in h["activations"] if a["kind"] == "output"]
  assert len(outputs) == 5 and all(a["bits"] == 4 and a["signed"] is False for a in outputs)


class _CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2))
    for block in self.blocks:
      x = nnx.relu(block(x))
    return self.head(self.drop(x))


@pytest.mark.slow
def test_nnx_model_round_trip(tmp_path):
  model = _CNN(nnx.Rngs(0))
  brjax.quantize_model(model, [
      brjax.QuantRule("head", weight_bits=8, act_bits=8),
      brjax.QuantRule("blocks/.*", weight_bits=2, act_bits=4, per_channel=True),
      brjax.QuantRule("conv", weight_bits=4)], IMAGES)
  model.eval()
  expected = np.asarray(model(IMAGES))
  exported = export.from_nnx(model, IMAGES[:1])
  h = exported.header
  assert h["framework"] == "nnx"
  assert {k["module"]: k["bits"] for k in h["kernels"]} == {
      "conv": 4, "blocks/0": 2, "blocks/1": 2, "head": 8}
  assert ["blocks", 0, "kernel"] in [k["path"] for k in h["kernels"]]  # int keys kept
  assert not any(f["path"][0] == "drop" for f in h["floats"])  # rng state left out
  npz.save(str(tmp_path / "cnn.npz"), exported)
  copy = nnx.clone(model)
  nnx.update(copy, jax.tree.map(jnp.zeros_like, nnx.state(copy, nnx.Param)))
  npz.update_nnx(copy, npz.load_variables(str(tmp_path / "cnn.npz")))
  np.testing.assert_array_equal(np.asarray(copy(IMAGES)), expected)


# ------------------------------------------------------------------------- loud failures


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x, extra: bool = False):
    x = quant.QuantDense(8, bits=4)(x.reshape(x.shape[0], -1))
    if extra:
      x = quant.QuantDense(8, bits=4, name="extra")(x)
    return x


@pytest.fixture(scope="module")
def mlp():
  model = _Mlp()
  variables = _random_variables(model, IMAGES, seed=4, extra=True)
  return model, variables


def test_export_fails_loudly(mlp):
  model, variables = mlp
  with pytest.raises(ValueError, match=r"^params/extra/alpha is a step size that no recorded "
                                       r"site used \(1 in all\): its layer did not run"):
    export.from_linen(model, variables, IMAGES[:1])
  collection = export.record_linen(model, variables, IMAGES[:1], extra=True)
  with pytest.raises(ValueError, match=r"^QuantDense_0/alpha is missing, but the weight site "
                                       r"of QuantDense_0 keeps it there"):
    export.from_sites(variables, collection, framework="nnx")
  with pytest.raises(ValueError, match="framework='torch' is not accepted"):
    export.from_sites(variables, collection, framework="torch")
  other = jax.tree.map(lambda x: x, variables)
  other["params"]["extra"]["kernel"] = other["params"]["extra"]["kernel"] + 1
  with pytest.raises(ValueError, match=r"^params/extra/kernel \(shape \(8, 8\)\) is not the "
                                       "kernel its site recorded"):
    export.from_sites(other, collection)
  other["params"]["extra"]["kernel"] = np.full((8, 8), np.nan, np.float32)
  with pytest.raises(ValueError, match="^params/extra/kernel holds non-finite values"):
    export.from_sites(other, collection)
  with pytest.raises(ValueError, match=r"^rng/key: a .*which export cannot store"):
    export.from_sites({**variables, "rng": {"key": jax.random.key(0)}}, collection)
  with pytest.raises(ValueError, match="hold the 'quant' collection"):
    export.from_linen(model, {**variables, "quant": collection}, IMAGES[:1], extra=True)
  with pytest.raises(ValueError, match="recorded no quantized kernel"):
    export.from_sites(variables, {})


@pytest.mark.slow
def test_export_refuses_what_it_cannot_pack():
  act_only = brjax.quantize_model(plain_models.ViT(hidden=8, depth=1, mlp_dim=8),
                                  [brjax.QuantRule(".*", act_bits=4, act_signed=True)])
  with pytest.raises(ValueError, match="recorded no quantized kernel"):
    export.from_linen(act_only, _random_variables(act_only, IMAGES, seed=5), IMAGES[:1])
  bf16 = brjax.quantize_model(nn.Dense(4, param_dtype=jnp.bfloat16),
                              [brjax.QuantRule(".*", weight_bits=4)])
  x = IMAGES[:1, 0, 0]
  with pytest.raises(ValueError, match="^params/kernel has dtype bfloat16: export packs "
                                       "float32 or float64"):
    export.from_linen(bf16, bf16.init(jax.random.key(0), x), x)

  class Ensemble(nn.Module):  # one kernel shared by every member: broadcast, not stacked
    @nn.compact
    def __call__(self, x):
      dense = nn.vmap(nn.Dense, variable_axes={"params": None, "quant": 0},
                      split_rngs={"params": False})
      return dense(4, name="shared")(x)

  model = brjax.quantize_model(Ensemble(), [brjax.QuantRule(".*", weight_bits=4)])
  x = IMAGES[:3, :2, 0]
  with pytest.raises(ValueError, match=r"^params/shared/alpha \(shape \(\)\) is not the step "
                                       r"size its site recorded \(shape \(3,\)\)"):
    export.from_linen(model, model.init(jax.random.key(0), x), x)


def _header_bytes(header: dict) -> np.ndarray:
  return np.frombuffer(json.dumps(header).encode(), np.uint8)


def test_load_rejects_other_and_corrupt_files(mlp, tmp_path):
  path = tmp_path / "x.npz"
  path.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="is not a brjax export"):
    npz.load(str(path))
  np.savez(path, header=_header_bytes({"format": "brjax.export", "version": 1}))
  with pytest.raises(ValueError, match="format 'brjax.export'.*brjax.export.integer.load"):
    npz.load(str(path))
  model, variables = mlp
  exported = export.from_linen(model, variables, IMAGES[:1], extra=True)
  npz.save(str(path), exported)
  with np.load(str(path)) as z:
    header, data = json.loads(bytes(z["header"])), z["data"]
  np.savez(path, header=_header_bytes(header), data=data[:-8])
  with pytest.raises(ValueError, match=r"its data is not the uint8 \(\d+,\) buffer"):
    npz.load(str(path))
  header["kernels"][0]["offset"] = len(data)
  np.savez(path, header=_header_bytes(header), data=data)
  with pytest.raises(ValueError, match="params/QuantDense_0/kernel is unreadable.*outside"):
    npz.load(str(path))


# ---------------------------------------------------------------------- training runs


def _write_run(workdir, config: Config, seed: int) -> dict:
  """A checkpoint of ``config``'s model with random variables, as brjax.training.train writes it."""
  model = models.from_run_config(config, 10)
  images = np.zeros((1, 32, 32, 3), np.float32)
  variables = _random_variables(model, images, seed, train=False)
  ckpts = checkpoint.RunCheckpoints(str(workdir))
  data = {"mean": [0.5] * 3, "std": [0.25] * 3, "class_names": [str(i) for i in range(10)]}
  ckpts.save(1, variables, {"epoch": 1, "config": dataclasses.asdict(config), "data": data},
             is_best=True)
  ckpts.close()
  return variables


def test_script_exports_a_run_the_integer_format_cannot_hold(tmp_path, capsys):
  """A weight-only run of the reference layout: refused by --format=integer (which says
  where to go), exported by --format=quantized, and loaded back exactly."""
  config = Config(model="resnet18_reference", width=2, bits_w=2, bits_a=32, per_channel=True)
  variables = _write_run(tmp_path / "run", config, seed=6)
  out = tmp_path / "run.npz"
  code, stdout, stderr = run_main("export", [f"--workdir={tmp_path / 'run'}", f"--out={out}"],
                                  capsys)
  assert code == 2 and not stdout and not out.exists()
  assert re.fullmatch(r"error: W2A32 is a weight-only quantized run: .*; --format=quantized "
                      r"exports any quantized run\n", stderr)
  code, stdout, stderr = run_main("export", [f"--workdir={tmp_path / 'run'}", f"--out={out}",
                                             "--format=quantized"], capsys)
  assert code == 0, stderr
  checkpoint_line, *lines = stdout.splitlines()
  assert checkpoint_line.startswith(f"checkpoint: {tmp_path / 'run'} (latest checkpoint, "
                                    "epoch 1"), checkpoint_line
  assert lines[0] == f"{out}: resnet18_reference (W2A32), 21 quantized kernels, epoch 1"
  match = re.fullmatch(r"exported ([\d.]+) kB vs float ([\d.]+) kB: ([\d.]+)x smaller", lines[1])
  assert match and float(match[1]) == round(out.stat().st_size / 1e3, 1), lines
  assert re.fullmatch(r"  codes [\d.]+ kB at 2 bits per weight, float rest [\d.]+ kB, header "
                      r"and container [\d.]+ kB", lines[2]), lines
  exported = npz.load(str(out))
  assert exported.header["source"]["config"]["model"] == "resnet18_reference"
  model = models.from_run_config(exported.header["source"]["config"], 10)
  apply = jax.jit(functools.partial(model.apply, train=False))
  images = np.random.default_rng(1).normal(0, 1, (2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(apply(npz.to_variables(exported), images)),
                                np.asarray(apply(variables, images)))


def test_script_refuses_a_float_run_and_bad_flags(tmp_path, capsys):
  _write_run(tmp_path / "float", Config(bits_w=32, bits_a=32), seed=7)
  out = tmp_path / "x.npz"
  code, stdout, stderr = run_main("export", [f"--workdir={tmp_path / 'float'}", f"--out={out}",
                                             "--format=quantized"], capsys)
  assert (code, stdout) == (2, "") and not out.exists()
  assert stderr == "error: W32A32: the run's kernels are float, there is nothing to pack\n"
  code, _, stderr = run_main("export", [f"--workdir={tmp_path / 'float'}", f"--out={out}",
                                        "--format=tflite"], capsys)
  assert code == 2 and stderr.startswith("error: ") and "--format" in stderr


@pytest.mark.slow
def test_script_exports_the_tiny_run_in_the_quantized_format(tiny_run, tmp_path, capsys):
  workdir, _ = tiny_run
  out = tmp_path / "tiny.npz"
  code, stdout, stderr = run_main("export", [f"--workdir={workdir}", f"--out={out}",
                                             "--format=quantized"], capsys)
  assert code == 0, stderr
  variables, meta = checkpoint.restore_pretrained(workdir, prefer="latest")  # export's default
  match = re.search(r"exported ([\d.]+) [kM]B vs float ([\d.]+) [kM]B: ([\d.]+)x smaller",
                    stdout)  # kB under 0.1 MB (the tiny run's ResNet-8)
  assert match, stdout
  assert float(match[3]) > 8  # 2-bit codes: 16x on the kernels, less the float rest
  print(stdout)
  model = models.from_run_config(meta["config"], len(meta["data"]["class_names"]))
  apply = jax.jit(functools.partial(model.apply, train=False))
  images = np.random.default_rng(2).normal(0, 1, (8, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(apply(npz.load_variables(str(out)), images)),
                                np.asarray(apply(variables, images)))


def test_script_names_the_bits_a_one_bit_run_is_packed_at(tmp_path, capsys):
  """A W1 (ternary) run's codes are packed at 2 bits: the script said "at 1 bits"."""
  _write_run(tmp_path / "w1", Config(model="resnet18_reference", width=2, bits_w=1, bits_a=32),
             seed=8)
  out = tmp_path / "w1.npz"
  code, stdout, stderr = run_main("export", [f"--workdir={tmp_path / 'w1'}", f"--out={out}",
                                             "--format=quantized"], capsys)
  assert code == 0, stderr
  assert re.fullmatch(r"  codes [\d.]+ kB at 2 bits per weight \(1-bit ternary codes\), float "
                      r"rest [\d.]+ kB, header and container [\d.]+ kB",
                      stdout.splitlines()[3]), stdout
