"""The one FROC core (medetect.evaluation.froc_core) and the FROC / metric defects it fixes: tied scores, the 1 FP/image
point of by_lesion_type, exact FP counts of box_froc, bfloat16 inputs, undefined metrics as null with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medetect.evaluation.froc_core import (
    CPM_FP_RATES, MAMMO_FP_RATES, FROCPoints, box_iou_hit, circle_hit, fp_limit, match, sphere_hit,
)


def _box(centre, half=2.0):
    c = np.asarray(centre, dtype=np.float64)
    return np.concatenate([c - half, c + half])


def _strict_json(res):
    return json.loads(json.dumps(res, allow_nan=False))  # raises on NaN / inf


# ---------------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize("d", [2, 3])
def test_match_circle_first_hit_double_hit_overlap_and_missed(d):
    z = [0.0] * (d - 1)
    # image 0: lesions A (centre 10, r 3) and B (centre 14, r 3) overlap; lesion C (centre 40) is missed
    # image 1: lesion D (centre 10, r 3)
    les_c = np.array([[10.0] + z, [14.0] + z, [40.0] + z, [10.0] + z])
    les_r = np.array([3.0, 3.0, 3.0, 3.0])
    les_img = np.array([0, 0, 0, 1])
    # detections: 0 in A only (0.5), 1 in A and B (0.9), 2 outside (0.7), 3 in D at distance exactly 3 (0.2),
    # 4 on image 1 far away (0.95)
    loc = np.array([[8.0] + z, [12.0] + z, [25.0] + z, [13.0] + z, [30.0] + z])
    m = match([0, 0, 0, 1, 1], [0.5, 0.9, 0.7, 0.2, 0.95], loc, les_img, (les_c, les_r), circle_hit(), 2)
    assert m.tp.tolist() == [0, 2, 0, 1, 0]  # detection 1 finds both overlapping lesions; the boundary counts
    assert m.fp.tolist() == [False, False, True, False, True]  # detection 0: a double hit, neither TP nor FP
    assert m.lesion.tolist() == [0, 0, -1, 3, -1]
    assert m.lesion_first.tolist() == [1, 1, -1, 3] and m.missed.tolist() == [False, False, True, False]
    assert m.lesion_n_hits.tolist() == [2, 1, 0, 1]
    assert m.lesion_best.tolist() == [0.9, 0.9, -np.inf, 0.2]
    assert m.lesions_per_image.tolist() == [3, 1]


def test_match_sphere_is_strict_and_uncounted_findings_are_ignored():
    les_c = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [20.0, 0.0, 0.0]])
    diam = np.array([10.0, -1.0, 4.0])  # an excluded finding of unknown size (10 mm) and an included one inside it
    loc = np.array([[5.0, 0.0, 0.0], [4.9, 0.0, 0.0], [24.0, 0.0, 0.0], [21.0, 0.0, 0.0]])
    m = match([0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6], loc, [0, 0, 0], (les_c, diam), sphere_hit(10.0), 1,
              counted=[True, False, True])
    # 0: exactly on the sphere -> no hit (official <): FP; 1: TP; 2: only the excluded finding: ignored;
    # 3: inside the included nodule and the excluded finding: TP of the nodule
    assert m.tp.tolist() == [0, 1, 0, 1] and m.fp.tolist() == [True, False, False, False]
    assert m.n_hits_uncounted.tolist() == [0, 0, 1, 1] and m.lesion_first.tolist() == [1, -1, 3]


@pytest.mark.parametrize("d", [2, 3])
def test_match_box_iou_at_the_threshold_is_a_hit(d):
    gt = np.array([[0.0] * d + [10.0] * d])
    half = np.array([[0.0] * d + [5.0] + [10.0] * (d - 1)])  # IoU exactly 0.5
    m = match([0, 0], [0.8, 0.9], np.concatenate([half, gt + 50]), [0], gt, box_iou_hit(0.5), 1)
    assert m.tp.tolist() == [1, 0] and m.fp.tolist() == [False, True]
    m = match([0], [0.8], half, [0], gt, box_iou_hit(0.6), 1)
    assert m.tp.tolist() == [0] and m.fp.tolist() == [True]
    with pytest.raises(ValueError, match="iou_threshold"):
        box_iou_hit(1.5)


# ---------------------------------------------------------------------------------------------------------- curve


def test_fp_limit_is_exact_and_weights_equal_repeated_images():
    assert fp_limit(0.125, 8) == 1 and fp_limit(0.1, 10) == 1 and fp_limit(0.3, 10) == 2  # 0.3 < 3/10 as a float
    rng = np.random.default_rng(0)
    img = rng.integers(0, 5, 40)
    sc = np.round(rng.random(40), 1)  # ties
    tp = rng.random(40) < 0.3
    fp = ~tp & (rng.random(40) < 0.8)
    lpi = np.array([2, 0, 3, 1, 4])
    w = np.array([2, 0, 1, 3, 1])
    pts = FROCPoints(img, sc, tp, fp, lpi)
    rep = np.repeat(np.arange(5), w)  # the images drawn, as a resample lists them
    sel = np.concatenate([np.nonzero(img == i)[0] for i in rep])
    new_img = np.repeat(np.arange(len(rep)), [int((img == i).sum()) for i in rep])
    explicit = FROCPoints(new_img, sc[sel], tp[sel], fp[sel], lpi[rep])
    for a, b in zip(pts.counts(w), explicit.counts()):
        np.testing.assert_array_equal(a, b)
    rates = (0.1, 0.5, 1.0, 3.0)
    np.testing.assert_array_equal(pts.sensitivity_at(rates, w), explicit.sensitivity_at(rates))


def test_named_fp_rate_sets_are_the_reports_sets():
    from medetect.evaluation.attention import FROC_FP_RATES
    from medetect.evaluation.box_froc import FP_RATES
    from medetect.evaluation.froc import OPERATING_POINTS

    assert OPERATING_POINTS == FP_RATES == CPM_FP_RATES == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert FROC_FP_RATES == MAMMO_FP_RATES == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


# ------------------------------------------------------------------------------------------- ties: image order


def _mammo_case(d=2):
    """4 images: a lesion found by a mark of score 0.5 (image 0), a normal image with a false mark of the same score
    (image 1), a lesion found at 0.875 (image 2), a normal image with a false mark at 0.25 (image 3); every number
    is exact in bfloat16."""
    z = [20.0] * d
    boxes = [_box(z)[None], _box(z)[None], _box(z)[None], _box(z)[None]]
    scores = [[0.5], [0.5], [0.875], [0.25]]
    dets = [{"boxes": torch.tensor(b), "scores": torch.tensor(s), "labels": torch.tensor([1])}
            for b, s in zip(boxes, scores)]
    cen = [np.array([z]), np.zeros((0, d)), np.array([z]), np.zeros((0, d))]
    rad = [np.array([5.0]), np.zeros(0), np.array([5.0]), np.zeros(0)]
    mal = [np.array([True]), np.zeros(0, bool), np.array([False]), np.zeros(0, bool)]
    lab = ["malignant", "normal", "benign", "normal"]
    types = [np.array(["CALC"]), np.zeros(0, str), np.array(["CIRC"]), np.zeros(0, str)]
    return dets, cen, rad, mal, lab, [f"p{i}" for i in range(4)], types


@pytest.mark.parametrize("d", [2, 3])
def test_tied_scores_do_not_depend_on_image_order_mammo(d):
    from medetect.evaluation.mammo import mammo_metrics

    *args, types = _mammo_case(d)
    res = mammo_metrics(*args, n_boot=0, lesion_types=types)
    perm = [1, 0, 3, 2]
    res_p = mammo_metrics(*[[a[i] for i in perm] for a in args], n_boot=0, lesion_types=[types[i] for i in perm])
    assert res["lesion_sensitivity"] == res_p["lesion_sensitivity"]
    # 0.125 FP/image (0 false marks over 4 images): only the 0.875 group; the 0.5 group (TP + FP) enters
    # together at 0.25 x 4 = 1 false mark
    assert res["lesion_sensitivity"]["0.125"] == 0.5 and res["lesion_sensitivity"]["0.25"] == 1.0
    assert res["by_lesion_type"] == res_p["by_lesion_type"]


def test_tied_scores_do_not_depend_on_image_order_attention_and_box():
    from medetect.evaluation.attention import froc_curve
    from medetect.evaluation.box_froc import box_froc

    hit = {"mark_scores": np.array([0.5]), "mark_tp": np.array([1]), "mark_fp": np.array([False]), "n_lesions": 1}
    false = {"mark_scores": np.array([0.5]), "mark_tp": np.array([0]), "mark_fp": np.array([True]), "n_lesions": 0}
    a, b = froc_curve([hit, false], (0.25, 0.5)), froc_curve([false, hit], (0.25, 0.5))
    assert a.tolist() == b.tolist() == [0.0, 1.0]  # at 0.25 FP/image (0 FPs) the tied FP keeps the TP out
    for d in (2, 3):
        gt = {"boxes": torch.tensor([[0.0] * d + [10.0] * d])}
        empty = {"boxes": torch.zeros(0, 2 * d)}
        p_hit = {"boxes": gt["boxes"].clone(), "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}
        p_fp = {"boxes": gt["boxes"] + 50, "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}
        f = box_froc([p_hit, p_fp], [gt, empty])
        g = box_froc([p_fp, p_hit], [empty, gt])
        assert f == g
        assert f["sensitivity_at"]["0.25"] == 0.0 and f["sensitivity_at"]["0.5"] == 1.0


# ------------------------------------------------------------------------------ by_lesion_type at 1 FP per image


def test_by_lesion_type_agrees_with_lesion_sensitivity_at_one_fp_per_image_with_ties():
    from medetect.evaluation.mammo import mammo_metrics

    z = [20.0, 20.0]
    # image 0: false marks 0.9 and 0.5; image 1: a false mark at 0.5 listed before the lesion's mark at 0.5.
    # At 1 FP/image (2 false marks) the 0.5 group, with 3 false marks in all, is out: the lesion is not found.
    dets = [{"boxes": torch.tensor(np.stack([_box([60.0, 60.0]), _box([80.0, 80.0])])),
             "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([0, 0])},
            {"boxes": torch.tensor(np.stack([_box([70.0, 70.0]), _box(z)])),
             "scores": torch.tensor([0.5, 0.5]), "labels": torch.tensor([0, 0])}]
    cen = [np.zeros((0, 2)), np.array([z])]
    res = mammo_metrics(dets, cen, [np.zeros(0), np.array([5.0])], [np.zeros(0, bool), np.array([False])],
                        ["normal", "benign"], ["p0", "p1"], n_boot=0, lesion_types=[np.zeros(0, str), np.array(["CIRC"])])
    detected = sum(v["detected"] for v in res["by_lesion_type"].values())
    assert res["lesion_sensitivity"]["1"] == pytest.approx(detected / res["lesions"]) == 0.0
    assert res["by_lesion_type_operating_point"]["score_threshold"] == pytest.approx(0.9)
    assert res["lesion_sensitivity"]["2"] == 1.0


# ------------------------------------------------------------------------------------ box_froc: exact FP counts


def test_box_froc_keeps_a_point_exactly_at_an_fp_rate():
    from medetect.evaluation.box_froc import box_froc

    # 49 ground-truth boxes on image 0, 8 images: 0.125 FP/image = exactly 1 FP. A TP (0.9), a FP (0.8), a TP (0.7):
    # the last point has exactly 1 FP and belongs to the 0.125 rate ((2/49)*49 is not 2 in floats: a recall-based
    # FP count lands just above 1 and drops the point).
    lo = np.stack([np.arange(49) * 20.0, np.zeros(49)], 1)
    gt_boxes = torch.tensor(np.concatenate([lo, lo + 10], 1))
    gts = [{"boxes": gt_boxes}] + [{"boxes": torch.zeros(0, 4)} for _ in range(7)]
    preds = [{"boxes": torch.stack([gt_boxes[0], gt_boxes[0] + 500, gt_boxes[1]]), "scores": torch.tensor([0.9, 0.8, 0.7]),
              "labels": torch.tensor([0, 0, 0])}] + [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                                     "labels": torch.zeros(0, dtype=torch.long)} for _ in range(7)]
    f = box_froc(preds, gts)
    assert f["sensitivity_at"]["0.125"] == pytest.approx(2 / 49) and f["lesions"] == 49
    assert f["undefined"] == {}


# ------------------------------------------------------------------------------------------------ bfloat16 inputs


def test_mammo_metrics_and_image_auc_take_bfloat16():
    from medetect.evaluation.attention import image_auc
    from medetect.evaluation.box_froc import box_froc
    from medetect.evaluation.mammo import image_scores, mammo_metrics

    s = torch.tensor([0.25, 0.75, 0.5, 0.125])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert image_auc(s.bfloat16(), y.bfloat16()) == pytest.approx(1.0)
    *args, types = _mammo_case(2)
    dets, cen, rad = args[0], args[1], args[2]
    bf = [{k: (v.bfloat16() if v.is_floating_point() else v) for k, v in det.items()} for det in dets]
    cen_bf = [torch.tensor(c).bfloat16() for c in cen]
    rad_bf = [torch.tensor(r).bfloat16() for r in rad]
    res = mammo_metrics(bf, cen_bf, rad_bf, *args[3:], n_boot=5, lesion_types=types)
    ref = mammo_metrics(dets, cen, rad, *args[3:], n_boot=5, lesion_types=types)
    assert res == ref  # every value here is exact in bfloat16
    assert image_scores(bf)[0].tolist() == [0.5, 0.5, 0.875, 0.25]
    gts = [{"boxes": d["boxes"]} for d in bf]
    assert box_froc(bf, gts)["cpm"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ undefined metrics


def test_undefined_metrics_are_null_with_a_reason():
    from medetect.evaluation.attention import attention_metrics, auc_reason, image_auc
    from medetect.evaluation.box_froc import box_froc
    from medetect.evaluation.mammo import mammo_metrics

    assert image_auc([0.1, 0.2], [1, 1]) is None and auc_reason([1, 1]) == "only one class in the labels (all positive)"
    # mammography: two normal images, no lesion -> no sensitivity, one class for every AUC
    dets = [{"boxes": torch.tensor(_box([20.0, 20.0])[None]), "scores": torch.tensor([0.4]), "labels": torch.tensor([1])}
            for _ in range(2)]
    res = _strict_json(mammo_metrics(dets, [np.zeros((0, 2))] * 2, [np.zeros(0)] * 2, [np.zeros(0, bool)] * 2,
                                     ["normal", "normal"], ["p0", "p1"], n_boot=3, lesion_types=[np.zeros(0, str)] * 2))
    und = res["undefined"]
    for k in ("lesion_froc_mean", "image_auc_abnormal", "image_auc_malignant", "lesion_auc_malignant"):
        assert res[k] is None and und[k] and res[f"{k}_ci"] == [None, None]
        assert und[f"{k}_ci"] == "undefined in every bootstrap draw"
    assert und["image_auc_abnormal"] == "only one class in the image labels (abnormal vs normal) (all negative)"
    assert und["lesion_auc_malignant"] == "no detected lesions (malignant vs benign)"
    assert all(v is None for v in res["lesion_sensitivity"].values())
    assert und["lesion_sensitivity/0.125"] == "no lesion: the sensitivity is undefined"
    assert res["by_lesion_type"]["SPIC"]["sensitivity"] is None and und["by_lesion_type/SPIC/sensitivity"]
    # attention: no located lesion, one class
    att = _strict_json(attention_metrics(np.full((3, 2), 0.3), np.zeros((3, 2)), [np.ones((4, 4))] * 3,
                                         [np.zeros((0, 2))] * 3, [np.zeros(0)] * 3, ["a", "b", "c"], n_boot=0))
    for k in ("image_auc_abnormal", "image_auc_malignant", "pointing_game", "attention_in_lesion",
              "attention_froc_mean"):
        assert att[k] is None and att["undefined"][k] and att["undefined"][f"{k}_ci"] == "no bootstrap draws (n_boot is 0)"
    assert att["attention_froc"]["1"] is None and att["undefined"]["attention_froc/1"]
    # box FROC without any ground-truth box
    f = _strict_json(box_froc([{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "scores": torch.tensor([0.5])}],
                              [{"boxes": torch.zeros(0, 4)}]))
    assert f["cpm"] is None and f["sensitivity_at"]["1.0"] is None
    assert f["undefined"]["cpm"] == "no ground-truth box: the sensitivity is undefined"
    # a defined report has an empty mapping
    *args, types = _mammo_case(2)
    assert mammo_metrics(*args, n_boot=5)["undefined"] == {}
