"""Training and evaluation on streamed data (an ImageNet-layout folder read with Grain)."""

import pytest

from brjax.data import datasets, synthetic_images
from brjax.training import evaluation, train
from brjax.training.config import Config


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  return synthetic_images.write_image_folder(tmp_path_factory.mktemp("imagenet_like"),
                                             classes=4, train_per_class=24, eval_per_class=8)


def test_the_choice_of_input(imagenet_like, tmp_path):
  streamed = datasets.load(Config(data_dir=str(imagenet_like), image_size=32, data_workers=0,
                                  normalization="imagenet"))
  assert datasets.is_streamed(streamed) and streamed.image_size == 32
  assert streamed.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
  held = synthetic_images.write_image_folder(tmp_path, classes=2, train_per_class=2,
                                             eval_per_class=2, sizes=(16,), eval_folder="test")
  assert not datasets.is_streamed(datasets.load(Config(data_dir=str(held))))
  forced = datasets.load(Config(data_dir=str(held), input="streaming", image_size=16,
                                data_workers=0))
  assert datasets.is_streamed(forced)


@pytest.mark.slow
def test_a_streamed_run_learns_and_its_checkpoint_evaluates(imagenet_like, tmp_path):
  config = Config(model="resnet8", bits_w=2, bits_a=2, epochs=2, warmup_epochs=1,
                  batch_size=32, data_dir=str(imagenet_like), image_size=32, data_workers=0)
  lines = []
  last = train.train_and_evaluate(config, str(tmp_path), log=lines.append)
  assert any("96 train / 32 test images streamed at 32px" in line for line in lines)
  assert last["test_count"] == 32 and last["test_acc"] > 50.0  # 4 colour classes: chance 25%
  result = evaluation.evaluate_run(str(tmp_path), prefer="latest")
  assert result["test_acc"] == result["logged_test_acc"] == last["test_acc"]
