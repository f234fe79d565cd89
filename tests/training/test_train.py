"""Tests of brjax.training.train and the modules it calls (steps, parallel, report) and of
brjax.training.checkpoint: steps, phases, the banner, checkpoints, resume."""

import dataclasses
import functools
import json
import os
import re
import shutil

import chex
from conftest import tiny_config
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brjax.data import input_pipeline
from brjax.models import cifar as models
from brjax.quant import lsq as quant
from brjax.quant import regularizer, sites
from brjax.training import checkpoint, evaluation, optim, parallel, report, steps, train
from brjax.training.config import Config

EPOCH_LINE = re.compile(
    r"^Epoch (\d+)/(\d+) \[(WARMUP|BR|FLOAT)\] \(LR=\d+\.\d{6}\): Train Acc=\d+\.\d{2}%, "
    r"Test Acc=\d+\.\d{2}%(, BR_W=\d+\.\d{6}, BR_A=\d+\.\d{6})? "
    r"\(took \w+(; run: about \w+ left)?\)$")


def _synthetic_dataset(n=64, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = (np.arange(n) % classes).astype(np.int32)
  return input_pipeline.Dataset(images, labels, images[:16], labels[:16],
                                tuple(str(i) for i in range(classes)),
                                np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))


@pytest.fixture(scope="module")
def small_setup():
  config = Config(model="resnet8", batch_size=16, epochs=2, warmup_epochs=1,
                  freeze_alpha_w=True, freeze_alpha_a=True, weight_decay=0.0)
  ds = _synthetic_dataset()
  model = models.create_model("resnet8", bits_w=2, bits_a=2)
  state = train.create_train_state(config, model, ds, steps_per_epoch=4)
  batch = next(input_pipeline.train_batches(ds, 16, seed=0, epoch=1))
  return config, model, state, batch


def test_phases():
  config = Config(epochs=5, warmup_epochs=2)
  assert [steps.phase_of(config, e) for e in range(1, 6)] == ["WARMUP"] * 2 + ["BR"] * 3
  assert steps.phase_of(Config(bits_w=32, bits_a=32), 1) == "FLOAT"
  assert steps.br_settings(config, "WARMUP") == steps.BRSettings()
  assert steps.br_settings(Config(bits_w=32, bits_a=4), "BR").lambda_w == 0.0


def test_banner_names_the_start_and_shows_only_settings_in_use():
  banner = functools.partial(report.banner, topology=parallel.Topology.create(),
                             ds=_synthetic_dataset())
  text = banner(Config(lambda_a=0.0))
  assert "A-BR (activations): lambda=0 [DISABLED]" in text and "--br_alpha_grad_a" not in text
  assert "Start: random initialization" in text
  assert "gradients to alpha: False (--br_alpha_grad_a)" in banner(Config())
  baseline = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints",
                          "resnet20_float_cifar10")
  text = banner(Config(pretrained=baseline))
  assert (f"Start: weights of --pretrained={baseline} (best checkpoint, epoch 10, best test acc "
          "82.03%), step sizes initialized the LSQ way") in text


def test_banner_says_what_the_run_computes():
  """A BR term whose side is float (32 bits) is not computed: the banner says so, as every
  epoch line does (``BR_A=off``); flags that the run will not use are named."""
  banner = functools.partial(report.banner, topology=parallel.Topology.create(),
                             ds=_synthetic_dataset())
  text = banner(Config(bits_a=32, lambda_a=1.0))
  assert "A-BR (activations): lambda=1 [DISABLED: --bits_a=32, activations are float]" in text
  assert "W-BR (weights): lambda=1 [ENABLED]" in text and "--br_alpha_grad_a" not in text
  text = banner(Config(bits_w=32, lambda_w=1.0))
  assert "W-BR (weights): lambda=1 [DISABLED: --bits_w=32, weights are float]" in text
  text = banner(Config(epochs=3, warmup_epochs=3))
  assert "W-BR (weights): lambda=1 [DISABLED: no BR phase (--warmup_epochs=3)]" in text
  text = banner(Config(lambda_a=0.0, abr_layers="NOMATCH", abr_exclude_last=True))
  assert ("    └─> not used: --abr_layers=NOMATCH, --abr_exclude_last (A-BR is off)"
          in text), text
  text = banner(Config(freeze_alpha_w=True, warmup_epochs=0))
  assert ("    └─> --warmup_epochs=0: the frozen step sizes keep their LSQ init from step 1 "
          "(they never learn)") in text
  assert "never learn" not in banner(Config(freeze_alpha_w=True, warmup_epochs=1))


def test_banner_says_a_quantized_pretrained_run_loses_its_step_sizes(tmp_path):
  ckpts = checkpoint.RunCheckpoints(str(tmp_path / "qat"))
  config = Config(bits_w=2, bits_a=4)
  ckpts.save(3, {"params": {"x": np.zeros(2, np.float32)}},
             {"epoch": 3, "best_test_acc": 50.0, "config": dataclasses.asdict(config)},
             is_best=True)
  ckpts.close()
  text = report.banner(Config(pretrained=str(tmp_path / "qat")), parallel.Topology.create(),
                       _synthetic_dataset())
  assert ("(best checkpoint, epoch 3, best test acc 50.00%; a W2A4 run: its step sizes are "
          "not used), step sizes initialized the LSQ way") in text, text


def test_banner_of_a_pth_start(tmp_path):
  """``--pretrained=X.pth`` is no workdir: the banner names the file, not a checkpoint (it
  raised "holds no checkpoint" after the whole setup)."""
  path = tmp_path / "baseline.pth"
  path.write_bytes(b"")
  text = report.banner(Config(model="resnet18_reference", pretrained=str(path)),
                       parallel.Topology.create(), _synthetic_dataset())
  assert (f"Start: weights of --pretrained={path} (a PyTorch state_dict), step sizes from it "
          "if it holds every one, else initialized the LSQ way") in text


def _scatter_count(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return str(jaxpr).count("scatter-add")


@pytest.mark.slow
def test_loss_terms_and_no_abr_work_without_lambda_a(small_setup):
  config, model, state, batch = small_setup
  plain = steps.BRSettings()
  both = steps.BRSettings(lambda_w=0.5, lambda_a=2.0)
  w_only = steps.BRSettings(lambda_w=0.5, lambda_a=0.0)
  step = jax.jit(steps.train_step, static_argnums=2)
  _, m0 = step(state, batch, plain)
  _, m2 = step(state, batch, both)
  n = batch["label"].shape[0]
  _, recorded = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                 mutable=["quant", "batch_stats"]))(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["image"])
  br_w = regularizer.weight_br(recorded["quant"])
  br_a = regularizer.activation_br(recorded["quant"])
  np.testing.assert_allclose(m2["br_w"] / n, br_w, rtol=1e-5)
  np.testing.assert_allclose(m2["br_a"] / n, br_a, rtol=1e-5)
  np.testing.assert_allclose(m2["loss"] / n, m0["ce"] / n + 0.5 * br_w + 2.0 * br_a, rtol=1e-5)
  assert float(m0["br_w"]) == 0 and float(m0["br_a"]) == 0
  # lambda_a = 0: no A-BR histogram is built (one scatter per kernel).
  counts = {name: _scatter_count(lambda st, b, s=s: steps.train_step(st, b, s), state, batch)
            for name, s in [("plain", plain), ("w_only", w_only), ("both", both)]}
  per_tensor = _scatter_count(lambda v: regularizer.bin_regularization(v, 0.1, -2, 1),
                              jnp.ones((64,)))
  assert per_tensor >= 1
  # ResNet-8: 7 3x3 convs, 2 projections and the dense; 7 ReLUs.
  assert counts["w_only"] - counts["plain"] == 10 * per_tensor, counts
  assert counts["both"] - counts["w_only"] == 7 * per_tensor, counts


@pytest.mark.slow
def test_frozen_alphas_stay_put_in_the_br_phase(small_setup):
  config, _, state, batch = small_setup
  state = state.replace(tx=optim.create_optimizer(config, 4, optim.frozen_labels(config)))
  topology = parallel.Topology.create()
  step = parallel.jit_train_step(topology, steps.br_settings(config, "BR"))
  before = jax.device_get(state.params)
  new_state, _ = step(jax.device_put(state, topology.replicated), batch)
  after = jax.device_get(new_state.params)
  labels = optim.param_labels(before)
  for label, b, a in zip(jax.tree.leaves(labels), jax.tree.leaves(before),
                         jax.tree.leaves(after)):
    if label == "weights":
      continue
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(after["conv_init"]["kernel"], before["conv_init"]["kernel"])


def test_tiny_run_log_metrics_checkpoints_and_compiles(tiny_record):
  epoch_lines = [l for l in tiny_record.log if l.startswith("Epoch ")]
  assert len(epoch_lines) == 2
  assert all(EPOCH_LINE.match(l) for l in epoch_lines), epoch_lines
  assert "[WARMUP]" in epoch_lines[0] and "BR_W" not in epoch_lines[0]
  assert "[BR]" in epoch_lines[1] and "BR_A=" in epoch_lines[1]
  assert any("BR PHASE" in l or "FREEZING ALPHA" in l for l in tiny_record.log)
  banner = "\n".join(tiny_record.log[:2])
  assert "W-BR (weights): lambda=1 [ENABLED]" in banner
  with open(os.path.join(tiny_record.workdir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  assert [m["epoch"] for m in lines] == [1, 2]
  assert [m["phase"] for m in lines] == ["WARMUP", "BR"]
  assert lines[1]["br_w"] > 0 and lines[1]["br_a"] > 0
  assert lines[0]["br_w"] is None and lines[0]["br_a"] is None  # not computed in warmup
  quant_metrics = lines[1]["quant"]
  assert len(quant_metrics["weights"]) == 10 and len(quant_metrics["activations"]) == 7
  assert set(quant_metrics["weights"]["conv_init"]) >= {"alpha", "mse", "near_frac",
                                                        "occupancy"}
  assert lines[-1] == tiny_record.metrics
  ckpt = os.path.join(tiny_record.workdir, "checkpoints")
  assert sorted(os.listdir(os.path.join(ckpt, "latest"))) == ["1", "2"]
  assert len(os.listdir(os.path.join(ckpt, "best"))) == 1
  # Each phase's step compiles once, the eval step once, for the whole run.
  assert tiny_record.compiles["train_step"] == 2, tiny_record.compiles
  assert tiny_record.compiles["eval_step"] == 1, tiny_record.compiles


def _copy_run(tiny_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  return workdir


def _fake_run(workdir, config, epochs_done, best_test_acc=12.5):
  """A workdir whose checkpoints are epochs 1..epochs_done of ``config``, without training:
  a tiny state, the meta train_and_evaluate writes, and one metrics line per epoch."""
  ckpts = checkpoint.RunCheckpoints(str(workdir))
  for epoch in range(1, epochs_done + 1):
    ckpts.save(epoch, {"x": np.zeros(2, np.float32)},
               {"epoch": epoch, "best_test_acc": best_test_acc,
                "config": dataclasses.asdict(config)}, is_best=epoch == 1)
  ckpts.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for epoch in range(1, epochs_done + 1):
      f.write(json.dumps({"epoch": epoch, "test_acc": best_test_acc}) + "\n")


@pytest.fixture(name="no_data")
def no_data_fixture(tmp_path):
  """A --data_dir that exists but holds no images: loading it is an error."""
  path = tmp_path / "no_images"
  path.mkdir()
  return str(path)


def test_finished_run_without_resume_says_nothing_is_left(tmp_path, no_data):
  config = tiny_config(no_data)
  _fake_run(tmp_path / "run", config, epochs_done=2)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"holds a finished run \(all 2 epochs, best test acc 12.50%\): "
                           "nothing is left to continue"):
    train.train_and_evaluate(config, str(tmp_path / "run"), log=lambda _: None)


def test_unfinished_run_without_resume_asks_for_resume(tmp_path, no_data):
  config = tiny_config(no_data)
  _fake_run(tmp_path / "run", config, epochs_done=1)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"already holds checkpoints \(epoch 1 of 2\): pass --resume"):
    train.train_and_evaluate(config, str(tmp_path / "run"), log=lambda _: None)


def test_resume_of_a_finished_run_says_so_and_does_no_work(tmp_path, no_data):
  config = tiny_config(no_data)  # loading its data would fail: nothing is loaded
  _fake_run(tmp_path / "run", config, epochs_done=2)
  log = []
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"), resume=True,
                                     log=log.append)
  assert metrics == {"epoch": 2, "test_acc": 12.5}
  assert len(log) == 1 and "has finished all 2 epochs (best test acc 12.50%): nothing to " \
      "resume" in log[0], log


def test_resume_without_checkpoint_says_so_and_a_data_error_leaves_no_workdir(tmp_path,
                                                                             no_data):
  workdir = tmp_path / "new_run"
  log = []
  with pytest.raises(ValueError, match="no_images"):
    train.train_and_evaluate(tiny_config(no_data), str(workdir), resume=True, log=log.append)
  assert log == [f"--resume: {workdir} holds no checkpoint (no epoch of a run there "
                 "finished): starting from epoch 1"]
  assert not workdir.exists()


def test_unfinished_saves_are_removed_and_finished_checkpoints_kept(tmp_path):
  _fake_run(tmp_path, tiny_config(str(tmp_path)), epochs_done=1)
  latest = tmp_path / "checkpoints" / "latest"
  (latest / "2.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)  # a kill mid-save
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))  # orbax removes stale ones before a save
  ckpts.save(2, {"x": np.ones(2, np.float32)}, {"epoch": 2}, is_best=False)
  ckpts.wait()  # saves are asynchronous
  assert sorted(os.listdir(latest)) == ["1", "2"]
  stale = latest / "3.orbax-checkpoint-tmp-5678"  # as a second Ctrl-C within a save leaves it
  stale.mkdir()
  assert ckpts.remove_unfinished() == [str(stale)]
  ckpts.close()
  assert sorted(os.listdir(latest)) == ["1", "2"] and ckpts.latest_epoch() == 2


def test_incompatible_resume_is_refused_before_work(tiny_run, tmp_path, cifar_dir):
  workdir = _copy_run(tiny_run, tmp_path)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest")))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"incompatible run \(--bits_w=2 there, --bits_w=4 here\)"):
    train.train_and_evaluate(tiny_config(cifar_dir, bits_w=4), workdir, resume=True,
                             log=lambda _: None)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == before


def test_corrupt_checkpoint_is_a_clear_error_and_the_good_ones_stay(tiny_run, tmp_path,
                                                                    cifar_dir):
  workdir = _copy_run(tiny_run, tmp_path)
  broken = os.path.join(workdir, "checkpoints", "latest", "2", "state")
  for root, _, files in os.walk(broken):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  # Resuming a finished run reads no state; reading the broken one is a clear error.
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"latest/2 could not be read .*epochs \[1\]\) are kept"):
    evaluation.evaluate_run(workdir, prefer="latest")
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "latest", "1"))
  # Moving the broken one away resumes from the good one.
  shutil.move(os.path.join(workdir, "checkpoints", "latest", "2"), str(tmp_path / "broken"))
  metrics = train.train_and_evaluate(tiny_config(cifar_dir), workdir, resume=True,
                                     log=lambda _: None)
  assert metrics["epoch"] == 2
  for key in ("train_acc", "test_acc", "br_w", "br_a", "train_loss", "lr"):
    assert metrics[key] == pytest.approx(tiny_run[1][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_pretrained_float_weights_and_lsq_alpha_init(tmp_path):
  ds = _synthetic_dataset()
  float_config = Config(model="resnet8", bits_w=32, bits_a=32, batch_size=16)
  float_model = models.create_model("resnet8")
  float_state = train.create_train_state(float_config, float_model, ds, 4)
  # Make the float weights and BatchNorm statistics distinctive.
  float_state = float_state.replace(
      params=jax.tree.map(lambda p: p * 1.5 + 0.01, float_state.params),
      batch_stats=jax.tree.map(lambda s: s + 0.2, float_state.batch_stats))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  ckpts.save(1, float_state, {"epoch": 1, "config": {}}, is_best=True)
  ckpts.close()

  config = Config(model="resnet8", batch_size=16, pretrained=str(tmp_path))
  model = models.create_model("resnet8", bits_w=4, bits_a=4)
  state = train.create_train_state(config, model, ds, 4)
  flat = flax.traverse_util.flatten_dict(state.params)
  flat_float = flax.traverse_util.flatten_dict(float_state.params)
  for path, value in flat_float.items():
    np.testing.assert_array_equal(flat[path], value)
  chex.assert_trees_all_close(state.batch_stats, float_state.batch_stats)
  _, qp = quant.qrange(4, signed=True)
  for path, value in flat.items():
    if path[-1] == "alpha" and path[:-1] + ("kernel",) in flat:
      np.testing.assert_allclose(value, quant.init_alpha(flat[path[:-1] + ("kernel",)], qp),
                                 rtol=1e-5)  # init_alphas runs jitted: float rounding

  wrong = Config(batch_size=16, pretrained=str(tmp_path), model="resnet14")
  with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
    train.create_train_state(wrong, models.create_model("resnet14", bits_w=4, bits_a=4), ds, 4)


@pytest.mark.slow
def test_w2a2_resnet_learns_on_a_cifar_subset(cifar_dir, tmp_path):
  """A real learning test: W2A2 ResNet-8 from scratch, 2 warmup + 1 BR epochs on 3,000 images.

  ResNet-8 (ResNet-20's family, one block a stage) learns like ResNet-20 here at a third of
  its compile and step time. Measured here (2-core CPU, 2026-12-07): best test accuracy
  23.4%, 21.6% after the BR epoch (the default seed; seed 1: 25.5% and 24.2%), on 1,000
  test images (chance: 10%, one standard error: ~1.3 points); ResNet-20 on 4,000 images
  reached 24.7% and 24.2%.
  """
  config = tiny_config(cifar_dir, epochs=3, warmup_epochs=2, train_examples=3000,
                       test_examples=1000, batch_size=100, lr=0.1)
  metrics = train.train_and_evaluate(config, str(tmp_path), log=lambda _: None)
  assert metrics["best_test_acc"] >= 18.0, metrics
  assert metrics["test_acc"] >= 16.0, metrics  # the BR epoch keeps what the warmup learned
  assert metrics["ce"] < 2.3  # cross-entropy below log(10): it has learned something


def test_tensorboard_events_are_read_by_tensorboard(tiny_record):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(os.path.join(tiny_record.workdir, "tensorboard"),
                                           size_guidance={"histograms": 0, "scalars": 0})
  acc.Reload()
  tags = acc.Tags()
  scalars, histograms = set(tags["scalars"]), set(tags["histograms"])
  assert {"metrics/test_acc", "metrics/br_w", "metrics/lr", "alpha/conv_init",
          "alpha/act_init"} <= scalars
  assert [e.step for e in acc.Scalars("metrics/test_acc")] == [1, 2]
  assert acc.Scalars("metrics/test_acc")[-1].value == pytest.approx(
      tiny_record.metrics["test_acc"], rel=1e-6)
  assert {"weights/conv_init", "quantized_weights/conv_init", "activations/act_init"} <= \
      histograms
  assert len([t for t in histograms if t.startswith("activations/")]) == 7  # ResNet-8's


@pytest.mark.slow
def test_abr_site_selection():
  config = Config(batch_size=4)
  x = jnp.ones((4, 32, 32, 3))
  model = models.create_model("resnet20", bits_w=2, bits_a=2)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  every = steps.activation_sites(model, shapes, x)  # traced only: shapes suffice
  assert len(every) == 19 and every[0] == "act_init" and every[-1] == "BasicBlock_8/QuantReLU_1"
  assert steps.select_abr_sites(config, every) is None  # no selection: every site
  pick = lambda **kw: steps.select_abr_sites(dataclasses.replace(config, **kw), every)
  assert pick(abr_layers="BasicBlock_8/") == ["BasicBlock_8/QuantReLU_0",
                                              "BasicBlock_8/QuantReLU_1"]
  assert pick(abr_exclude_first=True, abr_exclude_last=True) == every[1:-1]
  with pytest.raises(ValueError, match="selects no activation site of resnet20; its sites "
                                       "are: act_init, "):
    pick(abr_layers="act_init", abr_exclude_first=True)
  # The step's A-BR sums exactly the selected sites (a small ResNet: the same names).
  small = models.CifarResNet(stage_sizes=(1, 1), stage_filters=(4, 8),
                             conv=functools.partial(quant.QuantConv, bits=2),
                             dense=functools.partial(quant.QuantDense, bits=2),
                             act=functools.partial(quant.QuantReLU, bits=2))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = small.init(jax.random.key(1), x)
  chosen = ["BasicBlock_1/QuantReLU_0", "act_init"]
  settings = steps.br_settings(config, steps.BR, chosen)
  _, recorded = small.apply(variables, x, train=True, mutable=["quant", "batch_stats"])
  want = sum(regularizer.site_br(s, alpha_grad=False)
             for path, _, s in sites.iterate(recorded["quant"], ("output",)) if path in chosen)
  assert len(list(sites.iterate(recorded["quant"], ("output",)))) == 5
  np.testing.assert_allclose(regularizer.activation_br(recorded["quant"],
                                                       layers=settings.abr_layers), want,
                             rtol=1e-6)


@pytest.mark.slow
def test_abr_clipped_reaches_the_step_and_the_banner():
  """--abr_clipped=exclude: the BR step's A-BR leaves values above the range out; the
  warmup step is the same for both settings; the banner says which."""
  config = Config(batch_size=4, abr_clipped="exclude")
  assert steps.br_settings(config, steps.BR).abr_clipped == "exclude"
  assert steps.br_settings(config, steps.WARMUP) == steps.BRSettings()
  small = models.CifarResNet(stage_sizes=(1,), stage_filters=(4,),
                             conv=functools.partial(quant.QuantConv, bits=2),
                             dense=functools.partial(quant.QuantDense, bits=2),
                             act=functools.partial(quant.QuantReLU, bits=2))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = small.init(jax.random.key(1), x)
  state = steps.TrainState.create(apply_fn=small.apply, params=variables["params"],
                                  tx=optim.create_optimizer(config, 1),
                                  batch_stats=variables["batch_stats"], rng=jax.random.key(2))
  batch = {"image": x * 3.0, "label": jnp.arange(4) % 10}  # wide inputs: values clip
  _, recorded = small.apply(variables, batch["image"], train=True,
                            mutable=["quant", "batch_stats"])
  for mode in ("include", "exclude"):
    br = steps.br_settings(dataclasses.replace(config, abr_clipped=mode), steps.BR)
    _, m = steps.train_step(state, batch, br)
    want = regularizer.activation_br(recorded["quant"], clipped=mode)
    np.testing.assert_allclose(m["br_a"] / 4, want, rtol=1e-5)
  assert float(regularizer.activation_br(recorded["quant"], clipped="exclude")) != float(
      regularizer.activation_br(recorded["quant"]))
  text = report.banner(config, parallel.Topology.create(), _synthetic_dataset())
  assert ("    └─> values above the top level: left out of every bin (--abr_clipped)"
          in text)
  assert "counted in the top bin (the paper's) (--abr_clipped)" in report.banner(
      Config(abr_clipped="include"), parallel.Topology.create(), _synthetic_dataset())
  assert "left out of every bin" in report.banner(  # brjax's default (issue 29)
      Config(), parallel.Topology.create(), _synthetic_dataset())
  assert ("step sizes log (lr x0.1)" in text
          and "BR weight cosine ramp over 5 BR epochs" in text)  # the Recipe line


def test_a_diverged_epoch_stops_the_run_with_the_remedies():
  from brjax.training import run_control  # pylint: disable=g-import-not-at-top
  run_control.check_finite(3, {"train_loss": 1.5}, 2)
  m = {"train_loss": float("nan"), "ce": 3.7, "br_w": float("nan"), "br_a": None}
  with pytest.raises(run_control.Diverged,
                     match=r"^epoch 3 diverged: .* nan \(ce=3\.7, br_w=nan\); the epoch was "
                           r"not saved, the checkpoint of epoch 2 is kept: lower --lr"):
    run_control.check_finite(3, m, 2)
  with pytest.raises(run_control.Diverged, match="no checkpoint was saved"):
    run_control.check_finite(1, {"train_loss": float("inf")}, None)
  run_control.check_step_sizes(2, {"conv/alpha": 0.1, "relu/alpha": 1e-3}, 1)
  with pytest.raises(run_control.Diverged,
                     match=r"^epoch 2 diverged: step sizes went to zero or below \(conv/alpha="
                           r"-1\.68, relu/alpha=0\): their layers output zeros; the epoch"):
    run_control.check_step_sizes(2, {"conv/alpha": -1.68, "relu/alpha": 0.0, "ok": 1.0}, 1)


def test_a_diverged_message_is_read_back_from_the_line_train_py_prints():
  from brjax.training import run_control  # pylint: disable=g-import-not-at-top
  with pytest.raises(run_control.Diverged) as caught:
    run_control.check_step_sizes(6, {"a/alpha": -0.5851, "b/alpha": 0.2}, 5)
  what = "step sizes went to zero or below (a/alpha=-0.5851): their layers output zeros"
  assert (caught.value.epoch, caught.value.what) == (6, what)
  assert run_control.parse_diverged(f"error: {caught.value}\n") == (6, what)
  assert run_control.parse_diverged(str(caught.value)) == (6, what)
  for other in ("error: --lr=0 is not accepted", "Epoch 6/20: 99%", "",
                "error: epoch 6 diverged"):
    assert run_control.parse_diverged(other) is None


def test_paper_models_are_built_by_their_rules_at_the_data_size():
  config = Config(model="resnet50", bits_w=4, bits_a=4)
  small = train.create_model(config, 10, 32)
  large = train.create_model(config, 10, 224)
  assert small.small_inputs and not large.small_inputs
  assert type(small).__name__ == "ResNet"  # the model's own class, quantized
  float_model = train.create_model(Config(model="mobilenet_v2", bits_w=32, bits_a=32), 10, 32)
  assert type(float_model).__module__ == "brjax.models.paper"
  with pytest.raises(ValueError, match="needs the run's image size"):
    models.from_run_config(config, 10)
