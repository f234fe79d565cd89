"""Input pipelines: image classification data held in memory or streamed with Grain.

* :mod:`brjax.data.datasets`: one interface for the training loop over either pipeline.
* :mod:`brjax.data.input_pipeline`: CIFAR-size data as host numpy arrays
  (:mod:`~brjax.data.image_folder` reads folders and ``.tar.gz`` archives).
* :mod:`brjax.data.streaming`: datasets of any size, read batch by batch with Grain
  (:mod:`~brjax.data.image_sources`, :mod:`~brjax.data.grain_batches`,
  :mod:`~brjax.data.imagenet_augment`).
* :mod:`brjax.data.image_data`: what both share (decoding, order, normalization).
* :mod:`brjax.data.synthetic_images`: a generated image folder, to try things offline.
"""
