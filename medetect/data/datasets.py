"""Datasets for 2D and 3D detection, and ready loaders for the datasets in ``../shared/data``.

A :class:`DetectionDataset` turns annotation records (:class:`~medetect.data.annotations.ImageAnnotation`) into
sample dicts (see :mod:`medetect.data.transforms`): ``image [C, *S]`` float32, ``boxes [N, 2d]``, ``labels [N]``
(indices into ``classes``), ``spacing``, ``box_ids`` and ``image_id``. Images without any box are valid samples
(negatives). Labels outside ``classes`` are an error naming the image, never a silent drop. Images are read lazily
(``cache=False``) or kept in memory after the first read (``cache=True``, per worker process). A deterministic
``pre_transform`` (e.g. a fixed resize) runs once per image when caching: the cache then holds its output, not the
decoded file, so random augmentation (``transform``) starts from the prepared sample every epoch.

:class:`PatchDataset` samples fixed-size patches from large volumes (positive-aware, see
:class:`~medetect.data.transforms.RandomCrop`), ``patches_per_volume`` per volume per epoch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PureWindowsPath
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import ImageAnnotation, read_dsb2018, read_lung_pet_ct_boxes, read_mias, read_voc_folder
from .image import MedicalImage
from .io import read_image
from .transforms import RandomCrop

__all__ = [
    "DetectionDataset",
    "PatchDataset",
    "BCCD_CLASSES",
    "bccd",
    "dsb2018",
    "mini_mias",
    "lung_pet_ct_dx",
]

BCCD_CLASSES = ("RBC", "WBC", "Platelets")


def _inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing paths that leave ``root`` (annotation files are untrusted input).

    The check is lexical, on the path the annotation gives: it must be relative (no drive, no leading separator)
    and have no ``..`` component. Links are not resolved: a folder the user symlinked into the root is part of it.
    """
    s = str(rel)
    win = PureWindowsPath(s)
    parts = s.replace("\\", "/").split("/")
    if s.startswith(("/", "\\")) or win.drive or win.is_absolute() or ".." in parts:
        raise ValueError(f"image path {rel!r} leaves the dataset root {root}")
    return root / s


class DetectionDataset(Dataset):
    """Records + a root folder (+ transforms) -> sample dicts.

    Args (keyword-only):
        records: one :class:`ImageAnnotation` per image (``image`` relative to ``root``); or with ``images`` given,
            any records whose ``image`` is a key of ``images``.
        root: folder the record paths are relative to.
        classes: class names; labels are their indices. Unknown labels raise, naming image and label.
        transform: callable ``sample -> sample`` (e.g. a :class:`~medetect.data.transforms.Compose`), applied on
            every access. Like the transforms of :mod:`~medetect.data.transforms` it must not modify the tensors of
            the sample it is given in place (they may be cached).
        pre_transform: optional DETERMINISTIC callable ``sample -> sample`` applied before ``transform`` (e.g. a fixed
            resize). With ``cache=True`` its output is cached instead of the decoded image, so it runs once per image
            (and, for a downscale, the cache is smaller). ``pre_transform`` then ``transform`` gives exactly what
            ``Compose([pre_transform, transform])`` as ``transform`` would, without repeating the fixed part.
        cache: keep decoded images (or prepared samples, with ``pre_transform``) in memory after the first read.
        reader: ``path -> MedicalImage`` (default :func:`~medetect.data.io.read_image`).
        images: optional mapping record.image -> path or :class:`MedicalImage` (volumes not stored as files
            relative to root, e.g. a DICOM series folder).
    """

    def __init__(
        self,
        *,
        records: Sequence[ImageAnnotation],
        root: str | os.PathLike,
        classes: Sequence[str],
        transform: Callable | None = None,
        cache: bool = False,
        reader: Callable[[str | os.PathLike], MedicalImage] = read_image,
        images: dict | None = None,
        pre_transform: Callable | None = None,
    ):
        self.records = list(records)
        self.root = Path(root)
        self.classes = tuple(classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.pre_transform = pre_transform
        self.cache = cache
        self.reader = reader
        self.images = images or {}
        self._cache: dict[int, MedicalImage] = {}
        self._prepared: dict[int, dict] = {}
        for r in self.records:
            unknown = sorted(set(r.labels) - set(self.class_index))
            if unknown:
                raise ValueError(f"{r.image}: labels {unknown} are not among classes {list(self.classes)}")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_boxes(self) -> int:
        return sum(len(r) for r in self.records)

    def image(self, i: int) -> MedicalImage:
        """The decoded image of record ``i`` (cached with ``cache=True`` unless a ``pre_transform`` is set: then the
        prepared samples are cached instead)."""
        if i in self._cache:
            return self._cache[i]
        rec = self.records[i]
        src = self.images.get(rec.image)
        if isinstance(src, MedicalImage):
            img = src
        else:
            img = self.reader(src if src is not None else _inside(self.root, rec.image))
        if self.cache and self.pre_transform is None:
            self._cache[i] = img
        return img

    def raw_sample(self, i: int, *, dtype: torch.dtype | None = torch.float32) -> dict:
        """The sample before any transform. ``dtype=None`` keeps the image in its stored dtype (see
        :meth:`MedicalImage.to_tensor`; converting a crop of it to float32 gives the crop of the float32 image)."""
        rec = self.records[i]
        img = self.image(i)
        if rec.ndim != img.ndim:
            raise ValueError(f"{rec.image}: boxes are {rec.ndim}D but the image is {img.ndim}D")
        if rec.image_shape is not None and tuple(rec.image_shape) != tuple(img.spatial_shape):
            raise ValueError(f"{rec.image}: annotation says image shape {rec.image_shape}, file has {img.spatial_shape}")
        if dtype == torch.float32:
            image = torch.from_numpy(np.ascontiguousarray(img.array, dtype=np.float32))
        else:  # may share memory with the (cached) image: copy a read-only array (PIL's) rather than alias it
            src = img if img.array.flags.writeable else dataclasses.replace(img, array=img.array.copy())
            image = src.to_tensor(dtype)
        return {
            "image": image,
            "boxes": torch.from_numpy(rec.boxes.astype(np.float32)).reshape(-1, 2 * rec.ndim),
            "labels": torch.tensor([self.class_index[c] for c in rec.labels], dtype=torch.long),
            "box_ids": torch.arange(len(rec), dtype=torch.long),
            "spacing": tuple(img.spacing),
            "image_id": rec.image,
        }

    def preload(self, indices: Sequence[int] | None = None) -> "DetectionDataset":
        """With ``cache=True``: fill the cache now, in this process (a no-op otherwise). Call it before DataLoader
        workers start: forked workers then share the decoded (and pre-transformed) images copy-on-write instead of
        each decoding every image again and holding its own copy. Returns ``self``."""
        if self.cache:
            for i in range(len(self)) if indices is None else indices:
                if self.pre_transform is not None:
                    self.prepared_sample(i)
                else:
                    self.image(i)
        return self

    def prepared_sample(self, i: int) -> dict:
        """:meth:`raw_sample` followed by ``pre_transform`` (cached with ``cache=True``); the input of ``transform``."""
        if self.pre_transform is None:
            return self.raw_sample(i)
        s = self._prepared.get(i)
        if s is None:
            s = self.pre_transform(self.raw_sample(i))
            if self.cache:
                self._prepared[i] = s
        return dict(s)  # a new dict (the tensors are shared: transforms never modify them in place)

    def __getitem__(self, i: int) -> dict:
        sample = self.prepared_sample(i)
        return self.transform(sample) if self.transform is not None else sample


class PatchDataset(Dataset):
    """``patches_per_volume`` random patches of ``patch_size`` per volume, positive-aware (``pos_prob``).

    ``transform`` runs on the volume before cropping (e.g. resampling, windowing), ``patch_transform`` on each patch
    (augmentation). A generator seeded from ``(seed, epoch, index)`` makes the patches of an epoch reproducible.
    The epoch lives in shared memory, so :meth:`set_epoch` also reaches DataLoader worker processes that were started
    before it (``persistent_workers=True``); call it before iterating over the loader for that epoch.

    Without a volume ``transform`` (and without a ``pre_transform`` on ``base``) the volume is kept in its stored
    dtype (e.g. int16 HU: half the memory of float32) and each PATCH is converted to float32 after cropping, which
    gives exactly the values of cropping the float32 volume.
    """

    def __init__(
        self,
        base: DetectionDataset,
        *,
        patch_size: Sequence[int],
        patches_per_volume: int = 4,
        pos_prob: float = 0.5,
        min_visibility: float = 0.5,
        transform: Callable | None = None,
        patch_transform: Callable | None = None,
        seed: int = 0,
        cache_volumes: bool = True,
    ):
        self.base = base
        self.patches_per_volume = patches_per_volume
        self.crop = RandomCrop(size=tuple(patch_size), pos_prob=pos_prob, min_visibility=min_visibility)
        self.transform, self.patch_transform = transform, patch_transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self.cache_volumes = cache_volumes
        self._vol: dict[int, tuple[dict, bool]] = {}

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base) * self.patches_per_volume

    def _native_ok(self, dtype: torch.dtype) -> bool:
        """Whether cropping a ``dtype`` volume (padding with the crop's value) and then converting to float32 gives
        exactly the crop of the float32 volume."""
        if dtype in (torch.float32, torch.float64):
            return True
        if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            return False
        pad = self.crop.pad_value
        if pad == "min":
            return True
        info = torch.iinfo(dtype)
        return float(pad).is_integer() and info.min <= pad <= info.max

    def _volume(self, v: int) -> tuple[dict, bool]:
        """The (transformed) volume ``v`` and whether its image is still in the stored dtype."""
        if v in self._vol:
            return self._vol[v]
        native = self.transform is None and getattr(self.base, "pre_transform", None) is None
        if native:
            s = self.base.raw_sample(v, dtype=None)
            if not self._native_ok(s["image"].dtype):
                s["image"], native = s["image"].float(), False
        else:
            s = self.base.prepared_sample(v)
            if self.transform is not None:
                s = self.transform(s)
        if self.cache_volumes:
            self._vol[v] = (s, native)
        return s, native

    def __getitem__(self, i: int) -> dict:
        v = i // self.patches_per_volume
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
        volume, native = self._volume(v)
        patch = self.crop(volume, generator=g)
        if native:
            patch["image"] = patch["image"].float()
        return self.patch_transform(patch, generator=g) if self.patch_transform is not None else patch


# ------------------------------------------------------------------------------------------------ ready loaders


def bccd(root: str | os.PathLike, split: str, *, transform=None, cache: bool = False,
         pre_transform=None) -> DetectionDataset:
    """BCCD blood cells (Pascal VOC; RBC, WBC, Platelets). ``root`` is the VOC folder, ``split`` train/val/trainval
    (or test, where present). The 2 zero-area boxes of upstream are skipped, counted and logged by the reader."""
    records, report = read_voc_folder(root, split, classes=BCCD_CLASSES)
    ds = DetectionDataset(records=records, root=root, classes=BCCD_CLASSES, transform=transform, cache=cache,
                          pre_transform=pre_transform)
    ds.report = report
    return ds


def dsb2018(root: str | os.PathLike, split: str, *, transform=None, cache: bool = False,
            pre_transform=None) -> DetectionDataset:
    """DSB2018 nuclei (one class, boxes from instance masks)."""
    records, report = read_dsb2018(root, split)
    ds = DetectionDataset(records=records, root=root, classes=("nucleus",), transform=transform, cache=cache,
                          pre_transform=pre_transform)
    ds.report = report
    return ds


MIAS_CLASSES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM")


def mini_mias(root: str | os.PathLike, split: str, *, transform=None, cache: bool = False, lesion_only: bool = True,
              pre_transform=None, severity: bool = False) -> DetectionDataset:
    """mini-MIAS mammograms (research-only licence: read in place, never copied). Every image of the split is
    included: normal ones (no box) are negatives. ``lesion_only`` maps every abnormality class to one ``lesion``
    class (severity stays in ``meta``); otherwise the six MIAS classes. ``severity``: the classes ``benign`` and
    ``malignant`` from each finding's severity (B / M; the abnormality class stays in ``meta``), and an abnormal image
    whose findings have no location (mdb059, mdb245) is left out (not a negative; already counted in
    ``report.image_level``)."""
    import csv

    root = Path(root)
    records, report = read_mias(root / "annotations.csv", root=root)
    by_image = {r.image: r for r in records}
    ids = [l.strip() for l in open(root / f"{split}.txt") if l.strip()]
    rows = {row["image_id"]: row for row in csv.DictReader(open(root / "images.csv"))} if (root / "images.csv").exists() else {}
    out = []
    for ident in ids:
        rel = f"images/{ident}.png"
        r = by_image.get(rel) or next((v for k, v in by_image.items() if Path(k).stem == ident), None)
        row = rows.get(ident, {})
        try:  # images.csv's size when it has one (a cropped, preprocessed copy: medetect.mammo.preprocess)
            shape = (int(row["height"]), int(row["width"]))
        except (KeyError, TypeError, ValueError):
            shape = (1024, 1024)
        if r is None:
            r = ImageAnnotation(rel, np.zeros((0, 4)), [], image_shape=shape, meta={"image_label": row.get("image_label", "normal")})
        elif tuple(r.image_shape or ()) != shape:
            r = ImageAnnotation(r.image, r.boxes, r.labels, None, shape, r.meta)
        if severity:
            if r.meta.get("unlocated") and not len(r):
                continue
            sev = np.asarray(r.meta.get("severity", np.zeros(0, "<U1"))).reshape(-1)
            r = ImageAnnotation(r.image, r.boxes, ["malignant" if s == "M" else "benign" for s in sev], None,
                                r.image_shape, {**r.meta, "abnormality": list(r.labels)})
        elif lesion_only:
            r = ImageAnnotation(r.image, r.boxes, ["lesion"] * len(r), None, r.image_shape, {**r.meta, "abnormality": list(r.labels)})
        out.append(r)
    classes = ("benign", "malignant") if severity else ("lesion",) if lesion_only else MIAS_CLASSES
    ds = DetectionDataset(records=out, root=root, classes=classes, transform=transform, cache=cache,
                          pre_transform=pre_transform)
    ds.report = report
    return ds


def lung_pet_ct_dx(root: str | os.PathLike, *, transform=None) -> DetectionDataset:
    """The 2 Lung-PET-CT-Dx CTs with their 3D tumour boxes: A0001 from its npz, A0002 from its original DICOM series."""
    root = Path(root)
    records, report = read_lung_pet_ct_boxes(root)
    images = {}
    for r in records:
        # The patient id comes from the annotation files (untrusted): its paths must stay inside the root.
        npz = _inside(root, f"volumes/{r.image}.npz")
        if npz.exists():
            images[r.image] = npz
        else:
            _inside(root / "dicom", r.image)
            series = sorted((root / "dicom").glob(f"{r.image}_*"))
            if not series:
                raise FileNotFoundError(f"{root}: no npz and no DICOM series for patient {r.image}")
            images[r.image] = series[0]
    classes = tuple(sorted({c for r in records for c in r.labels}))
    ds = DetectionDataset(records=records, root=root, classes=classes, transform=transform, images=images)
    ds.report = report
    return ds
