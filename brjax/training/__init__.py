"""Two-stage QAT + BR training: configuration, recipes, steps, the loop, checkpoints.

* :mod:`brjax.training.config`: the frozen, validated :class:`~brjax.training.config.Config`;
  :mod:`brjax.training.flags` builds it from ``scripts/train.py``'s flags
  (:mod:`brjax.training.cli`: the scripts' flag parsing).
* :mod:`brjax.training.recipes`, :mod:`brjax.training.optim`: recipes as data, the optax
  optimizer with step sizes in their own partition.
* :mod:`brjax.training.steps`: the train state, the phases, the jitted train and eval steps.
* :mod:`brjax.training.train`: the run and its loop over epochs
  (:mod:`~brjax.training.run_start`, :mod:`~brjax.training.run_control`,
  :mod:`~brjax.training.report`, :mod:`~brjax.training.tensorboard`).
* :mod:`brjax.training.checkpoint`, :mod:`brjax.training.history`: a run on disk (orbax;
  ``history`` reads it without JAX).
* :mod:`brjax.training.parallel`: data parallelism over devices and hosts.
* :mod:`brjax.training.evaluation`: quantized evaluation of a run.
"""
