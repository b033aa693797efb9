"""``medetect lineage evaluate``: the lecture's table for one split, measured in one run on one machine.

Each row runs its model on every image of the split (raw image at the lineage scale in, detections out: proposals,
CNN, classifiers, regression and NMS all inside the timed call) with the same torch thread count; one untimed call
on the first image warms each model up. Columns: ``method`` (the lecture's names), ``proposals`` (where regions come
from), ``proposals_per_image``, ``map50`` (VOC all-point AP at IoU 0.5, averaged over classes), ``map50_07`` (VOC2007
11-point), ``seconds_per_image`` (mean wall time), ``proposal_seconds_per_image`` (the part spent on proposals),
``train_seconds`` (from the step's train record), ``status`` (``ok``, ``not trained``, ``failed: ...``,
``no objects in split``) and, for classification + localisation (one object per crop, not a detector),
``accuracy`` and ``mean_iou`` on the split's one-object crops instead of mAP.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..files import write_text_atomically
from ..evaluation.detection import evaluate_voc
from .config import LineageConfig
from .data import LineageSet, load_split
from .steps import ROW_ORDER, STEPS
from .train import load_lineage_config

__all__ = ["evaluate_lineage", "load_methods", "format_table", "plot_table", "run_method"]

LOCALISATION_ROW = "Classification + localisation"


def load_methods(key: str, file: Path, cfg: LineageConfig, device="cpu") -> list[tuple[str, object]]:
    """``[(row name, Method or None)]`` of one step's model file (None: a row that is not a detector)."""
    if key == "localizer":
        from .localizer import load_overfeat

        return [(LOCALISATION_ROW, None), ("OverFeat", load_overfeat(file, cfg.overfeat, device=device))]
    if key == "rcnn":
        from .rcnn import load_rcnn

        return [("R-CNN", load_rcnn(file, cfg.proposals, device=device))]
    from .detectors import load_detector_step

    m = load_detector_step(file, proposals=cfg.proposals if key == "fast_rcnn" else None, device=device)
    return [(m.name, m)]


def run_method(method, data: LineageSet, *, warmup: bool = True, progress: bool = False) -> dict:
    """Detections of ``method`` on every image of ``data`` with the timing columns."""
    preds, seconds, prop_seconds, props = [], 0.0, 0.0, 0
    with torch.inference_mode():
        if warmup and len(data):
            method.detect(data.images[0])
        for i, image in enumerate(data.images):
            t0 = time.perf_counter()
            det = method.detect(image)
            seconds += time.perf_counter() - t0
            prop_seconds += float(det.get("proposal_seconds", 0.0))
            props += int(det.get("num_proposals", 0))
            preds.append({"boxes": det["boxes"].detach().cpu().float().reshape(-1, 4),
                          "scores": det["scores"].detach().cpu().float().reshape(-1),
                          "labels": det["labels"].detach().cpu().long().reshape(-1)})
            if progress and (i + 1) % 20 == 0:
                print(f"  {method.name}: {i + 1}/{len(data)} images", flush=True)
    n = max(1, len(data))
    return {"preds": preds, "seconds_per_image": seconds / n, "proposal_seconds_per_image": prop_seconds / n,
            "proposals_per_image": props / n}


def _map(preds, data: LineageSet, use_07: bool) -> float | None:
    gts = [{"boxes": b, "labels": lab} for b, lab in zip(data.boxes, data.labels)]
    res = evaluate_voc(preds, gts, iou_threshold=0.5, use_07_metric=use_07, num_classes=len(data.class_names),
                       class_names=data.class_names)
    m = float(res["map"])
    return None if math.isnan(m) else m


def _row(name: str, key: str, record: dict, **kw) -> dict:
    st = next(s for s in STEPS if s.key == key)
    return {"method": name, "step": key, "proposals": st.proposals, "proposals_per_image": None, "map50": None,
            "map50_07": None, "seconds_per_image": None, "proposal_seconds_per_image": None,
            "train_seconds": record.get("train_seconds"), "status": "ok", **kw}


def evaluate_lineage(weights_dir: str | Path, spec: str, *, out_dir: str | Path | None = None, steps=None,
                     device="cpu", progress: bool = True) -> dict:
    """The table (list of rows, module docstring) for ``spec`` (``FOLDER:SPLIT``) of the models in ``weights_dir``;
    with ``out_dir``: ``lineage_table.md``, ``lineage_table.json`` and ``lineage_map_vs_time.png`` written there."""
    wd = Path(weights_dir)
    if not wd.is_dir():
        raise FileNotFoundError(f"--weights-dir {wd} is not a folder")
    cfg = load_lineage_config(wd)
    data = load_split(spec, scale=cfg.data.scale, classes=cfg.data.classes)
    keys = list(steps) if steps else [s.key for s in STEPS]
    rows: list[dict] = []
    for st in STEPS:
        if st.key not in keys:
            continue
        file, rec_file = wd / f"{st.key}.safetensors", wd / f"{st.key}.json"
        record = json.loads(rec_file.read_text()) if rec_file.is_file() else {}
        if not file.is_file():
            status = f"failed: {record['error']}" if record.get("status") == "failed" else "not trained"
            rows += [_row(name, st.key, record, status=status) for name in st.rows]
            continue
        if progress:
            print(f"lineage evaluate: {st.key}", flush=True)
        for name, method in load_methods(st.key, file, cfg, device=device):
            if method is None:  # classification + localisation: one object per crop, scored on crops
                from .localizer import evaluate_localizer

                try:
                    m = evaluate_localizer(file, data)
                    rows.append(_row(name, st.key, record, accuracy=m.get("accuracy"), mean_iou=m.get("mean_iou"),
                                     status="ok (one-object crops; not a detector)"))
                except ValueError as e:
                    rows.append(_row(name, st.key, record, status=f"failed: {e}"))
                continue
            r = run_method(method, data, progress=progress)
            row = _row(name, st.key, record, proposals_per_image=r["proposals_per_image"],
                       seconds_per_image=r["seconds_per_image"],
                       proposal_seconds_per_image=r["proposal_seconds_per_image"])
            if data.num_objects == 0:
                row["status"] = "no objects in split"
            else:
                row["map50"], row["map50_07"] = _map(r["preds"], data, False), _map(r["preds"], data, True)
            notes = record.get("notes")
            if notes:
                row["note"] = notes
            rows.append(row)
    rows.sort(key=lambda r: ROW_ORDER.index(r["method"]) if r["method"] in ROW_ORDER else len(ROW_ORDER))
    result = {"data": spec, "images": len(data), "objects": data.num_objects, "scale": data.scale,
              "threads": torch.get_num_threads(), "device": str(device), "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out / "lineage_table.json", json.dumps(result, indent=1))
        write_text_atomically(out / "lineage_table.md", format_table(result) + "\n")
        plot_table(result, out / "lineage_map_vs_time.png")
    return result


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(result: dict) -> str:
    """The table as markdown (one row per method, the lecture's order)."""
    head = ("| method | proposals | proposals / image | mAP@0.5 (VOC all-point) | mAP@0.5 (VOC07 11-point) | "
            "test s / image | of which proposals | train time | status |")
    lines = [f"{result['data']}: {result['images']} images, {result['objects']} objects, scale {result['scale']}, "
             f"{result['threads']} torch thread(s), {result['device']}", "", head, "|" + "---|" * 9]
    for r in result["rows"]:
        m50 = _f(r["map50"], ".3f")
        if r.get("accuracy") is not None:
            m50 = f"(accuracy {r['accuracy']:.3f}, mean IoU {_f(r.get('mean_iou'), '.3f')})"
        train = "-" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f} min"
        lines.append(f"| {r['method']} | {r['proposals']} | {_f(r['proposals_per_image'], '.0f')} | {m50} | "
                     f"{_f(r['map50_07'], '.3f')} | {_f(r['seconds_per_image'], '.3f')} | "
                     f"{_f(r['proposal_seconds_per_image'], '.3f')} | {train} | {r['status']} |")
    return "\n".join(lines)


def plot_table(result: dict, path: str | Path) -> None:
    """mAP@0.5 against test seconds per image (log scale), one labelled point per detector row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in result["rows"] if r["map50"] is not None and r["seconds_per_image"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in pts:
        ax.scatter(r["seconds_per_image"], r["map50"], s=36)
        ax.annotate(r["method"], (r["seconds_per_image"], r["map50"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"test seconds per image ({result['threads']} thread(s), {result['device']})")
    ax.set_ylabel("mAP@0.5 (VOC all-point)")
    ax.set_title(f"the lineage on {Path(str(result['data']).rsplit(':', 1)[0]).name}:"
                 f"{str(result['data']).rsplit(':', 1)[-1]}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
