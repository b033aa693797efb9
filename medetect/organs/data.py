"""Organ boxes: from label maps, to and from ``boxes.csv``, and the ``organ-ct-sample`` folder layout.

Layout (``organ-ct-sample`` and ``medetect phantoms --organs``)::

    volumes/<case>.nii.gz   CT in HU          labels/<case>.nii.gz   label map on exactly the CT grid
    boxes.csv               case,organ,label_id,x0,y0,z0,x1,y1,z1,vz0,vy0,vx0,vz1,vy1,vx1,voxels,touches_border
    label_tables.json       {table or case name: {id: name}}

``x0..z1`` is the world box (mm, the 8 corners of the voxel extents transformed, min/max), ``vz0..vx1`` the voxel box
(array order, half-open). :func:`organ_boxes` merges the labels of one localiser organ (lung lobes, vertebrae; see
:mod:`medetect.organs.anatomy`) into one box per (case, organ) with a per-face border flag.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..convert import Geometry, voxel_to_world
from .anatomy import organ_of

__all__ = ["BOX_COLUMNS", "OrganCase", "label_extents", "boxes_from_labels", "world_box", "write_boxes_csv",
           "read_boxes_csv", "read_label_table", "organ_boxes", "read_organ_folder", "check_label_map", "boxes_from_label_file"]

BOX_COLUMNS = ("case", "organ", "label_id", "x0", "y0", "z0", "x1", "y1", "z1", "vz0", "vy0", "vx0", "vz1", "vy1",
               "vx1", "voxels", "touches_border")


def world_box(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Voxel boxes ``[N, 6]`` (array order, half-open edges) -> world boxes ``[N, 6]`` ``(x0, y0, z0, x1, y1, z1)``
    mm: the min / max over the 8 transformed corners (any direction)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    sel = np.array([[(k >> a) & 1 for a in range(3)] for k in range(8)])  # [8, 3] lo / hi choice per axis
    corners = np.where(sel[None] == 1, b[:, None, 3:], b[:, None, :3])  # [N, 8, 3] edge coordinates
    w = np.asarray(voxel_to_world(corners, geometry))  # [N, 8, 3] (x, y, z)
    return np.concatenate([w.min(1), w.max(1)], axis=1)


def check_label_map(labels: np.ndarray, volume_shape, volume_geometry: Geometry, label_geometry: Geometry | None,
                    where: str) -> None:
    """A label map must lie on exactly the CT grid: same shape, spacing, origin and direction (to 1e-3 mm)."""
    if tuple(labels.shape) != tuple(volume_shape):
        raise ValueError(f"{where}: the label map's grid {tuple(labels.shape)} differs from the CT's "
                         f"{tuple(volume_shape)}; resample it onto the CT grid first")
    if label_geometry is not None:
        for key in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(label_geometry, key)), np.asarray(getattr(volume_geometry, key))
            if not np.allclose(a, b, atol=1e-3):
                raise ValueError(f"{where}: the label map's {key} {tuple(a.round(4))} differs from the CT's "
                                 f"{tuple(b.round(4))}; resample it onto the CT grid first")


def label_extents(labels: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Voxel boxes ``[L, 6]`` (array order, half-open) of the label ``ids`` (all present) in a label map
    ``[Z, Y, X]`` whose ids are < ``n``. One ``bincount`` per slice over (id, coordinate) pairs: memory stays one
    slice's, and there is no loop over labels or voxels."""
    Z, Y, X = labels.shape
    present = [np.zeros((n, s), dtype=bool) for s in (Z, Y, X)]
    yy, xx = np.arange(Y)[:, None], np.arange(X)[None, :]
    for z in range(Z):  # one pass over the slices
        s = labels[z].astype(np.int64)
        present[0][:, z] = np.bincount(s.reshape(-1), minlength=n) > 0
        present[1] |= (np.bincount((s * Y + yy).reshape(-1), minlength=n * Y) > 0).reshape(n, Y)
        present[2] |= (np.bincount((s * X + xx).reshape(-1), minlength=n * X) > 0).reshape(n, X)
    lo = np.stack([p[ids].argmax(1) for p in present], 1)
    hi = np.stack([p.shape[1] - p[ids][:, ::-1].argmax(1) for p in present], 1)
    return np.concatenate([lo, hi], 1).reshape(-1, 6)


def boxes_from_labels(labels: np.ndarray, geometry: Geometry, names: Mapping[int, str], *, case: str = "",
                      strict: bool = True) -> list[dict]:
    """One ``boxes.csv`` row per label id present in the label map ``[Z, Y, X]`` (ids named by ``names``).

    The per-axis extents come from one ``bincount`` per slice (never a loop over labels or voxels). An id missing
    from ``names`` is an error (``strict``) or skipped."""
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"{case or 'label map'}: a label map must be 3D [Z, Y, X], got shape {lab.shape}")
    if lab.dtype.kind not in "ui" or (lab.size and lab.min() < 0):
        raise ValueError(f"{case or 'label map'}: label ids must be non-negative integers, got {lab.dtype}")
    n = int(lab.max()) + 1 if lab.size else 1
    counts = np.bincount(lab.reshape(-1).astype(np.int64), minlength=n)
    ids = np.flatnonzero(counts[1:]) + 1
    missing = [int(i) for i in ids if int(i) not in names]
    if missing and strict:
        raise ValueError(f"{case or 'label map'}: label id {missing[0]} is not in the label table "
                         f"(known ids: {sorted(names)[:10]}...)")
    vox = label_extents(lab, ids, n)
    world = world_box(vox, geometry)
    touches = (vox[:, :3] == 0).any(1) | (vox[:, 3:] == np.array(lab.shape)).any(1)
    rows = []
    for k, i in enumerate(ids):  # rows of a CSV file
        if int(i) not in names:
            continue
        rows.append({"case": case, "organ": names[int(i)], "label_id": int(i),
                     **{c: round(float(v), 2) for c, v in zip(("x0", "y0", "z0", "x1", "y1", "z1"), world[k])},
                     **{c: int(v) for c, v in zip(("vz0", "vy0", "vx0", "vz1", "vy1", "vx1"), vox[k])},
                     "voxels": int(counts[i]), "touches_border": int(touches[k])})
    return rows


def boxes_from_label_file(volume: str | Path, labels: str | Path, names: Mapping[int, str], *,
                          case: str = "") -> list[dict]:
    """``boxes.csv`` rows of a label map FILE that must lie on exactly the grid of the CT file ``volume`` (else one
    sentence naming the label file)."""
    import SimpleITK as sitk

    from ..data.io import read_image

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(volume))
    reader.ReadImageInformation()
    vol_geom = Geometry(tuple(reversed(reader.GetSpacing())), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    lab = read_image(labels)
    if lab.geometry.ndim != 3:
        raise ValueError(f"{labels}: a label map must be a 3D volume, got {lab.geometry.ndim}D")
    check_label_map(lab.array[0], tuple(reversed(reader.GetSize())), vol_geom, lab.geometry, str(labels))
    return boxes_from_labels(lab.array[0], lab.geometry, names, case=case)


def write_boxes_csv(path: str | Path, rows: Sequence[Mapping]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(BOX_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def read_boxes_csv(path: str | Path) -> list[dict]:
    """Rows of a ``boxes.csv`` (numbers parsed); a missing column or a bad number names the file and row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no boxes.csv here (the organ-ct-sample layout needs one)")
    with open(path, newline="") as fh:
        r = csv.DictReader(fh)
        need = [c for c in BOX_COLUMNS if c not in (r.fieldnames or [])]
        if need:
            raise ValueError(f"{path}: missing column {need[0]!r} (expected {', '.join(BOX_COLUMNS)})")
        rows = []
        for line, row in enumerate(r, start=2):
            try:
                rec = {"case": row["case"], "organ": row["organ"], "label_id": int(row["label_id"])}
                rec.update({c: float(row[c]) for c in BOX_COLUMNS[3:9]})
                rec.update({c: int(float(row[c])) for c in BOX_COLUMNS[9:]})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, row {line}: not a number ({e})") from e
            rows.append(rec)
    return rows


def read_label_table(folder: str | Path, case: str) -> dict[int, str]:
    """The id -> name table of ``case``: ``label_tables.json``'s entry named after the case, else its only other
    (shared) table."""
    path = Path(folder) / "label_tables.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no label table here")
    tables = json.loads(path.read_text())
    table = tables.get(case)
    if table is None:
        shared = [v for k, v in tables.items() if isinstance(v, dict) and not (Path(folder) / "volumes" /
                                                                            f"{k}.nii.gz").exists()]
        if len(shared) != 1:
            raise ValueError(f"{path}: no table named {case!r} and not exactly one shared table")
        table = shared[0]
    return {int(k): str(v) for k, v in table.items()}


@dataclass
class OrganCase:
    """One case of an organ folder: files, shape, and one merged box per localiser organ present."""

    name: str
    volume: Path
    labels: Path | None
    shape: tuple[int, int, int]
    organs: list[str]
    boxes: np.ndarray  # [K, 6] voxel boxes (array order, half-open)
    faces_inside: np.ndarray  # [K, 6] bool: this face of the box lies strictly inside the volume


def organ_boxes(rows: Sequence[Mapping], shape: Sequence[int]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``boxes.csv`` rows of ONE case -> (localiser organs, union voxel boxes ``[K, 6]``, faces inside ``[K, 6]``).
    Labels that belong to no localiser organ are left out."""
    groups: dict[str, list[np.ndarray]] = {}
    for r in rows:  # rows of a file
        org = organ_of(str(r["organ"]))
        if org is not None:
            groups.setdefault(org, []).append(np.array([r[c] for c in BOX_COLUMNS[9:15]], dtype=np.float64))
    organs = sorted(groups)
    if not organs:
        return [], np.zeros((0, 6)), np.zeros((0, 6), dtype=bool)
    b = np.stack([np.concatenate([np.min(groups[o], 0)[:3], np.max(groups[o], 0)[3:]]) for o in organs])
    sh = np.asarray(shape, dtype=np.float64)
    inside = np.concatenate([b[:, :3] > 0, b[:, 3:] < sh], 1)
    return organs, b, inside


def read_organ_folder(folder: str | Path) -> list[OrganCase]:
    """Every case of an ``organ-ct-sample``-layout folder (``boxes.csv`` + ``volumes/``), with its merged organ
    boxes. Volume shapes are read from the file headers only."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    rows = read_boxes_csv(folder / "boxes.csv")
    cases: list[OrganCase] = []
    for name in sorted({r["case"] for r in rows}):  # one entry per case
        vol = folder / "volumes" / f"{name}.nii.gz"
        if not vol.is_file():
            raise FileNotFoundError(f"{folder / 'boxes.csv'}: case {name!r} has no volume {vol}")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(vol))
        reader.ReadImageInformation()
        shape = tuple(int(s) for s in reversed(reader.GetSize()))
        organs, b, inside = organ_boxes([r for r in rows if r["case"] == name], shape)
        lab = folder / "labels" / f"{name}.nii.gz"
        cases.append(OrganCase(name, vol, lab if lab.is_file() else None, shape, organs, b, inside))
    return cases
