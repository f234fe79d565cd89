"""README.md stays true: its snippet runs, its commands are the ones CI runs, its table is
the study's. The rest of the manual is the documentation site (tests/test_docs.py)."""

import json
import pathlib
import re
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FIRST_SCREEN = 60  # lines a newcomer sees without scrolling


def _code_after(heading: str, lang: str, text: str = README) -> str:
  section = text[text.index(heading):]
  return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def _export_cell() -> str:
  """The export guide's example, which continues README's Linen one."""
  guide = (ROOT / "docs" / "guides" / "export.md").read_text()
  cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", guide, re.S)
  (cell,) = [c for c in cells if "export.from_linen" in c]
  return cell


@pytest.mark.slow
def test_linen_snippet_quantizes_an_unmodified_model_trains_and_exports(capsys, tmp_path,
                                                                         monkeypatch):
  namespace = {}
  exec(compile(_code_after("### Linen", "python"), "README.md", "exec"), namespace)
  lines = capsys.readouterr().out.splitlines()
  losses = [float(l.split("loss ")[1]) for l in lines if l.startswith("step ")]
  assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0], lines
  params = namespace["variables"]["params"]
  assert set(params["head"]) == {"kernel", "bias", "alpha", "input_alpha"}
  assert set(params["Dense_0"]) == {"kernel", "bias", "alpha", "input_alpha"}
  monkeypatch.chdir(tmp_path)
  exec(compile(_export_cell(), "docs/guides/export.md", "exec"), namespace)
  assert (tmp_path / "mlp.npz").stat().st_size == namespace["size"]
  assert capsys.readouterr().out.endswith(" bytes\n")


def test_readme_is_short_and_starts_with_what_a_newcomer_needs():
  """At most 200 lines; install, the main command and "Quantize your own model" in the
  first screenful."""
  lines = README.splitlines()
  assert len(lines) <= 200, len(lines)
  first = "\n".join(lines[:FIRST_SCREEN])
  for needle in ("## Install", "pip install -r requirements.txt -e .", "## Train",
                 "python scripts/train.py --bits=2 --lambda_a=1.0", "## Quantize your own model"):
    assert needle in first, f"README's first {FIRST_SCREEN} lines lack {needle!r}"


def test_ci_runs_the_readme_commands():
  ci = (ROOT / ".ci" / "run").read_text()
  install = _code_after("## Install", "bash").strip()
  test = _code_after("## Test", "bash").strip()
  assert install.replace("python -m pip install", "python -m pip install -q") in ci
  assert test == "python -m pytest -q -n 2"
  assert test in ci.splitlines()
  fast = _code_after("the fast tier", "bash").strip()
  assert fast == test + ' -m "not slow"'


def test_readme_links_point_to_files():
  """Every relative link of README names a file of the repository (the docs' sources)."""
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
  local = [l for l in links if "://" not in l]
  assert len(local) >= 10
  for link in local:
    assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def _script_flags(name: str) -> set[str]:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"readme_{name}", ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return set(module.FLAGS)


def script_commands_are_valid(text: str, where: str) -> int:
  """Checks each ``python scripts/<name>.py --flag=...`` of ``text``; returns how many."""
  text = text.replace("\\\n", " ")
  commands = re.findall(r"python (scripts/\w+\.py)([^\n`]*)", text)
  known = {}
  for script, args in commands:
    assert (ROOT / script).exists(), f"{where}: {script}"
    name = pathlib.Path(script).stem
    if name not in known:
      known[name] = _script_flags(name)
    for flag in re.findall(r"--(\w+)", args):
      assert flag in known[name] or (flag.startswith("no") and flag[2:] in known[name]), (
          f"{where}: {script} has no flag --{flag}")
  return len(commands)


def test_every_script_command_uses_existing_scripts_and_flags():
  """Each ``python scripts/<name>.py --flag=...`` in README names a script and its flags
  (the docs' commands: tests/test_docs.py)."""
  assert script_commands_are_valid(README, "README") >= 2


def test_results_table_is_the_studys_summary():
  """README's headline table is the evidence study's summary.md, row for row."""
  summary = (ROOT / "checkpoints" / "study_evidence_W2A2" / "summary.md").read_text()
  table = [l for l in summary.splitlines() if l.startswith("|")]
  results = README[README.index("## Results"):]
  assert len(table) >= 4
  for line in table:
    assert line in results, f"README Results lacks the evidence study's summary row {line!r}"
  # The command beside it is the one the study recorded (--order is not a study flag).
  study = json.loads((ROOT / "checkpoints" / "study_evidence_W2A2" / "study.json").read_text())
  command = " ".join(_code_after("Written by", "bash", results).replace("\\\n", " ").split())
  assert command.replace(" --order=config", "") == study["command"]
