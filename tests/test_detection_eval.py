"""VOC / COCO detection mAP: hand-computed cases, loop references, pycocotools agreement, 2D == extruded 3D."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from medetect.evaluation.detection import (
    COCO_IOU_THRESHOLDS,
    COCO_RECALL_THRESHOLDS,
    DetectionEvaluator,
    evaluate_coco,
    evaluate_voc,
)
from medetect.evaluation.plots import pr_curve_png


def img(gt_boxes, gt_labels=None, dt_boxes=(), scores=(), dt_labels=None, **flags):
    gb = np.asarray(gt_boxes, np.float64).reshape(-1, 4) if len(gt_boxes) else np.zeros((0, 4))
    db = np.asarray(dt_boxes, np.float64).reshape(-1, 4) if len(dt_boxes) else np.zeros((0, 4))
    g = {"boxes": gb, "labels": np.zeros(len(gb), np.int64) if gt_labels is None else np.asarray(gt_labels)}
    g.update({k: np.asarray(v, bool) for k, v in flags.items()})
    p = {"boxes": db, "scores": np.asarray(scores, np.float64),
         "labels": np.zeros(len(db), np.int64) if dt_labels is None else np.asarray(dt_labels)}
    return p, g


# ----------------------------------------------------------------------------------------------- hand-computed cases

# One image, two ground truths, three detections: TP (0.9), FP (0.8, no overlap), TP (0.7).
# cumulative tp = 1, 1, 2; fp = 0, 1, 1 -> recall .5, .5, 1; precision 1, .5, 2/3.
HAND_GT = [[0, 0, 10, 10], [20, 20, 30, 30]]
HAND_DT = [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]
HAND_SC = [0.9, 0.8, 0.7]


def test_voc_hand_case_all_point_and_11_point():
    p, g = img(HAND_GT, dt_boxes=HAND_DT, scores=HAND_SC)
    r = evaluate_voc([p], [g])
    np.testing.assert_allclose(r["recall"][0], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(r["precision"][0], [1.0, 0.5, 2 / 3])
    # envelope: 1 up to recall .5, then 2/3 up to recall 1 -> .5 * 1 + .5 * 2/3
    assert r["ap"][0] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert r["map"] == pytest.approx(5 / 6, abs=1e-12)
    assert (r["num_gt"][0], r["num_det"][0], r["num_tp"][0], r["num_fp"][0]) == (2, 3, 2, 1)
    # 11-point: t = 0, .1, .., .5 -> 1 (six points); t = .6, .., 1 -> 2/3 (five points)
    r07 = evaluate_voc([p], [g], use_07_metric=True)
    assert r07["ap"][0] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)


def test_coco_hand_case():
    p, g = img(HAND_GT, dt_boxes=HAND_DT, scores=HAND_SC)
    r = evaluate_coco([p], [g])
    # exact boxes: same at every IoU threshold; 101-point: r <= .5 (51 points) -> 1, r > .5 (50 points) -> 2/3
    want = (51 + 50 * 2 / 3) / 101
    assert r["map"] == pytest.approx(want, abs=1e-12)
    assert r["map_50"] == pytest.approx(want, abs=1e-12)
    assert r["map_75"] == pytest.approx(want, abs=1e-12)
    assert r["mar"] == 1.0
    assert r["precision"].shape == (10, 101, 1, 1)


def test_voc_duplicate_of_argmax_is_fp_but_coco_rematches():
    # Two overlapping ground truths (IoU 9/11). The second detection's best-IoU ground truth is the already matched A:
    # the devkit counts it as a duplicate (FP) although B (IoU 9/11 > .5) is free. COCO matches it to B instead.
    gts = [[0, 0, 10, 10], [0, 1, 10, 11]]
    p, g = img(gts, dt_boxes=[[0, 0, 10, 10], [0, 0, 10, 10]], scores=[0.9, 0.8])
    r = evaluate_voc([p], [g])
    np.testing.assert_array_equal(r["recall"][0], [0.5, 0.5])
    assert r["ap"][0] == pytest.approx(0.5, abs=1e-12)
    c = evaluate_coco([p], [g])
    # thresholds .5 .. .8 (7 of them, <= 9/11): AP 1; .85, .9, .95: second detection is an FP -> 51/101
    assert c["map"] == pytest.approx((7 * 1.0 + 3 * 51 / 101) / 10, abs=1e-12)
    assert c["map_50"] == pytest.approx(1.0)


def test_perfect_detections_give_ap_one_2d_and_3d():
    rng = np.random.default_rng(0)
    for d in (2, 3):
        preds, gts = [], []
        for _ in range(4):
            lo = rng.integers(0, 50, (5, d)).astype(float)
            boxes = np.concatenate([lo, lo + rng.integers(1, 10, (5, d))], axis=1)
            labels = rng.integers(0, 3, 5)
            gts.append({"boxes": boxes, "labels": labels})
            preds.append({"boxes": boxes.copy(), "scores": rng.random(5), "labels": labels.copy()})
        for use07 in (False, True):
            r = evaluate_voc(preds, gts, use_07_metric=use07, num_classes=3)
            present = np.isin(np.arange(3), np.concatenate([g["labels"] for g in gts]))
            np.testing.assert_allclose(r["ap"][present], 1.0, atol=1e-12)
            assert r["map"] == pytest.approx(1.0)
        c = evaluate_coco(preds, gts)
        assert c["map"] == c["map_50"] == c["map_75"] == pytest.approx(1.0)


def test_no_detections_give_ap_zero_and_classes_without_gt_are_nan():
    p, g = img(HAND_GT, gt_labels=[0, 0])
    r = evaluate_voc([p], [g], num_classes=2)
    assert r["ap"][0] == 0.0 and math.isnan(r["ap"][1]) and r["map"] == 0.0
    assert evaluate_voc([p], [g], use_07_metric=True)["ap"][0] == 0.0
    c = evaluate_coco([p], [g], num_classes=2)
    assert c["ap"][0] == 0.0 and math.isnan(c["ap"][1]) and c["map"] == 0.0 and c["mar"] == 0.0
    # detections of a class without ground truth are left out of the mean
    p2, g2 = img(HAND_GT, dt_boxes=HAND_GT + [[70, 70, 80, 80]], scores=[0.9, 0.8, 0.95], dt_labels=[0, 0, 1])
    assert evaluate_voc([p2], [g2])["map"] == 1.0
    assert evaluate_coco([p2], [g2])["map"] == pytest.approx(1.0)


def test_difficult_and_ignored_ground_truth():
    # The top detection hits the difficult box: neither TP nor FP (it stays in the devkit's curve as a flat step);
    # only the non-difficult box counts.
    p, g = img(HAND_GT, dt_boxes=HAND_GT, scores=[0.9, 0.8], difficult=[True, False])
    r = evaluate_voc([p], [g])
    assert r["num_gt"][0] == 1 and r["num_difficult"][0] == 1
    np.testing.assert_array_equal(r["recall"][0], [0.0, 1.0])
    np.testing.assert_array_equal(r["precision"][0], [0.0, 1.0])
    assert r["ap"][0] == 1.0 and (r["num_tp"][0], r["num_fp"][0]) == (1, 0)
    # same as if neither the difficult box nor its detection existed
    p1, g1 = img(HAND_GT[1:], dt_boxes=[[20, 20, 30, 30]], scores=[0.8])
    assert evaluate_voc([p1], [g1])["ap"][0] == r["ap"][0]
    # COCO: the "ignore" (and "difficult") flag does the same
    for key in ("ignore", "difficult"):
        gi = {"boxes": g["boxes"], "labels": g["labels"], key: np.array([True, False])}
        c = evaluate_coco([p], [gi])
        assert c["map"] == pytest.approx(1.0) and c["num_gt"][0] == 1
    # A second detection on the ignored (non-crowd) box is an FP: it absorbs one detection only.
    p3 = {"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], float),
          "scores": np.array([0.9, 0.85, 0.8]), "labels": np.zeros(3, np.int64)}
    gi = {"boxes": g["boxes"], "labels": g["labels"], "ignore": np.array([True, False])}
    # kept: FP (0.85) then TP (0.8) -> precision envelope 1/2 at every recall threshold
    assert evaluate_coco([p3], [gi])["map"] == pytest.approx(0.5, abs=1e-12)


def test_coco_crowd_absorbs_many_detections():
    # A crowd region covering two detections (intersection over the detection = 1): both ignored.
    p, g = img([[0, 0, 40, 40], [50, 50, 60, 60]], dt_boxes=[[0, 0, 10, 10], [10, 10, 20, 20], [50, 50, 60, 60]],
               scores=[0.9, 0.8, 0.7], iscrowd=[True, False])
    c = evaluate_coco([p], [g])
    assert c["map"] == pytest.approx(1.0) and c["num_gt"][0] == 1


def test_voc_threshold_is_strict_as_voc_eval():
    # IoU exactly 0.5: FP for voc_eval (ovmax > thr), TP for VOCevaldet.m (>=) and for COCO (>= t)
    p, g = img([[0, 0, 10, 10]], dt_boxes=[[0, 0, 10, 20]], scores=[0.9])
    assert evaluate_voc([p], [g])["ap"][0] == 0.0
    assert evaluate_voc([p], [g], iou_inclusive=True)["ap"][0] == 1.0
    assert evaluate_coco([p], [g])["map_50"] == pytest.approx(1.0)  # COCO precision is tp / (tp + fp + eps)


def test_voc07_uses_the_devkit_arange_points():
    # 10 ground truths, 3 found first: recall tops out at 0.3 < np.arange(0, 1.1, .1)[3] = 0.30000000000000004,
    # so only t = 0, .1, .2 see precision 1 -> 3/11 (not 4/11).
    gts = [[10 * i, 0, 10 * i + 5, 5] for i in range(10)]
    p, g = img(gts, dt_boxes=gts[:3], scores=[0.9, 0.8, 0.7])
    assert evaluate_voc([p], [g], use_07_metric=True)["ap"][0] == pytest.approx(3 / 11, abs=1e-12)


def test_coco_max_dets_per_image_and_class():
    # two detections, the best-scored one is an FP; max_dets=1 keeps only it
    p, g = img([[0, 0, 10, 10]], dt_boxes=[[50, 50, 60, 60], [0, 0, 10, 10]], scores=[0.9, 0.8])
    assert evaluate_coco([p], [g], max_dets=1)["map"] == 0.0
    # max_dets=2: FP then TP -> recall 0, 1 and precision 0, 1/2; the envelope is 1/2 at every recall threshold
    assert evaluate_coco([p], [g], max_dets=2)["map"] == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------------------------- loop references


def iou_py(a, b):
    d = len(a) // 2
    inter = 1.0
    for k in range(d):
        inter *= max(0.0, min(a[d + k], b[d + k]) - max(a[k], b[k]))
    va = vb = 1.0
    for k in range(d):
        va *= a[d + k] - a[k]
        vb *= b[d + k] - b[k]
    union = va + vb - inter
    return inter / union if union > 0 else 0.0


def voc_reference(preds, gts, K, thr=0.5, use07=False, inclusive=False):
    """The devkit's voc_eval, one detection at a time (stable sort instead of quicksort)."""
    aps = []
    for c in range(K):
        recs, npos = {}, 0
        for i, g in enumerate(gts):
            m = np.asarray(g["labels"]) == c
            diff = np.asarray(g.get("difficult", np.zeros(len(m), bool)))[m]
            recs[i] = (np.asarray(g["boxes"])[m].tolist(), diff.tolist(), [False] * int(m.sum()))
            npos += int((~diff).sum())
        dets = [(i, float(s), list(b)) for i, p in enumerate(preds)
                for b, s, lab in zip(np.asarray(p["boxes"]), p["scores"], p["labels"]) if lab == c]
        dets.sort(key=lambda x: -x[1])
        tp, fp = [], []
        for i, _, b in dets:
            bbs, diff, used = recs[i]
            ovmax, jmax = -np.inf, -1
            for j, bg in enumerate(bbs):
                o = iou_py(b, bg)
                if o > ovmax:
                    ovmax, jmax = o, j
            t = f = 0
            if (ovmax >= thr) if inclusive else (ovmax > thr):
                if not diff[jmax]:
                    if not used[jmax]:
                        t, used[jmax] = 1, True
                    else:
                        f = 1
            else:
                f = 1
            tp.append(t)
            fp.append(f)
        if npos == 0:
            aps.append(float("nan"))
            continue
        ctp, cfp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
        rec = ctp / npos
        prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        if use07:
            ap = 0.0
            for t in np.arange(0.0, 1.1, 0.1):
                p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
                ap += p / 11.0
        else:
            mrec = np.concatenate([[0.0], rec, [1.0]])
            mpre = np.concatenate([[0.0], prec, [0.0]])
            for k in range(len(mpre) - 1, 0, -1):
                mpre[k - 1] = max(mpre[k - 1], mpre[k])
            idx = np.where(mrec[1:] != mrec[:-1])[0]
            ap = float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
        aps.append(ap)
    return np.array(aps)


def coco_reference(preds, gts, K, thrs=COCO_IOU_THRESHOLDS, max_dets=100, area=(0.0, np.inf)):
    """COCOeval.evaluateImg + accumulate, one detection / ground truth at a time; returns precision [T, R, K]."""
    T, R = len(thrs), len(COCO_RECALL_THRESHOLDS)
    prec_out = np.full((T, R, K), np.nan)

    def vol(b):
        d = len(b) // 2
        return float(np.prod(np.asarray(b[d:]) - np.asarray(b[:d])))

    for c in range(K):
        scores, matched, ignored, npig = [], [], [], 0
        for p, g in zip(preds, gts):
            gm = np.asarray(g["labels"]) == c
            n = int(gm.sum())
            gb = np.asarray(g["boxes"])[gm]
            crowd = np.asarray(g.get("iscrowd", np.zeros(len(gm), bool)))[gm]
            flag = (np.asarray(g.get("ignore", np.zeros(len(gm), bool)))[gm]
                    | np.asarray(g.get("difficult", np.zeros(len(gm), bool)))[gm] | crowd)
            gig = [bool(flag[j]) or not (area[0] <= vol(gb[j]) <= area[1]) for j in range(n)]
            gorder = sorted(range(n), key=lambda j: gig[j])  # stable: ignored last
            dm = np.asarray(p["labels"]) == c
            db, ds = np.asarray(p["boxes"])[dm], np.asarray(p["scores"])[dm]
            dorder = sorted(range(len(db)), key=lambda j: -ds[j])[:max_dets]
            npig += sum(1 for j in range(n) if not gig[j])
            dtm = np.zeros((T, len(dorder)), bool)
            dig = np.zeros((T, len(dorder)), bool)
            for ti, t in enumerate(thrs):
                gtm = [False] * n
                for di, dj in enumerate(dorder):
                    best, m = min(t, 1 - 1e-10), -1
                    for gj in gorder:
                        if gtm[gj] and not crowd[gj]:
                            continue
                        if m > -1 and not gig[m] and gig[gj]:
                            break
                        if crowd[gj]:
                            d = len(gb[gj]) // 2
                            inter = 1.0  # crowd: intersection over the detection's volume
                            for k in range(d):
                                inter *= max(0.0, min(db[dj][d + k], gb[gj][d + k]) - max(db[dj][k], gb[gj][k]))
                            o = inter / vol(db[dj]) if vol(db[dj]) > 0 else 0.0
                        else:
                            o = iou_py(db[dj], gb[gj])
                        if o < best:
                            continue
                        best, m = o, gj
                    if m == -1:
                        continue
                    dtm[ti, di], dig[ti, di], gtm[m] = True, gig[m], True
            for di, dj in enumerate(dorder):
                if not dtm[:, di].all():
                    dig[~dtm[:, di], di] |= not (area[0] <= vol(db[dj]) <= area[1])
            scores += [ds[j] for j in dorder]
            matched.append(dtm)
            ignored.append(dig)
        if npig == 0:
            continue
        order = sorted(range(len(scores)), key=lambda j: -scores[j])
        dtm = np.concatenate([np.zeros((T, 0), bool)] + matched, axis=1)[:, order]
        dig = np.concatenate([np.zeros((T, 0), bool)] + ignored, axis=1)[:, order]
        for ti in range(T):
            tp = np.cumsum(dtm[ti] & ~dig[ti]).astype(float)
            fp = np.cumsum(~dtm[ti] & ~dig[ti]).astype(float)
            rc = tp / npig
            pr = (tp / (fp + tp + np.spacing(1))).tolist()
            for i in range(len(pr) - 1, 0, -1):
                if pr[i] > pr[i - 1]:
                    pr[i - 1] = pr[i]
            q = np.zeros(R)
            for ri, rt in enumerate(COCO_RECALL_THRESHOLDS):
                pi = int(np.searchsorted(rc, rt, side="left"))
                if pi < len(pr):
                    q[ri] = pr[pi]
            prec_out[ti, :, c] = q
    return prec_out


def random_case(rng, d, K=3, n_images=5, scale=1.0, max_gt=6, max_dt=9, flags=()):
    preds, gts = [], []
    for _ in range(n_images):
        ng, nd = int(rng.integers(0, max_gt + 1)), int(rng.integers(0, max_dt + 1))
        lo = rng.integers(0, 12, (ng, d))
        gb = np.concatenate([lo, lo + rng.integers(1, 9, (ng, d))], axis=1) * scale
        g = {"boxes": gb.astype(float), "labels": rng.integers(0, K, ng)}
        for f in flags:
            g[f] = rng.random(ng) < 0.2
        # detections: jittered copies of ground truths plus random boxes
        src = gb[rng.integers(0, ng, nd)] if ng else np.zeros((nd, 2 * d))
        jit = rng.integers(-2, 3, (nd, 2 * d)) * scale
        lo2 = rng.integers(0, 12, (nd, d))
        rnd = np.concatenate([lo2, lo2 + rng.integers(1, 9, (nd, d))], axis=1) * scale
        db = np.where(rng.random((nd, 1)) < 0.7, src + jit, rnd)
        db[:, d:] = np.maximum(db[:, d:], db[:, :d] + scale)  # keep hi > lo
        labels = np.where(rng.random(nd) < 0.8, g["labels"][rng.integers(0, ng, nd)] if ng else 0,
                          rng.integers(0, K, nd))
        preds.append({"boxes": db.astype(float), "scores": np.round(rng.random(nd), 1), "labels": labels})
        gts.append(g)
    return preds, gts


@pytest.mark.parametrize("d", [2, 3])
def test_voc_matches_loop_reference(d):
    rng = np.random.default_rng(10 + d)
    for trial in range(12):
        preds, gts = random_case(rng, d, flags=("difficult",))
        use07, incl = bool(trial % 2), trial % 3 == 0
        thr = [0.5, 0.3, 0.7][trial % 3]
        ours = evaluate_voc(preds, gts, iou_threshold=thr, use_07_metric=use07, num_classes=3, iou_inclusive=incl)
        ref = voc_reference(preds, gts, 3, thr, use07, incl)
        np.testing.assert_allclose(ours["ap"], ref, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("d", [2, 3])
def test_coco_matches_loop_reference(d):
    rng = np.random.default_rng(20 + d)
    for trial in range(8):
        preds, gts = random_case(rng, d, flags=("ignore", "iscrowd"))
        max_dets = [100, 3][trial % 2]
        area = [(0.0, np.inf), (0.0, 30.0 ** (d / 2))][trial // 2 % 2]
        ours = evaluate_coco(preds, gts, max_dets=max_dets, num_classes=3, area_ranges={"r": area})
        ref = coco_reference(preds, gts, 3, max_dets=max_dets, area=area)
        np.testing.assert_allclose(ours["precision"][..., 0], ref, rtol=0, atol=1e-12, equal_nan=True)


# ----------------------------------------------------------------------------------------------- pycocotools


def run_pycocotools(preds, gts, K, max_dets=(1, 10, 100)):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from medetect.convert import boxes_to_xywh

    anns, dts = [], []
    for i, (p, g) in enumerate(zip(preds, gts)):
        crowd = g.get("iscrowd", np.zeros(len(g["labels"]), bool))
        for b, lab, cr in zip(boxes_to_xywh(g["boxes"]), g["labels"], crowd):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab) + 1, "bbox": b.tolist(),
                         "area": float(b[2] * b[3]), "iscrowd": int(cr)})
        for b, s, lab in zip(boxes_to_xywh(p["boxes"]), p["scores"], p["labels"]):
            dts.append({"image_id": i + 1, "category_id": int(lab) + 1, "bbox": b.tolist(), "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": [{"id": i + 1} for i in range(len(gts))], "annotations": anns,
                        "categories": [{"id": k + 1} for k in range(K)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dts), "bbox")
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats.copy()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # AP@[.5:.95] at the largest maxDets, as summarize() averages it
    stats[0] = prec[prec > -1].mean() if (prec > -1).any() else -1
    return stats


def _same(a, b):
    a = float("nan") if a == -1 else a
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def test_coco_matches_pycocotools_random_2d():
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(16):
        scale = [1.0, 0.5, 8.0, 16.0][trial % 4]
        preds, gts = random_case(rng, 2, scale=scale, flags=("iscrowd",) if trial % 2 else ())
        if not sum(len(p["scores"]) for p in preds):
            continue
        md = (1, 10, 100) if trial % 3 else (1, 2, 4)
        stats = run_pycocotools(preds, gts, 3, md)
        ours = evaluate_coco(preds, gts, max_dets=md[-1], area_ranges="coco", num_classes=3)
        got = [ours["map"], ours["map_50"], ours["map_75"], ours["map_small"], ours["map_medium"], ours["map_large"]]
        for k in range(6):
            assert _same(stats[k], got[k]), (trial, k, stats[k], got[k])
        checked += 1
    assert checked >= 12


def test_extruded_3d_equals_2d():
    rng = np.random.default_rng(3)
    ranges = {"all": (0.0, np.inf), "small": (0.0, 20.0), "big": (20.0, np.inf)}
    for _ in range(4):
        preds, gts = random_case(rng, 2, flags=("difficult", "iscrowd"))

        def extrude(b):
            z0, z1 = np.zeros((len(b), 1)), np.ones((len(b), 1))
            return np.concatenate([z0, b[:, :2], z1, b[:, 2:]], axis=1)

        p3 = [{**p, "boxes": extrude(p["boxes"])} for p in preds]
        g3 = [{**g, "boxes": extrude(g["boxes"])} for g in gts]
        for kw in ({}, {"use_07_metric": True}):
            a, b = evaluate_voc(preds, gts, **kw), evaluate_voc(p3, g3, **kw)
            np.testing.assert_array_equal(a["ap"], b["ap"])
            for x, y in zip(a["precision"] + a["recall"], b["precision"] + b["recall"]):
                np.testing.assert_array_equal(x, y)
        a, b = evaluate_coco(preds, gts, area_ranges=ranges), evaluate_coco(p3, g3, area_ranges=ranges)
        np.testing.assert_array_equal(a["precision"], b["precision"])
        np.testing.assert_array_equal(a["recall"], b["recall"])
        assert a["map"] == b["map"] or (math.isnan(a["map"]) and math.isnan(b["map"]))


# ----------------------------------------------------------------------------------------------- accumulator, inputs, plot


def test_evaluator_accumulates_batches_and_accepts_torch():
    rng = np.random.default_rng(5)
    preds, gts = random_case(rng, 3, n_images=6)
    tp = [{k: torch.as_tensor(v) for k, v in p.items()} for p in preds]
    tg = [{k: torch.as_tensor(v) for k, v in g.items()} for g in gts]
    for metric, fn in (("coco", evaluate_coco), ("voc", evaluate_voc)):
        ev = DetectionEvaluator(metric, num_classes=3)
        for s in range(0, 6, 4):
            ev.update(tp[s:s + 4], tg[s:s + 4])
        assert len(ev) == 6
        got, want = ev.compute(), fn(preds, gts, num_classes=3)
        np.testing.assert_array_equal(got["ap"], want["ap"])
        np.testing.assert_array_equal(fn(tp, tg, num_classes=3)["ap"], want["ap"])  # torch straight in
        ev.reset()
        assert len(ev) == 0
    with pytest.raises(TypeError, match="use_07_metric"):
        DetectionEvaluator("coco", use_07_metric=True)


def test_input_validation():
    p, g = img(HAND_GT, dt_boxes=HAND_DT, scores=HAND_SC)
    with pytest.raises(ValueError, match="same images"):
        evaluate_voc([p, p], [g])
    with pytest.raises(ValueError, match="2d"):
        evaluate_coco([{**p, "boxes": np.zeros((3, 5))}], [g])
    with pytest.raises(ValueError, match="one entry per box"):
        evaluate_voc([{**p, "scores": np.zeros(2)}], [g])
    with pytest.raises(ValueError, match="same number of spatial dims"):
        evaluate_voc([{**p, "boxes": np.zeros((3, 6))}], [g])
    with pytest.raises(ValueError, match="hi < lo"):
        evaluate_coco([p], [{**g, "boxes": np.array([[5.0, 5, 0, 0], [0, 0, 1, 1]])}])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        evaluate_voc([{**p, "labels": np.array([0, 1, 0])}], [g], class_names=["x"])
    with pytest.raises(ValueError, match="metric"):
        DetectionEvaluator("f1")
    # empty inputs of shape [0] are accepted
    r = evaluate_coco([{"boxes": np.zeros(0), "scores": np.zeros(0), "labels": np.zeros(0, int)}], [g])
    assert r["map"] == 0.0


def test_pr_curve_png(tmp_path):
    rng = np.random.default_rng(1)
    preds, gts = random_case(rng, 2, n_images=4)
    for res in (evaluate_voc(preds, gts, num_classes=4), evaluate_coco(preds, gts, num_classes=4, area_ranges="coco")):
        out = pr_curve_png(res, tmp_path / f"{res['metric']}.png", class_names=["a", "b", "c", "d"])
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = pr_curve_png(res, tmp_path / "c50.png", iou_threshold=0.5, area="small")
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError):
        pr_curve_png(res, tmp_path / "x.png", iou_threshold=0.42)
