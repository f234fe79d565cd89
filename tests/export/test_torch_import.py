"""brjax.export.torch_import: the reference package's PyTorch ResNet-18 checkpoints in and out.

The PyTorch side is the reference's CIFAR ResNet-18 written out here (torchvision's
``BasicBlock`` with one ``relu`` per block, 3x3 stem, no max-pool), built with torch in
float64: imported into ``resnet18_reference`` its forward passes (eval and train mode) and
BatchNorm buffers must match brjax's to float64 rounding.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.data import input_pipeline
from brjax.export import torch_import
from brjax.models import cifar as models
from brjax.training import train
from brjax.training.config import Config

WIDTH = 4


def test_module_paths_map_both_ways():
  assert torch_import.module_path("layer1.0.downsample.1") == ("layer1_0", "downsample_1")
  assert torch_import.module_path("conv1") == ("conv1",)
  assert torch_import.torch_module_name(("layer4_1", "conv2")) == "layer4.1.conv2"


def _brjax_model(bits=32, width=WIDTH, dtype=jnp.float32):
  return models.create_model("resnet18_reference", bits_w=bits, bits_a=bits, width=width,
                             dtype=dtype, param_dtype=dtype)


def _template(model, images):
  """What ``load_state_dict`` reads of a template: the variables' names, shapes and dtypes
  (zeros here: every value comes from the state_dict), from ``jax.eval_shape``: no init to
  compile (seconds for each quantized ResNet-18, which its check callbacks keep out of the
  persistent compilation cache)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), images)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ------------------------------------------------------------------------- with PyTorch


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _torch_resnet18(torch, width, num_classes=10):
  """The reference's float ResNet-18 layout (its cifar10_baseline.py), written out."""
  nn = torch.nn

  class BasicBlock(nn.Module):

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU()
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      identity = x if self.downsample is None else self.downsample(x)
      return self.relu(out + identity)

  class ResNet18(nn.Module):

    def __init__(self):
      super().__init__()
      self.inplanes = width
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.relu = nn.ReLU()
      self.layer1 = self._make_layer(width, 1)
      self.layer2 = self._make_layer(2 * width, 2)
      self.layer3 = self._make_layer(4 * width, 2)
      self.layer4 = self._make_layer(8 * width, 2)
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes))
      layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes
      layers.append(BasicBlock(planes, planes))
      return nn.Sequential(*layers)

    def forward(self, x):
      x = self.relu(self.bn1(self.conv1(x)))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  torch.manual_seed(0)
  net = ResNet18().double()
  with torch.no_grad():  # BatchNorm statistics and affine terms that are not the defaults
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
        module.running_mean.normal_(0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return net


@pytest.fixture(scope="module")
def torch_net(torch):
  return _torch_resnet18(torch, WIDTH)


@pytest.fixture(scope="module")
def images_nchw():
  return np.random.default_rng(0).normal(size=(6, 3, 32, 32))


def _state_dict(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


@pytest.mark.slow
def test_float_baseline_imports_and_computes_the_same_logits(torch, torch_net, images_nchw):
  with jax.enable_x64(True):
    model = _brjax_model(dtype=jnp.float64)
    x = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))
    variables, has_alphas = torch_import.load_state_dict(_template(model, x),
                                                         _state_dict(torch_net))
    assert not has_alphas
    torch_net.eval()
    with torch.no_grad():
      want = torch_net(torch.from_numpy(images_nchw)).numpy()
    got = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)

    # Train mode: batch statistics normalize; running buffers move as PyTorch's (momentum
    # 0.1, unbiased running variance).
    net = _torch_resnet18(torch, WIDTH)
    net.load_state_dict(torch_net.state_dict())
    net.train()
    with torch.no_grad():
      want = net(torch.from_numpy(images_nchw)).numpy()
    got, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x)
    chex.assert_trees_all_close(np.asarray(got), want, rtol=1e-10, atol=1e-12)
    back = torch_import.to_state_dict({**variables, **updates})
    for key, value in _state_dict(net).items():
      if key.endswith(("running_mean", "running_var")):
        np.testing.assert_allclose(back[key], value, rtol=1e-12, atol=1e-14, err_msg=key)


def test_flax_batchnorm_would_not_match(torch, torch_net, images_nchw):
  """The reason for TorchBatchNorm: Flax's running variance is the biased one."""
  x = torch.from_numpy(images_nchw)
  bn = torch.nn.BatchNorm2d(3).double().train()
  with torch.no_grad():
    bn(x)
  n = images_nchw.size // 3
  biased = images_nchw.var(axis=(0, 2, 3))
  np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * biased * n / (n - 1),
                             rtol=1e-12)
  assert not np.allclose(bn.running_var.numpy(), 0.9 + 0.1 * biased, rtol=1e-6)


def _qat_state_dict(net, rng):
  """The reference's QAT state_dict: step sizes beside every conv/fc and in every relu."""
  sd = _state_dict(net)
  for key in list(sd):
    if key.endswith(".weight") and sd[key].ndim in (2, 4):
      module = key[:-len(".weight")]
      sd[f"{module}.weight_quantizer.alpha"] = rng.uniform(0.05, 0.2, (1,))
      sd[f"{module}.weight_quantizer.init_state"] = np.ones((1,))
  for relu in ["relu"] + [f"layer{i}.{j}.relu" for i in range(1, 5) for j in range(2)]:
    sd[f"{relu}.quantizer.alpha"] = rng.uniform(0.2, 0.6, (1,))
    sd[f"{relu}.quantizer.init_state"] = np.ones((1,))
  return sd


@pytest.mark.slow
def test_qat_checkpoint_brings_its_step_sizes_and_exports_back(torch_net, images_nchw,
                                                               tmp_path, torch):
  sd = _qat_state_dict(torch_net, np.random.default_rng(1))
  model = _brjax_model(bits=2)
  x = jnp.asarray(images_nchw.transpose(0, 2, 3, 1), jnp.float32)
  variables, has_alphas = torch_import.load_state_dict(_template(model, x), sd)
  assert has_alphas
  params = variables["params"]
  assert params["layer2_0"]["downsample_0"]["alpha"].shape == ()
  np.testing.assert_allclose(params["layer2_0"]["downsample_0"]["alpha"],
                             sd["layer2.0.downsample.0.weight_quantizer.alpha"][0], rtol=1e-6)
  np.testing.assert_allclose(params["layer3_1"]["relu"]["alpha"],
                             sd["layer3.1.relu.quantizer.alpha"][0], rtol=1e-6)
  np.testing.assert_allclose(params["layer1_0"]["conv1"]["kernel"],
                             sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0), rtol=1e-6)
  np.testing.assert_allclose(params["fc"]["kernel"], sd["fc.weight"].T, rtol=1e-6)
  np.testing.assert_allclose(variables["batch_stats"]["bn1"]["var"], sd["bn1.running_var"],
                             rtol=1e-6)
  # Back to a state_dict: every key of the reference's, same shapes; through a .pth too.
  back = torch_import.to_state_dict(variables)
  assert set(back) == set(sd) | {k for k in back if k.endswith("num_batches_tracked")}
  for key, value in sd.items():
    assert back[key].shape == value.shape, key
    np.testing.assert_allclose(back[key], value, rtol=1e-6, err_msg=key)
  path = str(tmp_path / "qat.pth")
  torch_import.save_pth(variables, path, epoch=3, args=argparse.Namespace(num_bits=2))
  again, has_alphas = torch_import.load_pth(_template(model, x), path)
  assert has_alphas
  chex.assert_trees_all_close(again, jax.device_get(variables))


def test_reference_checkpoint_formats_are_read(torch, torch_net, tmp_path):
  sd = torch_net.state_dict()
  for name, payload in (("bare", sd), ("model", {"model_state_dict": sd, "epoch": 5,
                                                 "args": argparse.Namespace(lr=0.1)}),
                        ("state", {"state_dict": sd})):
    path = str(tmp_path / f"{name}.pth")
    torch.save(payload, path)
    got = torch_import.read_pth(path)
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["fc.weight"], sd["fc.weight"].numpy())
  torch.save({"epoch": 1}, str(tmp_path / "nothing.pth"))
  with pytest.raises(ValueError, match="holds no state_dict"):
    torch_import.read_pth(str(tmp_path / "nothing.pth"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    torch_import.read_pth(str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_pretrained_pth_starts_a_run(torch, torch_net, tmp_path):
  """``--pretrained=X.pth``: the float baseline's weights, then the recipe's alpha init."""
  path = str(tmp_path / "baseline.pth")
  torch.save({"model_state_dict": torch_net.state_dict()}, path)
  rng = np.random.default_rng(0)
  ds = input_pipeline.Dataset(
      train_images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
      train_labels=np.arange(8, dtype=np.int32) % 10,
      test_images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
      test_labels=np.arange(4, dtype=np.int32), class_names=tuple(map(str, range(10))),
      mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32))
  config = Config(recipe="reference", model="resnet18_reference", width=WIDTH, batch_size=4,
                  pretrained=path, epochs=2, warmup_epochs=1)
  model = train.create_model(config, ds.num_classes, ds.image_size)
  state = train.create_train_state(config, model, ds, steps_per_epoch=2)
  np.testing.assert_allclose(state.params["layer4_1"]["conv2"]["kernel"],
                             torch_net.state_dict()["layer4.1.conv2.weight"].numpy()
                             .transpose(2, 3, 1, 0), rtol=1e-6)
  np.testing.assert_allclose(state.batch_stats["layer2_0"]["downsample_1"]["mean"],
                             torch_net.state_dict()["layer2.0.downsample.1.running_mean"]
                             .numpy(), rtol=1e-6)
  alphas = [v for p, v in jax.tree_util.tree_leaves_with_path(state.params)
            if p[-1].key == "alpha"]
  assert len(alphas) == 21 + 9 and all(float(a) > 0 for a in alphas)
  wrong = Config(recipe="reference", model="resnet18_reference", width=2 * WIDTH,
                 batch_size=4, pretrained=path, epochs=2, warmup_epochs=1)
  with pytest.raises(ValueError, match=r"--pretrained=.*baseline.pth does not fit this model: "
                                       r"'conv1.weight' has shape \(4, 3, 3, 3\)"):
    train.create_train_state(wrong, train.create_model(wrong, 10, 32), ds, steps_per_epoch=2)


# ---------------------------------------------------------------------- without PyTorch


def _template_np():
  model = _brjax_model()
  shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _numpy_state_dict(variables):
  return torch_import.to_state_dict(variables)


def test_errors_name_the_key():
  template = _template_np()
  sd = _numpy_state_dict(template)
  torch_import.load_state_dict(template, sd)  # the full state_dict fits
  extra = dict(sd, **{"layer5.0.conv1.weight": np.zeros((1, 1, 3, 3))})
  with pytest.raises(ValueError, match=r"'layer5.0.conv1.weight' \(1, 1, 3, 3\) has no place"):
    torch_import.load_state_dict(template, extra, source="ckpt.pth")
  bad = dict(sd, **{"layer1.0.conv2.weight": np.zeros((4, 4, 1, 1))})
  with pytest.raises(ValueError, match=r"^ckpt.pth does not fit this model: "
                                       r"'layer1.0.conv2.weight' has shape \(4, 4, 1, 1\), "
                                       r"the model expects \(4, 4, 3, 3\)$"):
    torch_import.load_state_dict(template, bad, source="ckpt.pth")
  missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
  with pytest.raises(ValueError, match="has no 'layer3.1.bn2.running_var'"):
    torch_import.load_state_dict(template, missing)
  with pytest.raises(ValueError, match="has no 'fc.bias'"):
    torch_import.load_state_dict(template, {k: v for k, v in sd.items() if k != "fc.bias"})


def test_partial_step_sizes_are_refused():
  model = _brjax_model(bits=2)
  shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  template = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
  sd = _numpy_state_dict(template)
  _, has_alphas = torch_import.load_state_dict(template, sd)
  assert has_alphas
  del sd["layer2.1.relu.quantizer.alpha"]
  with pytest.raises(ValueError, match="holds 29 of the model's 30 step sizes: it has no "
                                       "'layer2.1.relu.quantizer.alpha'"):
    torch_import.load_state_dict(template, sd)


def test_brjax_imports_without_torch_and_says_what_is_missing(tmp_path):
  code = ("import sys; sys.modules['torch'] = None\n"
          "import brjax, brjax.training.train, brjax.export.torch_import as t\n"
          "try:\n  t.read_pth('x.pth')\n"
          "except ImportError as e:\n  print(e)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, cwd=tmp_path,
                        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                            os.path.dirname(os.path.abspath(__file__))))})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == ("reading or writing .pth files needs PyTorch, which is not "
                                 "installed: pip install 'brjax[torch]' (or pip install torch)")
