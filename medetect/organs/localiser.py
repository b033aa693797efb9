"""The organ localiser: train the 3D detector on downsampled whole CTs, and keep one box per organ.

Training (:func:`train_organs`, ``medetect train configs/organs_ct_rpn3d.yaml``): every CT of an
``organ-ct-sample``-layout folder (or phantoms generated into the run folder) goes through the model's stored
preprocessing (:func:`medetect.data.preprocess.prepare`: HU window, resampling to ``preprocess.spacing``) once and is
cached in memory as float16; its merged organ boxes (:func:`medetect.organs.data.organ_boxes`) are scaled by the same
zoom. The 3D Faster R-CNN sees the whole downsampled CT (no patches: where an organ is depends on the whole body).
No flips: left and right organs are different classes.

Both reorient every CT to the canonical LPS layout first (:func:`medetect.data.orientation.to_canonical`: axis
permutations and reversals only), so a NIfTI stored with reversed rows and columns is the same body to the model;
boxes are mapped back to the input grid.

Localisation (:func:`localise`): the detector's per-class detections on the whole CT, then per organ the highest-
scoring box (one ``scatter_reduce`` over the labels, no loop over boxes); an organ whose best score is below
``score_thresh`` is reported absent; a box touching the volume border is flagged ``truncated``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .anatomy import ORGANS
from .data import OrganCase, read_organ_folder

__all__ = ["OrganVolumes", "training_cases", "train_organs", "localise", "best_per_class", "save_organ_model",
           "ORGAN_TASK"]

log = logging.getLogger(__name__)
ORGAN_TASK = "organ-localisation"  # the ``extra["task"]`` of an organ localiser's model file


def _prepared(case: OrganCase, pre):
    """The case's CT in the canonical layout (:func:`~medetect.data.orientation.to_canonical`) through the model's
    preprocessing, and the reorientation (its boxes and label map follow it)."""
    from ..data.io import read_image
    from ..data.orientation import to_canonical
    from ..data.preprocess import prepare

    img, ro = to_canonical(read_image(case.volume))
    return prepare(img, pre, allow_range_mismatch=True), ro


class OrganVolumes(Dataset):
    """Whole downsampled CTs with their organ boxes: ``{"image" [1, Z, Y, X] float32, "boxes" [K, 6] (model grid),
    "labels" [K]}``; organs outside ``classes`` are left out.

    ``repeats[i]``: how many times case ``i`` is drawn per epoch (default once). With an ``augment`` config whose
    ``p`` > 0, each draw is augmented (:func:`~medetect.organs.augment.augment_organ_volume`) by a generator seeded
    from ``(seed, epoch, index)``: an epoch's augmentations are reproducible, so a resumed run trains on the same ones.
    The epoch lives in shared memory (:meth:`set_epoch` reaches DataLoader workers started before it)."""

    def __init__(self, cases: Sequence[OrganCase], pre, classes: Sequence[str] = ORGANS, *,
                 repeats: Sequence[int] | None = None, augment=None, seed: int = 0):
        self.cases, self.pre, self.classes = list(cases), pre, list(classes)
        reps = [1] * len(self.cases) if repeats is None else [int(r) for r in repeats]
        if len(reps) != len(self.cases) or min(reps, default=1) < 1:
            raise ValueError("repeats must give a count >= 1 for every case")
        self.index = [i for i, r in enumerate(reps) for _ in range(r)]
        self.augment, self.seed = augment, int(seed)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._cache: dict[int, dict] = {}

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.index)

    def _organ_map(self, c: OrganCase, p, ro) -> torch.Tensor | None:
        """The case's label map on the model grid as localiser class + 1 (0: background or another structure)."""
        if c.labels is None:
            return None
        from ..data.io import read_image
        from ..data.transforms import resample
        from .anatomy import organ_of
        from .data import read_label_table

        table = read_label_table(c.labels.parent.parent, c.name)
        lut = np.zeros(max(table) + 2 if table else 1, dtype=np.uint8)
        for i, name in table.items():  # entries of a label table
            org = organ_of(name)
            if org in self.classes:
                lut[i] = self.classes.index(org) + 1
        lab = ro.array(read_image(c.labels).array[0], channels=False)
        m = torch.from_numpy(np.ascontiguousarray(lut[np.clip(lab.astype(np.int64), 0, len(lut) - 1)]))
        out = resample({"image": m[None], "spacing": tuple(p.geometry.spacing)}, tuple(self.pre.spacing),
                       mode="nearest")["image"][0]
        if tuple(out.shape) != tuple(p.tensor.shape[1:]):
            raise ValueError(f"{c.labels}: the label map does not lie on the grid of {c.volume}")
        return out

    def _sample(self, i: int) -> dict:
        if i not in self._cache:
            c = self.cases[i]
            p, ro = _prepared(c, self.pre)
            keep = [k for k, o in enumerate(c.organs) if o in self.classes]
            zoom = torch.tensor(p.zoom * 2, dtype=torch.float64)
            boxes = ro.boxes_to_canonical(torch.as_tensor(c.boxes[keep], dtype=torch.float64).reshape(-1, 6))
            boxes = (boxes * zoom).float()
            labels = torch.tensor([self.classes.index(c.organs[k]) for k in keep], dtype=torch.long)
            organ_map = self._organ_map(c, p, ro) if self.augment is not None and self.augment.p > 0 else None
            self._cache[i] = {"image": p.tensor.to(torch.float16), "boxes": boxes, "labels": labels,
                              "organ_map": organ_map}
        return self._cache[i]

    def __getitem__(self, j: int) -> dict:
        s = self._sample(self.index[j])
        image, boxes, labels = s["image"].float(), s["boxes"], s["labels"]
        if self.augment is not None and self.augment.p > 0:
            from .augment import augment_organ_volume

            g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(self._epoch)) * 1_000_003 + j)
            if float(torch.rand(1, generator=g)) < self.augment.p:
                image, boxes, labels = augment_organ_volume(image, boxes, labels, s["organ_map"], self.pre.spacing,
                                                            len(self.classes), self.augment, g)
        return {"image": image, "boxes": boxes, "labels": labels}


def _folder_cases(dc, folders) -> tuple[list[OrganCase], list[int], set[str]]:
    cases: list[OrganCase] = []
    repeats: list[int] = []
    seen: set[str] = set()
    for f, rep in folders:  # a few folders
        got = read_organ_folder(f)
        seen |= {c.name for c in got}
        got = [c for c in got if c.name not in dc.exclude_cases]
        if not got:
            raise ValueError(f"{Path(f) / 'boxes.csv'}: lists no cases to train on")
        cases += got
        repeats += [rep] * len(got)
    return cases, repeats, seen


def _uses_phantoms(dc) -> bool:
    return not (dc.root or any(dc.extra_roots)) or dc.mix_phantoms


def check_training_folders(data_config) -> None:
    """The named folders and held-out case names, checked before a run folder is written (reading only the
    ``boxes.csv`` files and volume headers): a typo is one sentence, and no run folder is left behind."""
    dc = data_config
    folders = [(f, 1) for f in [dc.root] if f] + [(f, dc.extra_repeat) for f in dc.extra_roots if f]
    _, _, seen = _folder_cases(dc, folders)
    unknown = sorted(set(dc.exclude_cases) - seen)
    if unknown and not _uses_phantoms(dc):  # phantom names are known once they are generated
        raise ValueError(f"data.exclude_cases: no training folder has a case named {unknown[0]!r}")


def training_cases(data_config, run_dir: Path) -> tuple[list[OrganCase], list[int]]:
    """The training CTs a ``data`` section names, with how often each is drawn per epoch: the phantoms generated into
    ``run_dir/phantoms`` when no folder is named or with ``mix_phantoms`` (once each), every case of ``root`` (once)
    and of ``extra_roots`` (``extra_repeat`` times), in that order; cases named in ``exclude_cases`` are left out (a
    name that no folder holds is an error: a typo must not train on the case it meant to hold out)."""
    from .phantoms import write_organ_dataset

    dc = data_config
    folders = [(f, 1) for f in [dc.root] if f] + [(f, dc.extra_repeat) for f in dc.extra_roots if f]
    if _uses_phantoms(dc):  # the phantoms first, then the real folders in the order named
        root = run_dir / "phantoms"
        if not (root / "boxes.csv").is_file():
            log.info("generating %d phantoms into %s", dc.phantoms, root)
            write_organ_dataset(root, dc.phantoms, dc.seed, spacing_range=(tuple(dc.slice_mm), tuple(dc.in_plane_mm)))
        folders.insert(0, (root, 1))
    cases, repeats, seen = _folder_cases(dc, folders)
    unknown = sorted(set(dc.exclude_cases) - seen)
    if unknown:
        raise ValueError(f"data.exclude_cases: no training folder has a case named {unknown[0]!r}")
    return cases, repeats


def save_organ_model(model, path, pre, *, score_thresh: float, extra: dict | None = None) -> Path:
    """The one model writer (kind ``detector``) with ``extra["task"] = "organ-localisation"`` and the organ score
    threshold, so ``medetect predict`` / ``evaluate`` know to keep one box per organ."""
    from ..models.io import save_model

    ex = {"task": ORGAN_TASK, "organ_score_thresh": float(score_thresh), **(extra or {})}
    return save_model(model.cpu(), path, kind="detector", preprocess=pre, classes=list(model.config.class_names),
                      extra=ex)


def train_organs(config, run_dir, *, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False,
                 device=None, progress: bool = True) -> tuple[Path, list[dict]]:
    """Train the organ localiser that ``config`` (:class:`~medetect.organs.config.OrganLocalisationConfig`)
    describes into ``run_dir``; writes ``run_dir/model.safetensors``. Returns (weights, metric history)."""
    from ..engine.runs import prepare_run_dir
    from ..engine.trainer import Trainer, seed_everything
    from ..models.detector import build_detector

    run_dir = Path(run_dir)
    check_training_folders(config.data)
    prepare_run_dir(run_dir, config.to_dict(), resume=resume, overwrite=overwrite,
                    allow_config_change=allow_config_change)
    cases, repeats = training_cases(config.data, run_dir)
    pre = config.preprocess.build()
    seed_everything(config.train.seed)
    model = build_detector(config.model)
    if config.model.rpn_objectness_loss == "focal":  # RetinaNet's prior: objectness starts at p = 0.01, so the
        torch.nn.init.constant_(model.rpn.head.cls.bias, -math.log(99.0))  # focal loss over all anchors starts small
    data = OrganVolumes(cases, pre, config.model.class_names, repeats=repeats, augment=config.augment,
                        seed=config.train.seed)
    trainer = Trainer(model=model, train_data=data, config=config.train, run_dir=run_dir,
                      run_config=config.to_dict(), device=device or "cpu", progress=progress)
    if resume and trainer.resume():
        log.info("resumed from epoch %d", trainer.epoch)
    history = trainer.fit()
    out = save_organ_model(trainer.model, run_dir / "model.safetensors", pre,
                           score_thresh=config.localise.score_thresh,
                           extra={"epochs": config.train.epochs, "train_cases": len(cases)})
    return out, history


def best_per_class(det: dict, num_classes: int) -> dict:
    """Per class the highest-scoring detection: ``{"present" [K] bool, "boxes" [K, 2d] (NaN where absent),
    "scores" [K] (0 where absent)}`` (``det``: ``boxes``, ``scores``, ``labels`` of any d)."""
    boxes, scores, labels = det["boxes"], det["scores"].double(), det["labels"].long()
    d2 = boxes.shape[-1] if boxes.ndim == 2 else 0
    best = torch.zeros(num_classes, dtype=torch.float64).scatter_reduce(0, labels, scores, "amax",
                                                                        include_self=True)
    # the first detection (in index order) of each class that reaches its class's best score
    hit = scores == best[labels]
    idx = torch.full((num_classes,), len(scores), dtype=torch.long)
    idx = idx.scatter_reduce(0, labels[hit], torch.nonzero(hit).reshape(-1), "amin", include_self=True)
    present = idx < len(scores)
    out_boxes = torch.full((num_classes, d2), float("nan"), dtype=torch.float64)
    out_boxes[present] = boxes[idx[present]].double()
    return {"present": present, "boxes": out_boxes, "scores": torch.where(present, best, torch.zeros_like(best))}


def localise(loaded, image, *, score_thresh: float | None = None, predictor=None) -> dict:
    """One box per organ on a CT (a :class:`~medetect.data.image.MedicalImage`) with an organ localiser
    (:func:`medetect.apps.load_model` result). Returns ``{"organs": [K names], "present" [K] bool, "scores" [K],
    "boxes" [K, 6] voxels of the input grid (NaN where absent), "boxes_mm" [K, 6] world (x0, y0, z0, x1, y1, z1),
    "truncated" [K] bool (box touches the volume border), "shape"}``."""
    from ..data.orientation import to_canonical
    from ..engine.predictor import Predictor
    from .data import world_box

    if image.geometry.ndim != 3:
        raise ValueError(f"{image.path or '<in-memory image>'}: the organ localiser takes 3D CT volumes, this is a "
                         f"{image.geometry.ndim}D image")
    thresh = float(loaded.meta.get("extra", {}).get("organ_score_thresh", 0.3)) if score_thresh is None else \
        float(score_thresh)
    predictor = predictor or Predictor(loaded.model, score_thresh=0.0)
    with warnings.catch_warnings():  # only each organ's best box is kept: the per-image cap is not a finding
        warnings.filterwarnings("ignore", message=".*the cap max_detections")
        canonical, ro = to_canonical(image)  # the model knows one layout of the body: LPS
        det = predictor.predict_image(canonical, loaded.preprocess, allow_range_mismatch=True)
    k = len(loaded.classes)
    best = best_per_class(det, k)
    best["boxes"] = ro.boxes_to_input(best["boxes"])
    present = best["present"] & (best["scores"] >= thresh)
    boxes = torch.where(present[:, None], best["boxes"], torch.full_like(best["boxes"], float("nan")))
    shape = torch.tensor(image.array.shape[1:], dtype=torch.float64)
    truncated = present & ((boxes[:, :3] <= 0.5) | (boxes[:, 3:] >= shape - 0.5)).any(1)
    mm = np.full((k, 6), np.nan)
    if present.any():
        mm[present.numpy()] = world_box(boxes[present].numpy(), image.geometry)
    return {"organs": list(loaded.classes), "present": present, "scores": best["scores"], "boxes": boxes,
            "boxes_mm": torch.from_numpy(mm), "truncated": truncated, "shape": tuple(image.array.shape[1:])}


def localisation_record(res: dict) -> dict:
    """JSON-ready per-organ record of :func:`localise`'s result."""
    out = {}
    for i, name in enumerate(res["organs"]):  # rows of a report
        present = bool(res["present"][i])
        rec = {"present": present, "score": round(float(res["scores"][i]), 4)}
        if present:
            rec.update(box_voxels=[round(float(v), 2) for v in res["boxes"][i]],
                       box_mm=[round(float(v), 2) for v in res["boxes_mm"][i]], truncated=bool(res["truncated"][i]))
        out[name] = rec
    return json.loads(json.dumps(out))
