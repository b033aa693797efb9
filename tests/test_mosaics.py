"""Real-cube validation mosaics (LUNA16 layout): nodule centres land where the cube's mask is, excluded findings are
the other mask components, the split is by scan, and the result scores with the FROC (synthetic cubes here)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from medetect.cli import main
from medetect.data.annotations import read_world_points
from medetect.luna.mosaics import build_mosaics, read_cubes, split_by_scan


def _cubes(root, n=6, truncated=None):
    (root / "patches").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = np.full((50, 50, 50), -800, np.int16)
        lab = np.zeros((50, 50, 50), np.uint8)
        lab[20:26, 10 + i:16 + i, 30:36] = 1  # the target, off-centre
        lab[40:42, 40:42, 5:7] = 2 if i == 0 else 0  # one other component in cube 0
        img[lab > 0] = 60
        if truncated == i:
            img, lab = img[:, :, :47], lab[:, :, :47]
        pid = f"s{i // 2}_{i % 2}"
        np.savez(root / "patches" / f"{pid}.npz", image=img, label=lab)
        rows.append({"patch_id": pid, "seriesuid": f"1.2.{i // 2}"})
    with open(root / "patches.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["patch_id", "seriesuid"])
        w.writeheader()
        w.writerows(rows)


def test_split_is_by_scan(tmp_path):
    _cubes(tmp_path / "c", n=8)
    parts = split_by_scan(read_cubes(tmp_path / "c"), 0.25)
    tr, va = {c.seriesuid for c in parts["train"]}, {c.seriesuid for c in parts["val"]}
    assert tr and va and not (tr & va) and len(parts["train"]) + len(parts["val"]) == 8


def test_mosaic_centres_follow_the_masks(tmp_path):
    _cubes(tmp_path / "c", n=6, truncated=5)
    res = build_mosaics(tmp_path / "c", tmp_path / "m", split="all", seed=3)
    assert (res["scans"], res["nodules"], res["excluded_findings"]) == (2, 6, 1)
    ann = read_world_points(tmp_path / "m" / "annotations.csv", "annotations")
    for uid, pts in ann.by_uid().items():
        vol = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m" / "subset0" / f"{uid}.mhd")))
        assert vol.shape == (50, 100, 100)
        for c, dia in zip(pts.centres, pts.diameters):
            x, y, z = (int(v) for v in np.floor(c))  # world mm = edge coordinate (origin 0, 1 mm voxels)
            assert vol[z, y, x] == 60  # the centre lies in the bright nodule
            assert dia == pytest.approx((6 * 216 / np.pi) ** (1 / 3), rel=1e-6)
    assert (tmp_path / "m" / "seriesuids.csv").read_text().count("\n") == 2
    with pytest.raises(ValueError, match="not empty"):
        build_mosaics(tmp_path / "c", tmp_path / "m")


def test_cli_mosaics_then_froc(tmp_path, capsys):
    _cubes(tmp_path / "c", n=8)
    assert main(["luna", "mosaics", str(tmp_path / "c"), str(tmp_path / "m")]) == 0
    out = tmp_path / "m"
    ann = read_world_points(out / "annotations.csv", "annotations")
    # a perfect submission: one mark per nodule at its centre
    sub = tmp_path / "sub.csv"
    sub.write_text("seriesuid,coordX,coordY,coordZ,probability\n" + "".join(
        f"{u},{c[0]},{c[1]},{c[2]},0.9\n" for u, c in zip(ann.seriesuids, ann.centres)))
    capsys.readouterr()
    assert main(["froc", str(out / "annotations.csv"), str(sub), "--excluded", str(out / "annotations_excluded.csv"),
                 "--seriesuids", str(out / "seriesuids.csv"), "--bootstrap", "0", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["cpm"] == pytest.approx(1.0)
