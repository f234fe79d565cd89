"""Tests of brjax.data.input_pipeline on tiny synthetic image folders (and the real CIFAR-10
archive)."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
import sys
import tarfile
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest

from brjax.data import input_pipeline as ip

CIFAR10_ARCHIVE = (Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" /
                   "cifar10-jpeg.tar.gz")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

# Deliberately unsorted: class names, and file names whose string order differs from creation
# order ("10" < "9"), so that canonical order cannot come from the filesystem by accident.
LAYOUT = {
    "train": {"dog": ["9.png", "10.png"], "ant": ["b.png", "a.png", "c.png"], "cat": ["x.png"]},
    "test": {"cat": ["1.png", "0.png"], "dog": ["z.png"], "ant": ["k.png"]},
}
# Canonical order: classes sorted (ant=0, cat=1, dog=2), files sorted, interleaved.
TRAIN_ORDER = ["ant/a.png", "cat/x.png", "dog/10.png", "ant/b.png", "dog/9.png", "ant/c.png"]
TEST_ORDER = ["ant/k.png", "cat/0.png", "dog/z.png", "cat/1.png"]


def make_image_folder(root: Path, layout=None, size=(8, 6), seed=0) -> dict[str, np.ndarray]:
  """Writes random RGB PNGs as root/<split>/<class>/<file>; returns {"split/class/file": pixels}."""
  rng = np.random.default_rng(seed)
  pixels = {}
  for split, classes in (layout or LAYOUT).items():
    for cls, files in classes.items():
      (root / split / cls).mkdir(parents=True, exist_ok=True)
      for name in files:
        image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(image).save(root / split / cls / name)
        pixels[f"{split}/{cls}/{name}"] = image
  return pixels


def make_tar(src: Path, dest: Path, arcname: str = ".", dirs: bool = True) -> Path:
  """Packs the contents of ``src`` as ``arcname/...`` (with or without directory members)."""
  with tarfile.open(dest, "w:gz") as tar:
    if dirs:
      tar.add(src, arcname=arcname)
    else:
      for f in sorted(p for p in src.rglob("*") if p.is_file()):
        tar.add(f, arcname=f"{arcname}/{f.relative_to(src).as_posix()}", recursive=False)
  return dest


def make_dataset(n_train=10, n_test=5, hw=(8, 8), num_classes=3, seed=0) -> ip.Dataset:
  rng = np.random.default_rng(seed)
  return ip.Dataset(
      train_images=rng.integers(0, 256, (n_train, *hw, 3), dtype=np.uint8),
      train_labels=(np.arange(n_train) % num_classes).astype(np.int32),
      test_images=rng.integers(0, 256, (n_test, *hw, 3), dtype=np.uint8),
      test_labels=(np.arange(n_test) % num_classes).astype(np.int32),
      class_names=tuple(f"c{i}" for i in range(num_classes)),
      mean=np.array([0.5, 0.4, 0.3], np.float32), std=np.array([0.25, 0.2, 0.3], np.float32))


def normalize(images, ds):
  return (images.astype(np.float64) / 255 - ds.mean) / ds.std


def error_message(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


@pytest.fixture(name="folder")
def folder_fixture(tmp_path):
  root = tmp_path / "images"
  return root, make_image_folder(root)


# ------------------------------------------------------------------------------ loading


def test_folder_canonical_order_labels_and_pixels(folder):
  root, pixels = folder
  ds = ip.load_dataset(data_dir=str(root))
  assert ds.class_names == ("ant", "cat", "dog") and ds.num_classes == 3
  assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (6, 6, 8, 3)
  assert ds.test_images.dtype == np.uint8 and ds.test_images.shape == (4, 6, 8, 3)
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  names = list(ds.class_names)
  for split, order, images, labels in (("train", TRAIN_ORDER, ds.train_images, ds.train_labels),
                                       ("test", TEST_ORDER, ds.test_images, ds.test_labels)):
    np.testing.assert_array_equal(images, np.stack([pixels[f"{split}/{p}"] for p in order]))
    np.testing.assert_array_equal(labels, [names.index(p.split("/")[0]) for p in order])


@pytest.mark.parametrize("layout", ["wrapped_folder", "tar", "tgz_wrapped", "tar_no_dir_members",
                                    "wrapped_tar_no_dir_members"])
def test_layouts_give_the_same_dataset(tmp_path, folder, layout):
  root, _ = folder
  expected = ip.load_dataset(data_dir=root)
  if layout == "wrapped_folder":
    wrapped = tmp_path / "outer" / "cifar"
    make_image_folder(wrapped)
    (tmp_path / "outer" / ".hidden").mkdir()  # ignored
    data_dir = tmp_path / "outer"
  elif layout == "tar":
    data_dir = make_tar(root, tmp_path / "d.tar.gz")
  elif layout == "tgz_wrapped":
    data_dir = make_tar(root, tmp_path / "d.tgz", arcname="images")
  elif layout == "tar_no_dir_members":
    data_dir = make_tar(root, tmp_path / "d.tar.gz", arcname=".", dirs=False)
  else:
    data_dir = make_tar(root, tmp_path / "d.tar.gz", arcname="top", dirs=False)
  ds = ip.load_dataset(data_dir=str(data_dir))
  assert ds.class_names == expected.class_names
  for field in ("train_images", "train_labels", "test_images", "test_labels", "mean", "std"):
    np.testing.assert_array_equal(getattr(ds, field), getattr(expected, field), err_msg=field)


def test_ignores_hidden_and_non_image_files(tmp_path, folder):
  root, _ = folder
  (root / "train" / "ant" / "notes.txt").write_text("not an image")
  (root / "train" / "ant" / "._a.png").write_bytes(b"macos junk")
  (root / "train" / "README").write_text("top-level file")
  ds = ip.load_dataset(data_dir=root)
  assert len(ds.train_labels) == 6


def test_example_counts_take_the_canonical_prefix(folder):
  root, _ = folder
  full = ip.load_dataset(data_dir=root)
  ds = ip.load_dataset(data_dir=root, train_examples=4, test_examples=3)
  np.testing.assert_array_equal(ds.train_images, full.train_images[:4])
  np.testing.assert_array_equal(ds.train_labels, [0, 1, 2, 0])
  np.testing.assert_array_equal(ds.test_images, full.test_images[:3])
  np.testing.assert_array_equal(ds.test_labels, [0, 1, 2])
  # Statistics come from the full train split, not the subset.
  np.testing.assert_array_equal(ds.mean, full.mean)
  np.testing.assert_array_equal(ds.std, full.std)
  # More than available: everything.
  more = ip.load_dataset(data_dir=root, train_examples=100, test_examples=100)
  assert len(more.train_labels) == 6 and len(more.test_labels) == 4


def test_normalization_stats_are_exact_for_small_train_split(folder):
  root, pixels = folder
  ds = ip.load_dataset(data_dir=root, train_examples=1)
  train = np.stack([v for k, v in pixels.items() if k.startswith("train/")]) / 255.0
  assert ds.mean.dtype == np.float32 and ds.std.dtype == np.float32 and ds.mean.shape == (3,)
  np.testing.assert_allclose(ds.mean, train.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(ds.std, train.std(axis=(0, 1, 2)), rtol=1e-5)


def test_stats_sample_is_class_balanced_and_only_needed_images_are_decoded(tmp_path, monkeypatch):
  layout = {"train": {"a": ["0.png", "1.png", "2.png"], "b": ["0.png", "1.png", "2.png"]},
            "test": {"a": ["0.png"], "b": ["0.png"]}}
  root = tmp_path / "d"
  pixels = make_image_folder(root, layout)
  monkeypatch.setattr(ip, "STATS_SAMPLE_SIZE", 2)
  (root / "train" / "a" / "2.png").write_bytes(b"corrupt, but neither used nor in the sample")
  ds = ip.load_dataset(data_dir=root, train_examples=2)
  # Sample of 2 out of 6 = one image per class (a/0, b/0), not two of the same class.
  sample = np.stack([pixels["train/a/0.png"], pixels["train/b/0.png"]]) / 255.0
  np.testing.assert_allclose(ds.mean, sample.mean(axis=(0, 1, 2)), rtol=1e-6)
  with pytest.raises(ValueError) as excinfo:
    ip.load_dataset(data_dir=root)  # now the corrupt image is needed
  assert str(root / "train" / "a" / "2.png") in error_message(excinfo)


def test_corrupt_image_in_tar_names_the_member(tmp_path, folder):
  root, _ = folder
  (root / "test" / "cat" / "0.png").write_bytes(b"\x89PNG truncated")
  archive = make_tar(root, tmp_path / "d.tar.gz")
  with pytest.raises(ValueError) as excinfo:
    ip.load_dataset(data_dir=archive)
  message = error_message(excinfo)
  assert str(archive) in message and "test/cat/0.png" in message


def test_images_of_different_sizes_are_rejected(folder):
  root, _ = folder
  Image.new("RGB", (5, 5)).save(root / "test" / "dog" / "z.png")
  with pytest.raises(ValueError) as excinfo:
    ip.load_dataset(data_dir=root)
  message = error_message(excinfo)
  assert str(root / "test" / "dog" / "z.png") in message and "5x5" in message


def test_grayscale_and_jpeg_images_become_rgb(tmp_path):
  root = tmp_path / "d"
  for split in ("train", "test"):
    (root / split / "g").mkdir(parents=True)
    Image.new("L", (4, 4), 200).save(root / split / "g" / "0.jpg")
  ds = ip.load_dataset(data_dir=root)
  assert ds.train_images.shape == (1, 4, 4, 3)
  np.testing.assert_allclose(ds.train_images, 200, atol=2)


def _remove(path: Path):
  for p in sorted(path.rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  path.rmdir()


@pytest.mark.parametrize("case", ["empty_folder", "missing_test", "empty_split", "empty_class",
                                  "class_mismatch", "unsupported_file", "not_a_tar",
                                  "empty_tar"])
def test_bad_data_dir_errors_name_the_path(tmp_path, folder, case):
  root, _ = folder
  data_dir, expected = root, [str(root)]
  if case == "empty_folder":
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    expected = [str(data_dir)]
  elif case == "missing_test":
    _remove(root / "test")
    expected = [str(root), "test/"]
  elif case == "empty_split":
    _remove(root / "train")
    (root / "train").mkdir()
    expected = [str(root / "train"), "class folders"]
  elif case == "empty_class":
    (root / "train" / "eel").mkdir()
    (root / "test" / "eel").mkdir()
    (root / "train" / "eel" / "readme.txt").write_text("no images")
    expected = [str(root / "train" / "eel"), "no images"]
  elif case == "class_mismatch":
    _remove(root / "test" / "dog")
    (root / "test" / "emu").mkdir()
    Image.new("RGB", (8, 6)).save(root / "test" / "emu" / "0.png")
    expected = [str(root / "train"), str(root / "test"), "dog", "emu"]
  elif case == "unsupported_file":
    data_dir = tmp_path / "images.zip"
    data_dir.write_bytes(b"PK")
    expected = [str(data_dir), ".tar.gz"]
  elif case == "not_a_tar":
    data_dir = tmp_path / "images.tar.gz"
    data_dir.write_bytes(b"not gzip at all")
    expected = [str(data_dir), "tar"]
  else:
    data_dir = tmp_path / "empty.tar.gz"
    with tarfile.open(data_dir, "w:gz"):
      pass
    expected = [str(data_dir)]
  with pytest.raises(ValueError) as excinfo:
    ip.load_dataset(data_dir=str(data_dir))
  message = error_message(excinfo)
  for part in expected:
    assert part in message, (part, message)


def test_missing_path_and_negative_counts(tmp_path, folder):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError) as excinfo:
    ip.load_dataset(data_dir=str(missing))
  assert str(missing) in error_message(excinfo)
  for kwargs, text in (({"train_examples": -1}, "train_examples=-1"),
                       ({"test_examples": -5}, "test_examples=-5")):
    with pytest.raises(ValueError) as excinfo:
      ip.load_dataset(data_dir=str(folder[0]), **kwargs)
    assert text in error_message(excinfo)


# -------------------------------------------------------------------- tensorflow-datasets


def test_tfds_path_with_fake_tfds(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(0)
  fake = {"train": (rng.integers(0, 256, (7, 4, 4, 1), dtype=np.uint8),
                    np.array([2, 2, 0, 1, 0, 2, 1], np.int64)),
          "test": (rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8), np.array([1, 0, 1]))}
  calls = []

  class Info:
    features = {"label": type("Label", (), {"names": ["zero", "one", "two"]})()}

  def fake_load(name, **kwargs):
    calls.append((name, kwargs))
    return [f"{name}:{s}" for s in kwargs["split"]], Info()

  monkeypatch.setattr(tfds, "load", fake_load)
  monkeypatch.setattr(tfds, "as_numpy", lambda s: fake[s.split(":")[1]])
  ds = ip.load_dataset("mnistish", train_examples=4)
  assert calls[0][0] == "mnistish"
  assert calls[0][1]["batch_size"] == -1 and calls[0][1]["as_supervised"] is True
  assert ds.class_names == ("zero", "one", "two")
  # Interleaved canonical order keeps the source order within each class.
  train_images, train_labels = fake["train"]
  order = [2, 3, 0, 4, 6, 1, 5]
  np.testing.assert_array_equal(ds.train_labels, [0, 1, 2, 0])
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images, np.repeat(train_images[order[:4]], 3, axis=-1))
  np.testing.assert_array_equal(ds.test_labels, [0, 1, 1])
  assert ds.test_images.shape == (3, 4, 4, 3)
  all_train = train_images / 255.0  # <= 10k images: stats over all of them, not the subset
  np.testing.assert_allclose(ds.mean, np.full(3, all_train.mean()), rtol=1e-6)


def test_tfds_failure_is_a_clear_error(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def failing_load(*args, **kwargs):
    raise RuntimeError("no network\nlong traceback-ish second line")

  monkeypatch.setattr(tfds, "load", failing_load)
  with pytest.raises(ValueError) as excinfo:
    ip.load_dataset("cifar10")
  message = error_message(excinfo)
  assert "'cifar10'" in message and "no network" in message and "--data_dir" in message


def test_tfds_not_installed_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  with pytest.raises(ValueError) as excinfo:
    ip.load_dataset("cifar10", train_examples=10)
  message = error_message(excinfo)
  assert "'cifar10'" in message and "tensorflow_datasets" in message and "--data_dir" in message


# ------------------------------------------------------------------------------ batches


def test_num_train_steps():
  ds = make_dataset(n_train=10)
  assert ip.num_train_steps(ds, 3) == 3 and ip.num_train_steps(ds, 10) == 1
  for bad in (0, -1, 11):
    with pytest.raises(ValueError, match=f"batch_size={bad}"):
      ip.num_train_steps(ds, bad)


def test_train_batches_shapes_order_and_determinism():
  ds = make_dataset(n_train=11, hw=(6, 5))
  batches = list(ip.train_batches(ds, 4, seed=3, epoch=2))
  assert len(batches) == 2  # 11 // 4, remainder dropped
  for b in batches:
    assert set(b) == {"image", "label"}
    assert b["image"].shape == (4, 6, 5, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  perm = np.random.default_rng([3, 2]).permutation(11)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                ds.train_labels[perm[:8]])
  again = list(ip.train_batches(ds, 4, seed=3, epoch=2))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  other_epoch = next(ip.train_batches(ds, 4, seed=3, epoch=3))
  other_seed = next(ip.train_batches(ds, 4, seed=4, epoch=2))
  assert not np.array_equal(other_epoch["image"], batches[0]["image"])
  assert not np.array_equal(other_seed["image"], batches[0]["image"])
  # With identical images the order cannot matter: the augmentation itself depends on the epoch.
  same = dataclasses.replace(ds, train_images=np.repeat(ds.train_images[:1], 11, axis=0))
  first = [next(ip.train_batches(same, 8, seed=3, epoch=e))["image"] for e in (0, 0, 1)]
  np.testing.assert_array_equal(first[0], first[1])
  assert not np.array_equal(first[0], first[2])


def test_train_batches_augmentation_is_a_padded_crop_with_some_flips():
  ds = make_dataset(n_train=64, hw=(8, 8))
  batch = next(ip.train_batches(ds, 64, seed=0, epoch=0))
  perm = np.random.default_rng([0, 0]).permutation(64)
  padded = normalize(np.pad(ds.train_images[perm], ((0, 0), (4, 4), (4, 4), (0, 0))), ds)
  flips, offsets = 0, set()
  for out, src in zip(batch["image"], padded):
    matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
               if np.allclose(out, (lambda c: c[:, ::-1] if flip else c)(src[dy:dy + 8, dx:dx + 8]),
                              atol=1e-5)]
    assert matches, "output is not a (flipped) crop of the zero-padded image"
    flips += matches[0][2]
    offsets.add(matches[0][:2])
  assert 0 < flips < 64
  assert len({dy for dy, _ in offsets}) > 3 and len({dx for _, dx in offsets}) > 3


def test_eval_batches_pad_and_mask():
  ds = make_dataset(n_test=7, hw=(4, 3))
  batches = list(ip.eval_batches(ds, 3))
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (3, 4, 3, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
  np.testing.assert_array_equal(batches[-1]["mask"], [True, False, False])
  assert all(b["mask"].all() for b in batches[:-1])
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_allclose(images[:7], normalize(ds.test_images, ds), atol=1e-5)
  np.testing.assert_array_equal(labels[:7], ds.test_labels)
  assert not images[7:].any() and not labels[7:].any()
  assert len(list(ip.eval_batches(ds, 7))) == 1


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_and_puts_on_device():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  batches = [{"x": np.full((2,), i, np.float32)} for i in range(5)]
  out = list(ip.prefetch(iter(batches), size=2, sharding=sharding))
  assert [int(b["x"][0]) for b in out] == list(range(5))
  assert all(isinstance(b["x"], jax.Array) and b["x"].sharding == sharding for b in out)
  assert len(list(ip.prefetch([], size=1))) == 0


def test_prefetch_propagates_producer_errors():
  def source():
    yield {"x": np.zeros(1)}
    raise RuntimeError("producer failed")

  it = ip.prefetch(source())
  next(it)
  with pytest.raises(RuntimeError, match="producer failed"):
    next(it)


@pytest.mark.parametrize("how", ["close", "garbage_collect", "break"])
def test_prefetch_stops_producer_when_consumer_stops(how):
  closed = threading.Event()
  produced = []

  def endless():
    try:
      i = 0
      while True:
        produced.append(i)
        yield {"x": np.array([i])}
        i += 1
    finally:
      closed.set()

  it = ip.prefetch(endless(), size=2)
  assert int(next(it)["x"][0]) == 0
  start = time.monotonic()
  if how == "close":
    it.close()
  elif how == "garbage_collect":
    del it
    gc.collect()
  else:
    for _ in it:
      break
    del it
  assert closed.wait(timeout=5), "producer thread did not stop"
  assert time.monotonic() - start < 5
  assert len(produced) <= 1 + 2 + 1  # consumed + queue + at most one in flight


# ---------------------------------------------------------------------- real CIFAR-10


@pytest.mark.slow
def test_real_cifar10_archive_subset():
  if not CIFAR10_ARCHIVE.exists():
    pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE} (see shared/datasets/README.md)")
  ds = ip.load_dataset(data_dir=str(CIFAR10_ARCHIVE), train_examples=200, test_examples=100)
  assert ds.train_images.shape == (200, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (100, 32, 32, 3) and ds.test_images.dtype == np.uint8
  assert ds.class_names == CIFAR10_CLASSES and ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), np.full(10, 20))
  np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10), np.full(10, 10))
  assert np.all((ds.mean > 0.3) & (ds.mean < 0.6)), ds.mean
  assert np.all((ds.std > 0.15) & (ds.std < 0.35)), ds.std
  # Known CIFAR-10 statistics (mean ~ (0.491, 0.482, 0.447)): the sample must not be biased.
  np.testing.assert_allclose(ds.mean, [0.491, 0.482, 0.447], atol=0.01)
  assert ds.train_images.std() > 20  # real images, not blank
