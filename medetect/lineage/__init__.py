"""The lineage the lecture teaches, as runnable and comparable 2D models on one dataset: classification +
localisation, OverFeat (sliding windows made convolutional), selective search, R-CNN, Fast R-CNN, Faster R-CNN, and
the one-stage rows (YOLO v1-style grid, RetinaNet).

Every step has the same three parts (one module per step):

* a config section (a dataclass of :func:`medetect.schema.option` fields) inside the ``task: lineage`` config;
* ``train_<step>(train, val, cfg, out_dir, *, resume=False, device="cpu", progress=True) -> dict``: trains on two
  :class:`~medetect.lineage.data.LineageSet`, writes ONE model file ``out_dir/<step>.safetensors`` through
  :func:`medetect.models.io.save_model` (checkpoints of a long step under ``out_dir/runs/<step>/``), returns
  ``{"weights": path, "train_seconds": s, ...}``;
* ``load_<step>(path, device="cpu") -> Method``: a ready detector with ``name`` (the table's row name, as the
  lecture writes it) and ``detect(image) -> {"boxes" [D, 4] (y0, x0, y1, x1), "scores" [D], "labels" [D] in 0..K-1,
  "num_proposals": int, "proposal_seconds": float}`` for one raw ``[3, H, W]`` image at the lineage's scale.

:mod:`medetect.lineage.train` runs the steps in order; :mod:`medetect.lineage.evaluate` times them on one split and
writes the lecture's table.
"""

from .task import TASK  # noqa: E402, F401  (the registry reads it)
