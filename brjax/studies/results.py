"""A study's results on disk: its ``<config>_s<seed>.json`` files, and the summary made of them.

``summary.json``/``summary.md`` (``brjax.studies.summary``) and ``curves.png``
(``brjax.studies.plots``, imported only here: matplotlib) are written from the results;
no JAX.
"""

from __future__ import annotations

import json
import os

from brjax.studies import summary as study_summary
from brjax.studies.study import CONFIGS, REPO, RESULT_KEYS, RESULT_RE, StudyError, read_study_file


def collect_results(study_dir: str) -> list[dict]:
  """Every ``<config>_s<seed>.json`` result in ``study_dir``, by config order then seed.

  Raises:
    StudyError: a result that cannot be read or lacks one of :data:`RESULT_KEYS`.
  """
  results = []
  for name in sorted(os.listdir(study_dir)):
    if not RESULT_RE.match(name) or name in ("study.json", "summary.json"):
      continue
    path = os.path.join(study_dir, name)
    try:
      with open(path) as f:
        result = json.load(f)
    except (OSError, ValueError) as e:
      raise StudyError(f"{path} could not be read ({type(e).__name__}: {e}): delete it to "
                       "run that run again") from None
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
      raise StudyError(f"{path} is not a run result (missing {', '.join(missing)}): delete "
                       "it to run that run again")
    result.setdefault("description", CONFIGS.get(result["config"], (result["config"],))[0])
    results.append(result)
  order = {name: i for i, name in enumerate(CONFIGS)}
  return sorted(results, key=lambda r: (order.get(r["config"], len(order)), r["config"],
                                        r["seed"]))


CURVES_FILE = "curves.png"


def write_summary(study_dir: str, study: dict | None, pretrained: str | None) -> str:
  """Writes summary.json and summary.md from the results in ``study_dir``, and
  :data:`CURVES_FILE` (``plots.study_curves_figure``) if a result has per-epoch curves;
  returns the table.

  Args:
    study_dir: the study's folder.
    study: its flags (study.json), or None if unknown.
    pretrained: the float baseline's workdir (relative to the repository root), or None.

  Raises:
    StudyError: a malformed result, or none at all.
  """
  results = collect_results(study_dir)
  if not results:
    raise StudyError(f"--study_dir={study_dir} holds no result (<config>_s<seed>.json): run "
                     "the study first")
  baseline = study_summary.read_baseline(pretrained, REPO) if pretrained else None
  try:
    summary = study_summary.summarize(results, study, baseline)
  except ValueError as e:
    raise StudyError(str(e)) from None
  markdown = study_summary.write_summary_files(study_dir, summary)
  from brjax.studies import plots  # pylint: disable=g-import-not-at-top (matplotlib: only here)
  fig = plots.study_curves_figure(results)
  if fig is not None:
    plots.save(fig, os.path.join(study_dir, CURVES_FILE))
  return markdown


def summarize_only(study_dir: str, pretrained: str | None = None) -> str:
  """Rebuilds the summary of the results in ``study_dir``; returns its Markdown.

  The study's flags come from its study.json if there is one; ``pretrained`` (if given)
  replaces the baseline workdir recorded there.
  """
  if not os.path.isdir(study_dir):
    raise StudyError(f"--study_dir={study_dir} is not accepted: no such folder")
  study = read_study_file(study_dir)
  if pretrained is None and study is not None:
    pretrained = study.get("pretrained")
  return write_summary(study_dir, study, pretrained)


