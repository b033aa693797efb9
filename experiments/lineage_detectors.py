"""Lineage steps 5-6 (issue 10): train the final Fast R-CNN, Faster R-CNN, YOLO and RetinaNet on BCCD train (best
epoch by val mAP@0.5), then their val figures and timing.

    python experiments/lineage_detectors.py train STEP [--out /work/lineage-out] [--resume]   # 1 torch thread
    python experiments/lineage_detectors.py evaluate STEP [--out DIR] [--threads 1] [--n 87]  # mAP@0.5, s/image

STEP: fast_rcnn, faster_rcnn, yolo or retinanet. Evaluation writes ``OUT/<step>_eval_<threads>t.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDETECT_SHARED_DATA", REPO.parent / "shared" / "data"))
CLASSES = ["RBC", "WBC", "Platelets"]


def main() -> None:
    from medetect.lineage.detectors import STEPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("train", "evaluate"))
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--out", default="/work/lineage-out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=0, help="evaluate: first n val images (0: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from medetect.lineage.data import load_split

    out = Path(a.out)
    val = load_split(f"{SHARED / 'bccd'}:val", classes=CLASSES)
    if a.stage == "train":
        from medetect.lineage.detectors import DetectorStepConfig, train_detector_step
        from medetect.lineage.proposals import ProposalConfig

        train = load_split(f"{SHARED / 'bccd'}:train", classes=CLASSES)
        r = train_detector_step(a.step, train, val, DetectorStepConfig(), out, resume=a.resume,
                                proposals=ProposalConfig(), cache_dir=out / "cache" / "ss")
        print(json.dumps(r))
        return
    from medetect.evaluation.detection import evaluate_voc
    from medetect.lineage.detectors import load_detector_step

    if a.n:
        val = val.subset(range(min(a.n, len(val))))
    method = load_detector_step(out / f"{a.step}.safetensors")
    preds, t0 = [], time.perf_counter()
    for image in val.images:  # loop over images
        preds.append(method.detect(image))
    sec = (time.perf_counter() - t0) / len(val)
    gts = [{"boxes": b, "labels": lab} for b, lab in zip(val.boxes, val.labels)]
    voc = evaluate_voc(preds, gts, num_classes=len(CLASSES), class_names=CLASSES)
    voc07 = evaluate_voc(preds, gts, num_classes=len(CLASSES), class_names=CLASSES, use_07_metric=True)
    res = {"step": a.step, "name": method.name, "threads": a.threads, "images": len(val), "seconds_per_image": sec,
           "proposal_seconds_per_image": sum(p["proposal_seconds"] for p in preds) / len(val),
           "proposals_per_image": sum(p["num_proposals"] for p in preds) / len(val),
           "map50": float(voc["map"]), "map50_07": float(voc07["map"]),
           "ap50": {k: float(v) for k, v in voc["per_class"].items()}}
    (out / f"{a.step}_eval_{a.threads}t.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
