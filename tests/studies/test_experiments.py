"""Tests of scripts/experiments.py: the LSQ vs LSQ+BR study runner.

The fast tests call ``main()`` in this process (flags, dry run, summary math, the lock); the
slow ones run one tiny study (ResNet-8 W2A2 with its first conv and last FC at 8 bits, the
literature's setting; seed 0, lsq and lsq_br, 1 warmup + 1 BR epoch on 128 images) through
the command line, then run it again (skipped), with other flags (refused)
and with one result deleted (resumed). The study's runs use the test session's persistent
XLA compilation cache (``JAX_COMPILATION_CACHE_DIR``, see conftest.py), every compilation
in it: lsq and lsq_br compile the same init, warmup step and eval.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from conftest import once_per_session
import pytest

from brjax.studies import study as study_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "experiments.py"
TRAIN_SCRIPT = REPO / "scripts" / "train.py"


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


experiments = _load(SCRIPT, "experiments_cli")
train_cli = _load(TRAIN_SCRIPT, "train_cli_for_experiments")

# The tiny study: train.py flags of tests/training/test_cli.py's scale, through the study's
# flags; ResNet-8 (7 activation and 10 weight quantizers to ResNet-20's 19 and 22) compiles in
# about half ResNet-20's time, which is most of a tiny run's.
TINY = ["--model=resnet8", "--bits=2", "--first_last_bits=8", "--seeds=0",
        "--configs=lsq,lsq_br", "--epochs=2", "--warmup_epochs=1", "--train_examples=128",
        "--test_examples=64", "--batch_size=32"]
LAMBDAS = {"lsq": (0.0, 0.0), "lsq_br": (1.0, 1.0), "w_br": (1.0, 0.0)}


def one_line_error(err: str) -> str:
  err = err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


# ------------------------------------------------------------------ fast: flags, dry run


@pytest.mark.parametrize("argv,flag", [
    ([], "--study_dir"),
    (["--bits=32"], "--bits=32"),
    (["--bits=1"], "--bits=1"),
    (["--seeds=0,x"], "--seeds=0,x"),
    (["--seeds=1,1"], "--seeds=1,1"),
    (["--seeds="], "--seeds="),
    (["--configs=lsq,bogus"], "--configs=lsq,bogus"),
    (["--configs=lsq,lsq"], "--configs=lsq,lsq"),
    (["--epochs=3", "--warmup_epochs=3"], "--warmup_epochs=3"),
    (["--epochs=3", "--warmup_epochs=4"], "--warmup_epochs=4"),
    (["--lr=0"], "--lr=0.0"),
    (["--batch_size=0"], "--batch_size=0"),
    (["--data_dir=/no/such/data"], "--data_dir=/no/such/data"),
    (["--pretrained=/no/such/run"], "--pretrained=/no/such/run"),
    (["--summarize_only", "--seeds=0"], "--seeds"),
    (["--summarize_only", "--preset=evidence"], "--preset"),
    (["--summarize_only", "--runs=lsq_s0"], "--runs"),
    (["--summarize_only", "--order=config"], "--order"),
    (["--runs=lsq_s9"], "--runs=lsq_s9"),
    (["--runs=lsq_br_s0,lsq_br_s0"], "--runs=lsq_br_s0"),
    (["--preset=bogus"], "--preset=bogus"),
    (["--recipe=pytorch"], "--recipe=pytorch"),
    (["--model=resnet9"], "--model=resnet9 is not accepted: use one of resnet8, resnet14, "),
    (["--first_last_bits=9"], "--first_last_bits=9 is not accepted"),
    (["--model=resnet18_reference", "--first_last_bits=8"], "--first_last_bits=8"),
    (["--summarize_only", "--model=resnet8"], "--model"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["extra_positional"], "extra_positional"),
])
def test_bad_flag_is_one_line_error_before_any_work(argv, flag, tmp_path, capsys):
  study_dir = tmp_path / "study"
  study = [f"--study_dir={study_dir}"] if argv else []
  code = experiments.main(["experiments.py", *study, *argv])
  err = one_line_error(capsys.readouterr().err)
  assert code == 2 and flag in err, err
  assert not study_dir.exists()


def _dry_run(capsys, study_dir, data_dir, *extra) -> dict[str, tuple[str, str]]:
  """``{warmup or run name: (state, command)}`` printed by --dry_run (its ``#`` lines on
  the study and the total time left skipped)."""
  code = experiments.main(["experiments.py", f"--study_dir={study_dir}",
                           f"--data_dir={data_dir}", *TINY, *extra, "--dry_run"])
  out, err = capsys.readouterr()
  assert code == 0 and not err, err
  lines = out.strip().splitlines()
  assert lines[0].startswith("# plan: ") and lines[-1].startswith("# total left: ")
  runs = {}
  for line in lines[1:-1]:
    head, command = line.split(": ", 1)
    name, state = head.split(" ", 1)
    runs[name] = (state.strip("()").split(",")[0], command)
  return runs


def test_dry_run_prints_each_command_and_writes_nothing(tmp_path, capsys):
  study_dir = tmp_path / "study"
  runs = _dry_run(capsys, study_dir, tmp_path, "--seeds=0,1", "--configs=lsq,lsq_br,w_br")
  # Seed by seed: the seed's shared warmup, then every config of seed 0.
  assert list(runs) == ["warmup_s0", "lsq_s0", "lsq_br_s0", "w_br_s0",
                        "warmup_s1", "lsq_s1", "lsq_br_s1", "w_br_s1"]
  for name, (state, command) in runs.items():
    assert state == "new"
    assert command.startswith("python scripts/train.py --")
    config = name.rsplit("_s", 1)[0]
    lambda_w, lambda_a = LAMBDAS.get(config, (0.0, 0.0))  # a warmup is LSQ alone
    assert f"--lambda_w={lambda_w}" in command and f"--lambda_a={lambda_a}" in command
    assert command.endswith(f"--workdir={study_dir / name}")
    if config == "warmup":
      assert "--stop_after_epoch=1 " in command and "--branch_from" not in command
    else:
      assert f"--branch_from={study_dir / 'warmup'}_s{name[-1]} " in command
  assert not study_dir.exists()
  unshared = _dry_run(capsys, study_dir, tmp_path, "--noshare_warmup")
  assert list(unshared) == ["lsq_s0", "lsq_br_s0"]
  assert not any("--branch_from" in command for _, command in unshared.values())


def test_each_command_reproduces_its_run_through_train_py(tmp_path, capsys):
  """Parsed by scripts/train.py's own flags, every command gives exactly the run's Config
  (a warmup's: LSQ alone, stopped after the warmup; a branch's: its warmup named)."""
  from brjax.training.config import Config  # pylint: disable=g-import-not-at-top
  study_dir = tmp_path / "study"
  runs = _dry_run(capsys, study_dir, tmp_path, "--seeds=0,7", "--configs=lsq,lsq_br,w_br",
                  "--lr=0.02")
  for name, (_, command) in runs.items():
    config_name, seed = name.rsplit("_s", 1)
    words = shlex.split(command)
    assert words[:2] == ["python", "scripts/train.py"]
    train_cli.FLAGS.unparse_flags()
    assert train_cli.FLAGS(["train.py", *words[2:]]) == ["train.py"]
    parsed = train_cli.config_from_flags(train_cli.FLAGS)
    lambda_w, lambda_a = LAMBDAS.get(config_name, (0.0, 0.0))
    # The study's model and layer widths reach every run, its warmups too.
    assert parsed == Config(model="resnet8", bits_w=2, bits_a=2, first_last_bits=8,
                            lambda_w=lambda_w, lambda_a=lambda_a,
                            warmup_epochs=1, epochs=2, lr=0.02, batch_size=32, seed=int(seed),
                            data_dir=str(tmp_path), train_examples=128, test_examples=64)
    assert train_cli.FLAGS.workdir == str(study_dir / name)
    warmup = config_name == "warmup"
    assert train_cli.FLAGS.stop_after_epoch == (1 if warmup else None)
    assert train_cli.FLAGS.branch_from == (None if warmup else str(study_dir / f"warmup_s{seed}"))
    # Every setting is explicit, so later changes of train.py's defaults don't change it.
    named = {w.split("=", 1)[0].lstrip("-") for w in words[2:]}
    expected = {k for k, v in vars(parsed).items() if v is not None} - {"bits_w", "bits_a"}
    extra = {"stop_after_epoch"} if warmup else {"branch_from"}
    assert expected | {"bits", "workdir"} | extra == named


def test_the_evidence_preset_plans_issue_14s_study(tmp_path, capsys):
  runs = _dry_run(capsys, tmp_path / "study", tmp_path, "--preset=evidence")
  # TINY's flags are explicit, so they win over the preset's: seeds, configs, epochs.
  assert list(runs) == ["warmup_s0", "lsq_s0", "lsq_br_s0"]
  assert "--recipe=reference" in runs["lsq_br_s0"][1]
  assert f"--pretrained={study_lib.BASELINE}" in runs["lsq_br_s0"][1]
  code = experiments.main(["experiments.py", f"--study_dir={tmp_path / 'study'}",
                           f"--data_dir={tmp_path}", "--preset=evidence", "--dry_run"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert code == 0 and lines[0].startswith("# plan: 7 configs x 3 seeds = 21 runs + 3 shared "
                                           "warmups of 5 epochs, 20 epochs each (5 warmup)")
  names = [line.split(" ", 1)[0] for line in lines[1:-1]]
  assert names[:8] == ["warmup_s0", "lsq_s0", "lsq_br_s0", "w_br_s0", "lsq_br_small_s0",
                       "lsq_br_frozen_s0", "lsq_br_gscaled_s0", "lsq_br_noclip_s0"]
  assert len(names) == 24
  # --order=config: every seed of lsq, then of lsq_br (the paired comparison first); each
  # seed's warmup comes before the first run that branches from it.
  code = experiments.main(["experiments.py", f"--study_dir={tmp_path / 'study'}",
                           f"--data_dir={tmp_path}", "--preset=evidence", "--dry_run",
                           "--order=config"])
  lines = capsys.readouterr().out.strip().splitlines()
  names = [line.split(" ", 1)[0] for line in lines[1:-1]]
  assert code == 0 and names[:9] == ["warmup_s0", "lsq_s0", "warmup_s1", "lsq_s1", "warmup_s2",
                                     "lsq_s2", "lsq_br_s0", "lsq_br_s1", "lsq_br_s2"]
  assert len(set(names)) == len(names) == 24
  code = experiments.main(["experiments.py", f"--study_dir={tmp_path / 'study'}",
                           "--preset=evidence", "--dry_run", "--order=seeds"])
  err = capsys.readouterr().err
  assert code == 2 and err == "error: flag --order=seeds: value should be one of <seed|config>\n"


def test_runs_takes_only_the_named_runs_in_their_order_with_their_warmups(tmp_path, capsys):
  runs = _dry_run(capsys, tmp_path / "study", tmp_path, "--seeds=0,1",
                  "--configs=lsq,lsq_br,w_br", "--runs=lsq_br_s1,w_br_s0")
  # Each named run, after the warmup it branches from (trained first if missing).
  assert list(runs) == ["warmup_s1", "lsq_br_s1", "warmup_s0", "w_br_s0"]
  assert "--branch_from=" + str(tmp_path / "study" / "warmup_s1") in runs["lsq_br_s1"][1]
  code = experiments.main(["experiments.py", f"--study_dir={tmp_path / 'study'}",
                           f"--data_dir={tmp_path}", *TINY, "--seeds=0,1",
                           "--runs=lsq_br_s1", "--dry_run"])
  head = capsys.readouterr().out.splitlines()[0]
  assert code == 0 and head.startswith("# plan: 2 configs x 2 seeds = 1 of its 4 runs (--runs) "
                                       "+ 1 shared warmups of 1 epochs"), head


def test_a_study_in_use_is_refused(tmp_path, capsys):
  study_dir = tmp_path / "study"
  study_dir.mkdir()
  with open(study_dir / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    code = experiments.main(["experiments.py", f"--study_dir={study_dir}",
                             f"--data_dir={tmp_path}", *TINY])
  err = one_line_error(capsys.readouterr().err)
  assert code == 2 and "in use" in err, err
  assert not (study_dir / "study.json").exists()


# ------------------------------------------------------------------ fast: summary math


def _fake_result(study_dir, config, seed, final, best, train):
  command = (f"python scripts/train.py --lambda_w={LAMBDAS[config][0]} --seed={seed} "
             f"--workdir={study_dir / f'{config}_s{seed}'}")
  (study_dir / f"{config}_s{seed}.json").write_text(json.dumps({
      "config": config, "seed": seed, "command": command, "final_test_acc": final,
      "best_test_acc": best, "final_train_acc": train}))


def _hand_stats(values):
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return mean, std


def test_summarize_only_mean_and_sample_std(tmp_path, capsys):
  study_dir = tmp_path / "study"
  study_dir.mkdir()
  lsq = {0: (80.0, 81.0, 90.0), 1: (82.0, 83.0, 91.0), 2: (87.0, 88.5, 95.0)}
  lsq_br = {0: (85.0, 85.5, 92.0), 2: (86.0, 86.25, 93.0)}
  for seed, values in lsq.items():
    _fake_result(study_dir, "lsq", seed, *values)
  for seed, values in lsq_br.items():
    _fake_result(study_dir, "lsq_br", seed, *values)
  _fake_result(study_dir, "w_br", 1, 84.0, 84.0, 90.5)
  baseline = tmp_path / "float_run"
  (baseline / "checkpoints").mkdir(parents=True)
  (baseline / "metrics.jsonl").write_text(
      json.dumps({"epoch": 1, "phase": "FLOAT", "test_acc": 91.5, "best_test_acc": 91.5}) +
      "\n" + json.dumps({"epoch": 2, "phase": "FLOAT", "test_acc": 91.0,
                         "best_test_acc": 91.5}) + "\n")

  code = experiments.main(["experiments.py", f"--study_dir={study_dir}", "--summarize_only",
                           f"--pretrained={baseline}"])
  out, err = capsys.readouterr()
  assert code == 0 and not err, err
  summary = json.loads((study_dir / "summary.json").read_text())
  assert list(summary["configs"]) == ["lsq", "lsq_br", "w_br"]
  # lsq final: mean (80 + 82 + 87) / 3 = 83, sample std sqrt((9 + 1 + 16) / 2) = sqrt(13).
  c = summary["configs"]["lsq"]
  assert c["n"] == 3 and c["seeds"] == [0, 1, 2]
  assert c["final_test_acc"]["mean"] == pytest.approx(83.0)
  assert c["final_test_acc"]["std"] == pytest.approx(math.sqrt(13.0))
  for key, index in (("best_test_acc", 1), ("final_train_acc", 2)):
    mean, std = _hand_stats([v[index] for v in lsq.values()])
    assert c[key]["mean"] == pytest.approx(mean) and c[key]["std"] == pytest.approx(std)
  c = summary["configs"]["lsq_br"]
  assert c["n"] == 2 and c["seeds"] == [0, 2]
  assert c["final_test_acc"]["mean"] == pytest.approx(85.5)
  assert c["final_test_acc"]["std"] == pytest.approx(math.sqrt(0.5))
  assert c["command_template"] == (f"python scripts/train.py --lambda_w=1.0 --seed={{seed}} "
                                   f"--workdir={study_dir}/lsq_br_s{{seed}}")
  c = summary["configs"]["w_br"]
  assert c["n"] == 1 and c["final_test_acc"]["mean"] == 84.0
  assert c["final_test_acc"]["std"] is None  # the sample std of one value is undefined
  assert summary["baseline"]["best_test_acc"] == 91.5
  assert summary["baseline"]["final_test_acc"] == 91.0

  markdown = (study_dir / "summary.md").read_text()
  assert markdown == out  # printed as well
  rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
          for line in markdown.splitlines() if line.startswith("| ") and "---" not in line}
  assert rows["lsq"][1:4] == ["3", "83.00 ± 3.61", "84.17 ± 3.88"]
  assert rows["lsq_br"][1:3] == ["2", "85.50 ± 0.71"]
  assert rows["w_br"][1:3] == ["1", "84.00"]
  assert rows["float baseline"][2:4] == ["91.00", "91.50"]


def test_summarize_only_refuses_a_malformed_result(tmp_path, capsys):
  (tmp_path / "lsq_s0.json").write_text(json.dumps({"config": "lsq", "seed": 0}))
  code = experiments.main(["experiments.py", f"--study_dir={tmp_path}", "--summarize_only"])
  err = one_line_error(capsys.readouterr().err)
  assert code == 2 and "lsq_s0.json" in err and "final_test_acc" in err, err


# ------------------------------------------------------------------ slow: a real study


def run_study(study_dir, cifar_dir, *extra) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run([sys.executable, str(SCRIPT), f"--study_dir={study_dir}",
                         f"--data_dir={cifar_dir}", *TINY, *extra], capture_output=True,
                        text=True, timeout=600, env=env, check=False)


@pytest.fixture(scope="session")
def study(cifar_dir, tmp_path_factory, request):
  """``(study_dir, completed process)`` of the tiny study, run once per test session
  (``conftest.once_per_session``). Read-only: copy it to run the study again."""
  def make(root):
    proc = run_study(root / "study", cifar_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "study", proc
  return once_per_session(request, tmp_path_factory, "experiments", make)


@pytest.fixture
def study_copy(study, tmp_path) -> pathlib.Path:
  """A copy of the tiny study's folder, to run the study on again or change."""
  shutil.copytree(study[0], tmp_path / "study")
  return tmp_path / "study"


def _mtimes(study_dir: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(study_dir)): p.stat().st_mtime_ns for p in study_dir.rglob("*")
          if p.is_file() and p.name not in ("summary.json", "summary.md", "curves.png", ".lock")}


@pytest.mark.slow
def test_study_writes_one_result_per_run_and_a_summary(study, cifar_dir):
  study_dir, proc = study
  assert (study_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
  assert sorted(p.name for p in study_dir.glob("*.json")) == [
      "lsq_br_s0.json", "lsq_s0.json", "study.json", "summary.json"]
  for name in ("lsq", "lsq_br"):
    result = json.loads((study_dir / f"{name}_s0.json").read_text())
    workdir = study_dir / f"{name}_s0"
    history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert result["config"] == name and result["seed"] == 0
    assert result["command"].startswith("python scripts/train.py ")
    assert f"--workdir={workdir}" in result["command"]
    assert f"--data_dir={study_lib.repo_path(cifar_dir)}" in result["command"]
    assert (result["lambda_w"], result["lambda_a"]) == LAMBDAS[name]
    assert (result["model"], result["bits_w"], result["first_last_bits"]) == ("resnet8", 2, 8)
    assert result["epochs"] == 2 and result["warmup_epochs"] == 1
    assert result["final_test_acc"] == history[-1]["test_acc"]
    assert result["best_test_acc"] == max(m["test_acc"] for m in history)
    assert result["final_train_acc"] == history[-1]["train_acc"]
    assert 0 <= result["final_test_acc"] <= result["best_test_acc"] <= 100
    assert [p["test_acc"] for p in result["curve"]] == [m["test_acc"] for m in history]
    # ResNet-8's quantizers, each epoch: 10 weights (stem, 6 block convs, 2 projections, the
    # head) and 7 activations (the head's input at 8 bits too).
    assert [(len(e["weights"]), len(e["activations"])) for e in result["step_sizes"]] == [
        (10, 7), (10, 7)]
    if name == "lsq":
      assert result["br_w"] is None and result["br_a"] is None  # BR not computed
    else:
      assert result["br_w"] > 0 and result["br_a"] > 0
    assert result["wall_time_s"] > 0 and result["resumed_from_epoch"] is None
    warmup = study_dir / "warmup_s0"
    assert result["warmup_source"]["workdir"] == study_lib.repo_path(str(warmup))
    assert result["warmup_source"]["epoch"] == 1
    assert "--stop_after_epoch=1 " in result["warmup_source"]["command"]
    assert "--branch_from" not in result["command"]  # the run from scratch
    assert result["device"]["platform"] == "cpu" and result["device"]["device_count"] >= 1
    assert result["jax_version"]
    log = (workdir / "train.log").read_text()
    assert "Epoch 2/2 [BR]" in log and f"Branched from {study_lib.repo_path(str(warmup))}" in log
    assert "Epoch 1/2 [WARMUP]" not in log  # trained once, in the shared warmup
  warmup_log = (study_dir / "warmup_s0" / "train.log").read_text()
  assert "Epoch 1/2 [WARMUP]" in warmup_log and "Stopped after epoch 1" in warmup_log
  assert "2-stage QAT+BR training: resnet8, W2A2" in warmup_log
  assert "(--first_last_bits); the rest W2A2" in warmup_log  # the banner's Layers: line
  assert proc.stdout.count("warmup warmup_s0: start") == 1
  study_json = json.loads((study_dir / "study.json").read_text())["flags"]
  assert study_json["seeds"] == [0] and study_json["configs"] == ["lsq", "lsq_br"]
  assert (study_json["model"], study_json["first_last_bits"]) == ("resnet8", 8)

  summary = json.loads((study_dir / "summary.json").read_text())
  assert summary["baseline"] is None  # no --pretrained
  assert list(summary["configs"]) == ["lsq", "lsq_br"]
  for name, c in summary["configs"].items():
    result = json.loads((study_dir / f"{name}_s0.json").read_text())
    assert c["n"] == 1 and c["seeds"] == [0]
    assert c["final_test_acc"] == {"mean": result["final_test_acc"], "std": None,
                                   "values": [result["final_test_acc"]]}
    assert c["best_test_acc"]["mean"] == result["best_test_acc"]
    assert c["command_template"] == result["command"].replace(
        "--seed=0", "--seed={seed}").replace(f"{name}_s0", f"{name}_s{{seed}}")
  markdown = (study_dir / "summary.md").read_text()
  assert markdown.startswith("# LSQ vs LSQ+BR: ResNet-8 W2A2 (first conv and last FC at 8 "
                             "bits)\n\nResNet-8 (--model=resnet8), the first conv and last FC "
                             "at 8 bits (--first_last_bits=8), every other layer at 2 bits; 2 "
                             "epochs (1 LSQ warmup, then BR), ")
  assert "| lsq | LSQ | 1 |" in markdown and "| lsq_br | LSQ + W-BR + A-BR | 1 |" in markdown
  assert markdown in proc.stdout  # the table is printed at the end


@pytest.mark.slow
def test_a_run_with_its_own_warmup_gives_the_shared_warmups_results(study, cifar_dir,
                                                                     tmp_path):
  """--noshare_warmup: lsq_br_s0 trains its own warmup, and writes the same history."""
  shared_dir, _ = study
  proc = run_study(tmp_path / "own", cifar_dir, "--configs=lsq_br", "--noshare_warmup")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "warmup_s0" not in proc.stdout and "Epoch 1/2 [WARMUP]" in proc.stdout
  result = json.loads((tmp_path / "own" / "lsq_br_s0.json").read_text())
  shared = json.loads((shared_dir / "lsq_br_s0.json").read_text())
  assert result["warmup_source"] is None
  for key in ("final_test_acc", "best_test_acc", "final_train_acc", "br_w", "br_a"):
    assert result[key] == shared[key], key
  histories = [[{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}
                for line in (d / "lsq_br_s0" / "metrics.jsonl").read_text().splitlines()]
               for d in (tmp_path / "own", shared_dir)]
  assert histories[0] == histories[1]


@pytest.mark.slow
def test_a_lost_run_branches_again_from_the_kept_warmup(study_copy, cifar_dir):
  study_dir = study_copy
  expected = json.loads((study_dir / "lsq_s0.json").read_text())
  (study_dir / "lsq_s0.json").unlink()
  shutil.rmtree(study_dir / "lsq_s0")
  proc = run_study(study_dir, cifar_dir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[1/2] lsq_s0: branch from warmup_s0" in proc.stdout
  assert "warmup warmup_s0" not in proc.stdout and "Epoch 1/2 [" not in proc.stdout
  result = json.loads((study_dir / "lsq_s0.json").read_text())
  for key in ("final_test_acc", "best_test_acc", "final_train_acc"):
    assert result[key] == expected[key], key


@pytest.mark.slow
def test_second_invocation_skips_finished_runs(study_copy, cifar_dir, capsys):
  study_dir = study_copy
  before = _mtimes(study_dir)
  # In this process: nothing is left to run, so no training process starts.
  code = experiments.main(["experiments.py", f"--study_dir={study_dir}",
                           f"--data_dir={cifar_dir}", *TINY])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "[1/2] lsq_s0: skip" in out and "[2/2] lsq_br_s0: skip" in out
  assert ": start" not in out and ": resume" not in out  # no run started
  assert "Epoch " not in out
  assert _mtimes(study_dir) == before  # results, metrics, checkpoints, logs untouched
  assert "| lsq_br |" in out


@pytest.mark.slow
@pytest.mark.parametrize("changed,message", [
    (["--seeds=0,1"], "--seeds=0 there, --seeds=0,1 here"),
    (["--lr=0.1"], "--lr=0.01 there, --lr=0.1 here"),
    (["--model=resnet14"], "--model=resnet8 there, --model=resnet14 here"),
    (["--first_last_bits=32"], "--first_last_bits=8 there, --first_last_bits=32 here"),
])
def test_other_flags_on_the_same_study_are_refused(study_copy, cifar_dir, changed, message,
                                                  capsys):
  study_dir = study_copy
  before = _mtimes(study_dir)
  # In this process: refused before any run starts (as the real CLI, only faster).
  code = experiments.main(["experiments.py", f"--study_dir={study_dir}",
                           f"--data_dir={cifar_dir}", *TINY, *changed])
  err = one_line_error(capsys.readouterr().err)
  assert code == 2 and message in err, err
  assert _mtimes(study_dir) == before


@pytest.mark.slow
def test_run_without_result_resumes_from_its_checkpoint(study, study_copy, cifar_dir, capsys):
  """A study stopped after lsq_br_s0's epoch 1 (its result and epoch-2 checkpoint gone)."""
  original, study_dir = study[0], study_copy
  expected = json.loads((study_dir / "lsq_br_s0.json").read_text())
  (study_dir / "lsq_br_s0.json").unlink()
  for kind in ("latest", "best"):
    shutil.rmtree(study_dir / "lsq_br_s0" / "checkpoints" / kind / "2", ignore_errors=True)
  runs = _dry_run(capsys, study_dir, cifar_dir)
  assert runs["lsq_s0"][0] == "skip"
  assert runs["lsq_br_s0"][0] == "resume" and runs["lsq_br_s0"][1].endswith(" --resume")

  proc = run_study(study_dir, cifar_dir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[1/2] lsq_s0: skip" in proc.stdout
  assert "[2/2] lsq_br_s0: resume from epoch 1" in proc.stdout
  assert f"Resumed from {study_dir / 'lsq_br_s0'} at epoch 1" in proc.stdout
  assert "Epoch 1/2 [" not in proc.stdout and "Epoch 2/2 [BR]" in proc.stdout
  result = json.loads((study_dir / "lsq_br_s0.json").read_text())
  assert result["resumed_from_epoch"] == 1
  assert result["command"] == expected["command"].replace(str(original), str(study_dir))
  for key in ("final_test_acc", "best_test_acc", "final_train_acc", "br_w", "br_a"):
    assert result[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
  summary = json.loads((study_dir / "summary.json").read_text())
  assert summary["configs"]["lsq_br"]["final_test_acc"]["mean"] == result["final_test_acc"]
