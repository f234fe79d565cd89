"""Studies and analysis: LSQ against LSQ+BR over configs and seeds, and what a run shows.

* :mod:`brjax.studies.study`, :mod:`brjax.studies.plan`, :mod:`brjax.studies.runner`,
  :mod:`brjax.studies.summary`: a study's runs, its plan, running it, its summary
  (JAX-free except the runner's children).
* :mod:`brjax.studies.analysis`, :mod:`brjax.studies.plots`: a trained run's metrics and
  figures (``scripts/analyze.py``).
* :mod:`brjax.studies.step_size_trace`: where a run's step sizes go, step by step.
"""
