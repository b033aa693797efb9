"""The one FROC core of medetect: matching detections to lesions, then the FROC curve of the matched list.

Every lesion FROC of the library is these two steps with its own hit test and its own set of FP rates: the LUNA16
FROC / CPM (:mod:`medetect.evaluation.froc`, sphere hit), the mammography lesion FROC
(:mod:`medetect.evaluation.mammo`, circle hit), the attention FROC (:mod:`medetect.evaluation.attention`, circle hit)
and the box FROC (:mod:`medetect.evaluation.box_froc`, box IoU hit).

Shapes: ``M`` detections, ``N`` lesions, ``P`` (detection, lesion) pairs on the same image, ``G`` distinct scores,
``I`` images.

Matching (:func:`match`)
    Detections and lesions carry the index of their image. A pluggable hit test decides, for every pair on the same
    image at once, whether the detection hits the lesion (:func:`sphere_hit`, :func:`circle_hit`,
    :func:`box_iou_hit`). Per lesion, its TRUE POSITIVE is the first detection that hits it in the order of
    decreasing score (ties: input order; the score is the lesion's best hit either way). A detection can be the true
    positive of several lesions (it lies in overlapping lesions: it finds them all). A detection that hits a lesion
    whose true positive is another detection is neither a TP nor a FP (a double hit); so is a detection that hits
    only lesions marked as not counted (LUNA16's excluded findings). Every other detection is a FALSE POSITIVE.
    Lesions that no detection hits are missed. No loop over detections, lesions or images.

Curve (:class:`FROCPoints`)
    The TPs and FPs, sorted once by score, form one curve point per DISTINCT score: every detection with the same score
    enters together, so the curve does not depend on the order of the images or of the detections. The counts are
    integers; the sensitivity at ``r`` false positives per image is the highest sensitivity among the points whose FP
    count is at most ``r x n_images``, compared exactly (``floor(Fraction(r) * n_images)``, no float sums). Bootstrap
    resamples of images reuse the sorted list with integer per-image weights.

Named FP-rate sets (each stated once, here)
    :data:`CPM_FP_RATES` (1/8, 1/4, 1/2, 1, 2, 4, 8: LUNA16's CPM, Setio et al. 2017; LUNA16 FROC and box FROC) and
    :data:`MAMMO_FP_RATES` (1/8 .. 4: the mammography lesion FROC and the attention FROC).

Undefined metrics (the convention of every metric report of :mod:`medetect.evaluation`)
    A metric that is undefined on the data (an AUC with one class only, a sensitivity without lesions, a bootstrap
    interval without any draw where the metric is defined, ...) is ``None`` (JSON ``null``), never NaN and never an
    exception, and the report's ``"undefined"`` mapping gives the reason under the same key: the report key for a
    top-level value, the keys joined by ``/`` for a nested one (``"by_lesion_type/SPIC/sensitivity"``). The mapping
    is always present (empty when every metric is defined). See :func:`set_metric` and :func:`note_undefined`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from ..boxes import elementwise_box_iou
from ..data.annotations import hits as _luna_hits

__all__ = [
    "CPM_FP_RATES", "MAMMO_FP_RATES", "UNDEFINED", "Matching", "FROCPoints", "match", "sphere_hit", "circle_hit",
    "box_iou_hit", "as_float64", "fp_limit", "set_metric", "note_undefined", "ci_or_reason",
]

#: FP rates (false positives per image / scan) of LUNA16's CPM (Setio et al. 2017): LUNA16 FROC and box FROC.
CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: FP rates (false marks per image) of the mammography lesion FROC and of the attention FROC.
MAMMO_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
#: Key of a report's mapping ``{key: reason}`` of its undefined (``None``) metrics (module docstring).
UNDEFINED = "undefined"

HitTest = Callable[[object, object], np.ndarray]


# ---------------------------------------------------------------------------------------------------------- inputs


def as_float64(x) -> np.ndarray:
    """``x`` (a torch tensor of any dtype and device, bfloat16 included, or anything numpy reads) as a float64 array;
    numpy cannot read bfloat16, so tensors are cast by torch first."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _take(x, idx: np.ndarray):
    """Rows ``idx`` of an array, or of every array of a tuple (a lesion given as ``(centres, radii)``)."""
    return tuple(np.asarray(a)[idx] for a in x) if isinstance(x, tuple) else np.asarray(x)[idx]


def _same_image_pairs(les_image: np.ndarray, det_image: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """All (lesion, detection) index pairs on the same image, ``([P], [P])``, without a loop."""
    order = np.argsort(det_image, kind="stable")
    dcount = np.bincount(det_image, minlength=n_images)
    dstart = np.cumsum(dcount) - dcount
    per_les = dcount[les_image]  # [N] detections on each lesion's image
    total = int(per_les.sum())
    pair_les = np.repeat(np.arange(les_image.shape[0]), per_les)  # [P]
    offset = np.cumsum(per_les) - per_les
    pos = dstart[les_image][pair_les] + (np.arange(total) - offset[pair_les])
    return pair_les, order[pos]


# ------------------------------------------------------------------------------------------------------ hit tests


def sphere_hit(unknown_diameter: float = 10.0) -> HitTest:
    """LUNA16: a mark ``[P, 3]`` (world mm) hits a finding ``(centres [P, 3], diameters [P])`` when it lies strictly
    inside the sphere of radius ``diameter / 2`` (:func:`medetect.data.annotations.hits`, the official script's
    ``<``); a negative diameter (unknown size) is ``unknown_diameter`` (the official 10 mm)."""
    def test(marks, lesions):
        centres, diameters = lesions
        return _luna_hits(marks, centres, diameters, unknown_diameter=unknown_diameter)
    return test


def circle_hit(spacing=None) -> HitTest:
    """Mammography / attention: a detection centre ``[P, d]`` (voxels) hits a lesion ``(centres [P, d], radii [P])``
    when its physical distance to the centre is at most the radius (``spacing``: per axis or one number, default 1;
    a point on the circle counts as inside, as :func:`medetect.heatmaps.points_in_circles`). Float64."""
    def test(points, lesions):
        centres, radii = lesions
        p, c = as_float64(points), as_float64(centres)
        sp = 1.0 if spacing is None else np.broadcast_to(as_float64(spacing).reshape(-1), (c.shape[-1],))
        diff = (p - c) * sp  # [P, d] physical
        return (diff ** 2).sum(-1) <= as_float64(radii) ** 2
    return test


def box_iou_hit(threshold: float) -> HitTest:
    """Boxes, any d: a detection box ``[P, 2d]`` hits a lesion box ``[P, 2d]`` when their IoU is at least
    ``threshold`` (:func:`medetect.boxes.elementwise_box_iou`, half-open boxes, float64)."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {threshold}")

    def test(det_boxes, les_boxes):
        a, b = torch.from_numpy(as_float64(det_boxes)), torch.from_numpy(as_float64(les_boxes))
        if a.shape[0] == 0:
            return np.zeros(0, bool)
        return (elementwise_box_iou(a, b) >= float(threshold)).numpy()
    return test


# ------------------------------------------------------------------------------------------------------- matching


@dataclass(eq=False)
class Matching:
    """The matched list of :func:`match` (module docstring). Per detection ``[M]``: ``image``, ``score`` (float64),
    ``tp`` (how many lesions it is the true positive of: 0, 1, more in overlapping lesions), ``fp``, ``lesion`` (the
    first lesion it is the TP of, else the first counted lesion it hits, else -1), ``n_hits`` / ``n_hits_uncounted``
    (counted / not counted lesions it hits). Per lesion ``[N]``: ``lesion_image``, ``lesion_counted``,
    ``lesion_first`` (its TP detection, -1 when missed or not counted), ``lesion_n_hits`` (detections hitting it).
    ``pair_detection`` / ``pair_lesion`` ``[H]``: every hitting pair."""

    n_images: int
    image: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    lesion: np.ndarray
    n_hits: np.ndarray
    n_hits_uncounted: np.ndarray
    lesion_image: np.ndarray
    lesion_counted: np.ndarray
    lesion_first: np.ndarray
    lesion_n_hits: np.ndarray
    pair_detection: np.ndarray
    pair_lesion: np.ndarray

    @property
    def lesion_hit(self) -> np.ndarray:
        """``[N]`` counted lesions found by some detection."""
        return self.lesion_first >= 0

    @property
    def missed(self) -> np.ndarray:
        """``[N]`` counted lesions no detection hits."""
        return self.lesion_counted & ~self.lesion_hit

    @property
    def lesion_best(self) -> np.ndarray:
        """``[N]`` score of each lesion's true positive (its best hit); ``-inf`` when missed or not counted."""
        return np.where(self.lesion_hit, self.score[np.maximum(self.lesion_first, 0)] if self.score.size else 0.0,
                        -np.inf)

    @property
    def lesions_per_image(self) -> np.ndarray:
        """``[I]`` counted lesions of each image."""
        return np.bincount(self.lesion_image[self.lesion_counted], minlength=self.n_images)

    def points(self) -> FROCPoints:
        """The curve of this matched list (:class:`FROCPoints`)."""
        return FROCPoints(self.image, self.score, self.tp, self.fp, self.lesions_per_image)


def match(image, score, location, lesion_image, lesion, hit_test: HitTest, n_images: int,
          counted=None) -> Matching:
    """Match detections to lesions (module docstring). ``image [M]`` / ``lesion_image [N]``: image index in
    ``[0, n_images)``; ``score [M]``; ``location``: ``[M, ...]`` (or a tuple of such arrays) and ``lesion``: ``[N, ...]``
    (or a tuple, e.g. ``(centres, radii)``), handed row-gathered per pair to ``hit_test(locations, lesions) -> [P]``
    bool; ``counted [N]`` (default all): a hit on an uncounted lesion makes a detection neither TP nor FP."""
    image = np.asarray(image, dtype=np.int64).reshape(-1)
    lesion_image = np.asarray(lesion_image, dtype=np.int64).reshape(-1)
    score = as_float64(score).reshape(-1)
    m, n = image.shape[0], lesion_image.shape[0]
    counted = np.ones(n, bool) if counted is None else np.asarray(counted, dtype=bool).reshape(-1)
    if score.shape[0] != m or counted.shape[0] != n:
        raise ValueError(f"match: {m} detection images for {score.shape[0]} scores, {n} lesion images for "
                         f"{counted.shape[0]} counted flags")
    for name, ids in (("detection", image), ("lesion", lesion_image)):
        if ids.size and (ids.min() < 0 or ids.max() >= n_images):
            raise ValueError(f"match: {name} image indices must lie in [0, {n_images})")
    order = np.argsort(-score, kind="stable")  # best first; ties in input order
    rank = np.empty(m, np.int64)
    rank[order] = np.arange(m)
    pair_les, pair_det = _same_image_pairs(lesion_image, image, n_images)
    hit = np.zeros(0, bool) if pair_les.size == 0 else np.asarray(
        hit_test(_take(location, pair_det), _take(lesion, pair_les)), dtype=bool).reshape(-1)
    pl, pd = pair_les[hit], pair_det[hit]  # [H] hitting pairs
    cnt = counted[pl]
    first_rank = np.full(n, m, np.int64)  # m: no counted hit
    np.minimum.at(first_rank, pl[cnt], rank[pd[cnt]])
    found = first_rank < m
    lesion_first = np.full(n, -1, np.int64)
    lesion_first[found] = order[first_rank[found]]
    tp = np.bincount(lesion_first[found], minlength=m).astype(np.int64)
    n_hits = np.bincount(pd[cnt], minlength=m).astype(np.int64)
    n_unc = np.bincount(pd[~cnt], minlength=m).astype(np.int64)
    first_of = np.full(m, n, np.int64)  # the first lesion each detection is the TP of
    np.minimum.at(first_of, lesion_first[found], np.nonzero(found)[0])
    any_hit = np.full(m, n, np.int64)  # the first counted lesion each detection hits
    np.minimum.at(any_hit, pd[cnt], pl[cnt])
    det_lesion = np.where(first_of < n, first_of, np.where(any_hit < n, any_hit, -1))
    return Matching(
        n_images=int(n_images), image=image, score=score, tp=tp, fp=(n_hits == 0) & (n_unc == 0), lesion=det_lesion,
        n_hits=n_hits, n_hits_uncounted=n_unc, lesion_image=lesion_image, lesion_counted=counted,
        lesion_first=lesion_first, lesion_n_hits=np.bincount(pl, minlength=n).astype(np.int64),
        pair_detection=pd, pair_lesion=pl)


# ---------------------------------------------------------------------------------------------------------- curve


def fp_limit(rate: float, n_images: int) -> int:
    """The most false positives allowed at ``rate`` per image over ``n_images``: ``floor(rate x n_images)``, exact."""
    r = float(rate)
    if not (math.isfinite(r) and r >= 0.0):
        raise ValueError(f"FP rates must be finite and >= 0, got {rate}")
    return math.floor(Fraction(r) * int(n_images))


class FROCPoints:
    """The TPs and FPs of a matched list sorted once into their distinct scores (decreasing): the points of the
    FROC curve (module docstring). ``image [M]``, ``score [M]``, ``tp [M]`` (lesions found by each detection: bool or
    counts), ``fp [M]`` bool, ``lesions_per_image [I]`` (counted lesions, missed ones included). Detections that are
    neither TP nor FP make no point."""

    def __init__(self, image, score, tp, fp, lesions_per_image):
        image = np.asarray(image, dtype=np.int64).reshape(-1)
        score = as_float64(score).reshape(-1)
        tp = np.asarray(tp).reshape(-1).astype(np.int64)
        fp = np.asarray(fp, dtype=bool).reshape(-1)
        keep = (tp > 0) | fp
        image, score, tp, fp = image[keep], score[keep], tp[keep], fp[keep]
        order = np.argsort(-score, kind="stable")
        s = score[order]
        new = np.ones(s.size, dtype=bool)
        new[1:] = s[1:] != s[:-1]
        self.thresholds = s[new]  # [G] distinct scores, decreasing
        self._group = np.cumsum(new) - 1  # [E] group of each entry (entries in score order)
        self._image, self._tp, self._fp = image[order], tp[order], fp[order].astype(np.int64)
        self.lesions_per_image = np.asarray(lesions_per_image, dtype=np.int64).reshape(-1)
        self.n_images = int(self.lesions_per_image.shape[0])

    def counts(self, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """``(thresholds [G'], tp [G'], fp [G'], n_lesions, n_images)``: cumulative integer TP / FP counts at each
        distinct score. ``weights [I]`` (integers, e.g. how often a bootstrap resample drew each image) repeat the
        images; scores that the weights leave without a TP or FP are dropped."""
        g = self.thresholds.shape[0]
        if weights is None:
            g_tp = np.bincount(self._group, weights=self._tp, minlength=g)
            g_fp = np.bincount(self._group, weights=self._fp, minlength=g)
            n_les, n_img = int(self.lesions_per_image.sum()), self.n_images
        else:
            w = np.asarray(weights, dtype=np.int64).reshape(-1)
            g_tp = np.bincount(self._group, weights=self._tp * w[self._image], minlength=g)
            g_fp = np.bincount(self._group, weights=self._fp * w[self._image], minlength=g)
            n_les, n_img = int(w @ self.lesions_per_image), int(w.sum())
        present = (g_tp + g_fp) > 0
        tp = np.cumsum(g_tp.astype(np.int64))[present]
        fp = np.cumsum(g_fp.astype(np.int64))[present]
        return self.thresholds[present], tp, fp, n_les, n_img

    def _within(self, rates: Sequence[float], weights) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Per rate, how many points keep at most ``rate x n_images`` FPs (a prefix: the FP counts never fall)."""
        thr, tp, fp, n_les, n_img = self.counts(weights)
        limits = np.asarray([fp_limit(r, n_img) for r in rates], dtype=np.int64)
        return np.searchsorted(fp, limits, side="right"), thr, tp, n_les, n_img

    def sensitivity_at(self, rates: Sequence[float], weights=None) -> np.ndarray:
        """``[R]`` sensitivity (found / counted lesions) at each FP rate per image: the highest among the points with
        at most ``rate x n_images`` FPs, 0 when no point qualifies; NaN when there is no lesion (undefined)."""
        k, _, tp, n_les, _ = self._within(rates, weights)
        if n_les == 0:
            return np.full(len(rates), np.nan)
        return np.where(k > 0, tp[np.maximum(k - 1, 0)] if tp.size else 0, 0) / n_les

    def threshold_at(self, rate: float, weights=None) -> float:
        """The lowest score whose detections at or above it make at most ``rate`` FPs per image: the point
        :meth:`sensitivity_at` reads (a lesion is found there when its best hit scores at or above it); ``inf`` when
        no point qualifies."""
        k, thr, *_ = self._within([rate], weights)
        return float(thr[k[0] - 1]) if k[0] > 0 else float("inf")

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fp_per_image [G+1], sensitivity [G+1])`` starting at (0, 0), for plots (sensitivity 0 without lesions)."""
        _, tp, fp, n_les, n_img = self.counts()
        return (np.r_[0, fp] / max(n_img, 1), np.r_[0, tp] / max(n_les, 1))


# ----------------------------------------------------------------------------------------- undefined metrics


def note_undefined(report: dict, key: str, reason: str) -> None:
    """Record in ``report["undefined"]`` why the value at ``key`` (a report key, or keys joined by ``/``) is None."""
    report.setdefault(UNDEFINED, {})[key] = reason


def set_metric(report: dict, key: str, value, reason: str) -> None:
    """``report[key] = value`` as a float, or ``None`` (with ``reason`` noted) when it is None or not finite."""
    v = None if value is None else float(value)
    if v is None or not math.isfinite(v):
        report[key] = None
        note_undefined(report, key, reason)
    else:
        report[key] = v


def ci_or_reason(draws, n_boot: int) -> tuple[list, str | None]:
    """``([lo, hi], None)``: the 2.5 / 97.5 percentiles of the finite bootstrap ``draws``; ``([None, None], reason)``
    when there is none."""
    v = np.asarray(draws, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v):
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))], None
    if n_boot == 0:
        return [None, None], "no bootstrap draws (n_boot is 0)"
    return [None, None], "undefined in every bootstrap draw"
