"""Organ localiser applications: evaluate on an ``organ-ct-sample``-layout folder, predict on any CT (CSV, JSON,
three-view PNG).

``evaluate_organ_folder(loaded, folder)`` -> the JSON of ``medetect evaluate --data FOLDER`` (``organs_scored``:
organs that both the model and the folder know; per case and organ the metrics of
:func:`medetect.evaluation.organs.organ_metrics`; the means of :func:`~medetect.evaluation.organs.summarise_organs`).

``predict_organs(loaded, files, out_dir)`` -> per input ``<stem>_organs.csv`` (one row per organ: present, score,
voxel box ``z0..x1`` on the input grid, world box ``x0_mm..z1_mm``, truncated) and ``<stem>_organs.png`` (axial,
coronal and sagittal views through each found box, boxes drawn).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..evaluation.organs import organ_metrics, summarise_organs
from .data import read_organ_folder
from .localiser import localisation_record, localise

__all__ = ["format_organ_table", "evaluate_organ_folder", "predict_organs", "three_view_png", "is_organ_folder"]


def is_organ_folder(path: str | Path) -> bool:
    """An ``organ-ct-sample``-layout folder: ``boxes.csv`` and ``volumes/``."""
    p = Path(path)
    return (p / "boxes.csv").is_file() and (p / "volumes").is_dir()


def _num(x) -> float | None:
    x = float(x)
    return round(x, 3) if math.isfinite(x) else None


def evaluate_organ_folder(loaded, folder: str | Path, *, cases: Sequence[str] | None = None,
                          score_thresh: float | None = None) -> dict:
    """Per-organ wall / centroid distance, IoU and detection rate of an organ localiser on every case of ``folder``
    (or the named ``cases``), each case reported separately, then the means."""
    from ..data.io import read_image

    all_cases = read_organ_folder(folder)
    if cases:
        unknown = sorted(set(cases) - {c.name for c in all_cases})
        if unknown:
            raise ValueError(f"{folder}: no case named {unknown[0]!r} in boxes.csv")
        all_cases = [c for c in all_cases if c.name in set(cases)]
    model_organs = list(loaded.classes)
    folder_organs = sorted({o for c in all_cases for o in c.organs})
    scored = [o for o in model_organs if o in folder_organs]
    per_case, records = {}, []
    for c in all_cases:  # one CT per case
        img = read_image(c.volume)
        res = localise(loaded, img, score_thresh=score_thresh)
        k = len(model_organs)
        true = torch.full((k, 6), math.nan, dtype=torch.float64)
        inside = torch.ones((k, 6), dtype=torch.bool)
        idx = [model_organs.index(o) for o in c.organs if o in model_organs]
        src = [i for i, o in enumerate(c.organs) if o in model_organs]
        true[idx] = torch.as_tensor(c.boxes[src], dtype=torch.float64)
        inside[idx] = torch.as_tensor(c.faces_inside[src])
        m = organ_metrics(res["boxes"], true, img.geometry.spacing, inside)
        rec = {}
        for i, o in enumerate(model_organs):  # rows of a report
            if o not in scored:
                continue
            rec[o] = {"present": bool(m["present"][i]), "detected": bool(m["detected"][i]),
                      "predicted": bool(res["present"][i]), "score": _num(res["scores"][i]),
                      "truncated_truth": bool(m["present"][i]) and not bool(inside[i].all()),
                      **{key: _num(m[key][i]) for key in ("wall_distance_mm", "centroid_distance_mm", "iou")}}
        per_case[c.name] = {"shape": list(c.shape), "spacing_zyx": [round(s, 4) for s in img.geometry.spacing],
                            "organs_present": [o for o in scored if rec[o]["present"]], "organs": rec,
                            "summary": summarise_organs([rec])}
        records.append(rec)
    return {"folder": str(folder), "organs_scored": scored,
            "organs_model_only": [o for o in model_organs if o not in folder_organs],
            "organs_folder_only": [o for o in folder_organs if o not in model_organs],
            "cases": per_case, **summarise_organs(records)}


def three_view_png(volume: np.ndarray, spacing, result: dict, path: str | Path, *, window=(-400.0, 600.0)) -> Path:
    """Axial, coronal and sagittal slices through the centre of each found organ box (one row per organ; one row
    with the volume's centre when none is found), every found box drawn where the slice cuts it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    vol = np.asarray(volume, dtype=np.float32)
    sz, sy, sx = (float(s) for s in spacing)
    found = [i for i in range(len(result["organs"])) if bool(result["present"][i])]
    rows = found or [None]
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.6 * len(rows)), squeeze=False)
    boxes = result["boxes"].numpy() if isinstance(result["boxes"], torch.Tensor) else np.asarray(result["boxes"])
    colours = plt.get_cmap("tab20")
    for r, i in enumerate(rows):  # one row of panels per organ
        c = (boxes[i, :3] + boxes[i, 3:]) / 2 if i is not None else np.asarray(vol.shape) / 2
        cz, cy, cx = (int(np.clip(v, 0, n - 1)) for v, n in zip(c, vol.shape))
        views = [("axial", vol[cz], (1, 2), sy / sx, cz, 0), ("coronal", vol[:, cy][::-1], (0, 2), sz / sx, cy, 1),
                 ("sagittal", vol[:, :, cx][::-1], (0, 1), sz / sy, cx, 2)]
        for a, (name, img, (ra, ca), aspect, at, cut) in enumerate(views):
            ax = axes[r, a]
            ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
            for j in found:  # boxes that this slice cuts
                b = boxes[j]
                if not b[cut] <= at + 0.5 < b[cut + 3]:
                    continue
                y0, y1 = b[ra], b[ra + 3]
                if ra == 0:  # flipped so that superior is up
                    y0, y1 = vol.shape[0] - b[3], vol.shape[0] - b[0]
                ax.add_patch(Rectangle((b[ca] - 0.5, y0 - 0.5), b[ca + 3] - b[ca], y1 - y0, fill=False,
                                       lw=2 if j == i else 1, color=colours(j % 20)))
                if j == i:
                    ax.text(b[ca], y0 - 2, result["organs"][j], color=colours(j % 20), fontsize=8)
            ax.set_title(f"{name} {at}" + (f" - {result['organs'][i]}" if i is not None else " (no organ found)"),
                         fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return Path(path)


def predict_organs(loaded, files: Sequence[Path], out_dir: str | Path, *, read=None, score_thresh: float | None = None,
                   png: bool = True) -> tuple[list[Path], dict]:
    """One box per organ for each CT in ``files`` (files or DICOM series folders); writes ``<stem>_organs.csv`` and
    ``<stem>_organs.png``; returns (CSV paths, JSON-ready records). A CT with no organ found says so in a warning."""
    import warnings

    from ..data.io import read_image
    from ..engine.tasks import stem as input_stem

    read = read or read_image
    out_dir = Path(out_dir)
    written, everything = [], {}
    for f in files:  # one CT per input
        img = read(f)
        res = localise(loaded, img, score_thresh=score_thresh)
        stem = input_stem(f)
        path = out_dir / f"{stem}_organs.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["organ", "present", "score", "z0", "y0", "x0", "z1", "y1", "x1", "x0_mm", "y0_mm", "z0_mm",
                        "x1_mm", "y1_mm", "z1_mm", "truncated"])
            for i, o in enumerate(res["organs"]):  # rows of a file
                p = bool(res["present"][i])
                vals = [f"{v:.2f}" for v in res["boxes"][i].tolist()] if p else [""] * 6
                mm = [f"{v:.2f}" for v in res["boxes_mm"][i].tolist()] if p else [""] * 6
                w.writerow([o, int(p), f"{float(res['scores'][i]):.4f}", *vals, *mm,
                            int(bool(res["truncated"][i])) if p else ""])
        if not bool(res["present"].any()):
            warnings.warn(f"{f}: no organ found (every organ's best score is below the threshold)", stacklevel=2)
        if png:  # drawn in the canonical LPS layout, so that superior is up and the patient's left on the right
            from ..data.orientation import to_canonical

            can, ro = to_canonical(img)
            three_view_png(can.array[0], can.geometry.spacing, {**res, "boxes": ro.boxes_to_canonical(res["boxes"])},
                           out_dir / f"{stem}_organs.png")
        everything[str(f)] = localisation_record(res)
        written.append(path)
    return written, everything


def format_organ_table(res: dict) -> str:
    """The text table of :func:`evaluate_organ_folder`'s result: per case, per organ rows, then the means."""
    def f(v):
        return "-" if v is None else f"{v:.1f}" if abs(v) >= 1.5 else f"{v:.2f}"

    lines = [f"organs scored: {', '.join(res['organs_scored']) or '(none)'}"]
    head = f"  {'organ':<18s} {'wall mm':>8s} {'centroid mm':>11s} {'IoU':>6s} {'detected':>9s}"
    for case, c in res["cases"].items():
        lines += [f"{case} (shape {c['shape']}, spacing {c['spacing_zyx']} mm)", head]
        for o, m in c["organs"].items():
            if m["present"]:
                lines.append(f"  {o:<18s} {f(m['wall_distance_mm']):>8s} {f(m['centroid_distance_mm']):>11s} "
                             f"{f(m['iou']):>6s} {('yes' if m['detected'] else 'no'):>9s}"
                             + ("  (truncated)" if m["truncated_truth"] else ""))
    lines += ["all cases", f"  {'organ':<18s} {'wall mm':>8s} {'centroid mm':>11s} {'IoU':>6s} {'det. rate':>9s}"]
    for o in res["detection_rate"]["per_organ"]:
        lines.append(f"  {o:<18s} {f(res['wall_distance_mm']['per_organ'][o]):>8s} "
                     f"{f(res['centroid_distance_mm']['per_organ'][o]):>11s} {f(res['iou']['per_organ'][o]):>6s} "
                     f"{f(res['detection_rate']['per_organ'][o]):>9s}")
    lines.append(f"  {'mean':<18s} {f(res['wall_distance_mm']['mean']):>8s} {f(res['centroid_distance_mm']['mean']):>11s} "
                 f"{f(res['iou']['mean']):>6s} {f(res['detection_rate']['mean']):>9s}")
    return "\n".join(lines)
