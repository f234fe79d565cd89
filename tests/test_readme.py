"""README.md stays true: its snippet runs, its commands are the ones CI runs."""

import pathlib
import re
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_after(heading: str, lang: str) -> str:
  section = README[README.index(heading):]
  return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def _run_snippet(heading: str, capsys) -> dict:
  namespace = {}
  exec(compile(_code_after(heading, "python"), "README.md", "exec"), namespace)
  return namespace


def _run_training_snippet(heading: str, capsys) -> dict:
  """Runs a snippet that prints ``step i: loss x`` lines; checks that the loss fell."""
  namespace = _run_snippet(heading, capsys)
  lines = capsys.readouterr().out.splitlines()
  losses = [float(l.split("loss ")[1]) for l in lines if l.startswith("step ")]
  assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0], lines
  return namespace


@pytest.mark.slow
def test_linen_snippet_quantizes_an_unmodified_model_trains_and_exports(capsys, tmp_path,
                                                                         monkeypatch):
  namespace = _run_training_snippet("### Linen", capsys)
  params = namespace["variables"]["params"]
  assert set(params["head"]) == {"kernel", "bias", "alpha", "input_alpha"}
  assert set(params["Dense_0"]) == {"kernel", "bias", "alpha", "input_alpha"}
  monkeypatch.chdir(tmp_path)  # the export snippet continues the Linen one
  exec(compile(_code_after("**Export any quantized model.**", "python"), "README.md", "exec"),
       namespace)
  assert (tmp_path / "mlp.npz").stat().st_size == namespace["size"]
  assert capsys.readouterr().out.endswith(" bytes\n")


@pytest.mark.slow
def test_nnx_snippet_quantizes_an_unmodified_model_and_trains(capsys):
  namespace = _run_training_snippet("### NNX", capsys)
  model = namespace["model"]
  assert model.conv.alpha[...].shape == () and model.head.input_alpha[...].shape == ()


@pytest.mark.slow
def test_layers_snippet_runs_and_trains(capsys):
  namespace = _run_snippet("### The layers: the reference package's placement", capsys)
  assert np.isfinite(float(namespace["loss"]))
  assert capsys.readouterr().out.startswith("loss ")
  params = namespace["variables"]["params"]
  alphas = [p for p, _ in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "alpha"]
  assert len(alphas) == 5


def test_ci_runs_the_readme_commands():
  ci = (ROOT / ".ci" / "run").read_text()
  install = _code_after("## Install", "bash").strip()
  test = _code_after("## Test", "bash").strip()
  assert install.replace("python -m pip install", "python -m pip install -q") in ci
  assert ci.strip().splitlines()[-1] == test


def _script_flags(name: str) -> set[str]:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"readme_{name}", ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return set(module.FLAGS)


def test_every_script_command_uses_existing_scripts_and_flags():
  """Each ``python scripts/<name>.py --flag=...`` in README names a script and its flags."""
  text = README.replace("\\\n", " ")
  commands = re.findall(r"python (scripts/\w+\.py)([^\n`]*)", text)
  assert len(commands) >= 10
  known = {}
  for script, args in commands:
    assert (ROOT / script).exists(), script
    name = pathlib.Path(script).stem
    if name not in known:
      known[name] = _script_flags(name)
    for flag in re.findall(r"--(\w+)", args):
      assert flag in known[name] or (flag.startswith("no") and flag[2:] in known[name]), (
          f"README: {script} has no flag --{flag}")


@pytest.mark.parametrize("name,configs,min_seeds", [
    ("study_resnet20_W2A2", {"lsq", "lsq_br", "w_br"}, 3),
    # issue 14's study, committed run by run as its runs finish
    ("study_evidence_W2A2", None, 1)])
def test_results_table_is_the_studys_summary(name, configs, min_seeds):
  """README's Results tables are the ones scripts/experiments.py wrote from the run JSONs."""
  import json  # pylint: disable=g-import-not-at-top
  study = ROOT / "checkpoints" / name
  summary = json.loads((study / "summary.json").read_text())
  table = [l for l in (study / "summary.md").read_text().splitlines() if l.startswith("|")]
  results = README[README.index("## Results"):]
  for line in table:
    assert line in results, f"README Results lacks the {name} summary row {line!r}"
  # summary.md is what experiments.py makes of summary.json, which it made of the run JSONs.
  assert configs is None or set(summary["configs"]) == configs
  for config_name, config in summary["configs"].items():
    runs = [json.loads((study / f"{config_name}_s{s}.json").read_text())
            for s in config["seeds"]]
    diverged = config.get("diverged", [])
    assert config["n"] == len(runs) and len(runs) + len(diverged) >= min_seeds
    if runs:
      assert config["final_test_acc"]["values"] == [r["final_test_acc"] for r in runs]
    for d in diverged:  # a diverged run is in the table by its seed and epoch, from its JSON
      result = json.loads((study / f"{config_name}_s{d['seed']}.json").read_text())
      assert result["outcome"] == "diverged" and result["diverged"]["epoch"] == d["epoch"]
    assert f"`{config['command_template']}`" in results or name != "study_resnet20_W2A2"


def _shortened(line: str) -> str:
  """A plan line as README shows it: the flags before the warmup's or branch's own cut."""
  if line.startswith("#"):
    return line
  head, command = line.split(": ", 1)
  words = command.split()
  own = [w for w in words if w.startswith(("--stop_after_epoch", "--branch_from", "--workdir"))]
  return f"{head}: {' '.join(words[:2] + ['...'] + own)}"


def test_the_evidence_plan_is_what_the_dry_run_prints(cifar_tar, tmp_path):
  """docs/evidence_plan.txt and README's plan: the --preset=evidence --order=config dry run
  of a new study."""
  from brjax.studies import study
  from brjax.studies import plan as study_plan  # pylint: disable=g-import-not-at-top
  flags = {name: None for name in study.STUDY_FLAGS}
  flags = study.check_study(study.apply_preset("evidence", {**flags, "data_dir": cifar_tar},
                                               {"data_dir"}))
  assert flags["data_dir"] == "../shared/datasets/cifar10-jpeg.tar.gz"
  study_dir = tmp_path / "study"  # new: every run "new", as before the study started
  lines = [l.replace(str(study_dir), "checkpoints/study_evidence_W2A2")
           for l in study_plan.dry_run(str(study_dir), flags, order="config")]
  assert (ROOT / "docs" / "evidence_plan.txt").read_text().splitlines() == lines
  shown = _code_after("Its plan, as `--dry_run` prints it", "").strip().splitlines()
  assert shown == [_shortened(l) for l in lines]
