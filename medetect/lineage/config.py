"""Typed config of the lineage (``task: lineage``), loaded by :func:`medetect.config.load_config`; the default is
``configs/lineage_bccd.yaml`` (BCCD at half resolution).

Sections: ``data`` (the dataset, its splits and classes, the working scale), ``steps`` (which steps ``train`` runs),
``proposals`` (selective search, shared by R-CNN, Fast R-CNN and the recall study), ``localizer`` (classification +
localisation, whose network OverFeat turns convolutional), ``overfeat`` (the sliding-window inference), ``rcnn``, and
``detectors``: ONE detector and ONE optimisation for the four detector rows (Fast R-CNN, Faster R-CNN, YOLO,
RetinaNet; each step only sets ``model.arch``), so that the table compares methods, not budgets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.formats import FORMATS
from ..schema import check, option
from .detectors import DetectorStepConfig
from .localizer import LocalizerStepConfig, OverFeatConfig
from .proposals import ProposalConfig
from .rcnn import RCNNStepConfig
from .steps import STEP_KEYS

__all__ = ["LineageDataConfig", "LineageConfig"]


@dataclass
class LineageDataConfig:
    root: str = option("", doc="the dataset folder (VOC layout: Annotations/, JPEGImages/, ImageSets/Main/) or, for "
                       "an annotation-file format, the annotation file", path=True)
    format: str = option("voc", doc="dataset format of root (medetect.data.formats)", choices=FORMATS)
    train_split: str = option("train", doc="split the steps train on")
    val_split: str = option("val", doc="split that picks each network's best epoch and is reported in the train "
                            "records (empty: none)")
    classes: list[str] = option(["RBC", "WBC", "Platelets"], doc="class names in label order (a VOC folder does "
                                "not list them)")
    scale: float = option(0.5, doc="working scale: images and boxes are resized by this factor once, for every step "
                          "(BCCD 640x480 -> 320x240)", gt=0, le=4)

    def spec(self, split: str) -> str:
        """The ``--data`` spec of ``split`` (``FOLDER:SPLIT`` for VOC, else ``FORMAT:PATH:SPLIT``)."""
        if not self.root:
            raise ValueError("data.root is not set: give the dataset folder with --data FOLDER:SPLIT or "
                             "--set data.root=...")
        return f"{self.root}:{split}" if self.format == "voc" else f"{self.format}:{self.root}:{split}"

    def validate(self, prefix: str = "data") -> None:
        check(self, prefix)
        if not self.classes:
            raise ValueError(f"{prefix}.classes must name at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{prefix}.classes has duplicates: {self.classes}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LineageConfig:
    task: str = option("lineage", doc="selects this schema", choices=("lineage",))
    data: LineageDataConfig = option(default_factory=LineageDataConfig, doc="dataset, splits, classes, scale")
    steps: list[str] = option(list(STEP_KEYS), doc="steps trained, in this order (localizer also gives OverFeat)",
                              choices=STEP_KEYS)
    proposals: ProposalConfig = option(default_factory=ProposalConfig, doc="selective search (R-CNN, Fast R-CNN)")
    localizer: LocalizerStepConfig = option(default_factory=LocalizerStepConfig,
                                            doc="classification + localisation on one-object crops")
    overfeat: OverFeatConfig = option(default_factory=OverFeatConfig, doc="OverFeat sliding-window inference")
    rcnn: RCNNStepConfig = option(default_factory=RCNNStepConfig, doc="R-CNN: warped proposals, SVMs, regressors")
    detectors: DetectorStepConfig = option(default_factory=DetectorStepConfig,
                                           doc="the detector and training shared by Fast R-CNN, Faster R-CNN, YOLO "
                                           "and RetinaNet (each step sets model.arch)")

    def validate(self, prefix: str = "") -> None:
        check(self, prefix)
        if not self.steps:
            raise ValueError("steps must name at least one step")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps has duplicates: {self.steps}")

    def to_dict(self) -> dict:
        return asdict(self)
