"""Tests of brjax.data.streaming on a generated ImageNet-layout folder of small JPEGs of
mixed sizes."""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
from pathlib import Path
import signal
import subprocess
import sys

import grain
import jax
import numpy as np
from PIL import Image
import pytest

from brjax.data import input_pipeline, streaming, streaming_dataset

CLASSES = ("c0", "c1", "c2")
N_TRAIN, N_VAL = 60, 20  # per class: 180 train and 60 val images
SIZE = 16  # the side of the batches' images
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def write_jpeg(path: Path, rng: np.random.Generator, hw=None) -> None:
  h, w = hw if hw is not None else rng.integers(20, 81, size=2)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def make_folder(root: Path, n_train=N_TRAIN, n_val=N_VAL, eval_folder="val") -> Path:
  """``root/train/<class>/NNN.JPEG`` and ``root/<eval_folder>/<class>/NNN.JPEG``, 20-80 px."""
  rng = np.random.default_rng(0)
  for split, count in (("train", n_train), (eval_folder, n_val)):
    for cls in CLASSES:
      (root / split / cls).mkdir(parents=True)
      for i in range(count):
        write_jpeg(root / split / cls / f"{i:03d}.JPEG", rng)
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
  return make_folder(tmp_path_factory.mktemp("imagenet_layout"))


def make(folder: Path, **options) -> streaming.StreamingDataset:
  return streaming.from_folder(folder, image_size=SIZE, mean=MEAN, std=STD, **options)


def sharded(ds, index: int, count: int):
  return dataclasses.replace(ds, shard_options=grain.sharding.ShardOptions(index, count))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def error_message(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


def test_folder_lists_imagenet_layout_in_canonical_order(folder):
  ds = make(folder)
  assert ds.class_names == CLASSES and ds.num_classes == 3
  assert streaming.num_examples(ds, "train") == 180 and streaming.num_examples(ds, "test") == 60
  assert ds.train_source.path(0) == str(folder / "train" / "c0" / "000.JPEG")
  assert ds.train_source.path(4) == str(folder / "train" / "c1" / "001.JPEG")
  np.testing.assert_array_equal(ds.train_source.labels[:6], [0, 1, 2, 0, 1, 2])
  assert ds.test_source.path(2).startswith(str(folder / "val" / "c2"))
  small = make(folder, train_examples=7, test_examples=5)
  assert len(small.train_source) == 7 and len(small.test_source) == 5


def test_statistics_are_those_of_the_eval_transformed_sample(folder):
  ds = streaming.from_folder(folder, image_size=SIZE, stats_examples=30)
  full = make(folder)
  sample = np.sort(np.argsort(full.train_source.labels, kind="stable")[np.arange(30) * 180 // 30])
  images = np.stack([streaming.eval_transform(
      streaming.open_image(*full.train_source[i][::2]), SIZE) for i in sample])
  pixels = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-5)
  np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-4)
  assert ds.mean.dtype == ds.std.dtype == np.float32


def test_two_processes_read_disjoint_shards_that_cover_the_epoch_once(folder):
  ds = make(folder)
  batch, steps = 32, 180 // 32
  plans = [streaming.train_plan(sharded(ds, p, 2), batch, seed=3, epoch=2) for p in (0, 1)]
  assert all(p.shape == (steps, batch // 2) for p in plans)
  perm = np.random.default_rng([3, 2]).permutation(180)  # input_pipeline's order
  np.testing.assert_array_equal(np.concatenate(plans, axis=1).ravel(), perm[:steps * batch])
  seen = np.concatenate([p.ravel() for p in plans])
  assert len(np.unique(seen)) == len(seen) == steps * batch
  whole = list(streaming.train_batches(ds, batch, seed=3, epoch=2))
  shards = [list(streaming.train_batches(sharded(ds, p, 2), batch, seed=3, epoch=2))
            for p in (0, 1)]
  for k, (b0, b1) in enumerate(zip(*shards)):
    assert b0["image"].shape == (16, SIZE, SIZE, 3) and b0["image"].dtype == np.float32
    np.testing.assert_array_equal(b0["label"], ds.train_source.labels[plans[0][k]])
    for key in ("image", "label"):  # each process holds its block of the global batch
      np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), whole[k][key])
  evals = [list(streaming.eval_batches(sharded(ds, p, 2), batch)) for p in (0, 1)]
  assert len(evals[0]) == len(evals[1]) == 2  # ceil(60 / 32), the same on both
  real = np.concatenate([streaming.eval_plan(sharded(ds, p, 2), batch).ravel() for p in (0, 1)])
  np.testing.assert_array_equal(np.sort(real[real >= 0]), np.arange(60))
  assert sum(int(b["mask"].sum()) for e in evals for b in e) == 60
  with pytest.raises(ValueError, match="multiple of the 2 processes") as e:
    streaming.train_plan(sharded(ds, 0, 2), 33, seed=3, epoch=2)
  error_message(e)


def test_resume_mid_epoch_from_the_saved_state_gives_the_same_batches(folder):
  ds = make(folder)
  it = streaming.train_batches(ds, 16, seed=1, epoch=1)
  for _ in range(4):
    next(it)
  state = it.get_state()
  assert json.loads(state)["next_batch"] == 4
  rest = list(it)
  resumed = streaming.train_batches(ds, 16, seed=1, epoch=1)
  resumed.set_state(state)
  assert len(resumed) == len(rest) == 180 // 16 - 4
  assert_same_batches(list(resumed), rest)
  other = streaming.train_batches(ds, 16, seed=1, epoch=2)
  with pytest.raises(ValueError, match=r"other batches: epoch=1 \(here 2\)") as e:
    other.set_state(state)
  error_message(e)
  with pytest.raises(ValueError, match="shard=") as e:
    streaming.train_batches(sharded(ds, 1, 2), 16, seed=1, epoch=1).set_state(state)
  with pytest.raises(ValueError, match="not a brjax.data.streaming iterator state") as e:
    other.set_state(b"{}")


LEAK_CHECK = """
import sys
from brjax.data import streaming

def main():
  ds = streaming.from_folder(sys.argv[1], image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                             worker_count=2)
  it = streaming.train_batches(ds, 16, seed=0, epoch=1)
  for _ in range({batches}):
    next(it)
  it.close()

if __name__ == "__main__":
  main()
"""


@pytest.mark.slow  # starts worker processes (seconds)
@pytest.mark.parametrize("stop", ["mid_epoch", "end"])
def test_workers_leave_no_shared_memory_at_exit(folder, tmp_path, stop):
  """Batches the workers had sent and nobody read (a stop mid-epoch, the read-ahead at the
  end) are unlinked at ``close()``: the process exits without the resource tracker's
  "leaked shared_memory objects" warning (before the fix it warned in most runs, in
  either case)."""
  batches = 3 if stop == "mid_epoch" else streaming.num_train_steps(make(folder), 16)
  script = tmp_path / "leak_check.py"
  script.write_text(LEAK_CHECK.format(batches=batches))
  result = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "leaked shared_memory" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # starts worker processes (seconds)
def test_workers_give_the_in_process_batches_and_their_state_resumes_in_process(folder):
  ds = make(folder)
  expected = list(streaming.train_batches(ds, 32, seed=0, epoch=1))
  with streaming.train_batches(dataclasses.replace(ds, worker_count=2), 32, seed=0,
                               epoch=1) as it:
    head = [next(it), next(it)]
    workers = multiprocessing.active_children()
    assert len(workers) >= 2
    for worker in workers:  # Ctrl-C reaches the workers too: they ignore it
      os.kill(worker.pid, signal.SIGINT)
    head.append(next(it))
    head.append(next(it))
    assert all(w.is_alive() for w in workers)
    state = it.get_state()
    assert json.loads(it.get_state(next_batch=1))["next_batch"] == 1
  assert type(head[0]["image"]) is np.ndarray  # a plain copy, not Grain's shared memory
  resumed = streaming.train_batches(ds, 32, seed=0, epoch=1)
  resumed.set_state(state)
  assert_same_batches(head + list(resumed), expected)


def test_batches_are_a_function_of_seed_and_epoch(folder):
  ds = make(folder)
  run = lambda seed, epoch: list(streaming.train_batches(ds, 32, seed=seed, epoch=epoch))
  first = run(5, 3)
  assert_same_batches(run(5, 3), first)
  for other in (run(5, 4), run(6, 3)):
    assert not np.array_equal(np.concatenate([b["label"] for b in other]),
                              np.concatenate([b["label"] for b in first]))
    assert not np.array_equal(other[0]["image"], first[0]["image"])


def bad_folder(root: Path, name: str, data: bytes) -> Path:
  make_folder(root, n_train=3, n_val=1)
  (root / "train" / "c1" / name).write_bytes(data)
  return root


def jpeg_bytes() -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(out, format="JPEG")
  return out.getvalue()


def png16_bytes() -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(out, format="PNG")
  return out.getvalue()


@pytest.mark.parametrize("data, reason", [
    (jpeg_bytes()[:300], "[Tt]runcated"),
    (png16_bytes(), "unsupported image mode I;16"),
    (b"not an image", "not a recognized image file"),
])
def test_bad_images_are_reported_with_their_path(tmp_path, data, reason):
  ds = make(bad_folder(tmp_path, "bad.JPEG", data))
  with pytest.raises(ValueError, match=reason) as e:
    list(streaming.train_batches(ds, 2, seed=0, epoch=0))
  bad = tmp_path / "train" / "c1" / "bad.JPEG"
  assert error_message(e).startswith(f"cannot decode image {bad}: ")


@pytest.mark.slow  # starts worker processes (seconds)
def test_a_bad_image_in_a_worker_is_reported_with_its_path(tmp_path):
  ds = make(bad_folder(tmp_path, "bad.JPEG", jpeg_bytes()[:300]), worker_count=1)
  with pytest.raises(ValueError, match="[Tt]runcated") as e:
    list(streaming.train_batches(ds, 2, seed=0, epoch=0))
  assert str(tmp_path / "train" / "c1" / "bad.JPEG") in error_message(e)


def test_eval_batches_are_center_crops_padded_to_whole_batches(folder):
  ds = make(folder)
  batches = list(streaming.eval_batches(ds, 32))
  assert [int(b["mask"].sum()) for b in batches] == [32, 28]
  last = batches[-1]
  assert last["image"].shape == (32, SIZE, SIZE, 3) and last["image"].dtype == np.float32
  assert last["label"].dtype == np.int32 and last["mask"].dtype == bool
  assert not last["image"][28:].any() and not last["label"][28:].any()
  raw = [streaming.open_image(*ds.test_source[i][::2]) for i in range(32)]
  np.testing.assert_allclose(batches[0]["image"], input_pipeline.normalize(
      np.stack([streaming.eval_transform(im, SIZE) for im in raw]), ds.mean, ds.std))
  uint8 = list(streaming.eval_batches(dataclasses.replace(ds, dtype="uint8"), 32))
  assert uint8[0]["image"].dtype == np.uint8
  np.testing.assert_allclose(input_pipeline.normalize(uint8[0]["image"], ds.mean, ds.std),
                             batches[0]["image"])


def test_eval_transform_keeps_the_center_and_train_transform_the_size():
  pixels = np.zeros((40, 80, 3), np.uint8)  # H 40, W 80: blue borders, red center
  pixels[:, :20] = pixels[:, 60:] = (0, 0, 255)
  pixels[:, 20:60] = (255, 0, 0)
  out = streaming.eval_transform(Image.fromarray(pixels), SIZE)
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to([255, 0, 0], out.shape))
  rng = np.random.default_rng(0)
  for hw in ((5, 100), (100, 5), (23, 61)):
    out = streaming.train_transform(Image.fromarray(np.zeros((*hw, 3), np.uint8)), SIZE, rng)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_inception_crop_box_area_and_aspect_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = streaming.inception_crop_box(120, 90, rng)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 120 and 0 <= top < bottom <= 90
    assert 0.07 <= w * h / (120 * 90) <= 1.0 and 0.7 <= w / h <= 1.4
  # nothing fits a 1000 x 10 strip: the central crop at the widest accepted ratio
  assert streaming.inception_crop_box(1000, 10, rng) == (493, 0, 506, 10)


def test_first_images_and_in_memory_datasets_share_the_functions(folder):
  ds = make(folder)
  first = streaming.first_images(ds, 5)
  raw = [streaming.open_image(*ds.train_source[i][::2]) for i in range(5)]
  np.testing.assert_allclose(first, input_pipeline.normalize(
      np.stack([streaming.eval_transform(im, SIZE) for im in raw]), ds.mean, ds.std))
  rng = np.random.default_rng(0)
  memory = input_pipeline.Dataset(
      rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10, dtype=np.int32) % 2,
      rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.arange(4, dtype=np.int32) % 2,
      ("a", "b"), np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
  assert streaming.num_train_steps(memory, 3) == 3 and streaming.num_examples(memory, "test") == 4
  assert_same_batches(list(streaming.train_batches(memory, 3, seed=1, epoch=2)),
                      list(input_pipeline.train_batches(memory, 3, seed=1, epoch=2)))
  assert_same_batches(list(streaming.eval_batches(memory, 3)),
                      list(input_pipeline.eval_batches(memory, 3)))
  np.testing.assert_allclose(streaming.first_images(memory, 2),
                             input_pipeline.normalize(memory.train_images[:2], memory.mean,
                                                      memory.std))


def test_global_batches_with_one_process_are_the_device_put_batches(folder):
  ds = make(folder)
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("d",)),
                                        jax.sharding.PartitionSpec("d"))
  local = next(streaming.train_batches(ds, 8, seed=0, epoch=0))
  (batch,) = streaming.global_batches([local], sharding)
  assert batch["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_use_streaming_chooses_by_layout_size_and_flag(folder, tmp_path, monkeypatch):
  small = make_folder(tmp_path / "cifar_like", n_train=2, n_val=1, eval_folder="test")
  assert streaming.use_streaming("x", folder)  # val/: ImageNet layout
  assert not streaming.use_streaming("x", small)  # train/ + test/, small: in memory
  assert not streaming.use_streaming("cifar10", None)
  assert not streaming.use_streaming("x", tmp_path / "data.tar.gz")
  assert streaming.use_streaming("x", small, "streaming")
  assert not streaming.use_streaming("x", folder, "memory")
  monkeypatch.setattr(streaming_dataset, "IN_MEMORY_LIMIT_BYTES", 1000)
  assert streaming.use_streaming("x", small)
  (tmp_path / "tfds" / "imagenet2012" / "5.1.0").mkdir(parents=True)
  (tmp_path / "tfds" / "imagenet2012" / "5.1.0" / "dataset_info.json").write_text("{}")
  assert streaming.use_streaming("imagenet2012", tmp_path / "tfds")
  with pytest.raises(ValueError, match="input mode 'fast' is not accepted") as e:
    streaming.use_streaming("x", folder, "fast")
  error_message(e)


def test_layout_errors_name_the_folder(tmp_path):
  (tmp_path / "train" / "c0").mkdir(parents=True)
  write_jpeg(tmp_path / "train" / "c0" / "a.JPEG", np.random.default_rng(0))
  with pytest.raises(ValueError, match="has no train/ folder beside a val/") as e:
    streaming.from_folder(tmp_path)
  error_message(e)
  (tmp_path / "val").mkdir()
  write_jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", np.random.default_rng(0))
  with pytest.raises(ValueError, match=f"{tmp_path / 'val'} has no class folders") as e:
    streaming.from_folder(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    streaming.from_folder(tmp_path / "missing")
  with pytest.raises(ValueError, match="neither train/ and val/ image folders nor a prepared"):
    streaming.load("imagenet2012", tmp_path / "train")


def test_tfds_data_source_is_read_without_tensorflow(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(0)
  images = {"train": [rng.integers(0, 256, (20 + i, 30, 3), np.uint8) for i in range(12)],
            "validation": [rng.integers(0, 256, (25, 20 + i, 3), np.uint8) for i in range(5)]}

  class BrjaxTinyImages(tfds.core.GeneratorBasedBuilder):  # encoded with PIL: no TensorFlow
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in images}

    def _generate_examples(self, split):
      for i, image in enumerate(images[split]):
        yield i, {"image": Image.fromarray(image), "label": i % 3, "file_name": f"{split}{i}.png"}

  BrjaxTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  assert streaming.use_streaming("brjax_tiny_images", tmp_path)
  ds = streaming.load("brjax_tiny_images", tmp_path, image_size=SIZE, stats_examples=4)
  assert ds.class_names == ("a", "b", "c")
  assert len(ds.train_source) == 12 and len(ds.test_source) == 5
  image, label, where = ds.test_source[0]
  assert isinstance(image, bytes) and where.startswith("tfds brjax_tiny_images split validation")
  record = tfds.data_source("brjax_tiny_images", split="validation", data_dir=str(tmp_path))[0]
  assert label == record["label"] and where.endswith(f"({record['file_name'].decode()})")
  batches = list(streaming.eval_batches(ds, 4))
  assert [int(b["mask"].sum()) for b in batches] == [4, 1]
  assert batches[0]["image"].shape == (4, SIZE, SIZE, 3)
  train = list(streaming.train_batches(ds, 4, seed=0, epoch=1))
  assert len(train) == 3 and train[0]["label"].dtype == np.int32
  with pytest.raises(ValueError, match="cannot read tfds dataset 'brjax_tiny_images'.*no split") \
      as e:
    streaming.from_tfds("brjax_tiny_images", data_dir=str(tmp_path), test_split="test")
  error_message(e)
