"""The two LUNA16 tasks: ``luna-detection`` (stage one, the 3D nodule detector on whole CT scans; after training, the
config's ``data.test_subset`` is predicted and scored by the LUNA16 FROC) and ``luna-fpr`` (stage two, the
multi-scale cube classifier that reduces false positives among candidates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..detection.evaluate import evaluate_detector, format_detection_report
from ..detection.predict import predict_detections
from ..engine.tasks import Task
from .config import LunaDetectionConfig, LunaFPRConfig

__all__ = ["LUNA_DETECTION", "LUNA_FPR", "TASKS"]


def _train_detection(cfg, run_dir: Path, *, device=None, **kw) -> dict:
    from .detection import (LunaLayout, _froc_summary, evaluate_submission, load_luna_model, predict_layout,
                            train_detector, write_submission)

    dc = cfg.data
    if not dc.root:
        raise ValueError("data.root is not set: give the LUNA16 folder in the config, as ROOT or with --set data.root=...")
    layout = LunaLayout(dc.root, allow_missing_scans=dc.allow_missing_scans)
    w = train_detector(layout, run_dir, config=cfg, device=device or "cpu", **kw)
    out: dict[str, Any] = {"weights": str(w)}
    if dc.test_subset:
        model, pre = load_luna_model(w)
        test = layout.uids_in([dc.test_subset])
        sub = write_submission(Path(run_dir) / "submission.csv", predict_layout(model, pre, layout, test,
                                                                               **cfg.predict.kwargs()))
        out["submission"] = str(sub)
        out["test_froc"] = _froc_summary(evaluate_submission(layout, sub, test))
    return out


def _train_fpr(cfg, run_dir: Path, **kw) -> dict:
    from .fpr import train_fpr

    _, history = train_fpr(run_dir=run_dir, config=cfg, **kw)
    return {**(history[-1] if history else {}), "weights": str(Path(run_dir) / "model.safetensors")}


def _predict(loaded, inputs, out_dir, options):
    return predict_detections(loaded, inputs, out_dir, options)


LUNA_DETECTION = Task(
    name="luna-detection",
    summary="LUNA16 stage one: a 3D nodule detector on whole CT scans (resampled, HU window); predict gives nodule "
            "boxes with world centres; the LUNA16 FROC / CPM comes from medetect luna predict + medetect froc.",
    config=LunaDetectionConfig,
    model_kinds=("detector",),
    train=_train_detection,
    predict=_predict,
    evaluate=evaluate_detector,
    report=format_detection_report,
    formats=("csv", "slicer", "dicom-sr"),
    overlays=True,
    tiles=True,
    tta=True,
)

LUNA_FPR = Task(
    name="luna-fpr",
    summary="LUNA16 stage two: false-positive reduction, a multi-scale 3D cube classifier that rescores candidates.",
    config=LunaFPRConfig,
    model_kinds=("fpr",),
    train=_train_fpr,
    predict_note="a false-positive-reduction model scores candidates: medetect luna-fpr score",
    evaluate_note="score candidates with medetect luna-fpr score, then medetect froc on the submission",
)

TASKS = (LUNA_DETECTION, LUNA_FPR)
