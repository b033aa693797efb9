"""Tests of the LUNA16 FROC / CPM evaluation (medetect.evaluation.froc).

The reference below is a plain-loop transcription of the official ``noduleCADEvaluationLUNA16.py``
logic (collectNoduleAnnotations / evaluateCAD / computeFROC / computeFROC_bootstrap /
compute_mean_ci), with ``sklearn.metrics.roc_curve`` written out as loops. The vectorised module must
give the same numbers, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medetect.cli import main as cli_main
from medetect.evaluation import froc as F

OP = np.array([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# loop reference (official semantics)
# ------------------------------------------------------------------------------------------------


def roc_curve_loop(y_true, y_score):
    """sklearn.metrics.roc_curve(y_true, y_score) with its defaults (drop_intermediate=True)."""
    n = len(y_true)
    order = sorted(range(n), key=lambda i: -y_score[i])
    tps, fps, thr = [], [], []
    tp = fp = 0.0
    for k, i in enumerate(order):
        tp += y_true[i]
        fp += 1.0 - y_true[i]
        if k == n - 1 or y_score[order[k + 1]] != y_score[i]:
            tps.append(tp)
            fps.append(fp)
            thr.append(y_score[i])
    if len(fps) > 2:
        keep = [0]
        for j in range(1, len(fps) - 1):
            d2f = (fps[j + 1] - fps[j]) - (fps[j] - fps[j - 1])
            d2t = (tps[j + 1] - tps[j]) - (tps[j] - tps[j - 1])
            if d2f != 0 or d2t != 0:
                keep.append(j)
        keep.append(len(fps) - 1)
        tps = [tps[j] for j in keep]
        fps = [fps[j] for j in keep]
        thr = [thr[j] for j in keep]
    tps = [0.0] + tps
    fps = [0.0] + fps
    thr = [math.inf] + thr
    fpr = np.array([f / fps[-1] for f in fps]) if fps[-1] > 0 else np.full(len(fps), np.nan)
    tpr = np.array([t / tps[-1] for t in tps]) if tps[-1] > 0 else np.full(len(tps), np.nan)
    return fpr, tpr, np.array(thr)


def ref_compute_froc(gt, prob, n_images, exclude, roc=roc_curve_loop):
    """computeFROC. Returns None when there is no lesion (official: NaN)."""
    gt_local = [gt[i] for i in range(len(exclude)) if exclude[i] == False]  # noqa: E712
    prob_local = [prob[i] for i in range(len(exclude)) if exclude[i] == False]  # noqa: E712
    n_detected = sum(gt_local)
    n_lesions = sum(gt)
    n_cands = len(prob_local)
    if n_lesions == 0:
        return None
    if n_cands == 0:  # official: roc_curve on nothing crashes; defined as the point (0, 0)
        return np.zeros(1), np.zeros(1), np.array([math.inf])
    fpr, tpr, thr = roc(gt_local, prob_local)
    if sum(gt) == len(gt):  # no false positives
        fps = np.zeros(len(fpr))
    else:
        fps = fpr * (n_cands - n_detected) / n_images
    if n_detected == 0:  # official: tpr is NaN; defined as 0
        sens = np.zeros(len(tpr))
    else:
        sens = (tpr * n_detected) / n_lesions
    return fps, sens, thr


def ref_mean_ci(interp_sens, confidence=0.95):
    """compute_mean_ci (bounds only)."""
    lb = np.zeros(interp_sens.shape[1], dtype=interp_sens.dtype)
    ub = np.zeros(interp_sens.shape[1], dtype=interp_sens.dtype)
    pz = (1.0 - confidence) / 2.0
    for i in range(interp_sens.shape[1]):
        vec = np.array(interp_sens[:, i])
        vec.sort()
        lb[i] = vec[int(math.floor(pz * len(vec)))]
        ub[i] = vec[int(math.floor((1.0 - pz) * len(vec)))]
    return lb, ub


def reference(series, ann, exc, pred, max_marks=100, n_bootstrap=0, seed=0, roc=roc_curve_loop):
    """Rows are tuples (uid, x, y, z, diameter) / (uid, x, y, z, probability)."""
    all_nodules = {}
    for uid in series:
        nodules = [dict(x=r[1], y=r[2], z=r[3], d=r[4], state="Included") for r in ann if r[0] == uid]
        nodules += [dict(x=r[1], y=r[2], z=r[3], d=r[4], state="Excluded") for r in exc if r[0] == uid]
        all_nodules[uid] = nodules
    all_cands = {}
    for uid in series:
        cands = {}
        i = 0
        for r in pred:
            if r[0] == uid:
                cands[i] = dict(x=r[1], y=r[2], z=r[3], p=r[4])
                i += 1
        if max_marks > 0 and len(cands) > max_marks:
            probs = sorted((c["p"] for c in cands.values()), reverse=True)
            threshold = probs[max_marks]
            cands2 = {}
            for key, c in cands.items():
                if len(cands2) >= max_marks:
                    break
                if c["p"] > threshold:
                    cands2[key] = c
            cands = cands2
        all_cands[uid] = cands

    counts = dict(tp=0, fp=0, fn=0, nodules=0, ignored=0, double=0, multi=0, marks=0)
    gt_list, prob_list, divisor, exclude = [], [], [], []
    for uid in series:
        cands = all_cands[uid]
        counts["marks"] += len(cands)
        cands2 = dict(cands)
        included_hits = {}
        for nod in all_nodules[uid]:
            if nod["state"] == "Included":
                counts["nodules"] += 1
            diameter = nod["d"]
            if diameter < 0.0:
                diameter = 10.0
            radius2 = math.pow(diameter / 2.0, 2.0)
            found = False
            matches = []
            for key, c in cands.items():
                dist = (math.pow(nod["x"] - c["x"], 2.0) + math.pow(nod["y"] - c["y"], 2.0)
                        + math.pow(nod["z"] - c["z"], 2.0))
                if dist < radius2:
                    if nod["state"] == "Included":
                        found = True
                        matches.append(c)
                        included_hits[key] = included_hits.get(key, 0) + 1
                        if key not in cands2:
                            pass  # official: prints "This is strange: CAD mark detected two nodules"
                        else:
                            del cands2[key]
                    elif key in cands2:
                        counts["ignored"] += 1
                        del cands2[key]
            if len(matches) > 1:
                counts["double"] += len(matches) - 1
            if nod["state"] == "Included":
                if found:
                    max_prob = None
                    for c in matches:
                        if max_prob is None or c["p"] > max_prob:
                            max_prob = c["p"]
                    gt_list.append(1.0)
                    prob_list.append(max_prob)
                    exclude.append(False)
                    counts["tp"] += 1
                else:
                    gt_list.append(1.0)
                    prob_list.append(-1000000000.0)
                    exclude.append(True)
                    counts["fn"] += 1
                divisor.append(uid)
        counts["multi"] += sum(1 for v in included_hits.values() if v > 1)
        for c in cands2.values():
            counts["fp"] += 1
            gt_list.append(0.0)
            prob_list.append(c["p"])
            divisor.append(uid)
            exclude.append(False)

    if counts["nodules"] == 0:
        return dict(counts=counts)
    fps, sens, thr = ref_compute_froc(gt_list, prob_list, len(series), exclude, roc)
    out = dict(counts=counts, curve=(fps, sens, thr), sens=np.interp(OP, fps, sens))
    if n_bootstrap:
        per_scan = {}
        for i, uid in enumerate(divisor):
            per_scan.setdefault(uid, []).append((gt_list[i], prob_list[i], exclude[i]))
        rs = np.random.RandomState(seed)
        grid = np.linspace(0.125, 8, num=10000)
        at_op, on_grid = [], []
        for _ in range(n_bootstrap):
            draw = rs.randint(len(series), size=len(series))
            sample = []
            for j in draw:
                sample += per_scan.get(series[j], [])
            res = ref_compute_froc([s[0] for s in sample], [s[1] for s in sample], len(series),
                                   [s[2] for s in sample], roc)
            if res is None:
                continue
            at_op.append(np.interp(OP, res[0], res[1]))
            on_grid.append(np.interp(grid, res[0], res[1]).astype(np.float32))
        at_op = np.array(at_op)
        out["n_valid"] = len(at_op)
        if len(at_op):
            out["ci"] = ref_mean_ci(at_op)
            out["cpm_ci"] = ref_mean_ci(at_op.mean(axis=1)[:, None])
            out["grid_ci"] = ref_mean_ci(np.array(on_grid))
    return out


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        if header is not None:
            f.write(header + "\n")
        for r in rows:
            f.write(",".join(repr(v) if isinstance(v, float) else str(v) for v in r) + "\n")
    return path


def to_objects(ann, exc, pred):
    def annot(rows, allow):
        return F.WorldPoints.from_arrays([r[0] for r in rows],
                                         np.array([r[1:4] for r in rows], float).reshape(-1, 3),
                                         diameters=[r[4] for r in rows], allow_unknown_diameter=allow)
    p = F.WorldPoints.from_arrays([r[0] for r in pred],
                                  np.array([r[1:4] for r in pred], float).reshape(-1, 3),
                                  scores=[r[4] for r in pred])
    return annot(ann, False), annot(exc, True), p


# The hand-computed case (distances in mm):
#   scan A: N1 (0,0,0) d=10, N2 (100,0,0) d=6, excluded E1 (0,100,0) d=-1 (-> 10 mm)
#     m1 (0,0,4)    p=.9   inside N1 (4 < 5)                       -> N1 detected
#     m2 (0,0,5)    p=.95  exactly on N1's radius (not <)          -> FP
#     m3 (3,0,0)    p=.5   second hit on N1                        -> neither TP nor FP
#     m4 (100,0,2)  p=.3   inside N2                               -> N2 detected
#     m5 (0,104,0)  p=.8   inside E1 (radius 5 for diameter -1)    -> ignored
#     m6 (0,105,0)  p=.7   exactly on E1's radius                  -> FP
#     m7 (50,50,50) p=.2                                           -> FP
#   scan B: N3 (10,10,10) d=8; m8 (10,10,14.5) p=.6 (4.5 > 4)      -> FP, N3 missed
#   scan C: listed, no marks, no nodules
HAND_ANN = [("A", 0.0, 0.0, 0.0, 10.0), ("A", 100.0, 0.0, 0.0, 6.0), ("B", 10.0, 10.0, 10.0, 8.0)]
HAND_EXC = [("A", 0.0, 100.0, 0.0, -1.0)]
HAND_PRED = [("A", 0.0, 0.0, 4.0, 0.9), ("A", 0.0, 0.0, 5.0, 0.95), ("A", 3.0, 0.0, 0.0, 0.5),
             ("A", 100.0, 0.0, 2.0, 0.3), ("A", 0.0, 104.0, 0.0, 0.8), ("A", 0.0, 105.0, 0.0, 0.7),
             ("A", 50.0, 50.0, 50.0, 0.2), ("B", 10.0, 10.0, 14.5, 0.6)]
HAND_SERIES = ["A", "B", "C"]
ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm"
PRED_HEADER = "seriesuid,coordX,coordY,coordZ,probability"


@pytest.fixture
def hand_files(tmp_path):
    return dict(
        ann=write_csv(tmp_path / "annotations.csv", ANN_HEADER, HAND_ANN),
        exc=write_csv(tmp_path / "annotations_excluded.csv", ANN_HEADER, HAND_EXC),
        series=write_csv(tmp_path / "seriesuids.csv", None, [(s,) for s in HAND_SERIES]),
        pred=write_csv(tmp_path / "predictions.csv", PRED_HEADER, HAND_PRED),
    )


# ------------------------------------------------------------------------------------------------
# hand-computed cases
# ------------------------------------------------------------------------------------------------


def test_hand_computed_case(hand_files):
    r = F.froc(hand_files["ann"], hand_files["pred"], excluded=hand_files["exc"],
               seriesuids=hand_files["series"], n_bootstrap=0)
    assert (r.n_scans, r.n_nodules, r.n_tp, r.n_fn, r.n_fp) == (3, 3, 2, 1, 4)
    assert (r.n_ignored, r.n_double_hits, r.n_marks, r.n_marks_truncated) == (1, 1, 8, 0)
    # entries: .95 FP, .9 TP, .7 FP, .6 FP, .3 TP, .2 FP; the .7 point is dropped (drop_intermediate)
    np.testing.assert_array_equal(r.curve_fps * 3, [0, 1, 1, 3, 3, 4])
    np.testing.assert_array_equal(r.curve_sensitivities * 3, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(r.curve_thresholds, [np.inf, 0.95, 0.9, 0.6, 0.3, 0.2])
    # at 1 FP/scan the curve has a vertical step: np.interp takes its top (2/3)
    np.testing.assert_allclose(r.sensitivities, [0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3], rtol=0,
                               atol=1e-15)
    assert r.cpm == pytest.approx(3 / 7, abs=1e-15)
    assert r.sensitivities_ci_low is None and r.bootstrap_fps is None
    ref = reference(HAND_SERIES, HAND_ANN, HAND_EXC, HAND_PRED)
    np.testing.assert_array_equal(r.sensitivities, ref["sens"])


def test_report_names_why_the_intervals_are_null(hand_files):
    r = F.froc(hand_files["ann"], hand_files["pred"], excluded=hand_files["exc"],
               seriesuids=hand_files["series"], n_bootstrap=0)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["cpm_ci_low"] is None and d["undefined"]["cpm_ci_low"] == "no bootstrap (n_bootstrap is 0)"
    assert set(d["undefined"]) == {"sensitivities_ci_low", "sensitivities_ci_high", "cpm_ci_low", "cpm_ci_high"}
    r = F.froc(hand_files["ann"], hand_files["pred"], excluded=hand_files["exc"],
               seriesuids=hand_files["series"], n_bootstrap=20)
    assert r.to_dict()["undefined"] == {}


def test_without_excluded_file_the_mark_on_the_excluded_finding_is_fp(hand_files):
    r = F.froc(hand_files["ann"], hand_files["pred"], seriesuids=hand_files["series"], n_bootstrap=0)
    assert (r.n_fp, r.n_ignored) == (5, 0)


def test_without_series_list_scans_come_from_the_csvs(hand_files):
    r = F.froc(hand_files["ann"], hand_files["pred"], excluded=hand_files["exc"], n_bootstrap=0)
    assert r.n_scans == 2  # scan C is only in seriesuids.csv
    np.testing.assert_array_equal(r.curve_fps * 2, [0, 1, 1, 3, 3, 4])


def test_mark_on_two_nodules_detects_both_and_no_fp_case():
    ann = [("S", 0.0, 0.0, 0.0, 10.0), ("S", 4.0, 0.0, 0.0, 10.0), ("S", 50.0, 0.0, 0.0, 4.0)]
    pred = [("S", 2.0, 0.0, 0.0, 0.7)]
    a, _, p = to_objects(ann, [], pred)
    r = F.froc(a, p, n_bootstrap=0)
    assert (r.n_tp, r.n_fn, r.n_fp, r.n_marks_on_several_nodules, r.n_double_hits) == (2, 1, 0, 1, 0)
    # no false positives: the official script sets fps to zeros -> 2/3 at every rate
    np.testing.assert_array_equal(r.curve_fps, 0.0)
    np.testing.assert_allclose(r.sensitivities, 2 / 3, rtol=0, atol=1e-15)
    assert reference(["S"], ann, [], pred)["counts"]["multi"] == 1


def test_included_nodule_wins_over_excluded_finding():
    ann = [("S", 0.0, 0.0, 0.0, 10.0)]
    exc = [("S", 1.0, 0.0, 0.0, 10.0), ("S", 2.0, 0.0, 0.0, -1.0)]
    pred = [("S", 0.5, 0.0, 0.0, 0.4), ("S", 5.0, 0.0, 0.0, 0.6), ("S", 30.0, 0.0, 0.0, 0.1)]
    a, e, p = to_objects(ann, exc, pred)
    r = F.froc(a, p, excluded=e, n_bootstrap=0)
    # mark 1 hits N and both excluded -> TP; mark 2 hits two excluded findings -> ignored once
    assert (r.n_tp, r.n_fp, r.n_ignored) == (1, 1, 1)


def test_more_than_100_marks_are_truncated_like_the_official_script():
    ann = [("S", 0.0, 0.0, 0.0, 10.0), ("T", 0.0, 0.0, 0.0, 10.0)]
    # scan S: 105 FPs with distinct p = 0.01 .. 1.05 and the only TP at p = 0.02 -> the 101st
    # largest is 0.05; marks with p > 0.05 (100 of them) stay, the TP goes -> nodule missed
    pred = [("S", 100.0, 0.0, 0.0, round(0.01 * (i + 1), 2)) for i in range(105)]
    pred.append(("S", 0.0, 0.0, 0.0, 0.02))
    # scan T: ties at the cut: 98 marks at p=.9, 4 at p=.5 -> threshold .5 -> only the 98 stay
    pred += [("T", 100.0, 0.0, 0.0, 0.9)] * 98 + [("T", 0.0, 0.0, 1.0, 0.5)] * 4
    a, _, p = to_objects(ann, [], pred)
    r = F.froc(a, p, n_bootstrap=0)
    assert r.n_marks == 100 + 98 and r.n_marks_truncated == 6 + 4
    assert (r.n_tp, r.n_fn, r.n_fp) == (0, 2, 198)
    np.testing.assert_array_equal(r.sensitivities, 0.0)  # no TP: defined as 0 (official: NaN)
    r_all = F.froc(a, p, n_bootstrap=0, max_marks_per_scan=None)
    assert (r_all.n_tp, r_all.n_marks_truncated) == (2, 0)
    ref = reference(["S", "T"], ann, [], pred)
    assert ref["counts"]["marks"] == r.n_marks and ref["counts"]["fp"] == r.n_fp


def test_scan_without_marks_counts_in_fp_rate():
    ann = [("S", 0.0, 0.0, 0.0, 10.0)]
    pred = [("S", 0.0, 0.0, 0.0, 0.9), ("S", 90.0, 0.0, 0.0, 0.5)]
    a, _, p = to_objects(ann, [], pred)
    r1 = F.froc(a, p, seriesuids=["S"], n_bootstrap=0)
    r8 = F.froc(a, p, seriesuids=["S"] + [f"E{i}" for i in range(7)], n_bootstrap=0)
    assert r1.curve_fps[-1] == 1.0 and r8.curve_fps[-1] == 1 / 8
    assert r8.sensitivities[0] == 1.0 and r1.sensitivities[0] == 1.0


def test_bootstrap_is_seeded_and_matches_reference(hand_files):
    kw = dict(excluded=hand_files["exc"], seriesuids=hand_files["series"], n_bootstrap=40)
    r1 = F.froc(hand_files["ann"], hand_files["pred"], seed=3, **kw)
    r2 = F.froc(hand_files["ann"], hand_files["pred"], seed=3, **kw)
    np.testing.assert_array_equal(r1.sensitivities_ci_low, r2.sensitivities_ci_low)
    assert r1.n_bootstrap_valid <= 40 and r1.bootstrap_low.shape == (10000,)
    assert np.all(r1.sensitivities_ci_low <= r1.sensitivities_ci_high)
    ref = reference(HAND_SERIES, HAND_ANN, HAND_EXC, HAND_PRED, n_bootstrap=40, seed=3)
    assert ref["n_valid"] == r1.n_bootstrap_valid
    np.testing.assert_array_equal(r1.sensitivities_ci_low, ref["ci"][0])
    np.testing.assert_array_equal(r1.sensitivities_ci_high, ref["ci"][1])
    np.testing.assert_array_equal(r1.bootstrap_low, ref["grid_ci"][0])
    np.testing.assert_array_equal(r1.bootstrap_high, ref["grid_ci"][1])


# ------------------------------------------------------------------------------------------------
# random comparison with the loop reference
# ------------------------------------------------------------------------------------------------


def random_case(rng):
    n_scans = int(rng.integers(1, 7))
    series = [f"1.2.{rng.integers(10**6)}.{k}" for k in range(n_scans)]
    ann, exc, pred = [], [], []
    grid = bool(rng.integers(2))  # integer coordinates: many marks exactly on a radius
    for uid in series:
        centres = []
        for _ in range(int(rng.integers(0, 4))):
            c = rng.integers(-20, 20, 3).astype(float) if grid else rng.uniform(-20, 20, 3)
            d = float(rng.integers(2, 13) * 2) if grid else float(rng.uniform(3, 25))
            ann.append((uid, *map(float, c), d))
            centres.append((c, d))
        for _ in range(int(rng.integers(0, 3))):
            c = rng.integers(-20, 20, 3).astype(float) if grid else rng.uniform(-20, 20, 3)
            d = -1.0 if rng.random() < 0.5 else float(rng.integers(2, 10) * 2)
            exc.append((uid, *map(float, c), d))
            centres.append((c, d))
        n_marks = int(rng.integers(0, 30)) if rng.random() < 0.85 else int(rng.integers(95, 120))
        ties = rng.random() < 0.5
        for _ in range(n_marks):
            if centres and rng.random() < 0.5:
                c, d = centres[int(rng.integers(len(centres)))]
                r = 5.0 if d < 0 else d / 2
                if grid:
                    axis = int(rng.integers(3))
                    off = np.zeros(3)
                    off[axis] = float(rng.integers(-int(r) - 1, int(r) + 2))
                    m = c + off
                else:
                    m = c + rng.normal(0, r * 0.7, 3)
            else:
                m = rng.integers(-25, 25, 3).astype(float) if grid else rng.uniform(-25, 25, 3)
            p = float(rng.integers(0, 8)) / 8 if ties else float(rng.random())
            pred.append((uid, *map(float, m), p))
    order = rng.permutation(len(pred))
    pred = [pred[i] for i in order]
    return series, ann, exc, pred


def test_random_cases_match_loop_reference():
    rng = np.random.default_rng(20240601)
    checked = 0
    for case in range(60):
        series, ann, exc, pred = random_case(rng)
        max_marks = 100 if case % 3 else int(rng.integers(1, 6))
        n_boot = 15 if case % 4 == 0 else 0
        ref = reference(series, ann, exc, pred, max_marks=max_marks, n_bootstrap=n_boot, seed=case)
        a, e, p = to_objects(ann, exc, pred)
        if ref["counts"]["nodules"] == 0:
            with pytest.raises(F.FROCError, match="no included nodule"):
                F.froc(a, p, excluded=e, seriesuids=series, n_bootstrap=0, max_marks_per_scan=max_marks)
            continue
        r = F.froc(a, p, excluded=e, seriesuids=series, n_bootstrap=n_boot, seed=case,
                   max_marks_per_scan=max_marks)
        c = ref["counts"]
        assert (r.n_tp, r.n_fn, r.n_fp, r.n_nodules) == (c["tp"], c["fn"], c["fp"], c["nodules"])
        assert (r.n_ignored, r.n_double_hits, r.n_marks) == (c["ignored"], c["double"], c["marks"])
        assert r.n_marks_on_several_nodules == c["multi"]
        np.testing.assert_array_equal(r.curve_fps, ref["curve"][0])
        np.testing.assert_array_equal(r.curve_sensitivities, ref["curve"][1])
        np.testing.assert_array_equal(r.curve_thresholds, ref["curve"][2])
        np.testing.assert_array_equal(r.sensitivities, ref["sens"])
        assert r.cpm == float(np.mean(ref["sens"]))
        if n_boot:
            assert r.n_bootstrap_valid == ref["n_valid"]
            if ref["n_valid"]:
                np.testing.assert_array_equal(r.sensitivities_ci_low, ref["ci"][0])
                np.testing.assert_array_equal(r.sensitivities_ci_high, ref["ci"][1])
                assert r.cpm_ci_low == ref["cpm_ci"][0][0] and r.cpm_ci_high == ref["cpm_ci"][1][0]
                np.testing.assert_array_equal(r.bootstrap_low, ref["grid_ci"][0])
                np.testing.assert_array_equal(r.bootstrap_high, ref["grid_ci"][1])
        checked += 1
    assert checked > 40


def test_froc_curve_matches_reference_roc_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        labels = rng.integers(0, 2, n).astype(float)
        scores = rng.integers(0, 6, n) / 5.0
        missed = int(rng.integers(0, 3))
        if labels.sum() + missed == 0:
            continue
        f, s, t = F.froc_curve(labels, scores, labels.sum() + missed, 3)
        rf, rs, rt = ref_compute_froc(list(labels) + [1.0] * missed, list(scores) + [-1e9] * missed, 3,
                                      [False] * n + [True] * missed)
        np.testing.assert_array_equal(f, rf)
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_array_equal(t, rt)


# ------------------------------------------------------------------------------------------------
# command line and plot
# ------------------------------------------------------------------------------------------------


def test_cli_json_and_plot(hand_files, tmp_path, capsys):
    png = tmp_path / "froc.png"
    rc = cli_main(["froc", str(hand_files["ann"]), str(hand_files["pred"]), "--excluded", str(hand_files["exc"]),
                 "--seriesuids", str(hand_files["series"]), "--json", "--bootstrap", "30",
                 "--plot", str(png), "--curve"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpm"] == pytest.approx(3 / 7)
    assert out["fps"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert out["counts"]["scans"] == 3 and out["counts"]["ignored_on_excluded"] == 1
    assert out["n_bootstrap"] == 30 and len(out["sensitivities_ci_low"]) == 7
    assert out["curve"]["thresholds"][0] is None and len(out["curve"]["fps"]) == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table(hand_files, capsys):
    rc = cli_main(["froc", str(hand_files["ann"]), str(hand_files["pred"]), "--bootstrap", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "CPM" in text and "0.125" in text and "CI" not in text


def test_python_m_medetect_froc(hand_files):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "medetect", "froc", str(hand_files["ann"]),
                           str(hand_files["pred"]), "--excluded", str(hand_files["exc"]),
                           "--seriesuids", str(hand_files["series"]), "--json", "--bootstrap", "5"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cpm"] == pytest.approx(3 / 7)


def test_plot_without_bootstrap(hand_files, tmp_path):
    r = F.froc(hand_files["ann"], hand_files["pred"], n_bootstrap=0)
    F.plot_froc(r, tmp_path / "plain.png")
    assert (tmp_path / "plain.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def _error(tmp_path, capsys, ann_text=None, pred_text=None, series_text=None, exc_text=None):
    ann = tmp_path / "ann.csv"
    pred = tmp_path / "pred.csv"
    ann.write_text(ann_text if ann_text is not None else ANN_HEADER + "\nA,0,0,0,10\n")
    pred.write_text(pred_text if pred_text is not None else PRED_HEADER + "\nA,0,0,0,0.5\n")
    argv = [str(ann), str(pred), "--bootstrap", "0"]
    if series_text is not None:
        (tmp_path / "series.csv").write_text(series_text)
        argv += ["--seriesuids", str(tmp_path / "series.csv")]
    if exc_text is not None:
        (tmp_path / "exc.csv").write_text(exc_text)
        argv += ["--excluded", str(tmp_path / "exc.csv")]
    assert cli_main(["froc", *argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("kind, kwargs, expected", [
    ("missing column", dict(pred_text="seriesuid,coordX,coordY,coordZ\nA,0,0,0\n"),
     r"pred\.csv, line 1: missing column\(s\) probability"),
    ("malformed number", dict(pred_text=PRED_HEADER + "\nA,0,0,0,0.5\n\nA,0,x1,0,0.5\n"),
     r"pred\.csv, line 4: malformed number 'x1' in column 'coordY'"),
    ("empty number", dict(ann_text=ANN_HEADER + "\nA,0,0,0,\n"),
     r"ann\.csv, line 2: empty value in column 'diameter_mm'"),
    ("unknown uid", dict(pred_text=PRED_HEADER + "\nA,0,0,0,0.5\nZZ,1,1,1,0.2\n", series_text="A\nB\n"),
     r"pred\.csv, line 3: seriesuid 'ZZ' is not in the series list .*series\.csv"),
    ("negative diameter", dict(ann_text=ANN_HEADER + "\nA,0,0,0,10\nA,1,1,1,-1\n"),
     r"ann\.csv, line 3: negative diameter_mm -1\.0"),
    ("bad excluded diameter", dict(exc_text=ANN_HEADER + "\nA,5,5,5,-1\nA,1,1,1,-2.5\n"),
     r"exc\.csv, line 3: negative diameter_mm -2\.5"),
    ("nan probability", dict(pred_text=PRED_HEADER + "\nA,0,0,0,0.5\nA,0,0,0,nan\n"),
     r"pred\.csv, line 3: probability is NaN"),
    ("too few fields", dict(pred_text=PRED_HEADER + "\nA,0,0\n"), r"pred\.csv, line 2: too few fields"),
    ("duplicate series", dict(series_text="A\nB\nA\n"),
     r"series\.csv, line 3: duplicate seriesuid 'A' \(first listed on line 1\)"),
    ("empty file", dict(pred_text=""), r"pred\.csv: empty file"),
    ("no nodules", dict(ann_text=ANN_HEADER + "\n"), r"no included nodule"),
])
def test_bad_input_errors(tmp_path, capsys, kind, kwargs, expected):
    err = _error(tmp_path, capsys, **kwargs)
    assert err.startswith("medetect froc: error: ")
    assert re.search(expected, err), err


def test_series_file_header_and_blank_lines(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("seriesuid\nA\n\nB\n")
    assert F.read_luna_seriesuids(path) == ["A", "B"]
    path.write_text("A\nB\n")
    assert F.read_luna_seriesuids(path) == ["A", "B"]


def test_columns_by_name_and_extra_columns(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("probability,extra,coordZ,coordY,coordX,seriesuid\n0.5,x,3,2,1,A\n")
    pred = F.read_luna_predictions(p)
    np.testing.assert_array_equal(pred.centres, [[1.0, 2.0, 3.0]])
    assert pred.probabilities[0] == 0.5 and pred.seriesuids[0] == "A" and pred.lines[0] == 2
    a = tmp_path / "e.csv"
    a.write_text(ANN_HEADER + "\nA,0,0,0,-1\n")
    with pytest.raises(F.FROCInputError, match="line 2: negative diameter"):
        F.read_luna_annotations(a)
    assert F.read_luna_annotations(a, allow_unknown_diameter=True).diameters[0] == -1.0


def test_empty_predictions_and_no_cap(tmp_path, capsys):
    ann = write_csv(tmp_path / "a.csv", ANN_HEADER, HAND_ANN)
    pred = tmp_path / "p.csv"
    pred.write_text(PRED_HEADER + "\n")
    r = F.froc(ann, pred, n_bootstrap=10)
    assert (r.n_scans, r.n_tp, r.n_fn, r.n_fp, r.n_marks) == (2, 0, 3, 0, 0)
    np.testing.assert_array_equal(r.sensitivities, 0.0)
    np.testing.assert_array_equal(r.sensitivities_ci_high, 0.0)
    assert cli_main(["froc", str(ann), str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: cannot open file" in capsys.readouterr().err
    assert cli_main(["froc", str(ann), str(pred), "--max-marks", "0", "--bootstrap", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_marks_per_scan"] is None


def test_world_points_inputs_are_checked_for_their_role():
    ann = F.WorldPoints.from_arrays(["A"], [[0.0, 0.0, 0.0]], diameters=[10.0])
    with pytest.raises(F.FROCInputError, match=r"<arrays>, row 1: probability is NaN"):
        F.froc(ann, ann, n_bootstrap=0)  # annotations given as predictions: they have no scores
    marks = F.WorldPoints.from_arrays(["A"], [[1.0, 0.0, 0.0]], scores=[0.5])
    with pytest.raises(F.FROCInputError, match=r"row 1: diameter_mm is NaN"):
        F.froc(marks, marks, n_bootstrap=0)
    assert F.froc(ann, marks, n_bootstrap=0).n_tp == 1
    from medetect.evaluation.plots import plot_froc

    assert F.plot_froc is plot_froc
