"""Patch-level pretraining for the mammography detector (Shen et al. 2019's recipe): the backbone first learns
lesion (benign / malignant) vs background on crops, then the whole-image Faster R-CNN starts from it.

Stage 1 trains the lineage's classification + localisation network (``medetect.lineage.localizer``; GroupNorm and the
detector's width, so its trunk IS the detector's backbone) on one-lesion crops of the mini-MIAS train split at the
first-release detector's scale (0.25, configs/mias_faster_rcnn_256.yaml) and background crops of the same images; stage 2 is the ordinary detector training with
``train.init_backbone`` pointing at stage 1's file::

    python experiments/mammo_patch_pretrain.py --data ../shared/data/mini-mias --out RUN_PATCHES
    medetect train configs/mias_faster_rcnn_256.yaml --run-dir RUN --set train.init_backbone=RUN_PATCHES/localizer.safetensors --threads 1
    medetect evaluate --weights RUN --data ../shared/data/mini-mias:val --json

mini-MIAS is research only: the crops live in memory, nothing is written but the model file and its run folder.

``--smoke`` trains one short epoch on 16 synthetic films (experiments/_smoke_data.py) into a fresh temporary folder
(or ``--out``): a check that the script works, not a result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a mini-MIAS-layout folder")
    p.add_argument("--out", help="output folder (localizer.safetensors, runs/localizer)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="one short epoch on 16 synthetic films (seconds)")
    a = p.parse_args(argv)
    smoke = {}
    if a.smoke:
        import tempfile

        from _smoke_data import write_mias_folder

        a.out = a.out or tempfile.mkdtemp(prefix="medetect_smoke_patch_pretrain_")
        a.data = str(write_mias_folder(Path(a.out) / "mias-smoke"))
        a.epochs, smoke = 1, {"crops_per_epoch": 32, "batch_size": 16}
    if not a.data or not a.out:
        p.error("--data and --out are required (or --smoke)")
    try:
        import torch

        from medetect.lineage.data import load_split
        from medetect.lineage.localizer import LocalizerStepConfig, train_localizer

        torch.set_num_threads(a.threads)
        classes = ["benign", "malignant"]
        train = load_split(f"mias:{a.data}:train", scale=0.25, classes=classes, channels=1)
        val = load_split(f"mias:{a.data}:val", scale=0.25, classes=classes, channels=1)
        cfg = LocalizerStepConfig(base_width=16, norm="group", window=64, hidden=128, epochs=a.epochs,
                                  context=[1.5, 2.5], negatives_per_image=16,
                                  **{"crops_per_epoch": 3000, **smoke})
        rec = train_localizer(train, val, cfg, Path(a.out))
    except (ValueError, FileNotFoundError) as e:
        print(f"mammo_patch_pretrain: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: rec.get(k) for k in ("weights", "train_seconds", "val")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
