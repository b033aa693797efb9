"""``medetect evaluate``: VOC / COCO mAP of a model on a dataset in any format of :mod:`medetect.data.formats` (or a
config's data section), 2D or 3D, through the one predict path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.datasets import DetectionDataset
from ..data.formats import open_dataset, parse_data_spec, source_from_spec
from ..engine.predictor import Predictor
from ..evaluation.detection import evaluate_detections, evaluate_voc
from ..engine.load import load_model

__all__ = ["evaluate_spec"]


def _organ_spec(spec: str):
    from ..organs.report import is_organ_folder

    if is_organ_folder(spec):
        return spec, None
    folder, _, cases = spec.rpartition(":")
    if folder and is_organ_folder(folder):
        return folder, [c for c in cases.split(",") if c]
    return None


def _evaluate_organs(weights, folder: str, cases, *, device=None) -> dict:
    from ..organs.localiser import ORGAN_TASK
    from ..organs.report import evaluate_organ_folder

    loaded = load_model(weights, device=device)
    if loaded.kind != "detector" or loaded.meta.get("extra", {}).get("task") != ORGAN_TASK:
        raise ValueError(f"{weights}: {folder} is an organ folder (boxes.csv, volumes/); it needs an organ localiser "
                         "(a model trained with task: organ-localisation)")
    return evaluate_organ_folder(loaded, folder, cases=cases)


def _open_spec(spec: str, names: list[str]) -> tuple[DetectionDataset, str]:
    """The evaluation dataset of ``--data``: a config YAML (``CONFIG.yaml[:SPLIT]``, its data section, default split
    its ``val_split``), ``FORMAT:PATH:SPLIT`` or ``FOLDER:SPLIT`` (VOC). Returns (dataset, description)."""
    path_part, _, maybe_split = spec.rpartition(":")
    for cand, split in ((spec, ""), (path_part, maybe_split)):
        if cand.endswith((".yaml", ".yml")) and Path(cand).is_file():
            from ..config import load_config  # the config route sits beside this module

            cfg = load_config(cand)
            data = getattr(cfg, "data", None)
            if data is None or not hasattr(data, "source"):
                raise ValueError(f"{cand}: --data needs a config with a detection data section (task: detection)")
            split = split or data.val_split or data.train_split
            src = data.source()
            src["classes"] = src["classes"] or names
            return open_dataset(**src, split=split), f"{cand}:{split}"
    fmt, path, split = parse_data_spec(spec)
    if fmt == "datalist":
        raise ValueError(f"--data {spec!r} cannot state a datalist's box convention: evaluate it through a config "
                         "(--data CONFIG.yaml[:SPLIT]) whose data section sets box_mode and box_units")
    if fmt == "coco" and "{split}" not in path:
        split = "all"  # the file given is the split
    return open_dataset(**source_from_spec(fmt, path), split=split, classes=names), spec


def evaluate_spec(weights, spec: str, *, device=None, plot_dir=None, allow_range_mismatch: bool = False,
                  froc: bool = False, saliency: str | None = None, n_boot: int = 1000,
                  threshold_split: str | None = "train", tta: str | None = None) -> dict:
    """Evaluate on ``--data`` (``CONFIG.yaml[:SPLIT]``, ``FORMAT:PATH:SPLIT`` or a VOC ``FOLDER:SPLIT``; see
    :func:`_open_spec`); returns VOC/COCO mAP and per-class AP@0.5, 2D or 3D, and with ``froc`` the box FROC per
    image / scan (:func:`~medetect.evaluation.box_froc.box_froc`: sensitivities at 1/8..8 FP per image, CPM).
    An ``attention`` model is scored on a mini-MIAS-layout ``FOLDER:SPLIT`` instead (:mod:`medetect.attention.evaluate`;
    ``saliency``: ``attention`` or ``gradcam``, default the model's own; ``n_boot`` bootstrap draws). An
    ``organ-ct-sample``-layout folder (``FOLDER`` or ``FOLDER:CASE[,CASE..]``) with an organ localiser gives the
    per-organ metrics of :func:`medetect.organs.report.evaluate_organ_folder`. A detector with the classes
    ``benign``, ``malignant`` on a mini-MIAS-layout ``FOLDER:SPLIT`` gives the mammography metrics of
    :func:`medetect.mammo.evaluate.evaluate_mammo` (lesion FROC, image and lesion AUC, bootstrap CIs by patient; per
    lesion type; the image confusion at thresholds picked on ``threshold_split``). ``tta`` (``--tta``): ``none`` or
    ``flips`` overrides a detector's ``model.tta``."""
    organs = _organ_spec(spec)
    if organs is not None:
        return _evaluate_organs(weights, *organs, device=device)
    loaded = load_model(weights, device=device)
    if loaded.kind == "attention":  # image labels + lesion circles (a mini-MIAS-layout folder)
        from ..attention.evaluate import evaluate_attention

        if ":" not in spec:
            raise ValueError(f"--data must be FOLDER:SPLIT for an attention model (a mini-MIAS-layout folder), got {spec!r}")
        folder, split = spec.rsplit(":", 1)
        return evaluate_attention(loaded, folder, split, method=saliency, n_boot=n_boot)
    if loaded.kind != "detector":
        raise ValueError(f"{weights}: evaluate needs a detector, this model is a {loaded.kind!r}")
    if tta is not None:
        loaded.model.config.tta = tta  # every Predictor below (mammography route included) reads and checks it
    folder, _, split = spec.rpartition(":")
    if folder and split:
        from ..mammo.evaluate import evaluate_mammo, is_mammo_folder

        if is_mammo_folder(folder):  # a mini-MIAS-layout folder: lesion FROC + image/lesion AUC (benign/malignant)
            return evaluate_mammo(loaded, folder, split, device=device, n_boot=n_boot, plot_dir=plot_dir,
                                  allow_range_mismatch=allow_range_mismatch, threshold_split=threshold_split)
    names = list(loaded.classes)
    ds, where = _open_spec(spec, names)
    report = ds.report
    if len(ds) == 0:
        raise ValueError(f"{where}: the split lists no images")
    unknown = sorted(set(ds.classes) - set(names))
    if unknown:
        raise ValueError(f"{where}: classes {unknown} are not among the model's classes {names}")
    predictor = Predictor(loaded.model, device=device)
    preds, gts = [], []
    index = {c: i for i, c in enumerate(names)}
    for i in range(len(ds)):
        rec = ds.records[i]
        img = ds.image(i)  # as stored (dtype, geometry): the range check and resampling see what the file holds
        if rec.ndim != img.ndim:
            raise ValueError(f"{rec.image}: boxes are {rec.ndim}D but the image is {img.ndim}D")
        det = predictor.predict_image(img, loaded.preprocess, allow_range_mismatch=allow_range_mismatch)
        preds.append({"boxes": det["boxes"].float(), "scores": det["scores"], "labels": det["labels"]})
        labels = torch.tensor([index[c] for c in ds.records[i].labels], dtype=torch.long)  # model's class order
        gts.append({"boxes": torch.from_numpy(rec.boxes.astype(np.float32)).reshape(-1, 2 * rec.ndim), "labels": labels})
    res = evaluate_detections(preds, gts, class_names=names)  # the one set of metric keys (validation: val_ + key)
    if plot_dir:
        from ..evaluation.plots import pr_curve_png

        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        pr_curve_png(evaluate_voc(preds, gts, class_names=names), Path(plot_dir) / "pr_voc50.png", class_names=names)
    if froc:
        from ..evaluation.box_froc import box_froc

        res["froc"] = box_froc(preds, gts)
    return {**res, "skipped_zero_size": report.skipped_zero_size}
