"""Per-organ localisation metrics (Xu et al., IEEE TMI 2019), for boxes of any d.

For one image with K organs, a predicted box and a true box per organ (``[K, 2d]`` voxels, array order, half-open;
NaN rows = absent) and the voxel ``spacing`` (mm per array axis):

* **wall distance** (mm): mean over the box's 2d faces of ``|predicted face - true face| * spacing``. A true box that
  touches the volume border is truncated there, so only faces strictly inside the volume count (``faces_inside``);
  an organ with no inside face has no wall distance (NaN).
* **centroid distance** (mm): Euclidean distance of the box centres, in mm.
* **IoU** of the two boxes (0 for a missed organ).
* **detected**: the organ is present in the truth, the model gives it a box, and the boxes overlap (IoU > 0).

:func:`organ_metrics` computes these per organ (vectorised over organs); :func:`summarise_organs` averages a list of
per-image records into the report keys ``wall_distance_mm``, ``centroid_distance_mm``, ``iou``, ``detection_rate``
(each ``{"mean": overall mean over (image, organ) pairs, "per_organ": {organ: mean}}``). Wall and centroid distance
are averaged over detected organs, IoU and detection rate over present ones.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..boxes import elementwise_box_iou

__all__ = ["organ_metrics", "summarise_organs", "METRIC_KEYS"]

METRIC_KEYS = ("wall_distance_mm", "centroid_distance_mm", "iou", "detection_rate")


def organ_metrics(pred: torch.Tensor, true: torch.Tensor, spacing: Sequence[float],
                  faces_inside: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-organ metrics of predicted vs true boxes ``[K, 2d]`` (NaN rows = absent); see the module docstring.

    Returns ``{"present" [K] bool, "detected" [K] bool, "wall_distance_mm" [K], "centroid_distance_mm" [K],
    "iou" [K]}`` (float64; NaN where undefined: organ absent, or not detected for the distances)."""
    p, t = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(true, dtype=torch.float64)
    if p.shape != t.shape or p.ndim != 2 or p.shape[1] % 2:
        raise ValueError(f"predicted and true boxes must both be [K, 2d], got {tuple(p.shape)} and {tuple(t.shape)}")
    d = p.shape[1] // 2
    sp = torch.as_tensor(list(spacing), dtype=torch.float64)
    if sp.numel() != d:
        raise ValueError(f"spacing must have {d} values (mm per array axis), got {sp.numel()}")
    inside = torch.ones_like(t, dtype=torch.bool) if faces_inside is None else torch.as_tensor(faces_inside).bool()
    present = torch.isfinite(t).all(1)
    has_pred = torch.isfinite(p).all(1)
    both = present & has_pred
    zero = torch.zeros_like(p)
    ps, ts = torch.where(both[:, None], p, zero), torch.where(both[:, None], t, zero)  # finite stand-ins
    iou = torch.where(both, elementwise_box_iou(ps, ts), torch.zeros(len(p), dtype=torch.float64))
    detected = both & (iou > 0)
    face_err = (ps - ts).abs() * sp.repeat(2)  # [K, 2d] mm
    n_in = inside.sum(1)
    wall = (face_err * inside).sum(1) / n_in.clamp(min=1)
    wall = torch.where(detected & (n_in > 0), wall, torch.full_like(wall, math.nan))
    centre = ((ps[:, :d] + ps[:, d:]) - (ts[:, :d] + ts[:, d:])) / 2 * sp
    cdist = torch.where(detected, centre.norm(dim=1), torch.full_like(wall, math.nan))
    nan = torch.full_like(iou, math.nan)
    return {"present": present, "detected": detected, "wall_distance_mm": wall, "centroid_distance_mm": cdist,
            "iou": torch.where(present, iou, nan)}


def _mean(values: list[float]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return round(sum(v) / len(v), 4) if v else None


def summarise_organs(records: Sequence[Mapping[str, Mapping[str, float | bool | None]]]) -> dict:
    """Average per-image records ``{organ: {"present", "detected", "wall_distance_mm", "centroid_distance_mm",
    "iou"}}`` into ``{key: {"mean": overall, "per_organ": {organ: mean}}}`` for the :data:`METRIC_KEYS`, plus
    ``"n_present"`` per organ. Only present organs count; distances only where detected."""
    per: dict[str, dict[str, list]] = {}
    for rec in records:  # images x organs of a report
        for organ, m in rec.items():
            if not m.get("present"):
                continue
            acc = per.setdefault(organ, {k: [] for k in METRIC_KEYS})
            acc["detection_rate"].append(1.0 if m.get("detected") else 0.0)
            acc["iou"].append(float(m.get("iou") or 0.0))
            for k in ("wall_distance_mm", "centroid_distance_mm"):
                if m.get("detected") and m.get(k) is not None:
                    acc[k].append(float(m[k]))
    out: dict = {}
    for k in METRIC_KEYS:
        everything = [v for acc in per.values() for v in acc[k]]
        out[k] = {"mean": _mean(everything), "per_organ": {o: _mean(acc[k]) for o, acc in sorted(per.items())}}
    out["n_present"] = {o: len(acc["detection_rate"]) for o, acc in sorted(per.items())}
    return out
