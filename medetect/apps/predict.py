"""``medetect predict``: run a shipped model (or a training run folder) on images and volumes.

Every input goes through the model's stored preprocessing (:func:`medetect.data.preprocess.prepare`: the same
resampling and HU window as ``medetect luna predict`` for a CT model, the same resize and normalisation as training
for a 2D model) and :meth:`medetect.engine.predictor.Predictor.predict_image`; boxes come back on the INPUT grid.

Output, in ``out_dir``:

``<stem>.csv`` per input, one row per detection, sorted by score (descending)::

    z0,y0,x0,z1,y1,x1   (volumes)  or  y0,x0,y1,x1  (2D)   box, voxels of the INPUT array, half-open edges
                                                          (voxel i covers [i, i+1)), named per axis
    label                                                 class name
    score                                                 detection score in [0, 1]
    centre_x_mm,centre_y_mm,centre_z_mm                   (volumes, and 2D images with a real geometry) world
                                                          centre (x, y, z) in mm (the file's origin and direction)
    extent_z_mm,extent_y_mm,extent_x_mm                   box size in mm per array axis; diameter_mm = their mean

The box columns are written once and named, so every convention is a choice of columns: medetect / array order is
``z0,y0,x0,z1,y1,x1``; torchvision / COCO-style ``xyxy`` is ``x0,y0,x1,y1``; MONAI ``xyzxyz`` is
``x0,y0,z0,x1,y1,z1`` (same values, no conversion needed).

``predictions.json``: ``{input path: {"boxes" (array order), "boxes_xyxy" (x, y[, z] lo then hi), "labels",
"scores", and for geometry-bearing inputs "centres_mm" (x, y, z), "diameters_mm"}}``.

``errors.csv`` (``input,error``) when ``skip_errors`` skipped inputs that could not be read or predicted.

More formats (``formats``, ``medetect predict --format``; the writers are in :mod:`medetect.apps.results`):

* ``coco``: ``coco_results.json`` (a COCO results list ``{image_id, category_id, bbox [x, y, w, h], score}``) and
  ``coco_images.json`` (``images`` ``{id, file_name, height, width}`` and ``categories``), 2D inputs;
* ``slicer``: ``<stem>_rois/roi_NNN.mrk.json``, one 3D Slicer markups ROI per detection in LPS mm (volumes);
* ``dicom-sr``: ``<stem>.sr.dcm``, a TID 1500 Comprehensive 3D SR referencing the DICOM input (needs highdicom).

``overlays``: ``overlays/<stem>.png``, the input (a volume: the slice through its best detection) with the boxes.

Caps and checks: at most ``max_detections`` per input (default: the model's ``detections_per_img``; tiles included),
with a warning naming the input when reached. Inputs whose values lie outside the range the model was trained on
(e.g. a 16-bit PNG given to an 8-bit model) get a warning, or a refusal when far outside (``allow_range_mismatch``
overrides). A 2D model refuses a volume and vice versa.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..convert import Geometry
from ..data.image import MedicalImageError
from ..data.io import READ_EXTENSIONS, read_image
from ..engine.predictor import Predictor
from ..engine.load import load_model

__all__ = ["check_tile_size", "image_files", "predict_paths"]


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders (a folder of ``.dcm`` files is one DICOM series) into image files, in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any(q.suffix.lower() == ".dcm" for q in p.iterdir()):
            out.extend(sorted(q for q in p.iterdir() if q.name.lower().endswith(tuple(READ_EXTENSIONS))))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return out


def check_tile_size(tile_size, ndim: int) -> tuple[int, ...] | None:
    """``--tile`` as the user gave it (input voxels, one per axis, or one for all): positive integers, else a
    ``ValueError`` quoting the user's values."""
    if tile_size is None:
        return None
    t = [tile_size] if isinstance(tile_size, (int, float)) else list(tile_size)
    if not t or not all(isinstance(v, (int, float, np.integer)) and int(v) == v and v > 0 for v in t):
        raise ValueError(f"--tile must be positive whole numbers of voxels, got {' '.join(str(v) for v in t)}")
    if len(t) == 1:
        t = t * ndim
    if len(t) != ndim:
        raise ValueError(f"--tile needs 1 or {ndim} sizes for this {ndim}D model, got {' '.join(str(v) for v in t)}")
    return tuple(int(v) for v in t)


def _has_geometry(g: Geometry) -> bool:
    return g.ndim == 3 or any(s != 1.0 for s in g.spacing) or any(o != 0.0 for o in g.origin) or \
        not np.allclose(np.asarray(g.direction, dtype=float).reshape(g.ndim, g.ndim), np.eye(g.ndim))


def _stem(f: Path) -> str:
    return f.name[: -len(".nii.gz")] if f.name.lower().endswith(".nii.gz") else (f.stem if f.is_file() else f.name)


def _write_csv(path: Path, det: dict, names: list[str], with_mm: bool) -> dict:
    boxes = det["boxes"].numpy()
    d = boxes.shape[1] // 2
    axes = ("z", "y", "x")[-d:]
    labels = [names[int(i)] if int(i) < len(names) else str(int(i)) for i in det["labels"].tolist()]
    scores = det["scores"].double().numpy()
    header = [*(a + "0" for a in axes), *(a + "1" for a in axes), "label", "score"]
    world = ("x", "y", "z")[:d]
    if with_mm:
        header += [f"centre_{a}_mm" for a in world] + [f"extent_{a}_mm" for a in axes] + ["diameter_mm"]
    centres, extent, dia = det["centres_world"].numpy(), det["extent_mm"].numpy(), det["diameters_mm"].numpy()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in range(len(scores)):  # rows of a file (I/O), not a computation over boxes
            row = [*(f"{v:.3f}" for v in boxes[i]), labels[i], f"{scores[i]:.6f}"]
            if with_mm:
                row += [f"{v:.3f}" for v in (*centres[i], *extent[i], dia[i])]
            w.writerow(row)
    xyxy = np.concatenate([boxes[:, :d][:, ::-1], boxes[:, d:][:, ::-1]], 1) if len(boxes) else boxes
    rec = {"boxes": boxes.round(3).tolist(), "boxes_xyxy": xyxy.round(3).tolist(), "labels": labels,
           "scores": scores.round(6).tolist()}
    if with_mm:
        rec["centres_mm"] = centres.round(3).tolist()
        rec["diameters_mm"] = dia.round(3).tolist()
    return rec


def _predict_organs(loaded, paths, out_dir, *, series_uid=None, allow_gaps=False, skip_errors=False) -> list[Path]:
    from ..organs.report import predict_organs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, everything, errors = [], {}, []

    def read(f: Path):
        return read_image(f, series_uid=series_uid, allow_gaps=allow_gaps) if f.is_dir() else read_image(f)

    for f in image_files(paths):  # one CT per input
        try:
            w, rec = predict_organs(loaded, [f], out_dir, read=read)
        except (ValueError, FileNotFoundError, MedicalImageError, OSError, RuntimeError) as e:
            if not skip_errors:
                raise
            errors.append((str(f), str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        written += w
        everything.update(rec)
    (out_dir / "predictions.json").write_text(json.dumps(everything))
    if errors:
        with open(out_dir / "errors.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("input", "error"), *errors])
    return written


def predict_paths(weights, paths: Sequence[str | Path], out_dir: str | Path, *, tile_size=None, overlap: float = 0.25,
                  device=None, score_thresh: float = 0.05, max_detections: int | None = None,
                  skip_errors: bool = False, allow_range_mismatch: bool = False, progress: bool = True,
                  series_uid: str | None = None, allow_gaps: bool = False, formats: Sequence[str] = ("csv",),
                  overlays: bool = False, tta: str | None = None) -> list[Path]:
    """Detect in every image/volume of ``paths`` (files or folders) with the model ``weights`` (a model file or a
    run folder); writes one CSV per input, ``predictions.json`` and, with ``skip_errors``, ``errors.csv`` (module
    docstring); a detector with the classes ``benign``, ``malignant`` (mammography) also writes ``image_scores.csv``
    (``p_abnormal`` / ``p_malignant`` = the highest score of any / of the malignant detections, 0 without).
    ``tile_size`` is in INPUT voxels (``--tile``). ``series_uid`` / ``allow_gaps`` go to the DICOM series
    reader for folder inputs (``--series-uid``, ``--allow-gaps``). ``tta`` (``--tta``): ``none`` or ``flips``
    overrides the detector's ``model.tta``. Returns the CSV paths written."""
    from .results import FORMATS, coco_results, write_dicom_sr, write_overlay, write_slicer_rois

    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"--format must be among {list(FORMATS)}, got {bad}")
    loaded = load_model(weights, device=device)
    if loaded.kind == "attention":  # image scores + attention overlay PNGs (medetect.attention.predict)
        from ..attention.predict import predict_attention

        return predict_attention(loaded, image_files(paths), Path(out_dir), device=device,
                                 allow_range_mismatch=allow_range_mismatch)
    if loaded.kind != "detector":
        raise ValueError(f"{weights}: predict needs a detector, this model is a {loaded.kind!r} (lineage models: "
                         "medetect lineage evaluate)")
    if getattr(loaded.model.config, "arch", None) == "fast_rcnn":
        raise ValueError(f"{weights}: a Fast R-CNN detects in regions proposed from outside (selective search): run it "
                         "through medetect lineage evaluate, not predict")
    if loaded.meta.get("extra", {}).get("task") == "organ-localisation":  # one box per organ + a three-view PNG
        return _predict_organs(loaded, paths, out_dir, series_uid=series_uid, allow_gaps=allow_gaps,
                               skip_errors=skip_errors)
    pre, names = loaded.preprocess, loaded.classes
    tile = check_tile_size(tile_size, pre.ndim)
    if max_detections is not None and (isinstance(max_detections, bool) or int(max_detections) != max_detections
                                       or max_detections < 1):
        raise ValueError(f"--max-detections must be a positive integer, got {max_detections}")
    predictor = Predictor(loaded.model, device=device, overlap=overlap, max_detections=max_detections,
                          score_thresh=score_thresh, tta=tta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = image_files(paths)
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        files = tqdm(files, desc="predict", unit="input")
    written: list[Path] = []
    everything, errors, image_scores = {}, [], []
    coco_images, coco_dets = [], []
    category_ids = {n: i + 1 for i, n in enumerate(names)}
    for f in files:
        try:
            img = read_image(f, series_uid=series_uid, allow_gaps=allow_gaps) if f.is_dir() else read_image(f)
            if tile is not None and img.geometry.ndim == pre.ndim:
                zoom = [(o / s if pre.spacing else 1.0) * pre.scale
                        for o, s in zip(img.geometry.spacing, pre.spacing or img.geometry.spacing)]
                predictor.tile_size = tuple(max(1, int(round(t * z))) for t, z in zip(tile, zoom))
                if min(predictor.tile_size) < predictor.min_size:  # smaller tiles are padded: many, slow, useless
                    need = [math.ceil(predictor.min_size / z) for z in zoom]
                    raise ValueError(
                        f"--tile {' '.join(str(t) for t in tile)} gives tiles of {list(predictor.tile_size)} voxels on "
                        f"the model's grid, below its smallest input of {predictor.min_size}; use --tile "
                        f"{' '.join(str(n) for n in need)} or more for {f.name}")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                det = predictor.predict_image(img, pre, allow_range_mismatch=allow_range_mismatch)
        except (ValueError, FileNotFoundError, MedicalImageError, OSError, RuntimeError) as e:
            if not skip_errors:
                raise
            errors.append((str(f), str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        for w in caught:
            msg = str(w.message)
            warnings.warn(msg if str(f) in msg else f"{f}: {msg}", w.category, stacklevel=2)
        keep = det["scores"] >= score_thresh
        det = {k: v[keep] for k, v in det.items()}
        path = out_dir / f"{_stem(f)}.csv"
        n = 1
        while path in written:  # two inputs with the same name (other folders): never overwrite a result
            n += 1
            path = out_dir / f"{_stem(f)}_{n}.csv"
        everything[str(f)] = _write_csv(path, det, names, _has_geometry(img.geometry))
        written.append(path)
        stem = path.stem
        if "coco" in formats:
            if img.ndim != 2:
                raise ValueError(f"{f}: --format coco holds 2D images; this input is {img.ndim}D (use slicer)")
            coco_dets += coco_results(det, len(coco_images) + 1, category_ids, names)
            coco_images.append({"id": len(coco_images) + 1, "file_name": str(f), "height": img.spatial_shape[0],
                                "width": img.spatial_shape[1]})
        if "slicer" in formats:
            write_slicer_rois(det, img.geometry, names, out_dir / f"{stem}_rois")
        if "dicom-sr" in formats:
            if len(det["scores"]):
                write_dicom_sr(det, img, f, names, out_dir / f"{stem}.sr.dcm")
            else:  # TID 1500 needs at least one measurement group
                warnings.warn(f"{f}: no detections, so no DICOM SR was written", stacklevel=2)
        if overlays:
            write_overlay(img, det, names, out_dir / "overlays" / f"{stem}.png")
        if list(names) == ["benign", "malignant"]:  # a mammography detector: image scores as Ribli (max lesion score)
            sc, mal = det["scores"].float(), det["labels"] == 1
            image_scores.append((str(f), float(sc.max()) if len(sc) else 0.0,
                                 float(sc[mal].max()) if bool(mal.any()) else 0.0))
    (out_dir / "predictions.json").write_text(json.dumps(everything))
    if image_scores:
        with open(out_dir / "image_scores.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["input", "p_abnormal", "p_malignant"])
            w.writerows(image_scores)
    if "coco" in formats:
        (out_dir / "coco_results.json").write_text(json.dumps(coco_dets))
        cats = [{"id": i, "name": n, "supercategory": "none"} for n, i in category_ids.items()]
        (out_dir / "coco_images.json").write_text(json.dumps({"images": coco_images, "categories": cats}))
    if errors:
        with open(out_dir / "errors.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["input", "error"])
            w.writerows(errors)
        warnings.warn(f"{len(errors)} of {len(errors) + len(written)} inputs failed; see {out_dir / 'errors.csv'}",
                      stacklevel=2)
    return written
