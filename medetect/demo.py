"""``medetect demo``: the shipped blood-cell detector on the bundled BCCD images -> an HTML report with overlays and a
blood-count table (and, when the shipped nodule model is present, a CT phantom example with marks and its FROC plot).
Runs on a fresh machine without ``../shared``."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data.annotations import read_voc
from .data.io import read_image
from .engine.predictor import Predictor
from .evaluation.detection import evaluate_voc
from .engine.load import load_model

__all__ = ["run_demo", "ASSETS", "WEIGHTS"]

PKG = Path(__file__).resolve().parent
ASSETS = PKG / "assets"
WEIGHTS = PKG / "weights"
BCCD_WEIGHTS = WEIGHTS / "bccd_faster_rcnn.safetensors"
COLOURS = {"RBC": (220, 40, 40), "WBC": (40, 90, 230), "Platelets": (20, 170, 60)}


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _overlay(rgb: np.ndarray, boxes: np.ndarray, labels: list[str], scores: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for (y0, x0, y1, x1), lab, s in zip(boxes, labels, scores):
        c = COLOURS.get(lab, (250, 200, 0))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=c, width=2)
        draw.text((x0 + 2, max(0, y0 - 11)), f"{lab} {s:.2f}", fill=c)
    return img


def _bccd_section(out_dir: Path, score_thresh: float, device: str = "cpu") -> tuple[str, dict]:
    loaded = load_model(BCCD_WEIGHTS, device=device)
    names, pre = list(loaded.classes), loaded.preprocess
    predictor = Predictor(loaded.model, device=device)
    rows, cards, preds, gts = [], [], [], []
    t0 = time.perf_counter()
    for jpg in sorted((ASSETS / "bccd").glob("*.jpg")):
        img = read_image(jpg)
        det = predictor.predict_image(img, pre)  # the model's stored preprocessing; boxes on the input grid
        keep = det["scores"] >= score_thresh
        boxes, scores, labels = det["boxes"][keep].numpy(), det["scores"][keep].numpy(), det["labels"][keep].numpy()
        lab_names = [names[i] for i in labels]
        counts = {n: int(sum(1 for x in lab_names if x == n)) for n in names}
        ann, _ = read_voc(jpg.with_suffix(".xml"), ASSETS / "bccd", classes=names, image_dir=".")
        truth = {n: int(sum(1 for x in ann.labels if x == n)) for n in names}
        preds.append(det)
        gts.append({"boxes": torch.as_tensor(ann.boxes), "labels": torch.tensor([names.index(c) for c in ann.labels])})
        rgb = np.moveaxis(img.array, 0, -1).astype(np.uint8)
        over = _overlay(rgb, boxes, lab_names, scores)
        over.save(out_dir / f"{jpg.stem}_detections.png")
        cards.append(f'<figure><img src="{_png_data_uri(over)}" width="480"><figcaption>{html.escape(jpg.name)}</figcaption></figure>')
        rows.append((jpg.name, counts, truth))
    seconds = time.perf_counter() - t0
    voc = evaluate_voc(preds, gts, class_names=names)
    head = "".join(f"<th>{n} (pred / annotated)</th>" for n in names)
    body = "".join(
        f"<tr><td>{html.escape(f)}</td>" + "".join(f"<td>{c[n]} / {t[n]}</td>" for n in names) + "</tr>" for f, c, t in rows
    )
    table = f"<table><tr><th>image</th>{head}</tr>{body}</table>"
    summary = {"images": len(rows), "seconds": round(seconds, 2), "map50_on_bundled": round(float(voc["map"]), 4),
               "ap50_per_class": {k: round(float(v), 4) for k, v in voc["per_class"].items()}, "score_thresh": score_thresh}
    section = (
        "<h2>Blood-cell count (BCCD, Faster R-CNN ResNet-18-FPN trained from scratch)</h2>"
        f"<p>Counts are detections with score &ge; {score_thresh}. VOC AP@0.5 on these {len(rows)} bundled validation images: "
        f"{summary['map50_on_bundled']:.3f} (per class {html.escape(json.dumps(summary['ap50_per_class']))}); "
        f"inference {seconds:.1f} s on the CPU.</p>{table}<div class=grid>{''.join(cards)}</div>"
    )
    return section, summary


def run_demo(out_dir: Path, score_thresh: float = 0.5, device: str = "cpu") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not BCCD_WEIGHTS.is_file():
        raise FileNotFoundError(f"shipped weights missing: {BCCD_WEIGHTS}")
    sections, summary = [], {}
    s, summary["bccd"] = _bccd_section(out_dir, score_thresh, device)
    sections.append(s)
    try:
        from .luna.demo import ct_section  # the CT nodule example, when its shipped model exists
    except ImportError:
        ct_section = None
    if ct_section is not None:
        s, summary["ct"] = ct_section(out_dir)
        if s:
            sections.append(s)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;"
             "padding:3px 8px}.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:4px}")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>medetect demo</title><style>{style}</style></head><body><h1>medetect demo</h1>{''.join(sections)}</body></html>"
    report = out_dir / "report.html"
    report.write_text(page)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    brief = {"bccd_map50_bundled": summary["bccd"]["map50_on_bundled"], "bccd_seconds": summary["bccd"]["seconds"]}
    if summary.get("ct"):
        brief.update({"ct_cpm_demo_phantoms": summary["ct"].get("cpm"), "ct_seconds": summary["ct"].get("seconds")})
    print(json.dumps(brief))
    return report
