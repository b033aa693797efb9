"""Mammography metrics of a benign/malignant lesion detector (Ribli et al. 2018 style), with 95% bootstrap intervals
by patient. The lesion FROC is the library's FROC core (:mod:`medetect.evaluation.froc_core`: matching with the circle
hit test, curve points at distinct scores, ``MAMMO_FP_RATES``); the AUCs are those of
:mod:`medetect.evaluation.attention` (scikit-learn AUC, rank AUC for the draws). Tensors of any dtype (bfloat16
included) are cast to float64 first.

Inputs per image: the detections ``boxes [M, 2d]`` (``(lo.., hi..)`` voxels), ``scores [M]``, ``labels [M]`` (class
index; ``malignant_label`` is the malignant class), the lesion circles ``centres [N, d]``, ``radii [N]``,
``malignant [N]`` (bool, per lesion), the image label (``normal``/``benign``/``malignant``, which also counts
findings without a location) and the ``patient``.

* marks: every detection, at its box centre, scored by its score (any class). A mark HITS a lesion when its centre
  lies inside the lesion circle (distance <= radius). A lesion counts once (its best hitting mark is the true
  positive, and one mark inside two overlapping circles finds both; further marks inside an already-hit lesion are neither TP nor FP); a mark inside no lesion is a false
  positive. ``lesion_sensitivity``: sensitivity at :data:`~medetect.evaluation.attention.FROC_FP_RATES` mean false
  marks per image (over ALL images, normal ones included), read at distinct mark scores only (tied marks enter
  together: the order of the images does not matter); ``lesion_froc_mean`` their mean.
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
* undefined metrics (an AUC with one class only, a sensitivity without lesions, a lesion type absent from the split,
  an interval without a draw where the metric is defined) are ``None``; the report's ``"undefined"`` mapping gives
  the reason under the same key, nested keys joined by ``/`` (``"by_lesion_type/SPIC/sensitivity"``,
  ``"lesion_sensitivity/0.125"``): the convention of :mod:`medetect.evaluation.froc_core`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .attention import FROC_FP_RATES, _rank_auc, auc_reason, froc_points, image_auc
from .froc_core import FROCPoints, as_float64, ci_or_reason, circle_hit, match, note_undefined, set_metric

__all__ = ["MAMMO_KEYS", "LESION_TYPES", "image_marks", "mammo_metrics", "youden_thresholds", "confusion_table",
           "lesion_types_table", "operating_threshold", "image_scores"]

MAMMO_KEYS = ("lesion_froc_mean", "image_auc_abnormal", "image_auc_malignant", "lesion_auc_malignant")
_IMAGE_LABELS = ("normal", "benign", "malignant")
LESION_TYPES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM")  # medetect.data.annotations.mias.MIAS_CLASSES


def image_marks(boxes, scores, labels, centres, radii, malignant, *, malignant_label: int = 1) -> dict:
    """One image's marks and lesions: the FROC entries of :func:`~medetect.evaluation.attention.froc_curve`
    (``mark_scores``, ``mark_tp``, ``mark_fp``, ``n_lesions``; marks sorted by decreasing score; the FROC core's
    :func:`~medetect.evaluation.froc_core.match` with the circle hit test), the image scores ``p_abnormal``,
    ``p_malignant``, and per lesion ``detected [N]``, ``lesion_malignancy [N]``, ``lesion_malignant [N]``,
    ``lesion_best [N]`` (its best hitting mark's score, ``-inf`` when missed)."""
    b = as_float64(boxes)
    cen = as_float64(centres)
    d = b.shape[-1] // 2 if b.size else (cen.shape[-1] if cen.size else 2)
    b = b.reshape(-1, 2 * d)
    sc = as_float64(scores).reshape(-1)
    is_m = _np(labels).reshape(-1) == malignant_label
    c = cen.reshape(-1, d)
    r = as_float64(radii).reshape(-1)
    mal = _np(malignant).astype(bool).reshape(-1)
    n, m = len(r), len(sc)
    if len(b) != m or len(is_m) != m or len(c) != n or len(mal) != n:
        raise ValueError(f"image_marks: {len(b)} boxes, {m} scores, {len(is_m)} labels; {len(c)} centres, {n} radii, "
                         f"{len(mal)} severities")
    order = np.argsort(-sc, kind="stable")  # best first: a lesion's true positive is its best mark
    sc, is_m, b = sc[order], is_m[order], b[order]
    mt = match(np.zeros(m), sc, (b[:, :d] + b[:, d:]) / 2, np.zeros(n), (c, r), circle_hit(), 1)
    malig_scores = np.where(is_m, sc, 0.0)
    malignancy = np.zeros(n)  # the best malignant-class score among the marks that hit each lesion (0: none)
    np.maximum.at(malignancy, mt.pair_lesion, malig_scores[mt.pair_detection])
    return {
        "mark_scores": sc, "mark_tp": mt.tp, "mark_fp": mt.fp, "n_lesions": n,
        "p_abnormal": float(sc.max()) if m else 0.0,
        "p_malignant": float(malig_scores.max()) if m else 0.0,
        "detected": mt.lesion_hit,
        "lesion_malignancy": malignancy,
        "lesion_malignant": mal,
        "lesion_best": mt.lesion_best,
    }


def _metrics(idx: np.ndarray, marks: list[dict], y_abn, y_mal, points: FROCPoints, auc=_rank_auc) -> dict:
    """The scalar metrics over the images ``idx`` (a bootstrap draw repeats images); NaN where undefined."""
    sel = [marks[i] for i in idx]
    pa = np.array([x["p_abnormal"] for x in sel])
    pm = np.array([x["p_malignant"] for x in sel])
    det = np.concatenate([x["detected"] for x in sel]) if sel else np.zeros(0, bool)
    ls = np.concatenate([x["lesion_malignancy"] for x in sel]) if sel else np.zeros(0)
    lm = np.concatenate([x["lesion_malignant"] for x in sel]) if sel else np.zeros(0, bool)
    out = {
        "lesion_froc_mean": float(np.mean(points.sensitivity_at(FROC_FP_RATES, np.bincount(idx, minlength=len(marks))))),
        "image_auc_abnormal": auc(pa, y_abn[idx]),
        "image_auc_malignant": auc(pm, y_mal[idx]),
        "lesion_auc_malignant": auc(ls[det], lm[det]),
    }
    return {k: float("nan") if v is None else v for k, v in out.items()}


def image_scores(detections: Sequence[dict], malignant_label: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Ribli's image scores of each image's detections: ``p_abnormal`` = the highest score, ``p_malignant`` = the
    highest malignant-class score (0 without such detections)."""
    pa, pm = [], []
    for d in detections:
        sc = as_float64(d["scores"]).reshape(-1)
        is_m = _np(d["labels"]).reshape(-1) == malignant_label
        pa.append(float(sc.max()) if len(sc) else 0.0)
        pm.append(float(sc[is_m].max()) if is_m.any() else 0.0)
    return np.asarray(pa), np.asarray(pm)


def operating_threshold(marks: list[dict], fp_rate: float = 1.0) -> float:
    """The lowest mark score whose marks at or above it make at most ``fp_rate`` false marks per image over
    ``marks`` (:func:`image_marks` of every image): the point :func:`froc_curve` reads its sensitivity at (the FROC
    core's :meth:`~medetect.evaluation.froc_core.FROCPoints.threshold_at`, distinct scores only). ``inf`` when even
    the best mark is over the rate or there are no marks."""
    return froc_points(marks).threshold_at(fp_rate) if marks else float("inf")


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
    marks = [image_marks(det["boxes"], det["scores"], det["labels"], c, r, mal, malignant_label=malignant_label)
             for det, c, r, mal in zip(detections, centres, radii, malignant)]
    points = froc_points(marks)  # the FROC core's curve points, sorted once (the draws reweight the images)
    lab = np.asarray([str(x) for x in image_labels])
    y_abn, y_mal = (lab != "normal").astype(int), (lab == "malignant").astype(int)
    full = _metrics(np.arange(b), marks, y_abn, y_mal, points, auc=image_auc)
    detected = np.concatenate([x["detected"] for x in marks])
    no_lesion = "no lesion: the sensitivity is undefined"
    reasons = {"lesion_froc_mean": no_lesion,
               "image_auc_abnormal": auc_reason(y_abn, "image labels (abnormal vs normal)"),
               "image_auc_malignant": auc_reason(y_mal, "image labels (malignant vs benign + normal)"),
               "lesion_auc_malignant": auc_reason(np.concatenate([x["lesion_malignant"] for x in marks])[detected],
                                                  "detected lesions (malignant vs benign)")}
    res: dict = {}
    for k in MAMMO_KEYS:
        set_metric(res, k, full[k], reasons[k])
    rates = [f"{f:g}" for f in FROC_FP_RATES]
    res["lesion_sensitivity"] = {}
    for f, v in zip(rates, points.sensitivity_at(FROC_FP_RATES)):
        res["lesion_sensitivity"][f] = round(float(v), 4) if np.isfinite(v) else None
        if not np.isfinite(v):
            note_undefined(res, f"lesion_sensitivity/{f}", no_lesion)
    pats = np.asarray([str(p) for p in patients])
    uniq, inv = np.unique(pats, return_inverse=True)
    members = [np.nonzero(inv == j)[0] for j in range(len(uniq))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {k: [] for k in MAMMO_KEYS}
    sens_draws = []
    for _ in range(n_boot):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(uniq), len(uniq))])
        m = _metrics(idx, marks, y_abn, y_mal, points)
        for k in MAMMO_KEYS:
            draws[k].append(m[k])
        sens_draws.append(points.sensitivity_at(FROC_FP_RATES, np.bincount(idx, minlength=b)))
    for k in MAMMO_KEYS:
        res[f"{k}_ci"], why = ci_or_reason(draws[k], n_boot)
        if why:
            note_undefined(res, f"{k}_ci", why)
    s = np.asarray(sens_draws, dtype=np.float64).reshape(-1, len(rates))
    res["lesion_sensitivity_ci"] = {}
    for j, f in enumerate(rates):
        res["lesion_sensitivity_ci"][f], why = ci_or_reason(s[:, j], n_boot)
        if why:
            note_undefined(res, f"lesion_sensitivity_ci/{f}", why)
    if plot_dir is not None:
        _plots(marks, points, y_abn, y_mal, res, plot_dir)
    if lesion_types is not None:
        if len(lesion_types) != b:
            raise ValueError("lesion_types needs one entry per image")
        thr = points.threshold_at(1.0)  # the point of lesion_sensitivity["1"]
        res["by_lesion_type"] = lesion_types_table(marks, lesion_types, thr)
        for t, row in res["by_lesion_type"].items():
            if row["sensitivity"] is None:
                note_undefined(res, f"by_lesion_type/{t}/sensitivity", "no lesion of this type in the images")
        res["by_lesion_type_operating_point"] = {"fp_per_image": 1.0,
                                                 "score_threshold": thr if np.isfinite(thr) else None}
        if not np.isfinite(thr):
            note_undefined(res, "by_lesion_type_operating_point/score_threshold",
                           "no mark score keeps the false marks at or below 1 per image")
    if thresholds is not None:
        res["confusion"] = confusion_table([x["p_abnormal"] for x in marks], [x["p_malignant"] for x in marks], lab,
                                           thresholds)
    res["images"] = b
    res["patients"] = len(uniq)
    res["lesions"] = int(sum(x["n_lesions"] for x in marks))
    res["detected_lesions"] = int(detected.sum())
    res["undefined"] = res.pop("undefined", {})  # last, empty when every metric is defined
    return res


def _np(x) -> np.ndarray:
    """A tensor (floating ones, bfloat16 included, as float64) or array-like as a numpy array."""
    if isinstance(x, torch.Tensor):
        return as_float64(x) if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _plots(marks: list[dict], points: FROCPoints, y_abn, y_mal, res: dict, plot_dir) -> None:
    """``froc.png``: lesion sensitivity against mean false marks per image; ``roc.png``: the image ROC curves."""
    import os
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    fpi, sens = points.curve()  # one point per distinct mark score
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    mean = res["lesion_froc_mean"]
    ax.step(fpi, sens, where="post", lw=2,
            label=f"lesion FROC (mean {'undefined' if mean is None else f'{mean:.3f}'} over 0.125-4 FP/image)")
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
