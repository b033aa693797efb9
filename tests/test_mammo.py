"""Mammography evaluation (issue 8): lesion FROC, image / lesion AUC with patient-bootstrap CIs, and ``medetect
evaluate`` on a mini-MIAS-layout folder with a benign/malignant detector (synthetic data only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medetect.evaluation.mammo import image_marks, mammo_metrics

KEYS = ("lesion_sensitivity", "lesion_froc_mean", "image_auc_abnormal", "image_auc_malignant", "lesion_auc_malignant")


def _box(centre, half=2.0):
    c = np.asarray(centre, dtype=np.float64)
    return np.concatenate([c - half, c + half])


@pytest.mark.parametrize("d", [2, 3])
def test_image_marks_hit_by_box_centre_inside_the_circle(d):
    c = np.array([[10.0] * d])
    # mark 0: centre at distance 3 (inside r=4); mark 1: centre at distance 5 (outside); mark 2: inside, lower score
    boxes = np.stack([_box([13.0] + [10.0] * (d - 1)), _box([15.0] + [10.0] * (d - 1)), _box([10.0] * d)])
    m = image_marks(boxes, [0.9, 0.8, 0.3], [0, 1, 1], c, [4.0], [True])
    assert m["mark_tp"].tolist() == [True, False, False]  # the lesion counts once, by its best mark
    assert m["mark_fp"].tolist() == [False, True, False]  # a second mark inside the lesion is not a false positive
    assert m["p_abnormal"] == pytest.approx(0.9) and m["p_malignant"] == pytest.approx(0.8)
    assert m["detected"].tolist() == [True]
    assert m["lesion_malignancy"].tolist() == pytest.approx([0.3])  # the best malignant mark inside it
    empty = image_marks(np.zeros((0, 2 * d)), [], [], np.zeros((0, d)), [], [])
    assert empty["p_abnormal"] == 0.0 and empty["n_lesions"] == 0 and len(empty["mark_fp"]) == 0


def _synthetic(d=2):
    """8 patients x 2 images: a lesion on every even image (malignant on every 4th), found by a mark scored by its
    severity; one false mark of low score on each normal image."""
    dets, cen, rad, mal, lab, pat = [], [], [], [], [], []
    for k in range(16):
        abn, m = k % 2 == 0, k % 4 == 0
        c = np.full((1, d), 20.0)
        if abn:
            dets.append({"boxes": torch.tensor(_box(c[0])[None]), "scores": torch.tensor([0.9 if m else 0.7]),
                         "labels": torch.tensor([1 if m else 0])})
            cen.append(c), rad.append(np.array([5.0])), mal.append(np.array([m]))
        else:
            dets.append({"boxes": torch.tensor(_box(c[0])[None]), "scores": torch.tensor([0.2]),
                         "labels": torch.tensor([0])})
            cen.append(np.zeros((0, d))), rad.append(np.zeros(0)), mal.append(np.zeros(0, bool))
        lab.append("malignant" if m else "benign" if abn else "normal")
        pat.append(f"p{k // 2}")
    return dets, cen, rad, mal, lab, pat


@pytest.mark.parametrize("d", [2, 3])
def test_mammo_metrics_perfect_separation_and_keys(d):
    res = mammo_metrics(*_synthetic(d), n_boot=50)
    for k in KEYS:
        assert k in res and f"{k}_ci" in res
    assert res["images"] == 16 and res["lesions"] == 8 and res["patients"] == 8 and res["detected_lesions"] == 8
    assert res["image_auc_abnormal"] == 1.0 and res["image_auc_malignant"] == 1.0
    assert res["lesion_auc_malignant"] == 1.0  # malignant lesions scored 0.9 by the malignant class, benign 0
    # every lesion found before the first false mark: sensitivity 1 at every rate
    assert set(res["lesion_sensitivity"]) == {"0.125", "0.25", "0.5", "1", "2", "4"}
    assert all(v == 1.0 for v in res["lesion_sensitivity"].values()) and res["lesion_froc_mean"] == 1.0
    lo, hi = res["image_auc_abnormal_ci"]
    assert lo == hi == 1.0
    json.dumps(res)  # JSON-ready (no NaN, no arrays)


def test_mammo_metrics_false_marks_lower_the_froc_and_auc():
    dets, cen, rad, mal, lab, pat = _synthetic()
    for k in range(1, 16, 2):  # normal images now carry a high-scoring false mark
        dets[k]["scores"] = torch.tensor([0.95])
    res = mammo_metrics(dets, cen, rad, mal, lab, pat, n_boot=20)
    assert res["image_auc_abnormal"] == 0.0
    assert res["lesion_sensitivity"]["0.125"] == 0.0 and res["lesion_sensitivity"]["1"] == 1.0
    # 8 false marks on 16 images = 0.5 FP/image before any lesion is found
    assert res["lesion_froc_mean"] == pytest.approx(np.mean([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="one entry per image"):
        mammo_metrics(dets[:-1], cen, rad, mal, lab, pat)
    with pytest.raises(ValueError, match="image labels must be"):
        mammo_metrics(dets, cen, rad, mal, ["odd"] * 16, pat)


def _folder(tmp_path, size=64):
    from PIL import Image

    root = tmp_path / "mias"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, ann = [], []
    for k in range(1, 9):
        iid = f"mdb{k:03d}"
        img = (rng.random((size, size)) * 60).astype(np.uint8)
        label = "normal" if k % 2 else ("malignant" if k % 4 == 0 else "benign")
        if label != "normal":
            cy, cx = 20 + k, 24 + k
            img[cy - 5:cy + 5, cx - 5:cx + 5] = 220
            ann.append(f"{iid},val,F,CIRC,{'M' if label == 'malignant' else 'B'},{cx},{size - 1 - cy},6,1,"
                       f"{cx},{cy},{cx - 6},{cy - 6},{cx + 6},{cy + 6},")
        Image.fromarray(img).save(root / "images" / f"{iid}.png")
        rows.append(f"{iid},images/{iid}.png,val,p{(k - 1) // 2:03d},{'RL'[k % 2]},{size},{size},F,{label}")
    (root / "images.csv").write_text("image_id,file,split,patient_id,side,width,height,tissue,image_label\n"
                                     + "\n".join(rows) + "\n")
    (root / "annotations.csv").write_text("image_id,split,tissue,abnormality,severity,x_mias,y_mias,radius,"
                                          "has_location,cx,cy,xmin,ymin,xmax,ymax,note\n" + "\n".join(ann) + "\n")
    return root


def _detector(tmp_path, classes):
    from medetect.models.detector import DetectorConfig, build_detector
    from medetect.models.io import Preprocess, save_model

    cfg = DetectorConfig(in_channels=1, num_classes=len(classes), class_names=list(classes), base_width=4,
                         fpn_channels=8, levels=[2, 3], anchor_sizes=[[8], [16]], roi_hidden=16, score_thresh=0.0,
                         rpn_pre_nms_top_n=[50, 50], rpn_post_nms_top_n=[20, 20], detections_per_img=50)
    torch.manual_seed(0)
    path = tmp_path / f"det{len(classes)}.safetensors"
    save_model(build_detector(cfg).eval(), path, kind="detector", preprocess=Preprocess(), classes=list(classes),
               task="mammography")
    return path


def test_evaluate_cli_on_a_mias_folder(tmp_path, capsys):
    from medetect.cli import main

    from medetect.data.lesion_folder import read_lesion_folder

    root = _folder(tmp_path)
    recs = read_lesion_folder(root, "val")  # per-lesion severity from annotations.csv
    assert [r.malignant.tolist() for r in recs][1:4] == [[False], [], [True]]
    w = _detector(tmp_path, ("benign", "malignant"))
    assert main(["evaluate", "--weights", str(w), "--data", f"{root}:val", "--json", "--n-boot", "10",
                 "--plots", str(tmp_path / "plots")]) == 0
    res = json.loads(capsys.readouterr().out)
    for k in KEYS:
        assert k in res and f"{k}_ci" in res
    assert res["images"] == 8 and res["lesions"] == 4
    assert res["by_lesion_type"]["CIRC"]["lesions"] == 4
    assert res["confusion"] is None and "no confusion table" in res["confusion_note"]  # the folder has no train split
    assert (tmp_path / "plots" / "froc.png").is_file() and (tmp_path / "plots" / "roc.png").is_file()
    assert main(["evaluate", "--weights", str(w), "--data", f"{root}:val", "--n-boot", "5", "--threshold-split",
                 "val"]) == 0
    out = capsys.readouterr().out
    assert "image_auc_malignant" in out and "image confusion" in out and "CIRC" in out
    assert main(["predict", "--weights", str(w), str(root / "images" / "mdb004.png"), "--out",
                 str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    rows = (tmp_path / "pred" / "image_scores.csv").read_text().splitlines()
    assert rows[0] == "input,p_abnormal,p_malignant" and len(rows) == 2
    p_abn, p_mal = map(float, rows[1].split(",")[1:])
    assert 0 < p_abn <= 1 and 0 <= p_mal <= p_abn
    other = _detector(tmp_path, ("lesion",))  # a mammography model file whose classes are not benign, malignant
    assert main(["evaluate", "--weights", str(other), "--data", f"{root}:val"]) == 2
    assert "benign" in capsys.readouterr().err


def test_the_task_recorded_in_the_file_picks_the_evaluator_not_the_folder_or_classes(tmp_path, capsys):
    """A benign/malignant detector recorded as a plain detection model is scored as a detector (mAP on the data's
    format), never re-routed by sniffing the folder or its class names; the mammography file gets lesion metrics."""
    from medetect.cli import main
    from medetect.models.io import read_metadata

    root = _folder(tmp_path)
    w = _detector(tmp_path, ("benign", "malignant"))
    assert read_metadata(w)["task"] == "mammography"
    assert main(["evaluate", "--weights", str(w), "--data", f"{root}:val", "--json", "--n-boot", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "mammography"
    from medetect.models.detector import DetectorConfig, build_detector
    from medetect.models.io import Preprocess, save_model

    cfg = DetectorConfig(in_channels=1, num_classes=2, class_names=["benign", "malignant"], base_width=4,
                         fpn_channels=8, levels=[2, 3], anchor_sizes=[[8], [16]], roi_hidden=16)
    plain = save_model(build_detector(cfg).eval(), tmp_path / "plain.safetensors", kind="detector",
                       preprocess=Preprocess(), classes=["benign", "malignant"])
    assert read_metadata(plain)["task"] == "detection"
    assert main(["evaluate", "--weights", str(plain), "--data", f"mias:{root}:val", "--json"]) in (0, 2)
    out = capsys.readouterr()
    assert "lesion_froc_mean" not in out.out


def test_mias_format_with_severity_classes(tmp_path):
    from medetect.data.formats import open_dataset

    root = _folder(tmp_path)
    (root / "val.txt").write_text("\n".join(f"mdb{k:03d}" for k in range(1, 9)) + "\n")
    ann = root / "annotations.csv"  # mdb001: abnormal, no location -> left out (not a negative)
    ann.write_text(ann.read_text() + "mdb001,val,F,CALC,M,,,,0,,,,,,,NOTE 3\n")
    ds = open_dataset("mias", root, split="val", classes=["benign", "malignant"])
    assert list(ds.classes) == ["benign", "malignant"]
    labels = {r.image: list(r.labels) for r in ds.records}
    assert "images/mdb001.png" not in labels and len(labels) == 7
    assert labels["images/mdb002.png"] == ["benign"] and labels["images/mdb004.png"] == ["malignant"]
    assert labels["images/mdb003.png"] == []
    lesion = open_dataset("mias", root, split="val")  # default: one lesion class, every image kept
    assert list(lesion.classes) == ["lesion"] and len(lesion) == 8


def test_shipped_mammography_detector_loads():
    from pathlib import Path

    from medetect.apps import load_model

    m = load_model(Path(__file__).resolve().parents[1] / "medetect" / "weights" / "mammo_mias_faster_rcnn.safetensors")
    assert m.kind == "detector" and list(m.classes) == ["benign", "malignant"] and m.preprocess.scale == 0.25


def test_shipped_mammography_detector_val_figures(shared_data):
    """The model card's val figures, recomputed (docs/results.md): 14 of 19 lesions at 1 FP/image."""
    from pathlib import Path

    from medetect.apps import load_model
    from medetect.mammo.evaluate import evaluate_mammo

    torch.set_num_threads(2)
    m = load_model(Path(__file__).resolve().parents[1] / "medetect" / "weights" / "mammo_mias_faster_rcnn.safetensors")
    res = evaluate_mammo(m, shared_data / "mini-mias", "val", n_boot=0, threshold_split=None, device="cpu")
    assert res["lesions"] == 19 and res["images"] == 44
    assert res["lesion_sensitivity"]["1"] == pytest.approx(14 / 19, abs=1e-4)
    assert res["lesion_froc_mean"] == pytest.approx(0.719, abs=0.01)
    assert res["image_auc_abnormal"] == pytest.approx(0.857, abs=0.01)
    assert res["image_auc_malignant"] == pytest.approx(0.722, abs=0.01)


def test_by_lesion_type_at_one_false_mark_per_image():
    dets, cen, rad, mal, lab, pat = _synthetic()
    types = []
    for k in range(16):
        if k % 2 == 0:
            calc = k % 8 in (2, 6)  # 4 CALC lesions, found only by a low mark
            if calc:
                dets[k]["scores"] = torch.tensor([0.1])
            types.append(np.array(["CALC" if calc else "CIRC"]))
        else:  # two false marks per normal image (0.5, 0.4): 16 false marks = 1 per image at threshold 0.4
            b = dets[k]["boxes"]
            dets[k] = {"boxes": torch.cat([b, b + 30]), "scores": torch.tensor([0.5, 0.4]), "labels": torch.tensor([0, 0])}
            types.append(np.zeros(0, str))
    dets[1] = {"boxes": torch.cat([dets[1]["boxes"], dets[1]["boxes"][:1] + 60]), "scores": torch.tensor([0.5, 0.4, 0.3]),
               "labels": torch.tensor([0, 0, 0])}  # one more false mark: over the rate below 0.4
    res = mammo_metrics(dets, cen, rad, mal, lab, pat, n_boot=5, lesion_types=types)
    t = res["by_lesion_type"]
    assert list(t)[:6] == ["CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM"]
    assert t["CALC"] == {"lesions": 4, "detected": 0, "sensitivity": 0.0}
    assert t["CIRC"] == {"lesions": 4, "detected": 4, "sensitivity": 1.0}
    assert t["SPIC"] == {"lesions": 0, "detected": 0, "sensitivity": None}
    assert res["by_lesion_type_operating_point"]["score_threshold"] == pytest.approx(0.4)
    assert sum(v["detected"] for v in t.values()) / res["lesions"] == res["lesion_sensitivity"]["1"]
    for k in KEYS:  # the first part's keys are unchanged
        assert k in res
    json.dumps(res)
    with pytest.raises(ValueError, match="one entry per image"):
        mammo_metrics(dets, cen, rad, mal, lab, pat, n_boot=0, lesion_types=types[:-1])


def test_youden_thresholds_and_confusion():
    from medetect.evaluation.mammo import confusion_table, youden_thresholds

    labels = ["normal"] * 4 + ["benign"] * 3 + ["malignant"] * 3
    pa = [0.1, 0.2, 0.15, 0.6, 0.7, 0.8, 0.5, 0.9, 0.95, 0.3]
    pm = [0.0, 0.1, 0.0, 0.2, 0.1, 0.5, 0.2, 0.8, 0.9, 0.25]
    thr = youden_thresholds(pa, pm, labels)
    assert thr["rule"] == "youden" and thr["t_abnormal"] == pytest.approx(0.3)  # J = 1 - 1/4 at 0.3
    assert thr["t_malignant"] == pytest.approx(0.25)  # J = 1 - 1/7 at 0.25 (0.8: 2/3)
    c = confusion_table(pa, pm, labels, thr)
    assert c["labels"] == ["normal", "benign", "malignant"]
    assert c["matrix"] == [[3, 1, 0], [0, 2, 1], [0, 0, 3]]  # rows true, columns predicted
    assert c["accuracy"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="one class only"):
        youden_thresholds([0.1, 0.2], [0.1, 0.2], ["normal", "normal"])
    res = mammo_metrics(*_synthetic(), n_boot=0, thresholds={"t_abnormal": 0.5, "t_malignant": 0.8})
    assert res["confusion"]["matrix"] == [[8, 0, 0], [0, 4, 0], [0, 0, 4]]


def test_one_mark_in_two_overlapping_circles_finds_both():
    dets = [{"boxes": np.array([_box([20.0, 20.0])]), "scores": np.array([0.9]), "labels": np.array([0])},
            {"boxes": np.array([_box([5.0, 5.0])]), "scores": np.array([0.5]), "labels": np.array([0])}]
    cen = [np.array([[19.0, 20.0], [21.0, 20.0]]), np.zeros((0, 2))]
    res = mammo_metrics(dets, cen, [np.array([4.0, 4.0]), np.zeros(0)], [np.array([False, False]), np.zeros(0, bool)],
                        ["benign", "normal"], ["p0", "p1"], n_boot=0, lesion_types=[np.array(["CIRC", "CIRC"]), []])
    assert res["lesion_sensitivity"]["0.125"] == 1.0 and res["detected_lesions"] == 2
    assert res["by_lesion_type"]["CIRC"] == {"lesions": 2, "detected": 2, "sensitivity": 1.0}
