"""README.md stays true: its snippet runs, its commands are the ones CI runs."""

import pathlib
import re
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_after(heading: str, lang: str) -> str:
  section = README[README.index(heading):]
  return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_library_snippet_runs_and_trains():
  namespace = {}
  exec(compile(_code_after("## Use brjax.quant in your own Flax model", "python"),
               "README.md", "exec"), namespace)
  assert np.isfinite(float(namespace["loss"]))
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
