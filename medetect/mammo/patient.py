"""Patient-level model: the detector's image scores combined with what MIAS records beside the
image — both breasts of the patient and the breast tissue type — in a small scikit-learn logistic regression.

Features per patient (:func:`patient_features`, from the per-image detections and :func:`read_lesion_folder`
records; image scores as Ribli: ``p_abnormal`` = highest detection score, ``p_malignant`` = highest malignant-class
score):

* ``max_p_abnormal``, ``max_p_malignant``: over the patient's images (both breasts);
* ``diff_p_abnormal``, ``diff_p_malignant``: ``|left - right|`` of the per-breast maxima (images.csv ``side``; 0 when a
  side is missing, counted in ``patients_one_side``) — a suspicious breast stands out against the other;
* ``tissue_F``, ``tissue_G``, ``tissue_D``: one-hot MIAS background tissue (fatty / fatty-glandular / dense).

Targets per patient: ``abnormal`` (any image benign or malignant) and ``malignant`` (any malignant image). The
image-only baseline is ``max_p_abnormal`` resp. ``max_p_malignant`` alone (the patient's highest image score).

:func:`patient_study`: for each target a ``StandardScaler + LogisticRegression`` whose ``C`` is chosen from
:data:`C_GRID` by the ROC AUC of ``cross_val_predict`` over ``folds`` stratified folds of the TRAIN patients (one row
per patient, so the folds are grouped by patient by construction); refit on all train patients with that ``C``;
scored on the VAL patients against the baseline: AUCs (scikit-learn), 95% percentile bootstrap intervals resampling
patients, and the paired difference ``model - baseline`` with its interval (``adds_auc``: the interval lies above 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..evaluation.attention import _rank_auc, auc_reason, image_auc
from ..evaluation.froc_core import note_undefined
from ..evaluation.mammo import image_scores
from . import CLASSES

__all__ = ["C_GRID", "FEATURES", "patient_features", "patient_study", "format_patient_table"]

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
FEATURES = ("max_p_abnormal", "max_p_malignant", "diff_p_abnormal", "diff_p_malignant", "tissue_F", "tissue_G",
            "tissue_D")
_BASELINE = {"abnormal": "max_p_abnormal", "malignant": "max_p_malignant"}


def patient_features(recs: Sequence, dets: Sequence[dict]) -> dict:
    """Per patient (sorted ids): ``X [P, len(FEATURES)]``, ``y_abnormal``, ``y_malignant`` (int), ``patients``,
    ``patients_one_side`` and ``unknown_tissue`` (counts). ``recs``: :class:`~medetect.attention.data.LesionImage`
    (``patient``, ``side``, ``tissue``, ``image_label``); ``dets``: their detections (``scores``, ``labels``)."""
    if len(recs) != len(dets):
        raise ValueError(f"{len(recs)} images but {len(dets)} detection sets")
    if not len(recs):
        raise ValueError("no images for the patient features")
    pa, pm = image_scores(dets, malignant_label=list(CLASSES).index("malignant"))
    pats = sorted({r.patient for r in recs})
    row = {p: i for i, p in enumerate(pats)}
    P = len(pats)
    side_a = np.full((P, 2), np.nan)  # per breast (L, R) maximum p_abnormal / p_malignant
    side_m = np.full((P, 2), np.nan)
    tissue = np.zeros((P, 3))
    y_abn, y_mal = np.zeros(P, int), np.zeros(P, int)
    max_a, max_m = np.zeros(P), np.zeros(P)
    for r, a, m in zip(recs, pa, pm):
        i = row[r.patient]
        max_a[i], max_m[i] = max(max_a[i], a), max(max_m[i], m)
        y_abn[i] |= r.image_label != "normal"
        y_mal[i] |= r.image_label == "malignant"
        s = {"L": 0, "R": 1}.get(str(r.side).strip().upper()[:1])
        if s is not None:
            side_a[i, s] = np.fmax(side_a[i, s], a)
            side_m[i, s] = np.fmax(side_m[i, s], m)
        t = "FGD".find(str(r.tissue).strip().upper()[:1]) if r.tissue else -1
        if t >= 0:
            tissue[i, t] = 1.0
    both = ~np.isnan(side_a).any(1)
    diff_a = np.where(both, np.abs(side_a[:, 0] - side_a[:, 1]), 0.0)
    diff_m = np.where(both, np.abs(side_m[:, 0] - side_m[:, 1]), 0.0)
    tissue = tissue / np.maximum(tissue.sum(1, keepdims=True), 1)  # two images, two tissue types: split evenly
    X = np.column_stack([max_a, max_m, diff_a, diff_m, tissue])
    return {"patients": pats, "X": X, "y_abnormal": y_abn, "y_malignant": y_mal,
            "patients_one_side": int((~both).sum()), "unknown_tissue": int((tissue.sum(1) == 0).sum())}


def _model(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))


def _choose_c(X, y, folds: int, seed: int) -> tuple[float, dict]:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    k = int(min(folds, np.bincount(y).min()))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 train patients of each class, got {np.bincount(y).tolist()}")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    aucs = {}
    for C in C_GRID:
        p = cross_val_predict(_model(C), X, y, cv=cv, method="predict_proba")[:, 1]
        aucs[f"{C:g}"] = round(image_auc(p, y), 4)
    best = max(C_GRID, key=lambda c: (aucs[f"{c:g}"], -abs(np.log10(c))))  # ties: the C nearest 1
    return best, aucs


def _boot(y, a, b, n_boot: int, seed: int) -> tuple[list, list, list]:
    rng = np.random.default_rng(seed)
    da, db, dd = [], [], []
    n = len(y)
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        x, z = _rank_auc(a[i], y[i]), _rank_auc(b[i], y[i])
        if np.isfinite(x) and np.isfinite(z):
            da.append(x), db.append(z), dd.append(x - z)

    def ci(v):
        return [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)] if v else [None, None]

    return ci(da), ci(db), ci(dd)


def patient_study(train_recs, train_dets, val_recs, val_dets, *, n_boot: int = 1000, seed: int = 0,
                  folds: int = 5) -> dict:
    """The study of the module docstring -> a JSON-ready dict: per target (``abnormal``, ``malignant``) the chosen
    ``C``, the cross-validated train AUC per ``C`` (``cv_auc``) and of the baseline, the val AUCs of the model and the
    baseline with ``_ci``, ``auc_gain`` (model - baseline) with ``auc_gain_ci`` and ``adds_auc``, the standardised
    coefficients per feature; plus patient counts and ``undefined`` (``{"<target>/<key>": reason}`` of the null values,
    e.g. an AUC on val patients of one class: :mod:`medetect.evaluation.froc_core`'s convention)."""
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    tr, va = patient_features(train_recs, train_dets), patient_features(val_recs, val_dets)
    res: dict = {"features": list(FEATURES), "train_patients": len(tr["patients"]),
                 "val_patients": len(va["patients"]), "folds": folds, "n_boot": n_boot,
                 "C_grid": list(C_GRID), "patients_one_side": tr["patients_one_side"] + va["patients_one_side"],
                 "unknown_tissue": tr["unknown_tissue"] + va["unknown_tissue"]}
    for target in ("abnormal", "malignant"):
        y, yv = tr[f"y_{target}"], va[f"y_{target}"]
        C, cv_auc = _choose_c(tr["X"], y, folds, seed)
        model = _model(C).fit(tr["X"], y)
        p = model.predict_proba(va["X"])[:, 1]
        base_i = FEATURES.index(_BASELINE[target])
        base = va["X"][:, base_i]
        auc_m, auc_b = image_auc(p, yv), image_auc(base, yv)
        ci_m, ci_b, ci_d = _boot(yv, p, base, n_boot, seed)
        lr = model[-1]
        res[target] = {
            "C": C, "cv_auc": cv_auc, "cv_auc_baseline": round(image_auc(tr["X"][:, base_i], y), 4),
            "train_positive": int(y.sum()), "val_positive": int(yv.sum()),
            "val_auc_model": _r(auc_m), "val_auc_model_ci": ci_m,
            "val_auc_baseline": _r(auc_b), "val_auc_baseline_ci": ci_b,
            "auc_gain": None if auc_m is None or auc_b is None else _r(auc_m - auc_b), "auc_gain_ci": ci_d,
            "adds_auc": bool(ci_d[0] is not None and ci_d[0] > 0),
            "coefficients": {f: round(float(c), 4) for f, c in zip(FEATURES, lr.coef_[0])},
            "val_scores": {pid: round(float(s), 4) for pid, s in zip(va["patients"], p)},
        }
        if auc_m is None:  # one class among the val patients: the AUCs and their gain are undefined
            why = auc_reason(yv, "val patients")
            for k in ("val_auc_model", "val_auc_baseline", "auc_gain"):
                note_undefined(res, f"{target}/{k}", why)
        for k in ("val_auc_model_ci", "val_auc_baseline_ci", "auc_gain_ci"):
            if res[target][k][0] is None:
                note_undefined(res, f"{target}/{k}", "no bootstrap draws (n_boot is 0)" if n_boot == 0
                               else "undefined in every bootstrap draw")
    res["undefined"] = res.pop("undefined", {})  # {key: reason} of the null values (medetect.evaluation.froc_core)
    return res


def _r(x: float | None):
    return round(float(x), 4) if x is not None and np.isfinite(x) else None


def format_patient_table(res: dict) -> str:
    """A Markdown table of :func:`patient_study`'s val AUCs (the table of docs/results.md)."""
    lines = ["| patient-level target (val) | image-only baseline AUC | patient model AUC | gain (model - baseline) | "
             "chosen C (5-fold CV AUC on train, model / baseline) |", "|---|---|---|---|---|"]
    for t, name in (("abnormal", "abnormal vs normal"), ("malignant", "malignant vs rest")):
        r = res[t]

        def f(k, r=r):
            lo, hi = r[f"{k}_ci"]
            v = r[k]
            return f"{v:.3f} ({lo:.2f}-{hi:.2f})" if v is not None and lo is not None else f"{v}"

        c = f"{r['C']:g}"
        lines.append(f"| {name} ({r['val_positive']} / {res['val_patients']} patients) | {f('val_auc_baseline')} | "
                     f"{f('val_auc_model')} | {f('auc_gain')} | {c} ({r['cv_auc'][c]:.3f} / "
                     f"{r['cv_auc_baseline']:.3f}) |")
    return "\n".join(lines)
