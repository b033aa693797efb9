"""Real nodule cubes (a ``luna16-node21-patches``-layout folder) -> a LUNA16-layout validation set that a centre prior
cannot win: cubes laid out 2 x 2 in-plane with seeded flips, one "scan" per mosaic.

Each cube is 50 mm at 1 mm (``patches/<patch_id>.npz``: ``image`` HU, ``label`` components, 1 = the target nodule;
``patches.csv``, ``components.csv``). A mosaic is ``50 x 100 x 100`` voxels (z, y, x) at 1 mm with identity
direction and origin (0, 0, 0): four cubes of one split, each flipped along y and/or x by a seeded draw; a slot with no
cube left and the part of a truncated cube that is missing are air (-1000 HU). The target nodule of each cube is an
annotation (centre = the mask's centroid in the mosaic, diameter = the diameter of the sphere of the same volume);
every other mask component (another nodule, or a fragment) is an excluded finding, as LUNA16 lists non-reference
findings in ``annotations_excluded.csv``. The output is written in LUNA16's own layout (``subset0/<uid>.mhd|.raw``,
``annotations.csv``, ``annotations_excluded.csv``, ``seriesuids.csv``), so ``medetect luna predict`` and
``medetect froc`` score it as they score LUNA16.

Split (documented decision): by scan. The cubes' seriesuids are sorted and every ``round(1 / val_fraction)``-th one
(starting at the first) goes to ``val``; with the default 0.25 that is a quarter of the scans. All cubes of a scan are
in one split, so a model trained on ``train`` cubes never saw a ``val`` patient.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NoduleCube", "read_cubes", "split_by_scan", "build_mosaics"]

CUBE = 50
AIR_HU = -1000


@dataclass(frozen=True)
class NoduleCube:
    patch_id: str
    seriesuid: str
    path: Path


def read_cubes(root: str | Path) -> list[NoduleCube]:
    """The cubes listed in ``root/patches.csv`` (every listed ``.npz`` must exist)."""
    root = Path(root)
    table = root / "patches.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no such file (a luna16-node21-patches-layout folder has patches.csv)")
    out = []
    with open(table, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            for key in ("patch_id", "seriesuid"):
                if not row.get(key):
                    raise ValueError(f"{table}, line {i}: column {key} is missing or empty")
            p = root / "patches" / f"{row['patch_id']}.npz"
            if not p.is_file():
                raise FileNotFoundError(f"{table}, line {i}: {p} does not exist")
            out.append(NoduleCube(row["patch_id"], row["seriesuid"], p))
    if not out:
        raise ValueError(f"{table} lists no patches")
    return out


def split_by_scan(cubes: list[NoduleCube], val_fraction: float = 0.25) -> dict[str, list[NoduleCube]]:
    """``{"train": [...], "val": [...]}``: every ``round(1 / val_fraction)``-th scan (sorted seriesuids) is val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    step = max(2, round(1 / val_fraction))
    uids = sorted({c.seriesuid for c in cubes})
    val = {u for i, u in enumerate(uids) if i % step == 0}
    return {"train": [c for c in cubes if c.seriesuid not in val], "val": [c for c in cubes if c.seriesuid in val]}


def _components(label: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
    """(component id, centroid voxel (z, y, x) centre coordinates, equivalent diameter mm at 1 mm) per component."""
    out = []
    for cid in np.unique(label):
        if cid == 0:
            continue
        idx = np.argwhere(label == cid)
        dia = float((6.0 * len(idx) / np.pi) ** (1.0 / 3.0))
        out.append((int(cid), idx.mean(0) + 0.5, dia))  # voxel i's centre is at edge coordinate i + 0.5
    return out


def build_mosaics(root: str | Path, out: str | Path, *, split: str = "val", val_fraction: float = 0.25,
                  seed: int = 0, offset: int = 0) -> dict:
    """Write the ``split`` cubes of ``root`` as 2 x 2 mosaics in LUNA16 layout under ``out`` (module docstring).
    ``offset`` > 0 pads every mosaic with that many voxels of air before y and x (a check that a detector does not
    rely on where the cubes sit). Returns a summary (scans, nodules, excluded findings, the cubes of each mosaic)."""
    import SimpleITK as sitk

    from ..data.annotations import WorldPoints, write_world_points

    if offset < 0:
        raise ValueError(f"offset must be >= 0 voxels, got {offset}")
    cubes = read_cubes(root)
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be train, val or all, got {split!r}")
    chosen = cubes if split == "all" else split_by_scan(cubes, val_fraction)[split]
    if not chosen:
        raise ValueError(f"{root}: no cubes in split {split!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; mosaics are written into a new or empty folder")
    (out / "subset0").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(chosen))
    ann, exc, uids, layout = [], [], [], {}
    for m in range(0, len(order), 4):
        uid = f"1.3.6.1.4.1.99999.{seed}.{m // 4 + 1}"
        vol = np.full((CUBE, 2 * CUBE + offset, 2 * CUBE + offset), AIR_HU, dtype=np.int16)
        layout[uid] = []
        for slot, j in enumerate(order[m:m + 4]):
            cube = chosen[int(j)]
            d = np.load(cube.path)
            img, lab = d["image"], d["label"]
            flips = [ax for ax in (1, 2) if rng.random() < 0.5]
            if flips:
                img, lab = np.flip(img, flips), np.flip(lab, flips)
            oy, ox = CUBE * (slot // 2) + offset, CUBE * (slot % 2) + offset
            z, y, x = (min(CUBE, s) for s in img.shape)
            vol[:z, oy:oy + y, ox:ox + x] = img[:z, :y, :x]
            for cid, ctr, dia in _components(np.ascontiguousarray(lab[:z, :y, :x])):
                world = [ctr[2] + ox, ctr[1] + oy, ctr[0]]  # (x, y, z) mm: origin 0, 1 mm voxels, identity
                (ann if cid == 1 else exc).append((uid, world, dia))
            layout[uid].append({"patch_id": cube.patch_id, "slot": slot, "flipped_axes": flips})
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((1.0, 1.0, 1.0))
        img.SetOrigin((0.5, 0.5, 0.5))  # ITK's origin is voxel 0's centre: edge coordinate 0 is world 0
        sitk.WriteImage(img, str(out / "subset0" / f"{uid}.mhd"), False)
        uids.append(uid)

    def points(rows, source):
        if not rows:
            return WorldPoints.from_arrays(np.zeros(0, dtype=str), np.zeros((0, 3)), diameters=np.zeros(0), source=source)
        return WorldPoints.from_arrays([r[0] for r in rows], np.array([r[1] for r in rows]),
                                       diameters=np.array([r[2] for r in rows]), source=source)

    write_world_points(out / "annotations.csv", points(ann, "annotations"), "annotations")
    write_world_points(out / "annotations_excluded.csv", points(exc, "excluded"), "excluded")
    (out / "seriesuids.csv").write_text("".join(f"{u}\n" for u in uids))
    summary = {"split": split, "val_fraction": val_fraction, "seed": seed, "offset": offset, "cubes": len(chosen), "scans": len(uids),
               "nodules": len(ann), "excluded_findings": len(exc), "mosaics": layout}
    (out / "mosaics.json").write_text(json.dumps(summary, indent=1))
    return summary
