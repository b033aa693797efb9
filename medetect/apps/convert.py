"""``medetect convert``: a dataset in any format of :mod:`medetect.data.formats` -> COCO, CSV or a MONAI datalist.

Image paths in the written files stay relative to the source's image folder (nothing is copied): a config reading
them sets ``data.root`` (or ``data.images``) to that folder. Splits are taken from the source, or made by
``holdout``: every ``holdout``-th group (patient / series when the records know it, else the image) goes to the
second split name, the rest to the first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from ..convert import Geometry
from ..data.annotations import ImageAnnotation, image_header, write_coco, write_csv_boxes, write_datalist
from ..data.formats import open_dataset
from ..data.image import MedicalImage

__all__ = ["convert_dataset", "holdout_split", "TARGETS"]

TARGETS = ("coco", "csv", "datalist")
_GROUP_KEYS = ("seriesuid", "patient_id", "patient")


def holdout_split(records: Sequence[ImageAnnotation], every: int) -> tuple[list[ImageAnnotation], list[ImageAnnotation]]:
    """Deterministic grouped split: sorted group keys (``meta`` seriesuid / patient id, else the image path); the
    groups at positions ``every - 1, 2 * every - 1, ...`` are held out. Returns ``(kept, held_out)``."""
    if every < 2:
        raise ValueError(f"--holdout must be >= 2 (every K-th group is held out), got {every}")

    def key(r: ImageAnnotation) -> str:
        return next((str(r.meta[k]) for k in _GROUP_KEYS if k in r.meta), r.image)

    groups = sorted({key(r) for r in records})
    out = {g for i, g in enumerate(groups) if i % every == every - 1}
    return [r for r in records if key(r) not in out], [r for r in records if key(r) in out]


def convert_dataset(source: dict, splits: Sequence[str], to: str, out: str | Path, *, holdout: int = 0,
                    names: Sequence[str] = (), box_mode: str | None = None, units: str = "voxel") -> dict:
    """Read ``splits`` of ``source`` (:func:`~medetect.data.formats.open_dataset` keyword arguments) and write them
    as ``to``: ``coco`` / ``csv``: one file per split, ``OUT/<split>.json`` / ``OUT/<split>.csv``; ``datalist``: one
    file ``OUT`` with a list per split (voxel units, labels as indices into the class list). With ``holdout`` the
    single source split is divided into ``names`` (default ``training, validation`` for a datalist, ``train, val``
    otherwise); ``box_mode`` / ``units`` choose the datalist's box convention (``world``: each image's geometry
    from its reader, else from the image file's header). Returns a summary: files written, image root, classes, images and boxes per split."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {list(TARGETS)}, got {to!r}")
    data: dict[str, list[ImageAnnotation]] = {}
    classes: list[str] = []
    root = None
    for split in splits:
        ds = open_dataset(**source, split=split)
        root = ds.root
        classes += [c for c in ds.classes if c not in classes]
        recs = list(ds.records)
        if to == "datalist" and units == "world":
            recs = [_with_geometry(r, ds) for r in recs]
        data[split] = recs
    if holdout:
        if len(data) != 1:
            raise ValueError(f"--holdout divides one split, got {list(data)}")
        names = list(names) or (["training", "validation"] if to == "datalist" else ["train", "val"])
        if len(names) != 2:
            raise ValueError(f"--names takes two split names (kept, held out), got {names}")
        kept, held = holdout_split(next(iter(data.values())), holdout)
        data = {names[0]: kept, names[1]: held}
    out = Path(out)
    written: list[str] = []
    if to == "datalist":
        written.append(str(write_datalist(data, out, classes=classes, box_mode=box_mode, units=units)))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for split, recs in data.items():
            if to == "coco":
                missing = [r.image for r in recs if r.image_shape is None]
                if missing:
                    shapes = {r.image: _shape(ds_root=root, image=r.image) for r in recs if r.image_shape is None}
                    recs = [r if r.image_shape is not None else
                            ImageAnnotation(r.image, r.boxes, r.labels, r.scores, shapes[r.image], r.meta) for r in recs]
                p = out / f"{split}.json"
                write_coco(recs, p, categories=classes)
            else:
                p = out / f"{split}.csv"
                write_csv_boxes(recs, p)
            written.append(str(p))
    return {"written": written, "image_root": str(root), "classes": classes,
            "images": {k: len(v) for k, v in data.items()}, "boxes": {k: sum(len(r) for r in v) for k, v in data.items()}}


def _shape(*, ds_root, image: str) -> tuple[int, ...]:
    """Spatial shape of an image file (COCO needs width and height)."""
    from ..data.io import read_image

    return tuple(read_image(Path(ds_root) / image).spatial_shape)


def _with_geometry(r: ImageAnnotation, ds) -> ImageAnnotation:
    """``r`` with ``meta['geometry']`` (world units need it): kept when the reader gave one (datalist, LUNA16), else
    read from the image file's header (CSV, COCO and VOC readers do not open the images)."""
    if isinstance(r.meta.get("geometry"), Geometry):
        return r
    src = ds.images.get(r.image)
    geo = src.geometry if isinstance(src, MedicalImage) else image_header(src or Path(ds.root) / r.image)[1]
    return dataclasses.replace(r, meta={**r.meta, "geometry": geo})
