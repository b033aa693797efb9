"""Patient-grouped K-fold cross-validation splits (the ``data.folds``, ``data.fold`` and ``data.fold_seed`` keys).

With ``data.folds`` = K > 0 the *pool* is the union of ``data.train_split`` and ``data.val_split``. Its images are
grouped, the groups split into K folds with scikit-learn, fold ``data.fold`` is the validation set and the other K-1
folds the training set, so that no group lies on both sides:

* a mini-MIAS-layout folder (``images.csv`` with ``patient_id`` and ``image_label``,
  :mod:`medetect.data.lesion_folder`): one group per patient, stratified by the image label (normal / benign /
  malignant) with :class:`sklearn.model_selection.StratifiedGroupKFold`; the folds are made over every image of the
  folder's pool splits, so the mammography and attention tasks hold out the same patients for the same seed;
* any other dataset: one group per image, or per ``patient_id`` / ``patient`` / ``seriesuid`` when its annotation
  records carry one in their ``meta``, with :class:`sklearn.model_selection.GroupKFold`.

Both splitters shuffle with ``data.fold_seed``: the same pool and seed always give the same folds.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .annotations import AnnotationReport
from .datasets import DetectionDataset
from .lesion_folder import is_lesion_folder, read_lesion_folder

__all__ = ["FOLD_DOC", "FOLD_SEED_DOC", "FOLDS_DOC", "Folds", "assign_folds", "check_fold_keys", "fold_dataset", "fold_of", "fold_sizes", "lesion_fold"]

# the docs of the config keys (detection, mammography and attention data sections)
FOLDS_DOC = ("cross-validation: K folds of the pool train_split + val_split, grouped by patient (mini-MIAS-layout "
             "patient_id, stratified by image label; data without patients: each image is its own group, or its "
             "record's patient / series id when it has one); 0: off. medetect train --folds K trains every fold")
FOLD_DOC = "with folds: the held-out fold (0..folds-1), validated under val_split; the other folds train"
FOLD_SEED_DOC = "with folds: the seed that shuffles the patients into folds (same pool and seed: same folds)"
_WHOLE_FILE_READERS = ("mias",)  # formats whose report covers the whole annotation file, whatever the split
GROUP_KEYS = ("patient_id", "patient", "seriesuid")  # record meta keys naming an image's group, first found wins


@dataclasses.dataclass(frozen=True)
class Folds:
    """One cross-validation fold of a data config: ``folds`` (K), ``fold`` (the held-out fold), ``seed`` and the two
    splits whose union is the pool."""

    folds: int
    fold: int
    seed: int
    train_split: str
    val_split: str

    @property
    def pool(self) -> tuple[str, ...]:
        return (self.train_split, self.val_split)

    def side(self, split: str) -> str | None:
        """``"train"``, ``"val"`` or None (a split outside the pool, read as it is)."""
        return {self.train_split: "train", self.val_split: "val"}.get(split)


def fold_of(data) -> Folds | None:
    """The :class:`Folds` of a data config section (``folds``, ``fold``, ``fold_seed``, the two splits), or None when
    ``folds`` is 0."""
    if not getattr(data, "folds", 0):
        return None
    return Folds(int(data.folds), int(data.fold), int(data.fold_seed), data.train_split, data.val_split)


def check_fold_keys(folds: int, fold: int, train_split: str, val_split: str, prefix: str = "data") -> None:
    """The checks of the fold keys (each >= 0 by its schema) that need no data: one sentence naming the key."""
    if folds == 0:
        if fold:
            raise ValueError(f"{prefix}.fold is {fold} but {prefix}.folds is 0 (cross-validation off): set "
                             f"{prefix}.folds to the number of folds")
        return
    if folds == 1:
        raise ValueError(f"{prefix}.folds must be 0 (off) or at least 2, got 1")
    if fold >= folds:
        raise ValueError(f"{prefix}.fold must be one of 0..{folds - 1} ({prefix}.folds is {folds}), got {fold}")
    if not train_split or not val_split or train_split == val_split:
        raise ValueError(f"{prefix}.val_split must name a split other than {prefix}.train_split when {prefix}.folds "
                         f"is set (the pool is both), got train_split {train_split!r} and val_split {val_split!r}")


def assign_folds(groups: Sequence, folds: int, seed: int, labels: Sequence | None = None, *,
                 prefix: str = "data", what: str = "images") -> np.ndarray:
    """The fold (0..folds-1) of every item: items of one group share a fold. With ``labels`` (one per item)
    :class:`~sklearn.model_selection.StratifiedGroupKFold`, else :class:`~sklearn.model_selection.GroupKFold`, both
    shuffled by ``seed``. ``what`` names the groups in the error when there are fewer than ``folds``."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = np.asarray([str(g) for g in groups])
    n_groups = len(np.unique(groups))
    if folds > n_groups:
        raise ValueError(f"{prefix}.folds is {folds} but the pool has only {n_groups} {what}: use at most {n_groups}")
    x = np.zeros((len(groups), 1))
    if labels is not None:
        with warnings.catch_warnings():  # "the least populated class has only n members": the folds are still made
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            split = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
                         .split(x, np.asarray([str(v) for v in labels]), groups))
    else:
        split = list(GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, groups=groups))
    out = np.full(len(groups), -1, dtype=np.int64)
    for k, (_, held) in enumerate(split):  # one pass per fold
        out[held] = k
    empty = sorted(set(range(folds)) - set(out.tolist()))
    if empty:
        raise ValueError(f"{prefix}.folds is {folds} but fold {empty[0]} received no image (too few {what} for "
                         f"that many folds): use fewer folds")
    return out


# ------------------------------------------------------------------------------------ mini-MIAS-layout folders


def _lesion_pool(root, spec: Folds) -> list:
    seen, pool = set(), []
    for split in spec.pool:
        for r in read_lesion_folder(root, split):
            if r.image_id not in seen:
                seen.add(r.image_id)
                pool.append(r)
    return pool


def _lesion_assignment(root, spec: Folds, prefix: str = "data") -> tuple[list, list[str], np.ndarray]:
    """The pool's lesion-folder records, their patients and their folds (stratified by image label)."""
    pool = _lesion_pool(root, spec)
    groups = [r.patient for r in pool]
    k = assign_folds(groups, spec.folds, spec.seed, [r.image_label for r in pool], prefix=prefix, what="patients")
    return pool, groups, k


def lesion_fold(root, spec: Folds, prefix: str = "data") -> tuple[list, list]:
    """``(train, val)`` :class:`~medetect.data.lesion_folder.LesionImage` lists of fold ``spec.fold`` of a
    mini-MIAS-layout folder."""
    pool, _, k = _lesion_assignment(root, spec, prefix)
    return ([r for r, f in zip(pool, k) if f != spec.fold], [r for r, f in zip(pool, k) if f == spec.fold])


# ------------------------------------------------------------------------------------ detection datasets


def _record_group(r) -> str:
    return next((str(r.meta[k]) for k in GROUP_KEYS if k in r.meta), r.image)


def _dataset_assignment(parts: Sequence, root: Path, spec: Folds, lesion: bool) -> tuple[list, list[str], np.ndarray]:
    """The pool's records (the parts' records, an image listed in both splits once), their groups and folds."""
    seen, records = set(), []
    for p in parts:
        for r in p.records:
            if r.image not in seen:
                seen.add(r.image)
                records.append(r)
    if lesion:  # the folder's own folds (all images of the pool splits), looked up by image id
        pool, groups, k = _lesion_assignment(root, spec)
        by_id = {r.image_id: (g, f) for r, g, f in zip(pool, groups, k.tolist())}
        missing = [r.image for r in records if Path(r.image).stem not in by_id]
        if missing:
            raise ValueError(f"{root / 'images.csv'}: image {missing[0]} of the splits {list(spec.pool)} has no row")
        found = [by_id[Path(r.image).stem] for r in records]
        return records, [g for g, _ in found], np.asarray([f for _, f in found], dtype=np.int64)
    groups = [_record_group(r) for r in records]
    what = "groups" if any(g != r.image for g, r in zip(groups, records)) else "images"
    return records, groups, assign_folds(groups, spec.folds, spec.seed, what=what)


def _lesion_format(fmt: str, root) -> bool:
    """Whether a ``fmt`` dataset at ``root`` has patients and image labels (a mini-MIAS-layout folder)."""
    return fmt == "mias" and is_lesion_folder(root)


def fold_dataset(parts: Sequence, spec: Folds, side: str, *, fmt: str, **kw):
    """The ``side`` (``"train"``: the K-1 training folds, ``"val"``: the held-out fold) of the pool made of the
    :class:`~medetect.data.datasets.DetectionDataset` ``parts`` (one per pool split of one ``fmt`` dataset), as a new
    dataset with ``kw`` (transform, cache, pre_transform)."""
    first = parts[0]
    classes = list(first.classes)
    for p in parts[1:]:
        if set(p.classes) - set(classes):
            raise ValueError(f"the splits {list(spec.pool)} have different class lists {list(first.classes)} and "
                             f"{list(p.classes)}: list the classes in data.classes")
    records, _, k = _dataset_assignment(parts, first.root, spec, _lesion_format(fmt, first.root))
    keep = (k == spec.fold) if side == "val" else (k != spec.fold)
    images = {key: v for p in parts for key, v in p.images.items()}
    ds = DetectionDataset(records=[r for r, m in zip(records, keep.tolist()) if m], root=first.root, classes=classes,
                          reader=first.reader, images=images, **kw)
    if fmt in _WHOLE_FILE_READERS:
        ds.report = first.report
    else:
        ds.report = AnnotationReport()
        for p in parts:
            ds.report.merge(p.report)
    return ds


def fold_sizes(data, prefix: str = "data") -> list[dict]:
    """Per fold of the data section ``data`` (``folds`` > 0): ``{"images": n, "groups": n}`` of its held-out
    images (groups: patients, or images for data without patients). Computing it checks that the pool can be split
    (one sentence naming ``data.folds`` when not) without reading any image."""
    spec = fold_of(data)
    if spec is None:
        raise ValueError(f"{prefix}.folds is 0: there are no folds")
    if hasattr(data, "source"):  # a detection data section: any format
        from .formats import open_dataset

        src = {**data.source(), "folds": None}
        parts = [open_dataset(**src, split=s) for s in spec.pool]
        _, groups, k = _dataset_assignment(parts, parts[0].root, spec, _lesion_format(src["fmt"], parts[0].root))
    else:  # a lesion-folder section (the attention task)
        _, groups, k = _lesion_assignment(data.root, spec, prefix)
    g = np.asarray(groups)
    return [{"images": int((k == f).sum()), "groups": len(np.unique(g[k == f]))} for f in range(spec.folds)]
