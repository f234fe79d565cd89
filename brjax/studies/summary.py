"""The summary of a study: mean and sample std per config over seeds, as JSON and Markdown.

Pure functions of the run results that ``brjax.studies.study`` writes (one dict per run, with at
least ``config``, ``seed``, ``command``, ``final_test_acc``, ``best_test_acc`` and
``final_train_acc``), plus the atomic file writes that put them on disk. No JAX.

A run whose ``outcome`` is ``"diverged"`` has no accuracies: its config's statistics are
over the runs that finished (``n``), and its seed and epoch are listed apart
(``"diverged"``), never averaged in as a number.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
from typing import Any

from brjax.studies.study import STUDY_DEFAULTS
from brjax.training import history


def write_json(path: str, data: Any) -> None:
  """Writes ``data`` as JSON atomically (a stopped study never leaves half a file)."""
  write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename (atomic)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def finished(result: dict) -> bool:
  """Whether a run result ran all its epochs (results written before ``outcome`` existed
  all did)."""
  return result.get("outcome", "finished") == "finished"


def mean_std(values: list[float]) -> dict | None:
  """Mean and sample standard deviation (n - 1; None for one value) of ``values``; None
  for no value."""
  if not values:
    return None
  return {"mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "values": list(values)}


def command_template(result: dict) -> str:
  """The result's command with its seed (in ``--seed`` and ``--workdir``) as ``{seed}``."""
  seed, mark = str(result["seed"]), "SEED_PLACEHOLDER"
  words = shlex.split(result["command"])
  for i, word in enumerate(words):
    if word == f"--seed={seed}":
      words[i] = f"--seed={mark}"
    elif word.startswith("--workdir=") and word.endswith(f"_s{seed}"):
      words[i] = word[:-len(seed)] + mark
  return shlex.join(words).replace(mark, "{seed}")


def read_baseline(pretrained: str, root: str) -> dict:
  """The float baseline's accuracy from the history of its workdir.

  Args:
    pretrained: the baseline's workdir, relative to ``root`` (or absolute).
    root: the folder the runs execute in (the repository root).

  Returns:
    ``{"workdir", "final_test_acc", "best_test_acc", "epochs", "phase"}``, the accuracies
    None and an ``"error"`` if its metrics.jsonl cannot be read.
  """
  baseline = {"workdir": pretrained, "final_test_acc": None, "best_test_acc": None,
              "epochs": None}
  try:
    records = history.read_history(os.path.join(root, pretrained))
  except (OSError, ValueError) as e:
    baseline["error"] = f"no readable metrics.jsonl ({type(e).__name__})"
    return baseline
  if records:
    last = records[-1]
    baseline.update(final_test_acc=last.get("test_acc"), best_test_acc=last.get("best_test_acc"),
                    epochs=last.get("epoch"), phase=last.get("phase"))
  return baseline


PAIRED_WITH = "lsq"
"""The config every other one is compared with, seed by seed (same warmup, same data order)."""


def paired_difference(rows: list[dict], reference: list[dict], key: str) -> dict | None:
  """Mean and sample std over the seeds both have of ``row[key] - reference[key]`` (the
  seeds share their warmup and data order, so the difference cancels the seed's own
  spread); None without a common seed."""
  by_seed = {r["seed"]: r[key] for r in reference}
  seeds = sorted(r["seed"] for r in rows if r["seed"] in by_seed)
  if not seeds:
    return None
  ours = {r["seed"]: r[key] for r in rows}
  return {**mean_std([ours[s] - by_seed[s] for s in seeds]), "seeds": seeds}


def summarize(results: list[dict], study: dict | None, baseline: dict | None) -> dict:
  """summary.json: per config (in the order of ``results``) the mean and sample std over
  the seeds that finished (``n``; None for none) of the final and best test accuracy and
  the final train accuracy, against :data:`PAIRED_WITH` the paired per-seed differences of
  the final and best test accuracy (``"paired"``: None for that config itself, or without
  a common finished seed), and the runs that diverged (``"diverged"``: seed and epoch).

  Args:
    results: run results, grouped by config in the order the summary shows them.
    study: the study's flags (study.json), or None if unknown.
    baseline: ``read_baseline``'s dict, or None without a float baseline.

  Raises:
    ValueError: the results of one config were run with different commands (beyond the
      seed): they belong to different studies.
  """
  configs: dict[str, list[dict]] = {}
  for result in results:
    configs.setdefault(result["config"], []).append(result)
  out = {"study": study, "baseline": baseline, "configs": {}}
  for name, rows in configs.items():
    templates = sorted({command_template(r) for r in rows})
    if len(templates) > 1:
      raise ValueError(f"the results of config {name} were run with different commands "
                       f"(seeds {[r['seed'] for r in rows]}): keep one study per --study_dir")
    done = [r for r in rows if finished(r)]
    out["configs"][name] = {
        "description": rows[0].get("description", name),
        "n": len(done), "seeds": [r["seed"] for r in done],
        "final_test_acc": mean_std([r["final_test_acc"] for r in done]),
        "best_test_acc": mean_std([r["best_test_acc"] for r in done]),
        "final_train_acc": mean_std([r["final_train_acc"] for r in done]),
        "diverged": [{"seed": r["seed"], **r["diverged"]} for r in rows if not finished(r)],
        "command_template": templates[0],
    }
  reference = [r for r in configs.get(PAIRED_WITH, []) if finished(r)]
  for name, rows in configs.items():
    paired = None
    if reference and name != PAIRED_WITH:
      done = [r for r in rows if finished(r)]
      paired = {key: paired_difference(done, reference, key)
                for key in ("final_test_acc", "best_test_acc")}
      if paired["final_test_acc"] is None:
        paired = None
    out["configs"][name]["paired"] = paired
  return out


def _mean_std(stats: dict, sign: str = "") -> str:
  """``stats`` (a ``mean_std``-like dict) as "mean ± std", or the mean alone for one seed;
  ``sign="+"`` prints the mean's sign (for differences)."""
  std = "" if stats["std"] is None else f" ± {stats['std']:.2f}"
  return f"{stats['mean']:{sign}.2f}{std}"


def _pm(stats: dict | None) -> str:
  return "n/a" if stats is None else _mean_std(stats)


def _paired(c: dict) -> str:
  paired = c.get("paired")
  if paired is None:
    return "-"
  d = paired["final_test_acc"]
  return f"{_mean_std(d, sign='+')} (n={len(d['seeds'])})"


def _acc(value) -> str:
  return "n/a" if value is None else f"{value:.2f}"


MODEL_NAMES = {"resnet20_option_a": "ResNet-20 (option A shortcuts)",
               "resnet18_reference": "ResNet-18 (the reference package's layout)",
               "resnet18_imagenet": "ResNet-18 (ImageNet)", "mobilenet_v2": "MobileNetV2"}
"""The names of the models whose ``--model`` is not ``resnet<depth>``."""


def model_name(model: str) -> str:
  """``resnet8`` -> ``ResNet-8``; the others by :data:`MODEL_NAMES`, else as given."""
  depth = re.fullmatch(r"resnet(\d+)", model)
  return f"ResNet-{depth[1]}" if depth else MODEL_NAMES.get(model, model)


def _first_last(first_last_bits: int | None) -> str:
  return ("" if first_last_bits is None else "first conv and last FC float"
          if first_last_bits == 32 else f"first conv and last FC at {first_last_bits} bits")


def setting(study: dict) -> str:
  """The model and its layers' bit widths, e.g. ``ResNet-8 W2A2 (first conv and last FC at
  8 bits)``; a study.json written before ``--model`` is ResNet-20, every layer at ``--bits``."""
  study = {**STUDY_DEFAULTS, **study}
  bits, first_last = study["bits"], _first_last(study["first_last_bits"])
  return (f"{model_name(study['model'])} W{bits}A{bits}"
          + (f" ({first_last})" if first_last else ""))


def _layers(study: dict) -> str:
  """The setup line's opening on the model and its layers, for a study other than the
  ResNet-20 with every layer at ``--bits`` that every study before ``--model`` was (whose
  line stays as it was)."""
  model, first_last_bits = study.get("model", STUDY_DEFAULTS["model"]), study.get(
      "first_last_bits")
  if model == STUDY_DEFAULTS["model"] and first_last_bits is None:
    return ""
  layers = (f"every layer at {study['bits']} bits" if first_last_bits is None else
            f"the {_first_last(first_last_bits)} (--first_last_bits={first_last_bits}), "
            f"every other layer at {study['bits']} bits")
  return f"{model_name(model)} (--model={model}), {layers}; "


def _setup_lines(study: dict | None) -> list[str]:
  """The title and the one-paragraph setup of the study (its flags), or a bare title."""
  if study is None:
    return ["# LSQ vs LSQ+BR", ""]
  data = study["data_dir"] or "tensorflow-datasets cifar10"
  for split in ("train", "test"):
    if study[f"{split}_examples"]:
      data += f", first {study[f'{split}_examples']} {split} images"
  recipe = study.get("recipe", "brjax")
  recipe = "" if recipe == "brjax" else f"{recipe} recipe, "
  setup = (f"{_layers(study)}{study['epochs']} epochs ({study['warmup_epochs']} LSQ warmup, "
           "then BR), "
           f"{recipe}lr {study['lr']:g}, batch {study['batch_size']}, seeds "
           f"{','.join(map(str, study['seeds']))}; data: {data}; from "
           f"{study['pretrained'] or 'scratch'}.")
  return [f"# LSQ vs LSQ+BR: {setting(study)}", "", setup, ""]


def _diverged(c: dict) -> str:
  return ", ".join(f"s{d['seed']} at epoch {d['epoch']}" for d in c.get("diverged") or []) or "-"


def summary_markdown(summary: dict) -> str:
  """The summary as a Markdown table, then the command template of each config. A
  ``diverged`` column (seed and epoch of each run that diverged) is there when a run
  diverged."""
  lines = _setup_lines(summary["study"])
  any_diverged = any(c.get("diverged") for c in summary["configs"].values())
  extra = (" diverged |", " --- |") if any_diverged else ("", "")
  lines += ["| config | training | n | final test acc (%) | best test acc (%) | "
            f"final train acc (%) | final test acc - {PAIRED_WITH}, same seed (pp) |{extra[0]}",
            f"| --- | --- | ---: | ---: | ---: | ---: | ---: |{extra[1]}"]
  baseline = summary["baseline"]
  if baseline is not None:
    lines.append(f"| float baseline | float, {baseline['epochs'] or '?'} epochs | 1 | "
                 f"{_acc(baseline['final_test_acc'])} | {_acc(baseline['best_test_acc'])} | "
                 f"n/a | - |{' - |' if any_diverged else ''}")
  for name, c in summary["configs"].items():
    lines.append(f"| {name} | {c['description']} | {c['n']} | {_pm(c['final_test_acc'])} | "
                 f"{_pm(c['best_test_acc'])} | {_pm(c['final_train_acc'])} | {_paired(c)} |"
                 + (f" {_diverged(c)} |" if any_diverged else ""))
  lines += ["", "Mean ± sample standard deviation over the n seeds that finished (the value "
            "alone for one seed, n/a for none); test accuracy is always quantized. The last "
            "column is the mean ± std over the seeds both configs ran of (this config's final "
            "test accuracy "
            f"- {PAIRED_WITH}'s) in percentage points: the runs of one seed share their data "
            "order (and, branched, their warmup), so the pairing removes the spread between "
            "seeds."]
  if any_diverged:
    lines[-1] += (" A run that diverged (a step size at or below zero, or a non-finite "
                  "loss: scripts/train.py stops it before saving that epoch) is not in n "
                  "and has no accuracy; the diverged column names its seed and epoch.")
  lines += ["", "Commands (from the repository root; one run per seed):", ""]
  lines += [f"- `{name}`: `{c['command_template']}`" for name, c in summary["configs"].items()]
  if baseline is not None and baseline.get("error"):
    lines += ["", f"Float baseline {baseline['workdir']}: {baseline['error']}."]
  return "\n".join(lines) + "\n"


def write_summary_files(study_dir: str, summary: dict) -> str:
  """Writes ``summary.json`` and ``summary.md`` into ``study_dir``; returns the Markdown."""
  markdown = summary_markdown(summary)
  write_json(os.path.join(study_dir, "summary.json"), summary)
  write_text(os.path.join(study_dir, "summary.md"), markdown)
  return markdown
