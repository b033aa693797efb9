"""Exact LUNA16 FROC / CPM evaluation, vectorised with numpy.

This module reproduces the rules of the official LUNA16 evaluation script
``noduleCADEvaluationLUNA16.py`` (the ``evaluationScript`` package that the LUNA16 challenge
distributed, with ``NoduleFinding.py`` and ``tools/csvTools.py``), without pandas or scikit-learn.
The official script is written as nested Python loops; here every step is an array operation, and
the results are the same numbers (see "Exactness" below).

Inputs
------
* ``annotations.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm`` (world millimetres). These
  are the *included* nodules: each one is a lesion that can be detected or missed.
* ``annotations_excluded.csv`` (optional): same columns. These are the *excluded* findings
  (non-nodules, nodules < 3 mm, nodules accepted by fewer than 3 of 4 radiologists). Rows without a
  measured size carry ``diameter_mm = -1``, which the official script handles explicitly (rule 3).
* ``seriesuids.csv`` (optional): the list of evaluated scans, one uid per line.
* predictions (the "CAD marks"): ``seriesuid,coordX,coordY,coordZ,probability``.

Columns are found by header name (the official script uses ``header.index(name)``), so their order
does not matter and extra columns are ignored.
The three point files are read by :func:`medetect.data.annotations.read_world_points` into one
record, :class:`~medetect.data.annotations.WorldPoints` (its errors are raised here as
:class:`FROCInputError`), and rule 3 below is :func:`medetect.data.annotations.hits`, the one hit test
of the library (stage-two training labels use it too). Rules 3-9 are the matching step of the library's FROC
core (:func:`medetect.evaluation.froc_core.match` with its sphere test, excluded findings not counted) and
rule 10 counts the core's curve points (:class:`~medetect.evaluation.froc_core.FROCPoints`); what is
LUNA16-specific (the mark cap, ``roc_curve``'s point dropping, ``np.interp``, the bootstrap) stays here.

Rules of the official script, and where they come from
------------------------------------------------------
1. **Scans.** ``collect()`` reads ``seriesuids.csv`` with ``csv.reader`` and takes the first field of
   *every* row: the official file has no header. Only the listed scans are evaluated; annotations and
   excluded findings on other scans are silently ignored (``collectNoduleAnnotations`` only collects
   rows whose uid is in the list), and so are predictions on other scans (``evaluateCAD`` only collects
   marks per listed uid). The FP rate divides by the number of listed scans (``len(seriesUIDs)``),
   so a listed scan without marks still counts.
2. **At most 100 marks per scan** (``maxNumberOfCADMarks=100`` in ``noduleCADEvaluation``). The
   official script does not raise: when a scan has more than 100 marks it sorts their probabilities in
   decreasing order, takes the threshold ``t = probs[100]`` (the 101st largest) and keeps only the marks
   with ``probability > t`` (strictly). Ties at the threshold are therefore all dropped, so a scan can
   keep fewer than 100 marks. Scans with at most 100 marks are untouched. This happens before matching.
3. **Hit test.** For every nodule (included and excluded) and every (kept) mark of the same scan the
   squared Euclidean distance ``dx**2 + dy**2 + dz**2`` is compared with ``(diameter_mm / 2.0)**2``
   using a *strict* ``<``: a mark exactly on the sphere of radius ``diameter / 2`` is not a hit.
   A negative diameter (the ``-1`` of the excluded file) is replaced by **10 mm** (radius 5 mm)
   before the test (``if diameter < 0.0: diameter = 10.0``).
4. **Included nodules come first.** ``collectNoduleAnnotations`` lists a scan's included nodules
   before its excluded findings, and ``evaluateCAD`` deletes every mark that hits an included nodule
   from the set of candidate FPs before the excluded findings are looked at. So a mark that hits both an
   included nodule and an excluded finding is a hit on the nodule, not an ignored mark.
5. **One mark can detect several nodules.** The matching loops over *all* marks of the scan for each
   nodule (not only over the marks still unmatched), so a mark inside two overlapping nodules counts for
   both (the official script only prints "This is strange: CAD mark ... detected two nodules!").
6. **One hit per nodule.** A detected nodule enters the FROC analysis once, as a positive with the
   *highest* probability among all marks that hit it. The other marks that hit it are neither FPs nor
   extra TPs (counted as "double detections ignored": ``len(matches) - 1`` per nodule).
7. **Marks on excluded findings are ignored** (``bOtherNodulesAsIrrelevant = True``): a mark that hits
   an excluded finding and no included nodule is neither a TP nor an FP. Each such mark is counted once
   ("ignored candidates on excluded nodules"), however many excluded findings it hits.
8. **Every other mark is a false positive**, with its own probability.
9. **Missed nodules** are appended as positives with probability ``-1e9`` and ``exclude=True``;
   ``computeFROC`` drops them before the ROC analysis but still counts them in the total number of
   lesions, so the sensitivity of the curve saturates at ``detected / total``.
10. **The FROC curve** (``computeFROC``): ``fpr, tpr, thr = sklearn.metrics.roc_curve(labels, probs)``
    on the TPs and FPs, then ``fps = fpr * (n_candidates - n_detected) / n_scans`` (that is
    ``fpr * n_FP / n_scans``) and ``sens = tpr * n_detected / n_lesions``. ``roc_curve`` is rebuilt here
    exactly: one point per distinct probability, in decreasing order, with cumulative TP and FP counts;
    its default ``drop_intermediate=True`` (drop a point when both count sequences have a zero second
    difference there, keeping the first and last; only when there are more than 2 points); a point
    ``(0, 0)`` with threshold ``inf`` prepended. Corner case: if there are no FPs at all the official
    script sets ``fps`` to zeros (``roc_curve`` would give NaN), so the sensitivity is the final
    ``detected / total`` at every FP rate.
11. **Operating points.** The official script interpolates the curve with
    ``np.interp(fps_itp, fps, sens)`` (``fps_itp = np.linspace(0.125, 8, 10001)``) and writes/plots it;
    the LUNA16 score (CPM, Setio et al. 2017) is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8
    FPs per scan. Here the *same* ``np.interp`` is evaluated at exactly those 7 rates (note that 0.25,
    0.5, 1, 2 and 4 are not points of the 10001-point grid, so reading them off that grid, as some copies
    of the script do, is slightly off). ``np.interp`` on a vertical step (several points at the same FP
    rate) returns the value of the last one, i.e. the top of the step; so does this module, because it
    hands ``np.interp`` the same arrays.
12. **Bootstrap** (``computeFROC_bootstrap``): ``numberOfBootstrapSamples = 1000`` resamples of the
    *scans* with replacement (``np.random.randint(n_scans, size=n_scans)``); each resample pools the FROC
    entries (TPs, FPs, missed nodules) of the drawn scans, repeated as often as drawn; the number of
    scans is always ``n_scans``; the curve is recomputed by the same ``computeFROC``. Each curve is
    interpolated on ``np.linspace(0.125, 8, 10000)`` and stored as float32; per FP rate the values are
    sorted and the bounds are ``vec[floor(Pz * B)]`` and ``vec[floor((1 - Pz) * B)]`` with
    ``Pz = (1 - 0.95) / 2`` (so the 25th and 975th of 1000), the centre is their mean. This module draws
    the resamples with ``np.random.RandomState(seed).randint(n_scans, size=n_scans)``, one call per
    resample: that is the very stream the official script uses after ``np.random.seed(seed)``. A
    resample's curve depends only on how many times each scan was drawn, so it is computed from
    per-scan weights on entries sorted once. The same order-statistic rule gives the intervals at the 7
    operating points (interpolated in float64 at the exact rates) and for the CPM (mean of the 7 per
    resample). The band on the 10000-point grid keeps the official float32 storage, so its bounds are
    the official ones; its centre (``bootstrap_mean``) is averaged in float64.
13. **Thresholds.** The curve's first threshold is ``inf`` (scikit-learn >= 1.3); the scikit-learn of
    2016 used ``max(probability) + 1`` there. The FP rates and sensitivities are the same either way.

Corner cases where this module deliberately differs (the official script crashes or gives NaN)
--------------------------------------------------------------------------------------------
* Predictions on a scan that is not in the series list: the official script ignores them silently;
  here they are an error naming the file and line (usually a wrong ``seriesuids.csv`` or fold).
* No series list given: the scans are the uids of the annotations and of the predictions (in order of
  first appearance); the excluded file does not add scans.
* A ``seriesuids.csv`` whose first line is exactly ``seriesuid`` is taken to have a header (the
  official script would count a bogus scan called "seriesuid"); blank lines are skipped (the official
  script crashes on them); a uid listed twice is an error (the official script would evaluate the scan
  twice and count it twice).
* Blank CSV lines are skipped; fields are stripped of surrounding whitespace.
* Negative ``diameter_mm`` is an error, except ``-1`` in the excluded-findings file (treated as 10 mm).
* Non-finite coordinates or probabilities (NaN, inf) are errors.
* No detected nodule but some FPs: ``roc_curve`` gives ``tpr = NaN`` and the official curve is NaN; here
  the sensitivity is 0 at every FP rate. No TP and no FP at all: the official script crashes; here the
  curve is the single point (0, 0).
* No included nodule among the evaluated scans: the sensitivity is undefined and :func:`froc` raises.
  A bootstrap resample without any nodule (possible on tiny data sets) gives NaN in the official script
  (which then sorts NaN last and averages it); here such resamples are left out of the intervals and
  counted in ``FROCResult.n_bootstrap_valid``.

Exactness
---------
The curve, the 7 sensitivities and the bootstrap intervals equal, bit for bit, those of a loop
transcription of the official script (see ``tests/test_froc.py``); the same transcription calling the
real ``sklearn.metrics.roc_curve`` (scikit-learn 1.9.1, checked during development; scikit-learn is not
a dependency) gives the same bits too. One platform detail cannot be
reproduced by array code: the official script squares with ``math.pow(d, 2.)``, i.e. the C library
``pow``, which on some libm versions is off by one unit in the last place for a few inputs; this module
squares with ``d * d`` (correctly rounded). The two can only disagree for a mark whose squared distance
is within one rounding unit (about 1e-16 relative) of the squared radius.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..data.annotations import WorldPoints, WorldPointsError, read_world_points
from ..data.annotations.luna import _check_diameters, _check_scores
from .froc_core import CPM_FP_RATES, FROCPoints, match, sphere_hit
from .plots import plot_froc  # noqa: F401  (moved there; kept importable from here)

__all__ = [
    "OPERATING_POINTS",
    "MAX_MARKS_PER_SCAN",
    "FROCError",
    "FROCInputError",
    "WorldPoints",
    "FROCResult",
    "read_luna_annotations",
    "read_luna_predictions",
    "read_luna_seriesuids",
    "froc",
    "froc_curve",
    "plot_froc",
]

#: FP rates (false positives per scan) at which the LUNA16 CPM averages the sensitivity.
OPERATING_POINTS = CPM_FP_RATES
#: ``maxNumberOfCADMarks`` of the official script.
MAX_MARKS_PER_SCAN = 100
#: Diameter used by the official script for findings with a negative (unknown) diameter.
UNKNOWN_DIAMETER_MM = 10.0
#: Probability the official script gives to missed nodules (they are dropped before the ROC analysis).
MISSED_NODULE_PROBABILITY = -1000000000.0
FROC_MIN_X = 0.125
FROC_MAX_X = 8.0
CURVE_GRID_POINTS = 10001  # fps_itp of evaluateCAD
BOOTSTRAP_GRID_POINTS = 10000  # all_fps of computeFROC_bootstrap

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------------
# errors and input containers
# ----------------------------------------------------------------------------------------------


class FROCError(ValueError):
    """The evaluation cannot be carried out (e.g. no nodule among the evaluated scans)."""


class FROCInputError(FROCError, WorldPointsError):
    """Bad input; the message names the file (or array) and the 1-based line (or row)."""

    def __init__(self, source: str, line: int | None, problem: str, word: str = "line"):
        WorldPointsError.__init__(self, source, line, problem, word)


class _AsFROCInputError:
    """Context manager: a :class:`WorldPointsError` of the shared reader becomes a :class:`FROCInputError`."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, WorldPointsError) and not isinstance(exc, FROCInputError):
            raise FROCInputError(exc.source, exc.line, exc.problem, exc.word) from None
        return False


def _as_uid_array(values) -> np.ndarray:
    arr = np.asarray(values, dtype=str).reshape(-1)
    return np.char.strip(arr) if arr.size else arr


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _check_uids(uids, lines, source, word):
    empty = np.char.str_len(uids) == 0 if uids.size else np.zeros(0, bool)
    if empty.any():
        raise FROCInputError(source, int(lines[_first(empty)]), "empty seriesuid", word)


# ----------------------------------------------------------------------------------------------
# CSV reading (one reader for all LUNA16 point files: medetect.data.annotations.read_world_points)
# ----------------------------------------------------------------------------------------------


def _open_csv(path: PathLike):
    source = os.fspath(path)
    try:
        return source, open(source, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise FROCInputError(source, None, f"cannot open file ({exc.strerror})") from None


def _is_blank(row: list[str]) -> bool:
    return not any(field.strip() for field in row)


def read_luna_annotations(path: PathLike, *, allow_unknown_diameter: bool = False) -> WorldPoints:
    """Read ``annotations.csv`` (or, with ``allow_unknown_diameter=True``, ``annotations_excluded.csv``,
    whose ``diameter_mm`` may be ``-1``): :func:`~medetect.data.annotations.read_world_points`, with its errors
    raised as :class:`FROCInputError`."""
    with _AsFROCInputError():
        return read_world_points(path, "excluded" if allow_unknown_diameter else "annotations")


def read_luna_predictions(path: PathLike) -> WorldPoints:
    """Read a LUNA16 submission (``seriesuid,coordX,coordY,coordZ,probability``) as :class:`WorldPoints` (scores)."""
    with _AsFROCInputError():
        return read_world_points(path, "marks")


def read_luna_seriesuids(path: PathLike) -> list[str]:
    """Read ``seriesuids.csv``: the first field of every line (no header in the official file).

    A first line that is exactly ``seriesuid`` is skipped as a header; blank lines are skipped; a uid
    listed twice is an error.
    """
    source, handle = _open_csv(path)
    uids: list[str] = []
    first_line: dict[str, int] = {}
    with handle:
        reader = csv.reader(handle)
        first_row = True
        try:
            for row in reader:
                if _is_blank(row):
                    continue
                uid = row[0].strip()
                if first_row:
                    first_row = False
                    if uid == "seriesuid":  # a header line (the official file has none)
                        continue
                if uid == "":
                    raise FROCInputError(source, reader.line_num, "empty seriesuid in the first field")
                if uid in first_line:
                    raise FROCInputError(source, reader.line_num,
                                         f"duplicate seriesuid {uid!r} (first listed on line "
                                         f"{first_line[uid]})")
                first_line[uid] = reader.line_num
                uids.append(uid)
        except csv.Error as exc:
            raise FROCInputError(source, reader.line_num, f"malformed CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise FROCInputError(source, None, f"not a UTF-8 text file ({exc.reason})") from None
    return uids


# ----------------------------------------------------------------------------------------------
# the FROC curve (computeFROC + sklearn.metrics.roc_curve, rebuilt)
# ----------------------------------------------------------------------------------------------


def _froc_from_counts(tps: np.ndarray, fps: np.ndarray, thresholds: np.ndarray, n_lesions: float,
                      n_scans: int):
    """Cumulative TP/FP counts at each distinct probability (decreasing) -> official FROC curve."""
    if tps.size > 2:  # roc_curve(drop_intermediate=True)
        keep = np.ones(tps.size, dtype=bool)
        keep[1:-1] = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.concatenate(([0.0], tps))
    fps = np.concatenate(([0.0], fps))
    thresholds = np.concatenate(([np.inf], thresholds))
    n_fp = fps[-1]
    n_detected = tps[-1]
    if n_fp > 0:
        curve_fps = (fps / n_fp) * n_fp / n_scans
    else:  # official: "this system has no false positives" -> fps = zeros
        curve_fps = np.zeros_like(fps)
    if n_lesions <= 0:
        curve_sens = np.full_like(tps, np.nan)
    elif n_detected > 0:
        curve_sens = (tps / n_detected) * n_detected / n_lesions
    else:  # official: tpr = NaN; defined here as 0
        curve_sens = np.zeros_like(tps)
    return curve_fps, curve_sens, thresholds


def froc_curve(labels, probabilities, n_lesions: float, n_scans: int):
    """``computeFROC`` of the official script on already matched entries.

    ``labels``: 1 for a detected nodule (with the probability of its best mark), 0 for a false
    positive; missed nodules are not passed, they only count in ``n_lesions``. Returns
    ``(fps, sensitivities, thresholds)``.
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    scan = np.zeros(labels.size, dtype=np.int64)  # one pseudo-scan holding every entry
    thr, tps, fps, _, _ = FROCPoints(scan, probabilities, labels, ~labels, np.zeros(1, np.int64)).counts()
    return _froc_from_counts(tps.astype(np.float64), fps.astype(np.float64), thr, float(n_lesions), n_scans)


def _official_curve(points: FROCPoints, n_scans: int, weights: np.ndarray | None = None):
    """``computeFROC`` of the core's points (:class:`~medetect.evaluation.froc_core.FROCPoints`): one point per
    distinct probability with cumulative TP / FP counts, as ``roc_curve``; ``weights``: a bootstrap resample."""
    thr, tps, fps, n_lesions, _ = points.counts(weights)
    return _froc_from_counts(tps.astype(np.float64), fps.astype(np.float64), thr, float(n_lesions), n_scans)


# ----------------------------------------------------------------------------------------------
# matching (evaluateCAD)
# ----------------------------------------------------------------------------------------------


def _truncate(mark_scan, mark_prob, n_scans, max_marks):
    """Official cap: with more than ``max_marks`` marks keep those with p > (max_marks+1)-th largest p."""
    keep = np.ones(mark_scan.shape[0], dtype=bool)
    if max_marks is None or max_marks <= 0 or mark_scan.size == 0:
        return keep
    counts = np.bincount(mark_scan, minlength=n_scans)
    over = counts > max_marks
    if not over.any():
        return keep
    order = np.lexsort((-mark_prob, mark_scan))  # by scan, then probability decreasing
    starts = np.cumsum(counts) - counts
    threshold = np.full(n_scans, -np.inf)
    threshold[over] = mark_prob[order[starts[over] + max_marks]]
    return ~over[mark_scan] | (mark_prob > threshold[mark_scan])


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------


def _float_or_none(x):
    if x is None:
        return None
    x = float(x)
    return None if not math.isfinite(x) else x


def _list(a):
    return None if a is None else [_float_or_none(v) for v in np.asarray(a).tolist()]


@dataclass(eq=False)
class FROCResult:
    """Outcome of :func:`froc`.

    ``fps`` are the 7 operating points (FPs per scan), ``sensitivities`` the interpolated
    sensitivities there, ``cpm`` their mean. ``*_ci_low``/``*_ci_high`` are the bootstrap bounds
    (None without bootstrap). ``curve_*`` is the official FROC curve (``computeFROC`` output);
    ``bootstrap_*`` the official bootstrap band on ``np.linspace(0.125, 8, 10000)``. :meth:`to_dict` is the JSON
    report; its ``undefined`` mapping gives the reason of each null interval.
    """

    fps: np.ndarray
    sensitivities: np.ndarray
    cpm: float
    sensitivities_ci_low: np.ndarray | None
    sensitivities_ci_high: np.ndarray | None
    cpm_ci_low: float | None
    cpm_ci_high: float | None
    curve_fps: np.ndarray
    curve_sensitivities: np.ndarray
    curve_thresholds: np.ndarray
    bootstrap_fps: np.ndarray | None
    bootstrap_mean: np.ndarray | None
    bootstrap_low: np.ndarray | None
    bootstrap_high: np.ndarray | None
    n_scans: int
    n_nodules: int
    n_tp: int
    n_fn: int
    n_fp: int
    n_ignored: int
    n_double_hits: int
    n_marks_on_several_nodules: int
    n_marks: int
    n_marks_truncated: int
    n_excluded_findings: int
    n_bootstrap: int
    n_bootstrap_valid: int
    confidence: float
    seed: int | None
    max_marks_per_scan: int | None

    @property
    def max_sensitivity(self) -> float:
        """Sensitivity with all marks (detected / total nodules)."""
        return self.n_tp / self.n_nodules

    @property
    def max_fps(self) -> float:
        """FPs per scan with all marks."""
        return self.n_fp / self.n_scans

    def to_dict(self, include_curve: bool = False) -> dict:
        out = {
            "fps": _list(self.fps),
            "sensitivities": _list(self.sensitivities),
            "cpm": _float_or_none(self.cpm),
            "sensitivities_ci_low": _list(self.sensitivities_ci_low),
            "sensitivities_ci_high": _list(self.sensitivities_ci_high),
            "cpm_ci_low": _float_or_none(self.cpm_ci_low),
            "cpm_ci_high": _float_or_none(self.cpm_ci_high),
            "confidence": self.confidence,
            "counts": {
                "scans": self.n_scans,
                "nodules": self.n_nodules,
                "tp": self.n_tp,
                "fn": self.n_fn,
                "fp": self.n_fp,
                "ignored_on_excluded": self.n_ignored,
                "double_hits_ignored": self.n_double_hits,
                "marks_on_several_nodules": self.n_marks_on_several_nodules,
                "marks_evaluated": self.n_marks,
                "marks_truncated": self.n_marks_truncated,
                "excluded_findings": self.n_excluded_findings,
            },
            "max_sensitivity": self.max_sensitivity,
            "max_fps": self.max_fps,
            "n_bootstrap": self.n_bootstrap,
            "n_bootstrap_valid": self.n_bootstrap_valid,
            "seed": self.seed,
            "max_marks_per_scan": self.max_marks_per_scan,
            "undefined": {},  # {key: reason} of the null metrics (medetect.evaluation.froc_core's convention)
        }
        if self.sensitivities_ci_low is None:
            why = ("no bootstrap (n_bootstrap is 0)" if self.n_bootstrap == 0
                   else "no bootstrap resample holds a nodule")
            out["undefined"] = dict.fromkeys(("sensitivities_ci_low", "sensitivities_ci_high", "cpm_ci_low",
                                              "cpm_ci_high"), why)
        if include_curve:
            thr = self.curve_thresholds.tolist()
            out["curve"] = {
                "fps": _list(self.curve_fps),
                "sensitivities": _list(self.curve_sensitivities),
                # the first threshold is +inf (the prepended (0, 0) point): null in JSON
                "thresholds": [None if not math.isfinite(t) else t for t in thr],
            }
        return out

    def format_table(self) -> str:
        has_ci = self.sensitivities_ci_low is not None
        lines = [
            "LUNA16 FROC (noduleCADEvaluationLUNA16 rules)",
            f"scans {self.n_scans}  nodules {self.n_nodules}  detected {self.n_tp}  missed {self.n_fn}  "
            f"FP marks {self.n_fp}  ignored on excluded {self.n_ignored}  "
            f"double hits {self.n_double_hits}  truncated {self.n_marks_truncated}",
            f"max sensitivity {self.max_sensitivity:.4f} at {self.max_fps:.3f} FPs/scan",
        ]
        ci_head = f"   {round(self.confidence * 100):d}% CI ({self.n_bootstrap_valid} bootstraps)" \
            if has_ci else ""
        lines.append(f"{'FPs/scan':>9}  {'sensitivity':>11}{ci_head}")

        def row(label, value, lo, hi):
            text = f"{label:>9}  {value:>11.4f}"
            if has_ci:
                text += f"   [{lo:.4f}, {hi:.4f}]"
            return text

        for i, fp in enumerate(self.fps):
            lo = self.sensitivities_ci_low[i] if has_ci else None
            hi = self.sensitivities_ci_high[i] if has_ci else None
            lines.append(row(f"{fp:g}", self.sensitivities[i], lo, hi))
        lines.append(row("CPM", self.cpm, self.cpm_ci_low, self.cpm_ci_high))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main entry point
# ----------------------------------------------------------------------------------------------


def _ordered_unique(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return values
    uniq, first = np.unique(values, return_index=True)
    return uniq[np.argsort(first, kind="stable")]


def _lookup(scan_uids: np.ndarray, query: np.ndarray):
    """Index of each query uid in ``scan_uids`` and whether it was found."""
    if query.size == 0 or scan_uids.size == 0:
        return np.zeros(query.size, dtype=np.int64), np.zeros(query.size, dtype=bool)
    order = np.argsort(scan_uids, kind="stable")
    sorted_uids = scan_uids[order]
    pos = np.clip(np.searchsorted(sorted_uids, query), 0, sorted_uids.size - 1)
    found = sorted_uids[pos] == query
    return order[pos], found


def _load_annotations(obj, allow_unknown, what):
    if isinstance(obj, WorldPoints):
        with _AsFROCInputError():
            _check_diameters(obj.diameters, obj.lines, obj.source, obj.word, allow_unknown)
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return read_luna_annotations(obj, allow_unknown_diameter=allow_unknown)
    raise TypeError(f"{what} must be a path or a WorldPoints, got {type(obj).__name__}")


def _load_scans(seriesuids):
    if isinstance(seriesuids, (str, os.PathLike)):
        return np.asarray(read_luna_seriesuids(seriesuids), dtype=str), os.fspath(seriesuids)
    uids = _as_uid_array(list(seriesuids))
    lines = np.arange(1, uids.size + 1)
    _check_uids(uids, lines, "<seriesuids>", "row")
    if uids.size:
        uniq, first, counts = np.unique(uids, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup_mask = np.ones(uids.size, dtype=bool)
            dup_mask[first] = False
            i = _first(dup_mask)
            raise FROCInputError("<seriesuids>", i + 1, f"duplicate seriesuid {str(uids[i])!r}", "row")
    return uids, "<seriesuids>"


def froc(annotations, predictions, excluded=None, seriesuids=None, n_bootstrap: int = 1000,
         seed: int | None = 0, *, max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
         confidence: float = 0.95) -> FROCResult:
    """Evaluate CAD marks against LUNA16 annotations with the official rules (module docstring).

    ``annotations``/``excluded``: paths or :class:`~medetect.data.annotations.WorldPoints` with diameters;
    ``predictions``: path or ``WorldPoints`` with scores; ``seriesuids``: path, sequence of uids, or None (scans = uids of the
    annotations and predictions). ``n_bootstrap=0`` skips the bootstrap. ``max_marks_per_scan=None``
    (or <= 0) disables the official cap of 100 marks per scan.
    """
    ann = _load_annotations(annotations, False, "annotations")
    exc = None if excluded is None else _load_annotations(excluded, True, "excluded")
    if isinstance(predictions, WorldPoints):
        pred = predictions
        with _AsFROCInputError():
            _check_scores(pred.scores, pred.lines, pred.source, pred.word)
    elif isinstance(predictions, (str, os.PathLike)):
        pred = read_luna_predictions(predictions)
    else:
        raise TypeError(f"predictions must be a path or a WorldPoints, got "
                        f"{type(predictions).__name__}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n_bootstrap = int(n_bootstrap)
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")

    if seriesuids is None:
        scan_uids = _ordered_unique(np.concatenate([ann.seriesuids, pred.seriesuids]).astype(str))
        list_source = None
    else:
        scan_uids, list_source = _load_scans(seriesuids)
    n_scans = int(scan_uids.size)
    if n_scans == 0:
        raise FROCError("no scans to evaluate (empty series list and no annotations or predictions)")

    # marks: every prediction must be on a listed scan
    mark_scan, found = _lookup(scan_uids, pred.seriesuids)
    if not found.all():
        i = _first(~found)
        raise FROCInputError(pred.source, int(pred.lines[i]),
                             f"seriesuid {str(pred.seriesuids[i])!r} is not in the series list "
                             f"{list_source}", pred.word)
    keep = _truncate(mark_scan, pred.scores, n_scans, max_marks_per_scan)
    mark_scan = mark_scan[keep]
    mark_xyz = pred.centres[keep]
    mark_prob = pred.scores[keep]

    # findings on the listed scans (others are ignored, as in the official script)
    ann_scan, ann_found = _lookup(scan_uids, ann.seriesuids)
    parts_scan = [ann_scan[ann_found]]
    parts_xyz = [ann.centres[ann_found]]
    parts_diam = [ann.diameters[ann_found]]
    parts_inc = [np.ones(int(ann_found.sum()), dtype=bool)]
    n_excluded_findings = 0
    if exc is not None:
        exc_scan, exc_found = _lookup(scan_uids, exc.seriesuids)
        n_excluded_findings = int(exc_found.sum())
        parts_scan.append(exc_scan[exc_found])
        parts_xyz.append(exc.centres[exc_found])
        parts_diam.append(exc.diameters[exc_found])
        parts_inc.append(np.zeros(n_excluded_findings, dtype=bool))
    nod_scan = np.concatenate(parts_scan).astype(np.int64)
    nod_xyz = np.concatenate(parts_xyz).reshape(-1, 3)
    nod_diam = np.concatenate(parts_diam)
    nod_inc = np.concatenate(parts_inc)

    # rules 3-8: the core's matching with the official sphere test; excluded findings are not counted
    m = match(mark_scan, mark_prob, mark_xyz, nod_scan, (nod_xyz, nod_diam), sphere_hit(UNKNOWN_DIAMETER_MM),
              n_scans, counted=nod_inc)
    n_nodules = int(nod_inc.sum())
    if n_nodules == 0:
        raise FROCError("no included nodule on the evaluated scans: the sensitivity is undefined")
    detected = m.lesion_hit
    ignored = (m.n_hits == 0) & (m.n_hits_uncounted > 0)
    points = m.points()  # rule 6: a detected nodule enters once, with its best mark's probability

    curve_fps, curve_sens, curve_thr = _official_curve(points, n_scans)
    op = np.asarray(OPERATING_POINTS, dtype=np.float64)
    sens = np.interp(op, curve_fps, curve_sens)
    cpm = float(np.mean(sens))

    ci_low = ci_high = None
    cpm_low = cpm_high = None
    bs_fps = bs_mean = bs_low = bs_high = None
    n_valid = 0
    if n_bootstrap > 0:
        rs = np.random.RandomState(seed)
        bs_fps = np.linspace(FROC_MIN_X, FROC_MAX_X, num=BOOTSTRAP_GRID_POINTS)
        at_op = np.full((n_bootstrap, op.size), np.nan)
        on_grid = np.full((n_bootstrap, bs_fps.size), np.nan, dtype=np.float32)
        for b in range(n_bootstrap):  # one vectorised curve per resample
            draw = rs.randint(n_scans, size=n_scans)
            f, s, _ = _official_curve(points, n_scans, np.bincount(draw, minlength=n_scans))
            if np.isnan(s[-1]):  # no nodule in this resample
                continue
            at_op[b] = np.interp(op, f, s)
            on_grid[b] = np.interp(bs_fps, f, s)
        valid = ~np.isnan(at_op[:, 0])
        n_valid = int(valid.sum())
        if n_valid:
            at_op = at_op[valid]
            cpms = at_op.mean(axis=1)
            ci_low, ci_high = _order_stat_bounds(at_op, confidence)
            lo, hi = _order_stat_bounds(cpms[:, None], confidence)
            cpm_low, cpm_high = float(lo[0]), float(hi[0])
            grid = on_grid[valid]
            bs_low, bs_high = _order_stat_bounds(grid, confidence)
            bs_mean = grid.astype(np.float64).mean(axis=0)
        else:
            bs_fps = None

    n_marks = int(mark_scan.size)
    return FROCResult(
        fps=op, sensitivities=sens, cpm=cpm,
        sensitivities_ci_low=ci_low, sensitivities_ci_high=ci_high,
        cpm_ci_low=cpm_low, cpm_ci_high=cpm_high,
        curve_fps=curve_fps, curve_sensitivities=curve_sens, curve_thresholds=curve_thr,
        bootstrap_fps=bs_fps, bootstrap_mean=bs_mean, bootstrap_low=bs_low, bootstrap_high=bs_high,
        n_scans=n_scans, n_nodules=n_nodules, n_tp=int(detected.sum()),
        n_fn=n_nodules - int(detected.sum()), n_fp=int(m.fp.sum()), n_ignored=int(ignored.sum()),
        n_double_hits=int(np.maximum(m.lesion_n_hits[nod_inc] - 1, 0).sum()),
        n_marks_on_several_nodules=int((m.n_hits > 1).sum()),
        n_marks=n_marks, n_marks_truncated=int(keep.size - n_marks),
        n_excluded_findings=n_excluded_findings,
        n_bootstrap=n_bootstrap, n_bootstrap_valid=n_valid, confidence=float(confidence),
        seed=seed, max_marks_per_scan=max_marks_per_scan,
    )


def _order_stat_bounds(values: np.ndarray, confidence: float):
    """compute_mean_ci of the official script: sorted[floor(Pz*n)], sorted[floor((1-Pz)*n)]."""
    pz = (1.0 - confidence) / 2.0
    v = np.sort(values, axis=0)
    n = v.shape[0]
    return v[int(math.floor(pz * n))], v[int(math.floor((1.0 - pz) * n))]


# ----------------------------------------------------------------------------------------------
# command line
