"""Mammogram preprocessing (medetect.mammo.preprocess) on synthetic mammograms and synthetic DICOM files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medetect.mammo.preprocess import (
    MammoPreprocess,
    NoBreastError,
    PreprocessReport,
    breast_mask,
    chest_wall_side,
    preprocess_folder,
    to_unit,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

MG_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
H, W = 200, 160


def mammogram(chest_wall: str = "left", *, peak: float = 0.8, label: bool = True) -> np.ndarray:
    """A bright half-ellipse on black, its flat side on the chest wall, plus a bright square 'label' in the top
    corner of the other side. Values in [0, 1]."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    e = ((y - 100) / 80) ** 2 + (x / 110) ** 2 <= 1  # centred on the left edge
    img = np.where(e, peak * (1 - 0.3 * x / W), 0.02)
    if label:
        img[6:22, W - 22:W - 6] = 1.0
    return img if chest_wall == "left" else img[:, ::-1].copy()


LESION = np.array([[90.0, 30.0, 110.0, 50.0]])  # (y0, x0, y1, x1) inside the ellipse, chest wall on the left


def test_mask_keeps_the_breast_and_drops_the_label():
    img = mammogram()
    m = breast_mask(img)
    assert m[100, 10] and m[100, 90] and not m[100, 150]
    assert not m[10:20, W - 20:W - 8].any()  # the label is a separate, smaller component
    assert chest_wall_side(m) == "left" and chest_wall_side(m[:, ::-1]) == "right"


@pytest.mark.parametrize("chest_wall", ["left", "right"])
def test_orientation_from_the_image_flips_boxes_with_it(chest_wall):
    img = mammogram(chest_wall)
    boxes = LESION.copy()
    if chest_wall == "right":
        boxes = np.stack([boxes[:, 0], W - boxes[:, 3], boxes[:, 2], W - boxes[:, 1]], 1)
    rep = PreprocessReport()
    res = MammoPreprocess(crop=False)(img, boxes, report=rep, where="synthetic.png")
    assert res.flipped == (chest_wall == "right") and res.source == "image" and res.chest_wall == chest_wall
    assert rep.no_laterality == 1 and "synthetic.png" in rep.events[0][0]
    np.testing.assert_allclose(res.boxes, LESION)  # canonical: chest wall on the left, the lesion with it
    assert res.image[6:22, W - 22:W - 6].max() == 0  # label removed (outside the mask)
    np.testing.assert_allclose(res.to_input(res.boxes), boxes)
    y0, x0, y1, x1 = LESION[0].astype(int)
    assert res.image[y0:y1, x0:x1].mean() > 0.5  # the lesion area is still breast


def test_crop_shifts_boxes_and_maps_back():
    img = mammogram("right")
    boxes = np.stack([LESION[:, 0], W - LESION[:, 3], LESION[:, 2], W - LESION[:, 1]], 1)
    res = MammoPreprocess(margin=4)(img, boxes)
    assert res.image.shape[0] < H and res.image.shape[1] < W  # cropped to the breast (+4 px)
    assert res.image.shape[1] == pytest.approx(110 + 4, abs=6)
    assert res.mask.shape == res.image.shape and res.mask[:, 0].any()  # chest wall on the left after the flip
    np.testing.assert_allclose(res.boxes, LESION - np.array([res.offset * 2]))
    np.testing.assert_allclose(res.to_input(res.boxes), boxes)


def test_clahe_keeps_range_and_background():
    res = MammoPreprocess(clahe=True)(mammogram())
    assert res.image.dtype == np.float32 and 0 <= res.image.min() and res.image.max() <= 1
    assert (res.image[~res.mask] == 0).all()
    plain = MammoPreprocess()(mammogram())
    assert not np.allclose(res.image, plain.image)


def test_bad_inputs_are_one_sentence():
    with pytest.raises(NoBreastError, match="black.png: no breast found"):
        MammoPreprocess()(np.zeros((64, 64), np.uint8), where="black.png")
    speck = np.zeros((200, 200), np.uint8)
    speck[5:8, 5:8] = 255
    with pytest.raises(NoBreastError, match="speck.png: no breast found: the largest bright region"):
        MammoPreprocess()(speck, where="speck.png")
    with pytest.raises(ValueError, match="margin"):
        MammoPreprocess(margin=-1)
    with pytest.raises(ValueError, match="2D grey"):
        to_unit(np.zeros((2, 3, 4, 5)))
    rep = PreprocessReport()  # a lesion outside the breast: kept, counted
    res = MammoPreprocess()(mammogram(), np.array([[2.0, 140.0, 12.0, 150.0], *LESION]), report=rep, where="x.png")
    assert len(res.boxes) == 2 and rep.lesions_outside_breast == 1 and "lesion 0" in rep.events[-1][1]


def test_to_unit_bit_depths():
    a = np.array([[0, 4095]], np.uint16)
    np.testing.assert_allclose(to_unit(a), [[0, 1]])  # 12-bit in a 16-bit container
    np.testing.assert_allclose(to_unit(np.array([[0, 255]], np.uint8)), [[0, 1]])
    np.testing.assert_allclose(to_unit(np.array([[0, 1023]], np.uint16), {"bits_stored": 14}), [[0, 1023 / 16383]])
    np.testing.assert_allclose(to_unit(np.array([[0, 40000]], np.uint16)), [[0, 40000 / 65535]])


# ============================================================================================ DICOM


def _dicom(path: Path, img01: np.ndarray, *, photometric="MONOCHROME2", laterality=None, tag="ImageLaterality",
           bits=12, window=None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MG_STORAGE, meta.MediaStorageSOPInstanceUID, "MG"
    ds.ViewPosition = "MLO"
    if laterality:
        setattr(ds, tag, laterality)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    top = 2**bits - 1
    stored = np.round((1 - img01 if photometric == "MONOCHROME1" else img01) * top).astype("<u2")
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)
    return path


@pytest.mark.parametrize("laterality,tag", [("R", "ImageLaterality"), ("L", "Laterality"), (None, None)])
def test_dicom_monochrome1_12bit_with_and_without_laterality(tmp_path, laterality, tag):
    from medetect.data.io import read_image

    img = mammogram("right" if laterality != "L" else "left", label=True)
    p = _dicom(tmp_path / "mg.dcm", img, photometric="MONOCHROME1", laterality=laterality, tag=tag or "")
    dcm = read_image(p, voi="auto")
    unit = to_unit(dcm)
    np.testing.assert_allclose(unit, img, atol=1 / 4095 + 1e-6)  # inverted back and scaled by BitsStored
    rep = PreprocessReport()
    boxes = np.stack([LESION[:, 0], W - LESION[:, 3], LESION[:, 2], W - LESION[:, 1]], 1) if laterality != "L" \
        else LESION
    res = MammoPreprocess(crop=False)(dcm, boxes, report=rep)
    np.testing.assert_allclose(res.boxes, LESION)
    assert res.flipped == (laterality != "L")
    if laterality is None:
        assert res.source == "image" and rep.no_laterality == 1 and "mg.dcm" in rep.events[0][0]
    else:
        assert res.source == "tag" and rep.laterality_from_tag == 1 and rep.no_laterality == 0


def test_dicom_window_and_disagreeing_laterality(tmp_path):
    from medetect.data.io import read_image

    img = mammogram("left")
    p = _dicom(tmp_path / "w.dcm", img, laterality="R", bits=16, window=(32768, 65536))
    dcm = read_image(p, voi="auto")
    assert dcm.meta.get("voi") == "auto"
    unit = to_unit(dcm)
    assert unit.dtype == np.float32 and 0 <= unit.min() and unit.max() <= 1
    assert np.corrcoef(unit.ravel(), img.ravel())[0, 1] > 0.99
    rep = PreprocessReport()
    res = MammoPreprocess()(dcm, report=rep)
    assert res.flipped and rep.laterality_disagrees == 1 and "the tag is followed" in rep.events[0][1]


# ============================================================================================ folder


def test_preprocess_folder_maps_the_circles(tmp_path):
    from PIL import Image

    from medetect.data.lesion_folder import read_lesion_folder

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    rows, ann = [], []
    for k, side in ((1, "R"), (2, "L")):
        img = mammogram("right" if side == "R" else "left")
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(src / "images" / f"mdb{k:03d}.png")
        rows.append(f"mdb{k:03d},images/mdb{k:03d}.png,val,p001,{side},{W},{H},F,benign")
        cy, cx = 100, (40 if side == "L" else W - 40)
        ann.append(f"mdb{k:03d},val,F,CIRC,B,{cx},{H - 1 - cy},10,1,{cx},{cy},{cx - 10},{cy - 10},{cx + 10},{cy + 10},")
    (src / "images.csv").write_text("image_id,file,split,patient_id,side,width,height,tissue,image_label\n"
                                    + "\n".join(rows) + "\n")
    (src / "annotations.csv").write_text("image_id,split,tissue,abnormality,severity,x_mias,y_mias,radius,"
                                         "has_location,cx,cy,xmin,ymin,xmax,ymax,note\n" + "\n".join(ann) + "\n")
    rep = preprocess_folder(src, tmp_path / "dst")
    assert rep["images"] == 2 and rep["flipped"] == 1 and rep["laterality_from_tag"] == 2
    assert json.loads((tmp_path / "dst" / "preprocess_report.json").read_text())["flipped"] == 1
    recs = read_lesion_folder(tmp_path / "dst", "val")
    for r in recs:
        out = np.asarray(Image.open(r.path))
        cy, cx = r.centres[0]
        assert cx < 50 and out[int(cy), int(cx)] > 100  # chest wall on the left, lesion on breast
        assert r.lesion_types.tolist() == ["CIRC"] and r.tissue == "F"
    from medetect.data.formats import open_dataset

    ds = open_dataset("mias", tmp_path / "dst", split="val", classes=["benign", "malignant"])  # cropped sizes
    item = ds[0]
    assert tuple(item["image"].shape[-2:]) == tuple(np.asarray(Image.open(recs[0].path)).shape)
    assert len(item["boxes"]) == 1
    with pytest.raises(FileNotFoundError, match="not a mini-MIAS-layout folder"):
        preprocess_folder(tmp_path / "nothing", tmp_path / "x")


def test_lesion_folder_warns_about_a_centre_outside_the_image(tmp_path):
    from medetect.data.lesion_folder import read_lesion_folder

    (tmp_path / "images.csv").write_text("image_id,file,split,patient_id,side,width,height,tissue,image_label\n"
                                         "mdb001,images/mdb001.png,val,p000,R,50,40,F,benign\n")
    (tmp_path / "annotations.csv").write_text("image_id,abnormality,severity,has_location,cx,cy,radius\n"
                                              "mdb001,CALC,B,1,60,10,3\nmdb001,CIRC,B,1,20,10,3\n")
    with pytest.warns(UserWarning, match="line 2: lesion centre .* outside the 40 x 50 image mdb001: kept"):
        recs = read_lesion_folder(tmp_path, "val")
    assert len(recs[0].radii) == 2 and recs[0].lesion_types.tolist() == ["CALC", "CIRC"]


def _with_muscle(chest_wall: str = "left") -> np.ndarray:
    """The synthetic mammogram with a brighter triangle in the top chest-wall corner (an MLO view's pectoral
    muscle): the line from (y 0, x 60) to (y 90, x 0)."""
    img = mammogram(label=False)
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    tri = (x / 60 + y / 90 < 1) & (img > 0.1)
    img = np.where(tri, 0.95, img)
    img[20:100, 0:2] = np.where(img[20:100, 0:2] > 0.1, img[20:100, 0:2], 0.6)  # the breast reaches the film edge
    return img if chest_wall == "left" else img[:, ::-1].copy()


@pytest.mark.parametrize("chest_wall", ["left", "right"])
def test_pectoral_muscle_is_found_removed_and_counted(chest_wall):
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    truth = (x / 60 + y / 90 < 1) & breast_mask(mammogram(label=False))
    rep = PreprocessReport()
    lesion = np.array([[35.0, 5.0, 45.0, 15.0]])  # in the muscle
    if chest_wall == "right":
        lesion = np.array([[35.0, W - 15.0, 45.0, W - 5.0]])
    res = MammoPreprocess(pectoral="remove", crop=False)(_with_muscle(chest_wall), lesion, report=rep, where="mlo.png")
    assert res.pectoral is not None and rep.pectoral_found == 1 and rep.pectoral_not_found == 0
    iou = (res.pectoral & truth).sum() / (res.pectoral | truth).sum()
    assert iou > 0.8, iou
    assert (res.image[res.pectoral] == 0).all() and res.image[150, 30] > 0.3  # muscle zeroed, breast kept
    assert rep.lesions_in_pectoral == 1 and rep.lesions_outside_breast == 0 and len(res.boxes) == 1  # kept, counted
    assert "pectoral='remove'" in repr(MammoPreprocess(pectoral="remove"))


def test_no_muscle_is_counted_not_an_error_and_keep_is_the_default():
    rep = PreprocessReport()
    res = MammoPreprocess(pectoral="remove")(mammogram(), report=rep, where="cc.png")
    assert res.pectoral is None and rep.pectoral_not_found == 1 and rep.events[-1][0] == "cc.png"
    plain = MammoPreprocess()(_with_muscle())
    assert plain.pectoral is None and plain.image.max() > 0.9  # keep: the muscle stays
    with pytest.raises(ValueError, match="pectoral must be 'keep' or 'remove'"):
        MammoPreprocess(pectoral="mask")
    with pytest.raises(ValueError, match="needs orient=True"):
        MammoPreprocess(pectoral="remove", orient=False)
