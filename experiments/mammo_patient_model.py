"""Mammography beyond the image: a patient-level model on top of the shipped benign/malignant detector, plus the
per-lesion-type and confusion figures of the results page (docs/results.md).

One command reproduces every figure (the detector runs once per split; its detections are cached as CSV, so later
calls take seconds)::

    python experiments/mammo_patient_model.py all --out ../mammo-out
    # the detector retrained on the preprocessed copy, scored the same way on that copy:
    python experiments/mammo_patient_model.py all --weights RUN --data ../mammo-out/mias-pre --tag pre_

Steps (each is also a sub-command): ``preprocess`` (only on request, not part of ``all``: a preprocessed copy of the
folder, :func:`medetect.mammo.preprocess.preprocess_folder` -> ``OUT/mias-pre``, for
``configs/mias_faster_rcnn_preprocessed.yaml``), ``score`` (detections of the train and val images -> ``OUT/detections_<split>.csv``,
~10 min at 1 thread for the 224 images), ``evaluate`` (``medetect.mammo.evaluate`` metrics on val with the new
``by_lesion_type`` and ``confusion`` keys, thresholds picked on train -> ``OUT/val_metrics.json``), ``patient``
(:mod:`medetect.mammo.patient`: logistic regression on train, AUCs on val against the image-only baseline ->
``OUT/patient_model.json``). Errors are one sentence on stderr, exit code 2.

``--smoke`` runs preprocess (pectoral removal), score, evaluate and patient on 16 synthetic films (experiments/
_smoke_data.py) in a fresh temporary folder (or ``--out``): a check that the script works, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("MEDETECT_DATA", str(REPO.parent / "shared" / "data")) + "/mini-mias"
DEFAULT_WEIGHTS = REPO / "medetect" / "weights" / "mammo_mias_faster_rcnn.safetensors"


def _records(args, split):
    from medetect.data.lesion_folder import read_lesion_folder

    return read_lesion_folder(args.data, split)


def _dets_path(args, split) -> Path:
    return Path(args.out) / f"detections_{args.tag}{split}.csv"


def cmd_preprocess(args) -> None:
    from medetect.mammo.preprocess import MammoPreprocess, preprocess_folder

    dst = Path(args.out) / ("mias-pre" + ("-clahe" if args.clahe else "") + ("-pec" if args.pectoral == "remove" else ""))
    rep = preprocess_folder(args.data, dst, MammoPreprocess(clahe=args.clahe, pectoral=args.pectoral))
    print(json.dumps(rep))
    print(f"written {dst} (research-only MIAS derivative: keep it out of the repository)")


def cmd_score(args) -> None:
    import torch

    from medetect.apps import load_model
    from medetect.mammo.evaluate import detect_records, write_detections_csv

    torch.set_num_threads(args.threads)
    loaded = load_model(args.weights)
    for split in args.splits:
        path = _dets_path(args, split)
        if path.is_file() and not args.rescore:
            print(f"{path}: cached (use --rescore to run the detector again)")
            continue
        recs = _records(args, split)
        dets = detect_records(loaded, recs)
        write_detections_csv(path, [r.image_id for r in recs], dets)
        print(f"{path}: {len(recs)} images, {sum(len(d['scores']) for d in dets)} detections")


def _load(args, split):
    from medetect.mammo.evaluate import read_detections_csv

    recs = _records(args, split)
    path = _dets_path(args, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cached detections; run the 'score' step first")
    return recs, read_detections_csv(path, [r.image_id for r in recs])


def cmd_evaluate(args) -> None:
    from medetect.mammo.evaluate import mammo_metrics_for

    train, val = _load(args, args.train_split), _load(args, args.val_split)
    res = mammo_metrics_for(*val, train=train, n_boot=args.n_boot, plot_dir=Path(args.out) / f"plots_{args.tag}val")
    out = Path(args.out) / f"val_metrics{'_' + args.tag.rstrip('_') if args.tag else ''}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("by_lesion_type", "confusion")}, indent=1))
    print(f"written {out}")


def cmd_patient(args) -> None:
    from medetect.mammo.patient import patient_study

    train, val = _load(args, args.train_split), _load(args, args.val_split)
    res = patient_study(*train, *val, n_boot=args.n_boot, seed=args.seed, folds=args.folds)
    out = Path(args.out) / f"patient_model{'_' + args.tag.rstrip('_') if args.tag else ''}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    from medetect.mammo.patient import format_patient_table

    print(format_patient_table(res))
    print(f"written {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("step", nargs="?", choices=["preprocess", "score", "evaluate", "patient", "all"])
    ap.add_argument("--data", default=DEFAULT_DATA, help="mini-MIAS-layout folder (default: %(default)s)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="benign/malignant detector (model file or run)")
    ap.add_argument("--out", default=None, help="output folder (detections cache, JSON results; default ../mammo-out, "
                                                "with --smoke a new temporary folder)")
    ap.add_argument("--tag", default="", help="prefix of the cached files (e.g. 'pre_' for another detector)")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rescore", action="store_true", help="run the detector again even when cached")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clahe", action="store_true", help="preprocess: also CLAHE (-> OUT/mias-pre-clahe)")
    ap.add_argument("--pectoral", choices=["keep", "remove"], default="keep",
                    help="preprocess: remove the pectoral muscle found (-> OUT/mias-pre-pec)")
    ap.add_argument("--smoke", action="store_true",
                    help="preprocess, score, evaluate and patient on 16 synthetic films (seconds; not a result)")
    args = ap.parse_args(argv)
    if args.step is None and not args.smoke:
        ap.error("a step is required (or --smoke)")
    args.splits = [args.train_split, args.val_split]
    if args.smoke:
        import tempfile

        from _smoke_data import write_mias_folder

        args.out = args.out or tempfile.mkdtemp(prefix="medetect_smoke_mammo_")
        args.data = str(write_mias_folder(Path(args.out) / "mias-smoke"))
        args.step, args.n_boot, args.folds, args.pectoral = "all", 20, 2, "remove"
    args.out = args.out or "../mammo-out"
    try:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"{args.data}: no such data folder (--data)")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        if args.step == "preprocess" or args.smoke:
            cmd_preprocess(args)
        if args.step in ("score", "all"):
            cmd_score(args)
        if args.step in ("evaluate", "all"):
            cmd_evaluate(args)
        if args.step in ("patient", "all"):
            cmd_patient(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
