"""Patient-grouped K-fold cross-validation: the folds of a mini-MIAS-layout folder (patients never on both sides,
stratified by image label, deterministic per seed), the fold keys' errors, the detection datasets of a fold, and
``medetect train --folds K`` end to end with its summary and ``--resume``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medetect.config import config_from_dict
from medetect.data.folds import Folds, assign_folds, fold_sizes, lesion_fold
from medetect.data.formats import open_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import tiny_detector_config  # noqa: E402

torch.set_num_threads(1)

N_PATIENTS = 12
VAL_PATIENTS = (3, 7, 11)  # one of each kind: normal, benign, malignant


def _folder(tmp_path: Path, size: int = 32) -> Path:
    """A mini-MIAS-layout folder (images.csv, annotations.csv, train.txt, val.txt): 12 patients with a right and a
    left breast; patients 0-3 normal, 4-7 a benign lesion on the right, 8-11 a malignant one."""
    from PIL import Image

    root = tmp_path / "mias"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, ann, splits = [], [], {"train": [], "val": []}
    for p in range(N_PATIENTS):
        for side in ("R", "L"):
            iid = f"mdb{2 * p + (side == 'L') + 1:03d}"
            img = (rng.random((size, size)) * 60).astype(np.uint8)
            label = "normal" if side == "L" or p < 4 else ("benign" if p < 8 else "malignant")
            if label != "normal":
                cy, cx = 10 + p, 12 + p
                img[cy - 4:cy + 4, cx - 4:cx + 4] = 220
                ann.append(f"{iid},x,F,CIRC,{'M' if label == 'malignant' else 'B'},{cx},{size - 1 - cy},5,1,"
                           f"{cx},{cy},{cx - 5},{cy - 5},{cx + 5},{cy + 5},")
            Image.fromarray(img).save(root / "images" / f"{iid}.png")
            split = "val" if p in VAL_PATIENTS else "train"
            splits[split].append(iid)
            rows.append(f"{iid},images/{iid}.png,{split},p{p:03d},{side},{size},{size},F,{label}")
    (root / "images.csv").write_text("image_id,file,split,patient_id,side,width,height,tissue,image_label\n"
                                     + "\n".join(rows) + "\n")
    (root / "annotations.csv").write_text("image_id,split,tissue,abnormality,severity,x_mias,y_mias,radius,"
                                          "has_location,cx,cy,xmin,ymin,xmax,ymax,note\n" + "\n".join(ann) + "\n")
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _spec(folds=3, fold=0, seed=0) -> Folds:
    return Folds(folds, fold, seed, "train", "val")


def test_lesion_folds_keep_patients_apart_cover_the_pool_and_stratify(tmp_path):
    root = _folder(tmp_path)
    held = []
    for k in range(3):
        train, val = lesion_fold(root, _spec(fold=k))
        assert not {r.patient for r in train} & {r.patient for r in val}  # no patient on both sides
        assert len(train) + len(val) == 2 * N_PATIENTS  # the pool: train + val splits
        held += [r.image_id for r in val]
        # stratified: every held-out fold has each image label (4 benign and 4 malignant patients in 3 folds)
        assert {r.image_label for r in val} == {"normal", "benign", "malignant"}
    assert sorted(held) == sorted(f"mdb{i:03d}" for i in range(1, 2 * N_PATIENTS + 1))  # each image held out once


def test_folds_are_deterministic_per_seed(tmp_path):
    root = _folder(tmp_path)

    def val_ids(seed):
        return [sorted(r.image_id for r in lesion_fold(root, _spec(fold=k, seed=seed))[1]) for k in range(3)]

    assert val_ids(0) == val_ids(0)
    assert any(val_ids(s) != val_ids(0) for s in (1, 2, 3))  # the seed shuffles the patients


def test_assign_folds_without_labels_groups_and_refuses_too_few_groups():
    groups = ["a", "a", "b", "c", "c", "c", "d", "e"]
    k = assign_folds(groups, 2, seed=5)
    assert sorted(set(k.tolist())) == [0, 1]
    for g in set(groups):  # a group's items share one fold
        assert len({int(f) for f, h in zip(k, groups) if h == g}) == 1
    np.testing.assert_array_equal(k, assign_folds(groups, 2, seed=5))
    with pytest.raises(ValueError, match=r"data\.folds is 6 but the pool has only 5 images"):
        assign_folds(groups, 6, seed=0)


def test_detection_datasets_of_a_fold_match_the_lesion_folds(tmp_path):
    root = _folder(tmp_path)
    spec = _spec(fold=1)
    train = open_dataset("mias", root, "train", classes=["benign", "malignant"], folds=spec)
    val = open_dataset("mias", root, "val", classes=["benign", "malignant"], folds=spec)
    lesion_train, lesion_val = lesion_fold(root, spec)
    assert sorted(Path(r.image).stem for r in val.records) == sorted(r.image_id for r in lesion_val)
    assert sorted(Path(r.image).stem for r in train.records) == sorted(r.image_id for r in lesion_train)
    assert val.classes == ("benign", "malignant") and val[0]["image"].shape[-2:] == (32, 32)
    plain = open_dataset("mias", root, "val", classes=["benign", "malignant"])  # no folds: the split itself
    assert len(plain) == 2 * len(VAL_PATIENTS)


def test_images_without_patients_are_their_own_groups(tmp_path):
    from medetect.data.annotations import ImageAnnotation, write_voc
    from PIL import Image

    root = tmp_path / "voc"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    ids = [f"img{i}" for i in range(6)]
    for i in ids:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "JPEGImages" / f"{i}.png")
        write_voc(ImageAnnotation(f"JPEGImages/{i}.png", np.array([[2.0, 2.0, 8.0, 8.0]]), ["cell"],
                                  image_shape=(16, 16)), root / "Annotations" / f"{i}.xml")
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids[:4]) + "\n")
    (root / "ImageSets/Main/val.txt").write_text("\n".join(ids[4:]) + "\n")
    cfg = config_from_dict({"data": {"root": str(root), "classes": ["cell"], "folds": 3, "fold": 2}})
    assert fold_sizes(cfg.data) == [{"images": 2, "groups": 2}] * 3
    src = cfg.data.source()
    train, val = open_dataset(**src, split="train"), open_dataset(**src, split="val")
    assert len(train) == 4 and len(val) == 2 and not {r.image for r in train.records} & {r.image for r in val.records}


@pytest.mark.parametrize("task", ["detection", "attention"])
def test_fold_keys_errors_name_the_key(tmp_path, task):
    def cfg(**data):
        return config_from_dict({"task": task, "data": {"root": str(tmp_path), **data}})

    with pytest.raises(ValueError, match=r"data\.folds must be 0 \(off\) or at least 2, got 1"):
        cfg(folds=1)
    with pytest.raises(ValueError, match=r"data\.fold must be one of 0\.\.2 \(data\.folds is 3\), got 3"):
        cfg(folds=3, fold=3)
    with pytest.raises(ValueError, match=r"data\.fold is 1 but data\.folds is 0"):
        cfg(fold=1)
    with pytest.raises(ValueError, match=r"data\.val_split must name a split other than data\.train_split"):
        cfg(folds=2, val_split="")
    with pytest.raises(ValueError, match=r"data\.folds must be >= 0"):
        cfg(folds=-2)


def test_more_folds_than_patients_names_the_key(tmp_path):
    root = _folder(tmp_path)
    att = config_from_dict({"task": "attention", "data": {"root": str(root), "folds": 13}})
    with pytest.raises(ValueError, match=r"data\.folds is 13 but the pool has only 12 patients: use at most 12"):
        fold_sizes(att.data)
    assert [f["groups"] for f in fold_sizes(config_from_dict(
        {"task": "attention", "data": {"root": str(root), "folds": 4}}).data)] == [3, 3, 3, 3]


def _tiny_mammo_config(tmp_path: Path, root: Path) -> Path:
    model = {k: v for k, v in tiny_detector_config(num_classes=2, base_width=4, fpn_channels=8, roi_hidden=16).__dict__
             .items() if k != "class_names"}
    cfg = {"task": "mammography", "model": {**model, "class_names": ["benign", "malignant"], "score_thresh": 0.0},
           "data": {"format": "mias", "root": str(root), "classes": ["benign", "malignant"], "channels": 1,
                    "hflip": False, "vflip": False, "intensity": False, "cache": True},
           "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "optimizer": "adamw", "warmup_iters": 1,
                     "num_workers": 0, "log_every": 1, "max_steps_per_epoch": 2}}
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_train_folds_end_to_end_with_summary_and_resume(tmp_path, capsys):
    from medetect.cli import main

    root = _folder(tmp_path)
    cfg = _tiny_mammo_config(tmp_path, root)
    run = tmp_path / "cv"
    assert main(["train", str(cfg), "--folds", "2", "--run-dir", str(run), "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run / "cv_summary.json").read_text())
    assert printed == summary and summary["folds"] == 2 and len(summary["per_fold"]) == 2
    for k in (0, 1):
        fold_dir = run / f"fold_{k}"
        assert (fold_dir / "config.json").is_file() and (fold_dir / "metrics.csv").is_file()
        recorded = json.loads((fold_dir / "config.json").read_text())["data"]
        assert (recorded["folds"], recorded["fold"]) == (2, k)
        assert summary["per_fold"][k]["held_out"]["groups"] == 6
    vals = [f["metrics"]["val_map50"] for f in summary["per_fold"]]
    m = summary["metrics"]["val_map50"]
    assert m["mean"] == pytest.approx(np.mean(vals)) and m["std"] == pytest.approx(np.std(vals, ddof=1))
    assert (m["min"], m["max"], m["n"]) == (min(vals), max(vals), 2)
    assert "| val_map50 |" in (run / "cv_summary.md").read_text()
    # a mammography run is validated (and summarised) with the lesion metrics of its task
    for key in ("val_lesion_froc_mean", "val_lesion_sensitivity_1fp", "val_image_auc_abnormal"):
        assert key in summary["per_fold"][0]["metrics"], key
    assert 0.0 <= summary["metrics"]["val_lesion_froc_mean"]["mean"] <= 1.0
    # the folder is never overwritten silently
    assert main(["train", str(cfg), "--folds", "2", "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume: finished folds are skipped, an unfinished one (here: never started) is trained
    metrics0 = (run / "fold_0" / "metrics.csv").read_text()
    shutil.rmtree(run / "fold_1")
    assert main(["train", str(cfg), "--folds", "2", "--run-dir", str(run), "--resume", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fold 1/2" in out and "is finished; skipped" in out and "fold 2/2: validating on" in out
    assert (run / "fold_0" / "metrics.csv").read_text() == metrics0
    assert (run / "fold_1" / "metrics.csv").is_file()
    assert json.loads((run / "cv_summary.json").read_text())["metrics"]["val_map50"]["n"] == 2
    # a different number of folds is a changed config
    assert main(["train", str(cfg), "--folds", "3", "--run-dir", str(run), "--resume"]) == 2
    assert "folds: 2 -> 3" in capsys.readouterr().err


def test_folds_refused_for_a_task_without_folds_before_anything_is_written(tmp_path, capsys):
    from medetect.cli import main

    run = tmp_path / "cv"
    cfg = Path(__file__).resolve().parents[1] / "configs" / "luna_fpr.yaml"
    assert main(["train", str(cfg), "--folds", "2", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--folds: the luna-fpr task has no cross-validation folds" in err and "mammography" in err
    assert not run.exists()
    root = _folder(tmp_path)
    assert main(["train", str(_tiny_mammo_config(tmp_path, root)), "--folds", "1", "--run-dir", str(run)]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err and not run.exists()
    assert main(["train", str(_tiny_mammo_config(tmp_path, root)), "--folds", "13", "--run-dir", str(run)]) == 2
    assert "data.folds is 13 but the pool has only 12 patients" in capsys.readouterr().err and not run.exists()


def test_cv_summary_takes_the_last_validated_row_and_skips_undefined_values(tmp_path):
    from medetect.apps.train import cv_summary

    rows = {0: "epoch,step,train_loss,images_per_s,val_auc,val_map50\n1,2,0.9,10,0.5,0.25\n2,4,0.8,11,,\n",
            1: "epoch,step,train_loss,images_per_s,val_auc,val_map50\n1,2,0.7,12,nan,0.75\n"}
    for k, text in rows.items():
        (tmp_path / f"fold_{k}").mkdir()
        (tmp_path / f"fold_{k}" / "metrics.csv").write_text(text)
    (tmp_path / "fold_1" / "best.json").write_text(json.dumps({"metric": "val_map50", "value": 0.75, "epoch": 1,
                                                               "step": 2, "weights": "best.safetensors"}))
    s = cv_summary(tmp_path, 2, fold_seed=4)
    assert [f["epoch"] for f in s["per_fold"]] == [1, 1]  # fold 0's epoch 2 has no validation
    assert s["per_fold"][0]["best"] is None and s["per_fold"][1]["best"] == {"metric": "val_map50", "value": 0.75,
                                                                               "epoch": 1}
    assert set(s["metrics"]) == {"train_loss", "val_auc", "val_map50"}  # not epoch, step, images_per_s
    assert s["metrics"]["val_map50"] == pytest.approx({"mean": 0.5, "std": 0.3535533906, "min": 0.25, "max": 0.75,
                                                       "n": 2})
    assert s["metrics"]["val_auc"] == pytest.approx({"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1})
    assert json.loads((tmp_path / "cv_summary.json").read_text()) == s
    assert "fold 1: epoch 1 (val_map50 0.75)" in (tmp_path / "cv_summary.md").read_text()
