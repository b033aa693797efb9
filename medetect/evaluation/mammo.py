"""Mammography metrics of a benign/malignant lesion detector (Ribli et al. 2018 style), with 95% bootstrap intervals
by patient. Reuses :mod:`medetect.evaluation.attention` (FROC rates and curve, scikit-learn AUC, rank AUC).

Inputs per image: the detections ``boxes [M, 2d]`` (``(lo.., hi..)`` voxels), ``scores [M]``, ``labels [M]`` (class
index; ``malignant_label`` is the malignant class), the lesion circles ``centres [N, d]``, ``radii [N]``,
``malignant [N]`` (bool, per lesion), the image label (``normal``/``benign``/``malignant``, which also counts
findings without a location) and the ``patient``.

* marks: every detection, at its box centre, scored by its score (any class). A mark HITS a lesion when its centre
  lies inside the lesion circle (distance <= radius). A lesion counts once (its best hitting mark is the true
  positive, and one mark inside two overlapping circles finds both; further marks inside an already-hit lesion are neither TP nor FP); a mark inside no lesion is a false
  positive. ``lesion_sensitivity``: sensitivity at :data:`~medetect.evaluation.attention.FROC_FP_RATES` mean false
  marks per image (over ALL images, normal ones included); ``lesion_froc_mean`` their mean.
* image scores (Ribli): ``p(abnormal)`` = the highest mark score of the image, ``p(malignant)`` = the highest score of
  its malignant-class marks (0 without marks). ``image_auc_abnormal``: abnormal (benign or malignant) vs normal;
  ``image_auc_malignant``: malignant vs benign + normal.
* ``lesion_auc_malignant``: over DETECTED lesions (hit by at least one mark), malignant vs benign, the lesion's
  malignancy score being the highest malignant-class score among the marks that hit it (0 when only benign marks do).
* ``by_lesion_type`` (when the lesion types are given): per MIAS type (CALC, CIRC, SPIC, MISC, ARCH, ASYM, then any
  other type met) ``{"lesions": n, "detected": k, "sensitivity": k / n}`` at the 1 FP/image operating point of the
  split (the same point as ``lesion_sensitivity["1"]``: the lowest mark score such that the marks at or above it
  make at most 1 false mark per image; a lesion is detected when its best hitting mark scores at or above it);
  ``by_lesion_type_operating_point`` holds that score threshold (``null`` when no point reaches the rate).
* ``confusion`` (when ``thresholds`` are given, see :func:`youden_thresholds`): image level, rows = true
  ``normal``/``benign``/``malignant``, columns = predicted: ``normal`` when ``p(abnormal) < t_abnormal``, else
  ``malignant`` when ``p(malignant) >= t_malignant``, else ``benign``.
* ``<key>_ci``: ``[lo, hi]`` 2.5/97.5 percentiles of ``n_boot`` draws of patients with replacement (seeded); a draw
  where a metric is undefined (one class only) is left out of that metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..heatmaps import points_in_circles
from .attention import FROC_FP_RATES, _rank_auc, froc_curve, image_auc

__all__ = ["MAMMO_KEYS", "LESION_TYPES", "image_marks", "mammo_metrics", "youden_thresholds", "confusion_table",
           "lesion_types_table", "operating_threshold", "image_scores"]

MAMMO_KEYS = ("lesion_froc_mean", "image_auc_abnormal", "image_auc_malignant", "lesion_auc_malignant")
_IMAGE_LABELS = ("normal", "benign", "malignant")
LESION_TYPES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM")  # medetect.data.annotations.mias.MIAS_CLASSES


def image_marks(boxes, scores, labels, centres, radii, malignant, *, malignant_label: int = 1) -> dict:
    """One image's marks and lesions: the FROC entries of :func:`~medetect.evaluation.attention.froc_curve`
    (``mark_scores``, ``mark_tp``, ``mark_fp``, ``n_lesions``), the image scores ``p_abnormal``, ``p_malignant``, and
    per lesion ``detected [N]``, ``lesion_malignancy [N]``, ``lesion_malignant [N]``."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
    cen = np.asarray(centres, dtype=np.float32)
    d = b.shape[-1] // 2 if b.numel() else (cen.shape[-1] if cen.size else 2)
    b = b.reshape(-1, 2 * d)
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_m = np.asarray(labels).reshape(-1) == malignant_label
    c = torch.as_tensor(cen.reshape(-1, d))
    r = torch.as_tensor(np.asarray(radii, dtype=np.float32).reshape(-1))
    mal = np.asarray(malignant, dtype=bool).reshape(-1)
    n, m = int(r.numel()), len(sc)
    if len(b) != m or len(is_m) != m or len(c) != n or len(mal) != n:
        raise ValueError(f"image_marks: {len(b)} boxes, {m} scores, {len(is_m)} labels; {len(c)} centres, {n} radii, "
                         f"{len(mal)} severities")
    order = np.argsort(-sc, kind="stable")  # best first: a lesion's true positive is its best mark
    sc, is_m, b = sc[order], is_m[order], b[torch.as_tensor(order.copy())]
    hit = np.zeros((m, n), bool)
    if m and n:
        hit = points_in_circles((b[:, :d] + b[:, d:]) / 2, c, r).numpy()
    tp = np.zeros(m, np.int64)  # per mark: how many lesions it is the best hit of (overlapping circles: > 1)
    if m:
        first = np.where(hit.any(0), hit.argmax(0), -1)
        np.add.at(tp, first[first >= 0], 1)
    malig_scores = np.where(is_m, sc, 0.0)
    return {
        "mark_scores": sc, "mark_tp": tp, "mark_fp": ~hit.any(1), "n_lesions": n,
        "p_abnormal": float(sc.max()) if m else 0.0,
        "p_malignant": float(malig_scores.max()) if m else 0.0,
        "detected": hit.any(0),
        "lesion_malignancy": (hit * malig_scores[:, None]).max(0) if m else np.zeros(n),
        "lesion_malignant": mal,
        "lesion_best": np.where(hit.any(0), (np.where(hit, sc[:, None], -np.inf)).max(0), -np.inf) if m
        else np.full(n, -np.inf),
    }


def _metrics(idx: np.ndarray, marks: list[dict], y_abn, y_mal, auc) -> dict:
    sel = [marks[i] for i in idx]
    pa = np.array([x["p_abnormal"] for x in sel])
    pm = np.array([x["p_malignant"] for x in sel])
    det = np.concatenate([x["detected"] for x in sel]) if sel else np.zeros(0, bool)
    ls = np.concatenate([x["lesion_malignancy"] for x in sel]) if sel else np.zeros(0)
    lm = np.concatenate([x["lesion_malignant"] for x in sel]) if sel else np.zeros(0, bool)
    return {
        "lesion_froc_mean": float(np.mean(froc_curve(sel))),
        "image_auc_abnormal": auc(pa, y_abn[idx]),
        "image_auc_malignant": auc(pm, y_mal[idx]),
        "lesion_auc_malignant": auc(ls[det], lm[det]),
    }


def image_scores(detections: Sequence[dict], malignant_label: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Ribli's image scores of each image's detections: ``p_abnormal`` = the highest score, ``p_malignant`` = the
    highest malignant-class score (0 without such detections)."""
    pa, pm = [], []
    for d in detections:
        sc = _np(d["scores"]).astype(np.float64).reshape(-1)
        is_m = _np(d["labels"]).reshape(-1) == malignant_label
        pa.append(float(sc.max()) if len(sc) else 0.0)
        pm.append(float(sc[is_m].max()) if is_m.any() else 0.0)
    return np.asarray(pa), np.asarray(pm)


def operating_threshold(marks: list[dict], fp_rate: float = 1.0) -> float:
    """The lowest mark score whose marks at or above it make at most ``fp_rate`` false marks per image over
    ``marks`` (:func:`image_marks` of every image): the point :func:`froc_curve` reads its sensitivity at.
    ``inf`` when even the best mark is over the rate or there are no marks."""
    if not marks:
        return float("inf")
    sc = np.concatenate([x["mark_scores"] for x in marks])
    fp = np.concatenate([x["mark_fp"] for x in marks])
    if not len(sc):
        return float("inf")
    order = np.argsort(-sc, kind="stable")
    ok = np.nonzero(np.cumsum(fp[order]) / len(marks) <= fp_rate)[0]
    return float(sc[order][ok[-1]]) if len(ok) else float("inf")


def lesion_types_table(marks: list[dict], lesion_types, threshold: float) -> dict:
    """``{type: {"lesions", "detected", "sensitivity"}}`` at the score ``threshold`` (module docstring), the MIAS types
    first (a type absent from the split has 0 lesions and sensitivity ``None``), then any other type in order met."""
    types = np.concatenate([np.asarray(t, dtype=str).reshape(-1) for t in lesion_types]) if len(lesion_types) \
        else np.zeros(0, str)
    best = np.concatenate([x["lesion_best"] for x in marks]) if marks else np.zeros(0)
    if len(types) != len(best):
        raise ValueError(f"lesion_types: {len(types)} types for {len(best)} lesions")
    names = list(LESION_TYPES) + [t for t in dict.fromkeys(types.tolist()) if t not in LESION_TYPES]
    out = {}
    for t in names:
        sel = types == t
        n, k = int(sel.sum()), int((best[sel] >= threshold).sum())
        out[t] = {"lesions": n, "detected": k, "sensitivity": round(k / n, 4) if n else None}
    return out


def youden_thresholds(p_abnormal, p_malignant, image_labels) -> dict:
    """Image-level operating thresholds picked by Youden's J (max TPR - FPR, scikit-learn ``roc_curve``) on the
    given (TRAIN) images: ``t_abnormal`` for abnormal vs normal on ``p_abnormal``, ``t_malignant`` for malignant vs
    benign + normal on ``p_malignant``. A class missing from the images is a ``ValueError``."""
    from sklearn.metrics import roc_curve

    lab = np.asarray([str(x) for x in image_labels])
    out = {"rule": "youden"}
    for key, y, p in (("t_abnormal", lab != "normal", p_abnormal), ("t_malignant", lab == "malignant", p_malignant)):
        y = np.asarray(y, dtype=int)
        if len(np.unique(y)) < 2:
            raise ValueError(f"cannot pick {key} by Youden's J: the threshold images hold one class only")
        fpr, tpr, thr = roc_curve(y, np.asarray(p, dtype=np.float64))
        j = int(np.argmax(tpr - fpr))
        out[key] = float(min(thr[j], 1.0))  # roc_curve's first threshold is inf (nothing positive)
    return out


def confusion_table(p_abnormal, p_malignant, image_labels, thresholds: dict) -> dict:
    """Image-level confusion (module docstring): ``{"labels": [...], "matrix": rows true x columns predicted,
    "accuracy", "t_abnormal", "t_malignant", ...}`` (the ``thresholds`` entries are copied in)."""
    lab = np.asarray([str(x) for x in image_labels])
    pa, pm = np.asarray(p_abnormal, dtype=np.float64), np.asarray(p_malignant, dtype=np.float64)
    pred = np.where(pa < thresholds["t_abnormal"], 0, np.where(pm >= thresholds["t_malignant"], 2, 1))
    bad = sorted(set(lab.tolist()) - set(_IMAGE_LABELS))
    if bad:
        raise ValueError(f"image labels must be normal, benign or malignant, got {bad[0]!r}")
    true = np.array([_IMAGE_LABELS.index(x) for x in lab], dtype=int)
    mat = np.zeros((3, 3), int)
    np.add.at(mat, (true, pred), 1)
    return {**thresholds, "labels": list(_IMAGE_LABELS), "matrix": mat.tolist(),
            "accuracy": round(float(np.trace(mat) / max(1, mat.sum())), 4)}


def mammo_metrics(detections: Sequence[dict], centres, radii, malignant, image_labels, patients, *,
                  malignant_label: int = 1, n_boot: int = 1000, seed: int = 0, plot_dir=None, lesion_types=None,
                  thresholds: dict | None = None) -> dict:
    """Every metric of the module docstring with ``<key>_ci``, ``lesion_sensitivity`` (FP rate -> sensitivity) and
    its ``_ci`` (per rate), ``images``, ``lesions``, ``detected_lesions``, ``patients``. ``detections``: per image a
    dict with ``boxes``, ``scores``, ``labels`` (tensors or arrays). ``plot_dir``: also write ``froc.png`` (lesion
    FROC) and ``roc.png`` (the image ROC curves) there. ``lesion_types`` (per image, one type per located lesion):
    adds ``by_lesion_type``; ``thresholds`` (``t_abnormal``, ``t_malignant``, e.g. :func:`youden_thresholds` of the
    train images): adds ``confusion``."""
    b = len(detections)
    if not (len(centres) == len(radii) == len(malignant) == len(image_labels) == len(patients) == b):
        raise ValueError("detections, centres, radii, malignant, image_labels and patients need one entry per image")
    if b == 0:
        raise ValueError("no images to evaluate")
    if n_boot < 0:
        raise ValueError(f"--n-boot must be >= 0, got {n_boot}")
    bad = sorted({str(x) for x in image_labels} - set(_IMAGE_LABELS))
    if bad:
        raise ValueError(f"image labels must be normal, benign or malignant, got {bad[0]!r}")
    marks = [image_marks(_np(det["boxes"]), _np(det["scores"]), _np(det["labels"]), c, r, mal,
                         malignant_label=malignant_label)
             for det, c, r, mal in zip(detections, centres, radii, malignant)]
    lab = np.asarray([str(x) for x in image_labels])
    y_abn, y_mal = (lab != "normal").astype(int), (lab == "malignant").astype(int)
    everything = np.arange(b)
    res = _metrics(everything, marks, y_abn, y_mal, image_auc)
    rates = [f"{f:g}" for f in FROC_FP_RATES]
    res["lesion_sensitivity"] = dict(zip(rates, froc_curve(marks).round(4).tolist()))
    pats = np.asarray([str(p) for p in patients])
    uniq, inv = np.unique(pats, return_inverse=True)
    members = [np.nonzero(inv == j)[0] for j in range(len(uniq))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {k: [] for k in MAMMO_KEYS}
    sens_draws = []
    for _ in range(n_boot):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(uniq), len(uniq))])
        m = _metrics(idx, marks, y_abn, y_mal, _rank_auc)
        for k in MAMMO_KEYS:
            draws[k].append(m[k])
        sens_draws.append(froc_curve([marks[i] for i in idx]))
    for k in MAMMO_KEYS:
        res[f"{k}_ci"] = _ci(np.asarray(draws[k], dtype=np.float64))
    s = np.asarray(sens_draws, dtype=np.float64).reshape(-1, len(rates))
    res["lesion_sensitivity_ci"] = {f: _ci(s[:, j]) for j, f in enumerate(rates)}
    if plot_dir is not None:
        _plots(marks, y_abn, y_mal, res, plot_dir)
    if lesion_types is not None:
        if len(lesion_types) != b:
            raise ValueError("lesion_types needs one entry per image")
        thr = operating_threshold(marks, 1.0)
        res["by_lesion_type"] = lesion_types_table(marks, lesion_types, thr)
        res["by_lesion_type_operating_point"] = {"fp_per_image": 1.0,
                                                 "score_threshold": thr if np.isfinite(thr) else None}
    if thresholds is not None:
        res["confusion"] = confusion_table([x["p_abnormal"] for x in marks], [x["p_malignant"] for x in marks], lab,
                                           thresholds)
    res["images"] = b
    res["patients"] = len(uniq)
    res["lesions"] = int(sum(x["n_lesions"] for x in marks))
    res["detected_lesions"] = int(sum(int(x["detected"].sum()) for x in marks))
    for k in MAMMO_KEYS:  # JSON has no NaN: an undefined metric (one class only) is null
        if not np.isfinite(res[k]):
            res[k] = None
    return res


def _ci(v: np.ndarray) -> list:
    v = v[np.isfinite(v)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [None, None]


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _plots(marks: list[dict], y_abn, y_mal, res: dict, plot_dir) -> None:
    """``froc.png``: lesion sensitivity against mean false marks per image; ``roc.png``: the image ROC curves."""
    import os
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_les = max(1, sum(x["n_lesions"] for x in marks))
    sc = np.concatenate([x["mark_scores"] for x in marks])
    order = np.argsort(-sc, kind="stable")
    tp = np.concatenate([x["mark_tp"] for x in marks])[order]
    fp = np.concatenate([x["mark_fp"] for x in marks])[order]
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(np.r_[0, np.cumsum(fp) / len(marks)], np.r_[0, np.cumsum(tp) / n_les], where="post", lw=2,
            label=f"lesion FROC (mean {res['lesion_froc_mean']:.3f} over 0.125-4 FP/image)")
    ax.set_xscale("symlog", linthresh=0.125)
    ax.set_xlim(0, 8)
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.4)
    ax.set_xlabel("Mean false marks per image")
    ax.set_ylabel("Lesion sensitivity")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(os.fspath(out / "froc.png"), dpi=120)
    fig = Figure(figsize=(5.2, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, y, key in (("abnormal vs normal", y_abn, "p_abnormal"), ("malignant vs rest", y_mal, "p_malignant")):
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, [x[key] for x in marks])
            auc = res[f"image_auc_{name.split()[0]}"]
            ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("False positive rate (images)")
    ax.set_ylabel("True positive rate (images)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(os.fspath(out / "roc.png"), dpi=120)
