"""The lineage's shared parts: data at the working scale, selective search and its cache, the lineage folder rules,
the table; end to end on a tiny synthetic VOC folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medetect.cli import main
from medetect.data.annotations import ImageAnnotation, write_voc
from medetect.lineage.data import load_split, normalise

CLASSES = ["disc", "square"]


def _has_ss() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "ximgproc")


needs_ss = pytest.mark.skipif(not _has_ss(), reason="opencv-contrib (cv2.ximgproc) not installed")


def _scene(rng, h=96, w=128):
    """A grey background with one bright disc and one dark square; returns (image HxWx3 uint8, boxes yxyx, labels)."""
    img = np.full((h, w, 3), 200, np.uint8) + rng.integers(0, 8, (h, w, 3), dtype=np.uint8)
    cy, cx, r = rng.integers(20, h - 20), rng.integers(20, w // 2 - 4), 12
    yy, xx = np.ogrid[:h, :w]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (200, 40, 40)
    sy, sx, s = rng.integers(8, h - 28), rng.integers(w // 2 + 4, w - 28), 20
    img[sy:sy + s, sx:sx + s] = (30, 30, 120)
    boxes = np.array([[cy - r, cx - r, cy + r, cx + r], [sy, sx, sy + s, sx + s]], float)
    return img, boxes, ["disc", "square"]


def voc_folder(root, n=6, seed=0, splits=("train", "val")):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        ident = f"img{i}"
        img, boxes, labels = _scene(rng)
        Image.fromarray(img).save(root / "JPEGImages" / f"{ident}.png")
        write_voc(ImageAnnotation(f"JPEGImages/{ident}.png", boxes, labels, image_shape=img.shape[:2]),
                  root / "Annotations" / f"{ident}.xml")
        ids.append(ident)
    half = n // 2
    for split, part in zip(splits, (ids[:half], ids[half:])):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(part) + "\n")
    return ids


def test_load_split_scales_images_and_boxes_exactly(tmp_path):
    voc_folder(tmp_path / "voc")
    full = load_split(f"{tmp_path / 'voc'}:train", scale=1.0, classes=CLASSES)
    half = load_split(f"{tmp_path / 'voc'}:train", scale=0.5, classes=CLASSES)
    assert len(full) == len(half) == 3 and full.num_objects == 6
    assert tuple(half.images[0].shape) == (3, 48, 64)
    torch.testing.assert_close(half.boxes[0], full.boxes[0] * 0.5)
    assert half.labels[0].tolist() == [0, 1]
    assert float(half.images[0].max()) <= 255 and normalise(half.images[0]).dtype == torch.float32
    assert half.subset([2]).ids == [half.ids[2]]


def test_load_split_needs_classes_for_voc_and_names_bad_scale(tmp_path):
    voc_folder(tmp_path / "voc")
    with pytest.raises(ValueError, match="classes"):
        load_split(f"{tmp_path / 'voc'}:train")
    with pytest.raises(ValueError, match="scale"):
        load_split(f"{tmp_path / 'voc'}:train", scale=0, classes=CLASSES)


@needs_ss
def test_selective_search_finds_the_drawn_objects_and_ranks_unique_boxes():
    from medetect.boxes import box_iou
    from medetect.proposals import selective_search

    img, boxes, _ = _scene(np.random.default_rng(3))
    props = selective_search(torch.from_numpy(img).permute(2, 0, 1), mode="fast", base_k=50)
    assert props.ndim == 2 and props.shape[1] == 4 and len(props) > 2
    assert len(torch.unique(props, dim=0)) == len(props)
    assert (props[:, 2:] > props[:, :2]).all() and props[:, 2].max() <= 96 and props[:, 3].max() <= 128
    best = box_iou(torch.from_numpy(boxes).float(), props).max(1).values
    assert (best > 0.7).all(), best
    few = selective_search(img, mode="fast", base_k=50, max_proposals=3)
    torch.testing.assert_close(few, props[:3])  # same ranking from a numpy HxWx3 input, cut at max_proposals
    with pytest.raises(ValueError, match="mode"):
        selective_search(img, mode="best")
    with pytest.raises(ValueError, match="2D"):
        selective_search(torch.zeros(1, 4, 8, 8))


@needs_ss
def test_selective_search_on_a_flat_image_gives_few_or_no_boxes_without_crashing():
    from medetect.proposals import selective_search

    props = selective_search(np.zeros((32, 32), np.uint8))
    assert props.shape[1] == 4 and len(props) <= 1


@needs_ss
def test_proposal_cache_is_reused_and_a_damaged_file_recomputed(tmp_path):
    from medetect.lineage.proposals import ProposalConfig, proposals_for

    voc_folder(tmp_path / "voc")
    data = load_split(f"{tmp_path / 'voc'}:train", scale=1.0, classes=CLASSES)
    cache = tmp_path / "ss"
    first = proposals_for(data, ProposalConfig(), cache)
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 3
    files[0].write_bytes(b"not an npz")
    again = proposals_for(data, ProposalConfig(), cache)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    other = proposals_for(data, ProposalConfig(mode="single"), cache)  # other settings: other files
    assert len(list(cache.glob("*.npz"))) == 6 and len(other) == 3


class _Fixed:
    """A 'method' that returns the ground truth of the image it is given (by identity), for the table code."""

    name = "Faster R-CNN"

    def __init__(self, data):
        self.by_id = {id(img): (b, lab) for img, b, lab in zip(data.images, data.boxes, data.labels)}

    def detect(self, image):
        b, lab = self.by_id[id(image)]
        return {"boxes": b, "scores": torch.ones(len(b)), "labels": lab, "num_proposals": 7, "proposal_seconds": 0.0}


def test_run_method_table_and_plot(tmp_path):
    from medetect.lineage.evaluate import _map, format_table, plot_table, run_method

    voc_folder(tmp_path / "voc")
    data = load_split(f"{tmp_path / 'voc'}:val", scale=0.5, classes=CLASSES)
    r = run_method(_Fixed(data), data)
    assert r["proposals_per_image"] == 7 and r["seconds_per_image"] >= 0
    assert _map(r["preds"], data, False) == pytest.approx(1.0) and _map(r["preds"], data, True) == pytest.approx(1.0)
    result = {"data": "x:val", "images": 3, "objects": 6, "scale": 0.5, "threads": 1, "device": "cpu",
              "rows": [{"method": "Faster R-CNN", "proposals": "RPN", "proposals_per_image": 7, "map50": 1.0,
                        "map50_07": 1.0, "seconds_per_image": 0.01, "proposal_seconds_per_image": 0.0,
                        "train_seconds": 60.0, "status": "ok"},
                       {"method": "R-CNN", "proposals": "selective search", "proposals_per_image": None,
                        "map50": None, "map50_07": None, "seconds_per_image": None,
                        "proposal_seconds_per_image": None, "train_seconds": None, "status": "not trained"}]}
    md = format_table(result)
    assert "| Faster R-CNN | RPN | 7 | 1.000 | 1.000 | 0.010 | 0.000 | 1.0 min | ok |" in md
    assert "| R-CNN |" in md and "not trained" in md
    plot_table(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_lineage_folder_rules(tmp_path):
    from medetect.lineage.config import LineageConfig
    from medetect.lineage.train import load_lineage_config, prepare_lineage_dir

    cfg = LineageConfig()
    cfg.data.root = str(tmp_path / "voc")
    out = tmp_path / "run"
    prepare_lineage_dir(out, cfg, resume=False, overwrite=False, allow_config_change=False)
    assert load_lineage_config(out).data.root == cfg.data.root
    (out / "localizer.json").write_text("{}")
    with pytest.raises(ValueError, match="--resume"):
        prepare_lineage_dir(out, cfg, resume=False, overwrite=False, allow_config_change=False)
    cfg.proposals.base_k = 77
    with pytest.raises(ValueError, match="proposals.base_k"):
        prepare_lineage_dir(out, cfg, resume=True, overwrite=False, allow_config_change=False)
    prepare_lineage_dir(out, cfg, resume=True, overwrite=False, allow_config_change=True)
    assert (out / "config_changes.jsonl").is_file()
    with pytest.warns(UserWarning, match="moved"):
        prepare_lineage_dir(out, cfg, resume=False, overwrite=True, allow_config_change=False)
    assert not (out / "localizer.json").exists() and list(tmp_path.glob("run.old-*"))


def test_cli_mistakes_are_one_sentence(tmp_path, capsys):
    assert main(["lineage", "evaluate", "--weights-dir", str(tmp_path / "none"), "--data", "x:val"]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["lineage", "evaluate", "--weights-dir", str(tmp_path / "empty"), "--data", "x:val"]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lineage", "train", "--out", str(tmp_path / "o"), "--steps", "rcnn,svm"])
    assert "unknown step" in capsys.readouterr().err
    voc_folder(tmp_path / "voc")
    (tmp_path / "voc" / "ImageSets" / "Main" / "nothing.txt").write_text("")
    rc = main(["lineage", "train", "--data", f"{tmp_path / 'voc'}:nothing", "--out", str(tmp_path / "o"),
               "--classes", "disc,square"])
    assert rc == 2 and "nothing to learn" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # data errors come before the folder is touched
    json.dumps({})


TINY = ["--set", "localizer.epochs=1", "--set", "localizer.crops_per_epoch=64", "--set", "localizer.base_width=8",
        "--set", "localizer.hidden=16", "--set", "localizer.batch_size=16", "--set", "localizer.warmup_iters=0",
        "--set", "detectors.train.epochs=1", "--set", "detectors.model.base_width=8",
        "--set", "detectors.model.fpn_channels=8", "--set", "detectors.train.warmup_iters=0",
        "--set", "overfeat.scales=[1.0]", "--set", "data.scale=1.0"]


def test_lineage_train_and_evaluate_end_to_end_on_a_tiny_folder(tmp_path, capsys):
    """Two steps trained through the command line, the table written with the others marked, resume keeps them."""
    voc_folder(tmp_path / "voc", n=6)
    out = tmp_path / "lineage"
    args = ["lineage", "train", "--data", f"{tmp_path / 'voc'}:train", "--out", str(out), "--classes", "disc,square",
            "--steps", "localizer,yolo", "--no-progress", "--threads", "1", *TINY]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"]["localizer"]["status"] == "trained" and summary["steps"]["yolo"]["status"] == "trained"
    assert (out / "localizer.safetensors").is_file() and (out / "yolo.safetensors").is_file()
    assert json.loads((out / "lineage.json").read_text())["config"]["data"]["classes"] == ["disc", "square"]
    assert main(args) == 2  # a used folder needs --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "already trained" in capsys.readouterr().out
    table = tmp_path / "table"
    assert main(["lineage", "evaluate", "--weights-dir", str(out), "--data", f"{tmp_path / 'voc'}:val", "--out",
                 str(table), "--json", "--threads", "1"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["Classification + localisation", "OverFeat", "R-CNN", "Fast R-CNN", "Faster R-CNN", "YOLO",
                          "RetinaNet"]
    assert rows["R-CNN"]["status"] == "not trained" and rows["R-CNN"]["map50"] is None
    for name in ("OverFeat", "YOLO"):
        r = rows[name]
        assert r["status"] == "ok" and 0 <= r["map50"] <= 1 and r["seconds_per_image"] > 0 and r["train_seconds"] > 0
        assert r["proposals_per_image"] > 0
    assert 0 <= rows["Classification + localisation"]["accuracy"] <= 1
    assert {p.name for p in table.iterdir()} == {"lineage_table.md", "lineage_table.json", "lineage_map_vs_time.png"}
    assert main(["lineage", "evaluate", "--weights-dir", str(out), "--data", f"{tmp_path / 'voc'}:val", "--out",
                 str(table)]) == 2  # the table files are never replaced silently
    assert "--force" in capsys.readouterr().err


@needs_ss
def test_lineage_proposals_command_writes_recall(tmp_path, capsys):
    voc_folder(tmp_path / "voc", n=4)
    out = tmp_path / "recall"
    assert main(["lineage", "proposals", "--data", f"{tmp_path / 'voc'}:val", "--scale", "1.0", "--classes",
                 "disc,square", "--out", str(out), "--counts", "5", "50", "--methods", "selective search (fast)",
                 "sliding windows", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["voc:val"]) == {"selective search (fast)", "sliding windows"}
    assert (out / "recall.json").is_file() and (out / "recall.png").is_file()
    assert main(["lineage", "proposals", "--data", f"{tmp_path / 'voc'}:val", "--scale", "1.0", "0.5", "--out",
                 str(tmp_path / "r2")]) == 2
    assert "one value per --data" in capsys.readouterr().err


ASSETS = Path(__file__).resolve().parents[1] / "medetect" / "assets" / "bccd"
# mAP@0.5 (all-point) of the shipped lineage files on the four bundled BCCD val images (measured when shipped)
SHIPPED_MAP = {"OverFeat": 0.622, "R-CNN": 0.681, "Fast R-CNN": 0.774, "Faster R-CNN": 0.793, "YOLO": 0.415,
               "RetinaNet": 0.785}


@needs_ss
def test_shipped_lineage_runs_every_row_on_the_bundled_images(tmp_path, capsys):
    import shutil

    root = tmp_path / "bccd4"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    ids = sorted(p.stem for p in ASSETS.glob("*.jpg"))
    for i in ids:
        shutil.copy(ASSETS / f"{i}.jpg", root / "JPEGImages")
        shutil.copy(ASSETS / f"{i}.xml", root / "Annotations")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
    assert main(["lineage", "evaluate", "--data", f"{root}:val", "--json", "--threads", "2"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(r["status"].startswith("ok") for r in rows.values()), rows
    got = {name: rows[name]["map50"] for name in SHIPPED_MAP}
    assert got == pytest.approx(SHIPPED_MAP, abs=2e-3)
    assert rows["Classification + localisation"]["accuracy"] > 0.9
    assert rows["Fast R-CNN"]["proposals_per_image"] > 300 and rows["Faster R-CNN"]["proposals_per_image"] == 300


def test_predict_refuses_lineage_models_it_cannot_run_in_one_sentence(tmp_path, capsys):
    image = str(ASSETS / "BloodImage_00000.jpg")
    weights = Path(__file__).resolve().parents[1] / "medetect" / "weights" / "lineage"
    for name, words in (("fast_rcnn", "selective search"), ("rcnn", "lineage evaluate")):
        assert main(["predict", "--weights", str(weights / f"{name}.safetensors"), image, "--out",
                     str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
