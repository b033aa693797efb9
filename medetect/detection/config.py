"""The config of the detection task (``task: detection``, the default; mammography extends it): the detector
(``model``), optimisation (``train``) and the dataset with its augmentation and normalisation (``data``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.folds import FOLD_DOC, FOLD_SEED_DOC, FOLDS_DOC, check_fold_keys, fold_of
from ..engine.trainer import TrainConfig
from ..models.detector import DetectorConfig
from ..schema import check, option

__all__ = ["DATASETS", "DataConfig", "ExperimentConfig"]

DATASETS = ("voc", "bccd", "dsb2018", "mini_mias")
DATA_FORMATS = ("", "voc", "coco", "csv", "datalist", "mias", "dsb2018", "luna16_patches", "luna")
BOX_MODES = ("", "xyzxyz", "xyzwhd", "cccwhd", "xyxy", "xywh", "ccwh")


@dataclass
class DataConfig:
    format: str = option("", doc="annotation format (medetect.data.formats): voc, coco, csv, datalist (MONAI "
                         "detection datalist JSON, 2D or 3D), mias, dsb2018, luna16_patches; empty: the older "
                         "data.dataset key decides", choices=DATA_FORMATS)
    dataset: str = option("voc", doc="(older key, used when data.format is empty) a Pascal VOC folder (voc) or a "
                          "named loader", choices=DATASETS)
    root: str = option("../shared/data/bccd", doc="dataset folder", path=True)
    annotations: str = option("", doc="annotation file for coco / csv / datalist; {split} in it is replaced by the "
                              "split name", path=True)
    images: str = option("", doc="folder the annotation's image paths are relative to (default: data.root)",
                         path=True)
    box_mode: str = option("", doc="datalist box convention (MONAI names, x-first): xyzxyz, xyzwhd, cccwhd (3D), "
                           "xyxy, xywh, ccwh (2D)", choices=BOX_MODES)
    box_units: str = option("voxel", doc="datalist boxes in image voxels or in world millimetres (the image "
                            "file's physical frame)", choices=("voxel", "world"))
    channels: int = option(0, doc="convert every image to this many channels (1: grey, 3: colour; 0: as stored)",
                           ge=0)
    classes: list[str] = option([], doc="class names (voc: required; datalist: the names of label indices 0..K-1; "
                                "others: the file's own list when empty)")
    train_split: str = option("train", doc="split used for training ('all': every image of a file without splits)")
    val_split: str = option("val", doc="split used for validation (empty: no validation)")
    scale: float = option(1.0, doc="resize factor applied to every image (and box) before anything else", gt=0)
    hflip: bool = option(True, doc="random horizontal flip (p = 0.5)")
    vflip: bool = option(True, doc="random vertical flip (microscopy has no up / down)")
    rot90: bool = option(False, doc="random 90-degree rotations in the image plane")
    random_scale: list[float] = option([1.0, 1.0], doc="zoom range [lo, hi] of the scale augmentation", gt=0)
    intensity: bool = option(True, doc="brightness / contrast jitter")
    mean: list[float] = option([0.5], doc="per-channel mean subtracted after scaling pixel values to [0, 1]")
    std: list[float] = option([0.25], doc="per-channel std divided by after subtracting the mean", gt=0)
    max_value: float = option(255.0, doc="pixel value that maps to 1.0", gt=0)
    cache: bool = option(True, doc="keep decoded images in memory")
    clip_boxes: bool = option(False, doc="clip annotation boxes that reach outside their image (VOC folders) instead "
                              "of stopping with an error naming the file and box")
    folds: int = option(0, doc=FOLDS_DOC, ge=0)
    fold: int = option(0, doc=FOLD_DOC, ge=0)
    fold_seed: int = option(0, doc=FOLD_SEED_DOC, ge=0)

    def validate(self, prefix: str = "data") -> None:
        check(self, prefix)
        if len(self.random_scale) != 2 or self.random_scale[0] > self.random_scale[1]:
            raise ValueError(f"{prefix}.random_scale must be [lo, hi] with lo <= hi, got {self.random_scale}")
        if not self.mean or not self.std:
            raise ValueError(f"{prefix}.mean and {prefix}.std must have at least one value each")
        if self.format and self.dataset != "voc":
            raise ValueError(f"{prefix}.format and {prefix}.dataset both name the data: keep one "
                             f"(format: {self.format!r}, dataset: {self.dataset!r})")
        if self.format == "datalist" and not self.box_mode:
            raise ValueError(f"{prefix}.box_mode must state the datalist's box convention (xyzxyz, cccwhd, xyzwhd "
                             "for 3D; xyxy, ccwh, xywh for 2D)")
        if self.format in ("coco", "csv", "datalist") and not self.annotations:
            raise ValueError(f"{prefix}.annotations must name the {self.format} annotation file")
        check_fold_keys(self.folds, self.fold, self.train_split, self.val_split, prefix)

    def source(self) -> dict:
        """The keyword arguments of :func:`medetect.data.formats.open_dataset` (format, root, annotations, ...,
        and the cross-validation fold), with the older ``dataset`` key mapped onto ``format``."""
        fmt, classes = self.format, list(self.classes)
        if not fmt:
            fmt = {"voc": "voc", "bccd": "voc", "dsb2018": "dsb2018", "mini_mias": "mias"}[self.dataset]
            if self.dataset == "bccd":
                classes = ["RBC", "WBC", "Platelets"]
        return {"fmt": fmt, "root": self.root, "annotations": self.annotations, "images": self.images,
                "classes": classes, "box_mode": self.box_mode, "box_units": self.box_units, "clip": self.clip_boxes,
                "channels": self.channels, "folds": fold_of(self)}


@dataclass
class ExperimentConfig:
    model: DetectorConfig = option(default_factory=DetectorConfig, doc="the detector")
    train: TrainConfig = option(default_factory=TrainConfig, doc="optimisation")
    data: DataConfig = option(default_factory=DataConfig, doc="dataset, augmentation and normalisation")
    task: str = option("detection", doc="selects this schema (the default task)", choices=("detection",))

    def validate(self, prefix: str = "") -> None:
        check(self, prefix)
        c = self.model.in_channels
        for key in ("mean", "std"):  # one value for all channels, or one per channel
            n = len(getattr(self.data, key))
            if n not in (1, c):
                raise ValueError(f"data.{key} has {n} values but model.in_channels is {c}: give 1 or {c}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
