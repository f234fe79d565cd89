"""Tests of scripts/train.py: bad flags stop before any work; Ctrl-C and SIGTERM stop
cleanly, saving where they stop, and the run resumes."""

import importlib.util
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "train.py"


def _load_cli():
  spec = importlib.util.spec_from_file_location("train_cli", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cli = _load_cli()


@pytest.mark.parametrize("argv,flag", [
    (["--bits=0"], "--bits=0"),
    (["--bits=9"], "--bits=9"),
    (["--bits=16"], "--bits=16"),
    (["--bits_w=0"], "--bits_w=0"),
    (["--bits_a=12"], "--bits_a=12"),
    (["--bits=abc"], "--bits"),
    (["--lambda_w=-1"], "--lambda_w=-1.0"),
    (["--lambda_a=-0.5"], "--lambda_a=-0.5"),
    (["--epochs=3", "--warmup_epochs=5"], "--warmup_epochs=5"),
    (["--batch_size=0"], "--batch_size=0"),
    (["--batch_size=-4"], "--batch_size=-4"),
    (["--lr=0"], "--lr=0.0"),
    (["--model=vgg16"], "--model"),
    (["--recipe=pytorch"], "--recipe"),
    (["--schedule=linear"], "--schedule"),
    (["--optimizer=rmsprop"], "--optimizer"),
    (["--width=8"], "--width=8"),
    (["--model=resnet18_reference", "--width=0"], "--width=0"),
    (["--model=resnet18_reference", "--pretrained=/no/such.pth"], "--pretrained=/no/such.pth"),
    (["--pretrained=/no/such.pth"], "--pretrained=/no/such.pth"),
    (["--clip=-1"], "--clip=-1.0"),
    (["--abr_clipped=drop"], "--abr_clipped"),
    (["--act_signs=data"], "--act_signs=data"),  # a CIFAR ResNet: its ReLU outputs, unsigned
    (["--act_signs=auto"], "--act_signs"),
    (["--train_examples=-1"], "--train_examples=-1"),
    (["--pretrained=/no/such/run"], "--pretrained=/no/such/run"),
    (["--data_dir=/no/such/data"], "--data_dir=/no/such/data"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["extra_positional"], "extra_positional"),
])
def test_bad_flag_is_one_line_error_before_any_work(argv, flag, capsys, tmp_path):
  workdir = tmp_path / "run"
  code = cli.main(["train.py", f"--workdir={workdir}", *argv])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and flag in err, err
  assert not workdir.exists()


def test_recipe_flags_resolve_and_explicit_flags_override():
  cli.cli.parse_flags(cli.FLAGS, ["train.py", "--recipe=reference", "--bits=1",
                                  "--schedule=step", "--momentum=0.5"])
  config = cli.config_from_flags(cli.FLAGS)
  assert (config.bits_w, config.bits_a) == (1, 1)
  assert (config.optimizer, config.lr, config.weight_decay, config.decay_alphas) == (
      "adam", 0.01, 1e-4, True)
  assert (config.act_grad_scale, config.alpha_init) == ("batch", "first_step")
  assert (config.schedule, config.momentum) == ("step", 0.5)  # explicit flags win
  cli.cli.parse_flags(cli.FLAGS, ["train.py"])
  config = cli.config_from_flags(cli.FLAGS)
  assert (config.recipe, config.optimizer, config.lr, config.schedule) == (
      "brjax", "sgd", 0.1, "cosine")


def test_bad_flag_exit_code_in_a_real_process(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--bits=3", "--bits_a=40",
                         f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: --bits_a=40 is not accepted: use an integer in 1..8, "
                                 "or 32 for float")
  assert proc.stdout == ""


def _tiny_flags(cifar_dir, workdir):
  # The same run as tests/conftest.py's tiny_config, through the CLI.
  return [sys.executable, str(SCRIPT), "--model=resnet8", "--bits=2", "--epochs=2",
          "--warmup_epochs=1", "--train_examples=256", "--test_examples=128",
          "--batch_size=64", "--lr=0.05",
          f"--data_dir={cifar_dir}", f"--workdir={workdir}"]


def _start(argv):
  """Starts a process that handles Ctrl-C as in a terminal, even where this one runs with
  SIGINT ignored (as background jobs do): a handled signal is reset to its default by exec,
  an ignored one would stay ignored."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  # Without the tests' shared compilation cache: compiling keeps epoch 2 long enough for
  # the signal to land in it.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  try:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
  finally:
    signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
# SIGINT (exit 130) is the same path: tests/training/test_multidevice.py and the
# leaked-shared-memory test below send it.
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 75)])
def test_a_signal_saves_where_the_run_stops_and_resume_gives_the_uninterrupted_metrics(
    cifar_dir, tiny_run, tmp_path, capsys, signum, code):
  """Ctrl-C exits 130, SIGTERM 75 (EX_TEMPFAIL: run it again with --resume), each after
  saving where it stopped; the message names the command that continues the run."""
  workdir = tmp_path / "run"
  argv = _tiny_flags(cifar_dir, workdir) + ["--checkpoint_every_steps=2"]
  proc = _start(argv)
  first_save = workdir / "checkpoints" / "steps" / "2"  # epoch 1, step 2 of 4
  deadline = time.time() + 300
  while not first_save.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  sent = time.time()
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  assert time.time() - sent < 30  # well under 30 s on this CPU (a step, a save, the exit)
  assert proc.returncode == code, out[-2000:] + err[-2000:]
  command = shlex.join(["python", str(SCRIPT), *argv[2:], "--resume"])
  last_line = err.rstrip().splitlines()
  assert last_line[-1] == f"  {command}", err[-2000:]
  assert last_line[-2].startswith("interrupted: ") and last_line[-2].endswith(
      f" in {workdir}; continue with"), err[-2000:]
  assert "Traceback" not in out + err
  assert not list(workdir.rglob("*orbax-checkpoint-tmp*"))

  # Without --resume the run refuses to overwrite the interrupted one (found before any
  # work: in this process).
  assert cli.main(["train.py", *argv[2:]]) == 2
  assert "pass --resume" in capsys.readouterr().err

  resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resumed from" in resumed.stdout and "Epoch 2/2 [BR]" in resumed.stdout
  with open(workdir / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [m["epoch"] for m in lines] == [1, 2]
  expected = tiny_run[1]
  for key in ("train_acc", "test_acc", "train_loss", "ce", "br_w", "br_a", "test_loss", "lr",
              "step"):
    assert lines[-1][key] == expected[key], key


def test_help_lists_every_flag_and_exits_zero(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train.py", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--bits", "--bits_w", "--lambda_a", "--[no]freeze_alpha",
               "--[no]br_alpha_grad_a", "--data_dir", "--pretrained", "--[no]resume",
               "--[no]tensorboard"):
    assert flag + ":" in out, flag


def test_a_diverged_run_exits_3_with_its_one_line(monkeypatch, capsys, tmp_path):
  from brjax.training import run_control
  from brjax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  def diverge(*args, **kwargs):
    raise run_control.Diverged(2, "its mean training loss is nan", 1)
  monkeypatch.setattr(train_lib, "train_and_evaluate", diverge)
  cli.FLAGS.unparse_flags()
  cli.FLAGS(["train.py", f"--workdir={tmp_path}"])
  code = cli.train(cli.config_from_flags(cli.FLAGS), str(tmp_path))
  err = capsys.readouterr().err
  assert code == run_control.EXIT_DIVERGED == 3
  assert err.startswith("error: epoch 2 diverged: its mean training loss is nan; the epoch "
                        "was not saved, the checkpoint of epoch 1 is kept") and err.count("\n") == 1


@pytest.mark.slow
def test_a_streamed_run_stopped_by_ctrl_c_to_its_process_group_saves_and_resumes(tmp_path):
  """Ctrl-C in a terminal reaches the whole process group, Grain's workers too: they ignore
  it, the run saves and exits 130 without a traceback or a "leaked shared_memory" warning
  (Grain's read-ahead batches are unlinked), and the resumed run finishes."""
  from brjax.data import synthetic_images  # pylint: disable=g-import-not-at-top
  # 20 steps, each saving a checkpoint: the signal, sent when the second is saved, lands
  # while the run has 18 to go, however fast it compiles or reads its programs back.
  data = synthetic_images.write_image_folder(tmp_path / "data", classes=4, train_per_class=160,
                                             eval_per_class=8)
  workdir = tmp_path / "run"
  argv = [sys.executable, str(SCRIPT), "--model=resnet8", "--bits=2", "--epochs=1",
          "--warmup_epochs=1", "--batch_size=32", f"--data_dir={data}", "--image_size=32",
          "--data_workers=2", "--checkpoint_every_steps=1", f"--workdir={workdir}"]
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)  # its own process group
  deadline = time.time() + 300
  while (not (workdir / "checkpoints" / "steps" / "2").exists() and proc.poll() is None
         and time.time() < deadline):
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err and "interrupted: saved at epoch" in err, err[-2000:]
  assert "leaked shared_memory" not in err, err[-2000:]
  resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "leaked shared_memory" not in resumed.stderr, resumed.stderr[-2000:]
  assert "Epoch 1/1 [WARMUP]" in resumed.stdout
