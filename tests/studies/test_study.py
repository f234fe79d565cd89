"""brjax.studies.study, brjax.studies.summary and brjax.studies.runner without training anything.

The command line and a real study are tests/studies/test_experiments.py's; here the plan, the
run states, results and summaries are built from files written by the test.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from brjax.studies import results as study_results
from brjax.studies import runner as study_runner
from brjax.studies import study
from brjax.studies import summary as study_summary
from brjax.training import history
from brjax.training.config import BR_PHASE_FIELDS, Config

REPO = pathlib.Path(__file__).resolve().parents[2]


def flags(**overrides) -> dict:
  values = {"bits": 2, "seeds": ["0", "1"], "configs": ["lsq", "lsq_br"], "warmup_epochs": 1,
            "epochs": 2, "lr": 0.01, "batch_size": 32, "train_examples": 64,
            "test_examples": 32, "pretrained": None, "data_dir": None}
  values.update(overrides)
  return study.check_study(values)


def test_check_study_parses_lists_and_records_paths_from_the_repository(tmp_path):
  checked = flags(seeds=[" 2", "0"], data_dir=str(REPO.parent / "shared" / "d.tar.gz"))
  assert checked["seeds"] == [2, 0] and checked["configs"] == ["lsq", "lsq_br"]
  assert checked["data_dir"] == os.path.join(os.pardir, "shared", "d.tar.gz")
  assert set(checked) == set(study.STUDY_FLAGS)
  for bad, message in ((dict(seeds=["0", "0"]), "--seeds=0,0"),
                       (dict(configs=["lsq", "bogus"]), "--configs=lsq,bogus"),
                       (dict(bits=32), "--bits=32")):
    with pytest.raises(study.StudyError, match=message):
      flags(**bad)


def test_plan_goes_seed_by_seed_with_each_configs_lambdas(tmp_path):
  runs = study.plan(str(tmp_path), flags())
  assert [r.name for r in runs] == ["lsq_s0", "lsq_br_s0", "lsq_s1", "lsq_br_s1"]
  run = runs[1]
  assert run.workdir == str(tmp_path / "lsq_br_s0")
  assert run.result_path == str(tmp_path / "lsq_br_s0.json")
  assert (run.train_config.lambda_w, run.train_config.lambda_a) == (1.0, 1.0)
  assert runs[0].train_config.lambda_w == 0.0 and runs[0].train_config.seed == 0
  assert run.command().startswith("python scripts/train.py --model=resnet20 --bits=2 ")
  assert run.flags()[-1] == f"--workdir={run.workdir}"


@pytest.mark.parametrize("overrides,message", [
    (dict(warmup_epochs=2), "--warmup_epochs=2 is not accepted: use an integer in 0..1"),
    (dict(lr=0.0), "--lr=0.0 is not accepted"),
])
def test_plan_refuses_what_train_py_would(tmp_path, overrides, message):
  with pytest.raises(study.StudyError, match=message):
    study.plan(str(tmp_path), flags(**overrides))


def test_train_flags_write_bits_once_when_equal():
  assert "--bits=4" in study.train_flags(Config(bits_w=4, bits_a=4))
  mixed = study.train_flags(Config(bits_w=4, bits_a=8, clip=6.0))
  assert "--bits_w=4" in mixed and "--bits_a=8" in mixed and "--clip=6.0" in mixed
  assert not any(f.startswith("--bits=") or f.startswith("--width=") for f in mixed)


def test_run_states(tmp_path):
  checked = flags(seeds=["0"])
  lsq, lsq_br = study.plan(str(tmp_path), checked)
  assert lsq.state() == lsq_br.state() == "new"
  (pathlib.Path(lsq_br.workdir) / "checkpoints" / "latest" / "1").mkdir(parents=True)
  pathlib.Path(lsq.result_path).write_text("{}")
  assert (lsq.state(), lsq_br.state()) == ("done", "resume")


def test_configs_set_br_phase_fields_only_and_share_one_warmup_per_seed(tmp_path):
  assert all(set(fields) <= BR_PHASE_FIELDS for _, fields in study.CONFIGS.values())
  runs = study.plan(str(tmp_path), flags(configs=list(study.CONFIGS), warmup_epochs=1,
                                         epochs=3))
  assert len(runs) == 2 * len(study.CONFIGS)
  assert [w.name for w in study.warmups(runs)] == ["warmup_s0", "warmup_s1"]
  warmup = runs[0].warmup
  assert all(r.warmup is warmup for r in runs if r.seed == 0)
  config = warmup.train_config
  assert (config.lambda_w, config.lambda_a, config.seed) == (0.0, 0.0, 0)
  assert config == study.warmup_config(runs[4].train_config)  # lsq_br_frozen's
  assert warmup.flags()[-2:] == ["--stop_after_epoch=1",
                                 f"--workdir={tmp_path / 'warmup_s0'}"]
  assert warmup.command().startswith("python scripts/train.py --model=resnet20 --bits=2 ")
  frozen = runs[4]
  assert frozen.name == "lsq_br_frozen_s0" and frozen.train_config.freeze_alpha_a
  assert frozen.start_flags()[-2:] == [f"--branch_from={tmp_path / 'warmup_s0'}",
                                       f"--workdir={tmp_path / 'lsq_br_frozen_s0'}"]
  assert frozen.start_flags()[:-2] == frozen.flags()[:-1]
  assert "--branch_from" not in frozen.command()  # the run from scratch: the same run
  assert "--abr_clipped=exclude" in runs[6].command()
  assert "--br_alpha_grad_w=lsq" in runs[5].command()
  assert not any(r.warmup for r in study.plan(str(tmp_path), flags(), share_warmup=False))
  assert not any(r.warmup for r in study.plan(str(tmp_path), flags(warmup_epochs=0)))


def test_configs_with_other_warmups_get_their_own(tmp_path, monkeypatch):
  monkeypatch.setitem(study.CONFIGS, "lsq_relu6", ("LSQ, ReLU6", {"lambda_w": 0.0,
                                                                  "lambda_a": 0.0, "clip": 6.0}))
  runs = study.plan(str(tmp_path), flags(configs=["lsq", "lsq_relu6", "lsq_br"], seeds=["3"]))
  assert [r.warmup.name for r in runs] == ["warmup_lsq_s3", "warmup_lsq_relu6_s3",
                                           "warmup_lsq_s3"]
  assert runs[1].warmup.train_config.clip == 6.0


def test_warmup_states(tmp_path):
  warmup = study.plan(str(tmp_path), flags(seeds=["0"], warmup_epochs=2, epochs=3))[0].warmup
  latest = pathlib.Path(warmup.workdir) / "checkpoints" / "latest"
  assert warmup.state() == "new"
  (latest / "1").mkdir(parents=True)
  assert warmup.state() == "resume"
  (latest / "2").mkdir()
  assert warmup.state() == "done"


def test_presets_give_their_flags_unless_given(tmp_path):
  values = {name: None for name in study.STUDY_FLAGS}
  values.update(bits=2, data_dir=None, seeds=["0"], lr=0.01)
  preset = study.apply_preset("evidence", values, {"seeds"})
  assert preset["seeds"] == ["0"]  # given explicitly: kept
  assert preset["configs"] == ["lsq", "lsq_br", "w_br", "lsq_br_small", "lsq_br_frozen",
                               "lsq_br_gscaled", "lsq_br_noclip"]
  assert (preset["recipe"], preset["warmup_epochs"], preset["epochs"]) == ("reference", 5, 20)
  assert preset["train_examples"] == 0
  checked = study.check_study(preset)
  assert checked["pretrained"] == study.BASELINE  # recorded relative to the repository
  config = study.plan(str(tmp_path), checked)[1].train_config
  assert (config.recipe, config.optimizer, config.schedule) == (
      "reference", "adam", "constant_cosine")
  assert study.apply_preset(None, values, set()) is values
  with pytest.raises(study.StudyError, match="--preset=bogus is not accepted: use one of "
                                             "evidence"):
    study.apply_preset("bogus", values, set())


def test_a_study_file_with_other_flags_is_refused(tmp_path):
  checked = flags()
  assert not study.check_study_file(str(tmp_path), checked)
  # A study.json from before --recipe existed continues as the brjax recipe.
  old = {k: v for k, v in checked.items() if k != "recipe"}
  study_summary.write_json(str(tmp_path / "study.json"), {"flags": old})
  assert study.check_study_file(str(tmp_path), checked)
  with pytest.raises(study.StudyError, match="--recipe=brjax there, --recipe=reference here"):
    study.check_study_file(str(tmp_path), {**checked, "recipe": "reference"})
  study_summary.write_json(str(tmp_path / "study.json"), {"flags": {**checked, "lr": 0.1}})
  with pytest.raises(study.StudyError, match="--lr=0.1 there, --lr=0.01 here"):
    study.check_study_file(str(tmp_path), checked)
  (tmp_path / "study.json").write_text("{")
  with pytest.raises(study.StudyError, match="could not be read"):
    study.read_study_file(str(tmp_path))


def write_metrics(workdir: pathlib.Path, epochs: int) -> list[dict]:
  records = [{"epoch": e, "phase": "WARMUP" if e == 1 else "BR", "test_acc": 10.0 * e % 25,
              "best_test_acc": 20.0, "train_acc": 5.0 * e, "test_loss": 2.0,
              "br_w": None if e == 1 else 0.5, "br_a": None if e == 1 else 1.5,
              "epoch_time_s": 3.0} for e in range(1, epochs + 1)]
  for r in records[1:]:  # a quantized run's per-layer metrics (a float warmup has none)
    r["quant"] = {"weights": {"conv": {"alpha": 0.1 * r["epoch"], "mse": 1.0}},
                  "activations": {"relu": {"alpha": 0.2 * r["epoch"], "mse": 2.0}}}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return records


def test_build_result_from_the_runs_history(tmp_path):
  run = study.plan(str(tmp_path), flags(seeds=["0"]))[1]
  write_metrics(pathlib.Path(run.workdir), 2)
  device = {"platform": "cpu", "device_count": 1, "jax_version": "0.x"}
  result = study_runner.build_result(run, 12.5, None, device, {"commit": None})
  assert result["final_test_acc"] == 20.0 and result["best_epoch"] == 2
  assert result["best_test_acc"] == 20.0 and result["final_train_acc"] == 10.0
  assert (result["br_w"], result["br_a"]) == (0.5, 1.5) and result["train_time_s"] == 6.0
  assert result["description"] == "LSQ + W-BR + A-BR" and result["command"] == run.command()
  assert result["device"] == {"platform": "cpu", "device_count": 1}
  assert result["jax_version"] == "0.x" and set(study.RESULT_KEYS) <= set(result)
  assert result["warmup_source"] is None  # no checkpoint meta with branched_from
  # brjax's recipe leaves A-BR's clipped values out (issue 29)
  assert result["br_flags"]["lambda_a"] == 1.0 and result["br_flags"]["abr_clipped"] == "exclude"
  assert result["curve"] == [  # every epoch, warmup included, for the study's figure
      {"epoch": 1, "phase": "WARMUP", "train_acc": 5.0, "test_acc": 10.0, "test_loss": 2.0,
       "br_w": None, "br_a": None},
      {"epoch": 2, "phase": "BR", "train_acc": 10.0, "test_acc": 20.0, "test_loss": 2.0,
       "br_w": 0.5, "br_a": 1.5}]
  assert result["step_sizes"] == [  # each quantizer's step size after each epoch
      {"epoch": 1, "weights": None, "activations": None},
      {"epoch": 2, "weights": {"conv": 0.2}, "activations": {"relu": 0.4}}]
  write_metrics(pathlib.Path(run.workdir), 1)
  with pytest.raises(RuntimeError, match="ends at 1, not epoch 2"):
    study_runner.build_result(run, 1.0, None, device, {})


def test_a_diverged_run_is_a_result_without_accuracies(tmp_path):
  run = study.plan(str(tmp_path), flags(seeds=["0"]))[1]
  write_metrics(pathlib.Path(run.workdir), 1)  # epoch 2 diverged: epoch 1 is the last saved
  result = study_runner.build_result(run, 9.0, None, {}, {}, (2, "step sizes went to zero"))
  assert result["outcome"] == "diverged" and set(study.RESULT_KEYS) <= set(result)
  assert result["diverged"] == {"epoch": 2, "what": "step sizes went to zero"}
  assert result["final_test_acc"] is result["best_test_acc"] is result["final_train_acc"] is None
  assert [p["epoch"] for p in result["curve"]] == [1] and result["train_time_s"] == 3.0
  with pytest.raises(RuntimeError, match="diverged at epoch 3 but its metrics.jsonl ends at 1, "
                                         "not epoch 2"):
    study_runner.build_result(run, 9.0, None, {}, {}, (3, "its mean training loss is nan"))
  # Diverged in its first epoch: nothing was logged, and the curve is empty.
  (pathlib.Path(run.workdir) / "metrics.jsonl").unlink()
  assert study_runner.build_result(run, 1.0, None, {}, {}, (1, "nan"))["curve"] == []
  write_metrics(pathlib.Path(run.workdir), 2)
  assert study_runner.build_result(run, 1.0, None, {}, {})["outcome"] == "finished"


def test_the_summary_keeps_diverged_runs_out_of_the_statistics_and_names_them(tmp_path):
  diverged = {"outcome": "diverged", "diverged": {"epoch": 6, "what": "step sizes"}}
  fake_result(tmp_path, "lsq", 0, 74.0)
  fake_result(tmp_path, "lsq", 1, 76.0, outcome="finished", diverged=None)
  fake_result(tmp_path, "lsq_br", 0, None, **diverged)
  fake_result(tmp_path, "lsq_br", 1, 77.0, outcome="finished", diverged=None)
  fake_result(tmp_path, "w_br", 0, None, **diverged)
  summary = study_summary.summarize(study_results.collect_results(str(tmp_path)), None, None)
  lsq_br, w_br = summary["configs"]["lsq_br"], summary["configs"]["w_br"]
  assert lsq_br["n"] == 1 and lsq_br["seeds"] == [1]
  assert lsq_br["final_test_acc"]["values"] == [77.0]
  assert lsq_br["diverged"] == [{"seed": 0, "epoch": 6, "what": "step sizes"}]
  assert lsq_br["paired"]["final_test_acc"]["values"] == [1.0]  # seed 1 only
  assert w_br["n"] == 0 and w_br["final_test_acc"] is None and w_br["paired"] is None
  assert summary["configs"]["lsq"]["diverged"] == []
  markdown = study_summary.summary_markdown(summary)
  assert "| diverged |" in markdown and "is not in n and has no accuracy" in markdown
  assert "| lsq_br | LSQ + W-BR + A-BR | 1 | 77.00 | 77.00 | 77.00 | " \
         "+1.00 (n=1) | s0 at epoch 6 |" in markdown
  assert "| w_br | LSQ + W-BR | 0 | n/a | n/a | n/a | - | s0 at epoch 6 |" in markdown
  assert "| lsq | LSQ | 2 | 75.00 ± 1.41 | 75.00 ± 1.41 | 75.00 ± 1.41 | - | - |" in markdown
  # Without a diverged run the table has no such column.
  for name in ("lsq_br_s0.json", "w_br_s0.json"):
    (tmp_path / name).unlink()
  markdown = study_summary.summary_markdown(
      study_summary.summarize(study_results.collect_results(str(tmp_path)), None, None))
  assert "diverged" not in markdown


def test_result_records_the_warmup_it_branched_from(tmp_path):
  run = study.plan(str(tmp_path), flags(seeds=["0"]))[1]
  write_metrics(pathlib.Path(run.workdir), 2)
  meta_dir = pathlib.Path(run.workdir) / "checkpoints" / "latest" / "2" / "meta"
  meta_dir.mkdir(parents=True)
  branched = {"workdir": study.repo_path(run.warmup.workdir), "epoch": 1}
  (meta_dir / "metadata").write_text(json.dumps({"epoch": 2, "branched_from": branched}))
  result = study_runner.build_result(run, 1.0, None, {}, {})
  assert result["warmup_source"] == {**branched, "command": run.warmup.command()}
  assert result["command"] == run.command() and "--branch_from" not in result["command"]
  other = {"workdir": "elsewhere", "epoch": 1}
  (meta_dir / "metadata").write_text(json.dumps({"epoch": 2, "branched_from": other}))
  assert study_runner.build_result(run, 1.0, None, {}, {})["warmup_source"] == {
      **other, "command": None}


def fake_result(study_dir: pathlib.Path, config: str, seed: int, final: float, **extra):
  result = {"config": config, "seed": seed, "final_test_acc": final, "best_test_acc": final,
            "final_train_acc": final, "command": f"python scripts/train.py --seed={seed} "
            f"--workdir={study_dir / f'{config}_s{seed}'}", **extra}
  study_summary.write_json(str(study_dir / f"{config}_s{seed}.json"), result)


def test_collect_results_by_config_order_then_seed(tmp_path):
  for config, seed in (("w_br", 0), ("lsq", 1), ("lsq_br", 0), ("lsq", 0)):
    fake_result(tmp_path, config, seed, 50.0)
  study_summary.write_json(str(tmp_path / "summary.json"), {})
  results = study_results.collect_results(str(tmp_path))
  assert [(r["config"], r["seed"]) for r in results] == [
      ("lsq", 0), ("lsq", 1), ("lsq_br", 0), ("w_br", 0)]
  assert results[0]["description"] == "LSQ"  # filled in from CONFIGS


def test_summary_of_two_seeds(tmp_path):
  fake_result(tmp_path, "lsq", 0, 80.0, description="LSQ")
  fake_result(tmp_path, "lsq", 1, 82.0, description="LSQ")
  summary = study_summary.summarize(study_results.collect_results(str(tmp_path)), None, None)
  c = summary["configs"]["lsq"]
  assert c["final_test_acc"]["mean"] == 81.0
  assert c["final_test_acc"]["std"] == pytest.approx(2 ** 0.5)
  assert c["command_template"] == (f"python scripts/train.py --seed={{seed}} "
                                   f"--workdir={tmp_path}/lsq_s{{seed}}")
  markdown = study_summary.summary_markdown(summary)
  assert markdown.startswith("# LSQ vs LSQ+BR\n")
  assert "| lsq | LSQ | 2 | 81.00 ± 1.41 | 81.00 ± 1.41 | 81.00 ± 1.41 | - |" in markdown


def test_paired_differences_against_lsq_use_the_seeds_both_ran(tmp_path):
  for seed, (lsq, br) in enumerate([(80.0, 81.0), (84.0, 84.5), (70.0, None)]):
    fake_result(tmp_path, "lsq", seed, lsq)
    if br is not None:
      fake_result(tmp_path, "lsq_br", seed, br)
  fake_result(tmp_path, "w_br", 7, 60.0)  # no seed in common with lsq
  summary = study_summary.summarize(study_results.collect_results(str(tmp_path)), None, None)
  configs = summary["configs"]
  assert configs["lsq"]["paired"] is None and configs["w_br"]["paired"] is None
  paired = configs["lsq_br"]["paired"]["final_test_acc"]
  assert paired["seeds"] == [0, 1] and paired["values"] == [1.0, 0.5]
  assert paired["mean"] == 0.75 and paired["std"] == pytest.approx(0.5 / 2 ** 0.5)
  # against the unpaired means (82.0 vs 78.0 with seed 2) the pairing tells another story
  assert configs["lsq"]["final_test_acc"]["mean"] == pytest.approx(78.0)
  markdown = study_summary.summary_markdown(summary)
  assert "| lsq_br | LSQ + W-BR + A-BR | 2 | 82.75 ± 2.47 | 82.75 ± 2.47 | 82.75 ± 2.47 | " \
         "+0.75 ± 0.35 (n=2) |" in markdown
  assert "| lsq | LSQ | 3 | 78.00 ± 7.21 |" in markdown and markdown.count("| - |") == 2


def test_results_of_one_config_from_different_commands_are_refused(tmp_path):
  fake_result(tmp_path, "lsq", 0, 80.0)
  fake_result(tmp_path, "lsq", 1, 82.0, command="python scripts/train.py --lr=0.5 --seed=1")
  with pytest.raises(ValueError, match="config lsq were run with different commands"):
    study_summary.summarize(study_results.collect_results(str(tmp_path)), None, None)


def test_markdown_describes_the_study_and_an_unreadable_baseline(tmp_path):
  baseline = study_summary.read_baseline("no_such_run", str(tmp_path))
  assert baseline["error"] == "no readable metrics.jsonl (FileNotFoundError)"
  fake_result(tmp_path, "lsq", 0, 80.0)
  summary = study_summary.summarize(study_results.collect_results(str(tmp_path)),
                                    flags(seeds=["0"], train_examples=64), baseline)
  markdown = study_summary.summary_markdown(summary)
  assert markdown.startswith("# LSQ vs LSQ+BR: ResNet-20 W2A2\n\n2 epochs (1 LSQ warmup, then "
                             "BR), lr 0.01, batch 32, seeds 0; data: tensorflow-datasets "
                             "cifar10, first 64 train images, first 32 test images; from "
                             "scratch.\n")
  assert "| float baseline | float, ? epochs | 1 | n/a | n/a | n/a |" in markdown
  reference = study_summary.summary_markdown({**summary, "study": {**summary["study"],
                                                                   "recipe": "reference"}})
  assert "2 epochs (1 LSQ warmup, then BR), reference recipe, lr 0.01, batch 32" in reference
  assert markdown.endswith("Float baseline no_such_run: no readable metrics.jsonl "
                           "(FileNotFoundError).\n")


@pytest.mark.parametrize("overrides,title,opening", [
    (dict(model="resnet8", first_last_bits=8),
     "ResNet-8 W2A2 (first conv and last FC at 8 bits)",
     "ResNet-8 (--model=resnet8), the first conv and last FC at 8 bits (--first_last_bits=8), "
     "every other layer at 2 bits; 2 epochs"),
    (dict(model="resnet20_option_a", first_last_bits=32),
     "ResNet-20 (option A shortcuts) W2A2 (first conv and last FC float)",
     "ResNet-20 (option A shortcuts) (--model=resnet20_option_a), the first conv and last FC "
     "float (--first_last_bits=32), every other layer at 2 bits; 2 epochs"),
    (dict(model="resnet56"), "ResNet-56 W2A2", "ResNet-56 (--model=resnet56), every layer at 2 "
     "bits; 2 epochs"),
    (dict(), "ResNet-20 W2A2", "2 epochs"),  # as every study before --model
])
def test_the_summary_names_the_model_and_its_layers_bits(tmp_path, overrides, title, opening):
  fake_result(tmp_path, "lsq", 0, 80.0)
  checked = flags(seeds=["0"], **overrides)
  summary = study_summary.summarize(study_results.collect_results(str(tmp_path)), checked, None)
  lines = study_summary.summary_markdown(summary).splitlines()
  assert lines[0] == f"# LSQ vs LSQ+BR: {title}" and lines[2].startswith(opening)
  assert lines[2].endswith("; from scratch.")
  # A study.json written before --model and --first_last_bits: ResNet-20, every layer alike.
  old = {k: v for k, v in checked.items() if k not in ("model", "first_last_bits")}
  assert study_summary.setting(old) == "ResNet-20 W2A2"


def test_the_model_and_the_first_last_bits_reach_every_run_and_are_checked(tmp_path):
  checked = flags(model="resnet8", first_last_bits=8)
  assert (checked["model"], checked["first_last_bits"]) == ("resnet8", 8)
  assert flags()["model"] == "resnet20" and flags()["first_last_bits"] is None
  runs = study.plan(str(tmp_path), checked)
  for config in [r.train_config for r in runs] + [w.train_config for w in study.warmups(runs)]:
    assert (config.model, config.first_last_bits) == ("resnet8", 8)
  assert runs[0].command().startswith("python scripts/train.py --model=resnet8 --bits=2 "
                                      "--first_last_bits=8 ")
  with pytest.raises(study.StudyError, match=r"^--model=resnet9 is not accepted: use one of "
                                             r"resnet8, resnet14, resnet20, "):
    flags(model="resnet9")
  with pytest.raises(study.StudyError, match=r"^--first_last_bits=0 is not accepted: use an "
                                             r"integer in 1\.\.8, or 32 for float"):
    study.plan(str(tmp_path), flags(first_last_bits=0))
  # A study.json without them is the ResNet-20 study it was: it continues with the defaults,
  # and is refused with another model, naming both values.
  saved = {k: v for k, v in checked.items() if k not in ("model", "first_last_bits")}
  study_summary.write_json(str(tmp_path / "study.json"), {"flags": saved})
  assert study.check_study_file(str(tmp_path), {**checked, "model": "resnet20",
                                                "first_last_bits": None})
  with pytest.raises(study.StudyError, match="--model=resnet20 there, --model=resnet8 here; "
                                             "--first_last_bits=unset there, "
                                             "--first_last_bits=8 here"):
    study.check_study_file(str(tmp_path), checked)


def test_baseline_from_its_history(tmp_path):
  write_metrics(tmp_path / "float", 3)
  baseline = study_summary.read_baseline("float", str(tmp_path))
  assert baseline == {"workdir": "float", "final_test_acc": 5.0, "best_test_acc": 20.0,
                      "epochs": 3, "phase": "BR"}


def test_execute_streams_and_logs_without_progress_redraws(tmp_path):
  """In a JAX-free interpreter, as scripts/experiments.py runs it (a fork from this
  multithreaded one would warn)."""
  log = tmp_path / "train.log"
  child = "import sys; print('a\\rb'); print('last'); sys.exit(3)"
  driver = ("import json, sys; from brjax.studies import runner as study_runner; "
            f"r = study_runner.execute([sys.executable, '-c', {child!r}], {str(log)!r}, "
            f"{str(tmp_path)!r}); print(json.dumps(r))")
  proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, cwd=REPO,
                        timeout=60, check=True)
  streamed, result = proc.stdout.decode().rsplit("\n", 2)[:2]
  code, wall, last = json.loads(result)
  assert code == 3 and wall > 0 and last == "last"
  assert streamed == "a\rb\nlast"  # the terminal sees the redraws
  lines = log.read_text().splitlines()
  assert lines[0].startswith("# ") and lines[1:] == ["b", "last"]


def test_execute_passes_a_signal_on_once_and_stops_the_study(tmp_path):
  """The run has its own session (a terminal's Ctrl-C reaches the study alone): the study
  passes SIGTERM on once, waits for the run to save and exit, then stops
  (``Interrupted``)."""
  log = tmp_path / "train.log"
  child = ("import signal, sys, time\n"
           "def stop(signum, frame):\n  print('got', signal.Signals(signum).name); sys.exit(75)\n"
           "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)")
  driver = ("import sys; from brjax.studies import runner\n"
            "from brjax.training import run_control\n"
            "try:\n"
            f"  runner.execute([sys.executable, '-c', {child!r}], {str(log)!r}, "
            f"{str(tmp_path)!r})\n"
            "except run_control.Interrupted as e:\n  print('stopped by', e.signal)")
  proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, cwd=REPO,
                          text=True)
  assert proc.stdout.readline() == "ready\n"
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0 and out.splitlines() == ["got SIGTERM", "stopped by SIGTERM"]


def test_a_run_stopped_inside_an_epoch_resumes_there(tmp_path):
  run, _ = study.plan(str(tmp_path), flags(seeds=["0"]), share_warmup=False)
  steps = pathlib.Path(run.workdir, "checkpoints", "steps", "5", "meta")
  steps.mkdir(parents=True)
  (steps / "metadata").write_text(json.dumps({"input": {"epoch": 2, "step_in_epoch": 1}}))
  assert history.mid_epoch_position(run.workdir) == (2, 1) and run.state() == "resume"
  pathlib.Path(run.workdir, "checkpoints", "latest", "2").mkdir(parents=True)
  assert history.mid_epoch_position(run.workdir) is None  # older than epoch 2's end


def test_paths_in_and_beside_the_repository_are_recorded_relative_to_it():
  """Commands run from the repository root: a clone with ../shared beside it reruns them."""
  assert study.repo_path(str(REPO / "checkpoints" / "x")) == os.path.join("checkpoints", "x")
  assert study.repo_path(str(REPO.parent / "shared" / "d.tar.gz")) == os.path.join(
      os.pardir, "shared", "d.tar.gz")
  if len(REPO.parts) >= 3:  # /a/repo: ../../elsewhere exists as a path
    far = REPO.parent.parent / "elsewhere"
    assert study.repo_path(str(far)) == str(far)
  assert study.repo_path(None) is None


@pytest.mark.parametrize("name", ["study_resnet20_W2A2", "study_evidence_W2A2"])
def test_the_shipped_study_summary_is_rebuilt_exactly(name):
  """checkpoints/<name>: its run results give its summary.json and summary.md."""
  study_dir = REPO / "checkpoints" / name
  shipped = json.loads((study_dir / "summary.json").read_text())
  summary = study_summary.summarize(study_results.collect_results(str(study_dir)), shipped["study"],
                                    shipped["baseline"])
  assert summary == shipped
  assert study_summary.summary_markdown(summary) == (study_dir / "summary.md").read_text()


def test_the_summary_draws_the_curves_of_results_that_have_them(tmp_path):
  fake_result(tmp_path, "lsq", 0, 80.0)
  study_results.summarize_only(str(tmp_path))
  assert not (tmp_path / study_results.CURVES_FILE).exists()  # no result with a curve
  fake_result(tmp_path, "lsq_br", 0, 81.0, warmup_epochs=1,
              curve=[{"epoch": 1, "test_acc": 70.0, "train_acc": 71.0},
                     {"epoch": 2, "test_acc": 81.0, "train_acc": 80.0}])
  study_results.summarize_only(str(tmp_path))
  assert (tmp_path / study_results.CURVES_FILE).read_bytes().startswith(b"\x89PNG")


def test_plan_orders_by_seed_or_by_config_and_refuses_others(tmp_path):
  checked = flags(seeds=["0", "1"], configs=["lsq", "lsq_br", "w_br"])
  by_seed = [r.name for r in study.plan(str(tmp_path), checked)]
  by_config = [r.name for r in study.plan(str(tmp_path), checked, order="config")]
  assert by_seed == ["lsq_s0", "lsq_br_s0", "w_br_s0", "lsq_s1", "lsq_br_s1", "w_br_s1"]
  assert by_config == ["lsq_s0", "lsq_s1", "lsq_br_s0", "lsq_br_s1", "w_br_s0", "w_br_s1"]
  warmups = {r.name: r.warmup.name for r in study.plan(str(tmp_path), checked, order="config")}
  assert warmups["lsq_br_s1"] == warmups["lsq_s1"] == "warmup_s1"  # shared either way
  with pytest.raises(study.StudyError, match="--order=random is not accepted: use one of "
                                             "seed, config"):
    study.plan(str(tmp_path), checked, order="random")


def test_select_keeps_the_named_runs_in_the_given_order_or_refuses_a_name(tmp_path):
  runs = study.plan(str(tmp_path), flags(seeds=["0", "1"], configs=["lsq", "lsq_br"]))
  assert study.select(runs, []) == runs
  picked = study.select(runs, ["lsq_br_s1", "lsq_s0"])
  assert [r.name for r in picked] == ["lsq_br_s1", "lsq_s0"]
  assert picked[0] == runs[3] and picked[0].warmup.name == "warmup_s1"
  with pytest.raises(study.StudyError, match="--runs=lsq_br_s2 is not accepted: it is not a "
                                             "run of this study; use names from lsq_s0, "):
    study.select(runs, ["lsq_s0", "lsq_br_s2"])
  with pytest.raises(study.StudyError, match="--runs=lsq_s0 is not accepted: it is given twice"):
    study.select(runs, ["lsq_s0", "lsq_s0"])


def test_the_runner_keeps_a_diverged_run_as_its_result_and_goes_on(tmp_path, monkeypatch,
                                                                    capsys):
  """scripts/train.py's exit 3 with its diverged line: the run's result says so and the
  next run starts; any other failure still stops the study."""
  checked = flags(seeds=["0"])
  lsq, lsq_br = study.plan(str(tmp_path), checked)
  pathlib.Path(lsq.warmup.workdir, "checkpoints", "latest", "1").mkdir(parents=True)
  ran = []

  def fake_execute(argv, log_path, cwd):
    workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
    ran.append(os.path.basename(workdir))
    if workdir == lsq.workdir:
      write_metrics(pathlib.Path(workdir), 1)
      return 3, 5.0, ("error: epoch 2 diverged: step sizes went to zero or below (a=-1): "
                      "their layers output zeros; the epoch was not saved, the checkpoint of "
                      "epoch 1 is kept: lower --lr")
    write_metrics(pathlib.Path(workdir), 2)
    return 0, 6.0, "done"

  monkeypatch.setattr(study_runner, "execute", fake_execute)
  monkeypatch.setattr(study_runner, "probe_device", lambda cwd: {"platform": "cpu"})
  assert study_runner.run_study(str(tmp_path), checked, "python scripts/experiments.py") == 0
  assert ran == ["lsq_s0", "lsq_br_s0"]
  out = capsys.readouterr().out
  assert "[1/2] lsq_s0: diverged at epoch 2 after 5s (step sizes went to zero or below (a=-1): " \
         "their layers output zeros); kept as its result" in out
  result = json.loads(pathlib.Path(lsq.result_path).read_text())
  assert result["outcome"] == "diverged" and result["diverged"]["epoch"] == 2
  assert "| lsq | LSQ | 0 | n/a | n/a | n/a | - | s0 at epoch 2 |" in out
  # Run again: the diverged run is done (skipped), like a finished one.
  assert study_runner.run_study(str(tmp_path), checked, "python scripts/experiments.py") == 0
  assert ran == ["lsq_s0", "lsq_br_s0"]
  # Exit 3 without the diverged line, or exit 1: a failure, which stops the study.
  for code, line in ((3, "Traceback: something else"), (1, "error: epoch 2 diverged: x; the "
                                                           "epoch was not saved")):
    pathlib.Path(lsq.result_path).unlink(missing_ok=True)
    monkeypatch.setattr(study_runner, "execute", lambda argv, log, cwd, c=code, l=line: (c, 1.0, l))
    assert study_runner.run_study(str(tmp_path), checked, "python scripts/experiments.py") == 1
    assert f"error: run lsq_s0 failed (exit {code})" in capsys.readouterr().err


def test_git_commit_is_dirty_for_code_changes_not_for_a_studys_own_files(tmp_path):
  def git(*args):
    subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
  git("init", "-q")
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "summary.md").write_text("a\n")
  (tmp_path / "code.py").write_text("x = 1\n")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
  clean = study_runner.git_commit(str(tmp_path))
  assert len(clean["commit"]) == 40 and clean["dirty"] is False
  (tmp_path / "checkpoints" / "summary.md").write_text("b\n")  # the study's own summary
  assert study_runner.git_commit(str(tmp_path))["dirty"] is False
  (tmp_path / "code.py").write_text("x = 2\n")
  assert study_runner.git_commit(str(tmp_path))["dirty"] is True
  assert study_runner.git_commit(str(tmp_path / "checkpoints"))["commit"] == clean["commit"]
  outside = tmp_path.parent / f"{tmp_path.name}_not_a_repo"
  outside.mkdir()
  assert study_runner.git_commit(str(outside)) == {"commit": None, "dirty": None}
