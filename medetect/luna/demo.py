"""The CT section of ``medetect demo``: lung nodules on two synthetic chest phantoms, made on the fly.

:func:`ct_section` writes two seeded phantom scans in the LUNA16 layout into a temporary folder
(:func:`medetect.data.phantoms.write_luna16_dataset`), runs the best shipped nodule pipeline on them and scores it with
the official LUNA16 FROC rules (:func:`medetect.evaluation.froc.froc`):

* with ``weights/nodule_phantom_det3d.safetensors`` (stage one, a 3D RetinaNet) present: whole-scan detection
  (:func:`medetect.luna.detection.predict_scan`), every mark rescored by the stage-two cube classifier
  ``weights/nodule_fpr_phantom.safetensors`` and the two probabilities fused (:func:`medetect.luna.fpr.fuse`);
* otherwise the LUNA16 candidate track: the phantoms' ``candidates.csv`` rescored by the stage-two classifier.

It returns an HTML fragment (FROC plot and an axial-slice montage as base64 PNGs, a table of the top marks) and a
summary dict; both PNGs are also written to ``out_dir``. Without the stage-two weights it returns ``("", {...})``.
Everything shown is synthetic: the models were trained on phantoms only and say nothing about real CT.
"""

from __future__ import annotations

import base64
import html
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["ct_section", "DET_WEIGHTS", "FPR_WEIGHTS", "DEMO_PHANTOMS"]

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DET_WEIGHTS = WEIGHTS / "nodule_phantom_det3d.safetensors"
FPR_WEIGHTS = WEIGHTS / "nodule_fpr_phantom.safetensors"
# the recipe of the stage-one training data (experiments/luna_phantom_stage1.py), with a seed it never saw
DEMO_PHANTOMS = dict(n_scans=2, seed=31337, subsets=1, n_nodules=(2, 4), shape=(80, 160, 160), spacing=(1.5, 1.2, 1.2),
                     nodule_diameters_mm=(4.0, 30.0))
# how the two stages' probabilities are combined (medetect.luna.fpr.fuse): with the shipped FPR model (trained on the
# shipped detector's own marks) "product", "geometric" and "mean" tie on the held-out phantoms (CPM 0.969 against 0.924
# for stage one alone, nodule_phantom_det3d.md); "product" is the usual two-stage rule and fuse's default
FUSION = "product"
CANDIDATE_DIAMETER_MM = 10.0  # circle drawn for a candidates.csv mark (candidates have no size)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _hits(nodules, marks_xyz) -> np.ndarray:
    """``[M]`` bool: does each mark hit a nodule of ``nodules`` (a :class:`~medetect.data.annotations.WorldPoints`)?
    The official rule, :func:`~medetect.data.annotations.hits` (distance < diameter / 2); a nodule without a size
    (diameter -1) is never hit, as before."""
    from ..data.annotations import hits

    m = np.asarray(marks_xyz, dtype=np.float64).reshape(-1, 3)
    return hits(m[:, None], nodules.centres[None], nodules.diameters[None]).any(1)


def _montage(path: Path, panels: list[dict], dpi: int = 110) -> None:
    """Axial slices with ground truth (green) and marks (red: hit, orange: false positive) as circles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    n = len(panels)
    cols = min(4, max(1, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.6 * rows + 0.4))
    FigureCanvasAgg(fig)
    for i, p in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = p["slice"]
        sy, sx = p["spacing_yx"]
        ax.imshow(img, cmap="gray", vmin=-1000, vmax=400, extent=(0, img.shape[1], img.shape[0], 0),
                  aspect=sy / sx, interpolation="nearest")
        for (cy, cx, r_mm, colour, lw, ls) in p["circles"]:
            ax.add_patch(Ellipse((cx, cy), 2 * r_mm / sx, 2 * r_mm / sy, fill=False, edgecolor=colour, lw=lw, ls=ls))
        ax.set_title(p["title"], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("axial slices: green = ground-truth nodule, red = mark on a nodule, orange = false-positive mark",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.6 * rows + 0.4)), h_pad=1.5)
    fig.savefig(str(path), dpi=dpi)


def _slice_circles(z_edge: float, geom_spacing, items) -> list:
    """Circles of the spheres ``items`` [(centre_vox zyx, diameter_mm, colour, lw, ls)] cut by the axial slice whose
    centre is at edge coordinate ``z_edge``: the cross-section radius, skipped when the plane misses the sphere."""
    out = []
    sz = geom_spacing[0]
    for c, dia, colour, lw, ls in items:
        dz = (z_edge - c[0]) * sz
        r = dia / 2.0
        if abs(dz) >= r:
            continue
        out.append((c[1], c[2], float(np.sqrt(r * r - dz * dz)), colour, lw, ls))
    return out


def ct_section(out_dir, *, top_k: int = 8, max_panels: int = 8, fusion: str = FUSION,
               det_weights: Path | None = None, fpr_weights: Path | None = None) -> tuple[str, dict]:
    """Run the shipped nodule pipeline on two fresh phantoms -> (HTML section, summary dict).

    Writes ``ct_froc.png`` and ``ct_slices.png`` to ``out_dir``. Returns ``("", {"skipped": reason})`` when the
    shipped stage-two weights are missing (the stage-one detector is optional).
    """
    t0 = time.perf_counter()
    det_weights = Path(det_weights) if det_weights is not None else DET_WEIGHTS
    fpr_weights = Path(fpr_weights) if fpr_weights is not None else FPR_WEIGHTS
    if not fpr_weights.is_file():
        return "", {"skipped": f"shipped nodule weights missing: {fpr_weights}"}
    import torch

    from ..convert import world_to_voxel
    from ..data.phantoms import write_luna16_dataset
    from ..evaluation.froc import froc, plot_froc
    from .detection import LunaLayout, load_luna_model, predict_scan, write_submission
    from .fpr import fuse, load_fpr, score_candidates

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_det = det_weights.is_file()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="medetect-ct-demo-") as tmp:
        tmp = Path(tmp)
        write_luna16_dataset(tmp / "data", **DEMO_PHANTOMS)
        layout = LunaLayout(tmp / "data")
        uids = layout.uids
        fpr = load_fpr(fpr_weights)
        if use_det:
            model, pre = load_luna_model(det_weights)
        marks, scans, t_infer = {}, {}, time.perf_counter()
        for uid in uids:
            img = layout.read(uid)
            vol, geom = img.array[0], img.geometry
            scans[uid] = (vol, geom)
            if use_det:
                m = predict_scan(model, pre, img)
                centres = m["centres_xyz"]
                p_fpr = score_candidates(fpr, vol, geom, centres)
                marks[uid] = {"centres_xyz": centres, "diameters_mm": m["diameters_mm"],
                              "p_det": m["probabilities"], "p_fpr": p_fpr,
                              "probabilities": fuse(m["probabilities"], p_fpr, fusion)}
            else:
                c = np.asarray(layout.candidates.get(uid, (np.zeros((0, 3)), None))[0]).reshape(-1, 3)
                p_fpr = score_candidates(fpr, vol, geom, c)
                marks[uid] = {"centres_xyz": c, "diameters_mm": np.full(len(c), CANDIDATE_DIAMETER_MM),
                              "p_fpr": p_fpr, "probabilities": p_fpr}
        t_infer = time.perf_counter() - t_infer
        sub = write_submission(tmp / "submission.csv", marks)
        res = froc(layout.annotations_path, sub, excluded=layout.excluded_path, seriesuids=uids, n_bootstrap=0)
        res_det = None
        if use_det:  # stage one alone, for comparison
            sub1 = write_submission(tmp / "submission_stage1.csv", {
                u: {"centres_xyz": m["centres_xyz"], "probabilities": m["p_det"]} for u, m in marks.items()})
            res_det = froc(layout.annotations_path, sub1, excluded=layout.excluded_path, seriesuids=uids, n_bootstrap=0)
        froc_png = out_dir / "ct_froc.png"
        pipeline = ("stage one (3D RetinaNet) + stage two (FPR cube classifier), fused by " + fusion if use_det
                    else "LUNA16 candidate track: candidates.csv rescored by the FPR cube classifier")
        plot_froc(res, froc_png, title=f"CT nodules on {len(uids)} synthetic phantoms ({'two-stage' if use_det else 'candidates + FPR'})")

        # top marks, hit / miss, and the slices to show
        rows, panels, n_nod = [], [], 0
        for uid in uids:
            vol, geom = scans[uid]
            gt = layout.nodule_points.for_uid(uid)
            gt_c, gt_d = gt.centres, gt.diameters
            n_nod += len(gt_d)
            m = marks[uid]
            order = np.argsort(-np.asarray(m["probabilities"]), kind="stable")[:top_k]
            c = np.asarray(m["centres_xyz"]).reshape(-1, 3)[order]
            hit = _hits(gt, c)
            short = uid[-6:]
            for rank, (k, h) in enumerate(zip(order, hit)):
                rows.append({"scan": short, "rank": rank + 1, "x": float(c[rank, 0]), "y": float(c[rank, 1]),
                             "z": float(c[rank, 2]), "diameter_mm": float(m["diameters_mm"][k]),
                             "probability": float(m["probabilities"][k]),
                             "p_det": float(m["p_det"][k]) if "p_det" in m else None,
                             "p_fpr": float(m["p_fpr"][k]), "hit": bool(h)})
            gt_v = np.asarray(world_to_voxel(gt_c, geom)).reshape(-1, 3)
            mk_v = np.asarray(world_to_voxel(c, geom)).reshape(-1, 3) if len(c) else np.zeros((0, 3))
            items = [(v, float(d), "lime", 1.6, "-") for v, d in zip(gt_v, gt_d)]
            items += [(v, float(m["diameters_mm"][k]), "red" if h else "orange", 1.2, "--")
                      for v, k, h in zip(mk_v, order, hit)]
            # one panel per nodule (its centre slice), then the strongest false positives
            zs = [(float(v[0]), f"{short}: nodule {d:.1f} mm") for v, d in zip(gt_v, gt_d)]
            zs += [(float(v[0]), f"{short}: mark #{r + 1} (FP)") for r, (v, h) in enumerate(zip(mk_v, hit)) if not h][:2]
            for z_edge, title in zs[:max(1, max_panels // len(uids))]:
                zi = int(np.clip(np.floor(z_edge), 0, vol.shape[0] - 1))
                panels.append({"slice": vol[zi], "spacing_yx": geom.spacing[1:], "title": f"{title}, z={zi}",
                               "circles": _slice_circles(zi + 0.5, geom.spacing, items)})
        slices_png = out_dir / "ct_slices.png"
        _montage(slices_png, panels)
    seconds = time.perf_counter() - t0
    summary = {
        "pipeline": pipeline, "detector": DET_WEIGHTS.name if use_det else None, "fpr": fpr_weights.name,
        "fusion": fusion if use_det else "fpr", "phantoms": {k: list(v) if isinstance(v, tuple) else v
                                                             for k, v in DEMO_PHANTOMS.items()},
        "n_scans": len(uids), "n_nodules": int(n_nod), "cpm": round(float(res.cpm), 4),
        "fps": [float(f) for f in res.fps], "sensitivities": [round(float(s), 4) for s in res.sensitivities],
        "max_sensitivity": round(float(res.max_sensitivity), 4),
        "stage1_cpm": round(float(res_det.cpm), 4) if res_det is not None else None,
        "stage1_sensitivities": [round(float(x), 4) for x in res_det.sensitivities] if res_det is not None else None,
        "inference_seconds": round(t_infer, 2),
        "seconds": round(seconds, 2), "threads": threads, "froc_png": str(froc_png), "slices_png": str(slices_png),
        "top_marks": rows,
    }
    sens = ", ".join(f"{s:.2f}@{f:g}" for f, s in zip(summary["fps"], summary["sensitivities"]))
    body = "".join(
        f"<tr><td>{html.escape(r['scan'])}</td><td>{r['rank']}</td><td>{r['x']:.1f}</td><td>{r['y']:.1f}</td>"
        f"<td>{r['z']:.1f}</td><td>{r['diameter_mm']:.1f}</td><td>{r['probability']:.3f}</td>"
        + (f"<td>{r['p_det']:.3f}</td>" if use_det else "")
        + f"<td>{r['p_fpr']:.3f}</td><td>{'hit' if r['hit'] else 'miss'}</td></tr>" for r in rows)
    head = ("<tr><th>scan</th><th>rank</th><th>x (mm)</th><th>y (mm)</th><th>z (mm)</th><th>diameter (mm)</th>"
            "<th>probability</th>" + ("<th>stage one</th>" if use_det else "") + "<th>stage two</th><th>hit / miss</th></tr>")
    section = (
        "<h2>CT lung nodules (synthetic phantoms, LUNA16 format)</h2>"
        f"<p>{len(uids)} chest phantoms generated just now (seed {DEMO_PHANTOMS['seed']}, {n_nod} nodules of "
        f"{DEMO_PHANTOMS['nodule_diameters_mm'][0]:g}-{DEMO_PHANTOMS['nodule_diameters_mm'][1]:g} mm). "
        f"Pipeline: {html.escape(pipeline)}. Official LUNA16 FROC: CPM {res.cpm:.3f}; sensitivity at "
        f"0.125-8 FPs/scan {html.escape(sens)}"
        + (f" (stage one alone: CPM {res_det.cpm:.3f})" if res_det is not None else "")
        + f". Inference {t_infer:.1f} s, whole section {seconds:.1f} s on the CPU. "
        "<b>Synthetic data and models trained on synthetic data only; not for clinical use.</b></p>"
        f"<div class=grid><figure><img src=\"{_data_uri(froc_png)}\" width=\"480\"><figcaption>FROC</figcaption></figure>"
        f"<figure><img src=\"{_data_uri(slices_png)}\" width=\"720\"><figcaption>axial slices</figcaption></figure></div>"
        f"<p>Top {top_k} marks per scan (world mm):</p><table>{head}{body}</table>"
    )
    return section, summary
