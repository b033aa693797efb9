"""``medetect predict`` for a detector: every input goes through the model's stored preprocessing
(:func:`medetect.data.preprocess.prepare`: the same resampling and HU window as training for a CT model, the same resize
and normalisation for a 2D model) and :meth:`medetect.engine.predictor.Predictor.predict_image`; boxes come back on
the INPUT grid.

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

More formats (``--format``; the writers are in :mod:`medetect.detection.outputs`):

* ``coco``: ``coco_results.json`` (a COCO results list ``{image_id, category_id, bbox [x, y, w, h], score}``) and
  ``coco_images.json`` (``images`` ``{id, file_name, height, width}`` and ``categories``), 2D models. When the inputs
  came from a COCO file, its image ids are kept, so ``coco_results.json`` scores against that file directly;
* ``slicer``: ``<stem>_rois/roi_NNN.mrk.json``, one 3D Slicer markups ROI per detection in LPS mm (3D models);
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
from ..data.io import is_dicom
from ..engine.predictor import Predictor
from ..engine.tasks import INPUT_ERRORS, PredictInput, PredictOptions, first_line, read_input, stem, write_errors
from .outputs import NEEDS_HIGHDICOM, coco_results, write_dicom_sr, write_overlay, write_slicer_rois

__all__ = ["check_tile_size", "predict_detections", "predict_named"]

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


def predict_named(predictor: Predictor, image, preprocess, name, *, allow_range_mismatch: bool = False) -> dict:
    """:meth:`Predictor.predict_image`, with every warning it raises (the detection cap reached, values outside the
    trained range) naming the input ``name``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = predictor.predict_image(image, preprocess, allow_range_mismatch=allow_range_mismatch)
    for w in caught:
        msg = str(w.message)
        warnings.warn(msg if str(name) in msg else f"{name}: {msg}", w.category, stacklevel=3)
    return det


def _has_geometry(g: Geometry) -> bool:
    return g.ndim == 3 or any(s != 1.0 for s in g.spacing) or any(o != 0.0 for o in g.origin) or \
        not np.allclose(np.asarray(g.direction, dtype=float).reshape(g.ndim, g.ndim), np.eye(g.ndim))


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


def _check_dicom_sr(inputs: Sequence[PredictInput]) -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise ValueError(NEEDS_HIGHDICOM) from None
    for inp in inputs:
        if not is_dicom(inp.path):
            raise ValueError(f"--format dicom-sr references DICOM inputs; {inp.path} is not a DICOM file or series "
                             "folder")


def predict_detections(loaded, inputs: Sequence[PredictInput], out_dir: Path, options: PredictOptions, *,
                       per_image=None) -> list[Path]:
    """Detect in every input with the detector ``loaded``; writes the files of the module docstring. ``per_image``
    (optional) is called as ``per_image(path, det)`` after each input, for a task's own summaries. Returns the CSV
    paths written."""
    pre, names = loaded.preprocess, list(loaded.classes)
    tile = check_tile_size(options.tile_size, pre.ndim)
    mx = options.max_detections
    if mx is not None and (isinstance(mx, bool) or int(mx) != mx or mx < 1):
        raise ValueError(f"--max-detections must be a positive integer, got {mx}")
    formats = set(options.formats)
    if "dicom-sr" in formats:
        _check_dicom_sr(inputs)
    predictor = Predictor(loaded.model, device=options.device, overlap=options.overlap, max_detections=mx,
                          score_thresh=options.score_thresh, tta=options.tta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = list(inputs)
    if options.progress and sys.stderr.isatty():
        from tqdm import tqdm

        todo = tqdm(todo, desc="predict", unit="input")
    written: list[Path] = []
    everything, errors = {}, []
    coco_images, coco_dets = [], []
    category_ids = {n: i + 1 for i, n in enumerate(names)}
    next_id = 1 + max((i.image_id for i in inputs if i.image_id is not None), default=0)
    for inp in todo:
        f = inp.path
        try:
            img = read_input(f, options)
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
            det = predict_named(predictor, img, pre, f, allow_range_mismatch=options.allow_range_mismatch)
        except INPUT_ERRORS as e:
            if not options.skip_errors:
                raise
            errors.append((str(f), first_line(e)))
            continue
        keep = det["scores"] >= options.score_thresh
        det = {k: v[keep] for k, v in det.items()}
        path = out_dir / f"{stem(f)}.csv"
        n = 1
        while path in written:  # two inputs with the same name (other folders): never overwrite a result
            n += 1
            path = out_dir / f"{stem(f)}_{n}.csv"
        everything[str(f)] = _write_csv(path, det, names, _has_geometry(img.geometry))
        written.append(path)
        if "coco" in formats:
            image_id = inp.image_id
            if image_id is None:
                image_id, next_id = next_id, next_id + 1
            coco_dets += coco_results(det, image_id, category_ids, names)
            coco_images.append({"id": image_id, "file_name": str(f), "height": img.spatial_shape[0],
                                "width": img.spatial_shape[1]})
        if "slicer" in formats:
            write_slicer_rois(det, img.geometry, names, out_dir / f"{path.stem}_rois")
        if "dicom-sr" in formats:
            if len(det["scores"]):
                write_dicom_sr(det, img, f, names, out_dir / f"{path.stem}.sr.dcm")
            else:  # TID 1500 needs at least one measurement group
                warnings.warn(f"{f}: no detections, so no DICOM SR was written", stacklevel=2)
        if options.overlays:
            write_overlay(img, det, names, out_dir / "overlays" / f"{path.stem}.png")
        if per_image is not None:
            per_image(f, det)
    (out_dir / "predictions.json").write_text(json.dumps(everything))
    if "coco" in formats:
        (out_dir / "coco_results.json").write_text(json.dumps(coco_dets))
        cats = [{"id": i, "name": n, "supercategory": "none"} for n, i in category_ids.items()]
        (out_dir / "coco_images.json").write_text(json.dumps({"images": coco_images, "categories": cats}))
    write_errors(out_dir, errors, len(written))
    return written
