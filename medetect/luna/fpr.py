"""LUNA16 stage two: false-positive reduction (FPR) of nodule candidates with a cube classifier.

Pipeline: candidates (world mm, from ``candidates.csv`` or a stage-one detector) -> :func:`extract_cubes` (one
batched ``grid_sample`` per scan: isotropic cubes centred at the candidates, -1000 HU outside the volume, lung window
to ``[0, 1]``) -> :class:`medetect.models.fp_reduction.FPRClassifier` -> probabilities -> optionally :func:`fuse`
with the stage-one probability -> LUNA16 submission CSV (``seriesuid,coordX,coordY,coordZ,probability``).

Cube geometry. A cube is laid out along the volume's ARRAY axes (``z, y, x``) with isotropic voxels of
``spacing_mm * scale``; cube voxel ``k`` (per axis, ``0..size-1``) samples the point ``(k + 0.5 - size / 2)`` voxels
from the candidate, so the candidate sits exactly at the cube's geometric centre (edge coordinate ``size / 2``; for an
odd ``size`` that is the centre of voxel ``size // 2``). World -> voxel goes through
:func:`medetect.convert.world_to_voxel` (any spacing, origin, direction). Trilinear interpolation, ``align_corners=False``
(voxel ``i`` covers ``[i, i + 1)``, as in :mod:`medetect.convert`).

Augmentation is folded into the sampling grid, so it costs nothing extra and never moves the candidate off-centre
unless asked to: per cube a signed axis permutation (all flips and 90-degree rotations of the cube), an isotropic
scale jitter and a small translation (mm) -- :func:`random_augmentation`.

Training candidates from a stage-one detector (:func:`candidates_from_marks`): its top marks on the training scans,
labelled 1 within a nodule's radius and 0 otherwise, are the false positives stage two must learn to reject;
:func:`merge_candidates` adds them to ``candidates.csv``.

Class balance: LUNA16 has ~500 negatives per positive. :class:`CandidateCubes` oversamples positives (every negative
once per epoch, positives repeated until they are ``pos_fraction`` of the epoch), which works with the
:class:`~medetect.engine.trainer.Trainer` (its sampler shuffles a dataset's indices); :func:`balanced_sampler` gives a
``WeightedRandomSampler`` for custom loops.

Fusion of the two stages (:func:`fuse`): ``"product"`` ``p_det * p_fpr`` (a candidate must convince both stages;
the usual choice when the detector's probabilities are calibrated), ``"mean"`` ``w * p_det + (1 - w) * p_fpr``
(more forgiving when either stage is over-confident), ``"geometric"`` ``sqrt(p_det * p_fpr)`` (the product's ranking
on the probability scale) and ``"fpr"`` (stage two alone; what the LUNA16 candidate track evaluates).

CLI (wired by the lead as ``medetect luna-fpr``)::

    python -m medetect.luna.fpr train ROOT --candidates candidates.csv --run-dir RUN [--subsets subset0 ...]
    python -m medetect.luna.fpr score RUN/model.safetensors ROOT --candidates C.csv --out submission.csv
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, WeightedRandomSampler

from ..convert import Geometry, world_to_voxel
from ..models.fp_reduction import FPRClassifier, FPRConfig, build_fpr

__all__ = [
    "extract_cubes",
    "random_augmentation",
    "balanced_indices",
    "balanced_sampler",
    "CandidateCubes",
    "cube_collate",
    "find_scans",
    "load_scan",
    "read_candidates",
    "candidates_from_marks",
    "merge_candidates",
    "train_fpr",
    "score_candidates",
    "score_scans",
    "fuse",
    "FUSION_MODES",
    "save_fpr",
    "load_fpr",
]

FUSION_MODES = ("product", "mean", "geometric", "fpr")
PAD_HU = -1000.0


# ----------------------------------------------------------------------------------------------- cube extraction


def _volume_tensor(volume) -> torch.Tensor:
    if hasattr(volume, "array") and hasattr(volume, "geometry"):  # MedicalImage
        volume = volume.array[0]
    t = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    return t.to(torch.float32)


def _offsets(size: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """``[size**d, d]`` voxel offsets (array order) of the cube's voxel centres from the cube centre."""
    k = torch.arange(size, dtype=dtype) + 0.5 - size / 2
    mesh = torch.meshgrid(*([k] * d), indexing="ij")
    return torch.stack(mesh, dim=-1).reshape(-1, d)


def extract_cubes(
    volume,
    geometry: Geometry,
    centres_world,
    *,
    size: int = 32,
    spacing_mm: float = 1.0,
    scales: Sequence[float] = (1.0,),
    window: Sequence[float] | None = (-1000.0, 400.0),
    pad_hu: float = PAD_HU,
    matrices: torch.Tensor | None = None,
    shifts_mm: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Cubes centred at world points, resampled to isotropic voxels: ``[N, len(scales), size, .., size]`` float32.

    Args:
        volume: ``[*S]`` array/tensor in HU (array order, e.g. ``[Z, Y, X]``) or a ``MedicalImage``; 2D or 3D.
        geometry: the volume's :class:`~medetect.convert.Geometry`.
        centres_world: ``[N, d]`` world points ``(x, y, z)`` mm.
        size: voxels per cube axis; spacing_mm: voxel size (mm) at scale 1; scales: fields of view as multiples
            (each scale becomes one channel).
        window: HU ``(lo, hi)`` mapped to ``[0, 1]`` with clipping, or None to return HU.
        pad_hu: value outside the volume (air).
        matrices: optional ``[N, d, d]`` maps applied to each cube's mm offsets (array axes) -- augmentation.
        shifts_mm: optional ``[N, d]`` translations (mm, array axes) of the sampled point from the candidate.
        chunk: candidates per ``grid_sample`` call (bounds memory; not a per-candidate loop).
    """
    vol = _volume_tensor(volume)
    d = geometry.ndim
    if vol.ndim != d or d not in (2, 3):
        raise ValueError(f"volume must be [*S] with {d} spatial axes (2D or 3D), got shape {tuple(vol.shape)}")
    ctr = torch.as_tensor(world_to_voxel(np.asarray(centres_world, dtype=np.float64).reshape(-1, d), geometry))
    n = ctr.shape[0]
    ns = len(scales)
    out = vol.new_empty((n, ns, *([size] * d)))
    if n == 0:
        return out
    vox_mm = torch.as_tensor(geometry.spacing, dtype=torch.float64)  # mm per array axis
    shape = torch.as_tensor(vol.shape, dtype=torch.float64)
    base = _offsets(size, d) * spacing_mm  # [P, d] mm
    base = torch.stack([base * float(s) for s in scales])  # [ns, P, d]
    src = (vol - pad_hu)[None, None]  # zeros padding == pad_hu after adding it back
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        off = base[None].expand(b - a, -1, -1, -1)  # [m, ns, P, d]
        if matrices is not None:
            off = torch.einsum("nij,nspj->nspi", matrices[a:b].to(torch.float64), off)
        if shifts_mm is not None:
            off = off + shifts_mm[a:b].to(torch.float64)[:, None, None, :]
        pos = ctr[a:b, None, None, :] + off / vox_mm  # [m, ns, P, d] edge coordinates
        g = (2 * pos / shape - 1).flip(-1).to(torch.float32)  # grid_sample wants (x, y, z) = reversed axes
        g = g.reshape(1, (b - a) * ns * size, *([size] * (d - 1)), d)
        v = F.grid_sample(src, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[a:b] = v.reshape(b - a, ns, *([size] * d)) + pad_hu
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        out = ((out - lo) / (hi - lo)).clamp_(0.0, 1.0)
    return out


def random_augmentation(
    n: int,
    d: int = 3,
    *,
    flip: bool = True,
    rotate_axes: Sequence[int] | None = None,
    scale: tuple[float, float] | None = (0.9, 1.1),
    shift_mm: float = 2.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cube augmentation for :func:`extract_cubes`: ``(matrices [n, d, d], shifts_mm [n, d])``.

    ``matrices`` = signed permutation (random flips; 90-degree rotations as random permutations of ``rotate_axes``,
    default all axes, i.e. the cube's 48 symmetries in 3D) times an isotropic scale drawn from ``scale``; ``shifts``
    uniform in ``[-shift_mm, shift_mm]`` per axis. ``shift_mm=0`` keeps the candidate exactly at the cube centre.
    """
    axes = list(range(d)) if rotate_axes is None else [a % d for a in rotate_axes]
    perm = torch.arange(d).repeat(n, 1)
    if len(axes) > 1:
        order = torch.argsort(torch.rand(n, len(axes), generator=generator), dim=1)
        ax = torch.as_tensor(axes)
        perm[:, ax] = ax[order]
    mats = torch.eye(d, dtype=torch.float64)[perm]  # [n, d, d] permutation matrices
    if flip:
        signs = torch.where(torch.rand(n, d, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
        mats = mats * signs[:, :, None]
    if scale is not None:
        lo, hi = scale
        s = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        mats = mats * s[:, None, None]
    shifts = (torch.rand(n, d, generator=generator, dtype=torch.float64) * 2 - 1) * shift_mm
    return mats, shifts


# ----------------------------------------------------------------------------------------------- class balance


def balanced_indices(labels, pos_fraction: float = 0.5, *, seed: int = 0) -> np.ndarray:
    """Indices of one epoch: every negative once, positives repeated (all of them as often as possible, the remainder
    drawn at random without replacement) until they make ``pos_fraction`` of the epoch. Unshuffled."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if not 0 < pos_fraction < 1 or len(pos) == 0 or len(neg) == 0:
        return np.arange(len(y))
    n_pos = max(len(pos), int(round(len(neg) * pos_fraction / (1 - pos_fraction))))
    rng = np.random.default_rng(seed)
    reps, rem = divmod(n_pos, len(pos))
    extra = rng.choice(pos, size=rem, replace=False) if rem else np.empty(0, dtype=np.int64)
    return np.concatenate([neg, np.tile(pos, reps), extra]).astype(np.int64)


def balanced_sampler(labels, pos_fraction: float = 0.5, num_samples: int | None = None,
                     generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """A ``WeightedRandomSampler`` drawing positives with probability ``pos_fraction`` (for custom loops)."""
    y = torch.as_tensor(np.asarray(labels).reshape(-1)).bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        w = torch.ones(len(y), dtype=torch.float64)
    else:
        w = torch.where(y, pos_fraction / n_pos, (1 - pos_fraction) / n_neg).to(torch.float64)
    return WeightedRandomSampler(w, num_samples or len(y), replacement=True, generator=generator)


# ----------------------------------------------------------------------------------------------- data


def find_scans(root) -> dict[str, Path]:
    """``{seriesuid: path}`` of every ``.mhd`` under ``root`` (LUNA16: ``subsetN/<seriesuid>.mhd``)."""
    return {p.stem: p for p in sorted(Path(root).rglob("*.mhd"))}


def load_scan(path) -> tuple[np.ndarray, Geometry]:
    """``(volume [Z, Y, X] HU, geometry)`` of a scan file."""
    from ..data.io import read_image

    img = read_image(path)
    return img.array[0], img.geometry


def read_candidates(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``candidates.csv`` (``class`` column) or a submission (``probability`` column) -> ``{uid: (xyz [N, 3], value [N])}``
    (labels int64, or probabilities float64), read by :func:`~medetect.data.annotations.read_world_points`."""
    from ..data.annotations import csv_header, read_world_points

    if "probability" in csv_header(path):
        return read_world_points(path, "marks").to_dict("scores")
    return read_world_points(path, "candidates").to_dict("labels")


def _mark_arrays(m) -> tuple[np.ndarray, np.ndarray | None]:
    """One scan's marks -> ``(centres [M, 3], probabilities [M] or None)``: a :class:`WorldPoints` (its scores, None
    when all NaN), a ``{"centres_xyz", "probabilities"}`` dict or a ``(centres, probabilities)`` pair."""
    from ..data.annotations import WorldPoints

    if isinstance(m, WorldPoints):
        c, p = m.centres, None if np.isnan(m.scores).all() else m.scores
    elif isinstance(m, Mapping):
        c, p = m["centres_xyz"], m.get("probabilities")  # predict_scan's marks
    else:
        c, p = m[0], m[1] if len(m) > 1 else None
    c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
    return c, None if p is None else np.asarray(p, dtype=np.float64).reshape(-1)


def _within(centres: np.ndarray, findings, unknown_diameter_mm: float = 10.0) -> np.ndarray:
    """``[M]`` bool: is each point strictly within the radius of any finding (a :class:`WorldPoints` or
    ``(centres [N, 3], diameters [N])``)? The LUNA16 hit test :func:`~medetect.data.annotations.hits` on one
    ``[M, N]`` matrix, so a training label agrees with the FROC (a point exactly on the sphere is not within). A
    negative or NaN diameter -- "unknown" in ``annotations_excluded.csv`` -- counts as ``unknown_diameter_mm`` (10 mm,
    as in the LUNA16 FROC)."""
    from ..data.annotations import WorldPoints, hits

    if findings is None:
        return np.zeros(len(centres), dtype=bool)
    if isinstance(findings, WorldPoints):
        findings = (findings.centres, findings.diameters)
    fc = np.asarray(findings[0], dtype=np.float64).reshape(-1, 3)
    fd = np.asarray(findings[1], dtype=np.float64).reshape(-1)
    if len(fc) == 0 or len(centres) == 0:
        return np.zeros(len(centres), dtype=bool)
    return hits(centres[:, None, :], fc[None, :, :], fd[None, :], unknown_diameter=unknown_diameter_mm).any(axis=1)


def _per_scan(findings) -> Mapping:
    """``{uid: findings}`` from a :class:`WorldPoints` (split by scan) or a mapping (as it is)."""
    from ..data.annotations import WorldPoints

    return findings.by_uid() if isinstance(findings, WorldPoints) else (findings or {})


def candidates_from_marks(
    marks,
    annotations,
    *,
    top_k: int | None = 100,
    excluded=None,
    unknown_diameter_mm: float = 10.0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Training candidates for stage two from a stage-one detector's marks: ``{uid: (centres [M, 3], labels [M])}``.

    Args:
        marks: a :class:`~medetect.data.annotations.WorldPoints` with scores, or ``{uid: marks of that scan}``
            where a scan's marks are a ``WorldPoints``, ``{"centres_xyz" [M, 3], "probabilities" [M]}`` or
            ``(centres, probabilities)``; world ``(x, y, z)`` mm.
        annotations: a ``WorldPoints`` with diameters, or ``{uid: (centres [N, 3], diameters [N])}``
            (``LunaLayout.annotations``). A scan missing here has no nodules (all its marks are negatives).
        top_k: keep the ``top_k`` most probable marks per scan (None: all; marks without probabilities keep their
            order).
        excluded: optional findings of the same forms (``annotations_excluded.csv``, e.g. ``LunaLayout.excluded``):
            marks within their radius and not within a nodule's are dropped, because the LUNA16 FROC counts them
            neither as hits nor as false positives (ambiguous labels).
        unknown_diameter_mm: diameter used for negative (unknown) diameters (10 mm, the LUNA16 FROC's).

    Label 1 when the mark lies strictly within the radius (diameter / 2) of an annotated nodule -- the LUNA16 hit
    rule of the FROC, :func:`~medetect.data.annotations.hits` -- else 0: the latter are exactly the detector's false
    positives that stage two must learn to reject. One vectorised distance matrix per scan.
    """
    marks, annotations, excluded = _per_scan(marks), _per_scan(annotations), _per_scan(excluded)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for uid, m in marks.items():
        c, p = _mark_arrays(m)
        if top_k is not None:
            order = np.argsort(-p, kind="stable") if p is not None else np.arange(len(c))
            c = c[order[:top_k]]
        pos = _within(c, annotations.get(uid), unknown_diameter_mm)
        keep = pos | ~_within(c, excluded.get(uid), unknown_diameter_mm)
        out[uid] = (c[keep], pos[keep].astype(np.int64))
    return out


def merge_candidates(*sets: Mapping) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Concatenate candidate sets ``{uid: (centres [N, 3], labels [N])}`` scan by scan (e.g. ``candidates.csv`` and
    :func:`candidates_from_marks`); a :class:`~medetect.data.annotations.WorldPoints` with labels is accepted too."""
    from ..data.annotations import WorldPoints

    out: dict[str, tuple[list, list]] = {}
    for s in sets:
        if isinstance(s, WorldPoints):
            s = s.to_dict("labels")
        for uid, (c, y) in s.items():
            cs, ys = out.setdefault(uid, ([], []))
            cs.append(np.asarray(c, dtype=np.float64).reshape(-1, 3))
            ys.append(np.asarray(y).reshape(-1).astype(np.int64))
    return {u: (np.concatenate(cs), np.concatenate(ys)) for u, (cs, ys) in out.items()}


class CandidateCubes(Dataset):
    """(scan, candidate) samples ``{"image": [S, *size] float32, "label": long}`` with positive oversampling.

    Args:
        scans: ``{uid: path}`` or ``{uid: (volume, geometry)}``; only candidates of these scans are used.
        candidates: ``{uid: (centres_xyz [N, 3], labels [N])}`` (``read_luna_csv`` of ``candidates.csv``).
        config: the classifier's :class:`FPRConfig` (cube size, spacing, scales, window).
        augment: random flips / 90-degree rotations / scale / translation (:func:`random_augmentation`).
        pos_fraction: share of positives per epoch (None: natural frequencies).
        cache: keep loaded volumes in memory (fine for phantoms; for full LUNA16 pre-extract cubes instead).
    """

    def __init__(self, scans: Mapping, candidates: Mapping, config: FPRConfig, *, augment: bool = True,
                 pos_fraction: float | None = 0.5, seed: int = 0, cache: bool = True,
                 aug_scale: tuple[float, float] | None = (0.9, 1.1), aug_shift_mm: float = 2.0):
        self.cfg, self.augment, self.cache = config, augment, cache
        self.aug_scale, self.aug_shift_mm = aug_scale, aug_shift_mm
        self.uids = [u for u in scans if u in candidates]
        self.sources = {u: scans[u] for u in self.uids}
        self._vols: dict = {}
        scan_idx, ctrs, labels = [], [], []
        for i, u in enumerate(self.uids):
            c, y = candidates[u]
            c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
            scan_idx.append(np.full(len(c), i))
            ctrs.append(c)
            labels.append(np.asarray(y).reshape(-1))
        self.scan_idx = np.concatenate(scan_idx) if scan_idx else np.zeros(0, dtype=np.int64)
        self.centres = np.concatenate(ctrs) if ctrs else np.zeros((0, 3))
        self.labels = (np.concatenate(labels) if labels else np.zeros(0)).astype(np.int64)
        self.pos_fraction, self.seed = pos_fraction, seed
        self.index = balanced_indices(self.labels, pos_fraction, seed=seed) if pos_fraction else np.arange(len(self.labels))

    def set_epoch(self, epoch: int) -> None:
        """Redraw the oversampled positives' remainder for this epoch (same length; the Trainer calls it)."""
        if self.pos_fraction:
            self.index = balanced_indices(self.labels, self.pos_fraction, seed=self.seed * 1000003 + epoch)

    def __len__(self) -> int:
        return len(self.index)

    def volume(self, uid: str):
        if uid in self._vols:
            return self._vols[uid]
        src = self.sources[uid]
        v = src if isinstance(src, tuple) else load_scan(src)
        v = (_volume_tensor(v[0]), v[1])
        if self.cache:
            self._vols[uid] = v
        return v

    def __getitem__(self, i: int) -> dict:
        j = int(self.index[i])
        vol, geom = self.volume(self.uids[self.scan_idx[j]])
        cfg = self.cfg
        mats = shifts = None
        if self.augment:
            mats, shifts = random_augmentation(1, 3, scale=self.aug_scale, shift_mm=self.aug_shift_mm)
        cube = extract_cubes(vol, geom, self.centres[j:j + 1], size=cfg.cube_size, spacing_mm=cfg.spacing_mm,
                             scales=cfg.scales, window=cfg.hu_window, matrices=mats, shifts_mm=shifts)
        return {"image": cube[0], "label": torch.tensor(int(self.labels[j]))}


def cube_collate(samples: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """``[{"image", "label"}] -> (cubes [B, S, *size], [{"label": ...}])`` (the Trainer's ``(images, targets)``)."""
    return torch.stack([s["image"] for s in samples]), [{"label": s["label"]} for s in samples]


# ----------------------------------------------------------------------------------------------- weights


def save_fpr(model: FPRClassifier, path, *, extra: dict | None = None) -> Path:
    """The one model writer (:func:`medetect.models.io.save_model`, kind ``"fpr"``; float32 tensors)."""
    from ..models.io import fpr_preprocess, save_model

    return save_model(model, path, kind="fpr", preprocess=fpr_preprocess(model.config.to_dict()), classes=["nodule"],
                      extra=extra, fp16=False)


def load_fpr(path, device=None) -> FPRClassifier:
    """Any FPR model file (current or first-release format) or a training run folder (``fpr_config.json`` + its
    latest checkpoint, e.g. to score a run that is still training or was stopped)."""
    from ..engine.load import load_model

    m = load_model(path, device=device or "cpu")
    if m.kind != "fpr":
        raise ValueError(f"{path}: not a false-positive-reduction model (its kind is {m.kind!r})")
    return m.model


# ----------------------------------------------------------------------------------------------- train / score


def train_fpr(
    root=None,
    candidates=None,
    run_dir=None,
    *,
    config=None,
    train=None,
    seriesuids: Sequence[str] | None = None,
    subsets: Sequence[str] | None = None,
    pos_fraction: float | None | str = "config",
    resume: bool = True,
    overwrite: bool = False,
    allow_config_change: bool = False,
    device=None,
    progress: bool = True,
) -> tuple[FPRClassifier, list[dict]]:
    """Train the classifier on the candidates of the scans under ``root`` and write ``run_dir/model.safetensors``.

    ``config``: a :class:`medetect.luna.config.LunaFPRConfig` (``load_config`` of a ``task: luna-fpr`` YAML: folder,
    candidates, subsets, class balance, classifier, training), or just the classifier's :class:`FPRConfig`; default:
    the ``luna-fpr train`` defaults. Arguments given explicitly win over the config: ``root``, ``candidates`` (path of
    ``candidates.csv`` or its :func:`read_candidates` dict), ``train`` (a :class:`~medetect.engine.trainer.TrainConfig`;
    checkpoints every epoch in ``run_dir``, ``resume`` continues), ``subsets`` (folder names such as ``subset0``),
    ``pos_fraction`` (None: natural frequencies). ``seriesuids`` restricts the training scans further.
    """
    import dataclasses

    from ..engine.runs import prepare_run_dir
    from ..engine.trainer import Trainer, seed_everything
    from .config import LunaFPRConfig

    if isinstance(config, LunaFPRConfig):
        full = config
    else:
        full = LunaFPRConfig()
        if config is not None:
            if not isinstance(config, FPRConfig):
                raise TypeError(f"train_fpr: config must be a LunaFPRConfig or FPRConfig, got {type(config).__name__}")
            full = dataclasses.replace(full, model=config)
    full.validate()
    cfg = full.model
    tcfg = train or full.train
    root = root if root is not None else full.data.root
    candidates = candidates if candidates is not None else full.data.candidates
    subsets = subsets if subsets is not None else (full.data.subsets or None)
    pos_fraction = full.data.pos_fraction if isinstance(pos_fraction, str) and pos_fraction == "config" else pos_fraction
    if not root:
        raise ValueError("data.root is not set: give the LUNA16 folder in the config or as root")
    if candidates is None or (isinstance(candidates, str) and not candidates):
        raise ValueError("data.candidates is not set: give candidates.csv in the config or as candidates")
    if run_dir is None:
        raise ValueError("train_fpr: run_dir is required")
    cands = read_candidates(candidates) if isinstance(candidates, (str, Path)) else candidates
    scans = find_scans(root)
    if subsets:
        scans = {u: p for u, p in scans.items() if p.parent.name in set(subsets)}
    if seriesuids is not None:
        keep = set(seriesuids)
        scans = {u: p for u, p in scans.items() if u in keep}
    data = CandidateCubes(scans, cands, cfg, augment=True, pos_fraction=pos_fraction, seed=tcfg.seed)
    run_dir = Path(run_dir)
    # The run folder rules of every training entry point (refuse / move aside / resume / record config changes).
    prepare_run_dir(run_dir, {"model": cfg.to_dict(), "train": dataclasses.asdict(tcfg), "scans": list(data.uids),
                              "pos_fraction": pos_fraction}, resume=resume, overwrite=overwrite,
                    allow_config_change=allow_config_change, config_name="fpr_config.json")
    seed_everything(tcfg.seed)  # the initial weights are part of the run: seeded like the data order
    model = build_fpr(cfg)
    trainer = Trainer(model=model, train_data=data, config=tcfg, run_dir=run_dir, collate=cube_collate,
                      run_config={"fpr": cfg.to_dict()}, device=device, progress=progress)
    if resume:
        trainer.resume()
    history = trainer.fit()
    save_fpr(model, run_dir / "model.safetensors")
    return model.eval(), history


@torch.no_grad()
def score_candidates(model: FPRClassifier, volume, geometry: Geometry, centres_world, *, batch_size: int = 64,
                     tta: bool = False) -> np.ndarray:
    """Stage-two probabilities ``[N]`` of candidates (world ``(x, y, z)`` mm) of one scan.

    ``tta``: also average over the 8 axis flips of each cube (flips of the extracted batch, no re-sampling)."""
    cfg = model.config
    model.eval()
    dev = next(model.parameters()).device
    cubes = extract_cubes(volume, geometry, centres_world, size=cfg.cube_size, spacing_mm=cfg.spacing_mm,
                          scales=cfg.scales, window=cfg.hu_window)
    probs = []
    for a in range(0, len(cubes), batch_size):
        x = cubes[a:a + batch_size].to(dev)
        if not tta:
            probs.append(torch.sigmoid(model(x)["logits"]).cpu())
            continue
        d = cfg.ndim
        flips = [[2 + k for k in range(d) if m >> k & 1] for m in range(2**d)]
        p = torch.stack([torch.sigmoid(model(x.flip(f) if f else x)["logits"]) for f in flips]).mean(0)
        probs.append(p.cpu())
    return torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros(0)


def score_scans(model: FPRClassifier, scans: Mapping, candidates: Mapping, **kw) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{uid: (centres, fpr probabilities)}`` for every scan in both ``scans`` (``{uid: path}``) and ``candidates``."""
    out = {}
    for uid, src in scans.items():  # loop over scans (each scored in batched calls)
        if uid not in candidates:
            continue
        c = np.asarray(candidates[uid][0], dtype=np.float64).reshape(-1, 3)
        vol, geom = src if isinstance(src, tuple) else load_scan(src)
        out[uid] = (c, score_candidates(model, vol, geom, c, **kw))
    return out


def fuse(det_prob, fpr_prob, mode: str = "product", weight: float = 0.5) -> np.ndarray:
    """Final score of a two-stage system from the stage-one (``det_prob``) and stage-two (``fpr_prob``) probabilities.

    ``"product"``: ``det * fpr`` -- both stages must agree; ``"mean"``: ``weight * det + (1 - weight) * fpr``;
    ``"geometric"``: ``sqrt(det * fpr)``; ``"fpr"``: ``fpr`` alone. Inputs in ``[0, 1]``, same shape.
    """
    a = np.asarray(det_prob, dtype=np.float64)
    b = np.asarray(fpr_prob, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"fuse: det_prob {a.shape} and fpr_prob {b.shape} must have the same shape")
    if mode == "product":
        return a * b
    if mode == "mean":
        if not 0 <= weight <= 1:
            raise ValueError(f"fuse: weight must be in [0, 1], got {weight}")
        return weight * a + (1 - weight) * b
    if mode == "geometric":
        return np.sqrt(a * b)
    if mode == "fpr":
        return b.copy()
    raise ValueError(f"fuse: mode must be one of {FUSION_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------- CLI
