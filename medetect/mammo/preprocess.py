"""Mammogram preprocessing: transforms that act on the image and its lesion boxes / circles
together, for PNG/PGM mammograms (mini-MIAS) and DICOM mammograms (CBIS-DDSM / INbreast style).

Steps of :class:`MammoPreprocess` (each optional except the intensity scaling), in this order:

1. **Intensity to [0, 1]** (:func:`to_unit`): a DICOM file is read by :func:`medetect.data.io.read_dicom` with
   ``voi="auto"`` (the VOI LUT Sequence, else WindowCenter/Width through pydicom's ``apply_voi`` /
   ``apply_windowing``, i.e. what ``apply_voi_lut`` does; MONOCHROME1 is inverted there so that bright = dense). Values
   without a VOI are divided by ``2**BitsStored - 1`` when the file says how many bits it stores, else by
   ``2**b - 1`` with ``b`` the smallest bit depth that holds the image's maximum (8, 10, 12, 14 or 16: a 12-bit
   mammogram in a 16-bit container reads as 12-bit), float images by their maximum.
2. **Breast mask** (:func:`breast_mask`): Otsu threshold (scikit-image) on a copy reduced to <= 256 pixels per side,
   a small opening (breaks thin bridges to film edges and labels), the LARGEST connected component, holes filled,
   back to full size. Too small a component (< ``min_breast_fraction`` of the image; an all-black or constant image)
   is :class:`NoBreastError`, one sentence naming the file.
3. **Canonical orientation** (chest wall on the LEFT, boxes flipped with the image): from the DICOM laterality
   (``ImageLaterality`` (0020,0062), else ``Laterality`` (0020,0060); ``meta["laterality"]`` of the reader, or the
   ``laterality`` argument, e.g. the ``side`` column of a mini-MIAS ``images.csv``) with the standard display
   convention: a RIGHT breast has its chest wall on the image's right -> flipped, a LEFT breast is kept. Without
   laterality the image decides: the side (left / right half) holding more breast mask is the chest wall. Both cases
   are counted in :class:`PreprocessReport` (``no_laterality``; ``laterality_disagrees`` when the tag and the image
   rule disagree: the tag is followed and a warning names the file).
4. **Pectoral muscle** (optional, ``pectoral="remove"``; :func:`pectoral_muscle`): on an MLO view the pectoral muscle
   is a bright triangle in the top chest-wall corner that looks like dense tissue to a detector. On the oriented
   image (chest wall left) the edges (Canny, scikit-image) in the top-left part of the breast vote in a straight-line
   Hough transform restricted to lines that run from the top edge down to the chest wall; of the strongest lines, the
   one whose corner triangle is brightest against a band of breast just beyond it (and covers 1-40 % of the breast)
   is the muscle boundary. The triangle leaves the breast mask (so it is zeroed with the labels). Not found (a CC
   view, a faint muscle) is counted in ``pectoral_not_found``, never an error; a lesion centre inside the removed
   triangle is kept and counted in ``lesions_in_pectoral``.
5. **Burnt-in labels and markers removed**: everything outside the breast mask is set to 0.
6. **Crop** to the mask's bounding box plus ``margin`` pixels; boxes and circle centres shift with it. A lesion whose
   centre falls outside the crop (outside the breast found) is KEPT (its box clipped to the crop) and counted in
   ``report.lesions_outside_breast`` with a warning naming the file.
7. **CLAHE** (optional, ``clahe=True``): ``skimage.exposure.equalize_adapthist`` (``clahe_clip``), the outside of the
   breast kept at 0.

:meth:`MammoResult.to_input` maps boxes on the preprocessed grid back to the input grid (exact inverse of crop and
flip). The SHIPPED detector ``mammo_mias_faster_rcnn`` was trained WITHOUT this pipeline, so ``medetect predict`` does
not apply it (a model file stores no such step); :func:`preprocess_folder` writes a preprocessed copy of a
mini-MIAS-layout folder (outside the repository: MIAS is research only) on which a detector can be trained and scored
with the ordinary commands.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["NoBreastError", "PreprocessReport", "MammoResult", "MammoPreprocess", "to_unit", "breast_mask",
           "chest_wall_side", "pectoral_muscle", "preprocess_folder"]

logger = logging.getLogger(__name__)


class NoBreastError(ValueError):
    """No breast found in a mammogram (all black, constant, or no component large enough)."""


@dataclass
class PreprocessReport:
    """Counts (and ``events``: ``(file, reason)``) of what the preprocessing decided besides the images."""

    images: int = 0
    flipped: int = 0
    laterality_from_tag: int = 0
    no_laterality: int = 0
    laterality_disagrees: int = 0
    lesions_outside_breast: int = 0
    pectoral_found: int = 0
    pectoral_not_found: int = 0
    lesions_in_pectoral: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)

    def _event(self, counter: str, where: str, reason: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        self.events.append((where, reason))
        logger.warning("%s: %s", where, reason)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("images", "flipped", "laterality_from_tag", "no_laterality",
                                               "laterality_disagrees", "lesions_outside_breast",
                                               "pectoral_found", "pectoral_not_found", "lesions_in_pectoral")}


@dataclass
class MammoResult:
    """A preprocessed mammogram: ``image`` float32 ``[H', W']`` in [0, 1], ``mask`` (bool, same grid), the lesion
    ``boxes`` ``[N, 4]`` ``(y0, x0, y1, x1)`` and ``centres`` ``[N, 2]`` ``(y, x)`` on that grid, and the mapping:
    ``flipped`` (left-right, applied first), ``offset`` ``(y0, x0)`` of the crop in the (flipped) input,
    ``input_shape``; ``chest_wall`` (``"left"``/``"right"``: where it was in the input) and ``source``
    (``"tag"``/``"image"``: what decided it); ``pectoral``: the removed pectoral muscle (bool, same grid as
    ``image``) with ``pectoral="remove"`` when one was found, else None."""

    image: np.ndarray
    mask: np.ndarray
    boxes: np.ndarray
    centres: np.ndarray
    flipped: bool
    offset: tuple[int, int]
    input_shape: tuple[int, int]
    chest_wall: str
    source: str
    pectoral: np.ndarray | None = None

    def to_input(self, boxes) -> np.ndarray:
        """Boxes ``[N, 4]`` on the preprocessed grid -> the input grid (undo the crop, then the flip)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + np.array(self.offset * 2, dtype=np.float64)
        if self.flipped:
            w = self.input_shape[1]
            b = np.stack([b[:, 0], w - b[:, 3], b[:, 2], w - b[:, 1]], axis=1)
        return b


# ============================================================================================ steps


def to_unit(image, meta: dict | None = None) -> np.ndarray:
    """A 2D grey image (``[H, W]`` or ``[1, H, W]`` array, or a :class:`~medetect.data.image.MedicalImage`) ->
    float32 ``[H, W]`` in [0, 1] (module docstring, step 1)."""
    if hasattr(image, "array") and hasattr(image, "meta"):
        meta = {**(image.meta or {}), **(meta or {})}
        image = image.array
    meta = meta or {}
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # an RGB(A) picture of a mammogram: luminance
        a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2:
        raise ValueError(f"a mammogram is one 2D grey image, got an array of shape {tuple(np.shape(image))}")
    if meta.get("voi") and a.dtype.kind == "f" and float(a.min()) >= 0 and float(a.max()) <= 1:
        return a.astype(np.float32)  # the DICOM reader applied a VOI: already [0, 1]
    if a.dtype.kind in "iu" or (a.dtype.kind == "f" and meta.get("bits_stored")):
        bits = meta.get("bits_stored")
        if not bits:
            top = max(int(a.max()), 1)
            bits = next((b for b in (8, 10, 12, 14, 16) if top < 2**b), int(math.ceil(math.log2(top + 1))))
        a = a.astype(np.float32) / float(2 ** int(bits) - 1)
        return np.clip(a, 0.0, 1.0)
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        a = (a - min(lo, 0.0)) / (hi - min(lo, 0.0)) if hi > min(lo, 0.0) else np.zeros_like(a)
    return a


def _reduction(shape) -> int:
    """The integer factor that brings a mammogram to <= 256 pixels per side."""
    return max(1, int(math.ceil(max(shape) / 256)))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """``a`` reduced by ``f`` on both axes (mean of f x f blocks; the rows / columns past a multiple of f dropped)."""
    if f == 1:
        return a
    hs, ws = a.shape[0] // f, a.shape[1] // f
    return a[: hs * f, : ws * f].reshape(hs, f, ws, f).mean(axis=(1, 3))


def breast_mask(img: np.ndarray, *, min_breast_fraction: float = 0.02, where: str = "<image>") -> np.ndarray:
    """The breast: Otsu + opening + largest connected component + filled holes (module docstring, step 2)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.transform import resize

    h, w = img.shape
    f = _reduction(img.shape)
    small = _block_mean(img, f)
    if float(small.max()) - float(small.min()) < 1e-6:
        raise NoBreastError(f"{where}: no breast found: the image is constant ({float(img.max()):g} everywhere; "
                            "all black?)")
    m = small > threshold_otsu(small)
    m = ndimage.binary_opening(m, structure=np.ones((3, 3), bool), iterations=1)
    lab = label(m, connectivity=2)
    if lab.max() == 0:
        raise NoBreastError(f"{where}: no breast found: nothing above the Otsu threshold survives the opening")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    big = lab == int(sizes.argmax())
    if sizes.max() < min_breast_fraction * lab.size:
        raise NoBreastError(f"{where}: no breast found: the largest bright region covers "
                            f"{100 * sizes.max() / lab.size:.1f}% of the image (< {100 * min_breast_fraction:g}%)")
    big = ndimage.binary_fill_holes(big)
    if f > 1:
        big = resize(big.astype(np.float32), (small.shape[0] * f, small.shape[1] * f), order=0,
                     anti_aliasing=False) > 0.5
        full = np.zeros((h, w), bool)
        full[: big.shape[0], : big.shape[1]] = big
        if big.shape[0] < h:  # the few rows / columns cut off by the reduction copy their neighbour
            full[big.shape[0]:, : big.shape[1]] = big[-1:, :]
        if big.shape[1] < w:
            full[:, big.shape[1]:] = full[:, big.shape[1] - 1: big.shape[1]]
        big = full
    return big


def chest_wall_side(mask: np.ndarray) -> str:
    """``"left"`` or ``"right"``: the half of the image holding more breast (the chest wall side)."""
    w = mask.shape[1]
    left = int(mask[:, : w // 2].sum())
    right = int(mask[:, w - w // 2:].sum())
    return "left" if left >= right else "right"


def pectoral_muscle(img: np.ndarray, mask: np.ndarray, *, max_fraction: float = 0.4, min_fraction: float = 0.01,
                    min_contrast: float = 0.03, peaks: int = 8) -> np.ndarray | None:
    """The pectoral muscle of an oriented MLO mammogram (chest wall on the LEFT; module docstring, step 4): a bool
    mask on ``img``'s grid, or None when no line qualifies. Works on a copy reduced to <= 256 pixels per side."""
    from scipy import ndimage
    from skimage.feature import canny
    from skimage.transform import hough_line, hough_line_peaks

    h, w = img.shape
    f = _reduction(img.shape)
    small = _block_mean(img, f)
    m = _block_mean(mask.astype(np.float32), f) > 0.5
    hs, ws = small.shape
    if m.sum() < 64:
        return None
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    y0, x0 = int(rows[0]), int(cols[0])
    bh, bw = int(rows[-1]) + 1 - y0, int(cols[-1]) + 1 - x0
    inner = ndimage.binary_erosion(m, iterations=3)  # not the skin line
    edges = canny(small, sigma=2.0, mask=inner)
    roi = np.zeros_like(edges)
    roi[y0: y0 + int(0.7 * bh), x0: x0 + int(0.7 * bw)] = True
    edges &= roi
    if edges.sum() < 10:
        return None
    # lines x cos t + y sin t = r (origin at the breast's top-left corner) with the normal pointing into the breast
    thetas = np.deg2rad(np.linspace(8.0, 75.0, 68))
    acc, ang, dist = hough_line(edges[y0:, x0:], theta=thetas)
    _, angles, dists = hough_line_peaks(acc, ang, dist, num_peaks=peaks, threshold=0.2 * acc.max())
    yy, xx = np.mgrid[0: hs - y0, 0: ws - x0]
    sub_m, sub_img = m[y0:, x0:], small[y0:, x0:]
    area = float(sub_m.sum())
    best, best_contrast = None, min_contrast
    band = max(3.0, 0.04 * max(bh, bw))
    for t, r in zip(angles, dists):
        if r <= 0:
            continue
        a, b = r / math.cos(t), r / math.sin(t)  # where the line meets the top row and the chest-wall column
        if not (a < 0.9 * bw and b < 0.95 * bh):
            continue
        side = xx * math.cos(t) + yy * math.sin(t) - r
        tri = (side < 0) & sub_m
        frac = tri.sum() / area
        if not (min_fraction <= frac <= max_fraction):
            continue
        beyond = (side >= 0) & (side < band) & sub_m
        if beyond.sum() < 10:
            continue
        contrast = float(sub_img[tri].mean() - sub_img[beyond].mean())
        if contrast > best_contrast:
            best, best_contrast = tri, contrast
    if best is None:
        return None
    out = np.zeros((hs, ws), bool)
    out[y0:, x0:] = best
    full = np.zeros((h, w), bool)
    full[: hs * f, : ws * f] = np.repeat(np.repeat(out, f, axis=0), f, axis=1)
    return full & mask


def _laterality_side(lat) -> str | None:
    s = str(lat or "").strip().upper()
    if s in ("R", "RIGHT"):
        return "right"
    if s in ("L", "LEFT"):
        return "left"
    return None


# ============================================================================================ the transform


class MammoPreprocess:
    """The pipeline of the module docstring. ``__call__(image, boxes=None, centres=None, *, laterality=None,
    where=None, report=None) -> MammoResult``; ``image`` is an array or a ``MedicalImage`` (DICOM meta: ``voi``,
    ``bits_stored``, ``laterality``); ``boxes`` ``[N, 4]`` ``(y0, x0, y1, x1)``; ``centres`` ``[N, 2]`` ``(y, x)`` (a
    lesion's centre; default: the box centres)."""

    def __init__(self, *, orient: bool = True, remove_labels: bool = True, crop: bool = True, margin: int = 8,
                 clahe: bool = False, clahe_clip: float = 0.01, min_breast_fraction: float = 0.02,
                 pectoral: str = "keep") -> None:
        if pectoral not in ("keep", "remove"):
            raise ValueError(f"pectoral must be 'keep' or 'remove', got {pectoral!r}")
        if pectoral == "remove" and not orient:
            raise ValueError("pectoral='remove' needs orient=True (the muscle is looked for at the chest wall, left)")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if not 0 < clahe_clip <= 1:
            raise ValueError(f"clahe_clip must be in (0, 1], got {clahe_clip}")
        if not 0 <= min_breast_fraction < 1:
            raise ValueError(f"min_breast_fraction must be in [0, 1), got {min_breast_fraction}")
        self.orient, self.remove_labels, self.crop, self.margin = orient, remove_labels, crop, int(margin)
        self.clahe, self.clahe_clip, self.min_breast_fraction = clahe, float(clahe_clip), float(min_breast_fraction)
        self.pectoral = pectoral

    def __repr__(self) -> str:
        return (f"MammoPreprocess(orient={self.orient}, remove_labels={self.remove_labels}, crop={self.crop}, "
                f"margin={self.margin}, clahe={self.clahe}, clahe_clip={self.clahe_clip}, pectoral={self.pectoral!r})")

    def __call__(self, image, boxes=None, centres=None, *, laterality=None, where: str | None = None,
                 report: PreprocessReport | None = None) -> MammoResult:
        meta = dict(getattr(image, "meta", None) or {})
        where = where or getattr(image, "path", None) or "<image>"
        report = report if report is not None else PreprocessReport()
        img = to_unit(image)
        h, w = img.shape
        b = np.zeros((0, 4), np.float64) if boxes is None else np.asarray(boxes, np.float64).reshape(-1, 4)
        c = (b[:, :2] + b[:, 2:]) / 2 if centres is None else np.asarray(centres, np.float64).reshape(-1, 2)
        if len(c) != len(b):
            raise ValueError(f"{where}: {len(b)} boxes but {len(c)} centres")
        mask = breast_mask(img, min_breast_fraction=self.min_breast_fraction, where=where)
        report.images += 1
        from_image = chest_wall_side(mask)
        side, source = from_image, "image"
        tag = _laterality_side(laterality if laterality is not None else meta.get("laterality"))
        if tag is not None:
            side, source = tag, "tag"
            report.laterality_from_tag += 1
            if tag != from_image:
                report._event("laterality_disagrees", where, f"laterality says the chest wall is on the {tag}, the "
                              f"breast mass is on the {from_image}: the tag is followed")
        else:
            report._event("no_laterality", where, f"no laterality: the chest wall is taken on the {from_image} "
                          "(the side with more breast)")
        flipped = bool(self.orient and side == "right")
        if flipped:
            report.flipped += 1
            img, mask = img[:, ::-1].copy(), mask[:, ::-1].copy()
            b = np.stack([b[:, 0], w - b[:, 3], b[:, 2], w - b[:, 1]], axis=1)
            c = np.stack([c[:, 0], w - c[:, 1]], axis=1)
        pec = None
        if self.pectoral == "remove":
            pec = pectoral_muscle(img, mask)
            if pec is None:
                report._event("pectoral_not_found", where, "no pectoral muscle found (a CC view or a faint muscle): "
                              "nothing removed")
            else:
                report.pectoral_found += 1
                mask = mask & ~pec
                if len(c):
                    yi = np.clip(np.floor(c[:, 0]).astype(int), 0, h - 1)
                    xi = np.clip(np.floor(c[:, 1]).astype(int), 0, w - 1)
                    for j in np.nonzero(pec[yi, xi])[0]:
                        report._event("lesions_in_pectoral", where, f"lesion {j} (centre y {c[j, 0]:.0f}, x "
                                      f"{c[j, 1]:.0f}) lies in the pectoral muscle found: kept")
        if self.remove_labels:
            img = np.where(mask, img, 0.0).astype(np.float32)
        y0 = x0 = 0
        if self.crop:
            ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            y0, y1 = max(0, int(ys[0]) - self.margin), min(h, int(ys[-1]) + 1 + self.margin)
            x0, x1 = max(0, int(xs[0]) - self.margin), min(w, int(xs[-1]) + 1 + self.margin)
            img, mask = img[y0:y1, x0:x1], mask[y0:y1, x0:x1]
            pec = None if pec is None else pec[y0:y1, x0:x1]
            off = np.array([y0, x0] * 2, np.float64)
            b, c = b - off, c - off[:2]
        hh, ww = img.shape
        if len(c):
            yi = np.clip(np.floor(c[:, 0]).astype(int), 0, hh - 1)
            xi = np.clip(np.floor(c[:, 1]).astype(int), 0, ww - 1)
            breast = mask if pec is None else mask | pec  # a lesion in the removed muscle is counted there
            inside = (c[:, 0] >= 0) & (c[:, 0] < hh) & (c[:, 1] >= 0) & (c[:, 1] < ww) & breast[yi, xi]
            for j in np.nonzero(~inside)[0]:
                report._event("lesions_outside_breast", where, f"lesion {j} (centre y {c[j, 0]:.0f}, x {c[j, 1]:.0f} "
                              "after preprocessing) lies outside the breast found: kept, box clipped to the crop")
            b = np.clip(b, 0, np.array([hh, ww, hh, ww], np.float64))
        if self.clahe:
            from skimage.exposure import equalize_adapthist

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eq = equalize_adapthist(img, clip_limit=self.clahe_clip).astype(np.float32)
            img = np.where(mask, eq, 0.0).astype(np.float32) if self.remove_labels else eq
        return MammoResult(np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(mask), b, c, flipped,
                           (y0, x0), (h, w), from_image if source == "image" else side, source,
                           None if pec is None else np.ascontiguousarray(pec))


# ============================================================================================ a folder


def preprocess_folder(src, dst, pre: MammoPreprocess | None = None, *, splits=None, use_side: bool = True) -> dict:
    """A mini-MIAS-layout folder ``src`` -> the same layout in ``dst`` with every image preprocessed (8-bit PNG) and
    the lesion rows of ``annotations.csv`` mapped with it (``cx``, ``cy``, the box, radius unchanged; ``x_mias`` /
    ``y_mias`` blanked since they no longer apply). ``images.csv`` gets the new ``width``/``height`` and the columns
    ``flipped``, ``offset_y``, ``offset_x``. ``use_side``: the ``side`` column (L / R) is the laterality, as a DICOM
    tag would be. Returns the :class:`PreprocessReport` as a dict (also written to ``dst/preprocess_report.json``).
    ``dst`` must not be inside a git repository's tracked data (MIAS is research only): the caller chooses it."""
    import json

    from PIL import Image

    from ..data.io import read_image

    src, dst = Path(src), Path(dst)
    if not (src / "images.csv").is_file() or not (src / "annotations.csv").is_file():
        raise FileNotFoundError(f"{src}: not a mini-MIAS-layout folder (needs images.csv and annotations.csv)")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the output folder must differ from the input folder")
    pre = pre or MammoPreprocess()
    report = PreprocessReport()
    with open(src / "images.csv", newline="", encoding="utf-8-sig") as fh:
        r = csv.DictReader(fh)
        img_cols, img_rows = list(r.fieldnames or []), list(r)
    with open(src / "annotations.csv", newline="", encoding="utf-8-sig") as fh:
        r = csv.DictReader(fh)
        ann_cols, ann_rows = list(r.fieldnames or []), list(r)
    if splits is not None:
        keep = set(splits)
        img_rows = [row for row in img_rows if row.get("split") in keep]
    by_image: dict[str, list[dict]] = {}
    for row in ann_rows:
        by_image.setdefault(row["image_id"], []).append(row)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    out_rows, out_ann = [], []
    for row in img_rows:
        iid = row["image_id"]
        path = src / row["file"]
        anns = by_image.get(iid, [])
        loc_idx = [i for i, a in enumerate(anns) if a.get("has_location", "").strip() == "1"]
        located = [anns[i] for i in loc_idx]
        boxes = np.array([[float(a["ymin"]), float(a["xmin"]), float(a["ymax"]), float(a["xmax"])] for a in located],
                         np.float64).reshape(-1, 4)
        centres = np.array([[float(a["cy"]), float(a["cx"])] for a in located], np.float64).reshape(-1, 2)
        res = pre(read_image(path), boxes, centres, laterality=row.get("side") if use_side else None,
                  where=str(path), report=report)
        name = f"images/{iid}.png"
        Image.fromarray(np.round(res.image * 255).astype(np.uint8)).save(dst / name)
        new = dict(row, file=name, width=str(res.image.shape[1]), height=str(res.image.shape[0]),
                   flipped=str(int(res.flipped)), offset_y=str(res.offset[0]), offset_x=str(res.offset[1]))
        out_rows.append(new)
        for i, a in enumerate(anns):
            a = dict(a)
            if i in loc_idx:
                j = loc_idx.index(i)
                (cy, cx), (y0, x0, y1, x1) = res.centres[j], res.boxes[j]
                a.update(cx=f"{cx:g}", cy=f"{cy:g}", xmin=f"{x0:g}", ymin=f"{y0:g}", xmax=f"{x1:g}", ymax=f"{y1:g}",
                         x_mias="", y_mias="")
            out_ann.append(a)
    for extra in ("flipped", "offset_y", "offset_x"):
        if extra not in img_cols:
            img_cols.append(extra)
    _write_csv(dst / "images.csv", img_cols, out_rows)
    _write_csv(dst / "annotations.csv", ann_cols, out_ann)
    for s in {row.get("split") for row in out_rows} - {None, ""}:
        (dst / f"{s}.txt").write_text("\n".join(row["image_id"] for row in out_rows if row.get("split") == s) + "\n")
    for extra in ("Licence.txt",):
        if (src / extra).is_file():
            (dst / extra).write_bytes((src / extra).read_bytes())
    rep = {**report.to_dict(), "preprocess": repr(pre), "source": os.fspath(src)}
    (dst / "preprocess_report.json").write_text(json.dumps({**rep, "events": report.events}, indent=1) + "\n")
    return rep


def _write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
