"""The training state's ``quant_state`` (issue 32): the input signs a model decides from the
data at init are part of ``TrainState``, passed to every ``apply``, saved in checkpoints,
restored on resume and exported; a papers'-layout model with ``--act_signs=data`` trains
end to end through ``scripts/train.py``'s trainer."""

from __future__ import annotations

import functools
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brjax.data import synthetic_images
from brjax.models import paper
from brjax.quant import lsq as quant
from brjax.training import checkpoint, evaluation, history, train
from brjax.training import config as config_lib
from brjax.training.config import Config
from brjax.training.steps import TrainState


def test_train_state_gives_apply_its_quant_state_when_there_is_one():
  tx = optax.sgd(0.1)
  plain = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=tx,
                            batch_stats={"m": jnp.zeros(2)})
  assert plain.quant_state == {} and set(plain.variables()) == {"params", "batch_stats"}
  signs = {"conv": {"input_signed": jnp.array(True)}}
  state = plain.replace(quant_state=signs)
  assert state.variables()[quant.STATE] is signs
  assert state.variables({"w": 0})["params"] == {"w": 0}


def test_checkpoints_keep_signs_and_unbox_and_read_checkpoints_without_signs(tmp_path):
  """An empty ``quant_state`` is not written (a checkpoint from before it existed reads
  into a state that has one); signs are; boxed parameters are saved as their arrays and
  come back in the target's boxes."""
  params = {"dense": {"kernel": nn.LogicallyPartitioned(np.ones((2, 4), np.float32),
                                                        ("embed", "mlp")),
                      "alpha": np.array(0.5, np.float32)}}
  signs = {"dense": {"input_signed": np.array(True)}}
  ckpts = checkpoint.RunCheckpoints(str(tmp_path))
  ckpts.save(1, {"params": params, "quant_state": {}}, {"epoch": 1}, is_best=False)
  ckpts.save(2, {"params": params, "quant_state": signs}, {"epoch": 2}, is_best=False)
  ckpts.close()
  kinds = lambda tree: jax.tree.map(type, tree, is_leaf=lambda x: x is not tree)
  first, _ = checkpoint.restore_epoch(str(tmp_path), 1, {"params": params, "quant_state": {}})
  assert first["quant_state"] == {} and kinds(first) == kinds({"params": params,
                                                               "quant_state": {}})
  assert isinstance(first["params"]["dense"]["kernel"], nn.LogicallyPartitioned)
  flipped = {"dense": {"input_signed": np.array(False)}}
  second, _ = checkpoint.restore_epoch(str(tmp_path), 2, {"params": params,
                                                          "quant_state": flipped})
  assert bool(second["quant_state"]["dense"]["input_signed"])  # the saved sign, not the target's
  variables, _ = checkpoint.restore_pretrained(str(tmp_path), "latest")
  assert variables["params"]["dense"]["kernel"].shape == (2, 4)  # an array, no box
  assert bool(variables["quant_state"]["dense"]["input_signed"])
  with pytest.raises(checkpoint.CheckpointError, match="could not be read"):
    checkpoint.restore_epoch(str(tmp_path), 1, {"params": params, "quant_state": signs})


class TinyPaperNet(nn.Module):
  """The papers' layout (``conv_init`` ... ``head``, ``train``) at a few thousand
  parameters: ``linear`` reads a BatchNorm output (signed), ``expand`` a ReLU's (unsigned),
  ``head`` the mean of a residual sum (signed, which paper_rules' unsigned head refuses)."""
  num_classes: int = 10
  small_inputs: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = norm()(nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False, name="conv_init")(x))
    y = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False, name="linear")(x)))
    x = x + nn.Conv(8, (1, 1), name="expand")(y)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture
def tiny_paper_model(monkeypatch):
  """``tiny_paper`` registered as one of the papers' models (``--model`` values)."""
  monkeypatch.setitem(paper.MODELS, "tiny_paper", TinyPaperNet)
  monkeypatch.setattr(config_lib, "PAPER_MODELS", (*config_lib.PAPER_MODELS, "tiny_paper"))
  monkeypatch.setattr(config_lib, "MODELS", (*config_lib.MODELS, "tiny_paper"))
  return "tiny_paper"


def _signs(tree) -> dict[str, bool]:
  return {k: bool(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.mark.slow
def test_a_model_with_data_decided_signs_trains_resumes_evaluates_and_exports(
    tiny_paper_model, tmp_path):
  """``--act_signs=data``: the signs decided at init are in the state and every
  checkpoint; a run stopped after epoch 1 and resumed gives the uninterrupted run's
  metrics; its checkpoint evaluates to the logged accuracy and exports with its signs."""
  from brjax import export  # pylint: disable=g-import-not-at-top
  assert all(r.act_signed is None for r in paper.paper_rules(tiny_paper_model, 4, 4,
                                                              act_signs="data"))
  data = synthetic_images.write_image_folder(tmp_path / "data", classes=2, train_per_class=16,
                                             eval_per_class=8, sizes=(16,),
                                             eval_folder="test")
  config = Config(model=tiny_paper_model, act_signs="data", bits_w=4, bits_a=4, epochs=2,
                  warmup_epochs=1, batch_size=16, data_dir=str(data))
  quiet = dict(log=lambda _: None)
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"), **quiet)
  split = str(tmp_path / "split")
  train.train_and_evaluate(config, split, stop_after_epoch=1, **quiet)
  resumed = train.train_and_evaluate(config, split, resume=True, **quiet)
  for key in ("train_loss", "ce", "br_w", "br_a", "train_acc", "test_acc", "test_loss"):
    np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-6, err_msg=key)
  assert [r["epoch"] for r in history.read_history(split)] == [1, 2]

  variables, meta = checkpoint.restore_pretrained(split, "latest")
  signs = _signs(variables["quant_state"])
  assert signs == {"conv_init/input_signed": True, "linear/input_signed": True,
                   "expand/input_signed": False, "head/input_signed": True}, signs
  assert meta["config"]["act_signs"] == "data"
  result = evaluation.evaluate_run(split, prefer="latest")
  assert result["test_acc"] == pytest.approx(result["logged_test_acc"])
  exported = export.export_run(split, prefer="latest")
  saved = {f["path"][-2] for f in exported.header["floats"] if f["path"][0] == quant.STATE}
  assert saved == {"conv_init", "linear", "expand", "head"}
  assert {a["module"]: a["signed"] for a in exported.header["activations"]} == {
      "conv_init": True, "linear": True, "expand": False, "head": True}
