"""The command line end to end on tiny synthetic data: predict, evaluate, export, demo-free paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medetect.cli import main
from medetect.data.annotations import ImageAnnotation, write_voc
from medetect.models.detector import DetectorConfig, build_detector
from medetect.models.io import Preprocess, save_model

CLASSES = ["cell", "blob"]


@pytest.fixture()
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    cfg = DetectorConfig(arch="faster_rcnn", ndim=2, in_channels=3, num_classes=2, class_names=CLASSES, base_width=8,
                         fpn_channels=8, roi_hidden=16, levels=[2, 3], anchor_sizes=[[8], [16]], score_thresh=0.0)
    w = tmp_path / "tiny.safetensors"
    save_model(build_detector(cfg), w, kind="detector", preprocess=Preprocess(ndim=2, channels=3, scale=0.5), classes=CLASSES)
    return w


def _voc_folder(root, n=3):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        ident = f"img{i}"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{ident}.png")
        ann = ImageAnnotation(f"JPEGImages/{ident}.png", np.array([[4.0, 6.0, 20.0, 30.0]]), [CLASSES[i % 2]], image_shape=(48, 64))
        write_voc(ann, root / "Annotations" / f"{ident}.xml")
        ids.append(ident)
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
    return ids


def test_predict_writes_one_csv_per_image_in_input_pixels(tmp_path, tiny_weights, capsys):
    voc = tmp_path / "voc"
    ids = _voc_folder(voc)
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(tiny_weights), str(voc / "JPEGImages"), "--out", str(out)]) == 0
    files = sorted(p.name for p in out.glob("*.csv"))
    assert files == [f"{i}.csv" for i in ids]
    rows = list(csv.DictReader(open(out / files[0])))
    assert rows and set(rows[0]) == {"y0", "x0", "y1", "x1", "label", "score"}
    ys = [float(r["y1"]) for r in rows]
    assert max(ys) <= 48 + 1e-3  # boxes are mapped back from the model's half-size grid to the input's pixels
    assert {r["label"] for r in rows} <= set(CLASSES)
    everything = json.loads((out / "predictions.json").read_text())
    assert len(everything) == len(ids)


def test_predict_never_overwrites_same_named_inputs(tmp_path, tiny_weights):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / sub / "same.png")
    out = tmp_path / "pred"
    main(["predict", "--weights", str(tiny_weights), str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.csv")) == ["same.csv", "same_2.csv"]


def test_evaluate_prints_voc_and_coco_map(tmp_path, tiny_weights, capsys):
    voc = tmp_path / "voc"
    _voc_folder(voc)
    assert main(["evaluate", "--weights", str(tiny_weights), "--data", f"{voc}:val", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 3 and res["boxes"] == 3
    assert set(res["ap50_per_class"]) == set(CLASSES)
    assert 0.0 <= res["map50"] <= 1.0 and 0.0 <= res["coco_map"] <= 1.0


def test_cli_errors_name_the_problem(tmp_path, tiny_weights, capsys):
    assert main(["evaluate", "--weights", str(tiny_weights), "--data", str(tmp_path)]) == 2
    assert "FOLDER:SPLIT" in capsys.readouterr().err
    assert main(["predict", "--weights", str(tmp_path / "missing.safetensors"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet19\n")
    assert main(["train", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    assert "model.backbone" in capsys.readouterr().err


def test_version_prints_the_package_version_and_exits_0(capsys):
    import subprocess
    import sys

    import medetect

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"medetect {medetect.__version__}\n"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "medetect", "--version"], capture_output=True, text=True, timeout=120,
                          cwd=root)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"medetect {medetect.__version__}\n", "")


def test_train_help_names_every_registered_task():
    from medetect.apps.tasks import TASKS
    from medetect.cli.detection import TASK_NAMES

    assert TASK_NAMES == tuple(TASKS)
