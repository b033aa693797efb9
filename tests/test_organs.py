"""Organ localisation (issue 12): phantoms, boxes from label maps, per-organ metrics, one box per organ, the
evaluate / predict / phantoms routes and their one-sentence errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from medetect.convert import Geometry
from medetect.data.image import MedicalImage
from medetect.evaluation.organs import organ_metrics, summarise_organs
from medetect.organs.anatomy import ORGANS, TOTALSEG_IDS, organ_of
from medetect.organs.data import boxes_from_labels, check_label_map, organ_boxes, read_organ_folder, world_box
from medetect.organs.localiser import best_per_class
from medetect.organs.phantoms import make_organ_phantom, write_organ_dataset

NAMES = {v: k for k, v in TOTALSEG_IDS.items()}


def _geom(spacing=(2.0, 1.0, 0.5), origin=(-10.0, 5.0, 100.0)):
    return Geometry(spacing, origin, tuple(np.eye(3).reshape(-1)))


# ------------------------------------------------------------------------------------------- boxes from labels


def test_boxes_from_labels_match_a_slow_loop_and_world_corners():
    rng = np.random.default_rng(0)
    lab = np.zeros((9, 11, 13), dtype=np.uint8)
    lab[2:5, 3:9, 1:4] = 5
    lab[0:9, 10:11, 12:13] = 1
    lab[rng.random(lab.shape) < 0.02] = 52
    g = _geom()
    rows = {r["organ"]: r for r in boxes_from_labels(lab, g, NAMES, case="c")}
    for i in (1, 5, 52):
        idx = np.argwhere(lab == i)
        want = [*idx.min(0), *(idx.max(0) + 1)]
        r = rows[NAMES[i]]
        assert [r[c] for c in ("vz0", "vy0", "vx0", "vz1", "vy1", "vx1")] == want
        assert r["voxels"] == len(idx)
    assert rows["liver"]["touches_border"] == 0 and rows["spleen"]["touches_border"] == 1
    # world: voxel i covers [i - 0.5, i + 0.5] in ITK index; identity direction -> origin + (i - 0.5) * spacing
    r = rows["liver"]
    assert r["x0"] == pytest.approx(-10.0 + (1 - 0.5) * 0.5) and r["z1"] == pytest.approx(100.0 + (5 - 0.5) * 2.0)
    flipped = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    wb = world_box(np.array([[0, 0, 2, 1, 1, 5]]), flipped)  # x flipped: x0 = -(5 - 0.5), x1 = -(2 - 0.5)
    assert wb[0, 0] == pytest.approx(-4.5) and wb[0, 3] == pytest.approx(-1.5)


def test_label_id_missing_from_table_and_grid_mismatch_are_one_sentence():
    lab = np.zeros((3, 4, 5), dtype=np.uint8)
    lab[1, 1, 1] = 200
    with pytest.raises(ValueError, match="label id 200 is not in the label table"):
        boxes_from_labels(lab, _geom(), NAMES, case="c")
    assert boxes_from_labels(lab, _geom(), NAMES, strict=False) == []
    with pytest.raises(ValueError, match="differs from the CT"):
        check_label_map(lab, (3, 4, 6), _geom(), None, "labels/c.nii.gz")
    with pytest.raises(ValueError, match="spacing"):
        check_label_map(lab, (3, 4, 5), _geom(), _geom(spacing=(1.0, 1.0, 1.0)), "labels/c.nii.gz")


def test_label_file_on_another_grid_is_refused(tmp_path):
    from medetect.data.io import write_image
    from medetect.organs.data import boxes_from_label_file

    g = _geom((4.0, 4.0, 4.0))
    write_image(MedicalImage(np.zeros((1, 4, 5, 6), np.int16), g), tmp_path / "ct.nii.gz")
    lab = np.zeros((1, 4, 5, 6), np.uint8)
    lab[0, 1:3, 2:4, 0:2] = 5
    write_image(MedicalImage(lab, g), tmp_path / "ok.nii.gz")
    write_image(MedicalImage(lab[:, :3], g), tmp_path / "short.nii.gz")
    write_image(MedicalImage(lab, _geom((4.0, 4.0, 3.0))), tmp_path / "spacing.nii.gz")
    rows = boxes_from_label_file(tmp_path / "ct.nii.gz", tmp_path / "ok.nii.gz", NAMES)
    assert [(r["organ"], r["vz0"], r["vz1"], r["touches_border"]) for r in rows] == [("liver", 1, 3, 1)]
    with pytest.raises(ValueError, match=r"short.nii.gz: the label map's grid \(3, 5, 6\) differs"):
        boxes_from_label_file(tmp_path / "ct.nii.gz", tmp_path / "short.nii.gz", NAMES)
    with pytest.raises(ValueError, match="spacing.nii.gz: the label map's spacing"):
        boxes_from_label_file(tmp_path / "ct.nii.gz", tmp_path / "spacing.nii.gz", NAMES)


def test_organ_unions_lobes_and_vertebrae():
    assert organ_of("lung_middle_lobe_right") == "lung_right" and organ_of("vertebrae_T12") == "vertebral_column"
    assert organ_of("thoracic_spine") == "vertebral_column" and organ_of("gallbladder") is None
    rows = [{"organ": "lung_upper_lobe_left", "vz0": 5, "vy0": 2, "vx0": 3, "vz1": 9, "vy1": 6, "vx1": 7},
            {"organ": "lung_lower_lobe_left", "vz0": 0, "vy0": 3, "vx0": 1, "vz1": 6, "vy1": 8, "vx1": 6},
            {"organ": "colon", "vz0": 0, "vy0": 0, "vx0": 0, "vz1": 1, "vy1": 1, "vx1": 1}]
    organs, b, inside = organ_boxes(rows, (9, 10, 10))
    assert organs == ["lung_left"]
    assert b.tolist() == [[0, 2, 1, 9, 8, 7]]
    assert inside.tolist() == [[False, True, True, False, True, True]]


# ------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("d", [2, 3])
def test_organ_metrics_by_hand(d):
    t = torch.tensor([[0.0] * d + [10.0] * d, [2.0] * d + [4.0] * d, [math.nan] * (2 * d)], dtype=torch.float64)
    p = torch.tensor([[1.0] * d + [10.0] * d, [math.nan] * (2 * d), [0.0] * d + [1.0] * d], dtype=torch.float64)
    sp = [2.0] * d
    inside = torch.ones(3, 2 * d, dtype=torch.bool)
    inside[0, 0] = False  # organ 0 touches the border at its first low face: that face does not count
    m = organ_metrics(p, t, sp, inside)
    assert m["present"].tolist() == [True, True, False] and m["detected"].tolist() == [True, False, False]
    # organ 0: faces lo off by 1 voxel (2 mm) except the border one, hi exact -> (d - 1) * 2 / (2d - 1)
    assert m["wall_distance_mm"][0].item() == pytest.approx((d - 1) * 2.0 / (2 * d - 1))
    assert m["centroid_distance_mm"][0].item() == pytest.approx(math.sqrt(d) * 0.5 * 2.0)
    assert m["iou"][0].item() == pytest.approx(9.0**d / 10.0**d)
    assert math.isnan(m["wall_distance_mm"][1]) and m["iou"][1].item() == 0.0 and math.isnan(m["iou"][2])
    rec = {o: {k: (v[i].item() if v.dtype != torch.bool else bool(v[i])) for k, v in m.items()}
           for i, o in enumerate(["liver", "spleen", "heart"])}
    rec = {o: {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in r.items()} for o, r in rec.items()}
    s = summarise_organs([rec, {"liver": {**rec["liver"], "detected": False, "iou": 0.0}}])
    assert s["detection_rate"]["per_organ"] == {"liver": 0.5, "spleen": 0.0}
    assert s["detection_rate"]["mean"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["wall_distance_mm"]["per_organ"]["spleen"] is None
    assert "heart" not in s["n_present"]


def test_best_per_class_keeps_the_top_box_of_each_class():
    det = {"boxes": torch.arange(24, dtype=torch.float32).reshape(4, 6), "scores": torch.tensor([0.2, 0.9, 0.5, 0.9]),
           "labels": torch.tensor([2, 0, 2, 0])}
    b = best_per_class(det, 4)
    assert b["present"].tolist() == [True, False, True, False]
    assert b["scores"].tolist() == pytest.approx([0.9, 0.0, 0.5, 0.0])
    assert b["boxes"][0].tolist() == list(range(6, 12)) and b["boxes"][2].tolist() == list(range(12, 18))
    assert torch.isnan(b["boxes"][1]).all()
    empty = best_per_class({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}, 2)
    assert not empty["present"].any()


# ------------------------------------------------------------------------------------------- phantoms


def test_phantom_has_labelled_organs_with_plausible_hu():
    hu, lab, geom, info = make_organ_phantom(3, spacing=(5.0, 4.0, 4.0), fov="whole", contrast=True)
    assert hu.dtype == np.int16 and lab.shape == hu.shape and geom.spacing == (5.0, 4.0, 4.0)
    present = {NAMES[int(i)] for i in np.unique(lab) if i}
    assert {"liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "heart", "urinary_bladder",
            "lung_upper_lobe_left", "lung_lower_lobe_right", "vertebrae_L1"} <= present
    med = {n: float(np.median(hu[lab == TOTALSEG_IDS[n]])) for n in ("liver", "aorta", "lung_upper_lobe_left", "vertebrae_L3")}
    assert 70 < med["liver"] < 160 and med["aorta"] > 120 and med["lung_upper_lobe_left"] < -700 and med["vertebrae_L3"] > 150
    # anatomy: liver on the patient's right (low x), spleen left, heart above the kidneys (higher array z)
    cz = {n: np.argwhere(lab == TOTALSEG_IDS[n]).mean(0) for n in ("liver", "spleen", "heart", "kidney_left")}
    assert cz["liver"][2] < cz["spleen"][2] and cz["heart"][0] > cz["kidney_left"][0]
    again = make_organ_phantom(3, spacing=(5.0, 4.0, 4.0), fov="whole", contrast=True)
    assert np.array_equal(again[0], hu)  # seeded


def test_slab_phantom_truncates_organs(tmp_path):
    write_organ_dataset(tmp_path, 2, 11, spacing=(4.0, 4.0, 4.0), fov="slab")
    rows = list(csv.DictReader(open(tmp_path / "boxes.csv")))
    assert rows and all(r["touches_border"] in ("0", "1") for r in rows)
    assert any(r["touches_border"] == "1" for r in rows)
    assert json.loads((tmp_path / "label_tables.json").read_text())["totalsegmentator_total_v2"]["5"] == "liver"
    cases = read_organ_folder(tmp_path)
    assert [c.name for c in cases] == ["phantom_0011", "phantom_0012"]
    assert all(set(c.organs) <= set(ORGANS) for c in cases)


def test_real_sample_boxes_match_the_label_maps(shared_data):
    from medetect.data.io import read_image
    from medetect.organs.data import read_boxes_csv, read_label_table

    folder = shared_data / "organ-ct-sample"
    if not folder.is_dir():
        pytest.skip("organ-ct-sample not present")
    case = "ts_aorta_cta_crop"
    lab = read_image(folder / "labels" / f"{case}.nii.gz")
    mine = boxes_from_labels(lab.array[0], lab.geometry, read_label_table(folder, case), case=case)
    theirs = [r for r in read_boxes_csv(folder / "boxes.csv") if r["case"] == case]
    key = ("organ", "vz0", "vy0", "vx0", "vz1", "vy1", "vx1", "voxels", "touches_border")
    assert sorted(tuple(r[k] for k in key) for r in mine) == sorted(tuple(r[k] for k in key) for r in theirs)
    for a, b in zip(sorted(mine, key=lambda r: r["organ"]), sorted(theirs, key=lambda r: r["organ"])):
        assert [a[c] for c in ("x0", "y0", "z0", "x1", "y1", "z1")] == pytest.approx(
            [b[c] for c in ("x0", "y0", "z0", "x1", "y1", "z1")], abs=0.02)
    assert read_label_table(folder, "dcmqi_ct3slice") == {1: "liver", 2: "thoracic_spine"}
    dc = {c.name: c for c in read_organ_folder(folder)}
    assert dc["dcmqi_ct3slice"].organs == ["liver", "vertebral_column"]


# ------------------------------------------------------------------------------------------- model routes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from medetect.models.detector import build_detector
    from medetect.organs.config import OrganLocalisationConfig
    from medetect.organs.localiser import save_organ_model

    cfg = OrganLocalisationConfig()
    cfg.model.base_width, cfg.model.fpn_channels, cfg.model.roi_hidden = 4, 8, 16
    cfg.model.rpn_pre_nms_top_n, cfg.model.rpn_post_nms_top_n = [40, 40], [12, 12]  # fast: few RoIs
    torch.manual_seed(0)
    model = build_detector(cfg.model)
    path = tmp_path_factory.mktemp("m") / "organs.safetensors"
    cfg.preprocess.spacing = 8.0
    return save_organ_model(model, path, cfg.preprocess.build(), score_thresh=0.0)


def test_evaluate_an_organ_folder(tmp_path, tiny_model):
    from medetect.apps.evaluate import evaluate_spec

    write_organ_dataset(tmp_path / "d", 1, 21, spacing=(6.0, 6.0, 6.0), fov="abdomen")
    res = evaluate_spec(tiny_model, str(tmp_path / "d"))
    assert set(res) >= {"organs_scored", "cases", "wall_distance_mm", "centroid_distance_mm", "iou", "detection_rate"}
    assert "liver" in res["organs_scored"] and set(res["wall_distance_mm"]) == {"mean", "per_organ"}
    assert res["organs_folder_only"] == [] and "phantom_0021" in res["cases"]


def test_predict_writes_one_row_per_organ_and_three_views(tmp_path, tiny_model):
    from medetect.apps.predict import predict_paths

    write_organ_dataset(tmp_path / "d", 1, 21, spacing=(8.0, 8.0, 8.0), fov="slab")
    with pytest.warns(UserWarning, match="no organ found"):  # a thin 8 mm slab: nothing above the threshold
        out = predict_paths(tiny_model, [tmp_path / "d" / "volumes" / "phantom_0021.nii.gz"], tmp_path / "p",
                            overlays=True)
    rows = list(csv.DictReader(open(out[0])))
    assert [r["organ"] for r in rows] == list(ORGANS)
    assert (tmp_path / "p" / "phantom_0021_organs.png").stat().st_size > 1000
    assert set(json.loads((tmp_path / "p" / "predictions.json").read_text()).popitem()[1]) == set(ORGANS)


def test_localiser_refuses_a_2d_image_and_reports_absent_organs(tiny_model):
    from medetect.apps import load_model
    from medetect.organs.localiser import localise

    loaded = load_model(tiny_model)
    with pytest.raises(ValueError, match="takes 3D CT volumes"):
        localise(loaded, MedicalImage(np.zeros((1, 32, 32), np.int16), Geometry.identity(2)))
    air = MedicalImage(np.full((1, 16, 16, 16), -1000, np.int16), _geom((4.0, 4.0, 4.0)))
    res = localise(loaded, air, score_thresh=1.0)  # nothing reaches 1.0: every organ absent, no made-up box
    assert not res["present"].any() and torch.isnan(res["boxes"]).all()


def test_organ_config_loads_and_phantoms_cli(tmp_path):
    from medetect.cli import main
    from medetect.config import load_config

    cfg = load_config("configs/organs_ct_rpn3d.yaml")
    assert cfg.task == "organ-localisation" and cfg.model.rpn_objectness_loss == "focal"
    assert cfg.model.class_names == list(ORGANS)
    with pytest.raises(ValueError, match="class_names"):
        load_config("configs/organs_ct_rpn3d.yaml", ["model.class_names=[a]", "model.num_classes=1"])
    assert main(["phantoms", str(tmp_path / "ph"), "--organs", "--scans", "1", "--spacing", "6", "6", "6",
                 "--fov", "thorax"]) == 0
    assert (tmp_path / "ph" / "labels" / "phantom_0000.nii.gz").is_file()
    assert main(["phantoms", str(tmp_path / "ph2"), "--fov", "thorax"]) == 2


def test_shipped_localiser_finds_the_organs_of_a_held_out_phantom():
    from pathlib import Path

    from medetect.apps import load_model
    from medetect.organs.localiser import localise

    w = Path(__file__).resolve().parents[1] / "medetect" / "weights" / "organs_ct_rpn3d.safetensors"
    loaded = load_model(w)
    assert loaded.meta["extra"]["task"] == "organ-localisation" and loaded.classes == list(ORGANS)
    hu, lab, geom, _ = make_organ_phantom(5003, spacing=(4.0, 4.0, 4.0), fov="whole")  # not a training seed
    res = localise(loaded, MedicalImage(hu[None], geom))
    cases_rows = boxes_from_labels(lab, geom, NAMES)
    organs, truth, inside = organ_boxes(cases_rows, lab.shape)
    idx = [ORGANS.index(o) for o in organs]
    m = organ_metrics(res["boxes"][idx], torch.as_tensor(truth), geom.spacing, torch.as_tensor(inside))
    assert m["detected"].float().mean() >= 0.9
    assert float(np.nanmean(m["wall_distance_mm"].numpy())) < 15.0


def test_localiser_gives_the_same_world_boxes_on_any_stored_layout_of_a_ct():
    """A NIfTI written with its rows and columns reversed (direction diag(-1, -1, 1), as dcm2niix writes) or its
    slices reversed holds the same body: the localiser reorients to LPS and finds the same organs at the same world
    positions (before, the reversed layout swapped the lungs and lost the heart)."""
    from pathlib import Path

    from medetect.apps import load_model
    from medetect.organs.localiser import localise

    w = Path(__file__).resolve().parents[1] / "medetect" / "weights" / "organs_ct_rpn3d.safetensors"
    loaded = load_model(w)
    hu, _, geom, _ = make_organ_phantom(5004, spacing=(4.0, 4.0, 4.0), fov="chest_abdomen")
    ref = localise(loaded, MedicalImage(hu[None], geom))
    assert int(ref["present"].sum()) >= 8
    shape = np.array(hu.shape)
    for flips in ((False, True, True), (True, False, False)):  # numpy axes (z, y, x) reversed
        axes = tuple(a for a in range(3) if flips[a])
        arr = np.flip(hu, axes).copy()
        D = np.diag([(-1.0 if flips[2 - i] else 1.0) for i in range(3)])  # ITK columns (x, y, z)
        idx0 = np.array([(shape[2 - i] - 1) if flips[2 - i] else 0 for i in range(3)], dtype=np.float64)
        sp_itk = np.asarray(geom.spacing[::-1])
        origin = np.asarray(geom.origin) + sp_itk * idx0  # the stored voxel 0 is the old far corner
        g2 = Geometry(geom.spacing, tuple(origin), tuple(D.reshape(-1)))
        res = localise(loaded, MedicalImage(arr[None], g2))
        assert torch.equal(res["present"], ref["present"])
        assert torch.allclose(res["scores"], ref["scores"], atol=1e-5)
        p = ref["present"]
        assert torch.allclose(res["boxes_mm"][p], ref["boxes_mm"][p], atol=1e-3)


def test_predict_refuses_formats_an_organ_model_does_not_write_and_honours_overlays(tmp_path, tiny_model):
    """--format slicer / coco on an organ localiser is one sentence before anything is written; without --overlays
    no three-view PNG is made."""
    from medetect.apps.predict import predict_paths

    write_organ_dataset(tmp_path / "d", 1, 21, spacing=(8.0, 8.0, 8.0), fov="slab")
    vol = tmp_path / "d" / "volumes" / "phantom_0021.nii.gz"
    for fmt in ("slicer", "coco", "dicom-sr"):
        with pytest.raises(ValueError, match=f"--format {fmt}: organ-localisation models write their own CSV"):
            predict_paths(tiny_model, [vol], tmp_path / fmt, formats=("csv", fmt))
        assert not (tmp_path / fmt).exists()
    with pytest.raises(ValueError, match="--tile: organ-localisation models run on whole images only"):
        predict_paths(tiny_model, [vol], tmp_path / "t", tile_size=[32])
    with pytest.warns(UserWarning, match="no organ found"):
        predict_paths(tiny_model, [vol], tmp_path / "p")
    assert (tmp_path / "p" / "phantom_0021_organs.csv").is_file()
    assert not (tmp_path / "p" / "phantom_0021_organs.png").exists()
