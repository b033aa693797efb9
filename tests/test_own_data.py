"""Issue 13: datasets in configs (data.format), the MONAI datalist reader/writer (2D and 3D, voxel and world boxes),
`medetect convert`, `medetect evaluate --data FORMAT:PATH:SPLIT | CONFIG.yaml`, the bad-input sentences, and one
training step on each shipped example config (with the shared data)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medetect.cli import main
from medetect.config import config_from_dict, load_config
from medetect.convert import Geometry
from medetect.data.annotations import (
    AnnotationError,
    ImageAnnotation,
    read_datalist,
    write_coco,
    write_datalist,
)
from medetect.data.formats import open_dataset, parse_data_spec
from medetect.data.image import MedicalImage
from medetect.data.io import write_image

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import tiny_detector_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# A rotated-free but flipped, anisotropic, offset geometry: world corners must land on the right voxels.
GEO3 = Geometry((2.0, 0.5, 0.75), (10.0, -20.0, 30.0), (-1, 0, 0, 0, 1, 0, 0, 0, 1))


def _volumes(root: Path, n: int = 2) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = np.zeros((1, 8, 16, 12), dtype=np.int16)
        arr[0, 2:5, 4:9, 3:7] = 500
        write_image(MedicalImage(arr, GEO3), root / f"v{i}.mha")
        names.append(f"v{i}.mha")
    return names


def _pngs(root: Path, n: int = 3, size=(20, 30)) -> list[str]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full(size, 20, dtype=np.uint8)
        a[3:9, 5:15] = 200
        Image.fromarray(a).save(root / f"im{i}.png")
    return [f"im{i}.png" for i in range(n)]


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------------- datalist reader


def test_datalist_3d_voxel_xyzxyz_is_the_medetect_box_with_axes_reversed(tmp_path):
    names = _volumes(tmp_path)
    dl = _json(tmp_path / "dl.json", {"training": [{"image": names[0], "box": [[3, 4, 2, 7, 9, 5]], "label": [1]},
                                                   {"image": names[1]}]})
    recs, rep = read_datalist(dl, tmp_path, "training", box_mode="xyzxyz", classes=["a", "b"])
    assert recs[0].boxes.tolist() == [[2, 4, 3, 5, 9, 7]] and recs[0].labels == ["b"]
    assert len(recs[1]) == 0 and recs[1].image_shape == (8, 16, 12)  # an entry without boxes: a negative
    recs2, _ = read_datalist(dl, tmp_path, "training", box_mode="xyzwhd")  # corner + size of the same numbers
    assert recs2[0].boxes.tolist() == [[2, 4, 3, 7, 13, 10]]
    assert recs2[0].labels == ["1"]  # no class list: the index as a name


def test_datalist_world_cccwhd_goes_through_the_geometry_and_round_trips(tmp_path):
    names = _volumes(tmp_path)
    box = np.array([[2.0, 4.0, 3.0, 5.0, 9.0, 7.0]])
    recs = [ImageAnnotation(n, box, ["nodule"], image_shape=(8, 16, 12), meta={"geometry": GEO3}) for n in names]
    out = write_datalist({"training": recs[:1], "validation": recs[1:]}, tmp_path / "w.json", classes=["nodule"],
                         box_mode="cccwhd", units="world")
    written = json.loads(out.read_text())["training"][0]["box"][0]
    # x: origin 10, direction -1, spacing 0.75 -> edges 3..7 are world 10 - 0.75 * (2.5 .. 6.5); size 3 mm
    assert written[3:] == pytest.approx([3.0, 2.5, 6.0]) and written[0] == pytest.approx(10 - 0.75 * 4.5)
    back, _ = read_datalist(out, tmp_path, "validation", box_mode="cccwhd", units="world", classes=["nodule"])
    np.testing.assert_allclose(back[0].boxes, box, atol=1e-9)
    vox = write_datalist({"s": recs}, tmp_path / "v.json", classes=["nodule"])  # voxel units: exact
    again, _ = read_datalist(vox, tmp_path, "s", box_mode="xyzxyz", classes=["nodule"])
    assert again[1].boxes.tolist() == box.tolist()


def test_datalist_2d_modes(tmp_path):
    names = _pngs(tmp_path)
    dl = _json(tmp_path / "dl.json", {"train": [{"image": names[0], "box": [[5, 3, 10, 6]], "label": ["cell"]}]})
    (r,), _ = read_datalist(dl, tmp_path, "train", box_mode="xywh", classes=["cell"])
    assert r.boxes.tolist() == [[3, 5, 9, 15]] and r.image_shape == (20, 30)
    (r,), _ = read_datalist(dl, tmp_path, "train", box_mode="xyxy")
    assert r.boxes.tolist() == [[3, 5, 6, 10]]


@pytest.mark.parametrize("entry, where, words", [
    ({"image": "missing.mha", "box": [], "label": []}, "training[1].image", ["missing.mha", "does not exist"]),
    ({"image": "v1.mha", "box": [[1, 2, 3, 4]], "label": [0]}, "training[1].box[0]", ["4 coordinates", "3D", "6"]),
    ({"image": "v1.mha", "box": [[1, 1, 1, 2, 2, 2]], "label": [3]}, "training[1].label[0]", ["class index 3"]),
    ({"image": "v1.mha", "box": [[1, 1, 1, 2, 2, 2]], "label": []}, "training[1].label", ["0 labels for 1 boxes"]),
])
def test_datalist_bad_entries_name_file_entry_and_field(tmp_path, entry, where, words):
    _volumes(tmp_path)
    dl = _json(tmp_path / "dl.json", {"training": [{"image": "v0.mha", "box": [], "label": []}, entry]})
    with pytest.raises(AnnotationError) as e:
        read_datalist(dl, tmp_path, "training", box_mode="xyzxyz", classes=["nodule"])
    msg = str(e.value)
    assert str(dl) in msg and where in msg and all(w in msg for w in words), msg


def test_datalist_world_box_outside_the_volume_and_mixed_dimensions(tmp_path):
    _volumes(tmp_path)
    _pngs(tmp_path, 1)
    far = _json(tmp_path / "far.json", {"training": [{"image": "v0.mha", "box": [[500, 0, 0, 4, 4, 4]], "label": [0]}]})
    with pytest.raises(AnnotationError, match=r"training\[0\]\.box\[0\].*outside the image.*box_units"):
        read_datalist(far, tmp_path, "training", box_mode="cccwhd", units="world", classes=["nodule"])
    mixed = _json(tmp_path / "mixed.json", {"training": [{"image": "v0.mha"}, {"image": "im0.png"}]})
    with pytest.raises(AnnotationError, match=r"training\[1\]\.image.*2D but training\[0\] is 3D"):
        read_datalist(mixed, tmp_path, "training", box_mode="xyzxyz")


# Anisotropic spacing and an offset origin (and a flip in 2D): world corners on the far border convert back to
# 512.00000000000006-like voxel edges, which the reader must read as the border.
BORDER_GEOMETRIES = {
    2: (Geometry((0.57, 0.83), (56.7, -289.1), (-1, 0, 0, 1)), (40, 30)),
    3: (Geometry((2.5, 0.7, 0.8), (-10.0, 5.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), (8, 16, 12)),
}


def _border_dataset(root: Path, d: int) -> tuple[Path, np.ndarray, tuple[int, ...]]:
    """One image of ``BORDER_GEOMETRIES[d]`` and a voxel datalist (the convert source) whose boxes touch the border:
    one spanning the whole image, one from inside to the far border."""
    geo, shape = BORDER_GEOMETRIES[d]
    root.mkdir(parents=True, exist_ok=True)
    write_image(MedicalImage(np.zeros((1, *shape), dtype=np.int16), geo), root / "im.mha")
    boxes = np.array([[0.0] * d + list(shape), [1.0, 3.0, 2.0][:d] + list(shape)])
    rec = ImageAnnotation("im.mha", boxes, ["lesion", "lesion"], image_shape=shape, meta={"geometry": geo})
    return write_datalist({"training": [rec]}, root / "voxel.json", classes=["lesion"]), boxes, shape


@pytest.mark.parametrize("mode", ["corners", "cccwhd"])
@pytest.mark.parametrize("d", [2, 3])
def test_convert_world_datalist_box_on_the_far_border_reads_back_on_it(tmp_path, capsys, d, mode):
    src, boxes, shape = _border_dataset(tmp_path / "data", d)
    box_mode = ("xyxy" if d == 2 else "xyzxyz") if mode == "corners" else ("ccwh" if d == 2 else "cccwhd")
    out = tmp_path / "world.json"
    assert main(["convert", f"datalist:{src}", "--source-box-mode", "xyxy" if d == 2 else "xyzxyz", "--splits",
                 "training", "--to", "datalist", "--out", str(out), "--box-units", "world", "--box-mode", box_mode]) == 0
    capsys.readouterr()
    ds = open_dataset("datalist", tmp_path / "data", "training", annotations=str(out), box_mode=box_mode,
                      box_units="world")
    (rec,) = ds.records
    assert rec.image_shape == shape
    np.testing.assert_allclose(rec.boxes, boxes, rtol=0, atol=1e-9)
    assert (rec.boxes[:, d:] == np.asarray(shape, dtype=np.float64)).all()  # ON the far border, not past it
    assert (rec.boxes[:, :d] >= 0).all()


@pytest.mark.parametrize("d", [2, 3])
def test_world_datalist_box_past_the_border_beyond_the_tolerance_is_refused(tmp_path, d):
    from medetect.data.annotations import WORLD_BORDER_TOLERANCE
    from medetect.data.annotations.datalist import _boxes_to_world

    geo, shape = BORDER_GEOMETRIES[d]
    _border_dataset(tmp_path, d)
    far = np.array([[0.0] * d + list(shape)])
    far[0, -1] += 100 * WORLD_BORDER_TOLERANCE  # a hundredth of a voxel past the last axis' far border
    mode = "xyxy" if d == 2 else "xyzxyz"
    dl = _json(tmp_path / "out.json", {"training": [{"image": "im.mha", "box": _boxes_to_world(far, geo).tolist(),
                                                     "label": [0]}]})
    with pytest.raises(AnnotationError, match=r"out\.json: training\[0\]\.box\[0\].*outside the image.*box_units"):
        read_datalist(dl, tmp_path, "training", box_mode=mode, units="world", classes=["lesion"])


def test_snap_to_border_moves_only_edges_within_the_tolerance():
    from medetect.data.annotations.datalist import _snap_to_border

    tol = 1e-4
    b = np.array([[-1e-12, -0.5, 40 + 1e-12, 30 + 0.5], [tol / 2, 0.25, 40 - tol / 2, 29.5], [-2 * tol, 2 * tol, 40, 30 + 2 * tol],
                  [0, 0, 40 - 2 * tol, 30 - 1e-9]])
    out = _snap_to_border(b, (40, 30), tol)
    np.testing.assert_array_equal(out, [[0, -0.5, 40, 30.5], [0, 0.25, 40, 29.5], [-2 * tol, 2 * tol, 40, 30 + 2 * tol],
                                        [0, 0, 40 - 2 * tol, 30]])


def test_convert_csv_to_world_datalist_reads_each_images_geometry(tmp_path, capsys):
    """CSV rows carry no geometry: convert takes it from the image header, so the world boxes are in millimetres."""
    geo, shape = BORDER_GEOMETRIES[3]
    (tmp_path / "data").mkdir()
    write_image(MedicalImage(np.zeros((1, *shape), dtype=np.int16), geo), tmp_path / "data" / "im.mha")
    (tmp_path / "data" / "boxes.csv").write_text("image,z0,y0,x0,z1,y1,x1,label\nim.mha,1,3,2,8,16,12,lesion\n")
    out = tmp_path / "world.json"
    assert main(["convert", f"csv:{tmp_path}/data/boxes.csv", "--splits", "all", "--to", "datalist", "--out",
                 str(out), "--box-units", "world", "--box-mode", "cccwhd"]) == 0
    capsys.readouterr()
    (box,) = json.loads(out.read_text())["all"][0]["box"]
    # sizes in mm (x, y, z): 10 * 0.8, 13 * 0.7, 7 * 2.5; centre x: origin -10 + 0.8 * (7 - 0.5)
    assert box[3:] == pytest.approx([8.0, 9.1, 17.5]) and box[0] == pytest.approx(-10 + 0.8 * 6.5)
    (rec,), _ = read_datalist(out, tmp_path / "data", "all", box_mode="cccwhd", units="world")
    np.testing.assert_allclose(rec.boxes, [[1, 3, 2, 8, 16, 12]], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------- other formats


def test_coco_unknown_category_and_csv_missing_column_are_sentences(tmp_path):
    names = _pngs(tmp_path)
    coco = _json(tmp_path / "c.json", {"images": [{"id": 1, "file_name": names[0], "width": 30, "height": 20}],
                                       "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4]}],
                                       "categories": [{"id": 1, "name": "cell"}]})
    with pytest.raises(AnnotationError, match=r"c\.json: annotations\[0\]: category_id 7 is not in 'categories'"):
        open_dataset("coco", tmp_path, "all", annotations=str(coco))
    bad = tmp_path / "b.csv"
    bad.write_text("image,y0,x0,y1,x1\nim0.png,1,1,4,4\n")
    with pytest.raises(AnnotationError, match=r"b\.csv: line 1 \(header\): missing column\(s\) \['label'\]"):
        open_dataset("csv", tmp_path, "all", annotations=str(bad))


def test_csv_split_column_selects_rows_and_all_needs_no_split(tmp_path):
    names = _pngs(tmp_path)
    rows = ["image,y0,x0,y1,x1,label,split", f"{names[0]},3,5,9,15,cell,train", f"{names[1]},3,5,9,15,cell,val",
            f"{names[2]},,,,,,train"]
    (tmp_path / "b.csv").write_text("\n".join(rows) + "\n")
    tr = open_dataset("csv", tmp_path, "train", annotations=str(tmp_path / "b.csv"))
    assert [r.image for r in tr.records] == [names[0], names[2]] and tr.classes == ("cell",)
    assert len(open_dataset("csv", tmp_path, "all", annotations=str(tmp_path / "b.csv"))) == 3
    (tmp_path / "n.csv").write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    with pytest.raises(ValueError, match="no 'split' column"):
        open_dataset("csv", tmp_path, "train", annotations=str(tmp_path / "n.csv"))


def test_coco_split_template_and_channels(tmp_path):
    names = _pngs(tmp_path)
    for split, ims in (("train", names[:2]), ("val", names[2:])):
        recs = [ImageAnnotation(n, np.array([[3.0, 5, 9, 15]]), ["cell"], image_shape=(20, 30)) for n in ims]
        write_coco(recs, tmp_path / f"{split}.json", categories=["cell"])
    ds = open_dataset("coco", tmp_path, "val", annotations=str(tmp_path / "{split}.json"), channels=3)
    assert len(ds) == 1 and ds[0]["image"].shape == (3, 20, 30) and ds[0]["boxes"].tolist() == [[3, 5, 9, 15]]
    with pytest.raises(ValueError, match="use {split} in its path or the split 'all'"):
        open_dataset("coco", tmp_path, "val", annotations=str(tmp_path / "val.json"))


def test_parse_data_spec():
    assert parse_data_spec("coco:a/b.json:val") == ("coco", "a/b.json", "val")
    assert parse_data_spec("../shared/data/bccd:val") == ("voc", "../shared/data/bccd", "val")
    with pytest.raises(ValueError, match="FORMAT:PATH:SPLIT"):
        parse_data_spec("folder")


# --------------------------------------------------------------------------------------------- config keys


def test_data_format_keys_are_checked_and_the_old_dataset_key_still_works(tmp_path):
    base = {"model": {"num_classes": 1}}
    with pytest.raises(ValueError, match="data.format and data.dataset both name the data"):
        config_from_dict({**base, "data": {"format": "coco", "dataset": "bccd", "annotations": "x.json"}})
    with pytest.raises(ValueError, match="data.box_mode must state the datalist's box convention"):
        config_from_dict({**base, "data": {"format": "datalist", "annotations": "x.json"}})
    with pytest.raises(ValueError, match="data.annotations must name the csv annotation file"):
        config_from_dict({**base, "data": {"format": "csv"}})
    old = config_from_dict({**base, "data": {"dataset": "bccd"}})
    assert old.data.source()["fmt"] == "voc" and old.data.source()["classes"] == ["RBC", "WBC", "Platelets"]
    cfg = config_from_dict({**base, "data": {"format": "coco", "annotations": "ann/{split}.json", "root": "imgs"}},
                           base_dir=tmp_path)
    assert cfg.data.annotations == str(tmp_path / "ann" / "{split}.json")  # relative to the YAML, {split} kept


# --------------------------------------------------------------------------------------------- train / evaluate / convert


def _tiny_3d_config(tmp_path: Path) -> Path:
    names = _volumes(tmp_path / "vols", 3)
    recs = [ImageAnnotation(n, np.array([[2.0, 4, 3, 5, 9, 7]]), ["nodule"], meta={"geometry": GEO3}) for n in names]
    write_datalist({"training": recs[:2], "validation": recs[2:]}, tmp_path / "dl.json", classes=["nodule"],
                   box_mode="cccwhd", units="world")
    model = {k: v for k, v in tiny_detector_config(d=3, num_classes=1, anchor_sizes=[[4], [8]]).__dict__.items()
             if k != "class_names"}
    cfg = {"model": model,
           "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "warmup_iters": 1, "num_workers": 0, "log_every": 1},
           "data": {"format": "datalist", "root": "vols", "annotations": "dl.json", "box_mode": "cccwhd",
                    "box_units": "world", "classes": ["nodule"], "train_split": "training",
                    "val_split": "validation", "max_value": 500.0, "mean": [0.0], "std": [1.0], "intensity": False}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_export_and_evaluate_a_3d_datalist_config(tmp_path, capsys):
    cfg = _tiny_3d_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--threads", "1"]) == 0
    assert "val_map50" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(tmp_path / "m.safetensors"), "--data", f"{cfg}:training", "--json",
                 "--froc"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["froc"]["lesions"] == 2 and 0 <= res["froc"]["cpm"] <= 1
    assert res["images"] == 2 and res["boxes"] == 2 and set(res["ap50_per_class"]) == {"nodule"}
    assert main(["evaluate", "--weights", str(tmp_path / "m.safetensors"), "--data", f"datalist:{tmp_path}/dl.json:x"]) == 2
    assert "box convention" in capsys.readouterr().err


def test_convert_coco_and_csv_then_evaluate_through_a_format_spec(tmp_path, capsys):
    from medetect.models.detector import build_detector
    from medetect.models.io import Preprocess, save_model

    names = _pngs(tmp_path / "data")
    rows = ["image,y0,x0,y1,x1,label,split"] + [f"{n},3,5,9,15,cell,{'val' if i == 2 else 'train'}"
                                                 for i, n in enumerate(names)]
    (tmp_path / "data" / "boxes.csv").write_text("\n".join(rows) + "\n")
    src = f"csv:{tmp_path}/data/boxes.csv"
    assert main(["convert", src, "--to", "coco", "--out", str(tmp_path / "coco")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == {"train": 2, "val": 1} and res["image_root"] == str(tmp_path / "data")
    coco = json.loads((tmp_path / "coco" / "val.json").read_text())
    assert coco["annotations"][0]["bbox"] == [5, 3, 10, 6]  # x, y, w, h
    shutil.copy(tmp_path / "coco" / "val.json", tmp_path / "data" / "val.json")
    torch.manual_seed(0)
    w = tmp_path / "m.safetensors"
    save_model(build_detector(tiny_detector_config(num_classes=1, score_thresh=0.0)), w, kind="detector",
               preprocess=Preprocess(ndim=2, channels=1), classes=["cell"])
    assert main(["evaluate", "--weights", str(w), "--data", f"coco:{tmp_path}/data/val.json:val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["boxes"] == 1
    assert main(["evaluate", "--weights", str(w), "--data", f"{src}:train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    assert main(["convert", src, "--splits", "all", "--holdout", "3", "--to", "datalist", "--out",
                 str(tmp_path / "dl.json")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == {"training": 2, "validation": 1}


# --------------------------------------------------------------------------------------------- shipped configs

EXAMPLES = ["nih_cxr14_csv", "deeplesion_csv", "dsb2018_coco", "luna16_patches_datalist", "bccd_faster_rcnn"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_config_trains_one_step(shared_data, tmp_path, monkeypatch, capsys, name):
    """From the repository as cloned (data next to it, or $MEDETECT_DATA): one training step per example config.
    DSB2018's COCO files are made first by the documented `medetect convert` command."""
    monkeypatch.setenv("MEDETECT_DATA", str(shared_data))
    sets = ["train.epochs=1", "train.max_steps_per_epoch=1", 'data.val_split=""', "train.num_workers=0",
            "model.base_width=8", "model.fpn_channels=16"]
    if name == "dsb2018_coco":
        monkeypatch.setenv("MEDETECT_DSB2018_COCO", str(tmp_path / "coco"))
        assert main(["convert", f"dsb2018:{shared_data}/dsb2018-nuclei", "--splits", "train", "val", "--to", "coco",
                     "--out", str(tmp_path / "coco")]) == 0
        capsys.readouterr()
    cfg = REPO / "configs" / f"{name}.yaml"
    load_config(cfg, sets)  # every key checked
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--threads", "1", *sum((["--set", s] for s in sets), [])]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 1 and np.isfinite(summary["train_loss"])


def test_box_froc_by_hand():
    from medetect.evaluation.box_froc import box_froc

    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])},
           {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}]
    preds = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [50.0, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.8]),
              "labels": torch.tensor([0, 0])},
             {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([0])}]
    f = box_froc(preds, gts)  # labels merged: the second image's hit counts although its class differs
    # score order: hit (0 FP), FP (0.5 FP/img), hit -> sensitivity 0.5 below 0.5 FP/img, 1.0 from 0.5 on
    assert f["sensitivity_at"]["0.25"] == 0.5 and f["sensitivity_at"]["0.5"] == 1.0 and f["lesions"] == 2
    assert f["cpm"] == pytest.approx((0.5 * 2 + 1.0 * 5) / 7)
