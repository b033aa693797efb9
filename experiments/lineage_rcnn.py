"""Lineage steps 3-4 (issue 10): train the final R-CNN on BCCD train, its val figures and timing, the recall study.

    python experiments/lineage_rcnn.py train [--out /work/lineage-out] [--resume]   # 1 torch thread
    python experiments/lineage_rcnn.py evaluate [--out DIR] [--threads 1] [--n 87]  # val mAP@0.5, seconds/image
    python experiments/lineage_rcnn.py recall [--out DIR]                           # recall.png + recall.json

Results are printed and written to ``OUT/runs/rcnn/eval_<threads>t.json`` / ``OUT/recall/recall.json``.
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("train", "evaluate", "recall"))
    ap.add_argument("--out", default="/work/lineage-out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=0, help="evaluate: first n val images (0: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from medetect.lineage.data import load_split

    out = Path(a.out)
    if a.stage == "train":
        from medetect.lineage.rcnn import RCNNStepConfig, train_rcnn

        train = load_split(f"{SHARED / 'bccd'}:train", classes=CLASSES)
        r = train_rcnn(train, None, RCNNStepConfig(), out, resume=a.resume)
        print(json.dumps({"weights": str(r["weights"]), "train_seconds": r["train_seconds"]}))
    elif a.stage == "evaluate":
        from medetect.evaluation.detection import evaluate_voc
        from medetect.lineage.rcnn import load_rcnn

        val = load_split(f"{SHARED / 'bccd'}:val", classes=CLASSES)
        if a.n:
            val = val.subset(range(min(a.n, len(val))))
        method = load_rcnn(out / "rcnn.safetensors")
        preds, t0 = [], time.perf_counter()
        for image in val.images:  # loop over images
            preds.append(method.detect(image))
        sec = (time.perf_counter() - t0) / len(val)
        gts = [{"boxes": b, "labels": lab} for b, lab in zip(val.boxes, val.labels)]
        res = {"threads": a.threads, "images": len(val), "seconds_per_image": sec,
               "proposal_seconds_per_image": sum(p["proposal_seconds"] for p in preds) / len(val),
               "mean_proposals": sum(p["num_proposals"] for p in preds) / len(val)}
        for name, v07 in (("map50_all_point", False), ("map50_11_point", True)):
            e = evaluate_voc(preds, gts, 0.5, use_07_metric=v07, num_classes=3, class_names=CLASSES)
            res[name] = e["map"]
            res[name + "_per_class"] = e["per_class"]
        print(json.dumps(res, indent=1))
        (out / "runs" / "rcnn" / f"eval_{a.threads}t.json").write_text(json.dumps(res, indent=1))
    else:
        from medetect.lineage.recall import METHODS, recall_study

        specs = {"BCCD val": f"{SHARED / 'bccd'}:val", "DSB2018 val": f"dsb2018:{SHARED / 'dsb2018-nuclei'}:val"}
        res = recall_study(specs, METHODS, rpn_weights={"BCCD val": REPO / "medetect/weights/bccd_faster_rcnn.safetensors"},
                           cache_dir=out / "cache", out_dir=out / "recall", scales={"BCCD val": 0.5, "DSB2018 val": 1.0}, classes={"BCCD val": CLASSES},
                           progress=True)
        print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
