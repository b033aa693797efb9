"""`medetect predict --format coco|slicer|dicom-sr --overlays`: COCO results agree with the CSV boxes,
Slicer ROIs sit at the CSV's world centres (LPS mm), the DICOM SR (TID 1500) reads back with highdicom and
references the input series, overlays are PNGs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medetect.cli import main
from medetect.convert import Geometry
from medetect.data.image import MedicalImage
from medetect.data.io import write_image
from medetect.models.detector import build_detector
from medetect.models.io import Preprocess, save_model

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import tiny_detector_config  # noqa: E402


def _weights(tmp_path: Path, d: int) -> Path:
    torch.manual_seed(0)
    w = tmp_path / f"m{d}.safetensors"
    cfg = tiny_detector_config(d=d, num_classes=2, score_thresh=0.0, detections_per_img=5,
                               anchor_sizes=[[4], [8]], class_names=["cell", "blob"])
    save_model(build_detector(cfg), w, kind="detector", preprocess=Preprocess(ndim=d, channels=1),
               classes=["cell", "blob"])
    return w


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def test_coco_results_match_the_csv_and_overlays_are_pngs(tmp_path, capsys):
    a = np.full((24, 32), 30, np.uint8)
    a[5:12, 8:20] = 220
    Image.fromarray(a).save(tmp_path / "img.png")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(_weights(tmp_path, 2)), str(tmp_path / "img.png"), "--out", str(out),
                 "--format", "csv", "coco", "--overlays", "--score-thresh", "0"]) == 0
    rows = _rows(out / "img.csv")
    res = json.loads((out / "coco_results.json").read_text())
    meta = json.loads((out / "coco_images.json").read_text())
    assert len(res) == len(rows) > 0 and meta["images"][0]["height"] == 24 and meta["images"][0]["width"] == 32
    names = {c["id"]: c["name"] for c in meta["categories"]}
    for r, c in zip(rows, res):
        y0, x0, y1, x1 = (float(r[k]) for k in ("y0", "x0", "y1", "x1"))
        assert c["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=2e-3) and names[c["category_id"]] == r["label"]
    assert Image.open(out / "overlays" / "img.png").size == (32, 24)
    assert main(["predict", "--weights", str(_weights(tmp_path, 2)), str(tmp_path / "img.png"), "--out",
                 str(tmp_path / "o2"), "--format", "slicer"]) == 2
    assert "2D" in capsys.readouterr().err


def test_slicer_rois_sit_at_the_world_centres(tmp_path):
    geo = Geometry((2.0, 0.8, 0.6), (-30.0, 12.0, 100.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    arr = np.zeros((1, 12, 20, 24), np.int16)
    arr[0, 3:7, 5:12, 6:14] = 400
    write_image(MedicalImage(arr, geo), tmp_path / "vol.mha")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(_weights(tmp_path, 3)), str(tmp_path / "vol.mha"), "--out", str(out),
                 "--format", "slicer", "--overlays", "--score-thresh", "0"]) == 0
    rows = _rows(out / "vol.csv")
    rois = sorted((out / "vol_rois").glob("*.mrk.json"))
    assert len(rois) == len(rows) > 0
    for r, p in zip(rows, rois):
        m = json.loads(p.read_text())["markups"][0]
        assert m["type"] == "ROI" and m["coordinateSystem"] == "LPS" and m["name"].startswith(r["label"])
        assert m["center"] == pytest.approx([float(r[f"centre_{a}_mm"]) for a in "xyz"], abs=2e-3)
        assert m["size"] == pytest.approx([float(r[f"extent_{a}_mm"]) for a in "xyz"], abs=2e-3)
    assert (out / "overlays" / "vol.png").is_file()


def test_dicom_sr_reads_back_and_references_the_series(tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom

    from test_io import make_dicom

    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(6):
        px = np.full((24, 28), 100, np.uint16)
        px[6:14, 8:18] = 1500
        make_dicom(folder / f"s{k}.dcm", px, ipp=(0.0, 0.0, 2.0 * k), instance=k + 1)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = "1.2.3.4.99"
        ds.save_as(f)
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(_weights(tmp_path, 3)), str(folder), "--out", str(out),
                 "--format", "dicom-sr", "--score-thresh", "0"]) == 0
    sr = hd.sr.srread(out / "series.sr.dcm")
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(_rows(out / "series.csv")) > 0
    assert str(groups[0].roi.GraphicType) == "POLYGON"
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert len(refs) == 6


def _series(folder: Path, patient_name: str | None = None) -> Path:
    import pydicom

    from test_io import make_dicom

    folder.mkdir()
    for k in range(3):
        px = np.full((24, 28), 100, np.uint16)
        px[6:14, 8:18] = 1500
        f = make_dicom(folder / f"s{k}.dcm", px, ipp=(0.0, 0.0, 2.0 * k), instance=k + 1)
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = "1.2.3.4.99"
        if patient_name is not None:
            ds.PatientName = patient_name
        ds.save_as(f)
    return folder


def test_dicom_sr_of_a_one_component_patient_name_warns_nothing(tmp_path):
    import warnings

    hd = pytest.importorskip("highdicom")
    from medetect.detection.outputs import write_dicom_sr
    from medetect.data.io import read_image

    folder = _series(tmp_path / "series", patient_name="ANONYMOUS")  # anonymised data: no "^" in the name
    det = {"boxes": torch.tensor([[0.0, 4, 6, 2, 14, 18]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_dicom_sr(det, read_image(folder), folder, ["cell", "blob"], tmp_path / "r.sr.dcm")
        warnings.warn("a later warning still shows", UserWarning)  # the filter ends with the call
    assert [str(w.message) for w in caught] == ["a later warning still shows"]
    sr = hd.sr.srread(tmp_path / "r.sr.dcm")
    assert str(sr.PatientName) == "ANONYMOUS"  # copied from the scan as it is
    assert len(sr.content.get_planar_roi_measurement_groups()) == 1


def test_dicom_sr_without_highdicom_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError, installed or not
    a = np.full((24, 32), 30, np.uint8)
    Image.fromarray(a).save(tmp_path / "img.png")
    assert main(["predict", "--weights", str(_weights(tmp_path, 2)), str(tmp_path / "img.png"), "--out",
                 str(tmp_path / "out"), "--format", "dicom-sr"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[dicom-sr]"' in err and "pip install highdicom" in err
    from medetect.detection.outputs import write_dicom_sr

    det = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    with pytest.raises(ValueError, match=r'pip install -e "\.\[dicom-sr\]".*pip install highdicom'):
        write_dicom_sr(det, MedicalImage(a[None], Geometry.identity(2)), tmp_path / "img.png", ["cell"], tmp_path / "r.dcm")


def test_a_format_the_model_cannot_write_is_refused_before_any_file(tmp_path, capsys):
    """--format slicer with a 2D model (and coco with a 3D one) stops before the first CSV is written."""
    a = np.full((24, 32), 30, np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a).save(tmp_path / "b.png")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(_weights(tmp_path, 2)), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "--out", str(out), "--format", "csv", "slicer"]) == 2
    err = capsys.readouterr().err
    assert "--format slicer" in err and "2D" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    vol = MedicalImage(np.zeros((1, 12, 16, 16), np.int16), Geometry.identity(3))
    write_image(vol, tmp_path / "v.mha")
    assert main(["predict", "--weights", str(_weights(tmp_path, 3)), str(tmp_path / "v.mha"), "--out",
                 str(tmp_path / "o3"), "--format", "coco"]) == 2
    assert "--format coco" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists() or not any((tmp_path / "o3").iterdir())


def test_coco_results_keep_the_image_ids_of_a_coco_input(tmp_path):
    """Images given through a COCO file keep that file's ids in coco_results.json, so the results score against it
    (pycocotools' loadRes accepts them)."""
    from pycocotools.coco import COCO

    (tmp_path / "imgs").mkdir()
    images = []
    for iid, name in ((17, "x.png"), (4, "y.png")):
        a = np.full((24, 32), 30, np.uint8)
        a[5:12, 8:20] = 220
        Image.fromarray(a).save(tmp_path / "imgs" / name)
        images.append({"id": iid, "file_name": f"imgs/{name}", "height": 24, "width": 32})
    ann = {"images": images, "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "blob"}],
           "annotations": [{"id": 1, "image_id": 17, "category_id": 1, "bbox": [8, 5, 12, 7], "area": 84,
                            "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(_weights(tmp_path, 2)), str(tmp_path / "ann.json"), "--out", str(out),
                 "--format", "coco", "--score-thresh", "0"]) == 0
    res = json.loads((out / "coco_results.json").read_text())
    meta = json.loads((out / "coco_images.json").read_text())
    assert sorted(im["id"] for im in meta["images"]) == [4, 17]
    assert {r["image_id"] for r in res} <= {4, 17} and len(res) > 0
    gt = COCO(str(tmp_path / "ann.json"))
    assert len(gt.loadRes(str(out / "coco_results.json")).getAnnIds()) == len(res)


def test_evaluate_names_the_image_that_reached_the_detection_cap(tmp_path):
    """The cap warning of evaluate names its input, as predict's does."""
    from medetect.apps.evaluate import evaluate_spec

    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        root / "JPEGImages" / "a.png")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.png</filename><size><width>64</width><height>64</height><depth>1</depth></size>"
        "<object><name>cell</name><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>12</xmax><ymax>12</ymax></bndbox>"
        "</object></annotation>")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    with pytest.warns(UserWarning, match=r"a\.png.*the cap max_detections=5 was reached"):
        evaluate_spec(_weights(tmp_path, 2), f"{root}:val")
