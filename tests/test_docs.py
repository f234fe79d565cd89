"""The documentation site (docs/) builds, documents every public name, and stays true: its
commands name real flags, its results are the studies' files, its plan is the dry run's."""

import ast
import importlib
import importlib.util
import json
import pathlib
import pkgutil
import re
import subprocess
import sys
import types

import pytest
import test_readme  # tests/ is on the path, as for every test module here

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md")
               if not p.relative_to(DOCS).parts[0].startswith(("_build", "jupyter_execute")))
BUILD = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]


def _page(name: str) -> str:
  return (DOCS / name).read_text()


def _needs_sphinx():
  for module in ("sphinx", "myst_nb", "sphinx_book_theme"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} is not installed: the docs build needs "
                  "`pip install -r docs/requirements.txt`")


def _coverage_check():
  _needs_sphinx()
  sys.path.insert(0, str(DOCS / "ext"))
  try:
    return importlib.import_module("coverage_check")
  finally:
    sys.path.remove(str(DOCS / "ext"))


def _conf_value(name: str):
  """A literal assignment of docs/conf.py, read without running it."""
  tree = ast.parse((DOCS / "conf.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
      return ast.literal_eval(node.value)
  raise KeyError(name)


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
  """The command README gives builds the site: every example page runs, every public name
  is in the API reference, nothing warns."""
  _needs_sphinx()
  out = tmp_path / "html"
  build = subprocess.run([*BUILD, "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
  # The executed examples printed their losses; the results page holds the study's table.
  quantize = (out / "guides" / "quantize.html").read_text()
  assert "step 2: loss" in quantize
  assert "bytes, float" in (out / "guides" / "export.html").read_text()
  results = (out / "results.html").read_text()
  assert "lsq_br_noclip" in results and "curves.png" in results
  assert (out / "api" / "index.html").exists()


def test_readme_gives_the_docs_build_command():
  command = test_readme._code_after("## Documentation", "bash").strip().splitlines()
  assert command == ["python -m pip install -r docs/requirements.txt",
                     "sphinx-build -W --keep-going -b html docs docs/_build/html"]
  for name in ("sphinx", "myst-nb", "sphinx-book-theme"):
    assert re.search(rf"^{name}>=", (DOCS / "requirements.txt").read_text(), re.M), name


def test_coverage_check_fails_on_an_undocumented_name(monkeypatch):
  coverage = _coverage_check()
  from sphinx import errors  # pylint: disable=g-import-not-at-top
  fake = types.ModuleType("fake_public")
  fake.__all__ = ["documented", "forgotten"]
  monkeypatch.setitem(sys.modules, "fake_public", fake)
  assert coverage.undocumented([fake], {"fake_public.documented"}) == ["fake_public.forgotten"]
  coverage.check_coverage(["fake_public"], {"fake_public.documented", "fake_public.forgotten"})
  with pytest.raises(errors.SphinxError, match=r"fake_public\.forgotten"):
    coverage.check_coverage(["fake_public"], {"fake_public.documented"})
  del fake.__all__  # a checked module must say what is public
  with pytest.raises(errors.SphinxError, match="no __all__"):
    coverage.check_coverage(["fake_public"], set())


def test_coverage_check_takes_a_package_without_all_as_its_modules(tmp_path, monkeypatch):
  coverage = _coverage_check()
  (tmp_path / "fake_pkg").mkdir()
  for name in ("__init__", "public", "_private"):
    (tmp_path / "fake_pkg" / f"{name}.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  package = importlib.import_module("fake_pkg")
  assert coverage.public_names(package) == ["fake_pkg.public"]
  assert coverage.undocumented([package], {"fake_pkg"}) == ["fake_pkg.public"]


def test_coverage_check_covers_brjax_and_every_public_subpackage():
  import brjax  # pylint: disable=g-import-not-at-top
  modules = set(_conf_value("coverage_check_modules"))
  assert "brjax" in modules
  for name in brjax.__all__:
    value = getattr(brjax, name)
    if isinstance(value, types.ModuleType):
      assert value.__name__ in modules, f"{value.__name__} is public but not checked"


def _public_names(module: types.ModuleType) -> list[str]:
  """As docs/ext/coverage_check.py: ``__all__``, or a package's public modules."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [m.name for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")]


def test_api_pages_name_every_public_name():
  """The fast tier's half of the coverage check: each checked module's public names are
  written in its API pages (the build checks that they became entries)."""
  api = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
  missing = []
  for module_name in _conf_value("coverage_check_modules"):
    module = importlib.import_module(module_name)
    for name in _public_names(module):
      if not re.search(rf"(?<![\w.]){re.escape(name)}\b|{re.escape(module_name)}\.{name}\b", api):
        missing.append(f"{module_name}.{name}")
  assert not missing, f"not in docs/api/*.md: {missing}"


def test_every_script_command_uses_existing_scripts_and_flags():
  """Each ``python scripts/<name>.py --flag=...`` of README and the docs' pages names a
  script and its flags."""
  count = test_readme.script_commands_are_valid(test_readme.README, "README")
  for page in PAGES:
    count += test_readme.script_commands_are_valid(page.read_text(), str(page.relative_to(ROOT)))
  assert count >= 20


def test_readme_linen_example_is_the_docs_one():
  """README's Linen example is the first example of the docs' guide (which the build runs)."""
  guide = _page("guides/quantize.md")
  cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", guide, re.S)
  assert cells[0] == test_readme._code_after("### Linen", "python")


def test_example_pages_are_executed_and_the_others_say_so():
  """Pages with code cells run at every build; a guide without them says it is not run."""
  conf = (DOCS / "conf.py").read_text()
  assert 'nb_execution_mode = "force"' in conf and "nb_execution_raise_on_error = True" in conf
  executed = {p.name for p in PAGES if "```{code-cell}" in p.read_text()}
  assert {"quantize.md", "export.md"} <= executed
  for page in (DOCS / "guides").glob("*.md"):
    text = page.read_text()
    if page.name not in executed:
      assert "not executed" in text.lower() or "not run" in text.lower(), page.name
    else:
      assert text.startswith("---\nfile_format: mystnb\n"), page.name


@pytest.mark.parametrize("name,configs,min_seeds", [
    ("study_resnet20_W2A2", {"lsq", "lsq_br", "w_br"}, 3),
    ("study_evidence_W2A2", None, 1)])
def test_results_page_includes_the_studys_summary(name, configs, min_seeds):
  """The Results page includes the study's summary.md (which experiments.py wrote from the
  run JSONs, checked here) rather than a copy of its numbers."""
  study = ROOT / "checkpoints" / name
  results = _page("results.md")
  assert f"```{{include}} ../checkpoints/{name}/summary.md" in results
  summary = json.loads((study / "summary.json").read_text())
  table = [l for l in (study / "summary.md").read_text().splitlines() if l.startswith("|")]
  assert not any(line in results for line in table[2:]), "a copied row: include the file"
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
    assert f"`{config['command_template']}`" in (study / "summary.md").read_text()
  if (study / "curves.png").exists():
    assert f"../checkpoints/{name}/curves.png" in results


def _shortened(line: str) -> str:
  """A plan line as the docs show it: the flags before the warmup's or branch's own cut."""
  if line.startswith("#"):
    return line
  head, command = line.split(": ", 1)
  words = command.split()
  own = [w for w in words if w.startswith(("--stop_after_epoch", "--branch_from", "--workdir"))]
  return f"{head}: {' '.join(words[:2] + ['...'] + own)}"


def test_the_evidence_plan_is_what_the_dry_run_prints(cifar_archive, tmp_path):
  """docs/evidence_plan.txt and the comparison-studies guide's plan: the --preset=evidence
  --order=config dry run of a new study."""
  from brjax.studies import plan as study_plan  # pylint: disable=g-import-not-at-top
  from brjax.studies import study  # pylint: disable=g-import-not-at-top
  flags = {name: None for name in study.STUDY_FLAGS}
  flags = study.check_study(study.apply_preset("evidence", {**flags, "data_dir": cifar_archive},
                                               {"data_dir"}))
  assert flags["data_dir"] == "../shared/datasets/cifar10-jpeg.tar.gz"
  study_dir = tmp_path / "study"  # new: every run "new", as before the study started
  lines = [l.replace(str(study_dir), "checkpoints/study_evidence_W2A2")
           for l in study_plan.dry_run(str(study_dir), flags, order="config")]
  assert (DOCS / "evidence_plan.txt").read_text().splitlines() == lines
  guide = _page("guides/experiments.md")
  shown = test_readme._code_after("Its plan, as `--dry_run` prints it", "", guide)
  assert shown.strip().splitlines() == [_shortened(l) for l in lines]
  assert "```{literalinclude} ../evidence_plan.txt" in guide


def test_layout_page_names_every_module():
  """docs/layout.md (the old README's Layout) has a line for every module of brjax."""
  layout = _page("layout.md")
  modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "brjax").rglob("*.py")
             if not p.name.startswith("_")]
  assert len(modules) > 40
  missing = [m for m in modules if not re.search(rf"^{re.escape(m)}\s", layout, re.M)
             and f"`{m}`" not in layout]
  assert not missing, f"docs/layout.md lacks {missing}"


def _resolve(dotted: str):
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      value = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError:
      continue
    for part in parts[i:]:
      value = getattr(value, part)
    return value
  raise ModuleNotFoundError(dotted)


def test_every_brjax_name_in_readme_and_the_guides_exists(recwarn):
  """``brjax.x.y`` in README and the pages names a module or attribute that exists under
  that path, not a 0.1 path kept for a release (the API index and the changelog name those
  on purpose)."""
  import warnings  # pylint: disable=g-import-not-at-top
  texts = {"README.md": test_readme.README}
  texts.update({str(p.relative_to(ROOT)): p.read_text() for p in PAGES})
  bad = []
  for where, text in texts.items():
    if where in ("docs/api/index.md", "docs/changelog.md"):
      continue
    for name in sorted(set(re.findall(r"(?<![\w/.])brjax(?:\.\w+)+", text))):
      if name.endswith((".pth", ".py", ".npz")):
        continue
      with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
          _resolve(name)
        except (AttributeError, ModuleNotFoundError, DeprecationWarning) as e:
          bad.append(f"{where}: {name} ({type(e).__name__})")
  assert not bad, bad
