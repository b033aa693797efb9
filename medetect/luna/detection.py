"""LUNA16-style lung nodule detection, stage one (candidate detection with a 3D detector).

Pipeline::

    LunaLayout(root)                      subset*/<uid>.mhd|.raw, annotations.csv (world mm), optional candidates.csv,
                                          annotations_excluded.csv, seriesuids.csv; geometry per scan; voxel boxes
    LunaPreprocess(spacing, hu window)    resample to ``spacing`` mm (array order z, y, x) + lung window -> [0, 1]
    preprocess_scan(..., cache_dir)       the same, cached as float16 .npy per (scan, preprocessing)
    train_detector(layout, run_dir, ...)  PatchDataset (positive oversampling ``pos_prob``, flips, rot90) + Trainer
    predict_scan(model, pre, image)       tiled sliding-window inference (Predictor) -> boxes on the resampled grid
                                          -> ORIGINAL voxel grid (/ zoom) -> world mm (convert.boxes_to_luna)
    write_submission(path, marks)         seriesuid,coordX,coordY,coordZ,probability; <= 100 marks per scan
    evaluate_submission(layout, csv)      exact LUNA16 FROC / CPM (medetect.evaluation.froc)

Coordinates. Boxes are medetect boxes (array order ``z, y, x``, edge convention, half-open). Resampling by
:func:`medetect.data.transforms.resample` scales edge coordinates exactly by ``zoom = spacing / target`` per axis, so
a box ``b`` on the resampled grid is ``b / zoom`` on the original grid; :func:`medetect.convert.boxes_to_luna` then
gives the world centre, whatever the direction cosines and however anisotropic the original spacing is.

Hard negatives. With the default RetinaNet head every anchor of every patch enters the sigmoid focal loss (alpha 0.25,
gamma 2): easy background is down-weighted and the hard negatives (vessels, which look like nodules slice by slice)
dominate the negative term; there is no explicit mining step. With ``arch="faster_rcnn"`` the RPN uses
``rpn_objectness_loss="focal"`` over all anchors for the same effect, or, with ``--hard-negatives``
(``rpn_negative_sampling="hard"``), explicit hard negative mining: each RPN minibatch takes the positives and fills up
with the highest-loss negative anchors.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..convert import Geometry, luna_to_boxes, voxel_to_world, world_to_voxel
from ..data.annotations import WorldPoints, read_world_points, write_world_points
from ..data.image import MedicalImage
from ..data.io import read_image
from ..data.transforms import Compose, HUWindow, RandomFlip, RandomRot90
from ..models.detector import Detector, DetectorConfig, build_detector
from ..models.io import CT_VALUE_RANGE  # raw HU the CT models accept (outside-FOV padding included)

__all__ = [
    "LunaLayout",
    "LunaPreprocess",
    "LunaVolumes",
    "default_detector_config",
    "preprocess_scan",
    "train_detector",
    "save_luna_model",
    "load_luna_model",
    "predict_scan",
    "predict_layout",
    "write_submission",
    "evaluate_submission",
    "lung_pet_ct_smoke",
    "time_inference",
]

log = logging.getLogger(__name__)

MAX_MARKS_PER_SCAN = 100
MIN_INPUT = 64  # smallest input side given to the detector at inference (zero = air padding at the high end)
CLASS_NAME = "nodule"


# ============================================================================================ layout


class LunaLayout:
    """A LUNA16 folder: ``subset*/<seriesuid>.mhd`` (+ ``.raw``) and the CSV files at its top level.

    Args:
        root: the LUNA16 folder.
        annotations: file name (or path) of the nodule list; ``None`` or a missing file means no annotations (e.g. a
            folder to predict on).
        allow_missing_scans: by default an annotation whose seriesuid has no scan in the folder is an error naming the
            CSV line, unless ``seriesuids.csv`` lists the uid (then the scan is just not downloaded: recorded in
            ``missing``). True records every such uid in ``missing`` instead (e.g. only subset0 downloaded).

    Attributes: ``root``, ``paths`` (uid -> .mhd), ``subset_of`` (uid -> subset folder name), ``nodule_points``
    (the nodules as one :class:`~medetect.data.annotations.WorldPoints`, with CSV line numbers; empty without an
    annotations file) and its per-scan views ``annotations`` (uid -> (centres_xyz [N, 3], diameters [N])) and
    ``lines`` (uid -> CSV line numbers of those rows), ``excluded`` (a ``WorldPoints`` of
    ``annotations_excluded.csv``, diameters -1 allowed, or None), ``candidate_points`` (``candidates.csv`` as a
    ``WorldPoints`` with labels, or None) and its view ``candidates`` (uid -> (centres, classes), or None),
    ``seriesuids`` (list from seriesuids.csv, or None), ``annotations_path``, ``excluded_path``. All CSV files are
    read by :func:`~medetect.data.annotations.read_world_points` (errors name the file and line).
    """

    def __init__(self, root: str | os.PathLike, *, annotations: str | os.PathLike | None = "annotations.csv",
                 allow_missing_scans: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"LUNA16 folder not found: {self.root}")
        self.paths: dict[str, Path] = {}
        self.subset_of: dict[str, str] = {}
        for sub in sorted(p for p in self.root.glob("subset*") if p.is_dir()):
            for mhd in sorted(sub.glob("*.mhd")):
                uid = mhd.name[: -len(".mhd")]
                if uid in self.paths:
                    raise ValueError(f"{mhd}: seriesuid {uid} also in {self.paths[uid]}")
                self.paths[uid] = mhd
                self.subset_of[uid] = sub.name
        self._info: dict[str, tuple[Geometry, tuple[int, ...]]] = {}
        sfile = self.root / "seriesuids.csv"
        self.seriesuids = None
        if sfile.is_file():
            with open(sfile, newline="") as fh:
                self.seriesuids = [r[0].strip() for r in csv.reader(fh) if r and r[0].strip()]
        self.annotations_path = None
        self.nodule_points = WorldPoints.from_arrays(np.zeros(0, dtype=str), np.zeros((0, 3)), diameters=np.zeros(0))
        self.missing: list[str] = []
        if annotations is not None:
            a = Path(annotations)
            a = a if a.is_absolute() or a.exists() else self.root / a
            if a.is_file():
                self.annotations_path = a
                # "excluded" rules: a -1 diameter (a finding without a size) is accepted, as read_luna_csv did
                self.nodule_points = read_world_points(a, "excluded")
        per_scan = self.nodule_points.by_uid()
        self.annotations: dict[str, tuple[np.ndarray, np.ndarray]] = {u: (p.centres, p.diameters)
                                                                       for u, p in per_scan.items()}
        self.lines: dict[str, list[int]] = {u: p.lines.tolist() for u, p in per_scan.items()}
        if self.annotations_path is not None:
            self._check_uids(self.annotations_path, self.annotations, self.lines, allow_missing_scans)
        self.excluded_path = self.root / "annotations_excluded.csv"
        self.excluded: WorldPoints | None = None
        if self.excluded_path.is_file():
            self.excluded = read_world_points(self.excluded_path, "excluded")  # -1 diameters are legal here
        else:
            self.excluded_path = None
        cfile = self.root / "candidates.csv"
        self.candidate_points = read_world_points(cfile, "candidates") if cfile.is_file() else None
        self.candidates = None if self.candidate_points is None else self.candidate_points.to_dict("labels")

    def _check_uids(self, path: Path, rows, lines, allow_missing: bool) -> None:
        listed = set(self.seriesuids or ())
        for uid in rows:
            if uid in self.paths:
                continue
            if allow_missing or uid in listed:
                self.missing.append(uid)
                continue
            raise ValueError(
                f"{path} line {lines[uid][0]}: seriesuid {uid} has no scan subset*/{uid}.mhd under {self.root}"
                + (" and is not in seriesuids.csv" if self.seriesuids is not None else "")
                + " (pass allow_missing_scans=True if only some subsets are present)")
        if self.missing:
            log.info("%s: %d annotated scans are not in the folder (skipped)", path, len(self.missing))

    # ------------------------------------------------------------------ scans
    @property
    def uids(self) -> list[str]:
        return list(self.paths)

    def subsets(self) -> dict[str, list[str]]:
        """Subset folder name -> its seriesuids (sorted by subset name), for cross-validation by subset."""
        out: dict[str, list[str]] = {}
        for uid, s in self.subset_of.items():
            out.setdefault(s, []).append(uid)
        return dict(sorted(out.items()))

    def uids_in(self, subsets: Sequence[str | int]) -> list[str]:
        """Uids of the given subsets (``"subset3"`` or ``3``)."""
        names = {s if isinstance(s, str) and s.startswith("subset") else f"subset{int(s)}" for s in subsets}
        unknown = names - set(self.subsets())
        if unknown:
            raise ValueError(f"{self.root}: no subset folder {sorted(unknown)}; found {list(self.subsets())}")
        return [u for u, s in self.subset_of.items() if s in names]

    def folds(self) -> list[tuple[list[str], list[str]]]:
        """Leave-one-subset-out folds ``(train_uids, test_uids)`` (LUNA16's 10-fold CV with 10 subsets)."""
        subs = self.subsets()
        return [([u for t, us in subs.items() if t != s for u in us], subs[s]) for s in subs]

    def path(self, uid: str) -> Path:
        if uid not in self.paths:
            raise KeyError(f"unknown seriesuid {uid!r}: no subset*/{uid}.mhd under {self.root}")
        return self.paths[uid]

    def info(self, uid: str) -> tuple[Geometry, tuple[int, ...]]:
        """(geometry, array shape z, y, x) from the header only; checks that the pixel data file exists."""
        if uid not in self._info:
            import SimpleITK as sitk

            from ..data.io import _check_metaio

            p = self.path(uid)
            _check_metaio(p)  # missing/truncated .raw -> error naming the file
            r = sitk.ImageFileReader()
            r.SetFileName(str(p))
            r.ReadImageInformation()
            if r.GetDimension() != 3:
                raise ValueError(f"{p}: LUNA16 scans are 3D, this one is {r.GetDimension()}D")
            g = Geometry(tuple(reversed(r.GetSpacing())), tuple(r.GetOrigin()), tuple(r.GetDirection()))
            self._info[uid] = (g, tuple(reversed(r.GetSize())))
        return self._info[uid]

    def geometry(self, uid: str) -> Geometry:
        return self.info(uid)[0]

    def shape(self, uid: str) -> tuple[int, ...]:
        return self.info(uid)[1]

    def read(self, uid: str) -> MedicalImage:
        """The scan as a :class:`MedicalImage` (array ``[1, Z, Y, X]`` HU)."""
        return read_image(self.path(uid))

    def nodules(self, uid: str) -> tuple[np.ndarray, np.ndarray]:
        self.path(uid)
        c, d = self.annotations.get(uid, (np.zeros((0, 3)), np.zeros(0)))
        return np.asarray(c, dtype=np.float64).reshape(-1, 3), np.asarray(d, dtype=np.float64).reshape(-1)

    def boxes(self, uid: str) -> np.ndarray:
        """Voxel boxes ``[N, 6]`` (z0, y0, x0, z1, y1, x1) on the ORIGINAL grid via :func:`convert.luna_to_boxes`.

        A nodule whose centre lies outside the volume is an error naming the CSV line; a box reaching past the border
        is clipped to the volume.
        """
        centres, dia = self.nodules(uid)
        geom, shape = self.info(uid)
        boxes = np.asarray(luna_to_boxes(centres, dia, geom), dtype=np.float64).reshape(-1, 6)
        ctr = np.asarray(world_to_voxel(centres, geom)).reshape(-1, 3)
        n = np.asarray(shape, dtype=np.float64)
        bad = ~((ctr >= 0) & (ctr <= n)).all(1)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            line = self.lines.get(uid, [None] * len(dia))[k]
            where = f"{self.annotations_path} line {line}" if line is not None else f"nodule {k}"
            raise ValueError(
                f"{where}: nodule of {uid} at world (x, y, z) = {tuple(np.round(centres[k], 2))} mm lies outside "
                f"the volume {self.path(uid)} (voxel centre z, y, x = {tuple(np.round(ctr[k], 1))}, shape {shape}); "
                "wrong seriesuid or geometry?")
        return np.concatenate([np.clip(boxes[:, :3], 0, n), np.clip(boxes[:, 3:], 0, n)], 1)


# ============================================================================================ preprocessing


@dataclasses.dataclass
class LunaPreprocess:
    """Resample to ``spacing`` mm (one number = isotropic, else z, y, x) and window HU ``[hu_lo, hu_hi]`` -> [0, 1]."""

    spacing: float | tuple[float, float, float] = 1.0
    hu_lo: float = -1000.0
    hu_hi: float = 400.0
    pyramid: tuple[float, ...] = ()  # extra coarser levels (zoom factors in (0, 1)); see Preprocess.pyramid
    pyramid_min_size: float = 0.0  # voxels (of a coarser level) below which its detections are dropped

    def target(self) -> tuple[float, float, float]:
        s = self.spacing
        t = (float(s),) * 3 if isinstance(s, (int, float)) else tuple(float(v) for v in s)
        if len(t) != 3 or not all(v > 0 for v in t):
            raise ValueError(f"LunaPreprocess.spacing must be a positive number or 3 numbers (z, y, x), got {s}")
        return t

    def zoom(self, geometry: Geometry) -> tuple[float, float, float]:
        """Resampled voxels per original voxel, per array axis (what :func:`transforms.resample` applies)."""
        return tuple(o / t for o, t in zip(geometry.spacing, self.target()))

    def key(self) -> str:
        return "sp" + "x".join(f"{v:g}" for v in self.target()) + f"_hu{self.hu_lo:g}_{self.hu_hi:g}"

    def __call__(self, volume, geometry: Geometry) -> tuple[torch.Tensor, tuple[float, float, float]]:
        """HU volume ``[Z, Y, X]`` or ``[1, Z, Y, X]`` -> (float32 ``[1, Z', Y', X']`` in [0, 1], zoom): the one
        preprocessing path (:func:`medetect.data.preprocess.prepare`) with :meth:`as_preprocess`."""
        from ..data.preprocess import prepare

        a = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[0] != 1:
            raise ValueError(f"expected a CT volume [Z, Y, X] or [1, Z, Y, X], got shape {tuple(a.shape)}")
        if geometry.ndim != 3:
            raise ValueError(f"expected a 3D geometry, got {geometry.ndim}D")
        p = prepare(MedicalImage(a, geometry), self.as_preprocess())
        return p.tensor, self.zoom(geometry)

    def as_preprocess(self):
        """The same preprocessing as a stored :class:`medetect.models.io.Preprocess` (resample to ``spacing``, HU
        window ``[hu_lo, hu_hi]`` -> [0, 1])."""
        from ..models.io import Preprocess

        HUWindow(lo=self.hu_lo, hi=self.hu_hi)  # validates the window
        return Preprocess(ndim=3, channels=1, spacing=list(self.target()), window=[self.hu_lo, self.hu_hi],
                          value_range=list(CT_VALUE_RANGE), pyramid=[float(f) for f in self.pyramid] or None,
                          pyramid_min_size=float(self.pyramid_min_size))

    def levels(self) -> list["LunaPreprocess"]:
        """This preprocessing and one per pyramid level (the same window, spacing divided by the level's zoom)."""
        return [self] + [LunaPreprocess(spacing=tuple(t / f for t in self.target()), hu_lo=self.hu_lo,
                                        hu_hi=self.hu_hi) for f in self.pyramid]

    @classmethod
    def from_preprocess(cls, pre) -> "LunaPreprocess":
        """The inverse of :meth:`as_preprocess` (a 3D, 1-channel, windowed and resampled :class:`Preprocess`)."""
        if pre.ndim != 3 or pre.channels != 1 or pre.window is None or pre.spacing is None:
            raise ValueError("a LUNA16 nodule detector needs a 3D, 1-channel preprocess with spacing and HU window")
        return cls(spacing=tuple(pre.spacing), hu_lo=pre.window[0], hu_hi=pre.window[1],
                   pyramid=tuple(pre.pyramid or ()), pyramid_min_size=float(pre.pyramid_min_size))

    def to_dict(self) -> dict:
        d = {"spacing": list(self.target()), "hu_lo": self.hu_lo, "hu_hi": self.hu_hi}
        if self.pyramid:
            d["pyramid"] = [float(f) for f in self.pyramid]
            d["pyramid_min_size"] = float(self.pyramid_min_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "LunaPreprocess":
        return cls(spacing=tuple(d["spacing"]), hu_lo=float(d["hu_lo"]), hu_hi=float(d["hu_hi"]),
                   pyramid=tuple(d.get("pyramid", ())), pyramid_min_size=float(d.get("pyramid_min_size", 0.0)))


def resampled_geometry(geometry: Geometry, pre: LunaPreprocess) -> Geometry:
    """Geometry of the resampled grid (same direction; voxel 0's centre is original edge coordinate ``0.5 / zoom``)."""
    z = np.asarray(pre.zoom(geometry))
    origin = np.asarray(voxel_to_world(0.5 / z, geometry))
    return Geometry(pre.target(), tuple(origin.tolist()), geometry.direction)


def preprocess_scan(layout: LunaLayout, uid: str, pre: LunaPreprocess, cache_dir: str | os.PathLike | None = None):
    """Preprocessed scan ``[1, Z', Y', X']`` float32 and its zoom; cached as float16 ``.npy`` under ``cache_dir``."""
    geom, shape = layout.info(uid)
    zoom = pre.zoom(geom)
    if cache_dir is None:
        img, _ = pre(layout.read(uid).array, geom)
        return img, zoom
    cdir = Path(cache_dir) / pre.key()
    f = cdir / f"{uid}.npy"
    expect = tuple(max(1, math.floor(n * z + 0.5)) for n, z in zip(shape, zoom))
    if f.is_file():
        arr = np.load(f)
        if tuple(arr.shape[1:]) == expect:
            return torch.from_numpy(arr.astype(np.float32)), zoom
    img, _ = pre(layout.read(uid).array, geom)
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cdir / f".{uid}.{os.getpid()}.tmp.npy"
    np.save(tmp, img.numpy().astype(np.float16))
    os.replace(tmp, f)
    return img, zoom


# ============================================================================================ training


class LunaVolumes(Dataset):
    """Preprocessed whole scans as sample dicts (the ``base`` of a :class:`~medetect.data.datasets.PatchDataset`):
    ``image [1, Z', Y', X']``, ``boxes`` on the resampled grid (original boxes times zoom), ``labels`` (0),
    ``box_ids``, ``spacing``, ``image_id`` (= seriesuid)."""

    pre_transform = None  # the preprocessing happens in raw_sample (and is cached on disk)

    def __init__(self, layout: LunaLayout, uids: Sequence[str], pre: LunaPreprocess, cache_dir=None):
        self.layout, self.uids, self.pre, self.cache_dir = layout, list(uids), pre, cache_dir
        for u in self.uids:
            layout.boxes(u)  # fail early: unknown uid, missing .raw, nodules outside the volume

    def __len__(self) -> int:
        return len(self.uids)

    def raw_sample(self, i: int, *, dtype: torch.dtype | None = torch.float32) -> dict:
        """The preprocessed scan ``i`` (always float32; ``dtype`` is accepted for PatchDataset's interface)."""
        uid = self.uids[i]
        img, zoom = preprocess_scan(self.layout, uid, self.pre, self.cache_dir)
        boxes = torch.from_numpy(self.layout.boxes(uid) * np.asarray(zoom * 2)).float()
        return {
            "image": img, "boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long),
            "box_ids": torch.arange(len(boxes)), "spacing": self.pre.target(), "image_id": uid,
        }

    def prepared_sample(self, i: int) -> dict:
        return self.raw_sample(i)

    def __getitem__(self, i: int) -> dict:
        return self.raw_sample(i)


def _patches_cls():
    from ..data.datasets import PatchDataset

    class _Patches(PatchDataset):
        def __len__(self) -> int:  # explicit: len(base) * patches_per_volume
            return len(self.base) * self.patches_per_volume

    return _Patches


class _Levels(torch.utils.data.ConcatDataset):
    """The patch sets of the pyramid levels as one dataset (new patches every epoch on each level)."""

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)


def default_detector_config(**overrides) -> DetectorConfig:
    """A small 3D RetinaNet for CPU training at 1.5-2 mm: ResNet-18 body of width 8, FPN of 16 channels on strides 4
    and 8, cubic anchors of 4, 8 (stride 4) and 12, 20 voxels (stride 8)."""
    kw = dict(
        arch="retinanet", ndim=3, in_channels=1, num_classes=1, class_names=[CLASS_NAME], backbone="resnet18",
        base_width=8, fpn_channels=16, levels=[2, 3],
        anchor_shapes=[[[4.0] * 3, [8.0] * 3], [[12.0] * 3, [20.0] * 3]],
        score_thresh=0.02, nms_thresh=0.1, detections_per_img=100, rpn_objectness_loss="focal",
    )
    kw.update(overrides)
    return DetectorConfig(**kw)


def train_detector(
    layout: LunaLayout | None,
    run_dir: str | os.PathLike,
    *,
    config=None,
    uids: Sequence[str] | None = None,
    subsets: Sequence[str | int] | None = None,
    pre: LunaPreprocess | None = None,
    model_config: DetectorConfig | None = None,
    train_config=None,
    patch_size: int | Sequence[int] | None = None,
    patches_per_volume: int | None = None,
    pos_prob: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    resume: bool = True,
    overwrite: bool = False,
    allow_config_change: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Train the 3D detector on patches of the training scans and write ``run_dir/model.safetensors`` (weights +
    config + preprocessing). Checkpoints every epoch in ``run_dir``; ``resume`` continues from the last one. Returns
    the weights path.

    ``config``: a :class:`medetect.luna.config.LunaDetectionConfig` (``load_config`` of a ``task: luna-detection``
    YAML; default: its defaults = the ``luna train`` defaults). ``layout`` None opens ``config.data.root``. The
    keyword arguments given explicitly win over the config: ``uids`` (else ``subsets``, else ``config.data.subsets``,
    else every scan outside ``config.data.test_subset``), ``pre``, ``model_config``, ``train_config``, ``patch_size``,
    ``patches_per_volume``, ``pos_prob``, ``cache_dir`` (else ``config.data.cache_dir``, else ``run_dir/cache``)."""
    from ..engine.runs import prepare_run_dir
    from ..engine.trainer import Trainer, seed_everything
    from .config import LunaDetectionConfig

    _Patches = _patches_cls()

    config = config if config is not None else LunaDetectionConfig()
    if not isinstance(config, LunaDetectionConfig):
        raise TypeError(f"train_detector: config must be a LunaDetectionConfig, got {type(config).__name__}")
    config.validate()
    dc = config.data
    if layout is None:
        if not dc.root:
            raise ValueError("data.root is not set: give the LUNA16 folder in the config or pass a layout")
        layout = LunaLayout(dc.root, allow_missing_scans=dc.allow_missing_scans)
    pre = pre or config.preprocess.build()
    if uids is None:
        if subsets is None and dc.subsets:
            subsets = dc.subsets
        if subsets is not None:
            uids = layout.uids_in(subsets)
        else:
            held = _subset_name(dc.test_subset) if dc.test_subset else None
            uids = [u for u, s in layout.subset_of.items() if s != held]
    if not uids:
        raise ValueError(f"{layout.root}: no scans to train on")
    cfg = model_config or config.model
    tc = train_config or config.train
    patch_size = patch_size if patch_size is not None else dc.patch_size
    patches_per_volume = patches_per_volume if patches_per_volume is not None else dc.patches_per_volume
    pos_prob = pos_prob if pos_prob is not None else dc.pos_prob
    run_dir = Path(run_dir)
    run_config = {"task": "luna16-detection", "model": cfg.to_dict(), "train": dataclasses.asdict(tc),
                  "preprocess": pre.to_dict(), "patch_size": patch_size, "patches_per_volume": patches_per_volume,
                  "pos_prob": pos_prob, "train_uids": list(uids), "root": str(layout.root)}
    # The run folder rules of every training entry point (refuse / move aside / resume / record config changes),
    # applied before anything (the scan cache included) is written into the folder.
    prepare_run_dir(run_dir, run_config, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    if cache_dir is None:
        cache_dir = dc.cache_dir if dc.cache_dir is not None else run_dir / "cache"
    aug = Compose([RandomFlip(p=0.5), RandomRot90(axes=(-2, -1), p=0.5)])
    size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
    # one patch set per pyramid level: the scans resampled to the level's spacing (cached separately), so the model
    # learns nodules at every size the levels show at inference
    parts = [_Patches(LunaVolumes(layout, uids, level, cache_dir), patch_size=size,
                      patches_per_volume=patches_per_volume, pos_prob=pos_prob, patch_transform=aug, seed=tc.seed + k)
             for k, level in enumerate(pre.levels())]
    data = parts[0] if len(parts) == 1 else _Levels(parts)
    seed_everything(tc.seed)  # the initial weights are part of the run: seeded like the data order
    model = build_detector(cfg)
    trainer = Trainer(model=model, train_data=data, config=tc, run_dir=run_dir, run_config=run_config, device=device,
                      progress=progress)
    if resume and trainer.resume():
        log.info("resumed after epoch %d; continuing with epoch %d", trainer.epoch, trainer.epoch + 1)
    trainer.fit()
    out = run_dir / "model.safetensors"
    save_luna_model(trainer.model, out, pre, extra={"epochs": tc.epochs, "train_uids": len(uids)})
    return out


def save_luna_model(model: Detector, path: str | os.PathLike, pre: LunaPreprocess, extra: dict | None = None) -> Path:
    """The one model writer (:func:`medetect.models.io.save_model`, kind ``"detector"``) with ``pre`` as preprocess."""
    from ..models.io import save_model

    classes = list(model.config.class_names or [CLASS_NAME])
    return save_model(model.cpu(), path, kind="detector", preprocess=pre.as_preprocess(), classes=classes, extra=extra)


def load_luna_model(path: str | os.PathLike, device=None) -> tuple[Detector, LunaPreprocess]:
    """Any nodule detector file (or run folder) -> (model in eval mode, its :class:`LunaPreprocess`)."""
    from ..engine.load import load_model

    m = load_model(path, device=device)
    cfg = getattr(m.model, "config", None)
    if m.kind != "detector" or cfg.ndim != 3 or cfg.in_channels != 1 or m.preprocess.window is None:
        raise ValueError(f"{path}: not a LUNA16 nodule detector (a 3D, 1-channel detector with an HU window)")
    return m.model, LunaPreprocess.from_preprocess(m.preprocess)


# ============================================================================================ inference


def predict_scan(
    model: Detector,
    pre,
    image: MedicalImage | np.ndarray | torch.Tensor,
    geometry: Geometry | None = None,
    *,
    tile_size: int | Sequence[int] = 256,
    overlap: float = 0.25,
    max_marks: int = MAX_MARKS_PER_SCAN,
    score_thresh: float | None = None,
    predictor=None,
    lung_mask: bool = False,
) -> dict[str, np.ndarray]:
    """Whole-scan detection -> marks in world mm, through the one predict path (:meth:`Predictor.predict_image`).

    ``pre``: a :class:`LunaPreprocess` or a stored :class:`medetect.models.io.Preprocess`. ``image``: a
    :class:`MedicalImage` (its geometry is used) or an HU array ``[Z, Y, X]`` / ``[1, Z, Y, X]`` with ``geometry``.
    Returns ``centres_xyz [M, 3]`` (world mm), ``diameters_mm [M]``, ``probabilities [M]`` (sorted, descending,
    ``M <= max_marks``) and ``boxes [M, 6]`` on the ORIGINAL voxel grid.

    ``lung_mask``: keep only marks inside the lungs (:func:`medetect.luna.lungs.lung_mask`; whole chest CTs only,
    never crops of lung tissue such as the cube mosaics); the cap applies after the filter.
    """
    from ..engine.predictor import Predictor

    if not isinstance(image, MedicalImage):
        if geometry is None:
            raise ValueError("predict_scan needs the scan's geometry (pass a MedicalImage or geometry=)")
        a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        image = MedicalImage(a[None] if a.ndim == 3 else a, geometry)
    elif geometry is not None:
        image = MedicalImage(image.array, geometry, image.meta, image.path)
    spec = pre.as_preprocess() if isinstance(pre, LunaPreprocess) else pre
    if predictor is None:
        t = (tile_size,) * 3 if isinstance(tile_size, int) else tuple(tile_size)
        predictor = Predictor(model, device="cpu" if not torch.cuda.is_available() else None, tile_size=t,
                              overlap=overlap, batch_size=1, nms_thresh=model.config.nms_thresh, min_size=MIN_INPUT)
    old_cap, old_thresh = predictor.max_detections, predictor.score_thresh
    predictor.max_detections = max(max_marks, predictor._cap())  # cut to max_marks below, by score
    if score_thresh is not None:
        predictor.score_thresh = score_thresh
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # LUNA submissions are capped at max_marks by design
            det = predictor.predict_image(image, spec, allow_range_mismatch=True)
    finally:
        predictor.max_detections, predictor.score_thresh = old_cap, old_thresh
    out = {"centres_xyz": det["centres_world"].numpy().reshape(-1, 3),
           "diameters_mm": det["diameters_mm"].numpy().reshape(-1),
           "probabilities": det["scores"].double().numpy(), "boxes": det["boxes"].numpy().reshape(-1, 6)}
    if lung_mask:
        from .lungs import lung_mask as _lungs, marks_in_lungs

        mask, steps = _lungs(image.array, image.geometry.spacing)
        keep = marks_in_lungs(mask, steps, image.geometry, out["centres_xyz"])
        out = {k: v[keep] for k, v in out.items()}
    return {k: v[:max_marks] for k, v in out.items()}


def predict_layout(model: Detector, pre: LunaPreprocess, layout: LunaLayout, uids: Sequence[str] | None = None,
                   **kw) -> dict[str, dict[str, np.ndarray]]:
    """:func:`predict_scan` for every scan in ``uids`` (default all) -> ``{uid: marks}``."""
    out = {}
    for uid in uids if uids is not None else layout.uids:
        img = layout.read(uid)
        out[uid] = predict_scan(model, pre, img, **kw)
    return out


def write_submission(path: str | os.PathLike, marks, max_per_scan: int = MAX_MARKS_PER_SCAN) -> Path:
    """LUNA16 submission ``seriesuid,coordX,coordY,coordZ,probability``: per scan the ``max_per_scan`` most probable
    marks, sorted by probability (descending).

    ``marks``: a :class:`~medetect.data.annotations.WorldPoints` with scores, or ``{uid: marks of that scan}`` where a
    scan's marks are a ``WorldPoints``, a ``{"centres_xyz" [M, 3], "probabilities" [M]}`` dict or a
    ``(centres, probabilities)`` pair (world mm).
    """
    from .fpr import _mark_arrays

    per_scan = marks.by_uid() if isinstance(marks, WorldPoints) else marks
    rows = {}
    for uid, m in per_scan.items():
        c, p = _mark_arrays(m)
        if p is None:
            raise ValueError(f"write_submission: the marks of {uid!r} have no probabilities")
        order = np.argsort(-p, kind="stable")[:max_per_scan]
        rows[uid] = (c[order], p[order])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_world_points(path, WorldPoints.from_dict(rows, "scores", source="write_submission"), "marks")
    return path


def evaluate_submission(layout: LunaLayout, submission: str | os.PathLike, uids: Sequence[str], *,
                        n_bootstrap: int = 0):
    """Exact LUNA16 FROC of ``submission`` on the scans ``uids`` (annotations and excluded findings of the layout)."""
    from ..evaluation.froc import froc

    if layout.annotations_path is None:
        raise ValueError(f"{layout.root}: no annotations.csv to evaluate against")
    ann = layout.annotations_path
    if not any(u in layout.annotations for u in uids):
        ann = layout.nodule_points[np.zeros(len(layout.nodule_points), dtype=bool)]
    return froc(ann, Path(submission), excluded=layout.excluded_path, seriesuids=list(uids), n_bootstrap=n_bootstrap)


def _froc_summary(res) -> dict:
    return {"cpm": float(res.cpm), "fps": [float(f) for f in res.fps],
            "sensitivities": [round(float(s), 4) for s in res.sensitivities], "n_scans": res.n_scans,
            "n_nodules": res.n_nodules, "n_tp": res.n_tp, "n_fp": res.n_fp, "max_sensitivity": res.max_sensitivity}


# ============================================================================================ real-CT smoke test, timing


def lung_pet_ct_smoke(model: Detector, pre: LunaPreprocess, root: str | os.PathLike, **kw) -> list[dict]:
    """Run the detector on the Lung-PET-CT-Dx sample CTs (whole chest CTs: ``lung_mask`` on unless ``kw`` says
    otherwise); per patient the distance (mm) from the top mark to the tumour box centre (world), the nearest of the
    top-10 marks, and the rank of the first mark whose centre falls in the tumour box."""
    from ..data.datasets import lung_pet_ct_dx

    ds = lung_pet_ct_dx(root)
    out = []
    kw.setdefault("lung_mask", True)  # whole chest CTs: marks outside the lungs are not nodules
    for i, rec in enumerate(ds.records):
        img = ds.image(i)
        t0 = time.perf_counter()
        m = predict_scan(model, pre, img, **kw)
        dt = time.perf_counter() - t0
        box = np.asarray(rec.boxes, dtype=np.float64)[0]
        centre = np.asarray(voxel_to_world((box[:3] + box[3:]) / 2, img.geometry))
        d = np.linalg.norm(m["centres_xyz"] - centre, axis=1) if len(m["probabilities"]) else np.zeros(0)
        vox = np.asarray(world_to_voxel(m["centres_xyz"], img.geometry)).reshape(-1, 3)
        inside = ((vox >= box[:3]) & (vox <= box[3:])).all(1)
        out.append({
            "patient": rec.image, "shape": list(img.spatial_shape), "spacing": list(img.geometry.spacing),
            "tumour_centre_xyz": centre.round(1).tolist(),
            "tumour_size_mm": ((box[3:] - box[:3]) * np.asarray(img.geometry.spacing)).round(1).tolist(),
            "n_marks": int(len(d)), "top_prob": float(m["probabilities"][0]) if len(d) else None,
            "top_mark_distance_mm": float(d[0]) if len(d) else None,
            "nearest_of_top10_mm": float(d[:10].min()) if len(d) else None,
            "rank_of_first_mark_in_box": int(np.flatnonzero(inside)[0]) + 1 if inside.any() else None,
            "lung_mask": bool(kw["lung_mask"]), "seconds": round(dt, 1),
        })
    return out


def time_inference(model: Detector, pre: LunaPreprocess, shape=(256, 512, 512), spacing=(1.25, 0.7, 0.7),
                   **kw) -> dict:
    """Wall time of :func:`predict_scan` (preprocessing included) on a synthetic HU volume of ``shape``."""
    g = torch.Generator().manual_seed(0)
    vol = (torch.randn(shape, generator=g) * 50 - 700).to(torch.int16).numpy()
    geom = Geometry(tuple(spacing), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1)))
    t0 = time.perf_counter()
    x, _ = pre(vol, geom)
    t1 = time.perf_counter()
    m = predict_scan(model, pre, vol, geom, **kw)
    t2 = time.perf_counter()
    return {"shape": list(shape), "spacing": list(spacing), "resampled_shape": list(x.shape[1:]),
            "preprocess_s": round(t1 - t0, 2), "predict_scan_s": round(t2 - t1, 2), "n_marks": len(m["probabilities"]),
            "threads": torch.get_num_threads()}


# ============================================================================================ phantom demo


def phantom_demo(out_dir: str | os.PathLike, *, n_train: int = 8, n_test: int = 4, weights: str | None = None,
                 epochs: int = 4, steps_per_epoch: int = 50, spacing: float = 1.5, seed: int = 0,
                 shape=(112, 256, 256), phantom_spacing=(1.5, 0.7, 0.7), progress: bool = True) -> dict:
    """Synthetic LUNA16 folder (subset0: train, subset1: test) -> train briefly (or use ``weights``) -> predict the
    test scans -> submission + FROC. Returns the FROC summary and paths."""
    from ..data.phantoms import write_luna16_dataset
    from ..engine.trainer import TrainConfig

    out = Path(out_dir)
    data = out / "data"
    man = write_luna16_dataset(data, n_scans=n_train + n_test, seed=seed, subsets=1, n_nodules=(1, 4),
                               shape=tuple(shape), spacing=tuple(phantom_spacing), nodule_diameters_mm=(4.0, 20.0))
    # the first n_train scans stay in subset0 (training), the others move to subset1 (held out)
    (data / "subset1").mkdir(exist_ok=True)
    for uid in [s["seriesuid"] for s in man["scans"]][n_train:]:
        for ext in (".mhd", ".raw"):
            (data / "subset0" / f"{uid}{ext}").rename(data / "subset1" / f"{uid}{ext}")
    layout = LunaLayout(data)
    if weights is None:
        tc = TrainConfig(epochs=epochs, batch_size=4, lr=1e-3, optimizer="adamw", warmup_iters=20, num_workers=0,
                         max_steps_per_epoch=steps_per_epoch, log_every=10)
        weights = train_detector(layout, out / "run", subsets=["subset0"], pre=LunaPreprocess(spacing=spacing),
                                 train_config=tc, progress=progress)
    model, pre = load_luna_model(weights)
    test = layout.uids_in(["subset1"])
    marks = predict_layout(model, pre, layout, test)
    sub = write_submission(out / "submission.csv", marks)
    res = evaluate_submission(layout, sub, test)
    return {"weights": str(weights), "submission": str(sub), "froc": _froc_summary(res)}


def _subset_name(s: str | int) -> str:
    """``3``, ``"3"`` or ``"subset3"`` -> ``"subset3"``."""
    return s if isinstance(s, str) and s.startswith("subset") else f"subset{int(s)}"
