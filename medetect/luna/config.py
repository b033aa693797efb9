"""Typed configs of the two LUNA16 stages, loaded from YAML by :func:`medetect.config.load_config`.

* ``task: luna-detection`` -> :class:`LunaDetectionConfig` (stage one, :func:`medetect.luna.detection.train_detector`):
  sections ``data`` (folder, subsets, cache, patch sampling), ``preprocess`` (spacing, HU window), ``model``
  (:class:`~medetect.models.detector.DetectorConfig`, default :func:`~medetect.luna.detection.default_detector_config`)
  and ``train`` (:class:`~medetect.engine.trainer.TrainConfig`).
* ``task: luna-fpr`` -> :class:`LunaFPRConfig` (stage two, :func:`medetect.luna.fpr.train_fpr`): sections ``data``
  (folder, candidates, subsets, class balance, augmentation), ``model`` (:class:`~medetect.models.fp_reduction.FPRConfig`:
  cube size, spacing, scales, widths, HU window), ``score`` (fusion with stage one, TTA) and ``train``.

Every default equals the corresponding ``medetect luna train`` / ``medetect luna-fpr train`` command-line default, so
an empty YAML (only ``task:`` and ``data.root``) trains what the bare command trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..engine.trainer import TrainConfig
from ..models.detector import DetectorConfig
from ..models.fp_reduction import FPRConfig
from ..schema import check, option
from .fpr import FUSION_MODES

__all__ = [
    "LunaDataConfig",
    "LunaPreprocessConfig",
    "LunaPredictConfig",
    "LunaDetectionConfig",
    "FPRDataConfig",
    "FPRScoreConfig",
    "LunaFPRConfig",
    "default_luna_train_config",
    "default_fpr_train_config",
]



def _default_detector() -> DetectorConfig:
    from .detection import default_detector_config  # lazy: detection.py imports this module inside train_detector

    return default_detector_config()


def default_luna_train_config() -> TrainConfig:
    """Stage one's training defaults (those of ``medetect luna train``)."""
    return TrainConfig(epochs=10, batch_size=4, lr=1e-3, optimizer="adamw", warmup_iters=50, num_workers=0,
                       log_every=10, weight_decay=1e-4, max_steps_per_epoch=0)


def default_fpr_train_config() -> TrainConfig:
    """Stage two's training defaults (those of ``medetect luna-fpr train``)."""
    return TrainConfig(epochs=10, batch_size=16, lr=1e-3, optimizer="adamw", warmup_iters=50, num_workers=0,
                       weight_decay=1e-4, max_steps_per_epoch=0, seed=0)


# ============================================================================================ stage one


@dataclass
class LunaDataConfig:
    root: str = option("", doc="LUNA16 folder (subsetN/<seriesuid>.mhd, annotations.csv)", path=True)
    subsets: list[str] = option([], doc="training subset folders, e.g. [subset0, subset1] (empty: all but "
                                "test_subset)")
    test_subset: str | None = option(None, doc="held-out subset, predicted and scored after training (null: none)")
    cache_dir: str | None = option(None, doc="cache of preprocessed scans (null: <run dir>/cache)", path=True)
    allow_missing_scans: bool = option(False, doc="annotated scans missing from the folder are skipped instead of "
                                       "being an error")
    patch_size: list[int] | int = option(64, doc="training patch size in resampled voxels (one number: a cube; or "
                                         "[z, y, x])", ge=1)
    patches_per_volume: int = option(8, doc="patches drawn from each scan per epoch", ge=1)
    pos_prob: float = option(0.7, doc="probability that a patch is centred on a nodule", ge=0, le=1)

    def validate(self, prefix: str = "data") -> None:
        check(self, prefix)
        if isinstance(self.patch_size, (list, tuple)) and len(self.patch_size) != 3:
            raise ValueError(f"{prefix}.patch_size must be one number or 3 (z, y, x), got {self.patch_size}")


@dataclass
class LunaPreprocessConfig:
    spacing: list[float] | float = option(1.5, doc="resampled voxel size in mm (one number: isotropic; or "
                                          "[z, y, x])", gt=0)
    hu_lo: float = option(-1000.0, doc="HU mapped to 0 (lung window)")
    hu_hi: float = option(400.0, doc="HU mapped to 1 (lung window)")
    pyramid: list[float] = option([], doc="extra coarser levels as zoom factors in (0, 1) (e.g. [0.333]: also at 3x "
                                  "the spacing): training samples patches on every level and prediction runs on every "
                                  "level, merging by NMS, so masses larger than any training nodule are found",
                                  gt=0, lt=1)
    pyramid_min_size: float = option(0.0, doc="on a coarser pyramid level, detections whose longest side is below "
                                     "this many voxels of that level are dropped (each level answers for the objects "
                                     "too large for the finer ones; SNIP's valid ranges)", ge=0)

    def validate(self, prefix: str = "preprocess") -> None:
        check(self, prefix)
        if isinstance(self.spacing, (list, tuple)) and len(self.spacing) != 3:
            raise ValueError(f"{prefix}.spacing must be one number or 3 (z, y, x), got {self.spacing}")
        if not self.hu_lo < self.hu_hi:
            raise ValueError(f"{prefix}.hu_lo must be < {prefix}.hu_hi, got {self.hu_lo:g} >= {self.hu_hi:g}")

    def build(self):
        """The :class:`~medetect.luna.detection.LunaPreprocess` these settings describe."""
        from .detection import LunaPreprocess

        sp = tuple(self.spacing) if isinstance(self.spacing, list) else self.spacing
        return LunaPreprocess(spacing=sp, hu_lo=self.hu_lo, hu_hi=self.hu_hi, pyramid=tuple(self.pyramid),
                              pyramid_min_size=self.pyramid_min_size)


@dataclass
class LunaPredictConfig:
    tile_size: list[int] | int = option(256, doc="sliding-window tile in resampled voxels (one number: a cube; or "
                                        "[z, y, x])", ge=1)
    overlap: float = option(0.25, doc="overlap of neighbouring tiles as a fraction of the tile", ge=0, lt=1)
    max_marks: int = option(100, doc="marks kept per scan (LUNA16 allows at most 100)", ge=1, le=100)
    score_thresh: float | None = option(None, doc="drop marks below this probability (null: the model's "
                                        "model.score_thresh)", ge=0, le=1)

    def validate(self, prefix: str = "predict") -> None:
        check(self, prefix)
        if isinstance(self.tile_size, (list, tuple)) and len(self.tile_size) != 3:
            raise ValueError(f"{prefix}.tile_size must be one number or 3 (z, y, x), got {self.tile_size}")

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`medetect.luna.detection.predict_scan` / ``predict_layout``."""
        ts = tuple(self.tile_size) if isinstance(self.tile_size, list) else self.tile_size
        return {"tile_size": ts, "overlap": self.overlap, "max_marks": self.max_marks,
                "score_thresh": self.score_thresh}


@dataclass
class LunaDetectionConfig:
    task: str = option("luna-detection", doc="selects this schema", choices=("luna-detection",))
    data: LunaDataConfig = option(default_factory=LunaDataConfig, doc="scans, subsets, cache and patch sampling")
    preprocess: LunaPreprocessConfig = option(default_factory=LunaPreprocessConfig,
                                              doc="resampling and HU window (stored with the weights)")
    model: DetectorConfig = option(default_factory=_default_detector,
                                   doc="the 3D detector (defaults: medetect.luna.detection.default_detector_config)")
    train: TrainConfig = option(default_factory=default_luna_train_config, doc="optimisation")
    predict: LunaPredictConfig = option(default_factory=LunaPredictConfig,
                                        doc="whole-scan inference (the test subset after training; luna predict)")

    def validate(self, prefix: str = "") -> None:
        check(self, prefix)
        self.model.require_ct(f"{prefix}.model" if prefix else "model")

    def to_dict(self) -> dict:
        return asdict(self)


# ============================================================================================ stage two


@dataclass
class FPRDataConfig:
    root: str = option("", doc="LUNA16 folder (subsetN/<seriesuid>.mhd)", path=True)
    candidates: str = option("", doc="training candidates: candidates.csv (seriesuid,coordX,coordY,coordZ,class)",
                             path=True)
    subsets: list[str] = option([], doc="train only on these subset folders, e.g. [subset0] (empty: all)")
    pos_fraction: float | None = option(0.5, doc="share of positives per epoch, positives oversampled (null: natural "
                                        "frequencies)", gt=0, lt=1)

    def validate(self, prefix: str = "data") -> None:
        check(self, prefix)


@dataclass
class FPRScoreConfig:
    fuse: str = option("product", doc="fusion with a stage-one probability when the candidates are a submission",
                       choices=FUSION_MODES)
    fuse_weight: float = option(0.5, doc="weight of the stage-one probability for fuse: mean", ge=0, le=1)
    tta: bool = option(False, doc="average over the cube's 8 axis flips")
    batch_size: int = option(64, doc="cubes per forward pass when scoring", ge=1)

    def validate(self, prefix: str = "score") -> None:
        check(self, prefix)


@dataclass
class LunaFPRConfig:
    task: str = option("luna-fpr", doc="selects this schema", choices=("luna-fpr",))
    data: FPRDataConfig = option(default_factory=FPRDataConfig, doc="scans, candidates and class balance")
    model: FPRConfig = option(default_factory=FPRConfig,
                              doc="the cube classifier and its cubes (model.in_channels defaults to len(model.scales))")
    score: FPRScoreConfig = option(default_factory=FPRScoreConfig, doc="scoring and fusion with stage one")
    train: TrainConfig = option(default_factory=default_fpr_train_config, doc="optimisation")

    def validate(self, prefix: str = "") -> None:
        check(self, prefix)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def prepare(raw: dict) -> dict:
        """Raw-mapping defaults that depend on other keys: ``model.in_channels`` = ``len(model.scales)`` unless given."""
        m = raw.get("model")
        if isinstance(m, dict) and isinstance(m.get("scales"), list) and "in_channels" not in m:
            raw = {**raw, "model": {**m, "in_channels": len(m["scales"])}}
        return raw
