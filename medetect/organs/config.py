"""Typed config of the organ localiser (``task: organ-localisation``), loaded by :func:`medetect.config.load_config`.

Sections: ``data`` (``organ-ct-sample``-layout folders, phantoms generated into the run folder, or both),
``augment`` (:class:`~medetect.organs.augment.OrganAugmentConfig`), ``preprocess``
(the downsampled grid and the HU window, stored with the weights), ``model``
(:class:`~medetect.models.detector.DetectorConfig`, default :func:`default_organ_detector`: a small 3D Faster R-CNN
with the focal-loss RPN of Xu et al.), ``localise`` (the per-organ score threshold) and ``train``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..engine.trainer import TrainConfig
from ..models.detector import DetectorConfig
from ..schema import check, option
from .anatomy import ORGANS
from .augment import OrganAugmentConfig

__all__ = ["OrganDataConfig", "OrganPreprocessConfig", "OrganLocaliseConfig", "OrganLocalisationConfig",
           "default_organ_detector", "default_organ_train_config"]


def default_organ_detector() -> DetectorConfig:
    """A small 3D Faster R-CNN for 4 mm whole CTs: ResNet-18 at base width 8, a 3-level FPN (strides 8, 16, 32 =
    32, 64, 128 mm), three anchor shapes per level (cube, craniocaudally long, flat), focal-loss RPN, one class per
    organ of :data:`~medetect.organs.anatomy.ORGANS`."""
    return DetectorConfig(
        arch="faster_rcnn", ndim=3, in_channels=1, num_classes=len(ORGANS), class_names=list(ORGANS),
        backbone="resnet18", base_width=8, stem_stride=2, fpn_channels=32, levels=[3, 4, 5],
        anchor_shapes=[[[12, 12, 12], [24, 10, 10], [10, 16, 16]],
                       [[24, 24, 24], [48, 20, 20], [20, 32, 32]],
                       [[48, 48, 48], [112, 20, 20], [40, 64, 64]]],
        rpn_pre_nms_top_n=[600, 300], rpn_post_nms_top_n=[300, 150], rpn_objectness_loss="focal",
        roi_output_size=5, roi_hidden=128, roi_batch_size_per_image=128, score_thresh=0.01, nms_thresh=0.5,
        detections_per_img=100,
    )


def default_organ_train_config() -> TrainConfig:
    return TrainConfig(epochs=6, batch_size=2, lr=1e-3, optimizer="adamw", warmup_iters=50, num_workers=0,
                       log_every=10, weight_decay=1e-4, max_steps_per_epoch=0, seed=0)


@dataclass
class OrganDataConfig:
    root: str = option("", doc="organ-ct-sample-layout folder to train on (volumes/, labels/, boxes.csv); with "
                       "root and extra_roots empty: phantoms generated into <run dir>/phantoms", path=True)
    extra_roots: list[str] = option([], doc="more organ-ct-sample-layout folders of labelled CTs added to the "
                                    "training set", path=True)
    extra_repeat: int = option(1, doc="each CT of extra_roots is drawn this many times per epoch (a few real CTs "
                               "among many phantoms)", ge=1)
    exclude_cases: list[str] = option([], doc="case names left out of training (leave-one-case-out validation)")
    mix_phantoms: bool = option(False, doc="also generate the phantoms and add them to the training set when root "
                                "or extra_roots name real CTs (the phantoms as extra data)")
    phantoms: int = option(240, doc="phantoms generated when root and extra_roots are empty, or with mix_phantoms",
                           ge=1)
    seed: int = option(1000, doc="seed of the first generated phantom (held-out phantoms use other seeds)", ge=0)
    slice_mm: list[float] = option([2.5, 5.0], doc="slice spacing range (mm) of the generated phantoms", gt=0)
    in_plane_mm: list[float] = option([2.5, 4.5], doc="in-plane spacing range (mm) of the generated phantoms", gt=0)

    def validate(self, prefix: str = "data") -> None:
        check(self, prefix)
        for key in ("slice_mm", "in_plane_mm"):
            v = getattr(self, key)
            if len(v) != 2 or v[0] > v[1]:
                raise ValueError(f"{prefix}.{key} must be [lo, hi] with lo <= hi, got {v}")


@dataclass
class OrganPreprocessConfig:
    spacing: list[float] | float = option(4.0, doc="resampled voxel size in mm (one number: isotropic; or [z, y, x])",
                                          gt=0)
    hu_lo: float = option(-1000.0, doc="HU mapped to 0")
    hu_hi: float = option(600.0, doc="HU mapped to 1")

    def validate(self, prefix: str = "preprocess") -> None:
        check(self, prefix)
        if isinstance(self.spacing, (list, tuple)) and len(self.spacing) != 3:
            raise ValueError(f"{prefix}.spacing must be one number or 3 (z, y, x), got {self.spacing}")
        if not self.hu_lo < self.hu_hi:
            raise ValueError(f"{prefix}.hu_lo must be < {prefix}.hu_hi, got {self.hu_lo:g} >= {self.hu_hi:g}")

    def build(self):
        """The :class:`~medetect.models.io.Preprocess` stored with the weights."""
        from ..models.io import Preprocess

        sp = list(self.spacing) if isinstance(self.spacing, (list, tuple)) else [float(self.spacing)] * 3
        return Preprocess(ndim=3, channels=1, spacing=sp, window=[self.hu_lo, self.hu_hi],
                          value_range=[-1024.0, 3071.0])


@dataclass
class OrganLocaliseConfig:
    score_thresh: float = option(0.05, doc="an organ is reported present when its best box scores at least this",
                                 ge=0, le=1)

    def validate(self, prefix: str = "localise") -> None:
        check(self, prefix)


@dataclass
class OrganLocalisationConfig:
    task: str = option("organ-localisation", doc="selects this schema", choices=("organ-localisation",))
    data: OrganDataConfig = option(default_factory=OrganDataConfig, doc="training CTs with organ boxes")
    preprocess: OrganPreprocessConfig = option(default_factory=OrganPreprocessConfig,
                                               doc="downsampling and HU window (stored with the weights)")
    model: DetectorConfig = option(default_factory=default_organ_detector,
                                   doc="the 3D detector (defaults: medetect.organs.config.default_organ_detector)")
    augment: OrganAugmentConfig = option(default_factory=OrganAugmentConfig,
                                         doc="random warps, fields of view and intensities of the training CTs")
    localise: OrganLocaliseConfig = option(default_factory=OrganLocaliseConfig, doc="one box per organ")
    train: TrainConfig = option(default_factory=default_organ_train_config, doc="optimisation")

    def validate(self, prefix: str = "") -> None:
        check(self, prefix)
        p = f"{prefix}.model" if prefix else "model"
        self.model.require_ct(p)
        if list(self.model.class_names) != list(ORGANS[: self.model.num_classes]) or \
                self.model.num_classes > len(ORGANS):
            raise ValueError(f"{p}.class_names must be the organs {list(ORGANS)} in this order (a prefix of them)")

    def to_dict(self) -> dict:
        return asdict(self)
