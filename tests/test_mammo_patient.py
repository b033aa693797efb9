"""Patient-level mammography model (medetect.mammo.patient) on synthetic detections."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medetect.data.lesion_folder import LesionImage
from medetect.mammo.patient import FEATURES, format_patient_table, patient_features, patient_study


def _cohort(n_patients: int, seed: int, *, tissue_signal: bool = True):
    """Patients with two images (L, R). A malignant patient's bad breast gets a high malignant score; the image
    score alone is noisy, but dense tissue (D) marks the malignant patients when ``tissue_signal``."""
    rng = np.random.default_rng(seed)
    recs, dets = [], []
    for k in range(n_patients):
        label = ("normal", "benign", "malignant")[k % 3]
        tissue = "D" if (label == "malignant" and tissue_signal) else "FG"[k % 2]
        for side in "LR":
            bad = label != "normal" and side == "L"
            img_label = label if bad else "normal"
            s = float(np.clip(rng.normal(0.6 if bad else 0.3, 0.2), 0, 1))
            recs.append(LesionImage(f"i{k}{side}", Path("x.png"), f"p{k:03d}", img_label, tissue=tissue, side=side))
            lab = 1 if (img_label == "malignant" and rng.random() < 0.7) else 0
            dets.append({"scores": np.array([s, 0.05]), "labels": np.array([lab, 0]), "boxes": np.zeros((2, 4))})
    return recs, dets


def test_patient_features_pairs_the_breasts():
    recs, dets = _cohort(6, 0)
    dets[0] = {"scores": np.array([0.9, 0.2]), "labels": np.array([1, 0]), "boxes": np.zeros((2, 4))}  # p000 L
    dets[1] = {"scores": np.array([0.4]), "labels": np.array([0]), "boxes": np.zeros((1, 4))}  # p000 R
    f = patient_features(recs, dets)
    assert f["patients"][0] == "p000" and f["X"].shape == (6, len(FEATURES))
    x = dict(zip(FEATURES, f["X"][0]))
    assert x["max_p_abnormal"] == pytest.approx(0.9) and x["max_p_malignant"] == pytest.approx(0.9)
    assert x["diff_p_abnormal"] == pytest.approx(0.5) and x["diff_p_malignant"] == pytest.approx(0.9)
    assert x["tissue_F"] == 1 and x["tissue_D"] == 0
    assert f["y_abnormal"].tolist() == [0, 1, 1, 0, 1, 1] and f["y_malignant"].tolist() == [0, 0, 1, 0, 0, 1]
    one = patient_features(recs[:1], dets[:1])  # a patient with one breast: no difference, counted
    assert one["patients_one_side"] == 1 and one["X"][0, FEATURES.index("diff_p_abnormal")] == 0
    with pytest.raises(ValueError, match="detection sets"):
        patient_features(recs, dets[:-1])


def test_patient_model_uses_tissue_when_it_separates():
    tr, va = _cohort(60, 1), _cohort(30, 2)
    res = patient_study(*tr, *va, n_boot=50, folds=3)
    m = res["malignant"]
    assert m["val_auc_model"] == 1.0 and m["val_auc_baseline"] < 1.0  # dense tissue marks every malignant patient
    assert m["adds_auc"] in (True, False) and m["auc_gain"] > 0 and m["coefficients"]["tissue_D"] > 0
    assert set(m["cv_auc"]) == {f"{c:g}" for c in res["C_grid"]} and m["C"] in res["C_grid"]
    assert res["train_patients"] == 60 and res["val_patients"] == 30
    assert "| malignant vs rest (10 / 30 patients) |" in format_patient_table(res)
    json.dumps(res)
    with pytest.raises(ValueError, match="each class"):
        patient_study(tr[0][:2], tr[1][:2], *va, n_boot=0)


def test_experiment_script_one_sentence_errors(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    try:
        import mammo_patient_model as exp
    finally:
        sys.path.pop(0)
    assert exp.main(["patient", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no such data folder" in capsys.readouterr().err
