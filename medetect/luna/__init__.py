"""LUNA16-style lung nodule detection: dataset layout, preprocessing, training, whole-scan inference, submission."""

from .detection import (
    LunaLayout,
    LunaPreprocess,
    LunaVolumes,
    default_detector_config,
    evaluate_submission,
    load_luna_model,
    lung_pet_ct_smoke,
    predict_layout,
    predict_scan,
    preprocess_scan,
    save_luna_model,
    time_inference,
    train_detector,
    write_submission,
)
from .task import LUNA_DETECTION, LUNA_FPR, TASKS

__all__ = [
    "LUNA_DETECTION",
    "LUNA_FPR",
    "TASKS",
    "LunaLayout",
    "LunaPreprocess",
    "LunaVolumes",
    "default_detector_config",
    "evaluate_submission",
    "load_luna_model",
    "lung_pet_ct_smoke",
    "predict_layout",
    "predict_scan",
    "preprocess_scan",
    "save_luna_model",
    "time_inference",
    "train_detector",
    "write_submission",
]
