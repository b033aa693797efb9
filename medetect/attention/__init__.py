"""Detection with attention: lesion heatmaps supervise a classifier's attention; the ``attention`` task.

``config.py`` (the task's typed config), ``data.py`` (mini-MIAS-layout folders, the dataset), ``infer.py`` (image
probabilities and saliency maps: attention or Grad-CAM), ``train.py`` (the trainer of ``medetect train``),
``evaluate.py`` (``medetect evaluate`` on a folder), ``predict.py`` (scores + overlay PNGs).
"""

from .task import TASK  # noqa: E402

__all__ = ["TASK"]
