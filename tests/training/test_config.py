"""Tests of brjax.training.config: every flag value out of range is one clear ValueError."""

import dataclasses

import pytest

from brjax.training.config import Config


def test_defaults_are_valid_and_named():
  config = Config()
  assert config.quantized
  assert config.name == "resnet20_W2A2_lw1_la1_s42"
  assert Config(bits_w=32, bits_a=32).name == "resnet20_float_s42"
  assert not Config(bits_w=32, bits_a=32).quantized
  assert Config(bits_w=4, bits_a=8).name.startswith("resnet20_W4A8")


@pytest.mark.parametrize("field,value,accepted", [
    ("bits_w", 0, "1..8, or 32"),
    ("bits_w", 16, "1..8, or 32"),
    ("bits_a", 9, "1..8, or 32"),
    ("bits_a", 2.0, "1..8, or 32"),
    ("lambda_w", -0.1, ">= 0"),
    ("lambda_a", -1.0, ">= 0"),
    ("lambda_a", float("nan"), ">= 0"),
    ("weight_decay", -1e-4, ">= 0"),
    ("lr", 0.0, "> 0"),
    ("momentum", 1.0, r"\[0, 1\)"),
    ("epochs", 0, ">= 1"),
    ("warmup_epochs", -1, "0..100"),
    ("warmup_epochs", 101, "0..100"),
    ("batch_size", 0, ">= 1"),
    ("train_examples", -5, ">= 0"),
    ("test_examples", -1, ">= 0"),
    ("model", "vgg16", "resnet8, resnet14, resnet20"),
    ("clip", -6.0, "positive"),
    ("br_alpha_grad_w", "scaled", "full, lsq, none"),
    ("abr_clipped", "drop", "include, exclude"),
    ("alpha_param", "exp", "linear, log"),
    ("br_schedule", "linear", "constant, cosine"),
    ("br_ramp_epochs", 0, ">= 1 with --br_schedule=cosine"),
    ("br_ramp_epochs", -1, "integer >= 1"),
    ("alpha_lr_scale", -0.5, ">= 0"),
    ("alpha_weight_decay", -1.0, ">= 0"),
    ("data_dir", "/no/such/folder", "train/<class>/"),
    ("pretrained", "/no/such/run", "checkpoints/"),
])
def test_bad_values(field, value, accepted):
  with pytest.raises(ValueError, match=rf"^--{field}={value} is not accepted: .*{accepted}"):
    Config(**{field: value})


def test_pretrained_needs_checkpoints_folder(tmp_path):
  with pytest.raises(ValueError, match="--pretrained="):
    Config(pretrained=str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  assert Config(pretrained=str(tmp_path)).pretrained == str(tmp_path)


def test_paper_models_keep_their_own_activations():
  assert Config(model="mobilenet_v2").model == "mobilenet_v2"
  with pytest.raises(ValueError, match="^--clip=6.0 is not accepted: .*CIFAR ResNet"):
    Config(model="resnet50", clip=6.0)


def test_choices_without_jax_are_the_libraries():
  from brjax.quant import regularizer  # pylint: disable=g-import-not-at-top
  from brjax.training import config
  assert config.ABR_CLIPPED == regularizer.CLIPPED
  assert config.ALPHA_GRADS_W == regularizer.ALPHA_GRADS_W
  fields = {f.name for f in dataclasses.fields(Config)}
  assert config.BR_PHASE_FIELDS <= fields
  from brjax.models import paper  # pylint: disable=g-import-not-at-top
  assert config.ACT_SIGNS == paper.ACT_SIGNS and config.PAPER_MODELS == tuple(paper.MODELS)


@pytest.mark.parametrize("settings", [dict(act_signs="sideways"), dict(act_signs="data"),
                                      dict(act_signs="data", model="resnet50", bits_a=1),
                                      dict(act_signs="data", model="resnet50", bits_a=32)])
def test_act_signs_is_checked(settings):
  """Signs from the data: the papers' models (quantized by rules), 2..8-bit inputs."""
  with pytest.raises(ValueError, match=rf"^--act_signs={settings['act_signs']} is not "
                                       "accepted: use architecture, or data with one of "
                                       r"resnet18_imagenet, .* --bits_a in 2..8"):
    Config(**settings)


def test_act_signs_data_is_named_and_said_in_the_banner():
  from brjax.training import report  # pylint: disable=g-import-not-at-top
  config = Config(model="resnet50", bits_w=4, bits_a=4, act_signs="data")
  assert config.name == "resnet50_W4A4_lw1_la1_datasigns_s42"
  assert report.layers_line(config).endswith(
      "; input signs from the init batch (--act_signs=data)")
  assert "signs" not in report.layers_line(Config(model="resnet50"))


def test_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    Config().bits_w = 4  # type: ignore[misc]


def test_warmup_bound_applies_to_quantized_runs_only():
  """A float run has no warmup phase: `--bits=32 --epochs=10` needs no --warmup_epochs."""
  assert Config(bits_w=32, bits_a=32, epochs=10).warmup_epochs == 30
  with pytest.raises(ValueError, match=r"^--warmup_epochs=30 is not accepted: .*0\.\.10"):
    Config(bits_w=2, bits_a=32, epochs=10)
  with pytest.raises(ValueError, match=r"^--warmup_epochs=-1 is not accepted"):
    Config(bits_w=32, bits_a=32, epochs=10, warmup_epochs=-1)


def test_a_checkpoint_from_before_a_field_existed_resumes():
  """Configs saved before the recipe and A-BR site fields resume as the brjax recipe."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from brjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  old = dataclasses.asdict(Config())
  for newer in ("recipe", "optimizer", "schedule", "abr_layers", "abr_exclude_first"):
    old.pop(newer)
  checkpoint.check_compatible(old, Config(), "old")
  with pytest.raises(checkpoint.CheckpointError, match="--recipe='brjax' there"):
    checkpoint.check_compatible(old, Config(recipe="reference"), "old")
  with pytest.raises(checkpoint.CheckpointError, match="--abr_layers=None there"):
    checkpoint.check_compatible(old, Config(abr_layers="Block"), "old")


def test_abr_layers_must_be_a_regex():
  with pytest.raises(ValueError, match=r"--abr_layers=\( is not accepted: use a regular"):
    Config(abr_layers="(")


@pytest.mark.parametrize("field", ["br_alpha_grad_a", "freeze_alpha_w", "freeze_alpha_a",
                                   "per_channel", "abr_exclude_first", "abr_exclude_last"])
@pytest.mark.parametrize("value", ["yes", "false", 1, None])
def test_switches_are_bools(field, value):
  """A switch given ``"false"`` or ``1`` (a config built in code, a JSON file) was taken for
  its truth value without a word; ``br_losses`` validates the same switch."""
  with pytest.raises(ValueError, match=rf"^--{field}={value} is not accepted: use true or "
                                       "false"):
    Config(**{field: value})


def test_per_channel_needs_quantized_weights():
  with pytest.raises(ValueError, match=r"^--per_channel=True is not accepted: .*quantized "
                                       r"weights \(--bits_w=32 keeps them float\)"):
    Config(bits_w=32, per_channel=True)
  assert Config(bits_w=4, per_channel=True).per_channel


def test_br_lambdas_are_what_the_run_computes():
  assert Config().br_lambdas == (1.0, 1.0)
  assert Config(bits_a=32, lambda_a=1.0).br_lambdas == (1.0, 0.0)
  assert Config(bits_w=32, lambda_w=0.5, lambda_a=2.0).br_lambdas == (0.0, 2.0)


def test_numpy_numbers_are_taken_as_python_numbers():
  """``--bits_w=4 is not accepted: use an integer in 1..8`` said a config given
  ``np.int64(4)``; the values are stored as Python numbers (the meta is JSON)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = Config(bits_w=np.int64(4), lambda_a=np.float32(0.5), epochs=np.int32(3),
                  warmup_epochs=1)
  assert (config.bits_w, config.lambda_a, config.epochs) == (4, 0.5, 3)
  assert (type(config.bits_w), type(config.lambda_a), type(config.epochs)) == (int, float, int)
  assert Config(per_channel=np.bool_(True)).per_channel is True


@pytest.mark.parametrize("settings", [dict(first_last_bits=9), dict(first_last_bits=0),
                                      dict(first_last_bits=8, bits_w=32, bits_a=32),
                                      dict(first_last_bits=8, model="resnet18_reference")])
def test_first_last_bits_is_checked(settings):
  value = settings["first_last_bits"]
  with pytest.raises(ValueError, match=rf"^--first_last_bits={value} is not accepted: use an "
                                       r"integer in 1\.\.8, or 32 for float, with a quantized"):
    Config(**settings)


def test_first_last_bits_is_named_and_said_in_the_banner():
  from brjax.training import report  # pylint: disable=g-import-not-at-top
  assert Config().name == "resnet20_W2A2_lw1_la1_s42"  # unset: the names runs had
  config = Config(first_last_bits=8)
  assert config.name == "resnet20_W2A2_fl8_lw1_la1_s42"
  assert report.layers_line(config) == (
      "conv_init W8 (its input, the image, float), the dense layer W8 with its input A8 "
      "(--first_last_bits); the rest W2A2")
  assert report.layers_line(Config()) == "every layer W2A2 (the image input of conv_init float)"
  assert report.layers_line(Config(model="mobilenet_v2")).startswith(
      "stem W8 (its input, the image, A8), classifier W8")  # the papers' models: 8 unset
  assert report.layers_line(Config(bits_w=32, first_last_bits=4)).startswith(
      "conv_init float (its input, the image, float), the dense layer float with its input A4")
