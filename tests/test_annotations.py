"""Tests for medetect.data.annotations: every writer read back by its reader, bad input named, real datasets."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medetect.convert import Geometry, luna_to_boxes, voxel_to_world
from medetect.data.annotations import (
    LUNA_SUBMISSION_COLUMNS,
    AnnotationError,
    AnnotationReport,
    ImageAnnotation,
    WorldPoints,
    WorldPointsError,
    annotations_to_luna,
    boxes_from_instance_mask,
    boxes_from_masks,
    hits,
    luna_csv_to_annotations,
    read_coco,
    read_coco_results,
    read_csv_boxes,
    read_dsb2018,
    read_luna16_patches,
    read_luna_csv,
    read_luna_submission,
    read_lung_pet_ct_boxes,
    read_mias,
    read_voc,
    read_voc_folder,
    read_world_points,
    write_coco,
    write_coco_results,
    write_csv_boxes,
    write_luna_csv,
    write_luna_submission,
    write_voc,
    write_world_points,
)

LOGGER = "medetect.data.annotations"


# ============================================================================================ record type


def test_image_annotation_validation():
    a = ImageAnnotation("a.png", [[1, 2, 3, 4]], ["x"], image_shape=(10, 10))
    assert a.boxes.dtype == np.float64 and a.ndim == 2 and len(a) == 1
    with pytest.raises(ValueError, match="2 labels for 1 boxes"):
        ImageAnnotation("a.png", [[1, 2, 3, 4]], ["x", "y"])
    with pytest.raises(ValueError, match=r"\[N, 2d\]"):
        ImageAnnotation("a.png", [[1, 2, 3]], ["x"])
    with pytest.raises(ValueError, match="hi < lo on axis x"):
        ImageAnnotation("a.png", [[1, 5, 3, 4]], ["x"])
    with pytest.raises(ValueError, match="scores"):
        ImageAnnotation("a.png", [[1, 2, 3, 4]], ["x"], scores=[0.1, 0.2])
    with pytest.raises(ValueError, match="image_shape"):
        ImageAnnotation("a.png", [[1, 2, 3, 4]], ["x"], image_shape=(10, 10, 10))
    with pytest.raises(ValueError, match="not finite"):
        ImageAnnotation("a.png", [[1, 2, np.nan, 4]], ["x"])
    assert ImageAnnotation("v", [], [], image_shape=(4, 5, 6)).boxes.shape == (0, 6)
    assert ImageAnnotation("i", np.zeros(0), []).boxes.shape == (0, 4)


def test_select_subsets_per_box_meta():
    a = ImageAnnotation("a", [[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], ["p", "q", "r"], scores=[0.1, 0.2, 0.3],
                        meta={"difficult": np.array([True, False, True]), "spacing": (1, 2)})
    b = a.select(np.array([True, False, True]))
    assert b.labels == ["p", "r"] and b.scores.tolist() == [0.1, 0.3]
    assert b.meta["difficult"].tolist() == [True, True] and b.meta["spacing"] == (1, 2)


def test_report_merge_and_str():
    r = AnnotationReport(read=2, images=1)
    r.merge(AnnotationReport(read=3, skipped_zero_size=1, events=[("f", "line 2", "zero")]))
    assert (r.read, r.skipped_zero_size, len(r.events)) == (5, 1, 1)
    assert "5 boxes read" in str(r)


# ============================================================================================ VOC


def _voc_xml(objects: str, filename: str = "img1.jpg", size: str = "<size><width>20</width><height>10</height><depth>3</depth></size>") -> str:
    return f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename>{size}{objects}</annotation>"


def _obj(name, xmin, ymin, xmax, ymax, difficult=0):
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _voc_root(tmp_path: Path, xml: str, name: str = "img1") -> Path:
    (tmp_path / "Annotations").mkdir(exist_ok=True)
    (tmp_path / "JPEGImages").mkdir(exist_ok=True)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (tmp_path / "JPEGImages" / f"{name}.jpg").write_bytes(b"")
    (tmp_path / "Annotations" / f"{name}.xml").write_text(xml)
    return tmp_path / "Annotations" / f"{name}.xml"


def test_read_voc_one_based_rule_zero_area_and_difficult(tmp_path, caplog):
    xml = _voc_root(tmp_path, _voc_xml(_obj("RBC", 1, 1, 20, 10) + _obj("WBC", 5, 3, 5, 3) + _obj("RBC", 3, 2, 7, 9, 1)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ann, rep = read_voc(xml, tmp_path)
    # 1-based inclusive: (ymin - 1, xmin - 1, ymax, xmax); the full-image box fills [0, 10) x [0, 20) exactly
    np.testing.assert_array_equal(ann.boxes, [[0, 0, 10, 20], [1, 2, 9, 7]])
    assert ann.labels == ["RBC", "RBC"] and ann.image == "JPEGImages/img1.jpg" and ann.image_shape == (10, 20)
    assert ann.meta["difficult"].tolist() == [False, True] and ann.meta["difficult"].dtype == bool
    assert (rep.read, rep.skipped_zero_size, rep.images) == (2, 1, 1)
    assert rep.events[0][:2] == (str(xml), "<object> #2")
    assert "zero-area WBC" in caplog.text and "<object> #2" in caplog.text
    ann0, _ = read_voc(xml, tmp_path, one_based=False)
    np.testing.assert_array_equal(ann0.boxes, [[1, 1, 10, 20], [2, 3, 9, 7]])
    assert read_voc(xml)[0].image == "img1.jpg"  # no root: the bare filename


@pytest.mark.parametrize("one_based", [True, False])
def test_write_voc_roundtrip(tmp_path, one_based):
    ann = ImageAnnotation("JPEGImages/a.jpg", [[0, 0, 10, 20], [2.5, 3, 7, 9.25]], ["RBC", "WBC"], image_shape=(10, 20),
                          meta={"difficult": np.array([False, True])})
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(b"")
    write_voc(ann, tmp_path / "a.xml", one_based=one_based)
    back, rep = read_voc(tmp_path / "a.xml", tmp_path, one_based=one_based)
    np.testing.assert_array_equal(back.boxes, ann.boxes)
    assert back.labels == ann.labels and back.image == ann.image and back.image_shape == (10, 20)
    assert back.meta["difficult"].tolist() == [False, True] and rep.skipped_zero_size == 0


def test_write_voc_refuses_boxes_it_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        write_voc(ImageAnnotation("a.jpg", [[0, 0, 1, 5]], ["x"]), tmp_path / "a.xml")
    with pytest.raises(ValueError, match="2D"):
        write_voc(ImageAnnotation("a", [[0, 0, 0, 1, 1, 1]], ["x"]), tmp_path / "a.xml")


def test_read_voc_errors_name_file_and_element(tmp_path):
    bad = _voc_root(tmp_path, _voc_xml(_obj("RBC", 1, 1, 5, 5) + _obj("RBC", 1, "1x", 5, 5)))
    with pytest.raises(AnnotationError, match=r"img1\.xml: <object> #2 <bndbox>/<ymin>: ymin: '1x' is not a number"):
        read_voc(bad, tmp_path)
    unk = _voc_root(tmp_path, _voc_xml(_obj("RBC", 1, 1, 5, 5) + _obj("Dog", 1, 1, 5, 5)))
    with pytest.raises(AnnotationError, match=r"img1\.xml: <object> #2: unknown label 'Dog'"):
        read_voc(unk, tmp_path, classes=["RBC", "WBC", "Platelets"])
    inv = _voc_root(tmp_path, _voc_xml(_obj("RBC", 6, 1, 5, 5)))
    with pytest.raises(AnnotationError, match=r"<object> #1: xmax 5 < xmin 6"):
        read_voc(inv, tmp_path)
    nob = _voc_root(tmp_path, _voc_xml("<object><name>RBC</name></object>"))
    with pytest.raises(AnnotationError, match="<object> #1: missing <bndbox>"):
        read_voc(nob, tmp_path)
    (tmp_path / "broken.xml").write_text("<annotation><filename>")
    with pytest.raises(AnnotationError, match=r"broken\.xml: XML: not well-formed"):
        read_voc(tmp_path / "broken.xml")


def test_read_voc_outside_image_error_or_clip(tmp_path, caplog):
    xml = _voc_root(tmp_path, _voc_xml(_obj("RBC", 1, 1, 25, 5)))  # xmax 25 > width 20
    with pytest.raises(AnnotationError, match=r"img1\.xml: <object> #1: .*outside the image of shape \(10, 20\)"):
        read_voc(xml, tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ann, rep = read_voc(xml, tmp_path, clip=True)
    np.testing.assert_array_equal(ann.boxes, [[0, 0, 5, 20]])
    assert rep.clipped == 1 and "clipped" in caplog.text


@pytest.mark.parametrize("filename", ["../../etc/passwd", "/etc/passwd", "a/../../../x.jpg", "C:\\x.jpg"])
def test_read_voc_rejects_paths_escaping_the_root(tmp_path, filename):
    xml = _voc_root(tmp_path, _voc_xml(_obj("RBC", 1, 1, 5, 5), filename=filename))
    with pytest.raises(AnnotationError, match=r"img1\.xml: <filename>: image path .*(escapes|absolute)"):
        read_voc(xml, tmp_path, image_dir="")


def test_read_voc_missing_image_and_folder_split(tmp_path):
    xml = _voc_root(tmp_path, _voc_xml(_obj("RBC", 1, 1, 5, 5), filename="nothere.jpg"))
    with pytest.raises(AnnotationError, match=r"img1\.xml: <filename>: image 'JPEGImages/nothere\.jpg' does not exist"):
        read_voc(xml, tmp_path)
    _voc_root(tmp_path, _voc_xml(_obj("RBC", 1, 1, 5, 5) + _obj("RBC", 2, 2, 2, 2)), name="img1")
    _voc_root(tmp_path, _voc_xml(_obj("WBC", 1, 1, 5, 5), filename="img2.jpg"), name="img2")
    (tmp_path / "ImageSets/Main/train.txt").write_text("img1\nimg2\n")
    anns, rep = read_voc_folder(tmp_path, "train")
    assert [a.image for a in anns] == ["JPEGImages/img1.jpg", "JPEGImages/img2.jpg"]
    assert (rep.images, rep.read, rep.skipped_zero_size) == (2, 2, 1)
    (tmp_path / "ImageSets/Main/val.txt").write_text("img1\n\nimg9\n")
    with pytest.raises(AnnotationError, match=r"val\.txt: line 3: id 'img9' has no annotation file"):
        read_voc_folder(tmp_path, "val")


# ============================================================================================ COCO


def _coco_dict():
    return {
        "images": [{"id": 7, "file_name": "a.png", "width": 20, "height": 10},
                   {"id": 9, "file_name": "b.png", "width": 30, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 1, 5, 4], "area": 20, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [0, 0, 0, 3], "area": 0, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 5, "bbox": [1.5, 2.25, 3, 4], "area": 12, "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "cell"}, {"id": 5, "name": "nucleus"}],
    }


def test_read_coco_hand_written(tmp_path, caplog):
    (tmp_path / "c.json").write_text(json.dumps(_coco_dict()))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        anns, cats, rep = read_coco(tmp_path / "c.json")
    assert [a.image for a in anns] == ["a.png", "b.png"] and anns[0].image_shape == (10, 20)
    np.testing.assert_array_equal(anns[0].boxes, [[1, 2, 5, 7]])  # xywh (2,1,5,4) -> (y0,x0,y1,x1)
    np.testing.assert_array_equal(anns[1].boxes, [[2.25, 1.5, 6.25, 4.5]])
    assert anns[1].labels == ["nucleus"] and anns[1].meta["iscrowd"].tolist() == [True]
    assert anns[0].meta["image_id"] == 7 and anns[0].meta["ann_id"].tolist() == [1]
    assert rep.skipped_zero_size == 1 and rep.events[0][1] == "annotations[1]" and "annotations[1]" in caplog.text
    assert [c["name"] for c in cats] == ["cell", "nucleus"]


def test_read_coco_errors(tmp_path):
    d = _coco_dict()
    d["annotations"][2]["category_id"] = 99
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(AnnotationError, match=r"c\.json: annotations\[2\]: category_id 99 is not in 'categories'"):
        read_coco(tmp_path / "c.json")
    d = _coco_dict()
    d["annotations"][0]["bbox"] = [1, 2, "x", 4]
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(AnnotationError, match=r"annotations\[0\]: 'bbox' must hold 4 finite numbers"):
        read_coco(tmp_path / "c.json")
    d = _coco_dict()
    d["images"][1]["file_name"] = "../../etc/passwd"
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(AnnotationError, match=r"c\.json: images\[1\]: image path .* escapes the dataset root"):
        read_coco(tmp_path / "c.json")
    d = _coco_dict()
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(AnnotationError, match=r"images\[1\]: image 'b\.png' does not exist"):
        read_coco(tmp_path / "c.json", tmp_path)
    with pytest.raises(AnnotationError, match=r"categories\[0\]: unknown label 'cell'"):
        read_coco(tmp_path / "c.json", classes=["nucleus"])


def _preds():
    return [
        ImageAnnotation("a.png", [[1, 2, 5, 7], [0, 0, 3, 3]], ["cell", "nucleus"], scores=[0.9, 0.25],
                        image_shape=(10, 20), meta={"image_id": 7}),
        ImageAnnotation("b.png", [[2.25, 1.5, 6.25, 4.5]], ["nucleus"], scores=[0.5], image_shape=(40, 30),
                        meta={"image_id": 9}),
        ImageAnnotation("c.png", np.zeros((0, 4)), [], scores=[], image_shape=(8, 8), meta={"image_id": 11}),
    ]


def test_write_coco_roundtrip_and_pycocotools(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    gt = [a for a in _preds()]
    gt = [ImageAnnotation(a.image, a.boxes, a.labels, None, a.image_shape, dict(a.meta)) for a in gt]
    cats = write_coco(gt, tmp_path / "gt.json", ["cell", "nucleus"])
    back, cats_back, rep = read_coco(tmp_path / "gt.json")
    assert cats_back == cats and rep.read == 3
    for a, b in zip(gt, back):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert (a.image, a.labels, a.image_shape, b.scores) == (b.image, b.labels, b.image_shape, None)
    # predictions: a results file that pycocotools' loadRes accepts, read back exactly
    write_coco_results(_preds(), tmp_path / "res.json", category_ids=cats)
    coco = COCO(str(tmp_path / "gt.json"))
    dt = coco.loadRes(str(tmp_path / "res.json"))
    assert len(dt.getAnnIds()) == 3 and sorted(coco.getImgIds()) == [7, 9, 11]
    assert dt.loadAnns(dt.getAnnIds(imgIds=[9]))[0]["bbox"] == [1.5, 2.25, 3.0, 4.0]
    res, _ = read_coco_results(tmp_path / "res.json", cats, image_names={7: "a.png", 9: "b.png"})
    for a, b in zip(_preds(), res):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert (a.image, a.labels) == (b.image, b.labels)
    # a COCO file with scores (predictions written by write_coco) keeps them
    write_coco(_preds(), tmp_path / "p.json")
    assert read_coco(tmp_path / "p.json")[0][0].scores.tolist() == [0.9, 0.25]


def test_write_coco_results_needs_scores_and_ids(tmp_path):
    a = ImageAnnotation("a.png", [[1, 2, 5, 7]], ["cell"])
    with pytest.raises(ValueError, match="no scores"):
        write_coco_results([a], tmp_path / "r.json", image_ids={"a.png": 1})
    with pytest.raises(ValueError, match="image_ids"):
        write_coco_results([a], tmp_path / "r.json")


# ============================================================================================ LUNA16


def _geom(origin=(-100.0, 50.0, -300.0), spacing=(2.5, 0.7, 0.7)):
    return Geometry(spacing, origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_luna_csv_roundtrip_and_boxes(tmp_path):
    (tmp_path / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        "1.2.3,-80.5,70.25,-280.0,6.5\n"
        "1.2.3,-60.0,90.0,-250.125,12.0\n"
        "4.5.6,10.0,20.0,30.0,0\n"
    )
    rows = read_luna_csv(tmp_path / "annotations.csv")
    assert list(rows) == ["1.2.3", "4.5.6"] and rows["1.2.3"][0].shape == (2, 3)
    write_luna_csv(rows, tmp_path / "out.csv")
    again = read_luna_csv(tmp_path / "out.csv")
    for u in rows:
        np.testing.assert_array_equal(rows[u][0], again[u][0])
        np.testing.assert_array_equal(rows[u][1], again[u][1])
    g = _geom()
    geoms = {"1.2.3": g, "4.5.6": g, "7.7.7": g}
    anns, rep = luna_csv_to_annotations(rows, geoms)
    assert [a.image for a in anns] == ["1.2.3", "4.5.6", "7.7.7"] and len(anns[2]) == 0  # scan without nodules
    np.testing.assert_allclose(anns[0].boxes, luna_to_boxes(rows["1.2.3"][0], rows["1.2.3"][1], g))
    assert len(anns[1]) == 0 and rep.skipped_zero_size == 1  # the zero diameter, counted
    world = annotations_to_luna(anns[:1], geoms)
    np.testing.assert_allclose(world["1.2.3"][0], rows["1.2.3"][0], atol=1e-9)
    np.testing.assert_allclose(world["1.2.3"][1], rows["1.2.3"][1], atol=1e-9)
    anns2, rep2 = luna_csv_to_annotations(rows, {"1.2.3": g})
    assert len(anns2) == 1 and rep2.skipped_other == 1 and "no geometry" in rep2.events[0][2]
    points = read_world_points(tmp_path / "annotations.csv")  # the record gives the same boxes
    anns3, _ = luna_csv_to_annotations(points, geoms)
    for a, b in zip(anns, anns3):
        np.testing.assert_array_equal(a.boxes, b.boxes)
    with pytest.raises(TypeError, match="without diameters"):
        luna_csv_to_annotations(WorldPoints.from_arrays("1.2.3", [[0, 0, 0]], scores=[0.5]), geoms)


def test_luna_candidates_and_errors(tmp_path):
    (tmp_path / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,0\n1.2,4,5,6,1\n")
    rows = read_luna_csv(tmp_path / "candidates.csv")
    assert rows["1.2"][1].tolist() == [0, 1] and rows["1.2"][1].dtype == np.int64
    with pytest.raises(TypeError, match="candidate classes"):
        luna_csv_to_annotations(rows, {"1.2": _geom()})
    (tmp_path / "bad.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,1,2,3,4\n1.2,1,zz,3,4\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv, line 3: malformed number 'zz' in column 'coordY'"):
        read_luna_csv(tmp_path / "bad.csv")
    (tmp_path / "nocol.csv").write_text("seriesuid,coordX,coordY,diameter_mm\n1.2,1,2,4\n")
    with pytest.raises(AnnotationError, match=r"nocol\.csv, line 1: missing column\(s\) coordZ in the header"):
        read_luna_csv(tmp_path / "nocol.csv")


def test_luna_csv_diameter_minus_one(tmp_path):
    # annotations_excluded.csv (LUNA16, and the phantoms) marks findings without a size with diameter_mm = -1
    (tmp_path / "annotations_excluded.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        "1.2.3,-80.5,70.25,-280.0,-1\n"
        "1.2.3,-60.0,90.0,-250.125,2.5\n"
        "4.5.6,10.0,20.0,30.0,-1.0\n"
    )
    rows = read_luna_csv(tmp_path / "annotations_excluded.csv")
    assert rows["1.2.3"][1].tolist() == [-1.0, 2.5] and rows["4.5.6"][1].tolist() == [-1.0]
    write_luna_csv(rows, tmp_path / "out.csv")
    assert read_luna_csv(tmp_path / "out.csv")["1.2.3"][1].tolist() == [-1.0, 2.5]
    g = _geom()
    anns, rep = luna_csv_to_annotations(rows, {"1.2.3": g, "4.5.6": g})
    assert len(anns[0]) == 1 and len(anns[1]) == 0 and rep.skipped_other == 2  # the -1 rows get no box
    np.testing.assert_allclose(anns[0].boxes, luna_to_boxes(rows["1.2.3"][0][1:], rows["1.2.3"][1][1:], g))
    for bad in ("-2", "-0.5", "-1.5"):  # only -1 is a code; other negative diameters stay errors naming the line
        (tmp_path / "neg.csv").write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,1,2,3,4\n1.2,1,2,3,{bad}\n")
        with pytest.raises(AnnotationError, match=r"neg\.csv, line 3: negative diameter_mm .* \(only -1"):
            read_luna_csv(tmp_path / "neg.csv")


def test_luna_submission_roundtrip(tmp_path):
    g = _geom()
    preds = [ImageAnnotation("1.2.3", [[10, 20, 30, 14, 30, 40], [1, 2, 3, 3, 4, 5]], ["nodule"] * 2,
                             scores=[0.9, 0.125])]
    write_luna_submission(tmp_path / "sub.csv", preds, {"1.2.3": g})
    assert (tmp_path / "sub.csv").read_text().splitlines()[0] == ",".join(LUNA_SUBMISSION_COLUMNS)
    sub = read_luna_submission(tmp_path / "sub.csv")
    centres = voxel_to_world((preds[0].boxes[:, :3] + preds[0].boxes[:, 3:]) / 2, g)
    np.testing.assert_allclose(sub["1.2.3"][0], centres, atol=1e-9)
    assert sub["1.2.3"][1].tolist() == [0.9, 0.125]
    write_luna_submission(tmp_path / "sub2.csv", sub)  # from world centres
    sub2 = read_luna_submission(tmp_path / "sub2.csv")
    np.testing.assert_array_equal(sub2["1.2.3"][0], sub["1.2.3"][0])
    (tmp_path / "wrong.csv").write_text("seriesuid,coordX,coordY,coordZ,probability,extra\n1,1,2,3,0.5,x\n")
    with pytest.raises(AnnotationError, match=r"wrong\.csv, line 1: columns must be exactly"):
        read_luna_submission(tmp_path / "wrong.csv")


# ============================================================================================ WorldPoints


def test_world_points_record_select_group_concat():
    p = WorldPoints.from_arrays(["b", "a", "b", "c"], np.arange(12.0).reshape(4, 3), diameters=[1.0, 2.0, 3.0, 4.0])
    assert len(p) == 4 and np.isnan(p.scores).all() and (p.labels == -1).all() and p.lines.tolist() == [1, 2, 3, 4]
    groups = p.by_uid()
    assert list(groups) == ["b", "a", "c"]  # first-seen order
    assert groups["b"].diameters.tolist() == [1.0, 3.0] and groups["b"].lines.tolist() == [1, 3]
    np.testing.assert_array_equal(p.for_uid("b").centres, p.centres[[0, 2]])
    assert len(p[p.diameters > 2]) == 2 and p[1].seriesuids.tolist() == ["a"]
    both = WorldPoints.concat(p[:1], p[3:])
    assert both.seriesuids.tolist() == ["b", "c"] and both.lines.tolist() == [1, 4]
    d = p.to_dict("diameters")
    again = WorldPoints.from_dict(d, "diameters")
    np.testing.assert_array_equal(again.centres, np.concatenate([groups[u].centres for u in groups]))
    assert WorldPoints.from_arrays("x", np.zeros((2, 3))).seriesuids.tolist() == ["x", "x"]  # one uid for all
    assert len(WorldPoints.concat()) == 0 and WorldPoints.from_dict({}, "scores").by_uid() == {}


def test_world_points_from_arrays_errors_name_the_row():
    with pytest.raises(WorldPointsError, match=r"<arrays>, row 2: coordY is not a finite number"):
        WorldPoints.from_arrays(["a", "a"], [[0, 0, 0], [0, np.nan, 0]])
    with pytest.raises(WorldPointsError, match=r"mine, row 1: empty seriesuid"):
        WorldPoints.from_arrays([" "], [[0, 0, 0]], source="mine")
    with pytest.raises(WorldPointsError, match=r"row 2: negative diameter_mm -1.0"):
        WorldPoints.from_arrays(["a", "a"], [[0, 0, 0]] * 2, diameters=[1, -1])
    assert WorldPoints.from_arrays(["a"], [[0, 0, 0]], diameters=[-1], allow_unknown_diameter=True).diameters[0] == -1
    with pytest.raises(WorldPointsError, match=r"row 1: probability is infinite"):
        WorldPoints.from_arrays(["a"], [[0, 0, 0]], scores=[np.inf])
    with pytest.raises(WorldPointsError, match=r"centres must have shape \(N, 3\)"):
        WorldPoints.from_arrays(["a"], [[0, 0]])
    with pytest.raises(WorldPointsError, match=r"scores must have shape \(2,\)"):
        WorldPoints.from_arrays(["a", "a"], [[0, 0, 0]] * 2, scores=[1.0])


@pytest.mark.parametrize("kind, column, values", [
    ("annotations", "diameter_mm", [6.5, 0.1]),
    ("excluded", "diameter_mm", [-1.0, 2.5]),
    ("candidates", "class", [0, 1]),
    ("marks", "probability", [0.9, 0.125]),
])
def test_world_points_csv_roundtrip_each_kind(tmp_path, kind, column, values):
    path = tmp_path / f"{kind}.csv"
    path.write_text(f"seriesuid,coordX,coordY,coordZ,{column}\n1.2,-80.5,70.25,-280.0,{values[0]}\n\n"
                    f"3.4,0.1,1e-3,2,{values[1]}\n")
    p = read_world_points(path, kind)
    assert p.seriesuids.tolist() == ["1.2", "3.4"] and p.lines.tolist() == [2, 4] and p.word == "line"
    got = {"diameter_mm": p.diameters, "class": p.labels, "probability": p.scores}[column]
    assert got.tolist() == values
    write_world_points(tmp_path / "out.csv", p, kind)
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == f"seriesuid,coordX,coordY,coordZ,{column}"
    q = read_world_points(tmp_path / "out.csv", kind)
    np.testing.assert_array_equal(q.centres, p.centres)  # lossless
    for k in ("diameters", "scores", "labels"):
        np.testing.assert_array_equal(getattr(q, k), getattr(p, k))


def test_read_world_points_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "c.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ,class\n1,0,0,0,1\n1,0,0,0,2\n")
    with pytest.raises(WorldPointsError, match=r"c\.csv, line 3: class must be 0 or 1, got '2'"):
        read_world_points(bad, "candidates")
    with pytest.raises(WorldPointsError, match=r"c\.csv, line 1: missing column\(s\) probability"):
        read_world_points(bad, "marks")
    with pytest.raises(AnnotationError, match=r"missing\.csv: cannot open file"):  # a ValueError naming the file
        read_world_points(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="kind must be one of"):
        read_world_points(bad, "nodules")
    nan = WorldPoints.from_arrays(["a"], [[0, 0, 0]])  # no scores
    with pytest.raises(ValueError, match=r"<arrays>, row 1 \(seriesuid 'a'\) has a non-finite centre or probability"):
        write_world_points(tmp_path / "x.csv", nan, "marks")


def _hits_loop(marks, centres, diameters, unknown):
    out = np.zeros((len(marks), len(centres)), dtype=bool)
    for i, m in enumerate(marks):
        for j, (c, d) in enumerate(zip(centres, diameters)):
            d = unknown if (d < 0 or math.isnan(d)) else d
            out[i, j] = sum((float(a) - float(b)) ** 2 for a, b in zip(m, c)) < (d / 2) ** 2
    return out


def test_hits_strict_boundary_unknown_diameter_and_loop():
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    diameters = np.array([10.0, -1.0, np.nan])
    marks = np.array([[3.0, 4.0, 0.0], [2.9, 4.0, 0.0], [14.0, 0.0, 0.0], [15.0, 0.0, 0.0], [0.0, 21.0, 0.0]])
    h = hits(marks[:, None], centres[None], diameters[None])  # [M, N]
    assert h.shape == (5, 3)
    assert h[:, 0].tolist() == [False, True, False, False, False]  # exactly on the sphere (distance 5) is no hit
    assert not h[:, 1:].any()  # unknown size: never a hit by default
    h10 = hits(marks[:, None], centres[None], diameters[None], unknown_diameter=10.0)
    assert h10[:, 1].tolist() == [False, False, True, False, False] and h10[4, 2]  # 15 is on the 5 mm sphere
    rng = np.random.default_rng(0)
    m, c = rng.normal(0, 5, (40, 3)), rng.normal(0, 5, (7, 3))
    d = rng.choice([-1.0, 3.0, 8.0, 12.0], 7)
    np.testing.assert_array_equal(hits(m[:, None], c[None], d[None], unknown_diameter=10.0), _hits_loop(m, c, d, 10.0))
    np.testing.assert_array_equal(hits(m[3], c, d), _hits_loop(m[3:4], c, d, np.nan)[0])  # elementwise broadcast


def test_split_package_keeps_old_names():
    import medetect.data as data
    from medetect.data.annotations import _LUNA_XYZ, _common, _open_csv, csv_boxes, luna, voc  # noqa: F401
    from medetect.data.io import _check_metaio, _ext, dicom, itk, npz, pillow  # noqa: F401

    assert data.read_voc is voc.read_voc and data.WorldPoints is luna.WorldPoints and data.read_sitk is itk.read_sitk
    assert _common.logger.name == LOGGER  # one logger for all formats, as before the split


# ============================================================================================ MIAS


INFO = """mdb001 G CIRC B 535 425 197
mdb002 G CIRC B 522 280 69
mdb003 D NORM 
mdb059 F CIRC B
mdb245 F CALC M *NOTE 3*
mdb144 F MISC B 233 994 29
mdb144 F MISC M 313 540 27
mdb900 F SPIC M 10 1000 40
"""


def test_read_mias_info_flip_clip_and_image_level(tmp_path, caplog):
    (tmp_path / "Info.txt").write_text(INFO)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        anns, rep = read_mias(tmp_path / "Info.txt")
    by = {a.meta["refnum"]: a for a in anns}
    assert list(by) == ["mdb001", "mdb002", "mdb003", "mdb059", "mdb245", "mdb144", "mdb900"]
    # y flipped: cy = 1023 - y, box = (cy - r, cx - r, cy + r, cx + r)
    np.testing.assert_array_equal(by["mdb002"].boxes, [[1023 - 280 - 69, 522 - 69, 1023 - 280 + 69, 522 + 69]])
    assert by["mdb003"].meta["image_label"] == "normal" and len(by["mdb003"]) == 0
    assert by["mdb144"].meta["image_label"] == "malignant" and by["mdb144"].meta["severity"].tolist() == ["B", "M"]
    assert by["mdb059"].meta["image_label"] == "benign" and len(by["mdb059"]) == 0
    assert by["mdb059"].meta["unlocated"][0] == {"abnormality": "CIRC", "severity": "B", "note": "", "line": 4}
    assert by["mdb245"].meta["unlocated"][0]["note"] == "NOTE 3"
    assert rep.image_level == 2 and "has no location" in caplog.text
    # mdb900: centre (10, 1023 - 1000 = 23), r 40 reaches past the top and left borders: clipped and counted
    np.testing.assert_array_equal(by["mdb900"].boxes, [[0, 0, 63, 50]])
    # mdb001: 1023 - 425 + 197 = 795, 535 + 197 = 732: inside
    assert rep.clipped == 1 and by["mdb001"].image == "images/mdb001.png" and by["mdb001"].image_shape == (1024, 1024)
    with pytest.raises(AnnotationError, match=r"Info\.txt: line 8: .*outside the image"):
        read_mias(tmp_path / "Info.txt", clip=False)


@pytest.mark.parametrize(
    "line, msg",
    [("mdb001 G BLOB B 1 2 3", "unknown abnormality class 'BLOB'"),
     ("mdb001 G CIRC X 1 2 3", "severity must be B or M"),
     ("mdb001 G CIRC B 1 two 3", "y: 'two' is not a number"),
     ("mdb001 Q NORM", "tissue must be one of")],
)
def test_read_mias_errors_name_line(tmp_path, line, msg):
    (tmp_path / "Info.txt").write_text("mdb003 D NORM\n" + line + "\n")
    with pytest.raises(AnnotationError, match=rf"Info\.txt: line 2: .*{msg}"):
        read_mias(tmp_path / "Info.txt")


# ============================================================================================ generic CSV


def test_read_csv_boxes_header_detection(tmp_path):
    (tmp_path / "m.csv").write_text("image,y0,x0,y1,x1,label\na.png,1,2,3,4,cell\na.png,0,0,5,5,cell\nb.png,,,,,\n")
    anns, rep = read_csv_boxes(tmp_path / "m.csv")
    assert [a.image for a in anns] == ["a.png", "b.png"] and len(anns[1]) == 0  # b.png: a negative image
    np.testing.assert_array_equal(anns[0].boxes, [[1, 2, 3, 4], [0, 0, 5, 5]])
    assert anns[0].meta["line"].tolist() == [2, 3] and rep.read == 2
    (tmp_path / "x.csv").write_text("image,xmin,ymin,xmax,ymax,label,score\na.png,2,1,4,3,cell,0.5\n")
    anns, _ = read_csv_boxes(tmp_path / "x.csv")
    np.testing.assert_array_equal(anns[0].boxes, [[1, 2, 3, 4]])  # xyxy reversed, no +-1
    assert anns[0].scores.tolist() == [0.5]
    (tmp_path / "z.csv").write_text("image,z0,y0,x0,z1,y1,x1,label,depth,height,width\nv,1,2,3,4,5,6,nodule,10,10,10\n")
    anns, _ = read_csv_boxes(tmp_path / "z.csv")
    np.testing.assert_array_equal(anns[0].boxes, [[1, 2, 3, 4, 5, 6]])
    assert anns[0].image_shape == (10, 10, 10)
    (tmp_path / "c.csv").write_text("image,r0,c0,r1,c1,label\na,1,2,3,4,x\n")
    anns, _ = read_csv_boxes(tmp_path / "c.csv", columns=["r0", "c0", "r1", "c1"])
    np.testing.assert_array_equal(anns[0].boxes, [[1, 2, 3, 4]])


@pytest.mark.parametrize("style", ["medetect", "xyxy"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("with_scores", [False, True])
def test_write_csv_boxes_roundtrip(tmp_path, style, ndim, with_scores):
    rng = np.random.default_rng(ndim)
    anns = []
    for i, n in enumerate([3, 0, 2]):
        lo = rng.uniform(0, 20, (n, ndim)).round(3)
        boxes = np.concatenate([lo, lo + rng.uniform(0.5, 10, (n, ndim))], 1)
        anns.append(ImageAnnotation(f"img/{i}.png", boxes, [f"c{k % 2}" for k in range(n)],
                                    rng.uniform(0, 1, n) if with_scores else None, (40,) * ndim))
    write_csv_boxes(anns, tmp_path / "b.csv", style=style)
    back, rep = read_csv_boxes(tmp_path / "b.csv")
    assert len(back) == 3 and rep.read == 5
    for a, b in zip(anns, back):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert (a.image, a.labels, a.image_shape) == (b.image, b.labels, b.image_shape)
        if with_scores:
            np.testing.assert_array_equal(a.scores, b.scores)
        else:
            assert b.scores is None


def test_read_csv_boxes_errors(tmp_path, caplog):
    def write(text):
        (tmp_path / "e.csv").write_text(text)
        return tmp_path / "e.csv"

    with pytest.raises(AnnotationError, match=r"e\.csv: line 1 \(header\): missing column\(s\) \['label'\]"):
        read_csv_boxes(write("image,y0,x0,y1,x1\na,1,2,3,4\n"))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 1 \(header\): no box columns"):
        read_csv_boxes(write("image,a,b,label\nx,1,2,c\n"))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 3: x1: '4,5' is not a number"):
        read_csv_boxes(write('image,y0,x0,y1,x1,label\na,1,2,3,4,c\na,1,2,3,"4,5",c\n'))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 3: 5 fields, but the header has 6"):
        read_csv_boxes(write("image,y0,x0,y1,x1,label\na,1,2,3,4,c\na,1,2,3,4\n"))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 2: x1 is missing|e\.csv: line 2: x1: '' is not a number"):
        read_csv_boxes(write("image,y0,x0,y1,x1,label\na,1,2,3,,c\n"))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 2: box has max < min on axis y"):
        read_csv_boxes(write("image,y0,x0,y1,x1,label\na,5,2,3,4,c\n"))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 3: unknown label 'dog'"):
        read_csv_boxes(write("image,y0,x0,y1,x1,label\na,1,2,3,4,cat\na,1,2,3,4,dog\n"), classes=["cat"])
    with pytest.raises(AnnotationError, match=r"e\.csv: line 3: image path '\.\./\.\./etc/passwd' escapes"):
        read_csv_boxes(write("image,y0,x0,y1,x1,label\na,1,2,3,4,c\n../../etc/passwd,1,2,3,4,c\n"))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 2: image path '/etc/passwd' is absolute"):
        read_csv_boxes(write("image,y0,x0,y1,x1,label\n/etc/passwd,1,2,3,4,c\n"))
    with pytest.raises(AnnotationError, match=r"e\.csv: line 2: image 'missing\.png' does not exist"):
        read_csv_boxes(write("image,y0,x0,y1,x1,label\nmissing.png,1,2,3,4,c\n"), tmp_path)
    p = write("image,y0,x0,y1,x1,label,height,width\na,1,2,3,4,c,10,10\na,8,8,12,9,c,10,10\na,3,3,3,9,c,10,10\n")
    with pytest.raises(AnnotationError, match=r"e\.csv: line 3: box .* outside the image of shape \(10, 10\)"):
        read_csv_boxes(p)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        anns, rep = read_csv_boxes(p, clip=True)
    np.testing.assert_array_equal(anns[0].boxes, [[1, 2, 3, 4], [8, 8, 10, 9]])
    assert (rep.read, rep.clipped, rep.skipped_zero_size) == (2, 1, 1)
    assert rep.events[-1][:2] == (str(p), "line 4") and "zero-size box" in caplog.text


# ============================================================================================ masks -> boxes


def _loop_boxes(label_map):
    """Slow, obviously-correct reference: per id, min index and max index + 1 along each axis."""
    out = {}
    for i in np.unique(label_map):
        if i == 0:
            continue
        idx = np.argwhere(label_map == i)
        out[int(i)] = np.concatenate([idx.min(0), idx.max(0) + 1]).astype(float)
    return out


def test_boxes_from_instance_mask_dsb2018_convention():
    lab = np.zeros((8, 12), np.uint16)
    lab[2:5, 3:8] = 1  # rows 2..4, columns 3..7: boxes.csv would say xmin 3, ymin 2, xmax 8, ymax 5
    lab[6, 11] = 4  # single pixel in the corner
    boxes, ids = boxes_from_instance_mask(lab)
    assert ids.tolist() == [1, 4]
    np.testing.assert_array_equal(boxes, [[2, 3, 5, 8], [6, 11, 7, 12]])  # (ymin, xmin, ymax, xmax), half-open


def test_boxes_from_instance_mask_3d_sparse_and_empty():
    lab = np.zeros((5, 6, 7), np.int64)
    lab[1:3, 2:6, 0:1] = 10**9
    lab[4, 0, 6] = 3
    boxes, ids = boxes_from_instance_mask(lab)
    assert ids.tolist() == [3, 10**9]
    np.testing.assert_array_equal(boxes, [[4, 0, 6, 5, 1, 7], [1, 2, 0, 3, 6, 1]])
    b0, i0 = boxes_from_instance_mask(np.zeros((3, 3, 3), np.int32))
    assert b0.shape == (0, 6) and i0.shape == (0,)
    with pytest.raises(ValueError, match="integer"):
        boxes_from_instance_mask(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        boxes_from_instance_mask(-np.ones((3, 3), np.int32))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_boxes_from_instance_mask_matches_loop(ndim, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 9, ndim))
    lab = rng.integers(0, 6, shape) * rng.integers(0, 2, shape)
    boxes, ids = boxes_from_instance_mask(lab)
    ref = _loop_boxes(lab)
    assert ids.tolist() == sorted(ref)
    for b, i in zip(boxes, ids):
        np.testing.assert_array_equal(b, ref[int(i)])
    # the same instances as a stack of binary masks
    if ids.size:
        stack = lab[None] == ids.reshape(-1, *([1] * ndim))
        np.testing.assert_array_equal(boxes_from_masks(stack), boxes)


def test_boxes_from_masks_empty():
    m = np.zeros((2, 4, 4), bool)
    m[0, 1:3, 2] = True
    with pytest.raises(ValueError, match=r"mask\(s\) \[1\] are empty"):
        boxes_from_masks(m)
    np.testing.assert_array_equal(boxes_from_masks(m, allow_empty=True), [[1, 2, 3, 3], [0, 0, 0, 0]])


def _dsb(tmp_path, file="images/a.png", n_boxes=2):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "images.csv").write_text(f"image_id,file,split,width,height,mode,n_boxes\na,{file},train,12,8,L,{n_boxes}\n")
    (tmp_path / "boxes.csv").write_text("image_id,split,instance,label,xmin,ymin,xmax,ymax,area_px\n"
                                        "a,train,1,nucleus,3,2,8,5,15\na,train,2,nucleus,11,6,12,7,1\n")
    (tmp_path / "train.txt").write_text("a\n")
    return tmp_path


def test_read_dsb2018_synthetic(tmp_path):
    anns, rep = read_dsb2018(_dsb(tmp_path))
    # the same boxes boxes_from_instance_mask gives for the label map of test_boxes_from_instance_mask_dsb2018_convention
    np.testing.assert_array_equal(anns[0].boxes, [[2, 3, 5, 8], [6, 11, 7, 12]])
    assert anns[0].image == "images/a.png" and anns[0].image_shape == (8, 12) and anns[0].meta["instance"].tolist() == [1, 2]
    with pytest.raises(AnnotationError, match=r"images\.csv: line 2: n_boxes = 3 but boxes\.csv has 2 rows"):
        read_dsb2018(_dsb(tmp_path, n_boxes=3))
    with pytest.raises(AnnotationError, match=r"images\.csv: line 2: image path '\.\./\.\./etc/passwd' escapes"):
        read_dsb2018(_dsb(tmp_path, file="../../etc/passwd"))


# ============================================================================================ real datasets


def test_bccd_counts(shared_data):
    root = shared_data / "bccd"
    classes = ["RBC", "WBC", "Platelets"]
    expected = {  # README: train 205 images 2805 boxes (RBC 2382, WBC 214, Platelets 209); val 87, 1138 (968, 87, 83)
        "train": (205, 2805, {"RBC": 2382, "WBC": 214, "Platelets": 209}),
        "val": (87, 1138, {"RBC": 968, "WBC": 87, "Platelets": 83}),
    }
    skipped = {}
    for split, (n_img, n_box, per_class) in expected.items():
        anns, rep = read_voc_folder(root, split, classes=classes)
        counts = Counter(lab for a in anns for lab in a.labels)
        assert len(anns) == n_img == rep.images
        # each split holds one of the 2 zero-area RBC boxes: skipped and counted, not silently dropped
        assert rep.skipped_zero_size == 1 and rep.read == n_box - 1
        assert counts == {**per_class, "RBC": per_class["RBC"] - 1}
        assert all(a.image_shape == (480, 640) for a in anns)
        assert all(((a.boxes[:, :2] >= 0) & (a.boxes[:, 2:] <= [480, 640])).all() for a in anns)
        skipped[split] = Path(rep.events[0][0]).name
    # the split FILES put BloodImage_00343 in train and 00338 in val (the README's prose has them the other way round)
    assert sorted(skipped.values()) == ["BloodImage_00338.xml", "BloodImage_00343.xml"]


def test_dsb2018_counts(shared_data):
    root = shared_data / "dsb2018-nuclei"
    train, rep_t = read_dsb2018(root, "train")
    val, rep_v = read_dsb2018(root, "val")
    assert (len(train), len(val)) == (150, 39)  # README: 150 + 39 = 189 images, 7,812 boxes
    assert rep_t.read + rep_v.read == 7812 and rep_t.skipped_zero_size == rep_v.skipped_zero_size == 0
    assert {lab for a in train + val for lab in a.labels} == {"nucleus"}
    a = train[0]
    assert a.image.startswith("images/") and a.image_shape is not None
    w = a.boxes[:, 3] - a.boxes[:, 1]
    assert (w > 0).all() and (a.meta["area_px"] <= w * (a.boxes[:, 2] - a.boxes[:, 0])).all()


def test_mias_flip_lands_where_readme_says(shared_data):
    root = shared_data / "mini-mias"
    info, rep_i = read_mias(root / "Info_subset.txt", root=root)
    csv_, rep_c = read_mias(root / "annotations.csv", root=root)
    i5 = next(a for a in info if a.meta["refnum"] == "mdb005")
    c5 = next(a for a in csv_ if a.meta["refnum"] == "mdb005")
    # README: mdb005 x 477, y 133, r 30 -> cx 477, cy 890, xmin 447, ymin 860, xmax 507, ymax 920
    np.testing.assert_array_equal(i5.boxes[0], [860, 447, 920, 507])
    np.testing.assert_array_equal(c5.boxes[0], [860, 447, 920, 507])
    assert i5.labels[0] == "CIRC" and i5.meta["severity"][0] == "B" and c5.meta["split"] == "val"
    assert len(info) == 224 and rep_i.images == 224
    # both readers agree box for box; 86 located rows + 2 image-level findings (mdb059, mdb245) = 88 rows
    by = {a.meta["refnum"]: a for a in info}
    for a in csv_:
        np.testing.assert_array_equal(a.boxes, by[a.meta["refnum"]].boxes)
        assert a.labels == by[a.meta["refnum"]].labels
    assert rep_i.read == rep_c.read == 86 and rep_i.image_level == rep_c.image_level == 2
    assert {a.meta["refnum"] for a in csv_ if a.meta["unlocated"]} == {"mdb059", "mdb245"}
    assert by["mdb144"].meta["image_label"] == "malignant"
    labels = Counter(a.meta["image_label"] for a in info)
    assert labels == {"normal": 115 + 28, "benign": 36 + 9, "malignant": 29 + 7}


def test_lung_pet_ct_3d_boxes(shared_data):
    root = shared_data / "lung-pet-ct-dx-sample"
    anns, rep = read_lung_pet_ct_boxes(root)
    by = {a.image: a for a in anns}
    # README mapping (z0, y0, x0, z1 + 1, y1, x1); boxes_3d.csv A0001: z 41..51, y 298..402, x 278..360
    np.testing.assert_array_equal(by["Lung_Dx-A0001"].boxes, [[41, 298, 278, 52, 402, 360]])
    assert by["Lung_Dx-A0001"].image_shape == (64, 512, 512) and by["Lung_Dx-A0002"].image_shape == (30, 512, 512)
    assert rep.read == 2
    # with in-plane maxima read as inclusive, the box centre is exactly the README's world centre coordX/Y/Z
    anns_inc, _ = read_lung_pet_ct_boxes(root, inplane_max_inclusive=True)
    for a in anns_inc:
        c = (a.boxes[:, :3] + a.boxes[:, 3:]) / 2
        np.testing.assert_allclose(voxel_to_world(c, a.meta["geometry"]), a.meta["centre_xyz_mm"], atol=2e-3)
    slices, rep_s = read_lung_pet_ct_boxes(root, per_slice=True)
    assert rep_s.read == 38 and Counter({a.image: len(a) for a in slices}) == {"Lung_Dx-A0001": 20, "Lung_Dx-A0002": 18}
    for a in slices:  # the 3D box is the union of the slice boxes
        s = a.boxes
        union = np.concatenate([s[:, :3].min(0), s[:, 3:].max(0)])
        np.testing.assert_array_equal(union, by[a.image].boxes[0])
        assert (s[:, 3] - s[:, 0] == 1).all()


def test_luna16_patches_boxes_match_masks(shared_data):
    root = shared_data / "luna16-node21-patches"
    anns, rep = read_luna16_patches(root)
    comps, rep_c = read_luna16_patches(root, all_components=True)
    assert rep.read == 113 and rep_c.read == 149 and len(comps) == 113
    a = next(c for c in comps if len(c) > 1)
    lab = np.load(root / a.image)["label"]
    boxes, ids = boxes_from_instance_mask(lab)
    np.testing.assert_array_equal(ids, a.meta["component"])
    np.testing.assert_array_equal(boxes, a.boxes)
    tgt = next(t for t in anns if t.meta["patch_id"] == a.meta["patch_id"])
    np.testing.assert_array_equal(tgt.boxes[0], a.boxes[a.meta["is_target"]][0])
