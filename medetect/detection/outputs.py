"""Detections in the formats other tools read: COCO results JSON (2D), 3D Slicer markups ROI files (world mm),
DICOM Structured Reports (TID 1500, through the optional ``highdicom``) and overlay PNGs.

Every writer takes one input's detections as :meth:`medetect.engine.predictor.Predictor.predict_image` returns them
(``boxes`` ``[N, 2d]`` in voxels of the input array, ``labels``, ``scores``) with the input's
:class:`~medetect.convert.Geometry`; ``medetect predict --format ... --overlays`` calls them
(:func:`medetect.apps.predict.predict_paths`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..convert import Geometry, voxel_to_world
from ..data.image import MedicalImage

__all__ = ["FORMATS", "coco_results", "write_slicer_rois", "write_overlay", "write_dicom_sr"]

FORMATS = ("csv", "coco", "slicer", "dicom-sr")
NEEDS_HIGHDICOM = ('--format dicom-sr needs the optional package highdicom: pip install -e ".[dicom-sr]" in a medetect '
                   "checkout, or pip install highdicom")
SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
                 "markups-schema-v1.0.3.json#")


def coco_results(det: dict, image_id: int, category_ids: dict[str, int], names: Sequence[str]) -> list[dict]:
    """One 2D input's detections as COCO result entries ``{image_id, category_id, bbox [x, y, w, h], score}``
    (pixel-edge coordinates, the pycocotools convention; the inverse of the COCO reader's ``(y, x, y + h, x + w)``)."""
    b = det["boxes"].double().numpy()
    if b.shape[1] != 4:
        raise ValueError(f"--format coco holds 2D boxes; this input has {b.shape[1] // 2}D boxes (use slicer)")
    xywh = np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], 1).round(3)
    labels = [names[int(i)] for i in det["labels"].tolist()]
    return [{"image_id": image_id, "category_id": category_ids[lab], "bbox": bb, "score": round(float(s), 6)}
            for bb, lab, s in zip(xywh.tolist(), labels, det["scores"].double().tolist())]


def _box_frames(boxes: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel boxes ``[N, 6]`` -> world centres ``[N, 3]`` (x, y, z), sizes ``[N, 3]`` mm along the image's own
    axes (ITK order i, j, k) and the ``[3, 3]`` orientation (columns: the i, j, k axes in world)."""
    d = 3
    centre_vox = (boxes[:, :d] + boxes[:, d:]) / 2  # array order
    centres = np.asarray(voxel_to_world(centre_vox, geometry))
    size = ((boxes[:, d:] - boxes[:, :d]) * np.asarray(geometry.spacing))[:, ::-1]  # ITK order i, j, k
    orient = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    return centres, size, orient


def write_slicer_rois(det: dict, geometry: Geometry, names: Sequence[str], folder: Path) -> list[Path]:
    """One 3D Slicer markups ROI file (``.mrk.json``) per detection in ``folder``: an oriented box in LPS
    millimetres (centre, size along the image axes, the image's direction as orientation), named ``label score``,
    so Slicer draws it over the same scan (drop the folder onto Slicer). 3D inputs only."""
    b = det["boxes"].double().numpy()
    if b.shape[1] != 6:
        raise ValueError("--format slicer writes 3D ROIs; this input is 2D (use coco or csv)")
    centres, size, orient = _box_frames(b, geometry)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, (lab, s) in enumerate(zip(det["labels"].tolist(), det["scores"].double().tolist())):
        name = f"{names[int(lab)]} {s:.3f}"
        roi = {"type": "ROI", "name": name, "coordinateSystem": "LPS", "coordinateUnits": "mm", "roiType": "Box",
               "center": centres[k].round(4).tolist(), "size": size[k].round(4).tolist(),
               "orientation": orient.reshape(-1).tolist(), "description": f"label={names[int(lab)]} score={s:.6f}",
               "controlPoints": [{"id": "1", "label": name, "description": f"score {s:.6f}",
                                  "position": centres[k].round(4).tolist(), "orientation": orient.reshape(-1).tolist(),
                                  "positionStatus": "defined"}]}
        p = folder / f"roi_{k + 1:03d}.mrk.json"
        p.write_text(json.dumps({"@schema": SLICER_SCHEMA, "markups": [roi]}, indent=1))
        out.append(p)
    return out


def _display(image: MedicalImage) -> np.ndarray:
    """``[C, *S]`` -> uint8 ``[*S, 3]`` for drawing: 8-bit data as is, anything else 1st..99th percentile."""
    a = np.asarray(image.array, dtype=np.float64)
    if image.array.dtype != np.uint8:
        lo, hi = np.percentile(a, [1, 99])
        a = np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1) * 255
    a = a[:3] if a.shape[0] >= 3 else np.repeat(a[:1], 3, axis=0)
    return np.moveaxis(a, 0, -1).astype(np.uint8)


def write_overlay(image: MedicalImage, det: dict, names: Sequence[str], path: Path) -> Path:
    """A PNG of the input with its detections drawn (label and score beside each box). A volume is shown as the
    axial slice through the centre of its best detection (the middle slice when there is none), with the boxes
    that cross that slice."""
    from PIL import Image, ImageDraw

    b = det["boxes"].double().numpy()
    rgb = _display(image)
    if rgb.ndim == 4:
        z = int(np.clip((b[0, 0] + b[0, 3]) / 2, 0, rgb.shape[0] - 1)) if len(b) else rgb.shape[0] // 2
        rgb = rgb[z]
        cross = (b[:, 0] <= z + 0.5) & (b[:, 3] >= z + 0.5)
        keep = np.flatnonzero(cross)
        b2 = b[:, [1, 2, 4, 5]]
    else:
        keep, b2 = np.arange(len(b)), b
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    labels, scores = det["labels"].tolist(), det["scores"].double().tolist()
    for k in keep.tolist():
        y0, x0, y1, x1 = b2[k].tolist()
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 64, 64), width=1)
        draw.text((x0 + 1, max(0, y0 - 11)), f"{names[int(labels[k])]} {scores[k]:.2f}", fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def write_dicom_sr(det: dict, image: MedicalImage, source: Path, names: Sequence[str], path: Path) -> Path:
    """A DICOM Comprehensive 3D SR (TID 1500 measurement report, through ``highdicom``) with one planar region per
    detection: the box's rectangle on the slice through its centre, as a closed polygon in world mm (SCOORD3D,
    the scan's frame of reference), finding "label" and the score as a qualitative evaluation in its tracking id.
    ``source`` is the DICOM file or series folder the detections came from (its instances are the evidence)."""
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError as e:
        raise ValueError(NEEDS_HIGHDICOM) from e
    files = sorted(source.glob("*")) if source.is_dir() else [source]
    refs = []
    for f in files:
        try:
            refs.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception:  # not a DICOM file: not part of the evidence
            continue
    if not refs:
        raise ValueError(f"{source}: --format dicom-sr needs DICOM inputs (a file or a series folder); "
                         "the report references their instances")
    for r in refs:  # Type 2 attributes the SR copies from its evidence: empty when the source omits them
        for attr in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                     "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            if attr not in r:
                setattr(r, attr, "")
    if "FrameOfReferenceUID" not in refs[0]:
        raise ValueError(f"{source}: the DICOM has no FrameOfReferenceUID for world-coordinate regions")
    b = det["boxes"].double().numpy()
    d = b.shape[1] // 2
    if d == 2:
        geo3 = None
    else:
        geo3 = image.geometry
    groups = []
    for k, (lab, s) in enumerate(zip(det["labels"].tolist(), det["scores"].double().tolist())):
        box = b[k]
        if geo3 is not None:
            zc = (box[0] + box[3]) / 2
            y0, x0, y1, x1 = box[1], box[2], box[4], box[5]
            corners = np.array([[zc, y0, x0], [zc, y0, x1], [zc, y1, x1], [zc, y1, x0], [zc, y0, x0]])
            pts = np.asarray(voxel_to_world(corners, geo3))
            region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=pts,
                                         frame_of_reference_uid=refs[0].FrameOfReferenceUID)
        else:
            y0, x0, y1, x1 = box
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
            region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=pts,
                                       source_image=hd.sr.SourceImageForRegion.from_source_image(refs[0]))
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{names[int(lab)]} #{k + 1} score {s:.4f}")
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_region=region,
            finding_type=hd.sr.CodedConcept(value=names[int(lab)][:16] or "finding", meaning=names[int(lab)],
                                            scheme_designator="99MEDETECT"),
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=codes.DCM.Finding,
                value=hd.sr.CodedConcept(value=f"score-{k + 1}", meaning=f"detection score {s:.4f}",
                                         scheme_designator="99MEDETECT"))]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name="medetect"))),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion if getattr(refs[0], "Modality", "") == "CT"
        else codes.DCM.ImagingProcedure,
        imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    with warnings.catch_warnings():
        # highdicom warns when the evidence's PatientName has one component (no "^", e.g. an anonymised "ANONYMOUS"),
        # which the standard allows; the report copies the name as the scan has it, so that warning only is silenced
        warnings.filterwarnings("ignore", message=r'The string ".*" is unlikely to represent the intended person name',
                                category=UserWarning, module=r"highdicom\.")
        sr = hd.sr.Comprehensive3DSR(evidence=refs, content=report[0], series_number=999,
                                     series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(), instance_number=1,
                                     manufacturer="medetect", series_description="medetect detections")
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return path
