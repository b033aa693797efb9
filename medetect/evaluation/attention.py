"""Metrics of an attention (or saliency) classifier: image AUC, pointing game, attention mass in lesion, lesion FROC of
the attention's local maxima, and 95% bootstrap intervals by patient.

Inputs per image (any d; maps are on the grid of the image they describe, lesions in that grid's voxels):
``scores [K]`` image probabilities, ``labels [K]``, ``saliency [*S]`` non-negative, ``centres [N, d]`` and ``radii
[N]`` of the lesion circles/spheres (``spacing`` per axis turns radii into voxels, default 1), ``patient``.

* ``image_auc_<class>``: ROC AUC (scikit-learn; the bootstrap draws use the equal rank formula) of ``scores[:, k]`` against ``labels[:, k]`` over all images.
* ``pointing_game``: over images WITH lesions, the fraction whose saliency arg-max (voxel centre) lies inside a lesion
  (distance <= radius; ties: the first voxel in C order).
* ``attention_in_lesion``: over images with lesions, the mean fraction of the saliency mass inside the union of the
  lesions (voxel centres inside).
* ``attention_froc``: marks = local maxima of each image's saliency (3^d max filter, at most ``max_marks`` per
  image, those >= ``min_peak`` x the image's maximum), scored ``p_abnormal x saliency / max saliency``. A mark inside
  a lesion is a true positive for that lesion (a lesion counts once, by its best mark; further marks in an already-hit
  lesion are neither TP nor FP); any other mark is a false positive. Sensitivity = hit lesions / all lesions, at mean
  FP per image (over ALL images, normal ones included) of :data:`FROC_FP_RATES`; ``attention_froc_mean`` their mean
  (the mammography FROC convention: lesion sensitivity against false marks per image).
* ``_ci``: ``[lo, hi]`` 95% percentile bootstrap, resampling PATIENTS with replacement (``n_boot`` draws, seeded).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..heatmaps import circle_mask, points_in_circles

__all__ = ["FROC_FP_RATES", "image_auc", "local_maxima", "image_localisation", "froc_curve", "attention_metrics"]

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


def image_auc(scores, labels) -> float:
    """ROC AUC (scikit-learn); ``nan`` when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The same AUC as :func:`image_auc` (Mann-Whitney U with average ranks for ties), without scikit-learn's
    per-call overhead: used for the bootstrap draws (tested equal to scikit-learn)."""
    from scipy.stats import rankdata

    y = labels.astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def local_maxima(saliency: torch.Tensor, max_marks: int = 5, min_peak: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Local maxima of ``[*S]`` (3^d max filter, plateaus keep every voxel): ``(points [M, d] voxel centres, values
    [M] / max)``, highest first, at most ``max_marks``, only values >= ``min_peak`` x max."""
    s = torch.as_tensor(saliency, dtype=torch.float32)
    d = s.ndim
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
    m = pool(s[None, None], 3, 1, 1)[0, 0]
    top = s.amax().clamp_min(1e-30)
    peak = (s >= m) & (s >= min_peak * top) & (s > 0)
    idx = peak.nonzero()  # [M, d]
    vals = s[peak] / top  # same C order as nonzero
    order = torch.argsort(vals, descending=True, stable=True)[:max_marks]
    return idx[order].float() + 0.5, vals[order]


def image_localisation(saliency, centres, radii, *, spacing=None, score: float = 1.0, max_marks: int = 5,
                       min_peak: float = 0.1) -> dict:
    """Per-image localisation: ``pointing`` (bool or None without lesions), ``mass`` (float or None), and the FROC
    marks ``mark_scores [M]``, ``mark_tp [M]`` (first/best hit of a lesion), ``mark_fp [M]``, ``n_lesions``."""
    s = torch.as_tensor(np.asarray(saliency), dtype=torch.float32)
    c = torch.as_tensor(np.asarray(centres, dtype=np.float64).reshape(-1, s.ndim), dtype=torch.float32)
    r = torch.as_tensor(np.asarray(radii, dtype=np.float64).reshape(-1), dtype=torch.float32)
    n = int(r.numel())
    out: dict = {"n_lesions": n, "pointing": None, "mass": None}
    if n:
        flat = int(torch.argmax(s.reshape(-1)))
        am = torch.tensor(np.unravel_index(flat, tuple(s.shape)), dtype=torch.float32) + 0.5
        out["pointing"] = bool(points_in_circles(am[None], c, r, spacing=spacing).any())
        union = circle_mask(c, r, tuple(s.shape), spacing=spacing).any(0)
        out["mass"] = float((s * union).sum() / s.sum().clamp_min(1e-30))
    pts, vals = local_maxima(s, max_marks, min_peak)
    sc = score * vals.numpy().astype(np.float64)
    tp = np.zeros(len(sc), bool)
    fp = np.ones(len(sc), bool)
    if n and len(sc):
        hit = points_in_circles(pts, c, r, spacing=spacing).numpy()  # [M, N]
        fp = ~hit.any(1)
        # a lesion is found by its best (first, marks sorted by value) hitting mark
        first = np.where(hit.any(0), hit.argmax(0), -1)
        tp[first[first >= 0]] = True
    out.update(mark_scores=sc, mark_tp=tp, mark_fp=fp)
    return out


def froc_curve(locs: Sequence[dict], fp_rates: Sequence[float] = FROC_FP_RATES) -> np.ndarray:
    """Lesion sensitivity at each mean-FP-per-image rate, over the images ``locs`` (:func:`image_localisation`)."""
    n_les = sum(loc["n_lesions"] for loc in locs)
    if not n_les or not locs:
        return np.full(len(fp_rates), np.nan)
    sc = np.concatenate([loc["mark_scores"] for loc in locs])
    tp = np.concatenate([loc["mark_tp"] for loc in locs])
    fp = np.concatenate([loc["mark_fp"] for loc in locs])
    order = np.argsort(-sc, kind="stable")
    ctp = np.cumsum(tp[order]) / n_les
    cfp = np.cumsum(fp[order]) / len(locs)
    out = []
    for f in fp_rates:
        ok = cfp <= f
        out.append(float(ctp[ok].max()) if ok.any() else 0.0)
    return np.asarray(out)


def _metrics(idx: np.ndarray, scores, labels, locs, class_names, auc=image_auc) -> dict:
    res = {}
    for k, name in enumerate(class_names):
        res[f"image_auc_{name}"] = auc(scores[idx, k], labels[idx, k])
    loc = [locs[i] for i in idx]
    pg = [x["pointing"] for x in loc if x["pointing"] is not None]
    ms = [x["mass"] for x in loc if x["mass"] is not None]
    res["pointing_game"] = float(np.mean(pg)) if pg else float("nan")
    res["attention_in_lesion"] = float(np.mean(ms)) if ms else float("nan")
    res["attention_froc_mean"] = float(np.mean(froc_curve(loc)))
    return res


def attention_metrics(scores, labels, saliencies, centres, radii, patients, *, class_names=("abnormal", "malignant"),
                      spacing=None, n_boot: int = 1000, seed: int = 0, max_marks: int = 5,
                      min_peak: float = 0.1) -> dict:
    """Every metric of the module docstring plus ``<key>_ci``, ``attention_froc`` (sensitivities at
    ``FROC_FP_RATES``) and counts. ``scores``/``labels`` ``[B, K]``; the other arguments per image."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    b = len(scores)
    if not (len(saliencies) == len(centres) == len(radii) == len(patients) == b == len(labels)):
        raise ValueError("scores, labels, saliencies, centres, radii and patients need one entry per image")
    if b == 0:
        raise ValueError("no images to evaluate")
    locs = [image_localisation(s, c, r, spacing=spacing, score=float(scores[i, 0]), max_marks=max_marks,
                               min_peak=min_peak) for i, (s, c, r) in enumerate(zip(saliencies, centres, radii))]
    res = _metrics(np.arange(b), scores, labels, locs, class_names)
    res["attention_froc"] = dict(zip((f"{f:g}" for f in FROC_FP_RATES), froc_curve(locs).round(4).tolist()))
    pats = np.asarray([str(p) for p in patients])
    uniq, inv = np.unique(pats, return_inverse=True)
    members = [np.nonzero(inv == j)[0] for j in range(len(uniq))]
    rng = np.random.default_rng(seed)
    keys = [k for k in res if k != "attention_froc"]
    draws = {k: [] for k in keys}
    for _ in range(n_boot):  # bootstrap draws (each one vectorised over its images)
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[j] for j in pick])
        m = _metrics(idx, scores, labels, locs, class_names, auc=_rank_auc)
        for k in keys:
            draws[k].append(m[k])
    for k in keys:
        v = np.asarray(draws[k], dtype=np.float64)
        v = v[np.isfinite(v)]
        res[f"{k}_ci"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [None, None]
    res["n_images"] = b
    res["n_patients"] = len(uniq)
    res["n_localised_images"] = sum(x["pointing"] is not None for x in locs)
    res["n_lesions"] = sum(x["n_lesions"] for x in locs)
    return res
