"""brjax.training.history: reading a run's metrics.jsonl and listing its checkpoints, without
JAX."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from brjax.training import history

REPO = pathlib.Path(__file__).resolve().parents[2]


def write_metrics(workdir, text: str) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text(text)


def test_reads_one_record_per_line_in_order(tmp_path):
  records = [{"epoch": 1, "test_acc": 10.0}, {"epoch": 2, "test_acc": float("nan")}]
  write_metrics(tmp_path, "".join(json.dumps(r) + "\n" for r in records) + "\n")
  got = history.read_history(str(tmp_path))
  assert [r["epoch"] for r in got] == [1, 2] and got[0]["test_acc"] == 10.0


def test_missing_metrics(tmp_path):
  with pytest.raises(FileNotFoundError):
    history.read_history(str(tmp_path))
  assert history.read_history(str(tmp_path), missing_ok=True) == []


def test_a_last_line_cut_short_is_dropped(tmp_path):
  """A process killed while appending an epoch leaves its line without a newline."""
  write_metrics(tmp_path, '{"epoch": 1}\n{"epoch": 2, "test_a')
  assert history.read_history(str(tmp_path)) == [{"epoch": 1}]


@pytest.mark.parametrize("text,message", [
    ('{"epoch": 1}\n{"epoch": 2,\n{"epoch": 3}\n', "line 2 is not JSON"),
    ('{"epoch": 1}\n{"epoch": 2,\n', "line 2 is not JSON"),  # ends with its newline: damaged
    ('{"epoch": 1}\n[1, 2]\n', "line 2 has no 'epoch'"),
    ('{"test_acc": 1.0}\n', "line 1 has no 'epoch'"),
])
def test_a_damaged_line_is_an_error_naming_it(tmp_path, text, message):
  write_metrics(tmp_path, text)
  with pytest.raises(history.HistoryError, match=message) as e:
    history.read_history(str(tmp_path))
  assert str(tmp_path / "metrics.jsonl") in str(e.value) and isinstance(e.value, ValueError)


def test_a_line_that_is_not_utf8_is_an_error_naming_it(tmp_path):
  """A stray byte said only ``'utf-8' codec can't decode byte 0xff``, naming no file."""
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n{"epoch": 2, "x": "\xff"}\n')
  with pytest.raises(history.HistoryError, match=r"metrics.jsonl line 2 is not UTF-8 text "
                                                 r"\(byte 0xff at column 20\)") as e:
    history.read_history(str(tmp_path))
  assert str(tmp_path / "metrics.jsonl") in str(e.value)


def test_a_damaged_checkpoint_meta_is_an_error_naming_it(tmp_path):
  folder = tmp_path / "checkpoints" / "latest" / "3" / "meta"
  folder.mkdir(parents=True)
  (folder / "metadata").write_bytes(b'{"epoch": \xff}')
  with pytest.raises(ValueError, match=r"checkpoints/latest/3/meta/metadata is not a JSON "
                                       r"object"):
    history.read_checkpoint_meta(str(tmp_path))


def test_checkpoint_epochs(tmp_path):
  latest = tmp_path / "checkpoints" / "latest"
  for name in ("3", "12", "4.orbax-checkpoint-tmp-1"):
    (latest / name).mkdir(parents=True)
  (latest / "7").write_text("")  # a file, not a checkpoint
  assert history.checkpoint_epochs(str(tmp_path)) == [3, 12]
  assert history.checkpoint_epochs(str(tmp_path), "best") == []
  assert history.has_checkpoint(str(tmp_path))
  assert not history.has_checkpoint(str(tmp_path), ("best",))
  assert not history.has_checkpoint(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="kind='worst'"):
    history.checkpoint_epochs(str(tmp_path), "worst")


def test_reading_and_planning_import_no_jax():
  """``import brjax`` imports neither JAX nor matplotlib (the flat API loads on first use);
  brjax.training.history and config, the study and the figures of a history need no JAX: a study
  runner holds no accelerator memory its runs need."""
  code = """if True:
    import sys
    import brjax
    assert not {"jax", "matplotlib"} & set(sys.modules), "import brjax"
    import brjax.training.history, brjax.training.config, brjax.quant.bits
    import brjax.studies.study, brjax.studies.results, brjax.studies.plan
    import brjax.studies.runner, brjax.studies.analysis, brjax.studies.plots, brjax.bench.report
    assert "jax" not in sys.modules, sorted(m for m in sys.modules if "jax" in m)
    assert brjax.qrange(2, True) == (-2, 1) and brjax.quantize_model and "jax" in sys.modules
  """
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


def test_append_and_truncate_keep_the_finished_epochs(tmp_path):
  for epoch in (1, 2, 3):
    history.append_record(str(tmp_path), {"epoch": epoch, "test_acc": 10.0 * epoch})
  history.truncate_history(str(tmp_path), 2)
  assert history.read_history(str(tmp_path)) == [{"epoch": 1, "test_acc": 10.0},
                                                  {"epoch": 2, "test_acc": 20.0}]
  # A line cut short by a kill is dropped by the truncation too, not a crash.
  with open(history.metrics_path(str(tmp_path)), "a") as f:
    f.write('{"epoch": 3, "te')
  history.truncate_history(str(tmp_path), 2)
  assert [r["epoch"] for r in history.read_history(str(tmp_path))] == [1, 2]
