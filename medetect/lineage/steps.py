"""The steps of the lineage in the lecture's order: which config section, model file and table rows each has, and
the functions that train and load it (a plain table; the step modules are imported when a step is used)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Step", "STEPS", "STEP_KEYS", "ROW_ORDER", "step"]


@dataclass(frozen=True)
class Step:
    key: str          # config section, model file stem (``<key>.safetensors``) and train record (``<key>.json``)
    rows: tuple       # the table rows this step's model gives, as the lecture names them
    proposals: str    # where its regions come from (the table's "proposals" column)


STEPS: tuple[Step, ...] = (
    Step("localizer", ("Classification + localisation", "OverFeat"), "dense windows (convolutional)"),
    Step("rcnn", ("R-CNN",), "selective search"),
    Step("fast_rcnn", ("Fast R-CNN",), "selective search"),
    Step("faster_rcnn", ("Faster R-CNN",), "RPN"),
    Step("yolo", ("YOLO",), "grid cells"),
    Step("retinanet", ("RetinaNet",), "anchors (dense)"),
)
STEP_KEYS = tuple(s.key for s in STEPS)
ROW_ORDER = tuple(r for s in STEPS for r in s.rows)


def step(key: str) -> Step:
    for s in STEPS:
        if s.key == key:
            return s
    raise ValueError(f"unknown lineage step {key!r}: choose from {list(STEP_KEYS)}")
