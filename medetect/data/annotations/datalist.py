"""MONAI-style detection datalist JSON <-> :class:`ImageAnnotation` (2D and 3D).

The file is a JSON object with one list per split (MONAI names them ``training`` / ``validation``; any key works)::

    {"training": [{"image": "scans/a.nii.gz", "box": [[x0, y0, z0, x1, y1, z1], ...], "label": [0, 2]}, ...],
     "validation": [...]}

``image`` is relative to the dataset root (checked like every annotation path: inside the root, existing). ``box``
holds ``2d`` numbers per box in the file's ``box_mode`` (MONAI's names, ITK axis order x, y, z):

=========== ============================================= ========================
mode        box                                           MONAI name
=========== ============================================= ========================
``xyzxyz``  ``x0, y0, z0, x1, y1, z1`` (corners)           ``StandardMode`` (3D)
``xyzwhd``  ``x0, y0, z0, w, h, d`` (corner + size)        ``CornerSizeMode`` (3D)
``cccwhd``  ``cx, cy, cz, w, h, d`` (centre + size)        ``CenterSizeMode`` (3D)
``xyxy``    ``x0, y0, x1, y1``                            ``StandardMode`` (2D)
``xywh``    ``x0, y0, w, h``                              ``CornerSizeMode`` (2D)
``ccwh``    ``cx, cy, w, h``                              ``CenterSizeMode`` (2D)
=========== ============================================= ========================

``units``: ``voxel`` (edge coordinates of the image array, half-open like MONAI's ``TO_REMOVE = 0``: the medetect
convention with the axes reversed) or ``world`` (millimetres in the image file's physical frame, LPS for DICOM /
NIfTI read by ITK, the frame of LUNA16's CSVs: the box's corners go through the image's geometry, and the voxel box
is their bounding box). A world box edge within :data:`WORLD_BORDER_TOLERANCE` voxels of the image border (the
float rounding of the mm -> voxel conversion: a box written on the far border reads back as ``512.00000000000001``
or ``511.99999999999994``) is set onto the border; one further out is outside the image. ``label`` holds class indices (into ``classes``) or class names. An entry without ``box``
(or with an empty list) is a negative image.

Errors name the file and the entry (``training[12]``) and the field: a missing image, a box with the wrong number of
coordinates for the image's dimension, boxes outside the image (``clip=False``), unknown labels, ``box`` and
``label`` of different lengths, and images of different dimensions in one file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...convert import Geometry, voxel_to_world, world_to_voxel
from ._common import AnnotationError, AnnotationReport, ImageAnnotation, PathLike, _Rows, _build, _image_path, _safe_relpath

__all__ = ["BOX_MODES", "WORLD_BORDER_TOLERANCE", "image_header", "read_datalist", "write_datalist", "datalist_splits"]

# How far (in voxels, i.e. as a fraction of the voxel size on each axis) a world box edge may land from the image
# border, inside or outside, and still be read as lying on it. The mm -> voxel conversion of a box written on the border is off by
# ~1e-14 voxels in float64; 1e-4 also absorbs coordinates written in float32 or to 6 decimals of a millimetre, and
# moves no edge by anything an image can show.
WORLD_BORDER_TOLERANCE = 1e-4

# mode -> (d, kind): kind "corners" (lo.., hi..), "corner_size" (lo.., size..), "centre_size" (centre.., size..)
BOX_MODES = {
    "xyzxyz": (3, "corners"), "xyzwhd": (3, "corner_size"), "cccwhd": (3, "centre_size"),
    "xyxy": (2, "corners"), "xywh": (2, "corner_size"), "ccwh": (2, "centre_size"),
}


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(path, None, "file does not exist") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None


def datalist_splits(path: PathLike) -> list[str]:
    """The split names (top-level keys holding lists) of a datalist file."""
    data = _load(Path(path))
    if not isinstance(data, dict):
        raise AnnotationError(path, "top level", "a datalist is a JSON object with one list per split")
    return [k for k, v in data.items() if isinstance(v, list)]


def _to_edges(b: np.ndarray, mode: str) -> np.ndarray:
    """``[N, 2d]`` boxes in ``mode`` -> ``[N, 2d]`` corners ``(lo_x.., hi_x..)`` in the file's axis order."""
    d, kind = BOX_MODES[mode]
    a, s = b[:, :d], b[:, d:]
    if kind == "corners":
        return b
    if kind == "corner_size":
        return np.concatenate([a, a + s], axis=1)
    return np.concatenate([a - s / 2, a + s / 2], axis=1)


def _from_edges(e: np.ndarray, mode: str) -> np.ndarray:
    """Inverse of :func:`_to_edges`."""
    d, kind = BOX_MODES[mode]
    lo, hi = e[:, :d], e[:, d:]
    if kind == "corners":
        return e
    if kind == "corner_size":
        return np.concatenate([lo, hi - lo], axis=1)
    return np.concatenate([(lo + hi) / 2, hi - lo], axis=1)


def _world_to_boxes(edges_xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """World corner boxes ``[N, 2d]`` (x.. then x..; mm) -> medetect voxel boxes: the bounding box of the 2^d corners."""
    n, d = edges_xyz.shape[0], edges_xyz.shape[1] // 2
    if n == 0:
        return np.zeros((0, 2 * d))
    lo, hi = edges_xyz[:, :d], edges_xyz[:, d:]
    pick = np.array(np.meshgrid(*[[0, 1]] * d, indexing="ij")).reshape(d, -1).T  # [2^d, d] corner choices
    corners = np.where(pick[None].astype(bool), hi[:, None], lo[:, None])  # [N, 2^d, d] world x, y, z
    vox = np.asarray(world_to_voxel(corners, geometry))  # [N, 2^d, d] array order
    return np.concatenate([vox.min(1), vox.max(1)], axis=1)


def _snap_to_border(boxes: np.ndarray, shape: Sequence[int], tol: float = WORLD_BORDER_TOLERANCE) -> np.ndarray:
    """Voxel boxes ``[N, 2d]`` (array order) with every edge within ``tol`` voxels of a border (``0`` or the axis'
    size, on either side of it) set onto that border; edges further from both borders are left as they are."""
    lim = np.tile(np.asarray(shape, dtype=np.float64), 2)  # [2d]: the far border of each lo and hi edge
    out = np.where(np.abs(boxes) <= tol, 0.0, boxes)
    return np.where(np.abs(out - lim) <= tol, lim, out)


def _boxes_to_world(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Medetect voxel boxes ``[N, 2d]`` -> world corner boxes (x.. then x..; mm): the bounding box of the corners."""
    n, d = boxes.shape[0], boxes.shape[1] // 2
    if n == 0:
        return np.zeros((0, 2 * d))
    pick = np.array(np.meshgrid(*[[0, 1]] * d, indexing="ij")).reshape(d, -1).T  # [2^d, d]
    corners = np.where(pick[None].astype(bool), boxes[:, None, d:], boxes[:, None, :d])  # [N, 2^d, d] array order
    world = np.asarray(voxel_to_world(corners, geometry))  # [N, 2^d, d] x, y, z
    return np.concatenate([world.min(1), world.max(1)], axis=1)


def image_header(path: PathLike) -> tuple[tuple[int, ...], Geometry]:
    """Spatial shape (array order) and geometry of an image file, from its header where the format allows."""
    from ..io import read_image  # the image readers sit beside the annotation readers in the data layer

    path = Path(path)
    name = path.name.lower()
    if path.is_file() and name.endswith((".nii", ".nii.gz", ".mhd", ".mha", ".nrrd")):
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
        size = tuple(int(s) for s in reversed(r.GetSize()))
        geo = Geometry(tuple(reversed(r.GetSpacing())), tuple(r.GetOrigin()), tuple(r.GetDirection()))
        return size, geo
    img = read_image(path)
    return tuple(img.spatial_shape), img.geometry


def read_datalist(
    path: PathLike,
    root: PathLike,
    split: str,
    *,
    box_mode: str = "xyzxyz",
    units: str = "voxel",
    classes: Sequence[str] | None = None,
    clip: bool = False,
    header: Callable[[Path], tuple[tuple[int, ...], Geometry]] | None = None,
) -> tuple[list[ImageAnnotation], AnnotationReport]:
    """Read split ``split`` of a datalist file -> ``(records, report)`` in the medetect box convention.

    ``box_mode`` and ``units`` are stated by the caller (a datalist does not record them; see the module docstring).
    Every image's header is read (``header(path) -> (shape, geometry)``; default: SimpleITK's header reader for
    NIfTI/MHD/NRRD, the full reader otherwise) for the bounds check and, with ``units='world'``, the conversion.
    Image meta: ``geometry``, ``entry`` (the entry's place). Per-box meta: none.
    """
    file, root = Path(path), Path(root)
    if box_mode not in BOX_MODES:
        raise ValueError(f"box_mode must be one of {list(BOX_MODES)}, got {box_mode!r}")
    if units not in ("voxel", "world"):
        raise ValueError(f"units must be 'voxel' or 'world', got {units!r}")
    d, _ = BOX_MODES[box_mode]
    header = header or image_header
    data = _load(file)
    if not isinstance(data, dict):
        raise AnnotationError(file, "top level", "a datalist is a JSON object with one list per split")
    if split not in data:
        raise AnnotationError(file, "top level", f"no split {split!r}; the file has {[k for k in data]}")
    entries = data[split]
    if not isinstance(entries, list):
        raise AnnotationError(file, split, "a split must be a list of {'image', 'box', 'label'} entries")
    report = AnnotationReport()
    out: list[ImageAnnotation] = []
    first_dim: tuple[int, str] | None = None
    for i, ent in enumerate(entries):
        w = f"{split}[{i}]"
        if not isinstance(ent, Mapping) or "image" not in ent:
            raise AnnotationError(file, w, "an entry must be an object with an 'image' field")
        if not isinstance(ent["image"], str):
            raise AnnotationError(file, f"{w}.image", f"must be a path string, got {ent['image']!r}")
        rel = _safe_relpath(ent["image"], file, f"{w}.image")
        img_path = root / rel
        if not img_path.exists():
            raise AnnotationError(file, f"{w}.image", f"image {rel!r} does not exist under the dataset root {str(root)!r}")
        if img_path.is_file():
            rel = _image_path(rel, root, file, f"{w}.image", True)
        boxes = ent.get("box", [])
        labels = ent.get("label", [])
        if not isinstance(boxes, list) or not isinstance(labels, list):
            raise AnnotationError(file, w, "'box' and 'label' must be lists")
        if len(boxes) != len(labels):
            raise AnnotationError(file, f"{w}.label", f"{len(labels)} labels for {len(boxes)} boxes")
        shape, geo = header(img_path)
        nd = len(shape)
        if first_dim is None:
            first_dim = (nd, w)
        elif nd != first_dim[0]:
            raise AnnotationError(file, f"{w}.image", f"image {rel!r} is {nd}D but {first_dim[1]} is {first_dim[0]}D: "
                                                      "one dataset holds 2D images or 3D volumes, not both")
        if nd != d:
            raise AnnotationError(file, f"{w}.image", f"image {rel!r} is {nd}D but data.box_mode {box_mode!r} is for "
                                                      f"{d}D boxes")
        vals = []
        for k, b in enumerate(boxes):
            if not isinstance(b, list) or len(b) != 2 * d:
                n = len(b) if isinstance(b, list) else "not a list of"
                raise AnnotationError(file, f"{w}.box[{k}]", f"has {n} coordinates; a {d}D image needs {2 * d} "
                                                             f"({box_mode})")
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in b):
                raise AnnotationError(file, f"{w}.box[{k}]", f"must hold finite numbers, got {b}")
            vals.append([float(v) for v in b])
        arr = np.asarray(vals, dtype=np.float64).reshape(-1, 2 * d)
        sizes_neg = BOX_MODES[box_mode][1] != "corners" and (arr[:, d:] < 0).any()
        if sizes_neg:
            k = int(np.flatnonzero((arr[:, d:] < 0).any(1))[0])
            raise AnnotationError(file, f"{w}.box[{k}]", f"has a negative size: {vals[k]}")
        edges = _to_edges(arr, box_mode)
        if units == "world":
            if geo.ndim != d:
                raise AnnotationError(file, f"{w}.image", f"image {rel!r} has a {geo.ndim}D geometry, boxes are {d}D")
            med = _snap_to_border(_world_to_boxes(edges, geo), shape)
        else:
            med = edges[:, list(range(d - 1, -1, -1)) + list(range(2 * d - 1, d - 1, -1))]  # x.. -> array order
        rows = _Rows()
        for k, lab in enumerate(labels):
            rows.add(med[k], _label(lab, classes, file, f"{w}.label[{k}]"), f"{w}.box[{k}]")
        try:
            out.append(_build(rel, rows, d, file, shape, clip, report, meta={"geometry": geo, "entry": w}))
        except AnnotationError as e:
            if units == "world" and "outside the image" in e.message:
                raise AnnotationError(file, e.where, e.message.split(";")[0] + f" after the world -> voxel conversion "
                                      f"(image geometry origin {geo.origin}, spacing {geo.spacing}); are the boxes "
                                      "in this image's world frame (data.box_units)?") from None
            raise
    return out, report


def _label(lab: Any, classes: Sequence[str] | None, file: Path, where: str) -> str:
    if isinstance(lab, bool):
        raise AnnotationError(file, where, f"a label is a class index or name, got {lab!r}")
    if isinstance(lab, (int, float)) and float(lab).is_integer():
        idx = int(lab)
        if classes is None:
            return str(idx)
        if not 0 <= idx < len(classes):
            raise AnnotationError(file, where, f"class index {idx} is outside data.classes {list(classes)} "
                                               f"(0..{len(classes) - 1})")
        return classes[idx]
    if isinstance(lab, str):
        if classes is not None and lab not in classes:
            raise AnnotationError(file, where, f"unknown label {lab!r}; known classes: {list(classes)}")
        return lab
    raise AnnotationError(file, where, f"a label is a class index or name, got {lab!r}")


def write_datalist(
    splits: Mapping[str, Sequence[ImageAnnotation]],
    path: PathLike,
    *,
    classes: Sequence[str],
    box_mode: str | None = None,
    units: str = "voxel",
) -> Path:
    """Write ``{split: records}`` as a datalist (labels as indices into ``classes``) that :func:`read_datalist`
    reads back (exactly in voxel units; to float precision in world units). ``box_mode`` defaults to ``xyxy`` /
    ``xyzxyz`` by dimension. ``units='world'`` needs ``meta['geometry']`` on every record and writes each box's
    world (mm) extent, i.e. for an axis-aligned geometry the box itself (MONAI's LUNA16 datalists: ``cccwhd``)."""
    if units not in ("voxel", "world"):
        raise ValueError(f"write_datalist: units must be 'voxel' or 'world', got {units!r}")
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, list] = {}
    for name, recs in splits.items():
        items = []
        for r in recs:
            d = r.ndim
            mode = box_mode or ("xyxy" if d == 2 else "xyzxyz")
            if BOX_MODES.get(mode, (None,))[0] != d:
                raise ValueError(f"write_datalist: box_mode {mode!r} does not fit {d}D boxes of {r.image!r}")
            if units == "world":
                geo = r.meta.get("geometry")
                if not isinstance(geo, Geometry):
                    raise ValueError(f"write_datalist: {r.image!r} has no meta['geometry'] for world units")
                rev = _boxes_to_world(r.boxes, geo)
            else:
                rev = r.boxes[:, list(range(d - 1, -1, -1)) + list(range(2 * d - 1, d - 1, -1))]
            unknown = sorted(set(r.labels) - set(index))
            if unknown:
                raise ValueError(f"write_datalist: {r.image!r} has labels {unknown} not in classes {list(classes)}")
            items.append({"image": r.image, "box": _from_edges(rev, mode).tolist(),
                          "label": [index[lab] for lab in r.labels]})
        out[name] = items
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = ["{"]
    for k, (name, items) in enumerate(out.items()):  # one entry per line: readable and diffable
        lines.append(f" {json.dumps(name)}: [")
        lines += [f"  {json.dumps(it)}" + ("," if j < len(items) - 1 else "") for j, it in enumerate(items)]
        lines.append(" ]" + ("," if k < len(out) - 1 else ""))
    lines.append("}")
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p
