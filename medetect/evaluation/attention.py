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
  image, those >= ``min_peak`` x the image's maximum), scored ``p_abnormal x saliency / max saliency``. The FROC is
  the library's FROC core (:mod:`medetect.evaluation.froc_core`) with the circle hit test (mark inside the lesion
  circle, distance <= radius): a lesion counts once, by its best mark (one mark inside overlapping circles finds them
  all); further marks in an already-hit lesion are neither TP nor FP; any other mark is a false positive. Sensitivity
  = hit lesions / all lesions at the mean FP per image (over ALL images, normal ones included) of
  :data:`FROC_FP_RATES` (the core's ``MAMMO_FP_RATES``), read at distinct mark scores only (tied marks enter
  together, so the image order does not matter); ``attention_froc_mean`` their mean (the mammography FROC
  convention: lesion sensitivity against false marks per image).
* ``_ci``: ``[lo, hi]`` 95% percentile bootstrap, resampling PATIENTS with replacement (``n_boot`` draws, seeded).
* undefined metrics (an AUC with one class only, the localisation metrics without a located lesion, the FROC without
  lesions, an interval without a draw where the metric is defined) are ``None``, with the reason under the same key in
  the report's ``"undefined"`` mapping (the convention of :mod:`medetect.evaluation.froc_core`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..heatmaps import circle_mask, points_in_circles
from .froc_core import MAMMO_FP_RATES, FROCPoints, as_float64, ci_or_reason, circle_hit, match, note_undefined, set_metric

__all__ = ["FROC_FP_RATES", "image_auc", "auc_reason", "local_maxima", "image_localisation", "froc_points", "froc_curve",
           "attention_metrics"]

FROC_FP_RATES = MAMMO_FP_RATES


def image_auc(scores, labels) -> float | None:
    """ROC AUC (scikit-learn) of ``scores`` against binary ``labels`` (tensors of any dtype, bfloat16 included, or
    arrays; cast to float64 first); ``None`` when only one class is present (undefined; :func:`auc_reason` says
    why)."""
    from sklearn.metrics import roc_auc_score

    y = as_float64(labels).reshape(-1).astype(int)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, as_float64(scores).reshape(-1)))


def auc_reason(labels, what: str = "labels") -> str:
    """Why the AUC of ``labels`` is undefined: no sample, or only one class (which one)."""
    y = as_float64(labels).reshape(-1).astype(bool)
    if not len(y):
        return f"no {what}"
    return f"only one class in the {what} (all {'positive' if y.all() else 'negative'})"


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The same AUC as :func:`image_auc` (Mann-Whitney U with average ranks for ties), without scikit-learn's
    per-call overhead: used for the bootstrap draws (tested equal to scikit-learn). ``nan`` when only one class is
    present (the draws leave it out)."""
    from scipy.stats import rankdata

    scores = as_float64(scores)
    y = as_float64(labels).astype(bool)
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
    marks (the core's :func:`~medetect.evaluation.froc_core.match`, circle hit): ``mark_scores [M]``, ``mark_tp [M]``
    (how many lesions the mark is the first/best hit of), ``mark_fp [M]``, ``n_lesions``."""
    s = torch.as_tensor(as_float64(saliency), dtype=torch.float32)
    c64 = as_float64(centres).reshape(-1, s.ndim)
    r64 = as_float64(radii).reshape(-1)
    c = torch.as_tensor(c64, dtype=torch.float32)
    r = torch.as_tensor(r64, dtype=torch.float32)
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
    m = match(np.zeros(len(sc)), sc, pts.numpy(), np.zeros(n), (c64, r64), circle_hit(spacing), 1)
    out.update(mark_scores=sc, mark_tp=m.tp, mark_fp=m.fp)
    return out


def froc_points(locs: Sequence[dict]) -> FROCPoints:
    """The FROC core's curve points of the images ``locs`` (:func:`image_localisation` or
    :func:`~medetect.evaluation.mammo.image_marks`: ``mark_scores``, ``mark_tp``, ``mark_fp``, ``n_lesions``)."""
    image = np.repeat(np.arange(len(locs)), [len(loc["mark_scores"]) for loc in locs])
    cat = [np.concatenate([np.zeros(0)] + [np.asarray(loc[k], dtype=np.float64) for loc in locs])
           for k in ("mark_scores", "mark_tp", "mark_fp")]
    return FROCPoints(image, cat[0], cat[1], cat[2].astype(bool), [loc["n_lesions"] for loc in locs])


def froc_curve(locs: Sequence[dict], fp_rates: Sequence[float] = FROC_FP_RATES) -> np.ndarray:
    """Lesion sensitivity at each mean-FP-per-image rate, over the images ``locs`` (:func:`froc_points`; tied
    scores enter together); NaN when there is no lesion (undefined: the reports write ``None``)."""
    if not locs:
        return np.full(len(fp_rates), np.nan)
    return froc_points(locs).sensitivity_at(fp_rates)


def _metrics(idx: np.ndarray, scores, labels, locs, class_names, points: FROCPoints, auc=_rank_auc) -> dict:
    """The scalar metrics over the images ``idx`` (a bootstrap draw repeats images); NaN where undefined."""
    res = {}
    for k, name in enumerate(class_names):
        a = auc(scores[idx, k], labels[idx, k])
        res[f"image_auc_{name}"] = float("nan") if a is None else a
    loc = [locs[i] for i in idx]
    pg = [x["pointing"] for x in loc if x["pointing"] is not None]
    ms = [x["mass"] for x in loc if x["mass"] is not None]
    res["pointing_game"] = float(np.mean(pg)) if pg else float("nan")
    res["attention_in_lesion"] = float(np.mean(ms)) if ms else float("nan")
    sens = points.sensitivity_at(FROC_FP_RATES, np.bincount(idx, minlength=len(locs)))
    res["attention_froc_mean"] = float(np.mean(sens))
    return res


def attention_metrics(scores, labels, saliencies, centres, radii, patients, *, class_names=("abnormal", "malignant"),
                      spacing=None, n_boot: int = 1000, seed: int = 0, max_marks: int = 5,
                      min_peak: float = 0.1) -> dict:
    """Every metric of the module docstring plus ``<key>_ci``, ``attention_froc`` (sensitivities at
    ``FROC_FP_RATES``), counts and ``undefined`` (``{key: reason}`` of the ``None`` metrics). ``scores``/``labels``
    ``[B, K]`` (tensors of any dtype or arrays; float64 inside); the other arguments per image."""
    scores = as_float64(scores)
    labels = as_float64(labels)
    b = len(scores)
    if not (len(saliencies) == len(centres) == len(radii) == len(patients) == b == len(labels)):
        raise ValueError("scores, labels, saliencies, centres, radii and patients need one entry per image")
    if b == 0:
        raise ValueError("no images to evaluate")
    locs = [image_localisation(s, c, r, spacing=spacing, score=float(scores[i, 0]), max_marks=max_marks,
                               min_peak=min_peak) for i, (s, c, r) in enumerate(zip(saliencies, centres, radii))]
    points = froc_points(locs)
    every = np.arange(b)
    full = _metrics(every, scores, labels, locs, class_names, points, auc=image_auc)
    res: dict = {}
    reasons = {f"image_auc_{name}": auc_reason(labels[:, k]) for k, name in enumerate(class_names)}
    reasons.update(pointing_game="no image with a located lesion", attention_in_lesion="no image with a located lesion",
                   attention_froc_mean="no lesion: the sensitivity is undefined")
    for k, v in full.items():
        set_metric(res, k, v, reasons[k])
    sens = points.sensitivity_at(FROC_FP_RATES)
    res["attention_froc"] = {}
    for f, v in zip(FROC_FP_RATES, sens):
        res["attention_froc"][f"{f:g}"] = round(float(v), 4) if np.isfinite(v) else None
        if not np.isfinite(v):
            note_undefined(res, f"attention_froc/{f:g}", reasons["attention_froc_mean"])
    pats = np.asarray([str(p) for p in patients])
    uniq, inv = np.unique(pats, return_inverse=True)
    members = [np.nonzero(inv == j)[0] for j in range(len(uniq))]
    rng = np.random.default_rng(seed)
    keys = list(full)
    draws = {k: [] for k in keys}
    for _ in range(n_boot):  # bootstrap draws (each one vectorised over its images)
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[j] for j in pick])
        m = _metrics(idx, scores, labels, locs, class_names, points)
        for k in keys:
            draws[k].append(m[k])
    for k in keys:
        res[f"{k}_ci"], why = ci_or_reason(draws[k], n_boot)
        if why:
            note_undefined(res, f"{k}_ci", why)
    res["n_images"] = b
    res["n_patients"] = len(uniq)
    res["n_localised_images"] = sum(x["pointing"] is not None for x in locs)
    res["n_lesions"] = sum(x["n_lesions"] for x in locs)
    res["undefined"] = res.pop("undefined", {})  # last, empty when every metric is defined
    return res
