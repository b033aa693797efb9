"""``medetect evaluate`` for a detector: VOC / COCO mAP (and with ``--froc`` the box FROC) on a labelled dataset in any
format of :mod:`medetect.data.formats`, or on the data section of a config, 2D or 3D, through the one predict path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from ..data.formats import open_dataset, parse_data_spec, source_from_spec
from ..engine.predictor import Predictor
from ..engine.tasks import EvaluateOptions
from ..evaluation.detection import evaluate_detections, evaluate_voc
from ..schema import build_config
from .config import ExperimentConfig
from .predict import predict_named

__all__ = ["evaluate_detector", "format_detection_report", "open_data_spec"]


def _config_dataset(path: Path, split: str, names: list[str]):
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise ValueError(f"{path}: --data needs a config with a detection data section (data:)")
    try:  # the detection schema (mammography's too): the task key names the task, the data section is the same
        cfg = build_config(ExperimentConfig, {k: v for k, v in raw.items() if k != "task"}, base_dir=path.parent)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    data = cfg.data
    split = split or data.val_split or data.train_split
    src = data.source()
    src["classes"] = src["classes"] or names
    return open_dataset(**src, split=split), f"{path}:{split}"


def open_data_spec(spec: str, names: list[str]):
    """The evaluation dataset of ``--data``: a config YAML (``CONFIG.yaml[:SPLIT]``, its data section, default split
    its ``val_split``), ``FORMAT:PATH:SPLIT`` or ``FOLDER:SPLIT`` (VOC). Returns (dataset, description)."""
    path_part, _, maybe_split = spec.rpartition(":")
    for cand, split in ((spec, ""), (path_part, maybe_split)):
        if cand.endswith((".yaml", ".yml")) and Path(cand).is_file():
            return _config_dataset(Path(cand), split, names)
    fmt, path, split = parse_data_spec(spec)
    if fmt == "datalist":
        raise ValueError(f"--data {spec!r} cannot state a datalist's box convention: evaluate it through a config "
                         "(--data CONFIG.yaml[:SPLIT]) whose data section sets box_mode and box_units")
    if fmt == "coco" and "{split}" not in path:
        split = "all"  # the file given is the split
    return open_dataset(**source_from_spec(fmt, path), split=split, classes=names), spec


def evaluate_detector(loaded, spec: str, options: EvaluateOptions) -> dict:
    """VOC/COCO mAP and per-class AP@0.5 of the detector ``loaded`` on ``--data`` (:func:`open_data_spec`), 2D or
    3D; with ``options.froc`` the box FROC per image / scan (:func:`~medetect.evaluation.box_froc.box_froc`)."""
    names = list(loaded.classes)
    ds, where = open_data_spec(spec, names)
    if len(ds) == 0:
        raise ValueError(f"{where}: the split lists no images")
    unknown = sorted(set(ds.classes) - set(names))
    if unknown:
        raise ValueError(f"{where}: classes {unknown} are not among the model's classes {names}")
    predictor = Predictor(loaded.model, device=options.device, tta=options.tta)
    preds, gts = [], []
    index = {c: i for i, c in enumerate(names)}
    for i in range(len(ds)):
        rec = ds.records[i]
        img = ds.image(i)  # as stored (dtype, geometry): the range check and resampling see what the file holds
        if rec.ndim != img.ndim:
            raise ValueError(f"{rec.image}: boxes are {rec.ndim}D but the image is {img.ndim}D")
        det = predict_named(predictor, img, loaded.preprocess, rec.image,
                            allow_range_mismatch=options.allow_range_mismatch)
        preds.append({"boxes": det["boxes"].float(), "scores": det["scores"], "labels": det["labels"]})
        labels = torch.tensor([index[c] for c in rec.labels], dtype=torch.long)  # model's class order
        gts.append({"boxes": torch.from_numpy(rec.boxes.astype(np.float32)).reshape(-1, 2 * rec.ndim), "labels": labels})
    res = evaluate_detections(preds, gts, class_names=names)  # the one set of metric keys (validation: val_ + key)
    if options.plot_dir:
        from ..evaluation.plots import pr_curve_png

        Path(options.plot_dir).mkdir(parents=True, exist_ok=True)
        pr_curve_png(evaluate_voc(preds, gts, class_names=names), Path(options.plot_dir) / "pr_voc50.png",
                     class_names=names)
    if options.froc:
        from ..evaluation.box_froc import box_froc

        res["froc"] = box_froc(preds, gts)
    return {**res, "skipped_zero_size": ds.report.skipped_zero_size}


def format_detection_report(res: dict) -> str:
    """The terminal summary of :func:`evaluate_detector`'s result."""
    lines = [f"images: {res['images']}  boxes: {res['boxes']}",
             f"VOC mAP@0.5 (all-point): {res['map50']:.4f}   VOC07 11-point: {res['map50_07']:.4f}   "
             f"COCO mAP@[.5:.95]: {res['coco_map']:.4f}"]
    lines += [f"  AP@0.5 {name:>12s}: {ap:.4f}" for name, ap in res["ap50_per_class"].items()]
    if "froc" in res:
        f = res["froc"]
        if f["cpm"] is None:  # no ground-truth box
            lines.append(f"FROC: undefined ({f['undefined']['cpm']})")
        else:
            lines.append(f"FROC (IoU >= {f['iou_threshold']}, {f['lesions']} lesions in {f['images']} images): CPM "
                         f"{f['cpm']:.4f}; " + ", ".join(f"{k} FP/img {v:.3f}" for k, v in f["sensitivity_at"].items()))
    return "\n".join(lines)
